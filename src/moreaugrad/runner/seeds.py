"""Several seeds of one config: per-seed runs in ``RUN/seed-S/`` and their mean and spread in
``RUN/results.json``.

Each seed is an ordinary run (its own ``run.json``, checkpoints, resume and ``results.json``) with the
seed ``S`` deciding the data split, the initial weights and the batch order. :func:`aggregate` merges
the per-seed results into one document of the same format, whose job records hold, per grid point:

- ``curves``, ``best``, ``final``: the mean over seeds (``best`` is the mean of the per-seed
  best-so-far curves, 000 Sec. 4's convention applied per seed);
- ``spread``, ``final_spread``: the sample standard deviation over seeds (0 for one seed);
- ``per_seed``: every seed's own curves, best-so-far curves, score and divergence;
- ``score``: the mean of the per-seed selection scores, or None when any seed diverged (a grid point
  is selected only if it trains on every seed).

A method's grid point is selected by the mean score; two methods are told apart only when their means
differ by more than the sum of their spreads (:func:`outside_spread`), otherwise they tie.
"""

from __future__ import annotations

import math
from typing import Any

SEED_DIR = "seed-{seed}"


def seed_list(seed: int, n: int) -> list[int]:
    """The seeds of a run with ``--seed seed --seeds n``: ``seed, seed + 1, ..., seed + n - 1``."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"seeds must be an integer >= 1, got {n!r}")
    return [seed + i for i in range(n)]


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof = 1``; 0 for a single value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def outside_spread(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Whether two ``(mean, spread)`` pairs differ by more than the sum of their spreads (their
    mean +- spread intervals do not overlap); if not, the comparison is a tie."""
    return abs(a[0] - b[0]) > a[1] + b[1]


def _columns(curves: list[list[float]]) -> list[list[float]]:
    n = min(len(c) for c in curves)
    return [[c[i] for c in curves] for i in range(n)]


def _merge_job(recs: list[dict[str, Any]], seeds: list[int]) -> dict[str, Any]:
    first = recs[0]
    out = {k: first[k] for k in ("id", "panel", "method", "label", "params", "spec")}
    if "data_sizes" in first:
        out["data_sizes"] = first["data_sizes"]
    diverged = [r["diverged"] for r in recs]
    out["diverged"] = any(diverged)
    out["diverged_seeds"] = sum(diverged)
    out["error"] = next((r["error"] for r in recs if r["error"]), None)
    metrics = [m for m in first["curves"] if all(m in r["curves"] and r["curves"][m] for r in recs)]
    out["curves"], out["best"], out["spread"] = {}, {}, {}
    out["final"], out["final_spread"] = {}, {}
    for m in metrics:
        out["curves"][m] = [mean_std(col)[0] for col in _columns([r["curves"][m] for r in recs])]
        stats = [mean_std(col) for col in _columns([r["best"][m] for r in recs])]
        out["best"][m] = [s[0] for s in stats]
        out["spread"][m] = [s[1] for s in stats]
        out["final"][m], out["final_spread"][m] = mean_std([r["final"][m] for r in recs])
    out["x"] = list(range(len(next(iter(out["curves"].values()), []))))
    scores = [r["score"] for r in recs]
    out["score"] = None if any(s is None for s in scores) else mean_std(scores)[0]
    out["updates"] = first["updates"]
    elapsed = [mean_std(col)[0] for col in _columns([r["timings"]["elapsed_s"] for r in recs])]
    out["timings"] = {"wall_s": sum(r["timings"]["wall_s"] for r in recs), "elapsed_s": elapsed}
    out["per_seed"] = [{"seed": s, "diverged": r["diverged"], "error": r["error"], "score": r["score"],
                        "final": r["final"], "best_final": {m: v[-1] for m, v in r["best"].items() if v},
                        "curves": r["curves"], "best": r["best"]} for s, r in zip(seeds, recs, strict=True)]
    return out


def select(results: dict[str, Any]) -> dict[str, dict[str, str | None]]:
    """Per panel and method, the job of smallest (mean) score; None when every grid point diverged."""
    selected: dict[str, dict[str, str | None]] = {}
    for pname, info in results["panels"].items():
        if info.get("skipped"):
            continue
        selected[pname] = {}
        for m in info["methods"]:
            cands = [r for r in results["jobs"] if r["panel"] == pname and r["method"] == m
                     and r["score"] is not None]
            selected[pname][m] = min(cands, key=lambda r: r["score"])["id"] if cands else None
    return selected


def aggregate(per_seed: list[dict[str, Any]], seeds: list[int], dirs: list[str]) -> dict[str, Any]:
    """One results document from the per-seed ones (same config and scale, seeds ``seeds``)."""
    if len(per_seed) != len(seeds) or not per_seed:
        raise ValueError(f"aggregate: {len(per_seed)} results for seeds {seeds}")
    base = per_seed[0]
    out = {k: v for k, v in base.items() if k not in ("jobs", "selected", "timings")}
    out["status"] = "complete" if all(r["status"] == "complete" for r in per_seed) else "running"
    out["seed"], out["seeds"], out["seed_dirs"] = seeds[0], list(seeds), list(dirs)
    by_id = [{r["id"]: r for r in res["jobs"]} for res in per_seed]
    ids = [r["id"] for r in base["jobs"] if all(r["id"] in b for b in by_id)]
    out["jobs"] = [_merge_job([b[i] for b in by_id], seeds) for i in ids]
    panels = dict(base["panels"])
    for res in per_seed[1:]:  # a panel skipped on any seed (missing data) is skipped
        for p, info in res["panels"].items():
            if info.get("skipped") and not panels[p].get("skipped"):
                panels[p] = info
    out["panels"] = panels
    out["selected"] = select(out)
    out["timings"] = {"wall_s": sum(r["timings"]["wall_s"] for r in per_seed),
                      "finished": max(r["timings"]["finished"] for r in per_seed),
                      "jobs_s": {r["id"]: r["timings"]["wall_s"] for r in out["jobs"]}}
    return out


def n_seeds(results: dict[str, Any]) -> int:
    return len(results.get("seeds", [results.get("seed", 0)]))
