"""The header parser and the shard layout, cross-checked with the reference safetensors library."""

import json
import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from lorafuse.errors import LorafuseError
from lorafuse.formats.safetensors import layout, read_header

DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.int64: "I64", torch.uint8: "U8", torch.bool: "BOOL"}


def test_reads_what_safetensors_writes(tmp_path):
    tensors = {
        "a": torch.randn(3, 4),
        "b": torch.randn(5).to(torch.bfloat16),
        "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "scalar": torch.tensor(1.5),
    }
    save_file(tensors, tmp_path / "m.safetensors", metadata={"format": "pt"})
    header = read_header(tmp_path / "m.safetensors")
    assert header.metadata == {"format": "pt"}
    for name, tensor in tensors.items():
        ref = header.tensors[name]
        assert ref.shape == tuple(tensor.shape) and ref.dtype == DTYPES[tensor.dtype]
        assert torch.equal(ref.read(), tensor)


def test_layout_is_readable_by_safetensors(tmp_path):
    tensors = {"x": torch.randn(7, 3).to(torch.bfloat16), "y": torch.arange(5, dtype=torch.int64), "z": torch.randn(1)}
    prefix, slots = layout([(n, DTYPES[t.dtype], tuple(t.shape)) for n, t in tensors.items()])
    path = tmp_path / "out.safetensors"
    with open(path, "wb") as f:
        f.write(prefix)
        for slot, t in zip(slots, tensors.values()):
            assert f.tell() == slot.offset
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    assert len(prefix) % 8 == 0
    with safe_open(path, "pt") as f:
        assert set(f.keys()) == set(tensors)
        for name, t in tensors.items():
            assert torch.equal(f.get_tensor(name), t)


def _file(tmp_path, header: dict, data: bytes = b"", length: int | None = None):
    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


@pytest.mark.parametrize(
    "header, data, length, message",
    [
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4, None, "truncated"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, 10**6, "runs past the end"),
        ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "overlaps"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, None, "gap"),
        ({"a": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None, "unknown dtype"),
        ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, None, "needs 12 bytes"),
        ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "invalid shape"),
        ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, None, "invalid data_offsets"),
        ({"__metadata__": {"k": 1}}, b"", None, "__metadata__"),
    ],
)
def test_rejects_malformed_headers(tmp_path, header, data, length, message):
    with pytest.raises(LorafuseError, match=message):
        read_header(_file(tmp_path, header, data, length))


def test_rejects_non_json_header(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(LorafuseError, match="not valid JSON"):
        read_header(path)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_header_parser_never_crashes(tmp_path_factory, blob):
    """Arbitrary bytes are either a valid file or a LorafuseError, never another exception."""
    path = tmp_path_factory.mktemp("fuzz") / "f.safetensors"
    path.write_bytes(blob)
    try:
        header = read_header(path)
    except LorafuseError:
        return
    for ref in header.tensors.values():
        ref.read()


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1, max_size=5), st.tuples(st.sampled_from(["F32", "U8", "I64"]), st.lists(st.integers(0, 3), max_size=3)), max_size=4),
       st.binary(max_size=64))
def test_fuzz_structured_headers(tmp_path_factory, entries, data):
    """Headers with plausible structure but arbitrary offsets and sizes are validated, never trusted."""
    header, cursor = {}, 0
    for name, (dtype, shape) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [cursor, cursor + len(data) // 3]}
        cursor += len(data) // 3
    path = _file(tmp_path_factory.mktemp("fuzz"), header, data)
    try:
        parsed = read_header(path)
    except LorafuseError:
        return
    with safe_open(path, "pt") as f:  # whatever we accept, the reference implementation accepts too
        assert set(f.keys()) == set(parsed.tensors)
