"""The Moreau oracle: exact identities, limits, closed forms against solvers, pendulum MorGD (000, 001)."""

import math

import pytest
import torch
from torch import nn

import moreaugrad as mg
from moreaugrad.rules import Geometric, Lagrangian, Moreau, Paper, PerStage, SolverError, moreau
from moreaugrad.solvers import LBFGS, GradientDescent, QuasiNewton
from moreaugrad.sweep import record

F64 = torch.float64


def mlp_separate(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 4),
                          nn.Softplus(), nn.Linear(4, 3)).to(F64)
    return model, torch.randn(8, 5, dtype=F64), torch.randint(0, 3, (8,)), mg.losses.CrossEntropy()


def mlp_grouped(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Sequential(nn.Linear(5, 7), nn.Tanh()),
                          nn.Sequential(nn.Linear(7, 6), nn.Sigmoid()), nn.Linear(6, 3)).to(F64)
    return model, torch.randn(8, 5, dtype=F64), torch.randn(8, 3, dtype=F64), mg.losses.SquaredLoss()


def convnet(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.SiLU(), nn.AvgPool2d(2), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4)).to(F64)
    return model, torch.randn(4, 1, 8, 8, dtype=F64), torch.randint(0, 4, (4,)), mg.losses.CrossEntropy()


def pendulum(seed=0):
    torch.manual_seed(seed)
    p = mg.control.Pendulum(horizon=12)
    chain = p.chain(controls=torch.randn(12, 1, dtype=F64))
    return chain, None, None, p.objective


CHAINS = {"mlp_separate": mlp_separate, "mlp_grouped": mlp_grouped, "convnet": convnet,
          "pendulum": pendulum}


def directions(model, x, y, h, rule, regularizer=None):
    result = mg.Oracle(model, h, rule, regularizer)(x, y)
    flat = torch.cat([d.flatten() for ds in result.directions if ds for d in ds.values()])
    return flat, result


def exact(schedule, tol=1e-10, **kw):
    return moreau(schedule=schedule, solver=LBFGS(tol=tol, max_iter=2000), **kw)


@pytest.mark.parametrize("name", CHAINS)
def test_one_unit_gradient_step_from_zero_is_backprop(name):
    """001 Sec. 2: one GD step of size 1 from 0 on each subproblem returns the vjp, so the whole
    sweep with beta = 1/gamma equals backprop, for any gamma and alpha."""
    model, x, y, h = CHAINS[name]()
    grad, _ = directions(model, x, y, h, mg.rules.backprop())
    one_step = GradientDescent(step=1.0, max_iter=1, tol=None)
    rule = moreau(schedule=Lagrangian(gamma=0.7, alpha=3.0), solver=one_step, closed_forms=False)
    d, result = directions(model, x, y, h, rule)
    torch.testing.assert_close(d, grad, rtol=1e-12, atol=1e-14)
    assert all(i.weight.iterations == 1 for i in result.info if i.weight is not None)


@pytest.mark.parametrize("name", CHAINS)
def test_closed_forms_match_the_generic_solver(name):
    model, x, y, h = CHAINS[name]()
    for schedule in (Paper(gamma=0.5, alpha=0.8), Lagrangian(gamma=0.3, alpha=0.5)):
        closed, rc = directions(model, x, y, h, exact(schedule, tol=1e-12))
        # The generic solves run to a gradient norm at rounding level (1e-12 is not always reachable).
        generic, rg = directions(model, x, y, h, exact(schedule, tol=1e-12, closed_forms=False))
        solves = [i for s in rg.info for i in (s.state, s.weight) if i is not None]
        assert all(i.residual < 2e-11 and "not strongly convex" not in i.message for i in solves)
        torch.testing.assert_close(closed, generic, rtol=1e-10, atol=1e-10)


