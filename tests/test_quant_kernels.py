"""lorafuse.quant against its references: bitsandbytes itself (on the CPU) and the FP8 formulas.

Every bitsandbytes comparison is bit for bit. The one difference allowed is the sign of zero: bnb's
own CPU paths disagree on it (its scalar kernel has -0.0 for FP4 code 8, its AVX-512 kernel and
torch fallback +0.0), and -0.0 == 0.0 in every later sum, so `bits` maps -0.0 to +0.0 first.
"""

from __future__ import annotations

import contextlib
import json
import math
import zlib

import pytest
import torch

from lorafuse.errors import LorafuseError
from lorafuse.quant import bnb as q
from lorafuse.quant.fp8 import dequantize_fp8_block, dequantize_fp8_scaled, quantize_fp8_block

try:  # the oracle for everything bitsandbytes; the FP8 tests run without it
    import bitsandbytes
    import bitsandbytes.functional as BF
except ImportError:
    bitsandbytes = BF = None
needs_bnb = pytest.mark.skipif(BF is None, reason="bitsandbytes (the oracle) is not installed")

FLOATS = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STORAGES = (torch.uint8, torch.bfloat16, torch.float16, torch.float32)
EVEN_SHAPES = [(64, 64), (96, 64), (130, 96), (2, 4), (300, 258)]  # last dim even: bnb's C kernel
ODD_SHAPES = [(7, 3), (1, 1), (5,), (33, 71), (129, 65)]  # last dim odd: bnb's torch fallback


def bits(t: torch.Tensor) -> torch.Tensor:
    if t.is_floating_point():
        t = t + 0.0  # -0.0 -> +0.0, nothing else changes
    return t.contiguous().view(torch.uint8)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(bits(a), bits(b))


def bnb_parts(packed, state) -> dict[str, torch.Tensor]:
    """What transformers saves for one weight, keyed by suffix after `X.weight`."""
    return {"": packed, **{"." + k: v for k, v in state.as_dict(packed=True).items()}}


def bnb_cpu_library() -> bool:
    """Whether bnb runs its CPU kernels from its CPU library. Where a GPU is visible it loads its CUDA
    library, whose CPU fp16 dequantize rounds some values one ulp the other way (seen on an H100 machine:
    6 of 77 400 overall, 28 of 6 144 for one FP4 double-quant case; the CPU library there gives lorafuse's
    bits exactly)."""
    from bitsandbytes.cextension import lib

    return "cuda" not in str(getattr(lib, "_name", "")).lower()


def bnb_dequantize(packed, state) -> torch.Tensor:
    out = BF.dequantize_4bit(packed, state)
    return out.t() if packed.shape[0] == 1 else out  # undo bnb's "transposed input" shim on tiny tensors


def avx512_misindexes(shape, blocksize) -> bool:
    """bnb's AVX-512 dequantize kernel indexes absmax per row, assuming rows hold whole blocks."""
    from bitsandbytes.backends.cpu import ops

    return getattr(ops, "_has_avx512", False) and shape[-1] % 16 == 0 and blocksize < 2048 and shape[-1] % blocksize != 0


def eager():
    """bnb torch.compiles its odd-shape fallback once per shape (seconds each); run it eagerly."""
    stance = getattr(torch.compiler, "set_stance", None)
    return stance("force_eager") if stance else contextlib.nullcontext()


