"""`lorafuse verify OUT`: is a merged model folder whole, unaltered and finite, and (given base and
adapter) are its merged tensors right?

Checks, one tensor in memory at a time: the manifest's size and hash of every file (by the algorithm its
entry names: XXH3-128, or SHA-256 for a merge pushed to the Hub or written before), and that OUT
holds nothing else (transformers would load an extra model.safetensors, .bin or chat template); every
shard's header (strictly, as when reading a base); the index against the shards; no NaN or Inf in any
floating tensor; and with --base/--adapter, the merge planned again from the manifest's settings
record: OUT must hold the files it plans, its shards the tensors it plans, config.json and the carried
files as planned, README.md the model card it writes, and a sample of merged tensors (--sample all:
every one) recomputed in float64 must agree with the output to within one rounding to its dtype.

The recomputation is written here again, plainly and in float64, on purpose: it shares no arithmetic
with patches.py or compute/ (only the readers and the matching of adapter tensors to base tensors),
so that a mistake in the merge's arithmetic cannot hide by being made twice.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Callable

import torch

from ..adapters.peft import split_key
from ..compute.tensors import all_finite
from ..errors import LorafuseError
from ..formats.jsonfile import parse_json
from ..formats.folder import INDEX, SINGLE
from ..formats.safetensors import FLOAT_DTYPES, read_header, torch_dtype
from ..manifest import MANIFEST, entry_hash, file_digest, identity, read_settings
from ..sinks.safetensors import SAFETENSORS
from ..sinks.safetensors.files import model_card, written_files
from ..patches import AddBias, ExpertLoRA, LoRA, SliceRef
from ..plan import CONV1D_MODULES, Plan, TensorPlan, make_plan, model_types
from ..quant import QuantizedTensor

FP32_SLACK = 64 * torch.finfo(torch.float32).eps
# What the Hugging Face client adds to a folder it downloads a repo into; transformers reads neither.
HUB_FILES = re.compile(r"^(\.gitattributes|\.cache/huggingface/.*)$")


class Verdict(list):
    """The problems found, one line each (an empty list: OUT passed), and how many tensors were recomputed
    or compared with the base, of how many: a spot check must never read as a full check."""

    recomputed: tuple[int, int] = (0, 0)  # merged tensors recomputed, of those that can be (not re-quantized to NF4)
    compared: tuple[int, int] = (0, 0)  # tensors the adapter leaves alone compared with the base's, of those
    requantized: int = 0  # merged tensors re-quantized to NF4: bitsandbytes' rounding, left to the manifest's hashes


def verify(out: str | Path, base: str | Path | None = None, adapter: str | Path | list | None = None,
           sample: int | str = 8) -> Verdict:
    """Everything wrong with OUT, as one line each; an empty list means it passed. `sample`: how many merged
    (and untouched) tensors to recompute with base and adapter, or "all". `adapter`: a list for a merge of
    several, in the order they were merged (their weights are the manifest's)."""
    size = _sample_size(sample)
    out = Path(out)
    if not out.is_dir():
        raise LorafuseError(f"{out} is not a folder")
    if (base is None) != (adapter is None):
        raise LorafuseError("pass both --base and --adapter to recompute merged tensors, or neither")
    manifest, problems = _check_manifest(out)
    verdict = Verdict(problems)
    names = _shard_names(out, verdict)
    if manifest:
        for name in ["config.json"] + ([INDEX] if (out / INDEX).is_file() else []) + names:
            if name not in manifest["files"]:
                verdict.append(f"{name} is not listed in the manifest")
        try:
            settings = read_settings(manifest)
        except LorafuseError as e:
            verdict.append(str(e))
    headers = {}
    for name in names:
        try:
            headers[name] = read_header(out / name)
        except LorafuseError as e:
            verdict.append(str(e))
    for name, header in headers.items():
        for key, ref in header.tensors.items():
            if ref.dtype in FLOAT_DTYPES and not all_finite(ref.read()):
                verdict.append(f"{name}: tensor {key} holds NaN or Inf values")
    if base is not None and not verdict:  # a manifest with a valid settings record
        adapters = [adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter)
        recorded = settings["adapters"]
        if len(adapters) != len(recorded):
            verdict.append(f"the manifest records {len(recorded)} adapter(s) ({', '.join(recorded)}) but --adapter names "
                           f"{len(adapters)}: pass each with --adapter, in that order")
            return verdict
        plan = make_plan(base, adapters, sink=SAFETENSORS, dtype=settings["dtype"], save_method=settings["save_method"],
                         max_shard_size=settings["max_shard_size"], weights=settings["weights"])
        verdict += _check_inputs(plan, manifest)
        if not verdict:
            verdict += _check_layout(plan, headers) + _check_files(plan, out, manifest["files"])
            verdict += _check_card(plan, out, settings)
        if not verdict:
            _recompute(plan, headers, size, verdict)
    return verdict


def _sample_size(sample: int | str) -> int | None:
    """--sample as a count of tensors, None for "all". Zero or fewer would recompute nothing and still
    pass, so they are refused."""
    if sample == "all":
        return None
    count = int(sample) if isinstance(sample, str) and sample.isdecimal() else sample
    if type(count) is not int or count < 1:
        raise LorafuseError(f"--sample must be a positive number of tensors or 'all', not {sample!r}")
    return count


def _check_manifest(out: Path) -> tuple[dict, list[str]]:
    """The parsed manifest (empty when unusable), and what is wrong with OUT's files against it."""
    path = out / MANIFEST
    if not path.is_file():
        return {}, [f"{out} has no {MANIFEST}; only merges written by lorafuse can be checked against one"]
    manifest = read_json_as(path, _is_manifest)
    if manifest is None:
        return {}, [f"{path} is not a valid lorafuse manifest"]
    files = manifest["files"]
    problems = []
    for name, entry in files.items():
        file = out / name
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not name:
            problems.append(f"the manifest lists {name!r}, which is outside {out}")
        elif file.is_symlink():
            problems.append(f"{name} is a link, not a file the merge wrote")
        elif not file.is_file():
            problems.append(f"{name} is listed in the manifest but missing")
        elif file.stat().st_size != entry.get("size"):
            problems.append(f"{name} is {file.stat().st_size} bytes, the manifest says {entry.get('size')}")
        else:
            algorithm, digest = entry_hash(entry)
            if file_digest(file, algorithm) != digest:
                problems.append(f"{name} does not match its {algorithm} hash in the manifest (modified or corrupted)")
    for name in _everything_in(out):
        if name != MANIFEST and name not in files and not HUB_FILES.match(name):
            problems.append(f"{name} is not listed in the manifest: the merge did not write it, and transformers "
                            "may load it; remove it")
    return manifest, problems


def _everything_in(out: Path) -> list[str]:
    """Every file, link or other non-folder under OUT, subfolders included, by relative path."""
    found = []
    for folder, dirs, files in os.walk(out):
        links = [d for d in dirs if os.path.islink(os.path.join(folder, d))]
        for name in files + links:
            found.append(Path(folder, name).relative_to(out).as_posix())
    return sorted(found)


def read_json_as(path: Path, valid: Callable[[object], bool]):
    """The JSON value in `path` if it parses and `valid` accepts it, else None: a damaged file is a
    problem to report, never an exception."""
    try:
        value = parse_json(path.read_bytes(), path)
    except (LorafuseError, OSError):
        return None
    return value if valid(value) else None


def _is_manifest(value) -> bool:
    files = value.get("files") if isinstance(value, dict) else None
    return isinstance(files, dict) and all(  # the settings record is checked by read_settings, which says what is wrong
        entry_hash(e) is not None and type(e.get("size")) is int for e in files.values())


def _is_index(value) -> bool:
    if not isinstance(value, dict) or not isinstance(value.get("metadata"), dict):
        return False
    weight_map = value.get("weight_map")
    return isinstance(weight_map, dict) and all(isinstance(v, str) for v in weight_map.values()) \
        and type(value["metadata"].get("total_size")) is int


def _shard_names(out: Path, problems: list[str]) -> list[str]:
    """The shards the index names, after checking the index against their headers."""
    index = out / INDEX
    if not index.is_file():
        if not (out / SINGLE).is_file():
            problems.append(f"{out} has neither {SINGLE} nor {INDEX}")
            return []
        return [SINGLE]
    if (out / SINGLE).exists():
        problems.append(f"{out} holds both {SINGLE} and {INDEX}: transformers loads {SINGLE} alone")
    data = read_json_as(index, _is_index)
    if data is None:
        problems.append(f"{INDEX} is not a valid index")
        return []
    weight_map, total = data["weight_map"], data["metadata"]["total_size"]
    names = sorted(set(weight_map.values()))
    found, size = {}, 0
    for name in names:
        if not (out / name).is_file():
            problems.append(f"{INDEX} names {name}, which is missing")
            continue
        try:
            for key, ref in read_header(out / name).tensors.items():
                found[key] = name
                size += ref.nbytes
        except LorafuseError:
            pass  # reported by the caller's header check
    for key, name in weight_map.items():
        if found.get(key) != name:
            problems.append(f"{INDEX} places {key} in {name}, which does not hold it")
    for key in found.keys() - weight_map.keys():
        problems.append(f"{found[key]} holds {key}, which {INDEX} does not list")
    if size != total:
        problems.append(f"{INDEX} says total_size {total}, the shards hold {size} bytes of tensors")
    return [n for n in names if (out / n).is_file()]


def _check_inputs(plan: Plan, manifest: dict) -> list[str]:
    """--base and --adapter are the inputs the manifest records (configs, weight file sizes; wherever
    they lie now): with others every tensor would differ, for no fault of OUT's."""
    problems = []
    for side, given in identity(plan).items():
        if _placeless(manifest.get(side)) != _placeless(given):
            what = "--adapter is not the adapters" if side == "adapters" else f"--{side} is not the {side}"
            problems.append(f"{what} the manifest records (its config or weight files differ); "
                            "pass the ones OUT was merged from" + (", in that order" if side == "adapters" else ""))
    return problems


def _placeless(recorded):
    """An input's identity (or a list of them) as the manifest records it, less where it lay; None for anything
    else."""
    if isinstance(recorded, list):
        return [_placeless(entry) for entry in recorded]
    return {**recorded, "path": None} if isinstance(recorded, dict) else None


def _check_layout(plan: Plan, headers: dict) -> list[str]:
    """OUT's shards hold exactly the tensors (names, dtypes, shapes) the merge plans, file by file."""
    planned = {s.filename: {n: (d, tuple(shape)) for t in s.tensors for n, d, shape in t.entries} for s in plan.shards}
    problems = []
    for name in sorted(planned.keys() | headers.keys()):
        got = {k: (r.dtype, tuple(r.shape)) for k, r in headers[name].tensors.items()} if name in headers else None
        if got != planned.get(name):
            problems.append(f"{name} does not hold the tensors this merge writes there (names, dtypes or shapes "
                            "differ, or the file should not exist)")
    return problems


def _check_files(plan: Plan, out: Path, listed: dict) -> list[str]:
    """OUT holds exactly the files this merge writes, its config.json is the planned one (which decides
    tying, vocabulary size, quantization), and the carried files are those of base and adapter."""
    written = {s.filename for s in plan.shards} | written_files(plan)
    problems = [f"{name} is listed in the manifest but this merge does not write it" for name in sorted(listed.keys() - written)]
    problems += [f"{name} is written by this merge but the manifest does not list it" for name in sorted(written - listed.keys())]
    if read_json_as(out / "config.json", lambda value: True) != plan.config:
        problems.append("config.json is not the config this merge writes")
    for source in plan.carried:
        if source.name in listed:
            algorithm, digest = entry_hash(listed[source.name])
            if file_digest(source, algorithm) != digest:
                problems.append(f"{source.name} differs from {source}")
    return problems


def _check_card(plan: Plan, out: Path, settings: dict) -> list[str]:
    """README.md is the model card this merge writes: it is what people (and the Hub's page) read first, and
    a manifest rewritten with it would hide any edit. It names base and adapter as the merge was given them
    (the settings record), and its title is OUT's name at the merge, which nothing records: the card's own
    title is taken, so a renamed or downloaded folder passes."""
    card = out / "README.md"
    if not card.is_file():
        return []  # reported with the file list
    text = card.read_bytes()
    title = next((line[2:] for line in text.decode("utf-8", "replace").split("\n") if line.startswith("# ")), "")
    written = replace(plan, base_name=settings["base"], adapter_names=tuple(settings["adapters"]), out=Path(title))
    if model_card(written, settings).encode("utf-8") != text:
        return ["README.md is not the model card this merge writes"]
    return []


def _recompute(plan: Plan, headers: dict, sample: int | None, verdict: Verdict) -> None:
    """Merged tensors (`sample` of them, spread out; None: all), recomputed in float64 and compared with
    OUT, and as many of the tensors the adapter leaves alone, which must be the base's, cast with torch's
    rounding. One tensor in memory at a time; the counts go into the verdict."""
    refs = {k: r for h in headers.values() for k, r in h.tensors.items()}
    # 4-bit output is left to the manifest's hashes: its values are bitsandbytes' rounding
    merged = [t for t in plan.tensors if t.patches and not t.to_nf4]
    untouched = [t for t in plan.tensors if not t.patches and not t.to_nf4]
    chosen = _spread(merged, sample)
    for tensor in chosen:
        exact = _exact(plan, tensor)
        got = refs[tensor.name].read().double()
        # one rounding to the output dtype (half a step), plus fp32 arithmetic error at the tensor's scale
        half_step = 0.5 * torch.finfo(torch_dtype(tensor.dtype)).eps * torch.maximum(exact.abs(), got.abs())
        bound = half_step + FP32_SLACK * exact.abs().max()
        if got.shape != exact.shape or bool(((got - exact).abs() > bound).any()):
            verdict.append(f"{tensor.name} differs from the merge recomputed from base and adapter")
    alone = _spread(untouched, sample)
    for tensor in alone:
        src = tensor.source
        want = (src.dequantize() if isinstance(src, QuantizedTensor) else src.read()).to(torch_dtype(tensor.dtype))
        if not _same_bytes(refs[tensor.name].read(), want):
            verdict.append(f"{tensor.name} differs from the base tensor the adapter leaves alone")
    verdict.recomputed, verdict.compared = (len(chosen), len(merged)), (len(alone), len(untouched))
    verdict.requantized = sum(1 for t in plan.tensors if t.to_nf4 and t.patches)


def _spread(tensors: list[TensorPlan], n: int | None) -> list[TensorPlan]:
    """n of the tensors (all if there are fewer, or n is None), evenly spread over the model."""
    n = len(tensors) if n is None else min(n, len(tensors))
    return [tensors[i] for i in sorted({round(i * (len(tensors) - 1) / max(1, n - 1)) for i in range(n)})]


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def _exact(plan: Plan, tensor: TensorPlan) -> torch.Tensor:
    """The merged tensor in float64, from the base tensor and the adapter tensors matched to it, by PEFT's
    definitions (lora.Linear/Embedding/Conv get_delta_weight, DoRA's merge, TrainableTokensLayer)."""
    src = tensor.source
    w = src.dequantize().double() if isinstance(src, QuantizedTensor) else src.read().double()
    for patch in tensor.patches:
        if isinstance(patch, ExpertLoRA) or any(isinstance(ref, SliceRef) for ref in patch.refs):
            w = _from_parts(w, patch)
            continue
        adapter = plan.adapters[patch.adapter]
        config = adapter.config
        parts = {}
        for key in patch.origins:
            module, role = split_key(key)
            parts[role] = adapter.tensors[key].read().double()
        r = _pattern(config.get("rank_pattern"), module, config["r"])
        alpha = _pattern(config.get("alpha_pattern"), module, config["lora_alpha"])
        scale = plan.weights[patch.adapter] * (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
        if "A" in parts:
            square = parts["B"].shape[0] == parts["A"].shape[1]
            conv1d = _conv1d(plan.base.config, module, config, square)
            w = _lora(w, parts["A"], parts["B"], scale, parts.get("magnitude"), conv1d)
        elif "emb_A" in parts:  # W: vocab × dim; delta (B@A)ᵀ; DoRA's norm per feature column
            w = _dora_or_lora(w, scale * (parts["emb_B"] @ parts["emb_A"]).T, parts.get("magnitude"), dim=0)
        elif "lora_bias" in parts:
            w = w + scale * parts["lora_bias"]
        elif "rows" in parts:
            w = w.clone()
            w[_token_rows(config, module)] = parts["rows"]
        else:  # a whole saved tensor (modules_to_save, bias, a saved embedding) replaces the base's
            (w,) = parts.values()
    return w


def _from_parts(w, patch) -> torch.Tensor:
    """A patch on a tensor the checkpoint stores apart from the model's layout: a stack of experts stored
    whole, by ParamWrapper.get_delta_weight's einsum; a piece of a model tensor (one expert, half of a
    fused weight), from the parts of the adapter tensors the plan cut for it (layouts.cut)."""
    if isinstance(patch, ExpertLoRA):
        E = patch.experts
        A = patch.A.read().double().reshape(E, -1, patch.A.shape[-1])
        B = patch.B.read().double().reshape(patch.B.shape[0], -1, E)
        return w + patch.scale * torch.einsum("o r e, e r i -> e o i" if patch.out_in else "o r e, e r i -> e i o", B, A)
    if isinstance(patch, LoRA):
        delta = patch.scale * (patch.B.read().double() @ patch.A.read().double())
        return w + (delta.T if patch.transposed(tuple(w.shape)) else delta)
    if isinstance(patch, AddBias):
        return w + patch.scale * patch.bias.read().double()
    return patch.source.read().double()  # Replace


def _lora(w, A, B, scale: float, magnitude, conv1d: bool | None) -> torch.Tensor:
    """W + s·B@A for nn.Linear (W: out × in), its transpose for Conv1D (W: in × out), over the flattened
    kernel for a convolution; DoRA's norm per output feature. `conv1d` None: the layer's type is
    unknown, the shape it fits decides."""
    if A.dim() > 2:
        return w + scale * (B.flatten(1) @ A.flatten(1)).reshape(w.shape)
    delta = scale * (B @ A)
    if conv1d is None:
        conv1d = w.shape == delta.T.shape
    return _dora_or_lora(w, delta.T, magnitude, dim=0) if conv1d else _dora_or_lora(w, delta, magnitude, dim=1)


def _dora_or_lora(w, delta, magnitude, dim: int) -> torch.Tensor:
    """W + ΔW, and with DoRA rescaled to m / ‖W + ΔW‖, the norm taken along `dim` (the inputs)."""
    merged = w + delta
    if magnitude is None:
        return merged
    norm = merged.norm(dim=dim, keepdim=True)
    return merged * (magnitude.reshape(norm.shape) / norm)


def _conv1d(base_config: dict, module: str, adapter_config: dict, square: bool) -> bool | None:
    """Whether the module is a transformers Conv1D (weight in × out), as PEFT sees its type. For a model
    with its own code (auto_map) lorafuse cannot know: a square weight goes by the adapter's
    fan_in_fan_out, any other by its shape (None)."""
    if base_config.get("auto_map"):
        return bool(adapter_config.get("fan_in_fan_out")) if square else None
    last = module.rpartition(".")[2]
    return any(last in CONV1D_MODULES.get(t, ()) for t in model_types(base_config))


def _token_rows(config: dict, module: str) -> list[int]:
    """The rows trainable_token_indices names for a module: a list, or per module by pattern."""
    spec = config.get("trainable_token_indices")
    return _pattern(spec, module, None) if isinstance(spec, dict) else spec


def _pattern(patterns: dict | None, module: str, default):
    """PEFT's get_pattern_key: the first key matching the end of the module path, at a dot, gives the value."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
