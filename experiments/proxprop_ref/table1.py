"""004 Table 1 with a replica of the authors' ProxProp iteration (their ``prox_cgN``), not ours.

The authors' code (tfrerix/proxprop, ``ProxProp.py``) differs from the CG that 004 App. B states in two
ways, and this script reproduces both, outside the library (which never carries the bug):

- for a ``Linear`` layer it solves ``argmin_X 1/2 ||A X - Y||^2 + beta/2 ||X - Z||^2`` with
  ``A = [input, 1]``, ``X = [W^T; b]``, ``beta = 1/tau_theta``, ``Y = z - dL/dz``, by one CG per output
  unit (the columns of ``X``), each with its own step sizes (``conjugate_gradient_block``), started at
  the current weights ``Z``, stopped after N steps or when the largest column residual falls below
  ``1e-2`` of the mean initial one, with ``1e-6`` added to the denominators;
- it sets ``P = R`` and then updates ``R`` in place (``R -= AP * alpha``), so ``P`` changes with ``R``:
  the second step is a steepest-descent step, not a conjugate one. ``--variants fixed`` runs the same
  iteration with ``P = R.clone()``.

Everything else follows ``moreaugrad run 004_table1``: the same data (MNIST-1D through ``mg.data``), the
same initial weights and batch order (the runner's seeds), the MLP 40-256-128-256-10 with an explicit
last layer (004 eq. 12), Nesterov momentum 0.95, batch 100, cross-entropy; the optimizer's step ``tau``
multiplies ``W - W_new`` which the layer writes into ``.grad``, as in the authors' code. Results go to
``--out`` in the runner's format, so ``summary.md`` carries the table and the config's verdict.

    python experiments/proxprop_ref/table1.py --out runs/004_table1_reference --epochs 6
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import moreaugrad as mg
from moreaugrad.runner import config as rconfig
from moreaugrad.runner import engine, models, report, seeds, store

TAUS = [50.0, 10.0, 5.0, 1.0, 0.5, 0.1, 0.05, 5e-3, 5e-4]
PANEL = "mnist1d"   # the runner's panel name: the same seeds give the same weights and batches


def block_cg(apply_a: Any, b: Tensor, x0: Tensor, maxit: int, alias: bool, tol: float = 1e-2,
             eps: float = 1e-6) -> tuple[Tensor, int]:
    """The authors' ``conjugate_gradient_block``: one CG per column of ``b``, as they wrote it
    (``alias=True``: ``P = R``, so the in-place residual update also overwrites ``P``) or corrected
    (``alias=False``: ``P = R.clone()``)."""
    x = x0.clone()
    r = b - apply_a(x)
    p = r if alias else r.clone()
    rs_old = (r * r).sum(0)
    tol_scale = rs_old.mean()
    k = 0
    while True:
        k += 1
        ap = apply_a(p)
        alpha = rs_old / ((p * ap).sum(0) + eps)
        x += p * alpha
        if k == maxit:
            break
        r -= ap * alpha
        rs_new = (r * r).sum(0)
        if rs_new.max() < tol ** 2 * tol_scale:
            break
        p = r + p * (rs_new / (rs_old + eps))
        rs_old = rs_new
    return x, k


class _ProxLinear(torch.autograd.Function):
    """Forward: ``input W^T + b``. Backward: the explicit step ``Y = z - dL/dz``, the proximal step on
    ``[W^T; b]`` by :func:`block_cg`, ``.grad = W - W_new``, and ``dL/dinput`` by the chain rule."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, layer: ReferenceLinear) -> Tensor:
        out = x @ weight.t() + bias
        ctx.save_for_backward(x, weight, bias, out)
        ctx.layer = layer
        return out

    @staticmethod
    def backward(ctx: Any, grad_z: Tensor) -> tuple[Tensor, Tensor, Tensor, None]:
        x, weight, bias, out = ctx.saved_tensors
        layer = ctx.layer
        a = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype, device=x.device)], dim=1)
        y = out - grad_z
        z = torch.cat([weight.t(), bias[None]], dim=0)
        beta = 1.0 / layer.tau_theta

        def apply_a(v: Tensor) -> Tensor:
            return a.t() @ (a @ v) + beta * v

        new, _ = block_cg(apply_a, a.t() @ y + beta * z, z, layer.steps, layer.alias)
        w_new, b_new = new[:-1].t(), new[-1]
        return grad_z @ weight, weight - w_new, bias - b_new, None


