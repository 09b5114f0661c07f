"""Models by name: BASE or ADAPTER given as a Hugging Face repo id, `org/name` or `org/name@revision`.

A repo id resolves to a snapshot folder of the Hugging Face cache (`HF_HUB_CACHE`, by default
`$HF_HOME/hub`): `models--org--name/snapshots/<commit>/`, whose files are links into `blobs/`. The
rest of lorafuse reads that folder like any local one, so a cached model is read where it lies and
never copied. Only the files a merge needs are fetched, and only those not cached yet: config.json,
the safetensors index and the shards it names (or model.safetensors), and the non-weight files
(tokenizer, generation config, chat template, custom code); never the other weight formats a repo
may carry (*.bin, *.pth, *.gguf, original/, consolidated.safetensors, ...). Every download, and so
every write into the cache, is done by huggingface_hub itself (`snapshot_download`, `hf_hub_download`),
which honours HF_HOME / HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN and HF_ENDPOINT.

Online, one model-info call resolves the revision to a commit and lists the repo; then
`snapshot_download(allow_patterns=<exact names>)` fetches what is missing. For a merge's base
(`resolve_model_lazily`) the missing shards are left out: they come back as RemoteFiles, planned
from their headers and downloaded while the merge streams (see remote.py). Offline (HF_HUB_OFFLINE=1),
or when the Hub cannot be reached, the cache alone answers: it works when every needed file is
cached, and otherwise fails naming the missing files. Repo-not-found, gated and private repos fall
back to the cache the same way, as huggingface_hub does, and fail with their own message when the
cache cannot serve them.
"""

from __future__ import annotations

import glob
import os
import re
import tempfile
from pathlib import Path, PurePosixPath

from ..errors import LorafuseError
from ..formats.folder import INDEX, SINGLE, TOKENIZER_FILE, is_weight_file
from ..formats.jsonfile import read_json
from ..units import human_size
from .hub_calls import _Fallback, _few, _hub_error, cache_dir, call_hub, hub_timeout
from .remote import RemoteFile

CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
NOT_NEEDED = {"README.md", ADAPTER_CONFIG}
PICKLE_WEIGHTS = re.compile(r"^(pytorch_model.*\.bin|.*\.pth|.*\.pt|model.*\.ckpt)$")
COMMIT = re.compile(r"[0-9a-f]{40}")
MODEL, ADAPTER = "model", "adapter"


# -- what a spec names -----------------------------------------------------------------------------

def parse_spec(spec: str | os.PathLike) -> tuple[str, str | None] | None:
    """None for an existing local path; (repo_id, revision or None) for `org/name[@revision]`.

    A local path wins over a repo id of the same spelling. Anything else is a LorafuseError.
    """
    text = os.fspath(spec)
    if not text:
        raise LorafuseError("an empty string is neither a folder nor a Hugging Face repo id; pass a folder or org/name")
    if os.path.exists(os.path.expanduser(text)):
        return None
    repo_id, at, revision = text.partition("@")
    if _is_repo_id(repo_id):
        if at and not _is_revision(revision):
            raise LorafuseError(f"{text!r} has no valid revision after '@'; write {repo_id}@<branch, tag or commit> or just {repo_id}")
        return repo_id, (revision if at else None)
    raise LorafuseError(
        f"folder {text} does not exist and is not a Hugging Face repo id (org/name or org/name@revision); "
        "check the path or the name"
    )


def _is_repo_id(text: str) -> bool:
    if text.count("/") != 1 or "--" in text or ".." in text or text.endswith(".git") or len(text) > 96:
        return False
    try:
        from huggingface_hub.utils import validate_repo_id

        validate_repo_id(text)
    except Exception:
        return False
    return True


def _is_revision(text: str) -> bool:
    """A branch, tag or commit name: no empty, '.' or '..' path parts (it becomes a path under refs/), no blanks."""
    return bool(text) and not re.search(r"\s", text) and all(part not in ("", ".", "..") for part in text.split("/"))


def base_from_adapter(adapter_folder: str | os.PathLike) -> str | None:
    """The adapter's `base_model_name_or_path` (a repo id or a path), or None when it names none."""
    path = Path(adapter_folder) / ADAPTER_CONFIG
    if not path.is_file():
        return None
    name = read_json(path, "adapter", "re-save the adapter").get("base_model_name_or_path")
    return name.strip() if isinstance(name, str) and name.strip() else None


# -- resolving -------------------------------------------------------------------------------------

def resolve_model(spec: str | os.PathLike, *, what: str = "base model") -> Path:
    """A folder holding the model: `spec` itself when local, else the cache's snapshot folder of the repo,
    after downloading whatever of config, index, shards and non-weight files is not cached yet."""
    return _resolve(spec, MODEL, what)[0]