def check_roundtrip(w, quant_type, blocksize, compress, storage) -> bool:
    """quantize_4bit == bnb's, and dequantizing those parts == bnb's dequantize_4bit. False: bnb refused."""
    try:
        packed, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress,
                                         quant_type=quant_type, quant_storage=storage)
    except RuntimeError:  # bnb cannot view an odd number of bytes as a wider storage dtype
        with pytest.raises(LorafuseError):
            q.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, quant_storage=storage)
        return False
    ref = bnb_parts(packed, state)
    mine = q.quantize_4bit(w, quant_type=quant_type, blocksize=blocksize, compress_statistics=compress,
                           quant_storage=storage)
    assert list(mine) == list(ref)
    for k in ref:
        assert same(mine[k], ref[k]), (k, quant_type, blocksize, tuple(w.shape), w.dtype, compress, storage)
    if not avx512_misindexes(w.shape, blocksize):
        got, want = q.dequantize_4bit_saved(mine, w.dtype), bnb_dequantize(packed, state)
        if w.dtype == torch.float16 and not bnb_cpu_library():
            ulps = (bits(got).view(torch.int16).int() - bits(want).view(torch.int16).int()).abs()
            # A rounding bug of ours (truncating, say) would move about half the values, a wrong code or
            # scale far more than one ulp.
            assert ulps.max() <= 1 and (ulps > 0).sum() <= max(1, ulps.numel() // 100)
        else:
            assert same(got, want)
    return True


@needs_bnb
def test_codes_are_bnbs():
    for quant_type in ("nf4", "fp4"):
        assert same(q.code_4bit(quant_type), BF.get_4bit_type(quant_type, device="cpu"))
    assert same(q.dynamic_map(), BF.create_dynamic_map())


@needs_bnb
@pytest.mark.parametrize("wdtype", FLOATS)
@pytest.mark.parametrize("compress", [False, True], ids=["single", "double"])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_matches_bnb(quant_type, compress, wdtype):
    torch.manual_seed(zlib.crc32(f"{quant_type}{compress}{wdtype}".encode()))
    checked = 0
    for blocksize in q.BLOCKSIZES:
        for shape in EVEN_SHAPES:
            w = (torch.randn(shape) * torch.rand(shape[0], 1) * 0.1).to(FLOATS[wdtype])
            for storage in STORAGES:
                checked += check_roundtrip(w, quant_type, blocksize, compress, storage)
    assert checked > 100


@needs_bnb
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_odd_shapes_match_bnb(quant_type):
    torch.manual_seed(3)
    with eager():
        for shape in ODD_SHAPES:
            for blocksize in (32, 64, 256, 4096):
                for wdtype in FLOATS.values():
                    for compress in (False, True):
                        assert check_roundtrip(torch.randn(shape).to(wdtype), quant_type, blocksize, compress, torch.uint8)
    # and once through bnb's real (compiled) path
    assert check_roundtrip(torch.randn(33, 71, dtype=torch.bfloat16), quant_type, 64, True, torch.uint8)


@needs_bnb
def test_4bit_edge_values():
    """All-zero blocks, an all-zero tail block, huge and tiny magnitudes: bnb's clamps and zero branches."""
    w = torch.randn(41, 62)  # 2542 values: 39 full blocks of 64 and a tail of 46
    w[:4] = 0
    w.view(-1)[-46:] = 0
    w[10, :7] = 1e-30
    w[20] *= 1e4
    for compress in (False, True):
        for blocksize in (32, 64, 256):
            for quant_type in ("nf4", "fp4"):
                assert check_roundtrip(w, quant_type, blocksize, compress, torch.uint8)


@needs_bnb
def test_nested_quantizer_matches_bnb_kernel():
    """The 8-bit blockwise quantizer (bnb's C LUT kernel) on values sitting on every LUT and code edge."""
    code = BF.create_dynamic_map()
    grid = torch.arange(65536, dtype=torch.float32)
    grid = (grid + grid) / torch.full_like(grid, 65535.0) - 1.0
    up, down = torch.nextafter(grid, torch.tensor(2.0)), torch.nextafter(grid, torch.tensor(-2.0))
    x = torch.cat([(code[:-1] + code[1:]) * 0.5, grid, up, down, torch.rand(60000) * 2 - 1]).clamp(-1, 1)
    x = x[torch.randperm(x.numel(), generator=torch.Generator().manual_seed(0))]
    x = torch.cat([x[: x.numel() // 255 * 255].view(-1, 255), torch.ones(x.numel() // 255, 1)], 1).reshape(-1)
    for a in (x, torch.randn(70001) * 3e-3, torch.zeros(300)):  # absmax 1 blocks, a ragged tail, zero blocks
        ref, state = BF.quantize_blockwise(a, blocksize=256)
        mine, absmax = q._quantize_blockwise(a, code, 256)
        assert torch.equal(mine, ref) and same(absmax, state.absmax)


@needs_bnb
def test_parse_quant_state():
    packed, state = BF.quantize_4bit(torch.randn(64, 96, dtype=torch.bfloat16), blocksize=128,
                                     compress_statistics=True, quant_type="nf4")
    blob = state.as_dict(packed=True)["quant_state.bitsandbytes__nf4"]
    parsed = q.parse_quant_state(blob)
    assert parsed == {"quant_type": "nf4", "blocksize": 128, "dtype": "BF16", "shape": (64, 96),
                      "nested": True, "nested_blocksize": 256, "nested_dtype": "F32",
                      "nested_offset": state.offset.item()}
    assert q.parse_quant_state(bytes(blob.tolist())) == parsed
    single = q.parse_quant_state(q.quantize_4bit(torch.randn(8, 8), compress_statistics=False)[".quant_state.bitsandbytes__nf4"])
    assert single["nested"] is False and single["dtype"] == "F32"
    for bad in (b"\xff", b"[]", json.dumps({"quant_type": "nf4"}).encode(),
                json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2], "extra": 1}).encode(),
                json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "int8", "shape": [2]}).encode()):
        with pytest.raises(LorafuseError):
            q.parse_quant_state(bad)


