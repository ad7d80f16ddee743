"""``Oracle``: a chain, an objective and a rule, used like ``loss.backward()`` (DESIGN sections 2, 8)."""

from __future__ import annotations

import contextlib
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor, nn

from .chain import Chain, Handover
from .losses import Regularizer, check_objective, finite_gradient
from .rules import Rule, backprop
from .rules.grad import plain_gradient, plain_vjp
from .solvers import CAP
from .sweep import NonFiniteError, all_finite, check_objective_signal, record, sweep
from .types import InexactSolveWarning, Signal, StageInfo, Weights

__all__ = ["NonFiniteError", "Oracle", "OracleResult"]


@dataclass
class OracleResult:
    """What one call of :meth:`Oracle.backward` or :meth:`Oracle.step` computed.

    Attributes:
        loss: ``h(x_tau) + sum_t r_t(w_t)`` at the current weights (a detached scalar tensor).
        output: ``x_tau`` (detached).
        directions: per stage, ``d_t`` as ``{parameter name: tensor}``; ``None`` for stages
            without weights.
        steps: per stage, the rule's own step ``s_t`` in ``w_t^+ = w_t - s_t d_t``.
        info: per stage, what the state and weight solves did.
        input_signal: ``signal_0`` when the input required grad (network inversion), else None.
        input_grad: what :meth:`Oracle.backward` accumulates into ``x.grad``: ``signal_0`` read
            with a unit ``beta``, i.e. ``lambda_0`` for dual rules (backprop, Moreau, Fenchel: the
            gradient in the limit) and the move ``x_0 - x_0^+`` for target rules (target prop,
            AL, penalty backprop), whatever the rule's own ``beta``: the step ``x <- x - x.grad``
            lands on the target, as ``Oracle.step`` lands on ``w^+``. In ``x``'s dtype.
    """

    loss: Tensor
    output: Tensor
    directions: list[Weights | None]
    steps: list[float | None]
    info: list[StageInfo]
    input_signal: Signal | None = None
    input_grad: Tensor | None = None


class Accumulated(OracleResult):
    """What :meth:`Oracle.backward` returns: an :class:`OracleResult` whose directions may be the
    very tensors now in ``p.grad`` (where ``.grad`` was None, the direction is handed over, not
    copied, as autograd hands over its gradient buffer).

    Reading :attr:`directions` after one of them was changed in place (a second ``backward``
    accumulating into ``.grad``, ``clip_grad_norm_``, ``zero_grad(set_to_none=False)``) raises
    instead of returning the changed values: the version counters of the tensors are compared to
    the ones they had when ``backward`` returned. Use ``oracle(x, y)`` for directions of your own.
    """

    _versions: tuple[tuple[int, str, Tensor, int], ...] = ()

    @property  # type: ignore[override]
    def directions(self) -> list[Weights | None]:
        for t, name, d, version in self._versions:
            if d._version != version:
                raise RuntimeError(
                    f"OracleResult.directions: the direction of stage {t + 1}, parameter {name!r}, is "
                    f"the tensor Oracle.backward put in .grad, and it was modified in place since "
                    f"(version {d._version}, was {version}: another backward, a gradient clip or "
                    f"zero_grad(set_to_none=False)). Clone the directions before .grad changes, or "
                    f"take them from oracle(x, y), which leaves .grad alone.")
        return self._directions

    @directions.setter
    def directions(self, value: list[Weights | None]) -> None:
        self._directions = value

    def _plain(self) -> OracleResult:
        """The same fields as a plain :class:`OracleResult`, without the guard."""
        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "directions"}
        return OracleResult(directions=self._directions, **values)

    def __repr__(self) -> str:
        return repr(self._plain()).replace("OracleResult(", "Accumulated(", 1)

    def __eq__(self, other: object) -> bool:
        return self._plain() == (other._plain() if isinstance(other, Accumulated) else other)

    __hash__ = None  # type: ignore[assignment]

    def __reduce__(self) -> Any:
        # A copy (deepcopy, pickle, torch.save) holds tensors of its own, not .grad: a plain result.
        return self._plain().__reduce__()

    @classmethod
    def of(cls, result: OracleResult) -> Accumulated:
        new = cls(**{f.name: getattr(result, f.name) for f in fields(result)})
        new._versions = tuple((t, n, d, d._version) for t, ds in enumerate(new._directions) if ds
                              for n, d in ds.items())
        return new


