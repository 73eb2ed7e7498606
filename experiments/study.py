"""What closes the gap to the teacher: configurations of the DE-CM run x seeds, evaluated along the run.

    python experiments/study.py --configs NAME ... [--eval-at 250 500 1000] [--seeds 0 1 2] [--jobs 2]

Each configuration of STUDY is the pipeline's DE-CM run (decm_argv: batch 64, lr 1e-3, w_cfg 2, eta 0.05, a
constant EMA and r_max 0.05, as the study was run) plus its train.py flags. Every (configuration, seed) runs
as its own process (--jobs at a time); it trains in chunks up to each --eval-at iteration and scores its EMA
weights there (CM 1 and 2 NFE, Mix 4 at t = 0.25 and at each --mix-ts, CM 1 NFE without the EMA) into
RUNS/<config>-s<seed>/evals.json. The teacher's baselines go to RUNS/teacher_fd.json. Writes
--results/study.md (every run, and a summary of the ratio to the distilled-velocity teacher at 50 steps,
mean +- sd over seeds) and study.png (the ratio against training iterations). Resumes; --stop-after stops it
cleanly; --report only rewrites the report from the runs.
"""
import argparse
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core, by name
import common  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from common import fd_of, load_json, mean_sd, pm, write_atomic  # noqa: E402

# What closes the gap to the teacher: each configuration is the pipeline's DE-CM run plus these flags. The
# configurations whose flags left train.py with the variants that lost are gone, their runs stay in
# results/study.md: FACM's relaxed CM target (facm, facm-lr1e-3, w1-relax, g-clip, cm-cos, lr1e-3-emawarm-facm,
# b256-lr1e-3-facm: --w1-power, --g-clip, --cm-weight) and the cosine lr schedule (lr1e-3-cosine, ew-cosine:
# --lr-schedule, --warmup).
STUDY = [
    ('base', 'the pipeline before the study (lr 3e-4, batch 64, constant w1)', ['--lr', '3e-4']),
    ('lr1e-3', 'higher learning rate', ['--lr', '1e-3']),
    ('ema0.999', 'EMA 0.999', ['--ema', '0.999']),
    ('ema0.98', 'EMA 0.98', ['--ema', '0.98']),
    ('batch128', 'batch 128', ['--batch', '128']),
    ('seg16', 'N = 16 segments', ['--segments', '16']),
    ('rmax0.2', 'r_max 0.2', ['--r-max', '0.2']),
    ('p1', 'adaptive weighting p = 1', ['--p', '1']),
    ('w2-0.5', 'w2 = 0.5', ['--w2', '0.5']),
    ('freq1', 'N2N every iteration', ['--freq', '1']),
    ('b256-lr1e-3', 'batch 256, lr 1e-3', ['--batch', '256', '--lr', '1e-3']),
    ('lr1e-3-emawarm', 'lr 1e-3, EMA warm-up', ['--lr', '1e-3', '--ema-warmup']),
    ('ew-p0', 'lr 1e-3, EMA warm-up, plain L2 (p = 0)', ['--lr', '1e-3', '--ema-warmup', '--p', '0']),
    ('ew-seg4', 'lr 1e-3, EMA warm-up, N = 4 segments', ['--lr', '1e-3', '--ema-warmup', '--segments', '4']),
    ('ew-rmax0.2', 'lr 1e-3, EMA warm-up, r_max 0.2', ['--lr', '1e-3', '--ema-warmup', '--r-max', '0.2']),
    ('ew-rmax0.5', 'lr 1e-3, EMA warm-up, r_max 0.5', ['--lr', '1e-3', '--ema-warmup', '--r-max', '0.5']),
    ('ew-rmax1', 'lr 1e-3, EMA warm-up, r_max 1 (r uniform on [0, t])', ['--lr', '1e-3', '--ema-warmup', '--r-max', '1']),
    ('ew-w2-0.5', 'lr 1e-3, EMA warm-up, w2 = 0.5', ['--lr', '1e-3', '--ema-warmup', '--w2', '0.5']),
    ('ew-lam0.5', 'lr 1e-3, EMA warm-up, lambda = 0.5 (gamma = 1)', ['--lr', '1e-3', '--ema-warmup', '--lam', '0.5']),
    ('ew-freq1', 'lr 1e-3, EMA warm-up, N2N every iteration', ['--lr', '1e-3', '--ema-warmup', '--freq', '1']),
    ('ew-rmax0.2-lam0.5', 'lr 1e-3, EMA warm-up, r_max 0.2, lambda = 0.5 (gamma = 1)',
     ['--lr', '1e-3', '--ema-warmup', '--r-max', '0.2', '--lam', '0.5']),
    ('ew-rmax0.2-ema0.999', 'lr 1e-3, r_max 0.2, EMA warm-up to 0.999 (min(0.999, (1 + k) / (10 + k)): the same as '
     'ew-rmax0.2 up to k = 1790, then an average over about the last 1/9 of the run)',
     ['--lr', '1e-3', '--ema-warmup', '--r-max', '0.2', '--ema', '0.999']),
    ('ew-rmax0.2-logitnorm', 'lr 1e-3, EMA warm-up, r_max 0.2, logit-normal t schedule (Table 3 (l))',
     ['--lr', '1e-3', '--ema-warmup', '--r-max', '0.2', '--schedule', 'logit-normal']),
    ('ew-rmax0.2-logitnorm-lr3e-4', 'the pipeline\'s DE-CM run (EMA warm-up, r_max 0.2, logit-normal t) at lr 3e-4',
     ['--lr', '3e-4', '--ema-warmup', '--r-max', '0.2', '--schedule', 'logit-normal']),
    ('ew-rmax0.2-b128', 'lr 1e-3, EMA warm-up, r_max 0.2, batch 128 (study part H ran it from a copy of the '
     'ew-rmax0.2-ema0.999 runs at 2,400 iterations)', ['--lr', '1e-3', '--ema-warmup', '--r-max', '0.2', '--batch', '128']),
    ('b256-lr2e-3', 'batch 256, lr 2e-3', ['--batch', '256', '--lr', '2e-3']),
    ('b256-lr1e-3-ema0.999', 'batch 256, lr 1e-3, EMA 0.999', ['--batch', '256', '--lr', '1e-3', '--ema', '0.999']),
]
FLAGS = {n: f for n, _, f in STUDY}
DESC = {n: d for n, d, _ in STUDY}


