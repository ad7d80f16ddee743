"""The forward tape and the one backward sweep (DESIGN section 2; 000 Algo 1-2; 001 Algo 1-2).

The forward pass records, for each stage, its input ``x_{t-1}``, its weights ``w_t`` and its output
``x_t`` with the stage's *local* autograd graph. A rule that needs the linearisation asks the site
for a vjp, which runs on that local graph (no re-evaluation); a rule that solves an inner problem
re-evaluates ``phi_t`` through :meth:`Site.phi`, which never touches the module's buffers.

``sweep`` walks ``t = tau..1`` and never branches on which oracle it runs: it asks the rule chosen
for each line (objective, weight, state) and records what it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .chain import Chain, Stage
from .rules.grad import Grad, scalar_loss
from .types import Dual, Signal, StageInfo, Weights, WeightUpdate

if TYPE_CHECKING:
    from .losses import Regularizer
    from .rules import Rule


BatchSum = Callable[[list[Tensor]], list[Tensor]]  # sums over every shard of a data-parallel batch


class NonFiniteError(FloatingPointError):
    """A loss, signal or direction that is NaN or infinite; it is reported, never used.

    Defined here, where the sweep checks every signal, and re-exported as
    ``moreaugrad.NonFiniteError`` and ``moreaugrad.oracle.NonFiniteError``.
    """


class Placed:
    """A stage's position in the chain, for schedules and messages (a :class:`Site`, or a probe
    of the stage before the forward pass); needs ``stage``."""

    stage: Stage

    @property
    def t(self) -> int:
        """The stage's position ``t`` in ``1..tau`` (the papers' index)."""
        return self.stage.index + 1

    @property
    def label(self) -> str:
        """``stage t (Type)``, for messages."""
        return f"stage {self.t} ({self.stage.description})"


@dataclass(eq=False)
class Site(Placed):
    """One recorded stage: ``x = phi_t(w, x_prev)`` with its local graph.

    Attributes:
        stage: the stage (its module decides which closed forms apply).
        x_prev: ``x_{t-1}``, a leaf; it requires grad when the state rule may need a vjp.
        x: ``x_t``, attached to ``x_prev`` and ``w`` by the local graph.
        w: ``w_t`` as recorded (attached to the parameters).
        horizon: ``tau``, the number of stages, for schedules.
        regularizer: ``r_t``, or None.
        last_weighted: no later stage has weights (ProxProp keeps this stage explicit, 004 eq. 12).
        rng: the random-number state before the forward pass of a stochastic stage, else None.
        batch_sum: a sum over the samples of every shard of a data-parallel batch (one all-reduce
            for a list of tensors, :mod:`moreaugrad.distributed`), applied to the weight parts of
            vjps and to the sums over samples inside weight solves; None in one process.
        attached: ``x_prev`` is the previous site's ``x`` itself, not a detached copy: the two
            stages' graphs are one, so a fused segment takes their vjps in one autograd call.
            Once the sweep has taken it, the states inside the segment are released
            (``x``/``x_prev`` None), as ``loss.backward()`` frees them.
    """

    stage: Stage
    x_prev: Tensor
    x: Tensor
    w: Weights
    horizon: int
    regularizer: Regularizer | None = None
    last_weighted: bool = False
    rng: tuple[Tensor, Tensor | None] | None = None
    batch_sum: Callable[[list[Tensor]], list[Tensor]] | None = None
    attached: bool = False
    _cache: tuple[Tensor, Any] | None = field(default=None, repr=False)

    @property
    def needs_state(self) -> bool:
        return self.x_prev.requires_grad

    @cached_property
    def unused(self) -> frozenset[str]:
        """The names in ``w`` that ``x_t`` does not depend on in the recorded graph.

        Autograd leaves the ``.grad`` of such a parameter None, so the oracle gives it no direction
        (a zero ``.grad`` would let AdamW's weight decay move it). Found by walking the local graph
        from ``x_t`` to its ``AccumulateGrad`` nodes; a weight that is a view (a dynamics control
        ``controls[t]``) counts as used.
        """
        leaves = {id(w): n for n, w in self.w.items() if w.grad_fn is None}
        if not leaves:
            return frozenset()
        reached: set[int] = set()
        # The node objects themselves, not their ids: a node's Python wrapper may be freed and its
        # id reused by another node's wrapper once nothing holds it.
        # An attached x_prev's own graph belongs to the stages before: the walk stops there.
        seen: set[Any] = set() if self.x_prev.grad_fn is None else {self.x_prev.grad_fn}
        stack = [] if self.x.grad_fn is None else [self.x.grad_fn]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            var = getattr(node, "variable", None)
            if var is not None:
                reached.add(id(var))
            stack.extend(f for f, _ in node.next_functions if f is not None)
        return frozenset(n for i, n in leaves.items() if i not in reached)

    @property
    def groups(self) -> int:
        """How many independent problems a state subproblem splits into: one per sample, unless
        the stage mixes samples (a batch norm in train mode), then one."""
        mixes = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
                    for m in self.stage.module.modules())
        return 1 if mixes or self.x_prev.dim() == 0 else self.x_prev.shape[0]

    def phi(self, w: Weights | None = None, x: Tensor | None = None) -> Tensor:
        """``phi_t(w, x)`` re-evaluated, with the recorded ``w_t`` and ``x_{t-1}`` by default.

        A stage that drew random numbers in the forward pass (dropout in train mode) draws the
        same ones again, so ``phi_t`` is the function that was recorded.
        """
        w = {} if w is None else w
        x = self.x_prev.detach() if x is None else x
        if self.rng is None:
            return self.stage(w, x)
        devices = [self.x.device] if self.x.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            _set_rng(self.rng, self.x.device)
            return self.stage(w, x)

    def summed(self, values: list[Tensor]) -> list[Tensor]:
        """``values`` (sums over this shard's samples) summed over every shard of a data-parallel
        batch (:attr:`batch_sum`), differentiably: gradients pass through unchanged. In one
        process, ``values`` themselves."""
        if self.batch_sum is None:
            return values
        return list(_SumOverShards.apply(self.batch_sum, *values))

    def replicated(self, z: list[Tensor]) -> list[Tensor]:
        """``z``, a variable every shard holds the same copy of: its gradient (from terms that
        :meth:`summed` adds over the shards) is summed over the shards. In one process, ``z``."""
        if self.batch_sum is None:
            return z
        return list(_Replicated.apply(self.batch_sum, *z))

    def vjp(self, lam: Tensor, weights: bool = True) -> tuple[Tensor | None, Weights]:
        """``(d_x phi_t^T lam, d_w phi_t^T lam)`` on the recorded graph.

        With ``weights=True`` one autograd call also takes the input part when the state line will
        need it, and the result is kept for the same ``lam``: backprop costs one vjp per stage.
        ``weights=False`` (a state rule) reuses that result, or takes the input part alone, so a
        weight rule that does not linearise (ProxProp's row solves) costs no weight gradient.
        The weight part is then empty.
        """
        hit = self._cache
        if hit is not None and hit[0] is lam and (hit[1][1] is not None or not weights):
            dx, dws = hit[1]
        else:
            want_w = weights and bool(self.w)
            inputs = ([self.x_prev] if self.needs_state else []) + (list(self.w.values()) if want_w else [])
            if not inputs:
                return None, {}
            grads = torch.autograd.grad(self.x, inputs, lam, retain_graph=True, allow_unused=True)
            dx = grads[0] if self.needs_state else None
            dws = (grads[1:] if self.needs_state else grads) if want_w else None
            if dws is not None and self.batch_sum is not None:
                dws = _summed(self.batch_sum, [dws])[0]
            self._cache = (lam, (dx, dws))
        if dx is None and self.needs_state:
            dx = torch.zeros_like(self.x_prev)
        if dws is None:
            return dx, {}
        return dx, {n: torch.zeros_like(p) if g is None else g
                    for (n, p), g in zip(self.w.items(), dws, strict=True)}


class _SumOverShards(torch.autograd.Function):
    """Forward: the sum over the shards (``batch_sum``); backward: the identity (each shard's
    term gets the gradient of the total)."""

    @staticmethod
    def forward(ctx: Any, batch_sum: BatchSum, *ts: Tensor) -> tuple[Tensor, ...]:
        return tuple(batch_sum([t.detach() for t in ts]))

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        return (None, *grads)


class _Replicated(torch.autograd.Function):
    """Forward: the identity; backward: the gradient summed over the shards (``batch_sum``)."""

    @staticmethod
    def forward(ctx: Any, batch_sum: BatchSum, *ts: Tensor) -> tuple[Tensor, ...]:
        ctx.batch_sum = batch_sum
        return tuple(t.view_as(t) for t in ts)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Any, ...]:
        return (None, *ctx.batch_sum(list(grads)))


@dataclass
class Tape:
    """The forward pass of a chain: its sites and the output ``x_tau``."""

    sites: list[Site]
    output: Tensor


def record(chain: Chain, x: Tensor, regularizers: list[Regularizer | None] | None = None,
           input_signal: bool = False, compute: torch.dtype | None = None,
           connect: list[bool] | None = None,
           batch_sum: Callable[[list[Tensor]], list[Tensor]] | None = None) -> Tape:
    """Run the forward pass once, recording each stage's local graph (000 Algo 1, 001 Algo 1).

    Buffers (BatchNorm running statistics) are updated here, once, and nowhere else. With
    ``compute`` (float32 for a half-precision model), the forward pass is recorded in that dtype
    on copies of the weights, so that every rule and inner solve of the sweep runs in it. Where
    ``connect[t]`` is true, stage ``t`` takes stage ``t - 1``'s output itself as its input
    (:attr:`Site.attached`): the sweep may then fuse their vjps (:func:`fused_vjp`).
    ``batch_sum`` becomes every site's :attr:`Site.batch_sum` (a data-parallel exact oracle).
    """
    if compute is not None and x.is_floating_point():
        x = x.to(compute)
    sites = []
    tau = len(chain)
    regs = regularizers or [None] * tau
    for t, stage in enumerate(chain.stages):
        attached = t > 0 and connect is not None and connect[t] and x.requires_grad
        x_prev = x if attached else x.detach().requires_grad_(t > 0 or input_signal)
        rng = _get_rng(x_prev.device) if _stochastic(stage.module) else None
        try:
            out, w = stage.record(x_prev)
        except RuntimeError as err:
            raise ValueError(f"stage {t + 1}/{tau} ({stage.module!r}) failed on an input of shape "
                             f"{tuple(x_prev.shape)} and dtype {x_prev.dtype}: {err}") from err
        sites.append(Site(stage, x_prev, out, w, tau, regs[t], rng=rng, batch_sum=batch_sum,
                          attached=attached))
        x = out
    weighted_after = False
    for site in reversed(sites):
        site.last_weighted = site.stage.has_weights and not weighted_after
        weighted_after = weighted_after or site.stage.has_weights
    return Tape(sites, x)


NONE_UNUSED: frozenset[str] = frozenset()


def fused_vjp(sites: list[Site], lam: Tensor | None,
              loss: Tensor | None = None) -> tuple[Tensor | None, list[tuple[Tensor | None, ...]]]:
    """The vjps of consecutive stages (``sites`` top first, each but the last attached to the one
    below) in one autograd call, as ``loss.backward()`` takes them: ``(dx, dws)`` with ``dx`` the
    bottom stage's input part (None if it needs none) and ``dws`` each stage's weight parts.
    With ``loss`` (a scalar on the top stage's output) and no ``lam``, the call starts from the
    loss itself: the objective's gradient ``lambda_tau`` is taken in the same call, never formed.

    Only the bottom stage's input and the weights are asked for, so the signals inside the segment
    are never formed and autograd frees each saved tensor once used (no ``retain_graph``): the
    segment's memory is that of ``loss.backward()``. A weight autograd does not reach is
    :attr:`Site.unused`, known here without a graph walk.
    """
    bottom = sites[-1]
    inputs = [bottom.x_prev] if bottom.needs_state else []
    for s in sites:
        inputs += list(s.w.values())
    grads = torch.autograd.grad(sites[0].x if loss is None else loss, inputs, lam, allow_unused=True)
    dx = grads[0] if bottom.needs_state else None
    it = iter(grads[1:] if bottom.needs_state else grads)
    dws = []
    for s in sites:
        dw = tuple(next(it) for _ in s.w)
        s.__dict__["unused"] = NONE_UNUSED if all(g is not None for g in dw) else frozenset(
            n for (n, w), g in zip(s.w.items(), dw, strict=True) if g is None and w.grad_fn is None)
        dws.append(dw)
    if bottom.batch_sum is not None:
        dws = _summed(bottom.batch_sum, dws)
    if dx is None and bottom.needs_state:
        dx = torch.zeros_like(bottom.x_prev)
    return dx, dws


def _summed(batch_sum: Callable[[list[Tensor]], list[Tensor]],
            groups: list[tuple[Tensor | None, ...]]) -> list[tuple[Tensor | None, ...]]:
    """``batch_sum`` of every tensor in ``groups`` (None entries stay None), in one call."""
    flat = batch_sum([g for group in groups for g in group if g is not None])
    it = iter(flat)
    return [tuple(None if g is None else next(it) for g in group) for group in groups]


def _release_interior(segment: list[Site]) -> None:
    """Drop the tape's references to the states inside a fused segment (all but its output and
    its input), so that autograd frees each once used, as in ``loss.backward()``; those sites keep
    ``x`` and ``x_prev`` as None afterwards."""
    for below, above in zip(segment[1:], segment[:-1], strict=True):
        below.x = above.x_prev = None  # type: ignore[assignment]


def _segment(sites: list[Site], top: int) -> list[Site]:
    """The sites from ``top`` down to the first one not attached to the one below it."""
    bottom = top
    while sites[bottom].attached:
        bottom -= 1
    return sites[top:bottom - 1 if bottom > 0 else None:-1]


def _stochastic(module: nn.Module) -> bool:
    if not module._modules:  # a leaf (the common case, and every dynamics step): no walk
        return isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0
    return any(isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0
               for m in module.modules())


def _get_rng(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


@dataclass
class SweepResult:
    """What one backward sweep produced."""

    loss: Tensor
    directions: list[WeightUpdate | None]
    signals: list[Signal | None]  # None inside a fused segment (see sweep)
    info: list[StageInfo]


def sweep(tape: Tape, rule: Rule, h: Callable[..., Tensor], target: Any,
          release: bool = False, fuse_objective: bool = False) -> SweepResult:
    """The backward sweep of DESIGN section 2.

    ``signal_tau = objective(h, x_tau)``; then for ``t = tau..1``:
    ``d_t = weight_rule(site_t, signal_t)`` (if ``w_t`` is not empty) and
    ``signal_{t-1} = state_rule(site_t, signal_t)`` (if ``x_{t-1}`` is a variable).

    Returns the loss, per-stage weight updates, signals ``signal_0..signal_tau`` (``signal_0`` only
    if the input was a variable, else the list starts at ``signal_1``) and per-stage info.

    A run of attached sites (``record(..., connect=)``, where both lines are plain vjps) is a fused
    segment: one autograd call gives its weight parts and the signal below it
    (:func:`fused_vjp`), the weight rule's ``fused`` makes the updates, and the signals inside the
    segment are None: never formed, as ``loss.backward()`` does not form them.

    With ``release`` (the oracle, unless its rule reads the tape afterwards) each site lets go of
    its output, its graph and its vjp cache once both its lines ran, as ``loss.backward()`` frees
    what it has used, and only the last signal is kept (``signal_0`` when the input is a variable):
    the sweep's memory is then one signal and the activations not yet swept.

    ``fuse_objective`` (the objective line is ``grad h`` of a loss whose gradient is finite where
    its value is, :func:`~moreaugrad.losses.finite_gradient`, and the top stage's lines are plain
    vjps) starts the top segment from the loss itself: one autograd call for the objective and the
    segment, as ``loss.backward()``. ``signal_tau`` is then None, never formed.
    """
    tau = len(tape.sites)
    signal: Signal | None
    if fuse_objective and tape.output.requires_grad:  # else no weight and no input below it
        loss, signal, objective_info = scalar_loss(h, tape.output, target), None, None
    else:
        loss, signal, objective_info = rule.objective.objective(h, tape.output, target, tau)
        _check_objective(signal, tape)
    directions: list[WeightUpdate | None] = [None] * tau
    info = [StageInfo() for _ in range(tau)]
    info[-1].extra["objective"] = objective_info
    signals: list[Signal | None] = [signal]
    t = tau - 1
    while t >= 0:
        site = tape.sites[t]
        if site.attached or signal is None:  # the top of a fused segment: one autograd call
            segment = _segment(tape.sites, t)
            _release_interior(segment)
            if signal is None:  # fused with the objective
                dx, dws = fused_vjp(segment, None, loss)
                loss = loss.detach()
            else:
                dx, dws = fused_vjp(segment, signal.dual(site.x.detach()))
            for s, dw in zip(segment, dws, strict=True):
                if s.stage.has_weights:
                    update = rule.weight_for(s).fused(s, dw)
                    directions[s.stage.index] = _without_unused(s, update)
                    info[s.stage.index].weight = update.info
            signals += [None] * (len(segment) - 1)
            if release:
                segment[0].x = None  # type: ignore[assignment]
            site, t = segment[-1], segment[-1].stage.index
            if site.needs_state:
                signal = Dual(dx)
        else:
            if site.stage.has_weights:
                update = _without_unused(site, rule.weight_for(site).weight(site, signal))
                directions[t] = update
                info[t].weight = update.info
            if site.needs_state:
                state = rule.state_for(site).state(site, signal)
                signal = state.signal
                info[t].state = state.info
        if site.needs_state:
            _check_signal(signal, site.x_prev, lambda t=t, site=site: (
                f"entering {tape.sites[t - 1].label}" if t > 0 else f"at the input (from {site.label})"))
            signals = [signal] if release else signals + [signal]
        if release:  # done with this site: its output, graph and cached vjp (x_prev of the first stays)
            site._cache = None
            site.x = None  # type: ignore[assignment]
            if t > 0:
                site.x_prev = None  # type: ignore[assignment]
        t -= 1
    signals.reverse()
    return SweepResult(loss, directions, signals, info)


def _without_unused(site: Site, update: WeightUpdate) -> WeightUpdate:
    """The update without directions for weights ``x_t`` does not use (they keep ``.grad`` None);
    ``r_t(w_t)`` uses every weight, so only an unregularised stage has unused ones."""
    unused = site.unused if site.regularizer is None else frozenset()
    if not unused:
        return update
    return replace(update, direction={n: d for n, d in update.direction.items() if n not in unused})


def check_objective_signal(tape: Tape, h: Callable[..., Tensor], target: Any,
                           cause: BaseException | None = None) -> None:
    """Raise :class:`NonFiniteError` if ``grad h(x_tau)`` is not finite, naming the stage it enters:
    the check of ``signal_tau`` for a sweep that fused the objective into the top segment (its
    gradient never formed), made after that sweep met a non-finite value (``cause``)."""
    _, signal, _ = Grad().objective(h, tape.output, target)
    try:
        _check_objective(signal, tape)
    except NonFiniteError as err:
        raise err from cause


def _check_objective(signal: Signal, tape: Tape) -> None:
    """:func:`_check_signal` for ``signal_tau``, named as entering the top stage."""
    _check_signal(signal, tape.output, lambda: f"entering {tape.sites[-1].label} (from the objective)")


def all_finite(t: Tensor) -> bool:
    """Whether every entry of ``t`` is finite: one sum (no boolean temporary) and, only when the
    sum is not finite (a non-finite entry, or an overflow of the sum), the entrywise test."""
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_signal(signal: Signal, x: Tensor, where: Callable[[], str]) -> None:
    """Raise :class:`NonFiniteError` for a non-finite signal, before any rule uses it (one
    reduction and one host sync per signal; ``where()`` names it, formed only on failure)."""
    lam = signal.dual(x.detach())
    if not all_finite(lam):
        bad = int((~torch.isfinite(lam)).sum())
        raise NonFiniteError(f"the signal {where()} is not finite ({bad} of {lam.numel()} entries)")
