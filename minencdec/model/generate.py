"""Generation: incremental decoding with a KV cache, then greedy or sampled next tokens.

    state, logits = start(model, input_ids)     prompt (decoder-only) or encoder + bos (T5Gemma)
    logits = step(state, next_tokens)           one new token per row, reusing every cached key

`start` and `step` run the same per-layer code as `stack.py` (the same blocks of layers.py and
attention.py) on the *new* tokens only. Each self-attention layer keeps the keys and values of
earlier tokens; a sliding-window layer keeps just the last w - 1 of them (with the new key
that makes the w keys it may see), as transformers' sliding cache does. A T5Gemma encoder
runs once, and each decoder layer projects the encoder output to cross-attention keys and
values once: always full length, never cut to the sliding window.

Positions: a decoder-only prompt must be LEFT-padded. As transformers' `generate` does, a
token's RoPE position counts only the real tokens before it (cumsum(mask) - 1); windows and
causality use slot indices, which differ from positions by a per-row constant. (RoPE scores
depend only on position differences, so that constant changes nothing but rounding: a padded
row gives the logits of the same prompt without padding either way.) T5Gemma encoder inputs may
be padded anywhere (they use positions 0..S-1 and a key mask, as `T5GemmaModel.encode`).

On the fast path (backend "numba") the prompt (or the encoder) runs as here, and every decoder
step after it (T5Gemma's bos included) and its LM head through fastpath/decoder.py
(`DecodeState.fast`): the same layers with its cache and buffers allocated once and a few
calls per sublayer, since at batch 1 the ~60 NumPy calls per layer of `stack_step` took
longer than reading the layer's weights. A batch reads every weight once per step for all.

Axes: B batch, T new tokens, L kept keys, S source length, K kv heads, Dh head dim, V vocab.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from .attention import Mask, _heads_forward, _merge_heads, _split_heads, cross_mask, mask_pattern
from .backend import kernels as backend_kernels
from .config import GemmaConfig, T5GemmaConfig
from .layers import linear_forward
from .stack import (EOI_EMBEDDING, GEMMA2, T5_DECODER, T5G2_DECODER, _attention_weights, _sandwich_forward,
                    embed_forward, lm_head_forward, rope_tables)
from .validate import check_ids, check_mask

# ---------------------------------------------------------------------------- the cache


@dataclass
class Cache:
    """What one stack remembers between steps. Per layer: keys, values (B, K, L, Dh) and the
    slot (absolute index) of each kept key, (L,). `valid` (B, N): slot n is a real token."""

    keys: list
    values: list
    slots: list
    valid: np.ndarray
    cross: list | None = None           # per decoder layer: (k, v) of the encoder output, (B, K, S, Dh)
    cross_mask: np.ndarray | None = None   # (B, S) encoder padding: 1 = real token


def empty_cache(c, B, dtype) -> Cache:
    L, K, Dh = c.num_hidden_layers, c.num_key_value_heads, c.head_dim
    return Cache([np.zeros((B, K, 0, Dh), dtype) for _ in range(L)],
                 [np.zeros((B, K, 0, Dh), dtype) for _ in range(L)],
                 [np.zeros(0, dtype=np.int64) for _ in range(L)], np.zeros((B, 0), dtype=bool))


def _sliding_window(c, i):
    """The window of layer i (None = full). A hook the tests replace to show the checks fail."""
    return c.window(i)


def _cross_key_mask(cross_mask_):
    """Each new query sees every real encoder token, whatever the window. A hook the tests replace."""
    return cross_mask(cross_mask_)


def _cached_self_attention(x, w, cache, i, c, rope, q_slots, kern, merged=False):
    """Self-attention of the new tokens over the kept keys plus their own; updates layer i.
    merged (T5Gemma 2): the encoder's keys and values (cache.cross[i]) join them, visible to
    every query unless padded. x (B, T, D) -> (B, T, D). kern: the backend's Kernels."""
    H, K, eps, norm = c.num_attention_heads, c.num_key_value_heads, c.rms_norm_eps, kern.rmsnorm_forward
    q = _heads_forward(x, w["q_proj"], H, w.get("q_norm"), eps, rope, norm)[0]      # (B, H, T, Dh)
    k = _heads_forward(x, w["k_proj"], K, w.get("k_norm"), eps, rope, norm)[0]      # (B, K, T, Dh)
    v = _heads_forward(x, w["v_proj"], K, None, eps, None, norm)[0]                 # (B, K, T, Dh)
    keys = np.concatenate([cache.keys[i], k], axis=2)              # (B, K, L + T, Dh)
    values = np.concatenate([cache.values[i], v], axis=2)
    slots = np.concatenate([cache.slots[i], q_slots])              # (L + T,)
    window = _sliding_window(c, i)
    # The kept slots are consecutive, so key j sits at slot slots[0] + j and query t at
    # q_slots[t]: a causal (sliding) mask with the queries q_slots[0] - slots[0] further on.
    mask = Mask(causal=True, window=window, key_mask=cache.valid[:, slots],
                q_offset=int(q_slots[0] - slots[0]))              # padding keys hidden
    all_keys, all_values = keys, values
    if merged:                                                     # + the encoder's, never windowed
        (k_enc, v_enc), extra = cache.cross[i], _cross_key_mask(cache.cross_mask)
        all_keys = np.concatenate([keys, k_enc], axis=2)           # (B, K, L + T + S, Dh)
        all_values = np.concatenate([values, v_enc], axis=2)
        mask = mask._replace(extra_keys=k_enc.shape[2], extra_key_mask=extra.key_mask)
    o = kern.decode_attention(q, all_keys, all_values, mask, c.query_pre_attn_scalar ** -0.5,
                              c.attn_logit_softcapping)            # (B, H, T, Dh)
    keep = len(slots) if window is None else min(window - 1, len(slots))   # what the next query may see
    start = len(slots) - keep
    cache.keys[i], cache.values[i], cache.slots[i] = keys[:, :, start:], values[:, :, start:], slots[start:]
    return linear_forward(_merge_heads(o), w["o_proj"])[0], None   # (B, T, D)


