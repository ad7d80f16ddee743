"""Fenchel back-propagation: finite targets instead of infinitesimal errors (002 Sec. 4.2.2).

A network ``z_k = sigma_k(W_{k-1} z_{k-1})`` is the nested program of 002 eq. 26 with the Fenchel
energies ``E_k(z_k, z_{k-1}) = G_k(z_k) - z_k^T W_{k-1} z_{k-1}`` (002 eq. 38, 55), whose minimiser is
``sigma_k(W_{k-1} z_{k-1})`` when ``sigma_k = grad G_k^*``. The linearised local contrastive surrogate
(002 Prop. 8, eq. 50-51) of that program is solved in closed form by one backward pass (002 eq. 57-60,
with ``W_k^T`` in eq. 60, DESIGN section 9):

    ``zbar_k = sigma_k(u_k - tau_k W_k^T lambda_{k+1})``,  ``lambda_k = (z_k^* - zbar_k) / tau_k``,

with ``u_k = W_{k-1} z_{k-1}^*`` the forward pre-activation. On a chain whose children are ``Linear``
and activation stages this is, per stage:

* activation ``x_t = sigma(x_{t-1})`` (:class:`FiniteDifference`): with ``u = x_{t-1}``,
  ``lambda_{t-1} = (sigma(u) - sigma(u - tau_t lambda_t)) / tau_t`` (DESIGN section 3,
  ``finite_difference``);
* affine stage: the vjp ``lambda_{t-1} = A^T lambda_t`` (002 eq. 56);
* weights: ``d_t = vjp_w(lambda_t)`` at the *forward* input ``z^*``, i.e. ``lambda_{k+1} (z_k^*)^T``
  (002 Remark 2, eq. 62, not eq. 61): the plain :class:`~moreaugrad.rules.Grad` weight rule.

As ``tau -> 0`` the finite difference tends to the one-sided derivative of ``sigma`` in the direction
``-lambda_t`` (002 Example 1, eq. 17): backprop away from kinks, and at a kink of a ReLU it passes the
signal exactly when the descent direction moves the unit into its live piece. (002 eq. 18 prints the
kink condition as ``l'(z^*)_j >= 0``; the limit in eq. 17 gives ``l'(z^*)_j < 0``, i.e. ``lambda_j < 0``.)
For a finite ``tau`` a dead unit passes a signal as soon as ``u - tau lambda`` crosses the kink, which
is what lets FenBP train networks on which backprop stalls; :class:`AdaptiveSpacing` picks ``tau`` per
sample and per unit for exactly that.

Spacing units: moreaugrad's objectives average over the batch, so ``lambda_t`` of one sample is
``1/B`` times the per-sample signal ``g = B lambda_t`` of 002 (where ``l`` is one sample's loss). With
``batch_mean=True`` (default) every spacing is read in 002's per-sample units: the target is
``sigma(u - tau g)`` and ``lambda_{t-1} = (sigma(u) - sigma(u - tau g)) / (tau B)``, so a value of
``tau`` means the same thing whatever the batch size. Set ``batch_mean=False`` when ``h`` sums over
the batch.

The surrogate (002 eq. 51) is reported as the rules run: each state (or weight) line returns a
:class:`SurrogateInfo` carrying its stage's term, and :func:`contrastive_surrogate` adds them to the
loss. With Fenchel energies (:func:`fenchel`) its backward recursion is FenBP; with the penalty energies
``E_t = ||x_t - phi_t(x_{t-1})||^2 / 2`` (:func:`contrastive_backprop`) it is backprop (002 eq. 52-54).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import kernels
from ..checks import check_positive
from ..types import Dual, Signal, SolveInfo, StateUpdate, WeightUpdate
from .grad import Grad, regularized
from .registry import LineRule, lookup, register

INF = math.inf

# -- activations ----------------------------------------------------------------------------------


class Monotone(nn.Module):
    """An elementwise non-decreasing activation ``sigma`` given as a callable, as one stage of a chain.

    Put it in the ``nn.Sequential`` where the activation goes; :class:`FiniteDifference` then treats
    it like a built-in activation:

        >>> model = nn.Sequential(nn.Linear(4, 8), Monotone(torch.special.expit), nn.Linear(8, 3))
        >>> clip01 = Monotone(lambda u: u.clamp(0, 1), lower=0.0, upper=1.0)

    Args:
        fn: ``sigma``, applied elementwise: ``fn(u)`` has ``u``'s shape and dtype, and ``s <= t``
            implies ``fn(s) <= fn(t)`` (it is not checked). Keep it out-of-place.
        lower: ``sigma`` is constant on ``(-inf, lower]`` (a dead piece, as ReLU below 0), or ``-inf``.
        upper: ``sigma`` is constant on ``[upper, inf)`` (a saturated piece), or ``inf``.
            :class:`AdaptiveSpacing` uses ``lower`` and ``upper`` to revive units stuck on a flat
            piece; without them it uses its base spacing everywhere.

    The surrogate's Fenchel-Young gap (002 eq. 55) is computed by Gauss-Legendre quadrature of
    ``int_v^u (sigma(s) - sigma(v)) ds`` (16 nodes per unit length of ``u - v``, at most 32 panels):
    exact to rounding for a smooth ``fn``, approximate across a kink.
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], lower: float = -INF, upper: float = INF):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"Monotone: fn must be callable, got {type(fn).__name__}")
        for name, value in (("lower", lower), ("upper", upper)):
            if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
                raise ValueError(f"Monotone: {name} must be a number (or +-inf), got {value!r}")
        if not lower < upper:
            raise ValueError(f"Monotone: lower must be < upper, got lower={lower!r}, upper={upper!r}")
        self.fn = fn
        self.lower = float(lower)
        self.upper = float(upper)

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        name = getattr(self.fn, "__name__", repr(self.fn))
        return f"{name}, lower={self.lower}, upper={self.upper}"