class ReferenceLinear(nn.Linear):
    """``nn.Linear`` whose backward writes the authors' ProxProp update into ``.grad``."""

    def __init__(self, linear: nn.Linear, steps: int, alias: bool, tau_theta: float = 1.0):
        super().__init__(linear.in_features, linear.out_features, dtype=linear.weight.dtype)
        self.load_state_dict(linear.state_dict())
        self.steps, self.alias, self.tau_theta = steps, alias, tau_theta

    def forward(self, x: Tensor) -> Tensor:
        return _ProxLinear.apply(x, self.weight, self.bias, self)


def reference_mlp(net: nn.Sequential, steps: int, alias: bool) -> nn.Sequential:
    """The runner's MLP with every hidden Linear a :class:`ReferenceLinear`; the last stays explicit."""
    mods = list(net)
    last = max(i for i, m in enumerate(mods) if isinstance(m, nn.Linear))
    return nn.Sequential(*[ReferenceLinear(m, steps, alias) if isinstance(m, nn.Linear) and i != last else m
                           for i, m in enumerate(mods)])


def evaluate(net: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    with torch.no_grad():
        out = net(x)
        return float(nn.functional.cross_entropy(out, y)), float((out.argmax(1) == y).float().mean())


def train(seed: int, steps: int, alias: bool, tau: float, args: argparse.Namespace,
          data: Any) -> dict[str, Any]:
    torch.manual_seed(rconfig.seed_for(seed, "init", PANEL))
    net, _ = models.build({"kind": "mlp", "hidden": args.hidden}, data.input_shape, data.classes)
    net = reference_mlp(net, steps, alias)
    gen = torch.Generator().manual_seed(rconfig.seed_for(seed, "batches", PANEL))
    opt = torch.optim.SGD(net.parameters(), lr=tau, momentum=0.95, nesterov=True)
    xs = {k: v.reshape(len(v), -1) for k, v in (("train", data.x_train), ("val", data.x_val),
                                                 ("test", data.x_test))}
    ys = {"train": data.y_train, "val": data.y_val, "test": data.y_test}

    def measure() -> dict[str, float]:
        vals = {}
        for split in ("train", "val", "test"):
            lo, acc = evaluate(net, xs[split], ys[split])
            vals["loss" if split == "train" else f"{split}_loss"] = lo
            vals[f"{split}_accuracy"] = acc
        return vals

    curves = {k: [v] for k, v in measure().items()}
    elapsed, t0, error, updates = [0.0], time.perf_counter(), None, 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(ys["train"]), generator=gen)
        for idx in perm.split(args.batch_size):
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(net(xs["train"][idx]), ys["train"][idx]).backward()
            opt.step()
            updates += 1
        vals = measure()
        if not all(math.isfinite(v) for v in vals.values()):
            error = f"epoch {epoch + 1}: loss {vals['loss']}"
            break
        for k, v in vals.items():
            curves[k].append(v)
        elapsed.append(time.perf_counter() - t0)
    return {"curves": curves, "elapsed": elapsed, "error": error, "updates": updates}


