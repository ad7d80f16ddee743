"""``mg.second_order``: gradient, Gauss-Newton and Newton steps on chains (003 Sec. 3, App. C).

In float64, against dense solves of the same regularised quadratic models built with
``torch.autograd.functional.jacobian``/``hessian`` over the flattened weights:

* the DP gradient step is ``w - gamma grad F`` (003 Prop. C.2);
* the DP Gauss-Newton step is ``w - (J^T hess h J + hess r + I/gamma)^{-1} grad F`` (eq. 13, 28) and the
  DP Newton step ``w - (hess F + I/gamma)^{-1} grad F`` (eq. 14, 29), on a softplus MLP, a small
  convolutional chain, the pendulum at horizon 10 and the registry's chains;
* Gauss-Newton by the dual (18) (Prop. 3.5) and by matrix-free CG equal the DP step;
* the DP's feasibility check agrees with the dense model's positive definiteness; an infeasible
  Newton step is reported (gamma halved, 003 Algo 4) and raises under ``strict=True``;
* Gauss-Newton solves a least-squares problem linear in its weights in one step as gamma -> inf;
* bad input (gamma <= 0, Newton through a ReLU) is refused by name.
"""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
from torch import nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call

import moreaugrad as mg
from helpers import CHAIN_NAMES, DYNAMICS, Case, as_chain, assert_rel_close, make

so = mg.second_order
DTYPE = torch.float64
PENDULUM10 = mg.control.Pendulum(horizon=10)


def _seeded(seed, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def softplus_mlp() -> Case:
    """Linear, Softplus, Linear, Softplus, Linear: 5 stages, cross-entropy on a batch of 5."""
    def build():
        model = nn.Sequential(nn.Linear(4, 5), nn.Softplus(), nn.Linear(5, 4), nn.Softplus(),
                              nn.Linear(4, 3)).double()
        return Case(model, torch.randn(5, 4, dtype=DTYPE), torch.arange(5) % 3, mg.losses.CrossEntropy())
    return _seeded(10, build)


def conv_chain() -> Case:
    """Conv2d, Softplus, AvgPool2d, Flatten, Linear on a 3x1x4x4 input; squared loss."""
    def build():
        model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Softplus(), nn.AvgPool2d(2), nn.Flatten(),
                              nn.Linear(8, 3)).double()
        return Case(model, torch.randn(3, 1, 4, 4, dtype=DTYPE), torch.randn(3, 3, dtype=DTYPE),
                    mg.losses.SquaredLoss())
    return _seeded(11, build)


def pendulum10() -> Case:
    """The pendulum over 10 steps from rest, with random torques (one start)."""
    def build():
        chain = PENDULUM10.chain(torch.randn(10, 1, dtype=DTYPE))
        return Case(chain, chain.x0.clone(), None, PENDULUM10.objective)
    return _seeded(12, build)


def batchnorm_softplus() -> Case:
    """Linear, BatchNorm1d (train mode: the stage mixes the samples), Softplus, Linear."""
    def build():
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Softplus(), nn.Linear(4, 2)).double()
        return Case(model, torch.randn(6, 3, dtype=DTYPE), torch.randn(6, 2, dtype=DTYPE),
                    mg.losses.SquaredLoss())
    return _seeded(14, build)


def softplus_one() -> Case:
    """Linear, Softplus, Linear on one sample: the weightless stage's state Jacobian (and Newton's
    Hessian block in x) is taken whole, not per sample."""
    def build():
        model = nn.Sequential(nn.Linear(3, 4), nn.Softplus(), nn.Linear(4, 2)).double()
        return Case(model, torch.randn(1, 3, dtype=DTYPE), torch.randn(1, 2, dtype=DTYPE),
                    mg.losses.SquaredLoss())
    return _seeded(15, build)


SMOOTH = {"softplus_mlp": softplus_mlp, "conv": conv_chain, "pendulum10": pendulum10,
          "batchnorm_softplus": batchnorm_softplus, "softplus_one": softplus_one}
PHI = {**DYNAMICS, "pendulum10": PENDULUM10.dynamics}


def case_of(name: str) -> Case:
    return SMOOTH[name]() if name in SMOOTH else make(name)


