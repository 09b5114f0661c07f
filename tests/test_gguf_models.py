"""GGUF output (#22) across model families: the one-pass GGUF equals llama.cpp's converter run on the safetensors
merge, byte for byte, for Llama, Qwen2, Qwen3, Gemma 3, Phi-3 and Qwen3-MoE, in f16, bf16 and q8_0; and the merge
holds only a few merged tensors at a time while the converter writes.

Each model is a tiny random one built by transformers and saved in bf16, with a real tokenizer saved by the real
libraries: SmolLM2's byte-level BPE (a pre-tokenizer llama.cpp's converter recognises) for Qwen3 and Qwen3-MoE,
and for the others a SentencePiece model trained here on a few paragraphs, saved by the family's transformers
tokenizer class, with its tokenizer.model beside it as the Hub repositories of Llama 2, Gemma and Phi-3 ship it
(the converter reads that file). The adapter is PEFT's LoRA on every linear layer (and on the experts, for the
MoE), with random A and B. Route A is lorafuse's one pass; route B is lorafuse's safetensors merge converted by
`convert_hf_to_gguf.py` run as its own command; both are read back with the converter's own reader
(gguf_support, as in test_gguf.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import logging
import shutil
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import lorafuse
from conftest import make_adapter, quiet
from gguf_support import (TYPES, Lazy, assert_same_gguf, fetch_llama_cpp, model_files_written, read_ggufs, route_a,
                          smollm2_in_a_subprocess, start_convert)

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

# Paragraphs the SentencePiece tokenizers are trained on: plain English, enough for a few hundred pieces.
TEXT = """\
A language model is a long list of numbers arranged in matrices, one for every projection in every layer.
Fine-tuning all of them is costly, so a low-rank adapter trains two thin matrices per projection instead,
and their product is the change the training wanted to make. Merging folds that product back into the
weight it belongs to, and the result is an ordinary model that runs without the adapter library.

The merge reads each weight of the base model, adds the scaled product of the adapter's two factors, rounds
the sum once to the type of the file, and writes it. Tensors the adapter does not touch are copied as they
are. Nothing needs the whole model in memory: one tensor at a time is enough, whatever the size of the model.

Programs that run models on a laptop read a single file that holds the weights, the vocabulary and the
settings together. Its weights may be stored in sixteen bits or in blocks of eight-bit integers with one
scale per block of thirty-two values, which keeps the file small and the answers nearly as good as before.

The tokenizer cuts text into pieces the model knows. Some tokenizers learn merges of bytes, others learn
pieces of words with a score each, and both keep a few special pieces that begin and end a sequence. The
converter writes the pieces, their scores and their kinds into the file, next to the numbers of the model.

