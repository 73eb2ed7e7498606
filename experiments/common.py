"""Helpers the experiments share: pixel FD of a sampler, FD caches, mean +- sd tables, the paired noise test,
train.py runs (one process each, several at a time), the DE-CM runs of the pipeline and the study, timing.

Pixel FD: the Frechet distance between n generated and n real 16x16 digits as raw pixel vectors
(fid.pixel_fd). It is not FID: only the orderings can be compared with the paper. Sampling seed s draws the
noise of every row and the real subset s (permutation seed 100 + s), so rows of one seed are paired.
"""
import argparse
import ctypes
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import sample  # noqa: E402
import train  # noqa: E402
# The core's helpers the experiments use, from where they are defined (fid.py: the command-line helpers; model.py:
# the pictures); the scripts take them from here.
from fid import bounded, cli_parser, pixel_fd, set_threads  # noqa: E402,F401
from model import plot, save_grid, to_uint8  # noqa: E402,F401

RESULTS = os.path.join(HERE, 'results')
TRAIN_PY = os.path.join(ROOT, 'train.py')
MIX_T = 0.25        # sample.py's Mix switch when the study and the tables were recorded (now: per t schedule)
APG_KEY = 'teacher, distilled velocity (APG)'            # the row name of the distilled-velocity teacher


# ----------------------------------------------------------------------------- command lines
def parser(doc):
    """The core's cli_parser (one-line `error: ...`, exit 2); --help shows the whole docstring of the file."""
    ap = cli_parser(doc)
    ap.description, ap.formatter_class = doc, argparse.RawDescriptionHelpFormatter
    return ap


def run_main(ap, fn, argv=None, script=None):
    """Parse argv, remember the command line (a.command: 'python experiments/X.py ...'), run fn(a); a
    ValueError becomes one line `error: ...` and exit code 2."""
    a = ap.parse_args(argv)
    args = sys.argv[1:] if argv is None else [str(x) for x in argv]
    a.command, a.argv = ' '.join([f'python experiments/{script}'] + args), args
    try:
        return fn(a)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


def at_least(a, names, lo=1):
    for name in names:
        if getattr(a, name) < (2 if name == 'n' else lo):
            raise ValueError(f'--{name.replace("_", "-")} {getattr(a, name)}: must be at least '
                             f'{2 if name == "n" else lo}')


def count_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def resolve_device(name):
    return torch.device('cuda' if name == 'auto' and torch.cuda.is_available() else
                        ('cpu' if name == 'auto' else name))


def write_atomic(path, text):
    with open(path + '.tmp', 'w') as f:
        f.write(text)
    os.replace(path + '.tmp', path)


def load_json(path):
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


# ----------------------------------------------------------------------------- FD of a sampler
def real_pixels(n, data=None, seed=1):
    """n real images (a fixed random subset for each seed) and their labels."""
    ds = train.LatentFolder(data or sample.BUILTIN_DIR)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([ds[i][0] for i in idx.tolist()]).float(), ds.labels[idx]


def teacher_args(w, guidance='cfg', eta=0.05):
    """The sampler flags of the teacher's Euler sampler (sample.py --cfg W --guidance G --eta E)."""
    return argparse.Namespace(cfg=w, cfg_interval_start=0.0, shift=0.0, cfg_channels=0, guidance=guidance, eta=eta)


def mix_args(t=MIX_T, det=None):
    """The Mix sampler's flags (sample.py --mix-t T --mix-det DET; det None: nfe // 2)."""
    return argparse.Namespace(mix_det=det, mix_t=t)


def fd_of(model, stats, name, nfe, real, n, args=None, seed=0, device='cpu'):
    """Pixel FD of n samples from one sampler; also returns the samples (de-normalised) and labels."""
    if name == 'mix' and args is None:
        args = mix_args()
    xs, ys, calls = sample.generate(model, name, n, nfe, model.num_classes, seed=seed, batch=500, args=args,
                                    device=str(device), progress=False)
    x = torch.cat([xs[k] for k in sorted(xs)]) * stats['std'] + stats['mean']
    y = torch.cat([ys[k] for k in sorted(ys)])
    assert calls == nfe * len(xs), (calls, nfe)               # --nfe is exact
    return pixel_fd(x.numpy(), real.numpy()), x, y


def panel(title, x, y):
    """One panel of save_grid: de-normalised samples in [-1, 1] and their labels."""
    return title, to_uint8(x), y


def fd_cached(cache, key, fn):
    """FD values survive an interrupted command: cache[key] is computed once, then saved by the caller."""
    if key not in cache:
        cache[key] = float(fn())
    return cache[key]


# ----------------------------------------------------------------------------- statistics over seeds
def mean_sd(values):
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return float('nan'), float('nan')
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else float('nan'))


