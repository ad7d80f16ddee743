"""Rules for each line of the backward sweep, and the presets that combine them (DESIGN section 3).

A :class:`Rule` picks one rule per line: ``objective`` (line 2), ``state`` (line 4) and ``weight``
(line 5) of 001 Algo 2. The state and weight lines may also vary per stage: pass a sequence with
one rule per stage, or a function ``site -> rule``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..checks import check_positive
from ..types import ObjectiveRule, StateRule, WeightRule
from .fenchel import (
    AdaptiveSpacing,
    ConstantSpacing,
    FiniteDifference,
    Monotone,
    PenaltyEnergy,
    Spacing,
    StageSpacing,
    SurrogateInfo,
    contrastive_backprop,
    contrastive_surrogate,
    fenchel,
)
from .grad import Grad
from .moreau import Geometric, Lagrangian, Moreau, Paper, PerStage, Schedule, moreau
from .registry import LineRule, SolverError, lookup, register
from .target import (
    Augmented,
    Explicit,
    Proximal,
    augmented_lagrangian,
    penalty_backprop,
    proxprop,
    regularized_target_prop,
    target_prop,
)

LineSpec = Any  # a line rule, a sequence of line rules (one per stage), or a function site -> rule


def _pick(line: str, spec: LineSpec, site: Any) -> Any:
    if isinstance(spec, LineRule) or hasattr(spec, line):
        return spec
    if isinstance(spec, Sequence):
        if len(spec) != site.horizon:
            raise ValueError(f"Rule: {line} has {len(spec)} per-stage rules but the chain has "
                             f"{site.horizon} stages")
        return spec[site.stage.index]
    if callable(spec):
        return spec(site)
    raise TypeError(f"Rule: {line} must be a rule, a sequence of rules or a function of the site, "
                    f"got {type(spec).__name__}")


@dataclass(frozen=True)
class Rule:
    """One choice of rule per line of the sweep (001: each line may use a different procedure).

    Example:
        >>> backprop = Rule(objective=Grad(), state=Grad(), weight=Grad())
    """

    objective: ObjectiveRule
    state: StateRule | Sequence[StateRule] | Callable[[Any], StateRule]
    weight: WeightRule | Sequence[WeightRule] | Callable[[Any], WeightRule]

    def __post_init__(self) -> None:
        if not hasattr(self.objective, "objective"):
            raise TypeError(f"Rule: objective must have an .objective(h, output, target) method, "
                            f"got {type(self.objective).__name__}")

    def state_for(self, site: Any) -> StateRule:
        return _pick("state", self.state, site)

    def weight_for(self, site: Any) -> WeightRule:
        return _pick("weight", self.weight, site)


def backprop(step: float = 1.0) -> Rule:
    """Gradient back-propagation on every line (000 Algo 3-5).

    Args:
        step: the step of ``Oracle.step`` (gradient descent); ``Oracle.backward`` ignores it.
    """
    check_positive("backprop", "step", step)
    return Rule(objective=Grad(), state=Grad(), weight=Grad(step))


__all__ = [
    "AdaptiveSpacing", "ConstantSpacing", "FiniteDifference", "Monotone", "PenaltyEnergy", "Spacing",
    "StageSpacing", "SurrogateInfo", "contrastive_backprop", "contrastive_surrogate", "fenchel",
    "Augmented", "Explicit", "Proximal", "augmented_lagrangian", "penalty_backprop", "proxprop",
    "regularized_target_prop", "target_prop",
    "Geometric", "Grad", "Lagrangian", "LineRule", "Moreau", "Paper", "PerStage", "Rule", "Schedule",
    "SolverError", "backprop", "lookup", "moreau", "register",
    "Safe",
]


def __getattr__(name: str) -> Any:
    # Safe (000 Prop. 2.3) lives in moreaugrad.smoothness, which imports this package: load it on use.
    if name == "Safe":
        from ..smoothness.safe import Safe

        return Safe
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
