"""The network F(x, t, s, y) of DE-CM: a LightningDiT transformer with an extra embedding of s.

F predicts the average velocity from time t to time s (t <= s), so that the flow map of Eq. 9 is

    f(x_t, t, s) = x_t + (s - t) * F(x_t, t, s, y).

Time runs from noise (t = 0) to data (t = 1), LightningDiT's convention (no x1000 scaling).
The architecture is LightningDiT's (hustvl/LightningDiT, `models/lightningdit.py`): patch embedding
plus a fixed 2D sin-cos position table, adaLN-Zero blocks with RMSNorm, 2D RoPE in attention and a
SwiGLU MLP, a class embedding with one extra row for the null class (classifier-free guidance).
Parameter and buffer names are LightningDiT's, so its released checkpoints load with strict=True
into a model built with `s_embed=False` (the teacher). The student adds `s_embedder`, whose last
layer starts at zero: a student copied from a teacher is bit-identical to it for every s.

Attention uses F.scaled_dot_product_attention. Forward-mode AD (torch.func.jvp) is not implemented
for the fused kernels, so losses.py runs its JVPs with `explicit_attention=True` (softmax written out).
"""
import math
import os
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from tqdm import tqdm

# depth, hidden size, heads, patch size. 'tiny' is the CPU model for the built-in 16x16 dataset
# (0.35M parameters); the others are LightningDiT's presets (XL/1 is the paper's teacher).
PRESETS = {
    'tiny': dict(depth=4, hidden=64, heads=4, patch=2),
    'small': dict(depth=6, hidden=128, heads=4, patch=2),
    'B/1': dict(depth=12, hidden=768, heads=12, patch=1),
    'B/2': dict(depth=12, hidden=768, heads=12, patch=2),
    'L/2': dict(depth=24, hidden=1024, heads=16, patch=2),
    'XL/1': dict(depth=28, hidden=1152, heads=16, patch=1),
    'XL/2': dict(depth=28, hidden=1152, heads=16, patch=2),
}

def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in at least float32 (bf16 under autocast), keep float64 in the gradient tests
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight

class TimestepEmbedder(nn.Module):
    """Sinusoidal features of a time in [0, 1] followed by a 2-layer MLP (DiT's embedder)."""

    def __init__(self, hidden, freq_dim=256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t):
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=t.device, dtype=t.dtype) / half)
        args = t[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))

class RoPE2D(nn.Module):
    """2D rotary embedding on an h x w token grid: the first half of each head's channels rotates with
    the row index, the second half with the column index; channel pairs (2i, 2i+1) rotate together."""

    def __init__(self, head_dim, grid):
        super().__init__()
        dim = head_dim // 2                                    # channels per axis
        freqs = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
        pos = torch.arange(grid).float()
        f = torch.repeat_interleave(pos[:, None] * freqs[None], 2, dim=-1)       # (grid, dim)
        f = torch.cat([f[:, None, :].expand(grid, grid, dim), f[None, :, :].expand(grid, grid, dim)], -1)
        self.register_buffer('freqs_cos', f.cos().reshape(grid * grid, head_dim))
        self.register_buffer('freqs_sin', f.sin().reshape(grid * grid, head_dim))

    def forward(self, x):                                      # x: (B, heads, tokens, head_dim)
        x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack([-x2, x1], dim=-1).flatten(-2)
        return x * self.freqs_cos + rotated * self.freqs_sin

class Attention(nn.Module):
    def __init__(self, hidden, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x, rope, explicit=False):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k = rope(q), rope(k)
        if explicit:   # inside torch.func.jvp: forward-mode AD has no rule for the fused SDPA kernels
            x = torch.softmax((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1), dim=-1) @ v
        else:
            x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))

class SwiGLU(nn.Module):
    def __init__(self, hidden, mlp_hidden):
        super().__init__()
        self.w12 = nn.Linear(hidden, 2 * mlp_hidden)
        self.w3 = nn.Linear(mlp_hidden, hidden)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)

class Block(nn.Module):
    """adaLN-Zero transformer block: x += gate * op(modulate(norm(x), shift, scale))."""

    def __init__(self, hidden, heads):
        super().__init__()
        self.norm1 = RMSNorm(hidden)
        self.attn = Attention(hidden, heads)
        self.norm2 = RMSNorm(hidden)
        self.mlp = SwiGLU(hidden, int(2 / 3 * 4 * hidden))  # LightningDiT: SwiGLU at 2/3 of mlp_ratio 4
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x, c, rope, explicit=False):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate1.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift1, scale1), rope, explicit)
        return x + gate2.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift2, scale2))

