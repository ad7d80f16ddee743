"""Generic inner solvers for the proximal subproblems of the rules (DESIGN section 4; 000 App. E.2.1).

Every subproblem has the form ``min_z F(z)`` where ``z`` is a list of tensors and ``F`` returns one
value per *group*: ``G = B`` groups (one per sample) for problems that separate over the batch
(every state rule on a stage that does not mix samples), ``G = 1`` otherwise. Step sizes, line
searches and convergence are per group, with no Python loop over samples.

Each solver has one method ``solve(fun, z0) -> (z, SolveInfo)`` and reports its iterations, the
final residual ``max_g ||grad_g F||`` and whether it met its tolerance. It stops early on a
non-finite iterate or on a witness that the subproblem is not strongly convex (non-positive
curvature ``<s, grad F(z + s) - grad F(z)>`` along a step), and says so in ``SolveInfo.message``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .types import SolveInfo

Objective = Callable[[list[Tensor]], Tensor]  # z -> per-group values, shape (G,)

NOT_CONVEX = "subproblem not strongly convex: negative curvature along a step"
# Curvature <s, dg> counts as negative only below -CURVATURE_NOISE |s| |dg|: near convergence both
# are at rounding level and their inner product has no sign worth trusting.
CURVATURE_NOISE = 1e-6


def negative_curvature(s: Sequence[Tensor], y: Sequence[Tensor], z: Sequence[Tensor], groups: int) -> Tensor:
    """Per group, whether ``<s, y> < -CURVATURE_NOISE |s| |y|`` along a step ``s`` from ``z`` that is
    not at rounding level (``|s| > sqrt(eps) (1 + |z|)``): a witness of non-convexity."""
    ss, yy = gdot(s, s, groups), gdot(y, y, groups)
    eps = torch.finfo(ss.dtype).eps
    resolved = ss > eps * (1 + gdot(z, z, groups).sqrt()) ** 2
    return resolved & (gdot(s, y, groups) < -CURVATURE_NOISE * (ss * yy).sqrt())


def _slack(f: Tensor) -> Tensor:
    """Decreases below the rounding of ``f`` carry no sign; line searches accept them."""
    return 16 * torch.finfo(f.dtype).eps * (1 + f.abs())
NON_FINITE = "non-finite iterate"
CAP = "iteration cap reached before the tolerance"


def _check(owner: str, tol: float, max_iter: int) -> None:
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"{owner}: max_iter must be an int >= 1, got {max_iter!r}")
    if not isinstance(tol, int | float) or not tol >= 0:
        raise ValueError(f"{owner}: tol must be a number >= 0, got {tol!r}")


def gdot(a: Sequence[Tensor], b: Sequence[Tensor], groups: int) -> Tensor:
    """Per-group inner product ``<a_g, b_g>``, shape ``(G,)``."""
    return sum((x * y).reshape(groups, -1).sum(1) for x, y in zip(a, b, strict=True))


def gscale(s: Tensor, z: Tensor, groups: int) -> Tensor:
    """Broadcast a per-group scalar ``s`` (shape ``(G,)``) against a tensor ``z``."""
    return s.reshape(()) if groups == 1 else s.reshape(-1, *([1] * (z.dim() - 1)))


def axpy(z: Sequence[Tensor], s: Tensor, d: Sequence[Tensor], groups: int) -> list[Tensor]:
    """``z + s * d`` with a per-group step ``s``."""
    return [x + gscale(s, y, groups) * y for x, y in zip(z, d, strict=True)]


def value_and_grad(fun: Objective, z: Sequence[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """``F(z)`` per group and ``grad F(z)``; separability makes ``grad sum_g F_g`` per-group exact."""
    with torch.enable_grad():
        zz = [x.detach().requires_grad_(True) for x in z]
        f = fun(zz)
        grads = torch.autograd.grad(f.sum(), zz, allow_unused=True)
    return f.detach(), [torch.zeros_like(x) if g is None else g for x, g in zip(zz, grads, strict=True)]


def _groups_of(f: Tensor) -> int:
    return f.numel()


@dataclass
class _State:
    """Bookkeeping shared by the solvers: residuals, the stop reason and the iteration count."""

    tol: float
    iterations: int = 0
    message: str = ""

    def residual(self, g: Sequence[Tensor], groups: int) -> Tensor:
        return gdot(g, g, groups).sqrt()

    def finite(self, f: Tensor, g: Sequence[Tensor]) -> bool:
        ok = bool(torch.isfinite(f).all()) and all(bool(torch.isfinite(x).all()) for x in g)
        if not ok:
            self.message = NON_FINITE
        return ok

    def info(self, method: str, res: Tensor) -> SolveInfo:
        r = float(res.max()) if res.numel() else 0.0
        converged = not self.message and r <= self.tol
        message = self.message or ("" if converged else CAP)
        return SolveInfo(method, self.iterations, r, converged, message)


@dataclass(frozen=True)
class GradientDescent:
    """``z_{k+1} = z_k - step grad F(z_k)``.

    With ``step = 1`` and ``z_0 = 0``, one step on ``F(y) = lam^T phi(x + y) + ||y||^2/2`` returns
    ``y_1 = -d phi^T lam``: the Moreau gradient becomes the vjp (001 Sec. 2).
    """

    step: float = 1.0
    tol: float = 1e-10
    max_iter: int = 100

    def __post_init__(self) -> None:
        _check("GradientDescent", self.tol, self.max_iter)
        if not self.step > 0:
            raise ValueError(f"GradientDescent: step must be > 0, got {self.step!r}")

    def solve(self, fun: Objective, z0: Sequence[Tensor]) -> tuple[list[Tensor], SolveInfo]:
        st = _State(self.tol)
        z = list(z0)
        f, g = value_and_grad(fun, z)
        G = _groups_of(f)
        res = st.residual(g, G)
        step = torch.full_like(f, self.step)
        while st.finite(f, g) and float(res.max()) > self.tol and st.iterations < self.max_iter:
            z = axpy(z, -step, g, G)
            f, g = value_and_grad(fun, z)
            res = st.residual(g, G)
            st.iterations += 1
        return z, st.info("gradient descent", res)


def goldstein(fun: Objective, z: list[Tensor], f: Tensor, g: list[Tensor], c: float = 0.25,
              max_trials: int = 30) -> Tensor:
    """Per-group Goldstein step along ``-g``: ``F - (1-c) s |g|^2 <= F(z - s g) <= F - c s |g|^2``.

    Starts from ``s = 1`` (the unit step is exact on the proximal term), halves the step of groups
    with too little decrease and doubles it for groups with too much, bisecting once bracketed.
    Returns the per-group steps. Groups that never satisfy both sides keep the last step with
    sufficient decrease (0 if none had any: the point does not move).
    """
    G = _groups_of(f)
    gg = gdot(g, g, G)
    s = torch.ones_like(f)
    lo, hi = torch.zeros_like(f), torch.full_like(f, float("inf"))
    done = gg == 0
    best = torch.zeros_like(f)
    for _ in range(max_trials):
        zn = axpy(z, -s, g, G)
        with torch.no_grad():
            fn = fun(zn)
        upper = fn <= f - c * s * gg + _slack(f)  # sufficient decrease
        lower = fn >= f - (1 - c) * s * gg    # not too long a step
        best = torch.where(upper & ~done, s, best)
        ok = upper & lower
        done = done | ok
        if bool(done.all()):
            break
        hi = torch.where(~done & ~upper, s, hi)
        lo = torch.where(~done & upper, s, lo)
        nxt = torch.where(torch.isinf(hi), 2 * s, (lo + hi) / 2)
        s = torch.where(done, s, nxt)
    return torch.where(done, s, best)


@dataclass(frozen=True)
class QuasiNewton:
    """The paper's quasi-Newton: one gradient step with a Goldstein line search, then
    Barzilai-Borwein steps ``s_k = <dz, dz> / <dz, dg>`` per group (000 App. E.2.1 uses 2 steps).
    """

    tol: float = 1e-10
    max_iter: int = 2

    def __post_init__(self) -> None:
        _check("QuasiNewton", self.tol, self.max_iter)

    def solve(self, fun: Objective, z0: Sequence[Tensor]) -> tuple[list[Tensor], SolveInfo]:
        st = _State(self.tol)
        z = list(z0)
        f, g = value_and_grad(fun, z)
        G = _groups_of(f)
        res = st.residual(g, G)
        z_old, g_old = z, g
        while st.finite(f, g) and float(res.max()) > self.tol and st.iterations < self.max_iter:
            if st.iterations == 0:
                step = goldstein(fun, z, f, g)
            else:
                dz = [a - b for a, b in zip(z, z_old, strict=True)]
                dg = [a - b for a, b in zip(g, g_old, strict=True)]
                if bool(negative_curvature(dz, dg, z, G).any()):
                    st.message = NOT_CONVEX
                    break
                # BB1 step; groups without usable curvature (not moved, or at rounding level) take
                # a unit step, exact on the proximal term.
                curv, dd = gdot(dz, dg, G), gdot(dz, dz, G)
                usable = (curv > 0) & (dd > 0)
                step = torch.where(usable, dd / curv.where(usable, torch.ones_like(curv)), 1.0)
            z_old, g_old = z, g
            z = axpy(z, -step, g, G)
            f, g = value_and_grad(fun, z)
            res = st.residual(g, G)
            st.iterations += 1
        return z, st.info("quasi-Newton (Goldstein + Barzilai-Borwein)", res)


@dataclass(frozen=True)
class LBFGS:
    """Limited-memory BFGS with per-group two-loop recursion and per-group Armijo backtracking."""

    tol: float = 1e-10
    max_iter: int = 100
    memory: int = 10

    def __post_init__(self) -> None:
        _check("LBFGS", self.tol, self.max_iter)
        if isinstance(self.memory, bool) or not isinstance(self.memory, int) or self.memory < 1:
            raise ValueError(f"LBFGS: memory must be an int >= 1, got {self.memory!r}")

    def solve(self, fun: Objective, z0: Sequence[Tensor]) -> tuple[list[Tensor], SolveInfo]:
        st = _State(self.tol)
        z = list(z0)
        f, g = value_and_grad(fun, z)
        G = _groups_of(f)
        res = st.residual(g, G)
        hist: list[tuple[list[Tensor], list[Tensor], Tensor]] = []
        while st.finite(f, g) and float(res.max()) > self.tol and st.iterations < self.max_iter:
            # Two-loop recursion: d = -H g, with H0 = (s'y / y'y) I per group (identity at first).
            q = list(g)
            alphas = []
            for s_k, y_k, rho in reversed(hist):
                a = rho * gdot(s_k, q, G)
                alphas.append(a)
                q = axpy(q, -a, y_k, G)
            if hist:
                s_k, y_k, _ = hist[-1]
                yy, sy = gdot(y_k, y_k, G), gdot(s_k, y_k, G)
                h0 = torch.where((yy > 0) & (sy > 0), sy / yy.where(yy > 0, torch.ones_like(yy)), 1.0)
                q = [gscale(h0, x, G) * x for x in q]
            for (s_k, y_k, rho), a in zip(hist, reversed(alphas), strict=True):
                b = rho * gdot(y_k, q, G)
                q = axpy(q, a - b, s_k, G)
            d = [-x for x in q]
            slope = gdot(g, d, G)
            # Armijo backtracking per group from the unit step.
            step = torch.ones_like(f)
            with torch.no_grad():
                for _ in range(30):
                    fn = fun(axpy(z, step, d, G))
                    bad = ~(fn <= f + 1e-4 * step * slope + _slack(f)) & (slope < 0)
                    if not bool(bad.any()):
                        break
                    step = torch.where(bad, step / 2, step)
            z_new = axpy(z, step, d, G)
            f_new, g_new = value_and_grad(fun, z_new)
            s_k = [a - b for a, b in zip(z_new, z, strict=True)]
            y_k = [a - b for a, b in zip(g_new, g, strict=True)]
            z, f, g = z_new, f_new, g_new
            res = st.residual(g, G)
            st.iterations += 1
            if bool(negative_curvature(s_k, y_k, z, G).any()):
                st.message = NOT_CONVEX
                break
            # Groups without positive curvature (not moved, or at rounding level) get rho = 0 and
            # an inert history entry.
            curv = gdot(s_k, y_k, G)
            usable = curv > 0
            rho = torch.where(usable, 1.0 / curv.where(usable, torch.ones_like(curv)), 0.0)
            hist = [*hist, (s_k, y_k, rho)][-self.memory:]
        return z, st.info("L-BFGS", res)


Solver = GradientDescent | QuasiNewton | LBFGS
