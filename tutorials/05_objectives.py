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
# # 5. The objectives: PrefixLM, distillation, UL2
#
# An adapted encoder-decoder (tutorial 4) needs a task that gives the encoder something to
# read and the decoder something to write. Every objective in `minencdec/training/objectives.py` is a
# pure function from one row of token ids to a pair (encoder input, decoder target):
#
# | objective | encoder reads | decoder writes |
# |---|---|---|
# | PrefixLM (the paper's main one) | the first k tokens | the rest, scored against a **teacher** |
# | UL2 R / X denoisers | a mode token, the row with spans hidden behind sentinels | each sentinel, then its span |
# | UL2 S denoiser | a mode token and a random prefix | the rest (PrefixLM at a random split) |
#
# We cut one row of real text every way, derive and check the distillation loss, draw the
# seven UL2 denoisers, measure T5's noise masks over many draws, and prove that input and
# target always put the row back together.

# %%
import os
import sys
from pathlib import Path

# One BLAS thread: faster for these tiny matrices, and steady on a busy machine (before numpy loads).
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numpy as np

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
try:
    import minencdec  # noqa: F401
except ImportError:                      # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
import plots                             # tutorials/plots.py: matplotlib set up, figures to plots.FIG
import matplotlib.pyplot as plt
from exercises import grade
from matplotlib.colors import to_rgb

from minencdec.model.adapt import adapt_params
from minencdec.model.presets import preset
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.losses import distillation_backward, distillation_forward, log_softmax
from minencdec.training.objectives import (UL2_DENOISERS, noise_counts, prefix_length, prefix_lm, prefix_lm_batch,
                                           random_spans_noise_mask, ul2_batch, ul2_example)
from minencdec.training.optim import AdamW
from minencdec.model.t5gemma import T5GemmaModel, shift_right
from minencdec.training.tasks import Seq2SeqTask
from minencdec.io.tokenizer import train_tokenizer

QUICK = os.environ.get("MINENCDEC_QUICK") == "1"     # the test suite's small sizes
rng = np.random.default_rng(0)

# %% [markdown]
# ## One row of real tokens
#
# A tiny sentencepiece tokenizer trained on one paragraph is enough to see words. Like
# every tokenizer `train_tokenizer` makes, it reserves the sentinels `<extra_id_0>`,
# `<extra_id_1>`, ... and the three UL2 mode tokens `[NLU] [NLG] [S2S]` as single pieces.

# %%
TEXT = ("Gemma 2 is a decoder-only language model: it reads a text from left to right and predicts "
        "the next token. T5Gemma turns a pretrained Gemma 2 into an encoder-decoder. The encoder reads "
        "the whole input with bidirectional attention; the decoder writes the output one token at a "
        "time and looks back at the encoder through cross-attention. Both halves start from the "
        "decoder-only weights, and training continues with a new objective: PrefixLM, where the encoder "
        "reads the first half of a text and the decoder continues it, or UL2, a mixture of denoisers "
        "that hide spans of the text behind sentinel tokens and ask the decoder to fill them in.")
tok = train_tokenizer([TEXT], vocab_size=420, num_sentinels=32)
L = 128
row = np.array(tok.encode(TEXT)[:L])
print(tok, f"- the paragraph is {len(tok.encode(TEXT))} tokens; we use the first {L}")

# %% [markdown]
# ## PrefixLM
#
# `prefix_lm(row)` splits at the middle, k = L // 2, as the paper does (4096 + 4096): the
# encoder reads `row[:k]`, the decoder predicts `row[k:]`. Labels are the target tokens
# themselves; the model builds its decoder input by shifting them right behind bos. With a
# numpy Generator as the split, k is uniform on [1, L - 1] (UL2's S denoiser, T5's
# `random_prefix_noise_mask`): both sides always keep a token.