class FinalLayer(nn.Module):
    def __init__(self, hidden, patch, out_channels):
        super().__init__()
        self.norm_final = RMSNorm(hidden)
        self.linear = nn.Linear(hidden, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))

class PatchEmbed(nn.Module):
    def __init__(self, patch, in_channels, hidden):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)

def sincos_2d(dim, grid):
    """Fixed 2D sin-cos position table (MAE/DiT): half the channels encode the row, half the column."""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_axis(dim // 2, w), one_axis(dim // 2, h)], axis=1)

class DiT(nn.Module):
    """F(x, t, s, y). `s=None` (or a model built with s_embed=False) gives the teacher F(x, t, y)."""

    def __init__(self, preset='tiny', in_channels=1, input_size=16, num_classes=10, s_embed=True):
        super().__init__()
        cfg = PRESETS[preset] if isinstance(preset, str) else preset   # a name, or a dict like PRESETS'
        hidden, heads, patch, depth = cfg['hidden'], cfg['heads'], cfg['patch'], cfg['depth']
        self.config = dict(preset=preset, in_channels=in_channels, input_size=input_size,
                           num_classes=num_classes, s_embed=s_embed)
        self.in_channels, self.input_size, self.num_classes, self.patch = in_channels, input_size, num_classes, patch
        grid = input_size // patch
        self.x_embedder = PatchEmbed(patch, in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + 1, hidden)   # row num_classes = null
        self.s_embedder = TimestepEmbedder(hidden) if s_embed else None
        self.pos_embed = nn.Parameter(torch.from_numpy(sincos_2d(hidden, grid)).float()[None],
                                      requires_grad=False)
        self.feat_rope = RoPE2D(hidden // heads, grid)
        self.blocks = nn.ModuleList([Block(hidden, heads) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden, patch, in_channels)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in [self.t_embedder] + ([self.s_embedder] if self.s_embedder is not None else []):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:                              # adaLN-Zero
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)
        if self.s_embedder is not None:
            zero_s_branch(self)

    def forward(self, x, t, s=None, y=None, explicit_attention=False):
        """x: (B, C, H, W); t, s: (B,) times in [0, 1]; y: (B,) labels, num_classes = null class.
        explicit_attention: softmax attention written out, for torch.func.jvp (3x faster there than
        the math SDPA backend on CPU); the fused kernels otherwise."""
        B, C, H, W = x.shape
        c = self.t_embedder(t) + self.y_embedder.embedding_table(y)
        if self.s_embedder is not None and s is not None:
            c = c + self.s_embedder(s)
        x = self.x_embedder(x) + self.pos_embed
        for block in self.blocks:
            x = block(x, c, self.feat_rope, explicit_attention)
        x = self.final_layer(x, c)                             # (B, tokens, p * p * C)
        p, h, w = self.patch, H // self.patch, W // self.patch
        return x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)

def zero_s_branch(model):
    """The s branch's output layer starts at zero, so F(x, t, s) = F_teacher(x, t) for every s."""
    nn.init.zeros_(model.s_embedder.mlp[2].weight)
    nn.init.zeros_(model.s_embedder.mlp[2].bias)

def student_from_teacher(teacher):
    """Alg.1 l.1: F_theta <- copyWeights(F_tea), plus a zero-initialised s branch."""
    cfg = dict(teacher.config, s_embed=True)
    student = DiT(**cfg).to(next(teacher.parameters()).device)
    sd = {k: v for k, v in teacher.state_dict().items() if not k.startswith('s_embedder.')}
    missing, unexpected = student.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith('s_embedder.') for k in missing), (missing, unexpected)
    return student

def describe_keys(keys):
    """Guess which kind of file a set of state-dict keys came from (for error messages)."""
    keys = list(keys)
    if {'model', 'ema', 'args'} <= set(keys):
        return 'a decm checkpoint'
    if any(k.startswith(('encoder.', 'decoder.', 'quant_conv', 'post_quant_conv')) for k in keys):
        return 'a VA-VAE file'
    if any(k.startswith(('blocks.', 'y_embedder.', 'x_embedder.')) for k in keys):
        return 'a LightningDiT-style state dict'
    return 'not a file this project knows'