Every step can be checked against another program that does the same work its own way: the same inputs must
give the same bytes. When they do not, the first tensor that differs says where to look, and the shapes,
the types and the names of the tensors say the rest. A test that cannot fail proves nothing at all.
"""

SENTENCEPIECE_VOCAB = 512
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


@dataclass(frozen=True)
class Family:
    """One model family: its transformers config class and tiny shape, its tokenizer (SmolLM2's byte-level BPE,
    "bpe", or the transformers class a SentencePiece model is saved with), the architecture the GGUF must
    name, and LoRA settings beyond every linear layer."""

    name: str
    config_class: str
    config: dict
    tokenizer: str
    architecture: str
    lora: dict = field(default_factory=dict)


FAMILIES = [
    Family("llama", "LlamaConfig", dict(TINY, tie_word_embeddings=False), "LlamaTokenizer", "llama"),
    # transformers loads a qwen2 model's tokenizer as Qwen2Tokenizer, whatever tokenizer_config.json says: its
    # pre-tokenizer applied to SmolLM2's vocabulary is none llama.cpp's converter knows, and its Qwen2 class reads
    # a tokenizer.model first, so this one has a SentencePiece tokenizer.
    Family("qwen2", "Qwen2Config", dict(TINY, tie_word_embeddings=True), "LlamaTokenizer", "qwen2"),
    Family("qwen3", "Qwen3Config", dict(TINY, head_dim=8, tie_word_embeddings=False), "bpe", "qwen3"),
    Family("gemma3", "Gemma3TextConfig", dict(TINY, head_dim=8, sliding_window=8, tie_word_embeddings=True),
           "GemmaTokenizer", "gemma3"),
    Family("phi3", "Phi3Config", dict(TINY, pad_token_id=None, tie_word_embeddings=False), "LlamaTokenizer", "phi3"),
    Family("qwen3_moe", "Qwen3MoeConfig",
           dict(TINY, moe_intermediate_size=48, head_dim=8, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1,
                mlp_only_layers=[], tie_word_embeddings=False), "bpe", "qwen3moe",
           lora=dict(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])),
]
# SentencePiece special pieces, as each family's tokenizer class names them (Gemma: <pad> 0, <eos> 1, <bos> 2, <unk> 3).
SPECIAL_PIECES = {
    "LlamaTokenizer": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1),
    "GemmaTokenizer": dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                           bos_piece="<bos>", unk_piece="<unk>"),
}


# ----------------------------------------------------------------------------------------------------------------
# Building the models


def sentencepiece_tokenizer(tokenizer_class: str, folder: Path):
    """A BPE SentencePiece model with byte fallback (as Llama 2, Gemma and Phi-3 have), trained on TEXT and
    loaded by `tokenizer_class` from its tokenizer.model, as transformers loads such a Hub repository."""
    import sentencepiece
    from transformers import AutoTokenizer

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter([line for line in TEXT.splitlines() if line]), model_writer=model,
        vocab_size=SENTENCEPIECE_VOCAB, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        minloglevel=2, **SPECIAL_PIECES[tokenizer_class])
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": tokenizer_class}))
    return AutoTokenizer.from_pretrained(folder)


def build_base(family: Family, folder: Path, smollm2: Path | None) -> Path:
    """The family's tiny random model in bf16 with its tokenizer, both saved by save_pretrained; the vocabulary
    size and the special token ids in config.json are the tokenizer's. 1-d parameters are randomised (as
    conftest.build_model does): a norm left at its constant would hide a transform applied to the wrong tensor."""
    import transformers

    quiet()
    if family.tokenizer == "bpe":
        tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2)
    else:
        tokenizer = sentencepiece_tokenizer(family.tokenizer, folder.parent / "sentencepiece")
    config = getattr(transformers, family.config_class)(
        **family.config, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if family.tokenizer != "bpe":  # as the Hub repositories of these families ship it: the converter reads it
        shutil.copy(folder.parent / "sentencepiece" / "tokenizer.model", folder)
    return folder


def build_adapter(family: Family, base: Path, folder: Path) -> Path:
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, **family.lora)
    return make_adapter(base, folder, config)


@contextlib.contextmanager
def logged_warnings():
    """The messages logged at WARNING or above meanwhile that reach the root logger: what a program that set no
    logging up (lorafuse's command line) prints on stderr, through logging's last resort."""
    said = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: said.append(f"{record.name}: {record.getMessage()}")
    logging.getLogger().addHandler(handler)
    try:
        yield said
    finally:
        logging.getLogger().removeHandler(handler)


@pytest.fixture(scope="module")
def llama_cpp_dir() -> Path:
    return fetch_llama_cpp()


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return smollm2_in_a_subprocess()


@pytest.fixture(scope="module", params=FAMILIES, ids=[f.name for f in FAMILIES])
def family(request, tmp_path_factory, llama_cpp_dir, smollm2):
    """The family's base, adapter and safetensors merge (route B's first step), and both routes per GGUF type,
    built on demand: route B's converter runs as its own command beside route A."""
    f = request.param
    work = tmp_path_factory.mktemp(f"gguf-{f.name}")
    base = build_base(f, work / "base", smollm2)
    adapter = build_adapter(f, base, work / "adapter")
    merged = work / "merged"
    lorafuse.merge(base, adapter, merged)

    def both(t):
        finish = start_convert(llama_cpp_dir, merged, work / f"b-{t}.gguf", t)
        try:
            with logged_warnings() as said:
                a = route_a(lambda: lorafuse.merge(base, adapter, work / f"A-{t}" / "a.gguf", gguf_type=t,
                                                   llama_cpp=llama_cpp_dir), work / f"A-{t}" / "a.gguf")
            a.warnings = said
        except BaseException:
            finish.stop()
            raise
        return a, finish()
    return SimpleNamespace(spec=f, base=base, adapter=adapter, merged=merged, routes=Lazy(both))


# ----------------------------------------------------------------------------------------------------------------
# 1. Route A equals route B, for every family and type


