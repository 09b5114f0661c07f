"""Where llama.cpp's converter comes from, and loading it.

llama.cpp's `convert_hf_to_gguf.py` (with its `conversion/` package and `gguf-py`) is the authority on
GGUF: architecture names, hyper-parameter keys, tokenizer metadata, per-architecture tensor transforms,
the quantizers. lorafuse drives it rather than rewriting it, and its `convert_lora_to_gguf.py` for LoRA GGUFs. It comes from a llama.cpp checkout named by
`--llama-cpp DIR` or LLAMA_CPP_DIR, or else from the llama-cpp-python source distribution on PyPI, pinned
to the version tested here, fetched once into lorafuse's cache: a fresh machine with PyPI needs nothing else.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from ...errors import LorafuseError

PINNED = "0.3.36"  # llama-cpp-python, whose vendor/llama.cpp holds the converter tested here
NEEDED = ("convert_hf_to_gguf.py", "conversion/__init__.py", "gguf-py/gguf/__init__.py")
LORA_SCRIPT = "convert_lora_to_gguf.py"  # the adapter converter, run as its own command (sinks.gguf.lora)
NEEDED_FOR_LORA = NEEDED + (LORA_SCRIPT,)
SOURCE = f"llama_cpp_python-{PINNED}/vendor/llama.cpp/"


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorafuse"


def find(llama_cpp: str | os.PathLike | None, needed: tuple[str, ...] = NEEDED) -> Path:
    """The llama.cpp folder to convert with: `llama_cpp`, LLAMA_CPP_DIR, or the pinned copy (fetched now
    if it is not cached yet, or if it lacks one of the `needed` files: a copy fetched by an older lorafuse
    may lack the adapter converter)."""
    named = llama_cpp or os.environ.get("LLAMA_CPP_DIR")
    if named:
        folder = Path(named).expanduser()
        missing = [n for n in needed if not (folder / n).is_file()]
        if missing:
            raise LorafuseError(f"{folder} is not a llama.cpp checkout ({', '.join(missing)} missing); pass the folder "
                                "that holds convert_hf_to_gguf.py, or leave --llama-cpp out to use the pinned copy")
        return folder
    folder = cache_root() / f"llama.cpp-{PINNED}"
    if not all((folder / n).is_file() for n in needed):
        _fetch(folder)
    return folder


def describe(folder: Path) -> str:
    """The converter's origin, for messages: the pinned copy's version, or the checkout's folder."""
    pinned = cache_root() / f"llama.cpp-{PINNED}"
    return f"from llama-cpp-python {PINNED}" if folder == pinned else f"from {folder}"


def _fetch(folder: Path) -> None:
    """pip download the pinned source distribution and keep only the converters' files, made whole under a
    temporary name and renamed into place (a second merge meanwhile finds it complete or not at all); a copy
    that only lacks the adapter script gets it added, and is not replaced under a merge that may be using it."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as work:
        done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary",
                               "llama-cpp-python", f"llama-cpp-python=={PINNED}", "-d", work],
                              capture_output=True, text=True)
        archive = Path(work) / f"llama_cpp_python-{PINNED}.tar.gz"
        if done.returncode or not archive.is_file():
            why = (done.stderr.strip().splitlines() or ["no archive"])[-1]
            raise LorafuseError(f"fetching llama.cpp's converter (llama-cpp-python {PINNED} from PyPI) failed ({why}); "
                                "pass --llama-cpp DIR with a llama.cpp checkout")
        staged = Path(work) / "llama.cpp"
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(SOURCE) and m.isfile()
                       and m.name[len(SOURCE):].split("/")[0] in ("convert_hf_to_gguf.py", LORA_SCRIPT, "conversion", "gguf-py")]
            for member in members:
                member.name = member.name[len(SOURCE):]
            tar.extractall(staged, members=members, filter="data")
        if all((folder / n).is_file() for n in NEEDED):  # an older lorafuse's copy, perhaps converting right now:
            for name in NEEDED_FOR_LORA:                  # only the script it lacks is added, each file renamed in
                if not (folder / name).is_file():
                    os.replace(staged / name, folder / name)
            return
        if folder.exists():  # incomplete: replaced whole
            shutil.rmtree(folder, ignore_errors=True)
        try:
            staged.rename(folder)
        except OSError:  # another merge fetched it meanwhile
            if not all((folder / n).is_file() for n in NEEDED_FOR_LORA):
                raise


@contextlib.contextmanager
def loaded(folder: Path):
    """The converter's `conversion` package and its own `gguf` (gguf-py), imported from `folder`:
    yields (conversion, gguf). Another `gguf` already imported in this process (transformers' GGUF support
    imports the PyPI one) is set aside meanwhile and put back after, so that each side keeps its own; the
    converter's modules leave with it."""
    gguf_py = folder / "gguf-py"
    ours = lambda module: Path(getattr(module, "__file__", None) or "/").resolve().is_relative_to(folder.resolve())  # noqa: E731
    names = ("gguf", "conversion")
    before = {k: m for k, m in sys.modules.items() if k.split(".")[0] in names}
    for k, module in before.items():
        if not ours(module):
            del sys.modules[k]
    for path in (str(folder), str(gguf_py)):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        try:
            import conversion
            import gguf
        except ImportError as e:
            raise LorafuseError(f"llama.cpp's converter in {folder} cannot be imported ({e}); install what it needs: "
                                "pip install 'lorafuse[gguf]'") from None
        yield conversion, gguf
    finally:
        for path in (str(folder), str(gguf_py)):
            if path in sys.path:
                sys.path.remove(path)
        for k in [k for k in sys.modules if k.split(".")[0] in names]:  # the process as it was before
            del sys.modules[k]
        sys.modules.update(before)
