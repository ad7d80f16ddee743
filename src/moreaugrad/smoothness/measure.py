"""Measured lower bounds on the constants that :func:`~.estimate.estimate` bounds from above.

On the same product of balls ``C = {w: ||v_l - v_l*|| <= R}`` (one ball per module with
parameters, centered at 0 or at ``around``) and the same input batch ``x``:

* ``m``: the largest ``||psi(w)||`` over sampled ``w in C``;
* ``l``: the largest secant ratio ``||psi(w + h d) - psi(w - h d)|| / (2 h ||d||)`` with both points
  in ``C``, along the top right singular vector ``d`` of the Jacobian at ``w`` (power iteration
  on ``J^T J`` by ``torch.func.jvp``/``vjp``), and between pairs of sampled points;
* ``L``: the largest ``||grad^2 psi(w)[a, a, .]||`` over unit ``a``, found by alternating power
  iteration (``c = grad^2 psi[a, a, .] / ||.||``, then ``a <- grad^2 <c, psi>(w) a``, a
  Hessian-vector product by forward-over-reverse ``jvp`` of a ``vjp``); since
  ``||grad psi(w + t a) - grad psi(w)||_{2,2} >= t ||grad^2 psi(w)[a, a, .]|| + o(t)``, it is a
  lower bound on ``L_psi`` over ``C``;
* with a loss: ``|a^T grad^2 F(w) a|`` for the top eigenvector ``a`` of the Hessian of
  ``F = f o psi + r`` (power iteration), a lower bound on ``L_F``.

Every value is attained by the network, so it can never exceed a valid upper bound.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vjp

from ..chain import Chain
from ..lstsq import _load_forward_ad
from .estimate import _center, leaves

Params = dict[str, Tensor]


@dataclass(frozen=True)
class Measurement:
    """Lower bounds attained by the network on the balls (see the module docstring).

    Attributes:
        output: max sampled ``||psi(w)||`` (vs ``m_psi``).
        lipschitz: max secant ratio (vs ``l_psi``).
        smoothness: max ``||grad^2 psi(w)[a, a, .]||`` (vs ``L_psi``).
        objective_smoothness: max ``|a^T grad^2 F(w) a|`` (vs ``L_F``), None without a loss.
        points: the number of sampled points.
    """

    output: float
    lipschitz: float
    smoothness: float
    objective_smoothness: float | None
    points: int


def _without_running_stats(model: nn.Module) -> nn.Module:
    """A copy whose train-mode batch-norms keep no running statistics: the forward pass is the same
    function of the weights, and no buffer is written inside a ``torch.func`` transform."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.training and m.track_running_stats]
    if not bns:
        return model
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training:
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


def _dot(a: Params, b: Params) -> Tensor:
    return sum((a[k] * b[k]).sum() for k in a)


def _scale(a: Params, s: Tensor | float) -> Params:
    return {k: v * s for k, v in a.items()}


def _axpy(w: Params, s: float, d: Params) -> Params:
    return {k: w[k] + s * d[k] for k in w}


def _unit(a: Params) -> Params:
    n = _dot(a, a).sqrt()
    return _scale(a, 1.0 / n) if n > 0 else a


