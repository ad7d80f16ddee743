"""Moreau rules: back-propagate Moreau gradients instead of vjps (000 Algo 1-2, 6; 001 MBP).

With ``grad env(f)(x) = -argmin_y f(x + y) + ||y||^2/2`` (000 Sec. 1):

* objective: ``lambda_tau = beta_tau grad env(gamma_tau h)(x_tau)``;
* state:     ``lambda_{t-1} = beta_{t-1} grad env(gamma_{t-1} lambda_t^T phi_t(w_t, .))(x_{t-1})``
  (000 Prop. 2.2, Algo 2 line 4);
* weight:    ``w_t^+ = argmin_v alpha_t lambda_t^T phi_t(v, x_{t-1}) + alpha_t r_t(v) + ||v - w_t||^2/2``
  and ``d_t = (w_t - w_t^+) / alpha_t`` (Algo 2 line 5, 000 App. D.6), so ``Oracle.step`` lands
  on ``w_t^+`` and ``d_t -> grad`` as ``alpha_t -> 0``.

Each inner problem is resolved by a closed form registered for the stage type when there is one
(linear maps, elementwise activations, squared loss, cross-entropy), else by the rule's solver.
Every problem is solved for the increment (``y``, ``v - w``) and the signal or direction is read off
the increment, never as the difference of the new point and the old one (float32 cancellation).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import FunctionType
from typing import Any

import torch
from torch import Tensor, nn

from .. import envelope, kernels
from ..chain import Dynamics
from ..checks import check_positive
from ..losses import L2, CrossEntropy, SquaredLoss, functional_loss
from ..solvers import LBFGS, Pairing, Proximal, QuasiNewton, gdot
from ..types import Dual, Signal, SolveInfo, StateUpdate, WeightUpdate
from .grad import objective_value
from .registry import LineRule, check_solve, lookup, register

# -- schedules ----------------------------------------------------------------------------------


class Schedule:
    """Step sizes of the Moreau sweep, indexed as in 000 Algo 2.

    ``dual(s, tau) -> (gamma_s, beta_s)`` for the problem that produces ``lambda_s``: ``s = tau`` is
    the objective, ``s = t - 1`` the state rule of stage ``t``. ``step(t, tau) -> alpha_t`` is the
    weight step of stage ``t`` in ``1..tau``. Subclass it for other schedules (e.g. the safe steps of 000
    Prop. 2.3 from a smoothness estimate).
    """

    def dual(self, s: int, tau: int) -> tuple[float, float]:
        raise NotImplementedError

    def step(self, t: int, tau: int) -> float:
        raise NotImplementedError


@dataclass(frozen=True)
class Constant(Schedule):
    """A schedule set by one ``gamma`` and one ``alpha`` (both finite and > 0)."""

    gamma: float = 0.5
    alpha: float = 2.0

    def __post_init__(self) -> None:
        check_positive(f"{type(self).__name__} schedule", "gamma", self.gamma)
        check_positive(f"{type(self).__name__} schedule", "alpha", self.alpha)


@dataclass(frozen=True)
class Paper(Constant):
    """000 eq. 52: ``beta = 1``, constant ``gamma`` and ``alpha``.

    With ``beta = 1`` the dual shrinks by roughly ``gamma`` per stage going backward (for a linear
    stage ``lambda_{t-1} = gamma A^T lambda_t``): on the pendulum with ``gamma = 0.5`` only the last
    ~20 controls move. Use :class:`Lagrangian` for directions that tend to the gradient.
    """

    def dual(self, s: int, tau: int) -> tuple[float, float]:
        return self.gamma, 1.0

    def step(self, t: int, tau: int) -> float:
        return self.alpha


@dataclass(frozen=True)
class Geometric(Constant):
    """000 Algo 2 with ``gamma_s = gamma^(tau - s + 1)``, ``beta_s = 1/gamma_s`` and
    ``alpha_t = alpha gamma_{t+1}`` (000 Sec. 4, App. E.2.1; ``gamma_{tau+1} = 1``)."""

    def dual(self, s: int, tau: int) -> tuple[float, float]:
        g = self.gamma ** (tau - s + 1)
        return g, 1.0 / g

    def step(self, t: int, tau: int) -> float:
        return self.alpha * self.gamma ** (tau - t)


@dataclass(frozen=True)
class Lagrangian(Constant):
    """000 eq. 9: ``beta = 1/gamma``, constant ``gamma`` and ``alpha``; tends to backprop as
    ``gamma, alpha -> 0`` and does not decay along the chain."""

    def dual(self, s: int, tau: int) -> tuple[float, float]:
        return self.gamma, 1.0 / self.gamma

    def step(self, t: int, tau: int) -> float:
        return self.alpha


@dataclass(frozen=True)
class PerStage(Schedule):
    """Explicit steps: ``gamma[s]``, ``beta[s]`` for ``s = 0..tau`` and ``alpha[t-1]`` for ``t = 1..tau``."""

    gamma: tuple[float, ...]
    beta: tuple[float, ...]
    alpha: tuple[float, ...]

    def __post_init__(self) -> None:
        for name in ("gamma", "beta", "alpha"):
            values = tuple(self.__dict__[name])
            object.__setattr__(self, name, values)
            for i, v in enumerate(values):
                check_positive("PerStage schedule", f"{name}[{i}]", v)
        if len(self.gamma) != len(self.beta) or len(self.gamma) != len(self.alpha) + 1:
            raise ValueError(f"PerStage schedule: need len(gamma) == len(beta) == len(alpha) + 1 "
                             f"(tau + 1, tau + 1, tau), got {len(self.gamma)}, {len(self.beta)}, "
                             f"{len(self.alpha)}")

    def _tau(self, tau: int) -> None:
        if tau != len(self.alpha):
            raise ValueError(f"PerStage schedule: built for {len(self.alpha)} stages, the chain has {tau}")

    def dual(self, s: int, tau: int) -> tuple[float, float]:
        self._tau(tau)
        return self.gamma[s], self.beta[s]

    def step(self, t: int, tau: int) -> float:
        self._tau(tau)
        return self.alpha[t - 1]


# -- the rule -----------------------------------------------------------------------------------

PAPER_STEPS = QuasiNewton(tol=None, max_iter=2)
"""The default generic solver: the paper's two quasi-Newton steps (000 App. E.2.1), for the layers'
subproblems (the objective line solves to a tolerance instead: :func:`objective_solver`)."""


@dataclass(frozen=True)
class Moreau(LineRule):
    """The Moreau rule for any line: objective, state and weight (000 Algo 2).

    Args:
        schedule: the steps ``gamma, beta, alpha`` (default :class:`Paper`, 000 eq. 52).
        solver: the generic solver for stages without a closed form (default: the paper's two
            quasi-Newton steps, 000 App. E.2.1).
        solvers: per-stage overrides, ``{t: solver}`` with ``t`` in ``1..tau``.
        closed_forms: use registered closed forms where they exist (turn off to check them).
        warm_start: start generic solves from the linearised solution (one unit gradient step
            from 0, i.e. the vjp) instead of 0.
        strict: raise :class:`SolverError` on a non-finite iterate or a subproblem found not to be
            strongly convex; otherwise both are reported in the result's info.
    """

    schedule: Schedule = field(default_factory=Paper)
    solver: Any = PAPER_STEPS
    solvers: dict[int, Any] = field(default_factory=dict)
    closed_forms: bool = True
    warm_start: bool = False
    strict: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.schedule, Schedule):
            raise TypeError(f"moreau: schedule must be a Schedule (Paper, Geometric, Lagrangian, "
                            f"PerStage), got {type(self.schedule).__name__}")
        for t, s in {0: self.solver, **self.solvers}.items():
            if not hasattr(s, "solve"):
                raise TypeError(f"moreau: solver{'' if t == 0 else f's[{t}]'} must have a "
                                f".solve(fun, z0) method, got {type(s).__name__}")

    def solver_for(self, t: int) -> Any:
        return self.solvers.get(t, self.solver)

    def objective(self, h: Any, output: Tensor, target: Any,
                  horizon: int) -> tuple[Tensor, Signal, SolveInfo | None]:
        """``lambda_tau = beta grad env(gamma h)(x_tau)``, by a closed form for ``type(h)`` if any
        (ours, torch's losses and their ``torch.nn.functional`` forms), else solved to a tolerance
        (:func:`objective_solver`)."""
        loss, _ = objective_value(h, output, target)  # validates h and gives the loss
        gamma, beta = self.schedule.dual(horizon, horizon)
        entry = lookup(self, "objective", h) if self.closed_forms else GENERIC["objective"]
        env, info = entry(self, h, output.detach(), target, gamma)
        check_solve(type(self).__name__, self.strict, "objective subproblem", info)
        return loss.detach(), Dual(beta * env), info

    def entry(self, line: str, site: Any) -> Any:
        return lookup(self, line, site.stage.module) if self.closed_forms else GENERIC[line]


# -- generic entries: any stage, any objective --------------------------------------------------


def _solve(rule: Moreau, t: int, fun: Any, z0: list[Tensor], start: Any = None,
           scale: Tensor | None = None) -> tuple[list[Tensor], SolveInfo]:
    if scale is None:
        return rule.solver_for(t).solve(fun, z0, start)
    return rule.solver_for(t).solve(fun, z0, start, scale=scale)


def generic_state(rule: Moreau, site: Any, signal: Signal) -> StateUpdate:
    """``y* = argmin_y gamma lam^T phi_t(w_t, x + y) + ||y||^2/2`` by the rule's solver, per sample;
    ``lambda_{t-1} = -beta y*``."""
    gamma, beta = rule.schedule.dual(site.t - 1, site.horizon)
    lam = signal.dual(site.x.detach())
    x = site.x_prev.detach()
    B = site.groups

    # gamma <lam, phi_t(w, x + y) - x_t>: relative to the constant gamma <lam, x_t>, so that values
    # resolve a small move.
    fun = Proximal(Pairing(lambda z: site.phi(x=x + z[0]), lam, site.x.detach(), gamma, B), B)

    # At y = 0 the value and gradient come from the recorded graph: F = 0, grad F = gamma vjp_x(lam).
    g0 = gamma * site.vjp(lam, weights=False)[0]
    if rule.warm_start:
        (y,), info = _solve(rule, site.t, fun, [-g0], scale=gdot([g0], [g0], B).sqrt())
    else:
        f0 = torch.zeros(B, dtype=x.dtype, device=x.device)
        (y,), info = _solve(rule, site.t, fun, [torch.zeros_like(x)], (f0, [g0]))
    return StateUpdate(Dual(-beta * y), info)


def generic_weight(rule: Moreau, site: Any, signal: Signal) -> WeightUpdate:
    """``v* = argmin_v alpha lam^T phi_t(v, x) + alpha r_t(v) + ||v - w||^2/2`` by the rule's
    solver; ``d_t = (w - v*) / alpha``."""
    alpha = rule.schedule.step(site.t, site.horizon)
    lam = signal.dual(site.x.detach())
    names = list(site.w)
    w = [site.w[n].detach() for n in names]
    reg = site.regularizer

    x_t = site.x.detach()

    def data(z: list[Tensor]) -> Tensor:
        # Relative to the value at z = 0, so that values resolve a small move. The data term sums
        # over the samples (of every shard, for a data-parallel exact oracle); the proximal term not.
        v = [wi + zi for wi, zi in zip(w, site.replicated(z), strict=True)]
        (val,) = site.summed([alpha * gdot([lam], [site.phi(dict(zip(names, v, strict=True))) - x_t], 1)])
        if reg is not None:  # replicated on every shard: on z itself, never summed
            val = val + alpha * sum(reg(wi + zi) - reg(wi) for wi, zi in zip(w, z, strict=True))
        return val

    fun = Proximal(data, 1)

    g0 = site.vjp(lam)[1]
    if reg is not None:
        g0 = {n: g0[n] + reg.grad(wi) for n, wi in zip(names, w, strict=True)}
    if rule.warm_start:
        scale = gdot([alpha * g0[n] for n in names], [alpha * g0[n] for n in names], 1).sqrt()
        z, info = _solve(rule, site.t, fun, [-alpha * g0[n] for n in names], scale=scale)
    else:
        # At v = w the value and gradient come from the recorded graph (no re-evaluation).
        f0 = torch.zeros(1, dtype=x_t.dtype, device=x_t.device)
        z, info = _solve(rule, site.t, fun, [torch.zeros_like(wi) for wi in w],
                         (f0, [alpha * g0[n] for n in names]))
    return WeightUpdate({n: torch.div(zi, -alpha) for n, zi in zip(names, z, strict=True)}, alpha, info)


def generic_objective(rule: Moreau, h: Any, z: Tensor, target: Any, gamma: float) -> tuple[Tensor, SolveInfo]:
    """``grad env(gamma h)(z) = -argmin_y gamma h(z + y) + ||y||^2/2`` (``h`` couples the batch),
    solved by :func:`objective_solver`."""

    h0 = h(z, target).detach()

    def fun(v: list[Tensor]) -> Tensor:
        (y,) = v
        # Relative to gamma h(z), so that values resolve a small move.
        return (gamma * (h(z + y, target) - h0) + 0.5 * y.pow(2).sum()).reshape(1)

    (y,), info = objective_solver(rule).solve(fun, [torch.zeros_like(z)])
    return -y, info


OBJECTIVE_SOLVER = LBFGS(tol=1e-10, max_iter=500)
"""The objective line's solver for a loss without a closed form under the default solver: the
paper's two quasi-Newton steps are meant for the layers' subproblems, and the objective's problem
(one loss evaluation per iteration) is cheap to solve to a tolerance."""


def objective_solver(rule: Any) -> Any:
    """The rule's solver, fixed steps included, unless it is the default :data:`PAPER_STEPS`:
    then :data:`OBJECTIVE_SOLVER`."""
    return OBJECTIVE_SOLVER if rule.solver == PAPER_STEPS else rule.solver


GENERIC = {"state": generic_state, "weight": generic_weight, "objective": generic_objective}
register(Moreau, "state")(generic_state)
register(Moreau, "weight")(generic_weight)
register(Moreau, "objective", object)(generic_objective)


# -- closed forms -------------------------------------------------------------------------------

LINEAR = (nn.Linear, nn.Identity, nn.Conv1d, nn.Conv2d, nn.Conv3d,
          nn.ConvTranspose1d, nn.ConvTranspose2d, nn.Flatten, nn.Unflatten, nn.AvgPool1d, nn.AvgPool2d,
          nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)


@register(Moreau, "state", *LINEAR)
def linear_state(rule: Moreau, site: Any, signal: Signal) -> StateUpdate:
    """``phi_t`` affine in ``x``: ``grad env(gamma lam^T phi)(x) = gamma A^T lam``, so
    ``lambda_{t-1} = beta gamma vjp_x(lam)`` exactly."""
    gamma, beta = rule.schedule.dual(site.t - 1, site.horizon)
    dx, _ = site.vjp(signal.dual(site.x.detach()), weights=False)
    return StateUpdate(Dual((beta * gamma) * dx), SolveInfo("closed form: linear"))


@register(Moreau, "weight", *LINEAR)
def linear_weight(rule: Moreau, site: Any, signal: Signal) -> WeightUpdate:
    """``phi_t`` linear in ``w`` (Linear, Conv): ``w^+ = prox_{alpha r}(w - alpha vjp_w(lam))`` and
    ``d_t = (w - w^+)/alpha``; without ``r`` this is the vjp itself."""
    alpha = rule.schedule.step(site.t, site.horizon)
    _, dw = site.vjp(signal.dual(site.x.detach()))
    reg = site.regularizer
    if reg is None:
        return WeightUpdate(dw, alpha, SolveInfo("closed form: linear"))
    if isinstance(reg, L2):  # (w - prox(w - alpha g)) / alpha, without the round trip through w^+
        d = {n: (g + reg.mu * site.w[n].detach()) / (1 + alpha * reg.mu) for n, g in dw.items()}
        return WeightUpdate(d, alpha, SolveInfo("closed form: linear"))
    if not hasattr(reg, "prox"):  # a custom regulariser without a prox: solve the problem as is
        return generic_weight(rule, site, signal)
    d = {}
    for n, g in dw.items():
        w = site.w[n].detach()
        d[n] = (w - reg.prox(w - alpha * g, alpha)) / alpha
    return WeightUpdate(d, alpha, SolveInfo("closed form: linear"))


@register(Moreau, "weight", Dynamics)
def dynamics_weight(rule: Moreau, site: Any, signal: Signal) -> WeightUpdate:
    """A dynamics step declared affine in its control (``Chain.from_dynamics(..., affine=True)``)
    takes the linear closed form (the vjp); any other goes to the generic solver."""
    if site.stage.module.affine:
        return linear_weight(rule, site, signal)
    return generic_weight(rule, site, signal)


@register(Moreau, "state", *envelope.ACTIVATIONS)
def activation_state(rule: Moreau, site: Any, signal: Signal) -> StateUpdate:
    """Elementwise ``sigma``: ``u = argmin_u gamma lam sigma(u) + (u - x)^2/2`` per entry and
    ``lambda_{t-1} = beta (x - u)``."""
    gamma, beta = rule.schedule.dual(site.t - 1, site.horizon)
    x = site.x_prev.detach()
    prim = envelope.primitive(site.stage.module)
    if prim is None:  # parameters without a closed form (Softplus beta <= 0, ELU alpha < 0)
        return generic_state(rule, site, signal)
    lam = signal.dual(site.x.detach())
    c = lam if gamma == 1 else gamma * lam
    if isinstance(prim, envelope.ReLUProx):  # x - u directly, scaled in place: no extra passes
        if kernels.compiling() and lam.shape == x.shape:
            return StateUpdate(Dual(kernels.moreau_relu(x, lam, gamma, beta)),
                               SolveInfo("closed form: piecewise linear"))
        if c.shape != x.shape or x.dim() == 0:
            moved = prim.moved(x, c)
        else:  # block by block (kernels.blocks): its passes stay in cache
            moved = torch.empty_like(x)
            for xs, cs, out in kernels.blocks(x, c, moved):
                prim.moved(xs, cs, out)
        return StateUpdate(Dual(moved if beta == 1 else moved.mul_(beta)),
                           SolveInfo("closed form: piecewise linear"))
    y, info = prim.increment(x, c)
    return StateUpdate(Dual(-beta * y), info)


@register(Moreau, "state", nn.MaxPool1d, nn.MaxPool2d)
def max_pool_state(rule: Moreau, site: Any, signal: Signal) -> StateUpdate:
    """Max pooling over windows that tile the input: the problem separates per window
    (:func:`~moreaugrad.envelope.max_pool_increment`) and ``lambda_{t-1} = -beta y``; overlapping or
    padded pooling goes to the generic solver."""
    kernel = envelope.pool_windows(site.stage.module)
    if kernel is None:
        return generic_state(rule, site, signal)
    gamma, beta = rule.schedule.dual(site.t - 1, site.horizon)
    lam = signal.dual(site.x.detach())
    y, info = envelope.max_pool_increment(site.x_prev.detach(), lam if gamma == 1 else gamma * lam, kernel)
    return StateUpdate(Dual(y.mul_(-beta)), info)  # y is a fresh tensor: scaled in place


@register(Moreau, "objective", SquaredLoss)
def squared_objective(rule: Moreau, h: SquaredLoss, z: Tensor, target: Tensor,
                      gamma: float) -> tuple[Tensor, SolveInfo]:
    y = target
    if not y.is_floating_point():
        y = torch.nn.functional.one_hot(y.long(), z.shape[1]).to(z.dtype)
    return envelope.squared_loss_env(z, y, gamma), SolveInfo("closed form: squared loss")


@register(Moreau, "objective", CrossEntropy)
def cross_entropy_objective(rule: Moreau, h: CrossEntropy, z: Tensor, target: Tensor,
                            gamma: float) -> tuple[Tensor, SolveInfo]:
    return envelope.cross_entropy_env(z, target, gamma)


@register(Moreau, "objective", *envelope.TORCH_LOSSES)
def torch_loss_objective(rule: Moreau, h: nn.Module, z: Tensor, target: Any,
                         gamma: float) -> tuple[Tensor, SolveInfo]:
    """torch's losses (``nn.CrossEntropyLoss``, ``nn.MSELoss``, ...) in closed form with their exact
    reduction and options (:func:`envelope.torch_loss_env`); the solver where it has none."""
    out = envelope.torch_loss_env(h, z, target, gamma)
    return out if out is not None else generic_objective(rule, h, z, target, gamma)


@register(Moreau, "objective", FunctionType)
def functional_objective(rule: Moreau, h: Any, z: Tensor, target: Any,
                         gamma: float) -> tuple[Tensor, SolveInfo]:
    """A ``torch.nn.functional`` loss (``F.cross_entropy``, ``F.mse_loss``, ...), called with its
    default arguments, is its module's closed form; any other function goes to the solver."""
    module = functional_loss(h)
    if module is None:
        return generic_objective(rule, h, z, target, gamma)
    return torch_loss_objective(rule, module, z, target, gamma)


def moreau(gamma: float = 0.5, alpha: float = 2.0, schedule: Schedule | None = None,
           solver: Any = None, solvers: dict[int, Any] | None = None, closed_forms: bool = True,
           warm_start: bool = False, strict: bool = False) -> Any:
    """The Moreau oracle on every line (000 Algo 1-2, 6): MorGD is ``Oracle.step``; MorSGD is this
    rule's directions in ``torch.optim.SGD``; Adam takes the same directions (001 Sec. 3).

    Args:
        gamma: the state step of the default :class:`Paper` schedule (000 eq. 52).
        alpha: the weight step of the default :class:`Paper` schedule (000 eq. 52).
        schedule: another schedule (:class:`Geometric`, :class:`Lagrangian`, :class:`PerStage`);
            overrides ``gamma`` and ``alpha``.
        solver: generic inner solver (default: the paper's two quasi-Newton steps,
            ``QuasiNewton(tol=None, max_iter=2)``, 000 App. E.2.1).
        solvers: per-stage solver overrides ``{t: solver}``, ``t`` in ``1..tau``.
        closed_forms: use the registered closed forms (see :class:`Moreau`).
        warm_start: start generic solves at the linearised step (see :class:`Moreau`).
        strict: raise on a failed inner solve (see :class:`Moreau`).
    """
    from . import Rule

    if schedule is None:
        check_positive("moreau", "gamma", gamma)
        check_positive("moreau", "alpha", alpha)
    sched = schedule if schedule is not None else Paper(gamma, alpha)
    solver = solver if solver is not None else PAPER_STEPS
    rule = Moreau(sched, solver, dict(solvers or {}), closed_forms, warm_start, strict)
    return Rule(objective=rule, state=rule, weight=rule)

