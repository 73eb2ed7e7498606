"""The paper's Table 3 (ablations (a)-(o)) and Table 4 (samplers) in miniature, over seeds.

    python experiments/tables.py [--quick] [--rows c d e f g i k l m o p q r] [--seeds 0 1 2] [--jobs 2]

One teacher, then every Table 3 variant of --rows distilled from it with the same budget, for each of --seeds
(seed s trains every variant and samples every cell with noise seed s against real subset s). Columns STEP=1,
2, 4 use the CM sampler; STEP=50 the Euler ODE sampler (F(x, t, t)); the teacher rows (a) (no CFG), (b) (CFG,
--w-cfg) and (b*) (the velocity the variants distil, APG) use the teacher's Euler sampler. Rows (h), (j), (n)
are the full model (g) under another name and reuse its run. Writes --results/tables.md (mean +- sd beside the
paper's FID, the orderings tested against the seed noise), tables.json, tables.png (FD against NFE) and
tables_samples/<row>.png (sample grids of the first seed); --quick writes tables_quick.* instead.

Budget: the default (teacher 1500 iterations, 200 DE-CM iterations per variant at batch 64, 1000 samples per
FD) is about 45 minutes per seed on 2 CPU cores; --quick (200 / 8 / 200, one seed) about 5 minutes. Runs
resume and are checked against the flags they were made with; cells are cached in RUNS/fd.json. On a
2-core machine that another job keeps busy, --threads 1 avoids OpenMP's spin-waiting.
"""
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core, by name
import common  # noqa: E402
import sample  # noqa: E402
import torch  # noqa: E402
import train  # noqa: E402
from common import fd_of, mean_sd, pm, write_atomic  # noqa: E402
from fid import pixel_fd  # noqa: E402
from teacher import resolve_checkpoint  # noqa: E402
from tqdm import tqdm  # noqa: E402

# Table 3 of the paper: (key, section, method, train.py flags of the variant or the key of the run it is).
TABLE3 = [
    ('a', 'Training Objectives', 'Baseline Teacher', None),
    ('b', 'Training Objectives', 'Baseline Teacher (w = 1.75)', None),
    ('c', 'Training Objectives', 'Flow Matching (FM)', ['--losses', 'fm']),
    ('d', 'Training Objectives', 'CMs Distillation (CD)', ['--losses', 'cm']),
    ('e', 'Training Objectives', 'FM + CD', ['--losses', 'fm,cm']),
    ('f', 'Training Objectives', 'FM + Noise-to-Noisy (N2N) Transmission', ['--losses', 'fm,n2n']),
    ('g', 'Training Objectives', 'FM + CD + N2N', ['--losses', 'fm,cm,n2n']),
    ('h', 'Velocity Normalization', 'W/ Velocity Normalization (Ours)', 'g'),
    ('i', 'Velocity Normalization', 'W/O Velocity Normalization', ['--losses', 'fm,cm,n2n', '--no-vnorm']),
    ('j', 'Timestep Scheduling', 'uniform-with-N-seg (Ours)', 'g'),
    ('k', 'Timestep Scheduling', 'arctan-norm', ['--losses', 'fm,cm,n2n', '--schedule', 'arctan']),
    ('l', 'Timestep Scheduling', 'log-norm', ['--losses', 'fm,cm,n2n', '--schedule', 'logit-normal']),
    ('m', 'Frequency Hyperparameter', 'freq = 1', ['--losses', 'fm,cm,n2n', '--freq', '1']),
    ('n', 'Frequency Hyperparameter', 'freq = 3 (Ours)', 'g'),
    ('o', 'Frequency Hyperparameter', 'freq = 5', ['--losses', 'fm,cm,n2n', '--freq', '5']),
    ('p', 'N2N ablations (not in the paper)', 'v_psi at the interpolated x_t (Alg. 1 l.23)',
     ['--losses', 'fm,cm,n2n', '--vpsi', 'interp']),
    ('q', 'N2N ablations (not in the paper)', 'lambda = 0.5 (gamma = 1)', ['--losses', 'fm,cm,n2n', '--lam', '0.5']),
    ('r', 'N2N ablations (not in the paper)', 'r_max = 1 (r uniform on [0, t])', ['--losses', 'fm,cm,n2n', '--r-max', '1']),
]
# The paper's FID on ImageNet-256 (Table 3: STEP = 1, 2, 4, 50; Table 4: NFE = 4, 8, 12, 16).
PAPER_T3 = {
    'a': (309.51, 230.79, 111.59, 2.77), 'b': (262.60, 221.03, 87.56, 1.59), 'c': (263.86, 220.55, 87.93, 1.45),
    'd': (3.08, 2.50, 2.54, 6.52), 'e': (1.78, 1.41, 1.62, 1.78), 'f': (441.66, 297.28, 132.60, 1.41),
    'g': (1.70, 1.33, 1.41, 1.26), 'h': (1.70, 1.33, 1.41, 1.26), 'i': (1.75, 1.30, 1.43, 1.35),
    'j': (1.70, 1.33, 1.41, 1.26), 'k': (1.74, 1.36, 1.62, 1.45), 'l': (1.83, 1.45, 1.67, 1.41),
    'm': (1.72, 1.48, 1.77, 1.45), 'n': (1.70, 1.33, 1.41, 1.26), 'o': (1.74, 1.34, 1.52, 1.37)}