@dataclass(frozen=True)
class Profile:
    """What the Fenchel rules need from an elementwise monotone ``sigma``.

    Attributes:
        fn: ``sigma`` (out of place).
        gap: ``D(u, v) = int_v^u (sigma(s) - sigma(v)) ds >= 0`` elementwise: the Fenchel-Young gap
            ``G(sigma(v)) + G^*(u) - sigma(v) u`` of 002 eq. 55 with ``G^* = int sigma``, i.e. the
            Bregman divergence of ``G^*``.
        lower, upper: ``sigma`` is constant on ``(-inf, lower]`` and on ``[upper, inf)``.
        diff: ``(u, delta) -> sigma(u) - sigma(u - delta)`` computed from ``u`` and ``delta`` without
            forming ``u - delta`` and subtracting, or ``None`` for the plain difference (see
            :meth:`difference`).
        gap_sum: ``(u, delta, inc) -> sum D(u, u - delta)`` from the difference ``inc`` already
            taken, or ``None`` to sum ``gap`` (see :meth:`total_gap`).
    """

    fn: Callable[[Tensor], Tensor]
    gap: Callable[[Tensor, Tensor], Tensor]
    lower: float = -INF
    upper: float = INF
    diff: Callable[[Tensor, Tensor], Tensor] | None = None
    gap_sum: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None

    def total_gap(self, u: Tensor, delta: Tensor, inc: Tensor) -> Tensor:
        """``sum D(u, u - delta)`` given ``inc = difference(u, delta)``, by ``gap_sum`` when the
        profile has one (fewer passes), else by ``gap``."""
        if self.gap_sum is not None:
            return self.gap_sum(u, delta, inc)
        return self.gap(u, u - delta).sum()

    def difference(self, u: Tensor, delta: Tensor) -> Tensor:
        """``sigma(u) - sigma(u - delta)`` elementwise.

        The plain difference loses ``eps |sigma(u)| / |sigma(u) - sigma(u - delta)|`` to cancellation,
        about ``eps / tau`` for ``delta = tau g`` (1e-2 in float32 at ``tau = 1e-5``); the closed forms
        in ``diff`` keep the relative error near ``eps``.
        """
        if self.diff is not None:
            return self.diff(u, delta)
        return self.fn(u) - self.fn(u - delta)


def _clip_gap(lo: float, hi: float, slope: float = 1.0) -> Callable[[Tensor, Tensor], Tensor]:
    """``D(u, v)`` for ``sigma = slope * clip(., lo, hi) + const`` without cancellation:
    ``slope (|p - q|^2/2 + (hi - q)(u - hi)_+ + (q - lo)(lo - u)_+)`` with ``p, q`` the clipped
    ``u, v`` (every term is >= 0; the terms in ``v`` beyond the clip vanish)."""

    def gap(u: Tensor, v: Tensor) -> Tensor:
        p, q = u.clamp(lo, hi), v.clamp(lo, hi)
        d = 0.5 * (p - q) ** 2
        if hi < INF:
            d = d + (hi - q) * (u - hi).clamp_min(0)
        if lo > -INF:
            d = d + (q - lo) * (lo - u).clamp_min(0)
        return slope * d

    return gap


_NODES, _WEIGHTS = np.polynomial.legendre.leggauss(16)
_NODES = tuple(float(t) for t in (_NODES + 1) / 2)
_WEIGHTS = tuple(float(w) for w in _WEIGHTS / 2)


def _quadrature_gap(fn: Callable[[Tensor], Tensor],
                    integral: Callable[[Tensor], Tensor] | None = None) -> Callable[[Tensor, Tensor], Tensor]:
    """``D(u, v) = (u - v) int_0^1 (sigma(v + s (u - v)) - sigma(v)) ds`` by Gauss-Legendre on
    ``ceil(max |u - v|)`` panels (at most 32), which is exact to rounding for a smooth ``sigma`` and
    free of the cancellation in ``F(u) - F(v) - sigma(v)(u - v)`` when ``u - v`` is small. With an
    antiderivative ``F`` the closed form is used where ``|u - v| > 1`` instead."""

    def gap(u: Tensor, v: Tensor) -> Tensor:
        h, base = u - v, fn(v)
        long = h.abs() > 1
        panels = 1 if integral is not None else min(32, max(1, math.ceil(h.abs().max().item())))
        acc = torch.zeros_like(u)
        for p in range(panels):
            for s, w in zip(_NODES, _WEIGHTS, strict=True):
                acc = acc + w * (fn(v + ((p + s) / panels) * h) - base)
        d = h * acc / panels
        if integral is None:
            return d
        return torch.where(long, (integral(u) - integral(v) - base * h).clamp_min(0), d)

    return gap


