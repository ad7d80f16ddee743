"""Stages of any ``nn.Module``: trace it with ``torch.fx`` and cut where one tensor flows (DESIGN 1).

The model is traced once into a graph. A *cut* is a point of the graph's order where exactly one
value computed before it is used after it; each part between two cuts is a stage
``x_t = phi_t(w_t, x_{t-1})``. Parameters and buffers are never copied: every stage refers to the
model's own submodules and tensors, so ``model.parameters()``, ``state_dict()``, an optimizer built
on the model and batch-norm statistics are exactly as without moreaugrad.

* A part that is one call of a submodule on the stage input is that submodule itself, so closed
  forms registered for its type (``Linear``, ``Conv2d``, activations, pooling) still fire.
* A part that is one call of a functional activation (``F.relu``, ``torch.tanh``, ``x.sigmoid()``,
  ``F.softplus``, ``F.leaky_relu``, ``torch.flatten(x, 1)``) becomes the equivalent module.
* Any other part (a residual block, whose skip connection keeps it whole) is a ``GraphModule``
  that calls the model's own submodules: the generic rules serve it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

Part = tuple[str, nn.Module]  # (name for messages, the stage's module)


class TraceFailure(TypeError):
    """The model could not be traced or cut into stages."""


def source(model: nn.Module) -> nn.Module:
    """The module to trace: a ``torch.compile``d model is traced through its original module."""
    return getattr(model, "_orig_mod", model)


def parts(model: nn.Module) -> list[Part]:
    """The stages of ``model``: ``(name, module)`` per part between two cuts of its traced graph.

    Raises:
        TraceFailure: tracing failed (data-dependent control flow names the failing node), or the
            model does not map one tensor to one tensor.
    """
    root = source(model)
    try:
        graph = fx.symbolic_trace(root).graph
    except Exception as err:  # fx raises TraceError, TypeError, NotImplementedError, ...
        raise TraceFailure(
            f"moreaugrad.Chain: torch.fx could not trace {type(root).__name__} ({type(err).__name__}: "
            f"{err}). A forward with data-dependent control flow cannot be cut into stages: list the "
            f"stages yourself, nn.Sequential(...) or mg.Chain.from_stages([...])") from err
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise TraceFailure(f"moreaugrad.Chain: {type(root).__name__}.forward takes {len(inputs)} "
                           f"inputs; a chain maps one tensor x_0 to one output")
    out = nodes[-1]
    if len(out.args) != 1 or not isinstance(out.args[0], fx.Node):
        raise TraceFailure(f"moreaugrad.Chain: {type(root).__name__}.forward must return one tensor, "
                           f"got {out.args[0]!r}")
    body = [n for n in nodes if n.op not in ("placeholder", "output", "get_attr")]
    if not body:
        raise TraceFailure(f"moreaugrad.Chain: {type(root).__name__}.forward computes nothing")
    segments = _cut(body, inputs[0], out.args[0])
    return [_part(root, seg) for seg in segments]


def _cut(body: list[fx.Node], x: fx.Node, result: fx.Node) -> list[list[fx.Node]]:
    """Split ``body`` (in graph order) after every node that is the only value crossing."""
    position = {n: i for i, n in enumerate(body)}
    last_use = {}
    for n in [x, *body]:
        users = [position[u] for u in n.users if u in position]
        last_use[n] = max(users, default=len(body) if n is result else -1)
    segments, current = [], []
    live: set[fx.Node] = {x}
    for i, n in enumerate(body):
        current.append(n)
        live.add(n)
        live = {v for v in live if last_use[v] > i}
        # A value read only through getitem is a tuple (an LSTM's (output, state)): no cut there.
        tuple_valued = n.users and all(u.op == "call_function" and u.target is operator.getitem
                                       for u in n.users)
        if live == {n} and not tuple_valued and i + 1 < len(body):
            segments.append(current)
            current = []
    if current:
        segments.append(current)
    if result is not body[-1] and result not in segments[-1]:
        raise TraceFailure("moreaugrad.Chain: the traced output is not the last value computed")
    return segments


_ACTIVATIONS: dict[Any, Callable[..., nn.Module]] = {
    torch.relu: nn.ReLU, F.relu: nn.ReLU, "relu": nn.ReLU,
    torch.sigmoid: nn.Sigmoid, F.sigmoid: nn.Sigmoid, "sigmoid": nn.Sigmoid,
    torch.tanh: nn.Tanh, F.tanh: nn.Tanh, "tanh": nn.Tanh,
    F.silu: nn.SiLU, F.softplus: nn.Softplus, F.leaky_relu: nn.LeakyReLU,
}


def _part(root: nn.Module, seg: list[fx.Node]) -> Part:
    """One stage: the submodule itself, an activation module, or a ``GraphModule`` of the part."""
    first = seg[0]
    inputs = [a for a in first.all_input_nodes if a.op != "get_attr"]
    if len(seg) == 1 and len(inputs) == 1:
        single = _single(root, first)
        if single is not None:
            return single
    return _name(root, seg), _graph_module(root, seg)


def _single(root: nn.Module, node: fx.Node) -> Part | None:
    """A submodule called on the stage input alone, or a recognised functional activation."""
    if node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        return str(node.target), root.get_submodule(str(node.target))
    if node.op not in ("call_function", "call_method"):
        return None
    make = _ACTIVATIONS.get(node.target)
    extra = dict(node.kwargs)
    extra.pop("inplace", None)
    if make is nn.LeakyReLU and len(node.args) <= 2 and set(extra) <= {"negative_slope"}:
        slope = node.args[1] if len(node.args) == 2 else extra.get("negative_slope", 0.01)
        return node.name, nn.LeakyReLU(float(slope))
    if make is nn.Softplus and len(node.args) == 1 and set(extra) <= {"beta", "threshold"}:
        return node.name, nn.Softplus(**extra)
    if make is not None and len(node.args) == 1 and not extra:
        return node.name, make()
    if node.target is torch.flatten and tuple(node.args[1:]) == (1,) and not extra:
        return node.name, nn.Flatten()
    return None


def _graph_module(root: nn.Module, seg: list[fx.Node]) -> fx.GraphModule:
    """The part as a module of one input: its nodes, and the ``get_attr`` nodes they read."""
    graph = fx.Graph()
    inside = set(seg)
    outer = [a for n in seg for a in n.all_input_nodes if a not in inside and a.op != "get_attr"]
    env: dict[fx.Node, fx.Node] = {}
    x = graph.placeholder("x")
    for a in outer:
        env[a] = x  # the one value crossing the cut
    for n in seg:
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a not in env:
                env[a] = graph.node_copy(a)
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(env[seg[-1]])
    return fx.GraphModule(root, graph, class_name=f"Part_{seg[0].name}")


def _name(root: nn.Module, seg: list[fx.Node]) -> str:
    """The submodule that holds all of the part's module calls (``layer2.0: BasicBlock``), else the
    part's range of graph nodes."""
    targets = [str(n.target).split(".") for n in seg if n.op == "call_module"]
    prefix: list[str] = []
    if len(targets) > 1:
        for names in zip(*targets, strict=False):
            if len(set(names)) != 1:
                break
            prefix.append(names[0])
    if prefix:
        name = ".".join(prefix)
        return f"{name}: {type(root.get_submodule(name)).__name__}"
    return seg[0].name if len(seg) == 1 else f"{seg[0].name}..{seg[-1].name}"
