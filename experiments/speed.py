"""Speed on this machine: iteration and sampling times, peak memory, the DE-CM iteration against its floor.

    python experiments/speed.py [--presets tiny small] [--batch 128] [--repeats 5] [--compile-jvp]
    python experiments/speed.py --jvp-steps [--clock cpu]      # only the CM step against the FM step

For each preset a random teacher (weights perturbed so that no weight is exactly zero) and its student, on
random 1x16x16 data with 10 classes: the median time of --repeats runs after a warm-up of a teacher-training
(FM) iteration, a CM+FM, an N2N+FM, a full (freq 1) and the average freq-3 DE-CM iteration (train.train_step
itself), and the floor of the latter: the sum of the passes it cannot avoid, each timed alone (teacher
cond+uncond forward, fused JVP + backward through its primal, FM forward + backward, plus 1/freq of the N2N
branch: two teacher calls, the N2N JVP + backward, one more FM forward + backward). Targets: DE-CM iteration /
floor <= 1.15, 1-NFE sampling / one forward pass <= 1.05. Peak memory is the extra memory at the peak of one
iteration above the state before it (weights, gradients, AdamW state): CUDA max_memory_allocated, or on CPU
the process's peak resident set (VmHWM, reset through /proc/self/clear_refs after malloc_trim). Writes
--results/speed.md and speed.json; --jvp-steps writes jvp_steps.md and jvp_steps.json (the CM step, eager and
compiled as train.py --compile-jvp, against the FM forward + backward, interleaved rounds).
"""
import copy
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core, by name
import common  # noqa: E402
import losses  # noqa: E402
import sample  # noqa: E402
import torch  # noqa: E402
import train  # noqa: E402
from common import peak_extra_bytes, timed, write_atomic  # noqa: E402
from model import DiT, PRESETS, student_from_teacher  # noqa: E402
from teacher import teacher_velocity  # noqa: E402
from tqdm import tqdm  # noqa: E402


def profile_table(fn, dev, rows=15):
    """torch.profiler's top ops of one call of fn, by self time (CPU; CUDA too on a GPU)."""
    from torch.profiler import profile, ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == 'cuda' else [])
    with profile(activities=acts) as prof:
        fn()
        if dev.type == 'cuda':
            torch.cuda.synchronize(dev)
    key = 'self_cuda_time_total' if dev.type == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=40)


