"""DE-CM training, Algorithm 1 line by line; also trains the teacher itself (`--losses fm --teacher none`).

Every iteration: draw z, t, x_t = (1 - t) z + t z_ref, the teacher velocity v_t (l.2-6), then one update
on L_cm + L_fm (l.8-15). Every `freq` iterations a second update on L_n2n + L_fm (l.17-28), with r -> 0.
The losses are in losses.py, the teacher velocity in teacher.py, the network in model.py.

Data: a "latents folder" in LightningDiT's extraction format (`latents_rank*_shard*.safetensors` holding
`latents`, `latents_flip`, `labels`, plus `latents_stats.pt` with `mean`, `std` of shape (1, C, 1, 1)).
Without `--data`, the built-in dataset (digits 0-9 drawn with pillow, 16x16) is generated in that same
format. Samples are normalised (z - mean) / std; the flipped copy is picked with probability 0.5.

Runs on CPU or CUDA (bf16 autocast for the network passes, JVPs in fp32, TF32 on) and under torchrun
(NCCL on CUDA, gloo on CPU). We all-reduce the gradients ourselves instead of wrapping the model in
DistributedDataParallel: DDP's hooks are armed only by its own forward, so a loss on the primal of a
torch.func.jvp of `model.module` would skip the all-reduce with no error, and a jvp through the wrapper
needs broadcast_buffers=False. One flat all-reduce after backward is explicit and test_all.py proves it
equal to a single-process step on the concatenated batch. `--accum K` runs each update on K micro-batches in
turn (gradient accumulation, for batches whose activations do not fit): the update is the same as on the
whole batch, since every loss is a mean over samples and the random draws are made for the whole batch.

Checkpoints (`{model, ema, opt, args, step, rng, data_pos}`) are written atomically (temporary file,
fsync, rename) with a `latest` pointer; `--resume auto` continues bit-exactly (RNG and data position
included). A non-finite loss or gradient skips the update; `--nan-patience` in a row stops the run.
SIGINT/SIGTERM save a checkpoint and exit.
"""
import argparse
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
from tqdm import tqdm

import losses
from model import DiT, PRESETS, student_from_teacher, load_dit_state
from teacher import load_teacher, teacher_velocity, read_checkpoint

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'digits16')
LOSS_NAMES = ('fm', 'cm', 'n2n')
JVP_DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}


# ----------------------------------------------------------------------------- built-in dataset
def make_digits(out_dir, n=20000, size=16, channels=1, seed=0, num_classes=10):
    """Digits 0-9 drawn with pillow's default font, random shift, scale, rotation and stroke width,
    size x size, in [-1, 1], written as a latents folder (one shard; latents_flip is the same image:
    a mirrored digit is not a digit). Deterministic for a seed."""
    from PIL import Image, ImageDraw, ImageFont
    from safetensors.torch import save_file
    rng = np.random.default_rng(seed)
    big = 4 * size                                             # draw large, then downsample (antialias)
    labels = rng.integers(0, num_classes, n)
    images = np.zeros((n, channels, size, size), np.float32)
    fonts = {}
    for i in tqdm(range(n), desc='building the digits dataset', leave=False):
        font_size = int(big * rng.uniform(0.55, 0.85))
        font = fonts.setdefault(font_size, ImageFont.load_default(size=font_size))
        im = Image.new('L', (big, big))
        cx, cy = big / 2 + rng.uniform(-0.1, 0.1) * big, big / 2 + rng.uniform(-0.1, 0.1) * big
        ImageDraw.Draw(im).text((cx, cy), str(labels[i] % 10), font=font, fill=255, anchor='mm',
                                stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
        im = im.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, center=(cx, cy))
        a = np.asarray(im.resize((size, size), Image.LANCZOS), np.float32) / 255.0
        color = rng.uniform(0.5, 1.0, channels) if channels > 1 else np.ones(1)
        images[i] = (a[None] * color[:, None, None]) * 2 - 1
    os.makedirs(out_dir, exist_ok=True)
    x = torch.from_numpy(images)
    tmp = os.path.join(out_dir, 'latents_rank00_shard000.safetensors.tmp')
    save_file({'latents': x, 'latents_flip': x.clone(), 'labels': torch.from_numpy(labels)}, tmp)
    os.replace(tmp, os.path.join(out_dir, 'latents_rank00_shard000.safetensors'))
    stats = {'mean': x.mean(dim=(0, 2, 3), keepdim=True), 'std': x.std(dim=(0, 2, 3), keepdim=True)}
    torch.save(stats, os.path.join(out_dir, 'latents_stats.pt'))
    return out_dir


# ----------------------------------------------------------------------------- latents folder
class LatentFolder(torch.utils.data.Dataset):
    """LightningDiT's latents folder. Items are (latent, flipped latent, label), not normalised."""

    def __init__(self, root, stats='file', flag='--data'):
        from safetensors import safe_open
        if not root or not os.path.isdir(root):
            raise ValueError(f'{flag} {root}: no such folder (give a latents folder, or ' +
                             ("no --data for the built-in dataset)" if flag == '--data' else "'builtin')"))
        self.files = sorted(glob.glob(os.path.join(root, '*.safetensors')))
        if not self.files:
            raise ValueError(f'{flag} {root}: no *.safetensors files (expected LightningDiT\'s '
                             f'latents_rank*_shard*.safetensors)')
        self.index, labels, shape, self.handles = [], [], None, {}
        for f in self.files:
            try:
                with safe_open(f, framework='pt') as h:
                    keys = set(h.keys())
                    if not {'latents', 'latents_flip', 'labels'} <= keys:
                        raise ValueError(f'{f} lacks latents/latents_flip/labels (has {sorted(keys)})')
                    lat = h.get_slice('latents').get_shape()
                    labels.append(h.get_tensor('labels').long().flatten())
            except ValueError:
                raise
            except Exception as e:
                raise ValueError(f'{f} is not a readable safetensors file ({str(e)[:100]})')
            if shape is not None and tuple(lat[1:]) != shape:
                raise ValueError(f'{f} holds latents of shape {tuple(lat[1:])}, other files {shape}')
            shape = tuple(lat[1:])
            self.index += [(f, i) for i in range(lat[0])]
        self.labels = torch.cat(labels)
        self.shape = shape
        if len(self.labels) != len(self.index):
            raise ValueError(f'{flag} {root}: {len(self.labels)} labels for {len(self.index)} latents')
        stats_file = os.path.join(root, 'latents_stats.pt')
        if stats == 'compute':
            self.compute_stats(stats_file)
        if not os.path.exists(stats_file):
            raise ValueError(f'{stats_file} is missing: run once with --latent-stats compute to make it '
                             f'(mean and std over up to 10,000 latents)')
        st = read_checkpoint(stats_file)
        self.mean, self.std = st['mean'].float().reshape(1, -1, 1, 1), st['std'].float().reshape(1, -1, 1, 1)
        if self.mean.shape[1] != shape[0]:
            raise ValueError(f'{stats_file} has {self.mean.shape[1]} channels, the latents {shape[0]}')

    def compute_stats(self, path):
        idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:10000]
        x = torch.stack([self[i][0] for i in idx.tolist()]).float()
        torch.save({'mean': x.mean(dim=(0, 2, 3), keepdim=True), 'std': x.std(dim=(0, 2, 3), keepdim=True)},
                   path + '.tmp')
        os.replace(path + '.tmp', path)

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        from safetensors import safe_open
        f, j = self.index[i]
        if f not in self.handles:                              # opened lazily, once per worker
            self.handles[f] = safe_open(f, framework='pt')
        h = self.handles[f]
        return h.get_slice('latents')[j], h.get_slice('latents_flip')[j], self.labels[i]


