"""The header parser and the shard layout, cross-checked with the reference safetensors library."""

import json
import math
import struct
import tracemalloc

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


# -- the reference library as the oracle: lorafuse reads a file iff safetensors does --------------------

def _reference_reads(path) -> list[str] | None:
    """The tensor names safetensors reads from `path`, or None when it refuses the file."""
    try:
        with safe_open(path, "pt") as f:
            return sorted(f.keys())
    except Exception:  # SafetensorError, and whatever else its parser raises for a bad file
        return None


def _raw_file(tmp_path, header_text: str, data: bytes):
    raw = header_text.encode("utf-8", "surrogatepass")
    path = tmp_path / "f.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _assert_same_as_reference(path) -> None:
    expected = _reference_reads(path)
    try:
        got = sorted(read_header(path).tensors)
    except LorafuseError as e:
        assert "\n" not in str(e)
        got = None
    assert got == expected


def _entry_text(dtype, shape, offsets, extra: str = "") -> str:
    return '{"dtype":%s,"shape":%s,"data_offsets":%s%s}' % (json.dumps(dtype), shape, offsets, extra)


@pytest.mark.parametrize("header, data", [
    # a zero-size tensor at another tensor's start: the reference sorts by (start, end)
    ('{"b":%s,"a":%s}' % (_entry_text("F32", [2], [0, 8]), _entry_text("F32", [0], [0, 0])), 8),
    ('{"a":%s,"b":%s,"c":%s}' % (_entry_text("F32", [0], [4, 4]), _entry_text("F32", [1], [0, 4]), _entry_text("F32", [1], [4, 8])), 8),
    # a lone surrogate in a name, in metadata, in an ignored field; a pair is fine
    ('{"\\ud800":%s}' % _entry_text("F32", [2], [0, 8]), 8),
    ('{"__metadata__":{"k":"\\udc00"},"a":%s}' % _entry_text("F32", [2], [0, 8]), 8),
    ('{"a":%s}' % _entry_text("F32", [2], [0, 8], ',"x":["\\ud800"]'), 8),
    ('{"\\ud83d\\ude00":%s}' % _entry_text("F32", [2], [0, 8]), 8),
    # shape products in checked 64-bit arithmetic, in order
    ('{"a":%s}' % _entry_text("F32", [2**40, 2**40, 0], [0, 0]), 0),
    ('{"a":%s}' % _entry_text("F32", [0, 2**40, 2**40], [0, 0]), 0),
    ('{"a":%s}' % _entry_text("U8", [2**64 - 1, 0], [0, 0]), 0),
    ('{"a":%s}' % _entry_text("U8", [2**64, 0], [0, 0]), 0),
    ('{"a":%s}' % _entry_text("F64", [2**61], [0, 0]), 0),
    # sub-byte types: whole bytes only
    ('{"a":%s}' % _entry_text("F4", [4], [0, 2]), 2),
    ('{"a":%s}' % _entry_text("F4", [3], [0, 2]), 2),
    ('{"a":%s}' % _entry_text("F6_E2M3", [4], [0, 3]), 3),
    ('{"a":%s}' % _entry_text("C64", [1], [0, 8]), 8),
    # serde_json's JSON: -0 is a float, numbers in range, no NaN, nesting, repeated fields
    ('{"a":%s}' % _entry_text("F32", [2], "[-0,8]"), 8),
    ('{"a":%s}' % _entry_text("F32", [2], [0, 8], ',"x":-0'), 8),
    ('{"a":%s}' % _entry_text("F32", [2], [0, 8], ',"x":1e400'), 8),
    ('{"a":%s}' % _entry_text("F32", [2], [0, 8], ',"x":%s' % ("9" * 400)), 8),
    ('{"a":%s}' % _entry_text("F32", [2], [0, 8], ',"x":%s' % ("9" * 30)), 8),
    ('{"a":%s}' % _entry_text("F32", [2], [0, 8], ',"x":NaN'), 8),
    ('{"a":%s}' % _entry_text("F32", [2], [0, 8], ',"x":%s' % ("[" * 125 + "]" * 125)), 8),
    ('{"a":%s}' % _entry_text("F32", [2], [0, 8], ',"x":%s' % ("[" * 126 + "]" * 126)), 8),
    ('{"a":%s}' % _entry_text("F32", [2], [0, 8], ',"x":{"dtype":"F32","shape":[%s],"data_offsets":[0,0]}' % ("[" * 124 + "]" * 124)), 8),
    ('{"a":%s}' % _entry_text("F32", [2], [0, 8], ',"dtype":"F32"'), 8),
    ('{"a":%s,"a":%s}' % (_entry_text("F32", [2], [0, 8]), _entry_text("F32", [2], [0, 8])), 8),
    ('{"a":%s,"a":%s}' % (_entry_text("Q4", [2], [0, 8]), _entry_text("F32", [2], [0, 8])), 8),
    ('{"__metadata__":{},"__metadata__":{}}', 0),
    ('{"__metadata__":{"k":1,"k":"v"}}', 0),
    ('{"__metadata__":null}', 0),
    ('{"__metadata__":false}', 0),
    ('{"__metadata__":[]}', 0),
    ('{"a":%s}' % _entry_text("F32", [2], [0, 8])[:-1] + ',"shape":[2]}', 8),
    ('{"a":{"dtype":"F32","shape":[2]}}', 0),
    ('{"a":null}', 0),
    ('{"dtype":"F32","shape":[2],"data_offsets":[0,8]}', 8),
    ('{"a":%s}' % _entry_text("F32", [2.0], [0, 8]), 8),
    ('{"a":%s}' % _entry_text("F32", [2], [0, 8, 8]), 8),
    ('\ufeff{}', 0),
    ('{} \n\t', 0),
    ('{"a\\u0000":%s}' % _entry_text("F32", [2], [0, 8]), 8),
])
def test_reads_exactly_what_safetensors_reads(tmp_path, header, data):
    _assert_same_as_reference(_raw_file(tmp_path, header, b"\0" * data))


