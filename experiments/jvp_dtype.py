"""The JVP in fp32 and in bf16 (train.py --jvp-dtype): its error against float64, and a short run with each.

    python experiments/jvp_dtype.py [--presets tiny small] [--seeds 3] [--threads 1]

The relative error of the CM and N2N tangents dF and of the residual g of their targets, in fp32 and in bf16
(CPU bf16 autocast), against a float64 JVP of the same random student (median over --seeds students); then a
teacher (--teacher-steps flow-matching steps on the built-in digits, RUNS/teacher) and --steps DE-CM iterations
with each JVP precision from the same seed, data and draws (the other passes in fp32; lr 3e-4, r_max 0.05, a
constant EMA, as recorded). Writes --results/jvp_dtype.md and jvp_dtype.json.
"""
import copy
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core, by name
import common  # noqa: E402
import losses  # noqa: E402
import sample  # noqa: E402
import torch  # noqa: E402
import train  # noqa: E402
from common import write_atomic  # noqa: E402
from model import DiT, PRESETS, student_from_teacher  # noqa: E402
from teacher import load_teacher  # noqa: E402
from tqdm import tqdm  # noqa: E402


def jvp_errors(preset, seed, B=16):
    """Relative error of the CM and N2N tangents dF and of g_cm, in fp32 and in bf16 (autocast), against
    a float64 JVP of the same random student (weights perturbed so that no weight is zero)."""
    torch.manual_seed(seed)
    m64 = DiT(preset, in_channels=1, input_size=16, num_classes=10)
    with torch.no_grad():
        for p in m64.parameters():
            p.add_(0.02 * torch.randn_like(p))
    m64 = m64.double()
    m32 = copy.deepcopy(m64).float()
    g = torch.Generator().manual_seed(seed)
    x, v = torch.randn(B, 1, 16, 16, generator=g, dtype=torch.float64), torch.randn(B, 1, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (B,), generator=g)
    t = torch.rand(B, generator=g, dtype=torch.float64)
    r = 0.05 * torch.rand(B, generator=g, dtype=torch.float64)
    one = torch.ones_like(t)
    cases = {'CM (v, 1, 0) at (x_t, t, 1)': (x, t, one, (v, one, 0 * t)),
             'N2N (v, 1, -1) at (x_r, r, t)': (x, r, t, (v, one, -one))}
    rel = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
    out = {}
    residual = {'CM (v, 1, 0) at (x_t, t, 1)': lambda F_, d_, v_, a_, b_: losses.cm_residual(F_, d_, v_, a_)[0],
                'N2N (v, 1, -1) at (x_r, r, t)':                     # g_n2n with v_r = v_psi = v
                lambda F_, d_, v_, a_, b_: losses.n2n_residual(F_, d_, v_, v_, a_, b_)[0]}
    for name, (x_, a_, b_, tan) in cases.items():
        F64, d64 = losses.model_jvp(m64, x_, a_, b_, y, tan, fused=False)
        g64 = residual[name](F64, d64, v, a_, b_)
        for label, dtype in [('fp32', torch.float32), ('bf16', torch.bfloat16)]:
            f = lambda z: z.float()
            F_, d_ = losses.model_jvp(m32, f(x_), f(a_), f(b_), y, tuple(f(z) for z in tan), fused=False, dtype=dtype)
            g_ = residual[name](F_.float(), d_.float(), f(v), f(a_), f(b_))
            out[(name, label)] = (rel(d_, d64), rel(g_, g64))
    return out


