"""Hostile JSON inputs (config.json, the index, adapter_config.json, the manifest for `verify`): every one
is a one-line LorafuseError or works, never a traceback and never a hang."""

import json
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorafuse
from lorafuse.adapters.peft import pattern_value, untargeted
from lorafuse.tools.verify import verify

INDEX = "model.safetensors.index.json"
DEEP = "[" * 100_000 + "]" * 100_000
HUGE = "9" * 5000


@contextmanager
def within(seconds: float):
    """Fail, rather than hang, when the block runs longer than `seconds`."""
    def expire(*_):
        raise TimeoutError(f"took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(scope="module")
def model(sharded):
    return sharded


@pytest.fixture
def copies(model, tmp_path):
    base, adapter = model
    return shutil.copytree(base, tmp_path / "base"), shutil.copytree(adapter, tmp_path / "adapter")


def _outcome(base: Path, adapter: Path) -> str | None:
    """None when the plan works, else the error's message (which must be one line)."""
    try:
        with within(10):
            lorafuse.plan(base, adapter)
    except lorafuse.LorafuseError as e:
        assert "\n" not in str(e)
        return str(e)
    return None


def _edit(path: Path, edit) -> None:
    """Replace a JSON file with text, or with what `edit` makes of its value."""
    path.write_text(edit if isinstance(edit, str) else json.dumps(edit(json.loads(path.read_text()))))


def _set(key, value):
    return lambda config: {**config, key: value}


def _set_weight_map(value):
    return lambda index: {**index, "weight_map": value(index["weight_map"]) if callable(value) else value}


CASES = [
    # (file, edit, part of the message)
    ("base/config.json", "{\"a\":" + DEEP + "}", "nested too deeply"),
    ("base/config.json", "{\"a\":" + HUGE + "}", "not valid JSON"),
    ("base/config.json", _set("tie_word_embeddings", "false"), "tie_word_embeddings must be true or false"),
    ("base/config.json", _set("model_type", ["llama"]), "model_type must be a string"),
    ("base/config.json", _set("quantization_config", {"quant_method": ["fp8"]}), "naming its quant_method"),
    ("base/config.json", _set("quantization_config", {"quant_method": "fp8", "weight_block_size": "128"}), "weight_block_size"),
    ("base/config.json", _set("quantization_config", {"quant_method": "bitsandbytes", "llm_int8_skip_modules": 3}), "llm_int8_skip_modules"),
    (INDEX, DEEP, "nested too deeply"),
    (INDEX, _set_weight_map(lambda m: {k: [v] for k, v in m.items()}), "must map tensor names to file names"),
    (INDEX, _set_weight_map(lambda m: {k: 7 for k in m}), "must map tensor names to file names"),
    ("adapter/adapter_config.json", DEEP, "nested too deeply"),
    ("adapter/adapter_config.json", "{\"r\":" + HUGE + "}", "not valid JSON"),
    ("adapter/adapter_config.json", _set("r", 4.0), "r must be a positive integer"),
    ("adapter/adapter_config.json", _set("r", 10**400), "r must be a positive integer"),
    ("adapter/adapter_config.json", _set("lora_alpha", 10**400), "lora_alpha must be a positive number"),
    ("adapter/adapter_config.json", _set("rank_pattern", {"q_proj": 0}), "rank_pattern must map module name patterns to positive integers"),
    ("adapter/adapter_config.json", lambda c: {**c, "use_rslora": True, "rank_pattern": {"q_proj": -4}}, "rank_pattern must map"),
    ("adapter/adapter_config.json", _set("rank_pattern", {"q_proj": "4"}), "rank_pattern must map"),
    ("adapter/adapter_config.json", _set("rank_pattern", ["q_proj"]), "rank_pattern must map"),
    ("adapter/adapter_config.json", _set("rank_pattern", {"q_proj(": 4}), "is not a valid regular expression"),
    ("adapter/adapter_config.json", _set("rank_pattern", {"(" * 2000 + ")" * 2000: 4}), "is not a valid regular expression"),
    ("adapter/adapter_config.json", _set("alpha_pattern", {"q_proj": None}), "alpha_pattern must map module name patterns to positive numbers"),
    ("adapter/adapter_config.json", _set("alpha_pattern", {"q_proj": "8"}), "alpha_pattern must map"),
    ("adapter/adapter_config.json", _set("use_rslora", "false"), "use_rslora must be true or false"),
    ("adapter/adapter_config.json", _set("use_dora", 1), "use_dora must be true or false"),
    ("adapter/adapter_config.json", _set("fan_in_fan_out", "yes"), "fan_in_fan_out must be true or false"),
    ("adapter/adapter_config.json", _set("base_model_name_or_path", 42), "base_model_name_or_path must be a repo id or a path"),
    ("adapter/adapter_config.json", _set("base_model_name_or_path", "a\0b"), "base_model_name_or_path must be a repo id or a path"),
    ("adapter/adapter_config.json", _set("trainable_token_indices", [1, "2"]), "trainable_token_indices must list token ids"),
    ("adapter/adapter_config.json", _set("trainable_token_indices", {"embed_tokens": [-1]}), "trainable_token_indices must map"),
    ("adapter/adapter_config.json", _set("trainable_token_indices", {"embed[": [1]}), "is not a valid regular expression"),
    # PEFT raises re.error, TypeError or ValueError for these (check_target_module_exists, LoraConfig)
    ("adapter/adapter_config.json", _set("target_modules", "(("), "target_modules '((' is not a valid regular expression"),
    ("adapter/adapter_config.json", _set("target_modules", 5), "target_modules must be a regular expression or a list"),
    ("adapter/adapter_config.json", _set("target_modules", ["q_proj", 5]), "target_modules must be a regular expression or a list"),
    ("adapter/adapter_config.json", _set("target_modules", None), "target_modules is not set"),
    ("adapter/adapter_config.json", _set("exclude_modules", "q_proj["), "exclude_modules 'q_proj[' is not a valid regular expression"),
    ("adapter/adapter_config.json", _set("exclude_modules", {"q_proj": 1}), "exclude_modules must be a regular expression or a list"),
    ("adapter/adapter_config.json", _set("modules_to_save", ["norm("]), "modules_to_save entry 'norm(' is not a valid regular expression"),
    ("adapter/adapter_config.json", _set("modules_to_save", "norm"), "modules_to_save must be a list"),
    ("adapter/adapter_config.json", _set("layers_to_transform", [0, "1"]), "layers_to_transform must be a layer number"),
    ("adapter/adapter_config.json", lambda c: {**c, "layers_to_transform": [0], "layers_pattern": "(?P<idx>x)"},
     "layers_pattern '(?P<idx>x)' is not a valid regular expression"),
    ("adapter/adapter_config.json", lambda c: {**c, "target_modules": ".*q_proj", "layers_to_transform": [0]},
     "cannot be used with target_modules as a regular expression"),
    ("adapter/adapter_config.json", _set("layers_pattern", "layers"), "layers_pattern is set without layers_to_transform"),
]


@pytest.mark.parametrize("file, edit, message", CASES, ids=[f"{f.split('/')[-1]}-{m}-{i}" for i, (f, _, m) in enumerate(CASES)])
def test_bad_json_is_one_line(copies, file, edit, message):
    base, adapter = copies
    path = base / file if file == INDEX else base.parent / file
    _edit(path, edit)
    assert message in (_outcome(base, adapter) or "")


@pytest.mark.parametrize("pattern", [r"(.*)*x", r"(.|\w)*!", r"(.*.*)*!"])
def test_patterns_that_backtrack_catastrophically_in_re_still_match_quickly(copies, pattern):
    """`re` takes forever on these against every module path; PEFT's matching gives no match, and so does lorafuse."""
    base, adapter = copies
    _edit(adapter / "adapter_config.json", _set("rank_pattern", {pattern: 2, "q_proj": 4}))
    assert _outcome(base, adapter) is None


def test_a_pattern_that_would_hang_is_refused_by_name():
    with within(10), pytest.raises(lorafuse.LorafuseError, match=r"rank_pattern key '\(a\|a\)\*\$' takes too long"):
        pattern_value({"(a|a)*$": 4}, "model." + "a" * 40 + "!", 8)


def test_patterns_match_as_peft_matches():
    from peft.utils.other import get_pattern_key

    patterns = {"q_proj": 1, r"layers\.1\..*": 2, "k_proj|v_proj": 3, "(?i:O_PROJ)": 4, r"^model\.layers\.0\.mlp\.up_proj": 5}
    for module in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.v_proj",
                   "model.layers.0.self_attn.o_proj", "model.layers.0.mlp.up_proj", "model.layers.0.mlp.gate_proj", "xq_proj"]:
        key = get_pattern_key(list(patterns), module)
        assert pattern_value(patterns, module, 0) == patterns.get(key, 0)


