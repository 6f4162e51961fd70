"""Tests for minencdec.files.checkpoint. Oracles: the safetensors library, a tiny hand-written
safetensors writer below, numpy's float16, torch's bfloat16 and transformers' own
from_pretrained / save_pretrained. Every comparison is exact (rtol 0)."""

import json
import os
import re
import struct

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from helpers import assert_close
from minencdec.files.checkpoint import CheckpointError, load_tensors, read_config, save_tensors
from minencdec.io.pretrained import checkpoint_kind
from minencdec.model.config import GemmaConfig

CONFIG = {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"]}


def make_tensors(dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"model.embed_tokens.weight": (7, 4), "model.norm.weight": (4,),
              "model.layers.0.mlp.up_proj.weight": (3, 4), "model.odd": (2, 3, 5)}
    return {name: rng.standard_normal(shape).astype(dtype) for name, shape in shapes.items()}


def shapes_of(tensors):
    return {name: array.shape for name, array in tensors.items()}


def assert_same(got, want):
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == want[name].dtype, name
        assert_close(name, got[name], want[name], rtol=0.0)


def write_raw(file, entries):
    """An independent minimal safetensors writer: entries = {name: (tag, shape, raw bytes)}."""
    header, blob = {}, b""
    for name, (tag, shape, data) in entries.items():
        header[name] = {"dtype": tag, "shape": list(shape), "data_offsets": [len(blob), len(blob) + len(data)]}
        blob += data
    text = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(text)) + text + blob)


def is_owned(a):
    return type(a) is np.ndarray and a.flags.owndata and a.flags.writeable and a.flags.c_contiguous


@pytest.mark.parametrize("dtype, save_as", [(np.float32, None), (np.float64, None), (np.float32, "float16")])
def test_round_trip_exact(tmp_path, dtype, save_as):
    stored = {name: a.astype(save_as or dtype) for name, a in make_tensors(dtype).items()}
    want = {name: a.astype(dtype) for name, a in stored.items()}
    save_tensors(tmp_path / "ck", make_tensors(dtype), CONFIG, dtype=save_as)
    assert read_config(tmp_path / "ck") == CONFIG
    assert_same(load_file(str(tmp_path / "ck" / "model.safetensors")), stored)   # oracle reader
    calls = []
    got = load_tensors(tmp_path / "ck", shapes_of(want), dtype, progress=lambda *a: calls.append(a))
    assert_same(got, want)
    assert calls == [(i + 1, 4, name) for i, name in enumerate(want)]      # one file, in order
    file = tmp_path / "ck" / "model.safetensors"  # negative control: flip one bit of the data
    file.write_bytes(file.read_bytes()[:-1] + bytes([file.read_bytes()[-1] ^ 0x40]))
    got = load_tensors(tmp_path / "ck", shapes_of(want), dtype)
    with pytest.raises(AssertionError):
        assert_same(got, want)


def test_reads_safetensors_library_files(tmp_path):
    """F64 and F16 written by the library: exact in float64, rounded like numpy in float32."""
    want = {**make_tensors(np.float64), "half": np.float16([[0.1, -2.5e-5, 65504.0, 6e-8]])}
    (tmp_path / "ck").mkdir()
    save_file(want, str(tmp_path / "ck" / "model.safetensors"))
    for dtype in (np.float64, np.float32):
        got = load_tensors(tmp_path / "ck", shapes_of(want), dtype)
        assert_same(got, {name: a.astype(dtype) for name, a in want.items()})


def test_sharded_round_trip(tmp_path):
    want = make_tensors(np.float32)
    save_tensors(tmp_path / "ck", want, CONFIG, max_shard_bytes=100)      # ~1 tensor per shard
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "ck" / "model.safetensors").exists()
    assert all(re.fullmatch(rf"model-0000\d-of-0000{len(shards)}\.safetensors", s) for s in shards)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in want.values())
    for shard in shards:                          # each shard is a valid file for the library
        for name, array in load_file(str(tmp_path / "ck" / shard)).items():
            assert index["weight_map"][name] == shard
            assert_close(name, array, want[name], rtol=0.0)
    assert_same(load_tensors(tmp_path / "ck", shapes_of(want), np.float32), want)
    (tmp_path / "ck" / shards[1]).unlink()
    with pytest.raises(CheckpointError, match=rf"{shards[1]}: shard file .* missing"):
        load_tensors(tmp_path / "ck", shapes_of(want), np.float32)


