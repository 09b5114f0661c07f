"""The JSON files of a model or adapter folder (config.json, adapter_config.json, indexes, the manifest).

Every JSON input goes through `parse_json`, so that no file, however hostile, gets past it as anything
but a value or a one-line error: Python's parser raises RecursionError for deep nesting and ValueError
for integers of more than 4300 digits, and a value nested deeper than the stack allows when it is
parsed can still overflow it later, when it is copied or written out. The nesting limit is the one
serde_json (and so the safetensors library) applies.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LorafuseError

MAX_DEPTH = 127  # serde_json's recursion limit: 128 levels of [ and { fail


def parse_json(data: str | bytes, where: object, fix: str = "re-save or re-download it", check_depth: bool = True, **hooks):
    """The JSON value in `data`, or a one-line LorafuseError naming `where` and saying what to do.
    `hooks` are passed to json.loads; a hook may raise ValueError to refuse a value. A caller that knows
    the value's layout may check its depth itself (`check_depth=False`) where walking all of it is slow."""
    try:
        value = json.loads(data, **hooks)
    except RecursionError:
        raise LorafuseError(f"{where} is nested too deeply to be read (more than {MAX_DEPTH} levels); {fix}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer too long to convert, a hook's refusal
        raise LorafuseError(f"{where} is not valid JSON ({' '.join(str(e).split())}); {fix}") from None
    if check_depth and depth(value, MAX_DEPTH) > MAX_DEPTH:
        raise LorafuseError(f"{where} is nested too deeply to be read (more than {MAX_DEPTH} levels); {fix}")
    return value


def depth(value, limit: int) -> int:
    """How deeply `value` nests lists and dicts (a scalar is 0), counted up to limit + 1. Iterative:
    a value nested near the interpreter's recursion limit must not overflow the stack here."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if deepest > limit:
            return deepest
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def read_json(path: Path, what: str, fix: str = "re-save or re-download it") -> dict:
    """A JSON object from `path`, or a one-line error naming the file and what to do."""
    if not path.is_file():
        raise LorafuseError(f"{what} folder {path.parent} has no {path.name}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LorafuseError(f"cannot read {path}: {e.strerror}") from None
    value = parse_json(data, path, fix)
    if not isinstance(value, dict):
        raise LorafuseError(f"{path} is not a JSON object; {fix}")
    return value
