"""Generic inner solvers for the proximal subproblems of the rules (DESIGN section 4; 000 App. E.2.1).

Every subproblem has the form ``min_z F(z)`` where ``z`` is a list of tensors and ``F`` returns one
value per *group*: ``G = B`` groups (one per sample) for problems that separate over the batch
(every state rule on a stage that does not mix samples), ``G = 1`` otherwise. Step sizes, line
searches and convergence are per group, with no Python loop over samples. The per-group values
are tensors of shape ``(G,)`` (:class:`Tensors`), or, for one group on the CPU, numpy scalars
(:class:`Scalars`): the same arithmetic without a tensor operation per scalar.

Each solver has one method ``solve(fun, z0, start=None, scale=None) -> (z, SolveInfo)`` and reports
its iterations, the final residual ``max_g ||grad_g F||`` and whether it met its tolerance.

Tolerances are relative, never absolute: a group has converged when ``||grad_g F(z)|| <= tol_g`` with
``tol_g = max(tol, RTOL_FLOOR eps) * scale_g`` (``tol = 0``: none) and ``scale_g = ||grad_g F(z0)||``
(or the ``scale`` the caller passes, e.g. the gradient at 0 for a warm start). A small problem (a
small step, a small signal) is therefore solved as accurately as a large one, and no solve stops at
iteration 0 because its tolerance exceeds its starting residual; ``eps`` is the dtype's, so a
float32 solve asks for what float32 can resolve. It stops early on a
non-finite iterate or on a witness that the subproblem is not strongly convex (non-positive
curvature ``<s, grad F(z + s) - grad F(z)>`` along a step), and says so in ``SolveInfo.message``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

from .checks import check_count
from .types import SolveInfo

Objective = Callable[[list[Tensor]], Tensor]  # z -> per-group values, shape (G,)

NOT_CONVEX = "subproblem not strongly convex: negative curvature along a step"
# Curvature <s, dg> counts as negative only below -CURVATURE_NOISE |s| |dg|: near convergence both
# are at rounding level and their inner product has no sign worth trusting.
CURVATURE_NOISE = 1e-6


def negative_curvature(v: Values, s: Sequence[Tensor], y: Sequence[Tensor], z: Sequence[Tensor],
                       sy: Any, ss: Any) -> Any:
    """Per group, whether ``<s, y> < -CURVATURE_NOISE |s| |y|`` along a step ``s`` from ``z`` that is
    not at rounding level (``|s| > sqrt(eps) (1 + |z|)``): a witness of non-convexity. ``sy`` and
    ``ss`` are ``<s, y>`` and ``<s, s>``, per-group values of ``v``."""
    yy = v.dot(y, y)
    unit = 1 + v.sqrt(v.dot(z, z))
    resolved = ss > _eps(ss) * (unit * unit)  # a product: numpy's ** 2 and torch's pow differ by an ulp
    return resolved & (sy < -CURVATURE_NOISE * v.sqrt(ss * yy))


def _inverse_curvature(v: Values, curv: Any) -> Any:
    """``1 / curv`` where the curvature is positive, else 0 (the pair drops out of L-BFGS)."""
    usable = curv > 0
    return v.where(usable, 1.0 / v.where(usable, curv, v.full(curv, 1.0)), v.full(curv, 0.0))


RTOL_FLOOR = 64  # the smallest relative tolerance, in units of the dtype's eps


def tolerance(tol: float, scale: Tensor) -> Tensor:
    """Per group, ``max(tol, RTOL_FLOOR eps) * scale``: the stopping threshold of a relative test
    (``tol = 0`` asks for exactly 0: run to the iteration cap)."""
    if tol == 0:
        return type(scale)(0) if isinstance(scale, np.floating) else torch.zeros_like(scale)
    return max(tol, RTOL_FLOOR * _eps(scale)) * scale


def unit_of(tensors: Sequence[Tensor]) -> float:
    """A power of 2 near the largest ``|entry|`` when that is outside ``[2^-20, 2^20]``, else 1: a
    unit to compute a linear (or homogeneous) problem in, exactly, so that squares of a tiny signal
    (one decayed over many stages) do not underflow in float32."""
    m = max((float(t.detach().abs().max()) for t in tensors if t.numel()), default=0.0)
    if m == 0 or not math.isfinite(m) or 2.0 ** -20 < m < 2.0 ** 20:
        return 1.0
    return 2.0 ** math.floor(math.log2(m))


def rounding_slack(f: Any) -> Any:
    """Decreases below the rounding of ``f`` (a tensor or a per-group value of :class:`Scalars`)
    carry no sign; line searches accept them."""
    return 16 * _eps(f) * (1 + abs(f))


def _eps(v: Any) -> float:
    """The machine epsilon of a tensor's or a numpy scalar's dtype."""
    return float(np.finfo(v.dtype).eps) if isinstance(v, np.floating) else torch.finfo(v.dtype).eps


NON_FINITE = "non-finite iterate"
CAP = "iteration cap reached before the tolerance"
FIXED = "fixed step count, not checked"  # the start of a fixed-step solve's message (tol=None)


def _check(owner: str, tol: float, max_iter: int) -> None:
    check_count(owner, "max_iter", max_iter)
    if not isinstance(tol, int | float) or not tol >= 0:
        raise ValueError(f"{owner}: tol must be a number >= 0, got {tol!r}")


def gdot(a: Sequence[Tensor], b: Sequence[Tensor], groups: int) -> Tensor:
    """Per-group inner product ``<a_g, b_g>``, shape ``(G,)``.

    Reduces without an elementwise temporary where it matters (a dot or a batched matmul): on a
    2-core CPU ``(x * y).sum()`` over a 256x784 weight costs 15x a ``torch.dot``.
    """
    pairs = iter(zip(a, b, strict=True))
    x, y = next(pairs)
    out = _dot(x, y, groups)
    for x, y in pairs:  # no Python sum: its 0 + tensor is one more op per call
        out = out + _dot(x, y, groups)
    return out


def _dot(x: Tensor, y: Tensor, groups: int) -> Tensor:
    if groups == 1:
        return torch.dot(x.reshape(-1), y.reshape(-1)).reshape(1)
    # One fused reduction per group (a batched matmul of 1 x n by n x 1 products runs 5x slower).
    return torch.linalg.vecdot(x.reshape(groups, -1), y.reshape(groups, -1))


def gscale(s: Tensor, z: Tensor, groups: int) -> Tensor:
    """Broadcast a per-group scalar ``s`` (shape ``(G,)``) against a tensor ``z``."""
    return s.reshape(()) if groups == 1 else s.reshape(-1, *([1] * (z.dim() - 1)))


def axpy(z: Sequence[Tensor], s: Tensor, d: Sequence[Tensor], groups: int) -> list[Tensor]:
    """``z + s * d`` with a per-group step ``s``, in one pass per tensor (``addcmul``)."""
    return [torch.addcmul(x, gscale(s, y, groups), y) for x, y in zip(z, d, strict=True)]


@dataclass(frozen=True)
class Proximal:
    """``F(z) = data(z) + ||z_g||^2/2`` per group, the form of every proximal subproblem: called, it
    is ``F``; :func:`value_and_grad` takes autograd through ``data`` alone and adds ``z`` itself,
    the proximal term's gradient, in one pass (its autograd would cost three over ``z``)."""

    data: Objective
    groups: int

    def __call__(self, z: list[Tensor]) -> Tensor:
        return self.data(z) + 0.5 * gdot(z, z, self.groups)


