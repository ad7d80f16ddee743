"""Target and proximal rules: ProxProp, penalty back-propagation, (regularised) target propagation and
the augmented Lagrangian (004; 000 Sec. 3.2, App. D.4-D.6, Algo 7-13; 001 IBP).

These rules propagate targets ``x_t^+``. A dual signal ``lambda_t`` met on the way is read as the
target ``x_t^+ = x_t - lambda_t / beta`` with the rule's own ``beta`` (001: ``x_t^+ = x_t - lambda_t``).

With ``r_t = x_t - x_t^+`` and ``lambda_t^+ = beta r_t`` (000 Fact D.3), the augmented-Lagrangian
lines are (000 Algo 8-9):

* objective: ``x_tau^+ = argmin_y h(y) + (kappa + 1/gamma)/2 ||y - x_tau||^2``;
* state:  ``x_{t-1}^+ = argmin_y beta r_t^T phi_t(w_t, y) + (1/gamma + kappa)/2 ||y - x_{t-1}||^2
  + kappa/2 ||phi_t(w_t, y) - x_t^+||^2``;
* weight: ``w_t^+ = argmin_v beta r_t^T phi_t(v, x_{t-1}) + ||v - w_t||^2/(2 alpha)
  + kappa/2 ||phi_t(v, x_{t-1}) - x_t^+||^2``, ``d_t = (w_t - w_t^+)/alpha`` (``alpha = inf``: step 1).

``kappa = 0`` is the Moreau sweep; ``beta = 0`` is regularised target propagation (Algo 12-13,
Fact D.5); ``beta = 0, gamma = alpha = inf`` without the state's proximal term is plain target
propagation (Algo 10-11, eq. 40): ``x_{t-1}^+ = argmin_y ||phi_t(w_t, y) - x_t^+||^2/2`` from
``y = x_{t-1}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import envelope
from ..checks import check_positive
from ..lstsq import CG, Exact, Method, solve_state, solve_weight
from ..solvers import LBFGS, gdot
from ..types import Dual, Signal, SolveInfo, StateUpdate, Target, WeightUpdate
from .grad import Grad, objective_value, regularized
from .moreau import LINEAR, Moreau
from .registry import LineRule, check_solve, lookup, register

INF = math.inf


def _check_nonneg(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0 or value == INF:
        raise ValueError(f"{owner}: {name} must be a finite number >= 0, got {value!r}")


def _check_step(owner: str, name: str, value: Any) -> None:
    """A step in ``(0, inf]``: ``inf`` drops the proximal term."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ValueError(f"{owner}: {name} must be a number > 0 (inf allowed), got {value!r}")


def _check_method(owner: str, method: Any) -> None:
    if not isinstance(method, Exact | CG):
        raise TypeError(f"{owner}: method must be lstsq.Exact() or lstsq.CG(steps), got "
                        f"{type(method).__name__}")


def _target(signal: Signal, x: Tensor, beta: float) -> Tensor:
    """``x^+``: the signal itself, or ``x - lambda / beta`` (``beta = 1`` when the rule has none)."""
    return signal.target(x, beta if beta > 0 else 1.0)


# -- 004 Algo 1: back-propagation as gradient steps on the penalty energy -----------------------


