"""Experiment configs: TOML files with a default (CPU) size and ``[smoke]``/``[full]`` overrides.

A config names the experiment, its panels (one problem each: a horizon of the pendulum, or a dataset
and a model) and its methods (an oracle and an optimizer). A method parameter written as a list, or
as ``{pow2 = [lo, hi]}`` (``2^lo .. 2^hi``), is a grid axis: every point of the grid is one job,
run on every panel that lists the method. The ``[smoke]`` and ``[full]`` tables are merged over the
file (tables merge key by key, everything else is replaced), so a scale changes only what it names.

    name = "000_fig3"
    kind = "control"
    [defaults]              # merged into every panel
    iterations = 100
    [panels.h50]
    horizon = 50
    [methods.MorGD]
    rule = "moreau"
    gamma = 0.5
    alpha = {pow2 = [0, 10]}
    optimizer = "step"
    [smoke.defaults]
    iterations = 3

Top-level keys: ``name``, ``title``, ``paper``, ``claim``, ``notes`` (text for ``summary.md``);
``kind`` (default panel kind); ``select`` (``"final"`` or ``"area"`` of the best-so-far curve of
``select_metric``, default ``"loss"``); ``table`` (``"grid"``: methods x ``table_axis`` values of the
final ``table_metric``; ``"selected"``: panels x methods' selected settings); ``plots`` (metrics to
draw) and ``x_axes`` (``"step"`` and/or ``"time"``); ``seeds`` (how many seeds to run, default 1;
``--seeds N`` overrides it; see ``runner.seeds``); ``verdict`` (the rule that turns the results into a
verdict on ``claim``; see ``runner.verdict``).

Panel keys: ``kind``, ``title``, ``methods`` (default all), ``enabled``, ``optional`` (skip when the
dataset's files are missing), ``diverge_above`` (a run whose objective exceeds it counts as diverged;
by default only a NaN or infinite value does), ``dtype``. Control: ``horizon``, ``iterations``,
``checkpoint_every``. Train: ``dataset`` (a name or ``{name, train_size, test_size, val_fraction,
...}``, 0 meaning the whole split), ``model`` (``{kind = "mlp" | "convnet" | "allcnn", hidden |
channels | widths, stages = "split" | "layer"}``), ``loss`` (``"cross_entropy"`` or ``"squared"``),
``l2``, ``epochs``, ``batch_size``, ``eval_batch``.

Method keys: ``rule`` (any preset of ``mg.rules``; see ``runner.methods.rule`` for how its
parameters are spelt) and its parameters, ``optimizer`` (``"step"``:
``Oracle.step``; ``"sgd"``, ``"adam"``: ``torch.optim`` on ``Oracle.backward``), ``lr``, ``momentum``,
``nesterov``, ``label``, ``enabled``.
"""

from __future__ import annotations

import copy
import itertools
import math
import sys
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

SCALES = ("smoke", "default", "full")
KINDS = ("control", "train")
SELECT = ("final", "area")
TABLES = ("none", "grid", "selected")
TOP_KEYS = {"name", "title", "paper", "claim", "notes", "kind", "script", "args", "select", "select_metric",
            "table", "table_axis", "table_metric", "plots", "x_axes", "defaults", "panels", "methods",
            "smoke", "full", "seeds", "verdict"}


