"""The reference ProxProp (tfrerix/proxprop, MIT) beside ours, for ``--peer DIR``.

``DIR`` holds the authors' ``ProxProp.py``. It was written for PyTorch 0.3; the two compatibility
lines of its README (``saved_variables`` and ``torch.gesv``) are applied when it is loaded, and
only then: nothing is patched unless ``--peer`` is given. The reference layers are drop-in
``nn.Linear``/``nn.Conv2d`` whose backward writes ``w - w_new`` into ``.grad``, so one call is
``zero_grad(); loss(model(x), y).backward()``. They get our model's weights; the last layer stays
a plain ``nn.Linear`` (explicit), as in the reference's ``models.py`` and in our preset.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from .models import Model, Workload

# (preset name, reference optimization_mode, tau_prox, models it runs on). The reference's exact
# mode exists for Linear only.
PEER_PRESETS: list[tuple[str, str, float, tuple[str, ...]]] = [
    ("ref_proxprop_cg3", "prox_cg3", 1.0, ("mlp004", "convnet004")),
    ("ref_proxprop_exact", "prox_exact", 0.05, ("mlp004",)),
]


def load(directory: str | Path) -> ModuleType:
    """Import ``ProxProp`` from ``directory`` after the two compatibility lines of its README."""
    path = Path(directory).resolve()
    if not (path / "ProxProp.py").is_file():
        raise FileNotFoundError(f"--peer: no ProxProp.py in {path}")
    torch.autograd.function.BackwardCFunction.saved_variables = property(lambda self: self.saved_tensors)
    if not hasattr(torch, "gesv"):
        torch.gesv = lambda b, A: (torch.linalg.solve(A, b), None)
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return importlib.import_module("ProxProp")


def mirror(module: ModuleType, model: nn.Sequential, mode: str, tau_prox: float) -> nn.Sequential:
    """``model`` with every ``Linear``/``Conv2d`` but the last replaced by the reference's ProxProp
    layer, with the same weights."""
    last = max(i for i, m in enumerate(model) if isinstance(m, (nn.Linear, nn.Conv2d)))
    layers: list[nn.Module] = []
    for i, m in enumerate(model):
        if i != last and isinstance(m, nn.Linear):
            new = module.ProxPropLinear(m.in_features, m.out_features, tau_prox=tau_prox,
                                        optimization_mode=mode)
        elif i != last and isinstance(m, nn.Conv2d):
            new = module.ProxPropConv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                                        padding=m.padding, tau_prox=tau_prox, optimization_mode=mode)
        else:
            layers.append(m)
            continue
        ref = m.weight
        new = new.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            new.weight.copy_(m.weight)
            new.bias.copy_(m.bias)
        layers.append(new)
    return nn.Sequential(*layers)


def peer_calls(module: ModuleType, model: Model, work: Workload) -> dict[str, Callable[[], None]]:
    """One call per reference preset that runs on ``model``: forward + ``loss.backward()``."""
    calls: dict[str, Callable[[], None]] = {}
    for name, mode, tau_prox, models in PEER_PRESETS:
        if model.id not in models:
            continue
        net = mirror(module, work.module, mode, tau_prox)
        calls[name] = _call(net, work)
    return calls


def _call(net: nn.Module, work: Workload) -> Callable[[], None]:
    h, x, y = work.objective, work.x, work.y

    def call() -> None:
        net.zero_grad(set_to_none=True)
        h(net(x), y).backward()
    call.module = net  # type: ignore[attr-defined]  # for the memory measurement's reset
    return call