def study_one(a, name, seed, teacher_ckpt, dev):
    """One (configuration, seed): train in chunks up to each evaluation step, evaluate the EMA weights."""
    out = os.path.join(a.runs, f'{name}-s{seed}')
    evals_path = os.path.join(out, 'evals.json')
    evals = load_json(evals_path)
    real = common.real_pixels(a.n, a.data, seed=100 + seed)[0]
    for step in a.eval_at:
        if str(step) in evals:
            continue
        if a.stop_at and time.time() > a.stop_at:
            break
        a2 = copy.copy(a)
        a2.extra = list(a.extra) + FLAGS[name]
        argv = common.decm_argv(a2, teacher_ckpt, out, seed, step)
        if not common.check_run(out, argv, step):
            common.run_train(argv)
        last = train.latest_checkpoint(out)
        if last is None or train.load_student_checkpoint(last)['step'] < step:   # stopped early (SIGTERM)
            break
        model, stats, _ = sample.load_model(out, dev)
        fd = lambda m, smp, nfe, args=None: float(fd_of(m, stats, smp, nfe, real, a.n, args, seed, dev)[0])
        e = {f'{smp}{nfe}': fd(model, smp, nfe) for smp, nfe in (('cm', 1), ('cm', 2), ('mix', 4))}
        for t in a.mix_ts:                                     # the Mix switch at other times (key mix4_t<t>)
            e[f'mix4_t{t:g}'] = fd(model, 'mix', 4, common.mix_args(t))
        e['cm1_raw'] = fd(sample.load_model(out, dev, use='model')[0], 'cm', 1)   # the weights without the EMA
        evals[str(step)] = e
        os.makedirs(out, exist_ok=True)
        write_atomic(evals_path, json.dumps(evals, indent=1))


def config_names(a):
    names = list(FLAGS) if a.configs == ['all'] else a.configs
    unknown = [n for n in names if n not in FLAGS]
    if unknown:
        raise ValueError(f'--configs: unknown {unknown} (choose from {list(FLAGS)} or all)')
    return names


