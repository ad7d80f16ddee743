"""Peak memory of one call, in bytes above what was live when the call began.

CPU: one call runs under ``torch.profiler.profile(activities=[CPU], profile_memory=True)``. The
profiler records every allocation and free of the CPU allocator as an event with its signed size
(``+n`` on allocation, ``-n`` on free). Walking these events in time order and summing the sizes
gives the bytes live at each instant relative to the start; the peak is the largest such sum (and
at least 0). A free of a tensor allocated before the call counts as ``-n`` and can only lower the
running sum, so the peak is never overstated. The events are the profiler's raw ``[memory]`` records
(``prof.profiler.kineto_results.events()``, each with ``start_ns()`` and a signed ``nbytes()``); the
public ``prof.events()`` folds most allocations into the operators that made them and loses their
order, and building them costs more than the call.
:func:`peak_bytes` is checked on a toy with known allocations by ``tests/test_benchmarks.py``.

CUDA: ``torch.cuda.reset_peak_memory_stats`` before the call, and
``max_memory_allocated() - memory_allocated()`` (the latter read before the call) after it.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile


def allocation_events(prof: profile) -> list[tuple[int, int]]:
    """``(time_ns, signed size in bytes)`` of every CPU allocation (+) and free (-), in time order."""
    events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    events.sort(key=lambda e: e[0])
    return events


def peak_of(events: list[tuple[int, int]]) -> int:
    """The largest running sum of the signed sizes (0 if memory only went down)."""
    live = peak = 0
    for _, size in events:
        live += size
        peak = max(peak, live)
    return peak


def peak_bytes(fn: Callable[[], Any], device: torch.device, reset: Callable[[], Any] | None = None) -> int:
    """Peak bytes allocated by one call of ``fn`` on ``device``, above what was live before.

    ``reset`` runs first, outside the measurement (e.g. dropping the model's ``.grad``). On CPU it
    matters: the profiler records no free of a block allocated before it started, and a call that
    frees the previous call's tensors (``zero_grad``) and then allocates at the same addresses was
    measured 4 to 8 MiB apart on one MLP depending only on which case ran before (CPU, torch
    2.13). With every case's leftovers dropped first, each call's allocations are all its own.
    """
    if reset is not None:
        reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    with warnings.catch_warnings():
        # The profiler warns about its own setup on some builds; that is not the call's business.
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
    return peak_of(allocation_events(prof))
