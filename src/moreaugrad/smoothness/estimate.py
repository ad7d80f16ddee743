"""Lipschitz and smoothness estimates of a chain from its architecture (003 Sec. 4).

* :func:`generic_chain`: 003 Prop. 4.3, for layers ``phi_l in C_{l_phi, L_phi}``.
* :func:`estimate`: 003 Prop. 4.4 on the product of balls ``C = {w: ||v_l|| <= R}`` (or, with
  ``around``, Cor. 4.5 on ``C' = {w: ||v_l - v_l*|| <= R}``), layer by layer from the table of
  constants (:mod:`.table`), and 003 Prop. 4.2 for ``F = f o psi + r`` with its step ``1/L_F``
  (003 Thm. 4.1). It needs only shapes: the model may live on the ``meta`` device.

Here a *layer* ``l`` of 003 is a bi-affine map followed by parameter-free maps
``a_l = a_{l,k} o ... o a_{l,1}``; it is read off the modules in order, a module with parameters
starting a new layer. A *stage* ``t`` is a child of the ``nn.Sequential`` (a nested plain
``nn.Sequential`` is walked into, its modules staying in its stage), as :class:`moreaugrad.Chain`
cuts it. The table has one row per module, with the constants of the chain that ends there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..chain import Chain
from .table import INF, BiAffine, Map, ObjectiveConstants, Piece, Shapes, lookup, objective_constants


def _mul(*xs: float) -> float:
    """A product with ``0 * inf = 0``: a factor that is exactly 0 (a constant map, a map without
    parameters upstream) removes the term, whatever the others."""
    if any(x == 0 for x in xs):
        return 0.0
    out = 1.0
    for x in xs:
        out *= x
    return out


def generic_chain(layers: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """003 Prop. 4.3: for layers ``phi_l in C_{l_phi_l, L_phi_l}`` (constants in ``(v_l, z_{l-1})``
    jointly), the chain's ``(l_l, L_l)`` after each layer:
    ``l_l = l_phi_l + l_{l-1} l_phi_l``, ``L_l = L_{l-1} l_phi_l + L_phi_l (1 + l_{l-1})^2``,
    ``l_0 = L_0 = 0``."""
    out, lip, smooth = [], 0.0, 0.0
    for l_phi, L_phi in layers:
        lip, smooth = l_phi + _mul(lip, l_phi), _mul(smooth, l_phi) + _mul(L_phi, 1 + lip, 1 + lip)
        out.append((lip, smooth))
    return out


@dataclass
class _Layer:
    """Layer ``l`` of 003 Prop. 4.4 as it is being read: ``b_l`` on a ball of radius ``R`` around
    ``v_l*`` (norm ``vnorm``; 0 without ``around``) and the maps ``a_{l,1..k}`` so far."""

    b: BiAffine
    radius: float
    vnorm: float = 0.0
    maps: list[Map] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return self.b == IDENTITY and not self.maps


IDENTITY = BiAffine(0.0, 0.0, 1.0, 0.0, "identity")


def close_layer(prev: tuple[float, float, float], layer: _Layer) -> tuple[float, float, float]:
    """003 Prop. 4.4 (i)-(iii): ``(m_l, l_l, L_l)`` from ``(m_{l-1}, l_{l-1}, L_{l-1})``.

    With ``A = L_beta R + l_beta_z``, ``B = L_beta m_{l-1} + l_beta_v``:

    * ``m_{l,0} = L_beta R m_{l-1} + l_beta_v R + l_beta_z m_{l-1} + ||beta^0||``,
      ``m_{l,j} = min{m_a, ||a(0)|| + l_a m_{l,j-1}, ||a(0)|| + (||grad a(0)|| + L_a m_{l,j-1}) m_{l,j-1}}``;
    * ``l_{l,j} = min{l_a, ||grad a(0)|| + L_a m_{l,j-1}}``,
      ``l_l = (prod_j l_{l,j}) (A l_{l-1} + B)`` (eq. 20);
    * ``L_{l,k} = sum_j L_{a_j} (prod_{i<j} l_{l,i})^2 prod_{i>j} l_{l,i}`` and (eq. 21)
      ``L_l = L_{l-1} A prod_j l_{l,j} + A^2 L_{l,k} l_{l-1}^2
      + 2 (B A L_{l,k} + L_beta prod_j l_{l,j}) l_{l-1} + B^2 L_{l,k}``.

    Around ``v*`` (003 Cor. 4.5): ``l_beta_z + L_beta ||v*||`` replaces ``l_beta_z`` and
    ``||beta^0|| + l_beta_v ||v*||`` replaces ``||beta^0||``.
    """
    m_prev, l_prev, L_prev = prev
    b, R = layer.b, layer.radius
    lz = b.l_beta_z + _mul(b.L_beta, layer.vnorm)
    c0 = b.beta0 + _mul(b.l_beta_v, layer.vnorm)
    m = _mul(b.L_beta, R, m_prev) + _mul(b.l_beta_v, R) + _mul(lz, m_prev) + c0
    lips = []
    for a in layer.maps:
        lips.append(min(a.l, a.slope0 + _mul(a.L, m)))
        m = min(a.m, a.at0 + _mul(a.l, m), a.at0 + _mul(a.slope0 + _mul(a.L, m), m))
    prod = _mul(*lips) if lips else 1.0
    Lk = 0.0
    for j, a in enumerate(layer.maps):
        before = _mul(*lips[:j]) if j else 1.0
        after = _mul(*lips[j + 1:]) if j + 1 < len(lips) else 1.0
        Lk += _mul(a.L, before, before, after)
    A = _mul(b.L_beta, R) + lz
    B = _mul(b.L_beta, m_prev) + b.l_beta_v
    lip = _mul(prod, _mul(A, l_prev) + B)
    smooth = (_mul(L_prev, A, prod) + _mul(A, A, Lk, l_prev, l_prev)
              + 2 * _mul(_mul(B, A, Lk) + _mul(b.L_beta, prod), l_prev) + _mul(B, B, Lk))
    return m, lip, smooth


# -- walking the model --------------------------------------------------------------------------


def _plain_sequential(module: nn.Module) -> bool:
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def leaves(model: nn.Module) -> list[tuple[int, str, nn.Module]]:
    """``(t, name, module)`` for each module the estimate reads, in order: ``t`` is the stage (the
    child of the top ``nn.Sequential``, from 1), ``name`` its qualified name (``"3.1"``)."""
    if isinstance(model, Chain):
        if model.x0 is not None:
            raise TypeError("smoothness: a chain built from dynamics has no table of layers; pass a network")
        model = model.model
    if not isinstance(model, nn.Module):
        raise TypeError(f"smoothness: model must be an nn.Module (an nn.Sequential of supported layers), "
                        f"got {type(model).__name__}")
    if not _plain_sequential(model):
        return [(1, "", model)]
    out: list[tuple[int, str, nn.Module]] = []

    def walk(mod: nn.Module, prefix: str, t: int) -> None:
        for name, child in mod.named_children():
            full = f"{prefix}{name}"
            if _plain_sequential(child):
                walk(child, full + ".", t)
            else:
                out.append((t, full, child))

    for t, (name, child) in enumerate(model.named_children(), start=1):
        if _plain_sequential(child):
            walk(child, name + ".", t)
        else:
            out.append((t, name, child))
    if not out:
        raise ValueError("smoothness: the model has no layers (an empty nn.Sequential)")
    return out


def _meta_output(module: nn.Module, x: Tensor, t: int, name: str) -> Tensor:
    """The module's output on a ``meta`` input: shapes only, whatever device the module is on."""
    state = {n: torch.empty_like(p, device="meta") for n, p in module.named_parameters()}
    state.update({n: torch.empty_like(b, device="meta") for n, b in module.named_buffers()})
    try:
        out = functional_call(module, state, (x,))
    except Exception as err:  # torch raises RuntimeError, ValueError, IndexError for a bad shape
        raise ValueError(f"smoothness: the input shape does not fit stage {t} ({name}: "
                         f"{type(module).__name__}), which receives per-sample shape {tuple(x.shape[1:])} "
                         f"(batch {x.shape[0]}): {err}") from err
    if not isinstance(out, Tensor):
        raise TypeError(f"smoothness: stage {t} ({name}: {type(module).__name__}) returned a "
                        f"{type(out).__name__}, not a tensor")
    return out


