"""Target and proximal rules: ProxProp, penalty back-propagation, (regularised) target propagation and
the augmented Lagrangian (004; 000 Sec. 3.2, App. D.4-D.6, Algo 7-13; 001 IBP).

These rules propagate targets ``x_t^+``. A dual signal ``lambda_t`` met on the way is read as the
target ``x_t^+ = x_t - lambda_t / beta`` with the rule's own ``beta`` (001: ``x_t^+ = x_t - lambda_t``).

Every subproblem is written in the increment: rules read the residual ``r_t = x_t - x_t^+`` as such
(``tau lambda``, or the move a target was built from, :class:`~moreaugrad.types.Target`), solve for
``v = x^+ - x`` or ``u = w^+ - w`` and return ``d = -u / s``. Nothing forms ``x^+`` and subtracts
``x`` from it again: in float32 at a step of 1e-5 that round trip loses every digit.

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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import envelope
from ..checks import check_positive
from ..losses import L2
from ..lstsq import CG, Exact, Method, solve_state, solve_weight
from ..solvers import LBFGS, gdot, unit_of
from ..types import Dual, Signal, SolveInfo, StateUpdate, Target, WeightUpdate
from .grad import Grad, objective_value, regularized
from .moreau import LINEAR, Moreau
from .registry import LineRule, check_solve, lookup, register

INF = math.inf
UNREACHABLE = "target has no preimage"


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


def _residual(signal: Signal, x: Tensor, beta: float) -> Tensor:
    """``r = x - x^+``: the target's own move, or ``lambda / beta`` (``beta = 1`` when the rule has
    none), never formed through ``x^+``."""
    return signal.residual(x, beta if beta > 0 else 1.0)


def _regularizer_mu(site: Any) -> float | None:
    """``mu`` of an ``L2`` regulariser on the site (0 without one), None for any other regulariser."""
    reg = site.regularizer
    if reg is None:
        return 0.0
    return float(reg.mu) if isinstance(reg, L2) else None


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
        return loss.detach(), Target.moved(output.detach(), self.tau * g), None

    def state(self, site: Any, signal: Signal) -> StateUpdate:
        dx, _ = site.vjp(_residual(signal, site.x.detach(), 1 / self.tau), weights=False)
        return StateUpdate(Target.moved(site.x_prev.detach(), dx))

    def weight(self, site: Any, signal: Signal) -> WeightUpdate:
        _, dw = site.vjp(_residual(signal, site.x.detach(), 1 / self.tau))
        return WeightUpdate(regularized(site, {n: g / self.tau for n, g in dw.items()}), self.tau,
                            SolveInfo("vjp"))


# -- ProxProp (004 eq. 11) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Proximal(LineRule):
    """ProxProp's weight rule (004 eq. 11, Prop. 2): with the target ``z_t = x_t - tau lambda_t``,

        ``w_t^+ = argmin_v ||phi_t(v, x_{t-1}) - z_t||^2/2 + ||v - w_t||^2/(2 tau_theta)``,

    ``d_t = (w_t - w_t^+)/tau = (I/tau_theta + A^T A)^{-1} grad_{w_t}`` for ``phi_t`` linear in ``w``
    (a Gauss-Newton step otherwise), with step ``tau``. The last stage with weights stays explicit
    (004 eq. 12) unless ``explicit_last=False``. 004 defines ProxProp without a regulariser, so
    ``r_t`` enters explicitly, ``d_t += grad r_t(w_t)``, not inside the proximal problem (unlike
    :class:`Augmented` and the Moreau rule, 000 App. D.6).

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
        r = _residual(signal, site.x.detach(), 1 / self.tau)  # = tau lambda
        if self.explicit_last and site.last_weighted:  # 004 eq. 12: d = grad = J_w^T lambda, lambda = r / tau
            # a dual signal is passed as is, so the state line's vjp is shared
            _, dw = site.vjp(signal.value if isinstance(signal, Dual) else r / self.tau)
            return WeightUpdate(regularized(site, dw), self.tau, SolveInfo("vjp"))
        delta, info = solve_weight(site, r, 0.0, 1.0, 1 / self.tau_theta, self.method)
        direction = {n: d.div(-self.tau) for n, d in delta.items()}
        return WeightUpdate(regularized(site, direction), self.tau, info)


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
        strict: raise on a non-finite iterate, a subproblem found not to be strongly convex, or a
            target with no preimage (plain target propagation).
        preset: the name errors give (the preset the user called, e.g. ``target_prop``).

    A stage regulariser ``r_t`` enters the weight problem itself (000 App. D.6): ``L2`` in closed
    form on linear stages, any other regulariser through the generic solver.
    """

    kappa: float = 0.0
    beta: float = 1.0
    gamma: float = INF
    alpha: float = INF
    proximal: bool = True
    method: Method = field(default_factory=Exact)
    solver: Any = field(default_factory=lambda: LBFGS(tol=1e-8, max_iter=100))
    strict: bool = False
    preset: str = field(default="Augmented", compare=False)

    def __post_init__(self) -> None:
        name = self.preset
        _check_nonneg(name, "kappa", self.kappa)
        _check_nonneg(name, "beta", self.beta)
        _check_step(name, "gamma", self.gamma)
        _check_step(name, "alpha", self.alpha)
        _check_method(name, self.method)
        if not hasattr(self.solver, "solve"):
            raise TypeError(f"{name}: solver must have a .solve(fun, z0) method, got "
                            f"{type(self.solver).__name__}")
        if self.kappa == 0 and self.beta == 0:
            raise ValueError(f"{name}: kappa and beta are both 0, so no subproblem sees the signal and "
                             f"every direction is identically zero; take kappa > 0 (target "
                             f"propagation) or beta > 0 (Moreau)")
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

    def objective(self, h: Any, output: Tensor, target: Any, horizon: int,
                  scale: float = 1.0) -> tuple[Tensor, Signal, Any]:
        """``x_tau^+ = x_tau - grad env(scale h / m)(x_tau)``, ``m = kappa + 1/gamma`` (Algo 9, 11,
        13); ``scale`` is 1 but for one shard of a data-parallel batch (``B_shard / B``)."""
        loss, _ = objective_value(h, output, target)
        m = self.kappa + 1 / self.gamma
        z = output.detach()
        moreau = Moreau(solver=self.solver)
        env, info = lookup(moreau, "objective", h)(moreau, h, z, target, scale / m)
        check_solve(self.owner, self.strict, "objective subproblem", info)
        return loss.detach(), Target.moved(z, env), info

    def terms(self, site: Any, signal: Signal) -> tuple[Tensor, float, float]:
        """``(r_t, scale, kappa)`` of the subproblems, ``r_t = x_t - x_t^+``; plain TP solves
        ``||phi - x^+||^2/2``."""
        r = _residual(signal, site.x.detach(), self.beta)
        scale, kappa = (self.beta, self.kappa) if self.proximal else (0.0, 1.0)
        return r, scale, kappa


def _moved(site: Any, v: Tensor) -> Target:
    """The target ``x_{t-1}^+ = x_{t-1} + v`` of the previous stage, kept as its move."""
    return Target.moved(site.x_prev.detach(), -v)


@register(Augmented, "state", *LINEAR)
def augmented_linear_state(rule: Augmented, site: Any, signal: Signal) -> StateUpdate:
    """``phi_t`` affine in ``x``: ``v = -(beta + kappa)(kappa A^T A + c I)^{-1} A^T r``."""
    r, scale, kappa = rule.terms(site, signal)
    delta, info = solve_state(site, r, scale, kappa, rule.c_state, rule.method, site.groups)
    return StateUpdate(_moved(site, delta), info)


@register(Augmented, "weight", *LINEAR)
def augmented_linear_weight(rule: Augmented, site: Any, signal: Signal) -> WeightUpdate:
    """``phi_t`` linear in ``w``: ``u = -(kappa A^T A + (1/alpha + mu) I)^{-1} ((beta + kappa) A^T r
    + mu w)``, with ``r_t = mu ||.||^2/2`` inside the problem (000 App. D.6)."""
    mu = _regularizer_mu(site)
    if mu is None:  # a regulariser other than L2: solve the problem as written
        return augmented_generic_weight(rule, site, signal)
    r, _, _ = rule.terms(site, signal)
    delta, info = solve_weight(site, r, rule.beta, rule.kappa, rule.c_weight, rule.method, mu=mu)
    return WeightUpdate({n: d.div(-rule.step) for n, d in delta.items()}, rule.step, info)


@register(Augmented, "state", nn.ReLU, nn.LeakyReLU, nn.Hardtanh, nn.Hardsigmoid)
def augmented_piecewise_state(rule: Augmented, site: Any, signal: Signal) -> StateUpdate:
    """Elementwise and piecewise linear, in the increment ``v = u - x``: on piece ``j``,
    ``sigma(x + v) - sigma(x) = s_j v + o_j`` (``o_j = 0`` on the piece holding ``x``), so the
    objective ``scale r (s_j v + o_j) + c/2 v^2 + kappa/2 (s_j v + o_j + r)^2`` is a quadratic
    minimised in closed form and clipped to the piece; the best piece wins, ties going to the
    smallest change ``|v|`` (the regularised projection of ReLU, 000 Sec. 3.2).

    Plain target propagation has no proximal term, and its approximate inverse is solved from
    ``y = x_{t-1}`` (000 eq. 40, Algo 10): the minimiser over the pieces a descent method started
    at ``x`` can reach, i.e. not past a flat piece. A unit on a flat piece (a dead ReLU) keeps its
    input, since its gradient there is 0, instead of jumping by ``|x|`` to reach a small target
    on the other side of the kink; a leaky ReLU, with no flat piece, is inverted exactly."""
    pw = envelope.activation(site.stage.module)
    r, scale, kappa = rule.terms(site, signal)
    x = site.x_prev.detach()
    fx = pw.fn(x)
    c = rule.c_state
    # Everything below is computed in units of `unit` (a power of 2, so exactly): a residual that
    # has decayed over many stages would otherwise underflow when squared in float32.
    unit = unit_of([r])
    r = r / unit
    edges = [-INF, *pw.knots, INF]
    reach = None if rule.proximal else _reachable(x, edges, pw.slopes)
    best_v = best_f = best_dist = None
    for j, s in enumerate(pw.slopes):
        lo, hi = edges[j], edges[j + 1]
        inside = x.clamp(lo, hi)
        off = (s * (x - inside) + (pw.fn(inside) - fx)) / unit  # piece j's affine map at x - sigma(x)
        q = off + r  # piece j's affine map at x minus the target
        den = c + kappa * s * s
        if den > 0:
            # t = sigma(x + v) - x^+ at the free minimiser in closed form (exactly 0 for an exact
            # inverse, where s v + q would cancel to noise).
            v = torch.clamp(-(scale * r * s + kappa * s * q) / den, (lo - x) / unit, (hi - x) / unit)
            t = (c * q - scale * r * s * s) / den
            # The minimiser sits on an edge b of the piece when the derivative there points out of
            # it; that derivative is formed from sigma(b) - sigma(x), never from x + r, which
            # loses a small r next to x.
            for b, out in ((lo, 1.0), (hi, -1.0)):
                if math.isfinite(b):
                    vb = (b - x) / unit
                    tb = (pw.fn(torch.full_like(x, b)) - fx) / unit + r
                    hit = out * (scale * r * s + c * vb + kappa * s * tb) >= 0
                    v, t = torch.where(hit, vb, v), torch.where(hit, tb, t)
        else:  # flat piece, no proximal term: every point is optimal; take the closest to x
            v = (inside - x) / unit
            t = (s * v + off) + r
        f = scale * r * t + 0.5 * c * v * v + 0.5 * kappa * t * t  # less the constant -scale r^2
        if reach is not None:  # only the pieces descent from x reaches: see the docstring
            f = torch.where(reach[j], f, INF)
        dist = v.abs()
        if best_v is None:
            best_v, best_f, best_dist = v, f, dist
        else:
            tol = 16 * torch.finfo(best_f.dtype).eps * (best_f.abs() + f.abs())
            better = (f < best_f - tol) | ((f <= best_f + tol) & (dist < best_dist))
            best_v = torch.where(better, v, best_v)
            best_f = torch.where(better, f, best_f)
            best_dist = torch.where(better, dist, best_dist)
    return StateUpdate(_moved(site, best_v * unit), SolveInfo("closed form: piecewise linear"))


def _reachable(x: Tensor, edges: list[float], slopes: Sequence[float]) -> list[Tensor]:
    """Per piece ``j``, where a descent from ``x`` can get to it: ``x`` lies in a piece ``k`` and
    every piece from ``k`` up to (not including) ``j`` has a non-zero slope."""
    holds = [(x >= edges[k]) & (x <= edges[k + 1]) for k in range(len(slopes))]
    reach = []
    for j in range(len(slopes)):
        mask = torch.zeros_like(x, dtype=torch.bool)
        for k, held in enumerate(holds):
            between = range(k, j) if k < j else range(j + 1, k + 1)
            if all(slopes[m] != 0 for m in between):
                mask = mask | held
        reach.append(mask)
    return reach


CLIP = 1e-6  # how far inside an activation's open range an unreachable target is clipped


def _inverse_increment(module: nn.Module, x: Tensor, t: Tensor, r: Tensor) -> tuple[Tensor, Tensor] | None:
    """For plain target propagation on an invertible activation: ``v = sigma^{-1}(t - r) - x`` with
    ``t = sigma(x)``, written as a difference of inverses so that a small ``r`` keeps its digits,
    and the mask of targets ``t - r`` outside the open range of ``sigma`` (no preimage: 000 eq. 40
    has no minimiser). The mask compares ``r`` with the distances from ``t`` to the range's ends,
    formed without cancellation (``1 - tanh(x) = 2 sigmoid(-2x)``); masked targets are clipped
    :data:`CLIP` inside the range, the same point in every dtype. None for other modules."""
    a = t - r
    if isinstance(module, nn.Tanh):
        out = (-r >= 2 * torch.sigmoid(-2 * x)) | (r >= 2 * torch.sigmoid(2 * x))
        # atanh(a) - atanh(t) = atanh((a - t) / (1 - a t)), 1 - a t = sech(x)^2 + t r
        v = torch.atanh((-r / (torch.cosh(x).pow(-2) + t * r)).clamp(-1, 1))
        edge = 0.5 * math.log((2 - CLIP) / CLIP)  # atanh(1 - CLIP), exactly in every dtype
        return torch.where(out, torch.where(a > 0, 1.0, -1.0).to(x.dtype) * edge - x, v), out
    if isinstance(module, nn.Sigmoid):
        out = (r >= t) | (-r >= torch.sigmoid(-x))
        # logit(a) - logit(t) = log1p(-r / t) - log1p(r / (1 - t)), 1 - t = sigmoid(-x)
        safe = torch.where(out, torch.zeros_like(r), r)
        v = torch.log1p(-safe / t) - torch.log1p(safe / torch.sigmoid(-x))
        edge = math.log((1 - CLIP) / CLIP)  # logit(1 - CLIP)
        return torch.where(out, torch.where(a > 0, 1.0, -1.0).to(x.dtype) * edge - x, v), out
    if isinstance(module, nn.Softplus):
        beta, thr = module.beta, module.threshold
        out = r >= t
        # softplus^{-1}(a) - softplus^{-1}(t) = log1p(-expm1(-beta r) / expm1(-beta t)) / beta
        safe = torch.where(out, torch.zeros_like(r), r)
        ratio = -torch.expm1(-beta * safe) / torch.expm1(-beta * t)
        v = torch.where(beta * x > thr, -r, torch.log1p(ratio) / beta)
        edge = math.log(math.expm1(CLIP)) / beta  # softplus^{-1}(CLIP / beta)
        return torch.where(out, edge - x, v), out
    return None


@register(Augmented, "state", nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Softplus)
def augmented_smooth_state(rule: Augmented, site: Any, signal: Signal) -> StateUpdate:
    """Smooth activations. With ``kappa = 0`` the problem is the Moreau one,
    ``v = argmin (beta r / c) sigma(x + v) + v^2/2``, solved by the 1-D closed form (with its
    exact strong-convexity check). Plain target propagation inverts Tanh, Sigmoid and Softplus
    exactly; a target outside the activation's range has no preimage and is clipped into it,
    reported (and raised under ``strict``). Anything else goes to the generic solver."""
    r, scale, kappa = rule.terms(site, signal)
    x = site.x_prev.detach()
    if rule.proximal and kappa == 0:
        v, info = envelope.activation(site.stage.module).increment(x, (scale / rule.c_state) * r)
        return StateUpdate(_moved(site, v), info)
    inverse = None if rule.proximal else _inverse_increment(site.stage.module, x, site.x.detach(), r)
    if inverse is None:
        return augmented_generic_state(rule, site, signal)
    v, out = inverse
    n = int(out.sum())
    message = f"{UNREACHABLE}: {n} targets outside the range of {site.stage.type_name} clipped" if n else ""
    return StateUpdate(_moved(site, v), SolveInfo("closed form: inverse", 0, 0.0, n == 0, message))


def _work_dtype(site: Any) -> torch.dtype:
    """The dtype of a generic solve: float64 for a float32 (or half) stage. Its objective holds
    ``phi_t(x + v) - x_t + r``, whose two first terms cancel to ``eps |x_t|`` for a small move: in
    float32 that is the whole answer at small steps (issue 15), in float64 it is 1e-9 of it. A stage
    that draws random numbers (dropout) keeps its dtype, so that it draws the recorded ones."""
    dtype = site.x_prev.dtype
    return torch.float64 if dtype in LOW and site.rng is None else dtype


LOW = (torch.float32, torch.float16, torch.bfloat16)
TINY = 1e-8
LINEARISED = Exact(tol=1e-12)


def _tiny(r: Tensor, x_t: Tensor) -> bool:
    """Whether the move is below ``TINY (1 + max |x_t|)``: then ``phi_t(x + v) - phi_t(x)`` is
    ``J v`` to a relative ``O(|v|)``, below what any dtype resolves next to ``x_t``, while
    re-evaluating ``phi_t`` would lose the move to rounding (a dual decayed over many stages).
    Such problems are solved on the linearisation: CG on ``J^T J`` by jvp and vjp, exact to
    ``1e-12``, with no difference of nearly equal numbers."""
    if not r.numel():
        return False
    return float(r.detach().abs().max()) <= TINY * (1 + float(x_t.detach().abs().max()))


@register(Augmented, "state")
def augmented_generic_state(rule: Augmented, site: Any, signal: Signal) -> StateUpdate:
    """The state subproblem by the rule's solver, per sample, in the increment ``v`` (values are
    taken relative to ``phi_t(x_{t-1}) = x_t``, so that a small move is resolved; float32 stages
    are solved in float64, :func:`_work_dtype`)."""
    r, scale, kappa = rule.terms(site, signal)
    if _tiny(r, site.x):
        delta, info = solve_state(site, r, scale, kappa, rule.c_state, LINEARISED, site.groups)
        return StateUpdate(_moved(site, delta), info)
    x = site.x_prev.detach()
    work = _work_dtype(site)
    xw, rw = x.to(work), r.to(work)
    x_t = site.x.detach() if work == x.dtype else site.phi(x=xw)
    c = rule.c_state
    B = site.groups

    def fun(z: list[Tensor]) -> Tensor:
        (v,) = z
        e = site.phi(x=xw + v) - x_t
        val = 0.5 * c * gdot([v], [v], B) + 0.5 * kappa * gdot([e + rw], [e + rw], B)
        return val + scale * gdot([rw], [e], B) if scale else val

    f0 = 0.5 * kappa * gdot([rw], [rw], B)
    g0, _ = site.vjp((scale + kappa) * r, weights=False)
    (v,), info = rule.solver.solve(fun, [torch.zeros_like(xw)], (f0, [g0.to(work)]))
    return StateUpdate(_moved(site, v.to(x.dtype)), info)


@register(Augmented, "weight")
def augmented_generic_weight(rule: Augmented, site: Any, signal: Signal) -> WeightUpdate:
    """The weight subproblem of 000 App. D.6 by the rule's solver, in the increment ``u = v - w``,
    with the stage's regulariser ``r_t(w + u)`` inside it (float32 stages in float64)."""
    r, _, _ = rule.terms(site, signal)
    mu = _regularizer_mu(site)
    if mu is not None and _tiny(r, site.x):
        delta, info = solve_weight(site, r, rule.beta, rule.kappa, rule.c_weight, LINEARISED, mu=mu)
        return WeightUpdate({n: d.div(-rule.step) for n, d in delta.items()}, rule.step, info)
    names = list(site.w)
    work = _work_dtype(site)
    dtypes = [site.w[n].dtype for n in names]
    w = [site.w[n].detach().to(work) for n in names]
    xw, rw = site.x_prev.detach().to(work), r.to(work)
    x_t = site.x.detach() if work == site.x_prev.dtype else site.phi(dict(zip(names, w, strict=True)), xw)
    scale, kappa, c = rule.beta, rule.kappa, rule.c_weight
    reg = site.regularizer

    def fun(z: list[Tensor]) -> Tensor:
        # The terms in e sum over the samples (of every shard, for a data-parallel exact oracle:
        # Site.summed / Site.replicated); the proximal and regulariser terms do not.
        zs = site.replicated(z)
        e = site.phi({n: wi + zi for n, wi, zi in zip(names, w, zs, strict=True)}, xw) - x_t
        data = 0.5 * kappa * gdot([e + rw], [e + rw], 1)
        (data,) = site.summed([data + scale * gdot([rw], [e], 1) if scale else data])
        val = 0.5 * c * gdot(z, z, 1) + data
        if reg is not None:
            val = val + sum(reg(wi + zi) - reg(wi) for wi, zi in zip(w, z, strict=True))
        return val

    (f0,) = site.summed([0.5 * kappa * gdot([rw], [rw], 1)])
    _, g0 = site.vjp((scale + kappa) * r)
    g0 = [(g0[n].to(work) + reg.grad(wi)) if reg is not None else g0[n].to(work)
          for n, wi in zip(names, w, strict=True)]
    z, info = rule.solver.solve(fun, [torch.zeros_like(wi) for wi in w], (f0, g0))
    return WeightUpdate({n: (-zi / rule.step).to(dt) for n, zi, dt in zip(names, z, dtypes, strict=True)},
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


def target_prop(kappa: float = 1.0, method: Method | None = None, solver: Any = None,
                strict: bool = False) -> Any:
    """Plain target propagation (000 Algo 10-11): approximate inverses and least-squares fits,
    ``x_tau^+ = argmin h(y) + kappa/2 ||y - x_tau||^2``; ``Oracle.step`` lands on the fits.
    A target outside an activation's range (no preimage) is clipped and reported, or raises
    :class:`SolverError` under ``strict``.

    ``kappa`` sets the output target's step ``1/kappa`` (per sample ``1/(kappa B)``: losses average
    over the batch). The inverses are solved from ``x_{t-1}`` (a dead ReLU keeps its input) and
    the fits by a truncated pseudo-inverse (``lstsq.Exact.rcond``). Measured with ``Oracle.step``
    on a ReLU MLP 64-32-32-10 on digits, batch 32, 30 steps, float32 and float64 alike: loss 2.33
    to 1.69 at ``kappa = 1``, 2.24 at 10, 2.31 at 100 (too small a step to move). Smaller ``kappa``
    or a plain ``rcond`` can diverge; :meth:`Oracle.step` warns when the loss keeps growing."""
    return _augmented(kappa, 0.0, INF, INF, False, method, solver, strict, "target_prop")


def regularized_target_prop(kappa: float = 1.0, gamma: float = 1.0, alpha: float = 1.0,
                            method: Method | None = None, solver: Any = None, strict: bool = False) -> Any:
    """Regularised target propagation (000 Algo 12-13): proximal point steps on the penalty, with a
    regulariser ``r_t`` inside the weight problem (000 App. D.6)."""
    return _augmented(kappa, 0.0, gamma, alpha, True, method, solver, strict, "regularized_target_prop")


def augmented_lagrangian(kappa: float = 1e-5, beta: float = 1.0, gamma: float = 1.0, alpha: float = 1.0,
                         method: Method | None = None, solver: Any = None, strict: bool = False) -> Any:
    """The augmented-Lagrangian oracle (000 Algo 7-9, App. F.2; AL-MSGD with ``torch.optim.SGD``),
    with a regulariser ``r_t`` inside the weight problem (000 App. D.6)."""
    return _augmented(kappa, beta, gamma, alpha, True, method, solver, strict, "augmented_lagrangian")


def _augmented(kappa: float, beta: float, gamma: float, alpha: float, proximal: bool, method: Method | None,
               solver: Any, strict: bool, preset: str) -> Any:
    from . import Rule

    kw: dict[str, Any] = {"strict": strict, "preset": preset}
    if method is not None:
        kw["method"] = method
    if solver is not None:
        kw["solver"] = solver
    if proximal is False and kappa == 0:
        raise ValueError("target_prop: kappa must be > 0 (the objective's target needs it), got 0")
    rule = Augmented(kappa, beta, gamma, alpha, proximal, **kw)
    return Rule(objective=rule, state=rule, weight=rule)


