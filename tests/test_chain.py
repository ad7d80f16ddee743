"""``mg.Chain``: stages from an ``nn.Sequential`` or from dynamics, the plain forward, re-evaluation.

* one stage per child, weights are the child's trainable parameters (frozen ones are not weights);
* ``chain(x)`` is the plain forward pass and ``chain.parameters()`` are the model's own parameters;
* ``Stage.__call__(w, x)`` re-evaluates ``phi_t`` with substituted weights and never touches buffers
  (a train-mode BatchNorm's running statistics change only in the recorded forward pass);
* ``Chain.from_dynamics`` keeps an ``nn.Parameter`` as is, copies a plain tensor, batches a 1-D ``x0``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moreaugrad as mg
from helpers import (
    CHAIN_NAMES,
    DTYPE,
    DYNAMICS,
    as_chain,
    assert_rel_close,
    damped_tanh,
    make,
    plain_output,
    twin,
)
from moreaugrad.sweep import record


def test_one_stage_per_child():
    chain = mg.Chain(make("mlp").model)
    assert len(chain) == 5
    assert [s.type_name for s in chain.stages] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert [s.has_weights for s in chain.stages] == [True, False, True, False, True]
    assert [s.index for s in chain.stages] == [0, 1, 2, 3, 4]
    assert [slot.name for slot in chain.stages[0].slots] == ["weight", "bias"]

    layers = mg.Chain(make("mlp_layers").model)
    assert len(layers) == 3
    assert [s.type_name for s in layers.stages] == ["Sequential", "Sequential", "Linear"]
    assert [slot.name for slot in layers.stages[0].slots] == ["0.weight", "0.bias"]


def test_residual_block_is_one_stage():
    chain = mg.Chain(make("residual").model)
    assert len(chain) == 4
    block = chain.stages[1]
    assert block.type_name == "ResidualBlock"
    names = sorted(slot.name for slot in block.slots)
    assert names == ["lin1.bias", "lin1.weight", "lin2.bias", "lin2.weight"]


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_parameters_are_the_models(name):
    case = make(name)
    chain = as_chain(case.model)
    assert [id(p) for p in chain.parameters()] == [id(p) for p in case.model.parameters()]
    slots = [slot for stage in chain.stages for slot in stage.slots]
    if name in DYNAMICS:
        assert len(slots) == len(chain) == case.model.controls.shape[0]
        assert all(slot.param is case.model.controls for slot in slots)
        assert [slot.index for slot in slots] == list(range(len(chain)))
    else:
        assert {id(slot.param) for slot in slots} == {id(p) for p in case.model.parameters()}


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_forward_is_plain_forward(name):
    case = make(name)
    ref = twin(case.model)
    out = as_chain(case.model)(case.x)
    expected = plain_output(name, ref, case.x)
    assert out.dtype == DTYPE
    assert_rel_close(out.detach(), expected.detach(), 1e-12, name)
    for (n, b), (_, rb) in zip(case.model.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(b, rb), f"{name}: buffer {n} differs after one forward"


def test_frozen_parameters_are_not_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[0].weight.requires_grad_(False)
    chain = mg.Chain(model)
    assert [slot.name for slot in chain.stages[0].slots] == ["bias"]
    x = torch.randn(5, 3, dtype=DTYPE)
    y = torch.randn(5, 2, dtype=DTYPE)
    ref = twin(model)
    loss = mg.losses.SquaredLoss()(ref(x), y)
    expected = torch.autograd.grad(loss, [p for p in ref.parameters() if p.requires_grad])
    mg.Oracle(chain, mg.losses.SquaredLoss()).backward(x, y)
    assert model[0].weight.grad is None
    got = [p.grad for p in model.parameters() if p.requires_grad]
    for g, e in zip(got, expected, strict=True):
        assert_rel_close(g, e, 1e-10)


def test_stage_call_substitutes_weights():
    torch.manual_seed(0)
    lin = nn.Linear(3, 2).double()
    chain = mg.Chain(nn.Sequential(lin))
    stage = chain.stages[0]
    x = torch.randn(4, 3, dtype=DTYPE)
    w2 = torch.randn(2, 3, dtype=DTYPE)
    with torch.no_grad():
        assert torch.equal(stage({}, x), lin(x))
        # A missing entry takes the stage's current parameter (here the bias).
        assert_rel_close(stage({"weight": w2}, x), F.linear(x, w2, lin.bias), 1e-14)
    assert not torch.equal(w2, lin.weight)


def test_dynamics_stage_call_substitutes_control():
    case = make("dynamics")
    stage = case.model.stages[2]
    x = torch.randn(3, 3, dtype=DTYPE)
    w = torch.randn(3, dtype=DTYPE)
    with torch.no_grad():
        assert torch.equal(stage({}, x), damped_tanh(case.model.controls[2], x))
        assert torch.equal(stage({"w": w}, x), damped_tanh(w, x))


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: b.clone() for n, b in model.named_buffers()}


def test_batchnorm_buffers_untouched_by_reevaluation():
    """Only the recorded forward pass updates running statistics; ``site.phi`` and ``stage(w, x)``
    re-evaluate the train-mode BatchNorm (batch statistics) without touching them."""
    case = make("batchnorm")
    model = case.model
    chain = mg.Chain(model)
    before = _buffers(model)
    tape = record(chain, case.x)
    after_record = _buffers(model)
    assert int(after_record["1.num_batches_tracked"]) == int(before["1.num_batches_tracked"]) + 1
    assert not torch.equal(after_record["1.running_mean"], before["1.running_mean"])

    site = tape.sites[1]
    gen = torch.Generator().manual_seed(0)
    other = torch.randn(site.x_prev.shape, generator=gen, dtype=DTYPE)
    with torch.no_grad():
        again = site.phi()
        moved = site.phi(x=other)
        weighted = site.stage({"weight": 2 * site.w["weight"].detach()}, other)
    # Train-mode semantics: batch statistics of the input given, not the running ones.
    bn = twin(model[1])
    with torch.no_grad():
        assert_rel_close(moved, bn(other), 1e-12)
    assert torch.equal(again, site.x.detach())
    assert weighted.shape == other.shape
    for n, b in _buffers(model).items():
        assert torch.equal(b, after_record[n]), f"buffer {n} changed by a re-evaluation"


def test_batchnorm_chain_forward_updates_buffers_like_model():
    case = make("batchnorm")
    ref = twin(case.model)
    chain = mg.Chain(case.model)
    for _ in range(2):
        chain(case.x)
        ref(case.x)
    for (n, b), (_, rb) in zip(case.model.named_buffers(), ref.named_buffers(), strict=True):
        assert torch.equal(b, rb), n
    assert int(case.model[1].num_batches_tracked) == 2


def test_from_dynamics_keeps_parameter_and_batches_x0():
    controls = nn.Parameter(torch.randn(4, 3, dtype=DTYPE))
    x0 = torch.randn(3, dtype=DTYPE)
    chain = mg.Chain.from_dynamics(damped_tanh, controls, x0)
    assert chain.controls is controls
    assert list(chain.parameters()) == [controls]
    assert len(chain) == 4
    assert chain.x0.shape == (1, 3)
    assert torch.equal(chain.x0[0], x0)
    # An optimizer built on the caller's parameter moves the chain.
    opt = torch.optim.SGD([controls], lr=0.5)
    controls.grad = torch.ones_like(controls)
    opt.step()
    expected = x0[None]
    for w in controls:
        expected = damped_tanh(w, expected)
    assert_rel_close(chain().detach(), expected.detach(), 1e-14)


def test_from_dynamics_copies_plain_tensor():
    controls = torch.randn(5, 3, dtype=DTYPE)
    x0 = torch.randn(2, 3, dtype=DTYPE)
    chain = mg.Chain.from_dynamics(damped_tanh, controls, x0)
    assert isinstance(chain.controls, nn.Parameter)
    assert torch.equal(chain.controls, controls)
    assert chain.x0.shape == (2, 3)
    controls.zero_()
    x0.zero_()
    assert chain.controls.abs().sum() > 0
    assert chain.x0.abs().sum() > 0


def test_dynamics_chain_defaults_to_x0():
    case = make("dynamics")
    with torch.no_grad():
        assert torch.equal(case.model(), case.model(case.model.x0))
        assert torch.equal(case.model(), plain_output("dynamics", case.model, case.x))
