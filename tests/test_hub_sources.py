"""BASE and ADAPTER as Hugging Face repo ids, resolved through huggingface_hub against a local fake Hub.

Each call runs in a fresh Python process with the environment a user would set (HF_HOME, HF_ENDPOINT,
HF_HUB_OFFLINE, HF_TOKEN), because huggingface_hub reads them at import time. The cache under test is
the one huggingface_hub writes when downloading from `hub_server.HubServer`, never a hand-made one;
the server counts requests, so the tests can say exactly what was downloaded.

The child imports `lorafuse.sources.hub` without running `lorafuse/__init__` (which imports torch),
to keep each call under a second; the end-to-end merge test imports lorafuse normally.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import make_adapter, read_tensors, same_bytes
from hub_server import HubRepo, HubServer
from lorafuse.errors import LorafuseError
from lorafuse.sources.hub import base_from_adapter, parse_spec

SRC = Path(__file__).resolve().parents[1] / "src"
SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
BASE_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", *SHARDS,
              "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
DECOYS = {"pytorch_model.bin", "consolidated.safetensors", "model.gguf", "original/consolidated.00.pth", "README.md",
          ".gitattributes"}
TOKEN = "hf_lorafuse_test_token"

DRIVER = r"""
import json, os, sys, types
src, code = sys.argv[1], sys.argv[2]
if os.environ.get("LORAFUSE_TEST_FULL_IMPORT") != "1":  # skip lorafuse/__init__ (torch): only the hub source is used
    pkg = types.ModuleType("lorafuse")
    pkg.__path__ = [os.path.join(src, "lorafuse")]
    sys.modules["lorafuse"] = pkg
from pathlib import Path
from lorafuse.errors import LorafuseError
from lorafuse.sources import hub
ns = {"hub": hub, "Path": Path}
try:
    exec(code, ns)
    out = {"ok": ns.get("result")}
except LorafuseError as e:
    out = {"error": str(e)}
print("\n@@RESULT@@" + json.dumps(out, default=str))
"""


# -- the repos the fake Hub serves -----------------------------------------------------------------

def save_tokenizer(folder: Path) -> Path:
    """A tiny word-level tokenizer with a chat template, saved by transformers."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(127)} | {"[UNK]": 127}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="t1")
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(folder)
    return folder


def loaded_as(folder: Path, name: str):
    """The model of `folder`, named as if from_pretrained(name) had loaded it: PEFT records that name."""
    from conftest import load_model

    model = load_model(folder)
    model.name_or_path = model.config._name_or_path = name
    return model


