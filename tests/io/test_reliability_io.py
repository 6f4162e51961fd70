"""Adaptation copies its sources bit for bit and never writes over them or over a user's
files; a damaged tokenizer.model or model index is an error that names the file.

Oracles: the raw bytes and dtype tags of every stored tensor, read by a ten-line reader
below (not the library's), the sources' own files (snapshots), and sentencepiece's own
view of an intact tokenizer. Negative controls: `save_dtype` visibly changes the bytes; an
intact tokenizer and an intact index load.
"""

import json
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

import cases
from minencdec import cli
from minencdec.files.checkpoint import CheckpointError, save_tensors
from minencdec.io.pretrained import adapt_checkpoints, load_pretrained
from minencdec.io.tokenizer import Tokenizer, train_tokenizer
from minencdec.model import gemma2
from minencdec.model.adapt import map_name

SMALL = cases.GEMMA2_CASES["gqa_odd"]                                      # D 16, 3 layers
LARGE = SMALL.replace(hidden_size=24, num_hidden_layers=2, intermediate_size=40)
CROSS_FROM_SELF = {"cross_attn.q_proj": "self_attn.q_proj", "cross_attn.k_proj": "self_attn.k_proj",
                   "cross_attn.v_proj": "self_attn.v_proj", "cross_attn.o_proj": "self_attn.o_proj",
                   "pre_cross_attn_layernorm": "input_layernorm",
                   "post_cross_attn_layernorm": "post_attention_layernorm"}


