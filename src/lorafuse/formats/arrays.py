"""Stored tensors as numpy arrays: the numpy type that holds each stored float dtype, the exact widening to
fp32 and the rounding back, and an adapter tensor read as fp32.

numpy has no bf16 type: a bf16 is held as the uint16 of its bits, which are the top half of an fp32, so
widening is a shift and rounding integer arithmetic on the fp32's bits. A compiled bf16 type (ml_dtypes)
does each in one pass instead of two and five, but importing it costs more than those passes save on a
merge of several GB (0.2-1.3 s, by version), and a plain merge would wait for it before its first tensor.
"""

from __future__ import annotations

import numpy as np

STORED = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}  # the numpy type that holds the bytes
BF16_NAN = 0x7FC0  # the one NaN `narrow` writes


def widen(stored: np.ndarray, dtype: str, out: np.ndarray) -> None:
    """fp32 values of stored BF16 / F16 / F32 values into `out` (exact: every such value is an fp32 value,
    and a bf16 NaN keeps its sign and payload)."""
    if dtype == "BF16":
        np.left_shift(stored, 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, stored)


def narrow(values: np.ndarray, dtype: str, out: np.ndarray, scratch: np.ndarray, nan_free: bool = False) -> None:
    """Round fp32 `values` into `out` (stored BF16 / F16 / F32) as torch does: to nearest, ties to even,
    overflowing to inf; in bf16 every NaN becomes BF16_NAN (torch writes 0x7FC0 or 0xFFFF, by kernel),
    unless the caller knows there is none (`nan_free`). For BF16, `values` and `scratch` (4 bytes per
    value) are spoilt."""
    if dtype != "BF16":
        np.copyto(out, values, casting="unsafe")  # numpy rounds to fp16 to nearest even, as torch does
        return
    nan = None if nan_free else np.isnan(values)
    bits, carry = values.view(np.uint32), scratch.view(np.uint32)
    np.right_shift(bits, 16, out=carry)  # add 0x7FFF plus the lowest kept bit, then keep the top half
    carry &= 1
    carry += 0x7FFF
    bits += carry
    np.right_shift(bits, 16, out=out, casting="unsafe")
    if nan is not None:
        out[nan] = BF16_NAN


def fp32(ref) -> np.ndarray:
    """A tensor (TensorRef, or any ref with read_into) read as fp32, in its own memory."""
    stored = np.frombuffer(ref.read_into(bytearray(ref.nbytes)), dtype=STORED[ref.dtype]).reshape(ref.shape)
    out = np.empty(ref.shape, dtype=np.float32)
    widen(stored, ref.dtype, out)
    return out
