"""Quantized base checkpoints: dequantize to float32 in pure torch, one tensor at a time.

`bnb` reads bitsandbytes 4-bit (NF4/FP4, optionally double-quantized) and LLM.int8 weights as
transformers saves them; `fp8` reads block-scaled (DeepSeek-V3 / Qwen3-FP8 `weight_scale_inv`) and
per-tensor or per-channel scaled (`weight_scale`) FP8 weights. Neither needs bitsandbytes or a GPU.
A new format is one module with a `claim(tensors, config)` function, listed in FORMATS.
"""

from __future__ import annotations

from ..errors import LorafuseError
from . import bnb, fp8
from .base import QuantizedTensor
from .bnb import dequantize_4bit, dequantize_4bit_saved, dequantize_int8, parse_quant_state, quantize_4bit
from .fp8 import dequantize_fp8_block, dequantize_fp8_scaled, quantize_fp8_block

# quantization_config.quant_method -> the module that reads it
FORMATS = {"bitsandbytes": bnb, "fp8": fp8, "fbgemm_fp8": fp8, "compressed-tensors": fp8}


def logical_tensors(tensors: dict, config: dict) -> tuple[dict, str | None]:
    """The checkpoint's tensors with each quantized weight folded into one QuantizedTensor, in file
    order, and the quantization method (None for a plain checkpoint)."""
    qconfig = config.get("quantization_config")
    if not qconfig:
        return dict(tensors), None
    method = qconfig.get("quant_method") if isinstance(qconfig, dict) else None
    if method not in FORMATS:
        raise LorafuseError(
            f"the base model is quantized with {method!r}, which lorafuse cannot read; "
            f"supported: {', '.join(sorted(FORMATS))}, or pass the 16-bit model as BASE"
        )
    claimed = FORMATS[method].claim(tensors, config)
    if not claimed:
        raise LorafuseError(
            f"the base model is quantized with {method!r}, but in a layout lorafuse cannot read (no bitsandbytes "
            "or FP8 weights found); pass the 16-bit model as BASE"
        )
    taken = {key for q in claimed.values() for key in q.keys}
    logical = {}
    for key, ref in tensors.items():
        if key in claimed:
            logical[key] = claimed[key]
        elif key not in taken:
            logical[key] = ref
    return logical, method


__all__ = [
    "QuantizedTensor",
    "logical_tensors",
    "dequantize_4bit",
    "dequantize_4bit_saved",
    "dequantize_int8",
    "dequantize_fp8_block",
    "dequantize_fp8_scaled",
    "parse_quant_state",
    "quantize_4bit",
    "quantize_fp8_block",
]
