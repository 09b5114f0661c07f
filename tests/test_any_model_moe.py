"""lorafuse on mixture-of-experts models (and T5's tied embeddings), against PEFT and transformers.

transformers 5 keeps MoE experts fused in memory (Mixtral, Qwen3-MoE, DeepSeek-V3: `mlp.experts.gate_up_proj`
(E, 2I, H) and `mlp.experts.down_proj` (E, H, I)) but writes them per expert (Mixtral
`block_sparse_moe.experts.N.w1/w2/w3.weight`, the others `mlp.experts.N.gate_proj/up_proj/down_proj.weight`);
gpt-oss keeps them fused on disk too (`mlp.experts.gate_up_proj` (E, H, 2I)). PEFT 0.21 puts LoRA on the fused
parameters with `target_parameters` (its ParamWrapper: lora_A (E·r, in), lora_B (out, E·r)). Every model here is
saved by transformers' own save_pretrained and every adapter by PEFT's, and for each merge we check that

  (a) OUT has the base's tensors, names and shapes as on disk (per expert where the base is), and
      transformers loads it with no missing or unexpected keys;
  (b) its logits match the unmerged PeftModel's;
  (c) per tensor, against PEFT's own merge_and_unload written by save_pretrained: the same keys, every
      tensor PEFT's float64 merge changes at least as close to it as PEFT's merge in the file dtype, every
      other tensor byte-identical to the base's;
  (d) every expert's targeted tensors changed (no expert silently left unmerged), the others did not.

Then an FP8 block-scaled DeepSeek-V3 base (per-expert FP8 weights), adapters PEFT wrote for per-expert
modules with transformers 4 (which PEFT 0.21 converts when it loads them), the planned memory of an MoE
merge, and T5, whose encoder and decoder embeddings are one stored tensor.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
import torch

import lorafuse
from conftest import (check_logits, leftovers, load_model, load_peft, logits, make_adapter, quiet, read_adapter, read_config,
                      read_tensors, record_work, same_bytes, save_model, tree_hash)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tolerances as in test_merge_vs_peft.py / test_quantized_bases.py (see the reasoning there): logits within
# LOGIT_RTOL of the logit scale; the adapter must move the logits by more than twice that and OUT must be
# >= 10x closer to PEFT than the base is; per tensor, within half an ulp of the file dtype and no further from
# the float64 merge than PEFT's own merge, up to TENSOR_SLACK·max|W| of fp32 summation-order noise.
LOGIT_RTOL = {"fp32": 1e-5, "bf16": 16 * 2.0**-8}
TENSOR_SLACK = 2e-7
HALF_ULP = {"fp32": 2.0**-24, "bf16": 2.0**-8}
FILE_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}
FP32_NOISE = 2.0**-20  # lorafuse's fp32 sum before its one rounding to bf16 (see test_quantized_bases)

VOCAB = 128
# Non-square everywhere it matters (I != H), so that an expert's delta written transposed cannot pass.
MOE_CONFIGS = {
    "mixtral": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False),
    "qwen3_moe": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                      num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], tie_word_embeddings=False),
    "gpt_oss": dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=8, num_local_experts=4, num_experts_per_tok=2, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False),
    # Every dimension a multiple of the FP8 block (16 rows x 32 columns; rectangular, so swapped block sides
    # cannot pass): transformers' Fp8Dequantize, the oracle, only takes divisible shapes. Layer 0 is dense.
    "deepseek_v3": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
                        n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1,
                        q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=32, qk_nope_head_dim=16, v_head_dim=16,
                        tie_word_embeddings=False),
    # The memory case: 8 experts whose tensors are the model's largest, so that "a few expert tensors" is
    # far below both one fused (E, 2I, H) tensor and the whole model.
    "mixtral_wide": dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2,
                         tie_word_embeddings=False),
}
CONFIG_CLASSES = {"mixtral": "MixtralConfig", "qwen3_moe": "Qwen3MoeConfig", "gpt_oss": "GptOssConfig",
                  "deepseek_v3": "DeepseekV3Config", "mixtral_wide": "MixtralConfig"}
NUM_EXPERTS = {"mixtral": 4, "qwen3_moe": 4, "gpt_oss": 4, "deepseek_v3": 4, "mixtral_wide": 8}
BOTH = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

# The per-expert tensors of each layout, and which fused parameter each comes from (what target_parameters names).
PER_EXPERT = {
    "mixtral": re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight"),
    "qwen3": re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight"),
}
FROM_PARAMETER = {"w1": "gate_up_proj", "w3": "gate_up_proj", "w2": "down_proj",
                  "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}
FUSED_ON_DISK = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")


def input_ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))


def build_moe(kind: str, seed: int = 0):
    """A freshly initialised fp32 MoE model; 1-d parameters randomised as conftest.build_model does."""
    import transformers as tf

    quiet()
    torch.manual_seed(seed)
    config = getattr(tf, CONFIG_CLASSES[kind])(**MOE_CONFIGS[kind])
    model = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def moe_base(artefacts, kind: str, dtype: str = "fp32") -> Path:
    return artefacts.get(("moe", kind, dtype), lambda d: save_model(build_moe(kind), d, dtype))


def lora(**kwargs) -> dict:
    return {"r": 4, "lora_alpha": 8, "init_lora_weights": False, **kwargs}


def expert_pieces(tensors: dict[str, torch.Tensor]) -> dict[tuple, torch.Tensor]:
    """(layer, expert, disk name, fused parameter) -> that expert's tensor, per expert on disk or a slice of a
    tensor fused on disk (gpt-oss)."""
    pieces = {}
    for name, t in tensors.items():
        for pattern in PER_EXPERT.values():
            m = pattern.fullmatch(name)
            if m:
                pieces[(int(m[1]), int(m[2]), name, FROM_PARAMETER[m[3]])] = t
        m = FUSED_ON_DISK.fullmatch(name)
        if m:
            for e in range(t.shape[0]):
                pieces[(int(m[1]), e, name, m[2])] = t[e]
    return pieces


def saved_merge(model, folder: Path) -> dict[str, torch.Tensor]:
    """A merged model written by transformers' save_pretrained (so in the disk layout), read back."""
    model.save_pretrained(folder)
    return read_tensors(folder)


