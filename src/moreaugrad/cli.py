"""The ``moreaugrad`` command line: ``demo``, ``run CONFIG``, ``plot RUN`` and ``list``.

    moreaugrad demo                                   # a few minutes on a laptop CPU
    moreaugrad list                                   # the experiments, and verdicts of runs in runs/
    moreaugrad run 000_fig3 [--smoke | --full]        # one figure or table of a paper
    moreaugrad run 000_fig3 --seeds 3                 # three seeds: mean +- spread, shaded plots
    moreaugrad run 000_fig4 --nproc 2                 # data-parallel on 2 processes (gloo or NCCL)
    moreaugrad plot runs/000_fig3                     # redraw a run's figures and summary
    moreaugrad analyze --vgg16 --batch-norm 0.01      # Lipschitz and smoothness bounds, per layer (003)

Runs resume: interrupt one (Ctrl-C, a kill) and rerun the same command; it continues from the last
checkpoint and ends with the same results as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

EXIT_INTERRUPTED = 130


def _experiment_dirs(extra: Path | None) -> list[Path]:
    dirs = [] if extra is None else [extra]
    dirs.append(Path.cwd() / "experiments")
    # An editable install from a source checkout: <repo>/src/moreaugrad/cli.py -> <repo>/experiments.
    checkout = Path(__file__).resolve().parents[2] / "experiments"
    if checkout not in dirs:
        dirs.append(checkout)
    return [d for d in dirs if d.is_dir()]


# Option types: argparse turns their ArgumentTypeError into "argument --OPT: MESSAGE" and exit 2.


def _device_name(name: str) -> str:
    import torch

    if name == "auto":
        return name
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"{name!r} is not a torch device (cpu, cuda, cuda:1, mps or "
                                         f"auto)") from err
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: CUDA is not available here")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{name!r}: MPS is not available here")
    return name


def _threads(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return n


def _out_folder(text: str) -> Path:
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file, not a folder")
    return path


def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text!r}")
    return value


def _positive(text: str) -> float:
    value = _nonnegative(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _existing_folder(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is not a folder")
    return path


def _common(p: argparse.ArgumentParser, out_help: str) -> None:
    p.add_argument("--seed", type=int, default=0, help="seed of the splits, initialisations and batch "
                   "orders (default 0)")
    p.add_argument("--device", type=_device_name, default="cpu", help="torch device: cpu, cuda, cuda:1, "
                   "mps or auto (default cpu)")
    p.add_argument("--out", type=_out_folder, default=None, help=out_help)
    p.add_argument("--threads", type=_threads, default=1, help="torch CPU threads (default 1: the "
                   "experiments' CPU sizes are small layers, for which more threads rarely help)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="moreaugrad", description="Run the experiments of the moreaugrad papers: oracles beyond "
        "back-propagation (Moreau gradients, ProxProp, augmented Lagrangian) against gradients.",
        epilog="Each command has --help. Results go to a run folder (results.json, summary.md, PNGs).")
    sub = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="a few-minute tour: pendulum GD vs MorGD, digits SGD vs MorSGD, "
                          "Adam vs Adam on ProxProp directions",
                          description="Run the demo (pendulum at horizon 50: GD against MorGD; digits "
                          "MLP: SGD against MorSGD and Adam against Adam on ProxProp directions), print "
                          "a summary table and write summary.md, results.json and PNGs.")
    _common(demo, "run folder (default runs/demo)")

    run = sub.add_parser("run", help="run an experiment config (resumes an interrupted run)",
                         description="Run the experiment described by CONFIG (a TOML file, or its name "
                         "in experiments/). Rerunning the same command resumes from the last "
                         "checkpoint.")
    run.add_argument("config", metavar="CONFIG", help="a config file or an experiment name (see `list`)")
    size = run.add_mutually_exclusive_group()
    size.add_argument("--smoke", action="store_true", help="tiny size, seconds (for CI)")
    size.add_argument("--full", action="store_true", help="the paper's size (needs a GPU and, for "
                      "MNIST/CIFAR-10, --data-dir)")
    run.add_argument("--data-dir", type=Path, default=Path("data"),
                     help="folder holding MNIST (IDX files) and/or CIFAR-10 (python batches), directly or "
                     "in mnist/, MNIST/raw/, cifar-10-batches-py/ (default ./data); nothing is downloaded")
    run.add_argument("--experiments", type=_existing_folder, default=None,
                     help="folder to look up CONFIG by name")
    run.add_argument("--seeds", type=_threads, default=None, metavar="N",
                     help="run N seeds (--seed, --seed + 1, ...) into OUT/seed-S/ and report their mean "
                     "+- spread; default: the config's `seeds` (else 1)")
    run.add_argument("--nproc", type=_threads, default=1, metavar="N",
                     help="data-parallel on N processes of this machine (gloo on CPU, NCCL with --device "
                     "cuda, one GPU per rank): each mini-batch is split over the ranks and the oracle is "
                     "mg.distributed.Oracle, mode 'exact' (the global batch's oracle) where the rule "
                     "allows it, else 'local' (recorded in results.json and summary.md); default 1")
    run.add_argument("--rank-timeout", type=_positive, default=600.0, metavar="S",
                     help="with --nproc: seconds a rank waits in a collective before the run stops "
                     "(default 600)")
    _common(run, "run folder (default runs/NAME[-smoke|-full][-seedS])")

    plot = sub.add_parser("plot", help="redraw a run's figures and summary.md from its results.json",
                          description="Redraw the figures and summary.md of RUN (a run folder or its "
                          "results.json); works on a run still in progress.")
    plot.add_argument("run", metavar="RUN", type=Path, help="run folder or results.json")
    _common(plot, "folder for the figures (default: the run folder); --seed and --device are unused")

    lst = sub.add_parser("list", help="list the experiments",
                         description="List the experiment configs (experiments/*.toml) and what each "
                         "reproduces.")
    lst.add_argument("--experiments", type=_existing_folder, default=None, help="folder of configs to list")
    lst.add_argument("--runs", type=Path, default=Path("runs"), help="folder of run folders whose verdicts "
                     "to show (default ./runs)")
    _common(lst, "unused (accepted by every command)")

    ana = sub.add_parser("analyze", help="Lipschitz and smoothness bounds of a model, layer by layer (003)",
                         description="Print the per-layer table of output bounds m, Lipschitz constants l "
                         "and smoothness L of the model of CONFIG (its first train panel, or --panel) or "
                         "of the smooth VGG-16 of 003 Sec. 5.1, on balls ||v_l|| <= R (003 Prop. 4.4), "
                         "and the step 1/L_F of its objective (003 Thm. 4.1). With --out, also write "
                         "analysis.json and analysis.png (per-layer factors, log scale).")
    ana.add_argument("config", metavar="CONFIG", nargs="?", default=None,
                     help="a config file or an experiment name (see `list`)")
    ana.add_argument("--vgg16", action="store_true", help="VGG-16 with soft-plus and average pooling on "
                     "3x224x224 inputs (003 Sec. 5.1) instead of a config")
    ana.add_argument("--batch-norm", type=_positive, default=None, metavar="EPS",
                     help="with --vgg16: a batch-normalization with this epsilon after each convolution")
    ana.add_argument("--panel", default=None, help="the panel of CONFIG whose model to analyze")
    ana.add_argument("--batch", type=_threads, default=None,
                     help="mini-batch size m (default: the panel's batch_size; 128 for --vgg16)")
    ana.add_argument("--radius", type=_nonnegative, default=1.0, help="R, the radius of each layer's "
                     "ball of weights (default 1)")
    ana.add_argument("--input-norm", type=_nonnegative, default=None,
                     help="||x|| of the whole input batch (default: 1 for --vgg16, as 003 Sec. 5.2; for a "
                     "config sqrt(batch x input size), the norm of unit-variance inputs)")
    ana.add_argument("--experiments", type=_existing_folder, default=None,
                     help="folder to look up CONFIG by name")
    _common(ana, "folder for analysis.json and analysis.png (default: print only)")
    return top


def _device(name: str) -> Any:
    """The torch device of a ``--device`` value (checked by :func:`_device_name`)."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _setup(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)


