"""Decide everything before a byte is written: what each output tensor is, the shards, the costs.

Planning reads headers only (and a quantized base's small quant-state tensors). Every check that can
be made before the data is seen (unused adapter tensors, shape mismatches, unsupported variants) fails
here; the merge checks the disk space against the plan before it writes anything.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import os
from collections import Counter
import re
import shutil
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol, Sequence


from .adapters.peft import Adapter, check_untrained, open_adapter, patches_by_tensor, split_key, wrapper_owners
from .costs import block_shape, in_rows, matrix_shape
from .errors import LorafuseError
from .layouts import cut
from .formats.folder import TOKENIZER_FILE, identity_of, is_weight_file
from .formats.safetensors import FLOAT_DTYPES, TensorSlot, dtype_size
from .patches import SLICE_CACHE, LoRA, Patch, Replace, ReplaceRows, SliceRef
from .quant import QuantizedTensor, logical_tensors
from .sources.hub import ADAPTER_CONFIG, base_from_adapter, parse_spec, resolve_adapter, resolve_model_lazily
from .sources.hub_calls import cache_dir
from .sources.local import Checkpoint, check_inside, open_model
from .sources.remote import RemoteFile, min_hold
from .units import human_size, natural

DTYPE_NAMES = {"bf16": "BF16", "bfloat16": "BF16", "fp16": "F16", "float16": "F16", "fp32": "F32", "float32": "F32"}
CONFIG_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
CASTABLE = {"BF16", "F16", "F32"}
HEAD = "lm_head.weight"
# transformers' model types built with its Conv1D (weights stored in×out), and which of their modules are
# Conv1D; every other module of theirs, and of every other model type, is an nn.Linear.
GPT2_CONV1D = frozenset({"c_attn", "q_attn", "c_proj", "c_fc"})
CONV1D_MODULES = {"gpt2": GPT2_CONV1D, "openai-gpt": GPT2_CONV1D, "imagegpt": GPT2_CONV1D,
                  "decision_transformer": GPT2_CONV1D, "clvp": frozenset({"c_fc", "c_proj"}),
                  "clvp_decoder": frozenset({"c_fc", "c_proj"})}
EMBEDDING_SUFFIXES = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight", "tok_embeddings.weight")
MAX_PIPELINE_DEPTH = 8
DISK_MARGIN = 64 << 20  # room for config, tokenizer files and the file system's own overhead
NAME_MAX = 255  # bytes in one file name, on every file system Linux and macOS write models to
# OUT gets its own card, config and manifest (a base that is an earlier merge has one)
NOT_CARRIED = {"README.md", "adapter_config.json", "config.json", "lorafuse-manifest.json"}
SAVE_METHODS = ("merged_16bit", "merged_4bit")
QUANTIZED_NAME = re.compile(r"bnb|4bit|4-bit|8bit|nf4|int4|int8|awq|gptq|fp8", re.IGNORECASE)
# What transformers writes for BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
# bnb_4bit_use_double_quant=True): the layout lorafuse's merged_4bit output reproduces.
NF4_CONFIG = {
    "_load_in_4bit": True, "_load_in_8bit": False, "bnb_4bit_compute_dtype": "bfloat16", "bnb_4bit_quant_storage": "uint8",
    "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True, "llm_int8_enable_fp32_cpu_offload": False,
    "llm_int8_has_fp16_weight": False, "llm_int8_skip_modules": None, "llm_int8_threshold": 6.0,
    "load_in_4bit": True, "load_in_8bit": False, "quant_method": "bitsandbytes",
}


@dataclass(frozen=True)
class TensorPlan:
    """One output tensor: where it comes from, what changes it, and what it becomes."""

    name: str
    source: object  # TensorRef of the base tensor (for an untied head: the embedding's), or a QuantizedTensor
    patches: tuple[Patch, ...]
    dtype: str
    shape: tuple[int, ...]
    to_nf4: bool = False  # written as a bitsandbytes NF4 weight (save_method merged_4bit)

    @property
    def source_refs(self) -> list:
        """The stored tensors it is read from."""
        if isinstance(self.source, QuantizedTensor):
            return [ref for _, ref in self.source.parts.values()]
        return [self.source]

    @property
    def computed_from(self) -> tuple:
        """(what is read, the patches applied to it): a replacing tensor makes the source and the patches
        before it moot, so the last one is read, with only the patches after it."""
        for i in reversed(range(len(self.patches))):
            if isinstance(self.patches[i], Replace):
                return self.patches[i].source, self.patches[i + 1:]
        return self.source, self.patches

    @property
    def downloads(self) -> list[RemoteFile]:
        """The files it is read from that are not downloaded yet."""
        return list(dict.fromkeys(r.remote for r in self.source_refs if r.remote is not None))

    @property
    def is_copy(self) -> bool:
        """Untouched and stored as it will be written: copied as raw bytes, never decoded."""
        if self.patches:
            return False
        if isinstance(self.source, QuantizedTensor):
            return self.to_nf4 and self.source.method == "bnb-nf4"
        return self.dtype == self.source.dtype and not self.to_nf4

    @property
    def entries(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of each tensor the output file holds for it: one, or a 4-bit weight's parts."""
        if self.is_copy and isinstance(self.source, QuantizedTensor):
            return [(key, ref.dtype, tuple(ref.shape)) for key, ref in self.source.parts.values()]
        if self.to_nf4:
            from .quant import bnb

            return [(self.name + suffix, dtype, shape)
                    for suffix, dtype, shape in bnb.layout_4bit(self.shape, self.dtype)]
        return [(self.name, self.dtype, self.shape)]

    @property
    def work_bytes(self) -> int:
        """Memory to produce this tensor on the CPU. In rows: the bytes it reads (the base tensor, a
        replacing one or a quantized weight's parts), which the result overwrites unless wider (a quantized
        weight's always is), the adapter's factors in fp32 (twice, when transposed) and two blocks of rows.
        The torch path: the source bytes, the fp32 value, the cast result, adapter tensors in fp32."""
        if self.is_copy:
            return 0
        if in_rows(self, "cpu"):
            read, patches = self.computed_from
            factors = sum(_factor_bytes(r) for p in patches for r in p.refs)
            wider = isinstance(read, QuantizedTensor) or dtype_size(self.dtype) > dtype_size(read.dtype)
            out = math.prod(self.shape) * dtype_size(self.dtype) if wider else 0
            cols = matrix_shape(self.shape)[1]
            rows, room = block_shape(cols, read.code_width if isinstance(read, QuantizedTensor) else 0)
            return read.nbytes + out + 2 * factors + 4 * (2 * rows * cols + room)
        numel = max(math.prod(self.shape), self.source.numel)
        adapter = sum(_factor_bytes(r) for p in self.patches for r in p.refs)
        quantizing = numel * 8 if self.to_nf4 else 0
        return self.source.nbytes + numel * (4 + dtype_size(self.dtype)) + adapter + quantizing


