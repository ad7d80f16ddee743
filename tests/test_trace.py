"""Chains traced from any nn.Module (torch.fx), recurrent stages and integer inputs (DESIGN 1).

Each traced model must give backprop directions equal to ``loss.backward()`` (float64, 1e-10), and
the other oracles must equal the same stages written by hand as an ``nn.Sequential``.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moreaugrad as mg

F64 = torch.float64
CE = mg.losses.CrossEntropy()


class Block(nn.Module):
    """A residual block with its own forward: ``x + c2(relu(c1(x)))``."""

    def __init__(self, c: int):
        super().__init__()
        self.c1 = nn.Conv2d(c, c, 3, padding=1)
        self.c2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.c2(F.relu(self.c1(x)))


class Mean(nn.Module):
    def forward(self, x):
        return x.mean((2, 3))


class ResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1)
        self.layer1 = nn.Sequential(Block(4), Block(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        for block in self.layer1:
            x = torch.relu(block(x))
        return self.fc(x.mean((2, 3)))

    def by_hand(self) -> nn.Sequential:
        return nn.Sequential(self.stem, nn.ReLU(), self.layer1[0], nn.ReLU(), self.layer1[1], nn.ReLU(),
                             Mean(), self.fc)


def resnet():
    torch.manual_seed(0)
    return ResNet().to(F64), torch.randn(5, 2, 6, 6, dtype=F64), torch.arange(5) % 3


def grads_by_autograd(model, x, y, h=CE):
    model.zero_grad()
    h(model(x), y).backward()
    out = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    return out


def grads_by_oracle(model, x, y, rule=None, h=CE, chain=None):
    model.zero_grad()
    mg.Oracle(chain or mg.Chain(model), h, rule).backward(x, y)
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out


def assert_same(got, want, rtol=1e-10):
    assert set(got) == set(want)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=rtol, atol=rtol * float(want[n].abs().max()))


def test_resnet_is_cut_between_blocks_and_shares_the_model_state():
    model, x, y = resnet()
    chain = mg.Chain(model)
    labels = [s.description for s in chain.stages]
    assert labels == ["stem: Conv2d", "relu: ReLU", "layer1.0: Block", "relu_2: ReLU", "layer1.1: Block",
                      "relu_4: ReLU", "mean: Part_mean", "fc: Linear"]
    own = {id(p) for p in model.parameters()}
    assert {id(p) for p in chain.parameters()} == own  # the same tensors, no copies
    torch.testing.assert_close(chain(x), model(x), rtol=0, atol=0)


def test_traced_resnet_backprop_equals_autograd():
    model, x, y = resnet()
    assert_same(grads_by_oracle(model, x, y), grads_by_autograd(model, x, y))


@pytest.mark.parametrize("rule", [lambda: mg.rules.moreau(gamma=0.5, alpha=0.5),
                                  lambda: mg.rules.proxprop(1.0, 0.1)], ids=["moreau", "proxprop"])
def test_traced_resnet_equals_the_hand_written_sequential(rule):
    model, x, y = resnet()
    traced = grads_by_oracle(model, x, y, rule())
    by_hand = grads_by_oracle(model, x, y, rule(), chain=mg.Chain(model.by_hand()))
    assert_same(traced, by_hand, rtol=1e-12)
    info = mg.Oracle(model, CE, mg.rules.moreau())(x, y).info
    assert info[7].weight.method == "closed form: linear"  # fc stays a Linear


def test_compiled_model_is_traced_through_its_original():
    model, x, y = resnet()
    with warnings.catch_warnings():  # torch's own deprecation warnings on importing dynamo
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = torch.compile(model)
    chain = mg.Chain(compiled)
    assert len(chain) == 8
    assert_same(grads_by_oracle(model, x, y, chain=chain), grads_by_autograd(model, x, y))


class Functional(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 6),
                                          nn.Linear(6, 3))

    def forward(self, x):
        x = F.relu(self.a(x))
        x = torch.tanh(self.b(x))
        x = self.c(x).sigmoid()
        return self.d(F.softplus(x))


def test_functional_activations_become_modules_with_closed_forms():
    torch.manual_seed(1)
    model = Functional().to(F64)
    x, y = torch.randn(7, 4, dtype=F64), torch.arange(7) % 3
    chain = mg.Chain(model)
    assert [s.type_name for s in chain.stages] == ["Linear", "ReLU", "Linear", "Tanh", "Linear", "Sigmoid",
                                                   "Softplus", "Linear"]
    assert_same(grads_by_oracle(model, x, y), grads_by_autograd(model, x, y))
    info = mg.Oracle(chain, CE, mg.rules.moreau())(x, y).info
    assert all("closed form" in i.state.method for i in info[1:] if i.state is not None)


class Encoder(nn.Module):
    """Token ids -> embedding -> one transformer encoder layer -> mean over tokens -> classes."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        return self.head(self.enc(self.emb(tokens)).mean(1))


