"""The numpy path: a plain LoRA, a bias update, replaced rows or a cast of a 16/32-bit float tensor or of a
quantized weight, on the CPU.

The tensor is seen as a matrix (rows × the rest) and done one block of rows at a time, in fp32 buffers
that stay in the CPU's cache: widen to fp32 (or decode: torch's gather, see quant.Lookup), apply the
patches (each changes rows independently: see patches.py), check for NaN and Inf, round once to the
output dtype. Rounding is to nearest, ties to even, as torch rounds (formats.arrays); a merge of 16/32-bit
tensors needs no torch at all.
"""

from __future__ import annotations

import math
import threading
from typing import Callable

from typing import TYPE_CHECKING

import numpy as np

from ..costs import block_shape, matrix_shape
from ..formats.arrays import STORED, narrow, widen
from ..formats.safetensors import TensorSlot, dtype_size, read_exact
from ..quant import QuantizedTensor
from ..patches import AddedRows
from . import Write, non_finite_error, overflow_error

try:  # the fused last step, compiled at install where a C compiler is found (setup.py)
    from ._kernels import add_round
except ImportError:
    add_round = None
FUSED_DTYPES = {"BF16", "F32"}

if TYPE_CHECKING:
    from ..plan import TensorPlan


class Buffers(threading.local):
    """One thread's reusable byte buffers, grown to the largest tensor it has handled (both paths use them).

    Reusing them avoids allocating (and page-faulting in) fresh memory for every tensor, and keeps the
    process's resident memory at a few largest tensors however many tensors pass through.
    """

    def __init__(self) -> None:
        self.pool: dict[str, np.ndarray] = {}

    def get(self, role: str, nbytes: int) -> np.ndarray:
        buf = self.pool.get(role)
        if buf is None or buf.nbytes < nbytes:
            self.pool[role] = buf = np.empty(nbytes, dtype=np.uint8)
        return buf[:nbytes]

    def tensor(self, role: str, nbytes: int):
        """`get` as a torch uint8 tensor sharing the memory (the torch path's buffers, and the stored parts
        of a quantized weight)."""
        import torch

        return torch.from_numpy(self.get(role, nbytes))


