"""The miniature pipeline of the paper (built-in digits, or --data), over seeds, against the teacher's best.

    python experiments/pipeline.py [--data data/uci_digits --n 850] [--decm-steps 800] [--seeds 0 1 2] [--jobs 3]

Builds the data, trains a flow-matching teacher (train.py --losses fm --teacher none), sweeps its guidance at
50 Euler steps (APG, the rule train.py distils, at each --apg-sweep weight; plain CFG at each --cfg-sweep
weight), distils DE-CM with each seed from the APG weight one grid step weaker than the best (w 1 below the
weakest; or --w-cfg), then scores DE-CM's samplers (CM at 1, 2, 4 NFE; Mix at 2 and 4) by pixel FD against the
teacher's best setting of all swept. Writes RUNS/pipeline.md (FD table, mean +- sd over seeds, ratios and the
paired noise test), RUNS/pipeline.json and RUNS/pipeline.png (sample grids of the first seed); --publish
copies them into --results (experiments/results). Seed s trains DE-CM with seed s and samples every row with
noise seed s against real subset s. --jobs J trains J runs and samples J cells of the sweep at a time, one
process and one thread each. Runs resume (--resume auto), the FD cells are cached in RUNS/fd.json.
"""
import argparse
import glob
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core, by name
import common  # noqa: E402
import sample  # noqa: E402
import torch  # noqa: E402
import train  # noqa: E402
from common import fd_of, mean_sd, pm, write_atomic  # noqa: E402
from fid import pixel_fd  # noqa: E402
from tqdm import tqdm  # noqa: E402


