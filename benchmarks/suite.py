"""Time and memory of every oracle, as ratios to plain ``loss.backward()`` (issue 16, Build 1).

For each model, the cases (plain autograd, our backprop oracle, every preset that applies, and the
reference ProxProp with ``--peer``) are built once and then timed round-robin in one process:
two warm-up calls each, then ``for rep in range(reps): for case in cases: time one call``, so
that drifts in machine load hit every case alike. Each row gives the median over the reps, its
ratio to the plain call's median, and the peak memory of one more call (:mod:`benchmarks.memory`)
over the plain call's peak. A preset that raises is reported with its exception class; one whose
call runs past its budget (``--budget`` times the plain call's first time, and at least
``--budget-floor`` seconds) is stopped (a ``SIGALRM`` between two Python statements) and reported
as too slow: far beyond every target, it would cost the run minutes and say little more.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import statistics
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import moreaugrad as mg

from . import peer as peer_mod
from .memory import peak_bytes
from .models import MODELS, TINY, Model
from .presets import MEMORY_TARGET, PRESETS, time_target

PLAIN = "plain loss.backward()"
WARMUP = 2


class CallTimeout(Exception):
    """One call ran past its budget."""


@contextmanager
def budget(seconds: float) -> Iterator[None]:
    """Raise :class:`CallTimeout` inside the block after ``seconds`` (main thread on POSIX only;
    elsewhere the block runs unbounded)."""
    usable = (seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise CallTimeout

    old = signal.signal(signal.SIGALRM, handler)
    # It fires again every 0.1 s, in case code inside catches the first one.
    signal.setitimer(signal.ITIMER_REAL, seconds, 0.1)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


@dataclass
class Case:
    """One row: a callable timed round-robin with the other cases of its model."""

    preset: str
    call: Callable[[], None] | None
    role: str = "preset"  # "baseline", "preset" or "reference"
    status: str = "ok"  # "ok", "error" or "slow"
    error: str = ""
    warmup_s: list[float] = field(default_factory=list)
    times_s: list[float] = field(default_factory=list)
    peak_bytes: int | None = None
    warnings: list[str] = field(default_factory=list)
    profile: str = ""
    syncs: dict[str, int] | None = None

    @property
    def active(self) -> bool:
        return self.status == "ok"

    @property
    def median_s(self) -> float | None:
        return statistics.median(self.times_s) if self.times_s else None

    @property
    def spread(self) -> float | None:
        """``(max - min) / median`` of the timed calls: how far to trust the median."""
        m = self.median_s
        return (max(self.times_s) - min(self.times_s)) / m if m else None


def _timed(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0


def profile_table(fn: Callable[[], None], device: torch.device, rows: int) -> str:
    """``torch.profiler``'s table of one call, the ``rows`` operators with the most self time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        fn()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def host_syncs(fn: Callable[[], None]) -> dict[str, int]:
    """The host syncs of one CUDA call, counted by the line of Python that made each (its file
    under the library or the suite, else its base name), from ``torch.cuda.set_sync_debug_mode``'s
    warnings; ``{}`` when the call never waits for the device."""
    mode = torch.cuda.get_sync_debug_mode()
    counts: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(mode)
    for w in caught:
        if "synchroniz" not in str(w.message):
            continue
        path = Path(w.filename)
        where = "/".join(path.parts[-2:]) if path.parent.name in ("moreaugrad", "benchmarks", "rules") \
            else path.name
        key = f"{where}:{w.lineno}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


def _timed_out(err: BaseException | None) -> bool:
    """``err`` is a :class:`CallTimeout`, or was raised while handling one."""
    while err is not None:
        if isinstance(err, CallTimeout):
            return True
        err = err.__cause__ or err.__context__
    return False


def _fail(case: Case, err: BaseException, limit: float, plain_s: float | None = None) -> None:
    case.call = None
    if _timed_out(err):
        than = f" (> {limit / plain_s:.0f}x plain)" if plain_s else ""
        case.status, case.error = "slow", f"one call took more than {limit:.2g} s{than}"
    else:
        first = str(err).splitlines()[0][:200] if str(err) else ""
        case.status, case.error = "error", f"{type(err).__name__}: {first}"


def _matches(only: list[str], model: Model, preset: str) -> bool:
    keys = (model.id.lower(), model.title.lower(), preset.lower())
    return all(any(s.lower() in k for k in keys) for s in only)


