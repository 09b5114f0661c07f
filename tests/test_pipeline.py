"""The executor's concurrency: how many tensors are in flight for the cores at hand, and shards that
finish (fsync, hash, ledger) beside the pipeline instead of in its way."""

import os
import threading
import time

import pytest

import lorafuse
import lorafuse.execute as execute
from conftest import make_adapter, tree_hash
from test_resilience import SHARD, failed_flush, shard_threads
from lorafuse.compute import rows
from lorafuse.execute import HashCancelled, _RunningHash
from lorafuse.plan import MAX_PIPELINE_DEPTH, describe, pipeline_depth

@pytest.fixture(scope="module")
def inputs(tiny_base, artefacts):
    from peft import LoraConfig

    base = tiny_base("llama", "bf16")
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)
    return base, artefacts.get("pipeline-adapter", lambda d: make_adapter(base, d, config))


@pytest.mark.parametrize("cores, depth", [(1, 2), (2, 2), (5, 2), (8, 4), (16, 8), (64, MAX_PIPELINE_DEPTH)])
def test_depth_follows_the_cores_this_process_may_use(cores, depth, inputs, monkeypatch):
    """One tensor in flight per two cores (affinity and cgroup cpusets count, not the machine's cores),
    never fewer than two, never more than MAX_PIPELINE_DEPTH; the plan's memory estimate counts that many."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert pipeline_depth() == depth
    plan = lorafuse.plan(*inputs)
    work = sorted((t.work_bytes for t in plan.tensors), reverse=True)
    assert plan.depth == depth and plan.peak_memory == sum(work[:depth])
    assert f"{depth} at a time at most" in "\n".join(describe(plan))


@pytest.mark.parametrize("depth", [2, 4])
def test_the_depth_is_the_number_of_tensors_in_flight(depth, inputs, tmp_path, monkeypatch):
    """Each tensor takes 50 ms here, so the pipeline fills up: exactly `depth` tensors at once, never more."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2 * depth)))
    produce, lock = rows.Producer.output_bytes, threading.Lock()
    now, most = [0], [0]

    def slow(*args):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
        try:
            time.sleep(0.05)
            return produce(*args)
        finally:
            with lock:
                now[0] -= 1
    monkeypatch.setattr(rows.Producer, "output_bytes", slow)
    lorafuse.merge(*inputs, tmp_path / "out")
    assert most[0] == depth


def test_a_shard_slow_to_finish_holds_up_no_other(inputs, tmp_path, monkeypatch):
    """The first shard's finish (fsync, the rest of its hash) waits until every other shard is finished:
    the workers must go on without it. When the worker that wrote a shard's last tensor finished it
    itself, the pipeline stalled behind it."""
    shards = len(lorafuse.plan(*inputs, max_shard_size=SHARD).shards)
    assert shards >= 4
    finish, others, first = execute._finish_shard, threading.Semaphore(0), threading.Lock()

    def slow_first(folder, target, ledger):
        if first.acquire(blocking=False):
            for _ in range(shards - 1):
                assert others.acquire(timeout=30), "the other shards waited for the first to finish"
        else:
            others.release()
        return finish(folder, target, ledger)
    monkeypatch.setattr(execute, "_finish_shard", slow_first)
    for folder in ("slow", "reference"):
        (tmp_path / folder).mkdir()
    lorafuse.merge(*inputs, tmp_path / "slow" / "out", max_shard_size=SHARD)
    monkeypatch.undo()
    lorafuse.merge(*inputs, tmp_path / "reference" / "out", max_shard_size=SHARD)
    assert tree_hash(tmp_path / "slow" / "out") == tree_hash(tmp_path / "reference" / "out")


def test_a_shard_that_fails_to_finish_fails_the_merge(inputs, tmp_path, monkeypatch):
    """A finish that fails (here the fsync) on its own thread is the merge's error, and nothing is published."""
    monkeypatch.setattr(execute.os, "fsync", failed_flush)
    with pytest.raises(lorafuse.LorafuseError, match="^I/O error while writing the output: Input/output error$"):
        lorafuse.merge(*inputs, tmp_path / "out", max_shard_size=SHARD)
    assert not (tmp_path / "out").exists()
    assert not shard_threads()


def test_ctrl_c_while_a_shard_finishes_leaves_it_to_the_rerun(inputs, tmp_path, monkeypatch):
    """Ctrl-C stops the hashing of shards still being finished: those keep their partial name and are
    deleted, so every shard in the staging folder under its real name is one the ledger vouches for, and
    a rerun redoes the others."""
    import _thread
    import json

    from lorafuse.manifest import LEDGER
    from lorafuse.output import staging_folder

    finish, calls = execute._finish_shard, []

    def interrupted_third(folder, target, ledger):
        calls.append(target)
        if len(calls) == 3:
            _thread.interrupt_main()  # as Ctrl-C does: the main thread stops the merge
            for _ in range(500):  # until the merge cancels this shard's hash
                if target.hash.cancelled:
                    break
                time.sleep(0.01)
        return finish(folder, target, ledger)
    monkeypatch.setattr(execute, "_finish_shard", interrupted_third)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    staging = staging_folder(out)
    recorded = set(json.loads((staging / LEDGER).read_text())["shards"]) if (staging / LEDGER).exists() else set()
    assert calls[2].shard.filename not in recorded
    assert {p.name for p in staging.glob("*.safetensors")} == recorded if staging.exists() else not recorded
    assert not list(staging.glob("*.partial")) and not shard_threads()
    monkeypatch.undo()
    lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert (out / "lorafuse-manifest.json").is_file()


def test_a_cancelled_hash_gives_no_digest(tmp_path):
    """A merge that stops while a shard's hash runs must not record a digest of part of the shard."""
    path = tmp_path / "f"
    path.write_bytes(os.urandom(100))
    running = _RunningHash(path, 100, 10).start()
    running.completed(10, 50)
    running.cancel()
    with pytest.raises(HashCancelled):
        running.hexdigest()
