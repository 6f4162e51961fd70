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
# # 8. The fast path, part 1: the online softmax and tiles
#
# The reference attention of tutorial 2 is five lines of NumPy and holds the whole score
# matrix: for every (batch, head) a T x S array of scores, then of probabilities, and the
# probabilities are kept until the backward. `fastpath/attention.py` computes the same
# function with a Numba kernel that never holds more than a 64 x 64 tile of it. This
# tutorial builds the idea up in plain NumPy: why the score matrix must go, the online
# softmax on one row (and what forgetting its rescale factor does), then the tile loop and
# which tiles a mask lets it skip, each checked exactly against the reference. Tutorial 9
# runs the real kernel.
#
# The fast path sits beside the reference with almost the same signature; only the mask
# changes form, from a dense (B, T, S) array to a *description*:
#
#     minencdec.model.attention.attention_forward(q, k, v, mask, scale, cap)
#     fastpath.attention.attention_forward(q, k, v, scale, cap, causal, window, rule, key_mask, q_offset)
#
# and `fastpath.attention.dense_mask(T, S, causal, window, ...)` turns a description into
# the reference's mask, which is how every comparison below is made.

# %%
import os
import sys
from pathlib import Path

# One BLAS thread: faster for the small tile products below, and steady on a busy machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
try:
    import fastpath  # noqa: F401
except ImportError:                      # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
import plots                             # tutorials/plots.py: matplotlib set up, figures to plots.FIG
import matplotlib.pyplot as plt
from matplotlib.colors import ListedColormap
from exercises import grade

from fastpath import attention as fast
from minencdec.model import attention as ref
from minencdec.model.presets import preset

rng = np.random.default_rng(0)


