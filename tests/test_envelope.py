"""Closed-form Moreau gradients of primitives against brute force and the generic solvers."""

import math

import pytest
import torch
from torch import nn

from moreaugrad import envelope
from moreaugrad.losses import CrossEntropy, SquaredLoss
from moreaugrad.rules import Moreau, Paper
from moreaugrad.solvers import LBFGS

ACTIVATIONS = [
    nn.ReLU(), nn.LeakyReLU(0.1), nn.Hardtanh(-1.0, 2.0), nn.ReLU6(), nn.Hardsigmoid(),
    nn.Sigmoid(), nn.Tanh(), nn.Softplus(beta=2.0), nn.SiLU(),
]


def brute_force_prox(fn, x, c, width=6.0, n=200001):
    """argmin_u c sigma(u) + (u - x)^2/2 on a dense grid around x (float64, per entry)."""
    grid = torch.linspace(-width, width, n, dtype=torch.float64)
    u = x[:, None] + grid[None, :]
    v = c[:, None] * fn(u) + 0.5 * grid[None, :] ** 2
    return u.gather(1, v.argmin(1, keepdim=True))[:, 0]


@pytest.mark.parametrize("module", ACTIVATIONS, ids=lambda m: type(m).__name__)
def test_activation_prox_is_the_global_minimiser(module):
    torch.manual_seed(0)
    x = torch.randn(300, dtype=torch.float64) * 3
    # |c| < 1 keeps the smooth problems strongly convex; negative c exercises the concave side.
    c = (torch.rand(300, dtype=torch.float64) * 2 - 1) * 0.9
    prox = envelope.activation(module)
    u, info = prox.prox(x, c)
    ref = brute_force_prox(module, x, c)
    assert info.converged, info
    assert (u - ref).abs().max() < 1e-4  # grid spacing 6e-5

    # First-order optimality where sigma is differentiable at u: c sigma'(u) + u - x = 0.
    smooth = torch.ones_like(u, dtype=torch.bool)
    if isinstance(prox, envelope.PiecewiseLinear | envelope.ReLUProx):
        # The slope table, not autograd: torch's hardsigmoid backward rounds 1/6 to float32.
        knots = torch.tensor(prox.knots, dtype=torch.float64)
        d1 = torch.tensor(prox.slopes, dtype=torch.float64)[torch.bucketize(u, knots)]
        smooth = (u[:, None] - knots[None]).abs().min(1).values > 1e-12
    else:
        uu = u.clone().requires_grad_(True)
        (d1,) = torch.autograd.grad(module(uu).sum(), uu)
    assert (c * d1 + u - x)[smooth].abs().max() < 1e-10


def test_relu_fast_path_equals_the_piecewise_linear_form():
    torch.manual_seed(6)
    x, c = torch.randn(1000, dtype=torch.float64) * 2, torch.randn(1000, dtype=torch.float64)
    generic = envelope.PiecewiseLinear(torch.relu, [0.0], [0.0, 1.0])
    torch.testing.assert_close(envelope.RELU.prox(x, c)[0], generic.prox(x, c)[0], rtol=0, atol=1e-15)


def test_relu_prox_closed_form_by_cases():
    # c > 0: soft-threshold-like; c < 0: jump to x + |c| iff x > -|c|/2 (the two local minima).
    x = torch.tensor([-2.0, 0.3, 1.5, -0.2, -0.6, 0.4], dtype=torch.float64)
    c = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0], dtype=torch.float64)
    u, _ = envelope.RELU.prox(x, c)
    expected = torch.tensor([-2.0, 0.0, 0.5, 0.8, -0.6, 1.4], dtype=torch.float64)
    torch.testing.assert_close(u, expected, rtol=0, atol=1e-15)


def test_smooth_prox_reports_non_convex_entries():
    x = torch.zeros(4, dtype=torch.float64)
    c = torch.tensor([0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    _, info = envelope.TANH.prox(x, c)  # tanh'' >= -4/(3 sqrt 3) = -0.77, so c >= 1.3 fails
    assert not info.converged and "not strongly convex for 2 entries" in info.message


def test_quadratic_envelope_identity_by_the_generic_solver():
    """grad env(alpha h)(x) = alpha A (I + alpha A)^{-1} x for h(x) = x^T A x / 2 (000 Sec. 1)."""
    torch.manual_seed(1)
    M = torch.randn(6, 6, dtype=torch.float64)
    A = M @ M.T + 0.5 * torch.eye(6, dtype=torch.float64)
    x = torch.randn(1, 6, dtype=torch.float64)

    def h(z, _):
        return 0.5 * (z @ A * z).sum()

    for alpha in (0.1, 1.0, 10.0):
        rule = Moreau(Paper(gamma=alpha, alpha=1.0), LBFGS(tol=1e-12, max_iter=500))
        _, signal, info = rule.objective(h, x, None, horizon=1)
        expected = envelope.quadratic_env(A, x[0], alpha)
        assert info.converged
        torch.testing.assert_close(signal.value[0], expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("gamma", [0.3, 3.0, 30.0])
def test_loss_closed_forms_match_the_generic_solver(gamma):
    torch.manual_seed(2)
    z = torch.randn(7, 5, dtype=torch.float64) * 2
    labels = torch.randint(0, 5, (7,))
    generic = Moreau(Paper(gamma=gamma), LBFGS(tol=1e-13, max_iter=1000), closed_forms=False)
    closed = Moreau(Paper(gamma=gamma))
    for h, y in [(SquaredLoss(), labels), (SquaredLoss(), torch.randn(7, 5, dtype=torch.float64)),
                 (CrossEntropy(), labels)]:
        _, s_closed, info = closed.objective(h, z, y, horizon=3)
        _, s_generic, ginfo = generic.objective(h, z, y, horizon=3)
        assert info.converged and ginfo.converged, (info, ginfo)
        torch.testing.assert_close(s_closed.value, s_generic.value, rtol=1e-10, atol=1e-12)


def test_squared_loss_envelope_formula():
    z = torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64)
    y = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    c = 0.5 / 2  # gamma / B
    torch.testing.assert_close(envelope.squared_loss_env(z, y, 0.5), c * (z - y) / (1 + c))


def test_cross_entropy_envelope_is_stationary():
    torch.manual_seed(3)
    z = torch.randn(4, 10, dtype=torch.float64) * 5
    labels = torch.randint(0, 10, (4,))
    gamma = 40.0
    env, info = envelope.cross_entropy_env(z, labels, gamma)
    u = z - env
    c = gamma / 4
    g = c * (torch.softmax(u, 1) - torch.nn.functional.one_hot(labels, 10)) + u - z
    assert info.converged and info.iterations < 20
    assert g.abs().max() < 1e-12
    assert math.isfinite(info.residual)
