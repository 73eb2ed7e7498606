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
equal to a single-process step on the concatenated batch.

Checkpoints (`{model, ema, opt, args, step, rng, data_pos}`) are written atomically (temporary file,
fsync, rename) with a `latest` pointer; `--resume auto` continues bit-exactly (RNG and data position
included). A non-finite loss or gradient skips the update; `--nan-patience` in a row stops the run.
SIGINT/SIGTERM save a checkpoint and exit.
"""
import argparse
import glob
import math
import os
import random
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import losses
from model import DiT, PRESETS, student_from_teacher, count_params, load_dit_state
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

    def __init__(self, root, stats='file'):
        from safetensors import safe_open
        if not root or not os.path.isdir(root):
            raise ValueError(f'--data {root}: no such folder (give a latents folder, or no --data '
                             f'for the built-in dataset)')
        self.files = sorted(glob.glob(os.path.join(root, '*.safetensors')))
        if not self.files:
            raise ValueError(f'--data {root}: no *.safetensors files (expected LightningDiT\'s '
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
            raise ValueError(f'--data {root}: {len(self.labels)} labels for {len(self.index)} latents')
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
def all_reduce_grads(params, world):
    """Average gradients over ranks with one flat all-reduce (instead of DDP, see the docstring)."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


def update(loss, model, ema, opt, args, world):
    """Alg.1 l.15 / l.28: F_theta, F_ema <- update(F_theta, loss). Returns False if skipped (non-finite)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if world > 1:
        all_reduce_grads(params, world)
    gnorm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip if args.grad_clip > 0 else float('inf'))
    # the NaN guard: one host sync per update (the same decision on every rank: gradients are all-reduced)
    if not (torch.isfinite(gnorm) and torch.isfinite(loss.detach())):
        opt.zero_grad(set_to_none=True)
        return False
    opt.step()
    with torch.no_grad():
        ema_params = [e for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
        torch._foreach_lerp_(ema_params, params, 1 - args.ema)
    return True


def draw(x_ref, args):
    """The random draws of one iteration: noise z (l.2), t (l.3), r (l.18), label dropout."""
    B, dev = x_ref.shape[0], x_ref.device
    return {'z': torch.randn_like(x_ref), 't': sample_t(B, args, dev),
            'r': torch.rand(B, device=dev) * args.r_max, 'drop': torch.rand(B, device=dev) < args.class_drop}


def train_step(student, ema, teacher, opt, batch, it, args, world, autocast, draws=None):
    """One iteration of Algorithm 1 on a normalised batch (x_ref, y). Returns (logged losses, ok)."""
    x_ref, y = batch
    names = args.loss_set
    d = draws if draws is not None else draw(x_ref, args)
    if teacher is None and args.class_drop > 0:                # teacher training: CFG label dropout
        y = torch.where(d['drop'], torch.full_like(y, student.num_classes), y)
    z, t = d['z'], d['t']                                      # l.2-3
    x_t = (1 - losses.bcast(t, z)) * z + losses.bcast(t, z) * x_ref   # l.4
    vel = dict(w_cfg=args.w_cfg, eta=args.eta, vnorm=args.vnorm)
    with torch.no_grad(), autocast:                            # l.5-6
        v_t = teacher_velocity(teacher, x_t, t, y, z, x_ref, **vel).to(x_ref.dtype)
    log, ok = {}, True
    loss = 0.0
    jvp_dtype = JVP_DTYPES[args.jvp_dtype]
    if 'cm' in names:                                          # l.8-11
        log['cm'], _ = losses.cm_loss(student, x_t, t, y, v_t, args.w1, args.p, args.c, args.fused, jvp_dtype,
                                      args.compile_jvp)
        loss = loss + log['cm']
    if 'fm' in names:                                          # l.13-14
        with autocast:
            log['fm'] = losses.fm_loss(student, x_t, t, y, v_t, args.p, args.c)
        loss = loss + log['fm']
    if torch.is_tensor(loss):
        ok &= update(loss, student, ema, opt, args, world)    # l.15
    if 'n2n' in names and it % args.freq == 0:                 # l.17
        r = torch.minimum(d['r'], t)                           # l.18: r -> 0, r <= t
        x_r = (1 - losses.bcast(r, z)) * z + losses.bcast(r, z) * x_ref   # l.19
        with torch.no_grad(), autocast:                        # l.20-21
            v_r = teacher_velocity(teacher, x_r, r, y, z, x_ref, **vel).to(x_ref.dtype)

        def v_psi(F_n2n):                                      # teacher velocity at time t (losses.py)
            if args.vpsi == 'interp' or teacher is None:
                return v_t                                     # Alg.1 l.23
            with torch.no_grad(), autocast:                    # Eq. 13: at f(x_r, r, t)
                x_hat = x_r + losses.bcast(t - r, x_r) * F_n2n
                return teacher_velocity(teacher, x_hat, t, y, **vel).to(x_ref.dtype)
        log['n2n'], _ = losses.n2n_loss(student, x_r, r, t, y, v_r, v_psi, args.lam, args.gam, args.w2,
                                        args.p, args.c, args.fused, jvp_dtype, args.compile_jvp)   # l.22-25
        loss2 = log['n2n']
        if 'fm' in names:                                      # l.26-27
            with autocast:
                log['fm2'] = losses.fm_loss(student, x_t, t, y, v_t, args.p, args.c)
            loss2 = loss2 + log['fm2']
        ok &= update(loss2, student, ema, opt, args, world)   # l.28
    return {k: v.detach() for k, v in log.items()}, ok


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


# ----------------------------------------------------------------------------- main
def cli_parser(doc):
    """argparse with one-line errors (`error: ...`, exit code 2) instead of usage + error."""
    ap = argparse.ArgumentParser(description=doc.split('\n\n')[0])

    def error(msg):
        print(f'error: {msg}', file=sys.stderr)
        sys.exit(2)
    ap.error = error
    return ap


def parse_args(argv=None):
    ap = cli_parser(__doc__)
    A = ap.add_argument
    A('--data', default=None, help='latents folder (LightningDiT format); default: the built-in digits, '
      f'generated into {os.path.relpath(BUILTIN_DIR)} on first use')
    A('--latent-stats', default='file', choices=['file', 'compute'],
      help='read DATA/latents_stats.pt, or compute it from the data first')
    A('--out', default='runs/decm', help='output folder for checkpoints and samples')
    A('--teacher', default='none', help="teacher checkpoint (ours or LightningDiT's), or 'none' for "
      'training from scratch with v = z_ref - z (with --losses fm: trains a teacher)')
    A('--losses', default='fm,cm,n2n', help='comma list of fm, cm, n2n (Table 3 ablations (c)-(g))')
    A('--preset', default='tiny', choices=list(PRESETS), help='model size when training from scratch')
    A('--num-classes', type=int, default=None, help='classes (default: 1 + the largest label in the data)')
    A('--steps', type=int, default=2000, help='training iterations')
    A('--batch', type=int, default=128, help='global batch size (split over torchrun ranks)')
    A('--lr', type=float, default=1e-4, help='AdamW learning rate (paper: 1e-4)')
    A('--beta2', type=float, default=0.95, help="AdamW beta2 (LightningDiT's 0.95)")
    A('--weight-decay', type=float, default=0.0, help='AdamW weight decay')
    A('--ema', type=float, default=0.995, help='EMA decay per update (0.9999 for long GPU runs)')
    A('--freq', type=int, default=3, help='N2N update every freq iterations (paper: 3)')
    A('--schedule', default='uniform-seg', choices=['uniform-seg', 'logit-normal', 'arctan'],
      help='distribution of t (Table 3 (j)-(l))')
    A('--segments', type=int, default=8, help='N: t is drawn from the end points of N segments')
    A('--r-max', type=float, default=0.05, help='r -> 0 is drawn uniformly from [0, r_max], and r <= t')
    A('--lam', type=float, default=1.0, help='lambda: weight of the left (r) end of N2N')
    A('--gam', type=float, default=1.0, help='gamma: weight of the right (t) end of N2N')
    A('--w1', type=float, default=1.0, help='w1(t), constant: weight of g_cm in the CM target')
    A('--w2', type=float, default=1.0, help='w2(r, t), constant: weight of g_n2n in the N2N target')
    A('--p', type=float, default=0.5, help='adaptive weighting power (0.5: pseudo-Huber)')
    A('--c', type=float, default=1e-3, help='adaptive weighting constant')
    A('--w-cfg', type=float, default=2.0, help='CFG weight of the teacher velocity')
    A('--eta', type=float, default=0.05, help='RMS of the normalised guidance direction (teacher.py); 0.05 is about the RMS of v_c - v_u of the built-in teacher')
    A('--no-vnorm', dest='vnorm', action='store_false', help='plain CFG, Eq. 18 (Table 3 (i))')
    A('--vpsi', default='pred', choices=['pred', 'interp'],
      help='N2N teacher velocity at t: at the predicted point (Eq. 13) or at the interpolated x_t (Alg.1 l.23)')
    A('--class-drop', type=float, default=0.1, help='label dropout when training without a teacher')
    A('--no-fused', dest='fused', action='store_false',
      help='JVP under no_grad plus a separate forward (less memory, one more forward)')
    A('--jvp-dtype', default='fp32', choices=list(JVP_DTYPES),
      help='precision of the JVPs: fp32 (autocast off, TF32 on CUDA) or bf16 (under bf16 autocast)')
    A('--grad-clip', type=float, default=1.0, help='gradient-norm clipping (0: off)')
    A('--nan-patience', type=int, default=5, help='stop after this many non-finite updates in a row')
    A('--seed', type=int, default=0, help='random seed (rank r uses seed + r)')
    A('--device', default='auto', help='auto, cpu or cuda')
    A('--amp', default='auto', choices=['auto', 'on', 'off'], help='bf16 autocast (auto: on for CUDA)')
    A('--compile', action='store_true', help='torch.compile the teacher (inference only)')
    A('--compile-jvp', action='store_true', help="torch.compile the student's JVPs and the backward through "
      'their primal (CM and N2N; about 1.4x faster on CPU after a compile of 1-2 minutes per JVP)')
    A('--workers', type=int, default=0, help='data loader worker processes')
    A('--ckpt-every', type=int, default=500, help='checkpoint every N iterations')
    A('--keep', type=int, default=2, help='checkpoints to keep')
    A('--resume', default='', help="'auto' (OUT/latest) or a checkpoint path")
    A('--log-every', type=int, default=10, help='refresh the progress bar every N iterations')
    A('--builtin-size', type=int, default=20000, help='samples in the built-in dataset')
    args = ap.parse_args(argv)
    args.loss_set = [x.strip() for x in args.losses.split(',') if x.strip()]
    bad = [x for x in args.loss_set if x not in LOSS_NAMES]
    if bad or not args.loss_set:
        ap.error(f'--losses {args.losses}: unknown loss {bad} (choose from fm, cm, n2n)')
    for name in ('steps', 'batch', 'freq', 'segments', 'ckpt_every', 'keep', 'nan_patience', 'log_every'):
        if getattr(args, name) < 1:
            ap.error(f'--{name.replace("_", "-")} must be at least 1')
    if not 0 <= args.ema < 1:
        ap.error('--ema must be in [0, 1)')
    return args


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
    rank, world, dev = setup_distributed(args)
    if args.batch % world:
        raise ValueError(f'--batch {args.batch} is not divisible by the {world} ranks')
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
    resume = latest_checkpoint(args.out) if args.resume == 'auto' else (args.resume or None)
    ckpt = load_student_checkpoint(resume) if resume else None
    if ckpt is not None and args.loss_set != ['fm'] and not ckpt['model_config'].get('s_embed', True):
        raise ValueError(f'{resume} is a flow-matching (teacher) checkpoint without the s input: give it '
                         f'as --teacher, not --resume, for --losses {args.losses}')

    # Alg.1 l.1: F_theta <- copyWeights(F_tea), F_ema <- copyWeights(F_theta)
    torch.manual_seed(args.seed)
    teacher = None
    if args.teacher != 'none':
        teacher = load_teacher(args.teacher, in_channels=C, input_size=H, device=dev)
        student = student_from_teacher(teacher)
    else:
        n_cls = args.num_classes or int(ds.labels.max()) + 1
        s_embed = args.loss_set != ['fm']                      # a plain flow-matching teacher has no s
        student = DiT(args.preset, in_channels=C, input_size=H, num_classes=n_cls, s_embed=s_embed).to(dev)
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
    if ckpt is not None:
        opt.load_state_dict(ckpt['opt'])
        step, data_pos = ckpt['step'], ckpt['data_pos']
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
                'rng': rngs, 'stats': {'mean': ds.mean, 'std': ds.std}, 'loss_set': args.loss_set}, step, args.keep)

    if rank == 0:
        print(f'decm: {count_params(student) / 1e6:.2f}M parameters, data {data} ({len(ds)} x {ds.shape}), '
              f'losses {args.losses}, teacher {args.teacher}, device {dev}, {world} rank(s)')
    bar = tqdm(total=args.steps, initial=step, disable=rank != 0, desc='train', dynamic_ncols=True)
    last_good = resume
    while step < args.steps:
        lat, lat_flip, y = next(stream)
        data_pos += 1
        x = prepare_batch(lat, lat_flip, mean, std, dev)
        log, ok = train_step(student, ema, teacher, opt, (x, y.to(dev)), step, args, world, autocast)
        step += 1
        nan_run = 0 if ok else nan_run + 1
        if nan_run >= args.nan_patience:
            bad = {k: float(v) for k, v in log.items()}
            bar.close()
            print(f'\nerror: training stopped at step {step}: {nan_run} non-finite updates in a row '
                  f'(losses {bad}); the last good checkpoint is {last_good}', file=sys.stderr)
            sys.exit(1)
        if step % args.log_every == 0 or step == args.steps:
            bar.set_postfix({k: f'{float(v):.4f}' for k, v in log.items()}, refresh=False)
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
