"""Sampling from DE-CM (Sec. 4.5, Fig. 5, Table 4) and from the teacher, with exact NFE counts.

Flow map (Eq. 9): f(x, t, s) = x + (s - t) F(x, t, s); t = 0 is noise, t = 1 data; one NFE = one network call.
- Euler ODE (Fig. 5a): x <- x + (t_next - t) F(x, t, t), the instantaneous velocity (s = t).
- CM (Fig. 5b): predict data x_1 = f(x, t, 1), re-noise with fresh noise to the next t, repeat.
- Mix (Fig. 5c): deterministic flow-map steps x <- f(x, t, t_next) from t = 0 to the switch (the N2N map
  jumps from noise to a noisy point, no new noise), then CM steps. The paper leaves the switch open: by
  default it is the one measured best for the checkpoint's t schedule (MIX_T, experiments/README.md).
- Teacher: Euler with plain CFG (one batched cond + uncond call per step; LightningDiT's CFG interval,
  timestep shift and `--cfg-channels 3`; its K = 250 grid points are our --nfe 249), or `--guidance apg`,
  the very velocity DE-CM distils (teacher.teacher_velocity): the fair baseline of a student.
Samples are de-normalised with the latent statistics of the checkpoint (or `--latent-stats`) and written to
OUT/grid.png and OUT/samples.npz (ADM's uint8 `arr_0` + `arr_1` labels for pixels or with `--vae`, else
`latents`). Under torchrun the samples are split over ranks (noise seeded per batch) and gathered.
This file also holds the command-line helpers train.py shares.
"""
import argparse
import math
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from tqdm import tqdm

from fid import pixel_fd, few_samples_warning, fid_of, write_adm_npz, save_npz, latents_subset
from model import DiT, PRESETS, load_dit_state, load_vavae_decoder, decode_to_uint8
from teacher import load_teacher, teacher_velocity, read_checkpoint, resolve_checkpoint

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'digits16')
MIX_T = {'uniform-seg': 0.25, 'logit-normal': 0.0625, 'arctan': 0.25}   # 3 seeds; arctan: not measured


# ----------------------------------------------------------------------------- command-line helpers
def cli_parser(doc):
    """argparse with one-line errors (`error: ...`, exit code 2) instead of usage + error."""
    ap = argparse.ArgumentParser(description=doc.split('\n\n')[0])
    ap.error = lambda msg: (print(f'error: {msg}', file=sys.stderr), sys.exit(2))
    return ap


def bounded(kind, lo=None, hi=None, lo_open=False, hi_open=False):
    """An argparse type: kind(text) in [lo, hi] (open at an end with lo_open / hi_open), else refused."""
    what = 'an integer' if kind is int else 'a number'
    where = (f'{">" if lo_open else ">="} {lo:g}' if hi is None else
             f'in {"(" if lo_open else "["}{lo:g}, {hi:g}{")" if hi_open else "]"}')

    def parse(text):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r} is not {what}')
        if not math.isfinite(v) or (lo is not None and (v < lo or lo_open and v == lo)) or \
                (hi is not None and (v > hi or hi_open and v == hi)):
            raise argparse.ArgumentTypeError(f'{text} is out of range: give {what} {where}')
        return v
    return parse


def device_flag(text):
    """An argparse type for --device: auto, cpu, cuda or cuda:N (which must exist here)."""
    ok = text in ('auto', 'cpu') or (text.split(':')[0] == 'cuda' and torch.cuda.is_available() and
                                     (text == 'cuda' or text[5:].isdigit() and int(text[5:]) < torch.cuda.device_count()))
    if not ok:
        raise argparse.ArgumentTypeError(f'{text!r}: give auto, cpu, or a CUDA device this machine has (cuda, cuda:N)')
    return text


def setup_distributed(device='auto'):
    """(rank, world, device): under torchrun the process group (NCCL on CUDA, else gloo), else one process."""
    cuda = torch.cuda.is_available() and device != 'cpu'
    if 'RANK' not in os.environ:
        return 0, 1, torch.device(('cuda' if cuda else 'cpu') if device == 'auto' else device)
    dist.init_process_group('nccl' if cuda else 'gloo')
    if cuda:
        torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    return dist.get_rank(), dist.get_world_size(), torch.device(f'cuda:{torch.cuda.current_device()}' if cuda else 'cpu')