def _cross_attention(x, w, kv, cross_mask, c, kern):
    """Queries from the new tokens; keys and values precomputed from the encoder output."""
    q = _split_heads(linear_forward(x, w["q_proj"])[0], c.num_attention_heads)   # (B, H, T, Dh)
    o = kern.decode_attention(q, *kv, _cross_key_mask(cross_mask),
                              c.query_pre_attn_scalar ** -0.5, c.attn_logit_softcapping)
    return linear_forward(_merge_heads(o), w["o_proj"])[0], None   # (B, T, D)


def encoder_keys(params, c, names, enc_out, kern):
    """Per decoder layer, the (keys, values) it reads from the encoder output, computed once:
    T5Gemma's cross_attn k/v, or T5Gemma 2's self_attn k (k_norm'ed, no RoPE) and v.
    (B, K, S, Dh) each, made contiguous once rather than copied by every step."""
    out, K = [], c.num_key_value_heads
    for i in range(c.num_hidden_layers):
        w = _attention_weights(params, f"{names.prefix}layers.{i}.", c, "self_attn" if names.merged else "cross_attn")
        k = _heads_forward(enc_out, w["k_proj"], K, w.get("k_norm"), c.rms_norm_eps, None, kern.rmsnorm_forward)[0]
        v = _heads_forward(enc_out, w["v_proj"], K, None, c.rms_norm_eps, None, kern.rmsnorm_forward)[0]
        out.append((np.ascontiguousarray(k), np.ascontiguousarray(v)))
    return out


def stack_step(params, c, names, ids, positions, valid, cache, backend="numpy", eoi=None):
    """Feed T new tokens (B, T) at RoPE `positions` (B, T) through a stack with its cache;
    `valid` (B, T) marks real tokens. Returns the final-normed hidden states (B, T, D)."""
    P, eps, kern = names.prefix, c.rms_norm_eps, backend_kernels(backend)
    q_slots = cache.valid.shape[1] + np.arange(ids.shape[1])       # (T,) absolute slots of the new tokens
    cache.valid = np.concatenate([cache.valid, valid.astype(bool)], axis=1)
    ropes = rope_tables(c, positions, params[names.embedding].dtype)   # per layer type: (B, T, Dh) each
    h = embed_forward(params, names, c, ids, eoi)[0]               # (B, T, D)
    for i in range(c.num_hidden_layers):
        p = f"{P}layers.{i}."
        norm = lambda n: params[f"{p}{n}.weight"]                  # noqa: E731
        cos, sin = ropes[c.layer_types[i]]
        rope = (cos[:, None], sin[:, None])                        # (B, 1, T, Dh): every head alike
        h = _sandwich_forward(kern, h, *map(norm, names.self_attn), eps, _cached_self_attention,
                              _attention_weights(params, p, c), cache, i, c, rope, q_slots, kern, names.merged)[0]
        if names.cross_attn:
            xattn = {n: params[f"{p}cross_attn.{n}.weight"] for n in ("q_proj", "o_proj")}
            h = _sandwich_forward(kern, h, *map(norm, names.cross_attn), eps, _cross_attention,
                                  xattn, cache.cross[i], cache.cross_mask, c, kern)[0]
        mlp = [params[f"{p}mlp.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj")]
        h = _sandwich_forward(kern, h, *map(norm, names.mlp), eps, kern.mlp_forward, *mlp)[0]
    return kern.rmsnorm_forward(h, params[f"{P}norm.weight"], eps)[0]   # (B, T, D)


