"""GGUF import on tiny Gemma 3 files the tests write themselves (tests/gguf_cases.py).

Oracles: the weights the test wrote (names from the test's own table, norms stored as w + 1),
numpy's own decoding of the Q8_0 block format, float16 widened by numpy, and, with torch,
transformers' `Gemma3ForCausalLM.from_pretrained(dir, gguf_file=...)` reading the same file.
Refusals (another architecture, a truncated file, a missing or unknown tensor, a used output
directory) are raised before anything is written. Negative controls: the Q8_0 oracle tells
dequantised from original values apart, and a file whose norms lack the +1 is caught.
"""

import json

import numpy as np
import pytest
from gguf import GGUFReader

from gguf_cases import block_type, gguf_name, q8_0_values, tiny_vocab, write_tiny_gguf
from helpers import RTOL_F32, assert_close
from minencdec.files.checkpoint import load_tensors
from minencdec.io.gguf import GGUFError, gemma3_config_from_gguf, import_gguf, open_gguf
from minencdec.model.config import FULL, SLIDING, GemmaConfig
from minencdec.model.gemma2 import Gemma2Model, param_shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(gguf path, the written weights, the imported directory, its config)."""
    root = tmp_path_factory.mktemp("gguf")
    weights = write_tiny_gguf(root / "tiny.gguf")
    config = import_gguf(root / "tiny.gguf", root / "out")
    return root / "tiny.gguf", weights, root / "out", config


def read_dir(path):
    config = GemmaConfig.from_hf_dict(json.loads((path / "config.json").read_text()), family="gemma3")
    return config, load_tensors(path, param_shapes(config), "float32")


def expected_values(path, weights):
    """What each tensor must import as, computed by numpy from the file's raw bytes."""
    reader = GGUFReader(path)
    raw = {t.name: t.data for t in reader.tensors}
    out = {}
    for hf, w in weights.items():
        kind = block_type(hf).name
        if kind == "Q8_0":
            out[hf] = q8_0_values(raw[gguf_name(hf)])
        elif kind == "F16":
            out[hf] = raw[gguf_name(hf)].astype(np.float32)
        else:
            out[hf] = np.array(raw[gguf_name(hf)], dtype=np.float32)
        if hf.endswith("norm.weight"):
            out[hf] = out[hf] - np.float32(1.0)
    return out


def test_every_tensor_is_named_and_dequantised_as_the_format_says(tiny):
    path, weights, out, _ = tiny
    _, params = read_dir(out)
    assert set(params) == set(weights)
    want = expected_values(path, weights)
    for name, w in params.items():
        assert w.shape == weights[name].shape, name
        assert np.array_equal(w, want[name]), name
    # The formats are what the test asked for, and their values sit near the originals.
    assert {block_type(n).name for n in weights} == {"Q8_0", "F16", "F32"}
    for name, w in weights.items():
        tol = {"Q8_0": 0.02, "F16": 1e-3, "F32": 1e-6}[block_type(name).name]
        assert np.max(np.abs(params[name] - w)) <= tol * max(1.0, np.max(np.abs(w))), name


def test_q8_0_oracle_can_fail(tiny):
    """Negative control: the dequantised embedding is not the original float32 one, so the
    equality above could not pass by comparing a tensor with itself."""
    path, weights, out, _ = tiny
    _, params = read_dir(out)
    embed = "model.embed_tokens.weight"
    assert not np.array_equal(params[embed], weights[embed])
    assert np.array_equal(params[embed], expected_values(path, weights)[embed])


