"""Which tensor the workers take next, how many are in flight, the base files they wait for, and the
error that stops them all (`Scheduler`)."""

from __future__ import annotations

import functools
import heapq
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable

from ..plan import ShardPlan
from ..sources.remote import Downloads, RemoteFile


class Scheduler:
    """The run of the tensors still to write, over `depth` worker threads.

    Job i writes tensor `order[i]` = (shard, index of its tensor): `at_once` shards are open at a time
    (see `_tensor_order`), one at a time while base files are downloaded (the network's pace, in the
    order of its files) or when each shard must wait for the previous one (`one_at_a_time`: uploads with
    --low-disk). `downloads` fetches the base files job i reads ahead of it (at most `hold` at once, each
    deleted when its run of jobs is done; see sources.remote).

    The rest of its state is the stop: `failed` holds the first error (a job's, a shard's that failed to
    finish, Ctrl-C); setting it wakes every thread that waits here and aborts the downloads. `unfinished`
    are the shards opened and not handed over yet (finished and reported), which `wait_for_turn` counts.
    """

    def __init__(self, todo: list[ShardPlan], depth: int, *, one_at_a_time: bool = False, hold: int | None = None,
                 before_delete: Callable[[RemoteFile], None] | None = None) -> None:
        downloading = any(t.downloads for s in todo for t in s.tensors)
        at_once = 1 if downloading or one_at_a_time else shards_at_once(depth)
        self.depth = depth
        self.order = _tensor_order(todo, at_once)
        needs = [shard.tensors[i].downloads for shard, i in self.order]
        self.downloads = Downloads(needs, hold, before_delete=before_delete) if downloading else None
        self.failed: list[BaseException] = []
        self.unfinished: set[str] = set()
        self.changed = threading.Condition()  # guards failed and unfinished

    def run(self, job: Callable, jobs: Iterable[tuple]) -> None:
        """Run job(*args) for each of `jobs` (taken in turn from this thread) on `depth` threads; the first
        failure stops the rest. Returns when every job submitted is done; see `raise_failure`."""
        _run_bounded(functools.partial(self._guarded, job), jobs, self.depth, on_failure=self.stop)

    def _guarded(self, job: Callable, *args) -> None:
        try:
            if self.failed:  # a shard failed to finish: stop here, with its error
                raise self.failed[0]
            job(*args)
        except BaseException as e:
            self.stop(e)
            raise

    def stop(self, error: BaseException) -> None:
        """A job failed or the merge was interrupted: wake everything that waits for other jobs."""
        with self.changed:
            self.failed.append(error)
            self.changed.notify_all()
        if self.downloads:
            self.downloads.abort(error)

    def raise_failure(self) -> None:
        if self.failed:
            raise self.failed[0]

    def opened(self, name: str) -> None:
        with self.changed:
            self.unfinished.add(name)

    def handed_over(self, name: str) -> None:
        """Shard `name` is finished and reported (e.g. to the uploader)."""
        with self.changed:
            self.unfinished.discard(name)
            self.changed.notify_all()

    def wait_for_turn(self) -> bool:
        """Wait until at most one shard is unfinished (so at most two are on disk once the next opens);
        False if the merge stopped meanwhile."""
        with self.changed:
            self.changed.wait_for(lambda: self.failed or len(self.unfinished) <= 1)
            return not self.failed

    def inputs_ready(self, job: int) -> None:
        """Block until the base files job `job` reads are downloaded."""
        if self.downloads:
            self.downloads.wait(job)

    def inputs_done(self, job: int) -> None:
        if self.downloads:
            self.downloads.done(job)

    def close(self) -> None:
        if self.downloads:
            self.downloads.close()


def shards_at_once(depth: int) -> int:
    """Output shards to write side by side. A shard's hash is one core's work, and SHA-256 (a merge pushed
    to the Hub) is slower than the merge on many cores: written one after another, the last shard is still
    hashing long after its last byte. One shard per two pipeline threads lets that many hash at once; on
    few cores (depth 2 or 3) one at a time, as the CPU is the limit there anyway."""
    return max(1, depth // 2)


def _tensor_order(shards: list[ShardPlan], at_once: int) -> list[tuple[ShardPlan, int]]:
    """The order in which the workers take the tensors, as (shard, index of its tensor): `at_once` shards
    open at a time, sharing the bytes fairly (each next tensor from the open shard that has been given
    the fewest, a newly opened shard starting level with the one it replaces), so that each shard's
    hash has the same pace to keep; the next shard opens when one is done. Positioned writes make the
    bytes independent of the order."""
    order: list[tuple[ShardPlan, int]] = []
    # (bytes given, counted from a common start; shard's position; next tensor)
    queue: list[tuple[int, int, int]] = [(0, position, 0) for position in range(min(at_once, len(shards)))]
    upcoming = len(queue)  # the next shard to open
    while queue:
        given, position, i = heapq.heappop(queue)
        shard = shards[position]
        order.append((shard, i))
        given += sum(slot.nbytes for slot in shard.slots[i])
        if i + 1 < len(shard.tensors):
            heapq.heappush(queue, (given, position, i + 1))
        elif upcoming < len(shards):
            heapq.heappush(queue, (given, upcoming, 0))
            upcoming += 1
    return order


def _run_bounded(job: Callable, jobs: Iterable[tuple], depth: int,
                 on_failure: Callable[[BaseException], None]) -> None:
    """Run jobs on `depth` threads, submitting only a few ahead so memory stays bounded.
    `on_failure` hears first of an error here (Ctrl-C included), so that jobs waiting on others stop."""
    with ThreadPoolExecutor(depth, thread_name_prefix="lorafuse") as pool:
        pending: deque = deque()
        try:
            for args in jobs:
                if len(pending) >= 2 * depth:
                    pending.popleft().result()
                pending.append(pool.submit(job, *args))
            while pending:
                pending.popleft().result()
        except BaseException as e:
            on_failure(e)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
