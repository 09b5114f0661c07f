"""GGUF output (#22): an OUT ending in .gguf is one GGUF file written by llama.cpp's own converter in-process.

The oracle is llama.cpp itself: the GGUF lorafuse writes in one pass (route A) must equal, tensor for tensor
and byte for byte, what the real `convert_hf_to_gguf.py` makes of lorafuse's safetensors merge when run as its
own command (route B), read back by the converter's own `gguf.GGUFReader`; and the file must load in the
real readers (transformers' GGUF loader, llama-cpp-python where it is installed).

The converter is the one lorafuse pins: llama-cpp-python 0.3.36's source distribution, whose vendor/llama.cpp
holds it, fetched once into the test cache. Every GGUF is read in a subprocess with the converter's own gguf-py
(not the installed `gguf`), the real model is built in one, and the test that loads a GGUF in transformers
(which imports the installed `gguf`) comes last. The helpers are in gguf_support.
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lorafuse
from conftest import cached_smollm2_adapter, make_adapter
from gguf_support import (CONVERTER_FILES, TYPES, Lazy, assert_one_line_error, assert_same_gguf, fetch_llama_cpp,
                          llama_cpp_python, model_files_written, read_ggufs, route_a, run_cli, sha256,
                          smollm2_in_a_subprocess, start_convert)
from lorafuse.cli import main
from realmodel import chat_ids

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llama_cpp_dir() -> Path:
    return fetch_llama_cpp()


@pytest.fixture(scope="module")
def real(tmp_path_factory, llama_cpp_dir):
    """SmolLM2-135M-Instruct (bf16, tied embeddings), its trained LoRA on every linear layer, lorafuse's
    safetensors merge of the two (route B's first step, once), and both routes per GGUF type, built on demand."""
    base = smollm2_in_a_subprocess()
    adapter = cached_smollm2_adapter(base, seed=0)
    work = tmp_path_factory.mktemp("gguf")
    merged = work / "merged"
    lorafuse.merge(base, adapter, merged)

    def both(t):
        finish = start_convert(llama_cpp_dir, merged, work / f"b-{t}.gguf", t)
        try:
            a = route_a(lambda: lorafuse.merge(base, adapter, work / f"A-{t}" / "a.gguf", gguf_type=t,
                                               llama_cpp=llama_cpp_dir), work / f"A-{t}" / "a.gguf")
        except BaseException:
            finish.stop()
            raise
        return a, finish()
    routes = Lazy(both)
    return SimpleNamespace(base=base, adapter=adapter, work=work, merged=merged, routes=routes,
                           a=Lazy(lambda t: routes[t][0]), b=Lazy(lambda t: routes[t][1]))


# ----------------------------------------------------------------------------------------------------------------
# 1. Route A equals route B


@pytest.mark.parametrize("gguf_type", TYPES)
def test_gguf_equals_the_converter_run_on_the_safetensors_merge(real, llama_cpp_dir, gguf_type):
    a, b = read_ggufs(llama_cpp_dir, real.a[gguf_type].path, real.b[gguf_type])
    assert_same_gguf(a, b)
    # The type asked for is the type written (a lorafuse that ignored gguf_type would differ from B above too,
    # but this says so plainly): the weight matrices are stored in it.
    assert gguf_type.upper() in {t["type_name"] for t in a["tensors"]}


# ----------------------------------------------------------------------------------------------------------------
# 2. An adapter on the tied embedding gives the GGUF its own output head


@pytest.fixture(scope="module")
def untied(real, llama_cpp_dir, tmp_path_factory):
    """A LoRA on embed_tokens (random A and B) and q_proj; route B as above, route A through the command with
    the converter named by LLAMA_CPP_DIR."""
    from peft import LoraConfig

    work = tmp_path_factory.mktemp("gguf-untied")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    adapter = make_adapter(real.base, work / "adapter", config, seed=3, save_embedding_layers=False)
    lorafuse.merge(real.base, adapter, work / "merged")
    finish = start_convert(llama_cpp_dir, work / "merged", work / "b.gguf", "q8_0")
    out = work / "A" / "a.gguf"

    def merge():
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("LLAMA_CPP_DIR", str(llama_cpp_dir))
            try:
                return main(["merge", str(real.base), str(adapter), str(out), "--gguf-type", "q8_0", "--quiet"])
            except SystemExit as e:
                return e.code
    try:
        a = route_a(merge, out)
    except BaseException:
        finish.stop()
        raise
    b = finish()
    assert a.result == 0, "lorafuse merge ... a.gguf --gguf-type q8_0 (LLAMA_CPP_DIR set) failed"
    return SimpleNamespace(a=a.path, b=b, merged=work / "merged")


def test_embedding_adapter_unties_the_head_in_the_gguf(real, untied, llama_cpp_dir):
    a, b, tied = read_ggufs(llama_cpp_dir, untied.a, untied.b, real.a["q8_0"].path)
    assert_same_gguf(a, b)
    by_name = {t["name"]: t for t in a["tensors"]}
    assert "output.weight" in by_name, "the head the adapter untied is missing: its delta would be lost"
    assert by_name["output.weight"]["digest"] != by_name["token_embd.weight"]["digest"]
    # Without the embedding adapter the model stays tied: llama.cpp then has no output.weight at all.
    assert "output.weight" not in {t["name"] for t in tied["tensors"]}


# ----------------------------------------------------------------------------------------------------------------
# 3. The file appears whole, and no merged model is written on the way


def test_gguf_appears_whole_and_no_other_model_file_is_written(real):
    a = real.a["q8_0"]
    assert a.listing == ["a.gguf"], f"beside OUT after the merge: {a.listing}"
    assert sorted(os.listdir(a.path.parent)) == ["a.gguf"]
    assert a.written, "the watch saw no write at all: it is broken"  # the GGUF itself, at least, is written
    assert not model_files_written(a), f"model files written during a GGUF merge: {model_files_written(a)}"


def test_gguf_metadata_does_not_name_the_staging_file(real, llama_cpp_dir):
    """The staging name is lorafuse's business: llama.cpp, Ollama and LM Studio show general.name (and its
    siblings) as the model's name, so no metadata value may carry it. Route B's file, converted from a
    folder the user named, shows what they carry instead."""
    a = real.a["q8_0"].path
    (meta,) = read_ggufs(llama_cpp_dir, a)
    strings = {k: v["preview"] for k, v in meta["fields"].items() if v["preview"].startswith(("'", "["))}
    leaked = {k: v for k, v in strings.items() if "lorafuse-" in v.lower() or "lorafuse partial" in v.lower()
              or f".{a.name}".lower() in v.lower()}
    assert not leaked, f"metadata names the staging file: {leaked}"


def test_second_merge_to_an_existing_gguf_fails_and_leaves_it(real, llama_cpp_dir, capsys):
    out = real.a["q8_0"].path
    before = (sha256(out), os.stat(out).st_mtime_ns, os.stat(out).st_ino)
    code, _, err = run_cli(capsys, "merge", real.base, real.adapter, out, "--gguf-type", "q8_0",
                           "--llama-cpp", llama_cpp_dir, "--quiet")
    assert_one_line_error(code, err, out.name)
    assert (sha256(out), os.stat(out).st_mtime_ns, os.stat(out).st_ino) == before
    assert sorted(os.listdir(out.parent)) == ["a.gguf"]


# ----------------------------------------------------------------------------------------------------------------
# 4. Bad inputs: one line, exit code 2, nothing written


def _partial_checkout(llama_cpp: Path, folder: Path) -> Path:
    folder.mkdir()
    shutil.copy(llama_cpp / "convert_hf_to_gguf.py", folder)
    shutil.copytree(llama_cpp / "conversion", folder / "conversion")
    return folder


@pytest.mark.parametrize("how", ["flag", "env"])
@pytest.mark.parametrize("checkout", ["empty", "no-gguf-py"])
def test_llama_cpp_folder_without_the_converter(real, llama_cpp_dir, tmp_path, capsys, monkeypatch, how, checkout):
    if checkout == "empty":
        bad, missing = tmp_path / "llama.cpp", CONVERTER_FILES
        bad.mkdir()
    else:
        bad, missing = _partial_checkout(llama_cpp_dir, tmp_path / "llama.cpp"), ("gguf-py",)
    before = sorted(os.listdir(bad))
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "a.gguf"
    argv = ["merge", real.base, real.adapter, out, "--gguf-type", "q8_0", "--quiet"]
    if how == "flag":
        argv += ["--llama-cpp", bad]
    else:
        monkeypatch.setenv("LLAMA_CPP_DIR", str(bad))
    code, _, err = run_cli(capsys, *argv)
    line = assert_one_line_error(code, err)
    assert any(m in line for m in missing), f"none of {missing} named in: {line}"
    assert os.listdir(tmp_path / "out") == [] and sorted(os.listdir(bad)) == before


def test_unknown_gguf_type(real, llama_cpp_dir, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "merge", real.base, real.adapter, tmp_path / "out" / "a.gguf",
                           "--gguf-type", "q3_nonsense", "--llama-cpp", llama_cpp_dir, "--quiet")
    assert_one_line_error(code, err, "q3_nonsense", "auto", "f32", "f16", "bf16", "q8_0")
    assert os.listdir(tmp_path / "out") == []


def test_a_disk_that_cannot_hold_the_gguf_is_refused_before_anything_is_written(real, llama_cpp_dir, tmp_path, capsys,
                                                                                   monkeypatch):
    """The GGUF's size is bounded from the plan (tensors at their GGUF type, the vocabulary): with less room
    than that the merge stops with one line before the converter runs, and nothing appears; the bound is
    an upper bound of the GGUF the merge writes."""
    from lorafuse.plan import DISK_MARGIN
    from lorafuse.sinks.gguf import size_bound

    plan = lorafuse.plan(real.base, real.adapter)
    bound = size_bound(plan, "q8_0")
    assert real.a["q8_0"].path.stat().st_size <= bound < plan.output_bytes
    (tmp_path / "out").mkdir()
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=bound + DISK_MARGIN - 1))
    code, _, err = run_cli(capsys, "merge", real.base, real.adapter, tmp_path / "out" / "a.gguf",
                           "--gguf-type", "q8_0", "--llama-cpp", llama_cpp_dir, "--quiet")
    assert_one_line_error(code, err, "GGUF needs", "free")
    assert os.listdir(tmp_path / "out") == []


