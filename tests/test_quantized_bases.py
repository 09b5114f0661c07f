"""lorafuse on quantized bases, against the libraries that made them.

bitsandbytes 4-bit (NF4/FP4, double quantization, a wider quant_storage, skipped modules) and LLM.int8
checkpoints are written by transformers + bitsandbytes on the CPU, and their QLoRA adapters by PEFT on
the quantized model. FP8 checkpoints (block-scaled with partial edge blocks, per-tensor, per-channel)
are written by hand in the layout DeepSeek-V3 / compressed-tensors / FBGEMM use, because transformers
only quantizes to FP8 on a GPU; their adapters come from PEFT on the bf16 model. For each we merge with
lorafuse and check that

  (a) OUT is a plain 16-bit model: transformers loads it with no quantization library, with no missing
      or unexpected keys; config.json has no quantization_config and the dtype the weights decode to;
  (b) its logits match the oracle: base + adapter unmerged in PEFT, the base computing with exactly
      the dequantized weights (bitsandbytes' own CPU kernels; for FP8 the dequantized weights);
  (c) every weight is the oracle's dequantization plus s·B@A, rounded once to the output dtype;
      untouched quantized weights are exactly the oracle's dequantization in that dtype, and plain
      tensors are copied byte for byte;
  (d) the plan says what it does: a note about the dequantization, and each weight's quant method.

Then an unknown quantization method is refused with nothing written, and the executor is shown to
read one tensor at a time, never a whole file.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import pytest
import torch

import lorafuse
from conftest import (MERGE_DEVICES, device_suffix, leftovers, load_model, logits, make_adapter, quiet, read_adapter,
                      read_config, read_tensors, record_work, same_bytes, save_model, tree_hash)
from lorafuse.formats.safetensors import TensorRef, read_header
from lorafuse.quant import QuantizedTensor, quantize_fp8_block

try:  # the oracle for the bitsandbytes cases; the FP8 cases run without it
    import bitsandbytes
    import bitsandbytes.functional as BF
except ImportError:
    bitsandbytes = BF = None
needs_bnb = pytest.mark.skipif(BF is None, reason="bitsandbytes (the oracle) is not installed")

# Every dimension is a multiple of 64: bnb's AVX-512 dequantize kernel mis-indexes other last dims (see
# test_quant_kernels.avx512_misindexes). Only k/v are square, so a transposed weight cannot pass.
# q (128, 64), k/v (64, 64), o (64, 128), gate/up (128, 64), down (64, 128), embed/head (128, 64).
LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, tie_word_embeddings=False)
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGETS = ["q_proj", "v_proj", "up_proj", "down_proj"]  # k_proj, o_proj, gate_proj stay untouched
LORA = dict(r=8, lora_alpha=16, init_lora_weights=False, target_modules=TARGETS)

# (b) Logit tolerance, relative to the logit scale max|logits|. The oracle computes in fp32 with the
# exact dequantized weights W and the unmerged fp32 LoRA; OUT holds W + ΔW rounded once to its 16-bit
# dtype, so each weight is off by at most half an ulp (2^-8 relative for bf16, 2^-11 for fp16). That is
# the situation of the 16-bit rows of the PEFT oracle matrix (test_merge_vs_peft.py), so we allow the same
# 16 ulps of the logit scale, and require the adapter to move the logits by more than twice that and OUT
# to be >= 10x closer to the oracle than the base alone.
LOGIT_RTOL = {torch.bfloat16: 16 * 2.0**-8, torch.float16: 16 * 2.0**-11}
EFFECT_RATIO = 10
# (c) lorafuse adds the delta in fp32 (addmm) before its one rounding: a few fp32 ulps of |W| + |s|·|B||A|.
# We allow 2^-20 of that (16 fp32 ulps), 2^12 times less than a bf16 half-ulp: a second rounding (the
# base rounded to 16 bits before the delta is added, as PEFT's merge does) would be caught.
FP32_NOISE = 2.0**-20
SIGNIFICANT_BITS = {torch.bfloat16: 8, torch.float16: 11}
CONFIG_DTYPE = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- helpers ---------------------------------------------------------------------------------------

def llama_base(artefacts, dtype: str, **changes) -> Path:
    """The tiny Llama (seed 0, 1-d parameters randomised as conftest.build_model does) saved in `dtype`,
    with `changes` to its config."""
    def build(folder: Path) -> Path:
        import transformers as tf

        quiet()
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**dict(LLAMA, **changes)))
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 1:
                    p.add_(0.1 * torch.randn_like(p))
        return save_model(model.eval(), folder, dtype)

    return artefacts.get(("qllama", dtype, *sorted(changes.items())), build)


def is_linear_weight(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, with -0.0 read as +0.0: bnb's scalar CPU kernel gives -0.0 for FP4 code 8 where its
    AVX-512 kernel, its torch fallback and lorafuse give +0.0 (see test_quant_kernels); equal in any sum."""
    return (t + 0.0 if t.is_floating_point() else t).contiguous().view(torch.uint8)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def assert_rounded_once(name: str, got: torch.Tensor, exact: torch.Tensor, noise: torch.Tensor) -> None:
    """`got` is float64 `exact` rounded to nearest in got's dtype: within half an ulp at exact's
    magnitude (|exact| in [2^(e-1), 2^e) has ulp 2^(e-p)), plus `noise` for lorafuse's fp32 sum."""
    p = SIGNIFICANT_BITS[got.dtype]
    _, e = torch.frexp(exact)
    finfo = torch.finfo(got.dtype)
    half_ulp = torch.pow(2.0, (e - p - 1).double()).clamp(min=finfo.smallest_normal * finfo.eps / 2)
    err = (got.double() - exact).abs()
    bad = err > half_ulp + noise
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} values are not rounded once; worst "
                           f"error {err.max().item():.3g} vs half an ulp {half_ulp.flatten()[err.argmax()].item():.3g}")


