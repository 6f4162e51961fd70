"""Tests of the oracle itself: transformers made float64-exact (oracle_hf.py), the test cases
(cases.py) and the golden files (golden/*.safetensors, from golden/make_golden.py).

The independent formulation below is a few lines of torch float64 written from transformers' modeling_gemma2 / modeling_t5gemma,
not from transformers' code; it shares nothing with the oracle but torch's primitives.
Regenerate stale golden files with `python tests/golden/make_golden.py`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import cases
from helpers import assert_close

# Two float64 formulations of the same model (different association, einsum vs matmul,
# theta**(-x) vs 1/theta**x) differ by a few ulps per op; over 2-3 layers with D <= 16 and
# logits <= 30 this stays below ~1e-14 relative. 1e-13 leaves a factor 10; a float32 island
# anywhere gives >= 1e-8.
RTOL_EXACT = 1e-13
# Gradients: the backward pass sums more terms (over batch, positions, tied uses) and
# cancels more, so a factor 10 more room.
RTOL_EXACT_GRAD = 1e-12
# Golden files against a fresh live run: same code, same inputs, so bitwise equal unless
# torch changes its kernels; 1e-12 catches any stale file.
RTOL_GOLDEN = 1e-12
# Without the patch the float32 islands cause >= 1e-8 relative error; the negative control
# demands more than this.
NEG_CONTROL = 1e-9


# --------------------------------------------------------------------------- independent reference

def _rms(x, w, eps):
    import torch
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (1 + w)


def _gelu_tanh(x):
    import torch
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _rope(x, theta):
    """x (B, H, T, Dh), positions 0..T-1, half-split pairs (i, i + Dh/2)."""
    import torch
    T, Dh = x.shape[-2], x.shape[-1]
    freq = theta ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)          # (Dh/2,)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * freq[None]             # (T, Dh/2)
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : Dh // 2], x[..., Dh // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _attention(P, p, c, x, src, allowed, rope):
    """Multi-head attention of x (B, T, D) over src (B, S, Ds); allowed (B, T, S) bool."""
    import torch
    B, T, _ = x.shape
    S, H, K, Dh = src.shape[1], c.num_attention_heads, c.num_key_value_heads, c.head_dim
    q = (x @ P[p + "q_proj.weight"].T).view(B, T, H, Dh).transpose(1, 2)         # (B, H, T, Dh)
    k = (src @ P[p + "k_proj.weight"].T).view(B, S, K, Dh).transpose(1, 2)       # (B, K, S, Dh)
    v = (src @ P[p + "v_proj.weight"].T).view(B, S, K, Dh).transpose(1, 2)
    if rope:
        q, k = _rope(q, c.rope_theta), _rope(k, c.rope_theta)
    k, v = k.repeat_interleave(H // K, dim=1), v.repeat_interleave(H // K, dim=1)
    s = torch.einsum("bhtd,bhsd->bhts", q, k) / math.sqrt(c.query_pre_attn_scalar)
    if c.attn_logit_softcapping:
        s = c.attn_logit_softcapping * torch.tanh(s / c.attn_logit_softcapping)
    s = s.masked_fill(~allowed[:, None], -math.inf)
    a = torch.softmax(s, dim=-1).nan_to_num(0.0)          # a fully masked row attends to nothing
    o = torch.einsum("bhts,bhsd->bthd", a, v).reshape(B, T, H * Dh)
    return o @ P[p + "o_proj.weight"].T


def _stack(P, pre, c, ids, key_valid, causal, norms, enc=None, enc_valid=None):
    """One Gemma 2 stack; returns the final normed hidden state (B, T, D)."""
    import torch
    T = ids.shape[1]
    h = P[pre + "embed_tokens.weight"][ids] * math.sqrt(c.hidden_size)
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    for n in range(c.num_hidden_layers):
        p, w = f"{pre}layers.{n}.", c.window(n)
        rel = (j <= i) if causal else torch.ones(T, T, dtype=torch.bool)
        if w is not None:
            if causal:
                rel = rel & (j > i - w)                             # i - w < j <= i
            else:                                                   # |i - j| <= w (5.x) or < w
                rel = rel & (((i - j).abs() <= w) if c.bidirectional_window == "le" else ((i - j).abs() < w))
        allowed = key_valid[:, None, :] & rel[None]
        x = _rms(h, P[p + norms[0] + ".weight"], c.rms_norm_eps)
        h = h + _rms(_attention(P, p + "self_attn.", c, x, x, allowed, True), P[p + norms[1] + ".weight"],
                     c.rms_norm_eps)
        if enc is not None:
            x = _rms(h, P[p + "pre_cross_attn_layernorm.weight"], c.rms_norm_eps)
            cross = enc_valid[:, None, :].expand(-1, T, -1)
            h = h + _rms(_attention(P, p + "cross_attn.", c, x, enc, cross, False),
                         P[p + "post_cross_attn_layernorm.weight"], c.rms_norm_eps)
        x = _rms(h, P[p + "pre_feedforward_layernorm.weight"], c.rms_norm_eps)
        m = (_gelu_tanh(x @ P[p + "mlp.gate_proj.weight"].T) * (x @ P[p + "mlp.up_proj.weight"].T)) \
            @ P[p + "mlp.down_proj.weight"].T
        h = h + _rms(m, P[p + "post_feedforward_layernorm.weight"], c.rms_norm_eps)
    return _rms(h, P[pre + "norm.weight"], c.rms_norm_eps)


def _lm_head(h, E, cap):
    import torch
    z = h @ E.T
    return cap * torch.tanh(z / cap) if cap else z


def _xent(logits, labels):
    """Mean over labels != -100 of -log softmax(logits)[label]."""
    import torch
    keep = labels != cases.IGNORE
    logp = logits[keep] - torch.logsumexp(logits[keep], dim=-1, keepdim=True)
    return -logp.gather(-1, labels[keep][:, None]).mean()


def reference_run(config, params, inputs):
    """Independent float64 forward + autograd backward: {"logits", "loss", "grads",
    ["encoder_out"]}, the same layout as the oracle's."""
    import torch
    from minencdec.model.config import T5GemmaConfig
    P = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in params.items()}
    t = {k: torch.from_numpy(v) for k, v in inputs.items()}
    out = {}
    if isinstance(config, T5GemmaConfig):
        enc_valid = t["attention_mask"].bool()
        enc = _stack(P, "model.encoder.", config.encoder, t["input_ids"], enc_valid, False,
                     ("pre_self_attn_layernorm", "post_self_attn_layernorm"))
        dec_ids = torch.from_numpy(cases.shift_right(inputs["labels"]))
        h = _stack(P, "model.decoder.", config.decoder, dec_ids, t["decoder_attention_mask"].bool(), True,
                   ("pre_self_attn_layernorm", "post_self_attn_layernorm"), enc, enc_valid)
        logits = _lm_head(h, P["model.decoder.embed_tokens.weight"], config.decoder.final_logit_softcapping)
        loss = _xent(logits, t["labels"])
        out["encoder_out"] = enc
    else:
        h = _stack(P, "model.", config, t["input_ids"], t["attention_mask"].bool(), True,
                   ("input_layernorm", "post_attention_layernorm"))
        logits = _lm_head(h, P["model.embed_tokens.weight"], config.final_logit_softcapping)
        loss = _xent(logits[:, :-1], t["labels"][:, 1:])
    loss.backward()
    out.update(logits=logits, loss=loss.item(), grads={k: v.grad.numpy() for k, v in P.items()})
    return {k: (v.detach().numpy() if hasattr(v, "detach") else v) for k, v in out.items()}


