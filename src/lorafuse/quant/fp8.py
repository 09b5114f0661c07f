"""FP8 (float8_e4m3fn) checkpoints: block-scaled and per-tensor/per-channel scaled, in pure torch.

Block-scaled (DeepSeek-V3/R1, Qwen3-*-FP8, transformers `FineGrainedFP8Config`; config
`quantization_config = {"quant_method": "fp8", "weight_block_size": [128, 128], ...}`): `X.weight` is
F8_E4M3 (out, in) and `X.weight_scale_inv` is F32 (ceil(out/128), ceil(in/128)). The real weight is
`weight * scale_inv` per block, multiplied in float32: DeepSeek-V3 `inference/kernel.py`
`weight_dequant_kernel` (`x.to(float32) * s`, blocks at the right/bottom edges are partial and use
their own scale) and transformers `Fp8Dequantize` (`(q * s).to(dtype)`, divisible shapes only).

Per-tensor or per-channel (compressed-tensors / vLLM "fp8", FBGEMM FP8): `X.weight_scale` is a
scalar, [1], [out] or [out, 1], and the real weight is `weight * weight_scale` (a multiplier, not an
inverse, despite the same arithmetic); `X.input_scale`, if present, concerns activations only.
"""

from __future__ import annotations

import math
from functools import partial
from typing import TYPE_CHECKING

from ..errors import LorafuseError
from .base import Lookup, QuantizedTensor, byte_values, float_dtype

if TYPE_CHECKING:  # the functions that compute import it: claiming weights (planning) needs no torch
    import torch

