"""``mg.Oracle``: ``backward`` drives ``torch.optim`` like ``loss.backward()``; ``step`` is the rule's update.

* SGD with momentum and Adam driven by ``Oracle.backward`` for 5 steps match the same loops driven by
  ``loss.backward()`` on a deep copy, on every chain of the registry, with and without ``L2(mu)``;
* a train-mode BatchNorm's running statistics after 3 training steps match plain training;
* ``Oracle.step`` with ``backprop(step=s)`` is one gradient-descent step and leaves ``.grad`` alone;
* the result's fields (loss, output, directions, steps) and accumulation into ``.grad``.
"""

from __future__ import annotations

import pytest
import torch

import moreaugrad as mg
from helpers import (
    CHAIN_NAMES,
    DYNAMICS,
    as_chain,
    assert_rel_close,
    make,
    plain_loss,
    plain_output,
    twin,
)

OPTIMIZERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
}


def _train_pair(name, make_opt, steps, regularizer=None, mus=None):
    """Train one copy with ``Oracle.backward`` and one with ``loss.backward()``; return both models."""
    case = make(name)
    ref = twin(case.model)
    chain = as_chain(case.model)
    oracle = mg.Oracle(chain, case.objective, mg.rules.backprop(), regularizer=regularizer)
    opt = make_opt(list(case.model.parameters()))
    ref_opt = make_opt(list(ref.parameters()))
    ref_weights = _stage_weights(name, ref) if mus is not None else None
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        result = oracle.backward(case.x, case.y)
        opt.step()

        ref_opt.zero_grad()
        loss = plain_loss(name, ref, case.x, case.y, case.objective)
        if mus is not None:
            for mu, ws in zip(mus, ref_weights, strict=True):
                if mu is not None:
                    loss = loss + sum(0.5 * mu * w.pow(2).sum() for w in ws())
        loss.backward()
        ref_opt.step()
        losses.append((result.loss.item(), loss.item()))
    return case, ref, losses


def _stage_weights(name, model):
    """Per stage, a function returning that stage's weight tensors of ``model`` (for the penalty)."""
    if name in DYNAMICS:
        return [lambda t=t: [model.controls[t]] for t in range(model.controls.shape[0])]
    return [lambda child=child: [p for p in child.parameters() if p.requires_grad] for child in model]


def _assert_same_state(name, model, ref, rtol=1e-10):
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        assert_rel_close(p.detach(), q.detach(), rtol, f"{name}: {n}")
    for (n, b), (_, c) in zip(model.named_buffers(), ref.named_buffers(), strict=True):
        if b.is_floating_point():
            assert_rel_close(b, c, rtol, f"{name}: buffer {n}")
        else:
            assert torch.equal(b, c), f"{name}: buffer {n}"


@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_optimizer_loop_matches_loss_backward(name, opt_name):
    case, ref, losses = _train_pair(name, OPTIMIZERS[opt_name], steps=5)
    for got, expected in losses:
        assert abs(got - expected) <= 1e-12 * abs(expected)
    # The loop really trained: the parameters moved.
    assert any(not torch.equal(p, q) for p, q in zip(case.model.parameters(), make(name).model.parameters(),
                                                     strict=True))
    _assert_same_state(name, case.model, ref)


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_l2_regularizer_matches_penalized_loss(name):
    mu = 0.3
    case, ref, losses = _train_pair(name, OPTIMIZERS["sgd_momentum"], steps=5,
                                    regularizer=mg.losses.L2(mu), mus=[mu] * len(as_chain(make(name).model)))
    for got, expected in losses:
        assert abs(got - expected) <= 1e-12 * abs(expected)
    _assert_same_state(name, case.model, ref)


