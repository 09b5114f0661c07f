"""A quantized weight as the planner sees it: one logical tensor stored as several.

Each format module offers `claim(tensors, config)`: it finds the weights it stores, returns them as
QuantizedTensor values keyed by the weight's name, and so takes their auxiliary tensors (scales,
absmax, quant states) out of the plain-tensor namespace. Reading happens only in `dequantize`.

Every format stores one byte (or two 4-bit codes) per value: `lookup_rows` turns those bytes into float32
through a 256-entry table, the way the formats' own kernels do, at several times the speed of torch's
casts and gathers on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

Empty = Callable[[int], "torch.Tensor"]  # nbytes -> uint8 tensor to decode into

# Output bytes decoded per step on the CPU: a step's values stay in the CPU's cache from the lookup to
# the scaling. The gather alone, 8 Mi codes on one core: 158 ms on int64 indices, 31 ms on int32 ones in
# one step, 9-13 ms in steps of 16-256 Ki codes (see benchmarks/NOTES.md).
LOOKUP_BYTES = 1 << 19


@dataclass(frozen=True)
class QuantizedTensor:
    name: str
    method: str  # e.g. "bnb-nf4", "bnb-int8", "fp8-block"
    parts: dict  # role (the format's name for it) -> (checkpoint key, TensorRef)
    shape: tuple[int, ...]
    dtype: str  # safetensors name of the dtype it dequantizes to (the model's dtype)
    # decode(parts, empty=...): the float32 weight from its stored parts, in memory from `empty` (lookup_rows)
    decode: Callable[[dict[str, torch.Tensor], Empty | None], torch.Tensor] = field(compare=False, repr=False)

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

    def dequantize(self, device: str | torch.device = "cpu",
                   buffer: Callable[[str, int], torch.Tensor] | None = None) -> torch.Tensor:
        """The float32 weight, as the format's reference implementation computes it, on `device` (the
        stored bytes cross the bus, a quarter to a half of the weight's 16-bit size).

        `buffer(role, nbytes)` lends reusable CPU memory (uint8 tensors; fresh ones by default) for the
        stored parts and, on the CPU, the result: fresh memory costs a page fault per 4 KiB (one
        4096 × 4096 NF4 weight on one core: 52-69 ms into fresh memory, 14-16 ms into reused).
        """
        import torch

        from ..formats.safetensors import torch_dtype

        buffer = buffer or (lambda role, nbytes: torch.empty(nbytes, dtype=torch.uint8))
        parts = {}
        for role, (_, ref) in self.parts.items():
            raw = buffer(f"stored:{role}", ref.nbytes)
            ref.read_into(memoryview(raw.numpy()))
            parts[role] = raw.view(torch_dtype(ref.dtype)).view(ref.shape).to(device)
        on_cpu = torch.device(device).type == "cpu"
        return self.decode(parts, empty=(lambda nbytes: buffer("fp32", nbytes)) if on_cpu else None).reshape(self.shape)


def lookup_rows(codes: torch.Tensor, table: torch.Tensor, scale: Callable[[int, int, torch.Tensor], object],
                empty: Empty | None = None) -> torch.Tensor:
    """`table[codes]` for 2-D uint8 `codes` and a 256-entry `table`, a few rows at a time; after each
    step `scale(start, stop, rows)` scales rows [start, stop) in place while they are in the cache.
    The result is in `empty(nbytes)` (uint8, on the codes' device) when given, else in fresh memory.

    The gather takes int32 indices (int64 ones would be 8 bytes per code). A GPU takes eight steps: each
    step's index, 4 bytes per code, is then at most an eighth of the result's size.
    """
    import torch

    rows, width = codes.shape
    if empty is None:
        out = torch.empty(rows, width, dtype=table.dtype, device=codes.device)
    else:
        out = empty(rows * width * table.element_size()).view(table.dtype).view(rows, width)
    if codes.device.type == "cpu":
        step = max(1, LOOKUP_BYTES // max(1, width * table.element_size()))
    else:
        step = max(1, -(-rows // 8))
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        torch.index_select(table, 0, codes[start:stop].reshape(-1).int(), out=out[start:stop].view(-1))
        scale(start, stop, out[start:stop])
    return out


def byte_values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """float32 value of each of the 256 bytes read as `dtype` (int8 or an FP8 type): the table that makes
    `lookup_rows` give exactly `.to(torch.float32)`."""
    import torch

    return torch.arange(256, dtype=torch.int16, device=device).to(torch.uint8).view(dtype).to(torch.float32)
