"""GGUF types made by llama.cpp's quantizer (#22): with --gguf-type q4_k_m (or another type of llama-quantize)
llama.cpp's converter writes the merge exactly into the staging folder, llama.cpp's own quantizer makes the
final file from it in a process of its own, and the intermediate is deleted.

The oracle is llama.cpp: the file equals, byte for byte, what llama.cpp's quantizer (llama-cpp-python's
llama_model_quantize, run as a user runs it) makes of the converter's own GGUF of lorafuse's safetensors merge
(the two-step route); llama-cpp-python loads it, and its logits stay within the error q4_k_m gives the base
model itself. The helpers are in gguf_support; every GGUF is read in a subprocess.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import lorafuse
from conftest import cached_smollm2_adapter
from gguf_support import (Lazy, assert_one_line_error, assert_same_gguf, fetch_llama_cpp, llama_cpp_python, read_ggufs,
                          route_a, run_cli, smollm2_in_a_subprocess, start_convert)
from lorafuse.errors import LorafuseError
from lorafuse.plan import DISK_MARGIN, work_path
from lorafuse.sinks.gguf import intermediate_type, size_bound
from lorafuse.sinks.gguf import quantize
from realmodel import chat_ids

pytestmark = pytest.mark.slow

# llama-cpp-python's own example of quantizing (examples/low_level_api/quantize.py), as a user runs it.
QUANTIZE = """
import sys
import llama_cpp
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3].upper())
sys.exit(llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), params))
"""


def quantize_as_a_user(llama_cpp_python_dir: Path, source: Path, target: Path, gguf_type: str) -> Path:
    env = {**os.environ, "PYTHONPATH": str(llama_cpp_python_dir)}
    done = subprocess.run([sys.executable, "-c", QUANTIZE, str(source), str(target), gguf_type], env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0 and target.is_file(), done.stderr[-3000:]
    return target


@pytest.fixture(scope="module")
def llama_cpp_dir() -> Path:
    return fetch_llama_cpp()


@pytest.fixture(scope="module")
def llama_cpp_python_dir():
    """llama-cpp-python (built once into the test cache), importable in this process while the module runs:
    lorafuse finds its quantizer there, as where a user pip-installed it."""
    folder = llama_cpp_python()
    sys.path.insert(0, str(folder))
    yield folder
    sys.path.remove(str(folder))
    sys.modules.pop("llama_cpp", None)


@pytest.fixture(scope="module")
def real(tmp_path_factory, llama_cpp_dir, llama_cpp_python_dir):
    """SmolLM2-135M-Instruct (bf16, tied embeddings, width 576: llama.cpp's k-quants fall back for most of its
    matrices), its trained LoRA, lorafuse's safetensors merge and the converter's GGUF of it at its default
    type (the two-step route's first step); per type, lorafuse's GGUF (watched) and the two-step route's, built
    on demand."""
    base = smollm2_in_a_subprocess()
    adapter = cached_smollm2_adapter(base, seed=0)
    work = tmp_path_factory.mktemp("gguf-quantize")
    lorafuse.merge(base, adapter, work / "merged")
    converted = start_convert(llama_cpp_dir, work / "merged", work / "merged-auto.gguf", "auto")()

    def ours(t):
        out = work / f"A-{t}" / "a.gguf"
        return route_a(lambda: lorafuse.merge(base, adapter, out, gguf_type=t, llama_cpp=llama_cpp_dir), out)
    return SimpleNamespace(base=base, adapter=adapter, work=work, converted=converted, a=Lazy(ours),
                           b=Lazy(lambda t: quantize_as_a_user(llama_cpp_python_dir, converted, work / f"b-{t}.gguf", t)))


# ----------------------------------------------------------------------------------------------------------------
# 1. The file equals the two-step route's


@pytest.mark.parametrize("gguf_type", ["q4_k_m", "q5_0"])
def test_quantized_gguf_equals_llama_cpps_quantizer_on_the_converters_gguf(real, llama_cpp_dir, gguf_type):
    a, b = read_ggufs(llama_cpp_dir, real.a[gguf_type].path, real.b[gguf_type])
    assert_same_gguf(a, b)
    types = {t["type_name"] for t in a["tensors"]}
    # The type asked for is the type written: k-quant blocks (or, for q5_0, its own) hold the weights.
    assert (types >= {"Q4_K", "Q6_K"}) if gguf_type == "q4_k_m" else ("Q5_0" in types), types


def test_intermediate_is_what_the_converter_writes_by_default(real, llama_cpp_dir):
    """The merge is bf16: the converter's default (`--outtype auto`) writes it at bf16 (vectors at f32), and so
    does lorafuse for the quantizer."""
    (meta,) = read_ggufs(llama_cpp_dir, real.converted)
    assert {t["type_name"] for t in meta["tensors"]} == {"BF16", "F32"}
    assert intermediate_type(lorafuse.plan(real.base, real.adapter)) == "bf16"


# ----------------------------------------------------------------------------------------------------------------
# 2. llama.cpp runs it, within the type's own error


def _logits(llama_cpp, path: Path, prompt: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, logits_all=True, seed=0, n_threads=2)
    llm.eval(prompt)
    return np.array(llm.scores[:len(prompt)], dtype=np.float64)


def _greedy(llama_cpp, path: Path, prompt: list[int], n: int) -> list[int]:
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, verbose=False, logits_all=True, seed=0, n_threads=2)
    llm.eval(prompt)
    got = []
    for _ in range(n):  # no stop at EOS: a fixed number of tokens
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([got[-1]])
    return got


@pytest.mark.parametrize("gguf_type", ["q8_0", "q4_k_m"])
def test_llama_cpp_runs_the_quantized_gguf_within_the_types_own_error(real, llama_cpp_dir, llama_cpp_python_dir,
                                                                       gguf_type):
    """q8_0 (written by the converter in the stream) and q4_k_m (by the quantizer) move the merge's logits
    (against its bf16 GGUF) about as much as they move the base model's (against the base's bf16 GGUF, both
    from the two-step route): the measure of the type's own error. The adapter moves the logits by far more,
    so a quantized GGUF of the base alone, or of a wrong merge, would fail."""
    import llama_cpp
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real.work / "merged")
    prompt = chat_ids(tok, "What is the capital of France?")["input_ids"][0].tolist()
    base_bf16 = real.work / "base-bf16.gguf"
    if not base_bf16.is_file():
        start_convert(llama_cpp_dir, real.base, base_bf16, "bf16")()
    base_q = real.work / f"base-{gguf_type}.gguf"
    if gguf_type == "q8_0":
        start_convert(llama_cpp_dir, real.base, base_q, gguf_type)()
    else:
        quantize_as_a_user(llama_cpp_python_dir, base_bf16, base_q, gguf_type)
    merge_bf16, merge_q = real.a["bf16"].path, real.a[gguf_type].path
    logits = {p: _logits(llama_cpp, p, prompt) for p in (base_bf16, base_q, merge_bf16, merge_q)}
    rms = lambda x, y: float(np.sqrt(np.mean((logits[x] - logits[y]) ** 2)))  # noqa: E731
    ours, own, adapter = rms(merge_q, merge_bf16), rms(base_q, base_bf16), rms(merge_bf16, base_bf16)
    # Measured for q4_k_m: 1.57 for the merge, 1.31 for the base, 5.66 for the adapter. The merge is the same
    # network with other weights, quantized the same way: its error may differ somewhat, not by half again.
    tolerance = 1.5 * own
    assert ours < tolerance, f"{gguf_type} moves the merge's logits by {ours} (RMS), the base's by {own}"
    assert adapter > 2 * tolerance, f"the adapter's effect {adapter} is not far above the tolerance {tolerance}"

    # Greedy decoding is sane: every token the quantized GGUF picks is among the bf16 GGUF's five likeliest there.
    tokens = _greedy(llama_cpp, merge_q, prompt, 24)
    reference = _logits(llama_cpp, merge_bf16, prompt + tokens)[len(prompt) - 1:-1]
    ranks = [int((row > row[t]).sum()) for row, t in zip(reference, tokens)]
    assert max(ranks) < 5, f"{gguf_type}'s greedy text {tok.decode(tokens)!r}: ranks under the bf16 GGUF {ranks}"


# ----------------------------------------------------------------------------------------------------------------
# 3. Only OUT appears; no intermediate is left; the disk check counts it


def test_only_out_appears_and_the_intermediate_is_gone(real):
    a = real.a["q4_k_m"]
    staging = work_path(a.path, "partial")
    assert a.listing == ["a.gguf"], f"beside OUT after the merge: {a.listing}"
    assert not staging.exists() and a.tmp_files == [], a.tmp_files
    # The intermediate was written, in the staging folder, and nowhere else: every path written is in there
    # (besides OUT, the lock beside it, gone too, and /dev/null, the quantizer's input).
    assert [p for p in a.written if p.endswith(".gguf")], "the watch saw no GGUF written: it is broken"
    stray = [p for p in a.written if not Path(p).is_relative_to(staging)
             and Path(p) not in (a.path, work_path(a.path, "lock"), Path(os.devnull))]
    assert not stray, f"written outside the staging folder: {stray}"


def test_disk_check_counts_the_intermediate_and_refuses_before_anything_is_written(real, llama_cpp_dir, tmp_path,
                                                                                     capsys, monkeypatch):
    plan = lorafuse.plan(real.base, real.adapter)
    peak = size_bound(plan, "q4_k_m")
    intermediate = size_bound(plan, "bf16")
    # The bound holds both files, each within its share: the converter's GGUF, and the quantized one.
    both = real.converted.stat().st_size + real.a["q4_k_m"].path.stat().st_size
    assert real.converted.stat().st_size <= intermediate
    assert real.a["q4_k_m"].path.stat().st_size <= peak - intermediate < intermediate
    # Room for the quantized file and much more, but not for the intermediate beside it: refused, nothing written.
    (tmp_path / "out").mkdir()
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=both + DISK_MARGIN - 1))
    code, _, err = run_cli(capsys, "merge", real.base, real.adapter, tmp_path / "out" / "a.gguf",
                           "--gguf-type", "q4_k_m", "--llama-cpp", llama_cpp_dir, "--quiet")
    assert_one_line_error(code, err, "GGUF needs", "free")
    assert os.listdir(tmp_path / "out") == []


# llama.cpp's quantizer in its dry run (it chooses every tensor's type and adds up their sizes, writing nothing),
# once per type named: its log on stderr, each type's ended by a line of ours.
DRY_RUN = """
import sys
import llama_cpp
for gguf_type in sys.argv[2:]:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + gguf_type.upper())
    params.dry_run = True
    assert llama_cpp.llama_model_quantize(sys.argv[1].encode(), b"", params) == 0, gguf_type
    print("-- end of", gguf_type, file=sys.stderr, flush=True)