def study(a):
    """Every configuration of --configs x every seed, evaluated at each of --eval-at; study.md + .png."""
    common.at_least(a, ('n', 'jobs', 'teacher_steps', 'batch', 'decm_batch'))
    common.set_threads(a.threads)
    names = config_names(a)
    if a.report:
        return study_report(a, names)
    dev = common.resolve_device(a.device)
    os.makedirs(a.runs, exist_ok=True)
    teacher_dir, teacher_ckpt = common.train_teacher(a)
    if a.one:                                                  # one job of the pool below
        name, seed = a.one.rsplit(':', 1)
        if name == 'teacher':
            out = os.path.join(a.runs, 'teacher_fd.json')
            common.teacher_fds(a, teacher_dir, a.seeds, dev, load_json(out), out)
        else:
            study_one(a, name, int(seed), teacher_ckpt, dev)
            out = os.path.join(a.runs, f'{name}-s{seed}', 'evals.json')
        print(f'study: wrote {out}')
        return
    job = [os.path.abspath(__file__), '--runs', a.runs, '--skip-teacher'] + (['--data', a.data] if a.data else []) + [
        '--n', str(a.n), '--device', a.device, '--amp', a.amp, '--eval-at', *map(str, a.eval_at),
        '--seeds', *map(str, a.seeds), '--decm-batch', str(a.decm_batch), '--decm-lr', str(a.decm_lr),
        '--w-cfg', str(a.w_cfg), '--eta', str(a.eta), '--cfg-sweep', *map(str, a.cfg_sweep),
        '--mix-ts', *map(str, a.mix_ts)]
    if a.stop_after:
        job += ['--stop-at', str(time.time() + a.stop_after)]
    jobs = [job + ['--one', 'teacher:0']]
    jobs += [job + ['--one', f'{n}:{s}'] for s in a.seeds for n in names]   # seeds in turn: a stopped
    # study has every configuration at the same seeds
    failed = common.run_parallel(jobs, a.jobs, os.path.join(a.runs, 'logs', 'study'),
                                 deadline=time.time() + a.stop_after + 30 if a.stop_after else None)
    study_report(a, names, failed)


