"""The safetensors sink: a Hugging Face model folder of safetensors shards (`model.safetensors`, or
`model-0000K-of-0000N.safetensors` and an index), with config.json, the carried tokenizer files and a
model card.

- shard_file.py: `ShardFile`, one shard's life from partial name to ledger record (the hot path:
  positioned writes, copy_file_range, sync_file_range, the running hash, the flusher);
- files.py: the small files (index, config, carried files, card) and their names for the manifest.
"""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import split_state_dict_into_shards_factory

from ...errors import LorafuseError
from ...formats.safetensors import layout, tensor_nbytes
from ...plan import Plan, ShardPlan, TensorPlan
from . import files
from .shard_file import HashCancelled, ShardFile, remove_partials

__all__ = ["SAFETENSORS", "HashCancelled", "SafetensorsSink", "ShardFile"]


class SafetensorsSink:
    """The `Sink` (see lorafuse.sinks) of a safetensors model folder."""

    name = "safetensors"

    def layout(self, tensors: list[TensorPlan], max_shard_size: int | str) -> list[ShardPlan]:
        """Split by size alone with huggingface_hub's own rule and names, then lay out each file."""
        sizes = {t.name: sum(tensor_nbytes(d, shape) for _, d, shape in t.entries) for t in tensors}
        try:
            split = split_state_dict_into_shards_factory(
                sizes, get_storage_size=lambda n: n, filename_pattern="model{suffix}.safetensors",
                max_shard_size=max_shard_size)
        except ValueError:
            raise LorafuseError(f"--max-shard-size {max_shard_size!r} is not a size like 5GB or 500MB") from None
        by_name = {t.name: t for t in tensors}
        return [_lay_out(filename, tuple(by_name[n] for n in names))
                for filename, names in split.filename_to_tensors.items()]

    def open(self, folder: Path, shard: ShardPlan, algorithm: str) -> ShardFile:
        return ShardFile.create(folder, shard, algorithm)

    def clean(self, folder: Path) -> None:
        remove_partials(folder)

    def written_files(self, plan: Plan) -> set[str]:
        return files.written_files(plan)

    def write_metadata(self, plan: Plan, folder: Path, settings: dict) -> None:
        files.write_metadata(plan, folder, settings)


def _lay_out(filename: str, members: tuple[TensorPlan, ...]) -> ShardPlan:
    header, slots = layout([entry for t in members for entry in t.entries])
    grouped, i = [], 0
    for t in members:
        grouped.append(tuple(slots[i:i + len(t.entries)]))
        i += len(t.entries)
    return ShardPlan(filename, members, header, tuple(grouped))


SAFETENSORS = SafetensorsSink()
