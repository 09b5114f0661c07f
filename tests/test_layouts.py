"""How adapter names (the model in memory) are matched with checkpoint names (the files), beyond the
families of test_any_model_vlm.py and test_any_model_moe.py: expert LoRA written by PEFT 0.18 (which
read expert stacks the other way round), what a user sees when nothing explains a name, and that a
plain merge never pays for transformers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import lorafuse
from conftest import load_model, logits, make_adapter, quiet, save_model
from lorafuse.errors import LorafuseError

# PEFT 0.18 put LoRA on expert stacks (E, d1, d2) as (E, in=d1, out=d2) for every model; 0.19 swapped
# them for experts that are not `is_transposed`. The last 0.18 release, fetched once from PyPI.
OLD_PEFT = "0.18.1"
CACHE = Path(os.environ.get("LORAFUSE_TEST_CACHE", Path.home() / ".cache" / "lorafuse-tests"))
MOE = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=24, num_hidden_layers=2,
           num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4, num_experts_per_tok=2)
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def old_peft() -> Path:
    """PEFT 0.18.1's wheel unpacked in the test cache (pip download from PyPI, once)."""
    site = CACHE / f"peft-{OLD_PEFT}"
    if not (site / "peft" / "__init__.py").is_file():
        wheels = CACHE / "wheels"
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", f"peft=={OLD_PEFT}",
                               "-d", str(wheels)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"peft {OLD_PEFT} could not be downloaded from PyPI: {done.stderr.strip()[-200:]}")
        with zipfile.ZipFile(next(wheels.glob(f"peft-{OLD_PEFT}-*.whl"))) as wheel:
            partial = CACHE / f".peft-{OLD_PEFT}-partial"
            shutil.rmtree(partial, ignore_errors=True)
            wheel.extractall(partial)
            partial.rename(site)
    return site


@pytest.fixture(scope="module")
def qwen3_moe(artefacts) -> Path:
    """A tiny Qwen3-MoE as transformers writes it (experts one by one), with non-square experts so that
    PEFT 0.18's and 0.19's layouts have different shapes."""
    def build(folder: Path) -> Path:
        import transformers as tf

        quiet()
        torch.manual_seed(0)
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**MOE))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        return save_model(model, folder)
    return artefacts.get("qwen3-moe-layouts", build)


ADAPTER_018 = """
import sys, torch, peft
from transformers import AutoModelForCausalLM
from peft import LoraConfig, get_peft_model
assert peft.__version__ == sys.argv[3], peft.__version__
base, out = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
torch.manual_seed(1)
model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], init_lora_weights=False,
                                         target_parameters=%r))
model.eval()
ids = torch.arange(3, 19).reshape(1, -1)
with torch.no_grad():
    torch.save(model(ids).logits, out + "/logits.pt")
model.save_pretrained(out)
""" % EXPERTS


@pytest.fixture(scope="module")
def peft018_adapter(qwen3_moe, artefacts) -> Path:
    """An expert adapter saved by PEFT 0.18.1 itself, with the logits of its unmerged model."""
    site = old_peft()

    def build(folder: Path) -> Path:
        env = {**os.environ, "PYTHONPATH": str(site)}
        subprocess.run([sys.executable, "-c", ADAPTER_018, str(qwen3_moe), str(folder), OLD_PEFT], check=True, env=env,
                       capture_output=True)
        return folder
    return artefacts.get("peft018-adapter", build)


