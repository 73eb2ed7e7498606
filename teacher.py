"""The teacher: load a pretrained flow model, freeze it, and give the distillation velocity.

Alg. 1 lines 5-6 (and 20-21 at time r): one batched call gives the conditional and the
unconditional velocity, and the guided velocity is normalised as in APG:

    v = v_c + (w_cfg - 1) * eta * (v_c - v_u) / ||v_c - v_u||          (Alg. 1 l.6)

The norm is per sample, over all D elements. We write the flag `--eta` in per-element units,
eta_flag = eta / sqrt(D), i.e. the guidance direction is rescaled to an RMS of `eta_flag`, so that
one default works for 1x16x16 pixels and 32x16x16 latents alike. With `vnorm=False` this is plain
CFG (Eq. 18): v = v_c + (w_cfg - 1)(v_c - v_u), ablation (i) of Table 3.
With no teacher ("from scratch") the target is the straight-path velocity v = z_ref - z (l.6 comment).

Guidance acts on all channels (LightningDiT's `forward_with_cfg` guides only the first three, a legacy
of DiT's 4-channel latents; we do not distil that, but the teacher's sampler offers it to reproduce
upstream's FID: `channels=3`).

Checkpoints understood by `load_teacher`: ours (a dict with 'model', 'ema', 'args'; by default the EMA
weights), LightningDiT's files (a dict with 'model', 'ema', 'opt', 'config': the 'ema' weights are
used; or a bare state dict). A LightningDiT file names no architecture: `preset` gives it (default
XL/1, the released teacher); channels, latent size and classes are read from the weights' shapes.
"""
import math
import os
import re

import torch

from model import DiT, PRESETS, load_dit_state, describe_keys

def resolve_checkpoint(path):
    """A checkpoint file, a run folder (its `latest` pointer) or the `latest` pointer file itself."""
    if os.path.isdir(path) or os.path.basename(path) == 'latest':
        pointer = os.path.join(path, 'latest') if os.path.isdir(path) else path
        if not os.path.isfile(pointer):
            raise ValueError(f'{path}: a folder without a `latest` checkpoint pointer')
        with open(pointer) as f:
            path = os.path.join(os.path.dirname(pointer), f.read().strip())
    if not os.path.exists(path):
        raise ValueError(f'{path}: no such checkpoint')
    return path

def read_checkpoint(path):
    """torch.load with weights_only=True: a checkpoint is data, never code."""
    try:
        return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise ValueError(f'{path}: no such checkpoint')
    except Exception as e:  # truncated file, a pickle that needs code, not a torch file at all
        msg = re.sub(r'\x1b\[[0-9;]*m', '', str(e))
        needs = re.search(r'Unsupported global: GLOBAL ([\w.]+)', msg)
        why = (f'it pickles the Python object {needs.group(1)}, and loading that could run code' if needs else
               'it is not a torch checkpoint of tensors and plain containers' if 'Weights only' in msg else
               f'not a complete torch file ({type(e).__name__}: {msg.strip()[:100]})')
        raise ValueError(f'{path}: cannot be read safely as a checkpoint (weights_only=True): {why}')

def lightningdit_config(sd, preset):
    """DiT config of a LightningDiT state dict: the preset names depth, width, heads and patch (a file
    does not say them); channels, classes and latent size come from the shapes of its weights."""
    if preset not in PRESETS:
        raise ValueError(f'--preset {preset}: unknown (choose from {", ".join(PRESETS)})')
    in_channels = sd['x_embedder.proj.weight'].shape[1] if 'x_embedder.proj.weight' in sd else 32
    tokens = sd['pos_embed'].shape[1] if 'pos_embed' in sd else 256
    input_size = round(math.sqrt(tokens)) * PRESETS[preset]['patch']
    num_classes = sd['y_embedder.embedding_table.weight'].shape[0] - 1   # the last row is the null class
    return dict(preset=preset, in_channels=in_channels, input_size=input_size, num_classes=num_classes,
                s_embed=any(k.startswith('s_embedder.') for k in sd))

