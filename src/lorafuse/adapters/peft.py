"""Read a PEFT LoRA adapter folder and turn its tensors into patches, keyed by module.

PEFT saves tensors under `base_model.model.<module path>.<role>`: `lora_A.weight`, `lora_B.weight`,
`lora_B.bias` (lora_bias), `lora_embedding_A`/`_B`, `lora_magnitude_vector` (DoRA),
`token_adapter.trainable_tokens_delta` (trainable_token_indices), `base_layer.weight` (an embedding
saved with save_embedding_layers) and plain `<module>.weight`/`.bias` for modules_to_save and
bias="all"/"lora_only". Every tensor is claimed by exactly one patch or reported as unused, and the
modules with LoRA tensors must be those PEFT adapts for the config (target_modules and the fields next
to it, as check_target_module_exists reads them), with the variant use_dora names.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import LorafuseError, require_torch
from ..formats.jsonfile import read_json
from ..formats.safetensors import dtype_name, read_header
from ..patches import AddBias, ExpertLoRA, LoRA, Patch, Replace, ReplaceRows

if TYPE_CHECKING:
    import torch

PREFIX = "base_model.model."
# Initialisations that change the base weights themselves: their adapters only merge exactly into the
# modified base, which the user does not have, unless PEFT converted them to plain LoRA when saving.
BASE_CHANGING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga", "mica")
# Config fields of LoRA variants whose effect is not a fixed change of the weights.
UNMERGEABLE_OPTIONS = {
    "layer_replication": "layer_replication shares layers between positions",
    "use_qalora": "QA-LoRA pools inputs group-wise",
    "alora_invocation_tokens": "activated LoRA applies only after its invocation tokens",
    "use_bdlora": "block-diagonal LoRA (use_bdlora)",
    "arrow_config": "Arrow routing chooses experts per token",
    "monteclora_config": "MonteCLoRA samples its weights",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA",
}


@dataclass(frozen=True)
class MemoryRef:
    """A tensor already in memory (from a pickle checkpoint), behaving like a TensorRef."""

    tensor: torch.Tensor
    origin: str

    @property
    def dtype(self) -> str:
        return dtype_name(self.tensor.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def read(self) -> torch.Tensor:
        return self.tensor

    def read_into(self, buf: bytearray | memoryview) -> bytearray | memoryview:
        import torch  # loaded already: the pickle needed it

        if self.nbytes:
            memoryview(buf)[:] = self.tensor.contiguous().view(-1).view(torch.uint8).numpy()
        return buf


@dataclass(frozen=True)
class Adapter:
    folder: Path
    config: dict
    tensors: dict  # adapter key -> TensorRef | MemoryRef
    weights_file: Path

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")


def open_adapter(folder: str | Path) -> Adapter:
    """Read adapter_config.json and the adapter's tensor headers (or a weights_only pickle)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LorafuseError(f"adapter folder {folder} does not exist; pass the folder PEFT's save_pretrained wrote")
    config_path = folder / "adapter_config.json"
    if not config_path.is_file():
        raise LorafuseError(f"{folder} has no adapter_config.json; pass the folder PEFT's save_pretrained wrote")
    config = read_json(config_path, "adapter", "re-save the adapter")
    check_config(config, config_path)
    st, pt = folder / "adapter_model.safetensors", folder / "adapter_model.bin"
    if st.is_file():
        tensors = dict(read_header(st).tensors)
        weights = st
    elif pt.is_file():
        tensors = _load_pickle(pt)
        weights = pt
    else:
        raise LorafuseError(f"{folder} has neither adapter_model.safetensors nor adapter_model.bin")
    if not tensors:
        raise LorafuseError(f"{weights} holds no tensors; re-save the adapter")
    return Adapter(folder, config, tensors, weights)


