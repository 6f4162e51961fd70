"""Numba kernels for minencdec's hot loops, each beside the reference function it replaces.

    attention.attention_forward(q, k, v, scale, cap, causal, window, rule, key_mask, q_offset,
                                extra_keys, extra_key_mask, method)   the mask: attention.Mask's fields
    attention.attention_backward(do, cache)          tiled, online softmax: no T x S array; or
                                                     method="dense": dense.py, the scores as BLAS
                                                     products (the models' choice at short lengths)
    block.attention_block_forward / _backward        the attention sublayer: q, k, v in one product,
                                                     QK-norm and RoPE in one pass (block.heads)
    decoder.Decoder                                  the generation step, buffers allocated once
    optim.adamw_update(p, g, m, v, ...)              AdamW as one pass per tensor
    attention.dense_mask(T, S, causal, window, rule, key_mask, q_offset, ...)   the reference's mask
    decode.decode_attention(q, k, v, scale, cap, causal, window, rule, key_mask, q_offset, ...)
    norm.rmsnorm_forward(x, w, eps) / norm.rmsnorm_backward(dy, cache)   same cache as layers.py
    lmhead.lm_head_cross_entropy(h, table, targets, cap) / lm_head_cross_entropy_backward(cache)
    mlp.mlp_forward(x, w_gate, w_up, w_down) / mlp.mlp_backward(dy, cache)   gate and up in one product,
                                                     the GeGLU middle in one pass
    warmup.compile_all()                             compile or load every kernel, timed
    python -m fastpath.bench [--quick]               reference vs fast path vs torch, one run
                                                     (bench_kernels.py, bench_model.py, bench_worker.py)

Each public function checks shapes and dtypes, and hands what it does not cover (dtypes
other than float32 / float64, mixed dtypes) to the reference. The reference package imports
this one only when backend="numba" is asked for (minencdec/model/backend.py); tests/fastpath/test_fastpath.py
holds every kernel to its reference, tests/model/test_backend.py the whole models.
"""

import os as _os

_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")   # see minencdec/__init__.py
