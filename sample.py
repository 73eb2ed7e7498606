"""Sampling from DE-CM (Sec. 4.5, Fig. 5, Table 4) and from the teacher, with exact NFE counts.

Flow map (Eq. 9): f(x, t, s) = x + (s - t) F(x, t, s); t = 0 is noise, t = 1 data. One NFE = one call
of the network.
- Euler ODE (Fig. 5a): x <- x + (t_next - t) F(x, t, t), the instantaneous velocity (s = t).
- CM (Fig. 5b): predict data x_1 = f(x, t, 1), re-noise with fresh noise to the next t, repeat.
- Mix (Fig. 5c, `--mix`): `--mix-det` deterministic steps of the flow map x <- f(x, t, t_next) from
  t = 0 to `--mix-t` (the N2N map jumps from noise straight to a noisy point; no new noise), then CM
  steps from there. The paper leaves the switch open; our defaults (half of the NFE deterministic,
  switch at t = 0.25) were picked on the built-in dataset over 3 seeds (README).
- Teacher: Euler with classifier-free guidance (one batched cond + uncond call per step), with
  LightningDiT's CFG interval and timestep shift t' = shift t / (1 + (shift - 1) t) on the nfe + 1 grid
  points i / nfe: LightningDiT's `num_sampling_steps` K counts grid points (linspace(0, 1, K), K - 1
  Euler steps), so its K = 250 is our --nfe 249. `--cfg-channels 3` guides only the first three
  channels, as LightningDiT's `forward_with_cfg` does (our default guides all, see teacher.py).
  `--guidance apg` follows instead the very velocity DE-CM distils (teacher.teacher_velocity: APG, same
  `--cfg` = train.py's --w-cfg and `--eta`): the fair baseline of a student, since it is what it learns.

Samples are de-normalised, x * std + mean, with the latent statistics our checkpoints carry, or for a
LightningDiT file (which carries none) with `--latent-stats latents_stats.pt`. Writes OUT/grid.png (one
row per class) and OUT/samples.npz: for 1- or 3-channel data (pixels) or with `--vae`, ADM-style `arr_0`
(uint8 NHWC images) and `arr_1` (labels); without `--vae` on latents, the de-normalised `latents` and
`labels` (`latents_normalised` when no statistics are known; `--vae` then refuses to decode). Under
torchrun the samples are split over ranks (`--batch` per rank; noise seeded per batch, so the result
does not depend on the number of ranks) and gathered into one .npz.
"""
import os
import sys
import tempfile

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from model import DiT, PRESETS, load_dit_state
from teacher import load_teacher, cfg_velocity, teacher_velocity, read_checkpoint, resolve_checkpoint
from train import cli_parser, bounded, device_flag, set_threads, LatentFolder, BUILTIN_DIR


def bcast(t, x):
    return t.view(-1, *[1] * (x.dim() - 1)).to(x.dtype)


def full(x, value):
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=x.dtype)


@torch.no_grad()
def euler_sampler(model, z, y, nfe):
    """Fig. 5a: nfe Euler steps of the instantaneous velocity F(x, t, t)."""
    ts = torch.linspace(0, 1, nfe + 1).tolist()
    x = z
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * model(x, full(x, t), full(x, t), y)
    return x


@torch.no_grad()
def cm_sampler(model, z, y, nfe, gen=None, times=None):
    """Fig. 5b: x_1 = f(x_t, t, 1), then re-noise to the next time (times: default i / nfe)."""
    times = times if times is not None else [i / nfe for i in range(nfe)]
    x = z
    for i, t in enumerate(times):
        x1 = x + (1 - t) * model(x, full(x, t), full(x, 1), y)
        if i + 1 < len(times):
            eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            x = (1 - times[i + 1]) * eps + times[i + 1] * x1   # fresh noise
    return x1