def _factor_bytes(ref) -> int:
    """Memory for an adapter tensor while a tensor is made: its fp32 value, and for a part of one (an
    expert's factors) the rows read to cut it from, unless those are kept for all experts (Plan.peak_memory
    counts them once)."""
    return 4 * math.prod(ref.shape) + (ref.read_bytes if isinstance(ref, SliceRef) and not ref.shared else 0)


@dataclass(frozen=True)
class ShardPlan:
    filename: str
    tensors: tuple[TensorPlan, ...]
    header: bytes
    slots: tuple[tuple[TensorSlot, ...], ...]  # per tensor, one slot per entry

    @property
    def size(self) -> int:
        return len(self.header) + sum(s.nbytes for group in self.slots for s in group)


def usable_cores() -> int:
    """The cores this process may run on (CPU affinity and cgroup cpusets count, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def pipeline_depth() -> int:
    """Tensors in flight at once: one per two usable cores (the kernel's copies, the hashing and the
    flushing take the others), at least two (one tensor is computed while another is read or written),
    at most MAX_PIPELINE_DEPTH (on many cores, that many threads merge much faster than two: see
    benchmarks/NOTES.md)."""
    return max(2, min(MAX_PIPELINE_DEPTH, usable_cores() // 2))


@dataclass(frozen=True)
class Plan:
    """A merge, decided: a plain value that `lorafuse plan` prints and the executor carries out. The free
    space of the disks it writes to is measured once, when it is made, so that the disk check is part of
    planning and reading the plan never touches the disk."""

    base: Checkpoint
    adapters: tuple[Adapter, ...]  # one, or several whose weighted deltas are summed
    out: Path | None
    dtype: str
    shards: list[ShardPlan]
    config: dict  # the output config.json
    counts: dict[str, int]  # patch label -> number of patches
    notes: list[str] = field(default_factory=list)
    save_method: str = "merged_16bit"
    base_name: str = ""  # as the user named them: a folder or a repo id
    adapter_names: tuple[str, ...] = ()
    weights: tuple[float, ...] = (1.0,)  # one per adapter: W + Σ weight·ΔW
    carried: list[Path] = field(default_factory=list)  # non-weight files copied into OUT (see carried_files)
    max_shard_size: int | str = "5GB"  # as given: recorded in the manifest's settings
    depth: int = field(default_factory=pipeline_depth)  # tensors in flight at once in the executor
    disk_free: int | None = None  # bytes free on OUT's disk when planned (None: no OUT)
    cache_free: int | None = None  # bytes free in the Hugging Face cache when planned, where base shards are downloaded
    cache_shares_out_disk: bool = False  # the cache is on OUT's disk: downloads and output share its room
    file_output: FileOutput | None = None  # what is written instead of the shards' folder (a GGUF file)

    @property
    def adapter(self) -> Adapter:
        """The first adapter (the only one, in most merges)."""
        return self.adapters[0]

    @property
    def adapter_name(self) -> str:
        return self.adapter_names[0]

    @property
    def tensors(self) -> list[TensorPlan]:
        return [t for s in self.shards for t in s.tensors]

    @property
    def total_size(self) -> int:
        """Bytes of tensor data, as metadata.total_size in the index."""
        return sum(s.size - len(s.header) for s in self.shards)

    @property
    def output_bytes(self) -> int:
        return self.file_output.size if self.file_output else sum(s.size for s in self.shards)

    @property
    def peak_memory(self) -> int:
        """Working memory beyond the interpreter: the largest tensors in flight at once, and the adapter rows
        kept read for the experts cut from them (patches.SLICE_CACHE)."""
        work = sorted((t.work_bytes for t in self.tensors), reverse=True)
        cut_from = [r.read_bytes for t in self.tensors for p in t.patches for r in p.refs if isinstance(r, SliceRef) and r.shared]
        return sum(work[:self.depth]) + SLICE_CACHE * max(cut_from, default=0)

    @property
    def merged(self) -> list[TensorPlan]:
        return [t for t in self.tensors if t.patches]

    @property
    def largest_download(self) -> int:
        return max((f.size for f in self.base.remote.values()), default=0)

    @property
    def download_hold(self) -> int:
        """With --low-disk: how many downloaded base shards must be kept at once (see sources.remote)."""
        return min_hold([t.downloads for t in self.tensors]) if self.base.remote else 0

    def disk_needs(self, low_disk: bool = False, pushing: bool = False) -> tuple[int, int]:
        """(bytes on OUT's disk, bytes downloaded into the Hugging Face cache) a merge needs.

        Default: the output, plus the base shards the cache lacks. --low-disk: those shards go to the
        staging folder and are deleted once merged, so only as many as are in use at once count (one,
        unless the output order reads two shards back and forth); with --push-to-hub too, each output
        shard is deleted once uploaded, and the next one waits for that, so two output shards count."""
        if not low_disk:
            return self.output_bytes, self.base.download_bytes
        inputs = self.download_hold * self.largest_download
        output = self.output_bytes
        if pushing:
            output = min(output, 2 * max(s.size for s in self.shards))
        return output + inputs, 0


def room_problem(plan: Plan, done: int = 0, low_disk: bool = False, pushing: bool = False) -> str | None:
    """Why the disks cannot hold the merge into plan.out (`done`: bytes of it already in the staging
    folder), saying what would fit; None if they can or OUT is not known."""
    return room(plan, done, low_disk, pushing)[0]


def room(plan: Plan, done: int, low_disk: bool, pushing: bool) -> tuple[str | None, int]:
    """(room_problem's answer, bytes free on OUT's disk beyond what the merge needs and DISK_MARGIN)."""
    if plan.out is None:
        return None, 0
    out_need, cache_need = plan.disk_needs(low_disk, pushing)
    out_need = max(out_need - done, 0)
    free = plan.disk_free
    margin = f"and {human_size(DISK_MARGIN)} to spare"
    low_disk_need = plan.disk_needs(True, pushing)[0]
    hint = f", or pass --low-disk (needs {human_size(low_disk_need)})" \
        if not low_disk and not plan.file_output and low_disk_need + DISK_MARGIN <= free else ""
    what = "the output needs"
    if cache_need:
        if plan.cache_shares_out_disk:
            out_need += cache_need
            what = "the output and the downloads need"
        elif plan.cache_free < cache_need + DISK_MARGIN:
            return (f"downloading the base needs {human_size(cache_need)} {margin} in the Hugging Face cache "
                    f"{cache_dir()}, but only {human_size(plan.cache_free)} is free there: it will not fit; free space, "
                    f"point HF_HUB_CACHE at another disk{hint}"), 0
    spare = free - out_need - DISK_MARGIN
    if spare < 0:
        kept = f" (besides the {human_size(done)} of it that {work_path(plan.out, 'partial')} holds)" if done else ""
        return (f"{what} {human_size(out_need)} more{kept} {margin}, but only {human_size(free)} is free on the disk "
                f"holding {plan.out.absolute().parent}: it will not fit; free space{hint}"), 0
    return None, spare


def existing_ancestor(path: Path) -> Path:
    """The path itself, or its nearest parent that exists: where a folder about to be made will live."""
    while not path.exists():
        path = path.parent
    return path


class FileOutput(Protocol):
    """A sink that writes file(s) of its own making from the planned tensors rather than the planned shards
    (GGUF: lorafuse.sinks.gguf): what the plan says of the output and counts on the disk."""

    size: int  # bytes on OUT's disk at most

    def describe(self) -> list[str]:
        """Lines for `lorafuse plan`, in place of the shards' line."""

    def to_dict(self) -> dict:
        """For `lorafuse plan --json`."""


class Layout(Protocol):
    """How an output format (a sink: lorafuse.sinks) places the tensors: the plan asks it, never imports it."""

    def layout(self, tensors: list[TensorPlan], max_shard_size: int | str) -> list[ShardPlan]:
        """The output files and each tensor's place in them."""


def make_plan(base: str | os.PathLike | None, adapter: str | os.PathLike | Sequence[str | os.PathLike],
              out: str | os.PathLike | None = None, *, sink: Layout, dtype: str = "auto", max_shard_size: int | str = "5GB",
              save_method: str = "merged_16bit", scratch: Path | None = None,
              weights: Sequence[float] | None = None) -> Plan:
    """Open base and adapter (folders, or repo ids resolved through the Hugging Face cache), match every
    adapter tensor, and lay out the output through `sink`. BASE None: the base the adapter names.

    `adapter` may be a list of adapters: the output is then the base plus the weighted sum of their deltas,
    W + Σ wᵢ·ΔWᵢ (`weights`, 1 each by default), each tensor patched by all of them in fp32 and rounded once.
    Base shards the cache lacks are planned from their headers and downloaded by the executor when it
    needs them: into the cache, or into `scratch` (--low-disk)."""
    out_dtype = _parse_dtype(dtype)
    if save_method not in SAVE_METHODS:
        raise LorafuseError(f"--save-method {save_method!r} is not one of {', '.join(SAVE_METHODS)}")
    specs, weights = adapter_set(adapter, weights)
    several = len(specs) > 1
    adapter_dirs = [resolve_adapter(spec) for spec in specs]
    for spec, adapter_dir in zip(specs, adapter_dirs):
        _check_roles(base, spec, adapter_dir)
    if base is None:
        if several:
            raise LorafuseError("with several adapters, name BASE: lorafuse merge BASE ADAPTER1 ADAPTER2 ... OUT")
        base = base_from_adapter(adapter_dirs[0])
        if base is None:
            raise LorafuseError(f"{specs[0]} names no base model (base_model_name_or_path); pass BASE")
    base_dir, remote = resolve_model_lazily(base, scratch=scratch)
    checkpoint = open_model(base_dir, remote, commit=base_dir.name if parse_spec(base) else None)
    adapters = [open_adapter(adapter_dir) for adapter_dir in adapter_dirs]
    names = [str(spec) for spec in specs]
    for adapter_obj, name, weight in zip(adapters, names, weights):
        _check_weighting(adapter_obj, name, weight, several)
    out_path = output_path(out) if out is not None else None
    if out_path is not None:
        for adapter_obj in adapters:
            _check_out(out_path, checkpoint, adapter_obj)
    config = dict(checkpoint.config)
    notes: list[str] = []

    sources, quant_method = logical_tensors(checkpoint.tensors, config)
    by_name: dict[str, list[Patch]] = {}
    for index, (adapter_obj, name, weight) in enumerate(zip(adapters, names, weights)):
        about = f"adapter {name}: " if several else ""
        with _blaming(about):
            matched = _adapter_patches(adapter_obj, base_dir, sources, config, notes, about)
        for target, chain in matched.items():
            by_name.setdefault(target, []).extend(_weighted(p, index, weight, name, target) for p in chain)
    # A whole replacement comes first, as in one adapter's chain: the other patches act on the replaced tensor.
    by_name = {target: sorted(chain, key=lambda p: not isinstance(p, Replace)) for target, chain in by_name.items()}
    base_quantization = config.pop("quantization_config", None)
    if quant_method and save_method == "merged_16bit":
        notes.append(f"the base is quantized ({quant_method}): its weights are dequantized and the output is 16-bit")
    _untie(checkpoint, config, sources, by_name, notes)
    _check_overlaps(by_name, names)

    tensors = []
    for name, ref in sources.items():
        chain = tuple(by_name.get(name, ()))
        shape = tuple(ref.shape)
        for patch in chain:
            with _blaming(f"adapter {names[patch.adapter]}: " if several else ""):
                shape = patch.out_shape(shape, name)
        if chain and ref.dtype not in FLOAT_DTYPES:
            raise LorafuseError(f"base tensor {name} is {ref.dtype}; lorafuse merges into floating-point weights only")
        target = out_dtype if (out_dtype and ref.dtype in CASTABLE) else ref.dtype
        tensors.append(TensorPlan(name, ref, chain, target, shape))
    _follow_vocab(tensors, config, notes)
    if save_method == "merged_4bit":
        nf4_base = quant_method == "bitsandbytes" and _is_nf4_uint8(base_quantization)
        tensors = _to_nf4(tensors, base_quantization if nf4_base else None, config, notes)
    if out_dtype:
        _set_dtype(config, out_dtype)
    shards = sink.layout(tensors, max_shard_size)
    counts = Counter(p.label for t in tensors for p in t.patches)
    for adapter_obj, name in zip(adapters, names):
        notes += [(f"{name}: " if several else "") + note
                  for note in _base_mismatch(adapter_obj.base_name, str(base), base_dir, quant_method)]
    return Plan(checkpoint, tuple(adapters), out_path, out_dtype or "auto", shards, config, dict(counts), notes, save_method,
                str(base), tuple(names), tuple(weights), carried_files(base_dir, adapter_dirs, names), max_shard_size,
                **_free_space(out_path, checkpoint))


def adapter_set(adapter, weights) -> tuple[list, list[float]]:
    """The adapters as a list (one given alone is a list of one) and their weights, 1 each unless given:
    one finite number per adapter."""
    specs = [adapter] if isinstance(adapter, (str, os.PathLike)) else list(adapter)
    if not specs:
        raise LorafuseError("no adapter given; name at least one")
    if weights is None:
        return specs, [1.0] * len(specs)
    weights = list(weights)
    if len(weights) != len(specs):
        raise LorafuseError(f"{len(weights)} weight(s) for {len(specs)} adapter(s): give one weight per adapter, in the "
                            "order of the adapters")
    for weight in weights:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise LorafuseError(f"adapter weight {weight!r} is not a finite number; give each adapter a number such as 1, "
                                "0.7 or -0.3")
    return specs, [float(w) for w in weights]


@contextlib.contextmanager
def _blaming(about: str):
    """Name the adapter in what its tensors make go wrong, when there are several (`about`: its prefix)."""
    try:
        yield
    except LorafuseError as e:
        if not about:
            raise
        raise type(e)(about + str(e)) from None


def _same_values(a, b) -> bool:
    """Whether two stored tensors hold the same values (read whole: only for base layers two adapters save)."""
    if (a.dtype, tuple(a.shape)) != (b.dtype, tuple(b.shape)):
        return False
    return a.read_into(bytearray(a.nbytes)) == b.read_into(bytearray(b.nbytes))


def _check_weighting(adapter: Adapter, name: str, weight: float, several: bool) -> None:
    """DoRA has no weighted sum: it rescales each weight row to its trained magnitude over the norm of W plus
    its own delta, so neither a scaled DoRA delta nor one added to other adapters' is what was trained. PEFT's
    add_weighted_adapter drops the magnitudes instead (the combined adapter is not DoRA's result either)."""
    if adapter.config.get("use_dora") and (several or weight != 1):
        raise LorafuseError(
            f"adapter {name} is DoRA (use_dora), which has no weighted sum with other adapters or a weight other than 1 "
            "(its magnitudes rescale W plus its own delta; PEFT's add_weighted_adapter drops them, so its combination "
            "is not exact either); merge it alone with weight 1, then merge the other adapters into that output")


def _adapter_patches(adapter: Adapter, base_dir: Path, sources: dict, config: dict, notes: list[str],
                     about: str) -> dict[str, list[Patch]]:
    """One adapter's patches, keyed by the checkpoint tensors they change (see _match_names)."""
    owners = wrapper_owners(adapter)
    layout = _memory_layout(base_dir, sources, owners) if owners else None
    patches, unmatched = patches_by_tensor(adapter, layout.parameters if layout else None)
    oriented = {k: [_orient(p, k, config) for p in v] for k, v in patches.items()}
    by_name, layout = _match_names(base_dir, sources, oriented, unmatched, layout)
    if layout is not None and layout.used:
        notes.append(f"{about}the adapter is named after the model in memory: {layout.used} of its targets are mapped "
                     f"onto the checkpoint's tensors by {layout.description}")
    check_untrained(adapter.config, sources, {k for k, v in by_name.items() if any(isinstance(p, LoRA) for p in v)})
    return by_name


def _weighted(patch: Patch, index: int, weight: float, name: str, target: str) -> Patch:
    """The patch of adapter number `index`, its delta scaled by the adapter's weight. A tensor the adapter
    saves whole or in rows (modules_to_save, bias="all", trainable tokens) replaces the base's: there is no
    delta to scale, so only weight 1 takes it as it is. A saved base layer is the weight the adapter's LoRA
    acts on (PEFT loads it into the base model, under every adapter), not a change to weigh."""
    if isinstance(patch, (Replace, ReplaceRows)):
        if weight != 1 and not _saved_base(patch):
            raise LorafuseError(
                f"adapter {name} replaces {target} with a tensor it saved ({patch.origin}), which has no weighted "
                f"version: give it weight 1, not {weight:g}, or leave the tensor out of the adapter")
        return replace(patch, adapter=index)
    return replace(patch, scale=patch.scale * weight, adapter=index)


def _saved_base(patch: Patch) -> bool:
    """A base layer's weight saved with the adapter (save_embedding_layers: the embedding its LoRA was trained
    on, resized or not)."""
    return isinstance(patch, Replace) and patch.origin.endswith((".base_layer.weight", ".base_layer.bias"))


def _check_overlaps(by_name: dict[str, list[Patch]], names: list[str]) -> None:
    """A tensor one adapter replaces (whole, or some rows) cannot take another adapter's change as well: the
    other's delta was trained on the base's tensor, and a replaced tensor has no delta to weigh against it.
    Base layers saved by several adapters must be one tensor: each adapter's LoRA was trained on its own."""
    for target, chain in by_name.items():
        bases = [p for p in chain if _saved_base(p)]
        for other in bases[1:]:
            if other.adapter != bases[0].adapter and not _same_values(bases[0].source, other.source):
                raise LorafuseError(
                    f"adapters {names[bases[0].adapter]} and {names[other.adapter]} save different base weights for "
                    f"{target} ({bases[0].origin}): they were trained on different base models, and one merge cannot "
                    "give both theirs; merge them into their own bases")
        replacing = next((p for p in chain if isinstance(p, (Replace, ReplaceRows)) and not _saved_base(p)), None)
        other = next((p for p in chain if replacing is not None and p.adapter != replacing.adapter), None)
        if other is not None:
            what = "replaces it too" if isinstance(other, (Replace, ReplaceRows)) and not _saved_base(other) \
                else "changes it"
            raise LorafuseError(
                f"adapter {names[replacing.adapter]} replaces {target} with a tensor it saved and adapter "
                f"{names[other.adapter]} {what}: a replaced tensor has no weighted sum with another adapter's change; "
                "merge one adapter first and the other into that output, or leave one of them out")


def remeasured(plan: Plan) -> Plan:
    """The plan with the disks' free space measured again: a resumed merge first deletes what its earlier
    run left half written."""
    return replace(plan, **_free_space(plan.out, plan.base))


def _free_space(out: Path | None, base: Checkpoint) -> dict:
    """The Plan fields that say how much room the disks have: OUT's, and the cache's when shards are to be
    downloaded into it."""
    if out is None:
        return {}
    out_disk = existing_ancestor(out)
    found = {"disk_free": shutil.disk_usage(out_disk).free}
    if base.remote:
        cache = existing_ancestor(cache_dir())
        found["cache_free"] = shutil.disk_usage(cache).free
        found["cache_shares_out_disk"] = os.stat(cache).st_dev == os.stat(out_disk).st_dev
    return found


def _set_dtype(config: dict, dtype: str) -> None:
    """The output config names the output dtype, wherever the base's config named one."""
    for holder in _configs(config):
        for key in ("dtype", "torch_dtype"):
            if key in holder:
                holder[key] = CONFIG_DTYPES[dtype]
    if not any(k in config for k in ("dtype", "torch_dtype")):
        config["dtype"] = CONFIG_DTYPES[dtype]


def carried_files(base: Path, adapters: list[Path], names: list[str]) -> list[Path]:
    """The base's non-weight files, with the adapters' tokenizer files taking precedence (training may
    have added tokens); subfolders are not carried. Two adapters with different tokenizer files of one name
    are refused: the merged model can have one tokenizer only.

    Whatever is carried lands in OUT, its manifest and a --push-to-hub upload, so each must be a regular
    file inside its folder, by the rule for weights (sources.local.check_inside): a link elsewhere would
    publish what it points to, and a FIFO or device would hang or never end. base's config.json is
    checked too: OUT's config is made from it."""
    chosen = {}
    for path in sorted(base.iterdir()):
        if not path.name.startswith(".") and path.name not in NOT_CARRIED and not is_weight_file(path.name):
            chosen[path.name] = path
    from_adapter: dict[str, tuple[Path, str]] = {}
    for adapter, name in zip(adapters, names):
        for path in sorted(adapter.iterdir()):
            if not TOKENIZER_FILE.match(path.name):
                continue
            earlier = from_adapter.get(path.name)
            if earlier and _is_carried_file(path) and _is_carried_file(earlier[0]) \
                    and path.read_bytes() != earlier[0].read_bytes():
                raise LorafuseError(f"adapters {earlier[1]} and {name} have different {path.name} files, and the merged "
                                    "model can have one tokenizer only; merge adapters trained with the same tokenizer")
            from_adapter[path.name] = (path, name)
            chosen[path.name] = path
    _is_carried_file(base / "config.json")
    return [path for path in chosen.values() if _is_carried_file(path)]


def _is_carried_file(path: Path) -> bool:
    """True for a regular file inside its folder, False for a folder; anything else is a one-line error."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        raise LorafuseError(f"{path} cannot be read ({e.strerror.lower()}); remove it or download the model again") from None
    check_inside(path.parent, path)
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        raise LorafuseError(f"{path} is not a regular file (a FIFO, socket or device); remove it from the folder")
    return stat.S_ISREG(mode)


def _base_mismatch(trained_on: str | None, base: str, base_dir: Path, quant_method: str | None) -> list[str]:
    """Say when the adapter was trained on another checkpoint, and whether it was a quantized one."""
    if not trained_on or trained_on == base or Path(trained_on).name == base_dir.name \
            or Path(trained_on).resolve() == base_dir.resolve():
        return []
    trained_quantized = bool(QUANTIZED_NAME.search(trained_on))
    compare = f"`lorafuse inspect {base} ADAPTER --compare-base {trained_on}` measures whether that matters"
    if trained_quantized and not quant_method:
        return [f"the adapter was trained on {trained_on}, a quantized checkpoint, and BASE is 16-bit: the merge uses "
                f"the original weights, not the dequantized ones it was trained against; {compare}"]
    if quant_method and not trained_quantized:
        return [f"the adapter was trained on {trained_on}, and BASE is quantized ({quant_method}): the merge uses its "
                f"dequantized weights, not the ones the adapter was trained against; {compare}"]
    return [f"the adapter was trained on {trained_on}; merging into {base}"]


def _check_roles(base, adapter, adapter_dir: Path) -> None:
    """A model folder in ADAPTER's place would fail with "has no adapter_config.json" (and the adapter in
    BASE's place with "has no config.json"), which does not say that the order of the arguments is wrong."""
    if (adapter_dir / ADAPTER_CONFIG).is_file() or not (adapter_dir / "config.json").is_file():
        return
    usage = "the base comes first: lorafuse merge [BASE] ADAPTER OUT"
    if base is not None and os.path.isfile(os.path.join(os.path.expanduser(base), ADAPTER_CONFIG)):
        raise LorafuseError(f"BASE and ADAPTER look swapped: {base} is a PEFT adapter and {adapter} a model; {usage}")
    raise LorafuseError(f"{adapter} is a model (config.json, no {ADAPTER_CONFIG}), not a PEFT adapter; {usage}")


def _parse_dtype(dtype: str) -> str | None:
    if dtype == "auto":
        return None
    if dtype.lower() not in DTYPE_NAMES:
        raise LorafuseError(f"--dtype {dtype!r} is not one of auto, bf16, fp16, fp32")
    return DTYPE_NAMES[dtype.lower()]


def work_path(out: Path, kind: str) -> Path:
    """A hidden path next to OUT that a merge creates and deletes: kind "partial" (the staging folder),
    "lock" (the lock file) or "old" (the replaced OUT, with --force where no atomic exchange exists)."""
    return out.parent / f".{out.name}.lorafuse-{kind}"


def output_path(out: str | os.PathLike) -> Path:
    """OUT as an absolute, normalised path, taken once before anything else looks at it: the staging, lock
    and old-OUT paths are built from its name, which `.`, `..`, `dir/..` or a trailing slash would leave empty
    or wrong. A `..` is resolved as the kernel does, after the links before it (normalising text alone would
    take `link/../out` to the wrong folder). An empty OUT, the working folder, a folder above it and `/`
    are refused: replacing or swapping them is never what was meant, and some cannot be renamed at all."""
    text = os.fspath(out)
    if not text:
        raise LorafuseError("the output path is empty; name the output folder: lorafuse merge [BASE] ADAPTER OUT")
    named, parts = text, text.split(os.sep)
    if ".." in parts:
        last = len(parts) - parts[::-1].index("..")
        named = os.path.join(os.path.realpath(os.sep.join(parts[:last])), os.sep.join(parts[last:]))
    path = Path(os.path.abspath(named))
    if len(os.fsencode(f".{path.name}.lorafuse-partial")) > NAME_MAX:  # the longest name lorafuse makes from it
        raise LorafuseError(f"the output folder's name is too long ({len(os.fsencode(path.name))} bytes): lorafuse "
                            f"keeps its work next to it under a name {len('..lorafuse-partial')} bytes longer, and "
                            f"a name may have {NAME_MAX}; choose a shorter one")
    cwd = Path.cwd()
    here = _identities_above(cwd) | {identity_of(cwd, follow=True)}
    if identity_of(path, follow=True) in here:  # None, for a new folder, is in neither
        where = "/, the root folder" if path.parent == path else f"{path}, the current folder or one above it"
        raise LorafuseError(f"the output path {text!r} is {where}; name a new folder (or an earlier merge) as OUT")
    return path


def _check_out(out: Path, base: Checkpoint, adapter: Adapter) -> None:
    """Nothing a merge into OUT writes, replaces or deletes (OUT, and its staging folder, lock file and
    old OUT) may be, contain or lie inside an input folder or a file read from it: that input would be
    destroyed. Paths are compared as the files they name ((device, inode), after links), so that no second
    name escapes the check: symbolic links (a Hub snapshot's files are links into the cache), a bind mount
    showing a folder elsewhere, a hard link. Base shards still to download are not inputs yet (with
    --low-disk they go to the staging folder)."""
    targets = [("output folder", out), ("lorafuse's staging folder", work_path(out, "partial")),
               ("lorafuse's lock file", work_path(out, "lock")),
               ("lorafuse's folder for the old output", work_path(out, "old"))]
    downloads = {f.path for f in base.remote.values()}
    inputs = [("base model folder", base.folder), ("adapter folder", adapter.folder)]
    inputs += [("base model file", p) for p in {*base.weight_files, *base.folder.iterdir()} - downloads]
    inputs += [("adapter file", p) for p in {adapter.weights_file, *adapter.folder.iterdir()}]
    found = [(label, target, identity_of(target, follow=True), _identities_above(target)) for label, target in targets]
    for what, path in inputs:
        file, above = identity_of(path, follow=True), _identities_above(path)
        for label, target, target_file, target_above in found:
            if (target_file is not None and target_file in above | {file}) or file in target_above:
                raise LorafuseError(f"{label} {target} overlaps the {what} {path.resolve()}; "
                                    "choose an output folder elsewhere")


def _identities_above(path: Path) -> set[tuple[int, int]]:
    """The identities of the existing folders above a path, by every spelling of it: what contains it."""
    return {found for spelling in _spellings(path) for parent in spelling.parents
            if (found := identity_of(parent, follow=True)) is not None}


def _spellings(path: Path) -> set[Path]:
    """A path as named, and where symbolic links lead it: through its parent folders, and itself too."""
    return {Path(os.path.abspath(path)), path.parent.resolve() / path.name, path.resolve()}


def _memory_layout(folder: Path, sources: dict, modules: set[str] = frozenset()):
    from .layouts import memory_layout

    import importlib.util

    install = {"transformers": "transformers", "torch": "'lorafuse[torch]'"}
    missing = [name for name in install if importlib.util.find_spec(name) is None]
    if missing:
        raise LorafuseError("the adapter is named after the model in memory, not after the checkpoint's tensors, and "
                            "mapping one onto the other needs transformers and PyTorch: pip install "
                            + " ".join(install[name] for name in missing))
    return memory_layout(folder, {k: tuple(ref.shape) for k, ref in sources.items()}, modules)


def _match_names(folder: Path, sources: dict, patches: dict[str, list[Patch]], unmatched: list[str],
                 layout) -> tuple[dict[str, list[Patch]], object]:
    """The patches keyed by checkpoint tensor names instead of the model's (as PEFT sees modules).

    Usually they are equal. Some checkpoints omit the model's base prefix (`h.0...` for
    GPT2LMHeadModel's `transformer.h.0...`): then one leading component is dropped. Names still unmatched
    are looked up in the in-memory layout transformers gives the checkpoint (layouts: renamed prefixes,
    experts stored one by one), where each patch is cut into the stored pieces; transformers is imported
    only then. Anything still unmatched is an error that names it and the closest checkpoint tensors:
    a delta is never silently dropped. Returns the patches and the layout used (None: none needed)."""
    names = set(sources)
    found: dict[str, list[Patch]] = {}
    missing = []
    for target, chain in patches.items():
        rest = target.partition(".")[2]
        if layout is not None and _converted(layout, target):
            missing.append(target)  # stored under its own name, but converted on load (a transposed stack)
        elif target in names or (target == HEAD and not _stored_head(names)):
            found.setdefault(target, []).extend(chain)
        elif rest in names:
            found.setdefault(rest, []).extend(chain)
        else:
            missing.append(target)
    if missing and layout is None:
        try:
            layout = _memory_layout(folder, sources)
        except LorafuseError as e:
            why = str(e)
        else:
            why = None
    unused, used = list(unmatched), 0
    for target in missing:
        if layout is not None and target in layout.unplaceable:
            raise LorafuseError(layout.unplaceable[target])
        pieces = layout.pieces.get(target) if layout is not None else None
        if pieces:
            used += 1
            for piece in pieces:
                found.setdefault(piece.key, []).extend(cut(p, piece, layout.shapes[target], target) for p in patches[target])
        elif target == HEAD:
            found.setdefault(target, []).extend(patches[target])
        elif layout is not None and any(alias in names for alias in layout.tied.get(target, ())):
            raise LorafuseError(_tied_change(target, layout.tied[target], names, patches))
        else:
            unused.extend(o for p in patches[target] for o in p.origins)
    if layout is not None:
        layout = replace(layout, used=used)
    if unused:
        raise LorafuseError(_unmatched(unused, sources, layout, why if missing and layout is None else None))
    return found, layout


def _tied_change(target: str, aliases: tuple[str, ...], names: set[str], patches: dict) -> str:
    """Why a change to one of several tied tensors cannot be merged: the checkpoint stores them once (T5's
    `shared` is also its encoder's and decoder's embed_tokens), PEFT changes each on its own path."""
    stored = next(a for a in aliases if a in names)
    changed = [a for a in aliases if a in patches]
    left = [a for a in aliases if a not in patches and a != stored]
    if len(changed) > 1:
        why = f"the adapter changes {' and '.join(changed)} differently"
    else:
        why = f"the adapter changes {target} and leaves {', '.join(left)} alone"
    return (f"{why}, but the checkpoint stores them as one tensor, {stored} (tied weights): one stored tensor cannot "
            "hold different changes, so no exact merge exists; train the adapter without these modules (or with "
            "modules_to_save), or untie the weights in the base model first")


def _converted(layout, target: str) -> bool:
    """Whether transformers makes `target` from stored tensors other than one of that name, as it is."""
    pieces = layout.pieces.get(target, ())
    return target in layout.unplaceable or bool(pieces) and not (
        len(pieces) == 1 and pieces[0].key == target and pieces[0].is_whole(layout.shapes[target]))


def _stored_head(names: set[str]) -> bool:
    return any(n.endswith("." + HEAD) for n in names)


def _unmatched(unused: list[str], sources: dict, layout, why: str | None) -> str:
    """What cannot be matched, the stored tensors closest to the first of them, and what was tried."""
    import difflib

    shown = ", ".join(unused[:4]) + (f" and {len(unused) - 4} more" if len(unused) > 4 else "")
    module = split_key(unused[0])[0]
    close = difflib.get_close_matches(module, [n.rsplit(".", 1)[0] for n in sources], n=3, cutoff=0.5)
    tried = "exact names, one leading component dropped"
    tried += f", and {layout.description}" if layout is not None else f"; transformers' layout was not tried: {why}" if why else ""
    nearest = f"; the closest checkpoint modules to {module} are {', '.join(close)}" if close else \
        f"; no checkpoint module resembles {module}, so the adapter was likely trained on a different base model"
    return f"{len(unused)} adapter tensor(s) match nothing in the base model: {shown}{nearest} (tried {tried})"


def _orient(patch: Patch, target: str, config: dict) -> Patch:
    """Whether a linear LoRA's weight is stored in×out (a transformers Conv1D), as PEFT decides it.

    PEFT sets fan_in_fan_out per layer from the module's type: False for nn.Linear (with a warning) and
    True for Conv1D, whatever the config says; it saves whichever value the last layer set. So the saved
    flag is no evidence: the model type says which modules are Conv1D. Only a model with its own code
    (auto_map), whose module types lorafuse cannot know, is left to the shapes and the saved flag
    (LoRA.transposed).
    """
    if not isinstance(patch, LoRA) or patch.kind != "linear" or config.get("auto_map"):
        return patch
    conv1d = set().union(*(CONV1D_MODULES.get(t, ()) for t in model_types(config)))
    module = target.removesuffix(".weight").rpartition(".")[2]
    return replace(patch, fan_in_fan_out=module in conv1d, layer_known=True)


def model_types(config: dict) -> list[str]:
    """The model_type of the config and of every config nested in it (an encoder-decoder's decoder)."""
    found = [config["model_type"]] if isinstance(config.get("model_type"), str) else []
    for value in config.values():
        if isinstance(value, dict):
            found += model_types(value)
    return found


def _configs(config: dict) -> list[dict]:
    """The config and its nested text/LLM configs (multimodal models keep vocab and tying there)."""
    found = [config]
    for key in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(key), dict):
            found.append(config[key])
    return found