class Dense:
    """``F(w) = h(psi(w)) + mu ||w||^2/2`` over the flattened trainable weights, by plain autograd."""

    def __init__(self, name: str, case: Case, mu: float = 0.0):
        self.case, self.mu = case, mu
        self.named = [(n, p) for n, p in case.model.named_parameters() if p.requires_grad]
        self.w0 = torch.cat([p.detach().reshape(-1) for _, p in self.named])
        self.phi = PHI.get(name)

    def unflat(self, w):
        out, i = {}, 0
        for n, p in self.named:
            out[n] = w[i:i + p.numel()].view(p.shape)
            i += p.numel()
        return out

    def output(self, w):
        ws = self.unflat(w)
        if self.phi is not None:
            x = self.case.x
            for u in ws["controls"]:
                x = self.phi(u, x)
            return x
        return functional_call(self.case.model, ws, (self.case.x,))

    def F(self, w):
        return self.case.objective(self.output(w), self.case.y) + 0.5 * self.mu * w.pow(2).sum()

    def step(self, kind: str, gamma: float) -> torch.Tensor:
        """``w^+`` of the gradient (12), Gauss-Newton (13) or Newton (14) step, solved densely."""
        w0 = self.w0
        g = jacobian(self.F, w0)
        if kind == "gradient":
            return w0 - gamma * g
        return w0 - torch.linalg.solve(self.matrix(kind) + torch.eye(w0.numel(), dtype=DTYPE) / gamma, g)

    def matrix(self, kind: str) -> torch.Tensor:
        """``J^T hess h J + hess r`` (Gauss-Newton) or ``hess F`` (Newton)."""
        if kind == "newton":
            return hessian(self.F, self.w0)
        J = jacobian(lambda w: self.output(w).reshape(-1), self.w0)
        out = self.output(self.w0).detach()
        Hh = hessian(lambda o: self.case.objective(o.view(out.shape), self.case.y), out.reshape(-1))
        return J.T @ Hh @ J + self.mu * torch.eye(self.w0.numel(), dtype=DTYPE)


def run_step(case: Case, rule, mu: float = 0.0):
    chain = as_chain(case.model)
    oracle = mg.Oracle(chain, case.objective, rule, regularizer=mg.losses.L2(mu) if mu else None)
    result = oracle.step(case.x, case.y)
    w = torch.cat([p.detach().reshape(-1) for p in case.model.parameters() if p.requires_grad])
    return w, result


RULES = {"gradient": so.gradient, "gauss_newton": so.gauss_newton, "newton": so.newton}


@pytest.mark.parametrize("name", [*SMOOTH, "pendulum", "dynamics"])
@pytest.mark.parametrize("kind", list(RULES))
def test_dp_steps_equal_dense_solves(name, kind):
    mu = 1e-2 if name in ("softplus_mlp", "batchnorm_softplus") else 0.0
    gamma = 0.3
    ref = Dense(name, case_of(name), mu)
    w_new, result = run_step(case_of(name), RULES[kind](gamma), mu)
    report = result.info[0].extra["second_order"]
    assert report.feasible and report.gamma_used == gamma
    expected = ref.step(kind, gamma)
    # Prop. C.2: the gradient step is back-propagation, to rounding.
    assert_rel_close(w_new - ref.w0, expected - ref.w0, rtol=1e-10 if kind == "gradient" else 1e-8, what=kind)
    assert all(s == gamma for s in result.steps if s is not None)


@pytest.mark.parametrize("name", ["mlp", "convnet", "residual"])
def test_gauss_newton_through_relu_equals_dense(name):
    """Gauss-Newton needs first derivatives only: ReLU and max-pooling chains, a.e."""
    ref = Dense(name, make(name))
    w_new, _ = run_step(make(name), so.gauss_newton(2.0))
    assert_rel_close(w_new - ref.w0, ref.step("gauss_newton", 2.0) - ref.w0, rtol=1e-8)