def _load_pickle(path: Path) -> dict:
    """Load a pickle checkpoint without ever running code from it (weights_only=True)."""
    require_torch(f"reading {path} (a pickle checkpoint; adapter_model.safetensors needs no torch)")
    import torch

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError and others for anything but plain tensors
        found = re.search(r"Unsupported global: [^\n]*", str(e))
        why = f" ({found.group(0).strip().rstrip('.')})" if found else ""
        raise LorafuseError(
            f"{path} cannot be loaded safely: it holds more than tensors{why}; only load it if you trust it, "
            "and convert it to safetensors"
        ) from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise LorafuseError(f"{path} is not a plain mapping of tensor names to tensors")
    return {k: MemoryRef(v.contiguous(), f"{path}:{k}") for k, v in state.items()}


def check_config(config: dict, where: Path) -> None:
    """Refuse adapter types and options that cannot be folded into the weights exactly."""
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise LorafuseError(f"{where}: peft_type is {config.get('peft_type')!r}; lorafuse merges LoRA adapters (LORA, including DoRA)")
    for key, what in UNMERGEABLE_OPTIONS.items():
        if config.get(key) not in (None, False, [], {}):
            raise LorafuseError(f"{where}: {key} is set; {what}, which cannot be merged into fixed weights")
    init = config.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise LorafuseError(
            f"{where}: init_lora_weights={init!r} changes the base weights at initialisation; "
            "save the adapter with PEFT's path_initial_model_for_weight_conversion to convert it to plain LoRA first"
        )
    if not _positive_int(config.get("r")):
        raise LorafuseError(f"{where}: r must be a positive integer, got {_short(config.get('r'))}; re-save the adapter")
    if not _positive_number(config.get("lora_alpha")):
        raise LorafuseError(f"{where}: lora_alpha must be a positive number, got {_short(config.get('lora_alpha'))}; re-save the adapter")
    for key in ("use_rslora", "use_dora", "fan_in_fan_out"):
        if not isinstance(config.get(key, False), (bool, type(None))):
            raise LorafuseError(f"{where}: {key} must be true or false, got {_short(config[key])}; re-save the adapter")
    name = config.get("base_model_name_or_path")
    if name is not None and not (isinstance(name, str) and _is_path_text(name)):
        raise LorafuseError(f"{where}: base_model_name_or_path must be a repo id or a path, got {_short(name)}; "
                            "fix it, or pass BASE")
    tokens = config.get("trainable_token_indices")
    if isinstance(tokens, list) and not _token_list(tokens):
        raise LorafuseError(f"{where}: trainable_token_indices must list token ids (integers from 0); re-save the adapter")
    for key, valid, what in (("rank_pattern", _positive_int, "positive integers"), ("alpha_pattern", _positive_number, "positive numbers"),
                             ("trainable_token_indices", _token_list, "lists of token ids")):
        patterns = config.get(key) or {}
        if patterns is tokens and isinstance(tokens, list):
            continue
        if not isinstance(patterns, dict) or not all(valid(v) for v in patterns.values()):
            raise LorafuseError(f"{where}: {key} must map module name patterns to {what}; re-save the adapter")
        for pattern in patterns:
            _compile_pattern(ends_with(pattern), pattern, f"{key} key")
    _check_targeting(config, where)


