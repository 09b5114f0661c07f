"""A quantized weight as the planner sees it: one logical tensor stored as several.

Each format module offers `claim(tensors, config)`: it finds the weights it stores, returns them as
QuantizedTensor values keyed by the weight's name, and so takes their auxiliary tensors (scales,
absmax, quant states) out of the plain-tensor namespace. Reading happens only in `dequantize`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class QuantizedTensor:
    name: str
    method: str  # e.g. "bnb-nf4", "bnb-int8", "fp8-block"
    parts: dict  # role (the format's name for it) -> (checkpoint key, TensorRef)
    shape: tuple[int, ...]
    dtype: str  # safetensors name of the dtype it dequantizes to (the model's dtype)
    decode: Callable[[dict[str, torch.Tensor]], torch.Tensor] = field(compare=False, repr=False)

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

    def dequantize(self) -> torch.Tensor:
        """The float32 weight, as the format's reference implementation computes it."""
        return self.decode({role: ref.read() for role, (_, ref) in self.parts.items()}).reshape(self.shape)
