"""Classification datasets as tensors: digits and MNIST-1D (generated locally), MNIST and CIFAR-10
(read from a folder the caller names), with seeded splits and normalisation by training statistics.

Nothing is downloaded. scikit-learn and ``mnist1d`` are imported only when their dataset is asked for
(they belong to the ``experiments`` extra).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .formats import read_cifar_batch, read_idx

NORMALIZATIONS = ("channel", "none")

MNIST_FILES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}
CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"


class MissingDataError(FileNotFoundError):
    """A dataset folder or file that is not there; the message lists what was expected and where."""


@dataclass(frozen=True)
class Dataset:
    """A classification dataset split into train, validation and test tensors.

    Inputs keep their natural shape (``(N, C, H, W)`` for images, ``(N, C, L)`` for signals); labels
    are ``int64`` class indices. ``stats`` holds the per-channel mean and std used to normalise
    (computed on the training split only).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: int
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one input, without the batch dimension."""
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Dataset:
        """Move every split to ``device`` and the inputs to ``dtype`` (labels stay int64)."""
        xs = {k: getattr(self, k).to(device=device, dtype=dtype) for k in ("x_train", "x_val", "x_test")}
        ys = {k: getattr(self, k).to(device=device) for k in ("y_train", "y_val", "y_test")}
        return replace(self, **xs, **ys)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.y_train), "val": len(self.y_val), "test": len(self.y_test)}


# -- splits and normalisation -------------------------------------------------------------------


def split_indices(n: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """A seeded random partition of ``range(n)`` into ``len(fractions) + 1`` parts: part ``i`` gets
    ``round(fractions[i] * n)`` indices, the last part the rest (each part in random order, so that
    its first ``k`` indices are a random subset).

    Raises:
        ValueError: if a fraction is outside ``[0, 1)`` or they sum to 1 or more.
    """
    for f in fractions:
        if not 0 <= f < 1:
            raise ValueError(f"split_indices: fractions must lie in [0, 1), got {list(fractions)}")
    if sum(fractions) >= 1:
        raise ValueError(f"split_indices: fractions must sum to less than 1, got {list(fractions)}")
    perm = np.random.default_rng(seed).permutation(n)
    parts, start = [], 0
    for f in fractions:
        k = int(round(f * n))
        parts.append(perm[start:start + k])
        start += k
    parts.append(perm[start:])
    return parts


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of each channel (axis 1) over all other axes; a constant
    channel gets std 1 so that normalising never divides by 0."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    mean = x.mean(axis=axes, dtype=np.float64)
    std = x.std(axis=axes, dtype=np.float64)
    return mean, np.where(std > 0, std, 1.0)


def _normalize(parts: dict[str, np.ndarray], mode: str) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    if mode not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {NORMALIZATIONS}, got {mode!r}")
    if mode == "none":
        return {k: v.astype(np.float64) for k, v in parts.items()}, {"normalize": "none"}
    mean, std = channel_stats(parts["x_train"].astype(np.float64))
    shape = (1, -1) + (1,) * (parts["x_train"].ndim - 2)
    out = {k: (v.astype(np.float64) - mean.reshape(shape)) / std.reshape(shape) for k, v in parts.items()}
    return out, {"normalize": "channel", "mean": mean.tolist(), "std": std.tolist()}


def _check_fraction(owner: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < 1:
        raise ValueError(f"{owner}: {name} must be a number in [0, 1), got {value!r}")


def _check_size(owner: str, name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{owner}: {name} must be None or an int >= 1, got {value!r}")


def _build(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
           classes: int, seed: int, val_fraction: float, normalize: str, train_size: int | None,
           test_size: int | None, dtype: torch.dtype, scale: float = 1.0) -> Dataset:
    """Split a validation set off the training set (seeded), cap the sizes, normalise, make tensors."""
    _check_fraction(name, "val_fraction", val_fraction)
    _check_size(name, "train_size", train_size)
    _check_size(name, "test_size", test_size)
    val, rest = split_indices(len(y_train), [val_fraction], seed)
    if train_size is not None:
        rest = rest[:train_size]
    test = np.arange(len(y_test)) if test_size is None else np.arange(min(test_size, len(y_test)))
    parts = {"x_train": x_train[rest] * scale, "x_val": x_train[val] * scale, "x_test": x_test[test] * scale}
    parts, stats = _normalize(parts, normalize)
    labels = {"y_train": y_train[rest], "y_val": y_train[val], "y_test": y_test[test]}
    tensors = {k: torch.as_tensor(v, dtype=dtype) for k, v in parts.items()}
    tensors.update({k: torch.as_tensor(np.asarray(v, dtype=np.int64)) for k, v in labels.items()})
    return Dataset(name=name, classes=classes, stats={**stats, "seed": seed}, **tensors)


# -- the datasets -------------------------------------------------------------------------------


def digits(seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.2, normalize: str = "channel",
           train_size: int | None = None, test_size: int | None = None,
           dtype: torch.dtype = torch.float32) -> Dataset:
    """scikit-learn's digits: 1797 grey 8x8 images of 10 classes, shape ``(N, 1, 8, 8)``.

    There is no official test split: ``test_fraction`` of the images are held out (seeded), then
    ``val_fraction`` of the rest.
    """
    from sklearn.datasets import load_digits

    _check_fraction("digits", "test_fraction", test_fraction)
    bunch = load_digits()
    x = bunch.images.astype(np.float64)[:, None]
    y = bunch.target.astype(np.int64)
    test, train = split_indices(len(y), [test_fraction], seed + 7919)
    return _build("digits", x[train], y[train], x[test], y[test], 10, seed, val_fraction, normalize,
                  train_size, test_size, dtype, scale=1 / 16)


def mnist1d(seed: int = 0, val_fraction: float = 0.1, normalize: str = "channel",
            train_size: int | None = None, test_size: int | None = None, num_samples: int = 5000,
            generator_seed: int = 42, dtype: torch.dtype = torch.float32) -> Dataset:
    """MNIST-1D (Greydanus 2020): 1-D signals of length 40 in 10 classes, shape ``(N, 1, 40)``,
    generated locally by ``mnist1d.data.make_dataset`` (never downloaded).

    ``generator_seed`` fixes the generated data (42 gives the standard dataset, 4000 train and 1000
    test signals); ``seed`` only draws the validation split. ``make_dataset`` reseeds Python's and
    numpy's global generators; their states are restored afterwards.
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = num_samples, generator_seed
    # mnist1d draws from numpy's legacy global generator: save and restore it around the call.
    np_state, py_state = np.random.get_state(), random.getstate()  # noqa: NPY002
    try:
        raw = make_dataset(args)
    finally:
        np.random.set_state(np_state)  # noqa: NPY002
        random.setstate(py_state)
    return _build("mnist1d", np.asarray(raw["x"])[:, None], np.asarray(raw["y"]),
                  np.asarray(raw["x_test"])[:, None], np.asarray(raw["y_test"]), 10, seed, val_fraction,
                  normalize, train_size, test_size, dtype)


