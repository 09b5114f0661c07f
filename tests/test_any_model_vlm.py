"""lorafuse against the oracle on vision-language models and vision encoders, whose checkpoints are
not named like the modules an adapter is trained on.

transformers 5 renames weights when it loads a checkpoint and back when it saves one (its
conversion mapping): a Llava checkpoint holds `language_model.model.layers.*`, `vision_tower.*`,
`multi_modal_projector.*`, while the loaded model, and so every PEFT adapter trained on it, names them
`model.language_model.layers.*`, `model.vision_tower.*`, ... For each family below a tiny random model
is built by transformers, written as transformers writes it, and given a LoRA adapter made by PEFT
on the model loaded back (LoRA in the language model AND in the vision tower). Then:

  (a) lorafuse merges it; OUT keeps the checkpoint's layout (same tensor names, shapes, dtypes as
      the base) and loads with the same model class with no missing, unexpected or mismatched keys;
  (b) OUT computes what the unmerged PeftModel computes on real multimodal inputs (image tokens
      where the processor puts them, pixel values), in fp32, logits and vision-tower features both;
  (c) per tensor, PEFT's merge_and_unload written the same way has the same tensors as OUT, every
      merged tensor of OUT is at least as close to the float64 merge as PEFT's, the others are
      byte-identical to the base's;
  (d) the plan changes exactly the tensors PEFT's merge changes and, where the checkpoint's names
      are not the adapter's, says in a note that transformers' mapping was applied.

Besides the layouts transformers 5 writes, two older ones it still loads: a Llava checkpoint in the
in-memory layout (what transformers 4.52-4.57 wrote) and a CLIP vision encoder with the
`vision_model.` prefix (what transformers 4 wrote for CLIPVisionModel).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Callable

import pytest
import torch

import lorafuse
from conftest import TORCH_DTYPES, quiet, read_adapter, read_tensors, same_bytes
from test_merge_vs_peft import EFFECT_RATIO, HALF_ULP, LOGIT_RTOL, TENSOR_SLACK

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# Tiny language model (as conftest.TINY) and vision encoder: 16x16 images in 4x4 patches.
TEXT = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=16, patch_size=4)
IMAGE_TOKEN = 100  # image placeholder id; 101.. are the other special ids; text ids are drawn below 90
TEXT_IDS = 90
LORA = dict(r=8, lora_alpha=16, init_lora_weights=False)


# --- the families ----------------------------------------------------------------------------------

def llava_config():
    import transformers as tf

    # vision_feature_layer=-1: every layer of the tower reaches the logits (with -2, the default, the
    # last layer's LoRA would change nothing the oracle sees)
    return tf.LlavaConfig(text_config=tf.LlamaConfig(**TEXT).to_dict(),
                          vision_config=tf.CLIPVisionConfig(**VISION).to_dict(),
                          image_token_index=IMAGE_TOKEN, vision_feature_layer=-1,
                          vision_feature_select_strategy="default", tie_word_embeddings=False)


def qwen2_vl_config():
    import transformers as tf

    # head_dim 8: mrope_section covers its 4 rotary frequencies
    return tf.Qwen2VLConfig(
        text_config=dict(model_type="qwen2_vl_text", **TEXT,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, in_channels=3,
                           patch_size=4, temporal_patch_size=2, spatial_merge_size=2),
        image_token_id=IMAGE_TOKEN, video_token_id=101, vision_start_token_id=102, vision_end_token_id=103,
        tie_word_embeddings=False)


def gemma3_config():
    import transformers as tf

    # Gemma 3's SigLIP tower has no pooling head (vision_use_head=False), and its head is tied
    return tf.Gemma3Config(
        text_config=dict(model_type="gemma3_text", **TEXT, head_dim=8, sliding_window=8,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(model_type="siglip_vision_model", **VISION, vision_use_head=False),
        mm_tokens_per_image=4, image_token_index=IMAGE_TOKEN, boi_token_index=101, eoi_token_index=102)


def mistral3_config():
    import transformers as tf

    return tf.Mistral3Config(
        text_config=dict(model_type="mistral", **TEXT, head_dim=8),
        vision_config=dict(model_type="pixtral", **VISION, head_dim=8),
        image_token_index=IMAGE_TOKEN, spatial_merge_size=2, vision_feature_layer=-1, tie_word_embeddings=False)


def idefics3_config(kind: str):
    import transformers as tf

    config = tf.SmolVLMConfig if kind == "smolvlm" else tf.Idefics3Config
    return config(text_config=dict(model_type="llama", **TEXT), vision_config=dict(**VISION),
                  scale_factor=2, image_token_id=IMAGE_TOKEN)


def clip_config():
    import transformers as tf

    return tf.CLIPVisionConfig(**VISION)


def siglip_config():
    import transformers as tf

    return tf.SiglipVisionConfig(**VISION)


def _text(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, TEXT_IDS, (n,), generator=g).tolist()


def llava_inputs(config, g):
    """Llava's processor expands <image> to one token per patch (the CLS feature is dropped with the
    "default" strategy, kept with "full")."""
    v = config.vision_config
    n = (v.image_size // v.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
    ids = [_text(g, 5) + [config.image_token_id] * n + _text(g, 6), _text(g, 3) + [config.image_token_id] * n + _text(g, 8)]
    return dict(input_ids=torch.tensor(ids), pixel_values=torch.randn(2, 3, v.image_size, v.image_size, generator=g))


def qwen2_vl_inputs(config, g):
    """One image of 4x6 patches: the processor sends its flattened patches, its grid, and one token per
    spatial_merge_size**2 patches between <|vision_start|> and <|vision_end|>; mm_token_type_ids marks them."""
    v = config.vision_config
    t, h, w = 1, 4, 6
    n = t * h * w // v.spatial_merge_size ** 2
    ids = torch.tensor([_text(g, 4) + [config.vision_start_token_id] + [config.image_token_id] * n
                        + [config.vision_end_token_id] + _text(g, 6)])
    pixels = torch.randn(t * h * w, v.in_channels * v.temporal_patch_size * v.patch_size ** 2, generator=g)
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=torch.tensor([[t, h, w]]),
                mm_token_type_ids=(ids == config.image_token_id).long())


def gemma3_inputs(config, g):
    """<start_of_image>, mm_tokens_per_image image tokens, <end_of_image>; token_type_ids marks the
    image tokens (they attend to each other both ways)."""
    v = config.vision_config
    image = [config.boi_token_index] + [config.image_token_index] * config.mm_tokens_per_image + [config.eoi_token_index]
    ids = torch.tensor([_text(g, 4) + image + _text(g, 5)])
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, v.image_size, v.image_size, generator=g),
                token_type_ids=(ids == config.image_token_index).long())


def mistral3_inputs(config, g):
    """A 16x24 image: Pixtral's processor writes rows of (height/patch/merge) x (width/patch/merge)
    image tokens, each row ended by [IMG_BREAK] and the last by [IMG_END] (plain text ids here)."""
    v = config.vision_config
    height, width = 16, 24
    rows, cols = (s // v.patch_size // config.spatial_merge_size for s in (height, width))
    image = []
    for r in range(rows):
        image += [config.image_token_index] * cols + [101 if r < rows - 1 else 102]
    ids = torch.tensor([_text(g, 4) + image + _text(g, 5)])
    return dict(input_ids=ids, pixel_values=torch.randn(1, 3, height, width, generator=g),
                image_sizes=torch.tensor([[height, width]]))


def idefics3_inputs(config, g):
    """image_seq_len tokens per image: the patches, pixel-shuffled by scale_factor."""
    v = config.vision_config
    n = int((v.image_size // v.patch_size) ** 2 / config.scale_factor ** 2)
    ids = torch.tensor([_text(g, 4) + [config.image_token_id] * n + _text(g, 5)])
    return dict(input_ids=ids, pixel_values=torch.randn(1, 1, 3, v.image_size, v.image_size, generator=g))


def encoder_inputs(config, g):
    return dict(pixel_values=torch.randn(2, 3, config.image_size, config.image_size, generator=g))


def write_save_pretrained(model, folder: Path) -> None:
    """What transformers 5 writes: its conversion mapping reversed."""
    model.save_pretrained(folder)


def write_state_dict(prefix: str = "") -> Callable:
    """The model's in-memory names (each with `prefix` in front) written with safetensors, next to the
    config.json (and generation_config.json) save_pretrained writes."""
    def write(model, folder: Path) -> None:
        from safetensors.torch import save_file

        model.save_pretrained(folder)
        for path in folder.glob("model*.safetensors*"):
            path.unlink()
        save_file({prefix + k: v.contiguous() for k, v in model.state_dict().items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
    return write


@dataclass(frozen=True)
class Family:
    id: str
    model_class: str  # in transformers
    config: Callable
    targets: tuple[str, ...]  # LoRA target_modules: attention in both towers, a vision MLP, the projector
    inputs: Callable  # (config, generator) -> model inputs as the processor makes them
    vision: str  # the vision encoder's module path in the loaded model ("": the whole model)
    disk_text: str | None  # prefix of the language model's layers in the checkpoint
    disk_vision: str  # prefix of the vision encoder's layers in the checkpoint
    renamed: bool  # the checkpoint's names are not the loaded model's (nor so the adapter's)
    write: Callable = write_save_pretrained  # how the base, and the references, are written
    dtype: str = "fp32"  # of the base's tensors (the adapter is trained on them loaded in fp32)


FAMILIES = [
    Family("llava", "LlavaForConditionalGeneration", llava_config, ("q_proj", "v_proj", "fc1", "linear_1"),
           llava_inputs, "model.vision_tower", "language_model.model.layers.", "vision_tower.", True),
    Family("qwen2_vl", "Qwen2VLForConditionalGeneration", qwen2_vl_config, ("q_proj", "v_proj", "qkv", "fc1"),
           qwen2_vl_inputs, "model.visual", "model.layers.", "visual.blocks.", True),
    Family("gemma3", "Gemma3ForConditionalGeneration", gemma3_config, ("q_proj", "v_proj", "fc1"),
           gemma3_inputs, "model.vision_tower", "language_model.model.layers.", "vision_tower.", True),
    Family("mistral3", "Mistral3ForConditionalGeneration", mistral3_config,
           ("q_proj", "v_proj", "up_proj", "linear_1", "merging_layer"),
           mistral3_inputs, "model.vision_tower", "language_model.model.layers.", "vision_tower.transformer.", True),
    # Idefics3 and SmolVLM: transformers 5 maps nothing, the checkpoint holds the in-memory names
    Family("idefics3", "Idefics3ForConditionalGeneration", lambda: idefics3_config("idefics3"),
           ("q_proj", "v_proj", "fc1", "proj"), idefics3_inputs, "model.vision_model", "model.text_model.layers.",
           "model.vision_model.", False),
    Family("smolvlm", "SmolVLMForConditionalGeneration", lambda: idefics3_config("smolvlm"),
           ("q_proj", "v_proj", "fc1", "proj"), idefics3_inputs, "model.vision_model", "model.text_model.layers.",
           "model.vision_model.", False),
    # A vision encoder alone: transformers 5 saves its in-memory names (no `vision_model.` prefix)
    Family("clip_vision", "CLIPVisionModel", clip_config, ("q_proj", "v_proj", "fc1"), encoder_inputs,
           "", None, "encoder.layers.", False),
    Family("siglip_vision", "SiglipVisionModel", siglip_config, ("q_proj", "v_proj", "fc1"), encoder_inputs,
           "", None, "encoder.layers.", False),
    # Older layouts transformers 5 still loads: Llava's in-memory names as 4.52-4.57 wrote them, and
    # CLIPVisionModel with transformers 4's `vision_model.` prefix (mapped away when loading)
    Family("llava_in_memory_layout", "LlavaForConditionalGeneration", llava_config,
           ("q_proj", "v_proj", "fc1", "linear_1"), llava_inputs, "model.vision_tower",
           "model.language_model.layers.", "model.vision_tower.", False, write_state_dict()),
    Family("clip_vision_v4_layout", "CLIPVisionModel", clip_config, ("q_proj", "v_proj", "fc1"), encoder_inputs,
           "", None, "vision_model.encoder.layers.", True, write_state_dict("vision_model.")),
]
# The dtype most VLM checkpoints ship in: merged weights rounded once more, tolerances as in test_merge_vs_peft
FAMILIES += [replace(f, id=f.id + "_bf16", dtype="bf16") for f in FAMILIES if f.id in ("llava", "qwen2_vl")]
FAMILY = {f.id: f for f in FAMILIES}


# --- building and running --------------------------------------------------------------------------

def model_class(family: Family):
    import transformers

    return getattr(transformers, family.model_class)


def build(family: Family, seed: int = 0):
    """A random fp32 model; 1-d parameters (norms, biases) randomised too, as conftest.build_model does."""
    quiet()
    torch.manual_seed(seed)
    model = model_class(family)(family.config())
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def load(family: Family, folder: Path, dtype: torch.dtype = torch.float32, info: bool = False):
    quiet()
    model, loading = model_class(family).from_pretrained(folder, dtype=dtype, output_loading_info=True)
    model.eval()
    return (model, loading) if info else model


def load_peft(family: Family, base: Path, adapter: Path, dtype: torch.dtype = torch.float32, merge: bool = False):
    from peft import PeftModel

    model = PeftModel.from_pretrained(load(family, base, dtype), adapter)
    model.eval()
    return model.merge_and_unload() if merge else model


def make_adapter(family: Family, base: Path, folder: Path, seed: int = 1) -> Path:
    """get_peft_model on the model loaded back from the base folder, then save_pretrained."""
    from peft import LoraConfig, get_peft_model

    model = load(family, base)
    torch.manual_seed(seed)
    get_peft_model(model, LoraConfig(**LORA, target_modules=list(family.targets))).save_pretrained(folder)
    return folder


def _tensor_of(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    if getattr(output, "last_hidden_state", None) is not None:
        return output.last_hidden_state
    return output[0]


@torch.no_grad()
def run(family: Family, model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(the model's outputs, the vision encoder's output), in float64. The outputs are the logits of a
    VLM, and the last hidden state with the pooled output of an encoder alone."""
    from peft import PeftModel

    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    seen = []
    hook = inner.get_submodule(family.vision).register_forward_hook(lambda m, a, out: seen.append(_tensor_of(out)))
    try:
        out = model(**inputs)
    finally:
        hook.remove()
    assert len(seen) == 1, f"the vision encoder ran {len(seen)} times"
    if getattr(out, "logits", None) is not None:
        main = out.logits.double().flatten()
    else:
        main = torch.cat([out.last_hidden_state.double().flatten(), out.pooler_output.double().flatten()])
    return main, seen[0].double()