def _norm(tensors: Sequence[Tensor]) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors))


def _center(around: Any, model: nn.Module) -> Mapping[str, Tensor] | None:
    if around is None:
        return None
    if isinstance(around, Chain):
        around = around.model
    if isinstance(around, nn.Module):
        return dict(around.named_parameters())
    if isinstance(around, Mapping):
        return around
    raise TypeError(f"smoothness: around must be None, an nn.Module (its current weights) or a mapping "
                    f"parameter name -> tensor, got {type(around).__name__}")


def _vnorm(center: Mapping[str, Tensor], module: nn.Module, name: str) -> float:
    tensors = []
    for pname, _ in module.named_parameters():
        key = f"{name}.{pname}" if name else pname
        for k in (key, f"model.{key}"):
            if k in center:
                tensors.append(center[k])
                break
        else:
            raise ValueError(f"smoothness: around has no entry for parameter {key!r} (its keys are the "
                             f"model's named_parameters(), e.g. {next(iter(center), None)!r})")
    if any(t.device.type == "meta" for t in tensors):
        raise ValueError(f"smoothness: around holds meta tensors for {name!r}: Cor. 4.5 needs the values "
                         f"of the weights (use around=None on the meta device)")
    return _norm(tensors)


def _check_number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
        raise ValueError(f"smoothness.estimate: {name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_shape(input_shape: Any) -> tuple[int, ...]:
    ok = isinstance(input_shape, tuple | list | torch.Size) and len(input_shape) > 0 and all(
        isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in input_shape)
    if not ok:
        raise ValueError(f"smoothness.estimate: input_shape must be the shape of one input, a non-empty "
                         f"tuple of ints >= 1 without the batch dimension, got {input_shape!r}")
    return tuple(int(s) for s in input_shape)


def _check_batch(batch: Any) -> int:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"smoothness.estimate: batch must be an int >= 1, got {batch!r}")
    return batch


