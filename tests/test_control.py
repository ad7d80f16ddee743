"""The swinging pendulum of 000 App. E.1.1 as a control chain.

The paper's discretized dynamics (App. E.1.1, "Motion dynamics for the swinging pendulum"):
``theta_t = theta_{t-1} + delta omega_{t-1}`` and
``omega_t = omega_{t-1} + delta (-(g/l) sin theta_{t-1} - mu/(m l^2) omega_{t-1} + w_t/(m l^2))``,
objective ``h(x) = (theta - pi)^2 + rho omega^2`` with ``m = l = 1``, ``mu = 0.01``, ``g = 9.81``,
``delta = 0.1``, ``rho = 0.1``.
"""

from __future__ import annotations

import math

import pytest
import torch

import moreaugrad as mg
from helpers import DTYPE, assert_rel_close


def _step(p: mg.control.Pendulum, theta: float, omega: float, w: float) -> torch.Tensor:
    return p.dynamics(torch.tensor([w], dtype=DTYPE), torch.tensor([[theta, omega]], dtype=DTYPE))[0]


def test_paper_constants():
    p = mg.control.Pendulum()
    assert (p.horizon, p.mass, p.length, p.friction, p.gravity, p.delta, p.rho) == \
        (100, 1.0, 1.0, 0.01, 9.81, 0.1, 0.1)


def test_dynamics_hand_computed_steps():
    p = mg.control.Pendulum()
    # theta = 0: no gravity torque. omega' = 1 + 0.1 (-0.01 * 1 + 2) = 1.199.
    theta, omega = _step(p, 0.0, 1.0, 2.0).tolist()
    assert theta == pytest.approx(0.1, abs=1e-15)
    assert omega == pytest.approx(1.199, abs=1e-15)
    # theta = pi/2, at rest, no torque: omega' = -0.1 g = -0.981.
    theta, omega = _step(p, math.pi / 2, 0.0, 0.0).tolist()
    assert theta == pytest.approx(math.pi / 2, abs=1e-15)
    assert omega == pytest.approx(-0.981, abs=1e-15)


def test_dynamics_coefficients():
    """``m l^2 = 0.5`` and ``g/l = 19.62`` with m = 2, l = 0.5: each coefficient where the paper puts it."""
    p = mg.control.Pendulum(mass=2.0, length=0.5)
    # omega' = 1 + 0.1 (-(0.01 / 0.5) * 1 + 2 / 0.5) = 1.398.
    assert _step(p, 0.0, 1.0, 2.0).tolist() == pytest.approx([0.1, 1.398], abs=1e-15)
    # omega' = 0.1 * (-(9.81 / 0.5) * 1) = -1.962.
    assert _step(p, math.pi / 2, 0.0, 0.0).tolist() == pytest.approx([math.pi / 2, -1.962], abs=1e-14)
    # A generic state against the formula written out with math.sin.
    theta, omega, w = 0.3, -0.2, 0.5
    q = mg.control.Pendulum(mass=1.5, length=0.8, friction=0.05, delta=0.05)
    inertia = 1.5 * 0.8 ** 2
    expected = [theta + 0.05 * omega,
                omega + 0.05 * (-(9.81 / 0.8) * math.sin(theta) - 0.05 / inertia * omega + w / inertia)]
    assert _step(q, theta, omega, w).tolist() == pytest.approx(expected, abs=1e-15)


def test_dynamics_broadcasts_over_batch():
    p = mg.control.Pendulum()
    x = torch.tensor([[0.0, 1.0], [math.pi / 2, 0.0]], dtype=DTYPE)
    out = p.dynamics(torch.tensor([2.0], dtype=DTYPE), x)
    assert out.shape == (2, 2) and out.dtype == DTYPE
    assert out[0].tolist() == pytest.approx([0.1, 1.199], abs=1e-15)
    assert out[1].tolist() == pytest.approx([math.pi / 2, -0.981 + 0.2], abs=1e-15)