class Oracle:
    """A first-order oracle on ``h(f(w, x_0)) + sum_t r_t(w_t)`` computed by one backward sweep.

    Args:
        chain: a :class:`~moreaugrad.Chain` (an ``nn.Sequential`` is wrapped in one).
        objective: ``h(output, target) -> scalar``, e.g. :class:`~moreaugrad.losses.CrossEntropy`.
        rule: the rule per line of the sweep (default :func:`~moreaugrad.rules.backprop`). A rule
            with a method ``finish(tape, result) -> SweepResult`` has it called after the sweep, on
            the recorded tape, to give the final directions, steps and info (the roll-out of
            :mod:`moreaugrad.second_order`).
        regularizer: ``r_t`` for every stage (e.g. ``L2(1e-6)``), or a sequence with one entry (or
            ``None``) per stage.

    Example:
        >>> oracle = Oracle(chain, losses.CrossEntropy())
        >>> opt.zero_grad(); oracle.backward(x, y); opt.step()
    """

    def __init__(self, chain: Chain | nn.Sequential, objective: Callable[[Tensor, Any], Tensor],
                 rule: Rule | None = None,
                 regularizer: Regularizer | Sequence[Regularizer | None] | None = None):
        self.chain = chain if isinstance(chain, Chain) else Chain(chain)
        check_objective(objective)
        self.objective = objective
        self._losses: list[float] = []
        self._warned_growth = False
        self._warned_inexact = False
        self._checked: tuple | None = None
        self._connect: tuple[tuple, list[bool], bool] | None = None
        # A data-parallel exact oracle (mg.distributed) sums over every shard's samples through it.
        self._batch_sum: Callable[[list[Tensor]], list[Tensor]] | None = None
        self.rule = backprop() if rule is None else rule
        if not isinstance(self.rule, Rule):
            raise TypeError(f"Oracle: rule must be a moreaugrad.rules.Rule (e.g. "
                            f"mg.rules.backprop()), got {type(self.rule).__name__}")
        tau = len(self.chain)
        self._per_stage = isinstance(regularizer, Sequence)
        if regularizer is None or not isinstance(regularizer, Sequence):
            self.regularizers = [regularizer] * tau
        elif len(regularizer) != tau:
            raise ValueError(f"Oracle: regularizer must have one entry per stage ({tau}), got "
                             f"{len(regularizer)}")
        else:
            self.regularizers = list(regularizer)
        for r in self.regularizers:
            if r is not None and not (callable(r) and hasattr(r, "grad")):
                raise TypeError(f"Oracle: a regularizer must be callable with a .grad method "
                                f"(e.g. mg.losses.L2(1e-6)), got {type(r).__name__}")

    def _check_input(self, x: Tensor) -> None:
        if x.dim() == 0 or x.shape[0] == 0:
            raise ValueError(f"Oracle: the batch is empty (x has shape {tuple(x.shape)}); a chain's "
                             f"input needs a leading batch dimension of at least one sample")
        ref = self.chain.reference()
        if ref is None:
            return
        # An integer input (token ids into an embedding) has no dtype to match and no signal.
        if x.is_floating_point() and x.dtype != ref.dtype:
            raise TypeError(f"Oracle: input dtype {x.dtype} does not match the chain's dtype "
                            f"{ref.dtype}; convert one of them (e.g. x.to({ref.dtype}))")
        if x.device != ref.device:
            raise TypeError(f"Oracle: input is on {x.device} but the chain is on {ref.device}")

    def _check_materialized(self) -> None:
        """A model built on the ``meta`` device has shapes but no values: refuse it by name."""
        chain = self.chain
        if not any(t.is_meta for t in (*chain.parameters(), *chain.buffers())):
            return
        for kind, named in (("parameter", chain.named_parameters), ("buffer", chain.named_buffers)):
            for name, t in named():
                if t.is_meta:
                    name = name.removeprefix("model.")
                    raise ValueError(
                        f"Oracle: the model's {kind} {name!r} is on the meta device (it has a shape "
                        f"but no values); call model.to_empty(device=...) and initialise it (e.g. "
                        f"reset_parameters() or load_state_dict) before using the oracle")

    def _fusable(self) -> tuple[list[bool], bool]:
        """Per stage, whether it and the stage before both take plain vjps, so the sweep fuses
        them into one autograd call (``sweep.fused_vjp``), and whether the objective may join the
        top stage's call (``grad h`` and a top stage of plain vjps; the call also asks that ``h``
        be a known loss, ``losses.finite_gradient``); kept while the stages are the same. Never
        for a rule with ``finish``: its pass after the sweep reads the whole tape."""
        key = (self.chain.stages, self.rule)
        if hasattr(self.rule, "finish"):
            return [False] * len(key[0]), False
        if self._connect is None or any(a is not b for a, b in zip(self._connect[0], key, strict=True)):
            stages = key[0]
            # A parameter two stages share (tied weights) must reach each stage's vjp on its own:
            # one autograd call would hand both stages the whole gradient. Distinct rows of one
            # parameter (a control chain's w_t = controls[t]) are distinct views, so they may fuse.
            owners = Counter((id(sl.param), sl.index) for st in stages for sl in st.slots)
            whole = {id(sl.param) for st in stages for sl in st.slots if sl.index is None}
            plain = [plain_vjp(self.rule, s, len(stages)) and all(owners[(id(sl.param), sl.index)] == 1 and (
                sl.index is None or id(sl.param) not in whole) for sl in s.slots) for s in stages]
            self._connect = (key, [t > 0 and plain[t] and plain[t - 1] for t in range(len(plain))],
                             plain_gradient(self.rule) and plain[-1])
        return self._connect[1:]

    def _regularizers(self) -> list[Regularizer | None]:
        tau = len(self.chain)
        if len(self.regularizers) == tau:
            return self.regularizers
        if self._per_stage:
            raise ValueError(f"Oracle: the chain now has {tau} stages but regularizer has "
                             f"{len(self.regularizers)} entries, one per stage")
        return [self.regularizers[0]] * tau

    def _run(self, x: Tensor | None, y: Any) -> OracleResult:
        with self.chain.pinned() as stages:
            if stages is not self._checked:  # the model changed: check its tensors again
                self._check_materialized()
                self._checked = stages
            return self._call(x, y)

    def _call(self, x: Tensor | None, y: Any) -> OracleResult:
        x = self.chain.input(x)
        self._check_input(x)
        if (x.is_floating_point() or x.is_complex()) and not all_finite(x):
            raise NonFiniteError(f"Oracle: the input x is not finite "
                                 f"({int((~torch.isfinite(x)).sum())} of {x.numel()} entries)")
        # Half precision: the sweep runs in float32, outside autocast, as autocast itself upcasts
        # reductions; in bf16/fp16 a residual tau lambda or a tolerance is below the rounding of x.
        compute = torch.float32 if x.dtype in HALF else None
        if x.is_inference():  # made under inference_mode: a normal tensor can enter autograd
            with torch.inference_mode(False):
                x = x.clone()
        autocast = x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)
        # The oracle takes its own derivatives, also inside torch.no_grad() (an evaluation loop).
        with torch.autocast(x.device.type, enabled=False) if autocast else contextlib.nullcontext(), \
                torch.inference_mode(False), torch.enable_grad():
            connect, fuse_objective = self._fusable()
            # Only a known loss of the output alone joins the top segment: a callable may close over
            # the weights (then autograd would differentiate them there), or have an infinite
            # gradient at a finite loss that a ReLU below would hide.
            fuse_objective = fuse_objective and finite_gradient(self.objective)
            tape = record(self.chain, x, self._regularizers(), input_signal=x.requires_grad,
                          compute=compute, connect=connect, batch_sum=self._batch_sum)
            finish = hasattr(self.rule, "finish")
            with _objective_named(fuse_objective, tape, self.objective, y):
                out = sweep(tape, self.rule, self.objective, y, release=not finish,
                            fuse_objective=fuse_objective)
            # Hook: a rule whose step needs a pass after the sweep (the forward roll-out of a
            # second-order step, 003 Algo 4) has finish(tape, result) -> result with its directions.
            if finish:
                out = self.rule.finish(tape, out)
        loss = out.loss
        for site in tape.sites:
            if site.regularizer is not None:
                loss = loss + sum(site.regularizer(w.detach()) for w in site.w.values())
        with _objective_named(fuse_objective, tape, self.objective, y):
            try:
                directions = [None if u is None else _in_param_dtypes(stage, u.direction)
                              for stage, u in zip(self.chain.stages, out.directions, strict=True)]
            except UnderflowError:  # a non-finite loss is the first error to report
                _check_loss(loss)
                raise
            _check_finite(loss, directions)
        self._warn_inexact(out.info, tape.sites)
        # signal_0, like every signal, was checked for finiteness by the sweep.
        return OracleResult(
            loss=loss.detach(),
            output=tape.output.detach(),
            directions=directions,
            steps=[None if u is None else u.step for u in out.directions],
            info=out.info,
            input_signal=out.signals[0] if x.requires_grad else None,
            input_grad=out.signals[0].dual(tape.sites[0].x_prev.detach()).to(x.dtype)
            if x.requires_grad else None,
        )

    def __call__(self, x: Tensor | None = None, y: Any = None) -> OracleResult:
        """The oracle itself: loss, directions, signals and solve reports, with no side effect on
        ``.grad`` or the weights (the forward pass still updates buffers such as batch-norm
        statistics, as any forward does)."""
        return self._run(x, y)

    def backward(self, x: Tensor | None = None, y: Any = None) -> Accumulated:
        """Accumulate each stage's direction ``d_t`` into ``p.grad``, like ``loss.backward()``.

        If ``x`` requires grad, ``signal_0`` is returned as ``result.input_signal`` and
        ``result.input_grad`` (``lambda_0`` for dual rules, ``x_0 - x_0^+`` for target rules; see
        :class:`OracleResult`) is accumulated into ``x.grad``. For a chain built from dynamics,
        ``x`` defaults to the stored ``x0``.
        """
        with self.chain.pinned() as stages:
            result = self._run(x, y)

        def census() -> tuple[set[int], Counter[int]]:
            """Parameters with one direction in this call, and how many of the result's tensors
            sit on each storage (counted only if a whole direction may be handed over)."""
            entries = Counter(id(s.param) for st, d in zip(stages, result.directions, strict=True) if d
                              for s in st.slots if s.name in d)
            shared = [d for ds in result.directions if ds for d in ds.values()]
            signal_0 = getattr(result.input_signal, "value", None)
            shared += [t for t in (result.input_grad, signal_0) if t is not None]
            return {p for p, n in entries.items() if n == 1}, Counter(Handover.storage(t) for t in shared)

        handover = Handover(census)
        for stage, d in zip(stages, result.directions, strict=True):
            if d is not None:
                stage.accumulate(d, handover)
        handover.flush()
        if result.input_signal is not None:
            # Accumulates into x.grad for a leaf and flows on to the leaves of a non-leaf x.
            torch.autograd.backward(self.chain.input(x), result.input_grad)
        return Accumulated.of(result)

    def step(self, x: Tensor | None = None, y: Any = None) -> OracleResult:
        """The paper's own update ``w_t <- w_t - s_t d_t = w_t^+`` for every stage (000 Algo 6).

        ``.grad`` is left untouched. The returned loss is the one before the update. A loss that
        grew at each of ``GROWTH_STEPS`` calls in a row, to more than twice where the run of
        growth began, is reported once per oracle by a :class:`DivergenceWarning` (the steps are
        too large for this rule: e.g. ``target_prop`` with a small ``kappa``).
        """
        result = self._run(x, y)
        for stage, d, s in zip(self.chain.stages, result.directions, result.steps, strict=True):
            if d is not None:
                stage.update(d, s)
        self._watch_growth(float(result.loss))
        return result

    def _warn_inexact(self, info: list[StageInfo], sites: list[Any]) -> None:
        """One :class:`~moreaugrad.InexactSolveWarning` per oracle for a solve that stopped on its
        iteration cap (fixed-step solves, which the user asked for, are not inexact)."""
        if self._warned_inexact:
            return
        for site, stage in zip(sites, info, strict=True):
            objective = stage.extra.get("objective")
            for where, i in (("objective", objective), ("state", stage.state), ("weight", stage.weight)):
                if i is not None and i.converged is False and CAP in i.message:
                    self._warned_inexact = True
                    line = "objective" if where == "objective" else f"{where} subproblem of {site.label}"
                    warnings.warn(f"Oracle: the {line} stopped on its iteration cap ({i.method}, "
                                  f"{i.iterations} iterations, residual {i.residual:.3g}); its answer is "
                                  f"inexact (see result.info; reported once per oracle)",
                                  InexactSolveWarning, stacklevel=4)
                    return

    def _watch_growth(self, loss: float) -> None:
        losses = self._losses
        losses.append(loss)
        del losses[:-GROWTH_STEPS - 1]
        grew = len(losses) > GROWTH_STEPS and all(b > a for a, b in zip(losses, losses[1:], strict=False))
        if grew and losses[-1] > 2 * losses[0] and not self._warned_growth:
            self._warned_growth = True
            warnings.warn(f"Oracle.step: the loss grew at each of the last {GROWTH_STEPS} steps, from "
                          f"{losses[0]:.4g} to {losses[-1]:.4g}; this rule's steps diverge here "
                          f"(reported once per oracle)", DivergenceWarning, stacklevel=3)