def _piecewise_difference(kinks: Sequence[float],
                          slopes: Sequence[float]) -> Callable[[Tensor, Tensor], Tensor]:
    """``sigma(u) - sigma(u - delta)`` for a continuous piecewise-linear ``sigma`` with slope ``slopes[j]``
    on ``[a_j, b_j] = [kinks[j - 1], kinks[j]]`` (``a_0 = -inf``, ``b_m = inf``): the integral of the
    slopes, ``sign(delta) sum_j slopes[j] |I & [a_j, b_j]|`` over ``I = [u - d, u]`` (``delta >= 0``) or
    ``[u, u + d]`` (``delta < 0``), ``d = |delta|``. The overlap is
    ``clip(min(d, hi - a_j, b_j - lo), 0, b_j - a_j)`` with ``hi - a_j = (u - a_j) + d [delta < 0]`` and
    ``b_j - lo = (b_j - u) + d [delta >= 0]``: built from ``d`` and the distances of ``u`` to the kinks, never
    from the rounded ``u - delta``, so it is exactly ``d`` inside a piece, exactly 0 on a flat one, and
    one-sided at a kink as the plain difference is (002 Example 1).
    """
    edges = (-INF, *kinks, INF)
    pieces = [(a, b, s) for a, b, s in zip(edges[:-1], edges[1:], slopes, strict=True) if s != 0]

    def diff(u: Tensor, delta: Tensor) -> Tensor:
        d = delta.abs()
        down = delta < 0  # I = [u, u + d]
        total = torch.zeros_like(d)
        for a, b, s in pieces:
            length = d
            if a > -INF:
                length = torch.minimum(length, torch.where(down, u - a + d, u - a))
            if b < INF:
                length = torch.minimum(length, torch.where(down, b - u, b - u + d))
            length = length.clamp_min(0) if b - a == INF else length.clamp(0, b - a)
            total = total + s * length
        return torch.where(down, -total, total)

    return diff


def _relu_difference(u: Tensor, delta: Tensor) -> Tensor:
    """``relu(u) - relu(u - delta)`` as :func:`_piecewise_difference` gives it for ReLU, in five
    passes: the overlap of ``I`` with ``[0, inf)`` is ``clip(u + (-delta)_+, 0, |delta|)``, signed
    like ``delta``."""
    inc = delta.clamp_max(0)
    if inc.shape == u.shape and inc.dtype == u.dtype:  # one temporary the size of u, not two
        torch.sub(u, inc, out=inc).clamp_min_(0)
    else:  # delta broadcasts against u
        inc = (u - inc).clamp_min_(0)
    return torch.minimum(inc, delta.abs(), out=inc).copysign_(delta)


def _relu_gap_sum(u: Tensor, delta: Tensor, inc: Tensor) -> Tensor:
    """``sum D(u, u - delta)`` for ReLU: ``D = (p - q)^2/2 + q (-u)_+`` (:func:`_clip_gap` on
    ``[0, inf)``) with ``p = relu(u)``, ``q = relu(u - delta)`` and ``p - q = inc``. Where ``u < 0``,
    ``p = 0`` so ``q = -inc``: the sum is ``||inc||^2/2 + <inc, min(u, 0)>``, two dot products of
    non-negative terms (no cancellation) and one pass to form ``min(u, 0)``."""
    v = inc.reshape(-1)
    return 0.5 * torch.dot(v, v) + torch.dot(v, u.clamp_max(0).reshape(-1))


def _sigmoid_difference(u: Tensor, delta: Tensor) -> Tensor:
    """``sigmoid(u) - sigmoid(u - delta) = sign(delta) (1 - e^{-|delta|}) sigmoid(hi) sigmoid(-lo)``
    with ``hi, lo`` the larger and smaller of ``u, u - delta``: a product of bounded factors, free of
    cancellation and of overflow for any ``u`` and ``delta``."""
    v = u - delta
    return (torch.sign(delta) * -torch.expm1(-delta.abs()) * torch.sigmoid(torch.maximum(u, v))
            * torch.sigmoid(-torch.minimum(u, v)))


def _tanh_difference(u: Tensor, delta: Tensor) -> Tensor:
    """``tanh(u) - tanh(u - delta) = 2 (sigmoid(2u) - sigmoid(2u - 2 delta))``, since
    ``tanh(x) = 2 sigmoid(2x) - 1`` (the doubling is exact)."""
    return 2 * _sigmoid_difference(2 * u, 2 * delta)


def _log_cosh(x: Tensor) -> Tensor:
    a = x.abs()
    return a + F.softplus(-2 * a) - math.log(2.0)


_RELU = Profile(torch.relu, _clip_gap(0.0, INF), 0.0, INF, _relu_difference, _relu_gap_sum)


