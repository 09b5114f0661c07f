"""Bad base models and adapters: one-line errors naming the problem, nothing written, inputs untouched."""

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import lorafuse
from conftest import leftovers, read_tensors, same_bytes, tree_hash


def _damage_base(base: Path, tmp: Path, damage) -> Path:
    copy = tmp / "base"
    shutil.copytree(base, copy, symlinks=True)
    damage(copy)
    return copy


def _damage_adapter(adapter: Path, tmp: Path, damage) -> Path:
    copy = tmp / "adapter"
    shutil.copytree(adapter, copy)
    damage(copy)
    return copy


def _index(folder: Path) -> dict:
    return json.loads((folder / "model.safetensors.index.json").read_text())


def _set_index(folder: Path, index: dict) -> None:
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _shards(folder: Path) -> list[Path]:
    return sorted(folder.glob("model-*.safetensors"))


def truncated_shard(folder):
    shard = _shards(folder)[1]
    shard.write_bytes(shard.read_bytes()[:-100])


def duplicate_across_shards(folder):
    first, second = _shards(folder)[:2]
    tensors = load_file(second)
    name, value = next(iter(load_file(first).items()))
    save_file({**tensors, name: value}, second, metadata={"format": "pt"})


def missing_shard(folder):
    _shards(folder)[-1].unlink()


def index_escapes(target):
    def damage(folder):
        index = _index(folder)
        index["weight_map"][next(iter(index["weight_map"]))] = target
        _set_index(folder, index)
    return damage


def index_lies(folder):
    index = _index(folder)
    name, shard = next(iter(index["weight_map"].items()))
    index["weight_map"][name] = next(p.name for p in _shards(folder) if p.name != shard)
    _set_index(folder, index)


def link_outside(folder):
    shard = _shards(folder)[0]
    outside = folder.parent / "elsewhere.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)


def odd_shard(kind):
    """A shard replaced by something that is not a file: it is named as what it is, not as missing, and a
    FIFO is never opened (that would wait for a writer forever)."""
    def damage(folder):
        shard = _shards(folder)[0]
        shard.unlink()
        if kind == "FIFO":
            os.mkfifo(shard)
        elif kind == "folder":
            shard.mkdir()
        elif kind == "circular link":
            shard.symlink_to(shard.name)
        else:
            shard.symlink_to("gone.safetensors")
    damage.__name__ = f"shard_is_{kind.replace(' ', '_')}"
    return damage


def odd_index(folder):
    index = folder / "model.safetensors.index.json"
    index.unlink()
    os.mkfifo(index)


def no_config(folder):
    (folder / "config.json").unlink()


def _secret(folder: Path) -> Path:
    """A file beside the folder, as ~/.ssh or a credentials file would be."""
    secret = folder.parent / "secret.json"
    secret.write_text('{"token": "hf_secret"}')
    return secret


def carried_links_outside(name):
    def damage(folder):
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(_secret(folder))
    damage.__name__ = f"{name}_links_outside"
    return damage


def dangling_tokenizer(folder):
    (folder / "tokenizer.json").symlink_to(folder / "blob-that-is-gone")


def carried_fifo(name):
    def damage(folder):
        (folder / name).unlink(missing_ok=True)
        os.mkfifo(folder / name)
    damage.__name__ = f"{name}_is_a_fifo"
    return damage


def nan_in_base(folder):
    """In a weight the adapter changes: the base is to blame, not the adapter."""
    for shard in _shards(folder):
        tensors = load_file(shard)
        key = next((k for k in tensors if k.endswith("layers.1.self_attn.q_proj.weight")), None)
        if key:
            tensors[key][3, 5] = float("inf")
            save_file(tensors, shard, metadata={"format": "pt"})


