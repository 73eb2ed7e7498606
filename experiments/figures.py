"""The study's summary figures, redrawn from the recorded evaluations in experiments/results (no training).

    python experiments/figures.py [--only study study_long study_schedule] [--results DIR]

study.png: parts A-E, the ratio of DE-CM's FD to the distilled-velocity teacher at 50 steps against training
iterations (mean of 3 seeds) for CM 1, CM 2 and Mix 4 NFE (study_gpu1, study_gpu2, study_cpu, pipeline_h200).
study_long.png: parts F-G, r_max 0.05 against 0.2 to 2,000 iterations, the cosine lr and the capacity probe
(study_cpu2, study_cpu3). study_schedule.png: parts H-I, uniform-with-N-seg against logit-normal to 3,200
iterations (study_cpu4, study_cpu5). Each reads the evals.json files the study wrote (merged per part, one
key per run folder) and draws with the core's one plotting function (model.plot).
"""
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core, by name
import common  # noqa: E402
import train  # noqa: E402

SEEDS = (0, 1, 2)
TITLES = (('cm1', 'CM 1 NFE'), ('cm2', 'CM 2 NFE'), ('mix4', 'Mix 4 NFE'))


def xy(points):
    """[(x, y), ...] -> (xs, ys), the series format of the core's plot."""
    return [x for x, _ in points], [y for _, y in points]


def load(res, path):
    if not os.path.exists(os.path.join(res, path)):
        raise ValueError(f'--results {res}: no {path} (the recorded results are in experiments/results)')
    with open(os.path.join(res, path)) as f:
        return json.load(f)


def ref_of(table, n=2000):
    return lambda s: table.get(f'{common.APG_KEY}|50|{s}|{n}')


def ratio_curves(ev, ref, configs, key):
    """{label: (steps, mean ratio)} over the steps every seed reached."""
    out = {}
    for name, label in configs:
        pts = {}
        for s in SEEDS:
            for st, e in ev.get(f'{name}-s{s}', {}).items():
                if key in e and ref(s):
                    pts.setdefault(int(st), []).append(e[key] / ref(s))
        out[label] = xy([(st, statistics.fmean(v)) for st, v in sorted(pts.items()) if len(v) == len(SEEDS)])
    return out


def study_png(res):
    """Parts A-E (study.md: 'How study.png is drawn')."""
    g1, g2 = load(res, 'study_gpu1/evals.json'), load(res, 'study_gpu2/evals.json')
    cpu = load(res, 'study_cpu/evals.json')
    pipe = {r['row'] + str(r['nfe']): r['fd'] for r in load(res, 'pipeline_h200.json')['fd']}
    panels = []
    for key, title in TITLES:
        series = ratio_curves(g1, ref_of(g1['teacher_fd.json']), [(n, f'{n} (b64)') for n in (
            'base', 'lr1e-3', 'lr1e-3-cosine', 'facm', 'facm-lr1e-3', 'w1-relax', 'cm-cos', 'seg16')], key)
        series.update(ratio_curves(g2, ref_of(g2['teacher_fd.json']), [(n, n) for n in ('b256-lr2e-3', 'b256-lr1e-3-facm')],
                                   key))
        row = {'cm1': 'DE-CM, CM sampler1', 'cm2': 'DE-CM, CM sampler2', 'mix4': 'DE-CM, Mix sampler4'}[key]
        apg = pipe[common.APG_KEY + '50']
        series['b256-lr1e-3 (pipeline)'] = ([400], [statistics.fmean(v / r for v, r in zip(pipe[row], apg))])
        series.update(ratio_curves(cpu, ref_of(cpu['fd.json']), [('lr1e-3', 'lr1e-3 (b64, CPU)'), (
            'lr1e-3-emawarm', 'lr1e-3 + EMA warm-up (b64, CPU)')], key))
        panels.append((f'DE-CM {title} / teacher 50 steps (APG), mean of 3 seeds', series))
    common.plot(os.path.join(res, 'study.png'), panels, xlabel='training iterations', ylabel='FD ratio')


