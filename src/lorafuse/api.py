"""The public entry points: plan() and merge()."""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import resource
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

from .costs import needs_torch, torch_feature
from .errors import InputError, LorafuseError, OutputComplete, require_torch
from .execute import write_shards
from .execute.work import TensorValues
from .formats.folder import identity_of
from .manifest import (HUB_HASH, LEDGER, LOCAL_HASH, MANIFEST, Ledger, fingerprint as run_fingerprint, run_hash,
                       settings_record, write_manifest)
from .output import (MARKER, check_file_target, check_staged, check_target, claim_staging, clear, disk_error, exclusive,
                     make_staging, move_file_into_place, move_into_place, regular_file, staging_folder)
from .plan import DISK_MARGIN, Plan, make_plan, output_path, remeasured, room
from .sinks import adapter_folder
from .sinks.gguf import check_type, gguf_model_card, gguf_output, is_gguf, split_files
from .sinks.gguf import lora as lora_gguf
from .sinks.gguf import write as write_gguf
from .sinks.gguf.converter import NEEDED_FOR_LORA
from .sinks.gguf.converter import find as find_converter
from .sinks.gguf.quantize import find as find_quantizer
from .sinks.hub import HubPublisher
from .sinks.safetensors import SAFETENSORS
from .units import human_size

DOWNLOADS = "downloads"  # in the staging folder: base shards fetched for a --low-disk merge
LORA = "lora"  # the save method that writes the adapter alone (api._save_lora)


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
    notes: list[str] = field(default_factory=list)  # the plan's notes: what the merge did that may surprise

    def to_dict(self) -> dict:
        return asdict(self)


def plan(base: str | os.PathLike | None, adapter: str | os.PathLike | Sequence[str | os.PathLike],
         out: str | os.PathLike | None = None, *, dtype: str = "auto", max_shard_size: int | str | None = None,
         save_method: str = "merged_16bit", weights: Sequence[float] | None = None, gguf_type: str = "auto",
         push_to_hub: str | None = None) -> Plan:
    """Plan a merge from the headers alone; nothing is written. For an OUT ending in .gguf the plan's
    `file_output` says what GGUF file(s) the merge writes."""
    if out is not None and is_gguf(out):
        return _gguf_plan(base, adapter, weights, output_path(out), dtype, gguf_type, max_shard_size, bool(push_to_hub))
    return make_plan(base, adapter, out, sink=SAFETENSORS, dtype=dtype,
                     max_shard_size="5GB" if max_shard_size is None else max_shard_size, save_method=save_method,
                     weights=weights)


def _gguf_plan(base, adapter, weights, out: Path, dtype: str, gguf_type: str, max_shard_size: int | str | None,
               pushing: bool) -> Plan:
    """A safetensors merge's plan (the same tensors, the same bytes; its files give the converter's order)
    with the GGUF it becomes."""
    check_type(gguf_type)
    plan = make_plan(base, adapter, out, sink=SAFETENSORS, dtype=dtype, weights=weights)
    return replace(plan, file_output=gguf_output(plan, out, gguf_type, max_shard_size, pushing))


