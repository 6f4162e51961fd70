"""Shared checkers for the test suite: one `assert_close` and one finite-difference gradcheck.

Tolerances are named constants. Widening one needs a written reason beside it.
"""

from __future__ import annotations

import numpy as np

from minencdec.model import attention, generate, layers, stack

# float64 against an independent float64 implementation (transformers made exact, einsum,
# naive loops): both round differently, so agreement is ~1e-14; 1e-9 leaves room for deep
# models and long reductions while still catching any real mistake (those are >= 1e-4).
RTOL_F64 = 1e-9
# Finite differences in float64 with a central difference: truncation error ~ eps^2 and
# round-off ~ 1e-16 / eps; with eps = 1e-5 both are ~1e-10 relative to the gradient scale.
RTOL_FD = 1e-6
# float32 against a float64 oracle, on logits of O(1-30): float32 has 24 bits (~6e-8), and a
# few layers of matmuls with D <= 64 accumulate a few hundred ulps.
RTOL_F32 = 1e-4


def max_errors(got, want):
    """Max absolute error, max relative error (relative to max |want|) and the worst index."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    if got.shape != want.shape:
        raise AssertionError(f"shape {got.shape} != expected {want.shape}")
    diff = np.abs(got - want)
    if diff.size == 0:
        return 0.0, 0.0, ()
    worst = np.unravel_index(np.nanargmax(np.where(np.isnan(diff), np.inf, diff)), diff.shape)
    scale = max(np.max(np.abs(want)), np.finfo(np.float64).tiny)
    return float(diff[worst]), float(diff[worst] / scale), tuple(int(i) for i in worst)


def assert_close(name, got, want, rtol, atol=0.0):
    """Raise unless |got - want| <= atol + rtol * max|want| everywhere; print the errors.

    The relative error is taken against the tensor's largest magnitude, so entries that are
    exactly zero in the oracle (masked keys, padding) are still held to the tensor's scale.
    """
    got_a, want_a = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    abs_err, rel_err, worst = max_errors(got_a, want_a)
    if not np.all(np.isfinite(got_a) == np.isfinite(want_a)):
        raise AssertionError(f"{name}: non-finite values differ")
    ok = abs_err <= atol + rtol * max(np.max(np.abs(want_a), initial=0.0), 0.0)
    line = f"{name}: max abs {abs_err:.3e}, max rel {rel_err:.3e} at {worst}"
    print(("OK   " if ok else "DIFF ") + line)
    if not ok:
        raise AssertionError(f"{line} (got {got_a[worst] if worst else got_a}, "
                             f"want {want_a[worst] if worst else want_a}; rtol {rtol}, atol {atol})")


def numerical_grad(f, x, index, eps=1e-5):
    """Central difference of the scalar f() with respect to x[index] (x is changed in place)."""
    old = x[index]
    x[index] = old + eps
    up = f()
    x[index] = old - eps
    down = f()
    x[index] = old
    return (up - down) / (2 * eps)


def gradcheck(name, f, x, analytic, rng, samples=12, eps=1e-5, rtol=RTOL_FD):
    """Compare `analytic` (the gradient of the scalar f() w.r.t. x) with finite differences
    at `samples` random entries of x. The error is relative to max |analytic|."""
    assert x.dtype == np.float64, "finite differences need float64"
    flat = rng.choice(x.size, size=min(samples, x.size), replace=False)
    idx = [np.unravel_index(i, x.shape) for i in flat]
    numeric = np.array([numerical_grad(f, x, i, eps) for i in idx])
    picked = np.array([analytic[i] for i in idx])
    scale = max(np.max(np.abs(analytic)), 1e-30)
    err = np.max(np.abs(numeric - picked)) / scale
    ok = err <= rtol
    print(f"{'OK  ' if ok else 'DIFF'} grad {name}: max rel error {err:.2e} over {len(idx)} entries")
    if not ok:
        raise AssertionError(f"gradient of {name} wrong: max rel error {err:.2e} > {rtol}\n"
                             f"numeric {numeric}\nanalytic {picked}")


class MatmulCounter:
    """Wraps linear_forward and attention_forward wherever the model looks them up, and adds
    up the FLOPs of the arrays that really pass through."""

    def __init__(self, monkeypatch):
        self.dense = self.useful = 0
        lin, att = layers.linear_forward, attention.attention_forward

        def linear(x, w):
            flops = 2 * int(np.prod(x.shape[:-1])) * w.shape[0] * w.shape[1]     # (m, k) x (k, n)
            self.dense += flops
            self.useful += flops
            return lin(x, w)

        def attend(q, k, v, mask, scale, cap):
            B, H, T, Dh = q.shape
            S = k.shape[2]
            self.dense += 2 * (2 * B * H * T * S * Dh)                 # q k^T and p v
            self.useful += 4 * H * Dh * int(np.broadcast_to(mask, (B, T, S)).sum())
            return att(q, k, v, mask, scale, cap)

        for module in (layers, attention, stack, generate):           # mlp, encoder, LM head, cache
            monkeypatch.setattr(module, "linear_forward", linear)
        # Every attention of the numpy backend (stack and KV cache) goes through
        # attention.attention_forward_masked, which looks attention_forward up here.
        monkeypatch.setattr(attention, "attention_forward", attend)
