"""MXFP4 checkpoints (gpt-oss): the experts' weights as 4-bit e2m1 values with a power-of-two scale per
block of 32, in pure torch.

On disk (config `quantization_config = {"quant_method": "mxfp4", "modules_to_not_convert": [...]}`), each
MoE layer stores `X_blocks` uint8 (experts, R, C/32, 16), two e2m1 codes per byte (low nibble first), and
`X_scales` uint8 (experts, R, C/32), an e8m0 exponent biased by 127, for X = `mlp.experts.gate_up_proj`
(R = 2 × intermediate, C = hidden) and `mlp.experts.down_proj` (R = hidden, C = intermediate); every other
tensor is 16-bit. transformers' `convert_moe_packed_tensors` (its `Mxfp4Config(dequantize=True)`, and
what it does on a CPU anyway) decodes `ldexp(FP4_VALUES[code], scale - 127)` to (experts, R, C) in the
model dtype, then transposes each expert to the (experts, C, R) parameter `X` its GptOssExperts module
holds, which is also what `save_pretrained` of the dequantized model writes. So the weight lorafuse sees,
merges into and writes is `X` in that layout and dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import LorafuseError
from .base import Lookup, QuantizedTensor, float_dtype

if TYPE_CHECKING:  # the functions that compute import it: claiming weights (planning) needs no torch
    import torch

# e2m1 value of each 4-bit code (transformers.integrations.mxfp4.FP4_VALUES)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
GROUP = 32  # values per scale
BLOCK_BYTES = GROUP // 2  # the blocks' last dimension


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """float32 (experts, C, R) weight of MXFP4 `blocks` (experts, R, C/32, 16) and `scales` (experts, R,
    C/32). See `lookup_mxfp4`."""
    return lookup_mxfp4(blocks, scales).decode()


def lookup_mxfp4(blocks: torch.Tensor, scales: torch.Tensor) -> Lookup:
    """An MXFP4 expert weight ready to decode, in transformers' layout (experts, C, R): code row (e, c)
    is column c of expert e's stored (R, C) matrix, `value(code) × 2^(scale - 127)` in float32.

    transformers computes that product with `torch.ldexp` (exact) and rounds it once to the model dtype.
    The float32 product here is exact too, so rounding it gives its bits: every value x·2^(s-127) with
    |x| in [0.5, 6] and s < 255 is a float32 (down to 2^-128, a subnormal), and the table holds 2x with
    2^(s-128) as the scale, so that s = 255 scales by 2^127 rather than an infinite 2^128, and code 0
    gives 0 as ldexp does, not 0 × inf = NaN (values above 2^128 overflow to inf in both).

    The stored bytes run along C and the weight's rows along R: each step of code rows is rearranged
    from the stored bytes when it is decoded (`Lookup.arrange`), two values of adjacent R per byte, so
    the table gives both at once. One block of the numpy path is one expert (its rows are the first
    dimension), and the rearranged codes are one step's.
    """
    import torch

    experts, rows, groups, _ = _check(tuple(blocks.shape), tuple(scales.shape), "MXFP4 weight")
    cols = groups * GROUP
    stored = blocks.contiguous().view(torch.uint8).view(experts, rows, cols // 2)  # byte k: columns 2k, 2k+1
    scales = scales.view(torch.uint8)
    code = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device) * 2
    byte = torch.arange(256, device=blocks.device)
    pairs = torch.stack([code[byte & 15], code[byte >> 4]], dim=1).view(torch.int64).reshape(-1)
    power = torch.ldexp(torch.ones(256, device=blocks.device), torch.arange(256, device=blocks.device) - 128)

    def arrange(start: int, stop: int) -> torch.Tensor:
        """Code rows [start, stop): for column c, byte j packs rows 2j (low nibble) and 2j + 1."""
        out = torch.empty(stop - start, rows // 2, dtype=torch.uint8, device=blocks.device)
        row = start
        while row < stop:  # the runs of code rows within one expert
            expert, first = divmod(row, cols)
            last = min(cols, first + stop - row)
            part = stored[expert, :, first // 2:(last + 1) // 2]  # (R, bytes): columns [first & ~1, last | 1)
            even, odd = part[0::2], part[1::2]
            low = (even & 15) | (odd << 4)  # even columns (the low nibbles), two rows a byte
            high = (even >> 4) | (odd & 0xF0)  # odd columns
            both = torch.stack([low.T, high.T], dim=1).reshape(-1, rows // 2)
            out[row - start:row - start + last - first] = both[first % 2:first % 2 + last - first]
            row += last - first
        return out

    def scale(start: int, stop: int, values: torch.Tensor) -> None:
        values = values.view(torch.float32)
        row = start
        while row < stop:  # the runs of code rows that share a group of 32 columns
            expert, col = divmod(row, cols)
            end = min(stop, row + GROUP - col % GROUP)
            values[row - start:end - start].mul_(power[scales[expert, :, col // GROUP].long()])
            row = end

    codes = stored.view(experts * cols, rows // 2)  # the code rows' bytes, in the stored order
    return Lookup(codes, pairs, scale, (experts, cols, rows), arrange)


def _check(blocks: tuple[int, ...], scales: tuple[int, ...], name: str) -> tuple[int, int, int, int]:
    """The shape of a well-formed (blocks, scales) pair, or a LorafuseError saying what is wrong."""
    if len(blocks) != 4 or blocks[-1] != BLOCK_BYTES:
        raise LorafuseError(f"{name}: MXFP4 blocks must be (experts, rows, groups, {BLOCK_BYTES}) bytes, got "
                            f"{blocks}; the checkpoint is damaged or not gpt-oss's layout")
    if scales != blocks[:3]:
        raise LorafuseError(f"{name}: MXFP4 blocks {blocks} need scales of shape {blocks[:3]}, got {scales}; "
                            "the checkpoint is damaged: re-download it")
    if blocks[1] % 2:
        raise LorafuseError(f"{name}: lorafuse reads MXFP4 weights with an even number of rows, got {blocks[1]}; "
                            "pass the 16-bit model as BASE")
    return blocks


def claim(tensors, config: dict) -> dict:
    """MXFP4 weights by the name transformers gives the dequantized parameter: `X` for each uint8
    `X_blocks` with its `X_scales`, shaped (experts, C, R) as transformers transposes them."""
    dtype = float_dtype(config.get("dtype") or config.get("torch_dtype") or "bfloat16", "config.json")
    found = {}
    for key, ref in tensors.items():
        if key.endswith("_scales") and key.removesuffix("_scales") + "_blocks" not in tensors:
            raise LorafuseError(f"MXFP4 scales {key} have no {key.removesuffix('_scales')}_blocks beside them; "
                                "the checkpoint is incomplete: re-download it")
        if not key.endswith("_blocks"):
            continue
        name = key.removesuffix("_blocks")
        scales = tensors.get(name + "_scales")
        if scales is None:
            raise LorafuseError(f"MXFP4 blocks {key} have no {name}_scales beside them; the checkpoint is "
                                "incomplete: re-download it")
        if ref.dtype != "U8" or scales.dtype != "U8":
            raise LorafuseError(f"MXFP4 {key} and {name}_scales must be uint8, got {ref.dtype} and {scales.dtype}; "
                                "the checkpoint is damaged: re-download it")
        if name in tensors:
            raise LorafuseError(f"the checkpoint holds both {name} and its MXFP4 blocks; it is damaged: re-download it")
        experts, rows, groups, _ = _check(tuple(ref.shape), tuple(scales.shape), key)
        parts = {"blocks": (key, ref), "scales": (name + "_scales", scales)}
        found[name] = QuantizedTensor(name, "mxfp4", parts, (experts, groups * GROUP, rows), dtype, _decode)
    return found


def _decode(parts):
    return lookup_mxfp4(parts["blocks"], parts["scales"])
