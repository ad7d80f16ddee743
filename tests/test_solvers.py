"""The generic inner solvers on problems with known minimisers."""

import numpy as np
import pytest
import torch

from moreaugrad import solvers
from moreaugrad.solvers import CAP, FIXED, LBFGS, GradientDescent, QuasiNewton, goldstein

SOLVERS = [GradientDescent(step=0.03, tol=1e-11, max_iter=30000), QuasiNewton(tol=1e-11, max_iter=300),
           LBFGS(tol=1e-11, max_iter=200)]


def per_sample_quadratic(B=6, d=4, seed=0):
    """F_i(y) = y^T A_i y / 2 - b_i^T y: per-sample curvatures differing by a factor ~50."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(B, d, d, generator=g, dtype=torch.float64)
    scale = torch.logspace(-1, 0.7, B, dtype=torch.float64)[:, None, None]
    A = scale * (M @ M.transpose(1, 2) + torch.eye(d, dtype=torch.float64))
    b = torch.randn(B, d, generator=g, dtype=torch.float64)

    def fun(z):
        (y,) = z
        return 0.5 * torch.einsum("bi,bij,bj->b", y, A, y) - (b * y).sum(1)

    return fun, torch.linalg.solve(A, b), b


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_solvers_reach_the_minimiser_per_sample(solver):
    fun, y_star, b = per_sample_quadratic()
    (y,), info = solver.solve(fun, [torch.zeros_like(b)])
    assert info.converged and info.message == "", info
    # The tolerance is relative to each sample's starting gradient (here ||b_i||).
    assert info.residual <= 1e-11 * float(b.norm(dim=1).max())
    torch.testing.assert_close(y, y_star, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
@pytest.mark.parametrize("size", [1.0, 1e-9])
def test_tolerance_is_relative_to_the_problem_scale(solver, size):
    # A problem scaled down by 1e-9 (a small step) is solved to the same relative accuracy, never
    # stopped at iteration 0 by an absolute tolerance above its starting residual.
    fun, y_star, b = per_sample_quadratic()
    (y,), info = solver.solve(lambda z: size * fun([z[0] / size]) * size, [torch.zeros_like(b)])
    assert info.converged and info.iterations > 0, info
    torch.testing.assert_close(y / size, y_star, rtol=1e-9, atol=1e-10)


def test_one_unit_gradient_step_from_zero_is_minus_the_gradient():
    # F(y) = <c, y> + ||y||^2/2: one step of size 1 from 0 gives -c, the exact minimiser.
    c = torch.randn(3, 5, dtype=torch.float64)
    (y,), info = GradientDescent(step=1.0, max_iter=1).solve(
        lambda z: (c * z[0]).sum(1) + 0.5 * z[0].pow(2).sum(1), [torch.zeros_like(c)])
    torch.testing.assert_close(y, -c, rtol=0, atol=0)
    assert info.iterations == 1


def test_goldstein_step_satisfies_both_conditions_per_group():
    fun, _, b = per_sample_quadratic()
    z = [torch.zeros_like(b)]
    f = fun(z)
    g = [-b]  # gradient at 0
    s, _ = goldstein(fun, z, f, g)
    gg = (b * b).sum(1)
    fn = fun([s[:, None] * b])
    assert (fn <= f - 0.25 * s * gg + 1e-14).all()
    assert (fn >= f - 0.75 * s * gg - 1e-14).all()
    assert s.unique().numel() > 1  # steps are per sample


@pytest.mark.parametrize("solver", [QuasiNewton(max_iter=50), LBFGS(max_iter=50)], ids=str)
def test_non_convex_subproblem_is_reported(solver):
    # F(y) = -y^2 + y^4/4 - 0.3 y: negative curvature around 0.
    def fun(z):
        (y,) = z
        return (-(y ** 2) + y ** 4 / 4 - 0.3 * y).sum(1)

    _, info = solver.solve(fun, [torch.full((1, 1), 0.05, dtype=torch.float64)])
    assert not info.converged
    assert "not strongly convex" in info.message


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_non_finite_iterate_is_reported(solver):
    def fun(z):
        (y,) = z
        return (torch.log(1 - y) + y ** 2).sum(1)  # nan for y > 1; start beyond the domain

    _, info = solver.solve(fun, [torch.full((2, 1), 2.0, dtype=torch.float64)])
    assert not info.converged and info.message == "non-finite iterate"


def test_iteration_cap_is_reported():
    fun, _, b = per_sample_quadratic()
    _, info = QuasiNewton(max_iter=2).solve(fun, [torch.zeros_like(b)])
    assert info.iterations == 2 and not info.converged and "iteration cap" in info.message


def test_fixed_steps_are_labelled_as_such_not_as_failures():
    # F(y) = <c, y> + ||y||^2/2: one unit step from 0 is exact, but the residual known is the one
    # at 0 (the gradient at the returned point is not taken): the message says so.
    c = torch.randn(3, 5, dtype=torch.float64)
    (y,), info = GradientDescent(step=1.0, tol=None, max_iter=1).solve(
        lambda z: (c * z[0]).sum(1) + 0.5 * z[0].pow(2).sum(1), [torch.zeros_like(c)])
    torch.testing.assert_close(y, -c, rtol=0, atol=0)
    assert info.converged is None and info.message.startswith(FIXED), info
    assert "iterate 0, before the last step, not measured at the returned point" in info.message
    assert info.residual == pytest.approx(float(c.norm(dim=1).max()), rel=1e-15)
    fun, _, b = per_sample_quadratic()
    _, info = QuasiNewton(tol=None, max_iter=2).solve(fun, [torch.zeros_like(b)])
    assert info.iterations == 2 and info.converged is None and info.message != CAP
    assert "iterate 1, before the last step" in info.message


@pytest.mark.parametrize("make,match", [
    (lambda: GradientDescent(step=0.0), "step must be > 0"),
    (lambda: QuasiNewton(max_iter=0), "max_iter must be an int >= 1, got 0"),
    (lambda: LBFGS(tol=-1.0), "tol must be a number >= 0, got -1.0"),
    (lambda: LBFGS(memory=0), "memory must be an int >= 1, got 0"),
])
def test_bad_solver_settings(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# -- one group on the CPU: per-group values as numpy scalars (solvers.Scalars) ----------------------

def one_group_problems(dtype):
    """Problems of one group (G = 1) that take each branch of the solvers' bookkeeping: unit steps
    accepted, Goldstein doubling (a flat problem) and halving (a steep one), two tensors, a
    warm start with a scale, non-convexity and a non-finite iterate."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(6, 4, generator=g, dtype=dtype)
    b = torch.randn(6, generator=g, dtype=dtype)
    c = torch.randn(3, 5, generator=g, dtype=dtype)

    def smooth(z):  # log-cosh data + a proximal term
        return (torch.log(torch.cosh(A @ z[0].reshape(-1) - b)).sum() + 0.5 * z[0].pow(2).sum()).reshape(1)

    def flat(z):
        return (1e-3 * z[0].pow(2).sum() - (b[:4] * z[0].reshape(-1)).sum()).reshape(1)

    def steep(z):
        return (50 * z[0].pow(2).sum() + z[0].pow(4).sum() - (b[:4] * z[0].reshape(-1)).sum()).reshape(1)

    def two(z):
        return (torch.log(torch.cosh(z[0] - c)).sum() + (z[1] ** 4).sum() - z[1].sum()
                + 0.5 * (z[0].pow(2).sum() + z[1].pow(2).sum())).reshape(1)

    def nonconvex(z):
        return (-(z[0] ** 2) + z[0] ** 4 / 4 - 0.3 * z[0]).sum().reshape(1)

    def beyond(z):
        return (torch.log(1 - z[0]) + z[0] ** 2).sum().reshape(1)

    zeros = torch.zeros(1, 4, dtype=dtype)
    return {
        "smooth": (smooth, [zeros], None),
        "flat": (flat, [zeros], None),
        "steep": (steep, [zeros], None),
        "two tensors": (two, [torch.zeros(3, 5, dtype=dtype), torch.zeros(7, dtype=dtype)], None),
        "warm start": (smooth, [0.3 * torch.ones(1, 4, dtype=dtype)], torch.tensor([2.5], dtype=dtype)),
        "warm start, a float64 scale": (smooth, [0.3 * torch.ones(1, 4, dtype=dtype)],
                                        torch.tensor([0.1], dtype=torch.float64)),
        "non-convex": (nonconvex, [torch.full((1, 1), 0.05, dtype=dtype)], None),
        "non-finite": (beyond, [torch.full((1, 2), 2.0, dtype=dtype)], None),
    }


