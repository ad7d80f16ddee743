"""Readers for the on-disk formats of MNIST (IDX) and CIFAR-10 (python pickle batches).

Both readers take an explicit path; nothing is downloaded and no folder is assumed.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
from pathlib import Path

import numpy as np

# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT"); data are big-endian.
IDX_TYPES = {0x08: np.dtype(np.uint8), 0x09: np.dtype(np.int8), 0x0B: np.dtype(">i2"),
             0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
GZIP_MAGIC = b"\x1f\x8b"


class FormatError(ValueError):
    """A data file that exists but is not in the expected format."""


def _read_bytes(path: Path) -> bytes:
    raw = Path(path).read_bytes()
    if raw[:2] == GZIP_MAGIC:
        try:
            return gzip.decompress(raw)
        except (OSError, EOFError) as err:
            raise FormatError(f"{path}: not a valid gzip file ({err})") from err
    return raw


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (raw or gzip-compressed) into an array of its stored type and shape.

    The header is two zero bytes, a type code (0x08 ubyte ... 0x0E double), the number of
    dimensions ``n`` and ``n`` big-endian 32-bit sizes; the data follow in C order.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise FormatError(f"{path}: not an IDX file (the first two bytes must be 0, got {raw[:2]!r})")
    code, ndim = raw[2], raw[3]
    if code not in IDX_TYPES:
        raise FormatError(f"{path}: unknown IDX type code 0x{code:02x} (expected one of "
                          f"{', '.join(f'0x{c:02x}' for c in IDX_TYPES)})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise FormatError(f"{path}: IDX header truncated ({len(raw)} bytes for {ndim} dimensions)")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = IDX_TYPES[code]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise FormatError(f"{path}: IDX data holds {len(raw) - header} bytes, the header "
                          f"{tuple(shape)} of {dtype} needs {expected}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickle only plain containers and numpy arrays: a CIFAR batch needs nothing else, and
    refusing other globals keeps a stray file in ``data_dir`` from running code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch: a pickled dict with ``b'data'`` (``N x 3072`` uint8, the
    red, green and blue 32x32 planes of each image) and ``b'labels'`` (``N`` ints in 0..9).

    Returns:
        images of shape ``(N, 3, 32, 32)`` (uint8) and labels of shape ``(N,)`` (int64).
    """
    path = Path(path)
    try:
        batch = _ArrayUnpickler(io.BytesIO(_read_bytes(path)), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise FormatError(f"{path}: not a CIFAR-10 python batch ({err})") from err
    if not isinstance(batch, dict):
        raise FormatError(f"{path}: a CIFAR-10 batch is a dict, got {type(batch).__name__}")
    keys = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in keys or "labels" not in keys:
        raise FormatError(f"{path}: a CIFAR-10 batch needs the keys b'data' and b'labels', got "
                          f"{sorted(map(str, batch))}")
    x = np.asarray(keys["data"])
    y = np.asarray(keys["labels"], dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or x.shape[0] != y.shape[0]:
        raise FormatError(f"{path}: expected data of shape (N, 3072) and N labels, got data "
                          f"{x.shape} and {y.shape[0]} labels")
    return x.astype(np.uint8).reshape(-1, 3, 32, 32), y