def check_every_expert(out: dict, base: dict, targeted: set[str]) -> int:
    """Each expert's tensor changed iff its fused parameter is in target_parameters; returns how many changed."""
    mine, before = expert_pieces(out), expert_pieces(base)
    assert mine.keys() == before.keys() and before, sorted(before)[:4]
    unchanged = [k[2] + f"[{k[1]}]" for k, t in mine.items() if k[3] in targeted and torch.equal(t, before[k])]
    changed = [k[2] + f"[{k[1]}]" for k, t in mine.items() if k[3] not in targeted and not same_bytes(t, before[k])]
    assert not unchanged, f"{len(unchanged)} targeted expert tensors were left as in the base: {unchanged[:6]}"
    assert not changed, f"untargeted expert tensors changed: {changed[:6]}"
    return sum(k[3] in targeted for k in mine)


def check_against_peft_merge(out: dict, base: dict, exact: dict, peft: dict, dtype: str) -> int:
    """(c): same keys as PEFT's saved merge; tensors PEFT's float64 merge changes are at least as close to it as
    PEFT's merge in the file dtype (and within half an ulp); the rest byte-identical. Returns the changed count."""
    assert out.keys() == exact.keys() == peft.keys()
    failures, changed = [], 0
    for name, got in out.items():
        truth = exact[name]
        if torch.equal(truth, base[name].double()):
            if not same_bytes(got, base[name]):
                failures.append(f"{name}: untouched by PEFT but not byte-identical to the base")
            continue
        changed += 1
        assert got.shape == truth.shape == peft[name].shape, name
        size = truth.abs().max().item()
        err, peft_err = (got.double() - truth).abs().max().item(), (peft[name].double() - truth).abs().max().item()
        if err > peft_err + TENSOR_SLACK * size or err > (HALF_ULP[dtype] + TENSOR_SLACK) * size:
            failures.append(f"{name}: lorafuse {err:.3g}, PEFT {peft_err:.3g}, max|W| {size:.3g}")
    assert not failures, "\n".join(failures)
    return changed


# --- 1, 2: target_parameters on Mixtral, Qwen3-MoE, gpt-oss ---------------------------------------------

@dataclass(frozen=True)
class Variant:
    id: str
    model: str
    config: dict  # LoraConfig kwargs
    dtype: str = "fp32"


VARIANTS = [
    Variant("mixtral-experts-attn", "mixtral", lora(target_parameters=BOTH, target_modules=["q_proj", "v_proj"])),
    Variant("qwen3_moe-experts-attn", "qwen3_moe", lora(target_parameters=BOTH, target_modules=["q_proj", "v_proj"])),
    # one ParamWrapper, no nesting: its keys are ...mlp.experts.lora_A.weight
    Variant("qwen3_moe-down-only", "qwen3_moe", lora(target_parameters=["mlp.experts.down_proj"])),
    Variant("mixtral-down-only", "mixtral", lora(target_parameters=["mlp.experts.down_proj"])),
    Variant("mixtral-rslora", "mixtral", lora(r=8, lora_alpha=3, use_rslora=True, target_parameters=BOTH,
                                              target_modules=["q_proj", "o_proj"])),
    # experts fused on disk, (E, H, 2I), with biases; a bf16 base
    Variant("gpt_oss-experts-q", "gpt_oss", lora(target_parameters=BOTH, target_modules=["q_proj"]), dtype="bf16"),
]


def get_adapter(artefacts, v: Variant) -> Path:
    """PEFT's adapter, made on the base as transformers reloads it from disk (fp32)."""
    from peft import LoraConfig

    return artefacts.get(("moe-adapter", v.id),
                         lambda d: make_adapter(moe_base(artefacts, v.model), d, LoraConfig(**v.config)))


@dataclass
class Case:
    variant: Variant
    base: Path
    adapter: Path
    out: Path
    work: Path

    @property
    def targeted(self) -> set[str]:
        return {p.rsplit(".", 1)[-1] for p in self.variant.config.get("target_parameters", [])}

    @cached_property
    def out_tensors(self):
        return read_tensors(self.out)

    @cached_property
    def base_tensors(self):
        return read_tensors(self.base)

    @cached_property
    def exact(self):
        """PEFT's merge_and_unload in float64, written by save_pretrained."""
        return saved_merge(load_peft(self.base, self.adapter, torch.float64, merge=True), self.work / "exact")

    @cached_property
    def peft_merged(self):
        """PEFT's merge_and_unload in the file dtype, written by save_pretrained."""
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[self.variant.dtype]
        return saved_merge(load_peft(self.base, self.adapter, dtype, merge=True), self.work / "peft")


