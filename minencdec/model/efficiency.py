"""Inference cost: FLOPs from a config, wall time of our `generate`, and the comparison plot.

The paper's efficiency claim: an encoder-decoder reads the input once (the encoder, plus one
projection of its output to cross-attention keys and values per decoder layer), and then
each generated token costs one step of the decoder, whose self-attention covers only the
tokens generated so far (window-limited on sliding layers) and whose cross-attention covers
the source. A decoder-only model runs the input through its one stack and attends over input
and output at every step.

FLOPs count multiply-adds as 2 (a matmul (m, k) x (k, n) costs 2 m n k), for one example:

    linear, per token and layer   2 (D q + 2 Ds kv + q D)  attention projections (q = H Dh, kv = K Dh)
                                + 2 (3 D F)               GeGLU MLP
    attention, per visible pair   4 H Dh                  scores q k^T and the weighted sum p v
    LM head, per generated token  2 D V

Norms, RoPE, softmax and the softcaps are elementwise and left out (< 1% at these widths).
`attention="useful"` counts only the (query, key) pairs a mask lets through; "dense" counts
what a dense-mask implementation (this one, transformers' eager path) multiplies: a prompt
or encoder pass scores every query against every key. Decode steps are the same either way,
since the cache holds only visible keys.

Axes: D width, F ffn width, H heads, K kv heads, Dh head dim, V vocab, w window.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from .config import GemmaConfig, T5GemmaConfig
from .presets import PRESETS
from .gemma2 import Gemma2Model
from .generate import start, step
from .t5gemma import T5GemmaModel


@dataclass(frozen=True)
class Flops:
    """FLOPs of one example: `input` processes the n_in input tokens (the prompt, or the
    encoder and the cross-attention keys/values); `output` everything per generated token."""

    input: int
    output: int

    @property
    def total(self) -> int:
        return self.input + self.output


def linear_flops(c: GemmaConfig, cross_width=None) -> int:
    """Projections and MLP of one token through all layers of a stack (no attention scores).
    `cross_width`: a decoder's cross-attention q and o (its k, v are counted per source token)."""
    D, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    per_layer = 2 * (D * q + 2 * D * kv + q * D) + 2 * 3 * D * c.intermediate_size
    if cross_width is not None:
        per_layer += 2 * (D * q + q * D)
    return c.num_hidden_layers * per_layer


def attention_flops(c: GemmaConfig, pairs: int) -> int:
    """Scores and weighted sum for `pairs` (query, key) pairs in one layer."""
    return 4 * c.num_attention_heads * c.head_dim * pairs


def causal_pairs(first: int, n: int, window=None) -> int:
    """Visible (query, key) pairs for queries at slots first .. first + n - 1 of a causal
    stack: query i sees i + 1 keys, or min(i + 1, w) with a window."""
    i = np.arange(first, first + n, dtype=np.int64)
    seen = i + 1 if window is None else np.minimum(i + 1, window)
    return int(seen.sum())


