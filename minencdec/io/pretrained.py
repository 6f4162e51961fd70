"""Hugging Face checkpoint directories in and out: the model kind is read from config.json.

    load_pretrained("dir", dtype="float64")   -> Gemma2Model (Gemma 2 or 3) or T5GemmaModel (T5Gemma or 2)
    adapt_checkpoints(enc_dir, dec_dir, out)  -> writes a T5Gemma (T5Gemma 2) directory

Two kinds, each in two families: "gemma2", a decoder-only model (Gemma2ForCausalLM, or
Gemma3ForCausalLM: model_type gemma3_text), and "t5gemma", an encoder-decoder
(T5GemmaForConditionalGeneration, or T5Gemma2ForConditionalGeneration); the model's
`config.family` says which family. A T5Gemma 2 checkpoint carries a vision tower and a
projector; minencdec is text-only, reads past them and says so once.

Everything is checked before anything is read or written (minencdec/files/checkpoint.py
does the tensor-level checks); a failure leaves no half-loaded model and no half-written directory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings

import numpy as np

from minencdec.files.checkpoint import (CONFIG_FILE, SAVE_TAGS, CheckpointError, check_destination, checkpoint_dir,
                                        load_tensors, read_config, save_tensors, stored_dtypes)
from minencdec.model import gemma2, t5gemma
from minencdec.model.adapt import adapt_params, adapted_config, map_name, resolve_cross_attn
from minencdec.model.backend import check_backend
from minencdec.model.classify import T5GEMMA2_ENCODER_CLASSIFIER, Classifier
from minencdec.model.config import WINDOW_RULES, GemmaConfig, T5GemmaConfig
from minencdec.model.stack import GEMMA2, T5_ENCODER, stack_param_shapes
from minencdec.model.validate import resolve_dtype

# Files beside the weights that belong to the model and travel with it: its tokenizer (a
# trimmed vocabulary's is the full tokenizer and the map, io/vocab.py) and the terms and
# notice real weights come with (io/gguf.py).
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "full_tokenizer.model", "vocab_map.json", "NOTICE", "GEMMA_TERMS.html")


def is_classifier(raw: dict) -> bool:
    """Whether a config.json dict describes a *ForSequenceClassification checkpoint."""
    return any(str(a).endswith("ForSequenceClassification") for a in raw.get("architectures") or [])


# model_type -> (kind, family of its stacks)
_MODEL_TYPES = {"gemma2": ("gemma2", "gemma2"), "gemma3_text": ("gemma2", "gemma3"),
                "t5gemma": ("t5gemma", "gemma2"), "t5gemma2": ("t5gemma", "gemma3"),
                T5GEMMA2_ENCODER_CLASSIFIER: ("t5gemma", "gemma3")}
_ARCHITECTURES = (("Gemma2", "gemma2"), ("Gemma3", "gemma3_text"), ("T5Gemma2", "t5gemma2"), ("T5Gemma", "t5gemma"))
VISION = ("model.encoder.vision_tower.", "model.encoder.multi_modal_projector.")   # T5Gemma 2's, left out


def checkpoint_kind(config: dict) -> str:
    """"gemma2" (decoder-only: Gemma2ForCausalLM, Gemma3ForCausalLM) or "t5gemma"
    (encoder-decoder: T5GemmaForConditionalGeneration, T5Gemma2ForConditionalGeneration)."""
    return _kind_and_family(config)[0]


def _kind_and_family(config: dict) -> tuple[str, str]:
    model_type, archs = config.get("model_type"), config.get("architectures") or []
    if model_type is None and isinstance(archs, list):
        for arch in map(str, archs):
            model_type = next((mt for prefix, mt in _ARCHITECTURES if arch.startswith(prefix)), None)
            if model_type:
                break
    if model_type in _MODEL_TYPES:
        return _MODEL_TYPES[model_type]
    if model_type == "gemma3":
        raise CheckpointError(f"{CONFIG_FILE}: model_type 'gemma3' is Gemma 3's multimodal model; minencdec "
                              "reads its text model (Gemma3ForCausalLM, model_type 'gemma3_text')")
    raise CheckpointError(f"{CONFIG_FILE}: model_type {model_type!r} (architectures {archs!r}) is none of "
                          "Gemma 2, Gemma 3 (text), T5Gemma, T5Gemma 2")


def read_model_config(path, raw=None, bidirectional_window=None):
    """(kind, GemmaConfig or T5GemmaConfig) of a checkpoint directory (`raw`: its
    config.json already read). `bidirectional_window` ("le", "lt", "t5gemma2"; None: as
    stored, else the family's) overrides the encoder's window rule (GemmaConfig)."""
    if bidirectional_window is not None and bidirectional_window not in WINDOW_RULES:
        raise ValueError(f"bidirectional_window must be one of {WINDOW_RULES}, got {bidirectional_window!r}")
    raw = read_config(path) if raw is None else raw
    kind, family = _kind_and_family(raw)
    source = os.path.join(str(path), "config.json")
    try:
        if kind == "gemma2":
            cfg = GemmaConfig.from_hf_dict(raw, source, family=family)
        else:
            cfg = T5GemmaConfig.from_hf_dict({**raw, "model_type": "t5gemma2" if family == "gemma3" else "t5gemma"},
                                             source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    if bidirectional_window is None:
        return kind, cfg
    if kind == "gemma2":
        raise ValueError(f"{path} holds a decoder-only model, which has no bidirectional attention: "
                         "bidirectional_window is the window rule of an encoder-decoder's encoder")
    return kind, dataclasses.replace(cfg, encoder=cfg.encoder.replace(bidirectional_window=bidirectional_window))


def load_pretrained(path, dtype="float32", expect=None, progress=None, backend="numpy", bidirectional_window=None):
    """Load a Gemma2ForCausalLM / Gemma3ForCausalLM or a T5GemmaForConditionalGeneration /
    T5Gemma2ForConditionalGeneration directory (or one of their classifiers).

    `expect` ("gemma2": decoder-only / "t5gemma": encoder-decoder) turns a checkpoint of the
    other kind into a clear error. Weights are converted tensor by tensor, so memory holds
    one copy (plus one tensor). backend: "numpy" (the reference) or "numba" (the fast
    path), see backend.py. `bidirectional_window`: the encoder's window rule ("le": |i - j|
    <= w as transformers 5.x, "lt": < w as the JAX code, "t5gemma2"), overriding the one
    config.json stores (model/config.py WINDOW_FIELD); None keeps that."""
    dtype, backend = resolve_dtype(dtype), check_backend(backend)
    raw = read_config(path)
    kind, cfg = read_model_config(path, raw, bidirectional_window)
    if expect is not None:
        _check_kind(path, kind, expect)
    if is_classifier(raw) or raw.get("model_type") == T5GEMMA2_ENCODER_CLASSIFIER:
        return _load_classifier(path, raw, kind, cfg, dtype, progress, backend)
    if kind == "gemma2":
        params = _read(path, gemma2.param_shapes(cfg), dtype, (gemma2.TIED_HEAD,), progress)
        return gemma2.Gemma2Model(cfg, params, dtype, backend)
    ignore = t5gemma.TIED_T5G2 if cfg.family == "t5gemma2" else (t5gemma.TIED_HEAD,)
    params = _read(path, t5gemma.param_shapes(cfg), dtype, ignore, progress)
    return t5gemma.T5GemmaModel(cfg, params, dtype, backend)


def _read(path, shapes, dtype, ignore, progress):
    """load_tensors, reading past T5Gemma 2's vision tensors (said once, on stderr) and
    accepting the encoder's names as transformers holds them in memory
    (model.encoder.text_model.*) as well as as it writes them (model.encoder.*)."""
    stored = stored_dtypes(path)
    vision = [n for n in stored if n.startswith(VISION)]
    if vision:
        warnings.warn(f"{path}: minencdec is text-only; left out {len(vision)} vision tensors "
                      f"({', '.join(sorted({p + '*' for p in VISION if any(n.startswith(p) for n in vision)}))})",
                      stacklevel=3)
    inner = "model.encoder.text_model."
    if not any(n.startswith(inner) for n in stored):
        return load_tensors(path, shapes, dtype, ignore=tuple(ignore) + tuple(vision), progress=progress)
    spelled = {n.replace("model.encoder.", inner, 1) if n.startswith("model.encoder.") else n: n for n in shapes}
    ignore = tuple(n.replace("model.encoder.", inner, 1) if n.startswith("model.encoder.") else n for n in ignore)
    params = load_tensors(path, {f: shapes[n] for f, n in spelled.items()}, dtype,
                          ignore=ignore + tuple(vision), progress=progress)
    return {spelled[f]: a for f, a in params.items()}


def _check_kind(path, kind: str, expect: str) -> None:
    if kind != expect:
        have = {"gemma2": "a decoder-only", "t5gemma": "an encoder-decoder"}[kind]
        want = {"gemma2": "a decoder-only (Gemma2ForCausalLM or Gemma3ForCausalLM)",
                "t5gemma": "an encoder-decoder (T5GemmaForConditionalGeneration or "
                           "T5Gemma2ForConditionalGeneration)"}[expect]
        raise CheckpointError(f"{path} holds {have} checkpoint, but {want} checkpoint is needed here")


def _load_classifier(path, raw, kind, cfg, dtype, progress, backend):
    """A Gemma2ForSequenceClassification / Gemma3TextForSequenceClassification, an
    (encoder-only) T5GemmaForSequenceClassification, or minencdec's T5Gemma 2 encoder
    classifier (model/classify.py)."""
    if kind == "t5gemma" and raw.get("is_encoder_decoder", True):
        raise CheckpointError(f"{path}: T5Gemma classification with is_encoder_decoder=true is not "
                              "supported (minencdec classifies from the encoder, the paper's setup)")
    num_labels = len(raw.get("id2label") or {}) or raw.get("num_labels") or 2
    stack = cfg.encoder if kind == "t5gemma" else cfg
    names = T5_ENCODER if kind == "t5gemma" else GEMMA2
    shapes = stack_param_shapes(stack, names)
    head = "score.out_proj." if kind == "t5gemma" else "score."
    shapes[head + "weight"] = (num_labels, stack.hidden_size)
    if kind == "t5gemma":
        shapes[head + "bias"] = (num_labels,)
    eoi = cfg.eoi_token_index if kind == "t5gemma" else None
    if eoi is not None:
        shapes[t5gemma.EOI] = (stack.hidden_size,)
    params = load_tensors(path, shapes, dtype, progress=progress)
    return Classifier(kind, stack, params, num_labels, dtype, backend, eoi)


def _tokenizer_files(path):
    """The tokenizer files of checkpoint `path` (read from the complete copy an interrupted
    save left, as the weights are)."""
    directory, out = checkpoint_dir(path), {}
    for name in TOKENIZER_FILES:
        if (directory / name).is_file():
            out[name] = (directory / name).read_bytes()
    return out


def adapt_checkpoints(encoder_from, decoder_from, out, cross_attn="auto", seed=0, dtype="float32",
                      save_dtype=None, progress=None, overwrite=False):
    """Read two Gemma 2 checkpoints (or one twice), write the adapted T5Gemma checkpoint to
    `out` crash-consistently, carrying the decoder source's tokenizer files along. Returns
    (config, mode). A balanced pair given as one directory is read only once.

    Every tensor is copied bit for bit: the sources are read at a working precision that
    holds their stored dtypes exactly (float64 if any tensor is F64, else float32, which
    holds BF16/F16/F32; `dtype` "float64" asks for float64 regardless, "float32" never
    narrows) and each tensor is written in its source's stored dtype (random
    cross-attention in the decoder source's). `save_dtype` writes every tensor in that
    dtype instead. `out` may never be, contain or lie inside a source; an existing non-empty
    `out` is replaced only with `overwrite=True` and only if it holds nothing but a
    checkpoint's own files (see save_tensors). All of this is checked before any weight is
    read or anything written."""
    sources = {"encoder": encoder_from, "decoder": decoder_from}
    _check_out(out, sources)
    check_destination(out, overwrite=overwrite, extra_names=_tokenizer_names(decoder_from))
    configs = {}
    for side, src in sources.items():
        raw = read_config(src)
        kind, configs[side] = read_model_config(src, raw)
        _check_kind(src, kind, "gemma2")
        if is_classifier(raw):
            raise CheckpointError(f"{src} holds a sequence classifier; adaptation needs a Gemma2ForCausalLM")
    eoi = _eoi_token_index(decoder_from, configs["decoder"])
    resolve_cross_attn(cross_attn, adapted_config(configs["encoder"], configs["decoder"], eoi))
    stored = {side: stored_dtypes(src) for side, src in sources.items()}
    exact = "float64" if any("F64" in tags.values() for tags in stored.values()) else "float32"
    work = "float64" if resolve_dtype(dtype) == np.float64 else exact
    enc = load_pretrained(encoder_from, work, expect="gemma2", progress=progress)
    same = os.path.realpath(str(encoder_from)) == os.path.realpath(str(decoder_from))
    dec = enc if same else load_pretrained(decoder_from, work, expect="gemma2", progress=progress)
    config, params, mode = adapt_params(enc.params, enc.config, dec.params, dec.config, cross_attn, seed,
                                        eoi_token_index=eoi)
    hf = config.to_hf_dict()
    hf["minencdec_adaptation"] = {"encoder_from": os.path.abspath(str(encoder_from)),
                                  "decoder_from": os.path.abspath(str(decoder_from)),
                                  "cross_attn": mode, "seed": seed}
    save_tensors(out, params, hf, dtype=save_dtype or _source_dtypes(params, stored),
                 extra_files=_tokenizer_files(decoder_from), overwrite=overwrite)
    return config, mode


def _eoi_token_index(path, config):
    """T5Gemma 2's eoi token in the decoder source's ids: 256000 in Gemma 3's vocabulary, or
    where a trimmed vocabulary's map put it (None when the map dropped it: eoi_embedding then
    starts at zero and no input token reaches it)."""
    if config.family != "gemma3":
        return None
    map_file = checkpoint_dir(path) / "vocab_map.json"
    if not map_file.is_file():
        return None                                       # the default, 256000
    kept = json.loads(map_file.read_text(encoding="utf-8")).get("kept_ids") or []
    return kept.index(256_000) if 256_000 in kept else len(kept)    # len(kept): beyond the vocabulary


def _check_out(out, sources: dict) -> None:
    """Adaptation never writes over, into or around one of its sources (symlinks followed)."""
    target = os.path.realpath(str(out))
    for side, src in sources.items():
        source = os.path.realpath(str(src))
        common = os.path.commonpath([target, source])
        relation = ("is" if target == source else "is inside" if common == source
                    else "contains" if common == target else None)
        if relation:
            raise CheckpointError(f"the output directory {out} {relation} the {side} source {src}: "
                                  "adaptation never writes over its sources; choose another directory")


def _tokenizer_names(path) -> tuple[str, ...]:
    directory = checkpoint_dir(path)
    return tuple(name for name in TOKENIZER_FILES if (directory / name).is_file())


def _source_dtypes(params: dict, stored: dict) -> dict[str, str]:
    """Each adapted tensor -> the dtype its source stores it in. Cross-attention (copied from
    the decoder's self-attention, or random) takes the decoder source's dtype: its one stored
    dtype, or, if it mixes several, the narrowest that holds them all exactly (F64 or F32)."""
    name_of = {tag: name for name, tag in SAVE_TAGS.items()}
    out = {}
    for side in ("encoder", "decoder"):
        for name, tag in stored[side].items():
            if name != "lm_head.weight":                  # tied to the embedding: not copied
                out[map_name(name, side)] = name_of[tag]
    tags = {tag for name, tag in stored["decoder"].items() if name != "lm_head.weight"}
    common = tags.pop() if len(tags) == 1 else "F64" if "F64" in tags else "F32"
    return {name: out.get(name, name_of[common]) for name in params}