def _check_targeting(config: dict, where: Path) -> None:
    """The fields PEFT chooses the adapted modules by, refused where PEFT refuses them: LoraConfig's
    __post_init__ (layers_* with a regex target_modules, layers_pattern without layers_to_transform) and
    check_target_module_exists (re.error from a bad pattern, TypeError from a target_modules that is no
    string or list). A missing target_modules makes PEFT pick modules by model type (LoraModel's
    _prepare_adapter_config), a table lorafuse does not copy; PEFT's save_pretrained always records them."""
    target = config.get("target_modules")
    if target is None and not config.get("target_parameters"):
        raise LorafuseError(f"{where}: target_modules is not set, so PEFT would choose the modules by model type; "
                            "re-save the adapter with PEFT, which records them")
    for key, value in (("target_modules", target), ("exclude_modules", config.get("exclude_modules")),
                       ("layers_pattern", config.get("layers_pattern"))):
        if not (value is None or isinstance(value, str) or _names(value)):
            raise LorafuseError(f"{where}: {key} must be a regular expression or a list of module names, got {_short(value)}; "
                                "re-save the adapter")
    if not (config.get("modules_to_save") is None or _names(config["modules_to_save"])):
        raise LorafuseError(f"{where}: modules_to_save must be a list of module names, got {_short(config['modules_to_save'])}; "
                            "re-save the adapter")
    layers = config.get("layers_to_transform")
    if not (layers is None or type(layers) is int or (isinstance(layers, list) and all(type(i) is int for i in layers))):
        raise LorafuseError(f"{where}: layers_to_transform must be a layer number or a list of them, got {_short(layers)}; "
                            "re-save the adapter")
    if isinstance(target, str) and (layers is not None or config.get("layers_pattern") is not None):
        raise LorafuseError(f"{where}: layers_to_transform and layers_pattern cannot be used with target_modules as a "
                            "regular expression (PEFT's LoraConfig refuses them); re-save the adapter")
    if config.get("layers_pattern") and layers is None:
        raise LorafuseError(f"{where}: layers_pattern is set without layers_to_transform (PEFT's LoraConfig refuses that); "
                            "re-save the adapter")
    for key, expression, text in _targeting_patterns(config):
        _compile_pattern(expression, text, key)


def _names(value) -> bool:
    return isinstance(value, list) and all(isinstance(n, str) for n in value)


# PEFT's INCLUDE_LINEAR_LAYERS_SHORTHAND, and the heads PeftModelForSequenceClassification adds to
# modules_to_save before it injects (so that LoRA leaves them alone).
ALL_LINEAR = "all-linear"
SEQ_CLS_HEADS = ("classifier", "score")
# The output head of a causal LM, which _maybe_include_all_linear_layers leaves out of "all-linear".
OUTPUT_HEAD = "lm_head"
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")  # PEFT's, for ensure_weight_tying


