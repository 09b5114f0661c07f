"""The work on one tensor (`write_tensor`) and what the workers share to do it: the source files, the
compute paths, the counters."""

from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable

from .. import compute, costs
from ..formats.safetensors import TensorSlot
from ..patches import forget_cut_rows
from ..plan import Plan, ShardPlan, TensorPlan
from ..quant import QuantizedTensor

if TYPE_CHECKING:
    from ..sinks import OutputFile


def write_tensor(target: OutputFile, slots: tuple[TensorSlot, ...], tensor: TensorPlan, sources: SourceFiles,
                 producer) -> tuple[str, Iterable[memoryview]]:
    """Write one tensor into its `slots` of `target`: untouched, copied file to file inside the kernel;
    else made by `producer` (read, patched in fp32, cast) and written as it comes. Returns the counter it
    counts in, and its bytes where the producer still holds them (for the hash: copied bytes never pass
    through memory, and are read back)."""
    if tensor.is_copy:
        target.copy_in((sources.fd(ref.path), ref.offset, slot.offset, slot.nbytes)
                       for slot, ref in zip(slots, tensor.source_refs, strict=True))
        return "tensors_copied", ()
    source_fd = None if isinstance(tensor.source, QuantizedTensor) else sources.fd(tensor.source.path)

    def write(slot: int, offset: int, data: memoryview) -> None:
        target.write(data, slots[slot].offset + offset)
    pieces = producer.output_bytes(tensor, slots, source_fd, write)
    return ("tensors_merged" if tensor.patches else "tensors_cast"), pieces


@dataclass
class Counters:
    tensors_merged: int = 0
    tensors_cast: int = 0
    tensors_copied: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    shards_resumed: int = 0


class Progress:
    """The counters of a run, and `on_progress(bytes)` told of every tensor written (from any worker)."""

    def __init__(self, on_progress: Callable[[int], None] | None) -> None:
        self.counters = Counters()
        self.on_progress = on_progress
        self.lock = threading.Lock()

    def tensor(self, kind: str, read: int, written: int) -> None:
        with self.lock:
            setattr(self.counters, kind, getattr(self.counters, kind) + 1)
            self.counters.bytes_read += read
            self.counters.bytes_written += written
            if self.on_progress:
                self.on_progress(written)

    def resumed(self, shard: ShardPlan) -> None:
        """A shard an earlier run finished (told from the thread that hands out the jobs, before any job)."""
        self.counters.shards_resumed += 1
        if self.on_progress:
            self.on_progress(shard.size - len(shard.header))


class SourceFiles:
    """Read-only descriptors of the source files, opened once and shared by the workers."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close_file(self, path: Path) -> None:
        """Close one file (about to be deleted: an open descriptor would keep its disk space)."""
        with self._lock:
            fd = self._fds.pop(path, None)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)


class Producers(contextlib.ExitStack):
    """The compute path (compute.producer) of each kind of tensor, made when the first tensor that takes
    it comes up (torch's waits for torch's import), each held to `threads` threads of its own kernels
    until the stack is closed. Used from one thread: the one that hands out the jobs."""

    def __init__(self, device: str, threads: int) -> None:
        super().__init__()
        self.device, self.threads = device, threads
        self.made: dict[bool, object] = {}  # needs torch -> its Producer

    def for_tensor(self, tensor: TensorPlan):
        if tensor.is_copy:
            return None
        torch_needed = costs.needs_torch(tensor, self.device)
        if torch_needed not in self.made:
            self.made[torch_needed] = compute.producer(torch_needed, self.device)
            self.enter_context(self.made[torch_needed].intra_op_threads(self.threads))
        return self.made[torch_needed]


class _InMemory:
    """The OutputFile a producer writes into when the sink wants the bytes themselves: `out` holds the
    tensor's slots, the first of which starts at file offset `first`. A plain object, not a class made per
    tensor: a class is its own reference cycle, so a closure over `out` would keep every tensor's bytes
    until the cycle collector ran, which on a deep model is rarely."""

    __slots__ = ("out", "first")

    def __init__(self, out: bytearray, first: int) -> None:
        self.out, self.first = out, first

    def write(self, data: memoryview, offset: int) -> None:
        memoryview(self.out)[offset - self.first:offset - self.first + len(data)] = data


class TensorValues:
    """The output tensors' bytes one at a time, on demand, for a sink that pulls them (GGUF: llama.cpp's
    converter asks for each tensor as it writes it): made by the same producers as a safetensors merge,
    so the bytes are the same; `on_progress(bytes)` is told of each. Once the sink says in which order it
    will ask (`expect`), the next tensor is made on a thread of its own while the sink works on the one it
    has (numpy and torch release the GIL), so the merge hides behind the conversion; one tensor at most is
    made ahead. `close` closes the source files, ends the producers' thread limits and drops the adapter rows
    kept for cutting experts."""

    def __init__(self, plan: Plan, on_progress: Callable[[int], None] | None = None, device: str = "cpu") -> None:
        self.sources = SourceFiles()
        self.producers = Producers(device, costs.threads_per_worker(plan.tensors, device, 1, 1))
        self.slots = {t.name: slots for shard in plan.shards for t, slots in zip(shard.tensors, shard.slots)}
        self.on_progress = on_progress
        self.following: dict[str, TensorPlan] = {}
        self.ahead: tuple[str, Future] | None = None
        self.pool: ThreadPoolExecutor | None = None

    def expect(self, order: list[TensorPlan]) -> None:
        """The sink will ask for the tensors in this order: the first is made now, while the sink prepares
        the rest of its file (the converter: the tokenizer's metadata)."""
        self.following = {t.name: nxt for t, nxt in zip(order, order[1:])}
        if order and self.pool is None:
            self.pool = ThreadPoolExecutor(1, thread_name_prefix="lorafuse-ahead")
        if order and self.ahead is None:
            self._make_ahead(order[0])

    def get(self, tensor: TensorPlan) -> bytearray:
        if self.ahead is not None and self.ahead[0] == tensor.name:
            data, self.ahead = self.ahead[1].result(), None
        else:  # asked out of order: made here, and what was made ahead waits for its turn
            data = self._make(tensor, self.producers.for_tensor(tensor))
        nxt = self.following.get(tensor.name)
        if self.ahead is None and nxt is not None:
            self._make_ahead(nxt)
        if self.on_progress:
            self.on_progress(len(data))
        return data

    def _make_ahead(self, tensor: TensorPlan) -> None:
        self.ahead = (tensor.name, self.pool.submit(self._make, tensor, self.producers.for_tensor(tensor)))

    def _make(self, tensor: TensorPlan, producer) -> bytearray:
        slots = self.slots[tensor.name]
        out = bytearray(sum(slot.nbytes for slot in slots))
        first = slots[0].offset
        if tensor.is_copy:
            for slot, ref in zip(slots, tensor.source_refs, strict=True):
                ref.read_into(memoryview(out)[slot.offset - first:slot.offset - first + slot.nbytes])
            return out

        write_tensor(_InMemory(out, first), slots, tensor, self.sources, producer)
        return out

    def close(self) -> None:
        if self.pool is not None:  # a tensor being made ahead is finished first: its sources stay open meanwhile
            self.pool.shutdown(wait=True, cancel_futures=True)
        self.producers.close()
        self.sources.close()
        forget_cut_rows()