@torch.no_grad()
def mix_sampler(model, z, y, nfe, det_steps=None, t_switch=0.25, gen=None):
    """Fig. 5c: det_steps flow-map steps f(x, t, t_next) over [0, t_switch] (no new noise), then CM."""
    det = max(0, min(nfe // 2 if det_steps is None else det_steps, nfe - 1))
    x = z
    ts = [t_switch * i / det for i in range(det + 1)] if det else [0.0]
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * model(x, full(x, t), full(x, t_next), y)
    n_cm = nfe - det
    t0 = ts[-1]
    return cm_sampler(model, x, y, n_cm, gen, [t0 + (1 - t0) * i / n_cm for i in range(n_cm)])


def teacher_times(nfe, shift=0.0):
    """The nfe + 1 grid points of the teacher sampler: i / nfe, then the timestep shift (if > 0)
    t' = shift t / (1 + (shift - 1) t), which keeps 0 and 1 and packs the points towards the noise."""
    ts = torch.linspace(0, 1, nfe + 1)
    if shift > 0:
        ts = shift * ts / (1 + (shift - 1) * ts)
    return ts


@torch.no_grad()
def teacher_sampler(teacher, z, y, nfe, w_cfg=1.0, cfg_interval_start=0.0, shift=0.0, cfg_channels=0,
                    guidance='cfg', eta=0.05):
    """The teacher's Euler ODE (one batched cond+uncond call per step) on teacher_times. guidance 'cfg':
    plain CFG v_u + w (v_c - v_u); 'apg': the very velocity DE-CM distils (teacher.teacher_velocity,
    Alg.1 l.6, same w_cfg and eta as train.py), the fair baseline of a distilled student."""
    ts = teacher_times(nfe, shift)
    x = z
    for t, t_next in zip(ts[:-1].tolist(), ts[1:].tolist()):
        if guidance == 'apg':
            v = teacher_velocity(teacher, x, full(x, t), y, w_cfg=w_cfg, eta=eta, vnorm=True)
        else:
            v = cfg_velocity(teacher, x, full(x, t), y, w_cfg, cfg_interval_start, cfg_channels)
        x = x + (t_next - t) * v
    return x


def count_calls(model):
    """Counts forward calls of `model` (a forward hook): returns (counter dict, hook handle)."""
    counter = {'calls': 0}
    handle = model.register_forward_hook(lambda m, i, o: counter.update(calls=counter['calls'] + 1))
    return counter, handle


def run_sampler(model, name, z, y, nfe, gen=None, args=None):
    """Dispatch on the sampler name; `args` carries the sampler flags (defaults if None)."""
    get = lambda k, d: getattr(args, k, d) if args is not None else d
    if model.s_embedder is None or name == 'teacher':
        return teacher_sampler(model, z, y, nfe, get('cfg', 1.0), get('cfg_interval_start', 0.0), get('shift', 0.0),
                               get('cfg_channels', 0), get('guidance', 'cfg'), get('eta', 0.05))
    if name == 'euler':
        return euler_sampler(model, z, y, nfe)
    if name == 'cm':
        return cm_sampler(model, z, y, nfe, gen)
    if name == 'mix':
        return mix_sampler(model, z, y, nfe, get('mix_det', None), get('mix_t', 0.25), gen)
    raise ValueError(f'unknown sampler {name}')


def generate(model, name, n, nfe, num_classes, seed=0, batch=250, device='cpu', args=None, rank=0, world=1,
             progress=True):
    """n samples with labels i % num_classes. Batch b uses noise seeded by (seed, b); rank r does
    batches r, r + world, ... Returns ({batch start: samples}, {batch start: labels}, network calls)
    for this rank's batches."""
    shape = (model.in_channels, model.input_size, model.input_size)
    counter, handle = count_calls(model)
    out, labels = {}, {}
    starts = list(range(0, n, batch))[rank::world]
    for b0 in tqdm(starts, desc=f'{name} {nfe} NFE', disable=not progress or rank != 0, leave=False):
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + b0)
        m = min(batch, n - b0)
        y = torch.arange(b0, b0 + m, device=device) % num_classes
        z = torch.randn((m,) + shape, generator=gen, device=device)
        out[b0] = run_sampler(model, name, z, y, nfe, gen, args).float().cpu()
        labels[b0] = y.cpu()
    handle.remove()
    return out, labels, counter['calls']


def to_uint8(x):
    """Images in [-1, 1] (N, C, H, W) -> uint8 NHWC, ADM's convention clamp(127.5 x + 128)."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def save_grid(path, images_nhwc, labels, per_row=10, max_rows=10):
    """PNG grid, one row per class (the first max_rows classes), per_row samples each."""
    from PIL import Image
    rows = []
    for c in sorted(set(labels.tolist()))[:max_rows]:
        sel = images_nhwc[labels == c][:per_row]
        if len(sel) < per_row:
            sel = torch.cat([sel, torch.zeros((per_row - len(sel),) + sel.shape[1:], dtype=sel.dtype)])
        rows.append(torch.cat(list(sel), dim=1))
    grid = torch.cat(rows, dim=0).numpy()
    if grid.shape[-1] == 1:
        grid = grid[..., 0]
    scale = max(1, 256 // images_nhwc.shape[1])               # small images are enlarged (nearest)
    im = Image.fromarray(grid)
    im = im.resize((im.width * min(scale, 8), im.height * min(scale, 8)), Image.NEAREST)
    tmp = path + '.tmp.png'
    im.save(tmp)
    os.replace(tmp, path)


def write_adm_npz(path, images_uint8_nhwc, labels=None):
    """Write an ADM-style sample file: arr_0 = uint8 images (N, H, W, C); arr_1 = int64 labels (N,) if given.

    Written to a temporary file in the destination folder and moved into place with os.replace,
    so readers never see a half-written file.
    """
    imgs = images_uint8_nhwc
    if torch.is_tensor(imgs):
        imgs = imgs.detach().cpu().numpy()
    imgs = np.asarray(imgs)
    if imgs.dtype != np.uint8 or imgs.ndim != 4 or imgs.shape[-1] not in (1, 3):
        raise ValueError(f'write_adm_npz: expected uint8 NHWC images, got dtype {imgs.dtype} shape {imgs.shape}')
    arrays = {'arr_0': np.ascontiguousarray(imgs)}
    if labels is not None:
        if torch.is_tensor(labels):
            labels = labels.detach().cpu().numpy()
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        if labels.shape[0] != imgs.shape[0]:
            raise ValueError(f'write_adm_npz: {labels.shape[0]} labels for {imgs.shape[0]} images')
        arrays['arr_1'] = labels

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix='.tmp_', suffix='.npz', dir=folder)
    try:
        with os.fdopen(fd, 'wb') as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save_npz(path, **arrays):
    """Latents (no --vae): written atomically, like the images' write_adm_npz."""
    tmp = path + '.tmp.npz'
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def load_model(path, device='cpu', use='ema', preset='XL/1'):
    """Our checkpoint (a file, a run folder or its `latest` pointer) or a LightningDiT teacher file of
    architecture `preset`. Returns (model, latent stats or None, path)."""
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path)
    if isinstance(ckpt, dict) and 'model_config' in ckpt and 'ema' in ckpt:
        model = load_dit_state(DiT(**ckpt['model_config']), ckpt[use], path)
        stats = ckpt.get('stats')
    else:
        model, stats = load_teacher(path, preset), None
    return model.eval().requires_grad_(False).to(device), stats, path


