"""The small files of a safetensors model folder that go with the shards: the index, config.json, the
tokenizer and other carried files, and a model card."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from ...errors import LorafuseError
from ...formats.folder import INDEX, create
from ...plan import Plan
from ...sources.hub import parse_spec


def written_files(plan: Plan) -> set[str]:
    """The names of the files `write_metadata` writes; with the shards, all that OUT's manifest lists."""
    return {"config.json", "README.md", *(source.name for source in plan.carried),
            *([INDEX] if len(plan.shards) > 1 else [])}


def write_metadata(plan: Plan, folder: Path, settings: dict) -> None:
    """Index, config.json, tokenizer and other non-weight files, and a model card."""
    texts = {"config.json": json.dumps(plan.config, indent=2, sort_keys=True) + "\n",
             "README.md": model_card(plan, settings)}
    if len(plan.shards) > 1:
        index = {
            "metadata": {"total_size": plan.total_size},
            "weight_map": {slot.name: s.filename for s in plan.shards for group in s.slots for slot in group},
        }
        texts[INDEX] = json.dumps(index, indent=2) + "\n"
    for source in plan.carried:
        with open(source, "rb") as src, create(folder / source.name) as dst:
            shutil.copyfileobj(src, dst)
    for name, text in texts.items():
        with create(folder / name) as f:
            f.write(text.encode())


def model_card(plan: Plan, settings: dict, output: dict | None = None, library: str = "transformers",
               tags: tuple[str, ...] = ()) -> str:
    """The README.md that huggingface_hub's ModelCard would save, without importing its Hub client (a slow
    import that writing a file does not need). `output`: the rows that describe the files, for an output
    other than the plan's safetensors shards (a GGUF).
    `lorafuse verify` writes it again to check OUT's."""
    from huggingface_hub import ModelCardData

    repo_id = _repo_id(plan.base_name) or _repo_id(plan.adapter.base_name or "")
    data = ModelCardData(base_model=repo_id, library_name=library, tags=["lorafuse", "merge", "lora", *tags])
    shown = {"base": plan.base_name}
    if len(plan.adapters) == 1:
        config, weight = plan.adapter.config, plan.weights[0]
        shown |= {"adapter": plan.adapter_name, "r / lora_alpha": f"{config.get('r')} / {config.get('lora_alpha')}",
                  "rsLoRA": bool(config.get("use_rslora"))}
        if weight != 1:
            shown["weight"] = f"{weight:g}"
        merged = f"the LoRA adapter `{plan.adapter_name}`" + (f" (weight {weight:g})" if weight != 1 else "")
    else:
        for number, (name, adapter, weight) in enumerate(zip(plan.adapter_names, plan.adapters, plan.weights), 1):
            config = adapter.config
            shown[f"adapter {number}"] = (f"{name}: weight {weight:g}, r / lora_alpha {config.get('r')} / "
                                          f"{config.get('lora_alpha')}{', rsLoRA' if config.get('use_rslora') else ''}")
        listed = [f"`{name}` (weight {weight:g})" for name, weight in zip(plan.adapter_names, plan.weights)]
        merged = f"the weighted sum of the LoRA adapters {', '.join(listed[:-1])} and {listed[-1]}"
    shown |= {
        "patches": ", ".join(f"{n} {k}" for k, n in sorted(plan.counts.items())),
        **(output or {"output dtype": plan.dtype, "save method": plan.save_method, "shards": len(plan.shards)}),
        "device": settings["device"],
        "lorafuse": settings["lorafuse"],
    }
    rows = "\n".join(f"| {k} | {v} |" for k, v in shown.items())
    return (
        f"---\n{data.to_yaml()}\n---\n\n# {plan.out.name if plan.out else 'merged model'}\n\n"
        f"This model is `{repo_id or plan.base_name}` with {merged} merged into its weights "
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
