"""The two compute paths: numpy for plain LoRA, biases, replaced rows and casts on the CPU, torch for the rest.

The numpy path is what the PEFT oracle matrix (test_merge_vs_peft) now exercises for every plain variant;
here it is held to torch's own rounding, bit for bit, and the torch path (still used for DoRA, quantized
bases, 4-bit output and the GPU) is held to the numpy one on every plain variant of that matrix, so both
stay tied to PEFT. Also: which path a merge takes, and that a plain merge never imports torch.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import lorafuse
from lorafuse import costs
from lorafuse.formats import arrays
from lorafuse.compute import rows, tensors
from lorafuse.costs import needs_torch, threads_per_worker
from conftest import MERGE_DEVICES, read_tensors
from test_merge_vs_peft import TENSOR_SLACK, VARIANTS, get_adapter

MANTISSA_BITS = {"BF16": 7, "F16": 10, "F32": 23}
MIN_EXPONENT = {"BF16": -125, "F16": -13, "F32": -125}  # frexp's exponent of the smallest normal value
TORCH_OF = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def edge_values() -> np.ndarray:
    """fp32 values where rounding is delicate (NaNs too), plus a million random bit patterns."""
    rng = np.random.default_rng(0)
    special = []
    for exponent in (0, 1, 0x40, 0x7E, 0x7F, 0xFE, 0xFF):  # subnormals, small, around 1, the largest binade, inf/NaN
        for low in (0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xFFFF):
            for kept in (0x00, 0x01, 0x7E, 0x7F):  # the kept mantissa bits: even, odd, and carrying over
                special.append((exponent << 23) | (kept << 16) | low)
    special += [0x7F800000, 0x7F7FFFFF, 0x00000000]  # inf, the largest finite, zero
    bits = np.array(special, dtype=np.uint32)
    bits = np.concatenate([bits, bits | 0x80000000, rng.integers(0, 2**32, 1 << 20, dtype=np.uint32)])
    return bits.view(np.float32)


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_rounding_matches_torch_bit_for_bit(dtype):
    """narrow() rounds fp32 to 16 bits as torch does: ties to even, overflow to inf, subnormals, -0; a NaN
    stays a NaN, in bf16 always the quiet NaN 0x7FC0 (torch writes 0x7FC0 or 0xFFFF, by kernel)."""
    values = edge_values()
    out = np.empty(values.shape, dtype=arrays.STORED[dtype])
    with np.errstate(over="ignore", invalid="ignore"):  # overflow to inf is one of the cases
        arrays.narrow(values.copy(), dtype, out, np.empty_like(values))
    want = torch.from_numpy(values).to(TORCH_OF[dtype]).view(torch.int16).numpy().view(np.uint16)
    got, nan = out.view(np.uint16), np.isnan(values)
    assert np.array_equal(got[~nan], want[~nan]), f"{np.count_nonzero(got[~nan] != want[~nan])} of {values.size} values differ"
    assert nan.sum() > 1000 and torch.from_numpy(want[nan].view(np.int16)).view(TORCH_OF[dtype]).isnan().all()
    if dtype == "BF16":
        assert (got[nan] == arrays.BF16_NAN).all()
    else:
        assert np.isnan(out[nan]).all()


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_widening_is_exact(dtype):
    """widen() gives torch's fp32 value of every 16-bit value; in bf16 every bit is kept, torch's too, NaN
    payloads and signs included."""
    stored = np.arange(1 << 16, dtype=np.uint16).view(arrays.STORED[dtype])  # every 16-bit value
    got = np.empty(stored.shape, dtype=np.float32)
    arrays.widen(stored, dtype, got)
    want = torch.from_numpy(stored.view(np.int16)).view(TORCH_OF[dtype]).float().numpy()
    nan = np.isnan(want)
    assert np.array_equal(got.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
    assert np.isnan(got[nan]).all()
    if dtype == "BF16":
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
        assert np.array_equal(got.view(np.uint32), np.arange(1 << 16, dtype=np.uint32) << 16)


def test_a_cast_keeps_nan_and_inf_and_empty_tensors(tiny_base, adapter_of, tmp_path):
    """A base tensor holding NaN and Inf, cast fp32 -> bf16 by the numpy path: every NaN becomes the one
    quiet NaN 0x7FC0 (torch itself writes 0x7FC0 or 0xFFFF, depending on the kernel), and every other
    value gets torch's bytes. Empty tensors are cast too."""
    from safetensors.numpy import load_file, save_file

    base = tmp_path / "base"
    base.mkdir()
    src = tiny_base("llama", "fp32")
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (base / f.name).write_bytes(f.read_bytes())
    weights = load_file(src / "model.safetensors")
    name = "model.norm.weight"
    poison = weights[name].copy()
    poison[:4] = np.array([0x7FC00000, 0xFFA00001, 0x7F800000, 0xFF800000], dtype=np.uint32).view(np.float32)
    empty = {"extra.empty": np.zeros((0,), np.float32), "extra.no_columns": np.zeros((5, 0), np.float32)}
    save_file({**weights, name: poison, **empty}, base / "model.safetensors", metadata={"format": "pt"})
    lorafuse.merge(base, adapter_of("lora-llama"), tmp_path / "out", dtype="bf16")
    out = read_tensors(tmp_path / "out")
    got, want = out[name], torch.from_numpy(poison).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got[:2].view(torch.int16).tolist() == [arrays.BF16_NAN, arrays.BF16_NAN]
    assert torch.equal(got[2:].view(torch.int16), want[2:].view(torch.int16))
    assert {k: (tuple(out[k].shape), out[k].dtype) for k in empty} == \
        {"extra.empty": ((0,), torch.bfloat16), "extra.no_columns": ((5, 0), torch.bfloat16)}