def batches_of_epoch(n, batch, epoch, seed, rank, world):
    """This rank's index batches for one epoch (DistributedSampler order, seeded by seed + epoch)."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=True)
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
        loader = torch.utils.data.DataLoader(
            ds, batch_sampler=batches_of_epoch(len(ds), batch, epoch, seed, rank, world)[skip:],
            num_workers=workers, generator=torch.Generator().manual_seed(seed),  # keeps the global RNG
            persistent_workers=False, pin_memory=torch.cuda.is_available())
        yield from loader
        epoch, skip = epoch + 1, 0


def prepare_batch(lat, lat_flip, mean, std, device):
    """Pick the flipped copy with probability 0.5, move to the device, normalise (z - mean) / std."""
    flip = torch.rand(lat.shape[0]) < 0.5
    x = torch.where(flip.view(-1, 1, 1, 1), lat_flip, lat).to(device, non_blocking=True).float()
    return (x - mean) / std


# ----------------------------------------------------------------------------- timesteps
def sample_t(n, args, device):
    """Alg.1 l.3. 'uniform-seg' (ours): uniform over the N+1 end points {0, 1/N, ..., 1} of N segments;
    'logit-normal': sigmoid of N(0, 1); 'arctan': sCM's arctan(e^tau / 0.5) law, tau ~ N(-1, 1.4),
    mapped to t = 1 - 2/pi * angle (t = 0 noise)."""
    if args.schedule == 'uniform-seg':
        return torch.randint(0, args.segments + 1, (n,), device=device).float() / args.segments
    if args.schedule == 'logit-normal':
        return torch.sigmoid(torch.randn(n, device=device))
    tau = torch.randn(n, device=device) * 1.4 - 1.0
    return 1 - (2 / math.pi) * torch.atan(torch.exp(tau) / 0.5)


# ----------------------------------------------------------------------------- one iteration
def lr_at(step, args):
    """Learning rate of iteration `step` (0-based): linear warm-up, then constant or cosine decay."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_schedule == 'cosine':
        done = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, done)))
    return args.lr


