"""`minencdec demo --tiny`: the whole recipe in miniature, from scratch, on real text.

    minencdec demo --tiny [--out runs/demo-tiny] [--quick]

1. pretrain  a tiny Gemma 2 decoder-only model on Shakespeare (causal LM)
2. adapt     it into a balanced encoder-decoder (cross-attention copied from self-attention)
3. train     the encoder-decoder with PrefixLM + distillation from the decoder-only model
4. compare   on held-out text: each model reads the first half of a row and continues it;
             the per-token loss of both on the second half; a few continuations side by side

Everything lands in one run directory: pretrain/ and train/ (checkpoints, metrics.jsonl,
loss.png), adapted/ (the adapted checkpoint before training), demo.png (both curves and the
held-out comparison), summary.json (losses, times, tokens/s) and samples.txt.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from minencdec.io.pretrained import adapt_checkpoints, load_pretrained
from minencdec.model.losses import cross_entropy_forward
from minencdec.training.rundir import locked
from minencdec.training.tasks import Seq2SeqTask
from minencdec.training.train import evaluate

from . import train as commands


def suffix_loss_decoder_only(model, rows):
    """Mean loss of the decoder-only model on the second half of each row, given the first:
    the same tokens, with the same context, the encoder-decoder is scored on."""
    k = rows.shape[1] // 2
    logits = model.logits(rows)                                   # (B, L, V)
    loss, _ = cross_entropy_forward(logits[:, k - 1:-1], rows[:, k:])
    return float(loss)


def samples(decoder_only, enc_dec, tok, rows, new_tokens, seed):
    """Greedy continuations of each row's first half by both models, with the real text."""
    k = rows.shape[1] // 2
    out = []
    for row in rows:
        prefix = row[None, :k]
        a = decoder_only.generate(prefix, max_new_tokens=new_tokens, eos_token_id=-1)[0, k:]
        b = enc_dec.generate(prefix, max_new_tokens=new_tokens, eos_token_id=-1)[0, 1:]
        out.append({"prompt": tok.decode(row[:k].tolist()), "truth": tok.decode(row[k:k + new_tokens].tolist()),
                    "decoder_only": tok.decode(a.tolist()), "encoder_decoder": tok.decode(b.tolist())})
    return out


