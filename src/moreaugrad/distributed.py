"""Data-parallel oracles on ``torch.distributed`` (DESIGN section 6; issue 11, first slice).

Inside an initialised process group (gloo on CPU, NCCL on GPU; ``torchrun`` sets one up), each rank
holds a replica of the model and a shard of the batch. :class:`Oracle` is :class:`moreaugrad.Oracle`
with the directions and the loss reduced across ranks, so ``.backward`` and ``.step`` keep their
meaning and the replicas stay identical. There is no communication layer of our own: one
``all_reduce`` per bucket of directions (one bucket per dtype and device, like DDP), through
``torch.distributed``.

Two modes:

* ``local``: each rank runs the oracle on its shard with the objective's own (local) mean, and the
  directions and losses are averaged over ranks: ``d = (1/P) sum_r d_r``. For backprop with equal
  shards this is DDP's gradient; for rules with inner solves it is not the oracle of the global batch.
* ``exact``: the oracle of the global batch, for the rules whose directions are a sum over samples
  (``d = sum_i d_i`` with ``d_i`` depending on sample ``i`` and the global batch size ``B`` only):
  ``backprop``; ``moreau`` on split stages (closed forms: vjps on Linear/Conv weights, per-sample
  state problems, a per-sample objective envelope with weight ``gamma/B``); ``fenchel``. Two ways to
  make a rank's share equal its part of the global sum, chosen per rule:

  - *weighted* (signals linear in the loss scale, or read per sample as ``B_local lambda`` as
    ``fenchel(batch_mean=True)`` does): the local oracle with the local mean, reduced as
    ``d = sum_r B_r d_r / sum_r B_r``; the batch sizes travel in the same all-reduce.
  - *scaled* (Moreau: the objective's envelope ``grad env(gamma h)`` is not linear in ``h``): the
    objective line sees ``gamma B_r / B`` on the local mean, which is ``gamma/B`` per sample, so every
    signal equals the global one restricted to the shard; ``d = sum_r d_r``. ``B`` is all-reduced
    before the sweep (a second collective).

  - *reduced* (ProxProp, Moreau's weight solves on grouped stages, the augmented Lagrangian, whose
    weight problems couple the samples): the objective is read as in *scaled* (the augmented
    Lagrangian's target as ``env(k h / m)``), and every sum over samples of a weight line
    is summed over the shards inside the sweep (``Site.batch_sum``): the vjps' weight parts, each
    proximal stage's Gram matrix and right-hand side together (then every rank runs the same closed
    form or CG on them), and every value of a Moreau weight problem's data term and its gradient
    (``Site.summed``, ``Site.replicated``: every rank's solver sees the global problem and takes the
    same steps). The directions come out global on every rank, and only the loss is reduced after
    the sweep.

  Plain target propagation (least-squares fits by the pseudo-inverse of all the rows, ``c = 0``,
  which no rank holds) and train-mode batch norm (statistics over the global batch; no
  ``SyncBatchNorm`` yet) raise ``NotImplementedError`` in ``exact`` mode. Use ``mode="local"``.

At construction (and whenever the chain's stages change) the ranks compare a fingerprint of the
rule, the objective, the stages (types, train/eval mode), the parameter shapes and dtypes and the
weights' values (two sums per tensor) with one ``all_gather_object``; a mismatch raises
:class:`FingerprintError` on every rank, naming the ranks and the fields that differ.

Example (``torchrun --nproc-per-node 2 train.py``):
    >>> dist.init_process_group("gloo")
    >>> oracle = mg.distributed.Oracle(model, mg.losses.CrossEntropy(), mg.rules.moreau(), mode="exact")
    >>> for idx in mg.distributed.batches(len(y), 64, epoch=0):  # this rank's part of each batch
    ...     oracle.step(x[idx], y[idx])                           # the same update on every rank
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import oracle as _oracle
from .chain import Chain
from .losses import CrossEntropy, Regularizer, SquaredLoss
from .rules import Rule
from .rules.fenchel import activation_state as _fenchel_activation
from .rules.fenchel import affine_state as _fenchel_affine
from .rules.grad import Grad, grad_state, grad_weight
from .rules.moreau import (
    Moreau,
    Schedule,
    activation_state,
    generic_state,
    generic_weight,
    linear_state,
    linear_weight,
    max_pool_state,
)
from .rules.target import (
    Augmented,
    Proximal,
    augmented_generic_state,
    augmented_generic_weight,
    augmented_linear_state,
    augmented_linear_weight,
    augmented_piecewise_state,
    augmented_smooth_state,
)
from .sweep import Placed
from .types import Dual, Signal, SolveInfo

__all__ = ["MODES", "FingerprintError", "Oracle", "batches", "shard"]

MODES = ("exact", "local")


class FingerprintError(RuntimeError):
    """The ranks of a process group do not run the same rule, objective or model."""


# -- which rules separate over samples -------------------------------------------------------------

# State entries linear in the incoming signal (vjps): any scaling of the signal passes through.
_LINEAR_STATE = {grad_state, linear_state, _fenchel_affine}
# Per-sample state entries that are not linear in the signal (closed forms of separable problems).
_PER_SAMPLE_STATE = {activation_state, max_pool_state, generic_state, augmented_linear_state,
                     augmented_piecewise_state, augmented_smooth_state, augmented_generic_state}
# Weight entries whose problems couple the samples, summed over the shards inside the sweep.
_REDUCED_WEIGHT = {generic_weight, augmented_linear_weight, augmented_generic_weight}
# Weight entries that are sums over samples of per-sample vjps (without a regulariser).
_SUM_WEIGHT = {grad_weight, linear_weight}
_MEAN_LOSSES = (CrossEntropy, SquaredLoss, nn.MSELoss, nn.CrossEntropyLoss)


class _Probe(Placed):
    """What a per-stage rule spec (a sequence, or a function of the site) is asked with before the
    forward pass: the stage and the horizon (a function reading recorded tensors is not supported)."""

    def __init__(self, stage: Any, horizon: int):
        self.stage, self.horizon = stage, horizon


def _coupled(rule: Any, site: Any, line: str, why: str) -> NotImplementedError:
    name = getattr(rule, "owner", type(rule).__name__)
    return NotImplementedError(
        f"mg.distributed.Oracle(mode='exact'): the {line} rule {name} on {site.label} {why}; the "
        f"global-batch oracle would need all-reduces inside its inner solve, which are not "
        f"implemented; use mode='local' (average of the ranks' oracles)")


def _entry(spec: Any, line: str, probe: _Probe) -> Callable[..., Any] | None:
    try:
        return spec.entry(line, probe)
    except (NotImplementedError, AttributeError):
        return None


def _mixes_samples(stage: Any) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in stage.module.modules())


def _exact_plan(rule: Rule, objective: Any, stages: Sequence[Any], regularizers: Sequence[Any]) -> str:
    """``"weighted"`` or ``"scaled"`` (module docstring) for a rule whose oracle separates over
    samples; raises ``NotImplementedError`` naming the rule and the stage where it does not."""
    if not isinstance(objective, _MEAN_LOSSES) or getattr(objective, "reduction", "mean") != "mean" \
            or getattr(objective, "weight", None) is not None:
        raise NotImplementedError(
            f"mg.distributed.Oracle(mode='exact'): the objective {objective!r} is not one whose global "
            f"batch mean is known to split over ranks (mg.losses.CrossEntropy, mg.losses.SquaredLoss, "
            f"nn.MSELoss(), nn.CrossEntropyLoss() without class weights); use mode='local'")
    if any(r is not None for r in regularizers):
        raise NotImplementedError(
            "mg.distributed.Oracle(mode='exact'): a regulariser r_t(w_t) would be counted once per "
            "rank in the sum of the ranks' directions; add it outside the oracle (e.g. weight decay "
            "in the optimizer) or use mode='local'")
    needs: set[str] = set()
    tau = len(stages)
    for t, stage in enumerate(stages):
        probe = _Probe(stage, tau)
        if _mixes_samples(stage):
            raise NotImplementedError(
                f"mg.distributed.Oracle(mode='exact'): {probe.label} holds a batch norm in train mode, "
                f"whose statistics mix the samples of the global batch (nn.SyncBatchNorm is not "
                f"supported yet); call .eval() on it or use mode='local'")
        if stage.has_weights:
            w = rule.weight_for(probe)
            if isinstance(w, Augmented) and w.c_weight == 0:
                raise _coupled(w, probe, "weight", "fits plain least squares (c = 0) by the "
                                                   "pseudo-inverse of all the samples' rows")
            if isinstance(w, Proximal) or _entry(w, "weight", probe) in _REDUCED_WEIGHT:
                # ProxProp's Gram systems, Moreau's and the AL's weight solves: summed in-sweep
                needs.add("reduced")
            elif _entry(w, "weight", probe) not in _SUM_WEIGHT:
                raise _coupled(w, probe, "weight", "solves a problem over the weights that sums over "
                                                   "all samples (not a vjp)")
        if t == 0:  # the input's signal is not used by the weights
            continue
        s = rule.state_for(probe)
        fn = _entry(s, "state", probe)
        if fn in _LINEAR_STATE:
            continue
        if fn in _PER_SAMPLE_STATE:
            needs.add("scaled")
        elif fn is _fenchel_activation:
            needs.add("weighted" if s.batch_mean else "scaled")
        else:
            raise _coupled(s, probe, "state", "is not a closed form known to separate over samples "
                                              "(a generic or coupled solve)")
    obj = rule.objective
    if isinstance(obj, Moreau) and not obj.closed_forms:
        raise NotImplementedError(
            "mg.distributed.Oracle(mode='exact'): moreau(closed_forms=False) solves the objective's "
            "envelope over the whole batch with L-BFGS, whose iterates differ between a shard and the "
            "global batch; use the closed forms or mode='local'")
    if isinstance(obj, Moreau | Augmented):
        needs.add("scaled")
    elif not isinstance(obj, Grad):
        raise NotImplementedError(
            f"mg.distributed.Oracle(mode='exact'): the objective rule {type(obj).__name__} on the "
            f"output of stage {tau} (a target solve) is not known to separate over ranks; use "
            f"mode='local'")
    if "reduced" in needs and "weighted" not in needs:
        return "reduced"  # the signals carry the global batch size, as for "scaled"
    if len(needs) > 1:
        raise NotImplementedError(
            "mg.distributed.Oracle(mode='exact'): this rule mixes a Moreau line (exact when each "
            "rank's signals carry the global batch size) with fenchel(batch_mean=True) (which reads "
            "the local batch size); use mode='local'")
    return needs.pop() if needs else "weighted"


class _ScaledDual(Schedule):
    """A schedule whose objective step is ``gamma B_local / B``: the envelope of ``gamma`` times the
    global mean, read on the local mean (the other steps are the inner schedule's)."""

    def __init__(self, inner: Schedule, k: float):
        self.inner, self.k = inner, k

    def dual(self, s: int, tau: int) -> tuple[float, float]:
        gamma, beta = self.inner.dual(s, tau)
        return (gamma * self.k, beta) if s == tau else (gamma, beta)

    def step(self, t: int, tau: int) -> float:
        return self.inner.step(t, tau)


class _ShardObjective:
    """The objective line of the global batch's oracle, run on one shard: the signal of the global
    mean ``(1/B) sum_i l_i`` restricted to the shard, from the local mean times ``k = B_local/B``."""

    def __init__(self, inner: Any):
        self.inner, self.k = inner, 1.0

    def __repr__(self) -> str:
        return f"_ShardObjective({self.inner!r})"

    def objective(self, h: Any, output: Tensor, target: Any,
                  horizon: int) -> tuple[Tensor, Signal, SolveInfo | None]:
        if isinstance(self.inner, Moreau):
            rule = dataclasses.replace(self.inner, schedule=_ScaledDual(self.inner.schedule, self.k))
            return rule.objective(h, output, target, horizon)
        if isinstance(self.inner, Augmented):  # the target of env(k h / m)
            return self.inner.objective(h, output, target, horizon, scale=self.k)
        loss, signal, info = self.inner.objective(h, output, target, horizon)
        return loss, Dual(self.k * signal.dual(output)), info


# -- fingerprint -----------------------------------------------------------------------------------

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _digest(text: str) -> str:
    return hashlib.sha256(_ADDRESS.sub("", text).encode()).hexdigest()[:16]


def _fingerprint(chain: Chain, objective: Any, rule: Any, mode: str) -> dict[str, str]:
    """Cheap digests of what the ranks must agree on, one per field so that a mismatch is named."""
    stages = [(s.description, s.module.training,
               tuple((sl.name, tuple(sl.param.shape), str(sl.param.dtype)) for sl in s.slots))
              for s in chain.stages]
    params = [(n, tuple(p.shape), str(p.dtype), p.requires_grad) for n, p in chain.named_parameters()]
    # The replicas must start equal (DDP broadcasts rank 0's instead): two sums per tensor, one sync.
    tensors = [t.detach() for t in (*chain.parameters(), *chain.buffers()) if t.is_floating_point()]
    sums = torch.stack([torch.stack([t.double().sum(), t.double().abs().sum()]) for t in tensors]).tolist() \
        if tensors else []
    return {"mode": mode, "rule": _digest(repr(rule)), "objective": _digest(repr(objective)),
            "stages": _digest(repr(stages)), "parameters": _digest(repr(params)),
            "weights": _digest(repr(sums))}


def _agree(mine: dict[str, str], group: Any) -> None:
    """All-gather the fingerprints and raise :class:`FingerprintError` on every rank if they differ."""
    world = dist.get_world_size(group)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    errors = [(r, f["error"]) for r, f in enumerate(everyone) if "error" in f]
    if errors:
        lines = "; ".join(f"rank {r}: {e}" for r, e in errors)
        raise FingerprintError(f"mg.distributed.Oracle: construction failed on some ranks ({lines})")
    fields = [k for k in everyone[0] if any(f.get(k) != everyone[0][k] for f in everyone)]
    if fields:
        groups = {k: {v: [r for r, f in enumerate(everyone) if f[k] == v]
                      for v in sorted({f[k] for f in everyone})} for k in fields}
        detail = "; ".join(f"{k}: " + ", ".join(f"ranks {rs} have {v}" for v, rs in g.items())
                           for k, g in groups.items())
        raise FingerprintError(f"mg.distributed.Oracle: the ranks disagree on {', '.join(fields)} "
                               f"(every rank must run the same rule on the same model); {detail}")


# -- the oracle ------------------------------------------------------------------------------------


class Oracle(_oracle.Oracle):
    """:class:`moreaugrad.Oracle` on a data-parallel process group (module docstring).

    Args:
        chain: as for :class:`moreaugrad.Oracle`; every rank passes the same (checked by
            fingerprint), as for ``objective``, ``rule`` and ``regularizer``.
        objective: as for :class:`moreaugrad.Oracle`.
        rule: as for :class:`moreaugrad.Oracle`.
        regularizer: as for :class:`moreaugrad.Oracle`.
        mode: ``"exact"`` (the oracle of the global batch; separable rules only) or ``"local"`` (the
            average of the ranks' oracles on their shards).
        group: the process group (default: the world).

    The result's ``directions`` and ``loss`` are the reduced ones, equal on every rank; ``info``,
    ``output`` and the signals stay those of the rank's shard. In ``exact`` mode the loss is the global
    batch mean; in ``local`` mode the average of the ranks' means.

    Collectives per call: one ``all_reduce`` before the sweep (the global batch size, and a status
    that makes every rank raise where one rank's shard is empty); then ``local`` and ``exact`` one
    ``all_reduce`` per (dtype, device) of the directions;
    ProxProp in ``exact`` mode: the batch size, one per proximal stage, one per vjp of a weight
    stage it takes explicitly (the last), and the loss.
    """

    def __init__(self, chain: Chain | nn.Sequential, objective: Callable[[Tensor, Any], Tensor],
                 rule: Rule | None = None, mode: str = "exact", group: Any = None,
                 regularizer: Regularizer | Sequence[Regularizer | None] | None = None):
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("mg.distributed.Oracle: no process group; call "
                               "torch.distributed.init_process_group(...) first (torchrun sets the "
                               "environment for init_process_group('gloo') or ('nccl'))")
        self.group = group
        self.mode = mode
        self._plan: str | None = None
        self._stages_checked: tuple | None = None
        try:  # an error on one rank must reach the others, which would otherwise wait in a collective
            if mode not in MODES:
                raise ValueError(f"mg.distributed.Oracle: mode must be one of {MODES}, got {mode!r}")
            super().__init__(chain, objective, rule, regularizer)
            self.local_rule = self.rule
            self._check_plan()
            mine = _fingerprint(self.chain, objective, self.local_rule, mode)
        except Exception as err:  # noqa: BLE001 - reported to every rank, then re-raised here
            with contextlib.suppress(FingerprintError):
                _agree({"error": f"{type(err).__name__}: {err}"}, group)
            raise
        _agree(mine, group)
        self._stages_checked = self.chain.stages

    def _check_plan(self) -> None:
        """Decide how ``exact`` mode splits this rule over ranks (or refuse it)."""
        if self.mode != "exact":
            self._plan = "local"
            return
        plan = _exact_plan(self.local_rule, self.objective, self.chain.stages, self._regularizers())
        if plan != self._plan:
            self._plan = plan
            rule = self.local_rule
            self.rule = rule if plan == "weighted" else Rule(
                objective=_ShardObjective(rule.objective), state=rule.state, weight=rule.weight)

    def _call(self, x: Tensor | None, y: Any) -> _oracle.OracleResult:
        group = self.group
        stages = self.chain.stages
        if stages is not self._stages_checked:  # the model changed: the ranks agree again
            _agree(_fingerprint(self.chain, self.objective, self.local_rule, self.mode), group)
            self._stages_checked = stages
        if self.mode == "exact":
            self._check_plan()  # a batch norm may have been put in train mode since
        x0 = self.chain.input(x)
        n = x0.shape[0] if x0.dim() > 0 else 1
        h = self.objective
        ignored = self.mode == "exact" and isinstance(h, nn.CrossEntropyLoss) and isinstance(y, Tensor) \
            and not y.is_floating_point() and bool((y == h.ignore_index).any())
        # One all-reduce before the sweep: the global batch size, and what would make one rank raise
        # alone (an empty shard, ignored labels), so that every rank raises instead of waiting.
        status = torch.tensor([float(n), float(n == 0), float(ignored)], dtype=torch.float64,
                              device=self._device())
        dist.all_reduce(status, group=group)
        total, empty, ignored_anywhere = status.tolist()
        if empty:
            raise ValueError(f"mg.distributed.Oracle: {int(empty)} rank(s) got an empty shard of this "
                             f"batch (global batch {int(total)}); give every rank at least one sample")
        if ignored_anywhere:
            raise NotImplementedError(
                f"mg.distributed.Oracle(mode='exact'): nn.CrossEntropyLoss averages over the labels "
                f"that are not ignore_index={h.ignore_index}, a count over the global batch; use "
                f"mode='local'")
        if self._plan in ("scaled", "reduced"):
            self.rule.objective.k = n / total
            self._batch_sum = self._sum_shards if self._plan == "reduced" else None
            result = super()._call(x, y)
            return self._reduce(result, weight=1.0, loss_weight=n / total, divide=False,
                                directions=self._plan == "scaled")
        result = super()._call(x, y)
        weight = float(n) if self._plan == "weighted" else 1.0
        return self._reduce(result, weight=weight, loss_weight=weight, divide=True)

    def _device(self) -> torch.device:
        ref = self.chain.reference()
        backend = dist.get_backend(self.group)
        if backend == "nccl" and (ref is None or ref.device.type != "cuda"):
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu") if ref is None else ref.device

    def _sum_shards(self, tensors: list[Tensor]) -> list[Tensor]:
        """The sums over every shard's samples of per-shard sums (``Site.batch_sum``): one
        all-reduce for the list."""
        if not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=self.group)
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors,
                                                   strict=True)]

    def _reduce(self, result: _oracle.OracleResult, weight: float, loss_weight: float,
                divide: bool, directions: bool = True) -> _oracle.OracleResult:
        """``d = sum_r a_r d_r`` (divided by ``sum_r a_r`` when ``divide``) in one all-reduce per
        (dtype, device) bucket; the loss and the weights ride in the loss's bucket. With
        ``directions=False`` (already summed over the shards in the sweep) only the loss."""
        flat = [(t, name, d) for t, ds in enumerate(result.directions) if ds for name, d in ds.items()] \
            if directions else []
        loss = result.loss
        buckets: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        for _, _, d in flat:
            buckets.setdefault((d.dtype, d.device), []).append(d)
        key = (loss.dtype, self._device())
        extra = torch.tensor([loss_weight * float(loss), weight], dtype=key[0], device=key[1])
        buckets.setdefault(key, [])
        reduced: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
        total = 1.0
        loss_out = loss
        for k, ds in buckets.items():
            parts = [d.reshape(-1) * weight if weight != 1.0 else d.reshape(-1) for d in ds]
            if k == key:
                parts.append(extra)
            buf = torch.cat(parts)
            dist.all_reduce(buf, group=self.group)
            if k == key:
                total = float(buf[-1]) if divide else 1.0
                loss_out = (buf[-2] / total).to(loss.dtype).to(loss.device)
                buf = buf[:-2]
            reduced[k] = list(buf.split([d.numel() for d in ds]))
        if divide and total != 1.0:
            reduced = {k: [b / total for b in bs] for k, bs in reduced.items()}
        if not directions:
            return dataclasses.replace(result, loss=loss_out.detach())
        it = {k: iter(bs) for k, bs in reduced.items()}
        directions: list[dict[str, Tensor] | None] = [None if ds is None else {} for ds in result.directions]
        for t, name, d in flat:
            directions[t][name] = next(it[(d.dtype, d.device)]).view_as(d)  # type: ignore[index]
        return dataclasses.replace(result, loss=loss_out.detach(), directions=directions)


