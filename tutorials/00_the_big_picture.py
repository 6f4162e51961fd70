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
# # 0. The big picture: where every piece sits
#
# The T5Gemma paper (Zhang et al., *Encoder-Decoder Gemma: Improving the Quality-Efficiency
# Trade-Off via Adaptation*, arXiv 2504.06225) asks a simple question: instead of pretraining
# an encoder-decoder model from scratch, can we **copy a pretrained decoder-only Gemma 2 into
# both halves** of one and continue training? T5Gemma 2 (arXiv 2512.14856) carries the same
# recipe to Gemma 3. minencdec implements both in NumPy, forward and backward, and these
# tutorials take it apart one idea at a time.
#
# This first lesson is the map. We run two tiny models, record what flows through them, and
# draw the dataflow from those recordings: a Gemma block in its residual stream, and how an
# encoder-decoder wires two stacks together. Then a glossary, a table from each tutorial to
# the paper's sections and results, and two exercises.
#
# **How these tutorials work.** Every claim is an `assert`: a tutorial that runs to the end
# has checked what it says. Every tutorial ends with exercises; each is graded by a check
# that first proves it accepts the solution (in a hidden cell: click it to open) and rejects a
# known-wrong answer. Run a tutorial with `python tutorials/00_the_big_picture.py`, or as a
# notebook (`tutorials/README.md`); `MINENCDEC_QUICK=1` makes every size small.

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

from minencdec.model import generate
from minencdec.model.config import T5GemmaConfig
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.presets import PRESETS, num_parameters, preset
from minencdec.model.t5gemma import T5GemmaModel

QUICK = os.environ.get("MINENCDEC_QUICK") == "1"     # the test suite's small sizes
rng = np.random.default_rng(0)

# %% [markdown]
# ## A decoder-only Gemma, recorded
#
# A language model maps token ids (B, T) to logits (B, T, V): for each position, a score for
# every token of the vocabulary being the next one. In Gemma 2 the ids are embedded into
# vectors of width D, and then every layer **adds** two things to them: what self-attention
# computed (mixing information across positions) and what the MLP computed (per position).
# That running sum is the **residual stream**. Each addition is a *sandwich*: normalise the
# stream, run the sublayer, normalise its output, add.
#
# `model.logits(ids, record={})` fills the dict with the stream and every sublayer's
# contribution, in the order they are computed. That order *is* the architecture:

# %%
cfg = preset("nano")                                  # 3 layers, D = 32, V = 512: tiny and random
B, T = 2, 6
ids = rng.integers(3, cfg.vocab_size, size=(B, T))                  # a batch of 2 rows of 6 token ids
rec = {}
Gemma2Model.random(cfg, seed=0).logits(ids, record=rec)
for name, value in rec.items():
    print(f"  {name:20s} {value.shape}")
expected = (["embed"] + [f"layers.{i}{part}" for i in range(cfg.num_hidden_layers)
                         for part in (".self_attn", ".mlp", "")] + ["norm", "logits"])
assert list(rec) == expected
assert all(rec[n].shape == (B, T, cfg.hidden_size) for n in expected[:-1])
assert rec["logits"].shape == (B, T, cfg.vocab_size)

# %% [markdown]
# ## An encoder-decoder, recorded
#
# T5Gemma has two such stacks. The **encoder** reads the input with *bidirectional*
# attention (every token sees every other) and hands its final states to the **decoder**,
# which writes the output causally (each position sees only earlier ones) and, in every
# layer, reads the encoder's states through a third sublayer: **cross-attention**. The LM
# head on top of the decoder is the decoder's embedding table again ("tied").

# %%
t5 = T5GemmaModel.random(T5GemmaConfig(cfg, cfg), seed=0)
S = 5
src, tgt = ids[:, :S], ids[:, 2:]                     # 5 input tokens, 4 decoder tokens
rec5 = {}
t5.logits(src, tgt, record=rec5)
encoder_names = [n for n in rec5 if n.startswith("encoder.")]
decoder_names = [n for n in rec5 if n.startswith("decoder.")]
print("encoder:", ", ".join(encoder_names[:4]), "...", encoder_names[-1])
print("decoder:", ", ".join(decoder_names[:5]), "...", decoder_names[-1])
assert list(rec5) == encoder_names + decoder_names + ["logits"]       # the encoder runs first, once
assert decoder_names[1:4] == ["decoder.layers.0.self_attn", "decoder.layers.0.cross_attn", "decoder.layers.0.mlp"]
assert rec5["encoder.norm"].shape == (B, S, cfg.hidden_size)          # what cross-attention reads
assert rec5["logits"].shape == (B, tgt.shape[1], cfg.vocab_size)

