"""--push-to-hub: HubPublisher against the loopback fake Hub (`hub_server.HubServer`).

Shards are pre-uploaded (LFS) as soon as they are reported done, the repo changes once, in one commit, at
`finish`; a second run skips the LFS objects the Hub already holds; with `delete_uploaded` the local shard
files go as soon as the Hub has them and the commit still holds them.

Runs in process: huggingface_hub reads HF_ENDPOINT and HF_HUB_DISABLE_XET into `constants` at import, so
the test patches those constants (and passes the endpoint and token to HfApi explicitly). Xet is disabled
so that uploads go over the plain LFS protocol the fake Hub speaks.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import pytest

from conftest import make_adapter
from hub_server import HubServer, use_in_process
from lorafuse.errors import LorafuseError
from lorafuse.sinks.hub import HubPublisher

TOKEN = "hf_lorafuse_test_token"
REPO = "me/merged"


@pytest.fixture(scope="module")
def merged(tiny_base, tmp_path_factory):
    """A local merge in several shards: what the executor would have written."""
    import lorafuse
    from peft import LoraConfig

    root = tmp_path_factory.mktemp("push")
    base = tiny_base("llama", "fp32")
    adapter = make_adapter(base, root / "adapter",
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    out = root / "out"
    lorafuse.merge(base, adapter, out, max_shard_size="20KB")
    assert len(shards(out)) >= 3
    return out


def shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer([], token=TOKEN, max_seconds=120) as server:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        use_in_process(server, monkeypatch)
        yield server


def publisher(hub: HubServer, **kwargs) -> HubPublisher:
    return HubPublisher(REPO, token=TOKEN, endpoint=hub.url, **kwargs)


def push(hub: HubServer, folder: Path, **kwargs) -> str:
    """Drive the publisher as the executor does: each shard as it is done (from worker threads), then finish."""
    pub = publisher(hub, **kwargs).start()
    workers = [threading.Thread(target=pub.shard_done, args=(path,)) for path in shards(folder)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return pub.finish(folder)


def commits(hub: HubServer) -> list[str]:
    return [path for method, path, _ in hub.requests("POST") if path.startswith(f"/api/models/{REPO}/commit/")]


def test_push_uploads_shards_early_and_commits_once(hub, merged):
    local = files(merged)
    pub = publisher(hub).start()
    repo = hub.repos[REPO]
    assert set(repo.files()) == {".gitattributes"}  # created empty, as the Hub does
    for path in shards(merged):
        pub.shard_done(path)
    pub.wait()
    # Every shard is on the Hub as an LFS object, but nothing is visible in the repo before the commit.
    assert sorted(hub.uploads) == sorted(sha(local[p.name]) for p in shards(merged))
    assert set(repo.files()) == {".gitattributes"}
    assert commits(hub) == []

    url = pub.finish(merged)
    assert len(commits(hub)) == 1 and len(hub.pushes) == 1
    assert url == f"{hub.url}/{REPO}/commit/{repo.refs['main']}"
    assert repo.files() == {".gitattributes": repo.files()[".gitattributes"], **local}  # exactly the merge
    assert sorted(hub.uploads) == sorted(sha(local[p.name]) for p in shards(merged))  # each shard once
    committed = repo.commits[repo.refs["main"]]
    assert all(committed[p.name].lfs for p in shards(merged))

    # Downloading the repo through the same server gives back the merge, byte for byte.
    from huggingface_hub import snapshot_download

    got = Path(snapshot_download(REPO, endpoint=hub.url, cache_dir=hub_cache(merged), token=TOKEN))
    assert {k: v for k, v in files(got).items() if k != ".gitattributes"} == local


def hub_cache(merged: Path) -> Path:
    import tempfile

    return Path(tempfile.mkdtemp(prefix="hf-cache-", dir=merged.parent))


def test_interrupted_push_resumes_without_uploading_again(hub, merged):
    first = shards(merged)[:2]
    pub = publisher(hub).start()
    for path in first:
        pub.shard_done(path)
    pub.close()  # interrupted before the commit: the repo is unchanged
    assert set(hub.repos[REPO].files()) == {".gitattributes"} and commits(hub) == []
    assert len(hub.uploads) == 2
    hub.reset()

    push(hub, merged)
    local = files(merged)
    rest = [sha(local[p.name]) for p in shards(merged)[2:]]
    assert sorted(hub.uploads[2:]) == sorted(rest)  # only the shards the Hub lacked
    batches = [r for r in hub.requests("POST") if r[1].endswith("/info/lfs/objects/batch")]
    assert len(batches) == len(shards(merged))  # the Hub was asked about each shard
    assert len(commits(hub)) == 1
    assert {k: v for k, v in hub.repos[REPO].files().items() if k != ".gitattributes"} == local

    # The same push again: no LFS object is uploaded, and the repo already holds every file.
    hub.reset()
    before = hub.repos[REPO].refs["main"]
    uploads = len(hub.uploads)
    url = push(hub, merged)
    assert len(hub.uploads) == uploads
    assert not [r for r in hub.requests("PUT")]
    assert commits(hub) == []  # nothing changed: huggingface_hub makes no empty commit
    assert url.endswith(hub.repos[REPO].refs["main"])
    assert hub.repos[REPO].files(before) == hub.repos[REPO].files()


def test_delete_uploaded_removes_local_shards_and_still_commits_them(hub, merged, tmp_path):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(merged, out)
    local = files(out)
    url = push(hub, out, delete_uploaded=True)
    assert shards(out) == []  # gone from the disk once the Hub had them
    assert (out / "config.json").is_file()  # the small files stay
    assert len(commits(hub)) == 1
    assert {k: v for k, v in hub.repos[REPO].files().items() if k != ".gitattributes"} == local
    assert url.endswith(hub.repos[REPO].refs["main"])


def test_private_repo_on_a_new_branch_with_a_message(hub, merged):
    push(hub, merged, private=True, revision="merged-v1", commit_message="lorafuse merge")
    repo = hub.repos[REPO]
    assert repo.private
    assert set(repo.files("main")) == {".gitattributes"}  # main untouched
    assert {k for k in repo.files("merged-v1") if k != ".gitattributes"} == set(files(merged))
    body = [r for r in hub.requests("POST") if "/commit/" in r[1]]
    assert body[0][1] == f"/api/models/{REPO}/commit/merged-v1"


def test_errors_are_one_line_and_say_what_to_do(hub, merged, tmp_path):
    with pytest.raises(LorafuseError, match="not authorized.*hf auth login.*HF_TOKEN") as e:
        HubPublisher(REPO, token="hf_wrong", endpoint=hub.url).start()
    assert "\n" not in str(e.value)
    assert REPO not in hub.repos

    dead = hub.url
    hub.stop()
    with pytest.raises(LorafuseError, match="network error.*run the same command again") as e:
        HubPublisher(REPO, token=TOKEN, endpoint=dead).start()
    assert "\n" not in str(e.value)


def test_upload_error_surfaces_on_finish(hub, merged):
    pub = publisher(hub).start()
    hub.repos.pop(REPO)  # the repo vanished (deleted, or renamed) while merging
    pub.shard_done(shards(merged)[0])
    with pytest.raises(LorafuseError, match="repository not found") as e:
        pub.finish(merged)
    assert "\n" not in str(e.value)


def test_merge_with_push_to_hub(hub, tiny_base, tmp_path, monkeypatch):
    """`lorafuse merge --push-to-hub`: the Hub ends with exactly the local OUT, in one commit."""
    from peft import LoraConfig

    from lorafuse.cli import main

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base = tiny_base("llama", "fp32")
    adapter = make_adapter(base, tmp_path / "adapter",
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    out = tmp_path / "out"
    assert main(["merge", str(base), str(adapter), str(out), "--max-shard-size", "20KB", "--push-to-hub", REPO,
                 "--commit-message", "merged by lorafuse", "--quiet"]) == 0
    repo = hub.repos[REPO]
    assert len(commits(hub)) == 1
    assert {k: v for k, v in repo.files().items() if k != ".gitattributes"} == files(out)
    assert sorted(hub.uploads) == sorted(sha(p.read_bytes()) for p in shards(out))


def test_low_disk_push_writes_one_shard_at_a_time(cores, hub, tiny_base, tmp_path, monkeypatch):
    """--low-disk --push-to-hub keeps at most two output shards on disk, each next one waiting for the
    previous one's upload: so even where shards are otherwise written side by side (16 cores), they are
    written one at a time (side by side, the wait for uploads would wait for shards not yet written)."""
    import lorafuse
    import lorafuse.execute.scheduler as scheduler
    from peft import LoraConfig

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base = tiny_base("llama", "fp32")
    adapter = make_adapter(base, tmp_path / "adapter",
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    tensor_order, asked, outcome = scheduler._tensor_order, [], []
    monkeypatch.setattr(scheduler, "_tensor_order", lambda shards, at_once: asked.append(at_once) or tensor_order(shards, at_once))

    def run() -> None:
        try:
            outcome.append(lorafuse.merge(base, adapter, tmp_path / "out", max_shard_size="20KB", low_disk=True,
                                          push_to_hub=REPO))
        except BaseException as e:
            outcome.append(e)
    merging = threading.Thread(target=run, daemon=True)
    merging.start()
    merging.join(timeout=120)
    assert outcome and not isinstance(outcome[0], BaseException), outcome or "the merge hung"
    assert asked == [1] and outcome[0].shards >= 3
    assert shards(tmp_path / "out") == []  # uploaded, then deleted
    assert len(commits(hub)) == 1 and len(hub.uploads) == outcome[0].shards


def _recording_shard_done(monkeypatch) -> dict[str, str | None]:
    """The SHA-256 each shard is handed to the publisher with (None: its client hashes the file), by name."""
    handed, shard_done = {}, HubPublisher.shard_done

    def recorded(self, path, path_in_repo=None, sha256=None):
        handed[Path(path).name] = sha256
        shard_done(self, path, path_in_repo, sha256)
    monkeypatch.setattr(HubPublisher, "shard_done", recorded)
    return handed


def _manifest_files(out: Path) -> dict[str, dict]:
    import json

    from lorafuse.manifest import MANIFEST

    return json.loads((out / MANIFEST).read_text())["files"]


def test_a_pushed_merge_records_the_sha256_the_hub_names_its_objects_by(hub, tiny_base, tmp_path, monkeypatch):
    """A merge pushed to the Hub hashes its output with SHA-256 (a merge kept local: XXH3-128), as the Hub's
    LFS names each object by it: each shard's manifest entry is the oid the Hub got, and the publisher is
    handed it, so the upload does not hash the shard again."""
    import lorafuse
    from peft import LoraConfig

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    handed = _recording_shard_done(monkeypatch)
    base = tiny_base("llama", "fp32")
    adapter = make_adapter(base, tmp_path / "adapter",
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    out = tmp_path / "out"
    lorafuse.merge(base, adapter, out, max_shard_size="20KB", push_to_hub=REPO)
    listed = _manifest_files(out)
    assert listed == {name: {"size": len(data), "sha256": sha(data)} for name, data in files(out).items()
                      if name != "lorafuse-manifest.json"}
    oids = {p.name: listed[p.name]["sha256"] for p in shards(out)}
    assert len(oids) >= 3 and sorted(hub.uploads) == sorted(oids.values()) and set(oids.values()) <= set(hub.lfs)
    assert handed == oids
    assert {k: v for k, v in hub.repos[REPO].files().items() if k != ".gitattributes"} == files(out)


def test_a_pushed_rerun_keeps_the_shards_of_a_run_that_was_not(hub, tiny_base, tmp_path, monkeypatch):
    """A run not pushed, killed after two shards, recorded them in XXH3-128; the same merge run again with
    --push-to-hub keeps them (checked by XXH3-128) and hands them to the publisher without a SHA-256 (its
    client hashes them); the Hub gets every shard, under its right oid."""
    import lorafuse
    from peft import LoraConfig
    from test_resilience import _run_killed

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    base = tiny_base("llama", "fp32")
    adapter = make_adapter(base, tmp_path / "adapter",
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
    out = tmp_path / "out"
    assert _run_killed(2, "merge", base, adapter, out, "--max-shard-size", "20KB", "--quiet") == 137
    handed = _recording_shard_done(monkeypatch)
    report = lorafuse.merge(base, adapter, out, max_shard_size="20KB", push_to_hub=REPO, resume=True)
    assert report.shards_resumed == 2 and report.shards >= 3
    listed = _manifest_files(out)
    resumed = {name for name, sha256 in handed.items() if sha256 is None}
    assert len(resumed) == 2 and all(set(listed[name]) == {"size", "xxh3_128"} for name in resumed)
    assert {name: sha256 for name, sha256 in handed.items() if name not in resumed} == {
        p.name: listed[p.name]["sha256"] for p in shards(out) if p.name not in resumed}
    assert sorted(hub.uploads) == sorted(sha(p.read_bytes()) for p in shards(out))
    assert {k: v for k, v in hub.repos[REPO].files().items() if k != ".gitattributes"} == files(out)
