"""The torch path: dequantize or cast, patch in fp32 (DoRA too), round once, or quantize to 4 bits; on the
CPU or a GPU. A merge that needs it starts importing torch on a thread of its own once planned, and
copies untouched tensors (and hashes them) meanwhile. A quantized weight that the numpy path can finish
(`in_rows`) goes to it, to be decoded a block of rows at a time.
"""

from __future__ import annotations

import contextlib
import math
from typing import TYPE_CHECKING, Callable

import torch

from ..formats.safetensors import TensorSlot, dtype_size, read_exact, torch_dtype
from ..quant import QuantizedTensor
from ..costs import in_rows
from . import Write, non_finite_error, overflow_error, rows

if TYPE_CHECKING:
    from ..plan import TensorPlan


class Producer:
    """Produces tensors on `device`, each worker thread in buffers of its own."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.numpy_path = rows.Producer(device)
        self.buffer = self.numpy_path.buffers.tensor  # (role, nbytes) -> this thread's reused uint8 tensor

    def output_bytes(self, tensor: TensorPlan, slots: tuple[TensorSlot, ...], source_fd: int | None,
                     write: Write) -> list[memoryview]:
        """Write the bytes of each of the tensor's slots (one, or a 4-bit weight's parts), and return them
        (in the thread's buffers)."""
        if in_rows(tensor, self.device.type):
            return self.numpy_path.output_bytes(tensor, slots, source_fd, write)
        if isinstance(tensor.source, QuantizedTensor):
            value = tensor.source.dequantize(self.device, self.buffer)
        else:
            raw = self.buffer("in", tensor.source.nbytes)
            read_exact(source_fd, memoryview(raw.numpy()), tensor.source.offset, tensor.source.path)
            value = raw.view(torch_dtype(tensor.source.dtype)).view(tensor.source.shape)
        out = _produce(tensor, value, self.buffer, self.device)
        pieces = _nf4_pieces(tensor, out, slots) if tensor.to_nf4 else [out]
        pieces = [memoryview(piece.reshape(-1).view(torch.uint8).numpy()) for piece in pieces]
        for slot, piece in enumerate(pieces):
            write(slot, 0, piece)
        return pieces

    @staticmethod
    @contextlib.contextmanager
    def intra_op_threads(n: int):
        """Give each pipeline thread its share of the cores, for torch and for the numpy path's BLAS: more
        torch threads than cores makes their OpenMP teams spin against each other instead of working."""
        before = torch.get_num_threads()
        torch.set_num_threads(n)
        try:
            with rows.Producer.intra_op_threads(n):
                yield
        finally:
            torch.set_num_threads(before)


def _produce(tensor: TensorPlan, source: torch.Tensor, buffer: Callable[[str, int], torch.Tensor],
             device: torch.device) -> torch.Tensor:
    """One tensor's output value: the base value patched in fp32 and rounded once to the output dtype."""
    out_dtype = torch_dtype(tensor.dtype)
    value = source
    if tensor.patches:
        if device.type != "cpu":
            # The bus carries the stored bytes and the GPU widens them: a copy between devices that also
            # converts converts on the CPU, into a temporary of its own.
            value = source.to(device).to(torch.float32)
        elif source.dtype != torch.float32:  # fp32 sources are patched in place
            value = buffer("fp32", source.numel() * 4).view(torch.float32).view(source.shape).copy_(source)
        else:
            value = source
        for patch in tensor.patches:
            value = patch.apply(value)
        if not all_finite(value):
            raise non_finite_error(tensor)
    if value.dtype == out_dtype and value.device.type == "cpu":
        out = value
    else:
        # Once the value lives in the fp32 buffer the read buffer is free: the result goes there, and a
        # thread holds two tensor-sized buffers, not three.
        role = "in" if value.data_ptr() != source.data_ptr() and source.device.type == "cpu" else "out"
        nbytes = value.numel() * dtype_size(tensor.dtype)
        rounded = value if value.device.type == "cpu" else value.to(out_dtype)  # on the GPU, as above
        out = buffer(role, nbytes).view(out_dtype).view(value.shape).copy_(rounded)
    if out_dtype == torch.float16 and not all_finite(out) and all_finite(value):
        raise overflow_error(tensor, value.abs().max().item())
    return out


def _nf4_pieces(tensor: TensorPlan, value: torch.Tensor, slots: tuple[TensorSlot, ...]) -> list[torch.Tensor]:
    """The merged 16-bit weight quantized as bitsandbytes does, in the order of its planned slots."""
    from ..quant import bnb

    parts = bnb.quantize_4bit(value)
    pieces = [parts[slot.name[len(tensor.name):]] for slot in slots]
    pieces[-1] = bnb.pad_quant_state(pieces[-1], slots[-1].nbytes)
    return pieces


def all_finite(t: torch.Tensor) -> bool:
    """A NaN or Inf anywhere makes the fp32 sum non-finite: one fast reduction instead of a mask.
    Only a sum that overflows from finite values (beyond 3e38) takes the exact path."""
    if not t.is_floating_point():
        return True
    total = t.sum(dtype=torch.float32).item()
    return math.isfinite(total) or bool(torch.isfinite(t).all())
