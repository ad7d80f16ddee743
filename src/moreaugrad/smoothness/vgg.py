"""VGG-16 in its smooth form (003 Sec. 5.1) and the batch-norm comparison of 003 Sec. 5.2."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .estimate import Estimate, estimate

# (output channels, average pooling after it) for the 13 convolutional layers of 003 Sec. 5.1.
PLAN = ((64, False), (64, True), (128, False), (128, True), (256, False), (256, False), (256, True),
        (512, False), (512, False), (512, True), (512, False), (512, False), (512, True))


def vgg16(batch_norm: float | None = None, classes: int = 1000, size: int = 224,
          device: torch.device | str = "meta", dtype: torch.dtype | None = None) -> nn.Sequential:
    """VGG-16 as 003 Sec. 5.1 writes it: ReLU and max pooling replaced by soft-plus and average
    pooling, 13 layers ``phi_l = [pi_avgpool o] a_softplus o b_conv`` (3x3 convolutions, padding 1),
    then ``a_softplus o b_full`` twice (4096) and ``a_softmax o b_full`` (``classes``), on
    ``3 x size x size`` inputs. One stage per layer ``phi_l`` (16 stages).

    Args:
        batch_norm: ``eps`` to add a batch-normalization (003 eq. 11, no affine parameters) after
            each convolution, as in 003 Sec. 5.2; None for none.
        device: ``"meta"`` by default: shapes only, no memory.
    """
    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    layers: list[nn.Module] = []
    c = 3
    for out, pool in PLAN:
        mods: list[nn.Module] = [nn.Conv2d(c, out, 3, padding=1, **kw)]
        if batch_norm is not None:
            mods.append(nn.BatchNorm2d(out, eps=batch_norm, affine=False, **kw))
        mods.append(nn.Softplus())
        if pool:
            mods.append(nn.AvgPool2d(2))
        layers.append(nn.Sequential(*mods))
        c = out
    side = size // 32
    layers.append(nn.Sequential(nn.Flatten(), nn.Linear(512 * side * side, 4096, **kw), nn.Softplus()))
    layers.append(nn.Sequential(nn.Linear(4096, 4096, **kw), nn.Softplus()))
    layers.append(nn.Sequential(nn.Linear(4096, classes, **kw), nn.Softmax(dim=1)))
    return nn.Sequential(*layers)


def batch_norm_comparison(eps: float, batch: int = 128, radius: float = 1.0, input_norm: float = 1.0,
                          size: int = 224) -> tuple[Estimate, Estimate]:
    """The estimates of 003 Sec. 5.2 for VGG-16 without and with batch-norm (``eps``), on
    ``C = {w: ||v_l|| <= radius}`` with ``||x|| = input_norm`` and a batch of ``batch``. The paper
    claims ``l_VGG <= l_VGG-batch`` and ``L_VGG <= L_VGG-batch`` for ``eps = 1e-2`` and the reverse
    for ``eps = 1e2``."""
    shape = (3, size, size)
    kw = {"radius": radius, "input_norm": input_norm, "batch": batch}
    return estimate(vgg16(None, size=size), shape, **kw), estimate(vgg16(eps, size=size), shape, **kw)