T3_STEPS = (1, 2, 4, 50)
T4_NFE = (4, 8, 12, 16)
PAPER_T4 = [('euler', 'Euler ODE Sampler', (76.15, 8.26, 3.61, 2.38)),
            ('cm', 'Consistency Model Sampler', (1.56, 2.37, 3.00, 3.72)),
            ('mix', 'Mix Sampler', (1.41, 1.51, 1.53, 1.42))]
SHORT = {'a': 'teacher', 'b': 'teacher + CFG', 'c': 'FM', 'd': 'CD', 'e': 'FM+CD', 'f': 'FM+N2N',
         'g': 'FM+CD+N2N (=h,j,n)', 'i': 'no vnorm', 'k': 'arctan', 'l': 'logit-normal', 'm': 'freq 1',
         'o': 'freq 5', 'p': 'v_psi interp', 'q': 'lambda 0.5', 'r': 'r_max 1'}
# The orderings the tables are read for: (first, second, what the comparison is about).
T3_PAIRS = [('g', 'e', 'N2N added to FM + CD'), ('e', 'd', 'FM added to CD'), ('e', 'c', 'CD added to FM'),
            ('f', 'g', 'FM + N2N against the full model'), ('h', 'i', 'velocity normalisation on / off'),
            ('j', 'k', 'uniform-with-N-seg against arctan'), ('j', 'l', 'uniform-with-N-seg against logit-normal'),
            ('n', 'm', 'freq 3 against freq 1'), ('n', 'o', 'freq 3 against freq 5'),
            ('g', 'p', 'v_psi pred against interp'), ('g', 'q', 'lambda 1 against 0.5'), ('g', 'r', 'r_max against 1')]
T4_PAIRS = [('mix', 'cm', 'Mix against CM'), ('mix', 'euler', 'Mix against Euler ODE')]
TEACHER_ROWS = {'a': ('cfg', 1.0), 'b': ('cfg', None), 'b*': ('apg', None)}   # None: --w-cfg


def table3_sampler(key, step):
    """The sampler of one Table 3 cell: teachers use their Euler sampler, students the CM sampler at
    1/2/4 NFE and the Euler ODE sampler at 50 (the paper's STEP=50 column)."""
    if key in ('a', 'b', 'b*'):
        return 'teacher'
    return 'euler' if step == 50 else 'cm'


