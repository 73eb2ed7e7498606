"""XL/1 on the GPU: the passes of a DE-CM iteration at the largest batch that fits, and what they cost.

    python experiments/gpu.py [--budget 240] [--preset XL/1] [--no-compile]
    python experiments/gpu.py --device cpu --preset tiny --max-batch 2 --no-compile    # a dry run on a CPU

XL/1 (or --preset) with random weights in the release layout (32x16x16 latents, 1000 classes): the largest
batch per GPU for which a DE-CM iteration with both updates fits (doubling, then bisection, catching
out-of-memory errors), then the forward pass, the teacher's CFG pass, FM, CM and N2N steps (fp32 and bf16
JVPs), the average DE-CM iteration at freq 3 (train.train_step), their peak memory, images/s and FLOP floor
(FlopCounterMode FLOPs over the measured bf16 matmul rate); then the same with torch.compile (train.py
--compile, --compile-jvp, a compiled student). A measurement that fails (out of memory, a compile error, its
share of --budget) is a row with its error. Writes --results/gpu.md and gpu.json, rewritten after every row.
"""
import copy
import gc
import json
import os
import signal
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core, by name
import common  # noqa: E402
import losses  # noqa: E402
import torch  # noqa: E402
import train  # noqa: E402
from common import timed, write_atomic  # noqa: E402
from model import PRESETS, student_from_teacher  # noqa: E402
from teacher import teacher_velocity  # noqa: E402
from tqdm import tqdm  # noqa: E402


class OverBudget(Exception):
    """A measurement stopped by the time limit (gpu.py --budget)."""


def time_limited(seconds, fn):
    """fn() stopped by SIGALRM after `seconds` (raises OverBudget); runs fn() as is off the main thread."""
    if seconds <= 0:
        raise OverBudget('no time left in --budget')
    if not hasattr(signal, 'setitimer') or signal.getsignal(signal.SIGALRM) is None:
        return fn()

    def stop(signum, frame):
        raise OverBudget(f'stopped after {seconds:.0f} s (time left in --budget)')
    try:
        old = signal.signal(signal.SIGALRM, stop)
    except ValueError:                                         # not the main thread
        return fn()
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def free_memory(dev):
    gc.collect()
    if dev.type == 'cuda':
        torch.cuda.empty_cache()


def gpu_attempt(rows, name, fn, dev, seconds):
    """Appends {name, **fn()} to rows, or {name, error} when fn raises (out of memory, a compile error,
    the time limit): one failing measurement is a row of the table, not the end of the run."""
    t0 = time.perf_counter()
    try:
        row = dict(name=name, **time_limited(seconds, fn))
    except Exception as e:                                     # noqa: BLE001 -- recorded, not hidden
        msg = ' '.join(str(e).split())
        row = dict(name=name, error=f'{type(e).__name__}: {msg[:240]}')
    row['wall_s'] = time.perf_counter() - t0
    rows.append(row)
    free_memory(dev)
    return row


def matmul_rate(dtype, dev, n, repeats=10):
    """Measured FLOP/s of an n x n x n matmul in dtype (TF32 for float32 on CUDA, as train.py sets)."""
    a, b = torch.randn(n, n, device=dev, dtype=dtype), torch.randn(n, n, device=dev, dtype=dtype)
    sec = timed(lambda: a @ b, repeats, dev, warmup=2)
    return 2 * n ** 3 / sec