def test_transformer_encoder_on_token_ids():
    torch.manual_seed(2)
    model = Encoder().to(F64)
    tokens, y = torch.randint(0, 11, (4, 5)), torch.arange(4) % 3
    chain = mg.Chain(model)
    assert [s.type_name for s in chain.stages] == ["Embedding", "TransformerEncoderLayer", "Part_mean",
                                                   "Linear"]
    assert_same(grads_by_oracle(model, tokens, y), grads_by_autograd(model, tokens, y))
    for rule in (mg.rules.moreau(), mg.rules.proxprop()):
        result = mg.Oracle(chain, CE, rule)(tokens, y)
        assert all(torch.isfinite(d).all() for ds in result.directions if ds for d in ds.values())


class Last(nn.Module):
    def forward(self, x):
        return x[:, -1]


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN])
def test_recurrent_stage_takes_the_output_sequence(cell):
    """A recurrent stage is ``x -> output`` from a zero initial state; the final state is dropped."""
    torch.manual_seed(3)
    rnn = cell(3, 5, batch_first=True).to(F64)
    model = nn.Sequential(rnn, Last(), nn.Linear(5, 2)).to(F64)
    x, y = torch.randn(4, 6, 3, dtype=F64), torch.arange(4) % 2

    got = grads_by_oracle(model, x, y)
    model.zero_grad()
    CE(model[2](rnn(x)[0][:, -1]), y).backward()  # autograd through the output sequence
    assert_same(got, {n: p.grad.clone() for n, p in model.named_parameters()})
    result = mg.Oracle(model, CE, mg.rules.moreau())(x, y)
    assert all(torch.isfinite(d).all() for ds in result.directions if ds for d in ds.values())


def test_untraceable_model_names_the_way_out():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return self.lin(x) if x.sum() > 0 else x

    with pytest.raises(TypeError, match=r"could not trace Branchy.*Chain\.from_stages"):
        mg.Chain(Branchy())


def test_model_that_is_one_stage_warns():
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return x + self.lin(torch.relu(x))

    with pytest.warns(UserWarning, match="single stage"):
        chain = mg.Chain(Skip())
    assert len(chain) == 1


def test_from_stages_and_a_replaced_submodule_is_traced_again():
    model, x, y = resnet()
    chain = mg.Chain(model)
    model.fc = nn.Linear(4, 3).to(F64)
    assert chain.stages[-1].module is model.fc
    assert_same(grads_by_oracle(model, x, y, chain=chain), grads_by_autograd(model, x, y))
    hand = mg.Chain.from_stages(list(model.by_hand()))
    assert len(hand) == 8


def test_class_instead_of_instance_is_refused():
    with pytest.raises(TypeError, match="instantiate"):
        mg.Chain(nn.Linear)
    with pytest.raises(TypeError, match=r"pass an instance: nn\.CrossEntropyLoss\(\)"):
        mg.Oracle(nn.Sequential(nn.Linear(2, 2)), nn.CrossEntropyLoss)