@dataclass(frozen=True)
class Pairing:
    """``data(z) = scale <lam, out(z) - offset>`` per group: the data term of a state problem,
    ``gamma <lam, phi_t(w, x + y) - x_t>`` (000 Prop. 2.2). :func:`value_and_grad` takes its
    gradient as ``scale`` times one vjp of ``out`` with ``lam``, not through the pairing's own
    operations: the same gradient (to rounding; bit for bit for a power-of-2 ``scale``) with fewer
    autograd nodes, which on a small state (the pendulum's) cost as much as the step itself.
    ``lam`` and ``offset`` have the shape of ``out(z)``."""

    out: Objective
    lam: Tensor
    offset: Tensor
    scale: float
    groups: int

    def __call__(self, z: list[Tensor]) -> Tensor:
        return self.scale * gdot([self.lam], [self.out(z) - self.offset], self.groups)

    def value_and_grad(self, z: list[Tensor]) -> tuple[Tensor, tuple[Tensor | None, ...]]:
        """``data(z)`` and its gradient (None for a tensor ``out`` does not depend on); ``z``
        requires grad."""
        out = self.out(z)
        with torch.no_grad():
            value = self.scale * gdot([self.lam], [out - self.offset], self.groups)
        if not out.requires_grad:
            return value, (None,) * len(z)
        # The backward starts from out's edge with lam itself, out let go and the scale applied
        # after: out, or a scaled copy of lam, would be held for the whole backward (one activation
        # more at the peak of a large stage). A power-of-2 scale (1, 0.5) commutes with every
        # rounding: then the gradient is autograd's through the pairing bit for bit.
        edge = get_gradient_edge(out)
        del out
        grads = torch.autograd.grad(edge, z, self.lam, allow_unused=True)
        unit = isinstance(self.scale, int | float) and self.scale == 1
        return value, tuple(None if g is None else g if unit else g * self.scale for g in grads)