def _tie_flag(config: dict) -> bool:
    for holder in _configs(config):
        if "tie_word_embeddings" in holder:
            return bool(holder["tie_word_embeddings"])
    return True  # transformers' PretrainedConfig default


def _set_tie(config: dict, value: bool) -> None:
    for holder in _configs(config):
        if "tie_word_embeddings" in holder or holder is config:
            holder["tie_word_embeddings"] = value


def _embedding_name(checkpoint: Checkpoint) -> str | None:
    found = [n for n in checkpoint.tensors if n.endswith(EMBEDDING_SUFFIXES) and len(checkpoint.tensors[n].shape) == 2]
    return min(found, key=len) if found else None


def _untie(checkpoint: Checkpoint, config: dict, sources: dict, patches: dict, notes: list[str]) -> None:
    """Give the output its own lm_head when the adapter makes it differ from the input embedding.

    In a tied model the head *is* the embedding, so weights loaded into the embedding (a saved
    base_layer.weight) reach the head too, and PEFT ties the head's trainable tokens to the
    embedding's unless the adapter has its own for the head; LoRA deltas and modules_to_save copies
    act on one module only (PEFT's unmerged forward).
    """
    embed = _embedding_name(checkpoint)
    if HEAD in checkpoint.tensors or embed is None or not _tie_flag(config):
        if HEAD in patches and HEAD not in checkpoint.tensors:
            raise LorafuseError(f"the adapter changes {HEAD} but the base model has no such tensor")
        return
    own = list(patches.get(HEAD, ()))
    shared = [p for p in patches.get(embed, ()) if _reaches_tied_head(p, own)]
    head = shared + own
    if head == list(patches.get(embed, ())):
        patches.pop(HEAD, None)
        return
    sources[HEAD] = checkpoint.tensors[embed]
    patches[HEAD] = head
    _set_tie(config, False)
    notes.append(f"the adapter makes {HEAD} differ from {embed}: the output gets its own {HEAD} and tie_word_embeddings=false")