def load_latent_stats(path, channels):
    """A latents_stats.pt (LightningDiT's extraction, or our latents folder): mean and std, (1, C, 1, 1)."""
    if not os.path.isfile(path):
        raise ValueError(f'--latent-stats {path}: no such file (give the latents_stats.pt of the latents folder)')
    st = read_checkpoint(path)
    if not isinstance(st, dict) or not {'mean', 'std'} <= set(st):
        raise ValueError(f'--latent-stats {path}: not a latents_stats.pt (expected a dict with mean and std)')
    mean, std = st['mean'].float().reshape(1, -1, 1, 1), st['std'].float().reshape(1, -1, 1, 1)
    if mean.shape[1] != channels or std.shape[1] != channels:
        raise ValueError(f'--latent-stats {path}: statistics of {mean.shape[1]} channels, the model has {channels}')
    return {'mean': mean, 'std': std}


def main(argv=None):
    ap = cli_parser(__doc__)
    A = ap.add_argument
    A('--ckpt', default='runs/decm', help='checkpoint file, run folder (uses its latest), or LightningDiT file')
    A('--nfe', type=bounded(int, 1), default=1, help='network calls per sample (exact)')
    A('--sampler', default='cm', choices=['cm', 'mix', 'euler'], help='DE-CM sampler (a teacher uses its Euler+CFG)')
    A('--mix', action='store_true', help='same as --sampler mix')
    A('--mix-det', type=bounded(int, 0), default=None,
      help='deterministic flow-map steps of the Mix sampler, 0 to nfe - 1 (default nfe // 2; README)')
    A('--mix-t', type=bounded(float, 0, 1, lo_open=True, hi_open=True), default=0.25,
      help='time in (0, 1) where the Mix sampler switches to CM steps (README)')
    A('--cfg', type=bounded(float, 0), default=2.0, help='teacher sampler: CFG weight (1: no guidance)')
    A('--guidance', default='cfg', choices=['cfg', 'apg'], help="teacher sampler: 'cfg' plain CFG, or 'apg' the "
      'APG-normalised velocity DE-CM distils (same --cfg as train.py --w-cfg, and --eta)')
    A('--eta', type=bounded(float, 0), default=0.05, help='teacher sampler with --guidance apg: as train.py --eta')
    A('--cfg-interval-start', type=bounded(float, 0, 1), default=0.0,
      help='teacher sampler: guide only for t >= this, in [0, 1]')
    A('--shift', type=bounded(float, 0), default=0.0, help='teacher sampler: timestep shift (LightningDiT: 0.3; 0 = off)')
    A('--cfg-channels', type=bounded(int, 0), default=0, help='teacher sampler: guide only the first N channels, the '
      'others stay conditional (0: all, our default; 3: LightningDiT\'s forward_with_cfg, to reproduce its FID)')
    A('--num-samples', type=bounded(int, 2), default=1000, help='number of samples (labels cycle over the classes)')
    A('--batch', type=bounded(int, 1), default=250, help='samples per network call, per rank under torchrun')
    A('--seed', type=bounded(int, 0), default=0, help='noise seed')
    A('--use', default='ema', choices=['ema', 'model'], help='which weights of our checkpoint')
    A('--preset', default='XL/1', choices=list(PRESETS), help='architecture of a LightningDiT-format --ckpt '
      '(its file does not name it; default: the released XL/1); our checkpoints carry their own')
    A('--latent-stats', default=None, help='latents_stats.pt (mean, std) to de-normalise the samples of a '
      'checkpoint that carries none (a LightningDiT file); our checkpoints carry theirs (this replaces them)')
    A('--vae', default=None, help='VA-VAE file (vavae-imagenet256-f16d32-dinov2.pt): decode latents to images')
    A('--out', default='samples', help='output folder: grid.png and samples.npz')
    A('--fd-ref', default=None, help="pixel FD against a data folder ('builtin' for the built-in digits)")
    A('--fid', default=None, help='FID against REF (image folder, ADM .npz or stats .npz) with --inception')
    A('--inception', default=None, help='pt_inception-2015-12-05-6726825d.pth for --fid')
    A('--device', type=device_flag, default='auto', help='auto, cpu or cuda')
    A('--threads', type=bounded(int, 0), default=0, help='torch.set_num_threads (0: the default, one per core; '
      '1 is much faster when other jobs share the CPU)')
    args = ap.parse_args(argv)
    if args.mix:
        args.sampler = 'mix'
    if args.sampler == 'mix' and args.mix_det is not None and args.mix_det >= args.nfe:
        ap.error(f'--mix-det {args.mix_det} with --nfe {args.nfe}: at most {args.nfe - 1} (the last step is a '
                 f'CM step)')
    for flag, path in (('--vae', args.vae), ('--fid', args.fid), ('--inception', args.inception)):
        if path is not None and not os.path.exists(path):
            ap.error(f'{flag} {path}: no such file or folder')
    if args.fid and not args.inception:
        ap.error(f'--fid {args.fid}: FID needs the Inception weights: add --inception PATH')
    set_threads(args.threads)
    try:
        run(args)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