def study_long_png(res):
    """Parts F-G (study.md: 'How study_long.png is drawn')."""
    E, F = load(res, 'study_cpu3/evals.json'), load(res, 'study_cpu2/evals.json')
    base = {s: ref_of(E['teacher_fd.json'])(s) for s in SEEDS}
    reg = load(res, 'study_cpu2/regress.json')

    def curve(name, key):
        runs = {s: E[f'{name}-s{s}'] for s in SEEDS if f'{name}-s{s}' in E}
        steps = sorted({int(k) for e in runs.values() for k in e})
        return xy([(st, statistics.fmean(runs[s][str(st)][key] / base[s] for s in runs)) for st in steps
                   if len(runs) == len(SEEDS) and all(key in runs[s].get(str(st), {}) for s in runs)])
    panels = []
    for key, title, target in (('cm1', 'CM 1 NFE', 1.10), ('cm2', 'CM 2 NFE', 1.00),
                               ('mix4_t0.25', 'Mix 4 NFE (switch 0.25)', 1.00)):
        series = {'r_max 0.05 (train.py), mean of 3 seeds': curve('lr1e-3-emawarm', key),
                  'r_max 0.2 (the pipeline), mean of 3 seeds': curve('ew-rmax0.2', key)}
        if key == 'cm1':
            series['cosine lr to 0 at 1200, r_max 0.05'] = ([1200], [statistics.fmean(
                F[f'ew-cosine-s{s}']['1200']['cm1'] / base[s] for s in SEEDS)])
            series['regression onto the 50-step ODE map'] = xy([(r['step'], statistics.fmean(r['ratio'])) for r in reg])
        series[f'target {target:.2f}x'] = ([200, 2000], [target, target])
        panels.append((f'DE-CM {title} / teacher 50 steps (APG)', series))
    common.plot(os.path.join(res, 'study_long.png'), panels, xlabel='iterations (batch 64)', ylabel='FD ratio',
               logy=False, ylim=(0.9, 1.6))


def study_schedule_png(res):
    """Parts H-I (study.md: 'results/study_schedule.png')."""
    H, I_ = load(res, 'study_cpu4/evals.json'), load(res, 'study_cpu5/evals.json')
    base = {s: ref_of(I_['teacher_fd.json'])(s) for s in SEEDS}

    def curve(E, name, key):
        runs = [E[f'{name}-s{s}'] for s in SEEDS]
        steps = sorted({st for r in runs for st in r if all(key in r2.get(st, {}) for r2 in runs)}, key=int)
        return xy([(int(st), statistics.fmean(runs[s][st][key] / base[s] for s in SEEDS)) for st in steps])
    panels = []
    for title, key_h, keys_i, target in (
            ('CM 1 NFE', 'cm1', [('cm1', '')], 1.1), ('CM 2 NFE', 'cm2', [('cm2', '')], 1.0),
            ('Mix 4 NFE', 'mix4_t0.25', [('mix4_t0.25', ', t 0.25'), ('mix4_t0.0625', ', t 0.0625')], 1.0)):
        series = {'uniform-with-N-seg' + (', t 0.25' if 'mix' in key_h else ''): curve(H, 'ew-rmax0.2', key_h)}
        for k, lab in keys_i:
            series['logit-normal' + lab] = curve(I_, 'ew-rmax0.2-logitnorm', k)
        series[f'target {target:.2f}x'] = ([200, 3200], [target, target])
        panels.append((f'{title}: FD / distilled-velocity teacher, 50 steps', series))
    common.plot(os.path.join(res, 'study_schedule.png'), panels, xlabel='DE-CM iterations (batch 64)', ylabel='ratio',
               logy=False, ylim=(0.9, 1.5))


FIGURES = {'study': study_png, 'study_long': study_long_png, 'study_schedule': study_schedule_png}


def figures(a):
    for name in a.only:
        FIGURES[name](a.results)
    print(f'figures: wrote {", ".join(os.path.join(a.results, name + ".png") for name in a.only)}')


def build_parser():
    p = common.parser(__doc__)
    p.add_argument('--only', nargs='+', default=list(FIGURES), choices=list(FIGURES), help='the figures to draw')
    p.add_argument('--results', default=common.RESULTS, help='folder of the recorded results (read and written)')
    return p


def main(argv=None):
    return common.run_main(build_parser(), figures, argv, 'figures.py')


if __name__ == '__main__':
    main()
