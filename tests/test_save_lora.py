"""--save-method lora (#22): the adapter alone, as a LoRA GGUF for llama.cpp's --lora or as a PEFT folder.

The oracles: llama.cpp's own `convert_lora_to_gguf.py`, run as its own command on the same adapter with `--base`
the base folder (the LoRA GGUF must be its file); llama.cpp itself (llama-cpp-python: the base as
`convert_hf_to_gguf.py` converts it, with the LoRA GGUF applied, must give the logits of lorafuse's merged GGUF,
also for an rsLoRA adapter the script alone gets wrong, and for a LoRA on the embedding of an untied base); and
PEFT (loads the PEFT folder as it loads the input). Refusals are checked through the command line on tiny models:
one line, exit 2, nothing written. The converter is lorafuse's pinned copy, fetched into the test cache; GGUFs
are read in subprocesses (gguf_support).
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import xxhash

import lorafuse
from conftest import (cached_smollm2_adapter, leftovers, load_model, make_adapter, read_adapter, read_tensors,
                      same_bytes, save_model, tree_hash)
from gguf_support import (Lazy, assert_one_line_error, assert_same_gguf, llama_cpp_python,
                          read_ggufs, run_cli, smollm2_in_a_subprocess, start_convert)
from realmodel import cache_root, chat_ids

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


@pytest.fixture(scope="module")
def llama_cpp_dir() -> Path:
    """lorafuse's pinned copy of llama.cpp's converters in the test cache, with the adapter script (a copy fetched
    by an older lorafuse lacks it and is fetched again): the path a fresh machine takes."""
    from lorafuse.sinks.gguf import converter

    with mock.patch.dict(os.environ, {"XDG_CACHE_HOME": str(cache_root())}):
        os.environ.pop("LLAMA_CPP_DIR", None)
        return converter.find(None, converter.NEEDED_FOR_LORA)


def lora_script(llama_cpp: Path, adapter: Path, base: Path, out: Path, outtype: str) -> subprocess.CompletedProcess:
    """llama.cpp's convert_lora_to_gguf.py as a user runs it, with its own gguf-py."""
    argv = [sys.executable, str(llama_cpp / "convert_lora_to_gguf.py"), str(adapter), "--base", str(base),
            "--outfile", str(out), "--outtype", outtype]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    return subprocess.run(argv, capture_output=True, text=True, cwd=out.parent, env=env)


