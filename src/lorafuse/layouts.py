"""The checkpoint's layout on disk against the layout of the model in memory, by transformers' own rules.

transformers 5 converts a checkpoint when it loads it and converts it back when it saves it: a vision-
language model's `language_model.model.layers.*` becomes `model.language_model.layers.*`, and MoE
experts stored one by one (`experts.N.gate_proj.weight`, `experts.N.up_proj.weight`) become one fused
3-D parameter (`experts.gate_up_proj`). A PEFT adapter is named after the model in memory. This module
asks transformers which stored tensors make each in-memory tensor and where each one sits in it (a
`Piece`), so that a delta computed for the in-memory tensor can be cut into the pieces stored on disk.

The rules are transformers' (its conversion mapping, gathered for the model class by
get_model_conversion_mapping, keys renamed by its rename_source_key, on a model built on the meta
device): nothing here goes stale with a transformers release except the few conversion operations it
knows how to place (stacking experts, concatenating, transposing); any other is refused by name.
transformers and torch are imported only when an adapter's names do not match the checkpoint's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

from .errors import LorafuseError
from .patches import AddBias, ExpertLoRA, LoRA, Patch, Replace, SliceRef


@dataclass(frozen=True)
class Piece:
    """A stored tensor as a part of an in-memory tensor: `index` has one entry per in-memory dimension,
    an int (a dimension the stored tensor lacks: the expert it is) or a (start, stop) range; `dims` lists,
    for each stored dimension, the in-memory dimension it is (a transposed piece has them swapped)."""

    key: str
    index: tuple
    dims: tuple[int, ...]

    def is_whole(self, shape: tuple[int, ...]) -> bool:
        return self.dims == tuple(range(len(shape))) and all(
            isinstance(i, tuple) and i == (0, n) for i, n in zip(self.index, shape))


@dataclass(frozen=True)
class Layout:
    """How the checkpoint's tensors make the in-memory model's (only those that differ are listed)."""

    description: str  # e.g. "transformers 5.24's conversion rules for LlavaForConditionalGeneration"
    pieces: dict[str, tuple[Piece, ...]]  # in-memory tensor name -> the stored tensors that make it
    shapes: dict[str, tuple[int, ...]]  # every in-memory tensor name -> its shape
    modules: dict[str, tuple[tuple[str, ...], bool]] = field(default_factory=dict)  # see `parameters`
    tied: dict[str, tuple[str, ...]] = field(default_factory=dict)  # name -> every name of its tied group
    unplaceable: dict[str, str] = field(default_factory=dict)  # name -> why its pieces cannot be placed
    used: int = 0  # how many of an adapter's targets were mapped through it

    def parameters(self, module: str) -> tuple[tuple[str, ...], bool, dict[str, tuple[int, ...]]] | None:
        """(the module's own parameters in registration order, whether it stores experts as
        (experts, in, out): `is_transposed`, their shapes), for PEFT's ParamWrapper; None for a module
        the model lacks."""
        if module not in self.modules:
            return None
        names, is_transposed = self.modules[module]
        return names, is_transposed, {n: self.shapes[f"{module}.{n}"] for n in names}


def memory_layout(folder: Path, stored: dict[str, tuple[int, ...]], modules: set[str] = frozenset()) -> Layout:
    """The in-memory layout of the model in `folder` (its config.json), for the `stored` tensors (name ->
    shape, the checkpoint's logical tensors: quantized weights already folded into one), with the
    parameters of `modules` (paths in the in-memory model)."""
    import torch
    import transformers
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key

    model = _meta_model(folder, transformers, torch)
    cls = type(model).__name__
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    prefix = model.base_model_prefix

    pieces: dict[str, list[Piece]] = {}
    groups: dict[str, tuple[object, dict[str, list[str]]]] = {}
    for key in sorted(stored, key=dot_natural_key):  # transformers' own order, which orders the experts
        name, pattern = rename_source_key(key, renamings, converters, prefix, shapes)
        if name not in shapes and key in shapes:  # as the loader: a key that needed no renaming
            name, pattern = rename_source_key(key, [], [], prefix, shapes)
        if name not in shapes:
            continue
        if pattern is None:
            if name != key:
                pieces[name] = [Piece(key, tuple((0, n) for n in shapes[name]), tuple(range(len(shapes[name]))))]
            continue
        converter, sources = groups.setdefault(name, (by_pattern[pattern], {}))
        sources.setdefault(pattern, []).append(key)
    unplaceable = {}
    for name, (converter, sources) in groups.items():
        try:
            pieces[name] = _place(name, converter, sources, stored, shapes[name])
        except LorafuseError as e:  # only an error if the adapter changes this tensor
            unplaceable[name] = str(e)
    found = {}
    for module in modules:
        try:
            owner = model.get_submodule(module)
        except AttributeError:
            continue
        found[module] = (tuple(n for n, _ in owner.named_parameters(recurse=False)), bool(getattr(owner, "is_transposed", False)))
    aliases: dict[int, list[str]] = {}
    for param_name, param in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(param), []).append(param_name)
    tied = {n: tuple(group) for group in aliases.values() if len(group) > 1 for n in group}
    description = f"transformers {transformers.__version__}'s conversion rules for {cls}"
    return Layout(description, {k: tuple(v) for k, v in pieces.items()}, shapes, found, tied, unplaceable)


def _meta_model(folder: Path, transformers, torch):
    """The model class config.json names (`architectures`), built on the meta device: no memory, no
    weights read; a model with its own code is not built (its code is not run)."""
    import json

    config = json.loads((folder / "config.json").read_text())
    names = config.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names and isinstance(names[0], str) else None
    if config.get("auto_map"):
        raise LorafuseError("the base model has its own code (auto_map in config.json), which lorafuse does not run, "
                            "so its checkpoint layout cannot be mapped")
    if cls is None:
        raise LorafuseError(f"the base model's class {names[0] if names else '(none in config.json)'} is not one "
                            f"transformers {transformers.__version__} knows, so its checkpoint layout cannot be mapped")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    try:
        with torch.device("meta"):
            return cls(transformers.AutoConfig.from_pretrained(folder))
    except Exception as e:  # a config transformers cannot build a model from
        raise LorafuseError(f"transformers cannot build {names[0]} from {folder / 'config.json'} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); fix the config or upgrade transformers") from None


def _place(name: str, converter, sources: dict[str, list[str]], stored: dict, shape: tuple[int, ...]) -> list[Piece]:
    """Follow a converter's operations on where each stored tensor lies: a stored tensor starts as the
    whole of itself; stacking (MergeModulelist) gives it an index in a new dimension, concatenating moves
    it along one, transposing swaps two. `where` is, per current dimension, ("index", i) or
    ("stored", stored dimension, offset, length)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose

    where = {key: [("stored", d, 0, n) for d, n in enumerate(stored[key])] for keys in sources.values() for key in keys}
    ordered = [p for p in converter.source_patterns if p in sources]
    for op in converter.operations:
        if isinstance(op, MergeModulelist):
            for keys in sources.values():
                for i, key in enumerate(keys):
                    where[key].insert(op.dim, ("index", i, 1))
        elif isinstance(op, Concatenate):
            offset = 0
            for pattern in ordered:
                first = where[sources[pattern][0]][op.dim]
                length = len(sources[pattern]) if first[0] == "index" else first[3]
                for key in sources[pattern]:
                    where[key][op.dim] = _moved(where[key][op.dim], offset)
                offset += length
        elif isinstance(op, Transpose):
            if op.check_dims and _extent(where) == shape:  # transformers swaps only what does not fit
                continue
            for key in where:
                dims = where[key]
                dims[op.dim0], dims[op.dim1] = dims[op.dim1], dims[op.dim0]
        else:
            raise LorafuseError(f"{name} is made from the checkpoint by transformers' {type(op).__name__}, which lorafuse "
                                "cannot split a delta across yet; please report this model")
    if _extent(where) != shape:
        raise LorafuseError(f"the checkpoint tensors that make {name} {shape} make {_extent(where)} as transformers maps "
                            "them; was the checkpoint saved for another configuration?")
    pieces = []
    for key, dims in where.items():
        index, order = [], [None] * len(stored[key])
        for i, entry in enumerate(dims):
            if entry[0] == "index":
                index.append(entry[1])
            else:
                index.append((entry[2], entry[2] + entry[3]))
                order[entry[1]] = i
        piece = Piece(key, tuple(index), tuple(order))
        if len(index) != len(shape) or any(isinstance(i, tuple) and i[1] > n or isinstance(i, int) and i >= n
                                           for i, n in zip(index, shape)):
            raise LorafuseError(f"checkpoint tensor {key} {tuple(stored[key])} does not fit {name} {shape} as transformers "
                                "maps it; was the checkpoint saved for another configuration?")
        pieces.append(piece)
    covered = sum(math.prod(stored[p.key]) for p in pieces)
    if covered != math.prod(shape):
        raise LorafuseError(f"the checkpoint tensors that make {name} {shape} hold {covered} values, not "
                            f"{math.prod(shape)}; the checkpoint is incomplete or saved for another configuration")
    return pieces


def _extent(where: dict[str, list[tuple]]) -> tuple[int, ...]:
    """The shape of the tensor the stored tensors make, as they are placed so far: along each dimension, to
    the end of the furthest piece."""
    dims = len(next(iter(where.values())))
    return tuple(max(entry[1] + 1 if entry[0] == "index" else entry[2] + entry[3] for entry in (w[d] for w in where.values()))
                 for d in range(dims))


def _moved(entry: tuple, offset: int) -> tuple:
    if entry[0] == "index":
        return ("index", entry[1] + offset, 1)
    return ("stored", entry[1], entry[2] + offset, entry[3])


def cut(patch: Patch, piece: Piece, shape: tuple[int, ...], name: str) -> Patch:
    """The part of `patch` (on the in-memory tensor `name` of `shape`) that falls on one stored piece.

    A LoRA's delta s·B@A (out × in; its transpose where the weight is stored in × out) restricted to rows
    R and columns C is s·B[R]@A[:, C]: the piece's ranges pick rows of B and columns of A, and a piece
    stored transposed flips the orientation. An expert's piece first picks that expert's factors. A
    bias or a whole replacing tensor is cut like the tensor. Other patches (DoRA's norm, embeddings,
    trainable tokens) only apply to a tensor stored whole."""
    if piece.is_whole(shape):
        return patch
    flipped = list(piece.dims) != sorted(piece.dims)
    if isinstance(patch, ExpertLoRA) and piece.dims == (0, 2, 1) and all(i == (0, n) for i, n in zip(piece.index, shape)):
        return replace(patch, out_in=not patch.out_in)  # the whole stack, each expert stored transposed
    if isinstance(patch, ExpertLoRA) and len(shape) == 3 and isinstance(piece.index[0], int):
        (a, _), (_, b) = patch.factors(piece.index[0])
        rows, cols = piece.index[1:]
        out_range, in_range = (rows, cols) if patch.out_in else (cols, rows)
        return LoRA(SliceRef(patch.A, (a, slice(*in_range))), SliceRef(patch.B, (slice(*out_range), b)), patch.scale,
                    "linear", (not patch.out_in) != flipped, None, patch.origins, layer_known=True)
    if isinstance(patch, LoRA) and patch.kind == "linear" and patch.magnitude is None and len(shape) == 2 \
            and len(patch.A.shape) == 2 and all(isinstance(i, tuple) for i in piece.index):
        stored_in_out = patch.transposed(shape)
        rows, cols = piece.index
        out_range, in_range = (cols, rows) if stored_in_out else (rows, cols)
        return LoRA(SliceRef(patch.A, (slice(None), slice(*in_range))), SliceRef(patch.B, (slice(*out_range), slice(None))),
                    patch.scale, "linear", stored_in_out != flipped, None, patch.origins, layer_known=True)
    index = tuple(i if isinstance(i, int) else slice(*i) for i in piece.index)
    if isinstance(patch, AddBias) and not flipped:
        return replace(patch, bias=SliceRef(patch.bias, index))
    if isinstance(patch, Replace) and not flipped:
        return replace(patch, source=SliceRef(patch.source, index))
    raise LorafuseError(f"adapter tensor {patch.origins[0]} ({patch.label}) changes {name}, which the checkpoint stores "
                        f"in parts ({piece.key} is one); lorafuse cannot split that change yet, please report this model")
