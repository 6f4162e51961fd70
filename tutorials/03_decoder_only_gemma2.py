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

import numpy as np

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
try:
    import minencdec  # noqa: F401
except ImportError:                      # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
import plots                             # tutorials/plots.py: matplotlib set up, figures to plots.FIG
import matplotlib.pyplot as plt
from exercises import grade
from matplotlib.ticker import MaxNLocator

from minencdec.model import gemma2, stack
from minencdec.model.config import T5GemmaConfig
from minencdec.model.presets import PRESETS, num_parameters, preset
from minencdec.model.gemma2 import Gemma2Model, init_params, shift_labels
from minencdec.model.losses import cross_entropy_forward, log_softmax
from minencdec.training.optim import AdamW
from minencdec.io.pretrained import load_pretrained

QUICK = os.environ.get("MINENCDEC_QUICK") == "1"     # the test suite's small sizes
rng = np.random.default_rng(0)

# %% [markdown]
# ## A tiny config and random parameters
#
# `preset("tiny")` is a 4-layer Gemma 2 with a 4096-token vocabulary (`"nano"` in quick
# mode). Its sliding window is set to 8, shorter than the sequences below, so the sliding
# layers really slide in every check (a window longer than the text would make them full
# layers, and a bug in the window could not show). The parameters are a plain dict keyed by the Hugging Face tensor names, so saving a
# checkpoint is a copy and an optimiser step is a loop over keys. We initialise as
# transformers does (matrices normal(0, 0.02)), except that the RMSNorm offsets get random
# values instead of zeros: with w = 0 a forgotten `1 +` would go unnoticed (tutorial 1).

# %%
cfg = preset("nano" if QUICK else "tiny", sliding_window=8)
B, T = (2, 16) if QUICK else (2, 32)
assert T > cfg.sliding_window
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
# `layers.i.mlp` and the stream after the layer `layers.i`. Like any residual network's, the
# stream is a plain **sum of writes**: h after layer L = embedding + every sublayer's z
# (that is what `h = h + z` means, with or without norms). What Gemma's *sandwich* adds is
# the post-norm on each write: whatever the sublayer computed, what it adds has RMS about
# |1 + w|. We check the sum, then plot the size (RMS per entry) of the stream and each write.

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
plots.save(fig, "03_residual_stream.png")

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
# line. We derive the top of it by hand, then read the library's own code for the rest.
#
# **The head, derived.** For one position with final hidden state h (after the final norm),
# the forward is z = E h (the tied head: E is the embedding table, V x D), l = 30 tanh(z / 30)
# (the final softcap) and the loss -log softmax(l)[y] = logsumexp(l) - l_y, averaged over the
# N labelled positions. Going down:
#
# 1. d/dl_v of logsumexp(l) - l_y is e^{l_v} / sum e^{l} - [v = y]: **dl = (softmax(l) -
#    onehot(y)) / N** (the softmax Jacobian of tutorial 2 collapses, because the upstream
#    gradient of log p_y is onehot(y) / p_y).
# 2. l = 30 tanh(z / 30) gives **dz = dl (1 - tanh^2(z / 30)) = dl (1 - (l / 30)^2)**: the
#    cap's derivative, computed from the capped logits themselves.
# 3. z = E h gives **dh = E^T dz** (down into the stack) and **dE_head = dz h^T**, summed over
#    positions.
# 4. E is also the input table: the lookup h_0 = E[ids] sqrt(D) adds sqrt(D) times the
#    gradient of each embedded position to its row. **dE = dE_head + dE_lookup.**
#
# We compute steps 1-3 by hand from the recorded final hidden states and check them against
# finite differences of the loss and against the library's `lm_head_backward`. At
# initialisation the logits are tiny and the cap is nearly the identity, which would let a
# forgotten step 2 pass; so we first scale the hidden states up until the largest pre-cap
# logit is 60, well into the cap's bend.

# %%
model64 = Gemma2Model(cfg, params, "float64")
rec64 = {}
model64.logits(ids, record=rec64)
E = model64.params["model.embed_tokens.weight"]                          # (V, D)
h_fin = rec64["norm"] * (60 / np.abs(rec64["norm"] @ E.T).max())         # (B, T, D)
y = shift_labels(ids)                                                     # (B, T), -100 at the end
valid = y != -100
N = int(valid.sum())