def module_of(adapter_key: str) -> str:
    """`base_model.model.X.lora_A.weight` -> `X`."""
    return re.sub(r"\.lora_[AB]\.weight$", "", adapter_key.removeprefix("base_model.model."))


@dataclass
class Case:
    family: Family
    base: Path
    adapter: Path
    out: Path
    error: lorafuse.LorafuseError | None

    def merged(self) -> Path:
        """OUT, or the test fails with lorafuse's refusal."""
        if self.error is not None:
            pytest.fail(f"lorafuse refuses an adapter PEFT saved and loads: {self.error}")
        return self.out

    @cached_property
    def inputs(self) -> dict:
        return self.family.inputs(self.family.config(), torch.Generator().manual_seed(0))

    @cached_property
    def base_tensors(self) -> dict:
        return read_tensors(self.base)

    @cached_property
    def out_tensors(self) -> dict:
        return read_tensors(self.merged())

    @cached_property
    def adapter_tensors(self) -> dict:
        return read_adapter(self.adapter)

    def _written(self, name: str, model) -> dict:
        folder = self.out.parent / name
        self.family.write(model, folder)
        return read_tensors(folder)

    @cached_property
    def exact(self) -> dict:
        """(c)'s reference: PEFT's merge in float64, written the way the base was (so named as its tensors are)."""
        return self._written("exact-fp64", load_peft(self.family, self.base, self.adapter, torch.float64, merge=True))

    @cached_property
    def peft_merged(self) -> dict:
        """PEFT's merge_and_unload with the base in its file dtype, written the way the base was."""
        dtype = TORCH_DTYPES[self.family.dtype]
        return self._written("peft-merged", load_peft(self.family, self.base, self.adapter, dtype, merge=True))

    @cached_property
    def changed(self) -> set[str]:
        """The base tensors PEFT's exact merge changes."""
        return {n for n, t in self.base_tensors.items() if not torch.equal(self.exact[n], t.double())}


