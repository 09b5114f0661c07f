"""The cost model of producing a tensor, which both the plan (memory estimates) and the producers (compute/)
follow: which of the two paths a tensor takes and the blocks of rows the numpy path works in.

Most tensors are a plain LoRA, a bias update, replaced rows or a cast of a 16/32-bit float tensor on the
CPU: numpy does those a block of rows at a time, so a merge made only of them never imports torch. A
quantized weight with such patches goes the same way, its rows decoded a block at a time by torch. DoRA,
4-bit output and the GPU take torch on whole tensors. Which path a tensor takes depends on the plan and
the device, never on timing, so the same merge always writes the same bytes. Imports neither numpy nor torch.
"""

from __future__ import annotations

import math

from .quant import QuantizedTensor

ROW_DTYPES = {"BF16", "F16", "F32"}  # what the numpy path reads and writes
# The numpy path's rows per block: 256 Ki fp32 values (1 MB), which stays in the CPU's cache. Smaller
# blocks make more Python calls per tensor (a block is about a dozen numpy calls and a write); larger ones
# fall out of the cache (measurements in benchmarks/NOTES.md).
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


def torch_feature(tensor) -> str | None:
    """What makes producing `tensor` (a plan.TensorPlan) on the CPU need torch, as the user would name it
    (for the error when torch is not installed); None when nothing does."""
    if not needs_torch(tensor, "cpu"):
        return None
    source, patches = tensor.computed_from
    if tensor.to_nf4:
        return "--save-method merged_4bit"
    if isinstance(source, QuantizedTensor):
        return f"a quantized base ({source.method})"
    if not all(patch.rowwise for patch in patches):
        return "DoRA"
    refs = [ref for patch in patches for ref in patch.refs] + [source]
    others = sorted({tensor.dtype, *(ref.dtype for ref in refs)} - ROW_DTYPES)
    return f"merging {'/'.join(others)} tensors ({tensor.name})"


def threads_per_worker(tensors, device: str, cores: int, depth: int) -> int:
    """Intra-op threads for each of `depth` pipeline threads (torch's and numpy's BLAS): one where every
    computed tensor is made in rows, since a team of threads spins more than it works on a block of 1 MB
    (it takes several times the CPU and more wall time than one thread each: see benchmarks/NOTES.md);
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
