"""The backend switch: which functions run a model's hot loops.

    backend="numpy"   the reference: the readable NumPy functions of this package
    backend="numba"   the fast path: the Numba kernels of the top-level `fastpath` package

Both backends take the same arguments and return the same things, so the model code
(stack.py, gemma2.py, t5gemma.py, generate.py) reads the same whichever runs; a `Kernels`
record names the functions. Everything not listed here (the embedding, the LM head of
generation) is shared. The fast path's equality with the reference is what tests/fastpath/
and tests/model/test_backend.py, test_generate_fast.py check.

Python API calls default to "numpy" (a student stepping through the code lands in the
reference); the training and generation commands default to "numba".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from . import attention, layers, losses

BACKENDS = ("numpy", "numba")


@dataclass(frozen=True)
class Kernels:
    """One backend's functions. attention_forward(q, k, v, mask: attention.Mask, scale, cap)
    -> (o, cache); attention_block_forward/backward: the whole attention sublayer, as
    attention.attention_block_forward/backward (whose backward may return dsource None: added
    into dx already); decode_attention(q, k, v, mask, scale, cap) -> o (no backward:
    generation); lm_head_loss_forward(h, table, targets, cap) -> (loss, cache) and its backward
    (cache) -> (dh, dtable): the tied LM head, final softcap and mean cross-entropy."""

    name: str
    rmsnorm_forward: Callable
    rmsnorm_backward: Callable
    mlp_forward: Callable
    mlp_backward: Callable
    attention_forward: Callable
    attention_backward: Callable
    attention_block_forward: Callable
    attention_block_backward: Callable
    decode_attention: Callable
    lm_head_loss_forward: Callable
    lm_head_loss_backward: Callable
    adamw_update: Callable | None     # fastpath/optim.py; the reference is training/optim.py's loop
    decoder: Callable | None          # fastpath/decoder.py's Decoder; the reference steps with generate.stack_step


def _lm_head_loss_forward(h, table, targets, cap):
    """The reference: logits = cap tanh(h E^T / cap) (B, T, V), kept, then cross-entropy."""
    z, head_c = layers.linear_forward(h, table)                  # (B, T, V)
    logits, cap_c = layers.softcap_forward(z, cap)
    loss, ce_c = losses.cross_entropy_forward(logits, targets)
    return loss, (head_c, cap_c, ce_c)


def _lm_head_loss_backward(cache):
    head_c, cap_c, ce_c = cache
    dz = layers.softcap_backward(losses.cross_entropy_backward(ce_c), cap_c)   # inverts CE and the softcap
    return layers.linear_backward(dz, head_c)                    # inverts z = h E^T: (dh, dE)


def _decode_attention(q, k, v, mask, scale, cap):
    return attention.attention_forward_masked(q, k, v, mask, scale, cap)[0]


NUMPY = Kernels("numpy", layers.rmsnorm_forward, layers.rmsnorm_backward, layers.mlp_forward,
                layers.mlp_backward, attention.attention_forward_masked, attention.attention_backward,
                attention.attention_block_forward, attention.attention_block_backward,
                _decode_attention, _lm_head_loss_forward, _lm_head_loss_backward, None, None)

_numba = None


def _numba_kernels():
    """The fast path's record, built on first use (importing fastpath imports numba)."""
    from fastpath import attention as fattn
    from fastpath import block, decode, decoder, lmhead, mlp, norm, optim

    # The kernels take a Mask's fields as keywords of the same names (causal, window, rule,
    # key_mask, q_offset, extra_keys, extra_key_mask). A mask given as a (B, T, S) array
    # is not a description the kernels can read: the reference runs it (the models
    # themselves always pass a Mask).
    def attention_forward(q, k, v, mask, scale, cap, out=None):   # out: see fastpath.attention
        if not isinstance(mask, attention.Mask):
            o, cache = attention.attention_forward_masked(q, k, v, mask, scale, cap)
            if out is not None:
                out[...] = o
            return o if out is None else out, ("reference", cache)
        return fattn.attention_forward(q, k, v, scale, cap, method="auto", out=out, **mask._asdict())

    def attention_backward(do, cache):
        return fattn.attention_backward(do, cache)          # it also takes ("reference", cache)

    def decode_attention(q, k, v, mask, scale, cap):
        if not isinstance(mask, attention.Mask):
            return _decode_attention(q, k, v, mask, scale, cap)
        return decode.decode_attention(q, k, v, scale, cap, **mask._asdict())

    return Kernels("numba", norm.rmsnorm_forward, norm.rmsnorm_backward, mlp.mlp_forward, mlp.mlp_backward,
                   attention_forward, attention_backward, block.attention_block_forward,
                   block.attention_block_backward, decode_attention,
                   lmhead.lm_head_cross_entropy, lmhead.lm_head_cross_entropy_backward, optim.adamw_update,
                   decoder.Decoder)


def prepare(backend):
    """Compile the fast path's kernels now (or load them from the on-disk cache) and print
    how long it took, so that cost is seen once instead of hiding in the first step.
    Nothing to do for the reference."""
    if check_backend(backend) == "numba":
        from fastpath.warmup import compile_all
        compile_all(verbose=True)


def check_backend(backend) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def kernels(backend="numpy") -> Kernels:
    """The Kernels record of a backend name ("numpy" or "numba")."""
    global _numba
    if check_backend(backend) == "numpy":
        return NUMPY
    if _numba is None:
        _numba = _numba_kernels()
    return _numba
