"""Smoke test of the benchmark suite (benchmarks/, issue 16): it runs, writes its table and JSON, and
its memory measurement counts a known allocation exactly. It asserts no time."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a folder of the repository, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import suite  # noqa: E402
from benchmarks.memory import peak_bytes  # noqa: E402


def test_cpu_peak_memory_counts_a_known_allocation():
    def toy():
        a = torch.empty(1000, 1000)  # 4e6 bytes
        b = torch.empty(500, 1000)  # 2e6 bytes: 6e6 live here
        del a
        c = torch.empty(250, 1000)  # 1e6 bytes: 3e6 live
        return b, c

    assert peak_bytes(toy, torch.device("cpu")) == 6_000_000


def test_quick_run_writes_table_and_json(tmp_path):
    out = tmp_path / "bench"
    threads, state = torch.get_num_threads(), torch.get_rng_state()
    result = suite.main(["--quick", "--threads", "1", "--only", "mlp256", "--only", "fenchel",
                         "--out", str(out)])
    text = (out / "table.md").read_text()
    data = json.loads((out / "results.json").read_text())
    presets = [r["preset"] for r in data["rows"]]
    # The plain backward and the backprop oracle are always timed (the ratios' denominators).
    assert presets == [suite.PLAIN, "backprop", "fenchel"]
    for r in data["rows"]:
        assert r["status"] == "ok", r["error"]
        assert len(r["times_s"]) == data["meta"]["reps"] >= 5
        for key in ("time_ratio", "vs_backprop", "memory_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["preset"], key, r[key])
        assert r["peak_bytes"] > 0
        assert r["preset"] in text
    fenchel = data["rows"][2]
    assert fenchel["target"]["limit"] == 1.1 and fenchel["target"]["met"] in (True, False)
    assert result["rows"] == data["rows"]
    # An in-process run leaves the thread count and the random generator as it found them.
    assert torch.get_num_threads() == threads and torch.equal(torch.get_rng_state(), state)


def test_a_preset_that_raises_is_a_row_not_a_crash(tmp_path, monkeypatch):
    from benchmarks import presets

    def broken(model):
        raise NotImplementedError("no rule for this stage")

    monkeypatch.setattr(presets, "PRESETS", [presets.Preset("broken", broken)])
    monkeypatch.setattr(suite, "PRESETS", presets.PRESETS)
    data = suite.main(["--quick", "--threads", "1", "--only", "pendulum", "--out", str(tmp_path)])
    row = next(r for r in data["rows"] if r["preset"] == "broken")
    assert row["status"] == "error" and row["error"].startswith("NotImplementedError")
    assert "raises NotImplementedError" in data["table"]


def test_a_preset_past_its_budget_is_stopped_and_reported(tmp_path, monkeypatch):
    import time

    from benchmarks import presets

    class Sleepy(presets.Preset):
        def call(self, model, work):
            return lambda: time.sleep(30 if model.id == "pendulum" else 0)

    monkeypatch.setattr(suite, "PRESETS", [Sleepy("sleepy", lambda m: None)])
    data = suite.main(["--quick", "--threads", "1", "--only", "pendulum", "--budget", "1",
                       "--budget-floor", "0.05", "--no-memory", "--out", str(tmp_path)])
    row = next(r for r in data["rows"] if r["preset"] == "sleepy")
    assert row["status"] == "slow" and row["times_s"] == []
    assert "skipped: one call took more than" in data["table"]


def test_reps_below_five_are_refused():
    with pytest.raises(SystemExit):
        suite.parse(["--reps", "3"])