def _reaches_tied_head(patch: Patch, head_patches: list[Patch]) -> bool:
    if isinstance(patch, Replace):
        return patch.origin.endswith(".base_layer.weight")
    return isinstance(patch, ReplaceRows) and not any(isinstance(p, ReplaceRows) for p in head_patches)


def _follow_vocab(tensors: list[TensorPlan], config: dict, notes: list[str]) -> None:
    """After a vocabulary resize (a replaced embedding with more rows), vocab_size follows."""
    rows = {t.shape[0] for t in tensors if t.name == HEAD or t.name.endswith(EMBEDDING_SUFFIXES)}
    changed = [t for t in tensors if (t.name == HEAD or t.name.endswith(EMBEDDING_SUFFIXES)) and t.shape != tuple(t.source.shape)]
    if not changed:
        return
    if len(rows) != 1:
        raise LorafuseError(f"after the merge the embedding and the output head have different vocabulary sizes {sorted(rows)}; the adapter is inconsistent")
    vocab = rows.pop()
    for holder in _configs(config):
        if "vocab_size" in holder:
            holder["vocab_size"] = vocab
    notes.append(f"the adapter resizes the vocabulary: vocab_size = {vocab}")


def _is_nf4_uint8(quantization: dict | None) -> bool:
    """A bitsandbytes NF4 base stored in uint8: its untouched weights can be copied into NF4 output."""
    q = quantization or {}
    return bool(q.get("load_in_4bit") or q.get("_load_in_4bit")) and q.get("bnb_4bit_quant_type") == "nf4" \
        and str(q.get("bnb_4bit_quant_storage", "uint8")).removeprefix("torch.") == "uint8"