def pipeline(a):
    common.at_least(a, ('n', 'jobs', 'teacher_steps', 'batch', 'decm_batch', 'decm_steps'))
    common.set_threads(a.threads)
    t0 = time.time()
    dev = common.resolve_device(a.device)
    n_real = len(train.LatentFolder(a.data, flag='--data')) if a.data else 2 * a.n      # built-in: 20,000
    if 2 * a.n > n_real:
        raise ValueError(f'--n {a.n}: the floor (two sets of real data) needs 2 x {a.n} images, --data has '
                         f'{n_real}: give --n {n_real // 2} or less')
    os.makedirs(a.runs, exist_ok=True)
    teacher_dir, teacher_ckpt = common.train_teacher(a)
    t1 = time.time()

    # The teacher at 50 steps on every guidance setting swept: APG (the rule train.py distils) and plain CFG.
    # With --jobs J, J processes (this script with --sweep-part K/J) share the cells; their caches are merged.
    cache_path = os.path.join(a.runs, 'fd.json')
    cache = common.load_json(cache_path)
    merge = lambda: [cache.update(common.load_json(p)) for p in glob.glob(os.path.join(a.runs, 'fd_part*.json'))]
    merge()                                                    # also the cells of an interrupted sweep
    sweep = [(f'teacher, APG w = {w:g} (eta {a.eta:g})', 'apg', w, 50) for w in a.apg_sweep] + \
        [(f'teacher, plain CFG w = {w:g}', 'cfg', w, 50) for w in a.cfg_sweep]
    cells = [(s, row) for s in a.seeds for row in sweep if f'{row[0]}|50|{s}|{a.n}' not in cache]
    if a.sweep_part:                                           # one process of the parallel sweep
        k, j = map(int, a.sweep_part.split('/'))
        for s, row in cells[k::j]:
            common.teacher_fds(a, teacher_dir, [s], dev, cache, os.path.join(a.runs, f'fd_part{k}.json'), rows=[row])
        return
    if a.jobs > 1 and cells:                                   # the part's flags first: train.py's come after --
        parallel = [[__file__, '--skip-teacher', '--sweep-part', f'{k}/{a.jobs}'] + a.argv for k in range(a.jobs)]
        if common.run_parallel(parallel, a.jobs, os.path.join(a.runs, 'logs', 'sweep')):
            raise ValueError(f'the guidance sweep failed: see {os.path.join(a.runs, "logs", "sweep")}')
    merge()
    fds = {}                                                   # (row, nfe) -> [fd per seed]
    for (name, steps, _), v in common.teacher_fds(a, teacher_dir, a.seeds, dev, cache, cache_path,
                                                  rows=sweep).items():
        fds.setdefault((name, steps), []).append(v)
    apg_rows = [(w, fds[name, 50]) for name, g, w, _ in sweep if g == 'apg']
    best_apg_w = min(apg_rows, key=lambda r: mean_sd(r[1])[0])[0]
    distil_w = weaker_weight(a.apg_sweep, best_apg_w)
    if a.sweep_only:
        return sweep_report(a, sweep, fds, best_apg_w, distil_w, time.time() - t1)
    given, w_cfg = a.w_cfg, distil_w if a.w_cfg is None else a.w_cfg
    a.w_cfg = w_cfg                                            # the DE-CM runs distil this velocity
    if cache.get('w_cfg', w_cfg) != w_cfg:                     # the distilled rows of another w are stale
        cache = {k: v for k, v in cache.items() if not k.startswith(common.APG_KEY)}
    cache['w_cfg'] = w_cfg
    for s in a.seeds:                                          # the 50-step row is a swept one if w is
        same = f'teacher, APG w = {w_cfg:g} (eta {a.eta:g})|50|{s}|{a.n}'
        if same in cache and s != a.seeds[0]:
            cache.setdefault(f'{common.APG_KEY}|50|{s}|{a.n}', cache[same])
    distilled = [(common.APG_KEY, 'apg', w_cfg, 1), (common.APG_KEY, 'apg', w_cfg, 50)]
    panels = []
    for (name, steps, _), v in common.teacher_fds(a, teacher_dir, a.seeds, dev, cache, cache_path, panels,
                                                  rows=distilled).items():
        fds.setdefault((name, steps), []).append(v)
    t2 = time.time()

    decm_dirs = {s: os.path.join(a.runs, f'decm-s{s}') for s in a.seeds}
    jobs = [common.decm_argv(a, teacher_ckpt, decm_dirs[s], s, a.decm_steps) for s in a.seeds]
    jobs = [argv for argv in jobs if not common.check_run(argv[argv.index('--out') + 1], argv, a.decm_steps)]
    common.train_all(jobs, a.jobs, os.path.join(a.runs, 'logs', 'pipeline'), 'DE-CM run')
    t3 = time.time()

    decm_rows = [('DE-CM, CM sampler', 'cm', 1), ('DE-CM, CM sampler', 'cm', 2), ('DE-CM, CM sampler', 'cm', 4),
                 ('DE-CM, Mix sampler', 'mix', 2), ('DE-CM, Mix sampler', 'mix', 4)]
    for seed in tqdm(a.seeds, desc='pipeline: DE-CM samplers', dynamic_ncols=True):
        real2, real_y = common.real_pixels(2 * a.n, a.data, seed=100 + seed)
        real = real2[:a.n]
        fds.setdefault(('two sets of real data', '-'), []).append(
            common.fd_cached(cache, f'real|{seed}|{a.n}', lambda: pixel_fd(real2[a.n:].numpy(), real.numpy())))
        decm, stats_d, _ = sample.load_model(decm_dirs[seed], dev)
        for name, smp, nfe in decm_rows:
            key = f'{decm_dirs[seed]}|{smp}|{nfe}|{seed}|{a.n}' + (f'|t{a.mix_t:g}' if smp == 'mix' else '')
            grid = seed == a.seeds[0] and (smp, nfe) in [('cm', 1), ('cm', 2), ('mix', 4)]
            if key not in cache or grid:
                fd, x, y = fd_of(decm, stats_d, smp, nfe, real, a.n, common.mix_args(a.mix_t), seed, dev)
                cache[key] = float(fd)
                if grid:
                    panels.append(common.panel(f'DE-CM {smp} {nfe} NFE', x, y))
                write_atomic(cache_path, json.dumps(cache, indent=1))
            fds.setdefault((name, nfe), []).append(cache[key])
        if seed == a.seeds[0]:
            panels.insert(0, common.panel('real data', real, real_y[:a.n]))
    t4 = time.time()

    apg50 = fds[common.APG_KEY, 50]
    strongest_name, strongest = min([(name, fds[name, 50]) for name, *_ in sweep], key=lambda b: mean_sd(b[1])[0])
    one_seed = len(a.seeds) < 2
    lines = [f'# The miniature pipeline: {len(a.seeds)} seed(s) {a.seeds}, {a.n} samples per FD, data '
             f'{a.data or "built-in digits"}', '',
             '| model / sampler | NFE | pixel FD (mean +- sd over seeds) | per seed |', '|---|---|---|---|']
    for (name, nfe), vals in fds.items():
        label = name.replace('(APG)', f'(APG w = {w_cfg:g}, eta {a.eta:g})')
        lines.append(f'| {label} | {nfe} | {pm(vals)} | {", ".join(f"{v:.2f}" for v in vals)} |')
    lines += ['', f'The teacher\'s best setting at 50 steps of all swept (APG w {a.apg_sweep} at eta {a.eta:g}; plain '
              f'CFG w {a.cfg_sweep}; lowest mean FD): {strongest_name}, {pm(strongest)}. DE-CM distils APG w = '
              f'{w_cfg:g}' + (f' (the rule: one grid step weaker than the best APG setting swept, w = {best_apg_w:g}; w 1 '
                                 'when none is weaker).'
                              if given is None else ' (--w-cfg).'), '',
              'Ratios of DE-CM to the teacher (mean of the per-seed ratios +- sd):', '',
              '| DE-CM sampler | NFE | / distilled-velocity teacher, 50 steps | / the teacher\'s best setting, 50 steps '
              '| differs from the teacher\'s best beyond noise? |', '|---|---|---|---|---|']
    ratios = {}
    for name, smp, nfe in decm_rows:
        vals = fds[name, nfe]
        ratios[smp, nfe] = [v / b for v, b in zip(vals, strongest)]
        verdict = common.ordering(vals, strongest)
        lines.append(f'| {name} | {nfe} | {pm([v / b for v, b in zip(vals, apg50)], 3)} | {pm(ratios[smp, nfe], 3)} | '
                     + ('n/a (one seed: no test)' if one_seed else 'no' if verdict == 'within noise' else
                        'yes: ' + verdict) + ' |')
    r1 = mean_sd(ratios['cm', 1])[0]
    lines += ['', f'Headline: DE-CM at 1 NFE is {r1:.3f}x the FD of the teacher\'s best setting '
              f'({strongest_name}). "Beyond noise": the mean of the per-seed differences (paired by seed) is more '
              f'than twice its standard error over the {len(a.seeds)} seed(s) (one seed: no test); the floor (two '
              f'sets of real data) is {pm(fds["two sets of real data", "-"])}.',
              f'Settings: teacher {a.teacher_steps} flow-matching iterations (preset {a.preset}, batch {a.batch}, lr {a.teacher_lr:g}, '
              f'seed {a.teacher_seed}); DE-CM {a.decm_steps} iterations per seed (batch {a.decm_batch}, lr '
              f'{a.decm_lr:g}, w_cfg {w_cfg:g}, eta {a.eta:g}{", EMA warm-up" if a.ema_warmup else ""}, '
              f'r_max {a.decm_r_max:g}, t schedule {a.decm_schedule}{", " + " ".join(a.extra) if a.extra else ""}); '
              f'the Mix sampler switches at t = {a.mix_t:g} after NFE / 2 flow-map steps (1 at 2 NFE: no fresh noise); '
              f'seed s trains DE-CM with seed s and samples every row with noise seed s against real subset s.',
              f'Time: teacher {t1 - t0:.0f} s, guidance sweep {t2 - t1:.0f} s, DE-CM {t3 - t2:.0f} s ({a.jobs} at a '
              f'time), DE-CM sampling and FD {t4 - t3:.0f} s; total {t4 - t0:.0f} s on {dev} '
              f'({torch.get_num_threads()} threads).',
              f'Command: {a.command}']
    outs = [os.path.join(a.runs, f) for f in ('pipeline.md', 'pipeline.json', 'pipeline.png')]
    write_atomic(outs[0], '\n'.join(lines) + '\n')
    write_atomic(outs[1], json.dumps(
        {'fd': [{'row': n, 'nfe': k, 'fd': v} for (n, k), v in fds.items()], 'seeds': a.seeds, 'n': a.n,
         'data': a.data, 'w_cfg': w_cfg, 'eta': a.eta, 'strongest': strongest_name, 'ratio_cm1': r1,
         'ratios': {f'{s}{k}': v for (s, k), v in ratios.items()}}, indent=1) + '\n')
    common.save_grid(outs[2], panels)
    if a.publish:
        os.makedirs(a.results, exist_ok=True)
        for f in outs:
            shutil.copyfile(f, os.path.join(a.results, os.path.basename(f)))
    print('\n'.join(lines))
    print(f'pipeline: wrote {", ".join(outs)}' + (f' (copied to {a.results}/)' if a.publish else '') +
          f'; checkpoints in {teacher_dir}/ and {", ".join(decm_dirs.values())}/')


def weaker_weight(grid, best):
    """The APG weight DE-CM distils: one grid step weaker than the teacher's best (w 1, no guidance, when none
    is weaker; never stronger than the best). It beats the best itself on both datasets (experiments/README.md)."""
    weaker = [w for w in grid if w < best]
    return max(weaker) if weaker else min(1.0, best)


def sweep_report(a, sweep, fds, best_apg_w, distil_w, secs):
    """--sweep-only: RUNS/sweep.md, every setting against the best of all swept, paired by seed."""
    best = min(sweep, key=lambda r: mean_sd(fds[r[0], 50])[0])[0]
    lines = [f'# The teacher\'s guidance at 50 Euler steps: {len(a.seeds)} seed(s) {a.seeds}, {a.n} samples per FD, '
             f'data {a.data or "built-in digits"}', '', '| setting | pixel FD (mean +- sd) | per seed | against the '
             'best, paired by seed |', '|---|---|---|---|']
    lines += [f'| {name} | {pm(fds[name, 50])} | {", ".join(f"{v:.3f}" for v in fds[name, 50])} | '
              f'{"the best" if name == best else common.ordering(fds[name, 50], fds[best, 50])} |' for name, *_ in sweep]
    lines += ['', f'The best APG weight: {best_apg_w:g}; DE-CM would distil one grid step weaker: {distil_w:g}. '
              f'{len(sweep) * len(a.seeds)} cells '
              f'({secs:.0f} s in this command, {a.jobs} at a time; cells cached before it cost nothing).', f'Command: {a.command}']
    out = os.path.join(a.runs, 'sweep.md')
    write_atomic(out, '\n'.join(lines) + '\n')
    print('\n'.join(lines) + f'\npipeline: wrote {out}')