def _lm_run(oracle_hf, config, params, x, **kw):
    from minencdec.model.config import T5GemmaConfig
    if isinstance(config, T5GemmaConfig):
        return oracle_hf.t5gemma_run(config, params, x["input_ids"], x["labels"], x["attention_mask"],
                                     decoder_attention_mask=x["decoder_attention_mask"], **kw)
    return oracle_hf.gemma2_run(config, params, x["input_ids"], x["labels"], x["attention_mask"], **kw)


def _compare(name, got, want, inputs, rtol=RTOL_EXACT, rtol_grad=RTOL_EXACT_GRAD):
    dec_mask = inputs.get("decoder_attention_mask", inputs["attention_mask"])
    assert_close(f"{name} logits", got["logits"][cases.valid_positions(dec_mask)],
                 want["logits"][cases.valid_positions(dec_mask)], rtol)
    if "encoder_out" in want:
        enc = cases.valid_positions(inputs["attention_mask"])
        assert_close(f"{name} encoder_out", got["encoder_out"][enc], want["encoder_out"][enc], rtol)
    assert_close(f"{name} loss", got["loss"], want["loss"], rtol)
    assert set(got["grads"]) == set(want["grads"])
    for k in want["grads"]:
        assert_close(f"{name} grad {k}", got["grads"][k], want["grads"][k], rtol_grad)


