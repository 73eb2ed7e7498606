"""Measurements on the built-in dataset: the miniature pipeline of the paper, its tables, and speed.

    python bench.py pipeline   build data -> train a teacher -> distill DE-CM -> sample with the teacher's
                               Euler+CFG and the Euler, CM and Mix samplers -> pixel FD table
                               (results/pipeline.md, results/pipeline.png with sample grids)
    python bench.py study      what closes the gap to the teacher: STUDY configurations x seeds, evaluated
                               along the run -> results/study.md, study.png
    python bench.py regress    capacity probe: the same network fit by regression to the teacher's ODE map
    python bench.py tables     the paper's Table 3 (ablations (a)-(o)) and Table 4 (samplers) in miniature:
                               one teacher, then every Table 3 variant of --rows distilled from it with the
                               same budget, for each of --seeds -> results/tables.md (mean +- sd beside the
                               paper's FID, the orderings tested against the seed noise), results/tables.png
                               (FD against NFE) and results/tables_samples/*.png
    python bench.py estimate   time and memory of the paper's run, from a measured CPU iteration of XL/1
    python bench.py speed      iteration and sampling times, peak memory, the DE-CM iteration against the
                               sum of the passes it cannot avoid -> results/speed.md
    python bench.py jvp-dtype  the JVP's error in fp32 and bf16 against float64, and a short CPU run with
                               each JVP precision -> results/jvp_dtype.md
    python bench.py gpu        XL/1 on the GPU: forward, FM, CM and N2N steps, the DE-CM iteration at the
                               largest batch that fits, peak memory, images/s, FLOP floor, with and
                               without torch.compile, fp32 and bf16 JVPs -> results/gpu.md, gpu.json
    python bench.py mix        the Mix sampler's switch: pixel FD over --mix-det x --mix-t at one NFE (seeds)

Pixel FD: the Frechet distance between 2,000 (tables: --n) generated and as many real 16x16 digits, as raw
pixel vectors (fid.pixel_fd). It is not FID: only the orderings can be compared with the paper. The teacher
is trained here from scratch (`train.py --losses fm --teacher none`).

tables. Columns STEP=1, 2, 4 use the CM sampler (1, 2, 4 NFE); STEP=50 is the Euler ODE sampler with 50
steps (the instantaneous velocity F(x, t, t)); the teacher rows (a) (no CFG) and (b) (CFG, --w-cfg) use
the teacher's Euler sampler with 1, 2, 4, 50 steps, and (b*) on the velocity the variants distil (APG).
Rows (h), (j), (n) are the full model (g) under another name and reuse its run. Budget: the paper trains
250 epochs of ImageNet; here one seed of the whole command (11 runs plus about 850 NFE x --n samples of
sampling) must fit one hour on 2 CPU cores; three seeds of fewer rows (--rows) cost the same per row. Measured on the
tiny preset at batch 128, 2 threads: a teacher (FM) iteration 0.29 s, CM+FM 0.94 s, the full DE-CM
iteration (freq 1) 2.1 s, so about 1.3 s at freq 3 and about 11.7 s for one iteration of all ten
distillation runs; one NFE costs about 0.8 s per 1,000 samples (sampling batch 500). The default is
  --teacher-steps 1500 (pipeline: 2000)   ~7 min
  --decm-steps 200 per variant at batch 64, lr 1e-3 (pipeline: 400)  ~25 min for the ten runs
  --n 1000 samples per FD (pipeline: 2000)  ~12 min of sampling
and `--quick` (about 5 minutes, same code) uses 200 / 8 / 200. Runs resume (`--resume auto`) and are
checked against the flags they were made with, so an interrupted `tables` continues where it stopped.
On a 2-core machine that another job keeps busy, `--threads 1` avoids OpenMP's spin-waiting (2 threads
were up to 10x slower there).

speed. For each preset a random teacher (weights perturbed so that no weight is exactly zero) and its
student, on random 1x16x16 data with 10 classes: the median time of --repeats runs after a warm-up of a
teacher-training (FM) iteration, a CM+FM, an N2N+FM, a full (freq 1) and the average freq-3 DE-CM
iteration (train.train_step itself), and the floor of the latter: the sum of the passes it cannot avoid,
each timed alone (teacher cond+uncond forward, fused JVP + backward through its primal, FM forward +
backward, plus 1/freq of the N2N branch: two teacher calls, the N2N JVP + backward, one more FM forward +
backward). Targets: DE-CM iteration / floor <= 1.15, 1-NFE sampling / one forward pass <= 1.05. Peak
memory is the extra memory at the peak of one iteration above the state before it (weights, gradients,
AdamW state): CUDA max_memory_allocated, or on CPU the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs after malloc_trim), i.e. activations and temporaries as the OS sees them.
"""
import argparse
import copy
import ctypes
import gc
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

import torch
from tqdm import tqdm

import losses
import sample
import train
from fid import pixel_fd
from model import DiT, student_from_teacher, count_params
from teacher import resolve_checkpoint, teacher_velocity

RESULTS = 'results'


def real_pixels(n, data=None, seed=1):
    """n real images (a fixed random subset for each seed) and their labels."""
    ds = train.LatentFolder(data or train.BUILTIN_DIR)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.stack([ds[i][0] for i in idx.tolist()]).float(), ds.labels[idx]


def fd_of(model, stats, name, nfe, real, n, args=None, seed=0, device='cpu'):
    """Pixel FD of n samples from one sampler; also returns the samples (de-normalised) and labels."""
    xs, ys, calls = sample.generate(model, name, n, nfe, model.num_classes, seed=seed, batch=500, args=args,
                                    device=str(device), progress=False)
    x = torch.cat([xs[k] for k in sorted(xs)]) * stats['std'] + stats['mean']
    y = torch.cat([ys[k] for k in sorted(ys)])
    assert calls == nfe * len(xs), (calls, nfe)               # --nfe is exact
    return pixel_fd(x.numpy(), real.numpy()), x, y


def grid_rows(x, y, per_row=10):
    """One image per class per column: (classes x per_row) uint8 HxW grid (black where a class has fewer)."""
    img = sample.to_uint8(x)[..., 0]
    classes = sorted(set(y.tolist()))[:10]
    width = min(per_row, max(int((y == c).sum()) for c in classes))
    rows = []
    for c in classes:
        sel = img[y == c][:width]
        if len(sel) < width:
            sel = torch.cat([sel, torch.zeros((width - len(sel),) + sel.shape[1:], dtype=sel.dtype)])
        rows.append(torch.cat(list(sel), dim=1))
    return torch.cat(rows, dim=0)


def save_panels(path, panels):
    """Side-by-side sample grids with titles (pillow)."""
    from PIL import Image, ImageDraw
    scale, pad, title = 2, 8, 14
    ims = [Image.fromarray(g.numpy()).resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST)
           for _, g in panels]
    draw = ImageDraw.Draw(Image.new('L', (1, 1)))
    widths = [max(im.width, int(draw.textlength(name)) + 4) for (name, _), im in zip(panels, ims)]
    W = sum(widths) + pad * (len(ims) + 1)
    H = max(im.height for im in ims) + title + 2 * pad
    canvas = Image.new('L', (W, H), 255)
    draw = ImageDraw.Draw(canvas)
    x0 = pad
    for (name, _), im, w in zip(panels, ims, widths):
        draw.text((x0, 2), name, fill=0)
        canvas.paste(im, (x0, title + pad))
        x0 += w + pad
    canvas.save(path + '.tmp.png')
    os.replace(path + '.tmp.png', path)


def write_atomic(path, text):
    with open(path + '.tmp', 'w') as f:
        f.write(text)
    os.replace(path + '.tmp', path)


def run_train(argv):
    """train.main(argv), then the SIGINT/SIGTERM handlers it installs are put back (Ctrl-C works again)."""
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        train.main(argv)
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# ----------------------------------------------------------------------------- pillow line plot
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 0), (120, 120, 255),
           (0, 110, 90)]


