"""Bad input fails early, with the right exception type and a message that names the culprit.

One test per error (CONVENTIONS 6: validate at construction, name the field, print both shapes);
non-finite losses, directions and signals are reported as ``mg.NonFiniteError`` and never written
into ``.grad``.
"""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import moreaugrad as mg
from helpers import DTYPE, damped_tanh, make
from moreaugrad.rules.registry import LineRule


def _mlp_oracle(objective=None, **kwargs):
    case = make("mlp")
    oracle = mg.Oracle(mg.Chain(case.model), objective or case.objective, **kwargs)
    return case, oracle


# --- chains ----------------------------------------------------------------------------------


def test_chain_rejects_a_non_module():
    with pytest.raises(TypeError, match=r"must be an nn\.Module.*got function"):
        mg.Chain(lambda x: x)


def test_chain_rejects_module_list():
    with pytest.raises(TypeError, match=r"could not trace ModuleList"):
        mg.Chain(nn.ModuleList([nn.Linear(3, 2)]))


def test_chain_rejects_chain():
    chain = mg.Chain(nn.Sequential(nn.Linear(3, 2)))
    with pytest.raises(TypeError, match="already a Chain"):
        mg.Chain(chain)


def test_chain_rejects_empty_sequential():
    with pytest.raises(ValueError, match="at least one stage"):
        mg.Chain(nn.Sequential())


def test_network_chain_needs_input():
    case, oracle = _mlp_oracle()
    with pytest.raises(ValueError, match="x is required"):
        oracle.backward(None, case.y)


def test_input_must_be_tensor():
    case, oracle = _mlp_oracle()
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        oracle.backward([[1.0, 2.0, 3.0, 4.0]], case.y)


def test_input_shape_mismatch_names_stage_and_shape():
    case, oracle = _mlp_oracle()
    x = torch.randn(5, 7, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"stage 1/5 \(Linear\(in_features=4.*shape \(5, 7\)"):
        oracle.backward(x, case.y)
    assert all(p.grad is None for p in case.model.parameters())


def test_shape_mismatch_in_a_later_stage():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(5, 3)).double()
    oracle = mg.Oracle(model, mg.losses.CrossEntropy())
    with pytest.raises(ValueError, match=r"stage 3/3 \(Linear\(in_features=5.*shape \(2, 6\)"):
        oracle.backward(torch.randn(2, 4, dtype=DTYPE), torch.tensor([0, 1]))


def test_input_dtype_mismatch():
    case, oracle = _mlp_oracle()
    with pytest.raises(TypeError, match=r"input dtype torch\.float32 .*chain's dtype torch\.float64"):
        oracle.backward(case.x.float(), case.y)


def test_dynamics_input_dtype_mismatch():
    case = make("dynamics")
    oracle = mg.Oracle(case.model, case.objective)
    with pytest.raises(TypeError, match=r"dtype torch\.float32 does not match"):
        oracle.backward(case.x.float(), case.y)


# --- objectives ------------------------------------------------------------------------------


def test_target_batch_size_mismatch():
    case, oracle = _mlp_oracle()
    with pytest.raises(ValueError, match=re.escape("target shape (4,) and output shape (5, 3)")):
        oracle.backward(case.x, case.y[:4])


def test_squared_loss_target_shape_mismatch():
    case = make("residual")
    oracle = mg.Oracle(case.model, case.objective)
    y = torch.randn(5, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match=re.escape("target shape (5, 3) does not match output shape (5, 2)")):
        oracle.backward(case.x, y)


def test_squared_loss_target_dtype_mismatch():
    case = make("residual")
    with pytest.raises(TypeError, match=r"target dtype torch\.float32 .*output dtype torch\.float64"):
        mg.Oracle(case.model, case.objective).backward(case.x, case.y.float())


def test_squared_loss_integer_labels_out_of_range():
    """Like CrossEntropy, an out-of-range label is a ValueError naming the range (not torch's
    RuntimeError from ``F.one_hot``)."""
    z = torch.randn(2, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match=r"SquaredLoss: class indices must lie in \[0, 3\)"):
        mg.losses.SquaredLoss()(z, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"SquaredLoss: class indices must lie in \[0, 3\)"):
        mg.losses.SquaredLoss()(z, torch.tensor([-1, 0]))
    # Boolean labels are class indices 0 and 1, and read as such in the message.
    with pytest.raises(ValueError, match=re.escape("in [0, 1), got range [0, 1]")):
        mg.losses.SquaredLoss()(z[:, :1], torch.tensor([False, True]))


def test_cross_entropy_float_targets():
    case, oracle = _mlp_oracle()
    with pytest.raises(ValueError, match=r"integer class indices.*dtype torch\.float64"):
        oracle.backward(case.x, case.y.double())


def test_cross_entropy_label_out_of_range():
    case, oracle = _mlp_oracle()
    y = case.y.clone()
    y[0] = 3
    with pytest.raises(ValueError, match=re.escape("class indices must lie in [0, 3), got range [0, 3]")):
        oracle.backward(case.x, y)


def test_cross_entropy_negative_label():
    z = torch.randn(2, 3, dtype=DTYPE)
    with pytest.raises(ValueError, match=re.escape("got range [-1, 1]")):
        mg.losses.CrossEntropy()(z, torch.tensor([-1, 1]))


def test_objective_must_return_scalar():
    case, oracle = _mlp_oracle(objective=lambda out, y: out.sum(dim=1))
    with pytest.raises(ValueError, match=r"scalar tensor, got \(5,\)"):
        oracle.backward(case.x, case.y)


# --- non-finite values -----------------------------------------------------------------------


def test_non_finite_input():
    case, oracle = _mlp_oracle()
    x = case.x.clone()
    x[0, 0] = float("inf")
    with pytest.raises(mg.NonFiniteError, match=re.escape("the input x is not finite (1 of 20 entries)")):
        oracle.backward(x, case.y)
    assert all(p.grad is None for p in case.model.parameters())


def test_non_finite_loss():
    # An infinite constant: the loss is inf, its gradient (the signal) is finite.
    case, oracle = _mlp_oracle(objective=lambda out, y: out.sum() + float("inf"))
    with pytest.raises(mg.NonFiniteError, match="loss is not finite"):
        oracle.backward(case.x, case.y)
    assert all(p.grad is None for p in case.model.parameters())


