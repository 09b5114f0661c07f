"""The adapter alone as a PEFT folder (Unsloth's "lora" save method): what PEFT's `from_pretrained` loads.

OUT holds the adapter's adapter_config.json and adapter_model.safetensors as they are (byte for byte; an
`adapter_model.bin` is written as safetensors, as PEFT saves it), its README.md and tokenizer files, and
lorafuse's manifest, which lets `--force` know the folder as lorafuse's. Nothing is merged: the point of the
save method is a small, checked copy of the adapter in the format runtimes take, made atomically like any
output (the plan has checked every adapter tensor against the base first).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..adapters.peft import Adapter
from ..formats.folder import TOKENIZER_FILE, create
from ..sources.local import check_inside

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


def carried(adapter: Adapter) -> list[Path]:
    """The adapter's README.md and tokenizer files: regular files inside its folder (a Hub snapshot's links
    into its own blobs pass check_inside), so that nothing outside it is copied."""
    found = []
    for path in sorted(adapter.folder.iterdir()):
        if (path.name == "README.md" or TOKENIZER_FILE.match(path.name)) and path.is_file():
            check_inside(adapter.folder, path)
            found.append(path)
    return found


def written_files(adapter: Adapter) -> set[str]:
    return {CONFIG, WEIGHTS, *(path.name for path in carried(adapter))}


def size(adapter: Adapter) -> int:
    """Bytes written (the weights' size as safetensors at most a header's worth above a pickle's tensors)."""
    return sum(path.stat().st_size for path in (adapter.folder / CONFIG, adapter.weights_file, *carried(adapter))) \
        + (1 << 20)


def write(adapter: Adapter, folder: Path) -> None:
    """Write the adapter's files into `folder` (the staging folder)."""
    for source in (adapter.folder / CONFIG, *carried(adapter)):
        _copy(source, folder / source.name)
    if adapter.weights_file.name == WEIGHTS:
        _copy(adapter.weights_file, folder / WEIGHTS)
    else:
        from safetensors.torch import save_file

        tensors = {key: ref.read().clone() for key, ref in adapter.tensors.items()}  # clone: no shared storage
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def _copy(source: Path, target: Path) -> None:
    with open(source, "rb") as src, create(target) as dst:
        shutil.copyfileobj(src, dst)
