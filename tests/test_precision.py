"""float32 against float64, at large and small steps: no rule may lose its digits to cancellation.

Each model is built once, its weights and inputs rounded to float32, and the same numbers are run in
float32 and in float64. The directions must agree to a relative error below 1e-4 (max abs difference
over max abs value, per parameter): no more than a float32 forward pass itself loses. Small steps are
where the papers' targets ``x - tau lambda`` and new points ``w^+`` cancel against ``x`` and ``w``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import moreaugrad as mg
from helpers import NewtonSolver

STEPS = [1.0, 1e-3, 1e-5]


def presets(t: float) -> dict:
    """Every preset, its step(s) set to ``t``."""
    return {
        "backprop": mg.rules.backprop(),
        "moreau": mg.rules.moreau(gamma=t, alpha=t),
        "moreau_lagrangian": mg.rules.moreau(schedule=mg.rules.Lagrangian(t, t)),
        "proxprop_cg": mg.rules.proxprop(tau_theta=1.0, tau=t),
        "proxprop_exact": mg.rules.proxprop(tau_theta=1.0, tau=t, method=mg.lstsq.Exact()),
        "penalty_backprop": mg.rules.penalty_backprop(t),
        "target_prop": mg.rules.target_prop(kappa=1 / t),
        "regularized_target_prop": mg.rules.regularized_target_prop(kappa=1.0, gamma=t, alpha=t),
        "augmented_lagrangian": mg.rules.augmented_lagrangian(kappa=1.0, beta=1.0, gamma=t, alpha=t),
        "fenchel": mg.rules.fenchel(tau=t),
    }


PRESETS = list(presets(1.0))


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))


def convnet() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, stride=2),
                         nn.ReLU(), nn.Flatten(), nn.Linear(36, 5))


def smooth() -> nn.Sequential:
    return nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 16),
                         nn.Softplus(), nn.Linear(16, 5))


def grouped() -> nn.Sequential:
    """Layers as single stages (Linear + activation): the generic inner solvers."""
    return nn.Sequential(nn.Sequential(nn.Linear(20, 16), nn.Tanh()),
                         nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 5))


MODELS = {"mlp": (mlp, (16, 20)), "convnet": (convnet, (8, 2, 8, 8)), "smooth": (smooth, (16, 20)),
          "grouped": (grouped, (16, 20))}


def pair(name: str):
    """The same model and batch in float32 and float64 (float32 numbers in both)."""
    build, shape = MODELS[name]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m32 = build()
        x32 = torch.randn(shape)
    y = torch.arange(shape[0]) % 5
    return (m32, x32), (copy.deepcopy(m32).double(), x32.double()), y


def directions(model, x, y, rule) -> list[torch.Tensor]:
    result = mg.Oracle(mg.Chain(model), mg.losses.CrossEntropy(), rule)(x, y)
    return [d for ds in result.directions if ds for d in ds.values()]


def max_rel_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    """Per parameter ``max |got - want| / max |want|``, the largest over parameters."""
    errs = [float((g.double() - w).abs().max() / w.abs().max()) for g, w in zip(got, want, strict=True)
            if w.abs().max() > 0]
    return max(errs)


# Known limits, measured (max relative difference float32 vs float64), left open in issue 15's note:
_CG = ("CG(3) on the Gram of softplus outputs (condition ~1e3): float32 iterates lose cond * eps, "
       "1e-4 to 4e-4")
_SUBNORMAL = ("the dual decays by kappa gamma = 1e-5 per stage: the first layer's direction is 7e-38, "
              "float32's subnormal range, 1e-2")
_TP = "plain TP's generic least squares (no proximal term) is ill-conditioned: cond * eps, 2e-2"
KNOWN = {
    ("smooth", "proxprop_cg", 1.0): _CG, ("smooth", "proxprop_cg", 1e-3): _CG,
    ("smooth", "proxprop_cg", 1e-5): _CG,
    ("smooth", "regularized_target_prop", 1e-5): _SUBNORMAL,
    ("grouped", "target_prop", 1.0): _TP, ("grouped", "target_prop", 1e-3): _TP,
    ("grouped", "target_prop", 1e-5): _TP,
}


# Capped generic solves are reported (InexactSolveWarning); the contract here is float32 == float64.
@pytest.mark.filterwarnings("ignore::moreaugrad.InexactSolveWarning")
@pytest.mark.parametrize("step", STEPS)
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("model", list(MODELS))
def test_float32_equals_float64(model, preset, step):
    reason = KNOWN.get((model, preset, step))
    if reason:
        pytest.xfail(reason)
    (m32, x32), (m64, x64), y = pair(model)
    d32 = directions(m32, x32, y, presets(step)[preset])
    d64 = directions(m64, x64, y, presets(step)[preset])
    assert all(torch.isfinite(d).all() for d in d32)
    assert max_rel_error(d32, d64) < 1e-4


# --- relative stopping tests ---------------------------------------------------------------------


def test_pendulum_geometric_has_no_zero_direction():
    """000 Sec. 4 schedule gamma_s = 0.5^(tau - s + 1): the early stages' problems are ~1e-15 in size.
    An absolute stopping test returned their starting point (a zero direction, reported converged);
    the relative one solves them like any other."""
    p = mg.control.Pendulum(horizon=50)
    controls = 0.3 * torch.sin(torch.arange(50, dtype=torch.float64))[:, None]
    sched = mg.rules.Geometric(0.5, 1.0)

    def run(solver):
        oracle = mg.Oracle(p.chain(controls), p.objective,
                           mg.rules.moreau(schedule=sched, solver=solver))
        result = oracle()
        return result.directions, result.info

    got, info = run(mg.solvers.LBFGS(tol=1e-12, max_iter=200))
    want, _ = run(NewtonSolver())
    d = torch.stack([g["w"] for g in got]).reshape(-1)
    ref = torch.stack([g["w"] for g in want]).reshape(-1)
    assert (ref != 0).all() and (d != 0).all()
    assert all(i.state.converged and i.weight.converged for i in info if i.state is not None)
    # Each stage is solved to 1e-12 relative; the errors compound over 50 stages to a few 1e-12.
    assert float((d - ref).norm() / ref.norm()) < 1e-11
    assert float(((d - ref).abs() / ref.abs()).max()) < 1e-9


# --- regularisers inside the weight problem (000 App. D.6) ----------------------------------------


@pytest.mark.parametrize("preset", ["augmented_lagrangian", "regularized_target_prop"])
def test_regularizer_inside_the_weight_problem(preset):
    """AL and regularised TP put r_t = mu ||.||^2/2 inside the proximal weight problem of 000 App.
    D.6, ``argmin_v beta r^T phi(v) + kappa/2 ||phi(v) - x^+||^2 + ||v - w||^2/(2 alpha) + r_t(v)``,
    on closed-form (Linear) and generic (Linear + Tanh as one stage) stages alike."""
    from moreaugrad.sweep import record, sweep

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 8), nn.Tanh()),
                          nn.Linear(8, 3)).double()
    x, y = torch.randn(10, 6, dtype=torch.float64), torch.arange(10) % 3
    kappa, alpha, gamma = 0.7, 0.4, 0.9
    beta = 1.0 if preset == "augmented_lagrangian" else 0.0
    solver = mg.solvers.LBFGS(tol=1e-14, max_iter=1000)
    rule = getattr(mg.rules, preset)(kappa=kappa, gamma=gamma, alpha=alpha, solver=solver,
                                     **({"beta": beta} if beta else {}))
    reg = mg.losses.L2(0.3)
    h = mg.losses.CrossEntropy()
    result = mg.Oracle(mg.Chain(model), h, rule, regularizer=reg)(x, y)
    tape = record(mg.Chain(model), x, [reg] * 4)
    signals = sweep(tape, rule, h, y).signals
    for site, signal, got in zip(tape.sites, signals, result.directions, strict=True):
        if got is None:
            continue
        names = list(site.w)
        w = [site.w[n].detach() for n in names]
        x_t = site.x.detach()
        r = signal.residual(x_t)
        x_plus = x_t - r

        def problem(z, names=names, w=w, site=site, r=r, x_plus=x_plus):
            v = [wi + zi for wi, zi in zip(w, z, strict=True)]
            out = site.phi(dict(zip(names, v, strict=True)))
            val = beta * (r * out).sum() + 0.5 * kappa * (out - x_plus).pow(2).sum()
            val = val + sum(zi.pow(2).sum() for zi in z) / (2 * alpha) + sum(reg(vi) for vi in v)
            return val.reshape(1)

        z, _ = NewtonSolver().solve(problem, [torch.zeros_like(wi) for wi in w])
        for n, zi in zip(names, z, strict=True):
            want = -zi / alpha
            err = float((got[n] - want).abs().max() / want.abs().max())
            assert err < 1e-8, (site.label, n, err)


# --- unreachable targets and refused settings --------------------------------------------------


def test_softplus_target_without_preimage_is_reported():
    """Plain TP inverts Softplus; a target <= 0 has no preimage (000 eq. 40 has no minimiser): it is
    clipped, reported, and raises under strict. A reachable target is inverted exactly."""
    from moreaugrad.sweep import record

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Softplus(beta=2.0), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    site = record(mg.Chain(model), x).sites[1]
    out = site.x.detach()
    reachable = 0.5 * out
    for strict in (False, True):
        rule = mg.rules.target_prop(strict=strict).state
        update = rule.state(site, mg.Target(reachable))
        u = site.x_prev.detach() - update.signal.residual(site.x_prev.detach())
        torch.testing.assert_close(nn.functional.softplus(u, beta=2.0), reachable, rtol=1e-12, atol=0)
        assert update.info.converged
    bad = reachable.clone()
    bad[0, 0] = -0.1
    update = mg.rules.target_prop().state.state(site, mg.Target(bad))
    assert update.info.converged is False and "no preimage" in update.info.message
    assert torch.isfinite(update.signal.value).all()
    with pytest.raises(mg.rules.SolverError, match="no preimage"):
        mg.rules.target_prop(strict=True).state.state(site, mg.Target(bad))


def test_settings_with_identically_zero_directions_are_refused():
    with pytest.raises(ValueError, match="kappa and beta are both 0"):
        mg.rules.regularized_target_prop(kappa=0.0)


@pytest.mark.parametrize("tau", [1e-10, 1e-30])
def test_penalty_backprop_at_tiny_steps_is_backprop(tau):
    """004 Prop. 1 at any step: the targets are kept as moves, so tau lambda is never lost next to x."""
    (m32, x32), _, y = pair("mlp")
    got = directions(m32, x32, y, mg.rules.penalty_backprop(tau))
    want = directions(m32, x32, y, mg.rules.backprop())
    assert max_rel_error(got, [w.double() for w in want]) < 1e-5


# --- half precision -----------------------------------------------------------------------------


def cosines(got: list[torch.Tensor], want: list[torch.Tensor]) -> list[float]:
    # By hand: F.cosine_similarity clamps norms at 1e-8, and decayed directions are far smaller.
    return [float((g.double() * w.double()).sum() / (g.double().norm() * w.double().norm()))
            for g, w in zip(got, want, strict=True)]


@pytest.mark.parametrize("step", [1.0, 1e-3])
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_runs_its_inner_solves_in_float32(dtype, preset, step):
    """bf16 and fp16 models: the inner solves run in float32 (as autocast upcasts reductions) and
    the directions come back in the parameters' dtype, close to the float32 oracle's."""
    (m32, x32), _, y = pair("mlp")
    half = copy.deepcopy(m32).to(dtype)
    ref = copy.deepcopy(half).float()  # the same (rounded) weights in float32
    want = directions(ref, x32.to(dtype).float(), y, presets(step)[preset])
    if min(float(w.abs().max()) for w in want) < torch.finfo(dtype).smallest_normal * 2 ** -10:
        # Directions that decay along the chain (beta = 1 schedules) leave float16's range.
        with pytest.raises(mg.UnderflowError, match="underflows to 0 in torch.float16"):
            directions(half, x32.to(dtype), y, presets(step)[preset])
        return
    got = directions(half, x32.to(dtype), y, presets(step)[preset])
    assert all(d.dtype == dtype for d in got)
    assert min(cosines(got, want)) > 0.99


@pytest.mark.parametrize("preset", PRESETS)
def test_autocast_runs_the_sweep_in_float32(preset):
    (m32, x32), _, y = pair("mlp")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = directions(m32, x32, y, presets(1e-3)[preset])
    want = directions(m32, x32, y, presets(1e-3)[preset])
    assert all(d.dtype == torch.float32 for d in got)
    assert min(cosines(got, want)) > 0.99


# --- the input's .grad convention ----------------------------------------------------------------


@pytest.mark.parametrize("preset", ["backprop", "moreau_lagrangian", "target_prop", "augmented_lagrangian",
                                    "penalty_backprop"])
def test_input_grad_is_lambda_0_or_the_move_to_the_target(preset):
    """x.grad is signal_0 read with a unit beta: lambda_0 for dual rules, x_0 - x_0^+ for target
    rules (whatever the rule's beta), so ``x - x.grad`` is the target a target rule asks for."""
    (m32, x32), (m64, x64), y = pair("mlp")
    x = x64.clone().requires_grad_(True)
    result = mg.Oracle(mg.Chain(m64), mg.losses.CrossEntropy(), presets(1e-3)[preset]).backward(x, y)
    signal = result.input_signal
    if isinstance(signal, mg.Dual):
        torch.testing.assert_close(x.grad, signal.value, rtol=0, atol=0)
    else:
        torch.testing.assert_close(x64 - x.grad, signal.value, rtol=1e-12, atol=1e-14)
    if preset == "backprop":
        xa = x64.clone().requires_grad_(True)
        mg.losses.CrossEntropy()(m64(xa), y).backward()
        torch.testing.assert_close(x.grad, xa.grad, rtol=1e-12, atol=1e-15)


def test_input_grad_of_a_half_model_is_in_its_dtype():
    (m32, x32), _, y = pair("mlp")
    half = copy.deepcopy(m32).to(torch.bfloat16)
    x = x32.to(torch.bfloat16).requires_grad_(True)
    mg.Oracle(mg.Chain(half), mg.losses.CrossEntropy(), mg.rules.target_prop()).backward(x, y)
    assert x.grad.dtype == torch.bfloat16 and bool(x.grad.abs().max() > 0)


@pytest.mark.parametrize("module, x, r, want", [
    (nn.Tanh(), 5.0, 1e-6, -0.00547701172401881),
    (nn.Sigmoid(), 9.0, 1e-7, -0.0008101802015293115),
    (nn.Softplus(beta=2.0), -5.0, 1e-6, -0.02252739065910262),
    (nn.Tanh(), 10.0, 1e-10, -0.01198435086223011),
])
def test_small_moves_near_saturation_are_inverted_not_clipped(module, x, r, want):
    """Plain TP's inverse of a reachable target, ``sigma^{-1}(sigma(x) - r) - x`` (float64 values from
    mpmath), in float32 as in float64: a small move next to the range's end is not 'unreachable'."""
    from moreaugrad.rules.target import _inverse_increment

    for dtype in (torch.float32, torch.float64):
        xt = torch.tensor([x], dtype=dtype)
        v, out = _inverse_increment(module, xt, module(xt), torch.tensor([r], dtype=dtype))
        assert not bool(out)
        assert abs(float(v) - want) < 1e-5 * abs(want)


def test_unreachable_targets_are_clipped_to_the_same_point_in_every_dtype():
    from moreaugrad.rules.target import _inverse_increment

    for module, x, r in [(nn.Tanh(), 0.3, 2.0), (nn.Sigmoid(), 0.0, 0.7), (nn.Softplus(), 1.0, 2.0)]:
        got = []
        for dtype in (torch.float32, torch.float64):
            xt = torch.tensor([x], dtype=dtype)
            v, out = _inverse_increment(module, xt, module(xt), torch.tensor([r], dtype=dtype))
            assert bool(out)
            got.append(float(v))
        assert abs(got[0] - got[1]) < 1e-6 * abs(got[1])
