"""A verdict on a config's ``claim``, computed from a run's results by the rule the config states.

A config's ``[verdict]`` table lists checks (``[[verdict.checks]]``) and the settings of this scale
that differ from the paper (``differs``). Each check is computed from ``results.json`` alone:

- ``check = "better"``, ``method``, ``than``, ``metric`` (default ``"loss"``), ``panels`` (default:
  every panel running both): per panel, the final best-so-far ``metric`` of each method's selected grid
  point, as mean +- spread over seeds. "better" needs the means to differ by more than the sum of the
  spreads in the claimed direction; within the spreads it is a tie, else "worse". Pass: better on
  every panel; fail: never better and no tie; partial otherwise.
- ``check = "selected"``, ``method``, ``param``, ``expected = {panel = value}``, ``factor`` (default 1):
  the selected value of ``param`` against the paper's, within a ratio of ``factor`` (2: one power of 2).
  Pass on every listed panel: pass; on none: fail; partial otherwise.
- ``check = "stable"``, ``method``, ``param`` (default ``"lr"``), ``min``/``max`` (the grid values
  checked), ``expect = "trains" | "diverges"``: every grid point in range trains on every seed, or
  diverges on every seed. Per panel pass or fail, combined as ``selected``.

The verdict: ``reproduced`` when every testable check passes, ``not reproduced`` when every one fails,
``partly reproduced`` otherwise, and ``not testable here`` when no check could be computed (its panels
were skipped, say, or the config has no rule). At ``smoke`` scale the line says it checks the
machinery only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .config import fmt_value
from .seeds import n_seeds, outside_spread

CHECKS = ("better", "selected", "stable")
VERDICTS = ("reproduced", "partly reproduced", "not reproduced", "not testable here")
CHECK_KEYS = {
    "better": {"check", "method", "than", "metric", "panels"},
    "selected": {"check", "method", "param", "expected", "factor"},
    "stable": {"check", "method", "param", "min", "max", "expect", "panels"},
}


@dataclass
class Outcome:
    """One check: ``status`` in pass / partial / fail / untestable, and its evidence."""

    status: str
    evidence: str


@dataclass
class Verdict:
    verdict: str
    evidence: list[str] = field(default_factory=list)
    differs: str = ""
    note: str = ""

    def line(self) -> str:
        """One line: the verdict and its evidence."""
        text = f"{self.verdict}: " + "; ".join(self.evidence) if self.evidence else self.verdict
        return text + (f" ({self.note})" if self.note else "")


def validate(spec: Any, methods: set[str], panels: set[str], owner: str) -> None:
    """Check a ``[verdict]`` table against the config's methods and panels.

    Raises:
        ValueError: naming the check and the field.
    """
    if not isinstance(spec, dict):
        raise ValueError(f"{owner}: verdict must be a table")
    unknown = sorted(set(spec) - {"checks", "differs", "untestable"})
    if unknown:
        raise ValueError(f"{owner}: verdict: unknown keys {unknown}; known: checks, differs, untestable")
    for i, c in enumerate(spec.get("checks", [])):
        where = f"{owner}: verdict.checks[{i}]"
        kind = c.get("check") if isinstance(c, dict) else None
        if kind not in CHECKS:
            raise ValueError(f"{where}: check must be one of {CHECKS}, got {kind!r}")
        bad = sorted(set(c) - CHECK_KEYS[kind])
        if bad:
            raise ValueError(f"{where}: unknown keys {bad}; known: {sorted(CHECK_KEYS[kind])}")
        for key in ("method", "than"):
            if key in c and c[key] not in methods:
                raise ValueError(f"{where}: {key} {c[key]!r} is not a method; methods: {sorted(methods)}")
        named = list(c.get("panels", [])) + list(c.get("expected", {}))
        if any(p not in panels for p in named):
            raise ValueError(f"{where}: names panels {sorted(set(named) - panels)} that do not exist")
        if kind == "better" and "than" not in c:
            raise ValueError(f"{where}: a 'better' check needs than = METHOD")
        if kind == "selected" and ("param" not in c or not c.get("expected")):
            raise ValueError(f"{where}: a 'selected' check needs param and expected = {{panel = value}}")
        if kind == "stable" and c.get("expect") not in ("trains", "diverges"):
            raise ValueError(f"{where}: expect must be 'trains' or 'diverges', got {c.get('expect')!r}")


def _name(results: dict[str, Any], method: str) -> str:
    return results["config"]["methods"].get(method, {}).get("label", method)


def _combine(flags: list[bool]) -> str:
    if not flags:
        return "untestable"
    return "pass" if all(flags) else "fail" if not any(flags) else "partial"


def _fmt(m: float, s: float, n: int) -> str:
    return f"{m:.4g}" + (f" +- {s:.2g}" if n > 1 else "")


def _better(c: dict[str, Any], results: dict[str, Any]) -> Outcome:
    jobs = {r["id"]: r for r in results["jobs"]}
    metric = c.get("metric", "loss")
    higher = metric.endswith("accuracy")
    n = n_seeds(results)
    a, b = c["method"], c["than"]
    wins = ties = total = 0
    parts = []
    for pname, sel in results["selected"].items():
        if "panels" in c and pname not in c["panels"]:
            continue
        if a not in sel or b not in sel:
            continue
        ja, jb = sel[a], sel[b]
        if ja is None and jb is None:
            parts.append(f"{pname}: both diverged")
            continue
        total += 1
        if ja is None or jb is None:
            won = jb is None
            wins += won
            parts.append(f"{pname}: {'better' if won else 'worse'} ({_name(results, b if won else a)} "
                         f"diverged at every step)")
            continue
        ra, rb = jobs[ja], jobs[jb]
        if metric not in ra["best"] or metric not in rb["best"]:
            total -= 1
            continue
        va = (ra["best"][metric][-1], ra["spread"][metric][-1] if "spread" in ra else 0.0)
        vb = (rb["best"][metric][-1], rb["spread"][metric][-1] if "spread" in rb else 0.0)
        ahead = va[0] > vb[0] if higher else va[0] < vb[0]
        if not outside_spread(va, vb):
            ties += 1
            word = "tie"
        elif ahead:
            wins += 1
            word = "better"
        else:
            word = "worse"
        parts.append(f"{pname}: {word} {_fmt(*va, n)} vs {_fmt(*vb, n)}")
    if total == 0:
        return Outcome("untestable", f"{_name(results, a)} vs {_name(results, b)}: no panel where either "
                       f"trained")
    status = "pass" if wins == total else "fail" if wins == 0 and ties == 0 else "partial"
    what = "final best-so-far " + metric.replace("_", " ")
    return Outcome(status, f"{_name(results, a)} vs {_name(results, b)} ({what}): " + ", ".join(parts))


def _selected(c: dict[str, Any], results: dict[str, Any]) -> Outcome:
    jobs = {r["id"]: r for r in results["jobs"]}
    method, param, factor = c["method"], c["param"], float(c.get("factor", 1.0))
    flags, parts = [], []
    for pname, want in c["expected"].items():
        sel = results["selected"].get(pname, {})
        if method not in sel:
            continue
        jid = sel[method]
        got = None if jid is None else jobs[jid]["params"].get(param, jobs[jid]["spec"].get(param))
        ok = got is not None and max(got / want, want / got) <= factor * (1 + 1e-9)
        flags.append(ok)
        parts.append(f"{pname} {fmt_value(got) if got is not None else 'all diverged'} "
                     f"(paper {fmt_value(float(want))})")
    tol = "" if factor == 1 else f", within x{factor:g}"
    return Outcome(_combine(flags), f"{_name(results, method)} selected {param}{tol}: " + ", ".join(parts))


def _stable(c: dict[str, Any], results: dict[str, Any]) -> Outcome:
    method, param, expect = c["method"], c.get("param", "lr"), c["expect"]
    lo, hi = c.get("min", float("-inf")), c.get("max", float("inf"))
    n = n_seeds(results)
    flags, parts = [], []
    for pname in results["selected"]:
        if "panels" in c and pname not in c["panels"]:
            continue
        recs = [r for r in results["jobs"] if r["panel"] == pname and r["method"] == method
                and param in r["params"] and lo <= r["params"][param] <= hi]
        if not recs:
            continue
        div = [r.get("diverged_seeds", int(r["diverged"])) for r in recs]
        ok = all(d == 0 for d in div) if expect == "trains" else all(d == n for d in div)
        flags.append(ok)
        bad = sum(d > 0 for d in div)
        parts.append(f"{pname} {bad}/{len(recs)} steps diverged")
    rng = (f"every {param}" if lo == float("-inf") and hi == float("inf") else
           f"{param} = {fmt_value(float(lo))}" if lo == hi else
           f"{param} >= {fmt_value(float(lo))}" if hi == float("inf") else
           f"{param} <= {fmt_value(float(hi))}" if lo == float("-inf") else
           f"{fmt_value(float(lo))} <= {param} <= {fmt_value(float(hi))}")
    head = f"{_name(results, method)} at {rng} {expect} (paper): "
    return Outcome(_combine(flags), head + ", ".join(parts))


RUNS = {"better": _better, "selected": _selected, "stable": _stable}


def verdict(results: dict[str, Any]) -> Verdict:
    """The config's verdict on its claim, from ``results`` and the ``[verdict]`` table of its config."""
    spec = results["config"].get("verdict")
    note = []
    if results.get("scale") == "smoke":
        note.append("smoke scale: checks the machinery, not evidence")
    n = n_seeds(results)
    if n == 1:
        note.append("1 seed: no spread, so no tie")
    if not spec or not spec.get("checks"):
        why = (spec or {}).get("untestable", "the config states no verdict rule")
        return Verdict("not testable here", [why], (spec or {}).get("differs", ""), "; ".join(note))
    outcomes = [RUNS[c["check"]](c, results) for c in spec["checks"]]
    tested = [o for o in outcomes if o.status != "untestable"]
    if not tested:
        word = "not testable here"
    elif all(o.status == "pass" for o in tested):
        word = "reproduced"
    elif all(o.status == "fail" for o in tested):
        word = "not reproduced"
    else:
        word = "partly reproduced"
    evidence = [f"[{o.status}] {o.evidence}" for o in outcomes]
    return Verdict(word, evidence, spec.get("differs", "").strip(), "; ".join(note))


def markdown(results: dict[str, Any]) -> list[str]:
    """The ``## Verdict`` section of ``summary.md``."""
    v = verdict(results)
    lines = ["## Verdict", "", f"**{v.verdict}**" + (f" ({v.note})" if v.note else ""), ""]
    lines += [f"- {e}" for e in v.evidence]
    if v.differs:
        lines += ["", f"Settings that differ from the paper: {' '.join(v.differs.split())}"]
    lines += ["", "Rule: every check of the config's `[verdict]` table computed from these results "
              "(runner/verdict.py); a difference within the sum of the two spreads (sample standard "
              "deviation over seeds) is a tie, never a win.", ""]
    return lines
