"""Issue 14: several seeds (per-seed runs, mean +- spread, ties), a verdict per claim, the pendulum's
discretisation in a config, and the method keys ``beta_gamma`` and ``per_output``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import moreaugrad as mg
from moreaugrad import cli, runner
from moreaugrad.runner import methods, seeds, verdict

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "experiments").glob("*.toml"))

TINY = """
name = "tiny_seeds"
title = "tiny seeds check"
claim = "SGD beats Adam."
select = "final"
[verdict]
differs = "everything"
[[verdict.checks]]
check = "better"
method = "SGD"
than = "Adam"
[[verdict.checks]]
check = "selected"
method = "SGD"
param = "lr"
expected = {digits = 0.3}
[[verdict.checks]]
check = "stable"
method = "SGD"
min = 0.1
expect = "trains"
[panels.digits]
dataset = {name = "digits", train_size = 64, test_size = 32}
model = {kind = "mlp", hidden = [8]}
epochs = 2
batch_size = 32
[methods.SGD]
rule = "backprop"
optimizer = "sgd"
lr = [0.1, 0.3]
[methods.Adam]
rule = "backprop"
optimizer = "adam"
lr = 0.01
"""


@pytest.fixture(autouse=True)
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(TINY)
    return path


def test_two_seeds_give_per_seed_curves_and_mean_spread(tiny, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["run", str(tiny), "--smoke", "--seeds", "2", "--out", str(out), "--quiet"]) == 0
    per = [json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [p["seed"] for p in per] == [0, 1]
    res = json.loads((out / "results.json").read_text())
    assert res["seeds"] == [0, 1] and res["seed_dirs"] == ["seed-0", "seed-1"]
    assert [r["id"] for r in res["jobs"]] == [r["id"] for r in per[0]["jobs"]]
    for rec in res["jobs"]:
        mine = [{r["id"]: r for r in p["jobs"]}[rec["id"]] for p in per]
        assert [s["seed"] for s in rec["per_seed"]] == [0, 1]
        for metric in ("loss", "test_accuracy"):
            a, b = (m["best"][metric] for m in mine)
            assert [s["best"][metric] for s in rec["per_seed"]] == [a, b]
            assert rec["best"][metric] == pytest.approx([(x + y) / 2 for x, y in zip(a, b, strict=True)])
            assert rec["spread"][metric] == pytest.approx([abs(x - y) / math.sqrt(2)
                                                           for x, y in zip(a, b, strict=True)])
        assert rec["score"] == pytest.approx((mine[0]["score"] + mine[1]["score"]) / 2)
    # The two seeds differ (data split, initialisation, batch order), so there is a spread.
    assert any(v > 0 for r in res["jobs"] for v in r["spread"]["loss"])
    best = min((r for r in res["jobs"] if r["method"] == "SGD"), key=lambda r: r["score"])
    assert res["selected"]["digits"]["SGD"] == best["id"]
    summary = (out / "summary.md").read_text()
    assert "2 seeds (0, 1" in summary and " +- " in summary
    row = next(ln for ln in summary.splitlines() if ln.startswith("| digits | SGD |"))
    m, s = best["best"]["loss"][-1], best["spread"]["loss"][-1]
    assert f"{m:.4g} +- {s:.2g}" in row
    assert "## Verdict" in summary and "Settings that differ from the paper: everything" in summary
    assert (out / "loss.png").is_file() and (out / "test_accuracy.png").is_file()
    assert "verdict: " in capsys.readouterr().out
    # Rerunning resumes every seed (nothing to do) and gives the same aggregate.
    again = runner.run_config(tiny, out, scale="smoke", n_seeds=2, log=lambda s: None)
    assert [r["best"] for r in again["jobs"]] == [r["best"] for r in res["jobs"]]


def test_seeds_key_in_config_and_bad_values(tiny, tmp_path):
    tiny.write_text(TINY.replace('select = "final"', 'select = "final"\nseeds = 2'))
    assert runner.load(tiny).config["seeds"] == 2
    tiny.write_text(TINY.replace('select = "final"', 'select = "final"\nseeds = 0'))
    with pytest.raises(runner.ConfigError, match="seeds must be an integer >= 1, got 0"):
        runner.load(tiny)
    with pytest.raises(ValueError, match="seeds"):
        seeds.seed_list(0, 0)


def test_single_seed_folder_is_not_reused_for_several(tiny, tmp_path):
    runner.run_config(tiny, tmp_path / "r", log=lambda s: None)
    with pytest.raises(runner.RunMismatchError, match="single-seed run"):
        runner.run_config(tiny, tmp_path / "r", n_seeds=2, log=lambda s: None)


# -- ties and verdicts, on results written by hand ------------------------------------------------


def _rec(jid, panel, method, loss, spread, params=None, diverged=0, n=3):
    return {"id": jid, "panel": panel, "method": method, "label": method, "params": params or {},
            "spec": {}, "diverged": diverged > 0, "diverged_seeds": diverged, "error": None,
            "best": {"loss": [10.0, loss]}, "spread": {"loss": [0.0, spread]},
            "final": {"loss": loss}, "final_spread": {"loss": spread}, "score": None if diverged else loss}


def _results(jobs, checks, scale="default", n=3):
    panels = sorted({r["panel"] for r in jobs})
    meths = sorted({r["method"] for r in jobs})
    res = {"scale": scale, "seeds": list(range(n)), "seed": 0, "jobs": jobs,
           "config": {"methods": {m: {} for m in meths}, "verdict": {"checks": checks, "differs": "x"}},
           "panels": {p: {"methods": meths, "skipped": None} for p in panels}}
    res["selected"] = seeds.select(res)
    return res


BETTER = [{"check": "better", "method": "A", "than": "B"}]


@pytest.mark.parametrize("a, sa, b, sb, word, status", [
    (1.0, 0.1, 2.0, 0.1, "better", "pass"),
    (1.0, 0.6, 2.0, 0.5, "tie", "partial"),    # |1 - 2| <= 0.6 + 0.5: inside the spread
    (2.0, 0.1, 1.0, 0.1, "worse", "fail"),
    (1.0, 0.0, 1.1, 0.0, "better", "pass"),    # no spread (one seed): any difference counts
])
def test_better_is_a_tie_inside_the_spread(a, sa, b, sb, word, status):
    res = _results([_rec("p.A.000", "p", "A", a, sa), _rec("p.B.000", "p", "B", b, sb)], BETTER)
    v = verdict.verdict(res)
    assert f"p: {word}" in v.evidence[0] and v.evidence[0].startswith(f"[{status}]")
    words = {"pass": "reproduced", "partial": "partly reproduced", "fail": "not reproduced"}
    assert v.verdict == words[status]


def test_verdict_combines_checks_and_says_what_it_could_not_test():
    jobs = [_rec("p.A.000", "p", "A", 1.0, 0.1, {"lr": 0.5}),
            _rec("p.A.001", "p", "A", 3.0, 0.1, {"lr": 4.0}),
            _rec("p.A.002", "p", "A", 0, 0, {"lr": 8.0}, diverged=3),
            _rec("p.B.000", "p", "B", 2.0, 0.1)]
    checks = BETTER + [{"check": "selected", "method": "A", "param": "lr", "expected": {"p": 1.0}}]
    res = _results(jobs, checks)
    assert res["selected"]["p"]["A"] == "p.A.000"
    v = verdict.verdict(res)
    assert v.verdict == "partly reproduced"
    assert "p 0.5 (paper 1)" in v.evidence[1] and v.evidence[1].startswith("[fail]")
    res = _results(jobs, checks[:1] + [dict(checks[1], factor=2.0)])
    assert verdict.verdict(res).verdict == "reproduced"
    stable = [{"check": "stable", "method": "A", "param": "lr", "min": 4.0, "expect": "diverges"}]
    v = verdict.verdict(_results(jobs, stable))
    assert v.verdict == "not reproduced" and "1/2 steps diverged" in v.evidence[0]
    v = verdict.verdict(_results(jobs, [dict(stable[0], min=8.0)]))
    assert v.verdict == "reproduced"
    v = verdict.verdict(_results(jobs, [dict(stable[0], min=8.0, expect="trains")]))
    assert v.verdict == "not reproduced"
    # No panel ran the methods a check names, or no rule at all: not testable here.
    v = verdict.verdict(_results(jobs, [{"check": "selected", "method": "A", "param": "lr",
                                         "expected": {"q": 1.0}}]))
    assert v.verdict == "not testable here"
    res = _results(jobs, [])
    assert verdict.verdict(res).verdict == "not testable here"
    assert "smoke scale" in verdict.verdict(_results(jobs, BETTER, scale="smoke")).line()


def test_verdict_rules_are_validated():
    with pytest.raises(ValueError, match=r"checks\[0\]: check must be one of"):
        verdict.validate({"checks": [{"check": "wins"}]}, {"A"}, {"p"}, "cfg")
    with pytest.raises(ValueError, match="than 'C' is not a method"):
        verdict.validate({"checks": [{"check": "better", "method": "A", "than": "C"}]}, {"A"}, {"p"}, "cfg")
    with pytest.raises(ValueError, match="panels"):
        verdict.validate({"checks": [{"check": "selected", "method": "A", "param": "lr",
                                      "expected": {"q": 1}}]}, {"A"}, {"p"}, "cfg")


@pytest.mark.parametrize("config", CONFIGS, ids=[c.stem for c in CONFIGS])
def test_every_config_states_a_verdict_rule(config):
    """Every runner config names checks on its own methods and panels, at every scale."""
    for scale in ("smoke", "default", "full"):
        exp = runner.load(config, scale)
        if isinstance(exp, runner.config.Script):
            continue
        spec = exp.config.get("verdict")
        assert spec and (spec.get("checks") or spec.get("untestable")), f"{config.stem}: no verdict rule"
        verdict.validate(spec, set(exp.config["methods"]), set(exp.all_panels), str(config))


def test_list_shows_the_verdicts_of_present_runs(tiny, tmp_path, capsys):
    runner.run_config(tiny, tmp_path / "runs" / "t", n_seeds=2, log=lambda s: None)
    exp_dir = tmp_path / "exps"
    exp_dir.mkdir()
    (exp_dir / "tiny.toml").write_text(TINY)
    assert cli.main(["list", "--experiments", str(exp_dir), "--runs", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.strip().startswith("t [default, 2 seeds, complete]:"))
    assert any(w in line for w in verdict.VERDICTS)


# -- the pendulum's discretisation and the new method keys in a config ----------------------------


def test_control_panel_takes_discretization_and_x0(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text("""
name = "p"
kind = "control"
[panels.semi]
horizon = 5
iterations = 1
discretization = "semi_implicit"
x0 = [1.5, 0.0]
[methods.GD]
rule = "backprop"
lr = 0.01
""")
    res = runner.run_config(path, tmp_path / "r", log=lambda s: None)
    p = mg.control.Pendulum(horizon=5, discretization="semi_implicit", x0=(1.5, 0.0))
    assert res["jobs"][0]["curves"]["loss"][0] == pytest.approx(p.objective(p.chain()()).item(), rel=1e-15)
    assert res["panels"]["semi"]["discretization"] == "semi_implicit"
    path.write_text(path.read_text().replace("semi_implicit", "euler"))
    with pytest.raises(runner.ConfigError, match="discretization must be one of"):
        runner.run_config(path, tmp_path / "r2", log=lambda s: None)


def test_beta_gamma_sets_beta():
    r = methods.rule({"rule": "augmented_lagrangian", "alpha": 2.0, "rho": 0.5, "beta_gamma": 0.5})
    assert (r.weight.gamma, r.weight.beta, r.weight.alpha) == pytest.approx((1.0, 0.5, 2.0))
    with pytest.raises(ValueError, match="beta or beta_gamma"):
        methods.rule({"rule": "augmented_lagrangian", "beta": 1.0, "beta_gamma": 1.0})


def test_per_output_names_the_blockwise_cg():
    if "per_output" not in mg.lstsq.CG.__dataclass_fields__:
        pytest.skip("mg.lstsq.CG has no per_output yet")
    m = methods._method({"rule": "proxprop", "cg": 3, "per_output": True})
    assert m == mg.lstsq.CG(3, per_output=True)
    with pytest.raises(ValueError, match="per_output must be true or false"):
        methods._method({"rule": "proxprop", "cg": 3, "per_output": 1})


def test_solver_names_the_papers_two_quasi_newton_steps():
    """``solver = "paper"`` gives 000 App. E.2.1's two quasi-Newton steps to the generic
    subproblems (AL-MSGD with layers as stages, 000 Table 2); a rule without one refuses it."""
    r = methods.rule({"rule": "augmented_lagrangian", "alpha": 2.0, "rho": 0.5, "beta": 0.1,
                      "solver": "paper"})
    assert r.state.solver == mg.solvers.QuasiNewton(tol=None, max_iter=2)
    assert methods.rule({"rule": "moreau", "solver": "lbfgs"}).state.solver == mg.solvers.LBFGS(
        tol=1e-8, max_iter=100)
    default = mg.rules.augmented_lagrangian().state.solver
    assert methods.rule({"rule": "augmented_lagrangian"}).state.solver == default
    with pytest.raises(ValueError, match="solver must be one of"):
        methods.rule({"rule": "augmented_lagrangian", "solver": "newton"})
    with pytest.raises(ValueError, match="solver applies to"):
        methods.rule({"rule": "proxprop", "solver": "paper"})
