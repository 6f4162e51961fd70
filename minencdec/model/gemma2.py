"""The decoder-only Gemma language model (transformers' Gemma2ForCausalLM and, with a Gemma 3
config, Gemma3ForCausalLM), in NumPy. The two families run the same code: `stack.py` reads
what differs (QK-norm, RoPE per layer type) from the config.

    h      = embed(ids) * sqrt(D)                      # (B, T, D)
    h      = layers(h)   causal self-attention (sliding on some layers), GeGLU MLP
    h      = final_norm(h)
    logits = 30 tanh(h E^T / 30)                       # tied LM head, final softcap (Gemma 2) (B, T, V)
    loss   = mean over labelled tokens of -log softmax(logits[t])[labels[t + 1]]

`forward` / `backward` are the functional core; `Gemma2Model` holds a config and the
parameters (a dict keyed by the Hugging Face tensor names) and is what users call.

Axes: B batch, T sequence, D model width, V vocab.
"""

from __future__ import annotations

import numpy as np

from minencdec.files.checkpoint import save_tensors

from .attention import Mask
from .backend import check_backend
from .backend import kernels as backend_kernels
from .config import GemmaConfig
from .losses import IGNORE_INDEX
from .generate import generate
from .stack import (GEMMA2, init_weights, lm_head_backward, lm_head_forward, stack_backward, stack_forward,
                    stack_param_shapes)
from .validate import check_ids, check_labels, check_mask, check_params, resolve_dtype

EMBED = "model.embed_tokens.weight"
TIED_HEAD = "lm_head.weight"            # tied to EMBED; ignored when a checkpoint stores it


def param_shapes(config: GemmaConfig) -> dict[str, tuple[int, ...]]:
    return stack_param_shapes(config, GEMMA2)


def init_params(config: GemmaConfig, seed=0, dtype="float32", std=0.02) -> dict[str, np.ndarray]:
    """Random weights as transformers initialises them (see stack.init_weights)."""
    return init_weights(param_shapes(config), seed, resolve_dtype(dtype), std)


def self_attention_masks(config: GemmaConfig, attention_mask=None):
    """One causal mask per layer (an attention.Mask; `.dense(T, T)` gives the (B, T, T) array):
    sliding layers see w keys, full layers all; padded keys (attention_mask 0) hidden."""
    return [Mask(causal=True, window=config.window(i), key_mask=attention_mask)
            for i in range(config.num_hidden_layers)]


def forward(params, config: GemmaConfig, input_ids, attention_mask=None, record=None, backend="numpy"):
    """logits (B, T, V) and the cache for `backward`. `record`: see `stack_forward`."""
    masks = self_attention_masks(config, attention_mask)
    h, stack_c = stack_forward(params, config, GEMMA2, input_ids, masks, record=record,
                               backend=backend)                                         # (B, T, D)
    logits, head_c = lm_head_forward(h, params[EMBED], config.final_logit_softcapping)    # (B, T, V)
    if record is not None:
        record["logits"] = logits
    return logits, (stack_c, head_c)


def backward(dlogits, cache):
    """Gradients of every parameter (checkpoint names) given dL/dlogits."""
    stack_c, head_c = cache
    dh, dtable_head = lm_head_backward(dlogits, head_c)          # inverts the LM head
    return _backward_below_head(dh, dtable_head, stack_c)


def _backward_below_head(dh, dtable_head, stack_c):
    """The stack, given the gradients the LM head sent back."""
    grads, _ = stack_backward(dh, stack_c)                       # inverts the stack
    grads[EMBED] = grads[EMBED] + dtable_head                    # the tied table: input and output use
    return grads


def loss_forward(params, config: GemmaConfig, input_ids, targets, attention_mask=None, backend="numpy"):
    """The mean cross-entropy of `targets` (B, T) (already shifted; -100 ignored) and the
    cache for `loss_backward`. No logits come back: the fast path's fused LM head + loss
    never holds all of them (fastpath/lmhead.py); the reference computes them inside."""
    masks = self_attention_masks(config, attention_mask)
    h, stack_c = stack_forward(params, config, GEMMA2, input_ids, masks, backend=backend)   # (B, T, D)
    kern = backend_kernels(backend)
    loss, head_c = kern.lm_head_loss_forward(h, params[EMBED], targets, config.final_logit_softcapping)
    return loss, (stack_c, head_c, kern)


def loss_backward(cache):
    """Every parameter's gradient of the loss of `loss_forward`."""
    stack_c, head_c, kern = cache
    dh, dtable_head = kern.lm_head_loss_backward(head_c)         # inverts the loss and the LM head
    return _backward_below_head(dh, dtable_head, stack_c)


def shift_labels(labels):
    """Position t predicts token t + 1: targets = labels shifted left, -100 at the end."""
    targets = np.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    return targets


class Gemma2Model:
    """A decoder-only Gemma LM: Gemma 2, or Gemma 3 when config.family is "gemma3". `params`
    is keyed by the Hugging Face tensor names.
    backend: "numpy" (the reference) or "numba" (the fast path); see backend.py."""

    def __init__(self, config: GemmaConfig, params: dict, dtype="float32", backend="numpy"):
        self.config = config
        self.dtype = resolve_dtype(dtype)
        self.backend = check_backend(backend)
        self.params = check_params({k: v for k, v in params.items() if k != TIED_HEAD},
                                   param_shapes(config), self.dtype)

    @classmethod
    def random(cls, config: GemmaConfig, seed=0, dtype="float32", backend="numpy"):
        return cls(config, init_params(config, seed, dtype), dtype, backend)

    def _inputs(self, input_ids, attention_mask):
        ids = check_ids(input_ids, self.config.vocab_size, "input_ids")
        return ids, check_mask(attention_mask, ids.shape, "attention_mask")

    def logits(self, input_ids, attention_mask=None, record=None):
        """(B, T, V) logits, final softcap applied. Rows at padded positions are not meaningful."""
        ids, mask = self._inputs(input_ids, attention_mask)
        return forward(self.params, self.config, ids, mask, record, self.backend)[0]

    def loss_and_grads(self, input_ids, labels, attention_mask=None):
        """Mean next-token cross-entropy over labelled tokens (labels as transformers takes
        them: shifted inside, -100 ignored) and its gradient for every parameter."""
        ids, mask = self._inputs(input_ids, attention_mask)
        labels = check_labels(labels, ids.shape, self.config.vocab_size)
        loss, cache = loss_forward(self.params, self.config, ids, shift_labels(labels), mask, self.backend)
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
        """A Gemma2ForCausalLM directory that transformers' from_pretrained loads."""
        save_tensors(path, self.params, self.hf_config(), dtype=dtype, overwrite=True)
