"""DE-CM training, Algorithm 1 line by line; also trains the teacher itself (`--losses fm --teacher none`).

Every iteration (train_step): z, t, x_t = (1 - t) z + t x_ref and the teacher velocity v_t for the whole
batch (l.2-6), one update on L_cm + L_fm (l.8-15), and every `freq` iterations a second one on L_n2n + L_fm
at a point x_r near the noise (l.17-28). Losses: losses.py; teacher velocity: teacher.py; network: model.py.
`--accum K` runs each update's losses on K micro-batches in turn (every loss is a mean over samples).
Data: a latents folder in LightningDiT's format (`*.safetensors` with `latents`, `latents_flip`, `labels`;
`latents_stats.pt` with `mean`, `std`), normalised (z - mean) / std, flipped with probability 0.5; without
`--data`, the built-in digits are generated in that format. CPU or CUDA (bf16 autocast, fp32 JVPs, TF32)
and torchrun: we all-reduce the gradients ourselves, since DDP's hooks are armed only by its own forward (a
loss on the primal of a torch.func.jvp of `model.module` would skip the all-reduce silently). Checkpoints
are atomic with a `latest` pointer; `--resume auto` continues bit-exactly; a non-finite update is skipped;
SIGINT/SIGTERM save and exit. OUT/log.jsonl gets a line every --log-every iterations; --eval-every writes
EMA samples to OUT/samples/, a quality figure to the log and OUT/curves.png.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

import losses
from fid import pixel_fd, load_inception, source_stats, inception_stats, frechet_distance
from model import DiT, PRESETS, student_from_teacher, load_dit_state, load_vavae_decoder, decode_to_uint8
from sample import (BUILTIN_DIR, cli_parser, bounded, device_flag, set_threads, setup_distributed, generate,
                    to_uint8, save_grid)
from teacher import load_teacher, teacher_velocity, read_checkpoint

JVP_DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


# ----------------------------------------------------------------------------- data
def make_digits(out_dir, n=20000, size=16, channels=1, seed=0, num_classes=10):
    """The built-in dataset: digits 0-9 in pillow's default font, random shift, scale, rotation and stroke,
    size x size in [-1, 1], written as a latents folder (latents_flip = latents: a mirrored digit is not a
    digit). Deterministic for a seed."""
    from PIL import Image, ImageDraw, ImageFont
    from safetensors.torch import save_file
    rng, big = np.random.default_rng(seed), 4 * size           # draw large, then downsample (antialias)
    labels, images = rng.integers(0, num_classes, n), np.zeros((n, channels, size, size), np.float32)
    for i in tqdm(range(n), desc='building the digits dataset', leave=False):
        font = ImageFont.load_default(size=int(big * rng.uniform(0.55, 0.85)))
        im = Image.new('L', (big, big))
        cx, cy = big / 2 + rng.uniform(-0.1, 0.1) * big, big / 2 + rng.uniform(-0.1, 0.1) * big
        ImageDraw.Draw(im).text((cx, cy), str(labels[i] % 10), font=font, fill=255, anchor='mm',
                                stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
        im = im.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, center=(cx, cy))
        a = np.asarray(im.resize((size, size), Image.LANCZOS), np.float32) / 255.0
        color = rng.uniform(0.5, 1.0, channels) if channels > 1 else np.ones(1)
        images[i] = (a[None] * color[:, None, None]) * 2 - 1
    os.makedirs(out_dir, exist_ok=True)
    x, path = torch.from_numpy(images), os.path.join(out_dir, 'latents_rank00_shard000.safetensors')
    save_file({'latents': x, 'latents_flip': x.clone(), 'labels': torch.from_numpy(labels)}, path + '.tmp')
    os.replace(path + '.tmp', path)
    torch.save({'mean': x.mean(dim=(0, 2, 3), keepdim=True), 'std': x.std(dim=(0, 2, 3), keepdim=True)},
               os.path.join(out_dir, 'latents_stats.pt'))
    return out_dir


class LatentFolder(torch.utils.data.Dataset):
    """LightningDiT's latents folder. Items are (latent, flipped latent, label), not normalised."""

    def __init__(self, root, stats='file', flag='--data'):
        self.files = sorted(glob.glob(os.path.join(root, '*.safetensors'))) if root and os.path.isdir(root) else None
        if not self.files:
            raise ValueError(f'{flag} {root}: ' + ('no *.safetensors files (expected LightningDiT\'s latents_rank*_'
                             'shard*.safetensors)' if self.files is not None else 'no such folder'))
        self.index, labels, shapes, self.handles = [], [], set(), {}
        for f in self.files:
            try:
                with safe_open(f, framework='pt') as h:
                    if not {'latents', 'latents_flip', 'labels'} <= set(h.keys()):
                        raise ValueError(f'{f} lacks latents/latents_flip/labels (has {sorted(h.keys())})')
                    n, *shape = h.get_slice('latents').get_shape()
                    labels.append(h.get_tensor('labels').long().flatten())
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(f'{f} is not a readable safetensors file ({str(e)[:100]})')
            shapes.add(tuple(shape))
            self.index += [(f, i) for i in range(n)]
        self.labels, self.shape = torch.cat(labels), shapes.pop()
        if shapes or len(self.labels) != len(self.index):
            raise ValueError(f'{flag} {root}: the files disagree in latent shape or hold {len(self.labels)} labels '
                             f'for {len(self.index)} latents')
        stats_file = os.path.join(root, 'latents_stats.pt')
        if stats == 'compute':                                 # mean and std of up to 10,000 latents
            idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:10000]
            x = torch.stack([self[i][0] for i in idx.tolist()]).float()
            torch.save({'mean': x.mean(dim=(0, 2, 3), keepdim=True), 'std': x.std(dim=(0, 2, 3), keepdim=True)},
                       stats_file + '.tmp')
            os.replace(stats_file + '.tmp', stats_file)
        if not os.path.exists(stats_file):
            raise ValueError(f'{stats_file} is missing: run once with --latent-stats compute to make it')
        st = read_checkpoint(stats_file)
        self.mean, self.std = st['mean'].float().reshape(1, -1, 1, 1), st['std'].float().reshape(1, -1, 1, 1)
        if self.mean.shape[1] != self.shape[0]:
            raise ValueError(f'{stats_file} has {self.mean.shape[1]} channels, the latents {self.shape[0]}')

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        f, j = self.index[i]
        if f not in self.handles:                              # opened lazily, once per worker
            self.handles[f] = safe_open(f, framework='pt')
        h = self.handles[f]
        return h.get_slice('latents')[j], h.get_slice('latents_flip')[j], self.labels[i]