def plot(run, pre_hist, train_hist, held_out, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, hist, title, loss_name in (
            (ax1, pre_hist, "1. pretrain the decoder-only model (causal LM)", "training loss"),
            (ax2, train_hist, "3. train the adapted encoder-decoder (PrefixLM + KD)",
             "training loss: CE against the teacher\n(includes the teacher's entropy)")):
        t = np.array(hist["train"])
        ax.plot(t[:, 0], t[:, 1], lw=1, label=loss_name)
        if hist["val"]:
            v = np.array(hist["val"])
            ax.plot(v[:, 0], v[:, 1], "o-", label="held-out cross-entropy")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("nats / token")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    names = list(held_out)
    values = [held_out[n] for n in names]
    bars = ax3.bar(range(len(names)), values, color=["#888888", "#1f77b4", "#d62728"][:len(names)])
    for bar, value in zip(bars, values):
        ax3.text(bar.get_x() + bar.get_width() / 2, value, f"{value:.2f}", ha="center", va="bottom")
    ax3.set_xticks(range(len(names)), names, fontsize=8)
    ax3.set_ylim(min(values) - 0.5, max(values) + 0.25)           # the differences are the point
    ax3.set_ylabel("held-out nats / token on the second half")
    ax3.set_title("4. same continuation task, held-out rows", fontsize=10)
    ax3.grid(alpha=0.3, axis="y")
    fig.suptitle(f"minencdec demo: {run}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_demo_tiny(args):
    run = Path(args.out)
    with locked(run):                       # one demo per directory; each stage locks its own too
        return _demo(run, args)


def _demo(run, args):
    if (run / "summary.json").exists() and not args.resume:
        raise ValueError(f"{run} already holds a finished demo; choose another --out or delete it")
    quick = args.quick
    pre_steps, train_steps = (60, 60) if quick else (args.pretrain_steps, args.train_steps)
    t0 = time.monotonic()
    base = dict(data=args.data, field="text", tokenizer=None, seed=args.seed, dtype="float32", backend=args.backend,
                resume=args.resume, weight_decay=0.01, eval_every=max(pre_steps // 6, 10),
                save_every=100, batch_size=args.batch_size, seq_len=args.seq_len)
    pre_args = argparse.Namespace(**base, out=str(run / "pretrain"), steps=pre_steps, lr=3e-3,
                                  warmup=min(30, pre_steps // 2),
                                  preset="tiny", vocab_size=2048 if quick else 4096)
    teacher, tok, (_, val_rows) = commands.cmd_pretrain(pre_args)
    t_pre = time.monotonic() - t0
    if not (args.resume and (run / "adapted" / "config.json").is_file()):
        # On --resume an existing adapted/ stands: it is written (atomically) only after the
        # pretraining finished, from its final checkpoint, so adapting again would give it back.
        print("adapting the decoder-only checkpoint into an encoder-decoder (cross-attention: copy)")
        adapt_checkpoints(run / "pretrain" / "checkpoint", run / "pretrain" / "checkpoint", run / "adapted")
    adapted_loss = evaluate(load_pretrained(run / "adapted", backend=args.backend),
                            Seq2SeqTask("prefixlm", val_rows[:1], val_rows, args.batch_size))
    train_args = argparse.Namespace(**{**base, "eval_every": max(train_steps // 6, 10)}, out=str(run / "train"),
                                    model=str(run / "adapted"), objective="prefixlm-kd", teacher=None,
                                    steps=train_steps, lr=1e-3, warmup=min(20, train_steps // 2),
                                    temperature=1.0, alpha=1.0,
                                    cross_attn_warmup=0)
    t1 = time.monotonic()
    student, _, _, _ = commands.cmd_train(train_args)
    t_train = time.monotonic() - t1
    held = val_rows[: 4 * args.batch_size]
    held_out = {"decoder-only\n(teacher)": suffix_loss_decoder_only(teacher, held),
                "adapted,\nbefore training": adapted_loss,
                "encoder-decoder\nafter PrefixLM+KD": evaluate(student, Seq2SeqTask("prefixlm", held[:1], held,
                                                                                   args.batch_size))}
    plot(run, json.loads((run / "pretrain" / "checkpoint" / "trainer_state.json").read_text())["history"],
         json.loads((run / "train" / "checkpoint" / "trainer_state.json").read_text())["history"],
         held_out, run / "demo.png")
    texts = samples(teacher, student, tok, val_rows[:3], args.sample_tokens, args.seed)
    lines = []
    for i, s in enumerate(texts):
        lines += [f"--- held-out example {i + 1} ---", f"prompt:          ...{s['prompt'][-160:]!r}",
                  f"true text:       {s['truth']!r}", f"decoder-only:    {s['decoder_only']!r}",
                  f"encoder-decoder: {s['encoder_decoder']!r}", ""]
    (run / "samples.txt").write_text("\n".join(lines))
    print("\n".join(lines))
    summary = {"held_out_suffix_loss": {k.replace("\n", " "): v for k, v in held_out.items()},
               "seconds": {"pretrain": t_pre, "adapt_and_train": t_train, "total": time.monotonic() - t0},
               "steps": {"pretrain": pre_steps, "train": train_steps}}
    (run / "summary.json").write_text(json.dumps(summary, indent=1))
    for name, value in summary["held_out_suffix_loss"].items():
        print(f"held-out loss on the second half, {name:35s} {value:.3f} nats/token")
    print(f"total {summary['seconds']['total'] / 60:.1f} min; plots: {run / 'demo.png'}, "
          f"{run / 'pretrain' / 'loss.png'}, {run / 'train' / 'loss.png'}")
    return 0
