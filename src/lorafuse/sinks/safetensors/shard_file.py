"""One output shard being written, from its partial name to its ledger record (`ShardFile`).

Tensors are written with positioned writes in any order by several threads; untouched ones are copied
file to file inside the kernel (copy_file_range), never decoded. Written ranges are handed to the disk at
once (sync_file_range) and made durable every FLUSH_BYTES (fdatasync, on a thread of its own: `_Flusher`),
so writing to disk overlaps the work instead of all waiting for the final fsync. The file's hash (the
run's algorithm: manifest.run_hash) grows with its complete prefix (`_RunningHash`), from the writer's
own buffer where it can. Crash safety: the file is NAME.partial until finished, fsynced before it is
renamed to NAME, and recorded in the ledger only after the rename; a crash at any point leaves finished
shards a rerun can trust and partial ones it redoes.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from ...errors import InputError
from ...formats.folder import create_fd
from ...manifest import HASH_CHUNK, HASHES, Ledger
from ...output import PARTIAL
from ...plan import ShardPlan

COPY_CHUNK = 64 << 20
FLUSH_BYTES = 64 << 20


def partial_path(folder: Path, name: str) -> Path:
    return folder / (name + PARTIAL)


@dataclass
class ShardFile:
    """An output shard's file while it is written: its descriptor, the tensors still to come, its running
    hash and its flusher. `create` makes it (partial name, header written, size allocated), `start` starts
    its threads, `write`/`copy_in` fill it from any thread, `wrote` counts each tensor in, `finish` makes it
    durable under its real name and records it, `cancel` stops it where it is."""

    shard: ShardPlan
    fd: int
    remaining: int  # tensors still to write
    hash: _RunningHash
    flusher: _Flusher
    # One writer at a time: the kernel serializes writes to a file anyway (inode lock), and a thread
    # waiting for that lock spins on a core while the holder copies, where one waiting here sleeps.
    writing: threading.Lock = field(default_factory=threading.Lock)
    counting: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, folder: Path, shard: ShardPlan, algorithm: str) -> ShardFile:
        """The shard's partial file, header written and size allocated, to be hashed by `algorithm` (a key of
        manifest.HASHES); its threads not started yet."""
        path = partial_path(folder, shard.filename)
        fd = create_fd(path)
        try:
            _write_bytes(fd, memoryview(shard.header), 0)
            _allocate(fd, shard.size)
        except BaseException:  # Ctrl-C included
            os.close(fd)
            raise
        return cls(shard, fd, len(shard.tensors), _RunningHash(path, shard.size, len(shard.header), algorithm),
                   _Flusher(fd))

    def start(self) -> ShardFile:
        self.hash.start()
        self.flusher.start()
        return self

    def write(self, data: memoryview, offset: int) -> None:
        with self.writing:
            _write_bytes(self.fd, data, offset)

    def copy_in(self, ranges: Iterable[tuple[int, int, int, int]]) -> None:
        """Copy (source fd, source offset, offset, size) ranges into the file; the bytes never pass through
        memory (the hashing thread reads them back)."""
        with self.writing:
            for source, source_offset, offset, nbytes in ranges:
                _copy(source, source_offset, self.fd, offset, nbytes)

    def wrote(self, start: int, end: int, pieces: Iterable[memoryview] = ()) -> bool:
        """A tensor's bytes [start, end) are in (`pieces`: the writer's own copy of them, hashed from there
        when they extend the hashed prefix): start their writeback, count them for the flusher and the
        hash. True for the last tensor: the file is then ready to `finish`."""
        _start_writeback(self.fd, start, end - start)
        self.flusher.wrote(end - start)
        self.hash.completed(start, end, pieces)
        with self.counting:
            self.remaining -= 1
            return self.remaining == 0

    def finish(self, folder: Path, ledger: Ledger | None) -> str:
        """Make the complete shard durable under its real name, then record it as finished; its hex digest.
        A merge that stops meanwhile cancels the hash: the shard then keeps its partial name and is redone
        by a rerun."""
        try:
            flush_error = self.flusher.stop()
            if flush_error:  # the kernel reports a failed writeback once: the final fsync might not see it
                raise flush_error
            os.fsync(self.fd)
        except BaseException:
            self.hash.cancel()
            raise
        finally:
            os.close(self.fd)
        name, digest = self.shard.filename, self.hash.hexdigest()
        os.rename(partial_path(folder, name), folder / name)
        if ledger is not None:
            ledger.record(name, self.shard.size, self.hash.algorithm, digest)
        return digest

    def cancel(self) -> None:
        """Stop hashing and flushing and close the file (the merge stopped): it keeps its partial name."""
        self.hash.cancel()
        self.flusher.stop()
        os.close(self.fd)

    def cancel_finish(self) -> None:
        """Make a `finish` under way on another thread fail (HashCancelled) instead of renaming and
        recording the file; that thread closes it."""
        self.hash.cancel()


def remove_partials(folder: Path) -> None:
    """Delete every unfinished shard in `folder` (none is open any more)."""
    for partial in folder.glob("*" + PARTIAL):
        partial.unlink()


class HashCancelled(Exception):
    """The merge stopped before the shard's hash was complete."""


class _RunningHash:
    """The hash (`algorithm`, a key of manifest.HASHES) of a file written out of order, computed as the
    complete prefix grows, so that hashing overlaps the merge instead of following it. A writer whose
    tensor extends the prefix hashes it from its own buffer when the hash has caught up; the rest (copies,
    tensors written ahead of the prefix, tensors written while the hash lags) a thread of its own reads
    back from the page cache. The workers never wait for it: SHA-256 (a merge pushed to the Hub) is one
    core's work per file, slower than the merge on many cores."""

    def __init__(self, path: Path, size: int, done_prefix: int, algorithm: str) -> None:
        self.size, self.prefix, self.hashed = size, done_prefix, 0
        self.ready: dict[int, int] = {}  # start -> end of written ranges beyond the prefix
        self.algorithm, self.digest = algorithm, HASHES[algorithm]()
        self.cond = threading.Condition()
        self.cancelled = False
        self.error: BaseException | None = None
        self.path, self.fd = path, -1
        self.thread = threading.Thread(target=self._run, name="lorafuse-hash", daemon=True)

    def start(self) -> _RunningHash:
        self.fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        self.thread.start()
        return self

    def completed(self, start: int, end: int, pieces: Iterable[memoryview] = ()) -> None:
        """[start, end) is written; `pieces` are its bytes when the writer still holds them."""
        if end == start:  # an empty tensor: nothing to hash, and it must not shadow a range at `start`
            return
        with self.cond:
            # Everything before is written and hashed: hash these bytes here, which spares reading them
            # back from the page cache (CPU time for every byte).
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
        buf = bytearray(max(1, min(HASH_CHUNK, self.size)))  # no larger than the file: see manifest.file_digest
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
    virtual disk that flush is the host writing out its cache, which the final fsync would otherwise wait
    for whole).
    The workers never wait for it; flushes that take longer than FLUSH_BYTES takes to write merge into one."""

    def __init__(self, fd: int) -> None:
        self.fd, self.unflushed, self.stopped = fd, 0, False
        self.error: BaseException | None = None
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="lorafuse-flush", daemon=True)

    def start(self) -> _Flusher:
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
