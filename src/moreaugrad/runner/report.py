"""Figures, tables and ``summary.md`` from a ``results.json`` alone (so ``moreaugrad plot`` can redraw).

Curves follow 000 Sec. 4: the best value so far, ``y_k = min_{i <= k} F(w^(i))`` (max for accuracies),
for the grid point each method selects. With several seeds, values are the mean over seeds ``+-`` the
sample standard deviation, and the figures shade mean +- spread.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from . import store, verdict
from .config import fmt_value
from .seeds import n_seeds

LABELS = {
    "loss": "objective",
    "val_loss": "validation loss", "test_loss": "test loss",
    "train_accuracy": "train accuracy", "val_accuracy": "validation accuracy",
    "test_accuracy": "test accuracy",
}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def metric_label(metric: str, kind: str) -> str:
    if metric == "loss":
        return "h(x_tau)" if kind == "control" else "full-batch train loss"
    return LABELS.get(metric, metric.replace("_", " "))


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "-"
        return f"{v:.{digits}g}"
    return str(v)


def _stat(results: dict[str, Any], rec: dict[str, Any], metric: str, digits: int = 4,
          final: bool = False) -> str:
    """A record's final best-so-far ``metric`` (or raw final value), ``mean +- spread`` over seeds."""
    if final:
        value, spread = rec["final"].get(metric), rec.get("final_spread", {}).get(metric)
    else:
        if metric not in rec["best"]:
            return "-"
        value, spread = rec["best"][metric][-1], rec.get("spread", {}).get(metric, [None])[-1]
    text = _fmt(value, digits)
    if n_seeds(results) > 1 and spread is not None and text != "-":
        text += f" +- {_fmt(spread, 2)}"
    return text


def _diverged(results: dict[str, Any], tried: list[dict[str, Any]]) -> str:
    """Diverged runs over runs: grid points (times seeds)."""
    n = n_seeds(results)
    return f"{sum(r.get('diverged_seeds', int(r['diverged'])) for r in tried)}/{len(tried) * n}"


SETTINGS = ("lr", "momentum", "gamma", "rho", "alpha", "beta", "kappa", "tau_theta", "cg")


def _params(rec: dict[str, Any]) -> str:
    """The grid point of a run, or its fixed step sizes when the method has no grid."""
    shown = rec["params"] or {k: rec["spec"][k] for k in SETTINGS if k in rec["spec"]}
    return ", ".join(f"{k}={fmt_value(v)}" for k, v in shown.items()) or "-"


def _name(results: dict[str, Any], method: str) -> str:
    return results["config"]["methods"].get(method, {}).get("label", method)


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _plain_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))]
                     + [fmt.format(*r) for r in rows])


def _jobs(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in results["jobs"]}


def plot_metrics(results: dict[str, Any]) -> list[str]:
    """The metrics that get a figure: the config's ``plots`` or the defaults for the panel kinds."""
    cfg = results["config"]
    if "plots" in cfg:
        return list(cfg["plots"])
    kinds = {p["kind"] for p in results["panels"].values()}
    return ["loss"] + (["test_accuracy"] if "train" in kinds else [])