def key_problems(own, sd):
    """Keys of the state dict own missing from sd, keys of sd not in own, and 'key (shape in sd) vs (own)'
    for values of sd that are not tensors of own's shapes."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f'{k} {tuple(getattr(sd[k], "shape", ()))} vs {tuple(own[k].shape)}' for k in own
             if k in sd and (not torch.is_tensor(sd[k]) or sd[k].shape != own[k].shape)]
    return missing, unexpected, wrong

def load_dit_state(model, sd, path):
    """load_state_dict(strict=True) with a one-line error that names the offending keys."""
    missing, unexpected, wrong = key_problems(model.state_dict(), sd)
    if missing or unexpected or wrong:
        raise ValueError(f'{path} does not fit the model ({describe_keys(sd.keys())}): '
                         f'missing {missing[:3]} unexpected {unexpected[:3]} wrong shapes {wrong[:3]}')
    model.load_state_dict(sd, strict=True)
    return model

# ----------------------------------------------------------------------------- the VA-VAE f16d32 decoder: latents -> images
# LDM's KL-autoencoder decoder with LightningDiT's tokenizer/configs/vavae_f16d32.yaml: ch 128, ch_mult (1, 1, 2, 2, 4),
# 2 + 1 ResBlocks per level, attention at 16x16, z_channels = embed_dim = 32, GroupNorm(32, eps 1e-6), swish, no tanh;
# decode(z) = decoder(post_quant_conv(z)). Of the release file's {'state_dict': sd} (the whole training-time
# autoencoder) only decoder.* and post_quant_conv.* are used, under the file's own names.
def _vae_norm(channels):
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)

class VAEResBlock(nn.Module):
    """(GroupNorm, swish, conv3x3) x 2 plus the input, through a 1x1 conv (nin_shortcut) when widths differ."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.norm1, self.conv1 = _vae_norm(in_ch), nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2, self.conv2 = _vae_norm(out_ch), nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h

class VAEAttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions; q, k, v and proj_out are 1x1 convs."""

    def __init__(self, ch):
        super().__init__()
        self.norm = _vae_norm(ch)
        self.q, self.k, self.v, self.proj_out = [nn.Conv2d(ch, ch, 1) for _ in range(4)]

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.norm(x)
        q, k, v = [m(y).flatten(2).transpose(1, 2).unsqueeze(1) for m in (self.q, self.k, self.v)]  # (N, 1, HW, C)
        att = F.scaled_dot_product_attention(q, k, v).squeeze(1).transpose(1, 2).reshape(n, c, h, w)
        return x + self.proj_out(att)

class VAVAEDecoder(nn.Module):
    """VA-VAE f16d32 decoder: de-normalised latents (N, 32, 16, 16) -> images (N, 3, 256, 256) in ~[-1, 1].

    state_dict keys are the release file's: decoder.{conv_in, mid, up, norm_out, conv_out}.* and
    post_quant_conv.*. decoder.up[i] is resolution level i (0: full resolution, the only one without
    upsample), run from the coarsest level down. The arguments exist so that tests can build a narrow
    copy (e.g. ch=32); keep the defaults for the released weights.
    """

    def __init__(self, ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, attn_resolutions=(16,),
                 z_channels=32, embed_dim=32, out_ch=3, resolution=256):
        super().__init__()
        self.embed_dim = embed_dim
        d = self.decoder = nn.Module()                         # registered first, as in the file
        width, res = ch * ch_mult[-1], resolution // 2 ** (len(ch_mult) - 1)
        d.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        d.mid = nn.Module()
        d.mid.block_1, d.mid.attn_1, d.mid.block_2 = VAEResBlock(width, width), VAEAttnBlock(width), \
            VAEResBlock(width, width)
        levels = [None] * len(ch_mult)
        for lvl in reversed(range(len(ch_mult))):
            level = levels[lvl] = nn.Module()
            out_w = ch * ch_mult[lvl]
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            for i in range(num_res_blocks + 1):
                level.block.append(VAEResBlock(width if i == 0 else out_w, out_w))
                if res in attn_resolutions:
                    level.attn.append(VAEAttnBlock(out_w))
            width = out_w
            if lvl != 0:                                       # nearest x2, then a 3x3 conv
                level.upsample = nn.Module()
                level.upsample.conv = nn.Conv2d(width, width, 3, padding=1)
                res *= 2
        d.up = nn.ModuleList(levels)
        d.norm_out, d.conv_out = _vae_norm(width), nn.Conv2d(width, out_ch, 3, padding=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)

    def forward(self, z):
        d = self.decoder
        h = d.conv_in(self.post_quant_conv(z))
        h = d.mid.block_2(d.mid.attn_1(d.mid.block_1(h)))
        for level in reversed(d.up):
            for i, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            if hasattr(level, 'upsample'):
                h = level.upsample.conv(F.interpolate(h, scale_factor=2.0, mode='nearest'))
        return d.conv_out(F.silu(d.norm_out(h)))

def load_refusal(e):
    """Why torch.load(weights_only=True) failed, in one short line, without torch's advice to load unsafely."""
    lines = [l.strip() for l in str(e).split('WeightsUnpickler error:')[-1].splitlines() if l.strip()]
    return (lines[0].split('. ')[0] if lines else type(e).__name__)[:200]