# -- the result -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One module of the chain: its constants (``pieces``) and those of the chain ending there.

    Attributes:
        stage: ``t``, the chain stage (child of the top ``nn.Sequential``), from 1.
        name: the qualified module name (``"3.1"``); ``type``: its class name.
        shape: the output shape per sample.
        pieces: the table's :class:`BiAffine` / :class:`Map` entries of the module.
        m, lipschitz, smoothness: ``m_psi``, ``l_psi``, ``L_psi`` of the chain up to this module.
    """

    stage: int
    name: str
    type: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]
    m: float
    lipschitz: float
    smoothness: float

    @property
    def label(self) -> str:
        return f"{self.name}: {self.type}" if self.name else self.type

    def constants(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.pieces:
            out.update(p.constants())
        return out


@dataclass(frozen=True)
class StageConstants:
    """Constants of stage ``t`` as a map of its input ``x_{t-1}`` alone, for any input and weights
    in the ball: ``l_phi_t``, ``L_phi_t`` of 000 Prop. 2.3 (a bi-affine map contributes
    ``L_beta (||v*|| + R) + l_beta_z`` and no curvature; a map its global ``l``, ``L``; composed by
    ``l = l_1 l_2``, ``L = L_1 l_2 + L_2 l_1^2``)."""

    stage: int
    label: str
    lipschitz: float
    smoothness: float


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    return "inf" if x == INF else f"{x:.3g}"


def _json_number(x: float | None) -> float | str | None:
    return "inf" if x == INF else x


@dataclass(frozen=True)
class Estimate:
    """What :func:`estimate` found.

    Attributes:
        rows: one :class:`Row` per module, in order.
        stages: one :class:`StageConstants` per chain stage (for :class:`~.safe.Safe`).
        lipschitz, smoothness, output_bound: ``l_psi``, ``L_psi``, ``m_psi`` of the chain on the
            balls (003 Prop. 4.4 / Cor. 4.5).
        layers: the number of layers of 003 Prop. 4.4 (bi-affine maps).
        objective, regularizer: the table's constants of ``f`` and ``r`` (or None).
        objective_smoothness: ``L_F <= L_psi l~_f + l_psi^2 L_f + L_r`` (003 Prop. 4.2), or None
            without an objective.
    """

    rows: tuple[Row, ...]
    stages: tuple[StageConstants, ...]
    lipschitz: float
    smoothness: float
    output_bound: float
    layers: int
    input_shape: tuple[int, ...]
    radius: float
    input_norm: float
    batch: int
    around: bool
    objective: ObjectiveConstants | None = None
    regularizer: ObjectiveConstants | None = None
    objective_smoothness: float | None = None

    @property
    def step(self) -> float | None:
        """``1/L_F``: the gradient-descent step of 003 Thm. 4.1 (None without an objective)."""
        if self.objective_smoothness is None:
            return None
        return 0.0 if self.objective_smoothness == INF else 1.0 / self.objective_smoothness

    def _first(self, attr: str) -> Row | None:
        return next((r for r in self.rows if getattr(r, attr) == INF), None)

    @property
    def infinite_at(self) -> Row | None:
        """The first row from which ``L_psi`` is infinite (a ReLU, a max pooling), or None."""
        return self._first("smoothness")

    @property
    def lipschitz_infinite_at(self) -> Row | None:
        """The first row from which ``l_psi`` is infinite, or None."""
        return self._first("lipschitz")

    def table(self) -> str:
        """The per-module table and the totals, as plain text."""
        head = ["t", "module", "output", "constants", "m", "l", "L"]
        rows = []
        for r in self.rows:
            consts = ", ".join(f"{k}={_fmt(v)}" for k, v in r.constants().items())
            rows.append([str(r.stage), r.label, "x".join(map(str, r.shape)), consts, _fmt(r.m),
                         _fmt(r.lipschitz), _fmt(r.smoothness)])
        width = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
        lines = ["  ".join(x.ljust(w) for x, w in zip(line, width, strict=True)).rstrip()
                 for line in [head, *rows]]
        ball = "||v_l - v_l*|| <= R (003 Cor. 4.5)" if self.around else "||v_l|| <= R (003 Prop. 4.4)"
        lines.insert(0, f"input {self.input_shape} x batch {self.batch}, ||x|| = {self.input_norm:g}, "
                        f"balls {ball} with R = {self.radius:g}")
        lines.append(f"chain: m = {_fmt(self.output_bound)}, l = {_fmt(self.lipschitz)}, "
                     f"L = {_fmt(self.smoothness)} over {self.layers} layers")
        inf = self.infinite_at
        if inf is not None:
            lines.append(f"L is infinite from stage {inf.stage} (module {inf.label}), which is not "
                         f"differentiable")
        if self.objective_smoothness is not None:
            lines.append(f"objective (003 Prop. 4.2): l_f = {_fmt(self.objective.l)}, "
                         f"L_f = {_fmt(self.objective.L)}, L_F = {_fmt(self.objective_smoothness)}, "
                         + (f"step 1/L_F = {_fmt(self.step)} (003 Thm. 4.1)" if self.step
                            else "no step 1/L_F (003 Thm. 4.1 needs L_F < inf)"))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def factors(self) -> list[tuple[str, float, float]]:
        """Per module, the factor by which it multiplies ``l_psi`` and ``L_psi``: where the bound
        grows. ``inf`` where it becomes infinite, 1 once it is; where the value before is 0 (the
        first modules), the value itself."""

        def ratio(new: float, old: float) -> float:
            if old == INF:
                return 1.0
            if new == INF:
                return INF
            return new if old == 0 else new / old

        out, lip, smooth = [], 0.0, 0.0
        for r in self.rows:
            out.append((r.label, ratio(r.lipschitz, lip), ratio(r.smoothness, smooth)))
            lip, smooth = r.lipschitz, r.smoothness
        return out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (infinite values as the string ``"inf"``)."""
        return {
            "input_shape": list(self.input_shape), "batch": self.batch, "radius": self.radius,
            "input_norm": self.input_norm, "around": self.around, "layers": self.layers,
            "lipschitz": _json_number(self.lipschitz), "smoothness": _json_number(self.smoothness),
            "output_bound": _json_number(self.output_bound),
            "infinite_at": None if self.infinite_at is None else self.infinite_at.label,
            "objective": None if self.objective is None else {
                "l": _json_number(self.objective.l), "L": _json_number(self.objective.L)},
            "objective_smoothness": _json_number(self.objective_smoothness),
            "step": _json_number(self.step),
            "rows": [{"stage": r.stage, "module": r.label, "shape": list(r.shape),
                      "constants": {k: _json_number(v) for k, v in r.constants().items()},
                      "m": _json_number(r.m), "lipschitz": _json_number(r.lipschitz),
                      "smoothness": _json_number(r.smoothness)} for r in self.rows],
            "stages": [{"stage": s.stage, "module": s.label, "lipschitz": _json_number(s.lipschitz),
                        "smoothness": _json_number(s.smoothness)} for s in self.stages],
        }

    def figure(self) -> Any:
        """A matplotlib figure: per module, the factor it multiplies ``l_psi`` and ``L_psi`` by
        (log scale; an infinite factor drawn as a red bar to the top)."""
        from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone

        facts = self.factors()
        fig = Figure(figsize=(max(6.0, 0.35 * len(facts)), 6))
        axes = fig.subplots(2, 1, sharex=True)
        xs = range(len(facts))
        for ax, k, name in ((axes[0], 1, "l"), (axes[1], 2, "L")):
            vals = [f[k] for f in facts]
            finite = [v for v in vals if v != INF and v > 0]
            top = max(finite + [10.0]) * 10
            heights = [top if v == INF else max(v, 1e-300) for v in vals]
            colors = ["tab:red" if v == INF else "tab:blue" if v >= 1 else "tab:green" for v in vals]
            ax.bar(xs, heights, color=colors)
            ax.set_yscale("log")
            ax.axhline(1.0, color="k", lw=0.5)
            ax.set_ylabel(f"factor on {name}_psi")
        axes[1].set_xticks(list(xs), [f[0] for f in facts], rotation=90, fontsize=7)
        axes[0].set_title(f"per-module factors: l = {_fmt(self.lipschitz)}, L = {_fmt(self.smoothness)}")
        fig.tight_layout()
        return fig


