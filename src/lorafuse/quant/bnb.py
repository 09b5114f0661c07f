"""bitsandbytes checkpoints (4-bit NF4/FP4 and LLM.int8) as transformers saves them, in pure torch.

Matched bit for bit against bitsandbytes 0.50 on the CPU (`bitsandbytes/functional.py`,
`backends/default/ops.py`, `backends/cpu/ops.py` and the `libbitsandbytes_cpu` kernels), so no
bitsandbytes (and no GPU) is needed at run time.

What transformers writes for a 4-bit `Linear4bit` named X (`Linear4bit._save_to_state_dict` +
`QuantState.as_dict(packed=True)`):

    X.weight                                   packed nibbles, shape (ceil(n/2) / itemsize, 1), dtype
                                               = bnb_4bit_quant_storage (uint8 by default); the first
                                               value of each byte is its high nibble
    X.weight.absmax                            float32 per block, or uint8 with double quantization
    X.weight.quant_map                         float32[16], the NF4 or FP4 code
    X.weight.nested_absmax                     float32 per 256 absmax values   } double quantization
    X.weight.nested_quant_map                  float32[256], bnb's dynamic map } only
    X.weight.quant_state.bitsandbytes__nf4     uint8 JSON (or `__fp4`), see `parse_quant_state`
    X.bias                                     unchanged

LLM.int8 (`Linear8bitLt._save_to_state_dict`): `X.weight` int8 (out, in), `X.SCB` float32 (out,)
holding each row's absmax, and `X.weight_format` uint8 0 ("row", the only layout still written).
Modules in `llm_int8_skip_modules` are saved as plain floating tensors with none of these keys.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..errors import LorafuseError
from ..formats.jsonfile import parse_json
from ..formats.safetensors import DTYPES, torch_dtype
from .base import Lookup, QuantizedTensor, byte_values, float_dtype

if TYPE_CHECKING:  # the functions that compute import it: claiming weights (planning) needs no torch
    import torch

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # what bnb's quantize/dequantize_4bit accept
NESTED_BLOCKSIZE = 256  # quantize_4bit always double-quantizes absmax in blocks of 256
QUANT_STATE_PREFIX = "quant_state.bitsandbytes__"
INT8_ROW_FORMAT = 0  # LINEAR_8BIT_WEIGHTS_FORMAT_MAPPING["row"]

# bitsandbytes.functional.get_4bit_type: NF4 is a quantile table, FP4 is e2m1 with bias 2 listed in
# bit-pattern order and scaled to [-1, 1]. Entry 8 of FP4 is written `0` (not -0.0) as bnb writes it.
_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
        -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
        0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
        0.7229568362236023, 1.0]
_FP4 = [0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0]
_STATE_KEYS = {"quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype", "nested_offset"}


def code_4bit(quant_type: str) -> torch.Tensor:
    """The 16-entry code bnb saves as `quant_map` (`get_4bit_type`, normalised the same way)."""
    import torch

    data = {"nf4": _NF4, "fp4": _FP4}.get(quant_type)
    if data is None:
        raise LorafuseError(f"unknown bitsandbytes 4-bit quant_type {quant_type!r}; expected 'nf4' or 'fp4'")
    t = torch.tensor(data, dtype=torch.float32)
    return t / t.abs().max()


def dynamic_map() -> torch.Tensor:
    """bnb's signed 8-bit dynamic map (`create_dynamic_map()`), the code of the nested absmax."""
    import torch

    data: list[float] = []
    for i in range(7):  # max_exponent_bits=7, total_bits=8, signed
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0, 1.0]
    return torch.tensor(sorted(data + [0] * (256 - len(data))), dtype=torch.float32)


