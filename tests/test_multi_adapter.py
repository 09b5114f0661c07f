"""Several adapters merged in one pass (#20): OUT = W + Σ wᵢ·sᵢ·Bᵢ@Aᵢ, in fp32, rounded once.

The oracle is PEFT. Its `add_weighted_adapter(adapters, weights, "combined", combination_type="cat")` builds
one adapter whose delta is that sum (lora_A rows scaled by wᵢ·sᵢ, stacked; lora_B columns stacked), so for
LoRA on linear layers and embeddings we check, on tiny Llamas in fp32 and bf16 with two and three adapters
(different targets, ranks, a rank pattern, rsLoRA, embeddings; weights like 0.7 and -0.3):

  (a) OUT's logits equal the unmerged PEFT model with the combined adapter active;
  (b) per tensor, OUT is within half an ulp of the combined adapter's merge_and_unload in float64 (and no
      further from it than PEFT's merge in the file dtype), and every tensor it leaves alone is the base's;
  (c) `lorafuse verify`, with the same adapters, recomputes every merged tensor.

PEFT's add_weighted_adapter gets some variants wrong (huggingface/peft#3449, #3761): the combined adapter
takes the first adapter's config, so an rsLoRA adapter first scales the sum by √(total rank), and lora_B
biases, DoRA magnitudes and modules_to_save copies are left out. So no rsLoRA adapter comes first below, and
lora_bias, expert LoRA (target_parameters, which add_weighted_adapter refuses) and a saved tensor are checked
against PEFT's own forward and merge with every adapter active at once, each adapter's scaling multiplied by
its weight: the same weighted sum, as PEFT computes it. Then the refusals (one line, exit 2, nothing
written), the plan, and resume and verify telling adapter sets apart.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import pytest
import torch

import lorafuse
from conftest import (MERGE_DEVICES, TORCH_DTYPES, build_model, check_logits, device_suffix, leftovers, load_model,
                      logits, make_adapter, read_tensors, same_bytes, tree_hash)
from lorafuse.cli import main
from test_merge_vs_peft import HALF_ULP, LOGIT_RTOL, TENSOR_SLACK, input_ids, lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# LoraConfig kwargs of the adapters, by name; every one is trained on the fp32 tiny model its `MODELS` entry names.
ADAPTERS = {
    "qv": lora(target_modules=["q_proj", "v_proj"]),
    "rs": lora(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 6}),
    "emb": lora(r=2, lora_alpha=4, target_modules=["embed_tokens", "o_proj", "gate_proj"]),
    "emb_too": lora(r=4, lora_alpha=4, target_modules=["embed_tokens", "k_proj"]),
    "emb_other_base": lora(r=4, lora_alpha=4, target_modules=["embed_tokens"]),
    "dora": lora(target_modules=["q_proj"], use_dora=True),
    "save_head": lora(target_modules=["q_proj"], modules_to_save=["lm_head"]),
    "save_head_too": lora(r=2, target_modules=["k_proj"], modules_to_save=["lm_head"]),
    "head": lora(r=4, target_modules=["v_proj", "lm_head"]),
    "other_base": lora(target_modules=["q_proj"]),
    "bias": lora(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"], lora_bias=True),
    "qo": lora(r=2, lora_alpha=8, target_modules=["q_proj", "o_proj"]),
}
MODELS = {"other_base": "llama_wide", "bias": "qwen2", "qo": "qwen2"}


def get_adapter(artefacts, tiny_base, name: str) -> Path:
    """PEFT's adapter `name`; "emb_other_base" is trained on a Llama like the others but for its weights (another
    seed), so the embedding it saves with its LoRA is another."""
    from peft import LoraConfig

    def build(folder: Path) -> Path:
        model = build_model("llama", seed=7) if name == "emb_other_base" else None
        return make_adapter(tiny_base(MODELS.get(name, "llama")), folder, LoraConfig(**ADAPTERS[name]),
                            seed=list(ADAPTERS).index(name) + 1, model=model)

    return artefacts.get(("multi", name), build)


def peft_model(base: Path, adapters: list[Path], dtype: torch.dtype):
    """The base with every adapter loaded into PEFT, named a0, a1, ..."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, dtype), adapters[0], adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(adapter, adapter_name=f"a{i}")
    return model