def profile(module: nn.Module) -> Profile:
    """The :class:`Profile` of an activation stage registered with :class:`FiniteDifference`."""
    if isinstance(module, Monotone):
        return Profile(module.fn, _quadrature_gap(module.fn), module.lower, module.upper)
    if isinstance(module, nn.ReLU):
        return _RELU
    if isinstance(module, nn.LeakyReLU):
        a = float(module.negative_slope)
        if a < 0:
            raise ValueError(f"finite_difference: LeakyReLU negative_slope must be >= 0 for a monotone "
                             f"activation, got {a}")
        if a == 0:
            return _RELU
        relu_gap = _RELU.gap
        return Profile(lambda x: F.leaky_relu(x, a),
                       lambda u, v: 0.5 * a * (u - v) ** 2 + (1 - a) * relu_gap(u, v),
                       diff=_piecewise_difference([0.0], [a, 1.0]))
    if isinstance(module, nn.Hardtanh):  # includes ReLU6
        lo, hi = float(module.min_val), float(module.max_val)
        return Profile(lambda x: F.hardtanh(x, lo, hi), _clip_gap(lo, hi), lo, hi,
                       _piecewise_difference([lo, hi], [0.0, 1.0, 0.0]))
    if isinstance(module, nn.Hardsigmoid):  # clip(u / 6 + 1/2, 0, 1) = clip(u, -3, 3) / 6 + 1/2
        return Profile(F.hardsigmoid, _clip_gap(-3.0, 3.0, 1 / 6), -3.0, 3.0,
                       _piecewise_difference([-3.0, 3.0], [0.0, 1 / 6, 0.0]))
    if isinstance(module, nn.Sigmoid):
        return Profile(torch.sigmoid, _quadrature_gap(torch.sigmoid, F.softplus), diff=_sigmoid_difference)
    if isinstance(module, nn.Tanh):
        return Profile(torch.tanh, _quadrature_gap(torch.tanh, _log_cosh), diff=_tanh_difference)
    raise NotImplementedError(type(module).__name__)  # pragma: no cover - the registry guards it


ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, Monotone)


# -- spacing schedules ----------------------------------------------------------------------------


class Spacing:
    """The spacing ``tau_t`` of 002 Prop. 8, in per-sample units (see the module docstring).

    ``spacing(site, u, g, prof)`` returns a positive float or a tensor broadcastable to ``u``:
    ``u = x_{t-1}``, ``g`` the per-sample signal at ``x_t``, ``prof`` the stage's :class:`Profile`
    (``None`` for a stage that is not an activation). Subclass it for other schedules; keep it pure.
    """

    def __call__(self, site: Any, u: Tensor, g: Tensor, prof: Profile | None) -> float | Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class ConstantSpacing(Spacing):
    """The same ``tau`` on every stage, sample and unit (002 Fig. 1's fixed ``tau_k``)."""

    tau: float = 1.0

    def __post_init__(self) -> None:
        check_positive("ConstantSpacing", "tau", self.tau)

    def __call__(self, site: Any, u: Tensor, g: Tensor, prof: Profile | None) -> float:
        return self.tau


@dataclass(frozen=True)
class StageSpacing(Spacing):
    """Per-stage spacings ``{t: tau_t}`` with ``t`` in ``1..tau`` (the chain's stage index).

    Stages not in ``taus`` use ``default``. :meth:`layers` builds one from a per-layer list.

    Args:
        taus: ``{t: tau_t}``, each ``tau_t > 0``.
        default: the spacing of the other stages (the output layer's ``tau_L`` of 002 eq. 59 when the
            chain ends with an affine stage), or ``None`` to require every visited stage to be listed.
    """

    taus: Mapping[int, float]
    default: float | None = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.taus, Mapping):
            raise TypeError(f"StageSpacing: taus must be a mapping {{t: tau_t}}, got "
                            f"{type(self.taus).__name__}")
        taus = dict(self.taus)
        for t, v in taus.items():
            if isinstance(t, bool) or not isinstance(t, int) or t < 1:
                raise ValueError(f"StageSpacing: stage indices must be integers >= 1, got {t!r}")
            check_positive("StageSpacing", f"taus[{t}]", v)
        check_positive("StageSpacing", "default", self.default, allow_none=True)
        object.__setattr__(self, "taus", taus)

    @classmethod
    def layers(cls, model: nn.Module, taus: Sequence[float], default: float | None = 1.0) -> StageSpacing:
        """``taus[k]`` for the ``k``-th activation child of ``model`` (002's ``tau_1, tau_2, ...``).

        Args:
            model: the ``nn.Sequential`` (or :class:`~moreaugrad.Chain`) the rule will run on.
            taus: one spacing per activation stage that :class:`FiniteDifference` handles, in order.
            default: the spacing of the other stages.
        """
        children = list(getattr(model, "model", model))
        at = [t for t, child in enumerate(children, start=1) if is_activation(child)]
        taus = list(taus)
        if len(taus) != len(at):
            raise ValueError(f"StageSpacing.layers: the model has {len(at)} activation stages (at "
                             f"t = {at}), got {len(taus)} spacings")
        return cls(dict(zip(at, taus, strict=True)), default)

    def __call__(self, site: Any, u: Tensor, g: Tensor, prof: Profile | None) -> float:
        tau = self.taus.get(site.t, self.default)
        if tau is None:
            raise ValueError(f"StageSpacing: no spacing for stage {site.t} ({site.stage.type_name}) "
                             f"and no default; listed stages are {sorted(self.taus)}")
        return tau