# ---------------------------------------------------------------------------- start and step


@dataclass
class DecodeState:
    model: object
    cache: Cache                        # the reference's cache (on the fast path: as after the prompt)
    next_position: np.ndarray           # (B,) RoPE position of each row's next token
    prefix: np.ndarray                  # what `generate` returns in front of the new tokens
    fast: object = None                 # the fast path's decoder (fastpath/decoder.py), which steps instead


# ---------------------------------------------------------------------------- the fast path's step


def _fast_decoder(model, c, names, cache, room):
    """The fast path's decode step (backend "numba"), taking over `cache` after the prompt, or
    None on the reference. The same layers as stack_step, handed over as arrays: q, k, v and
    gate, up stacked into one matrix each, norm weights as the scales (1 + w)."""
    make = backend_kernels(model.backend).decoder
    if make is None or model.dtype not in (np.float32, np.float64):
        return None
    params, P, one = model.params, names.prefix, lambda name: 1 + model.params[name]
    layers = []
    for i in range(c.num_hidden_layers):
        p = f"{P}layers.{i}."
        w = _attention_weights(params, p, c)
        cross = None
        if names.cross_attn:
            cross = tuple(one(f"{p}{n}.weight") for n in names.cross_attn) + (
                params[f"{p}cross_attn.q_proj.weight"], params[f"{p}cross_attn.o_proj.weight"])
        layers.append(dict(
            pre_self=one(f"{p}{names.self_attn[0]}.weight"), post_self=one(f"{p}{names.self_attn[1]}.weight"),
            qkv=np.concatenate([w["q_proj"], w["k_proj"], w["v_proj"]]), o=w["o_proj"],
            q_norm=1 + w["q_norm"] if "q_norm" in w else np.empty(0, model.dtype),
            k_norm=1 + w["k_norm"] if "k_norm" in w else np.empty(0, model.dtype),
            window=_sliding_window(c, i), rope=c.layer_types[i], cross=cross,
            pre_mlp=one(f"{p}{names.mlp[0]}.weight"), post_mlp=one(f"{p}{names.mlp[1]}.weight"),
            gu=np.concatenate([params[f"{p}mlp.gate_proj.weight"], params[f"{p}mlp.up_proj.weight"]]),
            down=params[f"{p}mlp.down_proj.weight"]))
    cross_valid = cross_lohi = None
    if cache.cross is not None:
        extra = _cross_key_mask(cache.cross_mask)                   # the hook, as the reference reads it
        S = cache.cross[0][0].shape[2]
        seen = np.flatnonzero(mask_pattern(1, S, extra.causal, extra.window, extra.rule, extra.q_offset)[0])
        cross_lohi = (np.array([seen[0] if seen.size else 0]), np.array([seen[-1] if seen.size else -1]))
        cross_valid = np.ones((len(cache.valid), S), bool) if extra.key_mask is None else extra.key_mask != 0
    return make(layers, one(f"{P}norm.weight"), (c.num_attention_heads, c.num_key_value_heads, c.head_dim),
                c.rms_norm_eps, c.query_pre_attn_scalar ** -0.5, c.attn_logit_softcapping, cache,
                cache.valid.shape[1] + room, cache.cross, cross_valid, cross_lohi, names.merged)


def _fast_step(state, c, names, ids, positions):
    """stack_step's result for one new token per row, by the fast path's decoder: (B, 1, D)."""
    model = state.model
    h = embed_forward(model.params, names, c, ids, _eoi_of(model))[0][:, 0]                  # (B, D)
    ropes = {kind: (cos[:, 0], sin[:, 0]) for kind, (cos, sin) in
             rope_tables(c, positions, model.params[names.embedding].dtype).items()}          # (B, Dh) each
    return state.fast.step(h, ropes)[:, None]


