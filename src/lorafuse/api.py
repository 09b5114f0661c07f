"""The public entry points: plan() and merge()."""

from __future__ import annotations

import gc
import importlib
import os
import resource
import shutil
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .compute import needs_torch
from .errors import LorafuseError
from .execute import PARTIAL, disk_error, write_shards
from .manifest import Ledger, fingerprint, settings_record, write_manifest
from .output import check_target, exclusive, publish, staging_folder, write_metadata
from .plan import Plan, existing_ancestor, make_plan
from .publish import HubPublisher
from .sources.hub import cache_dir
from .units import human_size

DISK_MARGIN = 64 << 20  # room for config, tokenizer files and the file system's own overhead
DOWNLOADS = "downloads"  # in the staging folder: base shards fetched for a --low-disk merge


@dataclass
class MergeReport:
    out: str
    shards: int
    tensors_merged: int
    tensors_cast: int
    tensors_copied: int
    bytes_read: int
    bytes_written: int
    shards_resumed: int
    seconds: float
    peak_memory: int  # peak resident set size of this process, bytes
    hub_url: str | None = None  # the commit that published it, with push_to_hub

    def to_dict(self) -> dict:
        return asdict(self)


def plan(base: str | os.PathLike | None, adapter: str | os.PathLike, out: str | os.PathLike | None = None, *,
         dtype: str = "auto", max_shard_size: int | str = "5GB", save_method: str = "merged_16bit") -> Plan:
    """Plan a merge from the headers alone; nothing is written."""
    return make_plan(base, adapter, out, dtype=dtype, max_shard_size=max_shard_size, save_method=save_method)


def merge(base: str | os.PathLike | None, adapter: str | os.PathLike, out: str | os.PathLike, *, dtype: str = "auto",
          max_shard_size: int | str = "5GB", save_method: str = "merged_16bit", device: str = "cpu", force: bool = False,
          resume: bool = False, push_to_hub: str | None = None, private: bool = False, revision: str | None = None,
          commit_message: str | None = None, low_disk: bool = False,
          on_plan: Callable[[Plan], None] | None = None,
          on_progress: Callable[[int], None] | None = None) -> MergeReport:
    """Merge ADAPTER into BASE and write a standalone model to OUT.

    BASE and ADAPTER are folders or Hugging Face repo ids (`org/name[@revision]`, read from the cache
    and downloaded when missing); BASE None takes the base the adapter names.
    `on_plan` sees the plan before any work starts; `on_progress` receives the bytes of each tensor
    written. Raises LorafuseError for every problem the user can fix; OUT is then left untouched.
    A merge that was interrupted (killed, disk full, Ctrl-C) continues where it stopped when run again
    with the same inputs and settings; `resume=True` insists that there is such a run to continue.
    `push_to_hub="org/name"` uploads each shard as soon as it is finished and publishes the whole model
    as one commit at the end (on `revision`, in a `private` repo if it is new).
    Base shards the cache lacks are downloaded into the cache as the merge reaches them; `low_disk=True`
    downloads them into the staging folder instead and deletes each once merged, and with `push_to_hub`
    deletes each output shard once uploaded too (OUT then holds all but the shards).
    """
    started = time.perf_counter()
    out = Path(out)
    check_target(out, force)
    with exclusive(out):  # a second merge into OUT would wipe this one's staging folder
        staging = staging_folder(out)
        the_plan = make_plan(base, adapter, out, dtype=dtype, max_shard_size=max_shard_size, save_method=save_method,
                             scratch=staging / DOWNLOADS if low_disk else None)
        _import_in_background(the_plan, device)
        torch_device = _device(device)
        settings = settings_record(the_plan, device)
        print_ = fingerprint(the_plan, settings)
        finished = Ledger(staging, print_).shards if staging.is_dir() else {}
        for partial in staging.glob("*" + PARTIAL):  # a killed run's unfinished shards, redone from scratch:
            partial.unlink()                          # their room is free for the rest
        # A resume needs room only for the rest: what an interrupted run left (finished shards, base shards
        # fetched for --low-disk) already takes its share.
        done = sum(entry["size"] for name, entry in finished.items() if (staging / name).is_file()) \
            + _bytes_under(staging / DOWNLOADS)
        hold = _check_disk(the_plan, out, done, low_disk, pushing=bool(push_to_hub))
        if on_plan:
            on_plan(the_plan)
        hub = HubPublisher(push_to_hub, private=private, revision=revision, commit_message=commit_message,
                           delete_uploaded=low_disk).start() if push_to_hub else None  # a bad token or repo fails now
        ledger = _open_ledger(staging, print_, resume)
        if hub and low_disk:  # an earlier run's shards that went up and were deleted need not be merged again
            ledger.uploaded = {name for name, entry in ledger.shards.items()
                               if not (staging / name).exists() and hub.adopt(name, entry["sha256"], entry["size"])}
        try:
            counters = write_shards(the_plan, staging, torch_device, ledger, on_progress,
                                    on_shard_done=(lambda path, sha: hub.shard_done(path, sha256=sha)) if hub else None,
                                    hold=hold, before_shard=hub.wait if hub and low_disk else None)
            shutil.rmtree(staging / DOWNLOADS, ignore_errors=True)
            try:
                write_metadata(the_plan, staging, settings)
                write_manifest(the_plan, staging, settings, ledger.shards)
            except OSError as e:
                raise disk_error(e, staging) from None
            # The commit goes first: if it fails, the staging folder and its ledger are still there, and a
            # rerun commits without merging again (with --low-disk the shards exist only on the Hub).
            hub_url = hub.finish(staging, skip={ledger.path.name}) if hub else None
            try:
                publish(staging, out, keep_until_renamed=ledger.path)
            except OSError as e:
                raise disk_error(e, staging) from None
        except BaseException:
            if hub:
                hub.close()
            if not ledger.resumable:  # nothing finished: leave no trace
                shutil.rmtree(staging, ignore_errors=True)
            raise
        return MergeReport(
            out=str(out),
            shards=len(the_plan.shards),
            seconds=round(time.perf_counter() - started, 3),
            peak_memory=_peak_rss(),
            hub_url=hub_url,
            **vars(counters),
        )


