"""Pendulum: MorGD against GD.

Swing a pendulum up from rest (000 Sec. 4, App. E.1.1). The chain is the dynamics, one torque per
time step, and the parameters are the torques. Gradient descent (`Oracle.step` with
`mg.rules.backprop(step)`) is compared with Moreau gradient descent (`Oracle.step` with
`mg.rules.moreau(gamma, alpha)`, 000 eq. 52), each at its best step from a small grid (the full
size; the small size runs the two winners). Horizon 50, explicit Euler as 000 App. E.1.1 prints it:
at horizon 100 it amplifies the state so much that every gradient step from 0.01 to 0.5 diverges.
"""

import math
import os
import warnings
from pathlib import Path

import matplotlib.pyplot as plt

import moreaugrad as mg

SIZE = os.environ.get("MOREAUGRAD_EXAMPLE_SIZE", "small")
OUT = Path(os.environ.get("MOREAUGRAD_EXAMPLE_OUT", "examples/output"))
# small: one step each, the best of the full grid; full: the grids and more iterations
warnings.simplefilter("ignore", mg.DivergenceWarning)  # the full grids include steps that diverge
HORIZON, ITERATIONS, GD_STEPS, ALPHAS = {
    "small": (50, 40, [0.5], [512.0]),
    "full": (50, 100, [0.25, 0.5, 1.0], [32.0, 128.0, 512.0]),
}[SIZE]


def run(rule: mg.rules.Rule) -> list[float]:
    """Losses along `ITERATIONS` calls of the rule's own update on a fresh pendulum."""
    p = mg.control.Pendulum(horizon=HORIZON)
    oracle = mg.Oracle(p.chain(), p.objective, rule)
    losses = []
    try:
        for _ in range(ITERATIONS):
            losses.append(float(oracle.step().loss))
        losses.append(float(oracle().loss))
    except mg.NonFiniteError:  # this step diverged
        losses.append(math.inf)
    return losses


def best(curves: dict[str, list[float]]) -> tuple[str, list[float]]:
    """The setting whose last loss is lowest."""
    return min(curves.items(), key=lambda kv: kv[1][-1])


gd = best({f"GD, step {s}": run(mg.rules.backprop(step=s)) for s in GD_STEPS})
morgd = best({f"MorGD, gamma 0.5, alpha {a}": run(mg.rules.moreau(gamma=0.5, alpha=a)) for a in ALPHAS})

plt.switch_backend("Agg")
fig, ax = plt.subplots(figsize=(5, 3.5))
for label, losses in (gd, morgd):
    ax.semilogy(losses, label=label)
    print(f"{label}: loss {losses[0]:.3g} -> {losses[-1]:.3g}")
ax.set(xlabel="iteration", ylabel="h(x_T)", title=f"pendulum, horizon {HORIZON}")
ax.legend()
fig.tight_layout()
OUT.mkdir(parents=True, exist_ok=True)
fig.savefig(OUT / "pendulum.png", dpi=100)