def scaled_adapter(base: Path, folder: Path, config, scale: float = 0.02, seed: int = 1, **save_kwargs) -> Path:
    """A PEFT adapter with random A and B (init_lora_weights=False), B scaled down as training leaves it small,
    so that the model stays coherent and the adapter still moves its logits clearly."""
    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(load_model(base), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.mul_(scale)
    model.save_pretrained(folder, **save_kwargs)
    return folder


@pytest.fixture(scope="module")
def real(tmp_path_factory, llama_cpp_dir):
    """SmolLM2-135M-Instruct (bf16, tied embeddings) and its trained LoRA on every linear layer; per type, the
    LoRA GGUF lorafuse writes and the one the script writes, built on demand."""
    base = smollm2_in_a_subprocess()
    adapter = cached_smollm2_adapter(base, seed=0)
    work = tmp_path_factory.mktemp("save-lora")

    def ours(t):
        out = work / f"ours-{t}" / "adapter.gguf"
        out.parent.mkdir()
        lorafuse.merge(base, adapter, out, save_method="lora", gguf_type=t, llama_cpp=llama_cpp_dir)
        return out

    def theirs(t):
        out = work / f"theirs-{t}.gguf"
        done = lora_script(llama_cpp_dir, adapter, base, out, t)
        assert done.returncode == 0 and out.is_file(), done.stderr[-3000:]
        return out
    return SimpleNamespace(base=base, adapter=adapter, work=work, ours=Lazy(ours), theirs=Lazy(theirs))


# ----------------------------------------------------------------------------------------------------------------
# 1. The LoRA GGUF is the script's own file


@pytest.mark.slow
@pytest.mark.parametrize("gguf_type", ["f32", "bf16", "q8_0"])
def test_lora_gguf_equals_the_script_run_on_the_adapter(real, llama_cpp_dir, gguf_type):
    ours, theirs = read_ggufs(llama_cpp_dir, real.ours[gguf_type], real.theirs[gguf_type])
    assert_same_gguf(ours, theirs)
    names = [t["name"] for t in ours["tensors"]]  # each of the adapter's A and B, under llama.cpp's name
    assert len(names) == len(read_adapter(real.adapter)) and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    assert gguf_type.upper() in {t["type_name"] for t in ours["tensors"]}
    assert ours["fields"]["adapter.lora.alpha"]["preview"] == "16.0"  # the adapter's lora_alpha, applied by llama.cpp


@pytest.mark.slow
def test_auto_is_the_type_the_scripts_auto_means(real, llama_cpp_dir, tmp_path):
    """The script's own `--outtype auto` fails on every adapter in this version (it asks a LoRA tensor for
    `dim()`); lorafuse's auto is the type its rule names: the adapter's 16-bit type, f16 for fp32 factors."""
    failed = lora_script(llama_cpp_dir, real.adapter, real.base, tmp_path / "auto.gguf", "auto")
    assert failed.returncode != 0 and "dim" in failed.stderr.splitlines()[-1], failed.stderr[-2000:]
    dtypes = {t.dtype for t in read_adapter(real.adapter).values()}
    expected = "bf16" if dtypes == {torch.bfloat16} else "f16"
    ours, theirs = read_ggufs(llama_cpp_dir, real.ours["auto"], real.theirs[expected])
    assert_same_gguf(ours, theirs)


# ----------------------------------------------------------------------------------------------------------------
# 2. llama.cpp applies it as the merge


def _llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        sys.path.insert(0, str(llama_cpp_python()))
    import llama_cpp

    return llama_cpp


def _logits(model: Path, prompt: list[int], lora: Path | None = None) -> torch.Tensor:
    """llama.cpp's logits at every position of `prompt`, with the LoRA GGUF applied at its own scale (1). The KV
    cache is f32 (not llama.cpp's default f16), so that nothing on the way is rounded to 16 bits."""
    llama_cpp = _llama_cpp()
    kwargs = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(model_path=str(model), n_ctx=256, logits_all=True, verbose=False, seed=0, n_threads=2,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, **kwargs)
    llm.reset()
    llm.eval(prompt)
    scores = torch.tensor(llm.scores[: llm.n_tokens]).double()
    llm.close()
    return scores


@pytest.fixture(scope="module")
def runs(real, llama_cpp_dir):
    """The base in f32 as llama.cpp's converter makes it, a chat prompt, and the logits of f32 GGUFs on it."""
    from transformers import AutoTokenizer

    base_gguf = start_convert(llama_cpp_dir, real.base, real.work / "base-f32.gguf", "f32")()
    prompt = chat_ids(AutoTokenizer.from_pretrained(real.base), "What is the capital of France?")["input_ids"][0].tolist()

    def merged(adapter: Path) -> torch.Tensor:
        """lorafuse's merge as an f32 GGUF (merged in fp32, not rounded to the base's bf16)."""
        out = real.work / f"merged-{adapter.name}.gguf"
        lorafuse.merge(real.base, adapter, out, dtype="fp32", gguf_type="f32", llama_cpp=llama_cpp_dir)
        try:
            return _logits(out, prompt)
        finally:
            out.unlink()
    return SimpleNamespace(base_gguf=base_gguf, prompt=prompt, base=_logits(base_gguf, prompt),
                           logits=lambda lora: _logits(base_gguf, prompt, lora), merged=merged)


# Both sides are f32 throughout (weights, activations, KV cache): the LoRA side computes W·x + s·B·(A·x), the
# merge (W + s·B·A)·x with the sum rounded once to f32, so they differ by f32 rounding and summation order only,
# carried through 30 layers: about 1e-4 of a logit, measured (with llama.cpp's default f16 KV cache, whose
# rounding flips on such differences, 0.04). The adapters move the logits by more than one, which a LoRA applied
# at a wrong scale, or not at all, would not match.
TOLERANCE = 1e-3
EFFECT = 1.0


@pytest.mark.slow
def test_llama_cpp_with_the_lora_gguf_gives_the_merged_logits(real, runs):
    want = runs.merged(real.adapter)
    got = runs.logits(real.ours["f32"])
    gap, effect = (got - want).abs().max().item(), (runs.base - want).abs().max().item()
    assert effect > EFFECT, f"the adapter hardly changes the logits ({effect}): the check would prove nothing"
    assert gap < TOLERANCE, f"base + LoRA GGUF vs merged GGUF: max |logit gap| {gap} (the adapter's effect: {effect})"


@pytest.fixture(scope="module")
def untied_base(real, tmp_path_factory) -> Path:
    """SmolLM2 with its output head untied from its input embedding (tie_word_embeddings false, lm_head a copy
    of the embedding with seeded noise, so that the two differ), in bf16 with the tokenizer: a base whose
    embedding a LoRA GGUF may change, since llama.cpp then keeps its own output.weight."""
    torch.manual_seed(4)
    model = load_model(real.base, torch.bfloat16)
    model.config.tie_word_embeddings = False
    embedding = model.get_input_embeddings().weight
    head = embedding.detach().clone() + 0.1 * embedding.detach().float().std() * torch.randn(embedding.shape)
    model.lm_head.weight = torch.nn.Parameter(head.to(torch.bfloat16))
    folder = save_model(model, tmp_path_factory.mktemp("untied") / "smollm2-untied", "bf16")
    for name in os.listdir(real.base):
        if name.startswith(("tokenizer", "chat_template", "generation_config")):
            shutil.copy(real.base / name, folder / name)
    saved = read_tensors(folder)
    assert "lm_head.weight" in saved and not torch.equal(saved["lm_head.weight"], saved["model.embed_tokens.weight"])
    return folder


@pytest.mark.slow
def test_lora_gguf_on_the_embedding_of_an_untied_base_gives_the_merged_logits(real, untied_base, llama_cpp_dir):
    """An adapter on embed_tokens (and q_proj) of a base whose head is not tied to its embedding: llama.cpp
    applies the LoRA GGUF's token_embd pair to the looked-up rows (PEFT's embedding LoRA, whose A the script
    transposes) and the model must give the logits of lorafuse's merged GGUF, the embedding's delta included.
    The embedding's pair alone moves the logits by more than EFFECT, so a pair llama.cpp dropped or applied
    transposed or at a wrong scale could not match."""
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    work = untied_base.parent
    with_q = LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    adapter = scaled_adapter(untied_base, work / "embed-adapter", with_q, scale=0.01, seed=5,
                             save_embedding_layers=False)
    tensors = read_adapter(adapter)
    assert any("lora_embedding_A" in k for k in tensors), sorted(tensors)[:4]  # PEFT's embedding LoRA, no whole tensor
    without = work / "q-adapter"  # the same adapter without its embedding pair: the merge of it shows what that adds
    without.mkdir()
    save_file({k: v for k, v in tensors.items() if "embed_tokens" not in k}, str(without / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (without / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["q_proj"]}))

    out = work / "lora" / "adapter.gguf"
    out.parent.mkdir()
    lorafuse.merge(untied_base, adapter, out, save_method="lora", gguf_type="f32", llama_cpp=llama_cpp_dir)
    (meta,) = read_ggufs(llama_cpp_dir, out)
    assert {"token_embd.weight.lora_a", "token_embd.weight.lora_b"} <= {t["name"] for t in meta["tensors"]}

    base_gguf = start_convert(llama_cpp_dir, untied_base, work / "base-f32.gguf", "f32")()
    (base_meta,) = read_ggufs(llama_cpp_dir, base_gguf)
    assert "output.weight" in {t["name"] for t in base_meta["tensors"]}  # llama.cpp's head is its own tensor
    prompt = chat_ids(AutoTokenizer.from_pretrained(untied_base), "What is the capital of France?")["input_ids"][0].tolist()

    def merged(a: Path) -> torch.Tensor:
        gguf = work / f"merged-{a.name}.gguf"
        lorafuse.merge(untied_base, a, gguf, dtype="fp32", gguf_type="f32", llama_cpp=llama_cpp_dir)
        try:
            return _logits(gguf, prompt)
        finally:
            gguf.unlink()
    want, want_without = merged(adapter), merged(without)
    got = _logits(base_gguf, prompt, out)
    gap = (got - want).abs().max().item()
    effect = (_logits(base_gguf, prompt) - want).abs().max().item()
    embedding_effect = (want_without - want).abs().max().item()
    assert embedding_effect > EFFECT, f"the embedding's pair hardly changes the logits ({embedding_effect})"
    assert gap < TOLERANCE, f"base + LoRA GGUF vs merged GGUF: max |logit gap| {gap} (the adapter's effect: " \
                            f"{effect}, its embedding pair's: {embedding_effect})"


@pytest.fixture(scope="module")
def rslora(real, tmp_path_factory):
    """An adapter PEFT scales per module as llama.cpp cannot from one alpha: rsLoRA (alpha/√r), a rank_pattern
    (its own r) and an alpha_pattern (its own alpha)."""
    from peft import LoraConfig

    config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, rank_pattern={"v_proj": 4}, alpha_pattern={"o_proj": 32},
                        target_modules=ATTENTION, init_lora_weights=False)
    return scaled_adapter(real.base, tmp_path_factory.mktemp("rslora") / "rslora-adapter", config)


