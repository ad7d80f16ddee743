"""Regularised least squares on a stage, exact or by matrix-free conjugate gradient (004 App. B).

Target, proximal and augmented-Lagrangian rules all reduce, on a stage that is linear in the
variable being updated, to one problem. With ``J`` the Jacobian of ``phi_t`` in that variable at the
recorded point and a residual ``r`` (shaped like ``x_t``):

    ``delta = argmin_d  scale <r, J d> + kappa/2 ||J d + r||^2 + c/2 ||d||^2``
    ``      = -(scale + kappa) (kappa J^T J + c I)^{-1} J^T r``

(the first term is absent when ``scale = 0``). ProxProp (004 eq. 11) is ``scale = 0, kappa = 1,
c = 1/tau_theta`` with ``r = tau lambda``; the augmented-Lagrangian weight step (000 Algo 8) is
``scale = beta, c = 1/alpha``; ``c = 0`` is plain least squares, solved for the minimum-norm
``delta`` (target propagation's approximate inverse, 000 eq. 40).

Exact solves use the Gram matrix of the layer input for ``Linear`` and ``Conv2d`` weights (one
batched solve whose size is independent of the batch, 004 eq. 44) and ``W^T W`` for ``Linear``
inputs; :class:`CG` runs ``k`` matrix-free steps on ``kappa J^T J + c I`` for any stage, with
``J^T`` from the recorded graph and ``J`` by eager forward-mode AD. For a stage that is not linear in the
variable this is the Gauss-Newton (linearised) step.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from .chain import plain
from .checks import check_count
from .solvers import gdot, gscale, tolerance, unit_of
from .types import SolveInfo, Weights


@dataclass(frozen=True)
class Exact:
    """Solve exactly: the Gram closed form where one is registered (``Linear``, ``Conv2d``), else CG
    to the relative tolerance ``||residual|| <= tol ||rhs||`` per group (at most ``max_iter`` steps;
    ``tol`` is floored at the dtype's rounding level, see ``solvers.tolerance``).

    ``rcond``: plain least squares (``c = 0``, target propagation's fits and inverses) is solved by
    the pseudo-inverse with singular values below ``rcond`` times the largest dropped (a truncated
    SVD). The exact minimum-norm solution follows directions the data barely determine: with a
    dtype's own cutoff, float32 and float64 disagree there, and ``Oracle.step`` diverges (ReLU MLP
    64-32-32-10 on digits, batch 32, target_prop: loss 2.3 to 1e5 in 30 steps at float64's own
    cutoff, to 1.69 at ``1e-3`` in float32 and float64 alike).
    """

    tol: float = 1e-10
    max_iter: int = 500
    rcond: float = 1e-3


@dataclass(frozen=True)
class CG:
    """``steps`` matrix-free conjugate-gradient iterations from 0 (004 Sec. 5.1 uses 1, 3 or 5).
    Every iterate is a descent direction (004 Prop. 5)."""

    steps: int = 3

    def __post_init__(self) -> None:
        check_count("CG", "steps", self.steps)


Method = Exact | CG


def _budget(method: Method) -> tuple[int, float]:
    """``(steps, tol)``: ``k`` steps and no tolerance for ``CG(k)``, the cap and tolerance of ``Exact``."""
    return (method.steps, 0.0) if isinstance(method, CG) else (method.max_iter, method.tol)


@functools.cache
def _load_forward_ad() -> None:
    """torch 2.13 loads its forward-AD decompositions through ``torch.jit.script`` on first use,
    which warns that it is deprecated: torch's own business, so that one warning is silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated",
                                category=DeprecationWarning)
        with fwAD.dual_level():
            fwAD.make_dual(torch.zeros(1), torch.zeros(1))


def jvp(fn: Any, primals: tuple[Tensor, ...], tangents: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """``(fn(*primals), J tangents)`` by eager forward-mode AD (dual tensors), or, for an op
    without a forward-mode formula (``weight_norm``'s kernel), by two reverse passes."""
    _load_forward_ad()
    # Attention through its math kernel: the fused CPU/GPU kernels have no forward-mode formula
    # and no double backward.
    with sdpa_kernel(SDPBackend.MATH):
        try:
            with fwAD.dual_level():
                out = fn(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents, strict=True)))
                primal, tangent = fwAD.unpack_dual(out)
        except NotImplementedError:
            return _jvp_by_two_vjps(fn, primals, tangents)
    return primal, torch.zeros_like(primal) if tangent is None else tangent


