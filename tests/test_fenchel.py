"""Fenchel back-propagation (002 Sec. 4.2.2): limits, kinks, the contrastive surrogate, adaptive spacing.

Float64 wherever numbers are compared; the all-negative digits run is float32 (a training run).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moreaugrad as mg
from helpers import CHAIN_NAMES, DTYPE, as_chain, make, params, plain_states, rel_err, twin
from moreaugrad.rules import (
    AdaptiveSpacing,
    ConstantSpacing,
    FiniteDifference,
    Monotone,
    StageSpacing,
    contrastive_backprop,
    contrastive_surrogate,
    fenchel,
)
from moreaugrad.rules.fenchel import profile
from moreaugrad.sweep import record
from moreaugrad.types import Dual


def hard_sigmoid() -> nn.Module:
    """002 Fig. 1's hard sigmoid ``clip(u, 0, 1)`` (torch's ``nn.Hardsigmoid`` is ``clip(u/6 + 1/2, 0, 1)``).
    """
    return nn.Hardtanh(0.0, 1.0)


PIECEWISE = {"relu": nn.ReLU, "hard_sigmoid": hard_sigmoid, "torch_hardsigmoid": nn.Hardsigmoid}
SMOOTH = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "monotone_softplus": lambda: Monotone(F.softplus)}


def mlp(act, batch, seed=0, width=16, classes=4):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, width), act(), nn.Linear(width, width), act(),
                          nn.Linear(width, classes)).double()
    x = torch.randn(batch, 6, dtype=DTYPE)
    y = torch.arange(batch) % classes
    return model, x, y


def run(model, x, y, rule, objective=None):
    return mg.Oracle(model, objective or mg.losses.CrossEntropy(), rule)(x, y)


def flat(result):
    return torch.cat([d.flatten() for ds in result.directions if ds for d in ds.values()])


def pre_activations(model, x):
    """The inputs ``u`` of every activation stage of a plain forward pass."""
    us = []
    for child in model:
        if not isinstance(child, nn.Linear):
            us.append(x)
        x = child(x)
    return us


# --- tau -> 0: backprop ------------------------------------------------------------------------


@pytest.mark.parametrize("name", PIECEWISE)
def test_fenbp_is_backprop_on_the_linear_pieces(name):
    """Once ``|tau g|`` is below every pre-activation's distance to a kink, the finite difference of
    a piecewise-linear ``sigma`` is its derivative exactly: FenBP's directions are backprop's (up to
    the rounding of ``(sigma(u) - sigma(u - tau g)) / tau``, about ``eps |u| / (tau |g|)``)."""
    model, x, y = mlp(PIECEWISE[name], batch=8)
    kinks = {"relu": [0.0], "hard_sigmoid": [0.0, 1.0], "torch_hardsigmoid": [-3.0, 3.0]}[name]
    us = pre_activations(model, x)
    margin = min((u - k).abs().min().item() for u in us for k in kinks)
    assert margin > 1e-3
    # The largest per-sample signal at an activation's output, from backprop.
    xs = plain_states("mlp", model, x)
    lams = torch.autograd.grad(F.cross_entropy(xs[-1], y), [xs[t] for t in (2, 4)])
    g_max = max(lam.abs().max().item() for lam in lams) * len(y)
    bp = flat(run(model, x, y, mg.rules.backprop()))
    for tau in (0.9 * margin / g_max, 0.3 * margin / g_max):
        # torch's hardsigmoid backward uses a float32 1/6 (relative error 3e-8); ours is exact.
        tol = 1e-7 if name == "torch_hardsigmoid" else 1e-12
        assert rel_err(flat(run(model, x, y, fenchel(tau))), bp) < tol
    # and a spacing that carries some target across a kink is not
    assert rel_err(flat(run(model, x, y, fenchel(100 * margin / g_max))), bp) > 1e-6


def _rates(model, x, y, taus):
    bp = flat(run(model, x, y, mg.rules.backprop()))
    errs = [rel_err(flat(run(model, x, y, fenchel(tau))), bp) for tau in taus]
    return errs, [a / b for a, b in zip(errs, errs[1:])]


@pytest.mark.parametrize("name", SMOOTH)
def test_fenbp_tends_to_backprop_at_rate_tau_smooth(name):
    """``sigma(u) - sigma(u - tau g) = tau sigma'(u) g - tau^2 sigma''(u) g^2 / 2 + ...``: the error is
    ``O(tau)`` and halves with ``tau``."""
    model, x, y = mlp(SMOOTH[name], batch=8)
    errs, ratios = _rates(model, x, y, [0.1 * 2.0 ** -k for k in range(4)])
    assert errs[0] < 0.05
    assert all(1.95 < r < 2.05 for r in ratios), ratios


@pytest.mark.parametrize("name", ["relu", "hard_sigmoid"])
def test_fenbp_tends_to_backprop_at_rate_tau_piecewise(name):
    """In generic position the error comes from the units within ``tau |g|`` of a kink, whose number is
    proportional to ``tau``: over a large batch the error is ``O(tau)`` and roughly halves with ``tau``."""
    model, x, y = mlp(PIECEWISE[name], batch=512)
    errs, ratios = _rates(model, x, y, [0.4 * 2.0 ** -k for k in range(5)])
    assert errs[0] < 0.4 and errs[-1] < 0.04
    assert all(e < 2 * tau for e, tau in zip(errs, [0.4 * 2.0 ** -k for k in range(5)]))
    mean_ratio = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    assert 1.7 < mean_ratio < 2.3, ratios


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_fenchel_runs_on_every_chain_and_tends_to_backprop(name):
    case = make(name)
    chain = as_chain(case.model)
    bp = flat(mg.Oracle(chain, case.objective, mg.rules.backprop())(case.x, case.y))
    errs = []
    for tau in (1e-3, 1e-4):
        result = mg.Oracle(chain, case.objective, fenchel(tau))(case.x, case.y)
        d = flat(result)
        assert torch.isfinite(d).all() and d.dtype == DTYPE
        errs.append(rel_err(d, bp))
    assert errs[1] <= 1e-3, errs
    assert errs[1] <= errs[0] / 5 + 1e-10  # O(tau), or rounding on piecewise-linear chains


# --- kinks: 002 Example 1 ------------------------------------------------------------------------


def _input_signal(act, u, lam, tau):
    """``lambda_0`` of the one-stage chain ``sigma`` at ``u`` for the signal ``lam`` at its output."""
    chain = mg.Chain(nn.Sequential(act))
    x = u.clone().requires_grad_(True)
    target = (act(u) - lam * u.shape[0]).detach()  # SquaredLoss: lambda = (z - target) / B = lam
    result = mg.Oracle(chain, mg.losses.SquaredLoss(), fenchel(tau))(x, target)
    return result.input_signal.value


def test_one_sided_limit_at_the_relu_kink():
    """002 eq. 17: ``lim (sigma(u) - sigma(u - tau g)) / tau = D g`` with ``D = 1`` on the live piece and,
    at the kink ``u = 0``, exactly when the descent direction ``-g`` moves the unit into it (``g < 0``);
    eq. 18 prints that condition with the opposite sign. Backprop's ReLU has ``D = 0`` at the kink."""
    u = torch.tensor([[0.0, 0.0, 0.0, 0.7, 0.7, -0.7, -0.7]], dtype=DTYPE).repeat(3, 1)
    lam = torch.tensor([[-0.3, 0.4, 0.0, -0.2, 0.5, -0.1, 0.6]], dtype=DTYPE) * torch.tensor(
        [[1.0], [2.0], [0.5]], dtype=DTYPE)
    D = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0], dtype=DTYPE)
    for tau in (1e-2, 1e-4):
        got = _input_signal(nn.ReLU(), u, lam, tau)
        torch.testing.assert_close(got, D * lam, rtol=1e-10, atol=1e-15)
    x = u.clone().requires_grad_(True)
    (bp,) = torch.autograd.grad(torch.relu(x), x, lam)
    assert (bp[:, 0] == 0).all()  # backprop sends nothing through the kink, whatever the sign


