"""llama.cpp's quantizer, for the GGUF types llama.cpp's converter does not write itself: the k-quants
(q4_k_m, ...), the legacy quants (q4_0, ...) and the i-quants that need no importance matrix.

The converter first writes the merge into the staging folder at a type that holds it exactly (the
intermediate); llama.cpp's own quantizer then makes the final file from it, as `llama-quantize` does in the
two-step route, and the intermediate is deleted. Choosing each tensor's type (the k-quant mixtures, the
fallbacks for widths a block does not divide) is llama.cpp's business, so lorafuse runs its quantizer
rather than rewriting it: `llama-quantize` from the llama.cpp checkout's build or from PATH, else
llama-cpp-python's `llama_model_quantize`. Either runs in a process of its own, so that an abort inside
llama.cpp (a GGML_ASSERT) or a Ctrl-C ends the quantizer, not lorafuse, and its failure is one line.
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ...errors import LorafuseError
from ...plan import EMBEDDING_SUFFIXES, HEAD, Plan

# llama-quantize's types (tools/quantize/quantize.cpp) that are usable without an importance matrix.
TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s",
         "q5_k_m", "q6_k", "iq3_s", "iq3_m", "iq4_nl", "iq4_xs", "mxfp4_moe")
# Those llama.cpp refuses without one (--imatrix, from a calibration run), which lorafuse does not make.
NEEDS_IMATRIX = ("iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "q2_k_s")

EXECUTABLE = "llama-quantize"

# Tensor types: (values per block, bytes per block), as ggml stores them (gguf-py's GGML_QUANT_SIZES).
BLOCKS = {"q4_0": (32, 18), "q4_1": (32, 20), "q5_0": (32, 22), "q5_1": (32, 24), "q8_0": (32, 34),
          "iq4_nl": (32, 18), "mxfp4": (32, 17), "q2_k": (256, 84), "q3_k": (256, 110), "q4_k": (256, 144),
          "q5_k": (256, 176), "q6_k": (256, 210), "iq3_s": (256, 110), "iq4_xs": (256, 136)}
# What llama.cpp writes instead when a tensor's width is not a multiple of the type's block (and f16 when
# that block does not fit either): src/llama-quant.cpp, tensor_type_fallback.
FALLBACK = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0", "iq3_s": "iq4_nl",
            "iq4_xs": "iq4_nl"}
# The tensor types each file type's mixture gives a weight matrix other than the vocabulary's (src/llama-quant.cpp,
# llama_tensor_get_type_impl): its main type and the upgrades (attn_v, ffn_down, attn_output, a 70B model's
# attn_v). The embedding and the head may get q6_k or q8_0 besides, and a model with eight experts q8_0.
MIXTURES = {"q4_0": ("q4_0",), "q4_1": ("q4_1",), "q5_0": ("q5_0",), "q5_1": ("q5_1",),
            "q2_k": ("q2_k", "q3_k", "q4_k", "q5_k"), "q3_k_s": ("q3_k", "q5_k"), "q3_k_m": ("q3_k", "q4_k", "q5_k"),
            "q3_k_l": ("q3_k", "q4_k", "q5_k"), "q4_k_s": ("q4_k", "q5_k"), "q4_k_m": ("q4_k", "q5_k", "q6_k"),
            "q5_k_s": ("q5_k",), "q5_k_m": ("q5_k", "q6_k"), "q6_k": ("q6_k",), "iq3_s": ("iq3_s", "q4_k", "q5_k"),
            "iq3_m": ("iq3_s", "q4_k", "q5_k"), "iq4_nl": ("iq4_nl", "q5_k"), "iq4_xs": ("iq4_xs", "q5_k"),
            "mxfp4_moe": ("mxfp4", "q8_0")}
NESTED_CONFIGS = ("text_config", "llm_config", "language_config")
# Names of the embeddings of positions and token types (GPT-2, BERT, OPT, ...), which llama.cpp keeps in f32.
KEPT_MATRICES = ("position", "wpe.", "token_type")


def tensors_bound(plan: Plan, gguf_type: str) -> int:
    """An upper bound of the tensor bytes of the file llama.cpp's quantizer makes, from the plan alone: each
    matrix at the largest type its mixture may give it (after the fallback its width calls for), the
    embedding and the head at q8_0 at most; vectors, matrices no block fits, and the matrices the converter
    keeps in f32 and llama.cpp leaves alone (the experts' router, position and token-type embeddings) at f32."""
    config = _config_numbers(plan.config)
    experts = {config.get(k) for k in ("num_local_experts", "num_experts", "n_routed_experts")} - {None}
    total = 0
    for tensor in plan.tensors:
        shape, name = tensor.shape, tensor.name
        vocabulary = name == HEAD or name.endswith(EMBEDDING_SUFFIXES) or shape[:1] == (config.get("vocab_size"),)
        types = MIXTURES[gguf_type] + (("q8_0",) if vocabulary or 8 in experts else ())
        sizes = [_stored_size(shape, t) for t in types]
        kept = len(shape) == 2 and (shape[0] in experts or any(m in name for m in KEPT_MATRICES))
        total += 4 * math.prod(shape) if len(shape) < 2 or kept or None in sizes else max(sizes)
    return total


def _stored_size(shape: tuple[int, ...], tensor_type: str) -> int | None:
    """Bytes of a matrix stored as `tensor_type`, or as its fallback when its width is not a multiple of the
    type's block; None when that does not fit either. Both trailing dimensions must fit: the converter may
    transpose a matrix, so either can become its width in the GGUF."""
    for t in (tensor_type, FALLBACK.get(tensor_type, tensor_type)):
        block, size = BLOCKS[t]
        if all(n % block == 0 for n in shape[-2:]):
            return math.prod(shape) // block * size
    return None


def _config_numbers(config: dict) -> dict:
    """The config's integer settings, those of a nested text model's config included (multimodal models)."""
    found = {}
    for holder in [config] + [config[k] for k in NESTED_CONFIGS if isinstance(config.get(k), dict)]:
        found.update({k: v for k, v in holder.items() if isinstance(v, int) and k not in found})
    return found


@dataclass
class Quantizer:
    """llama.cpp's quantizer, as a command line: `llama-quantize`, or Python with llama-cpp-python."""

    name: str  # for messages
    command: list[str]  # followed by: input, output, type, threads

    def run(self, source: Path, target: Path, gguf_type: str) -> None:
        """Quantize the GGUF `source` into `target`, on every core this process may use."""
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        argv = self.command + [str(source), str(target), gguf_type.upper(), str(threads)]
        done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
        if done.returncode or not target.is_file():
            raise LorafuseError(f"llama.cpp's quantizer ({self.name}) could not make {gguf_type}: "
                                f"{_reason(done.stderr + done.stdout, done.returncode)}; write --gguf-type auto and "
                                "quantize that file yourself, or report the problem to llama.cpp")


def _reason(said: str, code: int) -> str:
    """The line of the quantizer's log that says why it failed (llama.cpp's own error, or the assertion
    that aborted it), else its last line, else its exit status."""
    lines = [line.strip() for line in said.splitlines() if line.strip()]
    for marker in ("failed to quantize:", "GGML_ASSERT", "error"):
        hit = next((line for line in lines if marker.lower() in line.lower()), None)
        if hit:
            return hit
    if lines:
        return lines[-1]
    return f"killed by signal {-code}" if code < 0 else f"exit status {code}"


# llama-cpp-python's quantizer, run as `python -c`: argv is the folder holding llama_cpp, then as llama-quantize.
WITH_LLAMA_CPP_PYTHON = """
import ctypes, os, sys
folder, source, target, gguf_type, threads = sys.argv[1:]
sys.path.insert(0, folder)
import llama_cpp
llama_cpp.llama_backend_init()
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + gguf_type)
params.nthread = int(threads)
sys.exit(llama_cpp.llama_model_quantize(os.fsencode(source), os.fsencode(target), ctypes.byref(params)))
"""


def find(gguf_type: str, llama_cpp: str | os.PathLike | None) -> Quantizer | None:
    """The quantizer a `gguf_type` needs (None for the types the converter writes itself): `llama-quantize` in
    the llama.cpp checkout (`llama_cpp`, else LLAMA_CPP_DIR: build/bin or bin) or on PATH, else
    llama-cpp-python where `llama_cpp` can be imported. Looked for before anything is written."""
    if gguf_type not in TYPES:
        return None
    named = llama_cpp or os.environ.get("LLAMA_CPP_DIR")
    built = [Path(named).expanduser() / sub / EXECUTABLE for sub in ("build/bin", "bin")] if named else []
    for path in built + [shutil.which(EXECUTABLE)]:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return Quantizer(str(path), [str(path)])
    folder = _llama_cpp_python()
    if folder:
        return Quantizer(f"llama-cpp-python in {folder}", [sys.executable, "-c", WITH_LLAMA_CPP_PYTHON, str(folder)])
    where = f"in {named}/build/bin, " if named else ""
    raise LorafuseError(f"--gguf-type {gguf_type} needs llama.cpp's quantizer, and none was found (no {EXECUTABLE} "
                        f"{where}on PATH, no llama_cpp module): pip install llama-cpp-python, or pass --llama-cpp DIR "
                        "with a llama.cpp checkout built with cmake (build/bin/llama-quantize)")


def _llama_cpp_python() -> Path | None:
    """The folder from which this Python imports llama_cpp (llama-cpp-python), if it can."""
    try:
        spec = importlib.util.find_spec("llama_cpp")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return Path(spec.origin).resolve().parent.parent