def speed_preset(preset, a, dev, bar):
    """All measurements of one preset (see the docstring). Returns a dict of seconds / bytes / ratios."""
    torch.manual_seed(a.seed)
    B, C, H, K = a.batch, 1, 16, 10
    teacher = common.random_teacher(preset, C, H, K, 0.02, dev)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == 'cuda')   # train.py's --amp auto
    x_ref = torch.randn(B, C, H, H, device=dev)
    y = torch.randint(0, K, (B,), device=dev)
    res = {'params': common.count_params(student_from_teacher(teacher))}
    step = lambda name: (bar.set_description(f'speed {preset}: {name}'), bar.update(1))

    def trainer(argv, with_teacher=True):
        """A fresh model, EMA and AdamW as train.py builds them, and one train_step call per fn()."""
        args = train.parse_args(argv + (['--teacher', 'given'] if with_teacher else
                                        ['--teacher', 'none', '--preset', preset]))
        model = (student_from_teacher(teacher) if with_teacher else
                 DiT(preset, in_channels=C, input_size=H, num_classes=K, s_embed=False).to(dev)).train()
        ema = copy.deepcopy(model).requires_grad_(False)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr,
                                betas=(0.9, args.beta2), weight_decay=args.weight_decay, fused=dev.type == 'cuda')
        state = {'it': 0}

        def fn(block=1):
            for _ in range(block):
                train.train_step(model, ema, teacher if with_teacher else None, opt, x_ref, y, state['it'],
                                 args, 1, autocast)
                state['it'] += 1
        return fn, args

    # 1. whole iterations (train.train_step), time and peak extra memory
    its = [('fm', ['--losses', 'fm'], False, 1), ('cm_fm', ['--losses', 'fm,cm'], True, 1),
           ('n2n_fm', ['--losses', 'fm,n2n', '--freq', '1'], True, 1), ('decm_f1', ['--freq', '1'], True, 1),
           ('decm', ['--freq', str(a.freq)], True, a.freq)]
    for name, argv, with_teacher, block in its:
        fn, _ = trainer(argv, with_teacher)
        run = (lambda fn=fn, block=block: fn(block))
        res[name] = timed(run, a.repeats, dev) / block
        res[name + '_mem'] = peak_extra_bytes(run, dev)
        step(name)
        if name == 'decm':
            decm_block = run

    # 2. the floor: the passes a DE-CM iteration cannot avoid, each timed alone
    args = train.parse_args(['--teacher', 'given', '--freq', str(a.freq)])
    student = student_from_teacher(teacher).train()
    params = [p for p in student.parameters() if p.requires_grad]
    z = torch.randn_like(x_ref)
    t = train.sample_t(B, args, dev)
    r = torch.minimum(torch.rand(B, device=dev) * args.r_max, t)
    x_t = (1 - losses.bcast(t, z)) * z + losses.bcast(t, z) * x_ref
    x_r = (1 - losses.bcast(r, z)) * z + losses.bcast(r, z) * x_ref
    with torch.no_grad(), autocast:
        v = teacher_velocity(teacher, x_t, t, y, w_cfg=args.w_cfg, eta=args.eta, vnorm=args.vnorm).float()
    one, zero = torch.ones_like(t), torch.zeros_like(t)
    x2, t2, y2 = torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, K)])

    def teacher_pass():                                        # Alg.1 l.5 (and l.20, and v_psi at pred)
        with torch.no_grad(), autocast:
            teacher(x2, t2, None, y2)

    def jvp_backward(x, a_, b_, tangents, compiled=False):     # Alg.1 l.8 / l.22 + backward of the loss
        student.zero_grad(set_to_none=True)
        out, _ = losses.model_jvp(student, x, a_, b_, y, tangents, fused=True, compiled=compiled)
        out.float().square().mean().backward()

    def fm_pass():                                             # Alg.1 l.13 / l.26 + backward
        student.zero_grad(set_to_none=True)
        with autocast:
            out = student(x_t, t, t, y)
        out.float().square().mean().backward()

    res['teacher_pass'] = timed(teacher_pass, a.repeats, dev)
    res['cm_jvp'] = timed(lambda: jvp_backward(x_t, t, one, (v, one, zero)), a.repeats, dev)
    res['fm_pass'] = timed(fm_pass, a.repeats, dev)
    res['n2n_jvp'] = timed(lambda: jvp_backward(x_r, r, t, (args.lam * v, torch.full_like(r, args.lam),
                                                            torch.full_like(t, -args.gam))), a.repeats, dev)
    res['ratio_cm_fm'] = res['cm_jvp'] / res['fm_pass']
    if a.compile_jvp:                                          # train.py --compile-jvp: compile, then time
        t0 = time.perf_counter()
        jvp_backward(x_t, t, one, (v, one, zero), compiled=True)
        res['cm_jvp_compile_s'] = time.perf_counter() - t0
        res['cm_jvp_compiled'] = timed(lambda: jvp_backward(x_t, t, one, (v, one, zero), compiled=True),
                                       a.repeats, dev)
        res['ratio_cm_fm_compiled'] = res['cm_jvp_compiled'] / res['fm_pass']
    f = a.freq
    res['floor'] = (res['teacher_pass'] * (1 + 2 / f) + res['cm_jvp'] + res['fm_pass'] * (1 + 1 / f)
                    + res['n2n_jvp'] / f)
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, args.beta2), fused=dev.type == 'cuda')
    ema_params = [p.detach().clone() for p in params]
    fm_pass()                                                  # gradients to step with

    def update():                                              # train.optimizer_step after a backward
        g = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        if bool(torch.isfinite(g)):
            opt.step()
        torch._foreach_lerp_(ema_params, [p.detach() for p in params], 1 - args.ema)
    res['update'] = timed(update, a.repeats, dev)
    step('floor')

    # 3. sampling: one forward pass, the CM sampler, the teacher's 50-step Euler + CFG
    student.eval()
    zs = torch.randn(B, C, H, H, device=dev)
    zero_t, one_s = torch.zeros(B, device=dev), torch.ones(B, device=dev)

    def forward():
        with torch.no_grad():
            student(zs, zero_t, one_s, y)
    res['forward'] = timed(forward, a.repeats, dev)
    for nfe in (1, 2, 4):
        res[f'cm{nfe}'] = timed(lambda: sample.cm_sampler(student, zs, y, nfe), a.repeats, dev)
    res['teacher50'] = timed(lambda: sample.teacher_sampler(teacher, zs, y, 50, a.w_cfg), 1, dev, warmup=0)
    step('sampling')

    res['ratio_floor'] = res['decm'] / res['floor']
    res['ratio_floor_upd'] = res['decm'] / (res['floor'] + (1 + 1 / f) * res['update'])
    res['ratio_fm'] = res['decm'] / res['fm']
    res['ratio_sample'] = res['cm1'] / res['forward']
    res['profile'] = []
    if res['ratio_floor'] > 1.15:
        res['profile'].append((f'one block of {f} DE-CM iterations (freq {f})', profile_table(decm_block, dev)))
    if res['ratio_sample'] > 1.05:
        res['profile'].append(('CM sampler, 1 NFE', profile_table(lambda: sample.cm_sampler(student, zs, y, 1), dev)))
        res['profile'].append(('one forward pass', profile_table(forward, dev)))
    step('profile')
    return res