def test_force_does_not_replace_a_file_that_is_not_gguf(real, llama_cpp_dir, tmp_path, capsys):
    """--force replaces only a GGUF file: a file of the user's that merely has the name is kept."""
    out = tmp_path / "notes.gguf"
    out.write_bytes(b"not a GGUF file, the user's own\n")
    code, _, err = run_cli(capsys, "merge", real.base, real.adapter, out, "--gguf-type", "q8_0",
                           "--llama-cpp", llama_cpp_dir, "--force", "--quiet")
    assert_one_line_error(code, err, out.name)
    assert out.read_bytes() == b"not a GGUF file, the user's own\n" and os.listdir(tmp_path) == ["notes.gguf"]


# ----------------------------------------------------------------------------------------------------------------
# 5. Real readers load it and run it like the safetensors merge. Last: transformers' GGUF loader imports gguf.


def _load_fp32(folder, **kwargs):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs).eval()


@torch.no_grad()
def _greedy(next_logits, prompt: list[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):  # no stop at EOS: both sides continue the same number of tokens
        ids.append(int(next_logits(ids).argmax()))
    return ids[len(prompt):]


def test_llama_cpp_generates_as_transformers_does_on_the_merge(real):
    """llama.cpp itself (llama-cpp-python, built from its source distribution) runs the bf16 GGUF and
    continues a chat prompt greedily as transformers does on the safetensors merge."""
    if importlib.util.find_spec("llama_cpp") is None:
        sys.path.insert(0, str(llama_cpp_python()))
    import llama_cpp
    import numpy as np
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real.merged)
    prompt = chat_ids(tok, "What is the capital of France?")["input_ids"][0].tolist()
    model = _load_fp32(real.merged)
    want = _greedy(lambda ids: model(input_ids=torch.tensor([ids])).logits[0, -1], prompt, 16)

    llm = llama_cpp.Llama(model_path=str(real.a["bf16"].path), n_ctx=256, verbose=False, logits_all=True,
                          seed=0, n_threads=2)
    llm.reset()
    llm.eval(prompt)
    got = []
    for _ in range(16):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        got.append(token)
        llm.eval([token])
    assert got == want, f"llama.cpp: {tok.decode(got)!r}\ntransformers: {tok.decode(want)!r}"