def all_reduce_grads(params, world):
    """Average gradients over ranks with one flat all-reduce (instead of DDP, see the docstring)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def ema_decay(step, args):
    """EMA decay at iteration `step` (0-based): --ema, or with --ema-warmup min(--ema, (1 + step) / (10 + step)),
    so that the average forgets the weights it started from (the teacher's) within a short run."""
    return min(args.ema, (1 + step) / (10 + step)) if args.ema_warmup else args.ema


def update(loss_of, model, ema, opt, args, world, decay=None):
    """Alg.1 l.15 / l.28: F_theta, F_ema <- update(F_theta, loss). loss_of(k) builds the loss of micro-batch
    k of `--accum` equal parts; each is backpropagated before the next is built (only one micro-batch of
    activations is alive), and the mean of their gradients is the full batch's (every loss is a mean
    over samples). Returns (mean loss, updated?, gradient norm before clipping); an update is skipped if
    it is non-finite."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    K = args.accum
    loss = 0.0
    for k in range(K):
        part = loss_of(k)
        (part / K if K > 1 else part).backward()
        loss = loss + part.detach() / K if K > 1 else part.detach()
    if world > 1:
        all_reduce_grads(params, world)
    gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float('inf'))
    # the NaN guard: one host sync per update (the same decision on every rank: gradients are all-reduced)
    if not (torch.isfinite(gnorm) and torch.isfinite(loss)):
        opt.zero_grad(set_to_none=True)
        return loss, False, gnorm.detach()
    opt.step()
    with torch.no_grad():
        ema_params = [e for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
        torch._foreach_lerp_(ema_params, params, 1 - (args.ema if decay is None else decay))
    return loss, True, gnorm.detach()


def draw(x_ref, args):
    """The random draws of one iteration: noise z (l.2), t (l.3), r (l.18), label dropout."""
    B, dev = x_ref.shape[0], x_ref.device
    return {'z': torch.randn_like(x_ref), 't': sample_t(B, args, dev),
            'r': torch.rand(B, device=dev) * args.r_max, 'drop': torch.rand(B, device=dev) < args.class_drop}


def train_step(student, ema, teacher, opt, batch, it, args, world, autocast, draws=None):
    """One iteration of Algorithm 1 on a normalised batch (x_ref, y). Returns (log, ok): log holds the losses
    (cm, fm, n2n, fm2), the gradient norms before clipping of the two updates (grad_norm, grad_norm2) and
    the number of skipped updates (skipped), all tensors; ok is False if an update was skipped.
    With `--accum K` each update runs on K equal micro-batches in turn; the random draws are made for
    the whole batch first, so the iteration is the same for every K (up to float rounding)."""
    x_ref, y = batch
    names = args.loss_set
    d = draws if draws is not None else draw(x_ref, args)
    if teacher is None and args.class_drop > 0:                # teacher training: CFG label dropout
        y = torch.where(d['drop'], torch.full_like(y, student.num_classes), y)
    K, B = args.accum, x_ref.shape[0]
    if B % K:
        raise ValueError(f'--accum {K} does not divide the batch of {B} samples per rank')
    parts = [slice(k * B // K, (k + 1) * B // K) for k in range(K)]
    vel = dict(w_cfg=args.w_cfg, eta=args.eta, vnorm=args.vnorm)
    jvp_dtype = JVP_DTYPES[args.jvp_dtype]
    log, inputs = {}, [None] * K

    def add(name, value):                                      # the mean over micro-batches, for the bar
        log[name] = value.detach() if K == 1 else log.get(name, 0.0) + value.detach() / K

    def step_inputs(k):                                        # l.2-6 on micro-batch k, kept for l.17-27
        if inputs[k] is None:
            sl = parts[k]
            z, t, xr = d['z'][sl], d['t'][sl], x_ref[sl]       # l.2-3
            x_t = (1 - losses.bcast(t, z)) * z + losses.bcast(t, z) * xr   # l.4
            with torch.no_grad(), autocast:                    # l.5-6
                v_t = teacher_velocity(teacher, x_t, t, y[sl], z, xr, **vel).to(x_ref.dtype)
            inputs[k] = (z, t, xr, y[sl], x_t, v_t, d['r'][sl])
        return inputs[k]

    def fm_term(k, name):                                      # L_fm at s = t (l.13-14, again at l.26-27)
        _, t, _, yk, x_t, v_t, _ = step_inputs(k)
        with autocast:
            fm = losses.fm_loss(student, x_t, t, yk, v_t, args.p, args.c)
        add(name, fm)
        return fm

    def cm_fm_loss(k):
        z, t, xr, yk, x_t, v_t, _ = step_inputs(k)
        loss = 0.0
        if 'cm' in names:                                      # l.8-11
            cm, _ = losses.cm_loss(student, x_t, t, yk, v_t, args.w1, args.p, args.c, args.fused, jvp_dtype,
                                   args.compile_jvp, args.w1_power, args.g_clip, args.cm_weight)
            add('cm', cm)
            loss = loss + cm
        if 'fm' in names:                                      # l.13-14
            loss = loss + fm_term(k, 'fm')
        return loss

    def n2n_fm_loss(k):
        z, t, xr, yk, x_t, v_t, r = step_inputs(k)
        r = torch.minimum(r, t)                                # l.18: r -> 0, r <= t
        x_r = (1 - losses.bcast(r, z)) * z + losses.bcast(r, z) * xr   # l.19
        with torch.no_grad(), autocast:                        # l.20-21
            v_r = teacher_velocity(teacher, x_r, r, yk, z, xr, **vel).to(x_ref.dtype)

        def v_psi(F_n2n):                                      # teacher velocity at time t (losses.py)
            if args.vpsi == 'interp' or teacher is None:
                return v_t                                     # Alg.1 l.23
            with torch.no_grad(), autocast:                    # Eq. 13: at f(x_r, r, t)
                x_hat = x_r + losses.bcast(t - r, x_r) * F_n2n
                return teacher_velocity(teacher, x_hat, t, yk, **vel).to(x_ref.dtype)
        n2n, _ = losses.n2n_loss(student, x_r, r, t, yk, v_r, v_psi, args.lam, args.gam, args.w2,
                                 args.p, args.c, args.fused, jvp_dtype, args.compile_jvp)   # l.22-25
        add('n2n', n2n)
        loss = n2n
        if 'fm' in names:                                      # l.26-27
            loss = loss + fm_term(k, 'fm2')
        return loss

    skipped = 0
    if 'cm' in names or 'fm' in names:
        _, ok, log['grad_norm'] = update(cm_fm_loss, student, ema, opt, args, world, ema_decay(it, args))   # l.15
        skipped += not ok
    if 'n2n' in names and it % args.freq == 0:                 # l.17
        _, ok, log['grad_norm2'] = update(n2n_fm_loss, student, ema, opt, args, world, ema_decay(it, args))  # l.28
        skipped += not ok
    log['skipped'] = torch.tensor(float(skipped))
    return log, skipped == 0


# ----------------------------------------------------------------------------- checkpoints
def rng_state():
    st = {'torch': torch.get_rng_state(), 'numpy': torch.tensor(np.random.get_state()[1].astype(np.int64)),
          'numpy_pos': np.random.get_state()[2], 'python': random.getstate()}
    if torch.cuda.is_available():
        st['cuda'] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st):
    torch.set_rng_state(st['torch'])
    np.random.set_state(('MT19937', st['numpy'].numpy().astype(np.uint32), st['numpy_pos'], 0, 0.0))
    random.setstate((st['python'][0], tuple(st['python'][1]), st['python'][2]))
    if 'cuda' in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st['cuda'])


def save_checkpoint(out, obj, step, keep):
    """Atomic: write a temporary file in the same folder, fsync, rename; then the `latest` pointer.
    Keeps the newest `keep` checkpoints. A kill at any moment leaves `latest` loadable."""
    name = f'ckpt_{step:07d}.pt'
    tmp = os.path.join(out, f'.{name}.tmp')
    try:
        with open(tmp, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:                                       # disk full, quota: keep the last good one
        if os.path.exists(tmp):
            os.remove(tmp)
        raise ValueError(f'cannot write checkpoint {name} in {out} ({e.strerror or e}); the previous '
                         f'checkpoint ({latest_checkpoint(out)}) is intact')
    os.replace(tmp, os.path.join(out, name))
    with open(os.path.join(out, '.latest.tmp'), 'w') as f:
        f.write(name + '\n')
        f.flush()
        os.fsync(f.fileno())
    os.replace(os.path.join(out, '.latest.tmp'), os.path.join(out, 'latest'))
    dfd = os.open(out, os.O_RDONLY)
    os.fsync(dfd)
    os.close(dfd)
    for old in sorted(glob.glob(os.path.join(out, 'ckpt_*.pt')))[:-keep]:
        os.remove(old)
    return os.path.join(out, name)


def latest_checkpoint(out):
    p = os.path.join(out, 'latest')
    if not os.path.exists(p):
        return None
    with open(p) as f:
        return os.path.join(out, f.read().strip())


def load_student_checkpoint(path):
    """Our checkpoint -> (model config, dict). Anything else gets a one-line error."""
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict) or not {'model', 'ema', 'model_config', 'args'} <= set(ckpt):
        raise ValueError(f'{path} is not a decm checkpoint (expected model, ema, opt, args, step)')
    return ckpt


# ----------------------------------------------------------------------------- watching a run
# OUT/log.jsonl: one JSON object per line, {"step": ..., ...}. Training lines (every --log-every) hold the
# means over the iterations since the previous line; evaluation lines (every --eval-every) the quality
# figures; a step that has both gets one line. On resume the lines after the checkpoint's step are dropped
# (they are computed again), and the running sums are in the checkpoint, so the log of a resumed run has
# every step once and the same losses as an uninterrupted run.
def read_log(path):
    """The records of a log.jsonl (a line cut short by a kill is skipped)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get('step'), int):
                records.append(rec)
    return records


