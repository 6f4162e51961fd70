"""The `minencdec dump` and `minencdec compare` commands: thin shells over minencdec.verify.

    minencdec dump --model DIR --input-ids "2 45 17 9" --out ours.safetensors
    minencdec compare theirs.safetensors ours.safetensors
    minencdec compare --model DIR --against transformers|THEIRS.safetensors [ids]

See minencdec/verify/dumps.py for the dump format, compare.py for the tolerances and the report.
"""

from __future__ import annotations

import json
import os

import numpy as np

from minencdec.io import progress
from minencdec.io.pretrained import load_pretrained
from minencdec.verify.compare import ATOL, RTOL_F32, RTOL_F64, compare_dumps, format_report
from minencdec.verify.dumps import (INPUT_NAMES, _lm_config, check_dump_target, dump_minencdec, dump_transformers,
                                    read_dump, write_dump)

from .options import non_negative_float


def _pad_rows(rows, pad_id, what):
    """Ragged rows of ids -> right-padded (B, L) int64 ids and their 0/1 mask."""
    if not (isinstance(rows, list) and rows and all(isinstance(r, list) and r and all(
            isinstance(t, int) and not isinstance(t, bool) for t in r) for r in rows)):
        raise ValueError(f"{what} must be rows of integer token ids, each row non-empty")
    L = max(map(len, rows))
    ids = np.array([r + [pad_id] * (L - len(r)) for r in rows], dtype=np.int64)
    return ids, (np.arange(L) < np.array([len(r) for r in rows])[:, None]).astype(np.int64)


def _cli_inputs(args, kind, config) -> dict:
    """The inputs of --input-ids / --decoder-input-ids ("2 45 17 9", repeated) or --ids-file."""
    enc_rows, dec_rows = args.input_ids, args.decoder_input_ids
    if args.ids_file:
        if enc_rows or dec_rows:
            raise ValueError("give token ids with --ids-file or with --input-ids, not both")
        with open(args.ids_file, encoding="utf-8") as f:
            try:
                doc = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{args.ids_file}: invalid JSON ({e})") from None
        if not isinstance(doc, dict) or "input_ids" not in doc:
            raise ValueError(f'{args.ids_file}: expected {{"input_ids": [[...]], '
                             '"decoder_input_ids": [[...]]}')
        enc_rows, dec_rows = doc["input_ids"], doc.get("decoder_input_ids")
    elif enc_rows:
        try:
            enc_rows, dec_rows = [[[int(t) for t in text.replace(",", " ").split()] for text in rows]
                                  if rows else None for rows in (enc_rows, dec_rows)]
        except ValueError as e:
            raise ValueError(f"token ids must be integers separated by spaces ({e})") from None
    else:
        raise ValueError('no token ids: give --input-ids "2 45 17 9" (repeat it for a batch) or --ids-file')
    t5 = kind == "t5gemma"
    ids, mask = _pad_rows(enc_rows, (config.encoder if t5 else config).pad_token_id, "input_ids")
    dec_ids, dec_mask = (None, None) if dec_rows is None else \
        _pad_rows(dec_rows, config.decoder.pad_token_id if t5 else 0, "decoder_input_ids")
    return dict(input_ids=ids, attention_mask=mask, decoder_input_ids=dec_ids, decoder_attention_mask=dec_mask)


def _produce(producer, path, dtype, inputs):
    """(dump, metadata) of the checkpoint at `path`, run by minencdec or by transformers."""
    meta = {"kind": _lm_config(path)[0], "dtype": dtype, "model": os.path.abspath(str(path))}
    if producer == "transformers":
        try:
            acts = dump_transformers(path, **inputs, dtype=dtype)
        except ImportError as e:
            raise ValueError(str(e)) from None            # cli.main reports it: exit 2
        import transformers
        return acts, {**meta, "producer": f"transformers {transformers.__version__}"}
    model = load_pretrained(path, dtype, progress=progress.callback("loading"))
    return dump_minencdec(model, **inputs), {**meta, "producer": "minencdec"}


def cmd_dump(args):
    check_dump_target(args.out)                           # before the work: a bad --out fails at once
    inputs = _cli_inputs(args, *_lm_config(args.model))
    acts, meta = _produce(args.producer, args.model, args.dtype, inputs)
    write_dump(args.out, acts, meta)
    print(f"wrote {args.out}: {sum(k not in INPUT_NAMES for k in acts)} activations "
          f"({meta['kind']}, {args.dtype}, {meta['producer']})")
    return 0


def cmd_compare(args):
    if args.model is None and len(args.dumps) == 2 and not args.against:
        (a, _), (b, _) = read_dump(args.dumps[0]), read_dump(args.dumps[1])
    elif args.model is not None and args.against == "transformers" and not args.dumps:
        inputs = _cli_inputs(args, *_lm_config(args.model))
        b = _produce("transformers", args.model, args.dtype, inputs)[0]
        a = _produce("minencdec", args.model, args.dtype, inputs)[0]
    elif args.model is not None and args.against and not (args.dumps or args.input_ids or args.ids_file):
        b = read_dump(args.against)[0]                     # a dump file: rerun its inputs here
        a = _produce("minencdec", args.model, args.dtype, {k: b.get(k) for k in INPUT_NAMES})[0]
    else:
        raise ValueError("usage: compare A.safetensors B.safetensors | compare --model DIR --against "
                         "transformers [--input-ids ...] | compare --model DIR --against B.safetensors")
    rows = compare_dumps(a, b, args.rtol, args.atol)
    print(format_report(rows))
    return 0 if all(r.status == "OK" for r in rows) else 1


def _add_input_args(s):
    s.add_argument("--input-ids", action="append", metavar="IDS",
                   help='token ids of one row, e.g. "2 45 17 9"; repeat for a batch (right-padded)')
    s.add_argument("--decoder-input-ids", action="append", metavar="IDS",
                   help="T5Gemma decoder ids of one row (default: one bos token per row)")
    s.add_argument("--ids-file", help='JSON {"input_ids": [[...]], "decoder_input_ids": [[...]]}')
    s.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                   help="precision (default float64)")


def add_commands(subparsers):
    """Register `dump` and `compare` with the minencdec command."""
    s = subparsers.add_parser("dump", help="write every intermediate activation of a checkpoint (safetensors)")
    s.add_argument("--model", required=True, help="checkpoint directory")
    _add_input_args(s)
    s.add_argument("--producer", default="minencdec", choices=("minencdec", "transformers"))
    s.add_argument("--out", required=True, help="output .safetensors file (written atomically; an existing "
                                                "file is replaced only if it is an activation dump)")
    s.set_defaults(func=cmd_dump)
    s = subparsers.add_parser("compare", help="per-layer divergence report of two activation dumps")
    s.add_argument("dumps", nargs="*", metavar="DUMP", help="A.safetensors B.safetensors (B is the reference)")
    s.add_argument("--model", help="checkpoint directory to run with minencdec (instead of dump A)")
    s.add_argument("--against", help="'transformers', or a dump file whose inputs are rerun")
    _add_input_args(s)
    s.add_argument("--rtol", type=non_negative_float, default=None,
                   help=f"relative to max |B| (default {RTOL_F64} float64, {RTOL_F32} float32)")
    s.add_argument("--atol", type=non_negative_float, default=ATOL)
    s.set_defaults(func=cmd_compare)