def test_bfloat16_read_exact_without_torch(tmp_path):
    values = np.random.default_rng(1).standard_normal((5, 6)).astype(np.float32)
    values = np.concatenate([values, [[0.0, -0.0, np.inf, -np.inf, 1e-40, 3e38]]])
    bits32 = values.view(np.uint32)
    exact = (bits32 & 0xFFFF0000).view(np.float32)          # bfloat16 values: low half zero
    (tmp_path / "ck").mkdir()
    write_raw(tmp_path / "ck" / "model.safetensors",
              {"w": ("BF16", exact.shape, (bits32 >> 16).astype("<u2").tobytes())})
    got = load_tensors(tmp_path / "ck", {"w": exact.shape}, np.float64)["w"]
    got_bits = got.astype(np.float32).view(np.uint32)      # exact: got holds bfloat16 values
    assert got.dtype == np.float64 and np.array_equal(got_bits, exact.view(np.uint32))
    assert not np.array_equal(got_bits, bits32)             # negative control: the low bits matter


def bfloat16_cases():
    """float32 values that probe rounding: exact ties (low half 0x8000) with even and odd upper
    halves, one bit either side of a tie, subnormals, the overflow edge, signed zeros."""
    upper = np.array([0x3F80, 0x3F81, 0xBF80, 0xBF81, 0x0001, 0x7F7F, 0x7F7E], np.uint32) << 16
    low = np.array([0x8000, 0x7FFF, 0x8001, 0x0000, 0xFFFF], np.uint32)
    ties = (upper[:, None] | low[None, :]).ravel().view(np.float32)
    rng = np.random.default_rng(2)
    randoms = (rng.standard_normal(64) * 10.0 ** rng.integers(-30, 30, 64)).astype(np.float32)
    return np.concatenate([ties, randoms, np.float32([0.0, -0.0, np.inf, -np.inf, np.nan])])


