"""The JSON files of a model or adapter folder (config.json, adapter_config.json, indexes)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import LorafuseError


def read_json(path: Path, what: str, fix: str = "re-save or re-download it") -> dict:
    """A JSON object from `path`, or a one-line error naming the file and what to do."""
    if not path.is_file():
        raise LorafuseError(f"{what} folder {path.parent} has no {path.name}")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LorafuseError(f"{path} is not valid JSON ({e}); {fix}") from None
    if not isinstance(value, dict):
        raise LorafuseError(f"{path} is not a JSON object; {fix}")
    return value