def shard(n: int, rank: int | None = None, world: int | None = None, seed: int = 0, epoch: int = 0,
          shuffle: bool = True) -> Tensor:
    """The indices of ``range(n)`` this rank holds for one epoch, like ``DistributedSampler``:
    one permutation from ``(seed, epoch)`` shared by all ranks, split into contiguous parts whose
    sizes differ by at most one (no sample repeated or dropped: the shards may be unequal, which
    ``exact`` mode handles).

    Args:
        n: the dataset (or global batch) size.
        rank: defaults to the process group's.
        world: defaults to the process group's.
        seed: with ``epoch``, the permutation, the same on every rank.
        epoch: with ``seed``, the permutation.
        shuffle: permute first (else contiguous shards of ``0..n-1``).
    """
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"shard: rank must be in [0, {world}), got {rank}")
    order = (torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle
             else torch.arange(n))
    return order.tensor_split(world)[rank]


def batches(n: int, batch_size: int, seed: int = 0, epoch: int = 0, rank: int | None = None,
            world: int | None = None) -> Iterator[Tensor]:
    """This rank's share of each global mini-batch of one epoch: the global batches are the same
    on every rank (``batch_size`` samples each, from a ``(seed, epoch)`` permutation, the last one
    smaller) and each is split over the ranks into parts whose sizes differ by at most one, so
    ``exact`` mode takes the single-process run's steps. ``rank`` and ``world`` default to the
    process group's."""
    rank = dist.get_rank() if rank is None else rank
    world = dist.get_world_size() if world is None else world
    if not 0 <= rank < world:
        raise ValueError(f"batches: rank must be in [0, {world}), got {rank}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
    for idx in order.split(batch_size):
        yield idx.tensor_split(world)[rank]