def resolve_model_lazily(spec: str | os.PathLike, *, scratch: Path | None = None,
                         what: str = "base model") -> tuple[Path, dict[str, RemoteFile]]:
    """Like resolve_model, but shards the cache lacks are not downloaded: they come back as RemoteFiles,
    by file name, to be fetched while the merge streams (into the cache, or into `scratch` for --low-disk).
    Offline, or with the Hub down, every file must be cached, as for resolve_model."""
    return _resolve(spec, MODEL, what, lazy=True, scratch=scratch)


def resolve_adapter(spec: str | os.PathLike, *, what: str = "adapter") -> Path:
    """Same for a PEFT adapter: adapter_config.json, adapter_model.safetensors (or .bin if that is all
    the repo has) and the adapter's tokenizer files."""
    return _resolve(spec, ADAPTER, what)[0]


def _resolve(spec, kind: str, what: str, lazy: bool = False,
             scratch: Path | None = None) -> tuple[Path, dict[str, RemoteFile]]:
    parsed = parse_spec(spec)
    if parsed is None:
        return Path(os.path.expanduser(os.fspath(spec))), {}
    repo_id, revision = parsed
    rev = revision or "main"
    label = f"{what} {repo_id}@{rev}"
    if _offline():
        return _from_cache(repo_id, rev, kind, label, "HF_HUB_OFFLINE is set; run once online or unset HF_HUB_OFFLINE"), {}
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        info = api.model_info(repo_id, revision=rev, timeout=hub_timeout())
    except Exception as e:
        error, why = _hub_error(e, repo_id, rev, what)
        if why is None and not isinstance(error, _Fallback):
            raise error from None
        return _from_cache(repo_id, rev, kind, label, why, None if why else error), {}

    for _ in range(3):  # the branch may move between our listing and snapshot_download's
        names = {s.rfilename for s in info.siblings or []}
        meta, weights = _select(kind, names, label)
        folder = _download(repo_id, rev, meta + ([] if lazy or weights is None else weights), label, what)
        if folder.name == info.sha:
            break
        info = call_hub(lambda: api.model_info(repo_id, revision=folder.name, timeout=hub_timeout()), repo_id, rev, what)
    else:
        raise LorafuseError(f"{label} keeps changing on the Hub while lorafuse reads it; pin a commit: {repo_id}@<commit>")
    if weights is None:
        weights = _shards(folder / INDEX, label)
        absent = [w for w in weights if w not in names]
        if absent:
            raise LorafuseError(f"{label}: {INDEX} names {_few(absent)}, which the repo does not have; "
                                "the repo is broken at this revision, pick another one")
    remote = {}
    if lazy:
        remote = {w: RemoteFile(repo_id, w, folder.name, (scratch or folder) / w, scratch)
                  for w in weights if not (folder / w).is_file()}
    elif not all((folder / w).is_file() for w in weights):
        _download(repo_id, folder.name, weights, label, what)
    missing = [f for f in meta + weights if f not in remote and not (folder / f).is_file()]
    if missing:  # huggingface_hub said it downloaded them: the cache was changed under us
        raise LorafuseError(f"{label}: {_few(missing)} missing from {folder} after the download; run again")
    return folder, remote


def _select(kind: str, names: set[str], label: str) -> tuple[list[str], list[str] | None]:
    """From the repo's file list: the metadata files, and the weight files (None: read them from the index)."""
    top = sorted(n for n in names if "/" not in n and not n.startswith("."))
    if kind == ADAPTER:
        if ADAPTER_CONFIG not in names:
            raise LorafuseError(f"{label} has no {ADAPTER_CONFIG}; pass a PEFT adapter repo (one PEFT's save_pretrained or push_to_hub wrote)")
        weight = next((w for w in ADAPTER_WEIGHTS if w in names), None)
        if weight is None:
            raise LorafuseError(f"{label} has neither {ADAPTER_WEIGHTS[0]} nor {ADAPTER_WEIGHTS[1]}; pass a PEFT adapter repo")
        return [ADAPTER_CONFIG] + [n for n in top if TOKENIZER_FILE.match(n)], [weight]
    if CONFIG not in names:
        raise LorafuseError(f"{label} has no {CONFIG}; pass a transformers model repo")
    extras = [n for n in top if n not in NOT_NEEDED and n not in (CONFIG, INDEX)
              and not is_weight_file(n)]
    if INDEX in names:
        return [CONFIG, INDEX] + extras, None
    if SINGLE in names:
        return [CONFIG] + extras, [SINGLE]
    if any(PICKLE_WEIGHTS.match(n) for n in top):
        raise LorafuseError(f"{label} has only PyTorch pickle weights, no safetensors; pick a revision with safetensors "
                            "(the Hub's conversion bot opens one as refs/pr/N) or convert the model first")
    raise LorafuseError(f"{label} has neither {SINGLE} nor {INDEX}; pass a transformers model repo with safetensors weights")