ALL_LM_CASES = [*cases.GEMMA2_CASES, *cases.T5GEMMA_CASES]


# --------------------------------------------------------------------------- float64 exactness

@pytest.mark.parametrize("case", ALL_LM_CASES)
def test_exact_oracle_matches_independent_float64(case):
    """float64_exact transformers == an independent float64 formulation: logits, encoder
    output, loss and every gradient (padding included: the cases' labels make the loss
    independent of pad positions, so torch's padding_idx gradient quirk does not show)."""
    pytest.importorskip("torch")
    import oracle_hf
    config, params, x = cases.case_config(case), cases.case_params(case), cases.case_inputs(case)
    _compare(case, _lm_run(oracle_hf, config, params, x), reference_run(config, params, x), x)


def test_negative_control_unpatched_float64_differs():
    """Without the patch, float64 transformers is float32-accurate only: > 1e-9 off, and the
    checker above rejects it. (No fully masked rows here: unpatched they give NaN.)"""
    pytest.importorskip("torch")
    import oracle_hf
    case = "gqa_odd"
    config, params, x = cases.case_config(case), cases.case_params(case), cases.case_inputs(case)
    x = {**x, "attention_mask": np.ones_like(x["attention_mask"]),
         "input_ids": np.where(x["input_ids"] == cases.PAD, 5, x["input_ids"])}
    exact = oracle_hf.gemma2_run(config, params, x["input_ids"], x["labels"], x["attention_mask"])
    loose = oracle_hf.gemma2_run(config, params, x["input_ids"], x["labels"], x["attention_mask"],
                                 exact=False)
    rel = np.max(np.abs(loose["logits"] - exact["logits"])) / np.max(np.abs(exact["logits"]))
    print(f"unpatched vs patched float64 logits: max rel {rel:.2e}")
    assert rel > NEG_CONTROL
    with pytest.raises(AssertionError):
        _compare("unpatched", loose, reference_run(config, params, x), x)


def test_encoder_window_is_inclusive():
    """transformers 5.x masks the encoder's sliding layers with |i - j| <= w: the reference
    with the 4.53-4.57 rule |i - j| < w must disagree (so the test above can tell them apart)."""
    pytest.importorskip("torch")
    import oracle_hf
    from minencdec.model.config import T5GemmaConfig
    case = "balanced"
    config, params, x = cases.case_config(case), cases.case_params(case), cases.case_inputs(case)
    lt = T5GemmaConfig(config.encoder.replace(bidirectional_window="lt"), config.decoder)
    with pytest.raises(AssertionError):
        _compare("window lt", _lm_run(oracle_hf, config, params, x), reference_run(lt, params, x), x)


def test_t5gemma_negative_control():
    pytest.importorskip("torch")
    import oracle_hf
    case = "unbalanced"        # window 2: no fully masked encoder row
    config, params, x = cases.case_config(case), cases.case_params(case), cases.case_inputs(case)
    exact = _lm_run(oracle_hf, config, params, x)
    loose = _lm_run(oracle_hf, config, params, x, exact=False)
    rel = np.max(np.abs(loose["logits"] - exact["logits"])) / np.max(np.abs(exact["logits"]))
    print(f"unpatched vs patched float64 T5Gemma logits: max rel {rel:.2e}")
    assert rel > NEG_CONTROL