def lora_scale(adapter: Path) -> float:
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert not config.get("use_rslora") and not config.get("rank_pattern") and not config.get("alpha_pattern")
    return config["lora_alpha"] / config["r"]


def input_ids() -> torch.Tensor:
    return torch.randint(0, LLAMA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))


# --- bitsandbytes: checkpoints by transformers, adapters by PEFT, oracle bitsandbytes ----------------

@dataclass(frozen=True)
class Bnb:
    id: str
    kwargs: dict  # BitsAndBytesConfig arguments
    dtype: torch.dtype  # the model's dtype when quantized: what its weights dequantize to
    method: str  # lorafuse's name for it
    model: dict = field(default_factory=dict)  # changes to the tiny Llama's config


_4BIT = dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16)
BNB = [
    Bnb("nf4-double", dict(_4BIT, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True), torch.bfloat16,
        "bnb-nf4"),
    Bnb("fp4", dict(_4BIT, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=False), torch.bfloat16, "bnb-fp4"),
    Bnb("nf4-bf16-storage", dict(_4BIT, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_quant_storage=torch.bfloat16), torch.bfloat16, "bnb-nf4"),
    # down_proj (targeted) and o_proj (untouched) stay plain bf16; naming skips also quantizes lm_head
    Bnb("nf4-skip", dict(_4BIT, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=False,
                         llm_int8_skip_modules=["down_proj", "o_proj"]), torch.bfloat16, "bnb-nf4"),
    Bnb("int8", dict(load_in_8bit=True), torch.float16, "bnb-int8"),  # LLM.int8 quantizes fp16 weights
]


def bnb_checkpoint(artefacts, v: Bnb) -> tuple[Path, Path]:
    """(quantized model folder, QLoRA adapter folder): transformers quantizes the 16-bit model on the
    CPU and saves it; PEFT puts random LoRA factors on that quantized model and saves them."""
    def build(folder: Path) -> Path:
        import transformers as tf
        from peft import LoraConfig

        quiet()
        config = tf.BitsAndBytesConfig(**v.kwargs)
        model = tf.AutoModelForCausalLM.from_pretrained(
            llama_base(artefacts, "bf16" if v.dtype == torch.bfloat16 else "fp16", **v.model),
            quantization_config=config, device_map="cpu", dtype=v.dtype)
        model.save_pretrained(folder / "base")
        make_adapter(folder / "base", folder / "adapter", LoraConfig(**LORA), model=model)
        return folder

    folder = artefacts.get(("qlora", v.id), build)
    return folder / "base", folder / "adapter"


def quantized_checkpoint(artefacts, v: Bnb | Fp8) -> tuple[Path, Path]:
    return bnb_checkpoint(artefacts, v) if isinstance(v, Bnb) else fp8_checkpoint(artefacts, v)