def count_flops(fn):
    """Matmul, convolution and attention FLOPs of one call of fn (torch's FlopCounterMode)."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def peak_memory(fn, dev):
    """(peak allocated bytes during fn, its excess over the bytes allocated before); CUDA only."""
    if dev.type != 'cuda':
        return None, None
    torch.cuda.synchronize(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    before = torch.cuda.memory_allocated(dev)
    fn()
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    return peak, peak - before


def gpu_setup(a, dev):
    """XL/1 (or --preset) with random weights in the release layout: a frozen teacher (32x16x16 latents,
    1000 classes), its student, an EMA copy and AdamW as train.py builds them (fused on CUDA)."""
    torch.manual_seed(a.seed)
    with torch.device(dev):                                    # non-zero adaLN: realistic work everywhere
        teacher = common.random_teacher(a.preset, 32, 16, 1000, 1e-3, dev)
        student = student_from_teacher(teacher).train()
        ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4, betas=(0.9, 0.95),
                            fused=dev.type == 'cuda')
    return teacher, student, ema, opt


def gpu_inputs(B, dev, args):
    """One batch and the tensors of the separate passes: x_t, t, the teacher velocity stand-in, x_r, r."""
    g = torch.Generator(device=dev).manual_seed(B)
    x_ref = torch.randn(B, 32, 16, 16, device=dev, generator=g)
    z = torch.randn(B, 32, 16, 16, device=dev, generator=g)
    y = torch.randint(0, 1000, (B,), device=dev, generator=g)
    t = torch.rand(B, device=dev, generator=g)
    r = torch.minimum(torch.rand(B, device=dev, generator=g) * args.r_max, t)
    x_t = (1 - losses.bcast(t, z)) * z + losses.bcast(t, z) * x_ref
    x_r = (1 - losses.bcast(r, z)) * z + losses.bcast(r, z) * x_ref
    return dict(B=B, x_ref=x_ref, y=y, t=t, r=r, x_t=x_t, x_r=x_r, v=x_ref - z)


def gpu_passes(student, teacher, ema, opt, inp, args, autocast):
    """The measured passes at one batch: name -> fn. The step passes end with their backward."""
    x_t, x_r, t, r, y, v = inp['x_t'], inp['x_r'], inp['t'], inp['r'], inp['y'], inp['v']
    one = torch.ones_like(t)
    state = {'it': 0, 'skipped': 0}

    def forward():
        with torch.no_grad(), autocast:
            student(x_t, t, one, y)

    def teacher_pass():                                        # Alg.1 l.5: cond + uncond, batched 2B
        with torch.no_grad(), autocast:
            teacher_velocity(teacher, x_t, t, y, w_cfg=args.w_cfg, eta=args.eta, vnorm=args.vnorm)

    def fm_step():                                             # Alg.1 l.13-14 + backward
        student.zero_grad(set_to_none=True)
        with autocast:
            loss = losses.fm_loss(student, x_t, t, y, v, p=args.p, c=args.c)
        loss.backward()

    def cm_step(dtype, compiled=False):                        # Alg.1 l.8-11 + backward (fused JVP)
        student.zero_grad(set_to_none=True)
        loss = losses.cm_loss(student, x_t, t, y, v, w1=args.w1, p=args.p, c=args.c, fused=True, jvp_dtype=dtype,
                              compiled=compiled)
        loss.backward()

    def n2n_step(dtype):                                       # Alg.1 l.22-25 + backward (fused JVP)
        student.zero_grad(set_to_none=True)
        loss = losses.n2n_loss(student, x_r, r, t, y, v, v, lam=args.lam, gam=args.gam, w2=args.w2, p=args.p,
                               c=args.c, fused=True, jvp_dtype=dtype)
        loss.backward()

    def iterations(jvp_dtype, model_teacher=None, compile_jvp=False):   # train.train_step, freq iterations
        run_args = copy.copy(args)
        run_args.jvp_dtype, run_args.compile_jvp = jvp_dtype, compile_jvp

        def fn():
            for _ in range(args.freq):
                state['it'] += 1
                _, ok = train.train_step(student, ema, teacher if model_teacher is None else model_teacher, opt,
                                         inp['x_ref'], y, state['it'], run_args, 1, autocast)
                state['skipped'] += not ok
        return fn
    return dict(forward=forward, teacher=teacher_pass, fm=fm_step,
                cm_fp32=lambda: cm_step(torch.float32), cm_bf16=lambda: cm_step(torch.bfloat16),
                cm_fp32_compiled=lambda: cm_step(torch.float32, True),
                n2n_fp32=lambda: n2n_step(torch.float32), n2n_bf16=lambda: n2n_step(torch.bfloat16),
                iterations=iterations, state=state)


def grad_difference(model, eager_fn, compiled_fn):
    """|g_compiled - g_eager| / |g_eager| over all parameters, each fn leaving its gradients in .grad."""
    flat = lambda: torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])
    eager_fn()
    g = flat()
    compiled_fn()
    err = ((flat() - g).norm() / g.norm()).item()
    model.zero_grad(set_to_none=True)
    return err


def largest_batch(fits, cap, deadline, tried=None):
    """The largest B <= cap with fits(B): doubling from 1, then bisection. Returns (B, tried {B: ok})."""
    tried = {} if tried is None else tried

    def ok(B):
        if time.perf_counter() > deadline:
            raise OverBudget(f'batch search out of time at batch {B}')
        tried[B] = fits(B)
        return tried[B]
    if not ok(1):
        return 0, tried
    lo = 1
    while lo * 2 <= cap and ok(lo * 2):
        lo *= 2
    hi = min(lo * 2, cap + 1)                                  # hi does not fit (or is over the cap)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, tried


def gpu(a):
    """The XL/1 passes on the GPU (see gpu_report for the table)."""
    t_start = time.perf_counter()
    common.set_threads(a.threads)
    dev = common.resolve_device(a.device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA device is visible (give --device cpu for a dry run)')
    if a.budget <= 0 or a.repeats < 1 or a.max_batch < 1 or a.batch < 0:
        raise ValueError('--budget, --repeats and --max-batch must be positive, --batch at least 0')
    if a.preset not in PRESETS:
        raise ValueError(f'--preset {a.preset}: unknown (choose from {", ".join(PRESETS)})')
    deadline = t_start + a.budget
    if 'PYTORCH_CUDA_ALLOC_CONF' not in os.environ and 'PYTORCH_ALLOC_CONF' not in os.environ:
        os.environ['PYTORCH_CUDA_ALLOC_CONF'] = 'expandable_segments:True'   # less fragmentation after an OOM
    left = lambda reserve=0.0: deadline - time.perf_counter() - reserve
    if dev.type == 'cuda':                                     # as train.py
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(a.results, exist_ok=True)
    args = train.parse_args(['--teacher', 'given', '--freq', str(a.freq)])
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == 'cuda' or a.amp)
    info = dict(device=torch.cuda.get_device_name(dev) if dev.type == 'cuda' else f'CPU ({torch.get_num_threads()} threads)',
                torch=torch.__version__, preset=a.preset, freq=a.freq, repeats=a.repeats, budget_s=a.budget,
                command=a.command)
    rows = []
    report = lambda: gpu_report(a.results, info, rows)
    bar = tqdm(total=19, desc='gpu', dynamic_ncols=True)
    tick = lambda name: (bar.set_description(f'gpu: {name}'), bar.update(1))

    n = 8192 if dev.type == 'cuda' else 256
    info['bf16_flops'] = matmul_rate(torch.bfloat16, dev, n)
    info['fp32_flops'] = matmul_rate(torch.float32, dev, n)
    info['matmul_n'] = n
    tick('matmul rate')
    teacher, student, ema, opt = gpu_setup(a, dev)
    info['params'] = common.count_params(student)
    if dev.type == 'cuda':
        info['device_memory'] = torch.cuda.get_device_properties(dev).total_memory
    info['state_bytes'] = torch.cuda.memory_allocated(dev) if dev.type == 'cuda' else None
    tick('models')

    # 1. the largest batch for which a DE-CM iteration with both updates (N2N at this step) fits
    def fits(B):
        inp = gpu_inputs(B, dev, args)
        try:
            train.train_step(student, ema, teacher, opt, inp['x_ref'], inp['y'], 0, args, 1, autocast)
            if dev.type == 'cuda':
                torch.cuda.synchronize(dev)
            return True
        except RuntimeError as e:                              # OutOfMemoryError, or cuBLAS failing to allocate
            if isinstance(e, torch.cuda.OutOfMemoryError) or 'out of memory' in str(e) or 'ALLOC_FAILED' in str(e):
                return False
            raise
        finally:
            del inp
            opt.zero_grad(set_to_none=True)
            free_memory(dev)
    tried = {}
    if a.batch:
        B = a.batch
    else:
        try:
            B, _ = time_limited(left(0.5 * a.budget),
                                lambda: largest_batch(fits, a.max_batch, deadline - 0.5 * a.budget, tried))
        except OverBudget:                                     # out of time: the largest batch that fitted
            B = max([b for b, ok in tried.items() if ok], default=0)
    info['batch'], info['batch_search'] = B, {str(k): v for k, v in tried.items()}
    tick(f'batch {B}')
    if B == 0:
        raise ValueError(f'one sample does not fit on {info["device"]}')
    report()

    # 2. FLOPs of each pass at batch 1 (scaled by B; eager), then the passes at batch B
    inp1 = gpu_inputs(1, dev, args)
    p1 = gpu_passes(student, teacher, ema, opt, inp1, args, autocast)
    flops = {}
    try:
        for k, fn in p1.items():
            if k not in ('iterations', 'state', 'cm_fp32_compiled'):
                flops[k] = count_flops(fn)
        flops['iteration'] = count_flops(p1['iterations']('fp32')) / args.freq
    except Exception as e:                                     # noqa: BLE001 -- the rows go without a floor
        info['flop_error'] = f'{type(e).__name__}: {" ".join(str(e).split())[:200]}'
    opt.zero_grad(set_to_none=True)
    del inp1, p1
    tick('FLOPs')
    inp = gpu_inputs(B, dev, args)
    passes = gpu_passes(student, teacher, ema, opt, inp, args, autocast)

    def measure(fn, per=1, flop_key=None):
        def run():
            sec = timed(fn, a.repeats, dev) / per
            peak, extra = peak_memory(fn, dev)
            out = dict(batch=B, sec=sec, images_s=B / sec, peak=peak, extra=extra)
            if flop_key in flops:
                out['flops'] = flops[flop_key] * B
                out['floor'] = out['flops'] / info['bf16_flops']
            return out
        return run
    eager = [('one forward pass (no grad, bf16 autocast)', passes['forward'], 1, 'forward'),
             ('teacher cond + uncond pass (2B, no grad, bf16)', passes['teacher'], 1, 'teacher'),
             ('FM step: forward + backward (bf16 autocast)', passes['fm'], 1, 'fm'),
             ('CM step: fused JVP + backward, fp32 JVP (TF32)', passes['cm_fp32'], 1, 'cm_fp32'),
             ('CM step: fused JVP + backward, bf16 JVP', passes['cm_bf16'], 1, 'cm_fp32'),
             ('N2N step: fused JVP + backward, fp32 JVP (TF32)', passes['n2n_fp32'], 1, 'n2n_fp32'),
             ('N2N step: fused JVP + backward, bf16 JVP', passes['n2n_bf16'], 1, 'n2n_fp32'),
             (f'DE-CM iteration, freq {a.freq} average, fp32 JVP', passes['iterations']('fp32'), a.freq, 'iteration'),
             (f'DE-CM iteration, freq {a.freq} average, bf16 JVP', passes['iterations']('bf16'), a.freq, 'iteration')]
    for name, fn, per, key in eager:
        gpu_attempt(rows, name, measure(fn, per, key), dev, left(0.4 * a.budget if a.compile else 0))
        opt.zero_grad(set_to_none=True)
        tick(name.split(':')[0])
        report()

    # 3. with torch.compile: the teacher (train.py --compile), the student's JVPs (--compile-jvp), its forward
    if a.compile:
        from torch._dynamo.utils import counters
        compiled = {}

        def compile_then(key, make, fn_of):
            def run():
                if key not in compiled:
                    compiled[key] = make()
                fn = fn_of(compiled[key])
                graphs = counters['stats']['unique_graphs']
                t0 = time.perf_counter()
                fn()                                           # the first call compiles
                if dev.type == 'cuda':
                    torch.cuda.synchronize(dev)
                return dict(compile_s=time.perf_counter() - t0, graphs=counters['stats']['unique_graphs'] - graphs)
            return run
        it = passes['iterations']
        jobs = [(f'DE-CM iteration, freq {a.freq} average, fp32 JVP, teacher compiled (train.py --compile)',
                 'teacher', lambda: torch.compile(teacher), lambda tc: it('fp32', tc), a.freq, 'iteration'),
                (f'DE-CM iteration, freq {a.freq} average, bf16 JVP, teacher compiled (train.py --compile)',
                 'teacher', lambda: torch.compile(teacher), lambda tc: it('bf16', tc), a.freq, 'iteration'),
                ('CM step, fp32 JVP, JVP + backward compiled (train.py --compile-jvp)', 'cm_step',
                 lambda: passes['cm_fp32_compiled'], lambda f: f, 1, 'cm_fp32'),
                (f'DE-CM iteration, freq {a.freq} average, fp32 JVP, train.py --compile --compile-jvp', 'teacher',
                 lambda: torch.compile(teacher), lambda tc: it('fp32', tc, True), a.freq, 'iteration'),
                ('one forward pass, student compiled', 'student', lambda: torch.compile(student),
                 lambda sc: gpu_passes(sc, teacher, ema, opt, inp, args, autocast)['forward'], 1, 'forward'),
                ('FM step, student compiled', 'student', lambda: torch.compile(student),
                 lambda sc: gpu_passes(sc, teacher, ema, opt, inp, args, autocast)['fm'], 1, 'fm')]
        share = [0.3, 0.2, 0.6, 0.6, 0.5, 1.0]               # of the time left when the row starts
        for i, (name, key, make, fn_of, per, fkey) in enumerate(jobs):
            def run(key=key, make=make, fn_of=fn_of, per=per, fkey=fkey):
                first = compile_then(key, make, fn_of)()
                out = dict(measure(fn_of(compiled[key]), per, fkey)(), **first)
                if key == 'cm_step':                           # compiled and eager gradients must agree
                    out['grad_rel_err'] = grad_difference(student, passes['cm_fp32'], compiled[key])
                return out
            gpu_attempt(rows, name, run, dev, left() * share[i])   # its share of the time left
            opt.zero_grad(set_to_none=True)
            tick(name.split(',')[0])
            report()
    info['skipped_updates'] = passes['state']['skipped']
    info['total_s'] = time.perf_counter() - t_start
    bar.close()
    print(report())
    print(f'gpu: wrote {os.path.join(a.results, "gpu.md")}, {os.path.join(a.results, "gpu.json")}')


def gpu_report(results, info, rows):
    """gpu.md and gpu.json from the rows measured so far; returns the markdown."""
    ms = lambda s: f'{1e3 * s:.1f}'
    gib = lambda b: '-' if b is None else f'{b / 2 ** 30:.2f}'
    B = info.get('batch')
    tried = ', '.join(f'{k} ' + ('fits' if v else 'OOM') for k, v in info.get('batch_search', {}).items()) or 'given'
    lines = [f'# experiments/gpu.py: {info["preset"]} on {info["device"]}', '',
             f'torch {info["torch"]}. Random {info["preset"]} weights in the release layout (32x16x16 latents, '
             f'1000 classes; {info.get("params", 0) / 1e6:.1f}M trainable parameters), bf16 autocast for the '
             f'network passes, TF32 on, fused AdamW, EMA, teacher CFG with Eq. 13 v_psi (train.py\'s defaults). '
             f'Median of {info["repeats"]} runs after one warm-up. Measured matmul rate '
             f'({info["matmul_n"]}^3): bf16 {info["bf16_flops"] / 1e12:.3g} TFLOP/s, fp32 '
             f'{info["fp32_flops"] / 1e12:.3g} TFLOP/s (TF32 on CUDA).', '',
             f'Batch per GPU: {B}, the largest for which a DE-CM iteration with both updates (fp32 JVP) fits'
             f' (tried: {tried}).' if B is not None else 'Batch: not yet found.',
             f'Training state (student, EMA, teacher, AdamW) on the device: {gib(info.get("state_bytes"))} GiB '
             f'of {gib(info.get("device_memory"))} GiB.', '',
             '| measurement | batch | ms per call | images/s | peak memory (GiB) | above the state before (GiB) '
             '| GFLOP | FLOP floor at the bf16 rate (ms) | time / floor | compile (s) |',
             '|---|---|---|---|---|---|---|---|---|---|']
    for r in rows:
        if 'error' in r:
            lines.append(f'| {r["name"]} | {B} | error: {r["error"]} | | | | | | | |')
            continue
        flo = r.get('flops')
        gflop, floor, ratio = ('-', '-', '-') if flo is None else (f'{flo / 1e9:.4g}', ms(r['floor']),
                                                                   f'{r["sec"] / r["floor"]:.2f}')
        comp = f'{r["compile_s"]:.1f} ({r["graphs"]} graphs)' if 'compile_s' in r else '-'
        if 'grad_rel_err' in r:
            comp += f' (gradients vs eager: rel. diff. {r["grad_rel_err"]:.1e})'
        lines.append(f'| {r["name"]} | {r["batch"]} | {ms(r["sec"])} | {r["images_s"]:.1f} | {gib(r["peak"])} | '
                     f'{gib(r["extra"])} | {gflop} | {floor} | {ratio} | {comp} |')
    if 'flop_error' in info:
        lines += ['', f'FLOP counting failed: {info["flop_error"]}']
    lines += ['', 'FLOPs: torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions, attention) of each pass '
              'at batch 1, times the batch; the bf16 JVP rows use the fp32 rows\' count. The DE-CM iteration is '
              'train.train_step itself (teacher calls, both losses, clipping, AdamW, EMA), averaged over freq '
              'consecutive iterations (one of them with the N2N update). Peak memory: '
              'torch.cuda.max_memory_allocated during one more call.',
              f'Total time {info.get("total_s", 0):.0f} s (--budget {info["budget_s"]:.0f} s; 0: still running). '
              f'Command: {info["command"]}']
    md = '\n'.join(lines) + '\n'
    write_atomic(os.path.join(results, 'gpu.md'), md)
    write_atomic(os.path.join(results, 'gpu.json'), json.dumps(dict(info, rows=rows), indent=1, default=str) + '\n')
    return md


def build_parser():
    p = common.parser(__doc__)
    p.add_argument('--preset', default='XL/1', help='model preset (the paper: XL/1; tiny for a dry run)')
    p.add_argument('--device', default='auto', help='auto (CUDA if present), cuda or cpu (a dry run)')
    p.add_argument('--budget', type=float, default=240, help='seconds for the whole run; a measurement '
                   'that would run past it is stopped and recorded as such (default: about 4 minutes)')
    p.add_argument('--batch', type=int, default=0, help='batch per GPU (0: the largest that fits, searched)')
    p.add_argument('--max-batch', type=int, default=1024, help='upper end of the batch search')
    p.add_argument('--repeats', type=int, default=3, help='timed runs per measurement (the median is kept)')
    p.add_argument('--freq', type=int, default=3, help='N2N every freq iterations for the average iteration')
    p.add_argument('--no-compile', dest='compile', action='store_false', help='skip the torch.compile rows')
    p.add_argument('--amp', action='store_true', help='bf16 autocast on CPU too (on CUDA it is always on)')
    p.add_argument('--seed', type=int, default=0, help='seed of the random weights and data')
    p.add_argument('--threads', type=common.bounded(int, 0), default=0, help='torch.set_num_threads (0: leave the '
                   'default; a CPU dry run on a busy machine: 1)')
    p.add_argument('--results', default=common.RESULTS, help='folder for gpu.md and gpu.json')
    return p


def main(argv=None):
    return common.run_main(build_parser(), gpu, argv, 'gpu.py')


if __name__ == '__main__':
    main()
