"""`lorafuse verify OUT`: is a merged model folder whole, unaltered and finite, and (given base and
adapter) are its merged tensors right?

Checks, one tensor in memory at a time: the manifest's size and SHA-256 of every file; every shard's
header (strictly, as when reading a base); the index against the shards; no NaN or Inf in any
floating tensor; and with --base/--adapter, a sample of merged tensors recomputed in float64 from
the inputs, which must agree with the output to within one rounding to its dtype.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .errors import LorafuseError
from .compute.tensors import all_finite
from .formats.jsonfile import parse_json
from .formats.safetensors import FLOAT_DTYPES, read_header, torch_dtype
from .manifest import MANIFEST, sha256_file
from .plan import make_plan
from .quant import QuantizedTensor
from .formats.folder import INDEX, SINGLE

FP32_SLACK = 64 * torch.finfo(torch.float32).eps


def verify(out: str | Path, base: str | Path | None = None, adapter: str | Path | None = None, sample: int = 8) -> list[str]:
    """Everything wrong with OUT, as one line each; an empty list means it passed."""
    out = Path(out)
    if not out.is_dir():
        raise LorafuseError(f"{out} is not a folder")
    if (base is None) != (adapter is None):
        raise LorafuseError("pass both --base and --adapter to recompute merged tensors, or neither")
    problems = _check_manifest(out)
    headers = {}
    for name in _shard_names(out, problems):
        try:
            headers[name] = read_header(out / name)
        except LorafuseError as e:
            problems.append(str(e))
    for name, header in headers.items():
        for key, ref in header.tensors.items():
            if ref.dtype in FLOAT_DTYPES and not all_finite(ref.read()):
                problems.append(f"{name}: tensor {key} holds NaN or Inf values")
    if base is not None and not problems:
        problems += _recompute(out, headers, base, adapter, sample)
    return problems


def _check_manifest(out: Path) -> list[str]:
    path = out / MANIFEST
    if not path.is_file():
        return [f"{out} has no {MANIFEST}; only merges written by lorafuse can be checked against one"]
    manifest = read_json_as(path, _is_manifest)
    if manifest is None:
        return [f"{path} is not a valid lorafuse manifest"]
    files = manifest["files"]
    problems = []
    for name, entry in files.items():
        file = out / name
        if not file.is_file():
            problems.append(f"{name} is listed in the manifest but missing")
        elif file.stat().st_size != entry.get("size"):
            problems.append(f"{name} is {file.stat().st_size} bytes, the manifest says {entry.get('size')}")
        elif sha256_file(file) != entry.get("sha256"):
            problems.append(f"{name} does not match its SHA-256 in the manifest (modified or corrupted)")
    return problems


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
    return isinstance(files, dict) and isinstance(value.get("settings", {}), dict) and all(
        isinstance(e, dict) and type(e.get("size")) is int and isinstance(e.get("sha256"), str) for e in files.values())


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


def _recompute(out: Path, headers: dict, base, adapter, sample: int) -> list[str]:
    """A spread-out sample of merged tensors, recomputed in float64 and compared with OUT."""
    manifest = read_json_as(out / MANIFEST, _is_manifest).get("settings", {})
    dtype = {"auto": "auto", "F32": "fp32", "BF16": "bf16", "F16": "fp16"}.get(manifest.get("output dtype"), "auto")
    plan = make_plan(base, adapter, dtype=dtype, save_method=manifest.get("save method", "merged_16bit"))
    refs = {k: r for h in headers.values() for k, r in h.tensors.items()}
    merged = plan.merged
    n = min(sample, len(merged))
    chosen = [merged[round(i * (len(merged) - 1) / max(1, n - 1))] for i in range(n)]
    problems = []
    for tensor in {t.name: t for t in chosen}.values():
        if tensor.to_nf4:
            continue  # 4-bit output: its bytes are checked by the manifest, its values are bnb's rounding
        if tensor.name not in refs or refs[tensor.name].dtype != tensor.dtype:
            problems.append(f"{tensor.name} is missing from OUT or has another dtype than the merge gives")
            continue
        src = tensor.source
        exact = src.dequantize().double() if isinstance(src, QuantizedTensor) else src.read().double()
        for patch in tensor.patches:
            exact = patch.apply(exact)
        got = refs[tensor.name].read().double()
        # one rounding to the output dtype (half a step), plus fp32 arithmetic error at the tensor's scale
        half_step = 0.5 * torch.finfo(torch_dtype(tensor.dtype)).eps * torch.maximum(exact.abs(), got.abs())
        bound = half_step + FP32_SLACK * exact.abs().max()
        if got.shape != exact.shape or bool(((got - exact).abs() > bound).any()):
            problems.append(f"{tensor.name} differs from the merge recomputed from base and adapter")
    return problems
