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
# # 3. The decoder-only Gemma 2
#
# Tutorials 1 and 2 built the pieces; here they become the whole language model,
# `minencdec.model.gemma2.Gemma2Model` (transformers' `Gemma2ForCausalLM`):
#
#     h      = E[ids] * sqrt(D)                                   embedding       (B, T, D)
#     for each layer (sliding window on even layers, full on odd):
#         h  = h + post_attn_norm(self_attn(input_norm(h)))       sandwich norms
#         h  = h + post_ffw_norm(mlp(pre_ffw_norm(h)))
#     logits = 30 tanh(final_norm(h) E^T / 30)                    tied head, softcap (B, T, V)
#
# We build a tiny model, watch its residual stream, check its gradient, train it for a few
# steps, save it as a Hugging Face checkpoint, and load that checkpoint into transformers to
# get the same logits. We end with the parameter counts of the paper's model sizes.

# %%
import inspect
import os
import sys
import tempfile
from pathlib import Path

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
from matplotlib.ticker import MaxNLocator

from minencdec.model import gemma2
from minencdec.model.config import T5GemmaConfig
from minencdec.model.presets import PRESETS, num_parameters, preset
from minencdec.model.gemma2 import Gemma2Model, init_params, shift_labels
from minencdec.model.losses import cross_entropy_forward
from minencdec.training.optim import AdamW
from minencdec.io.pretrained import load_pretrained

QUICK = os.environ.get("MINENCDEC_QUICK") == "1"     # the test suite's small sizes
FIG = Path(os.environ.get("MINENCDEC_FIGURES", HERE / "figures"))   # where the PNGs go
FIG.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## A tiny config and random parameters
#
# `preset("tiny")` is a 4-layer Gemma 2 with a 4096-token vocabulary (`"nano"` in quick
# mode). The parameters are a plain dict keyed by the Hugging Face tensor names, so saving a
# checkpoint is a copy and an optimiser step is a loop over keys. We initialise as
# transformers does (matrices normal(0, 0.02)), except that the RMSNorm offsets get random
# values instead of zeros: with w = 0 a forgotten `1 +` would go unnoticed (tutorial 1).

# %%
cfg = preset("nano" if QUICK else "tiny")
B, T = (2, 16) if QUICK else (2, 32)
params = init_params(cfg, seed=0)
for name, p in params.items():
    if p.ndim == 1:
        params[name] = rng.normal(0.0, 0.1, p.shape).astype(p.dtype)
model = Gemma2Model(cfg, params)
print(f"{cfg.num_hidden_layers} layers {cfg.layer_types}, D = {cfg.hidden_size}, "
      f"heads {cfg.num_attention_heads} (kv {cfg.num_key_value_heads}), window {cfg.sliding_window}, "
      f"V = {cfg.vocab_size}: {num_parameters(cfg):,} parameters in {len(model.params)} tensors")
for name in list(model.params)[:7]:
    print(f"  {name:45s} {model.params[name].shape}")

# %% [markdown]
# ## The forward, and the residual stream
#
# `model.logits(ids, record={})` fills the dict with every sublayer's output: `embed`, then
# for each layer the normed attention write `layers.i.self_attn`, the normed MLP write
# `layers.i.mlp` and the stream after the layer `layers.i`. The sandwich norms make the
# stream a plain **sum of writes**: h after layer L = embedding + every sublayer's z. We
# check that, then plot the size (RMS per entry) of the stream and of each write.

# %%
ids = rng.integers(3, cfg.vocab_size, size=(B, T))
rec = {}
logits = model.logits(ids, record=rec)
assert logits.shape == (B, T, cfg.vocab_size) and np.abs(logits).max() < 30   # final softcap
stream, writes, labels = [rec["embed"]], [], ["embed"]
for i in range(cfg.num_hidden_layers):
    for part in ("self_attn", "mlp"):
        writes.append(rec[f"layers.{i}.{part}"])
        stream.append(stream[-1] + writes[-1])
        labels.append(f"L{i} {'attn' if part == 'self_attn' else 'mlp'}")
    assert np.allclose(stream[-1], rec[f"layers.{i}"], atol=1e-5)   # the stream is a sum of writes
rms = lambda a: float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))   # noqa: E731
# Random writes at initialisation are nearly orthogonal, so their squares add up:
orthogonal = np.sqrt(np.cumsum([rms(stream[0]) ** 2] + [rms(z) ** 2 for z in writes]))
print("RMS of the stream:     ", " ".join(f"{rms(h):.2f}" for h in stream))
print("if writes were orthogonal:", " ".join(f"{v:.2f}" for v in orthogonal))
assert np.allclose([rms(h) for h in stream], orthogonal, rtol=0.15)