def merged(base: Path, adapter: Path, out: Path) -> Path:
    try:
        lorafuse.merge(base, adapter, out)
    except lorafuse.LorafuseError as e:
        pytest.fail(f"lorafuse refuses an adapter PEFT saved and loads: {e}")
    return out


@pytest.fixture(scope="module", params=VARIANTS, ids=[v.id for v in VARIANTS])
def case(request, artefacts, tmp_path_factory) -> Case:
    v = request.param
    base, adapter = moe_base(artefacts, v.model, v.dtype), get_adapter(artefacts, v)
    work = tmp_path_factory.mktemp(f"moe-{v.id}")
    return Case(v, base, adapter, merged(base, adapter, work / "merged"), work)


def test_adapter_is_what_peft_writes_for_target_parameters(case):
    """Guard on the inputs: PEFT wrapped the fused expert parameters (ParamWrapper) and saved E·r-rank factors."""
    config = json.loads((case.adapter / "adapter_config.json").read_text())
    # PEFT keeps target_parameters as a set: the saved order changes with PYTHONHASHSEED (the nesting does not:
    # gate_up_proj's wrapper is always the inner one, ...experts.base_layer.lora_*)
    assert set(config["target_parameters"]) == set(case.variant.config["target_parameters"])
    keys = read_adapter(case.adapter)
    experts = NUM_EXPERTS[case.variant.model]
    r = case.variant.config["r"]
    factors = [k for k in keys if ".mlp.experts." in k]
    assert factors and all(keys[k].shape[0 if ".lora_A." in k else 1] == experts * r for k in factors), factors


def test_output_has_the_base_layout(case):
    """(a) The same tensor names, shapes and dtypes as the base on disk: per expert where transformers wrote
    them per expert, fused where it wrote them fused."""
    got, want = case.out_tensors, case.base_tensors
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys())[:5], sorted(want.keys() - got.keys())[:5])
    assert all(got[k].shape == want[k].shape and got[k].dtype == want[k].dtype for k in want)


def test_output_loads_with_no_missing_or_unexpected_keys(case):
    _, info = load_model(case.out, torch.float32, info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_logits_match_unmerged_peft(case):
    """(b) OUT computes what the base + adapter compute, unmerged, in PEFT (fp32)."""
    ids = input_ids()
    want = logits(load_peft(case.base, case.adapter, torch.float32), ids)
    check_logits(want, logits(load_model(case.out), ids), logits(load_model(case.base), ids),
                 LOGIT_RTOL[case.variant.dtype])


def test_tensors_at_least_as_accurate_as_peft_merge(case):
    """(c) Against PEFT's merge_and_unload, saved by save_pretrained in the disk layout."""
    changed = check_against_peft_merge(case.out_tensors, case.base_tensors, case.exact, case.peft_merged,
                                       case.variant.dtype)
    assert changed > 0


def test_every_expert_changes(case):
    """(d) Every expert of every layer had its targeted tensors changed (and only those)."""
    assert check_every_expert(case.out_tensors, case.base_tensors, case.targeted) > 0


# --- 3: DeepSeek-V3 with an FP8 block-scaled base -----------------------------------------------------------

FP8_BLOCK = (16, 32)
FP8_QCONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(FP8_BLOCK)}
FP8_LINEAR = re.compile(r".*(_proj|_proj_with_mqa)\.weight")  # attention, dense MLP, shared and routed experts
# Attention LoRA beside the experts' (q_a/kv_a/kv_b, the dense layer-0 MLP and the shared expert stay untouched
# FP8). Not the shared expert: PEFT 0.21's convert_peft_config_for_transformers turns any target_modules entry
# naming gate_proj/up_proj/down_proj ("shared_experts.up_proj" and regexes included) into target_parameters on the
# fused routed experts, so PEFT cannot put LoRA on DeepSeek-V3's shared expert or dense MLP by target_modules.
DSV3_LORA = lora(target_parameters=BOTH, target_modules=["q_b_proj", "o_proj"])


