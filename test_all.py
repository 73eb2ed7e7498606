"""Tests of decm. Run: python -m pytest -q test_all.py

Formulas are checked against finite differences in float64 on a model with random non-zero weights
(with adaLN-Zero init every tangent would be exactly 0 and any formula would pass).
"""
import argparse
import collections
import copy
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

import fid
import losses
import sample
import train
from model import DiT, student_from_teacher, load_dit_state, PRESETS
from teacher import teacher_velocity, load_teacher, read_checkpoint

torch.set_num_threads(2)
HERE = os.path.dirname(os.path.abspath(__file__))


def random_dit(s_embed=True, dtype=torch.float64, seed=0, channels=1, size=8, classes=10, preset='tiny'):
    torch.manual_seed(seed)
    m = DiT(preset, in_channels=channels, input_size=size, num_classes=classes, s_embed=s_embed)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    return m.to(dtype)


def batch(B=3, C=1, H=8, seed=1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, H, generator=g, dtype=dtype)
    v = torch.randn(B, C, H, H, generator=g, dtype=dtype)
    y = torch.tensor([0, 3, 10][:B])                           # 10 = null class
    return x, v, y


def flow_map(model, x, t, s, y):
    """Eq. 9: f(x, t, s) = x + (s - t) F(x, t, s)."""
    return x + losses.bcast(s - t, x) * model(x, t, s, y)


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------- JVP and targets
@pytest.mark.parametrize('fused', [True, False])
def test_jvp_matches_central_difference(fused):
    m = random_dit()
    x, v, y = batch()
    t, s = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    h = 1e-5
    # along (v, 1, 0) at (x, t, 1): the CM tangent
    _, dF = losses.model_jvp(m, x, t, s, y, (v, torch.ones_like(t), torch.zeros_like(t)), fused)
    fd = (m(x + h * v, t + h, s, y) - m(x - h * v, t - h, s, y)) / (2 * h)
    assert dF.abs().max() > 1e-3 and rel_err(dF, fd) < 1e-5
    # along (lambda v, lambda, -gamma) at (x, r, t): the N2N tangent
    lam, gam = 0.7, 1.3
    r = torch.tensor([0.01, 0.03, 0.0], dtype=torch.float64)
    _, dF = losses.model_jvp(m, x, r, t, y, (lam * v, torch.full_like(r, lam), torch.full_like(t, -gam)), fused)
    fd = (m(x + h * lam * v, r + h * lam, t - h * gam, y) - m(x - h * lam * v, r - h * lam, t + h * gam, y)) / (2 * h)
    assert dF.abs().max() > 1e-3 and rel_err(dF, fd) < 1e-5


def test_g_cm_equals_finite_difference_of_flow_map():
    m = random_dit()
    x, v, y = batch()
    t, one = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    F, dF = losses.model_jvp(m, x, t, one, y, (v, torch.ones_like(t), torch.zeros_like(t)), fused=False)
    g, target = losses.cm_residual(F.detach(), dF, v, t, w1=0.5)
    h = 1e-5   # g_cm = -d/dt f(x_t, t, 1) along dx/dt = v
    fd = -(flow_map(m, x + h * v, t + h, one, y) - flow_map(m, x - h * v, t - h, one, y)) / (2 * h)
    assert rel_err(g, fd) < 1e-5
    assert torch.allclose(target, F - 0.5 * fd, atol=1e-6)
    # the loss uses that target: with p = 0 it is the mean of (w1 g)^2
    with torch.no_grad():
        loss = losses.cm_loss(m, x, t, y, v, w1=0.5, p=0.0, c=0.0, fused=False)
    assert abs(loss.item() - (0.25 * fd.pow(2)).flatten(1).mean(1).mean().item()) < 1e-6 * loss.item()


def test_n2n_residuals_equal_finite_differences():
    m = random_dit()
    x_r, v_r, y = batch()
    v_psi = torch.randn_like(x_r)
    r = torch.tensor([0.01, 0.02, 0.04], dtype=torch.float64)
    t = torch.tensor([0.3, 0.5, 0.9], dtype=torch.float64)
    lam, gam, h = 0.7, 1.3, 1e-5
    # R_left = d/dr f(x_r, r, t) with dx_r/dr = v_r; R_right = d/dt f(x_r, r, t) - v_psi
    R_left = (flow_map(m, x_r + h * v_r, r + h, t, y) - flow_map(m, x_r - h * v_r, r - h, t, y)) / (2 * h)
    R_right = (flow_map(m, x_r, r, t + h, y) - flow_map(m, x_r, r, t - h, y)) / (2 * h) - v_psi
    tangents = (lam * v_r, torch.full_like(r, lam), torch.full_like(t, -gam))
    F, dF = losses.model_jvp(m, x_r, r, t, y, tangents, fused=False)
    g, target = losses.n2n_residual(F.detach(), dF, v_r, v_psi, r, t, lam, gam, w2=1.0)
    expected = gam * R_right - lam * R_left
    assert R_left.abs().max() > 1e-2 and R_right.abs().max() > 1e-2
    assert rel_err(g, expected) < 1e-5
    # the paper's swapped weights of Eq. 15 would fail this check
    swapped = (lam + gam) * F - gam * v_r - lam * v_psi - losses.bcast(t - r, v_r) * dF
    assert rel_err(swapped, expected) > 1e-2
    with torch.no_grad():   # the loss evaluates v_psi at the predicted point when given a function
        seen = {}
        loss = losses.n2n_loss(m, x_r, r, t, y, v_r, lambda xh: seen.setdefault('x', xh) * 0 + v_psi,
                               lam, gam, w2=1.0, p=0.0, c=0.0, fused=False)
    assert torch.allclose(seen['x'], flow_map(m, x_r, r, t, y))   # Eq. 13: f(x_r, r, t)
    assert abs(loss.item() - expected.pow(2).flatten(1).mean(1).mean().item()) < 1e-6 * loss.item()


def test_fm_loss_is_l2_plus_cosine():
    m = random_dit()
    x, v, y = batch()
    t = torch.tensor([0.1, 0.4, 0.8], dtype=torch.float64)
    with torch.no_grad():
        F = m(x, t, t, y)
        loss = losses.fm_loss(m, x, t, y, v, p=0.0, c=0.0)
    cos = (F * v).flatten(1).sum(1) / (F.flatten(1).norm(dim=1) * v.flatten(1).norm(dim=1))
    expected = (F - v).pow(2).flatten(1).mean(1).mean() + (1 - cos).mean()
    assert abs(loss.item() - expected.item()) < 1e-6


def test_adaptive_weighting():
    pred, target = torch.zeros(2, 4), torch.tensor([[1.0] * 4, [2.0] * 4])
    l = torch.tensor([1.0, 4.0])
    assert torch.allclose(losses.adaptive_l2(pred, target, p=0.5, c=1e-3), (l / (l + 1e-3).sqrt()).mean())


# ----------------------------------------------------------------------------- model and teacher
def test_student_equals_teacher_at_init_for_every_s():
    teacher = random_dit(s_embed=False, dtype=torch.float32)
    student = student_from_teacher(teacher)
    x, _, y = batch(dtype=torch.float32)
    t = torch.tensor([0.1, 0.5, 0.9])
    ref = teacher(x, t, None, y)
    for s in [0.0, 0.3, 1.0]:
        assert torch.equal(student(x, t, torch.full_like(t, s), y), ref)
    # the s branch is live: after a change of its output layer, s matters
    with torch.no_grad():
        student.s_embedder.mlp[2].weight.normal_()
    assert not torch.allclose(student(x, t, torch.zeros_like(t), y), student(x, t, torch.ones_like(t), y))


def count_calls(model):
    """Counts forward calls of model (a forward hook): (counter dict, hook handle)."""
    counter = {'calls': 0}
    return counter, model.register_forward_hook(lambda m, i, o: counter.update(calls=counter['calls'] + 1))

def test_apg_velocity_equals_hand_computation():
    teacher = random_dit(s_embed=False)
    x, _, y = batch()
    y = torch.tensor([0, 3, 7])
    t = torch.tensor([0.2, 0.5, 0.8], dtype=torch.float64)
    calls, hook = count_calls(teacher)
    v = teacher_velocity(teacher, x, t, y, w_cfg=3.0, eta=0.2)
    hook.remove()
    assert calls['calls'] == 1                                 # cond + uncond in one batched call
    v_c, v_u = teacher(x, t, None, y), teacher(x, t, None, torch.full_like(y, 10))
    D = x[0].numel()
    for i in range(3):
        d = (v_c[i] - v_u[i]).flatten()
        hand = v_c[i] + 2.0 * 0.2 * D ** 0.5 * (v_c[i] - v_u[i]) / d.norm()
        assert torch.allclose(v[i], hand, atol=1e-10)
    plain = teacher_velocity(teacher, x, t, y, w_cfg=3.0, vnorm=False)
    assert torch.allclose(plain, v_c + 2.0 * (v_c - v_u), atol=1e-10)
    z, xr = torch.randn_like(x), torch.randn_like(x)
    assert torch.equal(teacher_velocity(None, x, t, y, z, xr), xr - z)


def test_model_matches_upstream_lightningdit_output():
    """.ci/testdata/ldit_tiny_ref.pt: upstream LightningDiT (random weights), its output on (x, t, y)."""
    ref = torch.load(os.path.join(HERE, '.ci', 'testdata', 'ldit_tiny_ref.pt'), weights_only=True)
    c = ref['config']
    arch = dict(depth=c['depth'], hidden=c['hidden_size'], heads=c['num_heads'], patch=c['patch_size'])
    m = DiT(arch, in_channels=c['in_channels'], input_size=c['input_size'], num_classes=c['num_classes'],
            s_embed=False)
    load_dit_state(m, ref['state_dict'], 'ref')
    out = m(ref['x'], ref['t'], None, ref['y'])
    assert rel_err(out, ref['out']) < 1e-5


def test_xl1_names_and_shapes_match_lightningdit():
    with torch.device('meta'):
        m = DiT('XL/1', in_channels=32, input_size=16, num_classes=1000, s_embed=False)
    ours = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    theirs = {}
    for line in open(os.path.join(HERE, '.ci', 'testdata', 'lightningdit_xl1_params.txt')):
        if line.strip() and not line.startswith('#'):
            name, shape = line.rstrip('\n').split('\t')
            theirs[name] = tuple(int(s) for s in shape.split(','))
    assert len(theirs) == 351 and ours == theirs


def test_load_teacher_in_both_lightningdit_forms(tmp_path):
    t = random_dit(s_embed=False, dtype=torch.float32, channels=4, size=8)
    sd = t.state_dict()
    torch.save({'model': sd, 'ema': sd, 'opt': {}}, tmp_path / 'train.pt')
    torch.save(sd, tmp_path / 'bare.pt')
    x, _, y = batch(C=4, dtype=torch.float32)
    tt = torch.tensor([0.1, 0.5, 0.9])
    for f in ['train.pt', 'bare.pt']:
        m = load_teacher(str(tmp_path / f), preset='tiny', in_channels=4, input_size=8, num_classes=10)
        assert torch.equal(m(x, tt, None, y), t(x, tt, None, y))
        assert not any(p.requires_grad for p in m.parameters())
    with pytest.raises(ValueError, match='LightningDiT-style'):
        load_teacher(str(tmp_path / 'bare.pt'), preset='small', in_channels=4, input_size=8, num_classes=10)


# ----------------------------------------------------------------------------- samplers
@pytest.mark.parametrize('name', ['euler', 'cm', 'mix', 'teacher'])
@pytest.mark.parametrize('nfe', [1, 2, 4])
def test_samplers_make_exactly_nfe_calls(name, nfe):
    m = random_dit(s_embed=name != 'teacher', dtype=torch.float32)
    z = torch.randn(4, 1, 8, 8)
    y = torch.arange(4)
    calls, hook = count_calls(m)
    x = sample.run_sampler(m, name, z, y, nfe, torch.Generator().manual_seed(0))
    hook.remove()
    assert calls['calls'] == nfe and x.shape == z.shape and torch.isfinite(x).all()


def test_mix_sampler_uses_no_fresh_noise_in_its_deterministic_phase(monkeypatch):
    m = random_dit(dtype=torch.float32)
    z, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    draws = []
    real = torch.randn
    monkeypatch.setattr(torch, 'randn', lambda *a, **k: draws.append(1) or real(*a, **k))
    a = sample.mix_sampler(m, z, y, nfe=4, det_steps=3, gen=torch.Generator().manual_seed(0))
    assert draws == []                                         # 3 flow-map steps then 1 CM step: no noise
    b = sample.mix_sampler(m, z, y, nfe=4, det_steps=3, gen=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    sample.mix_sampler(m, z, y, nfe=4, det_steps=2, gen=torch.Generator().manual_seed(0))
    assert len(draws) == 1                                     # 2 CM steps: one re-noising
    # and the first deterministic step is the flow map f(z, 0, t_1) = z + t_1 F(z, 0, t_1)
    one = sample.mix_sampler(m, z, y, nfe=2, det_steps=1, t_switch=0.5, gen=None)
    x_half = z + 0.5 * m(z, torch.zeros(4), torch.full((4,), 0.5), y)
    assert torch.allclose(one, x_half + 0.5 * m(x_half, torch.full((4,), 0.5), torch.ones(4), y), atol=1e-6)


def test_cm_sampler_one_step_is_the_consistency_map():
    m = random_dit(dtype=torch.float32)
    z, y = torch.randn(4, 1, 8, 8), torch.arange(4)
    assert torch.allclose(sample.cm_sampler(m, z, y, 1), z + m(z, torch.zeros(4), torch.ones(4), y))


# ----------------------------------------------------------------------------- training
@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """A small built-in dataset (8x8 digits) in the latents-folder format."""
    return train.make_digits(str(tmp_path_factory.mktemp('digits')), n=600, size=8, seed=0)


@pytest.fixture(scope='module')
def teacher_ckpt(digits, tmp_path_factory):
    """A teacher checkpoint made by train.py itself (a few flow-matching steps from scratch)."""
    out = str(tmp_path_factory.mktemp('teacher'))
    train.main(['--data', digits, '--losses', 'fm', '--out', out, '--steps', '3', '--batch', '32', '--lr', '1e-3'])
    return train.latest_checkpoint(out)


def step_setup(teacher_path, argv, seed=0, dtype=torch.float32):
    args = train.parse_args(argv)
    teacher = load_teacher(teacher_path).to(dtype) if teacher_path else None
    torch.manual_seed(seed)
    student = (student_from_teacher(teacher) if teacher else DiT('tiny', 1, 8, 10, s_embed=True)).to(dtype)
    with torch.no_grad():                                      # non-zero adaLN: gradients everywhere
        for p in student.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn_like(p))
    ema = DiT(**student.config).to(dtype)
    ema.load_state_dict(student.state_dict())
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=args.lr, betas=(0.9, args.beta2))
    return args, teacher, student, ema, opt


def fixed_batch(n=16, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g, dtype=dtype)
    y = torch.randint(0, 10, (n,), generator=g)
    draws = {'z': torch.randn(n, 1, 8, 8, generator=g, dtype=dtype),
             't': (torch.randint(0, 9, (n,), generator=g) / 8).to(dtype),
             'r': torch.rand(n, generator=g, dtype=dtype) * 0.05, 'drop': torch.zeros(n, dtype=torch.bool)}
    return x, y, draws


def test_mix_switch_comes_from_the_checkpoints_schedule_and_each_sampler_names_its_times(digits, teacher_ckpt, tmp_path):
    """`sample.py --ckpt RUN --nfe 4 --mix`: the switch measured best for the run's t schedule (MIX_T), or --mix-t."""
    expect = {('logit-normal',): 'mix: 2 flow-map steps 0 -> 0.03125 -> 0.0625, then CM steps at 0.0625, 0.5312',
              ('uniform-seg',): 'mix: 2 flow-map steps 0 -> 0.125 -> 0.25, then CM steps at 0.25, 0.625',
              ('logit-normal', '--mix-t', '0.5'): 'mix: 2 flow-map steps 0 -> 0.25 -> 0.5, then CM steps at 0.5, 0.75',
              ('uniform-seg', '--sampler', 'cm'): 'cm: 4 CM steps at 0, 0.25, 0.5, 0.75'}
    for schedule, *flags in expect:
        out = str(tmp_path / schedule)
        if not os.path.exists(out):
            train.main(['--data', digits, '--teacher', teacher_ckpt, '--schedule', schedule, '--steps', '1',
                        '--batch', '8', '--out', out])
        argv = ['--ckpt', out, '--nfe', '4'] + (flags if flags[:1] == ['--sampler'] else ['--mix'] + flags)
        p = subprocess.run([sys.executable, os.path.join(HERE, 'sample.py'), *argv, '--num-samples', '8', '--threads',
                            '1', '--out', os.path.join(out, 's')], capture_output=True, text=True)
        assert p.returncode == 0 and p.stdout.splitlines()[0] == expect[(schedule, *flags)], (p.stdout, p.stderr)