def test_linear_stage_moreau_gradient_is_alpha_times_the_vjp():
    """For phi linear in w, grad env(alpha lam^T phi(., x))(w) = alpha vjp_w(lam): d_t = vjp."""
    torch.manual_seed(4)
    lin = nn.Linear(6, 4).to(F64)
    chain = mg.Chain(nn.Sequential(lin))
    site = record(chain, torch.randn(5, 6, dtype=F64), input_signal=True).sites[0]
    lam = mg.Dual(torch.randn(5, 4, dtype=F64))
    _, vjp_w = site.vjp(lam.value)
    vjp_x, _ = site.vjp(lam.value)
    for alpha in (0.1, 2.0, 50.0):
        for closed in (True, False):
            rule = Moreau(Paper(gamma=alpha, alpha=alpha), LBFGS(tol=1e-13), closed_forms=closed)
            up = rule.weight(site, lam)
            for n in vjp_w:
                torch.testing.assert_close(alpha * up.direction[n], alpha * vjp_w[n], rtol=1e-10, atol=1e-12)
            assert up.step == alpha
            # state line, beta = 1: grad env(gamma lam^T A .) = gamma A^T lam
            st = rule.state(site, lam)
            torch.testing.assert_close(st.signal.value, alpha * vjp_x, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["mlp_separate", "mlp_grouped", "convnet"])
def test_lagrangian_schedule_tends_to_backprop_linearly(name):
    """000 eq. 9: with beta = 1/gamma, ||d(gamma) - grad|| / ||grad|| = O(gamma) as gamma, alpha -> 0."""
    model, x, y, h = CHAINS[name]()
    grad, _ = directions(model, x, y, h, mg.rules.backprop())
    errs = []
    for gamma in (1e-2, 5e-3, 2.5e-3, 1.25e-3):
        d, _ = directions(model, x, y, h, exact(Lagrangian(gamma=gamma, alpha=gamma)))
        errs.append(float((d - grad).norm() / grad.norm()))
    ratios = [a / b for a, b in zip(errs, errs[1:])]
    assert errs[0] < 0.05
    assert all(1.8 < r < 2.2 for r in ratios), (errs, ratios)


def test_oracle_on_f_of_g_versus_the_envelope_of_the_composition():
    """000 Prop. 2.1: on h o g with convex h, the oracle's input signal (scaled by alpha) is close to
    the exact Moreau gradient grad env(alpha h o g)(x), with a gap O(alpha^2)."""
    torch.manual_seed(5)
    g = nn.Sequential(nn.Linear(4, 4), nn.Tanh()).to(F64)
    h = mg.losses.SquaredLoss()
    x = torch.randn(1, 4, dtype=F64)
    y = torch.randn(1, 4, dtype=F64)
    gaps = []
    for alpha in (0.4, 0.2, 0.1, 0.05):
        x_var = x.clone().requires_grad_(True)
        oracle = mg.Oracle(g, h, exact(Lagrangian(gamma=alpha, alpha=alpha)))
        approx = alpha * oracle(x_var, y).input_signal.value

        def fun(z, alpha=alpha):
            return (alpha * h(g(x + z[0]), y) + 0.5 * z[0].pow(2).sum()).reshape(1)

        (ystar,), info = LBFGS(tol=1e-11, max_iter=1000).solve(fun, [torch.zeros_like(x)])
        assert info.converged
        envelope_grad = -ystar
        gaps.append(float((approx - envelope_grad).norm() / envelope_grad.norm()))
        # ... and much closer than the scaled gradient alpha grad(h o g)(x), the linearised answer
        with torch.enable_grad():
            xg = x.clone().requires_grad_(True)
            scaled_grad = alpha * torch.autograd.grad(h(g(xg), y), xg)[0]
        assert gaps[-1] < float((scaled_grad - envelope_grad).norm() / envelope_grad.norm()) / 3
    # The relative gap is small and shrinks linearly with alpha (absolute gap O(alpha^2)).
    assert gaps[0] < 0.1
    assert all(1.6 < a / b < 2.4 for a, b in zip(gaps, gaps[1:])), gaps


