"""What the paper's ImageNet run costs, estimated from a measured CPU iteration of XL/1.

    python experiments/estimate.py [--batch 1] [--threads 2] [--gpus 64] [--tflops 125]

FLOPs of one forward pass (torch's FlopCounterMode), the average DE-CM iteration at freq 3 (train.train_step:
fused JVPs, teacher CFG, Eq. 13 v_psi) timed on this CPU at --batch and expressed in forward passes, the
activation memory per sample (the peak of an N2N iteration at --batch and twice it), scaled to the paper's run
(250 epochs of ImageNet at --global-batch on --gpus GPUs at an assumed --tflops per GPU). Random XL/1 weights in
the release layout (32x16x16 latents, 1000 classes). Writes --results/estimate.md.
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the core, by name
import common  # noqa: E402
import sample  # noqa: E402
import torch  # noqa: E402
import train  # noqa: E402
from common import peak_extra_bytes, timed, write_atomic  # noqa: E402
from model import PRESETS, student_from_teacher  # noqa: E402


def estimate(a):
    """Paper-scale cost (Sec. 5.1) from a measured CPU iteration of the XL/1 preset: FLOPs of one forward
    pass counted by torch's FlopCounterMode, the average DE-CM iteration at freq 3 timed on this CPU at a
    small batch and expressed in forward passes, activation memory per sample measured, and these scaled
    to the paper's run on GPUs under a stated throughput assumption."""
    from torch.utils.flop_counter import FlopCounterMode
    common.set_threads(a.threads)
    torch.manual_seed(0)
    B, dev = a.batch, torch.device('cpu')
    teacher = common.random_teacher(a.preset, 32, 16, 1000, 1e-3)   # non-zero adaLN: realistic work everywhere
    student = student_from_teacher(teacher)
    ema = student                                              # saves 2.7 GB: the EMA lerp is then a no-op
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-4)
    x, y = torch.randn(2 * B, 32, 16, 16), torch.randint(0, 1000, (2 * B,))
    t = torch.rand(2 * B)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        student(x[:1], t[:1], t[:1], y[:1])
    fwd_flops = fc.get_total_flops()                           # one sample, one forward pass
    args = train.parse_args(['--freq', '3'])
    off = torch.autocast('cpu', enabled=False)
    x, y, t, x2, y2 = x[:B], y[:B], t[:B], x, y
    with torch.no_grad():
        t_fwd = timed(lambda: student(x, t, t, y), 1, dev)
    step = {'it': 0}

    def iteration():                                           # cycles through it % 3 = 1, 2, 0
        step['it'] += 1
        train.train_step(student, ema, teacher, opt, x, y, step['it'], args, 1, off)
    iteration()                                                # warm-up, AdamW state allocated
    t_it = statistics.mean(timed(iteration, 1, dev, warmup=0) for _ in range(3))
    # peak memory of an N2N iteration at B and 2B: the difference is the activation memory of B samples,
    # the rest (re-allocated gradients, AdamW's temporaries) does not grow with the batch
    mems = [peak_extra_bytes(lambda: train.train_step(student, ema, teacher, opt, *b, 0, args, 1, off), dev)
            for b in [(x, y), (x2, y2)]]
    mem = (mems[1] - mems[0]) if None not in mems else None
    fwd_per_it = t_it / t_fwd                                  # the average iteration in forward passes
    params = sum(p.numel() for p in student.parameters())
    state_gb = params * 4 * (1 + 1 + 2 + 1 + 1) / 1e9          # student, grads, AdamW (2), EMA, teacher fp32
    per_gpu = a.global_batch // a.gpus
    iters = a.epochs * 1_281_167 // a.global_batch
    flops_it = fwd_flops * fwd_per_it * a.global_batch
    hours = iters * flops_it / (a.gpus * a.tflops * 1e12) / 3600
    act_gb = (mem or 0) / B * per_gpu / 1e9
    lines = [
        f'{a.preset}: {params / 1e6:.1f}M parameters; one forward pass of one 32x16x16 latent: {fwd_flops / 1e9:.0f} GFLOP '
        f'(FlopCounterMode).',
        f'Measured on this CPU ({torch.get_num_threads()} threads, batch {B}, fp32): forward {t_fwd:.2f} s, '
        f'average DE-CM iteration (freq 3, fused JVPs, teacher CFG and Eq. 13 v_psi) {t_it:.1f} s = '
        f'{fwd_per_it:.1f} forward passes; peak memory of an N2N iteration above the training state: '
        f'{mems[0] / 1e9:.1f} GB at batch {B}, {mems[1] / 1e9:.1f} GB at {2 * B}, so {(mem or 0) / B / 1e9:.2f} GB '
        f'of activations per sample.',
        f'Paper run (Sec. 5.1: 250 epochs of 1,281,167 images; the batch is not given, we take LightningDiT\'s '
        f'{a.global_batch} on {a.gpus} GPUs = {per_gpu} per GPU): {iters:,} iterations, '
        f'{flops_it / 1e15:.1f} PFLOP each.',
        f'Time at a sustained {a.tflops:.0f} TFLOP/s per GPU (about 40% of an A100\'s bf16 peak; the JVPs run '
        f'in fp32/TF32): {hours:.0f} hours ({hours / 24:.1f} days; the paper: about 3 days on 64 A100s).',
        f'Memory per GPU: {state_gb:.1f} GB of weights and optimizer state (fp32 student, gradients, AdamW, EMA, '
        f'teacher) + {(mems[0] - (mem or 0)) / 1e9:.1f} GB of re-allocated gradients and optimizer temporaries '
        f'+ about {act_gb:.0f} GB of activations at {per_gpu} per GPU in fp32 (less under bf16 autocast; '
        f'`--no-fused` or a smaller per-GPU batch with more GPUs if that does not fit).',
        f'Command: {a.command}']
    os.makedirs(a.results, exist_ok=True)
    out = os.path.join(a.results, 'estimate.md')
    write_atomic(out, '\n'.join(lines) + '\n')
    print('\n'.join(lines))
    print(f'estimate: wrote {out}')


def build_parser():
    p = common.parser(__doc__)
    p.add_argument('--preset', default='XL/1', choices=list(PRESETS), help='model preset (the paper: XL/1)')
    p.add_argument('--batch', type=int, default=1, help='CPU batch of the measured iterations (and twice it)')
    p.add_argument('--threads', type=common.bounded(int, 0), default=0, help='torch.set_num_threads (0: leave the default)')
    p.add_argument('--global-batch', type=int, default=1024, help='global batch of the paper run')
    p.add_argument('--gpus', type=int, default=64, help='GPUs of the paper run')
    p.add_argument('--epochs', type=int, default=250, help='ImageNet epochs of the paper run')
    p.add_argument('--tflops', type=float, default=125.0, help='assumed sustained TFLOP/s per GPU')
    p.add_argument('--results', default=common.RESULTS, help='folder for estimate.md')
    return p


def main(argv=None):
    return common.run_main(build_parser(), estimate, argv, 'estimate.py')


if __name__ == '__main__':
    main()