@dataclass(frozen=True)
class AdaptiveSpacing(Spacing):
    """Per-sample, per-unit spacing that revives units stuck on a flat piece of ``sigma`` when a
    sample's signal cannot otherwise cross the layer.

    A unit is *stuck* on a sample when ``sigma`` is flat at ``u`` in the descent direction ``-g``:
    below ``lower`` with ``g < 0`` (a dead ReLU asked to grow), or above ``upper`` with ``g > 0`` (a
    saturated hard sigmoid asked to shrink). Backprop, and FenBP with a small spacing, pass nothing
    back through it. When most of a layer is stuck on a sample (all-negative weights, 002 Sec. 5),
    that sample's signal vanishes there: nothing reaches the layers below and the stuck units' weights
    get no direction, so they stay stuck. On such a sample - at most ``max_live`` of the stage's units
    live - this rule gives each stuck unit, at distance ``d`` from its kink, the smallest spacing
    whose target ``u - tau g`` lands far enough beyond the kink for the secant of ``sigma`` over
    ``[u - tau g, u]`` to have ``slope`` times the slope of the live piece:

        ``tau = clip(delta / |g|, tau, tau_max)``,  ``delta = min(d / (1 - slope), d + w)``,

    where ``w = upper - lower`` is the width of the live piece (infinite for ReLU; the second bound
    keeps the target inside the live piece of a hard sigmoid, where the secant is steepest). For a
    ReLU the finite difference then passes ``lambda_{t-1} = slope * lambda_t``: the unit behaves as if
    it had slope ``slope`` in the direction that revives it, whatever its depth ``d``; its weights and
    bias move it toward the kink on that sample and the signal reaches the layers below. ``slope =
    1/2`` puts the target at the mirror image ``2 lower - u``. The cap ``tau_max`` bounds how deep a
    unit may be to be revived (``d <= (1 - slope) tau_max |g|``).

    Every other unit - live, at a kink, pushed further into its flat piece, or stuck on a sample
    whose layer is healthy - gets the base spacing ``tau``, which is close to backprop (exactly
    backprop on the linear pieces of a piecewise-linear ``sigma`` while ``tau |g|`` is below the
    distance to the kink). The ``max_live`` test matters: units that are dead on a given sample are
    how a healthy ReLU network represents it, and reviving them all (``max_live=1``) biases every
    direction (MNIST-1D, Glorot init, 40 epochs: 49% training error against backprop's 15%, while
    ``max_live=0.25`` never fires there and gives 18%). The spacing depends on ``u`` and ``g`` only
    through ``d / |g|`` and the live set, so rescaling the loss does not change which units are
    revived.

    On the all-negative MLP of ``tests/test_fenchel.py`` (digits, 002 Sec. 5) the defaults reach 30%
    training error in 20-24 epochs (seeds 0-7) and at most 0.1% within 40 (``slope=0.5`` or
    ``max_live=1``: 23-26 epochs; ``max_live=0.1``: 26-27).
    The escape from the all-negative weights, not the dead units, sets the pace: backprop on the same
    network with LeakyReLU(0.1), which has no dead units, needs 17 epochs, and no spacing can do much
    better, since a finite difference of a 1-Lipschitz ``sigma`` passes on at most what it receives
    (``|lambda_{t-1}| <= |lambda_t|``).

    Args:
        tau: the base spacing (> 0), per-sample units.
        tau_max: the cap (>= tau; ``math.inf`` allowed), per-sample units.
        slope: the secant slope ``rho`` in (0, 1) asked of a revived unit, relative to the live piece.
        max_live: revive on a sample only when at most this fraction (in [0, 1]) of the stage's units
            are live on it (``lower < u < upper``); 1 revives every stuck unit.

    Stages without flat pieces (LeakyReLU, sigmoid, tanh, a :class:`Monotone` without ``lower`` and
    ``upper``) and non-activation stages get ``tau``.
    """

    tau: float = 0.1
    tau_max: float = 100.0
    slope: float = 0.9
    max_live: float = 0.25

    def __post_init__(self) -> None:
        check_positive("AdaptiveSpacing", "tau", self.tau)
        if isinstance(self.tau_max, bool) or not isinstance(self.tau_max, int | float) \
                or not self.tau_max >= self.tau:
            raise ValueError(f"AdaptiveSpacing: tau_max must be a number >= tau ({self.tau!r}), got "
                             f"{self.tau_max!r}")
        if isinstance(self.slope, bool) or not isinstance(self.slope, int | float) \
                or not 0 < self.slope < 1:
            raise ValueError(f"AdaptiveSpacing: slope must be in (0, 1), got {self.slope!r}")
        if isinstance(self.max_live, bool) or not isinstance(self.max_live, int | float) \
                or not 0 <= self.max_live <= 1:
            raise ValueError(f"AdaptiveSpacing: max_live must be in [0, 1], got {self.max_live!r}")

    def __call__(self, site: Any, u: Tensor, g: Tensor, prof: Profile | None) -> float | Tensor:
        if prof is None or (prof.lower == -INF and prof.upper == INF) or u.dim() == 0:
            return self.tau
        low, high = u < prof.lower, u > prof.upper
        live = (u > prof.lower) & (u < prof.upper)
        share = live.reshape(u.shape[0], -1).to(u.dtype).mean(1).reshape(-1, *[1] * (u.dim() - 1))
        starved = share <= self.max_live
        zero = torch.zeros((), dtype=u.dtype, device=u.device)
        d = torch.where(low & (g < 0) & starved, prof.lower - u, zero)
        d = torch.where(high & (g > 0) & starved, u - prof.upper, d)
        delta = torch.minimum(d / (1 - self.slope), d + (prof.upper - prof.lower))
        # |g| > 0 wherever d > 0; elsewhere delta = 0 and the clamp gives the base spacing.
        tau = delta / g.abs().clamp_min(torch.finfo(u.dtype).tiny)
        return tau.clamp(self.tau, self.tau_max)