def parse_quant_state(packed: torch.Tensor | bytes | bytearray) -> dict:
    """Decode `X.weight.quant_state.bitsandbytes__{nf4,fp4}`, as `QuantState.from_dict` does.

    The tensor is the UTF-8 bytes of `json.dumps` of the non-tensor fields, e.g.
    {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [64, 64],
     "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.0522...}
    (the `nested_*` fields only with double quantization). `dtype` is the dtype of the weight that
    was quantized, which is also what bnb dequantizes to. Returns those fields with `dtype` and
    `nested_dtype` as safetensors dtype names ("BF16"), `shape` as a tuple, and `nested` (bool).
    Planning reads the bytes, with no torch.
    """
    raw = bytes(packed) if isinstance(packed, (bytes, bytearray)) else bytes(v % 256 for v in packed.reshape(-1).tolist())
    d = parse_json(raw, "a bitsandbytes quant_state", "the checkpoint is damaged")
    if not isinstance(d, dict) or not {"quant_type", "blocksize", "dtype", "shape"} <= d.keys() <= _STATE_KEYS:
        raise LorafuseError(f"unexpected bitsandbytes quant_state {d!r}; was it written by a newer bitsandbytes?")
    state = {
        "quant_type": d["quant_type"],
        "blocksize": int(d["blocksize"]),
        "dtype": float_dtype(d["dtype"], "a bitsandbytes quant_state"),
        "shape": tuple(d["shape"]) if d["shape"] is not None else None,
        "nested": "nested_offset" in d,
    }
    if state["quant_type"] not in ("nf4", "fp4") or state["shape"] is None:
        raise LorafuseError(f"unsupported bitsandbytes quant_state {d!r}")
    if state["nested"]:
        state.update(nested_blocksize=int(d["nested_blocksize"]),
                     nested_dtype=float_dtype(d["nested_dtype"], "a bitsandbytes quant_state"),
                     nested_offset=float(d["nested_offset"]))
        if state["nested_dtype"] != "F32":  # bnb always double-quantizes float32 absmax
            raise LorafuseError(f"unsupported bitsandbytes nested_dtype {d['nested_dtype']!r}")
    return state


def dequantize_4bit(packed: torch.Tensor, absmax: torch.Tensor, quant_map: torch.Tensor, blocksize: int,
                    shape: tuple[int, ...], dtype: torch.dtype | str | None = None, **nested) -> torch.Tensor:
    """Unpack a bnb 4-bit weight: `quant_map[nibble] * absmax[block]`, computed in float32 (rounded to
    `dtype`, a torch dtype or a safetensors name, when given). `nested` are `lookup_4bit`'s
    double-quantization arguments."""
    return _rounded(lookup_4bit(packed, absmax, quant_map, blocksize, shape, **nested).decode(), dtype)


def _rounded(values: torch.Tensor, dtype: torch.dtype | str | None) -> torch.Tensor:
    if dtype is None:
        return values
    return values.to(torch_dtype(dtype) if isinstance(dtype, str) else dtype)


