"""The training-script call (#20): `lorafuse.save_pretrained_merged(model, ...)` on a live PeftModel, and
`LorafuseMergeCallback` at the end of a real transformers Trainer.

PEFT is the oracle: the merged folder, loaded by transformers, must compute what the live PeftModel computes
(unmerged), and it must come from the base's files, not the weights in memory (which the tests corrupt, or
load in 4-bit). Tiny models from conftest; the tokenizer is a word-level one made by `tokenizers`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import lorafuse
from conftest import TORCH_DTYPES, leftovers, load_model, load_peft, logits, perturb_trainables, read_tensors, same_bytes

# Relative to the logit scale, as in test_merge_vs_peft: fp32 rounding only, or one more 16-bit rounding per weight.
LOGIT_RTOL = {"fp32": 1e-5, "bf16": 16 * 2.0**-8}
TARGETS = ["q_proj", "v_proj", "down_proj"]
NEW_TOKEN = "<tool>"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lora_config(**kwargs):
    from peft import LoraConfig

    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False, **kwargs})


def peft_model(model, **kwargs):
    """get_peft_model with random A and B and every other trainable tensor moved: a trained adapter's state."""
    from peft import get_peft_model

    torch.manual_seed(1)
    wrapped = get_peft_model(model, lora_config(**kwargs))
    perturb_trainables(wrapped)
    return wrapped.eval()


def save_tokenizer(folder: Path, extra: str | None = None):
    """A word-level tokenizer for the tiny models' 128 tokens, saved by transformers; `extra` adds a token, as a
    training script does before resize_token_embeddings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(127)} | {"[UNK]": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="t1", pad_token="t0")
    if extra:
        fast.add_tokens([extra], special_tokens=True)
    fast.save_pretrained(folder)
    return fast


@pytest.fixture(scope="module")
def bases(tiny_base, tmp_path_factory):
    """The tiny Llama as fp32 and bf16 folders, each with the tokenizer a base ships."""
    root = tmp_path_factory.mktemp("training-bases")
    found = {}
    for dtype in ("fp32", "bf16"):
        found[dtype] = root / dtype
        shutil.copytree(tiny_base("llama", dtype), found[dtype])
        save_tokenizer(found[dtype])
    return found


def ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


def assert_close_logits(got: torch.Tensor, want: torch.Tensor, base: torch.Tensor, dtype: str) -> None:
    """Within the dtype's tolerance of the oracle, and the adapter visibly matters (else the test proves nothing)."""
    scale = want.abs().max().item()
    err, effect = (got - want).abs().max().item(), (base - want).abs().max().item()
    tol = LOGIT_RTOL[dtype] * scale
    assert err <= tol, f"max |merged - PEFT| = {err:.3g} > {tol:.3g}"
    assert effect > 10 * max(err, tol / 10), f"the adapter barely moves the logits ({effect:.3g})"


def nothing_written(parent: Path, out: Path) -> None:
    assert not os.path.lexists(out), f"{out} was written"
    assert not leftovers(parent), leftovers(parent)


# --- (a) the merge equals the live PeftModel ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_merged_model_computes_what_the_live_peft_model_does(bases, tmp_path, dtype):
    live = peft_model(load_model(bases[dtype], TORCH_DTYPES[dtype]))
    want = logits(live, ids())
    report = lorafuse.save_pretrained_merged(live, tmp_path / "merged")

    merged, info = load_model(tmp_path / "merged", TORCH_DTYPES[dtype], info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with live.disable_adapter():
        base_logits = logits(live, ids())
    assert_close_logits(logits(merged, ids()), want, base_logits, dtype)
    assert report.out == str(tmp_path / "merged") and report.tensors_merged == 2 * len(TARGETS)
    assert (tmp_path / "merged" / "tokenizer.json").is_file()  # the base's, carried
    assert sorted(os.listdir(tmp_path)) == ["merged"]  # the adapter's temporary folder is gone


# --- (b) the files are merged, not the weights in memory ---------------------------------------------------------

def test_the_weights_in_memory_are_not_read(bases, tmp_path):
    """The live model's base weight zeroed after training changes nothing: the merge streams from the base's
    files, so it equals lorafuse's merge of the same adapter saved by PEFT, and PEFT's model loaded afresh."""
    base = bases["fp32"]
    live = peft_model(load_model(base))
    live.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        live.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight.zero_()
        live.base_model.model.model.layers[1].mlp.gate_proj.weight.zero_()
    lorafuse.save_pretrained_merged(live, tmp_path / "merged")
    lorafuse.merge(base, tmp_path / "adapter", tmp_path / "from-files")

    got, want = read_tensors(tmp_path / "merged"), read_tensors(tmp_path / "from-files")
    assert got.keys() == want.keys() and all(same_bytes(got[k], want[k]) for k in want)
    assert got["model.layers.0.self_attn.q_proj.weight"].abs().max() > 0.01
    fresh = load_peft(base, tmp_path / "adapter")
    assert not torch.allclose(logits(live, ids()), logits(fresh, ids()))  # the corruption matters
    assert_close_logits(logits(load_model(tmp_path / "merged"), ids()), logits(fresh, ids()),
                        logits(load_model(base), ids()), "fp32")


# --- (c) a model trained in 4-bit ---------------------------------------------------------------------------------

def load_in_4bit(folder: Path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32))


