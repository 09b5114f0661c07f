"""The GGUF sink: one GGUF file for llama.cpp, Ollama and LM Studio, written by llama.cpp's own converter.

The converter indexes a model's tensors as name -> callable and calls each while it writes the file; here
each callable makes that merged tensor (read, patched in fp32, rounded once, by the same producers as a
safetensors merge), so the GGUF is what the converter makes of lorafuse's safetensors merge, byte for byte,
with no merged model on disk at any moment: the converter reads config.json and the tokenizer from the
staging folder and the tensors from the stream. Memory: the converter's lazy tensors hold one tensor (and
its conversion) at a time.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

from ...errors import LorafuseError
from ...formats.safetensors import dtype_size, torch_dtype
from ...plan import Plan, TensorPlan
from ..safetensors import files
from . import converter

GGUF_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")  # what the converter writes itself, in the stream
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "auto": "GUESSED"}


# bytes per value of a weight in the GGUF, by type (q8_0: blocks of 32 values in 34 bytes); vectors are
# kept in f32 by the converter, and a weight q8_0 cannot block stays 16-bit
VALUE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}
Q8_BLOCK = 32


def size_bound(plan: Plan, gguf_type: str) -> int:
    """An upper bound of the GGUF's size from the plan alone, for the disk check: the tensors at their GGUF
    type, and room for the metadata (the vocabulary) as large as the carried tokenizer files."""
    total = sum(path.stat().st_size for path in plan.carried)
    for tensor in plan.tensors:
        values = math.prod(tensor.shape)
        if len(tensor.shape) < 2:
            total += 4 * values
        elif gguf_type == "auto":
            total += dtype_size(tensor.dtype) * values
        elif gguf_type == "q8_0" and tensor.shape[-1] % Q8_BLOCK:
            total += 2 * values
        else:
            total += math.ceil(VALUE_BYTES[gguf_type] * values)
    return total


def is_gguf(out) -> bool:
    return str(out).lower().endswith(".gguf")


def check_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise LorafuseError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)} (the types llama.cpp's "
                            "converter writes; quantize further with llama-quantize)")
    return gguf_type


def write(plan: Plan, folder: Path, name: str, gguf_type: str, llama_cpp: Path, settings: dict,
          value: Callable[[TensorPlan], object]) -> Path:
    """Write the merge as `folder/name` with the converter in `llama_cpp`; `value(tensor)` makes one output
    tensor (a torch tensor of the plan's dtype). The small files it reads are written first, into a folder
    in `folder` named after the output (the converter names the model after it)."""
    with converter.loaded(llama_cpp) as (conversion, gguf):
        return _convert(conversion, gguf, plan, folder, name, gguf_type, settings, value)


def _convert(conversion, gguf, plan: Plan, folder: Path, name: str, gguf_type: str, settings: dict,
             value: Callable[[TensorPlan], object]) -> Path:
    import torch

    target = folder / name
    folder = folder / Path(name).stem  # the converter names the model after the folder it reads: OUT's name
    folder.mkdir()
    files.write_metadata(plan, folder, settings)
    try:
        hparams = conversion.ModelBase.load_hparams(folder, False)
        model_class = conversion.get_model_class(conversion.get_model_architecture(hparams, conversion.ModelType.TEXT),
                                                 mmproj=False)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise LorafuseError(f"llama.cpp's converter cannot convert this model: {e}; "
                            "merge to safetensors instead (an OUT folder)") from None
    lazy = conversion.LazyTorchTensor
    shard_of = {t.name: shard.filename for shard in plan.shards for t in shard.tensors}

    class Merged(model_class):
        """The model's converter class, its tensors indexed from the merge instead of from files."""

        model_arch = model_class.model_arch  # the converter requires each class to name it

        def index_tensors(self, remote_hf_model_id: str | None = None) -> dict:
            """In the order the converter indexes a safetensors folder: its files in name order, each
            file's tensors in name order (so the GGUF lists them as the two-step route does)."""
            found = {}
            for tensor in sorted(plan.tensors, key=lambda t: (shard_of[t.name], t.name)):
                def made(tensor=tensor):
                    meta = lazy.meta_with_dtype_and_shape(torch_dtype(tensor.dtype), tensor.shape)
                    return lazy(meta=meta, args=(tensor,), func=value)
                if item := self.filter_tensors((tensor.name, made)):
                    found[item[0]] = item[1]
            return found

        def write(self) -> None:
            """The converter's own `write`, without its progress bar (the merge shows one)."""
            self.prepare_tensors()
            self.prepare_metadata(vocab_only=False)
            self.gguf_writer.write_header_to_file(path=self.fname_out)
            self.gguf_writer.write_kv_data_to_file()
            self.gguf_writer.write_tensors_to_file(progress=False)
            self.gguf_writer.close()

    # The notes of the converter and of its gguf-py (a key set twice, for Gemma 3) are for their own command
    # line: with nothing set up, logging would print them through --quiet and across the progress bar.
    chatter = [logging.getLogger(name) for name in ("hf-to-gguf", "gguf")]
    levels = [logger.level for logger in chatter]
    for logger in chatter:
        logger.setLevel(logging.ERROR)
    try:
        with torch.inference_mode():
            Merged(folder, getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type]), target).write()
    except (NotImplementedError, ValueError, KeyError) as e:  # the converter's refusals (a tensor it cannot map)
        raise LorafuseError(f"llama.cpp's converter cannot convert this model: {str(e).splitlines()[0] if str(e) else e!r}; "
                            "merge to safetensors instead (an OUT folder)") from None
    finally:
        for logger, level in zip(chatter, levels):
            logger.setLevel(level)
    return target
