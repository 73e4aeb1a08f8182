"""Checkpoint files read one tensor at a time, so that loading a model never holds a second copy of its weights.

``open_checkpoint(path)`` gives a ``CheckpointReader``: the keys, shapes and dtypes of every tensor without reading
any of them (``meta()``), then ``read(key)`` for one tensor and ``release(keys)`` once its values are copied
elsewhere. How each format is read:

* safetensors: the JSON header is parsed here; the data is memory-mapped read-only, ``read`` returns a view of
  one tensor and ``release`` hands its pages back to the kernel, so copied tensors do not stay resident.
* torch zip (``torch.save``'s format since 1.6): ``torch.load(mmap=True, weights_only=True)``; ``read`` returns a
  view of the memory map, and ``release`` hands its pages back to the kernel (Linux), so the pages of tensors
  already copied do not add up to a second copy of the file.
* legacy torch pickle: read whole (the format cannot be mapped); ``release`` drops the reader's reference, so
  each tensor is freed once its copy exists. ``scripts/convert_checkpoint.py`` turns such a file into safetensors.

No format runs code from the file: pickles are read with ``weights_only=True``.
"""
from __future__ import annotations

import ctypes
import json
import math
import mmap
import pickle
import struct
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Iterable

import torch


SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
_MADV_DONTNEED = 4  # Linux
_NESTING_KEYS = ("state_dict", "module", "model")


class CheckpointError(ValueError):
    """A file is unreadable or is not the checkpoint the input expects."""


