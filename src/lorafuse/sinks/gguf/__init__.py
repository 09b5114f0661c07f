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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

from ...errors import LorafuseError
from ...formats.safetensors import FLOAT_DTYPES, dtype_size, torch_dtype
from ...plan import Plan, TensorPlan
from ...units import human_size
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
        how = ("written by llama.cpp's converter, then its quantizer (both files on disk meanwhile)"
               if self.gguf_type in quantize.TYPES else "written by llama.cpp's converter")
        return [f"output   GGUF {self.gguf_type} -> {self.out.parent / files}, {human_size(self.size)} at most, {how}"]

    def to_dict(self) -> dict:
        return {"file": str(self.out), "gguf_type": self.gguf_type, "bytes_at_most": self.size,
                "split_bytes": self.split}


def gguf_output(plan: Plan, out: Path, gguf_type: str, max_shard_size: int | str | None, pushing: bool) -> GgufOutput:
    """The GGUF a merge with these settings writes: split when --max-shard-size says so, or when pushed to
    the Hub and possibly larger than it takes."""
    gguf_type = check_type(gguf_type)
    size = size_bound(plan, gguf_type)
    if max_shard_size is None:
        split = HUB_SPLIT if pushing and size > HUB_FILE_LIMIT else None
    else:
        split = _size(max_shard_size)
    if split and gguf_type in quantize.TYPES:
        raise LorafuseError(f"a {gguf_type} GGUF is one file (llama.cpp's quantizer writes it whole); split it afterwards "
                            "with llama.cpp's llama-gguf-split, or choose f16, bf16 or q8_0 to have it split here")
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


def evaluation_order(writer_tensors: list[dict], lazy_base: type, merged: Callable) -> list[TensorPlan]:
    """The merged tensors in the order the converter's writer will ask for them, read from what it has
    prepared: its files' tensors in write order, each a lazy graph that gguf-py's `LazyBase.to_eager`
    evaluates depth first, its arguments in order (lists and tuples inside them too), a node once. The
    leaves are the calls to `merged(tensor)`. Read from the graph, not foreseen from the names: the converter
    reorders tensors (a layer's experts are stacked one projection at a time), and guessing wrong costs a
    tensor made twice. A graph not shaped as expected gives a shorter order: the merge is the same, made
    ahead less often."""
    order, seen = [], set()

    def visit(node) -> None:
        if isinstance(node, (list, tuple)):
            for item in node:
                visit(item)
        elif isinstance(node, lazy_base) and id(node) not in seen and getattr(node, "_data", None) is None:
            seen.add(id(node))
            args = getattr(node, "_args", ())
            if getattr(node, "_func", None) is merged:
                order.extend(args[:1])
            else:
                visit(args)
    for tensors in writer_tensors:
        for info in tensors.values():
            visit(info.tensor)
    return order


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


class MergedTensors(Protocol):
    """Where the converter's tensors come from (execute.work.TensorValues)."""

    def expect(self, order: list[TensorPlan]) -> None:
        """The tensors will be asked for in this order."""

    def get(self, tensor: TensorPlan) -> bytearray:
        """One output tensor's bytes, in the plan's dtype."""


def write(plan: Plan, output: GgufOutput, staging: Path, llama_cpp: Path, settings: dict,
          values: MergedTensors, quantizer: quantize.Quantizer | None = None) -> list[Path]:
    """Write the merge with the converter in `llama_cpp` into `staging`/gguf: OUT's file, or its split files;
    returns them, the first first. The merged tensors come from `values`. The small files the converter reads are written first, into `staging`/source/OUT's stem (the
    converter names the model after that folder). A type the converter does not write is made by `quantizer`
    from the merge written exactly into `staging`/intermediate, which is then deleted."""
    made = staging / "gguf"
    made.mkdir()
    name = output.out.name
    first = staging / "intermediate" if quantizer else made
    first.mkdir(exist_ok=True)
    with converter.loaded(llama_cpp) as (conversion, gguf):
        _convert(conversion, gguf, plan, staging / "source" / output.out.stem, first / name,
                 intermediate_type(plan) if quantizer else output.gguf_type, output.split, settings, values)
    if quantizer is not None:
        try:
            quantizer.run(first / name, made / name, output.gguf_type)
        finally:
            (first / name).unlink()
    return sorted(made.iterdir())


def _convert(conversion, gguf, plan: Plan, folder: Path, target: Path, gguf_type: str, split: int | None,
             settings: dict, values: MergedTensors) -> None:
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

    def merged(tensor: TensorPlan):
        return torch.frombuffer(values.get(tensor), dtype=torch_dtype(tensor.dtype)).reshape(tensor.shape)

    class Merged(model_class):
        """The model's converter class, its tensors indexed from the merge instead of from files."""

        model_arch = model_class.model_arch  # the converter requires each class to name it

        def index_tensors(self, remote_hf_model_id: str | None = None) -> dict:
            """In the converter's own order (so the GGUF lists them as the two-step route does)."""
            found = {}
            for tensor in converter_order(plan):
                def made(tensor=tensor):
                    meta = lazy.meta_with_dtype_and_shape(torch_dtype(tensor.dtype), tensor.shape)
                    return lazy(meta=meta, args=(tensor,), func=merged)
                if item := self.filter_tensors((tensor.name, made)):
                    found[item[0]] = item[1]
            return found

        def write(self) -> None:
            """The converter's own `write`, without its progress bar (the merge shows one)."""
            self.prepare_tensors()
            values.expect(evaluation_order(self.gguf_writer.tensors, gguf.LazyBase, merged))
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
            Merged(folder, getattr(gguf.LlamaFileType, FILE_TYPES[gguf_type]), target,
                   split_max_size=split or 0).write()
    except (NotImplementedError, ValueError, KeyError) as e:  # the converter's refusals (a tensor it cannot map)
        raise LorafuseError(f"llama.cpp's converter cannot convert this model: {str(e).splitlines()[0] if str(e) else e!r}; "
                            "merge to safetensors instead (an OUT folder)") from None
    finally:
        for logger, level in zip(chatter, levels):
            logger.setLevel(level)