FP8_E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def dequantize_fp8_block(weight_fp8: torch.Tensor, scale_inv: torch.Tensor,
                         block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """float32 `weight[i, j] * scale_inv[i // block[0], j // block[1]]` (leading expert dims allowed).
    See `lookup_fp8_block`."""
    return lookup_fp8_block(weight_fp8, scale_inv, block).decode()


def lookup_fp8_block(weight_fp8: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128)) -> Lookup:
    """A block-scaled FP8 weight ready to decode, one row per code row:
    `weight[i, j] * scale_inv[i // block[0], j // block[1]]` in float32.

    The float32 product is what DeepSeek-V3's kernel computes before storing it in the model dtype,
    so `.to(torch.bfloat16)` of the result equals its `weight_dequant` output.
    """
    import torch

    bo, bi = block
    *lead, rows, cols = weight_fp8.shape
    grid = (*lead, -(-rows // bo), -(-cols // bi))
    if tuple(scale_inv.shape) != grid:
        raise LorafuseError(f"FP8 weight {tuple(weight_fp8.shape)} with blocks {tuple(block)} needs a scale_inv of "
                            f"shape {grid}, got {tuple(scale_inv.shape)}; check weight_block_size in the config")
    codes, table = _as_matrix(weight_fp8).view(torch.uint8), byte_values(torch.float8_e4m3fn, weight_fp8.device)
    if cols == 0:  # no values, nothing to scale
        return Lookup(codes, table, lambda start, stop, values: None, tuple(weight_fp8.shape))
    col_scale = scale_inv.to(torch.float32).repeat_interleave(bi, dim=-1)[..., :cols]  # (..., out blocks, cols)
    col_scale = col_scale.reshape(-1, cols)  # one row per block row of each matrix

    def scale(start: int, stop: int, values: torch.Tensor) -> None:
        row = start
        while row < stop:  # the runs of rows that share a block row
            matrix, local = divmod(row, rows)
            end = min(stop, row + bo - local % bo, (matrix + 1) * rows)
            values[row - start:end - start].mul_(col_scale[matrix * grid[-2] + local // bo])
            row = end

    return Lookup(codes, table, scale, tuple(weight_fp8.shape))


def dequantize_fp8_scaled(weight_fp8: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """float32 `weight * weight_scale`, the scale per tensor (1 value) or per output channel."""
    return lookup_fp8_scaled(weight_fp8, weight_scale).decode()


def lookup_fp8_scaled(weight_fp8: torch.Tensor, weight_scale: torch.Tensor) -> Lookup:
    """A per-tensor or per-channel scaled FP8 weight ready to decode, `weight * weight_scale` in float32."""
    import torch

    s = weight_scale.to(torch.float32)
    if s.numel() == 1:
        s, per_row = s.reshape(1, 1), False
    elif weight_fp8.dim() == 2 and s.numel() == weight_fp8.shape[0] and s.dim() in (1, 2):
        s, per_row = s.reshape(-1, 1), True
    else:
        raise LorafuseError(f"FP8 weight_scale of shape {tuple(weight_scale.shape)} is neither per-tensor nor "
                            f"per-channel for a weight of shape {tuple(weight_fp8.shape)}")
    table = byte_values(torch.float8_e4m3fn, weight_fp8.device)
    return Lookup(_as_matrix(weight_fp8).view(torch.uint8), table,
                  lambda start, stop, rows: rows.mul_(s[start:stop] if per_row else s), tuple(weight_fp8.shape))


def _as_matrix(t: torch.Tensor) -> torch.Tensor:
    """Rows of the last dimension (a scalar is one row of one)."""
    return t.reshape(math.prod(t.shape[:-1]), t.shape[-1]) if t.dim() else t.reshape(1, 1)


def quantize_fp8_block(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv) stored the way block-scaled FP8 models store them.

    scale_inv = amax / 448 per block (DeepSeek-V3 `act_quant`: `s = amax / 448; y = x / s`; edge
    blocks are partial), weight = clamp(w / scale_inv, -448, 448) rounded to e4m3. All-zero blocks get
    scale 1, as transformers' `Fp8Quantize` does. For building test checkpoints.
    """
    import torch

    bo, bi = block
    *lead, rows, cols = weight.shape
    gr, gc = -(-rows // bo), -(-cols // bi)
    w = torch.nn.functional.pad(weight.to(torch.float32), (0, gc * bi - cols, 0, gr * bo - rows))
    tiles = w.reshape(*lead, gr, bo, gc, bi)
    amax = tiles.abs().amax(dim=(-3, -1))
    scale_inv = torch.where(amax > 0, amax / FP8_E4M3_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv.unsqueeze(-1).unsqueeze(-3)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(w.shape)[..., :rows, :cols].contiguous(), scale_inv


def claim(tensors, config: dict) -> dict:
    """FP8 weights by name: `X.weight` F8_E4M3 with `X.weight_scale_inv` (blocks from the config's
    `weight_block_size`) or `X.weight_scale` (per tensor or channel). `X.input_scale` only concerns
    activations and is dropped with the weight's other parts, as is `X.activation_scale`."""
    qconfig = config.get("quantization_config") or {}
    block = qconfig.get("weight_block_size", (128, 128))  # null: one scale per tensor (FineGrainedFP8)
    dtype = float_dtype(config.get("dtype") or config.get("torch_dtype") or "bfloat16", "config.json")
    found = {}
    for key, ref in tensors.items():
        if ref.dtype != "F8_E4M3" or not key.endswith(".weight"):
            continue
        module = key[: -len(".weight")]
        if f"{key}_scale_inv" in tensors and block is None:  # a scalar weight_scale_inv multiplies, like weight_scale
            parts = {"weight": (key, ref), "scale": (f"{key}_scale_inv", tensors[f"{key}_scale_inv"])}
            decode, method = _decode_scaled, "fp8-scaled"
        elif f"{key}_scale_inv" in tensors:
            parts = {"weight": (key, ref), "scale_inv": (f"{key}_scale_inv", tensors[f"{key}_scale_inv"])}
            decode, method = partial(_decode_block, block=tuple(block)), "fp8-block"
        elif f"{key}_scale" in tensors:
            parts = {"weight": (key, ref), "scale": (f"{key}_scale", tensors[f"{key}_scale"])}
            decode, method = _decode_scaled, "fp8-scaled"
        else:
            raise LorafuseError(f"FP8 weight {key} has neither weight_scale_inv nor weight_scale beside it")
        for extra in ("input_scale", "activation_scale"):  # activation scales: meaningless once dequantized
            if f"{module}.{extra}" in tensors:
                parts[extra] = (f"{module}.{extra}", tensors[f"{module}.{extra}"])
        found[key] = QuantizedTensor(key, method, parts, tuple(ref.shape), dtype, decode)
    return found


def _decode_block(parts, block):
    return lookup_fp8_block(parts["weight"], parts["scale_inv"], block)


def _decode_scaled(parts):
    return lookup_fp8_scaled(parts["weight"], parts["scale"])