def load_teacher(path, preset=None, in_channels=None, input_size=None, num_classes=None, device='cpu', use='ema'):
    """A frozen network from a checkpoint: the teacher F_tea(x, t, y), or any of ours (`use`: its 'ema' or
    'model' weights). `preset` (default XL/1; and, to override what the weights' shapes say, the data arguments)
    serve only LightningDiT files; ours carry their config, latent statistics (.stats) and t schedule (.schedule)."""
    path = resolve_checkpoint(path)
    ckpt = read_checkpoint(path)
    if not isinstance(ckpt, dict):
        raise ValueError(f'{path} is not a state dict or a checkpoint dict')
    if 'args' in ckpt and 'model_config' in ckpt:              # ours
        if preset not in (None, ckpt['model_config']['preset']):
            raise ValueError(f'{path} is our checkpoint of preset {ckpt["model_config"]["preset"]}, not --preset '
                             f'{preset}: ours carry their architecture (drop --preset)')
        model = load_dit_state(DiT(**ckpt['model_config']), ckpt[use], path)
        model.stats, model.schedule = ckpt.get('stats'), ckpt['args'].get('schedule', 'uniform-seg')
    else:                                                      # LightningDiT: 'ema' or a bare state dict
        sd = ckpt.get('ema', ckpt)
        sd = {k[len('module.'):] if k.startswith('module.') else k: v for k, v in sd.items()}
        if 'y_embedder.embedding_table.weight' not in sd:
            raise ValueError(f'{path} is not a teacher checkpoint (it looks like {describe_keys(sd.keys())})')
        cfg = lightningdit_config(sd, preset or 'XL/1')
        given = dict(in_channels=in_channels, input_size=input_size, num_classes=num_classes)
        cfg.update({k: v for k, v in given.items() if v is not None})
        try:
            model = load_dit_state(DiT(**cfg), sd, path)
        except ValueError as e:
            raise ValueError(f'{e}; is --preset {preset or "XL/1"} the architecture of this LightningDiT file?')
        model.stats = model.schedule = None
    return model.eval().requires_grad_(False).to(device)

def teacher_velocity(teacher, x, t, y, z=None, x_ref=None, w_cfg=1.0, eta=1.0, vnorm=True, channels=0):
    """Alg.1 l.5-6 (l.20-21 with r in place of t). teacher=None: the from-scratch v = x_ref - z.
    vnorm=False: plain CFG (Eq. 18). channels=k > 0 guides only the first k channels (the rest stay
    conditional: LightningDiT's `forward_with_cfg` with k = 3, for the teacher's own sampler only)."""
    if teacher is None:
        return x_ref - z                                       # Alg.1 l.6 comment: from scratch
    if w_cfg == 1.0:                                           # no guidance: one conditional call
        return teacher(x, t, None, y)
    null = torch.full_like(y, teacher.num_classes)
    # l.5: cond and uncond in one batched call
    v_c, v_u = teacher(torch.cat([x, x]), torch.cat([t, t]), None, torch.cat([y, null])).chunk(2)
    d = v_c - v_u
    if vnorm:                                                  # l.6: APG normalisation, per sample
        norm = d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (d.dim() - 1))
        d = eta * math.sqrt(d[0].numel()) * d / norm
    if channels > 0:
        d[:, channels:] = 0
    return v_c + (w_cfg - 1) * d                               # Eq. 18 when vnorm is off

def teacher_v(x, t, teacher, y, args, autocast, z=None, x_ref=None):
    """teacher_velocity with train.py's flags (--w-cfg, --eta, --no-vnorm), under no_grad and autocast."""
    with torch.no_grad(), autocast:
        return teacher_velocity(teacher, x, t, y, z, x_ref, args.w_cfg, args.eta, args.vnorm).to(x.dtype)