def test_a_model_loaded_in_4bit_from_a_16bit_checkpoint_merges_into_that_checkpoint(bases, tmp_path):
    base = bases["bf16"]
    live = peft_model(load_in_4bit(base))
    assert live.get_base_model().is_loaded_in_4bit
    live.save_pretrained(tmp_path / "adapter")
    planned = []
    report = lorafuse.save_pretrained_merged(live, tmp_path / "merged", on_plan=planned.append)
    lorafuse.merge(base, tmp_path / "adapter", tmp_path / "from-16bit")

    got, want = read_tensors(tmp_path / "merged"), read_tensors(tmp_path / "from-16bit")
    assert got.keys() == want.keys() and all(same_bytes(got[k], want[k]) for k in want)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    note = [n for n in report.notes if "quantized on loading (bitsandbytes)" in n]
    assert len(note) == 1 and "as Unsloth does" in note[0] and str(base) in note[0], report.notes
    assert note[0] in planned[0].notes
    assert "quantization_config" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_a_model_loaded_from_a_4bit_checkpoint_merges_into_its_dequantized_weights(bases, tmp_path):
    load_in_4bit(bases["bf16"]).save_pretrained(tmp_path / "nf4")  # a pre-quantized checkpoint, as on the Hub
    live = peft_model(load_model(tmp_path / "nf4"))
    live.save_pretrained(tmp_path / "adapter")
    report = lorafuse.save_pretrained_merged(live, tmp_path / "merged")
    expected = lorafuse.merge(tmp_path / "nf4", tmp_path / "adapter", tmp_path / "from-nf4")

    got, want = read_tensors(tmp_path / "merged"), read_tensors(tmp_path / "from-nf4")
    assert got.keys() == want.keys() and all(same_bytes(got[k], want[k]) for k in want)
    assert report.notes == expected.notes and any("dequantized" in n for n in report.notes), report.notes
    assert not any("quantized on loading" in n for n in report.notes)


# --- (d) a tokenizer with new tokens --------------------------------------------------------------------------

def resized_model(base: Path, tmp_path: Path, **lora_kwargs):
    tokenizer = save_tokenizer(tmp_path / "tokenizer-made", extra=NEW_TOKEN)
    model = load_model(base)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return peft_model(model, **lora_kwargs), tokenizer


@pytest.mark.parametrize("how", ["modules_to_save", "save_embedding_layers"])
def test_a_tokenizer_with_added_tokens_is_written_with_the_model(bases, tmp_path, how):
    from transformers import AutoTokenizer

    if how == "modules_to_save":
        live, tokenizer = resized_model(bases["fp32"], tmp_path, modules_to_save=["embed_tokens", "lm_head"])
        options = {}
    else:
        live, tokenizer = resized_model(bases["fp32"], tmp_path)
        with torch.no_grad():  # as training the new token's rows would
            live.get_input_embeddings().weight[128].normal_()
            live.get_output_embeddings().weight[128].normal_()
        options = {"save_embedding_layers": True}
    new_id = tokenizer.convert_tokens_to_ids(NEW_TOKEN)
    assert new_id == 128
    inputs = torch.cat([ids(), torch.full((2, 1), new_id)], dim=1)
    want = logits(live, inputs)
    lorafuse.save_pretrained_merged(live, tmp_path / "merged", tokenizer, **options)

    written = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert written.convert_tokens_to_ids(NEW_TOKEN) == new_id and len(written) == 129
    assert written(f"t5 {NEW_TOKEN} t7")["input_ids"] == [5, new_id, 7]
    merged = load_model(tmp_path / "merged")
    assert merged.config.vocab_size == 129
    with live.disable_adapter():
        base_logits = logits(live, inputs)
    assert_close_logits(logits(merged, inputs), want, base_logits, "fp32")