def _to_nf4(tensors: list[TensorPlan], base_quantization: dict | None, config: dict, notes: list[str]) -> list[TensorPlan]:
    """merged_4bit: write the merged model as transformers saves a bitsandbytes NF4 model.

    From an NF4 base, exactly the weights that were 4-bit stay 4-bit (untouched ones are copied as
    they are); from any other base (16-bit, FP4, 8-bit, FP8), every 2-D linear weight but the
    embeddings, the output head and llm_int8_skip_modules, as transformers' own quantization chooses.
    """
    quantization = dict(base_quantization or NF4_CONFIG)
    skip = quantization.get("llm_int8_skip_modules") or []
    chosen = []
    for t in tensors:
        if base_quantization is not None:
            wanted = isinstance(t.source, QuantizedTensor) and t.source.method == "bnb-nf4"
        else:
            wanted = (len(t.shape) == 2 and t.name.endswith(".weight") and t.dtype in CASTABLE and t.name != HEAD
                      and not t.name.endswith(EMBEDDING_SUFFIXES) and not any(s in t.name for s in skip))
        chosen.append(replace(t, to_nf4=wanted) if wanted else t)
    if base_quantization is None:
        quantization["bnb_4bit_compute_dtype"] = next((CONFIG_DTYPES[t.dtype] for t in chosen if t.to_nf4), "bfloat16")
    config["quantization_config"] = quantization
    notes.append(
        f"merged_4bit: {sum(t.to_nf4 for t in chosen)} weights are re-quantized to NF4 after merging; "
        "this loses precision against the 16-bit merge (as with every tool), keep the 16-bit output too if you can"
    )
    return chosen


