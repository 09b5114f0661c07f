"""lorafuse against the oracle: PEFT itself, on real files written by transformers and PEFT.

For every adapter variant PEFT can save (plain LoRA, rsLoRA, rank/alpha patterns, fan_in_fan_out,
embedding LoRA, lora_bias, bias="all"/"lora_only", DoRA, modules_to_save, vocabulary resizes,
trainable tokens) on tiny Llama / Qwen2 / GPT-2 / Gemma models in fp32 and bf16, we merge with
lorafuse and check that

  (a) transformers loads the output with no missing, unexpected or mismatched keys;
  (b) its logits equal those of the *unmerged* PeftModel (what the user trained and evaluated);
  (c) every merged tensor is at least as close to the exact (float64) merge as PEFT's own
      merge_and_unload in the file's dtype;
  (d) tied heads stay tied exactly when the adapter leaves the head alone;
and that the files, read back with safetensors' own reader, hold what the plan says. Then casts,
sharding, and every refusal (which must leave no trace on disk).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pytest
import torch

import lorafuse
from conftest import (MERGE_DEVICES, TORCH_DTYPES, build_model, device_suffix, leftovers, load_model, load_peft, logits,
                      make_adapter, read_adapter, read_config, read_tensors, same_bytes, save_model, tree_hash)

# --- tolerances ----------------------------------------------------------------------------------
# Logit tolerances are relative to the logit scale max|logits|. With an fp32 output the merged
# weights differ from PEFT's unmerged computation only by fp32 rounding (~1e-7 relative). With a
# 16-bit output every merged weight is rounded once more, by at most half an ulp (2^-8 relative for
# bf16, 2^-11 for fp16); through two layers that moves the logits by a small multiple of it, larger
# where the adapter makes the weights much larger than the base's (rsLoRA here: 0.022, the worst
# seen). We allow 16 ulps of the logit scale, and require separately that the adapter moves the
# logits by more than twice the tolerance and that OUT is >= 10x closer to PEFT than the base is.
LOGIT_RTOL = {"fp32": 1e-5, "bf16": 16 * 2.0**-8, "fp16": 16 * 2.0**-11}
EFFECT_RATIO = 10
# (c) PEFT and lorafuse both compute in fp32 (lorafuse: one fused addmm; PEFT: B@A, *scale, +W) and
# round once to the file dtype. For bf16 files the two errors come out identical. For fp32 files the
# fp32 arithmetic itself is the error (~1e-7 relative, more than half an fp32 ulp), and the two orders
# of summation each win on some tensors: we saw lorafuse exceed PEFT by 1e-8 * max|W|. The slack of
# 2e-7 * max|W| (about 3 fp32 ulps) absorbs that; it is far below any real mistake (~1e-3 and up).
TENSOR_SLACK = 2e-7
# Unit roundoff: round-to-nearest with p significant bits errs by at most 2^-p relative (p = 24, 8, 11);
# lorafuse's error must stay within it (plus the same fp32 slack).
HALF_ULP = {"fp32": 2.0**-24, "bf16": 2.0**-8, "fp16": 2.0**-11}
FILE_DTYPES = {"F32": "fp32", "BF16": "bf16", "F16": "fp16"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lora(**kwargs):
    """LoraConfig kwargs with random A and B (init_lora_weights=False) and r=8, alpha=16 unless given."""
    return {"r": 8, "lora_alpha": 16, "init_lora_weights": False, **kwargs}


@dataclass(frozen=True)
class Variant:
    id: str
    model: str  # conftest.tiny_config kind
    config: dict  # LoraConfig kwargs
    vocab: int | None = None  # resize_token_embeddings(vocab) before get_peft_model
    tied_after: bool | str | None = None  # for tied bases: must the output still be tied? ("either")
    save: dict = field(default_factory=dict)  # PeftModel.save_pretrained kwargs
    saved_config: dict = field(default_factory=dict)  # adapter_config.json entries as another tool writes them
    dtypes: tuple[str, ...] = ("fp32", "bf16")


TARGETING_VARIANTS = [
    Variant("regex_targets-llama", "llama", lora(target_modules=r".*\.(q_proj|v_proj)")),
    Variant("exclude-llama", "llama", lora(target_modules=["q_proj", "v_proj"],
                                           exclude_modules=["model.layers.0.self_attn.v_proj"])),
    Variant("exclude_regex-qwen2", "qwen2", lora(target_modules=["q_proj", "o_proj"], exclude_modules=r".*layers\.1\..*")),
    Variant("layers-llama", "llama", lora(target_modules=["q_proj", "down_proj"], layers_to_transform=[1],
                                          layers_pattern="layers")),
    Variant("layer_number-llama", "llama", lora(target_modules=["v_proj"], layers_to_transform=0)),
    # PEFT saves "all-linear" as the list of layers it found; other tools keep the shorthand, which PEFT
    # expands again when it loads the adapter.
    Variant("all_linear_saved-llama", "llama", lora(target_modules="all-linear"), saved_config={"target_modules": "all-linear"}),
    Variant("all_linear_saved-dora-gpt2", "gpt2", lora(target_modules="all-linear", use_dora=True),
            saved_config={"target_modules": "all-linear"}, tied_after=True),
]
VARIANTS = [
    Variant("lora-llama", "llama", lora(target_modules="all-linear")),
    Variant("lora-qwen2", "qwen2", lora(target_modules="all-linear")),
    Variant("lora-gemma", "gemma", lora(target_modules="all-linear"), tied_after=True),
    Variant("rslora-llama", "llama", lora(target_modules="all-linear", use_rslora=True)),
    Variant("patterns-llama", "llama", lora(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
        rank_pattern={"q_proj": 8, "model.layers.1.self_attn.k_proj": 2},
        alpha_pattern={"model.layers.1.self_attn.v_proj": 32, "down_proj": 3})),
    Variant("patterns-rslora-qwen2", "qwen2", lora(
        r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "up_proj"],
        rank_pattern={"up_proj": 16}, alpha_pattern={"model.layers.0.self_attn.q_proj": 2})),
    Variant("fanin-gpt2", "gpt2", lora(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
            tied_after=True),
    # PEFT flips fan_in_fan_out per layer (True for Conv1D, False for Linear) and the saved config
    # keeps whichever layer came last: here False, from lm_head, while c_proj is a square Conv1D.
    Variant("mixed-conv1d-linear-gpt2", "gpt2", lora(target_modules=["c_attn", "c_proj", "lm_head"]),
            tied_after=False),
    # PEFT ignores fan_in_fan_out on nn.Linear (it warns and uses False) whatever the config says, here
    # on square q_proj/o_proj.
    Variant("fanin-flag-llama", "llama", lora(target_modules=["q_proj", "k_proj", "o_proj"]),
            saved_config={"fan_in_fan_out": True}),
    Variant("embed-llama", "llama", lora(target_modules=["embed_tokens", "q_proj", "v_proj"])),
    Variant("embed-gemma", "gemma", lora(target_modules=["embed_tokens", "q_proj"]), tied_after=False),
    Variant("embed-gpt2", "gpt2", lora(target_modules=["wte", "c_attn"], fan_in_fan_out=True), tied_after=False),
    Variant("pickle-llama", "llama", lora(target_modules=["q_proj", "down_proj"]),
            save={"safe_serialization": False}),  # adapter_model.bin, loaded with weights_only=True
    Variant("save_norms-qwen2", "qwen2", lora(target_modules=["q_proj"], modules_to_save=["norm"])),
    Variant("lora_bias-qwen2", "qwen2", lora(target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True)),
    Variant("bias_all-qwen2", "qwen2", lora(target_modules=["q_proj", "o_proj"], bias="all")),
    Variant("bias_lora_only-qwen2", "qwen2", lora(target_modules=["q_proj", "o_proj"], bias="lora_only")),
    Variant("dora-llama", "llama", lora(target_modules="all-linear", use_dora=True)),
    Variant("dora-qwen2", "qwen2", lora(target_modules="all-linear", use_dora=True)),
    Variant("dora-gpt2", "gpt2", lora(target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                                      use_dora=True), tied_after=True),
    Variant("dora_embed-llama", "llama", lora(target_modules=["embed_tokens", "q_proj"], use_dora=True)),
    Variant("dora_embed-gemma", "gemma", lora(target_modules=["embed_tokens", "o_proj"], use_dora=True),
            tied_after=False),
    Variant("save_head-llama", "llama", lora(target_modules=["q_proj"], modules_to_save=["lm_head"])),
    Variant("save_head-gemma", "gemma", lora(target_modules=["q_proj"], modules_to_save=["lm_head"]),
            tied_after=False),
    Variant("save_head-llama_tied", "llama_tied", lora(target_modules=["v_proj"], modules_to_save=["lm_head"]),
            tied_after=False),
    Variant("head-llama", "llama", lora(target_modules=["q_proj", "lm_head"])),
    Variant("head-gemma", "gemma", lora(target_modules=["lm_head"]), tied_after=False),
    # ensure_weight_tying: PEFT gives the tied head the embedding's LoRA (transposed), so the head
    # keeps following the embedding. (PEFT's own merge_and_unload then adds the delta twice to the shared
# weight: its merged model disagrees with its unmerged one, so (c) cannot use it as a reference.)
    # Both stay equal, so the output may keep them tied or write two equal tensors.
    Variant("embed-tying-gemma", "gemma", lora(target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True),
            tied_after="either"),
    # After resize_token_embeddings, PEFT's save_pretrained (save_embedding_layers="auto") notices the
    # base's config has another vocab_size and saves the whole embedding modules too.
    Variant("resize-only-llama", "llama", lora(target_modules=["q_proj"]), vocab=160),
    Variant("resize-llama", "llama", lora(target_modules=["q_proj", "v_proj"],
                                          modules_to_save=["embed_tokens", "lm_head"]), vocab=160),
    Variant("resize-gemma", "gemma", lora(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
            vocab=144, tied_after=False),
    # The same, saved with save_embedding_layers=False: only the modules_to_save copies are written.
    Variant("resize-explicit-llama", "llama", lora(target_modules=["q_proj", "v_proj"],
                                                   modules_to_save=["embed_tokens", "lm_head"]), vocab=160,
            save={"save_embedding_layers": False}),
    Variant("resize-explicit-gemma", "gemma", lora(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]),
            vocab=144, tied_after=False, save={"save_embedding_layers": False}),
    Variant("tokens-llama", "llama", lora(target_modules=["q_proj"], trainable_token_indices=[1, 5, 7])),
    Variant("tokens-dict-llama", "llama", lora(target_modules=["q_proj"],
                                               trainable_token_indices={"embed_tokens": [1, 5], "lm_head": [7, 9]})),
    # PEFT ties the head's token adapter to the embedding's: the new rows reach the head too.
    Variant("tokens-gemma", "gemma", lora(target_modules=["q_proj"], trainable_token_indices=[1, 5, 7]),
            tied_after=True),
    # Different rows for embedding and head: PEFT does not tie them, each keeps its own rows.
    Variant("tokens-dict-gemma", "gemma", lora(target_modules=["q_proj"],
                                               trainable_token_indices={"embed_tokens": [1, 5], "lm_head": [7, 9]}),
            tied_after=False),
    # The usual way to add special tokens: resize, then train only the new rows.
    Variant("resize-tokens-llama", "llama", lora(target_modules=["q_proj"], trainable_token_indices=[128, 130, 159]),
            vocab=160),
    # The config fields PEFT chooses the adapted modules by, each with the tensors PEFT saves for it.
    *TARGETING_VARIANTS,
]
VARIANT = {v.id: v for v in VARIANTS}
CASES = [(v, d, device) for v in VARIANTS for d in v.dtypes for device in MERGE_DEVICES]


def input_ids(vocab: int) -> torch.Tensor:
    """Fixed ids that include the trainable-token rows (1, 5, 7, 9) and, after a resize, new rows."""
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    ids[0, :4] = torch.tensor([1, 5, 7, 9])
    if vocab > 128:
        ids[1, :3] = torch.tensor([vocab - 1, 128, 130])
    return ids


def get_adapter(artefacts, tiny_base, v: Variant) -> Path:
    """The adapter of a variant, trained on the fp32 base (the bf16 base is the same model rounded)."""
    from peft import LoraConfig

    def build(folder: Path) -> Path:
        make_adapter(tiny_base(v.model), folder, LoraConfig(**v.config), vocab=v.vocab, **v.save)
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **v.saved_config}))
        return folder

    return artefacts.get(("adapter", v.id), build)


@dataclass
class Case:
    """One merge and, computed on demand, everything the tests compare it with."""

    variant: Variant
    dtype: str
    base: Path
    adapter: Path
    out: Path
    plan: object
    report: object

    @property
    def vocab(self) -> int:
        return self.variant.vocab or 128

    @cached_property
    def ids(self) -> torch.Tensor:
        return input_ids(self.vocab)

    @cached_property
    def loaded(self):
        """(a): OUT loaded in fp32 by transformers, with its loading info."""
        return load_model(self.out, torch.float32, info=True)

    @cached_property
    def out_logits(self):
        return logits(self.loaded[0], self.ids)

    @cached_property
    def peft_logits(self):
        """(b)'s oracle: the unmerged PeftModel on the same base file, computing in fp32."""
        return logits(load_peft(self.base, self.adapter, torch.float32, self.variant.vocab), self.ids)

    @cached_property
    def base_logits(self):
        return logits(load_model(self.base, torch.float32, self.variant.vocab), self.ids)

    @cached_property
    def exact(self) -> dict:
        """(c)'s reference: PEFT's merge arithmetic run in float64 (exact up to ~1e-16)."""
        return load_peft(self.base, self.adapter, torch.float64, self.variant.vocab, merge=True).state_dict()

    @cached_property
    def peft_merged(self) -> dict:
        """PEFT's merge_and_unload with the base in its file dtype."""
        return load_peft(self.base, self.adapter, TORCH_DTYPES[self.dtype], self.variant.vocab, merge=True).state_dict()

    @cached_property
    def out_tensors(self) -> dict:
        return read_tensors(self.out)

    @cached_property
    def base_tensors(self) -> dict:
        return read_tensors(self.base)

    @property
    def embedding(self) -> str:
        (name,) = [n for n in self.base_tensors if n.endswith(("embed_tokens.weight", "wte.weight"))]
        return name

    @cached_property
    def head_adapted(self) -> bool:
        return any(k.startswith("base_model.model.lm_head.") for k in self.adapter_tensors)

    @cached_property
    def adapter_tensors(self) -> dict:
        return read_adapter(self.adapter)

    @property
    def base_tied(self) -> bool:
        return bool(read_config(self.base).get("tie_word_embeddings")) and "lm_head.weight" not in self.base_tensors