def bidirectional_pairs(n: int, window=None, rule="le") -> int:
    """Visible pairs of a bidirectional stack of n tokens: |i - j| <= w (rule "le"), < w
    ("lt"), or -((w - 1) // 2) <= j - i <= w // 2 ("t5gemma2")."""
    if window is None:
        return n * n
    left, right = {"le": (window, window), "lt": (window - 1, window - 1),
                   "t5gemma2": ((window - 1) // 2, window // 2)}[rule]
    i = np.arange(n, dtype=np.int64)
    return int((np.minimum(i + right, n - 1) - np.maximum(i - left, 0) + 1).sum())


def _stack_pass(c, n, pairs_of_layer) -> int:
    return n * linear_flops(c) + sum(attention_flops(c, pairs_of_layer(i)) for i in range(c.num_hidden_layers))


def decoder_only_flops(c: GemmaConfig, n_in: int, n_out: int, attention="useful") -> Flops:
    """A Gemma 2 model: the prompt through the stack, then n_out - 1 single-token steps (the
    prompt's last position predicts the first new token) and n_out LM-head evaluations."""
    _check(attention, n_in, n_out)
    dense = attention == "dense"
    prompt = _stack_pass(c, n_in, lambda i: n_in * n_in if dense else causal_pairs(0, n_in, c.window(i)))
    steps = (n_out - 1) * linear_flops(c) + sum(attention_flops(c, causal_pairs(n_in, n_out - 1, c.window(i)))
                                                 for i in range(c.num_hidden_layers))
    return Flops(prompt, steps + n_out * 2 * c.hidden_size * c.vocab_size)


def encoder_decoder_flops(cfg: T5GemmaConfig, n_in: int, n_out: int, attention="useful") -> Flops:
    """A T5Gemma model: the encoder once over n_in tokens and each decoder layer's
    cross-attention k/v projection of its output; then n_out decoder steps (bos and the first
    n_out - 1 new tokens), each with self-attention over the steps so far and cross-attention
    over all n_in source tokens (never windowed), and n_out LM-head evaluations. A T5Gemma 2
    counts the same pairs (its merged attention sees its own keys and the encoder's), but has
    no separate cross-attention q and o: its one q serves both."""
    _check(attention, n_in, n_out)
    enc, dec = cfg.encoder, cfg.decoder
    dense = attention == "dense"
    encoder = _stack_pass(enc, n_in, lambda i: n_in * n_in if dense else
                          bidirectional_pairs(n_in, enc.window(i), enc.bidirectional_window))
    kv = dec.num_key_value_heads * dec.head_dim
    cross_kv = dec.num_hidden_layers * n_in * 2 * (2 * enc.hidden_size * kv)
    steps = n_out * linear_flops(dec, cross_width=None if cfg.merged_attention else enc.hidden_size) + sum(
        attention_flops(dec, causal_pairs(0, n_out, dec.window(i)) + n_out * n_in)
        for i in range(dec.num_hidden_layers))
    return Flops(encoder + cross_kv, steps + n_out * 2 * dec.hidden_size * dec.vocab_size)


def classifier_flops(config, n_in: int, attention="useful") -> int:
    """One classification of n_in tokens: a decoder-only model's one causal pass, or an
    encoder-decoder's encoder alone (the head reads the encoder; the decoder never runs).
    The head itself (2 D C) is negligible and left out."""
    _check(attention, n_in, 1)
    dense = attention == "dense"
    if isinstance(config, T5GemmaConfig):
        enc = config.encoder
        return _stack_pass(enc, n_in, lambda i: n_in * n_in if dense else
                           bidirectional_pairs(n_in, enc.window(i), enc.bidirectional_window))
    return _stack_pass(config, n_in, lambda i: n_in * n_in if dense else causal_pairs(0, n_in, config.window(i)))


def flops(config, n_in, n_out, attention="useful") -> Flops:
    if isinstance(config, T5GemmaConfig):
        return encoder_decoder_flops(config, n_in, n_out, attention)
    return decoder_only_flops(config, n_in, n_out, attention)


def _check(attention, n_in, n_out):
    if attention not in ("useful", "dense"):
        raise ValueError(f"attention must be 'useful' or 'dense', got {attention!r}")
    if n_in < 1 or n_out < 1:
        raise ValueError(f"n_in and n_out must be >= 1, got {n_in}, {n_out}")


# ---------------------------------------------------------------------------- the models compared

def paper_models() -> dict:
    """Decoder-only Gemma 2 2B / 9B and the T5Gemma pairs built from them (vocab 256000)."""
    g2, g9 = PRESETS["gemma2-2b"], PRESETS["gemma2-9b"]
    return {"Gemma 2 2B": g2, "Gemma 2 9B": g9, "T5Gemma 2B-2B": T5GemmaConfig(g2, g2),
            "T5Gemma 9B-2B": T5GemmaConfig(g9, g2), "T5Gemma 9B-9B": T5GemmaConfig(g9, g9)}


def tiny_models() -> dict:
    """Laptop-sized stand-ins for the measured latency: a small and a large decoder-only model,
    the balanced pair of the small one and the unbalanced large-small pair."""
    small = PRESETS["tiny"]
    large = small.replace(hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                          num_attention_heads=8, num_key_value_heads=4)
    return {"decoder-only small": small, "decoder-only large": large,
            "enc-dec small-small": T5GemmaConfig(small, small), "enc-dec large-small": T5GemmaConfig(large, small)}


def random_model(config, seed=0, dtype="float32", backend="numpy"):
    cls = T5GemmaModel if isinstance(config, T5GemmaConfig) else Gemma2Model
    return cls.random(config, seed, dtype, backend)


def measure(model, n_in, n_out, repeats=3, seed=0):
    """Wall time (seconds) of generating n_out tokens from a random prompt of n_in tokens, in
    the two parts `generate` runs: `start` (the prompt, or the encoder and the bos step) and
    one decode step (its mean over the n_out - 1 steps). Each part is the best of `repeats`
    runs, which filters out the noise of a shared machine. Returns (input_s, per_step_s);
    the whole call takes about input_s + (n_out - 1) * per_step_s (sampling is negligible)."""
    c = model.config.encoder if isinstance(model.config, T5GemmaConfig) else model.config
    ids = np.random.default_rng(seed).integers(3, c.vocab_size, (1, n_in))
    best_input = best_step = np.inf
    for _ in range(repeats + 1):                       # the first run warms caches up
        t0 = time.perf_counter()
        state, logits = start(model, ids)
        t1 = time.perf_counter()
        for _ in range(n_out - 1):
            logits = step(state, np.argmax(logits, axis=-1))
        t2 = time.perf_counter()
        best_input = min(best_input, t1 - t0)
        best_step = min(best_step, (t2 - t1) / max(n_out - 1, 1))
    return best_input, best_step
