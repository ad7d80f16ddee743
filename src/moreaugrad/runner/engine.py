"""Run an experiment's jobs with checkpoints, and collect their curves into ``results.json``.

Two kinds of panel: ``control`` (the pendulum of 000 App. E.1.1, full-batch steps) and ``train``
(a classifier on a dataset, mini-batches, one evaluation per epoch). Every job starts from a seed
derived from the run's seed and the panel's name, so all methods of a panel share the initial
weights and the order of the mini-batches.

Resume: a job's checkpoint holds the weights, the optimizer state, the generator of the batch order,
torch's global generator, the curves and the step count. Rerunning the same command skips finished
jobs, restarts the current one from its last checkpoint and so ends with the same results as a run
that was never interrupted (timings aside).

Data-parallel (``moreaugrad run --nproc N``, :mod:`.parallel`): with ``Context.parallel`` set, every
rank runs this same loop on its share of each global mini-batch through ``mg.distributed.Oracle``
(``exact`` mode, else ``local`` and the job's record says why); rank 0 alone evaluates, checkpoints
and writes, and every rank restores the same checkpoint.
"""

from __future__ import annotations

import inspect
import json
import math
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

import moreaugrad as mg
from moreaugrad import distributed as mgd

from . import methods, models, store, verdict
from .config import ConfigError, Experiment, Job, seed_for

Callback = Callable[[str, int], None]
DIVERGED = (mg.NonFiniteError, mg.rules.SolverError, torch.linalg.LinAlgError, FloatingPointError)
LOSSES = {"cross_entropy": mg.losses.CrossEntropy, "squared": mg.losses.SquaredLoss}
ACCURACY = ("val_accuracy", "test_accuracy")
PARTIAL_EVERY_S = 20.0
PANEL_KEYS = {"kind", "title", "methods", "enabled", "optional", "diverge_above", "dtype", "system",
              "horizon", "discretization", "x0", "iterations", "checkpoint_every", "dataset", "model",
              "loss", "l2", "epochs", "batch_size", "eval_batch"}
MODEL_KEYS = {"kind", "hidden", "channels", "kernel", "widths", "stages"}


class Diverged(FloatingPointError):
    """The objective became non-finite or exceeded the panel's ``diverge_above``."""


def _check_value(panel: dict[str, Any], value: float) -> None:
    limit = panel.get("diverge_above")
    if not math.isfinite(value) or (limit is not None and value > limit):
        raise Diverged(f"objective {value:.4g}" + ("" if limit is None else f" (limit {limit:g})"))


class RunMismatchError(RuntimeError):
    """The output folder holds a different run (config, scale, seed or device)."""


@dataclass
class Context:
    """Where and how a run happens."""

    out: Path
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data_dir: Path | None = None
    progress: bool = True
    callback: Callback | None = None
    log: Callable[[str], None] = print
    parallel: Any = None  # a runner.parallel.Parallel in a data-parallel run

    @property
    def main(self) -> bool:
        """Whether this process writes (always, except on the ranks > 0 of a data-parallel run)."""
        return self.parallel is None or self.parallel.main

    def barrier(self) -> None:
        if self.parallel is not None:
            self.parallel.barrier()

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """``fn()`` on the writing process, its result (or its exception) on every rank."""
        return fn() if self.parallel is None else self.parallel.on_main(fn)