def run_seed(seed: int, args: argparse.Namespace, cfg: dict[str, Any]) -> dict[str, Any]:
    data = mg.data.load("mnist1d", None, seed=seed, dtype=torch.float32, **args.dataset)
    jobs = []
    t_all = time.perf_counter()
    for method, spec in cfg["methods"].items():
        for i, tau in enumerate(spec["lr"]):
            t0 = time.perf_counter()
            out = train(seed, spec["cg"], spec["alias"], tau, args, data)
            curves = out["curves"]
            best = {k: engine.best_so_far(k, v) for k, v in curves.items()}
            diverged = out["error"] is not None
            jobs.append({"id": f"{PANEL}.{method}.{i:03d}", "panel": PANEL, "method": method,
                         "label": f"{spec['label']} (lr={rconfig.fmt_value(tau)})", "params": {"lr": tau},
                         "spec": {**spec, "lr": tau}, "diverged": diverged, "error": out["error"],
                         "x": list(range(len(curves["loss"]))), "curves": curves, "best": best,
                         "final": {k: v[-1] for k, v in curves.items()},
                         "score": None if diverged else curves["loss"][-1], "updates": out["updates"],
                         "timings": {"wall_s": time.perf_counter() - t0, "elapsed_s": out["elapsed"]},
                         "data_sizes": data.sizes()})
            print(f"seed {seed} {spec['label']} tau={tau:g}: "
                  + ("diverged" if diverged else f"loss {curves['loss'][-1]:.4g}"), flush=True)
    results = {"format": 1, "status": "complete",
               "experiment": {"name": cfg["name"], "title": cfg["title"], "paper": cfg.get("paper", ""),
                              "claim": cfg.get("claim", ""), "source": args.config},
               "scale": args.scale, "seed": seed, "device": "cpu", "versions": engine.versions(),
               "config": cfg, "select": {"by": "final", "metric": "loss"},
               "panels": {PANEL: {"title": f"MNIST-1D, MLP {tuple(args.hidden)}", "kind": "train",
                                  "methods": list(cfg["methods"]), "skipped": None}},
               "jobs": jobs}
    results["selected"] = seeds.select(results)
    results["timings"] = {"wall_s": time.perf_counter() - t_all, "finished": engine._now(),
                          "jobs_s": {r["id"]: r["timings"]["wall_s"] for r in jobs}}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(Path(__file__).resolve().parents[1]
                                                / "004_table1_reference.toml"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/004_table1_reference"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--variants", default="alias,fixed", help="alias (as the authors wrote it), fixed")
    parser.add_argument("--steps", default="1,3,5", help="CG steps N of prox_cgN")
    parser.add_argument("--fixed-steps", default="3", help="CG steps run with the corrected iteration")
    parser.add_argument("--taus", default=",".join(f"{t:g}" for t in TAUS))
    parser.add_argument("--smoke", action="store_true", help="1 epoch on 128 samples, two taus")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.hidden = [256, 128, 256]
    args.dataset = {}
    args.scale = "default"
    taus = [float(t) for t in args.taus.split(",")]
    if args.smoke:
        args.epochs, args.batch_size, args.hidden = 1, 64, [16, 16]
        args.dataset = {"train_size": 128, "test_size": 64, "num_samples": 400}
        args.scale, taus = "smoke", [50.0, 0.05]
    raw = rconfig.read(args.config)
    cfg = {k: raw[k] for k in ("name", "title", "paper", "claim", "notes") if k in raw}
    cfg.update({"table": "grid", "table_axis": "lr", "table_metric": "loss", "plots": ["loss"],
                "select": "final", "verdict": raw.get("verdict", {}), "methods": {}})
    variants = args.variants.split(",")
    fixed = [int(s) for s in args.fixed_steps.split(",")]
    for steps in (int(s) for s in args.steps.split(",")):
        for v in variants:
            if v == "fixed" and steps not in fixed:
                continue
            what = "as written, P = R" if v == "alias" else "P = R.clone()"
            cfg["methods"][f"ref_cg{steps}_{v}"] = {"label": f"reference cg{steps} ({what})",
                                                    "rule": "proxprop", "cg": steps, "alias": v == "alias",
                                                    "lr": taus}
    ids = seeds.seed_list(args.seed, args.seeds)
    per_seed = []
    for s in ids:
        res = run_seed(s, args, cfg)
        if len(ids) > 1:
            store.write_json(args.out / seeds.SEED_DIR.format(seed=s) / "results.json", res)
        per_seed.append(res)
    results = per_seed[0] if len(ids) == 1 else seeds.aggregate(per_seed, ids, [seeds.SEED_DIR.format(seed=s)
                                                                                  for s in ids])
    store.write_json(args.out / "results.json", results)
    report.write(store.read_json(args.out / "results.json"), args.out)
    print(report.console(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