def jvp_steps(a, dev):
    """speed.py --jvp-steps: the CM step (fused JVP + backward through its primal), eager and
    compiled, against the FM forward + backward, interleaved (one of each per round, median of --repeats
    rounds), on the process's CPU time with --clock cpu (a machine that other jobs share)."""
    clock = time.process_time if a.clock == 'cpu' else time.perf_counter
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else (lambda: None)
    lines = [f'# The CM step against the FM step ({"CPU time of this process" if a.clock == "cpu" else "wall time"}, '
             f'{torch.get_num_threads()} threads, batch {a.batch}, median of {a.repeats} interleaved rounds)', '',
             '| preset | FM forward + backward (ms) | CM step, eager (ms) | CM step, compiled (ms) | eager / FM '
             '| compiled / FM | compile (s) | gradients, compiled vs eager |', '|---|---|---|---|---|---|---|---|']
    raw = {}
    for preset in a.presets:
        torch.manual_seed(a.seed)
        m = DiT(preset, in_channels=1, input_size=16, num_classes=10).to(dev)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.02 * torch.randn_like(p))
        x, v = torch.randn(a.batch, 1, 16, 16, device=dev), torch.randn(a.batch, 1, 16, 16, device=dev)
        t, y = torch.rand(a.batch, device=dev), torch.randint(0, 10, (a.batch,), device=dev)

        def cm(compiled):
            m.zero_grad(set_to_none=True)
            losses.cm_loss(m, x, t, y, v, compiled=compiled).backward()

        def fm():
            m.zero_grad(set_to_none=True)
            losses.fm_loss(m, x, t, y, v).backward()
        flat = lambda: torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
        cm(False)
        g0 = flat()
        t0 = time.perf_counter()
        cm(True)
        compile_s = time.perf_counter() - t0
        grad_err = ((flat() - g0).norm() / g0.norm()).item()
        fns = {'fm': fm, 'cm': lambda: cm(False), 'cm_compiled': lambda: cm(True)}
        ts = {k: [] for k in fns}
        for f in fns.values():
            f()
        for _ in tqdm(range(a.repeats), desc=f'jvp steps {preset}', leave=False):
            for k, f in fns.items():
                sync()
                c0 = clock()
                f()
                sync()
                ts[k].append(clock() - c0)
        r = {k: statistics.median(v) for k, v in ts.items()}
        r.update(compile_s=compile_s, grad_rel_err=grad_err)
        raw[preset] = r
        lines.append(f'| {preset} | {1e3 * r["fm"]:.1f} | {1e3 * r["cm"]:.1f} | {1e3 * r["cm_compiled"]:.1f} | '
                     f'{r["cm"] / r["fm"]:.2f} | {r["cm_compiled"] / r["fm"]:.2f} | {compile_s:.0f} | {grad_err:.1e} |')
    lines += ['', f'Command: {a.command}']
    outs = [os.path.join(a.results, f) for f in ('jvp_steps.md', 'jvp_steps.json')]
    write_atomic(outs[0], '\n'.join(lines) + '\n')
    write_atomic(outs[1], json.dumps(raw, indent=1) + '\n')
    print('\n'.join(lines))
    print(f'speed: wrote {", ".join(outs)}')


