"""002 Fig. 1: backprop against Fenchel back-propagation on an MLP with three hidden layers of 64.

The setup of 002 Sec. 5: SGD with batch 64 and learning rate 1/8, Glorot-uniform weights (zero
biases), cross-entropy. For ReLU and for the hard sigmoid ``clip(u, 0, 1)`` it trains with backprop,
with FenBP at several fixed spacings ``tau`` (per-sample units, ``mg.rules.fenchel(tau)``) and with
FenBP with adaptive spacing (``mg.rules.AdaptiveSpacing()``), and records training and test error per
epoch. A third panel starts from the all-negative initialisation
(weights ``-|Glorot|``, biases ``-|U(0, 1/sqrt(fan_in))|``), on which backprop cannot move the ReLU
network, and trains it with backprop and with FenBP with adaptive spacing
(``mg.rules.AdaptiveSpacing``).

Datasets: scikit-learn's digits (standardised, 80/20 stratified split), MNIST-1D generated locally by
``mnist1d.data.make_dataset`` (4000/1000; nothing is downloaded), and MNIST when its IDX files
(``train-images-idx3-ubyte`` etc., optionally ``.gz``) are in ``--data-dir`` (pixels scaled to [0, 1]).
Writes ``results.json``, ``summary.md`` (a verdict on the claim, :func:`verdict`) and one
``<dataset>.png`` per dataset into ``--out``; ``--seeds N`` runs N seeds and reports mean +- spread.

    python experiments/fenchel/fig1.py --epochs 40 --datasets digits,mnist1d --out runs/fenchel-fig1
    python experiments/fenchel/fig1.py --smoke
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

import moreaugrad as mg
from moreaugrad.runner.seeds import mean_std, outside_spread

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

DATASETS = ("digits", "mnist1d", "mnist")
MNIST_FILES = {"x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
               "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte"}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="seed for the initialisation and batch order")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run seeds --seed .. --seed + N - 1; tables give mean +- spread, plots shade it")
    parser.add_argument("--out", type=Path, default=Path("runs/fenchel-fig1"), help="output folder")
    parser.add_argument("--epochs", type=int, default=40, help="passes over the training set")
    parser.add_argument("--datasets", default="digits,mnist1d,mnist",
                        help=f"comma-separated subset of {','.join(DATASETS)} (mnist: if its files exist)")
    parser.add_argument("--data-dir", type=Path, default=Path("data/mnist"),
                        help="folder of the MNIST IDX files")
    parser.add_argument("--taus", default="0.05,0.25,1,4", help="comma-separated fixed spacings for FenBP")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (small layers: 1 is fastest)")
    parser.add_argument("--smoke", action="store_true", help="2 epochs on 512 training samples, one tau")
    parser.add_argument("--scale", default=None, choices=["smoke", "default", "full"],
                        help="the scale recorded in results.json (default: smoke with --smoke, else default)")
    args = parser.parse_args()
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = sorted(set(args.datasets) - set(DATASETS))
    if unknown:
        parser.error(f"--datasets: unknown {unknown}; choose from {list(DATASETS)}")
    try:
        args.taus = [float(t) for t in args.taus.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--taus must be comma-separated numbers, got {args.taus!r}")
    if not args.taus or not all(t > 0 and math.isfinite(t) for t in args.taus):
        parser.error(f"--taus must be finite numbers > 0, got {args.taus}")
    if args.epochs < 1:
        parser.error(f"--epochs must be >= 1, got {args.epochs}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.seeds < 1:
        parser.error(f"--seeds must be >= 1, got {args.seeds}")
    if args.smoke:
        args.epochs, args.taus = min(args.epochs, 2), args.taus[:1]
    return args


# -- data -------------------------------------------------------------------------------------------


@dataclass
class Data:
    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_digits_data(seed: int) -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    digits = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(digits.data, digits.target, test_size=0.2, random_state=seed,
                                              stratify=digits.target)
    scaler = StandardScaler().fit(x_tr)
    return _tensors("digits", scaler.transform(x_tr), y_tr, scaler.transform(x_te), y_te)


def load_mnist1d_data() -> Data:
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset generates the data from templates; get_dataset would try to download a pickle.
    data = make_dataset(get_dataset_args())
    return _tensors("mnist1d", data["x"], data["y"], data["x_test"], data["y_test"])


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    zero, dtype, ndim = raw[0] << 8 | raw[1], raw[2], raw[3]
    if zero != 0 or dtype != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (magic {raw[:4].hex()})")
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_mnist_data(folder: Path) -> Data | None:
    """MNIST from IDX files in ``folder`` (``name`` or ``name.gz``), or None when a file is missing."""
    found = {}
    for key, name in MNIST_FILES.items():
        path = next((p for p in (folder / name, folder / f"{name}.gz") if p.exists()), None)
        if path is None:
            return None
        found[key] = _read_idx(path)
    flat = {k: v.reshape(len(v), -1) / 255.0 if k.startswith("x") else v for k, v in found.items()}
    return _tensors("mnist", flat["x_train"], flat["y_train"], flat["x_test"], flat["y_test"])


def _tensors(name: str, x_tr: Any, y_tr: Any, x_te: Any, y_te: Any) -> Data:
    f32, i64 = torch.float32, torch.long
    return Data(name, torch.as_tensor(np.asarray(x_tr), dtype=f32),
                torch.as_tensor(np.asarray(y_tr), dtype=i64),
                torch.as_tensor(np.asarray(x_te), dtype=f32), torch.as_tensor(np.asarray(y_te), dtype=i64))


# -- models and runs --------------------------------------------------------------------------------


ACTIVATIONS = {"relu": nn.ReLU, "hard_sigmoid": lambda: nn.Hardtanh(0.0, 1.0)}


def make_mlp(inputs: int, classes: int, activation: str, init: str, seed: int) -> nn.Sequential:
    """``inputs-64-64-64-classes``, Linear and activation as separate stages (FenBP needs them apart)."""
    act = ACTIVATIONS[activation]
    sizes = [inputs, 64, 64, 64, classes]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in layers:
            if isinstance(m, nn.Linear):
                bound = math.sqrt(6.0 / (m.in_features + m.out_features))  # Glorot uniform
                w = (2 * torch.rand(m.weight.shape, generator=gen) - 1) * bound
                if init == "negative":
                    m.weight.copy_(-w.abs())
                    m.bias.copy_(-torch.rand(m.bias.shape, generator=gen) / math.sqrt(m.in_features))
                else:
                    m.weight.copy_(w)
                    m.bias.zero_()
    return nn.Sequential(*layers)


@torch.no_grad()
def error(chain: mg.Chain, x: Tensor, y: Tensor) -> float:
    pairs = zip(x.split(4096), y.split(4096), strict=True)
    wrong = sum(int((chain(xb).argmax(1) != yb).sum()) for xb, yb in pairs)
    return wrong / len(y)


def train(data: Data, activation: str, init: str, rule: Any, epochs: int, seed: int,
          desc: str) -> dict[str, Any]:
    chain = mg.Chain(make_mlp(data.x_train.shape[1], int(data.y_train.max()) + 1, activation, init, seed))
    oracle = mg.Oracle(chain, mg.losses.CrossEntropy(), rule)
    opt = torch.optim.SGD(chain.parameters(), lr=1 / 8)
    order = torch.Generator().manual_seed(seed)
    train_err = [error(chain, data.x_train, data.y_train)]
    test_err, loss = [error(chain, data.x_test, data.y_test)], []
    start = time.perf_counter()
    for _ in tqdm(range(epochs), desc=desc, leave=False):
        total = 0.0
        batches = torch.randperm(len(data.y_train), generator=order).split(64)
        for idx in batches:
            opt.zero_grad()
            total += oracle.backward(data.x_train[idx], data.y_train[idx]).loss.item()
            opt.step()
        loss.append(total / len(batches))
        train_err.append(error(chain, data.x_train, data.y_train))
        test_err.append(error(chain, data.x_test, data.y_test))
    return {"train_error": train_err, "test_error": test_err, "train_loss": loss,
            "seconds": time.perf_counter() - start}


def configurations(taus: list[float]) -> list[dict[str, Any]]:
    """``(panel, label, activation, init, rule)`` of every run of one dataset."""
    runs = []
    adaptive = mg.rules.AdaptiveSpacing()
    for act in ACTIVATIONS:
        runs.append({"panel": act, "label": "BP", "activation": act, "init": "glorot", "tau": None,
                     "rule": mg.rules.backprop()})
        for tau in taus:
            runs.append({"panel": act, "label": f"FenBP tau={tau:g}", "activation": act, "init": "glorot",
                         "tau": tau, "rule": mg.rules.fenchel(tau)})
        runs.append({"panel": act, "label": "FenBP adaptive", "activation": act, "init": "glorot",
                     "tau": repr(adaptive), "rule": mg.rules.fenchel(adaptive)})
    runs.append({"panel": "negative", "label": "BP", "activation": "relu", "init": "negative", "tau": None,
                 "rule": mg.rules.backprop()})
    runs.append({"panel": "negative", "label": "FenBP adaptive", "activation": "relu", "init": "negative",
                 "tau": repr(adaptive), "rule": mg.rules.fenchel(adaptive)})
    return runs


PANELS = {"relu": "ReLU, Glorot init", "hard_sigmoid": "hard sigmoid clip(u, 0, 1), Glorot init",
          "negative": "ReLU, all-negative init"}


def aggregate(runs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Per ``(panel, label)``: the seeds' curves, and the mean and sample standard deviation over
    seeds (0 for one seed) of the final train and test errors."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["panel"], r["label"]), []).append(r)
    out = {}
    for key, rs in groups.items():
        entry: dict[str, Any] = {"seeds": [r["seed"] for r in rs], "curves": [r["train_error"] for r in rs],
                                 "test_curves": [r["test_error"] for r in rs]}
        for metric in ("train_error", "test_error"):
            entry[metric] = mean_std([r[metric][-1] for r in rs])
        out[key] = entry
    return out


def compare(a: tuple[float, float], b: tuple[float, float]) -> str:
    """``a`` against ``b``, errors (lower is better), as ``moreaugrad``'s verdicts read them: a
    difference within the sum of the two spreads is a tie, never a win."""
    if not outside_spread(a, b):
        return "tie"
    return "better" if a[0] < b[0] else "worse"


def verdict(datasets: dict[str, Any], seeds: int, smoke: bool) -> dict[str, Any]:
    """The verdict on the claim of 002 Fig. 1, check by check (final training error, mean over seeds):

    * ReLU and hard sigmoid: FenBP at its best fixed spacing trains at least as well as backprop
      (better or a tie);
    * all-negative init: FenBP with adaptive spacing ends below backprop (beyond the spreads), and
      backprop stays above 50% error (it cannot move the network).
    """
    checks = []
    for name, d in datasets.items():
        agg = aggregate(d["runs"])
        for panel in ("relu", "hard_sigmoid"):
            bp = agg[(panel, "BP")]["train_error"]
            fixed = {lab: v["train_error"] for (p, lab), v in agg.items()
                     if p == panel and lab.startswith("FenBP tau=")}
            best = min(fixed, key=lambda lab: fixed[lab][0])
            outcome = compare(fixed[best], bp)
            others = ", ".join(f"{lab.removeprefix('FenBP ')} {_pm(v)}" for lab, v in fixed.items()
                               if lab != best)
            checks.append({"dataset": name, "panel": panel, "ok": outcome != "worse",
                           "line": f"{name}, {PANELS[panel]}: {best} vs BP: {outcome}, train error "
                                   f"{_pm(fixed[best])} vs {_pm(bp)}"
                                   + (f" (the other spacings: {others})" if others else "")})
        bp, fen = agg[("negative", "BP")]["train_error"], agg[("negative", "FenBP adaptive")]["train_error"]
        outcome = compare(fen, bp)
        checks.append({"dataset": name, "panel": "negative", "ok": outcome == "better" and bp[0] > 0.5,
                       "line": f"{name}, {PANELS['negative']}: FenBP adaptive vs BP: {outcome}, train error "
                               f"{_pm(fen)} vs {_pm(bp)} (BP stuck: {'yes' if bp[0] > 0.5 else 'no'})"})
    passed = sum(c["ok"] for c in checks)
    word = ("not testable here" if not checks else "reproduced" if passed == len(checks)
            else "partly reproduced" if passed else "not reproduced")
    differs = (f"datasets {', '.join(datasets) or 'none'} (002: MNIST); "
               f"{seeds} seed{'s' if seeds > 1 else ''}"
               + ("; smoke scale: checks the machinery, not evidence" if smoke else ""))
    return {"verdict": word, "checks": checks, "differs": differs,
            "rule": "final training error, mean +- sample standard deviation over seeds; a difference "
                    "within the sum of the spreads is a tie (one seed: no spread, so no tie)"}


def _pm(v: tuple[float, float]) -> str:
    return f"{100 * v[0]:.1f}% +- {100 * v[1]:.1f}"


def plot(name: str, runs: list[dict[str, Any]], path: Path) -> None:
    """Train (solid) and test (dashed) error per epoch: the mean over seeds, the spread shaded."""
    agg = aggregate(runs)
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), sharey=True)
    for ax, (panel, title) in zip(axes, PANELS.items(), strict=True):
        for i, ((_, label), entry) in enumerate((k, v) for k, v in agg.items() if k[0] == panel):
            color = f"C{i}"
            for key, style, kind in (("curves", "-", "train"), ("test_curves", "--", "test")):
                c = 100 * np.array(entry[key])
                epochs = np.arange(c.shape[1])
                ax.plot(epochs, c.mean(0), color=color, linestyle=style, label=f"{label} ({kind})")
                if len(c) > 1:
                    ax.fill_between(epochs, c.min(0), c.max(0), color=color, alpha=0.15, linewidth=0)
        ax.set_title(f"{name}: {title}")
        ax.set_xlabel("epoch")
        ax.set_ylabel("error (%)")
        ax.set_yscale("symlog", linthresh=1.0)  # logarithmic above 1%, linear down to 0%
        ax.set_ylim(0, 100)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_summary(summary: dict[str, Any], path: Path) -> None:
    """``summary.md``: the verdict, its checks and the final errors of every run (mean +- spread)."""
    v = summary["verdict"]
    lines = ["# 002 Fig. 1: backprop vs Fenchel back-propagation", "", "## Verdict", "",
             f"**{v['verdict']}**", "",
             *(f"- [{'ok' if c['ok'] else 'fail'}] {c['line']}" for c in v["checks"]),
             "", f"Settings that differ from the paper: {v['differs']}.", "", f"Rule: {v['rule']}.", "",
             "## Final errors", "", "| dataset | panel | method | train error | test error |",
             "| --- | --- | --- | --- | --- |"]
    for name, d in summary["datasets"].items():
        for (panel, label), e in aggregate(d["runs"]).items():
            lines.append(f"| {name} | {PANELS[panel]} | {label} | {_pm(e['train_error'])} "
                         f"| {_pm(e['test_error'])} |")
    for name, why in summary["skipped"].items():
        lines.append(f"\n{name}: skipped ({why})")
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seed, args.seed + args.seeds))
    fixed: dict[str, Data | None] = {}  # MNIST-1D and MNIST do not depend on the seed: loaded once

    def once(name: str, load: Any) -> Data | None:
        if name not in fixed:
            fixed[name] = load()
        return fixed[name]

    loaders = {"digits": load_digits_data,
               "mnist1d": lambda seed: once("mnist1d", load_mnist1d_data),
               "mnist": lambda seed: once("mnist", lambda: load_mnist_data(args.data_dir))}
    summary: dict[str, Any] = {
        "format": "script", "experiment": {"name": "002_fig1", "paper": "002 Sec. 5 Fig. 1"},
        "scale": args.scale or ("smoke" if args.smoke else "default"), "status": "running", "seeds": seeds,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "setup": "MLP in-64-64-64-out, SGD batch 64 lr 1/8, cross-entropy, Glorot-uniform init (002 Sec. 5)",
        "datasets": {}, "skipped": {},
    }

    def save() -> None:
        summary["verdict"] = verdict(summary["datasets"], len(seeds), args.smoke)
        with open(args.out / "results.json", "w") as f:  # rewritten after each dataset
            json.dump(summary, f, indent=1)
        write_summary(summary, args.out / "summary.md")

    for name in args.datasets:
        results = []
        for seed in seeds:
            data = loaders[name](seed)
            if data is None:
                break
            if args.smoke:
                data.x_train, data.y_train = data.x_train[:512], data.y_train[:512]
            for cfg in tqdm(configurations(args.taus), desc=f"{name} seed {seed}"):
                out = train(data, cfg["activation"], cfg["init"], cfg["rule"], args.epochs, seed,
                            f"{cfg['panel']} {cfg['label']}")
                results.append({k: v for k, v in cfg.items() if k != "rule"} | out | {"seed": seed})
                tqdm.write(f"{name:8s} seed {seed} {PANELS[cfg['panel']]:40s} {cfg['label']:16s} final train "
                           f"{100 * out['train_error'][-1]:5.1f}%  test {100 * out['test_error'][-1]:5.1f}%  "
                           f"best train {100 * min(out['train_error']):5.1f}%  ({out['seconds']:.0f} s)")
        if data is None:
            summary["skipped"][name] = f"no IDX files in {args.data_dir}"
            tqdm.write(f"{name}: skipped (no IDX files in {args.data_dir})")
            continue
        summary["datasets"][name] = {"n_train": len(data.y_train), "n_test": len(data.y_test),
                                     "runs": results}
        plot(name, results, args.out / f"{name}.png")
        save()
    summary["status"] = "complete"
    save()
    print(f"verdict: {summary['verdict']['verdict']}")
    for c in summary["verdict"]["checks"]:
        print(f"  [{'ok' if c['ok'] else 'fail'}] {c['line']}")
    print(f"wrote {args.out / 'results.json'} and {args.out / 'summary.md'}")


if __name__ == "__main__":
    main()
