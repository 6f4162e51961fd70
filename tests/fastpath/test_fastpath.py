"""The compiled fast path (fastpath/) against the NumPy reference (minencdec/).

Every kernel is compared with the reference function it replaces, over Hypothesis-drawn
shapes and mask descriptions; then invariants that hold whatever the implementation
(masked keys get exactly zero gradient, a query that sees nothing gets 0, softcap bounds,
softmax rows sum to one); then negative controls showing the comparison can fail. RMSNorm
(with Gemma 3's QK-norm) is in test_norm.py; T5Gemma 2's attention at the models' sizes,
with its own negative controls, in test_gemma3_kernels.py.

Compilation: a fresh checkout compiles every kernel on first use (35-45 s on this 2-core
machine, printed by the `kernels` fixture below); afterwards they load from the on-disk
cache (fastpath/__pycache__) in under a second.

Tolerances, relative to a *natural scale* of each tensor: for o and dv its largest
magnitude; for dq and dk the size the gradient would have with every cancellation and the
softcap's slope taken out, scale * (p (|dp| + |delta|)) @ |k| (resp. |q|). When the softcap
saturates, 1 - tanh^2 rounds to ~0 and both implementations return gradients that are pure
rounding noise relative to themselves; against the natural scale they still agree.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc
from types import SimpleNamespace

import numba
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from helpers import assert_close
from minencdec.model import attention as R
from minencdec.model import stack as ST
from minencdec.model import losses as LS

from fastpath import attention as F
from fastpath import decode as D
from fastpath import lmhead as LH
from fastpath import mathfn as M
from fastpath.warmup import compile_all

# float64: the kernels sum in another order and use exp/tanh within 2 ulp of NumPy's;
# measured worst over 1,000 random cases 4e-14 of the natural scale. 1e-12 leaves 25x.
RTOL_FAST_F64 = 1e-12
# float32: a score s is rounded to |s| 2^-24 and that error goes straight into exp(s - m)
# as a relative error of p, in the reference as much as here; with |s| up to ~300 in these
# cases that is ~2e-5. Measured worst over 2,000 random cases: 1.6e-5. 1e-4 leaves 6x.
RTOL_FAST_F32 = 1e-4


def rtol(dtype):
    return RTOL_FAST_F64 if dtype == np.float64 else RTOL_FAST_F32


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """Compile (fresh checkout) or load (cached) every kernel once, and say how long it took."""
    seconds = compile_all(verbose=False)
    print(f"\nfastpath kernels compiled or loaded in {seconds:.1f} s")

# ---------------------------------------------------------------------------- cases


@st.composite
def attention_cases(draw, max_len=24, decode=False):
    """A random attention problem and mask description: causal (with q_offset, S = T +
    offset or not), bidirectional (windows below and above the length, the three rules),
    cross, or merged (T5Gemma 2: causal or bidirectional own keys, then E extra keys, E
    drawn apart from T); GQA ratios 1, 2, 4 and K = 1; odd head dims; padded keys, sometimes a batch row
    with every key padded (own and extra), sometimes every extra key padded; softcap on or
    off; small tiles so several tiles are used. c.S counts every key, c.extra_keys the last E."""
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    B, K, G = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 4]))
    Dh = draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["causal", "bidirectional", "cross", "merged"]))
    T = draw(st.integers(1, 3 if decode else max_len))
    causal = kind == "causal" or (kind == "merged" and draw(st.booleans()))
    q_offset, S = 0, T
    if causal:
        q_offset = draw(st.integers(0, 3 * max_len if decode else 8))
        S = draw(st.one_of(st.just(T + q_offset), st.integers(1, max_len + 8)))
    elif kind == "cross" or decode:
        S = draw(st.integers(1, max_len))
    E = draw(st.integers(1, max_len + 8)) if kind == "merged" else 0   # extra keys after the S own keys
    window = None if kind == "cross" else draw(st.one_of(st.none(), st.integers(0, max_len + 4)))
    pad = draw(st.sampled_from(["none", "random", "empty_row"]))
    pad_extra = draw(st.sampled_from(["none", "random", "all"])) if E else "none"
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    key_mask = extra_key_mask = None
    if pad != "none":
        key_mask = rng.random((B, S)) > draw(st.floats(0.0, 0.7))
    if pad_extra != "none":
        extra_key_mask = rng.random((B, E)) > (draw(st.floats(0.0, 0.7)) if pad_extra == "random" else 2.0)
    if pad == "empty_row":                                        # every query of that row sees nothing
        row = rng.integers(B)
        key_mask[row] = False
        if E:
            extra_key_mask = np.ones((B, E), bool) if extra_key_mask is None else extra_key_mask
            extra_key_mask[row] = False
    mag = draw(st.floats(0.1, 6.0))                               # large: saturates the softcap
    return SimpleNamespace(
        dtype=dtype, B=B, H=K * G, K=K, T=T, S=S + E, Dh=Dh, causal=causal, window=window,
        rule=draw(st.sampled_from(["le", "lt", "t5gemma2"])), key_mask=key_mask, q_offset=q_offset,
        extra_keys=E, extra_key_mask=extra_key_mask,
        cap=draw(st.one_of(st.none(), st.floats(0.5, 50.0))), scale=draw(st.floats(0.05, 2.0)),
        block=(draw(st.sampled_from([4, 8, 12, 64])), draw(st.sampled_from([4, 8, 16, 64]))),
        q=(rng.standard_normal((B, K * G, T, Dh)) * mag).astype(dtype),
        k=(rng.standard_normal((B, K, S + E, Dh)) * mag).astype(dtype),
        v=rng.standard_normal((B, K, S + E, Dh)).astype(dtype),
        do=rng.standard_normal((B, K * G, T, Dh)).astype(dtype))


def description(c):
    return dict(causal=c.causal, window=c.window, rule=c.rule, key_mask=c.key_mask, q_offset=c.q_offset,
                extra_keys=c.extra_keys, extra_key_mask=c.extra_key_mask)


def reference_mask(c):
    return F.dense_mask(c.T, c.S, **description(c))


def natural_scales(c):
    """o, dq, dk, dv magnitudes without cancellation or softcap slope (module notes), float64."""
    q, k, v, do = (x.astype(np.float64) for x in (c.q, c.k, c.v, c.do))
    o, (qg, _, _, p, _, _) = R.attention_forward(q, k, v, reference_mask(c), c.scale, c.cap)
    B, K, G, T, Dh = qg.shape
    dog = do.reshape(B, K, G, T, Dh)
    dp = dog @ v[:, :, None].swapaxes(-1, -2)                     # (B, K, G, T, S)
    g = p * (np.abs(dp) + np.abs(np.sum(dp * p, axis=-1, keepdims=True))) * c.scale
    return (np.abs(v).max(), (g @ np.abs(k[:, :, None])).max(),
            (g.swapaxes(-1, -2) @ np.abs(qg)).max(), (p.swapaxes(-1, -2) @ np.abs(dog)).max())


def check_against_reference(c, forward=F.attention_forward, backward=F.attention_backward):
    o_ref, cache_ref = R.attention_forward(c.q, c.k, c.v, reference_mask(c), c.scale, c.cap)
    grads_ref = R.attention_backward(c.do, cache_ref)
    o, cache = forward(c.q, c.k, c.v, c.scale, c.cap, **description(c), block=c.block)
    grads = backward(c.do, cache)
    tol = rtol(c.dtype)
    for name, got, want, scale in zip(("o", "dq", "dk", "dv"), (o,) + grads, (o_ref,) + grads_ref, natural_scales(c)):
        assert got.dtype == c.dtype and got.shape == want.shape, name
        assert_close(name, got, want, tol, atol=tol * scale)

# ---------------------------------------------------------------------------- attention


@given(attention_cases())
def test_attention_matches_reference(c):
    check_against_reference(c)


@given(attention_cases(decode=True))
def test_decode_matches_reference(c):
    want = R.attention_forward(c.q, c.k, c.v, reference_mask(c), c.scale, c.cap)[0]
    got = D.decode_attention(c.q, c.k, c.v, c.scale, c.cap, **description(c))
    assert_close("decode o", got, want, rtol(c.dtype), atol=rtol(c.dtype) * np.abs(c.v).max())


@given(attention_cases())
def test_masked_keys_and_empty_rows_get_exact_zeros(c):
    o, cache = F.attention_forward(c.q, c.k, c.v, c.scale, c.cap, **description(c), block=c.block)
    dq, dk, dv = F.attention_backward(c.do, cache)
    mask = np.broadcast_to(reference_mask(c), (c.B, c.T, c.S))
    unseen_keys = ~mask.any(axis=1)                               # (B, S): padding, or out of every window
    empty_rows = ~mask.any(axis=2)                                # (B, T): a query that sees no key
    for b in range(c.B):
        assert np.all(dk[b][:, unseen_keys[b]] == 0) and np.all(dv[b][:, unseen_keys[b]] == 0)
        assert np.all(o[b][:, empty_rows[b]] == 0) and np.all(dq[b][:, empty_rows[b]] == 0)
    dec = D.decode_attention(c.q, c.k, c.v, c.scale, c.cap, **description(c))
    assert np.all(dec[np.broadcast_to(empty_rows[:, None], dec.shape[:3])] == 0)


@given(attention_cases())
def test_softmax_rows_sum_to_one(c):
    """With every value vector all ones, o = sum_j p_ij = 1 on rows that see a key."""
    ones = np.ones_like(c.v)
    o = F.attention_forward(c.q, c.k, ones, c.scale, c.cap, **description(c), block=c.block)[0]
    seen = np.broadcast_to(reference_mask(c), (c.B, c.T, c.S)).any(axis=2)    # (B, T)
    want = np.broadcast_to(seen[:, None, :, None], o.shape).astype(c.dtype)
    assert_close("sum p", o, want, rtol(c.dtype) * 10)


@given(attention_cases(), st.floats(1e-3, 1e-2))
def test_softcap_bounds_scores(c, cap):
    """Scores capped at +-cap: every weight is within e^(2 cap) of the others, so the output
    is within (e^(2 cap) - 1) max|v| of the plain mean of the visible values."""
    o = F.attention_forward(c.q, c.k, c.v, c.scale, cap, **description(c), block=c.block)[0]
    mask = np.broadcast_to(reference_mask(c), (c.B, c.T, c.S)).astype(np.float64)
    count = np.maximum(mask.sum(axis=2), 1)[:, None, :, None]
    v = np.repeat(c.v.astype(np.float64), c.H // c.K, axis=1)    # (B, H, S, Dh)
    mean = (mask[:, None] @ v) / count
    assert np.max(np.abs(o - mean)) <= (np.exp(2 * cap) - 1) * np.abs(c.v).max() + 1e-5


@numba.njit
def apply(x, out, which):
    for i in range(x.size):
        out[i] = M.tanh(x[i]) if which == 0 else M.exp(x[i])
    return out


def test_softcap_and_exp_functions():
    """mathfn.tanh within 5 ulp (float32) / 2 ulp (float64) of NumPy and never beyond +-1,
    exactly +-1 where NumPy's is; exp within 2 ulp; exp of -inf is tiny (callers mask)."""
    rng = np.random.default_rng(0)
    for dt, tanh_ulp in ((np.float32, 5), (np.float64, 2)):
        x = np.concatenate([rng.uniform(-12, 12, 20000), np.logspace(-12, 3, 2000),
                            -np.logspace(-12, 3, 2000), [0.0, 7.9, 7.91, 9.02, 1e30, -1e30]]).astype(dt)
        got, want = apply(x, np.empty_like(x), 0), np.tanh(x)
        assert np.all(np.abs(got) <= 1) and np.all(got[np.abs(want) == 1] == want[np.abs(want) == 1])
        assert np.max(np.abs(got - want) / np.spacing(np.abs(want))) <= tanh_ulp
        x = np.concatenate([rng.uniform(-80, 0, 20000), -np.logspace(-12, 1.9, 2000)]).astype(dt)
        got, want = apply(x, np.empty_like(x), 1), np.exp(x.astype(np.float64)).astype(dt)
        assert np.max(np.abs(got - want) / np.spacing(want)) <= 2
        assert 0 < apply(np.array([-np.inf], dt), np.empty(1, dt), 1)[0] < 1e-37