def _jvp_by_two_vjps(fn: Any, primals: tuple[Tensor, ...],
                     tangents: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    """``J v = d/du <J^T u, v>``: the vjp is linear in ``u``, so its vjp against ``v`` is ``J v``."""
    with torch.enable_grad():
        ps = [p.detach().requires_grad_(True) for p in primals]
        out = fn(*ps)
        u = torch.zeros_like(out, requires_grad=True)
        gs = torch.autograd.grad(out, ps, u, create_graph=True, allow_unused=True)
        used = [(g, t) for g, t in zip(gs, tangents, strict=True) if g is not None and g.requires_grad]
        if not used:
            return out.detach(), torch.zeros_like(out)
        (jv,) = torch.autograd.grad([g for g, _ in used], u, [t for _, t in used], allow_unused=True)
    return out.detach(), torch.zeros_like(out) if jv is None else jv.detach()


def cg(apply: Any, b: list[Tensor], steps: int, groups: int, tol: float = 0.0,
       dot: Any = None) -> tuple[list[Tensor], SolveInfo]:
    """Conjugate gradient for ``M x = b`` from ``x = 0``, per group; ``M`` must be SPD.

    With ``tol > 0`` it stops when every group's residual is below ``tolerance(tol, ||b_g||)``
    (relative to the right-hand side); with ``tol = 0`` it runs ``steps`` steps (``CG(k)``).
    ``dot`` is the inner product of the coordinates (default: the Euclidean one per group). A
    non-positive ``<p, M p>`` (``M`` not positive definite) stops the solve and is reported.
    """
    gdot_ = dot if dot is not None else (lambda u, v: gdot(u, v, groups))
    # CG is linear in b: run it on b in one unit for all groups (a power of 2, so exactly), so
    # that <r, r> of a tiny right-hand side does not underflow to 0 in float32.
    unit = unit_of(b)
    if unit != 1.0:
        x, info = cg(apply, [t / unit for t in b], steps, groups, tol, dot)
        return [xi * unit for xi in x], info
    x = [torch.zeros_like(t) for t in b]
    r = list(b)
    p = list(b)
    rr = gdot_(r, r)
    bound = tolerance(tol, rr.sqrt())
    it, message = 0, ""
    for it in range(1, steps + 1):  # noqa: B007 - reported
        Ap = apply(p)
        pAp = gdot_(p, Ap)
        live = rr > 0
        if bool((live & (pAp <= 0)).any()):
            message = "operator not positive definite"
            it -= 1
            break
        a = torch.where(live, rr / pAp.where(live, torch.ones_like(pAp)), 0.0)
        x = [xi + gscale(a, pi, groups) * pi for xi, pi in zip(x, p, strict=True)]
        r = [ri - gscale(a, qi, groups) * qi for ri, qi in zip(r, Ap, strict=True)]
        rr_new = gdot_(r, r)
        if bool((rr_new.sqrt() <= bound).all()):
            rr = rr_new
            break
        beta = torch.where(live, rr_new / rr.where(live, torch.ones_like(rr)), 0.0)
        p = [ri + gscale(beta, pi, groups) * pi for ri, pi in zip(r, p, strict=True)]
        rr = rr_new
    res = float(rr.max().sqrt()) if rr.numel() else 0.0
    ok = not message and bool((rr.sqrt() <= bound).all())
    return x, SolveInfo(f"conjugate gradient ({steps} steps max)", it, res,
                        None if (tol == 0 and not message) else ok, message)


# -- the weight problem -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Rows:
    """A stage linear in ``w`` written as rows: ``phi(w, x)`` reshaped to ``(N, out)`` equals
    ``A~ W~^T`` with ``A~ = [a, 1]`` (``N x in~``) and ``W~ = [W, b]`` (``out x in~``)."""

    a: Tensor
    out_shape: torch.Size
    weight_shape: torch.Size
    bias: bool
    conv: bool

    def rows(self, r: Tensor) -> Tensor:
        """A tensor shaped like ``x_t`` as ``(N, out)`` rows, in the order of ``a``."""
        if self.conv:  # (B, C, H, W) -> (B * H * W, C)
            return r.flatten(2).transpose(1, 2).reshape(-1, r.shape[1])
        return r.reshape(-1, r.shape[-1])

    def stack(self, w: Weights) -> Tensor:
        """``W~ = [W, b]`` (``out x in~``) from the stage's weights, the inverse of :meth:`weights`."""
        W = w["weight"].reshape(self.weight_shape[0], -1)
        return torch.cat([W, w["bias"][:, None]], 1) if self.bias else W

    def weights(self, d: Tensor) -> Weights:
        out = {"weight": d[:, : self.weight_shape[1:].numel()].reshape(self.weight_shape)}
        if self.bias:
            out["bias"] = d[:, -1]
        return out


def _rows(site: Any) -> _Rows | None:
    """The row form of a ``Linear`` or ``Conv2d`` stage whose weights are all variables, else None
    (also for a parametrized or hooked module, which is not linear in its raw parameters)."""
    m = site.stage.module
    if not plain(m) or set(site.w) != {n for n, _ in m.named_parameters()}:
        return None
    x = site.x_prev.detach()
    if isinstance(m, nn.Linear):
        a, conv = x.reshape(-1, m.in_features), False
    elif (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
          and isinstance(m.padding, tuple)):
        cols = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # (B, C k k, L)
        a, conv = cols.transpose(1, 2).reshape(-1, cols.shape[1]), True
    else:
        return None
    if m.bias is not None:
        a = torch.cat([a, torch.ones_like(a[:, :1])], 1)
    return _Rows(a, site.x.shape, m.weight.shape, m.bias is not None, conv)


def _ridge_rows(R: Tensor, a: Tensor, kappa: float, c: float, extra: Tensor | None = None,
                rcond: float = 0.0) -> Tensor:
    """``(R^T a + extra) (kappa a^T a + c I)^{-1}`` for rows ``R`` (``N x out``): one symmetric
    solve of size ``in~`` (004 eq. 44), or of size ``N`` when the batch is the smaller side and
    there is no ``extra``, by the push-through identity
    ``a (kappa a^T a + c I)^{-1} = (kappa a a^T + c I)^{-1} a``."""
    n, k = a.shape
    if c == 0 and extra is None:  # truncated least squares: pinv(a), not pinv(a^T a) (cond^2)
        return (torch.linalg.pinv(a, rtol=rcond) @ R).T / kappa
    if c > 0 and n < k and extra is None:
        small = kappa * (a @ a.T) + c * torch.eye(n, dtype=a.dtype, device=a.device)
        return _sym_solve(small, R, c).T @ a
    K = kappa * (a.T @ a) + c * torch.eye(k, dtype=a.dtype, device=a.device)
    rhs = R.T @ a if extra is None else R.T @ a + extra
    return _sym_solve(K, rhs.T, c).T


def _sym_solve(K: Tensor, B: Tensor, c: float) -> Tensor:
    """``K^{-1} B`` for symmetric PSD ``K``; Cholesky when regularised, minimum-norm when ``c = 0``."""
    if c > 0:
        L, info = torch.linalg.cholesky_ex(K)
        if int(info) == 0:
            return torch.cholesky_solve(B, L)
    return torch.linalg.pinv(K, hermitian=True) @ B


def _cg_rows(R: Tensor, a: Tensor, kappa: float, c: float, steps: int,
             tol: float, extra: Tensor | None = None) -> tuple[Tensor, SolveInfo]:
    """CG on ``V (kappa a^T a + c I) = R^T a + extra`` over weights ``V`` of shape ``(out, in~)``.

    Without ``extra`` every iterate lies in the row space of ``a`` (the right-hand side does, and
    the operator keeps it there), so when the batch ``N`` is below ``in~`` CG runs on coefficients
    ``Z`` with
    ``V = Z a``: the operator is ``Z -> kappa Z S + c Z`` and ``<V1, V2> = <Z1 S, Z2>`` with
    ``S = a a^T`` (``N x N``). Same iterates, steps of ``out N^2`` instead of ``2 out N in~`` flops.
    """
    n, k = a.shape
    if n < k and extra is None:
        S = a @ a.T
        (z,), info = cg(lambda v: [kappa * (v[0] @ S) + c * v[0]], [R.T], steps, 1, tol,
                        dot=lambda u, v: torch.dot((u[0] @ S).reshape(-1), v[0].reshape(-1)).reshape(1))
        return z @ a, info
    rhs = R.T @ a if extra is None else R.T @ a + extra
    (d,), info = cg(lambda v: [kappa * ((a @ v[0].T).T @ a) + c * v[0]], [rhs], steps, 1, tol)
    return d, info


def solve_weight(site: Any, r: Tensor, scale: float, kappa: float, c: float,
                 method: Method, jtr: Weights | None = None, mu: float = 0.0) -> tuple[Weights, SolveInfo]:
    """``delta_w = -(kappa J_w^T J_w + (c + mu) I)^{-1} ((scale + kappa) J_w^T r + mu w)``: the
    module doc's problem plus ``r(v) = mu ||v||^2/2`` inside it (000 App. D.6; ``mu = 0``: none).

    ``Linear`` and ``Conv2d`` work on rows (no forward-mode AD, no input gradient). ``jtr``, when
    the caller has it, is ``J_w^T r`` and saves a vjp on the generic path.
    """
    rows = _rows(site)
    steps, tol = _budget(method)
    s = scale + kappa
    w_now = {n: v.detach() for n, v in site.w.items()}
    if rows is not None:
        a, R = rows.a, rows.rows(r)
        extra = mu * rows.stack(w_now) if mu else None
        R = R if s == 1 else s * R
        if isinstance(method, Exact):
            d = _ridge_rows(R, a, kappa, c + mu, extra, method.rcond)
            info = SolveInfo("closed form: Gram solve")
        else:
            d, info = _cg_rows(R, a, kappa, c + mu, steps, tol, extra)
        return rows.weights(-d), info
    names = list(site.w)
    g = jtr if jtr is not None else site.vjp(r)[1]  # J_w^T r, exact on the recorded graph
    w = [w_now[n] for n in names]

    def phi_w(*v: Tensor) -> Tensor:
        return site.phi(dict(zip(names, v, strict=True)))

    def apply(v: list[Tensor]) -> list[Tensor]:
        _, jv = jvp(phi_w, tuple(w), tuple(v))
        _, jtjv = site.vjp(jv)
        return [kappa * jtjv[n] + (c + mu) * vi for n, vi in zip(names, v, strict=True)]

    rhs = [s * g[n] + mu * wi if mu else s * g[n] for n, wi in zip(names, w, strict=True)]
    x, info = cg(apply, rhs, steps, 1, tol)
    return {n: -xi for n, xi in zip(names, x, strict=True)}, info


# -- the state problem --------------------------------------------------------------------------


def solve_state(site: Any, r: Tensor, scale: float, kappa: float, c: float, method: Method,
                groups: int) -> tuple[Tensor, SolveInfo]:
    """``delta_x = -(scale + kappa) (kappa J_x^T J_x + c I)^{-1} J_x^T r``, per sample."""
    dx, _ = site.vjp(r, weights=False)
    module = site.stage.module
    if isinstance(method, Exact) and isinstance(module, nn.Linear) and "weight" in site.w and plain(module):
        W = site.w["weight"].detach()
        if c > 0:
            K = kappa * W.T @ W + c * torch.eye(W.shape[1], dtype=W.dtype, device=W.device)
            d = _sym_solve(K, dx.reshape(-1, W.shape[1]).T, c).T
        else:  # minimum-norm least squares: delta = -pinv(W) r
            d = (torch.linalg.pinv(W, rtol=method.rcond) @ r.reshape(-1, W.shape[0]).T).T / kappa
        return -(scale + kappa) * d.reshape(site.x_prev.shape), SolveInfo("closed form: Gram solve")
    x0 = site.x_prev.detach()

    def apply(v: list[Tensor]) -> list[Tensor]:
        _, jv = jvp(lambda y: site.phi(x=y), (x0,), (v[0],))
        jtjv, _ = site.vjp(jv, weights=False)
        return [kappa * jtjv + c * v[0]]

    steps, tol = _budget(method)
    (x,), info = cg(apply, [dx], steps, groups, tol)
    return -(scale + kappa) * x, info