def dsv3_fp8(artefacts) -> tuple[Path, Path, Path]:
    """(bf16 model, FP8 checkpoint, adapter). Like test_quantized_bases.fp8_checkpoint: every projection weight of
    the bf16 model, the per-expert ones included, stored as float8_e4m3fn with a block weight_scale_inv;
    embeddings, norms, router and head stay bf16. The adapter is PEFT's, on the model transformers loads from the
    FP8 checkpoint (dequantized)."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from lorafuse.quant import quantize_fp8_block

    def build(folder: Path) -> Path:
        plain = moe_base(artefacts, "deepseek_v3", "bf16")
        tensors = {}
        for name, w in read_tensors(plain).items():
            if FP8_LINEAR.fullmatch(name):
                tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_block(w, FP8_BLOCK)
            else:
                tensors[name] = w
        (folder / "base").mkdir()
        save_file(tensors, folder / "base" / "model.safetensors", metadata={"format": "pt"})
        config = read_config(plain)
        config["quantization_config"] = FP8_QCONFIG
        (folder / "base" / "config.json").write_text(json.dumps(config, indent=2))
        make_adapter(folder / "base", folder / "adapter", LoraConfig(**DSV3_LORA), model=fp8_model(folder / "base"))
        return folder

    folder = artefacts.get("dsv3-fp8", build)
    return moe_base(artefacts, "deepseek_v3", "bf16"), folder / "base", folder / "adapter"


def fp8_model(folder: Path):
    """The FP8 checkpoint as transformers loads it on the CPU: FineGrainedFP8 with dequantize=True, in fp32."""
    import transformers as tf

    quiet()
    model = tf.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, quantization_config=tf.FineGrainedFP8Config(weight_block_size=FP8_BLOCK, dequantize=True))
    assert not any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    return model.eval()


@pytest.fixture(scope="module")
def dsv3(artefacts, tmp_path_factory):
    plain, base, adapter = dsv3_fp8(artefacts)
    work = tmp_path_factory.mktemp("dsv3")
    return plain, base, adapter, merged(base, adapter, work / "merged"), work


def test_dsv3_fp8_adapter_has_expert_and_attention_lora(dsv3):
    _, _, adapter, _, _ = dsv3
    keys = read_adapter(adapter)
    assert any(".mlp.experts.base_layer.lora_A." in k for k in keys) and any(".mlp.experts.lora_B." in k for k in keys)
    assert any(".self_attn.q_b_proj.lora_A." in k for k in keys)



def assert_plain_16bit(out: Path, plain: Path) -> None:
    """OUT holds the 16-bit model's tensors (names, shapes; all bf16), no quantization_config, and loads
    with no missing, unexpected or mismatched keys."""
    got, want = read_tensors(out), read_tensors(plain)
    assert got.keys() == want.keys(), (sorted(got.keys() - want.keys())[:5], sorted(want.keys() - got.keys())[:5])
    assert all(got[k].shape == want[k].shape and got[k].dtype == torch.bfloat16 for k in want)
    assert "quantization_config" not in read_config(out)
    _, info = load_model(out, torch.float32, info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info

def test_dsv3_fp8_output_is_a_plain_16bit_model(dsv3):
    """(a) The bf16 model's tensors, per expert, no scales; no quantization_config; transformers loads it."""
    plain, _, _, out, _ = dsv3
    assert_plain_16bit(out, plain)


def test_dsv3_fp8_logits_match_peft_on_the_dequantized_base(dsv3):
    """(b) The oracle: PEFT, unmerged, on the model transformers dequantizes from the FP8 checkpoint (fp32)."""
    from peft import PeftModel

    _, base, adapter, out, _ = dsv3
    ids = input_ids()
    want = logits(PeftModel.from_pretrained(fp8_model(base), adapter).eval(), ids)
    check_logits(want, logits(load_model(out), ids), logits(fp8_model(base), ids), LOGIT_RTOL["bf16"])


def test_dsv3_fp8_weights_are_the_dequantized_base_plus_delta_rounded_once(dsv3):
    """(c) Against PEFT's float64 merge on transformers' dequantization (saved in the disk layout by
    save_pretrained from the bf16 model's architecture): each tensor PEFT changes is that, rounded once to bf16;
    each untouched FP8 weight is transformers' dequantization rounded to bf16; other tensors are the base's bytes.
    (d) Every expert's tensors changed."""
    from peft import PeftModel

    plain, base, adapter, out, work = dsv3
    dequantized = fp8_model(base)
    model = load_model(plain, torch.float64)
    model.load_state_dict({k: v.double() for k, v in dequantized.state_dict().items()})
    exact = saved_merge(PeftModel.from_pretrained(model, adapter).merge_and_unload(), work / "exact")
    model = load_model(plain, torch.float64)
    model.load_state_dict({k: v.double() for k, v in dequantized.state_dict().items()})
    dequant = saved_merge(model, work / "dequantized")  # the base as transformers decodes it, in the disk layout
    stored = read_tensors(base)
    got = read_tensors(out)
    assert got.keys() == exact.keys() == dequant.keys()
    changed = untouched = 0
    for name, value in got.items():
        truth = exact[name]
        if name not in stored or stored[name].dtype != torch.float8_e4m3fn:
            assert torch.equal(truth, dequant[name]), f"{name}: the adapter changes a plain tensor"
            assert same_bytes(value, stored[name]), f"{name} is not copied unchanged"
            continue
        if torch.equal(truth, dequant[name]):
            assert same_bytes(value, dequant[name].float().to(torch.bfloat16)), f"{name} is not the dequantized weight"
            untouched += 1
            continue
        _, e = torch.frexp(truth)
        half_ulp = torch.pow(2.0, (e - 9).double())  # bf16: 8 significant bits
        noise = FP32_NOISE * (dequant[name].abs() + (truth - dequant[name]).abs().max())
        err = (value.double() - truth).abs()
        assert not (err > half_ulp + noise).any(), f"{name}: not rounded once (worst {err.max().item():.3g})"
        changed += 1
    assert changed and untouched
    check_every_expert(got, read_tensors(plain), {"gate_up_proj", "down_proj"})


# --- 4: adapters PEFT wrote for per-expert modules (transformers 4) -----------------------------------------

