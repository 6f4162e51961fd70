"""The encoder-decoder Gemma, in NumPy: T5Gemma (transformers' T5GemmaForConditionalGeneration,
two Gemma 2 stacks) and T5Gemma 2 (T5Gemma2ForConditionalGeneration, two Gemma 3 stacks).

    enc     = encoder(input_ids)             bidirectional self-attention (sliding on some layers)
    h       = decoder(decoder_input_ids)     causal self-attention, cross-attention to enc, MLP
              (T5Gemma 2: one merged attention over the decoder's keys and enc's, then MLP)
    logits  = softcap(h E^T)                  LM head tied to the decoder's embedding
    decoder_input_ids = shift_right(labels): [bos, labels[:-1]] with -100 -> pad

T5Gemma's encoder and decoder are `stack.py` stacks with their own configs, so they may
differ in width, depth and heads (the unbalanced 9B-2B pairing). T5Gemma 2's share one
width and one embedding table (encoder input, decoder input and LM head), and token
`eoi_token_index` is embedded as the vector `eoi_embedding`. The gradient of the encoder
output is the sum of every decoder layer's cross-attention (or merged attention) part.

Padding. T5Gemma: when `attention_mask` is None it is derived from `input_ids != pad` (and
the decoder's from its pad ids), and the same mask hides the padded encoder keys from
cross-attention. (transformers derives the encoder's mask the same way but then gives
cross-attention no mask at all, so padded encoder positions leak into the decoder; pass the
mask explicitly to compare the two.) T5Gemma 2, as transformers' T5Gemma 2 does, derives no
mask from pad ids: without `attention_mask` every token is attended to, so pass the masks
whenever a batch is padded.

Axes: B batch, S source (encoder) length, T target (decoder) length, D width, V vocab.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from minencdec.files.checkpoint import save_tensors

from .attention import Mask, cross_mask
from .backend import check_backend
from .backend import kernels as backend_kernels
from .config import GemmaConfig, T5GemmaConfig
from .losses import IGNORE_INDEX
from .generate import generate
from .stack import (EOI_EMBEDDING, T5_DECODER, T5_ENCODER, T5G2_DECODER, init_weights, lm_head_backward, lm_head_forward,
                    stack_backward, stack_forward, stack_param_shapes)
from .validate import check_ids, check_labels, check_mask, check_params, resolve_dtype

ENC_EMBED = "model.encoder.embed_tokens.weight"     # T5Gemma 2: the one table of the whole model
DEC_EMBED = "model.decoder.embed_tokens.weight"
EOI = EOI_EMBEDDING                                 # T5Gemma 2 only
TIED_HEAD = "lm_head.out_proj.weight"      # tied to the decoder's table; ignored when a checkpoint stores it
# Names a T5Gemma 2 checkpoint may store for what is tied: read past, never used.
TIED_T5G2 = (TIED_HEAD, DEC_EMBED, "model.decoder.embed_tokens.eoi_embedding")
# The decoder with its cross-attention sublayers skipped: the adaptation check's ablation.
_DECODER_WITHOUT_CROSS = dataclasses.replace(T5_DECODER, cross_attn=None)


def decoder_names(config: T5GemmaConfig):
    """The decoder's names: T5Gemma's has cross-attention, T5Gemma 2's merged attention."""
    return T5G2_DECODER if config.merged_attention else T5_DECODER


def head_table(config: T5GemmaConfig) -> str:
    """The table the LM head is tied to (the decoder's embedding)."""
    return decoder_names(config).embedding


def _eoi(config: T5GemmaConfig):
    return (config.eoi_token_index, EOI) if config.family == "t5gemma2" else None


def param_shapes(config: T5GemmaConfig) -> dict[str, tuple[int, ...]]:
    shapes = {**stack_param_shapes(config.encoder, T5_ENCODER),
              **stack_param_shapes(config.decoder, decoder_names(config))}
    if config.family == "t5gemma2":
        shapes[EOI] = (config.encoder.hidden_size,)
    return shapes


def cross_attention_names(config: T5GemmaConfig) -> list[str]:
    """The parameters that exist only for cross-attention (q/k/v/o and its two norms): the
    only ones trained during an unbalanced pair's cross-attention warmup."""
    return [n for n in param_shapes(config) if ".cross_attn." in n or "cross_attn_layernorm" in n]


def init_params(config: T5GemmaConfig, seed=0, dtype="float32", std=0.02):
    """Random weights as transformers initialises them (see stack.init_weights)."""
    return init_weights(param_shapes(config), seed, resolve_dtype(dtype), std)


def shift_right(labels, bos_id, pad_id):
    """Decoder inputs from labels: bos first, labels shifted one right, -100 -> pad."""
    shifted = np.empty_like(labels)
    shifted[:, 0] = bos_id
    shifted[:, 1:] = labels[:, :-1]
    return np.where(shifted == IGNORE_INDEX, pad_id, shifted)


