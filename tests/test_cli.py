"""The ``moreaugrad`` command line and its runner: every experiment config runs at ``--smoke`` size and
writes complete results and figures; an interrupted run (KeyboardInterrupt, SIGKILL) resumes to the same
results as an uninterrupted one; writes are atomic; errors name what is wrong."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moreaugrad import cli, runner
from moreaugrad.runner import store

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments").glob("*.toml"))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def keep_threads():
    """``cli.main`` sets torch's thread count (``--threads``); give the other tests theirs back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def strip_timings(obj):
    """Results without wall-clock data, which is the only thing two equal runs may differ in."""
    if isinstance(obj, dict):
        return {k: strip_timings(v) for k, v in obj.items() if k not in ("timings", "finished", "created")}
    if isinstance(obj, list):
        return [strip_timings(v) for v in obj]
    return obj


def check_results(out: Path, scale: str = "smoke") -> dict:
    """The result files hold what they promise: keys, curve lengths, finite numbers, figures."""
    results = json.loads((out / "results.json").read_text())
    exp = runner.load(results["experiment"]["source"], scale)
    assert results["status"] == "complete" and results["scale"] == scale
    assert set(results) >= {"config", "versions", "seed", "device", "timings", "jobs", "selected", "panels"}
    assert results["versions"]["torch"] and results["versions"]["moreaugrad"]
    assert results["timings"]["wall_s"] > 0
    run_panels = [p for p, i in results["panels"].items() if not i["skipped"]]
    assert run_panels, "every panel was skipped"
    expected = [j for j in exp.jobs if j.panel in run_panels]
    assert [r["id"] for r in results["jobs"]] == [j.id for j in expected]
    for rec in results["jobs"]:
        panel = exp.panels[rec["panel"]]
        length = (panel["iterations"] if panel["kind"] == "control" else panel["epochs"]) + 1
        assert set(rec["curves"]) >= {"loss"}
        if panel["kind"] == "train":
            assert set(rec["curves"]) >= {"test_accuracy", "test_loss", "val_accuracy"}
        for name, curve in rec["curves"].items():
            if rec["diverged"]:
                assert 1 <= len(curve) <= length
            else:
                assert len(curve) == length, (rec["id"], name)
            assert all(isinstance(v, float) and math.isfinite(v) for v in curve), (rec["id"], name)
            best = rec["best"][name]
            assert len(best) == len(curve)
            pick = max if name.endswith("accuracy") else min
            assert all(b == pick(curve[: i + 1]) for i, b in enumerate(best))
        assert len(rec["timings"]["elapsed_s"]) == len(rec["curves"]["loss"])
        assert rec["updates"] >= (0 if rec["diverged"] else length - 1)
    for pname in run_panels:
        for method in exp.panels[pname]["methods"]:
            jid = results["selected"][pname][method]
            tried = [r for r in results["jobs"] if r["panel"] == pname and r["method"] == method]
            assert jid is not None or all(r["diverged"] for r in tried)
    pngs = sorted(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG_MAGIC and p.stat().st_size > 5000 for p in pngs)
    assert (out / "loss.png").is_file()
    summary = (out / "summary.md").read_text()
    assert results["experiment"]["title"] in summary and "| panel | method |" in summary
    assert not list(out.glob("**/*.tmp")) and not list((out / "state").glob("*.pt"))
    return results


