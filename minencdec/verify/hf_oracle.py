"""Hugging Face `transformers` (eager attention) made a true float64 reference.

Used by `minencdec compare --against transformers` and by the test suite. It needs the
`oracle` extra (torch, transformers); the rest of minencdec never imports this module.

Even in a float64 model, transformers (5.x) computes these in float32 ("float32 islands"),
in each of its four Gemma modules (`models/gemma2`, `t5gemma`, `gemma3`, `t5gemma2`):

- RMSNorm (`Gemma2RMSNorm`, `T5GemmaRMSNorm`, `Gemma3RMSNorm`, `T5Gemma2RMSNorm`; Gemma 3's
  QK-norm is the same class): `x.float()`, `weight.float()` -- every norm rounded.
- `eager_attention_forward` (a copy in each module): `softmax(..., dtype=torch.float32)` --
  probabilities rounded; worse, the float64 mask minimum (-1.8e308) becomes -inf in float32,
  so a fully masked query row (left padding, or right padding under a short sliding window)
  gives NaN, which then spreads to the whole sequence (0 * NaN in the next layer).
- RoPE (`Gemma2RotaryEmbedding`, `T5GemmaRotaryEmbedding`; Gemma 3's and T5Gemma 2's, one
  per layer type: `forward(x, position_ids, layer_type)`): `inv_freq` built in float32 at
  init (linear scaling divides that float32 buffer by the factor) and `position_ids.float()`
  -- cos/sin rounded.
- The scaled embedding (`Gemma2TextScaledWordEmbedding`, `Gemma3TextScaledWordEmbedding`,
  `T5Gemma2TextScaledWordEmbedding`, which also writes `eoi_embedding` where
  `eoi_token_index` stands): `embed_scale` is a buffer; in a model built in float32 and cast
  with `.to(float64)` it holds sqrt(D) rounded to float32. (Built directly in float64, as
  here, it is exact; T5Gemma builds its normalizer in the activation dtype: exact.)
- `ForCausalLMLoss`, `ForMaskedLMLoss`: `logits.float()` -- the loss and its gradient.

`float64_exact()` monkeypatches exactly these so that they compute in the input's dtype *when
that is float64*; float32/bf16 inputs take the original code path. The patches are restored on
exit. Nothing else of the model is copied. A transformers without `models/t5gemma2` (4.x)
simply has nothing of it to patch.

Not an island, but a difference to know when comparing: transformers' Gemma 3 and T5Gemma 2
attention (`Gemma3Attention`, `T5Gemma2SelfAttention`, `T5Gemma2MergedAttention`) never pass
`attn_logit_softcapping` to `eager_attention_forward`, so a config that sets it runs uncapped
there (the released Gemma 3 configs leave it null).

torch and transformers are imported inside functions, so importing this module works
without them.
"""

from __future__ import annotations

import contextlib

# --------------------------------------------------------------------------- the float64 patch


def _patched_rmsnorm(original):
    import torch

    def forward(self, x):
        if x.dtype != torch.float64:
            return original(self, x)
        # Same association as transformers: (x * rsqrt(mean(x^2) + eps)) * (1 + w).
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return out * (1.0 + self.weight.to(torch.float64))
    return forward


def _patched_rotary(original):
    import torch

    @torch.no_grad()
    def forward(self, x, position_ids):
        if x.dtype != torch.float64:
            return original(self, x, position_ids)
        if self.rope_type != "default":
            raise NotImplementedError(f"float64_exact: rope_type {self.rope_type!r} is not patched")
        cfg = self.config
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        base = cfg.rope_parameters["rope_theta"]
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim))
        freqs = position_ids[..., None].to(torch.float64) * inv_freq       # (B, T, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)                             # (B, T, Dh)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling
    return forward