def test_one_iteration_with_freq_1_runs_both_updates(teacher_ckpt):
    args, teacher, student, ema, opt = step_setup(teacher_ckpt, ['--freq', '1'])
    x, y, draws = fixed_batch()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    steps = []
    real_step = opt.step
    opt.step = lambda *a, **k: steps.append(1) or real_step(*a, **k)
    log, ok = train.train_step(student, ema, teacher, opt, x, y, 0, args, 1, torch.autocast('cpu', enabled=False), draws)
    assert ok and set(log) == {'cm', 'fm', 'n2n', 'fm2', 'grad_norm', 'grad_norm2', 'skipped'} and len(steps) == 2
    changed = [k for k, v in student.state_dict().items() if not torch.equal(v, before[k])]
    assert 's_embedder.mlp.2.weight' in changed and 'blocks.0.attn.qkv.weight' in changed
    assert not torch.equal(ema.state_dict()['blocks.0.attn.qkv.weight'], before['blocks.0.attn.qkv.weight'])
    # at iteration 1 with freq 2 only the CM + FM update runs
    args.freq = 2
    steps.clear()
    log, _ = train.train_step(student, ema, teacher, opt, x, y, 1, args, 1, torch.autocast('cpu', enabled=False), draws)
    assert set(log) == {'cm', 'fm', 'grad_norm', 'skipped'} and len(steps) == 1


def test_bf16_autocast_path_runs_on_cpu(teacher_ckpt):
    """The CUDA code path (bf16 autocast around the network passes, fp32 JVPs), exercised on CPU."""
    args, teacher, student, ema, opt = step_setup(teacher_ckpt, ['--freq', '1'])
    x, y, draws = fixed_batch()
    log, ok = train.train_step(student, ema, teacher, opt, x, y, 0, args, 1,
                               torch.autocast('cpu', dtype=torch.bfloat16), draws)
    assert ok and all(torch.isfinite(v) for v in log.values())


def test_short_teacher_run_lowers_fm_loss(digits, tmp_path):
    torch.manual_seed(0)
    ds = train.LatentFolder(digits)
    idx = torch.arange(64)
    x = (torch.stack([ds[i][0] for i in idx.tolist()]) - ds.mean) / ds.std
    y = ds.labels[idx]
    g = torch.Generator().manual_seed(0)
    z, t = torch.randn(x.shape, generator=g), torch.rand(64, generator=g)
    x_t = (1 - t.view(-1, 1, 1, 1)) * z + t.view(-1, 1, 1, 1) * x

    def fm(m):
        with torch.no_grad():
            return losses.fm_loss(m, x_t, t, y, x - z).item()
    m0 = DiT('tiny', 1, 8, 10, s_embed=False)
    torch.manual_seed(0)
    m0 = DiT('tiny', 1, 8, 10, s_embed=False)
    out = str(tmp_path / 'run')
    train.main(['--data', digits, '--losses', 'fm', '--out', out, '--steps', '60', '--batch', '32', '--lr', '2e-3',
                '--ema', '0.9'])
    m1, _, _ = sample.load_model(out, use='model')
    assert fm(m1) < 0.8 * fm(m0)


def final_weights(out):
    return torch.load(train.latest_checkpoint(out), weights_only=True)


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(digits, teacher_ckpt, tmp_path):
    common = ['--data', digits, '--teacher', teacher_ckpt, '--batch', '16', '--freq', '2', '--ckpt-every', '2']
    a, b = str(tmp_path / 'a'), str(tmp_path / 'b')
    train.main(common + ['--out', a, '--steps', '5'])
    train.main(common + ['--out', b, '--steps', '3'])
    train.main(common + ['--out', b, '--steps', '5', '--resume', 'auto'])
    wa, wb = final_weights(a), final_weights(b)
    assert wa['step'] == wb['step'] == 5
    for part in ['model', 'ema']:
        for k in wa[part]:
            assert torch.equal(wa[part][k], wb[part][k]), (part, k)


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(digits, teacher_ckpt, tmp_path, monkeypatch):
    out = str(tmp_path / 'nan')
    real = losses.fm_loss
    calls = {'n': 0}

    def fm_goes_nan(*a, **k):
        calls['n'] += 1
        value = real(*a, **k)
        return value * float('nan') if calls['n'] > 4 else value
    monkeypatch.setattr(losses, 'fm_loss', fm_goes_nan)
    with pytest.raises(SystemExit) as e:
        train.main(['--data', digits, '--losses', 'fm', '--out', out, '--steps', '20', '--batch', '16',
                    '--ckpt-every', '2', '--nan-patience', '3'])
    assert e.value.code == 1
    ck = final_weights(out)
    assert ck['step'] == 4 and all(torch.isfinite(v).all() for v in ck['model'].values())


# ----------------------------------------------------------------------------- distributed
def _ddp_worker(rank, world, init_file, teacher_path, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=world)
    args, teacher, student, ema, opt = step_setup(teacher_path, ['--freq', '1'], dtype=torch.float64)
    x, y, draws = fixed_batch(dtype=torch.float64)
    half = slice(rank * 8, rank * 8 + 8)
    for it in range(2):
        train.train_step(student, ema, teacher, opt, x[half], y[half], it, args, world,
                         torch.autocast('cpu', enabled=False), {k: v[half] for k, v in draws.items()})
    torch.save(student.state_dict(), f'{out_file}.{rank}')
    dist.destroy_process_group()


def test_two_gloo_ranks_equal_one_process_on_the_concatenated_batch(teacher_ckpt, tmp_path):
    import torch.multiprocessing as mp
    out = str(tmp_path / 'w')
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / 'init'), teacher_ckpt, out), nprocs=2, join=True)
    args, teacher, student, ema, opt = step_setup(teacher_ckpt, ['--freq', '1'], dtype=torch.float64)
    x, y, draws = fixed_batch(dtype=torch.float64)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    for it in range(2):
        train.train_step(student, ema, teacher, opt, x, y, it, args, 1, torch.autocast('cpu', enabled=False), draws)
    w0, w1 = torch.load(out + '.0', weights_only=True), torch.load(out + '.1', weights_only=True)
    single = student.state_dict()
    moved = 0
    for k in single:
        assert torch.equal(w0[k], w1[k]), k                    # ranks agree bit for bit
        assert torch.allclose(w0[k], single[k], atol=1e-10, rtol=1e-9), k
        moved += not torch.equal(w0[k], start[k])
    assert moved > 10


# ----------------------------------------------------------------------------- data
def write_latents_folder(root, shards=((0, 5), (1, 3)), C=2, H=4, classes=10, stats=True):
    """A folder in LightningDiT's extraction format, latents_flip = -latents to tell them apart."""
    from safetensors.torch import save_file
    os.makedirs(root, exist_ok=True)
    g, all_lat = torch.Generator().manual_seed(0), []
    for k, (rank, n) in enumerate(shards):
        lat = torch.randn(n, C, H, H, generator=g) * 3 + 1
        save_file({'latents': lat, 'latents_flip': -lat, 'labels': torch.randint(0, classes, (n,), generator=g)},
                  os.path.join(root, f'latents_rank{rank:02d}_shard{k:03d}.safetensors'))
        all_lat.append(lat)
    if stats:
        torch.save({'mean': torch.full((1, C, 1, 1), 1.0), 'std': torch.full((1, C, 1, 1), 3.0)},
                   os.path.join(root, 'latents_stats.pt'))
    return torch.cat(all_lat)


def test_latents_folder_is_read_normalised_flipped_and_labelled(tmp_path):
    from safetensors.torch import load_file
    root = str(tmp_path / 'lat')
    lat = write_latents_folder(root)
    ds = train.LatentFolder(root)
    assert len(ds) == 8 and ds.shape == (2, 4, 4)
    files = sorted(f for f in os.listdir(root) if f.endswith('.safetensors'))
    labels = torch.cat([load_file(os.path.join(root, f))['labels'] for f in files])
    for i in range(8):
        a, b, y = ds[i]
        assert torch.equal(a, lat[i]) and torch.equal(b, -lat[i]) and y == labels[i]
    batch = [ds[i] for i in range(8)]
    a, b = torch.stack([x[0] for x in batch]), torch.stack([x[1] for x in batch])
    torch.manual_seed(0)
    x = train.prepare_batch(a, b, ds.mean, ds.std, 'cpu')
    torch.manual_seed(0)
    flip = torch.rand(8) < 0.5
    assert 0 < flip.sum() < 8
    assert torch.allclose(x, (torch.where(flip.view(-1, 1, 1, 1), -lat, lat) - 1) / 3)
    # a missing latents_stats.pt is an error, or computed (train.py does it on rank 0 before training)
    os.remove(os.path.join(root, 'latents_stats.pt'))
    with pytest.raises(ValueError, match='latents_stats.pt is missing'):
        train.LatentFolder(root)
    ds = train.LatentFolder(root, compute_stats=True)
    assert ds.mean.shape == (1, 2, 1, 1) and torch.allclose(ds.mean.flatten(), lat.mean(dim=(0, 2, 3)), atol=1e-5)


def test_builtin_dataset_is_deterministic(tmp_path):
    a = train.make_digits(str(tmp_path / 'a'), n=30, size=8, seed=5)
    b = train.make_digits(str(tmp_path / 'b'), n=30, size=8, seed=5)
    da, db = train.LatentFolder(a), train.LatentFolder(b)
    assert torch.equal(da[7][0], db[7][0]) and torch.equal(da.labels, db.labels)
    assert da[7][0].min() >= -1 and da[7][0].max() <= 1 and da[7][0].std() > 0.1


def test_torchrun_sample_shards_into_one_npz(teacher_ckpt, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    common = ['sample.py', '--ckpt', teacher_ckpt, '--num-samples', '30', '--batch', '10', '--nfe', '2']
    subprocess.run([sys.executable] + common + ['--out', str(tmp_path / 'one')], check=True, cwd=HERE, env=env,
                   capture_output=True)
    subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29533']
                   + common + ['--out', str(tmp_path / 'two')], check=True, cwd=HERE, env=env, capture_output=True)
    one, two = np.load(tmp_path / 'one' / 'samples.npz'), np.load(tmp_path / 'two' / 'samples.npz')
    assert one['arr_0'].shape == (30, 8, 8, 1) and one['arr_0'].dtype == np.uint8
    assert np.array_equal(one['arr_0'], two['arr_0']) and np.array_equal(one['arr_1'], two['arr_1'])


# ----------------------------------------------------------------------------- VA-VAE decoder
from model import VAVAEDecoder, decode_to_uint8, load_vavae_decoder  # noqa: E402
from sample import write_adm_npz  # noqa: E402

SMALL = dict(ch=32)  # same topology as the release decoder, 4x narrower


def _fake_extras(gen):
    """Non-decoder entries that a release file carries and the loader must ignore."""
    return {
        "encoder.conv_in.weight": torch.randn(128, 3, 3, 3, generator=gen),
        "encoder.down.0.block.0.norm1.weight": torch.ones(128),
        "quant_conv.weight": torch.randn(64, 64, 1, 1, generator=gen),
        "quant_conv.bias": torch.zeros(64),
        "loss.logvar": torch.zeros(()),
        "loss.discriminator.main.0.weight": torch.randn(64, 3, 4, 4, generator=gen),
        "foundation_model.model.cls_token": torch.zeros(1, 1, 16),
        "linear_proj.weight": torch.randn(16, 32, 1, 1, generator=gen),
    }


def _release_file(path, decoder, bare=False):
    gen = torch.Generator().manual_seed(123)
    sd = dict(_fake_extras(gen))
    sd.update({k: v.clone() for k, v in decoder.state_dict().items()})
    obj = sd if bare else {"state_dict": sd, "epoch": 7, "global_step": 1000}
    torch.save(obj, path)
    return path


@pytest.fixture(scope="module")
def small_decoder():
    torch.manual_seed(0)
    return VAVAEDecoder(**SMALL).eval()


def test_release_key_names_and_shapes():
    sd = VAVAEDecoder().state_dict()
    expect = {
        "post_quant_conv.weight": (32, 32, 1, 1),
        "decoder.conv_in.weight": (512, 32, 3, 3),
        "decoder.mid.block_1.norm1.weight": (512,),
        "decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "decoder.mid.attn_1.proj_out.bias": (512,),
        "decoder.up.4.attn.2.k.weight": (512, 512, 1, 1),
        "decoder.up.4.upsample.conv.weight": (512, 512, 3, 3),
        "decoder.up.3.block.0.conv1.weight": (256, 512, 3, 3),
        "decoder.up.3.block.0.nin_shortcut.weight": (256, 512, 1, 1),
        "decoder.up.1.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "decoder.up.1.upsample.conv.weight": (128, 128, 3, 3),
        "decoder.up.0.block.2.conv2.weight": (128, 128, 3, 3),
        "decoder.norm_out.weight": (128,),
        "decoder.conv_out.weight": (3, 128, 3, 3),
    }
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert len(sd) == 196
    assert not any(k.startswith("decoder.up.0.upsample") for k in sd)  # full-res level has no upsample
    assert not any(".attn." in k and not k.startswith("decoder.up.4.") for k in sd)  # attention only at 16x16
    assert sum(v.numel() for v in sd.values()) == 41418659


def test_release_format_loads_ignores_extras_and_runs(tmp_path):
    torch.manual_seed(1)
    src = VAVAEDecoder().eval()
    path = _release_file(tmp_path / "vavae.pt", src)
    dec = load_vavae_decoder(path)
    assert not dec.training
    for k, v in src.state_dict().items():
        assert torch.equal(dec.state_dict()[k], v), k
    z = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = dec(z)
    assert out.shape == (1, 3, 256, 256) and torch.isfinite(out).all()