def old_mixtral_tree(config: dict) -> torch.nn.Module:
    """Mixtral's experts as transformers 4 had them: model.layers.N.block_sparse_moe.experts.E.w1/w2/w3 Linear."""
    h, i = config["hidden_size"], config["intermediate_size"]
    root = torch.nn.Module()
    root.model = torch.nn.Module()
    root.model.layers = torch.nn.ModuleList()
    for _ in range(config["num_hidden_layers"]):
        layer = torch.nn.Module()
        layer.block_sparse_moe = torch.nn.Module()
        layer.block_sparse_moe.experts = torch.nn.ModuleList()
        for _ in range(config["num_local_experts"]):
            expert = torch.nn.Module()
            expert.w1, expert.w2, expert.w3 = (torch.nn.Linear(h, i, bias=False), torch.nn.Linear(i, h, bias=False),
                                               torch.nn.Linear(h, i, bias=False))
            layer.block_sparse_moe.experts.append(expert)
        root.model.layers.append(layer)
    return root


def old_adapter(artefacts) -> tuple[Path, Path]:
    from peft import LoraConfig

    base = moe_base(artefacts, "mixtral")

    def build(folder: Path) -> Path:
        torch.manual_seed(3)
        tree = old_mixtral_tree(read_config(base))
        make_adapter(base, folder, LoraConfig(**lora(target_modules=["w1", "w2", "w3"])), model=tree, seed=4)
        path = folder / "adapter_config.json"
        config = json.loads(path.read_text())
        config.update(base_model_name_or_path=str(base), auto_mapping={
            "base_model_class": "MixtralForCausalLM", "parent_library": "transformers.models.mixtral.modeling_mixtral"})
        path.write_text(json.dumps(config, indent=2))
        return folder

    return base, artefacts.get("moe-old-adapter", build)


@pytest.fixture(scope="module")
def old(artefacts, tmp_path_factory):
    base, adapter = old_adapter(artefacts)
    work = tmp_path_factory.mktemp("moe-old")
    return base, adapter, merged(base, adapter, work / "merged"), work


def test_old_per_expert_adapter_keys(old):
    _, adapter, _, _ = old
    keys = read_adapter(adapter)
    assert "base_model.model.model.layers.0.block_sparse_moe.experts.3.w1.lora_A.weight" in keys
    assert not any(".mlp.experts." in k for k in keys)


def test_old_per_expert_adapter_matches_peft_conversion(old):
    """PEFT 0.21 converts the per-expert adapter onto transformers 5's fused experts when it loads it: OUT's
    logits match that PeftModel's, OUT loads cleanly, and every expert tensor changed."""
    from peft import PeftModel

    base, adapter, out, _ = old
    peft_model = PeftModel.from_pretrained(load_model(base), adapter).eval()
    assert peft_model.peft_config["default"].target_parameters, "PEFT did not convert the adapter"
    ids = input_ids()
    _, info = load_model(out, torch.float32, info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    check_logits(logits(peft_model, ids), logits(load_model(out), ids), logits(load_model(base), ids), LOGIT_RTOL["fp32"])
    assert check_every_expert(read_tensors(out), read_tensors(base), {"gate_up_proj", "down_proj"}) > 0


def test_old_per_expert_adapter_tensors(old):
    """Per tensor against PEFT's merge of its converted adapter, and against W + (alpha/r)·B@A per expert."""
    base, adapter, out, work = old
    before, got = read_tensors(base), read_tensors(out)
    exact = saved_merge(load_peft(base, adapter, torch.float64, merge=True), work / "exact")
    peft = saved_merge(load_peft(base, adapter, torch.float32, merge=True), work / "peft")
    assert check_against_peft_merge(got, before, exact, peft, "fp32") > 0
    factors = read_adapter(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    s = config["lora_alpha"] / config["r"]
    for name, w in before.items():
        a = factors.get("base_model.model." + name.removesuffix(".weight") + ".lora_A.weight")
        if a is None:
            continue
        b = factors["base_model.model." + name.removesuffix(".weight") + ".lora_B.weight"]
        want = w.double() + s * (b.double() @ a.double())
        assert torch.allclose(exact[name], want, rtol=0, atol=1e-12), f"PEFT's conversion disagrees on {name}"


# --- 5: the planned memory of an MoE merge ------------------------------------------------------------------

def test_moe_merge_memory_is_a_few_expert_tensors(artefacts, tmp_path, monkeypatch):
    """As test_quantized_bases.test_the_planned_memory_bounds_what_each_tensor_takes: the plan's peak memory (the
    largest `work_bytes` of the tensors in flight at once) is bounded by a few per-expert tensors, far below one
    fused (E, 2I, H) tensor and the whole model; and each tensor made in rows takes at most its planned
    `work_bytes` in buffers and fp32 adapter factors. Row blocks are made small (BLOCK_VALUES, as the existing
    test does) so that their fixed size does not hide the rest."""
    from peft import LoraConfig

    from lorafuse import costs

    base = moe_base(artefacts, "mixtral_wide")
    adapter = artefacts.get("moe-wide-adapter", lambda d: make_adapter(
        base, d, LoraConfig(**lora(r=8, target_parameters=BOTH, target_modules=["q_proj"]))))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(2)))  # 2 cores: 2 tensors in flight
    monkeypatch.setattr(costs, "BLOCK_VALUES", 256)
    stored = read_tensors(base)
    experts = expert_pieces(stored)
    expert_bytes = max(t.numel() * 4 for t in experts.values())  # one per-expert tensor, in fp32
    fused_bytes = 2 * NUM_EXPERTS["mixtral_wide"] * expert_bytes  # one (E, 2I, H) gate_up_proj
    total = sum(t.numel() * t.element_size() for t in stored.values())

    taken = record_work(monkeypatch)  # tensor -> what it took: buffer role or factor -> bytes
    try:
        lorafuse.merge(base, adapter, tmp_path / "out")
        plan = lorafuse.plan(base, adapter)
    except lorafuse.LorafuseError as e:
        pytest.fail(f"lorafuse refuses an adapter PEFT saved and loads: {e}")
    planned = {t.name: t.work_bytes for t in plan.tensors}
    peak = plan.peak_memory  # computed from work_bytes, under the same BLOCK_VALUES
    monkeypatch.undo()

    assert plan.depth == 2
    bound = plan.depth * 4 * expert_bytes
    assert bound < fused_bytes and bound < total / 4  # the bound means something
    assert peak <= bound, f"planned {peak} bytes, more than 4 expert tensors per tensor in flight"
    assert max(planned[k[2]] for k in experts) > expert_bytes  # the estimate does count the expert it reads
    made = [name for name in taken if name in planned and any(k[2] == name for k in experts)]
    assert made, "no per-expert tensor was made in rows"
    for name, mine in taken.items():
        assert sum(mine.values()) <= planned[name], f"{name} took {mine}, planned {planned[name]} bytes"
    assert check_every_expert(read_tensors(tmp_path / "out"), stored, {"gate_up_proj", "down_proj"}) > 0