@pytest.mark.slow
def test_rslora_lora_gguf_gives_the_merged_logits_where_the_script_alone_does_not(real, runs, rslora, llama_cpp_dir):
    out = real.work / "rslora" / "adapter.gguf"
    out.parent.mkdir()
    lorafuse.merge(real.base, rslora, out, save_method="lora", gguf_type="f32", llama_cpp=llama_cpp_dir)
    raw = real.work / "rslora-script.gguf"
    done = lora_script(llama_cpp_dir, rslora, real.base, raw, "f32")
    assert done.returncode == 0, done.stderr[-3000:]  # the script takes it without a word

    want = runs.merged(rslora)
    got, wrong = runs.logits(out), runs.logits(raw)
    effect = (runs.base - want).abs().max().item()
    gap, script_gap = (got - want).abs().max().item(), (wrong - want).abs().max().item()
    assert effect > EFFECT, effect
    assert gap < TOLERANCE, f"base + lorafuse's LoRA GGUF vs merged: max |logit gap| {gap} (effect {effect})"
    assert script_gap > EFFECT / 2, f"the script's own file matches the merge ({script_gap}): the check proves nothing"
    assert sorted(p.name for p in out.parent.iterdir()) == ["adapter.gguf"] and not leftovers(out.parent)
    (meta,) = read_ggufs(llama_cpp_dir, out)
    assert meta["fields"]["adapter.lora.alpha"]["preview"] == "0.0"  # scale 1: B carries PEFT's scale