def test_transformers_loads_the_gguf_like_the_safetensors_merge(real):
    from transformers import AutoTokenizer

    a = real.a["bf16"].path
    tok = AutoTokenizer.from_pretrained(real.merged)
    ids = chat_ids(tok, "How many legs does a spider have?")["input_ids"]
    with torch.no_grad():
        want = _load_fp32(real.merged)(input_ids=ids).logits.double()
        base = _load_fp32(real.base)(input_ids=ids).logits.double()
        got = _load_fp32(a.parent, gguf_file=a.name)(input_ids=ids).logits.double()
    gap, effect = (got - want).abs().max().item(), (base - want).abs().max().item()
    # The GGUF holds the merge's bf16 values, so the logits agree to a small fraction of one bf16 step at their
    # size (~0.125); the adapter moves them by far more, so a GGUF of the base alone would fail.
    assert effect > 1.0, effect
    assert gap < 0.05, f"GGUF vs safetensors merge: max |logit gap| {gap} (the adapter's effect: {effect})"


def test_a_gguf_package_imported_before_is_left_as_it_was(real, llama_cpp_dir, tmp_path):
    """A process that imported the PyPI `gguf` first (transformers' GGUF support does) converts with the
    converter's own gguf-py and keeps its own `gguf` afterwards; the file is the same as without it."""
    out = tmp_path / real.a["q8_0"].path.name  # the same name: the GGUF names the model after it
    script = ("import sys, gguf as before, lorafuse\n"
              "lorafuse.merge(sys.argv[1], sys.argv[2], sys.argv[3], gguf_type='q8_0', llama_cpp=sys.argv[4])\n"
              "import gguf as after\n"
              "print(after is before, before.__file__)\n")
    done = subprocess.run([sys.executable, "-c", script, str(real.base), str(real.adapter), str(out), str(llama_cpp_dir)],
                          capture_output=True, text=True, check=True)
    same, path = done.stdout.split()[-2:]
    assert same == "True" and not Path(path).resolve().is_relative_to(llama_cpp_dir.resolve()), done.stdout
    assert sha256(out) == sha256(real.a["q8_0"].path)
