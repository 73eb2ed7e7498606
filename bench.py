"""Measurements on the built-in dataset: the miniature pipeline of the paper, its tables, and speed.

    python bench.py pipeline   build data -> train a teacher -> distill DE-CM -> sample with the teacher's
                               Euler+CFG and the Euler, CM and Mix samplers -> pixel FD table
                               (results/pipeline.md, results/pipeline.png with sample grids)

Pixel FD: the Frechet distance between 2,000 generated and 2,000 real 16x16 digits, as raw pixel vectors
(fid.pixel_fd). The teacher is trained here from scratch (`train.py --losses fm --teacher none`).
"""
import os
import sys
import time

import numpy as np
import torch

import sample
import train
from fid import pixel_fd

RESULTS = 'results'


def real_pixels(n, data=None):
    """n real images (a fixed random subset) and their labels."""
    ds = train.LatentFolder(data or train.BUILTIN_DIR)
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(1))[:n]
    return torch.stack([ds[i][0] for i in idx.tolist()]).float(), ds.labels[idx]


def fd_of(model, stats, name, nfe, real, n, args=None, seed=0):
    """Pixel FD of n samples from one sampler; also returns the samples (de-normalised) and labels."""
    xs, ys, calls = sample.generate(model, name, n, nfe, model.num_classes, seed=seed, batch=500, args=args)
    x = torch.cat([xs[k] for k in sorted(xs)]) * stats['std'] + stats['mean']
    y = torch.cat([ys[k] for k in sorted(ys)])
    assert calls == nfe * len(xs), (calls, nfe)               # --nfe is exact
    return pixel_fd(x.numpy(), real.numpy()), x, y


def grid_rows(x, y, per_row=10):
    """One image per class per column: (10 classes x per_row) uint8 HxW grid."""
    img = sample.to_uint8(x)[..., 0]
    rows = [torch.cat(list(img[y == c][:per_row]), dim=1) for c in range(10)]
    return torch.cat(rows, dim=0)


def save_panels(path, panels):
    """Side-by-side sample grids with titles (pillow)."""
    from PIL import Image, ImageDraw
    scale, pad, title = 2, 8, 14
    ims = [Image.fromarray(g.numpy()).resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST)
           for _, g in panels]
    W = sum(im.width for im in ims) + pad * (len(ims) + 1)
    H = max(im.height for im in ims) + title + 2 * pad
    canvas = Image.new('L', (W, H), 255)
    draw = ImageDraw.Draw(canvas)
    x0 = pad
    for (name, _), im in zip(panels, ims):
        draw.text((x0, 2), name, fill=0)
        canvas.paste(im, (x0, title + pad))
        x0 += im.width + pad
    canvas.save(path + '.tmp.png')
    os.replace(path + '.tmp.png', path)