def _find(folder: Path, names: dict[str, str], subfolders: Sequence[str], dataset: str,
          suffixes: Sequence[str]) -> dict[str, Path]:
    """Each of ``names`` as ``folder[/sub]/name[suffix]``; otherwise a :class:`MissingDataError`
    that lists the expected files and every folder searched."""
    if folder is None:
        raise MissingDataError(f"{dataset}: needs data_dir, the folder that holds its files "
                               f"({', '.join(names.values())})")
    folder = Path(folder)
    candidates = [folder] + [folder / s for s in subfolders]
    for cand in candidates:
        found = {}
        for key, name in names.items():
            for suffix in suffixes:
                if (cand / (name + suffix)).is_file():
                    found[key] = cand / (name + suffix)
                    break
        if len(found) == len(names):
            return found
    where = ", ".join(str(c) for c in candidates)
    if folder.is_dir():
        missing = [n for n in names.values() if not any((folder / (n + s)).is_file() for s in suffixes)]
        state = f" (missing in {folder}: {', '.join(missing)})"
    else:
        state = f" (the folder {folder} does not exist)"
    alts = " or ".join(repr(s) for s in suffixes if s)
    raise MissingDataError(f"{dataset}: expected the files {', '.join(names.values())}"
                           f"{f' (optionally ending in {alts})' if alts else ''} in one of: {where}"
                           f"{state}. Nothing is downloaded: put the files there or pass another "
                           f"data_dir.")


