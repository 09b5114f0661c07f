"""Carry out a plan: read, patch in fp32, cast and write each tensor at its planned offset.

Every output offset is known from the plan, so tensors are written with positioned writes in any
order by a small pool of threads (file I/O, numpy and torch kernels release the GIL): reading one tensor
overlaps computing and writing another, and at most `plan.depth` tensors are in memory at once,
each in buffers its thread reuses. Untouched tensors are copied file to file inside the kernel
(copy_file_range), never decoded. Written ranges are handed to the disk at once (sync_file_range),
and made durable every FLUSH_BYTES (fdatasync, on a thread of its own), so writing to disk overlaps the
work instead of all waiting for the final fsync. A finished shard is made durable and its hash completed
on a thread of its own while the pipeline goes on. On many cores several shards are written side by
side, so that their hashes (one core each) run at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import heapq
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from . import compute, costs
from .errors import InputError, LorafuseError
from .formats.safetensors import TensorSlot
from .manifest import HASH_CHUNK, Ledger
from .output import create_fd
from .plan import Plan, ShardPlan, TensorPlan, usable_cores
from .quant import QuantizedTensor
from .sources.remote import Downloads
from .units import human_size

COPY_CHUNK = 64 << 20
FLUSH_BYTES = 64 << 20
PARTIAL = ".partial"


@dataclass
class Counters:
    tensors_merged: int = 0
    tensors_cast: int = 0
    tensors_copied: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    shards_resumed: int = 0


class _Files:
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


def write_shards(plan: Plan, folder: Path, device: str, ledger: Ledger,
                 on_progress: Callable[[int], None] | None = None,
                 on_shard_done: Callable[[Path, str], None] | None = None, *,
                 hold: int | None = None, before_shard: Callable[[], None] | None = None) -> Counters:
    """Write the shards of the plan that the ledger does not hold finished into `folder`: several side
    by side on many cores (`shards_at_once`), one at a time while base shards are downloaded or when
    each must wait for the previous one's upload (`before_shard`).

    Each shard is written as `NAME.partial`, and only when its last tensor is in is it fsynced,
    hashed, renamed to NAME and recorded in the ledger (on a thread of its own, while the workers go on):
    a crash at any point leaves finished shards a rerun can trust and partial ones it redoes.
    `on_shard_done(path, sha256)` hears of each finished shard (resumed ones included) as soon as it
    is durable, e.g. to upload it while the rest is merged;
    `before_shard()` is called before a new shard is started (to wait for uploads, with --low-disk).
    Base shards not downloaded yet are fetched ahead of the tensors that read them (at most `hold` at
    once, each deleted when done with, for --low-disk; see sources.remote).
    """
    counters = Counters()
    lock = threading.Lock()
    sources = _Files()
    open_shards: dict[str, _OpenShard] = {}
    finished = {s.filename for s in plan.shards if ledger.finished(s.filename, s.size)}
    todo = [s for s in plan.shards if s.filename not in finished]
    # A base still to download is merged at the network's pace, in the order of its files; --low-disk
    # counts its room for one output shard at a time.
    downloading = any(t.downloads for s in todo for t in s.tensors)
    at_once = 1 if downloading or before_shard else shards_at_once(plan.depth)
    order = _tensor_order(todo, at_once)
    needs = [shard.tensors[i].downloads for shard, i in order]
    downloads = Downloads(needs, hold, before_delete=lambda f: sources.close_file(f.path)) if downloading else None
    producers = {}  # needs torch -> the path's Producer, made when the first tensor that takes it comes up
    threads = costs.threads_per_worker(plan.tensors, device, usable_cores(), plan.depth)
    thread_limits = contextlib.ExitStack()
    handed_over = threading.Condition()  # a shard finished and passed to on_shard_done
    unfinished: set[str] = set()  # shards opened and not handed over yet
    finishing: list[tuple[threading.Thread, _OpenShard]] = []  # shards written, being made durable
    failed: list[BaseException] = []

    def stop(error: BaseException) -> None:
        """A job failed or the merge was interrupted: wake everything that waits for other jobs."""
        with handed_over:
            failed.append(error)
            handed_over.notify_all()
        if downloads:
            downloads.abort(error)

    def job(*args) -> None:
        try:
            if failed:  # a shard failed to finish: stop here, with its error
                raise failed[0]
            merge_tensor(*args)
        except BaseException as e:
            stop(e)
            raise

    def merge_tensor(target: _OpenShard, slots: tuple[TensorSlot, ...], tensor: TensorPlan, index: int,
                     producer) -> None:
        if downloads:
            downloads.wait(index)
        fd = target.fd
        pieces = ()  # copied bytes never pass through memory: the hashing thread reads them back
        if tensor.is_copy:
            with target.writing:
                for slot, ref in zip(slots, tensor.source_refs, strict=True):
                    _copy(sources.fd(ref.path), ref.offset, fd, slot.offset, slot.nbytes)
            kind = "tensors_copied"
        else:
            source_fd = None if isinstance(tensor.source, QuantizedTensor) else sources.fd(tensor.source.path)

            def write(slot: int, offset: int, data: memoryview) -> None:
                with target.writing:
                    _write_bytes(fd, data, slots[slot].offset + offset)
            pieces = producer.output_bytes(tensor, slots, source_fd, write)
            kind = "tensors_merged" if tensor.patches else "tensors_cast"
        written = sum(slot.nbytes for slot in slots)
        _start_writeback(fd, slots[0].offset, written)
        target.flusher.wrote(written)
        with lock:
            setattr(counters, kind, getattr(counters, kind) + 1)
            counters.bytes_read += tensor.source.nbytes
            counters.bytes_written += written
            if on_progress:
                on_progress(written)
        target.hash.completed(slots[0].offset, slots[-1].offset + slots[-1].nbytes, pieces)
        if downloads:
            downloads.done(index)
        with lock:
            target.remaining -= 1
            if target.remaining == 0:
                finisher = threading.Thread(target=finish, args=(target,), name="lorafuse-finish")
                finisher.start()  # if it cannot start, the shard stays open and is cleaned up as such
                open_shards.pop(target.shard.filename)
                finishing.append((finisher, target))

    def finish(target: _OpenShard) -> None:
        """Make a written shard durable and record it; meanwhile the workers go on with the next."""
        try:
            _finish_shard(folder, target, ledger)
            if on_shard_done:
                on_shard_done(folder / target.shard.filename, ledger.shards[target.shard.filename]["sha256"])
        except BaseException as e:
            stop(e)
            return
        with handed_over:
            unfinished.discard(target.shard.filename)
            handed_over.notify_all()

    def jobs():
        """The tensors in `order`, each shard opened when its first tensor comes up."""
        for shard in plan.shards:
            if shard.filename in finished:
                counters.shards_resumed += 1
                if on_shard_done:
                    on_shard_done(folder / shard.filename, ledger.shards[shard.filename]["sha256"])
                if on_progress:
                    on_progress(shard.size - len(shard.header))
        targets = {}
        for index, (shard, i) in enumerate(order):
            if i == 0:
                if before_shard:  # only the previous shard may still be open: at most two on disk
                    with handed_over:
                        handed_over.wait_for(lambda: failed or len(unfinished) <= 1)
                    if failed:
                        return
                    before_shard()
                targets[shard.filename] = open_shard(shard)
            tensor = shard.tensors[i]
            yield targets[shard.filename], shard.slots[i], tensor, index, None if tensor.is_copy else producer_for(tensor)

    def open_shard(shard) -> _OpenShard:
        """Create the shard's partial file, header written and size allocated, with its hash and flusher running."""
        path = folder / (shard.filename + PARTIAL)
        fd = create_fd(path)
        try:
            _write_bytes(fd, memoryview(shard.header), 0)
            _allocate(fd, shard.size)
        except BaseException:  # Ctrl-C included
            os.close(fd)
            raise
        # Registered before its threads start, so that the cleanup below finds them whenever it stops.
        target = _OpenShard(shard, fd, len(shard.tensors), _RunningHash(path, shard.size, len(shard.header)),
                            _Flusher(fd))
        open_shards[shard.filename] = target
        target.hash.start()
        target.flusher.start()
        with handed_over:
            unfinished.add(shard.filename)
        return target

    def producer_for(tensor: TensorPlan):
        """The Producer of the tensor's path, made the first time the path comes up (torch's waits for the import)."""
        torch_needed = costs.needs_torch(tensor, device)
        if torch_needed not in producers:
            producers[torch_needed] = compute.producer(torch_needed, device)
            thread_limits.enter_context(producers[torch_needed].intra_op_threads(threads))
        return producers[torch_needed]

    try:
        with thread_limits:
            _run_bounded(job, jobs(), plan.depth, on_failure=stop)
        for finisher, _ in finishing:
            finisher.join()
        if failed:
            raise failed[0]
    except OSError as e:
        raise disk_error(e, folder) from None
    finally:
        if downloads:
            downloads.close()
        for finisher, target in finishing:  # only an error leaves one running: its digest is not wanted
            target.hash.cancel()
            finisher.join()
        for target in open_shards.values():
            target.hash.cancel()
            target.flusher.stop()
            os.close(target.fd)
        sources.close()
        for partial in folder.glob("*" + PARTIAL):
            partial.unlink()
    return counters


