"""``moreaugrad run CONFIG --nproc N``: one experiment on N data-parallel processes of this machine.

The launcher (:func:`launch`, in the ``moreaugrad`` process) starts N workers
(:func:`worker` in ``python -c``) in its own process group, with a ``file://``
rendezvous in a fresh temporary folder: gloo on CPU, NCCL with ``--device cuda`` (rank ``r`` on GPU
``r``). Every worker is a rank that runs the whole config through the engine (:class:`Parallel` in
its :class:`~moreaugrad.runner.engine.Context`):

- each global mini-batch is the one of ``--nproc 1`` (same generator) and is split over the ranks by
  ``mg.distributed.shard`` (parts differ by at most one sample);
- a train panel's oracle is ``mg.distributed.Oracle(..., mode="exact")``; a rule that mode refuses
  (``NotImplementedError``: coupled inner solves, regularisers) falls back to ``mode="local"``, and the
  job's record and ``summary.md`` say so; control panels have no data to shard: every rank runs the
  full problem (the same numbers, no collectives);
- rank 0 alone evaluates (and broadcasts the values, so every rank takes the same divergence
  decision), writes checkpoints, job records, ``results.json``, figures and ``summary.md``; every rank
  restores the same checkpoint after a barrier;
- failures are bounded: every collective has a timeout (``--rank-timeout``); a rank that fails exits
  non-zero, the launcher then kills the others and exits non-zero naming the rank; a worker whose
  launcher died (SIGKILL) exits within a second; a divergence raised inside one rank's oracle step is
  recorded only when every rank raised it at the same update, otherwise the run stops with an error.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600.0
GRACE_S = 5.0


class RankFailure(RuntimeError):
    """A rank of a data-parallel run failed or disagreed with the others."""


@dataclass
class Parallel:
    """This process's place in a data-parallel run (an initialised default process group)."""

    rank: int
    world: int
    store: Any
    timeout_s: float = DEFAULT_TIMEOUT_S
    _agreements: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def backend(self) -> str:
        return str(dist.get_backend())

    def barrier(self) -> None:
        dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (the others pass anything)."""
        box = [obj if self.main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def on_main(self, fn: Any) -> Any:
        """Run ``fn()`` on rank 0 and give its result to every rank; if it raised, every rank raises
        an exception of the same type (its message), so no rank waits for a rank that failed."""
        outcome: tuple[str, Any] = ("ok", None)
        if self.main:
            try:
                outcome = ("ok", fn())
            except Exception as err:  # noqa: BLE001 - re-raised on every rank below
                if self.world == 1:
                    raise
                self.broadcast(("error", (type(err), str(err))))
                raise
        kind, value = self.broadcast(outcome)
        if kind == "error":
            cls, message = value
            try:
                err = cls(message)
            except TypeError:
                err = RankFailure(f"rank 0: {cls.__name__}: {message}")
            raise err
        return value

    def agree(self, what: str, message: str) -> None:
        """Called by a rank that caught a divergence inside an oracle step: return when every rank
        caught one at the same point (then they made the same collective calls and may go on),
        raise :class:`RankFailure` otherwise (the others are waiting in a collective that this rank
        left, so the run cannot record the divergence consistently). Uses the rendezvous store, not a
        collective, so it cannot be mismatched with the collective the others wait in."""
        self._agreements += 1
        key = f"diverged/{self._agreements}/{what}"
        self.store.set(f"{key}/{self.rank}", message)
        try:
            self.store.wait([f"{key}/{r}" for r in range(self.world)], timedelta(seconds=min(60.0,
                                                                                             self.timeout_s)))
        except Exception as err:  # noqa: BLE001 - the store's timeout error type varies by version
            raise RankFailure(
                f"rank {self.rank} diverged in {what} ({message}) but not every rank did (a value that "
                f"is not finite on this rank's shard only); a data-parallel run cannot record that "
                f"divergence: rerun with --nproc 1, or change the grid point") from err


# -- the worker ------------------------------------------------------------------------------------


def _watch_parent(parent: int) -> None:
    """Exit when the launcher is gone (a SIGKILL of the launcher alone), so that no orphaned rank
    keeps writing into the run folder that a rerun resumes."""
    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(3)
            time.sleep(0.5)

    threading.Thread(target=watch, daemon=True, name="moreaugrad-parent-watch").start()


def worker(spec: dict[str, Any], rank: int) -> int:
    """One rank: join the group, run the config, leave. Returns the exit code."""
    from .. import data
    from . import ConfigError, RunMismatchError, run_config

    _watch_parent(spec["parent"])
    torch.set_num_threads(spec["threads"])
    world = spec["world"]
    device = spec["device"]
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
        backend = "nccl"
    else:
        backend = "gloo"
    timeout = timedelta(seconds=spec["timeout_s"])
    store = dist.FileStore(spec["store"], world)
    try:
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - reported, then a non-zero exit
        print(f"moreaugrad: rank {rank}: could not join the process group: {err}", file=sys.stderr)
        return 1
    par = Parallel(rank, world, store, spec["timeout_s"])
    try:
        run_config(spec["config"], spec["out"], scale=spec["scale"], seed=spec["seed"], device=device,
                   data_dir=spec["data_dir"], progress=spec["progress"] and rank == 0,
                   log=print if rank == 0 else (lambda s: None), n_seeds=spec["n_seeds"], parallel=par)
    except KeyboardInterrupt:
        return 130
    except (ConfigError, RunMismatchError, RankFailure, ValueError, data.MissingDataError,
            data.FormatError) as err:
        if rank == 0 or isinstance(err, RankFailure):  # the others raised the same error
            print(f"moreaugrad: rank {rank}: error: {err}", file=sys.stderr)
        return 2
    except Exception:  # noqa: BLE001 - the launcher stops the other ranks
        print(f"moreaugrad: rank {rank} failed:\n{traceback.format_exc()}", file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# -- the launcher ----------------------------------------------------------------------------------


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + GRACE_S
    for p in procs:
        if p.poll() is None:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def launch(config: str | Path, out: str | Path, nproc: int, scale: str = "default", seed: int = 0,
           device: str = "cpu", data_dir: str | Path | None = None, progress: bool = False,
           n_seeds: int | None = None, threads: int = 1,
           timeout_s: float = DEFAULT_TIMEOUT_S) -> int:
    """Run ``config`` on ``nproc`` ranks (module docstring) and wait for them.

    Returns:
        0 when every rank finished; else the exit code of the first rank that failed (the others
        are stopped), or 130 when interrupted (the run resumes when rerun).
    """
    if nproc < 1:
        raise ValueError(f"--nproc must be >= 1, got {nproc}")
    if device.startswith("cuda"):
        if device != "cuda":
            raise ValueError(f"--nproc {nproc} with --device {device}: give --device cuda (rank r runs on "
                             f"GPU r)")
        if torch.cuda.device_count() < nproc:
            raise ValueError(f"--nproc {nproc} needs {nproc} GPUs with --device cuda (NCCL: one GPU per "
                             f"rank); {torch.cuda.device_count()} visible")
    elif device != "cpu":
        raise ValueError(f"--nproc runs on --device cpu (gloo) or cuda (NCCL), got {device!r}")
    elif nproc > (os.cpu_count() or 1):
        # each rank is one process with its own copy of torch and the data: more ranks than cores
        # only add memory and context switches
        raise ValueError(f"--nproc {nproc} is more than the {os.cpu_count()} CPU cores of this machine")
    with tempfile.TemporaryDirectory(prefix="moreaugrad-nproc-") as tmp:
        spec = {"config": str(config), "out": str(out), "scale": scale, "seed": seed, "device": device,
                "data_dir": None if data_dir is None else str(data_dir), "progress": progress,
                "n_seeds": n_seeds, "threads": threads, "world": nproc, "timeout_s": timeout_s,
                "store": str(Path(tmp) / "store"), "parent": os.getpid()}
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        # -c, not -m: this module is already imported by the runner package, which runpy warns about
        cmd = [sys.executable, "-c", "import sys; from moreaugrad.runner.parallel import worker; "
               "sys.exit(worker(__import__('json').loads(sys.argv[1]), int(sys.argv[2])))", json.dumps(spec)]
        procs = [subprocess.Popen([*cmd, str(r)], env=env,
                                  stdout=None if r == 0 else subprocess.DEVNULL) for r in range(nproc)]
        try:
            while True:
                codes = [p.poll() for p in procs]
                failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
                if failed:
                    # a rank killed by a signal first: the others' errors are then its consequence
                    rank, code = min(failed, key=lambda rc: (rc[1] > 0, rc[0]))
                    _stop(procs)
                    others = "".join(f" (rank {r}: code {c})" for r, c in failed if r != rank)
                    print(f"moreaugrad: rank {rank} of {nproc} exited with code {code}{others}; stopped the "
                          f"other ranks. Fix the error above and rerun the same command to resume {out}.",
                          file=sys.stderr)
                    return code if code > 0 else 1
                if all(c == 0 for c in codes):
                    return 0
                time.sleep(0.1)
        except KeyboardInterrupt:
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            _stop(procs)
            return 130
        finally:
            _stop(procs)

