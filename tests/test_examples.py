"""Every script in ``examples/`` runs at its small size and writes its figure (the gallery of the docs).

Each runs in its own interpreter, as a user would run it, with one thread: the examples' models are
small enough that threads only add contention on a busy CI machine.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))
TIMEOUT_S = 120  # each takes < 20 s at small size on 2 CPU cores


def test_examples_exist():
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs_at_small_size_and_writes_its_figure(script, tmp_path):
    env = {**os.environ, "MOREAUGRAD_EXAMPLE_SIZE": "small", "MOREAUGRAD_EXAMPLE_OUT": str(tmp_path),
           "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(script)], cwd=script.parents[1], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-4000:]
    figure = tmp_path / f"{script.stem}.png"
    assert figure.is_file() and figure.stat().st_size > 1000, sorted(p.name for p in tmp_path.iterdir())
