"""Output formats ("sinks"): what a merge writes into the staging folder, and how.

The plan decides every tensor's bytes; a sink decides where they go. The executor (lorafuse.execute)
knows nothing of any format: it asks the sink to open each output file, writes each tensor's bytes at
the place the file's layout gives it (positioned writes, in any order, several files side by side),
reports each tensor written, and asks the file to finish once its last tensor is in. The staging folder,
its lock and the final move into OUT are output.py's; the resume ledger and the manifest manifest.py's.

Adding a format (GGUF, ...) is one new package here, `lorafuse.sinks.NAME`, plus its tests, providing
a `Sink`:

- `layout(tensors, max_shard_size)`: the output files and each tensor's place in them, as the plan's
  ShardPlans (file name, header bytes, one TensorSlot per stored tensor: name, dtype, shape, offset,
  size). The plan's fingerprint hashes each file's name and header, so a changed layout is never resumed.
- `open(folder, shard, algorithm)`: an `OutputFile` for one of them, created under a partial name,
  header written, hashed by `algorithm` as it is written (the run's: manifest.run_hash); crash safety
  is the file's: it takes its real name only once durable, and only then is it recorded in the ledger.
  `safetensors.ShardFile` does all of that for any file laid out as header + tensors at planned
  offsets, and can be reused as it is by a format of that shape.
- `clean(folder)`: remove what unfinished files left (a merge that stopped).
- `written_files(plan)` and `write_metadata(plan, folder, settings)`: the small files that go with the
  weights (index, config, tokenizer and other carried files, model card); the manifest lists exactly
  these and the weight files, so `lorafuse verify` and --force know what the merge wrote.

Publishing (sinks.hub.HubPublisher) takes a sink's finished files as they come and commits the folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Protocol

if TYPE_CHECKING:
    from ..manifest import Ledger
    from ..plan import Plan, ShardPlan, TensorPlan


class OutputFile(Protocol):
    """One output file being written: tensors in any order, from several threads at once."""

    shard: ShardPlan  # its name, header, size and each tensor's slots

    def start(self) -> OutputFile:
        """Start what runs beside the writers (hashing, flushing); called right after the file is registered
        for cleanup, so that a stop at any moment finds what must be stopped."""

    def write(self, data: memoryview, offset: int) -> None:
        """Write bytes at `offset` (thread-safe)."""

    def copy_in(self, ranges: Iterable[tuple[int, int, int, int]]) -> None:
        """Copy (source fd, source offset, offset, size) ranges from other files, inside the kernel."""

    def wrote(self, start: int, end: int, pieces: Iterable[memoryview] = ()) -> bool:
        """[start, end) holds a whole tensor now (`pieces`: its bytes, if the writer still holds them);
        True for the file's last tensor, when it is ready to finish."""

    def finish(self, folder: Path, ledger: Ledger | None) -> str:
        """Make the file durable under its real name in `folder` and record it; its hex digest."""

    def cancel(self) -> None:
        """Stop everything the file runs and close it; it keeps its partial name (see Sink.clean)."""

    def cancel_finish(self) -> None:
        """Make a `finish` running on another thread fail rather than record the file (the merge stopped);
        that thread closes the file."""


class Sink(Protocol):
    """An output format: what the plan, the executor and the manifest need of it."""

    def layout(self, tensors: list[TensorPlan], max_shard_size: int | str) -> list[ShardPlan]:
        """The output files and the place of each tensor in them."""

    def open(self, folder: Path, shard: ShardPlan, algorithm: str) -> OutputFile:
        """Create `shard`'s file in `folder`, unfinished, to be hashed by `algorithm` (a key of
        manifest.HASHES); not started yet (see OutputFile.start)."""

    def clean(self, folder: Path) -> None:
        """Delete the unfinished files a stopped merge left in `folder`."""

    def written_files(self, plan: Plan) -> set[str]:
        """The names of the files `write_metadata` writes; with the weight files, all the manifest lists."""

    def write_metadata(self, plan: Plan, folder: Path, settings: dict) -> None:
        """Write the files that go with the weights (index, config, carried files, model card)."""