def _patched_rotary_per_type(original):
    """Gemma 3 / T5Gemma 2: one RoPE per layer type, each with its own base (and, for
    rope_type "linear", frequencies divided by `factor`), as transformers 5.x builds them."""
    import torch

    @torch.no_grad()
    def forward(self, x, position_ids, layer_type=None):
        if x.dtype != torch.float64:
            return original(self, x, position_ids, *([] if layer_type is None else [layer_type]))
        if layer_type is None:
            raise NotImplementedError("float64_exact: this RoPE has no layer_type argument; only "
                                      "transformers 5.x's one-RoPE-per-layer-type Gemma 3 is patched")
        params = self.config.rope_parameters[layer_type]
        if self.rope_type[layer_type] not in ("default", "linear"):
            raise NotImplementedError(f"float64_exact: rope_type {self.rope_type[layer_type]!r} is not patched")
        cfg = self.config
        dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        exponents = torch.arange(0, dim, 2, dtype=torch.float64, device=x.device) / dim
        inv_freq = 1.0 / (params["rope_theta"] ** exponents)
        if self.rope_type[layer_type] == "linear":
            inv_freq = inv_freq / params["factor"]                           # as transformers: scale the frequencies
        freqs = position_ids[..., None].to(torch.float64) * inv_freq       # (B, T, Dh/2)
        emb = torch.cat((freqs, freqs), dim=-1)                             # (B, T, Dh)
        scaling = getattr(self, f"{layer_type}_attention_scaling")
        return emb.cos() * scaling, emb.sin() * scaling
    return forward


def _patched_eager_attention(original, repeat_kv):
    import torch
    from torch import nn

    def eager_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                                scaling=None, softcap=None, **kwargs):
        if query.dtype != torch.float64:
            return original(module, query, key, value, attention_mask, dropout=dropout,
                            scaling=scaling, softcap=softcap, **kwargs)
        # transformers' body, with the softmax in float64 instead of float32.
        if scaling is None:
            scaling = module.head_dim**-0.5
        key_states = repeat_kv(key, module.num_key_value_groups)
        value_states = repeat_kv(value, module.num_key_value_groups)
        attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
        if softcap is not None:
            attn_weights = torch.tanh(attn_weights / softcap) * softcap
        if attention_mask is not None:
            attn_weights = attn_weights + attention_mask
        attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float64)
        attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
        attn_output = torch.matmul(attn_weights, value_states).transpose(1, 2).contiguous()
        return attn_output, attn_weights
    return eager_attention_forward


def _patched_scaled_embedding(original):
    import torch
    from torch import nn

    def forward(self, input_ids):
        if self.weight.dtype != torch.float64:
            return original(self, input_ids)
        scale = torch.tensor(self.scalar_embed_scale, dtype=torch.float64, device=self.weight.device)
        return nn.Embedding.forward(self, input_ids) * scale
    return forward


def _patched_eoi_embedding(original):
    """T5Gemma 2's embedding: the scaled lookup, then `eoi_embedding` (unscaled) at every
    `eoi_token_index`."""
    import torch
    from torch import nn

    def forward(self, input_ids):
        if self.weight.dtype != torch.float64:
            return original(self, input_ids)
        scale = torch.tensor(self.scalar_embed_scale, dtype=torch.float64, device=self.weight.device)
        out = nn.Embedding.forward(self, input_ids) * scale
        out[input_ids == self.eoi_token_index] = self.eoi_embedding.to(torch.float64)
        return out
    return forward


def _patched_lm_loss(original, shift):
    import torch
    from torch import nn
    from transformers.loss.loss_utils import fixed_cross_entropy

    def loss(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100,
             shift_labels=None, **kwargs):
        if logits.dtype != torch.float64:
            return original(logits, labels, vocab_size, num_items_in_batch=num_items_in_batch,
                            ignore_index=ignore_index, shift_labels=shift_labels, **kwargs)
        if shift and shift_labels is None:      # ForCausalLMLoss: position t predicts labels[t+1]
            labels = nn.functional.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        elif shift:
            labels = shift_labels
        logits = logits.reshape(-1, vocab_size)
        labels = labels.reshape(-1).to(logits.device)
        return fixed_cross_entropy(logits, labels, num_items_in_batch, ignore_index, **kwargs)
    return loss


