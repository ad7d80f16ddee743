"""The safe Moreau schedule of 000 Prop. 2.3, from a smoothness estimate."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..checks import check_positive
from ..rules.moreau import Schedule
from .estimate import Estimate, _mul


@dataclass(frozen=True)
class Safe(Schedule):
    """Moreau steps for which every state subproblem is strongly convex (000 Prop. 2.3).

    With ``beta_s = 1/gamma_s`` (eq. 9), the state rule of stage ``t`` solves
    ``min_y gamma_{t-1} lambda_t^T phi_t(x_{t-1} + y) + ||y||^2/2``, whose Hessian is at least
    ``1 - gamma_{t-1} ||lambda_t|| L_phi_t``. With exact inner solves ``||lambda_t|| <= l_h
    prod_{s>t} l_phi_s``, so ``gamma_{t-1} <= 1/c_t`` with ``c_t = l_h L_phi_t prod_{s>t} l_phi_s``
    keeps it convex. This schedule takes ``gamma_{t-1} = min(gamma, fraction / c_t)``: each state
    subproblem is then ``(1 - fraction)``-strongly convex (``fraction = 1`` is the paper's bound,
    convex only). ``gamma`` caps the steps of stages without curvature (``c_t = 0``: affine stages)
    and is the objective's ``gamma_tau`` (the losses are convex, so any ``gamma_tau`` is safe).
    The weight steps are ``alpha`` (by default from :meth:`from_estimate`, ``1/L_F`` of 003 Thm. 4.1).

    ``l_phi_t``, ``L_phi_t`` are the constants of ``x -> phi_t(w_t, x)`` for weights in the ball
    of the estimate (:class:`~.estimate.StageConstants`); the schedule stays safe while the weights
    stay there. Build it again from the current weights (``estimate(..., around=model)``) to
    follow training; it is cheap.

    Args:
        c: ``(c_1, ..., c_tau)``, one per chain stage (finite, >= 0; ``inf`` at stage 1 only, whose
            state rule runs only when ``x_0`` is a variable).
        alpha: the weight step ``alpha_t``, one value or one per stage.
        gamma: the cap on ``gamma_s`` and the objective's ``gamma_tau``.
        fraction: in ``(0, 1]``.
    """

    c: tuple[float, ...]
    alpha: float | tuple[float, ...] = 1.0
    gamma: float = 1.0
    fraction: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "c", tuple(float(v) for v in self.c))
        if not self.c:
            raise ValueError("Safe schedule: c must have one entry per stage, got none")
        for t, v in enumerate(self.c, start=1):
            if not v >= 0:
                raise ValueError(f"Safe schedule: c_{t} must be a number >= 0, got {v!r}")
            if v == math.inf and t > 1:
                raise ValueError(f"Safe schedule: c_{t} is infinite: stage {t} is not smooth in its input "
                                 f"(L = inf), so no gamma_{t - 1} > 0 makes its state subproblem strongly "
                                 f"convex (000 Prop. 2.3)")
        if isinstance(self.alpha, tuple | list):
            object.__setattr__(self, "alpha", tuple(self.alpha))
            if len(self.alpha) != len(self.c):
                raise ValueError(f"Safe schedule: alpha has {len(self.alpha)} entries for {len(self.c)} "
                                 f"stages")
            for t, a in enumerate(self.alpha, start=1):
                check_positive("Safe schedule", f"alpha[{t}]", a)
        else:
            check_positive("Safe schedule", "alpha", self.alpha)
        check_positive("Safe schedule", "gamma", self.gamma)
        if isinstance(self.fraction, bool) or not isinstance(self.fraction, int | float) \
                or not 0 < self.fraction <= 1:
            raise ValueError(f"Safe schedule: fraction must be in (0, 1], got {self.fraction!r}")

    def _tau(self, tau: int) -> None:
        if tau != len(self.c):
            raise ValueError(f"Safe schedule: built for {len(self.c)} stages, the chain has {tau}")

    def gammas(self) -> tuple[float, ...]:
        """``(gamma_0, ..., gamma_tau)``."""
        return tuple(self._gamma(s) for s in range(len(self.c) + 1))

    def _gamma(self, s: int) -> float:
        if s == len(self.c):
            return float(self.gamma)
        c = self.c[s]
        if c == math.inf:
            raise ValueError("Safe schedule: stage 1 is not smooth in its input (L = inf): no gamma_0 > 0 "
                             "makes the input's subproblem strongly convex (000 Prop. 2.3)")
        return float(self.gamma) if c == 0 else min(float(self.gamma), self.fraction / c)

    def dual(self, s: int, tau: int) -> tuple[float, float]:
        """``(gamma_s, beta_s = 1/gamma_s)``."""
        self._tau(tau)
        g = self._gamma(s)
        return g, 1.0 / g

    def step(self, t: int, tau: int) -> float:
        self._tau(tau)
        return self.alpha[t - 1] if isinstance(self.alpha, tuple) else float(self.alpha)

    @classmethod
    def from_estimate(cls, est: Estimate, *, alpha: float | None = None, gamma: float = 1.0,
                      fraction: float = 0.5) -> Safe:
        """``c_t = l_h L_phi_t prod_{s>t} l_phi_s`` from an estimate made with a loss (``l_h`` is
        its ``l_f`` on ``psi(C)``); ``alpha`` defaults to the estimate's ``1/L_F`` (003 Thm. 4.1)."""
        if est.objective is None:
            raise ValueError("Safe.from_estimate: the estimate has no objective; pass loss=... to "
                             "smoothness.estimate (l_h enters c_t)")
        lips = [s.lipschitz for s in est.stages]
        c = []
        for i, s in enumerate(est.stages):
            tail = _mul(*lips[i + 1:]) if i + 1 < len(lips) else 1.0
            c.append(_mul(est.objective.l, s.smoothness, tail))
        safe = cls(tuple(c), 1.0 if alpha is None else alpha, gamma, fraction)  # validates c first
        if alpha is None:
            if not est.step:
                raise ValueError("Safe.from_estimate: the estimate's L_F is infinite, so there is no 1/L_F "
                                 "step; pass alpha")
            safe = cls(safe.c, est.step, gamma, fraction)
        return safe