def test_objective_at_rest_is_pi_squared():
    p = mg.control.Pendulum(horizon=20)
    x0 = p.initial_state()
    assert x0.tolist() == [0.0, 0.0] and x0.dtype == DTYPE
    assert p.objective(x0[None]).item() == pytest.approx(math.pi ** 2, rel=1e-15)
    # Zero torque from rest: the pendulum stays down, so the chain's objective is pi^2 too.
    chain = p.chain()
    assert p.objective(chain()).item() == pytest.approx(math.pi ** 2, rel=1e-15)
    result = mg.Oracle(chain, p.objective).backward()
    assert result.loss.item() == pytest.approx(math.pi ** 2, rel=1e-15)


def test_objective_weights_speed_by_rho():
    p = mg.control.Pendulum()
    x = torch.tensor([[math.pi + 1.0, 2.0], [math.pi, 0.0]], dtype=DTYPE)
    # ((1 + 0.1 * 4) + 0) / 2 over the batch of two.
    assert p.objective(x).item() == pytest.approx(0.7, abs=1e-15)


def test_chain_shape():
    p = mg.control.Pendulum(horizon=20)
    chain = p.chain()
    assert len(chain) == 20
    assert chain.controls.shape == (20, 1) and chain.controls.dtype == DTYPE
    assert torch.equal(chain.controls, torch.zeros(20, 1, dtype=DTYPE))
    assert chain.x0.shape == (1, 2)
    assert p.initial_controls().shape == (20, 1)
    assert mg.control.Pendulum().initial_controls().shape == (100, 1)


def _rollout(p: mg.control.Pendulum, controls: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """The pendulum by a plain Python loop on the paper's formulas (no moreaugrad)."""
    theta, omega = x0[0], x0[1]
    for w in controls[:, 0]:
        theta, omega = (theta + p.delta * omega,
                        omega + p.delta * (-(p.gravity / p.length) * torch.sin(theta)
                                           - p.friction / (p.mass * p.length ** 2) * omega
                                           + w / (p.mass * p.length ** 2)))
    return (theta - math.pi) ** 2 + p.rho * omega ** 2


@pytest.mark.parametrize("random_controls", [False, True])
def test_oracle_gradient_matches_autograd_rollout(random_controls):
    p = mg.control.Pendulum(horizon=20)
    gen = torch.Generator().manual_seed(0)
    controls = (torch.randn(20, 1, generator=gen, dtype=DTYPE) if random_controls
                else p.initial_controls())
    ref = controls.clone().requires_grad_(True)
    loss = _rollout(p, ref, p.initial_state())
    (expected,) = torch.autograd.grad(loss, [ref])
    assert expected[:-1].abs().min() > 0  # every torque but the last moves theta_tau

    chain = p.chain(controls)
    result = mg.Oracle(chain, p.objective, mg.rules.backprop()).backward()
    assert result.loss.item() == pytest.approx(loss.item(), rel=1e-12)
    assert_rel_close(chain.controls.grad, expected, 1e-10)
    # The last torque only moves omega_tau: dh/dw_tau = 2 rho omega_tau delta / (m l^2).
    omega_tau = result.output[0, 1].item()
    assert chain.controls.grad[-1, 0].item() == pytest.approx(2 * 0.1 * omega_tau * 0.1, abs=1e-15)


def test_gradient_descent_swings_up():
    """A few oracle steps reduce the objective of the autograd rollout (the oracle is a descent oracle)."""
    p = mg.control.Pendulum(horizon=20)
    chain = p.chain()
    oracle = mg.Oracle(chain, p.objective, mg.rules.backprop(step=0.05))
    losses = [oracle.step().loss.item() for _ in range(5)]
    final = _rollout(p, chain.controls.detach(), p.initial_state()).item()
    assert losses[0] == pytest.approx(math.pi ** 2, rel=1e-15)
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))
    assert final < losses[-1]


# -- discretisations (issue 14): each against a hand-written roll-out of its equations, in float64 --


def _accel(p: mg.control.Pendulum, theta: float, omega: float, w: float) -> float:
    inertia = p.mass * p.length ** 2
    return -(p.gravity / p.length) * math.sin(theta) - p.friction / inertia * omega + w / inertia