def test_dequantize_4bit_rejects_bad_inputs():
    parts = q.quantize_4bit(torch.randn(16, 16))
    with pytest.raises(LorafuseError):
        q.dequantize_4bit(parts[""], parts[".absmax"], parts[".quant_map"], 64, (16, 17))
    with pytest.raises(LorafuseError):  # uint8 absmax read as if it were float
        q.dequantize_4bit(parts[""], parts[".absmax"], parts[".quant_map"], 64, (16, 16))
    with pytest.raises(LorafuseError):  # double-quantized absmax without its nested state
        q.dequantize_4bit(parts[""], parts[".absmax"], parts[".quant_map"], 64, (16, 16), nested_absmax=parts[".nested_absmax"])
    with pytest.raises(LorafuseError):
        q.dequantize_4bit_saved({k: v for k, v in parts.items() if k != ".nested_absmax"})
    with pytest.raises(LorafuseError):
        q.quantize_4bit(torch.randn(4, 4), blocksize=48)


@needs_bnb
@pytest.mark.parametrize("wdtype", FLOATS)
def test_int8_matches_bnb(wdtype):
    torch.manual_seed(5)
    for shape in [(64, 64), (33, 71), (1, 5), (257, 3)]:
        w = (torch.randn(shape) * torch.rand(shape[0], 1)).to(FLOATS[wdtype])
        w[0] = 0  # an all-zero row: SCB 0
        cb, scb, _ = BF.int8_vectorwise_quant(w)
        if shape[0] > 1:
            assert torch.all(scb[1:] > 0)
        ref = BF.int8_vectorwise_dequant(cb, scb)
        assert same(q.dequantize_int8(cb, scb, torch.tensor(0, dtype=torch.uint8)), ref)
    with pytest.raises(LorafuseError):
        q.dequantize_int8(cb, scb, weight_format=1)
    with pytest.raises(LorafuseError):
        q.dequantize_int8(cb.float(), scb)


# --- real checkpoints written by transformers -------------------------------------------------------

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
            num_key_value_heads=2)  # every last dim a multiple of 64: see avx512_misindexes
SKIP = ["lm_head", "o_proj"]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    tf = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("base")
    tf.LlamaForCausalLM(tf.LlamaConfig(**TINY)).save_pretrained(folder)
    return folder


def quantize_with_transformers(base, out, **bnb_kwargs):
    import transformers as tf

    config = tf.BitsAndBytesConfig(llm_int8_skip_modules=SKIP, **bnb_kwargs)
    dtype = torch.float16 if bnb_kwargs.get("load_in_8bit") else torch.bfloat16
    tf.LlamaForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu", dtype=dtype).save_pretrained(out)
    return tf.LlamaForCausalLM.from_pretrained(out, device_map="cpu")  # reloaded from what was saved