@pytest.mark.parametrize("name", ["softplus_mlp", "conv", "pendulum10", "mlp", "batchnorm", "dynamics"])
def test_autodiff_gauss_newton_equals_dp(name):
    mu = 1e-2 if name == "softplus_mlp" else 0.0
    dp, _ = run_step(case_of(name), so.gauss_newton(1.5), mu)
    dual, r_dual = run_step(case_of(name), so.gauss_newton(1.5, method=so.DualCG()), mu)
    cg, r_cg = run_step(case_of(name), so.gauss_newton(1.5, method=so.CG(steps=500, tol=1e-12)), mu)
    w0 = Dense(name, case_of(name)).w0
    assert_rel_close(dual - w0, dp - w0, rtol=1e-8, what="dual (18)")
    assert_rel_close(cg - w0, dp - w0, rtol=1e-8, what="matrix-free CG")
    q = case_of(name).model(case_of(name).x).numel() if name not in PHI else case_of(name).x.numel()
    info = r_dual.info[0].weight
    assert info.converged and info.iterations <= q  # Prop. 3.5: at most q CG steps ...
    assert r_dual.info[0].extra["second_order"].calls == 2 * info.iterations + 2  # ... two calls each
    assert r_cg.info[0].weight.converged


@pytest.mark.parametrize("gamma", [1e2, 1e4])
def test_dual_gauss_newton_at_large_gamma_equals_dp(gamma):
    """At a large gamma the dual system is ill-conditioned: rank(H) CG steps are not enough in
    floating point, so CG runs to its tolerance (a review found 0.11 relative error at 1e4 before)."""
    dp, _ = run_step(case_of("softplus_mlp"), so.gauss_newton(gamma), 0.0)
    dual, r = run_step(case_of("softplus_mlp"), so.gauss_newton(gamma, method=so.DualCG()), 0.0)
    w0 = Dense("softplus_mlp", case_of("softplus_mlp")).w0
    assert_rel_close(dual - w0, dp - w0, rtol=1e-8, what="dual (18)")
    assert r.info[0].weight.converged


def test_truncated_cg_is_a_descent_direction():
    """``CG(k)`` with a fixed number of steps: every iterate is a descent direction."""
    case = softplus_mlp()
    chain = as_chain(case.model)
    grad = mg.Oracle(chain, case.objective)(case.x, case.y).directions
    for k in (1, 2, 3):
        d = mg.Oracle(chain, case.objective, so.gauss_newton(4.0, method=so.CG(k)))(case.x, case.y)
        assert d.info[0].weight.iterations == k and d.info[0].weight.converged is None
        inner = sum((a[n] * b[n]).sum() for a, b in zip(d.directions, grad) if a for n in a)
        assert inner > 0


def test_directions_tend_to_the_gradient_and_drive_torch_optim():
    case = softplus_mlp()
    chain = as_chain(case.model)
    grad = mg.Oracle(chain, case.objective)(case.x, case.y).directions
    for rule in (so.gauss_newton(1e-7), so.newton(1e-7), so.gauss_newton(1e-7, method=so.CG(3))):
        d = mg.Oracle(chain, case.objective, rule)(case.x, case.y).directions
        for a, b in zip(d, grad):
            for n in a or ():
                assert_rel_close(a[n], b[n], rtol=1e-5)
    # .grad gets d_t, so Adam runs on Gauss-Newton directions; x.grad gets lambda_0.
    oracle = mg.Oracle(chain, case.objective, so.gauss_newton(1.0))
    opt = torch.optim.Adam(chain.parameters(), lr=1e-2)
    x = case.x.clone().requires_grad_(True)
    ref = x.detach().requires_grad_(True)
    case.objective(case.model(ref), case.y).backward()
    opt.zero_grad()
    result = oracle.backward(x, case.y)
    for stage, d in zip(chain.stages, result.directions):
        for s in stage.slots:
            assert torch.equal(s.param.grad, d[s.name])
    assert_rel_close(x.grad, ref.grad, rtol=1e-12)
    w0 = [p.detach().clone() for p in chain.parameters()]
    opt.step()
    assert all(not torch.equal(a, p) for a, p in zip(w0, chain.parameters()))


def concave(horizon: int = 3) -> mg.Chain:
    """``x_t = x_{t-1} - w_t^2`` with ``h = mean x_tau``: ``hess F = -2 I``; Newton is feasible
    exactly for gamma < 1/2."""
    return mg.Chain.from_dynamics(lambda w, x: x - w ** 2, torch.tensor([[0.5], [-1.0], [2.0]], dtype=DTYPE),
                                  torch.zeros(2, 1, dtype=DTYPE))