def bnb_model(folder: Path, adapter: Path | None, exact: bool):
    """The quantized checkpoint loaded by transformers + bitsandbytes (unquantized parts in fp32), with
    the adapter unmerged in PEFT, in eval mode.

    exact=True makes bitsandbytes compute with exactly its dequantized weights, in fp32: Linear4bit's
    compute_dtype is set to fp32, so gemm_4bit dequantizes straight to fp32 (code * absmax, unrounded);
    Linear8bitLt modules are put in training mode, where bnb's CPU path is MatMul8bitFp (int8 * SCB/127
    in fp32, then a float matmul) rather than LLM.int8's activation quantization. Nothing else depends
    on the mode (LoRA and attention dropout are 0). exact=False is bnb as a user runs it.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    quiet()
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    if exact:
        for module in model.modules():
            if isinstance(module, bitsandbytes.nn.Linear4bit):
                module.compute_dtype = torch.float32
            elif isinstance(module, bitsandbytes.nn.Linear8bitLt):
                module.train()
    return model


def bnb_dequantized(folder: Path, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """name -> (fp32, model dtype) dequantization of every quantized weight, by bitsandbytes itself, from
    the Params4bit / Int8Params transformers loads (before any forward pass can repack them).

    4-bit: bnb's dequantize_4bit with the saved QuantState, and with a copy asking for float32 output
    (bnb multiplies code by absmax in fp32, then casts). LLM.int8: bnb's int8_vectorwise_dequant (fp32);
    bnb has no 16-bit int8 dequantization, so the model-dtype value is that rounded."""
    from transformers import AutoModelForCausalLM

    quiet()
    model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu")
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, bitsandbytes.nn.Linear4bit):
            w = module.weight
            fp32_state = copy.copy(w.quant_state)
            fp32_state.dtype = torch.float32
            native = BF.dequantize_4bit(w.data, w.quant_state)
            found[name + ".weight"] = (BF.dequantize_4bit(w.data, fp32_state), native)
        elif isinstance(module, bitsandbytes.nn.Linear8bitLt):
            value = BF.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
            found[name + ".weight"] = (value, value.to(dtype))
    return found


# --- FP8: checkpoints written here, oracle the dequantization formula -------------------------------

@dataclass(frozen=True)
class Fp8:
    id: str
    qconfig: dict  # config.json's quantization_config
    scale: str  # "block" (weight_scale_inv per block), "tensor" or "channel" (weight_scale)
    method: str  # lorafuse's name for it
    activation: str | None = None  # a per-module activation scale written beside each weight

    @property
    def block(self) -> tuple[int, int] | None:
        return tuple(self.qconfig["weight_block_size"]) if self.qconfig.get("weight_block_size") else None


def _fp8(block):
    return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": block}


FP8 = [
    # 48 divides neither 64 nor 128: every weight has partial blocks at its right and bottom edges
    Fp8("fp8-block-48x48", _fp8([48, 48]), "block", "fp8-block"),
    # rectangular blocks, rows divisible and columns not: a swapped (bi, bo) cannot pass
    Fp8("fp8-block-32x48", _fp8([32, 48]), "block", "fp8-block"),
    Fp8("compressed-tensors-tensor",
        {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
         "config_groups": {"group_0": {"targets": ["Linear"],
                                       "weights": {"num_bits": 8, "type": "float", "strategy": "tensor"},
                                       "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor"}}}},
        "tensor", "fp8-scaled", activation="input_scale"),
    Fp8("fbgemm-channel", {"quant_method": "fbgemm_fp8", "activation_scale_ub": 1200.0,
                           "modules_to_not_convert": ["lm_head"]}, "channel", "fp8-scaled"),
    # what transformers' FineGrainedFP8 writes for weight_block_size=None: one scalar weight_scale_inv
    Fp8("fp8-tensor-scale-inv", _fp8(None), "tensor-inv", "fp8-scaled"),
    # FineGrainedFP8 with activation_scheme="static" saves each module's activation_scale too
    Fp8("fp8-block-static", {**_fp8([48, 48]), "activation_scheme": "static"}, "block", "fp8-block",
        activation="activation_scale"),
]
FP8_MAX = 448.0


def fp8_checkpoint(artefacts, v: Fp8) -> tuple[Path, Path]:
    """(FP8 model folder, adapter folder). Every q/k/v/o/gate/up/down weight of the bf16 model is stored
    as float8_e4m3fn plus its scale; embeddings, norms and the head stay bf16 (as DeepSeek-V3 keeps
    them); config.json gains the quantization_config. The adapter is PEFT's, on the bf16 model."""
    from safetensors.torch import save_file

    def build(folder: Path) -> Path:
        base = llama_base(artefacts, "bf16")
        tensors = {}
        for name, w in read_tensors(base).items():
            if not is_linear_weight(name):
                tensors[name] = w
                continue
            if v.scale == "block":
                tensors[name], tensors[name + "_scale_inv"] = quantize_fp8_block(w, v.block)
            else:
                amax = w.float().abs().amax(dim=1, keepdim=True) if v.scale == "channel" else w.float().abs().amax()
                scale = amax / FP8_MAX
                tensors[name] = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
                if v.scale == "tensor-inv":
                    tensors[name + "_scale_inv"] = scale.reshape(())  # FP8Linear's scalar parameter
                else:
                    tensors[name + "_scale"] = scale.reshape(-1, 1) if v.scale == "channel" else scale.reshape(1)
            if v.activation:
                tensors[name.removesuffix("weight") + v.activation] = torch.tensor([0.0125])
        folder.mkdir(exist_ok=True)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config = read_config(base)
        config["quantization_config"] = v.qconfig
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return folder

    return artefacts.get(("fp8", v.id), build), fp8_adapter(artefacts)


def fp8_adapter(artefacts) -> Path:
    from peft import LoraConfig

    return artefacts.get("fp8-adapter", lambda d: make_adapter(llama_base(artefacts, "bf16"), d, LoraConfig(**LORA)))