def test_schedules_follow_the_paper_indices():
    tau = 4
    geo = Geometric(gamma=0.5, alpha=3.0)
    assert geo.dual(tau, tau) == (0.5, 2.0)              # gamma_tau = gamma
    assert geo.dual(0, tau) == (0.5 ** 5, 2.0 ** 5)      # gamma_0 = gamma^(tau + 1)
    assert geo.step(tau, tau) == 3.0                     # alpha gamma_{tau+1} = alpha
    assert geo.step(1, tau) == 3.0 * 0.5 ** 3            # alpha gamma_2
    paper = Paper(gamma=0.5, alpha=3.0)
    assert paper.dual(2, tau) == (0.5, 1.0) and paper.step(2, tau) == 3.0
    lag = Lagrangian(gamma=0.25, alpha=3.0)
    assert lag.dual(1, tau) == (0.25, 4.0)
    per = PerStage(gamma=[1, 2, 3], beta=[4, 5, 6], alpha=[7, 8])
    assert per.dual(2, 2) == (3, 6) and per.step(1, 2) == 7
    with pytest.raises(ValueError, match="built for 2 stages, the chain has 3"):
        per.step(1, 3)


def test_geometric_schedule_is_algo_2_and_paper_is_its_rescaling():
    """000 App. E.2.1: with lambda_hat_t = gamma_t lambda_t, Algo 2 with gamma_t = gamma^(tau-t+1)
    is eq. 52 with beta = 1; the weight steps then differ by gamma: alpha_t/gamma_t = alpha/gamma."""
    model, x, y, h = mlp_separate()
    gamma, alpha = 0.5, 0.8
    _, geo = directions(model, x, y, h, exact(Geometric(gamma=gamma, alpha=alpha)))
    _, pap = directions(model, x, y, h, exact(Paper(gamma=gamma, alpha=alpha / gamma)))
    for t, (dg, dp) in enumerate(zip(geo.directions, pap.directions)):
        if dg is None:
            continue
        gamma_t = gamma ** (len(model) - t)  # stage t+1 reads lambda_{t+1}
        for n in dg:
            torch.testing.assert_close(gamma_t * dg[n], dp[n], rtol=1e-9, atol=1e-12)


def test_regularised_linear_closed_form_matches_solver():
    """000 App. D.6: w^+ = argmin alpha lam^T phi(v) + alpha mu/2 ||v||^2 + ||v - w||^2/2."""
    model, x, y, h = mlp_separate()
    reg = mg.losses.L2(0.3)
    closed, _ = directions(model, x, y, h, exact(Paper(0.5, 0.9)), reg)
    generic, _ = directions(model, x, y, h, exact(Paper(0.5, 0.9), closed_forms=False), reg)
    torch.testing.assert_close(closed, generic, rtol=1e-9, atol=1e-10)
    # alpha -> 0 gives the regularised gradient
    grad, _ = directions(model, x, y, h, mg.rules.backprop(), reg)
    small, _ = directions(model, x, y, h, exact(Lagrangian(1e-4, 1e-4)), reg)
    assert (small - grad).norm() / grad.norm() < 1e-3


def test_moreau_step_is_the_proximal_update():
    """Oracle.step: w <- w - alpha_t d_t = argmin_v alpha lam^T phi(v, x) + ||v - w||^2/2."""
    model, x, y, h = mlp_grouped()
    before = [p.detach().clone() for p in model.parameters()]
    oracle = mg.Oracle(model, h, exact(Paper(0.5, 0.7)))
    result = oracle.step(x, y)
    flat = [d for ds in result.directions for d in ds.values()]
    for p0, p, d in zip(before, model.parameters(), flat):
        torch.testing.assert_close(p.detach(), p0 - 0.7 * d, rtol=0, atol=1e-15)
        assert p.grad is None


def test_info_reports_every_solve():
    model, x, y, h = mlp_grouped()
    _, result = directions(model, x, y, h, moreau(gamma=0.5, alpha=1.0))
    stage = result.info[0]
    assert stage.weight.method.startswith("quasi-Newton") and stage.weight.iterations == 2
    assert result.info[-1].weight.method == "closed form: linear"
    assert result.info[-1].extra["objective"].method == "closed form: squared loss"
    assert stage.state is None  # x_0 is not a variable