def encoder_masks(c: GemmaConfig, attention_mask):
    """One bidirectional mask per encoder layer (config `c`; an attention.Mask, whose
    `.dense(S, S)` is the (B, S, S) array): sliding layers see |i - j| within the window
    (c.bidirectional_window's rule), padded keys hidden. With `c.causal_encoder` (the
    causal-encoder ablation) the encoder keeps its decoder-only source's masks instead."""
    if c.causal_encoder:
        return decoder_masks(c, attention_mask)
    return [Mask(causal=False, window=c.window(i), rule=c.bidirectional_window, key_mask=attention_mask)
            for i in range(c.num_hidden_layers)]


def decoder_masks(c: GemmaConfig, decoder_attention_mask):
    """One causal mask per decoder layer (config `c`; sliding layers see w keys)."""
    return [Mask(causal=True, window=c.window(i), key_mask=decoder_attention_mask)
            for i in range(c.num_hidden_layers)]


def merged_masks(c: GemmaConfig, decoder_attention_mask, attention_mask, S):
    """T5Gemma 2: one mask per decoder layer over [its own keys, the S encoder keys]: the
    causal (sliding) rule on its own, every real encoder key visible (never windowed)."""
    return [Mask(causal=True, window=c.window(i), key_mask=decoder_attention_mask, extra_keys=S,
                 extra_key_mask=attention_mask) for i in range(c.num_hidden_layers)]


def encode(params, config: T5GemmaConfig, input_ids, attention_mask, record=None, backend="numpy"):
    """The encoder output (B, S, De) and its cache."""
    return stack_forward(params, config.encoder, T5_ENCODER, input_ids, encoder_masks(config.encoder, attention_mask),
                         record=record, backend=backend, eoi=_eoi(config))


def decode(params, config: T5GemmaConfig, enc_out, attention_mask, decoder_input_ids, decoder_attention_mask,
           record=None, cross_attention=True, backend="numpy"):
    """The decoder's final-normed hidden states (B, T, Dd) and their cache.
    `cross_attention=False` (an ablation switch) skips every cross-attention sublayer; in
    T5Gemma 2 it hides every encoder key from the merged attention instead."""
    if config.merged_attention:
        hidden = np.zeros(enc_out.shape[:2], dtype=bool)
        masks = merged_masks(config.decoder, decoder_attention_mask,
                             attention_mask if cross_attention else hidden, enc_out.shape[1])
        return stack_forward(params, config.decoder, T5G2_DECODER, decoder_input_ids, masks, cross=(enc_out, None),
                             record=record, backend=backend, eoi=_eoi(config))
    names = T5_DECODER if cross_attention else _DECODER_WITHOUT_CROSS
    return stack_forward(params, config.decoder, names, decoder_input_ids,
                         decoder_masks(config.decoder, decoder_attention_mask),
                         cross=(enc_out, cross_mask(attention_mask)), record=record, backend=backend)


def forward(params, config: T5GemmaConfig, input_ids, decoder_input_ids, attention_mask,
            decoder_attention_mask, record=None, cross_attention=True, backend="numpy"):
    """logits (B, T, V) and the cache for `backward`. Masks are bool arrays (1 = token)."""
    enc_out, enc_c = encode(params, config, input_ids, attention_mask, record, backend)  # (B, S, De)
    h, dec_c = decode(params, config, enc_out, attention_mask, decoder_input_ids, decoder_attention_mask,
                      record, cross_attention, backend)                                 # (B, T, Dd)
    logits, head_c = lm_head_forward(h, params[head_table(config)], config.decoder.final_logit_softcapping)
    if record is not None:
        record["logits"] = logits
    return logits, (enc_c, dec_c, head_c)


def backward(dlogits, cache):
    """Every parameter's gradient, read bottom-up: head, decoder, then the encoder, whose
    output gradient is what all decoder layers' cross-attention sent back."""
    enc_c, dec_c, head_c = cache
    dh, dtable_head = lm_head_backward(dlogits, head_c)          # inverts the LM head
    return _backward_below_head(dh, dtable_head, enc_c, dec_c)


def _backward_below_head(dh, dtable_head, enc_c, dec_c):
    """The decoder, then the encoder, given the gradients the LM head sent back."""
    table = dec_c[1].embedding                                   # the cache holds the decoder's names
    # Tied: the decoder table is also the head, and T5Gemma 2's encoder reads it too; each use
    # adds its gradient into the head's array in place (no second vocabulary-sized array).
    grads, d_enc = stack_backward(dh, dec_c, into={table: dtable_head})   # inverts the decoder
    return stack_backward(d_enc, enc_c, into=grads)[0]                    # inverts the encoder


def loss_forward(params, config: T5GemmaConfig, input_ids, decoder_input_ids, attention_mask,
                 decoder_attention_mask, targets, backend="numpy"):
    """The mean cross-entropy of `targets` (B, T) (-100 ignored) and the cache for
    `loss_backward`. No logits come back: the fast path's fused LM head + loss never holds
    all of them (fastpath/lmhead.py); the reference computes them inside."""
    enc_out, enc_c = encode(params, config, input_ids, attention_mask, None, backend)    # (B, S, De)
    h, dec_c = decode(params, config, enc_out, attention_mask, decoder_input_ids, decoder_attention_mask,
                      backend=backend)                                                  # (B, T, Dd)
    kern = backend_kernels(backend)
    loss, head_c = kern.lm_head_loss_forward(h, params[head_table(config)], targets,
                                             config.decoder.final_logit_softcapping)
    return loss, (enc_c, dec_c, head_c, kern)


