"""Data-parallel MorSGD on digits: `torchrun --nproc-per-node 2 examples/torchrun_digits.py`.

Each rank holds the model and its share of each global mini-batch (`mg.distributed.batches`); with
`mode="exact"`, `Oracle.step` is the Moreau step of the global batch on every rank: any number of
processes gives the one-process run, up to rounding (plain `python` runs a group of one).
"""

import os
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import torch
import torch.distributed as dist
from torch import nn

import moreaugrad as mg
from moreaugrad import distributed as mgd

SIZE = os.environ.get("MOREAUGRAD_EXAMPLE_SIZE", "small")
OUT = Path(os.environ.get("MOREAUGRAD_EXAMPLE_OUT", "examples/output"))
HIDDEN, EPOCHS = {"small": (64, 3), "full": (128, 20)}[SIZE]

if "RANK" in os.environ:  # torchrun set the rank, the world size and the rendezvous
    dist.init_process_group("gloo")
else:
    dist.init_process_group("gloo", init_method=f"file://{tempfile.mkdtemp()}/init", rank=0, world_size=1)
rank, world = dist.get_rank(), dist.get_world_size()

data = mg.data.load("digits", seed=0)
x, y = data.x_train, data.y_train
torch.manual_seed(0)  # the same initial weights on every rank (checked by the oracle's fingerprint)
model = nn.Sequential(nn.Flatten(), nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(),
                      nn.Linear(HIDDEN, 10))  # Linear and ReLU as separate stages: separable over samples
h = mg.losses.SquaredLoss()
oracle = mgd.Oracle(model, h, mg.rules.moreau(gamma=1.0, alpha=0.5), mode="exact")


def loss() -> float:
    with torch.no_grad():
        return float(h(model(x), y))


losses = [loss()]
for epoch in range(EPOCHS):
    for idx in mgd.batches(len(y), 64, seed=0, epoch=epoch):
        oracle.step(x[idx], y[idx])
    losses.append(loss())

if rank == 0:
    print(f"{world} process(es): training loss {losses[0]:.4g} -> {losses[-1]:.4g}")
    plt.switch_backend("Agg")
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(losses, marker="o", label=f"MorSGD, exact, {world} process(es)")
    ax.set(xlabel="epoch", ylabel="training loss (squared)", title=f"digits, MLP 64-{HIDDEN}-{HIDDEN}-10")
    ax.legend()
    OUT.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT / "torchrun_digits.png", dpi=120, bbox_inches="tight")
dist.destroy_process_group()