@dataclass(frozen=True)
class Explicit(LineRule):
    """Explicit gradient steps on the penalty energy with ``rho = gamma = 1/tau`` (004 Algo 1, eq. 3).

    objective ``x_tau^+ = x_tau - tau grad h``; state ``x_{t-1}^+ = x_{t-1} - J_x^T (x_t - x_t^+)``;
    weight ``w_t^+ = w_t - J_w^T (x_t - x_t^+)`` with step ``tau``. 004 Prop. 1: the update is one
    gradient-descent step of size ``tau`` on ``h o f``.
    """

    tau: float = 1.0

    def __post_init__(self) -> None:
        check_positive("penalty_backprop", "tau", self.tau)

    def objective(self, h: Any, output: Tensor, target: Any, horizon: int) -> tuple[Tensor, Signal, None]:
        loss, out = objective_value(h, output, target)
        (g,) = torch.autograd.grad(loss, out)
        return loss.detach(), Target(output.detach() - self.tau * g), None

    def state(self, site: Any, signal: Signal) -> StateUpdate:
        x = site.x.detach()
        dx, _ = site.vjp(x - _target(signal, x, 1 / self.tau), weights=False)
        return StateUpdate(Target(site.x_prev.detach() - dx))

    def weight(self, site: Any, signal: Signal) -> WeightUpdate:
        x = site.x.detach()
        _, dw = site.vjp(x - _target(signal, x, 1 / self.tau))
        return WeightUpdate(regularized(site, {n: g / self.tau for n, g in dw.items()}), self.tau,
                            SolveInfo("vjp"))


# -- ProxProp (004 eq. 11) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Proximal(LineRule):
    """ProxProp's weight rule (004 eq. 11, Prop. 2): with the target ``z_t = x_t - tau lambda_t``,

        ``w_t^+ = argmin_v ||phi_t(v, x_{t-1}) - z_t||^2/2 + ||v - w_t||^2/(2 tau_theta)``,

    ``d_t = (w_t - w_t^+)/tau = (I/tau_theta + A^T A)^{-1} grad_{w_t}`` for ``phi_t`` linear in ``w``
    (a Gauss-Newton step otherwise), with step ``tau``. The last stage with weights stays explicit
    (004 eq. 12) unless ``explicit_last=False``. A regulariser ``r_t`` enters explicitly: ``d_t +=
    grad r_t(w_t)``.

    Args:
        tau_theta: the proximal step (the metric), > 0.
        tau: the step of ``Oracle.step`` and of the targets, > 0.
        method: ``lstsq.Exact()`` (004 eq. 44 for Linear and Conv2d) or ``lstsq.CG(k)``.
    """

    tau_theta: float = 1.0
    tau: float = 1.0
    method: Method = field(default_factory=lambda: CG(3))
    explicit_last: bool = True

    def __post_init__(self) -> None:
        check_positive("proxprop", "tau_theta", self.tau_theta)
        check_positive("proxprop", "tau", self.tau)
        _check_method("proxprop", self.method)

    def weight(self, site: Any, signal: Signal) -> WeightUpdate:
        x = site.x.detach()
        r = x - _target(signal, x, 1 / self.tau)  # = tau lambda
        if self.explicit_last and site.last_weighted:  # 004 eq. 12: d = grad = J_w^T lambda, lambda = r / tau
            # a dual signal is passed as is, so the state line's vjp is shared
            _, dw = site.vjp(signal.value if isinstance(signal, Dual) else r / self.tau)
            return WeightUpdate(regularized(site, dw), self.tau, SolveInfo("vjp"))
        delta, info = solve_weight(site, r, 0.0, 1.0, 1 / self.tau_theta, self.method)
        return WeightUpdate(regularized(site, {n: -d / self.tau for n, d in delta.items()}), self.tau, info)


# -- the augmented Lagrangian family -------------------------------------------------------------


