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
import re
import struct
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import LorafuseError
from .jsonfile import MAX_DEPTH, parse_json
from .folder import not_a_file

if TYPE_CHECKING:
    import torch

MAX_HEADER_BYTES = 100_000_000  # the reference implementation's limit (MAX_HEADER_SIZE)
ALIGNMENT = 8  # writers pad the header so that data starts 8-byte aligned

# safetensors dtype name -> (bits per element, the torch dtype's name, None where torch has no such type), as the
# safetensors library knows them. Names, not torch dtypes: planning needs no torch, so a merge can plan and copy
# while torch is still loading. Tensors of the types torch lacks can only be copied as they are.
DTYPES: dict[str, tuple[int, str | None]] = {
    "BOOL": (8, "bool"),
    "F4": (4, None),
    "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
    "U8": (8, "uint8"),
    "I8": (8, "int8"),
    "F8_E4M3": (8, "float8_e4m3fn"),
    "F8_E5M2": (8, "float8_e5m2"),
    "F8_E8M0": (8, "float8_e8m0fnu"),
    "F8_E4M3FNUZ": (8, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (8, "float8_e5m2fnuz"),
    "I16": (16, "int16"),
    "U16": (16, "uint16"),
    "F16": (16, "float16"),
    "BF16": (16, "bfloat16"),
    "I32": (32, "int32"),
    "U32": (32, "uint32"),
    "F32": (32, "float32"),
    "C64": (64, "complex64"),
    "I64": (64, "int64"),
    "U64": (64, "uint64"),
    "F64": (64, "float64"),
}
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
NAME_OF_TORCH_DTYPE = {attr: name for name, (_, attr) in DTYPES.items() if attr}


def dtype_size(dtype: str) -> int:
    """Bytes per element, of the types that take whole bytes (all that lorafuse computes on)."""
    return DTYPES[dtype][0] // 8


def tensor_nbytes(dtype: str, shape: tuple[int, ...]) -> int:
    """Bytes of a tensor of any type (sub-byte elements are packed, a whole number of bytes in all)."""
    return math.prod(shape) * DTYPES[dtype][0] // 8


def torch_dtype(dtype: str) -> torch.dtype:
    import torch

    t = getattr(torch, DTYPES[dtype][1] or "", None)
    if t is None:
        raise LorafuseError(f"dtype {dtype} cannot be computed on by this torch version; upgrade torch")
    return t


def dtype_name(t: torch.dtype) -> str:
    """The safetensors name of a torch dtype."""
    return NAME_OF_TORCH_DTYPE[str(t).removeprefix("torch.")]


@dataclass(frozen=True, slots=True)
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
    disk, or by HTTP range requests for a file not downloaded yet; its refs then carry that `remote`).

    The rules are the safetensors library's (`SafeTensors::read_metadata` and `Metadata::validate`), so
    that exactly the files it reads are read: serde_json's JSON (no NaN, no lone surrogate, numbers
    in range, at most MAX_DEPTH levels, no repeated field), offsets sorted and tiling the data, and
    shape products in checked 64-bit arithmetic. Each entry becomes its TensorRef as soon as it is
    parsed, so memory stays a small multiple of the header's size.
    """
    prefix = read(0, 8)
    if len(prefix) < 8:
        raise _bad(path, "header too small: the file is shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_BYTES:
        raise _bad(path, f"header too large: {n} bytes, over the safetensors library's limit of {MAX_HEADER_BYTES}")
    if 8 + n > size:
        raise _bad(path, f"header length {n} runs past the end of the {size}-byte file (truncated?)")
    raw = read(8, n)
    if len(raw) < n:
        raise _bad(path, f"header length {n} runs past the end of the file (truncated?)")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _bad(path, f"header is not UTF-8 ({e})") from None
    del raw
    data_start = 8 + n
    entry = partial(_entry, path, data_start, remote)
    hooks = {"object_pairs_hook": entry, "parse_constant": _no_constant, "parse_float": _finite_float}
    if "-0" in text:  # serde_json reads -0 as a float: no size or offset
        hooks["parse_int"] = _int_or_negative_zero
    header = parse_json(text, f"{path}: safetensors header", FIX, check_depth=False, **hooks)
    escapes = "\\u" in text  # without \u escapes no string can hold a lone surrogate
    del text
    if not isinstance(header, dict):
        raise _bad(path, "header is not a JSON object")
    repeated = getattr(header, "repeated", {})
    if len(repeated.get("__metadata__", ())) > 1:
        raise _bad(path, "__metadata__ appears twice")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad(path, "__metadata__ must map strings to strings")
    for key, values in getattr(metadata, "repeated", {}).items():
        if not all(isinstance(v, str) for v in values):
            raise _bad(path, "__metadata__ must map strings to strings")
    for name, info in header.items():
        for earlier in repeated.get(name, ())[:-1]:  # a name given twice: the last wins, but all must be readable
            _fields(path, name, earlier)
        if not isinstance(info, TensorRef):
            header[name] = _tensor(path, name, info, data_start, remote)
    if escapes:
        for text in (*header, *metadata, *metadata.values()):
            _check_string(path, text)
    # Offsets must tile [0, data_size) exactly, in order of (start, end): a zero-size tensor at another's start is fine.
    names = sorted(header, key=lambda name: (header[name].offset, header[name].nbytes))
    cursor = data_start
    for name in names:
        ref = header[name]
        if ref.offset != cursor:
            what = "overlaps the previous tensor" if ref.offset < cursor else "leaves a gap before it"
            raise _bad(path, f"tensor {name!r} {what} (offset {ref.offset - data_start}, expected {cursor - data_start})")
        cursor += ref.nbytes
    if cursor != size:
        raise _bad(path, f"data section is {size - data_start} bytes but the tensors cover {cursor - data_start} (truncated?)")
    return Header(path, data_start, {name: header[name] for name in names}, metadata)


FIELDS = ("dtype", "shape", "data_offsets")
FIX = "re-download or re-save it"
U64 = 2**64


class _Repeated(dict):
    """A JSON object in which some keys appear more than once: the last value wins, as in serde_json's
    maps, and `repeated` keeps every value of those keys, which serde_json validates too."""

    repeated: dict


def _entry(path: Path, data_start: int, remote, pairs: list):
    """object_pairs_hook: a plain, valid tensor entry becomes its TensorRef at once; any other object stays
    a dict, for `_tensor` to judge where it stands for a tensor (objects in unknown fields are ignored)."""
    value = dict(pairs)
    if len(value) < len(pairs):
        value = _Repeated(value)
        value.repeated = {}
        for key, item in pairs:
            value.repeated.setdefault(key, []).append(item)
        value.repeated = {key: items for key, items in value.repeated.items() if len(items) > 1}
    elif len(value) == 3:
        dtype, shape, offsets = value.get("dtype"), value.get("shape"), value.get("data_offsets")
        if _known(dtype) and _u64_list(shape) and _u64_list(offsets) and len(offsets) == 2:
            nbytes = _nbytes(shape, dtype)
            if nbytes is not None and offsets[1] - offsets[0] == nbytes:
                return TensorRef(path, data_start + offsets[0], nbytes, dtype, tuple(shape), remote)
    return value


def _tensor(path: Path, name: str, info, data_start: int, remote) -> TensorRef:
    """A tensor entry that did not become a TensorRef while parsing (it has unknown fields, which are
    ignored, or it is wrong): its TensorRef, or the error."""
    if isinstance(info, TensorRef):
        return info
    dtype, shape, offsets = _fields(path, name, info)
    if offsets[0] > offsets[1]:
        raise _bad(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    nbytes = _nbytes(shape, dtype)
    if nbytes is None:
        raise _bad(path, f"tensor {name!r}: shape {shape} of {dtype} is not a whole number of bytes below 2**64")
    if offsets[1] - offsets[0] != nbytes:
        raise _bad(path, f"tensor {name!r}: shape {shape} of {dtype} needs {nbytes} bytes, offsets give {offsets[1] - offsets[0]}")
    return TensorRef(path, data_start + offsets[0], nbytes, dtype, tuple(shape), remote)


def _fields(path: Path, name: str, info) -> tuple[str, list[int], list[int]]:
    """dtype, shape and data_offsets of an entry, if it has the types the reference's TensorInfo reads."""
    if isinstance(info, TensorRef):
        return info.dtype, list(info.shape), [info.offset, info.offset + info.nbytes]
    if not isinstance(info, dict):
        raise _bad(path, f"entry {name!r} is not an object")
    for key in FIELDS:
        if key not in info:
            raise _bad(path, f"tensor {name!r} has no {key}")
        if len(getattr(info, "repeated", {}).get(key, ())) > 1:
            raise _bad(path, f"tensor {name!r} gives {key} twice")
    dtype, shape, offsets = (info[key] for key in FIELDS)
    if not _known(dtype):
        raise _bad(path, f"tensor {name!r} has unknown dtype {dtype!r}")
    if not _u64_list(shape):
        raise _bad(path, f"tensor {name!r} has an invalid shape {shape!r}")
    if not _u64_list(offsets) or len(offsets) != 2:
        raise _bad(path, f"tensor {name!r} has invalid data_offsets {offsets!r}")
    _check_ignored(path, name, [v for k, v in info.items() if k not in FIELDS])
    return dtype, shape, offsets


