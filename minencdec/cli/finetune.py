"""`minencdec finetune`: fine-tune a checkpoint on a JSON-lines task file.

    minencdec finetune --model DIR --task FILE.jsonl --kind classify --out RUN    {"text": str, "label": int}
    minencdec finetune --model DIR --task FILE.jsonl --kind seq2seq --out RUN     {"input": str, "target": str}

`classify` puts a fresh head on a Gemma 2 or T5Gemma checkpoint (classify.py: the encoder's,
or the stack's, last non-pad token); a classifier checkpoint goes on training its own head.
`seq2seq` trains a T5Gemma encoder-decoder on the pairs. Every line of the task is checked
(the file and line are named) before a model is loaded, and a classification task must
have at least two classes among its training examples: with one, any model scores 1.0.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from minencdec.io import tokenizer as tk
from minencdec.io.pretrained import load_pretrained
from minencdec.model import backend
from minencdec.model.classify import Classifier
from minencdec.model.t5gemma import T5GemmaModel
from minencdec.training import data
from minencdec.training.rundir import check_start, digest_bytes, locked
from minencdec.training.tasks import ClassificationTask, TextToTextTask
from minencdec.training.train import train

from .train import check_positions, common_arguments, model_tokenizer, run_settings, tokenizer_files, train_config

FIELDS = {"classify": {"text": str, "label": int}, "seq2seq": {"input": str, "target": str}}
MIN_EXAMPLES = 4


def read_task(path, kind) -> list[dict]:
    """The examples of a task file, each line checked to be an object with the kind's fields."""
    shape = "{" + ", ".join(f'"{f}": {"str" if t is str else "int"}' for f, t in FIELDS[kind].items()) + "}"
    rows = []
    for n, obj in data.read_json_lines(path):
        if not isinstance(obj, dict):
            raise ValueError(f"{path}, line {n}: expected an object {shape} for --kind {kind}, got {_show(obj)}")
        for field, want in FIELDS[kind].items():
            value = obj.get(field)
            if not (isinstance(value, str) if want is str else isinstance(value, int) and not isinstance(value, bool)):
                got = _show(value) if field in obj else "nothing"
                raise ValueError(f"{path}, line {n}: field {field!r} must be "
                                 f"{'text' if want is str else 'an integer class id'}, got {got}")
        rows.append(obj)
    if len(rows) < MIN_EXAMPLES:
        raise ValueError(f"{path}: {len(rows)} examples; fine-tuning needs at least {MIN_EXAMPLES}")
    return rows


def _show(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_labels(path, train_labels, labels, num_labels):
    """Class ids in [0, num_labels), and at least two classes to learn from."""
    if min(labels) < 0:
        raise ValueError(f"{path}: label {min(labels)} is negative; class ids are 0, 1, 2, ...")
    if max(labels) >= num_labels:
        raise ValueError(f"{path}: label {max(labels)} is outside the classifier's {num_labels} classes "
                         f"(0 .. {num_labels - 1})")
    classes = sorted(set(train_labels))
    if len(classes) < 2:
        raise ValueError(f"{path}: every training example has label {classes[0]}; a classifier needs at least "
                         "2 classes to learn from (with one, any model scores accuracy 1.0)")


def cmd_finetune(args):
    run = Path(args.out)
    with locked(run):
        check_start(run, args.resume)
        cfg = train_config(args)                          # bad options fail before any work
        rows = read_task(args.task, args.kind)
        backend.prepare(args.backend)
        model = load_pretrained(args.model, args.dtype, backend=args.backend)
        tok = model_tokenizer(args.model, args.tokenizer)
        stack = model.config.encoder if isinstance(model, T5GemmaModel) else model.config
        tk.check_for_model(tok, stack.vocab_size)
        order = np.random.default_rng(args.seed).permutation(len(rows))
        n_val = max(1, len(rows) // 10)
        train_ids, val_ids = order[n_val:], order[:n_val]
        if args.kind == "classify":
            labels = [r["label"] for r in rows]
            num_labels = model.num_labels if isinstance(model, Classifier) else max(max(labels) + 1, 2)
            check_labels(args.task, [labels[i] for i in train_ids], labels, num_labels)
            check_positions(args.seq_len, [stack])
            examples = [(tok.encode(r["text"], add_bos=True), r["label"]) for r in rows]
            if not isinstance(model, Classifier):
                model = Classifier.from_model(model, num_labels, seed=args.seed)
            task = ClassificationTask([examples[i] for i in train_ids], [examples[i] for i in val_ids],
                                      _batch(args, len(train_ids)), args.seed, max_len=args.seq_len)
        else:
            if not isinstance(model, T5GemmaModel):
                raise ValueError(f"{args.model} is not a T5Gemma encoder-decoder checkpoint "
                                 f"({type(model).__name__}); --kind seq2seq fine-tunes one")
            check_positions(args.seq_len, [model.config.encoder, model.config.decoder])
            examples = [(tok.encode(r["input"])[:args.seq_len], tok.encode(r["target"], add_eos=True)[:args.seq_len])
                        for r in rows]
            task = TextToTextTask([examples[i] for i in train_ids], [examples[i] for i in val_ids],
                                  _batch(args, len(train_ids)), args.seed)
        task_digest = digest_bytes(json.dumps(rows, sort_keys=True).encode())
        settings = run_settings(args, tok, task_sha256=task_digest, kind=args.kind)
        train(model, task, cfg, run, resume=args.resume, label=f"finetune ({args.kind})",
              extra_files=tokenizer_files(tok), settings=settings)
    if args.kind == "classify":
        print(f"held-out accuracy: {task.accuracy(model):.3f} on {n_val} examples")
    return model


def _batch(args, n_train):
    if args.batch_size > n_train:
        raise ValueError(f"--batch-size {args.batch_size} is larger than the {n_train} training examples of "
                         f"{args.task} (one in ten is held out)")
    return args.batch_size


def add_commands(sub):
    p = sub.add_parser("finetune", help="fine-tune on a JSON-lines task: classify {text, label} or seq2seq {input, target}")
    common_arguments(p, steps=200, lr=5e-4, batch_size=16, seq_len=128)
    p.add_argument("--model", required=True, help="a Gemma 2 or T5Gemma checkpoint (or a classifier, for classify)")
    p.add_argument("--task", required=True, help="JSON-lines examples")
    p.add_argument("--kind", required=True, choices=("classify", "seq2seq"))
    p.set_defaults(func=cmd_finetune)
