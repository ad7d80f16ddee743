"""The rule registry: closed forms and generic rules keyed by (rule type, line, stage type).

Like a derivative table (HIPS/autograd ``primitive_vjps``): a rule class registers a function per
line (``"state"`` or ``"weight"``) for each module type it has a closed form for, and a generic
function for ``nn.Module``. Lookup walks the module type's MRO, so the most specific entry wins;
a module that is not its bare type (parametrized, or with forward hooks: :func:`~moreaugrad.chain.plain`)
gets the generic entry, since a closed form for the type does not hold for it.
Every registered function has the one signature ``fn(rule, site, signal) -> StateUpdate |
WeightUpdate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..chain import plain
from ..solvers import CAP
from ..types import Signal, SolveInfo, StateUpdate, WeightUpdate

Entry = Callable[[Any, Any, Signal], Any]
_TABLE: dict[tuple[type, str, type], Entry] = {}
LINES = ("objective", "state", "weight")


def register(rule_type: type, line: str, *module_types: type) -> Callable[[Entry], Entry]:
    """Register ``fn(rule, site, signal)`` as ``rule_type``'s ``line`` rule for ``module_types``."""
    if line not in LINES:
        raise ValueError(f"register: line must be one of {LINES}, got {line!r}")

    def deco(fn: Entry) -> Entry:
        for m in module_types or (nn.Module,):
            _TABLE[(rule_type, line, m)] = fn
        return fn

    return deco


def lookup(rule: Any, line: str, module: nn.Module) -> Entry:
    """The most specific entry for ``type(rule)``, ``line`` and ``type(module)``.

    For a module that is not :func:`~moreaugrad.chain.plain` (a parametrized weight, a forward
    hook), entries registered for a specific module type are skipped: only the generic entry for
    ``nn.Module`` (or ``object``) answers.
    """
    mro = type(module).__mro__
    if not plain(module):
        mro = tuple(cls for cls in mro if cls is nn.Module or not issubclass(cls, nn.Module))
    for rule_cls in type(rule).__mro__:
        for cls in mro:
            fn = _TABLE.get((rule_cls, line, cls))
            if fn is not None:
                return fn
    raise NotImplementedError(
        f"no {line} rule {type(rule).__name__} registered for stage type {type(module).__name__}; "
        f"register one with moreaugrad.rules.register({type(rule).__name__}, {line!r}, "
        f"{type(module).__name__})"
    )


class SolverError(RuntimeError):
    """An inner solve hit a non-finite iterate or a subproblem that is not strongly convex."""


def check_solve(owner: str, strict: bool, where: str, info: SolveInfo | None) -> None:
    """Under ``strict``, raise :class:`SolverError` for a non-finite iterate or a subproblem that is
    not strongly convex (an iteration cap is only reported). ``where`` names the subproblem."""
    if strict and info is not None and info.converged is False and info.message != CAP:
        raise SolverError(f"{owner}: the {where} failed: {info.message} "
                          f"(after {info.iterations} iterations, residual {info.residual:.3g})")


class LineRule:
    """Base class of the state and weight line rules: dispatches through the registry and, for a
    rule with ``strict = True``, raises on a failed solve (:func:`check_solve`)."""

    strict: bool = False

    @property
    def owner(self) -> str:
        """The name errors give: the preset the rule was built by, where it records one."""
        return getattr(self, "preset", type(self).__name__)

    def entry(self, line: str, site: Any) -> Entry:
        """The function that answers ``line`` for this site (a subclass may bypass the table)."""
        return lookup(self, line, site.stage.module)

    def state(self, site: Any, signal: Signal) -> StateUpdate:
        update = self.entry("state", site)(self, site, signal)
        check_solve(self.owner, self.strict, f"state subproblem of {site.label}", update.info)
        return update

    def weight(self, site: Any, signal: Signal) -> WeightUpdate:
        update = self.entry("weight", site)(self, site, signal)
        check_solve(self.owner, self.strict, f"weight subproblem of {site.label}", update.info)
        return update