def test_infeasible_newton_is_reported_halved_or_raised():
    def h(x, y=None):
        return x.mean()

    chain = concave()
    w0 = chain.controls.detach().clone()
    result = mg.Oracle(chain, h, so.newton(2.0)).step()
    report = result.info[0].extra["second_order"]
    # M_3 = 1/2 - 2 at the last stage, met first; 1/gamma - 2 > 0 only after three halvings.
    assert (report.feasible, report.stage, report.halvings, report.gamma_used) == (False, 3, 3, 0.25)
    assert report.eigenvalue == pytest.approx(-1.5)
    assert "infeasible at gamma = 2" in result.info[0].weight.message
    assert result.steps == [0.25] * 3
    # The step returned is the (feasible) Newton step at gamma = 1/4: w - (-2 + 4)^{-1} (-2 w) = 2 w.
    assert_rel_close(chain.controls.detach(), 2 * w0, rtol=1e-14)
    with pytest.raises(mg.rules.SolverError, match="infeasible at gamma = 2.*stage 3.*-1.5"):
        mg.Oracle(concave(), h, so.newton(2.0, strict=True)).step()
    ok = mg.Oracle(concave(), h, so.newton(0.25, strict=True)).step()
    assert ok.info[0].extra["second_order"].feasible


def test_feasibility_check_equals_dense_positive_definiteness():
    """Every M_t > 0 exactly when hess F + I/gamma > 0 (the Riccati pivots are its block LDL^T)."""
    ref = Dense("pendulum10", pendulum10())
    eig = torch.linalg.eigvalsh(ref.matrix("newton"))
    assert eig.min() < 0  # the swing-up is not convex: large steps are infeasible
    for gamma in (2.0 ** k for k in range(-6, 7)):
        dense = bool(eig.min() + 1 / gamma > 0)
        try:
            run_step(pendulum10(), so.newton(gamma, strict=True))
            dp = True
        except mg.rules.SolverError:
            dp = False
        assert dp == dense, gamma


def test_gauss_newton_solves_linear_least_squares_in_one_step():
    """Features tanh(x) (a stage without weights) then Linear: GN is exact as gamma -> inf."""
    def build():
        model = nn.Sequential(nn.Tanh(), nn.Linear(4, 3)).double()
        x = torch.randn(20, 4, dtype=DTYPE)
        return Case(model, x, torch.randn(20, 3, dtype=DTYPE), mg.losses.SquaredLoss())
    case = _seeded(13, build)
    a = torch.cat([torch.tanh(case.x), torch.ones(20, 1, dtype=DTYPE)], 1)
    best = torch.linalg.lstsq(a, case.y).solution.T  # (3, 5): [W, b]
    errs = []
    for gamma in (1e2, 1e6, 1e12):
        c = _seeded(13, build)
        run_step(c, so.gauss_newton(gamma))
        got = torch.cat([c.model[1].weight, c.model[1].bias[:, None]], 1).detach()
        errs.append((got - best).norm().item() / best.norm().item())
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-10
    c = _seeded(13, build)
    run_step(c, so.gauss_newton(1e12, method=so.CG(steps=50, tol=1e-14)))
    assert_rel_close(torch.cat([c.model[1].weight, c.model[1].bias[:, None]], 1).detach(), best, rtol=1e-9)


@pytest.mark.parametrize("gamma", [0, -1.0, math.nan, math.inf, "1"])
@pytest.mark.parametrize("make_rule", [so.gradient, so.gauss_newton, so.newton])
def test_bad_gamma_is_named(make_rule, gamma):
    with pytest.raises(ValueError, match=r"(gradient|gauss_newton|newton): gamma must be a finite number"):
        make_rule(gamma)


def max_pool() -> Case:
    def build():
        model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.MaxPool2d(2), nn.Flatten()).double()
        return Case(model, torch.randn(2, 1, 2, 2, dtype=DTYPE), torch.randn(2, 2, dtype=DTYPE),
                    mg.losses.SquaredLoss())
    return _seeded(15, build)


@pytest.mark.parametrize("name, label, fn", [("mlp", "stage 4 (ReLU)", "relu"),
                                             ("residual", "stage 2 (ResidualBlock)", "relu"),
                                             ("max_pool", "stage 2 (MaxPool2d)", "max_pool2d")])