def selection_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per panel and method: the selected grid point and its final best-so-far values."""
    jobs = _jobs(results)
    header = ["panel", "method", "setting", "final objective", "test acc.", "diverged", "time (s)"]
    rows = []
    for pname, sel in results["selected"].items():
        for method, jid in sel.items():
            tried = [r for r in results["jobs"] if r["panel"] == pname and r["method"] == method]
            div = _diverged(results, tried)
            if jid is None:
                rows.append([pname, _name(results, method), "all diverged" if tried else "not run", "-", "-",
                             div, "-"])
                continue
            rec = jobs[jid]
            rows.append([pname, _name(results, method), _params(rec), _stat(results, rec, "loss"),
                         _stat(results, rec, "test_accuracy", 3), div,
                         f"{sum(r['timings']['wall_s'] for r in tried):.1f}"])
    return header, rows


def grid_table(results: dict[str, Any], panel: str) -> tuple[list[str], list[list[str]]] | None:
    """004 Table 1: rows are methods, columns the values of ``table_axis``, cells the final value of
    ``table_metric`` (raw, not best-so-far); '-' where the run diverged (on every seed; ``- (k/n)``
    where k of n seeds diverged)."""
    cfg = results["config"]
    axis, metric = cfg.get("table_axis", "lr"), cfg.get("table_metric", "loss")
    recs = [r for r in results["jobs"] if r["panel"] == panel and axis in r["params"]]
    if not recs:
        return None
    values = sorted({r["params"][axis] for r in recs}, reverse=True)
    header = [f"{axis} ->", *(_fmt(v, 3) for v in values)]
    rows = []
    for method in results["panels"][panel]["methods"]:
        row = [_name(results, method)]
        for v in values:
            cell = [r for r in recs if r["method"] == method and r["params"][axis] == v]
            if not cell:
                row.append("")
            elif cell[0]["diverged"]:
                k, n = cell[0].get("diverged_seeds", 1), n_seeds(results)
                row.append("-" if k == n else f"- ({k}/{n})")
            else:
                row.append(_stat(results, cell[0], metric, 3, final=True))
        rows.append(row)
    return header, rows


def selected_table(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """000 App. F.2 Table 2: one row per panel; per method its selected parameters and final value."""
    jobs = _jobs(results)
    methods = list(dict.fromkeys(m for p in results["panels"].values() for m in p["methods"]))
    header = ["panel"] + [h for m in methods for h in (f"{_name(results, m)}: selected",
                                                       f"{_name(results, m)}: final objective")]
    rows = []
    for pname, sel in results["selected"].items():
        row = [results["panels"][pname]["title"]]
        for m in methods:
            jid = sel.get(m)
            row += ["-", "-"] if jid is None else [_params(jobs[jid]), _stat(results, jobs[jid], "loss")]
        rows.append(row)
    return header, rows


def _grid(plt: Any, n: int) -> tuple[Any, list[Any]]:
    """A figure with ``n`` panels, at most three per row; unused axes are hidden."""
    cols = 2 if n == 4 else min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.5 * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def figures(results: dict[str, Any], out: Path) -> list[str]:
    """Write one PNG per plotted metric (and per x-axis), plus ``grid.png``; returns the file names."""
    plt = _pyplot()
    jobs = _jobs(results)
    panels = [(p, info) for p, info in results["panels"].items() if p in results["selected"]]
    if not panels:
        return []
    written = []
    x_axes = results["config"].get("x_axes", ["step"])
    for metric in plot_metrics(results):
        for x_axis in x_axes:
            shown = [(p, i) for p, i in panels
                     if any(metric in jobs[j]["best"] for j in results["selected"][p].values() if j)]
            if not shown:
                continue
            fig, axes = _grid(plt, len(shown))
            for ax, (pname, info) in zip(axes, shown, strict=False):
                for method, jid in results["selected"][pname].items():
                    if jid is None or metric not in jobs[jid]["best"]:
                        continue
                    rec = jobs[jid]
                    y = rec["best"][metric]
                    x = rec["timings"]["elapsed_s"][:len(y)] if x_axis == "time" else list(range(len(y)))
                    line = ax.plot(x, y, label=f"{_name(results, method)} ({_params(rec)})")[0]
                    spread = rec.get("spread", {}).get(metric)
                    if spread and n_seeds(results) > 1:
                        lo = [a - b for a, b in zip(y, spread, strict=False)]
                        hi = [a + b for a, b in zip(y, spread, strict=False)]
                        ax.fill_between(x[:len(lo)], lo, hi, color=line.get_color(), alpha=0.2, lw=0)
                ax.set_title(info["title"], fontsize=10)
                ax.set_xlabel("training time (s)" if x_axis == "time" else
                              ("iteration" if info["kind"] == "control" else "epoch"))
                ax.set_ylabel(metric_label(metric, info["kind"]) + " (best so far)")
                if metric == "loss" or metric.endswith("_loss"):
                    ys = [v for ln in ax.get_lines() for v in ln.get_ydata() if v is not None and v > 0]
                    if ys and max(ys) / min(ys) > 20:
                        ax.set_yscale("log")
                ax.grid(alpha=0.3)
                ax.legend(fontsize=7)
            fig.suptitle(results["experiment"]["title"], fontsize=11)
            fig.tight_layout()
            name = f"{metric}{'_time' if x_axis == 'time' else ''}.png"
            store.save_figure(fig, out / name)
            plt.close(fig)
            written.append(name)
    # Sensitivity to the grid: the final best-so-far objective against each method's grid axis.
    gridded = [(p, i) for p, i in panels if any(len(jobs[j]["params"]) == 1 for j in jobs
                                               if jobs[j]["panel"] == p)]
    if gridded:
        fig, axes = _grid(plt, len(gridded))
        for ax, (pname, info) in zip(axes, gridded, strict=False):
            for method in info["methods"]:
                recs = [r for r in results["jobs"] if r["panel"] == pname and r["method"] == method
                        and len(r["params"]) == 1]
                if not recs:
                    continue
                axis = next(iter(recs[0]["params"]))
                ok = [(r["params"][axis], r["best"]["loss"][-1]) for r in recs if not r["diverged"]]
                bad = [r["params"][axis] for r in recs if r["diverged"]]
                name = _name(results, method)
                line = ax.plot([a for a, _ in ok], [b for _, b in ok], "o-", label=f"{name} ({axis})")[0]
                if bad:
                    top = max([b for _, b in ok], default=1.0)
                    ax.plot(bad, [top] * len(bad), "x", color=line.get_color(), markersize=9,
                            label=f"{name}: diverged")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("step size of the grid")
            ax.set_ylabel(f"final {metric_label('loss', info['kind'])} (best so far)")
            ax.set_title(info["title"], fontsize=10)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(results["experiment"]["title"] + ": grid search", fontsize=11)
        fig.tight_layout()
        store.save_figure(fig, out / "grid.png")
        plt.close(fig)
        written.append("grid.png")
    return written


def summary(results: dict[str, Any], pngs: list[str]) -> str:
    """``summary.md``: what was run, the selected results, the experiment's table and the figures."""
    exp, v = results["experiment"], results["versions"]
    cfg = results["config"]
    lines = [f"# {exp['title']}", ""]
    if exp.get("paper"):
        lines += [f"Reproduces: {exp['paper']}.", ""]
    if exp.get("claim"):
        lines += [f"Paper's claim: {exp['claim'].strip()}", ""]
    n = n_seeds(results)
    seed_text = (f"seed {results['seed']}" if n == 1 else
                 f"{n} seeds ({', '.join(str(x) for x in results['seeds'])}; per-seed runs in "
                 f"{', '.join('`' + d + '/`' for d in results['seed_dirs'])}; values are mean +- sample "
                 f"standard deviation over seeds, a difference within the spreads is a tie)")
    lines += verdict.markdown(results)
    lines += [f"Scale `{results['scale']}`, {seed_text}, device `{results['device']}`, "
              f"moreaugrad {v['moreaugrad']}, torch {v['torch']}, python {v['python']}; "
              f"wall time {results['timings']['wall_s']:.1f} s; status: {results['status']}.", ""]
    lines += [f"Each method's grid point is selected by the {results['select']['by']} value of the "
              f"best-so-far `{results['select']['metric']}` curve"
              + (" (diverged runs excluded)." if n == 1 else ", mean over seeds (a grid point that "
                 "diverged on any seed is excluded).") + "", ""]
    lines += ["## Selected runs", "", _md_table(*selection_rows(results)), ""]
    table = cfg.get("table", "none")
    if table == "grid":
        for pname in results["selected"]:
            t = grid_table(results, pname)
            if t:
                lines += [f"## {results['panels'][pname]['title']}: final "
                          f"{metric_label(cfg.get('table_metric', 'loss'), 'train')} over the grid "
                          f"('-': diverged)", "", _md_table(*t), ""]
    elif table == "selected":
        lines += ["## Table", "", _md_table(*selected_table(results)), ""]
    lines += _distributed(results)
    skipped = {p: i["skipped"] for p, i in results["panels"].items() if i.get("skipped")}
    if skipped:
        lines += ["## Skipped panels", ""] + [f"- {p}: {why}" for p, why in skipped.items()] + [""]
    if cfg.get("notes"):
        lines += ["## Notes", "", cfg["notes"].strip(), ""]
    if pngs:
        lines += ["## Figures", ""] + [f"![{p}]({p})" for p in pngs] + [""]
    lines += ["All runs, curves and settings: `results.json`.", ""]
    return "\n".join(lines)


