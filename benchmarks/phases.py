"""Where a merge's time goes: one merge in this process, its main functions timed per thread.

    python benchmarks/phases.py BASE ADAPTER [--device cuda] [--max-shard-size 5GB] [--depth N]
                                             [--no-hash] [--timeline] [--runs 3]

Prints, per run, the wall time and the CPU time of the process (user + system, all threads), then the
seconds each worker spent in each phase, summed over threads; with `--timeline`, when each output shard
was opened, got its last byte and finished hashing (and the CPU time of its hashing thread). `--depth`
changes the number of pipeline threads and `--no-hash` skips the output's hash (for measuring only:
the manifest then holds a wrong digest): both are experiments, not options of lorafuse.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import resource
import shutil
import tempfile
import threading
import time
from pathlib import Path

import lorafuse
from lorafuse import api, execute
from lorafuse.output import PARTIAL
from lorafuse.sinks.safetensors import shard_file
from lorafuse.compute import rows

SPENT: dict[str, float] = collections.defaultdict(float)
EVENTS: list[tuple[float, str, str]] = []  # (time, what, shard) for --timeline


def timed(name: str, fn):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            SPENT[name] += time.perf_counter() - t0
    return wrapper


class NoHash:
    """Stands in for the hash of an output shard (measuring only): a digest of zeros as long as the real one's."""

    def __init__(self, hex_digits: int) -> None:
        self.hex_digits = hex_digits

    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * self.hex_digits


def instrument(no_hash: bool) -> None:
    rows.Producer.output_bytes = timed("produce (read, compute, write)", rows.Producer.output_bytes)
    rows.read_exact = timed("read", rows.read_exact)
    shard_file._write_bytes = timed("pwrite", shard_file._write_bytes)
    shard_file._copy = timed("copy_file_range", shard_file._copy)
    shard_file._start_writeback = timed("sync_file_range", shard_file._start_writeback)
    execute._finish_shard = timed("finish shard (fsync, wait for hash)", execute._finish_shard)
    if no_hash:
        init = shard_file._RunningHash.__init__

        def without_digest(self, *args):
            init(self, *args)
            self.digest = NoHash(2 * self.digest.digest_size)
        shard_file._RunningHash.__init__ = without_digest
    start, completed, run = shard_file._RunningHash.start, shard_file._RunningHash.completed, shard_file._RunningHash._run

    def noted_start(self):
        EVENTS.append((time.perf_counter(), "opened", self.path.name))
        return start(self)

    def noted_completed(self, *args):
        completed(self, *args)
        if self.prefix == self.size:
            EVENTS.append((time.perf_counter(), "last byte", self.path.name))

    def noted_run(self):
        cpu = time.thread_time()
        run(self)
        EVENTS.append((time.perf_counter(), f"hashed ({time.thread_time() - cpu:.2f} s of CPU)", self.path.name))
    shard_file._RunningHash.start, shard_file._RunningHash._run = noted_start, noted_run
    shard_file._RunningHash.completed = timed("hash in workers (and waits for it)", noted_completed)
    try:
        from lorafuse.compute import tensors
    except ImportError:  # no torch
        return
    tensors.Producer.output_bytes = timed("produce (read, compute, write)", tensors.Producer.output_bytes)
    tensors.read_exact = timed("read", tensors.read_exact)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path)
    p.add_argument("adapter", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-shard-size", default="5GB")
    p.add_argument("--timeline", action="store_true", help="when each output shard opened, was written, was hashed")
    p.add_argument("--depth", type=int, default=None, help="pipeline threads (default: lorafuse's)")
    p.add_argument("--no-hash", action="store_true")
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args()
    instrument(args.no_hash)
    if args.depth:
        write_shards = api.write_shards

        def with_depth(plan, *rest, **kwargs):
            return write_shards(dataclasses.replace(plan, depth=args.depth), *rest, **kwargs)
        api.write_shards = with_depth
    work = Path(tempfile.mkdtemp(prefix="lorafuse-phases-", dir=Path.home()))
    try:
        for run in range(args.runs):
            SPENT.clear()
            EVENTS.clear()
            out = work / "out"
            shutil.rmtree(out, ignore_errors=True)
            os.sync()
            before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            lorafuse.merge(args.base, args.adapter, out, device=args.device, max_shard_size=args.max_shard_size)
            wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
            user, system = after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime
            print(f"run {run + 1}: wall {wall:.2f} s, CPU {user:.2f} user + {system:.2f} system "
                  f"({(user + system) / wall:.1f} cores busy on average), {threading.active_count()} threads left")
            for name, seconds in sorted(SPENT.items(), key=lambda kv: -kv[1]):
                print(f"    {name:<40} {seconds:7.2f} s")
            if args.timeline:
                for at, what, shard in sorted(EVENTS):
                    print(f"    {at - t0:6.2f} s  {shard.removesuffix(PARTIAL):<36} {what}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