# ----------------------------------------------------------------------------------------------------------------
# 3. What a LoRA GGUF cannot hold, and settings that do not apply: one line, exit 2, nothing written


def _refusal_adapters():
    from peft import LoraConfig

    lora = dict(r=4, lora_alpha=8, init_lora_weights=False)
    return {
        "dora": ("llama", LoraConfig(**lora, target_modules=["q_proj"], use_dora=True), {}, "DoRA"),
        "modules_to_save": ("llama", LoraConfig(**lora, target_modules=["q_proj"], modules_to_save=["lm_head"]), {},
                            "a whole tensor"),
        "saved_embeddings": ("llama", LoraConfig(**lora, target_modules=["q_proj", "embed_tokens"]),
                             {"save_embedding_layers": True}, "a whole tensor"),
        "trainable_tokens": ("llama", LoraConfig(**lora, target_modules=["q_proj"], trainable_token_indices=[1, 2]), {},
                             "trainable token rows"),
        "lora_bias": ("qwen2", LoraConfig(**lora, target_modules=["q_proj"], lora_bias=True), {}, "LoRA bias"),
        "bias": ("qwen2", LoraConfig(**lora, target_modules=["q_proj"], bias="lora_only"), {}, "a whole tensor"),
        "conv1d": ("gpt2", LoraConfig(**lora, target_modules=["c_attn"], fan_in_fan_out=True), {}, "Conv1D"),
        "tied_embedding": ("llama_tied", LoraConfig(**lora, target_modules=["embed_tokens"]), {}, "ties them"),
    }


