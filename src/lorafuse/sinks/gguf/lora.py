"""The adapter alone as a LoRA GGUF, for llama.cpp's `--lora` (llama-cpp-python's `lora_path`, Ollama's ADAPTER).

llama.cpp's own `convert_lora_to_gguf.py` writes it, run as its own command: it defines its model class under
`if __name__ == '__main__'`, so it cannot be driven in-process, and a process of its own keeps its imports and
its memory out of lorafuse's. It needs the base's config.json only (staged from the plan: a base from the Hub
needs no weights downloaded), and reads the adapter folder itself.

llama.cpp applies each A/B pair of the file as W·x + (alpha/rank)·B·A·x, with one `adapter.lora.alpha` for the
whole file and each pair's own rank, and a scale of 1 when alpha is 0 (`get_scale` in src/llama-adapter.h). The
script writes `lora_alpha` and the A/B pairs it finds and leaves the rest of PEFT's definition to that rule, so
lorafuse decides first, from the plan (every adapter tensor matched to its base tensor, as for a merge):

- LoRA whose PEFT scale is llama.cpp's (lora_alpha/r per module: plain LoRA, `rank_pattern` alone): the adapter
  folder goes to the script as it is, and the file is the script's own output;
- `use_rslora` or `alpha_pattern` (scales llama.cpp cannot derive from one alpha): converted exactly, from a
  corrected copy of the adapter in the staging folder: each B multiplied in fp32 by its module's PEFT scale, A
  widened to fp32 (exact), `lora_alpha` 0, so that llama.cpp applies every pair at scale 1;
- refused, saying why, with "merge to a GGUF instead" (the merge is exact for all of them): DoRA (a magnitude per
  row, which a LoRA GGUF cannot hold); whole tensors the adapter saves (`modules_to_save`, embeddings saved with
  `save_embedding_layers`, `bias`, `lora_bias`, trainable tokens: the script drops some silently, and llama.cpp
  ignores the norms it keeps); LoRA on convolutions and on MoE experts (`target_parameters`); LoRA on Conv1D
  layers (GPT-2), whose delta the script transposes along with the stored weight's layout, so that it reaches
  llama.cpp transposed; a change to an input embedding that the output head is tied to (llama.cpp would apply
  the embedding's pair to the tied head as well); and deltas cut into the checkpoint's pieces (an adapter named
  after the model in memory, as transformers loads it).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from ...errors import LorafuseError
from ...formats.folder import create
from ...patches import LoRA, SliceRef
from ...plan import HEAD, Plan
from . import converter

MERGE_INSTEAD = "merge to a GGUF instead (lorafuse merge BASE ADAPTER model.gguf), which is exact for it"
STAGED_NAME = "lora.gguf"  # not OUT's name: the script would read braces in it as a template
CARD_FILES = ("README.md", "config.json", "generation_config.json")  # what the script reads from the adapter's folder
NOT_LORA = {"replace": "a whole tensor (modules_to_save, an embedding saved with save_embedding_layers, or bias)",
            "rows": "trainable token rows (trainable_token_indices)", "lora_bias": "a LoRA bias (lora_bias)",
            "expert_lora": "a LoRA on MoE experts (target_parameters)"}


def needs_rescaling(plan: Plan) -> bool:
    """Refuse an adapter a LoRA GGUF cannot hold exactly (one line: what, why, what to do); True when some
    module's PEFT scale is not llama.cpp's lora_alpha/rank, so the adapter must be staged rescaled."""
    alpha = plan.adapter.config["lora_alpha"]
    factors = set()
    rescale = False
    if HEAD not in plan.base.tensors and any(t.name == HEAD for t in plan.tensors):  # the plan unties the head
        raise LorafuseError("the adapter changes the input embedding or the output head of a model that ties them, "
                            "and llama.cpp would apply a LoRA on its token embedding to the tied head as well; "
                            f"{MERGE_INSTEAD}")
    for tensor in plan.merged:
        for patch in tensor.patches:
            what = _inexpressible(patch, tensor)
            if what:
                raise LorafuseError(f"the adapter holds {what} for {tensor.name} ({patch.origins[0]}), which a LoRA "
                                    f"GGUF cannot hold: llama.cpp adds plain A/B pairs scaled by one alpha; {MERGE_INSTEAD}")
            factors.update(patch.origins)
            rescale = rescale or patch.scale != alpha / patch.A.shape[0]
    left = sorted(set(plan.adapter.tensors) - factors)
    if left:
        raise LorafuseError(f"the adapter holds {left[0]}" + (f" (and {len(left) - 1} more)" if len(left) > 1 else "")
                            + f", which is no LoRA A/B factor and which a LoRA GGUF cannot hold; {MERGE_INSTEAD}")
    return rescale


def _inexpressible(patch, tensor) -> str | None:
    """What in `patch` a LoRA GGUF cannot express, or None."""
    if not isinstance(patch, LoRA):
        return NOT_LORA.get(patch.label, f"a {patch.label} patch")
    if patch.magnitude is not None:
        return "a DoRA magnitude (use_dora)"
    if len(patch.A.shape) > 2:
        return "a LoRA on a convolution"
    if isinstance(patch.A, SliceRef) or isinstance(patch.B, SliceRef):
        return "a LoRA on a weight the checkpoint stores in pieces (the adapter is named after the model in memory)"
    if patch.kind == "linear" and patch.transposed(tuple(tensor.source.shape)):
        return "a LoRA on a Conv1D layer (fan_in_fan_out), whose delta llama.cpp's script would transpose"
    return None


def output_type(plan: Plan, gguf_type: str) -> str:
    """The --outtype for the script. `auto` is decided here, by the script's own rule for it (the 16-bit type of
    the tensors, f16 for any other), since its auto fails on adapters (it asks a LoRA tensor for `dim()`)."""
    if gguf_type != "auto":
        return gguf_type
    dtypes = {plan.adapter.tensors[key].dtype for tensor in plan.merged for p in tensor.patches for key in p.origins}
    return {frozenset({"BF16"}): "bf16"}.get(frozenset(dtypes), "f16")


def size_bound(plan: Plan) -> int:
    """Bytes the staging folder may hold at once: the GGUF (at most 4 bytes a value, and its metadata, much
    smaller than the config it comes from) and a rescaled copy of the adapter in fp32."""
    values = sum(math.prod(ref.shape) for ref in plan.adapter.tensors.values())
    return 2 * 4 * values + 2 * len(json.dumps(plan.config)) + (1 << 20)


def write(plan: Plan, folder: Path, gguf_type: str, llama_cpp: Path, rescale: bool) -> Path:
    """Write the LoRA GGUF into `folder` (the staging folder) with the script in `llama_cpp`; returns its path.
    The script reads config.json from a folder named after OUT (it names the model after it, as a merge's
    GGUF is), and the adapter's folder, or with `rescale` the corrected copy made here."""
    base = folder / "base" / plan.out.stem
    base.mkdir(parents=True)
    with create(base / "config.json") as f:
        f.write((json.dumps(plan.config, indent=2, sort_keys=True) + "\n").encode())
    adapter = _stage_rescaled(plan, folder / "adapter" / plan.adapter.folder.name) if rescale else plan.adapter.folder
    target = folder / STAGED_NAME
    script = llama_cpp / converter.LORA_SCRIPT
    argv = [sys.executable, str(script), str(adapter), "--base", str(base), "--outfile", str(target),
            "--outtype", output_type(plan, gguf_type)]
    # Its own gguf-py (as for a merge's GGUF), and nothing fetched from the Hub: the base is staged here.
    env = {**{k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, cwd=folder, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          errors="replace")
    if done.returncode or not target.is_file():
        raise LorafuseError(f"llama.cpp's {converter.LORA_SCRIPT} ({converter.describe(llama_cpp)}) failed: "
                            f"{_last_error(done)}; write the adapter as a PEFT folder (an OUT not ending in .gguf) "
                            "instead, or merge it")
    return target


def _stage_rescaled(plan: Plan, folder: Path) -> Path:
    """A copy of the adapter that llama.cpp applies exactly at scale 1: B·s in fp32 (s: the module's PEFT
    scale), A in fp32, lora_alpha 0 (and no rsLoRA or alpha_pattern left to misread), and the files the script
    reads its metadata from."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    tensors = {}
    for tensor in plan.merged:
        for patch in tensor.patches:
            a_key, b_key = patch.origins[:2]
            tensors[a_key] = patch.A.read().to(torch.float32).contiguous()
            tensors[b_key] = (patch.B.read().to(torch.float32) * patch.scale).contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {**plan.adapter.config, "lora_alpha": 0, "use_rslora": False, "alpha_pattern": {}}
    with create(folder / "adapter_config.json") as f:
        f.write((json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    for name in CARD_FILES:
        if (plan.adapter.folder / name).is_file():
            shutil.copyfile(plan.adapter.folder / name, folder / name)
    return folder


ERROR_LINE = re.compile(r"^(ERROR:|[\w.]*(Error|Exception)\b)")


def _last_error(done: subprocess.CompletedProcess) -> str:
    """The script's last error line (a logged ERROR, or the exception a traceback ends with), else its last line."""
    if done.returncode < 0:
        return f"it was killed by signal {-done.returncode}"
    lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    return (errors or lines or [f"exit status {done.returncode}, no output"])[-1]