def lookup_4bit(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    blocksize: int,
    shape: tuple[int, ...],
    *,
    nested_absmax: torch.Tensor | None = None,
    nested_quant_map: torch.Tensor | None = None,
    nested_blocksize: int = NESTED_BLOCKSIZE,
    offset: float | None = None,
) -> Lookup:
    """A bnb 4-bit weight ready to decode: `quant_map[nibble] * absmax[block]` in float32, one block per
    code row.

    bnb's CPU kernel (`dequantizeBlockwise4bitCpu`) and its torch fallback
    (`_dequantize_4bit_compute`) both multiply the float32 code value by the float32 block absmax
    and round that product once to the output dtype. So the float32 values are those exact products,
    and rounded to bf16 they are bit-identical to `bitsandbytes.functional.dequantize_4bit`. With double
    quantization, bnb first rebuilds absmax as `nested_quant_map[absmax] * nested_absmax[i // 256]` in
    float32 (`dequantize_blockwise`), then adds `offset` as a float32 scalar (`absmax += quant_state.offset`); so do we.
    One difference: FP4 code 8 gives +0.0 here (its quant_map entry, as in bnb's torch fallback and
    AVX-512 kernel) where bnb's scalar CPU kernel gives -0.0. Equal in every later sum.
    """
    import torch
    import torch.nn.functional as F

    n = math.prod(shape)
    if quant_map.numel() != 16:
        raise LorafuseError(f"a 4-bit quant_map has 16 entries, got {quant_map.numel()}")
    if blocksize <= 0 or blocksize % 2:
        raise LorafuseError(f"bitsandbytes blocksize must be a positive even number, got {blocksize}")
    data = packed.contiguous().view(torch.uint8).reshape(-1)  # other quant_storage dtypes hold the same bytes
    if data.numel() * 2 < n:
        raise LorafuseError(f"packed 4-bit weight has {data.numel()} bytes, too few for shape {tuple(shape)}")
    absmax = absmax.reshape(-1)
    if nested_absmax is None and not absmax.is_floating_point():
        raise LorafuseError("absmax is double-quantized (uint8); pass nested_absmax, nested_quant_map and offset")
    if nested_absmax is not None:
        if nested_quant_map is None or offset is None:
            raise LorafuseError("double-quantized absmax needs nested_quant_map and offset too")
        codes = nested_quant_map.to(torch.float32)[absmax.to(torch.long)]
        absmax = _scale_blocks(codes, nested_absmax, nested_blocksize) + torch.tensor(offset, dtype=torch.float32)
    nblocks = -(-n // blocksize)
    if absmax.numel() < nblocks:
        raise LorafuseError(f"{n} values in blocks of {blocksize} need {nblocks} scales, got {absmax.numel()}")
    scales = absmax[:nblocks].to(torch.float32).view(-1, 1)
    # Each byte's two values (high nibble first) as one 8-byte table entry: one block of bytes is one row.
    byte = torch.arange(256, device=data.device)
    code = quant_map.to(torch.float32).reshape(-1)
    pairs = torch.stack([code[byte >> 4], code[byte & 15]], dim=1).view(torch.int64).reshape(-1)
    data = data[: (n + 1) // 2]
    if n % blocksize:  # the last block is partial: pad it with zero codes, decoded but not part of the weight
        data = F.pad(data, (0, nblocks * blocksize // 2 - data.numel()))
    return Lookup(data.view(nblocks, blocksize // 2), pairs,
                  lambda start, stop, rows: rows.view(torch.float32).mul_(scales[start:stop]), tuple(shape))


def dequantize_4bit_saved(parts: Mapping[str, torch.Tensor], dtype: torch.dtype | str | None = None) -> torch.Tensor:
    """Dequantize one saved weight from its tensors, keyed by suffix after `X.weight`.

    Keys: "" (the packed weight), ".absmax", ".quant_map", ".quant_state.bitsandbytes__nf4" (or fp4)
    and, with double quantization, ".nested_absmax" and ".nested_quant_map": the layout that
    `quantize_4bit` returns. Pass `dtype=parse_quant_state(...)["dtype"]` for bnb's exact output (float32
    by default).
    """
    return _rounded(lookup_4bit_saved(parts).decode(), dtype)


def lookup_4bit_saved(parts: Mapping[str, torch.Tensor]) -> Lookup:
    """`lookup_4bit` of one saved weight's tensors, keyed as `dequantize_4bit_saved` takes them."""
    qs = [k for k in parts if k.startswith("." + QUANT_STATE_PREFIX)]
    if len(qs) != 1:
        raise LorafuseError(f"expected exactly one {QUANT_STATE_PREFIX}* tensor, found {sorted(qs)}")
    state = parse_quant_state(parts[qs[0]])
    missing = {"", ".absmax", ".quant_map"} | ({".nested_absmax", ".nested_quant_map"} if state["nested"] else set())
    if missing - parts.keys():
        raise LorafuseError(f"bitsandbytes 4-bit weight lacks {sorted(missing - parts.keys())}")
    nested = state["nested"]
    return lookup_4bit(
        parts[""], parts[".absmax"], parts[".quant_map"], state["blocksize"], state["shape"],
        nested_absmax=parts[".nested_absmax"] if nested else None,
        nested_quant_map=parts[".nested_quant_map"] if nested else None,
        nested_blocksize=state.get("nested_blocksize", NESTED_BLOCKSIZE),
        offset=state.get("nested_offset"),
    )


def quantize_4bit(
    weight: torch.Tensor,
    *,
    quant_type: str = "nf4",
    blocksize: int = 64,
    compress_statistics: bool = True,
    quant_storage: torch.dtype | None = None,
) -> dict[str, torch.Tensor]:
    """Quantize like `bitsandbytes.functional.quantize_4bit` on the CPU; return what transformers saves.

    Keys are suffixes to append to the weight's name (see `dequantize_4bit_saved`). The 4-bit step
    copies bnb's torch kernel (`backends/default/ops.py`, `quantize_4bit`: scale by the reciprocal
    of the block absmax, bucketize against the code's midpoints). With `compress_statistics`,
    absmax minus its mean is quantized with the dynamic map in blocks of 256, emulating the C
    kernel `quantize_cpu_impl` (see `_quantize_blockwise`). `quant_storage` is uint8 by default.
    """
    import torch
    import torch.nn.functional as F

    quant_storage = quant_storage or torch.uint8
    if blocksize not in BLOCKSIZES:
        raise LorafuseError(f"bitsandbytes blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise LorafuseError(f"bitsandbytes 4-bit quantizes bf16/fp16/fp32 weights, got {weight.dtype}")
    code = code_4bit(quant_type)
    order = torch.argsort(code)
    bounds = (code[order[:-1]] + code[order[1:]]) / 2
    a = weight.reshape(-1).float()
    n = a.numel()
    full = n - n % blocksize
    blocks = a[:full].reshape(-1, blocksize)
    absmax = blocks.abs().max(dim=-1)[0]
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if full < n:  # bnb divides the tail block instead of multiplying by the reciprocal, and keeps its clamp
        tail_max = a[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
        scaled = torch.cat([scaled, torch.clamp(a[full:] / tail_max, -1, 1)])
    if (n + 1) // 2 % quant_storage.itemsize:
        raise LorafuseError(f"{(n + 1) // 2} packed bytes do not fill whole {quant_storage} elements")
    q = order[torch.bucketize(F.pad(scaled, (0, n % 2)), bounds, out_int32=True)].to(torch.uint8)
    packed = ((q[::2] << 4) | q[1::2]).view(quant_storage).unsqueeze(1)

    state: dict = {"quant_type": quant_type, "blocksize": blocksize, "dtype": str(weight.dtype)[6:],
                   "shape": list(weight.shape)}  # the non-tensor fields of QuantState.as_dict, in its order
    out = {"": packed, ".absmax": absmax, ".quant_map": code}
    if compress_statistics:
        offset = absmax.mean()
        nested_code = dynamic_map()
        qabsmax, nested_absmax = _quantize_blockwise(absmax - offset, nested_code, NESTED_BLOCKSIZE)
        out.update({".absmax": qabsmax, ".nested_absmax": nested_absmax, ".nested_quant_map": nested_code})
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=offset.item())
    out["." + QUANT_STATE_PREFIX + quant_type] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return out


# json.dumps of a float is at most this long ("-2.2250738585072014e-308"): room for any nested_offset.
_FLOAT_TEXT = -2.2250738585072014e-308


def layout_4bit(shape: tuple[int, ...], dtype: str, *, quant_type: str = "nf4", blocksize: int = 64,
                nested: bool = True) -> list[tuple[str, str, tuple[int, ...]]]:
    """(suffix, safetensors dtype, shape) of every tensor `quantize_4bit` returns for a weight of safetensors
    dtype `dtype`, known before quantizing.

    Only the quant state's JSON length depends on the data (the text of nested_offset): it gets room
    for the longest float, and `pad_quant_state` fills the rest with spaces, which JSON ignores.
    """
    n = math.prod(shape)
    blocks = -(-n // blocksize)
    entries = [("", "U8", ((n + 1) // 2, 1)), (".absmax", "U8" if nested else "F32", (blocks,)), (".quant_map", "F32", (16,))]
    if nested:
        entries += [(".nested_absmax", "F32", (-(-blocks // NESTED_BLOCKSIZE),)), (".nested_quant_map", "F32", (256,))]
    state = {"quant_type": quant_type, "blocksize": blocksize, "dtype": DTYPES[dtype][1], "shape": list(shape)}
    if nested:
        state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=_FLOAT_TEXT)
    entries.append(("." + QUANT_STATE_PREFIX + quant_type, "U8", (len(json.dumps(state).encode()),)))
    return entries


def pad_quant_state(state: torch.Tensor, length: int) -> torch.Tensor:
    """The quant state JSON bytes padded with spaces to the length `layout_4bit` reserved."""
    import torch.nn.functional as F

    return F.pad(state, (0, length - state.numel()), value=ord(" "))


def dequantize_int8(weight_int8: torch.Tensor, scb: torch.Tensor,
                    weight_format: torch.Tensor | int | None = None) -> torch.Tensor:
    """LLM.int8 weight to float32: row i is `weight[i] * SCB[i] / 127`. See `lookup_int8`."""
    return lookup_int8(weight_int8, scb, weight_format).decode()


def lookup_int8(weight_int8: torch.Tensor, scb: torch.Tensor, weight_format: torch.Tensor | int | None = None) -> Lookup:
    """An LLM.int8 weight ready to decode, row i as `weight[i] * SCB[i] / 127`.

    Written exactly as bnb's `int8_vectorwise_dequant` (`A * stats.view(-1, 1) * 7.874015718698502e-3`,
    the multiplication PEFT's `dequantize_bnb_weight` uses too), so the float32 result is bit-identical.
    """
    import torch

    fmt = weight_format.item() if isinstance(weight_format, torch.Tensor) else weight_format
    if fmt not in (None, INT8_ROW_FORMAT, "row"):
        raise LorafuseError(f"LLM.int8 weight_format {fmt!r} is not the row-major layout; "
                            "re-save the model with bitsandbytes>=0.45")
    if weight_int8.dtype != torch.int8 or weight_int8.dim() != 2 or scb.numel() != weight_int8.shape[0]:
        raise LorafuseError(f"LLM.int8 expects an int8 (out, in) weight and SCB[out]; got {weight_int8.dtype} "
                            f"{tuple(weight_int8.shape)} and SCB {tuple(scb.shape)}")
    scb = scb.to(torch.float32).view(-1, 1)
    return Lookup(weight_int8.view(torch.uint8), byte_values(torch.int8, weight_int8.device),
                  lambda start, stop, rows: rows.mul_(scb[start:stop]).mul_(7.874015718698502e-3), tuple(weight_int8.shape))


def _scale_blocks(values: torch.Tensor, scales: torch.Tensor, blocksize: int) -> torch.Tensor:
    """values[i] * scales[i // blocksize] in float32 (values is fresh, so it is scaled in place)."""
    import torch
    import torch.nn.functional as F

    n = values.numel()
    nblocks = -(-n // blocksize)
    if scales.numel() < nblocks:
        raise LorafuseError(f"{n} values in blocks of {blocksize} need {nblocks} scales, got {scales.numel()}")
    padded = F.pad(values, (0, nblocks * blocksize - n)) if n % blocksize else values
    padded.view(nblocks, blocksize).mul_(scales.reshape(-1)[:nblocks].to(torch.float32).view(-1, 1))
    return padded[:n]


def _quantize_blockwise(a: torch.Tensor, code: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Emulate bnb's CPU `quantize_cpu_impl<float>` (libbitsandbytes_cpu, 0.50), arithmetic included.

    Per block: absmax = max |a|; x = a * (1 / absmax); the code index comes from a 65536-entry table
    over [-1, 1] (`build_quantize_lut`: entry i is the number of code midpoints `(c[j] + c[j+1]) * 0.5`
    below `2i / 65535 - 1`), looked up at `(uint16)((clamp(x, -1, 1) + 1) * 0.5 * 65535 + 0.5)`, where
    the compiled kernel fuses the last multiply-add (vfmadd, one rounding; unfused rounding gave
    the same index for every float32 we enumerated, but we follow the binary). All-zero blocks give 0.
    """
    import torch
    import torch.nn.functional as F

    n = a.numel()
    nblocks = -(-n // blocksize)
    blocks = F.pad(a.float(), (0, nblocks * blocksize - n)).view(nblocks, blocksize)
    absmax = blocks.abs().amax(dim=1)
    inv = 1.0 / absmax
    inv[absmax == 0] = 0  # those blocks are all zeros; keep NaN out of the index
    x = blocks * inv.view(-1, 1)
    half = (x.clamp(-1.0, 1.0) + 1.0) * 0.5
    # fma(half, 65535, 0.5) is exact in float64 (24 + 16 significant bits), then rounded once to float32
    index = (half.double() * 65535.0 + 0.5).float().to(torch.long)
    grid = torch.arange(65536, dtype=torch.float32)
    grid = (grid + grid) / torch.full_like(grid, 65535.0) - 1.0
    table = torch.searchsorted((code[:-1] + code[1:]) * 0.5, grid).clamp(max=255).to(torch.uint8)
    q = table[index]
    q[absmax == 0] = 0
    return q.reshape(-1)[:n], absmax


def claim(tensors: Mapping, config: dict) -> dict:
    """The 4-bit and LLM.int8 weights of a transformers-saved bitsandbytes checkpoint, by weight name.

    Roles are the key suffixes after `X.weight` (what `dequantize_4bit_saved` takes), and for
    LLM.int8 "" (the int8 weight), "SCB" (`X.SCB`) and "format" (`X.weight_format`).
    """
    found = {}
    for key, ref in tensors.items():
        if ".weight." + QUANT_STATE_PREFIX in key:
            weight = key[: key.index(".weight.") + len(".weight")]
            if ref.dtype not in ("U8", "I8"):
                raise LorafuseError(f"{key} is {ref.dtype}, not the uint8 JSON bitsandbytes writes; the checkpoint is damaged")
            state = parse_quant_state(ref.read_into(bytearray(ref.nbytes)))
            roles = ["", ".absmax", ".quant_map"] + ([".nested_absmax", ".nested_quant_map"] if state["nested"] else [])
            missing = [weight + r for r in roles if weight + r not in tensors]
            if missing:
                raise LorafuseError(f"bitsandbytes 4-bit weight {weight} lacks {missing}; the checkpoint is incomplete")
            parts = {r: (weight + r, tensors[weight + r]) for r in roles}
            parts[key[len(weight):]] = (key, ref)
            found[weight] = QuantizedTensor(weight, f"bnb-{state['quant_type']}", parts, tuple(state["shape"]),
                                            state["dtype"], lookup_4bit_saved, state["blocksize"])
        elif key.endswith(".SCB"):
            weight = key[: -len(".SCB")] + ".weight"
            if weight not in tensors or tensors[weight].dtype != "I8":
                raise LorafuseError(f"{key} has no int8 weight {weight} beside it; the checkpoint is incomplete")
            parts = {"": (weight, tensors[weight]), "SCB": (key, ref)}
            if f"{weight}_format" in tensors:
                parts["format"] = (f"{weight}_format", tensors[f"{weight}_format"])
            dtype = float_dtype(config.get("dtype") or config.get("torch_dtype") or "float16", "config.json")
            found[weight] = QuantizedTensor(weight, "bnb-int8", parts, tuple(tensors[weight].shape), dtype, _decode_int8)
    return found


def _decode_int8(parts: Mapping[str, torch.Tensor]) -> Lookup:
    return lookup_int8(parts[""], parts["SCB"], parts.get("format"))