def test_newton_through_a_kink_is_refused_by_name(name, label, fn):
    """A ReLU module, a functional torch.relu inside a block, a max-pooling: named with the stage."""
    case = max_pool() if name == "max_pool" else make(name)
    oracle = mg.Oracle(as_chain(case.model), case.objective, so.newton(1.0))
    match = rf"newton: {re.escape(label)} has no second derivative \(it calls {fn}"
    with pytest.raises(ValueError, match=match):
        oracle.backward(case.x, case.y)


def test_dense_stages_beyond_the_budget_are_refused():
    case = softplus_mlp()
    rule = so.gauss_newton(1.0, method=so.DP(max_entries=500))
    oracle = mg.Oracle(as_chain(case.model), case.objective, rule)
    with pytest.raises(ValueError, match=r"stage 5 \(Linear\) needs dense matrices of \d+ entries.*=CG"):
        oracle.backward(case.x, case.y)


def test_bad_methods_are_named():
    with pytest.raises(TypeError, match="gauss_newton: method must be"):
        so.gauss_newton(1.0, method="cg")
    with pytest.raises(ValueError, match="CG: steps must be an int >= 1"):
        so.CG(0)
    with pytest.raises(ValueError, match="DualCG: tol must be"):
        so.DualCG(-1.0)


@pytest.mark.parametrize("name", CHAIN_NAMES)
def test_gradient_step_on_every_registry_chain(name):
    case = make(name)
    chain = as_chain(case.model)
    ref = mg.Oracle(chain, case.objective)(case.x, case.y).directions
    got = mg.Oracle(chain, case.objective, so.gradient(0.5))(case.x, case.y).directions
    for a, b in zip(got, ref):
        assert (a is None) == (b is None)
        for n in a or ():
            assert_rel_close(a[n], b[n], rtol=1e-10)


def test_config_rules():
    """``rule = "gauss_newton"`` / ``"newton"`` in an experiment config (``moreaugrad run``)."""
    from moreaugrad.runner import methods

    gn = methods.rule({"rule": "gauss_newton", "gamma": 2.0, "method": "cg", "cg": 5, "tol": 1e-6})
    assert (gn.curvature, gn.gamma, gn.method) == (so.Curvature.GAUSS_NEWTON, 2.0, so.CG(5, 1e-6))
    assert methods.rule({"rule": "gauss_newton", "method": "dual"}).method == so.DualCG()
    nt = methods.rule({"rule": "newton", "gamma": 0.5, "strict": True})
    assert (nt.curvature, nt.gamma, nt.strict) == (so.Curvature.NEWTON, 0.5, True)
    with pytest.raises(ValueError, match="method must be one of"):
        methods.rule({"rule": "gauss_newton", "method": "lbfgs"})
    with pytest.raises(ValueError, match="newton: gamma must be"):
        methods.rule({"rule": "newton", "gamma": 0.0})


@pytest.mark.parametrize("gamma", [1e-3, 0.3])
@pytest.mark.parametrize("kind", ["gauss_newton", "newton"])
@pytest.mark.parametrize("batch", [1, 5], ids=["whole", "per_sample"])
def test_float32_steps_equal_float64(batch, kind, gamma):
    # The dense stage Jacobians and Hessian blocks (batched vjps, a recorded backward) in float32
    # against float64, at a small and a large step: measured 2e-7 to 4e-7.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(16)
        m32 = nn.Sequential(nn.Linear(3, 5), nn.Softplus(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
        x32, y32 = torch.randn(batch, 3), torch.randn(batch, 2)
    m64 = copy.deepcopy(m32).double()
    rule = RULES[kind](gamma)
    d32 = mg.Oracle(m32, mg.losses.SquaredLoss(), rule)(x32, y32).directions
    d64 = mg.Oracle(m64, mg.losses.SquaredLoss(), rule)(x32.double(), y32.double()).directions
    for a, b in zip(d32, d64, strict=True):
        for n in a or {}:
            assert a[n].dtype == torch.float32
            assert float((a[n].double() - b[n]).abs().max() / b[n].abs().max()) < 1e-5, (n, kind)
