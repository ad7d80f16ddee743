"""Closed-form Moreau gradients of primitives against brute force and the generic solvers."""

import math

import pytest
import torch
from torch import nn

import moreaugrad as mg
from helpers import rel_err
from moreaugrad import envelope
from moreaugrad.losses import CrossEntropy, SquaredLoss
from moreaugrad.rules import Moreau, Paper
from moreaugrad.solvers import LBFGS
from moreaugrad.sweep import record

ACTIVATIONS = [
    nn.ReLU(), nn.LeakyReLU(0.1), nn.LeakyReLU(1.5), nn.Hardtanh(-1.0, 2.0), nn.ReLU6(), nn.Hardsigmoid(),
    nn.Sigmoid(), nn.Tanh(), nn.Softplus(beta=2.0), nn.Softplus(beta=2.0, threshold=1.0), nn.SiLU(),
    nn.ELU(), nn.ELU(alpha=0.5),
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
    if isinstance(prox, envelope.SmoothThenIdentity):
        smooth = (u - prox.knot).abs() > 1e-12
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


# Each module with non-default parameters, and its knots: the state rule's closed form must honour
# them (000 Prop. 2.2 on the stage alone) and equal the generic solver run to rounding.
PARAMETERISED = {
    "Softplus(beta=2, threshold=1)": (nn.Softplus(beta=2.0, threshold=1.0), [0.5]),
    "Softplus(beta=0.5, threshold=3)": (nn.Softplus(beta=0.5, threshold=3.0), [6.0]),
    "Softplus()": (nn.Softplus(), [20.0]),
    "LeakyReLU(0.2)": (nn.LeakyReLU(0.2), [0.0]),
    "LeakyReLU(1.5)": (nn.LeakyReLU(1.5), [0.0]),
    "LeakyReLU(-0.3)": (nn.LeakyReLU(-0.3), [0.0]),
    "Hardtanh(-0.5, 1.5)": (nn.Hardtanh(-0.5, 1.5), [-0.5, 1.5]),
    "ReLU6": (nn.ReLU6(), [0.0, 6.0]),
    "ELU(0.5)": (nn.ELU(alpha=0.5), [0.0]),
    "ELU(1)": (nn.ELU(), [0.0]),
    "ELU(2)": (nn.ELU(alpha=2.0), [0.0]),
}


def inputs_off_the_knots(knots, n=240, c_max=0.4, margin=0.2, seed=0):
    """``x`` at least ``c_max + margin`` from every knot, so that each entry's minimiser lies inside
    one piece, where the generic solver converges (at a kink its gradient never vanishes)."""
    gen = torch.Generator().manual_seed(seed)
    centre = sum(knots) / len(knots)
    x = centre + 4 * torch.randn(8 * n, generator=gen, dtype=torch.float64)
    far = torch.stack([(x - k).abs() for k in knots]).min(0).values > c_max + margin
    x = x[far][:n]
    assert x.numel() == n
    c = 0.05 + (c_max - 0.05) * torch.rand(n, generator=gen, dtype=torch.float64)
    return x.reshape(6, -1), c.reshape(6, -1)


@pytest.mark.parametrize("name", PARAMETERISED)
def test_activation_parameters_are_honoured(name):
    module, knots = PARAMETERISED[name]
    x, c = inputs_off_the_knots(knots)
    gamma = 0.7
    site = record(mg.Chain(nn.Sequential(module)), x, input_signal=True).sites[0]
    lam = mg.Dual(c / gamma)
    closed = Moreau(Paper(gamma=gamma))
    generic = mg.rules.moreau(gamma=gamma, closed_forms=False, solver=LBFGS(tol=1e-14, max_iter=500)).state
    got, want = closed.state(site, lam), generic.state(site, lam)
    assert got.info.method.startswith("closed form") and got.info.converged, got.info
    assert want.info.residual <= 1e-13 * float(c.abs().max()), want.info
    assert rel_err(got.signal.value, want.signal.value) <= 1e-12


def test_softplus_threshold_is_the_linear_piece():
    # Above threshold / beta torch's softplus is u itself, so the increment is -c exactly (the smooth
    # formula alone would give -c sigmoid(beta u), off by 3% or more at beta u <= 4).
    x = torch.tensor([0.9, 1.5, 2.0], dtype=torch.float64)
    c = torch.full_like(x, 0.3)
    y, _ = envelope.activation(nn.Softplus(beta=2.0, threshold=1.0)).increment(x, c)
    torch.testing.assert_close(y, -c, rtol=0, atol=0)
    y_smooth, _ = envelope.activation(nn.Softplus(beta=2.0, threshold=float("inf"))).increment(x, c)
    assert (y_smooth + c).abs().min() > 0.03 * 0.3


def test_default_softplus_below_threshold_is_the_smooth_form():
    gen = torch.Generator().manual_seed(5)
    x = 5 * torch.randn(500, generator=gen, dtype=torch.float64)
    c = torch.rand(500, generator=gen, dtype=torch.float64)
    y, _ = envelope.activation(nn.Softplus()).increment(x, c)
    y_smooth, _ = envelope.softplus(1.0, float("inf")).increment(x, c)
    assert torch.equal(y, y_smooth)


@pytest.mark.parametrize("module", [nn.Softplus(beta=-1.0), nn.ELU(alpha=-0.5)], ids=repr)
def test_parameters_without_a_closed_form_go_to_the_solver(module):
    assert envelope.primitive(module) is None
    with pytest.raises(NotImplementedError, match="no elementwise closed form"):
        envelope.activation(module)
    x = torch.randn(3, 4, dtype=torch.float64)
    site = record(mg.Chain(nn.Sequential(module)), x, input_signal=True).sites[0]
    up = Moreau(Paper(gamma=0.1), LBFGS(tol=1e-12)).state(site, mg.Dual(torch.ones_like(x)))
    assert up.info.method == "L-BFGS"  # (ELU(-0.5) has a kink at 0, where the solver cannot converge)


def test_newton_does_not_cycle_on_a_steep_sigmoid():
    # g(v) = c (S sigmoid(z + v) - A) + v with c S = 80: plain Newton 2-cycles from the linearised
    # start; the rtsafe safeguard bisects instead.
    z = torch.tensor([-5.0, 3.0, 0.5, -12.0], dtype=torch.float64)
    S, A = torch.full_like(z, 4.0), torch.tensor([4.0, 0.0, 4.0, 0.0], dtype=torch.float64)
    c = 20.0
    tol = 8 * torch.finfo(z.dtype).eps * c * (S * (1 + z.abs()) + A)
    v, it, res, ok = envelope.newton_1d(
        lambda v: c * (S * torch.sigmoid(z + v) - A) + v,
        lambda v: 1 + c * S * torch.sigmoid(z + v) * torch.sigmoid(-(z + v)),
        -c * (S * torch.sigmoid(z) - A), -c * (S - A), c * A, tol, 60)
    assert ok and it <= 15 and res <= float(tol.max()), (it, res)


# -- max pooling over tiling windows ----------------------------------------------------------------


def _simplex_by_bisection(v: torch.Tensor, c: float) -> torch.Tensor:
    """``y = -(v - s)_+`` with ``sum (v - s)_+ = c`` found by bisection on ``s`` (a reference)."""
    lo, hi = float(v.min()) - c, float(v.max())
    for _ in range(200):
        s = (lo + hi) / 2
        lo, hi = (s, hi) if float((v - s).clamp_min(0).sum()) > c else (lo, s)
    return -(v - (lo + hi) / 2).clamp_min(0)


@pytest.mark.parametrize("pool,shape", [(nn.MaxPool2d(2), (2, 3, 5, 7)), (nn.MaxPool2d((2, 3)), (1, 2, 4, 6)),
                                        (nn.MaxPool1d(3), (2, 2, 10))])
def test_max_pool_increment_against_references(pool, shape):
    """Per window: the simplex projection (by bisection) for ``c >= 0``, the raised maximum for
    ``c < 0``, zero outside every window; and no random nearby point does better."""
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=torch.float64)
    x.view(-1)[:4] = 0.25  # ties inside a window
    out = pool(x)
    scales = torch.tensor([0.01, 1.0, 10.0], dtype=torch.float64)[torch.arange(out.numel()) % 3]
    c = torch.randn_like(out) * scales.view(out.shape)
    kernel = envelope.pool_windows(pool)
    y, info = envelope.max_pool_increment(x, c, kernel)
    assert y.shape == x.shape and info.method == "closed form: max over windows"

    def value(yy):
        return float((c * pool(x + yy)).sum() + 0.5 * (yy * yy).sum())

    # Window by window against the references, through the pool's own indices.
    _, idx = (nn.MaxPool1d if len(kernel) == 1 else nn.MaxPool2d)(kernel, return_indices=True)(x)
    unfold_mask = torch.zeros_like(x, dtype=torch.bool)
    flat_x, flat_y = x.flatten(-len(kernel)), y.flatten(-len(kernel))
    for pos in range(out[0, 0].numel()):
        members = [i for i in range(flat_x.shape[-1])
                   if _window_of(i, x.shape[-len(kernel):], kernel) == pos]
        for b in range(x.shape[0]):
            for ch in range(x.shape[1]):
                cj = float(c[b, ch].flatten()[pos])
                v, got = flat_x[b, ch, members], flat_y[b, ch, members]
                if cj >= 0:
                    torch.testing.assert_close(got, _simplex_by_bisection(v, cj), rtol=1e-9, atol=1e-12)
                else:
                    want = torch.zeros_like(v)
                    want[int(v.argmax())] = -cj
                    torch.testing.assert_close(got, want)
                unfold_mask.flatten(-len(kernel))[b, ch, members] = True
    assert (y[~unfold_mask] == 0).all()
    assert idx.numel() == out.numel()
    best = value(y)
    for _ in range(20):
        assert best <= value(y + 1e-3 * torch.randn_like(y)) + 1e-12


