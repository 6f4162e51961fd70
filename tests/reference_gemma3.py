"""An independent float64 formulation of Gemma 3 and T5Gemma 2, forward and (by torch
autograd) backward: the check of the transformers oracle (`model/test_oracle_gemma3.py`).

Written in torch float64 from the models' definitions (the Gemma 3 report: QK-norm, a RoPE
base per layer type, linear scaling of the global layers; T5Gemma 2: merged attention, one
tied table, eoi_embedding, its bidirectional window), not from transformers' code or
minencdec's: it shares only torch's primitives with either. torch is imported inside the
functions, so importing this module works without it.
"""

from __future__ import annotations

import math

import cases


def rms_norm(x, w, eps):
    """x / sqrt(mean(x^2) + eps) * (1 + w) over the last axis (the model width, or head_dim
    for QK-norm)."""
    import torch
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1 + w)


def _gelu_tanh(x):
    import torch
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def rope(x, theta, scale=1.0):
    """x (B, H, T, Dh) at positions 0..T-1, read as position / scale (linear scaling);
    half-split pairs (i, i + Dh/2) turn at theta^(-2i/Dh)."""
    import torch
    T, Dh = x.shape[-2], x.shape[-1]
    freq = theta ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)           # (Dh/2,)
    ang = (torch.arange(T, dtype=torch.float64) / scale)[:, None] * freq[None]     # (T, Dh/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : Dh // 2], x[..., Dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rope_of(c, layer):
    """(theta, scale) of a layer: global layers rope_theta (linearly scaled), local ones
    rope_local_base_freq, unscaled."""
    if c.layer_types[layer] == "full_attention":
        return c.rope_theta, c.rope_scaling_factor
    return c.rope_local_base_freq, 1.0


def _heads(y, n, Dh):
    B, L, _ = y.shape
    return y.view(B, L, n, Dh).transpose(1, 2)                                     # (B, n, L, Dh)


def _attention(P, p, c, x, allowed, theta, scale, enc=None, enc_valid=None):
    """Gemma 3 self-attention of x (B, T, D), allowed (B, T, T) bool: q, k, v from x, RMSNorm
    over head_dim on q and k, then RoPE. With `enc` (T5Gemma 2's merged attention) the
    encoder's keys (k-normed, no RoPE) and values, projected by the same k/v, follow x's in
    one softmax; enc_valid (B, S) hides its padding."""
    import torch
    B, T, _ = x.shape
    H, K, Dh, eps = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.rms_norm_eps
    q = rms_norm(_heads(x @ P[p + "q_proj.weight"].T, H, Dh), P[p + "q_norm.weight"], eps)
    k = rms_norm(_heads(x @ P[p + "k_proj.weight"].T, K, Dh), P[p + "k_norm.weight"], eps)
    v = _heads(x @ P[p + "v_proj.weight"].T, K, Dh)
    q, k = rope(q, theta, scale), rope(k, theta, scale)
    if enc is not None:
        k = torch.cat([k, rms_norm(_heads(enc @ P[p + "k_proj.weight"].T, K, Dh), P[p + "k_norm.weight"], eps)], 2)
        v = torch.cat([v, _heads(enc @ P[p + "v_proj.weight"].T, K, Dh)], 2)
        allowed = torch.cat([allowed, enc_valid[:, None, :].expand(-1, T, -1)], -1)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    s = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(c.query_pre_attn_scalar)
    if c.attn_logit_softcapping:
        s = c.attn_logit_softcapping * torch.tanh(s / c.attn_logit_softcapping)
    s = s.masked_fill(~allowed[:, None], -math.inf)
    a = torch.softmax(s, dim=-1).nan_to_num(0.0)          # a fully masked row attends to nothing
    o = torch.einsum("bhts,bhsd->bthd", a, v).reshape(B, T, H * Dh)
    return o @ P[p + "o_proj.weight"].T