def describe(plan: Plan, verbose: bool = False) -> list[str]:
    """The plan as a person reads it: what is matched and how, what it costs."""
    tensors = plan.tensors
    copied = [t for t in tensors if t.is_copy]
    lines = [f"base     {plan.base.folder}  ({len(plan.base.tensors)} tensors, {human_size(plan.base.total_bytes)} in {len(plan.base.weight_files)} file(s))"]
    lines += _describe_adapters(plan)
    lines += [
        f"changes  {len(plan.merged)} base tensors: {_how(plan.counts)}",
        f"copies   {len(copied)} tensors as raw bytes ({human_size(sum(t.source.nbytes for t in copied))})",
        *(plan.file_output.describe() if plan.file_output else
          [f"output   {len(plan.shards)} shard(s), {human_size(plan.output_bytes)}, dtype {plan.dtype}"
           + (f" -> {plan.out}" if plan.out else "")]),
        f"memory   about {human_size(plan.peak_memory)} for the tensors in flight, {plan.depth} at a time at most "
        "(plus the Python runtime)",
    ]
    lines += _describe_disk(plan)
    lines += [f"note     {n}" for n in plan.notes]
    if verbose:
        for t in sorted(plan.merged, key=lambda t: natural(t.name)):
            lines.append(f"  {t.name}: {' + '.join(patch_label(plan, p) for p in t.patches)}")
    return lines