def unwrap_state_dict(loaded: object, name: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint as saved: flat, nested under ``state_dict``/``module``/``model``, or with
    every key under a ``module.`` prefix (saved from a DataParallel wrapper)."""
    while isinstance(loaded, dict):
        nested = next((loaded[k] for k in _NESTING_KEYS if isinstance(loaded.get(k), dict)), None)
        if nested is None or any(torch.is_tensor(v) for v in loaded.values()):
            break
        loaded = nested
    if not isinstance(loaded, dict) or not any(torch.is_tensor(v) for v in loaded.values()):
        raise CheckpointError(f"{name} holds no tensors; it is not a model checkpoint")
    tensors = {k: v for k, v in loaded.items() if torch.is_tensor(v)}
    if all(k.startswith("module.") for k in tensors):
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


class CheckpointReader:
    """The tensors of one checkpoint, read on demand. Use as a context manager (or call ``close``)."""

    path: Path
    #: How the file is read, for reports: e.g. "safetensors, memory-mapped, pages released once copied".
    access: str
    #: The safetensors ``__metadata__`` (empty for pickles).
    metadata: dict[str, str]

    def keys(self) -> list[str]:
        return list(self._meta)

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor's shape and dtype, as tensors on the meta device (nothing is read)."""
        return dict(self._meta)

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` on the CPU. Valid until ``release(key)``; copy what must outlive it."""
        raise NotImplementedError

    def release(self, keys: Iterable[str]) -> None:
        """The caller is done with these tensors (they were copied): free what the reader holds of them."""

    def close(self) -> None:
        """Free everything the reader holds."""

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _truncated(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path.name} is not a readable safetensors file ({detail}); it may be truncated: "
                           f"download it again")


class SafetensorsReader(CheckpointReader):
    """A safetensors file: the header parsed, each tensor's bytes read only when asked for."""

    access = "safetensors, memory-mapped, pages released once copied"

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "rb")
        try:
            self._parse_header()
            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if self._entries else None
        except BaseException:
            self._file.close()
            raise

    def _parse_header(self) -> None:
        size = self.path.stat().st_size
        start = self._file.read(8)
        if len(start) < 8:
            raise _truncated(self.path, f"{size} bytes, shorter than the 8-byte header length")
        (header_bytes,) = struct.unpack("<Q", start)
        if header_bytes > min(_MAX_HEADER_BYTES, size - 8):
            raise _truncated(self.path, f"header of {header_bytes} bytes in a file of {size}")
        try:
            header = json.loads(self._file.read(header_bytes))
        except (ValueError, UnicodeDecodeError) as error:
            raise _truncated(self.path, f"header is not JSON: {error}") from None
        if not isinstance(header, dict):
            raise _truncated(self.path, "header is not a JSON object")
        self.metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
        self._data_start = 8 + header_bytes
        data_bytes = size - self._data_start
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        self._meta: dict[str, torch.Tensor] = {}
        for key, entry in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(d) for d in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise _truncated(self.path, f"tensor {key!r} has an unreadable entry {entry!r}") from None
            expected = math.prod(shape) * dtype.itemsize
            if end - begin != expected or begin < 0:
                raise _truncated(self.path, f"tensor {key!r} takes {end - begin} bytes, its shape {list(shape)} "
                                            f"needs {expected}")
            if end > data_bytes:
                raise _truncated(self.path, f"tensor {key!r} ends at byte {end} of {data_bytes}")
            self._entries[key] = (dtype, shape, begin, end)
            self._meta[key] = torch.empty(shape, dtype=dtype, device="meta")

    def read(self, key: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[key]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        with warnings.catch_warnings():  # read-only on purpose: nothing may write into the file's pages
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            data = torch.frombuffer(self._map, dtype=torch.uint8, count=end - begin, offset=self._data_start + begin)
        if (self._data_start + begin) % dtype.itemsize:
            data = data.clone()  # an unaligned tensor (a header not padded to 8 bytes) cannot be viewed in place
        return data.view(dtype).reshape(shape)

    def release(self, keys: Iterable[str]) -> None:
        if self._map is None or not hasattr(self._map, "madvise"):
            return
        page = mmap.PAGESIZE
        for key in keys:
            _, _, begin, end = self._entries[key]
            start = -(-(self._data_start + begin) // page) * page  # whole pages inside the tensor only
            stop = (self._data_start + end) // page * page
            if stop > start:
                self._map.madvise(mmap.MADV_DONTNEED, start, stop - start)

    def close(self) -> None:
        # Not mmap.close(): that would unmap pages that tensors handed out still view. Each of them holds a
        # reference to the map, which is unmapped when the last one goes.
        self._map = None
        self._file.close()


def _file_mappings(path: Path) -> list[tuple[int, int]]:
    """Address ranges at which this process maps ``path`` (Linux; empty elsewhere)."""
    target = str(path.resolve())
    ranges = []
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n") == target:
                    start, end = (int(a, 16) for a in fields[0].split("-"))
                    ranges.append((start, end))
    except OSError:
        return []
    return ranges


class _PageReleaser:
    """Gives the resident pages of a read-only private file mapping back to the kernel (``madvise``).

    Only addresses inside a mapping of the checkpoint file itself are touched: there the pages are clean copies of
    the file, so dropping them loses nothing (a later access reads the file again).
    """

    def __init__(self, path: Path):
        self._ranges = _file_mappings(path) if sys.platform.startswith("linux") else []
        self._madvise = None
        if self._ranges:
            libc = ctypes.CDLL(None, use_errno=True)
            self._madvise = libc.madvise
            self._madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    @property
    def active(self) -> bool:
        return self._madvise is not None

    def release(self, tensor: torch.Tensor) -> None:
        if self._madvise is None or tensor.numel() == 0:
            return
        page = mmap.PAGESIZE
        first, last = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
        start, end = -(-first // page) * page, last // page * page  # whole pages inside the tensor only
        if end > start and any(lo <= start and end <= hi for lo, hi in self._ranges):
            self._madvise(start, end - start, _MADV_DONTNEED)


class TorchReader(CheckpointReader):
    """A torch pickle read with ``weights_only``: memory-mapped when it is a zip archive, else read whole."""

    def __init__(self, path: Path):
        self.path = path
        self.metadata = {}
        mapped = zipfile.is_zipfile(path)
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
        except pickle.UnpicklingError as error:
            raise CheckpointError(f"{path.name} was refused: it holds objects other than tensors, which a safe "
                                  f"load does not execute ({str(error).splitlines()[0]}). Use the published file "
                                  f"or convert a trusted one to safetensors") from error
        except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
            raise CheckpointError(f"{path.name} is not a readable torch checkpoint ({error}); it may be "
                                  f"truncated: download it again") from error
        self._tensors = unwrap_state_dict(loaded, path.name)
        self._meta = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in self._tensors.items()}
        self._pages = _PageReleaser(path) if mapped else None
        if mapped:
            self.access = "torch zip, memory-mapped" + (", pages released once copied" if self._pages.active
                                                        else "")
        else:
            self.access = "legacy torch pickle, read whole (convert it to safetensors to read it lazily)"

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]

    def release(self, keys: Iterable[str]) -> None:
        for key in keys:
            tensor = self._tensors.pop(key, None)
            if tensor is not None and self._pages is not None:
                self._pages.release(tensor)

    def close(self) -> None:
        # Tensors already handed out stay valid: the map lives as long as any of them does.
        self._tensors.clear()


def open_checkpoint(path: str | Path) -> CheckpointReader:
    """A reader for a ``.safetensors`` file or a torch pickle (``.pt``/``.pth``/``.ckpt``/``.bin``)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}" if not path.is_dir() else
                              f"{path} is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path.name} is an empty file (0 bytes): its download or copy did not finish; "
                              f"download it again")
    if path.suffix.lower() in SAFETENSORS_SUFFIXES:
        return SafetensorsReader(path)
    return TorchReader(path)