# ---------------------------------------------------------------------------- negative controls


_INTERVALS = F.visible_intervals


def _off_by_one_intervals(T, S, causal=False, window=None, rule="le", q_offset=0):
    lo, hi = _INTERVALS(T, S, causal, window, rule, q_offset)
    if causal and window is not None:
        lo = np.maximum(lo - 1, 0)                                # sees w + 1 keys: i - w <= j
    return lo, hi


def _case(**kw):
    rng = np.random.default_rng(7)
    c = SimpleNamespace(dtype=np.float64, B=1, H=2, K=1, T=10, S=10, Dh=5, causal=True, window=3,
                        rule="le", key_mask=None, q_offset=0, extra_keys=0, extra_key_mask=None, cap=50.0,
                        scale=0.4, block=(4, 4))
    c.__dict__.update(kw)
    c.q = rng.standard_normal((c.B, c.H, c.T, c.Dh))
    c.k, c.v = rng.standard_normal((2, c.B, c.K, c.S, c.Dh))
    c.do = rng.standard_normal((c.B, c.H, c.T, c.Dh))
    return c


def test_negative_control_window_off_by_one(monkeypatch):
    """A fast path whose causal window lets one key too many through must fail the property."""
    check_against_reference(_case())
    monkeypatch.setattr(F, "visible_intervals", _off_by_one_intervals)
    with pytest.raises(AssertionError):
        check_against_reference(_case())


