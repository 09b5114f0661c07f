"""Base shards downloaded while the merge streams, --low-disk, and plan's disk needs, against the fake Hub.

A base named by repo id whose shards are not cached is planned from the shards' headers (HTTP range
requests) and each shard is downloaded by huggingface_hub when the stream reaches it. With --low-disk,
shards go to the staging folder and are deleted once merged; with --push-to-hub too, output shards are
deleted once uploaded. The tests measure the peak disk use: every file under HF_HOME and the work folder,
summed just before each deletion (the only moments the total can stop growing) and at the end.

Runs in process, with huggingface_hub's constants pointed at the fake Hub and a fresh cache (as
test_hub_push does); the tests of test_hub_sources run the same code paths in child processes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
from pathlib import Path

import pytest
from peft import LoraConfig

import lorafuse
from conftest import make_adapter, read_tensors, same_bytes
from hub_server import HubRepo, HubServer, use_in_process
from test_hub_sources import loaded_as, save_tokenizer

TOKEN = "hf_lorafuse_test_token"
SHARD_SIZE = "20KB"  # of the output: several shards, so that --low-disk with --push-to-hub has something to drop


@pytest.fixture(scope="module")
def folders(tiny_base, tmp_path_factory):
    """A base in many small shards (as a user pushed it) and a LoRA trained on `org/many`."""
    root = tmp_path_factory.mktemp("low-disk")
    base = root / "many"
    shutil.copytree(tiny_base("llama", "fp32", max_shard_size="16KB"), base)
    save_tokenizer(base)
    assert len(list(base.glob("model-*.safetensors"))) >= 6
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapter = make_adapter(base, root / "adapter", config, model=loaded_as(base, "org/many"))
    local = root / "local"  # the reference: the same merge of the local folders
    lorafuse.merge(base, adapter, local, max_shard_size=SHARD_SIZE)
    return {"base": base, "adapter": adapter, "local": local}


@pytest.fixture(scope="module")
def nf4(artefacts, tmp_path_factory):
    """A bitsandbytes NF4 base saved by transformers, its QLoRA adapter, and their merge from local folders."""
    from test_quantized_bases import BNB, bnb_checkpoint

    base, adapter = bnb_checkpoint(artefacts, BNB[0])
    local = tmp_path_factory.mktemp("nf4") / "out"
    lorafuse.merge(base, adapter, local)
    return {"base": base, "adapter": adapter, "local": local}


@pytest.fixture
def hub(folders, nf4, monkeypatch, tmp_path):
    from huggingface_hub import constants

    many, adapter, nf4_repo = HubRepo("org/many"), HubRepo("org/adapter"), HubRepo("org/nf4")
    many.commit(folders["base"])
    adapter.commit(folders["adapter"])
    nf4_repo.commit(nf4["base"])
    with HubServer([many, adapter, nf4_repo], token=TOKEN, max_seconds=120) as server:
        use_in_process(server, monkeypatch)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-home" / "hub"))
        yield server


class DiskUse:
    """Peak bytes of the files under `roots`: summed before every deletion and on `measure()`."""

    def __init__(self, monkeypatch, *roots: Path) -> None:
        self.roots, self.peak, self.lock = roots, 0, threading.Lock()
        real = os.unlink

        def unlink(path, *args, **kwargs):
            self.measure()
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, "unlink", unlink)
        monkeypatch.setattr(os, "remove", unlink)

    def total(self) -> int:
        total = 0
        for root in self.roots:
            for folder, _, names in os.walk(root):
                for name in names:
                    try:
                        total += os.lstat(os.path.join(folder, name)).st_size  # a link counts as its few bytes
                    except FileNotFoundError:
                        pass
        return total

    def measure(self) -> int:
        now = self.total()
        with self.lock:
            self.peak = max(self.peak, now)
        return now


def shard_sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.glob("model-*.safetensors")}


def cached_shards(cache: Path) -> list[Path]:
    return sorted(p for p in cache.rglob("model*.safetensors"))


def same_output(out: Path, local: Path) -> None:
    mine, theirs = read_tensors(out), read_tensors(local)
    assert mine.keys() == theirs.keys() and all(same_bytes(mine[k], theirs[k]) for k in mine)
    assert json.loads((out / "config.json").read_text()) == json.loads((local / "config.json").read_text())


def shard_gets(server: HubServer, status: int, repo: str = "org/many") -> dict[str, int]:
    counts: dict[str, int] = {}
    for method, path, code in server.requests("GET"):
        if f"/{repo}/resolve/" in path and path.endswith(".safetensors") and code == status:
            name = path.rsplit("/", 1)[1]
            counts[name] = counts.get(name, 0) + 1
    return counts


def test_shards_are_downloaded_as_the_stream_needs_them(cores, hub, folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache, work = Path(constants.HF_HUB_CACHE), tmp_path / "work"
    work.mkdir()
    disk = DiskUse(monkeypatch, cache.parent, work)
    seen = {}

    def on_plan(plan):
        seen["cached"] = cached_shards(cache)
        seen["download"] = plan.base.download_bytes

    lorafuse.merge("org/many", "org/adapter", work / "out", max_shard_size=SHARD_SIZE, on_plan=on_plan)
    inputs = shard_sizes(folders["base"])
    assert seen == {"cached": [], "download": sum(inputs.values())}  # planned from the headers alone
    assert shard_gets(hub, 200) == {name: 1 for name in inputs}  # each shard downloaded once, by huggingface_hub
    assert set(shard_gets(hub, 206)) == set(inputs)  # its header first, by a range request
    assert {p.name for p in cached_shards(cache)} == set(inputs)  # into the cache, where the next merge finds them
    same_output(work / "out", folders["local"])
    output = sum(shard_sizes(work / "out").values())
    assert disk.measure() >= sum(inputs.values()) + output  # the whole base and the whole output

    hub.reset()  # a second merge reads the cache and downloads nothing
    lorafuse.merge("org/many", "org/adapter", work / "again", max_shard_size=SHARD_SIZE)
    assert shard_gets(hub, 200) == {} and shard_gets(hub, 206) == {}


def test_low_disk_keeps_about_one_input_shard(cores, hub, folders, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from lorafuse.cli import main

    cache, work = Path(constants.HF_HUB_CACHE), tmp_path / "work"
    work.mkdir()
    disk = DiskUse(monkeypatch, cache.parent, work)
    assert main(["merge", "org/many", "org/adapter", str(work / "out"), "--max-shard-size", SHARD_SIZE, "--low-disk",
                 "--quiet"]) == 0
    final = disk.measure()
    inputs = shard_sizes(folders["base"])
    output = sum(shard_sizes(work / "out").values())
    same_output(work / "out", folders["local"])
    assert cached_shards(cache) == []  # the cache got the small files only
    assert sorted(p.name for p in work.iterdir()) == ["out"]  # no staging folder, no downloads left
    assert shard_gets(hub, 200) == {name: 1 for name in inputs}
    # At most two input shards at once (the one merged and the next, prefetched), besides the output and
    # the small files that stay (config, index, tokenizer, in the cache and in OUT).
    small = final - output
    assert disk.peak <= output + 2 * max(inputs.values()) + small, (disk.peak, output, inputs, small)
    assert disk.peak < output + sum(inputs.values())


def test_low_disk_push_keeps_two_output_shards(cores, hub, folders, tmp_path, monkeypatch):
    """--low-disk --push-to-hub: the merged model never exists whole on the local disk; the Hub gets
    exactly the files of the local merge, in one commit."""
    from huggingface_hub import constants

    cache, work = Path(constants.HF_HUB_CACHE), tmp_path / "work"
    work.mkdir()
    disk = DiskUse(monkeypatch, cache.parent, work)
    report = lorafuse.merge("org/many", "org/adapter", work / "out", max_shard_size=SHARD_SIZE, low_disk=True,
                            push_to_hub="me/merged")
    final = disk.measure()
    local = folders["local"]
    outputs, inputs = shard_sizes(local), shard_sizes(folders["base"])
    assert len(outputs) >= 4 and report.hub_url
    repo = hub.repos["me/merged"]
    assert len(hub.pushes) == 1
    published = {k: v for k, v in repo.files().items() if k != ".gitattributes"}
    out = work / "out"
    assert shard_sizes(out) == {}  # uploaded, then deleted
    assert {k: v for k, v in published.items() if k.startswith("model-")} == {
        name: (local / name).read_bytes() for name in outputs}
    assert {k: v for k, v in published.items() if not k.startswith("model-")} == {
        p.name: p.read_bytes() for p in out.iterdir()}
    manifest = json.loads((out / "lorafuse-manifest.json").read_text())
    assert {name: manifest["files"][name]["size"] for name in outputs} == outputs  # the manifest still lists them
    small = final
    assert disk.peak <= 2 * max(outputs.values()) + 2 * max(inputs.values()) + small, (disk.peak, outputs, inputs)
    assert disk.peak < sum(outputs.values()) + max(inputs.values())


def test_plan_says_what_each_mode_needs(hub, folders, tmp_path, capsys):
    from lorafuse.cli import main
    from lorafuse.units import human_size

    assert main(["plan", "org/many", "org/adapter", str(tmp_path / "out"), "--max-shard-size", SHARD_SIZE]) == 0
    text = capsys.readouterr().out
    inputs = shard_sizes(folders["base"])
    outputs = shard_sizes(folders["local"])
    assert shard_gets(hub, 200) == {}  # a plan downloads no shard: headers only
    assert set(shard_gets(hub, 206)) == set(inputs)
    assert re.search(r"base     org/many@main \(commit \w+\): (\d+) of \1 files to download, ", text)
    assert f"download {len(inputs)} base shard(s) not in the cache" in text

    plan = lorafuse.plan("org/many", "org/adapter", tmp_path / "out", max_shard_size=SHARD_SIZE)
    output = sum(outputs.values())
    assert plan.output_bytes == output and plan.base.download_bytes == sum(inputs.values())
    assert plan.disk_needs() == (output, sum(inputs.values()))
    assert plan.disk_needs(low_disk=True) == (output + max(inputs.values()), 0)
    assert plan.disk_needs(low_disk=True, pushing=True) == (2 * max(outputs.values()) + max(inputs.values()), 0)
    assert f"--low-disk: {human_size(plan.disk_needs(low_disk=True)[0])}" in text
    assert f"--low-disk --push-to-hub: {human_size(plan.disk_needs(low_disk=True, pushing=True)[0])}" in text


def test_a_disk_too_small_for_the_default_suggests_low_disk(hub, folders, tmp_path, monkeypatch, capsys):
    """Room for the output and one input shard, not for the whole base in the cache too: the default
    refuses before any work and names --low-disk, which then merges."""
    from lorafuse.plan import DISK_MARGIN
    from lorafuse.cli import main

    plan = lorafuse.plan("org/many", "org/adapter", tmp_path / "out", max_shard_size=SHARD_SIZE)
    need = plan.disk_needs(low_disk=True)[0] + plan.largest_download + DISK_MARGIN  # with room to prefetch one
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=need))
    hub.reset()
    args = ["merge", "org/many", "org/adapter", str(tmp_path / "out"), "--max-shard-size", SHARD_SIZE]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "the output and the downloads need" in err and "pass --low-disk (needs" in err, err
    assert not (tmp_path / "out").exists() and shard_gets(hub, 200) == {}  # refused before downloading anything
    assert main(args + ["--low-disk", "--quiet"]) == 0
    same_output(tmp_path / "out", folders["local"])


def test_interrupted_low_disk_push_resumes(hub, folders, tmp_path):
    """Stopped part way, a --low-disk --push-to-hub merge has uploaded some shards and deleted them; run
    again, it does not merge those again (the Hub holds them), uploads only the rest, and the repo
    changes once, with exactly the files of the local merge."""
    out = tmp_path / "out"
    written = []

    def stop_after_three_shards(n):
        written.append(n)
        if len(written) == 9:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        lorafuse.merge("org/many", "org/adapter", out, max_shard_size=SHARD_SIZE, low_disk=True,
                       push_to_hub="me/merged", on_progress=stop_after_three_shards)
    assert not out.exists() and hub.pushes == [] and hub.uploads
    uploaded = list(hub.uploads)
    report = lorafuse.merge("org/many", "org/adapter", out, max_shard_size=SHARD_SIZE, low_disk=True,
                            push_to_hub="me/merged")
    assert report.shards_resumed == len(uploaded) and report.shards == len(shard_sizes(folders["local"]))
    assert len(hub.pushes) == 1 and len(hub.uploads) == len(set(hub.uploads)) and hub.uploads[:len(uploaded)] == uploaded
    local = folders["local"]
    published = {k: v for k, v in hub.repos["me/merged"].files().items() if k.startswith("model-")}
    assert published == {name: (local / name).read_bytes() for name in shard_sizes(local)}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf-home", "out"]  # no staging folder left


def test_a_4bit_base_is_planned_by_range_requests(hub, nf4, tmp_path):
    """Planning a bitsandbytes base reads each weight's quant state: from a shard not downloaded yet,
    those few bytes come by range requests, and the shard itself is downloaded once, when merged."""
    from huggingface_hub import constants

    seen = {}
    lorafuse.merge("org/nf4", nf4["adapter"], tmp_path / "out", low_disk=True,
                   on_plan=lambda plan: seen.update(gets=shard_gets(hub, 200, "org/nf4"), ranges=shard_gets(hub, 206, "org/nf4")))
    assert seen["gets"] == {} and seen["ranges"]["model.safetensors"] > 1  # header and quant states
    assert shard_gets(hub, 200, "org/nf4") == {"model.safetensors": 1}
    assert cached_shards(Path(constants.HF_HUB_CACHE)) == []
    mine, theirs = read_tensors(tmp_path / "out"), read_tensors(nf4["local"])
    assert mine.keys() == theirs.keys() and all(same_bytes(mine[k], theirs[k]) for k in mine)


class FakeRemote:
    """Stands in for RemoteFile in the scheduler tests: a download writes the file, and the disk is watched."""

    def __init__(self, folder: Path, name: str, disk: dict) -> None:
        self.path, self.name, self.disk, self.downloads = folder / name, name, disk, 0

    def download(self) -> None:
        self.path.write_bytes(b"x")
        self.downloads += 1
        with self.disk["lock"]:
            self.disk["now"] += 1
            self.disk["peak"] = max(self.disk["peak"], self.disk["now"])

    def delete(self) -> None:
        self.path.unlink()
        with self.disk["lock"]:
            self.disk["now"] -= 1


@pytest.mark.parametrize("hold", [None, "least", "one more"])
def test_download_scheduler_keeps_at_most_hold_files(tmp_path, hold):
    """Jobs in output order on two threads, as the executor runs them: shards a..e in order, then the
    first shard again (an untied head reads the embedding's shard), and a tensor split over two shards.
    With a hold, files on disk never exceed it and a file read again much later is fetched again."""
    from concurrent.futures import ThreadPoolExecutor

    from lorafuse.sources.remote import Downloads, min_hold

    disk = {"now": 0, "peak": 0, "lock": threading.Lock()}
    a, b, c, d, e = (FakeRemote(tmp_path, n, disk) for n in "abcde")
    needs = [[a]] * 5 + [[b]] * 5 + [[b, c]] + [[c]] * 5 + [[d]] * 5 + [[e]] * 20 + [[a]]
    assert min_hold(needs) == 2  # b and c at once
    limit = {None: None, "least": min_hold(needs), "one more": min_hold(needs) + 1}[hold]
    downloads = Downloads(needs, limit)

    def job(i):
        downloads.wait(i)
        assert all(f.path.is_file() for f in needs[i])
        downloads.done(i)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(job, range(len(needs))))
    downloads.close()
    if limit is None:  # into the cache: each fetched once, none deleted
        assert [f.downloads for f in (a, b, c, d, e)] == [1, 1, 1, 1, 1] and disk["now"] == 5
    else:
        assert [f.downloads for f in (a, b, c, d, e)] == [2, 1, 1, 1, 1] and disk["now"] == 0
        assert disk["peak"] <= limit


def test_download_errors_reach_the_jobs(tmp_path):
    from lorafuse.errors import LorafuseError
    from lorafuse.sources.remote import Downloads

    class Broken(FakeRemote):
        def download(self):
            raise LorafuseError("downloading x failed: the Hub answered 503")

    broken = Broken(tmp_path, "x", {})
    downloads = Downloads([[broken]], hold=1)
    with pytest.raises(LorafuseError, match="503"):
        downloads.wait(0)
    downloads.close()


def test_a_failed_job_wakes_the_jobs_waiting_for_downloads(tmp_path):
    """hold=1: job 0 holds the only slot and fails without releasing it; job 1, waiting for the next file,
    gets job 0's error instead of waiting for ever."""
    from lorafuse.errors import LorafuseError
    from lorafuse.sources.remote import Downloads

    disk = {"now": 0, "peak": 0, "lock": threading.Lock()}
    a, b = FakeRemote(tmp_path, "a", disk), FakeRemote(tmp_path, "b", disk)
    downloads = Downloads([[a], [b]], hold=1)
    downloads.wait(0)
    got = []
    waiter = threading.Thread(target=lambda: got.append(pytest.raises(LorafuseError, downloads.wait, 1)))
    waiter.start()
    downloads.abort(LorafuseError("merging x gives NaN or Inf values"))
    waiter.join(10)
    assert not waiter.is_alive() and "NaN" in str(got[0].value) and not b.path.exists()
    downloads.close()


def test_a_failing_tensor_stops_a_low_disk_merge(hub, folders, tmp_path, monkeypatch):
    """An error part way (here: a tensor that cannot be computed) ends a --low-disk merge with that error,
    however the other worker and the downloads stand; nothing is left but what a resume can use."""
    from lorafuse.compute import rows
    from lorafuse.errors import LorafuseError

    real = rows.Producer.output_bytes

    def output_bytes(self, tensor, *args):
        if tensor.name.endswith("layers.1.self_attn.v_proj.weight"):
            raise LorafuseError(f"merging {tensor.name} gives NaN or Inf values")
        return real(self, tensor, *args)

    monkeypatch.setattr(rows.Producer, "output_bytes", output_bytes)
    result = []

    def run():
        try:
            lorafuse.merge("org/many", "org/adapter", tmp_path / "out", max_shard_size=SHARD_SIZE, low_disk=True)
        except LorafuseError as e:
            result.append(e)

    merging = threading.Thread(target=run, daemon=True)
    merging.start()
    merging.join(60)
    assert not merging.is_alive(), "the merge hung after a failing tensor"
    assert result and "NaN or Inf" in str(result[0]) and not (tmp_path / "out").exists()


def test_a_failed_commit_is_retried_without_merging_again(hub, folders, tmp_path):
    """The final commit fails (the Hub answers an error): with --low-disk the shards exist only on the Hub, so
    the staging folder and its ledger stay, and the same command commits them without merging again."""
    from lorafuse.errors import LorafuseError

    hub.refuse_commits = 400  # an error huggingface_hub does not retry (a 5xx is retried for seconds)
    out = tmp_path / "out"
    with pytest.raises(LorafuseError, match="cannot commit on the Hugging Face Hub .* HTTP 400"):
        lorafuse.merge("org/many", "org/adapter", out, max_shard_size=SHARD_SIZE, low_disk=True, push_to_hub="me/merged")
    assert not out.exists() and hub.pushes == []
    hub.refuse_commits = None
    hub.reset()
    report = lorafuse.merge("org/many", "org/adapter", out, max_shard_size=SHARD_SIZE, low_disk=True,
                            push_to_hub="me/merged")
    local = folders["local"]
    assert report.shards_resumed == report.shards == len(shard_sizes(local))  # nothing merged again
    assert shard_gets(hub, 200) == {}  # nor downloaded
    assert len(hub.pushes) == 1
    published = {k: v for k, v in hub.repos["me/merged"].files().items() if k.startswith("model-")}
    assert published == {name: (local / name).read_bytes() for name in shard_sizes(local)}
