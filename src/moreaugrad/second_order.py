"""Gradient, Gauss-Newton and Newton steps on a chain, as oracles with the usual interface (003 Sec. 3).

Each step is the minimiser of a model of ``F(w) = h(f(w)) + sum_t r_t(w_t)`` plus ``||w - w_k||^2/(2 gamma)``:
the linear model (gradient step, 003 eq. 12), the linearised chain with the quadratic model of ``h`` and
``r`` (Gauss-Newton, eq. 13) or the quadratic model of ``F`` (Newton, eq. 14). Prop. 3.1 writes all
three as the linear-quadratic control problem (15) on the linearised chain, with ``z~_0 = 0``,

    ``min sum_t  z~_t^T P_t z~_t/2 + p_t^T z~_t + z~_{t-1}^T R_t v~_t + v~_t^T Q_t v~_t/2 + q_t^T v~_t
    + ||v~_t||^2/(2 gamma)``  s.t. ``z~_t = A_t z~_{t-1} + B_t v~_t``,

``A_t = d_x phi_t``, ``B_t = d_w phi_t`` (Jacobians), ``p_tau = grad h``, ``q_t = grad r_t``, and
* gradient: ``P = R = Q = 0``;
* Gauss-Newton: ``P_tau = hess h``, ``Q_t = hess r_t``, else 0;
* Newton: also ``P_{t-1} = d_xx <lambda_t, phi_t>``, ``R_t = d_xw <lambda_t, phi_t>``,
  ``Q_t = hess r_t + d_ww <lambda_t, phi_t>`` with the back-propagated ``lambda_t`` (003 Prop. 3.1 (3)).

**By dynamic programming** (:class:`DP`, 003 App. C, Prop. C.1, Algo 4). The cost-to-go from stage ``t``
(eq. 35) is a quadratic ``cost_t(z) = z^T C_t z/2 + c_t^T z + const`` (eq. 36), ``C_tau = P_tau``,
``c_tau = p_tau``, and Bellman's equation gives, for ``t = tau..1`` (Algo 4 lines 16-21),

    ``M_t = I/gamma + Q_t + B_t^T C_t B_t``  (must be positive definite: the feasibility check)
    ``G_t = R_t^T + B_t^T C_t A_t``,  ``g_t = q_t + B_t^T c_t``
    ``K_t = -M_t^{-1} G_t``,  ``k_t = -M_t^{-1} g_t``
    ``C_{t-1} = P_{t-1} + A_t^T C_t A_t + G_t^T K_t``,  ``c_{t-1} = A_t^T c_t + G_t^T k_t``,

then the roll-out of the affine policy on the linearised chain (Algo 4 lines 26-30):
``v~_t = K_t z~_{t-1} + k_t``, ``z~_t = A_t z~_{t-1} + B_t v~_t`` from ``z~_0 = 0``; the step is
``w^+ = w + v~``. For the gradient step ``C_t = 0``, ``c_t = lambda_t`` and ``v~_t = -gamma (q_t +
B_t^T lambda_t)``: back-propagation (Prop. C.2), with no Jacobian formed.

The backward recursion runs inside the one backward sweep (``moreaugrad.sweep``): the signal
``signal_t`` is a :class:`CostToGo` (``lambda_t`` with ``C_t, c_t``), the state line returns
``signal_{t-1}`` and the weight line the stage's policy; the roll-out, which needs the policies of
all stages, runs in the rule's ``finish`` hook that :class:`~moreaugrad.Oracle` calls after the
sweep. It needs no new forward pass: ``A_t, B_t`` are kept from the sweep.

**Cost of the DP.** With ``N_t = B d_t`` the batch's state size at stage ``t`` and ``rho_t`` the stage's
number of weights, the sweep forms the dense ``A_t`` (``N_t x N_{t-1}``; per-sample blocks by
``d_t`` vjps when the stage does not mix samples), ``B_t`` (``N_t x rho_t``, ``N_t`` vjps),
Newton's ``P, R, Q`` (``d_{t-1}``, ``N_{t-1}`` and ``rho_t`` Hessian-vector products) and ``C_t``
(``N_t x N_t``: shared weights couple the samples), and factors ``M_t`` (``rho_t^3``). Memory and time
grow as ``N_t^2 (N_{t-1} + rho_t) + rho_t^3`` per stage, linear in the number of stages: right for
control (the pendulum: ``N = 2``, ``rho = 1``) and small networks, out of the question for a real
network's mini-batch, for which Gauss-Newton has :class:`CG`. A stage whose dense matrices would
exceed ``DP(max_entries)`` is refused by name before anything is formed.

**Gauss-Newton through the autodiff oracle** (003 Sec. 3.3, Prop. 3.5). With ``J^T`` the Jacobian of
the chain's output ``x_tau`` (``q`` entries) in ``w``, ``H = hess h(x_tau)`` and
``M = hess r + I/gamma``, the Gauss-Newton step solves ``(J H J^T + M) w~ = -(J g + q)``.
:class:`DualCG` solves the dual (18) instead, by conjugate gradient in the output space (at most
``rank H <= q`` iterations, a vjp and a jvp each, plus one jvp for the right-hand side and one vjp
for the step: ``2k + 2 <= 2q + 2`` calls after the sweep); :class:`CG` runs matrix-free
conjugate gradient on the primal with Gauss-Newton-vector products ``J H J^T v`` by a jvp and a vjp
through the chain, for a fixed number of steps or to a tolerance (every iterate is a descent
direction). Neither forms a Jacobian of the chain.

**Directions are gradient-like** (DESIGN section 2): ``Oracle.backward`` writes ``d_t = -v~_t/gamma``
into ``.grad`` and ``Oracle.step`` applies ``w_t <- w_t - gamma d_t = w_t + v~_t``, so ``d_t`` is the
gradient for the gradient step and tends to it as ``gamma -> 0`` for the others. Losses average over
the batch (000 App. D.1), so ``gamma`` acts on the mean objective.

Example:
    >>> oracle = mg.Oracle(chain, h, mg.second_order.gauss_newton(gamma=1.0))
    >>> oracle.step()                                     # w <- w + v~ (003 eq. 13)
    >>> oracle = mg.Oracle(chain, h, mg.second_order.newton(gamma=0.5, strict=True))
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from torch.func import grad, jacrev, vjp
from torch.overrides import TorchFunctionMode

from .checks import check_count, check_positive
from .losses import L2
from .lstsq import cg, jvp
from .rules import Grad, Rule, SolverError
from .rules.grad import objective_value, regularized
from .types import Dual, Signal, SolveInfo, StageInfo, StateUpdate, Weights, WeightUpdate

if TYPE_CHECKING:
    from .sweep import Site, SweepResult, Tape

__all__ = ["CG", "DP", "CostToGo", "Curvature", "DualCG", "SecondOrder", "StepReport", "gauss_newton",
           "gradient", "newton"]


class Curvature(enum.Enum):
    """Which model of ``F`` the step minimises (003 eq. 12-14)."""

    GRADIENT = "gradient"
    GAUSS_NEWTON = "Gauss-Newton"
    NEWTON = "Newton"


@dataclass(frozen=True)
class DP:
    """Dynamic programming on problem (15) (003 App. C, Algo 4): exact, dense per-stage Jacobians.

    ``max_entries`` bounds the dense matrices one stage may need (``A_t``, ``B_t``, ``C_t``, ``M_t``
    and Newton's ``P, R``, counted in entries): a stage beyond it is refused, naming it, before
    anything is formed (a network's mini-batch: use :class:`CG`).
    """

    max_entries: int = 1 << 26

    def __post_init__(self) -> None:
        check_count("DP", "max_entries", self.max_entries)


@dataclass(frozen=True)
class DualCG:
    """Gauss-Newton by the dual problem (18) (003 Prop. 3.5): conjugate gradient in the output space.

    Exact in at most ``rank(hess h) <= q`` iterations (``q`` = number of entries of ``x_tau``), two
    autodiff calls (a vjp and a jvp through the chain) each. ``tol`` is CG's relative stopping
    tolerance. Needs ``h`` convex at ``x_tau`` and a regulariser that is ``None`` or ``L2``.
    """

    tol: float = 1e-12

    def __post_init__(self) -> None:
        if not isinstance(self.tol, int | float) or not self.tol >= 0:
            raise ValueError(f"DualCG: tol must be a number >= 0, got {self.tol!r}")


@dataclass(frozen=True)
class CG:
    """Matrix-free Gauss-Newton: conjugate gradient on ``(J H J^T + hess r + I/gamma) w~ = -grad F``.

    Each step applies the Gauss-Newton matrix by one jvp and one vjp through the chain and one
    Hessian-vector product of ``h``: no Jacobian is formed, so it serves real networks on
    mini-batches. Runs ``steps`` steps, or stops earlier once the residual is below ``tol`` times
    the gradient's norm (``tol = 0``: exactly ``steps`` steps). Every iterate is a descent direction.
    """

    steps: int = 10
    tol: float = 0.0

    def __post_init__(self) -> None:
        check_count("CG", "steps", self.steps)
        if not isinstance(self.tol, int | float) or not self.tol >= 0:
            raise ValueError(f"CG: tol must be a number >= 0, got {self.tol!r}")


Method = DP | DualCG | CG

MAX_HALVINGS = 60
# Piecewise-linear functions (their Hessian is zero wherever it exists and their curvature sits in
# the kinks, which a Newton model cannot see; 003 assumes twice-differentiable layers), and functions
# once but not twice differentiable (ELU's second derivative jumps at 0), or kinked by a max/min.
KINKS = frozenset({
    "elu", "elu_", "selu", "selu_", "celu", "celu_", "maximum", "minimum", "fmax", "fmin",
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "prelu", "rrelu", "rrelu_", "hardtanh",
    "hardtanh_", "hardsigmoid", "hardswish", "hardshrink", "softshrink", "threshold", "threshold_",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "fractional_max_pool2d", "fractional_max_pool3d", "clamp", "clamp_", "clip", "clip_", "abs", "abs_",
    "__abs__", "sign",
})


# -- signals --------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CostToGo(Dual):
    """``signal_t`` of a dynamic-programming sweep: the back-propagated dual ``lambda_t`` (``value``,
    so ``signal_0`` is the input gradient) and the cost-to-go ``z^T C_t z/2 + c_t^T z`` (003 eq. 36).

    Attributes:
        C: ``C_t`` over the batch's flattened state (``N_t x N_t``); None for the gradient step
            (``C_t = 0``) and once an earlier stage of the sweep found the step infeasible.
        c: ``c_t``, shaped like ``x_t`` (``lambda_t`` itself for the gradient step).
        feasible: every ``M_s``, ``s > t``, was positive definite.
        stages: the linear-quadratic data and policy of the stage this signal enters, computed once
            by whichever of its weight and state lines runs first (both need them), and read back by
            the roll-out. A cache the sweep's own rule fills, like ``Site.vjp`` keeps its vjp.
    """

    C: Tensor | None = None
    c: Tensor | None = None
    feasible: bool = True
    stages: dict[Any, _Stage] = field(default_factory=dict, repr=False)


@dataclass(frozen=True, eq=False)
class OutputModel(Dual):
    """``signal_tau`` of an autodiff Gauss-Newton sweep: ``g = grad h(x_tau)`` (``value``), the dense
    ``H = hess h(x_tau)`` (``q x q``, for :class:`DualCG`) or ``v -> H v`` (for :class:`CG`)."""

    H: Tensor | None = None
    hvp: Callable[[Tensor], Tensor] | None = None


@dataclass(frozen=True)
class StepReport:
    """What a second-order step did, in every stage's ``info[t].extra["second_order"]``.

    Attributes:
        curvature: gradient, Gauss-Newton or Newton.
        gamma: the step asked for; ``gamma_used`` the one taken (smaller after halvings).
        feasible: whether the step was feasible at ``gamma`` (every ``M_t`` positive definite).
        stage: the stage ``t`` (from 1) where the sweep found it infeasible, else None (the last
            such stage of the chain: the recursion runs backward and stops there).
        eigenvalue: the smallest eigenvalue of ``M_t`` there, else None.
        halvings: how many times ``gamma`` was halved to reach a feasible step (003 Algo 4 line 24).
        calls: autodiff calls (jvps and vjps through the chain) after the sweep, for the autodiff
            methods; 0 for the DP.
    """

    curvature: Curvature
    gamma: float
    gamma_used: float
    feasible: bool = True
    stage: int | None = None
    eigenvalue: float | None = None
    halvings: int = 0
    calls: int = 0


# -- one stage of problem (15) --------------------------------------------------------------------


@dataclass
class _Policy:
    """Bellman's step at one stage (003 Prop. C.1): the policy ``v~ = K z + k`` and ``C_{t-1}, c_{t-1}``."""

    k: Tensor | None = None
    K: Tensor | None = None
    C: Tensor | None = None
    c: Tensor | None = None
    eigenvalue: float | None = None  # smallest eigenvalue of M_t when it is not positive definite

    @property
    def feasible(self) -> bool:
        return self.eigenvalue is None


@dataclass
class _Stage:
    """Stage ``t`` of problem (15) and its policy at the sweep's ``gamma``.

    ``A, B, P, R, Q`` are dense over the flattened batch state and the flattened weights ``w_t``
    (None where zero or not needed: all of them for the gradient step); ``q = grad r_t``;
    ``lam_prev = lambda_{t-1}``; ``grad`` is the stage's gradient (the weight line's provisional
    direction).
    """

    site: Site
    names: list[str]
    shapes: list[torch.Size]
    A: Tensor | None
    B: Tensor | None
    P: Tensor | None
    R: Tensor | None
    Q: Tensor | None
    q: Tensor | None
    lam_prev: Tensor | None
    grad: Weights
    policy: _Policy

    def unflatten(self, v: Tensor) -> Weights:
        sizes = [math.prod(s) for s in self.shapes]
        return {n: p.view(s) for n, p, s in zip(self.names, v.split(sizes), self.shapes, strict=True)}


def _flat(ws: Weights, names: list[str]) -> Tensor:
    return torch.cat([ws[n].reshape(-1) for n in names])


def _stage_function(site: Site) -> tuple[Callable[[Tensor, Tensor], Tensor], Tensor, list[str],
                                         list[torch.Size]]:
    """``f(v, x) = phi_t(w(v), x)`` over the flattened weights ``v``, and ``v`` at ``w_t``."""
    names = list(site.w)
    shapes = [site.w[n].shape for n in names]
    sizes = [site.w[n].numel() for n in names]
    x = site.x_prev
    v0 = (_flat({n: w.detach() for n, w in site.w.items()}, names) if names
          else torch.zeros(0, dtype=x.dtype, device=x.device))

    def f(v: Tensor, y: Tensor) -> Tensor:
        return site.phi({n: p.view(s) for n, p, s in zip(names, v.split(sizes), shapes, strict=True)}, y)

    return f, v0, names, shapes


def _per_sample(site: Site) -> bool:
    """Whether sample ``b`` of ``x_t`` depends on sample ``b`` of ``x_{t-1}`` alone (no batch norm in
    train mode), so state Jacobians are ``B`` blocks of ``d_t x d_{t-1}``."""
    return site.x_prev.dim() > 1 and site.x_prev.shape[0] > 1 and site.groups == site.x_prev.shape[0]


def _state_jacobian(fn: Callable[[Tensor], Tensor], x: Tensor, per_sample: bool) -> Tensor:
    """The dense Jacobian of ``fn`` (batch first, like ``x``) in ``x``, ``(N_out, N_in)``.

    Per sample, the Jacobian of ``sum_b fn(x)_b`` gives every sample's block with ``d_out`` vjps
    (sample ``b`` of the output depends on sample ``b`` of ``x`` only); the blocks are then placed on
    the diagonal. Otherwise the Jacobian of the whole output (``N_out`` vjps). Both by
    :func:`_jacrev_by_autograd` (``fn`` is a function of plain autograd).
    """
    if not per_sample:
        (J,) = _jacrev_by_autograd(lambda y: fn(y).reshape(-1), (x,), (0,))
        return J.reshape(J.shape[0], -1)
    b = x.shape[0]
    (blocks,) = _jacrev_by_autograd(lambda y: fn(y).sum(0).reshape(-1), (x,), (0,))  # (d_out, B, *in[1:])
    d_in = x[0].numel()
    blocks = blocks.reshape(-1, b, d_in).transpose(0, 1)     # (B, d_out, d_in)
    eye = torch.eye(b, dtype=x.dtype, device=x.device)
    return torch.einsum("bij,bc->bicj", blocks, eye).reshape(b * blocks.shape[1], b * d_in)


class _Calls(TorchFunctionMode):
    """Records the names of the torch functions a stage calls (for the Newton smoothness check)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinks: set[str] = set()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in KINKS:
            self.kinks.add(name)
        return func(*args, **(kwargs or {}))


def _check_twice_differentiable(site: Site) -> None:
    """Newton needs ``hess phi_t``: refuse a stage that calls a piecewise-linear function (ReLU,
    max-pooling, hard-tanh, clamp, abs, ...), found by evaluating it once under a function mode."""
    with _Calls() as calls, torch.no_grad():
        site.phi()
    if calls.kinks:
        raise ValueError(f"newton: {site.label} has no second derivative (it calls "
                         f"{', '.join(sorted(calls.kinks))}, piecewise linear); a Newton step needs "
                         f"twice-differentiable stages (003 Prop. 3.1): use a smooth activation such as "
                         f"Softplus, or gauss_newton")


def _regulariser(site: Site, names: list[str], v0: Tensor, hessian: bool) -> tuple[Tensor | None,
                                                                                       Tensor | None]:
    """``q_t = grad r_t(w_t)`` and, if asked, ``hess r_t(w_t)`` (``rho x rho``), by ``torch.func``."""
    reg = site.regularizer
    if reg is None or not names:
        return None, None
    shapes = [site.w[n].shape for n in names]
    sizes = [site.w[n].numel() for n in names]

    def r(v: Tensor) -> Tensor:
        return sum(reg(p.view(s)) for p, s in zip(v.split(sizes), shapes, strict=True))

    q = grad(r)(v0)
    return q, (jacrev(grad(r))(v0) if hessian else None)


def _jacobians(fn: Callable[[Tensor, Tensor], Tensor], v0: Tensor, x0: Tensor, wrt_v: bool, wrt_x: bool,
               per_sample: bool) -> tuple[Tensor | None, Tensor | None]:
    """The dense Jacobians of ``fn(v, x)`` (flattened) in ``v`` (``N_out x rho``) and in ``x``
    (``N_out x N_in``) by :func:`_jacrev_by_autograd` (the ``x`` part by :func:`_state_jacobian`
    when it is taken per sample; ``fn`` is then batch first). ``fn`` is a function of plain
    autograd, not a ``torch.func`` transform."""
    def flat(v: Tensor, y: Tensor) -> Tensor:
        return fn(v, y).reshape(-1)

    if wrt_v and wrt_x and not per_sample:  # one call for both
        Jv, Jx = _jacrev_by_autograd(flat, (v0, x0), (0, 1))
        return Jv, Jx.reshape(Jx.shape[0], -1)
    Jv = _jacrev_by_autograd(flat, (v0, x0), (0,))[0] if wrt_v else None
    Jx = _state_jacobian(lambda y: fn(v0, y), x0, per_sample) if wrt_x else None
    return Jv, Jx


def _jacrev_by_autograd(flat: Callable[..., Tensor], args: tuple[Tensor, ...],
                        argnums: tuple[int, ...]) -> tuple[Tensor, ...]:
    """``jacrev(flat, argnums)(*args)`` as one batched autograd call (``is_grads_batched``) on one
    recorded forward: the same vjps against the unit cotangents, without ``torch.func``'s
    per-call overhead (on a pendulum step 305 -> 129 us, equal bit for bit)."""
    with torch.enable_grad():
        ins = [a.detach().requires_grad_(i in argnums) for i, a in enumerate(args)]
        out = flat(*ins)
        wanted = [ins[i] for i in argnums]
        grads: tuple[Tensor | None, ...] = (None,) * len(wanted)
        if out.requires_grad and out.numel():
            eye = torch.eye(out.numel(), dtype=out.dtype, device=out.device)
            grads = torch.autograd.grad(out, wanted, eye, is_grads_batched=True, allow_unused=True)
    return tuple(out.new_zeros(out.numel(), *w.shape) if g is None else g
                 for g, w in zip(grads, wanted, strict=True))


def _linearise(site: Site, signal: CostToGo, curvature: Curvature) -> _Stage:
    """Stage ``t``'s data of problem (15) (003 Prop. 3.1): the Jacobians ``A_t, B_t`` and, for Newton,
    the Hessian of ``s(v, x) = <lambda_t, phi_t(v, x)>`` (``P_{t-1}, R_t, Q_t``), each a batched
    vjp against the unit cotangents (:func:`_jacrev_by_autograd`; the Hessian's through a recorded
    backward); ``lambda_{t-1}`` and the gradient by one vjp on the recorded graph."""
    lam = signal.value
    lam_prev, dw = site.vjp(lam)
    f, v0, names, shapes = _stage_function(site)
    weighted, state = bool(names), site.needs_state
    grad_dir = regularized(site, dw) if weighted else {}
    A = B = P = R = Q = None
    q, Q = _regulariser(site, names, v0, hessian=curvature is not Curvature.GRADIENT)
    if curvature is not Curvature.GRADIENT:
        x0 = site.x_prev.detach()
        per_sample = _per_sample(site)
        B, A = _jacobians(f, v0, x0, weighted, state, per_sample)
        if curvature is Curvature.NEWTON:
            _check_twice_differentiable(site)
            lam_d = lam.detach()

            def s(v: Tensor, y: Tensor) -> Tensor:
                return (lam_d * f(v, y)).sum()

            def grads(v: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
                """``(grad_v s, grad_x s)`` by a backward that is itself recorded, so that the
                Jacobians of these are batched vjps (a leaf not differentiated outside is a copy)."""
                v, y = (t if t.requires_grad else t.detach().requires_grad_() for t in (v, y))
                sv = s(v, y)
                gv, gx = (torch.autograd.grad(sv, (v, y), create_graph=True, allow_unused=True)
                          if sv.requires_grad else (None, None))
                return (torch.zeros_like(v) if gv is None else gv, torch.zeros_like(y) if gx is None else gx)

            def g_all(v: Tensor, y: Tensor) -> Tensor:  # (grad_x s, grad_v s), flattened
                gv, gx = grads(v, y)
                return torch.cat([gx.reshape(-1), gv])

            n = x0.numel()
            if per_sample:  # P_{t-1} per sample from grad_x s; R_t, Q_t from one jacobian in v
                Jv, _ = _jacobians(g_all, v0, x0, weighted, False, False)
                P = _state_jacobian(lambda y: grads(v0, y)[1], x0, True) if state else None
            else:
                Jv, Jx = _jacobians(g_all, v0, x0, weighted, state, False)
                P = None if Jx is None else Jx[:n]
            if Jv is not None:
                R = Jv[:n] if state else None
                Q = Jv[n:] if Q is None else Q + Jv[n:]
    return _Stage(site, names, shapes, A, B, P, R, Q, q, lam_prev, grad_dir, _Policy())


def _bellman(st: _Stage, C: Tensor | None, c: Tensor, gamma: float, dw_c: Weights | None = None,
             at_c: Tensor | None = None) -> _Policy:
    """One step of the backward recursion (003 Prop. C.1; Algo 4 lines 16-21), see the module doc.

    ``c`` is shaped like ``x_t``. With ``C = None`` (the gradient step) ``K_t = 0``, ``C_{t-1} = 0`` and
    the linear terms ``B^T c``, ``A^T c`` come from the vjp ``dw_c``, ``at_c``.
    """
    weighted = bool(st.names)
    if C is None and st.Q is None:  # gradient step (Prop. C.2): v~ = -gamma (q + B^T c)
        k = None
        if weighted:
            g = _flat(dw_c, st.names)
            k = -gamma * (g if st.q is None else g + st.q)
        return _Policy(k=k, c=at_c)
    cf = c.reshape(-1)
    A = st.A
    CA = None if A is None else C @ A
    C_prev = None if A is None else A.T @ CA
    c_prev = None if A is None else A.T @ cf
    if st.P is not None:
        C_prev = C_prev + st.P
    if not weighted:
        return _Policy(C=_sym(C_prev), c=None if c_prev is None else c_prev.view(st.site.x_prev.shape))
    Bm = st.B
    M = Bm.T @ (C @ Bm)
    M = M + torch.eye(M.shape[0], dtype=M.dtype, device=M.device) / gamma
    if st.Q is not None:
        M = M + st.Q
    M = _sym(M)
    g = Bm.T @ cf if st.q is None else Bm.T @ cf + st.q
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) != 0 or not bool(torch.isfinite(L).all()):
        eig = torch.linalg.eigvalsh(M).min() if bool(torch.isfinite(M).all()) else torch.tensor(math.nan)
        return _Policy(eigenvalue=float(eig))
    k = -torch.cholesky_solve(g[:, None], L)[:, 0]
    if A is None:
        return _Policy(k=k)
    G = Bm.T @ CA if st.R is None else Bm.T @ CA + st.R.T
    K = -torch.cholesky_solve(G, L)
    C_prev = _sym(C_prev + G.T @ K)
    c_prev = c_prev + G.T @ k
    return _Policy(k=k, K=K, C=C_prev, c=c_prev.view(st.site.x_prev.shape))


def _sym(M: Tensor) -> Tensor:
    return (M + M.T) / 2


# -- the rule's lines -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Quadratic:
    """Objective line: ``lambda_tau = c_tau = grad h(x_tau)`` and ``C_tau = hess h(x_tau)`` (dense,
    ``q x q`` by ``q`` Hessian-vector products; 0 for the gradient step) (003 Prop. 3.1, C.1)."""

    curvature: Curvature

    def objective(self, h: Any, output: Tensor, target: Any, horizon: int = 1) -> tuple[Tensor, Signal, None]:
        loss, out = objective_value(h, output, target)
        (lam,) = torch.autograd.grad(loss, out)
        if self.curvature is Curvature.GRADIENT:
            return loss.detach(), CostToGo(lam, C=None, c=lam), None
        H = _output_hessian(h, output, target)
        return loss.detach(), CostToGo(lam, C=_sym(H), c=lam), None


def _output_hessian(h: Any, output: Tensor, target: Any) -> Tensor:
    out = output.detach()
    H = jacrev(grad(lambda o: h(o, target).reshape(())))(out)
    return H.reshape(out.numel(), out.numel())


@dataclass(frozen=True)
class Bellman:
    """The state and weight lines of the dynamic programme (003 Prop. C.1, Algo 4).

    At stage ``t`` both lines read the stage's linear-quadratic data and Bellman step, computed once
    (:func:`_linearise`, :func:`_bellman`) and kept on the incoming signal. The weight line returns
    the gradient as a provisional direction (the roll-out replaces it) and the state line the
    cost-to-go ``signal_{t-1}``. Under ``strict`` an infeasible stage raises :class:`SolverError`.
    """

    curvature: Curvature
    gamma: float
    strict: bool = False
    max_entries: int = 1 << 26

    def stage(self, site: Site, signal: Signal) -> _Stage:
        if not isinstance(signal, CostToGo):
            raise TypeError(f"second_order: {site.label} got a {type(signal).__name__} signal; the "
                            f"dynamic-programming lines need the objective line Quadratic")
        st = signal.stages.get(site)
        if st is None:
            self._check_size(site)
            st = _linearise(site, signal, self.curvature)
            if signal.feasible:
                dw_c, at_c = {}, None
                if signal.C is None and st.Q is None:  # c_t = lambda_t: the vjp just taken
                    at_c, dw_c = site.vjp(signal.c)
                st.policy = _bellman(st, signal.C, signal.c, self.gamma, dw_c, at_c)
                if not st.policy.feasible and self.strict:
                    raise SolverError(_infeasible(self.curvature, self.gamma, site.t, st.policy.eigenvalue))
            else:
                st.policy = _Policy(eigenvalue=math.nan)
            signal.stages[site] = st
        return st

    def _check_size(self, site: Site) -> None:
        if self.curvature is Curvature.GRADIENT:
            return
        n, rho = site.x.numel(), sum(w.numel() for w in site.w.values())
        n_prev = site.x_prev.numel() if site.needs_state else 0
        entries = n * (n_prev + rho) + n * n + rho * rho
        if self.curvature is Curvature.NEWTON:
            entries += n_prev * (n_prev + rho)
        if entries > self.max_entries:
            alt = "gauss_newton(gamma, method=CG(steps))" if self.curvature is Curvature.GAUSS_NEWTON \
                else "gauss_newton(gamma, method=CG(steps)) (Newton has no matrix-free variant here)"
            raise ValueError(f"{self.curvature.value} by dynamic programming: {site.label} needs dense "
                             f"matrices of {entries} entries (state {n_prev} -> {n} over the batch, {rho} "
                             f"weights), above DP(max_entries={self.max_entries}); use {alt}")

    def weight(self, site: Site, signal: Signal) -> WeightUpdate:
        st = self.stage(site, signal)
        return WeightUpdate(st.grad, self.gamma, None)

    def state(self, site: Site, signal: Signal) -> StateUpdate:
        st = self.stage(site, signal)
        pol = st.policy
        ok = signal.feasible and pol.feasible
        return StateUpdate(CostToGo(st.lam_prev, C=pol.C if ok else None,
                                    c=pol.c if ok else st.lam_prev, feasible=ok))


def _infeasible(curvature: Curvature, gamma: float, t: int, eigenvalue: float | None) -> str:
    return (f"{curvature.value} step infeasible at gamma = {gamma:g}: at stage {t} the cost-to-go "
            f"Hessian I/gamma + Q_t + B_t^T C_t B_t is not positive definite (smallest eigenvalue "
            f"{eigenvalue:.3g}); take a smaller gamma (003 App. C.1: gamma < 1/L), or strict=False to "
            f"halve gamma until it is feasible (003 Algo 4 line 24)")


@dataclass(frozen=True)
class OutputCurvature:
    """Objective line of the autodiff Gauss-Newton methods: ``g = grad h(x_tau)`` and ``hess h``
    (dense for :class:`DualCG`, as ``v -> H v`` by a vjp of ``grad h`` for :class:`CG`)."""

    dense: bool

    def objective(self, h: Any, output: Tensor, target: Any, horizon: int = 1) -> tuple[Tensor, Signal, None]:
        loss, out = objective_value(h, output, target)
        (lam,) = torch.autograd.grad(loss, out)
        if self.dense:
            return loss.detach(), OutputModel(lam, H=_sym(_output_hessian(h, output, target))), None
        _, hvp = vjp(grad(lambda o: h(o, target).reshape(())), output.detach())
        return loss.detach(), OutputModel(lam, hvp=lambda v: hvp(v)[0]), None


# -- the oracle -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SecondOrder(Rule):
    """A gradient, Gauss-Newton or Newton step as an oracle rule (003 Sec. 3): plug it into
    :class:`~moreaugrad.Oracle` like any rule. Build it with :func:`gradient`, :func:`gauss_newton`
    or :func:`newton`; its three lines are derived from ``curvature``, ``gamma`` and ``method``.

    ``finish(tape, result)`` is the oracle's post-sweep hook: it rolls the policy out (DP) or solves
    the Gauss-Newton system by autodiff calls (:class:`DualCG`, :class:`CG`), and returns the sweep's
    result with the directions ``d_t = -v~_t/gamma``, steps ``gamma`` and per-stage reports.
    """

    objective: Any = field(init=False, repr=False)
    state: Any = field(init=False, repr=False)
    weight: Any = field(init=False, repr=False)
    curvature: Curvature = Curvature.GAUSS_NEWTON
    gamma: float = 1.0
    method: Method = field(default_factory=DP)
    strict: bool = False

    def __post_init__(self) -> None:
        owner = {Curvature.GRADIENT: "gradient", Curvature.GAUSS_NEWTON: "gauss_newton",
                 Curvature.NEWTON: "newton"}[self.curvature]
        check_positive(owner, "gamma", self.gamma)
        if not isinstance(self.method, DP | DualCG | CG):
            raise TypeError(f"{owner}: method must be second_order.DP(), DualCG() or CG(steps), got "
                            f"{type(self.method).__name__}")
        if not isinstance(self.method, DP) and self.curvature is not Curvature.GAUSS_NEWTON:
            raise ValueError(f"{owner}: method {type(self.method).__name__} solves Gauss-Newton steps "
                             f"only (003 Prop. 3.5); use DP()")
        if isinstance(self.method, DP):
            lines = Bellman(self.curvature, self.gamma, self.strict, self.method.max_entries)
            obj: Any = Quadratic(self.curvature)
        else:
            lines, obj = Grad(self.gamma), OutputCurvature(dense=isinstance(self.method, DualCG))
        object.__setattr__(self, "objective", obj)
        object.__setattr__(self, "state", lines)
        object.__setattr__(self, "weight", lines)
        super().__post_init__()

    def finish(self, tape: Tape, result: SweepResult) -> SweepResult:
        """The oracle's hook after the sweep: the step's directions, steps and reports."""
        if isinstance(self.method, DP):
            return _rollout(self, tape, result)
        return _autodiff(self, tape, result)


def gradient(gamma: float) -> SecondOrder:
    """The gradient step (003 eq. 12) by dynamic programming (Prop. C.2): back-propagation.

    ``Oracle.step`` is ``w <- w - gamma grad F(w)``; ``Oracle.backward`` writes ``grad F``.
    """
    return SecondOrder(curvature=Curvature.GRADIENT, gamma=gamma)


def gauss_newton(gamma: float, method: Method | None = None, strict: bool = False) -> SecondOrder:
    """The regularised Gauss-Newton step (003 eq. 13), an oracle rule.

    ``w^+ = argmin_w q_h(l_f(w; w_k)) + q_r(w; w_k) + ||w - w_k||^2/(2 gamma)``: the linearised chain
    under the quadratic models of ``h`` and ``r``. As ``gamma -> inf`` it is the plain Gauss-Newton
    step (one step solves a least-squares problem linear in the weights).

    Args:
        gamma: the step, a finite number > 0 (regularisation ``1/gamma``; acts on the batch mean).
        method: :class:`DP` (default, dynamic programming, dense per-stage Jacobians: control and
            small networks), :class:`DualCG` (003 Prop. 3.5) or :class:`CG` (matrix-free, for
            networks on mini-batches).
        strict: raise :class:`~moreaugrad.rules.SolverError` when the step is infeasible (``h`` not
            convex at ``x_tau``) or CG meets a non-positive curvature, instead of halving ``gamma``
            (DP) or reporting it (CG).
    """
    return SecondOrder(curvature=Curvature.GAUSS_NEWTON, gamma=gamma,
                       method=DP() if method is None else method, strict=strict)


def newton(gamma: float, strict: bool = False) -> SecondOrder:
    """The regularised Newton step (003 eq. 14) by dynamic programming (App. C, Algo 4).

    ``w^+ = argmin_w q_F(w; w_k) + ||w - w_k||^2/(2 gamma)``. The step exists only where every
    cost-to-go Hessian ``M_t = I/gamma + Q_t + B_t^T C_t B_t`` is positive definite (003 App. C.1:
    ``gamma < 1/L_F`` suffices). An infeasible step is never returned: with ``strict=False`` gamma
    is halved until the step is feasible (Algo 4 line 24) and the report says so
    (``info[t].extra["second_order"]``, :class:`StepReport`, and each stage's message); with
    ``strict=True`` it raises :class:`~moreaugrad.rules.SolverError`. Every stage must be twice
    differentiable: one that calls ReLU, max-pooling or another piecewise-linear function raises
    ``ValueError`` naming it.
    """
    return SecondOrder(curvature=Curvature.NEWTON, gamma=gamma, method=DP(), strict=strict)


# -- after the sweep: the roll-out ----------------------------------------------------------------


def _signals_in(tape: Tape, result: SweepResult) -> list[Signal]:
    """``signal_t`` entering each stage, ``t = 1..tau`` (the sweep keeps ``signal_0`` only when the
    input is a variable)."""
    return result.signals[len(result.signals) - len(tape.sites):]


def _backward(stages: list[_Stage | None], C: Tensor, c: Tensor, gamma: float) -> tuple[list[_Policy | None],
                                                                                       int | None]:
    """The backward recursion over the kept stage data at another ``gamma`` (Algo 4 line 24: re-do
    the 2nd backward pass); returns the policies and the index of the first infeasible stage met
    (the last in the chain), or None."""
    policies: list[_Policy | None] = [None] * len(stages)
    for i in reversed(range(len(stages))):
        st = stages[i]
        if st is None:
            continue
        pol = _bellman(st, C, c, gamma)
        policies[i] = pol
        if not pol.feasible:
            return policies, i
        if i > 0 and st.site.needs_state:
            C, c = pol.C, pol.c
    return policies, None


def _rollout(rule: SecondOrder, tape: Tape, result: SweepResult) -> SweepResult:
    """Roll the affine policy out on the linearised chain (003 Algo 4 lines 26-30)."""
    signals = _signals_in(tape, result)
    stages = [sig.stages.get(site) for sig, site in zip(signals, tape.sites, strict=True)]
    policies = [None if st is None else st.policy for st in stages]
    # The sweep stops the recursion at the first infeasible stage it meets, the last in the chain.
    bad = max((i for i, p in enumerate(policies) if p is not None and not p.feasible), default=None)
    report = StepReport(rule.curvature, rule.gamma, rule.gamma)
    gamma = rule.gamma
    if bad is not None:
        report = replace(report, feasible=False, stage=bad + 1, eigenvalue=policies[bad].eigenvalue)
        top = signals[-1]
        while bad is not None:
            eig = policies[bad].eigenvalue
            if report.halvings == MAX_HALVINGS or not math.isfinite(eig):
                raise SolverError(_infeasible(rule.curvature, gamma, bad + 1, eig)
                                  + f"; still infeasible after {report.halvings} halvings")
            gamma /= 2
            report = replace(report, halvings=report.halvings + 1, gamma_used=gamma)
            policies, bad = _backward(stages, top.C, top.c, gamma)
    steps: list[Tensor | None] = [None] * len(stages)
    z: Tensor | None = None  # z~_{t-1} over the flattened batch state; None while it is 0
    for i, (st, pol) in enumerate(zip(stages, policies, strict=True)):
        if st is None:  # a first stage without weights: z~_1 = A_1 z~_0 = 0
            continue
        v = None
        if st.names:
            v = pol.k if z is None or pol.K is None else pol.k + pol.K @ z
            steps[i] = v
        if rule.curvature is Curvature.GRADIENT:
            continue  # K_t = 0: the policy does not depend on z~ (Prop. C.2)
        zn = None if z is None or st.A is None else st.A @ z
        if v is not None:
            zn = st.B @ v if zn is None else zn + st.B @ v
        z = zn
    info = _info(rule, report, 0, None)
    directions = []
    for st, upd, v in zip(stages, result.directions, steps, strict=True):
        if upd is None:
            directions.append(None)
            continue
        full = st.unflatten(-v / gamma)
        directions.append(WeightUpdate({n: full[n] for n in upd.direction}, gamma, info))
    return _with(result, directions, report)


def _info(rule: SecondOrder, report: StepReport, iterations: int, solve: SolveInfo | None) -> SolveInfo:
    name = f"{rule.curvature.value} step"
    if isinstance(rule.method, DP):
        method = f"{name} by dynamic programming (003 " + (
            "Prop. C.2)" if rule.curvature is Curvature.GRADIENT else "App. C, Algo 4)")
    else:
        how = "the dual (18), 003 Prop. 3.5" if isinstance(rule.method, DualCG) else "matrix-free CG"
        method = f"{name} by {how}"
    message = ""
    if not report.feasible:
        message = (f"infeasible at gamma = {report.gamma:g} (stage {report.stage}: smallest eigenvalue "
                   f"{report.eigenvalue:.3g}); gamma halved {report.halvings} times to "
                   f"{report.gamma_used:g} (003 Algo 4 line 24)")
    if solve is None:
        return SolveInfo(method, iterations, 0.0, True, message)
    calls = f"{report.calls} jvp/vjp calls after the sweep" if report.calls else ""
    message = "; ".join(m for m in (message, solve.message, calls) if m)
    return SolveInfo(f"{method}, {solve.method}", solve.iterations, solve.residual, solve.converged, message)


def _with(result: SweepResult, directions: list[WeightUpdate | None], report: StepReport) -> SweepResult:
    info = [StageInfo(state=i.state, weight=u.info if u is not None else i.weight,
                      extra={**i.extra, "second_order": report})
            for i, u in zip(result.info, directions, strict=True)]
    return replace(result, directions=directions, info=info)


# -- after the sweep: Gauss-Newton by autodiff calls ----------------------------------------------


class _Products:
    """The chain's Jacobian as an operator on the recorded tape: ``J^T v`` (a jvp, forward through the
    stages) and ``J mu`` (a vjp on the recorded graphs), over the weights the sweep gave directions
    for (``keys``: per stage, the parameter names, or None)."""

    def __init__(self, tape: Tape, keys: list[list[str] | None]):
        self.tape, self.keys, self.calls = tape, keys, 0

    def jvp(self, v: list[Tensor]) -> Tensor:
        """``J^T v``: the tangent of ``x_tau`` for the weight tangent ``v`` (flat list, stage order)."""
        self.calls += 1
        it = iter(v)
        xdot: Tensor | None = None
        for site, keys in zip(self.tape.sites, self.keys, strict=True):
            names = list(site.w)
            tw = {}
            if keys:
                tw = {n: next(it) for n in keys}
            if xdot is None and not tw:
                continue
            w0 = [site.w[n].detach() for n in names]
            tangents = [tw.get(n, torch.zeros_like(w)) for n, w in zip(names, w0, strict=True)]
            x0 = site.x_prev.detach()
            if xdot is None:
                def fn(*ws: Tensor, site: Site = site, names: list[str] = names, x0: Tensor = x0) -> Tensor:
                    return site.phi(dict(zip(names, ws, strict=True)), x0)

                _, xdot = jvp(fn, tuple(w0), tuple(tangents))
            else:
                def fn(x: Tensor, *ws: Tensor, site: Site = site, names: list[str] = names) -> Tensor:
                    return site.phi(dict(zip(names, ws, strict=True)), x)

                _, xdot = jvp(fn, (x0, *w0), (xdot, *tangents))
        if xdot is None:
            return torch.zeros_like(self.tape.output)
        return xdot

    def vjp(self, mu: Tensor) -> list[Tensor]:
        """``J mu``: the weight cotangents for the output cotangent ``mu`` (flat list, stage order)."""
        self.calls += 1
        out: list[list[Tensor]] = []
        lam: Tensor | None = mu
        for site, keys in zip(reversed(self.tape.sites), reversed(self.keys), strict=True):
            dx, dw = site.vjp(lam)
            if keys:
                out.append([dw[n] for n in keys])
            lam = dx
            if lam is None:
                break
        return [t for ts in reversed(out) for t in ts]


def _reg_hvp(tape: Tape, keys: list[list[str] | None], v: list[Tensor]) -> list[Tensor]:
    """``hess r_t(w_t) v`` per weight, by a vjp of ``grad r`` (``torch.func``); 0 without regulariser."""
    out, it = [], iter(v)
    for site, ks in zip(tape.sites, keys, strict=True):
        for n in ks or ():
            vi = next(it)
            reg = site.regularizer
            if reg is None:
                out.append(torch.zeros_like(vi))
                continue
            _, back = vjp(grad(lambda w, reg=reg: reg(w)), site.w[n].detach())
            out.append(back(vi)[0])
    return out


def _reg_inverse(rule: SecondOrder, tape: Tape, keys: list[list[str] | None]) -> list[float]:
    """Per weight, ``1/(mu + 1/gamma)``: ``(hess r + I/gamma)^{-1}`` for ``r = 0`` or ``L2(mu)``."""
    out = []
    for site, ks in zip(tape.sites, keys, strict=True):
        reg = site.regularizer
        if ks and reg is not None and not isinstance(reg, L2):
            raise NotImplementedError(f"gauss_newton(method=DualCG()): the regulariser "
                                      f"{type(reg).__name__} of {site.label} has no closed-form "
                                      f"(hess r + I/gamma)^-1; use method=DP() or CG()")
        mu = 0.0 if reg is None else reg.mu
        out += [1.0 / (mu + 1.0 / rule.gamma)] * len(ks or ())
    return out


def _autodiff(rule: SecondOrder, tape: Tape, result: SweepResult) -> SweepResult:
    """Gauss-Newton through autodiff calls: :class:`DualCG` (003 Prop. 3.5) or :class:`CG`."""
    top = result.signals[-1]
    keys = [None if u is None else list(u.direction) for u in result.directions]
    grads = [u.direction[n] for u in result.directions if u is not None for n in u.direction]
    ops = _Products(tape, keys)
    gamma = rule.gamma
    if isinstance(rule.method, CG):
        def apply(v: list[Tensor]) -> list[Tensor]:  # (J H J^T + hess r + I/gamma) v
            jhj = ops.vjp(top.hvp(ops.jvp(v)))
            return [a + b + vi / gamma for a, b, vi in zip(jhj, _reg_hvp(tape, keys, v), v, strict=True)]

        x, solve = cg(apply, [-g for g in grads], rule.method.steps, 1, rule.method.tol)
    else:
        x, solve = _dual(rule, tape, keys, top, grads, ops)
    if (solve.message or solve.converged is False) and rule.strict:
        raise SolverError(f"gauss_newton: {solve.message} (after {solve.iterations} iterations); h must "
                          f"be convex at x_tau for a Gauss-Newton step (003 Prop. 3.5)")
    report = StepReport(rule.curvature, gamma, gamma, calls=ops.calls)
    info = _info(rule, report, solve.iterations, solve)
    it = iter(x)
    directions = [None if u is None
                  else WeightUpdate({n: -next(it) / gamma for n in u.direction}, gamma, info)
                  for u in result.directions]
    return _with(result, directions, report)


def _dual(rule: SecondOrder, tape: Tape, keys: list[list[str] | None], top: OutputModel,
          grads: list[Tensor], ops: _Products) -> tuple[list[Tensor], SolveInfo]:
    """The dual (18) of the Gauss-Newton step (003 Prop. 3.5) by CG on ``z``, ``mu = g + L z``.

    With ``H = L L^T`` (``L``: ``q x rank``, from ``eigh``) and ``M = hess r + I/gamma``, the dual's
    optimality condition multiplied by ``L^T`` is ``(I + L^T J^T M^-1 J L) z = -L^T J^T M^-1 (J g + q)``,
    a positive definite system of size ``rank H <= q``; the primal step is
    ``w~ = grad q~_r^*(-J mu) = -M^-1 (J g + q + J L z)``. Calls: one jvp for the right-hand side, a
    vjp and a jvp per CG iteration, one vjp for ``w~``.
    """
    minv = _reg_inverse(rule, tape, keys)
    e, U = torch.linalg.eigh(top.H)
    eps = torch.finfo(e.dtype).eps
    scale = float(e.abs().max()) if e.numel() else 0.0
    if e.numel() and float(e.min()) < -1e3 * eps * scale:
        msg = f"hess h(x_tau) is not positive semidefinite (smallest eigenvalue {float(e.min()):.3g})"
        if rule.strict:
            raise SolverError(f"gauss_newton: {msg}; the dual (18) needs a convex h (003 Prop. 3.5)")
        return [torch.full_like(g, math.nan) for g in grads], SolveInfo("eigh", 0, math.nan, False, msg)
    keep = e > 1e3 * eps * scale
    L = U[:, keep] * e[keep].sqrt()                        # (q, r)
    shape = tape.output.shape

    def JL(z: Tensor) -> list[Tensor]:
        return ops.vjp((L @ z).view(shape))

    def LtJtMinv(u: list[Tensor]) -> Tensor:
        return L.T @ ops.jvp([m * ui for m, ui in zip(minv, u, strict=True)]).reshape(-1)

    rhs = -LtJtMinv(grads)
    # rank H steps are exact in exact arithmetic only: at a large gamma the system is ill-conditioned,
    # so CG runs on to its tolerance (and reports the cap if it does not get there).
    (z,), solve = cg(lambda p: [p[0] + LtJtMinv(JL(p[0]))], [rhs], 10 * max(L.shape[1], 1), 1,
                     rule.method.tol)
    jlz = JL(z)
    x = [-m * (g + a) for m, g, a in zip(minv, grads, jlz, strict=True)]
    return x, solve
