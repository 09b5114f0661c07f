"""Carry out a plan: read, patch in fp32, cast and write each tensor at its planned offset.

Every output offset is known from the plan, so tensors are written with positioned writes in any
order by a small pool of threads (file I/O and torch kernels release the GIL): reading one tensor
overlaps computing and writing another, and at most PIPELINE_DEPTH tensors are in memory at once.
Untouched tensors are copied file to file inside the kernel (copy_file_range), never decoded.
"""

from __future__ import annotations

import errno
import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Callable

import torch

from .errors import LorafuseError
from .formats.safetensors import TensorSlot, torch_dtype
from .plan import PIPELINE_DEPTH, Plan, TensorPlan

COPY_CHUNK = 64 << 20


@dataclass
class Counters:
    tensors_merged: int = 0
    tensors_cast: int = 0
    tensors_copied: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class _Files:
    """Read-only descriptors of the source files, opened once and shared by the workers."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)


def write_shards(plan: Plan, folder: Path, device: torch.device, on_progress: Callable[[int], None] | None = None) -> Counters:
    """Write every shard of the plan into `folder`; returns what was done."""
    counters = Counters()
    lock = Lock()
    sources = _Files()
    outputs = []

    def job(fd: int, slot: TensorSlot, tensor: TensorPlan) -> None:
        if tensor.is_copy:
            _copy(sources.fd(tensor.source.path), tensor.source.offset, fd, slot.offset, slot.nbytes)
            kind = "tensors_copied"
        else:
            _write(fd, _produce(tensor, device), slot.offset)
            kind = "tensors_merged" if tensor.patches else "tensors_cast"
        with lock:
            setattr(counters, kind, getattr(counters, kind) + 1)
            counters.bytes_read += tensor.source.nbytes
            counters.bytes_written += slot.nbytes
        if on_progress:
            on_progress(slot.nbytes)

    try:
        jobs = []
        for shard in plan.shards:
            fd = os.open(folder / shard.filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            outputs.append(fd)
            _write_bytes(fd, memoryview(shard.header), 0)
            os.ftruncate(fd, shard.size)
            jobs.extend((fd, slot, tensor) for slot, tensor in zip(shard.slots, shard.tensors))
        _run_bounded(job, jobs)
        for fd in outputs:
            os.fsync(fd)
    except OSError as e:
        raise _disk_error(e, folder) from None
    finally:
        for fd in outputs:
            os.close(fd)
        sources.close()
    return counters


def _run_bounded(job: Callable, jobs: list[tuple]) -> None:
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


def _produce(tensor: TensorPlan, device: torch.device) -> torch.Tensor:
    """The output value of one tensor: base read, patched in fp32, rounded once to the output dtype."""
    value = tensor.source.read()
    out_dtype = torch_dtype(tensor.dtype)
    if tensor.patches:
        value = value.to(device=device, dtype=torch.float32)
        for patch in tensor.patches:
            value = patch.apply(value)
        if not _all_finite(value):
            origins = ", ".join(o for p in tensor.patches for o in p.origins)
            raise LorafuseError(f"merging {tensor.name} gives NaN or Inf values; the adapter tensors ({origins}) are broken")
    result = value.to(out_dtype)
    if out_dtype == torch.float16 and not _all_finite(result) and _all_finite(value):
        raise LorafuseError(f"{tensor.name} overflows {tensor.dtype} (values up to {value.abs().max().item():.3g}); use --dtype bf16 or fp32")
    return result.cpu().contiguous()


def _all_finite(t: torch.Tensor) -> bool:
    """A NaN or Inf anywhere makes the fp32 sum non-finite: one fast reduction instead of a mask.
    Only a sum that overflows from finite values (beyond 3e38) takes the exact path."""
    total = t.sum(dtype=torch.float32).item()
    return math.isfinite(total) or bool(torch.isfinite(t).all())


def _write(fd: int, tensor: torch.Tensor, offset: int) -> None:
    if tensor.numel():
        _write_bytes(fd, memoryview(tensor.reshape(-1).view(torch.uint8).numpy()), offset)


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


def _disk_error(e: OSError, folder: Path) -> LorafuseError:
    if e.errno == errno.ENOSPC:
        return LorafuseError(f"the disk holding {folder.parent} is full; free space and run the same command again")
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return LorafuseError(f"cannot write to {folder.parent}: {e.strerror}; choose another output folder")
    return LorafuseError(f"I/O error while writing the output: {e.strerror or e}")