def fp8_dequantized(folder: Path) -> dict[str, torch.Tensor]:
    """name -> fp32 weight of every FP8 weight, computed here from the formulas: fp8 (exact in fp32)
    times its scale, the scale grid expanded with repeat_interleave and cut at the edges (partial
    blocks use their own scale), or broadcast per tensor / per output channel."""
    config = read_config(folder)
    block = config["quantization_config"].get("weight_block_size")
    saved = read_tensors(folder)
    found = {}
    for name, q in saved.items():
        if q.dtype != torch.float8_e4m3fn:
            continue
        x = q.to(torch.float32)
        rows, cols = x.shape
        if name + "_scale_inv" in saved and block:
            bo, bi = block
            s = saved[name + "_scale_inv"].repeat_interleave(bo, dim=0)[:rows].repeat_interleave(bi, dim=1)[:, :cols]
        else:
            s = saved.get(name + "_scale_inv", saved.get(name + "_scale"))
            s = s.reshape(()) if s.numel() == 1 else s.reshape(rows, 1)
        found[name] = x * s
    return found


def fp8_model(base: Path, weights: dict[str, torch.Tensor], adapter: Path | None):
    """The bf16 model in fp32 with its quantized weights replaced by their fp32 dequantization, and
    the adapter unmerged in PEFT: what the FP8 checkpoint + adapter compute."""
    from peft import PeftModel

    model = load_model(base, torch.float32)
    with torch.no_grad():
        for name, w in weights.items():
            model.get_parameter(name).copy_(w)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()


# --- one merge per case, and what the tests compare it with ------------------------------------------

@dataclass
class Case:
    variant: Bnb | Fp8
    base: Path  # the quantized checkpoint
    adapter: Path
    out: Path
    plan: object
    plain_base: Path  # the 16-bit model it was made from

    @property
    def is_bnb(self) -> bool:
        return isinstance(self.variant, Bnb)

    @property
    def dtype(self) -> torch.dtype:
        return self.variant.dtype if self.is_bnb else torch.bfloat16

    @cached_property
    def dequantized(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (fp32, output-dtype) dequantization of each quantized weight, by the oracle."""
        if self.is_bnb:
            return bnb_dequantized(self.base, self.dtype)
        return {n: (w, w.to(self.dtype)) for n, w in fp8_dequantized(self.base).items()}

    def model(self, adapter: bool, exact: bool = True):
        """The oracle: the quantized base (+ the adapter unmerged), computing in fp32."""
        adapter_path = self.adapter if adapter else None
        if self.is_bnb:
            return bnb_model(self.base, adapter_path, exact)
        return fp8_model(self.plain_base, {n: w for n, (w, _) in self.dequantized.items()}, adapter_path)

    @cached_property
    def out_tensors(self) -> dict[str, torch.Tensor]:
        return read_tensors(self.out)


CASES = [pytest.param((v, device), marks=needs_bnb if v in BNB else (), id=v.id + device_suffix(device))
         for v in BNB + FP8 for device in MERGE_DEVICES]


@pytest.fixture(scope="module", params=CASES)
def case(request, artefacts, tmp_path_factory) -> Case:
    v, device = request.param
    if isinstance(v, Bnb):
        base, adapter = bnb_checkpoint(artefacts, v)
        plain = llama_base(artefacts, "bf16" if v.dtype == torch.bfloat16 else "fp16")
    else:
        base, adapter = fp8_checkpoint(artefacts, v)
        plain = llama_base(artefacts, "bf16")
    out = tmp_path_factory.mktemp(f"out-{v.id}{device_suffix(device)}") / "merged"
    try:
        plan = lorafuse.plan(base, adapter, out)
        lorafuse.merge(base, adapter, out, device=device)
    except lorafuse.LorafuseError as e:
        pytest.fail(f"lorafuse refuses a {v.id} base: {e}")
    return Case(v, base, adapter, out, plan, plain)


def test_output_is_a_plain_16bit_model(case):
    """(a) transformers loads OUT without any quantization library: every weight present, nothing
    extra (no absmax, SCB, scales), every module a plain torch Linear; config.json has no
    quantization_config and says the dtype the quantized weights decode to, which every tensor has."""
    model, info = load_model(case.out, torch.float32, info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert {type(m) for m in model.modules() if isinstance(m, torch.nn.Linear)} == {torch.nn.Linear}
    config = read_config(case.out)
    assert "quantization_config" not in config
    assert config["dtype"] == CONFIG_DTYPE[case.dtype]
    if case.is_bnb and case.variant.method != "bnb-int8":  # the dtype bnb recorded in each quant state
        states = {k: v for k, v in read_tensors(case.base).items() if ".quant_state.bitsandbytes__" in k}
        assert states and {json.loads(bytes(t.tolist()))["dtype"] for t in states.values()} == {config["dtype"]}
    assert set(case.out_tensors) == set(read_tensors(case.plain_base))  # the 16-bit model's tensors, no more
    assert {t.dtype for t in case.out_tensors.values()} == {case.dtype}


def test_logits_match_peft_on_the_quantized_base(case):
    """(b) OUT computes what the quantized base + adapter compute in PEFT (unmerged, eval), within the
    16-bit rounding of the merged weights, and much closer than the base alone does. For bitsandbytes
    also against bnb as a user runs it (4-bit computing in bf16, LLM.int8 quantizing activations), which
    no 16-bit model reproduces exactly: there OUT must still be >= 10x closer than the base."""
    ids = input_ids()
    want = logits(case.model(adapter=True), ids)
    base = logits(case.model(adapter=False), ids)
    got = logits(load_model(case.out, torch.float32), ids)
    scale = want.abs().max().item()
    err, base_err = (got - want).abs().max().item(), (base - want).abs().max().item()
    tol = LOGIT_RTOL[case.dtype] * scale
    assert err <= tol, f"max |OUT - PEFT| = {err:.3g} > {tol:.3g} (logit scale {scale:.3g})"
    assert base_err > 2 * tol, f"the adapter barely moves the logits ({base_err:.3g}): the test proves nothing"
    assert base_err > EFFECT_RATIO * err, f"OUT ({err:.3g}) is not much closer to PEFT than the base ({base_err:.3g})"
    if case.is_bnb:
        usual = logits(case.model(adapter=True, exact=False), ids)
        usual_base = logits(case.model(adapter=False, exact=False), ids)
        err, base_err = (got - usual).abs().max().item(), (usual_base - usual).abs().max().item()
        assert base_err > EFFECT_RATIO * err, f"OUT ({err:.3g}) vs bnb's usual path; base {base_err:.3g}"


def test_weights_are_the_dequantized_base_plus_delta_rounded_once(case):
    """(c) Per weight, against the oracle's own dequantization (bitsandbytes' kernels; the FP8 formula):
    merged weights are (W in fp32 + s·B@A in fp64) rounded once to the output dtype; untouched quantized
    weights are bit for bit the oracle's dequantization in that dtype (bnb's own bf16 output for 4-bit);
    plain tensors are the base's bytes (adapted ones, from skipped modules, merged the same way)."""
    base = read_tensors(case.base)
    adapter = read_adapter(case.adapter)
    s = lora_scale(case.adapter)
    quantized = case.dequantized
    merged = untouched = 0
    for name, got in case.out_tensors.items():
        module = name.removesuffix(".weight")
        A = adapter.get(f"base_model.model.{module}.lora_A.weight")
        if A is None and name not in quantized:
            assert same_bytes(got, base[name]), f"{name} is not copied unchanged"
            continue
        assert got.dtype == case.dtype, name
        if A is None:
            assert same_bits(got, quantized[name][1]), f"{name} is not the oracle's dequantization"
            untouched += 1
            continue
        B = adapter[f"base_model.model.{module}.lora_B.weight"].double()
        W = quantized[name][0] if name in quantized else base[name].float()
        assert W.dtype == torch.float32 and W.shape == got.shape, name
        exact = W.double() + s * (B @ A.double())
        noise = FP32_NOISE * (W.double().abs() + abs(s) * (B.abs() @ A.double().abs()))
        assert_rounded_once(name, got, exact, noise)
        merged += 1
    assert merged == len(TARGETS) * LLAMA["num_hidden_layers"]
    assert untouched >= 1  # every case leaves some quantized weights untouched