def as_spacing(owner: str, tau: float | Spacing) -> Spacing:
    """A :class:`Spacing` from a spacing object or a positive number (validated, naming ``tau``)."""
    if isinstance(tau, Spacing):
        return tau
    check_positive(owner, "tau", tau)
    return ConstantSpacing(tau)


# -- what the rules report ------------------------------------------------------------------------


@dataclass(frozen=True)
class SurrogateInfo(SolveInfo):
    """A :class:`~moreaugrad.SolveInfo` that also carries the stage's share of 002 eq. 51.

    Attributes:
        term: this stage's term of the linearised local contrastive surrogate, summed over the batch
            (a detached 0-dim tensor), or ``None`` when the stage has none or reporting is off.
        target: ``xbar_t``, the target of the stage's output ``x_t`` (002 eq. 50), or ``None`` (FenBP
            keeps it only with ``fenchel(..., targets=True)``).
        spacing: the spacing used, per-sample units (a float or a tensor shaped like ``x_{t-1}``).
    """

    term: Tensor | None = None
    target: Tensor | None = None
    spacing: float | Tensor | None = None


def contrastive_surrogate(result: Any) -> Tensor:
    """The linearised local contrastive surrogate ``Lbar^tau`` of 002 Prop. 8 (eq. 51) at the
    current weights, from an :class:`~moreaugrad.OracleResult` of a :func:`fenchel` or
    :func:`contrastive_backprop` rule: ``result.loss`` plus the terms its stages reported.

    With Fenchel energies (002 eq. 57) each activation stage ``t`` contributes
    ``<xbar_t - x_t^*, lambda_t> + sum D(u, u - tau g) / (tau B)`` (the linearisation term and the
    Fenchel-Young gap of eq. 55); affine stages are hard constraints folded into the next energy
    (term 0), except an affine output stage, whose identity activation adds ``-tau B ||lambda_tau||^2 / 2``
    (002 eq. 59). With penalty energies every stage adds ``-tau_t B ||lambda_t||^2 / 2`` (002 eq. 52-54).
    Every term is <= 0, so ``Lbar <= h``, and ``Lbar -> h`` as ``tau -> 0``. ``result.loss`` includes
    the regularisers ``r_t`` when the oracle has them.

    A stage the sweep does not visit reports nothing: a parameterless first stage on a data input
    (it does not affect the directions).
    """
    terms = [i.term for stage in result.info for i in (stage.state, stage.weight)
             if isinstance(i, SurrogateInfo) and i.term is not None]
    if not terms:
        raise ValueError("contrastive_surrogate: the result carries no surrogate terms; compute it with "
                         "mg.rules.fenchel(...) or mg.rules.contrastive_backprop(...)")
    return result.loss + torch.stack(terms).sum()


# -- the rules ------------------------------------------------------------------------------------


def _per_sample(batch_mean: bool, u: Tensor) -> int:
    """``B``: how much larger one sample's signal is than its share of a batch-mean objective."""
    return u.shape[0] if batch_mean and u.dim() > 0 else 1


def _output_term(site: Any, lam: Tensor, tau: float | Tensor, n: int) -> tuple[Tensor, Tensor]:
    """A quadratic energy ``||x_t - phi_t(x_{t-1})||^2 / 2`` on the output ``x_t`` (002 eq. 53):
    ``xbar_t = x_t^* - tau n lambda_t`` and the term ``-tau n ||lambda_t||^2 / 2``."""
    x = site.x.detach()
    return -0.5 * n * (tau * lam * lam).sum(), x - (tau * n) * lam


@dataclass(frozen=True)
class FiniteDifference(LineRule):
    """The ``finite_difference`` state rule of Fenchel back-propagation (002 Sec. 4.2.2, eq. 59-60).

    On an elementwise monotone activation ``x_t = sigma(x_{t-1})`` (ReLU, LeakyReLU, Hardtanh and
    ReLU6, Hardsigmoid, Sigmoid, Tanh, :class:`Monotone`), with ``u = x_{t-1}`` and the per-sample
    signal ``g = B lambda_t``:

        ``xbar_t = sigma(u - tau g)``,  ``lambda_{t-1} = (sigma(u) - xbar_t) / (tau B)``

    (``B = 1`` with ``batch_mean=False``), with ``sigma(u) - xbar_t`` computed from ``u`` and
    ``tau g`` by :meth:`Profile.difference`, free of cancellation at small ``tau`` in float32 (and
    exact on the linear pieces). It tends to the vjp as ``tau -> 0``, equals it on the
    linear pieces of a piecewise-linear ``sigma`` once ``|tau g|`` is below the distance to the
    kink, and is one-sided at a kink (002 Example 1). Every other stage keeps its vjp
    ``lambda_{t-1} = d_x phi_t^T lambda_t``: exact for affine stages, which are the coupling
    ``z_k^T W_{k-1} z_{k-1}`` of the Fenchel energy (002 eq. 56). A grouped stage such as
    ``Sequential(Linear, ReLU)`` is not an activation and gets backprop's vjp: list the linear map
    and the activation as separate children to get FenBP.

    Args:
        spacing: ``tau``: a positive number (:class:`ConstantSpacing`) or a :class:`Spacing`
            (:class:`StageSpacing`, :class:`AdaptiveSpacing`), per-sample units.
        batch_mean: read spacings per sample (see the module docstring).
        surrogate: report each stage's term of 002 eq. 51 in a :class:`SurrogateInfo` (three dot
            products and one elementwise pass per activation); turn off to skip them.
        targets: also keep each activation's target ``xbar_t`` in :attr:`SurrogateInfo.target`:
            one tensor the size of the activation per stage, held as long as the result is, so
            off by default (FenBP's memory is then that of backprop).
    """

    spacing: Spacing | float = 1.0
    batch_mean: bool = True
    surrogate: bool = True
    targets: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", as_spacing("finite_difference", self.spacing))