def _targeting_patterns(config: dict) -> list[tuple[str, str, str]]:
    """(field, regular expression, the config's text) for every pattern check_target_module_exists uses."""
    found = []
    for key in ("target_modules", "exclude_modules"):
        if isinstance(config.get(key), str):
            found.append((key, config[key], config[key]))
    for name in _saved_modules(config):
        found.append(("modules_to_save entry", rf"(^|.*\.){name}($|\..*)", name))
    layers_pattern = config.get("layers_pattern")
    for name in [layers_pattern] if isinstance(layers_pattern, str) and layers_pattern else layers_pattern or []:
        found.append(("layers_pattern", rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.", name))
    return found


def _saved_modules(config: dict) -> list[str]:
    return list(config.get("modules_to_save") or []) + (list(SEQ_CLS_HEADS) if config.get("task_type") == "SEQ_CLS" else [])


def untargeted(config: dict, module: str, kind: str) -> str | None:
    """Why PEFT would not put LoRA on `module` (None: it would), decided as PEFT's
    check_target_module_exists decides it, in its order: exclude_modules (a string is full-matched, a
    list names the module or its last components), modules_to_save, then target_modules (a string is
    full-matched; a list as exclude_modules, and then, if the module was matched by a suffix,
    layers_to_transform picks layers by the first number after layers_pattern, or after the second
    component). "all-linear" stands for every nn.Linear/Conv1D but the output head
    (_maybe_include_all_linear_layers): lorafuse knows no layer types, so it takes every module whose
    LoRA tensors are those of a linear layer (`kind`), the head aside. With ensure_weight_tying and an
    embedding among the targets, PEFT adapts the input embedding and gives the modules tied to it (the
    output head of a tied model) the same LoRA, before any other check (_check_tied_modules,
    LoraModel._add_targets_to_tie, inject_adapter); lorafuse cannot see the tying here, and the plan
    decides what reaches a tied head."""
    if _tied(config, module):
        return None
    exclude = config.get("exclude_modules")
    if isinstance(exclude, str) and _match(exclude, exclude, "exclude_modules", module, full=True):
        return "exclude_modules matches it"
    if isinstance(exclude, list) and _named(exclude, module):
        return "exclude_modules names it"
    for name in _saved_modules(config):
        if _match(rf"(^|.*\.){name}($|\..*)", name, "modules_to_save entry", module):
            return "it is in modules_to_save"
    target = _target_modules(config)
    if _all_linear(config):
        if kind != "linear":
            return f"target_modules is {ALL_LINEAR}, and it is no linear layer"
        return f"target_modules is {ALL_LINEAR}, which leaves out the output head" if module == OUTPUT_HEAD else None
    if isinstance(target, str):
        return None if _match(target, target, "target_modules", module, full=True) else "target_modules does not match it"
    if module in target:
        return None
    if not _named(target, module):
        return "target_modules does not name it"
    layers = config.get("layers_to_transform")
    if layers is None or layers == []:
        return None
    index = _layer_index(config.get("layers_pattern"), module)
    if index is None or (index != layers if type(layers) is int else index not in layers):
        return "layers_to_transform leaves out its layer"
    return None


def _target_modules(config: dict) -> str | list[str]:
    """target_modules; none with only target_parameters (PEFT then adapts no module as a whole)."""
    target = config.get("target_modules")
    return [] if target is None else target


def _all_linear(config: dict) -> bool:
    target = _target_modules(config)
    return isinstance(target, str) and target.lower() == ALL_LINEAR


def _tied(config: dict, module: str) -> bool:
    """An embedding-named module under ensure_weight_tying, when target_modules names an embedding (PEFT's
    _check_tied_modules: by the last component, or, as a regular expression, fully matching one of
    EMBEDDING_LAYER_NAMES): PEFT adapts it, or ties it to the embedding's LoRA if the base ties them."""
    if not (config.get("ensure_weight_tying") and module.rpartition(".")[2] in EMBEDDING_LAYER_NAMES):
        return False
    target = _target_modules(config)
    if isinstance(target, str):
        return any(_match(target, target, "target_modules", name, full=True) for name in EMBEDDING_LAYER_NAMES)
    return any(name.split(".")[-1] in EMBEDDING_LAYER_NAMES for name in target)


def _named(names: list[str], module: str) -> bool:
    return module in names or any(module.endswith(f".{name}") for name in names)


def _layer_index(layers_pattern, module: str) -> int | None:
    """The layer number check_target_module_exists reads from a module path: the first number after one
    of layers_pattern (tried in order), or after the path's second component when there is none."""
    if not layers_pattern:
        found = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)
    else:
        for name in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            found = _match(rf"(?:^|.*?\.){name}\.(?P<idx>\d+)\.", name, "layers_pattern", module)
            if found:
                break
    return int(found["idx"]) if found else None


def _positive_int(value) -> bool:
    return type(value) is int and 0 < value < 2**63


def _positive_number(value) -> bool:
    return type(value) in (int, float) and 0 < value < math.inf and (type(value) is float or value < 2**1023)


def _token_list(value) -> bool:
    return isinstance(value, list) and all(type(i) is int and 0 <= i < 2**63 for i in value)


def _is_path_text(text: str) -> bool:
    """Text that can name a file (no NUL, encodable): a config's base_model_name_or_path is made a path."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\0" not in text


def _short(value) -> str:
    """A config value for an error message: on one line, and short whatever its size."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**30 else "a huge integer"
    return text if len(text) <= 60 else text[:57] + "..."


# How long one pattern may take to match one module path: sane patterns take microseconds.
PATTERN_SECONDS = 1.0


def ends_with(key: str) -> str:
    """PEFT's get_pattern_key expression for a rank_pattern/alpha_pattern/trainable_token_indices key."""
    return rf"(.*\.)?({key})$"


@lru_cache(maxsize=None)
def _compile_pattern(expression: str, key: str, field: str):
    """One of PEFT's regular expressions, built from the config's `key`, compiled by the `regex` module:
    Python's `re` must accept the expression (PEFT uses re), while `regex` matches as re does but avoids
    much catastrophic backtracking and can stop after PATTERN_SECONDS, so that a pattern like `(.*)*x`
    cannot hang the plan."""
    import regex

    try:
        re.compile(expression)
        return regex.compile(expression)
    except (re.error, regex.error, RecursionError, OverflowError, ValueError) as e:
        raise LorafuseError(f"adapter_config.json: {field} {_short(key)} is not a valid regular expression ({e}); fix it") from None


def _match(expression: str, key: str, field: str, module: str, full: bool = False):
    """re.match (or re.fullmatch) of one of PEFT's expressions against a module path, bounded in time."""
    compiled = _compile_pattern(expression, key, field)
    try:
        return (compiled.fullmatch if full else compiled.match)(module, timeout=PATTERN_SECONDS)
    except TimeoutError:
        raise LorafuseError(f"adapter_config.json: {field} {_short(key)} takes too long to match {module!r} "
                            "(catastrophic backtracking); simplify the pattern") from None


def pattern_value(patterns: dict, module: str, default, field: str = "rank_pattern"):
    """PEFT's get_pattern_key: the first pattern that matches the end of the module path wins."""
    for key, value in (patterns or {}).items():
        if _match(ends_with(key), key, f"{field} key", module):
            return value
    return default


def scaling(config: dict, module: str) -> tuple[int, float]:
    """(rank, scale) for a module: lora_alpha/r, or lora_alpha/sqrt(r) with rsLoRA (PEFT's update_layer)."""
    r = pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"], "alpha_pattern")
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


# role suffix -> role name, longest first so that `.lora_B.bias` wins over a plain `.bias`
ROLES = {
    ".token_adapter.trainable_tokens_delta": "rows",
    ".token_adapter.base_layer.weight": "base_weight",
    ".modules_to_save.weight": "saved_weight",
    ".modules_to_save.bias": "saved_bias",
    ".original_module.weight": "original",
    ".original_module.bias": "original",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude",
    ".lora_embedding_A": "emb_A",
    ".lora_embedding_B": "emb_B",
    ".lora_A.weight": "A",
    ".lora_B.weight": "B",
    ".lora_B.bias": "lora_bias",
    ".base_layer.weight": "base_weight",
    ".base_layer.bias": "base_bias",
}


def split_key(key: str) -> tuple[str, str]:
    """Adapter key -> (module path as in the model, role); role 'tensor' is a whole saved tensor."""
    name = key[len(PREFIX):] if key.startswith(PREFIX) else key
    for suffix, role in ROLES.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], role
    return name, "tensor"