def test_negative_control_window_rule_swapped():
    """The bidirectional rules differ only at |i - j| = w: confusing them must fail."""
    c = _case(causal=False, window=2, rule="le")
    check_against_reference(c)
    swapped = lambda *a, **kw: F.attention_forward(*a, **{**kw, "rule": "lt"})   # noqa: E731
    with pytest.raises(AssertionError):
        check_against_reference(c, forward=swapped)


def test_negative_control_tolerance_catches_a_small_error():
    c = _case(dtype=np.float32)
    c.q, c.k, c.v, c.do = (x.astype(np.float32) for x in (c.q, c.k, c.v, c.do))
    check_against_reference(c)
    nudged = lambda *a, **kw: (lambda o, cache: (o * np.float32(1 + 5 * RTOL_FAST_F32), cache))(   # noqa: E731
        *F.attention_forward(*a, **kw))
    with pytest.raises(AssertionError):
        check_against_reference(c, forward=nudged)


# ---------------------------------------------------------------------------- masks


@given(st.integers(1, 12), st.integers(1, 12), st.booleans(), st.one_of(st.none(), st.integers(0, 14)),
       st.sampled_from(["le", "lt", "t5gemma2"]), st.integers(0, 6), st.integers(0, 2**32 - 1), st.booleans(),
       st.integers(0, 5))
