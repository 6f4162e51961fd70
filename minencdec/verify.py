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

Activations are float64 or float32 (the precision the producer computed in). Outputs at
padding positions are implementation-defined (a left-padded causal query sees no key), so
only positions whose mask is 1 are compared: `encoder.*` under attention_mask,
`decoder.*` and T5Gemma's logits under decoder_attention_mask.

Axes: B batch, S encoder (or Gemma 2) length, T decoder length, D width, V vocab.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
from dataclasses import dataclass

import numpy as np

FORMAT, FORMAT_VERSION = "minencdec-activations", "1"
INPUT_NAMES = ("input_ids", "attention_mask", "decoder_input_ids", "decoder_attention_mask")
# Two float64 implementations of the same model agree to ~1e-14 of a tensor's scale (only
# the rounding order differs; measured on the test models, transformers made exact). 1e-9
# leaves room for 40-layer models yet flags a float64 path that rounds through float32
# somewhere (transformers' unpatched RMSNorm / softmax / RoPE: 1e-7 to 1e-6 after 3 layers),
# and every real mistake (a missing `1 +`, wrong window, scale, softcap, RoPE pairing) >= 1e-4.
RTOL_F64 = 1e-9
# float32 against float64: 1e-6 to 6e-6 after 2-3 tiny layers (measured); 26-42 layers of
# width 2304-3584 grow that towards 1e-4, so 1e-3 keeps a margin. Subtle bugs can hide below
# it (erf GELU instead of tanh is ~1e-3): verify in float64 first, where they stand out.
RTOL_F32 = 1e-3
ATOL = 0.0      # errors are already scaled by max |B|; atol only matters for all-zero tensors


class DumpError(ValueError):
    """An activation dump that cannot be read or used; the message names the file."""


# --------------------------------------------------------------------------- producing dumps

def model_inputs(kind, config, input_ids, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None) -> dict[str, np.ndarray]:
    """The int64 inputs with every default made explicit, so both producers see the same masks:
    Gemma 2 mask all ones, T5Gemma masks `ids != pad`, decoder ids one bos token per row."""
    from .validate import check_ids, check_mask
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
                   decoder_attention_mask=None) -> dict[str, np.ndarray]:
    """Every activation of a Gemma2Model / T5GemmaModel, plus the inputs (the dump format)."""
    from .t5gemma import T5GemmaModel
    kind = "t5gemma" if isinstance(model, T5GemmaModel) else "gemma2"
    x = model_inputs(kind, model.config, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
    record = {}
    if kind == "gemma2":
        model.logits(x["input_ids"], x["attention_mask"], record=record)
    else:
        model.logits(x["input_ids"], x["decoder_input_ids"], x["attention_mask"],
                     x["decoder_attention_mask"], record=record)
    return {**x, **record}


_LAYER = r"((?:en|de)coder\.)?layers\.\d+"
# transformers' post-norm module -> our sublayer name (its output is the sublayer's output).
_HF_POST_NORMS = {"post_attention_layernorm": "self_attn", "post_self_attn_layernorm": "self_attn",
                  "post_cross_attn_layernorm": "cross_attn", "post_feedforward_layernorm": "mlp"}


def _lm_config(path):
    """(kind, config) of a language-model checkpoint directory; classifiers are refused."""
    from .checkpoint import read_config
    from .pretrained import is_classifier, read_model_config
    raw = read_config(path)
    if is_classifier(raw):
        raise ValueError(f"{path} is a classifier; dumps need a Gemma2ForCausalLM or "
                         "T5GemmaForConditionalGeneration checkpoint")
    return read_model_config(path, raw)


def _hf_record_name(module_name):
    """transformers module name -> the activation its forward output is, or None."""
    name = module_name.removeprefix("model.")       # "encoder.layers.0.post_self_attn_layernorm"
    head, _, last = name.rpartition(".")
    if last in _HF_POST_NORMS and re.fullmatch(_LAYER, head):
        return f"{head}.{_HF_POST_NORMS[last]}"
    if re.fullmatch(_LAYER, name) or re.fullmatch(r"((?:en|de)coder\.)?norm", name):
        return name
    return None


def dump_transformers(path, input_ids, attention_mask=None, decoder_input_ids=None,
                      decoder_attention_mask=None, dtype="float64", exact=True) -> dict[str, np.ndarray]:
    """The same activations from transformers' eager Gemma2ForCausalLM /
    T5GemmaForConditionalGeneration loaded from checkpoint directory `path`, captured by
    forward hooks (a pre-hook on layer 0 for `embed`). `exact`: under float64_exact(), so a
    float64 run has no float32 islands. Needs the `oracle` extra."""
    from .hf_oracle import float64_exact
    from .validate import resolve_dtype
    kind, config = _lm_config(path)
    x = model_inputs(kind, config, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)
    try:
        import torch
        import transformers
    except ImportError as e:
        raise ImportError("dump_transformers needs torch and transformers: pip install -e '.[oracle]'") from e
    cls = transformers.Gemma2ForCausalLM if kind == "gemma2" else transformers.T5GemmaForConditionalGeneration
    torch_dtype = getattr(torch, resolve_dtype(dtype).name)
    model = cls.from_pretrained(str(path), attn_implementation="eager", dtype=torch_dtype).eval()
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

def write_dump(path, acts: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a dump atomically (a temporary file beside `path`, then renamed). `metadata`
    needs `kind`; `format` and `format_version` are set here."""
    from safetensors.numpy import save_file
    meta = {**{k: str(v) for k, v in metadata.items()}, "format": FORMAT, "format_version": FORMAT_VERSION}
    if meta.get("kind") not in ("gemma2", "t5gemma"):
        raise DumpError(f"{path}: metadata 'kind' must be 'gemma2' or 't5gemma', got {meta.get('kind')!r}")
    tensors = {k: np.ascontiguousarray(v, np.int64 if k in INPUT_NAMES else None) for k, v in acts.items()}
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)),
                       f".{os.path.basename(path)}.tmp-{secrets.token_hex(4)}")
    try:
        save_file(tensors, tmp, metadata=meta)
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


# --------------------------------------------------------------------------- comparing

@dataclass(frozen=True)
class Row:
    """One line of the report."""
    name: str
    status: str                  # OK, DIFF, MISSING (in one dump only), SHAPE
    max_abs: float = float("nan")
    max_rel: float = float("nan")  # max abs error / max |B| over the compared positions
    worst: tuple = ()            # index of the largest error
    note: str = ""


_ORDER = re.compile(r"(?:(encoder|decoder)\.)?"
                    r"(?:(embed)|layers\.(\d+)(?:\.(self_attn|cross_attn|mlp))?|(norm))")
_SUBLAYERS = {"self_attn": 0, "cross_attn": 1, "mlp": 2, None: 3}


def model_order(name):
    """Sort key: embed, each layer's sublayers then the layer, norm; encoder before decoder;
    logits, then unknown names."""
    m = _ORDER.fullmatch(name)
    if name == "logits" or m is None:
        return (2 if name == "logits" else 3, 0, 0, name)
    layer = -1 if m[2] else 10**9 if m[5] else int(m[3])
    return (int(m[1] == "decoder"), layer, _SUBLAYERS[m[4]], name)


def valid_positions(acts) -> dict[str, np.ndarray]:
    """Activation name -> (B, L) bool: its non-pad positions, from the dump's input masks."""
    dec = "decoder_attention_mask" in acts
    return {name: acts["decoder_attention_mask" if dec and (name.startswith("decoder.") or name == "logits")
                       else "attention_mask"] != 0
            for name in acts if name not in INPUT_NAMES}


def _compare_one(name, x, y, rtol, atol, keep):
    if x.shape != y.shape:
        return Row(name, "SHAPE", note=f"{x.shape} vs {y.shape}")
    if keep is not None and keep.shape != x.shape[:keep.ndim]:
        return Row(name, "SHAPE", note=f"{x.shape} does not start with the mask's {keep.shape}")
    keep = np.ones(x.shape, bool) if keep is None else np.broadcast_to(
        keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim)), x.shape)
    x, y = x.astype(np.float64), y.astype(np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, np.abs(x - y), np.inf)       # a NaN or inf counts as infinitely wrong
    diff[~keep] = 0.0                                         # padding positions are not compared
    if diff.size == 0:
        return Row(name, "OK", 0.0, 0.0)
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    scale = float(np.max(np.abs(y), where=keep & finite, initial=0.0))
    err = float(diff[worst])
    rel = err / scale if scale > 0 else (0.0 if err == 0 else np.inf)
    ok = err <= atol + rtol * scale
    note = "" if np.all(finite | ~keep) else "non-finite values"
    return Row(name, "OK" if ok else "DIFF", err, rel, tuple(int(i) for i in worst), note)