def shards_at_once(depth: int) -> int:
    """Output shards to write side by side. A shard's SHA-256 is one core's work (0.8-1.6 GB/s), slower
    than the merge on many cores: written one after another, the last shard is still hashing long after
    its last byte. One shard per two pipeline threads lets that many hash at once; on few cores (depth 2
    or 3) one at a time, as the CPU is the limit there anyway."""
    return max(1, depth // 2)


def _tensor_order(shards: list[ShardPlan], at_once: int) -> list[tuple[ShardPlan, int]]:
    """The order in which the workers take the tensors, as (shard, index of its tensor): `at_once` shards
    open at a time, sharing the bytes fairly (each next tensor from the open shard that has been given
    the fewest, a newly opened shard starting level with the one it replaces), so that each shard's
    hash has the same pace to keep; the next shard opens when one is done. Positioned writes make the
    bytes independent of the order."""
    order: list[tuple[ShardPlan, int]] = []
    queue: list[tuple[int, int, int]] = []  # (bytes given, counted from a common start; shard's position; next tensor)
    upcoming = iter(range(len(shards)))

    def open_next(level: int) -> None:
        position = next(upcoming, None)
        if position is not None:
            heapq.heappush(queue, (level, position, 0))

    for _ in range(at_once):
        open_next(0)
    while queue:
        given, position, i = heapq.heappop(queue)
        shard = shards[position]
        order.append((shard, i))
        given += sum(slot.nbytes for slot in shard.slots[i])
        if i + 1 < len(shard.tensors):
            heapq.heappush(queue, (given, position, i + 1))
        else:
            open_next(given)
    return order


def _finish_shard(folder: Path, target: "_OpenShard", ledger: Ledger) -> None:
    """Make a complete shard durable under its real name, then record it as finished. A merge that
    stops meanwhile cancels the hash: the shard then keeps its partial name and is redone by a rerun."""
    try:
        flush_error = target.flusher.stop()
        if flush_error:  # the kernel reports a failed writeback once: the final fsync might not see it
            raise flush_error
        os.fsync(target.fd)
    except BaseException:
        target.hash.cancel()
        raise
    finally:
        os.close(target.fd)
    name, digest = target.shard.filename, target.hash.hexdigest()
    os.rename(folder / (name + PARTIAL), folder / name)
    ledger.record(name, target.shard.size, digest)


@dataclass
class _OpenShard:
    shard: object  # ShardPlan
    fd: int
    remaining: int  # tensors still to write
    hash: "_RunningHash"
    flusher: "_Flusher"
    # One writer at a time: the kernel serializes writes to a file anyway (inode lock), and a thread
    # waiting for that lock spins on a core while the holder copies, where one waiting here sleeps.
    writing: threading.Lock = field(default_factory=threading.Lock)


class HashCancelled(Exception):
    """The merge stopped before the shard's hash was complete."""


class _RunningHash:
    """SHA-256 of a file written out of order, computed as the complete prefix grows, so that hashing
    overlaps the merge instead of following it. A writer whose tensor extends the prefix hashes it from
    its own buffer when the hash has caught up; the rest (copies, tensors written ahead of the prefix,
    tensors written while the hash lags) a thread of its own reads back from the page cache. The workers
    never wait for it: SHA-256 is one core's work per file (0.8-1.6 GB/s), slower than the merge on many
    cores."""

    def __init__(self, path: Path, size: int, done_prefix: int) -> None:
        self.size, self.prefix, self.hashed = size, done_prefix, 0
        self.ready: dict[int, int] = {}  # start -> end of written ranges beyond the prefix
        self.digest = hashlib.sha256()
        self.cond = threading.Condition()
        self.cancelled = False
        self.error: BaseException | None = None
        self.path, self.fd = path, -1
        self.thread = threading.Thread(target=self._run, name="lorafuse-hash", daemon=True)

    def start(self) -> "_RunningHash":
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        self.thread.start()
        return self

    def completed(self, start: int, end: int, pieces: Iterable[memoryview] = ()) -> None:
        """[start, end) is written; `pieces` are its bytes when the writer still holds them."""
        if end == start:  # an empty tensor: nothing to hash, and it must not shadow a range at `start`
            return
        with self.cond:
            # Everything before is written and hashed: hash these bytes here, which spares reading them
            # back (0.1 s per GB).
            own = self.prefix == self.hashed == start and sum(len(p) for p in pieces) == end - start
        if own:  # outside the lock: the thread idles until the prefix passes `start`, so the digest is ours
            for piece in pieces:
                self.digest.update(piece)
        with self.cond:
            if own:
                self.hashed = end
            self.ready[start] = end
            while self.prefix in self.ready:
                self.prefix = self.ready.pop(self.prefix)
            self.cond.notify_all()

    def _run(self) -> None:
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        try:
            while True:
                with self.cond:
                    self.cond.notify_all()  # a writer may be waiting for the prefix hashed so far
                    self.cond.wait_for(lambda: self.cancelled or self.prefix > self.hashed or self.hashed == self.size)
                    if self.cancelled or self.hashed == self.size:
                        return
                    upto = self.prefix
                while self.hashed < upto:
                    n = os.preadv(self.fd, [view[: min(HASH_CHUNK, upto - self.hashed)]], self.hashed)
                    if n <= 0:
                        raise OSError(errno.EIO, "short read while hashing a written shard")
                    self.digest.update(view[:n])
                    self.hashed += n
        except BaseException as e:  # handed to the thread that asks for the digest
            with self.cond:
                self.error = e
                self.cond.notify_all()
        finally:
            os.close(self.fd)

    def hexdigest(self) -> str:
        self.thread.join()
        if self.error is not None:
            raise self.error
        if self.cancelled:
            raise HashCancelled()
        return self.digest.hexdigest()

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify()
        _join_if_started(self.thread)


class _Flusher:
    """fdatasync an output shard after every FLUSH_BYTES written to it, on a thread of its own, so the
    disk makes the data durable while the merge goes on instead of all of it at the final fsync (on a
    virtual disk that flush is the host writing out its cache: 0.8-1.2 s per GB when left to the end).
    The workers never wait for it; flushes that take longer than FLUSH_BYTES takes to write merge into one."""

    def __init__(self, fd: int) -> None:
        self.fd, self.unflushed, self.stopped = fd, 0, False
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="lorafuse-flush", daemon=True)

    def start(self) -> "_Flusher":
        self.thread.start()
        return self

    def wrote(self, nbytes: int) -> None:
        """Count bytes written; a flush that failed fails the writer (the merge stops at once)."""
        if self.error is not None:
            raise self.error
        with self.cond:
            self.unflushed += nbytes
            if self.unflushed >= FLUSH_BYTES:
                self.cond.notify()

    def _run(self) -> None:
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.stopped or self.unflushed >= FLUSH_BYTES)
                if self.stopped:
                    return
                self.unflushed = 0
            try:
                _datasync(self.fd)
            except BaseException as e:
                self.error = e
                return

    def stop(self) -> BaseException | None:
        """Stop flushing; the error of a failed flush, if one failed."""
        with self.cond:
            self.stopped = True
            self.cond.notify()
        _join_if_started(self.thread)
        return self.error