def prompt_positions(mask):
    """transformers' position_ids for a left-padded prompt: cumsum(mask) - 1, pads at 0."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)


def _last_logits(state, h, table, c):
    """The logits (B, V) of the last new token: the fast path's LM head, or the reference's."""
    if state.fast is not None:
        return state.fast.logits(h[:, -1], table, c.final_logit_softcapping)
    return lm_head_forward(h[:, -1], table, c.final_logit_softcapping)[0]


def start(model, input_ids, attention_mask=None, max_new_tokens=None):
    """Run the prompt (Gemma 2) or the encoder and bos (T5Gemma). Returns the state and the
    logits (B, V) of the first new token. `attention_mask` defaults to input_ids != pad.
    max_new_tokens: how many steps to make room for (the fast path allocates its cache once;
    it grows if more come)."""
    if isinstance(model.config, T5GemmaConfig):
        enc_c, c = model.config.encoder, model.config.decoder
        ids, mask = _prompt(input_ids, attention_mask, enc_c, "input_ids")
        enc_out, names = model.encode(ids, mask), _decoder_names(model)          # (B, S, De), once
        cache = empty_cache(c, ids.shape[0], model.dtype)
        cache.cross_mask = mask
        cache.cross = encoder_keys(model.params, c, names, enc_out, backend_kernels(model.backend))
        bos = np.full((ids.shape[0], 1), c.bos_token_id, dtype=np.int64)          # decoder_start_token_id
        state = DecodeState(model, cache, np.zeros(len(ids), np.int64), bos)
        state.fast = _fast_decoder(model, c, names, cache, max_new_tokens or 32)
        # bos is an ordinary step (on the fast path, the decoder's first: stack_step on B rows
        # of one token makes ~60 small calls a layer, and at batch 8 under load its BLAS
        # products waited for OpenBLAS's sleeping threads, 1.1 s for this one step).
        return state, step(state, bos[:, 0])
    c = decoder_config(model)
    ids, mask = _prompt(input_ids, attention_mask, c, "input_ids")
    if (np.diff(mask.astype(np.int8), axis=1) < 0).any():
        raise ValueError("a decoder-only prompt must be LEFT-padded (padding before the tokens), "
                         "as for transformers' generate; found padding after a real token")
    positions = prompt_positions(mask)                             # (B, T)
    cache = empty_cache(c, ids.shape[0], model.dtype)
    h = stack_step(model.params, c, GEMMA2, ids, positions, mask, cache, model.backend)     # (B, T, D)
    state = DecodeState(model, cache, positions[:, -1] + 1, ids, _fast_decoder(model, c, GEMMA2, cache,
                                                                                max_new_tokens or 32))
    return state, _last_logits(state, h, model.params[GEMMA2.embedding], c)


def step(state, tokens):
    """Feed one token per row (B,) and return the logits (B, V) of the next one."""
    c, names = decoder_config(state.model), _decoder_names(state.model)
    ids = np.asarray(tokens, dtype=np.int64).reshape(-1, 1)       # (B, 1)
    if state.fast is not None:                                     # fastpath/decoder.py's step
        h = _fast_step(state, c, names, ids, state.next_position[:, None])
    else:
        h = stack_step(state.model.params, c, names, ids, state.next_position[:, None],
                       np.ones_like(ids), state.cache, state.model.backend, _eoi_of(state.model))
    logits = _last_logits(state, h, state.model.params[names.embedding], c)
    state.next_position = state.next_position + 1
    return logits


def decoder_config(model):
    """The config of the stack that generates: the decoder-only model or T5Gemma's decoder.
    (The models are told apart by their configs: this module is below the model classes,
    whose `generate` methods call it.)"""
    config = getattr(model, "config", None)
    if isinstance(config, T5GemmaConfig):
        return config.decoder
    if isinstance(config, GemmaConfig) and not hasattr(model, "num_labels"):   # a Classifier has no LM head
        return config
    raise TypeError(f"generate needs a Gemma2Model or a T5GemmaModel, got {type(model).__name__}")


def _decoder_names(model):
    """The names of the stack that generates (model.t5gemma.decoder_names, without importing it:
    the model classes import this module)."""
    config = model.config
    if not isinstance(config, T5GemmaConfig):
        return GEMMA2
    return T5G2_DECODER if config.merged_attention else T5_DECODER


def _eoi_of(model):
    """T5Gemma 2's (eoi token id, eoi_embedding's name), as t5gemma.py passes it; else None."""
    config = model.config
    if isinstance(config, T5GemmaConfig) and config.family == "t5gemma2":
        return config.eoi_token_index, EOI_EMBEDDING
    return None


def _prompt(input_ids, attention_mask, c, name):
    a = np.asarray(input_ids)
    if a.size == 0:
        raise ValueError(f"{name} is empty: give at least one token (a decoder-only prompt "
                         f"usually starts with bos = {c.bos_token_id})")
    ids = check_ids(a, c.vocab_size, name)
    if ids.shape[1] > c.max_position_embeddings:
        raise ValueError(f"{name} has {ids.shape[1]} tokens, more than the model's "
                         f"max_position_embeddings ({c.max_position_embeddings})")
    mask = check_mask(attention_mask, ids.shape, "attention_mask")
    mask = (ids != c.pad_token_id) if mask is None else mask      # transformers' default
    empty = np.flatnonzero(~mask.any(axis=1))
    if empty.size:
        raise ValueError(f"row {empty[0]} of {name} is all padding: nothing to condition on")
    return ids, mask


# ---------------------------------------------------------------------------- choosing tokens


def top_k_filter(logits, k):
    """Keep the k largest logits of each row (ties with the k-th kept), the rest -> -inf."""
    kth = np.sort(logits, axis=-1)[..., [-min(k, logits.shape[-1])]]     # (B, 1) the k-th largest
    return np.where(logits >= kth, logits, -np.inf)


def top_p_filter(logits, p):
    """Keep the smallest set of most likely tokens whose probability reaches p, the rest -> -inf.
    A token stays iff the mass of the tokens ranked before it is still below p."""
    order = np.argsort(-logits, axis=-1, kind="stable")           # (B, V) most likely first
    probs = _softmax(np.take_along_axis(logits, order, axis=-1))
    before = np.cumsum(probs, axis=-1) - probs                    # mass ranked strictly before
    keep = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(keep, order, before < p, axis=-1)            # the top token always stays
    return np.where(keep, logits, -np.inf)


def _softmax(z):
    e = np.exp(z - np.max(z, axis=-1, keepdims=True))
    return e / np.sum(e, axis=-1, keepdims=True)


def choose(logits, do_sample, temperature, top_k, top_p, rng):
    """Next tokens (B,) from logits (B, V): argmax, or a sample after temperature, top-k and
    top-p in that order (transformers' order of warpers)."""
    if not do_sample:
        return np.argmax(logits, axis=-1)
    z = logits / temperature
    if top_k is not None:
        z = top_k_filter(z, top_k)
    if top_p is not None and top_p < 1.0:
        z = top_p_filter(z, top_p)
    cdf = np.cumsum(_softmax(z), axis=-1)                          # (B, V)
    u = rng.random(len(z))[:, None] * cdf[:, -1:]                  # inverse-CDF sampling
    return np.minimum(np.sum(cdf <= u, axis=-1), z.shape[-1] - 1)


def _check_options(max_new_tokens, do_sample, temperature, top_k, top_p, min_new_tokens):
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if min_new_tokens < 0:
        raise ValueError(f"min_new_tokens must be >= 0, got {min_new_tokens!r}")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k!r}")
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature!r} "
                         "(use do_sample=False for greedy decoding)")