def mnist(data_dir: str | Path, seed: int = 0, val_fraction: float = 0.1, normalize: str = "channel",
          train_size: int | None = None, test_size: int | None = None,
          dtype: torch.dtype = torch.float32) -> Dataset:
    """MNIST from its four IDX files (raw or ``.gz``) in ``data_dir`` (or ``data_dir/mnist``,
    ``data_dir/MNIST/raw``): 60000 train and 10000 test images, shape ``(N, 1, 28, 28)``, pixels
    scaled to [0, 1] before normalising.

    Raises:
        MissingDataError: naming the expected files and the folders searched.
    """
    paths = _find(data_dir, MNIST_FILES, ["mnist", "MNIST/raw"], "MNIST", ["", ".gz"])
    arrays = {k: read_idx(p) for k, p in paths.items()}
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"MNIST: {paths[f'x_{split}']} and {paths[f'y_{split}']} must hold images "
                             f"(N, H, W) and N labels, got {x.shape} and {y.shape}")
    return _build("mnist", arrays["x_train"][:, None].astype(np.float64), arrays["y_train"],
                  arrays["x_test"][:, None].astype(np.float64), arrays["y_test"], 10, seed, val_fraction,
                  normalize, train_size, test_size, dtype, scale=1 / 255)


def cifar10(data_dir: str | Path, seed: int = 0, val_fraction: float = 0.1, normalize: str = "channel",
            train_size: int | None = None, test_size: int | None = None,
            dtype: torch.dtype = torch.float32) -> Dataset:
    """CIFAR-10 from the python batches ``data_batch_1..5`` and ``test_batch`` in ``data_dir`` (or
    ``data_dir/cifar-10-batches-py``): 50000 train and 10000 test images, shape ``(N, 3, 32, 32)``,
    pixels scaled to [0, 1] before normalising. 004 Sec. 5.1 keeps 5000 of the 50000 for validation
    (``val_fraction=0.1``).

    Raises:
        MissingDataError: naming the expected files and the folders searched.
    """
    names = {name: name for name in (*CIFAR10_TRAIN, CIFAR10_TEST)}
    paths = _find(data_dir, names, ["cifar-10-batches-py"], "CIFAR-10", [""])
    train = [read_cifar_batch(paths[n]) for n in CIFAR10_TRAIN]
    x_test, y_test = read_cifar_batch(paths[CIFAR10_TEST])
    x_train = np.concatenate([x for x, _ in train]).astype(np.float64)
    y_train = np.concatenate([y for _, y in train])
    return _build("cifar10", x_train, y_train, x_test.astype(np.float64), y_test, 10, seed, val_fraction,
                  normalize, train_size, test_size, dtype, scale=1 / 255)


LOADERS = {"digits": digits, "mnist1d": mnist1d, "mnist": mnist, "cifar10": cifar10}
NEEDS_DIR = ("mnist", "cifar10")


def load(name: str, data_dir: str | Path | None = None, **kwargs: Any) -> Dataset:
    """Load a dataset by name: ``digits`` and ``mnist1d`` need no files; ``mnist`` and ``cifar10``
    read ``data_dir``. Keyword arguments go to the loader (``seed``, ``val_fraction``,
    ``train_size``, ``normalize``, ``dtype``, ...)."""
    if name not in LOADERS:
        raise ValueError(f"data.load: unknown dataset {name!r}; choose from {sorted(LOADERS)}")
    if name in NEEDS_DIR:
        return LOADERS[name](data_dir, **kwargs)
    return LOADERS[name](**kwargs)
