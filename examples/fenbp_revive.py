"""FenBP revives an all-negative network.

A ReLU MLP whose weights and biases are all negative (002 Sec. 5): on standardised digits the
pre-activations of the second and third hidden layers are negative on every sample, so every ReLU
there is dead, backprop's gradient is zero below the output layer and SGD stalls. Fenchel
back-propagation (002 Sec. 4.2.2) passes finite differences `(sigma(u) - sigma(u - tau g)) / tau`
through the activations instead of derivatives; with `AdaptiveSpacing` the spacing `tau` is chosen
per sample and unit so that the target of a dead unit crosses the kink, and the network trains.
"""

import math
import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn

import moreaugrad as mg

SIZE = os.environ.get("MOREAUGRAD_EXAMPLE_SIZE", "small")
OUT = Path(os.environ.get("MOREAUGRAD_EXAMPLE_OUT", "examples/output"))
EPOCHS = {"small": 20, "full": 40}[SIZE]

data = mg.data.load("digits", seed=0)
x, y = data.x_train.flatten(1), data.y_train


def all_negative_mlp() -> nn.Sequential:
    """64-64-64-64-10, weights `-|Glorot uniform|`, biases `-|U(0, 1/sqrt(fan_in))|`."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64),
                          nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for m in model:
            if isinstance(m, nn.Linear):
                bound = math.sqrt(6.0 / (m.in_features + m.out_features))
                m.weight.copy_(-bound * torch.rand(m.weight.shape, generator=gen))
                m.bias.copy_(-torch.rand(m.bias.shape, generator=gen) / math.sqrt(m.in_features))
    return model


def train(rule: mg.rules.Rule) -> list[float]:
    """Training error after each epoch of SGD (lr 1/8) on the rule's directions."""
    model = all_negative_mlp()
    oracle = mg.Oracle(model, mg.losses.CrossEntropy(), rule)
    opt = torch.optim.SGD(model.parameters(), lr=1 / 8)
    batches = torch.Generator().manual_seed(0)
    errors = [error(model)]
    for _ in range(EPOCHS):
        for idx in torch.randperm(len(y), generator=batches).split(64):
            opt.zero_grad()
            oracle.backward(x[idx], y[idx])
            opt.step()
        errors.append(error(model))
    return errors


@torch.no_grad()
def error(model: nn.Module) -> float:
    return (model(x).argmax(1) != y).float().mean().item()


curves = {
    "backprop": train(mg.rules.backprop()),
    "FenBP, AdaptiveSpacing()": train(mg.rules.fenchel(mg.rules.AdaptiveSpacing())),
}

plt.switch_backend("Agg")
fig, ax = plt.subplots(figsize=(5, 3.5))
for label, errors in curves.items():
    ax.plot(errors, marker="o", label=label)
    print(f"{label}: training error {errors[0]:.2f} -> {errors[-1]:.2f}")
ax.set(xlabel="epoch", ylabel="training error", ylim=(0, 1), title="digits, all-negative ReLU MLP")
ax.legend()
fig.tight_layout()
OUT.mkdir(parents=True, exist_ok=True)
fig.savefig(OUT / "fenbp_revive.png", dpi=100)
