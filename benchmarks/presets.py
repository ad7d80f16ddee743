"""The presets timed on every model, and issue 16's targets as data.

A :class:`Preset` builds an ``mg.Oracle`` for a :class:`~benchmarks.models.Workload`; the suite
times ``model.zero_grad(set_to_none=True); oracle.backward(x, y)`` (the forward is inside
``backward``: it records the states, then sweeps).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

import moreaugrad as mg

from .models import Model, Workload, grouped


@dataclass(frozen=True)
class Preset:
    """One oracle to time.

    Args:
        name: the name ``--only`` filters on and the table shows.
        rule: ``model -> mg.rules.Rule`` (the pendulum takes other Moreau steps than the networks).
        applies: which models it runs on.
        regroup: run it on :func:`~benchmarks.models.grouped` (one stage per layer, same weights).
        objective: replace the model's objective (``model -> objective``).
        note: how the preset is configured, for the README and the JSON.
    """

    name: str
    rule: Callable[[Model], Any]
    applies: Callable[[Model], bool] = lambda m: True
    regroup: bool = False
    objective: Callable[[Model], Any] | None = None
    note: str = ""

    def call(self, model: Model, work: Workload) -> Callable[[], None]:
        """``zero_grad`` and one oracle call (forward included)."""
        module = grouped(work.module) if self.regroup else work.module
        h = self.objective(model) if self.objective is not None else work.objective
        oracle = mg.Oracle(module, h, self.rule(model))
        x, y = work.x, work.y
        if x is None:
            def call() -> None:
                module.zero_grad(set_to_none=True)
                oracle.backward()
        else:
            def call() -> None:
                module.zero_grad(set_to_none=True)
                oracle.backward(x, y)
        return call


def _moreau(model: Model) -> Any:
    # The pendulum's steps are those of 000 App. E.1.1 as the old bench_moreau.py used them.
    if model.kind == "dynamics":
        return mg.rules.moreau(gamma=0.5, alpha=128.0)
    return mg.rules.moreau(gamma=1.0, alpha=2.0)


def _network(m: Model) -> bool:
    return m.kind != "dynamics"


# 000 App. E.2.1: two quasi-Newton steps (Goldstein, then Barzilai-Borwein) on each layer's problem.
QN2 = mg.solvers.QuasiNewton(tol=None, max_iter=2)

PRESETS: list[Preset] = [
    Preset("backprop", lambda m: mg.rules.backprop()),
    Preset("moreau", _moreau, note="Linear/Conv and activations as separate stages; gamma=1, alpha=2 "
                                   "(pendulum: gamma=0.5, alpha=128)"),
    Preset("moreau_grouped", lambda m: mg.rules.moreau(gamma=1.0, alpha=2.0, solver=QN2),
           applies=_network, regroup=True,
           note="one stage per layer, QuasiNewton(tol=None, max_iter=2) on each layer's problem"),
    Preset("moreau_nn_ce", _moreau, applies=lambda m: m.id == "mlp256",
           objective=lambda m: nn.CrossEntropyLoss(), note="moreau with torch's nn.CrossEntropyLoss()"),
    Preset("proxprop_cg3", lambda m: mg.rules.proxprop(tau_theta=1.0, tau=1.0, method=mg.lstsq.CG(3)),
           note="tau_theta=1, tau=1, 3 CG steps"),
    Preset("proxprop_exact", lambda m: mg.rules.proxprop(tau_theta=0.05, tau=1.0, method=mg.lstsq.Exact()),
           note="tau_theta=0.05, tau=1, exact solve"),
    Preset("fenchel", lambda m: mg.rules.fenchel(), note="tau=1"),
    Preset("target_prop", lambda m: mg.rules.target_prop(), note="defaults (kappa=1)"),
    Preset("regularized_target_prop", lambda m: mg.rules.regularized_target_prop(), note="defaults"),
    Preset("augmented_lagrangian", lambda m: mg.rules.augmented_lagrangian(), note="defaults"),
]


@dataclass(frozen=True)
class Target:
    """``metric <= limit`` for the rows that ``applies`` picks (issue 16, Build 3).

    ``metric`` is ``"time"`` (ratio to plain ``loss.backward()``), ``"vs_backprop"`` (ratio to our
    backprop oracle) or ``"memory"`` (peak-memory ratio to plain ``loss.backward()``).
    """

    label: str
    metric: str
    limit: float
    applies: Callable[[Model, str], bool]


TIME_TARGETS: list[Target] = [
    Target("backprop oracle", "time", 1.05, lambda m, p: p == "backprop"),
    Target("moreau split stages, MLP", "time", 1.3,
           lambda m, p: m.kind == "mlp" and p in ("moreau", "moreau_nn_ce")),
    Target("moreau 004 ConvNet", "time", 1.6, lambda m, p: m.id == "convnet004" and p == "moreau"),
    Target("moreau grouped, QN 2", "time", 3.5, lambda m, p: p == "moreau_grouped"),
    Target("proxprop cg3 004 MLP", "time", 1.6, lambda m, p: m.id == "mlp004" and p == "proxprop_cg3"),
    Target("proxprop 004 ConvNet", "time", 2.4,
           lambda m, p: m.id == "convnet004" and p in ("proxprop_cg3", "proxprop_exact")),
    Target("fenchel", "time", 1.1, lambda m, p: p == "fenchel"),
    Target("moreau pendulum", "vs_backprop", 3.0, lambda m, p: m.kind == "dynamics" and p == "moreau"),
]

MEMORY_TARGET = Target("peak memory, any preset", "memory", 1.5, lambda m, p: not p.startswith("ref_"))


def time_target(model: Model, preset: str) -> Target | None:
    """The time target of a row, if issue 16 sets one."""
    return next((t for t in TIME_TARGETS if t.applies(model, preset)), None)
