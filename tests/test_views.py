"""A chain is a view of the model as it is now (issue 15, Build 3, 4 and 6).

Parameters, ``requires_grad`` and children are read at every call; unused parameters keep
``.grad = None``; modules that are not their bare type (parametrized, hooked) get the generic rules;
a ``Sequential`` subclass with its own ``forward`` and a model on ``meta`` are refused by name; a
non-finite input or signal raises :class:`mg.NonFiniteError` in every preset. Every ``.grad`` is
compared with plain autograd on a deep copy, in float64, to 1e-12.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations

import moreaugrad as mg
from helpers import DTYPE, NewtonSolver, assert_rel_close, make, plain_loss
from moreaugrad.chain import plain
from moreaugrad.rules import lookup
from moreaugrad.sweep import record


def autograd_grads(model: nn.Module, x: torch.Tensor, y, objective, regularizer=None) -> dict:
    """``.grad`` of ``h(model(x)) (+ sum_p r(p))`` by plain autograd on a deep copy."""
    ref = copy.deepcopy(model)
    for p in ref.parameters():
        p.grad = None
    loss = objective(ref(x), y)
    if regularizer is not None:
        loss = loss + sum(regularizer(p) for p in ref.parameters() if p.requires_grad)
    loss.backward()
    return {n: p.grad for n, p in ref.named_parameters()}


def assert_grads(model: nn.Module, expected: dict, rtol: float = 1e-12) -> None:
    """Each ``.grad`` equals autograd's, and is None exactly where autograd's is."""
    got = dict(model.named_parameters())
    assert got.keys() == expected.keys()
    for n, g in expected.items():
        if g is None:
            assert got[n].grad is None, f"{n}: autograd leaves .grad None, the oracle wrote one"
        else:
            assert got[n].grad is not None, f"{n}: .grad is None, autograd's is not"
            assert_rel_close(got[n].grad, g, rtol, n)


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3)).double()


def data(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return torch.randn(8, 4, dtype=DTYPE), torch.arange(8) % 3


CE = mg.losses.CrossEntropy()


# --- 1. the chain follows the model ------------------------------------------------------------


def test_load_state_dict_assign_fills_grad_and_trains():
    model, (x, y) = mlp(0), data()
    oracle = mg.Oracle(model, CE)
    oracle.backward(x, y)
    sd = {k: v.clone() for k, v in mlp(7).state_dict().items()}
    model.load_state_dict(sd, assign=True)  # new Parameter objects
    expected = autograd_grads(model, x, y, CE)
    oracle.backward(x, y)
    assert_grads(model, expected)

    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = last = None
    for _ in range(20):
        opt.zero_grad()
        last = oracle.backward(x, y).loss.item()
        first = last if first is None else first
        opt.step()
    assert last < 0.7 * first, (first, last)  # 1.119 -> 0.746


def test_replaced_child_is_used():
    model, (x, y) = mlp(), data()
    chain = mg.Chain(model)
    oracle = mg.Oracle(chain, CE)
    old = chain.stages[2]
    torch.manual_seed(3)
    model[2] = nn.Linear(6, 5).double()
    assert chain.stages[2] is not old and chain.stages[2].module is model[2]
    expected = autograd_grads(model, x, y, CE)
    result = oracle.backward(x, y)
    assert_grads(model, expected)
    assert_rel_close(result.loss, CE(model(x), y).detach(), 1e-12)
    assert old.module.weight.grad is None


def test_stages_are_rebuilt_only_when_the_model_changes():
    model = mlp()
    chain = mg.Chain(model)
    first = chain.stages
    assert chain.stages is first
    model[0].bias.requires_grad_(False)
    assert chain.stages is not first
    assert [s.name for s in chain.stages[0].slots] == ["weight"]
    assert chain.stages[2] is not first[2] and chain.stages[2].module is first[2].module


def test_unfrozen_later_gets_grad_frozen_later_gets_none():
    model, (x, y) = mlp(), data()
    model[0].requires_grad_(False)
    oracle = mg.Oracle(model, CE)
    oracle.backward(x, y)
    assert model[0].weight.grad is None

    model.zero_grad()
    model[0].requires_grad_(True)
    model[2].requires_grad_(False)
    expected = autograd_grads(model, x, y, CE)
    assert expected["2.weight"] is None and expected["0.weight"] is not None
    oracle.backward(x, y)
    assert_grads(model, expected)
    # Oracle.step leaves a frozen layer where it is.
    w2 = model[2].weight.detach().clone()
    oracle.step(x, y)
    assert torch.equal(model[2].weight, w2)


def test_dynamics_chain_keeps_working_and_follows_new_controls():
    case = make("dynamics")
    chain = case.model
    oracle = mg.Oracle(chain, case.objective)
    for controls in (None, torch.randn(4, 3, dtype=DTYPE)):
        if controls is not None:
            chain.controls = nn.Parameter(controls)
        assert len(chain) == chain.controls.shape[0]
        ref = copy.deepcopy(chain)
        plain_loss("dynamics", ref, case.x, case.y, case.objective).backward()
        chain.zero_grad()
        oracle.backward(case.x, case.y)
        assert_rel_close(chain.controls.grad, ref.controls.grad, 1e-12)


def test_chain_that_grew_refuses_a_per_stage_regularizer():
    model, (x, y) = mlp(), data()
    reg = mg.losses.L2(0.1)
    shared = mg.Oracle(model, CE, regularizer=reg)
    per_stage = mg.Oracle(model, CE, regularizer=[reg, None, reg, None, reg])
    model.append(nn.Identity())
    assert len(shared.backward(x, y).directions) == 6
    with pytest.raises(ValueError, match=re.escape(
            "Oracle: the chain now has 6 stages but regularizer has 5 entries, one per stage")):
        per_stage.backward(x, y)


# --- 1b. a model on meta -----------------------------------------------------------------------


def test_meta_model_is_refused_then_works_after_to_empty():
    x, y = data()
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 6, dtype=DTYPE), nn.Tanh(), nn.Linear(6, 3, dtype=DTYPE))
    oracle = mg.Oracle(model, CE)
    with pytest.raises(ValueError, match=re.escape(
            "Oracle: the model's parameter '0.weight' is on the meta device (it has a shape but no "
            "values); call model.to_empty(device=...) and initialise it")):
        oracle.backward(x, y)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    for m in model:
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    expected = autograd_grads(model, x, y, CE)
    oracle.backward(x, y)
    assert_grads(model, expected)


def test_meta_buffer_is_refused():
    x, y = data()
    model = nn.Sequential(nn.Linear(4, 3, dtype=DTYPE),
                          nn.BatchNorm1d(3, affine=False, device="meta", dtype=DTYPE))
    with pytest.raises(ValueError, match=re.escape("the model's buffer '1.running_mean' is on the meta")):
        mg.Oracle(model, CE)(x, y)


# --- 1c. Sequential subclasses ---------------------------------------------------------------


class Skip(nn.Sequential):
    """``x + layers(x)``: a forward that a chain of its children would ignore."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + super().forward(x)