def test_per_stage_solver_override():
    model, x, y, h = mlp_grouped()
    rule = moreau(solver=QuasiNewton(max_iter=2, tol=None), solvers={2: LBFGS(max_iter=7, tol=None)})
    _, result = directions(model, x, y, h, rule)
    assert result.info[1].weight.method == "L-BFGS" and result.info[1].weight.iterations == 7
    assert result.info[0].weight.method.startswith("quasi-Newton")


def test_strict_raises_on_a_non_convex_subproblem():
    # With beta = 1 a large gamma makes gamma lam^T tanh(x + y) + ||y||^2/2 non-convex.
    model, x, y, h = mlp_separate()
    x = x.clone().requires_grad_(True)
    rule = moreau(schedule=Paper(gamma=50.0, alpha=1.0), strict=True)
    with pytest.raises(SolverError, match=r"state subproblem of stage \d+ \((Tanh|Softplus)\)"):
        mg.Oracle(model, h, rule).backward(x, y)
    loose = mg.Oracle(model, h, moreau(schedule=Paper(gamma=50.0, alpha=1.0)))(x, y)
    assert any(i.state is not None and "not strongly convex" in i.state.message for i in loose.info)


@pytest.mark.parametrize("kwargs,match", [
    (dict(gamma=0.0), "gamma must be a finite number > 0, got 0.0"),
    (dict(alpha=-1.0), "alpha must be a finite number > 0, got -1.0"),
    (dict(gamma=math.inf), "gamma must be a finite number > 0, got inf"),
])
def test_bad_moreau_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moreau(**kwargs)


def test_bad_schedule_and_solver_types():
    with pytest.raises(TypeError, match="schedule must be a Schedule"):
        Moreau(schedule="paper")
    with pytest.raises(TypeError, match=r"solvers\[2\] must have a .solve"):
        moreau(solvers={2: "lbfgs"})


def test_morgd_on_the_pendulum_decreases_monotonically():
    """000 Sec. 4 / App. E.2.2: gamma = 0.5, alpha from a powers-of-2 grid; MorGD (Oracle.step)
    lowers the swing-up cost at every iteration for the selected step."""
    p = mg.control.Pendulum(horizon=50)
    iters = 8

    def run(alpha):
        oracle = mg.Oracle(p.chain(), p.objective, moreau(gamma=0.5, alpha=alpha))
        return [oracle.step().loss.item() for _ in range(iters)] + [oracle(None, None).loss.item()]

    grid = {2.0 ** k: run(2.0 ** k) for k in range(5, 11, 1)}
    finite = {a: c for a, c in grid.items() if all(math.isfinite(v) for v in c)}
    best = min(finite, key=lambda a: finite[a][-1])
    costs = finite[best]
    assert all(b < a for a, b in zip(costs, costs[1:])), (best, costs)
    assert costs[-1] < 0.5 * costs[0]


def test_dropout_stage_is_re_evaluated_with_its_recorded_mask():
    """A generic solve re-evaluates phi_t: a train-mode dropout must redraw the recorded mask, so
    the unit-GD-step identity with backprop still holds exactly."""
    torch.manual_seed(7)
    layer = nn.Sequential(nn.Linear(5, 16), nn.Dropout(0.5), nn.Tanh())
    model = nn.Sequential(layer, nn.Linear(16, 3)).to(F64)
    x, y = torch.randn(6, 5, dtype=F64), torch.arange(6) % 3
    h = mg.losses.CrossEntropy()
    tape = record(mg.Chain(model), x)
    site = tape.sites[0]
    assert site.rng is not None
    torch.testing.assert_close(site.phi(), site.x.detach(), rtol=0, atol=0)
    state = torch.get_rng_state()
    grad, _ = directions(model, x, y, h, mg.rules.backprop())
    torch.set_rng_state(state)
    one_step = GradientDescent(step=1.0, max_iter=1, tol=None)
    rule = moreau(schedule=Lagrangian(gamma=0.7, alpha=3.0), solver=one_step, closed_forms=False)
    d, _ = directions(model, x, y, h, rule)
    torch.testing.assert_close(d, grad, rtol=1e-12, atol=1e-14)
