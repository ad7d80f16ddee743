"""Smoothness estimates (003 Sec. 4-5, App. B) against measured lower bounds, closed forms, the VGG-16
orderings of 003 Sec. 5.2, step sizes from the estimates (003 Thm. 4.1, 000 Prop. 2.3) and
``moreaugrad analyze``."""

from __future__ import annotations

import json
import math
import random
import warnings

import pytest
import torch
from torch import nn

import moreaugrad as mg
from moreaugrad import cli
from moreaugrad.rules import Paper, Safe, moreau
from moreaugrad.smoothness import (
    Map,
    UnsupportedModuleError,
    estimate,
    generic_chain,
    measure,
    register,
)
from moreaugrad.solvers import QuasiNewton

F64 = torch.float64
SLACK = 1 + 1e-9  # a measured value is attained, so it may exceed a valid bound only by rounding
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these tensors are tiny, and on a busy machine threads only spin (``cli.main``
    sets the count too); the other tests get theirs back."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(seed, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def both(model, x, radius=1.0, around=None, loss=None, target=None, regularizer=None, **kw):
    """The estimate and the measurement of ``model`` on the same balls and input batch."""
    labels = target is None or not target.is_floating_point()
    est = estimate(model, tuple(x.shape[1:]), radius=radius, input_norm=float(x.norm()), batch=len(x),
                   around=around, loss=loss, target_norm=None if labels else float(target.norm()),
                   regularizer=regularizer)
    got = measure(model, x, radius=radius, around=around, loss=loss, target=target, regularizer=regularizer,
                  points=kw.get("points", 3), iterations=kw.get("iterations", 8))
    return est, got


def assert_below(est, got):
    assert got.output <= est.output_bound * SLACK
    assert got.lipschitz <= est.lipschitz * SLACK
    assert got.smoothness <= est.smoothness * SLACK
    if got.objective_smoothness is not None:
        assert got.objective_smoothness <= est.objective_smoothness * SLACK
    assert got.lipschitz > 0  # the measurement found something


# -- every layer type of the table --------------------------------------------------------------------


def vec(*mods, d=5):
    return lambda: (nn.Sequential(nn.Linear(4, d), *mods).double(), torch.randn(6, 4, dtype=F64))


def img(*mods, conv=None):
    return lambda: (nn.Sequential(conv or nn.Conv2d(2, 3, 3, padding=1), *mods).double(),
                    torch.randn(3, 2, 6, 6, dtype=F64))


LAYERS = {
    "linear": vec(),
    "linear_no_bias": lambda: (nn.Sequential(nn.Linear(4, 5, bias=False)).double(),
                               torch.randn(6, 4, dtype=F64)),
    "linear_3d_input": lambda: (nn.Sequential(nn.Linear(4, 3), nn.Softplus()).double(),
                                torch.randn(2, 3, 4, dtype=F64)),
    "conv1d_strided": lambda: (nn.Sequential(nn.Conv1d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2),
                                             nn.Tanh()).double(), torch.randn(3, 4, 9, dtype=F64)),
    "conv2d": img(),
    "conv2d_no_bias_strided": img(conv=nn.Conv2d(2, 4, 2, stride=2, bias=False)),
    "softplus": vec(nn.Softplus()),
    "softplus_beta": vec(nn.Softplus(beta=3.0)),
    "sigmoid": vec(nn.Sigmoid()),
    "tanh": vec(nn.Tanh()),
    "softmax": vec(nn.Softmax(dim=1)),
    "relu": vec(nn.ReLU()),
    "leaky_relu": vec(nn.LeakyReLU(2.0)),
    "identity": vec(nn.Identity()),
    "flatten": img(nn.Flatten()),
    "avg_pool": img(nn.AvgPool2d(2)),
    "avg_pool_overlapping": img(nn.AvgPool2d(3, stride=1)),
    "adaptive_avg_pool": img(nn.AdaptiveAvgPool2d(4)),
    # an output larger than the input: one entry lies in up to o windows (torchvision's VGG on 32x32)
    "adaptive_avg_pool_enlarging": lambda: (nn.Sequential(nn.Conv2d(2, 2, 1),
                                                          nn.AdaptiveAvgPool2d(7)).double(),
                                            torch.randn(3, 2, 1, 1, dtype=F64)),
    "adaptive_avg_pool_3_to_5": lambda: (nn.Sequential(nn.Conv2d(2, 2, 1), nn.AdaptiveAvgPool2d(5)).double(),
                                         torch.randn(3, 2, 3, 3, dtype=F64)),
    "max_pool": img(nn.MaxPool2d(2)),
    "avg_pool1d": lambda: (nn.Sequential(nn.Conv1d(2, 3, 3), nn.AvgPool1d(2)).double(),
                           torch.randn(3, 2, 9, dtype=F64)),
    "batch_norm1d": vec(nn.BatchNorm1d(5, affine=False)),
    "batch_norm1d_affine": vec(nn.BatchNorm1d(5)),
    "batch_norm2d": img(nn.BatchNorm2d(3, eps=0.1, affine=False)),
}


