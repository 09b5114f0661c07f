"""Carry out a plan: read, patch in fp32, cast and write each tensor at its planned offset.

Every output offset is known from the plan, so tensors are written with positioned writes in any
order by a small pool of threads (file I/O and torch kernels release the GIL): reading one tensor
overlaps computing and writing another, and at most PIPELINE_DEPTH tensors are in memory at once,
each in buffers its thread reuses. Untouched tensors are copied file to file inside the kernel
(copy_file_range), never decoded. Written ranges are handed to the disk at once (sync_file_range),
so writeback overlaps the work instead of all waiting for the final fsync.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import math
import os
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .errors import LorafuseError
from .formats.safetensors import TensorSlot, dtype_size, read_exact, torch_dtype
from .manifest import HASH_CHUNK, Ledger
from .plan import PIPELINE_DEPTH, Plan, TensorPlan
from .quant import QuantizedTensor, bnb
from .sources.remote import Downloads

COPY_CHUNK = 64 << 20
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


class _Buffers(threading.local):
    """One thread's reusable byte buffers, grown to the largest tensor it has handled.

    Reusing them avoids allocating (and page-faulting in) fresh memory for every tensor, and keeps the
    process's resident memory at a few largest tensors however many tensors pass through.
    """

    def __init__(self) -> None:
        self.pool: dict[str, torch.Tensor] = {}

    def get(self, role: str, nbytes: int) -> torch.Tensor:
        buf = self.pool.get(role)
        if buf is None or buf.numel() < nbytes:
            self.pool[role] = buf = torch.empty(nbytes, dtype=torch.uint8)
        return buf[:nbytes]


def write_shards(plan: Plan, folder: Path, device: torch.device, ledger: Ledger,
                 on_progress: Callable[[int], None] | None = None,
                 on_shard_done: Callable[[Path, str], None] | None = None, *,
                 hold: int | None = None, before_shard: Callable[[], None] | None = None) -> Counters:
    """Write the shards of the plan that the ledger does not hold finished into `folder`.

    Each shard is written as `NAME.partial`, and only when its last tensor is in is it fsynced,
    renamed to NAME, hashed and recorded in the ledger: a crash at any point leaves finished shards
    a rerun can trust and partial ones it redoes. `on_shard_done(path, sha256)` hears of each finished
    shard (resumed ones included) as soon as it is durable, e.g. to upload it while the rest is merged;
    `before_shard()` is called before a new shard is started (to wait for uploads, with --low-disk).
    Base shards not downloaded yet are fetched ahead of the tensors that read them (at most `hold` at
    once, each deleted when done with, for --low-disk; see sources.remote).
    """
    counters = Counters()
    lock = threading.Lock()
    sources = _Files()
    buffers = _Buffers()
    open_shards: dict[str, _OpenShard] = {}
    finished = {s.filename for s in plan.shards if ledger.finished(s.filename, s.size)}
    needs = [t.downloads for s in plan.shards if s.filename not in finished for t in s.tensors]
    downloads = Downloads(needs, hold, before_delete=lambda f: sources.close_file(f.path)) if any(needs) else None

    def job(target: _OpenShard, slots: tuple[TensorSlot, ...], tensor: TensorPlan, index: int) -> None:
        if downloads:
            downloads.wait(index)
        fd = target.fd
        if tensor.is_copy:
            for slot, ref in zip(slots, tensor.source_refs, strict=True):
                _copy(sources.fd(ref.path), ref.offset, fd, slot.offset, slot.nbytes)
            kind = "tensors_copied"
        else:
            if isinstance(tensor.source, QuantizedTensor):
                value = tensor.source.dequantize()
            else:
                raw = buffers.get("in", tensor.source.nbytes)
                read_exact(sources.fd(tensor.source.path), memoryview(raw.numpy()), tensor.source.offset, tensor.source.path)
                value = raw.view(torch_dtype(tensor.source.dtype)).view(tensor.source.shape)
            out = _produce(tensor, value, buffers, device)
            pieces = _nf4_pieces(tensor, out, slots) if tensor.to_nf4 else [out]
            for slot, piece in zip(slots, pieces, strict=True):
                _write_bytes(fd, memoryview(piece.reshape(-1).view(torch.uint8).numpy()), slot.offset)
            kind = "tensors_merged" if tensor.patches else "tensors_cast"
        written = sum(slot.nbytes for slot in slots)
        _start_writeback(fd, slots[0].offset, written)
        with lock:
            setattr(counters, kind, getattr(counters, kind) + 1)
            counters.bytes_read += tensor.source.nbytes
            counters.bytes_written += written
            if on_progress:
                on_progress(written)
        target.hash.completed(slots[0].offset, slots[-1].offset + slots[-1].nbytes)
        if downloads:
            downloads.done(index)
        with lock:
            target.remaining -= 1
            last = target.remaining == 0
        if last:
            _finish_shard(folder, open_shards.pop(target.shard.filename), ledger)
            if on_shard_done:
                on_shard_done(folder / target.shard.filename, ledger.shards[target.shard.filename]["sha256"])

    def jobs():
        """Shard by shard, each opened only when the pipeline reaches it."""
        index = 0
        for shard in plan.shards:
            if shard.filename in finished:
                counters.shards_resumed += 1
                if on_shard_done:
                    on_shard_done(folder / shard.filename, ledger.shards[shard.filename]["sha256"])
                if on_progress:
                    on_progress(shard.size - len(shard.header))
                continue
            if before_shard:
                before_shard()
            path = folder / (shard.filename + PARTIAL)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _write_bytes(fd, memoryview(shard.header), 0)
                os.ftruncate(fd, shard.size)
            except OSError:
                os.close(fd)
                raise
            target = _OpenShard(shard, fd, len(shard.tensors), _RunningHash(path, shard.size, len(shard.header)))
            open_shards[shard.filename] = target
            for slots, tensor in zip(shard.slots, shard.tensors):
                yield target, slots, tensor, index
                index += 1

    try:
        with _intra_op_threads(max(1, (os.cpu_count() or 1) // PIPELINE_DEPTH)):
            _run_bounded(job, jobs())
    except OSError as e:
        raise disk_error(e, folder) from None
    finally:
        if downloads:
            downloads.close()
        for target in open_shards.values():
            target.hash.cancel()
            os.close(target.fd)
        sources.close()
        for partial in folder.glob("*" + PARTIAL):
            partial.unlink()
    return counters


def _finish_shard(folder: Path, target: "_OpenShard", ledger: Ledger) -> None:
    """Make a complete shard durable under its real name, then record it as finished."""
    try:
        os.fsync(target.fd)
    finally:
        os.close(target.fd)
    name = target.shard.filename
    os.rename(folder / (name + PARTIAL), folder / name)
    ledger.record(name, target.shard.size, target.hash.hexdigest())


@dataclass
class _OpenShard:
    shard: object  # ShardPlan
    fd: int
    remaining: int  # tensors still to write
    hash: "_RunningHash"


class _RunningHash:
    """SHA-256 of a file written out of order, computed on a thread of its own as the complete prefix
    grows (read back from the page cache), so that hashing overlaps the merge instead of following it."""

    def __init__(self, path: Path, size: int, done_prefix: int) -> None:
        self.size, self.prefix, self.hashed = size, done_prefix, 0
        self.ready: dict[int, int] = {}  # start -> end of written ranges beyond the prefix
        self.digest = hashlib.sha256()
        self.cond = threading.Condition()
        self.cancelled = False
        self.error: BaseException | None = None
        self.fd = os.open(path, os.O_RDONLY)
        self.thread = threading.Thread(target=self._run, name="lorafuse-hash", daemon=True)
        self.thread.start()

    def completed(self, start: int, end: int) -> None:
        if end == start:  # an empty tensor: nothing to hash, and it must not shadow a range at `start`
            return
        with self.cond:
            self.ready[start] = end
            while self.prefix in self.ready:
                self.prefix = self.ready.pop(self.prefix)
            self.cond.notify()

    def _run(self) -> None:
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        try:
            while self.hashed < self.size:
                with self.cond:
                    self.cond.wait_for(lambda: self.cancelled or self.prefix > self.hashed)
                    if self.cancelled:
                        return
                    upto = self.prefix
                while self.hashed < upto:
                    n = os.preadv(self.fd, [view[: min(HASH_CHUNK, upto - self.hashed)]], self.hashed)
                    if n <= 0:
                        raise OSError(errno.EIO, "short read while hashing a written shard")
                    self.digest.update(view[:n])
                    self.hashed += n
        except BaseException as e:  # handed to the thread that asks for the digest
            self.error = e
        finally:
            os.close(self.fd)

    def hexdigest(self) -> str:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.digest.hexdigest()

    def cancel(self) -> None:
        with self.cond:
            self.cancelled = True
            self.cond.notify()
        self.thread.join()


@contextlib.contextmanager
def _intra_op_threads(n: int):
    """Give each pipeline thread its share of the cores: more torch threads than cores makes their
    OpenMP teams spin against each other (measured: 2 workers x 2 threads on 2 cores is slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_bounded(job: Callable, jobs: Iterable[tuple]) -> None:
    """Run jobs on PIPELINE_DEPTH threads, submitting only a few ahead so memory stays bounded."""
    with ThreadPoolExecutor(PIPELINE_DEPTH, thread_name_prefix="lorafuse") as pool:
        pending: deque = deque()
        try:
            for args in jobs:
                if len(pending) >= 2 * PIPELINE_DEPTH:
                    pending.popleft().result()
                pending.append(pool.submit(job, *args))
            while pending:
                pending.popleft().result()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise


def _produce(tensor: TensorPlan, source: torch.Tensor, buffers: _Buffers, device: torch.device) -> torch.Tensor:
    """One tensor's output value: the base value patched in fp32 and rounded once to the output dtype."""
    out_dtype = torch_dtype(tensor.dtype)
    value = source
    if tensor.patches:
        if device.type == "cpu" and source.dtype != torch.float32:  # fp32 sources are patched in place
            value = buffers.get("fp32", source.numel() * 4).view(torch.float32).view(source.shape).copy_(source)
        else:
            value = source.to(device=device, dtype=torch.float32)
        for patch in tensor.patches:
            value = patch.apply(value)
        if not all_finite(value):
            origins = ", ".join(o for p in tensor.patches for o in p.origins)
            raise LorafuseError(f"merging {tensor.name} gives NaN or Inf values; the adapter tensors ({origins}) are broken")
    if value.dtype == out_dtype and value.device.type == "cpu":
        out = value
    else:
        # Once the value lives in the fp32 buffer the read buffer is free: the result goes there, and a
        # thread holds two tensor-sized buffers, not three.
        role = "in" if value.data_ptr() != source.data_ptr() and source.device.type == "cpu" else "out"
        nbytes = value.numel() * dtype_size(tensor.dtype)
        out = buffers.get(role, nbytes).view(out_dtype).view(value.shape).copy_(value)
    if out_dtype == torch.float16 and not all_finite(out) and all_finite(value):
        raise LorafuseError(f"{tensor.name} overflows {tensor.dtype} (values up to {value.abs().max().item():.3g}); use --dtype bf16 or fp32")
    return out


def _nf4_pieces(tensor: TensorPlan, value: torch.Tensor, slots: tuple[TensorSlot, ...]) -> list[torch.Tensor]:
    """The merged 16-bit weight quantized as bitsandbytes does, in the order of its planned slots."""
    parts = bnb.quantize_4bit(value)
    pieces = [parts[slot.name[len(tensor.name):]] for slot in slots]
    pieces[-1] = bnb.pad_quant_state(pieces[-1], slots[-1].nbytes)
    return pieces


def all_finite(t: torch.Tensor) -> bool:
    """A NaN or Inf anywhere makes the fp32 sum non-finite: one fast reduction instead of a mask.
    Only a sum that overflows from finite values (beyond 3e38) takes the exact path."""
    if not t.is_floating_point():
        return True
    total = t.sum(dtype=torch.float32).item()
    return math.isfinite(total) or bool(torch.isfinite(t).all())


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
                raise LorafuseError("a base file is shorter than its header says (truncated?); re-download it")
            done += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF):
            raise
    while done < count:
        chunk = os.pread(src, min(COPY_CHUNK, count - done), src_offset + done)
        if not chunk:
            raise LorafuseError("a base file is shorter than its header says (truncated?); re-download it")
        _write_bytes(dst, memoryview(chunk), dst_offset + done)
        done += len(chunk)


def _libc_sync_file_range():
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_FILE_RANGE = _libc_sync_file_range()
SYNC_FILE_RANGE_WRITE = 2  # start writeback of dirty pages in the range, do not wait


def _start_writeback(fd: int, offset: int, nbytes: int) -> None:
    """Start writing a finished range to disk now (Linux); elsewhere the final fsync does it all."""
    if _SYNC_FILE_RANGE is not None and nbytes:
        _SYNC_FILE_RANGE(fd, offset, nbytes, SYNC_FILE_RANGE_WRITE)


def disk_error(e: OSError, folder: Path) -> LorafuseError:
    """An OS error while writing the output folder's staging copy, as a user-facing message."""
    if e.errno == errno.ENOSPC:
        return LorafuseError(f"the disk holding {folder.parent} is full; free space and run the same command again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LorafuseError(f"cannot write to {folder.parent}: {e.strerror}; choose another output folder")
    return LorafuseError(f"I/O error while writing the output: {e.strerror or e}")
