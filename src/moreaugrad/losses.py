"""Objectives ``h(x_tau)`` and per-stage regularisers ``r_t(w_t)`` (000 App. D.1, D.6, E.1.2).

An objective is any callable ``h(output, target) -> scalar tensor``; the two below reduce by the
mean over the batch, as 000 App. D.1 writes ``h(z) = (1/n) sum_i L(y_i, z_i)``, and check their
inputs so that a shape or dtype slip fails with both shapes in the message. torch's own losses
(``nn.CrossEntropyLoss()``, ``nn.MSELoss()``, ``F.cross_entropy``, ...) are objectives as they are,
with their own reductions; the Moreau rules know their closed forms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .checks import check_positive


def _check_batch(name: str, output: Tensor, target: Tensor) -> None:
    if not isinstance(target, Tensor):
        raise TypeError(f"{name}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.device != output.device:
        raise TypeError(f"{name}: target is on {target.device} but the output is on {output.device}")
    if output.dim() == 0 or target.dim() == 0 or target.shape[0] != output.shape[0]:
        raise ValueError(f"{name}: target and output must share the batch dimension, got target "
                         f"shape {tuple(target.shape)} and output shape {tuple(output.shape)}")


def _check_labels(name: str, target: Tensor, classes: int) -> None:
    """Class indices in ``[0, classes)``, read with one host sync (both ends in one transfer)."""
    if not target.numel():
        return
    lo, hi = map(int, torch.stack(torch.aminmax(target)).tolist())  # bool labels read as 0/1
    if lo < 0 or hi >= classes:
        raise ValueError(f"{name}: class indices must lie in [0, {classes}), got range [{lo}, {hi}]")


@dataclass(frozen=True)
class SquaredLoss:
    """``h(z) = (1/B) sum_i ||z_i - y_i||^2 / 2``: half the squared error, summed over features and
    averaged over the batch (000 App. E.1.2).

    A 1-D integer target of class indices is one-hot encoded against the output's last dimension,
    so the same labels serve cross-entropy and the squared loss (the paper's MNIST MLP).
    """

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        _check_batch("SquaredLoss", output, target)
        if not target.is_floating_point():
            if target.dim() != 1 or output.dim() != 2:
                raise ValueError(f"SquaredLoss: integer targets must be class indices of shape (B,) "
                                 f"for an output of shape (B, C), got target {tuple(target.shape)} "
                                 f"and output {tuple(output.shape)}")
            _check_labels("SquaredLoss", target, output.shape[1])
            target = F.one_hot(target.long(), output.shape[1]).to(output.dtype)
        elif target.shape != output.shape:
            raise ValueError(f"SquaredLoss: target shape {tuple(target.shape)} does not match output "
                             f"shape {tuple(output.shape)}")
        elif target.dtype != output.dtype:
            raise TypeError(f"SquaredLoss: target dtype {target.dtype} does not match output dtype "
                            f"{output.dtype}")
        return 0.5 * (output - target).pow(2).sum() / output.shape[0]


@dataclass(frozen=True)
class CrossEntropy:
    """``h(z) = (1/B) sum_i (logsumexp(z_i) - z_{i, y_i})``: softmax cross-entropy on logits of shape
    ``(B, C)`` with integer labels of shape ``(B,)``, averaged over the batch."""

    def __call__(self, output: Tensor, target: Tensor) -> Tensor:
        _check_batch("CrossEntropy", output, target)
        if output.dim() != 2:
            raise ValueError(f"CrossEntropy: output must be logits of shape (B, C), got "
                             f"{tuple(output.shape)}")
        if target.dim() != 1 or target.is_floating_point() or target.dtype == torch.bool:
            raise ValueError(f"CrossEntropy: target must hold integer class indices of shape (B,), "
                             f"got shape {tuple(target.shape)} and dtype {target.dtype}")
        _check_labels("CrossEntropy", target, output.shape[1])
        return F.cross_entropy(output, target.long())


@dataclass(frozen=True)
class L2:
    """The per-stage regulariser ``r_t(w_t) = mu ||w_t||^2 / 2`` (000 App. D.6, E.1.2 uses 1e-6).

    Args:
        mu: the weight, a finite number > 0.
    """

    mu: float

    def __post_init__(self) -> None:
        check_positive("L2", "mu", self.mu)

    def __call__(self, w: Tensor) -> Tensor:
        return 0.5 * self.mu * w.pow(2).sum()

    def grad(self, w: Tensor) -> Tensor:
        return self.mu * w

    def prox(self, v: Tensor, step: float) -> Tensor:
        """``argmin_u r(u) + ||u - v||^2 / (2 step) = v / (1 + step mu)``."""
        return v / (1.0 + step * self.mu)


Regularizer = L2


FUNCTIONAL: dict[Any, type[nn.Module]] = {
    F.cross_entropy: nn.CrossEntropyLoss,
    F.mse_loss: nn.MSELoss,
    F.binary_cross_entropy_with_logits: nn.BCEWithLogitsLoss,
    F.nll_loss: nn.NLLLoss,
    F.huber_loss: nn.HuberLoss,
    F.smooth_l1_loss: nn.SmoothL1Loss,
    F.l1_loss: nn.L1Loss,
}
"""``torch.nn.functional`` losses and the module that computes the same with default arguments."""


def functional_loss(h: Any) -> nn.Module | None:
    """The loss module equal to the function ``h`` called with its default arguments (``F.mse_loss``
    is ``nn.MSELoss()``), or None for any other callable (a ``partial``, a lambda)."""
    try:
        cls = FUNCTIONAL.get(h)
    except TypeError:  # unhashable
        return None
    return None if cls is None else cls()


FINITE_GRADIENT: tuple[type, ...] = (SquaredLoss, CrossEntropy, nn.CrossEntropyLoss, nn.MSELoss,
                                     nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.NLLLoss,
                                     nn.BCEWithLogitsLoss)
"""Losses of the output alone whose gradient is finite wherever the loss and the output are (not
``nn.BCELoss``: its loss is clamped where its gradient is infinite)."""


def finite_gradient(h: Any) -> bool:
    """Whether ``h`` is one of :data:`FINITE_GRADIENT`'s exact types (a subclass may compute anything)
    with no parameter that requires grad: a function of the output alone, whose gradient needs no
    finiteness check of its own. Backprop then takes it in the top stages' autograd call."""
    if type(h) not in FINITE_GRADIENT:
        return False
    return not any(p.requires_grad for p in h.parameters()) if isinstance(h, nn.Module) else True


def _public_name(cls: type) -> str:
    module = cls.__module__
    if module.startswith("torch.nn"):
        return f"nn.{cls.__qualname__}"
    if module.startswith("moreaugrad."):
        return f"mg.{module.split('.', 1)[1]}.{cls.__qualname__}"
    return cls.__qualname__


def check_objective(h: Any) -> None:
    """Raise a clear error for an objective that cannot serve as ``h(output, target) -> scalar``.

    Raises:
        TypeError: ``h`` is a class (``nn.CrossEntropyLoss`` instead of ``nn.CrossEntropyLoss()``),
            or is not callable.
        ValueError: a torch loss with ``reduction='none'`` (it returns one loss per element).
    """
    if isinstance(h, type):
        name = _public_name(h)
        raise TypeError(f"objective: got the class {name}, not a loss; pass an instance: {name}()")
    if not callable(h):
        raise TypeError(f"objective: must be callable as h(output, target), got {type(h).__name__}")
    if isinstance(h, nn.modules.loss._Loss) and h.reduction == "none":
        name = _public_name(type(h))
        raise ValueError(f"objective: {name}(reduction='none') returns one loss per element; the "
                         f"objective must be a scalar: use reduction='mean' or 'sum'")
