"""What makes a merge resumable and checkable: a ledger of finished shards, and a manifest in OUT.

While a merge runs, the staging folder keeps a ledger: the plan's fingerprint and, for each finished
shard, its size and SHA-256. A rerun of the same merge (same inputs, same settings, hence the same
fingerprint) trusts a finished shard only after re-hashing it, and redoes the rest. The finished
OUT holds `lorafuse-manifest.json`: every file's size and SHA-256, the settings and the identity of
base and adapter, so a published merge can be checked (`lorafuse verify`) and reproduced.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from . import __version__ as VERSION
from .errors import LorafuseError
from .output import fsync_path
from .plan import SAVE_METHODS, Plan

MANIFEST = "lorafuse-manifest.json"
LEDGER = ".lorafuse-ledger.json"
HASH_CHUNK = 16 << 20


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            digest.update(view[:n])
    return digest.hexdigest()


DTYPE_OPTIONS = {"auto": "auto", "BF16": "bf16", "F16": "fp16", "F32": "fp32"}  # plan.dtype -> --dtype


def settings_record(plan: Plan, device: str) -> dict:
    """The merge's settings as merge() takes them: `lorafuse verify` plans the same merge from them, and
    a merge can be reproduced (the model card shows them to people)."""
    return {"lorafuse": VERSION, "base": plan.base_name, "adapter": plan.adapter_name,
            "dtype": DTYPE_OPTIONS[plan.dtype], "save_method": plan.save_method,
            "max_shard_size": plan.max_shard_size, "device": device}


def read_settings(manifest: dict) -> dict:
    """The settings record of a parsed manifest, checked; a one-line error says what is wrong with it."""
    record = manifest.get("settings")
    if not isinstance(record, dict):
        raise LorafuseError(f"{MANIFEST} has no settings record; it was not written by this lorafuse, so the "
                            "merge cannot be recomputed from it")
    checks = {
        "dtype": lambda v: v in DTYPE_OPTIONS.values(),
        "save_method": lambda v: v in SAVE_METHODS,
        "max_shard_size": lambda v: isinstance(v, (int, str)) and not isinstance(v, bool),
        **{key: lambda v: isinstance(v, str) for key in ("lorafuse", "base", "adapter", "device")},
    }
    bad = [key for key, ok in checks.items() if not ok(record.get(key))]
    if bad:
        raise LorafuseError(f"{MANIFEST}'s settings record has a missing or invalid {', '.join(bad)}")
    return record


def identity(plan: Plan) -> dict:
    """Base and adapter as they were: config hashes and weight file sizes."""
    base, adapter = plan.base, plan.adapter
    return {
        "base": {
            "path": str(base.folder),
            "config_sha256": _sha256_bytes(json.dumps(base.config, sort_keys=True).encode()),
            "files": dict(base.file_sizes),
        },
        "adapter": {
            "path": str(adapter.folder),
            "config_sha256": _sha256_bytes(json.dumps(adapter.config, sort_keys=True).encode()),
            "files": {adapter.weights_file.name: adapter.weights_file.stat().st_size},
        },
    }


def fingerprint(plan: Plan, settings: dict) -> str:
    """Equal for two runs exactly when they would write the same shards: the adapter's weights hashed
    (two checkpoints of one run have equal configs and sizes), each base file by size and version (inode,
    mtime and ctime: too big to hash on every run; a Hub repo's files by commit, cached or not), the
    settings and the output layout; not the names the inputs were given by."""
    ident = identity(plan)
    ident["adapter"]["weights_sha256"] = sha256_file(plan.adapter.weights_file)
    ident["base"]["versions"] = dict(plan.base.file_versions)
    for side in ident.values():
        side.pop("path")
    kept = {k: v for k, v in settings.items() if k not in ("base", "adapter")}
    layout = [[s.filename, _sha256_bytes(s.header)] for s in plan.shards]
    return _sha256_bytes(json.dumps([VERSION, ident, kept, layout], sort_keys=True).encode())


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Ledger:
    """The staging folder's record of finished shards."""

    def __init__(self, staging: Path, print_: str) -> None:
        self.path = staging / LEDGER
        self.fingerprint = print_
        self.shards: dict[str, dict] = {}
        self.uploaded: set[str] = set()  # finished shards the Hub holds and the disk no longer does (--low-disk)
        self._lock = threading.Lock()  # shards finish on different threads
        try:
            saved = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(saved, dict) and saved.get("fingerprint") == print_ and isinstance(saved.get("shards"), dict):
            self.shards = saved["shards"]

    @property
    def resumable(self) -> bool:
        return bool(self.shards)

    def finished(self, filename: str, size: int) -> bool:
        """A shard counts as finished only if it is there, whole, and hashes as recorded (or the Hub holds
        it: see `uploaded`)."""
        with self._lock:
            entry = self.shards.get(filename)
        if filename in self.uploaded and entry and entry.get("size") == size:
            return True
        path = self.path.parent / filename
        ok = bool(entry) and path.is_file() and path.stat().st_size == size == entry.get("size") \
            and sha256_file(path) == entry.get("sha256")
        if not ok:
            with self._lock:
                self.shards.pop(filename, None)
        return ok

    def record(self, filename: str, size: int, sha256: str) -> None:
        with self._lock:
            self.shards[filename] = {"size": size, "sha256": sha256}
            self._write()

    def save(self) -> None:
        """Write the ledger again (after `publish` deleted it and could not move the folder into place)."""
        with self._lock:
            self._write()

    def _write(self) -> None:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "shards": self.shards}))
        fsync_path(tmp)
        os.replace(tmp, self.path)

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)


def write_manifest(plan: Plan, folder: Path, settings: dict, shards: dict[str, dict]) -> None:
    """Hash every file of the finished output; `shards` (the ledger's) were hashed as they completed, and
    may be gone from the folder already (uploaded, with --low-disk)."""
    files = {name: {"size": entry["size"], "sha256": entry["sha256"]} for name, entry in shards.items()}
    for path in sorted(folder.iterdir()):
        if path.name in (MANIFEST, LEDGER) or path.name in files or not path.is_file():
            continue
        files[path.name] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    files = dict(sorted(files.items()))
    manifest = {"settings": settings, **identity(plan), "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
