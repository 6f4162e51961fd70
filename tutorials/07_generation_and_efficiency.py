# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 7. Generation and the efficiency side
#
# A language model generates one token at a time, and recomputing the whole sequence for
# every new token would cost O(n^2) layers' work. A **KV cache** keeps what earlier tokens
# contribute (their attention keys and values), so each step runs the layers on the new
# token only. `minencdec/model/generate.py` does this with the same layer code as the training
# forward:
#
#     state, logits = start(model, input_ids)   # the prompt (Gemma 2), or the encoder + bos (T5Gemma)
#     logits = step(state, next_tokens)         # one new token per row
#
# We prove the cache right (every step equals a full forward), look at what it keeps, then
# turn to the paper's efficiency argument: FLOPs from the configs at paper scale, and
# wall time measured on tiny models.

# %%
import os
import sys
from pathlib import Path

# One BLAS thread: faster for these tiny matrices, and steady on a busy machine (before numpy loads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import matplotlib
import numpy as np

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
try:
    import minencdec  # noqa: F401
except ImportError:                      # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")                # running as a script: write files, open no window
import matplotlib.pyplot as plt

from minencdec.model import generate
from minencdec.model.config import T5GemmaConfig
from minencdec.model.presets import preset
from minencdec.model.efficiency import flops, measure, paper_models, random_model, tiny_models
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.t5gemma import T5GemmaModel

QUICK = os.environ.get("MINENCDEC_QUICK") == "1"     # the test suite's small sizes
FIG = Path(os.environ.get("MINENCDEC_FIGURES", HERE / "figures"))   # where the PNGs go
FIG.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## The cache equals the full forward, at every step
#
# A 4-layer Gemma 2 in float64 with a sliding window of 4 (even layers) and random norm
# offsets. We start from a 2-token prompt, then feed greedy tokens one by one; after each
# step the cached logits must equal the last row of `model.logits` on the whole sequence so
# far. In float64 "equal" means rounding only: the cache computes the same sums in a
# different grouping, ~1e-16.

# %%
cfg = preset("nano", num_hidden_layers=4)                       # window 4 on layers 0 and 2
decoder_only = Gemma2Model.random(cfg, seed=0, dtype="float64")
for name, p in decoder_only.params.items():
    if p.ndim == 1:
        decoder_only.params[name] = rng.normal(0, 0.1, p.shape)
prompt = rng.integers(3, cfg.vocab_size, (2, 2))
steps = 8 if QUICK else 16
state, logits = generate.start(decoder_only, prompt)
seq, kept = prompt, []                                          # kept: keys per layer after each step
for n in range(steps):
    full = decoder_only.logits(seq)[:, -1]                      # recompute everything: (B, V)
    assert np.abs(logits - full).max() < 1e-12, n
    kept.append([k.shape[2] for k in state.cache.keys])
    token = logits.argmax(-1)
    seq = np.concatenate([seq, token[:, None]], axis=1)
    logits = generate.step(state, token)
print(f"decoder-only: {steps} steps, cached logits == full forward (max diff < 1e-12)")

# %% [markdown]
# **Sliding layers keep w - 1 keys.** A query on a sliding layer sees itself and the w - 1
# keys before it, so after a step the cache needs only the last w - 1 keys: the next token
# brings the w-th. Full-attention layers keep every key. This is transformers' sliding
# cache, and why Gemma 2's memory per sliding layer stops growing at w.

# %%
kept = np.array(kept)                                           # (steps, layers)
for i in range(cfg.num_hidden_layers):
    w = cfg.window(i)
    want = [len(prompt[0]) + n if w is None else min(w - 1, len(prompt[0]) + n) for n in range(steps)]
    assert list(kept[:, i]) == want, (i, kept[:, i])
print("keys kept per layer after the prompt:", kept[0], "after the last step:", kept[-1],
      f"(w = {cfg.sliding_window})")

# %% [markdown]
# ## The encoder-decoder: cross-attention K/V once, at full length
#
# `start` runs the encoder once, projects its output to each decoder layer's cross-attention
# keys and values **once**, and then feeds bos. Every step reuses those arrays. Unlike the
# self-attention cache they are never cut to the window: cross-attention sees every source
# token (S = 12 > w = 4 here). We check the steps against full forwards again, that the
# cross K/V are the very same arrays after the last step, and that they are the encoder
# output times W_k (the projection, done once).