def jvp_dtype(a):
    """The error table, then the two short runs -> jvp_dtype.md, jvp_dtype.json."""
    common.set_threads(a.threads)
    os.makedirs(a.results, exist_ok=True)
    lines = ['# The JVP in fp32 and in bf16 (`--jvp-dtype`)', '',
             f'Relative error |dF - dF_64| / |dF_64| of the tangent, and of the residual g of the target '
             f'(CM: g_cm = F - v - (1 - t) dF; N2N: g_n2n with v_r = v_psi = v), against a '
             f'float64 JVP of the same random student (weights perturbed, batch 16, 1x16x16, torch.func.jvp; '
             f'bf16: under CPU bf16 autocast). Median over {a.seeds} seeds.', '',
             '| preset | tangent | dF fp32 | dF bf16 | g fp32 | g bf16 |', '|---|---|---|---|---|---|']
    raw = {}
    for preset in a.presets:
        errs = [jvp_errors(preset, s) for s in range(a.seeds)]
        for case in dict.fromkeys(k[0] for k in errs[0]):
            med = {lab: [statistics.median(e[(case, lab)][i] for e in errs) for i in (0, 1)] for lab in ('fp32', 'bf16')}
            raw[f'{preset} {case}'] = med
            lines.append(f'| {preset} | {case} | {med["fp32"][0]:.1e} | {med["bf16"][0]:.1e} | {med["fp32"][1]:.1e} | '
                         f'{med["bf16"][1]:.1e} |')
    # a short run with each: the same teacher, seed, data and draws; only the JVP precision differs
    teacher_dir = os.path.join(a.runs, 'teacher')
    common.run_train(['--losses', 'fm', '--teacher', 'none', '--out', teacher_dir, '--steps', str(a.teacher_steps),
                      '--lr', '1e-3', '--batch', str(a.batch), '--resume', 'auto', '--seed', '0', '--no-ema-warmup'] +
                     (['--threads', str(a.threads)] if a.threads else []))
    teacher = load_teacher(train.latest_checkpoint(teacher_dir), in_channels=1, input_size=16)
    ds = train.LatentFolder(sample.BUILTIN_DIR)
    curves = {}
    for label in ('fp32', 'bf16'):
        torch.manual_seed(0)
        args = train.parse_args(['--teacher', 'given', '--jvp-dtype', label, '--lr', '3e-4', '--r-max', '0.05',
                                 '--no-ema-warmup'])
        student = student_from_teacher(teacher)
        ema = copy.deepcopy(student).requires_grad_(False)
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, args.beta2))
        stream = train.data_stream(ds, a.batch, 0, 0, 1, 0, 0)
        curves[label] = []
        for it in tqdm(range(a.steps), desc=f'jvp-dtype {label}', leave=False):
            lat, lat_flip, y = next(stream)
            x = train.prepare_batch(lat, lat_flip, ds.mean, ds.std, torch.device('cpu'))
            log, _ = train.train_step(student, ema, teacher, opt, x, y, it, args, 1,
                                      torch.autocast('cpu', enabled=False))
            curves[label].append({k: float(v) for k, v in log.items()})
    last = a.steps // 3
    lines += ['', f'Short run: the built-in digits, a teacher trained for {a.teacher_steps} flow-matching steps, then '
              f'{a.steps} DE-CM iterations (tiny preset, batch {a.batch}, lr 3e-4, freq 3) with each JVP precision from '
              f'the same seed (same data and draws); the other passes in fp32. The first iteration\'s losses, '
              f'then the mean over the last {last} iterations (the two runs drift apart as their updates differ):',
              '', '| loss | iteration 0, fp32 JVP | bf16 JVP | difference | last iterations, fp32 JVP | bf16 JVP '
              '| difference |', '|---|---|---|---|---|---|---|']
    for k in ('cm', 'fm', 'n2n', 'fm2'):
        first = {lab: c[0][k] for lab, c in curves.items()}
        m = {lab: statistics.mean(c[k] for c in curves[lab][-last:] if k in c) for lab in curves}
        raw[f'run {k}'] = dict(first=first, last=m)
        lines.append(f'| {k} | {first["fp32"]:.4f} | {first["bf16"]:.4f} | '
                     f'{(first["bf16"] - first["fp32"]) / first["fp32"]:+.2%} | {m["fp32"]:.4f} | {m["bf16"]:.4f} | '
                     f'{(m["bf16"] - m["fp32"]) / m["fp32"]:+.1%} |')
    lines += ['', f'Command: {a.command}']
    outs = [os.path.join(a.results, f) for f in ('jvp_dtype.md', 'jvp_dtype.json')]
    write_atomic(outs[0], '\n'.join(lines) + '\n')
    write_atomic(outs[1], json.dumps(dict(errors=raw, curves=curves), indent=1) + '\n')
    print('\n'.join(lines))
    print(f'jvp_dtype: wrote {", ".join(outs)}; the teacher run in {teacher_dir}/')


def build_parser():
    p = common.parser(__doc__)
    p.add_argument('--presets', nargs='+', default=['tiny', 'small'], choices=list(PRESETS),
                   help='presets of the error table')
    p.add_argument('--seeds', type=common.bounded(int, 1), default=3, help='random students per preset (the median '
                   'is kept)')
    p.add_argument('--teacher-steps', type=int, default=300, help='flow-matching steps of the teacher')
    p.add_argument('--steps', type=int, default=60, help='DE-CM iterations of each short run')
    p.add_argument('--batch', type=int, default=64, help='batch size of the teacher and the short runs')
    p.add_argument('--runs', default='runs/jvp-dtype', help='folder for the teacher run')
    p.add_argument('--threads', type=common.bounded(int, 0), default=0, help='torch.set_num_threads (0: leave the '
                   'default)')
    p.add_argument('--results', default=common.RESULTS, help='folder for jvp_dtype.md and jvp_dtype.json')
    return p


def main(argv=None):
    return common.run_main(build_parser(), jvp_dtype, argv, 'jvp_dtype.py')


if __name__ == '__main__':
    main()