fig, ax = plt.subplots(figsize=(9, 4))
x = np.arange(len(stream))
ax.plot(x, [rms(h) for h in stream], "o-", label="residual stream h after each sublayer")
ax.plot(x, orthogonal, "k:", label="sqrt(sum of squared writes): if the writes were orthogonal")
ax.bar(x[1:], [rms(z) for z in writes], width=0.5, color="tab:orange", alpha=0.6,
       label="what each sublayer writes: post_norm(...)")
ax.set_xticks(x, labels, rotation=45, ha="right", fontsize=8)
ax.set_ylabel("RMS per entry")
ax.set_title("Gemma 2's residual stream at initialisation: each post-norm writes ~unit RMS,\n"
             "so the stream grows like sqrt(number of sublayers) from a small embedding")
ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
fig.savefig(FIG / "03_residual_stream.png", dpi=110)

# %% [markdown]
# The embedding starts at RMS 0.02 sqrt(D), but every post-norm rescales its sublayer's
# output to RMS about 1 (times 1 + w) before adding it, whatever the sublayer computed.
# (A write comes out below 1 only when the sublayer's output is so tiny that the norm's
# eps = 1e-6 matters next to mean(y^2): watch the MLP writes of the 3-layer `nano` model in
# quick mode.) Random writes are nearly orthogonal, so the stream's RMS is the square root
# of the summed squares: the dotted line.
#
# ## The backward: the forward read bottom-up
#
# The model's backward is its forward call list in reverse, each line inverting one forward
# line. Here is the library's own code (gemma2.py, and the stack's loop in stack.py):

# %%
print(inspect.getsource(gemma2.backward))

# %% [markdown]
# Two details to notice: the embedding table is used twice (input lookup and tied LM head),
# so its gradient is the sum of both uses; and in the stack every residual add sends the
# same gradient down both paths (`dh + dh_sub` in `_sandwich_backward`).
#
# We check `loss_and_grads` against finite differences of the loss, in float64, on a few
# entries of one tensor of each kind. The loss alone is the mean next-token cross-entropy
# of the logits, the labels shifted one to the left (`shift_labels`), as transformers does.

# %%
model64 = Gemma2Model(cfg, params, "float64")
loss64, grads = model64.loss_and_grads(ids, ids)       # labels = ids: predict the next token
checked = ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
           "model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.gate_proj.weight",
           "model.layers.1.post_feedforward_layernorm.weight", "model.norm.weight"]
loss_only = lambda: cross_entropy_forward(model64.logits(ids), shift_labels(ids))[0]   # noqa: E731
assert abs(loss_only() - loss64) < 1e-12
h = 1e-5
for name in checked:
    x, g = model64.params[name], grads[name]
    errs = []
    for i in map(tuple, rng.integers(0, x.shape, size=(3 if QUICK else 4, x.ndim))):
        if name == "model.embed_tokens.weight":          # pick rows of tokens that occur
            i = (int(rng.choice(ids.ravel())),) + i[1:]
        old = x[i]
        x[i] = old + h; up = loss_only()                               # noqa: E702
        x[i] = old - h; down = loss_only()                             # noqa: E702
        x[i] = old
        errs.append(abs((up - down) / (2 * h) - g[i]) / np.abs(g).max())
    print(f"  {name:50s} rel err {max(errs):.1e}")
    assert max(errs) < 1e-6

# %% [markdown]
# ## Training steps
#
# A gradient is a prediction: a small step p -> p - lr g should lower the loss by about
# lr * sum(g^2). We check that prediction with one plain SGD step, then take a few AdamW
# steps (`minencdec.training.optim.AdamW`, torch's AdamW exactly) on the same batch and watch the
# loss fall. The optimiser updates `model.params` in place.

# %%
lr = 1e-4
sq = sum(float(np.sum(g ** 2)) for g in grads.values())
stepped = Gemma2Model(cfg, {n: p - lr * grads[n] for n, p in model64.params.items()}, "float64")
actual = loss64 - stepped.loss_and_grads(ids, ids)[0]
print(f"SGD step: loss fell by {actual:.5f}, predicted lr * |g|^2 = {lr * sq:.5f}")
assert actual > 0 and abs(actual - lr * sq) < 0.1 * lr * sq