def _optional_module(name):
    """A transformers modeling module, or None if this version has no such model."""
    import importlib
    try:
        return importlib.import_module(f"transformers.models.{name}")
    except ImportError:
        return None


def _patch_list():
    """(owner, attribute, make_replacement) for every float32 island. Owner is a class, a module
    or a dict (LOSS_MAPPING, which `PreTrainedModel.loss_function` reads at call time)."""
    from transformers.loss import loss_utils
    from transformers.models.gemma2 import modeling_gemma2 as g2
    from transformers.models.t5gemma import modeling_t5gemma as t5

    patches = []
    g3 = _optional_module("gemma3.modeling_gemma3")
    if g3 is not None:
        patches += [
            (g3.Gemma3RMSNorm, "forward", _patched_rmsnorm),
            (g3.Gemma3RotaryEmbedding, "forward", _patched_rotary_per_type),
            (g3, "eager_attention_forward", lambda f: _patched_eager_attention(f, g3.repeat_kv)),
            (g3.Gemma3TextScaledWordEmbedding, "forward", _patched_scaled_embedding),
        ]
    t52 = _optional_module("t5gemma2.modeling_t5gemma2")
    if t52 is not None:
        patches += [
            (t52.T5Gemma2RMSNorm, "forward", _patched_rmsnorm),
            (t52.T5Gemma2RotaryEmbedding, "forward", _patched_rotary_per_type),
            (t52, "eager_attention_forward", lambda f: _patched_eager_attention(f, t52.repeat_kv)),
            (t52.T5Gemma2TextScaledWordEmbedding, "forward", _patched_eoi_embedding),
        ]
    return [
        (g2.Gemma2RMSNorm, "forward", _patched_rmsnorm),
        (t5.T5GemmaRMSNorm, "forward", _patched_rmsnorm),
        (g2.Gemma2RotaryEmbedding, "forward", _patched_rotary),
        (t5.T5GemmaRotaryEmbedding, "forward", _patched_rotary),
        (g2, "eager_attention_forward", lambda f: _patched_eager_attention(f, g2.repeat_kv)),
        (t5, "eager_attention_forward", lambda f: _patched_eager_attention(f, t5.repeat_kv)),
        (g2.Gemma2TextScaledWordEmbedding, "forward", _patched_scaled_embedding),
        (loss_utils.LOSS_MAPPING, "ForCausalLM", lambda f: _patched_lm_loss(f, shift=True)),
        (loss_utils.LOSS_MAPPING, "ForMaskedLM", lambda f: _patched_lm_loss(f, shift=False)),
        *patches,
    ]


def _get(owner, attr):
    return owner[attr] if isinstance(owner, dict) else owner.__dict__[attr]


def _set(owner, attr, value):
    if isinstance(owner, dict):
        owner[attr] = value
    else:
        setattr(owner, attr, value)


@contextlib.contextmanager
def float64_exact():
    """Make transformers' Gemma 2 / T5Gemma / Gemma 3 / T5Gemma 2 compute float64 inputs
    entirely in float64.

    Patches RMSNorm, RoPE, the eager attention softmax, the scaled embeddings and the LM
    losses (see the module docstring); restores the originals on exit, even on error.
    Nested use is fine. Not thread-safe (it patches classes and modules)."""
    saved = []
    try:
        for owner, attr, make in _patch_list():
            original = _get(owner, attr)
            saved.append((owner, attr, original))
            _set(owner, attr, make(original))
        yield
    finally:
        for owner, attr, original in reversed(saved):
            _set(owner, attr, original)


def patch_targets() -> dict[str, object]:
    """The currently installed objects at every patched place (tests check restoration)."""
    return {f"{getattr(o, '__name__', 'LOSS_MAPPING')}.{a}": _get(o, a) for o, a, _ in _patch_list()}