def _distributed(results: dict[str, Any]) -> list[str]:
    """A data-parallel run (``--nproc``): its size, and every job whose rule fell back to ``local``."""
    info = results.get("distributed")
    if not info:
        return []
    modes = sorted({m for m in info["modes"].values() if m})
    lines = ["## Data-parallel run", "",
             f"{info['nproc']} processes ({info['backend']}); each global mini-batch split over the ranks; "
             f"oracle modes: {', '.join(modes) or 'none'} (`exact`: the oracle of the global batch, "
             f"`replicated`: a control panel run whole on every rank).", ""]
    if info["local_fallback"]:
        lines += ["These jobs ran in `local` mode (the average of the ranks' oracles, not the global "
                  "batch's), because `exact` mode refused their rule:", ""]
        lines += [f"- `{jid}`: {why}" for jid, why in info["local_fallback"].items()] + [""]
    return lines


def write(results: dict[str, Any], out: Path) -> list[str]:
    """Draw the figures and write ``summary.md`` into ``out``; returns the files written."""
    out = Path(out)
    pngs = figures(results, out)
    store.write_text(out / "summary.md", summary(results, pngs))
    return [*pngs, "summary.md"]


def console(results: dict[str, Any]) -> str:
    """The selected-runs table as plain text, plus the experiment's own table."""
    parts = [results["experiment"]["title"], _plain_table(*selection_rows(results))]
    parts.append("verdict: " + verdict.verdict(results).line())
    cfg = results["config"]
    if cfg.get("table") == "grid":
        for pname in results["selected"]:
            t = grid_table(results, pname)
            if t:
                parts += [f"{results['panels'][pname]['title']}: final objective ('-': diverged)",
                          _plain_table(*t)]
    elif cfg.get("table") == "selected":
        parts.append(_plain_table(*selected_table(results)))
    return "\n\n".join(parts)