def compare(a, b, rtol, atol=ATOL, valid=None) -> list[Row]:
    """One row per activation name in either dump, in model order. b is the reference:
    an entry fails when |a - b| > atol + rtol * max |b|. `valid`: name -> (B, L) bool of the
    positions to compare (see `valid_positions`); None compares every position."""
    names = sorted((set(a) | set(b)) - set(INPUT_NAMES), key=model_order)
    rows = []
    for n in names:
        if n not in a or n not in b:
            rows.append(Row(n, "MISSING", note=f"only in {'B' if n not in a else 'A'}"))
        else:
            rows.append(_compare_one(n, np.asarray(a[n]), np.asarray(b[n]), rtol, atol,
                                     None if valid is None else valid.get(n)))
    return rows


def compare_dumps(a, b, rtol=None, atol=ATOL) -> list[Row]:
    """`compare` two dumps made from the same inputs, at their non-pad positions. rtol None:
    RTOL_F32 when either dump holds float32 (or lower) activations, else RTOL_F64."""
    for name in INPUT_NAMES:
        if (name in a) != (name in b) or (name in a and not np.array_equal(a[name], b[name])):
            raise ValueError(f"the dumps were made from different inputs ({name} differs); "
                             "dump both from the same token ids and masks")
    if rtol is None:
        coarse = any(v.dtype != np.float64 for d in (a, b) for k, v in d.items() if k not in INPUT_NAMES)
        rtol = RTOL_F32 if coarse else RTOL_F64
    return compare(a, b, rtol, atol, valid_positions(b))


def format_report(rows) -> str:
    """One line per row, then the first divergence (or that all agree)."""
    width = max([len(r.name) for r in rows] + [4])
    lines = [f"{'':7} {'name':<{width}}  {'max abs':>9}  {'max rel':>9}  worst index"]
    for r in rows:
        numbers = f"{r.max_abs:9.2e}  {r.max_rel:9.2e}  {r.worst}" if r.status in ("OK", "DIFF") else ""
        lines.append(f"{r.status:<7} {r.name:<{width}}  {numbers}{'  ' + r.note if r.note else ''}".rstrip())
    bad = [r for r in rows if r.status in ("DIFF", "SHAPE")]
    missing = sum(r.status == "MISSING" for r in rows)
    if bad:
        r = bad[0]
        lines.append(f"first divergence: {r.name}" + (f" (max rel {r.max_rel:.2e} at {r.worst})"
                                                      if r.status == "DIFF" else f" ({r.note})"))
    elif not missing:
        lines.append(f"all {len(rows)} tensors agree")
    if missing:
        lines.append(f"{missing} tensor(s) are in only one dump")
    return "\n".join(lines)