def _shards(index: Path, label: str) -> list[str]:
    weight_map = read_json(index, label, "the repo is broken at this revision").get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise LorafuseError(f"{label}: {INDEX} has no weight_map; the repo is broken at this revision")
    shards = list(dict.fromkeys(str(v) for v in weight_map.values()))
    for name in shards:
        rel = PurePosixPath(name)
        if not name or rel.is_absolute() or ".." in rel.parts:
            raise LorafuseError(f"{label}: {INDEX} names shard {name!r} outside the repo; refusing to fetch it")
    return shards


def _download(repo_id: str, revision: str, files: list[str], label: str, what: str) -> Path:
    """snapshot_download of exactly `files`: cached ones are reused, missing ones fetched (in parallel)."""
    from huggingface_hub import snapshot_download

    folder = call_hub(lambda: snapshot_download(repo_id, revision=revision, allow_patterns=[glob.escape(f) for f in files]),
                   repo_id, revision, what, label=label, downloading=files)
    return Path(folder)


# -- the cache alone -------------------------------------------------------------------------------

def _from_cache(repo_id: str, rev: str, kind: str, label: str, why: str | None,
                error: LorafuseError | None = None) -> Path:
    """The cached snapshot when it holds every needed file; else `error`, or a message naming what is missing."""
    cache = cache_dir()
    folder = _snapshot(repo_id, rev)
    if folder is None:
        raise error or LorafuseError(f"{label} is not in the cache ({cache}) and {why}")
    needed, missing = _needed_from_cache(repo_id, folder, kind, label)
    if missing:
        if error:
            raise error
        verb = "is" if len(missing) == 1 else "are"
        raise LorafuseError(f"{label}: {_few(missing)} {verb} not in the cache ({cache}) and {why}")
    return folder


def _needed_from_cache(repo_id: str, folder: Path, kind: str, label: str) -> tuple[list[str], list[str]]:
    """(needed files, those missing) of a cached snapshot, from the cached tree listing when there is one."""
    listing = _cached_listing(repo_id, folder.name)
    if listing is not None:
        names = set(listing)
    else:  # no cached listing (older huggingface_hub): what is there, plus what must be there
        names = {p.name for p in folder.iterdir() if p.is_file()}
        if kind == MODEL:
            names |= {CONFIG} | ({INDEX} if not names & {INDEX, SINGLE} else set())
        else:
            names |= {ADAPTER_CONFIG} | ({ADAPTER_WEIGHTS[0]} if not names & set(ADAPTER_WEIGHTS) else set())
    meta, weights = _select(kind, names, label)
    if weights is None:
        weights = _shards(folder / INDEX, label) if (folder / INDEX).is_file() else []
    needed = meta + weights
    missing = [f for f in needed if not (folder / f).is_file()]
    if weights == [] and INDEX in missing:
        missing[missing.index(INDEX)] = f"{INDEX} (and the shards it names)"
    return needed, missing


def _snapshot(repo_id: str, rev: str) -> Path | None:
    """The cached snapshot folder of `rev` (a commit, or a branch or tag recorded in refs/), if any."""
    storage = cache_dir() / ("models--" + repo_id.replace("/", "--"))
    sha = rev if COMMIT.fullmatch(rev) else None
    if sha is None:
        ref = storage / "refs" / rev
        if ref.is_file():
            sha = ref.read_text().strip()
    if not sha or not COMMIT.fullmatch(sha):
        return None
    folder = storage / "snapshots" / sha
    return folder if folder.is_dir() else None


def _cached_listing(repo_id: str, sha: str) -> dict[str, int | None] | None:
    """path -> size of the repo at `sha` as snapshot_download cached it (huggingface_hub >= 1.x), else None."""
    try:
        from huggingface_hub import get_cached_repo_tree
    except ImportError:
        return None
    try:
        return {f.path: f.size for f in get_cached_repo_tree(repo_id, revision=sha)}
    except Exception:
        return None


def _offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


# -- what plan shows -------------------------------------------------------------------------------