def measure(model: nn.Module, x: Tensor, *, radius: float = 1.0, around: Any = None, loss: Any = None,
            target: Any = None, regularizer: Any = None, points: int = 4, iterations: int = 20,
            seed: int = 0) -> Measurement:
    """Lower bounds on ``m_psi``, ``l_psi``, ``L_psi`` (and ``L_F`` with a loss) of ``w -> psi(w) =
    model(x)`` on the balls of :func:`~.estimate.estimate` with the same ``radius`` and ``around``.

    Args:
        model: the network (as for :func:`~.estimate.estimate`), on a real device.
        x: the input batch; compare with ``estimate(model, x.shape[1:], batch=len(x),
            input_norm=x.norm())``. Use float64 for tight values.
        loss, target, regularizer: ``F = loss(psi(w), target) + sum_p regularizer(p)``.
        points: sampled points of ``C`` (the first is the center).
        iterations: power iterations per point.
        seed: seeds the sampling (the global generator is untouched).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"smoothness.measure: x must be a tensor, got {type(x).__name__}")
    if isinstance(radius, bool) or not isinstance(radius, int | float) or not math.isfinite(radius) \
            or radius < 0:
        raise ValueError(f"smoothness.measure: radius must be a finite number >= 0, got {radius!r}")
    if loss is None and regularizer is not None:
        raise ValueError("smoothness.measure: a regularizer needs a loss")
    for field, value in (("points", points), ("iterations", iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"smoothness.measure: {field} must be an int >= 1, got {value!r}")
    items = leaves(model)
    root = model.model if isinstance(model, Chain) else model
    groups: list[list[str]] = []
    for _, name, module in items:
        names = [f"{name}.{p}" if name else p for p, _ in module.named_parameters()]
        if names:
            groups.append(names)
    all_params = dict(root.named_parameters())
    center_map = _center(around, root)
    center: Params = {}
    for names in groups:
        for n in names:
            p = all_params[n]
            if p.dtype != x.dtype:
                raise TypeError(f"smoothness.measure: parameter {n} is {p.dtype} but x is {x.dtype}")
            c = center_map.get(n, center_map.get(f"model.{n}")) if center_map is not None else None
            if center_map is not None and c is None:  # as estimate(): the balls must be the same
                raise ValueError(f"smoothness.measure: around has no entry for parameter {n!r} (its "
                                 f"keys are the model's named_parameters())")
            center[n] = torch.zeros_like(p.detach()) if c is None else c.detach().to(p.dtype).clone()
    net = _without_running_stats(root)
    _load_forward_ad()

    def psi(w: Params) -> Tensor:
        return functional_call(net, w, (x,)).reshape(-1)

    def objective(w: Params) -> Tensor:
        val = loss(functional_call(net, w, (x,)), target)
        if regularizer is not None:
            val = val + sum(regularizer(v) for v in w.values())
        return val

    gen = torch.Generator(device=x.device).manual_seed(seed)

    def randn_like(w: Params) -> Params:
        return {k: torch.randn(v.shape, generator=gen, device=v.device, dtype=v.dtype) for k, v in w.items()}

    R = float(radius)
    samples: list[Params] = [dict(center)]
    for _ in range(points - 1):
        u = randn_like(center)
        w = {}
        for names in groups:
            nrm = math.sqrt(sum(float(u[n].pow(2).sum()) for n in names))
            rho = 0.9 * R * float(torch.rand((), generator=gen, dtype=torch.float64))
            for n in names:
                w[n] = center[n] + u[n] * (rho / nrm if nrm > 0 else 0.0)
        samples.append(w)
    # Secants of length 2h stay in C: every sampled group is within 0.9 R of its center, and
    # ||h d_g|| <= h = 0.05 R. At R = 0 the ball is a point: h is tiny and the ratio is local.
    h = 0.05 * R if R > 0 else 1e-6

    out_max = lip = smooth = 0.0
    obj: float | None = None if loss is None else 0.0
    for w in samples:
        with torch.no_grad():
            out_max = max(out_max, float(psi(w).norm()))
        lip = max(lip, _secant(psi, w, randn_like(center), iterations, h))
        smooth = max(smooth, _curvature(psi, w, randn_like(center), iterations))
        if loss is not None:
            obj = max(obj, _hessian_norm(objective, w, randn_like(center), iterations))
    for a, b in zip(samples[1:], samples[2:], strict=False):
        with torch.no_grad():
            diff = math.sqrt(sum(float((a[k] - b[k]).pow(2).sum()) for k in a))
            if diff > 0:
                lip = max(lip, float((psi(a) - psi(b)).norm()) / diff)
    return Measurement(out_max, lip, smooth, obj, len(samples))


def _secant(psi: Callable[[Params], Tensor], w: Params, d: Params, iterations: int, h: float) -> float:
    """Power iteration on ``J^T J`` for the top right singular vector ``d``, then the secant ratio
    along it."""
    d = _unit(d)
    for _ in range(iterations):
        _, jd = jvp(psi, (w,), (d,))
        _, back = vjp(psi, w)
        (d_new,) = back(jd)
        if float(_dot(d_new, d_new)) == 0:
            break
        d = _unit(d_new)
    with torch.no_grad():
        return float((psi(_axpy(w, h, d)) - psi(_axpy(w, -h, d))).norm()) / (2 * h)


def _curvature(psi: Callable[[Params], Tensor], w: Params, a: Params, iterations: int) -> float:
    """Alternating power iteration for ``max ||grad^2 psi(w)[a, a, .]||`` over unit ``a``."""

    def second(a: Params) -> Tensor:
        return jvp(lambda p: jvp(psi, (p,), (a,))[1], (w,), (a,))[1]

    a = _unit(a)
    best = 0.0
    for _ in range(iterations):
        s = second(a)
        ns = float(s.norm())
        best = max(best, ns)
        if ns == 0:
            break
        c = s / ns
        ha = jvp(lambda p, c=c: vjp(psi, p)[1](c)[0], (w,), (a,))[1]
        best = max(best, abs(float(_dot(a, ha))))
        if float(_dot(ha, ha)) == 0:
            break
        a = _unit(ha)
    return best


def _hessian_norm(fun: Callable[[Params], Tensor], w: Params, a: Params, iterations: int) -> float:
    """Power iteration on the Hessian of a scalar function: ``max |a^T H a|`` over the iterates."""
    g = grad(fun)
    a = _unit(a)
    best = 0.0
    for _ in range(iterations):
        ha = jvp(g, (w,), (a,))[1]
        best = max(best, abs(float(_dot(a, ha))))
        if float(_dot(ha, ha)) == 0:
            break
        a = _unit(ha)
    return best
