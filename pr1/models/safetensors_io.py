"""Reading and writing the safetensors format with NumPy only (bf16 through ml_dtypes).

Why our own: the `safetensors` NumPy bindings refuse bfloat16, and we want tensor-by-tensor access
so a 7B checkpoint never sits twice in host memory. `read` fills a fresh array with one positioned
read of the whole tensor (no page-fault-per-4-KB memory map, no staging copy); `get` is the lazy
memory-mapped view for callers that want slices. `save_file` writes each array's own bytes (no
`tobytes()` copy). The format is a
little-endian u64 header length, a JSON header {name: {dtype, shape, data_offsets}}, then raw
bytes. Nothing here unpickles anything.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
_ALIGN = 64  # JAX's CPU backend adopts a 64-byte-aligned host buffer without copying it


def empty_aligned(shape, dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN, np.uint8)
    start = (-raw.ctypes.data) % _ALIGN
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def _pread_into(fd: int, view: memoryview, offset: int, what: str) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise ValueError(f"{what}: file truncated")
        done += n


class LazyTensor:
    """A tensor `save_file` asks to write itself: `write(f)` must write exactly nbytes (shape, dtype).
    Lets a caller produce the stored layout block by block (a transpose) without a full copy."""

    def __init__(self, shape, dtype, write):
        self.shape, self.dtype, self.write = tuple(int(x) for x in shape), np.dtype(dtype), write
        self.nbytes = int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


class SafetensorsFile:
    """A read-only view of one .safetensors file; `get(name)` returns a memory-mapped array."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _MAX_HEADER:
                raise ValueError(f"{self.path}: safetensors header of {n} bytes is implausible")
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}: corrupt safetensors header ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._base = 8 + n
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def _info(self, name: str) -> dict:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        return info

    def dtype(self, name: str) -> np.dtype:
        return _DTYPES[self._info(name)["dtype"]]

    def read(self, name: str, out: np.ndarray | None = None) -> np.ndarray:
        """Tensor `name` read whole into `out` (C-contiguous, its shape and dtype) or a fresh
        64-byte-aligned array, with positioned reads straight into it."""
        info = self._info(name)
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        if out is None:
            out = empty_aligned(shape, dtype)
        elif out.shape != shape or out.dtype != dtype or not out.flags.c_contiguous:
            raise ValueError(
                f"{self.path}: tensor {name} is {dtype}{list(shape)}; cannot read it into "
                f"{out.dtype}{list(out.shape)} (contiguous={out.flags.c_contiguous})"
            )
        start, end = info["data_offsets"]
        if end - start != out.nbytes:
            raise ValueError(
                f"{self.path}: tensor {name} spans {end - start} bytes, its shape needs {out.nbytes}"
            )
        fd = os.open(self.path, os.O_RDONLY)
        try:
            _pread_into(
                fd, memoryview(out.reshape(-1).view(np.uint8)), self._base + start, f"{self.path} {name}"
            )
        finally:
            os.close(fd)
        return out

    def row_blocks(self, name: str, block_bytes: int = 1 << 20):
        """Tensor `name` as 2-D [dim0, rest], read in blocks of leading rows into one reused buffer of
        about `block_bytes` (cache-sized): yields (first row, block view). A block is overwritten by
        the next one."""
        info = self._info(name)
        dtype, shape = _DTYPES[info["dtype"]], tuple(info["shape"])
        rows = shape[0] if shape else 1
        cols = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        row_bytes = max(cols * dtype.itemsize, 1)
        k = max(1, min(rows, block_bytes // row_bytes))
        scratch = empty_aligned((k, cols), dtype)
        start = info["data_offsets"][0]
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for r in range(0, rows, k):
                n = min(k, rows - r)
                block = scratch[:n]
                _pread_into(
                    fd,
                    memoryview(block.reshape(-1).view(np.uint8)),
                    self._base + start + r * row_bytes,
                    f"{self.path} {name}",
                )
                yield r, block
        finally:
            os.close(fd)

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        buf = self._mmap[self._base + start : self._base + end]
        return buf.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


def save_file(tensors: dict[str, np.ndarray], path: str | os.PathLike, metadata: dict | None = None) -> None:
    """Write `tensors` to `path` atomically (temp file + rename), so a crash never leaves half a file."""
    header, offset = {}, 0
    arrays = {}
    for name, arr in tensors.items():
        if not isinstance(arr, LazyTensor):
            arr = np.ascontiguousarray(arr)
        if arr.dtype not in _NAMES:
            raise ValueError(f"tensor {name}: dtype {arr.dtype} cannot be stored in safetensors")
        arrays[name] = arr
        header[name] = {
            "dtype": _NAMES[arr.dtype],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keeps the data 8-byte aligned, as the reference writer does
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, arr in arrays.items():
            if isinstance(arr, LazyTensor):
                before = f.tell()
                arr.write(f)
                if f.tell() - before != arr.nbytes:
                    raise ValueError(
                        f"tensor {name}: its writer wrote {f.tell() - before} bytes, not {arr.nbytes}"
                    )
            elif arr.nbytes:  # the array's own buffer, not a tobytes() copy of it
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))
    os.replace(tmp, path)