def peft_combined(base: Path, adapters: list[Path], weights: list[float], dtype: torch.dtype, merge: bool = False):
    """(a)/(b)'s oracle: add_weighted_adapter(..., combination_type="cat") set active, unmerged or merged."""
    model = peft_model(base, adapters, dtype)
    names = [f"a{i}" for i in range(len(adapters))]
    model.add_weighted_adapter(names, weights, "combined", combination_type="cat")
    model.set_adapter("combined")
    model.eval()
    return model.merge_and_unload(adapter_names=["combined"]) if merge else model


def peft_all_active(base: Path, adapters: list[Path], weights: list[float], dtype: torch.dtype, merge: bool = False):
    """PEFT's forward (or merge) with every adapter active, each one's scaling times its weight: Σ wᵢ·ΔWᵢ by
    PEFT's own layers, for what add_weighted_adapter does not combine (lora_B biases, expert LoRA, a saved
    tensor next to another adapter's LoRA)."""
    from peft.tuners.lora import LoraLayer

    model = peft_model(base, adapters, dtype)
    names = [f"a{i}" for i in range(len(adapters))]
    model.base_model.set_adapter(names)
    for module in model.modules():
        if isinstance(module, LoraLayer):
            for name, weight in zip(names, weights):
                if name in module.scaling:
                    module.scaling[name] *= weight
    model.eval()
    return model.merge_and_unload(adapter_names=names) if merge else model


def check_tensors(out: dict, base: dict, exact: dict, peft: dict, dtype: str) -> set[str]:
    """As test_merge_vs_peft's (c): each tensor the float64 merge changes is within half an ulp of it and no
    further than PEFT's merge in the file dtype; every other tensor is the base's, byte for byte. Returns the
    names of the changed tensors."""
    assert out.keys() == base.keys()
    failures, changed = [], set()
    for name, got in out.items():
        truth = exact[name]
        if torch.equal(truth, base[name].double()):
            if not same_bytes(got, base[name]):
                failures.append(f"{name}: untouched by the adapters but not byte-identical to the base")
            continue
        changed.add(name)
        size = truth.abs().max().item()
        err, peft_err = (got.double() - truth).abs().max().item(), (peft[name].double() - truth).abs().max().item()
        if err > peft_err + TENSOR_SLACK * size or err > (HALF_ULP[dtype] + TENSOR_SLACK) * size:
            failures.append(f"{name}: lorafuse {err:.3g}, PEFT {peft_err:.3g}, max|W| {size:.3g}")
    assert not failures, "\n".join(failures)
    return changed


def cli_merge(base: Path, adapters: list[Path], out: Path, weights: list[float] | None, *extra) -> None:
    argv = ["merge", base, *adapters, out, *(["--weights=" + ",".join(map(str, weights))] if weights else []),
            "--quiet", *extra]
    assert main([str(a) for a in argv]) == 0


# --- the oracle matrix: LoRA combinations against add_weighted_adapter "cat" ----------------------------------

COMBOS = {  # adapters (never an rsLoRA one first: see the module docstring), weights (None: 1 each)
    "two": (["qv", "rs"], [0.7, -0.3]),
    "three-default-weights": (["emb", "qv", "emb_too"], None),  # both save the embedding they were trained on
    "three": (["emb", "rs", "qv"], [0.5, 1.25, -0.3]),
}
CASES = [(combo, dtype, device) for combo in COMBOS for dtype in ("fp32", "bf16") for device in MERGE_DEVICES]


@dataclass
class Case:
    combo: str
    dtype: str
    base: Path
    adapters: list[Path]
    weights: list[float] | None
    out: Path

    @property
    def oracle_weights(self) -> list[float]:
        return self.weights or [1.0] * len(self.adapters)

    @cached_property
    def plan(self):
        return lorafuse.plan(self.base, self.adapters, weights=self.weights)

    @cached_property
    def exact(self) -> dict:
        return peft_combined(self.base, self.adapters, self.oracle_weights, torch.float64, merge=True).state_dict()

    @cached_property
    def peft_merged(self) -> dict:
        model = peft_combined(self.base, self.adapters, self.oracle_weights, TORCH_DTYPES[self.dtype], merge=True)
        return model.state_dict()