@pytest.mark.parametrize("gguf_type", TYPES)
def test_gguf_equals_the_converter_run_on_the_safetensors_merge(family, llama_cpp_dir, gguf_type):
    a_route, b_path = family.routes[gguf_type]
    a, b = read_ggufs(llama_cpp_dir, a_route.path, b_path)
    assert_same_gguf(a, b)
    # The converter class of the family wrote it (not a fallback), in the type asked for.
    assert a["fields"]["general.architecture"]["preview"] == repr(family.spec.architecture)
    assert gguf_type.upper() in {t["type_name"] for t in a["tensors"]}
    # No merged model on disk on the way: the only model file written is the GGUF itself.
    assert not model_files_written(a_route), model_files_written(a_route)
    # The converter's notes (gguf-py's "Duplicated key name" for Gemma 3, say) are for its own command line: a
    # merge through the API, or with --quiet, prints nothing.
    assert a_route.warnings == [], a_route.warnings
    config = family.spec.config
    if "num_experts" in config:  # each layer's experts, pulled one by one, stacked by the converter: all arrived
        stacks = {t["name"]: t["shape"] for t in a["tensors"] if "_exps." in t["name"]}
        assert len(stacks) == 3 * config["num_hidden_layers"], sorted(stacks)
        assert all(shape[-1] == config["num_experts"] for shape in stacks.values()), stacks


# ----------------------------------------------------------------------------------------------------------------
# 2. Memory: a few merged tensors at a time, however many the model has

FEW = 2  # earlier merged tensors a merge may still hold when the converter asks for the next one (a prefetch, say)
DEEP = {"llama": 8, "qwen3_moe": 4}  # layers: 75 and 87 tensors, far more than a few


@pytest.mark.parametrize("name", DEEP)
def test_merged_tensors_are_released_as_the_converter_writes_them(name, llama_cpp_dir, smollm2, tmp_path, monkeypatch):
    """Every merged tensor's bytes route A makes for the converter (execute.work.TensorValues, whose bytearray
    the torch tensor handed to the converter keeps alive) are watched with a weak reference; when the converter
    asks for the next one, at most FEW earlier ones may still be alive, besides the experts the converter stacks
    into one tensor (it holds one projection's experts of one layer until the last arrives). A merge that made
    the merged tensors ahead of the writing, or kept them, holds dozens here. Each tensor is made once, on
    the thread that makes the next one while the converter writes this one (the first while it writes the
    metadata): the order
    read from the converter's prepared graph is the order it asks in, even where it reorders (the experts).
    The cycle collector is off meanwhile: the bytes must go when the last reference does. Bytes kept by
    unreachable cycles wait for a full collection, which on a real model comes rarely (a class made per tensor
    around its bytes once kept 1.3 GB of a 1.7 GB model's)."""
    from lorafuse.execute import work

    spec = next(f for f in FAMILIES if f.name == name)
    spec = dataclasses.replace(spec, config=dict(spec.config, num_hidden_layers=DEEP[name]))
    base = build_base(spec, tmp_path / "base", smollm2)
    adapter = build_adapter(spec, base, tmp_path / "adapter")
    stacked = spec.config.get("num_experts", 1) - 1
    made, held = [], []  # weak references to each merged tensor's bytes; how many earlier ones were alive
    on_main_thread = []

    class Watched(bytearray):  # the bytearray TensorValues makes, one that weak references can follow
        def __init__(self, *args):
            super().__init__(*args)
            made.append(weakref.ref(self))
            if threading.current_thread() is threading.main_thread():
                on_main_thread.append(len(made))

    class WatchedValues(work.TensorValues):
        def get(self, tensor):
            held.append(sum(ref() is not None for ref in made))
            return super().get(tensor)

    monkeypatch.setattr(work, "bytearray", Watched, raising=False)
    monkeypatch.setattr(work, "TensorValues", WatchedValues)
    monkeypatch.setattr(lorafuse.api, "TensorValues", WatchedValues)
    out = tmp_path / "out.gguf"
    gc.collect()
    gc.disable()
    try:
        lorafuse.merge(base, adapter, out, gguf_type="q8_0", llama_cpp=llama_cpp_dir)
    finally:
        gc.enable()
    monkeypatch.undo()
    tensors = len(lorafuse.plan(base, adapter).tensors)
    assert len(made) == tensors > 10 * (FEW + stacked), f"the watch saw {len(made)} of {tensors} tensors"
    assert max(held) <= FEW + stacked, f"merged tensors alive when the next was asked for: {held}"
    assert on_main_thread == [], f"tensors not made ahead (their numbers in the making): {on_main_thread}"
    assert out.is_file()
