"""Sampling from DE-CM (Sec. 4.5, Fig. 5, Table 4) and from the teacher, with exact NFE counts (one NFE = one
network call). Flow map (Eq. 9): f(x, t, s) = x + (s - t) F(x, t, s); t = 0 is noise, t = 1 data.
- Euler ODE (Fig. 5a): x <- x + (t_next - t) F(x, t, t), the instantaneous velocity (s = t).
- CM (Fig. 5b): predict data x_1 = f(x, t, 1), re-noise with fresh noise to the next t, repeat.
- Mix (Fig. 5c): flow-map steps x <- f(x, t, t_next) from t = 0 to the switch (no new noise: the N2N map jumps
  from noise to a noisy point), then CM steps; the switch, open in the paper, is by default the one measured best
  for the checkpoint's t schedule (MIX_T).
- Teacher: Euler with plain CFG (LightningDiT's CFG interval, shift, `--cfg-channels 3`; its K = 250 grid points
  are our --nfe 249), or `--guidance apg`, the very velocity DE-CM distils: a student's fair baseline.
Writes OUT/grid.png, OUT/samples.npz (ADM's uint8 `arr_0`, `arr_1` labels, the unrounded `x`; latents without --vae
on latents), de-normalised with the checkpoint's latent statistics; under torchrun split over ranks, gathered.
"""
import argparse
import contextlib
import os
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from fid import (pixel_fd, few_samples_warning, write_adm_npz, save_npz, latents_subset, cli_parser, bounded,
                 device_flag, set_threads, flagged, run_cli)
from model import PRESETS, load_vavae_decoder, decode_to_uint8, to_uint8, save_grid
from teacher import load_teacher, teacher_velocity, read_checkpoint, resolve_checkpoint

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data', 'digits16')
MIX_T = {'uniform-seg': 0.25, 'logit-normal': 0.0625, 'arctan': 0.25}   # 3 seeds; arctan: not measured

def setup_distributed(device='auto'):
    """(rank, world, device) of train.py and sample.py: under torchrun its process group (NCCL or gloo)."""
    cuda = torch.cuda.is_available() and device != 'cpu'
    if 'RANK' not in os.environ:
        return 0, 1, torch.device(('cuda' if cuda else 'cpu') if device == 'auto' else device)
    dist.init_process_group('nccl' if cuda else 'gloo')
    if cuda: torch.cuda.set_device(int(os.environ.get('LOCAL_RANK', 0)))
    return dist.get_rank(), dist.get_world_size(), torch.device(f'cuda:{torch.cuda.current_device()}' if cuda else 'cpu')

def make_out(path):
    """--out: the folder, created; a one-line error if it cannot be written."""
    with contextlib.suppress(OSError):
        os.makedirs(path, exist_ok=True)
    if not (os.path.isdir(path) and os.access(path, os.W_OK)):
        raise ValueError(f'--out {path}: cannot create the folder or write in it')

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
        if i + 1 < len(times):                                 # fresh noise
            x = (1 - times[i + 1]) * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype) + times[i + 1] * x1
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
    """The sampler flags of args (defaults where args lacks them); the Mix switch from the t schedule."""
    get = lambda k, d: d if getattr(args, k, None) is None else getattr(args, k)
    return argparse.Namespace(
        cfg=get('cfg', 1.0), start=get('cfg_interval_start', 0.0), shift=get('shift', 0.0), eta=get('eta', 0.05),
        channels=get('cfg_channels', 0), guidance=get('guidance', 'cfg'), det=get('mix_det', None),
        mix_t=get('mix_t', MIX_T.get(getattr(model, 'schedule', None), 0.25)))

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
        how = f'APG w {a.cfg:g}, eta {a.eta:g}' if a.guidance == 'apg' else f'CFG w {a.cfg:g} for t >= {a.start:g}'
        return f'teacher: {nfe} Euler steps ({how}' + f', {a.channels} channels' * bool(a.channels) + \
            f') on {f(teacher_times(nfe, a.shift).tolist(), " -> ")}'
    if name == 'mix':
        ts, cm = mix_times(nfe, a.det, a.mix_t)
        return f'mix: {len(ts) - 1} flow-map steps {f(ts, " -> ")}, then CM steps at {f(cm, ", ")}'
    if name == 'cm':
        return f'cm: {nfe} CM steps at {f([i / nfe for i in range(nfe)], ", ")}'
    return f'euler: {nfe} Euler steps of F(x, t, t) on {f(torch.linspace(0, 1, nfe + 1).tolist(), " -> ")}'