TARGETING = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r".*\.(q|k)_proj"},
    {"target_modules": ["q_proj", "model.layers.1.mlp.down_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": r".*layers\.1\.mlp\..*"},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": 0},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [0, 1], "layers_pattern": ["blocks", "layers"]},
    {"target_modules": ["q_proj", "down_proj"], "layers_to_transform": [1], "layers_pattern": "blocks"},
    {"target_modules": ["model.layers.0.self_attn.q_proj", "v_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "down_proj", "embed_tokens"], "modules_to_save": ["down_proj"]},
    {"target_modules": ["q_proj", "score"], "task_type": "SEQ_CLS"},
]
MODULES = [f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")] \
    + ["model.embed_tokens", "lm_head", "score", "xq_proj", "model.layers.0.self_attn.q_proj.inner"]


@pytest.mark.parametrize("fields", TARGETING, ids=range(len(TARGETING)))
def test_targets_are_chosen_as_peft_chooses_them(fields):
    """untargeted() agrees with PEFT's check_target_module_exists, with the config as PEFT prepares it
    (a SEQ_CLS model adds its heads to modules_to_save before it injects)."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = {"r": 8, "lora_alpha": 16, **fields}
    peft_config = LoraConfig(**config)
    if fields.get("task_type") == "SEQ_CLS":
        peft_config.modules_to_save = ["classifier", "score"]
    for module in MODULES:
        assert (untargeted(config, module, "linear") is None) == bool(check_target_module_exists(peft_config, module)), module


# -- fuzzing: any JSON value in any field ---------------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.sampled_from([0, -1, 2**63, 2**64, 10**400, 4.0, -0.0, 1e308])
    | st.floats(allow_nan=True) | st.text(max_size=8) | st.sampled_from(["q_proj", "(.*)*x", "[", "\ud800", "a\0b", "false", "fp8"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6) | st.sampled_from(["q_proj", "embed_tokens", "(a+)+$"]), inner, max_size=3),
    max_leaves=8,
) | st.integers(120, 140).map(lambda n: json.loads("[" * n + "]" * n))

ADAPTER_FIELDS = ["r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "fan_in_fan_out", "target_modules",
                  "trainable_token_indices", "modules_to_save", "base_model_name_or_path", "peft_type", "init_lora_weights",
                  "layer_replication", "bias", "lora_bias", "exclude_modules", "layers_to_transform", "layers_pattern",
                  "ensure_weight_tying", "task_type"]
CONFIG_FIELDS = ["tie_word_embeddings", "vocab_size", "model_type", "quantization_config", "dtype", "torch_dtype", "text_config",
                 "hidden_size", "architectures"]
FUZZ = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _fuzz(path: Path, base: Path, adapter: Path, edit) -> None:
    original = path.read_text()
    try:
        _edit(path, edit)
        _outcome(base, adapter)
    finally:
        path.write_text(original)


@FUZZ
@given(field=st.sampled_from(ADAPTER_FIELDS), value=JSON_VALUES)
def test_fuzz_adapter_config(copies, field, value):
    base, adapter = copies
    _fuzz(adapter / "adapter_config.json", base, adapter, _set(field, value))


@FUZZ
@given(field=st.sampled_from(CONFIG_FIELDS), value=JSON_VALUES, nested=st.sampled_from([None, "quantization_config", "text_config"]))
def test_fuzz_base_config(copies, field, value, nested):
    base, adapter = copies
    edit = _set(field, value) if nested is None else _set(nested, {"quant_method": "fp8", field: value})
    _fuzz(base / "config.json", base, adapter, edit)


@FUZZ
@given(where=st.sampled_from(["index", "weight_map", "entry", "metadata"]), value=JSON_VALUES)
def test_fuzz_index(copies, where, value):
    base, adapter = copies
    edits = {"index": lambda index: value, "weight_map": _set_weight_map(value),
             "entry": _set_weight_map(lambda m: {**m, next(iter(m)): value}), "metadata": _set("metadata", value)}
    _fuzz(base / INDEX, base, adapter, edits[where])


@pytest.fixture(scope="module")
def merged(model, tmp_path_factory):
    base, adapter = model
    out = tmp_path_factory.mktemp("merged") / "out"
    lorafuse.merge(base, adapter, out, max_shard_size="20KB")
    return out


def test_verify_reads_a_malformed_manifest_as_a_problem(merged, tmp_path):
    out = shutil.copytree(merged, tmp_path / "out")
    manifest = out / "lorafuse-manifest.json"
    # entries without a hash, with an unknown one, with two, with one of the other's length (a bad settings
    # record: test_resilience)
    entries = [{"size": "1", "sha256": "x"}, {"size": 1}, {"size": 1, "md5": "0" * 32},
               {"size": 1, "xxh3_128": "0" * 32, "sha256": "0" * 64}, {"size": 1, "xxh3_128": "0" * 64}]
    for text in [DEEP, "{\"files\":" + HUGE + "}", '{"files": []}', '{"files": {"config.json": []}}',
                 *(json.dumps({"files": {"config.json": entry}}) for entry in entries)]:
        manifest.write_text(text)
        with within(10):
            assert verify(out) == [f"{manifest} is not a valid lorafuse manifest"]


@FUZZ
@given(where=st.sampled_from(["manifest", "files", "entry", "size", "hash", "settings", "index"]), value=JSON_VALUES)
def test_fuzz_verify(merged, tmp_path_factory, where, value):
    out = merged
    path = out / (INDEX if where == "index" else "lorafuse-manifest.json")
    edits = {"manifest": lambda m: value, "files": _set("files", value), "settings": _set("settings", value),
             "entry": lambda m: {**m, "files": {**m["files"], "config.json": value}},
             "size": lambda m: {**m, "files": {**m["files"], "config.json": {**m["files"]["config.json"], "size": value}}},
             "hash": lambda m: {**m, "files": {**m["files"],
                                               "config.json": {**m["files"]["config.json"], "xxh3_128": value}}},
             "index": _set_weight_map(lambda m: {**m, next(iter(m)): value})}
    original = path.read_text()
    try:
        _edit(path, edits[where])
        with within(10):
            problems = verify(out)
        assert all(isinstance(p, str) and "\n" not in p for p in problems)
    except lorafuse.LorafuseError as e:
        assert "\n" not in str(e)
    finally:
        path.write_text(original)
