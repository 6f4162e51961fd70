"""The `minencdec dump` and `minencdec compare` commands: thin shells over minencdec.verify.

    minencdec dump --model DIR --input-ids "2 45 17 9" --out ours.safetensors
    minencdec compare theirs.safetensors ours.safetensors
    minencdec compare --model DIR --against transformers|THEIRS.safetensors [ids]
    options: --ids-file (rows with masks: left or right padding), --padding-side,
             --bidirectional-window le|lt|t5gemma2, --internals encoder.layers.0,...

See minencdec/verify/dumps.py for the dump format, compare.py for the tolerances and the report.
"""

from __future__ import annotations

import json
import os

import numpy as np

from minencdec.io import progress
from minencdec.io.pretrained import load_pretrained
from minencdec.model.config import WINDOW_RULES
from minencdec.verify.compare import ATOL, RTOL_F32, RTOL_F64, compare_dumps, format_report
from minencdec.verify.dumps import (INPUT_NAMES, _lm_config, check_dump_target, dump_minencdec, dump_transformers,
                                    read_dump, write_dump)

from .options import non_negative_float


_IDS_FILE_KEYS = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask", "padding_side")


def _is_id_rows(rows):
    return isinstance(rows, list) and rows and all(isinstance(r, list) and r and all(
        isinstance(t, int) and not isinstance(t, bool) for t in r) for r in rows)


def _pad_rows(rows, pad_id, what, side="right"):
    """Ragged rows of ids -> (B, L) int64 ids padded on `side` and their 0/1 mask. A row may
    not hold the pad id itself: whether it is a token or padding would be a guess (give
    the masks in an --ids-file to say)."""
    if not _is_id_rows(rows):
        raise ValueError(f"{what} must be rows of integer token ids, each row non-empty")
    for b, row in enumerate(rows):
        if pad_id in row:
            raise ValueError(f"{what} row {b} holds the pad id {pad_id} at position {row.index(pad_id)}: a token "
                             f"or padding? Give the rows with their masks in an --ids-file "
                             f'({{"{what}": [[...]], "{what.replace("input_ids", "attention_mask")}": [[...]]}})')
    L = max(map(len, rows))
    pad = [[pad_id] * (L - len(r)) for r in rows]
    ids = np.array([r + p if side == "right" else p + r for r, p in zip(rows, pad)], dtype=np.int64)
    mask = np.array([[1] * len(r) + [0] * len(p) if side == "right" else [0] * len(p) + [1] * len(r)
                     for r, p in zip(rows, pad)], dtype=np.int64)
    return ids, mask


def _masked_rows(rows, mask, what, mask_name, source):
    """Rows given with their mask (any padding: left, right, both): both rectangular, the
    mask 0/1 of the same shape, every row with a real token."""
    if not _is_id_rows(rows) or len({len(r) for r in rows}) != 1:
        raise ValueError(f"{source}: with {mask_name} given, {what} must be rows of integer ids of one length")
    ids = np.array(rows, dtype=np.int64)
    try:
        m = np.array(mask)
    except ValueError:
        m = np.array(None)
    if m.shape != ids.shape or not np.isin(m, (0, 1)).all():
        raise ValueError(f"{source}: {mask_name} must be rows of 0/1 of the same shape as {what} {ids.shape}")
    if not m.any(axis=1).all():
        raise ValueError(f"{source}: {mask_name} row {int(np.argmin(m.any(axis=1)))} has no real token")
    return ids, m.astype(np.int64)