def read(folder):
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@needs_bnb
@pytest.mark.parametrize("quant_type,double,storage", [("nf4", True, torch.uint8), ("fp4", False, torch.bfloat16)])
def test_transformers_4bit_checkpoint(base_model, tmp_path, quant_type, double, storage):
    model = quantize_with_transformers(
        base_model, tmp_path, load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=double,
        bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=storage)
    saved, base = read(tmp_path), read(base_model)
    states = [k for k in saved if k.endswith(f".weight.quant_state.bitsandbytes__{quant_type}")]
    assert len(states) == 6  # q k v gate up down; lm_head and o_proj skipped
    for state_key in states:
        name = state_key[: -len(f".weight.quant_state.bitsandbytes__{quant_type}")]
        parts = {k[len(name) + len(".weight"):]: v for k, v in saved.items() if k.startswith(name + ".weight")}
        assert set(parts) == {"", ".absmax", ".quant_map", ".quant_state.bitsandbytes__" + quant_type} | (
            {".nested_absmax", ".nested_quant_map"} if double else set())
        assert parts[""].dtype == storage and parts[""].shape[1] == 1
        state = q.parse_quant_state(parts[f".quant_state.bitsandbytes__{quant_type}"])
        assert state["dtype"] == "BF16" and state["shape"] == tuple(base[name + ".weight"].shape)
        # what transformers wrote is exactly what quantize_4bit makes from the bf16 base weight ...
        mine = q.quantize_4bit(base[name + ".weight"].to(torch.bfloat16), quant_type=quant_type,
                               compress_statistics=double, quant_storage=storage)
        assert set(mine) == set(parts) and all(same(mine[k], parts[k]) for k in parts)
        # ... and dequantizing it equals bnb's dequantization of the reloaded model's Params4bit
        weight = model.get_submodule(name).weight
        assert isinstance(weight, bitsandbytes.nn.Params4bit)
        assert same(q.dequantize_4bit_saved(parts, state["dtype"]), BF.dequantize_4bit(weight.data, weight.quant_state))
    for name in ("lm_head", "model.layers.0.self_attn.o_proj"):  # llm_int8_skip_modules: saved plain
        assert saved[name + ".weight"].dtype == torch.bfloat16
        assert not any(k.startswith(name + ".weight.") for k in saved)
        assert same(saved[name + ".weight"], base[name + ".weight"].to(torch.bfloat16))


@needs_bnb
def test_transformers_int8_checkpoint(base_model, tmp_path):
    model = quantize_with_transformers(base_model, tmp_path, load_in_8bit=True)
    saved, base = read(tmp_path), read(base_model)
    scbs = [k[: -len(".SCB")] for k in saved if k.endswith(".SCB")]
    assert len(scbs) == 6
    for name in scbs:
        w, scb, fmt = saved[name + ".weight"], saved[name + ".SCB"], saved[name + ".weight_format"]
        assert w.dtype == torch.int8 and scb.dtype == torch.float32 and fmt.item() == 0
        mine = q.dequantize_int8(w, scb, fmt)
        assert same(mine, BF.int8_vectorwise_dequant(w, scb))
        reloaded = model.get_submodule(name).weight
        assert torch.equal(reloaded.data, w) and torch.equal(reloaded.SCB, scb)
        ref = base[name + ".weight"].to(torch.float16).float()
        assert torch.all((mine - ref).abs() <= scb.view(-1, 1) / 127 * 0.5 + 1e-6)
    assert saved["lm_head.weight"].dtype == torch.float16 and "lm_head.SCB" not in saved


# --- FP8 ----------------------------------------------------------------------------------------------

FP8_CASES = [((256, 384), (128, 128)), ((130, 200), (128, 128)), ((3, 5), (128, 128)), ((2, 300, 129), (64, 32))]


def reference_block_dequant(x, s, block):
    """DeepSeek-V3 `weight_dequant_kernel`, one (possibly partial) tile at a time: x.float() * s[i, j]."""
    bo, bi = block
    y = torch.empty(x.shape, dtype=torch.float32)
    for i in range(s.shape[-2]):
        for j in range(s.shape[-1]):
            tile = (..., slice(i * bo, (i + 1) * bo), slice(j * bi, (j + 1) * bi))
            y[tile] = x[tile].to(torch.float32) * s[..., i, j, None, None]
    return y


@pytest.mark.parametrize("shape,block", FP8_CASES)
def test_fp8_block_roundtrip(shape, block):
    torch.manual_seed(7)
    w = torch.randn(shape) * torch.rand(*shape[:-1], 1) * 0.05
    w[..., 0, :] = 0  # a zero row: zero blocks in narrow shapes
    fp8, scale_inv = quantize_fp8_block(w.to(torch.bfloat16), block)
    grid = (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))
    assert fp8.dtype == torch.float8_e4m3fn and fp8.shape == w.shape
    assert scale_inv.dtype == torch.float32 and tuple(scale_inv.shape) == grid
    out = dequantize_fp8_block(fp8, scale_inv, block)
    assert torch.equal(bits(out), bits(reference_block_dequant(fp8, scale_inv, block)))
    # e4m3 keeps 3 mantissa bits: half a step is 2^-4 relative, or 2^-10 * scale in the subnormal range
    s_full = reference_block_dequant(torch.ones(shape, dtype=torch.float8_e4m3fn), scale_inv, block)
    wb = w.to(torch.bfloat16).float()
    assert torch.all((out - wb).abs() <= wb.abs() * 2**-4 + s_full * 2**-10 + 1e-12)
    assert (out - wb).abs().max() > 0  # it did quantize