def test_small_shape_and_determinism(small_decoder):
    z = torch.randn(2, 32, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        a = small_decoder(z)
        b = small_decoder(z)
    assert a.shape == (2, 3, 256, 256)
    assert torch.equal(a, b)
    u = decode_to_uint8(small_decoder, z)
    assert u.dtype == torch.uint8 and u.shape == (2, 256, 256, 3)
    ref = torch.clamp(127.5 * a + 128.0, 0, 255).permute(0, 2, 3, 1).to(torch.uint8)
    assert torch.equal(u, ref)


def test_bare_state_dict_loads(tmp_path, small_decoder):
    path = _release_file(tmp_path / "bare.pt", small_decoder, bare=True)
    dec = load_vavae_decoder(path, decoder_kwargs=SMALL)
    z = torch.randn(1, 32, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(dec(z), small_decoder(z))


def test_missing_key_is_value_error(tmp_path, small_decoder):
    sd = {k: v for k, v in small_decoder.state_dict().items() if k != "decoder.conv_out.bias"}
    torch.save({"state_dict": sd}, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="decoder.conv_out.bias"):
        load_vavae_decoder(tmp_path / "broken.pt", decoder_kwargs=SMALL)


def test_lightningdit_file_rejected(tmp_path):
    dit = {
        "pos_embed": torch.zeros(1, 4, 8),
        "x_embedder.proj.weight": torch.zeros(8, 32, 1, 1),
        "y_embedder.embedding_table.weight": torch.zeros(11, 8),
        "blocks.0.attn.qkv.weight": torch.zeros(24, 8),
    }
    torch.save(dit, tmp_path / "dit_bare.pt")
    with pytest.raises(ValueError, match="LightningDiT"):
        load_vavae_decoder(tmp_path / "dit_bare.pt")
    torch.save({"model": dit, "ema": dit, "opt": {}, "config": {"a": 1}}, tmp_path / "dit_train.pt")
    with pytest.raises(ValueError, match="LightningDiT"):
        load_vavae_decoder(tmp_path / "dit_train.pt")


def test_decm_file_rejected(tmp_path):
    dit = {"blocks.0.attn.qkv.weight": torch.zeros(24, 8)}
    torch.save({"model": dit, "ema": dit, "args": {"lr": 1e-4}}, tmp_path / "decm.pt")
    with pytest.raises(ValueError, match="decm"):
        load_vavae_decoder(tmp_path / "decm.pt")


def test_adm_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, size=(5, 16, 16, 3), dtype=np.uint8)
    labels = np.array([0, 1, 999, 4, 5])
    out = tmp_path / "sub" / "samples.npz"
    write_adm_npz(out, torch.from_numpy(imgs), labels=torch.from_numpy(labels))
    with np.load(out) as f:
        assert sorted(f.files) == ["arr_0", "arr_1"]
        assert f["arr_0"].dtype == np.uint8 and f["arr_0"].shape == (5, 16, 16, 3)
        assert np.array_equal(f["arr_0"], imgs)
        assert np.array_equal(f["arr_1"], labels)
    write_adm_npz(out, imgs[:2])  # overwrite in place, no labels
    with np.load(out) as f:
        assert f.files == ["arr_0"] and np.array_equal(f["arr_0"], imgs[:2])
    assert sorted(p.name for p in out.parent.iterdir()) == ["samples.npz"]  # no temp files left


def test_adm_npz_rejects_float(tmp_path):
    with pytest.raises(ValueError):
        write_adm_npz(tmp_path / "x.npz", np.zeros((1, 8, 8, 3), dtype=np.float32))


def test_pickled_objects_refused_and_no_code_runs(tmp_path, small_decoder):
    """weights_only=True, no fallback: pickled objects, code, or a file that is no torch file at all are
    refused in one line that never advises weights_only=False, and nothing in the file ran."""
    class Bomb:
        def __reduce__(self):
            return (open, (str(tmp_path / "BOMB_WENT_OFF"), "w"))
    sd = dict(small_decoder.state_dict())
    torch.save({"state_dict": sd, "hparams": argparse.Namespace(lr=1.0)}, tmp_path / "pickled.pt")
    torch.save({"state_dict": sd, "bomb": Bomb()}, tmp_path / "bomb.pt")
    (tmp_path / "notes.txt").write_text("# not a torch file\n")
    (tmp_path / "stand-in.bin").write_bytes(b"stand-in")
    for name in ("pickled.pt", "bomb.pt", "notes.txt", "stand-in.bin"):
        with pytest.raises(ValueError, match="not a VA-VAE weights file of tensors") as e:
            load_vavae_decoder(tmp_path / name, decoder_kwargs=SMALL)
        msg = str(e.value)
        assert "\n" not in msg and "weights_only=False" not in msg and "allow_unsafe" not in msg, msg
    assert not (tmp_path / "BOMB_WENT_OFF").exists(), "unpickling ran code from the file"


# ----------------------------------------------------------------------------- crash safety, bad input
# Robustness of the CLIs: crash-safe training, exact resume, safe checkpoint loading, a bad-input matrix.
#
# Every CLI runs in its own process (cwd = this folder) on CPU with one thread (OMP_NUM_THREADS=1: on a loaded
# 2-core machine two intra-op threads per process are 20-50x slower). The kill-and-resume and signal tests start
# `python train.py ...` cold; the bad-input matrix and the random-kill loop fork their runs from a warm launcher
# (LAUNCHER below) that has imported torch once, and test_forked_matches_cold_start checks it against cold starts.
ENV = {k: v for k, v in os.environ.items() if k not in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')}
ENV.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PYTHONUNBUFFERED='1', CUDA_VISIBLE_DEVICES='',
           TQDM_DISABLE='1')           # (tqdm bars created with an explicit `disable=` ignore it: filtered below)
TQDM_SEGMENT = re.compile(r'\d+%\||\d+/\d+ \[|it/s\]|s/it\]')


# ----------------------------------------------------------------------------- helpers
class NotAWeight:
    """Any class: a weights_only load must refuse to import it."""

    def __init__(self):
        self.x = 1


class SneakyDict(collections.OrderedDict):
    """A subclass of an allowed type is still code."""


class Bomb:
    """Unpickling this would create a file (builtins.open): proof that no code ran if the file is absent."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, 'w'))


def stderr_lines(err):
    """Non-empty lines of stderr, without tqdm's progress fragments (\\r-separated)."""
    segs = [s.strip() for s in re.split(r'[\r\n]', err)]
    return [s for s in segs if s and not TQDM_SEGMENT.search(s)]


def assert_one_error(rc, err, must=(), what=''):
    lines = stderr_lines(err)
    assert 'Traceback' not in err, f'{what}: traceback\n{err}'
    assert rc == 2, f'{what}: exit code {rc}, stderr:\n{err}'
    assert len(lines) == 1, f'{what}: expected one error line, got {lines}'
    assert lines[0].startswith('error: '), f'{what}: {lines[0]!r}'
    for m in must:
        assert m in lines[0], f'{what}: {m!r} not in {lines[0]!r}'
    return lines[0]


def run_cli(args, timeout=240):
    p = subprocess.run([sys.executable] + [str(a) for a in args], cwd=HERE, env=ENV, capture_output=True,
                       text=True, timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def popen_cli(args, log_prefix):
    out, err = open(log_prefix + '.out', 'w'), open(log_prefix + '.err', 'w')
    p = subprocess.Popen([sys.executable] + [str(a) for a in args], cwd=HERE, env=ENV, stdout=out, stderr=err)
    out.close(), err.close()
    return p


def read(path):
    try:
        with open(path, errors='replace') as f:
            return f.read()
    except FileNotFoundError:                                  # not created yet
        return ''


def wait_for(pred, timeout, proc=None, poll=0.01):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        if proc is not None and proc.poll() is not None:
            return pred()
        time.sleep(poll)
    return False


def latest_step(out):
    p = train.latest_checkpoint(str(out))
    if p is None:
        return None
    return int(re.search(r'ckpt_(\d+)\.pt$', p).group(1))


def flat_tensors(obj, prefix=''):
    """{dotted name: tensor} of every tensor in nested dicts/lists."""
    if torch.is_tensor(obj):
        return {prefix: obj}
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else []
    out = {}
    for k, v in items:
        out.update(flat_tensors(v, f'{prefix}.{k}' if prefix else str(k)))
    return out


def assert_bit_equal(a, b, what):
    ta, tb = flat_tensors(a), flat_tensors(b)
    assert ta.keys() == tb.keys(), what
    diff = [k for k in ta if not torch.equal(ta[k], tb[k])]
    assert not diff, f'{what}: {len(diff)} tensors differ, e.g. {diff[:3]}'


# ----------------------------------------------------------------------------- shared inputs
class W:
    pass


@pytest.fixture(scope='module')
def w(tmp_path_factory):
    """Tiny digits (8x8), a 2-step teacher (in-process) and crafted bad inputs."""
    root = tmp_path_factory.mktemp('robust')
    w = W()
    w.root = str(root)
    w.D = train.make_digits(str(root / 'd8'), n=200, size=8)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train.main(['--data', w.D, '--losses', 'fm', '--out', str(root / 'teacher'), '--steps', '2',
                    '--batch', '16', '--device', 'cpu'])
        train.main(['--data', w.D, '--teacher', str(root / 'teacher'), '--out', str(root / 'decm'), '--steps', '1',
                    '--batch', '16', '--device', 'cpu'])
    finally:
        torch.set_num_threads(threads)
    w.handlers_after = {s: signal.getsignal(s) for s in handlers}
    w.handlers_before = handlers
    for s, h in handlers.items():                              # keep pytest's Ctrl-C whatever happened
        signal.signal(s, h)
    w.T = train.latest_checkpoint(str(root / 'teacher'))
    w.decm = str(root / 'decm')
    w.png = str(root / 'one.png')
    Image.new('L', (8, 8)).save(w.png)
    w.nanstats, w.okstats = str(root / 'nan_stats.npz'), str(root / 'ok_stats.npz')
    np.savez(w.nanstats, mu=np.array([np.nan, 0.0]), sigma=np.eye(2))
    np.savez(w.okstats, mu=np.zeros(2), sigma=np.eye(2))

    from safetensors.torch import save_file

    def folder(name, x, y, stats=True):
        d = root / name
        d.mkdir()
        save_file({'latents': x, 'latents_flip': x.clone(), 'labels': y}, str(d / 'latents_rank00_shard000.safetensors'))
        if stats:
            torch.save({'mean': x.mean(dim=(0, 2, 3), keepdim=True), 'std': x.std(dim=(0, 2, 3), keepdim=True)},
                       str(d / 'latents_stats.pt'))
        return str(d)
    g = torch.Generator().manual_seed(0)
    w.empty = str(root / 'empty')
    os.makedirs(w.empty)
    w.twoch = folder('twoch', torch.randn(40, 2, 8, 8, generator=g), torch.arange(40) % 10)
    w.badlab = folder('badlab', torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 13)   # labels 0..12
    w.nostats = folder('nostats', torch.randn(40, 1, 8, 8, generator=g), torch.arange(40) % 10, stats=False)
    with open(w.T, 'rb') as f:
        blob = f.read()
    w.trunc = str(root / 'truncated.pt')
    with open(w.trunc, 'wb') as f:
        f.write(blob[:len(blob) // 2])
    w.foo = str(root / 'foo.pt')
    torch.save({'foo': torch.zeros(1)}, w.foo)
    w.small = str(root / 'small_state_dict.pt')                # a bare LightningDiT-style dict, other preset
    torch.save(DiT('small', in_channels=1, input_size=8, num_classes=10, s_embed=False).state_dict(), w.small)
    w.obj = str(root / 'object.pt')
    torch.save({'model': NotAWeight(), 'ema': {}, 'args': {}, 'model_config': {}}, w.obj)
    w.sneaky = str(root / 'sneaky.pt')
    sd = SneakyDict()
    sd['y_embedder.embedding_table.weight'] = torch.zeros(11, 64)
    torch.save(sd, w.sneaky)
    w.marker = str(root / 'BOMB_WENT_OFF')
    w.bomb = str(root / 'bomb.pt')
    torch.save({'ema': Bomb(w.marker)}, w.bomb)
    w.afile = str(root / 'a_regular_file')
    with open(w.afile, 'w') as f:
        f.write('not a folder\n')
    w.images = str(root / 'images.npz')
    np.savez(w.images, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    w.logs = str(root / 'logs')
    os.makedirs(w.logs)
    return w


def test_in_process_train_restores_signal_handlers(w):
    """train.main called in-process (tests) must give Ctrl-C back to the caller."""
    assert w.handlers_after == w.handlers_before


# ----------------------------------------------------------------------------- bad-input matrix
def _train(w, case, *extra):
    return ['train.py', '--data', w.D, '--out', os.path.join(w.root, 'out', case), '--steps', '1',
            '--batch', '16', *extra]


def _sample(w, case, *extra):
    return ['sample.py', '--ckpt', w.T, '--out', os.path.join(w.root, 'samples', case), '--num-samples', '4',
            '--batch', '4', *extra]


# id: (argv builder, substrings the error line must contain)
CASES = {
    'train-missing-data': (lambda w, c: _train(w, c, '--data', os.path.join(w.root, 'nope')), ['no such folder']),
    'train-empty-data': (lambda w, c: _train(w, c, '--data', w.empty), ['no *.safetensors']),
    'train-shape-vs-teacher': (lambda w, c: _train(w, c, '--data', w.twoch, '--teacher', w.T), ['shape']),
    'train-labels-out-of-range': (lambda w, c: _train(w, c, '--data', w.badlab, '--teacher', w.T),
                                  ['labels', '10 classes']),
    'train-batch-over-dataset': (lambda w, c: _train(w, c, '--batch', '300', '--losses', 'fm'),
                                 ['fewer than one batch']),
    'train-missing-teacher': (lambda w, c: _train(w, c, '--teacher', os.path.join(w.root, 'nope.pt')),
                              ['--teacher', 'no such checkpoint']),
    'train-truncated-teacher': (lambda w, c: _train(w, c, '--teacher', w.trunc), ['--teacher', 'cannot be read']),
    'train-not-ours-teacher': (lambda w, c: _train(w, c, '--teacher', w.foo), ['not a teacher checkpoint']),
    'train-other-preset-teacher': (lambda w, c: _train(w, c, '--teacher', w.small), ['does not fit']),
    'train-not-ours-resume': (lambda w, c: _train(w, c, '--resume', w.foo, '--losses', 'fm'),
                              ['not a decm checkpoint']),
    'train-truncated-resume': (lambda w, c: _train(w, c, '--resume', w.trunc, '--losses', 'fm'),
                               ['--resume', 'cannot be read']),
    'train-teacher-as-resume': (lambda w, c: _train(w, c, '--teacher', w.T, '--resume', w.T),
                                ['--teacher, not --resume']),
    'train-resume-other-shape': (lambda w, c: _train(w, c, '--data', w.twoch, '--resume', w.T, '--losses', 'fm'),
                                 ['shape']),
    'train-unknown-loss': (lambda w, c: _train(w, c, '--losses', 'fm,bogus'), ['bogus']),
    'train-steps-0': (lambda w, c: _train(w, c, '--steps', '0'), ['--steps']),
    'train-unwritable-out': (lambda w, c: _train(w, c, '--losses', 'fm', '--out', os.path.join(w.afile, 'sub')),
                             ['--out']),
    'train-unknown-flag': (lambda w, c: _train(w, c, '--no-such-flag'), ['--no-such-flag']),
    # weights_only refusals (pickled Python objects, not tensors)
    'train-object-teacher': (lambda w, c: _train(w, c, '--teacher', w.obj), ['safely']),
    'train-sneaky-teacher': (lambda w, c: _train(w, c, '--teacher', w.sneaky), ['safely']),
    'train-bomb-teacher': (lambda w, c: _train(w, c, '--teacher', w.bomb), ['safely']),
    'train-object-resume': (lambda w, c: _train(w, c, '--resume', w.obj, '--losses', 'fm'), ['safely']),
    'sample-missing-ckpt': (lambda w, c: _sample(w, c, '--ckpt', os.path.join(w.root, 'nope.pt')),
                            ['--ckpt', 'no such checkpoint']),
    'sample-folder-without-latest': (lambda w, c: _sample(w, c, '--ckpt', w.empty), ['latest']),
    'sample-truncated-ckpt': (lambda w, c: _sample(w, c, '--ckpt', w.trunc), ['--ckpt', 'cannot be read']),
    'sample-not-ours-ckpt': (lambda w, c: _sample(w, c, '--ckpt', w.foo), ['not a teacher checkpoint']),
    'sample-object-ckpt': (lambda w, c: _sample(w, c, '--ckpt', w.obj), ['safely']),
    'sample-bomb-ckpt': (lambda w, c: _sample(w, c, '--ckpt', w.bomb), ['safely']),
    'sample-nfe-0': (lambda w, c: _sample(w, c, '--nfe', '0'), ['--nfe']),
    'sample-nfe-negative': (lambda w, c: _sample(w, c, '--nfe', '-1'), ['--nfe']),
    'sample-unwritable-out': (lambda w, c: _sample(w, c, '--out', os.path.join(w.afile, 'sub')), ['--out']),
    'fid-missing-file': (lambda w, c: ['fid.py', os.path.join(w.root, 'nope.npz'), w.images], ['does not exist']),
    'fid-missing-inception': (lambda w, c: ['fid.py', w.images, w.images], ['--inception']),
}


# A warm launcher: a real `python` process imports torch and the CLIs once (~2 s), then forks one child per
# run, which runs the script as __main__ (runpy) with stdout/stderr on files, as the interpreter would (an
# uncaught exception prints its traceback and exits 1). 35 cold `python train.py` starts cost ~80 s on 2
# shared cores. test_forked_matches_cold_start checks a few cases against a cold start.
# `batch JSON`: run [[name, argv, log prefix], ...] two at a time, print {name: exit code}.
# `serve`: read JSON lines ["run", [argv, prefix]] -> print the child's pid; ["wait", pid] -> its exit code.
LAUNCHER = r"""
import json, os, runpy, sys, traceback
sys.path.insert(0, os.getcwd())
import torch, train, sample, fid                                 # noqa: F401 (warm imports for the children)
try:
    from torch._decomp import decompositions_for_jvp              # noqa: F401 (loaded by the first JVP)
except ImportError:
    pass

def start(argv, prefix):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        for fd, ext in ((1, '.out'), (2, '.err')):
            os.dup2(os.open(prefix + ext, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        sys.argv = list(argv)
        try:
            runpy.run_path(argv[0], run_name='__main__')
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, int) and e.code is not None:
                print(e.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
    finally:
        os._exit(code)

if sys.argv[1] == 'batch':
    results, running = {}, {}
    def reap():
        pid, status = os.wait()
        results[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    for name, argv, prefix in json.loads(sys.argv[2]):
        while len(running) >= 2:
            reap()
        running[start(argv, prefix)] = name
    while running:
        reap()
    print(json.dumps(results))
else:
    while True:
        line = sys.stdin.readline()
        if not line:
            break
        cmd, arg = json.loads(line)
        if cmd == 'run':
            print(start(*arg), flush=True)
        else:
            print(os.waitstatus_to_exitcode(os.waitpid(arg, 0)[1]), flush=True)
"""


def run_forked(cases, logs):
    """{name: argv} -> {name: (exit code, stdout, stderr)}, each case in its own forked process."""
    spec = [[c, [str(a) for a in argv], os.path.join(logs, c)] for c, argv in cases.items()]
    p = subprocess.run([sys.executable, '-c', LAUNCHER, 'batch', json.dumps(spec)], cwd=HERE, env=ENV,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    codes = json.loads(p.stdout.strip().splitlines()[-1])
    return {c: (codes[c], read(prefix + '.out'), read(prefix + '.err')) for c, _, prefix in spec}


class Launcher:
    """The launcher in serve mode: start(argv, prefix) -> pid of a forked run; wait(pid) -> exit code."""

    def __init__(self):
        self.p = subprocess.Popen([sys.executable, '-c', LAUNCHER, 'serve'], cwd=HERE, env=ENV, text=True,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def _ask(self, msg):
        self.p.stdin.write(json.dumps(msg) + '\n')
        self.p.stdin.flush()
        return int(self.p.stdout.readline())

    def start(self, argv, prefix):
        return self._ask(['run', [[str(a) for a in argv], prefix]])

    def wait(self, pid):
        return self._ask(['wait', pid])

    def close(self):
        self.p.stdin.close()
        self.p.wait(30)


@pytest.fixture(scope='module')
def matrix(w):
    return run_forked({c: build(w, c) for c, (build, _) in CASES.items()}, w.logs)


def test_forked_matches_cold_start(w, matrix):
    """The forked runner gives what a cold `python script.py ...` gives (exit code and stderr line)."""
    picks = ['train-unwritable-out', 'sample-truncated-ckpt']
    with ThreadPoolExecutor(len(picks)) as ex:
        cold = dict(zip(picks, ex.map(lambda c: run_cli(CASES[c][0](w, c)), picks)))
    for c in picks:
        assert cold[c][0] == matrix[c][0], (c, cold[c], matrix[c])
        assert stderr_lines(cold[c][2]) == stderr_lines(matrix[c][2]), c


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input(case, matrix):
    rc, out, err = matrix[case]
    assert_one_error(rc, err, CASES[case][1], case)


def test_weights_only_refusal_runs_no_code(w, matrix):
    """A checkpoint that pickles Python objects is refused by train.py and sample.py, and nothing in it ran."""
    for case in ('train-object-teacher', 'train-sneaky-teacher', 'train-bomb-teacher', 'train-object-resume',
                 'sample-object-ckpt', 'sample-bomb-ckpt'):
        rc, out, err = matrix[case]
        line = assert_one_error(rc, err, ['cannot be read safely as a checkpoint'], case)
    assert not os.path.exists(w.marker), 'unpickling ran code from the checkpoint'
    for p in (w.obj, w.sneaky, w.bomb):
        with pytest.raises(ValueError, match='safely'):
            read_checkpoint(p)
    assert not os.path.exists(w.marker)


# ----------------------------------------------------------------------------- atomic checkpoints
def test_failed_save_keeps_previous_latest(tmp_path, monkeypatch):
    """In-process: a save that dies while writing the file, or before the pointer moves, leaves `latest`
    on the previous checkpoint, which still loads with weights_only=True; the next save works."""
    out = str(tmp_path)
    obj = lambda k: {'model': {'w': torch.full((3,), float(k))}, 'step': k}
    train.save_checkpoint(out, obj(1), 1, keep=2)
    real_save, real_replace = torch.save, os.replace

    def half_save(o, f, *a, **kw):                            # write some bytes, then die
        f.write(b'PK\x03\x04 partial')
        raise OSError(28, 'No space left on device')
    monkeypatch.setattr(torch, 'save', half_save)
    with pytest.raises(ValueError, match='No space left on device.*intact'):   # one line for the user
        train.save_checkpoint(out, obj(2), 2, keep=2)
    assert not any(f.endswith('.tmp') for f in os.listdir(out))
    monkeypatch.setattr(torch, 'save', real_save)
    assert latest_step(out) == 1
    assert torch.load(train.latest_checkpoint(out), weights_only=True)['step'] == 1

    def replace_dies_on_pointer(src, dst):                     # the checkpoint lands, the pointer does not
        if os.path.basename(dst) == 'latest':
            raise OSError(5, 'Input/output error')
        return real_replace(src, dst)
    monkeypatch.setattr(os, 'replace', replace_dies_on_pointer)
    with pytest.raises(OSError):
        train.save_checkpoint(out, obj(3), 3, keep=2)
    monkeypatch.setattr(os, 'replace', real_replace)
    assert latest_step(out) == 1
    assert torch.load(train.latest_checkpoint(out), weights_only=True)['step'] == 1

    train.save_checkpoint(out, obj(4), 4, keep=2)             # leftovers do not get in the way
    assert latest_step(out) == 4
    assert torch.load(train.latest_checkpoint(out), weights_only=True)['step'] == 4
    assert sorted(f for f in os.listdir(out) if f.startswith('ckpt_')) == ['ckpt_0000003.pt', 'ckpt_0000004.pt']


def _distill(w, out, steps, *extra):
    return ['train.py', '--data', w.D, '--teacher', w.T, '--out', out, '--steps', str(steps), '--batch', '16',
            *extra]


def test_sigkill_then_resume_is_bit_exact(w):
    """SIGKILL a DE-CM run (fm, cm, n2n; checkpoint every step) once it has saved step >= 2, resume with
    --resume auto: the final model, EMA and optimizer state equal an uninterrupted run's, bit for bit."""
    N = 10
    ref_dir, run_dir = os.path.join(w.root, 'ref'), os.path.join(w.root, 'killed')
    ref = popen_cli(_distill(w, ref_dir, N, '--ckpt-every', '1000'), os.path.join(w.logs, 'ref'))
    p = popen_cli(_distill(w, run_dir, N, '--ckpt-every', '1', '--keep', '100'), os.path.join(w.logs, 'killed'))
    try:
        assert wait_for(lambda: (latest_step(run_dir) or 0) >= 2, 120, p), read(os.path.join(w.logs, 'killed.err'))
        p.send_signal(signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL, 'the run ended before it could be killed'
        killed_at = latest_step(run_dir)
        assert 2 <= killed_at < N
        stamp = lambda: {f: (os.stat(os.path.join(run_dir, f)).st_ino, os.stat(os.path.join(run_dir, f)).st_mtime_ns)
                         for f in os.listdir(run_dir) if f.startswith('ckpt_')}
        before = stamp()
        rc, out, err = run_cli(_distill(w, run_dir, N, '--ckpt-every', '1', '--keep', '100', '--resume', 'auto'))
        assert rc == 0, err
        after = stamp()                                        # it went on from killed_at, it did not start over
        assert all(after[f] == before[f] for f in before), 'the resumed run rewrote earlier checkpoints'
        assert sorted(after) == [f'ckpt_{k:07d}.pt' for k in range(min(before_steps(before)), N + 1)]
        assert ref.wait(240) == 0, read(os.path.join(w.logs, 'ref.err'))
    finally:
        for proc in (p, ref):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    a = torch.load(train.latest_checkpoint(ref_dir), weights_only=True)
    b = torch.load(train.latest_checkpoint(run_dir), weights_only=True)
    assert a['step'] == b['step'] == N and a['data_pos'] == b['data_pos']
    assert_bit_equal(a['model'], b['model'], f'model (killed at step {killed_at})')
    assert_bit_equal(a['ema'], b['ema'], f'ema (killed at step {killed_at})')
    assert_bit_equal(a['opt'], b['opt'], f'optimizer state (killed at step {killed_at})')


def before_steps(names):
    return [int(re.search(r'ckpt_(\d+)\.pt$', f).group(1)) for f in names]


def alive(pid):
    """A child of the launcher that has not exited (zombies count as exited)."""
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except FileNotFoundError:
        return False


def test_sigkill_at_random_moments_keeps_latest_loadable(w):
    """SIGKILL a run that saves every step at random moments (6 times, each restart resuming with
    --resume auto); after every kill `latest` points to a checkpoint that loads with weights_only=True and
    never goes back; then a --resume auto run finishes. The runs are forked from a warm launcher."""
    out = os.path.join(w.root, 'killed_many')
    rng = random.Random()
    steps, delays = [], []
    argv = lambda n: _distill(w, out, n, '--ckpt-every', '1', '--keep', '2', '--resume', 'auto', '--losses', 'fm,cm')
    launcher = Launcher()
    try:
        for i in range(6):
            log = os.path.join(w.logs, f'many{i}')
            pid = launcher.start(argv(100000), log)
            try:
                ready = (lambda: latest_step(out) is not None) if i == 0 else (lambda: 'decm:' in read(log + '.out'))
                started = wait_for(lambda: ready() or not alive(pid), 120)   # the first run: until it has saved
                assert started and alive(pid), read(log + '.err')
                delays.append(round(rng.uniform(0.05, 0.8), 3))
                time.sleep(delays[-1])
                os.kill(pid, signal.SIGKILL)
            finally:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)
                rc = launcher.wait(pid)
            assert rc == -signal.SIGKILL, (rc, read(log + '.err'))
            s = latest_step(out)
            if s is not None:
                ckpt = torch.load(train.latest_checkpoint(out), weights_only=True)
                assert ckpt['step'] == s and {'model', 'ema', 'opt', 'rng', 'data_pos'} <= set(ckpt)
                assert not steps or s >= steps[-1], (steps, s, delays)
                steps.append(s)
        assert steps and steps[-1] > 0, f'no checkpoint after 6 kills (delays {delays})'
        final = steps[-1] + 2
        log = os.path.join(w.logs, 'many_final')
        assert launcher.wait(launcher.start(argv(final), log)) == 0, read(log + '.err')
    finally:
        launcher.close()
    assert latest_step(out) == final
    assert torch.load(train.latest_checkpoint(out), weights_only=True)['step'] == final


def test_sigterm_and_sigint_save_and_exit_0(w):
    """SIGTERM / SIGINT a few steps into a run with no checkpoint due: it saves one, says so, exits 0."""
    procs = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
        out = os.path.join(w.root, f'stop_{sig.name}')
        procs[sig] = (out, popen_cli(_distill(w, out, 100000, '--ckpt-every', '1000', '--losses', 'fm,cm'),
                                     os.path.join(w.logs, sig.name)))
    try:
        for sig, (out, p) in procs.items():
            log = os.path.join(w.logs, sig.name)
            assert wait_for(lambda: 'decm:' in read(log + '.out'), 120, p), read(log + '.err')
        time.sleep(1.5)                                        # a few steps
        for sig, (out, p) in procs.items():
            p.send_signal(sig)
        for sig, (out, p) in procs.items():
            log = os.path.join(w.logs, sig.name)
            rc = p.wait(60)
            stdout, err = read(log + '.out'), read(log + '.err')
            assert rc == 0, f'{sig.name}: exit code {rc}\n{err}'
            assert 'Traceback' not in err, err
            assert sig.name in stdout and 'stopped' in stdout, stdout
            step = latest_step(out)
            assert step is not None and step > 0, stdout
            ckpt = torch.load(train.latest_checkpoint(out), weights_only=True)
            assert ckpt['step'] == step
    finally:
        for out, p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()


# ----------------------------------------------------------------------------- fid.py
def random_inception_state(seed=0):
    """A state dict in the exact layout of the FID weights file, with random but well-scaled values."""
    g = torch.Generator().manual_seed(seed)
    model = fid.InceptionV3()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, fid.ConvBN):
                w = m.conv.weight
                w.copy_(torch.randn(w.shape, generator=g) * (2 / w[0].numel()) ** 0.5)   # He init
                m.bn.weight.uniform_(0.8, 1.2, generator=g)
                m.bn.bias.normal_(0, 0.1, generator=g)
                m.bn.running_mean.normal_(0, 0.1, generator=g)
                m.bn.running_var.uniform_(0.5, 1.5, generator=g)
    return model.state_dict()


def run_fid_cli(*args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, os.path.join(HERE, 'fid.py'), *map(str, args)],
                          capture_output=True, text=True, cwd=HERE, env=env, timeout=120)


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp('inception') / 'w.pth'
    torch.save(random_inception_state(), path)
    return str(path)


@pytest.fixture(scope='module')
def inception_model(weights):
    return fid.load_inception(weights)


def random_images(n, size=32, channels=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, channels), dtype=np.uint8)


# ---- the network and its weights file ----

def test_state_dict_layout():
    state = fid.InceptionV3().state_dict()
    # 94 conv+BN units x 6 entries (conv.weight, bn.weight/bias/running_mean/running_var/num_batches_tracked)
    # + fc.weight + fc.bias; the real file carries num_batches_tracked too.
    assert len(state) == 94 * 6 + 2 == 566
    assert sum(k.endswith('.num_batches_tracked') for k in state) == 94
    assert state['fc.weight'].shape == (1008, 2048)
    assert state['Mixed_7c.branch_pool.conv.weight'].shape == (192, 2048, 1, 1)
    assert not any(k.endswith('conv.bias') for k in state)
    assert all(m.eps == 1e-3 for m in fid.InceptionV3().modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_load_strict_shapes_and_determinism(weights, inception_model):
    model = inception_model
    shapes = {}
    names = ['Conv2d_4a_3x3', 'Mixed_5b', 'Mixed_5d', 'Mixed_6a', 'Mixed_6e', 'Mixed_7a', 'Mixed_7c']
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: shapes.__setitem__(n, tuple(o.shape[1:])))
             for n in names]
    x = fid.to_inception_input(random_images(2))        # 32x32 inputs are resized to 299x299 inside
    with torch.no_grad():
        f1 = model(x)
    for h in hooks:
        h.remove()
    assert shapes == {'Conv2d_4a_3x3': (192, 71, 71), 'Mixed_5b': (256, 35, 35), 'Mixed_5d': (288, 35, 35),
                      'Mixed_6a': (768, 17, 17), 'Mixed_6e': (768, 17, 17), 'Mixed_7a': (1280, 8, 8),
                      'Mixed_7c': (2048, 8, 8)}
    assert f1.shape == (2, 2048) and torch.isfinite(f1).all() and f1.abs().sum() > 0
    with torch.no_grad():                               # a second, independent load gives the same features
        f2 = fid.load_inception(weights)(x)
    assert torch.equal(f1, f2)


def test_load_errors(tmp_path):
    with pytest.raises(fid.FIDError, match=fid.WEIGHTS_NAME):
        fid.load_inception(str(tmp_path / 'nope.pth'))
    state = fid.InceptionV3().state_dict()
    state['fc.weight'] = torch.zeros(1000, 2048)
    del state['Mixed_5b.branch1x1.conv.weight']
    state['extra.weight'] = torch.zeros(1)
    torch.save(state, tmp_path / 'bad.pth')
    with pytest.raises(fid.FIDError) as e:
        fid.load_inception(str(tmp_path / 'bad.pth'))
    msg = str(e.value)
    assert 'Mixed_5b.branch1x1.conv.weight' in msg and 'extra.weight' in msg and 'fc.weight (1000, 2048)' in msg
    assert '\n' not in msg
    for other in (os.path.join(HERE, 'README.md'), _pickled_object_file(tmp_path)):   # not a file of tensors
        with pytest.raises(fid.FIDError, match='is not the FID Inception weights file') as e:
            fid.load_inception(other)
        assert '\n' not in str(e.value) and 'False' not in str(e.value), str(e.value)


def _pickled_object_file(tmp_path):
    torch.save({'fc.weight': argparse.Namespace(lr=1.0)}, tmp_path / 'object.pth')
    return str(tmp_path / 'object.pth')


# ---- statistics and the Frechet distance ----

def test_frechet_identical_and_closed_form():
    x = np.random.default_rng(0).normal(size=(200, 5))
    mu, sigma = fid.stats(x)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-8
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.normal(size=7), rng.normal(size=7)
    s1, s2 = rng.uniform(0.1, 2, 7), rng.uniform(0.1, 2, 7)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = fid.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(mu2, np.diag(s2), mu1, np.diag(s1)) == pytest.approx(expected, rel=1e-9)


def test_frechet_rank_deficient_and_mismatch():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(10, 50)), rng.normal(size=(10, 50)) + 1    # fewer samples than dimensions
    d = fid.frechet_distance(*fid.stats(x), *fid.stats(y))
    assert np.isfinite(d) and d > 0
    with pytest.raises(fid.FIDError):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(fid.FIDError):
        fid.stats(np.zeros((1, 3)))


def test_accumulate_matches_stats():
    f = np.random.default_rng(0).normal(size=(37, 6)) + 3
    mu, sigma = fid.accumulate((torch.from_numpy(f[i:i + 10]).float() for i in range(0, 37, 10)), total=37)
    mu_ref, sigma_ref = fid.stats(f.astype(np.float32))
    np.testing.assert_allclose(mu, mu_ref, atol=1e-12)
    np.testing.assert_allclose(sigma, sigma_ref, atol=1e-10)
    with pytest.raises(fid.FIDError):
        fid.accumulate([torch.zeros(1, 6)])


def test_pixel_fd():
    x = torch.rand(300, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    assert abs(fid.pixel_fd(x, x)) < 1e-6
    # a constant shift c of every pixel moves the mean only: distance = D c^2
    assert fid.pixel_fd(x, x + 0.1) == pytest.approx(48 * 0.01, abs=1e-6)
    assert np.isfinite(fid.pixel_fd(x[:8], x[8:16] * 2))                # rank-deficient stays finite


def test_stats_file_round_trip(tmp_path):
    mu, sigma = np.arange(3.0), np.eye(3)
    fid.save_stats(tmp_path / 's.npz', mu, sigma)
    assert fid.is_stats_file(str(tmp_path / 's.npz'))
    m, s = fid.load_stats(str(tmp_path / 's.npz'))
    assert m.dtype == np.float64 and np.array_equal(m, mu) and np.array_equal(s, sigma)


# ---- images ----

def test_load_images_npz_and_folder(tmp_path):
    imgs = random_images(3, size=8)
    np.savez(tmp_path / 'a.npz', arr_0=imgs)
    assert np.array_equal(fid.load_images(str(tmp_path / 'a.npz')), imgs)
    np.savez(tmp_path / 'gray.npz', arr_0=imgs[..., 0])               # (N, H, W) -> 1 channel
    gray = fid.load_images(str(tmp_path / 'gray.npz'))
    assert gray.shape == (3, 8, 8, 1)
    x = fid.to_inception_input(gray)
    assert x.shape == (3, 3, 8, 8) and torch.equal(x[:, 0], x[:, 2]) and 0 <= x.min() and x.max() <= 1
    np.savez(tmp_path / 'float.npz', arr_0=imgs.astype(np.float32))
    with pytest.raises(fid.FIDError, match='uint8'):
        fid.load_images(str(tmp_path / 'float.npz'))

    folder = tmp_path / 'imgs'
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(folder / f'{i}.png')
    Image.fromarray(imgs[0, ..., 0]).save(folder / '3.png')           # grayscale file -> RGB
    loaded = fid.load_images(str(folder))
    assert loaded.shape == (4, 8, 8, 3) and np.array_equal(loaded[:3], imgs)
    assert np.array_equal(loaded[3], np.repeat(imgs[0, ..., :1], 3, -1))


def test_folder_errors(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(fid.FIDError, match='no .png'):
        fid.load_images(str(tmp_path / 'empty'))
    Image.fromarray(random_images(1, size=8)[0]).save(tmp_path / 'a.png')
    Image.fromarray(random_images(1, size=9)[0]).save(tmp_path / 'b.png')
    with pytest.raises(fid.FIDError, match='differ in size') as e:
        fid.load_images(str(tmp_path))
    assert 'a.png' in str(e.value) and 'b.png' in str(e.value)
    with pytest.raises(fid.FIDError, match='at least 2'):
        fid.inception_stats(random_images(1), model=None)


def test_folder_npz_and_array_give_same_stats(tmp_path, inception_model):
    model = inception_model
    imgs = random_images(3, size=16)
    np.savez(tmp_path / 'a.npz', arr_0=imgs)
    (tmp_path / 'imgs').mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / 'imgs' / f'{i}.png')
    mu, sigma = fid.inception_stats(imgs, model, batch_size=2)                      # array, batches of 2 + 1
    for source in (str(tmp_path / 'a.npz'), str(tmp_path / 'imgs')):               # .npz; folder via DataLoader
        m, s = fid.inception_stats(source, model, batch_size=2)
        np.testing.assert_allclose(m, mu, rtol=0, atol=1e-5)
        np.testing.assert_allclose(s, sigma, rtol=0, atol=1e-5)
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048) and np.allclose(sigma, sigma.T)


# ---- command line ----

def test_cli_npz_round_trip(tmp_path, weights):
    np.savez(tmp_path / 'a.npz', arr_0=random_images(2, seed=1))
    np.savez(tmp_path / 'b.npz', arr_0=random_images(2, seed=2))
    r = run_fid_cli(tmp_path / 'a.npz', tmp_path / 'b.npz', '--inception', weights, '--device', 'cpu',
                '--save-stats', tmp_path / 'a_stats.npz')
    assert r.returncode == 0, r.stderr
    line = [l for l in r.stdout.splitlines() if l.startswith('FID: ')]
    assert len(line) == 1 and np.isfinite(float(line[0][5:]))
    mu, sigma = fid.load_stats(str(tmp_path / 'a_stats.npz'))
    assert mu.shape == (2048,) and sigma.shape == (2048, 2048)
    # two statistics files need no weights (small ones: a 2048-d sqrtm takes ~15 s on one core)
    fid.save_stats(tmp_path / 's1.npz', np.zeros(3), np.eye(3))
    fid.save_stats(tmp_path / 's2.npz', np.ones(3), np.eye(3))
    r = run_fid_cli(tmp_path / 's1.npz', tmp_path / 's2.npz')
    assert r.returncode == 0 and r.stdout.strip() == 'FID: 3.0000', r.stderr


def test_cli_errors(tmp_path, weights):
    np.savez(tmp_path / 'a.npz', arr_0=random_images(2, size=8))
    r = run_fid_cli(tmp_path / 'a.npz', tmp_path / 'a.npz')             # no --inception
    assert r.returncode == 2 and r.stdout == ''
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith('error: ')
    assert fid.WEIGHTS_NAME in r.stderr and '--inception' in r.stderr
    folder = tmp_path / 'mixed'
    folder.mkdir()
    Image.fromarray(random_images(1, size=8)[0]).save(folder / 'a.png')
    Image.fromarray(random_images(1, size=9)[0]).save(folder / 'b.png')
    r = run_fid_cli(folder, tmp_path / 'a.npz', '--inception', weights, '--num-workers', '0')
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and 'differ in size' in r.stderr
    r = run_fid_cli(tmp_path / 'a.npz', tmp_path / 'a.npz', '--inception', os.path.join(HERE, 'README.md'))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and 'not the FID Inception' in r.stderr
    import ast                                                 # fid.py stands alone: no project imports
    tree = ast.parse(open(os.path.join(HERE, 'fid.py')).read())
    imported = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names} | \
        {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    ours = {f[:-3] for f in os.listdir(HERE) if f.endswith('.py')} | {'experiments'}
    assert not imported & ours, imported & ours


def test_sample_npz_round_trips_through_fid(teacher_ckpt, weights, tmp_path):
    """An .npz written by sample.py is read by fid.py as the images it holds, and the CLI scores it."""
    sample.main(['--ckpt', teacher_ckpt, '--num-samples', '6', '--nfe', '1', '--out', str(tmp_path / 's')])
    npz = tmp_path / 's' / 'samples.npz'
    images = fid.load_images(str(npz))
    assert images.dtype == np.uint8 and images.shape == (6, 8, 8, 1)
    assert np.array_equal(images, np.load(npz)['arr_0'])
    out = run_fid_cli(str(npz), str(npz), '--inception', weights)
    assert out.returncode == 0 and re.search(r'FID: -?\d+\.\d+', out.stdout), out.stderr
    assert abs(float(out.stdout.split('FID:')[1])) < 1.0                # the same set: about 0


# ---- honest baselines and the gap study (teacher on the distilled velocity, FACM-style CM target, lr schedule)
def test_cm_target_is_sg_F_minus_w1_g():
    m = random_dit()
    x, v, y = batch()
    t, one = torch.tensor([0.0, 0.36, 0.81], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    F, dF = losses.model_jvp(m, x, t, one, y, (v, torch.ones_like(t), torch.zeros_like(t)), fused=False)
    g, target = losses.cm_residual(F.detach(), dF, v, t, w1=0.5)
    assert torch.equal(g, F - v - losses.bcast(1 - t, v) * dF) and torch.allclose(target, F - 0.5 * g, atol=1e-15)


def test_teacher_sampler_apg_follows_the_distilled_velocity():
    teacher = random_dit(s_embed=False)
    x, _, y = batch()
    z = x.clone()
    out = sample.teacher_sampler(teacher, z, y, 3, w_cfg=2.0, guidance='apg', eta=0.3)
    want = z.clone()
    ts = torch.linspace(0, 1, 4).tolist()                             # the sampler's grid
    for t0, t1 in zip(ts[:-1], ts[1:]):                               # Euler on teacher.teacher_velocity
        tt = torch.full((3,), float(t0), dtype=torch.float64)
        want = want + (t1 - t0) * teacher_velocity(teacher, want, tt, y, w_cfg=2.0, eta=0.3, vnorm=True)
    assert torch.allclose(out, want, atol=1e-12)
    cfg = sample.teacher_sampler(teacher, z, y, 3, w_cfg=2.0, guidance='cfg')
    assert (out - cfg).abs().max() > 1e-6                             # a different velocity, not plain CFG


# ---- CUDA tier and JVP dtype/speed
# The CUDA tests run where a CUDA device is present (`python -m pytest -q -rs test_all.py -k cuda`) and are
# reported as skipped elsewhere. Each compares the CUDA path of train.py / sample.py / fid.py with the CPU.
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='no CUDA device: the CUDA tier is skipped')
GPU = 'cuda'                                                           # the device under test


@pytest.fixture
def tf32(request):
    """Sets TF32 for CUDA matmuls and cuDNN to request.param (True: train.py's setting), then restores it."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = request.param
    yield request.param
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def iteration_update(teacher_ckpt, argv, dev, autocast):
    """One DE-CM iteration at freq 1 (both updates) with SGD at lr 1e-2: returns (losses, update / lr),
    so the update is the sum of the two clipped gradients (AdamW's first step would be about sign(g))."""
    args, teacher, student, ema, _ = step_setup(teacher_ckpt, ['--freq', '1'] + argv)
    teacher, student, ema = teacher.to(dev), student.to(dev), ema.to(dev)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-2)
    x, y, draws = fixed_batch()
    before = torch.cat([p.detach().flatten() for p in params]).cpu()
    log, ok = train.train_step(student, ema, teacher, opt, x.to(dev), y.to(dev), 0, args, 1, autocast,
                               {k: v.to(dev) for k, v in draws.items()})
    assert ok
    after = torch.cat([p.detach().flatten() for p in params]).cpu()
    return {k: float(v) for k, v in log.items() if k in ('cm', 'fm', 'n2n', 'fm2')}, (after - before) / 1e-2


@cuda
@pytest.mark.parametrize('tf32', [True], indirect=True)
@pytest.mark.parametrize('jvp', ['fp32', 'bf16'])
def test_cuda_bf16_iteration_matches_cpu_fp32(teacher_ckpt, tf32, jvp):
    """train.train_step on CUDA (bf16 autocast, TF32, --jvp-dtype) against the same iteration in fp32 on CPU.
    Tolerance: 2% on each loss and 3% on the update; bf16 autocast on CPU gives 0.1% and 0.5% here.
    --no-vnorm: APG's normalised direction (v_c - v_u) / |v_c - v_u| amplifies bf16 rounding when
    v_c is close to v_u, as with this barely trained teacher (50-70% error in the update, both on CPU)."""
    argv = ['--no-vnorm', '--jvp-dtype', jvp]
    ref_log, ref = iteration_update(teacher_ckpt, argv, torch.device('cpu'), torch.autocast('cpu', enabled=False))
    log, upd = iteration_update(teacher_ckpt, argv, torch.device(GPU), torch.autocast(GPU, dtype=torch.bfloat16))
    assert set(log) == {'cm', 'fm', 'n2n', 'fm2'}
    for k in log:
        assert abs(log[k] - ref_log[k]) <= 0.02 * abs(ref_log[k]), (k, log[k], ref_log[k])
    assert ref.norm() > 0.5 and rel_err(upd, ref) < 0.03


@cuda
@pytest.mark.parametrize('tf32', [True], indirect=True)
def test_cuda_jvp_under_autocast_matches_fp32(tf32):
    """losses.model_jvp called inside bf16 autocast (as train_step does) keeps fp32: it equals the JVP with
    autocast off, and a float64 CPU JVP within TF32's precision; --jvp-dtype bf16 within bf16's."""
    m64 = random_dit(dtype=torch.float64, size=16)
    m = random_dit(dtype=torch.float32, size=16).to(GPU)
    x, v, y = batch(H=16)
    t, one = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    tangents = (v, one, torch.zeros_like(t))
    _, ref = losses.model_jvp(m64, x, t, one, y, tangents)
    cu = lambda a: a.float().to(GPU)
    args = (m, cu(x), cu(t), cu(one), y.to(GPU), tuple(cu(a) for a in tangents))
    with torch.autocast(GPU, dtype=torch.bfloat16):
        out, dF = losses.model_jvp(*args)
        out16, dF16 = losses.model_jvp(*args, dtype=torch.bfloat16)
    _, dF_off = losses.model_jvp(*args)
    assert out.dtype == dF.dtype == dF16.dtype == torch.float32 and out.requires_grad
    assert rel_err(dF, dF_off) < 1e-6                                  # autocast did not reach the fp32 JVP
    assert rel_err(dF.double().cpu(), ref) < 5e-3                      # TF32: 10-bit mantissa
    assert 1e-4 < rel_err(dF16.double().cpu(), ref) < 5e-2             # bf16: 8 bits, and really in bf16


@cuda
@pytest.mark.parametrize('tf32', [False], indirect=True)
def test_cuda_samplers_match_cpu(tf32):
    """The samplers on CUDA give the CPU's samples (deterministic ones from the same noise), and
    sample.generate on CUDA makes exactly nfe calls per batch with finite output."""
    student = random_dit(dtype=torch.float32, size=16).eval()
    teacher = random_dit(s_embed=False, dtype=torch.float32, size=16).eval()
    z = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 4, 10])
    runs = [(student, lambda m, z_, y_: sample.cm_sampler(m, z_, y_, 1)),
            (student, lambda m, z_, y_: sample.euler_sampler(m, z_, y_, 4)),
            (student, lambda m, z_, y_: sample.mix_sampler(m, z_, y_, 2)),  # 1 flow-map step, 1 CM step
            (teacher, lambda m, z_, y_: sample.teacher_sampler(m, z_, y_, 4, w_cfg=2.0, cfg_interval_start=0.1))]
    for model, run in runs:
        cpu = run(model, z, y)
        gpu = run(copy.deepcopy(model).to(GPU), z.to(GPU), y.to(GPU))
        assert gpu.device.type == GPU and rel_err(gpu.cpu(), cpu) < 1e-4
    model = copy.deepcopy(student).to(GPU)
    for name, nfe in [('cm', 4), ('mix', 4), ('euler', 2)]:
        xs, _, calls = sample.generate(model, name, 20, nfe, 10, batch=10, device=GPU, progress=False)
        assert calls == 2 * nfe and all(torch.isfinite(v).all() for v in xs.values())