def pm(values, digits=2):
    m, s = mean_sd(values)
    return f'{m:.{digits}f} +- {s:.{digits}f}' if math.isfinite(s) else f'{m:.{digits}f}'


def outside_noise(a_vals, b_vals):
    """Is the mean of the per-seed differences a_s - b_s larger than twice its standard error? Paired: seed s
    of both rows shares its sampling noise and its real subset, so what varies from seed to seed in both
    (mostly the real subset) cancels. One seed: never."""
    assert len(a_vals) == len(b_vals), (a_vals, b_vals)
    m, sd = mean_sd([x - y for x, y in zip(a_vals, b_vals)])
    return math.isfinite(sd) and abs(m) > 2 * sd / math.sqrt(len(a_vals))


def ordering(first, second):
    """'better' / 'worse' (first against second, lower FD is better) when the difference of the means is
    outside the noise (outside_noise), else 'within noise'; 'n/a (one seed)' when there is no noise to test
    against (fewer than 2 seeds)."""
    if len(first) < 2:
        return 'n/a (one seed)'
    if not outside_noise(first, second):
        return 'within noise'
    return 'better' if mean_sd(first)[0] < mean_sd(second)[0] else 'worse'


# ----------------------------------------------------------------------------- train.py runs
def run_train(argv):
    """python train.py ARGV in a child process (its output is ours). Ctrl-C reaches it too: it saves a
    checkpoint and exits, and we wait for that. A failed run raises ValueError."""
    argv = [str(x) for x in argv]
    p = subprocess.Popen([sys.executable, TRAIN_PY] + argv)
    try:
        rc = p.wait()
    except KeyboardInterrupt:
        p.wait()
        raise
    if rc != 0:
        raise ValueError(f'train.py {" ".join(argv)} exited with code {rc} (its error is above)')


