"""ShardFile, one output shard's life: partial name, header, writes and copies from any thread, the running
hash, fsync, rename, ledger record, cancel. A crash at any point must leave either an unfinished file a
rerun redoes (NAME.partial, never recorded) or a finished one it can trust (NAME, durable, recorded with
the hash of its bytes, by the algorithm it was created with)."""

import hashlib
import os
import threading
from types import SimpleNamespace

import pytest
import xxhash

import lorafuse.sinks.safetensors.shard_file as shard_file
from lorafuse.formats.safetensors import layout, read_header
from lorafuse.plan import ShardPlan
from lorafuse.sinks.safetensors.shard_file import HashCancelled, ShardFile, remove_partials

NAME = "model.safetensors"


def _shard(*shapes) -> ShardPlan:
    """A shard of F32 tensors t0, t1, ... of these shapes, one slot each."""
    entries = [(f"t{i}", "F32", shape) for i, shape in enumerate(shapes)]
    header, slots = layout(entries)
    return ShardPlan(NAME, tuple(SimpleNamespace(name=n) for n, _, _ in entries), header, tuple((s,) for s in slots))


def _tensor_bytes(slot, seed: int) -> bytes:
    return bytes((seed * 31 + i) % 251 for i in range(slot.nbytes))


class Ledger:
    """Records what `record` is told, and what the folder held at that moment."""

    def __init__(self, folder):
        self.folder, self.records = folder, []

    def record(self, name, size, algorithm, digest):
        self.records.append((name, size, algorithm, digest, sorted(p.name for p in self.folder.iterdir())))


def _write_all(target: ShardFile, shard: ShardPlan, order=None) -> list[bool]:
    lasts = []
    for i in order or range(len(shard.tensors)):
        slot = shard.slots[i][0]
        data = _tensor_bytes(slot, i)
        target.write(memoryview(data), slot.offset)
        lasts.append(target.wrote(slot.offset, slot.offset + slot.nbytes, [memoryview(data)]))
    return lasts


def test_a_shard_keeps_its_partial_name_until_finished(tmp_path):
    shard = _shard((4, 4), (3,), (0,), (8,))
    target = ShardFile.create(tmp_path, shard, "xxh3_128")
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME + ".partial"]
    assert (tmp_path / (NAME + ".partial")).stat().st_size == shard.size  # allocated at once
    target.start()
    lasts = _write_all(target, shard, order=[3, 1, 2, 0])
    assert lasts == [False, False, False, True]  # the last tensor in, whichever it is, says the file is ready
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME + ".partial"]
    ledger = Ledger(tmp_path)
    digest = target.finish(tmp_path, ledger)
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME]
    data = (tmp_path / NAME).read_bytes()
    assert digest == xxhash.xxh3_128(data).hexdigest()
    assert ledger.records == [(NAME, shard.size, "xxh3_128", digest, [NAME])]  # recorded after the rename, not before
    header = read_header(tmp_path / NAME)
    assert [t.nbytes for t in header.tensors.values()] == [64, 12, 0, 32]
    for i, group in enumerate(shard.slots):
        slot = group[0]
        assert data[slot.offset:slot.offset + slot.nbytes] == _tensor_bytes(slot, i)