# %%
inp, tgt = prefix_lm(row)
assert len(inp) == L // 2 and np.array_equal(np.concatenate([inp, tgt]), row)
print("encoder :", repr(tok.decode(inp[-12:].tolist())), " (its last 12 tokens)")
print("target  :", repr(tok.decode(tgt[:12].tolist())), "...")
print("decoder input = shift_right(target):", shift_right(tgt[None, :6], tok.bos_id, tok.pad_id)[0],
      "<- bos, then the target one step late")

counts = np.bincount([prefix_length(16, rng) for _ in range(30_000)], minlength=16)
print("random split of a 16-token row, counts of k = 0..15:", counts)
assert len(counts) == 16 and counts[0] == 0 and np.all(np.abs(counts[1:] / 2000 - 1) < 0.1)  # uniform

rows = np.stack([row[:32], row[32:64], row[64:96]])              # a batch: padded (B, S) and (B, T)
_, mask_mid, labels_mid = prefix_lm_batch(rows, "middle")
_, mask_rnd, labels_rnd = prefix_lm_batch(rows, rng)
assert mask_mid.all() and (labels_mid != -100).all()           # middle split: no padding at all
assert (labels_rnd == -100).any() and ((labels_rnd != -100).sum(1) + mask_rnd.sum(1) == 32).all()

# %% [markdown]
# ## Distillation from the decoder-only teacher
#
# The paper does not train PrefixLM on the ground truth alone: the teacher, the decoder-only
# model the pair was adapted from, reads the **whole** row, and the student learns its
# distribution (`losses.distillation_forward`). With temperature T and teacher logits t,
# student logits s over the vocabulary:
#
# $$ p = \mathrm{softmax}(t / T), \quad q = \mathrm{softmax}(s / T), \quad
#    \mathcal{L} = \alpha\, T^2\, \overline{\textstyle -\sum_v p_v \log q_v}
#                + (1 - \alpha)\, \mathrm{CE}(s, y) $$
#
# (mean over labelled tokens; the paper's setting is alpha = 1, T = 1.)
#
# **Its gradient, derived.** Take one token and write u = s / T, so q = softmax(u) and
# log q_v = u_v - logsumexp(u). Then d log q_v / d u_w = delta_vw - q_w, and
#
# $$ \frac{\partial}{\partial u_w}\Big(-\sum_v p_v \log q_v\Big) = -\sum_v p_v (\delta_{vw} - q_w)
#    = -p_w + q_w \sum_v p_v = q_w - p_w $$
#
# because the teacher's p sums to 1. The chain rule through u = s / T divides by T, and the
# loss multiplies the token's term by alpha T^2 / N (N labelled tokens): the soft part of
# dL/ds is **alpha T (q - p) / N**. The hard part is tutorial 3's (softmax(s) - onehot(y)) / N
# times 1 - alpha. Below we write both by hand and compare them with `distillation_backward`,
# which is itself checked against finite differences.
#
# **Alignment.** A causal model's logits at position i predict token i + 1. The student's
# target t is row token k + t, so the teacher logits that predict it sit at position
# k - 1 + t: `teacher[:, k - 1 : k - 1 + n]` for n targets. An off-by-one here trains the student to copy
# the *next* token's distribution; the loss still falls, just toward the wrong thing. A
# teacher that has learned a deterministic language (each token is the previous plus one)
# makes the slice visible: aligned, its argmax is the target; one late, it never is.

# %%
V = 48
counting = lambda B, n: 3 + (rng.integers(0, V - 3, (B, 1)) + np.arange(n)) % (V - 3)   # noqa: E731
teacher = Gemma2Model.random(preset("nano", vocab_size=V), seed=0)
opt = AdamW(teacher.params, lr=1e-2)
for _ in range(40):
    batch = counting(16, 16)
    opt.step(teacher.loss_and_grads(batch, batch)[1])
x = counting(8, 16)
k, n = 8, 8                                                     # prefix length, target length
t_logits = teacher.logits(x)                                    # (B, L, V) on the whole row
aligned = (t_logits[:, k - 1:k - 1 + n].argmax(-1) == x[:, k:]).mean()
late = (t_logits[:, k:k + n - 1].argmax(-1) == x[:, k:k + n - 1]).mean()
print(f"teacher argmax == target: aligned slice {aligned:.2f}, one position late {late:.2f}")
assert aligned > 0.95 and late < 0.05