GROWTH_STEPS = 5


class DivergenceWarning(UserWarning):
    """``Oracle.step`` keeps increasing the loss: the rule's steps are too large for the problem."""


HALF = (torch.float16, torch.bfloat16)


class UnderflowError(FloatingPointError):
    """A direction computed in float32 that is 0 in the parameters' dtype (float16's range ends
    at 6e-8): reported, never written into ``.grad`` as a zero."""


def _in_param_dtypes(stage: Any, direction: Weights) -> Weights:
    """The directions in their parameters' dtypes (a float32 sweep of a half-precision model)."""
    if all(s.param.dtype == direction[s.name].dtype for s in stage.slots if s.name in direction) \
            and len(direction) <= len(stage.slots):
        return direction  # the common case: nothing to cast
    dtypes = {s.name: s.param.dtype for s in stage.slots}
    out = {}
    for n, d in direction.items():
        dtype = dtypes.get(n, d.dtype)
        out[n] = d if dtype == d.dtype else d.to(dtype)
        if out[n] is not d and bool(d.abs().max() > 0) and not bool(out[n].abs().max() > 0):
            raise UnderflowError(
                f"Oracle: the direction of stage {stage.index + 1}, parameter {n!r}, underflows to 0 "
                f"in {dtype} (max |d| = {float(d.abs().max()):.3g}); use bfloat16 or float32 for "
                f"this model, or steps whose directions do not decay along the chain")
    return out