def _read_ids_file(path):
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(doc, dict) or "input_ids" not in doc:
        raise ValueError(f'{path}: expected {{"input_ids": [[...]], "attention_mask": [[...]], '
                         '"decoder_input_ids": [[...]], "decoder_attention_mask": [[...]]} (masks optional)')
    unknown = sorted(set(doc) - set(_IDS_FILE_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown field(s) {unknown}; the fields are {list(_IDS_FILE_KEYS)}")
    if doc.get("decoder_attention_mask") is not None and doc.get("decoder_input_ids") is None:
        raise ValueError(f"{path}: decoder_attention_mask without decoder_input_ids")
    return doc


def _cli_inputs(args, kind, config) -> dict:
    """The inputs of --input-ids / --decoder-input-ids ("2 45 17 9", repeated; ragged rows
    padded on --padding-side) or of --ids-file (rows with their masks, or ragged rows)."""
    doc, side = {}, args.padding_side
    if args.ids_file:
        if args.input_ids or args.decoder_input_ids:
            raise ValueError("give token ids with --ids-file or with --input-ids, not both")
        doc = _read_ids_file(args.ids_file)
        side = doc.get("padding_side") or side
        if side not in ("left", "right"):
            raise ValueError(f"{args.ids_file}: padding_side must be 'left' or 'right', got {side!r}")
    elif args.input_ids:
        try:
            doc = {name: [[int(t) for t in text.replace(",", " ").split()] for text in rows]
                   for name, rows in (("input_ids", args.input_ids), ("decoder_input_ids", args.decoder_input_ids))
                   if rows}
        except ValueError as e:
            raise ValueError(f"token ids must be integers separated by spaces ({e})") from None
    else:
        raise ValueError('no token ids: give --input-ids "2 45 17 9" (repeat it for a batch) or --ids-file')
    t5 = kind == "t5gemma"
    pads = {"input_ids": (config.encoder if t5 else config).pad_token_id,
            "decoder_input_ids": config.decoder.pad_token_id if t5 else 0}
    out = {}
    for what, mask_name in (("input_ids", "attention_mask"), ("decoder_input_ids", "decoder_attention_mask")):
        rows = doc.get(what)
        if rows is None:
            out[what] = out[mask_name] = None
        elif doc.get(mask_name) is not None:
            out[what], out[mask_name] = _masked_rows(rows, doc[mask_name], what, mask_name, args.ids_file)
        else:
            out[what], out[mask_name] = _pad_rows(rows, pads[what], what, side)
    return out


def _produce(producer, path, dtype, inputs, window=None, internals=()):
    """(dump, metadata) of the checkpoint at `path`, run by minencdec or by transformers.
    window: the encoder's window rule (None: the checkpoint's); internals: see dump_minencdec."""
    kind, config = _lm_config(path, window)
    meta = {"kind": kind, "dtype": dtype, "model": os.path.abspath(str(path))}
    if kind == "t5gemma":
        meta["bidirectional_window"] = config.encoder.bidirectional_window
    if producer == "transformers":
        if internals:
            raise ValueError("the transformers producer records no attention internals (--internals): "
                             "dump them from minencdec, or from your implementation")
        applies = "t5gemma2" if config.family == "t5gemma2" else "le"
        if kind == "t5gemma" and window not in (None, applies):
            raise ValueError(f"transformers applies the window rule {applies!r} to this model's encoder; "
                             f"--bidirectional-window {window} is for minencdec")
        try:
            acts = dump_transformers(path, **inputs, dtype=dtype)
        except ImportError as e:
            raise ValueError(str(e)) from None            # cli.main reports it: exit 2
        import transformers
        return acts, {**meta, "bidirectional_window": applies, "producer": f"transformers {transformers.__version__}"}
    model = load_pretrained(path, dtype, progress=progress.callback("loading"), bidirectional_window=window)
    return dump_minencdec(model, **inputs, internals=internals), {**meta, "producer": "minencdec"}


def _internals(args):
    """--internals "encoder.layers.0,decoder.layers.1" (repeatable) -> a list of names."""
    return [n for text in args.internals or () for n in text.replace(",", " ").split()]


def cmd_dump(args):
    check_dump_target(args.out)                           # before the work: a bad --out fails at once
    inputs = _cli_inputs(args, *_lm_config(args.model))
    acts, meta = _produce(args.producer, args.model, args.dtype, inputs, args.bidirectional_window,
                          _internals(args))
    write_dump(args.out, acts, meta)
    print(f"wrote {args.out}: {sum(k not in INPUT_NAMES for k in acts)} activations "
          f"({meta['kind']}, {args.dtype}, {meta['producer']})")
    return 0


def _window_note(args, reference_meta):
    """A line saying that the reference dump declares another encoder window rule than the
    one the model runs, or None."""
    theirs = reference_meta.get("bidirectional_window")
    kind, config = _lm_config(args.model)
    if kind != "t5gemma" or theirs is None:
        return None
    ours = args.bidirectional_window or config.encoder.bidirectional_window
    if theirs == ours:
        return None
    return (f"note: the reference dump declares the encoder window rule {theirs!r}, the model runs {ours!r}; "
            f"on inputs longer than the window they differ (--bidirectional-window {theirs} runs theirs)")


def cmd_compare(args):
    note, internals = None, _internals(args)
    if args.model is None and len(args.dumps) == 2 and not args.against:
        if internals or args.bidirectional_window:
            raise ValueError("--internals and --bidirectional-window are for --model (two dumps are compared as they are)")
        (a, _), (b, _) = read_dump(args.dumps[0]), read_dump(args.dumps[1])
    elif args.model is not None and args.against == "transformers" and not args.dumps:
        inputs = _cli_inputs(args, *_lm_config(args.model))
        b = _produce("transformers", args.model, args.dtype, inputs, args.bidirectional_window)[0]
        a = _produce("minencdec", args.model, args.dtype, inputs, args.bidirectional_window, internals)[0]
    elif args.model is not None and args.against and not (args.dumps or args.input_ids or args.ids_file):
        b, meta = read_dump(args.against)                 # a dump file: rerun its inputs (and internals) here
        internals = internals or sorted({n.rsplit(".", 1)[0] for n in b if n.endswith(".probs")})
        note = _window_note(args, meta)
        a = _produce("minencdec", args.model, args.dtype, {k: b.get(k) for k in INPUT_NAMES},
                     args.bidirectional_window, internals)[0]
    else:
        raise ValueError("usage: compare A.safetensors B.safetensors | compare --model DIR --against "
                         "transformers [--input-ids ...] | compare --model DIR --against B.safetensors")
    rows = compare_dumps(a, b, args.rtol, args.atol)
    print(format_report(rows))
    if note:
        print(note)
    return 0 if all(r.status == "OK" for r in rows) else 1


def _add_input_args(s):
    s.add_argument("--input-ids", action="append", metavar="IDS",
                   help='token ids of one row, e.g. "2 45 17 9"; repeat for a batch (padded on --padding-side)')
    s.add_argument("--decoder-input-ids", action="append", metavar="IDS",
                   help="T5Gemma decoder ids of one row (default: one bos token per row)")
    s.add_argument("--padding-side", default="right", choices=("right", "left"),
                   help="where rows of unequal length are padded (default right)")
    s.add_argument("--ids-file", help='JSON {"input_ids": [[...]], "attention_mask": [[...]], '
                                      '"decoder_input_ids": [[...]], "decoder_attention_mask": [[...]]}: '
                                      'masks (1 token, 0 padding, anywhere) optional; without them '
                                      'rows are padded on "padding_side"')
    s.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                   help="precision (default float64)")
    s.add_argument("--bidirectional-window", choices=WINDOW_RULES, default=None,
                   help="the encoder's sliding-window rule for minencdec: le |i-j| <= w (transformers 5), "
                        "lt |i-j| < w (the JAX T5Gemma, transformers 4.53-4.57), t5gemma2; "
                        "default: the checkpoint's (config.json minencdec_bidirectional_window, else its family's)")
    s.add_argument("--internals", action="append", metavar="LAYERS",
                   help='also dump q, k (after RoPE), scores and probs of these attention layers or sublayers, '
                        'e.g. "encoder.layers.0,decoder.layers.1.cross_attn" or "all"')


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
