"""The networks of the papers' experiments, as ``nn.Sequential`` chains, sized from a config.

``stages`` sets the granularity (DESIGN section 1): ``"split"`` makes every affine map, activation
and pooling its own stage (closed-form rules where they exist); ``"layer"`` makes each
``affine -> ReLU (-> pool)`` one stage, the papers' "layer" (generic inner solver for the Moreau rule).
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

STAGES = ("split", "layer")


def _group(mods: list[nn.Module], stages: str) -> list[nn.Module]:
    if stages == "split" or len(mods) == 1:
        return mods
    return [nn.Sequential(*mods)]


def mlp(in_features: int, hidden: list[int], classes: int, stages: str = "split") -> nn.Sequential:
    """``in -> [Linear -> ReLU] x len(hidden) -> Linear -> classes`` (000 E.1.2: hidden (4000, 1000,
    4000); 004 Sec. 5.1: 3072-4000-1000-4000-10; 000 App. F.2: the five sizes of Table 2)."""
    dims = [in_features, *hidden]
    layers: list[nn.Module] = []
    for a, b in zip(dims[:-1], dims[1:], strict=True):
        layers += _group([nn.Linear(a, b), nn.ReLU()], stages)
    layers.append(nn.Linear(dims[-1], classes))
    return nn.Sequential(*layers)


def _conv_ops(ndim: int) -> tuple[type, type, type]:
    if ndim == 1:
        return nn.Conv1d, nn.MaxPool1d, nn.AdaptiveAvgPool1d
    if ndim == 2:
        return nn.Conv2d, nn.MaxPool2d, nn.AdaptiveAvgPool2d
    raise ValueError(f"convolutional models need inputs (C, L) or (C, H, W), got {ndim} spatial dims")


def convnet(in_shape: tuple[int, ...], classes: int, channels: list[int] | None = None, kernel: int = 5,
            stages: str = "split") -> nn.Sequential:
    """The ConvNet of 004 Sec. 5.3 and 000 Sec. 4: three ``Conv(k=5) -> ReLU -> MaxPool(2)`` blocks
    of 16, 20, 20 filters, then a fully connected layer. 1-D inputs ``(C, L)`` get 1-D convolutions.
    """
    channels = [16, 20, 20] if channels is None else list(channels)
    conv, pool, _ = _conv_ops(len(in_shape) - 1)
    layers: list[nn.Module] = []
    c, size = in_shape[0], list(in_shape[1:])
    for out in channels:
        block = [conv(c, out, kernel, padding=kernel // 2), nn.ReLU()]
        if min(size) >= 2:
            block.append(pool(2))
            size = [s // 2 for s in size]
        layers += _group(block, stages)
        c = out
    layers += [nn.Flatten(), nn.Linear(c * math.prod(size), classes)]
    return nn.Sequential(*layers)


def allcnn(in_shape: tuple[int, ...], classes: int, widths: list[int] | None = None,
           stages: str = "split") -> nn.Sequential:
    """All-CNN-C (Springenberg et al. 2015; 001 Fig. 4) without dropout: 3x3 convolutions of
    ``widths[0]`` filters twice, a stride-2 one, the same with ``widths[1]``, a 3x3 and a 1x1 one,
    a 1x1 one to the classes and global average pooling. The last 3x3 convolution is "valid" as in
    the original when the feature map is at least 3 wide, padded otherwise (small inputs)."""
    w1, w2 = [96, 192] if widths is None else list(widths)
    conv, _, gap = _conv_ops(len(in_shape) - 1)
    layers: list[nn.Module] = []
    c, size = in_shape[0], min(in_shape[1:])
    plan: list[tuple[int, int, int, int]] = []  # (out, kernel, stride, padding)
    for w in (w1, w2):
        plan += [(w, 3, 1, 1), (w, 3, 1, 1), (w, 3, 2, 1)]
    for _, k, s, p in plan:
        size = (size + 2 * p - k) // s + 1
    plan += [(w2, 3, 1, 0 if size >= 3 else 1), (w2, 1, 1, 0)]
    for out, k, s, p in plan:
        layers += _group([conv(c, out, k, stride=s, padding=p), nn.ReLU()], stages)
        c = out
    layers += [conv(c, classes, 1), gap(1), nn.Flatten()]
    return nn.Sequential(*layers)


MODELS = ("mlp", "convnet", "allcnn")


def build(spec: dict[str, Any], in_shape: tuple[int, ...], classes: int) -> tuple[nn.Sequential, bool]:
    """The model a config's ``model`` table describes, and whether it takes flattened inputs."""
    kind = spec.get("kind", "mlp")
    stages = spec.get("stages", "split")
    if stages not in STAGES:
        raise ValueError(f"model.stages must be one of {STAGES}, got {stages!r}")
    if kind == "mlp":
        return mlp(math.prod(in_shape), list(spec.get("hidden", [128, 128])), classes, stages), True
    if kind == "convnet":
        return convnet(in_shape, classes, spec.get("channels"), spec.get("kernel", 5), stages), False
    if kind == "allcnn":
        return allcnn(in_shape, classes, spec.get("widths"), stages), False
    raise ValueError(f"model.kind must be one of {MODELS}, got {kind!r}")


def describe(spec: dict[str, Any]) -> str:
    kind = spec.get("kind", "mlp")
    if kind == "mlp":
        return f"MLP {tuple(spec.get('hidden', [128, 128]))}"
    if kind == "convnet":
        return f"ConvNet {tuple(spec.get('channels', [16, 20, 20]))}"
    return f"All-CNN-C {tuple(spec.get('widths', [96, 192]))}"
