"""The commands that hand a run over to PyTorch and take it back (training/handover.py).

    minencdec export-torch RUN --out DIR [--data PATH] [--teacher DIR]
    accelerate launch examples/continue_in_pytorch.py DIR --out DIR2
    minencdec import-torch DIR2 --out RUN2        then: minencdec train --resume --out RUN2 ...

export-torch rebuilds the run's rows exactly as `train` built them (the run's tokenizer,
--seq-len, --seed; the text checked against the run's sha256), so the torch side reads the
same batches from the same step.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from minencdec.io import tokenizer as tk
from minencdec.io.pretrained import load_pretrained
from minencdec.training import data
from minencdec.training.handover import (TEACHER_DIR, check_new_directory, export_run, exportable_state,
                                         import_run, read_handover)
from minencdec.training.rundir import CHECKPOINT_DIR, digest_texts, locked

from .train import packed_rows, refuse_classifier


def cmd_export_torch(args):
    run = Path(args.run)
    if not run.is_dir():                                 # before the lock, which would create it
        raise ValueError(f"{run}: no such run directory")
    with locked(run):
        settings = exportable_state(run)["settings"]
        check_new_directory(args.out)                    # before the text is read
        if args.teacher and settings["objective"] != "prefixlm-kd":
            raise ValueError(f"--teacher: {run} was trained with {settings['objective']}, which has no teacher")
        teacher = None
        if args.teacher:
            refuse_classifier(args.teacher, "the teacher must be a Gemma2ForCausalLM")
            teacher = load_pretrained(args.teacher, settings["dtype"], expect="gemma2")
        texts = data.load_corpus(args.data, args.field)
        tok = tk.Tokenizer.load(run / CHECKPOINT_DIR)
        train_rows, val_rows = packed_rows(texts, tok, settings["seq_len"], settings["seed"], settings["batch_size"])
        h = export_run(run, args.out, train_rows, val_rows, data_sha256=digest_texts(texts), teacher=teacher,
                       data_source=args.data, data_field=args.field)
    print(f"wrote {args.out}: step {h['step']} of {h['schedule']['total_steps']}, objective "
          f"{h['objective']['name']}, {len(h['optimizer']['checkpoint_names'])} parameters with their AdamW state")
    print(f"continue it in PyTorch:  accelerate launch examples/continue_in_pytorch.py {shlex.quote(str(args.out))} "
          f"--out DIR")
    return 0


def cmd_import_torch(args):
    step = import_run(args.dir, args.out)
    print(f"wrote {Path(args.out) / CHECKPOINT_DIR}: step {step}; continue it with")
    print("  " + resume_command(args.dir, args.out))
    return 0


def resume_command(directory, run) -> str:
    """The `minencdec train --resume` command whose settings are the run's own."""
    h = read_handover(directory)
    cfg, s, obj = h["minencdec"]["train_config"], h["minencdec"]["settings"], h["objective"]
    words = ["minencdec", "train", "--resume", "--out", str(run), "--model", str(directory),
             "--objective", obj["name"], "--steps", cfg["steps"], "--lr", cfg["lr"], "--warmup", cfg["warmup_steps"],
             "--weight-decay", cfg["weight_decay"], "--batch-size", s["batch_size"], "--seq-len", s["seq_len"],
             "--seed", s["seed"], "--dtype", s["dtype"]]
    if h["data"].get("source"):
        words += ["--data", h["data"]["source"]]
    if h["data"].get("field", "text") != "text":
        words += ["--field", h["data"]["field"]]
    if cfg.get("freeze_steps"):
        words += ["--cross-attn-warmup", cfg["freeze_steps"]]
    if obj["name"] == "prefixlm-kd":
        words += ["--teacher", str(Path(directory) / TEACHER_DIR), "--temperature", obj["temperature"],
                  "--alpha", obj["alpha"]]
    return " ".join(shlex.quote(str(w)) for w in words)


def add_commands(sub):
    p = sub.add_parser("export-torch", help="hand a `train` run over to PyTorch: model, AdamW state, schedule, "
                                            "data position, objective")
    p.add_argument("run", help="the run directory (its checkpoint is exported)")
    p.add_argument("--out", required=True, help="the handover directory to write (must not exist, or be empty)")
    p.add_argument("--data", default=None, help="the run's text, as given to `train` (default: Shakespeare)")
    p.add_argument("--field", default="text", help="the JSON-lines field holding the text")
    p.add_argument("--teacher", default=None, help="prefixlm-kd: the decoder-only teacher the run distilled from")
    p.set_defaults(func=cmd_export_torch)

    p = sub.add_parser("import-torch", help="take a run back from PyTorch: a run directory `train --resume` continues")
    p.add_argument("dir", help="a handover directory (written by examples/continue_in_pytorch.py or export-torch)")
    p.add_argument("--out", required=True, help="the new run directory")
    p.set_defaults(func=cmd_import_torch)
