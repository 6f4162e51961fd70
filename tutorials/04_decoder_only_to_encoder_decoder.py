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
# # 4. From decoder-only to encoder-decoder: adaptation
#
# The paper's idea (T5Gemma, section 3.2): do not pretrain an encoder-decoder from scratch;
# **copy a pretrained decoder-only Gemma 2 into both halves** and continue training.
#
# | target | initialised from |
# |---|---|
# | encoder: every layer, embedding, final norm | the decoder-only model (the *large* one of an unbalanced pair) |
# | decoder: self-attention, MLP, norms, embedding | the decoder-only model (the *small* one) |
# | decoder cross-attention, balanced pair (2B-2B) | a copy of the same layer's self-attention |
# | decoder cross-attention, unbalanced pair (9B-2B) | random, then trained alone first ("warmup") |
#
# The encoder runs the copied layers with a bidirectional mask; the decoder keeps its causal
# mask and gains a cross-attention sublayer reading the encoder's output. Here we draw the
# mapping from the library's own output, prove it right to the last bit, measure what the
# new cross-attention does to the decoder at step 0, and run a few warmup steps.

# %%
import os
import re
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

from minencdec.model.adapt import adapt_params
from minencdec.model.presets import preset
from minencdec.model.gemma2 import Gemma2Model, init_params
from minencdec.model.losses import cross_entropy_forward
from minencdec.training.optim import AdamW, FreezeSchedule
from minencdec.io.pretrained import adapt_checkpoints, load_pretrained
from minencdec.model.t5gemma import T5GemmaModel, cross_attention_names, shift_right

QUICK = os.environ.get("MINENCDEC_QUICK") == "1"     # the test suite's small sizes
FIG = Path(os.environ.get("MINENCDEC_FIGURES", HERE / "figures"))   # where the PNGs go
FIG.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## Two small "pretrained" decoder-only models
#
# A small Gemma 2 and a wider one with the same vocabulary (the 9B-2B story in miniature).
# We give them random, non-zero norm offsets and train each for a few AdamW steps as a
# language model on a fixed batch, so that they make confident predictions that the
# adaptation could spoil.

# %%
small_cfg = preset("nano", num_hidden_layers=3 if QUICK else 6)
large_cfg = small_cfg.replace(hidden_size=64, intermediate_size=128)
B, T = 4, 24
data = rng.integers(3, small_cfg.vocab_size, size=(B, T))


def pretrained(cfg, seed, steps=15 if QUICK else 40):
    params = init_params(cfg, seed=seed)
    for name, p in params.items():
        if p.ndim == 1:
            params[name] = rng.normal(0.0, 0.1, p.shape).astype(p.dtype)
    model = Gemma2Model(cfg, params)
    opt = AdamW(model.params, lr=3e-3)
    for _ in range(steps):
        loss, grads = model.loss_and_grads(data, data)
        opt.step(grads)
    print(f"  D = {cfg.hidden_size}, {cfg.num_hidden_layers} layers: LM loss {loss:.2f}")
    return model


small, large = pretrained(small_cfg, seed=1), pretrained(large_cfg, seed=2)

# %% [markdown]
# ## What adaptation copies where
#
# `adapt_params(encoder_params, encoder_config, decoder_params, decoder_config, cross_attn)`
# returns the T5Gemma config and parameter dict. It copies nothing: each target entry *is*
# the source array (adapting a 2B model needs no second 10 GB). That lets us read the
# mapping back by object identity, and draw it: every line below comes from `is`, not from a
# hand-made table. We also check that layer N always comes from layer N.

# %%
ORDER = ["embed_tokens", "input_layernorm", "pre_self_attn_layernorm", "self_attn.{q,k,v,o}_proj",
         "post_attention_layernorm", "post_self_attn_layernorm", "pre_cross_attn_layernorm",
         "cross_attn.{q,k,v,o}_proj", "post_cross_attn_layernorm", "pre_feedforward_layernorm",
         "mlp.{gate,up,down}_proj", "post_feedforward_layernorm", "norm"]


def group(name):
    """'model.decoder.layers.3.self_attn.q_proj.weight' -> ('decoder', 3, 'self_attn.{q,k,v,o}_proj')."""
    side = re.match(r"model\.(encoder|decoder)\.", name)
    layer = re.search(r"layers\.(\d+)\.", name)
    part = re.sub(r"^model\.((en|de)coder\.)?(layers\.\d+\.)?|\.weight$", "", name)
    part = re.sub(r"\.[qkvo]_proj$", ".{q,k,v,o}_proj", re.sub(r"\.(gate|up|down)_proj$", ".{gate,up,down}_proj", part))
    return side.group(1) if side else "source", int(layer.group(1)) if layer else None, part