@pytest.mark.parametrize("case", list(_refusal_adapters()))
def test_what_a_lora_gguf_cannot_hold_is_refused(case, tiny_base, artefacts, tmp_path, capsys):
    kind, config, save_kwargs, named = _refusal_adapters()[case]
    base = tiny_base(kind)
    adapter = artefacts.get(("save-lora", case), lambda d: make_adapter(base, d, config, **save_kwargs))
    before = tree_hash(adapter)
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "merge", base, adapter, tmp_path / "out" / "adapter.gguf", "--save-method", "lora")
    assert_one_line_error(code, err, named, "merge to a GGUF instead")
    assert os.listdir(tmp_path / "out") == [] and tree_hash(adapter) == before


@pytest.fixture(scope="module")
def tiny(tiny_base, artefacts):
    """A tiny Llama, two adapters for it (saved as safetensors, and as a pickle), and one for a wider model."""
    from peft import LoraConfig

    base = tiny_base("llama")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    wide = tiny_base("llama_wide")
    return SimpleNamespace(
        base=base, adapter=artefacts.get("save-lora-adapter", lambda d: make_adapter(base, d, config)),
        pickled=artefacts.get("save-lora-bin", lambda d: make_adapter(base, d, config, seed=2, safe_serialization=False)),
        other=artefacts.get("save-lora-wide", lambda d: make_adapter(wide, d, config)))


@pytest.mark.parametrize("out", ["adapter.gguf", "folder"])
@pytest.mark.parametrize("options, named", [
    (("--dtype", "bf16"), ["--dtype", "does not apply"]),
    (("--low-disk",), ["--low-disk", "does not apply"]),
    (("--max-shard-size", "1GB"), ["--max-shard-size", "does not apply"]),
    (("--gguf-type", "q4_k"), ["--gguf-type"]),
    ((), ["was the adapter trained on a different base model?"]),  # the adapter of a wider model
])
def test_settings_that_do_not_apply_and_a_mismatched_adapter_are_refused(tiny, tmp_path, capsys, out, options, named):
    adapter = tiny.other if not options else tiny.adapter
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "merge", tiny.base, adapter, tmp_path / "out" / out, "--save-method", "lora",
                           *options)
    assert_one_line_error(code, err, *named)
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("name", [pytest.param("adapter.gguf", marks=pytest.mark.slow), "folder"])
def test_a_disk_that_cannot_hold_the_adapter_is_refused_before_anything_is_written(tiny, tmp_path, capsys, monkeypatch,
                                                                                  request, name):
    """The adapter alone is bounded before it is written (the LoRA GGUF: its values at 4 bytes and a rescaled
    copy of them; the PEFT folder: the adapter's files): written with room to spare it fits in that bound, and
    on a disk with one byte less free than the bound and lorafuse's margin the command stops with one line,
    exit 2, before the script runs or anything appears beside OUT."""
    from lorafuse.plan import DISK_MARGIN
    from lorafuse.sinks import adapter_folder
    from lorafuse.sinks.gguf import lora as lora_gguf

    gguf = name.endswith(".gguf")
    plan = lorafuse.plan(tiny.base, tiny.adapter)
    bound = lora_gguf.size_bound(plan) if gguf else adapter_folder.size(plan.adapter)
    converter = ("--llama-cpp", request.getfixturevalue("llama_cpp_dir")) if gguf else ()
    fits = tmp_path / "fits" / name
    fits.parent.mkdir()
    code, _, err = run_cli(capsys, "merge", tiny.base, tiny.adapter, fits, "--save-method", "lora", *converter,
                           "--quiet")
    assert code == 0, err
    written = fits.stat().st_size if gguf else sum(p.stat().st_size for p in fits.iterdir())
    assert 0 < written <= bound

    (tmp_path / "out").mkdir()
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=bound + DISK_MARGIN - 1))
    code, _, err = run_cli(capsys, "merge", tiny.base, tiny.adapter, tmp_path / "out" / name, "--save-method", "lora",
                           *converter, "--quiet")
    assert_one_line_error(code, err, "the adapter needs up to", "free", str(tmp_path / "out"))
    assert os.listdir(tmp_path / "out") == [] and not leftovers(tmp_path / "out")


