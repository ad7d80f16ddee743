"""Contracts: what a chain, a signal, a rule and a solve report are.

A *chain* is ``x_t = phi_t(w_t, x_{t-1})`` for ``t = 1..tau`` with an input ``x_0`` that carries a
leading batch dimension, per-stage parameters ``w_t`` (possibly empty) and an objective
``h(x_tau)`` that reduces over the batch (DESIGN section 1; 000 Def. 1.1).

The backward sweep (``moreaugrad.sweep``) walks the chain from ``t = tau`` to ``1`` and asks three
*line rules* (001 Algo 1-2: lines 2, 4 and 5) what to do:

* the objective rule maps ``h`` and ``x_tau`` to the first signal;
* the weight rule maps ``(site, signal_t)`` to a direction ``d_t`` and a step ``s_t`` with
  ``w_t^+ = w_t - s_t d_t``;
* the state rule maps ``(site, signal_t)`` to ``signal_{t-1}``.

A *signal* is either a dual direction ``lambda_t`` or a target ``x_t^+``; they are linked by
``lambda_t = beta_t (x_t - x_t^+)`` (000 Prop. 2.2).

Rules are pure: they read the site (the recorded stage, its input, output and weights) and the
signal, and return new tensors. They never mutate their inputs and keep no state between calls.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from torch import Tensor

if TYPE_CHECKING:
    from .sweep import Site

Weights = dict[str, Tensor]


@dataclass(frozen=True)
class Dual:
    """A dual direction ``lambda_t``, shaped like the state ``x_t`` (batch first)."""

    value: Tensor

    def dual(self, x: Tensor, beta: float = 1.0) -> Tensor:  # noqa: ARG002 - same signature as Target
        return self.value

    def residual(self, x: Tensor, beta: float = 1.0) -> Tensor:  # noqa: ARG002
        """``r = x - x^+ = lambda / beta`` (000 Prop. 2.2 read backwards), formed without ``x^+``."""
        return self.value if beta == 1 else self.value / beta

    def target(self, x: Tensor, beta: float = 1.0) -> Tensor:
        """``x^+ = x - lambda / beta``."""
        return x - self.residual(x, beta)


class Target:
    """A target state ``x_t^+``, shaped like the state ``x_t`` (batch first).

    Rules build a target as the point it moves plus the move, ``x^+ = point - residual``
    (:meth:`moved`), and read back the residual ``r = x - x^+`` itself: forming ``x^+`` and then
    subtracting it from ``x`` again would lose every digit of a small move to cancellation. A target
    given as a bare value (``Target(value)``) is read as ``x - value``.
    """

    __slots__ = ("_value", "point", "_residual")

    def __init__(self, value: Tensor | None = None, *, point: Tensor | None = None,
                 residual: Tensor | None = None):
        if (value is None) == (residual is None) or (residual is not None and point is None):
            raise TypeError("Target: give either value, or point and residual")
        self._value, self.point, self._residual = value, point, residual

    @classmethod
    def moved(cls, point: Tensor, residual: Tensor) -> Target:
        """The target ``point - residual``, kept as the pair."""
        return cls(point=point, residual=residual)

    @property
    def value(self) -> Tensor:
        """``x^+`` itself (formed on demand)."""
        return self._value if self._value is not None else self.point - self._residual

    def residual(self, x: Tensor, beta: float = 1.0) -> Tensor:  # noqa: ARG002 - same as Dual
        """``r = x - x^+``: the stored move when ``x`` is the point it was built on, else ``x - x^+``."""
        if self._residual is not None and _same(self.point, x):
            return self._residual
        return x - self.value

    def dual(self, x: Tensor, beta: float = 1.0) -> Tensor:
        """``lambda = beta (x - x^+)`` (000 Prop. 2.2)."""
        r = self.residual(x)
        return r if beta == 1 else beta * r

    def target(self, x: Tensor, beta: float = 1.0) -> Tensor:  # noqa: ARG002
        return self.value

    def __repr__(self) -> str:
        return f"Target({self.value!r})"


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are the same values: the same tensor, or views of one storage."""
    if a is b:
        return True
    return (a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
            and a.data_ptr() == b.data_ptr() and a.stride() == b.stride())


Signal = Dual | Target


@dataclass(frozen=True)
class SolveInfo:
    """What an inner solve did: iterations, final residual and whether it met its tolerance.

    ``residual`` is the norm of the subproblem's gradient at the returned point (the largest over
    the batch for problems that separate over samples). ``converged`` is None when a solver ran a
    fixed number of steps without checking. ``message`` says why a solve stopped when it did not
    converge (iteration cap, non-finite iterate, subproblem not strongly convex).
    """

    method: str
    iterations: int = 0
    residual: float = 0.0
    converged: bool | None = True
    message: str = ""


class InexactSolveWarning(UserWarning):
    """An inner solve stopped on its iteration cap before its tolerance, though fixed steps were
    not asked for: the answer is inexact (its ``SolveInfo`` says by how much)."""


@dataclass(frozen=True)
class WeightUpdate:
    """A weight rule's answer: ``w_t^+ = w_t - step * direction`` (DESIGN section 2)."""

    direction: Weights
    step: float | None
    info: SolveInfo | None = None


@dataclass(frozen=True)
class StateUpdate:
    """A state rule's answer: the signal for the previous stage."""

    signal: Signal
    info: SolveInfo | None = None


@runtime_checkable
class StateRule(Protocol):
    """Line 4 of the sweep: ``signal_t -> signal_{t-1}``."""

    def state(self, site: Site, signal: Signal) -> StateUpdate: ...


@runtime_checkable
class WeightRule(Protocol):
    """Line 5 of the sweep: ``signal_t -> (d_t, s_t)``."""

    def weight(self, site: Site, signal: Signal) -> WeightUpdate: ...


@runtime_checkable
class ObjectiveRule(Protocol):
    """Line 2 of the sweep: ``h, x_tau -> (loss, signal_tau)``; ``horizon`` is ``tau``, for schedules."""

    def objective(self, h: Any, output: Tensor, target: Any,
                  horizon: int) -> tuple[Tensor, Signal, SolveInfo | None]: ...


@dataclass
class StageInfo:
    """Per-stage report of one sweep: what the state and weight solves did."""

    state: SolveInfo | None = None
    weight: SolveInfo | None = None
    extra: dict[str, Any] = field(default_factory=dict)
