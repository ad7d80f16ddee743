"""A shared registry of small float64 chains, and the comparisons the tests make on them.

Every factory in :data:`CHAINS` takes no argument and returns a :class:`Case`
``(model, x, y, objective)`` built from a fixed seed, so a test that runs a rule "on every chain"
parametrizes over ``CHAIN_NAMES`` (CONVENTIONS 7; optimistix ``tests/helpers.py``). ``model`` is
an ``nn.Sequential`` for networks (wrap it with :func:`as_chain`) and an ``mg.Chain`` for dynamics.
The chains are tiny on purpose: the whole suite runs in seconds on a CPU.

The global default dtype is never changed: models are built with ``.double()`` and inputs in
``torch.float64``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

import moreaugrad as mg

DTYPE = torch.float64


class Case(NamedTuple):
    """One registry entry: a model (or dynamics chain), its input, its target and its objective."""

    model: nn.Module
    x: Tensor
    y: Any
    objective: Callable[[Tensor, Any], Tensor]


class ResidualBlock(nn.Module):
    """``x + lin2(relu(lin1(x)))``: one stage of a chain although it holds two linear maps."""

    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.lin2(torch.relu(self.lin1(x)))


def _seeded(seed: int, build: Callable[[], Case]) -> Case:
    # fork_rng keeps the global generator untouched, so test order never changes a case.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _labels(n: int, classes: int) -> Tensor:
    # Every class appears, so CrossEntropy and one-hot targets are never degenerate.
    return torch.arange(n) % classes


def mlp() -> Case:
    """Linear and ReLU as separate stages (5 stages); the first ReLU is in-place."""

    def build() -> Case:
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(inplace=True), nn.Linear(6, 5), nn.ReLU(),
                              nn.Linear(5, 3)).double()
        x = torch.randn(5, 4, dtype=DTYPE)
        return Case(model, x, _labels(5, 3), mg.losses.CrossEntropy())

    return _seeded(0, build)


def mlp_layers() -> Case:
    """The same MLP (same weights, input and target as :func:`mlp`) grouped into 3 layer stages."""

    def build() -> Case:
        model = nn.Sequential(nn.Sequential(nn.Linear(4, 6), nn.ReLU()),
                              nn.Sequential(nn.Linear(6, 5), nn.ReLU()),
                              nn.Linear(5, 3)).double()
        x = torch.randn(5, 4, dtype=DTYPE)
        return Case(model, x, _labels(5, 3), mg.losses.CrossEntropy())

    return _seeded(0, build)


def convnet() -> Case:
    """Conv2d, MaxPool2d, ReLU, Conv2d, AvgPool2d, Flatten, Linear on a 2x1x8x8 input.

    MaxPool comes before ReLU (the two commute) so that its windows hold no ties: after a ReLU,
    windows of exact zeros would make the finite-difference adjoint test ill-posed.
    """

    def build() -> Case:
        model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
                              nn.Conv2d(3, 4, 3, padding=1), nn.AvgPool2d(2), nn.Flatten(),
                              nn.Linear(16, 3)).double()
        x = torch.randn(2, 1, 8, 8, dtype=DTYPE)
        return Case(model, x, _labels(2, 3), mg.losses.CrossEntropy())

    return _seeded(1, build)


def residual() -> Case:
    """A residual block used as one stage, between a Linear and a Tanh; squared loss."""

    def build() -> Case:
        model = nn.Sequential(nn.Linear(4, 5), ResidualBlock(5, 6), nn.Tanh(), nn.Linear(5, 2)).double()
        x = torch.randn(5, 4, dtype=DTYPE)
        y = torch.randn(5, 2, dtype=DTYPE)
        return Case(model, x, y, mg.losses.SquaredLoss())

    return _seeded(2, build)


def batchnorm() -> Case:
    """A BatchNorm1d stage in train mode; squared loss on one-hot encoded integer labels."""

    def build() -> Case:
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()
        model.train()
        # Non-trivial affine parameters so their gradients are generic.
        with torch.no_grad():
            model[1].weight.uniform_(0.5, 1.5)
            model[1].bias.normal_()
        x = 2.0 * torch.randn(8, 4, dtype=DTYPE) + 1.0
        return Case(model, x, _labels(8, 3), mg.losses.SquaredLoss())

    return _seeded(3, build)


PENDULUM = mg.control.Pendulum(horizon=20)


def pendulum() -> Case:
    """The pendulum of 000 App. E.1.1 over 20 steps, random torques, two starts (one at rest)."""

    def build() -> Case:
        controls = 2.0 * torch.randn(PENDULUM.horizon, 1, dtype=DTYPE)
        chain = PENDULUM.chain(controls)
        x = torch.tensor([[0.0, 0.0], [0.3, -0.2]], dtype=DTYPE)
        return Case(chain, x, None, PENDULUM.objective)

    return _seeded(4, build)


_A = torch.tensor([[0.5, -0.3, 0.2], [0.1, 0.4, -0.6], [-0.2, 0.3, 0.1]], dtype=DTYPE)


def damped_tanh(w: Tensor, x: Tensor) -> Tensor:
    """A smooth custom dynamics ``phi(w, x) = x + tanh(x A + w) / 2`` with a control ``w`` of shape (3,)."""
    return x + 0.5 * torch.tanh(x @ _A + w)


def dynamics() -> Case:
    """A chain from a custom ``phi`` with random nonzero controls (6 steps, batch of 3 starts)."""

    def build() -> Case:
        controls = torch.randn(6, 3, dtype=DTYPE)
        x0 = torch.randn(3, 3, dtype=DTYPE)
        chain = mg.Chain.from_dynamics(damped_tanh, controls, x0)
        y = torch.randn(3, 3, dtype=DTYPE)
        return Case(chain, x0.clone(), y, mg.losses.SquaredLoss())

    return _seeded(5, build)


CHAINS: dict[str, Callable[[], Case]] = {
    "mlp": mlp,
    "mlp_layers": mlp_layers,
    "convnet": convnet,
    "residual": residual,
    "batchnorm": batchnorm,
    "pendulum": pendulum,
    "dynamics": dynamics,
}
CHAIN_NAMES = list(CHAINS)

# The per-step map of each dynamics case, for the plain rollout that does not use moreaugrad.
DYNAMICS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "pendulum": PENDULUM.dynamics,
    "dynamics": damped_tanh,
}


def make(name: str) -> Case:
    """A fresh case from the registry."""
    return CHAINS[name]()


def as_chain(model: nn.Module) -> mg.Chain:
    """The case's model as a chain (an ``nn.Sequential`` is wrapped, a dynamics chain kept)."""
    return model if isinstance(model, mg.Chain) else mg.Chain(model)


