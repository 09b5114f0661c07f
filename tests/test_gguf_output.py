"""GGUF output beyond one local file (#22): llama.cpp's split files (--max-shard-size), --push-to-hub, and
what `lorafuse plan` says of a .gguf OUT.

Oracles: llama.cpp's converter run as its own command with --split-max-size on lorafuse's safetensors merge
(the split files must be the same, name for name and byte for byte), llama-cpp-python loading the split GGUF
by its first file, and the loopback fake Hub (tests/hub_server.py) for what a push commits.
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lorafuse
from conftest import cached_smollm2_adapter
from gguf_support import (assert_one_line_error, assert_same_gguf, fetch_llama_cpp, llama_cpp_python, read_ggufs,
                          route_a, run_cli, smollm2_in_a_subprocess)
from hub_server import HubServer, use_in_process
from realmodel import chat_ids

pytestmark = pytest.mark.slow

SPLIT = "60MB"  # SmolLM2-135M at q8_0 is about 145 MB: three files
TOKEN = "hf_lorafuse_test_token"
REPO = "me/smol-gguf"


@pytest.fixture(scope="module")
def llama_cpp_dir() -> Path:
    return fetch_llama_cpp()


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    base = smollm2_in_a_subprocess()
    work = tmp_path_factory.mktemp("gguf-out")
    adapter = cached_smollm2_adapter(base, seed=0)
    merged = work / "merged"
    lorafuse.merge(base, adapter, merged)
    return base, adapter, merged, work


@pytest.fixture(scope="module")
def split(smol, llama_cpp_dir):
    """Route A: lorafuse writing split q8_0 files, watched; route B: the converter with --split-max-size on the
    safetensors merge, as a user runs it."""
    base, adapter, merged, work = smol
    out = work / "A" / "smol.gguf"
    a = route_a(lambda: lorafuse.merge(base, adapter, out, gguf_type="q8_0", max_shard_size=SPLIT,
                                       llama_cpp=llama_cpp_dir), out)
    b = work / "B"
    b.mkdir()
    done = subprocess.run([sys.executable, str(llama_cpp_dir / "convert_hf_to_gguf.py"), str(merged), "--outfile",
                           str(b / "smol.gguf"), "--outtype", "q8_0", "--split-max-size", SPLIT.removesuffix("B")],
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"})
    assert done.returncode == 0, done.stderr[-3000:]
    return a, b


def test_split_files_equal_the_converters_split(split, llama_cpp_dir):
    """The same file names as the converter's own split, each file the same tensors and metadata (general.*
    provenance aside), the first holding the vocabulary; nothing else beside them."""
    a, b = split
    names = sorted(os.listdir(b))
    assert len(names) == 3 and names[0] == "smol-00001-of-00003.gguf", names
    assert a.listing == names, "lorafuse writes exactly the converter's split files, and nothing else, beside OUT"
    for name in names:
        got, want = read_ggufs(llama_cpp_dir, a.path.parent / name, b / name)
        assert_same_gguf(got, want)
        assert got["fields"]["split.count"]["preview"] == "3"
    assert a.result.out == str(a.path.parent / names[0]) and a.result.shards == 3
    assert a.result.bytes_written == sum((a.path.parent / n).stat().st_size for n in names)


def test_split_gguf_runs_in_llama_cpp(split, smol, llama_cpp_dir):
    """llama.cpp opens the split model by its first file and computes what the unsplit one does."""
    if importlib.util.find_spec("llama_cpp") is None:
        sys.path.insert(0, str(llama_cpp_python()))
    import llama_cpp
    import numpy as np
    from transformers import AutoTokenizer

    a, b = split
    first = a.path.parent / "smol-00001-of-00003.gguf"
    prompt = chat_ids(AutoTokenizer.from_pretrained(smol[2]), "Name a colour.")["input_ids"][0].tolist()

    def last_logits(path: Path) -> np.ndarray:
        llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False, logits_all=True, seed=0, n_threads=2)
        llm.eval(prompt)
        return np.array(llm.scores[llm.n_tokens - 1])

    unsplit = b.parent / "unsplit.gguf"
    lorafuse.merge(smol[0], smol[1], unsplit, gguf_type="q8_0", llama_cpp=llama_cpp_dir)
    np.testing.assert_array_equal(last_logits(first), last_logits(unsplit))


def test_a_split_gguf_is_refused_over_its_earlier_files_without_force(split, smol, llama_cpp_dir, capsys):
    """An earlier split of the same name is the user's output: kept, unless --force (which replaces GGUFs only)."""
    a, _ = split
    first = a.path.parent / "smol-00001-of-00003.gguf"
    before = first.stat()
    code, _, err = run_cli(capsys, "merge", smol[0], smol[1], a.path, "--gguf-type", "q8_0",
                           "--max-shard-size", SPLIT, "--llama-cpp", llama_cpp_dir)
    assert_one_line_error(code, err, str(first), "--force")
    assert first.stat().st_mtime_ns == before.st_mtime_ns