@pytest.mark.slow
def test_a_script_failure_is_one_line_naming_it(llama_cpp_dir, tmp_path, capsys):
    """A model llama.cpp does not know (OPT): the script's own error, the script and its version, one line."""
    from peft import LoraConfig
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    base = save_model(OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                               num_attention_heads=4, word_embed_proj_dim=32)), tmp_path / "opt")
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                  init_lora_weights=False))
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "merge", base, adapter, tmp_path / "out" / "adapter.gguf", "--save-method", "lora",
                           "--llama-cpp", llama_cpp_dir)
    assert_one_line_error(code, err, "convert_lora_to_gguf.py", "OPTForCausalLM is not supported", "PEFT folder")
    assert os.listdir(tmp_path / "out") == [] and not leftovers(tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------------
# 4. The PEFT folder


IDS = torch.tensor([[1, 5, 9, 17, 33, 65, 100, 127]])


@torch.no_grad()
def _peft_logits(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel

    return PeftModel.from_pretrained(load_model(base), adapter).eval()(input_ids=IDS).logits


@pytest.mark.parametrize("which", ["safetensors", "bin"])
def test_peft_folder_is_the_adapter_and_peft_loads_it(tiny, tmp_path, capsys, which):
    adapter = tiny.adapter if which == "safetensors" else tiny.pickled
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, "merge", tiny.base, adapter, out, "--save-method", "lora", "--quiet")
    assert code == 0, err
    assert sorted(os.listdir(tmp_path)) == ["out"] and not leftovers(tmp_path)  # atomic: no staging folder left
    assert sorted(os.listdir(out)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                       "lorafuse-manifest.json"]
    listed = json.loads((out / "lorafuse-manifest.json").read_text())["files"]  # never pushed: XXH3-128
    written = {name: (out / name).read_bytes() for name in os.listdir(out) if name != "lorafuse-manifest.json"}
    assert listed == {name: {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()} for name, data in written.items()}
    assert (out / "adapter_config.json").read_bytes() == (adapter / "adapter_config.json").read_bytes()
    if which == "safetensors":
        assert (out / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()
    want, got = read_adapter(adapter), read_adapter(out)
    assert sorted(got) == sorted(want) and all(same_bytes(got[k], want[k]) for k in want)
    got = _peft_logits(tiny.base, out)
    assert torch.equal(got, _peft_logits(tiny.base, adapter))
    with torch.no_grad():  # PEFT loaded the adapter's tensors, not its own fresh ones: they change the model
        assert (got - load_model(tiny.base)(input_ids=IDS).logits).abs().max() > 1e-3


def test_peft_folder_refuses_an_existing_out_and_replaces_it_with_force(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(capsys, "merge", tiny.base, tiny.adapter, out, "--save-method", "lora", "--quiet")[0] == 0
    before = tree_hash(out)
    code, _, err = run_cli(capsys, "merge", tiny.base, tiny.pickled, out, "--save-method", "lora", "--quiet")
    assert_one_line_error(code, err, str(out), "--force")
    assert tree_hash(out) == before
    code, _, err = run_cli(capsys, "merge", tiny.base, tiny.pickled, out, "--save-method", "lora", "--force", "--quiet")
    assert code == 0, err
    want, got, first = read_adapter(tiny.pickled), read_adapter(out), read_adapter(tiny.adapter)
    assert sorted(got) == sorted(want) and all(same_bytes(got[k], want[k]) for k in want)
    assert not all(same_bytes(got[k], first[k]) for k in first)  # the two adapters differ: OUT was replaced
    assert sorted(os.listdir(tmp_path)) == ["out"]