def test_a_resized_vocabulary_the_adapter_would_not_hold_is_refused(bases, tmp_path):
    live, tokenizer = resized_model(bases["fp32"], tmp_path)
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(lorafuse.LorafuseError) as refused:
        lorafuse.save_pretrained_merged(live, parent / "merged", tokenizer)
    message = str(refused.value)
    assert "\n" not in message and "resized to 129 tokens (the base has 128)" in message
    assert 'modules_to_save=["embed_tokens", "lm_head"]' in message and "save_embedding_layers=True" in message
    assert os.listdir(parent) == []
    nothing_written(parent, parent / "merged")


# --- (e) the Trainer callback -----------------------------------------------------------------------------------

def test_the_callback_merges_at_the_end_of_training(bases, tmp_path):
    from peft import get_peft_model
    from transformers import Trainer, TrainingArguments, default_data_collator

    base = bases["fp32"]
    tokenizer = save_tokenizer(tmp_path / "tokenizer-made")
    torch.manual_seed(0)
    live = get_peft_model(load_model(base), lora_config(init_lora_weights=True))  # B = 0: training moves it
    rows = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))
    data = [{"input_ids": row, "attention_mask": torch.ones_like(row), "labels": row} for row in rows]
    callback = lorafuse.LorafuseMergeCallback(tmp_path / "merged")
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=0.05, use_cpu=True, report_to=[], save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=live, args=args, train_dataset=data, data_collator=default_data_collator,
                      processing_class=tokenizer, callbacks=[callback])
    trainer.train()

    assert (tmp_path / "merged" / "config.json").is_file() and callback.report.out == str(tmp_path / "merged")
    assert (tmp_path / "merged" / "tokenizer.json").is_file()
    live.eval()
    with live.disable_adapter():
        base_logits = logits(live, ids())
    assert_close_logits(logits(load_model(tmp_path / "merged"), ids()), logits(live, ids()), base_logits, "fp32")


def test_importing_lorafuse_stays_light():
    """The callback subclasses transformers' TrainerCallback, yet `import lorafuse` imports neither transformers
    nor torch: the class is made on first use."""
    import subprocess
    import sys

    from transformers import TrainerCallback

    src = str(Path(lorafuse.__file__).parents[1])
    code = "import sys, lorafuse; print([m for m in ('torch', 'transformers', 'peft') if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": src})
    assert done.returncode == 0 and done.stdout.strip() == "[]", (done.stdout, done.stderr[-2000:])
    assert issubclass(lorafuse.LorafuseMergeCallback, TrainerCallback)
    from lorafuse import LorafuseMergeCallback
    assert LorafuseMergeCallback is lorafuse.LorafuseMergeCallback


# --- (f) save_method lora, and the base --------------------------------------------------------------------------

def test_save_method_lora_writes_the_adapter_peft_loads(bases, tmp_path):
    live = peft_model(load_model(bases["fp32"]))
    tokenizer = save_tokenizer(tmp_path / "tokenizer-made", extra=NEW_TOKEN)
    lorafuse.save_pretrained_merged(live, tmp_path / "adapter", tokenizer, save_method="lora")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(os.listdir(tmp_path / "adapter"))
    assert torch.equal(logits(load_peft(bases["fp32"], tmp_path / "adapter"), ids()), logits(live, ids()))
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "adapter").iterdir()}
    with pytest.raises(lorafuse.LorafuseError, match="already exists"):
        lorafuse.save_pretrained_merged(live, tmp_path / "adapter", save_method="lora")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "adapter").iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["adapter", "tokenizer-made"]