def test_verify_recomputes_every_merged_tensor(case):
    """verify's float64 recomputation dequantizes the base as the merge does and agrees with OUT."""
    from lorafuse.tools.verify import verify

    assert verify(case.out, case.base, case.adapter, sample=len(case.plan.merged)) == []


def test_plan_reports_the_dequantization(case):
    """(d) The plan says the base is quantized and will be dequantized, names each quantized weight's
    method (and only the weights the oracle sees as quantized), and its config drops quantization_config."""
    plan = case.plan
    method = read_config(case.base)["quantization_config"]["quant_method"]
    assert any("dequantiz" in note and method in note for note in plan.notes), plan.notes
    methods = {t.name: t.source.method for t in plan.tensors if isinstance(t.source, QuantizedTensor)}
    assert methods == dict.fromkeys(case.dequantized, case.variant.method)
    assert all(isinstance(t.source, TensorRef) for t in plan.tensors if t.name not in methods)
    assert "quantization_config" not in plan.config
    skip = case.variant.kwargs.get("llm_int8_skip_modules", []) if case.is_bnb else []
    skipped = [t for t in plan.tensors if is_linear_weight(t.name) and t.name.split(".")[-2] in skip]
    assert len(skipped) == len(skip) * LLAMA["num_hidden_layers"]
    assert all(isinstance(t.source, TensorRef) and t.dtype == "BF16" for t in skipped)


# --- refusing what it cannot read ------------------------------------------------------------------

