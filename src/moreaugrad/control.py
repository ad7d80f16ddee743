"""Control problems as chains: the swinging pendulum of 000 App. E.1.1."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .chain import Chain
from .checks import check_count


@dataclass(frozen=True)
class Pendulum:
    """Swing a pendulum up in ``horizon`` steps (000 Sec. 4, App. E.1.1).

    ``theta_t = theta_{t-1} + delta omega_{t-1}`` and
    ``omega_t = omega_{t-1} + delta (-(g/l) sin theta_{t-1} - mu/(m l^2) omega_{t-1} + w_t/(m l^2))``
    with cost ``h(x_tau) = (theta_tau - pi)^2 + rho omega_tau^2`` (mean over a batch of starts).
    The paper leaves ``x_0`` implicit; we start at rest hanging down, ``x_0 = (0, 0)`` (DESIGN 6).
    """

    horizon: int = 100
    mass: float = 1.0
    length: float = 1.0
    friction: float = 0.01
    gravity: float = 9.81
    delta: float = 0.1
    rho: float = 0.1

    def __post_init__(self) -> None:
        check_count("Pendulum", "horizon", self.horizon)

    def dynamics(self, w: Tensor, x: Tensor) -> Tensor:
        """``phi(w_t, x_{t-1})`` for a batch of states ``x`` of shape ``(B, 2)``, control shape ``(1,)``."""
        theta, omega = x[..., 0], x[..., 1]
        inertia = self.mass * self.length ** 2
        accel = (-(self.gravity / self.length) * torch.sin(theta)
                 - (self.friction / inertia) * omega + w[..., 0] / inertia)
        return torch.stack([theta + self.delta * omega, omega + self.delta * accel], dim=-1)

    def objective(self, x: Tensor, target: object = None) -> Tensor:
        """``h(x) = (theta - pi)^2 + rho omega^2``, averaged over the batch."""
        return ((x[..., 0] - math.pi) ** 2 + self.rho * x[..., 1] ** 2).mean()

    def initial_controls(self, dtype: torch.dtype = torch.float64,
                         device: torch.device | str | None = None) -> Tensor:
        """Zero torque at every step, shape ``(horizon, 1)``."""
        return torch.zeros(self.horizon, 1, dtype=dtype, device=device)

    def initial_state(self, dtype: torch.dtype = torch.float64,
                      device: torch.device | str | None = None) -> Tensor:
        return torch.zeros(2, dtype=dtype, device=device)

    def chain(self, controls: Tensor | None = None, x0: Tensor | None = None) -> Chain:
        """The control chain ``x_t = phi(w_t, x_{t-1})`` with one torque per step."""
        controls = self.initial_controls() if controls is None else controls
        x0 = self.initial_state(controls.dtype, controls.device) if x0 is None else x0
        return Chain.from_dynamics(self.dynamics, controls, x0)