def _describe_adapters(plan: Plan) -> list[str]:
    """A line per adapter: what it is and, when it is one of several or weighted, its weight and the tensors
    it changes."""
    lines = []
    for index, (adapter, weight) in enumerate(zip(plan.adapters, plan.weights)):
        config = adapter.config
        number = f"({index + 1}) " if len(plan.adapters) > 1 else ""
        line = (f"adapter  {number}{adapter.folder}  ({'DoRA' if config.get('use_dora') else 'LoRA'} r={config.get('r')} "
                f"alpha={config.get('lora_alpha')}{' rsLoRA' if config.get('use_rslora') else ''}, "
                f"{len(adapter.tensors)} tensors)")
        if len(plan.adapters) > 1 or weight != 1:
            changed = [t for t in plan.merged if any(p.adapter == index for p in t.patches)]
            labels = Counter(p.label for t in changed for p in t.patches if p.adapter == index)
            line += f" weight {weight:g}: changes {len(changed)} base tensors: {_how(labels)}"
        lines.append(line)
    return lines


def patch_label(plan: Plan, patch: Patch) -> str:
    """A patch's kind, and with several adapters which one it comes from (numbered from 1, as listed)."""
    return f"{patch.label} ({patch.adapter + 1})" if len(plan.adapters) > 1 else patch.label