def merge(base: str | os.PathLike | None, adapter: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike,
          *, weights: Sequence[float] | None = None, dtype: str = "auto", max_shard_size: int | str | None = None,
          save_method: str = "merged_16bit", device: str = "cpu", force: bool = False,
          resume: bool = False, push_to_hub: str | None = None, private: bool = False, revision: str | None = None,
          commit_message: str | None = None, low_disk: bool = False,
          gguf_type: str = "auto", llama_cpp: str | os.PathLike | None = None,
          on_plan: Callable[[Plan], None] | None = None,
          on_progress: Callable[[int], None] | None = None) -> MergeReport:
    """Merge ADAPTER into BASE and write a standalone model to OUT.

    BASE and ADAPTER are folders or Hugging Face repo ids (`org/name[@revision]`, read from the cache
    and downloaded when missing); BASE None takes the base the adapter names. ADAPTER may be a list of
    adapters for one base: OUT is then the base plus the weighted sum of their deltas, W + Σ wᵢ·ΔWᵢ
    (`weights`: one number per adapter, 1 each by default; BASE must be named), in fp32, rounded once.
    `on_plan` sees the plan before any work starts; `on_progress` receives the bytes of each tensor
    written. Raises LorafuseError for every problem the user can fix; OUT is then left untouched. With
    `force=True` the folder at OUT when the merge starts is replaced, and nothing else: a folder that
    appears at OUT meanwhile is left alone, and the finished merge waits in the staging folder.
    A merge that was interrupted (killed, disk full, Ctrl-C) continues where it stopped when run again
    with the same inputs and settings; `resume=True` insists that there is such a run to continue.
    `push_to_hub="org/name"` uploads each shard as soon as it is finished and publishes the whole model
    as one commit at the end (on `revision`, in a `private` repo if it is new).
    Base shards the cache lacks are downloaded into the cache as the merge reaches them; `low_disk=True`
    downloads them into the staging folder instead and deletes each once merged, and with `push_to_hub`
    deletes each output shard once uploaded too (OUT then holds all but the shards).
    `max_shard_size` (default 5GB) bounds each safetensors shard.
    An OUT ending in `.gguf` is one GGUF file (`gguf_type`: auto, f32, f16, bf16, q8_0, or a type of llama.cpp's
    quantizer: q4_k_m, ...), written by llama.cpp's converter from `llama_cpp` (a checkout; default
    LLAMA_CPP_DIR, else a pinned copy fetched once) and quantized by its quantizer;
    with `max_shard_size`, llama.cpp's split files beside OUT instead (OUT's stem + -00001-of-0000N.gguf), as
    also when `push_to_hub` gets a GGUF larger than the Hub takes in one file.
    `save_method`: "merged_16bit" (the default), "merged_4bit" (the merged linear weights re-quantized to
    bitsandbytes NF4), or "lora": no merge, the adapter alone, checked against BASE, as a LoRA GGUF for
    llama.cpp's --lora when OUT ends in `.gguf` (written by llama.cpp's convert_lora_to_gguf.py; adapters it
    would get wrong are rescaled or refused: sinks/gguf/lora.py), else as a PEFT folder.
    """
    if save_method == LORA:
        return _save_lora(base, adapter, weights, out, dtype=dtype, max_shard_size=max_shard_size, device=device, force=force,
                          resume=resume, push_to_hub=push_to_hub, low_disk=low_disk, gguf_type=gguf_type,
                          llama_cpp=llama_cpp)
    if is_gguf(out):
        if low_disk or resume:
            raise LorafuseError("a GGUF output is written in one go: --low-disk and --resume are for safetensors folders")
        hub = HubPublisher(push_to_hub, private=private, revision=revision,
                           commit_message=commit_message) if push_to_hub else None
        return _merge_gguf(base, adapter, weights, out, dtype, save_method, gguf_type, llama_cpp, max_shard_size, hub, force,
                           on_plan, on_progress)
    if max_shard_size is None:
        max_shard_size = "5GB"
    started = time.perf_counter()
    out = output_path(out)  # absolute and normalised: `.` or `dir/..` would give the staging folder a wrong name
    replacing = check_target(out, force)
    staging = staging_folder(out)
    # Before anything is created or deleted: the plan checks that no input is a path the merge writes.
    plan = make_plan(base, adapter, out, sink=SAFETENSORS, dtype=dtype, max_shard_size=max_shard_size,
                     save_method=save_method, scratch=staging / DOWNLOADS if low_disk else None, weights=weights)
    _check_torch(plan, device)
    interrupt = _InterruptAfterPublish(out)
    with interrupt, exclusive(out):  # a second merge into OUT would wipe this one's staging folder
        run = _start_run(plan, staging, device, resume, low_disk, pushing=bool(push_to_hub))
        if on_plan:
            on_plan(plan)
        hub = HubPublisher(push_to_hub, private=private, revision=revision, commit_message=commit_message,
                           delete_uploaded=low_disk).start() if push_to_hub else None  # a bad token or repo fails now
        make_staging(staging)
        if hub and low_disk:  # an earlier run's shards that went up and were deleted need not be merged again
            run.ledger.uploaded = {name for name, entry in run.ledger.shards.items() if not (staging / name).exists()
                                   and HUB_HASH in entry and hub.adopt(name, entry[HUB_HASH], entry["size"])}
        try:
            counters = write_shards(plan, staging, run.device, run.ledger, on_progress,
                                    on_shard_done=(lambda path, sha: hub.shard_done(path, sha256=sha)) if hub else None,
                                    sink=SAFETENSORS, algorithm=run.algorithm, hold=run.hold,
                                    before_shard=hub.wait if hub and low_disk else None)
            hub_url = _finish(plan, staging, out, run, hub, interrupt, replacing)
        except BaseException as e:
            if hub:
                hub.close()
            # Nothing finished, or bad inputs that a rerun must change anyway (hence start afresh): no trace.
            if (not run.ledger.resumable or isinstance(e, InputError)) and interrupt.staged is None:
                with contextlib.suppress(LorafuseError):  # what stopped the merge is what to report
                    clear(staging)
            raise
        return MergeReport(out=str(out), shards=len(plan.shards), seconds=round(time.perf_counter() - started, 3),
                           peak_memory=_peak_rss(), hub_url=hub_url, notes=list(plan.notes),
                           **vars(counters))


