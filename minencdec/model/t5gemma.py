"""The encoder-decoder Gemma (transformers' T5GemmaForConditionalGeneration), in NumPy.

    enc     = encoder(input_ids)             bidirectional self-attention (sliding on even layers)
    h       = decoder(decoder_input_ids)     causal self-attention, cross-attention to enc, MLP
    logits  = 30 tanh(h E_dec^T / 30)         LM head tied to the decoder's embedding
    decoder_input_ids = shift_right(labels): [bos, labels[:-1]] with -100 -> pad

The encoder and decoder are `stack.py` stacks with their own configs, so they may differ
in width, depth and heads (the unbalanced 9B-2B pairing). The gradient of the encoder
output is the sum of every decoder layer's cross-attention contribution.

Padding: when `attention_mask` is None it is derived from `input_ids != pad`, and the
same mask hides the padded encoder keys from cross-attention. (transformers derives the
encoder's mask the same way but then gives cross-attention no mask at all, so padded
encoder positions leak into the decoder; pass the mask explicitly to compare the two.)

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
from .stack import (T5_DECODER, T5_ENCODER, init_weights, lm_head_backward, lm_head_forward, stack_backward,
                    stack_forward, stack_param_shapes)
from .validate import check_ids, check_labels, check_mask, check_params, resolve_dtype

ENC_EMBED = "model.encoder.embed_tokens.weight"
DEC_EMBED = "model.decoder.embed_tokens.weight"
TIED_HEAD = "lm_head.out_proj.weight"      # tied to DEC_EMBED; ignored when a checkpoint stores it
# The decoder with its cross-attention sublayers skipped: the adaptation check's ablation.
_DECODER_WITHOUT_CROSS = dataclasses.replace(T5_DECODER, cross_attn=None)


def param_shapes(config: T5GemmaConfig) -> dict[str, tuple[int, ...]]:
    return {**stack_param_shapes(config.encoder, T5_ENCODER), **stack_param_shapes(config.decoder, T5_DECODER)}


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
    (c.bidirectional_window's rule), padded keys hidden."""
    return [Mask(causal=False, window=c.window(i), rule=c.bidirectional_window, key_mask=attention_mask)
            for i in range(c.num_hidden_layers)]


def decoder_masks(c: GemmaConfig, decoder_attention_mask):
    """One causal mask per decoder layer (config `c`; sliding layers see w keys)."""
    return [Mask(causal=True, window=c.window(i), key_mask=decoder_attention_mask)
            for i in range(c.num_hidden_layers)]


def encode(params, config: T5GemmaConfig, input_ids, attention_mask, record=None, backend="numpy"):
    """The encoder output (B, S, De) and its cache."""
    return stack_forward(params, config.encoder, T5_ENCODER, input_ids, encoder_masks(config.encoder, attention_mask),
                         record=record, backend=backend)


def decode(params, config: T5GemmaConfig, enc_out, attention_mask, decoder_input_ids, decoder_attention_mask,
           record=None, cross_attention=True, backend="numpy"):
    """The decoder's final-normed hidden states (B, T, Dd) and their cache.
    `cross_attention=False` skips every cross-attention sublayer (an ablation switch)."""
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
    logits, head_c = lm_head_forward(h, params[DEC_EMBED], config.decoder.final_logit_softcapping)
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
    grads, d_enc = stack_backward(dh, dec_c)                     # inverts the decoder
    grads[DEC_EMBED] = grads[DEC_EMBED] + dtable_head            # tied: the decoder table is also the head
    enc_grads, _ = stack_backward(d_enc, enc_c)                  # inverts the encoder
    return {**enc_grads, **grads}


def loss_forward(params, config: T5GemmaConfig, input_ids, decoder_input_ids, attention_mask,
                 decoder_attention_mask, targets, backend="numpy"):
    """The mean cross-entropy of `targets` (B, T) (-100 ignored) and the cache for
    `loss_backward`. No logits come back: the fast path's fused LM head + loss never holds
    all of them (fastpath/lmhead.py); the reference computes them inside."""
    enc_out, enc_c = encode(params, config, input_ids, attention_mask, None, backend)    # (B, S, De)
    h, dec_c = decode(params, config, enc_out, attention_mask, decoder_input_ids, decoder_attention_mask,
                      backend=backend)                                                  # (B, T, Dd)
    kern = backend_kernels(backend)
    loss, head_c = kern.lm_head_loss_forward(h, params[DEC_EMBED], targets, config.decoder.final_logit_softcapping)
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
        self.params = check_params({k: v for k, v in params.items() if k != TIED_HEAD},
                                   param_shapes(config), self.dtype)

    @classmethod
    def random(cls, config: T5GemmaConfig, seed=0, dtype="float32", backend="numpy"):
        return cls(config, init_params(config, seed, dtype), dtype, backend)

    def _inputs(self, input_ids, attention_mask):
        ids = check_ids(input_ids, self.config.encoder.vocab_size, "input_ids")
        mask = check_mask(attention_mask, ids.shape, "attention_mask")
        return ids, (ids != self.config.encoder.pad_token_id) if mask is None else mask

    def _decoder_inputs(self, decoder_input_ids, decoder_attention_mask):
        ids = check_ids(decoder_input_ids, self.config.decoder.vocab_size, "decoder_input_ids")
        mask = check_mask(decoder_attention_mask, ids.shape, "decoder_attention_mask")
        return ids, (ids != self.config.decoder.pad_token_id) if mask is None else mask

    def encode(self, input_ids, attention_mask=None):
        """The encoder's output (B, S, De) after its final norm."""
        ids, mask = self._inputs(input_ids, attention_mask)
        return encode(self.params, self.config, ids, mask, backend=self.backend)[0]

    def logits(self, input_ids, decoder_input_ids, attention_mask=None, decoder_attention_mask=None,
               record=None, cross_attention=True):
        """(B, T, V) logits, final softcap applied. Masks default to `ids != pad`."""
        ids, mask = self._inputs(input_ids, attention_mask)
        dec_ids, dec_mask = self._decoder_inputs(decoder_input_ids, decoder_attention_mask)
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
        dec_ids, dec_mask = self._decoder_inputs(shift_right(labels, dec.bos_token_id, dec.pad_token_id), None)
        loss, cache = loss_forward(self.params, self.config, ids, dec_ids, mask, dec_mask, labels,
                                   self.backend)                 # labels are already the targets
        return loss, loss_backward(cache)

    def generate(self, input_ids, max_new_tokens=32, attention_mask=None, do_sample=False, temperature=1.0,
                 top_k=None, top_p=None, seed=None, min_new_tokens=0, eos_token_id=None, stream=None):
        """New tokens as transformers' generate returns them (see minencdec.model.generate.generate)."""
        return generate(self, input_ids, max_new_tokens, attention_mask, do_sample, temperature,
                        top_k, top_p, seed, min_new_tokens, eos_token_id, stream)

    tied_names = (TIED_HEAD,)    # present in some checkpoints, always ignored (tied to the embedding)

    def hf_config(self) -> dict:
        """The config.json transformers reads for this model."""
        return self.config.to_hf_dict()

    def save_pretrained(self, path, dtype=None):
        """A T5GemmaForConditionalGeneration directory that transformers loads."""
        save_tensors(path, self.params, self.hf_config(), dtype=dtype, overwrite=True)
