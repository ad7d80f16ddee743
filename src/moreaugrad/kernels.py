"""Fused elementwise kernels for the hottest rules, compiled by ``torch.compile`` on request, and
the block size their eager forms run in (:func:`row_blocks`).

The ReLU steps of Moreau (the proximal step, 000 eq. 52) and of Fenchel back-propagation (the
finite difference and its surrogate terms, 002 eq. 57-60) are chains of 6 to 10 elementwise passes
over an activation, where backprop's ReLU takes one. Eager, each pass writes a fresh activation-sized
buffer; on CPU that costs page faults as well as bandwidth. Eager, they run block by block
(:func:`row_blocks`), which keeps those buffers small and in cache; compiled, each chain is one
loop. Measured on the 004 ConvNet's first activation (128 x 16 x 32 x 32, CPU, 2 threads, torch
2.13): the FenBP kernel with its surrogate terms ran in 0.37 ms compiled, 1.7 ms eager in blocks
and 2-20 ms eager in one piece (``threshold_backward``: 0.2 ms), after a 15 s compile.

Off by default, since a compile costs seconds per kernel and dtype and needs a C++ compiler on CPU:

    mg.kernels.use_compile(True)      # or MOREAUGRAD_COMPILE=1 in the environment

Each kernel is compiled once, with dynamic shapes, on its first call. Scalars enter as 0-dim tensors
so that a new step size is not a new compile. A kernel whose compile or compiled call fails warns
once (:class:`CompileWarning`) and runs eagerly from then on. Compiled and eager kernels compute the
same formulas (``tests/test_kernels.py`` checks them against each other in float32 and float64);
sums may differ in the order of their additions.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

__all__ = ["BLOCK_BYTES", "CompileWarning", "blocks", "compiling", "fenbp_relu", "moreau_relu",
           "reset", "row_blocks", "use_compile"]

BLOCK_BYTES = 3 << 20
"""The size of a block of an activation for the eager kernels (:func:`row_blocks`)."""


def row_blocks(t: Tensor) -> int:
    """Rows of ``t``'s leading dimension per block of about :data:`BLOCK_BYTES` (at least one).

    The eager kernels run their chains of elementwise passes block by block: a block's
    temporaries stay in cache and are small enough to be reused by the allocator, where an
    activation-sized temporary is a fresh mapping whose every page faults on first touch. On the
    004 ConvNet's first activation (8 MiB, CPU, 2 threads) FenBP's ReLU step with its surrogate
    terms took 5.2 ms in one piece and 1.7 ms in blocks of 4 MiB; Moreau's max-pool network 13 ms
    and 7 ms. Blocks split the leading (batch) dimension, so every block is one contiguous piece.
    """
    row = t[0].numel() * t.element_size() if t.dim() > 0 and t.shape[0] > 0 else 1
    return max(1, BLOCK_BYTES // max(1, row))


def blocks(*tensors: Tensor) -> Iterator[tuple[Tensor, ...]]:
    """The blocks of ``tensors`` (equal leading dimensions), block by block: views of
    :func:`row_blocks` rows of each, the first tensor setting the size."""
    rows = row_blocks(tensors[0])
    return zip(*(t.split(rows) for t in tensors), strict=True)

_STATE = {"on": os.environ.get("MOREAUGRAD_COMPILE", "") == "1"}


class CompileWarning(UserWarning):
    """A kernel could not be compiled (or its compiled form failed): it runs eagerly instead."""


def use_compile(flag: bool = True) -> None:
    """Compile the fused kernels on their first call from now on (``False``: run them eagerly)."""
    if not isinstance(flag, bool):
        raise TypeError(f"use_compile: flag must be True or False, got {flag!r}")
    _STATE["on"] = flag


def compiling() -> bool:
    """Whether the kernels are compiled (:func:`use_compile`, ``MOREAUGRAD_COMPILE=1``)."""
    return _STATE["on"]


class _Kernel:
    """A pure elementwise function, eager or compiled (see the module docstring)."""

    def __init__(self, fn: Callable[..., Any]):
        self.eager = fn
        self.compiled: Callable[..., Any] | None = None
        self.failed = False
        self.__doc__ = fn.__doc__
        self.__name__ = fn.__name__

    def __call__(self, *args: Any) -> Any:
        if not _STATE["on"] or self.failed:
            return self.eager(*args)
        if self.compiled is None:
            self.compiled = torch.compile(self.eager, dynamic=True, fullgraph=True)
        try:
            return self.compiled(*args)
        except Exception as err:  # no compiler, an unsupported backend: report once, run eagerly
            self.failed = True
            warnings.warn(f"moreaugrad.kernels: {self.__name__} could not be compiled "
                          f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); it "
                          f"runs eagerly from now on", CompileWarning, stacklevel=2)
            return self.eager(*args)


def _scalar(v: float, like: Tensor) -> Tensor:
    return torch.tensor(v, dtype=like.dtype, device=like.device)


def _relu_increment(u: Tensor, lam: Tensor, c: Tensor) -> Tensor:
    """``relu(u) - relu(u - c lam)`` as one signed clip (``rules.fenchel._relu_difference``, out of
    place for the compiler)."""
    delta = c * lam
    return torch.minimum((u - delta.clamp_max(0)).clamp_min(0), delta.abs()).copysign(delta)


def _fenbp_relu(u: Tensor, lam: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """FenBP on a ReLU with the spacing ``c = tau n`` (002 eq. 57-60): ``lambda_{t-1} = inc / c`` and
    the stage's surrogate term ``-<inc, lam> + (||inc||^2/2 + <inc, min(u, 0)>) / c``."""
    inc = _relu_increment(u, lam, c)
    term = -(inc * lam).sum() + (0.5 * (inc * inc).sum() + (inc * u.clamp_max(0)).sum()) / c
    return inc / c, term


def _fenbp_relu_signal(u: Tensor, lam: Tensor, c: Tensor) -> Tensor:
    """:func:`_fenbp_relu`'s signal alone (no surrogate terms asked)."""
    return _relu_increment(u, lam, c) / c


def _moreau_relu(x: Tensor, lam: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """Moreau on a ReLU (000 eq. 52): ``lambda_{t-1} = beta (x - u)``, ``u`` the prox of
    ``gamma lam relu`` at ``x`` (see ``envelope.ReLUProx.moved``)."""
    c = gamma * lam
    e = torch.minimum(x.clamp_min(0), c)
    return beta * e * (x > (0.5 * c).clamp_max(0))


_FENBP = _Kernel(_fenbp_relu)
_FENBP_SIGNAL = _Kernel(_fenbp_relu_signal)
_MOREAU = _Kernel(_moreau_relu)
KERNELS = (_FENBP, _FENBP_SIGNAL, _MOREAU)


def reset() -> None:
    """Forget every compiled kernel and every failure: the next call compiles again."""
    for k in KERNELS:
        k.compiled, k.failed = None, False


def fenbp_relu(u: Tensor, lam: Tensor, c: float, surrogate: bool) -> tuple[Tensor, Tensor | None]:
    """``(lambda_{t-1}, term)`` of FenBP on a ReLU (``term`` None without ``surrogate``)."""
    cc = _scalar(c, u)
    if surrogate:
        return _FENBP(u, lam, cc)
    return _FENBP_SIGNAL(u, lam, cc), None


def moreau_relu(x: Tensor, lam: Tensor, gamma: float, beta: float) -> Tensor:
    """``lambda_{t-1}`` of Moreau on a ReLU: ``beta (x - u)``."""
    return _MOREAU(x, lam, _scalar(gamma, x), _scalar(beta, x))