# %%
t5 = T5GemmaModel.random(T5GemmaConfig(cfg, cfg), seed=1, dtype="float64")
for name, p in t5.params.items():
    if p.ndim == 1:
        t5.params[name] = rng.normal(0, 0.1, p.shape)
source = rng.integers(3, cfg.vocab_size, (2, 12))
state, logits = generate.start(t5, source)
cross_before = [k for k, _ in state.cache.cross]
dec = np.full((2, 1), cfg.bos_token_id)
self_kept, cross_len = [], []
for n in range(steps):
    assert np.abs(logits - t5.logits(source, dec)[:, -1]).max() < 1e-12, n
    self_kept.append(state.cache.keys[0].shape[2])
    cross_len.append(state.cache.cross[0][0].shape[2])
    token = logits.argmax(-1)
    dec = np.concatenate([dec, token[:, None]], axis=1)
    logits = generate.step(state, token)
assert all(k is k0 for (k, _), k0 in zip(state.cache.cross, cross_before))     # computed once
assert set(cross_len) == {source.shape[1]} and max(self_kept) == cfg.sliding_window - 1
enc_out = t5.encode(source)                                     # (B, S, D)
K, Dh = cfg.num_key_value_heads, cfg.head_dim
k0 = (enc_out @ t5.params["model.decoder.layers.0.cross_attn.k_proj.weight"].T).reshape(2, 12, K, Dh)
assert np.allclose(state.cache.cross[0][0], k0.transpose(0, 2, 1, 3), rtol=0, atol=1e-12)
print(f"encoder-decoder: {steps} steps == full forward; cross-attention K/V: the same arrays "
      f"after every step, length S = {source.shape[1]} (self-attention on layer 0 keeps {max(self_kept)})")

fig, ax = plt.subplots(figsize=(8, 4))
x = np.arange(steps)
ax.plot(x, kept[:, 1], "o-", color="tab:blue", label="full-attention layer: every key")
ax.plot(x, kept[:, 0], "s-", color="tab:orange",
        label=f"sliding layer (w = {cfg.sliding_window}): the last w - 1")
ax.plot(x, cross_len, "^--", color="tab:green", label=f"T5Gemma cross-attention: all S = {source.shape[1]} "
        "source tokens, computed once")
ax.set(xlabel=f"decoding step (0: after `start` on a {prompt.shape[1]}-token prompt)",
       ylabel="cached keys per layer",
       title="what a KV cache keeps between decoding steps")
ax.set_ylim(0, None)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIG / "07_kv_cache.png", dpi=110)

# %% [markdown]
# ## FLOPs per token at paper scale
#
# `efficiency.flops(config, n_in, n_out)` counts multiply-adds (x2) from a config alone: the
# **input part** (a decoder-only prompt pass, or the encoder plus the cross-attention K/V
# projection) and the **output part** (every generation step and the LM head). Per token:
#
#     linear per token and layer   2 (D q + 2 D kv + q D) + 2 (3 D F)     projections, GeGLU MLP
#     attention per visible pair   4 H Dh                                  q k^T and p v
#     LM head per generated token  2 D V
#
# For an encoder-decoder the two parts come from **different stacks**: 9B-2B runs the 9B
# encoder over the input once, and every generated token goes through the 2B decoder (plus
# its cross-attention over the source).

# %%
n_in, n_out = 512, 128
paper = {k: v for k, v in paper_models().items() if k != "T5Gemma 9B-9B"}
per_in = {name: flops(c, n_in, n_out).input / n_in / 1e9 for name, c in paper.items()}
per_out = {name: flops(c, n_in, n_out).output / n_out / 1e9 for name, c in paper.items()}
print(f"{'model':14s} {'GFLOP / input token':>20s} {'GFLOP / output token':>21s}   ({n_in} in, {n_out} out)")
for name in paper:
    print(f"{name:14s} {per_in[name]:20.2f} {per_out[name]:21.2f}")
assert per_out["T5Gemma 9B-2B"] == per_out["T5Gemma 2B-2B"]              # the same 2B decoder
assert per_out["T5Gemma 9B-2B"] < 1.15 * per_out["Gemma 2 2B"]         # ~2B cost per token
assert per_out["T5Gemma 9B-2B"] < 0.35 * per_out["Gemma 2 9B"]
assert abs(per_in["T5Gemma 9B-2B"] / per_in["Gemma 2 9B"] - 1) < 0.05    # 9B cost, once, on the input

