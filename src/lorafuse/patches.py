"""The merge arithmetic, in one place.

Each patch changes one base tensor. `out_shape` checks it against the base tensor's shape before any
data is read; `apply` changes an fp32 tensor in place (or returns a new one when the shape changes).
Deltas are computed in fp32 and added to the fp32 base value, then the result is rounded once to the
output dtype: at least as close to the exact result as PEFT's merge, which rounds the delta first.

Patches that change each row of W independently of the others (`rowwise`) also have `row_update`: the
same arithmetic in numpy on a block of rows, for the path that needs no torch (compute/rows.py). The
weight is then seen as a matrix, rows × the rest (a vector is one row).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import TYPE_CHECKING, Callable, Protocol

from .errors import LorafuseError
from .formats.safetensors import dtype_size

if TYPE_CHECKING:
    import numpy as np
    import torch

    # update(block, first_row, scratch): change W's rows [first_row, first_row + len(block)), held in
    # `block` (fp32, in place); `scratch` is fp32 of the block's shape, free to use
    RowUpdate = Callable[[np.ndarray, int, np.ndarray], None]


class AddedRows:
    """A RowUpdate that adds a change made a block at a time: `delta(first_row, out)` writes the change to
    rows [first_row, first_row + len(out)) into `out` (fp32). Apart from being called as a RowUpdate, it
    lets the numpy path add the change while it rounds, in one pass (compute/_kernels.c)."""

    def __init__(self, delta: Callable[[int, np.ndarray], None]) -> None:
        self.delta = delta

    def __call__(self, block: np.ndarray, start: int, scratch: np.ndarray) -> None:
        self.delta(start, scratch)
        block += scratch


def _load(ref, like: torch.Tensor) -> torch.Tensor:
    """An adapter tensor in the precision and on the device of the weight it patches (fp32 when merging)."""
    return ref.read().to(device=like.device, dtype=like.dtype)


def _mismatch(origin: str, what: str, got, want) -> LorafuseError:
    return LorafuseError(
        f"adapter tensor {origin} has shape {tuple(got)} but the base needs {tuple(want)} for {what}; "
        "was the adapter trained on a different base model?"
    )


@dataclass(frozen=True)
class SliceRef:
    """Part of an adapter tensor, by basic indexing (an int drops its dimension, a slice keeps it, with a
    step where PEFT interleaves experts): the factors of one expert, or of the part of a fused weight that
    one checkpoint tensor holds (layouts.cut). A tensor in a file is read from the first row needed to the
    last, so that an expert's factors cost about their own size, not all the experts'."""

    ref: object
    index: tuple  # one int or slice per dimension of `ref`

    @property
    def dtype(self) -> str:
        return self.ref.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(range(*i.indices(n))) for i, n in zip(self.index, self.ref.shape) if isinstance(i, slice))

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtype_size(self.dtype)

    @property
    def read_bytes(self) -> int:
        """Bytes read (and held while they are cut) to make it."""
        return self._rows()[0].nbytes

    @property
    def shared(self) -> bool:
        """Whether it interleaves with the parts of other experts (lora_B's columns): its rows are then read
        once for all of them (SLICE_CACHE)."""
        return any(isinstance(i, slice) and i.step not in (None, 1) for i in self.index)

    def _rows(self) -> tuple[object, tuple]:
        """What is read (the file's rows from the first needed to the last) and the index into it."""
        first, rows = self.index[0], self.ref.shape[0]
        if not hasattr(self.ref, "offset") or not rows:  # a tensor in memory (a pickle's) is cut as it is
            return self.ref, self.index
        if isinstance(first, int):
            start, stop, inner = first, first + 1, 0
        else:
            start, stop, step = first.indices(rows)
            if step != 1 or stop <= start:
                return self.ref, self.index
            inner = slice(None)
        row = self.ref.nbytes // rows
        part = replace(self.ref, offset=self.ref.offset + start * row, nbytes=(stop - start) * row,
                       shape=(stop - start,) + tuple(self.ref.shape[1:]))
        return part, (inner,) + tuple(self.index[1:])

    def read(self) -> torch.Tensor:
        from .formats.safetensors import bytes_to_tensor

        return bytes_to_tensor(self.read_into(bytearray(self.nbytes)), self.dtype, self.shape)

    def read_into(self, buf: bytearray | memoryview) -> bytearray | memoryview:
        import numpy as np

        part, index = self._rows()
        shared = self.shared and hasattr(part, "path")
        raw = _rows_read(part, _version(part.path)) if shared else part.read_into(bytearray(part.nbytes))
        stored = np.frombuffer(raw, np.uint8).reshape(*part.shape, dtype_size(self.dtype))
        memoryview(buf)[:] = np.ascontiguousarray(stored[index]).reshape(-1)
        return buf


# Rows of lora_B kept after they are read: every expert of a weight is cut from the same rows (PEFT
# interleaves the experts' columns), and a checkpoint stores each expert's tensors together (gate, up and
# down: three row ranges in turn), the experts one after another.
SLICE_CACHE = 4


@lru_cache(maxsize=SLICE_CACHE)
def _rows_read(part, version: tuple) -> bytes:
    """The bytes of `part` (a TensorRef's rows that several experts' columns interleave), read once for
    all the expert slices cut from them; `version`
    (the file's identity and change time) makes a file rewritten since a new entry."""
    return bytes(part.read_into(bytearray(part.nbytes)))


def forget_cut_rows() -> None:
    """Drop the rows kept for cutting experts' factors: a merge is over (a process may live on, a training
    script's, with its memory)."""
    _rows_read.cache_clear()


def _version(path) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class Patch(Protocol):
    """A change to one base tensor: what the plan, the producers and verify need of it.

    `out_shape` checks it against the base tensor's shape before any data is read; `apply` changes an fp32
    torch tensor in place (or returns a new one when the shape changes): the path for whole tensors, DoRA,
    4-bit output and the GPU. A `rowwise` patch, which changes each row independently, also has
    `row_update`: the same arithmetic in numpy on blocks of rows, which lets most merges run without
    importing torch at all. The two are kept on purpose and tested against each other
    (tests/test_compute_paths.py); see costs.py for which a tensor takes."""

    label: str  # its kind, as the plan counts and shows them
    rowwise: bool
    adapter: int  # which of the merge's adapters it comes from (an index into Plan.adapters)

    @property
    def refs(self) -> tuple:
        """The adapter tensors it reads."""

    @property
    def origins(self) -> tuple[str, ...]:
        """Their names in the adapter file, for messages and verify."""

    def out_shape(self, shape: tuple[int, ...], name: str) -> tuple[int, ...]: ...

    def apply(self, w: torch.Tensor) -> torch.Tensor: ...

    def row_update(self, shape: tuple[int, ...]) -> RowUpdate: ...


class OneTensor:
    """The bookkeeping of a patch read from one adapter tensor (the field TENSOR names), saved as `origin`."""

    TENSOR: str

    @property
    def refs(self) -> tuple:
        return (getattr(self, self.TENSOR),)

    @property
    def origins(self) -> tuple[str, ...]:
        return (self.origin,)


@dataclass(frozen=True)
class Replace(OneTensor):
    """A whole tensor saved by the adapter (modules_to_save, bias="all", a resized embedding)."""

    source: object
    origin: str
    adapter: int = 0
    label = "replace"
    TENSOR = "source"
    rowwise = True  # the numpy path reads the replacing tensor instead of the base

    def out_shape(self, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
        new = tuple(self.source.shape)
        # Only the rows of a matrix (an embedding's vocabulary) may change, as after resize_token_embeddings.
        if new != tuple(shape) and (len(shape) != 2 or len(new) != 2 or new[1] != shape[1]):
            raise _mismatch(self.origin, f"replacing {name}", new, shape)
        return new

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        return _load(self.source, w)


@dataclass(frozen=True)
class LoRA:
    """W' = W + s·B@A (PEFT lora.Linear/Embedding.get_delta_weight), or DoRA's
    W' = m / ||W + s·B@A|| · (W + s·B@A) with the norm per output row (per feature column for
    embeddings), as in PEFT's DoraLinearVariant/DoraEmbeddingVariant.merge_safe.

    kind is "linear" (A: r×in, B: out×r; W: out×in, or in×out when fan_in_fan_out as in GPT-2's
    Conv1D; conv weights are treated as out×(in·k…) with a 1×1 B), or "embedding"
    (A: r×vocab, B: dim×r, W: vocab×dim).
    """

    A: object
    B: object
    scale: float
    kind: str
    fan_in_fan_out: bool
    magnitude: object | None
    origins: tuple[str, ...]
    layer_known: bool = False  # fan_in_fan_out comes from the layer's type (plan._orient), not the saved config
    adapter: int = 0

    @property
    def label(self) -> str:
        return "dora" if self.magnitude is not None else "lora"

    @property
    def rowwise(self) -> bool:
        return self.magnitude is None  # DoRA's norm mixes rows

    @property
    def refs(self) -> tuple:
        return (self.A, self.B) + ((self.magnitude,) if self.magnitude is not None else ())

    def transposed(self, shape: tuple[int, ...]) -> bool:
        """Whether W is stored input-major (delta = s·(B@A)ᵀ): embeddings and fan-in-fan-out weights.

        For linear layers fan_in_fan_out decides when the planner knows the layer's type (PEFT sets it
        from the type, plan._orient), so a delta whose shape only fits transposed is refused, as PEFT
        refuses it. Otherwise (a model with its own code) the shapes decide, and for square weights the
        saved fan_in_fan_out.
        """
        if self.kind == "embedding":
            return True
        if len(shape) != 2:
            return False
        out_in = (self.B.shape[0], self.A.shape[1])
        if self.layer_known or out_in[0] == out_in[1]:
            return self.fan_in_fan_out
        return tuple(shape) == out_in[::-1]

    def out_shape(self, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
        a, b = tuple(self.A.shape), tuple(self.B.shape)
        if len(a) > 2:  # convolution: A is r×in×k…, B is out×r×1…
            if len(shape) != len(a) or a[1:] != tuple(shape[1:]) or b[0] != shape[0] or any(d != 1 for d in b[2:]):
                raise _mismatch(self.origins[0], f"a LoRA on convolution {name} {tuple(shape)}", a, (a[0],) + tuple(shape[1:]))
            if self.magnitude is not None:
                raise LorafuseError(f"{self.origins[0]}: DoRA on convolution layers is not supported yet")
            return tuple(shape)
        want = (b[0], a[1]) if self.kind == "linear" else (a[1], b[0])
        if self.transposed(shape) and self.kind == "linear":
            want = want[::-1]
        if tuple(shape) != want:
            raise LorafuseError(
                f"adapter tensors {self.origins[0]} {a} and {self.origins[1]} {b} make a delta of shape {want} "
                f"but base tensor {name} is {tuple(shape)}; was the adapter trained on a different base model?"
            )
        if self.magnitude is not None:
            rows = shape[1] if self.transposed(shape) else shape[0]
            if tuple(self.magnitude.shape) != (rows,):
                raise _mismatch(self.origins[2], f"the DoRA magnitude of {name}", self.magnitude.shape, (rows,))
        return tuple(shape)

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        A, B = _load(self.A, w), _load(self.B, w)
        if A.dim() > 2:  # conv: flatten the kernel into the input dimension
            w.view(w.shape[0], -1).addmm_(B.reshape(B.shape[0], -1), A.reshape(A.shape[0], -1), alpha=self.scale)
            return w
        transposed = self.transposed(tuple(w.shape))
        if transposed:
            w.addmm_(A.T, B.T, alpha=self.scale)
        else:
            w.addmm_(B, A, alpha=self.scale)
        if self.magnitude is not None:
            import torch

            m = _load(self.magnitude, w)
            if transposed:  # norm over the rows of each column (output feature)
                w.mul_((m / torch.linalg.vector_norm(w, dim=0)).view(1, -1))
            else:
                w.mul_((m / torch.linalg.vector_norm(w, dim=1)).view(-1, 1))
        return w

    def row_update(self, shape: tuple[int, ...]) -> RowUpdate:
        """W[rows] += (s·B)[rows] @ A, or (s·Aᵀ)[rows] @ Bᵀ when W is stored input-major."""
        import numpy as np

        from .formats.arrays import fp32

        A, B = fp32(self.A), fp32(self.B)
        A, B = A.reshape(A.shape[0], -1), B.reshape(B.shape[0], -1)  # a convolution's kernel joins its inputs
        if self.transposed(shape):
            left, right = np.ascontiguousarray(A.T), np.ascontiguousarray(B.T)
        else:
            left, right = B, A
        left *= np.float32(self.scale)

        def delta(start: int, out: np.ndarray) -> None:
            np.matmul(left[start:start + len(out)], right, out=out)
        return AddedRows(delta)


@dataclass(frozen=True)
class AddBias(OneTensor):
    """lora_bias: b' = b + s·lora_B.bias (PEFT lora.Linear.merge)."""

    bias: object
    scale: float
    origin: str
    adapter: int = 0
    label = "lora_bias"
    TENSOR = "bias"
    rowwise = True

    def out_shape(self, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
        if tuple(self.bias.shape) != tuple(shape):
            raise _mismatch(self.origin, f"the bias {name}", self.bias.shape, shape)
        return tuple(shape)

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        return w.add_(_load(self.bias, w), alpha=self.scale)

    def row_update(self, shape: tuple[int, ...]) -> RowUpdate:
        import numpy as np

        from .formats.arrays import fp32

        delta = fp32(self.bias).reshape(1, -1) * np.float32(self.scale)  # a vector: one row

        def update(block: np.ndarray, start: int, scratch: np.ndarray) -> None:
            block += delta
        return update


@dataclass(frozen=True)
class ReplaceRows(OneTensor):
    """trainable_token_indices: W[indices] = rows (PEFT TrainableTokensLayer.merge, an index_copy)."""

    rows: object
    indices: tuple[int, ...]
    origin: str
    adapter: int = 0
    label = "rows"
    TENSOR = "rows"
    rowwise = True

    def out_shape(self, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
        want = (len(self.indices),) + tuple(shape[1:])
        if tuple(self.rows.shape) != want:
            raise _mismatch(self.origin, f"{len(self.indices)} rows of {name}", self.rows.shape, want)
        bad = [i for i in self.indices if not 0 <= i < shape[0]]
        if bad:
            raise LorafuseError(f"{self.origin}: token indices {bad[:5]} are outside {name}'s {shape[0]} rows")
        return tuple(shape)

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        import torch

        index = torch.tensor(self.indices, device=w.device)
        return w.index_copy_(0, index, _load(self.rows, w))

    def row_update(self, shape: tuple[int, ...]) -> RowUpdate:
        import numpy as np

        from .formats.arrays import fp32

        rows = fp32(self.rows).reshape(len(self.indices), math.prod(shape[1:]))
        index = np.asarray(self.indices, dtype=np.intp)

        def update(block: np.ndarray, start: int, scratch: np.ndarray) -> None:
            inside = (index >= start) & (index < start + len(block))
            block[index[inside] - start] = rows[inside]
        return update


@dataclass(frozen=True)
class ExpertLoRA:
    """LoRA on a stack of experts stored as one 3-D tensor (PEFT's ParamWrapper, for target_parameters):
    for expert e, A_e is lora_A's rows [e·r, (e+1)·r) and B_e lora_B's columns e, e+E, e+2E, ... (PEFT
    reshapes lora_A (E·r, in) to (E, r, in) but lora_B (out, E·r) to (out, r, E)); W[e] += s·B_e@A_e where
    the stack is (experts, out, in) (`out_in`), W[e] += s·(B_e@A_e)ᵀ where it is (experts, in, out)
    (ParamWrapper.get_delta_weight's two einsums). A stack stored per expert is cut into plain LoRA
    patches (layouts.cut); this one acts on a stack stored whole, an expert at a time."""

    A: object
    B: object
    scale: float
    experts: int
    out_in: bool
    origins: tuple[str, ...]
    adapter: int = 0
    label = "expert_lora"
    rowwise = True  # a row of the stack (seen as experts × the rest) is one expert

    @property
    def refs(self) -> tuple:
        return (self.A, self.B)

    @property
    def rank(self) -> int:
        return self.A.shape[0] // self.experts

    def factors(self, e: int) -> tuple[tuple, tuple]:
        """Indices of expert e's A (r × in) and B (out × r) in lora_A and lora_B."""
        return (slice(e * self.rank, (e + 1) * self.rank), slice(None)), (slice(None), slice(e, None, self.experts))

    def out_shape(self, shape: tuple[int, ...], name: str) -> tuple[int, ...]:
        a, b = tuple(self.A.shape), tuple(self.B.shape)
        want = None
        if len(shape) == 3 and shape[0] == self.experts:
            out, inp = (shape[1], shape[2]) if self.out_in else (shape[2], shape[1])
            want = ((self.experts * self.rank, inp), (out, self.experts * self.rank))
        if (a, b) != want or a[0] % self.experts:
            raise LorafuseError(f"adapter tensors {self.origins[0]} {a} and {self.origins[1]} {b} do not make a delta "
                                f"for the {self.experts} experts of {name} {tuple(shape)}; was the adapter trained on a "
                                "different base model?")
        return tuple(shape)

    def apply(self, w: torch.Tensor) -> torch.Tensor:
        A, B = _load(self.A, w), _load(self.B, w)
        for e in range(self.experts):
            a, b = self.factors(e)
            if self.out_in:
                w[e].addmm_(B[b], A[a], alpha=self.scale)
            else:
                w[e].addmm_(A[a].T, B[b].T, alpha=self.scale)
        return w

    def row_update(self, shape: tuple[int, ...]) -> RowUpdate:
        """Row e of the stack (experts × the rest) is expert e's matrix, flattened."""
        import numpy as np

        from .formats.arrays import fp32

        A, B = fp32(self.A), fp32(self.B)
        A *= np.float32(self.scale)
        inner = shape[1:]

        def update(block: np.ndarray, start: int, scratch: np.ndarray) -> None:
            for i in range(len(block)):
                a, b = self.factors(start + i)
                left, right = (B[b], A[a]) if self.out_in else (A[a].T, B[b].T)
                product = scratch[i].reshape(inner)
                np.matmul(left, right, out=product)
                block[i] += scratch[i]
        return update
