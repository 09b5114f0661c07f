"""A quantized weight as the planner sees it: one logical tensor stored as several.

Each format module offers `claim(tensors, config)`: it finds the weights it stores, returns them as
QuantizedTensor values keyed by the weight's name, and so takes their auxiliary tensors (scales,
absmax, quant states) out of the plain-tensor namespace. Reading happens only in `read`.

Every format stores one byte (or two 4-bit codes) per value: its `decode` gives a `Lookup`, which turns
those bytes into float32 through a 256-entry table, the way the formats' own kernels do, at several times
the speed of torch's casts and gathers on the CPU, a block of rows at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..errors import LorafuseError
from ..formats.safetensors import FLOAT_DTYPES, NAME_OF_TORCH_DTYPE

if TYPE_CHECKING:
    import torch

Empty = Callable[[int], "torch.Tensor"]  # nbytes -> uint8 tensor to decode into

# Output bytes decoded per step on the CPU: a step's values stay in the CPU's cache from the lookup to
# the scaling, which is much faster than gathering the whole weight in one step (benchmarks/NOTES.md,
# "Quantized bases").
LOOKUP_BYTES = 1 << 19


@dataclass(frozen=True)
class QuantizedTensor:
    name: str
    method: str  # e.g. "bnb-nf4", "bnb-int8", "fp8-block"
    parts: dict  # role (the format's name for it) -> (checkpoint key, TensorRef)
    shape: tuple[int, ...]
    dtype: str  # safetensors name of the dtype it dequantizes to (the model's dtype)
    # decode(parts): the weight's Lookup, from its stored parts (torch tensors keyed by role)
    decode: Callable[[dict[str, torch.Tensor]], Lookup] = field(compare=False, repr=False)
    # values per code row of its Lookup where code rows do not follow the weight's rows (bnb 4-bit: the
    # blocksize, from the quant state); 0 where each code row is (part of) one row
    code_width: int = 0

    @property
    def nbytes(self) -> int:
        """Bytes read to produce it."""
        return sum(ref.nbytes for _, ref in self.parts.values())

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def keys(self) -> list[str]:
        """The checkpoint tensors it is stored in."""
        return [key for key, _ in self.parts.values()]

    def read(self, device: str | torch.device = "cpu",
             buffer: Callable[[str, int], torch.Tensor] | None = None) -> Lookup:
        """Read the stored parts onto `device` (only they cross the bus: a quarter to a half of the weight's
        16-bit size), ready to decode. `buffer(role, nbytes)` lends reusable CPU memory (uint8 tensors;
        fresh ones by default)."""
        import torch

        from ..formats.safetensors import torch_dtype

        parts = {}
        for role, (_, ref) in self.parts.items():
            raw = buffer(f"stored:{role}", ref.nbytes) if buffer else torch.empty(ref.nbytes, dtype=torch.uint8)
            ref.read_into(memoryview(raw.numpy()))
            parts[role] = raw.view(torch_dtype(ref.dtype)).view(ref.shape).to(device)
        return self.decode(parts)

    def dequantize(self, device: str | torch.device = "cpu",
                   buffer: Callable[[str, int], torch.Tensor] | None = None) -> torch.Tensor:
        """The float32 weight, as the format's reference implementation computes it, on `device`.

        On the CPU the result goes into `buffer("fp32", nbytes)` when given: fresh memory costs a page
        fault per 4 KiB, which takes longer than the decoding itself.
        """
        import torch

        lookup = self.read(device, buffer)
        on_cpu = torch.device(device).type == "cpu"
        return lookup.decode((lambda nbytes: buffer("fp32", nbytes)) if buffer and on_cpu else None)


@dataclass(frozen=True)
class Lookup:
    """A quantized weight read and ready to decode, in the form every format shares: code row i (uint8)
    becomes `width` float32 values, `table[codes[i]]`, which `scale(start, stop, rows)` then scales in
    place (code rows [start, stop)). The weight's values are the first numel of the decoded rows (a
    4-bit weight's last block may hold padding).
    """

    codes: torch.Tensor  # 2-D uint8 (with `arrange`: their bytes in the stored order, which sets the shape)
    table: torch.Tensor  # 256 entries: float32, or int64 holding a 4-bit byte's two float32 values
    scale: Callable[[int, int, torch.Tensor], object]
    shape: tuple[int, ...]
    # arrange(start, stop): code rows [start, stop), where the stored bytes are in another order than the
    # weight's values (MXFP4 stores each expert's matrix transposed). Made a step at a time, so the
    # rearranged codes never exist whole.
    arrange: Callable[[int, int], torch.Tensor] | None = None

    @property
    def width(self) -> int:
        """Values per code row: `fill` starts at a multiple of it."""
        return self.codes.shape[1] * self.table.element_size() // 4

    def fill(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """The flattened weight's values [start, stop) as float32, decoded into `out` (uint8, on the codes'
        device, with room for the whole code rows they lie in); `start` is a multiple of `width`.

        The gather takes int32 indices (int64 ones would be 8 bytes per code), a few code rows per step
        on the CPU, each scaled while in the cache. A GPU takes eight steps: each step's index, 4 bytes
        per code, is then at most an eighth of the result's size.
        """
        import torch

        if stop <= start:
            return out[:0].view(torch.float32)
        entries, size = self.codes.shape[1], self.table.element_size()  # table entries per code row, and their size
        first, end = start // self.width, -(-stop // self.width)
        decoded = out[: (end - first) * entries * size].view(self.table.dtype).view(end - first, entries)
        if self.codes.device.type == "cpu":
            step = max(1, LOOKUP_BYTES // (entries * size))
        else:
            step = max(1, -(-(end - first) // 8))
        for row in range(first, end, step):
            last = min(end, row + step)
            into = decoded[row - first:last - first]
            codes = self.arrange(row, last) if self.arrange else self.codes[row:last]
            torch.index_select(self.table, 0, codes.reshape(-1).int(), out=into.view(-1))
            self.scale(row, last, into)
        return decoded.view(torch.float32).reshape(-1)[: stop - start]

    def decode(self, empty: Empty | None = None) -> torch.Tensor:
        """The whole weight as float32, in `empty(nbytes)` when given, else in fresh memory."""
        import torch

        nbytes = self.codes.shape[0] * self.width * 4
        out = empty(nbytes) if empty else torch.empty(nbytes, dtype=torch.uint8, device=self.codes.device)
        return self.fill(0, math.prod(self.shape), out).reshape(self.shape)


def float_dtype(name: object, where: str) -> str:
    """The safetensors name of a float dtype as checkpoints' JSON names it ("bfloat16", "torch.float16")."""
    found = NAME_OF_TORCH_DTYPE.get(str(name).removeprefix("torch."))
    if found not in FLOAT_DTYPES:
        raise LorafuseError(f"unknown float dtype {name!r} in {where}; the checkpoint is damaged or too new for lorafuse")
    return found


def byte_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """float32 value of each of the 256 bytes read as `dtype` (int8 or an FP8 type): the table that makes
    `Lookup.fill` give exactly `.to(torch.float32)`."""
    import torch

    return torch.arange(256, dtype=torch.int16, device=device).to(torch.uint8).view(dtype).to(torch.float32)