def _join_if_started(thread: threading.Thread) -> None:
    """A merge stopped (Ctrl-C) between registering a shard and starting its threads leaves some unstarted."""
    if thread.ident is not None:
        thread.join()


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


def _write_bytes(fd: int, data: memoryview, offset: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], offset + done)


def _copy(src: int, src_offset: int, dst: int, dst_offset: int, count: int) -> None:
    """Copy bytes between files inside the kernel; fall back to chunked pread/pwrite where unsupported."""
    done = 0
    try:
        while done < count:
            n = os.copy_file_range(src, dst, count - done, src_offset + done, dst_offset + done)
            if n == 0:
                raise InputError("a base file is shorter than its header says (truncated?); re-download it")
            done += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            raise
    while done < count:
        chunk = os.pread(src, min(COPY_CHUNK, count - done), src_offset + done)
        if not chunk:
            raise InputError("a base file is shorter than its header says (truncated?); re-download it")
        _write_bytes(dst, memoryview(chunk), dst_offset + done)
        done += len(chunk)


def _libc(name: str, *argtypes):
    """A libc function (Linux), or None where there is none."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (AttributeError, OSError):
        return None
    fn.argtypes = list(argtypes)
    return fn


_SYNC_FILE_RANGE = _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages in the range, do not wait
_FALLOCATE = _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _allocate(fd: int, size: int) -> None:
    """Give the file its full size, its blocks allocated at once where the file system can (fallocate):
    the workers write tensors out of order, and blocks allocated as each range is flushed would not lie
    in file order. Elsewhere a sparse file (never posix_fallocate, which would write zeros)."""
    if _FALLOCATE is not None and size and _FALLOCATE(fd, 0, 0, size) == 0:
        return
    if _FALLOCATE is not None and size and ctypes.get_errno() == errno.ENOSPC:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    os.ftruncate(fd, size)


_datasync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a finished range to disk now (Linux); elsewhere the final fsync does it all."""
    if _SYNC_FILE_RANGE is not None and nbytes:
        _SYNC_FILE_RANGE(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


def disk_error(e: OSError, folder: Path) -> LorafuseError:
    """An OS error while writing the output folder's staging copy, as a user-facing message."""
    if e.errno == errno.ENOSPC:
        kept = sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and not p.name.endswith(PARTIAL)) \
            if folder.is_dir() else 0
        return LorafuseError(f"the disk holding {folder.parent} is full; free space and run the same command again"
                             + (f": it goes on from the {human_size(kept)} finished in {folder}" if kept else ""))
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LorafuseError(f"cannot write to {folder.parent}: {e.strerror}; choose another output folder")
    return LorafuseError(f"I/O error while writing the output: {e.strerror or e}")