# module path -> (its own parameters in registration order, is_transposed, their shapes), from the model
# in memory (layouts.Layout); None for a module the model lacks
Parameters = Callable[[str], "tuple[tuple[str, ...], bool, dict[str, tuple[int, ...]]] | None"]
BASE_LAYER = ".base_layer"


def wrapper_owners(adapter: Adapter) -> set[str]:
    """The modules that may hold ParamWrappers (target_parameters): every module path with LoRA tensors,
    its `.base_layer` suffixes (one per wrapper nested inside the outermost) taken off."""
    if not adapter.config.get("target_parameters"):
        return set()
    return {_unwrapped(split_key(key)[0])[0] for key in adapter.tensors}


def _unwrapped(module: str) -> tuple[str, int]:
    depth = 0
    while module.endswith(BASE_LAYER):
        module, depth = module[: -len(BASE_LAYER)], depth + 1
    return module, depth


def patches_by_tensor(adapter: Adapter, parameters: Parameters | None = None) -> tuple[dict[str, list[Patch]], list[str]]:
    """Group the adapter's tensors into patches keyed by the base tensor (in model naming) they change;
    also returns the adapter tensors that fit no patch. Shape checks against the base happen in the
    planner, which knows the base. `parameters` describes the model's modules, for target_parameters.
    """
    config = adapter.config
    groups: dict[str, dict[str, tuple[str, object]]] = {}
    for key, ref in adapter.tensors.items():
        module, role = split_key(key)
        groups.setdefault(module, {})[role] = (key, ref)
    patches: dict[str, list[Patch]] = {}
    unused: list[str] = []

    def add(target: str, patch: Patch) -> None:
        patches.setdefault(target, []).append(patch)

    if config.get("target_parameters"):
        for target, patch in _parameter_patches(config, groups, parameters):
            add(target, patch)
    _check_targets(config, groups)

    for module, roles in groups.items():
        if "tensor" in roles:  # modules_to_save or bias=all: `module` is the full tensor name here
            key, ref = roles.pop("tensor")
            add(module, Replace(ref, key))
        for role, param in (("base_weight", "weight"), ("base_bias", "bias"), ("saved_weight", "weight"), ("saved_bias", "bias")):
            if role in roles:
                key, ref = roles.pop(role)
                # a modules_to_save copy may be saved both as `m.weight` and `m.modules_to_save.weight`
                if not (role.startswith("saved") and f"{PREFIX}{module}.{param}" in adapter.tensors):
                    add(f"{module}.{param}", Replace(ref, key))
        # PEFT saves the untrained original next to a modules_to_save copy; the copy replaces it.
        roles.pop("original", None)
        if "rows" in roles:
            key, ref = roles.pop("rows")
            indices = token_indices(config, module)
            add(f"{module}.weight", ReplaceRows(ref, tuple(indices), key))
        r, scale = scaling(config, module)
        magnitude = roles.pop("magnitude", (None, None))
        for a_role, b_role, kind in (("A", "B", "linear"), ("emb_A", "emb_B", "embedding")):
            if a_role in roles or b_role in roles:
                if a_role not in roles or b_role not in roles:
                    present = roles.get(a_role, roles.get(b_role))[0]
                    raise LorafuseError(f"adapter tensor {present} has no matching {'B' if a_role in roles else 'A'} matrix; the adapter file is incomplete")
                (a_key, a_ref), (b_key, b_ref) = roles.pop(a_role), roles.pop(b_role)
                if len(a_ref.shape) > 2 and a_ref.shape[0] == r and b_ref.shape[1] != r:
                    raise LorafuseError(f"{a_key}: LoRA on a grouped convolution (groups > 1) cannot be merged by lorafuse yet")
                if a_ref.shape[0] != r or b_ref.shape[1] != r:
                    raise LorafuseError(
                        f"adapter tensor {a_key}: rank {a_ref.shape[0]} (A) / {b_ref.shape[1]} (B) disagrees with r={r} "
                        "in adapter_config.json; the config and weights do not belong together"
                    )
                add(f"{module}.weight", LoRA(a_ref, b_ref, scale, kind, bool(config.get("fan_in_fan_out")), magnitude[1], (a_key, b_key) + ((magnitude[0],) if magnitude[0] else ())))
                magnitude = (None, None)
        if magnitude[0] is not None:
            unused.append(magnitude[0])
        if "lora_bias" in roles:
            key, ref = roles.pop("lora_bias")
            add(f"{module}.bias", AddBias(ref, scale, key))
        unused.extend(key for key, _ in roles.values())
    # A whole replacement comes first: the other patches act on the replaced tensor.
    return {target: sorted(chain, key=lambda p: not isinstance(p, Replace)) for target, chain in patches.items()}, unused