@pytest.fixture(scope="module", params=CASES, ids=[f"{c}-{d}{device_suffix(dev)}" for c, d, dev in CASES])
def case(request, tiny_base, artefacts, tmp_path_factory) -> Case:
    """The merge, run from the command line: BASE ADAPTER1 ADAPTER2 ... OUT --weights W1,W2,..."""
    combo, dtype, device = request.param
    names, weights = COMBOS[combo]
    base, adapters = tiny_base("llama", dtype), [get_adapter(artefacts, tiny_base, n) for n in names]
    out = tmp_path_factory.mktemp(f"multi-{combo}-{dtype}{device_suffix(device)}") / "merged"
    cli_merge(base, adapters, out, weights, "--device", device)
    return Case(combo, dtype, base, adapters, weights, out)


def test_logits_match_peft_combined_adapter(case):
    """(a) OUT computes what PEFT's unmerged model computes with the combined ("cat") adapter active."""
    ids = input_ids(128)
    want = logits(peft_combined(case.base, case.adapters, case.oracle_weights, torch.float32), ids)
    check_logits(want, logits(load_model(case.out), ids), logits(load_model(case.base), ids), LOGIT_RTOL[case.dtype])


def test_tensors_match_peft_merge_of_combined_adapter(case):
    """(b) Per tensor against the combined adapter's merge_and_unload in float64, and exactly the tensors some
    adapter targets are changed: every adapter's delta is in."""
    changed = check_tensors(read_tensors(case.out), read_tensors(case.base), case.exact, case.peft_merged, case.dtype)
    assert changed == {t.name for t in case.plan.merged}
    for index, adapter in enumerate(case.plan.adapters):
        used = {o for t in case.plan.merged for p in t.patches if p.adapter == index for o in p.origins}
        assert used == set(adapter.tensors), f"adapter {index} has tensors the merge did not use"


def test_verify_recomputes_every_merged_tensor_with_the_same_adapters(case):
    """(c) verify's own float64 formulas, with the adapters and the manifest's weights, agree with every tensor."""
    from lorafuse.tools.verify import verify

    assert verify(case.out, case.base, case.adapters, sample="all") == []


# --- what add_weighted_adapter does not combine: PEFT with every adapter active -------------------------------

def test_lora_bias_adds_each_adapters_weighted_bias(tiny_base, artefacts, tmp_path):
    """lora_bias: b + Σ wᵢ·sᵢ·biasᵢ, as PEFT's forward and merge with both adapters active (on Qwen2, whose q, k, v
    have biases); the second adapter changes q_proj too."""
    base = tiny_base("qwen2")
    adapters, weights = [get_adapter(artefacts, tiny_base, n) for n in ("bias", "qo")], [0.6, -1.4]
    lorafuse.merge(base, adapters, tmp_path / "out", weights=weights)
    ids = input_ids(128)
    want = logits(peft_all_active(base, adapters, weights, torch.float32), ids)
    check_logits(want, logits(load_model(tmp_path / "out"), ids), logits(load_model(base), ids), LOGIT_RTOL["fp32"])
    exact = peft_all_active(base, adapters, weights, torch.float64, merge=True).state_dict()
    peft = peft_all_active(base, adapters, weights, torch.float32, merge=True).state_dict()
    changed = check_tensors(read_tensors(tmp_path / "out"), read_tensors(base), exact, peft, "fp32")
    assert {n for n in changed if n.endswith(".bias")} == {f"model.layers.{i}.self_attn.{m}_proj.bias"
                                                           for i in range(2) for m in "qkv"}


def test_one_adapter_with_a_weight_scales_its_delta(tiny_base, artefacts, tmp_path, capsys):
    """--weights with one adapter: W + w·ΔW; the plan and the model card say so."""
    base, adapter = tiny_base("llama"), get_adapter(artefacts, tiny_base, "emb")
    code = main([str(a) for a in ("merge", base, adapter, tmp_path / "out", "--weights=-0.5")])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "weight -0.5: changes 5 base tensors: 5 lora" in err
    exact = peft_all_active(base, [adapter], [-0.5], torch.float64, merge=True).state_dict()
    peft = peft_all_active(base, [adapter], [-0.5], torch.float32, merge=True).state_dict()
    check_tensors(read_tensors(tmp_path / "out"), read_tensors(base), exact, peft, "fp32")
    assert "| weight | -0.5 |" in (tmp_path / "out" / "README.md").read_text()


