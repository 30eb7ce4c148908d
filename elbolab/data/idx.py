"""Reader for IDX files (the MNIST format), gzipped or not, with every foreseeable defect reported clearly.

Layout: 2 zero bytes, a type byte (0x08 = unsigned byte), a byte with the number of dimensions, one
big-endian uint32 per dimension, then the values in C order. MNIST images have magic 0x00000803
(3 dimensions: count, rows, columns), labels 0x00000801.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from elbolab.errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_UNSIGNED_BYTE = 0x08


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as stream:
            head = stream.read(2)
            if head != _GZIP_MAGIC:
                return head + stream.read()
    except FileNotFoundError:
        raise DataError(f"IDX file {path} not found") from None
    except OSError as error:
        raise DataError(f"could not read IDX file {path}: {error.strerror or error}") from None
    try:
        with gzip.open(path, "rb") as stream:
            return stream.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(f"{path} is a corrupt or truncated gzip file ({error}); re-download it") from None


def read_idx(path: str | os.PathLike, *, ndim: int | None = None) -> np.ndarray:
    """Read one unsigned-byte IDX file (gzipped or not, detected from its content) into a uint8 array.

    ndim, when given, is the number of dimensions the file must declare (3 for images, 1 for labels).
    Raises DataError for a missing, corrupt, truncated, empty (0 items declared) or oversized file.
    """
    path = Path(path)
    raw = _read_bytes(path)
    expected_magic = f" (expected 0x{0x800 + ndim:08x})" if ndim else ""
    if len(raw) < 4:
        raise DataError(
            f"{path} is truncated: expected at least a 4-byte IDX header, got {len(raw)} bytes; re-download it"
        )
    magic = int.from_bytes(raw[:4], "big")
    type_code, n_dims = raw[2], raw[3]
    if raw[0] != 0 or raw[1] != 0 or n_dims == 0:
        raise DataError(
            f"{path} is not an IDX file: magic number 0x{magic:08x}{expected_magic}; "
            "MNIST images start with 0x00000803 and labels with 0x00000801. Re-download it"
        )
    if type_code != _UNSIGNED_BYTE:
        raise DataError(
            f"{path} has IDX type byte 0x{type_code:02x} (magic 0x{magic:08x}); only unsigned-byte data "
            "(type 0x08, as in MNIST) is supported"
        )
    if ndim is not None and n_dims != ndim:
        raise DataError(
            f"{path} declares {n_dims} dimension(s) (magic 0x{magic:08x}){expected_magic}: "
            "is it the images file where the labels file was expected, or the other way round?"
        )
    header_size = 4 + 4 * n_dims
    if len(raw) < header_size:
        raise DataError(
            f"{path} is truncated: expected a {header_size}-byte IDX header, got {len(raw)} bytes; re-download it"
        )
    dims = struct.unpack(f">{n_dims}I", raw[4:header_size])
    expected = math.prod(dims)
    got = len(raw) - header_size
    shape = " x ".join(str(d) for d in dims)
    if got < expected:
        raise DataError(
            f"{path} is truncated: its header declares {shape} = {expected} bytes of data, "
            f"expected {expected} bytes but got {got}; re-download it"
        )
    if got > expected:
        raise DataError(
            f"{path} holds {got} bytes of data but its header declares {shape} = {expected} bytes; "
            "the file is corrupt or not an IDX file. Re-download it"
        )
    if expected == 0:
        what = "0 items" if dims[0] == 0 else f"items of {' x '.join(str(d) for d in dims[1:])} values"
        raise DataError(
            f"{path} holds no data: its header declares {shape} (magic 0x{magic:08x}), i.e. {what}; expected at "
            "least one item of at least one value (MNIST: 60000 or 10000 images of 28 x 28). The file is damaged "
            "or was cut down to nothing; re-download it"
        )
    # A copy, so the array is writable and does not pin the whole byte string.
    return np.frombuffer(raw, dtype=np.uint8, count=expected, offset=header_size).reshape(dims).copy()