def loss_backward(cache):
    """Every parameter's gradient of the loss of `loss_forward`, read as `backward`."""
    enc_c, dec_c, head_c, kern = cache
    dh, dtable_head = kern.lm_head_loss_backward(head_c)         # inverts the loss and the LM head
    return _backward_below_head(dh, dtable_head, enc_c, dec_c)


class T5GemmaModel:
    """An encoder-decoder Gemma. `params` is keyed by the Hugging Face tensor names.
    backend: "numpy" (the reference) or "numba" (the fast path); see backend.py."""

    def __init__(self, config: T5GemmaConfig, params: dict, dtype="float32", backend="numpy"):
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.backend = check_backend(backend)
        self.params = check_params({k: v for k, v in params.items() if k not in self.tied_names},
                                   param_shapes(config), self.dtype)

    @classmethod
    def random(cls, config: T5GemmaConfig, seed=0, dtype="float32", backend="numpy"):
        return cls(config, init_params(config, seed, dtype), dtype, backend)

    def _inputs(self, input_ids, attention_mask):
        ids = check_ids(input_ids, self.config.encoder.vocab_size, "input_ids")
        mask = check_mask(attention_mask, ids.shape, "attention_mask")
        if mask is None and self.config.family == "t5gemma":     # T5Gemma 2 derives no mask (module docstring)
            mask = ids != self.config.encoder.pad_token_id
        return ids, mask

    def _decoder_inputs(self, decoder_input_ids, decoder_attention_mask, batch):
        ids = check_ids(decoder_input_ids, self.config.decoder.vocab_size, "decoder_input_ids")
        if ids.shape[0] != batch:
            raise ValueError(f"decoder_input_ids have batch {ids.shape[0]} but input_ids have batch {batch}")
        mask = check_mask(decoder_attention_mask, ids.shape, "decoder_attention_mask")
        if mask is None and self.config.family == "t5gemma":
            mask = ids != self.config.decoder.pad_token_id
        return ids, mask

    def encode(self, input_ids, attention_mask=None):
        """The encoder's output (B, S, De) after its final norm."""
        ids, mask = self._inputs(input_ids, attention_mask)
        return encode(self.params, self.config, ids, mask, backend=self.backend)[0]

    def logits(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None,
               record=None, cross_attention=True):
        """(B, T, V) logits, final softcap applied. Masks default to `ids != pad`."""
        ids, mask = self._inputs(input_ids, attention_mask)
        dec_ids, dec_mask = self._decoder_inputs(decoder_input_ids, decoder_attention_mask, ids.shape[0])
        return forward(self.params, self.config, ids, dec_ids, mask, dec_mask, record, cross_attention,
                       self.backend)[0]

    def loss_and_grads(self, input_ids, labels, attention_mask=None):
        """Mean cross-entropy of the labels (decoder inputs = shift_right(labels), -100
        ignored, as transformers does) and its gradient for every parameter."""
        ids, mask = self._inputs(input_ids, attention_mask)
        dec = self.config.decoder
        labels = check_labels(labels, np.atleast_2d(labels).shape, dec.vocab_size)
        if labels.shape[0] != ids.shape[0]:
            raise ValueError(f"labels have batch {labels.shape[0]} but input_ids have batch {ids.shape[0]}")
        dec_ids, dec_mask = self._decoder_inputs(shift_right(labels, dec.bos_token_id, dec.pad_token_id), None,
                                                 ids.shape[0])
        loss, cache = loss_forward(self.params, self.config, ids, dec_ids, mask, dec_mask, labels,
                                   self.backend)                 # labels are already the targets
        return loss, loss_backward(cache)

    def generate(self, input_ids, max_new_tokens=32, attention_mask=None, do_sample=False, temperature=1.0,
                 top_k=None, top_p=None, seed=None, min_new_tokens=0, eos_token_id=None, stream=None):
        """New tokens as transformers' generate returns them (see minencdec.model.generate.generate)."""
        return generate(self, input_ids, max_new_tokens, attention_mask, do_sample, temperature,
                        top_k, top_p, seed, min_new_tokens, eos_token_id, stream)

    @property
    def tied_names(self):
        """Names some checkpoints store for tied tensors: always ignored (they are the table)."""
        return TIED_T5G2 if self.config.family == "t5gemma2" else (TIED_HEAD,)

    def hf_config(self) -> dict:
        """The config.json transformers reads for this model."""
        return self.config.to_hf_dict()

    def save_pretrained(self, path, dtype=None):
        """A T5GemmaForConditionalGeneration / T5Gemma2ForConditionalGeneration directory that
        transformers loads (T5Gemma 2: with no vision weights; see T5GemmaConfig.to_hf_dict).
        An existing checkpoint directory is replaced, never one holding other files."""
        save_tensors(path, self.params, self.hf_config(), dtype=dtype, overwrite=True)