def value_and_grad(fun: Objective, z: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """``F(z)`` per group and ``grad F(z)``; separability makes ``grad sum_g F_g`` per-group exact."""
    proximal = isinstance(fun, Proximal)
    with torch.enable_grad():
        zz = [x.detach().requires_grad_(True) for x in z]
        if proximal and isinstance(fun.data, Pairing):
            f, grads = fun.data.value_and_grad(zz)
        else:
            f = (fun.data if proximal else fun)(zz)
            grads = torch.autograd.grad(f.sum(), zz, allow_unused=True)
    f = f.detach()
    if proximal:
        zd = [x.detach() for x in z]
        return f + 0.5 * gdot(zd, zd, fun.groups), [x.clone() if g is None else g + x
                                                    for x, g in zip(zd, grads, strict=True)]
    return f, [torch.zeros_like(x) if g is None else g for x, g in zip(zz, grads, strict=True)]


def _finite(*ts: Tensor) -> bool:
    """Whether every entry of every tensor is finite, with one host sync: the sum of the sums is
    finite unless an entry is not (or the sum overflows, then entry by entry decides)."""
    total = ts[0].sum()
    for t in ts[1:]:
        total = total + t.sum()
    return bool(torch.isfinite(total)) or all(bool(torch.isfinite(t).all()) for t in ts)


class Tensors:
    """Per-group values (``F``, inner products, steps, tests) as tensors of shape ``(G,)``: any
    number of groups, any device."""

    def __init__(self, groups: int) -> None:
        self.groups = groups

    def of(self, f: Tensor) -> Tensor:
        """A value of ``fun``, shape ``(G,)``."""
        return f

    def given(self, t: Tensor) -> Tensor:
        """A per-group value the caller gives (a ``scale``), in its own dtype."""
        return t.reshape(-1)

    def dot(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
        return gdot(a, b, self.groups)

    def axpy(self, z: Sequence[Tensor], s: Tensor, d: Sequence[Tensor]) -> list[Tensor]:
        return axpy(z, s, d, self.groups)

    def scale(self, s: Tensor, z: Tensor) -> Tensor:
        return gscale(s, z, self.groups) * z

    @staticmethod
    def full(like: Tensor, value: float) -> Tensor:
        return torch.full_like(like, value)

    where = staticmethod(torch.where)
    sqrt = staticmethod(torch.sqrt)
    isinf = staticmethod(torch.isinf)

    @staticmethod
    def any(c: Tensor) -> bool:
        return bool(c.any())

    @staticmethod
    def all(c: Tensor) -> bool:
        return bool(c.all())

    @staticmethod
    def max(v: Tensor) -> float:
        return float(v.max()) if v.numel() else 0.0

    @staticmethod
    def finite(values: Sequence[Tensor], tensors: Sequence[Tensor] = ()) -> bool:
        return _finite(*values, *tensors)


class Scalars(Tensors):
    """One group on the CPU: per-group values as numpy scalars of the problem's dtype.

    A solve's bookkeeping (line-search tests, steps, curvature) then costs no tensor operation,
    where each costs microseconds on one-element tensors: the pendulum's 2-dimensional state
    problems spent more time there than in their function evaluations. numpy's scalar arithmetic
    rounds in the dtype, one operation at a time, as torch's does, and the steps are applied by the
    same ``addcmul`` kernel: the iterates are :class:`Tensors`' bit for bit.
    """

    TYPES = {torch.float32: np.float32, torch.float64: np.float64}

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__(1)
        self.dtype = dtype
        self.type = self.TYPES[dtype]

    def of(self, f: Tensor) -> Any:
        return self.type(f.item())

    def given(self, t: Tensor) -> Any:
        return self.TYPES.get(t.dtype, np.float64)(t.item())

    def dot(self, a: Sequence[Tensor], b: Sequence[Tensor]) -> Any:
        # gdot's sum of per-tensor dots, in the same order and dtype, without its reshapes
        out = None
        for x, y in zip(a, b, strict=True):
            d = self.type(torch.dot(x.reshape(-1), y.reshape(-1)).item())
            out = d if out is None else out + d
        return out

    def axpy(self, z: Sequence[Tensor], s: Any, d: Sequence[Tensor]) -> list[Tensor]:
        st = torch.scalar_tensor(float(s), dtype=self.dtype)  # 0-d, as Tensors' step: the same kernel
        return [torch.addcmul(x, st, y) for x, y in zip(z, d, strict=True)]

    def scale(self, s: Any, z: Tensor) -> Tensor:
        return torch.scalar_tensor(float(s), dtype=self.dtype) * z

    def full(self, like: Any, value: float) -> Any:
        return self.type(value)

    @staticmethod
    def where(c: Any, a: Any, b: Any) -> Any:
        return a if c else b

    def sqrt(self, x: Any) -> Any:
        # torch's sqrt, on one element as Tensors' per-group values: on the CPU it is not always
        # the correctly rounded one that numpy's is (1 in 50 to 1 in 7 values differ by an ulp).
        return self.type(torch.scalar_tensor(float(x), dtype=self.dtype).sqrt_().item())

    isinf = staticmethod(np.isinf)

    @staticmethod
    def any(c: Any) -> bool:
        return bool(c)

    all = any

    @staticmethod
    def max(v: Any) -> float:
        return float(v)

    @staticmethod
    def finite(values: Sequence[Any], tensors: Sequence[Tensor] = ()) -> bool:
        return all(np.isfinite(v) for v in values) and (not tensors or _finite(*tensors))


Values = Tensors  # the interface; Scalars is a Tensors


def values_for(f: Tensor) -> Tensors:
    """How a solve on ``F(z) = f`` holds its per-group values: :class:`Scalars` for one group of
    float32 or float64 on the CPU, else :class:`Tensors`."""
    if f.numel() == 1 and f.device.type == "cpu" and f.dtype in Scalars.TYPES:
        return Scalars(f.dtype)
    return Tensors(f.numel())


Evaluated = tuple[Any, list[Tensor]]  # (F(z) as a per-group value, grad F(z))
Start = tuple[Tensor, list[Tensor]]  # (F(z0), grad F(z0)) at z0, when the caller already has them
# (s_k, y_k, <s_k, y_k>, <s_k, s_k>) with s_k = z_{k+1} - z_k and y_k = g_{k+1} - g_k, per group
History = list[tuple[list[Tensor], list[Tensor], Any, Any]]
Step = Callable[[Values, Objective, list[Tensor], Any, list[Tensor], Any, History, bool],
                tuple[list[Tensor], Evaluated | None]]


def _check_tol(owner: str, tol: float | None, max_iter: int) -> None:
    if tol is not None:
        _check(owner, tol, max_iter)
    else:
        _check(owner, 0.0, max_iter)


def _evaluate(v: Values, fun: Objective, z: Sequence[Tensor]) -> Evaluated:
    f, g = value_and_grad(fun, z)
    return v.of(f), g


def run(method: str, step: Step, fun: Objective, z0: Sequence[Tensor], tol: float | None, max_iter: int,
        start: Start | None = None, scale: Tensor | None = None,
        pairs: bool = True) -> tuple[list[Tensor], SolveInfo]:
    """The loop every solver shares: ``z_{k+1} = step(v, fun, z_k, F_k, g_k, |g_k|^2, history, last)``.

    A step returns the new iterate and, if it already evaluated them there, ``(F, grad F)``;
    ``last`` tells it that no gradient will be taken at its result. Per-group values (``F``, inner
    products, steps) are held as ``v`` says (:func:`values_for`). The history keeps each step's
    pair ``(s_k, y_k)`` only with ``pairs`` (L-BFGS); else only their inner products, and the
    two iterate-sized tensors are freed at once.

    It stops when every group meets ``||g_g|| <= tolerance(tol, scale)_g`` (``scale`` defaults to
    ``||grad F(z0)||`` per group), at ``max_iter`` steps, at a non-finite value or gradient,
    or at a negative-curvature witness along a step (the subproblem is not strongly convex).

    With ``tol=None`` it runs exactly ``max_iter`` steps (000 App. E.2.1 runs two) and skips the
    gradient at the last iterate, which would cost one more evaluation of ``F`` and its gradient
    per solve: ``converged`` is None (not checked) and the message, starting with :data:`FIXED`,
    says that the residual is that of the iterate before the last step, not of the returned point.
    """
    z = list(z0)
    f, g = start if start is not None else value_and_grad(fun, z)
    v = values_for(f)
    f = v.of(f)
    with np.errstate(all="ignore"):  # numpy scalars: overflow and inf as in torch, silently
        return _run(v, method, step, fun, z, f, g, tol, max_iter, scale, pairs)


def _run(v: Values, method: str, step: Step, fun: Objective, z: list[Tensor], f: Any, g: list[Tensor],
         tol: float | None, max_iter: int, scale: Tensor | None,
         pairs: bool) -> tuple[list[Tensor], SolveInfo]:
    # The residual ||g|| per group is formed only where a test needs it (gg is finite iff it is).
    gg = v.dot(g, g)
    res = None if tol is None else v.sqrt(gg)
    bound = None if tol is None else tolerance(tol, res if scale is None else v.given(scale))
    hist: History = []
    it, message = 0, ""
    while it < max_iter and (bound is None or v.any(res > bound)):
        if not v.finite((f, gg)):
            message = NON_FINITE
            break
        last = tol is None and it + 1 == max_iter
        z_new, evaluated = step(v, fun, z, f, g, gg, hist, last)
        it += 1
        if last:
            z = z_new
            break
        f_new, g_new = evaluated if evaluated is not None else _evaluate(v, fun, z_new)
        s_k = [a - b for a, b in zip(z_new, z, strict=True)]
        y_k = [a - b for a, b in zip(g_new, g, strict=True)]
        z, f, g = z_new, f_new, g_new
        gg = v.dot(g, g)
        if bound is not None:
            res = v.sqrt(gg)
        sy, ss = v.dot(s_k, y_k), v.dot(s_k, s_k)
        if v.any(negative_curvature(v, s_k, y_k, z, sy, ss)):
            message = NOT_CONVEX
            break
        hist.append((s_k, y_k, sy, ss) if pairs else ([], [], sy, ss))
        del s_k, y_k
    if not message and not v.finite((f, gg), z):
        message = NON_FINITE
    if bound is None:
        res = v.sqrt(gg)
    r = v.max(res)
    if message:
        return z, SolveInfo(method, it, r, False, message)
    if bound is None:
        return z, SolveInfo(method, it, r, None, f"{FIXED} ({max_iter} steps, as asked); the residual "
                                                 f"{r:.3g} is that of iterate {it - 1}, before the last "
                                                 f"step, not measured at the returned point")
    converged = v.all(res <= bound)
    return z, SolveInfo(method, it, r, converged, "" if converged else CAP)


@dataclass(frozen=True)
class GradientDescent:
    """``z_{k+1} = z_k - step grad F(z_k)``.

    With ``step = 1`` and ``z_0 = 0``, one step on ``F(y) = lam^T phi(x + y) + ||y||^2/2`` returns
    ``y_1 = -d phi^T lam``: the Moreau gradient becomes the vjp (001 Sec. 2).
    """

    step: float = 1.0
    tol: float | None = 1e-10
    max_iter: int = 100

    def __post_init__(self) -> None:
        _check_tol("GradientDescent", self.tol, self.max_iter)
        if not self.step > 0:
            raise ValueError(f"GradientDescent: step must be > 0, got {self.step!r}")

    def solve(self, fun: Objective, z0: Sequence[Tensor], start: Start | None = None,
              scale: Tensor | None = None) -> tuple[list[Tensor], SolveInfo]:
        def step(v, fun, z, f, g, gg, hist, last):
            return [x - self.step * y for x, y in zip(z, g, strict=True)], None

        return run("gradient descent", step, fun, z0, self.tol, self.max_iter, start, scale, pairs=False)


def goldstein(fun: Objective, z: list[Tensor], f: Any, g: list[Tensor], c: float = 0.25,
              max_trials: int = 30, with_grad: bool = False,
              values: Values | None = None, gg: Any = None) -> tuple[Any, Evaluated | None]:
    """Per-group Goldstein step along ``-g``: ``F - (1-c) s |g|^2 <= F(z - s g) <= F - c s |g|^2``.

    Starts from ``s = 1`` (the unit step is exact on the proximal term), halves the step of groups
    with too little decrease and doubles it for groups with too much, bisecting once bracketed.
    Returns the per-group steps. Groups that never satisfy both sides keep the last step with
    sufficient decrease (0 if none had any: the point does not move). With ``with_grad``, the first
    trial also takes the gradient, returned with its value when every group accepts the unit step
    (the common case), so that the next iterate costs no second evaluation.

    ``f``, ``gg = |g|^2`` (formed here if not given) and the steps are per-group values of
    ``values`` (default: tensors of shape ``(G,)``).
    """
    v = Tensors(f.numel()) if values is None else values
    gg = v.dot(g, g) if gg is None else gg
    s, lo, hi, best = v.full(f, 1.0), v.full(f, 0.0), v.full(f, math.inf), v.full(f, 0.0)
    done = gg == 0
    first: Evaluated | None = None
    for trial in range(max_trials):
        zn = v.axpy(z, -s, g)
        if trial == 0 and with_grad:
            first = _evaluate(v, fun, zn)
            fn = first[0]
        else:
            with torch.no_grad():
                fn = v.of(fun(zn))
        upper = fn <= f - c * s * gg + rounding_slack(f)  # sufficient decrease
        lower = fn >= f - (1 - c) * s * gg    # not too long a step
        best = v.where(upper & ~done, s, best)
        ok = upper & lower
        done = done | ok
        if v.all(done):
            break
        hi = v.where(~done & ~upper, s, hi)
        lo = v.where(~done & upper, s, lo)
        nxt = v.where(v.isinf(hi), 2 * s, (lo + hi) / 2)
        s = v.where(done, s, nxt)
    accepted_first = first is not None and v.all(done) and v.all(s == 1)
    return v.where(done, s, best), first if accepted_first else None


@dataclass(frozen=True)
class QuasiNewton:
    """The paper's quasi-Newton: one gradient step with a Goldstein line search, then
    Barzilai-Borwein steps ``s_k = <dz, dz> / <dz, dg>`` per group (000 App. E.2.1).

    The paper runs exactly two steps: ``QuasiNewton(max_iter=2, tol=None)``.
    """

    tol: float | None = 1e-10
    max_iter: int = 2

    def __post_init__(self) -> None:
        _check_tol("QuasiNewton", self.tol, self.max_iter)

    def solve(self, fun: Objective, z0: Sequence[Tensor], start: Start | None = None,
              scale: Tensor | None = None) -> tuple[list[Tensor], SolveInfo]:
        def step(v, fun, z, f, g, gg, hist, last):
            evaluated = None
            if not hist:
                s, evaluated = goldstein(fun, z, f, g, with_grad=not last, values=v, gg=gg)
            else:
                # BB1 per group; groups without usable curvature (not moved, or at rounding level)
                # take a unit step, exact on the proximal term.
                _, _, curv, dd = hist[-1]  # <dz, dg> and <dz, dz>
                usable = (curv > 0) & (dd > 0)
                s = v.where(usable, dd / v.where(usable, curv, v.full(curv, 1.0)), v.full(curv, 1.0))
            return v.axpy(z, -s, g), evaluated

        return run("quasi-Newton (Goldstein + Barzilai-Borwein)", step, fun, z0, self.tol, self.max_iter,
                   start, scale, pairs=False)


@dataclass(frozen=True)
class LBFGS:
    """Limited-memory BFGS with per-group two-loop recursion and per-group Armijo backtracking."""

    tol: float | None = 1e-10
    max_iter: int = 100
    memory: int = 10

    def __post_init__(self) -> None:
        _check_tol("LBFGS", self.tol, self.max_iter)
        check_count("LBFGS", "memory", self.memory)

    def solve(self, fun: Objective, z0: Sequence[Tensor], start: Start | None = None,
              scale: Tensor | None = None) -> tuple[list[Tensor], SolveInfo]:
        def step(v, fun, z, f, g, gg, hist, last):
            # Two-loop recursion d = -H g; pairs without positive curvature (groups that did not
            # move, or moved at rounding level) get rho = 0 and drop out.
            pairs = []
            for s_k, y_k, sy, _ in hist[-self.memory:]:
                pairs.append((s_k, y_k, _inverse_curvature(v, sy)))
            q, alphas = list(g), []
            for s_k, y_k, rho in reversed(pairs):
                a = rho * v.dot(s_k, q)
                alphas.append(a)
                q = v.axpy(q, -a, y_k)
            if pairs:
                _, y_k, _ = pairs[-1]
                yy, sy = v.dot(y_k, y_k), hist[-1][2]
                one = v.full(yy, 1.0)
                h0 = v.where((yy > 0) & (sy > 0), sy / v.where(yy > 0, yy, one), one)
                q = [v.scale(h0, x) for x in q]
            for (s_k, y_k, rho), a in zip(pairs, reversed(alphas), strict=True):
                q = v.axpy(q, a - rho * v.dot(y_k, q), s_k)
            d = [-x for x in q]
            slope = v.dot(g, d)
            t = v.full(f, 1.0)
            with torch.no_grad():
                for _ in range(30):
                    f_t = v.of(fun(v.axpy(z, t, d)))
                    bad = ~(f_t <= f + 1e-4 * t * slope + rounding_slack(f)) & (slope < 0)
                    if not v.any(bad):
                        break
                    t = v.where(bad, t / 2, t)
            return v.axpy(z, t, d), None

        return run("L-BFGS", step, fun, z0, self.tol, self.max_iter, start, scale)

