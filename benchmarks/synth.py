"""Build a synthetic Llama-shaped bf16 base model and a PEFT LoRA adapter for it.

Run as a script (``python synth.py DEST --size-gb 1 --shard-size 5GB``) so the
benchmark driver never holds the model in its own memory. Both folders are
written by the real libraries (``save_pretrained``), so every route reads
exactly what it would read from the Hub. With ``--quantize nf4`` the base is
what a QLoRA user starts from (an Unsloth ``-bnb-4bit`` upload, say):
transformers and bitsandbytes quantize the bf16 model to NF4 with double
quantization and save it; the bf16 model stays beside it as ``base-16bit``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

HIDDEN = 2048
INTERMEDIATE = 5632
VOCAB = 32000
HEADS = 32
KV_HEADS = 4  # TinyLlama-style GQA
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DONE_MARKER = ".complete"


def layer_params() -> int:
    """Parameters in one decoder layer, to size the model without building it."""
    head_dim = HIDDEN // HEADS
    attn = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * KV_HEADS * head_dim
    mlp = 3 * HIDDEN * INTERMEDIATE
    return attn + mlp + 2 * HIDDEN


def layers_for(size_gb: float, vocab: int = VOCAB) -> int:
    """Decoder layers needed for a bf16 model of about ``size_gb`` (10^9 bytes)."""
    fixed = 2 * vocab * HIDDEN + HIDDEN  # embed + untied lm_head + final norm
    budget = size_gb * 1e9 / 2 - fixed
    return max(1, round(budget / layer_params()))


def llama_config(layers: int, tokens: dict | None = None):
    from transformers import LlamaConfig

    return LlamaConfig(
        **(tokens or {"vocab_size": VOCAB}),
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )


def random_model(layers: int, tokens: dict | None = None):
    """Build on 'meta', allocate uninitialised bf16, then fill in place.

    ``nn.init`` on a multi-GB model takes minutes and an fp32 build would
    double the RAM; this costs only the bf16 model itself plus a few seconds.
    """
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(layers, tokens))
    model = model.to(torch.bfloat16).to_empty(device="cpu")  # rotary buffers unset: never saved
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02)
    return model.eval()


def save_adapter(model, adapter_dir: Path) -> None:
    """Wrap the in-memory base with random LoRA weights and save only the adapter."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=16,
        lora_alpha=32,
        target_modules=LORA_TARGETS,
        init_lora_weights=False,  # random B too, so the merge is not a no-op
        task_type="CAUSAL_LM",
    )
    get_peft_model(model, config).save_pretrained(str(adapter_dir))


def save_nf4(bf16_dir: Path, dest: Path, shard_size: str) -> None:
    """The bf16 model quantized by transformers + bitsandbytes on the CPU, as a QLoRA base is saved."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(bf16_dir), quantization_config=config, device_map="cpu",
                                                 dtype=torch.bfloat16)
    model.save_pretrained(str(dest), max_shard_size=shard_size)


TOKEN_FIELDS = ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt")


def build(dest: Path, size_gb: float, shard_size: str, quantize: str = "none", tokenizer_from: Path | None = None) -> None:
    """Write ``dest/base`` and ``dest/adapter`` (and ``dest/base-16bit`` for a quantized base); atomic
    via a temp folder + rename."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokens = None
    if tokenizer_from:
        config = json.loads((tokenizer_from / "config.json").read_text())
        tokens = {k: config[k] for k in TOKEN_FIELDS if k in config}
    layers = layers_for(size_gb, (tokens or {}).get("vocab_size", VOCAB))
    model = random_model(layers, tokens)
    model.config._name_or_path = str(dest / "base")  # recorded in adapter_config.json
    saved = tmp / ("base-16bit" if quantize == "nf4" else "base")
    model.save_pretrained(str(saved), max_shard_size=shard_size)
    for name in TOKENIZER_FILES if tokenizer_from else ():
        if (tokenizer_from / name).is_file():
            shutil.copy2(tokenizer_from / name, saved / name)
    save_adapter(model, tmp / "adapter")
    del model
    if quantize == "nf4":
        save_nf4(tmp / "base-16bit", tmp / "base", shard_size)
    meta = {"size_gb": size_gb, "shard_size": shard_size, "layers": layers, "hidden": HIDDEN,
            "intermediate": INTERMEDIATE, "vocab": (tokens or {}).get("vocab_size", VOCAB), "quantize": quantize,
            "tokenizer": tokenizer_from.name if tokenizer_from else None}
    (tmp / DONE_MARKER).write_text(json.dumps(meta))
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("dest", type=Path)
    parser.add_argument("--size-gb", type=float, default=1.0)
    parser.add_argument("--shard-size", default="5GB")
    parser.add_argument("--quantize", choices=["none", "nf4"], default="none", help="store the base in 4 bits")
    parser.add_argument("--tokenizer-from", type=Path, help="a model folder whose tokenizer the base gets")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # library deprecation chatter
    build(args.dest, args.size_gb, args.shard_size, args.quantize, args.tokenizer_from)


if __name__ == "__main__":
    main()