@pytest.mark.parametrize("act,kinks", [(hard_sigmoid, (0.0, 1.0)), (nn.Hardsigmoid, (-3.0, 3.0)),
                                       (nn.ReLU6, (0.0, 6.0))])
def test_one_sided_limit_at_the_hard_sigmoid_kinks(act, kinks):
    """At the lower kink ``D = 1`` iff ``g < 0``; at the upper kink iff ``g > 0`` (the unit moves back
    into its live piece); ``D = slope`` inside and ``0`` on the flat pieces."""
    lo, hi = kinks
    mid = 0.5 * (lo + hi)
    u = torch.tensor([[lo, lo, hi, hi, mid, mid, lo - 1, hi + 1]], dtype=DTYPE).repeat(2, 1)
    lam = torch.tensor([[-0.3, 0.3, -0.3, 0.3, -0.2, 0.2, -0.4, 0.4]], dtype=DTYPE).repeat(2, 1)
    slope = 1.0 / (hi - lo) if isinstance(act(), nn.Hardsigmoid) else 1.0
    D = slope * torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0], dtype=DTYPE)
    for tau in (1e-3, 1e-5):
        torch.testing.assert_close(_input_signal(act(), u, lam, tau), D * lam, rtol=1e-9, atol=1e-12)


def test_finite_spacing_revives_what_reaches_the_kink():
    """``u = -1``, ``g = -1`` (one sample): nothing passes while ``tau < 1``; then ``(tau - 1) / tau``."""
    u = torch.full((1, 1), -1.0, dtype=DTYPE)
    lam = torch.full((1, 1), -1.0, dtype=DTYPE)
    for tau, expected in ((0.5, 0.0), (1.0, 0.0), (2.0, -0.5), (4.0, -0.75)):
        assert _input_signal(nn.ReLU(), u, lam, tau).item() == pytest.approx(expected, abs=1e-15)


# --- affine stages and purity ---------------------------------------------------------------------


