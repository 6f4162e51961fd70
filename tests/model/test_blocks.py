"""Every block against finite differences in float64 and against a second formulation.

The finite-difference checker's own negative control is here too: it must reject a
gradient that is slightly wrong.
"""

import numpy as np
import pytest

from helpers import RTOL_F64, assert_close, gradcheck
from minencdec.model import attention as A
from minencdec.model import layers as L
from minencdec.model import losses

rng = np.random.default_rng(1234)


def weighted_sum(y, upstream):
    """A scalar loss sum(y * upstream): its gradient w.r.t. y is `upstream`."""
    return float(np.sum(y * upstream))


def check_block(forward, backward, inputs, names, out_index=0):
    """Finite-difference check of every float input of `forward` against `backward`."""
    y, cache = forward(*inputs)
    upstream = rng.normal(size=y.shape)
    grads = backward(upstream, cache)
    grads = grads if isinstance(grads, tuple) else (grads,)
    for name, x, g in zip(names, [a for a in inputs if isinstance(a, np.ndarray) and a.dtype == np.float64], grads):
        gradcheck(name, lambda: weighted_sum(forward(*inputs)[0], upstream), x, g, rng)


def test_linear():
    check_block(L.linear_forward, L.linear_backward,
                [rng.normal(size=(2, 3, 5)), rng.normal(size=(4, 5))], ["x", "w"])


def test_rmsnorm_with_offset_weight():
    w = rng.normal(0, 0.5, 6)                                    # non-zero: zeros would hide a missing "1 +"
    x = rng.normal(size=(2, 3, 6))
    check_block(lambda x, w: L.rmsnorm_forward(x, w, 1e-6), L.rmsnorm_backward, [x, w], ["x", "w"])
    # Second formulation: a loop over rows, straight from the definition.
    want = np.array([[r / np.sqrt(np.mean(r ** 2) + 1e-6) * (1 + w) for r in row] for row in x])
    assert_close("rmsnorm", L.rmsnorm_forward(x, w, 1e-6)[0], want, RTOL_F64)


def test_gelu_and_mlp():
    x = rng.normal(0, 2, size=(2, 3, 4))
    check_block(L.gelu_tanh_forward, L.gelu_tanh_backward, [x], ["x"])
    # The formula written another way: x * sigmoid(2 u) == 0.5 x (1 + tanh u).
    u = np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)
    assert_close("gelu_tanh", L.gelu_tanh_forward(x)[0], x / (1 + np.exp(-2 * u)), RTOL_F64)
    D, F = 4, 6
    check_block(L.mlp_forward, L.mlp_backward,
                [x, rng.normal(size=(F, D)), rng.normal(size=(F, D)), rng.normal(size=(D, F))],
                ["x", "gate", "up", "down"])


def test_softcap_bounds_and_gradient():
    x = rng.normal(0, 40, size=50)
    y, _ = L.softcap_forward(x, 5.0)
    assert np.all(np.abs(y) <= 5.0)                              # tanh rounds to 1 when saturated
    check_block(lambda x: L.softcap_forward(x, 5.0), L.softcap_backward, [x / 10], ["x"])
    assert L.softcap_forward(x, None)[0] is x                    # no cap: the identity