LORA_ROLES = ("A", "B", "emb_A", "emb_B", "magnitude", "lora_bias")


def _parameter_patches(config: dict, groups: dict[str, dict], parameters: Parameters) -> list[tuple[str, Patch]]:
    """The patches of PEFT's ParamWrappers (target_parameters), taken out of `groups`.

    PEFT wraps each targeted parameter of a module in turn, in the module's registration order (a
    parameter is targeted when `module.param` is, or ends with `.`, one of target_parameters), each
    wrapper around the previous one: the first is the innermost, saved under the most `.base_layer`s.
    A 2-D parameter is a plain linear weight (out × in). A 3-D one is a stack of experts, (E, in, out) as
    PEFT reads it unless the experts module is not `is_transposed`, which PEFT 0.19 and later read as
    (E, out, in) (PEFT 0.18 did not swap them: `peft_version` in the config tells which wrote it)."""
    if config.get("use_dora") or config.get("lora_bias") or config.get("fan_in_fan_out"):
        raise LorafuseError("adapter_config.json: target_parameters with use_dora, lora_bias or fan_in_fan_out is not "
                            "something PEFT's ParamWrapper accepts; re-save the adapter with PEFT")
    targets = config["target_parameters"]
    if not _names(targets):
        raise LorafuseError(f"adapter_config.json: target_parameters must be a list of parameter names, got {_short(targets)}")
    found = []
    for module in list(groups):
        roles = groups[module]
        owner, depth = _unwrapped(module)
        described = parameters(owner) if "A" in roles and "B" in roles else None
        if described is None:
            continue
        names, is_transposed, shapes = described
        wrapped = [p for p in names if any(f"{owner}.{p}" == t or f"{owner}.{p}".endswith(f".{t}") for t in targets)]
        if not wrapped:
            continue
        if depth >= len(wrapped):
            raise LorafuseError(f"adapter tensors of {module} sit {depth} wrapper(s) deep, but target_parameters "
                                f"targets {len(wrapped)} parameter(s) of {owner}; re-save the adapter with PEFT")
        groups.pop(module)
        param = wrapped[len(wrapped) - 1 - depth]
        target, shape = f"{owner}.{param}", shapes[param]
        (a_key, A), (b_key, B) = roles.pop("A"), roles.pop("B")
        if roles:
            raise LorafuseError(f"adapter tensor {next(iter(roles.values()))[0]} does not belong with a LoRA on the "
                                f"parameter {target}; re-save the adapter with PEFT")
        _, scale = scaling(config, target)
        if len(shape) == 2:
            found.append((target, LoRA(A, B, scale, "linear", False, None, (a_key, b_key), layer_known=True)))
        elif len(shape) == 3:
            out_in = _experts_out_in(config, is_transposed, shape, A, target)
            found.append((target, ExpertLoRA(A, B, scale, shape[0], out_in, (a_key, b_key))))
        else:
            raise LorafuseError(f"target_parameters names {target}, a {len(shape)}-D parameter; PEFT's ParamWrapper "
                                "adapts 2-D and 3-D parameters only")
    return found