# %% [markdown]
# ## The picture
#
# Left: one decoder-only layer in its residual stream. Right: the encoder-decoder, the
# encoder's output read by the cross-attention of every decoder layer. The sublayer names and
# shapes in the boxes are the recorded ones above (B = 2, T = 6, S = 5, D = 32).

# %%
def layer(ax, x, y, kinds, shape, colour):
    """A column of sandwiches: for each sublayer, pre-norm -> sublayer -> post-norm -> (+)."""
    stream = first = plots.box(ax, x - 1.1, y + 0.6, f"h {shape}", fc="0.95")
    for kind, text in kinds:
        pre = plots.box(ax, x + 0.4, y, "RMSNorm (1 + w)", fc="white")
        sub = plots.box(ax, x + 0.4, y - 0.8, text, fc=colour)
        post = plots.box(ax, x + 0.4, y - 1.6, "RMSNorm (1 + w)", fc="white")
        plus = plots.box(ax, x - 1.1, y - 1.6, f"+   {kind}", fc="0.95")
        plots.arrow(ax, stream, pre, src_at=(1, 0.5), dst_at=(0, 0.5), rad=-0.2)
        plots.arrow(ax, pre, sub)
        plots.arrow(ax, sub, post)
        plots.arrow(ax, post, plus, src_at=(0, 0.5), dst_at=(1, 0.5))
        plots.arrow(ax, stream, plus, colour="0.6")
        stream, y = plus, y - 2.3
    return first, stream, y


fig, axes = plt.subplots(1, 2, figsize=(15, 7.6), gridspec_kw={"width_ratios": [1, 1.45]})
ax = axes[0]
plots.blank(ax, (-3, 3), (-5.4, 2.2), "decoder-only Gemma 2: one layer of the residual stream")
top = plots.box(ax, -1.1, 1.6, f"ids {ids.shape} -> embed_tokens x sqrt(D)", fc="0.9")
shape = rec["embed"].shape
first, h, y = layer(ax, 0, 0.4, [("layers.i.self_attn", "causal self-attention\n(GQA, RoPE, softcap 50;\n"
                                                  "sliding window on even layers)"),
                          ("layers.i.mlp", "GeGLU MLP")], shape, "lightsteelblue")
plots.arrow(ax, top, first)
ax.text(1.4, -2.3, f"x {cfg.num_hidden_layers} layers", fontsize=11, color="0.3")
head = plots.box(ax, -1.1, y - 0.2, f"final RMSNorm -> logits = 30 tanh(h E^T / 30)  {rec['logits'].shape}\n"
                 "(E: the embedding table again: a tied head)", fc="0.9")
plots.arrow(ax, h, head)

ax = axes[1]
plots.blank(ax, (-0.5, 10.5), (-8.1, 2.2), "encoder-decoder (T5Gemma): two stacks, cross-attention between")
enc_in = plots.box(ax, 2, 1.6, f"input ids {src.shape}", fc="0.9")
dec_in = plots.box(ax, 7.5, 1.6, f"decoder ids {tgt.shape}: bos, then the target shifted right", fc="0.9")
enc = [plots.box(ax, 2, 0.4, "embed_tokens x sqrt(D)")]
dec = [plots.box(ax, 7.5, 0.4, "embed_tokens x sqrt(D)")]
for i, yy in enumerate((-1.2, -3.6)):
    enc.append(plots.box(ax, 2, yy, f"encoder.layers.{i}.self_attn\nbidirectional (all keys)", fc="lightsteelblue"))
    enc.append(plots.box(ax, 2, yy - 1.0, f"encoder.layers.{i}.mlp", fc="lightsteelblue"))
    dec.append(plots.box(ax, 7.5, yy, f"decoder.layers.{i}.self_attn\ncausal", fc="honeydew"))
    dec.append(plots.box(ax, 7.5, yy - 0.8, f"decoder.layers.{i}.cross_attn\nqueries: decoder, keys/values: encoder",
                         fc="moccasin"))
    dec.append(plots.box(ax, 7.5, yy - 1.6, f"decoder.layers.{i}.mlp", fc="honeydew"))