@pytest.fixture(scope="module", params=[f.id for f in FAMILIES])
def case(request, artefacts, tmp_path_factory) -> Case:
    family = FAMILY[request.param]
    base = artefacts.get(("vlm-base", family.id), lambda d: (
        family.write(build(family).to(TORCH_DTYPES[family.dtype]), d / "base"), d / "base")[1])
    adapter = artefacts.get(("vlm-adapter", family.id), lambda d: make_adapter(family, base, d / "adapter"))
    out = tmp_path_factory.mktemp(f"vlm-out-{family.id}") / "merged"
    try:
        lorafuse.merge(base, adapter, out)
        error = None
    except lorafuse.LorafuseError as e:
        error = e
    return Case(family, base, adapter, out, error)


# --- the premise -----------------------------------------------------------------------------------

def test_checkpoint_and_adapter_name_the_weights_as_described(case):
    """What the other tests rest on: the base loads as written, the adapter adapts modules of both the
    language model and the vision encoder, and the adapter's module names are (or, for `renamed`
    families, are not) the checkpoint's tensor names."""
    model, info = load(case.family, case.base, info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"]), info
    modules = {module_of(k) for k in case.adapter_tensors}
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in case.adapter_tensors), sorted(case.adapter_tensors)[:4]
    in_memory = set(model.state_dict())
    assert {m + ".weight" for m in modules} <= in_memory, "the adapter names modules the loaded model lacks"
    on_disk = {m + ".weight" for m in modules} & set(case.base_tensors)
    if case.family.renamed:
        assert not on_disk, f"{sorted(on_disk)[:3]} are named alike in the checkpoint and the adapter"
    else:
        assert len(on_disk) == len(modules), "the checkpoint does not hold the adapter's module names"
    in_vision = case.family.vision + "." if case.family.vision else ""
    assert any(m.startswith(in_vision) for m in modules), "no LoRA in the vision encoder"
    assert any(n.startswith(case.family.disk_vision) for n in case.base_tensors)
    if case.family.disk_text is not None:
        assert any(n.startswith(case.family.disk_text) for n in case.base_tensors)
        assert any(".language_model." in m or ".text_model." in m for m in modules), "no LoRA in the language model"