def study_report(a, names, failed=()):
    tfd = load_json(os.path.join(a.runs, 'teacher_fd.json'))
    ref = {s: tfd.get(f'{common.APG_KEY}|50|{s}|{a.n}') for s in a.seeds}
    cfg = {w: [tfd.get(f'teacher, plain CFG w = {w:g}|50|{s}|{a.n}') for s in a.seeds] for w in a.cfg_sweep}
    teachers = [(f'APG w = {a.w_cfg:g}', list(ref.values()))] + [(f'plain CFG w = {w:g}', v) for w, v in cfg.items()]
    teachers = [t for t in teachers if None not in t[1]]       # (none yet: no step is reported either)
    best_name, best = min(teachers, key=lambda t: mean_sd(t[1])[0]) if teachers else ('-', [None] * len(a.seeds))
    best = dict(zip(a.seeds, best))                            # the teacher's best setting, per seed
    lines = ['# What closes the gap: the study', '',
             f'Each configuration is the pipeline\'s DE-CM run (batch {a.decm_batch}, lr {a.decm_lr:g}, w_cfg '
             f'{a.w_cfg:g}, eta {a.eta:g}, the pipeline\'s teacher) plus its flags, trained with seeds {a.seeds}; '
             f'the EMA weights are evaluated at {a.eval_at} iterations with {a.n} samples per FD (sampling seed = '
             f'training seed, real subset = seed). Ratio = DE-CM FD / the FD of the teacher at 50 steps on the '
             f'distilled velocity (APG) with the same seed: {pm(list(ref.values()))}.',
             'Plain CFG teacher at 50 steps: ' + '; '.join(f'w = {w:g}: {pm(v)}' for w, v in cfg.items()) + '.', '',
             '## Summary (mean +- sd over seeds of the ratio, at the last step every seed reached)', '',
             f'Last three columns: the ratio to the teacher\'s best setting at 50 steps, {best_name}.', '',
             '| configuration | flags | step | CM 1 NFE | CM 2 NFE | Mix 4 NFE | CM 1 / best | CM 2 / best | Mix 4 / best |',
             '|---|---|---|---|---|---|---|---|---|']
    curves = {k: {} for k in ('cm1', 'cm2', 'mix4')}
    every = ['', '## Every run', '', '| configuration | seed | step | FD CM 1 | FD CM 2 | FD Mix 4 | ratio CM 1 | '
             'ratio CM 2 | ratio Mix 4 | FD CM 1 without the EMA |', '|---|---|---|---|---|---|---|---|---|---|']
    summary = []
    for n in names:
        ev = {s: load_json(os.path.join(a.runs, f'{n}-s{s}', 'evals.json')) for s in a.seeds}
        steps = [st for st in a.eval_at if all(str(st) in ev[s] for s in a.seeds) and all(ref[s] for s in a.seeds)]
        for s in a.seeds:
            for st in a.eval_at:
                e = ev[s].get(str(st))
                if e and ref[s]:
                    raw = f'{e["cm1_raw"]:.2f}' if 'cm1_raw' in e else '-'
                    every.append(f'| {n} | {s} | {st} | {e["cm1"]:.2f} | {e["cm2"]:.2f} | {e["mix4"]:.2f} | '
                                 f'{e["cm1"] / ref[s]:.3f} | {e["cm2"] / ref[s]:.3f} | {e["mix4"] / ref[s]:.3f} | {raw} |')
        for k in curves:
            curves[k][n] = (steps, [mean_sd([ev[s][str(st)][k] / ref[s] for s in a.seeds])[0] for st in steps])
        flags = " ".join(FLAGS[n]) or "-"
        if steps:
            st = steps[-1]
            r = {k: [ev[s][str(st)][k] / ref[s] for s in a.seeds] for k in curves}
            rb = [pm([ev[s][str(st)][k] / best[s] for s in a.seeds], 3) for k in curves]
            summary.append((mean_sd(r['cm1'])[0], f'| {n} | {flags} | {st} | {pm(r["cm1"], 3)} | '
                            f'{pm(r["cm2"], 3)} | {pm(r["mix4"], 3)} | ' + ' | '.join(rb) + ' |'))
        else:
            summary.append((float('inf'), f'| {n} | {flags} | not reached | | | | | | |'))
    lines += [row for _, row in sorted(summary, key=lambda r: r[0])]
    lines += ['', 'Configurations: ' + '; '.join(f'**{n}**: {DESC[n]}' for n in names) + '.']
    if failed:
        lines += ['', f'{len(failed)} job(s) failed or were stopped (see {os.path.join(a.runs, "logs", "study")}).']
    shown = lines + ['', f'Command: {a.command}']             # printed: all but the table of every run
    lines += every + ['', f'Command: {a.command}']
    outs = [os.path.join(a.results, f) for f in ('study.md', 'study.png')]
    os.makedirs(a.results, exist_ok=True)
    write_atomic(outs[0], '\n'.join(lines) + '\n')
    common.plot(outs[1],
               [(f'DE-CM {lab} / teacher 50 steps (APG), mean over seeds', curves[k])
                for k, lab in (('cm1', 'CM 1 NFE'), ('cm2', 'CM 2 NFE'), ('mix4', 'Mix 4 NFE'))],
               xlabel='training iterations', ylabel='FD ratio')
    print('\n'.join(shown))
    print(f'study: wrote {", ".join(outs)} (every run in study.md); runs in {a.runs}/')


def build_parser():
    p = common.parser(__doc__)
    common.add_run_flags(p, 'runs/study')
    p.add_argument('--configs', nargs='+', default=['all'], help='names from STUDY (experiments/study.py), or all')
    p.add_argument('--eval-at', type=int, nargs='+', default=[250, 500, 1000, 2000, 4000],
                   help='iterations at which the EMA weights are evaluated (the run stops at the last)')
    p.add_argument('--stop-after', type=float, default=0, help='seconds: stop starting chunks after this, '
                   'stop the runs 30 s later and report what was reached (0: no limit)')
    p.add_argument('--stop-at', type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument('--one', default=None, help=argparse.SUPPRESS)
    p.add_argument('--report', action='store_true', help='only rewrite study.md/.png from the runs')
    p.add_argument('--mix-ts', type=common.bounded(float, 0, 1, lo_open=True, hi_open=True), nargs='*',
                   default=[0.0625, 0.125], help='more Mix switch times evaluated at 4 NFE besides t = 0.25 '
                   '(evals.json keys mix4_t<t>)')
    p.set_defaults(extra=[])
    return p


def main(argv=None):
    return common.run_main(build_parser(), study, argv, 'study.py')


if __name__ == '__main__':
    main()
