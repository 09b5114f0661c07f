"""Shared fixtures: tiny random models saved by transformers and adapters saved by PEFT.

Everything here is made by the real libraries (`save_pretrained` on both sides), never imitated by
hand, so a test that passes proves lorafuse reads what users actually have on disk. transformers and
peft are imported lazily: test files that do not use these fixtures do not pay for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Where the oracle tests run lorafuse's arithmetic (--device): the CPU, and a GPU too where there is one.
# CI has none; run the suite on a GPU machine to check the CUDA path against the same oracles.
MERGE_DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}

# Small enough that the whole oracle matrix runs in about a minute on two CPU cores, big enough to
# have every module kind (GQA attention, gated MLP, biases, Conv1D, tied and untied heads).
TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2)


def device_suffix(device: str) -> str:
    """Test ids name the device only off the CPU, so CPU-only runs keep their ids."""
    return "" if device == "cpu" else f"-{device}"


def tiny_config(kind: str):
    """A transformers config for one of the tiny test architectures."""
    import transformers as tf

    if kind == "llama":  # untied head
        return tf.LlamaConfig(**TINY, tie_word_embeddings=False)
    if kind == "llama_tied":
        return tf.LlamaConfig(**TINY, tie_word_embeddings=True)
    if kind == "llama_wide":  # same module names as llama, different hidden size
        return tf.LlamaConfig(**{**TINY, "hidden_size": 64}, tie_word_embeddings=False)
    if kind == "qwen2":  # q/k/v projections have biases
        return tf.Qwen2Config(**TINY, tie_word_embeddings=False)
    if kind == "gemma":  # tied embeddings, scaled embedding
        return tf.GemmaConfig(**TINY, head_dim=8, tie_word_embeddings=True)
    if kind == "gpt2":  # Conv1D weights stored in×out, tied head
        return tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                             bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
    raise ValueError(kind)


def quiet():
    """Silence transformers/peft chatter (progress bars, 'fan_in_fan_out' and tying warnings)."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="peft")
    warnings.filterwarnings("ignore", module="transformers")


def build_model(kind: str, seed: int = 0):
    """A freshly initialised fp32 model. 1-d parameters (norms, biases) are randomised too, since
    transformers initialises them to constants and a constant bias would hide bias bugs."""
    from transformers import AutoModelForCausalLM

    quiet()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def save_model(model, folder: Path, dtype: str = "fp32", **kwargs) -> Path:
    model.to(TORCH_DTYPES[dtype]).save_pretrained(folder, **kwargs)
    return folder


def load_model(folder, dtype: torch.dtype = torch.float32, vocab: int | None = None, info: bool = False):
    """AutoModelForCausalLM.from_pretrained in eval mode; `vocab` resizes the embeddings first (as a
    user does before loading an adapter trained after resize_token_embeddings)."""
    from transformers import AutoModelForCausalLM

    quiet()
    got = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=info)
    model = got[0] if info else got
    if vocab is not None:
        model.resize_token_embeddings(vocab, mean_resizing=False)
    model.eval()
    return (model, got[1]) if info else model


def load_peft(base, adapter, dtype: torch.dtype = torch.float32, vocab: int | None = None, merge: bool = False):
    """The oracle: base + adapter through PEFT (unmerged, or PEFT's own merge_and_unload)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(load_model(base, dtype, vocab), adapter)
    model.eval()
    return model.merge_and_unload() if merge else model


def make_adapter(base: Path, folder: Path, config, *, vocab: int | None = None, seed: int = 1,
                 perturb: bool = True, model=None, **save_kwargs) -> Path:
    """get_peft_model + save_pretrained, as a training script would (with `init_lora_weights=False`
    in `config`, A and B are random so the delta is not zero).

    `perturb` also moves every other trainable tensor away from its initial value, because PEFT
    initialises them to the base's values and an untrained adapter would prove nothing: DoRA
    magnitudes are multiplied by U(0.5, 1.5) (else magnitude == ||W + ΔW|| and DoRA equals LoRA),
    trainable biases, modules_to_save copies and trainable-token rows get Gaussian noise.
    """
    from peft import get_peft_model

    quiet()
    if model is None:
        model = load_model(base, torch.float32, vocab)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    if perturb:
        perturb_trainables(peft_model)
    peft_model.save_pretrained(folder, **save_kwargs)
    return folder


LORA_FACTORS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def perturb_trainables(peft_model) -> None:
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad or any(f in name for f in LORA_FACTORS):
                continue
            if "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
            else:  # noise of 30% of the tensor's typical size, at least 0.05 (norm weights ~1, biases ~0.1)
                p.add_(torch.randn_like(p) * max(0.05, 0.3 * p.abs().mean().item()))


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.double()


EFFECT_RATIO = 10  # the adapter must move the logits ten times further than OUT is from PEFT


def check_logits(want: torch.Tensor, got: torch.Tensor, base: torch.Tensor, rtol: float) -> None:
    """OUT's logits (`got`) within `rtol` of the logit scale of PEFT's (`want`), and the adapter visibly matters:
    the base alone (`base`) is much further away."""
    scale = want.abs().max().item()
    err, base_err = (got - want).abs().max().item(), (base - want).abs().max().item()
    tol = rtol * scale
    assert err <= tol, f"max |OUT - PEFT| = {err:.3g} > {tol:.3g} (logit scale {scale:.3g})"
    assert base_err > 2 * tol, f"the adapter barely moves the logits ({base_err:.3g}): the test proves nothing"
    assert base_err > EFFECT_RATIO * err, f"OUT ({err:.3g}) is not much closer to PEFT than the base ({base_err:.3g})"


def tree_hash(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path."""
    folder = Path(folder)
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