class Named(nn.Sequential):
    """A subclass that keeps ``nn.Sequential.forward``."""


def test_sequential_subclass_with_forward_is_traced_not_ignored():
    """Its forward (a skip connection) is what the chain computes: traced, one stage, with a warning."""
    torch.manual_seed(0)
    skip = Skip(nn.Linear(4, 4), nn.Tanh()).double()
    with pytest.warns(UserWarning, match="single stage"):
        chain = mg.Chain(skip)
    assert len(chain) == 1
    x, y = data()
    expected = autograd_grads(skip, x, y[:, None].double().expand(-1, 4), mg.losses.SquaredLoss())
    mg.Oracle(chain, mg.losses.SquaredLoss()).backward(x, y[:, None].double().expand(-1, 4))
    assert_grads(skip, expected)


def test_sequential_subclass_as_one_stage_and_without_forward():
    torch.manual_seed(0)
    x, y = torch.randn(6, 4, dtype=DTYPE), torch.arange(6) % 4
    for model in (nn.Sequential(Skip(nn.Linear(4, 4), nn.Tanh())).double(),
                  Named(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4)).double()):
        expected = autograd_grads(model, x, y, CE)
        mg.Oracle(model, CE).backward(x, y)
        assert_grads(model, expected)
    assert len(mg.Chain(model)) == 3


# --- 2. unused parameters --------------------------------------------------------------------


