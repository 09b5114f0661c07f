"""Everything in the output folder besides the shards, and the atomic finish.

The output is assembled in a hidden staging folder next to OUT and renamed into place only when
complete, so OUT is either absent, the previous folder (with --force), or the finished merge.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path

from .errors import LorafuseError
from .formats.folder import INDEX
from .plan import Plan
from .sources.hub import parse_spec


def staging_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.lorafuse-partial"


@contextlib.contextmanager
def exclusive(out: Path):
    """One merge at a time into OUT: a second would wipe the first's staging folder. The kernel drops
    the lock when its holder dies, so a killed merge never blocks the next."""
    lock_path = out.parent / f".{out.name}.lorafuse-lock"
    fd = os.open(lock_path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise LorafuseError(f"another lorafuse merge is writing {out}; wait for it to finish") from None
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        os.close(fd)


def check_target(out: Path, force: bool) -> None:
    """Refuse an existing OUT without --force, and an OUT whose parent cannot be written."""
    if out.exists() and not force:
        raise LorafuseError(f"output folder {out} already exists; choose another or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise LorafuseError(f"output path {out} exists and is not a folder")
    parent = out.absolute().parent
    if not parent.is_dir():
        raise LorafuseError(f"the parent folder of {out} does not exist; create it first")
    try:  # a real probe: root passes access() checks on folders it cannot write (read-only mounts)
        os.rmdir(tempfile.mkdtemp(prefix=".lorafuse-probe-", dir=parent))
    except OSError as e:
        why = "it is on a read-only file system" if e.errno == errno.EROFS else e.strerror.lower()
        raise LorafuseError(f"cannot write to {parent}: {why}; choose another output folder") from None


def write_metadata(plan: Plan, folder: Path, settings: dict) -> None:
    """Index, config.json, tokenizer and other non-weight files, and a model card."""
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.total_size},
            "weight_map": {slot.name: s.filename for s in plan.shards for group in s.slots for slot in group},
        }
        (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    for source in plan.carried:
        shutil.copyfile(source, folder / source.name)
    (folder / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    with open(folder / "README.md", "w", encoding="utf-8", newline="") as f:
        f.write(_model_card(plan, settings))


def _model_card(plan: Plan, settings: dict) -> str:
    """The README.md that huggingface_hub's ModelCard would save, without importing its Hub client (0.25 s)."""
    from huggingface_hub import ModelCardData  # 0.05 s, imported while the merge runs (api._import_in_background)

    repo_id = _repo_id(plan.base_name) or _repo_id(plan.adapter.base_name or "")
    data = ModelCardData(base_model=repo_id, library_name="transformers", tags=["lorafuse", "merge", "lora"])
    config = plan.adapter.config
    shown = {
        "base": plan.base_name,
        "adapter": plan.adapter_name,
        "r / lora_alpha": f"{config.get('r')} / {config.get('lora_alpha')}",
        "rsLoRA": bool(config.get("use_rslora")),
        "patches": ", ".join(f"{n} {k}" for k, n in sorted(plan.counts.items())),
        "output dtype": plan.dtype,
        "save method": plan.save_method,
        "shards": len(plan.shards),
        "device": settings["device"],
        "lorafuse": settings["lorafuse"],
    }
    rows = "\n".join(f"| {k} | {v} |" for k, v in shown.items())
    return (
        f"---\n{data.to_yaml()}\n---\n\n# {plan.out.name if plan.out else 'merged model'}\n\n"
        f"This model is `{repo_id or plan.base_name}` with the LoRA adapter `{plan.adapter_name}` merged into its weights "
        "by [lorafuse](https://pypi.org/project/lorafuse/). It needs no PEFT to load.\n\n"
        f"| setting | value |\n|---|---|\n{rows}\n"
    )


def _repo_id(name: str) -> str | None:
    """The Hub repo a name refers to (for the card's base_model), or None for a local folder."""
    try:
        parsed = parse_spec(name)
    except LorafuseError:
        return None
    return parsed[0] if parsed else None


def publish(staging: Path, out: Path, keep_until_renamed: Path) -> None:
    """Make the staged folder durable, then move it into place in one rename; with --force, swap it
    with the old OUT in one atomic exchange where the OS offers one. The resume ledger goes last, so an
    interruption before the rename can still resume."""
    for path in staging.iterdir():
        if path != keep_until_renamed:
            fsync_path(path)
    keep_until_renamed.unlink(missing_ok=True)
    fsync_path(staging)
    if not out.exists():
        os.rename(staging, out)
    elif _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now holds the old OUT
    else:
        old = out.parent / f".{out.name}.lorafuse-old"
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
        os.rename(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    fsync_path(out.absolute().parent)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def fsync_path(path: Path) -> None:
    """fsync a file or a folder (a folder's entries: the names of what was created or renamed in it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