# %% [markdown]
# `Seq2SeqTask("prefixlm-kd")` is what training runs. Its loss on a batch must be exactly
# this recipe: the teacher on the rows, the aligned slice, the student on (prefix,
# shift_right(target)). We build the student by adapting the teacher (tutorial 4).

# %%
cfg_s, params_s, _ = adapt_params(teacher.params, teacher.config, teacher.params, teacher.config, "copy")
student = T5GemmaModel(cfg_s, params_s)
task = Seq2SeqTask("prefixlm-kd", x, x, batch_size=8, teacher=teacher, temperature=2.0, alpha=0.5)
rows_b, input_ids, attention_mask, labels = task.batch(0)
loss_task, _, _ = task.loss_and_grads(student, (rows_b, input_ids, attention_mask, labels))
k = input_ids.shape[1]
s_logits = student.logits(input_ids, shift_right(labels, cfg_s.decoder.bos_token_id, cfg_s.decoder.pad_token_id))
t_slice = teacher.logits(rows_b)[:, k - 1:k - 1 + labels.shape[1]]
by_hand = distillation_forward(s_logits, t_slice, labels, temperature=2.0, alpha=0.5)[0]
print(f"Seq2SeqTask loss {loss_task:.6f} == by hand {by_hand:.6f}")
assert abs(loss_task - by_hand) < 1e-5

# %% [markdown]
# **Cross-entropy, not KL.** The soft term is -sum p log q = H(p) + KL(p || q). The teacher's
# entropy H(p) does not depend on the student, so both have the same gradient, but the
# loss never reaches zero: its floor is T^2 H(p), reached when the student equals the
# teacher, where the gradient vanishes. Then the finite-difference check of
# `distillation_backward`, in float64, with ignored (-100) tokens, alpha = 0.7, T = 2.5.

# %%
z_t = rng.normal(0, 3, (2, 5, 7))                               # teacher logits (batch, tokens, vocab)
y = rng.integers(0, 7, (2, 5))
y[1, 3:] = -100                                                 # two unlabelled tokens
p = np.exp(log_softmax(z_t / 2.5))
floor = 2.5**2 * np.mean((-(p * np.log(p)).sum(-1))[y != -100])
loss_eq, cache_eq = distillation_forward(z_t.copy(), z_t, y, temperature=2.5)
assert abs(loss_eq - floor) < 1e-12 and np.abs(distillation_backward(cache_eq)).max() < 1e-15
z_s = rng.normal(0, 3, z_t.shape)
assert distillation_forward(z_s, z_t, y, temperature=2.5)[0] > floor      # KL > 0 above the floor

f = lambda: distillation_forward(z_s, z_t, y, temperature=2.5, alpha=0.7)[0]   # noqa: E731
grad = distillation_backward(distillation_forward(z_s, z_t, y, temperature=2.5, alpha=0.7)[1])
fd = np.zeros_like(z_s)
for i in np.ndindex(z_s.shape):                                 # all 70 entries, central differences
    old = z_s[i]; z_s[i] = old + 1e-5; up = f(); z_s[i] = old - 1e-5; down = f(); z_s[i] = old  # noqa: E702
    fd[i] = (up - down) / 2e-5
err = np.abs(fd - grad).max() / np.abs(grad).max()
print(f"distillation_backward vs finite differences: rel err {err:.1e}; ignored tokens get "
      f"gradient {np.abs(grad[1, 3:]).max()}")
assert err < 1e-8 and not grad[1, 3:].any()

keep = (y != -100)[..., None]
q_hand = np.exp(log_softmax(z_s / 2.5))
p_hand = np.exp(log_softmax(z_t / 2.5))
hard = np.exp(log_softmax(z_s)) - np.eye(7)[np.where(y == -100, 0, y)]
by_hand = (0.7 * 2.5 * (q_hand - p_hand) + 0.3 * hard) * keep / keep.sum()
assert np.allclose(by_hand, grad, rtol=0, atol=1e-15)
print("the derived gradient alpha T (q - p) / N + (1 - alpha)(softmax(s) - onehot) / N == distillation_backward")