def read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every *.safetensors file in `folder`, read with the reference reader."""
    from safetensors import safe_open

    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                assert key not in out, f"{key} appears in two files"
                out[key] = f.get_tensor(key)
    return out


def read_adapter(folder: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter folder, from adapter_model.safetensors or adapter_model.bin."""
    folder = Path(folder)
    if (folder / "adapter_model.safetensors").is_file():
        return read_tensors(folder)
    return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8))


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def leftovers(parent: Path) -> list[Path]:
    """Staging or backup folders lorafuse might leave next to an output."""
    return sorted(Path(parent).glob(".*lorafuse-*"))


class _Cache:
    """Build each artefact once per session, on first use."""

    def __init__(self, factory):
        self.factory = factory
        self.items: dict = {}

    def get(self, key, build):
        if key not in self.items:
            name = "-".join(str(k) for k in (key if isinstance(key, tuple) else (key,)))
            self.items[key] = build(self.factory.mktemp(name.replace("/", "_")))
        return self.items[key]


@pytest.fixture(params=[2, 16], ids=["2-cores", "16-cores"])
def cores(request, monkeypatch):
    """This process seen as having 2 cores (2 tensors in flight, one output shard written at a time) or
    16 (8 in flight, 4 shards side by side)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(request.param)))
    return request.param


@pytest.fixture
def one_torch_thread():
    """Tiny models: waking a second intra-op thread costs far more than the work (10x here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def artefacts(tmp_path_factory) -> _Cache:
    """A session-wide cache of built folders: `artefacts.get(key, build)` with `build(tmp_dir) -> path`."""
    return _Cache(tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_base(artefacts):
    """`tiny_base(kind, dtype="fp32")` -> folder of a tiny random model saved by save_pretrained.

    The fp32 and bf16 folders of one kind hold the same model (bf16 is the fp32 one rounded).
    """
    def get(kind: str, dtype: str = "fp32", **save_kwargs) -> Path:
        key = (kind, dtype) + tuple(sorted(save_kwargs.items()))
        return artefacts.get(key, lambda d: save_model(build_model(kind), d, dtype, **save_kwargs))

    return get


@pytest.fixture(scope="module")
def sharded(tiny_base, artefacts):
    """A tiny Llama saved by transformers in several shards with an index, and a LoRA adapter for it."""
    from peft import LoraConfig

    base = tiny_base("llama", "bf16", max_shard_size="20KB")
    adapter = artefacts.get("sharded-adapter", lambda d: make_adapter(
        base, d, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], init_lora_weights=False)))
    return base, adapter


def record_work(monkeypatch) -> dict[str, dict[str, int]]:
    """Hook the numpy path so that each tensor it makes records what it takes: its buffers (the largest asked
    for, by role) and its adapter factors in fp32 (bytes each). `monkeypatch.undo()` ends the recording."""
    import threading

    from lorafuse.compute import rows
    from lorafuse.formats import arrays

    taken: dict[str, dict[str, int]] = {}
    current = threading.local()
    real_get, real_fp32, real_output_bytes = rows.Buffers.get, arrays.fp32, rows.Producer.output_bytes

    def get(self, role, nbytes):
        mine = taken[current.name]
        mine[role] = max(mine.get(role, 0), nbytes)
        return real_get(self, role, nbytes)

    def fp32(ref):
        factor = real_fp32(ref)
        taken[current.name][f"factor {len(taken[current.name])}"] = factor.nbytes
        return factor

    def output_bytes(self, tensor, *args):
        current.name, taken[tensor.name] = tensor.name, {}
        return real_output_bytes(self, tensor, *args)

    monkeypatch.setattr(rows.Buffers, "get", get)
    monkeypatch.setattr(arrays, "fp32", fp32)
    monkeypatch.setattr(rows.Producer, "output_bytes", output_bytes)
    return taken


def cached_smollm2_adapter(base: Path, seed: int = 0) -> Path:
    """realmodel.smollm2_adapter(base, ..., seed=seed), kept in the test cache next to the model: training it is
    the slowest step of the real-model tests, and the same recipe, seed, base and libraries give the same adapter.
    Keyed by all of those (the recipe by realmodel.py's source); built in a private folder under a file lock and
    renamed into place, like the model."""
    import inspect
    import shutil
    import tempfile

    import peft
    import transformers
    from filelock import FileLock

    import realmodel

    key = json.dumps([realmodel.NAME, str(Path(base).resolve()), seed, inspect.getsource(realmodel),
                      torch.__version__, transformers.__version__, peft.__version__])
    root = realmodel.cache_root()
    name = f"smollm2-adapter-seed{seed}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    final = root / name
    if (final / "adapter_config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root / f"{name}.lock")):
        if (final / "adapter_config.json").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
        try:
            realmodel.smollm2_adapter(base, tmp, seed=seed)
            tmp.chmod(0o755)
            if final.exists():  # an incomplete one (no adapter_config.json): replaced whole
                shutil.rmtree(final)
            os.rename(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final