"""


def test_every_type_fits_its_bound_and_needs_no_importance_matrix(real, llama_cpp_python_dir):
    """For each type lorafuse offers, llama.cpp's quantizer (its dry run, which does the real run's accounting)
    finds the tensors' size within the bound the disk check uses (SmolLM2's width takes most matrices through
    llama.cpp's fallbacks), and needs no importance matrix; for the types lorafuse refuses for want of one, it
    says that it would need one."""
    types = quantize.TYPES + quantize.NEEDS_IMATRIX
    done = subprocess.run([sys.executable, "-c", DRY_RUN, str(real.converted), *types], capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(llama_cpp_python_dir)})
    assert done.returncode == 0, done.stderr[-3000:]
    logs = dict(zip(types, done.stderr.split("-- end of ")))
    plan = lorafuse.plan(real.base, real.adapter)
    for gguf_type in quantize.TYPES:
        (mib,) = re.findall(r"quant size\s*=\s*([0-9.]+) MiB", logs[gguf_type])
        assert float(mib) <= quantize.tensors_bound(plan, gguf_type) / 2**20 + 0.005, gguf_type  # logged to 0.01 MiB
    needs = {t for t in types if "will require an imatrix" in logs[t]}
    # iq3_xxs and iq3_xs give an importance-matrix type only to matrices whose width is a multiple of 256: none
    # here (576), so llama.cpp needs none for this model; it does for any with such widths (most).
    assert needs == set(quantize.NEEDS_IMATRIX) - {"iq3_xxs", "iq3_xs"}


def test_a_failing_quantizer_is_one_line(real, tmp_path):
    """llama.cpp's own refusal (q2_k_s without an importance matrix) is told in one line, with its reason."""
    quantizer = quantize.find("q4_k_m", None)  # as found for a merge: llama-cpp-python, importable here
    assert quantizer.name.startswith("llama-cpp-python"), quantizer.name
    with pytest.raises(LorafuseError, match="requires an imatrix") as refused:
        quantizer.run(real.converted, tmp_path / "q2_k_s.gguf", "q2_k_s")
    assert "\n" not in str(refused.value)