def test_a_saved_tensor_of_one_adapter_with_another_adapters_lora(tiny_base, artefacts, tmp_path):
    """A tensor one adapter saves whole (modules_to_save) replaces the base's while another adapter's deltas go
    elsewhere: the model PEFT runs with both active (add_weighted_adapter would drop the saved head)."""
    base = tiny_base("llama", "bf16")
    adapters, weights = [get_adapter(artefacts, tiny_base, n) for n in ("save_head", "rs")], [1, 0.4]
    lorafuse.merge(base, adapters, tmp_path / "out", weights=weights)
    ids = input_ids(128)
    want = logits(peft_all_active(base, adapters, weights, torch.float32), ids)
    check_logits(want, logits(load_model(tmp_path / "out"), ids), logits(load_model(base), ids), LOGIT_RTOL["bf16"])
    exact = peft_all_active(base, adapters, weights, torch.float64, merge=True).state_dict()
    peft = peft_all_active(base, adapters, weights, torch.bfloat16, merge=True).state_dict()
    out = read_tensors(tmp_path / "out")
    assert "lm_head.weight" in check_tensors(out, read_tensors(base), exact, peft, "bf16")
    saved = read_tensors(adapters[0])["base_model.model.lm_head.weight"]  # as PEFT saves a modules_to_save copy
    assert torch.equal(out["lm_head.weight"], saved.to(torch.bfloat16))


def test_expert_loras_of_two_adapters(artefacts, tmp_path):
    """LoRA on MoE experts (target_parameters; add_weighted_adapter refuses them): Mixtral's fused experts, stored
    per expert, get both adapters' weighted deltas, as PEFT's ParamWrappers with both adapters active."""
    from peft import LoraConfig

    from test_any_model_moe import BOTH, input_ids as moe_ids, lora as moe_lora, moe_base, saved_merge

    base = moe_base(artefacts, "mixtral")
    # PEFT loads several target_parameters adapters only when they target the same parameters
    configs = [moe_lora(target_parameters=BOTH, target_modules=["q_proj"]),
               moe_lora(r=2, use_rslora=True, target_parameters=BOTH, target_modules=["o_proj"])]
    adapters = [artefacts.get(("multi-moe", i), lambda d, c=c, i=i: make_adapter(base, d, LoraConfig(**c), seed=i + 1))
                for i, c in enumerate(configs)]
    weights = [0.8, -1.5]
    lorafuse.merge(base, adapters, tmp_path / "out", weights=weights)
    ids = moe_ids()
    want = logits(peft_all_active(base, adapters, weights, torch.float32), ids)
    check_logits(want, logits(load_model(tmp_path / "out"), ids), logits(load_model(base), ids), LOGIT_RTOL["fp32"])
    exact = saved_merge(peft_all_active(base, adapters, weights, torch.float64, merge=True), tmp_path / "exact")
    peft = saved_merge(peft_all_active(base, adapters, weights, torch.float32, merge=True), tmp_path / "peft")
    changed = check_tensors(read_tensors(tmp_path / "out"), read_tensors(base), exact, peft, "fp32")
    assert sum(".experts." in n for n in changed) == 2 * 4 * 3  # w1, w2, w3 of both layers' 4 experts


# --- refusals: one line, exit 2, nothing written -----------------------------------------------------------------

REFUSALS = {  # id: (adapters, --weights, what the message says, {adapter name} standing for its folder)
    "too-few-weights": (["qv", "rs"], "1", ["1 weight(s) for 2 adapter(s)"]),
    "too-many-weights": (["qv", "rs"], "1,2,3", ["--weights lists 3 weights", "got 4 paths"]),
    "nan-weight": (["qv", "rs"], "1,nan", ["adapter weight nan is not a finite number"]),
    "inf-weight": (["qv", "rs"], "-inf,1", ["adapter weight -inf is not a finite number"]),
    "not-a-number": (["qv", "rs"], "1,x", ["--weights '1,x' is not a list of numbers"]),
    "other-base": (["qv", "other_base"], None, ["adapter {other_base}: ", "different base model"]),
    "dora-with-another": (["qv", "dora"], None, ["adapter {dora} is DoRA", "add_weighted_adapter"]),
    "dora-weighted": (["dora"], "0.5", ["adapter {dora} is DoRA", "weight other than 1"]),
    "saved-and-changed": (["save_head", "head"], None, ["adapter {save_head} replaces lm_head.weight",
                                                        "adapter {head} changes it"]),
    "saved-twice": (["save_head", "save_head_too"], None, ["adapter {save_head} replaces lm_head.weight",
                                                            "adapter {save_head_too} replaces it too"]),
    "saved-weighted": (["save_head"], "0.5", ["adapter {save_head} replaces lm_head.weight",
                                              "give it weight 1, not 0.5"]),
    "other-saved-base": (["emb", "emb_other_base"], None, ["adapters {emb} and {emb_other_base} save different base "
                                                          "weights for model.embed_tokens.weight"]),
}


