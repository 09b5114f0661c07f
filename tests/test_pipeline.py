"""The executor's concurrency: how many tensors are in flight for the cores at hand, and shards that
finish (fsync, hash, ledger) beside the pipeline instead of in its way."""

import os
import threading
import time

import pytest

import lorafuse
import lorafuse.execute as execute
import lorafuse.execute.scheduler as scheduler
import lorafuse.sinks.safetensors.shard_file as shard_file
from conftest import make_adapter, tree_hash
from test_resilience import SHARD, failed_flush, shard_threads
from lorafuse.compute import rows
from lorafuse.sinks.safetensors.shard_file import HashCancelled, _RunningHash
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


@pytest.mark.parametrize("shard_size", [SHARD, "16KB"])  # 1-4 and 1-8 tensors per shard
@pytest.mark.parametrize("at_once", [1, 2, 3, 50])
def test_shards_side_by_side_share_the_bytes_fairly(at_once, shard_size, inputs):
    """The workers' order: every tensor once, each shard's in file order; at most `at_once` shards begun
    and not finished; and over any stretch in which two shards are both open, the bytes given to each
    differ by at most a tensor of each, so their hashes keep the same pace (a shard opened late is not
    given every turn until it catches up). One at a time is the plan's order."""
    shards = lorafuse.plan(*inputs, max_shard_size=shard_size).shards
    order = scheduler._tensor_order(shards, at_once)
    assert sorted((shards.index(s), i) for s, i in order) == [(k, i) for k, s in enumerate(shards) for i in range(len(s.tensors))]
    assert [i for s, i in order if s is shards[1]] == list(range(len(shards[1].tensors)))
    if at_once == 1:
        assert order == [(s, i) for s in shards for i in range(len(s.tensors))]
    sizes = [sum(slot.nbytes for slot in s.slots[i]) for s, i in order]
    first = {id(s): order.index((s, 0)) for s in shards}
    last = {id(s): max(step for step, (t, _) in enumerate(order) if t is s) for s in shards}
    started_unfinished = [sum(first[id(s)] <= step < last[id(s)] for s in shards) for step in range(len(order))]
    assert max(started_unfinished) <= at_once and (max(started_unfinished) > 1) == (at_once > 1)
    largest = {id(s): max(sum(slot.nbytes for slot in slots) for slots in s.slots) for s in shards}
    for a, b in ((a, b) for a in shards for b in shards if a is not b):
        start, end = max(first[id(a)], first[id(b)]), min(last[id(a)], last[id(b)])
        for i in range(start, end + 1):
            for j in range(i, end + 1):
                given = {id(s): sum(n for (t, _), n in zip(order[i:j + 1], sizes[i:j + 1]) if t is s) for s in (a, b)}
                assert abs(given[id(a)] - given[id(b)]) <= largest[id(a)] + largest[id(b)]


def test_on_many_cores_shards_are_written_side_by_side(inputs, tmp_path, monkeypatch):
    """On 16 cores the workers take the tensors of four shards in turn, so four shards hash at once (one
    core each), and the bytes are those of a merge that writes one shard at a time."""
    run_bounded, taken = scheduler._run_bounded, []

    def recorded(job, jobs, depth, on_failure):
        def noted():
            for target, slots, tensor, *rest in jobs:
                taken.append((target.shard.filename, tensor.name))
                yield (target, slots, tensor, *rest)
        return run_bounded(job, noted(), depth, on_failure)
    monkeypatch.setattr(scheduler, "_run_bounded", recorded)
    plan, orders = lorafuse.plan(*inputs, max_shard_size=SHARD), {}
    for cores, at_once in ((16, 4), (2, 1)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
        taken.clear()
        (tmp_path / str(cores)).mkdir()
        lorafuse.merge(*inputs, tmp_path / str(cores) / "out", max_shard_size=SHARD)
        orders[cores] = [(s.filename, s.tensors[i].name) for s, i in scheduler._tensor_order(plan.shards, at_once)]
        assert taken == orders[cores]
    assert orders[16] != orders[2]
    assert tree_hash(tmp_path / "16" / "out") == tree_hash(tmp_path / "2" / "out")


def test_a_shard_that_fails_to_finish_fails_the_merge(inputs, tmp_path, monkeypatch):
    """A finish that fails (here the fsync) on its own thread is the merge's error, and nothing is published."""
    monkeypatch.setattr(shard_file.os, "fsync", failed_flush)
    with pytest.raises(lorafuse.LorafuseError, match="^I/O error while writing the output: Input/output error$"):
        lorafuse.merge(*inputs, tmp_path / "out", max_shard_size=SHARD)
    assert not (tmp_path / "out").exists()
    assert not shard_threads()


def test_ctrl_c_while_a_shard_finishes_leaves_it_to_the_rerun(cores, inputs, tmp_path, monkeypatch):
    """Ctrl-C stops the hashing of shards still being finished, and of those still being written (on 16
    cores, several at once): those keep their partial name and are deleted, so every shard in the staging
    folder under its real name is one the ledger vouches for, and a rerun redoes the others."""
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
    running = _RunningHash(path, 100, 10, "xxh3_128").start()
    running.completed(10, 50)
    running.cancel()
    with pytest.raises(HashCancelled):
        running.hexdigest()