def _how(labels: dict[str, int]) -> str:
    return ", ".join(f"{n} {label}" for label, n in sorted(labels.items())) or "nothing"


def _describe_disk(plan: Plan) -> list[str]:
    """What each mode needs on disk, so a user whose disk cannot hold two copies knows what to pass. The
    --low-disk modes are listed only where they can matter: when base shards are to be downloaded (they then
    stay out of the cache), or when the output does not fit the free disk (with --push-to-hub each uploaded
    shard is deleted, also for a base on the disk)."""
    remote = plan.base.remote
    lines = []
    if remote:
        lines.append(f"download {len(remote)} base shard(s) not in the cache, {human_size(plan.base.download_bytes)}, "
                     "each fetched when the merge reaches it")
    out, cache = plan.disk_needs()
    free = plan.disk_free
    text = f"disk     needs {human_size(out)} for the output" + (f" + {human_size(cache)} in the cache" if cache else "")
    lines.append(text + (f"; {human_size(free)} free" if free is not None else ""))
    if plan.file_output or (not remote and (free is None or out <= free)):  # --low-disk: for shards only
        return lines
    for flags, pushing in (("--low-disk", False), ("--low-disk --push-to-hub", True)):
        need = plan.disk_needs(low_disk=True, pushing=pushing)[0]
        if need < out + cache:
            lines.append(f"         {flags}: {human_size(need)}")
    return lines