def _merge_gguf(base, adapter, weights, out, dtype: str, save_method: str, gguf_type: str, llama_cpp,
                max_shard_size: int | str | None, hub: HubPublisher | None, force: bool,
                on_plan: Callable[[Plan], None] | None, on_progress: Callable[[int], None] | None) -> MergeReport:
    """The merge as GGUF: planned as a safetensors merge (the same tensors, the same bytes, its files giving
    the converter's order), then llama.cpp's converter pulls each merged tensor and writes the file (or the
    split files) in the staging folder; pushed to the Hub if asked, then moved beside OUT when complete."""
    require_torch("a GGUF output (llama.cpp's converter)", extra="gguf")
    started = time.perf_counter()
    gguf_type = check_type(gguf_type)
    quantizer = find_quantizer(gguf_type, llama_cpp)  # for the types llama.cpp's quantizer makes; else None
    if save_method != "merged_16bit":
        raise LorafuseError(f"--save-method {save_method} writes safetensors; a GGUF output is quantized by --gguf-type")
    out = output_path(out)
    replacing = check_file_target(out, force)
    for earlier in split_files(out):
        check_file_target(earlier, force)
    staging = staging_folder(out)
    plan = _gguf_plan(base, adapter, weights, out, dtype, gguf_type, max_shard_size, pushing=hub is not None)
    output = plan.file_output
    _check_file_room(plan, output.size, "writing the GGUF")
    llama_cpp = find_converter(llama_cpp)
    with exclusive(out):
        claim_staging(out)
        clear(staging)
        if hub:
            hub.start()  # a bad token or repo fails now, before the merge
        make_staging(staging)
        if on_plan:
            on_plan(plan)
        values = TensorValues(plan, on_progress)
        try:
            settings = settings_record(plan, "cpu")
            made = write_gguf(plan, output, staging, llama_cpp, settings, values, quantizer)
            hub_url = _publish_gguf(hub, plan, made, settings) if hub else None
            # The first file last: llama.cpp opens a split GGUF by its first file, which then finds all the rest.
            for path in made[1:] + made[:1]:
                target = out.parent / path.name
                move_file_into_place(path, target, replacing if target == out else check_file_target(target, force))
        except OSError as e:
            raise disk_error(e, staging) from None
        finally:
            values.close()
            if hub:
                hub.close()
            with contextlib.suppress(LorafuseError):
                clear(staging)
    written = [out.parent / path.name for path in made]
    return MergeReport(out=str(written[0]), shards=len(written), tensors_merged=len(plan.merged), tensors_cast=0,
                       tensors_copied=len(plan.tensors) - len(plan.merged), bytes_read=plan.base.total_bytes,
                       bytes_written=sum(path.stat().st_size for path in written), shards_resumed=0,
                       seconds=round(time.perf_counter() - started, 3), peak_memory=_peak_rss(), hub_url=hub_url,
                       notes=list(plan.notes))