def finite_numbers(obj) -> int:
    """How many numbers a JSON document holds; fails on a non-finite one."""
    if isinstance(obj, float):
        assert math.isfinite(obj)
        return 1
    if isinstance(obj, dict):
        return sum(finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return sum(finite_numbers(v) for v in obj)
    return 0


def check_script_outputs(out: Path) -> None:
    """A script experiment (002 Fig. 1) writes its own results.json, figures, and a summary.md with
    a verdict on its claim (issue 14)."""
    results = json.loads((out / "results.json").read_text())
    assert finite_numbers(results) > 10
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.read_bytes()[:8] == PNG_MAGIC for p in pngs)
    if results.get("format") == 1:  # a script writing the runner's format (004 Table 1's replica)
        word = runner.verdict.verdict(results).verdict
    else:  # a script's own verdict (002 Fig. 1)
        word = results["verdict"]["verdict"]
        assert results["verdict"]["checks"] and results["status"] == "complete"
    assert word in runner.verdict.VERDICTS
    summary = (out / "summary.md").read_text()
    assert "## Verdict" in summary and f"**{word}**" in summary


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_runs_at_smoke_size(config, tmp_path, capsys):
    out = tmp_path / "run"
    code = cli.main(["run", str(config), "--smoke", "--out", str(out), "--quiet",
                     "--data-dir", str(tmp_path / "no-data")])
    assert code == 0
    if isinstance(runner.load(config, "smoke"), runner.config.Script):
        check_script_outputs(out)
        return
    results = check_results(out)
    printed = capsys.readouterr().out
    assert results["experiment"]["title"] in printed
    table = results["config"].get("table", "none")
    summary = (out / "summary.md").read_text()
    # A verdict line for every config, computed from its results (issue 14).
    assert "## Verdict" in summary and "verdict: " in printed
    assert any(f"**{w}**" in summary for w in runner.verdict.VERDICTS)
    if table == "grid":
        assert "over the grid ('-': diverged)" in summary
        # Every method has one cell per step size: a number or '-'.
        lines = [ln for ln in summary.splitlines() if ln.startswith("| ProxProp (cg3) |")]
        cells = lines[0].strip("|").split("|")[1:]
        assert len(cells) == len(results["config"]["methods"]["cg3"]["lr"])
        assert all(c.strip() == "-" or math.isfinite(float(c)) for c in cells)
    if table == "selected":
        assert "## Table" in summary and "AL-MSGD: selected" in summary


def test_demo_config_at_smoke_size(tmp_path):
    results = runner.run_config(runner.demo_config(), tmp_path / "demo", scale="smoke", log=lambda s: None)
    check_results(tmp_path / "demo")
    assert set(results["selected"]) == {"pendulum", "digits_sgd", "digits_adam"}
    assert {r["method"] for r in results["jobs"]} == {"GD", "MorGD", "SGD", "MorSGD", "Adam", "Adam-ProxProp"}