def mapping(sources, adapted):
    """{(target side, target part): (source label, source part) or "random"}, found by identity."""
    edges = {}
    for name, array in adapted.items():
        side, layer, part = group(name)
        found = [(label, s) for label, src in sources.items() for s, a in src.items() if a is array]
        assert len(found) <= 1, (name, found)
        if found:
            assert group(found[0][1])[1] == layer, (name, found)            # layer N <- layer N
        edge = (found[0][0], group(found[0][1])[2]) if found else "random"
        assert edges.setdefault((side, part), edge) == edge, name          # the same in every layer
    return edges


cfg_b, balanced, _ = adapt_params(small.params, small_cfg, small.params, small_cfg, cross_attn="copy")
cfg_u, unbalanced, mode = adapt_params(large.params, large_cfg, small.params, small_cfg)   # "auto"
print("unbalanced pair: cross_attn='auto' resolves to", repr(mode))
assert mode == "random"
try:
    adapt_params(large.params, large_cfg, small.params, small_cfg, cross_attn="copy")
    raise AssertionError("copy must be refused for unequal widths")
except ValueError as e:
    print("cross_attn='copy' on the unbalanced pair is refused:", str(e)[:80], "...")
maps = {"balanced pair (2B-2B style): cross-attention copied":
        mapping({"Gemma 2": small.params}, balanced),
        "unbalanced pair (9B-2B style): cross-attention random":
        mapping({"large Gemma 2": large.params, "small Gemma 2": small.params}, unbalanced)}
b, u = maps.values()
assert b[("decoder", "cross_attn.{q,k,v,o}_proj")] == ("Gemma 2", "self_attn.{q,k,v,o}_proj")
assert all(edge[0] == ("large Gemma 2" if side == "encoder" else "small Gemma 2")
           for (side, part), edge in u.items() if edge != "random")
assert {part for (side, part), edge in u.items() if edge == "random"} == \
    {"pre_cross_attn_layernorm", "cross_attn.{q,k,v,o}_proj", "post_cross_attn_layernorm"}

# %%
COLOURS = {"encoder": "tab:blue", "decoder": "tab:green"}
fig, axes = plt.subplots(1, 2, figsize=(15, 8.2))
for ax, (title, edges) in zip(axes, maps.items()):
    ys, y = {}, 0.0                                      # ("t" or "s", block, part) -> height
    for side in COLOURS:                                 # target blocks: encoder on top, decoder below
        ax.text(1.0, y + 0.9, f"T5Gemma {side}: model.{side}.layers.N.*", fontsize=10, weight="bold")
        ys[("top", side)] = y
        for part in sorted({p for sd, p in edges if sd == side}, key=ORDER.index):
            ys[("t", side, part)], y = y, y - 1
        y -= 1.6
    labels = sorted({e[0] for e in edges.values() if e != "random"})
    for k, label in enumerate(labels):                   # source blocks: centred, or one per target
        parts = sorted({e[1] for e in edges.values() if e != "random" and e[0] == label}, key=ORDER.index)
        top = ys[("top", "decoder" if k else "encoder")] if len(labels) > 1 else (y + len(parts)) / 2
        ax.text(0.0, top + 0.9, f"{label}: model.layers.N.*", fontsize=10, weight="bold")
        for j, part in enumerate(parts):
            ys[("s", label, part)] = top - j
    boxes = {}
    for key, yy in ys.items():
        if key[0] == "top":
            continue
        kind, block, part = key
        random_init = kind == "t" and edges[(block, part)] == "random"
        boxes[key] = ax.text(1.0 if kind == "t" else 0.0, yy, part, va="center", fontsize=9,
                             family="monospace", bbox=dict(boxstyle="round,pad=0.25",
                             fc="mistyrose" if random_init else "white", ec="tab:red" if random_init else "0.5"))
    ax.set_xlim(-0.05, 1.5)
    ax.set_ylim(y + 1, 2)
    ax.axis("off")
    ax.set_title(title, fontsize=12)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.canvas.draw()                                    # now the boxes have sizes: arrows edge to edge
    to_data = ax.transData.inverted()
    edge = {k: to_data.transform(t.get_window_extent().get_points())[:, 0] for k, t in boxes.items()}
    tail = max(e[1] for k, e in edge.items() if k[0] == "s") + 0.02   # arrows leave from one column
    for k in (k for k in boxes if k[0] == "s"):
        ax.plot([edge[k][1] + 0.005, tail], [ys[k], ys[k]], ":", color="0.6", lw=1)
    for (kind, block, part) in (k for k in boxes if k[0] == "t"):
        yy = ys[(kind, block, part)]
        if edges[(block, part)] == "random":
            ax.text(edge[(kind, block, part)][1] + 0.03, yy, "random N(0, 0.02),\nnorm offsets 0",
                    va="center", fontsize=7.5, color="tab:red")
            continue
        src = ("s", *edges[(block, part)])
        colour = "tab:orange" if "cross" in part else COLOURS[block]
        ax.annotate("", xy=(edge[(kind, block, part)][0] - 0.01, yy), xytext=(tail, ys[src]),
                    arrowprops=dict(arrowstyle="->", color=colour, lw=1.2, alpha=0.8))
