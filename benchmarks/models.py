"""The benchmark's models: what each builds, at which batch, and its plain ``loss.backward()``.

Every model is built from a seed with random data of the right shape, so that two runs (and the
reference beside ours) see the same weights and batch. A network model is an ``nn.Sequential``
with one stage per child (``Linear`` and ``ReLU`` separate); :func:`grouped` regroups the same
modules (shared weights) into one stage per layer for the grouped-layer presets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import moreaugrad as mg


@dataclass
class Workload:
    """One built model: the module the oracles run on, its objective and batch.

    ``x is None`` marks a chain built from dynamics (the pendulum): its oracles are called as
    ``oracle.backward()`` and its plain backward is the autograd backward through the roll-out.
    """

    module: nn.Module
    objective: Any
    x: torch.Tensor | None
    y: Any
    dtype: torch.dtype
    batch: int
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def plain(self) -> Callable[[], None]:
        """Forward + ``loss.backward()`` with torch autograd: the denominator of every ratio."""
        module, h, x, y = self.module, self.objective, self.x, self.y

        if x is None:
            def call() -> None:
                module.zero_grad(set_to_none=True)
                h(module()).backward()
        else:
            def call() -> None:
                module.zero_grad(set_to_none=True)
                h(module(x), y).backward()
        return call


@dataclass(frozen=True)
class Model:
    """A benchmark model: ``build(dtype, device, quick)`` gives its :class:`Workload`.

    ``kind`` is ``"mlp"``, ``"conv"`` or ``"dynamics"`` (the targets of issue 16 are stated per
    kind); ``large`` models are left out of ``--quick``.
    """

    id: str
    title: str
    kind: str
    build: Callable[[torch.dtype, torch.device, bool], Workload]
    large: bool = False


def _mlp(widths: list[int]) -> nn.Sequential:
    """``Linear`` and ``ReLU`` as separate children (no ReLU after the last layer)."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def convnet004() -> nn.Sequential:
    """004 Sec. 5.3's ConvNet as the reference code builds it (``models.py``, ``ProxPropConvNet``):
    three 5x5 convolutions (16, 20, 20 filters, padding 2) with ReLU, max-pooling after the first
    two, and a linear layer from 20x8x8 to 10 classes. (The paper's text also pools after the third
    convolution; the reference code, whose timings we compare to, does not.)"""
    return nn.Sequential(
        nn.Conv2d(3, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(16, 20, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2, 2),
        nn.Conv2d(20, 20, 5, padding=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(20 * 8 * 8, 10))


def allcnn_small() -> nn.Sequential:
    """All-CNN-C (Springenberg et al. 2015, the architecture of 001 Fig. 4) at a third of its width
    so that a CPU run stays short: nine convolutions 3x3 (32, 32, 32 stride 2, 64, 64, 64 stride 2),
    3x3 valid (64), 1x1 (64), 1x1 (10 classes), ReLU after each but the last, then global average
    pooling. No dropout (it would change the batch between the compared calls)."""
    c1, c2 = 32, 64
    return nn.Sequential(
        nn.Conv2d(3, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c1, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c1, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c2, c2, 3, padding=1), nn.ReLU(),
        nn.Conv2d(c2, c2, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(c2, c2, 3), nn.ReLU(),
        nn.Conv2d(c2, c2, 1), nn.ReLU(),
        nn.Conv2d(c2, 10, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten())


def grouped(model: nn.Sequential) -> nn.Sequential:
    """The same modules (shared weights) with one stage per layer: each ``Linear`` or ``Conv2d``
    starts a new stage that takes the parameter-free modules after it (a leading parameter-free
    module joins the first stage)."""
    groups: list[list[nn.Module]] = []
    for m in model:
        if isinstance(m, (nn.Linear, nn.Conv2d)) or not groups:
            groups.append([m])
        else:
            groups[-1].append(m)
    return nn.Sequential(*(nn.Sequential(*g) for g in groups))


def _batch(full: int, quick: bool) -> int:
    return max(16, full // 8) if quick else full


def _classifier(make: Callable[[], nn.Sequential], in_shape: tuple[int, ...], classes: int,
                full_batch: int) -> Callable[[torch.dtype, torch.device, bool], Workload]:
    def build(dtype: torch.dtype, device: torch.device, quick: bool) -> Workload:
        torch.manual_seed(0)
        model = make().to(device=device, dtype=dtype)
        b = _batch(full_batch, quick)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(b, *in_shape, generator=g, dtype=dtype).to(device)
        y = torch.randint(0, classes, (b,), generator=g).to(device)
        return Workload(model, mg.losses.CrossEntropy(), x, y, dtype, b)
    return build


def _pendulum(dtype: torch.dtype, device: torch.device, quick: bool) -> Workload:
    # The pendulum runs in float64 whatever --dtype says: it is the library's default for control
    # chains (000 App. E.1.1), and its 2-dimensional state makes float32 meaningless for speed.
    horizon = 20 if quick else 100
    p = mg.control.Pendulum(horizon=horizon)
    chain = p.chain(p.initial_controls(torch.float64, device))
    return Workload(chain, p.objective, None, None, torch.float64, 1,
                    note=f"T={horizon}, float64", extra={"horizon": horizon})


def _tiny(kind: str) -> Callable[[torch.dtype, torch.device, bool], Workload]:
    def build(dtype: torch.dtype, device: torch.device, quick: bool) -> Workload:
        torch.manual_seed(0)
        if kind == "dynamics":
            p = mg.control.Pendulum(horizon=3)
            return Workload(p.chain(p.initial_controls(torch.float64, device)), p.objective, None, None,
                            torch.float64, 1)
        if kind == "mlp":
            model, shape = _mlp([4, 6, 3]), (4,)
        else:
            model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(2, 3, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            shape = (1, 4, 4)
        model = model.to(device=device, dtype=dtype)
        x = torch.randn(2, *shape, dtype=dtype).to(device)
        return Workload(model, mg.losses.CrossEntropy(), x, torch.tensor([0, 2], device=device), dtype, 2)
    return build


TINY: list[Model] = [Model(f"tiny_{k}", f"tiny {k}", k, _tiny(k)) for k in ("mlp", "conv", "dynamics")]
"""Tiny chains of each kind: every preset runs once on them, unbounded, before anything is timed
(:func:`benchmarks.suite.prime`)."""

MODELS: list[Model] = [
    Model("mlp1024", "MLP 784-1024-1024-10", "mlp",
          _classifier(lambda: _mlp([784, 1024, 1024, 10]), (784,), 10, 256)),
    Model("mlp004", "004 MLP 3072-4000-1000-4000-10", "mlp",
          _classifier(lambda: _mlp([3072, 4000, 1000, 4000, 10]), (3072,), 10, 500), large=True),
    Model("convnet004", "004 ConvNet 3x32x32", "conv",
          _classifier(convnet004, (3, 32, 32), 10, 128)),
    Model("allcnn", "All-CNN-C/3 3x32x32", "conv",
          _classifier(allcnn_small, (3, 32, 32), 10, 64)),
    Model("mlp256", "MLP 784-256-256-10", "mlp",
          _classifier(lambda: _mlp([784, 256, 256, 10]), (784,), 10, 256)),
    Model("pendulum", "pendulum", "dynamics", _pendulum),
]
