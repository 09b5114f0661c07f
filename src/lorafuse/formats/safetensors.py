"""Strict safetensors header parsing, and the layout of files the executor fills in place.

The format (https://huggingface.co/docs/safetensors): 8-byte little-endian header length N,
N bytes of JSON mapping tensor names to {dtype, shape, data_offsets}, then the data. We validate
the header completely before use, as the reference implementation does: offsets must tile the data
section exactly, with no gap, overlap or byte outside the file.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import LorafuseError
from .folder import not_a_file

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit
ALIGNMENT = 8  # writers pad the header so that data starts 8-byte aligned

# safetensors dtype name -> (bytes per element, the torch dtype's name). Names, not torch dtypes: planning
# needs no torch, so a merge can plan and copy while torch is still loading.
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
    "I16": (2, "int16"),
    "U16": (2, "uint16"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "I32": (4, "int32"),
    "U32": (4, "uint32"),
    "F32": (4, "float32"),
    "I64": (8, "int64"),
    "U64": (8, "uint64"),
    "F64": (8, "float64"),
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
NAME_OF_TORCH_DTYPE = {attr: name for name, (_, attr) in DTYPES.items()}


def dtype_size(dtype: str) -> int:
    return DTYPES[dtype][0]


def torch_dtype(dtype: str) -> torch.dtype:
    import torch

    t = getattr(torch, DTYPES[dtype][1], None)
    if t is None:
        raise LorafuseError(f"dtype {dtype} cannot be computed on by this torch version; upgrade torch")
    return t


def dtype_name(t: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    return NAME_OF_TORCH_DTYPE[str(t).removeprefix("torch.")]


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor's bytes lie: nothing is read until `read` is called."""

    path: Path
    offset: int  # absolute byte offset in the file
    nbytes: int
    dtype: str
    shape: tuple[int, ...]
    # A Hub file not downloaded yet (sources.remote.RemoteFile): `path` is where it will be.
    remote: object = field(default=None, compare=False, repr=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def read(self) -> torch.Tensor:
        """Read the tensor with positioned reads; the result owns its memory."""
        return bytes_to_tensor(self.read_into(bytearray(self.nbytes)), self.dtype, self.shape)

    def read_into(self, buf: bytearray | memoryview) -> bytearray | memoryview:
        """Fill `buf` (nbytes long) with the tensor's bytes. Planning reads a few small tensors (quant states)
        of files not downloaded yet: those come by an HTTP range request."""
        if self.remote is not None and not self.path.is_file():
            memoryview(buf)[:] = self.remote.read(self.offset, self.nbytes)
        else:
            with open(self.path, "rb", buffering=0) as f:
                read_exact(f.fileno(), memoryview(buf), self.offset, self.path)
        return buf


def read_exact(fd: int, buf: memoryview, offset: int, path: Path) -> None:
    """Fill `buf` from `offset` (pread may return less than asked for large reads)."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], offset + done)
        if got <= 0:
            raise LorafuseError(f"{path}: file is shorter than its header says (truncated?); re-download or re-save it")
        done += got


def bytes_to_tensor(buf: bytearray | memoryview, dtype: str, shape: tuple[int, ...]) -> torch.Tensor:
    import torch

    t = torch_dtype(dtype)
    if len(buf) == 0:
        return torch.empty(shape, dtype=t)
    return torch.frombuffer(buf, dtype=t).reshape(shape)


@dataclass(frozen=True)
class Header:
    """A validated safetensors header."""

    path: Path
    data_start: int
    tensors: dict[str, TensorRef]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike) -> Header:
    """Parse and fully validate the header of a safetensors file; read nothing else."""
    path = Path(path)
    if odd := not_a_file(path):  # checked first: opening a FIFO would wait for a writer
        raise LorafuseError(f"cannot read {path}: it is {odd}")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            def read(offset: int, n: int) -> bytes:
                f.seek(offset)
                return f.read(n)

            return parse_header(path, size, read)
    except OSError as e:
        raise LorafuseError(f"cannot read {path}: {e.strerror}") from None


def parse_header(path: Path, size: int, read: Callable[[int, int], bytes], remote=None) -> Header:
    """Validate the header of the `size`-byte file `path`, whose bytes `read(offset, n)` returns (from the
    disk, or by HTTP range requests for a file not downloaded yet; its refs then carry that `remote`)."""
    prefix = read(0, 8)
    if len(prefix) < 8:
        raise _bad(path, "file is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise _bad(path, f"header length {n} exceeds the {MAX_HEADER_BYTES}-byte limit")
    if 8 + n > size:
        raise _bad(path, f"header length {n} runs past the end of the {size}-byte file (truncated?)")
    raw = read(8, n)
    if len(raw) < n:
        raise _bad(path, f"header length {n} runs past the end of the file (truncated?)")
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _bad(path, f"header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    data_start = 8 + n
    entries = []
    for name, info in header.items():
        entries.append((name, *_parse_entry(path, name, info)))
    # Offsets must tile [0, data_size) exactly, in order of their start.
    entries.sort(key=lambda e: e[3][0])
    cursor = 0
    tensors = {}
    for name, dtype, shape, (begin, end) in entries:
        if begin != cursor:
            what = "overlaps the previous tensor" if begin < cursor else "leaves a gap before it"
            raise _bad(path, f"tensor {name!r} {what} (offset {begin}, expected {cursor})")
        cursor = end
        tensors[name] = TensorRef(path, data_start + begin, end - begin, dtype, shape, remote)
    if data_start + cursor != size:
        raise _bad(path, f"data section is {size - data_start} bytes but the tensors cover {cursor} (truncated?)")
    return Header(path, data_start, tensors, metadata)


def _parse_entry(path: Path, name: str, info) -> tuple[str, tuple[int, ...], tuple[int, int]]:
    if not isinstance(info, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPES:
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise _bad(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * dtype_size(dtype)
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(path, f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, offsets give {offsets[1] - offsets[0]}")
    return dtype, tuple(shape), (offsets[0], offsets[1])


def _bad(path: Path, why: str) -> LorafuseError:
    return LorafuseError(f"{path}: not a valid safetensors file: {why}; re-download or re-save it")


@dataclass(frozen=True)
class TensorSlot:
    """One tensor of an output file: its name, dtype, shape and where its bytes go."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # absolute offset in the output file
    nbytes: int


def layout(tensors: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> tuple[bytes, list[TensorSlot]]:
    """Compute a file's header bytes and every tensor's slot from names, dtypes and shapes alone.

    Knowing every offset up front lets the executor write tensors in any order, from several threads.
    """
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    cursor = 0
    spans = []
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * dtype_size(dtype)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        spans.append((name, dtype, shape, cursor, nbytes))
        cursor += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    prefix = struct.pack("<Q", len(raw)) + raw
    slots = [TensorSlot(n, d, s, len(prefix) + off, nb) for n, d, s, off, nb in spans]
    return prefix, slots