def test_fp8_scaled_and_errors():
    torch.manual_seed(8)
    w = (torch.randn(48, 80) * 100).to(torch.float8_e4m3fn)
    for scale in (torch.tensor(0.01), torch.tensor([0.01]), torch.rand(48) + 0.1, torch.rand(48, 1) + 0.1):
        expect = w.to(torch.float32) * (scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))
        assert torch.equal(bits(dequantize_fp8_scaled(w, scale)), bits(expect))
    with pytest.raises(LorafuseError):
        dequantize_fp8_scaled(w, torch.rand(80))
    assert torch.equal(dequantize_fp8_block(w, torch.ones(1, 1), (128, 128)), w.to(torch.float32))  # one partial tile
    e8m0 = getattr(torch, "float8_e8m0fnu", None)  # power-of-two scales (DeepSeek-V3.1 "ue8m0")
    if e8m0 is not None:
        s = torch.tensor([[2.0**-7]])
        assert torch.equal(dequantize_fp8_block(w, s.to(e8m0), (128, 128)), w.to(torch.float32) * s)
    with pytest.raises(LorafuseError):
        dequantize_fp8_block(w, torch.ones(2, 1), (128, 128))


# --- decoding in steps, into reused memory ------------------------------------------------------------

@needs_bnb
@pytest.mark.parametrize("step_bytes", [1, 700, 3000])
def test_decoding_in_pieces_into_reused_memory_changes_no_bits(monkeypatch, step_bytes):
    """A merge decodes a quantized weight a block of rows at a time (`Lookup.fill`), each block in steps of
    `LOOKUP_BYTES` of output (512 KiB: more than any other test's weight), into memory a thread reuses.
    Pieces of 1 and 3 code rows and the whole weight, steps of 1 to 3000 bytes that cross FP8 block rows
    and expert matrices, and a dirty buffer all give the bits the references give."""
    from lorafuse.quant import base, fp8

    monkeypatch.setattr(base, "LOOKUP_BYTES", step_bytes)
    dirty = torch.full((1 << 20,), 0xFF, dtype=torch.uint8)  # NaN in every float32 read from it

    def check(lookup, want):
        numel = math.prod(lookup.shape)
        for code_rows in (1, 3, numel):
            step = code_rows * lookup.width
            pieces = [lookup.fill(start, min(numel, start + step), dirty).clone() for start in range(0, numel, step)]
            got = torch.cat(pieces).reshape(lookup.shape) if pieces else lookup.decode()
            assert same(got.to(want.dtype), want)
        assert same(lookup.decode(lambda nbytes: dirty[:nbytes]).to(want.dtype), want)

    torch.manual_seed(11)
    for shape, blocksize in [((70, 130), 64), ((33, 71), 32), ((5, 300), 256)]:  # partial last blocks too
        w = torch.randn(shape, dtype=torch.bfloat16)
        for compress in (False, True):
            packed, state = BF.quantize_4bit(w, blocksize=blocksize, compress_statistics=compress, quant_type="nf4")
            with eager():
                want = bnb_dequantize(packed, state)
            check(q.lookup_4bit_saved(bnb_parts(packed, state)), want)
    cb, scb, _ = BF.int8_vectorwise_quant(torch.randn(67, 45))
    check(q.lookup_int8(cb, scb), BF.int8_vectorwise_dequant(cb, scb))
    for shape, block in FP8_CASES:
        weight, scale_inv = quantize_fp8_block(torch.randn(shape, dtype=torch.bfloat16), block)
        check(fp8.lookup_fp8_block(weight, scale_inv, block), reference_block_dequant(weight, scale_inv, block))
    w = (torch.randn(48, 80) * 100).to(torch.float8_e4m3fn)
    for scale in (torch.tensor(0.01), torch.rand(48) + 0.1):
        expect = w.to(torch.float32) * (scale.reshape(-1, 1) if scale.numel() > 1 else scale.reshape(()))
        check(fp8.lookup_fp8_scaled(w, scale), expect)
    for shape in [(128, 0), (0, 128), (2, 64, 0)]:  # no values: nothing to decode, the shape kept
        empty_fp8 = torch.zeros(shape, dtype=torch.float8_e4m3fn)
        grid = (*shape[:-2], math.ceil(shape[-2] / 128), math.ceil(shape[-1] / 128))
        assert dequantize_fp8_block(empty_fp8, torch.ones(grid), (128, 128)).shape == shape