def test_l2_gradient_and_loss_per_stage():
    """A per-stage list: ``d_t = grad_{w_t} h + mu_t w_t`` and ``loss = h + sum_t mu_t/2 ||w_t||^2``."""
    case = make("mlp")
    mus = [0.5, None, None, None, 2.0]
    regs = [None if mu is None else mg.losses.L2(mu) for mu in mus]
    ref = twin(case.model)
    loss = plain_loss("mlp", ref, case.x, case.y, case.objective)
    penalty = 0.5 * 0.5 * sum(p.pow(2).sum() for p in ref[0].parameters()) \
        + 0.5 * 2.0 * sum(p.pow(2).sum() for p in ref[4].parameters())
    total = loss + penalty
    expected = torch.autograd.grad(total, list(ref.parameters()))
    result = mg.Oracle(mg.Chain(case.model), case.objective, regularizer=regs).backward(case.x, case.y)
    assert abs(result.loss.item() - total.item()) <= 1e-12 * total.item()
    assert penalty.item() > 0.01 * loss.item()
    for (n, p), e in zip(case.model.named_parameters(), expected, strict=True):
        assert_rel_close(p.grad, e, 1e-10, n)


def test_batchnorm_running_stats_match_plain_training():
    case = make("batchnorm")
    ref = twin(case.model)
    oracle = mg.Oracle(mg.Chain(case.model), case.objective)
    opt = torch.optim.SGD(case.model.parameters(), lr=0.1)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        oracle.backward(case.x, case.y)
        opt.step()
        ref_opt.zero_grad()
        case.objective(ref(case.x), case.y).backward()
        ref_opt.step()
    bn, ref_bn = case.model[1], ref[1]
    assert int(bn.num_batches_tracked) == int(ref_bn.num_batches_tracked) == 3
    assert_rel_close(bn.running_mean, ref_bn.running_mean, 1e-10, "running_mean")
    assert_rel_close(bn.running_var, ref_bn.running_var, 1e-10, "running_var")
    # The statistics moved away from their initial values (0 and 1).
    assert bn.running_mean.abs().max() > 0.1
    _assert_same_state("batchnorm", case.model, ref)


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_step_is_gradient_descent(name):
    s = 0.125
    case = make(name)
    ref = twin(case.model)
    loss = plain_loss(name, ref, case.x, case.y, case.objective)
    ref_params = list(ref.parameters())
    grads = torch.autograd.grad(loss, ref_params)
    with torch.no_grad():
        expected = [p - s * g for p, g in zip(ref_params, grads, strict=True)]

    model_params = list(case.model.parameters())
    sentinel = torch.full_like(model_params[0], 7.0)
    model_params[0].grad = sentinel.clone()
    result = mg.Oracle(as_chain(case.model), case.objective, mg.rules.backprop(step=s)).step(case.x, case.y)
    assert abs(result.loss.item() - loss.item()) <= 1e-12 * abs(loss.item())  # the loss before the step
    assert all(st is None or st == s for st in result.steps)
    for p, e in zip(model_params, expected, strict=True):
        assert_rel_close(p.detach(), e, 1e-10, name)
    # .grad is untouched: the one that was set keeps its value, the others stay None.
    assert torch.equal(model_params[0].grad, sentinel)
    assert all(p.grad is None for p in model_params[1:])


def test_result_fields():
    case = make("mlp")
    ref = twin(case.model)
    out = ref(case.x)
    loss = case.objective(out, case.y)
    result = mg.Oracle(mg.Chain(case.model), case.objective, mg.rules.backprop(step=0.5)).backward(
        case.x, case.y)
    assert result.loss.shape == () and not result.loss.requires_grad
    assert abs(result.loss.item() - loss.item()) <= 1e-12 * loss.item()
    assert not result.output.requires_grad
    assert_rel_close(result.output, out.detach(), 1e-12)
    assert [d is None for d in result.directions] == [False, True, False, True, False]
    assert result.steps == [0.5, None, 0.5, None, 0.5]
    assert len(result.info) == 5
    # From zero, .grad holds exactly the directions.
    for stage, d in zip(mg.Chain(case.model).stages, result.directions, strict=True):
        for slot in stage.slots:
            assert torch.equal(slot.param.grad, d[slot.name])


@pytest.mark.parametrize("name", ["mlp", "pendulum"])
def test_backward_accumulates_like_loss_backward(name):
    case = make(name)
    oracle = mg.Oracle(as_chain(case.model), case.objective)
    x = case.x.clone().requires_grad_(True)
    oracle.backward(x, case.y)
    once = [p.grad.clone() for p in case.model.parameters()]
    x_once = x.grad.clone()
    oracle.backward(x, case.y)
    for p, g in zip(case.model.parameters(), once, strict=True):
        assert_rel_close(p.grad, 2 * g, 1e-14)
    assert_rel_close(x.grad, 2 * x_once, 1e-14)