def _cases(model: Model, work: Any, only: list[str], peer: Any) -> list[Case]:
    cases = [Case(PLAIN, work.plain(), role="baseline")]
    specs: list[tuple[str, str, Callable[[], Callable[[], None]]]] = []
    for p in PRESETS:
        if p.applies(model):
            specs.append((p.name, "preset", lambda p=p: p.call(model, work)))
    if peer is not None:
        for name, call in peer_mod.peer_calls(peer, model, work).items():
            specs.append((name, "reference", lambda call=call: call))
    for name, role, make in specs:
        # The backprop oracle is always timed: it is the denominator of the "x backprop" column.
        if name != "backprop" and not _matches(only, model, name):
            continue
        case = Case(name, None, role=role)
        try:
            case.call = make()
        except Exception as err:  # a preset that refuses the model at construction
            _fail(case, err, 0.0)
        cases.append(case)
    return cases


def prime(device: torch.device, dtype: torch.dtype) -> None:
    """Run every preset once, unbounded, on a tiny chain of each kind.

    The library and torch import some modules on first use (``torch.func``, ``sympy``); a budget's
    ``SIGALRM`` inside such an import would leave a half-initialised module behind, and every later
    case would fail with an ``AttributeError``. After this, the timed calls import nothing new.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for model in TINY:
            work = model.build(dtype, device, True)
            work.plain()()
            for p in PRESETS:
                try:
                    p.call(model, work)()
                except Exception:  # errors are the timed run's business
                    pass


def run_model(model: Model, args: argparse.Namespace, peer: Any, device: torch.device,
              dtype: torch.dtype) -> dict[str, Any]:
    """Build ``model``, time its cases round-robin and measure their peak memory."""
    started = time.perf_counter()
    work = model.build(dtype, device, args.quick)
    cases = _cases(model, work, args.only, peer)
    # A call cut by the budget unwinds through the library's finally blocks (functional_call
    # restores swapped parameters); the snapshot makes sure the next cases see the same weights.
    snapshot = {k: v.detach().clone() for k, v in work.module.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.compile:  # compile the kernels at this model's shapes, outside every budget
            for case in cases:
                if case.active and case.role == "preset":
                    try:
                        case.call()
                    except Exception:  # the warm-up reports it
                        pass
        for w in range(WARMUP):
            for case in cases:
                if not case.active:
                    continue
                # The plain call and the reference are never cut. A first call may pay one-time
                # set-up (allocator, thread pool): it gets twice the floor.
                floor = args.budget_floor * (2 if w == 0 else 1)
                limit = 0.0 if case.role != "preset" else max(floor, args.budget * cases[0].warmup_s[0])
                try:
                    with warnings.catch_warnings(record=True) as caught, budget(limit):
                        warnings.simplefilter("always")
                        case.warmup_s.append(_timed(case.call, device))
                    if w == 0:
                        case.warnings = sorted({type(c.message).__name__ for c in caught})
                except Exception as err:
                    if case.role == "baseline":
                        raise RuntimeError(f"{model.id}: the plain loss.backward() failed") from err
                    _fail(case, err, limit, cases[0].warmup_s[0])
                    with torch.no_grad():
                        work.module.load_state_dict(snapshot)
        active = [c for c in cases if c.active]
        per_rep = sum(c.warmup_s[-1] for c in active)
        tqdm.write(f"{model.id} ({work.batch if work.x is not None else work.note}): {len(active)} cases, "
                   f"about {per_rep * (args.reps + 1.5):.0f} s for {args.reps} reps and memory")
        bar = tqdm(total=args.reps * len(active), desc=model.id, leave=False, unit="call")
        for _ in range(args.reps):
            for case in active:
                case.times_s.append(_timed(case.call, device))
                bar.update()
        bar.close()
        if args.memory:
            for case in active:
                # The case's own module (the reference's mirror net) or the model's.
                module = getattr(case.call, "module", work.module)
                case.peak_bytes = peak_bytes(case.call, device,
                                             reset=lambda m=module: m.zero_grad(set_to_none=True))
        if args.syncs and device.type == "cuda":
            for case in active:
                try:
                    case.syncs = host_syncs(case.call)
                except Exception as err:  # the timed calls ran: report, keep the row
                    tqdm.write(f"{model.id} / {case.preset}: host syncs not counted ({err!r})")
                    continue
                tqdm.write(f"{model.id} / {case.preset}: {sum(case.syncs.values())} host syncs "
                           f"{case.syncs}")
        if args.profile:
            for case in active:
                case.profile = profile_table(case.call, device, args.profile)
                tqdm.write(f"\n{model.id} / {case.preset}: torch.profiler, one call\n{case.profile}")
    elapsed = time.perf_counter() - started
    tqdm.write(f"{model.id}: done in {elapsed:.0f} s")
    return {"model": model, "work": work, "cases": cases, "elapsed_s": elapsed}


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def rows_of(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One JSON-ready row per case, with ratios and targets."""
    model, work, cases = result["model"], result["work"], result["cases"]
    plain = cases[0]
    backprop = next((c for c in cases if c.preset == "backprop"), None)
    rows = []
    for c in cases:
        time_ratio = _ratio(c.median_s, plain.median_s)
        vs_bp = _ratio(c.median_s, backprop.median_s if backprop else None)
        mem_ratio = _ratio(c.peak_bytes, plain.peak_bytes)
        target = time_target(model, c.preset) if c.role != "baseline" else None
        value = {"time": time_ratio, "vs_backprop": vs_bp}.get(target.metric) if target else None
        mem_target = MEMORY_TARGET.applies(model, c.preset) and c.role == "preset"
        rows.append({
            "model": model.id, "title": model.title, "kind": model.kind,
            "batch": work.batch if work.x is not None else None, "note": work.note,
            "dtype": str(work.dtype).removeprefix("torch."),
            "preset": c.preset, "role": c.role, "status": c.status, "error": c.error,
            "warnings": c.warnings, "warmup_s": c.warmup_s, "times_s": c.times_s,
            "median_s": c.median_s, "spread": c.spread, "time_ratio": time_ratio, "vs_backprop": vs_bp,
            "peak_bytes": c.peak_bytes, "memory_ratio": mem_ratio, "profile": c.profile,
            "syncs": c.syncs,
            "target": None if target is None else {"label": target.label, "metric": target.metric,
                                                   "limit": target.limit,
                                                   "met": None if value is None else value <= target.limit},
            "memory_target": None if not mem_target else {
                "limit": MEMORY_TARGET.limit,
                "met": None if mem_ratio is None else mem_ratio <= MEMORY_TARGET.limit},
        })
    return rows