def _experts_out_in(config: dict, is_transposed: bool, shape: tuple[int, ...], A, target: str) -> bool:
    """Whether PEFT read the expert stack `shape` as (E, out, in): never for an is_transposed module;
    otherwise from PEFT 0.19 on, and for an adapter that does not say which PEFT wrote it, where lora_A's
    input size says it (a stack of square experts cannot tell, and is refused)."""
    if is_transposed:
        return False
    found = re.match(r"(\d+)\.(\d+)", str(config.get("peft_version") or ""))
    if found:
        return (int(found[1]), int(found[2])) >= (0, 19)
    if shape[1] == shape[2]:
        raise LorafuseError(f"adapter_config.json has no peft_version, and the experts of {target} are square, so "
                            "which PEFT layout its LoRA has cannot be told; add the peft_version that saved it")
    return A.shape[-1] == shape[2]


def _check_targets(config: dict, groups: dict[str, dict]) -> None:
    """Every module with LoRA tensors must be one PEFT puts LoRA on, with the variant the config names.

    PEFT builds its layers from the config and then loads the file into them (inject_adapter, then
    set_peft_model_state_dict): tensors of a module it does not adapt are ignored, and use_dora decides
    whether a layer is DoRA, with a magnitude the file supplies (or, missing, one initialised from the
    weight, not what was trained), and lora_bias whether lora_B has a bias to load. A file that disagrees with its config was not written by PEFT for it,
    and any merge of it would differ from what PEFT loads or from what was trained: refused."""
    dora = bool(config.get("use_dora"))
    problems = []
    for module, roles in groups.items():
        if not any(role in roles for role in LORA_ROLES):
            continue
        if "emb_A" in roles or "emb_B" in roles:
            kind = "embedding"
        else:
            kind = "conv" if "A" in roles and len(roles["A"][1].shape) > 2 else "linear"
        why = untargeted(config, module, kind)
        factors = any(role in roles for role in ("A", "B", "emb_A", "emb_B"))
        if why is None and dora and factors and "magnitude" not in roles:
            why = "use_dora is true, and it has no lora_magnitude_vector"
        elif why is None and not dora and "magnitude" in roles:
            why = "it has a DoRA lora_magnitude_vector, and use_dora is false"
        elif why is None and "lora_bias" in roles and config.get("lora_bias") is not True:
            why = "it has a lora_B.bias, and lora_bias is false"
        if why:
            problems.append(f"{module} has LoRA tensors but {why}")
    if problems:
        more = f" (and {len(problems) - 1} more module(s))" if len(problems) > 1 else ""
        raise LorafuseError(f"the adapter's config and weights disagree: {problems[0]}{more}; "
                            "re-save the adapter with PEFT")


