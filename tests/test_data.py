"""mg.data: digits, MNIST-1D (generated, no network), MNIST from IDX files and CIFAR-10 from python
batches that the tests write in the real formats, seeded splits, normalisation and missing-data errors."""

from __future__ import annotations

import gzip
import pickle
import random
import socket
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

import moreaugrad as mg
from moreaugrad.data import formats


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """An IDX file as LeCun's page describes it: 0, 0, type code, ndim, big-endian sizes, data."""
    codes = {np.dtype(np.uint8): 0x08, np.dtype(np.int8): 0x09, np.dtype(np.int16): 0x0B,
             np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D, np.dtype(np.float64): 0x0E}
    code = codes[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)


def write_mnist(folder: Path, n_train: int = 40, n_test: int = 20, size: int = 6, compress: bool = False,
                seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": (np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": (np.arange(n_test) % 10).astype(np.uint8),
    }
    for name, a in arrays.items():
        write_idx(folder / (name + (".gz" if compress else "")), a, compress)
    return arrays


def write_cifar(folder: Path, per_batch: int = 6, seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    """The six CIFAR-10 python batches: pickled dicts with b'data' (N x 3072 uint8) and b'labels'."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with (folder / name).open("wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f, protocol=2)
        batches[name] = (data, labels)
    return batches


# -- formats ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32, np.float64])
def test_read_idx_round_trip(tmp_path, compress, dtype):
    a = (np.arange(2 * 3 * 4) - 5).reshape(2, 3, 4).astype(dtype)
    if dtype == np.uint8:
        a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.idx", a, compress)
    b = mg.data.read_idx(tmp_path / "a.idx")
    assert b.shape == (2, 3, 4) and b.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(a, b)


def test_read_idx_rejects_bad_files(tmp_path):
    (tmp_path / "bad").write_bytes(b"\x01\x02\x08\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(mg.data.FormatError, match="not an IDX file"):
        mg.data.read_idx(tmp_path / "bad")
    (tmp_path / "code").write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 3) + b"abc")
    with pytest.raises(mg.data.FormatError, match="unknown IDX type code 0x07"):
        mg.data.read_idx(tmp_path / "code")
    (tmp_path / "short").write_bytes(b"\x00\x00\x08\x02" + struct.pack(">2I", 3, 3) + b"abc")
    with pytest.raises(mg.data.FormatError, match="holds 3 bytes"):
        mg.data.read_idx(tmp_path / "short")


def test_read_cifar_batch_layout(tmp_path):
    batches = write_cifar(tmp_path, per_batch=3)
    x, y = mg.data.read_cifar_batch(tmp_path / "data_batch_2")
    data, labels = batches["data_batch_2"]
    assert x.shape == (3, 3, 32, 32) and x.dtype == np.uint8 and y.tolist() == labels
    # The row holds the red plane, then green, then blue, each 32x32 in row-major order.
    assert x[1, 0, 0, 5] == data[1, 5] and x[1, 1, 2, 3] == data[1, 1024 + 2 * 32 + 3]
    assert x[2, 2, 31, 31] == data[2, 3071]


def test_read_cifar_batch_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("owned",))

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(mg.data.FormatError, match="refusing to load builtins.print"):
        mg.data.read_cifar_batch(tmp_path / "data_batch_1")
    with (tmp_path / "test_batch").open("wb") as f:
        pickle.dump({b"labels": [1]}, f)
    with pytest.raises(mg.data.FormatError, match="b'data' and b'labels'"):
        mg.data.read_cifar_batch(tmp_path / "test_batch")


# -- loaders ------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_from_idx_files(tmp_path, compress):
    arrays = write_mnist(tmp_path / "mnist", compress=compress)
    ds = mg.data.load("mnist", tmp_path, seed=3, val_fraction=0.25)
    assert ds.sizes() == {"train": 30, "val": 10, "test": 20} and ds.input_shape == (1, 6, 6)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    # Normalised with the training split's statistics: mean 0 and std 1 there, not on the others.
    assert abs(ds.x_train.mean().item()) < 1e-5 and abs(ds.x_train.std(unbiased=False).item() - 1) < 1e-4
    raw = arrays["t10k-images-idx3-ubyte"].astype(np.float64) / 255
    mean, std = ds.stats["mean"][0], ds.stats["std"][0]
    np.testing.assert_allclose(ds.x_test[:, 0].numpy(), (raw - mean) / std, rtol=1e-5, atol=1e-5)
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    # Train and validation partition the original training set.
    labels = sorted(ds.y_train.tolist() + ds.y_val.tolist())
    assert labels == sorted(arrays["train-labels-idx1-ubyte"].tolist())


def test_splits_are_seeded(tmp_path):
    write_mnist(tmp_path)
    a = mg.data.mnist(tmp_path, seed=1)
    b = mg.data.mnist(tmp_path, seed=1)
    c = mg.data.mnist(tmp_path, seed=2)
    assert torch.equal(a.x_val, b.x_val) and not torch.equal(a.x_val, c.x_val)
    small = mg.data.mnist(tmp_path, seed=1, train_size=5, test_size=4, normalize="none")
    assert small.sizes() == {"train": 5, "val": 4, "test": 4}
    assert 0 <= small.x_train.min() and small.x_train.max() <= 1
    parts = mg.data.split_indices(50, [0.2, 0.3], seed=0)
    assert [len(p) for p in parts] == [10, 15, 25]
    assert sorted(np.concatenate(parts).tolist()) == list(range(50))


def test_cifar10_from_python_batches(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", per_batch=6)
    ds = mg.data.load("cifar10", tmp_path, val_fraction=0.2, dtype=torch.float64)
    assert ds.sizes() == {"train": 24, "val": 6, "test": 6} and ds.input_shape == (3, 32, 32)
    assert ds.x_train.dtype == torch.float64 and ds.classes == 10
    # Per-channel normalisation: each channel of the training split has mean 0 and std 1.
    m = ds.x_train.mean(dim=(0, 2, 3))
    s = ds.x_train.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(m, torch.zeros(3, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(s, torch.ones(3, dtype=torch.float64), atol=1e-10, rtol=0)


def test_missing_folder_names_the_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(mg.data.MissingDataError) as err:
        mg.data.load("mnist", missing)
    msg = str(err.value)
    assert "train-images-idx3-ubyte" in msg and "t10k-labels-idx1-ubyte" in msg
    assert str(missing) in msg and "does not exist" in msg and str(missing / "MNIST/raw") in msg
    with pytest.raises(mg.data.MissingDataError, match="needs data_dir"):
        mg.data.load("cifar10")
    # A folder with some of the files says which are missing.
    write_cifar(tmp_path / "partial", per_batch=2)
    (tmp_path / "partial" / "data_batch_4").unlink()
    with pytest.raises(mg.data.MissingDataError, match=r"missing in .*partial: data_batch_4\)"):
        mg.data.cifar10(tmp_path / "partial")
    assert issubclass(mg.data.MissingDataError, FileNotFoundError)


def test_digits():
    ds = mg.data.digits(seed=0)
    assert ds.input_shape == (1, 8, 8) and ds.classes == 10
    assert sum(ds.sizes().values()) == 1797 and ds.sizes()["test"] == round(0.2 * 1797)
    assert abs(ds.x_train.mean().item()) < 1e-5
    again = mg.data.digits(seed=0)
    assert torch.equal(ds.x_train, again.x_train) and torch.equal(ds.y_test, again.y_test)


def test_mnist1d_generates_without_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("mnist1d tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    # The legacy global generators are what make_dataset reseeds: check they come back untouched.
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    expected = (np.random.random(), random.random())  # noqa: NPY002
    np.random.seed(123)  # noqa: NPY002
    random.seed(123)
    ds = mg.data.mnist1d(seed=0, num_samples=200, val_fraction=0.25)
    assert ds.input_shape == (1, 40) and ds.sizes() == {"train": 120, "val": 40, "test": 40}
    assert set(ds.y_train.tolist()) <= set(range(10))
    # make_dataset reseeds the global generators; the loader puts them back.
    assert (np.random.random(), random.random()) == expected  # noqa: NPY002
    again = mg.data.mnist1d(seed=0, num_samples=200, val_fraction=0.25)
    assert torch.equal(ds.x_train, again.x_train)


def test_load_errors():
    with pytest.raises(ValueError, match="unknown dataset 'svhn'"):
        mg.data.load("svhn")
    with pytest.raises(ValueError, match="val_fraction must be a number in"):
        mg.data.digits(val_fraction=1.5)
    with pytest.raises(ValueError, match="normalize must be one of"):
        mg.data.digits(normalize="pixel")
    assert formats.IDX_TYPES[0x08] == np.dtype(np.uint8)