def _x(v: float | None) -> str:
    return "–" if v is None or not math.isfinite(v) else f"{v:.2f}x"


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / 2**20:.3g}"


def _met(t: dict[str, Any] | None) -> str:
    if t is None:
        return "–"
    return "–" if t["met"] is None else ("yes" if t["met"] else "**no**")


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table: one line per row of :func:`rows_of`."""
    head = ("| model | preset | ms | spread | x plain | x backprop | peak MiB | mem x plain | time target "
            "| met | mem <= 1.5x |")
    lines = [head, "| " + " | ".join(["---"] * 11) + " |"]
    for r in rows:
        where = r["title"] + (f", B={r['batch']}" if r["batch"] else f", {r['note']}")
        if r["status"] != "ok":
            what = (f"raises {r['error'].split(':')[0]}" if r["status"] == "error"
                    else f"skipped: {r['error']}")
            lines.append(f"| {where} | {r['preset']} | {what} |" + " |" * 8)
            continue
        t = r["target"]
        tgt = "–"
        if t is not None:
            tgt = f"<= {t['limit']:g}x" + (" backprop" if t["metric"] == "vs_backprop" else "")
        lines.append(
            f"| {where} | {r['preset']} | {1e3 * r['median_s']:.1f} | {100 * r['spread']:.0f}% "
            f"| {_x(r['time_ratio'])} "
            f"| {_x(r['vs_backprop'])} | {_mib(r['peak_bytes'])} | {_x(r['memory_ratio'])} "
            f"| {tgt} | {_met(t)} | {_met(r['memory_target'])} |")
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per case (default and minimum 5)")
    ap.add_argument("--quick", action="store_true",
                    help="batches / 8 (at least 16), pendulum T=20, no 004 MLP, budget floor 0.5 s: "
                         "< 1 min")
    ap.add_argument("--only", action="append", default=[], metavar="SUBSTRING",
                    help="keep the cases whose model or preset contains it (repeat: all must match)")
    ap.add_argument("--budget", type=float, default=10.0, metavar="X",
                    help="stop a preset whose call takes more than X times the plain call's first call "
                         "(default 10; never the plain call or the reference)")
    ap.add_argument("--budget-floor", type=float, default=None, metavar="S",
                    help="but allow every call at least S seconds (default 1, quick 0.5; twice that "
                         "for a first call)")
    ap.add_argument("--compile", action="store_true",
                    help="run the library's fused kernels compiled (mg.kernels.use_compile): each "
                         "preset is called once, untimed and without a budget, before its warm-up")
    ap.add_argument("--no-memory", dest="memory", action="store_false",
                    help="skip the peak-memory call (on CPU it runs under the profiler, which costs "
                         "up to 10x a call made of many small operations)")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="print (and keep in the JSON) torch.profiler's top N operators of one call per case")
    ap.add_argument("--syncs", action="store_true",
                    help="on CUDA, count the host syncs of one call per case and the lines that make "
                         "them (torch.cuda.set_sync_debug_mode); kept in the JSON")
    ap.add_argument("--peer", default=None, metavar="DIR",
                    help="the reference ProxProp (a folder with ProxProp.py) beside ours")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="where table.md and results.json go (default runs/bench/<UTC time>)")
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 5
    if args.reps < 5:
        ap.error(f"--reps must be at least 5 (a median of fewer says little), got {args.reps}")
    if args.budget_floor is None:
        args.budget_floor = 0.5 if args.quick else 1.0
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the suite; print the table and write ``table.md`` and ``results.json`` to ``--out``."""
    args = parse(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    dtype = getattr(torch, args.dtype)
    stamp = datetime.datetime.now(datetime.timezone.utc)
    out = Path(args.out) if args.out else Path("runs/bench") / stamp.strftime("%Y%m%d-%H%M%S")
    peer = peer_mod.load(args.peer) if args.peer else None
    models = [m for m in MODELS if not (args.quick and m.large)]
    models = [m for m in models
              if any(_matches(args.only, m, p.name) for p in PRESETS if p.applies(m))
              or (peer is not None and any(_matches(args.only, m, n) for n, _, _, ms in peer_mod.PEER_PRESETS
                                           if m.id in ms))]
    if not models:
        raise SystemExit(f"--only {args.only}: no model or preset matches")
    load_before = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    per_model: dict[str, float] = {}
    threads = torch.get_num_threads()
    # The models seed torch's generator and the run sets the thread count: leave both as they were
    # for whoever called main() in-process (the smoke test).
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        compiling = mg.kernels.compiling()
        try:
            torch.set_num_threads(args.threads)
            mg.kernels.use_compile(args.compile)
            prime(device, dtype)
            for model in models:
                result = run_model(model, args, peer, device, dtype)
                per_model[model.id] = result["elapsed_s"]
                rows += rows_of(result)
        finally:
            torch.set_num_threads(threads)
            mg.kernels.use_compile(compiling)
    elapsed = time.perf_counter() - t0
    meta = {
        "date": stamp.isoformat(timespec="seconds"), "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
        or platform.machine(), "cpus": os.cpu_count(), "threads": args.threads,
        "dtype": args.dtype, "reps": args.reps, "warmup": WARMUP, "quick": args.quick,
        "budget_x_plain": args.budget, "budget_floor_s": args.budget_floor, "only": args.only,
        "peer": args.peer, "memory": args.memory, "compile": args.compile,
        "elapsed_s": elapsed, "elapsed_per_model_s": per_model,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "presets": {p.name: p.note for p in PRESETS},
    }
    header = (f"moreaugrad benchmarks, {meta['date']}: torch {meta['torch']}, {args.device} "
              f"({meta['device']}), {meta['threads']} threads, {args.dtype}, median of {args.reps} "
              f"after {WARMUP} warm-up calls{', quick' if args.quick else ''}"
              f"{', compiled kernels' if args.compile else ''}; load average "
              f"{load_before[0] if load_before else '?'} before; {elapsed:.0f} s")
    text = header + "\n\n" + table(rows) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(text)
    print(f"written to {out}/table.md and {out}/results.json")
    return {"meta": meta, "rows": rows, "out": str(out), "table": text}
