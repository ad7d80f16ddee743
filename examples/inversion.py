"""Network inversion.

Invert a trained network (000 App. F.1): change the input, not the weights, until the network
answers a chosen class. The input requires grad and the weights do not, so `Oracle.backward` writes
only `x.grad`: `lambda_0` for dual rules (backprop: the input gradient) and the move `x_0 - x_0^+`
for target rules, so that a step of 1 lands on the input target. Gradient descent on the input
(step 0.1 as in 000 App. F.1, whose VGG diverged at larger steps; this small MLP also takes
step 1) is compared with the augmented-Lagrangian sweep (000 Algo 7-9, with
the paper's `gamma = 1e2`, `beta = 1e-2`, `kappa = 1e-6`), which back-propagates approximate
inverses of the layers.
"""

import os
from pathlib import Path

import matplotlib.pyplot as plt
import torch
from torch import nn

import moreaugrad as mg

SIZE = os.environ.get("MOREAUGRAD_EXAMPLE_SIZE", "small")
OUT = Path(os.environ.get("MOREAUGRAD_EXAMPLE_OUT", "examples/output"))
IMAGES, ITERATIONS = {"small": (8, 20), "full": (64, 100)}[SIZE]
SOURCE, TARGET = 3, 8

data = mg.data.load("digits", seed=0)
x, y = data.x_train, data.y_train

# A network to invert: a small MLP trained by Adam, then frozen.
torch.manual_seed(0)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                      nn.Linear(64, 10))
oracle = mg.Oracle(model, mg.losses.CrossEntropy())
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(10):
    for idx in torch.randperm(len(y)).split(64):
        opt.zero_grad()
        oracle.backward(x[idx], y[idx])
        opt.step()
model.requires_grad_(False)

images = x[y == SOURCE][:IMAGES]
target = torch.full((len(images),), TARGET)


def invert(rule: mg.rules.Rule, lr: float) -> tuple[list[float], torch.Tensor]:
    """Loss of the target class along `ITERATIONS` steps on the input, and the final input."""
    z = images.clone().requires_grad_(True)
    oracle = mg.Oracle(model, mg.losses.CrossEntropy(), rule)
    opt = torch.optim.SGD([z], lr=lr)
    losses = []
    for _ in range(ITERATIONS):
        opt.zero_grad()
        losses.append(float(oracle.backward(z, target).loss))  # fills z.grad only
        opt.step()
    return losses + [float(oracle(z, target).loss)], z.detach()


runs = {
    "GD, step 0.1": invert(mg.rules.backprop(), lr=0.1),
    "GD, step 1": invert(mg.rules.backprop(), lr=1.0),
    "AL, step 1": invert(mg.rules.augmented_lagrangian(kappa=1e-6, beta=1e-2, gamma=1e2), lr=1.0),
}

plt.switch_backend("Agg")
fig, axes = plt.subplots(1, 5, figsize=(11, 2.8), gridspec_kw={"width_ratios": [2.4, 1, 1, 1, 1]})
for label, (losses, _) in runs.items():
    axes[0].semilogy(losses, label=label)
    print(f"{label}: loss of class {TARGET} {losses[0]:.3g} -> {losses[-1]:.3g}")
axes[0].set(xlabel="iteration", ylabel=f"cross-entropy to class {TARGET}")
axes[0].legend(fontsize=7)
shown = [("input", images[0])] + [(label, z[0]) for label, (_, z) in runs.items()]
for ax, (title, image) in zip(axes[1:], shown, strict=True):
    ax.imshow(image.reshape(8, 8), cmap="gray")
    ax.set_title(f"{title}\nclass {model(image[None]).argmax().item()}", fontsize=8)
    ax.axis("off")
fig.tight_layout()
OUT.mkdir(parents=True, exist_ok=True)
fig.savefig(OUT / "inversion.png", dpi=100)