@pytest.fixture(scope="module", params=CASES, ids=[f"{v.id}-{d}{device_suffix(dev)}" for v, d, dev in CASES])
def case(request, tiny_base, artefacts, tmp_path_factory) -> Case:
    v, dtype, device = request.param
    base = tiny_base(v.model, dtype)
    adapter = get_adapter(artefacts, tiny_base, v)
    out = tmp_path_factory.mktemp(f"out-{v.id}-{dtype}{device_suffix(device)}") / "merged"
    try:
        plan = lorafuse.plan(base, adapter, out)
        report = lorafuse.merge(base, adapter, out, device=device)
    except lorafuse.LorafuseError as e:
        pytest.fail(f"lorafuse refuses an adapter PEFT saved and loads: {e}")
    return Case(v, dtype, base, adapter, out, plan, report)


# --- the oracle matrix ---------------------------------------------------------------------------

def test_output_loads_with_no_missing_or_unexpected_keys(case):
    """(a) transformers loads OUT as a plain model: every weight present, nothing extra, shapes right."""
    model, info = case.loaded
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert model.config.vocab_size == case.vocab


def test_logits_match_unmerged_peft(case):
    """(b) OUT computes what base + adapter computes in PEFT, and the adapter visibly matters."""
    want, got, base = case.peft_logits, case.out_logits, case.base_logits
    scale = want.abs().max().item()
    err = (got - want).abs().max().item()
    base_err = (base - want).abs().max().item()
    tol = LOGIT_RTOL[case.dtype] * scale
    assert err <= tol, f"max |OUT - PEFT| = {err:.3g} > {tol:.3g} (logit scale {scale:.3g})"
    assert base_err > 2 * tol, f"the adapter barely moves the logits ({base_err:.3g}): the test proves nothing"
    assert base_err > EFFECT_RATIO * err, f"OUT is not much closer to PEFT ({err:.3g}) than the base is ({base_err:.3g})"