ONE_GROUP_SOLVERS = [QuasiNewton(tol=None, max_iter=2), QuasiNewton(tol=1e-10, max_iter=60),
                     LBFGS(tol=1e-10, max_iter=60), LBFGS(tol=0, max_iter=7),
                     GradientDescent(step=0.05, tol=1e-9, max_iter=300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("solver", ONE_GROUP_SOLVERS, ids=repr)
def test_one_group_on_numpy_scalars_is_the_tensor_path_bit_for_bit(solver, dtype, monkeypatch):
    assert isinstance(solvers.values_for(torch.zeros(1, dtype=dtype)), solvers.Scalars)
    problems = one_group_problems(dtype)
    fast = {name: solver.solve(fun, z0, scale=scale) for name, (fun, z0, scale) in problems.items()}
    monkeypatch.setattr(solvers, "values_for", lambda f: solvers.Tensors(f.numel()))
    for name, (fun, z0, scale) in problems.items():
        z_ref, info_ref = solver.solve(fun, z0, scale=scale)
        z, info = fast[name]
        for a, b in zip(z, z_ref, strict=True):
            assert torch.equal(a, b) or (a.isnan() == b.isnan()).all() and torch.equal(
                a.nan_to_num(), b.nan_to_num()), (name, a, b)
        assert info == info_ref, name
    if solver.tol is not None:  # the problems reach the branches they are named for
        assert "not strongly convex" in fast["non-convex"][1].message
    assert fast["non-finite"][1].message == "non-finite iterate"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_goldstein_on_numpy_scalars_doubles_and_halves_as_on_tensors(dtype):
    problems = one_group_problems(dtype)
    for name, factor in [("flat", 2.0), ("steep", 0.5)]:
        fun, (z0,), _ = problems[name]
        f, g = solvers.value_and_grad(fun, [z0])
        s_ref, _ = goldstein(fun, [z0], f, g)
        v = solvers.values_for(f)
        s, _ = goldstein(fun, [z0], v.of(f), g, values=v)
        assert isinstance(s, np.floating) and float(s) == float(s_ref)
        assert (float(s) > 1) if factor > 1 else (float(s) < 1), (name, float(s))


def test_values_for_keeps_tensors_for_several_groups_and_other_dtypes():
    assert type(solvers.values_for(torch.zeros(3))) is solvers.Tensors
    assert type(solvers.values_for(torch.zeros(1, dtype=torch.float16))) is solvers.Tensors
    assert type(solvers.values_for(torch.zeros(1, device="meta"))) is solvers.Tensors


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.3])
@pytest.mark.parametrize("groups", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_pairing_takes_the_gradient_autograd_takes_through_it(groups, dtype, scale):
    # data(z) = scale <lam, out(z) - offset> per group: its value and gradient by one vjp of out
    # equal autograd's through the pairing (bit for bit for a power-of-2 scale, else to rounding),
    # and an out that ignores z gives z alone.
    g = torch.Generator().manual_seed(groups)
    A = torch.randn(3, 3, generator=g, dtype=dtype)
    lam = torch.randn(groups, 3, generator=g, dtype=dtype)
    offset = torch.randn(groups, 3, generator=g, dtype=dtype)
    z = [torch.randn(groups, 3, generator=g, dtype=dtype)]

    def out(z):
        return torch.sin(z[0] @ A) + z[0]

    pairing = solvers.Pairing(out, lam, offset, scale, groups)
    f, grad = solvers.value_and_grad(solvers.Proximal(pairing, groups), z)
    f_ref, grad_ref = solvers.value_and_grad(solvers.Proximal(lambda z: pairing(z), groups), z)
    assert torch.equal(f, f_ref)
    if scale in (1.0, 0.5):
        assert torch.equal(grad[0], grad_ref[0])
    else:
        eps = 64 * torch.finfo(dtype).eps
        torch.testing.assert_close(grad[0], grad_ref[0], rtol=eps, atol=eps * float(grad_ref[0].abs().max()))
    assert torch.equal(pairing(z) + 0.5 * solvers.gdot(z, z, groups), f_ref)
    const = solvers.Pairing(lambda z: offset + 1, lam, offset, scale, groups)
    f, grad = solvers.value_and_grad(solvers.Proximal(const, groups), z)
    assert torch.equal(grad[0], z[0]) and not grad[0].requires_grad
    ident = solvers.Pairing(lambda z: z[0], lam, offset, scale, groups)  # the gradient is lam itself
    f, grad = solvers.value_and_grad(solvers.Proximal(ident, groups), z)
    torch.testing.assert_close(grad[0], scale * lam + z[0], rtol=4 * torch.finfo(dtype).eps, atol=0)
    assert torch.equal(lam, pairing.lam)  # not scaled in place
