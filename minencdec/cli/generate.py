"""`minencdec generate`: stream a continuation of a prompt from any checkpoint (KV caches,
greedy or sampled; the decoding loop is minencdec.model.generate)."""

from __future__ import annotations

import os
import sys

import numpy as np

from minencdec.io.pretrained import load_pretrained
from minencdec.model.backend import prepare
from minencdec.model.generate import decoder_config, generate

from .options import add_backend_argument


def cmd_generate(args):
    """Stream each prompt's continuation to stdout, as text when the checkpoint directory has a
    tokenizer.model, else as ids. Text prompts get bos in front, as Gemma's tokenizer does;
    --prompt-ids are used as given. One prompt at a time (batch 1)."""
    if args.prompt_ids is None and args.prompt is None and args.input_file is None:
        raise ValueError("give --prompt, --input-file or --prompt-ids")
    prepare(args.backend)
    model = load_pretrained(args.model, args.dtype, backend=args.backend)
    c = decoder_config(model)
    spm = os.path.join(args.model, "tokenizer.model")
    if not os.path.isfile(spm) and args.prompt_ids is None:
        raise ValueError(f"{args.model} has no tokenizer.model; give token ids instead, "
                         f"e.g. --prompt-ids \"{c.bos_token_id} 17 9\" (the output is then printed as ids)")
    sp = None
    if os.path.isfile(spm):
        import sentencepiece
        sp = sentencepiece.SentencePieceProcessor(model_file=spm)
    if args.prompt_ids is not None:
        prompts = [[int(t) for t in args.prompt_ids.split()]]
    else:
        if args.input_file:
            with open(args.input_file, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f if line.strip()]
        else:
            texts = [args.prompt]
        prompts = [[c.bos_token_id] + sp.encode(t) for t in texts]
    for prompt in prompts:
        shown, out = [], ""

        def show(tokens):                  # stream: print the text the new token adds
            nonlocal out
            if int(tokens[0]) in (c.eos_token_id, c.pad_token_id):
                return
            shown.append(int(tokens[0]))
            text = " ".join(map(str, shown)) if sp is None else \
                sp.decode([i for i in shown if i < sp.get_piece_size()])   # ids past the tokenizer: dropped
            sys.stdout.write(text[len(out):] if text.startswith(out) else "\n" + text)
            sys.stdout.flush()
            out = text

        generate(model, np.array([prompt]), args.max_new_tokens, do_sample=not args.greedy,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=show)
        sys.stdout.write("\n")
    return 0


def add_commands(sub):
    """Register `minencdec generate` on an argparse subparsers object."""
    s = sub.add_parser("generate", help="generate text from a checkpoint, streamed as it is produced")
    s.add_argument("--model", required=True, help="a Gemma 2 or T5Gemma checkpoint directory")
    s.add_argument("--prompt", help="the prompt text (tokenized with the directory's tokenizer.model)")
    s.add_argument("--input-file", help="a file with one prompt per line")
    s.add_argument("--prompt-ids", help='token ids instead of text, e.g. "2 17 9" (no tokenizer needed)')
    s.add_argument("--max-new-tokens", type=int, default=32)
    s.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=None, help="seed of the sampler (reproducible output)")
    s.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    add_backend_argument(s)
    s.set_defaults(func=cmd_generate)
