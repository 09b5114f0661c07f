"""`lorafuse demo`: build a tiny Llama-shaped bf16 model and a LoRA adapter, merge, and check.

It needs nothing beyond lorafuse's own dependencies (no torch: the light install runs it): the tensors are
made by numpy and written as safetensors files in the layout transformers and PEFT use, and the check
recomputes every merged tensor in float64.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..api import merge
from ..errors import LorafuseError
from ..formats.arrays import narrow
from ..formats.safetensors import layout, read_header
from ..plan import describe, make_plan
from ..sinks.safetensors import SAFETENSORS

LAYERS, HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2, 64, 128, 256, 4, 2
R, ALPHA = 8, 16
TARGETS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN // 2, HIDDEN),
    "self_attn.v_proj": (HIDDEN // 2, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN), "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}
BF16_BITS = 8  # significant bits of a bf16 value, the implicit one included


def build_base(folder: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """The model's weights, as the bits of their bf16 values (uint16)."""
    weights = {"model.embed_tokens.weight": rng.standard_normal((VOCAB, HIDDEN), np.float32),
               "model.norm.weight": np.ones(HIDDEN, np.float32),
               "lm_head.weight": rng.standard_normal((VOCAB, HIDDEN), np.float32)}
    for i in range(LAYERS):
        for module, shape in TARGETS.items():
            weights[f"model.layers.{i}.{module}.weight"] = rng.standard_normal(shape, np.float32) * np.float32(0.05)
        weights[f"model.layers.{i}.input_layernorm.weight"] = np.ones(HIDDEN, np.float32)
        weights[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(HIDDEN, np.float32)
    weights = {k: _bf16_bits(v) for k, v in weights.items()}
    folder.mkdir(parents=True)
    _save(folder / "model.safetensors", {k: ("BF16", v) for k, v in weights.items()})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 256, "tie_word_embeddings": False, "dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return weights


def build_adapter(folder: Path, rng: np.random.Generator) -> dict[str, np.ndarray]:
    tensors = {}
    for i in range(LAYERS):
        for module, (out_f, in_f) in TARGETS.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = rng.standard_normal((R, in_f), np.float32) * np.float32(0.1)
            tensors[f"{key}.lora_B.weight"] = rng.standard_normal((out_f, R), np.float32) * np.float32(0.1)
    folder.mkdir(parents=True)
    _save(folder / "adapter_model.safetensors", {k: ("F32", v) for k, v in tensors.items()})
    config = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": sorted({m.split(".")[-1] for m in TARGETS}),
              "fan_in_fan_out": False, "bias": "none", "base_model_name_or_path": str(folder.parent / "base"), "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return tensors


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    out = np.empty(values.shape, np.uint16)
    narrow(values.copy(), "BF16", out, np.empty_like(values))
    return out


def _float64(bf16_bits: np.ndarray) -> np.ndarray:
    """bf16 values (their bits) as float64: a bf16 is the top half of an fp32."""
    return (bf16_bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def _save(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """A safetensors file: the header (as the format's writers lay it out), then each tensor's bytes."""
    header, _ = layout([(name, dtype, array.shape) for name, (dtype, array) in tensors.items()], {"format": "pt"})
    with open(path, "wb") as f:
        f.write(header)
        for _, array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """float64 values rounded once to the nearest bf16 value, ties to even (for the demo's normal-range
    values: `rint` of the mantissa scaled to the 8 bits a bf16 keeps)."""
    mantissa, exponent = np.frexp(x)
    return np.ldexp(np.rint(np.ldexp(mantissa, BF16_BITS)), exponent - BF16_BITS)


def check(out: Path, base: dict, adapter: dict) -> tuple[int, int]:
    """Every merged tensor is the float64 result rounded once to bf16, up to fp32 arithmetic error;
    every other tensor is byte-identical. Returns (correctly rounded elements, merged elements)."""
    exact_count = total = 0
    index = out / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    seen = set()
    for name in files:
        for key, ref in read_header(out / name).tensors.items():
            assert ref.dtype == "BF16", f"{key} is {ref.dtype}, not BF16"
            got, seen = np.frombuffer(ref.read_into(bytearray(ref.nbytes)), np.uint16).reshape(ref.shape), seen | {key}
            module = f"base_model.model.{key[:-len('.weight')]}"
            if f"{module}.lora_A.weight" not in adapter:
                assert np.array_equal(got, base[key]), f"{key} changed"
                continue
            a, b = (adapter[f"{module}.lora_{f}.weight"].astype(np.float64) for f in "AB")
            w = _float64(base[key])
            exact = w + (ALPHA / R) * (b @ a)
            rounded = round_to_bf16(exact)
            # fp32 arithmetic may move a value by about (R + 2) fp32 steps of the terms' magnitude.
            slack = (R + 2) * np.finfo(np.float32).eps * (np.abs(w) + (ALPHA / R) * (np.abs(b) @ np.abs(a)))
            half_step = np.maximum(np.abs(rounded - exact), 2.0 ** -BF16_BITS * np.abs(exact))
            merged = _float64(got)
            assert (np.abs(merged - exact) <= half_step + slack).all(), f"{key} is not the rounded exact result"
            exact_count += int((merged == rounded).sum())
            total += exact.size
    assert seen == set(base), "output tensors differ from the base's"
    return exact_count, total


def run_demo(keep: str | None = None, say: Callable[[str], None] = print) -> int:
    """`say` prints each line of the report: the command passes its own, which copes with a closed stdout
    (`lorafuse demo | head -1`, `>&-`) as every command's output does."""
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="lorafuse-demo-"))
    if keep and root.exists() and any(root.iterdir()):
        raise LorafuseError(f"{root} is not empty; pass an empty or new folder to --keep")
    try:
        rng = np.random.default_rng(0)
        base = build_base(root / "base", rng)
        adapter = build_adapter(root / "adapter", rng)
        say(f"built a tiny Llama-shaped bf16 model and a LoRA adapter (r={R}) in {root}\n")
        say("\n".join(describe(make_plan(root / "base", root / "adapter", root / "merged", sink=SAFETENSORS, max_shard_size="200KB"))) + "\n")
        report = merge(root / "base", root / "adapter", root / "merged", max_shard_size="200KB")
        exact, total = check(root / "merged", base, adapter)
        say(f"merged {report.tensors_merged} tensors and copied {report.tensors_copied} into {report.shards} shards in {report.seconds:.2f} s")
        say(f"check: {exact}/{total} merged values are exactly the float64 result rounded once to bf16, the rest")
        say("       within fp32 arithmetic error of it; every other tensor is byte-identical to the base")
        say("demo OK")
        return 0
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