def run_parallel(jobs, n_parallel, log_dir, deadline=None):
    """Run [script, arg, ...] (python scripts given by path) as subprocesses, n_parallel at a time, each with
    one CPU thread (OMP's spinning threads would otherwise fight over the cores) in its own process group;
    logs in log_dir. Past `deadline` (time.time()), running jobs get SIGTERM (train.py saves and exits).
    Returns the indices of the jobs that failed."""
    os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    pending, running, failed = list(enumerate(jobs)), [], []
    stop = lambda p: p.poll() is None and os.killpg(p.pid, signal.SIGTERM)
    bar = tqdm(total=len(jobs), desc='jobs', dynamic_ncols=True)
    try:
        while pending or running:
            while pending and len(running) < n_parallel and not (deadline and time.time() > deadline):
                i, argv = pending.pop(0)
                log = open(os.path.join(log_dir, f'job{i:03d}.log'), 'w')
                p = subprocess.Popen([sys.executable] + [str(x) for x in argv], env=env, stdout=log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
                running.append((i, p, log))
            if deadline and time.time() > deadline:
                pending = []
                for _, p, _ in running:
                    stop(p)
            for i, p, log in list(running):
                if p.poll() is not None:
                    log.close()
                    running.remove((i, p, log))
                    bar.update(1)
                    if p.returncode != 0:
                        failed.append(i)
            time.sleep(0.2)
    except KeyboardInterrupt:                                  # the jobs are in their own sessions
        for _, p, _ in running:
            stop(p)
        for _, p, _ in running:
            p.wait()
        raise
    bar.close()
    return failed


def train_all(jobs, n_parallel, log_dir, what='run'):
    """Every train.py argv of jobs: in turn in this terminal (n_parallel 1) or n_parallel at a time."""
    if n_parallel > 1:
        failed = run_parallel([[TRAIN_PY] + argv for argv in jobs], n_parallel, log_dir)
        if failed:
            raise ValueError(f'{len(failed)} {what}(s) failed: see {log_dir}')
    else:
        for argv in jobs:
            run_train(argv)


# Settings that do not change what a run computes (checked when an existing run folder is reused; a run
# folder may be moved or copied, so its --out is not checked either).
RUN_FLAGS_IGNORED = {'out', 'steps', 'resume', 'loss_set', 'log_every', 'ckpt_every', 'keep', 'workers', 'nan_patience',
                     'threads', 'eval_every', 'eval_samples', 'vae'}


def check_run(out, argv, steps):
    """An existing run in `out` must have been made with the same train.py flags (all but --steps) and
    no more than `steps` iterations; otherwise resuming it would mix two experiments. Returns True when the
    run is there and complete (nothing to train)."""
    last = train.latest_checkpoint(out)
    if last is None or not os.path.exists(last):
        return False
    ckpt = train.load_student_checkpoint(last)
    want = {k: v for k, v in vars(train.parse_args([str(x) for x in argv])).items() if k not in RUN_FLAGS_IGNORED}
    have = ckpt['args']
    same = lambda k, v: have[k] == v or (k in ('teacher', 'data') and isinstance(v, str) and os.path.exists(v)
                                         and os.path.exists(have[k]) and os.path.samefile(have[k], v))
    diff = [f'--{k.replace("_", "-")} {have[k]!r} there, {v!r} now' for k, v in want.items()
            if k in have and not same(k, v)]                   # a flag newer than the run is not checked
    if diff:
        raise ValueError(f'{out} holds a run made with other settings ({"; ".join(diff[:3])}): give another '
                         f'--runs folder or delete it')
    if ckpt['step'] > steps:
        raise ValueError(f'{out} holds a run of {ckpt["step"]} iterations, more than the {steps} asked for: '
                         f'give another --runs folder or delete it')
    return ckpt['step'] == steps


# ----------------------------------------------------------------------------- the pipeline's runs
def add_run_flags(p, runs, w_cfg=2.0):
    """The flags pipeline.py and study.py share: their runs, the teacher, the DE-CM runs, the FD."""
    p.add_argument('--runs', default=runs, help='folder for the runs, their logs and the FD cache')
    p.add_argument('--data', default=None, help='latents folder for training and for the real images '
                   '(default: the built-in digits)')
    p.add_argument('--results', default=RESULTS, help='folder of the published results')
    p.add_argument('--device', default='auto', help='auto, cpu or cuda (training and sampling)')
    p.add_argument('--amp', default='off', choices=['auto', 'on', 'off'], help='bf16 autocast of the runs '
                   '(off: fp32 everywhere, so CPU and GPU runs compute the same thing)')
    p.add_argument('--teacher-steps', type=int, default=2000, help='teacher flow-matching iterations')
    p.add_argument('--teacher-lr', type=float, default=1e-3, help='teacher learning rate')
    p.add_argument('--teacher-seed', type=int, default=0, help='seed of the teacher run')
    p.add_argument('--preset', choices=['tiny', 'small'], help='architecture of the teacher and so of DE-CM '
                   '(default tiny, or with --skip-teacher the teacher\'s; small, 1.87M parameters: closer to the '
                   'teacher on UCI, experiments/README.md)')
    p.add_argument('--batch', type=int, default=128, help='teacher batch size')
    p.add_argument('--skip-teacher', action='store_true', help='reuse RUNS/teacher as it is')
    p.add_argument('--decm-batch', type=int, default=64, help='DE-CM batch size')
    p.add_argument('--decm-lr', type=float, default=1e-3, help='DE-CM learning rate (the study: 1e-3 beats 3e-4 '
                   'beyond the seed noise on the built-in digits; on UCI 3e-4 is better at 2 NFE and Mix 4)')
    p.add_argument('--w-cfg', type=float, default=w_cfg, help='CFG weight of the distilled velocity (and of '
                   'the distilled-velocity teacher baseline)' + ('' if w_cfg else '; default: one --apg-sweep step '
                                                                  'weaker than the best, w 1 below the weakest'))
    p.add_argument('--eta', type=float, default=0.05, help='APG eta of the distilled velocity (train.py --eta)')
    p.add_argument('--cfg-sweep', type=float, nargs='+', default=[1.0, 1.25, 1.5, 2.0],
                   help='plain-CFG weights of the teacher baselines at 50 steps')
    p.add_argument('--n', type=int, default=2000, help='samples per FD')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='seeds (training and sampling)')
    p.add_argument('--jobs', type=int, default=1, help='runs trained at a time, as subprocesses of one '
                   'thread each (a GPU or a many-core machine; 1: one after the other)')
    p.add_argument('--threads', type=bounded(int, 0), default=0, help='torch.set_num_threads of this process and '
                   'of the runs trained one at a time (0: one per core; 1 on a busy machine)')


def teacher_rows(w_cfg, sweep):
    """The teacher baselines: (row name, guidance, w, steps). The fair baseline of DE-CM is the teacher
    on the very velocity it distils (APG, same w and eta); plain CFG is swept over `sweep`."""
    rows = [(APG_KEY, 'apg', w_cfg, 1), (APG_KEY, 'apg', w_cfg, 50)]
    return rows + [(f'teacher, plain CFG w = {w:g}', 'cfg', w, 50) for w in sweep]