enc_out = plots.box(ax, 2, -6.2, f"encoder.norm {rec5['encoder.norm'].shape}: the encoder output", fc="0.9")
dec.append(plots.box(ax, 7.5, -6.6, "decoder.norm -> tied LM head -> logits "
                     f"{rec5['logits'].shape}", fc="0.9"))
for column, first in ((enc + [enc_out], enc_in), (dec, dec_in)):
    plots.arrow(ax, first, column[0])
    for a, b in zip(column, column[1:]):
        plots.arrow(ax, a, b)
for cross in (dec[2], dec[5]):
    plots.arrow(ax, enc_out, cross, colour="tab:orange", src_at=(1, 0.5), dst_at=(0, 0.5), rad=0.15, lw=1.6)
ax.text(0.0, -7.6, "every sublayer is a sandwich  h = h + post_norm(sublayer(pre_norm(h)))  as on the left;\n"
        f"{cfg.num_hidden_layers} layers in each stack here (two drawn). Boxes: the names `record` returned.",
        fontsize=9, color="0.3")
fig.tight_layout()
plots.save(fig, "00_big_picture.png")

# %% [markdown]
# ## Glossary
#
# | term | in one line | first met in |
# |---|---|---|
# | residual stream | the running sum h that every sublayer adds its (normalised) output to | 3 |
# | sandwich norm | RMSNorm before **and** after each sublayer, Gemma 2's choice | 1, 3 |
# | GQA | grouped-query attention: H query heads share K < H key/value heads, G = H / K each | 2 |
# | sliding window | a layer whose queries see only the last w keys; Gemma alternates them with full layers | 2, 7 |
# | softcap | c tanh(x / c): bounds attention scores (50) and logits (30) smoothly | 1 |
# | KV cache | the keys and values of tokens already generated, kept so each step runs only the new token | 7 |
# | adaptation | initialising an encoder-decoder from decoder-only weights (the paper's section 3.2) | 4 |
# | PrefixLM | the encoder reads a prefix of a text, the decoder continues it | 5, 6 |
# | UL2 | a mixture of denoising tasks (hidden spans, long spans, prefixes) told apart by mode tokens | 5 |
# | distillation | training the student to match a teacher's output distribution instead of (only) the true next token | 5, 6 |
# | merged attention | T5Gemma 2's decoder attends over its own keys and the encoder's in one softmax | 10 |
# | float32 island | a part of a float64 computation that silently runs in float32 | 11, 12 |
#
# ## The map: tutorials and the papers
#
# "T5Gemma" is arXiv 2504.06225, "T5Gemma 2" arXiv 2512.14856. What the tutorials reproduce
# is the *mechanism* of each part, at laptop scale and checked exactly; what they cannot
# reproduce is a result that needs billions of tokens (the last column says which is which).
#
# | # | tutorial | the paper | reproduced here |
# |---|---|---|---|
# | 0 | the big picture | T5Gemma section 3 (architecture), the abstract's claims | the dataflow of both models, from recordings |
# | 1 | Gemma 2's small pieces | the Gemma 2 blocks T5Gemma section 3 keeps (RMSNorm, GeGLU, RoPE, softcaps) | every backward checked by finite differences |
# | 2 | attention and masks | section 3: bidirectional encoder, causal decoder, cross-attention; GQA and local/global layers | each mask against its rule; the softmax Jacobian derived |
# | 3 | the decoder-only Gemma 2 | the Gemma 2 baselines; section 4's model sizes (parameter counts) | the exact published counts; the logits of transformers |
# | 4 | adaptation | section 3.2: initialisation from decoder-only weights, cross-attention copy or random, warmup | the mapping bit for bit; copy vs random trained for the same steps |
# | 5 | objectives | section 3's PrefixLM with knowledge distillation, and UL2 | alignment, the distillation gradient derived, UL2's denoisers |
# | 6 | adaptation on a laptop | the pretraining comparison of decoder-only and adapted models | the recipe end to end; *not* the paper's gains (they need ~2T tokens) |
# | 7 | generation and efficiency | the quality-efficiency trade-off: inference FLOPs of 2B, 9B, 2B-2B, 9B-2B | FLOPs from the configs; a bytes-moved model; measured latency of tiny models |
# | 8 | the online softmax and tiles | (implementation: flash-attention's tiling, not in the paper) | exact against the reference |
# | 9 | the Numba kernel | (implementation) | the kernel against the reference, property tests |
# | 10 | Gemma 3 and T5Gemma 2 | T5Gemma 2: merged attention, tied embeddings, adaptation of Gemma 3; released sizes 270M-270M, 1B-1B, 4B-4B | QK-norm and RoPE per layer type by hand; merged attention as a mixture of the two it replaces; the pure copy proved; the real 270M when cached |
# | 11 | verifying another implementation | (engineering: agreement with transformers) | the first divergence of a planted bug |
# | 12 | verifying the JAX T5Gemma | (engineering: the released JAX code) | the window rule and a float32 RoPE found |
#
# **The paper's headline results** (its abstract): under a similar inference budget the
# adapted encoder-decoders match or beat their decoder-only counterparts in pretraining and
# clearly beat them after fine-tuning: 2B-2B is about 7% better than Gemma 2 2B after
# instruction tuning, and 9B-2B beats 2B-2B by more than 3%; the adapted encoder also does
# better on SuperGLUE. These come from training on trillions of tokens: no tutorial
# reproduces them. Tutorial 6 shows the recipe recovering its teacher's loss in a few
# minutes, tutorial 7 why 9B-2B generates at about 2B's cost, and `minencdec demo` runs the
# comparison on the real Gemma 3 270M.
#
# ## Exercises
#
# **0.1 Count Gemma 2 2B by hand.** From the config fields alone, write
# `count(c)` = the number of parameters of a decoder-only Gemma 2 with config `c`: the
# embedding (V x D, which is also the tied head, counted once), per layer q/k/v/o projections
# (q and o have H Dh rows or columns, k and v K Dh), the three MLP matrices (D x F each) and
# four RMSNorm vectors of width D, and the final norm. The check applies your function to
# Gemma 2 2B and compares it with the count Google published for it, 2,614,341,888.