# %% [markdown]
# **Why T^2.** A higher temperature flattens the teacher's distribution and shows the
# student how the teacher ranks the *wrong* tokens. But q - p shrinks like 1/T when T grows
# (both distributions tend to uniform), so the soft gradient (q - p) / T falls like 1/T^2.
# Multiplying the loss by T^2 (Hinton et al., 2015) keeps the gradient's size about constant,
# so changing T does not silently change the learning rate, and alpha keeps its meaning.

# %%
temps = [0.5, 1, 2, 4, 8, 16]
norms = []
for temp in temps:
    g = distillation_backward(distillation_forward(z_s, z_t, y, temperature=temp)[1])
    norms.append(np.linalg.norm(g))
norms = np.array(norms)
without = norms / np.array(temps) ** 2                          # what the gradient would be without T^2
print("gradient norm, with T^2:", np.round(norms, 3), " without:", np.round(without, 5))
assert norms[2:].max() / norms[2:].min() < 1.5 and without[-1] < without[1] / 100

fig, axes = plt.subplots(1, 2, figsize=(12, 4))
order = np.argsort(-z_t[0, 0])
for temp, c in zip([0.5, 1, 2, 4], plt.cm.viridis(np.linspace(0, 0.85, 4))):
    axes[0].plot(np.exp(log_softmax(z_t[0, 0] / temp))[order], "o-", color=c, label=f"T = {temp}")
axes[0].set_xticks(range(7), [f"#{r + 1}" for r in range(7)])
axes[0].set(xlabel="vocabulary entries, most likely first", ylabel="p = softmax(teacher / T)",
            title="the teacher's soft targets: higher T shows the ranking\nof the tokens it thinks are wrong")
axes[0].legend()
axes[1].loglog(temps, norms, "o-", label="alpha T^2 soft loss (the library)")
axes[1].loglog(temps, without, "s--", label="without the T^2 factor")
axes[1].set(xlabel="temperature T", ylabel="|d loss / d student logits|",
            title="the T^2 factor keeps the gradient's scale\nindependent of the temperature (T >= 2)")
axes[1].set_xticks(temps, [str(t) for t in temps])
axes[1].minorticks_off()
axes[1].legend()
fig.tight_layout()
plots.save(fig, "05_distillation.png")

# %% [markdown]
# ## UL2: seven denoisers
#
# UL2 (Tay et al., 2022) mixes denoisers and tells the model which one it faces with a mode
# token in front of the input. R ("regular") hides spans of 3 or 8 tokens at 15%, as T5
# does; X ("extreme") hides spans of 64 or half the text; S ("sequential") is PrefixLM at a
# random split:
#
# | denoiser | mean span | noise rate | mode |
# |---|---|---|---|
# | R | 3, 8 | 0.15 | `[NLU]` |
# | X | 3, 8, 64, 64 | 0.5, 0.5, 0.15, 0.5 | `[NLG]` |
# | S | (prefix) | | `[S2S]` |
#
# R and X use T5's span corruption: each noise span becomes **one** sentinel in the input,
# and the target lists `<extra_id_i>` followed by span i, then eos. Here is R(3, 0.15) on the
# first 40 tokens, then all seven on the same 128-token row, drawn token by token.

# %%
small_in, small_tgt = ul2_example(row[:40], tok, np.random.default_rng(1), denoiser=UL2_DENOISERS[0])
print("input :", repr(tok.decode(small_in.tolist())))
print("target:", repr(tok.decode(small_tgt.tolist())))

sentinel = {s: i for i, s in enumerate(tok.sentinel_ids)}          # sentinel id -> span index