def test_norms_lose_their_stored_plus_one(tiny, tmp_path):
    _, weights, out, _ = tiny
    _, params = read_dir(out)
    for name in ("model.norm.weight", "model.layers.3.self_attn.k_norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert np.array_equal(params[name], (weights[name] + np.float32(1)) - np.float32(1))
    # A file written without the +1 imports 1 lower: the check above would see it.
    plain = {k: (v - np.float32(1) if k.endswith("norm.weight") else v) for k, v in weights.items()}
    write_tiny_gguf(tmp_path / "plain.gguf", plain)
    import_gguf(tmp_path / "plain.gguf", tmp_path / "plain")
    _, shifted = read_dir(tmp_path / "plain")
    assert np.max(np.abs(shifted["model.norm.weight"] - weights["model.norm.weight"] + 1)) < 1e-6


def test_config_from_the_header_and_gemma3_defaults(tiny):
    _, weights, out, config = tiny
    raw = json.loads((out / "config.json").read_text())
    assert raw["model_type"] == "gemma3_text" and raw["architectures"] == ["Gemma3ForCausalLM"]
    assert (config.vocab_size, config.hidden_size, config.intermediate_size) == (len(tiny_vocab()[0]), 32, 64)
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == \
        (6, 2, 1, 256)
    assert config.layer_types == (SLIDING,) * 5 + (FULL,)
    assert (config.sliding_window, config.max_position_embeddings) == (4, 128)
    assert (config.rope_theta, config.rope_local_base_freq, config.query_pre_attn_scalar) == (1e6, 1e4, 256)
    assert config.final_logit_softcapping is None and config.attn_logit_softcapping is None
    assert raw["minencdec_import"]["block_types"] == {"F16": 6, "F32": 67, "Q8_0": 7}
    notice = (out / "NOTICE").read_text()
    assert notice.startswith("Gemma is provided under and subject to the Gemma Terms of Use") and "Modified" in notice


def test_header_keys_that_change_the_config(tmp_path):
    """A window pattern, a RoPE base for sliding layers, linear RoPE scaling and llama.cpp's
    attention scale are read when a file has them; the 62-layer 27B's scalar is hidden/heads."""
    path = tmp_path / "k.gguf"
    write_tiny_gguf(path, metadata={"gemma3.attention.sliding_window_pattern": 2, "gemma3.rope.freq_base_swa": 5e3,
                                    "gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0,
                                    "gemma3.attention.scale": 0.125})
    c = gemma3_config_from_gguf(open_gguf(path))
    assert c.layer_types == (SLIDING, FULL) * 3
    assert (c.rope_local_base_freq, c.rope_scaling_factor, c.query_pre_attn_scalar) == (5e3, 8.0, 64.0)
    write_tiny_gguf(path2 := tmp_path / "y.gguf", metadata={"gemma3.rope.scaling.type": "yarn"})
    with pytest.raises(GGUFError, match="rope.scaling.type 'yarn'"):
        gemma3_config_from_gguf(open_gguf(path2))


def test_another_architecture_is_refused_by_name(tmp_path):
    write_tiny_gguf(tmp_path / "llama.gguf", arch="llama")
    with pytest.raises(GGUFError, match=r"general.architecture is 'llama'.*Gemma 3"):
        import_gguf(tmp_path / "llama.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["header", "data"])
def test_truncated_file_is_refused(tiny, tmp_path, where):
    """Cut inside the token list of the header, or inside the last tensors' data."""
    data = tiny[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:2000] if where == "header" else data[:int(len(data) * 0.97)])
    match = "header is truncated" if where == "header" else "is truncated: its header lists more tensor data"
    with pytest.raises(GGUFError, match=match):
        import_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_and_unknown_tensors_are_named(tmp_path):
    write_tiny_gguf(tmp_path / "m.gguf", drop=("blk.2.attn_k_norm.weight",))
    with pytest.raises(GGUFError, match=r"1 tensor\(s\) missing: blk.2.attn_k_norm.weight"):
        import_gguf(tmp_path / "m.gguf", tmp_path / "out")
    write_tiny_gguf(tmp_path / "u.gguf", extra_tensors={"output.weight": np.zeros((len(tiny_vocab()[0]), 32),
                                                                                   np.float32)})
    with pytest.raises(GGUFError, match="untied LM head"):
        import_gguf(tmp_path / "u.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_used_output_directory_is_refused_and_kept(tiny, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(GGUFError, match="not an empty directory"):
        import_gguf(tiny[0], out)
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04 not a gguf at all" * 10)
    with pytest.raises(GGUFError, match="not a readable GGUF file"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "out")


def test_bfloat16_output(tiny, tmp_path):
    import_gguf(tiny[0], tmp_path / "bf16", dtype="bfloat16")
    header_len = int.from_bytes((tmp_path / "bf16" / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "bf16" / "model.safetensors").read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}


def test_transformers_reads_the_same_file_the_same_way(tiny):
    """transformers' own GGUF loader (its names, its -1, its config) on the same tiny file:
    every weight equal bit for bit, float32 logits within RTOL_F32."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("accelerate")
    transformers = pytest.importorskip("transformers")
    path, _, out, config = tiny
    hf = transformers.Gemma3ForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                        torch_dtype=torch.float32).eval()
    _, params = read_dir(out)
    state = hf.state_dict()
    for name, w in params.items():
        assert np.array_equal(state[name].numpy(), w), name
    ids = np.random.default_rng(1).integers(0, config.vocab_size, (2, 12))      # 12 > window 4
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    assert_close("tiny GGUF logits", Gemma2Model(config, params).logits(ids), want, RTOL_F32)