def check_untrained(config: dict, weights: dict, adapted: set[str]) -> None:
    """Refuse modules PEFT adapts that the file has no LoRA tensors for, when PEFT would change them.

    PEFT creates their LoRA and finds nothing to load into it (inject_adapter, set_peft_model_state_dict):
    with init_lora_weights true or "gaussian", reset_lora_parameters makes B (A for an embedding) zero, so
    the weight stays as it is, which is what lorafuse writes; with init_lora_weights false A and B keep
    random values, and PEFT's model changes the weight at random. `weights`: the base's weights (name ->
    tensor), `adapted`: those that get LoRA from the file. Left out: "all-linear" (lorafuse cannot tell
    which weights belong to linear layers) and embeddings under ensure_weight_tying (whether PEFT ties
    the head to the embedding depends on the base)."""
    if config.get("init_lora_weights", True) is not False or _all_linear(config):
        return
    modules = [name.removesuffix(".weight") for name, ref in weights.items()
               if name.endswith(".weight") and len(ref.shape) >= 2 and name not in adapted]
    missing = [m for m in modules if not _tied(config, m) and untargeted(config, m, "linear") is None]
    if missing:
        more = f" (and {len(missing) - 1} more module(s))" if len(missing) > 1 else ""
        raise LorafuseError(f"the adapter's config and weights disagree: PEFT adapts {missing[0]}{more}, the file has no "
                            "LoRA tensors for it, and with init_lora_weights false PEFT gives it random ones; "
                            "re-save the adapter with PEFT")


def token_indices(config: dict, module: str) -> list[int]:
    """The token rows a trainable_tokens_delta replaces: a list (for the input embedding) or per-module dict."""
    spec = config.get("trainable_token_indices")
    if isinstance(spec, dict):
        spec = pattern_value(spec, module, None, "trainable_token_indices")
    if not isinstance(spec, list) or not all(isinstance(i, int) for i in spec):
        raise LorafuseError(f"adapter has trainable tokens for {module} but trainable_token_indices does not list them")
    return spec