def _run_script(script: Any, out: Path, args: argparse.Namespace, data_dir: Path | None) -> int:
    """A ``kind = "script"`` experiment: its own program, outputs and (no) resume."""
    import subprocess

    from . import runner

    n = getattr(args, "seeds", None) or script.config.get("seeds", 1)
    if n > 1 and not any("{seeds}" in a for a in script.args):
        raise runner.ConfigError(f"{script.source}: {n} seeds asked for, but this script config's args "
                                  f"do not pass {{seeds}} on, so its script would run one seed")
    cmd = script.command(args.seed, out, args.device, data_dir, n)
    print(f"moreaugrad: {script.source} ({script.scale}) runs its own script:\n  {' '.join(cmd)}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    try:
        code = subprocess.call(cmd, env=env)
    except KeyboardInterrupt:
        print("\nmoreaugrad: interrupted (script experiments start over when rerun).", file=sys.stderr)
        return EXIT_INTERRUPTED
    if code == 0:
        print(f"\n{script.title}: outputs in {out}")
    return code


def _run(config_path: Path, out: Path, scale: str, args: argparse.Namespace, data_dir: Path | None) -> int:
    from . import runner

    exp = runner.load(config_path, scale)
    if isinstance(exp, runner.config.Script):
        if getattr(args, "nproc", 1) > 1:
            raise runner.ConfigError(f"{config_path} is a script experiment: it runs its own program, "
                                     f"not data-parallel (--nproc)")
        return _run_script(exp, out, args, data_dir)
    device = _device(args.device)
    nproc = getattr(args, "nproc", 1)
    procs = "" if nproc == 1 else f", {nproc} processes"
    print(f"moreaugrad: {config_path} ({scale}) -> {out}  [seed {args.seed}, device {device}{procs}]")
    try:
        if nproc == 1:
            results = runner.run_config(config_path, out, scale=scale, seed=args.seed, device=device,
                                        data_dir=data_dir, progress=not args.quiet,
                                        n_seeds=getattr(args, "seeds", None))
        else:
            runner.engine.validate(exp)  # a config error once, before any rank starts
            code = runner.parallel_.launch(config_path, out, nproc, scale=scale, seed=args.seed,
                                           device=str(device), data_dir=data_dir, progress=not args.quiet,
                                           n_seeds=getattr(args, "seeds", None), threads=args.threads,
                                           timeout_s=args.rank_timeout)
            if code == EXIT_INTERRUPTED:
                raise KeyboardInterrupt
            if code != 0:
                return code
            results = runner.store.read_json(out / "results.json")
    except KeyboardInterrupt:
        print(f"\nmoreaugrad: interrupted. Rerun the same command to resume {out} from its last "
              f"checkpoint.", file=sys.stderr)
        return EXIT_INTERRUPTED
    print()
    print(runner.report.console(results))
    print(f"\nwrote {out}/results.json, {out}/summary.md and figures "
          f"({results['timings']['wall_s']:.0f} s this session)")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import runner

    return _run(runner.demo_config(), args.out or Path("runs/demo"), "default", args, None)


def cmd_run(args: argparse.Namespace) -> int:
    from . import runner

    path = runner.config.find(args.config, _experiment_dirs(args.experiments))
    scale = "smoke" if args.smoke else "full" if args.full else "default"
    if args.out is None:
        exp = runner.load(path, scale)
        suffix = "" if scale == "default" else f"-{scale}"
        n = args.seeds or (1 if isinstance(exp, runner.config.Script) else exp.config.get("seeds", 1))
        seeds = "" if n == 1 else f"-{n}seeds"
        args.out = Path("runs") / f"{exp.name}{suffix}{'' if args.seed == 0 else f'-seed{args.seed}'}{seeds}"
    return _run(path, args.out, scale, args, args.data_dir)


def cmd_plot(args: argparse.Namespace) -> int:
    from . import runner

    path = args.run / "results.json" if args.run.is_dir() else args.run
    if not path.is_file():
        raise runner.ConfigError(f"{args.run}: no results.json (has the run finished a job yet?)")
    results = runner.store.read_json(path)
    if not isinstance(results, dict) or results.get("format") != 1:
        raise runner.ConfigError(f"{path} was not written by `moreaugrad run` (a script experiment draws "
                                 f"its own figures)")
    out = args.out or path.parent
    files = runner.report.write(results, out)
    print(runner.report.console(results))
    print(f"\nwrote {', '.join(str(out / f) for f in files)}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from . import runner

    dirs = _experiment_dirs(args.experiments)
    if not dirs:
        print("no experiments folder found (run from the repository root, or pass --experiments DIR)")
        return 1
    rows = []
    for folder in dirs:
        for path in sorted(folder.glob("*.toml")):
            try:
                exp = runner.load(path)
                size = "script" if isinstance(exp, runner.config.Script) else f"{len(exp.jobs)} jobs"
                rows.append((exp.name, exp.config.get("paper", ""), size, exp.title))
            except runner.ConfigError as err:
                rows.append((path.stem, "", "invalid", str(err)))
        if rows:
            break
    print(f"experiments in {folder} (run one with `moreaugrad run NAME [--smoke | --full]`):\n")
    width = [max(len(r[i]) for r in rows) for i in range(3)] if rows else [0, 0, 0]
    verdicts = _verdicts(args.runs)
    for r in rows:
        print(f"  {r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]:>{width[2]}}  {r[3]}")
        for folder_name, line in verdicts.get(r[0], []):
            print(f"      {folder_name}: {line}")
    if not verdicts:
        print(f"\nno finished runs in {args.runs}: verdicts appear here once `moreaugrad run` has written "
              f"one")
    return 0


def _verdicts(runs: Path) -> dict[str, list[tuple[str, str]]]:
    """The verdict of every run folder under ``runs`` (its ``results.json``), by experiment name."""
    from . import runner

    found: dict[str, list[tuple[str, str]]] = {}
    if not runs.is_dir():
        return found
    for path in sorted(runs.glob("*/results.json")):
        try:
            results = runner.store.read_json(path)
            if not isinstance(results, dict):
                continue
            if results.get("format") == "script":  # a script experiment's own verdict
                word, n = results["verdict"]["verdict"], len(results["seeds"])
            elif results.get("format") == 1:
                word, n = runner.verdict.verdict(results).verdict, runner.seeds.n_seeds(results)
            else:
                continue
        except (OSError, ValueError, KeyError, TypeError):
            continue
        where = f"{path.parent.name} [{results.get('scale')}, {n} seed{'s' if n > 1 else ''}, " \
                f"{results.get('status')}]"
        found.setdefault(results["experiment"]["name"], []).append((where, word))
    return found


# Input shape (per sample) and classes of each dataset, so that `analyze` reads no data files.
DATASET_SHAPES = {"digits": ((1, 8, 8), 10), "mnist1d": ((1, 40), 10), "mnist": ((1, 28, 28), 10),
                  "cifar10": ((3, 32, 32), 10)}


def _config_model(args: argparse.Namespace) -> tuple[Any, tuple[int, ...], int, str, Any, Any]:
    """The model of a config's train panel: ``(model, input shape, batch, title, loss, regularizer)``."""
    from . import losses, runner

    path = runner.config.find(args.config, _experiment_dirs(args.experiments))
    exp = runner.load(path)
    if isinstance(exp, runner.config.Script):
        raise ValueError(f"analyze: {path} is a script experiment; its model is not in the config")
    train = {n: p for n, p in exp.panels.items() if p["kind"] == "train"}
    if not train:
        raise ValueError(f"analyze: {path} has no train panel (a control experiment has no network)")
    name = args.panel or next(iter(train))
    if name not in train:
        raise ValueError(f"analyze: no train panel {name!r} in {path}; panels: {sorted(train)}")
    panel = train[name]
    dataset = panel.get("dataset", {}).get("name", "digits")
    if dataset not in DATASET_SHAPES:
        raise ValueError(f"analyze: unknown dataset {dataset!r}; known: {sorted(DATASET_SHAPES)}")
    in_shape, classes = DATASET_SHAPES[dataset]
    model, flat = runner.models.build(panel.get("model", {}), in_shape, classes)
    shape = (math.prod(in_shape),) if flat else in_shape
    loss = losses.SquaredLoss() if panel.get("loss") == "squared" else losses.CrossEntropy()
    reg = losses.L2(float(panel["l2"])) if panel.get("l2") else None
    return model, shape, int(panel.get("batch_size", 128)), f"{exp.name} / {name}", loss, reg


def cmd_analyze(args: argparse.Namespace) -> int:
    import json

    from . import losses, smoothness

    if (args.config is None) == (not args.vgg16):
        raise ValueError("analyze: give either CONFIG or --vgg16")
    if args.batch_norm is not None and not args.vgg16:
        raise ValueError("analyze: --batch-norm goes with --vgg16")
    if args.vgg16:
        model, shape = smoothness.vgg16(args.batch_norm), (3, 224, 224)
        batch, loss, reg = args.batch or 128, losses.CrossEntropy(), None
        title = "VGG-16 (003 Sec. 5.1)" + ("" if args.batch_norm is None else
                                            f" with batch-norm, eps = {args.batch_norm:g}")
        norm = 1.0 if args.input_norm is None else args.input_norm
    else:
        model, shape, batch, title, loss, reg = _config_model(args)
        batch = args.batch or batch
        norm = math.sqrt(batch * math.prod(shape)) if args.input_norm is None else args.input_norm
    try:
        est = smoothness.estimate(model, shape, radius=args.radius, input_norm=norm, batch=batch, loss=loss,
                                  regularizer=reg)
    except smoothness.UnsupportedModuleError as err:
        raise ValueError(str(err)) from err
    print(f"{title}\n{est}")
    if args.input_norm is None and not args.vgg16:
        # Standardised data have mean square 1, but a batch's norm can exceed sqrt(B d) (digits: by
        # up to ~20%), and every bound scales with it: say what was assumed.
        print(f"\nassumed ||x_0|| = sqrt(batch * d) = {norm:.4g} (unit mean square); the bounds hold for "
              f"batches within that norm: pass --input-norm for your data's largest batch norm")
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "analysis.json").write_text(json.dumps({"model": title, **est.to_dict()}, indent=1))
        fig = est.figure()
        fig.savefig(args.out / "analysis.png", dpi=120)
        print(f"\nwrote {args.out / 'analysis.json'} and {args.out / 'analysis.png'}")
    return 0


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "plot": cmd_plot, "list": cmd_list, "analyze": cmd_analyze}


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    _setup(args)
    from . import data, runner

    try:
        return COMMANDS[args.command](args)
    except (runner.ConfigError, runner.RunMismatchError, data.MissingDataError, data.FormatError,
            ValueError) as err:
        print(f"moreaugrad: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