def _publish_gguf(hub: HubPublisher, plan: Plan, made: list[Path], settings: dict) -> str:
    """Commit the GGUF file(s) and a model card to the Hub, in one commit, from the staging folder."""
    card = made[0].parent / "README.md"
    with open(card, "x", encoding="utf-8") as f:
        f.write(gguf_model_card(plan, settings, [path.name for path in made]))
    try:
        return hub.finish(made[0].parent)
    finally:
        card.unlink()


def _check_torch(plan: Plan, device: str) -> None:
    """A merge that needs torch (costs.needs_torch: a GPU, a quantized base, DoRA, 4-bit output) stops here,
    before anything is written, with the install to run when torch is not installed: it is an extra."""
    if device != "cpu":
        require_torch(f"--device {device}")
    feature = next(filter(None, map(torch_feature, plan.tensors)), None)
    if feature:
        require_torch(feature)


def _save_lora(base, adapter, weights, out, *, dtype: str, max_shard_size, device: str, force: bool, resume: bool,
               push_to_hub: str | None, low_disk: bool, gguf_type: str, llama_cpp) -> MergeReport:
    """save_method "lora": the adapter alone, as a LoRA GGUF (OUT ending in .gguf) or a PEFT folder. The merge's
    plan is made all the same, for its checks (every adapter tensor matches a base tensor, in shape; OUT is no
    input), though nothing is merged; then the file or folder is written in the staging folder and moved into
    place when complete."""
    started = time.perf_counter()
    gguf = is_gguf(out)
    given = {"several adapters": not isinstance(adapter, (str, os.PathLike)) and len(adapter) != 1,
             "--weights": weights is not None,
             "--dtype": dtype != "auto", "--max-shard-size": max_shard_size is not None, "--device": device != "cpu",
             "--resume": resume, "--push-to-hub": bool(push_to_hub), "--low-disk": low_disk,
             "--gguf-type": not gguf and gguf_type != "auto", "--llama-cpp": not gguf and llama_cpp is not None}
    if any(given.values()):
        raise LorafuseError(f"--save-method lora writes the adapter as it is, so {', '.join(k for k, v in given.items() if v)} "
                            "does not apply; leave it out (--gguf-type and --llama-cpp are for an OUT ending in .gguf)")
    if gguf:
        check_type(gguf_type)
    out = output_path(out)
    replacing = check_file_target(out, force) if gguf else check_target(out, force)
    staging = staging_folder(out)
    plan = make_plan(base, adapter, out, sink=SAFETENSORS)
    rescale = lora_gguf.needs_rescaling(plan) if gguf else False
    _check_file_room(plan, lora_gguf.size_bound(plan) if gguf else adapter_folder.size(plan.adapter), "the adapter")
    llama_cpp = find_converter(llama_cpp, NEEDED_FOR_LORA) if gguf else None
    with exclusive(out):
        claim_staging(out)
        clear(staging)
        make_staging(staging)
        try:
            if gguf:
                move_file_into_place(lora_gguf.write(plan, staging, gguf_type, llama_cpp, rescale), out, replacing)
            else:
                written = adapter_folder.written_files(plan.adapter)
                adapter_folder.write(plan.adapter, staging)
                write_manifest(plan, staging, {**settings_record(plan, device), "save_method": LORA}, {}, written,
                               LOCAL_HASH)  # never pushed: --push-to-hub is refused above
                move_into_place(staging, out, keep_until_renamed=None, replacing=replacing, written=written | {MANIFEST})
        except OSError as e:
            raise disk_error(e, staging) from None
        finally:
            with contextlib.suppress(LorafuseError):
                clear(staging)
    size = out.stat().st_size if gguf else sum(p.stat().st_size for p in out.iterdir())
    return MergeReport(out=str(out), shards=1, tensors_merged=0, tensors_cast=0,
                       tensors_copied=len(plan.adapter.tensors), bytes_read=plan.adapter.weights_file.stat().st_size,
                       bytes_written=size, shards_resumed=0, seconds=round(time.perf_counter() - started, 3),
                       peak_memory=_peak_rss())