@dataclass(frozen=True)
class Augmented(LineRule):
    """The augmented-Lagrangian rule for any line (000 Algo 8-9; see the module docstring).

    Args:
        kappa: the penalty ``kappa >= 0``.
        beta: the dual step ``beta >= 0`` (0: penalty formulation, target propagation).
        gamma: the state (and objective) proximal step in ``(0, inf]``.
        alpha: the weight proximal step in ``(0, inf]``.
        proximal: False drops the state's proximal term entirely (plain target propagation).
        method: linear solves on stages linear in the variable: ``Exact()`` or ``CG(k)``.
        solver: the generic solver for every other stage.
        strict: raise on a non-finite iterate or a subproblem found not to be strongly convex.
    """

    kappa: float = 0.0
    beta: float = 1.0
    gamma: float = INF
    alpha: float = INF
    proximal: bool = True
    method: Method = field(default_factory=Exact)
    solver: Any = field(default_factory=lambda: LBFGS(tol=1e-8, max_iter=100))
    strict: bool = False

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_nonneg(name, "kappa", self.kappa)
        _check_nonneg(name, "beta", self.beta)
        _check_step(name, "gamma", self.gamma)
        _check_step(name, "alpha", self.alpha)
        _check_method(name, self.method)
        if not hasattr(self.solver, "solve"):
            raise TypeError(f"{name}: solver must have a .solve(fun, z0) method, got "
                            f"{type(self.solver).__name__}")
        if self.kappa == 0 and (self.gamma == INF or self.alpha == INF):
            raise ValueError(f"{name}: with kappa = 0 both gamma and alpha must be finite (else a "
                             f"subproblem has no minimiser), got gamma={self.gamma}, alpha={self.alpha}")

    @property
    def c_state(self) -> float:
        return (1 / self.gamma + self.kappa) if self.proximal else 0.0

    @property
    def c_weight(self) -> float:
        return 1 / self.alpha

    @property
    def step(self) -> float:
        return self.alpha if self.alpha < INF else 1.0

    def objective(self, h: Any, output: Tensor, target: Any, horizon: int) -> tuple[Tensor, Signal, Any]:
        """``x_tau^+ = x_tau - grad env(h / m)(x_tau)``, ``m = kappa + 1/gamma`` (Algo 9, 11, 13)."""
        loss, _ = objective_value(h, output, target)
        m = self.kappa + 1 / self.gamma
        z = output.detach()
        moreau = Moreau(solver=self.solver)
        env, info = lookup(moreau, "objective", h)(moreau, h, z, target, 1 / m)
        check_solve(type(self).__name__, self.strict, "objective subproblem", info)
        return loss.detach(), Target(z - env), info

    def terms(self, site: Any, signal: Signal) -> tuple[Tensor, Tensor, float, float]:
        """``(x_t^+, r_t, scale, kappa)`` of the subproblems; plain TP solves ``||phi - x^+||^2/2``."""
        x = site.x.detach()
        xp = _target(signal, x, self.beta)
        scale, kappa = (self.beta, self.kappa) if self.proximal else (0.0, 1.0)
        return xp, x - xp, scale, kappa


@register(Augmented, "state", *LINEAR)
def augmented_linear_state(rule: Augmented, site: Any, signal: Signal) -> StateUpdate:
    """``phi_t`` affine in ``x``: ``delta = -(beta + kappa)(kappa A^T A + c I)^{-1} A^T r``."""
    _, r, scale, kappa = rule.terms(site, signal)
    delta, info = solve_state(site, r, scale, kappa, rule.c_state, rule.method, site.groups)
    return StateUpdate(Target(site.x_prev.detach() + delta), info)


@register(Augmented, "weight", *LINEAR)
def augmented_linear_weight(rule: Augmented, site: Any, signal: Signal) -> WeightUpdate:
    """``phi_t`` linear in ``w``: ``Delta = -(beta + kappa)(kappa A^T A + I/alpha)^{-1} A^T r``."""
    _, r, _, _ = rule.terms(site, signal)
    delta, info = solve_weight(site, r, rule.beta, rule.kappa, rule.c_weight, rule.method)
    return WeightUpdate(regularized(site, {n: -d / rule.step for n, d in delta.items()}), rule.step, info)


