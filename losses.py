"""The three DE-CM losses: consistency distillation (Eq. 10), flow matching at s = t (Eq. 17) and the
noise-to-noisy map (Eq. 15), with torch.func.jvp for the time derivatives.

Flow map (Eq. 9): f(x, t, s) = x + (s - t) F(x, t, s).

CM (Alg. 1 l.8-11). Along the teacher ODE dx/dt = v the consistency function f(x_t, t, 1) must not move:
    d/dt f(x_t, t, 1) = v - F + (1 - t) dF/dt,   dF/dt = JVP of F at (x_t, t, 1) along (v, 1, 0)  (Eq. 11)
    g_cm = F - v - (1 - t) dF/dt = -d/dt f                                     (l.9)
    target = sg(F) - w1(t) g_cm                                                (l.10; w1 = 1: MeanFlow's)
  The paper leaves w1(t) open; we take a constant (FACM's relaxation lost in our study: experiments/).

N2N (Alg. 1 l.17-25). f(x_r, r, t) maps a point near noise (r -> 0) to time t, two residuals vanish:
    left end, r moves along the teacher trajectory (dx_r/dr = v_r):
        R_left  = d/dr f(x_r, r, t) = v_r - F + (t - r) (grad_x F . v_r + dF/dr)
    right end, the end point must move with the teacher velocity v_psi at time t:
        R_right = d/dt f(x_r, r, t) - v_psi = F + (t - r) dF/dt - v_psi
    g = gamma R_right - lambda R_left
      = (lambda + gamma) F - lambda v_r - gamma v_psi - (t - r) JVP(F; (lambda v_r, lambda, -gamma))
    target = sg(F) - w2 g
  This is the reading whose velocity weights agree with the JVP tangent of Alg. 1 l.22 and Eq. 15's own
  tangent [lambda v_phi, lambda, -gamma]: a consistency target must be a descent direction of the two
  residuals above, which fixes lambda on v_r and gamma on v_psi. Eq. 15's text swaps the two weights,
  and Alg. 1 l.23 applies lambda twice (once in the tangent, once outside); both agree with ours only
  when lambda = gamma = 1. l.23's `F_cm` is the N2N output F_n2n (Eq. 15). test_all.py checks g, R_left
  and R_right against finite differences of f in float64.
  v_psi: Eq. 13 takes the teacher at the predicted point f(x_r, r, t) (our default, 'pred': it is the
  velocity of the teacher trajectory through x_r, which is what the right-end residual is about);
  Alg. 1 l.23 uses v_t at the interpolated x_t of l.4 ('interp': no extra teacher call, exact only
  when teacher trajectories are straight lines, as in from-scratch training).

FM (Eq. 17): ||F(x_t, t, t) - v||^2 + (1 - cos(F, v)), the boundary s = t.

Adaptive weighting (Sec. 4.4, as MeanFlow): a per-sample squared error l becomes l / sg(l + c)^p
(p = 0.5: a pseudo-Huber loss). Tangents are detached: the targets are constants (sg).
Fused JVP: the loss is taken on the JVP's primal output, saving one forward pass; it keeps the
tangent graph alive until backward (about 2.5x the activation memory). `fused=False` runs the JVP
under no_grad and a separate forward for the loss.
JVP precision (`jvp_dtype`): float32 by default (autocast off, TF32 matmuls on CUDA); bfloat16 runs
the JVP under bf16 autocast like the other passes (experiments/: its error against a float64 JVP).
Compiled JVP (`compiled=True`, train.py --compile-jvp): the same function under torch.compile, so that
the JVP and the backward through its primal run as generated kernels (experiments/: the speed-up).
"""
import functools

import torch
import torch.nn.functional as F
from torch.func import jvp

JVP_DTYPES = {'fp32': torch.float32, 'bf16': torch.bfloat16}   # train.py --jvp-dtype

def adaptive_l2(pred, target, p=0.5, c=1e-3):
    """Per-sample mean squared error, divided by sg(error + c)^p, averaged over the batch."""
    err = (pred - target).float().pow(2).flatten(1).mean(1)
    return (err / (err.detach() + c).pow(p)).mean()

def bcast(t, x):
    return t.view(-1, *[1] * (x.dim() - 1))

def jvp_of_model(model, x, t, s, y, tangents):
    """torch.func.jvp of F at (x, t, s) along tangents, with explicit softmax attention. The tangent is
    detached here, inside the compiled graph: returned attached, its (unused) gradient reaches the
    compiled backward as an immutable zero tensor that inductor may write into ('ZeroTensors are
    immutable')."""
    out, dout = jvp(lambda x_, t_, s_: model(x_, t_, s_, y, explicit_attention=True), (x, t, s), tangents)
    return out, dout.detach()