@pytest.fixture
def adapter_of(tiny_base, artefacts):
    """variant id -> the adapter test_merge_vs_peft saves for that variant (built once per session)."""
    return lambda variant_id: get_adapter(artefacts, tiny_base, next(v for v in VARIANTS if v.id == variant_id))


def ulp(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """The spacing of `dtype` values at each |x| (x = m·2^e with 0.5 <= m < 1; subnormals and zero have
    the spacing of the smallest normal binade)."""
    exponent = torch.frexp(x).exponent.clamp(min=MIN_EXPONENT[dtype])
    exponent[x == 0] = MIN_EXPONENT[dtype]
    return torch.ldexp(torch.ones_like(x), exponent - 1 - MANTISSA_BITS[dtype])


def ignore(slot: int, offset: int, data: memoryview) -> None:
    """A Producer's writes, when only the bytes it returns are compared."""


def values(stored: bytes | memoryview, dtype: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(stored), dtype=TORCH_OF[dtype]).double()


PLAIN = [v for v in VARIANTS if "dora" not in v.id]


@pytest.fixture(params=["kernel", "numpy"])
def last_step(request, monkeypatch):
    """The numpy path's last step (widen, add, check, round) by the compiled kernel, or by numpy alone
    (what an install without a C compiler runs). With the kernel, the calls to it are counted; with numpy
    alone the list is None."""
    calls = []
    if request.param == "numpy":
        monkeypatch.setattr(rows, "add_round", None)
        return None
    if rows.add_round is None:
        pytest.skip("the compiled kernel is not built here")
    else:
        kernel = rows.add_round
        monkeypatch.setattr(rows, "add_round", lambda *args: calls.append(1) or kernel(*args))
    return calls


@pytest.mark.parametrize("device", MERGE_DEVICES)
@pytest.mark.parametrize("block_values", [None, 97], ids=["one-block", "many-blocks"])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("variant", PLAIN, ids=[v.id for v in PLAIN])
def test_numpy_and_torch_paths_agree(variant, dtype, block_values, device, tiny_base, adapter_of, one_torch_thread,
                                     last_step, monkeypatch):
    """Every tensor the numpy path produces, the torch path produces too, within one ulp of the output
    dtype plus TENSOR_SLACK (2e-7 of the tensor's scale, the fp32 arithmetic's own error, which shows
    where W + ΔW cancels), and for 16-bit files mostly identical: the paths differ only in how the fp32
    sum is rounded (torch fuses it into addmm). The tiny models' tensors fit one block of rows; with
    blocks of 97 values (one to three rows), each block starts at another row. On a GPU (device cuda) the
    torch path's arithmetic runs there, and is held to the same bounds. The numpy path's last step runs
    in the compiled kernel (which a plain LoRA must reach) and in numpy alone."""
    if block_values:
        monkeypatch.setattr(costs, "BLOCK_VALUES", block_values)
    plan = lorafuse.plan(tiny_base(variant.model, dtype), adapter_of(variant.id))
    produced = [t for t in plan.tensors if not t.is_copy]
    assert produced and not any(needs_torch(t, "cpu") for t in produced)
    numpy_path, torch_path = rows.Producer("cpu"), tensors.Producer(device)
    differing = total = 0
    for tensor in produced:
        fd = os.open(tensor.source.path, os.O_RDONLY)
        try:
            a = values(numpy_path.output_bytes(tensor, (), fd, ignore)[0], tensor.dtype)
            b = values(torch_path.output_bytes(tensor, (), fd, ignore)[0], tensor.dtype)
        finally:
            os.close(fd)
        worst = ((a - b).abs() - ulp(torch.maximum(a.abs(), b.abs()), tensor.dtype)
                 - TENSOR_SLACK * a.abs().max()).max().item()
        assert worst <= 0, f"{tensor.name}: the paths differ by more than an ulp"
        differing += torch.count_nonzero(a != b).item()
        total += a.numel()
    if dtype == "bf16":
        assert differing <= total / 100, f"{differing} of {total} values differ"
    if last_step is not None and variant.id in ("lora-llama", "rslora-llama"):  # a LoRA alone on each matrix
        assert last_step, "the compiled kernel was not used"


def test_dora_and_gpu_take_torch(tiny_base, adapter_of):
    dora = next(v for v in VARIANTS if v.id.startswith("dora"))
    plan = lorafuse.plan(tiny_base(dora.model, "bf16"), adapter_of(dora.id))
    assert any(needs_torch(t, "cpu") for t in plan.tensors if t.patches)
    plain = lorafuse.plan(tiny_base("llama", "bf16"), adapter_of("lora-llama"))
    assert not any(needs_torch(t, "cpu") for t in plain.tensors if t.patches)
    assert all(needs_torch(t, "cuda") for t in plain.tensors if t.patches)


@pytest.mark.parametrize("variant_id, device, whole", [("lora-llama", "cpu", False), ("resize-llama", "cpu", False),
                                                      ("dora-llama", "cpu", True), ("lora-llama", "cuda", True)])
def test_workers_share_the_cores_only_for_whole_tensors(variant_id, device, whole, tiny_base, adapter_of,
                                                        tmp_path, monkeypatch):
    """Each pipeline thread runs its kernels (numpy's BLAS, torch's) on one thread when every tensor is
    made in rows (a thread team spins more than it works on 1 MB blocks), on its share of the cores when
    torch takes some tensor whole: seen from inside the workers of a real merge given 16 cores each."""
    from threadpoolctl import threadpool_info

    from lorafuse import execute

    variant = next(v for v in VARIANTS if v.id == variant_id)
    base, adapter = tiny_base(variant.model, "bf16"), adapter_of(variant_id)
    plan = lorafuse.plan(base, adapter)
    assert threads_per_worker(plan.tensors, device, 32, 4) == (8 if whole else 1)
    if device != "cpu":
        return
    monkeypatch.setattr(execute, "usable_cores", lambda: 16 * plan.depth)
    seen = set()

    def blas_threads(self, *args, _real=rows.Producer.output_bytes):
        seen.update(api["num_threads"] for api in threadpool_info() if api["user_api"] == "blas")
        return _real(self, *args)

    def torch_threads(self, *args, _real=tensors.Producer.output_bytes):
        seen.add(torch.get_num_threads())
        return _real(self, *args)

    monkeypatch.setattr(rows.Producer, "output_bytes", blas_threads)
    monkeypatch.setattr(tensors.Producer, "output_bytes", torch_threads)
    lorafuse.merge(base, adapter, tmp_path / "out")
    assert seen == ({16} if whole else {1})


@pytest.mark.parametrize("variant_id, imports_torch",
                         [("lora-llama", False), ("tokens-llama", False), ("resize-llama", False),
                          ("fanin-gpt2", False), ("dora-llama", True)])
def test_only_merges_that_need_torch_import_it(variant_id, imports_torch, tiny_base, adapter_of, tmp_path):
    """`lorafuse merge` of a plain LoRA (with trainable tokens, a resized vocabulary, Conv1D weights) never
    imports torch (1.3 s holding the GIL, 200 MB); DoRA does."""
    variant = next(v for v in VARIANTS if v.id == variant_id)
    base, adapter = tiny_base(variant.model, "bf16"), adapter_of(variant_id)
    code = ("import sys; from lorafuse.cli import main; "
            f"code = main(['merge', {str(base)!r}, {str(adapter)!r}, {str(tmp_path / 'out')!r}, '--quiet']); "
            "sys.exit(code or 10 * ('torch' in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == (10 if imports_torch else 0), done.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


KERNEL_CASES = [(a, b, False) for a in ("BF16", "F32") for b in ("BF16", "F32")] + \
    [("BF16", "BF16", True), ("F32", "F32", True), ("F32", "BF16", True)]  # in place: never a wider output


@pytest.mark.parametrize("in_dtype, out_dtype, in_place", KERNEL_CASES,
                         ids=[f"{a}-{b}{'-in-place' if p else ''}" for a, b, p in KERNEL_CASES])
def test_the_kernel_is_the_numpy_last_step_bit_for_bit(in_dtype, out_dtype, in_place):
    """rows.add_round (compiled) against widen + add + narrow in numpy on the rounding's edge cases and a
    million random patterns: every finite sum rounds to the same bits, and the kernel says "not finite"
    exactly when some sum is a NaN or an infinity. In place: the result written over the values it is made
    from (the merge does so when the output is no wider than the input), which only a narrower or equal
    output allows."""
    if rows.add_round is None:
        pytest.skip("the compiled kernel is not built here")
    values = edge_values()
    rng = np.random.default_rng(1)
    stored = np.empty(values.shape, dtype=arrays.STORED[in_dtype])
    with np.errstate(over="ignore", invalid="ignore"):
        arrays.narrow(values.copy(), in_dtype, stored, np.empty_like(values))
        delta = (rng.standard_normal(values.shape) * rng.choice([0, 1e-3, 1, 1e30, 3e38], values.shape)).astype(np.float32)
        want_sums = np.empty(values.shape, dtype=np.float32)
        arrays.widen(stored, in_dtype, want_sums)
        want_sums += delta
    finite_sums = np.isfinite(want_sums)
    assert 0.5 < finite_sums.mean() < 1
    for part in (finite_sums, slice(None)):  # the finite sums alone, then all of them
        finite = bool(np.isfinite(want_sums[part]).all())
        assert finite == (part is finite_sums)
        want = np.empty(stored[part].shape, dtype=arrays.STORED[out_dtype])
        arrays.narrow(want_sums[part].copy(), out_dtype, want, np.empty_like(want_sums[part]), nan_free=finite)
        source = stored[part].copy()
        out = source.view(arrays.STORED[out_dtype])[:source.size] if in_place else np.empty_like(want)
        got = rows.add_round(source, in_dtype == "BF16", delta[part].copy(), out, out_dtype == "BF16")
        assert got == finite
        if finite:
            assert np.array_equal(out.view(np.uint8), want.view(np.uint8))


def test_the_kernel_refuses_buffers_of_other_sizes():
    if rows.add_round is None:
        pytest.skip("the compiled kernel is not built here")
    with pytest.raises(ValueError, match="sizes"):
        rows.add_round(np.zeros(4, np.uint16), True, np.zeros(3, np.float32), np.zeros(4, np.uint16), True)


def test_the_kernel_is_built_where_a_c_compiler_is():
    """An install on a machine with a C compiler (this one, CI) builds the kernel (setup.py); without one,
    the install goes on and the numpy step runs instead (the "numpy" cases above)."""
    import shutil
    import sysconfig

    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here")
    assert rows.add_round is not None, "pip install did not build lorafuse.compute._kernels"
