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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ...errors import LorafuseError
from ...formats.safetensors import dtype_size, torch_dtype
from ...plan import Plan, TensorPlan
from ...units import human_size
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


# The Hub stores files of up to 50 GB: a pushed GGUF that may be larger is split, in llama.cpp's format, at 48 GB.
HUB_FILE_LIMIT = 50 * 10**9
HUB_SPLIT = 48 * 10**9


@dataclass(frozen=True)
class GgufOutput:
    """What a GGUF merge writes: one file at `out`, or, split at `split` bytes, llama.cpp's split files
    beside it (`out`'s stem + -00001-of-0000N.gguf: llama.cpp loads them from the first); `size` bounds
    them all, and the disk needs `size` while they are written."""

    out: Path
    gguf_type: str
    size: int
    split: int | None

    def describe(self) -> list[str]:
        files = (f"{self.out.stem}-00001-of-NNNNN.gguf and the rest of llama.cpp's split files, "
                 f"{human_size(self.split)} each at most" if self.split else self.out.name)
        return [f"output   GGUF {self.gguf_type} -> {self.out.parent / files}, {human_size(self.size)} at most, "
                "written by llama.cpp's converter"]

    def to_dict(self) -> dict:
        return {"file": str(self.out), "gguf_type": self.gguf_type, "bytes_at_most": self.size,
                "split_bytes": self.split}


def gguf_output(plan: Plan, out: Path, gguf_type: str, max_shard_size: int | str | None, pushing: bool) -> GgufOutput:
    """The GGUF a merge with these settings writes: split when --max-shard-size says so, or when pushed to
    the Hub and possibly larger than it takes."""
    size = size_bound(plan, check_type(gguf_type))
    if max_shard_size is None:
        split = HUB_SPLIT if pushing and size > HUB_FILE_LIMIT else None
    else:
        split = _size(max_shard_size)
    return GgufOutput(out, gguf_type, size, split)


def _size(max_shard_size: int | str) -> int:
    from huggingface_hub.serialization._base import parse_size_to_int

    try:
        n = max_shard_size if isinstance(max_shard_size, int) else parse_size_to_int(max_shard_size)
    except ValueError:
        n = 0
    if isinstance(n, bool) or n <= 0:
        raise LorafuseError(f"--max-shard-size {max_shard_size!r} is not a size like 5GB or 500MB")
    return n


def split_files(out: Path) -> list[Path]:
    """The files of an earlier split GGUF named after OUT in its folder (llama.cpp's split names)."""
    pattern = re.compile(re.escape(out.stem) + r"-\d{5}-of-\d{5}\.gguf")
    return sorted(p for p in out.parent.iterdir() if pattern.fullmatch(p.name)) if out.parent.is_dir() else []


def gguf_model_card(plan: Plan, settings: dict, names: list[str]) -> str:
    """The README.md pushed with a GGUF: the merge's card, its output rows saying what the files are."""
    output = plan.file_output
    return files.model_card(plan, settings, {"format": f"GGUF {output.gguf_type}", "files": ", ".join(names)},
                            library="gguf", tags=("gguf",))


def converter_order(plan: Plan) -> list[TensorPlan]:
    """The order in which the converter indexes a safetensors folder, and so asks for the tensors: its files
    in name order, each file's tensors in name order."""
    return [t for shard in sorted(plan.shards, key=lambda s: s.filename) for t in sorted(shard.tensors, key=lambda t: t.name)]


def is_gguf(out) -> bool:
    return str(out).lower().endswith(".gguf")


def check_type(gguf_type: str) -> str:
    if gguf_type not in GGUF_TYPES:
        raise LorafuseError(f"--gguf-type {gguf_type!r} is not one of {', '.join(GGUF_TYPES)} (the types llama.cpp's "
                            "converter writes; quantize further with llama-quantize)")
    return gguf_type


def write(plan: Plan, output: GgufOutput, staging: Path, llama_cpp: Path, settings: dict,
          value: Callable[[TensorPlan], object]) -> list[Path]:
    """Write the merge with the converter in `llama_cpp` into `staging`/gguf: OUT's file, or its split files;
    returns them, the first first. `value(tensor)` makes one output tensor (a torch tensor of the plan's
    dtype). The small files the converter reads are written first, into `staging`/source/OUT's stem (the
    converter names the model after that folder)."""
    made = staging / "gguf"
    made.mkdir()
    with converter.loaded(llama_cpp) as (conversion, gguf):
        _convert(conversion, gguf, plan, staging / "source" / output.out.stem, made / output.out.name, output,
                 settings, value)
    return sorted(made.iterdir())


def _convert(conversion, gguf, plan: Plan, folder: Path, target: Path, output: GgufOutput, settings: dict,
             value: Callable[[TensorPlan], object]) -> None:
    import torch

    folder.mkdir(parents=True)
    files.write_metadata(plan, folder, settings)
    try:
        hparams = conversion.ModelBase.load_hparams(folder, False)
        model_class = conversion.get_model_class(conversion.get_model_architecture(hparams, conversion.ModelType.TEXT),
                                                 mmproj=False)
    except (NotImplementedError, ValueError, KeyError) as e:
        raise LorafuseError(f"llama.cpp's converter cannot convert this model: {e}; "
                            "merge to safetensors instead (an OUT folder)") from None
    lazy = conversion.LazyTorchTensor

    class Merged(model_class):
        """The model's converter class, its tensors indexed from the merge instead of from files."""

        model_arch = model_class.model_arch  # the converter requires each class to name it

        def index_tensors(self, remote_hf_model_id: str | None = None) -> dict:
            """In the converter's own order (so the GGUF lists them as the two-step route does)."""
            found = {}
            for tensor in converter_order(plan):
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
            Merged(folder, getattr(gguf.LlamaFileType, FILE_TYPES[output.gguf_type]), target,
                   split_max_size=output.split or 0).write()
    except (NotImplementedError, ValueError, KeyError) as e:  # the converter's refusals (a tensor it cannot map)
        raise LorafuseError(f"llama.cpp's converter cannot convert this model: {str(e).splitlines()[0] if str(e) else e!r}; "
                            "merge to safetensors instead (an OUT folder)") from None
    finally:
        for logger, level in zip(chatter, levels):
            logger.setLevel(level)