@functools.cache
def compiled_jvp_of_model():
    """torch.compile(jvp_of_model), made on first use (importing torch._dynamo takes seconds)."""
    return torch.compile(jvp_of_model)

def model_jvp(model, x, t, s, y, tangents, fused=True, dtype=torch.float32, compiled=False):
    """(F(x, t, s, y), dF along tangents=(dx, dt, ds)), with explicit softmax attention (forward-mode
    AD has no rule for the fused SDPA kernels), in float32 (or the model's float64) or under bfloat16
    autocast (dtype=torch.bfloat16). fused=True keeps the primal differentiable. compiled=True runs
    the JVP (and, when fused, the backward through its primal) as torch.compile'd graphs."""
    fn = compiled_jvp_of_model() if compiled else jvp_of_model
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        if fused:
            out, dout = fn(model, x, t, s, y, tangents)
            return out.to(x.dtype), dout.to(x.dtype)          # the tangent is a constant of the loss
        with torch.no_grad():
            out, dout = fn(model, x, t, s, y, tangents)
    return model(x, t, s, y), dout.to(x.dtype)

def cm_residual(F_cm, dF, v, t, w1=1.0):
    """Alg.1 l.9-10: g_cm and the CM target (all inputs detached)."""
    g = F_cm - v - bcast(1 - t, v) * dF                        # l.9: g_cm = sg(F) - v - (1 - t) dF/dt
    return g, F_cm - w1 * g                                    # l.10: v_tar = sg(F) - w1(t) g_cm

def cm_loss(model, x_t, t, y, v, w1=1.0, p=0.5, c=1e-3, fused=True, jvp_dtype=torch.float32, compiled=False):
    """L_cm of Eq. 10 at s = 1."""
    one = torch.ones_like(t)
    # l.8: F_cm, dF/dt <- JVP(F, (x_t, t, 1), (v, 1, 0))
    F_cm, dF = model_jvp(model, x_t, t, one, y, (v, one, torch.zeros_like(t)), fused, jvp_dtype, compiled)
    _, target = cm_residual(F_cm.detach(), dF, v, t, w1)
    return adaptive_l2(F_cm, target, p, c)                     # l.11: d1(F_cm, v_tar)

def n2n_residual(F_n2n, dF, v_r, v_psi, r, t, lam=1.0, gam=1.0, w2=1.0):
    """Alg.1 l.23-24 (the self-consistent reading of the module docstring): g_n2n and the N2N target."""
    g = (lam + gam) * F_n2n - lam * v_r - gam * v_psi - bcast(t - r, v_r) * dF
    return g, F_n2n - w2 * g

def n2n_loss(model, x_r, r, t, y, v_r, v_psi, lam=1.0, gam=1.0, w2=1.0, p=0.5, c=1e-3, fused=True,
             jvp_dtype=torch.float32, compiled=False):
    """L_n2n of Eq. 15. v_psi, the teacher velocity at time t (see the docstring), is a tensor or a
    function of the predicted point f(x_r, r, t) (Eq. 13)."""
    # l.22: F_n2n, dF <- JVP(F, (x_r, r, t), (lambda v_r, lambda, -gamma))
    tangents = (lam * v_r, torch.full_like(r, lam), torch.full_like(t, -gam))
    F_n2n, dF = model_jvp(model, x_r, r, t, y, tangents, fused, jvp_dtype, compiled)
    if callable(v_psi):                                        # Eq. 13: the teacher at f(x_r, r, t)
        v_psi = v_psi(x_r + bcast(t - r, x_r) * F_n2n.detach())
    _, target = n2n_residual(F_n2n.detach(), dF, v_r, v_psi, r, t, lam, gam, w2)
    return adaptive_l2(F_n2n, target, p, c)                    # l.25

def fm_loss(model, x_t, t, y, v, p=0.5, c=1e-3):
    """L_fm of Eq. 17 at s = t: adaptive L2 plus the cosine loss (1 - cos) per sample."""
    F_fm = model(x_t, t, t, y)                                 # l.13 / l.26
    cos = F.cosine_similarity(F_fm.float().flatten(1), v.float().flatten(1), dim=1)
    return adaptive_l2(F_fm, v, p, c) + (1 - cos).mean()      # l.14 / l.27
