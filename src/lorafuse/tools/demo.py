"""`lorafuse demo`: build a tiny Llama-shaped bf16 model and a LoRA adapter, merge, and check.

It needs nothing beyond lorafuse's own dependencies: the files are written with safetensors in the
layout transformers and PEFT use, and the check recomputes every merged tensor in float64.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..api import merge
from ..errors import LorafuseError
from ..plan import describe, make_plan
from ..sinks.safetensors import SAFETENSORS

LAYERS, HIDDEN, INTERMEDIATE, VOCAB, HEADS, KV_HEADS = 2, 64, 128, 256, 4, 2
R, ALPHA = 8, 16
TARGETS = {
    "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (HIDDEN // 2, HIDDEN),
    "self_attn.v_proj": (HIDDEN // 2, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
    "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN), "mlp.down_proj": (HIDDEN, INTERMEDIATE),
}


def build_base(folder: Path, gen: torch.Generator) -> dict[str, torch.Tensor]:
    weights = {"model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=gen), "model.norm.weight": torch.ones(HIDDEN),
               "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=gen)}
    for i in range(LAYERS):
        for module, shape in TARGETS.items():
            weights[f"model.layers.{i}.{module}.weight"] = torch.randn(*shape, generator=gen) * 0.05
        weights[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN)
        weights[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    weights = {k: v.to(torch.bfloat16) for k, v in weights.items()}
    folder.mkdir(parents=True)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 256, "tie_word_embeddings": False, "dtype": "bfloat16",
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return weights


def build_adapter(folder: Path, gen: torch.Generator) -> dict[str, torch.Tensor]:
    tensors = {}
    for i in range(LAYERS):
        for module, (out_f, in_f) in TARGETS.items():
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(R, in_f, generator=gen) * 0.1
            tensors[f"{key}.lora_B.weight"] = torch.randn(out_f, R, generator=gen) * 0.1
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": R, "lora_alpha": ALPHA, "target_modules": sorted({m.split(".")[-1] for m in TARGETS}),
              "fan_in_fan_out": False, "bias": "none", "base_model_name_or_path": str(folder.parent / "base"), "task_type": "CAUSAL_LM"}
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return tensors


def check(out: Path, base: dict, adapter: dict) -> tuple[int, int]:
    """Every merged tensor is the float64 result rounded once to bf16, up to fp32 arithmetic error;
    every other tensor is byte-identical. Returns (correctly rounded elements, merged elements)."""
    exact_count = total = 0
    index = out / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    seen = set()
    for name in files:
        with safe_open(out / name, "pt") as f:
            for key in f.keys():
                got, seen = f.get_tensor(key), seen | {key}
                module = f"base_model.model.{key[:-len('.weight')]}"
                if f"{module}.lora_A.weight" not in adapter:
                    assert torch.equal(got.view(torch.int16), base[key].view(torch.int16)), f"{key} changed"
                    continue
                a, b, w = (t.double() for t in (adapter[f"{module}.lora_A.weight"], adapter[f"{module}.lora_B.weight"], base[key]))
                exact = w + (ALPHA / R) * (b @ a)
                rounded = exact.to(torch.bfloat16).double()
                # fp32 arithmetic may move a value by about (R + 2) fp32 steps of the terms' magnitude.
                slack = (R + 2) * torch.finfo(torch.float32).eps * (w.abs() + (ALPHA / R) * (b.abs() @ a.abs()))
                half_step = (rounded - exact).abs().clamp_min(torch.finfo(torch.bfloat16).eps * exact.abs() / 2)
                assert ((got.double() - exact).abs() <= half_step + slack).all(), f"{key} is not the rounded exact result"
                exact_count += int((got.double() == rounded).sum())
                total += exact.numel()
    assert seen == set(base), "output tensors differ from the base's"
    return exact_count, total


def run_demo(keep: str | None = None, say: Callable[[str], None] = print) -> int:
    """`say` prints each line of the report: the command passes its own, which copes with a closed stdout
    (`lorafuse demo | head -1`, `>&-`) as every command's output does."""
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="lorafuse-demo-"))
    if keep and root.exists() and any(root.iterdir()):
        raise LorafuseError(f"{root} is not empty; pass an empty or new folder to --keep")
    try:
        gen = torch.Generator().manual_seed(0)
        base = build_base(root / "base", gen)
        adapter = build_adapter(root / "adapter", gen)
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