def generate(model, name, n, nfe, num_classes, seed=0, batch=250, device='cpu', args=None, rank=0, world=1,
             progress=True):
    """n samples with labels i % num_classes. Batch b uses noise seeded by (seed, b); rank r does batches
    r, r + world, ... Returns ({batch start: samples}, {batch start: labels}, network calls) of this rank."""
    calls, out, labels = [], {}, {}
    handle = model.register_forward_hook(lambda *_: calls.append(1))   # counts the network calls
    for b0 in tqdm(range(0, n, batch)[rank::world], desc=f'{name} {nfe} NFE', disable=not progress or rank > 0, leave=False):
        gen = torch.Generator(device).manual_seed(seed * 1_000_003 + b0)
        y = torch.arange(b0, min(b0 + batch, n), device=device) % num_classes
        z = torch.randn((len(y), model.in_channels, model.input_size, model.input_size), generator=gen, device=device)
        out[b0], labels[b0] = run_sampler(model, name, z, y, nfe, gen, args).float().cpu(), y.cpu()
    handle.remove()
    return out, labels, len(calls)

def latest_checkpoint(out):
    return resolve_checkpoint(out) if os.path.exists(os.path.join(out, 'latest')) else None

def load_model(path, device='cpu', use='ema', preset=None, stats_file=None, flag='--ckpt'):
    """teacher.load_teacher (our checkpoint, a run folder, or a LightningDiT file of architecture `preset`)
    -> (model, latent stats or None, path); stats_file: a latents_stats.pt to use instead."""
    model, path = flagged(flag, load_teacher, path, preset, device=device, use=use), resolve_checkpoint(path)
    st = read_checkpoint(stats_file) if stats_file and os.path.isfile(stats_file) else stats_file
    n = st['mean'].numel() if isinstance(st, dict) and {'mean', 'std'} <= set(st) else None
    if stats_file and n != model.in_channels:
        raise ValueError(f'--latent-stats {stats_file}: ' + (f'statistics of {n} channels, the model has '
                         f'{model.in_channels}' if n else 'not a latents_stats.pt (a dict with mean and std)'))
    return model, {k: st[k].float().reshape(1, -1, 1, 1) for k in ('mean', 'std')} if stats_file else model.stats, path

# ----------------------------------------------------------------------------- command line
def main(argv=None):
    ap = cli_parser(__doc__)
    A, P, N = ap.add_argument, bounded(int, 1), bounded(float, 0)
    A('--ckpt', default='runs/decm', help='checkpoint file, run folder (its latest), or LightningDiT file')
    A('--nfe', type=P, default=1, help='network calls per sample (exact)')
    A('--sampler', default='cm', choices=['cm', 'mix', 'euler'], help='DE-CM sampler (a teacher has its Euler sampler only)')
    A('--mix', action='store_true', help='same as --sampler mix')
    A('--mix-det', type=bounded(int, 0), help='flow-map steps of the Mix sampler, 0 to nfe - 1 (default nfe // 2)')
    A('--mix-t', type=bounded(float, 0, 1, True, True), help="the Mix sampler's switch to CM steps (default: the "
      "best measured for the checkpoint's t schedule: " + ', '.join(f'{k} {v:g}' for k, v in MIX_T.items()) + ')')
    A('--cfg', type=N, default=2.0, help='teacher sampler: guidance weight (1: none)')
    A('--guidance', default='cfg', choices=['cfg', 'apg'], help="teacher sampler: plain CFG, or the velocity DE-CM distils")
    A('--eta', type=N, default=0.05, help='teacher sampler with --guidance apg: as train.py --eta')
    A('--cfg-interval-start', type=bounded(float, 0, 1), default=0.0, help='teacher sampler, CFG: guide only for t >= this')
    A('--shift', type=N, default=0.0, help='teacher sampler: timestep shift (LightningDiT: 0.3; 0: off)')
    A('--cfg-channels', type=bounded(int, 0), default=0, help="teacher sampler, CFG: guide the first N channels (3: LightningDiT)")
    A('--num-samples', type=bounded(int, 2), default=1000, help='samples (labels cycle over the classes)')
    A('--batch', type=P, default=250, help='samples per network call, per rank under torchrun')
    A('--seed', type=bounded(int, 0), default=0, help='noise seed')
    A('--use', default='ema', choices=['ema', 'model'], help='which weights of our checkpoint')
    A('--preset', choices=list(PRESETS), help='architecture of a LightningDiT file (default XL/1; ours carry theirs)')
    A('--latent-stats', help='latents_stats.pt to de-normalise with (a LightningDiT file carries none)')
    A('--vae', help='VA-VAE file (vavae-imagenet256-f16d32-dinov2.pt): decode latents to images')
    A('--out', default='samples', help='output folder: grid.png and samples.npz')
    A('--fd-ref', help="pixel FD against a latents folder ('builtin': the built-in digits)")
    A('--device', type=device_flag, default='auto', help='auto, cpu or cuda')
    A('--threads', type=bounded(int, 0), default=0, help='torch.set_num_threads (0: one per core; 1 on a busy machine)')
    args = ap.parse_args(argv)
    for a in ap._actions: a.default = argparse.SUPPRESS       # parsed again: the flags typed, for refuse_ignored
    args.given = set(vars(ap.parse_args(argv)))
    if args.mix_det is not None and args.mix_det >= args.nfe:
        ap.error(f'--mix-det {args.mix_det} with --nfe {args.nfe}: at most {args.nfe - 1} (the last step is a CM step)')
    if args.vae and not os.path.exists(args.vae):
        ap.error(f'--vae {args.vae}: no such file')
    set_threads(args.threads)
    run_cli(run, args)