fig.text(0.5, 0.015, "blue: copied into the encoder   green: into the decoder   orange: self-attention "
         "copied into cross-attention   (every arrow found by `is` on the arrays adapt_params returned)",
         ha="center", fontsize=9)
fig.savefig(FIG / "04_adaptation_map.png", dpi=100)

# %% [markdown]
# ## Proof that the mapping is right
#
# Switch the cross-attention sublayers off (`cross_attention=False`) and feed the decoder
# the same tokens. What remains is the source's embedding, layers, masks (causal, sliding
# on even layers, positions from 0), final norm and tied head: the **same floating-point
# operations in the same order**, so the logits must be equal bit for bit, not merely close.
# With cross-attention on, they differ (the negative control).

# %%
for pairing, cfg, params in (("balanced", cfg_b, balanced), ("unbalanced", cfg_u, unbalanced)):
    model = T5GemmaModel(cfg, params)
    assert np.array_equal(model.logits(data, data, cross_attention=False), small.logits(data)), pairing
    assert not np.allclose(model.logits(data, data), small.logits(data))
    print(f"{pairing:10s}: decoder without cross-attention == the decoder-only source, bit for bit")

# %% [markdown]
# `adapt_checkpoints` does the same from Hugging Face directories (it is what the
# `minencdec adapt` command runs); the file route must give the same tensors.

# %%
tmp = Path(tempfile.mkdtemp())
small.save_pretrained(tmp / "small")
large.save_pretrained(tmp / "large")
_, mode = adapt_checkpoints(tmp / "large", tmp / "small", tmp / "t5gemma")
on_disk = load_pretrained(tmp / "t5gemma")
assert mode == "random" and all(np.array_equal(on_disk.params[n], unbalanced[n]) for n in unbalanced)
print("adapt_checkpoints -> load_pretrained: every tensor equal to adapt_params' output")

# %% [markdown]
# ## What the new cross-attention does at step 0
#
# From here on the task is sequence to sequence: the encoder reads the first half of each
# sequence and the decoder predicts the second half (PrefixLM). Every sublayer write is
# post-normed, and the post-norm rescales it to RMS ~1 whatever the weights' scale, so a
# cross-attention sublayer, copied or random, adds an O(1) vector to every decoder layer
# from the first step. We measure both initialisations on the balanced pair: the size of
# each cross-attention write next to the residual stream it lands in, and the loss.

# %%
src_ids, tgt_ids = data[:, : T // 2], data[:, T // 2:]
dec_in = shift_right(tgt_ids, small_cfg.bos_token_id, small_cfg.pad_token_id)   # [bos, tgt[:-1]]
rms = lambda a: float(np.sqrt(np.mean(a.astype(np.float64) ** 2)))              # noqa: E731


def seq2seq_loss(model, cross_attention=True):
    logits = model.logits(src_ids, dec_in, cross_attention=cross_attention)
    return float(cross_entropy_forward(logits, tgt_ids)[0])


writes, losses = {}, {}
for init in ("copy", "random"):
    cfg, params, _ = adapt_params(small.params, small_cfg, small.params, small_cfg, cross_attn=init)
    model = T5GemmaModel(cfg, params)
    rec = {}
    model.logits(src_ids, dec_in, record=rec)
    layers = range(small_cfg.num_hidden_layers)
    writes[init] = [rms(rec[f"decoder.layers.{i}.cross_attn"]) for i in layers]
    stream = [rms(rec[f"decoder.layers.{i}"] - rec[f"decoder.layers.{i}.cross_attn"]) for i in layers]
    losses[init] = seq2seq_loss(model)
    assert abs(losses[init] - model.loss_and_grads(src_ids, tgt_ids)[0]) < 1e-5   # the model's own loss
    print(f"cross-attention {init:6s}: RMS of its write per layer {np.round(writes[init], 2)}, "
          f"loss {losses[init]:.2f}")
losses["off"] = seq2seq_loss(model, cross_attention=False)
print(f"without cross-attention (the source decoder alone): loss {losses['off']:.2f}")
assert min(writes["copy"] + writes["random"]) > 0.5                 # O(1) in every layer
assert losses["random"] > losses["off"] and losses["copy"] > losses["off"]

fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [1.3, 1]})
axes[0].plot(stream, "s--", color="0.5", label="the residual stream it lands in")
for init, colour in (("copy", "tab:orange"), ("random", "tab:red")):
    axes[0].plot(writes[init], "o-", color=colour, label=f"cross-attention write, {init} init")
