"""DE-CM training, Algorithm 1 line by line; also trains the teacher itself (`--losses fm --teacher none`).

train_step: z, t, x_t = (1 - t) z + t x_ref and the teacher velocity v_t for the whole batch (l.2-6), an
update on L_cm + L_fm (l.8-15), and every `freq` iterations one on L_n2n + L_fm at x_r near the noise
(l.17-28); `--accum K` runs the losses on K micro-batches in turn. Data: LightningDiT's latents folder
(`*.safetensors` with `latents`, `latents_flip`, `labels`; `latents_stats.pt`), normalised, flipped with
probability 0.5; without `--data`, the built-in digits. CPU or CUDA (bf16 autocast, fp32 JVPs, TF32) and
torchrun: we all-reduce the gradients ourselves, since DDP's hooks are armed only by its own forward (a loss on
the primal of a torch.func.jvp of `model.module` would skip the all-reduce silently). Checkpoints are atomic,
`--resume auto` is bit-exact, non-finite updates are skipped, SIGINT/SIGTERM save; see OUT/log.jsonl, curves.png.
"""
import argparse
import contextlib
import glob
import json
import math
import os
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from tqdm import tqdm

import losses
from fid import pixel_fd, cli_parser, bounded, device_flag, set_threads, flagged, run_cli
from model import DiT, PRESETS, student_from_teacher, load_dit_state, load_vavae_decoder, decode_to_uint8, to_uint8
from model import save_grid, plot_curves
from sample import BUILTIN_DIR, setup_distributed, make_out, generate, latest_checkpoint
from teacher import load_teacher, teacher_v, read_checkpoint, resolve_checkpoint

# ----------------------------------------------------------------------------- data
def latent_stats(x):
    return {'mean': x.mean(dim=(0, 2, 3), keepdim=True), 'std': x.std(dim=(0, 2, 3), keepdim=True)}

def make_digits(out_dir, n=20000, size=16, channels=1, seed=0, num_classes=10):
    """The built-in dataset: digits 0-9 in pillow's default font, random shift, scale, rotation and stroke,
    size x size in [-1, 1], as a latents folder (latents_flip = latents: a mirrored digit is not a digit)."""
    from PIL import Image, ImageDraw, ImageFont
    from safetensors.torch import save_file
    rng, big = np.random.default_rng(seed), 4 * size           # draw large, then downsample (antialias)
    labels, images = rng.integers(0, num_classes, n), np.zeros((n, channels, size, size), np.float32)
    for i in tqdm(range(n), desc='building the digits dataset', leave=False):
        font, im = ImageFont.load_default(size=int(big * rng.uniform(0.55, 0.85))), Image.new('L', (big, big))
        cx, cy = big / 2 + rng.uniform(-0.1, 0.1) * big, big / 2 + rng.uniform(-0.1, 0.1) * big
        ImageDraw.Draw(im).text((cx, cy), str(labels[i] % 10), font=font, fill=255, anchor='mm',
                                stroke_width=int(rng.integers(0, 3)), stroke_fill=255)
        im = im.rotate(rng.uniform(-20, 20), resample=Image.BILINEAR, center=(cx, cy))
        a = np.asarray(im.resize((size, size), Image.LANCZOS), np.float32) / 255.0
        images[i] = (a[None] * (rng.uniform(0.5, 1.0, channels) if channels > 1 else np.ones(1))[:, None, None]) * 2 - 1
    x, path = torch.from_numpy(images), os.path.join(out_dir, 'latents_rank00_shard000.safetensors')
    os.makedirs(out_dir, exist_ok=True)
    save_file({'latents': x, 'latents_flip': x.clone(), 'labels': torch.from_numpy(labels)}, path + '.tmp')
    os.replace(path + '.tmp', path)
    torch.save(latent_stats(x), os.path.join(out_dir, 'latents_stats.pt'))
    return out_dir