def batches_of_epoch(n, batch, epoch, seed, rank, world):
    """This rank's index batches for one epoch (DistributedSampler order, seeded by seed + epoch)."""
    sampler = torch.utils.data.DistributedSampler(range(n), world, rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [idx[i:i + batch] for i in range(0, len(idx) - batch + 1, batch)]


def data_stream(ds, batch, seed, rank, world, start, workers):
    """Yields (latents, flipped latents, labels) batches forever, starting after `start` batches."""
    per_epoch = len(batches_of_epoch(len(ds), batch, 0, seed, rank, world))
    if per_epoch == 0:
        raise ValueError(f'the dataset has {len(ds)} samples, fewer than one batch of {batch} per rank')
    epoch, skip = divmod(start, per_epoch)
    while True:
        yield from torch.utils.data.DataLoader(
            ds, batch_sampler=batches_of_epoch(len(ds), batch, epoch, seed, rank, world)[skip:], num_workers=workers,
            generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available())   # global RNG kept
        epoch, skip = epoch + 1, 0


def prepare_batch(lat, lat_flip, mean, std, device):
    """Pick the flipped copy with probability 0.5, move to the device, normalise (z - mean) / std."""
    flip = torch.rand(lat.shape[0]) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), lat_flip, lat).to(device, non_blocking=True).float()
    return (x - mean) / std


# ----------------------------------------------------------------------------- Algorithm 1
def sample_t(n, args, device):
    """Alg.1 l.3. 'uniform-seg' (the paper): uniform over the N+1 end points {0, 1/N, ..., 1} of N segments;
    'logit-normal': sigmoid of N(0, 1); 'arctan': sCM's law, tau ~ N(-1, 1.4), t = 1 - 2/pi atan(e^tau / 0.5)."""
    if args.schedule == 'uniform-seg':
        return torch.randint(0, args.segments + 1, (n,), device=device).float() / args.segments
    if args.schedule == 'logit-normal':
        return torch.sigmoid(torch.randn(n, device=device))
    return 1 - (2 / math.pi) * torch.atan(torch.exp(torch.randn(n, device=device) * 1.4 - 1.0) / 0.5)


def draw(x_ref, args):
    """The random draws of one iteration, for the whole batch: z (l.2), t (l.3), r (l.18), label dropout."""
    B, dev = x_ref.shape[0], x_ref.device
    return {'z': torch.randn_like(x_ref), 't': sample_t(B, args, dev),
            'r': torch.rand(B, device=dev) * args.r_max, 'drop': torch.rand(B, device=dev) < args.class_drop}


def teacher_v(x, t, teacher, y, args, autocast, z=None, x_ref=None):
    """Alg.1 l.5-6 (l.20-21): the teacher velocity at (x, t), under no_grad and autocast."""
    with torch.no_grad(), autocast:
        return teacher_velocity(teacher, x, t, y, z, x_ref, args.w_cfg, args.eta, args.vnorm).to(x.dtype)