def spans_of(tgt):
    """{sentinel id: the tokens it hid}, read off a target `<s0> span0 <s1> span1 ... eos`."""
    starts = np.flatnonzero(np.isin(tgt, tok.sentinel_ids))
    return {tgt[a]: tgt[a + 1:b] for a, b in zip(starts, list(starts[1:]) + [len(tgt) - 1])}


examples = [(d, *ul2_example(row, tok, np.random.default_rng(3), denoiser=d)) for d in UL2_DENOISERS]
KEPT, MODE, EOS = np.array(to_rgb("0.82")), np.array(to_rgb("0.1")), np.array(to_rgb("0.45"))
SPAN = [np.array(to_rgb(c)) for c in plt.cm.tab10.colors if to_rgb(c) != to_rgb("tab:gray")]
dark = lambda i: 0.75 * SPAN[i % len(SPAN)]                     # noqa: E731  a sentinel
light = lambda i: 0.45 * SPAN[i % len(SPAN)] + 0.55             # noqa: E731  a token it hid


def colours(ids, span=None, target=False):
    """(1, n, 3) RGB strip: sentinels dark, hidden tokens light in their span's colour."""
    out = []
    for t in ids:
        span = sentinel.get(t, span)
        out.append(dark(span) if t in sentinel else MODE if t in tok.mode_ids.values() else
                   EOS if t == tok.eos_id else light(span) if target else KEPT)
    return np.array(out)[None]


fig, ax = plt.subplots(figsize=(14, 9.5))
y0 = 0
for d, inp, tgt in examples:
    if d.mean_span:                                             # R, X: which span hid each row token
        spans = spans_of(tgt)
        hidden = [i for t in inp[1:] for i in ([sentinel[t]] * len(spans[t]) if t in spans else [-1])]
        target_rgb = colours(tgt, target=True)
    else:                                                       # S: the suffix is one "span"
        hidden = [-1] * (len(inp) - 1) + [0] * len(tgt)
        target_rgb = colours(tgt, span=0, target=True)
    row_rgb = np.array([KEPT if h < 0 else light(h) for h in hidden])[None]
    for label, rgb, dy in (("row", row_rgb, 0), ("input", colours(inp), 1.05),
                           ("target", target_rgb, 2.1)):
        ax.imshow(rgb, extent=(0, rgb.shape[1], y0 + dy + 0.9, y0 + dy), aspect="auto")
        ax.vlines(np.arange(1, rgb.shape[1]), y0 + dy, y0 + dy + 0.9, colors="white", lw=0.4)  # token edges
        ax.text(-1, y0 + dy + 0.45, label, ha="right", va="center", fontsize=8)
    ax.text(-9, y0 + 1.5, f"{d.name}\n{d.mode}", ha="right", va="center", fontsize=10, weight="bold")
    y0 += 3.8
ax.set_xlim(-20, L + 1)
ax.set_ylim(y0, -0.3)
ax.set_yticks([])
ax.set_xticks(range(0, L + 1, 16))
ax.set_title(f"UL2's seven denoisers on one {L}-token row: which tokens each hides (row), what the "
             "encoder reads (input), what the decoder writes (target)", fontsize=11, pad=30)
ax.set_xlabel("token position")
ax.spines["bottom"].set_bounds(0, L)
for side in ("left", "right", "top"):
    ax.spines[side].set_visible(False)
handles = [plt.Rectangle((0, 0), 1, 1, fc=c) for c in (KEPT, light(0), dark(0), MODE, EOS)]
ax.legend(handles, ["kept token", "noise span (one colour per span)", "its sentinel <extra_id_i>",
                    "mode token", "eos"], ncol=5, loc="lower center", bbox_to_anchor=(0.5, 1.0), fontsize=9)
fig.tight_layout()
plots.save(fig, "05_ul2_denoisers.png", dpi=100)

# %% [markdown]
# ## Input + target reconstruct the row
#
# Nothing is lost or invented: replacing each sentinel of the input by the tokens that
# follow it in the target (`spans_of` above), dropping the mode token and eos, gives the row
# back, for every denoiser. We check it on many random rows, also through `ul2_batch`'s
# padding (which also proves that L + 1 slots always fit both sides).

