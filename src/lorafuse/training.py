"""The call for a training script: merge a live PeftModel, as training left it, into a standalone model.

`save_pretrained_merged(model, save_directory, tokenizer)` saves the adapter with PEFT's own writer (it is
small) and the tokenizer or processor into a temporary folder beside the output, then streams the merge from
the base's files where the model was loaded from (its folder, or the Hugging Face cache), never from the
weights in memory: those may be 4-bit, offloaded or on a GPU, and copying them out would cost the training
process a second model. The call so adds only the streaming merge's bounded memory to the process.

`LorafuseMergeCallback` does the same at the end of a transformers Trainer's training (TRL, axolotl). It
subclasses transformers' TrainerCallback, so it is made on first use: `import lorafuse` imports neither
transformers nor torch.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from .api import MergeReport, _peak_rss, merge
from .errors import LorafuseError
from .formats.folder import fsync_path
from .output import check_file_target, check_target, rename_noreplace
from .plan import output_path
from .sinks.gguf import check_type
from .sources.hub import parse_spec, resolve_model_lazily

SAVE_METHODS = ("merged_16bit", "merged_4bit", "lora", "gguf")
EMBEDDING_HINT = ('pass modules_to_save=["embed_tokens", "lm_head"] in the LoraConfig when training, or '
                  "save_embedding_layers=True here")


def save_pretrained_merged(model, save_directory: str | os.PathLike, tokenizer=None, save_method: str = "merged_16bit",
                           max_shard_size: int | str | None = None, push_to_hub: str | None = None, *,
                           base: str | os.PathLike | None = None, adapter_name: str | None = None,
                           save_embedding_layers: bool = False, **merge_options) -> MergeReport:
    """Write the PeftModel `model` merged into its base at `save_directory`, as Unsloth's method of that name.

    `tokenizer`: the tokenizer or processor trained with, written with the model (its files win over the
    base's: training may add tokens). `save_method`: "merged_16bit" (the base's dtype, or `dtype=`),
    "merged_4bit" (bitsandbytes NF4), "lora" (the adapter alone, as PEFT saves it) or "gguf" (one GGUF file
    in `save_directory`, named after it and the `gguf_type`). `max_shard_size`: the largest safetensors shard
    (5GB when not given); for "gguf", llama.cpp's split files, only when given. `push_to_hub`: the Hub repo
    (`org/name`) to publish the merged model to as well.

    The base is the checkpoint the model was loaded from (its `name_or_path`, else the adapter's
    `base_model_name_or_path`): a folder, or a Hub repo id read from the Hugging Face cache; `base=` names
    another. A model loaded in 4-bit or 8-bit from a 16-bit checkpoint is merged into that 16-bit checkpoint,
    as Unsloth does (the report's notes say so); one loaded from a quantized checkpoint, into its dequantized
    weights. `adapter_name`: the adapter to merge, if the model has several active. A vocabulary resized in
    memory must be saved with the adapter: by `modules_to_save` when training, or `save_embedding_layers=True`.
    Other keywords go to `lorafuse.merge` (dtype, device, force, gguf_type, on_plan, ...).
    """
    if save_method not in SAVE_METHODS:
        raise LorafuseError(f"save_method {save_method!r} is not one of {', '.join(SAVE_METHODS)}")
    if push_to_hub is not None and not isinstance(push_to_hub, str):
        raise LorafuseError("push_to_hub takes the Hub repo to publish to (org/name); leave it out to save locally only")
    adapter_name = _adapter_to_merge(model, adapter_name)
    base = _base(model, adapter_name, base)
    base_config = _config_of(model, base)
    _check_embeddings(model, base_config, save_embedding_layers)
    notes = _notes(model, base_config, base)
    out = output_path(save_directory)
    if save_method == "lora":
        return _save_lora(model, adapter_name, tokenizer, out, push_to_hub, save_embedding_layers, merge_options)
    gguf = save_method == "gguf"
    force = merge_options.get("force", False)
    if gguf:
        gguf_type = merge_options.setdefault("gguf_type", "auto")
        check_type(gguf_type)
        target = out / f"{out.name}{'' if gguf_type == 'auto' else '-' + gguf_type.upper()}.gguf"
        if out.is_dir():
            check_file_target(target, force)
    else:
        target = out
        check_target(out, force)  # merge checks again; this spares saving the adapter for nothing
        max_shard_size = "5GB" if max_shard_size is None else max_shard_size
    on_plan = merge_options.pop("on_plan", None)

    def show(plan) -> None:
        if on_plan:
            on_plan(replace(plan, notes=[*plan.notes, *notes]))
    made_folder = gguf and _make_folder(out)
    try:
        with _adapter_folder(model, adapter_name, tokenizer, out, save_embedding_layers) as adapter:
            report = merge(base, adapter, target, save_method="merged_16bit" if gguf else save_method,
                           max_shard_size=max_shard_size, push_to_hub=push_to_hub, on_plan=show, **merge_options)
    except BaseException:
        if made_folder:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    return replace(report, notes=[*report.notes, *notes])


def _adapter_to_merge(model, name: str | None) -> str:
    """The adapter's name: `name`, or the model's one active adapter."""
    if not all(hasattr(model, a) for a in ("peft_config", "get_base_model", "save_pretrained", "active_adapters")):
        raise LorafuseError(f"save_pretrained_merged takes a PEFT model (what get_peft_model or PeftModel.from_pretrained "
                            f"returns), not a {type(model).__name__}")
    if name is None:
        active = list(model.active_adapters)
        if len(active) != 1:
            raise LorafuseError(f"the model has {len(active)} active adapters ({', '.join(active)}); pass adapter_name= "
                                "to choose the one to merge")
        return active[0]
    if name not in model.peft_config:
        raise LorafuseError(f"the model has no adapter {name!r} (it has {', '.join(model.peft_config)}); pass one of those")
    return name


def _base(model, adapter_name: str, base) -> str:
    """The base to merge into: `base`, else the first of the names the model was loaded by that is a folder
    with a config.json or a Hub repo id. The model's own name_or_path comes first: the adapter's
    base_model_name_or_path says what it was trained on, which may not be where this model was loaded from."""
    if base is not None:
        return os.fspath(base)
    names = [(model.get_base_model().name_or_path, "the model's name_or_path"),
             (model.peft_config[adapter_name].base_model_name_or_path, "the adapter's base_model_name_or_path")]
    tried, seen = [], set()
    for name, where in names:
        if not name or os.fspath(name) in seen:
            continue
        name = os.fspath(name)
        seen.add(name)
        try:
            repo = parse_spec(name)
        except LorafuseError:
            tried.append(f"{name} ({where}): no such folder, and not a Hub repo id")
            continue
        if repo is None and not os.path.isfile(os.path.join(os.path.expanduser(name), "config.json")):
            tried.append(f"{name} ({where}): no config.json in that folder")
            continue
        return name
    found = "; ".join(tried) or "the model names none (was it made from a config?)"
    raise LorafuseError(f"cannot find the checkpoint the model was loaded from ({found}); pass base= the folder or "
                        "Hub repo id of its weights")


def _config_of(model, base: str):
    """The base's config.json, read by the live model's config class (so that a vision-language model's text
    config is where the live one's is), from the base's folder or the Hugging Face cache (huggingface_hub
    fetches the small files the cache lacks, as the merge would)."""
    folder, _ = resolve_model_lazily(base)
    return type(model.get_base_model().config).from_pretrained(folder)


def _check_embeddings(model, base_config, save_embedding_layers: bool) -> None:
    """A vocabulary resized in memory (new tokens) must reach the merge in the adapter: as a module PEFT saves
    whole (`modules_to_save`) or with PEFT's `save_embedding_layers`. Without them the adapter holds no rows
    for the new tokens, and the merged model would not match the tokenizer."""
    from peft.utils import ModulesToSaveWrapper

    live = model.get_base_model().config.get_text_config().vocab_size
    stored = base_config.get_text_config().vocab_size
    if live == stored or save_embedding_layers:
        return
    layers = {"input embedding": model.get_input_embeddings()}
    if not getattr(model.get_base_model().config.get_text_config(), "tie_word_embeddings", False):
        layers["output head"] = model.get_output_embeddings()
    missing = [what for what, layer in layers.items() if layer is not None and not isinstance(layer, ModulesToSaveWrapper)]
    if missing:
        raise LorafuseError(f"the model's vocabulary was resized to {live} tokens (the base has {stored}), but the adapter "
                            f"would not hold the resized {' and '.join(missing)}; {EMBEDDING_HINT}")


def _notes(model, base_config, base: str) -> list[str]:
    """What the report says of this merge beyond the plan's notes: a model trained quantized on loading is
    merged into the checkpoint it was quantized from."""
    loaded = getattr(model.get_base_model().config, "quantization_config", None)
    if not loaded or getattr(base_config, "quantization_config", None):
        return []
    method = loaded.get("quant_method") if isinstance(loaded, dict) else getattr(loaded, "quant_method", None)
    method = getattr(method, "value", method)
    return [f"the model was trained quantized on loading ({method}) from {base}: the adapter is merged into {base}'s "
            "own weights, as Unsloth does, not into the quantized ones it was trained against"]


@contextlib.contextmanager
def _adapter_folder(model, adapter_name: str, tokenizer, out: Path, save_embedding_layers: bool):
    """The adapter saved by PEFT, with the tokenizer or processor, in a temporary folder beside OUT (on its disk),
    deleted afterwards. The merge carries the adapter's tokenizer files over the base's."""
    if tokenizer is not None and not hasattr(tokenizer, "save_pretrained"):
        raise LorafuseError(f"tokenizer must be a tokenizer or processor (with save_pretrained), not a "
                            f"{type(tokenizer).__name__}")
    if not out.parent.is_dir():
        raise LorafuseError(f"the parent folder of {out} does not exist; create it first")
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.lorafuse-adapter-", dir=out.parent))
    try:
        model.save_pretrained(folder, selected_adapters=[adapter_name], save_embedding_layers=save_embedding_layers)
        saved = folder if adapter_name == "default" else folder / adapter_name  # where PEFT puts the others
        if tokenizer is not None:
            tokenizer.save_pretrained(saved)
        yield saved
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _save_lora(model, adapter_name: str, tokenizer, out: Path, push_to_hub, save_embedding_layers: bool,
               options: dict) -> MergeReport:
    """save_method "lora": the adapter as PEFT saves it, with the tokenizer, moved into place at OUT when
    complete, and only where nothing is."""
    if push_to_hub or options:
        given = ["push_to_hub"] * bool(push_to_hub) + sorted(options)
        raise LorafuseError(f"save_method 'lora' saves the adapter as PEFT writes it, so {', '.join(given)} does not "
                            "apply; leave it out (model.push_to_hub publishes an adapter)")
    if os.path.lexists(out):
        raise LorafuseError(f"{out} already exists; the adapter is saved only where nothing is: choose a new folder")
    started = time.perf_counter()
    with _adapter_folder(model, adapter_name, tokenizer, out, save_embedding_layers) as adapter:
        for path in adapter.iterdir():
            fsync_path(path)
        if not rename_noreplace(adapter, out):
            raise LorafuseError(f"{out} appeared while the adapter was saved (another program?) and is left as it is; "
                                "choose a new folder")
    fsync_path(out.parent)
    written = sum(path.stat().st_size for path in out.iterdir())
    return MergeReport(out=str(out), shards=1, tensors_merged=0, tensors_cast=0, tensors_copied=0, bytes_read=0,
                       bytes_written=written, shards_resumed=0, seconds=round(time.perf_counter() - started, 3),
                       peak_memory=_peak_rss())


def _make_folder(folder: Path) -> bool:
    """Make the folder a GGUF file goes into; True if it was made here (and so is removed if the merge fails)."""
    if folder.is_dir():
        return False
    try:
        folder.mkdir()
    except FileExistsError:
        raise LorafuseError(f"{folder} exists and is not a folder; save_method 'gguf' writes a file into a folder") from None
    except FileNotFoundError:
        raise LorafuseError(f"the parent folder of {folder} does not exist; create it first") from None
    return True


def __getattr__(name: str):
    if name == "LorafuseMergeCallback":
        global LorafuseMergeCallback
        LorafuseMergeCallback = _make_callback()
        return LorafuseMergeCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _make_callback():
    from transformers import TrainerCallback

    class LorafuseMergeCallback(TrainerCallback):
        """Merge the trained adapter when training ends: `save_pretrained_merged(model, save_directory, ...)`,
        with the trainer's tokenizer or processor unless `tokenizer` is given; on the main process only. The
        report is kept in `self.report`."""

        def __init__(self, save_directory: str | os.PathLike, tokenizer=None, save_method: str = "merged_16bit",
                     max_shard_size: int | str | None = None, push_to_hub: str | None = None, **options) -> None:
            self.save_directory, self.tokenizer, self.save_method = save_directory, tokenizer, save_method
            self.max_shard_size, self.push_to_hub, self.options = max_shard_size, push_to_hub, options
            self.report: MergeReport | None = None

        def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            if state.is_world_process_zero:
                self.report = save_pretrained_merged(
                    model, self.save_directory, self.tokenizer if self.tokenizer is not None else processing_class,
                    self.save_method, self.max_shard_size, self.push_to_hub, **self.options)

    LorafuseMergeCallback.__module__, LorafuseMergeCallback.__qualname__ = __name__, "LorafuseMergeCallback"
    return LorafuseMergeCallback
