"""Adam on ProxProp directions.

ProxProp (004 Algo 2) replaces each layer's gradient by the proximal direction
`(I/tau_theta + A^T A)^{-1} grad`, solved here by 3 conjugate-gradient steps (004 App. B). Like any
oracle, `Oracle.backward` writes these directions into `p.grad`, so `torch.optim.Adam` uses them
unchanged (004 Sec. 5.3). Compared with Adam on backprop gradients, on scikit-learn's digits.

The model is a plain `nn.Module` with its own `forward` and a residual block: `mg.Chain` traces it
with `torch.fx` and cuts it wherever one tensor flows. `Linear` and `relu` calls become stages with
their closed forms; the residual block stays one stage, on which ProxProp's proximal problem is
solved for the linearised block (a Gauss-Newton step, `mg.lstsq`).
"""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F
from torch import nn

import moreaugrad as mg

SIZE = os.environ.get("MOREAUGRAD_EXAMPLE_SIZE", "small")
OUT = Path(os.environ.get("MOREAUGRAD_EXAMPLE_OUT", "examples/output"))
HIDDEN, EPOCHS = {"small": (64, 5), "full": (128, 30)}[SIZE]

data = mg.data.load("digits", seed=0)
x, y = data.x_train, data.y_train


class ResidualMLP(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(64, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.inp(torch.flatten(x, 1)))
        h = h + F.relu(self.mid(h))  # a skip connection: this block is one stage
        return self.out(h)


torch.manual_seed(0)
print("stages:", [s.description for s in mg.Chain(ResidualMLP(HIDDEN)).stages])


def train(rule: mg.rules.Rule) -> list[float]:
    """Training loss after each epoch of Adam (lr 1e-3) on the rule's directions."""
    torch.manual_seed(0)
    model = ResidualMLP(HIDDEN)
    oracle = mg.Oracle(mg.Chain(model), mg.losses.CrossEntropy(), rule)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = torch.Generator().manual_seed(0)
    losses = [float(oracle(x, y).loss)]
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(y), generator=batches).split(64):
            opt.zero_grad()
            oracle.backward(x[idx], y[idx])
            opt.step()
        losses.append(float(oracle(x, y).loss))
    return losses


curves = {
    "Adam": train(mg.rules.backprop()),
    "Adam on ProxProp, tau_theta 1, CG(3)": train(mg.rules.proxprop(tau_theta=1.0)),
}

plt.switch_backend("Agg")
fig, ax = plt.subplots(figsize=(5, 3.5))
for label, losses in curves.items():
    ax.semilogy(losses, marker="o", label=label)
    print(f"{label}: training loss {losses[0]:.3g} -> {losses[-1]:.3g}")
ax.set(xlabel="epoch", ylabel="training loss (cross-entropy)", title=f"digits, residual MLP, width {HIDDEN}")
ax.legend()
fig.tight_layout()
OUT.mkdir(parents=True, exist_ok=True)
fig.savefig(OUT / "adam_proxprop.png", dpi=100)
