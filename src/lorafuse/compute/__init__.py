"""Producing the output tensors that are not raw copies, by one of two paths chosen from the plan alone.

Most are a plain LoRA, a bias update, replaced rows or a cast of a 16/32-bit float tensor on the CPU:
numpy does those a block of rows at a time (`rows`), so a merge made only of them never imports torch,
which costs 1.3 s holding the GIL before the first merged tensor and 200 MB of memory. A quantized
weight with such patches goes the same way, its rows decoded a block at a time by torch. DoRA, 4-bit
output and the GPU take torch on whole tensors (`tensors`). Which path a tensor takes depends on the
plan and the device, never on timing, so the same merge always writes the same bytes.

This module imports neither numpy nor torch: planning asks it which path is needed.
"""

from __future__ import annotations

import importlib
import math
from typing import Callable

from ..errors import InputError
from ..quant import QuantizedTensor

# write(slot, offset, data): put `data` at `offset` in the output slot with that index (a Producer writes a
# tensor's bytes as it makes them, and returns them all for hashing)
Write = Callable[[int, int, memoryview], None]
ROW_DTYPES = {"BF16", "F16", "F32"}  # what the numpy path reads and writes
# The numpy path's rows per block: 256 Ki fp32 values (1 MB), cached. A 5632 × 2048 LoRA merge alone
# takes 24-24.5 ms in blocks of 128 Ki or 256 Ki values, 28 ms in blocks of 32 Ki; in a whole merge the
# larger blocks halve the Python calls (4 GB: 0.3 s less CPU than 128 Ki, see benchmarks/NOTES.md).
BLOCK_VALUES = 1 << 18


def block_shape(cols: int, code_width: int = 0) -> tuple[int, int]:
    """The numpy path's block for a matrix of `cols` columns: (rows per block, values to spare beyond them).
    A quantized weight whose code rows span matrix rows (`code_width` values each: bnb 4-bit's blocksize)
    is decoded from the start of a code row: a block then starts at a multiple of the rows that align
    with code rows, and needs room for the rest of the code row its last value lies in. The plan's memory
    estimate uses the same shape."""
    unit = code_width // math.gcd(code_width, cols) if code_width and cols else 1
    return max(1, BLOCK_VALUES // max(cols, 1) // unit) * unit, code_width if unit > 1 else 0


def in_rows(tensor, device: str) -> bool:
    """Whether `tensor` (a plan.TensorPlan, not a raw copy) is made a block of rows at a time: on the CPU,
    16/32-bit floats in and out, every patch rowwise, read from a stored tensor or a quantized weight."""
    if device != "cpu" or tensor.to_nf4:
        return False
    source, patches = tensor.computed_from
    refs = [ref for patch in patches for ref in patch.refs]
    if not isinstance(source, QuantizedTensor):
        refs.append(source)
    return tensor.dtype in ROW_DTYPES and all(ref.dtype in ROW_DTYPES for ref in refs) \
        and all(patch.rowwise for patch in patches)


def needs_torch(tensor, device: str) -> bool:
    """Whether producing `tensor` (a plan.TensorPlan) needs torch, and so the torch path's Producer (which
    hands what is made in rows to the numpy one); a raw copy needs neither."""
    if tensor.is_copy:
        return False
    return isinstance(tensor.computed_from[0], QuantizedTensor) or not in_rows(tensor, device)


def threads_per_worker(tensors, device: str, cores: int, depth: int) -> int:
    """Intra-op threads for each of `depth` pipeline threads (torch's and numpy's BLAS): one where every
    computed tensor is made in rows, since a team of threads spins more than it works on a block of 1 MB
    (16 cores, 2 GB NF4 base: 35-42 s of CPU and 3.7-4.7 s with two each, 8 s and 2.8-3.8 s with one);
    the worker's share of the cores where some tensor takes torch whole (DoRA, 4-bit output, the GPU).
    The settings are the process's, so in a merge that has both, the rows get that share too."""
    whole = any(not t.is_copy and not in_rows(t, device) for t in tensors)
    return max(1, cores // depth) if whole else 1


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """A tensor as the numpy path sees it, rows × the rest: a vector is one row, a convolution's kernel
    joins its inputs."""
    if len(shape) < 2:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def producer(torch_needed: bool, device: str):
    """The path's Producer (imported now: the torch one waits for torch): `output_bytes(tensor, slots, fd, write)`."""
    module = importlib.import_module(".tensors" if torch_needed else ".rows", __name__)
    return module.Producer(device)


def not_finite(tensor) -> InputError:
    """Merging `tensor` gave NaN or Inf. The base tensor is read again to say whose they are, since a
    checkpoint can hold NaN itself (on this error path only: a finite merge never pays for it), unless the
    adapter replaces it whole."""
    import torch

    from ..patches import Replace

    if not any(isinstance(p, Replace) for p in tensor.patches) and not torch.isfinite(fp32_value(tensor.source)).all():
        return InputError(f"base tensor {tensor.name} already holds NaN or Inf values, so no merge into it is "
                             "finite; repair or re-download the base model")
    origins = ", ".join(o for p in tensor.patches for o in p.origins)
    return InputError(f"merging {tensor.name} gives NaN or Inf values; the adapter tensors ({origins}) are broken")


def fp32_value(source):
    """A base tensor's whole value as a float32 torch tensor, dequantized when it is stored quantized."""
    if isinstance(source, QuantizedTensor):
        return source.dequantize()
    import torch

    return source.read().to(torch.float32)


def overflows(tensor, largest: float) -> InputError:
    return InputError(f"{tensor.name} overflows {tensor.dtype} (values up to {largest:.3g}); use --dtype bf16 or fp32")