def test_rope_is_a_rotation_of_half_split_pairs():
    Dh, T = 8, 5
    cos, sin = L.rope_cos_sin(np.arange(T), Dh, 10000.0, np.float64)
    x = rng.normal(size=(2, 3, T, Dh))
    check_block(lambda x: L.rope_forward(x, cos, sin), L.rope_backward, [x], ["x"])
    y = L.rope_forward(x, cos, sin)[0]
    # Second formulation: pair i with i + Dh/2 as a complex number, rotate by pos * theta^(-2i/Dh).
    z = x[..., : Dh // 2] + 1j * x[..., Dh // 2:]
    angle = np.arange(T)[:, None] * 10000.0 ** (-np.arange(0, Dh, 2) / Dh)
    rotated = z * np.exp(1j * angle)
    assert_close("rope", y, np.concatenate([rotated.real, rotated.imag], -1), RTOL_F64)
    assert_close("rope keeps norms", np.linalg.norm(y, axis=-1), np.linalg.norm(x, axis=-1), RTOL_F64)


def test_embedding_gradient_sums_repeated_ids():
    table = rng.normal(size=(7, 4))
    ids = np.array([[1, 3, 1], [6, 1, 0]])
    check_block(lambda t: L.embedding_forward(ids, t), L.embedding_backward, [table], ["table"])


def test_masks():
    assert A.causal_mask(4).tolist() == np.tril(np.ones((4, 4), bool)).tolist()
    sliding = A.causal_mask(6, window=2)
    for i in range(6):
        for j in range(6):
            assert sliding[i, j] == (i - 2 < j <= i)
    for rule, ok in (("le", lambda d: d <= 2), ("lt", lambda d: d < 2)):
        m = A.bidirectional_mask(6, 2, rule)
        assert all(m[i, j] == ok(abs(i - j)) for i in range(6) for j in range(6))
    pad = A.with_key_padding(A.causal_mask(3), np.array([[1, 1, 0]]))
    assert not pad[0, :, 2].any()


def naive_attention(q, k, v, mask, scale, cap):
    """Loops over batch, heads and queries: an independent, obviously-right formulation."""
    B, H, T, Dh = q.shape
    K = k.shape[1]
    out = np.zeros_like(q)
    for b in range(B):
        for h in range(H):
            kv = h // (H // K)
            for i in range(T):
                s = np.array([q[b, h, i] @ k[b, kv, j] * scale for j in range(k.shape[2])])
                s = cap * np.tanh(s / cap) if cap else s
                vis = mask[b, i]
                if vis.any():
                    e = np.where(vis, np.exp(s - s[vis].max()), 0.0)
                    out[b, h, i] = (e / e.sum()) @ v[b, kv]
    return out


@pytest.mark.parametrize("H,K,cap", [(4, 2, 3.0), (3, 1, None), (2, 2, 50.0)])
def test_attention_core(H, K, cap):
    B, T, S, Dh = 2, 5, 7, 4
    q, k, v = rng.normal(size=(B, H, T, Dh)), rng.normal(size=(B, K, S, Dh)), rng.normal(size=(B, K, S, Dh))
    mask = rng.random((B, T, S)) > 0.3
    mask[0, 1] = False                                           # a fully masked row
    o, _ = A.attention_forward(q, k, v, mask, 0.7, cap)
    assert_close("attention", o, naive_attention(q, k, v, mask, 0.7, cap), RTOL_F64)
    assert np.all(o[0, :, 1] == 0)                               # empty row: zero output, no NaN
    check_block(lambda q, k, v: A.attention_forward(q, k, v, mask, 0.7, cap), A.attention_backward,
                [q, k, v], ["q", "k", "v"])
    _, cache = A.attention_forward(q, k, v, mask, 0.7, cap)
    _, dk, dv = A.attention_backward(rng.normal(size=o.shape), cache)
    never_seen = ~mask.any(axis=1)                               # (B, S) keys no query may see
    assert np.all(dk[never_seen.nonzero()[0], :, never_seen.nonzero()[1]] == 0)
    assert np.all(dv[never_seen.nonzero()[0], :, never_seen.nonzero()[1]] == 0)


def test_attention_block_self_and_cross():
    B, T, S, D, Ds, H, K, Dh = 2, 4, 6, 8, 5, 4, 2, 3
    w = {"q_proj": rng.normal(size=(H * Dh, D)), "k_proj": rng.normal(size=(K * Dh, Ds)),
         "v_proj": rng.normal(size=(K * Dh, Ds)), "o_proj": rng.normal(size=(D, H * Dh))}
    x, src = rng.normal(size=(B, T, D)), rng.normal(size=(B, S, Ds))
    mask = A.with_key_padding(np.ones((T, S), bool), np.array([[1] * 6, [1, 1, 1, 0, 0, 0]]))

    def f():
        return A.attention_block_forward(x, src, w, mask, H, K, 0.5, 4.0)

    y, cache = f()
    up = rng.normal(size=y.shape)
    dx, dsrc, dmem, dws = A.attention_block_backward(up, cache)
    assert dmem is None
    for name, arr, g in [("x", x, dx), ("source", src, dsrc)] + [(n, w[n], dws[n]) for n in w]:
        gradcheck(name, lambda: weighted_sum(f()[0], up), arr, g, rng)
    assert np.all(dsrc[1, 3:] == 0)                              # padded encoder keys get no gradient


def _gemma3_weights(D, H, K, Dh):
    return {"q_proj": rng.normal(size=(H * Dh, D)), "k_proj": rng.normal(size=(K * Dh, D)),
            "v_proj": rng.normal(size=(K * Dh, D)), "o_proj": rng.normal(size=(D, H * Dh)),
            "q_norm": rng.normal(0, 0.5, Dh), "k_norm": rng.normal(0, 0.5, Dh)}   # non-zero norms


def _by_hand(x, keys_from, w, allowed, H, K, Dh, rope, scale, eps, cap=None):
    """Gemma 3 / T5Gemma 2 attention written out with loops over heads: an independent
    formulation. keys_from: [(source, use_rope)] whose keys are concatenated in order."""
    def heads(a, wname, n):
        return (a @ w[wname].T).reshape(a.shape[0], a.shape[1], n, Dh).transpose(0, 2, 1, 3)

    def norm(a, wn):
        return a / np.sqrt(np.mean(a * a, -1, keepdims=True) + eps) * (1 + wn)

    def rotate(a):
        cos, sin = rope
        return a * cos + np.concatenate([-a[..., Dh // 2:], a[..., :Dh // 2]], -1) * sin

    q = rotate(norm(heads(x, "q_proj", H), w["q_norm"]))
    ks, vs = [], []
    for src, use_rope in keys_from:
        k = norm(heads(src, "k_proj", K), w["k_norm"])
        ks.append(rotate(k) if use_rope else k)
        vs.append(heads(src, "v_proj", K))
    k, v = np.concatenate(ks, 2), np.concatenate(vs, 2)
    out = np.zeros((x.shape[0], H, x.shape[1], Dh))
    for b in range(x.shape[0]):
        for h in range(H):
            s = q[b, h] @ k[b, h // (H // K)].T * scale
            s = s if cap is None else cap * np.tanh(s / cap)
            s = np.where(allowed[b], s, -np.inf)
            with np.errstate(invalid="ignore"):                       # a row with no visible key: NaN
                p = np.exp(s - s.max(-1, keepdims=True))
            out[b, h] = p / p.sum(-1, keepdims=True) @ v[b, h // (H // K)]
    return out.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[1], H * Dh) @ w["o_proj"].T


def test_qk_norm_attention_block_gemma3():
    """QK-norm (RMSNorm over head_dim, before RoPE) on self-attention: finite differences
    for every input and weight, and the loop formulation above."""
    B, T, D, H, K, Dh = 2, 5, 8, 4, 1, 6
    w, x = _gemma3_weights(D, H, K, Dh), rng.normal(size=(B, T, D))
    rope = L.rope_cos_sin(np.arange(T), Dh, 10_000.0, np.float64)
    mask = A.Mask(causal=True, window=3, key_mask=np.array([[1] * 5, [0, 1, 1, 1, 1]]))

    def f():
        return A.attention_block_forward(x, x, w, mask, H, K, 0.3, None, rope, eps=1e-6)

    y, cache = f()
    want = _by_hand(x, [(x, True)], w, mask.dense(T, T), H, K, Dh, rope, 0.3, 1e-6)
    keep = mask.dense(T, T).any(-1)                                   # rows with a visible key
    assert_close("qk-norm block", y[keep], want[keep], RTOL_F64)
    up = rng.normal(size=y.shape)
    dx, dsrc, _, dws = A.attention_block_backward(up, cache)
    assert set(dws) == set(w)
    for name, arr, g in [("x", x, dx + dsrc)] + [(n, w[n], dws[n]) for n in w]:
        gradcheck(name, lambda: weighted_sum(f()[0], up), arr, g, rng)


def test_merged_attention_block_t5gemma2():
    """T5Gemma 2's merged attention: keys [RoPE(k_norm(k(x))), k_norm(k(enc))], values
    [v(x), v(enc)], one softmax under [causal sliding self mask | encoder padding]. Checked
    against the loop formulation, and every gradient (x, the encoder output, the shared
    weights) against finite differences."""
    B, T, S, D, H, K, Dh = 2, 5, 4, 8, 4, 2, 6
    w, x, enc = _gemma3_weights(D, H, K, Dh), rng.normal(size=(B, T, D)), rng.normal(size=(B, S, D))
    rope = L.rope_cos_sin(np.arange(T), Dh, 10_000.0, np.float64)
    enc_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]])
    mask = A.Mask(causal=True, window=2, extra_keys=S, extra_key_mask=enc_mask)
    allowed = mask.dense(T, T + S)                                    # (B, T, T + S)
    assert allowed.shape == (B, T, T + S) and not allowed[1, :, T + 2:].any()
    assert allowed[:, :, T:T + 2].all()                               # every query sees the real encoder keys

    def f():
        return A.attention_block_forward(x, x, w, mask, H, K, 0.3, 2.0, rope, eps=1e-6, memory=enc)

    y, cache = f()                                                    # a softcap of 2 bites
    want = _by_hand(x, [(x, True), (enc, False)], w, allowed, H, K, Dh, rope, 0.3, 1e-6, cap=2.0)
    assert_close("merged attention", y, want, RTOL_F64)
    up = rng.normal(size=y.shape)
    dx, dsrc, dmem, dws = A.attention_block_backward(up, cache)
    assert np.all(dmem[1, 2:] == 0)                                   # padded encoder keys: no gradient
    for name, arr, g in [("x", x, dx + dsrc), ("encoder output", enc, dmem)] + [(n, w[n], dws[n]) for n in w]:
        gradcheck(name, lambda: weighted_sum(f()[0], up), arr, g, rng)


def test_t5gemma2_bidirectional_window_rule():
    """transformers' T5Gemma 2 encoder window (sliding_window_mask_function(w, is_causal=False)),
    re-derived here from its two half-windows, against mask_pattern's "t5gemma2" rule."""
    for w in (1, 2, 3, 4, 7, 8):
        left, right = (w + 1) // 2, w // 2 + 1
        d = np.arange(12)[:, None] - np.arange(12)[None, :]           # q_idx - kv_idx
        want = ((d >= 0) & (d < left)) | ((d < 0) & (-d < right))
        got = A.mask_pattern(12, 12, causal=False, window=w, rule="t5gemma2")
        assert np.array_equal(got, want), w
        assert got[6].sum() == w                                      # w keys for a query far from the ends
    assert not np.array_equal(A.mask_pattern(12, 12, window=4, rule="t5gemma2"),
                              A.mask_pattern(12, 12, window=4, rule="le"))   # not T5Gemma's rule


def test_cross_entropy_matches_definition_and_ignores():
    z = rng.normal(0, 3, size=(2, 5, 7))
    t = rng.integers(0, 7, size=(2, 5))
    t[0, 2] = t[1, 4] = -100
    loss, cache = losses.cross_entropy_forward(z, t)
    want = np.mean([np.log(np.exp(z[b, i]).sum()) - z[b, i, t[b, i]]
                    for b in range(2) for i in range(5) if t[b, i] != -100])
    assert_close("cross-entropy", loss, want, RTOL_F64)
    g = losses.cross_entropy_backward(cache)
    gradcheck("logits", lambda: losses.cross_entropy_forward(z, t)[0], z, g, rng)
    assert np.all(g[0, 2] == 0)
    with pytest.raises(ValueError, match="every target is -100"):
        losses.cross_entropy_forward(z, np.full_like(t, -100))


def test_gradcheck_rejects_a_wrong_gradient():
    """Negative control: the checker must fail when the backward is off by a little."""
    x = rng.normal(size=(3, 4))
    w = rng.normal(0, 0.5, 4)
    y, cache = L.rmsnorm_forward(x, w, 1e-6)
    up = rng.normal(size=y.shape)
    dx, _ = L.rmsnorm_backward(up, cache)
    wrong = dx * (1 + 1e-4)                                      # a 0.01% error
    with pytest.raises(AssertionError, match="gradient of x wrong"):
        gradcheck("x", lambda: weighted_sum(L.rmsnorm_forward(x, w, 1e-6)[0], up), x, wrong, rng)
    with pytest.raises(AssertionError, match="DIFF|max abs"):
        assert_close("negative control", y * (1 + 1e-7), y, RTOL_F64)