def _window_of(i: int, size: tuple[int, ...], kernel: tuple[int, ...]) -> int:
    """The flat index of the pooled cell whose window holds the flat input index ``i`` (-1: none)."""
    if len(size) == 1:
        j = i // kernel[0]
        return j if j < size[0] // kernel[0] else -1
    r, col = divmod(i, size[1])
    jr, jc = r // kernel[0], col // kernel[1]
    if jr >= size[0] // kernel[0] or jc >= size[1] // kernel[1]:
        return -1
    return jr * (size[1] // kernel[1]) + jc


def test_moreau_max_pool_tends_to_backprop():
    """On a ConvNet the pool's state line takes the closed form, and Moreau tends to backprop at
    first order as gamma = alpha -> 0 under the Lagrangian schedule (halving the step about halves
    the error)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 3 * 3, 4)).double()
    x, y = torch.randn(5, 2, 7, 6, dtype=torch.float64), torch.arange(5) % 4
    grads = mg.Oracle(model, CrossEntropy())(x, y).directions
    errs = []
    for step in (1e-3, 5e-4):
        rule = mg.rules.moreau(schedule=mg.rules.Lagrangian(step, step))
        small = mg.Oracle(model, CrossEntropy(), rule)(x, y)
        assert small.info[2].state.method == "closed form: max over windows"
        errs.append(max(rel_err(small.directions[t][n], grads[t][n]) for t in (0, 4) for n in grads[t]))
    assert 0.4 * errs[0] < errs[1] < 0.6 * errs[0]


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e-5])
def test_max_pool_increment_float32_equals_float64(scale):
    """The max-pool closed form in float32 gives float64's increment to float32 rounding at large and
    small steps (it works in differences to each window's maximum, so a small ``c`` is not lost
    against ``x``), with near ties inside windows."""
    torch.manual_seed(3)
    x64 = 3.0 + torch.randn(4, 3, 8, 8, dtype=torch.float64)
    x64[..., ::2, ::2] = x64[..., 1::2, 1::2] + scale * 0.3  # a runner-up within reach of c
    c64 = scale * torch.randn(4, 3, 4, 4, dtype=torch.float64)
    x32, c32 = x64.float(), c64.float()
    y64, _ = envelope.max_pool_increment(x32.double(), c32.double(), (2, 2))
    y32, _ = envelope.max_pool_increment(x32, c32, (2, 2))
    assert float((y32.double() - y64).abs().max()) <= 1e-5 * float(c64.abs().max())


@pytest.mark.parametrize("kernel,shape", [((2, 2), (3, 4, 9, 8)), ((3, 3), (2, 2, 9, 10)),
                                          ((2, 3), (2, 2, 7, 9)), ((3,), (2, 3, 11)), ((1, 2), (1, 2, 3, 4))])
def test_max_pool_network_equals_the_sort_path(kernel, shape, monkeypatch):
    """The compare-exchange network on strided views (windows of up to 9 entries) gives the sort
    path's increment to 1e-12 in float64, with exact ties, near ties, c of both signs and scales,
    and rows past the last window; run in blocks of the leading dimension (one row each) it gives
    the same bits as in one piece, and a single window grid (no leading dimension) is taken whole."""
    from moreaugrad.envelope import _pool_by_sort

    torch.manual_seed(5)
    x = torch.randn(shape, dtype=torch.float64)
    x.view(-1)[::7] = 0.5  # exact ties
    outs = tuple(s // k for s, k in zip(shape[-len(kernel):], kernel, strict=True))
    c = torch.randn(*shape[:-len(kernel)], *outs, dtype=torch.float64)
    c = c * torch.tensor([1e-4, 1.0, 30.0], dtype=torch.float64)[torch.arange(c.numel()) % 3].view(c.shape)
    whole, _ = envelope.max_pool_increment(x, c, kernel)
    torch.testing.assert_close(whole, _pool_by_sort(x, c, kernel), rtol=1e-12, atol=1e-14)
    monkeypatch.setattr(mg.kernels, "BLOCK_BYTES", 1)  # one row of the leading dimension per block
    assert torch.equal(envelope.max_pool_increment(x, c, kernel)[0], whole)
    first = (0,) * (x.dim() - len(kernel))  # one window grid
    grid, _ = envelope.max_pool_increment(x[first], c[first], kernel)
    assert torch.equal(grid, whole[first])