@pytest.fixture(scope="module")
def folders(tiny_base, tmp_path_factory):
    """Local folders: the sharded base as a user would push it (plus other weight formats the Hub repo
    also holds), a single-file base for another revision, and PEFT adapters trained on `org/base`."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("hub-repos")
    sharded = tiny_base("llama", "fp32", max_shard_size="40KB")
    assert {p.name for p in sharded.glob("model-*.safetensors")} == set(SHARDS)
    base = root / "base"
    shutil.copytree(sharded, base)
    save_tokenizer(base)
    (base / "README.md").write_text("---\nlibrary_name: transformers\n---\n# base\n")
    # Weights in other formats, as many Hub repos carry them: none of these may be downloaded.
    state = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    torch.save(state, base / "pytorch_model.bin")
    save_file(state, base / "consolidated.safetensors")
    (base / "original").mkdir()
    torch.save(state, base / "original" / "consolidated.00.pth")
    (base / "model.gguf").write_bytes(b"GGUF" + bytes(64))

    single = tiny_base("llama", "bf16")  # the same model, one bf16 file: revision v1
    assert (single / "model.safetensors").is_file() and not (single / "model.safetensors.index.json").exists()

    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    adapter = make_adapter(sharded, root / "adapter", config, model=loaded_as(sharded, "org/base"))
    save_tokenizer(adapter)
    adapter_bin = make_adapter(sharded, root / "adapter-bin", config, model=loaded_as(sharded, "org/base"),
                               safe_serialization=False)
    assert (adapter_bin / "adapter_model.bin").is_file() and not (adapter_bin / "adapter_model.safetensors").exists()
    return {"base": base, "single": single, "adapter": adapter, "adapter_bin": adapter_bin}


@pytest.fixture(scope="module")
def repos(folders):
    base = HubRepo("org/base")
    v1 = base.commit(folders["single"], refs=("v1", "refs/pr/1"))
    main = base.commit(folders["base"], refs=("main",))
    adapter = HubRepo("org/adapter")
    adapter.commit(folders["adapter"])
    adapter_bin = HubRepo("org/adapter-bin")
    adapter_bin.commit(folders["adapter_bin"])
    gated = HubRepo("org/gated", gated=True)
    gated.commit(folders["single"])
    private = HubRepo("org/private", private=True)
    private.commit(folders["single"])
    return {"repos": [base, adapter, adapter_bin, gated, private], "main": main, "v1": v1, "base": base}


class Hub:
    """One test's fake Hub and HF_HOME, and a way to call lorafuse.sources.hub as a user's process would."""

    def __init__(self, server: HubServer, home: Path):
        self.server, self.home = server, home
        self.url = server.url  # kept after stop(): the port then refuses connections, like a dead network

    @property
    def cache(self) -> Path:
        return self.home / "hub"

    def storage(self, repo_id: str = "org/base") -> Path:
        return self.cache / ("models--" + repo_id.replace("/", "--"))

    def env(self, offline: bool = False, token: str | None = None, full: bool = False, extra: dict | None = None) -> dict:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HF_", "HUGGING_FACE_", "TRANSFORMERS_OFFLINE"))
               and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
        env.update(HF_HOME=str(self.home), HF_ENDPOINT=self.url, HF_HUB_OFFLINE="1" if offline else "0",
                   HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_PROGRESS_BARS="1",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
        if token:
            env["HF_TOKEN"] = token
        if full:
            env["LORAFUSE_TEST_FULL_IMPORT"] = "1"
        env.update(extra or {})
        return env

    def run(self, code: str, **env) -> dict:
        done = subprocess.run([sys.executable, "-c", DRIVER, str(SRC), code], env=self.env(**env),
                              capture_output=True, text=True, timeout=180)
        marker = done.stdout.rfind("@@RESULT@@")
        assert done.returncode == 0 and marker >= 0, f"child failed:\n{done.stdout}\n{done.stderr}"
        return json.loads(done.stdout[marker + len("@@RESULT@@"):])

    def resolve(self, spec: str, adapter: bool = False, **env) -> Path:
        func = "resolve_adapter" if adapter else "resolve_model"
        got = self.run(f"result = str(hub.{func}({spec!r}))", **env)
        assert "ok" in got, got
        return Path(got["ok"])

    def error(self, code: str, **env) -> str:
        got = self.run(code, **env)
        assert "error" in got, got
        assert "\n" not in got["error"]
        return got["error"]

    def status(self, spec: str, **env) -> dict:
        got = self.run(f"result = hub.cache_status({spec!r})", **env)
        assert "ok" in got, got
        return got["ok"]


@pytest.fixture
def hub(repos, tmp_path):
    with HubServer(repos["repos"], token=TOKEN, max_seconds=120) as server:
        yield Hub(server, tmp_path / "hf-home")


def cache_state(cache: Path) -> dict[str, tuple]:
    """Every entry under the cache: links by target, files by size and sha256, folders by name."""
    state = {}
    for dirpath, dirnames, filenames in os.walk(cache):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(cache))
            if path.is_symlink():
                state[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                state[rel] = ("dir",)
            else:
                data = path.read_bytes()
                state[rel] = ("file", len(data), hashlib.sha256(data).hexdigest(), path.stat().st_mtime_ns)
    return state


def served(repos, path: str, commit: str = "main") -> bytes:
    repo = repos["base"]
    return repo.commits[repos[commit]][path].data


# -- parse_spec and base_from_adapter (in process) -------------------------------------------------

def test_parse_spec(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)
    assert parse_spec(str(tmp_path)) is None
    assert parse_spec("org/local") is None  # an existing folder wins over a repo id spelled the same
    assert parse_spec(tmp_path / "org") is None
    assert parse_spec("org/name") == ("org/name", None)
    assert parse_spec("Org-1/na.me_2@v1.0") == ("Org-1/na.me_2", "v1.0")
    assert parse_spec("org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    for bad in ("missing-folder", "./org/missing", "/no/such/folder", "a/b/c", "org/na--me", "org/name@", "-org/x", "",
                "org/name@../../x", "org/name@a b"):
        with pytest.raises(LorafuseError, match="repo id|revision") as e:
            parse_spec(bad)
        assert "\n" not in str(e.value)
    with pytest.raises(LorafuseError, match="folder missing-folder does not exist and is not a Hugging Face repo id"):
        parse_spec("missing-folder")


def test_base_from_adapter(folders, tmp_path):
    assert base_from_adapter(folders["adapter"]) == "org/base"
    assert base_from_adapter(tmp_path) is None  # no adapter_config.json
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": None}))
    assert base_from_adapter(tmp_path) is None
    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(LorafuseError, match="not valid JSON"):
        base_from_adapter(tmp_path)


# -- resolving through the fake Hub ----------------------------------------------------------------

def test_uncached_base_is_downloaded_into_the_hub_cache(hub, repos):
    folder = hub.resolve("org/base")
    storage = hub.storage()
    assert folder == storage / "snapshots" / repos["main"]
    assert (storage / "refs" / "main").read_text() == repos["main"]
    assert {p.name for p in folder.iterdir()} == BASE_FILES  # no README, no other weight formats
    for name in BASE_FILES:
        link = folder / name
        assert link.is_symlink() and os.readlink(link).startswith("../../blobs/")
        assert link.read_bytes() == served(repos, name)
        blob = link.resolve()
        assert blob.parent == storage / "blobs"
        expected = hashlib.sha256(served(repos, name)).hexdigest() if name.endswith(".safetensors") else None
        assert expected is None or blob.name == expected  # LFS files: the blob is named by its sha256
    # Every needed file fetched once, nothing else; huggingface_hub wrote all of the layout.
    gets = hub.server.file_requests("GET")
    assert gets == {name: 1 for name in BASE_FILES}, gets
    assert not set(gets) & DECOYS
    assert {p.name for p in storage.iterdir()} <= {"blobs", "refs", "snapshots", "trees", ".no_exist"}


def test_cached_base_is_read_where_it_lies(hub, repos):
    first = hub.resolve("org/base")
    before = cache_state(hub.cache)
    hub.server.reset()
    assert hub.resolve("org/base") == first
    assert hub.server.file_requests("GET") == {} and hub.server.file_requests("HEAD") == {}
    assert all(path.startswith("/api/models/org/base") for _, path, _ in hub.server.requests())
    assert cache_state(hub.cache) == before  # not one byte, link or timestamp changed


def test_partly_cached_fetches_only_what_is_missing(hub, repos):
    folder = hub.resolve("org/base")
    link = folder / SHARDS[1]
    link.resolve().unlink()
    link.unlink()
    hub.server.reset()
    assert hub.resolve("org/base") == folder
    assert hub.server.file_requests("GET") == {SHARDS[1]: 1}
    assert link.read_bytes() == served(repos, SHARDS[1])


def test_offline_with_everything_cached(hub, repos):
    folder = hub.resolve("org/base")
    adapter = hub.resolve("org/adapter", adapter=True)
    before = cache_state(hub.cache)
    hub.server.stop()
    assert hub.resolve("org/base", offline=True) == folder
    assert hub.resolve("org/adapter", adapter=True, offline=True) == adapter
    assert hub.resolve("org/base") == folder  # HF_HUB_OFFLINE unset but no network: the cache serves too
    assert cache_state(hub.cache) == before


def test_hub_down_falls_back_to_the_cache(hub, repos):
    folder = hub.resolve("org/base")
    hub.server.down = 503
    assert hub.resolve("org/base") == folder
    message = hub.error("hub.resolve_model('org/base@v1')")
    assert message.startswith("base model org/base@v1 is not in the cache") and "answered 503" in message


def test_offline_with_a_file_missing_names_it(hub, repos):
    folder = hub.resolve("org/base")
    (folder / SHARDS[1]).resolve().unlink()
    (folder / SHARDS[1]).unlink()
    hub.server.reset()
    message = hub.error("hub.resolve_model('org/base')", offline=True)
    assert message == (f"base model org/base@main: {SHARDS[1]} is not in the cache ({hub.cache}) and "
                       "HF_HUB_OFFLINE is set; run once online or unset HF_HUB_OFFLINE")
    assert hub.server.requests() == []  # offline means offline
    hub.server.stop()
    message = hub.error("hub.resolve_model('org/base')")
    assert SHARDS[1] in message and "cannot be reached" in message and "org/base@main" in message
    message = hub.error("hub.resolve_model('org/base@v1')", offline=True)
    assert message == (f"base model org/base@v1 is not in the cache ({hub.cache}) and HF_HUB_OFFLINE is set; "
                       "run once online or unset HF_HUB_OFFLINE")


def test_revisions(hub, repos):
    v1 = hub.resolve("org/base@v1")
    assert v1 == hub.storage() / "snapshots" / repos["v1"]
    assert (hub.storage() / "refs" / "v1").read_text() == repos["v1"]
    assert {p.name for p in v1.iterdir()} == {"config.json", "generation_config.json", "model.safetensors"}
    assert (v1 / "model.safetensors").read_bytes() == served(repos, "model.safetensors", "v1")
    hub.server.reset()
    assert hub.resolve(f"org/base@{repos['v1']}") == v1  # by commit: the same snapshot, nothing fetched
    assert hub.server.file_requests("GET") == {}
    assert hub.resolve("org/base@v1", offline=True) == v1
    assert hub.resolve("org/base@refs/pr/1") == v1  # a revision with slashes (quoted in URLs, nested under refs/)
    assert (hub.storage() / "refs" / "refs" / "pr" / "1").read_text() == repos["v1"]
    assert hub.resolve("org/base@refs/pr/1", offline=True) == v1
    message = hub.error("hub.resolve_model('org/base@nope')")
    assert message.startswith("base model org/base has no revision 'nope'") and "org/base@main" in message


def test_repo_not_found_gated_and_private(hub, repos):
    message = hub.error("hub.resolve_model('org/nope')")
    assert "no model repo org/nope on the Hub" in message and "HF_TOKEN" in message
    message = hub.error("hub.resolve_model('org/private')")
    assert "no model repo org/private" in message and "set HF_TOKEN" in message
    assert hub.resolve("org/private", token=TOKEN).parent == hub.storage("org/private") / "snapshots"
    message = hub.error("hub.resolve_model('org/gated')")
    assert message.startswith("base model org/gated is gated: accept its conditions at ") and "HF_TOKEN" in message
    folder = hub.resolve("org/gated", token=TOKEN)
    assert (folder / "model.safetensors").is_file()
    assert hub.resolve("org/gated") == folder  # once cached, a gated repo needs no token
    message = hub.error("hub.resolve_adapter('org/base')")
    assert "has no adapter_config.json" in message
    assert "no model repo org/nope" in hub.error("hub.cache_status('org/nope')")  # plan fails as merge would


def test_adapters_and_hf_hub_cache(hub, repos, folders, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    folder = hub.resolve("org/adapter", adapter=True, extra={"HF_HUB_CACHE": str(elsewhere)})
    assert folder.parent == elsewhere / "models--org--adapter" / "snapshots" and not hub.cache.exists()
    folder = hub.resolve("org/adapter", adapter=True)
    assert folder.parent == hub.storage("org/adapter") / "snapshots"
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors",
                                                  "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert base_from_adapter(folder) == "org/base"
    folder = hub.resolve("org/adapter-bin", adapter=True)
    assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.bin"}


def test_cache_status_downloads_nothing(hub, repos):
    sizes = {name: len(served(repos, name)) for name in BASE_FILES}
    status = hub.status("org/base")
    assert status["source"] == "hub" and status["online"] and status["commit"] == repos["main"]
    assert status["cached"] == [] and {m["file"]: m["size"] for m in status["missing"]} == sizes
    assert status["download_bytes"] == sum(sizes.values()) and not status["complete"]
    assert not hub.storage().exists()  # nothing written into the cache
    assert hub.server.file_requests("GET") == {"model.safetensors.index.json": 1}  # read into a temp folder

    folder = hub.resolve("org/base")
    (folder / SHARDS[2]).resolve().unlink()
    (folder / SHARDS[2]).unlink()
    before = cache_state(hub.cache)
    hub.server.reset()
    for offline in (False, True):
        status = hub.status("org/base", offline=offline)
        assert status["missing"] == [{"file": SHARDS[2], "size": sizes[SHARDS[2]]}], status
        assert {c["file"] for c in status["cached"]} == BASE_FILES - {SHARDS[2]}
        assert status["download_bytes"] == sizes[SHARDS[2]] and status["online"] is not offline
    assert hub.server.file_requests("GET") == {} and hub.server.file_requests("HEAD") == {}
    assert cache_state(hub.cache) == before
    assert hub.status("org/nope@v1", offline=True)["note"].startswith("base model org/nope@v1 is not in the cache")
    assert hub.status(str(folder)) == {"source": "local", "spec": str(folder), "folder": str(folder)}


def test_safetensors_headers_by_range_requests(hub, repos):
    """The server answers Range requests as the Hub does: huggingface_hub reads shard headers without the shards."""
    got = hub.run("from huggingface_hub import HfApi\n"
                  "m = HfApi().get_safetensors_metadata('org/base')\n"
                  "result = sorted(m.files_metadata)")
    assert got == {"ok": SHARDS}
    shard_gets = [status for method, path, status in hub.server.requests("GET") if "/model-0000" in path]
    assert len(shard_gets) == 3 and set(shard_gets) == {206}  # partial content only
    assert not list(hub.cache.rglob("model-0000*"))


def test_merge_from_repo_ids_equals_merge_of_local_folders(hub, repos, folders, tmp_path):
    import lorafuse

    local = tmp_path / "local"
    lorafuse.merge(folders["base"], folders["adapter"], local)
    hub.resolve("org/base")
    hub.resolve("org/adapter", adapter=True)
    before = cache_state(hub.cache)
    out = tmp_path / "from-hub"
    got = hub.run("import lorafuse\n"
                  f"report = lorafuse.merge(str(hub.resolve_model('org/base')), str(hub.resolve_adapter('org/adapter')), {str(out)!r})\n"
                  "result = report.tensors_merged", full=True)
    assert got["ok"] == 6
    assert cache_state(hub.cache) == before  # the merge read the cache and wrote nothing into it
    mine, theirs = read_tensors(out), read_tensors(local)
    assert mine.keys() == theirs.keys() and all(same_bytes(mine[k], theirs[k]) for k in mine)
    assert json.loads((out / "config.json").read_text()) == json.loads((local / "config.json").read_text())
    assert (out / "tokenizer.json").read_bytes() == (local / "tokenizer.json").read_bytes()