@pytest.mark.parametrize("command", ["demo", "run", "plot", "list"])
def test_help_and_common_options(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for option in ("--seed", "--device", "--out"):
        assert option in text


def test_list_shows_every_experiment(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for config in CONFIGS:
        assert config.stem in out
    assert "invalid" not in out


# -- resume -------------------------------------------------------------------------------------

TINY = """
name = "tiny"
title = "tiny resume check"
select = "final"
[panels.digits]
dataset = {name = "digits", train_size = 96, test_size = 32}
model = {kind = "mlp", hidden = [8]}
epochs = 3
batch_size = 32
methods = ["SGD", "Adam"]
[panels.pendulum]
kind = "control"
horizon = 6
iterations = 5
checkpoint_every = 2
methods = ["MorGD"]
[methods.SGD]
rule = "backprop"
optimizer = "sgd"
momentum = 0.9
lr = [0.1, 0.3]
[methods.Adam]
rule = "proxprop"
cg = 2
optimizer = "adam"
lr = 0.01
[methods.MorGD]
rule = "moreau"
optimizer = "step"
gamma = 0.5
alpha = 8.0
"""


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def interrupt_at(job: str, update: int):
    def callback(job_id: str, n: int) -> None:
        if job_id == job and n == update:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("job, update", [
    ("digits.SGD.001", 5),      # mid second epoch (3 updates per epoch) of the second grid point
    ("digits.Adam.000", 8),     # optimizer state (Adam moments) and batch order restored
    ("pendulum.MorGD.000", 4),  # control: checkpoint every 2 iterations
])
def test_interrupted_run_resumes_to_the_same_results(tiny, tmp_path, job, update):
    reference = runner.run_config(tiny, tmp_path / "a", seed=5, log=lambda s: None)
    out = tmp_path / "b"
    with pytest.raises(KeyboardInterrupt):
        runner.run_config(tiny, out, seed=5, callback=interrupt_at(job, update), log=lambda s: None)
    assert (out / "state" / f"{job}.pt").is_file(), "no checkpoint of the interrupted job"
    partial = store.read_json(out / "results.json") if (out / "results.json").exists() else None
    assert partial is None or partial["status"] == "running"
    logs = []
    resumed = runner.run_config(tiny, out, seed=5, log=logs.append)
    assert logs and logs[0].startswith("resuming tiny")
    assert strip_timings(resumed) == strip_timings(reference)
    assert not (out / "state" / f"{job}.pt").exists()


def test_killed_run_resumes_to_the_same_results(tiny, tmp_path):
    """A real SIGKILL after the first checkpoints, then the same command line again."""
    env = {**os.environ, "PYTHONWARNINGS": "error"}
    args = ["run", str(tiny), "--seed", "2", "--quiet", "--threads", "1"]
    kill = textwrap.dedent(f"""
        import os, signal, torch
        from moreaugrad import runner
        torch.set_num_threads(1)
        def callback(job, n):
            if job == "digits.Adam.000" and n == 7:
                os.kill(os.getpid(), signal.SIGKILL)
        runner.run_config({str(tiny)!r}, {str(tmp_path / 'killed')!r}, seed=2, callback=callback)
    """)
    proc = subprocess.run([sys.executable, "-c", kill], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (tmp_path / "killed" / "state" / "digits.Adam.000.pt").is_file()
    for out in ("killed", "clean"):
        proc = subprocess.run([sys.executable, "-m", "moreaugrad.cli", *args, "--out", str(tmp_path / out)],
                              env=env, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert ("resuming tiny" in proc.stdout) == (out == "killed")
    killed = json.loads((tmp_path / "killed" / "results.json").read_text())
    clean = json.loads((tmp_path / "clean" / "results.json").read_text())
    assert strip_timings(killed) == strip_timings(clean)


def test_ctrl_c_in_the_cli_says_how_to_resume(tiny, tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner.engine, "run", interrupted)
    code = cli.main(["run", str(tiny), "--out", str(tmp_path / "x"), "--quiet"])
    assert code == cli.EXIT_INTERRUPTED
    assert "Rerun the same command to resume" in capsys.readouterr().err


def test_another_run_in_the_same_folder_is_refused(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    runner.run_config(tiny, out, seed=0, log=lambda s: None)
    code = cli.main(["run", str(tiny), "--out", str(out), "--seed", "1", "--quiet"])
    assert code == 2
    assert "holds another run (different seed)" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(runner.RunMismatchError, match="not empty"):
        runner.run_config(tiny, tmp_path / "other", log=lambda s: None)


def test_plot_redraws_from_results(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    runner.run_config(tiny, out, log=lambda s: None)
    for f in [*out.glob("*.png"), out / "summary.md"]:
        f.unlink()
    assert cli.main(["plot", str(out)]) == 0
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC and (out / "summary.md").is_file()
    assert "tiny resume check" in capsys.readouterr().out
    assert cli.main(["plot", str(tmp_path / "nothing")]) == 2


def test_missing_required_data_is_an_error(tmp_path, capsys):
    config = tmp_path / "needs_mnist.toml"
    config.write_text(TINY.replace('dataset = {name = "digits", train_size = 96, test_size = 32}',
                                   'dataset = "mnist"'))
    code = cli.main(["run", str(config), "--out", str(tmp_path / "r"), "--quiet",
                     "--data-dir", str(tmp_path / "absent")])
    assert code == 2
    err = capsys.readouterr().err
    assert "train-images-idx3-ubyte" in err and str(tmp_path / "absent") in err


def test_config_errors_name_the_field(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(TINY + "\n[smoke.panels.nope]\nepochs = 1\n")
    with pytest.raises(runner.ConfigError, match=r"\[smoke.panels\] names panels that do not exist"):
        runner.load(bad, "smoke")
    bad.write_text(TINY.replace('methods = ["MorGD"]', 'methods = ["MorGB"]'))
    with pytest.raises(runner.ConfigError, match="panels.pendulum.methods names unknown methods"):
        runner.load(bad)
    bad.write_text(TINY.replace("lr = [0.1, 0.3]", "lr = {pow2 = [3, 1]}"))
    with pytest.raises(runner.ConfigError, match="pow2 must be"):
        runner.load(bad)
    with pytest.raises(runner.ConfigError, match="no config 'nothing'"):
        runner.config.find("nothing", [tmp_path])


def test_atomic_writes_leave_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    store.write_json(path, {"a": 1.0, "b": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1.0, "b": None}

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        store.write_json(path, {"a": 2.0})
    assert json.loads(path.read_text()) == {"a": 1.0, "b": None}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


# -- usage errors, whole-config validation, file modes, partial results, every preset ---------------


@pytest.mark.parametrize("argv, option, value", [
    (["run", "tiny", "--out", "{file}"], "--out", "{file}"),
    (["plot", "runs/x", "--out", "{file}"], "--out", "{file}"),
    (["run", "tiny", "--device", "nonsense"], "--device", "'nonsense'"),
    (["demo", "--threads", "0"], "--threads", "'0'"),
    (["run", "tiny", "--threads", "two"], "--threads", "'two'"),
    (["list", "--experiments", "{missing}"], "--experiments", "{missing}"),
    (["run", "tiny", "--experiments", "{missing}"], "--experiments", "{missing}"),
])
def test_usage_errors_exit_2_naming_the_option_and_value(argv, option, value, tmp_path, capsys):
    paths = {"file": str(tmp_path / "a_file"), "missing": str(tmp_path / "nonexistent")}
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        cli.main([a.format(**paths) for a in argv])
    assert exit_.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("moreaugrad") and f"error: argument {option}: " in last
    assert value.format(**paths) in last


def test_a_run_into_a_file_is_refused(tiny, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(runner.RunMismatchError, match="is a file, not a folder"):
        runner.run_config(tiny, tmp_path / "a_file", log=lambda s: None)


@pytest.mark.parametrize("old, new, message", [
    ("alpha = 8.0", "alpha = [8.0, -1.0]", "methods.MorGD at {'alpha': -1.0}: Paper schedule: alpha"),
    ('rule = "moreau"', 'rule = "moreaux"', "methods.MorGD: method: rule must be one of"),
    ('optimizer = "step"\ngamma', 'optimizer = "stepp"\ngamma', "optimizer must be one of"),
    ("lr = [0.1, 0.3]", "lr = [0.1, -0.3]", "methods.SGD at {'lr': -0.3}"),
    ("momentum = 0.9", "momentun = 0.9", "unknown keys ['momentun']"),
    ("checkpoint_every = 2", "checkpoint_evry = 2", "panels.pendulum: unknown keys ['checkpoint_evry']"),
    ('name = "digits"', 'name = "digitz"', "panels.digits: dataset must be one of"),
    ("train_size = 96", "train_sise = 96", "panels.digits: dataset 'digits': unknown keys ['train_sise']"),
])
def test_a_bad_config_fails_before_the_first_job(old, new, message, tmp_path, capsys):
    """A bad value in the last method (or anywhere) stops the run before any job runs or any file is
    written."""
    assert old in TINY
    config = tmp_path / "bad.toml"
    config.write_text(TINY.replace(old, new))
    out = tmp_path / "run"
    assert cli.main(["run", str(config), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moreaugrad: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_files_get_the_users_umask(tmp_path):
    """Every file of a run (JSON, summary.md, PNGs) is 0o644 under a umask of 0o022, not mkstemp's 0600."""
    config = tmp_path / "pendulum.toml"
    config.write_text('name = "p"\n[panels.p]\nkind = "control"\nhorizon = 4\niterations = 2\n'
                      '[methods.GD]\nrule = "backprop"\nlr = 0.5\n')
    script = textwrap.dedent(f"""
        import os
        os.umask(0o022)
        from moreaugrad import runner
        runner.run_config({str(config)!r}, {str(tmp_path / 'run')!r}, log=lambda s: None)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    files = [p for p in (tmp_path / "run").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"run.json", "results.json", "summary.md", "loss.png", "p.GD.000.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {p.name: "0o644" for p in files}


def test_plot_works_on_a_run_in_progress_after_one_job(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        runner.run_config(tiny, out, callback=interrupt_at("digits.SGD.001", 1), log=lambda s: None)
    partial = store.read_json(out / "results.json")
    assert partial["status"] == "running" and [r["id"] for r in partial["jobs"]] == ["digits.SGD.000"]
    assert cli.main(["plot", str(out)]) == 0
    assert (out / "loss.png").read_bytes()[:8] == PNG_MAGIC
    assert "tiny resume check" in capsys.readouterr().out


def presets() -> set[str]:
    """The presets of ``mg.rules``: its functions that build a :class:`Rule` from their defaults."""
    import moreaugrad as mg

    names = set()
    for name in mg.rules.__all__:
        fn = getattr(mg.rules, name)
        if name[0].islower():
            try:
                built = fn()
            except TypeError:
                continue
            if isinstance(built, mg.rules.Rule):
                names.add(name)
    return names


ALL_RULES = """
name = "presets"
select = "final"
[panels.digits]
dataset = {name = "digits", train_size = 64, test_size = 32}
model = {kind = "mlp", hidden = [8]}
dtype = "float64"
epochs = 2
batch_size = 32
[methods.backprop]
rule = "backprop"
lr = 0.1
[methods.penalty_backprop]
rule = "penalty_backprop"
lr = 0.1
[methods.contrastive_backprop]
rule = "contrastive_backprop"
tau = 0.5
lr = 0.1
[methods.fenchel]
rule = "fenchel"
tau = [1e-3, 0.5]
lr = 0.1
[methods.fenchel_adaptive]
rule = "fenchel"
spacing = "adaptive"
tau = 0.1
tau_max = 10.0
lr = 0.1
[methods.moreau]
rule = "moreau"
gamma = 1.0
alpha = 0.1
[methods.proxprop]
rule = "proxprop"
optimizer = "sgd"
lr = 0.1
[methods.augmented_lagrangian]
rule = "augmented_lagrangian"
optimizer = "sgd"
lr = 0.1
[methods.target_prop]
rule = "target_prop"
optimizer = "sgd"
lr = 0.1
[methods.regularized_target_prop]
rule = "regularized_target_prop"
optimizer = "sgd"
lr = 0.1
"""


def test_every_preset_can_be_named_in_a_config(tmp_path):
    from moreaugrad.runner import methods

    assert set(methods.RULES) == presets()
    config = tmp_path / "presets.toml"
    config.write_text(ALL_RULES)
    results = runner.run_config(config, tmp_path / "run", log=lambda s: None)
    jobs = {r["id"]: r for r in results["jobs"]}
    assert {r["spec"]["rule"] for r in jobs.values()} == set(methods.RULES)
    assert not [r["id"] for r in jobs.values() if r["diverged"]]
    loss = {r["id"].split(".")[1] + r["id"][-1]: r["curves"]["loss"] for r in jobs.values()}
    # 004 Prop. 1: penalty back-propagation with tau = lr is gradient descent with step lr; the
    # contrastive reading of back-propagation has back-propagation's directions; Fenchel
    # back-propagation approaches them as its spacing goes to 0.
    assert loss["penalty_backprop0"] == pytest.approx(loss["backprop0"], rel=1e-10)
    assert loss["contrastive_backprop0"] == pytest.approx(loss["backprop0"], rel=1e-10)
    assert loss["fenchel0"] == pytest.approx(loss["backprop0"], rel=1e-3)
    assert loss["fenchel1"] != pytest.approx(loss["backprop0"], rel=1e-3)
    assert all(curve[-1] < curve[0] for curve in loss.values())


def test_preset_parameters_are_checked(tmp_path):
    from moreaugrad.runner import methods

    with pytest.raises(ValueError, match="tau"):
        methods.rule({"rule": "penalty_backprop", "lr": 0.0})
    with pytest.raises(ValueError, match="spacing must be one of"):
        methods.rule({"rule": "fenchel", "spacing": "adaptiv"})
    with pytest.raises(ValueError, match="tau"):
        methods.rule({"rule": "fenchel", "tau": -1.0})


def test_script_verdicts_show_in_list_and_seeds_need_the_placeholder(tmp_path, capsys):
    """`moreaugrad list` shows a script experiment's own verdict; `--seeds N` on a script config whose
    args do not pass ``{seeds}`` on is refused (exit 2) instead of running one seed."""
    runs = tmp_path / "runs"
    assert cli.main(["run", "002_fig1", "--smoke", "--out", str(runs / "002_fig1-smoke"), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["list", "--runs", str(runs)]) == 0
    printed = capsys.readouterr().out
    word = json.loads((runs / "002_fig1-smoke" / "results.json").read_text())["verdict"]["verdict"]
    assert "002_fig1-smoke [smoke, 1 seed, complete]" in printed and word in printed
    cfg = tmp_path / "script.toml"
    script = Path(cli.__file__).parents[2] / "experiments" / "fenchel" / "fig1.py"
    cfg.write_text(f'name = "s"\nkind = "script"\nscript = "{script}"\n'
                   f'args = ["--smoke", "--out", "{{out}}"]\n')
    assert cli.main(["run", str(cfg), "--seeds", "2", "--out", str(tmp_path / "o")]) == 2
    assert "do not pass {seeds} on" in capsys.readouterr().err