BASE_CASES = [
    (truncated_shard, "truncated"),
    (duplicate_across_shards, "appears in both"),
    (missing_shard, "is missing; download it again"),
    (index_escapes("../elsewhere.safetensors"), "outside the model folder; refusing to read it"),
    (index_escapes("/etc/passwd"), "outside the model folder; refusing to read it"),
    (index_lies, "does not hold it"),
    (link_outside, "links outside the model folder"),
    (no_config, "has no config.json"),
    (carried_links_outside("tokenizer.json"), "links outside the model folder"),
    (carried_links_outside("config.json"), "links outside the model folder"),
    (carried_fifo("generation_config.json"), "is not a regular file"),
    (dangling_tokenizer, "cannot be read"),
    (odd_shard("FIFO"), "but .*model-00001-of-0000.\\.safetensors is a FIFO, not a file; download it again"),
    (odd_shard("folder"), "is a folder, not a file; download it again"),
    (odd_shard("circular link"), "is a circular link, not a file; download it again"),
    (odd_shard("link to nothing"), "is a link to nothing \\(gone.safetensors\\); download it again"),
    (odd_index, "model.safetensors.index.json is a FIFO, not a file; download it again"),
    (nan_in_base, "base tensor model.layers.1.self_attn.q_proj.weight already holds NaN or Inf values, so no merge"),
]


def adapter_config(edit):
    def damage(folder):
        path = folder / "adapter_config.json"
        if edit is None:
            path.unlink()
        elif isinstance(edit, str):
            path.write_text(edit)
        else:
            path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return damage


def nan_in_adapter(folder):
    tensors = load_file(folder / "adapter_model.safetensors")
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})


ADAPTER_CASES = [
    (adapter_config(None), "has no adapter_config.json"),
    (adapter_config("{not json"), "is not valid JSON"),
    (adapter_config("[1, 2]"), "is not a JSON object"),
    (adapter_config(lambda c: {**c, "lora_alpha": "big"}), "lora_alpha must be a positive number"),
    (adapter_config(lambda c: {**c, "peft_type": "LOHA"}), "lorafuse merges LoRA adapters"),
    (nan_in_adapter, "gives NaN or Inf values"),
    (carried_links_outside("tokenizer_config.json"), "links outside the model folder"),
    (carried_fifo("chat_template.jinja"), "is not a regular file"),
]


@pytest.mark.parametrize("damage, message", BASE_CASES + ADAPTER_CASES,
                         ids=[d.__name__ if hasattr(d, "__name__") else str(i) for i, (d, _) in enumerate(BASE_CASES + ADAPTER_CASES)])
def test_bad_input_is_refused_cleanly(sharded, tmp_path, damage, message):
    base, adapter = sharded
    if (damage, message) in BASE_CASES:
        base = _damage_base(base, tmp_path, damage)
    else:
        adapter = _damage_adapter(adapter, tmp_path, damage)
    before = tree_hash(base), tree_hash(adapter)
    with pytest.raises(lorafuse.LorafuseError, match=message) as error:
        lorafuse.merge(base, adapter, tmp_path / "out")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)
    assert (tree_hash(base), tree_hash(adapter)) == before


def test_links_into_the_hugging_face_cache_are_followed(sharded, tmp_path, monkeypatch):
    """The cache's snapshot folders link into blobs/: that is the one place links out are expected, for
    weights and carried files alike (a subfolder is not carried)."""
    from huggingface_hub import constants

    base, adapter = sharded
    cache = tmp_path / "hub"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc"
    blobs = cache / "models--org--tiny" / "blobs"
    blobs.mkdir(parents=True)
    shutil.copytree(base, snapshot)
    (snapshot / "tokenizer.json").write_text('{"version": "1.0"}')
    for file in _shards(snapshot) + [snapshot / "tokenizer.json"]:
        file.rename(blobs / file.name)
        file.symlink_to(blobs / file.name)
    (snapshot / "original").mkdir()
    (snapshot / "original" / "params.json").write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    lorafuse.merge(snapshot, adapter, tmp_path / "out")
    out = tmp_path / "out"
    assert (out / "model.safetensors").is_file()
    assert (out / "tokenizer.json").read_text() == '{"version": "1.0"}' and not (out / "tokenizer.json").is_symlink()
    assert not (out / "original").exists()


