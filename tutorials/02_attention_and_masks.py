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
# # 2. Attention and its masks
#
# One function computes every attention in Gemma 2 and T5Gemma,
# `minencdec.model.attention.attention_forward(q, k, v, mask, scale, cap)`:
#
# $$ s = \mathrm{softcap}_{50}(q k^\top \cdot \text{scale}), \qquad
#    s_{ij} = -\infty \text{ where the mask hides key } j, \qquad
#    p = \mathrm{softmax}_j(s), \qquad o = p\, v $$
#
# What changes between the decoder's self-attention, the encoder's, and the decoder's
# cross-attention is only the **mask**: a boolean (T, S) array, True where query i may see
# key j. This tutorial draws every mask the models use, shows which key/value head serves
# which query head (GQA), looks at real attention weights, and derives the backward.

# %%
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
try:
    import minencdec  # noqa: F401
except ImportError:                      # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
import plots                             # tutorials/plots.py: matplotlib set up, figures to plots.FIG
import matplotlib.pyplot as plt
from exercises import grade

from minencdec.model.attention import (attention_backward, attention_block_forward, attention_forward,
                                       bidirectional_mask, causal_mask, with_key_padding)
from minencdec.model.presets import preset
from minencdec.model.gemma2 import Gemma2Model, init_params, self_attention_masks
from minencdec.model.layers import rmsnorm_forward, rope_cos_sin

QUICK = os.environ.get("MINENCDEC_QUICK") == "1"     # the test suite's small sizes
rng = np.random.default_rng(0)

# %% [markdown]
# ## The masks
#
# | mask | key j visible to query i iff | used by |
# |---|---|---|
# | causal | j <= i | decoder self-attention, full layers |
# | causal sliding, window w | i - w < j <= i (w keys, itself included) | decoder, even layers |
# | bidirectional | always | encoder, full layers |
# | bidirectional sliding | \|i - j\| <= w (`"le"`, transformers >= 5) or < w (`"lt"`, 4.53-4.57, JAX) | encoder, even layers |
# | cross | always (T queries, S encoder keys) | decoder cross-attention, never windowed |
# | padding | key j is a real token | ANDed onto any of the above |
#
# We build each with the library, then check it cell by cell against the rule in the table,
# written as a plain double loop (a second, independent statement of the same rule).

# %%
T, S, w = 12, 8, 4
src_pad = np.array([[1, 1, 1, 1, 1, 1, 0, 0]])          # encoder input: 6 tokens, 2 pads
tgt_pad = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])   # left-padded decoder input

masks = {
    "causal": causal_mask(T),
    f"causal sliding, w = {w}": causal_mask(T, w),
    "bidirectional": bidirectional_mask(T),
    f"bidirectional sliding |i-j| <= {w}\n(transformers >= 5)": bidirectional_mask(T, w, "le"),
    f"bidirectional sliding |i-j| < {w}\n(transformers 4.53-4.57, JAX)": bidirectional_mask(T, w, "lt"),
    "cross (T x S), 2 padded\nencoder keys": with_key_padding(np.ones((T, S), bool), src_pad)[0],
    "causal + left padding\n(2 pads)": with_key_padding(causal_mask(T), tgt_pad)[0],
}
rules = [lambda i, j: j <= i,
         lambda i, j: i - w < j <= i,
         lambda i, j: True,
         lambda i, j: abs(i - j) <= w,
         lambda i, j: abs(i - j) < w,
         lambda i, j: bool(src_pad[0, j]),
         lambda i, j: j <= i and bool(tgt_pad[0, j])]
for (name, mask), rule in zip(masks.items(), rules):
    want = np.array([[rule(i, j) for j in range(mask.shape[1])] for i in range(mask.shape[0])])
    assert np.array_equal(mask, want), name
print("every mask matches its rule; visible keys per query, causal sliding:",
      masks[f"causal sliding, w = {w}"].sum(1))