def test_affine_stages_keep_the_vjp_and_pass_the_adjoint_test():
    """Non-activation stages give ``A^T lambda`` exactly (002 eq. 56), and ``<A^T lam, dx> = <lam, A dx>``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(48, 5), nn.Hardtanh(0, 1), nn.Linear(5, 3)).double()
    x = torch.randn(2, 1, 8, 8, dtype=DTYPE)
    tape = record(mg.Chain(model), x)
    rule = FiniteDifference(0.3)
    for site in tape.sites[1:]:
        if isinstance(site.stage.module, nn.ReLU | nn.Hardtanh):
            continue
        lam = torch.randn_like(site.x)
        x_prev, out = site.x_prev.detach().clone(), site.x.detach().clone()
        got = rule.state(site, Dual(lam)).signal.value
        assert torch.equal(got, site.vjp(lam)[0])
        assert torch.equal(site.x_prev, x_prev) and torch.equal(site.x, out)  # inputs untouched
        dx = torch.randn_like(site.x_prev)
        image = site.phi(x=site.x_prev.detach() + dx) - site.phi()
        lhs, rhs = (got * dx).sum(), (lam * image).sum()
        assert abs(lhs - rhs) <= 1e-12 * (abs(lhs) + 1)


def test_grouped_stages_get_the_vjp():
    """``Sequential(Linear, ReLU)`` as one stage is not an activation: FenBP on it is backprop."""
    case = make("mlp_layers")
    bp = flat(run(case.model, case.x, case.y, mg.rules.backprop()))
    assert rel_err(flat(run(case.model, case.x, case.y, fenchel(5.0))), bp) < 1e-14


def test_batch_mean_reads_spacing_per_sample():
    """With a batch-mean objective, ``tau`` per sample is ``B tau`` on the batch signal."""
    model, x, y = mlp(nn.ReLU, batch=8)
    a = flat(run(model, x, y, fenchel(0.5)))
    b = flat(run(model, x, y, fenchel(0.5 * 8, batch_mean=False)))
    assert rel_err(a, b) < 1e-14
    assert rel_err(a, flat(run(model, x, y, fenchel(0.5, batch_mean=False)))) > 1e-3


def test_monotone_callables_match_the_builtin_activations():
    model, x, y = mlp(hard_sigmoid, batch=16)
    clip = nn.Sequential(*[Monotone(lambda u: u.clamp(0, 1), lower=0.0, upper=1.0)
                           if isinstance(m, nn.Hardtanh) else m for m in model])
    for tau in (0.7, AdaptiveSpacing(0.1, 50.0)):
        assert rel_err(flat(run(clip, x, y, fenchel(tau))), flat(run(model, x, y, fenchel(tau)))) < 1e-14
    model, x, y = mlp(nn.Sigmoid, batch=16)
    sig = nn.Sequential(*[Monotone(torch.sigmoid) if isinstance(m, nn.Sigmoid) else m for m in model])
    assert rel_err(flat(run(sig, x, y, fenchel(0.7))), flat(run(model, x, y, fenchel(0.7)))) < 1e-14


@pytest.mark.parametrize("act", [nn.ReLU, nn.LeakyReLU, hard_sigmoid, nn.Hardsigmoid, nn.ReLU6, nn.Sigmoid,
                                 nn.Tanh])
def test_fenchel_young_gaps_are_bregman_divergences(act):
    """``D(u, v) = int_v^u (sigma - sigma(v)) = F(u) - F(v) - sigma(v)(u - v)`` with ``F' = sigma``
    (002 eq. 55)."""
    module = act()
    prof = profile(module)
    torch.manual_seed(0)
    u, v = 4 * torch.randn(200, dtype=DTYPE), 4 * torch.randn(200, dtype=DTYPE)
    # F by a fine trapezoid rule from 0: independent of the closed forms and of the quadrature.
    s = torch.linspace(-30, 30, 600001, dtype=DTYPE)  # covers every u, v drawn
    cum = torch.cat([torch.zeros(1, dtype=DTYPE), torch.cumsum(0.5 * (module(s[1:]) + module(s[:-1])), 0)
                     * (s[1] - s[0])])

    def antiderivative(t):
        return torch.from_numpy(np.interp(t.numpy(), s.numpy(), cum.numpy()))

    expected = antiderivative(u) - antiderivative(v) - module(v) * (u - v)
    got = prof.gap(u, v)
    assert (got >= 0).all()
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    # The same sigma as a callable gets composite Gauss-Legendre quadrature: exact to rounding when
    # smooth, approximate across a kink.
    smooth = isinstance(module, nn.Sigmoid | nn.Tanh)
    torch.testing.assert_close(profile(Monotone(prof.fn)).gap(u, v), expected,
                               rtol=1e-6 if smooth else 2e-2, atol=1e-7 if smooth else 2e-2)


def test_quadrature_gap_has_no_cancellation_for_small_steps():
    u = torch.linspace(-3, 3, 101, dtype=DTYPE)
    h = 1e-6
    expected = 0.5 * torch.sigmoid(u) * (1 - torch.sigmoid(u)) * h * h  # sigma'(u) h^2 / 2 + O(h^3)
    got = profile(nn.Sigmoid()).gap(u, u - h)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)


# --- adaptive spacing -----------------------------------------------------------------------------


def test_adaptive_spacing_revives_dead_units_with_the_asked_slope():
    """Dead and pushed up within reach: ``lambda_{t-1} = slope lambda_t``; live units: backprop;
    dead and pushed down: 0; beyond reach ``d > (1 - slope) tau_max |g|``: the capped finite difference."""
    spacing = AdaptiveSpacing(tau=1e-3, tau_max=10.0, slope=0.25, max_live=1.0)
    u = torch.tensor([[-0.5, -0.5, 0.8, 0.8, -2.0, -20.0, 0.0]], dtype=DTYPE)
    lam = torch.tensor([[-1.0, 1.0, -1.0, 1.0, -0.3, -1.0, -1.0]], dtype=DTYPE)
    got = _input_signal(nn.ReLU(), u, lam, spacing)
    # u = -20 is out of reach: the capped target u - tau_max g = -10 is still dead.
    expected = torch.tensor([[-0.25, 0.0, -1.0, 1.0, -0.075, 0.0, -1.0]], dtype=DTYPE)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


def test_adaptive_spacing_revives_only_on_samples_whose_layer_is_starved():
    """Sample 0 has 1 live unit of 4, sample 1 has 3: with ``max_live = 1/4`` only sample 0's dead unit
    asked to grow is revived; a healthy layer keeps backprop's zero."""
    spacing = AdaptiveSpacing(tau=1e-3, tau_max=10.0, slope=0.5, max_live=0.25)
    u = torch.tensor([[-0.5, -0.5, -0.5, 0.8], [-0.5, 0.8, 0.8, 0.8]], dtype=DTYPE)
    lam = torch.tensor([[-1.0, 1.0, -1.0, -1.0], [-1.0, -1.0, 1.0, -1.0]], dtype=DTYPE) / 2
    got = _input_signal(nn.ReLU(), u, lam, spacing)
    expected = torch.tensor([[-0.5, 0.0, -0.5, -1.0], [0.0, -1.0, 1.0, -1.0]], dtype=DTYPE) / 2
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_adaptive_spacing_leaves_a_healthy_network_alone():
    """With Glorot-like weights every sample has about half its units live: no revival, so adaptive
    FenBP is FenBP with the base spacing."""
    model, x, y = mlp(nn.ReLU, batch=32, width=32)
    assert min(((u > 0).double().mean(1)).min().item() for u in pre_activations(model, x)) > 0.25
    a = flat(run(model, x, y, fenchel(AdaptiveSpacing(tau=0.3))))
    assert torch.equal(a, flat(run(model, x, y, fenchel(0.3))))
    assert not torch.equal(a, flat(run(model, x, y, fenchel(AdaptiveSpacing(tau=0.3, max_live=1.0)))))