def test_each_float32_island_is_patched():
    """Module-level check of every island: patched == float64 formula to ~1e-15, unpatched is
    float32-rounded (> 1e-9). Localises a failure of the end-to-end test."""
    torch = pytest.importorskip("torch")
    import oracle_hf
    from transformers.loss.loss_utils import LOSS_MAPPING
    from transformers.models.gemma2 import modeling_gemma2 as g2
    from transformers.models.t5gemma import modeling_t5gemma as t5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=g)

    def check(name, f, want):
        loose = f()
        with oracle_hf.float64_exact():
            exact = f()
        assert exact.dtype == torch.float64, name
        assert_close(f"{name} patched", exact.detach().numpy(), want.detach().numpy(), 1e-15)
        err = (loose - want).abs().max() / want.abs().max()
        assert err > NEG_CONTROL, f"{name}: unpatched error {err:.1e} -- is it still a float32 island?"

    for cls in (g2.Gemma2RMSNorm, t5.T5GemmaRMSNorm):
        norm = cls(16).double()
        with torch.no_grad():
            norm.weight.normal_(0, 0.3, generator=g)
        check(cls.__name__, lambda: norm(x), _rms(x, norm.weight, norm.eps))
    g2_config = oracle_hf.gemma2_hf_config(cases.GEMMA2_CASES["gqa_odd"])
    t5_config = oracle_hf.t5gemma_hf_config(cases.T5GEMMA_CASES["balanced"]).encoder
    for cls, hf_config in ((g2.Gemma2RotaryEmbedding, g2_config), (t5.T5GemmaRotaryEmbedding, t5_config)):
        rot = cls(hf_config).double()
        pos = torch.arange(40)[None]
        q = torch.randn(1, 1, 40, hf_config.head_dim, dtype=torch.float64, generator=g)
        check(cls.__name__, lambda: g2.apply_rotary_pos_emb(q, q, *rot(q, pos))[0], _rope(q, 10000.0))
    for mod in (g2, t5):
        m = torch.nn.Module()
        m.num_key_value_groups, m.head_dim = 2, 16
        q = torch.randn(2, 4, 5, 16, dtype=torch.float64, generator=g)
        k = torch.randn(2, 2, 5, 16, dtype=torch.float64, generator=g)
        kk = k.repeat_interleave(2, dim=1)                   # GQA: 2 query heads per kv head
        want = torch.softmax(torch.einsum("bhtd,bhsd->bhts", q, kk) * 16**-0.5, dim=-1) @ kk
        check(f"{mod.__name__}.eager_attention_forward",
              lambda: mod.eager_attention_forward(m, q, k, k, None, scaling=16**-0.5)[0].transpose(1, 2),
              want)
    # Built in float32 then cast, as `model.to(torch.float64)` does: the buffer holds sqrt(24)
    # rounded to float32. (The oracle builds in float64, where the buffer is exact.)
    emb = g2.Gemma2TextScaledWordEmbedding(10, 24, 0, embed_scale=24**0.5).double()
    ids = torch.tensor([[1, 2, 3]])
    check("Gemma2TextScaledWordEmbedding", lambda: emb(ids), emb.weight[ids] * math.sqrt(24))
    logits = torch.randn(2, 5, 7, dtype=torch.float64, generator=g) * 3
    labels = torch.tensor([[1, 2, -100, 4, 5], [6, 0, 1, -100, 2]])
    check("ForCausalLM loss", lambda: LOSS_MAPPING["ForCausalLM"](logits, labels, 7),
          _xent(logits[:, :-1], labels[:, 1:]))
    check("ForMaskedLM loss", lambda: LOSS_MAPPING["ForMaskedLM"](logits, labels, 7),
          _xent(logits, labels))


