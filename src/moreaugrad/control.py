"""Control problems as chains: the swinging pendulum of 000 App. E.1.1."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .chain import Chain
from .checks import check_count

DISCRETIZATIONS = ("explicit", "semi_implicit", "rk4")


@dataclass(frozen=True)
class Pendulum:
    """Swing a pendulum up in ``horizon`` steps (000 Sec. 4, App. E.1.1).

    The continuous dynamics are ``theta' = omega`` and ``omega' = a(theta, omega, w)`` with
    ``a(theta, omega, w) = -(g/l) sin theta - mu/(m l^2) omega + w/(m l^2)``; the torque ``w_t`` is
    held constant over a step of length ``delta``. ``discretization`` picks the map
    ``x_t = phi(w_t, x_{t-1})``:

    - ``"explicit"`` (default, 000 App. E.1.1 as printed): explicit Euler,
      ``theta_t = theta_{t-1} + delta omega_{t-1}``,
      ``omega_t = omega_{t-1} + delta a(theta_{t-1}, omega_{t-1}, w_t)``.
      It amplifies the state (about 1.047 per step at ``delta = 0.1``).
    - ``"semi_implicit"``: symplectic (semi-implicit) Euler, the velocity first, then the angle with
      the new velocity: ``omega_t = omega_{t-1} + delta a(theta_{t-1}, omega_{t-1}, w_t)``,
      ``theta_t = theta_{t-1} + delta omega_t``.
    - ``"rk4"``: the classical Runge-Kutta step on ``z = (theta, omega)``, ``z' = F(z) =
      (omega, a(theta, omega, w_t))``: ``k1 = F(z)``, ``k2 = F(z + delta/2 k1)``,
      ``k3 = F(z + delta/2 k2)``, ``k4 = F(z + delta k3)``,
      ``z_t = z + delta/6 (k1 + 2 k2 + 2 k3 + k4)``.

    Cost ``h(x_tau) = (theta_tau - pi)^2 + rho omega_tau^2`` (mean over a batch of starts). The paper
    leaves ``x_0`` implicit; the default ``x0 = (0, 0)`` starts at rest hanging down (DESIGN 6).
    """

    horizon: int = 100
    mass: float = 1.0
    length: float = 1.0
    friction: float = 0.01
    gravity: float = 9.81
    delta: float = 0.1
    rho: float = 0.1
    discretization: str = "explicit"
    x0: tuple[float, float] = (0.0, 0.0)

    def __post_init__(self) -> None:
        check_count("Pendulum", "horizon", self.horizon)
        if self.discretization not in DISCRETIZATIONS:
            raise ValueError(f"Pendulum: discretization must be one of {DISCRETIZATIONS}, "
                             f"got {self.discretization!r}")
        x0 = tuple(self.x0)
        if len(x0) != 2 or not all(isinstance(v, int | float) and math.isfinite(v) for v in x0):
            raise ValueError(f"Pendulum: x0 must be two finite numbers (theta_0, omega_0), got {self.x0!r}")
        object.__setattr__(self, "x0", (float(x0[0]), float(x0[1])))

    def acceleration(self, theta: Tensor, omega: Tensor, torque: Tensor) -> Tensor:
        """``a(theta, omega, w) = -(g/l) sin theta - mu/(m l^2) omega + w/(m l^2)`` (000 App. E.1.1)."""
        inertia = self.mass * self.length ** 2
        return (-(self.gravity / self.length) * torch.sin(theta) - (self.friction / inertia) * omega
                + torque / inertia)

    def dynamics(self, w: Tensor, x: Tensor) -> Tensor:
        """``phi(w_t, x_{t-1})`` for a batch of states ``x`` of shape ``(B, 2)``, control shape ``(1,)``."""
        theta, omega, torque, d = x[..., 0], x[..., 1], w[..., 0], self.delta
        if self.discretization == "explicit":
            return torch.stack([theta + d * omega,
                                omega + d * self.acceleration(theta, omega, torque)], dim=-1)
        if self.discretization == "semi_implicit":
            omega_new = omega + d * self.acceleration(theta, omega, torque)
            return torch.stack([theta + d * omega_new, omega_new], dim=-1)
        k1t, k1o = omega, self.acceleration(theta, omega, torque)
        k2t = omega + d / 2 * k1o
        k2o = self.acceleration(theta + d / 2 * k1t, k2t, torque)
        k3t = omega + d / 2 * k2o
        k3o = self.acceleration(theta + d / 2 * k2t, k3t, torque)
        k4t = omega + d * k3o
        k4o = self.acceleration(theta + d * k3t, k4t, torque)
        return torch.stack([theta + d / 6 * (k1t + 2 * k2t + 2 * k3t + k4t),
                            omega + d / 6 * (k1o + 2 * k2o + 2 * k3o + k4o)], dim=-1)

    def objective(self, x: Tensor, target: object = None) -> Tensor:
        """``h(x) = (theta - pi)^2 + rho omega^2``, averaged over the batch."""
        return ((x[..., 0] - math.pi) ** 2 + self.rho * x[..., 1] ** 2).mean()

    def initial_controls(self, dtype: torch.dtype = torch.float64,
                         device: torch.device | str | None = None) -> Tensor:
        """Zero torque at every step, shape ``(horizon, 1)``."""
        return torch.zeros(self.horizon, 1, dtype=dtype, device=device)

    def initial_state(self, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> Tensor:
        """``x_0 = (theta_0, omega_0)``, the ``x0`` field."""
        return torch.tensor(self.x0, dtype=dtype, device=device)

    def chain(self, controls: Tensor | None = None, x0: Tensor | None = None) -> Chain:
        """The control chain ``x_t = phi(w_t, x_{t-1})`` with one torque per step. The Euler steps
        are affine in the torque (declared to the chain, so weight lines take closed forms); the
        RK4 step is not."""
        controls = self.initial_controls() if controls is None else controls
        x0 = self.initial_state(controls.dtype, controls.device) if x0 is None else x0
        return Chain.from_dynamics(self.dynamics, controls, x0, affine=self.discretization != "rk4")