def test_merged_tensors_at_least_as_accurate_as_peft_merge(case):
    """(c) Per merged tensor, lorafuse's max error against the float64 merge is no larger than that of
    PEFT's merge_and_unload in the same dtype, and within half an ulp of the output dtype."""
    failures = []
    for t in case.plan.merged:
        if case.base_tied and (t.name == "lm_head.weight" or (t.name == case.embedding and case.head_adapted)):
            continue  # PEFT merges in place into the weight its tied head and embedding share: not a reference
        exact = case.exact[t.name]
        mine = case.out_tensors[t.name].double()
        peft = case.peft_merged[t.name].double()
        assert mine.shape == exact.shape == peft.shape, t.name
        size = exact.abs().max().item()
        err, peft_err = (mine - exact).abs().max().item(), (peft - exact).abs().max().item()
        if err > peft_err + TENSOR_SLACK * size or err > (HALF_ULP[case.dtype] + TENSOR_SLACK) * size:
            failures.append(f"{t.name} ({'+'.join(p.label for p in t.patches)}): lorafuse {err:.3g}, "
                            f"PEFT {peft_err:.3g}, max|W| {size:.3g}")
    assert not failures, "\n".join(failures)


def test_verify_recomputes_every_merged_tensor(case):
    """`lorafuse verify --base --adapter`, whose float64 recomputation shares no arithmetic with the merge,
    agrees with every tensor of an output (a)-(c) hold for: its formulas are PEFT's for each variant."""
    from lorafuse.tools.verify import verify

    assert verify(case.out, case.base, case.adapter, sample=len(case.plan.merged)) == []