opt = AdamW(model.params, lr=3e-3)
losses = []
for step in range(8 if QUICK else 20):
    loss, grads32 = model.loss_and_grads(ids, ids)
    opt.step(grads32)
    losses.append(float(loss))
print("AdamW losses:", " ".join(f"{v:.2f}" for v in losses))
assert losses[-1] < losses[0] - 0.5

fig, ax = plt.subplots(figsize=(6, 3.6))
ax.plot(losses, "o-")
ax.axhline(np.log(cfg.vocab_size), color="0.6", ls="--", label=f"ln V = {np.log(cfg.vocab_size):.2f} (uniform guess)")
ax.set_xlabel("AdamW step"); ax.set_ylabel("cross-entropy")                # noqa: E702
ax.xaxis.set_major_locator(MaxNLocator(integer=True))
ax.set_title("memorising one batch: the hand-written gradient trains")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIG / "03_training_loss.png", dpi=110)

# %% [markdown]
# ## A Hugging Face checkpoint, in and out
#
# `save_pretrained` writes `config.json` and `model.safetensors`, the format of the released
# Gemma 2 checkpoints; `load_pretrained` reads it back (checking every name and shape
# first). The round trip must be exact. Then, if transformers is installed, its own
# `Gemma2ForCausalLM.from_pretrained` loads the very same directory, and its logits must
# match ours in float32 to 1e-4 of the largest logit.

# %%
tmp = Path(tempfile.mkdtemp())
model.save_pretrained(tmp / "gemma2-tiny")
print("wrote", sorted(f.name for f in (tmp / "gemma2-tiny").iterdir()))
reloaded = load_pretrained(tmp / "gemma2-tiny")
ours = model.logits(ids)
assert np.array_equal(reloaded.logits(ids), ours)
print("load_pretrained: logits identical, bit for bit")

try:
    import torch
    from transformers import Gemma2ForCausalLM
except ImportError:
    print("note: torch/transformers not installed, skipping the transformers comparison")
else:
    hf = Gemma2ForCausalLM.from_pretrained(tmp / "gemma2-tiny", dtype=torch.float32,
                                           attn_implementation="eager").eval()
    with torch.no_grad():
        out = hf(torch.from_numpy(ids), labels=torch.from_numpy(ids))
    theirs = out.logits.numpy()
    err = np.abs(theirs - ours).max() / np.abs(ours).max()
    our_loss = model.loss_and_grads(ids, ids)[0]
    print(f"transformers Gemma2ForCausalLM: max rel logit diff {err:.1e}, "
          f"loss {out.loss.item():.6f} vs ours {our_loss:.6f}")
    assert err < 1e-4 and abs(out.loss.item() - our_loss) < 1e-4

# %% [markdown]
# ## The paper's model sizes
#
# The same config class describes the real models. `num_parameters` counts every tensor
# once (the LM head is tied to the embedding); an encoder-decoder pair is a `T5GemmaConfig`
# whose decoder layers also carry cross-attention. These must reproduce the paper's counts
# exactly (the T5Gemma paper, arXiv 2504.06225, section 4); a wrong head count or a missing norm would not.

# %%
paper = {"S-S": ("small", "small", 312_517_632), "B-B": ("base", "base", 591_490_560),
         "L-L": ("large", "large", 1_241_761_792), "XL-XL": ("xl", "xl", 3_766_980_608),
         "2B-2B": ("gemma2-2b", "gemma2-2b", 5_596_853_760),
         "9B-2B": ("gemma2-9b", "gemma2-2b", 12_292_375_296)}
print(f"{'model':8s} {'layers':>6s} {'d_model':>7s} {'heads':>5s} {'kv':>3s} {'parameters':>15s}")
two_b = PRESETS["gemma2-2b"]
assert num_parameters(two_b) == 2_614_341_888
print(f"{'2B (dec)':8s} {two_b.num_hidden_layers:6d} {two_b.hidden_size:7d} "
      f"{two_b.num_attention_heads:5d} {two_b.num_key_value_heads:3d} {num_parameters(two_b):15,d}")
for pair, (enc, dec, want) in paper.items():
    c = PRESETS[dec]
    got = num_parameters(T5GemmaConfig(PRESETS[enc], PRESETS[dec]))
    print(f"{pair:8s} {c.num_hidden_layers:6d} {c.hidden_size:7d} {c.num_attention_heads:5d} "
          f"{c.num_key_value_heads:3d} {got:15,d}")
    assert got == want, (pair, got, want)
print("all counts match the paper's (arXiv 2504.06225, section 4)")
print("figures:", sorted(f.name for f in FIG.glob("03_*.png")))
