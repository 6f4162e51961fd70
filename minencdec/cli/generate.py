"""`minencdec generate`: stream a continuation of a prompt from any checkpoint (KV caches,
greedy or sampled; the decoding loop is minencdec.model.generate)."""

from __future__ import annotations

import os
import sys

import numpy as np

from minencdec.files.checkpoint import read_config
from minencdec.io.pretrained import is_classifier, load_pretrained
from minencdec.io.tokenizer import TOKENIZER_FILE
from minencdec.io.vocab import MAP_FILE, load_tokenizer
from minencdec.model.backend import prepare
from minencdec.model.generate import decoder_config, generate
from minencdec.model.t5gemma import T5GemmaModel

from .options import add_backend_argument, non_negative_int, positive_float, positive_int, unit_interval


def cmd_generate(args):
    """Stream each prompt's continuation to stdout, as text when the checkpoint directory has a
    tokenizer (tokenizer.model, or a trimmed vocabulary's map: io/vocab.py), else as ids.
    Text prompts get bos in front, as Gemma's tokenizer does; --prompt-ids are used as given.
    One prompt at a time (batch 1)."""
    if args.prompt_ids is None and args.prompt is None and args.input_file is None:
        raise ValueError("give --prompt, --input-file or --prompt-ids")
    if is_classifier(read_config(args.model)):
        raise ValueError(f"{args.model} is a classifier checkpoint: it has no language-model head to generate "
                         "with (give a Gemma2ForCausalLM, Gemma3ForCausalLM, T5GemmaForConditionalGeneration "
                         "or T5Gemma2ForConditionalGeneration)")
    prepare(args.backend)
    model = load_pretrained(args.model, args.dtype, backend=args.backend)
    c = decoder_config(model)
    is_t5 = isinstance(model, T5GemmaModel)
    has_tokenizer = any(os.path.isfile(os.path.join(args.model, name)) for name in (TOKENIZER_FILE, MAP_FILE))
    if not has_tokenizer and args.prompt_ids is None:
        raise ValueError(f"{args.model} has no tokenizer.model; give token ids instead, "
                         f"e.g. --prompt-ids \"{c.bos_token_id} 17 9\" (the output is then printed as ids)")
    sp = load_tokenizer(args.model) if has_tokenizer else None
    if args.prompt_ids is not None:
        prompts = [prompt_ids(args.prompt_ids, (model.config.encoder if is_t5 else c).vocab_size)]
    else:
        if args.input_file:
            with open(args.input_file, encoding="utf-8") as f:
                texts = [line.rstrip("\n") for line in f if line.strip()]
        else:
            texts = [args.prompt]
        prompts = [sp.encode(t, add_bos=True) for t in texts]
    for prompt in prompts:                 # every prompt checked before the first is generated
        check_room(args.max_new_tokens, c.max_position_embeddings, 1 if is_t5 else len(prompt))
    for prompt in prompts:
        shown, out = [], ""

        def show(tokens):                  # stream: print the text the new token adds
            nonlocal out
            if int(tokens[0]) in (c.eos_token_id, c.pad_token_id):
                return
            shown.append(int(tokens[0]))
            text = " ".join(map(str, shown)) if sp is None else \
                sp.decode([i for i in shown if i < sp.vocab_size])         # ids past the tokenizer: dropped
            sys.stdout.write(text[len(out):] if text.startswith(out) else "\n" + text)
            sys.stdout.flush()
            out = text

        generate(model, np.array([prompt]), args.max_new_tokens, do_sample=not args.greedy,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=show)
        sys.stdout.write("\n")
    return 0


def prompt_ids(text, vocab_size) -> list[int]:
    """--prompt-ids "2 17 9" as ids, each checked against the vocabulary by itself."""
    ids = []
    for token in text.replace(",", " ").split():
        try:
            ids.append(int(token))
        except ValueError:
            raise ValueError(f"--prompt-ids: {token!r} is not an integer token id") from None
        if not 0 <= ids[-1] < vocab_size:
            raise ValueError(f"--prompt-ids: id {ids[-1]} is outside the vocabulary [0, {vocab_size})")
    if not ids:
        raise ValueError("--prompt-ids holds no token id")
    return ids


def check_room(max_new_tokens, max_positions, used):
    """New tokens must fit in the positions the decoder has left: past max_position_embeddings
    RoPE extrapolates (and the number asked for could be unbounded). `used`: the prompt's
    length (decoder-only) or 1 for the encoder-decoder's start token."""
    room = max_positions - used
    if room < 1:
        raise ValueError(f"the prompt has {used} tokens, which fill the model's max_position_embeddings "
                         f"({max_positions}): no room for a new token")
    if max_new_tokens > room:
        raise ValueError(f"--max-new-tokens {max_new_tokens} does not fit: the model has max_position_embeddings "
                         f"{max_positions}, and {used} position(s) hold the decoder's prompt, so at most {room}")


def add_commands(sub):
    """Register `minencdec generate` on an argparse subparsers object."""
    s = sub.add_parser("generate", help="generate text from a checkpoint, streamed as it is produced")
    s.add_argument("--model", required=True, help="a Gemma 2 or T5Gemma checkpoint directory")
    s.add_argument("--prompt", help="the prompt text (tokenized with the directory's tokenizer.model)")
    s.add_argument("--input-file", help="a file with one prompt per line")
    s.add_argument("--prompt-ids", help='token ids instead of text, e.g. "2 17 9" (no tokenizer needed)')
    s.add_argument("--max-new-tokens", type=positive_int, default=32,
                   help="at most max_position_embeddings minus the prompt")
    s.add_argument("--greedy", action="store_true", help="argmax decoding (default: sampling)")
    s.add_argument("--temperature", type=positive_float, default=1.0)
    s.add_argument("--top-k", type=positive_int, default=None)
    s.add_argument("--top-p", type=unit_interval, default=None)
    s.add_argument("--seed", type=non_negative_int, default=None, help="seed of the sampler (reproducible output)")
    s.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    add_backend_argument(s)
    s.set_defaults(func=cmd_generate)
