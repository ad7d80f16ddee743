"""Chains of stages ``x_t = phi_t(w_t, x_{t-1})`` built from ``nn.Sequential`` or from dynamics.

DESIGN section 1; 000 Def. 1.1. A :class:`Chain` is an ``nn.Module``, so ``chain.parameters()`` feeds
any ``torch.optim`` optimizer and ``chain(x)`` is the plain forward pass.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from . import trace
from .types import Weights


@dataclass(frozen=True)
class Slot:
    """Where a stage parameter lives: ``param`` itself, or row ``index`` of it (one control per step)."""

    name: str
    param: nn.Parameter
    index: int | None = None

    def value(self) -> Tensor:
        return self.param if self.index is None else self.param[self.index]

    def grad_view(self) -> Tensor:
        if self.param.grad is None:
            self.param.grad = torch.zeros_like(self.param)
        return self.param.grad if self.index is None else self.param.grad[self.index]


class Handover:
    """Which directions one :meth:`Oracle.backward` may put in ``.grad`` as they are, not copied.

    Only parameters that get exactly one direction in the call (``params``; a tied weight gets one
    per stage, and the second would be added in place into the first), and only a tensor that is
    its whole storage, not in a graph, contiguous, in the parameter's dtype and device, whose
    storage no other tensor of the result uses (``storages``: how many of the result's tensors sit
    on each storage). Autograd passes one gradient on unchanged through ``x + b``, so two
    parameters' directions, or a direction and the input's gradient, can be one memory under two
    tensor objects: those are copied. Both sets come from ``census()``, called once, when the first
    whole direction is offered (a control chain's rows never are: they are collected and flushed).
    """

    def __init__(self, census: Callable[[], tuple[set[int], Counter[int]]]):
        self._census = census  # -> (params, storages), taken at the first whole direction offered
        self.rows: dict[int, tuple[Tensor, list[tuple[int, Tensor]]]] = {}

    @functools.cached_property
    def _counted(self) -> tuple[set[int], Counter[int]]:
        return self._census()

    @property
    def params(self) -> set[int]:
        return self._counted[0]

    @property
    def storages(self) -> Counter[int]:
        return self._counted[1]

    @staticmethod
    def storage(t: Tensor) -> int:
        return t.untyped_storage().data_ptr()

    @torch.no_grad()
    def flush(self) -> None:
        """Write the collected rows: ``p.grad`` is their stack when they are every row of ``p`` in
        order and ``.grad`` is None (one new tensor), else one ``index_add_``."""
        for p, items in self.rows.values():
            index = [i for i, _ in items]
            rows = torch.stack([d.to(p.dtype) for _, d in items])
            if p.grad is None and index == list(range(p.shape[0])):
                p.grad = rows
            else:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                p.grad.index_add_(0, torch.tensor(index, device=p.device), rows)
        self.rows.clear()

    def take(self, d: Tensor, p: Tensor) -> bool:
        if id(p) not in self.params:
            return False
        if not (d.layout == torch.strided and not d.requires_grad and d.is_contiguous()
                and d.dtype == p.dtype and d.device == p.device
                and d.untyped_storage().nbytes() == d.numel() * d.element_size()
                and self.storages[self.storage(d)] == 1):
            return False
        self.params.discard(id(p))
        self.storages[self.storage(d)] += 1  # taken: never again
        return True


def plain(module: object) -> bool:
    """Whether ``module`` computes what its type says, so closed forms registered for the type hold.

    False when the module or a submodule is parametrized (``torch.nn.utils.parametrize``, the
    new-style ``weight_norm``/``spectral_norm``) or has forward or forward pre-hooks (which is how
    the old-style ``weight_norm`` and ``spectral_norm`` recompute the weight). Backward hooks do not
    change ``phi_t`` and are ignored, as are global hooks. A non-module (a plain objective function)
    is plain.
    """
    if not isinstance(module, nn.Module):
        return True
    if not module._modules:  # the common leaf module, without walking modules() (hot path)
        return not (module._forward_hooks or module._forward_pre_hooks
                    or parametrize.is_parametrized(module))
    return not any(parametrize.is_parametrized(m) or m._forward_hooks or m._forward_pre_hooks
                   for m in module.modules())


def _other_dtype(t: Tensor, x: Tensor) -> bool:
    """A floating tensor in another floating dtype than ``x`` (to be cast for a float32
    re-evaluation); an integer ``x`` (token ids) never asks for a cast."""
    return t.is_floating_point() and x.is_floating_point() and t.dtype != x.dtype


def _output(module: nn.Module, out: object) -> Tensor:
    """The stage's output tensor. A recurrent module (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``) returns
    ``(output, final state)``: the stage is ``x -> output`` from a zero initial state, and the final
    state is dropped. Any other non-tensor output is refused, naming the module."""
    if isinstance(module, nn.RNNBase):
        return out[0]
    if not isinstance(out, Tensor):
        raise TypeError(f"moreaugrad.Chain: stage {type(module).__name__} returned a "
                        f"{type(out).__name__}, not a tensor; a stage maps one tensor to one tensor "
                        f"(wrap it in a module that returns the tensor to propagate)")
    return out


def _mixed(module: nn.Module, x: Tensor) -> bool:
    """Whether the module's first parameter is in another floating dtype than ``x``."""
    own = module._parameters.values() if not module._modules else module.parameters()  # hot path
    p = next((p for p in own if p is not None), None)
    return p is not None and _other_dtype(p, x)


def _own(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """A leaf module's ``named_parameters()`` without the generator machinery (a hot path)."""
    return ((n, p) for n, p in module._parameters.items() if p is not None)


def _sequential_forward(module: nn.Module) -> bool:
    return type(module).forward is nn.Sequential.forward


class Stage:
    """One stage ``phi_t(w_t, x)`` of a chain.

    Args:
        module: the ``nn.Module`` that computes the stage; rules and closed forms are looked up by
            its type.
        slots: the stage's parameters ``w_t`` (only those that require grad).
        index: ``t - 1``, the position of the stage in the chain.
        fn: for dynamics, ``phi(w, x)`` with ``w`` the control of this step; ``None`` for modules.
    """

    def __init__(self, module: nn.Module, slots: Sequence[Slot], index: int,
                 fn: Callable[[Tensor, Tensor], Tensor] | None = None, name: str | None = None,
                 control: Slot | None = None):
        self.module = module
        self.slots = tuple(slots)
        self.control = control if control is not None else (self.slots[0] if fn is not None else None)
        self.index = index
        self.fn = fn
        self.name = name

    @property
    def inplace(self) -> bool:
        """Whether the stage may write into its input, which would overwrite the recorded
        ``x_{t-1}`` that rules re-read (and raise autograd's leaf error): any of its modules is in
        place (after a pass-through op such as ``Flatten`` or an eval-mode ``Dropout``, an in-place
        op still writes into the input). Read at every call, so it follows the module as it is now."""
        if not self.module._modules:
            return getattr(self.module, "inplace", False) is True
        return any(getattr(m, "inplace", False) is True for m in self.module.modules())

    def __repr__(self) -> str:
        return f"Stage({self.index}, {self.type_name})"

    @property
    def type_name(self) -> str:
        return type(self.module).__name__

    @property
    def description(self) -> str:
        """``Type``, or ``name: Type`` for a stage of a traced model (``layer2.0: BasicBlock``)."""
        if self.name is None:
            return self.type_name
        return self.name if ":" in self.name else f"{self.name}: {self.type_name}"

    @property
    def has_weights(self) -> bool:
        return bool(self.slots)

    def weights(self) -> Weights:
        """The current ``w_t`` as tensors attached to the parameters (for the recorded graph)."""
        return {s.name: s.value() for s in self.slots}

    def record(self, x: Tensor) -> tuple[Tensor, Weights]:
        """The forward pass of the stage, the only call that may update buffers (BatchNorm).

        With ``x`` in another floating dtype than the parameters (a half-precision model recorded
        in float32), the weights are recorded as copies in ``x``'s dtype, leaves of the local
        graph, and the buffers' updates are written back in their own dtype.
        """
        if self.inplace:
            x = x.clone()
        w = self.weights()
        if not any(_other_dtype(v, x) for v in w.values()) and not _mixed(self.module, x):
            out = (self.fn(self._w(w), x) if self.fn is not None
                   else _output(self.module, self.module(x)))
            return out, w
        w = {n: v.detach().to(x.dtype).requires_grad_(True) for n, v in w.items()}
        if self.fn is not None:
            return self.fn(self._w(w, x), x), w
        buffers = dict(self.module.named_buffers())
        state = {k: b.to(x.dtype) if _other_dtype(b, x) else b for k, b in buffers.items()}
        state.update({k: p.detach().to(x.dtype) for k, p in self.module.named_parameters()
                      if k not in w and _other_dtype(p, x)})
        state.update(w)
        out = _output(self.module, functional_call(self.module, state, (x,)))
        with torch.no_grad():
            for k, b in buffers.items():
                if state[k] is not b:
                    b.copy_(state[k])
        return out, w

    def __call__(self, w: Weights, x: Tensor) -> Tensor:
        """Re-evaluate ``phi_t(w, x)`` for a rule, leaving the module's buffers untouched.

        Missing entries of ``w`` take the stage's current parameters (in ``x``'s dtype).
        """
        if self.inplace:
            x = x.clone()
        if self.fn is not None:
            return self.fn(self._w(w, x), x)
        # Cloned buffers absorb the running-statistics update a train-mode BatchNorm would make.
        state = {k: b.to(x.dtype) if _other_dtype(b, x) else b.clone()
                 for k, b in self.module.named_buffers()}
        if _mixed(self.module, x):
            state.update({k: p.detach().to(x.dtype) for k, p in self.module.named_parameters()
                          if _other_dtype(p, x)})
        state.update(w)
        return _output(self.module, functional_call(self.module, state, (x,)))

    def _w(self, w: Weights, x: Tensor | None = None) -> Tensor:
        """A dynamics stage's control: ``w["w"]``, else the current one (in ``x``'s dtype)."""
        if "w" in w:
            return w["w"]
        control = self.control.value()
        return control if x is None else control.to(x.dtype)

    def accumulate(self, direction: Weights, handover: Handover | None = None) -> None:
        """``p.grad += d_t`` for each parameter in ``direction``, like ``loss.backward()``.

        A parameter without an entry (one the stage does not use) keeps its ``.grad``, as autograd
        leaves it. Where ``.grad`` is None it becomes a copy of ``d_t``, or ``d_t`` itself where
        ``handover`` allows it (no copy, as autograd hands over its gradient buffer). With a
        ``handover``, rows of a parameter (a control chain's ``w_t``) are collected in it and
        written by :meth:`Handover.flush` in one operation per parameter, not one per stage.
        """
        for s in self.slots:
            if s.name not in direction:
                continue
            d = direction[s.name]
            if s.index is not None and handover is not None:
                handover.rows.setdefault(id(s.param), (s.param, []))[1].append((s.index, d))
            elif s.param.grad is None and s.index is None and d.shape == s.param.shape:
                s.param.grad = d if handover is not None and handover.take(d, s.param) else d.detach().clone()
            else:
                with torch.no_grad():
                    s.grad_view().add_(d)

    @torch.no_grad()
    def update(self, direction: Weights, step: float) -> None:
        """``w_t <- w_t - step * d_t`` for each parameter in ``direction``."""
        for s in self.slots:
            if s.name in direction:
                s.value().sub_(direction[s.name], alpha=step)


class Dynamics(nn.Module):
    """The per-step map of a chain built by :meth:`Chain.from_dynamics` (for rule dispatch).

    ``affine``: the caller's statement that ``phi(w, x)`` is affine in the control ``w``, so rules
    may use their closed forms for weights that enter linearly (the Moreau weight step is then the
    vjp, 000 Algo 2 line 5).
    """

    def __init__(self, phi: Callable[[Tensor, Tensor], Tensor], affine: bool = False):
        super().__init__()
        self.phi = phi
        self.affine = affine

    def forward(self, w: Tensor, x: Tensor) -> Tensor:
        return self.phi(w, x)

    def extra_repr(self) -> str:
        return getattr(self.phi, "__name__", repr(self.phi))


class Chain(nn.Module):
    """A chain of computations ``x_t = phi_t(w_t, x_{t-1})`` (000 Def. 1.1).

    Each child of an ``nn.Sequential`` is one stage: ``Linear, ReLU`` as two children are two
    stages; ``Sequential(Linear, ReLU)`` as one child is one stage (a "layer"); a residual block is
    one stage. Any other model (its own ``forward``, a ``Sequential`` subclass that overrides it, a
    ``torch.compile``d model) is traced by ``torch.fx`` and cut wherever exactly one tensor flows
    (:mod:`moreaugrad.trace`): a skip connection keeps its block inside one stage, and a single
    ``Linear``, ``Conv2d`` or activation call stays its own stage with its closed forms. Only
    parameters with ``requires_grad`` are stage weights.

    The chain is a view of the model, never a copy of its state: children, parameters and
    ``requires_grad`` are read at every call (:attr:`stages`), so it follows
    ``load_state_dict(..., assign=True)``, a replaced child and layers frozen or unfrozen later (a
    traced model is traced again when its submodules or parameters change).

    Args:
        model: any ``nn.Module`` mapping one tensor to one tensor.

    Example:
        >>> chain = Chain(nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3)))
        >>> len(chain)
        3
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        if isinstance(model, Chain):
            raise TypeError("moreaugrad.Chain: model is already a Chain; use it directly")
        if isinstance(model, type):
            raise TypeError(f"moreaugrad.Chain: model must be a module instance, got the class "
                            f"{model.__name__}; instantiate it first")
        if not isinstance(model, nn.Module):
            raise TypeError(f"moreaugrad.Chain: model must be an nn.Module (an nn.Sequential whose "
                            f"children are the stages, or any model torch.fx can trace), got "
                            f"{type(model).__name__}")
        if isinstance(model, nn.Sequential) and _sequential_forward(model) and len(model) == 0:
            raise ValueError("moreaugrad.Chain: model must have at least one stage, got an empty "
                             "nn.Sequential")
        self.x0: Tensor | None = None
        self._phi: Callable[[Tensor, Tensor], Tensor] | None = None
        self._stage_cache: tuple[tuple, tuple[Stage, ...]] = ((), ())
        if isinstance(model, nn.Sequential) and _sequential_forward(model):
            self.model = model
            self._traced: tuple[nn.Module, tuple] | None = None
            self._names: list[str] | None = None
        else:
            self._traced = (trace.source(model), ())
            self._retrace()

    @classmethod
    def from_stages(cls, stages: Sequence[nn.Module]) -> Chain:
        """A chain whose stages are the given modules, in order (``Chain(nn.Sequential(*stages))``):
        for a model that cannot be traced, list its parts yourself."""
        return cls(nn.Sequential(*stages))

    def _source_key(self) -> tuple:
        root = self._traced[0]
        return (tuple(id(m) for m in root.modules()),
                tuple((id(p), p.requires_grad) for p in root.parameters()))

    def _retrace(self) -> None:
        """Trace the source model again (at construction, and when its modules or parameters changed)."""
        root = self._traced[0]
        named = trace.parts(root)
        if len(named) == 1 and isinstance(named[0][1], fx.GraphModule):
            warnings.warn(f"moreaugrad.Chain: {type(root).__name__} traced into a single stage (no point "
                          f"of its forward passes exactly one tensor on); every oracle then solves one "
                          f"problem over the whole model with its generic solver", UserWarning,
                          stacklevel=3)
        self.model = nn.Sequential(*(m for _, m in named))
        self._names = [n for n, _ in named]
        self._traced = (root, self._source_key())

    @classmethod
    def from_dynamics(cls, phi: Callable[[Tensor, Tensor], Tensor], controls: Tensor,
                      x0: Tensor, affine: bool = False) -> Chain:
        """A control chain ``x_t = phi(w_t, x_{t-1})`` with one control ``w_t = controls[t-1]`` per step.

        Args:
            phi: ``phi(w, x)`` mapping a control ``w`` (shape ``controls.shape[1:]``) and a batch of
                states ``x`` (shape ``(B, d)``) to the next states; it must broadcast over the batch.
            controls: shape ``(tau, ...)``; becomes the chain's parameter ``controls`` (an existing
                ``nn.Parameter`` is used as is, so an optimizer built on it keeps working).
            x0: the initial state, shape ``(d,)`` or ``(B, d)``; a 1-D state gets a batch of one.
            affine: ``phi`` is affine in the control (as a pendulum's torque enters its explicit or
                semi-implicit Euler step): the weight lines may take closed forms (e.g. Moreau's is
                the vjp) instead of inner solves. Stating it for a ``phi`` that is not affine gives
                those rules' linearised answer.
        """
        if not callable(phi):
            raise TypeError(f"Chain.from_dynamics: phi must be callable, got {type(phi).__name__}")
        if not isinstance(controls, Tensor) or controls.dim() < 1 or controls.shape[0] < 1:
            got = tuple(controls.shape) if isinstance(controls, Tensor) else type(controls).__name__
            raise ValueError(f"Chain.from_dynamics: controls must be a tensor of shape (tau, ...) "
                             f"with tau >= 1, got {got}")
        if not isinstance(x0, Tensor) or x0.dim() < 1:
            got = tuple(x0.shape) if isinstance(x0, Tensor) else type(x0).__name__
            raise ValueError(f"Chain.from_dynamics: x0 must be a tensor of shape (d,) or (B, d), "
                             f"got {got}")
        if controls.dtype != x0.dtype or controls.device != x0.device:
            raise TypeError(f"Chain.from_dynamics: controls and x0 must share dtype and device, got "
                            f"{controls.dtype}/{controls.device} and {x0.dtype}/{x0.device}")
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self.controls = controls if isinstance(controls, nn.Parameter) else nn.Parameter(
            controls.detach().clone())
        self.model = nn.Sequential(Dynamics(phi, affine))
        self._traced, self._names = None, None
        self.register_buffer("x0", x0.detach().clone() if x0.dim() > 1 else x0.detach()[None].clone())
        self._phi = phi
        self._stage_cache = ((), ())
        return self

    @property
    def stages(self) -> tuple[Stage, ...]:
        """The stages of the model as it is now.

        Children, parameters and their ``requires_grad`` are read at every access; the
        :class:`Stage` objects are rebuilt only when one of them changed (a key of object ids and
        flags, a few microseconds), so the same model gives the same stages.
        """
        if self.__dict__.get("_pinned") is not None:
            return self._pinned
        if self._traced is not None and self._source_key() != self._traced[1]:
            self._retrace()
        key = self._stage_key()
        if key != self._stage_cache[0]:
            self._stage_cache = (key, self._build_stages())
        return self._stage_cache[1]

    @contextlib.contextmanager
    def pinned(self) -> Iterator[tuple[Stage, ...]]:
        """The stages read once and held for the duration of one oracle call (the model cannot
        change in the middle of it), so that every access inside costs nothing."""
        held = self.__dict__.get("_pinned")
        if held is not None:  # nested (Oracle.backward around its own call): the same stages
            yield held
            return
        stages = self.stages
        self._pinned = stages
        try:
            yield stages
        finally:
            self._pinned = None

    def _stage_key(self) -> tuple:
        # Ids are safe: the cached stages hold the keyed objects, so no id can be reused meanwhile.
        if self._phi is not None:
            return id(self.model[0]), id(self.controls), self.controls.shape[0], self.controls.requires_grad
        return tuple((id(child), tuple((n, id(p), p.requires_grad) for n, p in (
            child.named_parameters() if child._modules else _own(child)))) for child in self.model)

    def _build_stages(self) -> tuple[Stage, ...]:
        if self._phi is not None:
            step = self.model[0]
            frozen = not self.controls.requires_grad  # frozen controls: a chain without weights
            return tuple(Stage(step, [] if frozen else [Slot("w", self.controls, t)], t, fn=self._phi,
                               control=Slot("w", self.controls, t))
                         for t in range(self.controls.shape[0]))
        names = self._names or [None] * len(self.model)
        return tuple(
            Stage(child, [Slot(n, p) for n, p in child.named_parameters() if p.requires_grad], t,
                  name=name)
            for t, (child, name) in enumerate(zip(self.model, names, strict=True))
        )

    def __len__(self) -> int:
        return len(self.stages)

    def forward(self, x: Tensor | None = None) -> Tensor:
        x = self.input(x)
        for stage in self.stages:
            x, _ = stage.record(x)
        return x

    def input(self, x: Tensor | None) -> Tensor:
        """The chain's input: ``x`` itself, or the stored ``x0`` of a dynamics chain."""
        if x is None:
            if self.x0 is None:
                raise ValueError("moreaugrad.Chain: x is required for a chain built from a network "
                                 "(only a chain from dynamics stores x0)")
            return self.x0
        if not isinstance(x, Tensor):
            raise TypeError(f"moreaugrad.Chain: x must be a torch.Tensor, got {type(x).__name__}")
        return x

    def reference(self) -> Tensor | None:
        """A floating parameter or buffer whose dtype and device inputs must match (None if none)."""
        if self.x0 is not None:
            return self.x0
        return next((p for p in self.parameters() if p.is_floating_point()), None)
