"""Stored tensors as numpy arrays: the numpy type of each stored float dtype, and an adapter tensor read
as fp32. bf16 is `ml_dtypes`' numpy type: its casts are one compiled pass each way."""

from __future__ import annotations

import ml_dtypes
import numpy as np

STORED = {"BF16": ml_dtypes.bfloat16, "F16": np.float16, "F32": np.float32}  # the numpy type of the bytes


def fp32(ref) -> np.ndarray:
    """A tensor (TensorRef, or any ref with read_into) read as fp32, in its own memory."""
    stored = np.frombuffer(ref.read_into(bytearray(ref.nbytes)), dtype=STORED[ref.dtype]).reshape(ref.shape)
    return stored.astype(np.float32)