def _check_file_room(plan: Plan, size: int, what: str) -> None:
    """Refuse, before anything is written, an output of up to `size` bytes that OUT's disk cannot hold."""
    need = size + DISK_MARGIN
    if plan.disk_free is not None and plan.disk_free < need:
        raise LorafuseError(f"{what} needs up to {human_size(need)} (with {human_size(DISK_MARGIN)} to spare), but only "
                            f"{human_size(plan.disk_free)} is free on the disk holding {plan.out.parent}; free space or "
                            "write it elsewhere")


@dataclass
class _Run:
    """What a merge into the staging folder goes on with, once its earlier run (if any) is weighed."""

    device: object  # the torch device, or "cpu"
    settings: dict  # the manifest's record of the settings
    ledger: Ledger  # the shards finished so far (a resumed run's)
    hold: int | None  # --low-disk: downloaded base shards kept at once
    algorithm: str  # what the output is hashed with (manifest.run_hash)


def _start_run(plan: Plan, staging: Path, device: str, resume: bool, low_disk: bool, pushing: bool) -> _Run:
    """Under the lock: claim the staging folder, start importing what the merge needs, take over an earlier
    run's finished shards if it merged the same thing, and check the disks' room for the rest."""
    claim_staging(plan.out)
    _import_in_background(plan, device)
    torch_device = _device(device)
    settings = settings_record(plan, device)
    ledger = _reusable_run(staging, run_fingerprint(plan, settings), resume, {s.filename for s in plan.shards})
    # A resume needs room only for the rest: what an interrupted run left (finished shards, base shards
    # fetched for --low-disk) already takes its share.
    done = sum(entry["size"] for name, entry in ledger.shards.items() if (staging / name).is_file()) \
        + _bytes_under(staging / DOWNLOADS)
    hold = _check_disk(remeasured(plan), done, low_disk, pushing)
    return _Run(torch_device, settings, ledger, hold, run_hash(pushing))


def _finish(plan: Plan, staging: Path, out: Path, run: _Run, hub, interrupt: _InterruptAfterPublish,
            replacing: tuple[int, int, int] | None) -> str | None:
    """The shards are written: write the small files and the manifest, commit to the Hub if asked, and move
    the staging folder into place. Returns the Hub commit's URL."""
    clear(staging / DOWNLOADS)
    made = SAFETENSORS.written_files(plan)
    try:
        SAFETENSORS.write_metadata(plan, staging, run.settings)
        write_manifest(plan, staging, run.settings, run.ledger.shards, made, run.algorithm)
    except OSError as e:
        raise disk_error(e, staging) from None
    written = made | {s.filename for s in plan.shards} | {MANIFEST}
    # The commit goes first: if it fails, the staging folder and its ledger are still there, and a rerun
    # commits without merging again (with --low-disk the shards exist only on the Hub).
    if hub:
        check_staged(staging, out, written | {LEDGER, MARKER})
    hub_url = hub.finish(staging, skip={LEDGER, MARKER}) if hub else None
    interrupt.staged = identity_of(staging)
    try:
        move_into_place(staging, out, keep_until_renamed=run.ledger.path, replacing=replacing, written=written)
    except (LorafuseError, KeyboardInterrupt):  # OUT taken meanwhile, or Ctrl-C: unless it was moved into
        if identity_of(staging) == interrupt.staged:  # place, the finished merge stays staged, resumable
            run.ledger.save()
        raise
    except OSError as e:
        raise disk_error(e, staging) from None
    return hub_url


