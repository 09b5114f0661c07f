"""`lorafuse inspect`: how large is the adapter's change, against how far apart two bases are?

The QLoRA question: an adapter trained on a 4-bit base can be merged into the dequantized 4-bit
weights it saw in training, or into the original 16-bit weights. Per changed weight this reports
‖ΔW‖ (what the adapter does) and, given a second base, ‖W_base − W_other‖ (what choosing the other
base does). A quantization gap comparable to the delta means the choice matters. One tensor at a time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from ..compute import fp32_value
from ..errors import LorafuseError
from ..plan import make_plan
from ..quant import logical_tensors
from ..sinks.safetensors import SAFETENSORS
from ..sources.hub import resolve_model
from ..sources.local import open_model
from ..units import natural


@dataclass
class Row:
    name: str
    weight_norm: float  # ‖W‖ of BASE (after dequantization)
    delta_norm: float  # ‖merged − W‖: the adapter's change
    gap_norm: float | None  # ‖W − W_other‖, with a second base


def inspect(base: str | os.PathLike | None, adapter: str | os.PathLike, compare_base: str | os.PathLike | None = None) -> list[Row]:
    """One row per base tensor the adapter changes, in natural order, and a last row named "overall" (root
    of sums of squares)."""
    plan = make_plan(base, adapter, sink=SAFETENSORS)
    other = None
    if compare_base is not None:
        checkpoint = open_model(resolve_model(compare_base, what="base to compare with"))
        other, _ = logical_tensors(checkpoint.tensors, checkpoint.config)
    rows = []
    for tensor in plan.merged:
        w = fp32_value(tensor.source)
        merged = w.clone()
        for patch in tensor.patches:
            merged = patch.apply(merged)
        gap = None
        if other is not None:
            if tensor.name not in other or tuple(other[tensor.name].shape) != tuple(w.shape):
                raise LorafuseError(f"{compare_base} has no tensor {tensor.name} of shape {tuple(w.shape)}; compare two versions of one model")
            gap = torch.linalg.vector_norm(w - fp32_value(other[tensor.name])).item()
        delta = torch.linalg.vector_norm(merged - w).item() if merged.shape == w.shape else math.nan
        rows.append(Row(tensor.name, torch.linalg.vector_norm(w).item(), delta, gap))
    rows.sort(key=lambda row: natural(row.name))
    rows.append(_overall(rows))
    return rows


def _overall(rows: list[Row]) -> Row:
    def total(values):
        return math.sqrt(sum(v * v for v in values))

    gaps = [r.gap_norm for r in rows]
    return Row("overall", total(r.weight_norm for r in rows), total(r.delta_norm for r in rows),
               None if not rows or gaps[0] is None else total(gaps))


def describe(rows: list[Row]) -> list[str]:
    has_gap = rows[-1].gap_norm is not None
    lines = [f"{'tensor':<60} {'|W|':>10} {'|dW|':>10} {'|dW|/|W|':>9}" + (f" {'|W-W2|':>10} {'gap/|dW|':>9}" if has_gap else "")]
    for r in rows:
        line = f"{r.name:<60} {r.weight_norm:10.4g} {r.delta_norm:10.4g} {r.delta_norm / max(r.weight_norm, 1e-30):9.2%}"
        if has_gap:
            line += f" {r.gap_norm:10.4g} {r.gap_norm / max(r.delta_norm, 1e-30):9.2f}"
        lines.append(line)
    if has_gap:
        ratio = rows[-1].gap_norm / max(rows[-1].delta_norm, 1e-30)
        lines.append(
            f"overall the two bases differ by {ratio:.2f}x the adapter's change: "
            + ("the choice of base matters; merge into the base the adapter was trained on" if ratio > 0.1 else
               "small against the adapter's change; either base gives nearly the same model")
        )
    return lines
