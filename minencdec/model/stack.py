"""A Gemma stack: scaled embedding, layers of sandwich-normed sublayers, final RMSNorm.

The same code runs every stack of both families: the decoder-only model (Gemma 2, Gemma 3),
an encoder (bidirectional masks), T5Gemma's decoder (causal masks plus a cross-attention
sublayer) and T5Gemma 2's decoder (whose self-attention also reads the encoder's keys: the
merged attention). The config says what the family changes (QK-norm, RoPE per layer type);
a `Names` record says which checkpoint names a stack uses and how its decoder reads the
encoder.

Every sublayer is a sandwich:  h = h + post_norm(sublayer(pre_norm(h))).

Axes: B batch, T length, S encoder length, D model width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import kernels as backend_kernels
from .config import GemmaConfig
from .layers import (embedding_backward, embedding_backward_into, embedding_forward, linear_backward, linear_forward,
                     rope_cos_sin, softcap_backward, softcap_forward)


@dataclass(frozen=True)
class Names:
    """Checkpoint names of one stack: its prefix and the norms around each sublayer."""

    prefix: str                 # "model." (Gemma 2) or "model.encoder." / "model.decoder."
    self_attn: tuple[str, str]  # (pre norm, post norm) around self-attention
    mlp: tuple[str, str] = ("pre_feedforward_layernorm", "post_feedforward_layernorm")
    cross_attn: tuple[str, str] | None = None  # decoder of T5Gemma only
    merged: bool = False        # decoder of T5Gemma 2: self-attention also attends to the encoder
    table: str | None = None    # the embedding's name when another stack owns it (T5Gemma 2's decoder)
    record_prefix: str = ""     # prefix of the names under which activations are recorded

    @property
    def embedding(self) -> str:
        """The embedding table this stack reads (tied to the LM head of a decoder)."""
        return self.table or f"{self.prefix}embed_tokens.weight"


GEMMA2 = Names("model.", ("input_layernorm", "post_attention_layernorm"))   # Gemma 3 too
T5_ENCODER = Names("model.encoder.", ("pre_self_attn_layernorm", "post_self_attn_layernorm"),
                   record_prefix="encoder.")                                  # T5Gemma 2 too
T5_DECODER = Names("model.decoder.", ("pre_self_attn_layernorm", "post_self_attn_layernorm"),
                   cross_attn=("pre_cross_attn_layernorm", "post_cross_attn_layernorm"),
                   record_prefix="decoder.")
T5G2_DECODER = Names("model.decoder.", ("pre_self_attn_layernorm", "post_self_attn_layernorm"),
                     merged=True, table=T5_ENCODER.embedding, record_prefix="decoder.")
# T5Gemma 2's vector for its eoi token, beside the one table (see embed_forward).
EOI_EMBEDDING = T5_ENCODER.prefix + "embed_tokens.eoi_embedding"

_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def stack_param_shapes(c: GemmaConfig, names: Names) -> dict[str, tuple[int, ...]]:
    """Every tensor of the stack, named as in the checkpoint, with its (out, in) shape."""
    D, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {} if names.table else {names.embedding: (c.vocab_size, D)}   # a shared table is its owner's
    for i in range(c.num_hidden_layers):
        p = f"{names.prefix}layers.{i}."
        norms = names.self_attn + names.mlp + (names.cross_attn or ())
        shapes.update({f"{p}{n}.weight": (D,) for n in norms})
        shapes.update({f"{p}self_attn.q_proj.weight": (q, D), f"{p}self_attn.k_proj.weight": (kv, D),
                       f"{p}self_attn.v_proj.weight": (kv, D), f"{p}self_attn.o_proj.weight": (D, q)})
        if c.qk_norm:
            shapes.update({f"{p}self_attn.q_norm.weight": (c.head_dim,), f"{p}self_attn.k_norm.weight": (c.head_dim,)})
        if names.cross_attn:
            Ds = c.cross_attention_hidden_size
            shapes.update({f"{p}cross_attn.q_proj.weight": (q, D), f"{p}cross_attn.k_proj.weight": (kv, Ds),
                           f"{p}cross_attn.v_proj.weight": (kv, Ds), f"{p}cross_attn.o_proj.weight": (D, q)})
        shapes.update({f"{p}mlp.gate_proj.weight": (c.intermediate_size, D),
                       f"{p}mlp.up_proj.weight": (c.intermediate_size, D),
                       f"{p}mlp.down_proj.weight": (D, c.intermediate_size)})
    shapes[f"{names.prefix}norm.weight"] = (D,)
    return shapes


def init_weights(shapes, seed=0, dtype="float32", std=0.02) -> dict:
    """Random weights as transformers initialises them: normal(0, std) matrices and RMSNorm
    offsets 0 (each norm starts as the identity scale 1 + 0). Works for any model's shapes."""
    rng = np.random.default_rng(seed)
    return {name: (np.zeros(shape) if len(shape) == 1 else rng.normal(0.0, std, shape)).astype(dtype)
            for name, shape in shapes.items()}


