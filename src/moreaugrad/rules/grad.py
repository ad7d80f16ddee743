"""The ``grad`` rules: back-propagation as vjps on each stage's recorded graph (000 Algo 3-5).

* objective: ``lambda_tau = grad h(x_tau)``;
* state: ``lambda_{t-1} = d_x phi_t(w_t, x_{t-1})^T lambda_t``;
* weight: ``d_t = d_w phi_t(w_t, x_{t-1})^T lambda_t + grad r_t(w_t)``, with step ``s_t = step``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..checks import check_positive
from ..types import Dual, Signal, SolveInfo, StateUpdate, WeightUpdate
from .registry import LineRule, lookup, register


def objective_value(h: Any, output: Tensor, target: Any) -> tuple[Tensor, Tensor]:
    """``(h(x_tau), x_tau)`` with ``x_tau`` a fresh leaf, so ``grad h`` stops at the output."""
    out = output.detach().requires_grad_(True)
    return scalar_loss(h, out, target), out


def scalar_loss(h: Any, output: Tensor, target: Any) -> Tensor:
    """``h(output, target)`` as a 0-dim tensor, on ``output``'s graph; anything else is refused."""
    loss = h(output, target)
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(f"objective: h(output, target) must return a scalar tensor, got {shape}")
    return loss.reshape(())


@dataclass(frozen=True)
class Grad(LineRule):
    """Gradient back-propagation on any line (000 Algo 3-5).

    Args:
        step: the weight step ``s_t`` used by ``Oracle.step`` (plain gradient descent). It does not
            change the direction written to ``.grad``.
    """

    step: float = 1.0

    def __post_init__(self) -> None:
        check_positive("grad", "step", self.step)

    def objective(self, h: Any, output: Tensor, target: Any,
                  horizon: int = 1) -> tuple[Tensor, Signal, None]:
        loss, out = objective_value(h, output, target)
        (lam,) = torch.autograd.grad(loss, out)
        return loss.detach(), Dual(lam), None

    def fused(self, site: Any, dw: tuple[Tensor | None, ...]) -> WeightUpdate:
        """The weight update from ``d_w phi_t^T lambda_t`` taken by a fused segment of the sweep
        (``sweep.fused_vjp``; one entry per weight, None where autograd did not reach it)."""
        direction = {n: torch.zeros_like(w) if g is None else g
                     for (n, w), g in zip(site.w.items(), dw, strict=True)}
        return WeightUpdate(regularized(site, direction), self.step, VJP)


VJP = SolveInfo("vjp")  # frozen: one instance for every stage


def regularized(site: Any, direction: dict[str, Tensor]) -> dict[str, Tensor]:
    """``d_t + grad r_t(w_t)`` when the stage has a regulariser (000 App. D.6)."""
    if site.regularizer is None:
        return direction
    return {n: d + site.regularizer.grad(site.w[n].detach()) for n, d in direction.items()}


@register(Grad, "state")
def grad_state(rule: Grad, site: Any, signal: Signal) -> StateUpdate:
    """``lambda_{t-1} = d_x phi_t^T lambda_t``."""
    dx, _ = site.vjp(signal.dual(site.x.detach()), weights=False)
    return StateUpdate(Dual(dx))


@register(Grad, "weight")
def grad_weight(rule: Grad, site: Any, signal: Signal) -> WeightUpdate:
    """``d_t = d_w phi_t^T lambda_t + grad r_t(w_t)``."""
    _, dw = site.vjp(signal.dual(site.x.detach()))
    return rule.fused(site, tuple(dw.values()))


def plain_gradient(rule: Any) -> bool:
    """Whether ``rule``'s objective line is :class:`Grad`'s ``grad h``, so the sweep may take it in
    the same autograd call as the plain vjps of the top stages (``sweep(fuse_objective=True)``),
    as ``loss.backward()`` does: ``lambda_tau`` is then never formed."""
    return type(rule.objective).objective is Grad.objective


def plain_vjp(rule: Any, stage: Any, horizon: int | None = None) -> bool:
    """Whether ``rule``'s state and weight lines at ``stage`` are :class:`Grad`'s plain vjps, so a
    run of such stages may share one autograd call (:func:`~moreaugrad.sweep.fused_vjp`), whose
    weight parts the weight rule's ``fused`` turns into updates.

    A state line of another rule that is the vjp on some stages says so by an attribute
    ``vjp_at(line_rule, stage, horizon) -> bool`` on its registered function (FenBP's affine stages,
    but for the output stage, whose surrogate term needs its signal); such a stage's state info is
    then left empty, as a fused segment forms no signal inside it."""
    for line, spec, fn in (("state", rule.state, grad_state), ("weight", rule.weight, grad_weight)):
        if not isinstance(spec, LineRule) or any(
                getattr(type(spec), m) is not getattr(LineRule, m) for m in ("entry", "state", "weight")):
            return False
        try:
            found = lookup(spec, line, stage.module)
        except NotImplementedError:
            return False
        vjp_at = getattr(found, "vjp_at", None)
        if found is not fn and not (vjp_at is not None and vjp_at(spec, stage, horizon)):
            return False
    return True