def line_plot(path, panels, size=(520, 400), legend_w=200, ylabel='pixel FD (log)', ylim=None):
    """panels: [(title, x label, {series name: [(x, y), ...]})]. Log x and log y axes (ylim=(lo, hi): a
    linear y axis over that range, grid every 0.1); one line and colour per series, a legend beside each
    panel. Non-finite or non-positive y are left out. Pillow only."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:                                          # pillow < 10.1
        font = ImageFont.load_default()
    pw, ph = size
    ml, mr, mt, mb = 58, 12, 50, 42
    im = Image.new('RGB', (len(panels) * (pw + legend_w), ph), 'white')
    d = ImageDraw.Draw(im)
    for k, (title, xlabel, series) in enumerate(panels):
        ox = k * (pw + legend_w)
        d.text((ox + 4, 4), title, fill='black', font=font)
        pts = [(x, y) for s in series.values() for x, y in s if math.isfinite(y) and y > 0]
        if not pts:
            d.text((ox + ml, ph // 2), 'no finite values', fill='black', font=font)
            continue
        xs = sorted({x for x, _ in pts})
        lx0, lx1 = math.log(xs[0]), math.log(xs[-1])
        if lx1 - lx0 < 1e-9:
            lx0, lx1 = lx0 - 1, lx1 + 1
        ly0 = math.floor(math.log10(min(y for _, y in pts)))
        ly1 = math.ceil(math.log10(max(y for _, y in pts)))
        ly1 = ly1 if ly1 > ly0 else ly0 + 1
        x0, x1, y0, y1 = ox + ml, ox + pw - mr, ph - mb, mt
        X = lambda x: x0 + (math.log(x) - lx0) / (lx1 - lx0) * (x1 - x0)
        Y = lambda y: y0 - (math.log10(y) - ly0) / (ly1 - ly0) * (y0 - y1)
        if ylim:                                               # linear y over ylim, grid every 0.1
            Y = lambda y: y0 - (min(max(y, ylim[0]), ylim[1]) - ylim[0]) / (ylim[1] - ylim[0]) * (y0 - y1)
            for k in range(int(round((ylim[1] - ylim[0]) * 10)) + 1):
                v = ylim[0] + k / 10
                d.line([(x0, Y(v)), (x1, Y(v))], fill=(225, 225, 225))
                d.text((x0 - 6, Y(v)), f'{v:.1f}', fill='black', font=font, anchor='rm')
            ly0 = ly1 = 0                                      # no log grid
        for e in range(ly0, ly1 + 1) if not ylim else ():      # y grid: 1, 2, 5 x 10^e
            for m in ((1, 2, 5) if ly1 - ly0 <= 3 else (1,)):
                v = m * 10.0 ** e
                if 10.0 ** ly0 <= v <= 10.0 ** ly1:
                    d.line([(x0, Y(v)), (x1, Y(v))], fill=(225, 225, 225) if m > 1 else (190, 190, 190))
                    d.text((x0 - 6, Y(v)), f'{v:g}', fill='black', font=font, anchor='rm')
        for x in xs:                                           # x ticks at the measured NFE
            d.line([(X(x), y0), (X(x), y1)], fill=(235, 235, 235))
            d.text((X(x), y0 + 4), f'{x:g}', fill='black', font=font, anchor='mt')
        d.rectangle([x0, y1, x1, y0], outline='black')
        d.text(((x0 + x1) / 2, ph - 8), xlabel, fill='black', font=font, anchor='mb')
        d.text((ox + 4, y1 - 30), ylabel, fill='black', font=font)
        for i, (name, s) in enumerate(series.items()):
            col = PALETTE[i % len(PALETTE)]
            good = [(X(x), Y(y)) for x, y in sorted(s) if math.isfinite(y) and y > 0]
            if len(good) > 1:
                d.line(good, fill=col, width=2)
            for px, py in good:
                d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
            ly = mt + 16 * i
            d.line([(ox + pw + 4, ly + 7), (ox + pw + 24, ly + 7)], fill=col, width=3)
            d.text((ox + pw + 28, ly), name, fill='black', font=font)
    im.save(path + '.tmp.png')
    os.replace(path + '.tmp.png', path)


# ----------------------------------------------------------------------------- pipeline
def resolve_device(name):
    return torch.device('cuda' if name == 'auto' and torch.cuda.is_available() else
                        ('cpu' if name == 'auto' else name))


def teacher_rows(w_cfg, eta, sweep):
    """The teacher baselines: (row name, guidance, w, steps). The fair baseline of DE-CM is the teacher
    on the very velocity it distils (APG, same w and eta); plain CFG is swept over `sweep`."""
    rows = [('teacher, distilled velocity (APG)', 'apg', w_cfg, 1), ('teacher, distilled velocity (APG)', 'apg', w_cfg, 50)]
    return rows + [(f'teacher, plain CFG w = {w:g}', 'cfg', w, 50) for w in sweep]


def fd_cached(cache, key, fn):
    """FD values survive an interrupted command: cache[key] is computed once, then saved by the caller."""
    if key not in cache:
        cache[key] = float(fn())
    return cache[key]


def load_json(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


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


def run_parallel(jobs, n_parallel, log_dir, deadline=None):
    """Run [argv, ...] (python scripts of this folder) as subprocesses, n_parallel at a time, each with
    one CPU thread (OMP's spinning threads would otherwise fight over the cores); logs in log_dir.
    Past `deadline` (time.time()), running jobs are stopped with SIGTERM (train.py saves and exits)."""
    os.makedirs(log_dir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    here = os.path.dirname(os.path.abspath(__file__))
    pending, running, failed = list(enumerate(jobs)), [], []
    bar = tqdm(total=len(jobs), desc='jobs', dynamic_ncols=True)
    while pending or running:
        while pending and len(running) < n_parallel and not (deadline and time.time() > deadline):
            i, argv = pending.pop(0)
            log = open(os.path.join(log_dir, f'job{i:03d}.log'), 'w')
            p = subprocess.Popen([sys.executable, os.path.join(here, argv[0])] + argv[1:], env=env,
                                 stdout=log, stderr=subprocess.STDOUT, cwd=os.getcwd())
            running.append((i, p, log))
        if deadline and time.time() > deadline:
            pending = []
            for _, p, _ in running:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
        for i, p, log in list(running):
            if p.poll() is not None:
                log.close()
                running.remove((i, p, log))
                bar.update(1)
                if p.returncode != 0:
                    failed.append(i)
        time.sleep(0.2)
    bar.close()
    return failed


def decm_argv(a, teacher_ckpt, out, seed, steps):
    """train.py flags of a DE-CM run of the pipeline (and of the study's configurations)."""
    return ['--seed', str(seed), '--batch', str(a.decm_batch), '--teacher', teacher_ckpt, '--out', out,
            '--steps', str(steps), '--lr', str(a.decm_lr), '--w-cfg', str(a.w_cfg), '--eta', str(a.eta),
            '--device', a.device, '--amp', a.amp, '--resume', 'auto', '--keep', '1'] + \
        (['--data', a.data] if a.data else []) + (['--ema-warmup'] if getattr(a, 'ema_warmup', False) else []) + \
        (['--r-max', str(a.decm_r_max)] if getattr(a, 'decm_r_max', None) is not None else []) + \
        (['--schedule', a.decm_schedule] if getattr(a, 'decm_schedule', None) else []) + list(a.extra)


def train_teacher(a):
    teacher_dir = os.path.join(a.runs, 'teacher')
    if not a.skip_teacher:
        run_train(['--seed', str(a.teacher_seed), '--batch', str(a.batch), '--losses', 'fm', '--teacher', 'none',
                   '--out', teacher_dir, '--steps', str(a.teacher_steps), '--lr', str(a.teacher_lr),
                   '--device', a.device, '--amp', a.amp, '--resume', 'auto'] + (['--data', a.data] if a.data else []))
    ckpt = train.latest_checkpoint(teacher_dir)
    if ckpt is None:
        raise ValueError(f'--runs {a.runs}: no teacher in {teacher_dir} (drop --skip-teacher to train one)')
    return teacher_dir, ckpt


def teacher_fds(a, teacher_dir, seeds, dev, cache, cache_path, panels=None):
    """FD of every teacher row for every sampling seed (cached)."""
    teacher, stats, _ = sample.load_model(teacher_dir, dev)
    out = {}
    for seed in seeds:
        real = real_pixels(a.n, a.data, seed=100 + seed)[0]
        for name, guidance, w, steps in teacher_rows(a.w_cfg, a.eta, a.cfg_sweep):
            targs = type('A', (), dict(cfg=w, cfg_interval_start=0.0, shift=0.0, guidance=guidance, eta=a.eta))
            key = f'{name}|{steps}|{seed}|{a.n}'
            need_grid = panels is not None and seed == seeds[0] and guidance == 'apg'
            if key not in cache or need_grid:
                fd, x, y = fd_of(teacher, stats, 'teacher', steps, real, a.n, targs, seed, dev)
                cache[key] = float(fd)
                if need_grid:
                    panels.append((f'teacher {steps} step(s)', grid_rows(x, y)))
                write_atomic(cache_path, json.dumps(cache, indent=1))
            out[name, steps, seed] = cache[key]
    return out


def pipeline(a):
    """digits -> teacher -> DE-CM (one run per seed) -> the teacher baselines and DE-CM samplers ->
    FD table (mean +- sd over seeds) in RUNS/pipeline.md (results/ with --publish)."""
    t0 = time.time()
    dev = resolve_device(a.device)
    os.makedirs(a.runs, exist_ok=True)
    teacher_dir, teacher_ckpt = train_teacher(a)
    t1 = time.time()
    decm_dirs = {s: os.path.join(a.runs, f'decm-s{s}') for s in a.seeds}
    jobs = [decm_argv(a, teacher_ckpt, decm_dirs[s], s, a.decm_steps) for s in a.seeds]
    for argv in jobs:
        check_run(argv[argv.index('--out') + 1], argv, a.decm_steps)
    if a.jobs > 1:
        logs = os.path.join(a.runs, 'logs', 'pipeline')
        failed = run_parallel([['train.py'] + argv for argv in jobs], a.jobs, logs)
        if failed:
            raise ValueError(f'{len(failed)} DE-CM run(s) failed: see {logs}')
    else:
        for argv in jobs:
            run_train(argv)
    t2 = time.time()

    cache_path = os.path.join(a.runs, 'fd.json')
    cache = load_json(cache_path)
    panels = []
    fds = {}                                                   # (row, nfe) -> [fd per seed]
    for k, v in teacher_fds(a, teacher_dir, a.seeds, dev, cache, cache_path, panels).items():
        fds.setdefault(k[:2], []).append(v)
    decm_rows = [('DE-CM, CM sampler', 'cm', 1), ('DE-CM, CM sampler', 'cm', 2), ('DE-CM, CM sampler', 'cm', 4),
                 ('DE-CM, Mix sampler', 'mix', 4)]
    for seed in tqdm(a.seeds, desc='pipeline: DE-CM samplers', dynamic_ncols=True):
        real2, real_y = real_pixels(2 * a.n, a.data, seed=100 + seed)
        real = real2[:a.n]
        fds.setdefault(('two sets of real data', '-'), []).append(
            fd_cached(cache, f'real|{seed}|{a.n}', lambda: pixel_fd(real2[a.n:].numpy(), real.numpy())))
        decm, stats_d, _ = sample.load_model(decm_dirs[seed], dev)
        for name, smp, nfe in decm_rows:
            key = f'{decm_dirs[seed]}|{smp}|{nfe}|{seed}|{a.n}' + (f'|t{a.mix_t:g}' if smp == 'mix' else '')
            grid = seed == a.seeds[0] and (smp, nfe) in [('cm', 1), ('cm', 2), ('mix', 4)]
            if key not in cache or grid:
                args = type('A', (), dict(mix_det=None, mix_t=a.mix_t))      # sample.py's --mix-det: nfe // 2
                fd, x, y = fd_of(decm, stats_d, smp, nfe, real, a.n, args, seed, dev)
                cache[key] = float(fd)
                if grid:
                    panels.append((f'DE-CM {smp} {nfe} NFE', grid_rows(x, y)))
                write_atomic(cache_path, json.dumps(cache, indent=1))
            fds.setdefault((name, nfe), []).append(cache[key])
        if seed == a.seeds[0]:
            panels.insert(0, ('real data', grid_rows(real, real_y[:a.n])))
    t3 = time.time()

    apg50 = fds['teacher, distilled velocity (APG)', 50]
    cfg_rows = [(w, fds[f'teacher, plain CFG w = {w:g}', 50]) for w in a.cfg_sweep]
    best_w, best_cfg = min(cfg_rows, key=lambda r: mean_sd(r[1])[0])
    base = [('the distilled-velocity teacher at 50 steps', apg50), (f'the best plain-CFG teacher at 50 steps '
            f'(w = {best_w:g})', best_cfg)]
    strongest_name, strongest = min(base, key=lambda b: mean_sd(b[1])[0])
    lines = [f'# The miniature pipeline: {len(a.seeds)} seed(s) {a.seeds}, {a.n} samples per FD', '',
             '| model / sampler | NFE | pixel FD (mean +- sd over seeds) | per seed |', '|---|---|---|---|']
    for (name, nfe), vals in fds.items():
        lines.append(f'| {name} | {nfe} | {pm(vals)} | {", ".join(f"{v:.2f}" for v in vals)} |')
    lines += ['', f'Ratios of DE-CM to each baseline (mean of the per-seed ratios +- sd; the strongest '
              f'baseline is {strongest_name}, {pm(strongest)}):', '',
              '| DE-CM sampler | NFE | / distilled-velocity teacher, 50 steps | / best plain CFG, 50 steps | '
              'differs from the strongest beyond noise? |', '|---|---|---|---|---|']
    ratios = {}
    for name, smp, nfe in decm_rows:
        vals = fds[name, nfe]
        r_apg = [v / b for v, b in zip(vals, apg50)]
        r_cfg = [v / b for v, b in zip(vals, best_cfg)]
        ratios[smp, nfe] = [v / b for v, b in zip(vals, strongest)]
        beyond = outside_noise(vals, strongest)
        lines.append(f'| {name} | {nfe} | {pm(r_apg)} | {pm(r_cfg)} | '
                     f'{("yes: " + ("worse" if mean_sd(vals)[0] > mean_sd(strongest)[0] else "better")) if beyond else "no"} |')
    r1 = mean_sd(ratios['cm', 1])[0]
    lines += ['', f'Headline: DE-CM at 1 NFE is {r1:.2f}x the FD of the strongest teacher baseline '
              f'({strongest_name}). "Beyond noise": the mean of the per-seed differences (paired by seed) is more than twice its standard '
              f'error over the {len(a.seeds)} seeds; the floor (two sets of real data) is '
              f'{pm(fds["two sets of real data", "-"])}.',
              f'Settings: teacher {a.teacher_steps} flow-matching iterations (batch {a.batch}, lr {a.teacher_lr:g}, '
              f'seed {a.teacher_seed}); DE-CM {a.decm_steps} iterations per seed (batch {a.decm_batch}, lr '
              f'{a.decm_lr:g}, w_cfg {a.w_cfg:g}, eta {a.eta:g}{", EMA warm-up" if a.ema_warmup else ""}, '
              f'r_max {a.decm_r_max:g}, t schedule {a.decm_schedule}{", " + " ".join(a.extra) if a.extra else ""}); '
              f'the Mix sampler switches at t = {a.mix_t:g} after 2 flow-map steps; '
              f'seed s trains DE-CM with seed s and samples every row with noise seed s against real subset s.',
              f'Time: teacher {t1 - t0:.0f} s, DE-CM {t2 - t1:.0f} s ({a.jobs} at a time), sampling and FD '
              f'{t3 - t2:.0f} s; total {t3 - t0:.0f} s on {dev} ({torch.get_num_threads()} threads).',
              f'Command: python bench.py {a.command}']
    write_atomic(os.path.join(a.runs, 'pipeline.md'), '\n'.join(lines) + '\n')
    write_atomic(os.path.join(a.runs, 'pipeline.json'), json.dumps(
        {'fd': [{'row': n, 'nfe': k, 'fd': v} for (n, k), v in fds.items()], 'seeds': a.seeds, 'n': a.n,
         'strongest': strongest_name, 'ratio_cm1': r1}, indent=1) + '\n')
    save_panels(os.path.join(a.runs, 'pipeline.png'), panels)
    if a.publish:
        os.makedirs(a.results, exist_ok=True)
        for f in ('pipeline.md', 'pipeline.json', 'pipeline.png'):
            shutil.copyfile(os.path.join(a.runs, f), os.path.join(a.results, f))
    print('\n'.join(lines))


# ----------------------------------------------------------------------------- study
# What closes the gap to the teacher: each configuration is the pipeline's DE-CM run plus these flags.
STUDY = [
    ('base', 'the pipeline before the study (lr 3e-4, batch 64, constant w1)', ['--lr', '3e-4']),
    ('lr1e-3', 'higher learning rate', ['--lr', '1e-3']),
    ('lr1e-3-cosine', 'lr 1e-3, warm-up 100, cosine decay to 0', ['--lr', '1e-3', '--lr-schedule', 'cosine', '--warmup', '100']),
    ('facm', "FACM's CM target: w1(t) = 1 - t^0.5, g clipped to [-1, 1], loss weight cos(pi t / 2)",
     ['--w1-power', '0.5', '--g-clip', '1', '--cm-weight', 'cos']),
    ('facm-lr1e-3', 'facm and lr 1e-3', ['--w1-power', '0.5', '--g-clip', '1', '--cm-weight', 'cos', '--lr', '1e-3']),
    ('w1-relax', 'w1(t) = 1 - t^0.5 alone', ['--w1-power', '0.5']),
    ('g-clip', 'g clipped to [-1, 1] alone', ['--g-clip', '1']),
    ('cm-cos', 'CM loss weight cos(pi t / 2) alone', ['--cm-weight', 'cos']),
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
    ('lr1e-3-emawarm-facm', 'lr 1e-3, EMA warm-up, facm', ['--lr', '1e-3', '--ema-warmup', '--w1-power', '0.5',
                                                            '--g-clip', '1', '--cm-weight', 'cos']),
    ('ew-p0', 'lr 1e-3, EMA warm-up, plain L2 (p = 0)', ['--lr', '1e-3', '--ema-warmup', '--p', '0']),
    ('ew-seg4', 'lr 1e-3, EMA warm-up, N = 4 segments', ['--lr', '1e-3', '--ema-warmup', '--segments', '4']),
    ('ew-cosine', 'lr 1e-3 with cosine decay to 0 at the end of the run, EMA warm-up',
     ['--lr', '1e-3', '--ema-warmup', '--lr-schedule', 'cosine']),
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
    ('ew-rmax0.2-b128', 'lr 1e-3, EMA warm-up, r_max 0.2, batch 128 (study part H ran it from a copy of the '
     'ew-rmax0.2-ema0.999 runs at 2,400 iterations)', ['--lr', '1e-3', '--ema-warmup', '--r-max', '0.2', '--batch', '128']),
    ('b256-lr2e-3', 'batch 256, lr 2e-3', ['--batch', '256', '--lr', '2e-3']),
    ('b256-lr1e-3-facm', 'batch 256, lr 1e-3, facm', ['--batch', '256', '--lr', '1e-3', '--w1-power', '0.5',
                                                      '--g-clip', '1', '--cm-weight', 'cos']),
    ('b256-lr1e-3-ema0.999', 'batch 256, lr 1e-3, EMA 0.999', ['--batch', '256', '--lr', '1e-3', '--ema', '0.999']),
]


def study_one(a, name, seed, teacher_ckpt, dev):
    """One (configuration, seed): train in chunks up to each evaluation step, evaluate the EMA weights."""
    flags = dict((n, f) for n, _, f in STUDY)[name]
    out = os.path.join(a.runs, f'{name}-s{seed}')
    evals_path = os.path.join(out, 'evals.json')
    evals = load_json(evals_path)
    real = real_pixels(a.n, a.data, seed=100 + seed)[0]
    for step in a.eval_at:
        if str(step) in evals:
            continue
        if a.stop_at and time.time() > a.stop_at:
            break
        a2 = copy.copy(a)
        a2.extra = list(a.extra) + flags
        run_train(decm_argv(a2, teacher_ckpt, out, seed, step))
        if train.latest_checkpoint(out) is None:
            break
        ckpt = train.load_student_checkpoint(train.latest_checkpoint(out))
        if ckpt['step'] < step:                                # stopped early (SIGTERM)
            break
        model, stats, _ = sample.load_model(out, dev)
        evals[str(step)] = {f'{smp}{nfe}': float(fd_of(model, stats, smp, nfe, real, a.n, None, seed, dev)[0])
                            for smp, nfe in (('cm', 1), ('cm', 2), ('mix', 4))}
        for t in a.mix_ts:                                     # the Mix switch at other times (key mix4_t<t>)
            args = type('A', (), dict(mix_det=None, mix_t=t))
            evals[str(step)][f'mix4_t{t:g}'] = float(fd_of(model, stats, 'mix', 4, real, a.n, args, seed, dev)[0])
        raw, _, _ = sample.load_model(out, dev, use='model')   # the weights without the EMA, CM 1 NFE
        evals[str(step)]['cm1_raw'] = float(fd_of(raw, stats, 'cm', 1, real, a.n, None, seed, dev)[0])
        os.makedirs(out, exist_ok=True)
        write_atomic(evals_path, json.dumps(evals, indent=1))


def study(a):
    """Every configuration of STUDY x every seed, evaluated at each of --eval-at; results/study.md + .png."""
    dev = resolve_device(a.device)
    os.makedirs(a.runs, exist_ok=True)
    teacher_dir, teacher_ckpt = train_teacher(a)
    if a.one:                                                  # one job of the pool below
        name, seed = a.one.rsplit(':', 1)
        if name == 'teacher':
            cache_path = os.path.join(a.runs, 'teacher_fd.json')
            teacher_fds(a, teacher_dir, a.seeds, dev, load_json(cache_path), cache_path)
        else:
            study_one(a, name, int(seed), teacher_ckpt, dev)
        return
    names = [n for n, _, _ in STUDY] if a.configs == ['all'] else a.configs
    unknown = [n for n in names if n not in dict((n, d) for n, d, _ in STUDY)]
    if unknown:
        raise ValueError(f'--configs: unknown {unknown} (choose from {[n for n, _, _ in STUDY]} or all)')
    decaying = [n for n, _, f in STUDY if n in names and 'cosine' in f]
    if decaying and len(a.eval_at) > 1:                        # each chunk is a run of --steps = its eval step
        raise ValueError(f'--configs {" ".join(decaying)}: a cosine schedule decays to 0 at the end of the run, so '
                         f'it needs one --eval-at (the run length), not {len(a.eval_at)}')
    common = ['bench.py', 'study', '--runs', a.runs, '--skip-teacher'] + (['--data', a.data] if a.data else []) + ['--n', str(a.n), '--device', a.device,
              '--amp', a.amp, '--eval-at', *map(str, a.eval_at), '--seeds', *map(str, a.seeds),
              '--decm-batch', str(a.decm_batch), '--decm-lr', str(a.decm_lr), '--w-cfg', str(a.w_cfg),
              '--eta', str(a.eta), '--cfg-sweep', *map(str, a.cfg_sweep), '--mix-ts', *map(str, a.mix_ts)]
    if a.stop_after:
        common += ['--stop-at', str(time.time() + a.stop_after)]
    jobs = [common + ['--one', 'teacher:0']]
    jobs += [common + ['--one', f'{n}:{s}'] for s in a.seeds for n in names]   # seeds in turn: a stopped
    # study has every configuration at the same seeds
    failed = run_parallel(jobs, a.jobs, os.path.join(a.runs, 'logs', 'study'),
                          deadline=time.time() + a.stop_after + 30 if a.stop_after else None)
    study_report(a, names, failed)


def study_report(a, names, failed=()):
    tfd = load_json(os.path.join(a.runs, 'teacher_fd.json'))
    ref = {s: tfd.get(f'teacher, distilled velocity (APG)|50|{s}|{a.n}') for s in a.seeds}
    cfg = {w: [tfd.get(f'teacher, plain CFG w = {w:g}|50|{s}|{a.n}') for s in a.seeds] for w in a.cfg_sweep}
    desc = dict((n, (d, f)) for n, d, f in STUDY)
    lines = ['# What closes the gap: the study', '',
             f'Each configuration is the pipeline\'s DE-CM run (batch {a.decm_batch}, lr {a.decm_lr:g}, w_cfg '
             f'{a.w_cfg:g}, eta {a.eta:g}, the pipeline\'s teacher) plus its flags, trained with seeds {a.seeds}; '
             f'the EMA weights are evaluated at {a.eval_at} iterations with {a.n} samples per FD (sampling seed = '
             f'training seed, real subset = seed). Ratio = DE-CM FD / the FD of the teacher at 50 steps on the '
             f'distilled velocity (APG) with the same seed: {pm(list(ref.values()))}.',
             'Plain CFG teacher at 50 steps: ' + '; '.join(f'w = {w:g}: {pm(v)}' for w, v in cfg.items()) + '.', '',
             '## Summary (mean +- sd over seeds of the ratio, at the last step every seed reached)', '',
             '| configuration | flags | step | CM 1 NFE | CM 2 NFE | Mix 4 NFE |', '|---|---|---|---|---|---|']
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
            curves[k][n] = [(st, mean_sd([ev[s][str(st)][k] / ref[s] for s in a.seeds])[0]) for st in steps]
        if steps:
            st = steps[-1]
            r = {k: [ev[s][str(st)][k] / ref[s] for s in a.seeds] for k in curves}
            summary.append((mean_sd(r['cm1'])[0], f'| {n} | {" ".join(desc[n][1]) or "-"} | {st} | {pm(r["cm1"], 3)} | '
                            f'{pm(r["cm2"], 3)} | {pm(r["mix4"], 3)} |'))
        else:
            summary.append((float('inf'), f'| {n} | {" ".join(desc[n][1]) or "-"} | not reached | | | |'))
    lines += [row for _, row in sorted(summary, key=lambda r: r[0])]
    lines += ['', 'Configurations: ' + '; '.join(f'**{n}**: {desc[n][0]}' for n in names) + '.']
    if failed:
        lines += ['', f'{len(failed)} job(s) failed or were stopped (see {os.path.join(a.runs, "logs", "study")}).']
    lines += every + ['', f'Command: python bench.py {a.command}']
    os.makedirs(a.results, exist_ok=True)
    write_atomic(os.path.join(a.results, 'study.md'), '\n'.join(lines) + '\n')
    line_plot(os.path.join(a.results, 'study.png'),
              [(f'DE-CM {lab} / teacher 50 steps (APG), mean over seeds', 'training iterations', curves[k])
               for k, lab in (('cm1', 'CM 1 NFE'), ('cm2', 'CM 2 NFE'), ('mix4', 'Mix 4 NFE'))],
              ylabel='FD ratio (log)')
    print('\n'.join(lines[:len(lines) - len(every)]))


# ----------------------------------------------------------------------------- tables (Table 3 and 4)
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
         'o': 'freq 5'}
# Settings that do not change what a run computes (checked when an existing run folder is reused; a run
# folder may be moved or copied, so its --out is not checked either).
RUN_FLAGS_IGNORED = {'out', 'steps', 'resume', 'loss_set', 'log_every', 'ckpt_every', 'keep', 'workers', 'nan_patience',
                     'threads', 'eval_every', 'eval_samples', 'vae', 'fid_ref', 'inception'}


def table3_sampler(key, step):
    """The sampler of one Table 3 cell: teachers use their Euler sampler, students the CM sampler at
    1/2/4 NFE and the Euler ODE sampler at 50 (the paper's STEP=50 column)."""
    if key in ('a', 'b', 'b*'):
        return 'teacher'
    return 'euler' if step == 50 else 'cm'


def check_run(out, argv, steps):
    """An existing run in `out` must have been made with the same train.py flags (all but --steps) and
    no more than `steps` iterations; otherwise resuming it would mix two experiments."""
    last = train.latest_checkpoint(out)
    if last is None or not os.path.exists(last):
        return
    ckpt = train.load_student_checkpoint(last)
    want = {k: v for k, v in vars(train.parse_args(argv)).items() if k not in RUN_FLAGS_IGNORED}
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


# The orderings README reads from the tables: (first, second, what the comparison is about).
T3_PAIRS = [('g', 'e', 'N2N added to FM + CD'), ('e', 'd', 'FM added to CD'), ('e', 'c', 'CD added to FM'),
            ('f', 'g', 'FM + N2N against the full model'), ('h', 'i', 'velocity normalisation on / off'),
            ('j', 'k', 'uniform-with-N-seg against arctan'), ('j', 'l', 'uniform-with-N-seg against logit-normal'),
            ('n', 'm', 'freq 3 against freq 1'), ('n', 'o', 'freq 3 against freq 5')]
T4_PAIRS = [('mix', 'cm', 'Mix against CM'), ('mix', 'euler', 'Mix against Euler ODE')]
TEACHER_ROWS = {'a': ('cfg', 1.0), 'b': ('cfg', None), 'b*': ('apg', None)}   # None: --w-cfg


def ordering(first, second):
    """'better' / 'worse' (first against second, lower FD is better) when the difference of the means is
    outside the noise (outside_noise), else 'within noise'."""
    if not outside_noise(first, second):
        return 'within noise'
    return 'better' if mean_sd(first)[0] < mean_sd(second)[0] else 'worse'


def tables(a):
    """Table 3 (a)-(o) and Table 4 in miniature: one teacher, every variant of --rows distilled from it with
    each of --seeds, every cell a pixel FD per seed (mean +- sd), the orderings README discusses tested
    against the seed noise -> results/tables.md/.json/.png and tables_samples/."""
    quick = a.quick
    train.set_threads(a.threads)
    a.teacher_steps = a.teacher_steps or (200 if quick else 1500)
    a.decm_steps = a.decm_steps or (8 if quick else 200)
    a.n = a.n or (200 if quick else 1000)
    a.seeds = a.seeds or ([0] if quick else [0, 1, 2])
    a.runs = a.runs or ('runs/tables-quick' if quick else 'runs/tables')
    name = 'tables_quick' if quick else 'tables'
    os.makedirs(a.results, exist_ok=True)
    if a.n < 2:
        raise ValueError(f'--n {a.n}: need at least 2 samples per FD')
    all_runs = {k: flags for k, _, _, flags in TABLE3 if isinstance(flags, list)}
    keys = a.rows or list(all_runs)
    bad = [k for k in keys if k not in all_runs]
    if bad or 'g' not in keys:
        raise ValueError(f'--rows {" ".join(keys)}: give rows from {" ".join(all_runs)}, with g (the full model: '
                         'Table 4 and rows h, j, n)' + (f'; unknown: {" ".join(bad)}' if bad else ''))
    runs = {k: all_runs[k] for k in all_runs if k in keys}
    table3 = TABLE3[:2] + [('b*', 'Training Objectives', 'Baseline Teacher, distilled velocity', None)] + TABLE3[2:]
    shown = [k for k, _, _, flags in table3 if k in TEACHER_ROWS or k in runs or (isinstance(flags, str) and flags in runs)]
    data = ['--data', a.data] if a.data else []
    t0 = time.time()

    # 1. the teacher, then every variant from it, for every seed (same budget; seed s for run and sampling)
    if a.teacher:
        teacher_ckpt = resolve_checkpoint(a.teacher)
    else:
        teacher_dir = os.path.join(a.runs, 'teacher')
        argv = ['--seed', str(a.seeds[0]), '--batch', str(a.batch)] + data + [
            '--losses', 'fm', '--teacher', 'none', '--out', teacher_dir, '--steps', str(a.teacher_steps),
            '--lr', str(a.teacher_lr), '--resume', 'auto']
        check_run(teacher_dir, argv, a.teacher_steps)
        print(f'tables: training the teacher ({a.teacher_steps} iterations)', flush=True)
        run_train(argv)
        teacher_ckpt = train.latest_checkpoint(teacher_dir)
    t1 = time.time()
    run_dir = lambda k, s: os.path.join(a.runs, f'{k}-s{s}')
    jobs = []
    for s in a.seeds:
        for key, flags in runs.items():
            argv = ['--seed', str(s), '--batch', str(a.batch)] + data + [
                '--teacher', teacher_ckpt, '--out', run_dir(key, s), '--steps', str(a.decm_steps), '--lr',
                str(a.decm_lr), '--w-cfg', str(a.w_cfg), '--eta', str(a.eta), '--resume', 'auto', '--keep', '1'] + \
                (['--ema-warmup'] if a.ema_warmup else []) + flags
            check_run(run_dir(key, s), argv, a.decm_steps)
            jobs.append(argv)
    if a.jobs > 1:
        logs = os.path.join(a.runs, 'logs')
        failed = run_parallel([['train.py'] + argv for argv in jobs], a.jobs, logs)
        if failed:
            raise ValueError(f'{len(failed)} variant run(s) failed: see {logs}')
    else:
        for argv in tqdm(jobs, desc='tables: training the variants', dynamic_ncols=True):
            run_train(argv)
    t2 = time.time()

    # 2. pixel FD of every cell and seed (cached in RUNS/fd.json: the command resumes); grids of seed 0
    teacher, t_stats, _ = sample.load_model(teacher_ckpt)
    if t_stats is None:
        raise ValueError(f'{teacher_ckpt} has no data statistics: tables needs a teacher trained by train.py')
    cells = [(k, table3_sampler(k, s), s) for k in list(TEACHER_ROWS) + list(runs) for s in T3_STEPS]
    cells += [('g', smp, nfe) for smp, _, _ in PAPER_T4 for nfe in T4_NFE]
    cells = list(dict.fromkeys(cells))                         # (g, cm, 4) is in both tables
    cache_path = os.path.join(a.runs, 'fd.json')
    cache = load_json(cache_path)
    fd, floor = {}, []                                         # (row, sampler, nfe) -> [FD per seed]
    panels = {k: [] for k in list(TEACHER_ROWS) + list(runs)}
    t4_panels = {}
    bar = tqdm(total=len(cells) * len(a.seeds), desc='tables: sampling + FD', dynamic_ncols=True)
    for s in a.seeds:
        real2, real_y = real_pixels(2 * a.n, a.data, seed=100 + s)
        real = real2[:a.n]
        floor.append(fd_cached(cache, f'real|{s}|{a.n}', lambda: pixel_fd(real2[a.n:].numpy(), real.numpy())))
        grids = s == a.seeds[0]
        if grids:
            for k in panels:
                panels[k].append(('real data', grid_rows(real, real_y[:a.n])))
        models = {}
        for key, smp, nfe in cells:
            cache_key = f'{key}|{smp}|{nfe}|{s}|{a.n}'
            is_t3 = nfe in T3_STEPS and smp == table3_sampler(key, nfe)
            is_t4 = key == 'g' and nfe in (T4_NFE[0], T4_NFE[-1])
            grid_path = os.path.join(a.runs, 'grids', f'{key}-{smp}-{nfe}-{a.n}.pt')   # seed 0's panels
            if grids and (is_t3 or is_t4) and cache_key in cache and os.path.exists(grid_path):
                x, y = torch.load(grid_path).values()
                if is_t3:
                    panels[key].append((f'{smp} {nfe}', grid_rows(x, y)))
                if is_t4:
                    t4_panels[smp, nfe] = (f'{smp} {nfe}', grid_rows(x, y))
            elif cache_key not in cache or (grids and (is_t3 or is_t4)):
                if key in TEACHER_ROWS:
                    guidance, w = TEACHER_ROWS[key]
                    targs = type('A', (), dict(cfg=a.w_cfg if w is None else w, cfg_interval_start=0.0, shift=0.0,
                                               guidance=guidance, eta=a.eta))
                    value, x, y = fd_of(teacher, t_stats, 'teacher', nfe, real, a.n, targs, s)
                else:
                    if key not in models:
                        models[key] = sample.load_model(run_dir(key, s))
                    model, stats, _ = models[key]
                    value, x, y = fd_of(model, stats, smp, nfe, real, a.n, None, s)
                cache[cache_key] = float(value)
                write_atomic(cache_path, json.dumps(cache, indent=1))
                if grids and (is_t3 or is_t4):                 # the panel's samples: a resumed command reuses them
                    os.makedirs(os.path.dirname(grid_path), exist_ok=True)
                    torch.save({'x': x[:500], 'y': y[:500]}, grid_path)
                if grids and is_t3:
                    panels[key].append((f'{smp} {nfe}', grid_rows(x, y)))
                if grids and is_t4:
                    t4_panels[smp, nfe] = (f'{smp} {nfe}', grid_rows(x, y))
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
        save_panels(os.path.join(sample_dir, f'{key.replace("*", "_apg")}.png'), p)
    alias = {k: flags for k, _, _, flags in TABLE3 if isinstance(flags, str)}
    row3 = lambda k: [fd[alias.get(k, k), table3_sampler(k, s), s] for s in T3_STEPS]
    mean = lambda vals: mean_sd(vals)[0]
    labels = {'a': 'teacher, no CFG', 'b': f'teacher, CFG w = {a.w_cfg:g}', 'b*': 'teacher, distilled velocity'}
    plot3 = {f'({k}) {labels.get(k) or SHORT[k]}': [(st, mean(v)) for st, v in zip(T3_STEPS, row3(k))]
             for k in list(TEACHER_ROWS) + list(runs)}
    plot4 = {label: [(n, mean(fd['g', smp, n])) for n in T4_NFE] for smp, label, _ in PAPER_T4}
    line_plot(os.path.join(a.results, name + '.png'), [
        (f'Table 3: CM sampler at 1/2/4 NFE, Euler ODE at 50 (mean of {len(a.seeds)} seeds)',
         'NFE (teachers: Euler steps)', plot3),
        ('Table 4, full model (g): samplers', 'NFE', plot4)])
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
    lines += ['', '## Orderings against the noise', '',
              f'Each cell: the first row against the second, by the mean over the {len(a.seeds)} seeds: "better" '
              f'or "worse" when the mean of the per-seed differences (paired by seed) is more than twice its standard error, else "within '
              f'noise" (one seed: nothing is outside the noise). The paper\'s ordering in brackets.', '',
              '| first / second | STEP=1 | STEP=2 | STEP=4 | STEP=50 |', '|---|---|---|---|---|']
    paper_order = lambda x, y: 'better' if x < y else 'worse' if x > y else 'equal'
    for first, second, what in T3_PAIRS:
        if first not in shown or second not in shown:
            continue
        lines.append(f'| ({first}) / ({second}): {what} | ' + ' | '.join(
            f'{ordering(f, s_)} ({paper_order(pf, ps)})' for f, s_, pf, ps in
            zip(row3(first), row3(second), PAPER_T3[first], PAPER_T3[second])) + ' |')
    paper4 = {smp: p for smp, _, p in PAPER_T4}
    lines += ['', '| Table 4, first / second | NFE=4 | NFE=8 | NFE=12 | NFE=16 |', '|---|---|---|---|---|']
    for first, second, what in T4_PAIRS:
        lines.append(f'| {what} | ' + ' | '.join(
            f'{ordering(fd["g", first, n], fd["g", second, n])} ({paper_order(pf, ps)})'
            for n, pf, ps in zip(T4_NFE, paper4[first], paper4[second])) + ' |')
    mix = 'half of the NFE as deterministic flow-map steps up to t = 0.25, then CM steps (sample.py defaults)'
    teacher_of = (f'teacher {a.teacher_steps} FM iterations (lr {a.teacher_lr:g}, seed {a.seeds[0]})' if not a.teacher
                  else f'teacher {teacher_ckpt} (given)')
    lines += ['', f'Mix sampler: {mix}.', '',
              f'Budget: {teacher_of}; each variant {a.decm_steps} DE-CM iterations (lr {a.decm_lr:g}, CFG w '
              f'{a.w_cfg:g}, eta {a.eta:g}{", EMA warm-up" if a.ema_warmup else ", constant EMA 0.995"}), batch {a.batch}. The paper trains 250 epochs on ImageNet; here the rows compare short '
              f'distillation runs, not converged models (`--quick`: 200 / 8 iterations, n = 200, one seed).',
              f'Time: teacher {t1 - t0:.0f} s, variants {t2 - t1:.0f} s ({len(jobs)} runs, {a.jobs} at a time), '
              f'sampling and FD {t3 - t2:.0f} s; total {time.time() - t0:.0f} s on {torch.get_num_threads()} '
              f'thread(s).',
              f'Runs: {a.runs}/<row>-s<seed>. Plot: {name}.png. Sample grids of seed {a.seeds[0]}: '
              f'{name}_samples/<row>.png (rows: classes; panels: the cells of the row; b_apg is (b*)) and '
              f'{name}_samples/table4.png.',
              f'Command: python bench.py {a.command}']
    write_atomic(os.path.join(a.results, name + '.md'), '\n'.join(lines) + '\n')
    raw = {'floor': floor, 'n': a.n, 'seeds': a.seeds, 'teacher': teacher_ckpt,
           'fd': [{'row': k, 'sampler': s, 'nfe': n, 'fd': v} for (k, s, n), v in fd.items()]}
    write_atomic(os.path.join(a.results, name + '.json'), json.dumps(raw, indent=1) + '\n')
    print('\n'.join(lines))


# ----------------------------------------------------------------------------- capacity probe
def regress(a):
    """How good can a one-step student of this architecture be? The same network, started from the
    teacher as in Alg. 1 l.1, is fit by plain regression to the teacher's own ODE map: F(z, 0, 1) = x - z
    for --pairs (noise z, the teacher's --ode-steps Euler solution x on the distilled velocity). Its 1-NFE
    FD is the target of DE-CM's CM loss at t = 0 reached by brute force; if it stays above the teacher,
    the gap is the network's, not the objective's. Writes RUNS/regress.md and regress.json."""
    train.set_threads(a.threads)
    t0 = time.time()
    dev = torch.device('cpu')
    teacher, stats, tpath = sample.load_model(a.teacher)
    if stats is None or teacher.s_embedder is not None:
        raise ValueError(f'--teacher {a.teacher}: need a flow-matching teacher trained by train.py')
    os.makedirs(a.runs, exist_ok=True)
    pairs_path = os.path.join(a.runs, f'pairs_{a.pairs}_{a.ode_steps}.pt')
    if os.path.exists(pairs_path):
        z, y, x = torch.load(pairs_path).values()
    else:                                                      # noise seeds 1000+: none of the FD seeds
        targs = type('A', (), dict(cfg=a.w_cfg, cfg_interval_start=0.0, shift=0.0, guidance='apg', eta=a.eta))
        zs, ys, xs = [], [], []
        for b in tqdm(range(0, a.pairs, 500), desc='regress: teacher ODE pairs', dynamic_ncols=True):
            g = torch.Generator().manual_seed(1000 + b)
            zb = torch.randn((min(500, a.pairs - b), teacher.in_channels, teacher.input_size, teacher.input_size),
                             generator=g)
            yb = torch.arange(b, b + len(zb)) % teacher.num_classes
            zs.append(zb), ys.append(yb), xs.append(sample.run_sampler(teacher, 'teacher', zb, yb, a.ode_steps,
                                                                      args=targs))
        z, y, x = torch.cat(zs), torch.cat(ys), torch.cat(xs)
        torch.save({'z': z, 'y': y, 'x': x}, pairs_path)
    t1 = time.time()
    torch.manual_seed(a.seed)
    student = student_from_teacher(teacher).train().requires_grad_(True)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.0)
    ema_args = type('A', (), dict(ema=0.995, ema_warmup=True))
    reals = {s: real_pixels(a.n, a.data, seed=100 + s)[0] for s in a.seeds}
    ref = load_json(os.path.join(a.teacher_fd)) if a.teacher_fd else {}
    rows, gen = [], torch.Generator().manual_seed(a.seed)
    for step in tqdm(range(1, max(a.eval_at) + 1), desc='regress: fitting F(z, 0, 1) = x - z', dynamic_ncols=True):
        idx = torch.randint(0, len(z), (a.batch,), generator=gen)
        zb, yb, xb = z[idx], y[idx], x[idx]
        out = student(zb, torch.zeros(len(zb)), torch.ones(len(zb)), yb)
        loss = (out - (xb - zb)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            torch._foreach_lerp_(list(ema.parameters()), list(student.parameters()), 1 - train.ema_decay(step - 1, ema_args))
        if step in a.eval_at:
            fds = [float(fd_of(ema, stats, 'cm', 1, reals[s], a.n, None, s, dev)[0]) for s in a.seeds]
            base = [ref.get(f'teacher, distilled velocity (APG)|50|{s}|{a.n}') for s in a.seeds]
            ratio = [f / b for f, b in zip(fds, base)] if all(base) else None
            rows.append({'step': step, 'loss': float(loss), 'fd': fds, 'ratio': ratio})
    lines = [f'# Capacity probe: the one-step student fit to the teacher\'s ODE map by regression', '',
             f'{a.pairs} pairs (noise, the teacher\'s {a.ode_steps}-step Euler ODE on the distilled velocity, w '
             f'{a.w_cfg:g}, eta {a.eta:g}); the student (the teacher plus its zero-initialised s branch) fit by '
             f'MSE on F(z, 0, 1) = x - z, batch {a.batch}, lr {a.lr:g}, AdamW, EMA 0.995 with warm-up; CM sampler '
             f'at 1 NFE, pixel FD of {a.n} samples per seed {a.seeds} (noise seed s, real subset s).', '',
             '| iterations | last batch loss | 1-NFE FD (mean +- sd) | / distilled-velocity teacher, 50 steps |',
             '|---|---|---|---|']
    for r in rows:
        lines.append(f'| {r["step"]} | {r["loss"]:.4f} | {pm(r["fd"])} | {pm(r["ratio"]) if r["ratio"] else "-"} |')
    lines += ['', f'Time: pairs {t1 - t0:.0f} s, fit and FD {time.time() - t1:.0f} s ({torch.get_num_threads()} '
              f'thread(s)).', f'Command: python bench.py {a.command}']
    write_atomic(os.path.join(a.runs, 'regress.md'), '\n'.join(lines) + '\n')
    write_atomic(os.path.join(a.runs, 'regress.json'), json.dumps(rows, indent=1) + '\n')
    print('\n'.join(lines))


# ----------------------------------------------------------------------------- Mix sampler sweep
def mix_sweep(a):
    """Pixel FD of the Mix sampler at --nfe for every --mix-det (0 = the CM sampler) and --mix-t. With
    --seeds, checkpoint k (of a run trained with seed k, say) samples with noise seed --seeds[k] against real
    subset --seeds[k], as the pipeline does, and each cell is the mean +- sd over them. Prints a markdown table."""
    train.set_threads(a.threads)
    t0 = time.time()
    seeds = a.seeds or list(range(len(a.ckpt)))
    if len(seeds) != len(a.ckpt):
        raise ValueError(f'--seeds {" ".join(map(str, seeds))}: give one seed per --ckpt ({len(a.ckpt)})')
    runs = []
    for ckpt, s in zip(a.ckpt, seeds):
        model, stats, path = sample.load_model(ckpt)
        if model.s_embedder is None:
            raise ValueError(f'--ckpt {ckpt} is a flow-matching teacher: the Mix sampler needs a DE-CM checkpoint')
        runs.append((model, stats, path, s, real_pixels(a.n, a.data, seed=100 + s)[0]))

    ref = load_json(a.teacher_fd) if a.teacher_fd else {}
    base = [ref.get(f'teacher, distilled velocity (APG)|50|{s}|{a.n}') for s in seeds]
    if a.teacher_fd and not all(base):
        raise ValueError(f'--teacher-fd {a.teacher_fd}: no distilled-velocity teacher FD at 50 steps for seeds '
                         f'{seeds} and --n {a.n}; run the pipeline or bench.py study with these first')

    def cell(det, t):                                          # (FD cell, ratio cell) over the seeds
        args = type('A', (), dict(mix_det=det, mix_t=t))
        fds = [float(fd_of(m, st, 'mix', a.nfe, real, a.n, args, s)[0]) for m, st, _, s, real in runs]
        if not a.teacher_fd:
            return pm(fds), ''
        beyond = outside_noise(fds, base)                      # paired by seed against the teacher
        verdict = ('; ' + ('worse' if mean_sd(fds)[0] > mean_sd(base)[0] else 'better')) if beyond else ''
        return pm(fds), pm([f / b for f, b in zip(fds, base)], 3) + verdict

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
        rows += ['', 'The same cells as ratios to the distilled-velocity teacher at 50 steps (FDs ' +
                 ', '.join(f'{b:.3f}' for b in base) + f' from {a.teacher_fd}; mean of the per-seed ratios +- sd; '
                 '"worse"/"better": the paired difference is beyond twice its standard error):', ''] + ratio_rows
    print('\n'.join(rows))


# ----------------------------------------------------------------------------- speed
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
    teacher = DiT(preset, in_channels=C, input_size=H, num_classes=K, s_embed=False)
    with torch.no_grad():                                      # adaLN-Zero and the output layer start at 0
        for p in teacher.parameters():
            p.add_(0.02 * torch.randn_like(p))
    teacher = teacher.to(dev).eval().requires_grad_(False)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == 'cuda')   # train.py's --amp auto
    x_ref = torch.randn(B, C, H, H, device=dev)
    y = torch.randint(0, K, (B,), device=dev)
    res = {'params': count_params(student_from_teacher(teacher))}
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
                train.train_step(model, ema, teacher if with_teacher else None, opt, (x_ref, y), state['it'],
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

    def update():                                              # train.update after its backward
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
    """bench.py speed --jvp-steps: the CM step (fused JVP + backward through its primal), eager and
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
            losses.cm_loss(m, x, t, y, v, compiled=compiled)[0].backward()

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
    lines += ['', f'Command: python bench.py {a.command}']
    write_atomic(os.path.join(a.results, 'jvp_steps.md'), '\n'.join(lines) + '\n')
    write_atomic(os.path.join(a.results, 'jvp_steps.json'), json.dumps(raw, indent=1) + '\n')
    print('\n'.join(lines))


def speed(a):
    if a.batch < 1 or a.repeats < 1 or a.freq < 1:
        raise ValueError('--batch, --repeats and --freq must be at least 1')
    dev = torch.device('cuda' if a.device == 'auto' and torch.cuda.is_available() else
                       ('cpu' if a.device == 'auto' else a.device))
    if a.threads > 0:
        torch.set_num_threads(a.threads)
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
              f'Command: python bench.py {a.command}']
    for p, r in out.items():
        for title, table in r['profile']:
            lines += ['', f'## Profile ({p}): {title}, top ops by self '
                      f'{"CUDA" if dev.type == "cuda" else "CPU"} time', '', '```', table.rstrip(), '```']
    write_atomic(os.path.join(a.results, 'speed.md'), '\n'.join(lines) + '\n')
    raw = {p: {k: v for k, v in r.items() if k != 'profile'} for p, r in out.items()}
    write_atomic(os.path.join(a.results, 'speed.json'), json.dumps(raw, indent=1) + '\n')
    print('\n'.join(lines))


# ----------------------------------------------------------------------------- gpu
class OverBudget(Exception):
    """A measurement stopped by the time limit (`bench.py gpu --budget`)."""


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
    with torch.device(dev):
        teacher = DiT(a.preset, in_channels=32, input_size=16, num_classes=1000, s_embed=False).to(dev)
        with torch.no_grad():                                  # non-zero adaLN: realistic work everywhere
            for p in teacher.parameters():
                p.add_(1e-3 * torch.randn_like(p))
        teacher.eval().requires_grad_(False)
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
            loss = losses.fm_loss(student, x_t, t, y, v, args.p, args.c)
        loss.backward()

    def cm_step(dtype, compiled=False):                        # Alg.1 l.8-11 + backward (fused JVP)
        student.zero_grad(set_to_none=True)
        loss, _ = losses.cm_loss(student, x_t, t, y, v, args.w1, args.p, args.c, True, dtype, compiled)
        loss.backward()

    def n2n_step(dtype):                                       # Alg.1 l.22-25 + backward (fused JVP)
        student.zero_grad(set_to_none=True)
        loss, _ = losses.n2n_loss(student, x_r, r, t, y, v, v, args.lam, args.gam, args.w2, args.p, args.c,
                                  True, dtype)
        loss.backward()

    def iterations(jvp_dtype, model_teacher=None, compile_jvp=False):   # train.train_step, freq iterations
        run_args = copy.copy(args)
        run_args.jvp_dtype, run_args.compile_jvp = jvp_dtype, compile_jvp

        def fn():
            for _ in range(args.freq):
                state['it'] += 1
                _, ok = train.train_step(student, ema, teacher if model_teacher is None else model_teacher, opt, (inp['x_ref'], y),
                                         state['it'], run_args, 1, autocast)
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
    """bench.py gpu: the XL/1 passes on the GPU (see gpu_report for the table)."""
    t_start = time.perf_counter()
    dev = torch.device('cuda' if a.device == 'auto' and torch.cuda.is_available() else
                       ('cpu' if a.device == 'auto' else a.device))
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise ValueError('--device cuda: no CUDA device is visible (give --device cpu for a dry run)')
    if a.budget <= 0 or a.repeats < 1 or a.max_batch < 1 or a.batch < 0:
        raise ValueError('--budget, --repeats and --max-batch must be positive, --batch at least 0')
    if a.preset not in train.PRESETS:
        raise ValueError(f'--preset {a.preset}: unknown (choose from {", ".join(train.PRESETS)})')
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
                command='python bench.py ' + a.command)
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
    info['params'] = count_params(student)
    if dev.type == 'cuda':
        info['device_memory'] = torch.cuda.get_device_properties(dev).total_memory
    info['state_bytes'] = torch.cuda.memory_allocated(dev) if dev.type == 'cuda' else None
    tick('models')

    # 1. the largest batch for which a DE-CM iteration with both updates (N2N at this step) fits
    def fits(B):
        inp = gpu_inputs(B, dev, args)
        try:
            train.train_step(student, ema, teacher, opt, (inp['x_ref'], inp['y']), 0, args, 1, autocast)
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


def gpu_report(results, info, rows):
    """results/gpu.md and gpu.json from the rows measured so far; returns the markdown."""
    ms = lambda s: f'{1e3 * s:.1f}'
    gib = lambda b: '-' if b is None else f'{b / 2 ** 30:.2f}'
    B = info.get('batch')
    tried = ', '.join(f'{k} ' + ('fits' if v else 'OOM') for k, v in info.get('batch_search', {}).items()) or 'given'
    lines = [f'# bench.py gpu: {info["preset"]} on {info["device"]}', '',
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


# ----------------------------------------------------------------------------- jvp-dtype
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
    """bench.py jvp-dtype: the JVP's error in fp32 and bf16 against float64, and a short CPU run with each."""
    if a.threads > 0:
        torch.set_num_threads(a.threads)
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
    run_train(['--losses', 'fm', '--teacher', 'none', '--out', teacher_dir, '--steps', str(a.teacher_steps),
               '--lr', '1e-3', '--batch', str(a.batch), '--resume', 'auto', '--seed', '0'])
    teacher = train.load_teacher(train.latest_checkpoint(teacher_dir), in_channels=1, input_size=16)
    ds = train.LatentFolder(train.BUILTIN_DIR)
    curves = {}
    for label in ('fp32', 'bf16'):
        torch.manual_seed(0)
        args = train.parse_args(['--teacher', 'given', '--jvp-dtype', label, '--lr', '3e-4'])
        student = student_from_teacher(teacher)
        ema = copy.deepcopy(student).requires_grad_(False)
        opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, args.beta2))
        stream = train.data_stream(ds, a.batch, 0, 0, 1, 0, 0)
        curves[label] = []
        for it in tqdm(range(a.steps), desc=f'jvp-dtype {label}', leave=False):
            lat, lat_flip, y = next(stream)
            x = train.prepare_batch(lat, lat_flip, ds.mean, ds.std, torch.device('cpu'))
            log, _ = train.train_step(student, ema, teacher, opt, (x, y), it, args, 1,
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
    lines += ['', f'Command: python bench.py {a.command}']
    write_atomic(os.path.join(a.results, 'jvp_dtype.md'), '\n'.join(lines) + '\n')
    write_atomic(os.path.join(a.results, 'jvp_dtype.json'), json.dumps(dict(errors=raw, curves=curves), indent=1) + '\n')
    print('\n'.join(lines))


# ----------------------------------------------------------------------------- command line
def estimate(a):
    """Paper-scale cost (Sec. 5.1) from a measured CPU iteration of the XL/1 preset: FLOPs of one forward
    pass counted by torch's FlopCounterMode, the average DE-CM iteration at freq 3 timed on this CPU at a
    small batch and expressed in forward passes, activation memory per sample measured, and these scaled
    to the paper's run on GPUs under a stated throughput assumption."""
    from torch.utils.flop_counter import FlopCounterMode
    from model import DiT, student_from_teacher
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    B, dev = a.batch, torch.device('cpu')
    teacher = DiT(a.preset, in_channels=32, input_size=16, num_classes=1000, s_embed=False)
    with torch.no_grad():                                      # non-zero adaLN: realistic work everywhere
        for p in teacher.parameters():
            p.add_(1e-3 * torch.randn_like(p))
    teacher.requires_grad_(False)
    student = student_from_teacher(teacher)
    ema = student                                              # saves 2.7 GB: the EMA lerp is then a no-op
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.randn(2 * B, 32, 16, 16), torch.randint(0, 1000, (2 * B,))
    t = torch.rand(2 * B)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        student(x[:1], t[:1], t[:1], y[:1])
    fwd_flops = fc.get_total_flops()                           # one sample, one forward pass
    args = train.parse_args(['--freq', '3'])
    off = torch.autocast('cpu', enabled=False)
    x, y, t, x2, y2 = x[:B], y[:B], t[:B], x, y
    with torch.no_grad():
        t_fwd = timed(lambda: student(x, t, t, y), 1, dev)
    step = {'it': 0}

    def iteration():                                           # cycles through it % 3 = 1, 2, 0
        step['it'] += 1
        train.train_step(student, ema, teacher, opt, (x, y), step['it'], args, 1, off)
    iteration()                                                # warm-up, AdamW state allocated
    t_it = statistics.mean(timed(iteration, 1, dev, warmup=0) for _ in range(3))
    # peak memory of an N2N iteration at B and 2B: the difference is the activation memory of B samples,
    # the rest (re-allocated gradients, AdamW's temporaries) does not grow with the batch
    mems = [peak_extra_bytes(lambda: train.train_step(student, ema, teacher, opt, b, 0, args, 1, off), dev)
            for b in [(x, y), (x2, y2)]]
    mem = (mems[1] - mems[0]) if None not in mems else None
    fwd_per_it = t_it / t_fwd                                  # the average iteration in forward passes
    params = sum(p.numel() for p in student.parameters())
    state_gb = params * 4 * (1 + 1 + 2 + 1 + 1) / 1e9          # student, grads, AdamW (2), EMA, teacher fp32
    per_gpu = a.global_batch // a.gpus
    iters = a.epochs * 1_281_167 // a.global_batch
    flops_it = fwd_flops * fwd_per_it * a.global_batch
    hours = iters * flops_it / (a.gpus * a.tflops * 1e12) / 3600
    act_gb = (mem or 0) / B * per_gpu / 1e9
    lines = [
        f'{a.preset}: {params / 1e6:.1f}M parameters; one forward pass of one 32x16x16 latent: {fwd_flops / 1e9:.0f} GFLOP '
        f'(FlopCounterMode).',
        f'Measured on this CPU ({torch.get_num_threads()} threads, batch {B}, fp32): forward {t_fwd:.2f} s, '
        f'average DE-CM iteration (freq 3, fused JVPs, teacher CFG and Eq. 13 v_psi) {t_it:.1f} s = '
        f'{fwd_per_it:.1f} forward passes; peak memory of an N2N iteration above the training state: '
        f'{mems[0] / 1e9:.1f} GB at batch {B}, {mems[1] / 1e9:.1f} GB at {2 * B}, so {(mem or 0) / B / 1e9:.2f} GB '
        f'of activations per sample.',
        f'Paper run (Sec. 5.1: 250 epochs of 1,281,167 images; the batch is not given, we take LightningDiT\'s '
        f'{a.global_batch} on {a.gpus} GPUs = {per_gpu} per GPU): {iters:,} iterations, '
        f'{flops_it / 1e15:.1f} PFLOP each.',
        f'Time at a sustained {a.tflops:.0f} TFLOP/s per GPU (about 40% of an A100\'s bf16 peak; the JVPs run '
        f'in fp32/TF32): {hours:.0f} hours ({hours / 24:.1f} days; the paper: about 3 days on 64 A100s).',
        f'Memory per GPU: {state_gb:.1f} GB of weights and optimizer state (fp32 student, gradients, AdamW, EMA, '
        f'teacher) + {(mems[0] - (mem or 0)) / 1e9:.1f} GB of re-allocated gradients and optimizer temporaries '
        f'+ about {act_gb:.0f} GB of activations at {per_gpu} per GPU in fp32 (less under bf16 autocast; '
        f'`--no-fused` or a smaller per-GPU batch with more GPUs if that does not fit).',
        f'Command: python bench.py estimate {" ".join(sys.argv[2:])}']
    write_atomic(os.path.join(a.results, 'estimate.md'), '\n'.join(lines) + '\n')
    print('\n'.join(lines))


def main(argv=None):
    ap = train.cli_parser(__doc__)
    sub = ap.add_subparsers(dest='cmd', required=True)
    def common(p, runs):
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
        p.add_argument('--batch', type=int, default=128, help='teacher batch size')
        p.add_argument('--skip-teacher', action='store_true', help='reuse RUNS/teacher as it is')
        p.add_argument('--decm-batch', type=int, default=64, help='DE-CM batch size')
        p.add_argument('--decm-lr', type=float, default=1e-3, help='DE-CM learning rate (the study: 1e-3 beats 3e-4 '
                       'beyond the seed noise)')
        p.add_argument('--w-cfg', type=float, default=2.0, help='CFG weight of the distilled velocity (and of '
                       'the distilled-velocity teacher baseline)')
        p.add_argument('--eta', type=float, default=0.05, help='APG eta of the distilled velocity (train.py --eta)')
        p.add_argument('--cfg-sweep', type=float, nargs='+', default=[1.0, 1.25, 1.5, 2.0],
                       help='plain-CFG weights of the teacher baselines at 50 steps')
        p.add_argument('--n', type=int, default=2000, help='samples per FD')
        p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='seeds (training and sampling)')
        p.add_argument('--jobs', type=int, default=1, help='runs trained at a time, as subprocesses of one '
                       'thread each (a GPU or a many-core machine; 1: in this process)')

    p = sub.add_parser('pipeline', help='the whole miniature pipeline with an FD table over seeds')
    common(p, 'runs/pipe')
    p.add_argument('--decm-steps', type=int, default=400, help='DE-CM iterations (400: an estimated 9 minutes of DE-CM on '
                   '2 CPU cores; 800 meets the three targets, study part I)')
    p.add_argument('--no-ema-warmup', dest='ema_warmup', action='store_false', help='constant EMA decay for the '
                   'DE-CM runs (default: train.py --ema-warmup, which the study found better at 1 and 2 NFE)')
    p.add_argument('--decm-r-max', type=train.bounded(float, 0, 1), default=0.2, help='train.py --r-max of the '
                   'DE-CM runs: N2N starts from r ~ U(0, r_max) (the study: 0.2 beats train.py\'s 0.05 at 1 and 2 NFE '
                   'over 3 seeds from 200 to 2,000 iterations; 0.5 and 1 are no better)')
    p.add_argument('--decm-schedule', default='logit-normal', choices=['uniform-seg', 'logit-normal', 'arctan'],
                   help='train.py --schedule of the DE-CM runs (study part H: logit-normal beats the paper\'s '
                   'uniform-with-N-seg, train.py\'s default, beyond noise at 1 NFE, 2 NFE and Mix 4 over 3 seeds at 200, '
                   '400 and 800 iterations; the runs of parts F-H to 3,200 iterations used uniform-seg)')
    p.add_argument('--mix-t', type=train.bounded(float, 0, 1, lo_open=True, hi_open=True), default=0.0625,
                   help="sample.py --mix-t of the Mix row: the switch from flow-map steps to CM steps (study part I: "
                   "on the logit-normal runs 0.0625 beats sample.py's 0.25, tuned on uniform-seg runs)")
    p.add_argument('--publish', action='store_true', help='also copy pipeline.md/.json/.png into --results '
                   '(by default they stay in --runs)')
    p.add_argument('extra', nargs='*', help='more train.py flags for the DE-CM runs (after --)')

    p = sub.add_parser('study', help='what closes the gap to the teacher: STUDY configurations x seeds, '
                       'FD ratio against training iterations (results/study.md, study.png)')
    common(p, 'runs/study')
    p.add_argument('--configs', nargs='+', default=['all'], help='names from STUDY (bench.py), or all')
    p.add_argument('--eval-at', type=int, nargs='+', default=[250, 500, 1000, 2000, 4000],
                   help='iterations at which the EMA weights are evaluated (the run stops at the last)')
    p.add_argument('--stop-after', type=float, default=0, help='seconds: stop starting chunks after this, '
                   'stop the runs 30 s later and report what was reached (0: no limit)')
    p.add_argument('--stop-at', type=float, default=0, help=argparse.SUPPRESS)
    p.add_argument('--one', default=None, help=argparse.SUPPRESS)
    p.add_argument('--report', action='store_true', help='only rewrite study.md/.png from the runs')
    p.add_argument('--mix-ts', type=train.bounded(float, 0, 1, lo_open=True, hi_open=True), nargs='*',
                   default=[0.0625, 0.125], help="more Mix switch times evaluated at 4 NFE besides sample.py's "
                   "--mix-t (evals.json keys mix4_t<t>)")
    p.set_defaults(extra=[])

    p = sub.add_parser('tables', help="the paper's Table 3 (a)-(o) and Table 4 in miniature")
    p.add_argument('--quick', action='store_true', help='about 5 minutes: 200 teacher and 8 DE-CM iterations, '
                   'n = 200 (flags given explicitly win); writes tables_quick.*')
    p.add_argument('--runs', default=None, help='folder for the teacher and the variant runs '
                   '(default runs/tables, with --quick runs/tables-quick)')
    p.add_argument('--results', default=RESULTS, help='folder for tables.md, tables.png, tables.json and '
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
    p.add_argument('--rows', nargs='+', default=None, help='the variant runs to make, from c d e f g i k l m o '
                   '(default all; g is always needed): fewer rows, not fewer seeds, to save time')
    p.add_argument('--eta', type=float, default=0.05, help='APG eta of the distilled velocity and of row (b*)')
    p.add_argument('--jobs', type=int, default=1, help='runs trained at a time, as subprocesses of one thread each')
    p.add_argument('--no-ema-warmup', dest='ema_warmup', action='store_false', help='constant EMA decay for the '
                   'variant runs (default: train.py --ema-warmup, as in the pipeline: a 200-iteration run with a '
                   'constant decay of 0.995 still holds 37%% of the teacher in its average)')
    p.add_argument('--threads', type=train.bounded(int, 0), default=0, help='torch.set_num_threads (0: leave the default); '
                   '1 is much faster than 2 on a 2-core machine that something else keeps busy')

    p = sub.add_parser('estimate', help="paper-scale time and memory from a measured CPU step of XL/1")
    p.add_argument('--preset', default='XL/1', choices=list(train.PRESETS), help='model preset (the paper: XL/1)')
    p.add_argument('--batch', type=int, default=1, help='CPU batch of the measured iterations (and twice it)')
    p.add_argument('--threads', type=train.bounded(int, 0), default=0, help='torch.set_num_threads (0: leave the default)')
    p.add_argument('--global-batch', type=int, default=1024, help='global batch of the paper run')
    p.add_argument('--gpus', type=int, default=64, help='GPUs of the paper run')
    p.add_argument('--epochs', type=int, default=250, help='ImageNet epochs of the paper run')
    p.add_argument('--tflops', type=float, default=125.0, help='assumed sustained TFLOP/s per GPU')
    p.add_argument('--results', default=RESULTS, help='folder for estimate.md')
    p = sub.add_parser('speed', help='iteration and sampling times, memory, DE-CM iteration vs its floor')
    p.add_argument('--presets', nargs='+', default=['tiny', 'small'], choices=list(train.PRESETS),
                   help='model presets to measure')
    p.add_argument('--batch', type=int, default=128, help='batch size of the iterations and of sampling')
    p.add_argument('--repeats', type=int, default=5, help='timed runs per measurement (the median is kept)')
    p.add_argument('--threads', type=train.bounded(int, 0), default=0, help='torch.set_num_threads (0: leave the default)')
    p.add_argument('--freq', type=int, default=3, help='N2N every freq iterations for the average iteration')
    p.add_argument('--w-cfg', type=float, default=2.0, help='CFG weight of the teacher (distillation, sampler)')
    p.add_argument('--device', default='auto', help='auto, cpu or cuda')
    p.add_argument('--seed', type=int, default=0, help='seed of the random models and data')
    p.add_argument('--jvp-steps', action='store_true', help='only the CM step (eager and compiled, '
                   'train.py --compile-jvp) against the FM step, interleaved -> results/jvp_steps.md')
    p.add_argument('--clock', default='wall', choices=['wall', 'cpu'], help='--jvp-steps: wall time, or the '
                   "process's CPU time (steadier on a machine that other jobs share; with --threads 1)")
    p.add_argument('--compile-jvp', action='store_true', help='also time the CM JVP + backward compiled '
                   '(train.py --compile-jvp; compiles once per preset, 1-2 minutes on a CPU)')
    p.add_argument('--results', default=RESULTS, help='folder for speed.md and speed.json')
    p = sub.add_parser('gpu', help='XL/1 passes on the GPU at the largest batch that fits -> results/gpu.md')
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
    p.add_argument('--results', default=RESULTS, help='folder for gpu.md and gpu.json')
    p = sub.add_parser('mix', help="the Mix sampler's switch: pixel FD over --mix-det x --mix-t")
    p.add_argument('--ckpt', nargs='+', default=['runs/decm'], help='DE-CM checkpoint(s) (file or run folder), '
                   'one per seed')
    p.add_argument('--seeds', type=int, nargs='+', default=None, help='noise seed and real subset of each --ckpt '
                   '(default 0, 1, ...)')
    p.add_argument('--nfe', type=train.bounded(int, 2), default=4, help='network calls per sample')
    p.add_argument('--ts', type=train.bounded(float, 0, 1, lo_open=True, hi_open=True), nargs='+',
                   default=[0.25, 0.5, 0.75], help='switch times --mix-t to try')
    p.add_argument('--n', type=train.bounded(int, 2), default=2000, help='samples per FD')
    p.add_argument('--data', default=None, help='latents folder of the real images (default: the built-in digits)')
    p.add_argument('--teacher-fd', default=None, help="an FD cache with the distilled-velocity teacher at 50 steps "
                   "(the pipeline's RUNS/fd.json or the study's RUNS/teacher_fd.json): adds ratios to it, paired by seed")
    p.add_argument('--threads', type=train.bounded(int, 0), default=0, help='torch.set_num_threads (0: the default)')
    p = sub.add_parser('regress', help='capacity probe: the one-step student fit by regression to the '
                       "teacher's ODE map (RUNS/regress.md)")
    p.add_argument('--teacher', default='runs/pipe/teacher', help='flow-matching teacher (file or run folder)')
    p.add_argument('--teacher-fd', default=None, help="the pipeline's FD cache (RUNS/fd.json): ratios against "
                   'the distilled-velocity teacher at 50 steps')
    p.add_argument('--runs', default='runs/regress', help='folder for the pairs and regress.md')
    p.add_argument('--pairs', type=train.bounded(int, 1), default=10000, help='(noise, ODE solution) pairs')
    p.add_argument('--ode-steps', type=train.bounded(int, 1), default=50, help='Euler steps of the teacher ODE')
    p.add_argument('--w-cfg', type=float, default=2.0, help='CFG weight of the distilled velocity')
    p.add_argument('--eta', type=float, default=0.05, help='APG eta of the distilled velocity')
    p.add_argument('--batch', type=train.bounded(int, 1), default=64, help='regression batch size')
    p.add_argument('--lr', type=float, default=1e-3, help='AdamW learning rate')
    p.add_argument('--eval-at', type=train.bounded(int, 1), nargs='+', default=[400, 1000, 2000],
                   help='iterations at which the EMA weights are evaluated (the fit stops at the last)')
    p.add_argument('--n', type=train.bounded(int, 2), default=2000, help='samples per FD')
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2], help='sampling seeds (noise and real subset)')
    p.add_argument('--seed', type=int, default=0, help='seed of the fit')
    p.add_argument('--data', default=None, help='latents folder of the real images (default: the built-in digits)')
    p.add_argument('--threads', type=train.bounded(int, 0), default=0, help='torch.set_num_threads (0: the default)')
    p = sub.add_parser('jvp-dtype', help='JVP error in fp32 / bf16 against float64, and a short run with each')
    p.add_argument('--presets', nargs='+', default=['tiny', 'small'], choices=list(train.PRESETS),
                   help='presets of the error table')
    p.add_argument('--seeds', type=train.bounded(int, 1), default=3, help='random students per preset (the median is kept)')
    p.add_argument('--teacher-steps', type=int, default=300, help='flow-matching steps of the teacher')
    p.add_argument('--steps', type=int, default=60, help='DE-CM iterations of each short run')
    p.add_argument('--batch', type=int, default=64, help='batch size of the teacher and the short runs')
    p.add_argument('--runs', default='runs/jvp-dtype', help='folder for the teacher run')
    p.add_argument('--threads', type=int, default=0, help='torch.set_num_threads (0: leave the default)')
    p.add_argument('--results', default=RESULTS, help='folder for jvp_dtype.md and jvp_dtype.json')
    a = ap.parse_args(argv)
    a.command = ' '.join(sys.argv[1:] if argv is None else argv)
    try:
        if a.cmd in ('pipeline', 'study'):
            for name in ('n', 'jobs', 'teacher_steps', 'batch', 'decm_batch') + (('decm_steps',) if a.cmd == 'pipeline' else ()):
                if getattr(a, name) < (2 if name == 'n' else 1):
                    ap.error(f'--{name.replace("_", "-")} {getattr(a, name)}: must be at least {2 if name == "n" else 1}')
            if a.cmd == 'study' and a.report:
                names = [n for n, _, _ in STUDY] if a.configs == ['all'] else a.configs
                return study_report(a, names)
        {'pipeline': pipeline, 'study': study, 'tables': tables, 'speed': speed, 'estimate': estimate, 'gpu': gpu,
         'mix': mix_sweep, 'jvp-dtype': jvp_dtype, 'regress': regress}[a.cmd](a)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