def test_patches_are_restored():
    """After the context manager (also after an exception) every original is back, and the
    float32 behaviour returns bit for bit."""
    pytest.importorskip("torch")
    import oracle_hf
    case = "mqa_nocap"
    config, params, x = cases.case_config(case), cases.case_params(case), cases.case_inputs(case)
    ones = np.ones_like(x["attention_mask"])
    before = oracle_hf.patch_targets()
    def run():
        out = oracle_hf.gemma2_run(config, params, x["input_ids"], attention_mask=ones, exact=False)
        return out["logits"]

    loose1 = run()
    with oracle_hf.float64_exact():
        inside = oracle_hf.patch_targets()
        exact = run()
    assert all(inside[k] is not before[k] for k in before)
    assert all(oracle_hf.patch_targets()[k] is before[k] for k in before)
    loose2 = run()
    np.testing.assert_array_equal(loose1, loose2)
    assert np.max(np.abs(exact - loose2)) > NEG_CONTROL * np.max(np.abs(exact))
    with pytest.raises(RuntimeError, match="boom"):
        with oracle_hf.float64_exact():
            raise RuntimeError("boom")
    assert all(oracle_hf.patch_targets()[k] is before[k] for k in before)


# --------------------------------------------------------------------------- transformers' conventions

def test_shift_right_matches_transformers():
    """Labels-only decoding (transformers' _shift_right) == explicit cases.shift_right ids."""
    torch = pytest.importorskip("torch")
    import oracle_hf
    from transformers import T5GemmaForConditionalGeneration
    case = "balanced"
    config, params, x = cases.case_config(case), cases.case_params(case), cases.case_inputs(case)
    hf_config = oracle_hf.t5gemma_hf_config(config)
    model = oracle_hf._build(T5GemmaForConditionalGeneration, hf_config, params, "float64")
    shifted = model._shift_right(torch.from_numpy(x["labels"])).numpy()
    np.testing.assert_array_equal(shifted, x["decoder_input_ids"])
    a = oracle_hf.t5gemma_run(config, params, x["input_ids"], x["labels"], x["attention_mask"])
    b = oracle_hf.t5gemma_run(config, params, x["input_ids"], x["labels"], x["attention_mask"],
                              decoder_input_ids=x["decoder_input_ids"],
                              decoder_attention_mask=x["decoder_attention_mask"])
    np.testing.assert_array_equal(a["logits"], b["logits"])
    assert a["loss"] == b["loss"]


def test_classification_pooling_and_loss():
    """The classification heads: pooled logits = head(hidden)[b, pooled_index[b]], loss = mean
    cross-entropy; pooled_index as documented in oracle_hf (from ids, +1 in encoder-decoder)."""
    torch = pytest.importorskip("torch")
    import oracle_hf
    for stem, (kind, case, opts) in cases.GOLDEN.items():
        if not kind.endswith("classify"):
            continue
        _, config, params, x, opts = cases.golden_case(stem)
        got = oracle_hf.run_golden(kind, config, params, x, opts)
        ids = x["input_ids"]
        last = np.array([np.nonzero(row != cases.PAD)[0].max() for row in ids])
        if opts.get("is_encoder_decoder"):
            last = np.minimum(last + 1, ids.shape[1] - 1)
        np.testing.assert_array_equal(got["pooled_index"], last)
        logits = torch.from_numpy(got["logits"])
        want = torch.nn.functional.cross_entropy(logits, torch.from_numpy(x["labels"])).item()
        assert abs(got["loss"] - want) <= 1e-14 * abs(want), stem
        assert got["logits"].shape == (ids.shape[0], opts["num_labels"])


@pytest.mark.parametrize("name", [*cases.GEMMA2_CASES, *cases.T5GEMMA_CASES])
def test_param_shapes_equal_transformers(name):
    """cases.py's name/shape lists (written from transformers' module code) == transformers' parameters."""
    pytest.importorskip("torch")
    import oracle_hf
    config = cases.case_config(name)
    assert cases.param_shapes(config) == oracle_hf.param_shapes_from_hf(config)
    assert cases.param_shapes(config, 3) == oracle_hf.param_shapes_from_hf(config, 3)
    if name in cases.T5GEMMA_CASES:
        assert cases.param_shapes(config, 3, is_encoder_decoder=False) == \
            oracle_hf.param_shapes_from_hf(config, 3, is_encoder_decoder=False)


