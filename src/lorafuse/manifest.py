"""What makes a merge resumable and checkable: a ledger of finished shards, and a manifest in OUT.

While a merge runs, the staging folder keeps a ledger: the plan's fingerprint and, for each finished
shard, its size and hash. A rerun of the same merge (same inputs, same settings, hence the same
fingerprint) trusts a finished shard only after re-hashing it, and redoes the rest. The finished
OUT holds `lorafuse-manifest.json`: every file's size and hash, the settings and the identity of
base and adapter, so a published merge can be checked (`lorafuse verify`) and reproduced.

The hash is XXH3-128, except for a merge pushed to the Hub: SHA-256 there, as the Hub's LFS names its
objects by it (hashed once, as the shards are written, instead of again by the upload). A local manifest
only has to catch torn, corrupted or changed files: whoever can rewrite the shards can rewrite the
manifest too, so a cryptographic hash adds nothing there, while SHA-256 costs an order of magnitude more
CPU, a large part of a merge's (benchmarks/NOTES.md). An entry names its algorithm (its key:
`{"size": n, "xxh3_128": hex}`), and every reader checks a file with the entry's own one, so manifests
and ledgers of either kind (those of earlier versions: SHA-256) are read alike.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import threading
from pathlib import Path

import xxhash

from .version import __version__ as VERSION
from .errors import LorafuseError
from .formats.jsonfile import parse_json
from .formats.folder import create, fsync_path
from .plan import SAVE_METHODS, Plan

MANIFEST = "lorafuse-manifest.json"
LEDGER = ".lorafuse-ledger.json"
HASH_CHUNK = 16 << 20
LEDGER_LIMIT = 16 << 20  # bytes: a ledger of a hundred thousand shards; anything bigger is not one
HASHES = {"xxh3_128": xxhash.xxh3_128, "sha256": hashlib.sha256}  # an entry's key -> its hash (32, 64 hex digits)
LOCAL_HASH, HUB_HASH = "xxh3_128", "sha256"
HEX = re.compile(r"[0-9a-f]+")


def run_hash(pushing: bool) -> str:
    """The algorithm a merge hashes its output with: SHA-256 only when it is pushed (see the module's
    docstring)."""
    return HUB_HASH if pushing else LOCAL_HASH


def entry_hash(entry) -> tuple[str, str] | None:
    """(algorithm, hex digest) of a ledger or manifest entry: exactly one key of HASHES, holding a digest of
    its length; None for anything else (no lorafuse wrote it)."""
    if not isinstance(entry, dict):
        return None
    keys = [name for name in HASHES if name in entry]
    if len(keys) != 1:
        return None
    (algorithm,) = keys
    digest = entry[algorithm]
    if not isinstance(digest, str) or len(digest) != 2 * HASHES[algorithm]().digest_size or not HEX.fullmatch(digest):
        return None
    return algorithm, digest


def file_digest(path: Path, algorithm: str, follow: bool = True) -> str:
    """The file's hex digest by `algorithm` (a key of HASHES). `follow=False` for a file in the staging
    folder: a link there fails to open (OSError). The buffer is no larger than the file: a full chunk's
    buffer would be zeroed and faulted in for every small file (config, model card) too."""
    digest = HASHES[algorithm]()
    with open(os.open(path, os.O_RDONLY | (0 if follow else os.O_NOFOLLOW)), "rb", buffering=0) as f:
        buf = bytearray(max(1, min(HASH_CHUNK, os.fstat(f.fileno()).st_size)))
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


DTYPE_OPTIONS = {"auto": "auto", "BF16": "bf16", "F16": "fp16", "F32": "fp32"}  # plan.dtype -> --dtype


def settings_record(plan: Plan, device: str) -> dict:
    """The merge's settings as merge() takes them: `lorafuse verify` plans the same merge from them, and
    a merge can be reproduced (the model card shows them to people)."""
    return {"lorafuse": VERSION, "base": plan.base_name, "adapters": list(plan.adapter_names),
            "weights": list(plan.weights), "dtype": DTYPE_OPTIONS[plan.dtype], "save_method": plan.save_method,
            "max_shard_size": plan.max_shard_size, "device": device}


def read_settings(manifest: dict) -> dict:
    """The settings record of a parsed manifest, checked; a one-line error says what is wrong with it. A record
    from before several adapters could be merged names one `adapter`: it is read as that adapter, weight 1."""
    record = manifest.get("settings")
    if not isinstance(record, dict):
        raise LorafuseError(f"{MANIFEST} has no settings record; it was not written by this lorafuse, so the "
                            "merge cannot be recomputed from it")
    if "adapters" not in record and isinstance(record.get("adapter"), str):
        record = {**{k: v for k, v in record.items() if k != "adapter"}, "adapters": [record["adapter"]], "weights": [1.0]}
    checks = {
        "dtype": lambda v: v in DTYPE_OPTIONS.values(),
        "save_method": lambda v: v in SAVE_METHODS,
        "max_shard_size": lambda v: isinstance(v, (int, str)) and not isinstance(v, bool),
        "adapters": lambda v: isinstance(v, list) and v and all(isinstance(name, str) for name in v),
        "weights": lambda v: isinstance(v, list) and len(v) == len(record.get("adapters") or ()) and all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) for w in v),
        **{key: lambda v: isinstance(v, str) for key in ("lorafuse", "base", "device")},
    }
    bad = [key for key, ok in checks.items() if not ok(record.get(key))]
    if bad:
        raise LorafuseError(f"{MANIFEST}'s settings record has a missing or invalid {', '.join(bad)}")
    return record


def identity(plan: Plan) -> dict:
    """Base and adapter as they were: config hashes and weight file sizes; with several adapters, a list of
    them under "adapters", in order."""
    base = plan.base
    adapters = [{
        "path": str(adapter.folder),
        "config_sha256": _sha256_bytes(json.dumps(adapter.config, sort_keys=True).encode()),
        "files": {adapter.weights_file.name: adapter.weights_file.stat().st_size},
    } for adapter in plan.adapters]
    return {
        "base": {
            "path": str(base.folder),
            "config_sha256": _sha256_bytes(json.dumps(base.config, sort_keys=True).encode()),
            "files": dict(base.file_sizes),
        },
        **({"adapters": adapters} if len(adapters) > 1 else {"adapter": adapters[0]}),
    }


def fingerprint(plan: Plan, settings: dict) -> str:
    """Equal for two runs exactly when they would write the same shards: each adapter's weight file hashed
    (two checkpoints of one run have equal configs and sizes), each base file by size and version (inode,
    mtime and ctime: too big to hash on every run; a Hub repo's files by commit, cached or not), the
    settings (the adapters' weights among them) and the output layout; not the names the inputs were given by."""
    ident = identity(plan)
    adapters = ident.get("adapters") or [ident["adapter"]]
    for adapter, entry in zip(plan.adapters, adapters):
        entry["weights_xxh3_128"] = file_digest(adapter.weights_file, LOCAL_HASH)  # it delays the first output byte
    ident["base"]["versions"] = dict(plan.base.file_versions)
    for side in [ident["base"], *adapters]:
        side.pop("path")
    kept = {k: v for k, v in settings.items() if k not in ("base", "adapters")}
    layout = [[s.filename, _sha256_bytes(s.header)] for s in plan.shards]
    return _sha256_bytes(json.dumps([VERSION, ident, kept, layout], sort_keys=True).encode())


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Ledger:
    """The staging folder's record of finished shards."""

    def __init__(self, staging: Path, fingerprint: str, shard_names: set[str]) -> None:
        self.path = staging / LEDGER
        self.fingerprint = fingerprint
        self.shards: dict[str, dict] = {}
        self.uploaded: set[str] = set()  # finished shards the Hub holds and the disk no longer does (--low-disk)
        self._lock = threading.Lock()  # shards finish on different threads
        saved = _read_ledger(self.path)
        if isinstance(saved, dict) and saved.get("fingerprint") == fingerprint and isinstance(saved.get("shards"), dict):
            self.shards = {name: entry for name, entry in saved["shards"].items()
                           if name in shard_names and _valid_entry(entry)}

    @property
    def resumable(self) -> bool:
        return bool(self.shards)

    def finished(self, filename: str, size: int) -> bool:
        """A shard counts as finished only if it is there, whole, and hashes as recorded, by the entry's own
        algorithm (a run pushed to the Hub resumes one that was not, and the other way round), or the Hub
        holds it: see `uploaded`."""
        with self._lock:
            entry = self.shards.get(filename)
        if filename in self.uploaded and entry and entry["size"] == size:
            return True
        path = self.path.parent / filename
        ok = False
        if entry and _regular_size(path) == size == entry["size"]:
            algorithm, digest = entry_hash(entry)
            ok = file_digest(path, algorithm, follow=False) == digest
        if not ok:
            with self._lock:
                self.shards.pop(filename, None)
        return ok

    def record(self, filename: str, size: int, algorithm: str, digest: str) -> None:
        with self._lock:
            self.shards[filename] = {"size": size, algorithm: digest}
            self._write()

    def save(self) -> None:
        """Write the ledger again (after `move_into_place` deleted it and could not move the folder into place)."""
        with self._lock:
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        with create(tmp) as f:
            f.write(json.dumps({"fingerprint": self.fingerprint, "shards": self.shards}).encode())
        fsync_path(tmp, follow=False)
        os.replace(tmp, self.path)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def _read_ledger(path: Path):
    """The ledger's JSON value, or None where there is no usable ledger: no file, or anything but a regular
    file of at most LEDGER_LIMIT bytes holding JSON (a link is not followed, a FIFO not waited on, a
    device not read without end)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    with open(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = f.read(LEDGER_LIMIT + 1)
    if len(data) > LEDGER_LIMIT:
        return None
    try:
        return parse_json(data, path)
    except LorafuseError:
        return None


def _valid_entry(entry) -> bool:
    """A ledger entry as `Ledger.record` writes it: {"size": int >= 0, ALGORITHM: its hex digest}, nothing else."""
    return entry_hash(entry) is not None and len(entry) == 2 and type(entry.get("size")) is int and entry["size"] >= 0


def _regular_size(path: Path) -> int | None:
    """The size of a regular file at `path` (not a link), else None."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def write_manifest(plan: Plan, folder: Path, settings: dict, shards: dict[str, dict], written: set[str],
                   algorithm: str) -> None:
    """Hash the files of the finished output: `shards` (the ledger's) were hashed as they completed, and
    may be gone from the folder already (uploaded, with --low-disk); the other files `written` by the
    merge are hashed here, by `algorithm` (the run's). Only those: whatever else the folder might hold was
    not made by the merge. A shard taken over from an interrupted run keeps the algorithm it was recorded
    with."""
    files = {name: dict(entry) for name, entry in shards.items()}
    for name in sorted(written - set(files)):
        path = folder / name
        files[name] = {"size": path.lstat().st_size, algorithm: file_digest(path, algorithm, follow=False)}
    files = dict(sorted(files.items()))
    manifest = {"settings": settings, **identity(plan), "files": files}
    with create(folder / MANIFEST) as f:
        f.write((json.dumps(manifest, indent=2) + "\n").encode())