def test_expert_lora_from_peft_018_merges_as_peft_018_computes(qwen3_moe, peft018_adapter, tmp_path):
    config = json.loads((peft018_adapter / "adapter_config.json").read_text())
    assert config["peft_version"] == OLD_PEFT
    out = tmp_path / "out"
    lorafuse.merge(qwen3_moe, peft018_adapter, out)
    want = torch.load(peft018_adapter / "logits.pt").double()
    ids = torch.arange(3, 19).reshape(1, -1)
    got = logits(load_model(out), ids)
    base = logits(load_model(qwen3_moe), ids)
    assert (want - base).abs().max() > 100 * (got - want).abs().max()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_expert_lora_without_peft_version_is_read_by_its_shapes(qwen3_moe, peft018_adapter, tmp_path):
    """An adapter whose config does not say which PEFT wrote it: the expert stacks here are not square,
    so lora_A's input size tells the layout."""
    adapter = tmp_path / "adapter"
    shutil.copytree(peft018_adapter, adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["peft_version"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    lorafuse.merge(qwen3_moe, adapter, tmp_path / "out")
    ids = torch.arange(3, 19).reshape(1, -1)
    torch.testing.assert_close(logits(load_model(tmp_path / "out"), ids), torch.load(adapter / "logits.pt").double(),
                               rtol=1e-5, atol=1e-5)


def test_square_experts_without_peft_version_are_refused(artefacts, tmp_path):
    """With square experts both layouts have the same shapes: only peft_version can tell them apart."""
    import transformers as tf
    from peft import LoraConfig

    def build(folder: Path) -> Path:
        quiet()
        torch.manual_seed(0)
        return save_model(tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**{**MOE, "moe_intermediate_size": 16})), folder)
    base = artefacts.get("qwen3-moe-square", build)
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(r=2, target_parameters=EXPERTS[:1],
                                                                  init_lora_weights=False))
    config = json.loads((adapter / "adapter_config.json").read_text())
    del config["peft_version"]
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(LorafuseError, match="no peft_version.*square"):
        lorafuse.plan(base, adapter)


def test_an_adapter_for_another_layout_names_the_closest_checkpoint_modules(qwen3_moe, tiny_base, tmp_path):
    """A Llama adapter on a Qwen3-MoE base: its attention names exist there, its MLP names do not; the
    message names the closest checkpoint modules and what was tried, transformers' rules included."""
    from peft import LoraConfig

    base = qwen3_moe
    llama = tiny_base("llama")
    adapter = make_adapter(llama, tmp_path / "adapter", LoraConfig(r=2, target_modules=["q_proj", "gate_proj"],
                                                                   init_lora_weights=False))
    with pytest.raises(LorafuseError) as caught:
        lorafuse.plan(base, adapter)
    message = str(caught.value)
    assert "model.layers.0.mlp.gate_proj" in message
    assert "closest checkpoint modules to model.layers.0.mlp.gate_proj" in message
    assert re.search(r"model\.layers\.0\.mlp\.experts\.\d\.gate_proj\b", message)
    assert "transformers" in message and "Qwen3MoeForCausalLM" in message
    assert "\n" not in message


def test_a_plain_merge_never_imports_transformers(tiny_base, artefacts, tmp_path):
    """Names that match need no layout: the merge runs without transformers (or torch) in the process."""
    from peft import LoraConfig

    base = tiny_base("llama", "bf16")
    adapter = artefacts.get("llama-plain-adapter", lambda d: make_adapter(
        base, d, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)))
    script = ("import sys, lorafuse; lorafuse.merge(sys.argv[1], sys.argv[2], sys.argv[3]); "
              "print(sorted(m for m in ('transformers', 'torch') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script, str(base), str(adapter), str(tmp_path / "out")],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_vit_checkpoint_in_the_old_layout_merges_as_peft_computes(artefacts, tmp_path):
    """transformers 5 names ViT's modules anew in memory (`vit.layers.N.attention.q_proj`) and still saves
    the old layout (`vit.encoder.layer.N.attention.attention.query`): a classifier adapter (LoRA on the
    attention and MLP, the head in modules_to_save) merges into the old names, and the result loads and
    computes what the unmerged PEFT model computes."""
    import transformers as tf
    from peft import LoraConfig, PeftModel
    from safetensors import safe_open

    def build(folder: Path) -> Path:
        quiet()
        torch.manual_seed(0)
        config = tf.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                              image_size=16, patch_size=4, num_labels=3)
        return save_model(tf.ViTForImageClassification(config), folder)
    base = artefacts.get("vit-old-layout", build)
    model = tf.ViTForImageClassification.from_pretrained(base)
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "fc1"],
                                                                  modules_to_save=["classifier"], init_lora_weights=False),
                           model=model)
    out = tmp_path / "out"
    lorafuse.merge(base, adapter, out)

    def names(folder: Path) -> dict:
        with safe_open(folder / "model.safetensors", "pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert any(".attention.attention.query." in k for k in names(base)) and names(out) == names(base)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    merged, info = tf.ViTForImageClassification.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    peft = PeftModel.from_pretrained(tf.ViTForImageClassification.from_pretrained(base), adapter).eval()
    plain = tf.ViTForImageClassification.from_pretrained(base).eval()
    with torch.no_grad():
        want, got, before = (m(pixel_values=pixels).logits for m in (peft, merged.eval(), plain))
    assert (want - before).abs().max() > 100 * (got - want).abs().max()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