def test_plan_describes_the_gguf(smol, capsys, tmp_path):
    base, adapter, _, _ = smol
    out = tmp_path / "m.gguf"
    code, said, err = run_cli(capsys, "plan", base, adapter, out, "--gguf-type", "q8_0")
    assert code == 0, err
    line = next(x for x in said.splitlines() if x.startswith("output"))
    assert "GGUF q8_0" in line and str(out) in line and "shard" not in line
    code, said, _ = run_cli(capsys, "plan", base, adapter, out, "--gguf-type", "q8_0", "--max-shard-size", SPLIT,
                            "--json")
    described = json.loads(said)
    plan = lorafuse.plan(base, adapter, out, gguf_type="q8_0")
    assert described["gguf"] == {"file": str(out), "gguf_type": "q8_0", "bytes_at_most": plan.file_output.size,
                                 "split_bytes": 60 * 10**6}
    assert "shards" not in described and described["output_bytes"] == plan.file_output.size
    assert not os.path.lexists(out) and os.listdir(tmp_path) == []


def test_plan_refuses_a_gguf_type_it_cannot_write(smol, capsys, tmp_path):
    code, _, err = run_cli(capsys, "plan", smol[0], smol[1], tmp_path / "m.gguf", "--gguf-type", "q9")
    assert_one_line_error(code, err, "q9", "q8_0")


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubServer([], token=TOKEN, max_seconds=300) as server:
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        use_in_process(server, monkeypatch)
        yield server


def test_push_to_hub_commits_the_gguf_and_a_card_once(smol, hub, llama_cpp_dir, tmp_path):
    """One commit with the GGUF (the bytes left at OUT) and a model card that says it is a GGUF of this merge;
    OUT holds the file and nothing else is left beside it."""
    base, adapter, _, _ = smol
    out = tmp_path / "out" / "smol-q8_0.gguf"
    out.parent.mkdir()
    report = lorafuse.merge(base, adapter, out, gguf_type="q8_0", push_to_hub=REPO, llama_cpp=llama_cpp_dir)
    files = hub.repos[REPO].files()
    assert sorted(files) == [".gitattributes", "README.md", out.name]
    assert files[out.name] == out.read_bytes()
    card = files["README.md"].decode()
    assert "gguf" in card.split("---")[1] and "GGUF q8_0" in card and out.name in card
    assert len(hub.pushes) == 1 and report.hub_url.endswith(hub.repos[REPO].refs["main"])
    assert os.listdir(out.parent) == [out.name]


def test_push_refused_by_the_hub_leaves_nothing(smol, hub, llama_cpp_dir, tmp_path, monkeypatch):
    """A token the Hub refuses fails before the merge, with one line, and writes nothing."""
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    out = tmp_path / "smol.gguf"
    with pytest.raises(lorafuse.LorafuseError, match="not authorized"):
        lorafuse.merge(smol[0], smol[1], out, gguf_type="q8_0", push_to_hub=REPO, llama_cpp=llama_cpp_dir)
    assert os.listdir(tmp_path) == []


def test_max_shard_size_must_be_a_size(smol, llama_cpp_dir, tmp_path, capsys):
    code, _, err = run_cli(capsys, "merge", smol[0], smol[1], tmp_path / "m.gguf", "--max-shard-size", "lots",
                           "--llama-cpp", llama_cpp_dir)
    assert_one_line_error(code, err, "lots")
    assert os.listdir(tmp_path) == []