def test_dense_mask_against_loops(T, S, causal, window, rule, q_offset, seed, padded, E):
    """The description, by hand: own keys by the rules (T5Gemma 2's from transformers' two
    half-windows, as tests/model/test_blocks.py), then E extra keys every query sees."""
    rng = np.random.default_rng(seed)
    key_mask = (rng.random((2, S)) > 0.3) if padded else None
    extra_mask = (rng.random((2, E)) > 0.3) if padded and E else None
    pattern = np.zeros((T, S), dtype=bool)
    for i in range(T):
        pos = q_offset + i
        for j in range(S):
            d = pos - j                                           # q_idx - kv_idx
            if causal:
                pattern[i, j] = j <= pos and (window is None or j > pos - window)
            elif window is None:
                pattern[i, j] = True
            elif rule == "t5gemma2":
                pattern[i, j] = (0 <= d < (window + 1) // 2) or (d < 0 and -d < window // 2 + 1)
            else:
                pattern[i, j] = abs(d) <= window if rule == "le" else abs(d) < window
    want = pattern[None] if key_mask is None else pattern[None] & key_mask[:, None, :]   # (1 or 2, T, S)
    if E:
        extra = np.ones((1, T, E), bool) if extra_mask is None else np.repeat(extra_mask[:, None, :], T, axis=1)
        want = np.concatenate([want, extra], axis=2)
    got = F.dense_mask(T, S + E, causal, window, rule, key_mask, q_offset, E, extra_mask)
    assert got.dtype == bool and np.array_equal(got, want)
    lo, hi = F.visible_intervals(T, S, causal, window, rule, q_offset)       # the kernels' form
    j = np.arange(S)
    assert np.array_equal((j >= lo[:, None]) & (j <= hi[:, None]), pattern)
    if causal and S == T + q_offset:                              # the reference's own builders
        assert np.array_equal(pattern, R.causal_mask(T, window, q_offset))
    if not causal and S == T and q_offset == 0:
        assert np.array_equal(pattern, R.bidirectional_mask(T, window, rule))


# ---------------------------------------------------------------------------- the LM head


def _reference_head_loss(h, table, targets, cap):
    logits, head_c = ST.lm_head_forward(h, table, cap)
    loss, ce_c = LS.cross_entropy_forward(logits, targets)
    return (loss,) + ST.lm_head_backward(LS.cross_entropy_backward(ce_c), head_c)


@given(st.sampled_from([np.float64, np.float32]), st.integers(1, 3), st.integers(1, 20), st.integers(1, 16),
       st.integers(2, 60), st.one_of(st.none(), st.floats(1.0, 30.0)), st.integers(1, 70),
       st.integers(0, 2**32 - 1))
def test_lm_head_cross_entropy_matches_reference(dtype, B, T, D_, V, cap, chunk_rows, seed):
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((B, T, D_)) * 3).astype(dtype)
    table = rng.standard_normal((V, D_)).astype(dtype)
    targets = rng.integers(0, V, (B, T))
    targets[rng.random((B, T)) < 0.3] = LS.IGNORE_INDEX
    targets[0, 0] = rng.integers(0, V)                            # at least one labelled token
    loss_ref, dh_ref, dtable_ref = _reference_head_loss(h, table, targets, cap)
    loss, cache = LH.lm_head_cross_entropy(h, table, targets, cap, chunk_rows=chunk_rows)
    dh, dtable = LH.lm_head_cross_entropy_backward(cache, 2.0)
    # Natural scales (the sizes before the cancellations in logsumexp - logit and p - 1):
    logits = ST.lm_head_forward(h.astype(np.float64), table.astype(np.float64), cap)[0]
    valid = (targets != LS.IGNORE_INDEX)[..., None]
    g = (np.exp(LS.log_softmax(logits)) + (np.arange(V) == targets[..., None])) * valid / valid.sum()
    scales = (2 * np.abs(logits).max(), 2 * (g @ np.abs(table)).max(),
              2 * (g.reshape(-1, V).T @ np.abs(h.reshape(-1, D_))).max())
    tol = rtol(dtype) * 10                                        # sums over V and over rows, reordered
    for name, got, want, scale in zip(("loss", "dh", "dtable"), (loss, dh, dtable),
                                      (loss_ref, 2 * dh_ref, 2 * dtable_ref), scales):
        assert_close(name, got, want, tol, atol=tol * scale)