def pipeline(a):
    os.makedirs(RESULTS, exist_ok=True)
    t0 = time.time()
    runs = a.runs
    teacher_dir, decm_dir = os.path.join(runs, 'teacher'), os.path.join(runs, 'decm')
    base = ['--seed', str(a.seed), '--batch', str(a.batch)]
    if not a.skip_teacher:
        train.main(base + ['--losses', 'fm', '--teacher', 'none', '--out', teacher_dir, '--steps',
                           str(a.teacher_steps), '--lr', str(a.teacher_lr), '--resume', 'auto'])
    t1 = time.time()
    teacher_ckpt = train.latest_checkpoint(teacher_dir)
    train.main(base + ['--teacher', teacher_ckpt, '--out', decm_dir, '--steps', str(a.decm_steps),
                       '--lr', str(a.decm_lr), '--w-cfg', str(a.w_cfg), '--resume', 'auto'] + a.extra)
    t2 = time.time()
    real2, real_y = real_pixels(2 * a.n)
    real = real2[:a.n]
    ref_fd = pixel_fd(real2[a.n:].numpy(), real.numpy())       # two sets of real data: the floor
    teacher, stats, _ = sample.load_model(teacher_dir)
    decm, stats_d, _ = sample.load_model(decm_dir)
    targs = type('A', (), dict(cfg=a.w_cfg, cfg_interval_start=0.0, shift=0.0))
    rows, panels = [], []
    for nfe in [1, 2, 4, 50]:
        fd, x, y = fd_of(teacher, stats, 'teacher', nfe, real, a.n, targs)
        rows.append(('teacher Euler + CFG', nfe, fd))
        if nfe in (1, 50):
            panels.append((f'teacher {nfe} step(s)', grid_rows(x, y)))
    for name in ['cm', 'mix', 'euler']:
        for nfe in ([1, 2, 4] if name != 'euler' else [4, 16]):
            if name == 'mix' and nfe == 1:
                continue                                       # Mix at 1 NFE is the CM sampler
            fd, x, y = fd_of(decm, stats_d, name, nfe, real, a.n)
            rows.append((f'DE-CM {name}', nfe, fd))
            if (name, nfe) in [('cm', 1), ('cm', 2), ('mix', 4)]:
                panels.append((f'DE-CM {name} {nfe} NFE', grid_rows(x, y)))
    t3 = time.time()
    panels.insert(0, ('real data', grid_rows(real, real_y[:a.n])))
    save_panels(os.path.join(RESULTS, 'pipeline.png'), panels)
    fd_t50 = [fd for n_, k, fd in rows if n_.startswith('teacher') and k == 50][0]
    fd_t1 = [fd for n_, k, fd in rows if n_.startswith('teacher') and k == 1][0]
    fd_d1 = [fd for n_, k, fd in rows if n_ == 'DE-CM cm' and k == 1][0]
    lines = ['| model / sampler | NFE | pixel FD |', '|---|---|---|']
    lines += [f'| {n_} | {k} | {fd:.2f} |' for n_, k, fd in rows]
    lines += [f'| two sets of real data | - | {ref_fd:.2f} |', '',
              f'DE-CM 1-NFE FD / teacher 50-step FD = {fd_d1 / fd_t50:.2f} (bar: at most 1.5); '
              f'teacher 1-step FD / DE-CM 1-NFE FD = {fd_t1 / fd_d1:.1f} (bar: at least 5).',
              f'Time: teacher {t1 - t0:.0f} s ({a.teacher_steps} steps), DE-CM {t2 - t1:.0f} s '
              f'({a.decm_steps} steps), sampling and FD {t3 - t2:.0f} s; total {t3 - t0:.0f} s '
              f'on {torch.get_num_threads()} threads.',
              f'Command: python bench.py pipeline {" ".join(sys.argv[2:])}']
    with open(os.path.join(RESULTS, 'pipeline.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')
    print('\n'.join(lines))


def main(argv=None):
    ap = train.cli_parser(__doc__)
    sub = ap.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('pipeline', help='the whole miniature pipeline with an FD table')
    p.add_argument('--runs', default='runs', help='folder for the teacher and DE-CM runs')
    p.add_argument('--teacher-steps', type=int, default=2000, help='teacher flow-matching iterations')
    p.add_argument('--teacher-lr', type=float, default=1e-3, help='teacher learning rate')
    p.add_argument('--skip-teacher', action='store_true', help='reuse RUNS/teacher as it is')
    p.add_argument('--decm-steps', type=int, default=800, help='DE-CM iterations')
    p.add_argument('--decm-lr', type=float, default=3e-4, help='DE-CM learning rate')
    p.add_argument('--w-cfg', type=float, default=2.0, help='CFG weight (teacher sampler and distillation)')
    p.add_argument('--batch', type=int, default=128, help='batch size of both runs')
    p.add_argument('--n', type=int, default=2000, help='samples per FD')
    p.add_argument('--seed', type=int, default=0, help='seed of both runs')
    p.add_argument('extra', nargs='*', help='more train.py flags for the DE-CM run (after --)')
    a = ap.parse_args(argv)
    try:
        {'pipeline': pipeline}[a.cmd](a)
    except ValueError as e:
        print(f'error: {e}', file=sys.stderr)
        sys.exit(2)


if __name__ == '__main__':
    main()
