"""Hostile or damaged checkpoint files are refused with an error that names the file and the
tensor(s), before any weight is read.

Oracles: the safetensors library (what it refuses, we refuse; what it loads, we load: a
Hypothesis property over random layouts), files written byte by byte below, and the
tensors' own arrays. Negative controls: every refused file has a repaired twin that loads.
"""

import json
import os
import re
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

from minencdec.files.checkpoint import CheckpointError, load_tensors, read_config, stored_dtypes

CONFIG = {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}


def write_raw(file, header, data=b""):
    """A safetensors file from a header dict (or raw header bytes) and the data section."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + data)


def f32(begin, n):
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


def library_loads(file) -> bool:
    try:
        with safe_open(str(file), "np") as f:
            for name in f.keys():
                f.get_tensor(name)
        return True
    except Exception:                             # SafetensorError and friends
        return False


def checkpoint(tmp_path, header, data):
    (tmp_path / "ck").mkdir(exist_ok=True)
    (tmp_path / "ck" / "config.json").write_text(json.dumps(CONFIG))
    write_raw(tmp_path / "ck" / "model.safetensors", header, data)
    return tmp_path / "ck"


# ----------------------------------------------------------------------------- item 1: layout

@pytest.mark.parametrize("header, data, message", [
    ({"a": f32(0, 2), "b": f32(0, 2)}, bytes(16), r"tensors 'a' and 'b' overlap: bytes \[0, 8\)"),
    ({"a": f32(0, 2), "b": f32(4, 2)}, bytes(16), r"tensors 'a' and 'b' overlap: bytes \[4, 8\)"),
    ({"big": f32(0, 4), "z": f32(4, 0)}, bytes(16), r"tensors 'big' and 'z' overlap"),
    ({"a": f32(0, 2), "b": f32(12, 2)}, bytes(20),
     r"bytes \[8, 12\) .* no tensor \(a gap between tensors 'a' and 'b'\)"),
    ({"a": f32(4, 2)}, bytes(12), r"bytes \[0, 4\) .* no tensor \(a gap before tensor 'a'\)"),
    ({"a": f32(0, 2)}, bytes(12), r"4 trailing byte\(s\) after the last tensor 'a'"),
    ({}, bytes(8), r"8 trailing byte\(s\) \(the header lists no tensor\)"),
])
def test_overlapping_gapped_or_padded_data_is_refused(tmp_path, header, data, message):
    ck = checkpoint(tmp_path, header, data)
    file = ck / "model.safetensors"
    assert not library_loads(file)                                   # the oracle refuses it too
    with pytest.raises(CheckpointError, match=rf"{file}: {message}"):
        load_tensors(ck, {n: tuple(e["shape"]) for n, e in header.items()}, np.float32)


def test_tiled_layouts_load_in_any_header_order(tmp_path):
    """Negative control: back-to-back tensors, listed out of order, with empty ones, load."""
    values = np.arange(6, dtype="<f4")
    header = {"b": f32(8, 4), "e1": f32(8, 0), "a": f32(0, 2), "e2": f32(24, 0)}
    ck = checkpoint(tmp_path, header, values.tobytes())
    assert library_loads(ck / "model.safetensors")
    got = load_tensors(ck, {"a": (2,), "b": (4,), "e1": (0,), "e2": (0,)}, np.float32)
    assert np.array_equal(got["a"], values[:2]) and np.array_equal(got["b"], values[2:])


@st.composite
def layouts(draw):
    """Up to 4 F32 tensors at offsets that are mostly back to back, sometimes anywhere, and a
    data section that is exact, longer or shorter."""
    header, end = {}, 0
    for i in range(draw(st.integers(0, 4))):
        n = draw(st.integers(0, 3))
        where = draw(st.sampled_from(["next", "next", "next", "aligned", "any"]))
        begin = {"next": end, "aligned": 4 * draw(st.integers(0, 8)), "any": draw(st.integers(0, 30))}[where]
        header[f"t{i}"] = f32(begin, n)
        end = max(end, begin + 4 * n)
    size = end if draw(st.sampled_from([True, True, False])) else draw(st.integers(0, end + 8))
    return header, bytes(size)


@given(layout=layouts())
def test_we_accept_exactly_what_the_safetensors_library_accepts(tmp_path_factory, layout):
    header, data = layout
    ck = checkpoint(tmp_path_factory.mktemp("ck"), header, data)
    try:
        stored_dtypes(ck)
        ours = True
    except CheckpointError:
        ours = False
    assert ours == library_loads(ck / "model.safetensors"), (header, len(data))


def test_a_tensor_named_twice_in_one_header_is_refused(tmp_path):
    text = b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, ' \
           b'"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}'
    ck = checkpoint(tmp_path, text, bytes(16))
    assert not library_loads(ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: header lists 'a' twice"):
        load_tensors(ck, {"a": (2,)}, np.float32)


def test_metadata_that_is_not_strings_is_refused(tmp_path):
    ck = checkpoint(tmp_path, {"__metadata__": {"format": 1}, "a": f32(0, 1)}, bytes(4))
    assert not library_loads(ck / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: __metadata__ must map names to strings"):
        load_tensors(ck, {"a": (1,)}, np.float32)
    ck = checkpoint(tmp_path, {"__metadata__": {"format": "pt"}, "a": f32(0, 1)}, bytes(4))
    assert library_loads(ck / "model.safetensors")                   # negative control
    assert load_tensors(ck, {"a": (1,)}, np.float32)["a"].tolist() == [0.0]


# ----------------------------------------------------------------------------- item 3: nesting

def nested(ck, where, depth):
    """Put a JSON value `depth` lists deep into one file of ck; returns (that file, a reader)."""
    deep = b"[" * depth + b"]" * depth
    if where == "header":
        write_raw(ck / "model.safetensors", b'{"a": ' + deep + b"}", bytes(4))
        return ck / "model.safetensors", lambda: load_tensors(ck, {"a": (1,)}, np.float32)
    if where == "config":
        (ck / "config.json").write_bytes(b'{"model_type": ' + deep + b"}")
        return ck / "config.json", lambda: read_config(ck)
    if (ck / "model.safetensors").exists():
        (ck / "model.safetensors").rename(ck / "model-00001-of-00001.safetensors")
    (ck / "model.safetensors.index.json").write_bytes(b'{"weight_map": ' + deep + b"}")
    return ck / "model.safetensors.index.json", lambda: load_tensors(ck, {"a": (1,)}, np.float32)


@pytest.mark.parametrize("where", ["header", "config", "index"])
def test_deeply_nested_json_is_a_named_error(tmp_path, where):
    ck = checkpoint(tmp_path, {"a": f32(0, 1)}, bytes(4))
    file, read = nested(ck, where, 100_000)
    with pytest.raises(CheckpointError, match=rf"{file}: .*nested too deeply"):
        read()
    _, read = nested(ck, where, 50)                    # negative control: 50 deep is read
    try:
        read()
    except CheckpointError as e:                       # (and refused for what it holds)
        assert "nested too deeply" not in str(e)


# ----------------------------------------------------------------------------- items 2, 10: the index

def sharded(tmp_path, weight_map_text):
    """ck/ with a config, one real shard and an index given as raw text."""
    ck = tmp_path / "ck"
    ck.mkdir()
    (ck / "config.json").write_text(json.dumps(CONFIG))
    save_file({"a": np.arange(2, dtype=np.float32), "b": np.ones(3, np.float32)},
              str(ck / "model-00001-of-00001.safetensors"))
    (ck / "model.safetensors.index.json").write_text(weight_map_text)
    return ck


def index_of(weight_map):
    return json.dumps({"metadata": {}, "weight_map": weight_map})


@pytest.mark.parametrize("shard", ["ABSOLUTE", "../outside.safetensors", "sub/outside.safetensors",
                                   "./model-00001-of-00001.safetensors", "..", ".", ""])
def test_an_index_may_only_name_files_beside_it(tmp_path, shard):
    """Each escaping name points at a real safetensors file holding the tensor, so a loader
    that followed it would succeed: the refusal is the only thing that stops it."""
    outside = tmp_path / "outside.safetensors"
    save_file({"a": np.full(2, 7.0, np.float32)}, str(outside))
    (tmp_path / "ck" / "sub").mkdir(parents=True)
    os.symlink(outside, tmp_path / "ck" / "sub" / "outside.safetensors")
    shard = str(outside) if shard == "ABSOLUTE" else shard
    ck = tmp_path / "ck"
    (ck / "config.json").write_text(json.dumps(CONFIG))
    (ck / "model-00001-of-00001.safetensors").symlink_to(outside)
    (ck / "model.safetensors.index.json").write_text(index_of({"a": shard}))
    with pytest.raises(CheckpointError, match=rf"index\.json: maps 'a' to {re.escape(repr(shard))}, "
                                              r"which is not a plain file name in .*ck"):
        load_tensors(ck, {"a": (2,)}, np.float32)


def test_a_plain_shard_name_that_is_a_symlink_is_followed(tmp_path):
    """Negative control, and the Hugging Face cache's layout: snapshots/<rev>/<file> are
    symlinks to ../../blobs/<hash>."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "rev"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    save_file({"a": np.full(2, 7.0, np.float32)}, str(blobs / "3f2a"))
    (blobs / "c0de").write_text(index_of({"a": "model-00001-of-00001.safetensors"}))
    (blobs / "cf00").write_text(json.dumps(CONFIG))
    for name, blob in [("model-00001-of-00001.safetensors", "3f2a"), ("model.safetensors.index.json", "c0de"),
                       ("config.json", "cf00")]:
        (snapshot / name).symlink_to(os.path.join("..", "..", "blobs", blob))
    assert read_config(snapshot) == CONFIG
    assert np.array_equal(load_tensors(snapshot, {"a": (2,)}, np.float32)["a"], [7.0, 7.0])