def tables(a):
    quick = a.quick
    common.set_threads(a.threads)
    a.teacher_steps = a.teacher_steps or (200 if quick else 1500)
    a.decm_steps = a.decm_steps or (8 if quick else 200)
    a.n = a.n or (200 if quick else 1000)
    a.seeds = a.seeds or ([0] if quick else [0, 1, 2])
    a.runs = a.runs or ('runs/tables-quick' if quick else 'runs/tables')
    name = 'tables_quick' if quick else 'tables'
    if a.n < 2:
        raise ValueError(f'--n {a.n}: need at least 2 samples per FD')
    all_runs = {k: flags for k, _, _, flags in TABLE3 if isinstance(flags, list)}
    keys = a.rows or [k for k in all_runs if k in PAPER_T3]     # default: the paper's rows
    bad = [k for k in keys if k not in all_runs]
    if bad or 'g' not in keys:
        raise ValueError(f'--rows {" ".join(keys)}: give rows from {" ".join(all_runs)}, with g (the full model: '
                         'Table 4 and rows h, j, n)' + (f'; unknown: {" ".join(bad)}' if bad else ''))
    os.makedirs(a.results, exist_ok=True)
    runs = {k: all_runs[k] for k in all_runs if k in keys}
    table3 = TABLE3[:2] + [('b*', 'Training Objectives', 'Baseline Teacher, distilled velocity', None)] + TABLE3[2:]
    shown = [k for k, _, _, flags in table3 if k in TEACHER_ROWS or k in runs or (isinstance(flags, str) and flags in runs)]
    data = ['--data', a.data] if a.data else []
    threads = ['--threads', str(a.threads)] if a.threads else []
    t0 = time.time()

    # 1. the teacher, then every variant from it, for every seed (same budget; seed s for run and sampling)
    if a.teacher:
        teacher_ckpt = resolve_checkpoint(a.teacher)
    else:
        teacher_dir = os.path.join(a.runs, 'teacher')
        argv = ['--seed', str(a.seeds[0]), '--batch', str(a.batch)] + data + [
            '--losses', 'fm', '--teacher', 'none', '--out', teacher_dir, '--steps', str(a.teacher_steps),
            '--lr', str(a.teacher_lr), '--resume', 'auto', '--no-ema-warmup']      # the recorded teachers' EMA
        if not common.check_run(teacher_dir, argv, a.teacher_steps):
            print(f'tables: training the teacher ({a.teacher_steps} iterations)', flush=True)
            common.run_train(argv + threads)
        teacher_ckpt = train.latest_checkpoint(teacher_dir)
    t1 = time.time()
    run_dir = lambda k, s: os.path.join(a.runs, f'{k}-s{s}')
    jobs, n_runs = [], 0
    for s in a.seeds:
        for key, flags in runs.items():
            argv = ['--seed', str(s), '--batch', str(a.batch)] + data + [
                '--teacher', teacher_ckpt, '--out', run_dir(key, s), '--steps', str(a.decm_steps), '--lr',
                str(a.decm_lr), '--w-cfg', str(a.w_cfg), '--eta', str(a.eta), '--resume', 'auto', '--keep', '1',
                '--r-max', str(a.r_max), '--ema-warmup' if a.ema_warmup else '--no-ema-warmup'] + \
                (['--schedule', a.schedule] if a.schedule else []) + flags     # a variant's own --schedule wins
            n_runs += 1
            if not common.check_run(run_dir(key, s), argv, a.decm_steps):
                jobs.append(argv + threads)
    common.train_all(jobs, a.jobs, os.path.join(a.runs, 'logs'), 'variant run')
    t2 = time.time()

    # 2. pixel FD of every cell and seed (cached in RUNS/fd.json: the command resumes); grids of seed 0
    teacher, t_stats, _ = sample.load_model(teacher_ckpt)
    if t_stats is None:
        raise ValueError(f'{teacher_ckpt} has no data statistics: tables needs a teacher trained by train.py')
    cells = [(k, table3_sampler(k, s), s) for k in list(TEACHER_ROWS) + list(runs) for s in T3_STEPS]
    cells += [('g', smp, nfe) for smp, _, _ in PAPER_T4 for nfe in T4_NFE]
    cells += [('e', 'mix', nfe) for nfe in T4_NFE if 'e' in runs]   # the Mix sampler without N2N training
    cells = list(dict.fromkeys(cells))                         # (g, cm, 4) is in both tables
    cache_path = os.path.join(a.runs, 'fd.json')
    cache = common.load_json(cache_path)
    fd, floor = {}, []                                         # (row, sampler, nfe) -> [FD per seed]
    panels = {k: [] for k in list(TEACHER_ROWS) + list(runs)}
    t4_panels = {}
    bar = tqdm(total=len(cells) * len(a.seeds), desc='tables: sampling + FD', dynamic_ncols=True)
    for s in a.seeds:
        real2, real_y = common.real_pixels(2 * a.n, a.data, seed=100 + s)
        real = real2[:a.n]
        floor.append(common.fd_cached(cache, f'real|{s}|{a.n}', lambda: pixel_fd(real2[a.n:].numpy(), real.numpy())))
        grids = s == a.seeds[0]
        if grids:
            for k in panels:
                panels[k].append(common.panel('real data', real, real_y[:a.n]))
        models = {}
        for key, smp, nfe in cells:
            cache_key = f'{key}|{smp}|{nfe}|{s}|{a.n}' + (f'|t{a.mix_t:g}' if smp == 'mix' and a.mix_t != common.MIX_T else '')
            is_t3 = nfe in T3_STEPS and smp == table3_sampler(key, nfe)
            is_t4 = key == 'g' and nfe in (T4_NFE[0], T4_NFE[-1])
            want_grid = grids and (is_t3 or is_t4)
            grid_path = os.path.join(a.runs, 'grids', f'{key}-{smp}-{nfe}-{a.n}.pt')   # seed 0's panels
            x = None
            if want_grid and cache_key in cache and os.path.exists(grid_path):
                x, y = torch.load(grid_path, weights_only=True).values()
            elif cache_key not in cache or want_grid:
                if key in TEACHER_ROWS:
                    guidance, w = TEACHER_ROWS[key]
                    targs = common.teacher_args(a.w_cfg if w is None else w, guidance, a.eta)
                    value, x, y = fd_of(teacher, t_stats, 'teacher', nfe, real, a.n, targs, s)
                else:
                    if key not in models:
                        models[key] = sample.load_model(run_dir(key, s))
                    model, stats, _ = models[key]
                    value, x, y = fd_of(model, stats, smp, nfe, real, a.n, common.mix_args(a.mix_t), s)
                cache[cache_key] = float(value)
                write_atomic(cache_path, json.dumps(cache, indent=1))
                if want_grid:                                  # the panel's samples: a resumed command reuses them
                    os.makedirs(os.path.dirname(grid_path), exist_ok=True)
                    torch.save({'x': x[:500], 'y': y[:500]}, grid_path)
            if want_grid:
                if is_t3:
                    panels[key].append(common.panel(f'{smp} {nfe}', x, y))
                if is_t4:
                    t4_panels[smp, nfe] = common.panel(f'{smp} {nfe}', x, y)
            fd.setdefault((key, smp, nfe), []).append(cache[cache_key])
            bar.update(1)
    bar.close()
    t3 = time.time()

    # 3. results: markdown, plot, sample grids, raw numbers
    sample_dir = os.path.join(a.results, name + '_samples')
    os.makedirs(sample_dir, exist_ok=True)
    panels['table4'] = panels['a'][:1] + [t4_panels[k] for k in sorted(t4_panels, key=lambda k: (
        [s for s, _, _ in PAPER_T4].index(k[0]), k[1]))]
    for key, p in panels.items():
        common.save_grid(os.path.join(sample_dir, f'{key.replace("*", "_apg")}.png'), p)
    alias = {k: flags for k, _, _, flags in TABLE3 if isinstance(flags, str)}
    row3 = lambda k: [fd[alias.get(k, k), table3_sampler(k, s), s] for s in T3_STEPS]
    mean = lambda vals: mean_sd(vals)[0]
    labels = {'a': 'teacher, no CFG', 'b': f'teacher, CFG w = {a.w_cfg:g}', 'b*': 'teacher, distilled velocity'}
    plot3 = {f'({k}) {labels.get(k) or SHORT[k]}': (list(T3_STEPS), [mean(v) for v in row3(k)])
             for k in list(TEACHER_ROWS) + list(runs)}
    plot4 = {label: (list(T4_NFE), [mean(fd['g', smp, n]) for n in T4_NFE]) for smp, label, _ in PAPER_T4}
    common.plot(os.path.join(a.results, name + '.png'), [
        (f'Table 3: CM sampler at 1/2/4 NFE, Euler ODE at 50 (teachers: Euler steps; mean of {len(a.seeds)} seeds)',
         plot3), ('Table 4, full model (g): samplers', plot4)], xlabel='NFE', ylabel='pixel FD')
    cell = lambda vals: pm(vals) if math.isfinite(mean(vals)) else 'nan'
    lines = [f'# Table 3 and Table 4 in miniature{" (--quick)" if quick else ""}: pixel FD on the '
             f'{"built-in digits" if not a.data else a.data}, {len(a.seeds)} seed(s) {a.seeds}', '',
             f'Ours: pixel FD (fid.pixel_fd, {a.n} generated vs {a.n} real images, raw pixels; not FID, so '
             f'compare orderings, not values), mean +- sd over the seeds: seed s trains every variant with seed s '
             f'and samples every cell with noise seed s against real subset s. Paper: FID on ImageNet-256 (Tables '
             f'3 and 4 of the paper). Two sets of real data give a pixel FD of {cell(floor)} (the floor at this n).',
             '', f'Samplers: STEP=1, 2, 4 is the CM sampler with 1, 2, 4 NFE; STEP=50 is the Euler ODE sampler '
             f'(F(x, t, t)) with 50 steps. Rows (a), (b), (b*): the teacher\'s Euler sampler with 1, 2, 4, 50 steps, '
             f'(a) without CFG, (b) with CFG w = {a.w_cfg:g} (the paper\'s (b) uses w = 1.75; one step of (b) '
             f'is one batched cond+uncond call), (b*) on the very velocity the variants distil (APG, w = '
             f'{a.w_cfg:g}, eta = {a.eta:g}; not in the paper): the fair baseline. Rows (h), (j), (n) are the run '
             f'of (g).', '', '## Table 3', '',
             '| Method | STEP=1 | STEP=2 | STEP=4 | STEP=50 | paper 1 | paper 2 | paper 4 | paper 50 |',
             '|---|---|---|---|---|---|---|---|---|']
    section = None
    for key, sec, method, flags in table3:
        if key not in shown:
            continue
        if sec != section:
            lines.append(f'| **{sec}** | | | | | | | | |')
            section = sec
        label = f'({key}) {method}' + (f' (= ({flags}))' if isinstance(flags, str) else '')
        if key == 'b':
            label = f'(b) Baseline Teacher (w = {a.w_cfg:g}; paper 1.75)'
        paper = PAPER_T3.get(key)
        lines.append(f'| {label} | ' + ' | '.join(cell(v) for v in row3(key)) + ' | '
                     + (' | '.join(f'{v:.2f}' for v in paper) if paper else '- | - | - | -') + ' |')
    lines += ['', '## Table 4 (the full model (g))', '',
              '| Sampling Method | NFE=4 | NFE=8 | NFE=12 | NFE=16 | paper 4 | paper 8 | paper 12 | paper 16 |',
              '|---|---|---|---|---|---|---|---|---|']
    for smp, label, paper in PAPER_T4:
        lines.append(f'| {label} | ' + ' | '.join(cell(fd['g', smp, n]) for n in T4_NFE) + ' | '
                     + ' | '.join(f'{v:.2f}' for v in paper) + ' |')
    if 'e' in runs:
        lines.append('| Mix Sampler on (e), FM + CD: no N2N (not in the paper) | ' + ' | '.join(
            cell(fd['e', 'mix', n]) for n in T4_NFE) + ' | - | - | - | - |')
    lines += ['', '## Orderings against the noise', '',
              f'Each cell: the first row against the second, by the mean over the {len(a.seeds)} seeds: "better" '
              f'or "worse" when the mean of the per-seed differences (paired by seed) is more than twice its standard '
              f'error, else "within noise" (one seed: "n/a (one seed)", there is no noise to test against). The '
              f'paper\'s ordering in brackets.', '', '| first / second | STEP=1 | STEP=2 | STEP=4 | STEP=50 |',
              '|---|---|---|---|---|']
    paper_order = lambda x, y: '-' if x is None or y is None else 'better' if x < y else 'worse' if x > y else 'equal'
    for first, second, what in T3_PAIRS:
        if first not in shown or second not in shown:
            continue
        lines.append(f'| ({first}) / ({second}): {what} | ' + ' | '.join(
            f'{common.ordering(f, s_)} ({paper_order(pf, ps)})' for f, s_, pf, ps in
            zip(row3(first), row3(second), PAPER_T3.get(first, [None] * 4), PAPER_T3.get(second, [None] * 4))) + ' |')
    paper4 = {smp: p for smp, _, p in PAPER_T4}
    lines += ['', '| Table 4, first / second | NFE=4 | NFE=8 | NFE=12 | NFE=16 |', '|---|---|---|---|---|']
    for first, second, what in T4_PAIRS:
        lines.append(f'| {what} | ' + ' | '.join(
            f'{common.ordering(fd["g", first, n], fd["g", second, n])} ({paper_order(pf, ps)})'
            for n, pf, ps in zip(T4_NFE, paper4[first], paper4[second])) + ' |')
    if 'e' in runs:
        lines.append('| Mix on (g) against Mix on (e): what N2N gives the Mix sampler | ' + ' | '.join(
            f'{common.ordering(fd["g", "mix", n], fd["e", "mix", n])} (-)' for n in T4_NFE) + ' |')
    mix = f'half of the NFE as deterministic flow-map steps up to t = {a.mix_t:g}, then CM steps'
    teacher_of = (f'teacher {a.teacher_steps} FM iterations (lr {a.teacher_lr:g}, seed {a.seeds[0]})' if not a.teacher
                  else f'teacher {teacher_ckpt} (given)')
    lines += ['', f'Mix sampler: {mix}.', '',
              f'Budget: {teacher_of}; each variant {a.decm_steps} DE-CM iterations (lr {a.decm_lr:g}, CFG w '
              f'{a.w_cfg:g}, eta {a.eta:g}, r_max {a.r_max:g}, t schedule {a.schedule or "uniform-seg"} but in (k), (l), r_max but in (r); '
              f'(j) is (g) with that schedule'
              f'{", EMA warm-up" if a.ema_warmup else ", constant EMA 0.995"}), batch {a.batch}. The paper trains '
              f'250 epochs on ImageNet; here the rows compare short distillation runs, not converged models '
              f'(`--quick`: 200 / 8 iterations, n = 200, one seed).',
              f'Time: teacher {t1 - t0:.0f} s, variants {t2 - t1:.0f} s ({n_runs} runs, {a.jobs} at a time), '
              f'sampling and FD {t3 - t2:.0f} s; total {time.time() - t0:.0f} s on {torch.get_num_threads()} '
              f'thread(s).',
              f'Runs: {a.runs}/<row>-s<seed>. Plot: {name}.png. Sample grids of seed {a.seeds[0]}: '
              f'{name}_samples/<row>.png (rows: classes; panels: the cells of the row; b_apg is (b*)) and '
              f'{name}_samples/table4.png.',
              f'Command: {a.command}']
    outs = [os.path.join(a.results, name + ext) for ext in ('.md', '.json', '.png')]
    write_atomic(outs[0], '\n'.join(lines) + '\n')
    raw = {'floor': floor, 'n': a.n, 'seeds': a.seeds, 'teacher': teacher_ckpt,
           'fd': [{'row': k, 'sampler': s, 'nfe': n, 'fd': v} for (k, s, n), v in fd.items()]}
    write_atomic(outs[1], json.dumps(raw, indent=1) + '\n')
    print('\n'.join(lines))
    print(f'tables: wrote {", ".join(outs)}, {sample_dir}/<row>.png; runs in {a.runs}/')