def test_base_not_found_says_what_was_tried_and_base_overrides(bases, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(bases["fp32"], moved)
    live = peft_model(load_model(moved))
    shutil.rmtree(moved)
    with pytest.raises(lorafuse.LorafuseError) as refused:
        lorafuse.save_pretrained_merged(live, tmp_path / "merged")
    message = str(refused.value)
    assert "\n" not in message and str(moved) in message and "pass base=" in message
    nothing_written(tmp_path, tmp_path / "merged")

    lorafuse.save_pretrained_merged(live, tmp_path / "merged", base=bases["fp32"])
    with live.disable_adapter():
        base_logits = logits(live, ids())
    assert_close_logits(logits(load_model(tmp_path / "merged"), ids()), logits(live, ids()), base_logits, "fp32")


@pytest.mark.parametrize("bad, named", [
    (dict(save_method="merged_8bit"), "save_method 'merged_8bit'"),
    (dict(push_to_hub=True), "push_to_hub takes the Hub repo"),
    (dict(save_method="lora", dtype="bf16"), "dtype does not apply"),
    (dict(adapter_name="other"), "no adapter 'other'"),
    (dict(save_method="gguf", gguf_type="q9_9"), "q9_9"),
])
def test_bad_arguments_are_one_line_errors(bases, tmp_path, bad, named):
    live = peft_model(load_model(bases["fp32"]))
    with pytest.raises(lorafuse.LorafuseError) as refused:
        lorafuse.save_pretrained_merged(live, tmp_path / "merged", **bad)
    assert "\n" not in str(refused.value) and named in str(refused.value)
    nothing_written(tmp_path, tmp_path / "merged")


def test_a_plain_model_is_refused(bases, tmp_path):
    with pytest.raises(lorafuse.LorafuseError, match="takes a PEFT model"):
        lorafuse.save_pretrained_merged(load_model(bases["fp32"]), tmp_path / "merged")


def test_a_base_loaded_from_the_hub_is_read_from_the_cache(bases, tmp_path, monkeypatch):
    """A model loaded by repo id (from a local stand-in for the Hub) merges from the Hugging Face cache's copy of
    its files: nothing is downloaded again, and offline, with the Hub gone, the cache alone serves the merge."""
    from huggingface_hub import constants
    from transformers import AutoModelForCausalLM

    from hub_server import HubRepo, HubServer, use_in_process

    repo = HubRepo("org/base")
    commit = repo.commit(bases["fp32"])
    cache = tmp_path / "hf-cache"
    with HubServer([repo], max_seconds=120) as server:
        use_in_process(server, monkeypatch)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        live = peft_model(AutoModelForCausalLM.from_pretrained("org/base", cache_dir=cache))
        assert server.file_requests("GET")["model.safetensors"] == 1
        report = lorafuse.save_pretrained_merged(live, tmp_path / "merged")
        assert server.file_requests("GET")["model.safetensors"] == 1  # the merge read the cached file
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    lorafuse.save_pretrained_merged(live, tmp_path / "merged-offline")

    live.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    lorafuse.merge(bases["fp32"], tmp_path / "adapter", tmp_path / "from-folder")
    want = read_tensors(tmp_path / "from-folder")
    for out in ("merged", "merged-offline"):
        got = read_tensors(tmp_path / out)
        assert got.keys() == want.keys() and all(same_bytes(got[k], want[k]) for k in want)
    manifest = json.loads((tmp_path / "merged" / "lorafuse-manifest.json").read_text())
    assert manifest["settings"]["base"] == "org/base" and report.bytes_read > 0
    assert (cache / "models--org--base" / "snapshots" / commit).is_dir()


@pytest.mark.slow
def test_save_method_gguf_writes_one_gguf_with_the_new_tokenizer(tmp_path):
    """A tiny Llama with SmolLM2's tokenizer plus a new token: one GGUF in the folder, named after it and its type,
    holding the new vocabulary; the same file as lorafuse.merge makes from the adapter and tokenizer saved by hand."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from conftest import TINY
    from gguf_support import assert_same_gguf, fetch_llama_cpp, read_ggufs, smollm2_in_a_subprocess

    llama_cpp, smol = fetch_llama_cpp(), smollm2_in_a_subprocess()
    smol_config = json.loads((smol / "config.json").read_text())
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY, "vocab_size": smol_config["vocab_size"]}, tie_word_embeddings=False,
                         bos_token_id=smol_config["bos_token_id"], eos_token_id=smol_config["eos_token_id"])
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(tmp_path / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(smol / name, tmp_path / "base" / name)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    tokenizer.add_tokens([NEW_TOKEN], special_tokens=True)
    model = load_model(tmp_path / "base")
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    live = peft_model(model, modules_to_save=["embed_tokens", "lm_head"])

    report = lorafuse.save_pretrained_merged(live, tmp_path / "smol-tool", tokenizer, save_method="gguf",
                                             gguf_type="q8_0", llama_cpp=llama_cpp)
    made = tmp_path / "smol-tool" / "smol-tool-Q8_0.gguf"
    assert report.out == str(made) and os.listdir(tmp_path / "smol-tool") == [made.name]
    live.save_pretrained(tmp_path / "adapter")
    tokenizer.save_pretrained(tmp_path / "adapter")
    lorafuse.merge(tmp_path / "base", tmp_path / "adapter", tmp_path / "by-hand.gguf", gguf_type="q8_0",
                   llama_cpp=llama_cpp)
    got, want = read_ggufs(llama_cpp, made, tmp_path / "by-hand.gguf")
    assert_same_gguf(got, want)
    vocab = len(tokenizer)
    assert vocab == smol_config["vocab_size"] + 1
    assert got["fields"]["tokenizer.ggml.tokens"]["preview"] == f"array of {vocab}"
    assert {t["name"]: t["shape"] for t in got["tensors"]}["token_embd.weight"] == [TINY["hidden_size"], vocab]