# --- 6: T5, whose encoder and decoder embeddings are one stored tensor ---------------------------------------

def t5_base(artefacts) -> Path:
    def build(folder: Path) -> Path:
        import transformers as tf

        quiet()
        torch.manual_seed(0)
        config = tf.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                             num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model = tf.T5ForConditionalGeneration(config)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
        return save_model(model.eval(), folder)

    return artefacts.get("t5", build)


def load_t5(folder: Path, adapter: Path | None = None):
    from peft import PeftModel
    from transformers import AutoModelForSeq2SeqLM

    quiet()
    model = AutoModelForSeq2SeqLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


@torch.no_grad()
def t5_logits(model) -> torch.Tensor:
    ids = input_ids()
    return model(input_ids=ids, decoder_input_ids=ids.flip(-1)).logits.double()


def test_t5_different_embedding_loras_on_one_stored_tensor_are_refused(artefacts, tmp_path, capsys):
    """target_modules=["embed_tokens"]: PEFT gives encoder.embed_tokens and decoder.embed_tokens LoRAs of their own
    (different deltas), and both embeddings are the one stored tensor shared.weight. No single tensor gives what
    PEFT computes: the CLI exits 2 with one line naming shared.weight and saying it is tied/shared, and writes
    nothing."""
    from peft import LoraConfig

    from lorafuse.cli import main

    base = t5_base(artefacts)
    assert "shared.weight" in read_tensors(base) and not any("embed_tokens" in k for k in read_tensors(base))
    adapter = artefacts.get("t5-embed-adapter", lambda d: make_adapter(
        base, d, LoraConfig(**lora(target_modules=["embed_tokens"])), model=load_t5(base)))
    factors = read_adapter(adapter)
    deltas = [factors[f"base_model.model.{side}.embed_tokens.lora_embedding_B"]
              @ factors[f"base_model.model.{side}.embed_tokens.lora_embedding_A"] for side in ("encoder", "decoder")]
    assert not torch.allclose(deltas[0], deltas[1]), "the two deltas are equal: the refusal would not be needed"
    out = tmp_path / "out"
    before = tree_hash(adapter), tree_hash(base)
    code = main(["merge", str(base), str(adapter), str(out)])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("lorafuse: error: "), err
    assert "shared.weight" in lines[0] and re.search(r"tied|same|shared", lines[0].replace("shared.weight", "")), err
    assert not out.exists() and leftovers(tmp_path) == []
    assert (tree_hash(adapter), tree_hash(base)) == before


def test_t5_attention_lora_merges_exactly(artefacts, tmp_path):
    """The positive case: LoRA on T5's q and v merges, the output keeps the base's tensors (shared.weight only,
    tied), loads cleanly, and its encoder-decoder logits match unmerged PEFT's."""
    from peft import LoraConfig
    from transformers import AutoModelForSeq2SeqLM

    base = t5_base(artefacts)
    adapter = artefacts.get("t5-qv-adapter", lambda d: make_adapter(
        base, d, LoraConfig(**lora(target_modules=["q", "v"])), model=load_t5(base)))
    out = merged(base, adapter, tmp_path / "out")
    got, want = read_tensors(out), read_tensors(base)
    assert got.keys() == want.keys() and all(got[k].shape == want[k].shape for k in want)
    _, info = AutoModelForSeq2SeqLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    check_logits(t5_logits(load_t5(base, adapter)), t5_logits(load_t5(out)), t5_logits(load_t5(base)),
                 LOGIT_RTOL["fp32"])
    changed = [k for k in want if not torch.equal(got[k], want[k])]
    assert changed and all(re.search(r"\.(q|v)\.weight$", k) for k in changed), changed