@pytest.mark.parametrize("name", LAYERS)
def test_measured_never_exceeds_the_estimate_on_every_layer_type(name):
    model, x = seeded(0, LAYERS[name])
    assert_below(*both(model, x, radius=[0.5, 2.0][len(name) % 2]))


@pytest.mark.parametrize("loss", ["squared", "cross_entropy"])
def test_measured_objective_smoothness_never_exceeds_prop_4_2(loss):
    model, x = seeded(1, lambda: (nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double(),
                                  torch.randn(6, 4, dtype=F64)))
    y = torch.arange(6) % 3
    h = mg.losses.SquaredLoss() if loss == "squared" else mg.losses.CrossEntropy()
    for reg in (None, mg.losses.L2(0.1)):
        est, got = both(model, x, 1.5, loss=h, target=y, regularizer=reg, around=model)
        assert_below(est, got)
        assert got.objective_smoothness > 0


def random_chain(seed):
    """2 to 4 stages drawn from the table, some grouped into one ``nn.Sequential`` stage."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    stages = rng.randint(2, 4)
    spatial = rng.choice([0, 1, 2])
    if spatial == 0:
        x = torch.randn(5, 4, dtype=F64)
    else:
        x = torch.randn(3, 2, *([8] * spatial), dtype=F64)
    conv = {1: nn.Conv1d, 2: nn.Conv2d}.get(spatial)
    bn = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[spatial]
    pool = {1: (nn.AvgPool1d, nn.MaxPool1d), 2: (nn.AvgPool2d, nn.MaxPool2d)}.get(spatial)
    mods: list[nn.Module] = []
    shape = tuple(x.shape[1:])
    for t in range(stages):
        last = t == stages - 1
        group: list[nn.Module] = []
        if len(shape) == 1 or last:
            if len(shape) > 1:
                group.append(nn.Flatten())
            d = math.prod(shape)
            out = rng.randint(2, 5)
            group.append(nn.Linear(d, out, bias=rng.random() < 0.8))
            acts = [nn.Softplus(), nn.Sigmoid(), nn.Tanh(), nn.ReLU(), nn.LeakyReLU(0.2), nn.Identity()]
            if not last:
                acts.append(bn(out, affine=rng.random() < 0.5))
            else:
                acts.append(nn.Softmax(dim=1))
            group.append(rng.choice(acts))
        else:
            c = shape[0]
            out = rng.choice([2, 4])
            groups = 2 if c % 2 == 0 and out % 2 == 0 and rng.random() < 0.5 else 1
            group.append(conv(c, out, rng.choice([1, 2, 3]), stride=rng.choice([1, 2]),
                              padding=rng.choice([0, 1]), groups=groups,
                              dilation=rng.choice([1, 2]) if min(shape[1:]) > 5 else 1))
            group.append(rng.choice([nn.Softplus(), nn.Tanh(), nn.Sigmoid(), bn(out, eps=0.5)]))
        model_so_far = nn.Sequential(*mods, *group).double()
        shape = tuple(model_so_far(x).shape[1:])
        if len(shape) > 1 and min(shape[1:]) >= 2 and rng.random() < 0.5:
            group.append(rng.choice(pool)(2))
            shape = tuple(nn.Sequential(*mods, *group).double()(x).shape[1:])
        mods.extend(group if rng.random() < 0.5 else [nn.Sequential(*group)])
    return nn.Sequential(*mods).double(), x


@pytest.mark.parametrize("seed", range(8))
def test_measured_never_exceeds_the_estimate_on_random_chains(seed):
    model, x = random_chain(seed)
    radius = [0.3, 1.0, 3.0][seed % 3]
    assert_below(*both(model, x, radius))
    assert_below(*both(model, x, radius, around=model))


# -- closed forms --------------------------------------------------------------------------------------


def rank_one_batch():
    u, c = torch.randn(4, dtype=F64), torch.randn(3, dtype=F64)
    return torch.outer(c, u)  # X = c u^T: 3 samples, sigma_max(X) = ||X||_F


def test_one_linear_map_equals_its_operator_norm_on_the_ball():
    x = seeded(2, rank_one_batch)
    model = nn.Sequential(nn.Linear(4, 5, bias=False)).double()
    est = estimate(model, (4,), radius=0.7, input_norm=float(x.norm()), batch=3)
    jac = torch.func.jacrev(lambda w: w @ x.T)(torch.zeros(5, 4, dtype=F64)).reshape(15, 20)
    op = float(torch.linalg.matrix_norm(jac, ord=2))
    assert est.lipschitz == pytest.approx(op, rel=1e-12)
    assert est.output_bound == pytest.approx(0.7 * float(torch.linalg.matrix_norm(x, ord=2)), rel=1e-12)
    assert est.smoothness == 0
    got = measure(model, x, radius=0.7, points=2, iterations=30)
    assert got.lipschitz == pytest.approx(op, rel=1e-9)


def test_one_softplus_layer_equals_its_closed_form():
    x = seeded(3, lambda: torch.randn(1, 4, dtype=F64))
    model = nn.Sequential(nn.Linear(4, 5, bias=False), nn.Softplus()).double()
    nx = float(x.norm())
    # At W = 0: ||softplus(0)|| = sqrt(5) log 2, ||J|| = sigmoid(0) ||x|| = ||x||/2, and the largest
    # curvature, sup_W ||grad^2 psi(W)||, is attained there: sigmoid'(0) ||x||^2 = ||x||^2/4.
    est = estimate(model, (4,), radius=0.0, input_norm=nx, batch=1)
    assert est.output_bound == pytest.approx(math.sqrt(5) * math.log(2), rel=1e-14)
    assert est.lipschitz == pytest.approx(nx / 2, rel=1e-14)
    assert est.smoothness == pytest.approx(nx**2 / 4, rel=1e-14)
    ball = estimate(model, (4,), radius=2.0, input_norm=nx, batch=1)
    assert ball.smoothness == pytest.approx(nx**2 / 4, rel=1e-14)
    assert ball.lipschitz == pytest.approx(nx * min(1.0, 0.5 + 2.0 * nx / 4), rel=1e-14)
    got = measure(model, x, radius=2.0, points=1, iterations=40)  # the center W = 0
    assert got.smoothness == pytest.approx(nx**2 / 4, rel=1e-8)


def test_the_squared_loss_equals_its_closed_form():
    x = seeded(4, rank_one_batch)
    y = torch.randn(3, 5, dtype=F64)
    model = nn.Sequential(nn.Linear(4, 5, bias=False)).double()
    h = mg.losses.SquaredLoss()
    est = estimate(model, (4,), radius=1.0, input_norm=float(x.norm()), batch=3, loss=h,
                   target_norm=float(y.norm()))
    # F(W) = ||W X^T - Y^T||^2 / (2 B): Hessian (X^T X / B) (x) I, norm sigma_max(X)^2 / B.
    closed = float(torch.linalg.matrix_norm(x, ord=2)) ** 2 / 3
    assert est.objective.L == pytest.approx(1 / 3, rel=1e-15)
    assert est.objective_smoothness == pytest.approx(closed, rel=1e-12)
    got = measure(model, x, radius=1.0, loss=h, target=y, points=1, iterations=30)
    assert got.objective_smoothness == pytest.approx(closed, rel=1e-9)
    assert est.step == pytest.approx(1 / closed, rel=1e-12)


def test_prop_4_3_recurrence():
    assert generic_chain([(2.0, 1.0), (3.0, 0.5)]) == [(2.0, 1.0), (2.0 * 3 + 3.0, 1.0 * 3 + 0.5 * 9)]


def test_a_chain_without_parameters_is_constant():
    model = nn.Sequential(nn.ReLU(), nn.Tanh(), nn.Softplus())
    est = estimate(model, (3,), radius=1.0, input_norm=2.0, batch=2)
    assert (est.lipschitz, est.smoothness, est.layers) == (0.0, 0.0, 0)


def test_around_zero_weights_is_the_ball_at_zero():
    model = nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2)).double()
    zeros = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    a = estimate(model, (3,), radius=0.8, input_norm=1.5, batch=4)
    b = estimate(model, (3,), radius=0.8, input_norm=1.5, batch=4, around=zeros)
    assert (a.lipschitz, a.smoothness, a.output_bound) == (b.lipschitz, b.smoothness, b.output_bound)
    c = estimate(model, (3,), radius=0.8, input_norm=1.5, batch=4, around=model)
    assert c.lipschitz > a.lipschitz and c.around and not a.around


# -- VGG-16 (003 Sec. 5.1-5.2) from shapes on the meta device ------------------------------------------


def test_vgg16_batch_norm_orderings_of_sec_5_2():
    plain = estimate(mg.smoothness.vgg16(), (3, 224, 224), radius=1.0, input_norm=1.0, batch=128)
    assert next(mg.smoothness.vgg16().parameters()).device.type == "meta"
    assert len(plain.stages) == 16 and plain.layers == 16 and plain.rows[-1].shape == (1000,)
    small = estimate(mg.smoothness.vgg16(1e-2), (3, 224, 224), radius=1.0, input_norm=1.0, batch=128)
    large = estimate(mg.smoothness.vgg16(1e2), (3, 224, 224), radius=1.0, input_norm=1.0, batch=128)
    assert plain.lipschitz <= small.lipschitz and plain.smoothness <= small.smoothness  # eps = 1e-2
    assert plain.lipschitz >= large.lipschitz and plain.smoothness >= large.smoothness  # eps = 1e2
    assert all(math.isfinite(v) for e in (plain, small, large) for v in (e.lipschitz, e.smoothness))
    a, b = mg.smoothness.batch_norm_comparison(1e2)
    assert (a.lipschitz, b.smoothness) == (plain.lipschitz, large.smoothness)


def test_batch_norm_follows_appendix_b():
    c = mg.smoothness.batch_norm_constants(d=4, m=9, eps=0.25)
    assert (c.m, c.l, c.L) == (36.0, 4.0, 2 * 4 / 3 / 0.25)


# -- the table: errors, infinite L, printing, registration ----------------------------------------------


def test_infinite_smoothness_names_the_stage():
    model = nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
                          nn.Linear(4, 2))
    est = estimate(model, (3,), batch=2)
    assert est.infinite_at.stage == 3 and est.infinite_at.type == "ReLU"
    assert math.isfinite(est.lipschitz) and est.smoothness == math.inf
    text = str(est)
    assert "L is infinite from stage 3 (module 2.1: ReLU)" in text
    assert "2.0: Linear" in text and "chain: m = " in text


def test_unsupported_module_names_it_and_lists_the_supported():
    with pytest.raises(UnsupportedModuleError,
                       match=r"no constants for module type GELU; supported: .*Conv2d.*Softplus"):
        estimate(nn.Sequential(nn.Linear(3, 3), nn.GELU()), (3,))
    with pytest.raises(UnsupportedModuleError, match="padding_mode='reflect'"):
        estimate(nn.Conv1d(1, 1, 3, padding=1, padding_mode="reflect"), (1, 5))
    with pytest.raises(UnsupportedModuleError, match="BatchNorm1d in eval mode"):
        estimate(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3).eval()), (3,), batch=2)
    with pytest.raises(UnsupportedModuleError, match="objective type str"):
        estimate(nn.Linear(3, 3), (3,), loss="mse")


@pytest.mark.parametrize("kwargs,match", [
    (dict(radius=-1.0), r"radius must be a finite number >= 0, got -1.0"),
    (dict(input_norm=-2.0), r"input_norm must be a finite number >= 0, got -2.0"),
    (dict(batch=0), r"batch must be an int >= 1, got 0"),
    (dict(batch=2.5), r"batch must be an int >= 1, got 2.5"),
    (dict(input_shape=(5,)), r"input shape does not fit stage 1 \(0: Linear\), which receives per-sample "
                             r"shape \(5,\)"),
    (dict(input_shape=()), r"input_shape must be the shape of one input"),
])
def test_bad_inputs_name_what_is_wrong(kwargs, match):
    args = {"input_shape": (4,), **kwargs}
    with pytest.raises(ValueError, match=match):
        estimate(nn.Sequential(nn.Linear(4, 3), nn.Tanh()), args.pop("input_shape"), **args)


def test_bad_measure_and_around_inputs():
    model = nn.Sequential(nn.Linear(2, 2)).double()
    with pytest.raises(ValueError, match="radius must be a finite number >= 0, got -1"):
        measure(model, torch.randn(2, 2, dtype=F64), radius=-1)
    with pytest.raises(ValueError, match="around has no entry for parameter '0.bias'"):
        estimate(model, (2,), around={"0.weight": torch.zeros(2, 2)})
    with pytest.raises(TypeError, match="around must be None, an nn.Module"):
        estimate(model, (2,), around=3)
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        estimate("net", (2,))


class Doubler(nn.Module):
    def forward(self, x):
        return 2 * x


def test_a_user_registered_layer():
    @register(Doubler)
    def _(module, shapes):
        return (Map(m=math.inf, l=2.0, L=0.0, at0=0.0, slope0=2.0, source="test"),)

    model = nn.Sequential(nn.Linear(3, 4), Doubler(), nn.Tanh()).double()
    x = seeded(5, lambda: torch.randn(4, 3, dtype=F64))
    est, got = both(model, x)
    assert_below(est, got)
    assert "Doubler" in mg.smoothness.supported()
    assert est.rows[1].constants() == {"m": math.inf, "l": 2.0, "L": 0.0}


def test_chain_input_and_json():
    chain = mg.Chain(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    est = estimate(chain, (3,), batch=2, loss=mg.losses.CrossEntropy())
    d = json.loads(json.dumps(est.to_dict()))
    assert d["smoothness"] == "inf" and d["infinite_at"] == "1: ReLU" and len(d["rows"]) == 3
    assert est.step == 0.0 and "no step 1/L_F" in str(est)


# -- step sizes: 003 Thm. 4.1 and the safe Moreau schedule (000 Prop. 2.3) -------------------------------


def smooth_mlp(grouped, seed=0):
    def build():
        a, b = (nn.Linear(5, 7), nn.Tanh()), (nn.Linear(7, 6), nn.Softplus())
        mods = [nn.Sequential(*a), nn.Sequential(*b)] if grouped else [*a, *b]
        return (nn.Sequential(*mods, nn.Linear(6, 3)).double(), torch.randn(8, 5, dtype=F64),
                torch.arange(8) % 3)

    return seeded(seed, build)


@pytest.mark.parametrize("grouped", [False, True])
def test_safe_schedule_keeps_every_state_subproblem_convex(grouped):
    model, x, y = smooth_mlp(grouped)
    h = mg.losses.CrossEntropy()
    x = x.requires_grad_(True)
    solver = QuasiNewton(tol=1e-10, max_iter=50)

    def curvature_messages(schedule):
        result = mg.Oracle(model, h, moreau(schedule=schedule, closed_forms=False, solver=solver))(x, y)
        return [i.state.message for i in result.info if i.state is not None
                and "not strongly convex" in i.state.message], result

    with warnings.catch_warnings():  # the non-convex solves also stop early; that is the point here
        warnings.simplefilter("ignore")
        loose, _ = curvature_messages(Paper(gamma=50.0, alpha=1.0))
    assert loose
    est = estimate(model, (5,), radius=0.0, input_norm=float(x.detach().norm()), batch=8, around=model,
                   loss=h)
    safe = Safe.from_estimate(est)
    assert len(safe.c) == len(model) and safe.alpha == est.step
    gammas = safe.gammas()
    assert any(g < 1.0 for g in gammas[:-1])  # some stage needed a smaller step than the cap
    safe_msgs, result = curvature_messages(safe)
    assert safe_msgs == []
    assert all(i.state.converged for i in result.info if i.state is not None)
    # gamma_{t-1} c_t <= fraction: the bound of 000 Prop. 2.3 with margin 1 - fraction.
    assert all(g * c <= 0.5 * (1 + 1e-12) for g, c in zip(gammas, safe.c))


def test_safe_schedule_errors():
    with pytest.raises(ValueError, match=r"c_2 is infinite: stage 2 is not smooth"):
        Safe((1.0, math.inf, 0.0))
    with pytest.raises(ValueError, match=r"fraction must be in \(0, 1\], got 1.5"):
        Safe((1.0,), fraction=1.5)
    with pytest.raises(ValueError, match="built for 2 stages, the chain has 3"):
        Safe((1.0, 2.0)).dual(1, 3)
    relu = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="stage 2 is not smooth"):
        Safe.from_estimate(estimate(relu, (3,), batch=2, loss=mg.losses.CrossEntropy()))
    with pytest.raises(ValueError, match="has no objective"):
        Safe.from_estimate(estimate(relu, (3,), batch=2))
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        moreau(schedule=0.5)


@pytest.fixture(scope="module")
def digits():
    ds = mg.data.digits(seed=0, dtype=F64)
    return ds.x_train[:128].reshape(128, -1), ds.y_train[:128]


def softplus_mlp():
    return seeded(6, lambda: nn.Sequential(nn.Linear(64, 32), nn.Softplus(), nn.Linear(32, 10)).double())


def test_gradient_descent_with_step_one_over_L_decreases_every_step(digits):
    x, y = digits
    model, h, R = softplus_mlp(), mg.losses.CrossEntropy(), 1.0
    losses = []
    for _ in range(8):
        est = estimate(model, (64,), radius=R, input_norm=float(x.norm()), batch=len(x), around=model, loss=h)
        model.zero_grad()
        loss = h(model(x), y)
        loss.backward()
        losses.append(loss.item())
        with torch.no_grad():
            for layer in (model[0], model[2]):  # the step stays in the ball of Cor. 4.5
                assert est.step * math.sqrt(sum(p.grad.pow(2).sum().item() for p in layer.parameters())) <= R
            for p in model.parameters():
                p -= est.step * p.grad
    assert all(b < a for a, b in zip(losses, losses[1:]))


def test_safe_moreau_schedule_decreases_every_step(digits):
    x, y = digits
    model, h = softplus_mlp(), mg.losses.CrossEntropy()
    losses = []
    for _ in range(8):
        est = estimate(model, (64,), radius=1.0, input_norm=float(x.norm()), batch=len(x), around=model,
                       loss=h)
        losses.append(mg.Oracle(model, h, moreau(schedule=Safe.from_estimate(est))).step(x, y).loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:]))


# -- moreaugrad analyze ------------------------------------------------------------------------------------


def test_analyze_vgg16_prints_and_writes(tmp_path, capsys):
    assert cli.main(["analyze", "--vgg16", "--batch-norm", "0.01", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "VGG-16 (003 Sec. 5.1) with batch-norm, eps = 0.01" in out and "BatchNorm2d" in out
    assert "chain: m = " in out and "step 1/L_F" in out
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert len(data["rows"]) == 13 * 3 + 5 + 3 + 2 * 2 and data["layers"] == 16
    assert (tmp_path / "analysis.png").read_bytes().startswith(PNG_MAGIC)


def test_analyze_a_config(tmp_path, capsys):
    config = tmp_path / "tiny.toml"
    config.write_text('name = "tiny"\n[panels.p]\ndataset = "digits"\nbatch_size = 16\nloss = "squared"\n'
                      'model = {kind = "mlp", hidden = [8]}\n[methods.GD]\nrule = "backprop"\n'
                      'optimizer = "sgd"\nlr = 0.1\n')
    assert cli.main(["analyze", str(config), "--radius", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "tiny / p" in out and "input (64,) x batch 16, ||x|| = 32" in out
    assert "L is infinite from stage 2 (module 1: ReLU)" in out


@pytest.mark.parametrize("argv,message", [
    (["analyze"], "give either CONFIG or --vgg16"),
    (["analyze", "x.toml", "--vgg16"], "give either CONFIG or --vgg16"),
    (["analyze", "000_table2", "--batch-norm", "0.1"], "--batch-norm goes with --vgg16"),
])
def test_analyze_usage_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["analyze", "--vgg16", "--radius", "-1"], "argument --radius: must be a finite number >= 0, got '-1'"),
    (["analyze", "--vgg16", "--batch", "0"], "argument --batch: must be an integer >= 1, got '0'"),
    (["analyze", "--vgg16", "--batch-norm", "0"], "argument --batch-norm: must be a finite number > 0"),
])
def test_analyze_bad_options_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_measure_refuses_what_estimate_refuses():
    model = nn.Sequential(nn.Linear(3, 2)).double()
    x = torch.randn(4, 3, dtype=F64)
    with pytest.raises(ValueError, match="around has no entry for parameter '0.bias'"):
        mg.smoothness.measure(model, x, around={"0.weight": model[0].weight})
    for field in ("points", "iterations"):
        with pytest.raises(ValueError, match=f"{field} must be an int >= 1"):
            mg.smoothness.measure(model, x, **{field: 0})