def fd_reference(args, model):
    """--fd-ref, read and checked before any sampling: the raw training latents (a fixed random subset)."""
    ref = LatentFolder(BUILTIN_DIR if args.fd_ref == 'builtin' else args.fd_ref, flag='--fd-ref')
    shape = (model.in_channels, model.input_size, model.input_size)
    if tuple(ref.shape) != shape:
        raise ValueError(f'--fd-ref {args.fd_ref}: its items have shape {tuple(ref.shape)}, the samples {shape}')
    idx = torch.randperm(len(ref), generator=torch.Generator().manual_seed(1))[:args.num_samples]
    return torch.stack([ref[i][0] for i in idx.tolist()]).float()


def run(args):
    distributed = 'RANK' in os.environ
    cuda = torch.cuda.is_available() and args.device != 'cpu'
    if distributed:
        dist.init_process_group('nccl' if cuda else 'gloo')
        if cuda:
            torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = f'cuda:{torch.cuda.current_device()}' if cuda else 'cpu'
    try:
        os.makedirs(args.out, exist_ok=True)
    except OSError as e:
        raise ValueError(f'--out {args.out}: cannot create the folder ({e.strerror or e})')
    if not os.access(args.out, os.W_OK):
        raise ValueError(f'--out {args.out} is not writable')
    model, stats, path = load_model(args.ckpt, device, args.use, args.preset)
    if args.latent_stats:
        stats = load_latent_stats(args.latent_stats, model.in_channels)
    if stats is None and args.vae:                             # never decode normalised latents
        raise ValueError(f'--vae needs the latent statistics, and {path} carries none: give '
                         f'--latent-stats latents_stats.pt (the one of the latents the model was trained on)')
    name = 'teacher' if model.s_embedder is None else args.sampler
    real = fd_reference(args, model) if args.fd_ref else None     # bad input fails here, before sampling
    if args.fid and not args.vae and model.in_channels not in (1, 3):
        raise ValueError(f'--fid needs images: the checkpoint makes {model.in_channels}-channel latents, '
                         f'add --vae PATH to decode them')
    xs, ys, calls = generate(model, name, args.num_samples, args.nfe, model.num_classes, args.seed, args.batch, device,
                             args, rank, world)
    if distributed:                                            # gather every rank's samples on rank 0
        parts = [None] * world
        dist.all_gather_object(parts, (xs, ys, calls))
        xs = {k: v for p in parts for k, v in p[0].items()}
        ys = {k: v for p in parts for k, v in p[1].items()}
        calls = sum(p[2] for p in parts)
        dist.destroy_process_group()
        if rank != 0:
            return
    x, y = torch.cat([xs[k] for k in sorted(xs)]), torch.cat([ys[k] for k in sorted(ys)])
    n_batches = len(range(0, args.num_samples, args.batch))
    print(f'{path}: {name} sampler, {args.nfe} NFE: {calls} network calls for {n_batches} batch(es) '
          f'= {calls / n_batches:g} per sample' + (' (each a batched cond+uncond pass)' if name == 'teacher'
                                                  and args.cfg != 1 else ''))
    if stats is not None:                                      # de-normalise: (z - mean) / std inverted
        x = x * stats['std'].float() + stats['mean'].float()
    npz = os.path.join(args.out, 'samples.npz')
    if args.vae:
        from model import load_vavae_decoder, decode_to_uint8
        vae = load_vavae_decoder(args.vae, device)
        images = torch.cat([decode_to_uint8(vae, x[i:i + 16].to(device)).cpu() for i in
                            tqdm(range(0, len(x), 16), desc='decoding', leave=False)])
    elif x.shape[1] in (1, 3) and stats is not None:           # pixel-space data (the built-in digits)
        images = to_uint8(x)
    else:
        images = None
    if images is not None:
        write_adm_npz(npz, images, labels=y)                 # ADM's format: arr_0 uint8 NHWC, arr_1
        save_grid(os.path.join(args.out, 'grid.png'), images, y)
        print(f'wrote {npz} and {os.path.join(args.out, "grid.png")}')
    elif stats is None:
        save_npz(npz, latents_normalised=x.numpy(), labels=y.numpy())
        print(f'wrote {npz} (normalised latents: {path} carries no statistics; pass --latent-stats to '
              f'de-normalise them)')
    else:
        save_npz(npz, latents=x.numpy(), labels=y.numpy())
        print(f'wrote {npz} (latents; pass --vae to decode)')
    if real is not None:
        from fid import pixel_fd, few_samples_warning
        D = int(np.prod(x.shape[1:]))
        print(f'FD: {pixel_fd(x.numpy(), real.numpy()):.4f} (pixel FD of {len(x)} samples against {len(real)} '
              f'images of {args.fd_ref}, {D} pixels each)')
        for n in sorted({len(x), len(real)}):
            note = few_samples_warning(n, D, 'pixel FD')
            if note:
                print(note, file=sys.stderr)
    if args.fid:
        from fid import fid_of
        print(f'FID: {fid_of(npz, args.fid, args.inception):.4f}')


if __name__ == '__main__':
    main()