# %%
def reconstruct(inp, tgt):
    """The row a UL2 example was made from: undo span corruption, or join prefix and suffix."""
    spans = spans_of(tgt)
    if not spans:                                               # S: prefix + suffix
        return np.concatenate([inp[1:], tgt])
    return np.concatenate([spans[t] if t in spans else [t] for t in inp[1:]])   # [1:]: no mode token


for d, inp, tgt in examples:
    assert np.array_equal(reconstruct(inp, tgt), row), d.name
big = rng.integers(400, 420, (200 if QUICK else 1000, 64))     # ordinary tokens only
inputs, in_mask, targets = ul2_batch(big, tok, rng)             # padded to 65 on both sides
for r, i, m, t in zip(big, inputs, in_mask, targets):
    assert np.array_equal(reconstruct(i[m == 1], t[t != -100]), r)
print(f"reconstructed all 7 denoisers on the row and {len(big)} random UL2 examples from ul2_batch")

# %% [markdown]
# ## T5's random_spans_noise_mask, measured
#
# `random_spans_noise_mask(L, density, mean_span, rng)` follows T5 step for step: it fixes
# the counts first, N = round(L density) noise tokens in n = round(N / mean_span) spans, then
# splits the noise tokens and the kept tokens each into n random non-empty parts and
# interleaves them, **kept first**. So every mask has exactly the requested density and mean
# span length up to that rounding (in float32, as TensorFlow rounds: 190 x 0.15 gives 29
# noise tokens, not 28), while the individual span lengths vary. We draw many masks at the
# UL2 paper's length 512 and measure.

# %%
assert noise_counts(190, 0.15, 3)[0] == 29
draws = 300 if QUICK else 2000
Lm = 512
measured = {}
for d in UL2_DENOISERS[:6]:
    masks = np.array([random_spans_noise_mask(Lm, d.density, d.mean_span, rng) for _ in range(draws)])
    starts = masks & ~np.pad(masks, ((0, 0), (1, 0)))[:, :-1]  # first token of each noise span
    edges = np.flatnonzero(np.diff(np.pad(masks.ravel().astype(int), 1))).reshape(-1, 2)   # (spans, 2)
    span_lengths = edges[:, 1] - edges[:, 0]                   # masks end in noise: no span crosses rows
    measured[d.name] = masks.mean(0), span_lengths
    N, n = noise_counts(Lm, d.density, d.mean_span)
    print(f"{d.name:12s} density {masks.mean():.4f} (asked {d.density}), mean span "
          f"{span_lengths.mean():6.2f} (asked {d.mean_span}), spans per mask {starts.sum(1).mean():5.1f}")
    assert (masks.sum(1) == N).all() and (starts.sum(1) == n).all()
    assert abs(masks.mean() - d.density) <= 0.5 / Lm and abs(span_lengths.mean() - N / n) < 1e-9
    assert not masks[:, 0].any() and masks[:, -1].all()        # starts kept, ends in noise
    interior = masks[:, Lm // 4:3 * Lm // 4].mean()
    assert n == 1 or abs(interior - d.density) < 0.03, (d.name, interior)
    if n == 1:                                                  # one span: always the suffix
        assert all(np.array_equal(m, np.arange(Lm) >= Lm - N) for m in masks)

# %% [markdown]
# Two consequences worth knowing. The first token is never noise and the last always is;
# the interior sees about the requested rate, once a few mean span lengths away from the
# ends (X(64, 0.5) takes ~100 tokens to get there). And when the counts give a single span,
# X(64, 0.15) on 512 tokens (77 noise tokens, round(77 / 64) = 1), the mask is the same
# every time: the span is the suffix, so that "denoiser" is PrefixLM at a fixed 85% split.

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4))
for name in ("R(3, 0.15)", "R(8, 0.15)", "X(8, 0.5)"):
    lengths = measured[name][1]
    axes[0].hist(lengths, bins=np.arange(1, 40) - 0.5, density=True, histtype="step", lw=1.5,
                 label=f"{name}: mean {lengths.mean():.2f}")