def rel_err(got, want):
    """max |got - want|, relative to max |want| (the tensor's scale)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)

# %% [markdown]
# ## Why: the score matrix is O(T^2)
#
# The reference computes s = softcap(q k^T scale) as a (B, K, G, T, S) array, masks it,
# exponentiates it, normalises it into p, and returns a cache for the backward that holds
# p and the softcap's tanh: **two** arrays the size of the score matrix, kept from the
# forward until the backward. We count them in the cache of a small call, then scale up to
# Gemma 2 2B (8 query heads, 26 layers) at 4096 tokens, its sliding window.

# %%
B0, H0, K0, T0, Dh0 = 1, 4, 2, 32, 8
q0 = rng.normal(size=(B0, H0, T0, Dh0))
k0, v0 = rng.normal(size=(2, B0, K0, T0, Dh0))
_, cache0 = ref.attention_forward(q0, k0, v0, ref.causal_mask(T0)[None], Dh0 ** -0.5, 50.0)
score_sized = [a for a in cache0 if isinstance(a, np.ndarray) and a.size == B0 * H0 * T0 * T0]
assert len(score_sized) == 2                          # p and tanh(s / cap)

g2 = preset("gemma2-2b")
T4k = g2.sliding_window                               # 4096
one_array = 1 * g2.num_attention_heads * T4k * T4k * 4    # (B=1, H, T, T) float32
print(f"one (B=1, H={g2.num_attention_heads}, T, T) float32 score array at T = {T4k}: "
      f"{one_array / 2**20:.0f} MiB")
kept = 2 * one_array
print(f"the reference keeps 2 of them per attention layer until its backward: {kept / 2**30:.0f} GiB; "
      f"x {g2.num_hidden_layers} layers = {kept * g2.num_hidden_layers / 2**30:.0f} GiB at batch 1")
assert one_array == 512 * 2**20

# %% [markdown]
# Memory is the hard wall, but time suffers too: every one of those T^2 numbers is written
# to memory and read back several times (mask, exp, sum, divide, then the backward), and a
# causal mask throws half of them away after computing them.
#
# ## The online softmax, on one query row
#
# The trick that removes the T x S array is to compute softmax(s) v **without ever seeing
# the whole row s at once**. Read the keys in blocks and keep three running quantities per
# query row: the largest score so far m, the sum of exponentials so far l (taken relative
# to m), and the unnormalised output acc = sum_j e^(s_j - m) v_j. When a new block arrives
# with scores s_b and values v_b:
#
# $$ m' = \max(m, \max s_b), \quad c = e^{m - m'}, \quad
#    l \leftarrow c\,l + \textstyle\sum e^{s_b - m'}, \quad
#    acc \leftarrow c\,acc + e^{s_b - m'} v_b, \quad m \leftarrow m' $$
#
# Everything accumulated so far was relative to the old max m; multiplying by
# c = e^(m - m') re-expresses it relative to the new one (c = 1 when the max did not move).
# At the end o = acc / l, and lse = m + log l is the log of the softmax denominator,
# which is all the backward will need. `online_update` below does one such step for a
# block of rows at once (the tile loop later uses it unchanged); a row that has seen only
# masked keys (-inf) keeps m = -inf and l = 0.

# %%
def online_update(m, l, acc, s, v, rescale=True):
    """Fold one block of keys into the running state of R query rows.
    m, l (R,) running max and sum; acc (R, Dh); s (R, BK) scores, -inf where masked; v (BK, Dh)."""
    m_new = np.maximum(m, s.max(axis=1))                      # (R,)
    ref_max = np.where(np.isfinite(m_new), m_new, 0.0)        # rows that saw only -inf so far
    p = np.exp(s - ref_max[:, None])                          # (R, BK); masked keys -> exactly 0
    c = np.exp(m - ref_max) if rescale else np.ones_like(m)   # old terms shrink by e^(m - m')
    return m_new, c * l + p.sum(axis=1), c[:, None] * acc + p @ v


def online_softmax_row(s, v, BK, rescale=True):
    """softmax(s) @ v for one row, reading BK keys at a time. Returns o, lse, and per block
    the running max after it and its rescale factor c (for the picture)."""
    m, l, acc = np.full(1, -np.inf), np.zeros(1), np.zeros((1, v.shape[1]))
    trace = []
    for j0 in range(0, len(s), BK):
        m_new, l, acc = online_update(m, l, acc, s[None, j0:j0 + BK], v[j0:j0 + BK], rescale)
        trace.append((m_new[0], np.exp(m[0] - m_new[0])))
        m = m_new
    return acc[0] / l[0], m[0] + np.log(l[0]), np.array(trace)


S1, Dh1, BK1 = 48, 8, 8
s_row = rng.normal(scale=1.5, size=S1) + np.linspace(0, 6, S1)   # drifts up: the max keeps moving
v_row = rng.normal(size=(S1, Dh1))
p_row = np.exp(s_row - s_row.max())
p_row /= p_row.sum()                                              # the ordinary softmax, whole row

o_online, lse_online, trace = online_softmax_row(s_row, v_row, BK1)
err_o = np.abs(o_online - p_row @ v_row).max()
err_lse = abs(lse_online - np.log(np.sum(np.exp(s_row))))
print(f"online softmax over {S1 // BK1} blocks: max |o - softmax(s) v| = {err_o:.1e}, lse error {err_lse:.1e}")
assert err_o < 1e-14 and err_lse < 1e-12
print("rescale factor c per block:", np.round(trace[:, 1], 3))   # 0 for the first: nothing held yet
assert (trace[1:, 1] < 1).sum() >= 3                  # the max moved several times: c did real work

# %% [markdown]
# **What if we forget c?** Feed the identity matrix as the values: then the output *is*
# the weight vector the algorithm gives to each key. With the rescale, it is softmax(s)
# exactly. Without it, a key read in block t keeps its weight relative to the max *at that
# time*, m_t, instead of the final max M: relative to the last block it is overweighted
# by e^(M - m_t). Since the weights still sum to one, early keys come out too heavy and
# late ones too light: in this row the first block's keys about a hundred times too heavy,
# the last block's about five times too light (printed below). The output is simply wrong.
# The tile loop below meets this bug again.

# %%
w_right = online_softmax_row(s_row, np.eye(S1), BK1)[0]
w_wrong = online_softmax_row(s_row, np.eye(S1), BK1, rescale=False)[0]
m_when_read = np.repeat(trace[:, 0], BK1)                        # m_t of the block each key was in
assert np.allclose(w_right, p_row, rtol=0, atol=1e-15)
ratio = w_wrong / (p_row * np.exp(s_row.max() - m_when_read))      # should be one constant
assert np.allclose(ratio, ratio[0], rtol=1e-12)
print(f"without c, the first block's keys weigh {w_wrong[0] / w_right[0]:.0f}x too much, the last block's "
      f"{w_wrong[-1] / w_right[-1]:.2f}x")
assert 50 < w_wrong[0] / w_right[0] < 200 and 0.1 < w_wrong[-1] / w_right[-1] < 0.3

fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
ax = axes[0]
blocks = np.arange(S1) // BK1
ax.scatter(np.arange(S1), s_row, c=blocks % 2, cmap=ListedColormap(["tab:blue", "tab:cyan"]), s=18,
           label="scores s_j (alternate blocks in two colours)")
ax.step(np.arange(0, S1 + 1, BK1), np.r_[trace[:, 0], trace[-1, 0]], where="post", color="tab:red",
        label="running max m after each block")
for t, (m_t, c_t) in enumerate(trace):
    ax.text(t * BK1 + BK1 / 2, m_t + 0.4, f"c={c_t:.2f}", ha="center", fontsize=8, color="tab:red")
for x in range(0, S1 + 1, BK1):
    ax.axvline(x - 0.5, color="0.85", lw=0.8, zorder=0)
ax.set(xlabel="key j", ylabel="score", ylim=(s_row.min() - 1, s_row.max() + 2),
       title=f"one query row read in blocks of {BK1} keys")
ax.legend(fontsize=8, loc="lower right")
ax = axes[1]
ax.semilogy(np.arange(S1), w_right, "o", ms=4, color="tab:blue", label="with c: softmax(s), exactly")
ax.semilogy(np.arange(S1), w_wrong, "x", ms=5, color="tab:red", label="without c: early blocks overweighted")
ax.set(xlabel="key j", ylabel="weight given to key j (log scale)",
       title="the weights the online softmax ends up using\n"
             "(values = identity, so the output is the weights)")
ax.legend(fontsize=8)
fig.tight_layout()
plots.save(fig, "08_online_softmax.png")

# %% [markdown]
# ## Tiles: queries in blocks too, and the tiles a mask lets us skip
#
# The kernel cuts the queries into tiles of BQ rows as well. A (query tile, key tile) pair
# is one small matrix product s = q_tile k_tile^T (BQ x BK), one `online_update` for the
# BQ rows, and one product p v_tile: nothing larger than a tile is ever formed.
#
# The masks the models use have a shape the kernel exploits. For every mask description,
# the keys query i sees form one interval [lo_i, hi_i] (before padding), and lo_i and hi_i
# never decrease with i (`fastpath.attention.visible_intervals` computes them). So a query
# tile sees a contiguous range of key tiles, and the loop runs over **only that range**:
# the tiles above a causal diagonal, or outside a sliding window, are never touched. A tile
# inside the range is either *full* (every query of the tile sees every key of the tile) or
# *partial* (the mask cuts through it: masked scores become -inf before the update). The
# loop below is the NumPy twin of the kernel's `_forward_lane`, for one head; it also
# records what it did with each tile.

# %%
SKIPPED, PARTIAL, FULL = 0, 1, 2


def tiled_attention(q, k, v, scale, cap, lo, hi, kvalid, block, rescale=True):
    """One head: q (T, Dh), k and v (S, Dh); query i sees keys lo[i]..hi[i] that are kvalid (S,).
    Returns o (T, Dh), lse (T,) and the status of every (query tile, key tile)."""
    (T, Dh), S = q.shape, k.shape[0]
    BQ, BK = block
    status = np.full((-(-T // BQ), -(-S // BK)), SKIPPED)
    o, lse = np.zeros((T, Dh)), np.zeros(T)
    for qt in range(status.shape[0]):
        i = np.arange(qt * BQ, min(qt * BQ + BQ, T))                # the tile's query rows
        sees = lo[i] <= hi[i]
        if not sees.any():
            continue                                                # no row sees a key: o = 0
        m, l, acc = np.full(len(i), -np.inf), np.zeros(len(i)), np.zeros((len(i), Dh))
        for kt in range(lo[i][sees].min() // BK, hi[i][sees].max() // BK + 1):   # only the tiles it sees
            j = np.arange(kt * BK, min(kt * BK + BK, S))            # the tile's keys
            if not kvalid[j].any():
                continue                                            # a tile of padding
            visible = (j >= lo[i, None]) & (j <= hi[i, None]) & kvalid[j]   # (BQ, BK)
            status[qt, kt] = FULL if visible.all() else PARTIAL
            s = q[i] @ k[j].T * scale                               # (BQ, BK)
            if cap is not None:
                s = cap * np.tanh(s / cap)                          # softcap comes before the mask
            m, l, acc = online_update(m, l, acc, np.where(visible, s, -np.inf), v[j], rescale)
        seen = l > 0
        o[i[seen]] = acc[seen] / l[seen, None]
        lse[i[seen]] = m[seen] + np.log(l[seen])
    return o, lse, status


def status_from_mask(mask, BQ, BK):
    """The same table from the dense (T, S) mask alone: no visible entry in the tile ->
    skipped, all visible -> full, else partial. An independent oracle for the loop above."""
    nq, nk = -(-mask.shape[0] // BQ), -(-mask.shape[1] // BK)
    out = np.empty((nq, nk), int)
    for a in range(nq):
        for b in range(nk):
            tile = mask[a * BQ:(a + 1) * BQ, b * BK:(b + 1) * BK]
            out[a, b] = FULL if tile.all() else PARTIAL if tile.any() else SKIPPED
    return out

# %% [markdown]
# Three masks at T = S = 512 with 64 x 64 tiles: the decoder's causal mask, its sliding
# window (w = 128 here; Gemma 2 uses 4096) and the encoder's bidirectional window. For each
# we check two things: the tiled loop gives the reference's output (float64, to 1e-12),
# and the tiles it skipped, computed partially and computed fully are exactly those the
# dense mask says. Then we count the work.

# %%
T2, Dh2, BT = 512, 16, 64
q2 = rng.normal(size=(T2, Dh2))
k2, v2 = rng.normal(size=(2, T2, Dh2))
patterns = {"causal": dict(causal=True),
            "causal sliding, w = 128": dict(causal=True, window=128),
            "bidirectional sliding, |i - j| <= 96": dict(window=96, rule="le")}
tiles = {}
for name, desc in patterns.items():
    lo, hi = fast.visible_intervals(T2, T2, **desc)
    mask = fast.dense_mask(T2, T2, **desc)[0]                       # (T, S)
    o, _, status = tiled_attention(q2, k2, v2, Dh2 ** -0.5, 50.0, lo, hi, np.ones(T2, bool), (BT, BT))
    o_ref = ref.attention_forward(q2[None, None], k2[None, None], v2[None, None], mask[None],
                                  Dh2 ** -0.5, 50.0)[0][0, 0]
    assert rel_err(o, o_ref) < 1e-12, name
    assert np.array_equal(status, status_from_mask(mask, BT, BT)), name
    tiles[name] = (mask, status)
    done = (status > 0).sum()
    print(f"{name:38s} tiles computed {done:2d} of {status.size} ({(status == PARTIAL).sum():2d} partial);"
          f" scores computed {done * BT * BT / mask.size:5.1%} of T x S, needed {mask.mean():5.1%}")
lo, hi = fast.visible_intervals(T2, T2, causal=True)
o_no_c = tiled_attention(q2, k2, v2, Dh2 ** -0.5, 50.0, lo, hi, np.ones(T2, bool), (BT, BT), rescale=False)[0]
o_ref = ref.attention_forward(q2[None, None], k2[None, None], v2[None, None], tiles["causal"][0][None],
                              Dh2 ** -0.5, 50.0)[0][0, 0]
print(f"the causal tile loop without the rescale factor c: rel err {rel_err(o_no_c, o_ref):.1e} (with c: < 1e-12)")
assert rel_err(o_no_c, o_ref) > 1e-2
per_row = (tiles["causal sliding, w = 128"][1] > 0).sum(axis=1)
assert per_row.max() == 3                   # at most 3 key tiles per query tile, whatever T is
assert (tiles["causal"][1] > 0).sum() == 8 * 9 // 2

# %% [markdown]
# Causal attention computes 36 of 64 tiles, about half, and the sliding window at most
# three key tiles per query tile **whatever T is**: its work grows linearly in T, where the
# reference pays for all T x S scores in every case. The partial tiles are the price of
# tiling (a tile straddling the diagonal computes some scores it then masks); smaller tiles
# waste less but run less efficiently.

# %%
colours = ListedColormap(["0.93", "#f4a261", "#2a6f97"])
fig, axes = plt.subplots(1, 3, figsize=(14, 5.6))
for ax, (name, (mask, status)) in zip(axes, tiles.items()):
    ax.imshow(np.kron(status, np.ones((BT, BT))), cmap=colours, vmin=0, vmax=2, interpolation="nearest")
    ax.imshow(np.ma.masked_where(mask, np.ones_like(mask, float)), cmap=ListedColormap(["white"]), alpha=0.55,
              interpolation="nearest")                        # masked entries washed out
    ax.set_xticks(np.arange(0, T2 + 1, BT) - 0.5, np.arange(0, T2 + 1, BT), fontsize=7)
    ax.set_yticks(np.arange(0, T2 + 1, BT) - 0.5, np.arange(0, T2 + 1, BT), fontsize=7)
    ax.grid(color="white", lw=1.2)
    ax.set(xlabel="key j", ylabel="query i")
    ax.set_title(f"{name}\n{(status > 0).sum()} of {status.size} tiles computed", fontsize=10)
handles = [plt.Rectangle((0, 0), 1, 1, fc=colours(i)) for i in range(3)]
fig.legend(handles, ["skipped: never loaded", "partial: mask cuts the tile (pale = masked entries)",
                     "full: every score used"], loc="lower center", ncol=3, fontsize=9)
fig.suptitle(f"Which {BT} x {BT} tiles the kernel computes (T = S = {T2})", fontsize=12)
fig.tight_layout(rect=(0, 0.07, 1, 0.95))
plots.save(fig, "08_tiles.png")


# %% [markdown]
# ## Exercises
#
# **8.1 Merging two partial softmaxes.** Split a row's keys in two halves and run the online
# softmax on each separately: you get (m1, l1, acc1) and (m2, l2, acc2). Write
# `merge(a, b)` that combines them into the state of the whole row, as a decoding kernel
# does when it splits a long cache across threads. The check merges the two halves of the
# row above and compares acc / l with softmax(s) v; adding the states without rescaling
# them to a common max must fail.

# %%
my_merge = None               # your answer: a function ((m1, l1, acc1), (m2, l2, acc2)) -> (m, l, acc)

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_merge(a, b):
    (m1, l1, acc1), (m2, l2, acc2) = a, b
    m = np.maximum(m1, m2)
    c1, c2 = np.exp(m1 - m), np.exp(m2 - m)                  # each re-expressed relative to the new max
    return m, c1 * l1 + c2 * l2, c1[:, None] * acc1 + c2[:, None] * acc2


# %%
def check_merge(merge):
    half = S1 // 2
    start = (np.full(1, -np.inf), np.zeros(1), np.zeros((1, Dh1)))
    a = online_update(*start, s_row[None, :half], v_row[:half])
    b = online_update(*start, s_row[None, half:], v_row[half:])
    m, l, acc = merge(a, b)
    assert np.abs(acc[0] / l[0] - p_row @ v_row).max() < 1e-12


grade("Exercise 8.1", check_merge, answer=my_merge, solution=solution_merge,
      wrong=lambda a, b: (np.maximum(a[0], b[0]), a[1] + b[1], a[2] + b[2]))

# %% [markdown]
# **8.2 How many tiles does a causal mask cost?** With T = S = n BT (n tiles along each
# side), write `causal_tiles(n)`, the number of tiles the loop computes for the causal
# mask. The check builds the status table from the dense mask (`status_from_mask`) for
# several n; half the square, n^2 / 2, must fail.

# %%
my_causal_tiles = None        # your answer: a function (n) -> int

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_causal_tiles(n):
    return n * (n + 1) // 2     # the diagonal tiles are computed too (partially masked)


# %%
def check_causal_tiles(causal_tiles):
    for n in (1, 2, 3, 5, 8):
        computed = int((status_from_mask(fast.dense_mask(n * 4, n * 4, causal=True)[0], 4, 4) > 0).sum())
        assert causal_tiles(n) == computed, (n, causal_tiles(n), computed)


grade("Exercise 8.2", check_causal_tiles, answer=my_causal_tiles, solution=solution_causal_tiles,
      wrong=lambda n: n * n // 2)
print("figures:", sorted(f.name for f in plots.FIG.glob("08_*.png")))