def _allowed(c, layer, T, key_valid, causal):
    """(B, T, T): causal windows keep w keys (i - w < j <= i); the T5Gemma 2 encoder's keep
    (w + 1) // 2 keys at or before i and w // 2 after it."""
    import torch
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    rel = (j <= i) if causal else torch.ones(T, T, dtype=torch.bool)
    w = c.sliding_window if c.layer_types[layer] == "sliding_attention" else None
    if w is not None and causal:
        rel = rel & (i - j < w)
    elif w is not None:
        rel = rel & (i - j < (w + 1) // 2) & (j - i <= w // 2)
    return key_valid[:, None, :] & rel[None]


def _stack(P, pre, c, h, key_valid, causal, norms, enc=None, enc_valid=None):
    """A Gemma 3 stack from its scaled input embedding h (B, T, D); the final-normed output."""
    for n in range(c.num_hidden_layers):
        p = f"{pre}layers.{n}."
        x = rms_norm(h, P[p + norms[0] + ".weight"], c.rms_norm_eps)
        y = _attention(P, p + "self_attn.", c, x, _allowed(c, n, h.shape[1], key_valid, causal),
                       *_rope_of(c, n), enc, enc_valid)
        h = h + rms_norm(y, P[p + norms[1] + ".weight"], c.rms_norm_eps)
        x = rms_norm(h, P[p + "pre_feedforward_layernorm.weight"], c.rms_norm_eps)
        m = (_gelu_tanh(x @ P[p + "mlp.gate_proj.weight"].T) * (x @ P[p + "mlp.up_proj.weight"].T)) \
            @ P[p + "mlp.down_proj.weight"].T
        h = h + rms_norm(m, P[p + "post_feedforward_layernorm.weight"], c.rms_norm_eps)
    return rms_norm(h, P[pre + "norm.weight"], c.rms_norm_eps)


def _embed(P, table, ids, D, eoi=None):
    """table[ids] * sqrt(D); T5Gemma 2 then puts the vector eoi_embedding (unscaled) where
    token `eoi` stands."""
    import torch
    h = P[table][ids] * math.sqrt(D)
    if eoi is None:
        return h
    return torch.where((ids == eoi)[..., None], P["model.encoder.embed_tokens.eoi_embedding"], h)


def _lm_head(h, table, cap):
    """Tied head, then the final softcap if set."""
    import torch
    z = h @ table.T
    return cap * torch.tanh(z / cap) if cap else z


def _xent(logits, labels):
    """Mean over labels != -100 of -log softmax(logits)[label]."""
    import torch
    keep = labels != cases.IGNORE
    logp = logits[keep] - torch.logsumexp(logits[keep], dim=-1, keepdim=True)
    return -logp.gather(-1, labels[keep][:, None]).mean()


def reference_run(config, params, inputs, attention_mask=True):
    """Independent float64 forward + autograd backward of a Gemma 3 or T5Gemma 2 case:
    {"logits", "loss", "grads", ["encoder_out"]}, the oracle's layout. `attention_mask=False`
    runs T5Gemma 2 as transformers does without one: every encoder token attended to."""
    import torch
    from minencdec.model.config import T5GemmaConfig
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    out = {}
    if isinstance(config, T5GemmaConfig):
        enc_c, dec_c, table = config.encoder, config.decoder, "model.encoder.embed_tokens.weight"
        enc_valid = t["attention_mask"].bool() if attention_mask else torch.ones_like(t["input_ids"], dtype=torch.bool)
        h = _embed(P, table, t["input_ids"], enc_c.hidden_size, config.eoi_token_index)
        enc = _stack(P, "model.encoder.", enc_c, h, enc_valid, False,
                     ("pre_self_attn_layernorm", "post_self_attn_layernorm"))
        dec_ids = torch.from_numpy(cases.shift_right(inputs["labels"]))
        h = _embed(P, table, dec_ids, dec_c.hidden_size, config.eoi_token_index)
        h = _stack(P, "model.decoder.", dec_c, h, torch.ones_like(dec_ids, dtype=torch.bool), True,
                   ("pre_self_attn_layernorm", "post_self_attn_layernorm"), enc, enc_valid)
        logits = _lm_head(h, P[table], dec_c.final_logit_softcapping)
        loss = _xent(logits, t["labels"])
        out["encoder_out"] = enc
    else:
        h = _embed(P, "model.embed_tokens.weight", t["input_ids"], config.hidden_size)
        h = _stack(P, "model.", config, h, t["attention_mask"].bool(), True,
                   ("input_layernorm", "post_attention_layernorm"))
        logits = _lm_head(h, P["model.embed_tokens.weight"], config.final_logit_softcapping)
        loss = _xent(logits[:, :-1], t["labels"][:, 1:])
    loss.backward()
    out.update(logits=logits, loss=loss.item(), grads={k: v.grad.numpy() for k, v in P.items()})
    return {k: (v.detach().numpy() if hasattr(v, "detach") else v) for k, v in out.items()}