def test_output_files_hold_the_planned_tensors(case):
    """The reference reader finds exactly the planned tensors; untouched ones are byte-identical to the
    base's, whole replacements equal the adapter's tensor; the report counts add up."""
    shards = {s.filename: s for s in case.plan.shards}
    assert sorted(p.name for p in case.out.glob("*.safetensors")) == sorted(shards)
    from safetensors import safe_open

    adapter = case.adapter_tensors
    for filename, shard in shards.items():
        with safe_open(case.out / filename, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            assert set(f.keys()) == {t.name for t in shard.tensors}
            for t in shard.tensors:
                value = f.get_tensor(t.name)
                assert value.dtype == TORCH_DTYPES[FILE_DTYPES[t.dtype]], t.name
                assert tuple(value.shape) == t.shape, t.name
                if not t.patches:
                    original = case.base_tensors.get(t.name)
                    if original is None:  # an untied head with nothing of its own: the embedding's copy
                        original = case.base_tensors[case.embedding]
                    assert same_bytes(value, original), f"{t.name} is not byte-identical to the base"
                elif all(p.label == "replace" for p in t.patches):
                    want = adapter[t.patches[-1].origin].to(value.dtype)
                    assert torch.equal(value, want), f"{t.name} differs from the adapter's {t.patches[-1].origin}"
                else:
                    assert torch.isfinite(value).all(), t.name
    r = case.report
    assert r.tensors_merged == len(case.plan.merged)
    assert r.tensors_merged + r.tensors_cast + r.tensors_copied == len(case.plan.tensors)
    assert r.bytes_written == case.plan.total_size


def test_tied_head_follows_peft(case):
    """(d) A tied base stays tied (no lm_head tensor) when PEFT's head equals its embedding, and gets
    its own lm_head with tie_word_embeddings=false when the adapter makes them differ."""
    config = read_config(case.out)
    tied = bool(config.get("tie_word_embeddings"))
    if case.base_tied:
        assert case.variant.tied_after is not None, "say in VARIANTS what the oracle requires"
        if case.variant.tied_after != "either":
            assert tied == case.variant.tied_after
    else:
        assert not tied
    assert ("lm_head.weight" in case.out_tensors) == (not tied)
    assert config["vocab_size"] == case.vocab


def test_plan_counts_match_peft_layers(case):
    """plan.counts has one lora/dora patch per LoRA layer PEFT builds, one lora_bias per lora_B bias."""
    from peft.tuners.lora import LoraLayer

    model = load_peft(case.base, case.adapter, torch.float32, case.variant.vocab)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.scaling]
    dora = sum(bool(m.use_dora.get("default")) for m in layers)
    bias = sum(bool(m.lora_bias.get("default")) for m in layers)
    assert case.plan.counts.get("dora", 0) == dora
    assert case.plan.counts.get("lora", 0) == len(layers) - dora
    assert case.plan.counts.get("lora_bias", 0) == bias