@pytest.mark.parametrize("name, target", [
    ("tokenizer.json", "../../../token"),  # HF_HUB_CACHE=$HF_HOME: the user's Hugging Face token
    (None, "../../../models--org--other/blobs/abc"),  # a shard, from another repo's blobs
], ids=["token", "other-repo"])
def test_links_inside_the_hugging_face_cache_lead_only_to_the_repo_s_own_blobs(sharded, tmp_path, monkeypatch, name, target):
    """Inside the cache, a link out of a snapshot is followed only into its repo's blobs/: anything else
    would be copied into OUT (and uploaded with --push-to-hub)."""
    from huggingface_hub import constants

    base, adapter = sharded
    cache = tmp_path / "hf"
    snapshot = cache / "models--org--tiny" / "snapshots" / "abc"
    shutil.copytree(base, snapshot)
    name = name or _shards(snapshot)[0].name
    (cache / "models--org--other" / "blobs").mkdir(parents=True)
    (cache / "token").write_text("hf_secret")
    if (snapshot / name).exists():
        (snapshot / name).rename(cache / "models--org--other" / "blobs" / "abc")
    (snapshot / name).symlink_to(target)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(lorafuse.LorafuseError, match=f"{name} links outside the model folder"):
        lorafuse.merge(snapshot, adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_nan_found_part_way_leaves_nothing_behind(sharded, tmp_path, monkeypatch):
    """Shards are finished by the time the NaN is found: a rerun could not resume them into success
    (the adapter must change first), so the staging folder goes too. An interruption would keep them."""
    import lorafuse.execute as execute

    base, adapter = sharded

    def nan_in_the_last_layer(folder):
        tensors = load_file(folder / "adapter_model.safetensors")
        key = max(k for k in tensors if "lora_B" in k)
        tensors[key][0, 0] = float("nan")
        save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})

    adapter = _damage_adapter(adapter, tmp_path, nan_in_the_last_layer)
    finished, finish = [], execute._finish_shard
    monkeypatch.setattr(execute, "_finish_shard", lambda *args: finished.append(finish(*args)))
    with pytest.raises(lorafuse.LorafuseError, match="gives NaN or Inf values"):
        lorafuse.merge(base, adapter, tmp_path / "out", max_shard_size="8KB")
    assert finished, "no shard was finished before the NaN: nothing to tell apart"
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_nan_in_an_untouched_base_tensor_is_passed_through(sharded, tmp_path):
    """A tensor the adapter does not change is copied as raw bytes, never decoded: its NaN is the base's
    own business and comes out as it went in."""
    name = "model.layers.1.self_attn.k_proj.weight"

    def nan_in_k_proj(folder):
        for shard in _shards(folder):
            tensors = load_file(shard)
            if name in tensors:
                tensors[name][0, :2] = float("nan")
                save_file(tensors, shard, metadata={"format": "pt"})

    base, adapter = sharded
    damaged = _damage_base(base, tmp_path, nan_in_k_proj)
    lorafuse.merge(damaged, adapter, tmp_path / "out")
    merged, original = read_tensors(tmp_path / "out"), read_tensors(damaged)
    assert merged[name][0, :2].isnan().all() and same_bytes(merged[name], original[name])


def test_a_single_file_base_that_is_not_a_file_is_named_as_such(tiny_base, sharded, tmp_path):
    base = _damage_base(tiny_base("llama", "bf16"), tmp_path, lambda folder: None)
    (base / "model.safetensors").unlink()
    os.mkfifo(base / "model.safetensors")
    with pytest.raises(lorafuse.LorafuseError, match=r"model.safetensors is a FIFO, not a file; download it again"):
        lorafuse.plan(base, sharded[1])


def test_reading_a_header_never_opens_a_fifo(tmp_path):
    """Whoever asks (the base, the adapter, verify), a FIFO is refused from stat alone. Were it opened, a
    writer arrives after a few seconds, so that the test fails instead of waiting forever."""
    import threading

    from lorafuse.formats.safetensors import read_header

    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)

    def writer():
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # fails (ENXIO) unless a reader waits
        except OSError:
            pass

    timer = threading.Timer(3, writer)
    timer.start()
    try:
        with pytest.raises(lorafuse.LorafuseError, match="is a FIFO, not a file"):
            read_header(fifo)
    finally:
        timer.cancel()
