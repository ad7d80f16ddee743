"""The experiment runner behind the ``moreaugrad`` command line (DESIGN sections 6-7).

This is application code, not library code: it is never imported by ``import moreaugrad``. It reads
an experiment config (``experiments/*.toml``), runs its jobs through the public API (``mg.Chain``,
``mg.Oracle``, ``mg.rules``, ``mg.data``, ``mg.control``), checkpoints them, and writes results,
figures and a summary into a run folder. What to run lives in the configs; this package only knows
two kinds of panel (``control`` and ``train``) and two kinds of table (``grid`` and ``selected``).

    from moreaugrad.runner import run_config
    results = run_config("experiments/000_fig3.toml", out="runs/fig3", scale="smoke")
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from . import config, engine, report, store
from .config import ConfigError, Experiment
from .engine import Context, RunMismatchError


def demo_config() -> Path:
    """The demo's config, shipped with the package."""
    return Path(str(resources.files(__package__) / "demo.toml"))


def load(path: str | Path, scale: str = "default") -> Experiment | config.Script:
    """Read and resolve a config file at one scale."""
    return config.resolve(config.read(path), scale, str(path))


def run_config(path: str | Path, out: str | Path, scale: str = "default", seed: int = 0,
               device: str | torch.device = "cpu", data_dir: str | Path | None = None,
               progress: bool = False, callback: Callable[[str, int], None] | None = None,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) a config into ``out``, then write its figures and ``summary.md``.

    Args:
        callback: called as ``callback(job_id, updates)`` after every optimizer step (tests use it
            to interrupt a run at a chosen step).
    """
    exp = load(path, scale)
    if isinstance(exp, config.Script):
        raise ConfigError(f"{path} is a script experiment ({exp.path}); run it with `moreaugrad run`")
    ctx = Context(out=Path(out), seed=seed, device=torch.device(device),
                  data_dir=None if data_dir is None else Path(data_dir), progress=progress,
                  callback=callback, log=log)
    results = engine.run(exp, ctx)
    report.write(results, ctx.out)
    return results


__all__ = ["ConfigError", "Context", "Experiment", "RunMismatchError", "config", "demo_config", "engine",
           "load", "report", "run_config", "store"]
