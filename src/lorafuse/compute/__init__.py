"""Producing the output tensors that are not raw copies: `rows` (numpy, a block of rows at a time, no torch)
and `tensors` (torch, whole tensors: DoRA, 4-bit output, the GPU); costs.py says which a tensor takes.

This module imports neither numpy nor torch: the path's module is imported when the first tensor needs it.
"""

from __future__ import annotations

import importlib
from typing import Callable

from ..errors import InputError
from ..quant import QuantizedTensor

# write(slot, offset, data): put `data` at `offset` in the output slot with that index (a Producer writes a
# tensor's bytes as it makes them, and returns them all for hashing)
Write = Callable[[int, int, memoryview], None]


def producer(torch_needed: bool, device: str):
    """The path's Producer (imported now: the torch one waits for torch): `output_bytes(tensor, slots, fd, write)`."""
    module = importlib.import_module(".tensors" if torch_needed else ".rows", __name__)
    return module.Producer(device)


def non_finite_error(tensor) -> InputError:
    """Merging `tensor` gave NaN or Inf. The base tensor is read again to say whose they are, since a
    checkpoint can hold NaN itself (on this error path only: a finite merge never pays for it), unless the
    adapter replaces it whole."""
    from ..patches import Replace

    if not any(isinstance(p, Replace) for p in tensor.patches) and not _all_finite(tensor.source):
        return InputError(f"base tensor {tensor.name} already holds NaN or Inf values, so no merge into it is "
                             "finite; repair or re-download the base model")
    origins = ", ".join(o for p in tensor.patches for o in p.origins)
    return InputError(f"merging {tensor.name} gives NaN or Inf values; the adapter tensors ({origins}) are broken")


def _all_finite(source) -> bool:
    """Whether a base tensor holds only finite values: read by numpy when it can be (a plain merge has
    no torch), else (quantized, or another dtype) by torch, which that merge has."""
    from ..formats.arrays import STORED, fp32

    if not isinstance(source, QuantizedTensor) and source.dtype in STORED:
        import numpy as np

        return bool(np.isfinite(fp32(source)).all())
    import torch

    return bool(torch.isfinite(fp32_value(source)).all())


def fp32_value(source):
    """A base tensor's whole value as a float32 torch tensor, dequantized when it is stored quantized."""
    if isinstance(source, QuantizedTensor):
        return source.dequantize()
    import torch

    return source.read().to(torch.float32)


def overflow_error(tensor, largest: float) -> InputError:
    return InputError(f"{tensor.name} overflows {tensor.dtype} (values up to {largest:.3g}); use --dtype bf16 or fp32")