@register(FiniteDifference, "state", *ACTIVATIONS)
def activation_state(rule: FiniteDifference, site: Any, signal: Signal) -> StateUpdate:
    """``lambda_{t-1} = (sigma(u) - sigma(u - tau g)) / (tau B)``, with the stage's term of 002 eq. 57:
    ``<xbar_t - x_t, lambda_t> + sum D(u, u - tau g) / (tau B)``."""
    prof = profile(site.stage.module)
    u, z = site.x_prev.detach(), site.x.detach()
    lam = signal.dual(z)
    n = _per_sample(rule.batch_mean, u)
    if type(rule.spacing) is ConstantSpacing:  # g is not read: skip forming it (not a subclass)
        tau: float | Tensor = rule.spacing.tau
        if prof is _RELU and not rule.targets and lam.shape == u.shape and u.dim() > 0:
            if kernels.compiling():
                out, term = kernels.fenbp_relu(u, lam, tau * n, rule.surrogate)  # one fused loop
            else:
                out, term = _relu_in_blocks(u, lam, tau * n, rule.surrogate)
            return StateUpdate(Dual(out), SurrogateInfo("finite difference", term=term, spacing=tau))
        delta = (tau * n) * lam
    else:
        g = lam * n if n != 1 else lam
        tau = rule.spacing(site, u, g, prof)
        delta = tau * g
    # The increment z - zbar itself: forming zbar and subtracting it from z again cancels at small tau.
    inc = prof.difference(u, delta)
    zbar = z - inc if rule.targets else None
    term = None
    if rule.surrogate:
        dot = -torch.dot(inc.reshape(-1), lam.reshape(-1))
        if isinstance(tau, Tensor):  # a spacing per unit: D is weighted entry by entry
            term = dot + (prof.gap(u, u - delta) / (tau * n)).sum()
        else:
            term = dot + prof.total_gap(u, delta, inc) / (tau * n)
    # inc is this rule's own fresh tensor, read for the last time: divide it in place.
    out = inc.div_(tau * n) if isinstance(tau, float | int) else inc / (tau * n)
    return StateUpdate(Dual(out), SurrogateInfo("finite difference", term=term, target=zbar, spacing=tau))


def _relu_in_blocks(u: Tensor, lam: Tensor, c: float, surrogate: bool) -> tuple[Tensor, Tensor | None]:
    """FenBP on a ReLU with the spacing ``c = tau n``: ``lambda_{t-1} = inc / c`` and the stage's
    surrogate term, ``-<inc, lam> + sum D / c``, block by block (:func:`kernels.blocks`), so that
    the chain of passes stays in cache; the term sums the blocks' terms."""

    def step(us: Tensor, ls: Tensor) -> tuple[Tensor, Tensor | None]:
        delta = c * ls
        inc = _relu_difference(us, delta)
        if not surrogate:
            return inc, None
        return inc, -torch.dot(inc.reshape(-1), ls.reshape(-1)) + _relu_gap_sum(us, delta, inc) / c

    if kernels.row_blocks(u) >= u.shape[0]:  # one block: the increment becomes the signal in place
        inc, term = step(u, lam)
        return inc.div_(c), term
    out, terms = torch.empty_like(u), []
    for us, ls, block in kernels.blocks(u, lam, out):
        inc, term = step(us, ls)
        terms.append(term)
        torch.div(inc, c, out=block)
    return out, torch.stack(terms).sum() if surrogate else None


@register(FiniteDifference, "state")
def affine_state(rule: FiniteDifference, site: Any, signal: Signal) -> StateUpdate:
    """``lambda_{t-1} = d_x phi_t^T lambda_t`` (002 eq. 56); an output stage reports the identity
    activation's term of 002 eq. 59."""
    lam = signal.dual(site.x.detach())
    dx, _ = site.vjp(lam, weights=False)
    if not (rule.surrogate and site.t == site.horizon):
        return StateUpdate(Dual(dx), SurrogateInfo("vjp"))
    u = site.x_prev.detach()
    n = _per_sample(rule.batch_mean, u)
    tau = rule.spacing(site, u, lam * n, None)
    term, target = _output_term(site, lam, tau, n)
    return StateUpdate(Dual(dx), SurrogateInfo("vjp", term=term, target=target if rule.targets else None,
                                               spacing=tau))


def _affine_vjp_at(rule: FiniteDifference, stage: Any, horizon: int | None) -> bool:
    """``affine_state`` is the plain vjp, and may fuse with its neighbours, except at the output
    stage when the surrogate's term is asked for (it reads the stage's signal)."""
    return horizon is not None and not (rule.surrogate and stage.index + 1 == horizon)


affine_state.vjp_at = _affine_vjp_at  # type: ignore[attr-defined]