def test_lm_head_keeps_no_full_logits():
    """Peak memory of the fused head stays below one (N, V) logits array; the reference's
    is several of them."""
    rng = np.random.default_rng(0)
    h, table = rng.standard_normal((4, 64, 32)), rng.standard_normal((2000, 32)) * 0.1
    targets = rng.integers(0, 2000, (4, 64))
    logits_bytes = 4 * 64 * 2000 * 8
    for fn, bound in ((lambda: LH.lm_head_cross_entropy(h, table, targets, 30.0, chunk_rows=64), "below"),
                      (lambda: _reference_head_loss(h, table, targets, 30.0), "above")):
        tracemalloc.start()
        fn()
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert (peak < logits_bytes) if bound == "below" else (peak > 2 * logits_bytes), (bound, peak, logits_bytes)
    with pytest.raises(ValueError, match="every target is -100"):
        LH.lm_head_cross_entropy(h, table, np.full((4, 64), -100), 30.0)


def test_attention_memory_grows_linearly():
    """tracemalloc peak (tiles, outputs, per-lane dq buffers, and the kernels' own scratch:
    Numba allocates through PyMem_RawMalloc, which tracemalloc sees) for T and 2T: about x2,
    far below a T x T array."""
    rng = np.random.default_rng(0)
    peaks = []
    for T in (256, 512):
        q = rng.standard_normal((1, 2, T, 16))
        tracemalloc.start()
        o, cache = F.attention_forward(q, q, q, 0.25, 50.0, causal=True, window=64)
        F.attention_backward(o, cache)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert peaks[-1] < 2 * T * T * 8                          # one (H, T, T) float64 score array
    assert peaks[1] < 2.5 * peaks[0], peaks

# ---------------------------------------------------------------------------- the wrappers


