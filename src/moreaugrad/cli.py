"""The ``moreaugrad`` command line: ``demo``, ``run CONFIG``, ``plot RUN`` and ``list``.

    moreaugrad demo                                   # a few minutes on a laptop CPU
    moreaugrad list                                   # the experiments in experiments/
    moreaugrad run 000_fig3 [--smoke | --full]        # one figure or table of a paper
    moreaugrad plot runs/000_fig3                     # redraw a run's figures and summary

Runs resume: interrupt one (Ctrl-C, a kill) and rerun the same command; it continues from the last
checkpoint and ends with the same results as an uninterrupted run with the same seed.
"""

from __future__ import annotations

import argparse
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
    _common(lst, "unused (accepted by every command)")
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

    cmd = script.command(args.seed, out, args.device, data_dir)
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
        return _run_script(exp, out, args, data_dir)
    device = _device(args.device)
    print(f"moreaugrad: {config_path} ({scale}) -> {out}  [seed {args.seed}, device {device}]")
    try:
        results = runner.run_config(config_path, out, scale=scale, seed=args.seed, device=device,
                                    data_dir=data_dir, progress=not args.quiet)
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
        name = runner.load(path, scale).name
        suffix = "" if scale == "default" else f"-{scale}"
        args.out = Path("runs") / f"{name}{suffix}{'' if args.seed == 0 else f'-seed{args.seed}'}"
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
    for r in rows:
        print(f"  {r[0]:<{width[0]}}  {r[1]:<{width[1]}}  {r[2]:>{width[2]}}  {r[3]}")
    return 0


COMMANDS = {"demo": cmd_demo, "run": cmd_run, "plot": cmd_plot, "list": cmd_list}


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