def test_a_model_with_its_own_code_keeps_the_saved_fan_in_fan_out(tiny_base, artefacts, tmp_path):
    """lorafuse cannot know the layer types of a model with its own code (auto_map): non-square weights
    go by their shapes, square ones by the saved fan_in_fan_out (here GPT-2's Conv1D layers, under a
    model_type transformers does not have)."""
    from lorafuse.tools.verify import verify

    base, adapter, out = tmp_path / "base", get_adapter(artefacts, tiny_base, VARIANT["fanin-gpt2"]), tmp_path / "out"
    shutil.copytree(tiny_base("gpt2"), base)
    config = {**read_config(base), "model_type": "my-gpt2", "auto_map": {"AutoModelForCausalLM": "modeling_my.MyGPT2"}}
    (base / "config.json").write_text(json.dumps(config))
    plan = lorafuse.plan(base, adapter)
    lorafuse.merge(base, adapter, out)
    exact, got = load_peft(tiny_base("gpt2"), adapter, torch.float64, merge=True).state_dict(), read_tensors(out)
    assert any(len(set(t.shape)) == 1 for t in plan.merged)  # a square c_proj
    for t in plan.merged:
        size = exact[t.name].abs().max().item()
        assert (got[t.name].double() - exact[t.name]).abs().max().item() <= (HALF_ULP["fp32"] + TENSOR_SLACK) * size, t.name
    assert verify(out, base, adapter, sample=len(plan.merged)) == []


# --- output dtype, sharding, sharded input -------------------------------------------------------