def _sandwich_forward(kern, h, w_pre, w_post, eps, sublayer, *args):
    """h + post_norm(sublayer(pre_norm(h), *args)). Returns the new h, the sublayer's
    normed output z (what is added to the residual stream) and the cache."""
    x, pre_c = kern.rmsnorm_forward(h, w_pre, eps)               # (B, T, D)
    y, sub_c = sublayer(x, *args)                                # (B, T, D)
    z, post_c = kern.rmsnorm_forward(y, w_post, eps)             # (B, T, D)
    return h + z, z, (pre_c, sub_c, post_c)


def _sandwich_backward(kern, dh, cache, sublayer_backward):
    """Returns dh_in, d(pre norm w), the sublayer's other gradients, d(post norm w)."""
    pre_c, sub_c, post_c = cache
    dy, dw_post = kern.rmsnorm_backward(dh, post_c)              # inverts z = post_norm(y)
    dx, *sub_grads = sublayer_backward(dy, sub_c)                # inverts y = sublayer(x)
    dh_sub, dw_pre = kern.rmsnorm_backward(dx, pre_c)            # inverts x = pre_norm(h)
    return dh + dh_sub, dw_pre, sub_grads, dw_post               # the residual fans dh out to both paths


def _self_attention_forward(x, w, mask, c: GemmaConfig, rope, kern, memory=None):
    """Queries, keys and values all read x; QK-norm (Gemma 3), then RoPE on queries and keys.
    `memory` (T5Gemma 2's merged attention): the encoder output, whose keys and values join x's.
    (kern.attention_block_forward is attention.attention_block_forward on the reference.)"""
    y, cache = kern.attention_block_forward(x, x, w, mask, c.num_attention_heads, c.num_key_value_heads,
                                            c.query_pre_attn_scalar ** -0.5, c.attn_logit_softcapping, rope, kern,
                                            eps=c.rms_norm_eps, memory=memory)
    return y, (kern, cache)


def _self_attention_backward(dy, cache):
    kern, block_c = cache
    dx, dsource, dmemory, dws = kern.attention_block_backward(dy, block_c)
    if dsource is not None:                                      # (None: the fast path added it already)
        dx = dx + dsource                                        # x fed queries and keys/values: add
    return dx, dmemory, dws


def _cross_attention_forward(x, enc_out, w, mask, c: GemmaConfig, kern):
    """Keys and values from the encoder output; no RoPE, never windowed, still softcapped."""
    y, cache = kern.attention_block_forward(x, enc_out, w, mask, c.num_attention_heads, c.num_key_value_heads,
                                            c.query_pre_attn_scalar ** -0.5, c.attn_logit_softcapping, None, kern)
    return y, (kern, cache)


def _cross_attention_backward(dy, cache):
    kern, block_c = cache
    dx, dsource, _, dws = kern.attention_block_backward(dy, block_c)
    return dx, dsource, dws


