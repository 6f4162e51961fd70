"""Verify another Gemma 2 / T5Gemma implementation layer by layer against minencdec.

    minencdec dump --model DIR --input-ids "2 45 17 9" --out ours.safetensors
    (your JAX / PyTorch / C++ code writes theirs.safetensors in the same format)
    minencdec compare theirs.safetensors ours.safetensors      -> one line per sublayer
    minencdec compare --model DIR --against theirs.safetensors  (reruns their inputs here)
    minencdec compare --model DIR --against transformers --input-ids "2 45 17 9"

The report has one row per tensor in model order (embed, each layer's sublayers and the
layer, norm; encoder before decoder; logits): OK, DIFF (|A - B| > rtol * max |B| at some
non-pad position; B is the reference), MISSING (in one dump only) or SHAPE, with the max
abs / rel error and the worst index, then "first divergence: NAME". Exit code 0 when all
agree, 1 otherwise, 2 on bad input.

Dump format (version 1): one safetensors file. Metadata (strings): `format` =
"minencdec-activations", `format_version` = "1", `kind` ("gemma2" or "t5gemma"); and, for
the reader's benefit, `dtype` ("float64"/"float32"), `producer` ("minencdec", "transformers
5.23.0", ...) and `model` (the checkpoint path). Tensors, all row-major:

  inputs (int64)   input_ids, attention_mask                              (B, S)
                   T5Gemma also decoder_input_ids, decoder_attention_mask (B, T)
                   masks are 1 for a token, 0 for padding (right or left)
  Gemma 2          embed, layers.{i}.self_attn, layers.{i}.mlp, layers.{i}, norm, logits
  T5Gemma          encoder.embed, encoder.layers.{i}.self_attn, encoder.layers.{i}.mlp,
                   encoder.layers.{i}, encoder.norm, decoder.embed,
                   decoder.layers.{i}.self_attn, decoder.layers.{i}.cross_attn,
                   decoder.layers.{i}.mlp, decoder.layers.{i}, decoder.norm, logits

  embed            E[ids] * sqrt(D), the input of layer 0                 (B, L, D)
  <sublayer>       the sublayer's output AFTER its post-norm: the term
                   added to the residual stream, post_norm(f(pre_norm(h)))  (B, L, D)
  layers.{i}       the layer's output (the residual stream after it)      (B, L, D)
  norm             after the stack's final RMSNorm                        (B, L, D)
  logits           after the final softcap (decoder positions)            (B, T, V)

  <attention>.q, .k, .scores, .probs   optional, for chosen attention sublayers (`dump
                   --internals encoder.layers.0`): q, k after RoPE, scores after the
                   softcap, probabilities; shapes and rules in internals.py

Activations are float64 or float32 (the precision the producer computed in). Outputs at
padding positions are implementation-defined (a left-padded causal query sees no key), so
only positions whose mask is 1 are compared: `encoder.*` under attention_mask,
`decoder.*` and T5Gemma's logits under decoder_attention_mask. Optional metadata
`bidirectional_window` ("le", "lt", "t5gemma2") names the encoder's window rule the
producer applied; `compare --model DIR --against FILE` says when it is not the model's.

Writing a dump from another implementation: `minencdec.verify.write_dump(path, tensors,
metadata)` with numpy arrays under the names above (the inputs as int64, masks 1 = token)
and metadata holding at least `kind`. From JAX/Flax, `capture_intermediates` returns every
module's output, and `sow` records a value inside a module (here q after RoPE):

    out, state = model.apply({"params": params}, decoder_ids, encoder_ids,   # gemma's T5Gemma:
                             capture_intermediates=True, mutable=["intermediates"])   # decoder first
    enc = state["intermediates"]["encoder"]
    acts = {"encoder.embed": ...,          # capture_intermediates=lambda m, name: True also keeps
                                           # Embedder.encode, a method other than __call__
            "encoder.layers.0.self_attn": enc["layer_0"]["post_attention_norm"]["__call__"][0],
            "encoder.layers.0.mlp": enc["layer_0"]["post_ffw_norm"]["__call__"][0],
            "encoder.layers.0": enc["layer_0"]["__call__"][0][2],     # a Block returns (cache, cache, x)
            "encoder.norm": enc["final_norm"]["__call__"][0], ..., "logits": out.logits}
    # inside Attention:  self.sow("intermediates", "q", q)   ->  enc["layer_0"]["attn"]["q"][0]
    #                    (B, T, N, H) in Flax: transpose(0, 2, 1, 3) to this format's (B, H, T, Dh)
    write_dump("theirs.safetensors", {**inputs, **{k: np.asarray(v) for k, v in acts.items()}},
               {"kind": "t5gemma", "dtype": "float64", "producer": "gemma 3.3.0"})

tests/verify/jax_golden/make_jax_golden.py does this in full for gemma's T5Gemma.

Axes: B batch, S encoder (or Gemma 2) length, T decoder length, D width, V vocab.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import stat

import numpy as np

from minencdec.files.checkpoint import read_config
from minencdec.io.pretrained import is_classifier, read_model_config
from minencdec.model.t5gemma import T5GemmaModel
from minencdec.model.validate import check_ids, check_mask, resolve_dtype

from .internals import attention_internals, select_sublayers

FORMAT, FORMAT_VERSION = "minencdec-activations", "1"
_MAX_HEADER = 100_000_000          # the safetensors library's own limit on the header length
INPUT_NAMES = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")


class DumpError(ValueError):
    """An activation dump that cannot be read or used; the message names the file."""


# --------------------------------------------------------------------------- producing dumps

def model_inputs(kind, config, input_ids, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None) -> dict[str, np.ndarray]:
    """The int64 inputs with every default made explicit, so both producers see the same masks:
    Gemma 2 mask all ones, T5Gemma masks `ids != pad`, decoder ids one bos token per row."""
    enc = config.encoder if kind == "t5gemma" else config
    ids = check_ids(input_ids, enc.vocab_size, "input_ids")
    mask = check_mask(attention_mask, ids.shape, "attention_mask")
    default = (ids != enc.pad_token_id) if kind == "t5gemma" else np.ones(ids.shape, bool)
    x = {"input_ids": ids, "attention_mask": (default if mask is None else mask).astype(np.int64)}
    if kind == "gemma2":
        if decoder_input_ids is not None or decoder_attention_mask is not None:
            raise ValueError("decoder inputs are for T5Gemma; this is a Gemma 2 decoder-only model")
        return x
    dec = config.decoder
    if decoder_input_ids is None:
        decoder_input_ids = np.full((ids.shape[0], 1), dec.bos_token_id)
    dids = check_ids(decoder_input_ids, dec.vocab_size, "decoder_input_ids")
    if dids.shape[0] != ids.shape[0]:
        raise ValueError(f"decoder_input_ids have batch {dids.shape[0]}, input_ids {ids.shape[0]}")
    dmask = check_mask(decoder_attention_mask, dids.shape, "decoder_attention_mask")
    x.update(decoder_input_ids=dids,
             decoder_attention_mask=((dids != dec.pad_token_id) if dmask is None else dmask).astype(np.int64))
    return x


def dump_minencdec(model, input_ids, attention_mask=None, decoder_input_ids=None,
                   decoder_attention_mask=None, internals=()) -> dict[str, np.ndarray]:
    """Every activation of a Gemma2Model / T5GemmaModel, plus the inputs (the dump format).
    `internals`: attention sublayers or layers ("encoder.layers.0", "all") whose q, k,
    scores and probs are dumped too (internals.py)."""
    kind = "t5gemma" if isinstance(model, T5GemmaModel) else "gemma2"
    x = model_inputs(kind, model.config, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
    chosen = select_sublayers(model, internals)               # a bad name fails before the work
    record = {}
    if kind == "gemma2":
        model.logits(x["input_ids"], x["attention_mask"], record=record)
    else:
        model.logits(x["input_ids"], x["decoder_input_ids"], x["attention_mask"],
                     x["decoder_attention_mask"], record=record)
    acts = {**x, **record}
    return {**acts, **attention_internals(model, acts, chosen)}


_LAYER = r"((?:en|de)coder\.)?layers\.\d+"
# transformers' post-norm module -> our sublayer name (its output is the sublayer's output).
_HF_POST_NORMS = {"post_attention_layernorm": "self_attn", "post_self_attn_layernorm": "self_attn",
                  "post_cross_attn_layernorm": "cross_attn", "post_feedforward_layernorm": "mlp"}


def _lm_config(path, bidirectional_window=None):
    """(kind, config) of a language-model checkpoint directory; classifiers are refused.
    bidirectional_window: see load_pretrained."""
    raw = read_config(path)
    if is_classifier(raw):
        raise ValueError(f"{path} is a classifier; dumps need a language model checkpoint (Gemma2ForCausalLM, "
                         "Gemma3ForCausalLM, T5GemmaForConditionalGeneration or T5Gemma2ForConditionalGeneration)")
    return read_model_config(path, raw, bidirectional_window)


def _hf_record_name(module_name):
    """transformers module name -> the activation its forward output is, or None."""
    name = module_name.removeprefix("model.")       # "encoder.layers.0.post_self_attn_layernorm"
    name = name.replace("encoder.text_model.", "encoder.", 1)   # T5Gemma 2 nests its text encoder
    head, _, last = name.rpartition(".")
    if last in _HF_POST_NORMS and re.fullmatch(_LAYER, head):
        return f"{head}.{_HF_POST_NORMS[last]}"
    if re.fullmatch(_LAYER, name) or re.fullmatch(r"((?:en|de)coder\.)?norm", name):
        return name
    return None


def dump_transformers(path, input_ids, attention_mask=None, decoder_input_ids=None,
                      decoder_attention_mask=None, dtype="float64", exact=True) -> dict[str, np.ndarray]:
    """The same activations from transformers' eager Gemma2ForCausalLM / Gemma3ForCausalLM /
    T5GemmaForConditionalGeneration / T5Gemma2ForConditionalGeneration loaded from checkpoint
    directory `path`, captured by
    forward hooks (a pre-hook on layer 0 for `embed`). `exact`: under float64_exact(), so a
    float64 run has no float32 islands. Needs the `oracle` extra."""
    from .hf_oracle import float64_exact
    kind, config = _lm_config(path)
    x = model_inputs(kind, config, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError("dump_transformers needs torch and transformers: pip install -e '.[oracle]'") from e
    cls = {"gemma2": transformers.Gemma2ForCausalLM, "gemma3": transformers.Gemma3ForCausalLM,
           "t5gemma": transformers.T5GemmaForConditionalGeneration,
           "t5gemma2": transformers.T5Gemma2ForConditionalGeneration}[config.family]
    torch_dtype = getattr(torch, resolve_dtype(dtype).name)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()       # a T5Gemma 2's vision tower: reported missing, unused
    try:
        model = cls.from_pretrained(str(path), attn_implementation="eager", dtype=torch_dtype).eval()
    finally:
        transformers.logging.set_verbosity(verbosity)
    acts, hooks = {}, []

    def save(name, h):
        acts[name] = (h[0] if isinstance(h, tuple) else h).detach().cpu().numpy().copy()
    for module_name, module in model.named_modules():
        if (name := _hf_record_name(module_name)) is None:
            continue
        hooks.append(module.register_forward_hook(lambda m, args, out, name=name: save(name, out)))
        if name.endswith("layers.0"):      # layer 0's input is the scaled embedding (T5Gemma
            embed = name.removesuffix("layers.0") + "embed"     # scales after embed_tokens)
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, kwargs, embed=embed: save(embed, args[0] if args else kwargs["hidden_states"]),
                with_kwargs=True))
    try:
        with torch.no_grad(), (float64_exact() if exact else contextlib.nullcontext()):
            out = model(**{k: torch.from_numpy(v) for k, v in x.items()}, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {**x, **acts, "logits": out.logits.detach().cpu().numpy()}


# --------------------------------------------------------------------------- files

def check_dump_target(path) -> None:
    """Refuse a destination a dump must not take: a folder that does not exist, a directory,
    or an existing file that is not an activation dump (a checkpoint's model.safetensors,
    say: the metadata in its header tells). An older dump may be replaced. write_dump calls
    this; a command calls it too before computing the dump, to fail early."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise DumpError(f"{path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise DumpError(f"{path} is a directory; give a file name, e.g. {os.path.join(path, 'ours.safetensors')}")
    if os.path.lexists(path):
        tag = _format_tag(path)
        if tag != FORMAT:
            raise DumpError(f"{path} exists and is not a minencdec activation dump (format tag {tag!r}); "
                            "refusing to overwrite it: choose another file or delete it first")


def _format_tag(path):
    """The `format` entry of a safetensors file's header metadata, read by hand (8-byte length,
    JSON header); None for anything that is not a readable safetensors file."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):         # a FIFO would block the read
            return None
        with open(path, "rb") as f:
            prefix = f.read(8)
            n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 2 <= n <= min(_MAX_HEADER, os.path.getsize(path) - 8):
                return None
            header = json.loads(f.read(n))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta.get("format") if isinstance(meta, dict) else None


def write_dump(path, acts: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a dump (public API: how another implementation writes its activations, see the
    module docstring). `acts`: name -> numpy array, names and shapes of the format (inputs
    as integers; they are stored as int64); `metadata`: strings, `kind` ("gemma2" or
    "t5gemma") required, `dtype`, `producer`, `model`, `bidirectional_window` for the
    reader; `format` and `format_version` are set here. Written atomically (a temporary file
    beside `path`, flushed to disk, then renamed over it). A file at `path` that is not a
    dump is refused (check_dump_target), never replaced."""
    from safetensors.numpy import save_file
    meta = {**{k: str(v) for k, v in metadata.items()}, "format": FORMAT, "format_version": FORMAT_VERSION}
    if meta.get("kind") not in ("gemma2", "t5gemma"):
        raise DumpError(f"{path}: metadata 'kind' must be 'gemma2' or 't5gemma', got {meta.get('kind')!r}")
    check_dump_target(path)
    tensors = {k: np.ascontiguousarray(v, np.int64 if k in INPUT_NAMES else None) for k, v in acts.items()}
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp-{secrets.token_hex(4)}")
    try:
        save_file(tensors, tmp, metadata=meta)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())                 # on disk before the rename makes it the dump
        os.replace(tmp, path)                    # readers see the old file or the whole new one
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def read_dump(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a dump file, with errors that name the file."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise DumpError(f"{path}: no such dump file")
    try:
        with safe_open(str(path), "numpy") as f:
            meta, acts = dict(f.metadata() or {}), {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:                        # safetensors raises its own error types
        raise DumpError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise DumpError(f"{path}: format tag {meta.get('format')!r}, expected {FORMAT!r} "
                        "(a minencdec activation dump, not a checkpoint)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise DumpError(f"{path}: format_version {meta.get('format_version')!r}; this minencdec "
                        f"reads version {FORMAT_VERSION!r}")
    kind = meta.get("kind")
    needed = INPUT_NAMES if kind == "t5gemma" else INPUT_NAMES[:2] if kind == "gemma2" else None
    if needed is None:
        raise DumpError(f"{path}: metadata kind {kind!r}, expected 'gemma2' or 't5gemma'")
    for name in needed:
        if name not in acts or not np.issubdtype(acts[name].dtype, np.integer):
            raise DumpError(f"{path}: needs the integer input tensor {name!r} ({kind} dump)")
    return acts, meta