axes[0].set(xlabel="noise span length (tokens)", ylabel="fraction of spans",
            title=f"span lengths vary around the mean ({draws} masks of {Lm} tokens)")
axes[0].legend()
for name in ("R(3, 0.15)", "X(3, 0.5)", "X(64, 0.5)", "X(64, 0.15)"):
    axes[1].plot(measured[name][0], lw=1, label=name)
axes[1].set(xlabel="token position", ylabel="P(noise)", ylim=(-0.03, 1.03),
            title="noise rate per position: never the first token, always the last")
axes[1].legend(fontsize=8, loc="upper left")
fig.tight_layout()
plots.save(fig, "05_noise_masks.png")

# %% [markdown]
# ## Exercises
#
# **5.1 The teacher's slice.** Write `teacher_slice(k, n)` -> (start, stop): which positions
# of the teacher's logits (run on the whole row) score the student's n targets, the row
# tokens k .. k + n - 1. The check slices the counting teacher above with your answer and
# requires its argmax to be the target at least 95% of the time; `(k, k + n)`, one late,
# must fail.

# %%
my_teacher_slice = None       # your answer: a function (k, n) -> (start, stop)

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_teacher_slice(k, n):
    return k - 1, k - 1 + n    # position i predicts token i + 1


# %%
def check_teacher_slice(teacher_slice):
    rows_c = counting(8, 16)
    a, b = teacher_slice(8, 6)
    hits = (teacher.logits(rows_c)[:, a:b].argmax(-1) == rows_c[:, 8:14]).mean()
    assert b - a == 6 and hits > 0.95, f"the teacher's argmax matches the target {hits:.0%} of the time"


grade("Exercise 5.1", check_teacher_slice, answer=my_teacher_slice, solution=solution_teacher_slice,
      wrong=lambda k, n: (k, k + n))

# %% [markdown]
# **5.2 The distillation gradient.** Write `kd_grad(s, t, y, T, alpha)`, dL/ds of the loss
# above for student logits s and teacher logits t (..., V), targets y (-100 ignored). The
# check is central differences of `distillation_forward`; the slip it must reject drops the
# T^2 factor's effect, giving alpha (q - p) / (T N) for the soft part.

# %%
my_kd_grad = None             # your answer: a function (s, t, y, T, alpha) -> ds

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_kd_grad(s, t, y, T, alpha, soft_scale=None):
    keep = (y != -100)[..., None]
    soft = np.exp(log_softmax(s / T)) - np.exp(log_softmax(t / T))
    hard = np.exp(log_softmax(s)) - np.eye(s.shape[-1])[np.where(y == -100, 0, y)]
    return (alpha * (T if soft_scale is None else soft_scale) * soft + (1 - alpha) * hard) * keep / keep.sum()


# %%
def check_kd_grad(kd_grad):
    s0, t0 = rng.normal(0, 2, (2, 3, 5)), rng.normal(0, 2, (2, 3, 5))
    y0 = np.array([[1, 4, -100], [0, 2, 3]])
    got = kd_grad(s0.copy(), t0, y0, 2.0, 0.6)
    for i in np.ndindex(s0.shape):
        up, down = s0.copy(), s0.copy()
        up[i] += 1e-6
        down[i] -= 1e-6
        fd_i = (distillation_forward(up, t0, y0, 2.0, 0.6)[0] - distillation_forward(down, t0, y0, 2.0, 0.6)[0]) / 2e-6
        assert abs(fd_i - got[i]) < 1e-7, (i, fd_i, got[i])


grade("Exercise 5.2", check_kd_grad, answer=my_kd_grad, solution=solution_kd_grad,
      wrong=lambda s, t, y, T, alpha: solution_kd_grad(s, t, y, T, alpha, soft_scale=1 / T))
print("figures:", sorted(f.name for f in plots.FIG.glob("05_*.png")))
