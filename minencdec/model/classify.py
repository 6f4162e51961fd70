"""Sequence classification (the paper's SuperGLUE setup), forward and backward.

A linear head reads one position of a stack's final hidden states:
  - encoder-decoder: the T5Gemma *encoder*'s last non-pad token, head `score.out_proj`
    with a bias (transformers' T5GemmaForSequenceClassification, is_encoder_decoder=False).
    The same on a T5Gemma 2 encoder; transformers has no encoder-only T5Gemma 2 classifier
    (its T5Gemma2ForSequenceClassification reads the decoder), so that checkpoint gets a
    model_type of minencdec's own, which transformers refuses rather than misreads;
  - decoder-only baseline: the last non-pad token of a Gemma 2 (Gemma 3) stack, head `score`
    without a bias (transformers' Gemma2ForSequenceClassification,
    Gemma3TextForSequenceClassification: no bias, so neither here).
"Last non-pad" is transformers' rule: the rightmost position whose id is not pad, which
handles left and right padding alike. The loss is the mean cross-entropy over the batch.

Axes: B batch, T length, D width, C classes.
"""

from __future__ import annotations

import numpy as np

from minencdec.files.checkpoint import save_tensors

from . import gemma2, t5gemma
from .config import T5GemmaConfig
from .backend import check_backend
from .layers import linear_backward, linear_forward
from .losses import cross_entropy_backward, cross_entropy_forward
from .stack import EOI_EMBEDDING, GEMMA2, T5_ENCODER, stack_backward, stack_forward, stack_param_shapes

# The model_type of a T5Gemma 2 encoder classifier checkpoint (minencdec's own, see above).
T5GEMMA2_ENCODER_CLASSIFIER = "minencdec_t5gemma2_encoder_classifier"
from .validate import check_ids, check_mask, check_params, resolve_dtype


def last_non_pad(ids, pad_id):
    """(B,) index of the rightmost non-pad token (0 for an all-pad row, as transformers)."""
    return np.argmax(np.arange(ids.shape[1]) * (ids != pad_id), axis=-1)


def head_forward(h, index, w, b=None):
    """logits (B, C) = h[b, index[b]] W^T (+ bias). h (B, T, D), w (C, D)."""
    pooled = h[np.arange(h.shape[0]), index]                     # (B, D)
    logits, lin_c = linear_forward(pooled, w)                    # (B, C)
    return (logits if b is None else logits + b), (lin_c, index, h.shape, b is not None)


def head_backward(dlogits, cache):
    lin_c, index, h_shape, has_bias = cache
    dpooled, dw = linear_backward(dlogits, lin_c)                # inverts the linear map
    dh = np.zeros(h_shape, dtype=dpooled.dtype)
    dh[np.arange(h_shape[0]), index] = dpooled                   # inverts the pooling: one row per sequence
    return dh, dw, (dlogits.sum(axis=0) if has_bias else None)