class Spare(nn.Module):
    """A linear map that also holds a parameter its forward never uses."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 5)
        self.spare = nn.Parameter(torch.ones(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def spare_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(Spare(), nn.Tanh(), nn.Linear(5, 3)).double()


def test_unused_parameter_is_found_from_the_graph():
    model, (x, _) = spare_model(), data()
    tape = record(mg.Chain(model), x)
    assert tape.sites[0].unused == frozenset({"spare"})
    assert tape.sites[2].unused == frozenset()


def test_unused_parameter_keeps_grad_none_and_adamw_leaves_it():
    model, (x, y) = spare_model(), data()
    expected = autograd_grads(model, x, y, CE)
    assert expected["0.spare"] is None
    result = mg.Oracle(model, CE).backward(x, y)
    assert sorted(result.directions[0]) == ["lin.bias", "lin.weight"]
    assert_grads(model, expected)

    spare, weight = model[0].spare.detach().clone(), model[0].lin.weight.detach().clone()
    torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5).step()
    assert torch.equal(model[0].spare, spare)
    assert not torch.equal(model[0].lin.weight, weight)

    model.zero_grad(set_to_none=True)
    mg.Oracle(model, CE, mg.rules.moreau()).backward(x, y)
    assert model[0].spare.grad is None and model[0].lin.weight.grad is not None


def test_regularised_unused_parameter_gets_the_regulariser_gradient():
    """``r_t(w_t)`` uses every weight: autograd's ``.grad`` of the spare parameter is ``mu w``."""
    model, (x, y) = spare_model(), data()
    reg = mg.losses.L2(0.3)
    expected = autograd_grads(model, x, y, CE, reg)
    mg.Oracle(model, CE, regularizer=reg).backward(x, y)
    assert_grads(model, expected)
    assert_rel_close(model[0].spare.grad, 0.3 * model[0].spare.detach(), 1e-12)


# --- 3. in-place ops inside a grouped stage ----------------------------------------------------


def test_inplace_first_op_inside_a_grouped_stage():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.ReLU(inplace=True), nn.Linear(5, 3))).double()
    x, y = data()
    chain = mg.Chain(model)
    assert [s.inplace for s in chain.stages] == [False, True]
    expected = autograd_grads(model, x, y, CE)
    mg.Oracle(chain, CE).backward(x, y)
    assert_grads(model, expected)
    tape = record(chain, x)
    assert (tape.sites[1].x_prev < 0).any()  # the recorded input survived the in-place ReLU
    result = mg.Oracle(chain, CE, mg.rules.moreau())(x, y)
    assert_rel_close(result.loss, CE(model(x), y).detach(), 1e-12)
    assert all(d.abs().sum() > 0 and torch.isfinite(d).all() for d in result.directions[1].values())


def test_inplace_first_op_leaves_the_user_input_alone():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.ReLU(inplace=True), nn.Linear(4, 3))).double()
    x, y = data()
    x0 = x.clone()
    expected = autograd_grads(model, x.clone(), y, CE)
    mg.Oracle(model, CE).backward(x, y)
    assert torch.equal(x, x0)
    assert_grads(model, expected)


def test_inplace_flag_reads_every_module_live():
    """Any in-place module makes the stage clone its input (after a pass-through op, an in-place op
    still writes into it); the flag follows the module as it is now."""
    block = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
    chain = mg.Chain(nn.Sequential(block, nn.Sequential(nn.Sequential(nn.ReLU(inplace=True)))))
    assert [s.inplace for s in chain.stages] == [False, True]
    chain.model[0][1] = nn.ReLU(inplace=True)  # read live
    assert chain.stages[0].inplace


# --- 4. parametrized and hooked modules ------------------------------------------------------


def _double_output(module, args, out):
    return 2 * out


def _negate_input(module, args):
    return (-args[0],)


MODIFIERS = {
    "weight_norm": lambda m: parametrizations.weight_norm(m),
    "spectral_norm": lambda m: parametrizations.spectral_norm(m),
    "forward_hook": lambda m: m.register_forward_hook(_double_output) and m,
    "forward_pre_hook": lambda m: m.register_forward_pre_hook(_negate_input) and m,
    "old_spectral_norm": lambda m: nn.utils.spectral_norm(m),
}


@pytest.mark.parametrize("kind", MODIFIERS)
def test_plain(kind):
    torch.manual_seed(0)
    lin = nn.Linear(3, 3)
    assert plain(lin) and plain(nn.Sequential(lin)) and plain(CE) and plain(lambda z, y: z)
    MODIFIERS[kind](lin)
    assert not plain(lin)
    assert not plain(nn.Sequential(nn.Tanh(), nn.Sequential(lin)))