def cache_status(spec: str | os.PathLike, *, kind: str = MODEL, what: str | None = None) -> dict:
    """Which files a merge needs from the repo, which are cached and which must be downloaded (with sizes
    when the Hub tells them). Downloads nothing and writes nothing into the cache; reads an uncached
    safetensors index (a few kB) into a temporary folder to learn the shard names.

    For a local folder: {"source": "local", "spec", "folder"}. For a repo: {"source": "hub", "spec",
    "repo_id", "revision", "commit", "cache", "online", "cached": [{"file", "size"}], "missing": [...],
    "download_bytes" (None when a size is unknown), "complete", "note" (why the answer is partial, or None)}.
    """
    parsed = parse_spec(spec)
    if parsed is None:
        return {"source": "local", "spec": os.fspath(spec), "folder": os.path.expanduser(os.fspath(spec))}
    repo_id, revision = parsed
    rev = revision or "main"
    what = what or ("adapter" if kind == ADAPTER else "base model")
    label = f"{what} {repo_id}@{rev}"
    status = {"source": "hub", "spec": os.fspath(spec), "repo_id": repo_id, "revision": rev, "commit": None,
              "cache": str(cache_dir()), "online": False, "cached": [], "missing": [], "download_bytes": None,
              "complete": False, "note": None}
    sizes: dict[str, int | None] = {}
    needed: list[str] | None = None
    refused: LorafuseError | None = None  # not found, gated, token refused: raised unless the cache serves
    if _offline():
        status["note"] = "HF_HUB_OFFLINE is set: only the cache was read"
    else:
        from huggingface_hub import HfApi

        try:
            info = HfApi().model_info(repo_id, revision=rev, files_metadata=True, timeout=3 * hub_timeout())
        except Exception as e:
            error, why = _hub_error(e, repo_id, rev, what)
            if why is None and not isinstance(error, _Fallback):
                raise error from None
            refused = None if why else error
            status["note"] = f"{why} (only the cache was read)" if why else "the Hub refused: only the cache was read"
        else:
            status.update(online=True, commit=info.sha)
            sizes = {s.rfilename: s.size for s in info.siblings or []}
            meta, weights = _select(kind, set(sizes), label)
            if weights is None:
                weights = _remote_shards(repo_id, info.sha, label, what)
            needed = meta + weights
    if needed is None:  # from the cache alone
        folder = _snapshot(repo_id, rev)
        if folder is None:
            if refused:
                raise refused
            status["note"] = f"{label} is not in the cache; {status['note']}"
            return status
        status["commit"] = folder.name
        sizes = _cached_listing(repo_id, folder.name) or {}
        needed, missing = _needed_from_cache(repo_id, folder, kind, label)
        if missing and refused:
            raise refused
        if kind == MODEL and not (folder / INDEX).is_file() and INDEX in needed:
            status["note"] += "; the shards are unknown until the index is downloaded"
    folder = cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots" / status["commit"]
    for name in needed:
        path = folder / name
        if path.is_file():
            status["cached"].append({"file": name, "size": path.stat().st_size})
        else:
            status["missing"].append({"file": name, "size": sizes.get(name)})
    missing_sizes = [m["size"] for m in status["missing"]]
    status["download_bytes"] = sum(missing_sizes) if all(s is not None for s in missing_sizes) else None
    status["complete"] = not status["missing"]
    return status


def _remote_shards(repo_id: str, sha: str, label: str, what: str) -> list[str]:
    """The shard names of the index: from the cache when it is there, else read through a temporary folder."""
    cached = cache_dir() / ("models--" + repo_id.replace("/", "--")) / "snapshots" / sha / INDEX
    if cached.is_file():
        return _shards(cached, label)
    from huggingface_hub import hf_hub_download

    with tempfile.TemporaryDirectory(prefix="lorafuse-index-") as tmp:
        path = call_hub(lambda: hf_hub_download(repo_id, INDEX, revision=sha, local_dir=tmp, cache_dir=tmp),
                     repo_id, sha, what, label=label, downloading=[INDEX])
        return _shards(Path(path), label)


def describe_status(status: dict) -> str:
    """One line for `lorafuse plan`, e.g. 'org/base@main (commit 1a2b3c4): 3 of 7 files to download, 1.20 GB'."""
    if status["source"] == "local":
        return status["folder"]
    where = f"{status['repo_id']}@{status['revision']}"
    if status["commit"]:
        where += f" (commit {status['commit'][:7]})"
    total = len(status["cached"]) + len(status["missing"])
    if status["complete"]:
        text = f"{where}: all {total} files cached"
    elif total:
        size = status["download_bytes"]
        text = f"{where}: {len(status['missing'])} of {total} files to download" + (
            f", {human_size(size)}" if size is not None else "")
    else:
        text = f"{where}: not cached"
    return text + (f" ({status['note']})" if status["note"] and not status["complete"] else "")