def test_empty_batch_is_named():
    oracle = mg.Oracle(nn.Sequential(nn.Linear(2, 2)).to(F64), CE)
    with pytest.raises(ValueError, match="batch is empty"):
        oracle(torch.zeros(0, 2, dtype=F64), torch.zeros(0, dtype=torch.long))


def test_oracle_works_under_no_grad_and_inference_mode():
    model, x, y = resnet()
    want = mg.Oracle(model, CE, mg.rules.moreau())(x, y).loss
    with torch.no_grad():
        assert mg.Oracle(model, CE, mg.rules.moreau())(x, y).loss == want
    with torch.inference_mode():
        xi = x.clone()
        assert mg.Oracle(model, CE, mg.rules.moreau())(xi, y).loss == want
    with torch.no_grad():
        grads = grads_by_oracle(model, x, y)
    assert_same(grads, grads_by_autograd(model, x, y))


def test_copy_of_a_traced_chain_is_independent():
    model, x, y = resnet()
    other = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert_same(grads_by_oracle(other, x, y), grads_by_autograd(model, x, y))


def test_growing_loss_under_step_is_reported_once():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 2)).to(F64)
    oracle = mg.Oracle(model, mg.losses.SquaredLoss(), mg.rules.backprop(step=50.0))  # far too large
    x, y = torch.randn(8, 2, dtype=F64), torch.randn(8, 2, dtype=F64)
    with pytest.warns(mg.DivergenceWarning, match="grew at each of the last 5 steps") as record:
        for _ in range(12):
            oracle.step(x, y)
    assert len([w for w in record if issubclass(w.category, mg.DivergenceWarning)]) == 1


def test_target_prop_default_trains_a_relu_mlp():
    """The measurement behind target_prop's default kappa: 30 steps with batch 32 on digits."""
    ds = mg.data.digits(seed=0)
    x = torch.as_tensor(ds.x_train[:256]).double().flatten(1)
    y = torch.as_tensor(ds.y_train[:256]).long()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10))
    oracle = mg.Oracle(model.double(), CE, mg.rules.target_prop())
    start = oracle(x, y).loss
    with warnings.catch_warnings():
        warnings.simplefilter("error", mg.DivergenceWarning)
        for i in range(30):
            idx = torch.arange(i * 32, (i + 1) * 32) % 256
            oracle.step(x[idx], y[idx])
    assert oracle(x, y).loss < start


@pytest.mark.parametrize("make, message", [
    (lambda: mg.rules.target_prop(kappa=-1), "target_prop: kappa"),
    (lambda: mg.rules.regularized_target_prop(gamma=-1), "regularized_target_prop: gamma"),
    (lambda: mg.rules.augmented_lagrangian(alpha=0), "augmented_lagrangian: alpha"),
    (lambda: mg.rules.backprop(step=-0.1), "backprop: step"),
    (lambda: mg.rules.moreau(gamma=-1), "moreau: gamma"),
    (lambda: mg.rules.proxprop(tau=0), "proxprop: tau"),
])
def test_errors_name_the_preset_and_argument_the_user_wrote(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_a_capped_solve_warns_once_per_oracle():
    """A solve that stops on its cap without having been asked for fixed steps is inexact: one
    InexactSolveWarning per oracle; the papers' fixed quasi-Newton steps (tol=None) are not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(3, 4), nn.Tanh()), nn.Linear(4, 2)).to(F64)
    x, y = torch.randn(6, 3, dtype=F64), torch.arange(6) % 2
    capped = mg.Oracle(model, CE, mg.rules.moreau(solver=mg.solvers.LBFGS(tol=1e-14, max_iter=1)))
    with pytest.warns(mg.InexactSolveWarning, match="iteration cap") as record:
        capped(x, y)
        capped(x, y)
    assert len([w for w in record if issubclass(w.category, mg.InexactSolveWarning)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", mg.InexactSolveWarning)
        mg.Oracle(model, CE, mg.rules.moreau())(x, y)  # 2 fixed quasi-Newton steps, as asked
