"""torch's losses on the objective line: closed forms with torch's exact scaling, against the solver.

Each closed form (``Moreau.objective`` with ``closed_forms=True``) must equal the generic solver
run on torch's own loss to rounding (``closed_forms=False``, L-BFGS to a relative 1e-14), in
float64, at a small and a large step: a wrong reduction (``nn.MSELoss`` averages over every element,
``nn.CrossEntropyLoss`` over the weights of the kept rows) would show as a factor.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import moreaugrad as mg
from helpers import rel_err
from moreaugrad.rules import Moreau, Paper
from moreaugrad.rules.target import Augmented
from moreaugrad.solvers import LBFGS, GradientDescent

F64 = torch.float64
B, C = 7, 5


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def logits(shape=(B, C), seed=0):
    return 2 * torch.randn(*shape, generator=_gen(seed), dtype=F64)


def labels(shape=(B,), seed=1, ignore=None):
    y = torch.randint(0, C, shape, generator=_gen(seed))
    if ignore is not None:
        y.view(-1)[::3] = ignore
    return y


def probabilities(shape=(B, C), seed=2):
    return torch.softmax(torch.randn(*shape, generator=_gen(seed), dtype=F64), 1)


def away_from_kinks(shape, seed=3):
    """Residuals with |r| >= 0.5: no entry of an L1 prox lands on its kink (the solver's blind spot)."""
    r = torch.randn(*shape, generator=_gen(seed), dtype=F64)
    return r.sign() * (0.5 + r.abs())


W = torch.tensor([0.5, 2.0, 1.0, 0.1, 3.0], dtype=F64)


def cases():
    z = logits()
    zk = logits((3, C, 4))
    zr = torch.randn(B, 3, 2, generator=_gen(4), dtype=F64)
    yr = zr + torch.randn(B, 3, 2, generator=_gen(5), dtype=F64)
    yl1 = zr - away_from_kinks((B, 3, 2))
    soft = torch.rand(B, 3, generator=_gen(6), dtype=F64)
    zb = 3 * torch.randn(B, 3, generator=_gen(7), dtype=F64)
    logp = torch.log_softmax(z, 1)
    return {
        "ce": (nn.CrossEntropyLoss(), z, labels()),
        "ce_sum": (nn.CrossEntropyLoss(reduction="sum"), z, labels()),
        "ce_weight": (nn.CrossEntropyLoss(weight=W), z, labels()),
        "ce_smoothing": (nn.CrossEntropyLoss(label_smoothing=0.2), z, labels()),
        "ce_ignore": (nn.CrossEntropyLoss(ignore_index=2), z, labels(ignore=2)),
        "ce_all_options": (nn.CrossEntropyLoss(weight=W, label_smoothing=0.3, reduction="mean"),
                           z, labels(ignore=-100)),
        "ce_all_options_sum": (nn.CrossEntropyLoss(weight=W, label_smoothing=0.3, reduction="sum"),
                               z, labels(ignore=-100)),
        "ce_spatial": (nn.CrossEntropyLoss(weight=W, label_smoothing=0.1), zk, labels((3, 4))),
        "ce_probabilities": (nn.CrossEntropyLoss(weight=W, label_smoothing=0.1), z, probabilities()),
        "mse": (nn.MSELoss(), zr, yr),
        "mse_sum": (nn.MSELoss(reduction="sum"), zr, yr),
        "bce": (nn.BCEWithLogitsLoss(), zb, soft),
        "bce_sum_weights": (nn.BCEWithLogitsLoss(weight=torch.rand(3, generator=_gen(8), dtype=F64),
                                                 pos_weight=torch.tensor([0.5, 1.0, 4.0], dtype=F64),
                                                 reduction="sum"), zb, (soft > 0.5).to(F64)),
        "nll": (nn.NLLLoss(), logp, labels()),
        "nll_weight_ignore_sum": (nn.NLLLoss(weight=W, ignore_index=0, reduction="sum"), logp,
                                  labels(ignore=0)),
        "nll_weight_mean": (nn.NLLLoss(weight=W), logp, labels(ignore=-100)),
        "huber": (nn.HuberLoss(delta=0.4), zr, yr),
        "huber_sum": (nn.HuberLoss(delta=2.0, reduction="sum"), zr, yr),
        "smooth_l1": (nn.SmoothL1Loss(beta=0.7), zr, yr),
        "smooth_l1_sum": (nn.SmoothL1Loss(beta=0.3, reduction="sum"), zr, yr),
        "smooth_l1_beta0": (nn.SmoothL1Loss(beta=0.0), zr, yl1),
        "l1": (nn.L1Loss(), zr, yl1),
        "F.cross_entropy": (F.cross_entropy, z, labels()),
        "F.mse_loss": (F.mse_loss, zr, yr),
        "F.binary_cross_entropy_with_logits": (F.binary_cross_entropy_with_logits, zb, soft),
        "F.nll_loss": (F.nll_loss, logp, labels()),
        "F.huber_loss": (F.huber_loss, zr, yr),
        "F.smooth_l1_loss": (F.smooth_l1_loss, zr, yr),
        "F.l1_loss": (F.l1_loss, zr, yl1),
    }


CASES = list(cases())


def signals(h, z, y, gamma):
    closed = Moreau(Paper(gamma=gamma))
    generic = Moreau(Paper(gamma=gamma), LBFGS(tol=1e-14, max_iter=2000), closed_forms=False)
    _, s_closed, info = closed.objective(h, z, y, horizon=2)
    _, s_generic, ginfo = generic.objective(h, z, y, horizon=2)
    return s_closed.value, info, s_generic.value, ginfo


@pytest.mark.parametrize("gamma", [0.3, 20.0])
@pytest.mark.parametrize("name", CASES)
def test_closed_form_matches_the_solver_on_torchs_loss(name, gamma):
    h, z, y = cases()[name]
    if name in ("l1", "smooth_l1_beta0", "F.l1_loss") and gamma > 1:
        gamma = 0.5  # keep every entry off the L1 kink, where the solver cannot converge
    closed, info, generic, ginfo = signals(h, z, y, gamma)
    assert info.method.startswith("closed form"), info
    assert info.converged, info
    assert ginfo.method == "L-BFGS" and ginfo.residual <= 1e-12 * float(generic.norm()), ginfo
    assert closed.shape == z.shape and closed.dtype == z.dtype
    assert rel_err(closed, generic) <= 1e-12, (name, rel_err(closed, generic))


def test_mse_loss_averages_over_every_element():
    # (B, 3, 2): torch's mean divides by 42 entries, not by the batch of 7.
    h, z, y = cases()["mse"]
    gamma = 0.5
    closed, _, _, _ = signals(h, z, y, gamma)
    k = 2 * gamma / z.numel()
    torch.testing.assert_close(closed, k * (z - y) / (1 + k), rtol=1e-15, atol=0)


def test_nll_envelope_is_the_scaled_gradient():
    # NLL is linear in the log-probabilities: grad env(gamma h) = gamma grad h, exactly.
    h, z, y = cases()["nll_weight_mean"]
    z = z.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(h(z, y), z)
    closed, _, _, _ = signals(h, z.detach(), y, 3.0)
    torch.testing.assert_close(closed, 3.0 * g, rtol=0, atol=0)


def test_augmented_objective_uses_the_same_closed_forms():
    h, z, y = cases()["ce_all_options"]
    rule = Augmented(kappa=1.0, beta=0.0, gamma=0.5)
    _, target, info = rule.objective(h, z, y, horizon=2)
    assert info.method.startswith("closed form"), info
    # x^+ = z - grad env(h / m)(z) with m = kappa + 1/gamma = 3
    closed, _, _, _ = signals(h, z, y, 1 / 3)
    torch.testing.assert_close(target.residual(z), closed, rtol=1e-14, atol=0)


def test_parameters_without_a_closed_form_go_to_the_solver():
    z, y = logits(), labels()
    for h, yy in [(nn.CrossEntropyLoss(weight=-W), y),  # not convex
                  (nn.CrossEntropyLoss(), -probabilities()),
                  (nn.BCEWithLogitsLoss(pos_weight=torch.tensor(-1.0, dtype=F64)),
                   torch.rand(B, C, dtype=F64))]:
        _, _, info = Moreau(Paper(gamma=0.1)).objective(h, z, yy, horizon=1)
        assert info.method == "L-BFGS", (h, info)


def test_a_subclass_with_its_own_forward_goes_to_the_solver():
    class Doubled(nn.MSELoss):
        def forward(self, input, target):
            return 2 * super().forward(input, target)

    class Renamed(nn.MSELoss):
        pass

    z, y = logits(), logits(seed=9)
    _, _, info = Moreau(Paper(gamma=0.1)).objective(Doubled(), z, y, horizon=1)
    assert info.method == "L-BFGS"
    _, _, info = Moreau(Paper(gamma=0.1)).objective(Renamed(), z, y, horizon=1)
    assert info.method == "closed form: squared error"


def test_other_functions_and_partials_go_to_the_solver():
    from functools import partial

    z, y = logits(), labels()
    for h in (partial(F.cross_entropy, label_smoothing=0.1), lambda a, b: F.cross_entropy(a, b) ** 2):
        _, _, info = Moreau(Paper(gamma=0.1)).objective(h, z, y, horizon=1)
        assert info.method == "L-BFGS"


def test_unrecognised_loss_is_solved_to_a_tolerance_by_default():
    """The preset's fixed two quasi-Newton steps are for the layers; the objective line is solved."""
    def quartic(a, b):
        return (a - b).pow(4).mean()

    z, y = logits(), logits(seed=10)
    _, _, info = mg.rules.moreau(gamma=0.5).objective.objective(quartic, z, y, horizon=2)
    assert info.method == "L-BFGS" and info.converged, info
    exact = Moreau(Paper(gamma=0.5), LBFGS(tol=1e-14, max_iter=2000))
    _, s_exact, _ = exact.objective(quartic, z, y, horizon=2)
    _, s_default, _ = mg.rules.moreau(gamma=0.5).objective.objective(quartic, z, y, horizon=2)
    assert rel_err(s_default.value, s_exact.value) < 1e-8


def test_fixed_steps_asked_for_answer_the_objective_line_and_say_so():
    z, y = logits(), logits(seed=10)
    rule = mg.rules.moreau(gamma=0.5, solver=GradientDescent(step=1.0, max_iter=1, tol=None)).objective
    _, _, info = rule.objective(lambda a, b: (a - b).pow(4).mean(), z, y, horizon=2)
    assert info.method == "gradient descent" and info.converged is None
    assert info.message.startswith(mg.solvers.FIXED)


def test_a_solver_with_a_tolerance_answers_the_objective_line():
    z, y = logits(), logits(seed=10)
    rule = Moreau(Paper(gamma=0.5), LBFGS(tol=1e-6, max_iter=3))
    _, _, info = rule.objective(lambda a, b: (a - b).pow(4).mean(), z, y, horizon=2)
    assert info.iterations == 3 and info.message == mg.solvers.CAP


@pytest.mark.parametrize("h,match", [
    (nn.CrossEntropyLoss, r"got the class nn\.CrossEntropyLoss, not a loss; pass an instance: "
                          r"nn\.CrossEntropyLoss\(\)"),
    (mg.losses.SquaredLoss, r"pass an instance: mg\.losses\.SquaredLoss\(\)"),
    (3.0, "must be callable as h\\(output, target\\), got float"),
])
def test_check_objective_refuses_a_class_or_a_non_callable(h, match):
    with pytest.raises(TypeError, match=match):
        mg.losses.check_objective(h)


def test_check_objective_refuses_an_unreduced_loss():
    with pytest.raises(ValueError, match=r"nn\.MSELoss\(reduction='none'\) returns one loss per element"):
        mg.losses.check_objective(nn.MSELoss(reduction="none"))
    for h in (nn.CrossEntropyLoss(), F.mse_loss, mg.losses.CrossEntropy(), lambda a, b: a.sum()):
        mg.losses.check_objective(h)


def test_functional_losses_map_to_default_modules():
    assert isinstance(mg.losses.functional_loss(F.cross_entropy), nn.CrossEntropyLoss)
    assert mg.losses.functional_loss(F.relu) is None
    assert mg.losses.functional_loss([]) is None  # unhashable: no crash


def test_l1_envelope_is_soft_thresholding():
    # prox of c |r| (c = gamma for reduction sum): |r| <= c lands on the target (grad env = r),
    # larger residuals move by c. The solver cannot check the first kind (a kink), so by hand.
    z = torch.tensor([[0.05, -0.1, 2.0, -3.0]], dtype=F64)
    _, closed, _ = Moreau(Paper(gamma=0.5)).objective(nn.L1Loss(reduction="sum"), z, torch.zeros_like(z), 2)
    expected = torch.tensor([[0.05, -0.1, 0.5, -0.5]], dtype=F64)
    torch.testing.assert_close(closed.value, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["ce_all_options", "ce_probabilities", "mse", "bce_sum_weights",
                                  "huber", "smooth_l1", "nll_weight_mean"])
@pytest.mark.parametrize("gamma", [1e-5, 1.0])
def test_float32_is_as_accurate_as_float64(name, gamma):
    """Increments, never differences of new points: float32 keeps its digits at small steps."""
    h, z, y = cases()[name]
    h32 = copy.deepcopy(h).float()  # its weights in float32, its options as they are
    z32 = z.float()
    y32 = y.float() if y.is_floating_point() else y
    s64, _, _, _ = signals(h, z32.double(), y32.double() if y.is_floating_point() else y, gamma)
    _, s32, info = Moreau(Paper(gamma=gamma)).objective(h32, z32, y32, horizon=2)
    assert s32.value.dtype == torch.float32 and info.converged, info
    assert rel_err(s32.value.double(), s64) < 1e-5
