"""The rule registry: closed forms and generic rules keyed by (rule type, line, stage type).

Like a derivative table (HIPS/autograd ``primitive_vjps``): a rule class registers a function per
line (``"state"`` or ``"weight"``) for each module type it has a closed form for, and a generic
function for ``nn.Module``. Lookup walks the module type's MRO, so the most specific entry wins.
Every registered function has the one signature ``fn(rule, site, signal) -> StateUpdate |
WeightUpdate``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from ..types import Signal, StateUpdate, WeightUpdate

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
    """The most specific entry for ``type(rule)``, ``line`` and ``type(module)``."""
    for rule_cls in type(rule).__mro__:
        for cls in type(module).__mro__:
            fn = _TABLE.get((rule_cls, line, cls))
            if fn is not None:
                return fn
    raise NotImplementedError(
        f"no {line} rule {type(rule).__name__} registered for stage type {type(module).__name__}; "
        f"register one with moreaugrad.rules.register({type(rule).__name__}, {line!r}, "
        f"{type(module).__name__})"
    )


class LineRule:
    """Base class of the state and weight line rules: dispatches through the registry."""

    def state(self, site: Any, signal: Signal) -> StateUpdate:
        return lookup(self, "state", site.stage.module)(self, site, signal)

    def weight(self, site: Any, signal: Signal) -> WeightUpdate:
        return lookup(self, "weight", site.stage.module)(self, site, signal)