def speed(a):
    """The measurements of every preset -> speed.md, speed.json (or --jvp-steps: jvp_steps.md, .json)."""
    if a.batch < 1 or a.repeats < 1 or a.freq < 1:
        raise ValueError('--batch, --repeats and --freq must be at least 1')
    dev = common.resolve_device(a.device)
    common.set_threads(a.threads)
    if dev.type == 'cuda':                                     # as train.py
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(a.results, exist_ok=True)
    if a.jvp_steps:
        return jvp_steps(a, dev)
    bar = tqdm(total=8 * len(a.presets), desc='speed', dynamic_ncols=True)
    out = {p: speed_preset(p, a, dev, bar) for p in a.presets}
    bar.close()
    where = (torch.cuda.get_device_name(dev) if dev.type == 'cuda' else
             f'CPU, {torch.get_num_threads()} threads')
    ms = lambda s: f'{1e3 * s:.1f}'
    mb = lambda b: 'n/a' if b is None else f'{b / 2 ** 20:.1f}'
    ok = lambda v, target: f'{v:.3f} ({"meets" if v <= target else "misses"} <= {target})'
    f = a.freq
    lines = [f'# Speed: DE-CM iterations and sampling on {where}', '',
             f'Batch {a.batch}, random 1x16x16 data with 10 classes, random teacher (weights perturbed so that '
             f'none is exactly zero) and its student; median of {a.repeats} runs after one warm-up '
             f'(the teacher\'s 50-step sampler: one run). torch {torch.__version__}, '
             f'{"bf16 autocast (train.py on CUDA)" if dev.type == "cuda" else "fp32"}.', '',
             '## Summary', '',
             '| preset | params | FM iteration (ms) | DE-CM iteration, freq 3 avg (ms) | floor (ms) '
             '| DE-CM / floor | DE-CM / FM | 1-NFE sampling / forward | teacher 50-step CFG / DE-CM 1 NFE |',
             '|---|---|---|---|---|---|---|---|---|']
    for p, r in out.items():
        lines.append(f'| {p} | {r["params"] / 1e6:.2f}M | {ms(r["fm"])} | {ms(r["decm"])} | {ms(r["floor"])} | '
                     f'{ok(r["ratio_floor"], 1.15)} | {r["ratio_fm"]:.2f} | {ok(r["ratio_sample"], 1.05)} | '
                     f'{r["teacher50"] / r["cm1"]:.0f}x |')
    for p, r in out.items():
        lines += ['', f'## {p}', '', '| measurement | time (ms) | peak extra memory (MiB) |', '|---|---|---|',
                  f'| FM iteration (teacher training: fm_loss forward + backward, AdamW, EMA) | {ms(r["fm"])} | '
                  f'{mb(r["fm_mem"])} |',
                  f'| CM+FM iteration (`--losses fm,cm`) | {ms(r["cm_fm"])} | {mb(r["cm_fm_mem"])} |',
                  f'| N2N+FM iteration (`--losses fm,n2n --freq 1`: the FM update, then the N2N branch) | '
                  f'{ms(r["n2n_fm"])} | {mb(r["n2n_fm_mem"])} |',
                  f'| DE-CM iteration at freq 1 (both updates every iteration) | {ms(r["decm_f1"])} | '
                  f'{mb(r["decm_f1_mem"])} |',
                  f'| **DE-CM iteration at freq {f}** (average over {f} consecutive iterations; memory: their peak)'
                  f' | {ms(r["decm"])} | {mb(r["decm_mem"])} |',
                  f'| floor part: teacher cond + uncond forward (batched 2B, no grad) | {ms(r["teacher_pass"])} | |',
                  f'| floor part: CM JVP (fused) + backward through its primal | {ms(r["cm_jvp"])} | |']
        if 'cm_jvp_compiled' in r:
            lines += [f'| CM JVP (fused) + backward, compiled (`--compile-jvp`; first call with the compile: '
                      f'{r["cm_jvp_compile_s"]:.0f} s) | {ms(r["cm_jvp_compiled"])} | |']
        lines += [f'| floor part: FM forward + backward | {ms(r["fm_pass"])} | |',
                  f'| floor part: N2N JVP (fused) + backward | {ms(r["n2n_jvp"])} | |',
                  f'| **floor** = teacher x (1 + 2/{f}) + CM JVP + FM x (1 + 1/{f}) + N2N JVP / {f} | '
                  f'{ms(r["floor"])} | |',
                  f'| optimizer update (grad clip, AdamW, EMA; not in the floor) | {ms(r["update"])} | |',
                  f'| one forward pass (no grad) | {ms(r["forward"])} | |',
                  f'| CM sampler, 1 / 2 / 4 NFE | {ms(r["cm1"])} / {ms(r["cm2"])} / {ms(r["cm4"])} | |',
                  f'| teacher Euler + CFG, 50 steps (one batched cond + uncond call per step) | '
                  f'{ms(r["teacher50"])} | |', '',
                  f'- DE-CM iteration / floor = {ok(r["ratio_floor"], 1.15)}; / (floor + {1 + 1 / f:.2f} optimizer '
                  f'updates) = {r["ratio_floor_upd"]:.3f}; / FM iteration = {r["ratio_fm"]:.2f}.',
                  f'- CM step (JVP + backward) / FM step (forward + backward) = {ok(r["ratio_cm_fm"], 1.6)}'
                  + (f'; compiled (`--compile-jvp`): {ok(r["ratio_cm_fm_compiled"], 1.6)}'
                     if 'ratio_cm_fm_compiled' in r else '') + '.',
                  f'- 1-NFE sampling / one forward pass = {ok(r["ratio_sample"], 1.05)}.',
                  f'- teacher 50-step CFG sampling / DE-CM 1, 2, 4 NFE = {r["teacher50"] / r["cm1"]:.0f}x, '
                  f'{r["teacher50"] / r["cm2"]:.0f}x, {r["teacher50"] / r["cm4"]:.0f}x.']
    lines += ['', 'Floor: the teacher call at t (l.5), the CM JVP whose primal is the CM output (l.8, backward of '
              'its loss), the FM forward + backward (l.13), and every freq-th iteration the N2N branch: the '
              'teacher at r (l.20) and at the predicted point (Eq. 13, our default --vpsi pred; same cost as the '
              'first teacher call, timed once), the N2N JVP + backward (l.22) and the second FM forward + '
              'backward (l.26). The optimizer updates are left out of the floor and shown separately.',
              'Peak extra memory: ' + ('torch.cuda.max_memory_allocated above the memory allocated before the '
                                       'iteration.' if dev.type == 'cuda' else
                                       'the growth of the process\'s peak resident set (VmHWM, reset through '
                                       '/proc/self/clear_refs after malloc_trim) during one more iteration, '
                                       'above its state before it (weights, gradients, AdamW state): activations '
                                       'and temporaries as the OS sees them, including allocator slack.'),
              f'Command: {a.command}']
    for p, r in out.items():
        for title, table in r['profile']:
            lines += ['', f'## Profile ({p}): {title}, top ops by self '
                      f'{"CUDA" if dev.type == "cuda" else "CPU"} time', '', '```', table.rstrip(), '```']
    outs = [os.path.join(a.results, f) for f in ('speed.md', 'speed.json')]
    write_atomic(outs[0], '\n'.join(lines) + '\n')
    raw = {p: {k: v for k, v in r.items() if k != 'profile'} for p, r in out.items()}
    write_atomic(outs[1], json.dumps(raw, indent=1) + '\n')
    print('\n'.join(lines))
    print(f'speed: wrote {", ".join(outs)}')