# --- 7: a bitsandbytes 4-bit (NF4) MoE base with expert LoRA ------------------------------------------------
#
# As test_quantized_bases.bnb_checkpoint: transformers quantizes the bf16 model on the CPU and save_pretrained
# writes it; PEFT puts the adapter on the model transformers + bitsandbytes load (target_parameters included:
# PEFT 0.21 wraps the fused expert parameters of a bnb-loaded model as of a 16-bit one). What transformers writes:
# bitsandbytes replaces nn.Linear modules only, so q/k/v/o_proj are NF4 (packed uint8 `weight` with absmax,
# nested_absmax, quant_map, nested_quant_map and quant_state.bitsandbytes__nf4); the experts, 3-D nn.Parameters
# of the fused experts module, stay bf16 and are written per expert as the 16-bit model's are; the router,
# embeddings, norms and lm_head stay bf16 too. The oracle is PEFT, unmerged, on the model transformers +
# bitsandbytes load from the 4-bit checkpoint, with bitsandbytes computing in fp32 on exactly its dequantized
# weights (test_quantized_bases.bnb_model).

from test_quantized_bases import FP32_NOISE as Q_FP32_NOISE  # noqa: E402
from test_quantized_bases import assert_rounded_once, bnb_dequantized, bnb_model, needs_bnb, same_bits  # noqa: E402

# hidden_size a multiple of 64 (the attention weights' last dimension): bnb's AVX-512 dequantize kernel, the
# oracle, mis-indexes other last dims (test_quant_kernels.avx512_misindexes). The experts stay 16-bit, so they
# keep I != H (48 vs 64): an expert's delta written transposed cannot pass.
_Q4_ATTENTION = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
MOE_CONFIGS.update(qwen3_moe_q4=dict(MOE_CONFIGS["qwen3_moe"], **_Q4_ATTENTION),
                   mixtral_q4=dict(MOE_CONFIGS["mixtral"], intermediate_size=48, **_Q4_ATTENTION))
CONFIG_CLASSES.update(qwen3_moe_q4="Qwen3MoeConfig", mixtral_q4="MixtralConfig")
NUM_EXPERTS.update(qwen3_moe_q4=4, mixtral_q4=4)
Q4_KWARGS = dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4",
                 bnb_4bit_use_double_quant=True)
Q4_LORA = lora(target_modules=["q_proj", "v_proj"], target_parameters=BOTH)
ATTENTION = re.compile(r"model\.layers\.\d+\.self_attn\.(q|k|v|o)_proj\.weight")


def q4_moe(artefacts, kind: str) -> tuple[Path, Path, Path]:
    """(bf16 model, its NF4 checkpoint, PEFT's adapter made on the model transformers loads from the NF4 one)."""
    from peft import LoraConfig

    def build(folder: Path) -> Path:
        import transformers as tf

        quiet()
        model = tf.AutoModelForCausalLM.from_pretrained(
            moe_base(artefacts, kind, "bf16"), quantization_config=tf.BitsAndBytesConfig(**Q4_KWARGS),
            device_map="cpu", dtype=torch.bfloat16)
        model.save_pretrained(folder / "base")
        make_adapter(folder / "base", folder / "adapter", LoraConfig(**Q4_LORA), model=model)
        return folder

    folder = artefacts.get(("moe-nf4", kind), build)
    return moe_base(artefacts, kind, "bf16"), folder / "base", folder / "adapter"


@pytest.fixture(scope="module", params=["qwen3_moe_q4", "mixtral_q4"], ids=["qwen3_moe", "mixtral"])
def q4(request, artefacts, tmp_path_factory):
    plain, base, adapter = q4_moe(artefacts, request.param)
    work = tmp_path_factory.mktemp(f"moe-nf4-{request.param}")
    return plain, base, adapter, merged(base, adapter, work / "merged"), work