def build_parser():
    p = common.parser(__doc__)
    common.add_run_flags(p, 'runs/pipe', w_cfg=None)
    p.add_argument('--apg-sweep', type=float, nargs='+', default=[1.25, 1.5, 2.0, 3.0], help='APG weights (at --eta) of '
                   'the teacher swept at 50 steps; DE-CM distils the one a grid step weaker than the best (w 1, no guidance, '
                   'below the weakest) unless --w-cfg is given: better than the best itself at every sampler beyond '
                   'noise on both datasets (experiments/README.md)')
    p.add_argument('--decm-steps', type=int, default=400, help='DE-CM iterations (400: an estimated 9 minutes of '
                   'DE-CM on 2 CPU cores; 800 meets the three targets on the built-in digits, study part I, not on the UCI digits)')
    p.add_argument('--no-ema-warmup', dest='ema_warmup', action='store_false', help='constant EMA decay for the '
                   'DE-CM runs (default: the EMA warm-up, which the study found better at 1 and 2 NFE)')
    p.add_argument('--decm-r-max', type=common.bounded(float, 0, 1), default=0.2, help='train.py --r-max of the '
                   'DE-CM runs: N2N starts from r ~ U(0, r_max) (the study: 0.2 beats 0.05 at 1 and 2 NFE over 3 '
                   'seeds from 200 to 2,000 iterations; 0.5 and 1 are no better)')
    p.add_argument('--decm-schedule', default='logit-normal', choices=['uniform-seg', 'logit-normal', 'arctan'],
                   help='train.py --schedule of the DE-CM runs (study part H: logit-normal beats the paper\'s '
                   'uniform-with-N-seg, train.py\'s default, beyond noise at 1 NFE, 2 NFE and Mix 4 over 3 seeds at '
                   '200, 400 and 800 iterations; the runs of parts F-H to 3,200 iterations used uniform-seg)')
    p.add_argument('--mix-t', type=common.bounded(float, 0, 1, lo_open=True, hi_open=True), default=0.0625,
                   help='sample.py --mix-t of the Mix rows: the switch from flow-map steps to CM steps (study part I: '
                   'on the logit-normal runs 0.0625 beats 0.25, tuned on uniform-seg runs)')
    p.add_argument('--publish', action='store_true', help='also copy pipeline.md/.json/.png into --results '
                   '(by default they stay in --runs)')
    p.add_argument('--sweep-only', action='store_true', help='stop after the guidance sweep: RUNS/sweep.md (every '
                   'setting against the best, paired by seed); no DE-CM run')
    p.add_argument('--sweep-part', default=None, help=argparse.SUPPRESS)      # K/J: one process of the sweep
    p.add_argument('extra', nargs='*', help='more train.py flags for the DE-CM runs (after --)')
    return p


def main(argv=None):
    return common.run_main(build_parser(), pipeline, argv, 'pipeline.py')


if __name__ == '__main__':
    main()
