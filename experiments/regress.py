"""The capacity probe: how good can a one-step student of this architecture be?

    python experiments/regress.py --teacher RUNS/teacher [--teacher-fd RUNS/fd.json] [--pairs 10000]

The same network, started from the teacher as in Alg. 1 l.1, is fit by plain regression to the teacher's own
ODE map: F(z, 0, 1) = x - z for --pairs (noise z, the teacher's --ode-steps Euler solution x on the distilled
velocity, APG). Its 1-NFE pixel FD is the target of DE-CM's CM loss at t = 0 reached by brute force; if it stays
above the teacher, the gap is the network's, not the objective's. Writes RUNS/regress.md and regress.json
(the pairs are cached in RUNS/pairs_<pairs>_<ode steps>.pt).
"""
import copy
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core, by name
import common  # noqa: E402
import sample  # noqa: E402
import torch  # noqa: E402
import train  # noqa: E402
from common import fd_of, pm, write_atomic  # noqa: E402
from model import student_from_teacher  # noqa: E402
from tqdm import tqdm  # noqa: E402


def regress(a):
    common.set_threads(a.threads)
    t0 = time.time()
    dev = torch.device('cpu')
    teacher, stats, _ = sample.load_model(a.teacher, flag='--teacher')
    if stats is None or teacher.s_embedder is not None:
        raise ValueError(f'--teacher {a.teacher}: need a flow-matching teacher trained by train.py')
    os.makedirs(a.runs, exist_ok=True)
    pairs_path = os.path.join(a.runs, f'pairs_{a.pairs}_{a.ode_steps}.pt')
    if os.path.exists(pairs_path):
        z, y, x = torch.load(pairs_path, weights_only=True).values()
    else:                                                      # noise seeds 1000+: none of the FD seeds
        targs = common.teacher_args(a.w_cfg, 'apg', a.eta)
        zs, ys, xs = [], [], []
        for b in tqdm(range(0, a.pairs, 500), desc='regress: teacher ODE pairs', dynamic_ncols=True):
            g = torch.Generator().manual_seed(1000 + b)
            zb = torch.randn((min(500, a.pairs - b), teacher.in_channels, teacher.input_size, teacher.input_size),
                             generator=g)
            yb = torch.arange(b, b + len(zb)) % teacher.num_classes
            zs.append(zb), ys.append(yb)
            xs.append(sample.run_sampler(teacher, 'teacher', zb, yb, a.ode_steps, args=targs))
        z, y, x = torch.cat(zs), torch.cat(ys), torch.cat(xs)
        torch.save({'z': z, 'y': y, 'x': x}, pairs_path)
    t1 = time.time()
    torch.manual_seed(a.seed)
    student = student_from_teacher(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    ema.schedule = None                                        # sample.run_sampler reads it (set by load_model)
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ema_args = train.parse_args(['--ema', '0.995', '--ema-warmup'])
    reals = {s: common.real_pixels(a.n, a.data, seed=100 + s)[0] for s in a.seeds}
    ref = common.load_json(a.teacher_fd)
    rows, gen = [], torch.Generator().manual_seed(a.seed)
    for step in tqdm(range(1, max(a.eval_at) + 1), desc='regress: fitting F(z, 0, 1) = x - z', dynamic_ncols=True):
        idx = torch.randint(0, len(z), (a.batch,), generator=gen)
        zb, yb, xb = z[idx], y[idx], x[idx]
        loss = (student(zb, torch.zeros(len(zb)), torch.ones(len(zb)), yb) - (xb - zb)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(student.parameters()),
                                 1 - train.ema_decay(step - 1, ema_args))
        if step in a.eval_at:
            fds = [float(fd_of(ema, stats, 'cm', 1, reals[s], a.n, None, s, dev)[0]) for s in a.seeds]
            base = [ref.get(f'{common.APG_KEY}|50|{s}|{a.n}') for s in a.seeds]
            ratio = [f / b for f, b in zip(fds, base)] if all(base) else None
            rows.append({'step': step, 'loss': float(loss), 'fd': fds, 'ratio': ratio})
    lines = ['# Capacity probe: the one-step student fit to the teacher\'s ODE map by regression', '',
             f'{a.pairs} pairs (noise, the teacher\'s {a.ode_steps}-step Euler ODE on the distilled velocity, w '
             f'{a.w_cfg:g}, eta {a.eta:g}); the student (the teacher plus its zero-initialised s branch) fit by '
             f'MSE on F(z, 0, 1) = x - z, batch {a.batch}, lr {a.lr:g}, AdamW, EMA 0.995 with warm-up; CM sampler '
             f'at 1 NFE, pixel FD of {a.n} samples per seed {a.seeds} (noise seed s, real subset s).', '',
             '| iterations | last batch loss | 1-NFE FD (mean +- sd) | / distilled-velocity teacher, 50 steps |',
             '|---|---|---|---|']
    for r in rows:
        lines.append(f'| {r["step"]} | {r["loss"]:.4f} | {pm(r["fd"])} | {pm(r["ratio"]) if r["ratio"] else "-"} |')
    lines += ['', f'Time: pairs {t1 - t0:.0f} s, fit and FD {time.time() - t1:.0f} s ({torch.get_num_threads()} '
              f'thread(s)).', f'Command: {a.command}']
    outs = [os.path.join(a.runs, f) for f in ('regress.md', 'regress.json')]
    write_atomic(outs[0], '\n'.join(lines) + '\n')
    write_atomic(outs[1], json.dumps(rows, indent=1) + '\n')
    print('\n'.join(lines))
    print(f'regress: wrote {", ".join(outs)}; the pairs in {pairs_path}')


def build_parser():
    B = common.bounded
    p = common.parser(__doc__)
    p.add_argument('--teacher', default='runs/pipe/teacher', help='flow-matching teacher (file or run folder)')
    p.add_argument('--teacher-fd', default=None, help="the pipeline's FD cache (RUNS/fd.json): ratios against "
                   'the distilled-velocity teacher at 50 steps')
    p.add_argument('--runs', default='runs/regress', help='folder for the pairs and regress.md')
    p.add_argument('--pairs', type=B(int, 1), default=10000, help='(noise, ODE solution) pairs')
    p.add_argument('--ode-steps', type=B(int, 1), default=50, help='Euler steps of the teacher ODE')
    p.add_argument('--w-cfg', type=float, default=2.0, help='CFG weight of the distilled velocity')
    p.add_argument('--eta', type=float, default=0.05, help='APG eta of the distilled velocity')
    p.add_argument('--batch', type=B(int, 1), default=64, help='regression batch size')
    p.add_argument('--lr', type=float, default=1e-3, help='AdamW learning rate')
    p.add_argument('--eval-at', type=B(int, 1), nargs='+', default=[400, 1000, 2000],
                   help='iterations at which the EMA weights are evaluated (the fit stops at the last)')
    p.add_argument('--n', type=B(int, 2), default=2000, help='samples per FD')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='sampling seeds (noise and real subset)')
    p.add_argument('--seed', type=int, default=0, help='seed of the fit')
    p.add_argument('--data', default=None, help='latents folder of the real images (default: the built-in digits)')
    p.add_argument('--threads', type=B(int, 0), default=0, help='torch.set_num_threads (0: the default)')
    return p


def main(argv=None):
    return common.run_main(build_parser(), regress, argv, 'regress.py')


if __name__ == '__main__':
    main()