# --- (a) -------------------------------------------------------------------------------------------

def test_output_keeps_the_checkpoint_layout_and_loads(case):
    """(a) OUT holds the base's tensor names, shapes and dtypes, and transformers loads it with the same
    class, with no missing, unexpected or mismatched keys."""
    out, base = case.out_tensors, case.base_tensors
    assert sorted(out) == sorted(base), (f"only in OUT: {sorted(set(out) - set(base))[:4]}; "
                                         f"only in the base: {sorted(set(base) - set(out))[:4]}")
    wrong = [n for n in base if (out[n].shape, out[n].dtype) != (base[n].shape, base[n].dtype)]
    assert not wrong, wrong[:4]
    _, info = load(case.family, case.merged(), info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info


# --- (b) -------------------------------------------------------------------------------------------

def test_outputs_match_unmerged_peft_on_images(case):
    """(b) On image + text inputs, OUT's logits (an encoder's hidden states) and its vision encoder's
    features equal the unmerged PeftModel's, all loaded in fp32 (within fp32 rounding for an fp32 base,
    16 ulps of the scale for bf16), and the adapter visibly moves both."""
    f, inputs = case.family, case.inputs
    want, want_vision = run(f, load_peft(f, case.base, case.adapter), inputs)
    base, base_vision = run(f, load(f, case.base), inputs)
    got, got_vision = run(f, load(f, case.merged()), inputs)
    for what, w, g, b in (("outputs", want, got, base), ("vision features", want_vision, got_vision, base_vision)):
        scale = w.abs().max().item()
        tol = LOGIT_RTOL[f.dtype] * scale
        err, base_err = (g - w).abs().max().item(), (b - w).abs().max().item()
        assert err <= tol, f"{what}: max |OUT - PEFT| = {err:.3g} > {tol:.3g} (scale {scale:.3g})"
        assert base_err > 2 * tol, f"{what}: the adapter barely moves them ({base_err:.3g}): the test proves nothing"
        assert base_err > EFFECT_RATIO * err, f"{what}: OUT ({err:.3g}) is not much closer to PEFT than the base ({base_err:.3g})"


# --- (c) -------------------------------------------------------------------------------------------

def test_merged_tensors_at_least_as_accurate_as_peft_merge(case):
    """(c) PEFT's merge_and_unload, written as the base was, has OUT's tensors; each tensor the adapter
    changes is at least as close to the float64 merge in OUT as in PEFT's, the others are the base's bytes."""
    changed, lora_modules = case.changed, {module_of(k) for k in case.adapter_tensors}
    assert len(changed) == len(lora_modules), "the adapter should change one base tensor per adapted module"
    assert any(n.startswith(case.family.disk_vision) for n in changed), "nothing changes in the vision encoder"
    if case.family.disk_text is not None:
        assert any(n.startswith(case.family.disk_text) for n in changed), "nothing changes in the language model"
    out, peft = case.out_tensors, case.peft_merged
    assert sorted(peft) == sorted(out), (f"only in OUT: {sorted(set(out) - set(peft))[:4]}; "
                                         f"only in PEFT's: {sorted(set(peft) - set(out))[:4]}")
    failures = []
    for name, value in out.items():
        if name not in changed:
            if not same_bytes(value, case.base_tensors[name]):
                failures.append(f"{name}: untouched by the adapter, not byte-identical to the base")
            continue
        exact = case.exact[name]
        mine, theirs = value.double(), peft[name].double()
        assert mine.shape == exact.shape == theirs.shape, name
        size = exact.abs().max().item()
        err, peft_err = (mine - exact).abs().max().item(), (theirs - exact).abs().max().item()
        if err > peft_err + TENSOR_SLACK * size or err > (HALF_ULP[case.family.dtype] + TENSOR_SLACK) * size:
            failures.append(f"{name}: lorafuse {err:.3g}, PEFT {peft_err:.3g}, max|W| {size:.3g}")
    assert not failures, "\n".join(failures)


# --- (d) -------------------------------------------------------------------------------------------

def test_plan_merges_what_peft_merges_and_names_the_mapping(case):
    """(d) The plan changes exactly the tensors PEFT's merge changes, under the checkpoint's names; where
    those are not the adapter's, a note says transformers' mapping was applied."""
    from lorafuse.plan import describe

    try:
        plan = lorafuse.plan(case.base, case.adapter)
    except lorafuse.LorafuseError as e:
        pytest.fail(f"lorafuse refuses to plan an adapter PEFT saved and loads: {e}")
    assert {t.name for t in plan.merged} == case.changed
    notes = [line for line in describe(plan) if line.startswith("note")]
    if case.family.renamed:
        assert any("transformers" in line for line in notes), f"no note names the transformers mapping: {notes}"
