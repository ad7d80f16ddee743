"""The recorded tape and the backward sweep: backprop equals autograd, and the vjp rules are adjoint.

* the sweep with ``mg.rules.backprop()`` gives ``torch.autograd.grad`` of the plain forward loss on
  every chain of the registry, per parameter tensor, and the input signal ``signal_0``;
* every signal ``signal_t`` of the sweep is ``grad_{x_t} h``;
* the dot-product (adjoint) test ``<v, J u> = <J^T v, u>`` of the grad state and weight rules against
  central finite differences of ``phi_t`` on every stage of every chain (CONVENTIONS 7).
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
    params,
    plain_loss,
    plain_states,
    twin,
)
from moreaugrad.sweep import record, sweep


def _autograd_reference(name: str, with_input: bool):
    """Gradients of the plain forward loss wrt the parameters (and x), computed on a deep copy."""
    case = make(name)
    ref = twin(case.model)
    x = case.x.clone().requires_grad_(with_input)
    loss = plain_loss(name, ref, x, case.y, case.objective)
    inputs = [p for _, p in params(ref)] + ([x] if with_input else [])
    grads = torch.autograd.grad(loss, inputs)
    names = [n for n, _ in params(ref)]
    return case, loss.detach(), dict(zip(names, grads[:len(names)], strict=True)), \
        (grads[-1] if with_input else None)


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_backprop_sweep_equals_autograd(name):
    case, loss, expected, _ = _autograd_reference(name, with_input=False)
    oracle = mg.Oracle(as_chain(case.model), case.objective, mg.rules.backprop())
    result = oracle.backward(case.x, case.y)
    assert abs(result.loss.item() - loss.item()) <= 1e-12 * abs(loss.item())
    got = dict(params(case.model))
    assert got.keys() == expected.keys()
    for n, g in expected.items():
        assert_rel_close(got[n].grad, g, 1e-10, f"{name}: {n}")
    if name in DYNAMICS:
        # One control per step: the whole controls tensor gets its gradient row by row.
        assert list(got) == ["controls"]


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_input_signal_equals_autograd(name):
    case, _, expected, dx = _autograd_reference(name, with_input=True)
    x = case.x.clone().requires_grad_(True)
    result = mg.Oracle(as_chain(case.model), case.objective).backward(x, case.y)
    assert isinstance(result.input_signal, mg.Dual)
    assert_rel_close(result.input_signal.value, dx, 1e-10, f"{name}: signal_0")
    assert_rel_close(x.grad, dx, 1e-10, f"{name}: x.grad")
    for n, p in params(case.model):
        assert_rel_close(p.grad, expected[n], 1e-10, f"{name}: {n}")


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_no_input_signal_without_requires_grad(name):
    case = make(name)
    result = mg.Oracle(as_chain(case.model), case.objective).backward(case.x, case.y)
    assert result.input_signal is None
    assert case.x.grad is None


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_signals_are_state_gradients(name):
    """``signal_t = grad_{x_t} h(f(w, x_0))`` for ``t = 0..tau`` (000 Algo 3-5)."""
    case = make(name)
    ref = twin(case.model)
    xs = plain_states(name, ref, case.x.clone().requires_grad_(True))
    expected = torch.autograd.grad(case.objective(xs[-1], case.y), xs)

    chain = as_chain(case.model)
    tape = record(chain, case.x, input_signal=True)
    out = sweep(tape, mg.rules.backprop(), case.objective, case.y)
    assert len(out.signals) == len(chain) + 1
    for t, (s, e) in enumerate(zip(out.signals, expected, strict=True)):
        assert isinstance(s, mg.Dual)
        assert_rel_close(s.value, e, 1e-10, f"{name}: signal_{t}")

    # Without an input variable the list starts at signal_1.
    out1 = sweep(record(chain, case.x), mg.rules.backprop(), case.objective, case.y)
    assert len(out1.signals) == len(chain)
    for s, e in zip(out1.signals, expected[1:], strict=True):
        assert_rel_close(s.value, e, 1e-10, f"{name}: signal")


def test_granularity_does_not_change_backprop():
    """The same MLP as 5 stages (Linear, ReLU separate) or 3 layers gives the same gradients."""
    grads = []
    for name in ("mlp", "mlp_layers"):
        case = make(name)
        mg.Oracle(mg.Chain(case.model), case.objective).backward(case.x, case.y)
        grads.append([p.grad for _, p in params(case.model)])
    assert len(grads[0]) == len(grads[1]) == 6
    for a, b in zip(*grads, strict=True):
        assert_rel_close(a, b, 1e-12)


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_record_tape(name):
    case = make(name)
    chain = as_chain(case.model)
    ref = twin(case.model)
    tape = record(chain, case.x)
    tau = len(chain)
    assert len(tape.sites) == tau
    for t, site in enumerate(tape.sites):
        assert site.t == t + 1
        assert site.horizon == tau
        assert site.stage is chain.stages[t]
        # x_0 is a constant unless the input signal is asked for; later states are variables.
        assert site.needs_state == (t > 0)
        if t > 0:
            assert torch.equal(site.x_prev, tape.sites[t - 1].x.detach())
    assert torch.equal(tape.output, tape.sites[-1].x)
    expected = plain_states(name, ref, case.x)
    assert_rel_close(tape.output.detach(), expected[-1].detach(), 1e-12)
    assert record(chain, case.x, input_signal=True).sites[0].needs_state


def test_inplace_relu_keeps_recorded_input():
    """An in-place ReLU stage must not overwrite ``x_{t-1}``, which rules re-read."""
    case = make("mlp")
    chain = mg.Chain(case.model)
    assert chain.stages[1].inplace
    tape = record(chain, case.x)
    x_prev = tape.sites[1].x_prev
    assert (x_prev < 0).any()
    assert torch.equal(x_prev, tape.sites[0].x.detach())
    assert torch.equal(tape.sites[1].x.detach(), x_prev.clamp_min(0))


def test_backprop_costs_one_vjp_per_stage(monkeypatch):
    """One autograd call for the objective and all the stages, as ``loss.backward()``: the state
    and weight lines share a stage's vjp, consecutive plain-vjp stages share one call
    (``sweep.fused_vjp``) and the objective's gradient joins it; a rule given per stage is not
    fused, and takes one call for the objective and one per stage."""
    case = make("mlp")
    oracle = mg.Oracle(mg.Chain(case.model), case.objective)
    calls = []
    grad = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return grad(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    oracle.backward(case.x, case.y)
    assert len(calls) == 1
    calls.clear()
    tau = len(oracle.chain)
    line = mg.rules.Grad()
    per_stage = mg.rules.Rule(objective=line, state=[line] * tau, weight=[line] * tau)
    mg.Oracle(mg.Chain(case.model), case.objective, per_stage).backward(case.x, case.y)
    # Stage 1 (weights only), stages 2..5 (state, and weights on the Linear stages): 5 vjps.
    assert len(calls) == 1 + 5


# --- the dot-product (adjoint) test of the grad rules against finite differences ---------------

EPS = 1e-6
ADJOINT_RTOL = 1e-6


def _check_adjoint(lhs: float, rhs: float, what: str) -> None:
    assert abs(lhs - rhs) <= ADJOINT_RTOL * max(abs(lhs), abs(rhs)), \
        f"{what}: <v, J u> = {lhs!r} by finite differences, <J^T v, u> = {rhs!r}"


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_grad_state_rule_adjoint(name):
    case = make(name)
    tape = record(as_chain(case.model), case.x, input_signal=True)
    gen = torch.Generator().manual_seed(10)
    for site in tape.sites:
        x = site.x_prev.detach()
        u = torch.randn(x.shape, generator=gen, dtype=x.dtype)
        v = torch.randn(site.x.shape, generator=gen, dtype=x.dtype)
        with torch.no_grad():
            ju = (site.phi(x=x + EPS * u) - site.phi(x=x - EPS * u)) / (2 * EPS)
        lhs = (v * ju).sum().item()
        lam = mg.rules.Grad().state(site, mg.Dual(v)).signal
        assert isinstance(lam, mg.Dual)
        assert lam.value.shape == x.shape and lam.value.dtype == x.dtype
        rhs = (lam.value * u).sum().item()
        _check_adjoint(lhs, rhs, f"{name}: state rule of {site.stage}")


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_grad_weight_rule_adjoint(name):
    case = make(name)
    tape = record(as_chain(case.model), case.x, input_signal=True)
    gen = torch.Generator().manual_seed(11)
    checked = 0
    for site in tape.sites:
        if not site.stage.has_weights:
            continue
        v = torch.randn(site.x.shape, generator=gen, dtype=site.x.dtype)
        update = mg.rules.Grad(step=0.25).weight(site, mg.Dual(v))
        assert update.step == 0.25
        assert update.direction.keys() == site.w.keys()
        for n, w in site.w.items():
            w = w.detach()
            du = torch.randn(w.shape, generator=gen, dtype=w.dtype)
            with torch.no_grad():
                ju = (site.phi({n: w + EPS * du}) - site.phi({n: w - EPS * du})) / (2 * EPS)
            lhs = (v * ju).sum().item()
            rhs = (update.direction[n] * du).sum().item()
            _check_adjoint(lhs, rhs, f"{name}: weight rule of {site.stage}, {n}")
            checked += 1
    assert checked >= 1


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_site_phi_reproduces_recorded_output(name):
    """Re-evaluating ``phi_t`` at the recorded ``(w_t, x_{t-1})`` gives the recorded ``x_t``."""
    case = make(name)
    tape = record(as_chain(case.model), case.x)
    for site in tape.sites:
        with torch.no_grad():
            again = site.phi()
            explicit = site.stage({n: w.detach() for n, w in site.w.items()}, site.x_prev.detach())
        assert torch.equal(again, site.x.detach()), f"{name}: {site.stage}"
        assert torch.equal(explicit, site.x.detach()), f"{name}: {site.stage}"