def test_other_dtypes_fall_back_to_the_reference():
    c = _case()
    q16, k16, v16 = (x.astype(np.float16) for x in (c.q, c.k, c.v))
    o, cache = F.attention_forward(q16, k16, v16, c.scale, c.cap, causal=True, window=3)
    o_ref, cache_ref = R.attention_forward(q16, k16, v16, F.dense_mask(10, 10, True, 3), c.scale, c.cap)
    assert o.dtype == np.float16 and np.array_equal(o, o_ref)
    for got, want in zip(F.attention_backward(c.do.astype(np.float16), cache),
                         R.attention_backward(c.do.astype(np.float16), cache_ref)):
        assert np.array_equal(got, want)
    o_mixed = F.attention_forward(c.q.astype(np.float32), c.k, c.v, c.scale, None, causal=True)[0]
    assert o_mixed.dtype == np.float64                            # NumPy promotes, as the reference does


@pytest.mark.parametrize("bad", [
    dict(q=np.zeros((1, 3, 4, 8)), k=np.zeros((1, 2, 4, 8))),    # 3 query heads over 2 kv heads
    dict(q=np.zeros((1, 2, 4, 8)), k=np.zeros((1, 2, 4, 6))),    # head dims differ
    dict(rule="leq"), dict(window=-1), dict(cap=0.0), dict(key_mask=np.ones((1, 5), bool)),
])
def test_bad_arguments_are_refused(bad):
    args = dict(q=np.zeros((1, 2, 4, 8)), k=np.zeros((1, 1, 4, 8)), scale=0.5, cap=None, causal=False,
                window=None, rule="le", key_mask=None)
    args.update(bad)
    k = args.pop("k")
    with pytest.raises(ValueError):
        F.attention_forward(args.pop("q"), k, k, **args)


def test_runs_with_the_jit_disabled():
    """NUMBA_DISABLE_JIT=1 (stepping through a kernel in a debugger) must still compute the
    same numbers: every kernel once on a tiny case, in a subprocess."""
    script = """
import numpy as np
from minencdec.model import attention as R, layers as L
from fastpath import attention as F, decode as D, norm as N, lmhead as LH
rng = np.random.default_rng(0)
q, k, v = rng.standard_normal((1, 2, 3, 4)), rng.standard_normal((1, 1, 5, 4)), rng.standard_normal((1, 1, 5, 4))
m = F.dense_mask(3, 5, True, 3, q_offset=2)
o_ref, c_ref = R.attention_forward(q, k, v, m, 0.5, 5.0)
o, c = F.attention_forward(q, k, v, 0.5, 5.0, causal=True, window=3, q_offset=2, block=(4, 4))
for a, b in zip((o,) + F.attention_backward(o, c), (o_ref,) + R.attention_backward(o_ref, c_ref)):
    assert np.allclose(a, b, rtol=1e-12, atol=1e-12)
assert np.allclose(D.decode_attention(q, k, v, 0.5, 5.0, causal=True, window=3, q_offset=2), o_ref)
merged = dict(causal=True, window=2, extra_keys=2, extra_key_mask=np.array([[1, 0]]))   # 3 own keys, 2 extra
m = F.dense_mask(3, 5, **merged)
o_ref, c_ref = R.attention_forward(q, k, v, m, 0.5, 5.0)
o, c = F.attention_forward(q, k, v, 0.5, 5.0, **merged, block=(4, 4))
for a, b in zip((o,) + F.attention_backward(o, c), (o_ref,) + R.attention_backward(o_ref, c_ref)):
    assert np.allclose(a, b, rtol=1e-12, atol=1e-12)
assert np.allclose(D.decode_attention(q, k, v, 0.5, 5.0, **merged), o_ref)
m = F.dense_mask(3, 5, False, 2, "t5gemma2")
assert np.allclose(F.attention_forward(q, k, v, 0.5, None, window=2, rule="t5gemma2")[0],
                   R.attention_forward(q, k, v, m, 0.5, None)[0])
x, w = rng.standard_normal((3, 6)), rng.normal(0, 0.5, 6)
assert np.allclose(N.rmsnorm_forward(x, w, 1e-6)[0], L.rmsnorm_forward(x, w, 1e-6)[0])
heads = rng.standard_normal((2, 3, 2, 6)).transpose(0, 2, 1, 3)          # as attention._split_heads makes them
assert np.allclose(N.rmsnorm_forward(heads, w, 1e-6)[0], L.rmsnorm_forward(heads, w, 1e-6)[0])
LH.lm_head_cross_entropy(x, rng.standard_normal((7, 6)), np.array([1, 2, -100]), 30.0)
import numba; assert numba.config.DISABLE_JIT
print("ok")
"""
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repository
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