def test_bfloat16_against_torch(tmp_path):
    """We read torch's bfloat16 files bit for bit, and round to bfloat16 exactly as torch does."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as torch_load_file, save_file as torch_save_file
    x = bfloat16_cases()
    theirs = torch.from_numpy(x).to(torch.bfloat16)
    (tmp_path / "theirs").mkdir()
    torch_save_file({"w": theirs}, str(tmp_path / "theirs" / "model.safetensors"))
    got = load_tensors(tmp_path / "theirs", {"w": x.shape}, np.float32)["w"]
    assert np.array_equal(got.view(np.uint32), theirs.float().numpy().view(np.uint32))
    save_tensors(tmp_path / "ours", {"w": x}, CONFIG, dtype="bfloat16")
    ours = torch_load_file(str(tmp_path / "ours" / "model.safetensors"))["w"]
    assert ours.dtype == torch.bfloat16
    nan = np.isnan(x)                             # NaN payloads differ (torch writes 0xFFFF)
    want_bits = theirs.view(torch.int16).numpy()[~nan]
    assert np.array_equal(ours.view(torch.int16).numpy()[~nan], want_bits)
    assert torch.isnan(ours[torch.from_numpy(nan)]).all()
    truncated = (x.view(np.uint32) >> 16).astype(np.int16)[~nan]   # negative control: truncation
    assert not np.array_equal(truncated, want_bits)


def test_save_bfloat16_from_float64_rounds_once(tmp_path):
    # Hand oracle. bfloat16 neighbours of 1 are 1 and 1 + 2**-7; 1 + 2**-8 is the tie (-> even, 1).
    # 1 + 2**-8 + 2**-40 is just above the tie: rounding through float32 first would lose the
    # 2**-40 and give 1 (double rounding); one correct rounding gives 1 + 2**-7.
    x = np.array([1 + 2**-8, 1 + 2**-8 + 2**-40, 1 + 3 * 2**-8, -(1 + 2**-8 + 2**-40)])
    save_tensors(tmp_path / "ck", {"w": x}, CONFIG, dtype="bfloat16")
    got = load_tensors(tmp_path / "ck", {"w": (4,)}, np.float64)["w"]
    assert_close("bf16", got, [1.0, 1 + 2**-7, 1 + 2**-6, -(1 + 2**-7)], rtol=0.0)


def test_load_returns_owned_writable_contiguous_arrays(tmp_path):
    want = make_tensors(np.float32)
    for stored, dtype in [("bfloat16", np.float32), ("bfloat16", np.float64), ("float32", np.float32),
                          ("float32", np.float64)]:          # widened, converted or read as is
        save_tensors(tmp_path / "f32", want, CONFIG, dtype=stored, overwrite=True)
        for name, a in load_tensors(tmp_path / "f32", shapes_of(want), dtype).items():
            assert is_owned(a) and a.dtype == dtype, (stored, dtype, name)
    mapped = np.memmap(tmp_path / "f32" / "model.safetensors", dtype=np.uint8, mode="r")
    assert not is_owned(mapped) and not is_owned(np.zeros((4, 4))[:, ::2])    # negative controls


def tiny_hf_model(torch, transformers):
    ours = GemmaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, head_dim=8,
                       num_attention_heads=2, num_key_value_heads=1, query_pre_attn_scalar=8, sliding_window=4)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**ours.to_hf_dict()))
    with torch.no_grad():                         # random everywhere, norms included (not zeros)
        for p in model.parameters():
            p.normal_()
    return ours, model


def test_transformers_loads_what_we_save(tmp_path):
    torch, transformers = pytest.importorskip("torch"), pytest.importorskip("transformers")
    ours, model = tiny_hf_model(torch, transformers)
    written = {k: v.numpy().copy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_tensors(tmp_path / "ck", written, ours.to_hf_dict(), extra_files={"notes.txt": b"hi"})
    assert (tmp_path / "ck" / "notes.txt").read_bytes() == b"hi"
    loaded, info = transformers.Gemma2ForCausalLM.from_pretrained(tmp_path / "ck", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    state = {k: v.numpy() for k, v in loaded.state_dict().items()}
    assert_same({k: state[k] for k in written}, written)
    assert_close("lm_head (tied)", state["lm_head.weight"], written["model.embed_tokens.weight"], 0.0)
    fresh = transformers.Gemma2ForCausalLM(loaded.config)          # negative control
    with pytest.raises(AssertionError):
        assert_same({k: v.numpy() for k, v in fresh.state_dict().items() if k in written}, written)


@pytest.mark.parametrize("torch_dtype", ["float32", "bfloat16"])
def test_we_load_what_transformers_saves(tmp_path, torch_dtype):
    torch, transformers = pytest.importorskip("torch"), pytest.importorskip("transformers")
    _, model = tiny_hf_model(torch, transformers)
    model.to(getattr(torch, torch_dtype)).save_pretrained(tmp_path / "ck")
    assert checkpoint_kind(read_config(tmp_path / "ck")) == "gemma2"
    want = {k: v.float().numpy() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    got = load_tensors(tmp_path / "ck", shapes_of(want), np.float32, ignore=("lm_head.weight",))
    assert_same(got, want)


@pytest.fixture
def ck(tmp_path):
    save_tensors(tmp_path / "ck", make_tensors(), CONFIG)
    return tmp_path / "ck"


def test_header_errors(ck):
    shapes, calls = shapes_of(make_tensors()), []
    with pytest.raises(CheckpointError, match="missing: model.extra"):
        load_tensors(ck, {**shapes, "model.extra": (1,)}, np.float32, progress=calls.append)
    with pytest.raises(CheckpointError, match="unknown tensor.*model.odd"):
        load_tensors(ck, {k: v for k, v in shapes.items() if k != "model.odd"}, np.float32)
    load_tensors(ck, {k: v for k, v in shapes.items() if k != "model.odd"}, np.float32, ignore=("model.odd",))
    with pytest.raises(CheckpointError, match=re.escape("model.odd has shape (2, 3, 5) in model.safetensors, "
                                                        "the model expects (2, 5, 3)")):
        load_tensors(ck, {**shapes, "model.odd": (2, 5, 3)}, np.float32)
    assert calls == []                            # validated before any data was read
    write_raw(ck / "model.safetensors", {"ids": ("I64", (3,), np.arange(3, dtype="<i8").tobytes())})
    with pytest.raises(CheckpointError, match=r"unsupported dtype for ids \(I64\)"):
        load_tensors(ck, {"ids": (3,)}, np.float32)
    (ck / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_tensors(ck, {"ids": (3,)}, np.float32)


@pytest.mark.parametrize("damage, message", [   # the last tensor is cut: caught before any read
    (lambda data: data[:-3], r"model\.safetensors: tensor 'model.odd' .* truncated"),
    (lambda data: struct.pack("<Q", 12) + b"not json!!!!" + data[-16:], r"model\.safetensors: header is not valid JSON"),
    (lambda data: struct.pack("<Q", 2**40) + b"{}", r"model\.safetensors: header length 1099511627776"),
    (lambda data: b"", r"model\.safetensors: header length"),
])
def test_damaged_file(ck, damage, message):
    file, calls = ck / "model.safetensors", []
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(CheckpointError, match=message):
        load_tensors(ck, shapes_of(make_tensors()), np.float32, progress=calls.append)
    assert calls == []


def test_config_errors(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        read_config(tmp_path / "nowhere")
    (tmp_path / "ck").mkdir()
    for text, message in [(None, "config.json: file is missing"),
                          ('{"model_type": ', "config.json: invalid JSON"),
                          ("[1, 2]", "config.json: expected a JSON object, got list")]:
        if text is not None:
            (tmp_path / "ck" / "config.json").write_text(text)
        with pytest.raises(CheckpointError, match=message):
            read_config(tmp_path / "ck")
    configs = [{"model_type": "t5gemma"}, {"architectures": ["T5GemmaForConditionalGeneration"]},
               {"architectures": ["Gemma2ForCausalLM"]}, GemmaConfig().to_hf_dict()]
    assert [checkpoint_kind(c) for c in configs] == ["t5gemma", "t5gemma", "gemma2", "gemma2"]
    with pytest.raises(CheckpointError, match="'llama'"):
        checkpoint_kind({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def snapshot(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# fsync #2: a.txt of the new checkpoint, after config.json was written. rename #3: new -> ck,
# after ck was moved aside by rename #2 (rename #4 must then move it back). A killed process
# at every instant of a save is tested in test_reliability_saves.py.
@pytest.mark.parametrize("call", ["fsync", "rename"])
def test_failed_save_keeps_old_checkpoint_and_a_good_one_replaces_it(tmp_path, monkeypatch, call):
    save_tensors(tmp_path / "ck", make_tensors(seed=0), CONFIG, extra_files={"a.txt": b"old"})
    before = snapshot(tmp_path / "ck")
    real, calls = getattr(os, call), []
    fail_at = {"fsync": 2, "rename": 3}[call]
    def fail_once(*args):
        calls.append(args)
        if len(calls) == fail_at:
            raise OSError("disk full (simulated)")
        return real(*args)
    monkeypatch.setattr(os, call, fail_once)
    with pytest.raises(OSError, match="simulated"):
        save_tensors(tmp_path / "ck", make_tensors(seed=1), {"model_type": "t5gemma"},
                     extra_files={"a.txt": b"new"}, overwrite=True)
    assert len(calls) == {"fsync": 2, "rename": 5}[call]     # rename #5: the new copy renamed .del
    monkeypatch.undo()
    assert snapshot(tmp_path / "ck") == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]          # no temporary directory left
    new = make_tensors(np.float64, seed=1)
    with pytest.raises(CheckpointError, match=r"ck: refusing to replace .* holds a\.txt"):
        save_tensors(tmp_path / "ck", new, {"model_type": "t5gemma"}, overwrite=True)
    (tmp_path / "ck" / "a.txt").unlink()
    save_tensors(tmp_path / "ck", new, {"model_type": "t5gemma"}, overwrite=True)
    assert snapshot(tmp_path / "ck") != before
    assert read_config(tmp_path / "ck") == {"model_type": "t5gemma"}
    assert_same(load_tensors(tmp_path / "ck", shapes_of(new), np.float64), new)
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_refuses_to_replace_what_is_not_a_checkpoint(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    with pytest.raises(CheckpointError, match="photos already exists and is not empty .*overwrite=True"):
        save_tensors(tmp_path / "photos", make_tensors(), CONFIG)
    with pytest.raises(CheckpointError, match="photos: refusing to replace this directory: it holds cat.jpg"):
        save_tensors(tmp_path / "photos", make_tensors(), CONFIG, overwrite=True)
    (tmp_path / "file").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="file exists and is not a directory"):
        save_tensors(tmp_path / "file", make_tensors(), CONFIG, overwrite=True)
    with pytest.raises(CheckpointError, match="'ids': expected a float16/32/64 numpy array, got int64"):
        save_tensors(tmp_path / "new", {"ids": np.arange(3)}, CONFIG)
    assert (tmp_path / "photos" / "cat.jpg").read_bytes() == b"meow"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "photos"]
    (tmp_path / "empty").mkdir()                  # an empty directory is fine to fill
    save_tensors(tmp_path / "empty", make_tensors(), CONFIG)
    assert read_config(tmp_path / "empty") == CONFIG


def test_extra_tensor_files_are_safetensors_in_their_own_dtypes(tmp_path):
    """extra_tensors writes a safetensors file per name, read back by the safetensors library
    bit for bit; a bad name, a clash with extra_files or a non-array is refused before anything
    is written."""
    moments = {"exp_avg/w": make_tensors(seed=2)["model.odd"], "exp_avg_sq/w": make_tensors(np.float64)["model.odd"]}
    save_tensors(tmp_path / "ck", make_tensors(), CONFIG, extra_tensors={"optimizer.safetensors": moments})
    assert_same(load_file(tmp_path / "ck" / "optimizer.safetensors"), moments)
    for bad, match in [({"model-2.safetensors": moments}, "not a weights file"),
                       ({"notes.txt": {"x": [1.0]}}, "tensor 'x': expected a float16/32/64 numpy array"),
                       ({"a.txt": moments}, "both as extra bytes and as extra tensors")]:
        with pytest.raises(CheckpointError, match=match):
            save_tensors(tmp_path / "new", make_tensors(), CONFIG, extra_files={"a.txt": b"x"}, extra_tensors=bad)
        assert not (tmp_path / "new").exists()