def raw_tensors(directory: Path) -> dict[str, tuple[str, bytes]]:
    """name -> (dtype tag, raw bytes) of every tensor in model.safetensors, read by hand."""
    blob = (directory / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    header.pop("__metadata__", None)
    return {k: (e["dtype"], blob[8 + n + e["data_offsets"][0]:8 + n + e["data_offsets"][1]])
            for k, e in header.items()}


def snapshot(directory: Path):
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def source(tmp_path, config, name, seed, stored):
    model = gemma2.Gemma2Model(config, cases.random_params(gemma2.param_shapes(config), seed), "float64")
    model.save_pretrained(tmp_path / name, dtype=stored)
    (tmp_path / name / "tokenizer.model").write_bytes(b"the decoder's tokenizer")
    return tmp_path / name


# ----------------------------------------------------------------------------- item 8: dtypes

@pytest.mark.parametrize("stored, tag", [("float64", "F64"), ("float32", "F32"), ("bfloat16", "BF16")])
@pytest.mark.parametrize("work", ["float32", "float64"])           # the command's default is float32
def test_adaptation_copies_every_tensor_bit_for_bit(tmp_path, stored, tag, work):
    small = source(tmp_path, SMALL, "small", 1, stored)
    adapt_checkpoints(small, small, tmp_path / "t5", dtype=work)
    src, out = raw_tensors(small), raw_tensors(tmp_path / "t5")
    assert {t for t, _ in src.values()} == {tag}
    for name, stored_bytes in src.items():
        for side in ("encoder", "decoder"):
            assert out[map_name(name, side)] == stored_bytes, (name, side)
    for i in range(SMALL.num_hidden_layers):                       # "copy" cross-attention
        for cross, own in CROSS_FROM_SELF.items():
            assert out[f"model.decoder.layers.{i}.{cross}.weight"] == src[f"model.layers.{i}.{own}.weight"]
    assert len(out) == 2 * len(src) + 6 * SMALL.num_hidden_layers
    adapt_checkpoints(small, small, tmp_path / "narrow", save_dtype="bfloat16")     # negative control
    narrowed = raw_tensors(tmp_path / "narrow")
    assert {t for t, _ in narrowed.values()} == {"BF16"}
    assert (narrowed == out) == (tag == "BF16")


@pytest.mark.parametrize("stored, tag", [("float64", "F64"), ("bfloat16", "BF16")])
def test_unbalanced_adaptation_keeps_each_sources_dtype(tmp_path, stored, tag):
    """Encoder from an F32 source, decoder from an F64 or BF16 one: each side keeps its own;
    random cross-attention takes the decoder's."""
    large = source(tmp_path, LARGE, "large", 2, "float32")
    small = source(tmp_path, SMALL, "small", 1, stored)
    adapt_checkpoints(large, small, tmp_path / "t5", cross_attn="random")
    out = raw_tensors(tmp_path / "t5")
    for directory, side in ((large, "encoder"), (small, "decoder")):
        for name, stored_bytes in raw_tensors(directory).items():
            assert out[map_name(name, side)] == stored_bytes, (name, side)
    cross = {name: t for name, (t, _) in out.items() if "cross" in name}
    assert len(cross) == 6 * SMALL.num_hidden_layers and set(cross.values()) == {tag}
    t5 = load_pretrained(tmp_path / "t5", "float64")
    k = t5.params["model.decoder.layers.0.cross_attn.k_proj.weight"]
    assert k.shape == (SMALL.num_key_value_heads * SMALL.head_dim, 24) and 0.01 < k.std() < 0.03


# ----------------------------------------------------------------------------- item 8: the output

@pytest.mark.parametrize("where", ["is", "inside", "contains", "symlink"])
def test_the_output_may_never_be_a_source(tmp_path, where):
    small = source(tmp_path / "runs", SMALL, "small", 1, "float32")
    (small / "optimizer.safetensors").write_bytes(b"adam state")
    (small / "trainer_state.json").write_text("{}")
    before = snapshot(tmp_path)
    if where == "symlink":
        (tmp_path / "link").symlink_to(small)
    out = {"is": small, "inside": small / "adapted", "contains": tmp_path / "runs",
           "symlink": tmp_path / "link"}[where]
    relation = {"is": "is", "inside": "is inside", "contains": "contains", "symlink": "is"}[where]
    calls = []
    for kwargs in ({}, {"overwrite": True}):
        for enc, dec in ((small, small), (small, tmp_path / "other")):
            with pytest.raises(CheckpointError, match=f"the output directory {out} {relation} the encoder "
                                                      f"source {small}: adaptation never writes over"):
                adapt_checkpoints(enc, dec, out, progress=lambda *a: calls.append(a), **kwargs)
    assert calls == [] and snapshot(tmp_path) == before               # nothing read, nothing written


def test_the_command_refuses_to_write_over_its_source(tmp_path, capsys):
    small = source(tmp_path, SMALL, "small", 1, "float32")
    (small / "trainer_state.json").write_text('{"step": 1000}')
    before = snapshot(small)
    assert cli.main(["adapt", "--encoder-from", str(small), "--decoder-from", str(small), "--out", str(small)]) != 0
    assert "adaptation never writes over its sources" in capsys.readouterr().err
    assert snapshot(small) == before


def test_an_existing_output_is_replaced_only_with_overwrite_and_only_if_nothing_is_lost(tmp_path):
    small = source(tmp_path, SMALL, "small", 1, "float32")
    adapt_checkpoints(small, small, tmp_path / "t5")
    first = snapshot(tmp_path / "t5")
    calls = []
    with pytest.raises(CheckpointError, match=r"t5 already exists and is not empty .*overwrite=True"):
        adapt_checkpoints(small, small, tmp_path / "t5", seed=5, progress=lambda *a: calls.append(a))
    adapt_checkpoints(small, small, tmp_path / "t5", cross_attn="auto", seed=5, overwrite=True)
    assert snapshot(tmp_path / "t5") != first                          # replaced (the seed is recorded)
    shutil.copytree(tmp_path / "t5", tmp_path / "trained")             # a trained run's checkpoint
    (tmp_path / "trained" / "optimizer.safetensors").write_bytes(b"adam state")
    trained = snapshot(tmp_path / "trained")
    with pytest.raises(CheckpointError, match=r"trained: refusing to replace this directory: it holds "
                                              r"optimizer.safetensors, which the new checkpoint"):
        adapt_checkpoints(small, small, tmp_path / "trained", overwrite=True, progress=lambda *a: calls.append(a))
    assert calls == [] and snapshot(tmp_path / "trained") == trained


# ----------------------------------------------------------------------------- item 9: tokenizer

@pytest.fixture(scope="module")
def tokenizer_bytes():
    words = "the king queen castle river old young sword speaks runs".split()
    rng = np.random.default_rng(0)
    texts = [" ".join(rng.choice(words, 12)) for _ in range(200)]
    return train_tokenizer(texts, 300, num_sentinels=4).serialized()


def non_utf8_piece(proto: bytes) -> bytes:
    """The model with one byte of the piece "<extra_id_0>" made 0xFF: valid protobuf, but the
    piece is no longer UTF-8."""
    i = proto.index(b"<extra_id_0>")
    return proto[:i] + b"\xff" + proto[i + 1:]


@pytest.mark.parametrize("damage", ["empty", "random", "half", "last byte cut", "non-utf8 piece"])
def test_a_corrupt_tokenizer_model_is_a_named_value_error(tmp_path, tokenizer_bytes, damage):
    data = {"empty": b"", "random": np.random.default_rng(1).bytes(2000),
            "half": tokenizer_bytes[:len(tokenizer_bytes) // 2], "last byte cut": tokenizer_bytes[:-1],
            "non-utf8 piece": non_utf8_piece(tokenizer_bytes)}[damage]
    (tmp_path / "tokenizer.model").write_bytes(data)
    for path in (tmp_path, tmp_path / "tokenizer.model"):
        with pytest.raises(ValueError, match=rf"{tmp_path / 'tokenizer.model'} is not a sentencepiece model: \w"):
            Tokenizer.load(path)


def test_the_intact_tokenizer_loads(tmp_path, tokenizer_bytes):
    """Negative control for the damaged ones."""
    (tmp_path / "tokenizer.model").write_bytes(tokenizer_bytes)
    tok = Tokenizer.load(tmp_path)
    assert tok.decode(tok.encode("the old king speaks")) == "the old king speaks"
    assert tok.sentinel_ids and tok.serialized() == tokenizer_bytes


# ----------------------------------------------------------------------------- item 10: the index

@pytest.fixture
def sharded(tmp_path):
    model = gemma2.Gemma2Model(SMALL, cases.random_params(gemma2.param_shapes(SMALL), 1), "float64")
    save_tensors(tmp_path / "ck", model.params, model.hf_config(), max_shard_bytes=4096)
    index = json.loads((tmp_path / "ck" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3
    return tmp_path / "ck", index, model


def test_load_pretrained_names_a_damaged_index(sharded):
    ck, index, model = sharded
    file = ck / "model.safetensors.index.json"
    text = file.read_text()
    assert np.array_equal(load_pretrained(ck, "float64").params["model.norm.weight"],   # intact: loads
                          model.params["model.norm.weight"])
    shards = sorted(set(index["weight_map"].values()))
    name = next(n for n, s in index["weight_map"].items() if s == shards[0])
    twice = dict(index["weight_map"], **{name: "./" + shards[0]})
    duplicate = text.replace('"weight_map": {', f'"weight_map": {{\n    "{name}": "{shards[1]}",', 1)
    for damaged, message in [
        (text[:len(text) // 2], rf"{file}: invalid JSON"),
        (json.dumps({"weight_map": list(index["weight_map"])}), rf"{file}: needs a 'weight_map'"),
        (json.dumps({"weight_map": twice}), rf"{file}: maps '{name}' to './{shards[0]}', which is not a plain"),
        (duplicate, rf"{file}: lists '{name}' twice"),
    ]:
        file.write_text(damaged)
        with pytest.raises(CheckpointError, match=message):
            load_pretrained(ck, "float64")
    file.write_text(text)
    other = next(n for n, s in index["weight_map"].items() if s == shards[1])
    shard1 = ck / shards[1]                                   # copy a tensor of shard 0 into shard 1
    tensors = {n: model.params[n].copy() for n, s in index["weight_map"].items() if s == shards[1]}
    save_tensors(ck.parent / "tmp", {**tensors, name: model.params[name]}, {}, max_shard_bytes=10**9)
    os.replace(ck.parent / "tmp" / "model.safetensors", shard1)
    with pytest.raises(CheckpointError, match=rf"tensor '{name}' is stored twice: {ck / shards[0]} and {shard1}"):
        load_pretrained(ck, "float64")
    assert other in tensors