def is_activation(module: nn.Module) -> bool:
    """Whether :class:`FiniteDifference` applies its finite difference to this stage type."""
    return lookup(FiniteDifference(), "state", module) is activation_state


@dataclass(frozen=True)
class PenaltyEnergy(LineRule):
    """The linearised local contrastive surrogate with penalty energies
    ``E_t(x_t, x_{t-1}) = ||x_t - phi_t(w_t, x_{t-1})||^2 / 2`` (002 Sec. 4.2.1), on the state and
    weight lines of any stage.

    Its targets are ``xbar_t = x_t^* - tau_t B lambda_t`` and its signals
    ``lambda_{t-1} = d_x phi_t^T (x_t^* - xbar_t) / (tau_t B) = d_x phi_t^T lambda_t`` (002 eq. 52-53):
    the recursion ``eps_{t-1} = (tau_{t-1} / tau_t) phi_t'^T eps_t`` of eq. 54 for
    ``eps_t = xbar_t - x_t^*``, i.e. backprop, whatever the spacings. The weight direction is
    ``d_w E_t(xbar_t, x_{t-1}^*) / (tau_t B) = vjp_w(lambda_t)`` (as 002 eq. 62), plus ``grad r_t``.
    Each stage reports the term ``-tau_t B ||lambda_t||^2 / 2`` once: on the weight line when it
    has weights, else on the state line.

    Args:
        spacing: a positive number or a :class:`Spacing` (an adaptive one gives its base spacing).
        batch_mean: read spacings per sample (see the module docstring).
        step: the weight step of ``Oracle.step``.
    """

    spacing: Spacing | float = 1.0
    batch_mean: bool = True
    step: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "spacing", as_spacing("contrastive_backprop", self.spacing))
        check_positive("contrastive_backprop", "step", self.step)

    def _report(self, site: Any, lam: Tensor, method: str) -> SurrogateInfo:
        u = site.x_prev.detach()
        n = _per_sample(self.batch_mean, u)
        tau = self.spacing(site, u, lam * n, None)
        term, target = _output_term(site, lam, tau, n)
        return SurrogateInfo(method, term=term, target=target, spacing=tau)


@register(PenaltyEnergy, "state")
def penalty_state(rule: PenaltyEnergy, site: Any, signal: Signal) -> StateUpdate:
    """``lambda_{t-1} = d_x phi_t^T lambda_t`` (002 eq. 52-54)."""
    lam = signal.dual(site.x.detach())
    dx, _ = site.vjp(lam, weights=False)
    info = SurrogateInfo("vjp") if site.stage.has_weights else rule._report(site, lam, "vjp")
    return StateUpdate(Dual(dx), info)


@register(PenaltyEnergy, "weight")
def penalty_weight(rule: PenaltyEnergy, site: Any, signal: Signal) -> WeightUpdate:
    """``d_t = d_w phi_t^T lambda_t + grad r_t(w_t)``, with the stage's surrogate term."""
    lam = signal.dual(site.x.detach())
    _, dw = site.vjp(lam)
    return WeightUpdate(regularized(site, dw), rule.step, rule._report(site, lam, "vjp"))


# -- presets --------------------------------------------------------------------------------------


def fenchel(tau: float | Spacing = 1.0, *, batch_mean: bool = True, step: float = 1.0,
            surrogate: bool = True, targets: bool = False) -> Any:
    """Fenchel back-propagation (002 Sec. 4.2.2): ``grad`` objective, :class:`FiniteDifference`
    states (finite differences on activations, vjps on affine stages) and ``grad`` weights at the
    forward states (002 eq. 62).

    Args:
        tau: the spacing: a number (the same ``tau_k`` everywhere, 002 Fig. 1), a
            :class:`StageSpacing` (per layer), or an :class:`AdaptiveSpacing` (per sample and unit).
        batch_mean: read spacings per sample (see the module docstring).
        step: the weight step of ``Oracle.step``; ``Oracle.backward`` ignores it.
        surrogate: report the terms of 002 eq. 57 for :func:`contrastive_surrogate`.
        targets: keep each activation's target ``xbar_t`` in its :class:`SurrogateInfo` (memory:
            one activation-sized tensor per stage).

    Example:
        >>> oracle = mg.Oracle(chain, mg.losses.CrossEntropy(), mg.rules.fenchel(AdaptiveSpacing()))
        >>> result = oracle.backward(x, y); mg.rules.contrastive_surrogate(result)
    """
    from . import Rule

    return Rule(objective=Grad(), state=FiniteDifference(as_spacing("fenchel", tau), batch_mean, surrogate,
                                                         targets), weight=Grad(step))


def contrastive_backprop(tau: float | Spacing = 1.0, *, batch_mean: bool = True, step: float = 1.0) -> Any:
    """Back-propagation read as the linearised local contrastive surrogate with penalty energies
    (002 Sec. 4.2.1, eq. 52-54): backprop's directions, with the surrogate's targets and terms
    reported for :func:`contrastive_surrogate`.

    Args:
        tau: the spacings ``tau_t`` (a number or a :class:`Spacing`); they scale the targets only.
        batch_mean: read spacings per sample (see the module docstring).
        step: the weight step of ``Oracle.step``.
    """
    from . import Rule

    rule = PenaltyEnergy(as_spacing("contrastive_backprop", tau), batch_mean, step)
    return Rule(objective=Grad(), state=rule, weight=rule)