def test_adaptive_spacing_on_a_hard_sigmoid_stays_inside_the_live_piece():
    """Below ``clip(., 0, 1)`` at depth ``d``: the target goes ``min(d / (1 - slope), d + 1)`` up, so a deep
    unit lands on the upper kink (secant slope ``1 / (d + 1)``); above it, symmetric."""
    spacing = AdaptiveSpacing(tau=1e-3, tau_max=1e3, slope=0.5)
    u = torch.tensor([[-0.3, -5.0, 1.3, 6.0]], dtype=DTYPE)
    lam = torch.tensor([[-1.0, -1.0, 1.0, 1.0]], dtype=DTYPE)
    got = _input_signal(hard_sigmoid(), u, lam, spacing)
    torch.testing.assert_close(got, torch.tensor([[-0.5, -1 / 6, 0.5, 1 / 6]], dtype=DTYPE), rtol=1e-12,
                               atol=1e-15)


def test_adaptive_spacing_is_scale_free_and_backprop_on_live_units():
    model, x, y = mlp(nn.ReLU, batch=32)
    spacing = AdaptiveSpacing(tau=1e-4, tau_max=math.inf, max_live=1.0)
    a = flat(run(model, x, y, fenchel(spacing)))
    # Rescaling the objective rescales the directions and nothing else (the revived set is the same).
    b = flat(run(model, x, y, fenchel(spacing), objective=lambda z, t: 3.0 * F.cross_entropy(z, t)))
    assert rel_err(b, 3.0 * a) < 1e-10
    # With every unit alive (large biases) it is backprop.
    with torch.no_grad():
        model[0].bias.add_(20.0)
        model[2].bias.add_(100.0)
    assert min(u.min().item() for u in pre_activations(model, x)) > 1.0
    bp = flat(run(model, x, y, mg.rules.backprop()))
    assert rel_err(flat(run(model, x, y, fenchel(spacing))), bp) < 1e-10


# --- the linearised local contrastive surrogate (002 Prop. 8) --------------------------------------


