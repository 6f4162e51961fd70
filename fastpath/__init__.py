"""Numba kernels for minencdec's hot loops, each beside the reference function it replaces.

    attention.attention_forward(q, k, v, scale, cap, causal, window, rule, key_mask, q_offset)
    attention.attention_backward(do, cache)          tiled, online softmax: no T x S array
    attention.dense_mask(T, S, causal, window, rule, key_mask, q_offset)   the reference's mask
    decode.decode_attention(q, k, v, scale, cap, causal, window, rule, key_mask, q_offset)
    norm.rmsnorm_forward(x, w, eps) / norm.rmsnorm_backward(dy, cache)   same cache as layers.py
    lmhead.lm_head_cross_entropy(h, table, targets, cap) / lm_head_cross_entropy_backward(cache)
    jit.compile_all()                                compile or load every kernel, timed
    python -m fastpath.bench [--quick]               reference vs fast path vs torch, one run

Each public function checks shapes and dtypes, and hands what it does not cover (dtypes
other than float32 / float64, mixed dtypes) to the reference. The reference package never
imports this one; tests/test_fastpath.py holds every kernel to its reference.
"""
