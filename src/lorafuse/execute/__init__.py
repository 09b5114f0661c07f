"""Carry out a plan: read, patch in fp32, cast and write each tensor at its planned offset.

Every output offset is known from the plan, so tensors are written with positioned writes in any
order by a small pool of threads (file I/O, numpy and torch kernels release the GIL): reading one tensor
overlaps computing and writing another, and at most `plan.depth` tensors are in memory at once,
each in buffers its thread reuses. On many cores several shards are written side by side, so that their
hashes (one core each) run at once. A finished shard is made durable and its hash completed on a thread
of its own while the pipeline goes on.

- scheduler.py: the order of the tensors, the bounded pool, the downloads, the stop on failure;
- work.py: one tensor's work (copy, or produce and write) and what the workers share for it;
- here: `write_shards`, the loop that ties them to the output files of a sink (lorafuse.sinks), which
  owns every byte written and the crash safety of each file.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .. import costs
from ..patches import forget_cut_rows
from ..manifest import HUB_HASH, Ledger
from ..output import disk_error
from ..plan import Plan, ShardPlan, usable_cores
from .scheduler import Scheduler
from .work import Counters, Producers, Progress, SourceFiles, write_tensor

if TYPE_CHECKING:
    from ..sinks import OutputFile, Sink

__all__ = ["Counters", "write_shards"]


def write_shards(plan: Plan, folder: Path, device: str, ledger: Ledger,
                 on_progress: Callable[[int], None] | None = None,
                 on_shard_done: Callable[[Path, str | None], None] | None = None, *, sink: Sink, algorithm: str,
                 hold: int | None = None, before_shard: Callable[[], None] | None = None) -> Counters:
    """Write the shards of the plan that the ledger does not hold finished into `folder`, as `sink`'s
    files: several side by side on many cores, one at a time while base shards are downloaded or when
    each must wait for the previous one's upload (`before_shard`).

    Each file is finished (made durable under its real name and recorded in the ledger) on a thread of its
    own once its last tensor is in, while the workers go on; a crash at any point leaves finished shards
    a rerun can trust and partial ones it redoes. Each file is hashed by `algorithm` as it is written (the
    run's: manifest.run_hash). `on_shard_done(path, sha256)` hears of each finished shard (resumed ones
    included) as soon as it is durable, e.g. to upload it while the rest is merged, with its SHA-256 when
    it was hashed by that (else None: the Hub's client hashes it itself, for a shard a run not pushed left);
    `before_shard()` is called before a new shard is started (to wait for uploads, with --low-disk).
    Base shards not downloaded yet are fetched ahead of the tensors that read them (at most `hold` at
    once, each deleted when done with, for --low-disk; see sources.remote).
    """
    finished = {s.filename for s in plan.shards if ledger.finished(s.filename, s.size)}
    sources = SourceFiles()
    scheduler = Scheduler([s for s in plan.shards if s.filename not in finished], plan.depth,
                          one_at_a_time=before_shard is not None, hold=hold,
                          before_delete=lambda f: sources.close_file(f.path))
    files = _Files(sink, folder, ledger, scheduler, on_shard_done, algorithm)
    producers = Producers(device, costs.threads_per_worker(plan.tensors, device, usable_cores(), plan.depth))
    pipeline = _Pipeline(plan, scheduler, files, sources, producers, Progress(on_progress), before_shard)
    try:
        with producers:
            scheduler.run(pipeline.job, pipeline.jobs(finished))
        files.wait()
        scheduler.raise_failure()
    except OSError as e:
        raise disk_error(e, folder) from None
    finally:
        scheduler.close()
        files.close()
        sources.close()
        sink.clean(folder)
        forget_cut_rows()
    return pipeline.progress.counters


class _Pipeline:
    """The jobs of one run (handed out in the scheduler's order) and what each does."""

    def __init__(self, plan: Plan, scheduler: Scheduler, files: _Files, sources: SourceFiles, producers: Producers,
                 progress: Progress, before_shard: Callable[[], None] | None) -> None:
        self.plan, self.scheduler, self.files, self.sources = plan, scheduler, files, sources
        self.producers, self.progress, self.before_shard = producers, progress, before_shard

    def jobs(self, finished: set[str]):
        """Report the shards finished before, then yield the arguments of `job` for each tensor in the
        scheduler's order, each shard's file opened when its first tensor comes up."""
        for shard in self.plan.shards:
            if shard.filename in finished:
                self.progress.resumed(shard)
                self.files.report(shard.filename)
        targets: dict[str, OutputFile] = {}
        for index, (shard, i) in enumerate(self.scheduler.order):
            if i == 0:
                if self.before_shard:  # only the previous shard may still be open: at most two on disk
                    if not self.scheduler.wait_for_turn():
                        return
                    self.before_shard()
                targets[shard.filename] = self.files.open(shard)
            tensor = shard.tensors[i]
            yield targets[shard.filename], shard.slots[i], tensor, index, self.producers.for_tensor(tensor)

    def job(self, target: OutputFile, slots, tensor, index: int, producer) -> None:
        """Write one tensor (on a worker thread); the file's last one starts its finish."""
        self.scheduler.inputs_ready(index)
        kind, pieces = write_tensor(target, slots, tensor, self.sources, producer)
        start, end = slots[0].offset, slots[-1].offset + slots[-1].nbytes
        last = target.wrote(start, end, pieces)
        self.progress.tensor(kind, tensor.source.nbytes, end - start)
        self.scheduler.inputs_done(index)
        if last:
            self.files.finish(target)


class _Files:
    """The sink's files of one run: `open` ones being written, `finishing` ones being made durable, each
    on a thread of its own; `close` stops whatever a failure left in either."""

    def __init__(self, sink: Sink, folder: Path, ledger: Ledger, scheduler: Scheduler,
                 on_shard_done: Callable[[Path, str | None], None] | None, algorithm: str) -> None:
        self.sink, self.folder, self.ledger, self.scheduler = sink, folder, ledger, scheduler
        self.on_shard_done, self.algorithm = on_shard_done, algorithm
        self.open_files: dict[str, OutputFile] = {}
        self.finishing: list[tuple[threading.Thread, OutputFile]] = []
        self.lock = threading.Lock()

    def open(self, shard: ShardPlan) -> OutputFile:
        target = self.sink.open(self.folder, shard, self.algorithm)
        with self.lock:  # registered before its threads start, so that `close` finds them whenever it stops
            self.open_files[shard.filename] = target
        target.start()
        self.scheduler.opened(shard.filename)
        return target

    def finish(self, target: OutputFile) -> None:
        """Finish a written file on a thread of its own; meanwhile the workers go on with the next."""
        with self.lock:
            finisher = threading.Thread(target=self._finish, args=(target,), name="lorafuse-finish")
            finisher.start()  # if it cannot start, the file stays open and is cleaned up as such
            self.open_files.pop(target.shard.filename)
            self.finishing.append((finisher, target))

    def _finish(self, target: OutputFile) -> None:
        try:
            _finish_shard(self.folder, target, self.ledger)
            self.report(target.shard.filename)
        except BaseException as e:
            self.scheduler.stop(e)
            return
        self.scheduler.handed_over(target.shard.filename)

    def report(self, name: str) -> None:
        if self.on_shard_done:
            self.on_shard_done(self.folder / name, self.ledger.shards[name].get(HUB_HASH))

    def wait(self) -> None:
        for finisher, _ in self.finishing:
            finisher.join()

    def close(self) -> None:
        for finisher, target in self.finishing:  # only an error leaves one running: its digest is not wanted
            target.cancel_finish()
            finisher.join()
        for target in self.open_files.values():
            target.cancel()


def _finish_shard(folder: Path, target: OutputFile, ledger: Ledger) -> None:
    """Make a written file durable under its real name and record it in the ledger (on its finishing
    thread). One name for the step, where tests and benchmarks hook in (a crash right after it, timing)."""
    target.finish(folder, ledger)