def refuse_ignored(args, model, path):
    """A flag typed that would not act on this checkpoint and sampler is an error naming it: nothing is ignored."""
    tea, apg, mix = model.s_embedder is None, args.guidance == 'apg', args.mix or args.sampler == 'mix'
    acts = dict(sampler=not tea, mix=not tea and ('sampler' not in args.given or args.sampler == 'mix'),  # what acts
                mix_det=mix and not tea, mix_t=mix and not tea, cfg=tea, guidance=tea, shift=tea, eta=tea and apg,
                cfg_interval_start=tea and not apg, cfg_channels=tea and not apg)
    for k in [k for k, ok in acts.items() if k in args.given and not ok][:1]:
        raise ValueError(f'--{k.replace("_", "-")}' + f' {getattr(args, k)}' * (k != 'mix') + f' does not act on {path}, '
                         + (f'a teacher: Euler steps, {args.guidance} guidance' if tea else
                            f'DE-CM (its guidance is distilled), sampled by {args.sampler}'))

def run(args):
    rank, world, device = setup_distributed(args.device)
    make_out(args.out)
    model, stats, path = load_model(args.ckpt, device, args.use, args.preset, args.latent_stats)
    refuse_ignored(args, model, path)
    args.sampler = 'mix' if args.mix else args.sampler
    if stats is None and args.vae:                             # never decode normalised latents
        raise ValueError(f'--vae needs the latent statistics, and {path} carries none: give --latent-stats')
    name, shape = 'teacher' if model.s_embedder is None else args.sampler, (model.in_channels,) + (model.input_size,) * 2
    real = latents_subset(args.fd_ref, args.num_samples, shape, BUILTIN_DIR) if args.fd_ref else None   # fails early
    if rank == 0: print(describe(model, name, args.nfe, args))
    xs, ys, calls = generate(model, name, args.num_samples, args.nfe, model.num_classes, args.seed, args.batch, device,
                             args, rank, world)
    if world > 1:                                              # gather every rank's samples on rank 0
        parts = [None] * world
        dist.all_gather_object(parts, (xs, ys, calls))
        xs, ys = ({k: v for p in parts for k, v in p[i].items()} for i in (0, 1))
        calls = sum(p[2] for p in parts)
        dist.destroy_process_group()
        if rank != 0: return
    x, y, n_batches = torch.cat([xs[k] for k in sorted(xs)]), torch.cat([ys[k] for k in sorted(ys)]), len(xs)
    print(f'{path}: {name} sampler, {args.nfe} NFE: {calls} network calls for {n_batches} batch(es) = '
          f'{calls / n_batches:g} per sample' + ' (each a batched cond+uncond pass)' * (name == 'teacher' and args.cfg != 1))
    x = x * stats['std'].float() + stats['mean'].float() if stats is not None else x   # (z - mean) / std inverted
    npz, images = os.path.join(args.out, 'samples.npz'), to_uint8(x) if x.shape[1] in (1, 3) and stats is not None else None
    if args.vae:
        images = decode_to_uint8(load_vavae_decoder(args.vae, device), x)
    if images is not None:
        write_adm_npz(npz, images, labels=y, **{} if args.vae else {'x': x.numpy()})   # x: for fid.py --pixel
        save_grid(os.path.join(args.out, 'grid.png'), [('', images, y)])
    else:
        save_npz(npz, **{'latents' if stats is not None else 'latents_normalised': x.numpy(), 'labels': y.numpy()})
    if real is not None:
        D = int(np.prod(x.shape[1:]))
        print(f'FD: {pixel_fd(x.numpy(), real.numpy()):.4f} (pixel FD of {len(x)} samples against {len(real)} '
              f'images of {args.fd_ref}, {D} pixels each)')
        for note in filter(None, (few_samples_warning(n, D, 'pixel FD') for n in sorted({len(x), len(real)}))):
            print(note, file=sys.stderr)
    print(f'sample: wrote {args.out}/ (' + ('samples.npz, grid.png)' if images is not None else 'samples.npz: latents; '
          + ('pass --vae to decode)' if stats is not None else f'normalised, {path} has no statistics: pass --latent-stats)')))

if __name__ == '__main__':
    main()