@needs_bnb
def test_nf4_moe_checkpoint_has_4bit_attention_and_16bit_per_expert_experts(q4):
    """Guard on the inputs: on disk the attention weights are NF4, every other tensor (the experts per expert
    included) is the bf16 model's, byte for byte; the adapter has LoRA on the fused experts and on q/v; the plan
    dequantizes the attention weights (bnb-nf4) and reads the experts as they are."""
    from lorafuse.quant import QuantizedTensor

    plain, base, adapter, _, _ = q4
    stored, sixteen = read_tensors(base), read_tensors(plain)
    assert read_config(base)["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
    quantized = {k for k in sixteen if ATTENTION.fullmatch(k)}
    assert quantized and all(stored[k].dtype == torch.uint8 for k in quantized)
    assert all(k + ".quant_state.bitsandbytes__nf4" in stored and k + ".absmax" in stored for k in quantized)
    assert all(same_bytes(stored[k], sixteen[k]) for k in sixteen.keys() - quantized)
    assert len(expert_pieces(stored)) == 2 * NUM_EXPERTS["qwen3_moe_q4"] * 3  # layers x experts x gate/up/down
    keys = read_adapter(adapter)
    assert any(".mlp.experts.base_layer.lora_A." in k for k in keys) and any(".mlp.experts.lora_B." in k for k in keys)
    assert any(".self_attn.q_proj.lora_A." in k for k in keys) and any(".self_attn.v_proj.lora_B." in k for k in keys)
    methods = {t.name: t.source.method for t in lorafuse.plan(base, adapter).tensors
               if isinstance(t.source, QuantizedTensor)}
    assert methods == dict.fromkeys(quantized, "bnb-nf4")


@needs_bnb
def test_nf4_moe_output_is_a_plain_16bit_model(q4):
    """(a) The bf16 model's tensors, names and shapes (experts per expert), all bf16, no bnb statistics; no
    quantization_config; transformers loads it with no missing or unexpected keys."""
    plain, _, _, out, _ = q4
    assert_plain_16bit(out, plain)


@needs_bnb
def test_nf4_moe_logits_match_peft_on_the_4bit_base(q4):
    """(b) OUT computes what the NF4 base + adapter compute, unmerged, in PEFT (bitsandbytes in fp32 on its
    exact dequantization), within the 16-bit tolerance test_quantized_bases allows for 4-bit bases."""
    _, base, adapter, out, _ = q4
    ids = input_ids()
    oracle, merged_model = bnb_model(base, adapter, exact=True), load_model(out)
    want, got = routed_logits(oracle, ids), routed_logits(merged_model, ids)
    same = same_routing(want[1], got[1])
    assert same.float().mean() >= 0.25, "the merged model routes most tokens unlike PEFT's: not a rounding effect"
    check_logits(want[0][same], got[0][same], logits(bnb_model(base, None, exact=True), ids)[same],
                 LOGIT_RTOL["bf16"])


def routed_logits(model, ids: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The logits and, per MoE layer, the experts each token was routed to (sorted, shaped (*ids.shape, k))."""
    chosen = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: chosen.append(out[2].sort(-1).values.reshape(*ids.shape, -1)))
             for m in model.modules() if type(m).__name__.endswith("TopKRouter")]
    try:
        return logits(model, ids), chosen
    finally:
        for hook in hooks:
            hook.remove()


def same_routing(want: list[torch.Tensor], got: list[torch.Tensor]) -> torch.Tensor:
    """The positions whose logits are comparable under a 16-bit tolerance: every earlier position of the
    sequence (attention mixes them in) and itself went to the same experts in every layer. A token near a
    routing tie can flip to another expert when the weights are rounded to 16 bits; that is the rounding's
    effect, not the merge's, and its logits differ by far more than the tolerance."""
    assert want and len(want) == len(got), "no MoE router seen: the test checks nothing"
    agree = torch.stack([(w == g).all(-1) for w, g in zip(want, got)]).all(0)
    return agree.int().cumprod(-1).bool()


@needs_bnb
def test_nf4_moe_weights_are_the_dequantized_base_plus_delta_rounded_once(q4):
    """(c) Against PEFT's float64 merge on the bf16 model with bitsandbytes' dequantization of the NF4 weights
    (saved in the disk layout by save_pretrained): each tensor PEFT changes (q/v and every expert) is that,
    rounded once to bf16; untouched NF4 weights (k/o) are bnb's own bf16 dequantization bit for bit; the rest
    are the base's bytes. (d) Every expert's gate/up/down changed."""
    from peft import PeftModel

    plain, base, adapter, out, work = q4
    dequantized = bnb_dequantized(base, torch.bfloat16)
    assert dequantized.keys() == {k for k in read_tensors(plain) if ATTENTION.fullmatch(k)}
    model = load_model(plain, torch.float64)
    with torch.no_grad():
        for name, (w, _) in dequantized.items():
            model.get_parameter(name).copy_(w)
    exact = saved_merge(PeftModel.from_pretrained(model, adapter).merge_and_unload(), work / "exact")
    stored, got = read_tensors(base), read_tensors(out)
    assert got.keys() == exact.keys()
    changed, untouched, experts = 0, 0, set(k[2] for k in expert_pieces(got))
    for name, value in got.items():
        before = dequantized[name][0] if name in dequantized else stored[name]
        truth = exact[name]
        if torch.equal(truth, before.double()):
            if name in dequantized:
                assert same_bits(value, dequantized[name][1]), f"{name} is not bnb's dequantization"
                untouched += 1
            else:
                assert same_bytes(value, stored[name]), f"{name} is not copied unchanged"
            continue
        assert name in dequantized or name in experts, f"the adapter changes {name}"
        noise = Q_FP32_NOISE * (before.double().abs() + (truth - before.double()).abs().max())
        assert_rounded_once(name, value, truth, noise)
        changed += 1
    assert untouched == changed - len(experts) == 2 * 2  # k/o untouched, q/v merged, in both layers
    assert check_every_expert(got, stored, {"gate_up_proj", "down_proj"}) == len(experts)


@needs_bnb
def test_nf4_moe_verify_recomputes_every_tensor(q4, capsys):
    """`lorafuse verify OUT --base --adapter --sample all` recomputes every merged tensor from the NF4 base."""
    from lorafuse.cli import main

    _, base, adapter, out, _ = q4
    assert main(["verify", str(out), "--base", str(base), "--adapter", str(adapter), "--sample", "all"]) == 0, \
        capsys.readouterr()
    printed = capsys.readouterr().out
    assert re.search(r"(\d+) of \1 merged tensors recomputed", printed), printed