def test_plain_reads_hooks_live_and_ignores_backward_hooks():
    lin = nn.Linear(3, 3)
    lin.register_full_backward_hook(lambda m, gi, go: None)
    assert plain(lin)
    handle = lin.register_forward_hook(_double_output)
    assert not plain(lin)
    handle.remove()
    assert plain(lin)


@pytest.mark.parametrize("kind", MODIFIERS)
def test_lookup_routes_non_plain_modules_to_the_generic_entry(kind):
    rule = mg.rules.moreau().weight
    lin = nn.Linear(3, 3)
    generic = lookup(rule, "weight", nn.Module())
    assert lookup(rule, "weight", lin) is not generic
    MODIFIERS[kind](lin)
    assert lookup(rule, "weight", lin) is generic
    assert lookup(rule, "state", lin) is lookup(rule, "state", nn.Module())


def test_weight_norm_linear_uses_the_generic_moreau_solver():
    model, (x, y) = mlp(), data()
    parametrizations.weight_norm(model[2])
    oracle = mg.Oracle(model, CE, mg.rules.moreau(closed_forms=True))
    result = oracle(x, y)
    closed = "closed form: linear"
    assert result.info[4].weight.method == closed and result.info[4].state.method == closed
    for line in (result.info[2].weight, result.info[2].state):
        assert not line.method.startswith("closed form"), line
    assert sorted(result.directions[2]) == ["bias", "parametrizations.weight.original0",
                                             "parametrizations.weight.original1"]
    expected = autograd_grads(model, x, y, CE)
    model.zero_grad()
    mg.Oracle(model, CE).backward(x, y)
    assert_grads(model, expected)


# --- 5. non-finite inputs and signals --------------------------------------------------------


PRESETS = ["backprop", "moreau", "proxprop", "penalty_backprop", "target_prop",
           "regularized_target_prop", "augmented_lagrangian", "fenchel"]


@pytest.mark.parametrize("preset", PRESETS)
def test_nan_input_raises_for_every_preset(preset):
    model, (x, y) = mlp(), data()
    x[2, 1] = float("nan")
    oracle = mg.Oracle(model, CE, getattr(mg.rules, preset)())
    with pytest.raises(mg.NonFiniteError, match=re.escape(
            "Oracle: the input x is not finite (1 of 32 entries)")):
        oracle.backward(x, y)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("preset", PRESETS)
def test_nan_weight_raises_on_the_first_signal_for_every_preset(preset):
    model, (x, y) = mlp(), data()
    with torch.no_grad():
        model[0].weight[1, 2] = float("nan")
    oracle = mg.Oracle(model, CE, getattr(mg.rules, preset)())
    with pytest.raises(mg.NonFiniteError, match=re.escape(
            "the signal entering stage 5 (Linear) (from the objective) is not finite (24 of 24 "
            "entries)")):
        oracle.backward(x, y)
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_error_is_one_class():
    import moreaugrad.oracle
    import moreaugrad.sweep

    assert mg.NonFiniteError is moreaugrad.oracle.NonFiniteError is moreaugrad.sweep.NonFiniteError


# --- parametrized modules against converged generic solves (float64) ---------------------------


PARAMETRIZED = {
    "weight_norm": lambda m: parametrizations.weight_norm(m),
    "spectral_norm": lambda m: parametrizations.spectral_norm(m),
}


@pytest.mark.parametrize("kind", list(PARAMETRIZED))
def test_parametrized_linear_moreau_equals_a_converged_solve(kind):
    """The linear closed form does not hold for phi(g, v) = (g v/|v|) x: the weight problem of the
    parametrized stage is solved as written, to its minimiser."""
    model = mlp()
    PARAMETRIZED[kind](model[2])
    model.eval()  # spectral_norm's power iteration runs in train mode only
    x, y = data()
    sched = mg.rules.Lagrangian(0.5, 0.5)
    lbfgs = mg.solvers.LBFGS(tol=1e-14, max_iter=500)
    got = mg.Oracle(model, CE, mg.rules.moreau(schedule=sched, solver=lbfgs))(x, y)
    ref = mg.Oracle(model, CE, mg.rules.moreau(schedule=sched, solver=NewtonSolver()))(x, y)
    assert "closed form" not in got.info[2].weight.method
    for d, r in zip(got.directions[2].values(), ref.directions[2].values(), strict=True):
        assert float((d - r).abs().max() / r.abs().max()) < 1e-8
    linear = mg.Oracle(model, CE, mg.rules.backprop())(x, y).directions[2]
    gap = max(float((d - g).abs().max() / g.abs().max())
              for d, g in zip(got.directions[2].values(), linear.values(), strict=True))
    assert gap > 1e-3  # what the linear closed form (the vjp) would have returned is far off


