"""lorafuse on MXFP4 bases (gpt-oss), against transformers, which dequantizes them.

gpt-oss stores each MoE layer's experts as `mlp.experts.{gate_up,down}_proj_blocks` (uint8, two e2m1
codes a byte) and `_scales` (uint8 e8m0 exponents, one per 32 values), and transformers dequantizes them
(`convert_moe_packed_tensors`, `Mxfp4Config(dequantize=True)`, what it does on a CPU) to the transposed
16-bit parameters `mlp.experts.gate_up_proj` (E, H, 2I) and `down_proj` (E, I, H). transformers only
quantizes to MXFP4 with triton kernels, so the checkpoints here are written by a small helper in the
official layout; every oracle is transformers reading them:

  1. the kernel: lorafuse's decoding is transformers' `convert_moe_packed_tensors`, bit for bit, for
     every code and scale (0 and 255 too), in each dtype, a block of rows (an expert) at a time and whole;
  2. a tiny gpt-oss merged with an attention LoRA made by PEFT on the MXFP4 model as transformers loads
     it: OUT is a plain 16-bit model whose experts are transformers' dequantization byte for byte and
     whose logits are PEFT's; the numpy path decodes one expert a block, within the planned memory;
  3. a malformed MXFP4 checkpoint is a one-line error (exit code 2) with nothing written;
  4. an adapter on the experts themselves (PEFT target_parameters) merges to PEFT's logits.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

import lorafuse
from conftest import (MERGE_DEVICES, device_suffix, leftovers, load_model, logits, make_adapter, quiet, read_config, read_tensors,
                      same_bytes, tree_hash)
from lorafuse.quant import QuantizedTensor
from test_quantized_bases import EFFECT_RATIO, LOGIT_RTOL

# intermediate != hidden: down_proj (E, I, H) is not square, so a missing or extra transpose cannot pass.
# Both are multiples of 32, the MXFP4 group. Every token goes to all 4 experts, weighted by the router's
# softmax: with top-2 of 4, the bf16 rounding of the merged weights flips a near-tie between two experts
# for some token (seen: one token of 32 off by 20% of the logit scale), which no 16-bit output can avoid.
GPT_OSS = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=4)
EXPERTS = ("gate_up_proj", "down_proj")
MODULES_TO_NOT_CONVERT = ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]
QCONFIG = {"quant_method": "mxfp4", "modules_to_not_convert": MODULES_TO_NOT_CONVERT}
INT_VIEW = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- 1. the kernel ----------------------------------------------------------------------------------

def transformers_dequantized(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The oracle: transformers' dequantization, in the (E, C, R) layout of the parameter it loads."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


def random_mxfp4(experts: int, rows: int, groups: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random blocks, and scales in gpt-oss's range (2^-17 .. 2^8) with the extremes 0 and 255 mixed in."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(110, 136, (experts, rows, groups), generator=g, dtype=torch.uint8)
    edge = torch.rand(scales.shape, generator=g) < 0.05
    scales[edge] = torch.where(torch.rand(scales.shape, generator=g) < 0.5, 0, 255).to(torch.uint8)[edge]
    return blocks, scales


def every_code_and_scale() -> tuple[torch.Tensor, torch.Tensor]:
    """One expert of 256 rows: row r holds all 256 bytes (each code pair) in each of 16 groups, at scale r."""
    blocks = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 1, 16, 16).expand(1, 256, 16, 16)
    scales = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(1, 256, 1).expand(1, 256, 16)
    return blocks.contiguous(), scales.contiguous()


KERNEL_CASES = {
    "every-code-and-scale": every_code_and_scale,
    "3-experts-10x96": lambda: random_mxfp4(3, 10, 3, seed=0),  # short rows: several experts a step
    "4-experts-192x64": lambda: random_mxfp4(4, 192, 2, seed=1),  # the tiny gpt-oss' gate_up_proj
}


@pytest.mark.parametrize("device", MERGE_DEVICES, ids=lambda d: device_suffix(d).lstrip("-") or "cpu")
@pytest.mark.parametrize("step_rows", [None, 3], ids=["default-steps", "3-row-steps"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_decoding_is_transformers_dequantization_bit_for_bit(case, dtype, step_rows, device, monkeypatch):
    """lorafuse's float32 values rounded to `dtype` are transformers' dequantization in `dtype`, bit for
    bit (±inf where it overflows: scale 255, and fp16), decoded whole (the torch path) and one expert at a
    time (the numpy path's blocks: an expert is one row of the (E, C·R) matrix it sees). Steps of 3 code
    rows make the lookup rearrange runs that start on odd columns and cross groups and experts. On a GPU
    too, where there is one."""
    from lorafuse.quant import base, dequantize_mxfp4
    from lorafuse.quant.mxfp4 import lookup_mxfp4

    blocks, scales = KERNEL_CASES[case]()
    want = transformers_dequantized(blocks, scales, dtype)
    assert not want.isnan().any()  # ldexp(0, 128) is 0: a NaN here would be lorafuse's own 0 × inf
    lookup = lookup_mxfp4(blocks.to(device), scales.to(device))
    if step_rows:
        monkeypatch.setattr(base, "LOOKUP_BYTES", step_rows * lookup.codes.shape[1] * lookup.table.element_size())
    view = INT_VIEW[dtype]

    whole = dequantize_mxfp4(blocks.to(device), scales.to(device))
    assert whole.dtype == torch.float32 and whole.shape == want.shape
    assert torch.equal(whole.to(dtype).cpu().view(view), want.view(view))

    experts, per_expert = want.shape[0], want[0].numel()
    buffer = torch.empty(per_expert * 4, dtype=torch.uint8, device=device)
    for e in range(experts):
        values = lookup.fill(e * per_expert, (e + 1) * per_expert, buffer)
        assert torch.equal(values.to(dtype).cpu().view(view), want[e].reshape(-1).view(view)), f"expert {e}"


# --- a tiny gpt-oss and its MXFP4 checkpoint ----------------------------------------------------------

def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks, scales) of an (E, C, R) expert parameter in gpt-oss's layout: each expert's (R, C) matrix
    in groups of 32 along C, with the smallest power-of-two scale that brings the group's largest value
    within 6 (e2m1's largest), each value then the nearest e2m1 value, two codes a byte, low nibble first."""
    from transformers.integrations.mxfp4 import FP4_VALUES

    x = weight.float().transpose(1, 2)
    experts, rows, cols = x.shape
    groups = x.reshape(experts, rows, cols // 32, 32)
    amax = groups.abs().amax(-1)
    exponent = torch.ceil(torch.log2(torch.where(amax > 0, amax / 6, torch.ones_like(amax)))).clamp(-127, 127)
    scaled = groups / torch.pow(2.0, exponent).unsqueeze(-1)
    codes = (scaled.unsqueeze(-1) - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), (exponent + 127).to(torch.uint8)


def gpt_oss_base(artefacts) -> Path:
    """The tiny gpt-oss (seed 0) saved by transformers in bf16, unquantized; its biases, norms and
    attention sinks randomised too (transformers initialises them to constants)."""
    def build(folder: Path) -> Path:
        import transformers as tf

        quiet()
        torch.manual_seed(0)
        model = tf.AutoModelForCausalLM.from_config(tf.GptOssConfig(**GPT_OSS))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 1 or name.endswith("_bias"):
                    p.add_(0.1 * torch.randn_like(p))
        model.to(torch.bfloat16).save_pretrained(folder)
        return folder

    return artefacts.get("gpt-oss-bf16", build)


def mxfp4_base(artefacts) -> Path:
    """The tiny gpt-oss as the official release stores it: experts as `_blocks` and `_scales`, every other
    tensor bf16, config.json with the mxfp4 quantization_config."""
    from safetensors.torch import save_file

    def build(folder: Path) -> Path:
        plain = gpt_oss_base(artefacts)
        tensors = {}
        for name, t in read_tensors(plain).items():
            if name.endswith(tuple(f"mlp.experts.{p}" for p in EXPERTS)):
                tensors[name + "_blocks"], tensors[name + "_scales"] = quantize_mxfp4(t)
            else:
                tensors[name] = t
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config = read_config(plain)
        config["quantization_config"] = QCONFIG
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        return folder

    return artefacts.get("gpt-oss-mxfp4", build)


def load_mxfp4(folder: Path, dtype: torch.dtype | None = None):
    """The MXFP4 checkpoint as transformers loads it on a CPU: dequantized (to the config's dtype by default)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    quiet()
    kwargs = {"dtype": dtype} if dtype else {}
    model, info = AutoModelForCausalLM.from_pretrained(folder, quantization_config=Mxfp4Config(dequantize=True),
                                                       device_map="cpu", output_loading_info=True, **kwargs)
    assert not any(info.values()), info
    return model.eval()


def mxfp4_adapter(artefacts, experts: bool = False) -> Path:
    """PEFT's random LoRA on the MXFP4 model as transformers loads it (fp32): on q/v, or on q and the
    experts' parameters (`target_parameters`; scaled by 4, else its random factors barely move the logits)."""
    from peft import LoraConfig

    base = mxfp4_base(artefacts)
    if experts:
        config = LoraConfig(target_modules=["q_proj"], target_parameters=[f"mlp.experts.{p}" for p in EXPERTS],
                            lora_alpha=32, init_lora_weights=False)
    else:
        config = LoraConfig(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return artefacts.get(("gpt-oss-adapter", experts),
                         lambda d: make_adapter(base, d, config, model=load_mxfp4(base, torch.float32)))


def input_ids() -> torch.Tensor:
    return torch.randint(0, GPT_OSS["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(0))


def assert_logits_match_peft(base: Path, adapter: Path, out: Path) -> tuple[torch.Tensor, float]:
    """OUT's logits are those of the MXFP4 base + adapter unmerged in PEFT, in fp32, within the 16-bit
    rounding of the merged weights, and much closer than the base alone (as test_quantized_bases (b)).
    Returns PEFT's logits and OUT's distance to them."""
    from peft import PeftModel

    ids = input_ids()
    want = logits(PeftModel.from_pretrained(load_mxfp4(base, torch.float32), adapter).eval(), ids)
    base_logits = logits(load_mxfp4(base, torch.float32), ids)
    got = logits(load_model(out, torch.float32), ids)
    scale = want.abs().max().item()
    err, base_err = (got - want).abs().max().item(), (base_logits - want).abs().max().item()
    tol = LOGIT_RTOL[torch.bfloat16] * scale
    assert err <= tol, f"max |OUT - PEFT| = {err:.3g} > {tol:.3g} (logit scale {scale:.3g})"
    assert base_err > 2 * tol, f"the adapter barely moves the logits ({base_err:.3g}): the test proves nothing"
    assert base_err > EFFECT_RATIO * err, f"OUT ({err:.3g}) is not much closer to PEFT than the base ({base_err:.3g})"
    return want, err


# --- 2. merging into an MXFP4 base --------------------------------------------------------------------

@pytest.fixture(scope="module", params=["rows", "whole"] + [d for d in MERGE_DEVICES if d != "cpu"])
def merged(request, artefacts, tmp_path_factory) -> Path:
    """The attention adapter merged into the MXFP4 base, the experts decoded by the numpy path a block of
    rows at a time, or (`whole`) by the torch path, the whole tensor at once, or on a GPU where there is one."""
    from lorafuse.compute import tensors

    base, adapter = mxfp4_base(artefacts), mxfp4_adapter(artefacts)
    out = tmp_path_factory.mktemp(f"mxfp4-{request.param}") / "merged"
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "whole":
            patch.setattr(tensors, "in_rows", lambda tensor, device: False)
        lorafuse.merge(base, adapter, out, device="cpu" if request.param in ("rows", "whole") else request.param)
    return out


def test_plan_reads_the_experts_as_mxfp4(artefacts):
    """The plan sees each expert parameter as one MXFP4 weight, under transformers' name and in its
    (E, H, 2I) / (E, I, H) shape and the config's dtype, made of its blocks and scales; every other tensor
    is a plain one; it says the base is dequantized, and its config has no quantization_config."""
    base, adapter = mxfp4_base(artefacts), mxfp4_adapter(artefacts)
    plan = lorafuse.plan(base, adapter)
    hidden, inter, experts = GPT_OSS["hidden_size"], GPT_OSS["intermediate_size"], GPT_OSS["num_local_experts"]
    shapes = {"gate_up_proj": (experts, hidden, 2 * inter), "down_proj": (experts, inter, hidden)}
    quantized = {t.name: t for t in plan.tensors if isinstance(t.source, QuantizedTensor)}
    assert set(quantized) == {f"model.layers.{i}.mlp.experts.{p}" for i in range(GPT_OSS["num_hidden_layers"])
                              for p in EXPERTS}
    for name, t in quantized.items():
        assert t.source.method == "mxfp4" and t.dtype == "BF16" and t.source.dtype == "BF16"
        assert t.shape == t.source.shape == shapes[name.rsplit(".", 1)[1]]
        assert t.source.keys == [name + "_blocks", name + "_scales"]
    assert not any(t.name.endswith(("_blocks", "_scales")) for t in plan.tensors)
    assert any("quantized (mxfp4)" in note and "dequantiz" in note for note in plan.notes), plan.notes
    assert "quantization_config" not in plan.config


def test_planning_an_mxfp4_base_needs_no_torch(artefacts):
    """Claiming the experts reads only the checkpoint's header: `lorafuse plan` never imports torch."""
    base, adapter = mxfp4_base(artefacts), mxfp4_adapter(artefacts)
    code = ("import sys; from lorafuse.cli import main; "
            f"code = main(['plan', {str(base)!r}, {str(adapter)!r}]); sys.exit(code or 10 * ('torch' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "quantized (mxfp4): its weights are dequantized" in done.stdout, done.stdout


def test_output_is_the_dequantized_model_plus_the_adapter(merged, artefacts):
    """OUT is what transformers saves of the dequantized model, the adapter merged: the same tensor names
    and shapes as the unquantized gpt-oss, all bf16; the experts byte for byte transformers' dequantized
    parameters (bf16, as the config says); no quantization_config, nor anything else about MXFP4; and
    transformers loads it as a plain model, no key missing or unexpected."""
    base = mxfp4_base(artefacts)
    got, plain = read_tensors(merged), read_tensors(gpt_oss_base(artefacts))
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in plain.items()}
    assert {t.dtype for t in got.values()} == {torch.bfloat16}
    oracle = load_mxfp4(base)
    assert oracle.dtype == torch.bfloat16
    checked = 0
    for name, param in oracle.state_dict().items():
        if name.endswith(tuple(f"mlp.experts.{p}" for p in EXPERTS)):
            assert same_bytes(got[name], param), f"{name} is not transformers' dequantization"
            checked += 1
    assert checked == 2 * GPT_OSS["num_hidden_layers"]
    stored = read_tensors(base)
    for name in ("model.layers.0.mlp.experts.gate_up_proj_bias", "model.layers.1.self_attn.k_proj.weight"):
        assert same_bytes(got[name], stored[name]), f"{name} is not copied unchanged"
    config = read_config(merged)
    assert "quantization_config" not in config and "mxfp4" not in json.dumps(config).lower()
    assert config["dtype"] == "bfloat16"
    model, info = load_model(merged, torch.float32, info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def test_logits_match_peft_on_the_mxfp4_base(merged, artefacts):
    """OUT computes what the MXFP4 base (dequantized by transformers) + the adapter compute in PEFT."""
    assert_logits_match_peft(mxfp4_base(artefacts), mxfp4_adapter(artefacts), merged)


def test_verify_recomputes_every_merged_tensor(merged, artefacts):
    """verify dequantizes the base as the merge does and agrees with OUT."""
    from lorafuse.tools.verify import verify

    base, adapter = mxfp4_base(artefacts), mxfp4_adapter(artefacts)
    assert verify(merged, base, adapter, sample=len(lorafuse.plan(base, adapter).merged)) == []


def test_the_numpy_path_decodes_one_expert_a_block(artefacts, tmp_path, monkeypatch):
    """With blocks of one row, the numpy path decodes an expert a block (the (E, C, R) tensor is an (E, C·R)
    matrix to it): each expert tensor's fp32 block holds one expert, no fp32 copy of a whole tensor is
    made, everything it takes stays within its planned work_bytes, and OUT is the bytes of the default
    blocks."""
    from lorafuse import costs
    from lorafuse.compute import rows

    base, adapter = mxfp4_base(artefacts), mxfp4_adapter(artefacts)
    monkeypatch.setattr(costs, "BLOCK_VALUES", 1)
    taken: dict[str, dict[str, int]] = {}
    current = threading.local()
    real_get, real_output_bytes = rows.Buffers.get, rows.Producer.output_bytes

    def get(self, role, nbytes):
        mine = taken[current.name]
        mine[role] = max(mine.get(role, 0), nbytes)
        return real_get(self, role, nbytes)

    def output_bytes(self, tensor, *args):
        current.name, taken[tensor.name] = tensor.name, {}
        return real_output_bytes(self, tensor, *args)

    monkeypatch.setattr(rows.Buffers, "get", get)
    monkeypatch.setattr(rows.Producer, "output_bytes", output_bytes)
    lorafuse.merge(base, adapter, tmp_path / "out")
    plan = {t.name: t for t in lorafuse.plan(base, adapter).tensors}
    monkeypatch.undo()

    experts = [name for name, t in plan.items() if isinstance(t.source, QuantizedTensor)]
    assert experts and set(experts) <= set(taken)
    for name in experts:
        one_expert = 4 * plan[name].shape[1] * plan[name].shape[2]
        assert taken[name]["block"] == one_expert and "fp32" not in taken[name], (name, taken[name])
        assert any(role.startswith("stored:") for role in taken[name])
    for name, mine in taken.items():
        assert sum(mine.values()) <= plan[name].work_bytes, f"{name} took {mine}, planned {plan[name].work_bytes}"
    lorafuse.merge(base, adapter, tmp_path / "default")
    blocks, default = read_tensors(tmp_path / "out"), read_tensors(tmp_path / "default")
    assert blocks.keys() == default.keys() and all(same_bytes(blocks[k], default[k]) for k in blocks)


# --- 3. malformed checkpoints -------------------------------------------------------------------------

BROKEN = {
    "scales-missing": lambda t: t.pop("model.layers.1.mlp.experts.down_proj_scales"),
    "blocks-missing": lambda t: t.pop("model.layers.0.mlp.experts.gate_up_proj_blocks"),
    "blocks-of-8-bytes": lambda t: t.update({"model.layers.0.mlp.experts.gate_up_proj_blocks":
                                             t["model.layers.0.mlp.experts.gate_up_proj_blocks"].reshape(4, 192, 4, 8)}),
    "scales-of-another-shape": lambda t: t.update({"model.layers.1.mlp.experts.down_proj_scales":
                                                   t["model.layers.1.mlp.experts.down_proj_scales"][:, :32].contiguous()}),
}


@pytest.mark.parametrize("damage", BROKEN)
def test_a_malformed_mxfp4_checkpoint_is_a_one_line_error(damage, artefacts, tmp_path, capsys):
    """Blocks without scales (or the reverse), blocks not of 16 bytes, scales not matching the blocks: the
    merge raises a one-line LorafuseError naming the tensor, the command exits with code 2 saying so on
    one line, and nothing is written: no OUT, no staging folder, the inputs unchanged."""
    from safetensors.torch import save_file

    from lorafuse.cli import main

    base = tmp_path / "base"
    shutil.copytree(mxfp4_base(artefacts), base)
    tensors = read_tensors(base)
    BROKEN[damage](tensors)
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    adapter, out = mxfp4_adapter(artefacts), tmp_path / "out"
    before = {p: tree_hash(p) for p in (base, adapter)}
    with pytest.raises(lorafuse.LorafuseError, match="MXFP4") as info:
        lorafuse.merge(base, adapter, out)
    assert "\n" not in str(info.value) and "mlp.experts." in str(info.value)
    capsys.readouterr()
    assert main(["merge", str(base), str(adapter), str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lorafuse: error: ") and "MXFP4" in err[0], err
    assert not out.exists() and leftovers(tmp_path) == []
    assert {p: tree_hash(p) for p in (base, adapter)} == before


# --- 4. an adapter on the experts ---------------------------------------------------------------------

def test_an_adapter_on_the_experts_merges_to_peft_logits(artefacts, tmp_path):
    """A LoRA on the experts' parameters (PEFT target_parameters, as for gpt-oss fine-tunes) and q_proj,
    made on the MXFP4 model as transformers loads it, merges into the MXFP4 base, and OUT's logits are
    PEFT's on the dequantized base; and the experts' deltas are what brings them there: OUT with its experts
    put back to the dequantized base's is >= 10x farther from PEFT."""
    base, adapter = mxfp4_base(artefacts), mxfp4_adapter(artefacts, experts=True)
    lorafuse.merge(base, adapter, tmp_path / "out")
    want, err = assert_logits_match_peft(base, adapter, tmp_path / "out")
    model, dequantized = load_model(tmp_path / "out", torch.float32), load_mxfp4(base, torch.float32).state_dict()
    experts = [name for name in dequantized if name.endswith(tuple(f"mlp.experts.{p}" for p in EXPERTS))]
    assert len(experts) == 2 * GPT_OSS["num_hidden_layers"]
    with torch.no_grad():
        for name in experts:
            model.get_parameter(name).copy_(dequantized[name])
    without = (logits(model, input_ids()) - want).abs().max().item()
    assert without > EFFECT_RATIO * err, f"the experts' deltas ({without:.3g}) barely matter beside OUT's error ({err:.3g})"