def head_loss(z):
    """The loss from the pre-cap logits z: softcap, then mean cross-entropy of y."""
    return cross_entropy_forward(30.0 * np.tanh(z / 30.0), y)[0]


z = h_fin @ E.T                                                           # (B, T, V)
ell = 30.0 * np.tanh(z / 30.0)
assert np.abs(ell).max() > 15                                             # the cap bends here
onehot = np.zeros_like(z)
onehot[valid] = np.eye(cfg.vocab_size)[y[valid]]
dl = (np.exp(log_softmax(ell)) - onehot) * valid[..., None] / N           # step 1
dz = dl * (1.0 - (ell / 30.0) ** 2)                                       # step 2
dh_hand, dE_head = dz @ E, np.einsum("btv,btd->vd", dz, h_fin)            # step 3
errs = []
for i in map(tuple, rng.integers(0, z.shape, size=(8, 3))):
    zp, zm = z.copy(), z.copy()
    zp[i] += 1e-5
    zm[i] -= 1e-5
    errs.append(abs((head_loss(zp) - head_loss(zm)) / 2e-5 - dz[i]) / np.abs(dz).max())
_, head_cache = stack.lm_head_forward(h_fin, E, cfg.final_logit_softcapping)
dh_lib, dE_lib = stack.lm_head_backward(dl, head_cache)
print(f"dz by hand vs finite differences: rel err {max(errs):.1e}; dh, dE_head == lm_head_backward: "
      f"{np.abs(dh_hand - dh_lib).max():.1e}, {np.abs(dE_head - dE_lib).max():.1e}")
assert max(errs) < 1e-6 and np.allclose(dh_hand, dh_lib, rtol=0, atol=1e-14)
assert np.allclose(dE_head, dE_lib, rtol=0, atol=1e-14)

# %% [markdown]
# **The rest is the library's code.** `gemma2.backward` inverts the head and then the stack:

# %%
print(inspect.getsource(gemma2.backward))
print(inspect.getsource(gemma2._backward_below_head))

# %% [markdown]
# and the stack's backward is its layer loop run in reverse: the final norm, then for each
# layer from the last to the first, the MLP sandwich and the attention sandwich, then the
# embedding. Each sandwich is inverted by `_sandwich_backward`, three lines for its three
# forward lines and one for the residual add, which fans the same gradient dh out to both
# paths: the stream itself (`dh`) and the sublayer (`dh_sub`), summed.

# %%
print(inspect.getsource(stack._sandwich_backward))
print(inspect.getsource(stack.stack_backward))

# %% [markdown]

# We check `loss_and_grads` against finite differences of the loss, in float64, on a few
# entries of one tensor of each kind. The loss alone is the mean next-token cross-entropy
# of the logits, the labels shifted one to the left (`shift_labels`), as transformers does.

# %%
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
# steps (`minencdec.training.optim.AdamW`, the update rule of `torch.optim.AdamW`: checked
# against torch below when it is installed, and in `tests/training/test_optim.py`) on the
# same batch and watch the loss fall. The optimiser updates `model.params` in place.

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

try:
    import torch
except ImportError:
    print("note: torch not installed; tests/training/test_optim.py holds AdamW to torch's")