# %%
my_count = None               # your answer: a function (config) -> int

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_count(c):
    D, F, H, K, Dh = c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    attention = D * H * Dh + 2 * D * K * Dh + H * Dh * D
    per_layer = attention + 3 * D * F + 4 * D
    return c.vocab_size * D + c.num_hidden_layers * per_layer + D


# %%
def check_count(count):
    got = count(PRESETS["gemma2-2b"])
    assert got == 2_614_341_888, f"{got:,} is not Gemma 2 2B's 2,614,341,888 parameters"


def head_counted_twice(c):                            # the slip: an untied head of its own
    return solution_count(c) + c.vocab_size * c.hidden_size


grade("Exercise 0.1", check_count, answer=my_count, solution=solution_count, wrong=head_counted_twice)
assert num_parameters(PRESETS["gemma2-2b"]) == solution_count(PRESETS["gemma2-2b"])   # the library agrees

# %% [markdown]
# **0.2 The KV cache's size.** After reading a prompt of n tokens, a decoder-only model
# keeps, per layer, the keys **and** the values of the tokens a later query may still see:
# all n on a full-attention layer, only the last w - 1 on a sliding layer with window w
# (tutorial 7 shows why). Each is K heads x Dh numbers per token. Write
# `cache_bytes(c, n, itemsize)`. The check measures the real cache: it runs
# `generate.start` on a random model with a window of 4 and a 9-token prompt and adds up the
# bytes of the arrays it keeps.

# %%
my_cache_bytes = None         # your answer: a function (config, n, itemsize) -> int

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_cache_bytes(c, n, itemsize):
    kept = [n if c.window(i) is None else min(n, c.window(i) - 1) for i in range(c.num_hidden_layers)]
    return 2 * sum(kept) * c.num_key_value_heads * c.head_dim * itemsize


# %%
def check_cache_bytes(cache_bytes):
    c = preset("nano", num_hidden_layers=4, sliding_window=4)
    state, _ = generate.start(Gemma2Model.random(c, seed=1), rng.integers(3, c.vocab_size, (1, 9)))
    measured = sum(a.nbytes for a in state.cache.keys + state.cache.values)
    got = cache_bytes(c, 9, 4)
    assert got == measured, f"you say {got} bytes; the cache holds {measured}"


def every_key_kept(c, n, itemsize):                   # the slip: forgetting the window
    return 2 * c.num_hidden_layers * n * c.num_key_value_heads * c.head_dim * itemsize


grade("Exercise 0.2", check_cache_bytes, answer=my_cache_bytes, solution=solution_cache_bytes, wrong=every_key_kept)
print("figures:", sorted(p.name for p in plots.FIG.glob("00_*.png")))