@register(Augmented, "state", nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.Hardsigmoid)
def augmented_piecewise_state(rule: Augmented, site: Any, signal: Signal) -> StateUpdate:
    """Elementwise and piecewise linear: on each piece ``sigma(u) = s u + b`` the objective
    ``scale r s u + c/2 (u - x)^2 + kappa/2 (s u + b - t)^2`` is a quadratic minimised in closed
    form and clipped to the piece; the best piece wins, ties going to the smallest change
    ``|u - x|`` (the regularised projection of ReLU, 000 Sec. 3.2)."""
    pw = envelope.activation(site.stage.module)
    xp, r, scale, kappa = rule.terms(site, signal)
    x = site.x_prev.detach()
    c = rule.c_state
    edges = [-INF, *pw.knots, INF]
    best_u = best_v = best_dist = None
    for j, s in enumerate(pw.slopes):
        lo, hi = edges[j], edges[j + 1]
        inside = x.clamp(lo, hi)
        b = pw.fn(inside) - s * inside
        den = c + kappa * s * s
        if den > 0:
            u = ((c * x - scale * r * s - kappa * s * (b - xp)) / den).clamp(lo, hi)
        else:  # flat piece, no proximal term: every point is optimal; take the closest to x
            u = inside
        v = scale * r * pw.fn(u) + 0.5 * c * (u - x) ** 2 + 0.5 * kappa * (pw.fn(u) - xp) ** 2
        dist = (u - x).abs()
        if best_u is None:
            best_u, best_v, best_dist = u, v, dist
        else:
            tol = 16 * torch.finfo(best_v.dtype).eps * (1 + best_v.abs())
            better = (v < best_v - tol) | ((v <= best_v + tol) & (dist < best_dist))
            best_u = torch.where(better, u, best_u)
            best_v = torch.where(better, v, best_v)
            best_dist = torch.where(better, dist, best_dist)
    return StateUpdate(Target(best_u), SolveInfo("closed form: piecewise linear"))


_INVERSES = {nn.Tanh: (torch.atanh, -1.0, 1.0), nn.Sigmoid: (torch.logit, 0.0, 1.0)}


@register(Augmented, "state", nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Softplus)
def augmented_smooth_state(rule: Augmented, site: Any, signal: Signal) -> StateUpdate:
    """Smooth activations. With ``kappa = 0`` the problem is the Moreau one,
    ``u = argmin (beta r / c) sigma(u) + (u - x)^2/2``, solved by the 1-D closed form (with its
    exact strong-convexity check). Plain target propagation inverts Tanh and Sigmoid exactly,
    clipping targets into the open range (reported). Anything else goes to the generic solver."""
    xp, r, scale, kappa = rule.terms(site, signal)
    if rule.proximal and kappa == 0:
        x = site.x_prev.detach()
        u, info = envelope.activation(site.stage.module).prox(x, (scale / rule.c_state) * r)
        return StateUpdate(Target(u), info)
    if rule.proximal or type(site.stage.module) not in _INVERSES:
        return augmented_generic_state(rule, site, signal)
    inv, lo, hi = _INVERSES[type(site.stage.module)]
    eps = torch.finfo(xp.dtype).eps ** 0.5
    clipped = (xp <= lo + eps) | (xp >= hi - eps)
    n = int(clipped.sum())
    message = f"{n} targets outside the range of {site.stage.type_name} were clipped" if n else ""
    info = SolveInfo("closed form: inverse", 0, 0.0, n == 0, message)
    return StateUpdate(Target(inv(xp.clamp(lo + eps, hi - eps))), info)


@register(Augmented, "state")
def augmented_generic_state(rule: Augmented, site: Any, signal: Signal) -> StateUpdate:
    """The state subproblem by the rule's solver, per sample."""
    xp, r, scale, kappa = rule.terms(site, signal)
    x = site.x_prev.detach()
    c = rule.c_state
    B = site.groups

    def fun(z: list[Tensor]) -> Tensor:
        (d,) = z
        out = site.phi(x=x + d)
        val = 0.5 * c * gdot([d], [d], B) + 0.5 * kappa * gdot([out - xp], [out - xp], B)
        return val + scale * gdot([r], [out], B) if scale else val

    x_t = site.x.detach()
    f0 = 0.5 * kappa * gdot([r], [r], B) + (scale * gdot([r], [x_t], B) if scale else 0)
    g0, _ = site.vjp((scale + kappa) * r, weights=False)
    (d,), info = rule.solver.solve(fun, [torch.zeros_like(x)], (f0, [g0]))
    return StateUpdate(Target(x + d), info)