def _short(names, n=4):
    names = [str(k) for k in names]
    return ', '.join(names[:n]) + (f' (+{len(names) - n} more)' if len(names) > n else '') if names else 'none'

def load_vavae_decoder(path, device='cpu', decoder_kwargs=None):
    """VAVAEDecoder (eval) with decoder.* and post_quant_conv.* of the release file ({'state_dict': sd} or sd; the
    kept keys must fit exactly), read with weights_only=True only; every problem is a one-line ValueError.
    decoder_kwargs: VAVAEDecoder arguments (tests only)."""
    try:
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except OSError as e:
        raise ValueError(f'cannot read {path}: {e.strerror or e}') from None
    except Exception as e:                                     # pickled objects, code, a damaged or other file
        raise ValueError(f'{path} is not a VA-VAE weights file of tensors: torch.load(weights_only=True) '
                         f'refused it ({load_refusal(e)})') from None
    if not isinstance(obj, Mapping):
        raise ValueError(f'{path} is not a VA-VAE weights file: it holds a {type(obj).__name__}, not a state dict')
    sd = obj['state_dict'] if isinstance(obj.get('state_dict'), Mapping) else obj
    kept = {k: v for k, v in sd.items() if isinstance(k, str) and k.startswith(('decoder.', 'post_quant_conv.'))}
    model = VAVAEDecoder(**(decoder_kwargs or {}))
    missing, unexpected, wrong = key_problems(model.state_dict(), kept)
    if missing or unexpected or wrong:
        inner = [k for n in ('model', 'ema') if isinstance(obj.get(n), Mapping) for k in obj[n]]
        kind = describe_keys(str(k).removeprefix('module.') for k in [*obj, *sd, *inner])
        raise ValueError(f'{path} does not fit the VA-VAE f16d32 decoder ({kind}): missing '
                         f'{_short(missing)}; unexpected {_short(unexpected)}; wrong shapes {_short(wrong)}; '
                         f'file keys start with {_short(sd)}')
    model.load_state_dict({k: v.to(torch.float32) for k, v in kept.items()}, strict=True)
    return model.to(device).eval().requires_grad_(False)

@torch.no_grad()
def decode_to_uint8(decoder, z, chunk=16):
    """De-normalised latents z (N, 32, 16, 16) -> uint8 NHWC images (to_uint8) on the CPU, decoded chunk by chunk."""
    p = next(decoder.parameters())
    return torch.cat([to_uint8(decoder(z[i:i + chunk].to(p.device, p.dtype)).float()).cpu() for i in
                      tqdm(range(0, len(z), chunk), desc='decoding', leave=False, disable=len(z) <= 4 * chunk)])

# ----------------------------------------------------------------------------- pictures of samples and of runs
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
    canvas = Image.new('RGB', (sum(i.width + pad for i in ims) + pad, max(i.height for i in ims) + top + 2 * pad), 'white')
    x0 = pad
    for (title, _, _), im in zip(panels, ims):
        ImageDraw.Draw(canvas).text((x0, 3), title, fill='black')
        canvas.paste(im, (x0, top + pad))
        x0 += im.width + pad
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    canvas.save(path + '.tmp.png')
    os.replace(path + '.tmp.png', path)

def plot(path, panels, xlabel='iteration', ylabel=None, logy=True, ylim=None):
    """The one plotting function (training curves and the experiments' figures): side-by-side panels
    [(title, {label: (xs, ys)})], markers for short series, log y axes by default. Atomic."""
    from matplotlib.figure import Figure                       # no pyplot: no global state, no display needed
    from matplotlib.ticker import LogFormatter                 # plain numbers on log axes (not 2 x 10^0)
    fig = Figure(figsize=(5 * len(panels), 4), layout='tight')
    for ax, (title, series) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker='o' if len(xs) <= 20 else None, ms=4, label=f'{label} {ys[-1]:.3g}' if ys else label)
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel, yscale='log' if logy and series else 'linear', ylim=ylim)
        if logy and series:
            ax.yaxis.set_major_formatter(LogFormatter())
            ax.yaxis.set_minor_formatter(LogFormatter(labelOnlyBase=False))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8) if series else ax.text(0.5, 0.5, 'nothing yet', ha='center', transform=ax.transAxes)
    fig.savefig(path + '.tmp.png', dpi=80)
    os.replace(path + '.tmp.png', path)

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