@cuda
@pytest.mark.parametrize('tf32', [False], indirect=True)
def test_cuda_fid_matches_cpu(weights, tf32, tmp_path):
    """Inception statistics on CUDA equal the CPU's; fid.py --device cuda gives the FID of the CUDA statistics."""
    a, b = random_images(12, size=32, seed=1), random_images(12, size=32, seed=2)
    mu_c, sig_c = fid.inception_stats(a, fid.load_inception(weights, 'cpu'), batch_size=5)
    mu_g, sig_g = fid.inception_stats(a, fid.load_inception(weights, GPU), batch_size=5)
    assert np.abs(mu_g - mu_c).max() < 1e-4 * np.abs(mu_c).max()
    assert np.abs(sig_g - sig_c).max() < 1e-4 * np.abs(sig_c).max()
    np.savez(tmp_path / 'a.npz', arr_0=a)
    np.savez(tmp_path / 'b.npz', arr_0=b)
    r = run_fid_cli(tmp_path / 'a.npz', tmp_path / 'b.npz', '--inception', weights, '--device', GPU)
    assert r.returncode == 0, r.stderr
    value = float(r.stdout.split('FID:')[1])
    expected = fid.frechet_distance(mu_g, sig_g, *fid.inception_stats(b, fid.load_inception(weights, GPU), batch_size=5))
    assert abs(value - expected) < 1e-3 * abs(expected)