def _check_disk(plan: Plan, out: Path, done: int, low_disk: bool, pushing: bool) -> int | None:
    """Refuse a merge the disks cannot hold (`done`: bytes of it already there), saying what would fit.
    Returns how many downloaded base shards a --low-disk merge keeps at once: one more than it must when
    the disk has room, so that the next downloads while the current one is merged."""
    out_need, cache_need = plan.disk_needs(low_disk, pushing)
    out_need = max(out_need - done, 0) + DISK_MARGIN
    free = plan.disk_free
    low_disk_need = plan.disk_needs(True, pushing)[0]
    hint = f", or pass --low-disk (needs {human_size(low_disk_need)})" \
        if not low_disk and low_disk_need + DISK_MARGIN <= free else ""
    what = "the output needs"
    if cache_need:
        cache = existing_ancestor(cache_dir())
        if os.stat(cache).st_dev == os.stat(existing_ancestor(out.absolute())).st_dev:
            out_need += cache_need
            what = "the output and the downloads need"
        elif (cache_free := shutil.disk_usage(cache).free) < cache_need + DISK_MARGIN:
            raise LorafuseError(f"downloading the base needs {human_size(cache_need)} in the Hugging Face cache {cache} but "
                                f"only {human_size(cache_free)} is free there; free space, point HF_HUB_CACHE at "
                                f"another disk{hint}")
    if free < out_need:
        raise LorafuseError(f"{what} {human_size(out_need - DISK_MARGIN)} more but only {human_size(free)} is free "
                            f"on the disk holding {out.absolute().parent}; free space{hint}")
    if not low_disk or not plan.base.remote:
        return None
    return plan.download_hold + (free >= out_need + plan.largest_download)


def _bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _open_ledger(staging: Path, print_: str, resume: bool) -> Ledger:
    """Continue the same merge's unfinished run, or start afresh."""
    ledger = Ledger(staging, print_) if staging.is_dir() else None
    if ledger is None or not ledger.resumable:
        if resume:
            raise LorafuseError(f"there is no unfinished run of this merge to resume ({staging} holds none); run without --resume")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        ledger = Ledger(staging, print_)
    return ledger


def _import_in_background(plan: Plan, device: str) -> None:
    """Import the compute paths the plan takes on a thread of its own; the first tensor that needs one
    waits for it.

    numpy (0.07 s; both paths use its buffers) is imported here because a Ctrl-C that lands in the main
    thread while numpy's C extension loads breaks numpy and comes out as an ImportError; landing while
    the main thread waits for this thread's import, it is a plain KeyboardInterrupt. Torch (1.3-1.8 s,
    mostly holding the GIL) only when a tensor needs it, as it would hold the GIL the numpy path needs;
    meanwhile what releases the GIL overlaps it (copying untouched tensors, hashing them). The cyclic
    garbage collector stays off during torch's import and then leaves what exists alone (gc.freeze): it
    would rescan torch's hundred thousand new objects again and again (0.2-0.3 s). Last, what writing the
    model card needs. An import that fails here fails again, with its message, where it is needed."""
    modules = []
    if not all(t.is_copy for t in plan.tensors):
        modules.append("lorafuse.compute.rows")
    if any(needs_torch(t, device) for t in plan.tensors) and "torch" not in sys.modules:
        modules.append("torch")
    modules.append("huggingface_hub.repocard_data")

    def load() -> None:
        for name in modules:
            try:
                if name == "torch":
                    _import_torch()
                else:
                    importlib.import_module(name)
            except ImportError:
                pass

    threading.Thread(target=load, name="lorafuse-import").start()


def _import_torch() -> None:
    collecting = gc.isenabled()
    gc.disable()
    try:
        importlib.import_module("torch")
    finally:
        gc.freeze()
        if collecting:
            gc.enable()


def _device(name: str) -> str:
    """The device the patches are computed on; "cpu" needs no check, so no wait for torch."""
    if name == "cpu":
        return name
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise LorafuseError(f"--device {name!r} is not a device; use cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise LorafuseError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise LorafuseError(f"--device {name!r} is not supported; use cpu or cuda")
    return str(device)


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024