def test_oracle_wraps_sequential_and_defaults_to_backprop():
    case = make("residual")
    ref = twin(case.model)
    oracle = mg.Oracle(case.model, case.objective)
    assert isinstance(oracle.chain, mg.Chain)
    assert len(oracle.chain) == 4
    oracle.backward(case.x, case.y)
    expected = torch.autograd.grad(case.objective(ref(case.x), case.y), list(ref.parameters()))
    for p, e in zip(case.model.parameters(), expected, strict=True):
        assert_rel_close(p.grad, e, 1e-10)


def test_per_stage_rules():
    """A sequence with one weight rule per stage, or a function of the site, sets per-stage steps."""
    case = make("mlp")
    chain = mg.Chain(case.model)
    G = mg.rules.Grad
    by_list = mg.rules.Rule(objective=G(), state=[G()] * 5,
                            weight=[G(0.1), G(), G(0.2), G(), G(0.3)])
    result = mg.Oracle(chain, case.objective, by_list).backward(case.x, case.y)
    assert result.steps == [0.1, None, 0.2, None, 0.3]
    by_fn = mg.rules.Rule(objective=G(), state=G(), weight=lambda site: G(float(site.t)))
    result = mg.Oracle(chain, case.objective, by_fn).backward(case.x, case.y)
    assert result.steps == [1.0, None, 3.0, None, 5.0]

    # Oracle.step applies each stage's own step.
    before = [p.detach().clone() for p in case.model.parameters()]
    ref = twin(case.model)
    loss = plain_loss("mlp", ref, case.x, case.y, case.objective)
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    mg.Oracle(chain, case.objective, by_list).step(case.x, case.y)
    steps = [0.1, 0.1, 0.2, 0.2, 0.3, 0.3]
    for p, b, g, s in zip(case.model.parameters(), before, grads, steps, strict=True):
        assert_rel_close(p.detach(), b - s * g, 1e-10)


def test_pendulum_default_input_is_x0():
    case = make("pendulum")
    chain = case.model
    ref = twin(chain)
    x0 = chain.x0.clone()
    loss = plain_loss("pendulum", ref, x0, None, case.objective)
    (expected,) = torch.autograd.grad(loss, [ref.controls])
    result = mg.Oracle(chain, case.objective).backward()
    assert abs(result.loss.item() - loss.item()) <= 1e-12 * loss.item()
    assert_rel_close(chain.controls.grad, expected, 1e-10)
    assert_rel_close(result.output, plain_output("pendulum", ref, x0).detach(), 1e-12)


def test_non_leaf_input_signal_reaches_leaf():
    """Like ``loss.backward()``, the signal of a non-leaf input ``x = 2 * base`` flows on to
    ``base.grad`` (and the oracle does not read ``.grad`` of a non-leaf, which warns)."""
    case = make("mlp")
    ref = make("mlp").model
    ref_base = case.x.clone().requires_grad_(True)
    case.objective(ref(2.0 * ref_base), case.y).backward()
    base = case.x.clone().requires_grad_(True)
    mg.Oracle(mg.Chain(case.model), case.objective).backward(2.0 * base, case.y)
    assert base.grad is not None
    assert_rel_close(base.grad, ref_base.grad, 1e-10)
    for p, q in zip(case.model.parameters(), ref.parameters(), strict=True):
        assert_rel_close(p.grad, q.grad, 1e-10)


def test_calling_the_oracle_has_no_side_effect_on_grad_or_weights():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.arange(5) % 2
    before = [p.detach().clone() for p in model.parameters()]
    oracle = mg.Oracle(model, mg.losses.CrossEntropy())
    result = oracle(x, y)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    oracle.backward(x, y)
    flat = [d for ds in result.directions if ds for d in ds.values()]
    for p, d in zip(model.parameters(), flat, strict=True):
        torch.testing.assert_close(p.grad, d, rtol=0, atol=0)