@pytest.mark.parametrize("kind", list(PARAMETRIZED))
def test_parametrized_linear_proxprop_equals_the_dense_gauss_newton_step(kind):
    """ProxProp on a stage nonlinear in its raw parameters is the Gauss-Newton step (004 eq. 11
    linearised): ``d = (I/tau_theta + J^T J)^{-1} grad`` with J the Jacobian in the raw parameters,
    here built densely; the row (Gram) form, which assumes phi linear in w, must not be used."""
    model = mlp()
    PARAMETRIZED[kind](model[2])
    model.eval()
    x, y = data()
    tau_theta = 0.7
    result = mg.Oracle(model, CE, mg.rules.proxprop(tau_theta, 1.0, mg.lstsq.Exact()))(x, y)
    tape = record(mg.Chain(model), x)
    site = tape.sites[2]
    names = list(site.w)
    w = [site.w[n].detach() for n in names]
    sizes = [t.numel() for t in w]

    def phi(flat):
        parts = dict(zip(names, [p.reshape(t.shape) for p, t in zip(flat.split(sizes), w, strict=True)],
                         strict=True))
        return site.phi(parts).reshape(-1)

    flat = torch.cat([t.reshape(-1) for t in w])
    J = torch.autograd.functional.jacobian(phi, flat)
    grad = torch.cat([g.reshape(-1) for g in
                      mg.Oracle(model, CE, mg.rules.backprop())(x, y).directions[2].values()])
    want = torch.linalg.solve(torch.eye(flat.numel(), dtype=DTYPE) / tau_theta + J.T @ J, grad)
    got = torch.cat([result.directions[2][n].reshape(-1) for n in names])
    assert float((got - want).abs().max() / want.abs().max()) < 1e-8


PRESETS = {
    "backprop": lambda: mg.rules.backprop(),
    "moreau": lambda: mg.rules.moreau(),
    "proxprop": lambda: mg.rules.proxprop(),
    "proxprop_exact": lambda: mg.rules.proxprop(method=mg.lstsq.Exact()),
    "penalty_backprop": lambda: mg.rules.penalty_backprop(),
    "target_prop": lambda: mg.rules.target_prop(),
    "regularized_target_prop": lambda: mg.rules.regularized_target_prop(),
    "augmented_lagrangian": lambda: mg.rules.augmented_lagrangian(),
    "fenchel": lambda: mg.rules.fenchel(),
}


@pytest.mark.filterwarnings("ignore::moreaugrad.InexactSolveWarning")  # plain TP's generic solves
@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_skips_closed_forms_on_a_parametrized_linear(preset):
    """No rule applies a closed form written for nn.Linear to a weight-normed Linear (its phi is not
    linear in (g, v)); every preset returns finite directions for its raw parameters."""
    model = mlp()
    parametrizations.weight_norm(model[2])
    x, y = data()
    result = mg.Oracle(model, CE, PRESETS[preset]())(x, y)
    d = result.directions[2]
    assert set(d) == {"parametrizations.weight.original0", "parametrizations.weight.original1", "bias"}
    assert all(torch.isfinite(v).all() for v in d.values())
    for info in (result.info[2].state, result.info[2].weight):
        assert info is None or "closed form" not in info.method, (preset, info)


def test_in_place_op_after_a_pass_through_op_in_a_grouped_stage():
    torch.manual_seed(0)
    for first in (nn.Flatten(), nn.Identity(), nn.Dropout(0.5).eval()):
        model = nn.Sequential(nn.Linear(4, 6), nn.Sequential(first, nn.ReLU(inplace=True)), nn.Linear(6, 3))
        model = model.double()
        x, y = data()
        expected = autograd_grads(model, x, y, CE)
        mg.Oracle(model, CE).backward(x, y)
        assert_grads(model, expected)
        model.zero_grad()


def test_frozen_dynamics_controls_have_no_direction():
    p = mg.control.Pendulum(horizon=6)
    chain = p.chain()
    chain.controls.requires_grad_(False)
    result = mg.Oracle(chain, p.objective).backward()
    assert result.directions == [None] * 6 and chain.controls.grad is None
    chain.controls.requires_grad_(True)
    assert mg.Oracle(chain, p.objective).backward().directions[0] is not None
