"""Validation of user settings at construction: each error names the owner, the field, what was
expected and what was given (CONVENTIONS 6)."""

from __future__ import annotations

from typing import Any


def check_positive(owner: str, name: str, value: Any, allow_none: bool = False) -> None:
    """``ValueError("owner: name must be a finite number > 0, got value")`` unless it is one."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
            or value != value or value == float("inf"):
        raise ValueError(f"{owner}: {name} must be a finite number > 0, got {value!r}")


def check_count(owner: str, name: str, value: Any) -> None:
    """``ValueError("owner: name must be an int >= 1, got value")`` unless it is one."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")
