"""Write an ``.npz`` chunk by chunk: memory holds one chunk, not the whole array.

An ``.npz`` is a zip archive of ``.npy`` files (numpy's format: a header with dtype and shape, then the raw
C-ordered bytes), so the header of ``x`` (n, *shape) is written first and each chunk's bytes after it. The
file reads back with ``np.load(path, allow_pickle=False)`` (and ``flowmap.data.registry.load_tensor_file``).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from flowmap.io import atomic_write


def _npy_header(shape: tuple[int, ...], dtype: np.dtype) -> dict:
    return {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}


def write_npz_chunks(
    path: str | Path,
    chunks: Iterable[np.ndarray],
    n: int,
    shape: tuple[int, ...],
    extra: dict[str, np.ndarray] | None = None,
    dtype=np.float32,
) -> Path:
    """Stream ``chunks`` (each (b, *shape), b summing to n) into array ``x`` of ``path``, then the small arrays
    of ``extra``, which may be filled while the chunks are consumed (e.g. labels). Atomic: a failure leaves
    no file. Raises ValueError when the chunks do not add up to (n, *shape)."""
    path = Path(path)
    shape = tuple(int(d) for d in shape)

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("x.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, _npy_header((n, *shape), dtype))
                seen = 0
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=dtype)
                    if tuple(chunk.shape[1:]) != shape or seen + chunk.shape[0] > n:
                        raise ValueError(
                            f"chunk of shape {chunk.shape} does not fit x of shape {(n, *shape)} at row {seen}"
                        )
                    f.write(chunk.tobytes())
                    seen += chunk.shape[0]
                if seen != n:
                    raise ValueError(f"the chunks held {seen} rows, x has {n}")
            for name, arr in (extra or {}).items():
                with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(arr), allow_pickle=False)

    atomic_write(path, write)
    return path