else:                                              # five steps of each on the same gradients
    w0 = rng.normal(size=(4, 3))
    ours, theirs = {"w": w0.copy()}, torch.tensor(w0.copy(), requires_grad=True)
    ours_opt = AdamW(ours, lr=1e-2, weight_decay=0.1, no_decay=lambda name, p: False)
    torch_opt = torch.optim.AdamW([theirs], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        grad = rng.normal(size=(4, 3))
        ours_opt.step({"w": grad})
        theirs.grad = torch.tensor(grad)
        torch_opt.step()
    gap = np.abs(ours["w"] - theirs.detach().numpy()).max()
    print(f"AdamW vs torch.optim.AdamW after 5 steps (float64, weight decay 0.1): max diff {gap:.1e}")
    assert gap < 1e-12

fig, ax = plt.subplots(figsize=(6, 3.6))
ax.plot(losses, "o-")
ax.axhline(np.log(cfg.vocab_size), color="0.6", ls="--", label=f"ln V = {np.log(cfg.vocab_size):.2f} (uniform guess)")
ax.set_xlabel("AdamW step"); ax.set_ylabel("cross-entropy")                # noqa: E702
ax.xaxis.set_major_locator(MaxNLocator(integer=True))
ax.set_title("memorising one batch: the hand-written gradient trains")
ax.legend(fontsize=8)
fig.tight_layout()
plots.save(fig, "03_training_loss.png")

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
def dims(c):
    return f"{c.num_hidden_layers:2d} x {c.hidden_size:4d}, {c.num_attention_heads:2d}/{c.num_key_value_heads:2d} heads"


print(f"{'model':8s} {'encoder: layers x d_model, q/kv heads':>38s} {'decoder':>26s} {'parameters':>15s}")
two_b = PRESETS["gemma2-2b"]
assert num_parameters(two_b) == 2_614_341_888
print(f"{'2B':8s} {'(decoder-only)':>38s} {dims(two_b):>26s} {num_parameters(two_b):15,d}")
for pair, (enc, dec, want) in paper.items():
    got = num_parameters(T5GemmaConfig(PRESETS[enc], PRESETS[dec]))
    print(f"{pair:8s} {dims(PRESETS[enc]):>38s} {dims(PRESETS[dec]):>26s} {got:15,d}")
    assert got == want, (pair, got, want)
assert "42 x 3584" in dims(PRESETS[paper["9B-2B"][0]]) and "26 x 2304" in dims(PRESETS[paper["9B-2B"][1]])
print("all counts match the paper's (arXiv 2504.06225, section 4)")

# %% [markdown]
# ## Exercises
#
# **3.1 The head's gradient.** Write `head_dz(ell, y)`: the gradient of the mean
# cross-entropy with respect to the *pre-cap* logits z, given the capped logits
# ell = 30 tanh(z / 30) (B, T, V) and the targets y (B, T, -100 = not scored). The check is
# finite differences of the loss in z on the recorded model above. The slip it must reject:
# forgetting the softcap's factor (the gradient with respect to ell instead).

# %%
my_head_dz = None             # your answer: a function (ell, y) -> dz

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_head_dz(ell, y):
    keep = y != -100
    p = np.exp(ell - ell.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    p[keep, y[keep]] -= 1.0
    return p * keep[..., None] / keep.sum() * (1.0 - (ell / 30.0) ** 2)


# %%
def check_head_dz(head_dz):
    got = head_dz(ell, y)
    bent = np.argsort(-np.abs(ell), axis=None)[:6]                     # where the cap bends most
    for i in zip(*np.unravel_index(bent, z.shape)):
        zp, zm = z.copy(), z.copy()
        zp[i] += 1e-5
        zm[i] -= 1e-5
        fd = (head_loss(zp) - head_loss(zm)) / 2e-5
        assert abs(fd - got[i]) < 1e-6 * np.abs(got).max() + 1e-12, (i, fd, got[i])


grade("Exercise 3.1", check_head_dz, answer=my_head_dz, solution=solution_head_dz,
      wrong=lambda ell, y: solution_head_dz(ell, y) / (1.0 - (ell / 30.0) ** 2))

# %% [markdown]
# **3.2 Where does the window start to matter?** With a sliding window w, at which position
# i (0-based) does a query first see fewer keys than with full attention? Give the answer as
# a function of w. The check runs the model above with its window and with every layer
# full, and finds the first position whose logits differ; `w - 1`, the off-by-one of reading
# "window w" as "w keys before it", must fail.

# %%
my_first_position = None      # your answer: a function (w) -> int

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_first_position(w):
    return w                  # query i sees keys i - w + 1 .. i: key 0 drops out at i = w


# %%
def check_first_position(first_position):
    windowed = model64.logits(ids)
    full = Gemma2Model(cfg.replace(layer_types=("full_attention",) * cfg.num_hidden_layers),
                       model64.params, "float64").logits(ids)
    differs = np.abs(windowed - full).max(axis=(0, 2)) > 1e-12              # per position
    assert first_position(cfg.sliding_window) == int(np.argmax(differs)), int(np.argmax(differs))


grade("Exercise 3.2", check_first_position, answer=my_first_position, solution=solution_first_position,
      wrong=lambda w: w - 1)
print("figures:", sorted(f.name for f in plots.FIG.glob("03_*.png")))