def _known(dtype) -> bool:
    return isinstance(dtype, str) and dtype in DTYPES


def _u64_list(value) -> bool:
    return isinstance(value, list) and all(type(v) is int and 0 <= v < U64 for v in value)


def _nbytes(shape: list[int], dtype: str) -> int | None:
    """Bytes of a tensor, or None where the reference's checked 64-bit arithmetic overflows (it multiplies
    the dimensions in order, so [2**40, 2**40, 0] overflows although it holds nothing) or sub-byte
    elements leave a partial byte."""
    count = 1
    for d in shape:
        count *= d
        if count >= U64:
            return None
    bits = count * DTYPES[dtype][0]
    return bits // 8 if bits < U64 and bits % 8 == 0 else None


def _check_ignored(path: Path, name: str, values: list) -> None:
    """The values of a tensor entry's unknown fields are ignored, but must be what serde_json reads: at
    most MAX_DEPTH levels deep in the header, numbers within a double's range, no lone surrogate."""
    stack = [(v, 3) for v in values]  # header object, entry object, then the value
    while stack:
        value, level = stack.pop()
        if isinstance(value, str):
            _check_string(path, value)
        elif type(value) is int:
            try:
                float(value)
            except OverflowError:
                raise _bad(path, f"tensor {name!r}: number out of range") from None
        elif isinstance(value, (list, dict, TensorRef)):
            if level > MAX_DEPTH:
                raise _bad(path, f"tensor {name!r} nests values more than {MAX_DEPTH} levels deep")
            if isinstance(value, TensorRef):  # an object that looked like an entry: one list inside
                stack.append(([], level + 1))
            elif isinstance(value, dict):
                stack.extend((k, level) for k in value)
                stack.extend((v, level + 1) for v in value.values())
            else:
                stack.extend((v, level + 1) for v in value)


SURROGATE = re.compile("[\ud800-\udfff]")


def _check_string(path: Path, text: str) -> None:
    """Strings decoded from UTF-8 hold no surrogates; only a lone \\uD800-\\uDFFF escape makes one,
    which serde_json refuses."""
    if not text.isascii() and SURROGATE.search(text):
        raise _bad(path, f"string {text.encode('utf-8', 'backslashreplace').decode()!r} holds a lone surrogate escape")


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} out of range")
    return value


def _int_or_negative_zero(text: str) -> int | float:
    """serde_json reads -0 as the float -0.0."""
    return -0.0 if text == "-0" else int(text)


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
        nbytes = tensor_nbytes(dtype, shape)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [cursor, cursor + nbytes]}
        spans.append((name, dtype, shape, cursor, nbytes))
        cursor += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-(8 + len(raw)) % ALIGNMENT)
    prefix = struct.pack("<Q", len(raw)) + raw
    slots = [TensorSlot(n, d, s, len(prefix) + off, nb) for n, d, s, off, nb in spans]
    return prefix, slots