def generate(model, input_ids, max_new_tokens=32, attention_mask=None, do_sample=False, temperature=1.0,
             top_k=None, top_p=None, seed=None, min_new_tokens=0, eos_token_id=None, stream=None):
    """New tokens from a Gemma2Model or T5GemmaModel, as transformers' `generate` returns them:
    decoder-only: the prompt followed by the new tokens (B, T + n); encoder-decoder: the decoder
    sequence starting with bos (B, 1 + n). A row that produced eos gets pad afterwards; decoding
    stops when every row has, or after max_new_tokens. eos is suppressed until min_new_tokens
    tokens exist. `stream(tokens)` is called with each step's (B,) tokens."""
    _check_options(max_new_tokens, do_sample, temperature, top_k, top_p, min_new_tokens)
    c = decoder_config(model)
    eos = c.eos_token_id if eos_token_id is None else eos_token_id
    rng = np.random.default_rng(seed)
    state, logits = start(model, input_ids, attention_mask, max_new_tokens)
    if state.next_position.max() + max_new_tokens > c.max_position_embeddings:
        warnings.warn(f"generating past max_position_embeddings ({c.max_position_embeddings}): "
                      "RoPE extrapolates, as in transformers", stacklevel=2)
    finished = np.zeros(len(logits), dtype=bool)
    new = []
    for n in range(max_new_tokens):
        if n < min_new_tokens:
            logits = np.where(np.arange(logits.shape[-1]) == eos, -np.inf, logits)   # eos not yet
        tokens = np.where(finished, c.pad_token_id, choose(logits, do_sample, temperature, top_k, top_p, rng))
        new.append(tokens)
        if stream is not None:
            stream(tokens)
        finished |= tokens == eos
        if finished.all() or n == max_new_tokens - 1:
            break
        logits = step(state, tokens)
    return np.concatenate([state.prefix, np.stack(new, axis=1)], axis=1)