def _hand_rollout(p: mg.control.Pendulum, controls: list[float], theta: float, omega: float) -> list:
    """The states ``x_1 .. x_tau`` by plain Python floats and ``math.sin`` (no torch)."""
    d, out = p.delta, []
    for w in controls:
        if p.discretization == "explicit":
            theta, omega = theta + d * omega, omega + d * _accel(p, theta, omega, w)
        elif p.discretization == "semi_implicit":
            omega = omega + d * _accel(p, theta, omega, w)
            theta = theta + d * omega
        else:
            def f(th, om, w=w):
                return om, _accel(p, th, om, w)
            k1 = f(theta, omega)
            k2 = f(theta + d / 2 * k1[0], omega + d / 2 * k1[1])
            k3 = f(theta + d / 2 * k2[0], omega + d / 2 * k2[1])
            k4 = f(theta + d * k3[0], omega + d * k3[1])
            theta, omega = (theta + d / 6 * (k1[0] + 2 * k2[0] + 2 * k3[0] + k4[0]),
                            omega + d / 6 * (k1[1] + 2 * k2[1] + 2 * k3[1] + k4[1]))
        out.append((theta, omega))
    return out


@pytest.mark.parametrize("disc", ["explicit", "semi_implicit", "rk4"])
@pytest.mark.parametrize("x0", [(0.0, 0.0), (math.pi / 2, 0.0), (0.3, -0.7)])
def test_discretization_matches_hand_rollout(disc, x0):
    p = mg.control.Pendulum(horizon=30, discretization=disc, x0=x0, friction=0.05)
    controls = torch.randn(30, 1, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
    chain = p.chain(controls)
    expected = _hand_rollout(p, controls[:, 0].tolist(), *x0)
    assert chain.x0[0].tolist() == list(x0)
    # Step by step through phi, and the whole chain's output.
    x = p.initial_state()[None]
    for t, w in enumerate(controls):
        x = p.dynamics(w, x)
        assert x[0].tolist() == pytest.approx(list(expected[t]), abs=1e-12, rel=1e-12)
    assert chain()[0].tolist() == pytest.approx(list(expected[-1]), abs=1e-12, rel=1e-12)
    h = (expected[-1][0] - math.pi) ** 2 + p.rho * expected[-1][1] ** 2
    assert p.objective(chain()).item() == pytest.approx(h, rel=1e-12)


def test_semi_implicit_uses_the_new_velocity():
    """One step from theta = pi/2 at rest: explicit Euler leaves theta, semi-implicit moves it by
    ``delta * omega_1 = 0.1 * (-0.981)``."""
    w, x = torch.zeros(1, dtype=DTYPE), torch.tensor([[math.pi / 2, 0.0]], dtype=DTYPE)
    exp = mg.control.Pendulum().dynamics(w, x)[0].tolist()
    semi = mg.control.Pendulum(discretization="semi_implicit").dynamics(w, x)[0].tolist()
    assert exp == pytest.approx([math.pi / 2, -0.981], abs=1e-15)
    assert semi == pytest.approx([math.pi / 2 - 0.0981, -0.981], abs=1e-15)


def test_rk4_is_fourth_order():
    """Over a fixed time, two half steps err 2 (1/2)^5 = 1/16 of one full step (local error O(delta^5))."""
    x, w = torch.tensor([[0.4, 0.3]], dtype=DTYPE), torch.tensor([0.2], dtype=DTYPE)

    def flow(delta: float, steps: int) -> torch.Tensor:
        p, y = mg.control.Pendulum(delta=delta, discretization="rk4"), x
        for _ in range(steps):
            y = p.dynamics(w, y)
        return y

    ref = flow(0.1 / 256, 256)
    e1, e2 = (flow(0.1, 1) - ref).norm().item(), (flow(0.05, 2) - ref).norm().item()
    assert 13 < e1 / e2 < 19


def test_explicit_stays_the_default_and_bad_values_are_named():
    p = mg.control.Pendulum()
    assert p.discretization == "explicit" and p.x0 == (0.0, 0.0)
    assert mg.control.Pendulum(x0=(1, 0)).initial_state().tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="discretization"):
        mg.control.Pendulum(discretization="euler")
    with pytest.raises(ValueError, match="x0"):
        mg.control.Pendulum(x0=(0.0,))
    with pytest.raises(ValueError, match="x0"):
        mg.control.Pendulum(x0=(float("nan"), 0.0))