def build_parser():
    p = common.parser(__doc__)
    p.add_argument('--quick', action='store_true', help='about 5 minutes: 200 teacher and 8 DE-CM iterations, '
                   'n = 200 (flags given explicitly win); writes tables_quick.*')
    p.add_argument('--runs', default=None, help='folder for the teacher and the variant runs '
                   '(default runs/tables, with --quick runs/tables-quick)')
    p.add_argument('--results', default=common.RESULTS, help='folder for tables.md, tables.png, tables.json and '
                   'tables_samples/')
    p.add_argument('--data', default=None, help='latents folder for training and for the real images '
                   '(default: the built-in digits)')
    p.add_argument('--teacher', default=None, help='use this teacher checkpoint (file or run folder) '
                   'instead of training one')
    p.add_argument('--teacher-steps', type=int, default=None, help='teacher flow-matching iterations '
                   '(default 1500, quick 200)')
    p.add_argument('--teacher-lr', type=float, default=1e-3, help='teacher learning rate')
    p.add_argument('--decm-steps', type=int, default=None, help='DE-CM iterations of every variant '
                   '(default 200, quick 8)')
    p.add_argument('--decm-lr', type=float, default=1e-3, help='DE-CM learning rate of every variant')
    p.add_argument('--w-cfg', type=float, default=2.0, help='CFG weight: distillation and row (b)')
    p.add_argument('--batch', type=int, default=64, help='batch size of every run')
    p.add_argument('--n', type=int, default=None, help='samples per FD (default 1000, quick 200)')
    p.add_argument('--seeds', type=int, nargs='+', default=None, help='seeds: seed s trains every variant and '
                   'samples every cell (default 0 1 2; quick: 0)')
    p.add_argument('--rows', nargs='+', default=None, help='the variant runs to make, from c d e f g i k l m o p q r '
                   '(default: the paper\'s, all but the N2N ablations p q r; g is always needed): fewer rows, not '
                   'fewer seeds, to save time')
    p.add_argument('--eta', type=float, default=0.05, help='APG eta of the distilled velocity and of row (b*)')
    p.add_argument('--r-max', type=common.bounded(float, 0, 1), default=0.05, help='train.py --r-max of every '
                   'variant (0.05, the value the recorded tables were made with; the study found 0.2 better)')
    p.add_argument('--schedule', choices=['uniform-seg', 'logit-normal', 'arctan'], default=None, help='train.py '
                   '--schedule of every variant but (k) and (l) (default: train.py\'s, uniform-seg, as recorded; the '
                   'pipeline: logit-normal)')
    p.add_argument('--mix-t', type=common.bounded(float, 0, 1, lo_open=True, hi_open=True), default=common.MIX_T,
                   help='the Mix sampler\'s switch in Table 4 (0.25, as recorded; the pipeline: 0.0625)')
    p.add_argument('--jobs', type=int, default=1, help='runs trained at a time, as subprocesses of one thread each')
    p.add_argument('--no-ema-warmup', dest='ema_warmup', action='store_false', help='constant EMA decay for the '
                   'variant runs (default: the EMA warm-up, as in the pipeline: a 200-iteration run with a '
                   'constant decay of 0.995 still holds 37%% of the teacher in its average)')
    p.add_argument('--threads', type=common.bounded(int, 0), default=0, help='torch.set_num_threads of this '
                   'process and of its train.py runs (0: leave the default); 1 is much faster than 2 on a 2-core '
                   'machine that something else keeps busy')
    return p


def main(argv=None):
    return common.run_main(build_parser(), tables, argv, 'tables.py')


if __name__ == '__main__':
    main()