def build_parser():
    p = common.parser(__doc__)
    p.add_argument('--presets', nargs='+', default=['tiny', 'small'], choices=list(PRESETS),
                   help='model presets to measure')
    p.add_argument('--batch', type=int, default=128, help='batch size of the iterations and of sampling')
    p.add_argument('--repeats', type=int, default=5, help='timed runs per measurement (the median is kept)')
    p.add_argument('--threads', type=common.bounded(int, 0), default=0, help='torch.set_num_threads (0: leave the default)')
    p.add_argument('--freq', type=int, default=3, help='N2N every freq iterations for the average iteration')
    p.add_argument('--w-cfg', type=float, default=2.0, help='CFG weight of the teacher (distillation, sampler)')
    p.add_argument('--device', default='auto', help='auto, cpu or cuda')
    p.add_argument('--seed', type=int, default=0, help='seed of the random models and data')
    p.add_argument('--jvp-steps', action='store_true', help='only the CM step (eager and compiled, '
                   'train.py --compile-jvp) against the FM step, interleaved -> jvp_steps.md')
    p.add_argument('--clock', default='wall', choices=['wall', 'cpu'], help='--jvp-steps: wall time, or the '
                   "process's CPU time (steadier on a machine that other jobs share; with --threads 1)")
    p.add_argument('--compile-jvp', action='store_true', help='also time the CM JVP + backward compiled '
                   '(train.py --compile-jvp; compiles once per preset, 1-2 minutes on a CPU)')
    p.add_argument('--results', default=common.RESULTS, help='folder for speed.md and speed.json')
    return p


def main(argv=None):
    return common.run_main(build_parser(), speed, argv, 'speed.py')


if __name__ == '__main__':
    main()