def test_block_sizes_are_ggmls(llama_cpp_dir):
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); from gguf import GGML_QUANT_SIZES as s;"
            "print(json.dumps({t.name.lower(): s[t] for t in s}))")
    done = subprocess.run([sys.executable, "-c", code, str(llama_cpp_dir / "gguf-py")], capture_output=True, text=True,
                          check=True)
    import json

    sizes = json.loads(done.stdout)
    assert {t: list(b) for t, b in quantize.BLOCKS.items()} == {t: sizes[t] for t in quantize.BLOCKS}


# ----------------------------------------------------------------------------------------------------------------
# 4. Bad inputs and a failing quantizer: one line, exit code 2, nothing written


def _hide_quantizers(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if not (Path(p) / "llama_cpp").is_dir()])
    monkeypatch.delitem(sys.modules, "llama_cpp", raising=False)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.delenv("LLAMA_CPP_DIR", raising=False)


def test_no_quantizer_is_one_line_before_anything_is_written(real, llama_cpp_dir, tmp_path, capsys, monkeypatch):
    _hide_quantizers(monkeypatch, tmp_path)
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "merge", real.base, real.adapter, tmp_path / "out" / "a.gguf",
                           "--gguf-type", "q4_k_m", "--llama-cpp", llama_cpp_dir, "--quiet")
    assert_one_line_error(code, err, "q4_k_m", "pip install llama-cpp-python", "--llama-cpp")
    assert os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("gguf_type", ["iq2_xs", "q2_k_s"])
