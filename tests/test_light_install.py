"""The light install: `pip install lorafuse` with no extras brings what a plain merge needs, and no torch.

In a fresh virtual environment holding only that install, `lorafuse demo` and a plain LoRA merge run, and
the merge writes the same bytes as this environment's (torch installed; the PEFT oracle tests hold it to
PEFT). What needs torch (or the GGUF converter's packages) stops before anything is written, with one line
naming the `pip install` to run; here that is checked for every such feature with torch hidden from a
subprocess, and in the light environment for two, with torch truly absent.

The environment is cached beside the other test artefacts, keyed by pyproject.toml (which holds the
dependencies and the packaging), and runs the checkout's code (PYTHONPATH), so a source change needs no
reinstall while an import of a package the light install lacks still fails.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lorafuse
from conftest import leftovers
from realmodel import cache_root
from test_merge_vs_peft import VARIANTS, get_adapter

ROOT = Path(__file__).resolve().parent.parent
COMMAND = ("import sys; sys.argv[0] = 'lorafuse'; from lorafuse_command import main; sys.exit(main())")
TORCH = "pip install 'lorafuse[torch]'"


@pytest.fixture
def adapter_of(tiny_base, artefacts):
    """variant id -> the adapter test_merge_vs_peft saves for that variant (built once per session)."""
    return lambda variant_id: get_adapter(artefacts, tiny_base, next(v for v in VARIANTS if v.id == variant_id))


def light_environment() -> Path:
    """A virtual environment with `pip install <this checkout>` and nothing else, built once per
    pyproject.toml. Built under a lock, where it will stay (a venv cannot be moved), and marked complete
    last, so that a half-built one is built again."""
    from filelock import FileLock

    key = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]
    root = cache_root()
    venv = root / f"light-install-{key}"
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"light-install-{key}.lock")):
        if (venv / "complete").is_file():
            return venv
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, capture_output=True)
        source = venv / "source"  # the files a source distribution holds, so that the build leaves the checkout alone
        shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        for name in ("pyproject.toml", "README.md"):
            shutil.copy(ROOT / name, source / name)
        done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(source)],
                              capture_output=True, text=True)
        assert done.returncode == 0, f"the light install failed:\n{done.stderr[-3000:]}"
        (venv / "complete").write_text("")
    return venv


@pytest.fixture(scope="module")
def light():
    venv = light_environment()

    def run(*argv, cwd: Path | None = None) -> subprocess.CompletedProcess:
        """`lorafuse ARGV` in the light environment, on the checkout's code."""
        env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
        return subprocess.run([str(venv / "bin" / "python"), "-c", COMMAND, *map(str, argv)], capture_output=True,
                              text=True, env=env, cwd=cwd, timeout=300)

    run.venv = venv
    return run


def test_the_light_install_has_no_torch(light):
    script = "import importlib.util as u; print([m for m in ('torch', 'numpy') if u.find_spec(m)])"
    done = subprocess.run([str(light.venv / "bin" / "python"), "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "['numpy']"
    assert (light.venv / "bin" / "lorafuse").is_file()  # the command the install makes


def test_the_demo_runs_without_torch(light, tmp_path):
    done = light("demo", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("demo OK")


def test_a_plain_merge_without_torch_writes_the_same_bytes(light, tiny_base, adapter_of, tmp_path):
    base, adapter = tiny_base("llama", "bf16"), adapter_of("lora-llama")
    done = light("merge", base, adapter, tmp_path / "light", "--quiet")
    assert done.returncode == 0 and not done.stderr, done.stderr
    lorafuse.merge(base, adapter, tmp_path / "with-torch")
    files = sorted(p.name for p in (tmp_path / "with-torch").iterdir() if p.suffix in (".safetensors", ".json"))
    assert "model.safetensors" in files
    for name in files:
        if name != "lorafuse-manifest.json":  # it names the output folder
            assert (tmp_path / "light" / name).read_bytes() == (tmp_path / "with-torch" / name).read_bytes(), name


@pytest.mark.parametrize("adapter_id, out_name, message", [
    ("dora-llama", "out", f"DoRA needs PyTorch: {TORCH}"),
    ("lora-llama", "out.gguf", "a GGUF output (llama.cpp's converter) needs PyTorch: pip install 'lorafuse[gguf]'"),
], ids=["dora", "gguf"])
def test_what_needs_torch_says_what_to_install(light, adapter_id, out_name, message, tiny_base, adapter_of, tmp_path):
    out = tmp_path / out_name
    done = light("merge", tiny_base("llama", "bf16"), adapter_of(adapter_id), out)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"lorafuse: error: {message}\n")
    assert not out.exists() and not leftovers(tmp_path)


# --- every feature that needs torch, with torch hidden from the command (this environment has it) -------

def without_torch(*argv) -> subprocess.CompletedProcess:
    """`lorafuse ARGV` in a process where `import torch` fails and torch cannot be found, as in the light
    install."""
    code = "import sys; sys.modules['torch'] = None; " + COMMAND
    return subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, timeout=300)


def pickle_adapter(adapter: Path, folder: Path) -> Path:
    """The adapter saved as adapter_model.bin (a pickle checkpoint, as older PEFT saved them)."""
    from safetensors.torch import load_file

    folder.mkdir()
    shutil.copy(adapter / "adapter_config.json", folder)
    torch.save(load_file(adapter / "adapter_model.safetensors"), folder / "adapter_model.bin")
    return folder


def test_every_feature_that_needs_torch_says_what_to_install(tiny_base, adapter_of, artefacts, tmp_path):
    from test_quantized_bases import FP8, fp8_checkpoint

    base, lora, out = tiny_base("llama", "bf16"), adapter_of("lora-llama"), tmp_path / "out"
    fp8_base, fp8_adapter = fp8_checkpoint(artefacts, FP8[0])
    cases = {
        "DoRA": ("merge", base, adapter_of("dora-llama"), out),
        "a quantized base (fp8-block)": ("merge", fp8_base, fp8_adapter, out),
        "--save-method merged_4bit": ("merge", base, lora, out, "--save-method", "merged_4bit"),
        "--device cuda": ("merge", base, lora, out, "--device", "cuda"),
        f"reading {tmp_path / 'pickled' / 'adapter_model.bin'} (a pickle checkpoint; adapter_model.safetensors "
        "needs no torch)": ("merge", base, pickle_adapter(lora, tmp_path / "pickled"), out),
        "lorafuse verify": ("verify", base),
        "lorafuse inspect": ("inspect", base, lora),
    }
    for feature, argv in cases.items():
        done = without_torch(*argv)
        assert (done.returncode, done.stdout, done.stderr) == (2, "", f"lorafuse: error: {feature} needs PyTorch: {TORCH}\n")
        assert not out.exists() and not leftovers(tmp_path)
    done = without_torch("merge", base, lora, tmp_path / "out.gguf")
    assert done.stderr == "lorafuse: error: a GGUF output (llama.cpp's converter) needs PyTorch: pip install 'lorafuse[gguf]'\n"
    done = without_torch("merge", base, lora, out, "--quiet")  # and the plain merge goes on without it
    assert done.returncode == 0 and (out / "model.safetensors").is_file(), done.stderr