def trim_log(path, step):
    """Keep the records up to `step` (the checkpoint a run resumes from; 0 for a fresh run). Atomic."""
    if not os.path.exists(path):
        return
    keep = [r for r in read_log(path) if r['step'] <= step]
    with open(path + '.tmp', 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in keep)
    os.replace(path + '.tmp', path)


def append_log(path, record):
    """One JSON line (non-finite numbers are written as null, which every JSON reader accepts)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(path, 'a') as f:
        f.write(json.dumps(clean) + '\n')
        f.flush()


def image_grid(images, cols):
    """uint8 (N, H, W, C) -> one uint8 (rows * H, cols * W, C) grid of the first cols^2 images."""
    n = min(len(images), cols * cols)
    rows = (n + cols - 1) // cols
    H, W, C = images.shape[1:]
    grid = np.zeros((rows * H, cols * W, C), np.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[r * H:(r + 1) * H, c * W:(c + 1) * W] = images[i]
    return grid


def save_eval_grid(path, panels):
    """Side-by-side grids [(title, uint8 grid HWC)] with their titles, small images enlarged. Atomic."""
    from PIL import Image, ImageDraw
    ims = []
    for _, g in panels:
        im = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).convert('RGB')
        scale = max(1, min(4, 320 // im.width))
        ims.append(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
    pad, title = 8, 16
    canvas = Image.new('RGB', (sum(im.width for im in ims) + pad * (len(ims) + 1),
                               max(im.height for im in ims) + title + 2 * pad), 'white')
    draw = ImageDraw.Draw(canvas)
    x0 = pad
    for (name, _), im in zip(panels, ims):
        draw.text((x0, 4), name, fill='black')
        canvas.paste(im, (x0, title + pad))
        x0 += im.width + pad
    os.makedirs(os.path.dirname(path), exist_ok=True)
    canvas.save(path + '.tmp.png')
    os.replace(path + '.tmp.png', path)


def nice_ticks(lo, hi, n=5):
    """About n round values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    span = max(hi - lo, 1e-12)
    raw = span / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def smooth(ys, frac=0.05):
    """Moving average over a window of frac of the points (at least 1): the curve without the noise."""
    k = max(1, int(len(ys) * frac))
    out, acc = [], 0.0
    for i, y in enumerate(ys):
        acc += y
        if i >= k:
            acc -= ys[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot_curves(path, records):
    """OUT/curves.png: the losses (smoothed), the gradient norm and the quality figures against the
    iteration, one panel each, log y axes. Pillow only. Atomic."""
    from PIL import Image, ImageDraw, ImageFont
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:                                          # pillow < 10.1
        font = ImageFont.load_default()
    quality = sorted({k for r in records for k in r if k.startswith(('fd_', 'fid_'))})
    panels = [('losses (smoothed)', ['cm', 'fm', 'n2n', 'fm2']),
              ('gradient norm before clipping (smoothed)', ['grad_norm', 'grad_norm2']),
              (('FID' if any(k.startswith('fid') for k in quality) else 'pixel FD') +
               ' of the EMA network (nfeK: K network calls)', quality)]
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]
    pw, ph, ml, mr, mt, mb = 420, 320, 56, 12, 40, 36
    im = Image.new('RGB', (pw * len(panels), ph), 'white')
    d = ImageDraw.Draw(im)
    for p, (title, keys) in enumerate(panels):
        ox = p * pw
        d.text((ox + 6, 6), title, fill='black', font=font)
        series = {}
        for k in keys:
            pts = [(r['step'], r[k]) for r in records if isinstance(r.get(k), (int, float)) and r[k] > 0]
            if pts:
                ys = [y for _, y in pts] if k in quality else smooth([y for _, y in pts])
                series[k] = [(x, y) for (x, _), y in zip(pts, ys)]
        x0, x1, y0, y1 = ox + ml, ox + pw - mr, ph - mb, mt
        d.rectangle([x0, y1, x1, y0], outline='black')
        if not series:
            d.text((x0 + 10, (y0 + y1) // 2), 'nothing yet' if keys else 'no evaluation', fill='gray', font=font)
            continue
        xs = [x for s in series.values() for x, _ in s]
        ly = [math.log10(y) for s in series.values() for _, y in s]
        xa, xb = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
        la, lb = min(ly), max(ly)
        la, lb = (la - 0.5, lb + 0.5) if lb - la < 1e-6 else (la - 0.05 * (lb - la), lb + 0.05 * (lb - la))
        X = lambda x: x0 + (x - xa) / (xb - xa) * (x1 - x0)
        Y = lambda y: y0 - (math.log10(y) - la) / (lb - la) * (y0 - y1)
        if lb - la > 3:                                        # y grid: powers of 10, 1-2-5, or round values
            every = math.ceil((lb - la) / 6)
            yt = [10.0 ** e for e in range(math.floor(la), math.ceil(lb) + 1) if e % every == 0]
        elif lb - la > 1:
            yt = [m * 10.0 ** e for e in range(math.floor(la), math.ceil(lb) + 1) for m in (1, 2, 5)]
        else:
            yt = [v for v in nice_ticks(10 ** la, 10 ** lb) if v > 0]
        for v in yt:
            if la <= math.log10(v) <= lb:
                d.line([(x0, Y(v)), (x1, Y(v))], fill=(225, 225, 225))
                d.text((x0 - 4, Y(v)), f'{v:g}', fill='black', font=font, anchor='rm')
        for t in nice_ticks(xa, xb):
            d.line([(X(t), y0), (X(t), y0 + 4)], fill='black')
            d.text((X(t), y0 + 6), f'{t:g}', fill='black', font=font, anchor='mt')
        d.text(((x0 + x1) / 2, ph - 4), 'iteration', fill='black', font=font, anchor='mb')
        lx = ox + 8
        for i, (k, s) in enumerate(series.items()):
            col = colors[i % len(colors)]
            pts = [(X(x), Y(y)) for x, y in s]
            if len(pts) > 1:
                d.line(pts, fill=col, width=2)
            if k in quality or len(pts) == 1:
                for px, py in pts:
                    d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=col)
            label = f'{k} {s[-1][1]:.3g}'                      # legend: one row under the title
            d.line([(lx, 27), (lx + 14, 27)], fill=col, width=3)
            d.text((lx + 17, 21), label, fill='black', font=font)
            lx += 28 + d.textlength(label, font=font)
    im.save(path + '.tmp.png')
    os.replace(path + '.tmp.png', path)


def print_startup(args, student, teacher, data, ds, world, dev, use_amp, per_epoch, step, evaluator):
    """The block that says what will run, before the first iteration (rank 0)."""
    say = lambda text: print('decm: ' + text)
    n_params = lambda m: sum(p.numel() for p in m.parameters()) / 1e6   # all, trainable or not
    what = 'flow-matching (teacher) training' if args.loss_set == ['fm'] and teacher is None else 'DE-CM (Algorithm 1)'
    say(f'{what}: losses {",".join(args.loss_set)}' + (f' (N2N update every {args.freq} iterations)' if 'n2n' in
        args.loss_set else '') + f'; teacher {args.teacher}' + (f' ({n_params(teacher):.2f}M parameters)'
                                                               if teacher is not None else ''))
    cfg = student.config
    say(f'student: {cfg["preset"]} preset, {n_params(student):.2f}M parameters, {cfg["num_classes"]} classes, '
        f'EMA decay {args.ema}')
    say(f'data {data}: {len(ds)} items of shape {tuple(ds.shape)}, {per_epoch} iterations per epoch')
    say(f'batch {args.batch} global = {args.batch // world} per rank x {world} rank(s), gradient accumulation '
        f'{getattr(args, "accum", 1)}; device {dev}')
    say(f'dtypes: weights, gradients, AdamW and EMA fp32; network passes {"bf16 autocast" if use_amp else "fp32"}; '
        f'JVPs {args.jvp_dtype}' + ('; TF32 matmuls on' if dev.type == 'cuda' else ''))
    say(f'iterations {step} -> {args.steps}' + (' (resumed)' if step else '') + f'; checkpoint every '
        f'{args.ckpt_every} in {args.out}; every {args.log_every} a line in {os.path.join(args.out, "log.jsonl")}')
    say('evaluation: ' + (evaluator.describe() if evaluator is not None else 'off (--eval-every N turns it on)'))
    say('flags changed from the defaults: ' + (' '.join(changed_flags(args)) or 'none'))


class Evaluator:
    """--eval-every: samples of the EMA network with the CM sampler at 1 and 2 NFE (a flow-matching teacher
    run: its Euler sampler, no CFG, at 4 and 16 steps), from the same noise and labels at every evaluation
    (seeded private generators: the global RNG, hence training, is untouched), a grid
    OUT/samples/step_XXXXXXX.png, and a quality figure on --eval-samples samples: the pixel FD
    (fid.pixel_fd) against as many training images for 1- or 3-channel data, FID for latents decoded with
    --vae (against --fid-ref with --inception)."""

    def __init__(self, ds, args, dev, batch, flow_model=False):
        import fid
        self.ds, self.args, self.dev, self.batch = ds, args, dev, batch
        self.sampler, self.nfes = ('Euler', (4, 16)) if flow_model else ('CM', (1, 2))
        self.pixels = ds.shape[0] in (1, 3)
        self.vae = self.inception = self.ref_stats = self.real = None
        if self.pixels:                                        # a fixed random subset of the training data
            idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[:args.eval_samples]
            self.real = torch.stack([ds[i][0] for i in idx.tolist()]).float().numpy()
        else:
            from model import load_vavae_decoder
            self.vae = load_vavae_decoder(args.vae, dev)
            if args.fid_ref:
                self.inception = fid.load_inception(args.inception, dev)
                self.ref_stats = fid.source_stats(args.fid_ref, self.inception)[:2]

    def describe(self):
        n, D = self.args.eval_samples, int(np.prod(self.ds.shape))
        if self.pixels:
            what = f'pixel FD of {n} samples against {len(self.real)} training images ({D} pixels)'
            if n <= D:
                what += f' (warning: {n} <= {D} pixels: singular covariance, the FD is biased high)'
        else:
            what = (f'FID of {n} decoded samples against {self.args.fid_ref}' if self.args.fid_ref else
                    'no quality figure (give --fid-ref and --inception for FID)')
            if self.args.fid_ref and n <= 2048:
                what += f' (warning: {n} <= 2048 Inception features: singular covariance, the FID is biased high)'
        return (f'every {self.args.eval_every} iterations: {self.sampler} sampler at {self.nfes[0]} and '
                f'{self.nfes[1]} NFE, EMA weights, fixed noise and labels, {what}')

    @torch.no_grad()
    def __call__(self, ema, step, autocast, stats):
        import fid
        import sample
        t0 = time.time()
        a, rec, panels = self.args, {}, []
        cols = 10 if self.ds.shape[1] <= 64 else 4
        for nfe in self.nfes:
            with autocast:
                xs, _, _ = sample.generate(ema, self.sampler.lower(), a.eval_samples, nfe, ema.num_classes, seed=a.seed,
                                           batch=self.batch, device=self.dev, progress=False)
            x = torch.cat([xs[k] for k in sorted(xs)]).float() * stats['std'].cpu() + stats['mean'].cpu()
            if self.pixels:
                images = sample.to_uint8(x).numpy()
                rec[f'fd_nfe{nfe}'] = fid.pixel_fd(x.numpy(), self.real)
            else:
                from model import decode_to_uint8
                images = np.concatenate([decode_to_uint8(self.vae, x[i:i + 16].to(self.dev)).cpu().numpy()
                                         for i in range(0, len(x), 16)])
                if self.ref_stats is not None:
                    mu, sigma = fid.inception_stats(images, self.inception)
                    rec[f'fid_nfe{nfe}'] = fid.frechet_distance(mu, sigma, *self.ref_stats)
            panels.append((f'{self.sampler} sampler, {nfe} NFE (EMA, step {step})', image_grid(images, cols)))
        save_eval_grid(os.path.join(a.out, 'samples', f'step_{step:07d}.png'), panels)
        rec['eval_samples'] = a.eval_samples
        rec['eval_s'] = round(time.time() - t0, 3)
        return rec


# ----------------------------------------------------------------------------- main
def cli_parser(doc):
    """argparse with one-line errors (`error: ...`, exit code 2) instead of usage + error."""
    ap = argparse.ArgumentParser(description=doc.split('\n\n')[0])

    def error(msg):
        print(f'error: {msg}', file=sys.stderr)
        sys.exit(2)
    ap.error = error
    return ap


def bounded(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: kind(text) in [lo, hi] (open at an end with lo_open / hi_open), else the flag is
    refused before any work starts: `error: argument --mix-t: 1.5 is out of range: give a number in (0, 1)`."""
    what = 'an integer' if kind is int else 'a number'
    interval = (f'in {"(" if lo_open else "["}{"-inf" if lo is None else f"{lo:g}"}, '
                f'{"inf" if hi is None else f"{hi:g}"}{")" if hi_open or hi is None else "]"}')
    if hi is None:
        interval = f'{">" if lo_open else ">="} {lo:g}'

    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {what}')
        if not math.isfinite(value) or (lo is not None and (value < lo or (lo_open and value == lo))) or \
                (hi is not None and (value > hi or (hi_open and value == hi))):
            raise argparse.ArgumentTypeError(f'{text} is out of range: give {what} {interval}')
        return value
    parse.__name__ = kind.__name__
    return parse


def device_flag(text):
    """An argparse type for --device: auto, cpu, cuda or cuda:N; CUDA must be there if asked for."""
    if text == 'auto':
        return text
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a device: give auto, cpu, cuda or cuda:N')
    if dev.type not in ('cpu', 'cuda'):
        raise argparse.ArgumentTypeError(f'{text!r}: only cpu and cuda are supported (or auto)')
    if dev.type == 'cuda' and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f'{text}: CUDA is not available here; give --device cpu or auto')
    if dev.type == 'cuda' and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f'{text}: there are {torch.cuda.device_count()} CUDA devices')
    return text


def set_threads(n):
    """--threads N > 0: torch.set_num_threads(N). On a machine that other jobs keep busy, PyTorch's
    default (one spinning thread per core) can be 10-30x slower than 1 thread."""
    if n > 0:
        torch.set_num_threads(n)


POS_INT, NONNEG_INT = bounded(int, 1), bounded(int, 0)
NONNEG, POS, UNIT = bounded(float, 0), bounded(float, 0, lo_open=True), bounded(float, 0, 1)


def build_parser():
    ap = cli_parser(__doc__)
    A = ap.add_argument
    A('--data', default=None, help='latents folder (LightningDiT format); default: the built-in digits, '
      f'generated into {os.path.relpath(BUILTIN_DIR)} on first use')
    A('--latent-stats', default='file', choices=['file', 'compute'],
      help='read DATA/latents_stats.pt, or compute it from the data first')
    A('--out', default='runs/decm', help='output folder for checkpoints, log.jsonl, samples/ and curves.png')
    A('--teacher', default='none', help="teacher checkpoint (ours or LightningDiT's), or 'none' for "
      'training from scratch with v = z_ref - z (with --losses fm: trains a teacher)')
    A('--losses', default='fm,cm,n2n', help='comma list of fm, cm, n2n (Table 3 ablations (c)-(g))')
    A('--preset', default=None, choices=list(PRESETS), help='architecture: of the model when training from '
      "scratch (default tiny), or of a LightningDiT-format --teacher file, which does not name it (default XL/1); "
      'the student copies its teacher\'s architecture')
    A('--num-classes', type=POS_INT, default=None, help='classes (default: 1 + the largest label in the data)')
    A('--steps', type=POS_INT, default=2000, help='training iterations')
    A('--batch', type=POS_INT, default=128, help='global batch size (split over torchrun ranks)')
    A('--accum', type=POS_INT, default=1, help='micro-batches per optimizer update (gradient accumulation): each '
      'rank holds the activations of batch / (ranks x accum) samples at a time; the update is the same')
    A('--lr', type=POS, default=1e-4, help='AdamW learning rate (paper: 1e-4)')
    A('--lr-schedule', default='constant', choices=['constant', 'cosine'],
      help="learning rate over the run: 'constant', or 'cosine' decay to 0 at --steps (after --warmup)")
    A('--warmup', type=NONNEG_INT, default=0, help='iterations of linear learning-rate warm-up from 0')
    A('--beta2', type=bounded(float, 0, 1, hi_open=True), default=0.95, help="AdamW beta2 (LightningDiT's 0.95)")
    A('--weight-decay', type=NONNEG, default=0.0, help='AdamW weight decay')
    A('--ema', type=bounded(float, 0, 1, hi_open=True), default=0.995,
      help='EMA decay per update (0.9999 for long GPU runs)')
    A('--ema-warmup', action='store_true', help='EMA decay min(--ema, (1 + step) / (10 + step)): the average '
      'forgets its starting weights early (for short runs; off: the constant decay of Alg. 1)')
    A('--freq', type=POS_INT, default=3, help='N2N update every freq iterations (paper: 3)')
    A('--schedule', default='uniform-seg', choices=['uniform-seg', 'logit-normal', 'arctan'],
      help='distribution of t (Table 3 (j)-(l))')
    A('--segments', type=POS_INT, default=8, help='N: t is drawn from the end points of N segments')
    A('--r-max', type=UNIT, default=0.05, help='r -> 0 is drawn uniformly from [0, r_max], and r <= t')
    A('--lam', type=NONNEG, default=1.0, help='lambda: weight of the left (r) end of N2N')
    A('--gam', type=NONNEG, default=1.0, help='gamma: weight of the right (t) end of N2N')
    A('--w1', type=NONNEG, default=1.0, help='w1(t), constant: weight of g_cm in the CM target')
    A('--w1-power', type=NONNEG, default=0.0, help='q > 0: w1(t) = w1 (1 - t^q), FACM\'s relaxation '
      '(0: the constant w1 of Alg. 1)')
    A('--g-clip', type=NONNEG, default=0.0, help='clip g_cm elementwise to [-g_clip, g_clip] in the CM target (FACM: 1; 0: off)')
    A('--cm-weight', default='none', choices=['none', 'cos'], help="per-sample weight of L_cm: 'cos' = cos(pi t / 2) (FACM), 'none' = 1")
    A('--w2', type=NONNEG, default=1.0, help='w2(r, t), constant: weight of g_n2n in the N2N target')
    A('--p', type=UNIT, default=0.5, help='adaptive weighting power (0.5: pseudo-Huber; 0: plain L2)')
    A('--c', type=POS, default=1e-3, help='adaptive weighting constant')
    A('--w-cfg', type=NONNEG, default=2.0, help='CFG weight of the teacher velocity (1: no guidance)')
    A('--eta', type=NONNEG, default=0.05, help='RMS of the normalised guidance direction (teacher.py); 0.05 is about the RMS of v_c - v_u of the built-in teacher')
    A('--no-vnorm', dest='vnorm', action='store_false', help='plain CFG, Eq. 18 (Table 3 (i))')
    A('--vpsi', default='pred', choices=['pred', 'interp'],
      help='N2N teacher velocity at t: at the predicted point (Eq. 13) or at the interpolated x_t (Alg.1 l.23)')
    A('--class-drop', type=UNIT, default=0.1, help='label dropout when training without a teacher')
    A('--no-fused', dest='fused', action='store_false',
      help='JVP under no_grad plus a separate forward (less memory, one more forward)')
    A('--jvp-dtype', default='fp32', choices=list(JVP_DTYPES),
      help='precision of the JVPs: fp32 (autocast off, TF32 on CUDA) or bf16 (under bf16 autocast)')
    A('--grad-clip', type=NONNEG, default=1.0, help='gradient-norm clipping (0: off)')
    A('--nan-patience', type=POS_INT, default=5, help='stop after this many non-finite updates in a row')
    A('--seed', type=NONNEG_INT, default=0, help='random seed (rank r uses seed + r)')
    A('--device', type=device_flag, default='auto', help='auto, cpu or cuda')
    A('--amp', default='auto', choices=['auto', 'on', 'off'], help='bf16 autocast (auto: on for CUDA)')
    A('--compile', action='store_true', help='torch.compile the teacher (inference only; the student runs eager for torch.func.jvp)')
    A('--compile-jvp', action='store_true', help="torch.compile the student's JVPs and the backward through "
      'their primal (CM and N2N; about 1.4x faster on CPU after a compile of 1-2 minutes per JVP)')
    A('--workers', type=NONNEG_INT, default=0, help='data loader worker processes')
    A('--threads', type=NONNEG_INT, default=0, help='torch.set_num_threads (0: the default, one per core); '
      '1 is much faster when other jobs share the CPU')
    A('--ckpt-every', type=POS_INT, default=500, help='checkpoint every N iterations')
    A('--keep', type=POS_INT, default=2, help='checkpoints to keep')
    A('--resume', default='', help="'auto' (OUT/latest) or a checkpoint path")
    A('--log-every', type=POS_INT, default=10,
      help='every N iterations: one line in OUT/log.jsonl (means over the N iterations) and the progress bar')
    A('--eval-every', type=NONNEG_INT, default=0,
      help='every N iterations (0: never): EMA samples of the CM sampler at 1 and 2 NFE from fixed noise and '
      'labels -> OUT/samples/step_N.png, a quality figure (pixel FD; FID for latents with --vae, --fid-ref, '
      '--inception) in log.jsonl, and OUT/curves.png')
    A('--eval-samples', type=bounded(int, 2), default=1000,
      help='samples per evaluation (pixel FD: fewer than the number of pixels gives a singular covariance)')
    A('--vae', default=None, help='evaluation on latents: VA-VAE file to decode the samples into images')
    A('--fid-ref', default=None, help='evaluation on latents: FID reference (image folder, ADM .npz or stats .npz)')
    A('--inception', default=None, help='evaluation on latents: pt_inception-2015-12-05-6726825d.pth for FID')
    A('--builtin-size', type=bounded(int, 10), default=20000, help='samples in the built-in dataset')
    return ap


def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    args.loss_set = [x.strip() for x in args.losses.split(',') if x.strip()]
    bad = [x for x in args.loss_set if x not in LOSS_NAMES]
    if bad or not args.loss_set:
        ap.error(f'--losses {args.losses}: unknown loss {bad} (choose from fm, cm, n2n)')
    for flag, path in (('--vae', args.vae), ('--fid-ref', args.fid_ref), ('--inception', args.inception)):
        if path is not None and not os.path.exists(path):
            ap.error(f'{flag} {path}: no such file or folder')
    if args.fid_ref and not args.inception:
        ap.error(f'--fid-ref {args.fid_ref}: FID of the evaluation samples also needs --inception PATH')
    return args


def changed_flags(args):
    """The flags of args that differ from their defaults, as they would be typed."""
    defaults = vars(build_parser().parse_args([]))
    out = []
    for k, v in vars(args).items():
        if k in defaults and defaults[k] != v:
            flag = '--' + k.replace('_', '-')
            if isinstance(v, bool):                            # store_false flags: --no-vnorm, --no-fused
                flag = {'vnorm': '--no-vnorm', 'fused': '--no-fused'}.get(k, flag)
                out.append(flag)
            else:
                out.append(f'{flag} {v}')
    return out


def setup_distributed(args):
    if 'RANK' not in os.environ:
        dev = torch.device('cuda' if args.device == 'auto' and torch.cuda.is_available() else
                           ('cpu' if args.device == 'auto' else args.device))
        return 0, 1, dev
    cuda = torch.cuda.is_available() and args.device != 'cpu'
    dist.init_process_group('nccl' if cuda else 'gloo')
    rank, world = dist.get_rank(), dist.get_world_size()
    if cuda:
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    return rank, world, torch.device(f'cuda:{torch.cuda.current_device()}' if cuda else 'cpu')


def train(args):
    set_threads(args.threads)
    rank, world, dev = setup_distributed(args)
    if args.batch % (world * args.accum):
        raise ValueError(f'--batch {args.batch} is not divisible by {world} rank(s) x --accum {args.accum}')
    if dev.type == 'cuda':                                     # TF32 for the fp32 passes (the JVPs)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    use_amp = args.amp == 'on' or (args.amp == 'auto' and dev.type == 'cuda')
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp)

    data = args.data
    if data is None:
        data = BUILTIN_DIR
        if not os.path.exists(os.path.join(data, 'latents_stats.pt')):
            if rank == 0:
                make_digits(data, n=args.builtin_size)
            if world > 1:
                dist.barrier()
    ds = LatentFolder(data, args.latent_stats if rank == 0 else 'file')
    C, H, W = ds.shape
    if len(ds) // world < args.batch // world:                 # fail before the progress bar is drawn
        raise ValueError(f'the dataset has {len(ds)} samples, fewer than one batch of {args.batch // world} per rank')
    if args.eval_every and C not in (1, 3) and not args.vae:
        raise ValueError(f'--eval-every on latents of shape {(C, H, W)} needs --vae PATH to decode the samples '
                         f'(and --fid-ref, --inception for FID)')
    resume = latest_checkpoint(args.out) if args.resume == 'auto' else (args.resume or None)
    ckpt = load_student_checkpoint(resume) if resume else None
    if ckpt is not None and args.loss_set != ['fm'] and not ckpt['model_config'].get('s_embed', True):
        raise ValueError(f'{resume} is a flow-matching (teacher) checkpoint without the s input: give it '
                         f'as --teacher, not --resume, for --losses {args.losses}')

    # Alg.1 l.1: F_theta <- copyWeights(F_tea), F_ema <- copyWeights(F_theta)
    torch.manual_seed(args.seed)
    teacher = None
    if args.teacher != 'none':
        teacher = load_teacher(args.teacher, preset=args.preset or 'XL/1', device=dev)
        student = student_from_teacher(teacher)
    else:
        n_cls = args.num_classes or int(ds.labels.max()) + 1
        s_embed = args.loss_set != ['fm']                      # a plain flow-matching teacher has no s
        student = DiT(args.preset or 'tiny', in_channels=C, input_size=H, num_classes=n_cls, s_embed=s_embed).to(dev)
    if ckpt is not None:
        student = DiT(**ckpt['model_config']).to(dev)
        load_dit_state(student, ckpt['model'], resume)
    cfg = student.config
    if (cfg['in_channels'], cfg['input_size'], cfg['input_size']) != (C, H, W):
        raise ValueError(f'the data has shape {(C, H, W)}, the model expects '
                         f'{(cfg["in_channels"], cfg["input_size"], cfg["input_size"])}')
    if int(ds.labels.max()) >= student.num_classes or int(ds.labels.min()) < 0:
        raise ValueError(f'labels range over [{int(ds.labels.min())}, {int(ds.labels.max())}], '
                         f'the model has {student.num_classes} classes')
    ema = DiT(**cfg).to(dev)
    ema.load_state_dict(ckpt['ema'] if ckpt else student.state_dict())
    ema.requires_grad_(False)
    if world > 1:                                              # identical start on every rank
        for p in list(student.parameters()) + list(ema.parameters()):
            dist.broadcast(p.data, 0)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr,
                            betas=(0.9, args.beta2), weight_decay=args.weight_decay,
                            fused=dev.type == 'cuda')
    step, data_pos, nan_run = 0, 0, 0
    sums, counts, skipped = {}, {}, torch.zeros((), device=dev)   # log.jsonl: sums since the last line
    if ckpt is not None:
        opt.load_state_dict(ckpt['opt'])
        step, data_pos = ckpt['step'], ckpt['data_pos']
        logged = ckpt.get('log', {'sums': {}, 'counts': {}, 'skipped': 0.0})
        sums = {k: v.to(dev) for k, v in logged['sums'].items()}
        counts, skipped = dict(logged['counts']), torch.as_tensor(logged['skipped'], device=dev).float()
        set_rng_state(ckpt['rng'][rank] if rank < len(ckpt['rng']) else ckpt['rng'][0])
    else:
        torch.manual_seed(args.seed + rank)
        np.random.seed(args.seed + rank)
        random.seed(args.seed + rank)
    if args.compile:
        teacher = torch.compile(teacher) if teacher is not None else None
    mean, std = ds.mean.to(dev), ds.std.to(dev)
    stream = data_stream(ds, args.batch // world, args.seed, rank, world, data_pos, args.workers)

    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f'--out {args.out}: cannot create the folder ({e.strerror or e})')
    if not os.access(args.out, os.W_OK):
        raise ValueError(f'--out {args.out} is not writable')
    log_path = os.path.join(args.out, 'log.jsonl')
    evaluator = (Evaluator(ds, args, dev, 4 * (args.batch // (world * args.accum)), student.s_embedder is None)
                 if args.eval_every and rank == 0 else None)
    if rank == 0:
        trim_log(log_path, step)                              # lines after the checkpoint are redone
    stop = {'signal': None}
    old_handlers = {sig: signal.signal(sig, lambda s, f: stop.update(signal=s))   # restored below
                    for sig in (signal.SIGINT, signal.SIGTERM)}

    def checkpoint():
        rngs = [rng_state()]
        if world > 1:
            rngs = [None] * world
            dist.all_gather_object(rngs, rng_state())
        if rank == 0:
            plain_args = {k: v for k, v in vars(args).items() if k != 'loss_set'}
            return save_checkpoint(args.out, {
                'model': student.state_dict(), 'ema': ema.state_dict(), 'opt': opt.state_dict(),
                'args': plain_args, 'model_config': student.config, 'step': step, 'data_pos': data_pos,
                'rng': rngs, 'stats': {'mean': ds.mean, 'std': ds.std}, 'loss_set': args.loss_set,
                'log': {'sums': sums, 'counts': counts, 'skipped': skipped}}, step, args.keep)

    per_epoch = (len(ds) // world) // (args.batch // world)
    if rank == 0:
        print_startup(args, student, teacher, data, ds, world, dev, use_amp, per_epoch, step, evaluator)
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc='train', dynamic_ncols=True)
    last_good = resume
    window_start, window_steps = time.time(), 0
    while step < args.steps:
        lat, lat_flip, y = next(stream)
        data_pos += 1
        x = prepare_batch(lat, lat_flip, mean, std, dev)
        for group in opt.param_groups:
            group['lr'] = lr_at(step, args)
        log, ok = train_step(student, ema, teacher, opt, (x, y.to(dev)), step, args, world, autocast)
        step += 1
        window_steps += 1
        skipped += log.pop('skipped').to(dev)
        for k, v in log.items():                               # on the device: no host sync per iteration
            sums[k] = sums[k] + v if k in sums else v.clone()
            counts[k] = counts.get(k, 0) + 1
        nan_run = 0 if ok else nan_run + 1
        if nan_run >= args.nan_patience:
            bad = {k: float(v) for k, v in log.items()}
            bar.close()
            print(f'\nerror: training stopped at step {step}: {nan_run} non-finite updates in a row '
                  f'(losses {bad}); the last good checkpoint is {last_good}', file=sys.stderr)
            sys.exit(1)
        record = {}
        if step % args.log_every == 0:
            if dev.type == 'cuda':
                torch.cuda.synchronize(dev)
            elapsed = time.time() - window_start
            record = {'step': step, 'epoch': round(data_pos / per_epoch, 4)}
            record.update({k: float(sums[k]) / counts[k] for k in sums})
            record.update({'lr': opt.param_groups[0]['lr'], 'img_per_s': round(args.batch * window_steps / elapsed, 2),
                           's_per_it': round(elapsed / window_steps, 4),
                           'cuda_peak_gb': round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 3)
                           if dev.type == 'cuda' else None, 'skipped': int(skipped)})
            bar.set_postfix({k: f'{record[k]:.4f}' for k in ('cm', 'fm', 'n2n', 'fm2') if k in record},
                            refresh=False)
            sums, counts = {}, {}
        if evaluator is not None and step % args.eval_every == 0:
            record = {'step': step, **record, **evaluator(ema, step, autocast, {'mean': mean, 'std': std})}
        if record and rank == 0:
            append_log(log_path, record)
            if evaluator is not None and 'eval_s' in record:
                plot_curves(os.path.join(args.out, 'curves.png'), read_log(log_path))
        if record:
            window_start, window_steps = time.time(), 0        # evaluation time is not training time
        bar.update(1)
        if step % args.ckpt_every == 0 or step == args.steps or stop['signal']:
            if nan_run == 0:
                last_good = checkpoint() or last_good
        if stop['signal']:
            if rank == 0:
                print(f'\nstopped by {signal.Signals(stop["signal"]).name} at step {step}; checkpoint {last_good}')
            break
    bar.close()
    for sig, handler in old_handlers.items():                 # in-process callers (bench.py, tests)
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