def rope_tables(c: GemmaConfig, positions, dtype) -> dict:
    """cos, sin for each layer type of the stack: (..., T, Dh) each. Gemma 2 has one RoPE;
    Gemma 3 gives sliding and full layers their own base (and full layers a linear scale)."""
    tables = {}
    for layer_type in set(c.layer_types):
        theta, scale = c.rope_of_type(layer_type)
        pos = np.asarray(positions, dtype=np.float64)
        tables[layer_type] = rope_cos_sin(pos if scale == 1.0 else pos / scale, c.head_dim, theta, dtype)
    return tables


def _attention_weights(params, p, c: GemmaConfig, kind="self_attn"):
    """A layer's q/k/v/o (and Gemma 3's q_norm/k_norm) weights by their short names."""
    names = _ATTN + (("q_norm", "k_norm") if c.qk_norm and kind == "self_attn" else ())
    return {n: params[f"{p}{kind}.{n}.weight"] for n in names}


def embed_forward(params, names: Names, c: GemmaConfig, ids, eoi=None):
    """The scaled embedding; T5Gemma 2 (eoi = (token id, vector name)) then puts the vector
    eoi_embedding, unscaled, where that token stands (transformers'
    T5Gemma2TextScaledWordEmbedding). ids (B, T) -> h (B, T, D)."""
    h, emb_c = embedding_forward(ids, params[names.embedding], c.pad_token_id)   # (B, T, D)
    at = None
    if eoi is not None:
        at = ids == eoi[0]                                          # (B, T)
        h[at] = params[eoi[1]]
    return h, (emb_c, at, eoi)


def embed_backward(dh, cache, grads, names: Names):
    """Adds the table's (and eoi_embedding's) gradient into `grads` (a shared table sums: in
    place, when another use already put its gradient there)."""
    emb_c, at, eoi = cache
    if at is not None:
        grads[eoi[1]] = grads.get(eoi[1], 0.0) + dh[at].sum(axis=0)   # eoi_embedding took those rows
        dh = np.where(at[..., None], 0.0, dh)                          # ... so the table did not
    if names.embedding in grads:
        embedding_backward_into(grads[names.embedding], dh, emb_c)
    else:
        grads[names.embedding] = embedding_backward(dh, emb_c)


def stack_forward(params, c: GemmaConfig, names: Names, ids, masks, cross=None, record=None, backend="numpy",
                  eoi=None):
    """Run a stack. ids (B, T); masks: one self-attention mask per layer (an
    `attention.Mask` description, or a (B, T, T) bool array on the numpy backend; for a
    merged-attention decoder the masks cover the encoder's keys too);
    cross: (encoder_out (B, S, Ds), cross_mask) for a T5Gemma decoder, (encoder_out, None)
    for a T5Gemma 2 decoder. eoi: see `embed_forward`.
    Returns the final-normed hidden states (B, T, D) and the cache for `stack_backward`.
    `record`, if a dict, receives every sublayer's output (the verification dumps).
    backend: "numpy" (the reference) or "numba" (the fast path, see backend.py)."""
    kern = backend_kernels(backend)
    rec = record if record is not None else {}
    P, r = names.prefix, names.record_prefix
    ropes = rope_tables(c, np.arange(ids.shape[1]), params[names.embedding].dtype)   # (T, Dh) each
    h, emb_c = embed_forward(params, names, c, ids, eoi)                             # (B, T, D)
    rec[f"{r}embed"] = h
    enc_out = cross[0] if cross is not None else None
    layer_caches = []
    for i in range(c.num_hidden_layers):
        p, eps = f"{P}layers.{i}.", c.rms_norm_eps
        norm = lambda n: params[f"{p}{n}.weight"]                # noqa: E731  (a layer's norm weight)
        rope = ropes[c.layer_types[i]]
        h, z, self_c = _sandwich_forward(kern, h, *map(norm, names.self_attn), eps, _self_attention_forward,
                                         _attention_weights(params, p, c), masks[i], c, rope, kern,
                                         enc_out if names.merged else None)
        rec[f"{r}layers.{i}.self_attn"] = z
        cross_c = None
        if names.cross_attn:
            xattn = _attention_weights(params, p, c, "cross_attn")
            h, z, cross_c = _sandwich_forward(kern, h, *map(norm, names.cross_attn), eps,
                                              _cross_attention_forward, enc_out, xattn, cross[1], c, kern)
            rec[f"{r}layers.{i}.cross_attn"] = z
        mlp = [params[f"{p}mlp.{n}.weight"] for n in _MLP]
        h, z, mlp_c = _sandwich_forward(kern, h, *map(norm, names.mlp), eps, kern.mlp_forward, *mlp)
        rec[f"{r}layers.{i}.mlp"] = z
        rec[f"{r}layers.{i}"] = h                                # the layer's output
        layer_caches.append((self_c, cross_c, mlp_c))
    out, norm_c = kern.rmsnorm_forward(h, params[f"{P}norm.weight"], c.rms_norm_eps)
    rec[f"{r}norm"] = out
    return out, (c, names, kern, emb_c, layer_caches, norm_c)


