"""The `minencdec import-flax` command: the official JAX/Flax T5Gemma's parameters as a
T5Gemma checkpoint directory (minencdec/io/flax.py has the conversion and the file formats).

    minencdec import-flax --params params.npz --jax-config jax_config.json --out t5gemma_dir
"""

from __future__ import annotations

from minencdec.io.flax import import_flax


def cmd_import_flax(args):
    config = import_flax(args.params, args.jax_config, args.out, overwrite=args.overwrite, save_dtype=args.save_dtype)
    enc, dec = config.encoder, config.decoder
    print(f"wrote {args.out}: T5Gemma {enc.num_hidden_layers}+{dec.num_hidden_layers} layers, widths "
          f"{enc.hidden_size}/{dec.hidden_size}, vocab {dec.vocab_size}")
    print(f"encoder window rule 'lt' (|i - j| < {enc.sliding_window}, as JAX), stored in config.json; minencdec "
          "applies it, transformers applies '<=' and differs on inputs longer than the window")
    return 0


def add_commands(subparsers):
    """Register `import-flax` with the minencdec command."""
    s = subparsers.add_parser("import-flax", help="convert the JAX/Flax T5Gemma (gemma package) into a checkpoint")
    s.add_argument("--params", required=True, help='.npz of the Flax parameters flattened with "/" '
                                                   "(top keys encoder/..., decoder/...)")
    s.add_argument("--jax-config", required=True, help='JSON {"encoder": {...}, "decoder": {...}} of gemma '
                                                       "TransformerConfig fields (enums by name)")
    s.add_argument("--out", required=True, help="output checkpoint directory (written atomically)")
    s.add_argument("--save-dtype", default=None, choices=("float32", "float64", "bfloat16", "float16"),
                   help="precision of the written tensors (default: as stored in --params)")
    s.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at --out")
    s.set_defaults(func=cmd_import_flax)