@register(Augmented, "weight")
def augmented_generic_weight(rule: Augmented, site: Any, signal: Signal) -> WeightUpdate:
    """The weight subproblem by the rule's solver."""
    xp, r, _, _ = rule.terms(site, signal)
    names = list(site.w)
    w = [site.w[n].detach() for n in names]
    scale, kappa, c = rule.beta, rule.kappa, rule.c_weight

    def fun(z: list[Tensor]) -> Tensor:
        out = site.phi({n: wi + zi for n, wi, zi in zip(names, w, z, strict=True)})
        val = 0.5 * c * gdot(z, z, 1) + 0.5 * kappa * gdot([out - xp], [out - xp], 1)
        return val + scale * gdot([r], [out], 1) if scale else val

    x_t = site.x.detach()
    f0 = 0.5 * kappa * gdot([r], [r], 1) + (scale * gdot([r], [x_t], 1) if scale else 0)
    _, g0 = site.vjp((scale + kappa) * r)
    z, info = rule.solver.solve(fun, [torch.zeros_like(wi) for wi in w], (f0, [g0[n] for n in names]))
    return WeightUpdate(regularized(site, {n: -zi / rule.step for n, zi in zip(names, z, strict=True)}),
                        rule.step, info)


# -- presets -------------------------------------------------------------------------------------


def proxprop(tau_theta: float = 1.0, tau: float = 1.0, method: Method | None = None) -> Any:
    """ProxProp (004 Algo 2): grad on the objective and state lines, ``Proximal`` on the weights
    (the last stage with weights explicit). Default ``method``: 3 CG steps (004 Sec. 5.1)."""
    from . import Rule

    return Rule(objective=Grad(), state=Grad(),
                weight=Proximal(tau_theta, tau, method if method is not None else CG(3)))


def penalty_backprop(tau: float = 1.0) -> Any:
    """Back-propagation as explicit steps on the penalty energy (004 Algo 1); equals gradient
    descent with step ``tau`` (004 Prop. 1)."""
    from . import Rule

    rule = Explicit(tau)
    return Rule(objective=rule, state=rule, weight=rule)


def target_prop(kappa: float = 1.0, method: Method | None = None, solver: Any = None) -> Any:
    """Plain target propagation (000 Algo 10-11): approximate inverses and least-squares fits,
    ``x_tau^+ = argmin h(y) + kappa/2 ||y - x_tau||^2``; ``Oracle.step`` lands on the fits."""
    return _augmented(kappa, 0.0, INF, INF, False, method, solver)


def regularized_target_prop(kappa: float = 1.0, gamma: float = 1.0, alpha: float = 1.0,
                            method: Method | None = None, solver: Any = None) -> Any:
    """Regularised target propagation (000 Algo 12-13): proximal point steps on the penalty."""
    return _augmented(kappa, 0.0, gamma, alpha, True, method, solver)


def augmented_lagrangian(kappa: float = 1e-5, beta: float = 1.0, gamma: float = 1.0, alpha: float = 1.0,
                         method: Method | None = None, solver: Any = None) -> Any:
    """The augmented-Lagrangian oracle (000 Algo 7-9, App. F.2; AL-MSGD with ``torch.optim.SGD``)."""
    return _augmented(kappa, beta, gamma, alpha, True, method, solver)


def _augmented(kappa: float, beta: float, gamma: float, alpha: float, proximal: bool, method: Method | None,
               solver: Any) -> Any:
    from . import Rule

    kw: dict[str, Any] = {}
    if method is not None:
        kw["method"] = method
    if solver is not None:
        kw["solver"] = solver
    if proximal is False and kappa == 0:
        raise ValueError("target_prop: kappa must be > 0 (the objective's target needs it), got 0")
    rule = Augmented(kappa, beta, gamma, alpha, proximal, **kw)
    return Rule(objective=rule, state=rule, weight=rule)