# %% [markdown]
# Two rows need a second look. With left padding, query 0 is itself a pad and can see only
# key 0, also a pad: its row is **empty** (all False). The softmax of an all `-inf` row is
# 0/0; we come back to it below. And the two bidirectional sliding rules differ by exactly
# one diagonal on each side: a checkpoint trained with one and run with the other is
# slightly wrong on every sliding layer, which is why `GemmaConfig.bidirectional_window`
# lets you pick.
#
# ## GQA: which key/value head serves which query head
#
# Gemma 2 2B has H = 8 query heads but only K = 4 key/value heads. The H heads are split
# into K groups of G = H / K consecutive heads; query head h reads kv head h // G.
# `attention_forward` does this with a reshape, (B, H, T, Dh) -> (B, K, G, T, Dh), instead of
# copying k and v G times. Proof that this is the same as copying: repeat each kv head G
# times (`np.repeat`: 0, 0, 1, 1, ...) and run plain multi-head attention. The negative
# control, `np.tile` (0, 1, 0, 1, ...), pairs heads wrongly and must differ.

# %%
H, K, Dh = 8, 4, 16
G = H // K
q = rng.normal(size=(1, H, T, Dh))
k, v = rng.normal(size=(2, 1, K, T, Dh))
mask = causal_mask(T)[None]
o_gqa, _ = attention_forward(q, k, v, mask, Dh ** -0.5, 50.0)
o_rep, _ = attention_forward(q, np.repeat(k, G, 1), np.repeat(v, G, 1), mask, Dh ** -0.5, 50.0)
o_tile, _ = attention_forward(q, np.tile(k, (1, G, 1, 1)), np.tile(v, (1, G, 1, 1)), mask, Dh ** -0.5, 50.0)
assert np.allclose(o_gqa, o_rep, rtol=0, atol=1e-12)
assert not np.allclose(o_gqa, o_tile)
print("GQA == multi-head attention on kv heads repeated 0,0,1,1,2,2,3,3; tiled 0,1,2,3,0,.. differs")
head_map = np.arange(H)[:, None] // G == np.arange(K)[None, :]          # (H, K): who reads whom

# %%
fig, axes = plt.subplots(2, 4, figsize=(14, 7.6))
for ax, (name, mask) in zip(axes.flat, masks.items()):
    ax.imshow(mask, cmap="Blues", vmin=0, vmax=1.3)
    ax.set_title(name, fontsize=9.5)
    ax.set_xticks(range(mask.shape[1])); ax.set_yticks(range(T))      # noqa: E702
    ax.tick_params(labelsize=6)
    ax.set_xlabel("key j", fontsize=8); ax.set_ylabel("query i", fontsize=8)   # noqa: E702
ax = axes.flat[-1]
ax.imshow(head_map, cmap="Oranges", vmin=0, vmax=1.3, aspect=0.5)
ax.set_title(f"GQA: query head h reads kv head h // {G}\n(H = {H}, K = {K})", fontsize=9.5)
ax.set_xticks(range(K)); ax.set_yticks(range(H))                        # noqa: E702
ax.set_xlabel("kv head", fontsize=8); ax.set_ylabel("query head", fontsize=8)   # noqa: E702
fig.suptitle("Attention masks: dark = key visible to the query", fontsize=12)
fig.tight_layout()
plots.save(fig, "02_masks.png")

# %% [markdown]
# ## Real attention weights from a tiny random model
#
# The masks decide where attention *may* look; the weights p decide where it does. We take
# a small random Gemma 2 (3 layers; layer 0 slides with window 6, layer 1 is full), run it,
# and recompute the attention of layers 0 and 1 with the library's own
# `attention_block_forward`, whose cache holds p. We first prove we are looking at the same
# numbers the model used: after the post-norm, our recomputed block output equals the
# sublayer output the model recorded.
#
# At transformers' initialisation (std 0.02) all scores are nearly zero, so every query
# spreads its attention evenly over the keys it may see, 1/(number visible): we check that,
# then use larger random weights (std 0.2) so the picture has some structure.

# %%
cfg = preset("nano", sliding_window=6)
L = 20