@pytest.mark.parametrize("base_dtype,out_dtype", [("bf16", "fp32"), ("bf16", "fp16"), ("fp32", "fp16"), ("fp32", "bf16")])
def test_output_dtype_cast(base_dtype, out_dtype, tiny_base, artefacts, tmp_path):
    """dtype= casts every float tensor once, updates config.json's dtype, and the model still matches PEFT."""
    v = VARIANT["lora-llama"]
    base, adapter, out = tiny_base(v.model, base_dtype), get_adapter(artefacts, tiny_base, v), tmp_path / "out"
    plan = lorafuse.plan(base, adapter, out, dtype=out_dtype)
    report = lorafuse.merge(base, adapter, out, dtype=out_dtype)
    want_dtype = TORCH_DTYPES[out_dtype]
    assert read_config(out)["dtype"] == str(want_dtype).removeprefix("torch.")
    tensors, base_tensors = read_tensors(out), read_tensors(base)
    assert all(t.dtype == want_dtype for t in tensors.values())
    for t in plan.tensors:
        if not t.patches:
            assert same_bytes(tensors[t.name], base_tensors[t.name].to(want_dtype)), t.name
    assert report.tensors_cast == sum(1 for t in plan.tensors if not t.patches)
    model, info = load_model(out, torch.float32, info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ids = input_ids(128)
    want = logits(load_peft(base, adapter, torch.float32), ids)
    err = (logits(model, ids) - want).abs().max().item()
    # a bf16 base written as fp32 is exact up to fp32 rounding: the fp32 tolerance applies
    tol = LOGIT_RTOL[out_dtype] * want.abs().max().item()
    assert err <= tol, f"{err:.3g} > {tol:.3g}"


SHARD = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def test_small_max_shard_size_writes_loadable_shards(tiny_base, artefacts, tmp_path):
    """max_shard_size splits the output into model-0000N-of-0000M files with a correct index, and the
    tensors are exactly those of the single-file merge."""
    v = VARIANT["lora-llama"]
    base, adapter = tiny_base(v.model), get_adapter(artefacts, tiny_base, v)
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    lorafuse.merge(base, adapter, single)
    report = lorafuse.merge(base, adapter, sharded, max_shard_size="20KB")
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(files) == report.shards > 2
    numbers = [SHARD.fullmatch(f) for f in files]
    assert all(numbers), files
    assert [int(m[1]) for m in numbers] == list(range(1, len(files) + 1))
    assert {int(m[2]) for m in numbers} == {len(files)}
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    tensors = read_tensors(sharded)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    from safetensors import safe_open

    for name, filename in index["weight_map"].items():
        with safe_open(sharded / filename, "pt") as f:
            assert name in f.keys()
    assert set(index["weight_map"]) == set(tensors)
    for f in files:  # each shard within the limit unless it holds a single larger tensor
        in_file = [n for n, fn in index["weight_map"].items() if fn == f]
        size = sum(tensors[n].numel() * tensors[n].element_size() for n in in_file)
        assert size <= 20_000 or len(in_file) == 1, (f, size)
    reference = read_tensors(single)
    assert set(reference) == set(tensors)
    assert all(same_bytes(tensors[n], reference[n]) for n in reference)
    model, info = load_model(sharded, info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    ids = input_ids(128)
    assert torch.equal(logits(model, ids), logits(load_model(single), ids))


def test_sharded_base_gives_the_same_output(tiny_base, artefacts, tmp_path):
    """A base saved by transformers in several shards (with an index) merges to the same tensors."""
    v = VARIANT["lora-llama"]
    adapter = get_adapter(artefacts, tiny_base, v)
    sharded_base = tiny_base(v.model, "fp32", max_shard_size="20KB")
    assert (sharded_base / "model.safetensors.index.json").is_file()
    lorafuse.merge(tiny_base(v.model), adapter, tmp_path / "a")
    lorafuse.merge(sharded_base, adapter, tmp_path / "b")
    a, b = read_tensors(tmp_path / "a"), read_tensors(tmp_path / "b")
    assert set(a) == set(b) and all(same_bytes(a[n], b[n]) for n in a)


# --- refusals ------------------------------------------------------------------------------------

def _peft_adapter(base: Path, folder: Path, config) -> Path:
    return make_adapter(base, folder, config)


def refuse_other_base(tiny_base, artefacts, tmp):
    """An adapter trained on a model with another hidden size."""
    from peft import LoraConfig

    adapter = artefacts.get("adapter-wide", lambda d: _peft_adapter(tiny_base("llama_wide"), d, LoraConfig(**lora(target_modules=["q_proj"]))))
    return tiny_base("llama"), adapter, {}, "different base model"


def refuse_other_architecture(tiny_base, artefacts, tmp):
    """A GPT-2 adapter on a Llama: its keys name modules the base does not have."""
    return tiny_base("llama"), get_adapter(artefacts, tiny_base, VARIANT["fanin-gpt2"]), {}, "match nothing"


def refuse_ia3(tiny_base, artefacts, tmp):
    from peft import IA3Config

    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    return tiny_base("llama"), _peft_adapter(tiny_base("llama"), tmp / "ia3", config), {}, "peft_type is 'IA3'"


def refuse_loha(tiny_base, artefacts, tmp):
    from peft import LoHaConfig

    config = LoHaConfig(target_modules=["q_proj"], init_weights=False)
    return tiny_base("llama"), _peft_adapter(tiny_base("llama"), tmp / "loha", config), {}, "peft_type is 'LOHA'"


def refuse_layer_replication(tiny_base, artefacts, tmp):
    from peft import LoraConfig

    config = LoraConfig(**lora(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]))
    return tiny_base("llama"), _peft_adapter(tiny_base("llama"), tmp / "rep", config), {}, "layer_replication"


def refuse_pissa(tiny_base, artefacts, tmp):
    """A real PiSSA adapter (PEFT ran the SVD): it only merges into the PiSSA-modified base."""
    from peft import LoraConfig

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    return tiny_base("llama"), _peft_adapter(tiny_base("llama"), tmp / "pissa", config), {}, "pissa"


def refuse_rank_mismatch(tiny_base, artefacts, tmp):
    """adapter_config.json says r=5 but the saved tensors have rank 8."""
    adapter = tmp / "edited"
    shutil.copytree(get_adapter(artefacts, tiny_base, VARIANT["lora-llama"]), adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["r"] = 5
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return tiny_base("llama"), adapter, {}, "disagrees with r=5"


def refuse_swapped_modules(tiny_base, artefacts, tmp):
    """up_proj's and down_proj's tensors under each other's names: each delta fits its weight only
    transposed, and PEFT refuses to load them into nn.Linear layers."""
    from safetensors.torch import load_file, save_file

    adapter = tmp / "swapped"
    shutil.copytree(get_adapter(artefacts, tiny_base, VARIANT["lora-llama"]), adapter)
    tensors = load_file(adapter / "adapter_model.safetensors")
    swap = {"up_proj": "down_proj", "down_proj": "up_proj"}
    renamed = {re.sub(r"(up|down)_proj", lambda m: swap[m[0]], k): v for k, v in tensors.items()}
    save_file(renamed, adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    return tiny_base("llama"), adapter, {}, "make a delta of shape"


def refuse_existing_out(tiny_base, artefacts, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return tiny_base("llama"), get_adapter(artefacts, tiny_base, VARIANT["lora-llama"]), {}, "holds keep.txt"


def refuse_out_inside_base(tiny_base, artefacts, tmp):
    base = tmp / "base"
    shutil.copytree(tiny_base("llama"), base)
    return base, get_adapter(artefacts, tiny_base, VARIANT["lora-llama"]), {"out": base / "merged"}, "overlaps the base model"


def _huge_base(tmp: Path, name: str) -> Path:
    """A llama whose one weight holds 1e5: representable in fp32 and bf16, not in fp16 (max 65504)."""
    model = build_model("llama")
    with torch.no_grad():
        model.get_parameter(name)[0, 0] = 1e5
    return save_model(model, tmp / "huge")


def refuse_fp16_overflow_merged(tiny_base, artefacts, tmp):
    base = _huge_base(tmp, "model.layers.0.self_attn.q_proj.weight")
    return base, get_adapter(artefacts, tiny_base, VARIANT["lora-llama"]), {"dtype": "fp16"}, "overflows F16"


def refuse_fp16_overflow_cast(tiny_base, artefacts, tmp):
    base = _huge_base(tmp, "lm_head.weight")  # untouched by the adapter: overflow while only casting
    return base, get_adapter(artefacts, tiny_base, VARIANT["lora-llama"]), {"dtype": "fp16"}, "overflows F16"


REFUSALS = [refuse_other_base, refuse_other_architecture, refuse_ia3, refuse_loha, refuse_layer_replication,
            refuse_pissa, refuse_rank_mismatch, refuse_swapped_modules, refuse_existing_out, refuse_out_inside_base,
            refuse_fp16_overflow_merged, refuse_fp16_overflow_cast]


@pytest.mark.parametrize("scenario", REFUSALS, ids=[f.__name__.removeprefix("refuse_") for f in REFUSALS])
def test_refusals_leave_no_trace(scenario, tiny_base, artefacts, tmp_path):
    """Each bad input raises LorafuseError with a one-line message naming the problem; OUT is as it
    was (absent, or the user's folder untouched), no staging folder remains, inputs are unchanged."""
    base, adapter, kwargs, match = scenario(tiny_base, artefacts, tmp_path)
    out = kwargs.pop("out", tmp_path / "out")
    inputs_before = {p: tree_hash(p) for p in (base, adapter)}
    out_before = tree_hash(out) if out.exists() else None
    with pytest.raises(lorafuse.LorafuseError, match=match) as info:
        lorafuse.merge(base, adapter, out, **kwargs)
    assert "\n" not in str(info.value)
    assert {p: tree_hash(p) for p in (base, adapter)} == inputs_before
    if out_before is None:
        assert not out.exists()
    else:
        assert tree_hash(out) == out_before
    assert leftovers(out.parent) == []


# The adapter's config and its weights disagree (a hand-edited config, another tool's file, a truncated
# save): (variant, config entries written over the saved ones, what the refusal says).
DISAGREEMENTS = {
    "target_list": ("lora-llama", {"target_modules": ["q_proj"]}, "target_modules does not name it"),
    "target_regex": ("lora-llama", {"target_modules": r".*\.q_proj"}, "target_modules does not match it"),
    "exclude_list": ("lora-llama", {"exclude_modules": ["q_proj"]}, "exclude_modules names it"),
    "exclude_regex": ("lora-llama", {"exclude_modules": r".*\.0\.self_attn\..*"}, "exclude_modules matches it"),
    "layers": ("patterns-llama", {"layers_to_transform": [0]}, "layers_to_transform leaves out its layer"),
    "layers_pattern": ("patterns-llama", {"layers_to_transform": [0], "layers_pattern": "layers"},
                       "layers_to_transform leaves out its layer"),
    "modules_to_save": ("patterns-llama", {"modules_to_save": ["down_proj"]}, "it is in modules_to_save"),
    "all_linear_head": ("head-llama", {"target_modules": "all-linear"}, "lm_head has LoRA tensors but target_modules is all-linear, which leaves out the output head"),
    "all_linear_embedding": ("embed-llama", {"target_modules": "all-linear"}, "embed_tokens has LoRA tensors but target_modules is all-linear, and it is no linear layer"),
    "dora_without_magnitudes": ("lora-llama", {"use_dora": True}, "use_dora is true, and it has no lora_magnitude_vector"),
    "magnitudes_without_dora": ("dora-llama", {"use_dora": False}, "it has a DoRA lora_magnitude_vector, and use_dora is false"),
    "bias_without_lora_bias": ("lora_bias-qwen2", {"lora_bias": False}, "it has a lora_B.bias, and lora_bias is false"),
}


@pytest.mark.parametrize("name", DISAGREEMENTS)
def test_config_and_weights_that_disagree_are_refused(name, tiny_base, artefacts, tmp_path):
    """PEFT builds its layers from the config and loads the file into them: tensors of modules it does
    not adapt are dropped, use_dora decides the variant. So PEFT's merge of the edited adapter differs
    from that of the adapter as saved, which is what merging every tensor gave; lorafuse refuses, by
    module, in one line, and plans nothing (verify plans the same way)."""
    variant, entries, message = DISAGREEMENTS[name]
    v = VARIANT[variant]
    base, adapter = tiny_base(v.model), tmp_path / "edited"
    shutil.copytree(get_adapter(artefacts, tiny_base, v), adapter)
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **entries}))
    as_saved = load_peft(base, get_adapter(artefacts, tiny_base, v), torch.float64, merge=True).state_dict()
    try:
        edited = load_peft(base, adapter, torch.float64, merge=True).state_dict()
    except KeyError:  # PEFT wraps a modules_to_save module and finds no saved copy of it in the file
        assert name == "modules_to_save"
    else:
        assert any(not torch.allclose(edited[k], as_saved[k], rtol=1e-6, atol=0) for k in as_saved), "PEFT ignores the edit"
    with pytest.raises(lorafuse.LorafuseError, match=re.escape(message)) as info:
        lorafuse.merge(base, adapter, tmp_path / "out")
    assert "\n" not in str(info.value) and "config and weights disagree" in str(info.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("init", [False, True, "gaussian"])
def test_a_targeted_module_missing_from_the_file(init, tiny_base, artefacts, tmp_path):
    """A truncated save: v_proj is targeted but its tensors are gone. PEFT initialises its LoRA: with
    init_lora_weights true or "gaussian" B is zero, the weight stays the base's and lorafuse's merge is
    PEFT's; with init_lora_weights false A and B are random and PEFT's model changes the weight: refused."""
    from peft import LoraConfig
    from safetensors.torch import load_file, save_file

    base = tiny_base("llama")
    adapter = make_adapter(base, tmp_path / "adapter", LoraConfig(r=4, lora_alpha=8, init_lora_weights=init,
                                                                  target_modules=["q_proj", "v_proj"]))
    if init is not False:  # A and B at their initial values would make every delta zero: train them
        save_file({k: torch.randn_like(v) for k, v in load_file(adapter / "adapter_model.safetensors").items()},
                  adapter / "adapter_model.safetensors", metadata={"format": "pt"})
    tensors = load_file(adapter / "adapter_model.safetensors")
    save_file({k: v for k, v in tensors.items() if "v_proj" not in k}, adapter / "adapter_model.safetensors",
              metadata={"format": "pt"})
    exact, before = load_peft(base, adapter, torch.float64, merge=True).state_dict(), read_tensors(base)
    name = "model.layers.0.self_attn.v_proj.weight"
    if init is False:
        assert not torch.equal(exact[name], before[name].double())
        with pytest.raises(lorafuse.LorafuseError, match="PEFT adapts model.layers.0.self_attn.v_proj .and 1 more"):
            lorafuse.merge(base, adapter, tmp_path / "out")
        return
    lorafuse.merge(base, adapter, tmp_path / "out")
    got = read_tensors(tmp_path / "out")
    assert same_bytes(got[name], before[name]) and torch.equal(exact[name], before[name].double())
    for key, value in got.items():
        size = exact[key].abs().max().item()
        assert (value.double() - exact[key]).abs().max().item() <= (HALF_ULP["fp32"] + TENSOR_SLACK) * size, key


@pytest.mark.parametrize("variant", [v.id for v in TARGETING_VARIANTS])
def test_verify_passes_adapters_that_target_some_modules(variant, tiny_base, artefacts, tmp_path):
    """`verify --base --adapter` plans with the same matching and finds nothing wrong with every tensor."""
    from lorafuse.tools.verify import verify

    v = VARIANT[variant]
    base, adapter, out = tiny_base(v.model), get_adapter(artefacts, tiny_base, v), tmp_path / "out"
    plan = lorafuse.plan(base, adapter)
    lorafuse.merge(base, adapter, out)
    assert verify(out, base, adapter, sample=len(plan.tensors)) == []


def test_force_replaces_an_existing_output(tiny_base, artefacts, tmp_path):
    """force=True swaps the finished merge in for the old folder, leaving no backup or staging folder."""
    v = VARIANT["lora-llama"]
    out = tmp_path / "out"
    lorafuse.merge(tiny_base(v.model), get_adapter(artefacts, tiny_base, v), out)
    assert (out / "model.safetensors").is_file()
    lorafuse.merge(tiny_base(v.model), get_adapter(artefacts, tiny_base, v), out, force=True, max_shard_size="50KB")
    assert not (out / "model.safetensors").exists()  # the old folder's single file: gone with it
    assert (out / "model.safetensors.index.json").is_file() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == []
