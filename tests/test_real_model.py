"""End to end on a real model: SmolLM2-135M-Instruct plus a trained LoRA, merged by lorafuse,
must load cleanly in transformers and behave like the same adapter applied by PEFT."""

import contextlib
import json
import logging
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("gguf")  # to build the fixture from the GGUF on PyPI

from peft import PeftModel  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from lorafuse import merge  # noqa: E402
from realmodel import LORA_TARGETS, chat_ids, smollm2_adapter, smollm2_dir  # noqa: E402

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "How many legs does a spider have?"]
NEW_TOKENS = 20
CARRIED = ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Fixture model, adapter and the default (bf16) merge, built once for the whole module."""
    base = smollm2_dir()
    work = tmp_path_factory.mktemp("realmodel")
    adapter = smollm2_adapter(base, work / "adapter")
    report = merge(base, adapter, work / "merged")
    return SimpleNamespace(base=base, adapter=adapter, work=work, out=work / "merged", report=report)


@pytest.fixture(scope="module")
def peft_ref(dirs):
    """Unmerged PEFT, its greedy continuations of PROMPTS, and how far the base model is from it."""
    tok = AutoTokenizer.from_pretrained(dirs.base)
    peft = load_peft(dirs.base, dirs.adapter)
    want = greedy(peft, tok)
    effect = max_diff(load(dirs.base), peft, want)
    assert effect > 1.0  # the adapter really changes the model, or nothing below would prove anything
    return SimpleNamespace(tok=tok, model=peft, want=want, effect=effect)


def tensor_names(folder):
    names = set()
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            names |= set(st.keys())
    return names


@contextlib.contextmanager
def transformers_warnings():
    """Collect transformers' log messages: its logger does not propagate, so caplog sees nothing."""
    messages = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: messages.append(record.getMessage())
    log = logging.getLogger("transformers")
    level = log.level
    log.addHandler(handler)
    log.setLevel(min(level or logging.WARNING, logging.WARNING))
    try:
        yield messages
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def load(folder):
    """Every comparison runs in float32, so only the stored weights differ between models."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def load_peft(base, adapter):
    """The reference: base + adapter, unmerged, as PEFT runs it (W x + s B A x)."""
    return PeftModel.from_pretrained(load(base), adapter).eval()


def greedy(model, tok):
    """Prompt + NEW_TOKENS greedy tokens for each of PROMPTS."""
    return [model.generate(**chat_ids(tok, p), max_new_tokens=NEW_TOKENS, do_sample=False) for p in PROMPTS]


def assert_same_tokens(got, want, tok):
    for g, w in zip(got, want):
        assert g.tolist() == w.tolist(), (tok.decode(g[0]), tok.decode(w[0]))


@torch.no_grad()
def max_diff(a, b, seqs):
    """Largest |logit difference| between two models over every position of `seqs`."""
    return max((a(s).logits - b(s).logits).abs().max().item() for s in seqs)


def test_report(dirs):
    base, report = dirs.base, dirs.report
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    assert report.tensors_merged == layers * len(LORA_TARGETS)  # every LoRA'd linear, nothing else
    copied = report.tensors_copied + getattr(report, "tensors_cast", 0)
    assert report.tensors_merged + copied == len(tensor_names(base))
    assert report.bytes_written > 0 and report.seconds > 0


def test_same_tensors_and_tied_embeddings(dirs):
    """SmolLM2 ties lm_head to embed_tokens; the merge must not untie it or add lm_head.weight."""
    base, out = dirs.base, dirs.out
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    names = tensor_names(out)
    assert "lm_head.weight" not in names
    assert names == tensor_names(base)  # and no lora_A / lora_B leaked through


def test_loads_without_key_warnings(dirs):
    out = dirs.out
    with transformers_warnings() as messages:
        model, info = AutoModelForCausalLM.from_pretrained(out, dtype="auto", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    # transformers 5 logs a "LOAD REPORT" table; transformers 4 logs "Some weights ... were not used/initialized".
    suspicious = ("load report", "missing", "unexpected", "not used", "newly initialized", "mismatch")
    assert not [m for m in messages if any(s in m.lower() for s in suspicious)], messages
    assert model.dtype == torch.bfloat16
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_tokenizer_and_chat_template_carried(dirs):
    base, out = dirs.base, dirs.out
    for name in CARRIED:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    ids = chat_ids(AutoTokenizer.from_pretrained(out), PROMPTS[0])["input_ids"]
    assert ids.tolist() == chat_ids(AutoTokenizer.from_pretrained(base), PROMPTS[0])["input_ids"].tolist()


def test_fp32_merge_generates_like_peft(dirs, peft_ref):
    """Merged to float32, lorafuse's W + s B A differs from PEFT's W x + s B A x only in summation
    order: measured 1.4e-4 max over ~100k logits of magnitude up to ~40. 2e-3 leaves >10x headroom for
    other CPUs/BLAS, and is still ~10x below the smallest top-1/top-2 gap on these greedy paths (~0.02),
    so the tokens must match exactly."""
    base, adapter, out = dirs.base, dirs.adapter, dirs.work / "merged-fp32"
    merge(base, adapter, out, dtype="float32")
    merged, tok, want = load(out), peft_ref.tok, peft_ref.want
    assert_same_tokens(greedy(merged, tok), want, tok)
    err = max_diff(merged, peft_ref.model, want)
    print(f"\nfp32 merge: max |logit diff| vs PEFT {err:.2e}; base model vs PEFT {peft_ref.effect:.2f}")
    assert err < 2e-3


def test_bf16_merge_is_peft_merge_rounded(dirs, peft_ref):
    """The default output is bf16, so each weight is round(W + s B A): that rounding moves logits by
    up to ~1 here, far more than the ~0.02 gaps between competing tokens, so greedy text can and does
    drift from unmerged PEFT (it did for 2 of 4 prompts we tried, for PEFT's own merge as well). The right reference is
    PEFT's own float32 merge_and_unload rounded to bf16 once: lorafuse must match it weight for weight
    (to 1 ulp, for summation order), token for token, and be no further from unmerged PEFT than it is;
    and the adapter's effect must dwarf that rounding, or this test would prove nothing."""
    base, adapter, out = dirs.base, dirs.adapter, dirs.out
    merged, tok, want = load(out), peft_ref.tok, peft_ref.want
    ideal = load_peft(base, adapter).merge_and_unload()
    for p in ideal.parameters():
        p.data = p.data.to(torch.bfloat16).float()

    ideal_sd = ideal.state_dict()
    for f in out.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for name in st.keys():  # bf16 keeps 8 significant bits: one ulp is at most 2**-7 relative
                got, ref = st.get_tensor(name), ideal_sd[name]
                torch.testing.assert_close(got.float(), ref, rtol=2**-7, atol=1e-6, msg=name)

    assert_same_tokens(greedy(merged, tok), greedy(ideal, tok), tok)
    err, floor = max_diff(merged, peft_ref.model, want), max_diff(ideal, peft_ref.model, want)
    print(f"\nbf16 merge: max |logit diff| vs PEFT {err:.3f}, bf16 floor {floor:.3f}, base model {peft_ref.effect:.2f}")
    assert err <= 1.5 * floor + 1e-3
    assert peft_ref.effect > 10 * err