def layer_attention(params, ids, layer):
    """p (H, T, T) of self-attention in `layer`, recomputed from the recorded residual stream."""
    model = Gemma2Model(cfg, params, "float64")
    rec = {}
    model.logits(ids, record=rec)
    h = rec["embed"] if layer == 0 else rec[f"layers.{layer - 1}"]              # the layer's input
    P = f"model.layers.{layer}."
    x, _ = rmsnorm_forward(h, model.params[P + "input_layernorm.weight"], cfg.rms_norm_eps)
    wts = {n: model.params[f"{P}self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    rope = rope_cos_sin(np.arange(ids.shape[1]), cfg.head_dim, cfg.rope_theta, np.float64)
    y, cache = attention_block_forward(x, x, wts, self_attention_masks(cfg)[layer],
                                       cfg.num_attention_heads, cfg.num_key_value_heads,
                                       cfg.query_pre_attn_scalar ** -0.5, cfg.attn_logit_softcapping, rope)
    z, _ = rmsnorm_forward(y, model.params[P + "post_attention_layernorm.weight"], cfg.rms_norm_eps)
    assert np.allclose(z, rec[f"layers.{layer}.self_attn"], rtol=0, atol=1e-12)   # the model's own numbers
    qg, k, v, p, cap_c, scale = cache.attn     # the reference attention's cache, by name
    return p.reshape(cfg.num_attention_heads, L, L)          # (B=1, K, G, T, S) -> (H, T, S)


ids = rng.integers(3, cfg.vocab_size, size=(1, L))
visible = causal_mask(L, cfg.sliding_window)
p_init = layer_attention(init_params(cfg, seed=1, dtype="float64", std=0.02), ids, 0)
uniform = visible / visible.sum(1, keepdims=True)
print(f"std 0.02: max |p - 1/visible| = {np.abs(p_init - uniform).max():.3f}  (nearly uniform)")
assert np.abs(p_init - uniform).max() < 0.05

params = init_params(cfg, seed=1, dtype="float64", std=0.2)
for n in params:
    if params[n].ndim == 1:                                  # random, non-zero norm offsets
        params[n] = rng.normal(0.0, 0.2, params[n].shape)
p_layers = {layer: layer_attention(params, ids, layer) for layer in (0, 1)}
for layer, p in p_layers.items():
    allowed = causal_mask(L, cfg.window(layer))
    assert np.allclose(p.sum(-1), 1.0) and np.all(p[:, ~allowed] == 0.0)   # rows sum to 1, masked = 0

cmap = plt.get_cmap("magma").copy()
cmap.set_bad("0.85")                                         # masked keys drawn grey, not as p = 0
fig, axes = plt.subplots(2, 4, figsize=(13, 7), layout="constrained")
for row, layer in enumerate((0, 1)):
    kind = f"sliding, w = {cfg.window(layer)}" if cfg.window(layer) else "full causal"
    allowed = causal_mask(L, cfg.window(layer))
    for head in range(cfg.num_attention_heads):
        ax = axes[row, head]
        im = ax.imshow(np.ma.masked_where(~allowed, p_layers[layer][head]), cmap=cmap, vmin=0, vmax=1)
        ax.set_title(f"layer {layer} ({kind}), head {head}\nreads kv head "
                     f"{head // (cfg.num_attention_heads // cfg.num_key_value_heads)}", fontsize=9)
        ax.set_xticks(range(0, L, 5)); ax.set_yticks(range(0, L, 5))        # noqa: E702
        ax.set_xlabel("key", fontsize=8); ax.set_ylabel("query", fontsize=8)   # noqa: E702
        ax.tick_params(labelsize=7)
fig.colorbar(im, ax=axes, shrink=0.6, label="attention weight p (grey: masked)")
fig.suptitle("Attention weights of a tiny random Gemma 2 (random weights, std 0.2)", fontsize=12)
plots.save(fig, "02_attention_weights.png")

# %% [markdown]
# ## The backward of softmax attention
#
# The forward, line by line: raw = q k^T, s = 50 tanh(raw scale / 50) (softcap), masked
# entries of s set to -inf, p = softmax(s) along each row, o = p v. Read it bottom-up,
# inverting one line at a time (this is `attention_backward`):
#
# 1. o = p v  gives  dv = p^T do  and  dp = do v^T.  With GQA, G query heads share each v,
#    so dv **sums** over the G heads of a group (the einsum drops the G axis).
# 2. p = softmax(s) along a row gives ds = p * (dp - sum_k p_k dp_k), derived below. A
#    masked key has p_j = 0, so its ds_j is exactly 0: the mask needs no special case.
# 3. s = 50 tanh(raw scale / 50) gives d raw = ds (1 - tanh^2(raw scale / 50)) scale: the
#    softcap's derivative (tutorial 1) at its own argument, raw *times scale*, then the
#    chain rule through the scaling.
# 4. raw = q k^T gives dq = d raw k and dk = d raw^T q, dk again summed over each group.
#
# **Deriving step 2.** For one row, p_j = e^{s_j} / Z with Z = sum_k e^{s_k}. Differentiate
# p_j with respect to s_i: the numerator gives delta_ij e^{s_j} / Z = delta_ij p_j, and the
# denominator gives -e^{s_j} e^{s_i} / Z^2 = -p_j p_i. So dp_j / ds_i = p_j (delta_ij - p_i),
# the Jacobian J = diag(p) - p p^T. The chain rule sums over the outputs j:
#
# $$ ds_i = \sum_j dp_j \, p_j (\delta_{ij} - p_i) = p_i \Big(dp_i - \sum_j p_j\, dp_j\Big) $$
#
# We check the Jacobian itself against finite differences of a softmax, column by column,
# and then the one-line formula against the matrix-vector product J^T dp.

# %%
def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


s_row, dp_row = rng.normal(size=6), rng.normal(size=6)
p_row = softmax(s_row)
J = np.diag(p_row) - np.outer(p_row, p_row)                      # J[j, i] = dp_j / ds_i
J_fd = np.stack([(softmax(s_row + 1e-6 * e) - softmax(s_row - 1e-6 * e)) / 2e-6 for e in np.eye(6)], axis=1)
assert np.abs(J - J_fd).max() < 1e-9
assert np.allclose(J.T @ dp_row, p_row * (dp_row - p_row @ dp_row), rtol=0, atol=1e-15)
print(f"softmax Jacobian diag(p) - p p^T == finite differences (max diff {np.abs(J - J_fd).max():.1e}); "
      "J^T dp == p (dp - p.dp)")

# %% [markdown]
# Now all three gradients of the whole function, with finite differences, on a hard case:
# GQA, softcap, key padding, a sliding window, and left padding that leaves the first query
# row fully masked.

# %%
def fd_error(loss, x, grad, n=10, h=1e-5):      # tutorial 1's checker: L = sum(o * g), so do = g
    """Max |central difference - grad| / max|grad| over n random entries of x (float64)."""
    errs = []
    for i in map(tuple, rng.integers(0, x.shape, size=(n, x.ndim))):
        old = x[i]; x[i] = old + h; up = loss(); x[i] = old - h; down = loss(); x[i] = old  # noqa: E702
        errs.append(abs((up - down) / (2 * h) - grad[i]))
    return max(errs) / np.max(np.abs(grad))


Bf, Tf = (2, 6) if QUICK else (3, 16)
key_mask = np.ones((Bf, Tf), int)
key_mask[0, :2] = 0                                      # example 0 is left-padded: row 0 fully masked
key_mask[1, -3:] = 0                                     # example 1 is right-padded
mask = with_key_padding(causal_mask(Tf, 5), key_mask)    # (B, T, T)
q = rng.normal(scale=3.0, size=(Bf, H, Tf, Dh))          # large enough that the softcap bends
k, v = rng.normal(size=(2, Bf, K, Tf, Dh))
g = rng.normal(size=q.shape)                             # probe: L = sum(o * g), so do = g

o, cache = attention_forward(q, k, v, mask, Dh ** -0.5, 50.0)
dq, dk, dv = attention_backward(g, cache)
loss = lambda: np.sum(attention_forward(q, k, v, mask, Dh ** -0.5, 50.0)[0] * g)   # noqa: E731
for name, x, grad in (("q", q, dq), ("k", k, dk), ("v", v, dv)):
    err = fd_error(loss, x, grad)
    print(f"attention d{name}: rel err vs finite differences {err:.1e}")
    assert err < 1e-6

# %% [markdown]
# **Fully masked rows are safe.** The forward replaces a row max of `-inf` by 0 before
# exponentiating, so exp(-inf - 0) = 0 everywhere and the row sum is 0; dividing by 1
# instead of 0 leaves p = 0. The query's output is exactly zero, no NaN appears, and no
# gradient flows through it. A "magic" -10000 in place of -inf behaves differently on
# exactly these rows: every score of the row is then -10000, the softmax of equal scores is
# uniform, and the padded query's output becomes the plain average of all the values,
# padding included. We check both.

# %%
qg, k_, v_, p, cap_c, scale = cache                      # p: (B, K, G, T, S)
assert np.all(np.isfinite(o)) and np.all(np.isfinite(dq)) and np.all(np.isfinite(dk))
assert not mask[0, 0].any()                              # row 0 of example 0 sees nothing ...
assert np.all(p[0, :, :, 0] == 0) and np.all(o[0, :, 0] == 0) and np.all(dq[0, :, 0] == 0)
assert np.all(dk[0, :, :2] == 0) and np.all(dv[1, :, -3:] == 0)   # padded keys get no gradient
print("fully masked query row: p = 0, output = 0, gradient = 0, no NaN")

s_magic = np.einsum("bkgtd,bksd->bkgts", qg, k_) * scale
s_magic = np.where(mask[:, None, None], 50.0 * np.tanh(s_magic / 50.0), -10000.0)   # -10000, not -inf
p_magic = np.exp(s_magic - s_magic.max(-1, keepdims=True))
p_magic /= p_magic.sum(-1, keepdims=True)
assert np.allclose(p_magic[0, :, :, 0], 1.0 / Tf)                       # the padded row: uniform
assert np.allclose(p_magic[1], p[1], rtol=0, atol=1e-15)                # rows that see a key: as -inf
print(f"with -10000: the fully masked row attends uniformly, 1/{Tf} to each key; other rows as with -inf")

# %% [markdown]
# ## Exercises
#
# **2.1 The softmax backward.** Write `softmax_ds(p, dp)`: the gradient with respect to the
# scores s of a row (or of every row: work along the last axis), given p = softmax(s) and
# dp. The check compares it with finite differences of sum(softmax(s) * dp); the slip it must
# reject is the diagonal of the Jacobian alone, p * dp, which forgets that raising one score
# lowers every other probability.

# %%
my_softmax_ds = None          # your answer: a function (p, dp) -> ds

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_softmax_ds(p, dp):
    return p * (dp - np.sum(p * dp, axis=-1, keepdims=True))


# %%
def check_softmax_ds(softmax_ds):
    s0, dp0 = rng.normal(size=(3, 7)), rng.normal(size=(3, 7))
    row_softmax = lambda z: np.exp(z - z.max(-1, keepdims=True)) / np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)  # noqa: E731
    err = fd_error(lambda: np.sum(row_softmax(s0) * dp0), s0, softmax_ds(row_softmax(s0), dp0))
    assert err < 1e-6, f"relative error {err:.1e} against finite differences"


grade("Exercise 2.1", check_softmax_ds, answer=my_softmax_ds, solution=solution_softmax_ds,
      wrong=lambda p, dp: p * dp)

# %% [markdown]
# **2.2 Which kv head?** With H query heads and K kv heads, write `kv_head(h, H, K)`, the
# kv head that query head h reads in `attention_forward`. The check builds plain multi-head
# attention with each query head given the kv head your function names, and compares it
# with the library's GQA output; the tiled order 0, 1, 2, 3, 0, 1, ... (h % K) must fail.

# %%
my_kv_head = None             # your answer: a function (h, H, K) -> int

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_kv_head(h, H, K):
    return h // (H // K)


# %%
def check_kv_head(kv_head):
    qe = rng.normal(size=(1, 8, 5, 4))
    ke, ve = rng.normal(size=(2, 1, 2, 5, 4))
    pick = [kv_head(h, 8, 2) for h in range(8)]
    want = attention_forward(qe, ke, ve, causal_mask(5)[None], 0.5, None)[0]
    got = attention_forward(qe, ke[:, pick], ve[:, pick], causal_mask(5)[None], 0.5, None)[0]
    assert np.allclose(got, want, rtol=0, atol=1e-12), f"query heads 0..7 -> kv heads {pick}"


grade("Exercise 2.2", check_kv_head, answer=my_kv_head, solution=solution_kv_head, wrong=lambda h, H, K: h % K)
print("figures:", sorted(f.name for f in plots.FIG.glob("02_*.png")))