class LatentFolder(torch.utils.data.Dataset):
    """LightningDiT's latents folder. Items are (latent, flipped latent, label), not normalised."""

    def __init__(self, root, compute_stats=False, flag='--data'):
        files = sorted(glob.glob(os.path.join(root, '*.safetensors'))) if root and os.path.isdir(root) else None
        if not files:
            raise ValueError(f'{flag} {root}: ' + ('no such folder' if files is None else 'no *.safetensors files '
                             "(expected LightningDiT's latents_rank*_shard*.safetensors)"))
        self.index, labels, shapes, self.handles = [], [], set(), {}
        for f in files:
            try:
                with safe_open(f, framework='pt') as h:
                    n, *shape = h.get_slice('latents').get_shape()
                    labels.append(h.get_tensor('labels').long().flatten())
                    assert 'latents_flip' in h.keys()
            except Exception as e:
                raise ValueError(f'{f} is not a latents file with latents, latents_flip, labels ({str(e)[:100]})')
            shapes.add(tuple(shape))
            self.index += [(f, i) for i in range(n)]
        self.labels, self.shape = torch.cat(labels), shapes.pop()
        if shapes or len(self.labels) != len(self.index):
            raise ValueError(f'{flag} {root}: the files disagree in latent shape or hold {len(self.labels)} labels '
                             f'for {len(self.index)} latents')
        stats_file = os.path.join(root, 'latents_stats.pt')
        if compute_stats and not os.path.exists(stats_file):   # mean and std of up to 10,000 latents
            idx = torch.randperm(len(self), generator=torch.Generator().manual_seed(0))[:10000]
            torch.save(latent_stats(torch.stack([self[i][0] for i in idx.tolist()]).float()), stats_file + '.tmp')
            os.replace(stats_file + '.tmp', stats_file)
        if not os.path.exists(stats_file):
            raise ValueError(f'{stats_file} is missing (train.py computes it on first use)')
        self.mean, self.std = (read_checkpoint(stats_file)[k].float().reshape(1, -1, 1, 1) for k in ('mean', 'std'))
        if self.mean.shape[1] != self.shape[0]:
            raise ValueError(f'{stats_file} has {self.mean.shape[1]} channels, the latents {self.shape[0]}')

    def __len__(self):
        return len(self.index)

    def __getitem__(self, i):
        f, j = self.index[i]
        h = self.handles[f] = self.handles.get(f) or safe_open(f, framework='pt')   # opened once per worker
        return h.get_slice('latents')[j], h.get_slice('latents_flip')[j], self.labels[i]