@pytest.mark.parametrize("algorithm, reference", [("xxh3_128", xxhash.xxh3_128), ("sha256", hashlib.sha256)])
def test_the_hash_is_the_files_however_the_bytes_came(tmp_path, algorithm, reference):
    """Copied ranges (never in memory), ranges written ahead of the prefix and ranges from the writer's
    buffer all end in the hash of the file by the shard's algorithm, from several threads at once."""
    shard = _shard(*[(64,)] * 12)
    source = tmp_path / "source"
    source.write_bytes(os.urandom(shard.size))
    folder = tmp_path / "out"
    folder.mkdir()
    target = ShardFile.create(folder, shard, algorithm).start()
    fd = os.open(source, os.O_RDONLY)

    def put(i: int) -> None:
        slot = shard.slots[i][0]
        if i % 3 == 0:
            target.copy_in([(fd, slot.offset, slot.offset, slot.nbytes)])
            target.wrote(slot.offset, slot.offset + slot.nbytes)
        else:
            data = memoryview(os.pread(fd, slot.nbytes, slot.offset))
            target.write(data, slot.offset)
            target.wrote(slot.offset, slot.offset + slot.nbytes, [data] if i % 3 == 1 else [])
    threads = [threading.Thread(target=put, args=(i,)) for i in reversed(range(12))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    os.close(fd)
    digest = target.finish(folder, None)
    assert digest == reference((folder / NAME).read_bytes()).hexdigest()
    assert (folder / NAME).read_bytes()[len(shard.header):] == source.read_bytes()[len(shard.header):]


def test_fsync_comes_before_the_rename_and_the_record_after(tmp_path, monkeypatch):
    shard = _shard((16,))
    target = ShardFile.create(tmp_path, shard, "xxh3_128").start()
    _write_all(target, shard)
    events, fsync, rename = [], os.fsync, os.rename

    def noted_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def noted_rename(src, dst):
        events.append(("rename", os.stat(src).st_ino))
        rename(src, dst)
    monkeypatch.setattr(shard_file.os, "fsync", noted_fsync)
    monkeypatch.setattr(shard_file.os, "rename", noted_rename)
    ledger = Ledger(tmp_path)
    ledger.record = lambda *args: events.append(("record", args[0]))
    target.finish(tmp_path, ledger)
    inode = (tmp_path / NAME).stat().st_ino
    assert events == [("fsync", inode), ("rename", inode), ("record", NAME)]


def test_a_failed_fsync_leaves_the_partial_name_and_no_record(tmp_path, monkeypatch):
    import errno

    shard = _shard((16,))
    target = ShardFile.create(tmp_path, shard, "xxh3_128").start()
    _write_all(target, shard)

    def failing(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    monkeypatch.setattr(shard_file.os, "fsync", failing)
    ledger = Ledger(tmp_path)
    with pytest.raises(OSError, match="Input/output error"):
        target.finish(tmp_path, ledger)
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME + ".partial"] and not ledger.records
    with pytest.raises(OSError):
        os.fstat(target.fd)  # closed all the same
    assert not target.hash.thread.is_alive() and not target.flusher.thread.is_alive()


def test_cancel_leaves_no_finished_name(tmp_path):
    shard = _shard((16,), (16,))
    target = ShardFile.create(tmp_path, shard, "xxh3_128").start()
    _write_all(target, shard, order=[1])
    target.cancel()
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME + ".partial"]
    assert not target.hash.thread.is_alive() and not target.flusher.thread.is_alive()
    with pytest.raises(OSError):
        os.fstat(target.fd)
    remove_partials(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_finish_cancelled_under_way_renames_and_records_nothing(tmp_path):
    """The merge stops while a shard is finished on another thread: its hash is cancelled, so the finish
    fails instead of renaming the file or recording a digest of part of it."""
    shard = _shard((16,), (16,))
    target = ShardFile.create(tmp_path, shard, "xxh3_128").start()
    _write_all(target, shard, order=[1])  # the first tensor never comes: the hash waits for it
    ledger, outcome = Ledger(tmp_path), []

    def finish():
        try:
            target.finish(tmp_path, ledger)
        except HashCancelled as e:
            outcome.append(e)
    finisher = threading.Thread(target=finish)
    finisher.start()
    target.cancel_finish()
    finisher.join(30)
    assert outcome and not ledger.records
    assert sorted(p.name for p in tmp_path.iterdir()) == [NAME + ".partial"]


def test_a_stale_file_or_link_at_the_partial_name_is_replaced_not_written_through(tmp_path):
    shard = _shard((4,))
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    (tmp_path / (NAME + ".partial")).symlink_to(victim)
    target = ShardFile.create(tmp_path, shard, "xxh3_128").start()
    _write_all(target, shard)
    target.finish(tmp_path, None)
    assert victim.read_bytes() == b"keep" and not (tmp_path / NAME).is_symlink()