# -- the estimate ---------------------------------------------------------------------------------


def estimate(model: nn.Module, input_shape: Sequence[int], *, radius: float = 1.0, input_norm: float = 1.0,
             batch: int = 1, around: Any = None, loss: Any = None, target_norm: float | None = None,
             regularizer: Any = None) -> Estimate:
    """Upper bounds on the output, Lipschitz constant and smoothness of a network as a function of
    its weights, from shapes alone (003 Prop. 4.4, Cor. 4.5), and on the smoothness of
    ``F = f o psi + r`` (003 Prop. 4.2) with the step ``1/L_F`` (003 Thm. 4.1).

    Args:
        model: an ``nn.Sequential`` (nested plain ``Sequential`` children are walked into) of modules
            in the table (:func:`~.table.supported`), or one such module, or an ``mg.Chain`` of one.
            It may live on the ``meta`` device.
        input_shape: the shape of one input, without the batch dimension.
        radius: ``R >= 0``, the radius of the ball of each layer's parameters ``v_l``.
        input_norm: ``||x||_2`` of the whole input batch (``m_0``; 003 Sec. 5.2 takes 1).
        batch: ``m >= 1``, the mini-batch size (it enters ``l_beta_v``, batch-norm and the losses).
        around: the center ``w*`` of the balls (003 Cor. 4.5): ``None`` (balls at 0), an
            ``nn.Module`` (its current weights, e.g. the model itself) or a mapping from the
            model's parameter names to tensors.
        loss: an objective ``f`` in the table (``mg.losses.SquaredLoss``, ``CrossEntropy``) for
            003 Prop. 4.2; ``target_norm`` bounds ``||Y||_F`` for the squared loss (default:
            one-hot labels, ``sqrt(batch)``).
        regularizer: ``r`` (``mg.losses.L2(mu)``: ``L_r = mu``), applied to every parameter.

    Every parameter is a variable (``requires_grad`` is not read). In 003 Prop. 4.2,
    ``l~_f = min{l_f, min_{z in psi(C)} ||grad f(z)|| + L_f l_psi D_C}``: the second term needs data,
    so the estimate takes ``l_f`` on ``psi(C)`` from the table (for the squared loss it depends on
    ``m_psi`` and ``target_norm``).

    Raises:
        UnsupportedModuleError: a module not in the table (the message lists the supported types).
        ValueError: a negative radius or input norm, ``batch < 1``, or an input shape that does not
            fit a module (naming it).
    """
    shape = _check_shape(input_shape)
    R = _check_number("radius", radius)
    m0 = _check_number("input_norm", input_norm)
    batch = _check_batch(batch)
    items = leaves(model)
    center = _center(around, model)
    ref = next((p for p in (model.parameters() if isinstance(model, nn.Module) else ())
                if p.is_floating_point()), None)
    x = torch.empty((batch, *shape), device="meta", dtype=ref.dtype if ref is not None else torch.float32)

    prev = (m0, 0.0, 0.0)  # (m_{l-1}, l_{l-1}, L_{l-1})
    layer = _Layer(IDENTITY, R)
    rows: list[Row] = []
    state: dict[int, tuple[float, float]] = {}  # stage t -> (l_phi_t, L_phi_t) in x_{t-1}
    n_layers = 0
    for t, name, module in items:
        entry = lookup(module)
        out = _meta_output(module, x, t, name)
        shapes = Shapes(batch, tuple(x.shape[1:]), tuple(out.shape[1:]))
        pieces = tuple(entry(module, shapes))
        vnorm = _vnorm(center, module, name) if center is not None else 0.0
        lip_x, smooth_x = state.get(t, (1.0, 0.0))
        for p in pieces:
            if isinstance(p, BiAffine):
                if not layer.empty:
                    prev = close_layer(prev, layer)
                layer = _Layer(p, R, vnorm)
                n_layers += 1
                lp, Lp = _mul(p.L_beta, vnorm + R) + p.l_beta_z, 0.0
            elif isinstance(p, Map):
                layer.maps.append(p)
                lp, Lp = p.l, p.L
            else:
                raise TypeError(f"smoothness: the entry for {type(module).__name__} returned a "
                                f"{type(p).__name__}; entries return BiAffine and Map pieces")
            lip_x, smooth_x = _mul(lip_x, lp), _mul(smooth_x, lp) + _mul(Lp, lip_x, lip_x)
        state[t] = (lip_x, smooth_x)
        m, lip, smooth = close_layer(prev, layer)
        rows.append(Row(t, name, type(module).__name__, tuple(out.shape[1:]), pieces, m, lip, smooth))
        x = out
    m, lip, smooth = rows[-1].m, rows[-1].lipschitz, rows[-1].smoothness
    labels = _stage_types(items)
    stages = [StageConstants(t, labels[t], lp, Lp) for t, (lp, Lp) in state.items()]

    f = r = None
    L_F = None
    if loss is not None:
        out_shape = tuple(x.shape[1:])
        f = objective_constants(loss, Shapes(batch, out_shape, out_shape), m, target_norm)
        L_r = 0.0
        if regularizer is not None:
            r = objective_constants(regularizer, Shapes(batch, out_shape, out_shape), m, None)
            L_r = r.L
        L_F = _mul(smooth, f.l) + _mul(lip, lip, f.L) + L_r
    elif regularizer is not None:
        raise ValueError("smoothness.estimate: a regularizer needs a loss (003 Prop. 4.2 bounds f o psi + r)")
    return Estimate(tuple(rows), tuple(stages), lip, smooth, m, n_layers, shape, R, m0, batch,
                    center is not None, f, r, L_F)


def _stage_types(items: Sequence[tuple[int, str, nn.Module]]) -> dict[int, str]:
    """``"t: Type"`` or ``"t: Sequential(Linear, Softplus)"`` per stage."""
    out: dict[int, list[str]] = {}
    for t, _, module in items:
        out.setdefault(t, []).append(type(module).__name__)
    return {t: f"stage {t} ({names[0] if len(names) == 1 else ', '.join(names)})" for t, names in out.items()}