def set_threads(n):
    """--threads N > 0 (torch's default, a spinning thread per core, can be 10-30x slower on a busy machine)."""
    if n > 0:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------- samplers
def full(x, value):
    return torch.full((x.shape[0],), float(value), device=x.device, dtype=x.dtype)


@torch.no_grad()
def euler_sampler(model, z, y, nfe):
    """Fig. 5a: nfe Euler steps of the instantaneous velocity F(x, t, t)."""
    ts, x = torch.linspace(0, 1, nfe + 1).tolist(), z
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * model(x, full(x, t), full(x, t), y)
    return x


@torch.no_grad()
def cm_sampler(model, z, y, nfe, gen=None, times=None):
    """Fig. 5b: x_1 = f(x_t, t, 1), then re-noise to the next time (times: default i / nfe)."""
    times, x = times if times is not None else [i / nfe for i in range(nfe)], z
    for i, t in enumerate(times):
        x1 = x + (1 - t) * model(x, full(x, t), full(x, 1), y)
        if i + 1 < len(times):
            eps = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
            x = (1 - times[i + 1]) * eps + times[i + 1] * x1   # fresh noise
    return x1


def mix_times(nfe, det_steps=None, t_switch=0.25):
    """The Mix sampler's flow-map grid 0 -> t_switch (det_steps steps, default nfe // 2) and its CM times."""
    det = max(0, min(nfe // 2 if det_steps is None else det_steps, nfe - 1))
    ts = [t_switch * i / det for i in range(det + 1)] if det else [0.0]
    return ts, [ts[-1] + (1 - ts[-1]) * i / (nfe - det) for i in range(nfe - det)]


@torch.no_grad()
def mix_sampler(model, z, y, nfe, det_steps=None, t_switch=0.25, gen=None):
    """Fig. 5c: flow-map steps f(x, t, t_next) over [0, t_switch] (no new noise), then CM steps."""
    (ts, cm_times), x = mix_times(nfe, det_steps, t_switch), z
    for t, t_next in zip(ts[:-1], ts[1:]):
        x = x + (t_next - t) * model(x, full(x, t), full(x, t_next), y)
    return cm_sampler(model, x, y, len(cm_times), gen, cm_times)


def teacher_times(nfe, shift=0.0):
    """The nfe + 1 grid points i / nfe of the teacher sampler, then the shift t' = shift t / (1 + (shift - 1) t)."""
    ts = torch.linspace(0, 1, nfe + 1)
    return shift * ts / (1 + (shift - 1) * ts) if shift > 0 else ts


@torch.no_grad()
def teacher_sampler(teacher, z, y, nfe, w_cfg=1.0, cfg_interval_start=0.0, shift=0.0, cfg_channels=0,
                    guidance='cfg', eta=0.05):
    """The teacher's Euler ODE on teacher_times: plain CFG ('cfg', guided for t >= cfg_interval_start) or
    the APG-normalised velocity DE-CM distils ('apg', Alg.1 l.6 with train.py's w_cfg and eta)."""
    ts, x, apg = teacher_times(nfe, shift).tolist(), z, guidance == 'apg'
    for t, t_next in zip(ts[:-1], ts[1:]):
        w = w_cfg if apg or t >= cfg_interval_start else 1.0
        x = x + (t_next - t) * teacher_velocity(teacher, x, full(x, t), y, w_cfg=w, eta=eta, vnorm=apg,
                                                channels=0 if apg else cfg_channels)
    return x


def flags(model, args):
    """The sampler flags of args (their defaults where args lacks them); the Mix switch from the schedule."""
    get = lambda k, d: getattr(args, k, d) if getattr(args, k, None) is not None else d
    return argparse.Namespace(cfg=get('cfg', 1.0), start=get('cfg_interval_start', 0.0), shift=get('shift', 0.0),
                              channels=get('cfg_channels', 0), guidance=get('guidance', 'cfg'), eta=get('eta', 0.05),
                              det=get('mix_det', None), mix_t=get('mix_t', MIX_T.get(getattr(model, 'schedule', None), 0.25)))


def run_sampler(model, name, z, y, nfe, gen=None, args=None):
    """Dispatch on the sampler name; `args` carries the sampler flags (defaults if None)."""
    a = flags(model, args)
    if model.s_embedder is None or name == 'teacher':
        return teacher_sampler(model, z, y, nfe, a.cfg, a.start, a.shift, a.channels, a.guidance, a.eta)
    if name == 'mix':
        return mix_sampler(model, z, y, nfe, a.det, a.mix_t, gen)
    return euler_sampler(model, z, y, nfe) if name == 'euler' else cm_sampler(model, z, y, nfe, gen)


def describe(model, name, nfe, args=None):
    """One line naming the sampler's time points."""
    a, f = flags(model, args), lambda ts, sep: sep.join(f'{t:.4g}' for t in (ts if len(ts) < 10 else ts[:3] + ts[-1:]))
    if model.s_embedder is None or name == 'teacher':
        how = (f'APG w {a.cfg:g}, eta {a.eta:g}' if a.guidance == 'apg' else f'CFG w {a.cfg:g} for t >= {a.start:g}'
               + (f' on {a.channels} channels' if a.channels else ''))
        return f'teacher: {nfe} Euler steps ({how}) on {f(teacher_times(nfe, a.shift).tolist(), " -> ")}'
    if name == 'mix':
        ts, cm = mix_times(nfe, a.det, a.mix_t)
        return f'mix: {len(ts) - 1} flow-map steps {f(ts, " -> ")}, then CM steps at {f(cm, ", ")}'
    if name == 'cm':
        return f'cm: {nfe} CM steps at {f([i / nfe for i in range(nfe)], ", ")}'
    return f'euler: {nfe} Euler steps of F(x, t, t) on {f(torch.linspace(0, 1, nfe + 1).tolist(), " -> ")}'


def count_calls(model):
    """Counts forward calls of `model` (a forward hook): returns (counter dict, hook handle)."""
    counter = {'calls': 0}
    return counter, model.register_forward_hook(lambda m, i, o: counter.update(calls=counter['calls'] + 1))


def generate(model, name, n, nfe, num_classes, seed=0, batch=250, device='cpu', args=None, rank=0, world=1,
             progress=True):
    """n samples with labels i % num_classes. Batch b uses noise seeded by (seed, b); rank r does batches
    r, r + world, ... Returns ({batch start: samples}, {batch start: labels}, network calls) of this rank."""
    (calls, handle), out, labels = count_calls(model), {}, {}
    for b0 in tqdm(range(0, n, batch)[rank::world], desc=f'{name} {nfe} NFE', disable=not progress or rank > 0, leave=False):
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + b0)
        y = torch.arange(b0, min(b0 + batch, n), device=device) % num_classes
        z = torch.randn((len(y), model.in_channels, model.input_size, model.input_size), generator=gen, device=device)
        out[b0], labels[b0] = run_sampler(model, name, z, y, nfe, gen, args).float().cpu(), y.cpu()
    handle.remove()
    return out, labels, calls['calls']


# ----------------------------------------------------------------------------- files
def to_uint8(x):
    """Images in [-1, 1] (N, C, H, W) -> uint8 NHWC, ADM's convention clamp(127.5 x + 128)."""
    return (127.5 * x + 128).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def save_grid(path, panels, per_row=10):
    """The one image-grid writer: side-by-side panels [(title, uint8 NHWC images, labels)], each one row per
    class (the first 10 classes) of per_row images, small images enlarged. Atomic."""
    ims, pad, top = [], 8, 16 if any(p[0] for p in panels) else 0
    for title, images, labels in panels:
        images, labels = np.asarray(images), np.asarray(labels)
        blank = [np.zeros(images.shape[1:], np.uint8)] * per_row
        g = np.concatenate([np.concatenate((list(images[labels == c][:per_row]) + blank)[:per_row], 1)
                            for c in sorted(set(labels.tolist()))[:10]], 0)
        im = Image.fromarray(g[..., 0] if g.shape[-1] == 1 else g).convert('RGB')
        scale = max(1, min(8, 320 // im.width))
        ims.append(im.resize((im.width * scale, im.height * scale), Image.NEAREST))
    canvas = Image.new('RGB', (sum(im.width + pad for im in ims) + pad, max(im.height for im in ims) + top + 2 * pad), 'white')
    x0 = pad
    for (title, _, _), im in zip(panels, ims):
        ImageDraw.Draw(canvas).text((x0, 3), title, fill='black')
        canvas.paste(im, (x0, top + pad))
        x0 += im.width + pad
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path + '.tmp.png')
    os.replace(path + '.tmp.png', path)


def load_model(path, device='cpu', use='ema', preset='XL/1', stats_file=None):
    """Our checkpoint (a file, a run folder or its `latest` pointer) or a LightningDiT teacher file of
    architecture `preset` -> (model, latent stats or None, path). model.schedule: the t schedule it was
    trained with (None for a teacher file). stats_file: a latents_stats.pt to use instead."""
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path)
    ours = isinstance(ckpt, dict) and 'model_config' in ckpt and 'ema' in ckpt
    model = load_dit_state(DiT(**ckpt['model_config']), ckpt[use], path) if ours else load_teacher(path, preset)
    model.schedule, stats = (ckpt['args'].get('schedule', 'uniform-seg'), ckpt.get('stats')) if ours else (None, None)
    if stats_file:
        st = read_checkpoint(stats_file) if os.path.isfile(stats_file) else None
        n = st['mean'].numel() if isinstance(st, dict) and {'mean', 'std'} <= set(st) else None
        if n != model.in_channels:
            raise ValueError(f'--latent-stats {stats_file}: ' + (f'statistics of {n} channels, the model has '
                             f'{model.in_channels}' if n else 'not a latents_stats.pt (a dict with mean and std)'))
        stats = {k: st[k].float().reshape(1, -1, 1, 1) for k in ('mean', 'std')}
    return model.eval().requires_grad_(False).to(device), stats, path


# ----------------------------------------------------------------------------- command line
def main(argv=None):
    ap = cli_parser(__doc__)
    A, P, N = ap.add_argument, bounded(int, 1), bounded(float, 0)
    A('--ckpt', default='runs/decm', help='checkpoint file, run folder (its latest), or LightningDiT file')
    A('--nfe', type=P, default=1, help='network calls per sample (exact)')
    A('--sampler', default='cm', choices=['cm', 'mix', 'euler'], help='DE-CM sampler (a teacher uses its Euler+CFG)')
    A('--mix', action='store_true', help='same as --sampler mix')
    A('--mix-det', type=bounded(int, 0), help='flow-map steps of the Mix sampler, 0 to nfe - 1 (default nfe // 2)')
    A('--mix-t', type=bounded(float, 0, 1, True, True), help="the Mix sampler's switch to CM steps, in (0, 1) "
      "(default: measured best for the checkpoint's t schedule: " + ', '.join(f'{k} {v:g}' for k, v in MIX_T.items()) + ')')
    A('--cfg', type=N, default=2.0, help='teacher sampler: guidance weight (1: none)')
    A('--guidance', default='cfg', choices=['cfg', 'apg'], help="teacher sampler: 'cfg' plain CFG, or 'apg' the "
      'velocity DE-CM distils (--cfg as train.py --w-cfg, and --eta)')
    A('--eta', type=N, default=0.05, help='teacher sampler with --guidance apg: as train.py --eta')
    A('--cfg-interval-start', type=bounded(float, 0, 1), default=0.0, help='teacher sampler: guide only for t >= this')
    A('--shift', type=N, default=0.0, help='teacher sampler: timestep shift (LightningDiT: 0.3; 0: off)')
    A('--cfg-channels', type=bounded(int, 0), default=0, help='teacher sampler: guide only the first N channels '
      "(0: all; 3: LightningDiT's forward_with_cfg, to reproduce its FID)")
    A('--num-samples', type=bounded(int, 2), default=1000, help='samples (labels cycle over the classes)')
    A('--batch', type=P, default=250, help='samples per network call, per rank under torchrun')
    A('--seed', type=bounded(int, 0), default=0, help='noise seed')
    A('--use', default='ema', choices=['ema', 'model'], help='which weights of our checkpoint')
    A('--preset', default='XL/1', choices=list(PRESETS), help='architecture of a LightningDiT file (ours carry theirs)')
    A('--latent-stats', help='latents_stats.pt to de-normalise with (a LightningDiT file carries none)')
    A('--vae', help='VA-VAE file (vavae-imagenet256-f16d32-dinov2.pt): decode latents to images')
    A('--out', default='samples', help='output folder: grid.png and samples.npz')
    A('--fd-ref', help="pixel FD against a latents folder ('builtin': the built-in digits)")
    A('--fid', help='FID against REF (image folder, ADM .npz or stats .npz); needs --inception')
    A('--inception', help='pt_inception-2015-12-05-6726825d.pth for --fid')
    A('--device', type=device_flag, default='auto', help='auto, cpu or cuda')
    A('--threads', type=bounded(int, 0), default=0, help='torch.set_num_threads (0: one per core; 1 on a busy machine)')
    args = ap.parse_args(argv)
    args.sampler = 'mix' if args.mix else args.sampler
    if args.sampler == 'mix' and args.mix_det is not None and args.mix_det >= args.nfe:
        ap.error(f'--mix-det {args.mix_det} with --nfe {args.nfe}: at most {args.nfe - 1} (the last step is a CM step)')
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


def run(args):
    rank, world, device = setup_distributed(args.device)
    try:
        os.makedirs(args.out, exist_ok=True)
        assert os.access(args.out, os.W_OK)
    except (OSError, AssertionError) as e:
        raise ValueError(f'--out {args.out}: cannot write there ({getattr(e, "strerror", None) or "not writable"})')
    model, stats, path = load_model(args.ckpt, device, args.use, args.preset, args.latent_stats)
    if stats is None and args.vae:                             # never decode normalised latents
        raise ValueError(f'--vae needs the latent statistics, and {path} carries none: give --latent-stats')
    name = 'teacher' if model.s_embedder is None else args.sampler
    shape = (model.in_channels, model.input_size, model.input_size)
    real = latents_subset(args.fd_ref, args.num_samples, shape, BUILTIN_DIR) if args.fd_ref else None   # fails early
    if args.fid and not args.vae and model.in_channels not in (1, 3):
        raise ValueError(f'--fid needs images: the checkpoint makes {model.in_channels}-channel latents; add --vae')
    if rank == 0:
        print(describe(model, name, args.nfe, args))
    xs, ys, calls = generate(model, name, args.num_samples, args.nfe, model.num_classes, args.seed, args.batch, device,
                             args, rank, world)
    if world > 1:                                              # gather every rank's samples on rank 0
        parts = [None] * world
        dist.all_gather_object(parts, (xs, ys, calls))
        (xs, ys), calls = ({k: v for p in parts for k, v in p[i].items()} for i in (0, 1)), sum(p[2] for p in parts)
        dist.destroy_process_group()
        if rank != 0:
            return
    x, y = torch.cat([xs[k] for k in sorted(xs)]), torch.cat([ys[k] for k in sorted(ys)])
    n_batches = len(range(0, args.num_samples, args.batch))
    print(f'{path}: {name} sampler, {args.nfe} NFE: {calls} network calls for {n_batches} batch(es) = '
          f'{calls / n_batches:g} per sample' + (' (each a batched cond+uncond pass)' * (name == 'teacher' and args.cfg != 1)))
    x = x * stats['std'].float() + stats['mean'].float() if stats is not None else x   # (z - mean) / std inverted
    npz, images = os.path.join(args.out, 'samples.npz'), None
    if args.vae:
        vae = load_vavae_decoder(args.vae, device)
        images = torch.cat([decode_to_uint8(vae, x[i:i + 16].to(device)).cpu() for i in
                            tqdm(range(0, len(x), 16), desc='decoding', leave=False)])
    elif x.shape[1] in (1, 3) and stats is not None:           # pixel-space data (the built-in digits)
        images = to_uint8(x)
    if images is not None:
        write_adm_npz(npz, images, labels=y)
        save_grid(os.path.join(args.out, 'grid.png'), [('', images, y)])
        print(f'wrote {npz} and {os.path.join(args.out, "grid.png")}')
    else:
        save_npz(npz, **{'latents' if stats is not None else 'latents_normalised': x.numpy(), 'labels': y.numpy()})
        print(f'wrote {npz} (' + ('latents; pass --vae to decode)' if stats is not None else
                                  f'normalised latents: {path} carries no statistics; pass --latent-stats)'))
    if real is not None:
        D = int(np.prod(x.shape[1:]))
        print(f'FD: {pixel_fd(x.numpy(), real.numpy()):.4f} (pixel FD of {len(x)} samples against {len(real)} '
              f'images of {args.fd_ref}, {D} pixels each)')
        for note in filter(None, (few_samples_warning(n, D, 'pixel FD') for n in sorted({len(x), len(real)}))):
            print(note, file=sys.stderr)
    if args.fid:
        print(f'FID: {fid_of(npz, args.fid, args.inception):.4f}')


if __name__ == '__main__':
    main()
