"""Train a small MLP on scikit-learn's digits with the backprop oracle (the ``make demo`` job).

Uses only the public API: ``mg.Chain``, ``mg.Oracle``, ``mg.losses.CrossEntropy`` and
``mg.rules.backprop``, with a plain ``torch.optim.SGD`` loop. The data ship with scikit-learn, so
nothing is downloaded. Prints one line per epoch; writes nothing to disk.

    python experiments/demo_digits.py --epochs 15 --seed 0
"""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import Tensor, nn
from tqdm import tqdm

import moreaugrad as mg


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="passes over the training set")
    parser.add_argument("--seed", type=int, default=0, help="seed for the split, init and batch order")
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate")
    parser.add_argument("--batch-size", type=int, default=64, help="mini-batch size")
    args = parser.parse_args()
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.batch_size < 1:
        parser.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.lr > 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    return args


def load_data(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Digits (1797 images of 8x8, 10 classes), split 80/20, standardised with train statistics."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.2, random_state=seed, stratify=digits.target
    )
    scaler = StandardScaler().fit(x_train)
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    return (
        torch.as_tensor(x_train, dtype=torch.float32),
        torch.as_tensor(x_test, dtype=torch.float32),
        torch.as_tensor(y_train, dtype=torch.long),
        torch.as_tensor(y_test, dtype=torch.long),
    )


@torch.no_grad()
def accuracy(chain: mg.Chain, x: Tensor, y: Tensor) -> float:
    return (chain(x).argmax(dim=1) == y).float().mean().item()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    x_train, x_test, y_train, y_test = load_data(args.seed)

    # Linear and ReLU as separate children: each is its own stage of the chain.
    chain = mg.Chain(nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(),
        nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, 10),
    ))
    oracle = mg.Oracle(chain, mg.losses.CrossEntropy(), mg.rules.backprop())
    opt = torch.optim.SGD(chain.parameters(), lr=args.lr, momentum=0.9)
    order = torch.Generator().manual_seed(args.seed)

    print(f"digits: {len(y_train)} train / {len(y_test)} test, {len(chain)} stages, "
          f"lr={args.lr}, batch={args.batch_size}, seed={args.seed}")
    start = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        perm = torch.randperm(len(y_train), generator=order)
        losses = []
        batches = perm.split(args.batch_size)
        for idx in tqdm(batches, desc=f"epoch {epoch}", leave=False):
            opt.zero_grad()
            result = oracle.backward(x_train[idx], y_train[idx])
            opt.step()
            losses.append(result.loss.item())
        train_loss = sum(losses) / len(losses)
        print(f"epoch {epoch:3d}  train loss {train_loss:.4f}  "
              f"train acc {accuracy(chain, x_train, y_train):.4f}  "
              f"test acc {accuracy(chain, x_test, y_test):.4f}")
    print(f"done in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