def test_non_finite_loss_comes_before_an_underflowing_direction():
    """A float16 model whose directions underflow and whose loss is infinite (an indicator term):
    the loss is the error reported, as before the directions are cast."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).half()
    oracle = mg.Oracle(model, lambda z, y: (z.float() * 1e-12).sum() + float("inf"), mg.rules.backprop())
    with pytest.raises(mg.NonFiniteError, match=re.escape("the loss is not finite (inf)")):
        oracle(torch.randn(5, 4).half(), None)
    finite = mg.Oracle(model, lambda z, y: (z.float() * 1e-12).sum(), mg.rules.backprop())
    with pytest.raises(mg.UnderflowError, match="underflows to 0 in torch.float16"):
        finite(torch.randn(5, 4).half(), None)


def test_non_finite_objective_signal_names_the_stage():
    # sqrt(0 * z) is 0, a finite loss, but its gradient is 0 * inf = nan.
    case, oracle = _mlp_oracle(objective=lambda out, y: torch.sqrt(0.0 * out).sum())
    with pytest.raises(mg.NonFiniteError, match=re.escape(
            "the signal entering stage 5 (Linear) (from the objective) is not finite (15 of 15 entries)")):
        oracle.backward(case.x, case.y)
    assert all(p.grad is None for p in case.model.parameters())


def test_non_finite_state_signal_names_the_stage():
    # A NaN weight in stage 3 makes the signal leaving it (entering stage 2) NaN; the loss too.
    case = make("mlp")
    with torch.no_grad():
        case.model[2].weight[0, 0] = float("nan")
    grad = mg.rules.Grad()
    per_stage = mg.rules.Rule(objective=grad, state=[grad] * 5, weight=[grad] * 5)
    # Fused (backprop takes the objective's gradient inside the stages' call) or not, the same.
    for rule in (None, per_stage):
        with pytest.raises(mg.NonFiniteError, match=r"the signal entering stage 5 \(Linear\)"):
            mg.Oracle(case.model, case.objective, rule).backward(case.x, case.y)
        assert all(p.grad is None for p in case.model.parameters())
    case = make("mlp")
    with torch.no_grad():
        case.model[4].weight.zero_()
        case.model[2].weight[0, 0] = float("inf")
    # Stage by stage (a rule given per stage is not fused), the signal is checked where it forms.
    oracle = mg.Oracle(case.model, lambda out, y: out.sum(), per_stage)
    with pytest.raises(mg.NonFiniteError,
                       match=re.escape("the signal entering stage 2 (ReLU) is not finite")):
        oracle.backward(case.x, case.y)
    # Backprop's fused sweep forms no interior signal (as loss.backward()); the loss reports it.
    oracle = mg.Oracle(case.model, lambda out, y: out.sum())
    with pytest.raises(mg.NonFiniteError, match=re.escape("the loss is not finite")):
        oracle.backward(case.x, case.y)


class RootScale(nn.Module):
    """``x * sqrt(w)`` at ``w = 0``: the signal ``sqrt(w) lam`` is 0, the weight gradient infinite."""

    def __init__(self, width: int):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(width, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sqrt(self.w)


def test_non_finite_direction():
    torch.manual_seed(0)
    model = nn.Sequential(RootScale(3), nn.Linear(3, 2).double())
    oracle = mg.Oracle(model, mg.losses.SquaredLoss())
    x, y = torch.randn(4, 3, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE)
    with pytest.raises(mg.NonFiniteError, match=r"direction of stage 1, parameter 'w'"):
        oracle.backward(x, y)
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(mg.NonFiniteError, match="direction of stage 1"):
        oracle.step(x, y)


def test_non_finite_direction_is_a_floating_point_error():
    assert issubclass(mg.NonFiniteError, FloatingPointError)


class Sqrt(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sqrt(x)


def test_non_finite_input_signal():
    """``signal_0`` is a signal too: an infinite one is reported, not written into ``x.grad``.

    sqrt has an infinite derivative at 0; the weights after it see finite inputs, so only the input
    signal is non-finite.
    """
    torch.manual_seed(0)
    model = nn.Sequential(Sqrt(), nn.Linear(3, 2)).double()
    x = torch.tensor([[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]], dtype=DTYPE, requires_grad=True)
    oracle = mg.Oracle(model, mg.losses.SquaredLoss())
    with pytest.raises(mg.NonFiniteError, match="not finite"):
        oracle.backward(x, torch.zeros(2, 2, dtype=DTYPE))
    assert x.grad is None


# --- rules and regularisers ------------------------------------------------------------------


@pytest.mark.parametrize("mu", [0, 0.0, -1, float("nan"), float("inf"), True])
def test_l2_rejects_bad_mu(mu):
    with pytest.raises(ValueError, match=r"L2: mu must be a finite number > 0, got"):
        mg.losses.L2(mu)


@pytest.mark.parametrize("step", [0, -1.0, float("nan"), float("inf")])
def test_backprop_rejects_bad_step(step):
    with pytest.raises(ValueError, match=r"backprop: step must be a finite number > 0"):
        mg.rules.backprop(step=step)


def test_regularizer_list_wrong_length():
    case = make("mlp")
    with pytest.raises(ValueError, match=r"one entry per stage \(5\), got 2"):
        mg.Oracle(mg.Chain(case.model), case.objective, regularizer=[mg.losses.L2(1.0), None])


def test_regularizer_must_have_grad():
    case = make("mlp")
    with pytest.raises(TypeError, match="regularizer must be callable with a .grad method.*got float"):
        mg.Oracle(mg.Chain(case.model), case.objective, regularizer=0.1)


def test_oracle_rejects_non_callable_objective():
    case = make("mlp")
    with pytest.raises(TypeError, match="objective: must be callable.*got str"):
        mg.Oracle(mg.Chain(case.model), "cross_entropy")


def test_oracle_rejects_non_rule():
    case = make("mlp")
    with pytest.raises(TypeError, match="rule must be a moreaugrad.rules.Rule.*got Grad"):
        mg.Oracle(mg.Chain(case.model), case.objective, mg.rules.Grad())


def test_rule_rejects_bad_objective():
    with pytest.raises(TypeError, match=r"objective must have an \.objective"):
        mg.rules.Rule(objective=object(), state=mg.rules.Grad(), weight=mg.rules.Grad())


@pytest.mark.parametrize("line", ["state", "weight"])
def test_rule_per_stage_sequence_wrong_length(line):
    G = mg.rules.Grad
    spec = {"state": G(), "weight": G(), line: [G(), G()]}
    case, oracle = _mlp_oracle(rule=mg.rules.Rule(objective=G(), **spec))
    with pytest.raises(ValueError, match=rf"{line} has 2 per-stage rules but the chain has 5 stages"):
        oracle.backward(case.x, case.y)


class Unregistered(LineRule):
    """A line rule with no registered closed form or generic function."""


def test_missing_rule_names_stage_and_rule():
    G = mg.rules.Grad
    case, oracle = _mlp_oracle(rule=mg.rules.Rule(objective=G(), state=G(), weight=Unregistered()))
    with pytest.raises(NotImplementedError, match="no weight rule Unregistered .*for stage type Linear"):
        oracle.backward(case.x, case.y)


# --- dynamics --------------------------------------------------------------------------------


def test_from_dynamics_rejects_non_callable_phi():
    with pytest.raises(TypeError, match="phi must be callable, got int"):
        mg.Chain.from_dynamics(3, torch.zeros(4, 1, dtype=DTYPE), torch.zeros(2, dtype=DTYPE))


@pytest.mark.parametrize("controls, got", [
    (torch.tensor(1.0, dtype=DTYPE), r"got \(\)"),
    (torch.zeros(0, 3, dtype=DTYPE), r"got \(0, 3\)"),
    ([[0.0, 1.0]], "got list"),
])
def test_from_dynamics_rejects_bad_controls(controls, got):
    with pytest.raises(ValueError, match=r"controls must be a tensor of shape \(tau, \.\.\.\).*" + got):
        mg.Chain.from_dynamics(damped_tanh, controls, torch.zeros(3, dtype=DTYPE))


@pytest.mark.parametrize("x0, got", [(torch.tensor(0.0, dtype=DTYPE), r"got \(\)"), (None, "got NoneType")])
def test_from_dynamics_rejects_bad_x0(x0, got):
    with pytest.raises(ValueError, match=r"x0 must be a tensor of shape \(d,\) or \(B, d\).*" + got):
        mg.Chain.from_dynamics(damped_tanh, torch.zeros(4, 3, dtype=DTYPE), x0)


def test_from_dynamics_rejects_dtype_mismatch():
    with pytest.raises(TypeError, match=r"controls and x0 must share dtype.*torch\.float64.*torch\.float32"):
        mg.Chain.from_dynamics(damped_tanh, torch.zeros(4, 3, dtype=DTYPE), torch.zeros(3))


def test_pendulum_rejects_bad_horizon():
    for horizon in (0, 2.5, True):
        with pytest.raises(ValueError, match="horizon must be an int >= 1"):
            mg.control.Pendulum(horizon=horizon)

