"""Closed forms for Moreau gradients of primitives (DESIGN section 4; 000 Sec. 1; 001 eq. 2).

Notation: ``grad env(f)(x) = -argmin_y f(x + y) + ||y||^2/2 = x - prox_f(x)``.

Elementwise activations ``sigma`` reduce to separable one-dimensional problems. Every primitive
below has the one signature ``increment(x, c) -> (y, SolveInfo)`` with

    ``y = argmin_y  c * sigma(x + y) + y^2 / 2``     (elementwise, ``c`` shaped like ``x``)

so that ``grad env(gamma lam^T sigma)(x) = -y`` with ``c = gamma * lam``. The increment is solved
for and returned as such: the prox point ``u = x + y`` (``prox``) is never formed on the way, since
``x - u`` would lose every digit of a small ``y`` to cancellation (float32 at small steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .solvers import CAP, rounding_slack
from .types import SolveInfo

NOT_CONVEX = "subproblem not strongly convex"


@dataclass(frozen=True)
class PiecewiseLinear:
    """A continuous piecewise-linear ``sigma`` with ``knots`` ``k_1 < ... < k_m`` and ``slopes``
    ``s_0..s_m`` on ``(-inf, k_1], ..., [k_m, inf)``.

    ``increment`` is exact even when ``c < 0`` makes the problem non-convex: on each closed piece
    the objective is a convex quadratic minimised by ``y = clip(-c s_j, piece - x)``, and the global
    minimum is the best of the ``m + 1`` candidates (ReLU, leaky ReLU, hard tanh, hard sigmoid).
    """

    fn: Callable[[Tensor], Tensor]
    knots: Sequence[float]
    slopes: Sequence[float]

    def increment(self, x: Tensor, c: Tensor) -> tuple[Tensor, SolveInfo]:
        edges = [-math.inf, *self.knots, math.inf]
        fx = self.fn(x)
        best_y, best_v = None, None
        for j, s in enumerate(self.slopes):
            lo, hi = edges[j], edges[j + 1]
            inside = x.clamp(lo, hi)
            off = s * (x - inside) + (self.fn(inside) - fx)  # piece j's affine map at x - sigma(x)
            y = torch.clamp(-c * s, lo - x, hi - x)
            # The value relative to y = 0, with sigma(x + y) - sigma(x) = s y + off on the piece:
            # candidates compare at the scale of the move, not of sigma(x).
            v = c * (s * y + off) + 0.5 * y * y
            if best_y is None:
                best_y, best_v = y, v
            else:
                better = v < best_v
                best_y, best_v = torch.where(better, y, best_y), torch.where(better, v, best_v)
        return best_y, SolveInfo("closed form: piecewise linear")

    def prox(self, x: Tensor, c: Tensor) -> tuple[Tensor, SolveInfo]:
        """``u = x + y = argmin_u c sigma(u) + (u - x)^2/2``."""
        y, info = self.increment(x, c)
        return x + y, info


@dataclass(frozen=True)
class Smooth:
    """A smooth monotone ``sigma`` with derivatives ``d1``, ``d2`` and bounds ``lo <= sigma'' <= hi``
    and ``0 <= sigma' <= slope``.

    ``increment`` runs a safeguarded Newton method on ``g(y) = c sigma'(x + y) + y`` (Newton inside
    a shrinking bracket, bisection when a Newton step leaves it), vectorised over all entries, from
    the linearised solution ``y = -c sigma'(x)``. It stops when ``|g| <= 8 eps |c| (1 + |x|)``, the
    rounding level of ``g`` (relative to the problem's scale ``|c|``, never absolute). The problem
    is strongly convex exactly when ``1 + c sigma''(u) > 0`` for all ``u``, guaranteed by
    ``1 + c lo > 0`` for ``c > 0`` and ``1 + c hi > 0`` for ``c < 0``; entries outside that range
    are reported.
    """

    fn: Callable[[Tensor], Tensor]
    d1: Callable[[Tensor], Tensor]
    d2: Callable[[Tensor], Tensor]
    lo: float
    hi: float
    slope: float
    max_iter: int = 60

    def increment(self, x: Tensor, c: Tensor) -> tuple[Tensor, SolveInfo]:
        convex = torch.where(c > 0, 1 + c * self.lo > 0, 1 + c * self.hi > 0)
        # The root of g(y) = c sigma'(x + y) + y lies in [-|c| slope, |c| slope].
        b = c.abs() * self.slope
        a = -b
        y = -c * self.d1(x)
        tol = 8 * torch.finfo(x.dtype).eps * c.abs() * (1 + x.abs())
        it, res = 0, torch.zeros((), dtype=x.dtype, device=x.device)
        for it in range(1, self.max_iter + 1):  # noqa: B007 - the count is reported
            g = c * self.d1(x + y) + y
            res = g.abs().max() if g.numel() else res
            if bool((g.abs() <= tol).all()):
                break
            a, b = torch.where(g < 0, y, a), torch.where(g > 0, y, b)
            h = 1 + c * self.d2(x + y)
            newton = y - g / torch.where(h > 0, h, torch.ones_like(h))
            inside = (h > 0) & (newton > a) & (newton < b)
            y = torch.where(inside, newton, (a + b) / 2)
        g = c * self.d1(x + y) + y  # the residual of the returned point, not of the last iterate
        res = g.abs().max() if g.numel() else res
        ok = bool((g.abs() <= tol).all())
        n_bad = int((~convex).sum())
        message = f"{NOT_CONVEX} for {n_bad} entries (|gamma lambda| too large)" if n_bad else ""
        if not ok and not message:
            message = CAP
        return y, SolveInfo("closed form: 1-D safeguarded Newton", it, float(res), ok and not n_bad,
                            message)

    def prox(self, x: Tensor, c: Tensor) -> tuple[Tensor, SolveInfo]:
        """``u = x + y = argmin_u c sigma(u) + (u - x)^2/2``."""
        y, info = self.increment(x, c)
        return x + y, info


def _sigmoid_d1(u: Tensor) -> Tensor:
    s = torch.sigmoid(u)
    return s * (1 - s)


def _sigmoid_d2(u: Tensor) -> Tensor:
    s = torch.sigmoid(u)
    return s * (1 - s) * (1 - 2 * s)


def _tanh_d1(u: Tensor) -> Tensor:
    return 1 - torch.tanh(u) ** 2


def _tanh_d2(u: Tensor) -> Tensor:
    t = torch.tanh(u)
    return -2 * t * (1 - t ** 2)


def _silu_d1(u: Tensor) -> Tensor:
    s = torch.sigmoid(u)
    return s * (1 + u * (1 - s))


def _silu_d2(u: Tensor) -> Tensor:
    s = torch.sigmoid(u)
    return s * (1 - s) * (2 + u * (1 - 2 * s))


_S3 = math.sqrt(3.0)
SIGMOID = Smooth(torch.sigmoid, _sigmoid_d1, _sigmoid_d2, -1 / (6 * _S3), 1 / (6 * _S3), 0.25)
TANH = Smooth(torch.tanh, _tanh_d1, _tanh_d2, -4 / (3 * _S3), 4 / (3 * _S3), 1.0)
# silu'' lies in [-0.0999, 0.5] (minimum near u = 2.4); silu' in [-0.0998, 1.0998].
SILU = Smooth(F.silu, _silu_d1, _silu_d2, -0.1, 0.5, 1.1)


def softplus(beta: float, threshold: float) -> Smooth:
    """``softplus(u) = log(1 + exp(beta u)) / beta``: convex, ``0 <= sigma'' <= beta/4``."""

    def d1(u: Tensor) -> Tensor:
        return torch.sigmoid(beta * u)

    def d2(u: Tensor) -> Tensor:
        s = torch.sigmoid(beta * u)
        return beta * s * (1 - s)

    return Smooth(lambda u: F.softplus(u, beta, threshold), d1, d2, 0.0, beta / 4, 1.0)


@dataclass(frozen=True)
class ReLUProx:
    """``sigma = max(., 0)`` in four elementwise passes (the hot path of MLPs):
    ``x - u = min(max(x, 0), c)`` for ``c >= 0`` (soft threshold), and for ``c < 0`` the better of
    the two local minima, ``x - u = c`` if ``x > c/2`` else ``0``. Same result as the generic
    :class:`PiecewiseLinear` with knots ``[0]`` and slopes ``[0, 1]``."""

    knots: tuple[float, ...] = (0.0,)
    slopes: tuple[float, ...] = (0.0, 1.0)
    fn: Callable[[Tensor], Tensor] = torch.relu

    def increment(self, x: Tensor, c: Tensor) -> tuple[Tensor, SolveInfo]:
        env = torch.where(c >= 0, torch.minimum(x.clamp_min(0), c), torch.where(x > c / 2, c, 0.0))
        return -env, SolveInfo("closed form: piecewise linear")

    def prox(self, x: Tensor, c: Tensor) -> tuple[Tensor, SolveInfo]:
        """``u = x + y = argmin_u c sigma(u) + (u - x)^2/2``."""
        y, info = self.increment(x, c)
        return x + y, info


RELU = ReLUProx()


def leaky_relu(negative_slope: float) -> PiecewiseLinear:
    return PiecewiseLinear(lambda u: F.leaky_relu(u, negative_slope), [0.0], [negative_slope, 1.0])


def hardtanh(min_val: float, max_val: float) -> PiecewiseLinear:
    return PiecewiseLinear(lambda u: F.hardtanh(u, min_val, max_val), [min_val, max_val], [0.0, 1.0, 0.0])


HARDSIGMOID = PiecewiseLinear(F.hardsigmoid, [-3.0, 3.0], [0.0, 1 / 6, 0.0])

ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.SiLU, nn.Softplus)


def activation(module: nn.Module) -> PiecewiseLinear | ReLUProx | Smooth:
    """The primitive of an elementwise activation module (its ``fn``, derivatives or pieces, and
    ``prox``); ``ReLU6`` is a ``Hardtanh``. Raises ``NotImplementedError`` for other modules."""
    if isinstance(module, nn.ReLU):
        return RELU
    if isinstance(module, nn.LeakyReLU):
        return leaky_relu(module.negative_slope)
    if isinstance(module, nn.Hardtanh):
        return hardtanh(module.min_val, module.max_val)
    if isinstance(module, nn.Hardsigmoid):
        return HARDSIGMOID
    if isinstance(module, nn.Sigmoid):
        return SIGMOID
    if isinstance(module, nn.Tanh):
        return TANH
    if isinstance(module, nn.SiLU):
        return SILU
    if isinstance(module, nn.Softplus):
        return softplus(module.beta, module.threshold)
    raise NotImplementedError(f"no elementwise primitive for {type(module).__name__}")


# -- objectives ---------------------------------------------------------------------------------


def squared_loss_env(z: Tensor, y: Tensor, gamma: float) -> Tensor:
    """``grad env(gamma h)(z)`` for ``h(z) = (1/B) sum_i ||z_i - y_i||^2/2``:
    ``c (z - y) / (1 + c)`` with ``c = gamma / B`` (the prox of a quadratic, 000 Sec. 1)."""
    c = gamma / z.shape[0]
    return c * (z - y) / (1 + c)


def cross_entropy_env(z: Tensor, labels: Tensor, gamma: float, tol: float | None = None,
                      max_iter: int = 50) -> tuple[Tensor, SolveInfo]:
    """``grad env(gamma h)(z) = -v`` for ``h(z) = (1/B) sum_i CE(z_i, y_i)``, where per sample

        ``v_i = argmin_v  c (logsumexp(z_i + v) - (z_i + v)_{y_i}) + ||v||^2/2``,   ``c = gamma / B``.

    Batched Newton over the class dimension on the increment ``v`` (never on ``u = z + v``, whose
    difference with ``z`` cancels at small ``gamma``), from the linearised solution
    ``v = -c (softmax(z) - onehot)``: the Hessian ``I + c (diag(p) - p p^T)`` is inverted by
    Sherman-Morrison in O(C) per sample; an Armijo backtracking per sample keeps every step a
    descent step. The problem is strongly convex for every ``gamma > 0`` (CE is convex).

    ``tol`` defaults to the rounding level of the gradient, ``8 eps c (1 + max|z|) sqrt(C)``: relative
    to the problem's scale ``c``, so it never exceeds the starting residual of a small step.
    """
    c = gamma / z.shape[0]
    onehot = F.one_hot(labels.long(), z.shape[1]).to(z.dtype)
    if tol is None:
        zmax = z.abs().max().item() if z.numel() else 0.0
        tol = 8 * torch.finfo(z.dtype).eps * c * (1 + zmax) * z.shape[1] ** 0.5

    def value(v: Tensor) -> Tensor:
        u = z + v
        return c * (torch.logsumexp(u, 1) - (u * onehot).sum(1)) + 0.5 * (v * v).sum(1)

    v = -c * (torch.softmax(z, 1) - onehot)
    it, res = 0, 0.0
    for it in range(max_iter + 1):  # noqa: B007 - the count is reported
        p = torch.softmax(z + v, 1)
        g = c * (p - onehot) + v
        res = float(g.norm(dim=1).max()) if g.numel() else 0.0
        if res <= tol or it == max_iter:
            break
        dinv = 1 / (1 + c * p)
        dg, dp = dinv * g, dinv * p
        step = dg + c * dp * (p * dg).sum(1, keepdim=True) / (1 - c * (p * dp).sum(1, keepdim=True))
        f0, slope = value(v), -(g * step).sum(1)
        # Differences below the rounding of f0 carry no sign: accept them (else Newton stalls).
        slack = rounding_slack(f0)
        t = torch.ones_like(f0)
        for _ in range(30):
            bad = value(v - t[:, None] * step) > f0 + 1e-4 * t * slope + slack
            if not bool(bad.any()):
                break
            t = torch.where(bad, t / 2, t)
        v = v - t[:, None] * step
    ok = res <= tol
    return -v, SolveInfo("closed form: batched Newton (cross-entropy)", it, res, ok, "" if ok else CAP)


def quadratic_env(A: Tensor, x: Tensor, alpha: float) -> Tensor:
    """``grad env(alpha h)(x) = alpha A (I + alpha A)^{-1} x`` for ``h(x) = x^T A x / 2``, A symmetric
    positive definite (the reference identity of the tests)."""
    eye = torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    return alpha * A @ torch.linalg.solve(eye + alpha * A, x)