def plain_output(name: str, model: nn.Module, x: Tensor) -> Tensor:
    """``x_tau`` by a plain forward pass that does not go through moreaugrad's stages.

    A network is called as ``model(x)``; a dynamics chain is rolled out by a Python loop
    ``x_t = phi(controls[t-1], x_{t-1})`` on its ``controls`` parameter.
    """
    if name in DYNAMICS:
        phi = DYNAMICS[name]
        for w in model.controls:
            x = phi(w, x)
        return x
    return model(x)


def plain_loss(name: str, model: nn.Module, x: Tensor, y: Any, objective: Callable) -> Tensor:
    """The loss ``h(x_tau)`` of :func:`plain_output`, differentiable by autograd."""
    return objective(plain_output(name, model, x), y)


def plain_states(name: str, model: nn.Module, x: Tensor) -> list[Tensor]:
    """``[x_0, ..., x_tau]`` of a plain forward pass, each a node of one autograd graph."""
    xs = [x]
    if name in DYNAMICS:
        for w in model.controls:
            xs.append(DYNAMICS[name](w, xs[-1]))
    else:
        for child in model:
            # The clone keeps x_{t-1} intact under an in-place child (the MLP's ReLU).
            xs.append(child(xs[-1].clone()))
    return xs


def twin(model: nn.Module) -> nn.Module:
    """An independent deep copy (parameters, buffers) for the plain-autograd reference."""
    return copy.deepcopy(model)


def params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable parameters, by name."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def rel_err(actual: Tensor, expected: Tensor) -> float:
    """``||actual - expected|| / ||expected||`` (0 when both are exactly zero)."""
    diff = (actual - expected).norm().item()
    scale = expected.norm().item()
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def assert_rel_close(actual: Tensor, expected: Tensor, rtol: float = 1e-10, what: str = "") -> None:
    """Relative error in norm at most ``rtol``, with matching shape and dtype."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}"


class NewtonSolver:
    """A reference inner solver with the ``solve(fun, z0, start, scale)`` interface: 30 full Newton
    steps with the exact Hessian (dense: small problems only), the converged answer tests compare to."""

    def solve(self, fun, z0, start=None, scale=None):
        def split(v):
            parts, i = [], 0
            for t in z0:
                parts.append(v[i:i + t.numel()].reshape(t.shape))
                i += t.numel()
            return parts

        def f(v):
            return fun(split(v)).sum()

        flat = torch.cat([t.reshape(-1) for t in z0])
        for _ in range(30):
            g = torch.autograd.functional.jacobian(f, flat)
            flat = flat - torch.linalg.solve(torch.autograd.functional.hessian(f, flat), g)
        return split(flat), mg.SolveInfo("newton", 30, 0.0, True)
