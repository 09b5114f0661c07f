"""--device cuda, on a GPU (skipped without one: CI has none).

With a GPU present, the oracle matrices (test_merge_vs_peft, test_quantized_bases, test_compute_paths)
run their merges on it too. Here, what only the GPU path has to keep: GPU memory holds one tensor per
pipeline thread, whatever the size of the model, plain or quantized.
"""

from __future__ import annotations

import pytest
import torch

import lorafuse
from conftest import make_adapter, quiet
from lorafuse.plan import pipeline_depth

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")


def wide_llama(folder, layers: int):
    """A Llama whose largest patched tensor (the MLP's, 1024 x 256) dwarfs the allocator's granularity."""
    import transformers as tf

    quiet()
    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    tf.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


def quantized(bf16, kind: str, folder):
    """The model with its q/k/v/o/gate/up/down weights stored as `kind`: NF4 as transformers and
    bitsandbytes save it, or block-scaled FP8 as DeepSeek-V3 stores it (with lorafuse's quantizer, which
    test_quant_kernels checks against DeepSeek-V3's formulas)."""
    import json

    from safetensors.torch import load_file, save_file

    import transformers as tf
    from lorafuse.quant.fp8 import quantize_fp8_block

    if kind == "nf4":
        config = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16)
        tf.AutoModelForCausalLM.from_pretrained(bf16, quantization_config=config, device_map="cpu",
                                                dtype=torch.bfloat16).save_pretrained(folder)
        return folder
    folder.mkdir()
    tensors = {}
    for name, w in load_file(str(bf16 / "model.safetensors")).items():
        if name.endswith("proj.weight"):
            tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_block(w)
        else:
            tensors[name] = w
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((bf16 / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [128, 128]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("base_kind", ["bf16", "nf4", "fp8"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_gpu_memory_is_one_tensor_per_pipeline_thread(use_dora, base_kind, tmp_path):
    """Each pipeline thread holds on the GPU the fp32 value of its tensor and the rounded result on its
    way back: 1.5x the largest patched tensor in fp32. A quantized weight's stored bytes (a quarter or
    an eighth of that) and its decoding's index (at most an eighth) are gone before the result is
    rounded. The adapter's factors come and go with their tensor. So the peak, for 2 layers as for 8,
    is within pipeline_depth() x 1.5 x that tensor plus factors. (Not equal for both: with 8 threads,
    the small model rarely has 8 large tensors in flight.) A first merge runs unmeasured: cuBLAS keeps a
    workspace per thread for the process's life (32 MiB each on an H100, 276 MB at the peak of a first
    merge with 8 threads, seen), whatever the model."""
    from peft import LoraConfig

    if base_kind == "nf4":
        pytest.importorskip("bitsandbytes")
    models = {}
    for layers in (2, 8):
        bf16 = wide_llama(tmp_path / f"bf16-{layers}", layers)
        base = bf16 if base_kind == "bf16" else quantized(bf16, base_kind, tmp_path / f"{base_kind}-{layers}")
        models[layers] = base, make_adapter(bf16, tmp_path / f"adapter{layers}", LoraConfig(
            r=16, lora_alpha=32, init_lora_weights=False, target_modules="all-linear", use_dora=use_dora))
    lorafuse.merge(*models[2], tmp_path / "warm-up", device="cuda")
    peaks = []
    for layers, (base, adapter) in models.items():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        lorafuse.merge(base, adapter, tmp_path / f"out{layers}", device="cuda")
        peaks.append(torch.cuda.max_memory_allocated() - before)
    largest_fp32 = 1024 * 256 * 4
    factors = 2 * 16 * (1024 + 256) * 4 + 1024 * 4  # A and B (and a DoRA magnitude) in fp32
    bound = pipeline_depth() * (1.5 * largest_fp32 + factors)
    assert max(peaks) <= bound, f"{peaks} bytes on the GPU at the peak (2 and 8 layers), more than {bound:.0f}"