axes[0].set_xticks(list(layers))
axes[0].set_ylim(0, None)
axes[0].set_xlabel("decoder layer"); axes[0].set_ylabel("RMS per entry")  # noqa: E702
axes[0].set_title("at step 0, cross-attention (copied or random) adds\na unit-RMS vector to every decoder layer")
axes[0].legend(fontsize=8, loc="upper left")
names = ["decoder alone\n(= source)", "+ copied\ncross-attn", "+ random\ncross-attn"]
bars = axes[1].bar(names, [losses["off"], losses["copy"], losses["random"]],
                   color=["tab:green", "tab:orange", "tab:red"])
axes[1].bar_label(bars, fmt="%.2f")
axes[1].axhline(np.log(small_cfg.vocab_size), color="0.5", ls="--")
axes[1].text(2.4, np.log(small_cfg.vocab_size) + 0.12, "ln V: a uniform guess", ha="right", fontsize=8, color="0.4")
axes[1].set_ylim(0, np.log(small_cfg.vocab_size) + 0.8)
axes[1].set_ylabel("target cross-entropy")
axes[1].set_title("the decoder's loss at step 0")
fig.tight_layout()
fig.savefig(FIG / "04_cross_attention_at_init.png", dpi=110)

# %% [markdown]
# So neither initialisation is harmless at step 0: both raise the loss (in the default run,
# by about the same amount). Copying is not a no-op; its merit is a starting
# point that already knows how to read this model's representations, which later training
# builds on. For an unbalanced pair there is nothing to copy (the widths differ), so the
# cross-attention starts random, and the paper protects the pretrained weights from it.
#
# ## Cross-attention warmup
#
# For the unbalanced pair the paper trains **only** the new cross-attention for the first
# K steps (K = 1000 for 9B-2B), everything else frozen, so the pretrained weights are not
# pushed around by gradients that flow through random cross-attention. In minencdec that is
# `AdamW(params, trainable=FreezeSchedule(cross_attention_names(config), K))`: frozen
# tensors get no update, no weight decay, no optimiser state; after K steps all train.
#
# One practical point first. `adapt_params` shares arrays with its sources, and in a
# balanced copy the cross-attention *is* the self-attention array. The optimiser updates in
# place, so we give the model its own copies before training it.

# %%
model = T5GemmaModel(cfg_u, {name: array.copy() for name, array in unbalanced.items()})
warm = cross_attention_names(cfg_u)
K = 15 if QUICK else 30
opt = AdamW(model.params, lr=1e-2, trainable=FreezeSchedule(warm, steps=K))
frozen_before = {n: p.copy() for n, p in model.params.items() if n not in warm}
cross_before = {n: model.params[n].copy() for n in warm}
print(f"training {len(opt.trainable_names())} of {len(model.params)} tensors:", warm[:3], "...")
warmup = []
for step in range(K):
    loss, grads = model.loss_and_grads(src_ids, tgt_ids)
    opt.step(grads)
    warmup.append(float(loss))
warmup.append(float(model.loss_and_grads(src_ids, tgt_ids)[0]))
print("warmup losses:", " ".join(f"{v:.2f}" for v in warmup))
small_off = seq2seq_loss(T5GemmaModel(cfg_u, unbalanced), cross_attention=False)
assert warmup[-1] < warmup[0] - 0.3 and warmup[-1] < small_off     # better than the decoder alone
assert all(np.array_equal(model.params[n], p) for n, p in frozen_before.items())   # untouched
assert all(not np.array_equal(model.params[n], p) for n, p in cross_before.items() if p.ndim == 2)
print(f"frozen tensors unchanged, bit for bit; after step {K} the schedule trains "
      f"{len(opt.trainable_names())} of {len(model.params)}")
assert len(opt.trainable_names()) == len(model.params)

fig, ax = plt.subplots(figsize=(7, 3.8))
ax.plot(warmup, "o-", color="tab:red", label="unbalanced pair, only cross-attention trains")
ax.axhline(small_off, color="tab:green", ls="--", label="small decoder alone (no cross-attention)")
ax.set_xlabel("warmup step"); ax.set_ylabel("target cross-entropy")         # noqa: E702
ax.xaxis.set_major_locator(MaxNLocator(integer=True))
ax.set_title("cross-attention warmup on one batch: the decoder learns to read\n"
             "the encoder while every pretrained weight stays frozen")
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(FIG / "04_warmup.png", dpi=110)
print("figures:", sorted(f.name for f in FIG.glob("04_*.png")))
