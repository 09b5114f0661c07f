"""The GGUF sink: one GGUF file for llama.cpp, Ollama and LM Studio, written by llama.cpp's own converter.

The converter indexes a model's tensors as name -> callable and calls each while it writes the file; here
each callable makes that merged tensor (read, patched in fp32, rounded once, by the same producers as a
safetensors merge), so the GGUF is what the converter makes of lorafuse's safetensors merge, byte for byte,
with no merged model on disk at any moment: the converter reads config.json and the tokenizer from the
staging folder and the tensors from the stream. Memory: the converter's lazy tensors hold one tensor (and
its conversion) at a time. The types llama.cpp's quantizer makes (q4_k_m, ...) take one more step: the
converter writes the merge exactly, then the quantizer makes the final file from it (quantize.py).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Callable

from ...errors import LorafuseError
from ...formats.safetensors import FLOAT_DTYPES, dtype_size, torch_dtype
from ...plan import Plan, TensorPlan
from ..safetensors import files
from . import converter, quantize

CONVERTER_TYPES = ("auto", "f32", "f16", "bf16", "q8_0")  # what the converter writes itself, in the stream
GGUF_TYPES = CONVERTER_TYPES + quantize.TYPES
FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "auto": "GUESSED"}


# bytes per value of a weight in the GGUF, by type (q8_0: blocks of 32 values in 34 bytes); vectors are
# kept in f32 by the converter, and a weight q8_0 cannot block stays 16-bit
VALUE_BYTES = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32}
Q8_BLOCK = 32


def size_bound(plan: Plan, gguf_type: str) -> int:
    """An upper bound of the disk space the GGUF takes from the plan alone, for the disk check: the tensors
    at their GGUF type, and room for the metadata (the vocabulary) as large as the carried tokenizer files.
    A type the quantizer makes counts the intermediate GGUF too: both files are on disk at once."""
    metadata = sum(path.stat().st_size for path in plan.carried)
    if gguf_type in quantize.TYPES:
        return size_bound(plan, intermediate_type(plan)) + metadata + quantize.tensors_bound(plan, gguf_type)
    total = metadata
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
    """The type in lower case (llama.cpp's tools spell them in either), or a one-line error."""
    gguf_type = gguf_type.lower()
    if gguf_type in quantize.NEEDS_IMATRIX:
        raise LorafuseError(f"--gguf-type {gguf_type} needs an importance matrix (llama.cpp refuses it without "
                            "--imatrix), which lorafuse does not make: choose another type (iq4_xs, q4_k_m, ...), or "
                            "write --gguf-type auto and run llama-imatrix and llama-quantize on it")
    if gguf_type not in GGUF_TYPES:
        raise LorafuseError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)}")
    return gguf_type


def intermediate_type(plan: Plan) -> str:
    """The type the converter writes the merge at for llama.cpp's quantizer: the merge's 16-bit type when
    all its matrices have it (what the converter's `--outtype auto` writes, the two-step route's usual first
    step), else f32; either holds the merge exactly. Not f32 always: the quantizer widens 16-bit values to f32
    exactly, so the quantized tensors are the same, while the few matrices it leaves alone keep the
    intermediate's type (16-bit: the merge's own precision, at half the size), and the intermediate, on disk
    beside the final file, is half as large."""
    dtypes = {t.dtype for t in plan.tensors if len(t.shape) >= 2 and t.dtype in FLOAT_DTYPES}
    return {frozenset({"BF16"}): "bf16", frozenset({"F16"}): "f16"}.get(frozenset(dtypes), "f32")


def write(plan: Plan, folder: Path, name: str, gguf_type: str, llama_cpp: Path, settings: dict,
          value: Callable[[TensorPlan], object], quantizer: quantize.Quantizer | None = None) -> Path:
    """Write the merge into `folder` with the converter in `llama_cpp` and return the file; `value(tensor)`
    makes one output tensor (a torch tensor of the plan's dtype). The small files it reads are written first,
    into a folder in `folder` named after the output (the converter names the model after it). A type the
    converter does not write is made by `quantizer` from the merge written exactly, which is then deleted."""
    with converter.loaded(llama_cpp) as (conversion, gguf):
        made = _convert(conversion, gguf, plan, folder, name, intermediate_type(plan) if quantizer else gguf_type,
                        settings, value)
    if quantizer is None:
        return made
    quantized = folder / f"{made.stem}.{gguf_type}{made.suffix}"
    try:
        quantizer.run(made, quantized, gguf_type)
    finally:
        made.unlink()
    return quantized


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

    chatter = logging.getLogger("hf-to-gguf")
    level, chatter.level = chatter.level, logging.ERROR  # its notes are for its own command line
    try:
        with torch.inference_mode():
            Merged(folder, getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type]), target).write()
    except (NotImplementedError, ValueError, KeyError) as e:  # the converter's refusals (a tensor it cannot map)
        raise LorafuseError(f"llama.cpp's converter cannot convert this model: {str(e).splitlines()[0] if str(e) else e!r}; "
                            "merge to safetensors instead (an OUT folder)") from None
    finally:
        chatter.setLevel(level)
    return target