@pytest.mark.parametrize("name", ["mlp", "convnet", "residual", "batchnorm", "pendulum", "dynamics"])
def test_penalty_energies_give_backprop(name):
    """With ``E_t = ||x_t - phi_t(x_{t-1})||^2 / 2`` the targets of 002 eq. 53 are
    ``xbar_t = x_t^* - tau_t B dh/dx_t`` (the recursion of eq. 54 is backprop's), the directions are
    backprop's, and ``Lbar = h - sum_t tau_t B ||dh/dx_t||^2 / 2``."""
    case = make(name)
    ref = twin(case.model)
    chain = as_chain(case.model)
    taus = {t: 0.3 * 1.5 ** t for t in range(1, len(chain) + 1)}
    result = mg.Oracle(chain, case.objective, contrastive_backprop(StageSpacing(taus)))(case.x, case.y)
    xs = plain_states(name, ref, case.x)
    loss = case.objective(xs[-1], case.y)
    grads = torch.autograd.grad(loss, xs[1:] + [p for _, p in params(ref)], allow_unused=True)
    lams, gw = grads[:len(chain)], grads[len(chain):]
    B = case.x.shape[0]
    expected = loss.detach()
    for t, (stage, lam) in enumerate(zip(result.info, lams), start=1):
        info = stage.weight if stage.weight is not None else stage.state
        assert info.spacing == taus[t]
        torch.testing.assert_close(info.target, (xs[t] - taus[t] * B * lam).detach(), rtol=1e-10, atol=1e-12)
        expected = expected - 0.5 * taus[t] * B * lam.pow(2).sum()
    torch.testing.assert_close(contrastive_surrogate(result), expected, rtol=1e-10, atol=1e-12)
    bp = torch.cat([g.flatten() for g in gw])
    assert rel_err(flat(result), bp) < 1e-10


def _fenbp_by_hand(model, x, y, tau):
    """002 eq. 57-60 per sample, with explicit matrices: ``(mean Lbar_i, [mean dLbar_i/dW_k by eq. 62],
    [... by eq. 61])`` for ``Linear, ReLU, Linear, ReLU, Linear``."""
    lins = [m for m in model if isinstance(m, nn.Linear)]
    W = [m.weight.detach() for m in lins]
    b = [m.bias.detach() for m in lins]
    total, g62, g61 = 0.0, [0.0] * 3, [0.0] * 3
    for xi, yi in zip(x, y):
        z, a = [xi], []
        for k in range(3):
            a.append(W[k] @ z[-1] + b[k])
            z.append(torch.relu(a[-1]) if k < 2 else a[-1])
        ell = F.cross_entropy(z[3][None], yi[None])
        dl = torch.softmax(z[3], 0) - F.one_hot(yi, 3).to(DTYPE)
        zbar = [None] * 4
        zbar[3] = a[2] - tau * dl                                             # eq. 59
        for k in (2, 1):                                                      # eq. 60, with W_k^T
            zbar[k] = torch.relu(a[k - 1] - tau * W[k].T @ (z[k + 1] - zbar[k + 1]) / tau)
        Et = [None,
              *(0.5 * zbar[k] @ zbar[k] - zbar[k] @ a[k - 1] + 0.5 * torch.relu(a[k - 1]).pow(2).sum()
                for k in (1, 2)),
              0.5 * (zbar[3] - a[2]).pow(2).sum()]                            # eq. 58; identity on top
        value = ell + (zbar[3] - z[3]) @ dl + Et[3] / tau
        for k in (1, 2):                                                      # eq. 57
            value = value + (zbar[k] - z[k]) @ W[k].T @ (z[k + 1] - zbar[k + 1]) / tau + Et[k] / tau
        total = total + value / len(y)
        for k in range(3):
            lam = (z[k + 1] - zbar[k + 1]) / tau
            g62[k] = g62[k] + torch.outer(lam, z[k]) / len(y)                # eq. 62
            g61[k] = g61[k] + torch.outer(lam, zbar[k] if k else z[0]) / len(y)  # eq. 61
    return total, g62, g61


@pytest.mark.parametrize("tau", [0.05, 0.8])
def test_fenchel_surrogate_and_directions_match_002_eq_57_and_62(tau):
    model, x, y = mlp(nn.ReLU, batch=6, width=5, classes=3)
    result = run(model, x, y, fenchel(tau))
    value, g62, g61 = _fenbp_by_hand(model, x, y, tau)
    torch.testing.assert_close(contrastive_surrogate(result), value, rtol=1e-12, atol=1e-14)
    dirs = [d["weight"] for d in result.directions if d is not None]
    for d, expected in zip(dirs, g62):
        torch.testing.assert_close(d, expected, rtol=1e-12, atol=1e-14)
    # Remark 2: eq. 61 (zbar_k in place of z_k^*) is a different, wrong direction.
    assert max(rel_err(d, e) for d, e in zip(dirs, g61)) > 1e-3