def test_a_type_that_needs_an_importance_matrix_is_one_line(real, llama_cpp_dir, tmp_path, capsys, gguf_type):
    (tmp_path / "out").mkdir()
    code, _, err = run_cli(capsys, "merge", real.base, real.adapter, tmp_path / "out" / "a.gguf",
                           "--gguf-type", gguf_type, "--llama-cpp", llama_cpp_dir, "--quiet")
    assert_one_line_error(code, err, gguf_type, "importance matrix")
    assert os.listdir(tmp_path / "out") == []


def test_a_quantizer_that_aborts_is_one_line_and_leaves_nothing(real, llama_cpp_dir, tmp_path, capsys):
    """llama-quantize in the checkout's build/bin is the one used (before llama-cpp-python, importable here), and
    one that aborts (as a GGML_ASSERT does) ends the merge with one line: OUT is not made, the staging folder
    and the intermediate are gone."""
    checkout = tmp_path / "llama.cpp"
    shutil.copytree(llama_cpp_dir, checkout)
    shim = checkout / "build" / "bin" / "llama-quantize"
    shim.parent.mkdir(parents=True)
    shim.write_text('#!/bin/sh\necho "GGML_ASSERT(a shim for the test) failed" >&2\nkill -ABRT $$\n')
    shim.chmod(0o755)
    (tmp_path / "out").mkdir()
    out = tmp_path / "out" / "a.gguf"
    code, _, err = run_cli(capsys, "merge", real.base, real.adapter, out, "--gguf-type", "q4_k_m",
                           "--llama-cpp", checkout, "--quiet")
    assert_one_line_error(code, err, str(shim), "GGML_ASSERT(a shim for the test) failed")
    assert os.listdir(tmp_path / "out") == []
