"""Attention internals of chosen layers, for dumps: q and k after RoPE, scores, probabilities.

    internals = attention_internals(model, acts, ["encoder.layers.0", "decoder.layers.1.cross_attn"])

The model's forward pass records only each sublayer's output. The inside of an attention is
recomputed here from what it recorded: the layer's input (the previous layer's output, or
the embedding), its pre-norm, then the model's own attention block (model/attention.py)
with a wrapper around its softmax attention that keeps the q and k it is handed. The block's
output, after the post-norm, must equal the recorded sublayer output, which proves the
recomputation ran the same sublayer on the same input. Names and shapes (H query heads, K
kv heads, T queries, S keys, Dh head dim), under the sublayer's name:

    <sublayer>.q       (B, H, T, Dh)   queries after QK-norm (Gemma 3) and RoPE, before scaling
    <sublayer>.k       (B, K, S, Dh)   keys after QK-norm and RoPE (T5Gemma 2's merged
                                       attention: the decoder's T keys, then the encoder's)
    <sublayer>.scores  (B, H, T, S)    q k^T * query_pre_attn_scalar^-0.5, softcapped
    <sublayer>.probs   (B, H, T, S)    the softmax over visible keys; 0 at hidden keys

RoPE turns q and k by position = index in the row. An implementation that numbers positions
from a row's first real token (JAX's `build_positions_from_mask`) turns a left-padded row
differently; scores and probabilities do not change (RoPE is relative), q and k do, so
compare.py leaves left-padded rows out of q and k.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from minencdec.model import gemma2, t5gemma
from minencdec.model.attention import attention_block_forward, attention_forward_masked, cross_mask
from minencdec.model.backend import kernels
from minencdec.model.layers import rmsnorm_forward, softcap_forward
from minencdec.model.stack import GEMMA2, T5_ENCODER, rope_tables
from minencdec.model.t5gemma import T5GemmaModel

INTERNALS = ("q", "k", "scores", "probs")


def attention_sublayers(model) -> list[str]:
    """Every attention sublayer whose internals can be dumped, e.g. "encoder.layers.0.self_attn"."""
    if not isinstance(model, T5GemmaModel):
        return [f"layers.{i}.self_attn" for i in range(model.config.num_hidden_layers)]
    c = model.config
    subs = ("self_attn",) if c.merged_attention else ("self_attn", "cross_attn")
    return ([f"encoder.layers.{i}.self_attn" for i in range(c.encoder.num_hidden_layers)]
            + [f"decoder.layers.{i}.{s}" for i in range(c.decoder.num_hidden_layers) for s in subs])


def select_sublayers(model, wanted) -> list[str]:
    """The attention sublayers named by `wanted`: sublayers ("decoder.layers.1.cross_attn"),
    layers (every attention sublayer of "encoder.layers.0") or "all"; an unknown name is an
    error that lists the valid ones."""
    known = attention_sublayers(model)
    out = []
    for name in wanted:
        found = known if name == "all" else [s for s in known if s == name or s.rsplit(".", 1)[0] == name]
        if not found:
            raise ValueError(f"no attention sublayer {name!r} in this model; choose from "
                             f"{', '.join(known)} (or a layer such as {known[0].rsplit('.', 1)[0]}, or 'all')")
        out += [s for s in found if s not in out]
    return out


def attention_internals(model, acts, sublayers) -> dict[str, np.ndarray]:
    """q, k, scores and probs (module docstring) of each named attention sublayer, from the
    activations and inputs a dump holds (`dump_minencdec` of the same model)."""
    out = {}
    for sub in select_sublayers(model, sublayers):
        q, k, scores, probs = _recompute(model, acts, sub)
        out.update({f"{sub}.q": q, f"{sub}.k": k, f"{sub}.scores": scores, f"{sub}.probs": probs})
    return out


def _stack(model, side):
    """(config, checkpoint names) of one stack of the model."""
    if not isinstance(model, T5GemmaModel):
        return model.config, GEMMA2
    c = model.config
    return (c.encoder, T5_ENCODER) if side == "encoder" else (c.decoder, t5gemma.decoder_names(c))


def _recompute(model, acts, sub):
    m = re.fullmatch(r"(?:(encoder|decoder)\.)?layers\.(\d+)\.(self_attn|cross_attn)", sub)
    side, i, kind = m[1], int(m[2]), m[3]
    c, names = _stack(model, side)
    r, p = names.record_prefix, f"{names.prefix}layers.{i}."
    params = model.params
    h = acts[f"{r}embed"] if i == 0 else acts[f"{r}layers.{i - 1}"]          # the layer's input (B, L, D)
    if kind == "cross_attn":
        h = h + acts[f"{r}layers.{i}.self_attn"]                             # after the self-attention
    pre, post = names.cross_attn if kind == "cross_attn" else names.self_attn
    x = rmsnorm_forward(h, params[f"{p}{pre}.weight"], c.rms_norm_eps)[0]
    w = {n: params[f"{p}{kind}.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    if c.qk_norm and kind == "self_attn":
        w.update(q_norm=params[f"{p}self_attn.q_norm.weight"], k_norm=params[f"{p}self_attn.k_norm.weight"])
    source, rope, memory = x, None, None
    if kind == "cross_attn":
        source = acts["encoder.norm"]
    else:
        rope = rope_tables(c, np.arange(x.shape[1]), x.dtype)[c.layer_types[i]]
        if names.merged:
            memory = acts["encoder.norm"]
    mask = _mask(model, side, kind, i, acts, c)
    seen = {}

    def keep(q, k, v, mask, scale, cap):                 # the model's softmax attention, watched
        seen.update(q=q, k=k, mask=mask)
        return attention_forward_masked(q, k, v, mask, scale, cap)

    watched = dataclasses.replace(kernels("numpy"), attention_forward=keep)
    scale, cap = c.query_pre_attn_scalar ** -0.5, c.attn_logit_softcapping
    y, _ = attention_block_forward(x, source, w, mask, c.num_attention_heads, c.num_key_value_heads, scale, cap,
                                   rope, watched, eps=c.rms_norm_eps, memory=memory)
    _check_same_output(rmsnorm_forward(y, params[f"{p}{post}.weight"], c.rms_norm_eps)[0],
                       acts[f"{r}layers.{i}.{kind}"], sub)
    q, k = seen["q"], seen["k"]
    group = q.shape[1] // k.shape[1]                     # query heads per kv head (GQA)
    scores = softcap_forward(np.einsum("bhtd,bhsd->bhts", q, np.repeat(k, group, axis=1)) * scale, cap)[0]
    return q, k, scores, _probabilities(q, k, seen["mask"], scale, cap)


def _mask(model, side, kind, i, acts, c):
    """The mask the model gives this sublayer (an attention.Mask), from the dump's input masks."""
    enc_mask = acts["attention_mask"]
    if not isinstance(model, T5GemmaModel):
        return gemma2.self_attention_masks(c, enc_mask)[i]
    if side == "encoder":
        return t5gemma.encoder_masks(c, enc_mask)[i]
    if kind == "cross_attn":
        return cross_mask(enc_mask)
    if model.config.merged_attention:
        return t5gemma.merged_masks(c, acts["decoder_attention_mask"], enc_mask, enc_mask.shape[1])[i]
    return t5gemma.decoder_masks(c, acts["decoder_attention_mask"])[i]