@cuda
def test_cuda_torchrun_nccl_smoke_of_train_and_sample(digits, teacher_ckpt, tmp_path):
    """One-rank torchrun (NCCL) of train.py on CUDA, resumed once, then of sample.py on its checkpoint."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    run = lambda port, *argv: subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '1', '--master_port', str(port),
         *argv], cwd=HERE, env=env, capture_output=True, text=True, timeout=300)
    out = str(tmp_path / 'run')
    common = ['train.py', '--data', digits, '--teacher', teacher_ckpt, '--out', out, '--batch', '16',
              '--ckpt-every', '1', '--resume', 'auto']
    p = run(29541, *common, '--steps', '2')
    assert p.returncode == 0, p.stderr[-3000:]
    assert f'device {GPU}' in p.stdout and '1 rank(s)' in p.stdout, p.stdout
    p = run(29542, *common, '--steps', '3')                            # resumes at step 2
    assert p.returncode == 0, p.stderr[-3000:]
    ck = read_checkpoint(train.latest_checkpoint(out))
    assert ck['step'] == 3 and all(torch.isfinite(v).all() for v in ck['model'].values())
    p = run(29543, 'sample.py', '--ckpt', out, '--nfe', '2', '--num-samples', '20', '--batch', '10',
            '--out', str(tmp_path / 's'))
    assert p.returncode == 0, p.stderr[-3000:]
    assert '2 NFE: 4 network calls for 2 batch(es)' in p.stdout, p.stdout
    arr = np.load(tmp_path / 's' / 'samples.npz')['arr_0']
    assert arr.shape == (20, 8, 8, 1) and arr.dtype == np.uint8


@cuda
@pytest.mark.parametrize('tf32', [False], indirect=True)
def test_cuda_fused_adamw_and_ema_update(tf32):
    """train.optimizer_step on CUDA (fused AdamW, as train.py builds it) equals CPU AdamW on the same gradients;
    the EMA is the lerp of Alg.1 l.15; a non-finite loss leaves weights, EMA and optimizer untouched."""
    args = train.parse_args(['--lr', '1e-3', '--ema', '0.9', '--grad-clip', '1.0'])
    models = {}
    for dev in ('cpu', GPU):
        model = random_dit(dtype=torch.float32).to(dev)
        ema = copy.deepcopy(model).requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, args.beta2), fused=dev == GPU)
        models[dev] = (model, ema, opt)
    g = torch.Generator().manual_seed(0)
    coeffs = [torch.randn(p.shape, generator=g) for p in models['cpu'][0].parameters() if p.requires_grad]
    for _ in range(3):                                                 # a linear loss: the same gradient on both
        ema_before = {}
        for dev, (model, ema, opt) in models.items():
            ps = [p for p in model.parameters() if p.requires_grad]
            loss = sum((p * c.to(dev)).sum() for p, c in zip(ps, coeffs))
            ema_before[dev] = [e.detach().clone() for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
            loss.backward()
            assert train.optimizer_step(model, ema, opt, loss.detach(), args, 1, args.ema)[0]
            new = [e for e, p in zip(ema.parameters(), model.parameters()) if p.requires_grad]
            for e0, e1, p in zip(ema_before[dev], new, ps):            # EMA <- 0.9 EMA + 0.1 theta
                assert torch.allclose(e1, 0.9 * e0 + 0.1 * p.detach(), atol=1e-6)
    assert models[GPU][2].defaults['fused']
    for (k, a), b in zip(models['cpu'][0].state_dict().items(), models[GPU][0].state_dict().values()):
        assert torch.allclose(a, b.cpu(), atol=1e-6, rtol=1e-5), k
    model, ema, opt = models[GPU]
    snapshot = [t.clone() for t in list(model.state_dict().values()) + list(ema.state_dict().values())]
    loss = sum(p.sum() for p in model.parameters() if p.requires_grad) * float('nan')
    loss.backward()
    assert not train.optimizer_step(model, ema, opt, loss.detach(), args, 1, args.ema)[0]
    now = list(model.state_dict().values()) + list(ema.state_dict().values())
    assert all(torch.equal(a, b) for a, b in zip(snapshot, now))


# ---- ImageNet path (end to end, accumulation, latent stats, presets)
def test_accum_micro_batches_equal_one_batch(teacher_ckpt):
    """--accum 4 (micro-batches of 4) equals one batch of 16, for both updates (CM+FM and N2N+FM at freq 1),
    with the iteration's own random draws (z, t, r made for the whole batch): the N2N update runs on the
    student the CM+FM update left, so one iteration checks both."""
    results = {}
    for K in (1, 4):
        args, teacher, student, ema, opt = step_setup(teacher_ckpt, ['--freq', '1', '--accum', str(K)],
                                                      dtype=torch.float64)
        x, y, _ = fixed_batch(dtype=torch.float64)
        sizes = []
        hook = student.register_forward_hook(lambda m, i, o: sizes.append(i[0].shape[0]))
        torch.manual_seed(7)                                   # the same draws for both K
        logs = [train.train_step(student, ema, teacher, opt, x, y, 0, args, 1,
                                 torch.autocast('cpu', enabled=False))[0]]
        hook.remove()
        assert max(sizes) == 16 // K                           # K micro-batches, never the whole batch
        results[K] = (student.state_dict(), ema.state_dict(), logs)
    start = step_setup(teacher_ckpt, ['--freq', '1'], dtype=torch.float64)[2].state_dict()
    (s1, e1, l1), (s4, e4, l4) = results[1], results[4]
    moved = 0
    for k in s1:
        assert torch.allclose(s1[k], s4[k], rtol=1e-9, atol=1e-11), k
        assert torch.allclose(e1[k], e4[k], rtol=1e-9, atol=1e-11), k
        moved += not torch.equal(s1[k], start[k])
    assert moved > 10
    for a, b in zip(l1, l4):
        assert a.keys() == b.keys() == {'cm', 'fm', 'n2n', 'fm2', 'grad_norm', 'grad_norm2', 'skipped'}
        assert all(torch.allclose(a[n], b[n], rtol=1e-6) for n in a), (a, b)   # losses are in float32


def test_teacher_grid_is_lightningdits_250_points():
    """LightningDiT (transport/integrators.py, configs/reproductions/*800ep*.yaml): num_sampling_steps K = 250
    points u_i = i / (K - 1), shifted t_i = s u_i / (1 + (s - 1) u_i) with s = 0.3, Euler steps from t_i to
    t_{i+1} with the velocity at t_i (K - 1 steps, the last one ends at t = 1). Our --nfe 249 must be that."""
    K, s = 250, 0.3
    u = np.arange(K, dtype=np.float64) / (K - 1)
    theirs = s * u / (1 + (s - 1) * u)
    ours = sample.teacher_times(K - 1, s)
    assert len(ours) == K and ours[0] == 0 and ours[-1] == 1
    assert np.abs(ours.double().numpy() - theirs).max() < 1e-6
    # the sampler steps on that grid (shorter here: K = 26, --nfe 25): velocity at t_i, the last step ends at 1
    K = 26
    u = np.arange(K, dtype=np.float64) / (K - 1)
    theirs = s * u / (1 + (s - 1) * u)
    m = random_dit(s_embed=False, dtype=torch.float64, size=4)
    seen = []
    hook = m.register_forward_hook(lambda mod, i, o: seen.append((i[0].clone(), i[1][0].item(), o.clone())))
    z, y = torch.randn(1, 1, 4, 4, dtype=torch.float64), torch.tensor([3])
    x = sample.teacher_sampler(m, z, y, K - 1, w_cfg=1.0, shift=s)
    hook.remove()
    assert len(seen) == K - 1 and np.abs(np.array([t for _, t, _ in seen]) - theirs[:-1]).max() < 1e-6
    x_last, t_last, v_last = seen[-1]                          # the last step: from t_{K-2} to 1
    assert torch.allclose(x, x_last + (1 - theirs[-2]) * v_last, atol=1e-12)


def test_cfg_channels_guides_only_the_first_channels():
    """--cfg-channels 3 is LightningDiT's forward_with_cfg: guide channels 0-2, the rest conditional; 0 guides
    all; below the CFG interval every channel is conditional."""
    m = random_dit(s_embed=False, dtype=torch.float64, channels=5, size=4)
    x, y = torch.randn(2, 5, 4, 4, dtype=torch.float64), torch.tensor([1, 4])
    t = torch.tensor([0.5, 0.05], dtype=torch.float64)
    v_c, v_u = m(x, t, None, y), m(x, t, None, torch.full_like(y, 10))
    guided = v_u + 4.0 * (v_c - v_u)
    all_ch = teacher_velocity(m, x, t, y, w_cfg=4.0, vnorm=False)
    three = teacher_velocity(m, x, t, y, w_cfg=4.0, vnorm=False, channels=3)
    assert torch.allclose(all_ch, guided) and torch.allclose(three[:, :3], guided[:, :3])
    assert torch.allclose(three[:, 3:], v_c[:, 3:]) and not torch.allclose(three, all_ch)
    # the CFG interval: a one-step sampler at t = 0 < 0.1 takes the conditional velocity alone
    one = sample.teacher_sampler(m, x, y, 1, w_cfg=4.0, cfg_interval_start=0.1)
    assert torch.allclose(one, x + m(x, torch.zeros(2, dtype=torch.float64), None, y))


def lightningdit_file(path, preset='tiny', channels=32, size=4, classes=10, seed=0):
    """A teacher in LightningDiT's training-checkpoint format {'model', 'ema', 'opt', 'config'} with random
    weights (non-zero adaLN); 'model' differs from 'ema', as after training. Returns the EMA network."""
    ema = random_dit(s_embed=False, dtype=torch.float32, seed=seed, channels=channels, size=size, classes=classes,
                     preset=preset)
    sd = ema.state_dict()
    g = torch.Generator().manual_seed(seed + 1)
    raw = {k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in sd.items()}
    config = {'model': {'model_type': f'LightningDiT-{preset}', 'in_chans': channels, 'use_swiglu': True,
                        'use_rope': True, 'use_rmsnorm': True},
              'data': {'image_size': 16 * size, 'num_classes': classes, 'latent_norm': True,
                       'latent_multiplier': 1.0},
              'train': {'global_batch_size': 1024}, 'optimizer': {'lr': 2e-4, 'beta2': 0.95}}
    opt = torch.optim.AdamW(ema.parameters(), lr=2e-4).state_dict()
    torch.save({'model': raw, 'ema': sd, 'opt': opt, 'config': config}, path)
    return ema.eval()


def imagenet_latents(root, shards=(24, 8), C=32, H=4, classes=10):
    """LightningDiT's extract_features.py format: latents_rank00_shard00k.safetensors (latents, latents_flip,
    labels) and latents_stats.pt with per-channel mean and std far from 0 and 1. Returns the statistics."""
    from safetensors.torch import save_file
    os.makedirs(root, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    mean = 5 + torch.arange(C).float().view(1, C, 1, 1) / C
    std = 3 + torch.arange(C).float().view(1, C, 1, 1) / C
    for k, n in enumerate(shards):
        lat = torch.randn(n, C, H, H, generator=g) * std + mean
        save_file({'latents': lat, 'latents_flip': lat.flip(-1), 'labels': torch.randint(0, classes, (n,), generator=g)},
                  os.path.join(root, f'latents_rank00_shard{k:03d}.safetensors'))
    stats = {'mean': mean, 'std': std}
    torch.save(stats, os.path.join(root, 'latents_stats.pt'))
    return stats


def sampled_in_process(ckpt, sampler, nfe, n, batch, preset=None, **flags):
    """What sample.py --ckpt CKPT writes before decoding, computed here: the sampler's output (seed 0) and labels."""
    model, _, _ = sample.load_model(ckpt, preset=preset)
    xs, ys, _ = sample.generate(model, sampler, n, nfe, model.num_classes, 0, batch,
                                args=argparse.Namespace(**flags), progress=False)
    return torch.cat([xs[k] for k in sorted(xs)]), torch.cat([ys[k] for k in sorted(ys)])


def test_sample_teacher_file_denormalises_with_latent_stats(tmp_path):
    """sample.py on a LightningDiT-format file (--preset tiny): with --latent-stats the latents written are the
    sampler's output x std + mean; without, they are written as normalised; --vae without statistics and a
    wrong --preset exit 2 with one line."""
    tea, st = str(tmp_path / 'tea.pt'), str(tmp_path / 'latents' / 'latents_stats.pt')
    lightningdit_file(tea)
    stats = imagenet_latents(str(tmp_path / 'latents'), shards=(2,))
    common = ['sample.py', '--ckpt', tea, '--nfe', '2', '--num-samples', '4', '--batch', '2', '--cfg', '3']
    (tmp_path / 'vavae.pt').write_bytes(b'never read: the missing statistics are found first')
    runs = {'stats': common + ['--preset', 'tiny', '--latent-stats', st, '--out', tmp_path / 'a'],
            'none': common + ['--preset', 'tiny', '--out', tmp_path / 'b'],
            'vae': common + ['--preset', 'tiny', '--vae', tmp_path / 'vavae.pt', '--out', tmp_path / 'c'],
            'preset': common + ['--preset', 'small', '--latent-stats', st, '--out', tmp_path / 'd']}
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(runs, pool.map(run_cli, runs.values())))
    for k in ('stats', 'none'):
        assert done[k][0] == 0, done[k][2]
    x, y = sampled_in_process(tea, 'teacher', 2, 4, 2, preset='tiny', cfg=3.0)
    a, b = np.load(tmp_path / 'a' / 'samples.npz'), np.load(tmp_path / 'b' / 'samples.npz')
    assert np.allclose(a['latents'], (x * stats['std'] + stats['mean']).numpy(), atol=1e-4)
    assert np.array_equal(a['labels'], y.numpy()) and 'latents' not in b.files
    assert np.allclose(b['latents_normalised'], x.numpy(), atol=1e-5)
    assert_one_error(*done['vae'][::2], must=('--vae', '--latent-stats'), what='--vae without statistics')
    assert_one_error(*done['preset'][::2], must=('--preset small',), what='a wrong --preset')


def test_imagenet_flags_refuse_bad_input(tmp_path):
    """One `error:` line and exit 2 for: a --preset that is not the teacher file's (train.py and sample.py), an
    --accum that does not divide the batch, statistics of the wrong channel count, a negative --cfg-channels."""
    tea, data = str(tmp_path / 'tea.pt'), str(tmp_path / 'latents')
    lightningdit_file(tea)
    imagenet_latents(data, shards=(8,))
    torch.save({'mean': torch.zeros(1, 4, 1, 1), 'std': torch.ones(1, 4, 1, 1)}, tmp_path / 'stats4.pt')
    fit = ['train.py', '--data', data, '--teacher', tea, '--steps', '1', '--out', tmp_path / 'run']
    show = ['sample.py', '--ckpt', tea, '--num-samples', '2', '--out', tmp_path / 's']
    cases = {'train --preset': (fit + ['--preset', 'small', '--batch', '4'], ('--preset small',)),
             'train --preset default': (fit + ['--batch', '4'], ('--preset XL/1',)),
             'train --accum': (fit + ['--preset', 'tiny', '--batch', '8', '--accum', '3'], ('--accum 3',)),
             'sample --latent-stats': (show + ['--preset', 'tiny', '--latent-stats', tmp_path / 'stats4.pt'],
                                       ('--latent-stats', '4 channels')),
             'sample --cfg-channels': (show + ['--preset', 'tiny', '--cfg-channels', '-1'], ('--cfg-channels',))}
    with ThreadPoolExecutor(2) as pool:
        done = dict(zip(cases, pool.map(lambda c: run_cli(c[0]), cases.values())))
    for name, (rc, _, err) in done.items():
        assert_one_error(rc, err, must=cases[name][1], what=name)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def process_tree(pid):
    """pid and all its descendants (from /proc): torchrun starts each rank in a session of its own, so killing
    the launcher's process group would leave the ranks running."""
    parents = {}
    for d in os.listdir('/proc'):
        try:
            with open(f'/proc/{d}/stat') as f:
                parents[int(d)] = int(f.read().rsplit(')', 1)[1].split()[1])
        except (ValueError, OSError, IndexError):
            continue
    tree = [pid]
    for p in tree:
        tree += [c for c, pp in parents.items() if pp == p]
    return tree


def kill_tree(proc):
    """SIGKILL a still-running process and its descendants (torchrun's ranks)."""
    if proc.poll() is None:
        for pid in process_tree(proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()


def run_tree(args, timeout=240):
    """run_cli for torchrun: on a timeout the ranks are killed too."""
    p = subprocess.Popen([sys.executable] + [str(a) for a in args], cwd=HERE, env=ENV, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        out, err = p.communicate(timeout=timeout)
    finally:
        kill_tree(p)
    return p.returncode, out, err


def torchrun(*args):
    return ['-m', 'torch.distributed.run', '--nproc_per_node', '2', *args]


def adm_reference(path, n=6, size=64, seed=0):
    """A reference batch in the format of ADM's VIRTUAL_imagenet256_labeled.npz: arr_0 (uint8 NHWC images),
    mu, sigma (2048-d pool3 statistics; used as statistics, as ADM's evaluator does), mu_s, sigma_s (spatial
    features). mu and sigma here are not the statistics of arr_0, so reading the images instead would show."""
    rng = np.random.default_rng(seed)
    b = rng.standard_normal((2048, 64))
    np.savez(path, arr_0=random_images(n, size=size, seed=seed), mu=rng.uniform(0, 0.5, 2048),
             sigma=b @ b.T / 640 + 0.01 * np.eye(2048), mu_s=np.zeros(2023), sigma_s=np.eye(2023))
    with np.load(path) as f:
        return f['mu'], f['sigma']


def decoded_in_process(vae, x, stats):
    """The decoder's images of the sampler output x: de-normalised (x std + mean), and not (for contrast)."""
    with torch.no_grad():
        return (decode_to_uint8(vae, x * stats['std'] + stats['mean']).numpy(),
                decode_to_uint8(vae, x).numpy())


def test_end_to_end_imagenet_format(tmp_path, weights):
    """The ImageNet 256 chain of README.md through the CLIs, on files in the upstream formats made here (tiny
    sizes: 32x4x4 latents, the tiny preset): a latents folder (2 shards, statistics far from 0 and 1) and a
    LightningDiT-format teacher -> train.py (1 process) -> torchrun 2 ranks with --accum, SIGKILLed and resumed
    in the multi-node (rendezvous) form, bit-equal to an uninterrupted 2-rank run -> sample.py (torchrun) from
    the DE-CM run and from the teacher file with --vae (a release-format VA-VAE) -> fid.py against an ADM-format
    reference with Inception weights in pytorch-fid's layout."""
    root = str(tmp_path)
    data, tea, vae_file, ref = (os.path.join(root, f) for f in ('latents', 'tea.pt', 'vavae.pt', 'ref.npz'))
    stats_file = os.path.join(data, 'latents_stats.pt')
    stats = imagenet_latents(data)
    lightningdit_file(tea)
    torch.manual_seed(0)
    vae = VAVAEDecoder().eval()                                # the release architecture, random weights
    _release_file(vae_file, vae)
    ref_mu, ref_sigma = adm_reference(ref)
    logs = os.path.join(root, 'logs')
    os.makedirs(logs)
    N = 10
    # README's commands, up to sizes (--batch, --accum, --steps, --workers, --num-samples, --nfe) and paths
    distill = ['train.py', '--data', data, '--teacher', tea, '--preset', 'tiny', '--batch', '8', '--lr', '1e-4',
               '--freq', '3', '--p', '0.5', '--ema', '0.9999', '--w-cfg', '2', '--workers', '0', '--steps', str(N)]
    two_ranks = lambda out, *extra: torchrun('--master_port', str(free_port()), *distill, '--accum', '2',
                                             '--out', out, *extra)
    ref_dir, killed_dir, single_dir = (os.path.join(root, d) for d in ('ref', 'killed', 'single'))
    teacher_sample = ['sample.py', '--ckpt', tea, '--preset', 'tiny', '--latent-stats', stats_file, '--nfe', '3',
                      '--cfg', '6.7', '--cfg-interval-start', '0.125', '--shift', '0.3', '--cfg-channels', '3',
                      '--num-samples', '4', '--batch', '2', '--vae', vae_file, '--out', os.path.join(root, 's_tea')]
    procs = {'single': popen_cli(distill[:-1] + ['2', '--out', single_dir], os.path.join(logs, 'single')),
             'ref': popen_cli(two_ranks(ref_dir, '--ckpt-every', '1000'), os.path.join(logs, 'ref')),
             'tea': popen_cli(teacher_sample, os.path.join(logs, 'tea'))}
    killed = subprocess.Popen([sys.executable] + two_ranks(killed_dir, '--ckpt-every', '1', '--keep', '100'),
                              cwd=HERE, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: (latest_step(killed_dir) or 0) >= 2, 120, killed), 'the 2-rank run saved nothing'
        tree = process_tree(killed.pid)
        assert len(tree) >= 3, f'expected the launcher and 2 ranks, found {tree}'
        for pid in tree:                                       # launcher and both ranks, as a machine crash
            os.kill(pid, signal.SIGKILL)
        killed.wait(30)
        assert wait_for(lambda: not any(alive(p) for p in tree[1:]), 30), 'a rank survived SIGKILL'

        killed_at = latest_step(killed_dir)
        assert 2 <= killed_at < N, f'killed at step {killed_at}: the run ended before it could be killed'
        rc, _, err = run_tree(torchrun('--nnodes', '1', '--rdzv-backend', 'c10d', '--rdzv-endpoint',
                                      f'127.0.0.1:{free_port()}', '--rdzv-id', 'decm', *distill, '--accum', '2',
                                      '--out', killed_dir, '--ckpt-every', '1', '--keep', '100', '--resume', 'auto'))
        assert rc == 0, err
        for name, p in procs.items():
            assert p.wait(240) == 0, read(os.path.join(logs, name + '.err'))
    finally:
        for p in list(procs.values()) + [killed]:
            kill_tree(p)

    # train.py, 1 process: the student is the teacher file's architecture, started from its 'ema' weights
    single = torch.load(train.latest_checkpoint(single_dir), weights_only=True)
    assert single['model_config'] == dict(preset='tiny', in_channels=32, input_size=4, num_classes=10, s_embed=True)
    assert torch.equal(single['stats']['mean'], stats['mean']) and torch.equal(single['stats']['std'], stats['std'])
    file = torch.load(tea, weights_only=True)
    from_ema = max((single['model'][k] - file['ema'][k]).abs().max().item() for k in file['ema'])
    from_model = max((single['model'][k] - file['model'][k]).abs().max().item() for k in file['ema'])
    assert 0 < from_ema < 0.01 < from_model, (from_ema, from_model)   # 2 steps of lr 1e-4 from 'ema'

    # torchrun, SIGKILL, --resume auto (rendezvous form): bit for bit the uninterrupted 2-rank run
    a = torch.load(train.latest_checkpoint(ref_dir), weights_only=True)
    b = torch.load(train.latest_checkpoint(killed_dir), weights_only=True)
    assert a['step'] == b['step'] == N and a['data_pos'] == b['data_pos'] == N
    for part in ('model', 'ema', 'opt'):
        assert_bit_equal(a[part], b[part], f'{part} (killed at step {killed_at})')

    # sample.py from the DE-CM run (torchrun, 2 ranks): the latents the decoder gets are the sampler's x std + mean
    rc, out, err = run_tree(torchrun('--master_port', str(free_port()), 'sample.py', '--ckpt', killed_dir, '--nfe',
                                    '2', '--num-samples', '4', '--batch', '1', '--vae', vae_file, '--out',
                                    os.path.join(root, 's_decm')))
    assert rc == 0, err
    npz = os.path.join(root, 's_decm', 'samples.npz')
    fid_cli = subprocess.Popen([sys.executable, 'fid.py', npz, ref, '--inception', weights], cwd=HERE, env=ENV,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)                               # the subprocesses' arithmetic
        for folder, ckpt, sampler, nfe, preset, flags in [
                ('s_decm', killed_dir, 'cm', 2, None, {}),
                ('s_tea', tea, 'teacher', 3, 'tiny', dict(cfg=6.7, cfg_interval_start=0.125, shift=0.3, cfg_channels=3))]:
            with np.load(os.path.join(root, folder, 'samples.npz')) as f:
                images, labels = f['arr_0'], f['arr_1']
            x, y = sampled_in_process(ckpt, sampler, nfe, 4, 1 if folder == 's_decm' else 2, preset, **flags)
            want, normalised = decoded_in_process(vae, x, stats)
            assert images.shape == (4, 64, 64, 3) and np.array_equal(labels, y.numpy())
            diff = np.abs(images.astype(int) - want.astype(int))
            assert diff.max() <= 1 and diff.mean() < 0.01, (folder, diff.max(), diff.mean())
            assert np.abs(images.astype(int) - normalised.astype(int)).mean() > 5, folder   # it would show
        # fid.py: the FID it prints is the Frechet distance of fid.py's statistics of the .npz's images to ADM's
        # mu, sigma. Computed here in closed form, not with a second 2048-d sqrtm (15 s): sigma = A A^T with
        # A = (features - mu) / sqrt(n - 1), so tr sqrtm(sigma sigma_ref) = sum sqrt eig(A^T sigma_ref A).
        inception = fid.load_inception(weights)
        with np.load(npz) as f, torch.no_grad():
            mu, sigma = fid.inception_stats(f['arr_0'], inception, batch_size=50)
            feats = inception(fid.to_inception_input(f['arr_0'])).double().numpy()
        A = (feats - feats.mean(0)).T / np.sqrt(len(feats) - 1)
        assert np.allclose(mu, feats.mean(0), atol=1e-6) and np.allclose(sigma, A @ A.T, atol=1e-6)
        lam = np.clip(np.linalg.eigvalsh(A.T @ ref_sigma @ A), 0, None)
        want = (mu - ref_mu) @ (mu - ref_mu) + np.trace(sigma) + np.trace(ref_sigma) - 2 * np.sqrt(lam).sum()
        out, err = fid_cli.communicate(timeout=240)
    finally:
        torch.set_num_threads(threads)
        if fid_cli.poll() is None:
            fid_cli.kill()
            fid_cli.wait()
    assert fid_cli.returncode == 0, err
    printed = float(re.search(r'FID: (-?\d+\.\d+)', out).group(1))
    assert abs(printed - want) <= 5e-5 + 1e-6 * abs(want), (printed, want)


def test_ema_warmup_decay():
    a = train.parse_args(['--ema', '0.995', '--ema-warmup'])
    assert [train.ema_decay(k, a) for k in (0, 10, 90)] == pytest.approx([0.1, 11 / 20, 91 / 100])
    assert train.ema_decay(5000, a) == 0.995                           # capped at --ema
    assert train.ema_decay(0, train.parse_args(['--ema', '0.995'])) == 0.1            # on by default
    assert train.ema_decay(0, train.parse_args(['--ema', '0.995', '--no-ema-warmup'])) == 0.995   # Alg. 1's constant


# ---- run logging, evaluation, CLI checks
def _bad_npz(w, kind):
    """A truncated image .npz, or one whose arr_0 holds pickled Python objects (made once, in w.root)."""
    path = os.path.join(w.root, f'{kind}.npz')
    if not os.path.exists(path):
        if kind == 'truncated':
            with open(w.images, 'rb') as f:
                blob = f.read()
            with open(path, 'wb') as f:
                f.write(blob[:len(blob) // 2])
        else:
            np.savez(path, arr_0=np.array([{'a': 1}, None], dtype=object))
    return path


# new bad inputs; run in the same forked matrix as CASES (the `matrix` fixture reads CASES when it runs)
CLI_CASES = {
    'fid-truncated-npz': (lambda w, c: ['fid.py', _bad_npz(w, 'truncated'), w.images], ['BadZipFile', 'truncated']),
    'fid-pickled-npz': (lambda w, c: ['fid.py', _bad_npz(w, 'pickled'), w.images], ['pickled']),
    'fid-batch-size-0': (lambda w, c: ['fid.py', w.images, w.images, '--batch-size', '0'], ['--batch-size']),
    'fid-threads-negative': (lambda w, c: ['fid.py', w.images, w.images, '--threads', '-1'], ['--threads']),
    'sample-fd-ref-missing': (lambda w, c: _sample(w, c, '--fd-ref', os.path.join(w.root, 'nope')), ['--fd-ref']),
    'sample-fd-ref-other-shape': (lambda w, c: _sample(w, c, '--fd-ref', w.twoch), ['--fd-ref', 'shape']),
    'sample-mix-t-1.5': (lambda w, c: _sample(w, c, '--mix', '--mix-t', '1.5'), ['--mix-t', '(0, 1)']),
    'sample-mix-det-too-many': (lambda w, c: _sample(w, c, '--mix', '--nfe', '2', '--mix-det', '2'), ['--mix-det']),
    'sample-cfg-negative': (lambda w, c: _sample(w, c, '--cfg', '-1'), ['--cfg']),
    'sample-batch-text': (lambda w, c: _sample(w, c, '--batch', 'many'), ['--batch', 'integer']),
    'sample-device-cuda-absent': (lambda w, c: _sample(w, c, '--device', 'cuda'), ['--device', 'CUDA']),
    'train-lr-0': (lambda w, c: _train(w, c, '--lr', '0'), ['--lr']),
    'train-ema-1': (lambda w, c: _train(w, c, '--ema', '1'), ['--ema']),
    'train-r-max-2': (lambda w, c: _train(w, c, '--r-max', '2'), ['--r-max']),
    'train-lr-nan': (lambda w, c: _train(w, c, '--lr', 'nan'), ['--lr']),
    'train-threads-negative': (lambda w, c: _train(w, c, '--threads', '-2'), ['--threads']),
    'train-eval-samples-1': (lambda w, c: _train(w, c, '--eval-samples', '1'), ['--eval-samples']),
    'train-vae-missing': (lambda w, c: _train(w, c, '--vae', os.path.join(w.root, 'nope.pt')), ['--vae']),
    'train-eval-latents-without-vae': (lambda w, c: _train(w, c, '--data', w.twoch, '--losses', 'fm',
                                                           '--eval-every', '1'), ['--eval-every', '--vae']),
}
CASES.update(CLI_CASES)

# A flag that would not act is refused, naming it; every checkpoint error names the flag that gave the path
SAYS_CASES = {
    'train-missing-resume': (lambda w, c: _train(w, c, '--resume', os.path.join(w.root, 'bogus')),
                             ['--resume', 'bogus: no such checkpoint']),
    'train-teacher-folder-without-latest': (lambda w, c: _train(w, c, '--teacher', w.empty), ['--teacher', 'latest']),
    'train-preset-with-our-teacher': (lambda w, c: _train(w, c, '--teacher', w.T, '--preset', 'small'),
                                      ['--teacher', 'preset tiny', '--preset small', 'drop --preset']),
    'train-preset-other-than-resumed': (lambda w, c: _train(w, c, '--resume', w.T, '--losses', 'fm', '--preset',
                                                            'small'), ['--preset small', 'preset tiny']),
    'sample-default-ckpt-missing': (lambda w, c: ['sample.py', '--out', os.path.join(w.root, 'samples', c)],
                                    ['--ckpt runs/decm', 'no such checkpoint']),
    'sample-decm-cfg': (lambda w, c: _sample(w, c, '--ckpt', w.decm, '--cfg', '7'), ['--cfg 7', 'does not act', 'DE-CM (its guidance is distilled)']),
    'sample-decm-guidance': (lambda w, c: _sample(w, c, '--ckpt', w.decm, '--guidance', 'apg'), ['--guidance apg']),
    'sample-decm-shift': (lambda w, c: _sample(w, c, '--ckpt', w.decm, '--shift', '0.3'), ['--shift 0.3']),
    'sample-decm-cfg-its-default': (lambda w, c: _sample(w, c, '--ckpt', w.decm, '--cfg', '2'), ['--cfg 2.0 does not act']),
    'sample-decm-eta': (lambda w, c: _sample(w, c, '--ckpt', w.decm, '--eta', '0.1'), ['--eta 0.1']),
    'sample-mix-det-without-mix': (lambda w, c: _sample(w, c, '--ckpt', w.decm, '--nfe', '4', '--mix-det', '1'),
                                   ['--mix-det 1', 'does not act', 'sampled by cm']),
    'sample-mix-t-without-mix': (lambda w, c: _sample(w, c, '--ckpt', w.decm, '--mix-t', '0.3'), ['--mix-t 0.3']),
    'sample-euler-and-mix': (lambda w, c: _sample(w, c, '--ckpt', w.decm, '--sampler', 'euler', '--mix'),
                             ['--mix does not act', 'sampled by euler']),
    'sample-teacher-mix': (lambda w, c: _sample(w, c, '--mix'), ['--mix does not act', 'a teacher']),
    'sample-teacher-sampler': (lambda w, c: _sample(w, c, '--sampler', 'euler'), ['--sampler euler does not act', 'a teacher']),
    'sample-teacher-eta-without-apg': (lambda w, c: _sample(w, c, '--eta', '0.1'), ['--eta 0.1 does not act', 'cfg guidance']),
    'sample-teacher-cfg-channels-with-apg': (lambda w, c: _sample(w, c, '--guidance', 'apg', '--cfg-channels', '3'),
                                             ['--cfg-channels 3 does not act', 'apg guidance']),
    'sample-preset-with-ours': (lambda w, c: _sample(w, c, '--preset', 'small'), ['--ckpt', '--preset small']),
    'fid-png-as-samples': (lambda w, c: ['fid.py', w.png, w.images], ['one.png', 'neither a folder']),
    'fid-nan-statistics': (lambda w, c: ['fid.py', w.nanstats, w.okstats], ['nan_stats.npz', 'non-finite']),
    'fid-inception-not-weights': (lambda w, c: ['fid.py', w.images, w.images, '--inception', 'README.md'],
                                  ['README.md', 'is not the FID Inception weights file']),
    'fid-pixel-with-inception': (lambda w, c: ['fid.py', w.images, w.images, '--pixel', '--inception', 'x'],
                                 ['--pixel']),
    'fid-pixel-without-ref': (lambda w, c: ['fid.py', w.images, '--pixel'], ['--pixel']),
}
CASES.update(SAYS_CASES)


@pytest.mark.parametrize('case', list(SAYS_CASES))
def test_a_flag_that_would_not_act_is_refused_by_name(case, matrix, w):
    rc, out, err = matrix[case]
    line = assert_one_error(rc, err, SAYS_CASES[case][1], case)
    assert 'weights_only=False' not in line                    # never the advice to load unsafely
    assert not os.path.exists(os.path.join(w.root, 'samples', case, 'samples.npz')), 'sampled before the check'


def test_every_command_ends_with_a_line_naming_what_it_wrote(w, tmp_path):
    """train.py, sample.py and fid.py --pixel, run as a user would: the last line names the folder and files; a
    bare DE-CM call says it runs with no teacher; fid.py --pixel gives the very FD sample.py printed."""
    out = str(tmp_path / 'run')
    rc, so, se = run_cli(['train.py', '--data', w.D, '--out', out, '--steps', '1', '--batch', '16', '--threads', '1'])
    assert rc == 0 and so.strip().splitlines()[-1] == f'train: wrote {out}/ (checkpoint ckpt_0000001.pt, log.jsonl)', so
    assert 'with no teacher, from scratch' in so and '--teacher RUN' in so
    s = str(tmp_path / 's')
    rc, so, se = run_cli(['sample.py', '--ckpt', w.decm, '--nfe', '2', '--num-samples', '40', '--fd-ref', w.D,
                          '--out', s, '--threads', '1'])
    assert rc == 0 and so.strip().splitlines()[-1] == f'sample: wrote {s}/ (samples.npz, grid.png)', so
    fd = float(re.search(r'^FD: ([\d.]+)', so, re.M).group(1))
    rc, so, se = run_cli(['fid.py', os.path.join(s, 'samples.npz'), w.D, '--pixel', '--threads', '1'])
    pixel = float(re.search(r'^pixel FD: ([\d.]+)', so, re.M).group(1))
    assert rc == 0 and abs(pixel - fd) < 1e-3, (pixel, fd, so, se)      # the same samples, the same reference


@pytest.mark.parametrize('case', list(CLI_CASES))
def test_bad_input_cli_checks(case, matrix, w):
    """The bad inputs of the CLI checks: one `error:` line naming the flag, exit 2, no traceback; a bad
    --fd-ref is found before any sample is drawn."""
    rc, out, err = matrix[case]
    assert_one_error(rc, err, CLI_CASES[case][1], case)
    if case.startswith('sample-'):
        assert not os.path.exists(os.path.join(w.root, 'samples', case, 'samples.npz')), 'sampled before the check'


def test_log_eval_curves_and_eval_leaves_training_unchanged(w):
    """The 20-step run of the issue (--log-every 5 --eval-every 10): log.jsonl has steps 5, 10, 15, 20 with
    the losses, evaluations at 10 and 20, grids under OUT/samples/ and OUT/curves.png; the same run with
    evaluation off gives bit-identical model, EMA and optimizer state; a run SIGKILLed after its log line
    of step 10 and resumed writes every step once, with the same numbers as the uninterrupted run."""
    runs = {k: os.path.join(w.root, f'watch_{k}') for k in ('eval', 'plain', 'killed')}
    common = ['--log-every', '5', '--eval-samples', '80', '--threads', '1']
    ev = ['--eval-every', '10']
    procs = {'eval': popen_cli(_distill(w, runs['eval'], 20, *common, *ev), os.path.join(w.logs, 'watch_eval')),
             'plain': popen_cli(_distill(w, runs['plain'], 20, *common), os.path.join(w.logs, 'watch_plain'))}
    log_of = lambda k: os.path.join(runs[k], 'log.jsonl')
    killed = _distill(w, runs['killed'], 20, *common, *ev, '--ckpt-every', '3', '--keep', '100', '--resume', 'auto')
    p = popen_cli(killed, os.path.join(w.logs, 'watch_killed'))
    try:
        assert wait_for(lambda: any(r['step'] == 10 for r in train.read_log(log_of('killed'))), 180, p), \
            read(os.path.join(w.logs, 'watch_killed.err'))
        p.send_signal(signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL
        at = latest_step(runs['killed'])
        before = [r['step'] for r in train.read_log(log_of('killed'))]
        rc, out_resumed, err = run_cli(killed)
        assert rc == 0, err
        for k, proc in procs.items():
            assert proc.wait(240) == 0, read(os.path.join(w.logs, f'watch_{k}.err'))
    finally:
        for proc in [p, *procs.values()]:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    logs = {k: train.read_log(log_of(k)) for k in runs}
    assert [r['step'] for r in logs['eval']] == [5, 10, 15, 20]
    for r in logs['eval']:
        assert {'epoch', 'cm', 'fm', 'n2n', 'fm2', 'grad_norm', 'grad_norm2', 'lr', 'img_per_s', 's_per_it',
                'cuda_peak_gb', 'skipped'} <= set(r), r
        assert all(np.isfinite(r[k]) and r[k] > 0 for k in ('cm', 'fm', 'n2n', 'fm2', 'grad_norm', 'img_per_s'))
        assert r['skipped'] == 0 and r['lr'] == 1e-4 and r['cuda_peak_gb'] is None
    assert [r['step'] for r in logs['eval'] if 'fd_nfe1' in r] == [10, 20]
    assert all(r['fd_nfe1'] > 0 and r['fd_nfe2'] > 0 and r['eval_samples'] == 80 for r in logs['eval'] if 'fd_nfe1' in r)
    assert not any('fd_nfe1' in r for r in logs['plain'])
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ('img_per_s', 's_per_it', 'eval_s')} for r in rs]
    assert strip(logs['eval'])[0] == strip(logs['plain'])[0]   # the same losses before the first evaluation
    # the killed run: every step once, the same numbers (timings aside) as the uninterrupted run
    assert [r['step'] for r in logs['killed']] == [5, 10, 15, 20], (before, at)
    assert strip(logs['killed']) == strip(logs['eval']), (before, at)
    for k in ('eval', 'killed'):
        assert sorted(os.listdir(os.path.join(runs[k], 'samples'))) == ['step_0000010.png', 'step_0000020.png']
    assert not os.path.exists(os.path.join(runs['plain'], 'samples'))
    for png in ('curves.png', os.path.join('samples', 'step_0000020.png')):
        with Image.open(os.path.join(runs['eval'], png)) as im:
            assert im.format == 'PNG' and im.width > 300 and im.height > 100, png
            assert len(np.unique(np.asarray(im.convert('L')))) > 2, f'{png} is blank'
    assert not os.path.exists(os.path.join(runs['plain'], 'curves.png'))
    # weights: evaluation on = off = killed and resumed with evaluation on
    ck = {k: torch.load(train.latest_checkpoint(runs[k]), weights_only=True) for k in runs}
    for k in ('plain', 'killed'):
        assert ck[k]['step'] == 20
        for part in ('model', 'ema', 'opt'):
            assert_bit_equal(ck['eval'][part], ck[k][part], f'{part}: eval vs {k}')
    # the start-up block
    startup = read(os.path.join(w.logs, 'watch_eval.out'))
    for text in ('decm: DE-CM (Algorithm 1): losses fm,cm,n2n (N2N every 3); teacher',
                 'items of shape (1, 8, 8)', 'batch 16 = 1 rank(s) x 1 micro-batch(es)',
                 'cpu, fp32', '80 EMA samples', 'pixel FD',
                 'flags changed from the defaults: ', '--eval-every 10', '--log-every 5'):
        assert text in startup, (text, startup)
    assert 'iterations' in out_resumed and '(resumed)' in out_resumed


def test_frechet_by_eigendecomposition_equals_sqrtm_and_does_not_warn():
    """The FD via symmetric eigendecompositions equals the scipy.linalg.sqrtm formula (pytorch-fid's) within
    1e-6 on well-conditioned statistics, and gives the exact value without a warning on singular ones."""
    import warnings
    from scipy import linalg
    rng = np.random.default_rng(0)
    for d in (5, 64):
        a, b = rng.normal(size=(4 * d, d)), rng.normal(size=(4 * d, d)) * 1.5 + 0.3
        (m1, s1), (m2, s2) = fid.stats(a), fid.stats(b @ rng.normal(size=(d, d)) / np.sqrt(d))
        covmean = linalg.sqrtm(s1 @ s2).real
        old = (m1 - m2) @ (m1 - m2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
        assert abs(fid.frechet_distance(m1, s1, m2, s2) - old) < 1e-6 * max(1, abs(old))
    s1, s2 = np.diag([0.0, 0.0, 1.0, 4.0]), np.diag([0.0, 2.0, 0.0, 9.0])   # singular: pixels that never change
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        got = fid.frechet_distance(np.zeros(4), s1, np.ones(4), s2)
        fid.pixel_fd(torch.zeros(20, 1, 4, 4).index_fill_(0, torch.tensor([3]), 1.0), torch.rand(20, 1, 4, 4))
    assert got == pytest.approx(4 + (0 + 2 + 1 + 13) - 2 * (0 + 0 + 0 + 6), abs=1e-12)
    with pytest.raises(fid.FIDError, match='not a covariance'):
        fid.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_fd_reports_its_sample_count_and_warns_below_the_dimension(w, capsys):
    """sample.py --fd-ref says how many samples the FD used and warns when they are no more than the pixels
    (8x8 = 64 here): the covariance is then singular."""
    assert fid.few_samples_warning(64, 64) and fid.few_samples_warning(65, 64) is None
    out_dir = os.path.join(w.root, 'fd_count')
    sample.main(['--ckpt', w.T, '--out', out_dir, '--num-samples', '30', '--fd-ref', w.D, '--threads', '0'])
    out, err = capsys.readouterr()
    assert re.search(r'FD: \d+\.\d+ \(pixel FD of 30 samples against 30 images of .*, 64 pixels each\)', out), out
    assert 'warning: pixel FD from 30 samples of dimension 64' in err, err


def test_eval_on_latents_decodes_the_samples_into_grids(tmp_path, monkeypatch):
    """--eval-every on 32-channel latents: samples de-normalised and decoded by --vae into the grid (a small VA-VAE
    decoder); no score in the log (FID of a checkpoint: sample.py --vae, then fid.py)."""
    data = str(tmp_path / 'latents')
    imagenet_latents(data, shards=(16,))
    with open(tmp_path / 'vae.bin', 'wb') as f:
        f.write(b'stand-in')
    torch.manual_seed(0)
    decoder = VAVAEDecoder(**SMALL).eval()
    monkeypatch.setattr(train, 'load_vavae_decoder', lambda path, device='cpu', **k: decoder)
    out = str(tmp_path / 'run')
    train.main(['--data', data, '--losses', 'fm,cm', '--out', out, '--steps', '2', '--batch', '8', '--log-every', '1',
                '--eval-every', '2', '--eval-samples', '6', '--vae', str(tmp_path / 'vae.bin')])
    logs = train.read_log(os.path.join(out, 'log.jsonl'))
    assert [r['step'] for r in logs] == [1, 2] and logs[1]['eval_samples'] == 6 and 'fd_nfe1' not in logs[1]
    with Image.open(os.path.join(out, 'samples', 'step_0000002.png')) as im:
        assert im.width > 2 * 64 and im.height >= 64                 # two panels of decoded 64x64 images
    assert os.path.exists(os.path.join(out, 'curves.png'))


@pytest.mark.skipif(not any(shutil.which(c) for c in ('g++', 'c++', 'clang++')),
                    reason='torch.compile on CPU needs a C++ compiler')
def test_compiled_jvp_gives_the_eager_jvp_and_gradients():
    """--compile-jvp: the compiled fused JVP (and the compiled backward through its primal, which once
    crashed with 'ZeroTensors are immutable' while the tangent left the graph attached) gives the eager
    output, tangent, loss and parameter gradients in float64. One compile of a 2-block model: the N2N
    tangent runs the same function (experiments/gpu.py checks its gradients on XL/1 too)."""
    m = random_dit(preset=dict(depth=2, hidden=32, heads=2, patch=2))
    x, v, y = batch()
    t, one = torch.tensor([0.2, 0.5, 0.7], dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    runs = []
    for compiled in (False, True):
        m.zero_grad(set_to_none=True)
        F_, dF = losses.model_jvp(m, x, t, one, y, (v, one, torch.zeros_like(t)), fused=True, compiled=compiled)
        _, target = losses.cm_residual(F_.detach(), dF, v, t)
        loss = losses.adaptive_l2(F_, target)
        loss.backward()
        runs.append((F_.detach(), dF, loss.detach(),
                     torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])))
    (F0, d0, l0, g0), (F1, d1, l1, g1) = runs
    assert not d1.requires_grad and d0.abs().max() > 1e-3 and g0.norm() > 0
    assert rel_err(F1, F0) < 1e-12 and rel_err(d1, d0) < 1e-12 and abs(l1 - l0) < 1e-12 * abs(l0)
    assert rel_err(g1, g0) < 1e-10


def test_jvp_dtype_error_against_float64(teacher_ckpt):
    """--jvp-dtype: an iteration with the bf16 JVP logs the fp32 one's losses within bf16 rounding (the JVP's
    own error against float64 is experiments/test_experiments.py's)."""
    logs = {}
    for jvp in ('fp32', 'bf16'):
        args, teacher, student, ema, opt = step_setup(teacher_ckpt, ['--freq', '1', '--jvp-dtype', jvp])
        x, y, draws = fixed_batch()
        logs[jvp], ok = train.train_step(student, ema, teacher, opt, x, y, 0, args, 1,
                                         torch.autocast('cpu', enabled=False), draws)
        assert ok
    for k in ('cm', 'n2n'):
        assert logs['bf16'][k] != logs['fp32'][k] and abs(logs['bf16'][k] / logs['fp32'][k] - 1) < 0.02, logs
    for k in ('fm', 'fm2'):
        assert abs(logs['bf16'][k] / logs['fp32'][k] - 1) < 0.02, logs


# ----------------------------------------------------------------------------- bit-identity with the old train.py
# The model and EMA weights of three short runs of today's train.py and of train.py before the rewrite that made
# train_step flat (git f6e83d7, taken from this clone's history), on this machine (`--threads 1`; hashes of float
# kernels differ between CPUs): a teacher (fm from scratch), DE-CM with the constant EMA and r_max 0.05 (freq 2,
# vpsi pred), and DE-CM with logit-normal t, vpsi interp, the EMA warm-up.
OLD_COMMIT = 'f6e83d7'


def weights_sha256(run):
    import hashlib
    ckpt, h = torch.load(train.latest_checkpoint(run), weights_only=True), hashlib.sha256()
    for part in ('model', 'ema'):
        for k in sorted(ckpt[part]):
            h.update(k.encode())
            h.update(ckpt[part][k].float().numpy().tobytes())
    return h.hexdigest()


def test_short_runs_give_the_old_train_py_weights_bit_for_bit(tmp_path):
    import io
    import tarfile
    from safetensors.torch import save_file
    archive = subprocess.run(['git', '-C', HERE, 'archive', OLD_COMMIT], capture_output=True)
    if archive.returncode != 0:
        pytest.skip(f'no git history with commit {OLD_COMMIT} here: {archive.stderr.decode()[:80]}')
    tarfile.open(fileobj=io.BytesIO(archive.stdout)).extractall(tmp_path / 'old')
    lat = tmp_path / 'lat'
    lat.mkdir()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 1, 8, 8, generator=g)
    save_file({'latents': x, 'latents_flip': x.flip(-1).contiguous(), 'labels': torch.randint(0, 4, (64,), generator=g)},
              str(lat / 'latents_rank00_shard000.safetensors'))
    torch.save({'mean': x.mean((0, 2, 3), keepdim=True), 'std': x.std((0, 2, 3), keepdim=True)}, lat / 'latents_stats.pt')
    runs = {'tea': ['--losses', 'fm', '--no-ema-warmup', '--steps', '3'],
            'stu': ['--teacher', 'TEA', '--steps', '4', '--no-ema-warmup', '--freq', '2', '--r-max', '0.05'],
            'stu2': ['--teacher', 'TEA', '--steps', '3', '--freq', '1', '--r-max', '0.2', '--schedule',
                     'logit-normal', '--vpsi', 'interp', '--ema-warmup']}
    for code, script in (('new', os.path.join(HERE, 'train.py')), ('old', tmp_path / 'old' / 'train.py')):
        for name, flags in runs.items():                       # the old train.py: no --no-ema-warmup (its default)
            flags = [str(tmp_path / code / 'tea') if f == 'TEA' else f for f in flags
                     if not (code == 'old' and f == '--no-ema-warmup')]
            subprocess.run([sys.executable, script, '--data', lat, '--batch', '16', '--threads', '1', '--lr', '1e-3',
                            '--out', tmp_path / code / name, *map(str, flags)], check=True, capture_output=True)
    for name in runs:
        assert weights_sha256(tmp_path / 'new' / name) == weights_sha256(tmp_path / 'old' / name), name


def test_core_imports_form_no_cycle_and_never_reach_experiments():
    """The import graph of the six core files (every import, lazy ones included) is acyclic and never names
    experiments/."""
    import ast
    core = ['model', 'losses', 'teacher', 'sample', 'fid', 'train']
    graph = {}
    for name in core:
        tree = ast.parse(open(os.path.join(HERE, name + '.py')).read())
        mods = {a.name.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        mods |= {n.module.split('.')[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert 'experiments' not in mods and 'bench' not in mods, name
        graph[name] = mods & set(core)
    done = set()
    while len(done) < len(core):                             # peel off files whose imports are all done
        ready = [n for n in core if n not in done and graph[n] <= done]
        assert ready, f'import cycle among {sorted(set(core) - done)}'
        done |= set(ready)
    assert graph['fid'] == set() and graph['model'] == set() and graph['losses'] == set()
