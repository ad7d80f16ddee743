"""MorSGD on digits.

Stochastic Moreau gradient descent (000 Sec. 4, Fig. 4): on each mini-batch, `Oracle.step` applies
the Moreau rule's own update `w_t <- w_t^+` (000 Algo 2 and 6), with no `torch.optim` optimizer.
It is compared with SGD on backprop gradients, on scikit-learn's digits with the squared loss. Each
layer `Sequential(Linear, ReLU)` is one stage, the paper's "layer", so its Moreau subproblems go to
the generic solver (the paper's two quasi-Newton steps, 000 App. E.2.1).
"""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn

import moreaugrad as mg

SIZE = os.environ.get("MOREAUGRAD_EXAMPLE_SIZE", "small")
OUT = Path(os.environ.get("MOREAUGRAD_EXAMPLE_OUT", "examples/output"))
HIDDEN, EPOCHS = {"small": (64, 4), "full": (128, 20)}[SIZE]

data = mg.data.load("digits", seed=0)
x, y = data.x_train, data.y_train


def train(rule: mg.rules.Rule, lr: float | None = None) -> list[float]:
    """Training loss after each epoch: `oracle.step` if `lr` is None, else SGD on `oracle.backward`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(),
                          nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU()),      # one stage
                          nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.ReLU()),  # one stage
                          nn.Linear(HIDDEN, 10))
    oracle = mg.Oracle(model, mg.losses.SquaredLoss(), rule)
    opt = None if lr is None else torch.optim.SGD(model.parameters(), lr=lr)
    batches = torch.Generator().manual_seed(0)
    losses = [float(oracle(x, y).loss)]
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(y), generator=batches).split(64):
            if opt is None:
                oracle.step(x[idx], y[idx])
            else:
                opt.zero_grad()
                oracle.backward(x[idx], y[idx])
                opt.step()
        losses.append(float(oracle(x, y).loss))
    return losses


curves = {
    "SGD, lr 0.5": train(mg.rules.backprop(), lr=0.5),
    "MorSGD, gamma 1, alpha 0.5": train(mg.rules.moreau(gamma=1.0, alpha=0.5)),
}

plt.switch_backend("Agg")
fig, ax = plt.subplots(figsize=(5, 3.5))
for label, losses in curves.items():
    ax.semilogy(losses, marker="o", label=label)
    print(f"{label}: training loss {losses[0]:.3g} -> {losses[-1]:.3g}")
ax.set(xlabel="epoch", ylabel="training loss (squared)", title=f"digits, MLP 64-{HIDDEN}-{HIDDEN}-10")
ax.legend()
fig.tight_layout()
OUT.mkdir(parents=True, exist_ok=True)
fig.savefig(OUT / "morsgd_digits.png", dpi=100)