@pytest.mark.parametrize("refusal", REFUSALS, ids=list(REFUSALS))
def test_refusals_are_one_line_and_write_nothing(refusal, tiny_base, artefacts, tmp_path, capsys):
    names, weights, named = REFUSALS[refusal]
    base, adapters = tiny_base("llama"), [get_adapter(artefacts, tiny_base, n) for n in names]
    before = [tree_hash(a) for a in adapters]
    out = tmp_path / "out"
    code = main([str(a) for a in ("merge", base, *adapters, out, *([f"--weights={weights}"] if weights else []))])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lorafuse: error: ") and "Traceback" not in err, err
    named = [n.format(**dict(zip(names, adapters))) for n in named]
    assert all(n in lines[0] for n in named), (named, lines[0])
    assert not out.exists() and leftovers(tmp_path) == []
    assert [tree_hash(a) for a in adapters] == before


def test_several_adapters_need_base(tiny_base, artefacts, tmp_path):
    adapters = [get_adapter(artefacts, tiny_base, n) for n in ("qv", "rs")]
    with pytest.raises(lorafuse.LorafuseError, match="with several adapters, name BASE"):
        lorafuse.merge(None, adapters, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- the plan ----------------------------------------------------------------------------------------------------

def test_plan_shows_each_adapter(tiny_base, artefacts, tmp_path, capsys):
    """A line per adapter (its weight and what it changes); --verbose says whose each patch is; --weights tells
    the adapters from OUT, and without it the last of BASE A1 A2 would be OUT, which is an adapter: refused."""
    base = tiny_base("llama")
    qv, rs = (get_adapter(artefacts, tiny_base, n) for n in ("qv", "rs"))
    assert main([str(a) for a in ("plan", base, qv, rs, "--weights=0.7,-0.3", "-v")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"adapter  (1) {qv}  (LoRA r=8 alpha=16, 8 tensors) weight 0.7: changes 4 base tensors: 4 lora" in lines
    assert f"adapter  (2) {rs}  (LoRA r=4 alpha=8 rsLoRA, 8 tensors) weight -0.3: changes 4 base tensors: 4 lora" in lines
    assert "changes  6 base tensors: 8 lora" in lines
    assert "  model.layers.0.self_attn.q_proj.weight: lora (1) + lora (2)" in lines
    assert "  model.layers.0.mlp.down_proj.weight: lora (2)" in lines

    assert main([str(a) for a in ("plan", base, qv, rs, tmp_path / "out", "--json")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["adapters"] == [{"adapter": str(qv), "weight": 1.0}, {"adapter": str(rs), "weight": 1.0}]
    assert plan["fits"] is True and not (tmp_path / "out").exists()

    assert main([str(a) for a in ("plan", base, qv, rs)]) == 2
    assert "give their weights (lorafuse plan BASE ADAPTER1 ADAPTER2 --weights 1,1)" in capsys.readouterr().err


# --- resume and verify tell adapter sets apart -------------------------------------------------------------------

def test_a_changed_weight_is_not_resumed_as_the_same_merge(tiny_base, artefacts, tmp_path):
    """An interrupted run of weights (0.7, -0.3) left a finished shard: rerun with those weights it is kept,
    with (0.7, -0.2) it is merged again (the fingerprint holds the weights)."""
    from lorafuse.manifest import LEDGER, file_digest, fingerprint, settings_record
    from lorafuse.output import MARKER, staging_folder

    base, adapters = tiny_base("llama"), [get_adapter(artefacts, tiny_base, n) for n in ("qv", "rs")]
    fresh = {}
    for weights in ([0.7, -0.3], [0.7, -0.2]):
        lorafuse.merge(base, adapters, tmp_path / str(weights), weights=weights)
        fresh[str(weights)] = read_tensors(tmp_path / str(weights))

    def interrupted(out: Path) -> None:
        """A staging folder holding the finished shard of the (0.7, -0.3) merge, and its ledger."""
        plan = lorafuse.plan(base, adapters, out, weights=[0.7, -0.3])
        staging = staging_folder(out)
        staging.mkdir()
        (staging / MARKER).write_bytes(b"")
        shard = staging / "model.safetensors"
        shutil.copy(tmp_path / str([0.7, -0.3]) / "model.safetensors", shard)
        record = {"size": shard.stat().st_size, "xxh3_128": file_digest(shard, "xxh3_128")}
        (staging / LEDGER).write_text(json.dumps({"fingerprint": fingerprint(plan, settings_record(plan, "cpu")),
                                                  "shards": {"model.safetensors": record}}))

    for weights, resumed in (([0.7, -0.3], 1), ([0.7, -0.2], 0)):
        out = tmp_path / f"rerun-{weights}"
        interrupted(out)
        report = lorafuse.merge(base, adapters, out, weights=weights)
        assert report.shards_resumed == resumed
        got = read_tensors(out)
        assert all(same_bytes(got[n], t) for n, t in fresh[str(weights)].items())


def test_verify_knows_the_adapter_set(tiny_base, artefacts, tmp_path, capsys):
    from lorafuse.manifest import MANIFEST
    from lorafuse.tools.verify import verify

    base, adapters = tiny_base("llama"), [get_adapter(artefacts, tiny_base, n) for n in ("qv", "rs")]
    out = tmp_path / "out"
    lorafuse.merge(base, adapters, out, weights=[0.7, -0.3])
    assert main(["verify", str(out), "--base", str(base), "--adapter", str(adapters[0]), "--adapter", str(adapters[1]),
                 "--sample", "all"]) == 0
    assert "6 of 6 merged tensors recomputed" in capsys.readouterr().out
    assert verify(out, base, adapters[::-1]) == [
        "--adapter is not the adapters the manifest records (its config or weight files differ); pass the ones OUT "
        "was merged from, in that order"]
    assert verify(out, base, adapters[0]) == [
        f"the manifest records 2 adapter(s) ({adapters[0]}, {adapters[1]}) but --adapter names 1: pass each with "
        "--adapter, in that order"]
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["settings"]["adapters"] == [str(a) for a in adapters]
    assert manifest["settings"]["weights"] == [0.7, -0.3]
    manifest["settings"]["weights"] = [0.7, -0.2]
    (out / MANIFEST).write_text(json.dumps(manifest))
    assert "README.md is not the model card this merge writes" in verify(out, base, adapters)


# --- GGUF: the same plan, written by llama.cpp's converter -------------------------------------------------------

@pytest.mark.slow
def test_gguf_of_several_adapters_equals_the_converter_run_on_their_safetensors_merge(tmp_path):
    """A .gguf OUT takes the adapter set too: SmolLM2 with its trained adapter and a random one on q and v,
    weighted, written in one pass, equals what llama.cpp's converter makes of the safetensors merge of the same
    set (tensor for tensor, byte for byte, provenance aside)."""
    from peft import LoraConfig

    from conftest import cached_smollm2_adapter
    from gguf_support import assert_same_gguf, fetch_llama_cpp, read_ggufs, smollm2_in_a_subprocess, start_convert

    llama_cpp = fetch_llama_cpp()
    base = smollm2_in_a_subprocess()
    other = make_adapter(base, tmp_path / "other", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False), seed=5)
    adapters, weights = [cached_smollm2_adapter(base, seed=0), other], [0.5, -0.25]
    lorafuse.merge(base, adapters, tmp_path / "merged", weights=weights)
    finish = start_convert(llama_cpp, tmp_path / "merged", tmp_path / "b.gguf", "q8_0")
    try:
        (tmp_path / "a").mkdir()
        lorafuse.merge(base, adapters, tmp_path / "a" / "b.gguf", weights=weights, gguf_type="q8_0", llama_cpp=llama_cpp)
    except BaseException:
        finish.stop()
        raise
    assert_same_gguf(*read_ggufs(llama_cpp, tmp_path / "a" / "b.gguf", finish()))
