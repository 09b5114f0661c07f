"""The merge routes under comparison, one per fresh process.

``python routes.py ROUTE BASE ADAPTER OUT`` runs one route to completion (data
synced to disk) and prints ``{"peak_rss_mb": ...}`` as its last stdout line.
Running each route in its own process is what makes ``ru_maxrss`` a per-route
number; routes that shell out to a command report the command's peak instead
of this (tiny, torch-free) wrapper's.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from functools import partial
from pathlib import Path

SAFETENSORS_META = {"format": "pt"}
# mergekit pins its own torch / transformers / peft, so it runs from a venv of its own, outside the repo and
# apart from lorafuse's, made once per mergekit version (ensure_mergekit); torch first, so that pip takes
# the CPU build the rest then accepts.
MERGEKIT_VERSION = "0.1.5"
MERGEKIT_TORCH = "torch==2.13.0"
MERGEKIT_VENV = Path.home() / ".cache" / "lorafuse-bench" / f"mergekit-venv-{MERGEKIT_VERSION}"
MERGEKIT_CONFIG = "merge_method: passthrough\ndtype: bfloat16\nmodels:\n  - model: {base}+{adapter}\n"


def run_command(argv: list[str]) -> str:
    """Run an external command and measure it rather than us; fail with its own error last."""
    try:
        code = subprocess.run(argv).returncode
    except FileNotFoundError:
        sys.exit(f"{argv[0]}: command not found")
    if code != 0:
        sys.exit(f"{Path(argv[0]).name} exited with status {code}")
    os.sync()
    return "children"


def lorafuse_cli() -> str:
    """The ``lorafuse`` console script from the same venv as this interpreter."""
    local = Path(sys.executable).with_name("lorafuse")
    return str(local) if local.exists() else (shutil.which("lorafuse") or "lorafuse")


def route_lorafuse(base: Path, adapter: Path, out: Path, device: str = "cpu") -> str:
    return run_command([lorafuse_cli(), "merge", str(base), str(adapter), str(out), "--quiet", "--device", device])


def route_copy(base: Path, adapter: Path, out: Path) -> str:
    """Lower bound: the same bytes, read and written, with no maths."""
    return run_command(["cp", "-r", str(base), str(out)])


def route_copy_16bit(base: Path, adapter: Path, out: Path) -> str:
    """Lower bound for a quantized base: the 16-bit model it was made from (the bytes a merge writes)."""
    return route_copy(base.with_name("base-16bit"), adapter, out)


def route_peft(base: Path, adapter: Path, out: Path) -> str:
    """What most people run: load everything, merge in memory, save. A quantized base is dequantized to
    bf16 first (transformers' `dequantize()`), so that the output is the 16-bit model lorafuse writes:
    PEFT's merge into 4-bit layers would quantize the result again."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quantized = "quantization_config" in json.loads((base / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.bfloat16,
                                                 **({"device_map": "cpu"} if quantized else {}))
    if quantized:
        model = model.dequantize()
        model._weight_conversions = []  # transformers 5 cannot reverse bnb's loading ops when saving
    model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    model.save_pretrained(str(out))
    os.sync()
    return "self"


def lora_scale(adapter: Path) -> float:
    config = json.loads((adapter / "adapter_config.json").read_text())
    rank, alpha = config["r"], config["lora_alpha"]
    return alpha / rank**0.5 if config.get("use_rslora") else alpha / rank


def lora_pairs(adapter: Path) -> dict[str, tuple]:
    """Base weight name -> (A, B) from a PEFT adapter file."""
    from safetensors.torch import load_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    pairs = {}
    for key, a in tensors.items():
        if ".lora_A." in key:
            target = key.removeprefix("base_model.model.").replace(".lora_A.", ".")
            pairs[target] = (a, tensors[key.replace(".lora_A.", ".lora_B.")])
    return pairs


def route_shard(base: Path, adapter: Path, out: Path) -> str:
    """Hand-rolled script: whole shard in memory, fp32 delta, cast back."""
    from safetensors.torch import load_file, save_file

    scale, pairs = lora_scale(adapter), lora_pairs(adapter)
    out.mkdir(parents=True)
    for item in base.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy2(item, out / item.name)
            continue
        shard = load_file(str(item))
        for name, weight in shard.items():
            if name in pairs:
                a, b = pairs[name]
                merged = weight.float() + scale * (b.float() @ a.float())
                shard[name] = merged.to(weight.dtype)
        save_file(shard, str(out / item.name), metadata=SAFETENSORS_META)
        del shard
    os.sync()
    return "self"


