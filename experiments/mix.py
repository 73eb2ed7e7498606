"""The Mix sampler's switch: pixel FD over --mix-det x --mix-t at one NFE, over seeds.

    python experiments/mix.py --ckpt RUN_S0 RUN_S1 RUN_S2 --seeds 0 1 2 [--ts 0.0625 0.125 0.25] [--teacher-fd F]

One row per --mix-det (0 = the CM sampler, the same in every column), one column per switch time --mix-t.
Checkpoint k (of a run trained with seed k, say) samples with noise seed --seeds[k] against real subset
--seeds[k], as the pipeline does; each cell is the mean +- sd over them. With --teacher-fd (the pipeline's
RUNS/fd.json or the study's RUNS/teacher_fd.json) the same cells follow as ratios to the teacher's best setting
at 50 steps in that cache (the lowest mean FD of its teacher rows, the distilled velocity among them), paired by
seed. Prints a markdown table (nothing is written).
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core, by name
import common  # noqa: E402
import sample  # noqa: E402
import torch  # noqa: E402
from common import fd_of, pm  # noqa: E402
from tqdm import tqdm  # noqa: E402


def mix_sweep(a):
    common.set_threads(a.threads)
    t0 = time.time()
    seeds = a.seeds or list(range(len(a.ckpt)))
    if len(seeds) != len(a.ckpt):
        raise ValueError(f'--seeds {" ".join(map(str, seeds))}: give one seed per --ckpt ({len(a.ckpt)})')
    ref = common.load_json(a.teacher_fd)                       # the teacher's rows at 50 steps, every seed
    teach = {k.split('|')[0] for k in ref if k.startswith('teacher') and k.endswith(f'|50|{seeds[0]}|{a.n}')}
    teach = {r: [ref.get(f'{r}|50|{s}|{a.n}') for s in seeds] for r in teach}
    teach = {r: v for r, v in teach.items() if all(v)}
    if a.teacher_fd and not teach:
        raise ValueError(f'--teacher-fd {a.teacher_fd}: no teacher FD at 50 steps for seeds {seeds} and --n {a.n}; '
                         'run experiments/pipeline.py or experiments/study.py with these first')
    best, base = min(sorted(teach.items()), key=lambda r: (sum(r[1]), r[0] == common.APG_KEY)) if teach else (None, [])
    runs = []
    for ckpt, s in zip(a.ckpt, seeds):
        model, stats, path = sample.load_model(ckpt)
        if model.s_embedder is None:
            raise ValueError(f'--ckpt {ckpt} is a flow-matching teacher: the Mix sampler needs a DE-CM checkpoint')
        runs.append((model, stats, path, s, common.real_pixels(a.n, a.data, seed=100 + s)[0]))

    def cell(det, t):                                          # (FD cell, ratio cell) over the seeds
        fds = [float(fd_of(m, st, 'mix', a.nfe, real, a.n, common.mix_args(t, det), s)[0])
               for m, st, _, s, real in runs]
        if not a.teacher_fd:
            return pm(fds), ''
        verdict = common.ordering(fds, base)                   # paired by seed against the teacher
        return pm(fds), pm([f / b for f, b in zip(fds, base)], 3) + ('' if verdict == 'within noise' else
                                                                     '; ' + verdict)

    head = ['| `--mix-det` \\ `--mix-t` | ' + ' | '.join(f'{t:g}' for t in a.ts) + ' |', '|---' * (len(a.ts) + 1) + '|']
    rows, ratio_rows = list(head), list(head)
    for det in tqdm(range(a.nfe), desc='mix: --mix-det', dynamic_ncols=True):
        if det == 0:                                           # no deterministic step: the CM sampler
            cells = [cell(0, a.ts[0])] * len(a.ts)
            name = '0 (the CM sampler)'
        else:
            cells = [cell(det, t) for t in a.ts]
            name = f'{det}' + (' (default)' if det == a.nfe // 2 else '')
        rows.append(f'| {name} | ' + ' | '.join(c[0] for c in cells) + ' |')
        ratio_rows.append(f'| {name} | ' + ' | '.join(c[1] for c in cells) + ' |')
    rows += ['', f'{", ".join(r[2] for r in runs)} (noise seeds and real subsets {seeds}), {a.nfe} NFE, pixel FD '
                 f'of {a.n} samples against {a.n} real digits' + (' (mean +- sd)' if len(runs) > 1 else '') +
             f'; {time.time() - t0:.0f} s on {torch.get_num_threads()} thread(s).']
    if a.teacher_fd:
        rows += ['', f'The same cells as ratios to the teacher\'s best setting at 50 steps in {a.teacher_fd} '
                 f'({best}, FDs ' + ', '.join(f'{b:.3f}' for b in base) + '; mean of the per-seed ratios +- sd; '
                 '"worse"/"better": the paired difference is beyond twice its standard error):', ''] + ratio_rows
    print('\n'.join(rows))
    print('mix: wrote no file (the table is above)')


def build_parser():
    B = common.bounded
    p = common.parser(__doc__)
    p.add_argument('--ckpt', nargs='+', default=['runs/decm'], help='DE-CM checkpoint(s) (file or run folder), '
                   'one per seed')
    p.add_argument('--seeds', type=int, nargs='+', default=None, help='noise seed and real subset of each --ckpt '
                   '(default 0, 1, ...)')
    p.add_argument('--nfe', type=B(int, 2), default=4, help='network calls per sample')
    p.add_argument('--ts', type=B(float, 0, 1, lo_open=True, hi_open=True), nargs='+',
                   default=[0.25, 0.5, 0.75], help='switch times --mix-t to try')
    p.add_argument('--n', type=B(int, 2), default=2000, help='samples per FD')
    p.add_argument('--data', default=None, help='latents folder of the real images (default: the built-in digits)')
    p.add_argument('--teacher-fd', default=None, help="an FD cache with the teacher at 50 steps (the "
                   "pipeline's RUNS/fd.json or the study's RUNS/teacher_fd.json): adds ratios to its best setting there, "
                   "paired by seed")
    p.add_argument('--threads', type=B(int, 0), default=0, help='torch.set_num_threads (0: the default)')
    return p


def main(argv=None):
    return common.run_main(build_parser(), mix_sweep, argv, 'mix.py')


if __name__ == '__main__':
    main()
