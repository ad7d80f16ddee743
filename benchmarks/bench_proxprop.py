"""ProxProp cost relative to back-propagation on 004's MLP (issue: target and proximal oracles).

The 004 Sec. 5.1 network 3072-4000-1000-4000-10 with ReLU, cross-entropy, batch 500 of random data.
Times forward + oracle per step, round-robin, and prints each over plain ``loss.backward()``:
the backprop oracle, ProxProp with 3 CG steps (cg3), and exact ProxProp (004 eq. 44).
Uses only the public API.

    python benchmarks/bench_proxprop.py [--repeats 5] [--batch 500]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import moreaugrad as mg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=500)
    ap.add_argument("--widths", type=int, nargs="+", default=[3072, 4000, 1000, 4000, 10])
    args = ap.parse_args()
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(args.widths, args.widths[1:], strict=False)):
        layers.append(nn.Linear(a, b))
        if i < len(args.widths) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    x = torch.randn(args.batch, args.widths[0])
    y = torch.randint(0, args.widths[-1], (args.batch,))
    h = mg.losses.CrossEntropy()

    def plain():
        model.zero_grad(set_to_none=True)
        h(model(x), y).backward()

    def oracle(rule):
        o = mg.Oracle(model, h, rule)

        def f():
            model.zero_grad(set_to_none=True)
            o.backward(x, y)
        return f

    fns = {
        "plain loss.backward()": plain,
        "backprop oracle": oracle(mg.rules.backprop()),
        "ProxProp cg3": oracle(mg.rules.proxprop(tau_theta=1.0, tau=1.0, method=mg.lstsq.CG(3))),
        "ProxProp exact": oracle(mg.rules.proxprop(tau_theta=0.05, tau=1.0, method=mg.lstsq.Exact())),
    }
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["plain loss.backward()"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, MLP {args.widths}, "
          f"batch {args.batch}, median of {args.repeats}")
    for k, t in med.items():
        print(f"{k:<24} {1e3 * t:9.1f} ms  {t / base:5.2f}x")


if __name__ == "__main__":
    main()