def test_random_params_nontrivial_and_order_independent():
    config = cases.GEMMA2_CASES["gqa_odd"]
    shapes = cases.gemma2_param_shapes(config)
    p = cases.random_params(shapes, 7)
    q = cases.random_params(dict(reversed(list(shapes.items()))), 7)
    assert all(np.array_equal(p[k], q[k]) for k in p)
    assert all(v.dtype == np.float64 and np.all(v != 0) for v in p.values())
    norms = [v for k, v in p.items() if k.endswith("norm.weight")]
    assert len(norms) == 4 * config.num_hidden_layers + 1 and all(np.std(v) > 0.1 for v in norms)


def test_small_caps_bite():
    """In the small-cap cases the caps are far from linear: the pre-cap logits (recovered from
    the golden logits, z = cap * artanh(y / cap)) and the layer-0 attention scores (head 0,
    without RoPE: the same scale) exceed twice the cap."""
    t5_dec = cases.T5GEMMA_CASES["mqa_caps"].decoder
    for case, c, pre, norm in (
            ("small_caps", cases.GEMMA2_CASES["small_caps"], "model.", "input_layernorm"),
            ("mqa_caps", t5_dec, "model.decoder.", "pre_self_attn_layernorm")):
        P, x = cases.case_params(case), cases.case_inputs(case)
        ids = x.get("decoder_input_ids", x["input_ids"])
        h = P[pre + "embed_tokens.weight"][ids] * math.sqrt(c.hidden_size)
        h = h / np.sqrt((h * h).mean(-1, keepdims=True) + c.rms_norm_eps)
        h = h * (1 + P[f"{pre}layers.0.{norm}.weight"])
        q = (h @ P[pre + "layers.0.self_attn.q_proj.weight"].T)[..., :c.head_dim]
        k = (h @ P[pre + "layers.0.self_attn.k_proj.weight"].T)[..., :c.head_dim]
        s = np.einsum("btd,bsd->bts", q, k) / math.sqrt(c.query_pre_attn_scalar)
        assert np.abs(s).max() > 2 * c.attn_logit_softcapping, case
        stem = ("gemma2_" if case in cases.GEMMA2_CASES else "t5gemma_") + case
        y = cases.load_golden(stem)[2]["logits"]
        cap = c.final_logit_softcapping
        z = cap * np.arctanh(np.clip(y / cap, -1 + 1e-16, 1 - 1e-16))
        assert np.abs(z).max() > 2 * cap, case


def test_random_inputs_layout():
    for case in ALL_LM_CASES:
        x = cases.case_inputs(case)
        m = x["attention_mask"]
        assert m[0].all() and m[1, -1] == 0 and m[2, 0] == 0
        assert np.array_equal(x["input_ids"] != cases.PAD, m.astype(bool))
        assert all(v.dtype == np.int64 for v in x.values())
        if "decoder_input_ids" in x:
            assert np.array_equal(x["decoder_input_ids"], cases.shift_right(x["labels"]))
        else:       # no label is predicted from a padding position
            pred = x["labels"][:, 1:] != cases.IGNORE
            assert m[:, :-1][pred].all()


