"""MkDocs hooks: the gallery, and Sphinx roles in docstrings.

Gallery: run every ``examples/*.py`` and turn it into a page (code, output, figure).

Each example runs in its own interpreter at ``MOREAUGRAD_EXAMPLE_SIZE`` (default ``small``), writes
its figure ``<name>.png`` into a temporary folder, and gets a generated page ``gallery/<name>.md``
with its docstring, the command to run it, its figure, its printed output and its source. An
example that fails, or writes no figure, fails the build. The Gallery section of the navigation is
filled from the folder, so a new example needs no edit here or in ``mkdocs.yml``.

Roles: the library's docstrings cite names as Sphinx roles (``:class:`~moreaugrad.Chain```), which
Markdown renders as ``:class:<code>~moreaugrad.Chain</code>``; :func:`on_page_content` shows them as
code (``Chain``: a leading ``~`` keeps the last component, as Sphinx does).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

from mkdocs.exceptions import PluginError
from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
TIMEOUT_S = 300
ROLE = re.compile(r":(?:class|func|meth|mod|attr|data|exc|obj):<code>(~?)([^<]*)</code>")


def _title(script: Path) -> tuple[str, str]:
    doc = ast.get_docstring(ast.parse(script.read_text())) or script.stem
    head, _, body = doc.partition("\n")
    return head.strip().rstrip("."), body.strip()


def on_config(config):
    """Fill the Gallery section of the navigation: the index, then one page per example."""
    pages = ["gallery/index.md"] + [{_title(s)[0]: f"gallery/{s.stem}.md"} for s in EXAMPLES]
    for i, entry in enumerate(config["nav"] or []):
        if isinstance(entry, dict) and "Gallery" in entry:
            config["nav"][i] = {"Gallery": pages}
    return config


def _run(out: Path, script: Path) -> tuple[Path, float, str]:
    env = {**os.environ, "MOREAUGRAD_EXAMPLE_OUT": str(out), "MPLBACKEND": "Agg"}
    env.setdefault("MOREAUGRAD_EXAMPLE_SIZE", "small")
    env.setdefault("OMP_NUM_THREADS", "1")  # small models: threads only add contention

    start = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        raise PluginError(f"gallery: examples/{script.name} took more than {TIMEOUT_S} s") from e
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise PluginError(f"gallery: examples/{script.name} failed (exit {proc.returncode}):\n"
                          f"{proc.stderr[-4000:]}")
    if not (out / f"{script.stem}.png").is_file():
        raise PluginError(f"gallery: examples/{script.name} wrote no {script.stem}.png")
    return script, seconds, proc.stdout


def _page(script: Path, seconds: float, stdout: str, size: str) -> str:
    title, body = _title(script)
    source = script.read_text().rstrip()
    output = f"```text\n{stdout.rstrip()}\n```\n\n" if stdout.strip() else ""
    return (f"# {title}\n\n{body}\n\n"
            f"Run it from the repository root: `python examples/{script.name}` (size `small`, seconds;"
            f" `MOREAUGRAD_EXAMPLE_SIZE=full` for the full size). The figure and output below come "
            f"from the `{size}` run made when this page was built ({seconds:.1f} s).\n\n"
            f"![{title}]({script.stem}.png)\n\n{output}"
            f"```python\n{source}\n```\n")


def on_files(files: Files, config) -> Files:
    size = os.environ.get("MOREAUGRAD_EXAMPLE_SIZE", "small")
    with tempfile.TemporaryDirectory(prefix="moreaugrad-gallery-") as tmp:
        out = Path(tmp)
        if os.environ.get("MOREAUGRAD_DOCS_SKIP_EXAMPLES"):  # only while writing pages: never in CI
            results = [(script, 0.0, None) for script in EXAMPLES]
        else:
            with ThreadPoolExecutor(max(1, min(2, os.cpu_count() or 1))) as pool:
                results = list(pool.map(partial(_run, out), EXAMPLES))
        rows = []
        for script, seconds, stdout in results:
            title, _ = _title(script)
            if stdout is None:
                page = f"# {title}\n\nNot run in this build (`MOREAUGRAD_DOCS_SKIP_EXAMPLES`).\n"
            else:
                page = _page(script, seconds, stdout, size)
                png = (out / f"{script.stem}.png").read_bytes()
                files.append(File.generated(config, f"gallery/{script.stem}.png", content=png))
            files.append(File.generated(config, f"gallery/{script.stem}.md", content=page))
            rows.append(f"| [{title}]({script.stem}.md) | `examples/{script.name}` | {seconds:.1f} s |")
            print(f"gallery: examples/{script.name} ({size}) {seconds:.1f} s", file=sys.stderr)
    index = ["# Gallery", "",
             "Short scripts in the repository's `examples/` folder. Each one runs at a small size by "
             "default (seconds on a CPU; this is what CI and `make docs` run) and at the paper-like "
             "size with `MOREAUGRAD_EXAMPLE_SIZE=full`, and writes its figure into "
             "`MOREAUGRAD_EXAMPLE_OUT` (default `examples/output`). They are rerun at every build of "
             "these pages, and `tests/test_examples.py` runs them under `make test`.", "",
             "| example | script | time (this build) |", "| --- | --- | --- |", *rows, ""]
    files.append(File.generated(config, "gallery/index.md", content="\n".join(index)))
    return files


def on_page_content(html: str, page, config, files) -> str:
    return ROLE.sub(lambda m: f"<code>{m[2].rsplit('.', 1)[-1] if m[1] else m[2]}</code>", html)