# %% [markdown]
# That is the paper's point in four numbers: **9B-2B pays the large model's cost once, on
# the input, and generates at about the 2B's cost** (about 10% more than the decoder-only 2B,
# for cross-attention). Decoding is the sequential, latency-bound part, so a 9B-2B answers
# about as fast as a 2B model while its input is read by a 9B model.
#
# ## Measured: the same shape on tiny models
#
# We cannot run a 9B model in NumPy, but `efficiency.tiny_models()` gives stand-ins: a
# small decoder-only (the `tiny` preset), a large one (2x wider, 2x deeper), the balanced
# small-small pair and the unbalanced large-small pair. `measure` times `start` (the input)
# and the mean decode step, best of a few repeats (a shared machine is noisy; one BLAS
# thread, set at the top, keeps small matmuls from stalling on thread hand-offs).

# %%
m_in, m_out, repeats = (32, 8, 3) if QUICK else (128, 32, 5)
timed = {}
for name, c in tiny_models().items():
    model = random_model(c)
    measure(model, 8, 2, repeats=1)                              # warm up: first calls allocate
    timed[name] = measure(model, m_in, m_out, repeats=repeats)   # (input s, per step s)
    print(f"{name:20s} input {timed[name][0] * 1e3:7.1f} ms   per generated token "
          f"{timed[name][1] * 1e3:6.2f} ms")
step_ms = {name: t[1] * 1e3 for name, t in timed.items()}
assert step_ms["enc-dec large-small"] < 0.7 * step_ms["decoder-only large"]

# %%
fig, axes = plt.subplots(1, 3, figsize=(16, 4.3))
names, colours = list(paper), ["tab:blue", "tab:red", "tab:cyan", "tab:green"]
xs = np.arange(len(names))
axes[0].bar(xs - 0.2, [per_in[n] for n in names], 0.4, color=colours, alpha=0.4)
axes[0].bar(xs + 0.2, [per_out[n] for n in names], 0.4, color=colours)
axes[0].set_xticks(xs, [n.replace("T5Gemma ", "T5Gemma\n").replace("Gemma 2 ", "Gemma 2\n") for n in names])
axes[0].set(ylabel="GFLOPs", ylim=(0, 1.25 * max(per_in.values())),
            title=f"paper scale, from the configs\n({n_in} input, {n_out} generated tokens)")
key = [plt.Rectangle((0, 0), 1, 1, fc="0.5", alpha=a) for a in (0.4, 1)]     # light: input, dark: output
axes[0].legend(key, ["per input token", "per generated token"], fontsize=8, loc="upper left")
tiny = list(timed)
xs = np.arange(len(tiny))
axes[1].bar(xs - 0.2, [timed[n][0] / m_in * 1e3 for n in tiny], 0.4, color=colours, alpha=0.4)
axes[1].bar(xs + 0.2, [step_ms[n] for n in tiny], 0.4, color=colours)
axes[1].set_xticks(xs, [n.replace(" ", "\n", 1) for n in tiny])
top = max(max(step_ms.values()), max(t[0] / m_in * 1e3 for t in timed.values()))
axes[1].set(ylabel="ms", ylim=(0, 1.3 * top),
            title=f"tiny models, measured (NumPy, float32, batch 1)\n({m_in} input tokens)")
axes[1].legend(key, ["start (the input), per input token", "one decode step"], fontsize=8, loc="upper left")
n = np.arange(1, 4 * m_out + 1)
for name, colour in zip(tiny, colours):
    axes[2].plot(n, (timed[name][0] + (n - 1) * timed[name][1]) * 1e3, color=colour, label=name)
axes[2].set(xlabel="generated tokens", ylabel="ms for the whole answer",
            title="latency = input once + one step per token\n(from the measured parts)")
axes[2].legend(fontsize=8)
fig.suptitle("an unbalanced encoder-decoder reads with the large model and writes at the small one's speed",
             fontsize=11)
fig.tight_layout()
fig.savefig(FIG / "07_latency.png", dpi=110)

# %% [markdown]
# The measured bars have the shape of the FLOP bars: the large-small pair's input costs
# what the large model's prompt costs, and its decode step costs about what the small
# decoder's step costs, far below the large decoder-only model's. At this size a NumPy step
# is partly Python overhead per layer, so the ratios are not the FLOP ratios; the order is.
# The cost of this design is memory (both stacks' weights are loaded) and the cross-attention
# K/V cache, which holds S keys per decoder layer for the whole answer.
print("figures:", sorted(f.name for f in FIG.glob("07_*.png")))