class Producer:
    """Produces tensors in numpy, each worker thread in buffers of its own."""

    def __init__(self, device: str) -> None:
        self.buffers = Buffers()

    @staticmethod
    def intra_op_threads(n: int):
        """Each pipeline thread's share of the cores for numpy's BLAS: left alone, every worker's OpenBLAS
        thread team would use all the cores, and the teams would compete for them, slowing the merge."""
        from threadpoolctl import threadpool_limits

        return threadpool_limits(limits=n, user_api="blas")

    def output_bytes(self, tensor: TensorPlan, slots: tuple[TensorSlot, ...], source_fd: int | None,
                     write: Write) -> list[memoryview]:
        """Write the tensor's bytes block by block, while each is still in the CPU cache (the kernel then
        copies it into the page cache from there, not from memory), and return them all."""
        source, patches = tensor.computed_from
        rows, cols = matrix_shape(tensor.shape)
        if isinstance(source, QuantizedTensor):
            updates = [patch.row_update(tensor.shape) for patch in patches]
            return self._write_rows(tensor, updates, self._decoder(source, cols), source.code_width, write=write)
        raw = self.buffers.get("in", source.nbytes)
        if source is tensor.source:
            read_exact(source_fd, memoryview(raw), source.offset, source.path)
        else:
            source.read_into(memoryview(raw))
        stored = raw.view(STORED[source.dtype]).reshape(rows, cols)
        # The result overwrites rows already read when it is no wider than the source: one tensor buffer.
        out_raw = raw if dtype_size(tensor.dtype) <= dtype_size(source.dtype) else None
        updates = [patch.row_update(tensor.shape) for patch in patches]
        if add_round is not None and rows * cols and {source.dtype, tensor.dtype} <= FUSED_DTYPES \
                and len(updates) == 1 and isinstance(updates[0], AddedRows):
            return self._write_fused(tensor, updates[0], stored, source.dtype, write=write, out_raw=out_raw)

        def fill(start: int, stop: int, block: np.ndarray) -> None:
            widen(stored[start:stop], source.dtype, block[:(stop - start) * cols].reshape(-1, cols))
        return self._write_rows(tensor, updates, fill, write=write, out_raw=out_raw)

    def _decoder(self, source: QuantizedTensor, cols: int) -> Callable[[int, int, np.ndarray], None]:
        """fill(start, stop, block) for a quantized weight: its rows [start, stop) decoded into the block by
        torch (`start` where a code row begins: see compute.block_shape)."""
        import torch

        lookup = source.read("cpu", self.buffers.tensor)

        def fill(start: int, stop: int, block: np.ndarray) -> None:
            lookup.fill(start * cols, stop * cols, torch.from_numpy(block.view(np.uint8)))

        return fill

    def _write_fused(self, tensor: TensorPlan, update: AddedRows, stored: np.ndarray, stored_dtype: str, *,
                     write: Write, out_raw: np.ndarray | None) -> list[memoryview]:
        """`_write_rows` for one added change to a stored BF16/F32 matrix: per block of rows, the change is
        made into a buffer and the compiled kernel widens, adds, checks and rounds in one pass."""
        rows, cols = stored.shape
        row_bytes = cols * dtype_size(tensor.dtype)
        out_raw = self._output_buffer(rows * row_bytes, out_raw)
        step, _ = block_shape(cols)
        change = self.buffers.get("scratch", min(step, rows) * cols * 4).view(np.float32)
        for start in range(0, rows, step):
            stop = min(rows, start + step)
            block = change[:(stop - start) * cols].reshape(-1, cols)
            update.delta(start, block)
            done = out_raw[start * row_bytes:stop * row_bytes]
            if not add_round(stored[start:stop], stored_dtype == "BF16", block, done, tensor.dtype == "BF16"):
                raise non_finite_error(tensor)
            write(0, start * row_bytes, memoryview(done))
        return [memoryview(out_raw)]

    def _output_buffer(self, nbytes: int, given: np.ndarray | None) -> np.ndarray:
        return given[:nbytes] if given is not None else self.buffers.get("out", nbytes)

    def _write_rows(self, tensor: TensorPlan, updates: list, fill: Callable[[int, int, np.ndarray], None],
                    code_width: int = 0, *, write: Write, out_raw: np.ndarray | None = None) -> list[memoryview]:
        """Make the tensor a block of rows at a time: `fill(start, stop, block)` puts rows [start, stop) in
        the block as fp32, then the patches' `updates`, the check and the rounding, and the rows are
        written. Blocks are shaped for a source whose code rows hold `code_width` values
        (compute.block_shape); the result goes into `out_raw` when given."""
        rows, cols = matrix_shape(tensor.shape)
        row_bytes = cols * dtype_size(tensor.dtype)
        out_raw = self._output_buffer(rows * row_bytes, out_raw)
        if rows * cols == 0:
            write(0, 0, memoryview(out_raw))
            return [memoryview(out_raw)]
        out = out_raw.view(STORED[tensor.dtype]).reshape(rows, cols)
        step, room = block_shape(cols, code_width)
        block = self.buffers.get("block", (min(step, rows) * cols + room) * 4).view(np.float32)
        scratch = self.buffers.get("scratch", min(step, rows) * cols * 4).view(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):  # NaN, Inf and overflow are checked for below
            for start in range(0, rows, step):
                n = min(rows - start, step) * cols
                fill(start, start + n // cols, block)
                self._block(tensor, start, updates, block[:n].reshape(-1, cols), scratch[:n].reshape(-1, cols),
                            out[start:start + step])
                write(0, start * row_bytes, memoryview(out_raw[start * row_bytes:(start + step) * row_bytes]))
        return [memoryview(out_raw)]

    @staticmethod
    def _block(tensor: TensorPlan, start: int, updates: list, block: np.ndarray, scratch: np.ndarray,
               out: np.ndarray) -> None:
        """Rows [start, start + len(block)), in fp32 in the block: patch, check, round."""
        for update in updates:
            update(block, start, scratch)
        finite = math.isfinite(float(block.sum())) or bool(np.isfinite(block).all())
        if not finite and tensor.patches:
            raise non_finite_error(tensor)
        narrow(block, tensor.dtype, out, scratch, nan_free=finite)
        if tensor.dtype == "F16" and finite and not np.isfinite(out).all():
            raise overflow_error(tensor, float(np.abs(block).max()))