@pytest.mark.parametrize("act", [nn.ReLU, hard_sigmoid, nn.Tanh])
def test_fenchel_surrogate_is_below_the_loss_and_tends_to_it(act):
    """Each term is ``<zbar - z, g> + D / tau`` with ``0 <= D <= tau^2 <lambda_{t-1}, g>``, so
    ``h - sum tau <lambda_{t-1}, lambda_t> <= Lbar <= h``, and ``h - Lbar = O(tau)``."""
    model, x, y = mlp(act, batch=16)
    gaps = []
    for tau in (0.4, 0.2, 0.1):
        result = run(model, x, y, fenchel(tau))
        terms = [i.state.term for i in result.info if i.state is not None and i.state.term is not None]
        assert all(t <= 1e-15 for t in terms)
        gaps.append((result.loss - contrastive_surrogate(result)).item())
    assert all(g > 0 for g in gaps)
    assert 1.5 < gaps[0] / gaps[1] < 2.5 and 1.5 < gaps[1] / gaps[2] < 2.5


# --- errors ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0.0, -1.0, math.nan, math.inf, True, "1"])
def test_bad_tau_is_rejected_naming_the_field(bad):
    with pytest.raises(ValueError, match=r"fenchel: tau must be a finite number > 0"):
        fenchel(bad)
    with pytest.raises(ValueError, match=r"ConstantSpacing: tau must be"):
        ConstantSpacing(bad)
    with pytest.raises(ValueError, match=r"finite_difference: tau must be"):
        FiniteDifference(bad)
    with pytest.raises(ValueError, match=r"contrastive_backprop: tau must be"):
        contrastive_backprop(bad)


def test_bad_spacing_objects_are_rejected_naming_the_field():
    with pytest.raises(ValueError, match=r"AdaptiveSpacing: tau must be"):
        AdaptiveSpacing(tau=math.nan)
    with pytest.raises(ValueError, match=r"AdaptiveSpacing: tau_max must be a number >= tau"):
        AdaptiveSpacing(tau=1.0, tau_max=0.5)
    with pytest.raises(ValueError, match=r"AdaptiveSpacing: tau_max"):
        AdaptiveSpacing(tau_max=math.nan)
    for bad in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"AdaptiveSpacing: max_live must be in \[0, 1\]"):
            AdaptiveSpacing(max_live=bad)
    for slope in (0.0, 1.0, -0.5, math.nan):
        with pytest.raises(ValueError, match=r"AdaptiveSpacing: slope must be in \(0, 1\)"):
            AdaptiveSpacing(slope=slope)
    with pytest.raises(ValueError, match=r"StageSpacing: taus\[2\] must be"):
        StageSpacing({2: -1.0})
    with pytest.raises(ValueError, match=r"StageSpacing: stage indices must be integers >= 1, got 0"):
        StageSpacing({0: 1.0})
    with pytest.raises(TypeError, match=r"StageSpacing: taus must be a mapping"):
        StageSpacing([1.0, 2.0])
    model, x, y = mlp(nn.ReLU, batch=4)
    with pytest.raises(ValueError, match=r"has 2 activation stages \(at t = \[2, 4\]\), got 3 spacings"):
        StageSpacing.layers(model, [1.0, 1.0, 1.0])
    assert StageSpacing.layers(model, [0.5, 0.25]).taus == {2: 0.5, 4: 0.25}
    with pytest.raises(ValueError, match=r"StageSpacing: no spacing for stage 4 \(ReLU\)"):
        run(model, x, y, fenchel(StageSpacing({2: 1.0, 5: 1.0}, default=None)))
    with pytest.raises(ValueError, match=r"StageSpacing: no spacing for stage 5 \(Linear\)"):
        run(model, x, y, fenchel(StageSpacing({2: 1.0, 4: 1.0}, default=None)))


def test_bad_activations_and_results_are_rejected():
    with pytest.raises(TypeError, match="Monotone: fn must be callable"):
        Monotone(3.0)
    with pytest.raises(ValueError, match="Monotone: lower must be < upper"):
        Monotone(torch.relu, lower=1.0, upper=0.0)
    with pytest.raises(ValueError, match="Monotone: upper must be a number"):
        Monotone(torch.relu, upper=math.nan)
    model, x, y = mlp(lambda: nn.LeakyReLU(-0.1), batch=4)
    with pytest.raises(ValueError, match="LeakyReLU negative_slope must be >= 0.*got -0.1"):
        run(model, x, y, fenchel(1.0))
    model, x, y = mlp(nn.ReLU, batch=4)
    with pytest.raises(ValueError, match="contrastive_surrogate: the result carries no surrogate terms"):
        contrastive_surrogate(run(model, x, y, mg.rules.backprop()))
    assert run(model, x, y, fenchel(1.0, surrogate=False)).info[1].state.term is None


# --- all-negative initialisation on digits (002 Sec. 5) ---------------------------------------------


def _digits():
    from sklearn.datasets import load_digits
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    x = torch.as_tensor(StandardScaler().fit_transform(digits.data), dtype=torch.float32)
    return x, torch.as_tensor(digits.target, dtype=torch.long)


