"""The run folder: atomic writes of JSON, text and checkpoints, and their reading back.

Every file is written to a temporary name in the same folder, flushed to disk and moved over the
target with ``os.replace``, so a kill at any moment leaves either the old file or the new one. Files
get the mode of an ordinary ``open``: ``0o666`` less the user's umask (``mkstemp`` alone gives 0600).

    RUN/run.json            what the run is (config, scale, seed, device): a resume must match it
    RUN/jobs/ID.json        one finished job (curves, selection score)
    RUN/state/ID.pt         the checkpoint of the job in progress (removed when it finishes)
    RUN/results.json        everything so far; "status" is "running" until the last job is done
    RUN/summary.md, *.png   written when the run completes (``moreaugrad plot RUN`` redraws them)
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return mask


FILE_MODE = 0o666 & ~_umask()


def _atomic(path: Path, write: Any, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def clean(obj: Any) -> Any:
    """JSON-safe copy: non-finite floats become None (JSON has no NaN), tuples become lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


def write_json(path: Path, obj: Any) -> None:
    text = json.dumps(clean(obj), indent=1, allow_nan=False) + "\n"
    _atomic(Path(path), lambda f: f.write(text), "w")


def write_text(path: Path, text: str) -> None:
    _atomic(Path(path), lambda f: f.write(text), "w")


def read_json(path: Path) -> Any:
    with Path(path).open() as f:
        return json.load(f)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    _atomic(Path(path), lambda f: torch.save(state, f), "wb")


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    path = Path(path)
    if not path.is_file():
        return None
    # Only tensors and plain containers are stored: load without unpickling arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def save_figure(fig: Any, path: Path) -> None:
    _atomic(Path(path), lambda f: fig.savefig(f, format="png", dpi=120, bbox_inches="tight"), "wb")