def ensure_mergekit() -> Path:
    """The mergekit venv, made on first use (a few minutes: torch, transformers, peft and mergekit)."""
    command = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if not command.exists():
        print(f"installing mergekit {MERGEKIT_VERSION} into {MERGEKIT_VENV} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(MERGEKIT_VENV)], check=True)
        pip = [str(MERGEKIT_VENV / "bin" / "python"), "-m", "pip", "install", "--quiet"]
        subprocess.run(pip + [MERGEKIT_TORCH], check=True)
        subprocess.run(pip + [f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return command


def route_mergekit(base: Path, adapter: Path, out: Path) -> str:
    """mergekit's `BASE+ADAPTER` model: it merges the adapter with PEFT (`merge_and_unload`) into its LoRA
    merge cache, saves that model there, then its passthrough method copies it tensor by tensor to OUT.
    The cache is the run's own (a cached merge would be reused, not redone) and is deleted once synced:
    the intermediate model's writing is part of what the route costs."""
    command = MERGEKIT_VENV / "bin" / "mergekit-yaml"
    if not command.exists():
        sys.exit(f"{command}: missing (bench_merge.py installs it)")
    cache = out.with_name(out.name + "-lora-cache")
    shutil.rmtree(cache, ignore_errors=True)
    config = out.with_name(out.name + "-mergekit.yml")
    config.write_text(MERGEKIT_CONFIG.format(base=base, adapter=adapter))
    try:
        return run_command([str(command), str(config), str(out), "--lora-merge-cache", str(cache),
                            "--lora-merge-dtype", "bfloat16", "--quiet"])
    finally:
        shutil.rmtree(cache, ignore_errors=True)
        config.unlink()


def converter_script() -> str:
    """llama.cpp's convert_hf_to_gguf.py: the copy lorafuse itself converts with (LLAMA_CPP_DIR, or the
    pinned one in lorafuse's cache, fetched on first use)."""
    from lorafuse.sinks.gguf.converter import find

    return str(find(None) / "convert_hf_to_gguf.py")


def convert(folder: Path, gguf: Path, gguf_type: str) -> str:
    return run_command([sys.executable, converter_script(), str(folder), "--outfile", str(gguf), "--outtype", gguf_type])


def route_gguf(base: Path, adapter: Path, out: Path, gguf_type: str = "q8_0") -> str:
    """lorafuse straight to GGUF: one pass, no merged model on disk."""
    out.mkdir(parents=True)
    return run_command([lorafuse_cli(), "merge", str(base), str(adapter), str(out / "model.gguf"), "--quiet",
                        "--gguf-type", gguf_type])


def route_two_step(base: Path, adapter: Path, out: Path, gguf_type: str = "q8_0") -> str:
    """What users do today: merge to safetensors, then run the converter on the merge (both stay on disk)."""
    out.mkdir(parents=True)
    route_lorafuse(base, adapter, out / "merged")
    return convert(out / "merged", out / "model.gguf", gguf_type)


def route_convert(base: Path, adapter: Path, out: Path, gguf_type: str = "q8_0") -> str:
    """The floor of a GGUF merge: the converter alone, on a model already merged (`merged` beside the base)."""
    out.mkdir(parents=True)
    return convert(base.with_name("merged"), out / "model.gguf", gguf_type)


ROUTES = {
    "lorafuse": route_lorafuse,
    "lorafuse-cuda": partial(route_lorafuse, device="cuda"),  # needs a CUDA build of torch and a GPU
    "peft": route_peft,
    "mergekit": route_mergekit,  # from its own venv (ensure_mergekit)
    "shard": route_shard,
    "copy": route_copy,
    "copy-16bit": route_copy_16bit,  # a quantized base's 16-bit original
    "gguf": route_gguf,  # the GGUF routes need a base with a tokenizer (bench_merge.py --gguf)
    "two-step": route_two_step,
    "convert": route_convert,
}


def main() -> None:
    name, base, adapter, out = sys.argv[1], *map(Path, sys.argv[2:5])
    who = ROUTES[name](base, adapter, out)
    scope = resource.RUSAGE_CHILDREN if who == "children" else resource.RUSAGE_SELF
    peak_kib = resource.getrusage(scope).ru_maxrss  # KiB on Linux
    print(json.dumps({"route": name, "peak_rss_mb": peak_kib / 1024}))


if __name__ == "__main__":
    main()