def _all_negative_mlp(seed):
    """784-64-64-64-10 of 002 Fig. 1 on 64 inputs: weights ``-|Glorot uniform|``, biases
    ``-|U(0, 1/sqrt(fan_in))|``. Hidden layers 2 and 3 are dead on every sample."""
    gen = torch.Generator().manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64),
                          nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                bound = math.sqrt(6.0 / (m.in_features + m.out_features))
                m.weight.copy_(-bound * torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(-torch.rand(m.bias.shape, generator=gen) / math.sqrt(m.in_features))
    return model


def _train(rule, x, y, epochs, stop=None, seed=0):
    chain = mg.Chain(_all_negative_mlp(seed))
    oracle = mg.Oracle(chain, mg.losses.CrossEntropy(), rule)
    opt = torch.optim.SGD(chain.parameters(), lr=1 / 8)
    order = torch.Generator().manual_seed(seed)
    errors = []
    for _ in range(epochs):
        for idx in torch.randperm(len(y), generator=order).split(64):
            opt.zero_grad()
            oracle.backward(x[idx], y[idx])
            opt.step()
        with torch.no_grad():
            errors.append((chain(x).argmax(1) != y).float().mean().item())
        if stop is not None and errors[-1] < stop:
            break
    return errors


def test_all_negative_initialisation_backprop_stalls_and_adaptive_fenbp_trains():
    """002 Sec. 5: backprop cannot move an all-negative ReLU MLP; FenBP with adaptive spacing trains it
    (20-24 epochs to 30% training error over seeds 0-7 with the default spacing, 21 on seed 0, and at
    most 0.1% within 40; backprop on the same network with LeakyReLU(0.1), which has no dead units,
    needs 17 on seed 0)."""
    x, y = _digits()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 64-wide layers gain nothing from threads, and lose a lot on a busy machine
    try:
        bp = _train(mg.rules.backprop(), x, y, epochs=40)
        fen = _train(fenchel(AdaptiveSpacing()), x, y, epochs=40, stop=0.30)
    finally:
        torch.set_num_threads(threads)
    assert min(bp) >= 0.80
    assert min(fen) < 0.30, fen
    assert len(fen) <= 30  # 21 on this seed: the margin left in the 40-epoch budget


# --- float32: the finite difference without cancellation (issue 15) -----------------------------------

# Each closed-form activation with its kinks (or 0 for a smooth one).
CLOSED_FORMS = {"relu": (nn.ReLU, (0.0,)), "leaky_relu": (lambda: nn.LeakyReLU(0.1), (0.0,)),
                "hard_sigmoid": (hard_sigmoid, (0.0, 1.0)), "relu6": (nn.ReLU6, (0.0, 6.0)),
                "torch_hardsigmoid": (nn.Hardsigmoid, (-3.0, 3.0)), "sigmoid": (nn.Sigmoid, (0.0,)),
                "tanh": (nn.Tanh, (0.0,))}


def _reference_difference(module, u, delta):
    """``sigma(u) - sigma(u - delta)`` as a plain float64 difference. Where ``sigma`` saturates, float64
    rounds ``sigmoid(u)`` to 1 (``u > 37``), so there it is the plain difference of the complement:
    ``sigmoid(-v) - sigmoid(-u)``, and for tanh ``c(v) - c(u)`` with
    ``c(x) = 1 -/+ tanh(x) = 2 / (1 + e^{+-2x})``."""
    v = u - delta  # exact: u and delta are float32 values
    if isinstance(module, nn.Sigmoid):
        return torch.where(u > 0, torch.sigmoid(-v) - torch.sigmoid(-u), torch.sigmoid(u) - torch.sigmoid(v))
    if isinstance(module, nn.Tanh):
        up, down = 2 / (1 + torch.exp(2 * v)) - 2 / (1 + torch.exp(2 * u)), \
            2 / (1 + torch.exp(-2 * u)) - 2 / (1 + torch.exp(-2 * v))
        return torch.where(u > 0, up, down)
    return module(u) - module(v)


@pytest.mark.parametrize("name", CLOSED_FORMS)
@pytest.mark.parametrize("tau", [1.0, 1e-3, 1e-5])
def test_float32_difference_has_float32_precision(name, tau):
    """``Profile.difference(u, delta) = sigma(u) - sigma(u - delta)`` in float32 is the float64 value on
    the same float32 inputs to relative error 1e-5, at and around the kinks (``u - delta`` on either
    side of them), and for large ``|u|``; the plain float32 difference is off by ``eps |u| / |delta|``."""
    make_act, kinks = CLOSED_FORMS[name]
    module = make_act()
    prof = profile(module)
    g = torch.tensor([-40.0, -1.3, -0.37, -1e-3, 0.0, 1e-3, 0.37, 1.3, 40.0])
    offsets = torch.tensor([0.0, 1e-3, 0.5, 2.0]) * tau
    near = torch.cat([k + s * torch.cat([offsets, 0.2 * tau * g.abs(), 0.65 * tau * g.abs()])
                      for k in kinks for s in (-1, 1)])
    far = torch.tensor([-100.0, -30.0, -8.0, -2.5, 0.7, 2.5, 8.0, 30.0, 100.0])
    torch.manual_seed(0)
    u = torch.cat([near, far, 4 * torch.randn(40)]).float()[:, None]
    delta = tau * g.float()[None, :]
    got = prof.difference(u, delta)
    assert got.dtype == torch.float32
    expected = _reference_difference(module.double(), u.double(), delta.double())
    assert torch.isfinite(expected).all()
    # Relative to the float64 value, down to float32's smallest normal number (e^{-100} is below it).
    err = (got.double() - expected).abs()
    assert (err <= 1e-5 * expected.abs() + torch.finfo(torch.float32).tiny).all(), \
        (err / expected.abs()).nan_to_num().max()
    if tau == 1e-5:  # the plain float32 difference is far off: what this guards against
        naive = (module.float()(u) - module.float()(u - delta)).double()
        assert ((naive - expected).abs() > 1e-2 * expected.abs()).any()
    # Up to float32's largest |u|, where float64's plain difference loses delta too: finite, and the
    # outer pieces give exactly slope * delta.
    huge = torch.tensor([-3e38, -1e30, -1e4, 1e4, 1e30, 3e38])[:, None]
    left, right = {"relu": (0.0, 1.0), "leaky_relu": (0.1, 1.0)}.get(name, (0.0, 0.0))
    assert torch.equal(prof.difference(huge, delta), torch.where(huge < 0, left * delta, right * delta))


def test_monotone_keeps_the_plain_difference():
    prof = profile(Monotone(F.softplus))
    u, delta = torch.randn(5, 3), 1e-3 * torch.randn(5, 3)
    assert torch.equal(prof.difference(u, delta), F.softplus(u) - F.softplus(u - delta))


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Tanh])
@pytest.mark.parametrize("tau", [1.0, 1e-3, 1e-5])
def test_float32_fenchel_directions_match_float64(act, tau):
    """The fenchel preset on a float32 MLP gives its float64 twin's directions (same float32 weights and
    inputs) to 1e-4 per parameter (max abs difference / max abs value) at every spacing. No ReLU input
    lies within 5e-4 of the kink, so at the small spacings none is within ``tau |g|`` of it: there the
    finite difference amplifies the forward pass's own float32 rounding by ``1 / tau``, whatever the
    arithmetic."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), act(), nn.Linear(16, 4))
    x, y = torch.randn(8, 6), torch.arange(8) % 4
    twin64 = twin(model).double()
    assert twin64[0](x.double()).abs().min() > 5e-4
    got = run(model, x, y, fenchel(tau))
    expected = run(twin64, x.double(), y, fenchel(tau))
    for ds, es in zip(got.directions, expected.directions):
        assert (ds is None) == (es is None)
        for key, d in (ds or {}).items():
            assert d.dtype == torch.float32
            e = es[key]
            assert ((d.double() - e).abs().max() / e.abs().max()).item() < 1e-4, key


@pytest.mark.parametrize("tau", [0.05, 0.8])
def test_fenchel_targets_are_kept_only_on_request(tau):
    """``fenchel(tau, targets=True)`` reports the top activation's target ``xbar = relu(u - tau B
    lambda)`` (002 eq. 60) and the output's ``x - tau B lambda`` (eq. 59); by default no target is
    held (memory), and the directions are the same either way."""
    model, x, y = mlp(nn.ReLU, batch=6, width=5, classes=3)
    kept, plain = run(model, x, y, fenchel(tau, targets=True)), run(model, x, y, fenchel(tau))
    for a, b in zip(kept.directions, plain.directions, strict=True):
        if a is not None:
            torch.testing.assert_close(a["weight"], b["weight"], rtol=0, atol=0)
    assert all(i.state is None or i.state.target is None for i in plain.info)
    B = len(y)
    out = model(x)
    lam5 = (torch.softmax(out, 1) - F.one_hot(y, 3).to(DTYPE)) / B
    u3 = model[:3](x)
    lam4 = lam5 @ model[4].weight
    torch.testing.assert_close(kept.info[3].state.target, torch.relu(u3 - tau * B * lam4),
                               rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(kept.info[4].state.target, out - tau * B * lam5, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-5])
def test_relu_gap_sum_in_float32_equals_float64(scale):
    """The ReLU gap sum ``||inc||^2/2 + <inc, min(u, 0)>`` adds non-negative terms only: in float32 it
    equals the float64 piecewise gap (:func:`_clip_gap`) to a few eps at every spacing scale."""
    from moreaugrad.rules.fenchel import _RELU, _relu_difference, _relu_gap_sum

    torch.manual_seed(0)
    u = torch.randn(4096, dtype=torch.float64)
    delta = scale * torch.randn(4096, dtype=torch.float64)
    want = _RELU.gap(u, u - delta).sum()
    u32, d32 = u.float(), delta.float()
    got = _relu_gap_sum(u32, d32, _relu_difference(u32, d32))
    assert abs(got.double() - want) <= 1e-5 * want