def _probabilities(q, k, mask, scale, cap):
    """p (B, H, T, S) read from the attention's output alone: o = p v, so with v the columns
    s0 .. s0 + Dh - 1 of the identity, o holds p's columns s0 .. s0 + Dh - 1 (each entry is
    p times 1 plus zeros: exact)."""
    B, K, S, Dh = k.shape
    columns = []
    for s0 in range(0, S, Dh):
        n = min(Dh, S - s0)
        v = np.zeros((B, K, S, Dh), dtype=q.dtype)
        v[:, :, np.arange(s0, s0 + n), np.arange(n)] = 1.0
        columns.append(attention_forward_masked(q, k, v, mask, scale, cap)[0][..., :n])
    return np.concatenate(columns, axis=-1)


def _check_same_output(recomputed, recorded, sub):
    """The recomputed sublayer must be the one the model ran (else its internals mean nothing)."""
    scale = float(np.max(np.abs(recorded), initial=0.0))
    tol = (1e-10 if recorded.dtype == np.float64 else 1e-4) * scale
    err = float(np.max(np.abs(recomputed - recorded), initial=0.0))
    if not err <= tol:
        raise RuntimeError(f"{sub}: the recomputed attention differs from the recorded output by {err:.2e} "
                           f"(scale {scale:.2e}); the internals would not be the model's")
