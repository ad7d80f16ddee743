"""Moreau oracle cost relative to plain back-propagation (issue: moreau benchmark).

For each case it times, in one run and interleaved, the median wall time of
  * plain PyTorch: forward + ``loss.backward()``;
  * moreaugrad's ``backprop`` oracle: ``Oracle.backward``;
  * the ``moreau`` oracle (and, for grouped layers, with 2 quasi-Newton steps, 000 App. E.2.1);
and prints each time over the plain-backprop time. Uses only the public API.

    python benchmarks/bench_moreau.py [--repeats 30] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import moreaugrad as mg


def median_times(fns: dict, repeats: int, warmup: int = 5) -> dict:
    """Median wall time of each function, timed round-robin so that drifts hit all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def ratios(prefix: str, fns: dict, repeats: int) -> list[tuple[str, float, float]]:
    """(label, ms, time over the first entry's time)."""
    med = median_times(fns, repeats)
    base = next(iter(med.values()))
    return [(f"{prefix}: {k}", 1e3 * t, t / base) for k, t in med.items()]


def mlp(grouped: bool) -> nn.Sequential:
    sizes = [784, 256, 256, 10]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:], strict=False)):
        last = i == len(sizes) - 2
        if grouped and not last:
            layers.append(nn.Sequential(nn.Linear(a, b), nn.ReLU()))
        else:
            layers += [nn.Linear(a, b)] + ([] if last else [nn.ReLU()])
    return nn.Sequential(*layers)


def network_case(name: str, grouped: bool, repeats: int) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    model = mlp(grouped)
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256,))
    h = mg.losses.CrossEntropy()

    def plain():
        model.zero_grad(set_to_none=True)
        h(model(x), y).backward()

    oracles = {"backprop oracle": mg.Oracle(model, h, mg.rules.backprop()),
               "moreau oracle": mg.Oracle(model, h, mg.rules.moreau(gamma=1.0, alpha=2.0))}

    def run(o):
        def f():
            model.zero_grad(set_to_none=True)
            o.backward(x, y)
        return f

    return ratios(name, {"plain loss.backward()": plain, **{k: run(o) for k, o in oracles.items()}},
                  repeats)


def pendulum_case(repeats: int) -> list[tuple[str, float, float]]:
    p = mg.control.Pendulum(horizon=100)
    chain = p.chain()

    def plain():
        chain.zero_grad(set_to_none=True)
        p.objective(chain()).backward()

    def run(rule):
        o = mg.Oracle(chain, p.objective, rule)

        def f():
            chain.zero_grad(set_to_none=True)
            o.backward()
        return f

    return ratios("pendulum T=100", {
        "plain loss.backward()": plain,
        "backprop oracle": run(mg.rules.backprop()),
        "moreau oracle (QN 2 steps)": run(mg.rules.moreau(gamma=0.5, alpha=128.0)),
    }, repeats)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats}")
    rows = (network_case("MLP 784-256-256-10 B=256, Linear and ReLU stages", False, args.repeats)
            + network_case("MLP 784-256-256-10 B=256, grouped layers", True, args.repeats)
            + pendulum_case(max(5, args.repeats // 3)))
    width = max(len(r[0]) for r in rows)
    for label, ms, ratio in rows:
        print(f"{label:<{width}}  {ms:8.2f} ms  {ratio:6.2f}x")


if __name__ == "__main__":
    main()