def stack_backward(dout, cache, into=None):
    """Gradients of every stack tensor (a dict, checkpoint names) and, for a decoder,
    the gradient of the encoder output: the sum of what every layer's cross-attention (or
    merged attention) sent back to it. `into`: a dict to add them to (its arrays are
    updated in place: a tied table's gradient from the LM head or the other stack)."""
    c, names, kern, emb_c, layer_caches, norm_c = cache
    P = names.prefix
    grads = {} if into is None else into
    dh, grads[f"{P}norm.weight"] = kern.rmsnorm_backward(dout, norm_c)   # inverts the final norm
    d_enc = 0.0
    for i in reversed(range(c.num_hidden_layers)):                  # the layers, bottom-up
        p = f"{P}layers.{i}."
        self_c, cross_c, mlp_c = layer_caches[i]
        dh, dw_pre, dws, dw_post = _sandwich_backward(kern, dh, mlp_c, kern.mlp_backward)
        grads[f"{p}{names.mlp[0]}.weight"], grads[f"{p}{names.mlp[1]}.weight"] = dw_pre, dw_post
        for n, dw in zip(_MLP, dws):
            grads[f"{p}mlp.{n}.weight"] = dw
        if cross_c is not None:
            dh, dw_pre, (d_src, dws), dw_post = _sandwich_backward(kern, dh, cross_c, _cross_attention_backward)
            grads[f"{p}{names.cross_attn[0]}.weight"], grads[f"{p}{names.cross_attn[1]}.weight"] = dw_pre, dw_post
            grads.update({f"{p}cross_attn.{n}.weight": dws[n] for n in _ATTN})
            d_enc = d_enc + d_src                                   # every layer reads the encoder output
        dh, dw_pre, (d_mem, dws), dw_post = _sandwich_backward(kern, dh, self_c, _self_attention_backward)
        grads[f"{p}{names.self_attn[0]}.weight"], grads[f"{p}{names.self_attn[1]}.weight"] = dw_pre, dw_post
        grads.update({f"{p}self_attn.{n}.weight": dw for n, dw in dws.items()})
        if d_mem is not None:
            d_enc = d_enc + d_mem                                   # merged attention read it too
    embed_backward(dh, emb_c, grads, names)                         # inverts the embedding
    return grads, d_enc


def lm_head_forward(h, table, cap):
    """Tied LM head and final softcap: (B, T, D) -> logits (B, T, V)."""
    z, head_c = linear_forward(h, table)                         # (B, T, V)
    logits, cap_c = softcap_forward(z, cap)
    return logits, (head_c, cap_c)


def lm_head_backward(dlogits, cache):
    head_c, cap_c = cache
    dz = softcap_backward(dlogits, cap_c)                        # inverts the final softcap
    return linear_backward(dz, head_c)                           # inverts z = h E^T: (dh, dE)