class Classifier:
    """A stack plus a head. kind "t5gemma": the encoder of a T5Gemma (or, with a Gemma 3
    stack config, a T5Gemma 2: then `eoi_token_index` is its eoi token); "gemma2": a
    decoder-only Gemma 2 or Gemma 3 stack. params: the stack's tensors (HF names) plus the
    head's. backend: see backend.py."""

    def __init__(self, kind, stack_config, params, num_labels, dtype="float32", backend="numpy",
                 eoi_token_index=None):
        if kind not in ("t5gemma", "gemma2"):
            raise ValueError(f"kind must be 't5gemma' or 'gemma2', got {kind!r}")
        if not isinstance(num_labels, int) or num_labels < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got num_labels={num_labels!r}")
        self.kind, self.config, self.num_labels = kind, stack_config, num_labels
        self.dtype = resolve_dtype(dtype)
        self.backend = check_backend(backend)
        self.names = T5_ENCODER if kind == "t5gemma" else GEMMA2
        self.head = ("score.out_proj.weight", "score.out_proj.bias") if kind == "t5gemma" else ("score.weight", None)
        self.eoi = None
        if kind == "t5gemma" and stack_config.family == "gemma3":      # a T5Gemma 2 encoder embeds eoi too
            self.eoi = (256_000 if eoi_token_index is None else eoi_token_index, EOI_EMBEDDING)
        shapes = {**stack_param_shapes(stack_config, self.names), self.head[0]: (num_labels, stack_config.hidden_size)}
        if self.head[1]:
            shapes[self.head[1]] = (num_labels,)
        if self.eoi:
            shapes[EOI_EMBEDDING] = (stack_config.hidden_size,)
        self.params = check_params(params, shapes, self.dtype)

    @classmethod
    def from_model(cls, model, num_labels, seed=0, std=0.02):
        """Put a fresh head (normal(0, std), bias 0) on a loaded model's encoder (T5Gemma)
        or on the Gemma 2 stack itself (decoder-only baseline)."""
        is_t5 = isinstance(model, t5gemma.T5GemmaModel)
        cfg = model.config.encoder if is_t5 else model.config
        names = T5_ENCODER if is_t5 else GEMMA2
        params = {k: model.params[k] for k in stack_param_shapes(cfg, names)}
        eoi = model.config.eoi_token_index if is_t5 else None
        if eoi is not None:
            params[EOI_EMBEDDING] = model.params[EOI_EMBEDDING]
        rng = np.random.default_rng(seed)
        key = "score.out_proj.weight" if is_t5 else "score.weight"
        params[key] = rng.normal(0, std, (num_labels, cfg.hidden_size)).astype(model.dtype)
        if is_t5:
            params["score.out_proj.bias"] = np.zeros(num_labels, dtype=model.dtype)
        return cls("t5gemma" if is_t5 else "gemma2", cfg, params, num_labels, model.dtype, model.backend, eoi)

    tied_names = ()

    def hf_config(self) -> dict:
        """config.json for transformers' T5GemmaForSequenceClassification (encoder-only:
        is_encoder_decoder false; the decoder sub-config is unused and mirrors the encoder),
        Gemma2ForSequenceClassification or Gemma3TextForSequenceClassification; for a T5Gemma 2
        encoder, a T5Gemma 2 config under minencdec's own model_type (module docstring)."""
        if self.kind == "t5gemma":
            eoi = self.eoi[0] if self.eoi else None
            d = T5GemmaConfig(self.config, self.config, eoi_token_index=eoi).to_hf_dict()
            d.update(architectures=["T5GemmaForSequenceClassification"], is_encoder_decoder=False)
            if self.eoi:
                d.update(model_type=T5GEMMA2_ENCODER_CLASSIFIER, architectures=["T5Gemma2EncoderClassifier"])
        else:
            d = self.config.to_hf_dict()
            d["architectures"] = ["Gemma2ForSequenceClassification" if self.config.family == "gemma2"
                                  else "Gemma3TextForSequenceClassification"]
        d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
        d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        return d

    def save_pretrained(self, path, dtype=None):
        save_tensors(path, self.params, self.hf_config(), dtype=dtype, overwrite=True)

    def _forward(self, input_ids, attention_mask):
        c = self.config
        ids = check_ids(input_ids, c.vocab_size, "input_ids")
        mask = check_mask(attention_mask, ids.shape, "attention_mask")
        if self.kind == "t5gemma":
            mask = (ids != c.pad_token_id) if mask is None else mask
            masks = t5gemma.encoder_masks(c, mask)
        else:
            masks = gemma2.self_attention_masks(c, mask)
        h, stack_c = stack_forward(self.params, c, self.names, ids, masks, backend=self.backend, eoi=self.eoi)
        bias = self.params[self.head[1]] if self.head[1] else None
        logits, head_c = head_forward(h, last_non_pad(ids, c.pad_token_id), self.params[self.head[0]], bias)
        return logits, (stack_c, head_c)

    def logits(self, input_ids, attention_mask=None):
        """(B, C) class logits."""
        return self._forward(input_ids, attention_mask)[0]

    def loss_and_grads(self, input_ids, labels, attention_mask=None):
        """Mean cross-entropy of integer class labels (B,) and every parameter's gradient."""
        labels = np.asarray(labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer) or \
                labels.min(initial=0) < 0 or labels.max(initial=0) >= self.num_labels:
            raise ValueError(f"labels must be a 1-D array of class ids in [0, {self.num_labels})")
        logits, (stack_c, head_c) = self._forward(input_ids, attention_mask)
        if labels.shape[0] != logits.shape[0]:
            raise ValueError(f"labels have {labels.shape[0]} entries for a batch of {logits.shape[0]}")
        loss, ce_c = cross_entropy_forward(logits, labels)
        dh, dw, db = head_backward(cross_entropy_backward(ce_c), head_c)       # inverts the head
        grads, _ = stack_backward(dh, stack_c)                                  # inverts the stack
        grads[self.head[0]] = dw
        if self.head[1]:
            grads[self.head[1]] = db
        return loss, grads

