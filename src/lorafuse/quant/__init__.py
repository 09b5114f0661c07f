"""Quantized base checkpoints: dequantize to float32 in pure torch, one tensor at a time.

`bnb` reads bitsandbytes 4-bit (NF4/FP4, optionally double-quantized) and LLM.int8 weights as
transformers saves them; `fp8` reads block-scaled (DeepSeek-V3 / Qwen3-FP8 `weight_scale_inv`) and
per-tensor or per-channel scaled (`weight_scale`) FP8 weights. Neither needs bitsandbytes or a GPU.
"""

from .bnb import dequantize_4bit, dequantize_4bit_saved, dequantize_int8, parse_quant_state, quantize_4bit
from .fp8 import dequantize_fp8_block, dequantize_fp8_scaled, quantize_fp8_block

__all__ = [
    "dequantize_4bit",
    "dequantize_4bit_saved",
    "dequantize_int8",
    "dequantize_fp8_block",
    "dequantize_fp8_scaled",
    "parse_quant_state",
    "quantize_4bit",
    "quantize_fp8_block",
]