def test_header_over_the_reference_limit_is_refused_with_its_message(tmp_path):
    path = tmp_path / "big.safetensors"
    path.write_bytes(struct.pack("<Q", 100_000_001) + b" " * 16)
    with pytest.raises(LorafuseError, match="header too large"):
        read_header(path)
    assert _reference_reads(path) is None


JSON_ATOMS = st.sampled_from([
    "0", "-0", "1", "-1", "18446744073709551615", "18446744073709551616", "9" * 400, "1.0", "-0.0", "1e400",
    "1e-400", "NaN", "-Infinity", "true", "false", "null", '"F32"', '"\\ud800"', '"\\udfff"', '"\\ud83d\\ude00"',
    '"\\u0000"', "[" * 126 + "]" * 126, "[" * 127 + "]" * 127, "{}", "[]", "[0,4]", "[4]", "[2,2]",
])


def _json_texts(atoms):
    """JSON-ish texts: the atoms above (valid, invalid and boundary values), nested in lists and objects."""
    keys = st.sampled_from(['"dtype"', '"shape"', '"data_offsets"', '"x"', '""', '"\\ud800"'])
    return st.recursive(atoms, lambda inner: st.one_of(
        st.lists(inner, max_size=3).map(lambda items: "[" + ",".join(items) + "]"),
        st.lists(st.tuples(keys, inner), max_size=3).map(lambda kv: "{" + ",".join(f"{k}:{v}" for k, v in kv) + "}"),
    ), max_leaves=6)


@st.composite
def mutated_headers(draw):
    """A valid header (zero-size tensors and any entry order included) with a few of its parts replaced
    by other JSON texts, fields repeated, dropped or added, and the data section of the right size or not."""
    dtypes = st.sampled_from(["F32", "BF16", "U8", "I64", "BOOL", "F4", "F6_E3M2", "C64", "F8_E4M3FNUZ"])
    tensors = draw(st.lists(st.tuples(st.sampled_from(["a", "b", "c", "", "\\ud800", "\\u00e9"]), dtypes,
                                      st.lists(st.integers(0, 3), max_size=3)), max_size=4))
    values = _json_texts(JSON_ATOMS)
    entries, cursor = [], 0
    for name, dtype, shape in tensors:
        bits = {"F4": 4, "F6_E3M2": 6, "U8": 8, "BOOL": 8, "F8_E4M3FNUZ": 8, "BF16": 16, "F32": 32}.get(dtype, 64)
        size = math.prod(shape) * bits // 8
        fields = {"dtype": json.dumps(dtype), "shape": json.dumps(shape), "data_offsets": json.dumps([cursor, cursor + size])}
        cursor += size
        for key in draw(st.lists(st.sampled_from(["dtype", "shape", "data_offsets", "x"]), max_size=2)):
            fields[key] = draw(values)
        text = ",".join(f'"{k}":{v}' for k, v in fields.items())
        if draw(st.booleans()) and draw(st.booleans()):
            text += f',"{draw(st.sampled_from(["dtype", "x"]))}":{draw(values)}'
        entries.append(f'"{name}":{{{text}}}')
    metadata = draw(st.sampled_from(["", '"__metadata__":null', '"__metadata__":{"format":"pt"}', None]))
    if metadata is None:
        metadata = f'"__metadata__":{draw(values)}'
    entries = draw(st.permutations(entries + ([metadata] if metadata else [])))
    data = cursor + draw(st.sampled_from([0, 0, 0, -1, 1]))
    return "{" + ",".join(entries) + "}", max(0, data)


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(mutated_headers())
def test_fuzz_accepts_exactly_what_safetensors_accepts(tmp_path_factory, case):
    header, data = case
    _assert_same_as_reference(_raw_file(tmp_path_factory.mktemp("fuzz"), header, b"\0" * data))


def test_header_memory_is_a_small_multiple_of_its_size(tmp_path):
    """A huge header (many small tensors) is held as compactly as its entries allow: a few times its own
    size, not the tenfold of a dict, two lists and a dataclass per entry."""
    count = 100_000
    header = {f"model.layers.{i // 1000}.mlp.experts.{i % 1000}.down_proj.weight":
              {"dtype": "BF16", "shape": [1, 1], "data_offsets": [2 * i, 2 * i + 2]} for i in range(count)}
    path = _file(tmp_path, header, b"\0" * 2 * count)
    header_bytes = path.stat().st_size - 2 * count
    del header
    tracemalloc.start()
    try:
        parsed = read_header(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(parsed.tensors) == count
    assert peak < 6 * header_bytes
