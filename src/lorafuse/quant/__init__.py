"""Quantized base checkpoints: dequantize to float32 in pure torch, one tensor at a time.

`bnb` reads bitsandbytes 4-bit (NF4/FP4, optionally double-quantized) and LLM.int8 weights as
transformers saves them; `fp8` reads block-scaled (DeepSeek-V3 / Qwen3-FP8 `weight_scale_inv`) and
per-tensor or per-channel scaled (`weight_scale`) FP8 weights; `mxfp4` reads gpt-oss's MXFP4 experts
(`_blocks` and `_scales`), as the transposed 16-bit parameters transformers dequantizes them to. None
needs bitsandbytes, triton or a GPU.
A new format is one module with a `claim(tensors, config)` function, listed in FORMATS. Claiming reads
headers and quant states without torch, so a quantized base plans (and copies its untouched tensors)
while torch loads; the functions that compute import torch when called.
"""

from __future__ import annotations

import importlib

from ..errors import LorafuseError
from .base import QuantizedTensor

# quantization_config.quant_method -> the module that reads it, imported only for a quantized base
FORMATS = {"bitsandbytes": "bnb", "fp8": "fp8", "fbgemm_fp8": "fp8", "compressed-tensors": "fp8", "mxfp4": "mxfp4"}
# what the package offers from those modules, imported on first use
EXPORTS = {"dequantize_4bit": "bnb", "dequantize_4bit_saved": "bnb", "dequantize_int8": "bnb", "parse_quant_state": "bnb",
           "quantize_4bit": "bnb", "dequantize_fp8_block": "fp8", "dequantize_fp8_scaled": "fp8", "quantize_fp8_block": "fp8",
           "dequantize_mxfp4": "mxfp4"}


def __getattr__(name: str):
    if name in EXPORTS:
        return getattr(importlib.import_module(f".{EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    claimed = importlib.import_module(f".{FORMATS[method]}", __name__).claim(tensors, config)
    if not claimed:
        raise LorafuseError(
            f"the base model is quantized with {method!r}, but in a layout lorafuse cannot read (no bitsandbytes, "
            "FP8 or MXFP4 weights found); pass the 16-bit model as BASE"
        )
    owner = {key: name for name, q in claimed.items() for key in q.keys}
    logical = {}
    for key, ref in tensors.items():
        if key in claimed:
            logical[key] = claimed[key]
        elif key not in owner:
            logical[key] = ref
        elif owner[key] not in tensors and owner[key] not in logical:
            # stored only under other names (MXFP4's X_blocks and X_scales): where its first part is
            logical[owner[key]] = claimed[owner[key]]
    return logical, method


__all__ = [
    "QuantizedTensor",
    "logical_tensors",
    "dequantize_4bit",
    "dequantize_4bit_saved",
    "dequantize_int8",
    "dequantize_fp8_block",
    "dequantize_fp8_scaled",
    "dequantize_mxfp4",
    "parse_quant_state",
    "quantize_4bit",
    "quantize_fp8_block",
]
