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

from . import config, engine, report, seeds, store, verdict
from . import parallel as parallel_
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
               log: Callable[[str], None] = print, n_seeds: int | None = None,
               parallel: parallel_.Parallel | None = None) -> dict[str, Any] | None:
    """Run (or resume) a config into ``out``, then write its figures and ``summary.md``.

    Args:
        n_seeds: how many seeds (``seed, seed + 1, ...``); default the config's ``seeds`` key, else 1.
            One seed runs in ``out`` itself; several run in ``out/seed-S/`` each (every one resumable)
            and ``out/results.json`` holds their mean and spread (``runner.seeds``).
        callback: called as ``callback(job_id, updates)`` after every optimizer step (tests use it
            to interrupt a run at a chosen step).
        parallel: this process's rank in a data-parallel run (``moreaugrad run --nproc``, started by
            :func:`runner.parallel.launch`); only rank 0 writes and returns the results (the others
            return None).
    """
    exp = load(path, scale)
    if isinstance(exp, config.Script):
        raise ConfigError(f"{path} is a script experiment ({exp.path}); run it with `moreaugrad run`")
    n = exp.config.get("seeds", 1) if n_seeds is None else n_seeds
    seed_ids = seeds.seed_list(seed, n)
    out = Path(out)

    def context(s: int, folder: Path) -> Context:
        return Context(out=folder, seed=s, device=torch.device(device),
                       data_dir=None if data_dir is None else Path(data_dir), progress=progress,
                       callback=callback, log=log, parallel=parallel)

    if n == 1:
        results = engine.run(exp, context(seed, out))
    else:
        if (out / "run.json").is_file():
            raise RunMismatchError(f"{out} holds a single-seed run; choose another --out for {n} seeds")
        dirs = [seeds.SEED_DIR.format(seed=s) for s in seed_ids]
        per_seed = []
        for s, d in zip(seed_ids, dirs, strict=True):
            log(f"{exp.name}: seed {s} ({len(per_seed) + 1} of {n}) in {out / d}")
            per_seed.append(engine.run(exp, context(s, out / d)))
        if parallel is not None and not parallel.main:
            return None
        results = seeds.aggregate(per_seed, seed_ids, dirs)
        store.write_json(out / "results.json", results)
        results = store.read_json(out / "results.json")
    if parallel is not None and not parallel.main:
        return None
    report.write(results, out)
    return results


__all__ = ["ConfigError", "Context", "Experiment", "RunMismatchError", "config", "demo_config", "engine",
           "load", "parallel_", "report", "run_config", "seeds", "store", "verdict"]