def gptq_layout(tensors: dict, name: str, w: torch.Tensor, group: int = 32) -> None:
    """AutoGPTQ's tensors for one Linear: 4-bit weights packed 8 per int32 along `in`, per-group zeros and scales."""
    out, inp = w.shape
    module = name.removesuffix(".weight")
    tensors[module + ".qweight"] = torch.randint(-2**31, 2**31 - 1, (inp // 8, out), dtype=torch.int32)
    tensors[module + ".qzeros"] = torch.randint(-2**31, 2**31 - 1, (inp // group, out // 8), dtype=torch.int32)
    tensors[module + ".scales"] = torch.rand(inp // group, out, dtype=torch.float16)
    tensors[module + ".g_idx"] = torch.arange(inp, dtype=torch.int32) // group


def awq_layout(tensors: dict, name: str, w: torch.Tensor, group: int = 32) -> None:
    """AutoAWQ (GEMM) tensors for one Linear: packed along `out`."""
    out, inp = w.shape
    module = name.removesuffix(".weight")
    tensors[module + ".qweight"] = torch.randint(-2**31, 2**31 - 1, (inp, out // 8), dtype=torch.int32)
    tensors[module + ".qzeros"] = torch.randint(-2**31, 2**31 - 1, (inp // group, out // 8), dtype=torch.int32)
    tensors[module + ".scales"] = torch.rand(inp // group, out, dtype=torch.float16)


UNKNOWN = [
    ("gptq", {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False, "sym": True}, gptq_layout),
    ("awq", {"quant_method": "awq", "bits": 4, "group_size": 32, "version": "gemm", "zero_point": True}, awq_layout),
    ("gptq-config-only", {"quant_method": "gptq", "bits": 4}, None),  # the weights are still plain
]


@pytest.mark.parametrize("method,qconfig,layout", UNKNOWN, ids=[u[0] for u in UNKNOWN])
def test_unknown_quant_method_is_refused(method, qconfig, layout, artefacts, tmp_path):
    """A base quantized with a method lorafuse cannot read (GPTQ, AWQ, in their real tensor layouts)
    raises LorafuseError naming the method, from plan() and merge(), with nothing written: no OUT,
    no staging folder, inputs unchanged. It must not be mistaken for an adapter/base mismatch."""
    from safetensors.torch import save_file

    plain = llama_base(artefacts, "bf16")
    base = tmp_path / "base"
    shutil.copytree(plain, base)
    if layout is not None:
        tensors = {}
        for name, w in read_tensors(plain).items():
            if is_linear_weight(name):
                layout(tensors, name, w)
            else:
                tensors[name] = w
        save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    config = read_config(base)
    config["quantization_config"] = qconfig
    (base / "config.json").write_text(json.dumps(config))
    adapter = fp8_adapter(artefacts)  # PEFT's, on the same model in bf16
    out = tmp_path / "out"
    before = {p: tree_hash(p) for p in (base, adapter)}
    name = method.split("-")[0]
    with pytest.raises(lorafuse.LorafuseError, match=f"'{name}'"):
        lorafuse.plan(base, adapter, out)
    with pytest.raises(lorafuse.LorafuseError, match=f"'{name}'") as info:
        lorafuse.merge(base, adapter, out)
    assert "\n" not in str(info.value)
    assert not out.exists() and leftovers(tmp_path) == []
    assert {p: tree_hash(p) for p in (base, adapter)} == before


# --- memory: one tensor at a time --------------------------------------------------------------------

MEMORY_CASES = ([pytest.param(v, marks=needs_bnb, id=v.id) for v in (BNB[0], BNB[4])]
                + [pytest.param(FP8[0], id=FP8[0].id)])


@pytest.mark.parametrize("variant", MEMORY_CASES)
def test_no_read_is_larger_than_one_stored_tensor(variant, artefacts, tmp_path, monkeypatch):
    """The executor never reads a whole shard or model. The quantized base is one model.safetensors
    holding every tensor; we record every positioned read (os.preadv, os.pread: what TensorRef.read and
    the executor's _read_exact use) and every TensorRef.read, and require each read of the base file to
    lie inside one tensor's bytes, none to exceed the largest stored tensor, and the reads to cover all
    the quantized parts (so the hooks did see the data)."""
    base, adapter = quantized_checkpoint(artefacts, variant)
    (weights,) = base.glob("*.safetensors")
    header = read_header(weights)
    spans = sorted((r.offset, r.offset + r.nbytes) for r in header.tensors.values())
    largest = max(r.nbytes for r in header.tensors.values())
    assert weights.stat().st_size > 3 * largest  # a whole-file read would stand out
    identity = (weights.stat().st_dev, weights.stat().st_ino)

    reads, ref_reads = [], []  # (is the base file, offset, bytes), TensorRef.nbytes

    def record(fd, offset, nbytes):
        st = os.fstat(fd)
        reads.append(((st.st_dev, st.st_ino) == identity, offset, nbytes))

    real_preadv, real_pread, real_ref_read = os.preadv, os.pread, TensorRef.read

    def preadv(fd, buffers, offset, *args):
        record(fd, offset, sum(memoryview(b).nbytes for b in buffers))
        return real_preadv(fd, buffers, offset, *args)

    def pread(fd, n, offset):
        record(fd, offset, n)
        return real_pread(fd, n, offset)

    def ref_read(self):
        ref_reads.append(self.nbytes)
        return real_ref_read(self)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pread", pread)
    monkeypatch.setattr(TensorRef, "read", ref_read)
    lorafuse.merge(base, adapter, tmp_path / "out")
    monkeypatch.undo()

    from_base = [(off, n) for is_base, off, n in reads if is_base]
    assert from_base, "no read of the base file was seen: the hooks missed the executor's reads"
    assert max(n for _, n in from_base) <= largest and max(ref_reads, default=0) <= largest
    for off, n in from_base:
        assert any(lo <= off and off + n <= hi for lo, hi in spans), f"a read of {n} bytes at {off} spans tensors"
    plan = lorafuse.plan(base, adapter)
    parts = [ref for t in plan.tensors if isinstance(t.source, QuantizedTensor) for _, ref in t.source.parts.values()]
    assert sum(n for _, n in from_base) >= sum(r.nbytes for r in parts)
    assert all(any(off == r.offset for off, _ in from_base) for r in parts)


@pytest.mark.parametrize("variant", MEMORY_CASES)
def test_quantized_weights_are_decoded_a_block_of_rows_at_a_time(variant, artefacts, tmp_path, monkeypatch):
    """On the CPU a quantized weight is decoded, patched and rounded a block of rows at a time, as a 16-bit
    one is: the worker threads ask for blocks of rows and never for a float32 copy of a whole weight, and
    decode them on one thread each, however many cores there are (16 cores, 2 GB NF4 base: 8 s of CPU
    where teams of two threads spun 35-42 s)."""
    from lorafuse import execute
    from lorafuse.compute import rows

    base, adapter = quantized_checkpoint(artefacts, variant)
    roles, threads, real_get = set(), set(), rows.Buffers.get

    def get(self, role, nbytes):
        roles.add(role)
        threads.add(torch.get_num_threads())
        return real_get(self, role, nbytes)

    monkeypatch.setattr(rows.Buffers, "get", get)
    monkeypatch.setattr(execute, "usable_cores", lambda: 64)
    lorafuse.merge(base, adapter, tmp_path / "out")
    assert "block" in roles and any(role.startswith("stored:") for role in roles)
    assert "fp32" not in roles, roles
    assert threads == {1}, threads


# down_proj's rows (136 values) end inside NF4's blocks of 64 values: its blocks of rows start every 8 rows
ODD_WIDTH = pytest.param(Bnb("nf4-odd-width", BNB[0].kwargs, torch.bfloat16, "bnb-nf4", dict(intermediate_size=136)),
                         marks=needs_bnb, id="nf4-odd-width")


@pytest.mark.parametrize("block_values", [None, 97], ids=["one-block", "many-blocks"])
@pytest.mark.parametrize("variant", MEMORY_CASES + [ODD_WIDTH])
def test_the_planned_memory_bounds_what_each_tensor_takes(variant, block_values, artefacts, tmp_path, monkeypatch):
    """The memory `lorafuse plan` prints holds: each tensor made in rows takes at most its `work_bytes` in
    buffers and fp32 adapter factors, also where a quantized weight's blocks of codes span rows (its
    blocks of rows then start every few rows, and hold more of them); and blocks of a few rows (97 values)
    give the bits that one block gives."""
    from lorafuse import costs

    base, adapter = quantized_checkpoint(artefacts, variant)
    if block_values:
        monkeypatch.setattr(costs, "BLOCK_VALUES", block_values)
    taken = record_work(monkeypatch)  # tensor -> what it took: buffer role or factor -> bytes
    lorafuse.merge(base, adapter, tmp_path / "out")
    planned = {t.name: t.work_bytes for t in lorafuse.plan(base, adapter).tensors}
    monkeypatch.undo()

    assert any(role == "block" for mine in taken.values() for role in mine), "no tensor was made in rows"
    for name, mine in taken.items():
        assert sum(mine.values()) <= planned[name], f"{name} took {mine}, planned {planned[name]} bytes"
    if block_values:
        lorafuse.merge(base, adapter, tmp_path / "one-block")
        blocks, whole = read_tensors(tmp_path / "out"), read_tensors(tmp_path / "one-block")
        assert blocks.keys() == whole.keys() and all(same_bits(blocks[k], whole[k]) for k in blocks)


@pytest.mark.parametrize("variant", MEMORY_CASES)
def test_planning_a_quantized_base_needs_no_torch(variant, artefacts):
    """Claiming quantized weights reads their headers and quant states as bytes: `lorafuse plan` never
    imports torch, so a merge starts copying the untouched tensors while torch loads (1.3-1.7 s here)."""
    base, adapter = quantized_checkpoint(artefacts, variant)
    code = ("import sys; from lorafuse.cli import main; "
            f"code = main(['plan', {str(base)!r}, {str(adapter)!r}]); sys.exit(code or 10 * ('torch' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    method = read_config(base)["quantization_config"]["quant_method"]
    assert f"quantized ({method}): its weights are dequantized" in done.stdout, done.stdout


# --- merged_4bit output and the QLoRA comparison ----------------------------------------------------

@needs_bnb
@pytest.mark.parametrize("device", MERGE_DEVICES)
@pytest.mark.parametrize("source", ["16bit", "nf4-double", "int8"])
def test_merged_4bit_is_what_bitsandbytes_writes(source, device, artefacts, tmp_path):
    """save_method merged_4bit: transformers + bitsandbytes load OUT as Linear4bit layers whose packed
    weights and statistics are bitsandbytes' own quantize_4bit of the 16-bit merge, bit for bit, and
    whose logits stay within 4-bit quantization error of the 16-bit merge."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    from lorafuse.tools.verify import verify

    if source == "16bit":
        base = llama_base(artefacts, "bf16")
        adapter = artefacts.get("m4-adapter", lambda d: make_adapter(base, d, LoraConfig(**LORA)))
    else:
        base, adapter = bnb_checkpoint(artefacts, next(v for v in BNB if v.id == source))
    plan = lorafuse.plan(base, adapter, save_method="merged_4bit")
    assert any("re-quantized to NF4" in n and "loses precision" in n for n in plan.notes)
    lorafuse.merge(base, adapter, tmp_path / "m16", device=device)
    lorafuse.merge(base, adapter, tmp_path / "m4", save_method="merged_4bit", device=device)
    assert verify(tmp_path / "m4", base, adapter) == []  # the 4-bit layout as planned; 16-bit tensors recomputed
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "m4", device_map="cpu", output_loading_info=True)
    assert not any(info.values()), info
    assert all(isinstance(getattr(layer.self_attn, p), bitsandbytes.nn.Linear4bit)
               for layer in model.model.layers for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    sixteen, four, original = read_tensors(tmp_path / "m16"), read_tensors(tmp_path / "m4"), read_tensors(base)
    merged = {t.name for t in plan.merged}
    for name in [n for n in sixteen if is_linear_weight(n)]:
        if source == "nf4-double" and name not in merged:  # untouched NF4 weights are copied as they were
            parts = [k for k in original if k == name or k.startswith(name + ".")]
            assert all(same_bits(four[k], original[k]) for k in parts), name
            continue
        packed, state = BF.quantize_4bit(sixteen[name], blocksize=64, compress_statistics=True, quant_type="nf4")
        assert torch.equal(four[name].view(-1), packed.view(-1)), name
        assert torch.equal(four[f"{name}.absmax"], state.absmax), name
        assert torch.equal(four[f"{name}.nested_absmax"], state.state2.absmax), name
    if source == "16bit":  # the oracle: transformers quantizing the 16-bit merge itself when loading it
        import transformers as tf

        oracle = AutoModelForCausalLM.from_pretrained(
            tmp_path / "m16", device_map="cpu", quantization_config=tf.BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=torch.bfloat16)).eval()
        with torch.no_grad():
            assert torch.equal(model.eval()(input_ids()).logits, oracle(input_ids()).logits)


@needs_bnb
def test_inspect_compares_the_adapter_with_the_quantization_gap(artefacts, capsys):
    """inspect --compare-base: per weight, ‖ΔW‖ of the adapter and ‖W16 − dequant(W4)‖, and the plan
    of a merge into the 16-bit base names the 4-bit checkpoint the adapter was trained on."""
    from lorafuse.cli import main
    from lorafuse.tools.inspection import inspect

    quantized, adapter = bnb_checkpoint(artefacts, BNB[0])
    base16 = llama_base(artefacts, "bf16")
    rows = inspect(base16, adapter, compare_base=quantized)
    assert [r.name for r in rows[:-1]] == [t.name for t in lorafuse.plan(base16, adapter).merged]
    dequantized = bnb_dequantized(quantized, torch.float32)
    w16 = read_tensors(base16)
    for row in rows[:-1]:
        gap = torch.linalg.vector_norm(w16[row.name].float() - dequantized[row.name][0].float()).item()
        assert row.gap_norm == pytest.approx(gap, rel=1e-4)
        assert row.delta_norm > 0
    assert rows[-1].name == "overall" and rows[-1].gap_norm == pytest.approx(
        sum(r.gap_norm ** 2 for r in rows[:-1]) ** 0.5)
    assert main(["inspect", str(base16), str(adapter), "--compare-base", str(quantized)]) == 0
    assert "overall the two bases differ by" in capsys.readouterr().out


def test_plan_says_when_the_adapter_was_trained_on_a_quantized_checkpoint(artefacts, tmp_path):
    """An adapter whose base_model_name_or_path names a 4-bit checkpoint, merged into a 16-bit BASE
    (and the reverse): the plan says which weights the merge uses and how to measure the difference."""
    import shutil

    from peft import LoraConfig

    base16 = llama_base(artefacts, "bf16")
    adapter = artefacts.get("m4-adapter", lambda d: make_adapter(base16, d, LoraConfig(**LORA)))
    renamed = tmp_path / "adapter"
    shutil.copytree(adapter, renamed)
    config = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "unsloth/llama-3-8b-bnb-4bit"}))
    notes = lorafuse.plan(base16, renamed).notes
    assert any("unsloth/llama-3-8b-bnb-4bit, a quantized checkpoint, and BASE is 16-bit" in n and "--compare-base" in n
               for n in notes), notes
    if BF is not None:
        quantized, _ = bnb_checkpoint(artefacts, BNB[0])
        (renamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "meta-llama/Llama-3.1-8B"}))
        notes = lorafuse.plan(quantized, renamed).notes
        assert any("BASE is quantized (bitsandbytes)" in n for n in notes), notes