def test_t5gemma_mask_quirks():
    """Two transformers 5.x behaviours the oracle works around (documented in oracle_hf):
    1. attention_mask=None: the encoder masks pad ids itself, but cross-attention then gets
       no padding mask, so every decoder logit changes.
    2. decoder_attention_mask=None in eval mode with the default cache: no decoder padding
       mask at all; with use_cache=False (what t5gemma_run passes) it is ids != pad."""
    torch = pytest.importorskip("torch")
    import oracle_hf
    from transformers import T5GemmaForConditionalGeneration
    case = "balanced"
    config, params, x = cases.case_config(case), cases.case_params(case), cases.case_inputs(case)
    model = oracle_hf._build(T5GemmaForConditionalGeneration, oracle_hf.t5gemma_hf_config(config),
                             params, "float64")
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    with oracle_hf.float64_exact(), torch.no_grad():
        ref = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], labels=t["labels"],
                    decoder_attention_mask=t["decoder_attention_mask"]).logits.numpy()
        no_enc = model(input_ids=t["input_ids"], labels=t["labels"], use_cache=False).logits.numpy()
        cached = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                       labels=t["labels"]).logits.numpy()
        no_cache = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"],
                         labels=t["labels"], use_cache=False).logits.numpy()
    padded_rows = ~x["attention_mask"].all(-1)
    assert np.all(np.abs(no_enc - ref).max(axis=(1, 2))[padded_rows] > 1e-3)
    np.testing.assert_array_equal(no_cache, ref)
    dec_valid = cases.valid_positions(x["decoder_attention_mask"])
    np.testing.assert_array_equal(cached[dec_valid], ref[dec_valid])
    assert np.abs(cached[~dec_valid] - ref[~dec_valid]).max() > 1e-3


# --------------------------------------------------------------------------- golden files

def test_golden_files_present_small_and_versioned():
    total = 0
    for stem, (kind, case, opts) in cases.GOLDEN.items():
        path = cases.golden_path(stem)
        assert path.exists(), f"{path} missing: run `python tests/golden/make_golden.py`"
        size = path.stat().st_size
        total += size
        assert size < 300_000, f"{path.name}: {size} bytes"
        meta = cases.golden_metadata(stem)
        assert meta["format_version"] == cases.GOLDEN_FORMAT_VERSION
        assert (meta["case"], meta["kind"], json.loads(meta["options"])) == (case, kind, opts)
        assert meta["transformers_version"] and meta["torch_version"]
    assert total < 3_000_000


@pytest.mark.parametrize("stem", list(cases.GOLDEN))
def test_golden_matches_cases(stem):
    """Stored params, inputs and config == what cases.py generates now (no torch needed)."""
    kind, config, params, inputs, opts = cases.golden_case(stem)
    g_params, g_inputs, g_out = cases.load_golden(stem)
    assert json.loads(cases.golden_metadata(stem)["config"]) == json.loads(cases.config_json(config)), \
        f"{stem}: config changed; run `python tests/golden/make_golden.py`"
    assert set(g_params) == set(params) and set(g_inputs) == set(inputs)
    for k in params:
        np.testing.assert_array_equal(g_params[k], params[k], err_msg=f"{stem} param {k}")
    for k in inputs:
        np.testing.assert_array_equal(g_inputs[k], inputs[k], err_msg=f"{stem} input {k}")
    assert set(g_out["grads"]) == set(params)
    assert np.isfinite(g_out["loss"]) and np.all(np.isfinite(g_out["logits"]))


@pytest.mark.parametrize("stem", list(cases.GOLDEN))
def test_golden_matches_live_oracle(stem):
    """A fresh live run on the stored params/inputs reproduces the stored outputs."""
    pytest.importorskip("torch")
    import oracle_hf
    kind, case, opts = cases.GOLDEN[stem]
    params, inputs, want = cases.load_golden(stem)
    got = oracle_hf.run_golden(kind, cases.case_config(case), params, inputs, opts)
    assert_close(f"{stem} logits", got["logits"], want["logits"], RTOL_GOLDEN)
    assert_close(f"{stem} loss", got["loss"], want["loss"], RTOL_GOLDEN)
    for k in ("encoder_out", "pooled_index"):
        if k in want:
            assert_close(f"{stem} {k}", got[k], want[k], RTOL_GOLDEN)
    assert set(got["grads"]) == set(want["grads"])
    for k in want["grads"]:
        assert_close(f"{stem} grad {k}", got["grads"][k], want["grads"][k], RTOL_GOLDEN)