@pytest.mark.parametrize("index_text, message", [
    (index_of({"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"})[:40],
     r"index\.json: invalid JSON"),
    ("[1, 2]", r"index\.json: expected a JSON object, got list"),
    (json.dumps({"weight_map": ["model-00001-of-00001.safetensors"]}), r"index\.json: needs a 'weight_map'"),
    ('{"weight_map": {"a": "model-00001-of-00001.safetensors", "a": "model-00001-of-00001.safetensors", '
     '"b": "model-00001-of-00001.safetensors"}}', r"index\.json: lists 'a' twice"),
    (index_of({"a": "model-00001-of-00001.safetensors", "b": "./model-00001-of-00001.safetensors"}),
     r"index\.json: maps 'b' to './model-00001-of-00001.safetensors', which is not a plain file name"),
    (index_of({"a": "model-00001-of-00001.safetensors", "b": "model-00002-of-00002.safetensors"}),
     r"model-00002-of-00002\.safetensors: shard file listed in model\.safetensors\.index\.json is missing"),
])
def test_damaged_index_is_a_named_error(tmp_path, index_text, message):
    ck = sharded(tmp_path, index_text)
    with pytest.raises(CheckpointError, match=message):
        load_tensors(ck, {"a": (2,), "b": (3,)}, np.float32)


def test_index_negative_control_and_a_tensor_in_two_shards(tmp_path):
    one = "model-00001-of-00001.safetensors"
    ck = sharded(tmp_path, index_of({"a": one, "b": one}))
    got = load_tensors(ck, {"a": (2,), "b": (3,)}, np.float32)           # the intact index loads
    assert np.array_equal(got["a"], [0.0, 1.0]) and np.array_equal(got["b"], [1.0, 1.0, 1.0])
    save_file({"b": np.zeros(3, np.float32)}, str(ck / "model-00002-of-00002.safetensors"))
    (ck / "model.safetensors.index.json").write_text(index_of({"a": "model-00001-of-00001.safetensors",
                                                               "b": "model-00002-of-00002.safetensors"}))
    with pytest.raises(CheckpointError, match=r"tensor 'b' is stored twice: .*model-00001-of-00001\.safetensors "
                                              r"and .*model-00002-of-00002\.safetensors"):
        load_tensors(ck, {"a": (2,), "b": (3,)}, np.float32)