def batches_of_epoch(n, batch, epoch, seed, rank, world):
    """This rank's index batches for one epoch (DistributedSampler order, seeded by seed + epoch)."""
    sampler = torch.utils.data.DistributedSampler(range(n), world, rank, shuffle=True, seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    idx = list(sampler)
    return [idx[i:i + batch] for i in range(0, len(idx) - batch + 1, batch)]

def data_stream(ds, batch, seed, rank, world, start, workers):
    """Yields (latents, flipped latents, labels) batches forever, starting after `start` batches (resume)."""
    epoch, skip = divmod(start, len(batches_of_epoch(len(ds), batch, 0, seed, rank, world)))
    while True:
        yield from torch.utils.data.DataLoader(
            ds, batch_sampler=batches_of_epoch(len(ds), batch, epoch, seed, rank, world)[skip:], num_workers=workers,
            generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available())   # global RNG kept
        epoch, skip = epoch + 1, 0

def prepare_batch(lat, lat_flip, mean, std, device):
    """Pick the flipped copy with probability 0.5, move to the device, normalise (z - mean) / std."""
    x = torch.where((torch.rand(lat.shape[0]) < 0.5).view(-1, 1, 1, 1), lat_flip, lat)
    return (x.to(device, non_blocking=True).float() - mean) / std

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

def train_step(student, ema, teacher, opt, x_ref, y, it, args, world=1, autocast=contextlib.nullcontext(), draws=None):
    """One iteration of Algorithm 1 on a normalised batch (draws: draw()'s, made here if None). Returns (log, ok):
    the losses (cm, fm, n2n, fm2), the two updates' gradient norms and how many were skipped, as tensors."""
    K, B, names, log = args.accum, x_ref.shape[0], args.loss_set, {}
    if B % K:
        raise ValueError(f'--accum {K} does not divide the batch of {B} samples per rank')
    parts = [slice(k * B // K, (k + 1) * B // K) for k in range(K)]
    opts = dict(p=args.p, c=args.c)
    jvp_opts = dict(fused=args.fused, jvp_dtype=losses.JVP_DTYPES[args.jvp_dtype], compiled=args.compile_jvp, **opts)
    d = draw(x_ref, args) if draws is None else draws         # l.2-3: z ~ N(0, I), t (and l.18's r)
    z, t = d['z'], d['t']
    if teacher is None and args.class_drop > 0:                # from scratch (a teacher run): CFG label dropout
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
            if 'fm' in names:                                  # l.13-14 (the JVPs set their own precision)
                with autocast:
                    loss = loss + logged(log, 'fm', K, losses.fm_loss(
                        student, x_t=x_t[sl], t=t[sl], y=y[sl], v=v_t[sl], **opts))
            (loss / K).backward()
            total = total + loss.detach() / K
        ok, log['grad_norm'] = optimizer_step(student, ema, opt, total, args, world, ema_decay(it, args))   # l.15
        skipped += not ok
    if 'n2n' in names and it % args.freq == 0:                 # l.17
        r = torch.minimum(d['r'], t)                           # l.18: r -> 0, r <= t
        x_r = (1 - losses.bcast(r, z)) * z + losses.bcast(r, z) * x_ref          # l.19
        v_r = teacher_v(x_r, r, teacher, y, args, autocast, z, x_ref)            # l.20-21
        total = 0.0
        for sl in parts:
            v_psi = v_t[sl]                                    # the teacher velocity at t: v_t (l.23), or at
            if args.vpsi == 'pred' and teacher is not None:    # the predicted point f(x_r, r, t) (Eq. 13)
                v_psi = lambda x_hat: teacher_v(x_hat, t[sl], teacher, y[sl], args, autocast)
            loss = logged(log, 'n2n', K, losses.n2n_loss(             # l.22-25
                student, x_r=x_r[sl], r=r[sl], t=t[sl], y=y[sl], v_r=v_r[sl], v_psi=v_psi, lam=args.lam,
                gam=args.gam, w2=args.w2, **jvp_opts))
            if 'fm' in names:                                  # l.26-27
                with autocast:
                    loss = loss + logged(log, 'fm2', K, losses.fm_loss(
                        student, x_t=x_t[sl], t=t[sl], y=y[sl], v=v_t[sl], **opts))
            (loss / K).backward()
            total = total + loss.detach() / K
        ok, log['grad_norm2'] = optimizer_step(student, ema, opt, total, args, world, ema_decay(it, args))  # l.28
        skipped += not ok
    log['skipped'] = torch.tensor(float(skipped))
    return log, skipped == 0

def logged(log, name, K, value):
    """value, with its mean over the K micro-batches added to log[name] (for the bar and log.jsonl)."""
    log[name] = log.get(name, 0.0) + value.detach() / K
    return value

def optimizer_step(model, ema, opt, loss, args, world, decay):
    """Alg.1 l.15 / l.28: F_theta, F_ema <- update(F_theta, loss) on the accumulated gradients: all-reduce (one
    flat tensor), clip, AdamW, EMA; skipped if non-finite. Returns (updated?, gradient norm before clipping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if world > 1:                                              # the loss too: every rank takes the same decision
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads] + [loss.reshape(1).float()])
        dist.all_reduce(flat)
        flat, loss = flat[:-1] / world, flat[-1] / world
        for p, g in zip(params, flat.split([g.numel() for g in grads])):
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
    """--ema, or with --ema-warmup min(--ema, (1 + step) / (10 + step)): forgets the starting weights early."""
    return min(args.ema, (1 + step) / (10 + step)) if args.ema_warmup else args.ema

# ----------------------------------------------------------------------------- checkpoints
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
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out, name + '.tmp'))
        raise ValueError(f'cannot write checkpoint {name} in {out} ({e.strerror or e}); the previous '
                         f'checkpoint ({latest_checkpoint(out)}) is intact')
    write_atomic(os.path.join(out, 'latest'), lambda f: f.write(name.encode() + b'\n'))
    for old in sorted(glob.glob(os.path.join(out, 'ckpt_*.pt')))[:-keep]:
        os.remove(old)
    return os.path.join(out, name)

def load_student_checkpoint(path):
    """Our checkpoint as a dict; anything else gets a one-line error."""
    ckpt = read_checkpoint(resolve_checkpoint(path))
    if not isinstance(ckpt, dict) or not {'model', 'ema', 'opt', 'model_config', 'args'} <= set(ckpt):
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
            records.append(json.loads(line))
    return [r for r in records if isinstance(r, dict) and isinstance(r.get('step'), int)]

def append_log(path, record):
    """One JSON line (non-finite numbers as null)."""
    clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
    with open(path, 'a') as f:
        f.write(json.dumps(clean) + '\n')

class Evaluator:
    """--eval-every: EMA samples (CM sampler at 1 and 2 NFE; a flow-matching run: Euler at 4 and 16 steps) from
    fixed noise and labels (private generators: training is untouched) -> OUT/samples/step_N.png (latents decoded
    by --vae), and for 1- or 3-channel data the pixel FD against as many training images (fd_nfeK in the log)."""

    def __init__(self, ds, args, dev, batch, flow_model):
        self.args, self.dev, self.batch, n, D = args, dev, batch, args.eval_samples, int(np.prod(ds.shape))
        self.sampler, self.nfes = ('euler', (4, 16)) if flow_model else ('cm', (1, 2))
        self.vae = load_vavae_decoder(args.vae, dev) if ds.shape[0] not in (1, 3) else None
        idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[:n].tolist()
        self.real = None if self.vae else torch.stack([ds[i][0] for i in idx]).float().numpy()
        self.describe = (f'every {args.eval_every} iterations, {n} EMA samples, {self.sampler} at {self.nfes} NFE'
                         + (' (decoded)' if self.vae else f', pixel FD' + f' (warning: {n} <= {D} pixels)' * (n <= D)))

    @torch.no_grad()
    def __call__(self, ema, step, autocast, mean, std):
        t0, rec, panels, a = time.time(), {}, [], self.args
        for nfe in self.nfes:
            with autocast:
                xs, ys, _ = generate(ema, self.sampler, a.eval_samples, nfe, ema.num_classes, a.seed, self.batch,
                                     self.dev, progress=False)
            x, y = torch.cat(list(xs.values())).float() * std.cpu() + mean.cpu(), torch.cat(list(ys.values()))
            images = decode_to_uint8(self.vae, x) if self.vae else to_uint8(x)
            rec.update({} if self.vae else {f'fd_nfe{nfe}': pixel_fd(x.numpy(), self.real)})
            panels.append((f'{self.sampler}, {nfe} NFE (EMA, step {step})', images, y))
        save_grid(os.path.join(a.out, 'samples', f'step_{step:07d}.png'), panels)
        return {**rec, 'eval_samples': a.eval_samples, 'eval_s': round(time.time() - t0, 3)}

# ----------------------------------------------------------------------------- command line
def build_parser():
    ap = cli_parser(__doc__)
    A, P, N, U = ap.add_argument, bounded(int, 1), bounded(int, 0), bounded(float, 0, 1)
    F, FP, D = bounded(float, 0), bounded(float, 0, lo_open=True), bounded(float, 0, 1, hi_open=True)
    A('--data', help='latents folder (LightningDiT format; a missing latents_stats.pt is made); default: built-in digits')
    A('--out', default='runs/decm', help='output folder: checkpoints, log.jsonl, samples/, curves.png')
    A('--teacher', default='none', help="teacher checkpoint (ours or LightningDiT's); 'none': from scratch, v = x_ref - z")
    A('--losses', default='fm,cm,n2n', help='comma list of fm, cm, n2n (Table 3 (c)-(g); fm alone trains a teacher)')
    A('--preset', choices=list(PRESETS), help='architecture from scratch (tiny), or of a LightningDiT --teacher (XL/1)')
    A('--steps', type=P, default=2000, help='training iterations')
    A('--batch', type=P, default=128, help='global batch size (split over torchrun ranks)')
    A('--accum', type=P, default=1, help='micro-batches per update (gradient accumulation; the same update)')
    A('--lr', type=FP, default=1e-4, help='AdamW learning rate (the paper: 1e-4; 1e-3 measured better at toy scale)')
    A('--beta2', type=D, default=0.95, help="AdamW beta2 (LightningDiT's 0.95)")
    A('--weight-decay', type=F, default=0.0, help='AdamW weight decay')
    A('--ema', type=D, default=0.995, help='EMA decay (0.9999 for long GPU runs)')
    A('--ema-warmup', action=argparse.BooleanOptionalAction, default=True, help='EMA min(--ema, (1+step)/(10+step))')
    A('--freq', type=P, default=3, help='N2N update every freq iterations (the paper: 3; 5 was better at toy scale)')
    A('--schedule', default='uniform-seg', choices=['uniform-seg', 'logit-normal', 'arctan'],
      help='distribution of t (the paper: uniform-seg; logit-normal measured better at toy scale)')
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
    A('--vpsi', default='pred', choices=['pred', 'interp'], help='v_psi: teacher at f(x_r, r, t) (Eq. 13) or v_t (l.23)')
    A('--class-drop', type=U, default=0.1, help='label dropout when training without a teacher')
    A('--no-fused', dest='fused', action='store_false', help='JVP under no_grad plus a separate forward (less memory)')
    A('--jvp-dtype', default='fp32', choices=list(losses.JVP_DTYPES), help='precision of the JVPs (bf16: autocast)')
    A('--compile-jvp', action='store_true', help="torch.compile the student's JVPs and their backward")
    A('--grad-clip', type=F, default=1.0, help='gradient-norm clipping (0: off)')
    A('--nan-patience', type=P, default=5, help='stop after this many non-finite updates in a row')
    A('--seed', type=N, default=0, help='random seed (rank r uses seed + r)')
    A('--device', type=device_flag, default='auto', help='auto, cpu or cuda')
    A('--amp', default='auto', choices=['auto', 'on', 'off'], help='bf16 autocast (auto: on for CUDA)')
    A('--workers', type=N, default=0, help='data loader worker processes')
    A('--threads', type=N, default=0, help='torch.set_num_threads (0: one per core; 1 on a busy machine)')
    A('--ckpt-every', type=P, default=500, help='checkpoint every N iterations')
    A('--keep', type=P, default=2, help='checkpoints to keep')
    A('--resume', default='', help="'auto' (OUT/latest) or a checkpoint path")
    A('--log-every', type=P, default=10, help='a line in OUT/log.jsonl (means) and the bar every N iterations')
    A('--eval-every', type=N, default=0, help='every N iterations: EMA samples in OUT/samples/, a score, curves.png')
    A('--eval-samples', type=bounded(int, 2), default=1000, help='samples per evaluation')
    A('--vae', help='evaluation on latents: the VA-VAE file to decode the samples into a grid')
    return ap

def parse_args(argv=None):
    ap = build_parser()
    args = ap.parse_args(argv)
    args.loss_set = [x.strip() for x in args.losses.split(',') if x.strip()]
    if not args.loss_set or set(args.loss_set) - {'fm', 'cm', 'n2n'}:
        ap.error(f'--losses {args.losses}: give a comma list of fm, cm, n2n')
    if args.vae and not os.path.exists(args.vae):
        ap.error(f'--vae {args.vae}: no such file')
    return args

def changed_flags(args):
    """The flags of args that differ from their defaults, as they would be typed."""
    defaults, no = vars(build_parser().parse_args([])), {'vnorm', 'fused', 'ema_warmup'}
    return [('--no-' if k in no else '--') + k.replace('_', '-') + ('' if isinstance(v, bool) else f' {v}')
            for k, v in vars(args).items() if k in defaults and defaults[k] != v]

def train(args):
    set_threads(args.threads)
    rank, world, dev = setup_distributed(args.device)
    cuda = dev.type == 'cuda'
    if args.batch % (world * args.accum):
        raise ValueError(f'--batch {args.batch} is not divisible by {world} rank(s) x --accum {args.accum}')
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cuda   # for the fp32 JVPs
    use_amp = args.amp == 'on' or (args.amp == 'auto' and cuda)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=use_amp)
    data = args.data or BUILTIN_DIR
    if rank == 0:                                              # the built-in digits; a missing latents_stats.pt
        if args.data is None and not os.path.exists(os.path.join(data, 'latents_stats.pt')):
            make_digits(data)
        LatentFolder(data, compute_stats=True)
    if world > 1: dist.barrier()
    ds = LatentFolder(data)
    (C, H, W), labels, mean, std = ds.shape, (int(ds.labels.min()), int(ds.labels.max())), ds.mean.to(dev), ds.std.to(dev)
    if len(ds) < args.batch:                                   # fail before the progress bar is drawn
        raise ValueError(f'the dataset has {len(ds)} samples, fewer than one batch of {args.batch}')
    if args.eval_every and C not in (1, 3) and not args.vae:
        raise ValueError(f'--eval-every on latents of shape {(C, H, W)} needs --vae PATH to decode the samples')
    resume = latest_checkpoint(args.out) if args.resume == 'auto' else (args.resume or None)
    ckpt = flagged('--resume', load_student_checkpoint, resume) if resume else None
    if ckpt is not None and args.preset not in (None, ckpt['model_config']['preset']):
        raise ValueError(f'--preset {args.preset}: --resume {resume} is a run of preset {ckpt["model_config"]["preset"]}')
    if ckpt is not None and args.loss_set != ['fm'] and not ckpt['model_config'].get('s_embed', True):
        raise ValueError(f'--resume {resume}: a teacher checkpoint (no s input): give it as --teacher, not --resume')
    torch.manual_seed(args.seed)                               # Alg.1 l.1: F_theta <- F_tea, F_ema <- F_theta
    teacher = flagged('--teacher', load_teacher, args.teacher, args.preset, device=dev) if args.teacher != 'none' else None
    student = student_from_teacher(teacher) if teacher else DiT(args.preset or 'tiny', C, H, labels[1] + 1,
                                                                 s_embed=args.loss_set != ['fm']).to(dev)
    student = load_dit_state(DiT(**ckpt['model_config']), ckpt['model'], resume).to(dev) if ckpt else student
    cfg = student.config
    if (cfg['in_channels'], cfg['input_size']) != (C, H) or labels[0] < 0 or labels[1] >= cfg['num_classes']:
        raise ValueError(f'the data has shape {(C, H, W)} and labels in [{labels[0]}, {labels[1]}], the model takes '
                         f'{cfg["in_channels"]} x {cfg["input_size"]} x {cfg["input_size"]}, {cfg["num_classes"]} classes')
    ema = load_dit_state(DiT(**cfg), ckpt['ema'] if ckpt else student.state_dict(), resume).to(dev).requires_grad_(False)
    for p in list(student.parameters()) + list(ema.parameters()) if world > 1 else []:
        dist.broadcast(p.data, 0)                              # identical start on every rank
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, args.beta2),
                            weight_decay=args.weight_decay, fused=cuda)
    step, data_pos, nan_run, sums, counts, skipped = 0, 0, 0, {}, {}, torch.zeros((), device=dev)
    if ckpt is not None:
        opt.load_state_dict(ckpt['opt'])
        opt.param_groups[0]['lr'] = args.lr                    # a resumed run may change --lr
        step, data_pos, run_log = ckpt['step'], ckpt['data_pos'], ckpt['log']
        sums, counts = {k: v.to(dev) for k, v in run_log['sums'].items()}, run_log['counts']
        skipped = torch.as_tensor(run_log['skipped'], device=dev).float()
        rng = ckpt['rng'][min(rank, len(ckpt['rng']) - 1)]     # every random draw of training is torch's
        torch.set_rng_state(rng['torch'])
        if torch.cuda.is_available() and rng.get('cuda'): torch.cuda.set_rng_state_all(rng['cuda'])
    else:
        torch.manual_seed(args.seed + rank)
    stream = data_stream(ds, args.batch // world, args.seed, rank, world, data_pos, args.workers)
    make_out(args.out)
    log_path, per_epoch, stop = os.path.join(args.out, 'log.jsonl'), len(ds) // args.batch, {}
    evaluator = Evaluator(ds, args, dev, 4 * args.batch // (world * args.accum), student.s_embedder is None) \
        if args.eval_every and rank == 0 else None
    if rank == 0 and os.path.exists(log_path):                 # the lines after the checkpoint are redone
        kept = [json.dumps(r) + '\n' for r in read_log(log_path) if r['step'] <= step]
        write_atomic(log_path, lambda f: f.write(''.join(kept).encode()))
    old_handlers = {s: signal.signal(s, lambda n, f: stop.update(signal=n)) for s in (signal.SIGINT, signal.SIGTERM)}
    if rank == 0:
        what = 'teacher (flow matching) training' if not teacher and args.loss_set == ['fm'] else 'DE-CM (Algorithm 1)'
        what += ' with no teacher, from scratch (v = x_ref - z; --teacher RUN distils one)' * (not teacher and what[0] == 'D')
        print(f'decm: {what}: losses {args.losses}' + f' (N2N every {args.freq})' * ('n2n' in args.loss_set) + f'; teacher '
              f'{args.teacher}; student {cfg["preset"]}, {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters\n'
              f'decm: data {data}: {len(ds)} items of shape {ds.shape}; batch {args.batch} = {world} rank(s) x '
              f'{args.accum} micro-batch(es); {dev}, {"bf16 autocast" if use_amp else "fp32"}, JVPs {args.jvp_dtype}\n'
              f'decm: iterations {step} -> {args.steps}' + ' (resumed)' * bool(step) + f'; checkpoints every '
              f'{args.ckpt_every} in {args.out}; evaluation {evaluator.describe if evaluator else "off"}\n'
              f'decm: flags changed from the defaults: ' + (' '.join(changed_flags(args)) or 'none'))
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc='train', dynamic_ncols=True)
    last_good, window_start, window_steps = resume, time.time(), 0
    while step < args.steps:
        lat, lat_flip, y = next(stream)
        x, data_pos = prepare_batch(lat, lat_flip, mean, std, dev), data_pos + 1
        log, ok = train_step(student, ema, teacher, opt, x, y.to(dev), step, args, world, autocast)
        step, window_steps, nan_run = step + 1, window_steps + 1, 0 if ok else nan_run + 1
        skipped = skipped + log.pop('skipped')
        for k, v in log.items():                               # on the device: no host sync per iteration
            sums[k], counts[k] = sums[k] + v if k in sums else v.clone(), counts.get(k, 0) + 1
        if nan_run >= args.nan_patience:
            bar.close()
            print(f'error: training stopped at step {step}: {nan_run} non-finite updates in a row '
                  f'({ {k: float(v) for k, v in log.items()} }); the last good checkpoint is {last_good}', file=sys.stderr)
            sys.exit(1)
        record = {}
        if step % args.log_every == 0:
            if cuda: torch.cuda.synchronize(dev)
            elapsed = time.time() - window_start
            record = {'step': step, 'epoch': round(data_pos / per_epoch, 4), 'lr': args.lr, 'skipped': int(skipped),
                      **{k: float(sums[k]) / counts[k] for k in sums}, 's_per_it': round(elapsed / window_steps, 4),
                      'img_per_s': round(args.batch * window_steps / elapsed, 2),
                      'cuda_peak_gb': round(torch.cuda.max_memory_allocated(dev) / 2 ** 30, 3) if cuda else None}
            bar.set_postfix({k: f'{record[k]:.4f}' for k in ('cm', 'fm', 'n2n', 'fm2') if k in record}, refresh=False)
            sums, counts = {}, {}
        if evaluator is not None and step % args.eval_every == 0:
            record = {'step': step, **record, **evaluator(ema, step, autocast, mean, std)}
        if record and rank == 0:
            append_log(log_path, record)
            if 'eval_s' in record: plot_curves(args.out, read_log(log_path))
        if record: window_start, window_steps = time.time(), 0   # evaluation time is not training time
        bar.update(1)
        if (step % args.ckpt_every == 0 or step == args.steps or stop) and nan_run == 0:
            rngs = [{'torch': torch.get_rng_state(), 'cuda': torch.cuda.get_rng_state_all() if cuda else []}] * world
            if world > 1: dist.all_gather_object(rngs, rngs[0])
            if rank == 0: last_good = save_checkpoint(args.out, {
                'model': student.state_dict(), 'ema': ema.state_dict(), 'opt': opt.state_dict(), 'model_config': cfg,
                'args': {k: v for k, v in vars(args).items() if k != 'loss_set'}, 'loss_set': args.loss_set,
                'step': step, 'data_pos': data_pos, 'rng': rngs, 'stats': {'mean': ds.mean, 'std': ds.std},
                'log': {'sums': sums, 'counts': counts, 'skipped': skipped}}, step, args.keep)
        if stop:
            if rank == 0:
                print(f'\nstopped by {signal.Signals(stop["signal"]).name} at step {step}; checkpoint {last_good}')
            break
    bar.close()
    if rank == 0: print(f'train: wrote {args.out}/ (checkpoint {os.path.basename(last_good or "none")}, log.jsonl'
                        + ', samples/, curves.png' * bool(evaluator) + ')')
    for sig, handler in old_handlers.items(): signal.signal(sig, handler)   # in-process callers (tests)
    if world > 1: dist.destroy_process_group()   # the last all_gather of the RNG states synchronised the ranks
    return student, ema, last_good

def main(argv=None):
    run_cli(lambda: train(parse_args(argv)))

if __name__ == '__main__':
    main()