def decm_argv(a, teacher_ckpt, out, seed, steps):
    """train.py flags of a DE-CM run of the pipeline (and of the study's configurations). The EMA warm-up and
    r_max are always given: the study's runs were made with a constant EMA and r_max 0.05."""
    return ['--seed', str(seed), '--batch', str(a.decm_batch), '--teacher', teacher_ckpt, '--out', out,
            '--steps', str(steps), '--lr', str(a.decm_lr), '--w-cfg', str(a.w_cfg), '--eta', str(a.eta),
            '--device', a.device, '--amp', a.amp, '--resume', 'auto', '--keep', '1'] + \
        (['--data', a.data] if a.data else []) + \
        (['--ema-warmup'] if getattr(a, 'ema_warmup', False) else ['--no-ema-warmup']) + \
        ['--r-max', str(getattr(a, 'decm_r_max', 0.05))] + \
        threads_flag(a) + \
        (['--schedule', a.decm_schedule] if getattr(a, 'decm_schedule', None) else []) + list(a.extra)


def threads_flag(a):
    return ['--threads', str(a.threads)] if getattr(a, 'threads', 0) else []


def train_teacher(a):
    """RUNS/teacher: a flow-matching teacher from scratch (resumed if it is there; a constant EMA, as the recorded
    teachers were trained); returns (dir, checkpoint)."""
    teacher_dir = os.path.join(a.runs, 'teacher')
    if not a.skip_teacher:
        run_train(['--seed', str(a.teacher_seed), '--batch', str(a.batch), '--losses', 'fm', '--teacher', 'none',
                   '--out', teacher_dir, '--steps', str(a.teacher_steps), '--lr', str(a.teacher_lr),
                   '--device', a.device, '--amp', a.amp, '--resume', 'auto', '--no-ema-warmup',
                   '--preset', a.preset or 'tiny'] +
                  (['--data', a.data] if a.data else []) + threads_flag(a))
    ckpt = train.latest_checkpoint(teacher_dir)
    if ckpt is None:
        raise ValueError(f'--runs {a.runs}: no teacher in {teacher_dir} (drop --skip-teacher to train one)')
    preset = train.load_student_checkpoint(ckpt)['model_config']['preset']
    if a.preset not in (None, preset):
        raise ValueError(f'--preset {a.preset}: the teacher in {teacher_dir} is {preset} (drop --preset to reuse it)')
    a.preset = preset                                          # what the reports print
    return teacher_dir, ckpt


def teacher_fds(a, teacher_dir, seeds, dev, cache, cache_path, panels=None, rows=None):
    """FD of every teacher row (default: teacher_rows) for every sampling seed (cached in cache_path); the grids
    of the first seed's APG rows go to panels."""
    teacher, stats, _ = sample.load_model(teacher_dir, dev)
    out = {}
    for seed in seeds:
        real = real_pixels(a.n, a.data, seed=100 + seed)[0]
        for name, guidance, w, steps in rows or teacher_rows(a.w_cfg, a.cfg_sweep):
            key = f'{name}|{steps}|{seed}|{a.n}'
            need_grid = panels is not None and seed == seeds[0] and guidance == 'apg'
            if key not in cache or need_grid:
                fd, x, y = fd_of(teacher, stats, 'teacher', steps, real, a.n, teacher_args(w, guidance, a.eta),
                                 seed, dev)
                cache[key] = float(fd)
                if need_grid:
                    panels.append(panel(f'teacher {steps} step(s)', x, y))
                write_atomic(cache_path, json.dumps(cache, indent=1))
            out[name, steps, seed] = cache[key]
    return out


# ----------------------------------------------------------------------------- timing and memory
def timed(fn, repeats, dev, warmup=1):
    """Median wall time of `repeats` calls of fn after `warmup` calls (CUDA: synchronised)."""
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == 'cuda' else (lambda: None)
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _status_kb(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key + ':'):
                return int(line.split()[1])
    raise OSError(f'no {key} in /proc/self/status')


def peak_extra_bytes(fn, dev):
    """Extra memory at the peak of fn() above what is in use just before it, or None if it cannot be
    measured. CUDA: max_memory_allocated. CPU (Linux): the peak resident set VmHWM, reset to the current
    resident set through /proc/self/clear_refs after glibc's malloc_trim has handed freed pages back (so
    that reusing them does not hide an allocation)."""
    gc.collect()
    if dev.type == 'cuda':
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        torch.cuda.synchronize(dev)
        return torch.cuda.max_memory_allocated(dev) - base
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        with open('/proc/self/clear_refs', 'w') as f:
            f.write('5')                                       # VmHWM := VmRSS (Linux >= 4.0)
        base = _status_kb('VmRSS')
    except OSError:
        return None
    fn()
    return (_status_kb('VmHWM') - base) * 1024


def random_teacher(preset, channels, size, classes, scale, dev='cpu'):
    """A frozen flow-matching DiT with random weights, perturbed by scale so that no weight is exactly zero
    (adaLN-Zero and the output layer start at 0)."""
    from model import DiT
    teacher = DiT(preset, in_channels=channels, input_size=size, num_classes=classes, s_embed=False)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(scale * torch.randn_like(p))
    return teacher.to(dev).eval().requires_grad_(False)