def _check_disk(plan: Plan, done: int, low_disk: bool, pushing: bool) -> int | None:
    """Refuse a merge the disks cannot hold (`done`: bytes of it already there), saying what would fit.
    Returns how many downloaded base shards a --low-disk merge keeps at once: one more than it must when
    the disk has room, so that the next downloads while the current one is merged."""
    problem, spare = room(plan, done, low_disk, pushing)
    if problem:
        raise LorafuseError(problem)
    if not low_disk or not plan.base.remote:
        return None
    return plan.download_hold + (spare >= plan.largest_download)


def _bytes_under(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def _reusable_run(staging: Path, fingerprint: str, resume: bool, shard_names: set[str]) -> Ledger:
    """The ledger of this merge's unfinished run, if there is one, and nothing else in the staging folder:
    everything there that the rerun cannot trust (a killed run's half-written shards, a shard finished but
    not recorded when the disk filled, another merge's run, a link or anything else not a regular file at
    a shard's name) is deleted before the room is checked, so that a rerun fits whenever a fresh merge
    would. `claim_staging` has checked that the folder is lorafuse's."""
    ledger = Ledger(staging, fingerprint, shard_names)
    ledger.shards = {name: entry for name, entry in ledger.shards.items()  # a shard gone was uploaded (--low-disk)
                     if regular_file(staging / name) or not os.path.lexists(staging / name)}
    if not ledger.resumable:
        if resume:
            raise LorafuseError(f"there is no unfinished run of this merge to resume ({staging} holds none); run without --resume")
        clear(staging)
        return ledger
    downloads = staging / DOWNLOADS  # the Hub client writes into it and lorafuse deletes from it: a real folder
    kept = {DOWNLOADS} if downloads.is_dir() and not downloads.is_symlink() else set()
    clear(staging, keep={LEDGER, *kept, *ledger.shards})
    return ledger


class _InterruptAfterPublish:
    """Turns a Ctrl-C that lands once the finished merge may be at OUT (`staged`: the staging folder's
    identity, set just before the move) into OutputComplete when it is: the folder at OUT is the one
    staged, which no race between the move and a flag can get wrong. Entered before the lock, so that its
    release is covered too."""

    def __init__(self, out: Path) -> None:
        self.out, self.staged = out, None

    def __enter__(self) -> "_InterruptAfterPublish":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is not None and issubclass(kind, KeyboardInterrupt) and self.staged is not None \
                and identity_of(self.out) == self.staged:
            raise OutputComplete(str(self.out)) from None


def _import_in_background(plan: Plan, device: str) -> None:
    """Import the compute paths the plan takes on a thread of its own; the first tensor that needs one
    waits for it.

    numpy (both paths use its buffers) is imported here because a Ctrl-C that lands in the main
    thread while numpy's C extension loads breaks numpy and comes out as an ImportError; landing while
    the main thread waits for this thread's import, it is a plain KeyboardInterrupt. Torch (a long import,
    mostly holding the GIL) only when a tensor needs it, as it would hold the GIL the numpy path needs;
    meanwhile what releases the GIL overlaps it (copying untouched tensors, hashing them). The cyclic
    garbage collector stays off during torch's import and then leaves what exists alone (gc.freeze): it
    would rescan torch's many new objects again and again. Nothing of huggingface_hub is imported here: its
    lazy submodules, imported by this thread and the main thread at once, can deadlock the two. An import that fails here fails again, with its
    message, where it is needed."""
    modules = []
    if not all(t.is_copy for t in plan.tensors):
        modules.append("lorafuse.compute.rows")
    if any(needs_torch(t, device) for t in plan.tensors) and "torch" not in sys.modules:
        modules.append("torch")

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