def train_step(student, ema, teacher, opt, x_ref, y, it, args, world=1, autocast=contextlib.nullcontext(), draws=None):
    """One iteration of Algorithm 1 on a normalised batch. Returns (log, ok): log holds the losses (cm, fm,
    n2n, fm2), the gradient norms of the two updates and the number of skipped updates, all tensors.
    draws: the random draws of the iteration (draw()), made here if None."""
    K, B, names, log = args.accum, x_ref.shape[0], args.loss_set, {}
    if B % K:
        raise ValueError(f'--accum {K} does not divide the batch of {B} samples per rank')
    parts = [slice(k * B // K, (k + 1) * B // K) for k in range(K)]
    opts = dict(p=args.p, c=args.c)
    jvp_opts = dict(fused=args.fused, jvp_dtype=JVP_DTYPES[args.jvp_dtype], compiled=args.compile_jvp, **opts)
    d = draw(x_ref, args) if draws is None else draws         # l.2-3: z ~ N(0, I), t (and l.18's r)
    z, t = d['z'], d['t']
    if teacher is None and args.class_drop > 0:                # teacher training: CFG label dropout
        y = torch.where(d['drop'], torch.full_like(y, student.num_classes), y)
    x_t = (1 - losses.bcast(t, z)) * z + losses.bcast(t, z) * x_ref          # l.4
    v_t = teacher_v(x_t, t, teacher, y, args, autocast, z, x_ref)            # l.5-6
    skipped = 0
    if 'cm' in names or 'fm' in names:
        total = 0.0
        for sl in parts:                                       # micro-batches: gradient accumulation
            loss = 0.0
            if 'cm' in names:                                  # l.8-11 (JVP precision: losses.py)
                loss = loss + logged(log, 'cm', K, losses.cm_loss(
                    student, x_t=x_t[sl], t=t[sl], y=y[sl], v=v_t[sl], w1=args.w1, **jvp_opts))
            if 'fm' in names:                                  # l.13-14
                with autocast:
                    loss = loss + logged(log, 'fm', K, losses.fm_loss(
                        student, x_t=x_t[sl], t=t[sl], y=y[sl], v=v_t[sl], **opts))
            (loss / K if K > 1 else loss).backward()
            total = total + loss.detach() / K if K > 1 else loss.detach()
        ok, log['grad_norm'] = optimizer_step(student, ema, opt, total, args, world, ema_decay(it, args))   # l.15
        skipped += not ok
    if 'n2n' in names and it % args.freq == 0:                 # l.17
        r = torch.minimum(d['r'], t)                           # l.18: r -> 0, r <= t
        x_r = (1 - losses.bcast(r, z)) * z + losses.bcast(r, z) * x_ref          # l.19
        v_r = teacher_v(x_r, r, teacher, y, args, autocast, z, x_ref)            # l.20-21
        total = 0.0
        for sl in parts:
            # v_psi, the teacher velocity at t: at the predicted point f(x_r, r, t) (Eq. 13) or v_t (l.23)
            v_psi = v_t[sl] if args.vpsi == 'interp' or teacher is None else \
                (lambda x_hat, sl=sl: teacher_v(x_hat, t[sl], teacher, y[sl], args, autocast))
            loss = logged(log, 'n2n', K, losses.n2n_loss(             # l.22-25
                student, x_r=x_r[sl], r=r[sl], t=t[sl], y=y[sl], v_r=v_r[sl], v_psi=v_psi, lam=args.lam,
                gam=args.gam, w2=args.w2, **jvp_opts))
            if 'fm' in names:                                  # l.26-27
                with autocast:
                    loss = loss + logged(log, 'fm2', K, losses.fm_loss(
                        student, x_t=x_t[sl], t=t[sl], y=y[sl], v=v_t[sl], **opts))
            (loss / K if K > 1 else loss).backward()
            total = total + loss.detach() / K if K > 1 else loss.detach()
        ok, log['grad_norm2'] = optimizer_step(student, ema, opt, total, args, world, ema_decay(it, args))  # l.28
        skipped += not ok
    log['skipped'] = torch.tensor(float(skipped))
    return log, skipped == 0


def logged(log, name, K, value):
    """value, with its mean over the K micro-batches added to log[name] (for the bar and log.jsonl)."""
    log[name] = value.detach() if K == 1 else log.get(name, 0.0) + value.detach() / K
    return value


def optimizer_step(model, ema, opt, loss, args, world, decay):
    """Alg.1 l.15 / l.28: F_theta, F_ema <- update(F_theta, loss), on the gradients backward() accumulated:
    all-reduce over ranks (one flat tensor), clip, AdamW, EMA. A non-finite loss or gradient skips it (the
    same decision on every rank). Returns (updated?, gradient norm before clipping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for p, g in zip(params, (flat / world).split([g.numel() for g in grads])):
            p.grad = g.view_as(p)
    gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float('inf'))
    ok = bool(torch.isfinite(gnorm) and torch.isfinite(loss))   # one host sync per update
    if ok:
        opt.step()
        with torch.no_grad():
            ema_params = [e for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
            torch._foreach_lerp_(ema_params, params, 1 - decay)
    opt.zero_grad(set_to_none=True)
    return ok, gnorm.detach()


def ema_decay(step, args):
    """EMA decay at iteration `step`: --ema, or with --ema-warmup min(--ema, (1 + step) / (10 + step)), so
    that the average forgets the weights it started from (the teacher's) within a short run."""
    return min(args.ema, (1 + step) / (10 + step)) if args.ema_warmup else args.ema


# ----------------------------------------------------------------------------- checkpoints
def rng_state():
    st = {'torch': torch.get_rng_state(), 'numpy': torch.tensor(np.random.get_state()[1].astype(np.int64)),
          'numpy_pos': np.random.get_state()[2], 'python': random.getstate()}
    return {**st, 'cuda': torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else st


def set_rng_state(st):
    torch.set_rng_state(st['torch'])
    np.random.set_state(('MT19937', st['numpy'].numpy().astype(np.uint32), st['numpy_pos'], 0, 0.0))
    random.setstate((st['python'][0], tuple(st['python'][1]), st['python'][2]))
    if 'cuda' in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st['cuda'])


def write_atomic(path, write):
    """write(f) into a temporary file in the same folder, fsync, rename: a kill never leaves half a file."""
    with open(path + '.tmp', 'wb') as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + '.tmp', path)


def save_checkpoint(out, obj, step, keep):
    """OUT/ckpt_STEP.pt, then the `latest` pointer, both atomic; keeps the newest `keep` checkpoints."""
    name = f'ckpt_{step:07d}.pt'
    try:
        write_atomic(os.path.join(out, name), lambda f: torch.save(obj, f))
    except OSError as e:                                       # disk full, quota: keep the last good one
        if os.path.exists(os.path.join(out, name + '.tmp')):
            os.remove(os.path.join(out, name + '.tmp'))
        raise ValueError(f'cannot write checkpoint {name} in {out} ({e.strerror or e}); the previous '
                         f'checkpoint ({latest_checkpoint(out)}) is intact')
    write_atomic(os.path.join(out, 'latest'), lambda f: f.write(name.encode() + b'\n'))
    for old in sorted(glob.glob(os.path.join(out, 'ckpt_*.pt')))[:-keep]:
        os.remove(old)
    return os.path.join(out, name)


def latest_checkpoint(out):
    p = os.path.join(out, 'latest')
    return os.path.join(out, open(p).read().strip()) if os.path.exists(p) else None


def load_student_checkpoint(path):
    """Our checkpoint as a dict; anything else gets a one-line error."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not {'model', 'ema', 'model_config', 'args'} <= set(ckpt):
        raise ValueError(f'{path} is not a decm checkpoint (expected model, ema, opt, args, step)')
    return ckpt


# ----------------------------------------------------------------------------- watching a run
# OUT/log.jsonl: one JSON object per line. Training lines (every --log-every) hold the means over the
# iterations since the previous line, evaluation lines the quality figures. On resume the lines after the
# checkpoint are dropped and the running sums come from the checkpoint: every step is logged once.
def read_log(path):
    """The records of a log.jsonl (a line cut short by a kill is skipped)."""
    records = []
    for line in open(path) if os.path.exists(path) else []:
        with contextlib.suppress(ValueError):
            rec = json.loads(line)
            records += [rec] if isinstance(rec, dict) and isinstance(rec.get('step'), int) else []
    return records


def append_log(path, record):
    """One JSON line (non-finite numbers as null)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(path, 'a') as f:
        f.write(json.dumps(clean) + '\n')


def plot(path, panels, xlabel='iteration', ylabel=None, logy=True, ylim=None):
    """The one plotting function (training curves and the experiments' figures): side-by-side panels
    [(title, {label: (xs, ys)})], markers for short series, log y axes by default. Atomic."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (title, series) in zip(axes[0], panels):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker='o' if len(xs) <= 20 else None, ms=4, label=f'{label} {ys[-1]:.3g}' if ys else label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, yscale='log' if logy and series else 'linear', ylim=ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8) if series else ax.text(0.5, 0.5, 'nothing yet', ha='center', transform=ax.transAxes)
    fig.tight_layout()
    write_atomic(path, lambda f: fig.savefig(f, format='png', dpi=80))
    plt.close(fig)


def plot_curves(out, records):
    """OUT/curves.png: losses and gradient norms (moving averages of 5% of the points), and the quality."""
    def series(keys, w=1):
        pts = {k: [(r['step'], r[k]) for r in records if isinstance(r.get(k), (int, float)) and r[k] > 0] for k in keys}
        w = {k: max(1, len(p) // 20) if w > 1 else 1 for k, p in pts.items()}
        return {k: ([x for x, _ in p], [np.mean([y for _, y in p[max(0, i - w[k] + 1):i + 1]]) for i in range(len(p))])
                for k, p in pts.items() if p}
    plot(os.path.join(out, 'curves.png'), [('losses', series(['cm', 'fm', 'n2n', 'fm2'], 2)),
                                           ('gradient norm before clipping', series(['grad_norm', 'grad_norm2'], 2)),
                                           ('quality (EMA; nfeK: K calls)', series(sorted({k for r in records for k in r
                                                                                           if k[:3] in ('fd_', 'fid')})))])


class Evaluator:
    """--eval-every: EMA samples (CM sampler at 1 and 2 NFE; a flow-matching run: Euler at 4 and 16 steps) from
    fixed noise and labels (private generators: training is untouched) -> OUT/samples/step_N.png, and the
    pixel FD against as many training images (1- or 3-channel data), or the FID of latents decoded with --vae."""

    def __init__(self, ds, args, dev, batch, flow_model):
        self.ds, self.args, self.dev, self.batch, n = ds, args, dev, batch, args.eval_samples
        self.sampler, self.nfes = ('euler', (4, 16)) if flow_model else ('cm', (1, 2))
        self.vae = load_vavae_decoder(args.vae, dev) if ds.shape[0] not in (1, 3) else None
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[:n].tolist()
        self.real = torch.stack([ds[i][0] for i in idx]).float().numpy() if self.vae is None else None
        self.inception = load_inception(args.inception, dev) if self.vae and args.fid_ref else None
        self.ref = source_stats(args.fid_ref, self.inception)[:2] if self.inception else None
        D = int(np.prod(ds.shape)) if self.vae is None else 2048
        self.describe = (f'every {args.eval_every} iterations: {n} EMA samples, {self.sampler} sampler at {self.nfes}'
                         f' NFE, ' + ('pixel FD' if self.vae is None else 'FID' if self.ref else 'no score (give --fid-ref)')
                         + f' (warning: {n} <= {D} dimensions: singular covariance, biased high)' * (n <= D))

    @torch.no_grad()
    def __call__(self, ema, step, autocast, mean, std):
        t0, rec, panels = time.time(), {}, []
        for nfe in self.nfes:
            with autocast:
                xs, ys, _ = generate(ema, self.sampler, self.args.eval_samples, nfe, ema.num_classes, self.args.seed,
                                     self.batch, self.dev, progress=False)
            x, y = torch.cat(list(xs.values())).float() * std.cpu() + mean.cpu(), torch.cat(list(ys.values()))
            if self.vae is None:
                images, rec[f'fd_nfe{nfe}'] = to_uint8(x), pixel_fd(x.numpy(), self.real)
            else:
                images = torch.cat([decode_to_uint8(self.vae, x[i:i + 16].to(self.dev)).cpu() for i in range(0, len(x), 16)])
                if self.ref:
                    rec[f'fid_nfe{nfe}'] = frechet_distance(*inception_stats(images.numpy(), self.inception), *self.ref)
            panels.append((f'{self.sampler}, {nfe} NFE (EMA, step {step})', images, y))
        save_grid(os.path.join(self.args.out, 'samples', f'step_{step:07d}.png'), panels)
        return {**rec, 'eval_samples': self.args.eval_samples, 'eval_s': round(time.time() - t0, 3)}


# ----------------------------------------------------------------------------- command line
def build_parser():
    ap = cli_parser(__doc__)
    A, P, N, U = ap.add_argument, bounded(int, 1), bounded(int, 0), bounded(float, 0, 1)
    F, FP = bounded(float, 0), bounded(float, 0, lo_open=True)
    A('--data', help=f'latents folder (LightningDiT format); default: the built-in digits, made in {os.path.relpath(BUILTIN_DIR)}')
    A('--latent-stats', default='file', choices=['file', 'compute'], help='read DATA/latents_stats.pt, or compute it first')
    A('--out', default='runs/decm', help='output folder: checkpoints, log.jsonl, samples/, curves.png')
    A('--teacher', default='none', help="teacher checkpoint (ours or LightningDiT's), or 'none': from scratch with "
      'v = x_ref - z (with --losses fm: trains a teacher)')
    A('--losses', default='fm,cm,n2n', help='comma list of fm, cm, n2n (Table 3 (c)-(g))')
    A('--preset', choices=list(PRESETS), help='architecture from scratch (default tiny), or of a LightningDiT --teacher '
      'file (default XL/1); the student copies its teacher')
    A('--num-classes', type=P, help='classes (default: 1 + the largest label in the data)')
    A('--steps', type=P, default=2000, help='training iterations')
    A('--batch', type=P, default=128, help='global batch size (split over torchrun ranks)')
    A('--accum', type=P, default=1, help='micro-batches per update (gradient accumulation; the same update)')
    A('--lr', type=FP, default=1e-4, help='AdamW learning rate (the paper: 1e-4; 1e-3 measured better at toy scale)')
    A('--beta2', type=bounded(float, 0, 1, hi_open=True), default=0.95, help="AdamW beta2 (LightningDiT's 0.95)")
    A('--weight-decay', type=F, default=0.0, help='AdamW weight decay')
    A('--ema', type=bounded(float, 0, 1, hi_open=True), default=0.995, help='EMA decay (0.9999 for long GPU runs)')
    A('--ema-warmup', action=argparse.BooleanOptionalAction, default=True, help='EMA decay min(--ema, (1 + step) / '
      '(10 + step)): forgets the starting weights early (measured better; --no-ema-warmup: the constant decay)')
    A('--freq', type=P, default=3, help='N2N update every freq iterations (the paper: 3; 5 measured better at 1-2 '
      'steps at toy scale)')
    A('--schedule', default='uniform-seg', choices=['uniform-seg', 'logit-normal', 'arctan'], help='distribution '
      'of t (Table 3 (j)-(l); the paper: uniform-seg; logit-normal measured better at toy scale)')
    A('--segments', type=P, default=8, help='N: uniform-seg draws t from the end points of N segments')
    A('--r-max', type=U, default=0.2, help='r -> 0 is uniform on [0, r_max], r <= t (0.2 measured best of 0.05-1)')
    A('--lam', type=F, default=1.0, help='lambda: weight of the left (r) end of N2N')
    A('--gam', type=F, default=1.0, help='gamma: weight of the right (t) end of N2N')
    A('--w1', type=F, default=1.0, help='w1: weight of g_cm in the CM target')
    A('--w2', type=F, default=1.0, help='w2: weight of g_n2n in the N2N target')
    A('--p', type=U, default=0.5, help='adaptive weighting power (0.5: pseudo-Huber; 0: plain L2)')
    A('--c', type=FP, default=1e-3, help='adaptive weighting constant')
    A('--w-cfg', type=F, default=2.0, help='CFG weight of the teacher velocity (1: no guidance)')
    A('--eta', type=F, default=0.05, help='RMS of the normalised guidance direction (teacher.py)')
    A('--no-vnorm', dest='vnorm', action='store_false', help='plain CFG, Eq. 18 (Table 3 (i))')
    A('--vpsi', default='pred', choices=['pred', 'interp'], help='N2N teacher velocity at t: at the predicted point '
      '(Eq. 13) or at the interpolated x_t (Alg.1 l.23)')
    A('--class-drop', type=U, default=0.1, help='label dropout when training without a teacher')
    A('--no-fused', dest='fused', action='store_false', help='JVP under no_grad plus a separate forward (less memory)')
    A('--jvp-dtype', default='fp32', choices=list(JVP_DTYPES), help='precision of the JVPs (bf16: under autocast)')
    A('--grad-clip', type=F, default=1.0, help='gradient-norm clipping (0: off)')
    A('--nan-patience', type=P, default=5, help='stop after this many non-finite updates in a row')
    A('--seed', type=N, default=0, help='random seed (rank r uses seed + r)')
    A('--device', type=device_flag, default='auto', help='auto, cpu or cuda')
    A('--amp', default='auto', choices=['auto', 'on', 'off'], help='bf16 autocast (auto: on for CUDA)')
    A('--compile', action='store_true', help='torch.compile the teacher')
    A('--compile-jvp', action='store_true', help="torch.compile the student's JVPs and their backward")
    A('--workers', type=N, default=0, help='data loader worker processes')
    A('--threads', type=N, default=0, help='torch.set_num_threads (0: one per core; 1 on a busy machine)')
    A('--ckpt-every', type=P, default=500, help='checkpoint every N iterations')
    A('--keep', type=P, default=2, help='checkpoints to keep')
    A('--resume', default='', help="'auto' (OUT/latest) or a checkpoint path")
    A('--log-every', type=P, default=10, help='a line in OUT/log.jsonl (means) and the bar every N iterations')
    A('--eval-every', type=N, default=0, help='every N iterations (0: never): EMA samples -> OUT/samples/, a quality '
      'figure in log.jsonl, OUT/curves.png')
    A('--eval-samples', type=bounded(int, 2), default=1000, help='samples per evaluation')
    A('--vae', help='evaluation on latents: the VA-VAE file to decode the samples')
    A('--fid-ref', help='evaluation on latents: FID reference (image folder, ADM .npz or stats .npz)')
    A('--inception', help='evaluation on latents: pt_inception-2015-12-05-6726825d.pth for FID')
    A('--builtin-size', type=bounded(int, 10), default=20000, help='samples in the built-in dataset')
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    args.loss_set = [x.strip() for x in args.losses.split(',') if x.strip()]
    if not args.loss_set or set(args.loss_set) - {'fm', 'cm', 'n2n'}:
        ap.error(f'--losses {args.losses}: give a comma list of fm, cm, n2n')
    for flag, path in (('--vae', args.vae), ('--fid-ref', args.fid_ref), ('--inception', args.inception)):
        if path is not None and not os.path.exists(path):
            ap.error(f'{flag} {path}: no such file or folder')
    if args.fid_ref and not args.inception:
        ap.error(f'--fid-ref {args.fid_ref}: FID of the evaluation samples also needs --inception PATH')
    return args


def changed_flags(args):
    """The flags of args that differ from their defaults, as they would be typed."""
    defaults, no = vars(build_parser().parse_args([])), {'vnorm', 'fused', 'ema_warmup'}
    return [('--no-' if k in no else '--') + k.replace('_', '-') + ('' if isinstance(v, bool) else f' {v}')
            for k, v in vars(args).items() if k in defaults and defaults[k] != v]


def train(args):
    set_threads(args.threads)
    rank, world, dev = setup_distributed(args.device)
    if args.batch % (world * args.accum):
        raise ValueError(f'--batch {args.batch} is not divisible by {world} rank(s) x --accum {args.accum}')
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = dev.type == 'cuda'   # fp32 JVPs
    use_amp = args.amp == 'on' or (args.amp == 'auto' and dev.type == 'cuda')
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp)
    data = args.data or BUILTIN_DIR
    if args.data is None and not os.path.exists(os.path.join(data, 'latents_stats.pt')):
        if rank == 0:
            make_digits(data, n=args.builtin_size)
        if world > 1:
            dist.barrier()
    ds = LatentFolder(data, args.latent_stats if rank == 0 else 'file')
    C, H, W = ds.shape
    if len(ds) < args.batch:                                   # fail before the progress bar is drawn
        raise ValueError(f'the dataset has {len(ds)} samples, fewer than one batch of {args.batch}')
    if args.eval_every and C not in (1, 3) and not args.vae:
        raise ValueError(f'--eval-every on latents of shape {(C, H, W)} needs --vae PATH to decode the samples')
    resume = latest_checkpoint(args.out) if args.resume == 'auto' else (args.resume or None)
    ckpt = load_student_checkpoint(resume) if resume else None
    if ckpt is not None and args.loss_set != ['fm'] and not ckpt['model_config'].get('s_embed', True):
        raise ValueError(f'{resume} is a flow-matching (teacher) checkpoint without the s input: give it '
                         f'as --teacher, not --resume, for --losses {args.losses}')
    torch.manual_seed(args.seed)                               # Alg.1 l.1: F_theta <- F_tea, F_ema <- F_theta
    teacher = load_teacher(args.teacher, preset=args.preset or 'XL/1', device=dev) if args.teacher != 'none' else None
    student = (student_from_teacher(teacher) if teacher is not None else DiT(
        args.preset or 'tiny', C, H, args.num_classes or int(ds.labels.max()) + 1, s_embed=args.loss_set != ['fm']).to(dev))
    if ckpt is not None:
        student = load_dit_state(DiT(**ckpt['model_config']), ckpt['model'], resume).to(dev)
    cfg = student.config
    if (cfg['in_channels'], cfg['input_size'], cfg['input_size']) != (C, H, W):
        raise ValueError(f'the data has shape {(C, H, W)}, the model expects {(cfg["in_channels"],) + (cfg["input_size"],) * 2}')
    if int(ds.labels.max()) >= student.num_classes or int(ds.labels.min()) < 0:
        raise ValueError(f'labels range over [{int(ds.labels.min())}, {int(ds.labels.max())}], '
                         f'the model has {student.num_classes} classes')
    ema = DiT(**cfg).to(dev)
    ema.load_state_dict(ckpt['ema'] if ckpt else student.state_dict())
    ema.requires_grad_(False)
    for p in list(student.parameters()) + list(ema.parameters()) if world > 1 else []:
        dist.broadcast(p.data, 0)                              # identical start on every rank
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, args.beta2),
                            weight_decay=args.weight_decay, fused=dev.type == 'cuda')
    step, data_pos, nan_run, sums, counts, skipped = 0, 0, 0, {}, {}, torch.zeros((), device=dev)
    if ckpt is not None:
        opt.load_state_dict(ckpt['opt'])
        step, data_pos, logged_ = ckpt['step'], ckpt['data_pos'], ckpt['log']
        sums, counts = {k: v.to(dev) for k, v in logged_['sums'].items()}, dict(logged_['counts'])
        skipped = torch.as_tensor(logged_['skipped'], device=dev).float()
        set_rng_state(ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0])
    else:
        torch.manual_seed(args.seed + rank), np.random.seed(args.seed + rank), random.seed(args.seed + rank)
    teacher = torch.compile(teacher) if args.compile and teacher is not None else teacher
    mean, std = ds.mean.to(dev), ds.std.to(dev)
    stream = data_stream(ds, args.batch // world, args.seed, rank, world, data_pos, args.workers)
    try:
        os.makedirs(args.out, exist_ok=True)
        assert os.access(args.out, os.W_OK)
    except (OSError, AssertionError) as e:
        raise ValueError(f'--out {args.out}: cannot write there ({getattr(e, "strerror", None) or "not writable"})')
    log_path = os.path.join(args.out, 'log.jsonl')
    evaluator = (Evaluator(ds, args, dev, 4 * args.batch // (world * args.accum), student.s_embedder is None)
                 if args.eval_every and rank == 0 else None)
    if rank == 0 and os.path.exists(log_path):                 # the lines after the checkpoint are redone
        kept = [json.dumps(r) + '\n' for r in read_log(log_path) if r['step'] <= step]
        write_atomic(log_path, lambda f: f.write(''.join(kept).encode()))
    stop = {}
    old_handlers = {sig: signal.signal(sig, lambda s, f: stop.update(signal=s)) for sig in (signal.SIGINT, signal.SIGTERM)}
    per_epoch = len(ds) // args.batch
    if rank == 0:
        M = lambda m: f'{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M parameters'
        print(f'decm: {"teacher (flow-matching) training" if teacher is None and args.loss_set == ["fm"] else "DE-CM (Algorithm 1)"}: '
              f'losses {args.losses} (N2N every {args.freq} iterations); teacher {args.teacher}' + (f' ({M(teacher)})' if teacher else '') +
              f'\ndecm: student {cfg["preset"]}, {M(student)}, {cfg["num_classes"]} classes; EMA {args.ema}' +
              ' with warm-up' * args.ema_warmup + f'\ndecm: data {data}: {len(ds)} items of shape {ds.shape}, {per_epoch} '
              f'iterations per epoch; batch {args.batch} = {world} rank(s) x {args.accum} micro-batch(es) x '
              f'{args.batch // world // args.accum}\ndecm: device {dev}, passes {"bf16 autocast" if use_amp else "fp32"}, '
              f'JVPs {args.jvp_dtype}; iterations {step} -> {args.steps}' + ' (resumed)' * bool(step) + f'; checkpoints every {args.ckpt_every} in {args.out}'
              f'\ndecm: evaluation ' + (evaluator.describe if evaluator else 'off (--eval-every N)') +
              '\ndecm: flags changed from the defaults: ' + (' '.join(changed_flags(args)) or 'none'))
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc='train', dynamic_ncols=True)
    last_good, window_start, window_steps = resume, time.time(), 0
    while step < args.steps:
        lat, lat_flip, y = next(stream)
        data_pos += 1
        x = prepare_batch(lat, lat_flip, mean, std, dev)
        log, ok = train_step(student, ema, teacher, opt, x, y.to(dev), step, args, world, autocast)
        step, window_steps, skipped, nan_run = step + 1, window_steps + 1, skipped + log.pop('skipped').to(dev), 0 if ok else nan_run + 1
        for k, v in log.items():                               # on the device: no host sync per iteration
            sums[k], counts[k] = sums[k] + v if k in sums else v.clone(), counts.get(k, 0) + 1
        if nan_run >= args.nan_patience:
            bar.close()
            print(f'\nerror: training stopped at step {step}: {nan_run} non-finite updates in a row (losses '
                  f'{ {k: float(v) for k, v in log.items()} }); the last good checkpoint is {last_good}', file=sys.stderr)
            sys.exit(1)
        record = {}
        if step % args.log_every == 0:
            elapsed = (torch.cuda.synchronize(dev) if dev.type == 'cuda' else None, time.time() - window_start)[1]
            record = {'step': step, 'epoch': round(data_pos / per_epoch, 4), **{k: float(sums[k]) / counts[k] for k in sums},
                      'lr': opt.param_groups[0]['lr'], 'img_per_s': round(args.batch * window_steps / elapsed, 2),
                      's_per_it': round(elapsed / window_steps, 4), 'skipped': int(skipped),
                      'cuda_peak_gb': round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 3) if dev.type == 'cuda' else None}
            bar.set_postfix({k: f'{record[k]:.4f}' for k in ('cm', 'fm', 'n2n', 'fm2') if k in record}, refresh=False)
            sums, counts = {}, {}
        if evaluator is not None and step % args.eval_every == 0:
            record = {'step': step, **record, **evaluator(ema, step, autocast, mean, std)}
        if record and rank == 0:
            append_log(log_path, record)
            if evaluator is not None and 'eval_s' in record:
                plot_curves(args.out, read_log(log_path))
        window_start, window_steps = (time.time(), 0) if record else (window_start, window_steps)
        bar.update(1)
        if (step % args.ckpt_every == 0 or step == args.steps or stop) and nan_run == 0:
            rngs = [rng_state()] * world
            if world > 1:
                dist.all_gather_object(rngs, rng_state())
            if rank == 0:
                last_good = save_checkpoint(args.out, {
                    'model': student.state_dict(), 'ema': ema.state_dict(), 'opt': opt.state_dict(),
                    'args': {k: v for k, v in vars(args).items() if k != 'loss_set'}, 'model_config': cfg,
                    'step': step, 'data_pos': data_pos, 'rng': rngs, 'stats': {'mean': ds.mean, 'std': ds.std},
                    'loss_set': args.loss_set, 'log': {'sums': sums, 'counts': counts, 'skipped': skipped}}, step, args.keep)
        if stop:
            print(f'\nstopped by {signal.Signals(stop["signal"]).name} at step {step}; checkpoint {last_good}' * (rank == 0))
            break
    bar.close()
    for sig, handler in old_handlers.items():                 # in-process callers (tests)
        signal.signal(sig, handler)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return student, ema, last_good


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