def versions() -> dict[str, str]:
    return {"moreaugrad": mg.__version__, "torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


def better(metric: str) -> Callable[[float, float], float]:
    return max if metric in ACCURACY or metric.endswith("accuracy") else min


def best_so_far(metric: str, values: list[float]) -> list[float]:
    """000 Sec. 4's plotting convention: ``y_k = min_{i <= k} F(w^(i))`` (max for accuracies)."""
    pick, out, cur = better(metric), [], None
    for v in values:
        cur = v if cur is None else pick(cur, v)
        out.append(cur)
    return out


# -- panels -------------------------------------------------------------------------------------


@dataclass
class PanelData:
    """A train panel's tensors (inputs flattened for an MLP), on the run's device."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    evals: dict[str, tuple[torch.Tensor, torch.Tensor]]
    in_shape: tuple[int, ...]
    classes: int
    sizes: dict[str, int]


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"dtype must name a torch dtype such as 'float32', got {name!r}")
    return dt


def load_panel(panel: dict[str, Any], ctx: Context) -> PanelData:
    spec = panel.get("dataset", "digits")
    spec = {"name": spec} if isinstance(spec, str) else dict(spec)
    name = spec.pop("name")
    for key in ("train_size", "test_size"):
        if spec.get(key) == 0:  # 0 in a config: the whole split (a scale can lift a base's cap)
            spec[key] = None
    ds = mg.data.load(name, ctx.data_dir, seed=ctx.seed, dtype=_dtype(panel.get("dtype", "float32")), **spec)
    ds = ds.to(ctx.device)
    in_shape = ds.input_shape
    flat = panel.get("model", {}).get("kind", "mlp") == "mlp"

    def prep(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(len(x), -1) if flat else x

    evals = {"train": (prep(ds.x_train), ds.y_train), "val": (prep(ds.x_val), ds.y_val),
             "test": (prep(ds.x_test), ds.y_test)}
    return PanelData(prep(ds.x_train), ds.y_train, {k: v for k, v in evals.items() if len(v[1])},
                     in_shape, ds.classes, ds.sizes())


# -- validation ---------------------------------------------------------------------------------


def _check_keys(owner: str, given: Any, known: set[str]) -> None:
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"{owner}unknown keys {unknown}; known: {sorted(known)}")


def _check_panel(panel: dict[str, Any]) -> None:
    _check_keys("", panel, PANEL_KEYS)
    _dtype(panel.get("dtype", "float64" if panel["kind"] == "control" else "float32"))
    if panel["kind"] == "control":
        if panel.get("system", "pendulum") != "pendulum":
            raise ValueError(f"system must be 'pendulum', got {panel['system']!r}")
        if not isinstance(panel.get("horizon"), int) or panel["horizon"] < 1:
            raise ValueError(f"horizon must be an int >= 1, got {panel.get('horizon')!r}")
        pendulum(panel)
        return
    spec = dict(panel.get("dataset", {"name": "digits"}))
    name = spec.pop("name", None)
    if name not in mg.data.LOADERS:
        raise ValueError(f"dataset must be one of {sorted(mg.data.LOADERS)}, got {name!r}")
    # The engine passes seed and dtype; mnist and cifar10 take the --data-dir folder.
    known = set(inspect.signature(mg.data.LOADERS[name]).parameters) - {"data_dir", "seed", "dtype"}
    _check_keys(f"dataset {name!r}: ", spec, known)
    model = panel.get("model", {})
    _check_keys("model: ", model, MODEL_KEYS)
    if model.get("kind", "mlp") not in models.MODELS:
        raise ValueError(f"model.kind must be one of {models.MODELS}, got {model['kind']!r}")
    if model.get("stages", "split") not in models.STAGES:
        raise ValueError(f"model.stages must be one of {models.STAGES}, got {model['stages']!r}")
    if panel.get("loss", "cross_entropy") not in LOSSES:
        raise ValueError(f"loss must be one of {sorted(LOSSES)}, got {panel['loss']!r}")
    if panel.get("l2"):
        mg.losses.L2(panel["l2"])


def validate(exp: Experiment) -> None:
    """Check the whole config before any job runs: every panel's keys, dataset and model, and every
    method's rule and optimizer at every grid point (each is built once, which validates its values).

    Raises:
        ConfigError: naming the file, the panel or method (and grid point), and the field.
    """
    if "verdict" in exp.config:
        try:
            verdict.validate(exp.config["verdict"], set(exp.config["methods"]), set(exp.all_panels),
                             exp.source)
        except ValueError as err:
            raise ConfigError(str(err)) from err
    for pname, panel in exp.panels.items():
        try:
            _check_panel(panel)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{exp.source}: panels.{pname}: {err}") from err
    seen = set()
    dummy = [torch.zeros(1, requires_grad=True)]
    for job in exp.jobs:
        key = (job.method, job.id.rsplit(".", 1)[1])  # the same grid point on every panel
        if key in seen:
            continue
        seen.add(key)
        try:
            methods.rule(job.spec)
            methods.optimizer(job.spec, dummy)
        except (ValueError, TypeError) as err:
            where = f"methods.{job.method}" + (f" at {job.params}" if job.params else "")
            raise ConfigError(f"{exp.source}: {where}: {err}") from err


# -- jobs ---------------------------------------------------------------------------------------


def _update(oracle: mg.Oracle, opt: torch.optim.Optimizer | None, x: Any = None, y: Any = None) -> None:
    if opt is None:
        oracle.step(x, y)
    else:
        opt.zero_grad(set_to_none=True)
        oracle.backward(x, y)
        opt.step()


class _Job:
    """The state of one job between checkpoints."""

    def __init__(self, job: Job, ctx: Context, chain: mg.Chain, opt: torch.optim.Optimizer | None,
                 generator: torch.Generator | None):
        self.job, self.ctx, self.chain, self.opt, self.gen = job, ctx, chain, opt, generator
        self.path = ctx.out / "state" / f"{job.id}.pt"
        self.step = 0            # epochs (train) or iterations (control) done
        self.updates = 0         # optimizer steps done
        self.curves: dict[str, list[float]] = {}
        self.elapsed: list[float] = [0.0]
        self.diverged: str | None = None
        self.distributed: dict[str, str] | None = None  # the data-parallel mode (and why), if any

    def save(self) -> None:
        if not self.ctx.main:
            return
        state = {"job": self.job.id, "step": self.step, "updates": self.updates,
                 "model": self.chain.state_dict(), "curves": self.curves, "elapsed": self.elapsed,
                 "torch_rng": torch.get_rng_state(), "diverged": self.diverged or ""}
        if self.opt is not None:
            state["optimizer"] = self.opt.state_dict()
        if self.gen is not None:
            state["shuffle_rng"] = self.gen.get_state()
        if torch.cuda.is_available():
            state["cuda_rng"] = torch.cuda.get_rng_state_all()
        store.save_checkpoint(self.path, state)

    def restore(self) -> bool:
        self.ctx.barrier()  # rank 0 wrote the checkpoint (atomically) before the others read it
        state = store.load_checkpoint(self.path)
        if state is None or state.get("job") != self.job.id:
            return False
        self.chain.load_state_dict(state["model"])
        if self.opt is not None:
            self.opt.load_state_dict(state["optimizer"])
        if self.gen is not None:
            self.gen.set_state(state["shuffle_rng"])
        torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.step, self.updates = state["step"], state["updates"]
        self.curves, self.elapsed = state["curves"], state["elapsed"]
        self.diverged = state["diverged"] or None
        return True

    def tick(self) -> None:
        self.updates += 1
        if self.ctx.callback is not None:
            self.ctx.callback(self.job.id, self.updates)

    def record(self, values: dict[str, float], elapsed: float) -> None:
        for k, v in values.items():
            self.curves.setdefault(k, []).append(v)
        self.elapsed.append(elapsed)


def _diverged(ctx: Context, state: _Job, err: BaseException, where: str) -> str:
    """The divergence message of a job; in a data-parallel run every rank must have raised it at the
    same update (``Parallel.agree``), else the run stops."""
    message = f"{where}: {type(err).__name__}: {err}"
    if ctx.parallel is not None:
        ctx.parallel.agree(f"{state.job.id} after {state.updates} updates", message)
    return message


def pendulum(panel: dict[str, Any]) -> mg.control.Pendulum:
    """The pendulum of a control panel: ``horizon``, ``discretization`` (default ``"explicit"``, as
    000 App. E.1.1 prints it) and ``x0 = [theta_0, omega_0]`` (default ``[0, 0]``)."""
    return mg.control.Pendulum(horizon=int(panel["horizon"]),
                               discretization=panel.get("discretization", "explicit"),
                               x0=tuple(panel.get("x0", (0.0, 0.0))))


def _control_job(job: Job, panel: dict[str, Any], ctx: Context, bar: Any) -> _Job:
    system = panel.get("system", "pendulum")
    if system != "pendulum":
        raise ValueError(f"panel {job.panel}: system must be 'pendulum', got {system!r}")
    problem = pendulum(panel)
    chain = problem.chain(problem.initial_controls(_dtype(panel.get("dtype", "float64")), ctx.device))
    oracle = mg.Oracle(chain, problem.objective, methods.rule(job.spec))
    opt = methods.optimizer(job.spec, chain.parameters())
    state = _Job(job, ctx, chain, opt, None)
    if ctx.parallel is not None:
        state.distributed = {"mode": "replicated", "reason": "a control panel has no data to shard: "
                             "every rank runs the full problem"}
    total, every = int(panel.get("iterations", 100)), int(panel.get("checkpoint_every", 10))

    def h() -> float:
        with torch.no_grad():
            return float(problem.objective(chain()))

    if not state.restore():
        state.curves = {"loss": [h()]}
    bar.reset(total=total)
    bar.update(state.step)
    start = time.perf_counter() - state.elapsed[-1]
    while state.step < total and state.diverged is None:
        try:
            _update(oracle, opt)
            value = h()
            _check_value(panel, value)
        except DIVERGED as err:
            state.diverged = _diverged(ctx, state, err, f"iteration {state.step + 1}")
        else:
            state.step += 1
            state.record({"loss": value}, time.perf_counter() - start)
        state.tick()
        bar.update(1)
        if state.step % every == 0 or state.step == total or state.diverged:
            state.save()
    return state


@torch.no_grad()
def evaluate(chain: mg.Chain, loss: Any, x: torch.Tensor, y: torch.Tensor, chunk: int) -> tuple[float, float]:
    """Full-batch loss (mean over the samples, as ``h``) and accuracy, in chunks of ``chunk``."""
    total, correct = 0.0, 0
    for i in range(0, len(y), chunk):
        out = chain(x[i:i + chunk])
        total += float(loss(out, y[i:i + chunk])) * len(out)
        correct += int((out.argmax(dim=1) == y[i:i + chunk]).sum())
    return total / len(y), correct / len(y)


def _train_job(job: Job, panel: dict[str, Any], data: PanelData, ctx: Context, bar: Any) -> _Job:
    seed = seed_for(ctx.seed, "init", job.panel)
    torch.manual_seed(seed)
    net, _ = models.build(panel.get("model", {}), data.in_shape, data.classes)
    net = net.to(device=ctx.device, dtype=data.x_train.dtype)
    chain = mg.Chain(net)
    if panel.get("loss", "cross_entropy") not in LOSSES:
        raise ValueError(f"panel {job.panel}: loss must be one of {sorted(LOSSES)}, got {panel['loss']!r}")
    loss = LOSSES[panel.get("loss", "cross_entropy")]()
    l2 = panel.get("l2", 0.0)
    reg = mg.losses.L2(l2) if l2 else None
    epochs, batch = int(panel.get("epochs", 10)), int(panel.get("batch_size", 128))
    chunk = int(panel.get("eval_batch", 2048))
    n = len(data.y_train)
    par = ctx.parallel
    distributed = None
    if par is None:
        oracle = mg.Oracle(chain, loss, methods.rule(job.spec), regularizer=reg)
    else:
        _check_shards(job, n, batch, par.world)
        oracle, distributed = _parallel_oracle(chain, loss, job, reg)
    opt = methods.optimizer(job.spec, chain.parameters())
    gen = torch.Generator().manual_seed(seed_for(ctx.seed, "batches", job.panel))
    state = _Job(job, ctx, chain, opt, gen)
    state.distributed = distributed

    def evaluate_all() -> dict[str, float]:
        chain.eval()
        values = {}
        for split, (x, y) in data.evals.items():
            lo, acc = evaluate(chain, loss, x, y, chunk)
            values["loss" if split == "train" else f"{split}_loss"] = lo
            values[f"{split}_accuracy"] = acc
        chain.train()
        return values

    def measure() -> dict[str, float]:
        # Data-parallel: the replicas are equal, so rank 0 evaluates the full splits as one process
        # does (the same numbers, bit for bit) and every rank gets its values (the same divergence
        # decision on every rank).
        return evaluate_all() if par is None else par.broadcast(evaluate_all() if par.main else None)

    if not state.restore():
        state.curves = {k: [v] for k, v in measure().items()}
    bar.reset(total=epochs)
    bar.update(state.step)
    train_time = state.elapsed[-1]
    while state.step < epochs and state.diverged is None:
        t0 = time.perf_counter()
        perm = torch.randperm(n, generator=gen).to(ctx.device)
        try:
            for idx in perm.split(batch):
                if par is not None:  # this rank's part of the global batch of one process
                    idx = idx[mgd.shard(len(idx), par.rank, par.world, shuffle=False).to(idx.device)]
                _update(oracle, opt, data.x_train[idx], data.y_train[idx])
                state.tick()
            train_time += time.perf_counter() - t0
            values = measure()
            _check_value(panel, values["loss"])
        except DIVERGED as err:
            state.diverged = _diverged(ctx, state, err, f"epoch {state.step + 1}")
        else:
            state.step += 1
            state.record(values, train_time)
        bar.update(1)
        state.save()
    return state


def _check_shards(job: Job, n: int, batch: int, world: int) -> None:
    """Every rank must hold at least one sample of every global batch."""
    sizes = {min(batch, n)} | ({n % batch} if n % batch else set())
    if min(sizes) < world:
        raise ValueError(f"panel {job.panel}: a global batch of {min(sizes)} samples (batch_size {batch}, "
                         f"{n} training samples) cannot be split over {world} processes; use fewer "
                         f"processes or another batch_size")


def _parallel_oracle(chain: mg.Chain, loss: Any, job: Job, reg: Any) -> tuple[mg.Oracle, dict[str, str]]:
    """``mg.distributed.Oracle`` in ``exact`` mode, or in ``local`` mode when the rule (or the
    regulariser) couples the samples; the mode and the reason go into the job's record."""
    try:
        oracle = mgd.Oracle(chain, loss, methods.rule(job.spec), mode="exact", regularizer=reg)
        return oracle, {"mode": "exact", "reason": ""}
    except NotImplementedError as err:  # raised on every rank alike (same config)
        oracle = mgd.Oracle(chain, loss, methods.rule(job.spec), mode="local", regularizer=reg)
        return oracle, {"mode": "local", "reason": str(err)}


def _finish(state: _Job, exp: Experiment, wall: float) -> dict[str, Any]:
    cfg = exp.config
    metric = cfg.get("select_metric", "loss")
    curves = state.curves
    best = {k: best_so_far(k, v) for k, v in curves.items()}
    score = None
    if state.diverged is None and metric in best:
        b = best[metric]
        score = b[-1] if cfg.get("select", "final") == "final" else float(np.mean(b))
    job = state.job
    return {
        "id": job.id, "panel": job.panel, "method": job.method, "label": job.label, "params": job.params,
        "spec": job.spec, "diverged": state.diverged is not None, "error": state.diverged,
        "x": list(range(len(next(iter(curves.values()), [])))),
        "curves": curves, "best": best, "final": {k: v[-1] for k, v in curves.items() if v},
        "score": score, "updates": state.updates,
        "timings": {"wall_s": wall, "elapsed_s": state.elapsed},
        **({} if state.distributed is None else {"distributed": state.distributed}),
    }


# -- the run ------------------------------------------------------------------------------------


# Prose, the verdict rule and the number of seeds do not change a (per-seed) run's results.
TEXT_KEYS = ("title", "paper", "claim", "notes", "verdict", "seeds")


def _identity(exp: Experiment, ctx: Context) -> dict[str, Any]:
    """What a resumed run must share with the original: everything that changes results (the
    config without its prose, the scale, the seed, the device)."""
    config = {k: v for k, v in exp.config.items() if k not in TEXT_KEYS}
    ident = {"experiment": exp.name, "scale": exp.scale, "seed": ctx.seed, "device": str(ctx.device),
             "config": store.clean(config)}
    if ctx.parallel is not None:  # absent for one process, so that older run folders still resume
        ident["nproc"] = ctx.parallel.world
    return ident


def _check_run(exp: Experiment, ctx: Context) -> bool:
    """Create the run folder or check that it holds this run; True when resuming."""
    if ctx.out.exists() and not ctx.out.is_dir():
        raise RunMismatchError(f"{ctx.out} is a file, not a folder; choose another --out")
    meta_path = ctx.out / "run.json"
    ident = _identity(exp, ctx)
    if meta_path.is_file():
        old = store.read_json(meta_path)
        old_ident = {k: old.get(k) for k in ident}
        if old.get("nproc", 1) != ident.get("nproc", 1):
            raise RunMismatchError(f"{ctx.out} holds a run on {old.get('nproc', 1)} process(es), not "
                                   f"{ident.get('nproc', 1)}; rerun with --nproc {old.get('nproc', 1)} or "
                                   f"choose another --out")
        if json.dumps(old_ident, sort_keys=True) != json.dumps(ident, sort_keys=True):
            diff = [k for k in ident if json.dumps(old_ident[k], sort_keys=True)
                    != json.dumps(ident[k], sort_keys=True)]
            raise RunMismatchError(f"{ctx.out} holds another run (different {', '.join(diff)}); "
                                   f"choose another --out or delete that folder")
        return True
    if ctx.out.exists() and any(ctx.out.iterdir()):
        raise RunMismatchError(f"{ctx.out} exists, is not empty and holds no run.json; choose another "
                               f"--out")
    store.write_json(meta_path, {**ident, "created": _now(), "versions": versions()})
    return False


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def run(exp: Experiment, ctx: Context) -> dict[str, Any]:
    """Run (or resume) every job of ``exp`` in ``ctx.out`` and write ``results.json``.

    Returns the results dict (also written to ``ctx.out / "results.json"``).
    """
    validate(exp)
    resumed = ctx.on_main(lambda: _check_run(exp, ctx))  # every rank then sees run.json and jobs/
    t0 = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    for job in exp.jobs:
        path = ctx.out / "jobs" / f"{job.id}.json"
        if path.is_file():
            records[job.id] = store.read_json(path)
    if resumed:
        ctx.log(f"resuming {exp.name} in {ctx.out}: {len(records)} of {len(exp.jobs)} jobs done")
    panels: dict[str, PanelData | None] = {}
    skipped: dict[str, str] = {}
    last_write = -math.inf  # the first finished job writes results.json at once, for `moreaugrad plot`
    disable = not ctx.progress or not ctx.main
    with tqdm(total=len(exp.jobs), desc=exp.name, unit="job", disable=disable, position=0) as outer, \
            tqdm(total=1, desc="", leave=False, disable=disable, position=1, mininterval=0.5) as bar:
        outer.update(len(records))
        for job in exp.jobs:
            if job.id in records:
                continue
            panel = exp.panels[job.panel]
            if panel["kind"] == "train" and job.panel not in panels and job.panel not in skipped:
                try:
                    panels[job.panel] = load_panel(panel, ctx)
                except mg.data.MissingDataError as err:
                    if not panel.get("optional", False):
                        raise
                    skipped[job.panel] = str(err)
                    ctx.log(f"skipping panel {job.panel}: {err}")
            if job.panel in skipped:
                outer.update(1)
                continue
            bar.set_description(job.label[:40])
            start = time.perf_counter()
            if panel["kind"] == "control":
                state = _control_job(job, panel, ctx, bar)
            else:
                state = _train_job(job, panel, panels[job.panel], ctx, bar)
            rec = _finish(state, exp, time.perf_counter() - start)
            if panel["kind"] == "train":
                rec["data_sizes"] = panels[job.panel].sizes
            outer.update(1)
            if not ctx.main:
                records[job.id] = rec
                continue
            store.write_json(ctx.out / "jobs" / f"{job.id}.json", rec)
            state.path.unlink(missing_ok=True)
            records[job.id] = store.read_json(ctx.out / "jobs" / f"{job.id}.json")
            # Partial results for `moreaugrad plot` on a running experiment; after the first job,
            # throttled, since a paper-size grid has thousands of jobs.
            if time.perf_counter() - last_write > PARTIAL_EVERY_S:
                store.write_json(ctx.out / "results.json",
                                 collect(exp, ctx, records, skipped, "running", time.perf_counter() - t0))
                last_write = time.perf_counter()
    results = collect(exp, ctx, records, skipped, "complete", time.perf_counter() - t0)
    if not ctx.main:
        return results
    store.write_json(ctx.out / "results.json", results)
    state_dir = ctx.out / "state"
    if state_dir.is_dir() and not any(state_dir.iterdir()):
        state_dir.rmdir()
    return store.read_json(ctx.out / "results.json")


def collect(exp: Experiment, ctx: Context, records: dict[str, dict[str, Any]], skipped: dict[str, str],
            status: str, wall: float) -> dict[str, Any]:
    """The results document: config, versions, seed, device, per-panel selection and every job."""
    jobs = [records[j.id] for j in exp.jobs if j.id in records]
    selected: dict[str, dict[str, str | None]] = {}
    for pname, panel in exp.panels.items():
        if pname in skipped:
            continue
        selected[pname] = {}
        for m in panel["methods"]:
            cands = [r for r in jobs if r["panel"] == pname and r["method"] == m and r["score"] is not None]
            selected[pname][m] = min(cands, key=lambda r: r["score"])["id"] if cands else None
    panel_info = {}
    for pname, panel in exp.panels.items():
        info = {"title": panel["title"], "kind": panel["kind"], "methods": panel["methods"],
                "skipped": skipped.get(pname)}
        if panel["kind"] == "train":
            info["model"] = models.describe(panel.get("model", {}))
            ds = panel.get("dataset", "digits")
            info["dataset"] = ds if isinstance(ds, str) else ds["name"]
            sizes = [r["data_sizes"] for r in jobs if r["panel"] == pname and "data_sizes" in r]
            if sizes:
                info["sizes"] = sizes[0]
        else:
            info["horizon"] = panel.get("horizon")
            info["discretization"] = panel.get("discretization", "explicit")
            info["x0"] = list(panel.get("x0", (0.0, 0.0)))
        panel_info[pname] = info
    cfg = exp.config
    extra = {}
    if ctx.parallel is not None:
        modes = {r["id"]: r.get("distributed", {}) for r in jobs}
        extra["distributed"] = {
            "nproc": ctx.parallel.world, "backend": ctx.parallel.backend,
            "modes": {k: v.get("mode") for k, v in modes.items()},
            "local_fallback": {k: v["reason"] for k, v in modes.items() if v.get("mode") == "local"}}
    return {
        "format": 1,
        "status": status,
        "experiment": {"name": exp.name, "title": exp.title, "paper": cfg.get("paper", ""),
                       "claim": cfg.get("claim", ""), "source": exp.source},
        "scale": exp.scale, "seed": ctx.seed, "device": str(ctx.device),
        "versions": versions(),
        "config": cfg,
        "select": {"by": cfg.get("select", "final"), "metric": cfg.get("select_metric", "loss")},
        "panels": panel_info,
        "selected": selected,
        "jobs": jobs,
        **extra,
        "timings": {"wall_s": wall, "finished": _now(),
                    "jobs_s": {r["id"]: r["timings"]["wall_s"] for r in jobs}},
    }