@contextlib.contextmanager
def _objective_named(fused: bool, tape: Any, h: Any, y: Any) -> Iterator[None]:
    """Where the objective's gradient was taken inside the top segment's autograd call (never
    formed), a non-finite loss, direction or signal is traced back to it: if ``grad h(x_tau)`` is
    itself not finite, that is the error raised, naming the stage it enters, as the unfused sweep
    does (it checks that signal first)."""
    try:
        yield
    except NonFiniteError as err:
        if fused:
            device = tape.output.device.type
            autocast = device in ("cpu", "cuda") and torch.is_autocast_enabled(device)
            with torch.autocast(device, enabled=False) if autocast else contextlib.nullcontext(), \
                    torch.inference_mode(False), torch.enable_grad():
                check_objective_signal(tape, h, y, cause=err)
        raise


SMALL_DIRECTION = 4096  # entries: below this a direction is concatenated for the finiteness check


def _check_loss(loss: Tensor) -> None:
    if not torch.isfinite(loss):
        raise NonFiniteError(f"Oracle: the loss is not finite ({loss.item()})")


def _check_finite(loss: Tensor, directions: list[Weights | None]) -> None:
    """Raise :class:`NonFiniteError` for a non-finite loss, else for the first non-finite direction."""
    flat = [(t, n, d) for t, ds in enumerate(directions) if ds for n, d in ds.items()]
    # One host sync for the common, finite case (on a GPU each costs a transfer and a wait): the
    # loss, a sum per large direction and one sum over the small ones concatenated (a control
    # chain's hundred rows: one reduction, not a hundred).
    small = [d.reshape(-1) for _, _, d in flat if d.numel() <= SMALL_DIRECTION]
    sums = [d.sum() for _, _, d in flat if d.numel() > SMALL_DIRECTION]
    if small:
        sums.append(torch.cat(small).sum() if len(small) > 1 else small[0].sum())
    # The loss joins the directions' device (an objective may return it on another).
    sums.insert(0, loss.detach().reshape(()).to(sums[0].device) if sums else loss.detach().reshape(()))
    if torch.isfinite(torch.stack(sums) if len(sums) > 1 else sums[0]).all():
        return
    _check_loss(loss)
    for t, n, d in flat:
        if not torch.isfinite(d).all():
            raise NonFiniteError(f"Oracle: the direction of stage {t + 1}, parameter {n!r}, is not "
                                 f"finite ({int((~torch.isfinite(d)).sum())} of {d.numel()} "
                                 f"entries)")