class ConfigError(ValueError):
    """A config that cannot be run; the message names the file and the field."""


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` merged into a copy of ``base``: tables merge recursively, other values replace."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read(path: str | Path) -> dict[str, Any]:
    """Parse a TOML config file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as err:
        raise ConfigError(f"config {path} does not exist") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config {path}: not valid TOML ({err})") from err


def grid_values(owner: str, value: Any) -> list[Any] | None:
    """The grid a parameter spells (a list, or ``{pow2 = [lo, hi]}``), or None for a fixed value."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{owner}: a grid must not be empty")
        return list(value)
    if isinstance(value, dict) and set(value) == {"pow2"}:
        lo_hi = value["pow2"]
        if (not isinstance(lo_hi, list) or len(lo_hi) != 2 or not all(isinstance(v, int) for v in lo_hi)
                or lo_hi[0] > lo_hi[1]):
            raise ConfigError(f"{owner}: pow2 must be [lo, hi] with ints lo <= hi, got {lo_hi!r}")
        return [2.0 ** k for k in range(lo_hi[0], lo_hi[1] + 1)]
    return None


def fmt_value(v: Any) -> str:
    """``2^7`` for powers of two (beyond 1/4..4), ``%g`` otherwise."""
    if isinstance(v, float) and v > 0 and math.isfinite(v):
        k = math.log2(v)
        if k == round(k) and abs(k) > 2:
            return f"2^{int(k)}"
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass(frozen=True)
class Job:
    """One run: a panel, a method and one point of the method's grid."""

    id: str
    panel: str
    method: str
    params: dict[str, Any]     # the grid point (only the grid axes)
    spec: dict[str, Any]       # the method with the grid point filled in
    label: str


@dataclass
class Experiment:
    """A resolved config: one scale, panels with their defaults merged in, and the job list."""

    name: str
    scale: str
    config: dict[str, Any]
    panels: dict[str, dict[str, Any]]
    methods: dict[str, dict[str, Any]]
    jobs: list[Job] = field(default_factory=list)
    source: str = ""
    all_panels: list[str] = field(default_factory=list)   # the disabled ones too

    @property
    def title(self) -> str:
        return self.config.get("title", self.name)


@dataclass
class Script:
    """An experiment that is its own script (``kind = "script"``): ``moreaugrad run`` calls
    ``python SCRIPT ARGS`` with ``{seed}``, ``{seeds}``, ``{out}``, ``{device}`` and ``{data_dir}`` filled in.
    The script writes its own results; it is not resumed by the runner."""

    name: str
    scale: str
    config: dict[str, Any]
    path: Path
    args: list[str]
    source: str = ""

    @property
    def title(self) -> str:
        return self.config.get("title", self.name)

    def command(self, seed: int, out: Path, device: str, data_dir: Path | None, seeds: int = 1) -> list[str]:
        values = {"seed": seed, "seeds": seeds, "out": out, "device": device, "data_dir": data_dir or "data"}
        return [sys.executable, str(self.path), *(a.format(**values) for a in self.args)]


def resolve(raw: dict[str, Any], scale: str = "default", source: str = "<config>") -> Experiment | Script:
    """Apply a scale's overrides, merge the defaults into each panel and expand the grids into jobs."""
    if scale not in SCALES:
        raise ConfigError(f"{source}: scale must be one of {SCALES}, got {scale!r}")
    unknown = sorted(set(raw) - TOP_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {unknown}; known: {sorted(TOP_KEYS)}")
    if raw.get("kind") == "script":
        return _script(raw, scale, source)
    base = {k: v for k, v in raw.items() if k not in ("smoke", "full")}
    over = raw.get(scale, {}) if scale != "default" else {}
    if not isinstance(over, dict):
        raise ConfigError(f"{source}: [{scale}] must be a table")
    cfg = merge(base, {k: v for k, v in over.items() if k not in ("defaults", "panels")})
    name = cfg.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{source}: 'name' must be a non-empty string")
    for key, allowed in (("select", SELECT), ("table", TABLES)):
        if cfg.get(key, allowed[0]) not in allowed:
            raise ConfigError(f"{source}: {key} must be one of {allowed}, got {cfg[key]!r}")
    panels_raw, methods_raw = base.get("panels"), cfg.get("methods")
    if not isinstance(panels_raw, dict) or not panels_raw:
        raise ConfigError(f"{source}: needs at least one [panels.NAME] table")
    if not isinstance(methods_raw, dict) or not methods_raw:
        raise ConfigError(f"{source}: needs at least one [methods.NAME] table")
    extra = sorted(set(over.get("panels", {})) - set(panels_raw))
    if extra:
        raise ConfigError(f"{source}: [{scale}.panels] names panels that do not exist: {extra}")
    seeds = cfg.get("seeds", 1)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise ConfigError(f"{source}: seeds must be an integer >= 1, got {seeds!r}")
    methods = {m: spec for m, spec in methods_raw.items() if spec.get("enabled", True)}
    panels: dict[str, dict[str, Any]] = {}
    for pname, spec in panels_raw.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"{source}: panels.{pname} must be a table")
        # Base defaults, the panel, then the scale's defaults and the scale's panel: a scale's
        # [defaults] overrides every panel, so [smoke.defaults] epochs = 1 shrinks them all.
        p: dict[str, Any] = {}
        layers = (base.get("defaults", {}), spec, over.get("defaults", {}),
                  over.get("panels", {}).get(pname, {}))
        for layer in layers:
            p = merge(p, _normalize(layer))
        if not p.get("enabled", True):
            continue
        p.setdefault("kind", cfg.get("kind", "train"))
        if p["kind"] not in KINDS:
            raise ConfigError(f"{source}: panels.{pname}.kind must be one of {KINDS}, got {p['kind']!r}")
        if p["kind"] != "train":
            p.pop("dataset", None)
        p.setdefault("title", pname)
        listed = p.get("methods", list(methods))
        bad = [m for m in listed if m not in methods_raw]
        if bad:
            raise ConfigError(f"{source}: panels.{pname}.methods names unknown methods {bad}; "
                              f"defined: {sorted(methods_raw)}")
        p["methods"] = [m for m in listed if m in methods]
        panels[pname] = p
    cfg.pop("defaults", None)
    cfg["panels"] = panels

    exp = Experiment(name=name, scale=scale, config=cfg, panels=panels, methods=methods, source=source,
                     all_panels=list(panels_raw))
    for pname, p in panels.items():
        for m in p["methods"]:
            exp.jobs.extend(_expand(source, pname, m, methods[m]))
    if not exp.jobs:
        raise ConfigError(f"{source}: no jobs at scale {scale!r} (every panel or method disabled?)")
    return exp


def _script(raw: dict[str, Any], scale: str, source: str) -> Script:
    cfg = {k: v for k, v in raw.items() if k not in ("smoke", "full")}
    if scale != "default":
        cfg = merge(cfg, raw.get(scale, {}))
    if not isinstance(cfg.get("script"), str):
        raise ConfigError(f"{source}: a script config needs script = \"path/relative/to/the/config.py\"")
    path = (Path(source).parent / cfg["script"]).resolve()
    if not path.is_file():
        raise ConfigError(f"{source}: script {path} does not exist")
    args = cfg.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ConfigError(f"{source}: args must be a list of strings")
    return Script(name=cfg.get("name", path.stem), scale=scale, config=cfg, path=path, args=args,
                  source=source)


def _normalize(layer: dict[str, Any]) -> dict[str, Any]:
    """A panel layer with ``dataset = "digits"`` spelled as ``{name = "digits"}`` so that layers merge."""
    if isinstance(layer.get("dataset"), str):
        return {**layer, "dataset": {"name": layer["dataset"]}}
    return layer


def _expand(source: str, panel: str, method: str, spec: dict[str, Any]) -> list[Job]:
    if "rule" not in spec:
        raise ConfigError(f"{source}: methods.{method} needs a 'rule'")
    axes = {}
    for k, v in spec.items():
        g = grid_values(f"{source}: methods.{method}.{k}", v)
        if g is not None:
            axes[k] = g
    jobs = []
    for i, point in enumerate(itertools.product(*axes.values())):
        params = dict(zip(axes, point, strict=True))
        filled = {**spec, **params}
        label = spec.get("label", method)
        if params:
            label += " (" + ", ".join(f"{k}={fmt_value(v)}" for k, v in params.items()) + ")"
        jobs.append(Job(id=f"{panel}.{method}.{i:03d}", panel=panel, method=method, params=params,
                        spec=filled, label=label))
    return jobs


def find(config: str | Path, search: list[Path]) -> Path:
    """A config given as a path, or by name (``000_fig3``) in one of the ``search`` folders."""
    path = Path(config)
    if path.is_file():
        return path
    for folder in search:
        for cand in (folder / config, folder / f"{config}.toml"):
            if cand.is_file():
                return cand
    where = ", ".join(str(f) for f in search) or "(no experiments folder found)"
    raise ConfigError(f"no config {config!r}: not a file, and no {config}.toml in {where}; "
                      f"`moreaugrad list` shows the experiments")


def seed_for(seed: int, *keys: str) -> int:
    """A seed derived from the run's seed and names (stable across Python processes)."""
    return (seed * 1_000_003 + zlib.crc32("/".join(keys).encode())) % (2 ** 63 - 1)
