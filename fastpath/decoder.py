"""The decode step on the fast path: one new token per row through a decoder stack, with
every buffer allocated once per generation and a few calls per sublayer.

The reference step (`minencdec.model.generate.stack_step`) is the readable definition: per
layer it makes about sixty NumPy calls (split heads, RoPE by concatenation, a new cache by
`np.concatenate`, masks, merges), which at batch 1 took longer than reading the layer's
weights. Here a layer is

    x = norm(h)                                   (fused into the previous sublayer's pass)
    P = x [Wq; Wk; Wv]^T                          one BLAS call, weights stacked once per generation
    q, k, v = heads(P), k and v written into the cache at this token's slot   one Numba pass
    o = attention(q, cache)                       fastpath.decode's kernel, no mask arrays
    h = h + norm(o Wo^T);  x = norm(h)            one BLAS call, one Numba pass
    (T5Gemma: the same with cross-attention over the encoder's keys, computed once)
    [g u] = x [Wg; Wu]^T;  y = gelu(g) u Wd^T     BLAS, one Numba pass, BLAS
    h = h + norm(y);  x = norm(h)                 one Numba pass (the next layer's pre-norm)

Each row of a batch is one prompt: B rows read every weight once per step, which is what
makes batched generation cheaper per token than one prompt at a time. At B > 1 the products
and attention take their work (chunks of weights, (row, head) items) in turn over the lanes,
or over one lane when that has been faster lately (`LaneChoice`: another job on the second
core); the numbers are the same either way. Where a batch-8 step's time goes, measured on
the Small model: the products ~55% (memory-bound: 112 MiB of weights), the cross-attention
~30% (each row's own 8 MiB of encoder keys and values), self-attention ~10%.

The cache is one buffer per layer, (B, K, capacity, Dh), indexed by slot (a token's index
in its row, padding included), grown by doubling when full. A sliding layer does not drop old
keys as the reference's cache does: its window is an interval of slots (slot - w + 1 .. slot),
which is what the decode kernel reads, so the same keys are seen. T5Gemma 2's encoder keys
sit after the capacity in the same buffer (the kernel's extra keys); T5Gemma's cross-
attention reads the encoder keys of `encoder_keys`, as the reference.

The layers arrive as `Layer` records of arrays (minencdec.model.generate builds them: it
knows the checkpoint names); this module knows no model.

Axes: B rows, D width, H, K heads, Dh head dim, C = (H + 2K) Dh, F MLP width, S source.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from .decode import _decode_lane, _read, claim, counter
from .jit import kernel, lanes, run_lanes
from .mlp import _C, _K, _geglu_forward_lane


# Multiply-adds (rows x heads x keys x Dh) from which a step's attention is split over the
# lanes: batch 8 of the Small model (8 x 8 x 256 x 64) is, batch 1 is not (the hand-off
# costs more than a 0.1 ms call).
PARALLEL_ATTENTION = 1 << 19

# Bytes of weights the few-rows product reads ahead before multiplying: held in L2 (1 MiB here).
CHUNK_BYTES = 1 << 17


class Layer(NamedTuple):
    """One decoder layer's arrays. Norm weights are stored as (1 + w): the scale itself."""
    pre_self: np.ndarray        # (D,)
    post_self: np.ndarray
    qkv: np.ndarray             # (C, D): q_proj, k_proj, v_proj stacked
    q_norm: np.ndarray          # (Dh,) 1 + w, or empty without QK-norm
    k_norm: np.ndarray
    o: np.ndarray               # (D, H Dh)
    window: int | None          # sliding window, None: every earlier key
    rope: str                   # the layer type, a key of the ropes given to `step`
    cross: tuple | None         # T5Gemma: (pre, post, q_proj, o_proj), else None
    pre_mlp: np.ndarray
    post_mlp: np.ndarray
    gu: np.ndarray              # (2F, D): gate_proj, up_proj stacked
    down: np.ndarray            # (D, F)


# ---------------------------------------------------------------------------- kernels


@kernel
def _norm_rows(x, w1, eps, out):
    """out[b] = x[b] / sqrt(mean(x[b]^2) + eps) * w1, for each row."""
    B, D = x.shape
    one = x.dtype.type(1)
    for b in range(B):
        ss = one - one
        for d in range(D):
            ss += x[b, d] * x[b, d]
        r = one / np.sqrt(ss / D + eps)
        for d in range(D):
            out[b, d] = x[b, d] * r * w1[d]


@kernel
def _add_norm_rows(h, y, w_post, w_next, eps, x):
    """h += norm(y) w_post (the sandwich's residual), then x = norm(h) w_next (the next
    sublayer's pre-norm, or the final norm)."""
    B, D = h.shape
    one = h.dtype.type(1)
    for b in range(B):
        ss = one - one
        for d in range(D):
            ss += y[b, d] * y[b, d]
        r = one / np.sqrt(ss / D + eps)
        ss = one - one
        for d in range(D):
            h[b, d] += y[b, d] * r * w_post[d]
            ss += h[b, d] * h[b, d]
        r = one / np.sqrt(ss / D + eps)
        for d in range(D):
            x[b, d] = h[b, d] * r * w_next[d]


@kernel
def _head_in(src, n_heads, w1, eps, cos, sin, dst, slot, y):
    """dst[b, h, slot] = RoPE(QK-norm(src[b, h])) for each row b and head h. src (B, n, Dh);
    dst (B, n, L, Dh); w1 empty: no norm; cos, sin (B, Dh) or empty: no RoPE."""
    B, n, Dh = src.shape
    half = Dh // 2
    one = src.dtype.type(1)
    for b in range(B):
        for h in range(n):
            if w1.shape[0] > 0:
                ss = one - one
                for d in range(Dh):
                    ss += src[b, h, d] * src[b, h, d]
                r = one / np.sqrt(ss / Dh + eps)
                for d in range(Dh):
                    y[d] = src[b, h, d] * r * w1[d]
            else:
                for d in range(Dh):
                    y[d] = src[b, h, d]
            if cos.shape[0] > 0:
                for d in range(half):
                    dst[b, h, slot, d] = y[d] * cos[b, d] - y[d + half] * sin[b, d]
                for d in range(half):
                    dst[b, h, slot, d + half] = y[d + half] * cos[b, d + half] + y[d] * sin[b, d + half]
            else:
                for d in range(Dh):
                    dst[b, h, slot, d] = y[d]


@kernel
def _four_weight_rows(x, W, o, out):
    """out[:, o:o + 4] = x W[o:o + 4]^T: four rows of x against the four weight rows at once
    (16 sums in registers: each load of a weight or of x feeds four multiply-adds), then
    one row of x at a time for the rest."""
    M, K = x.shape
    z = x.dtype.type(0)
    w0, w1, w2, w3 = W[o], W[o + 1], W[o + 2], W[o + 3]
    for r in range(0, M - M % 4, 4):
        x0, x1, x2, x3 = x[r], x[r + 1], x[r + 2], x[r + 3]
        a0 = a1 = a2 = a3 = b0 = b1 = b2 = b3 = c0 = c1 = c2 = c3 = d0 = d1 = d2 = d3 = z
        for k in range(K):
            e, f, g, h = w0[k], w1[k], w2[k], w3[k]
            a0 += x0[k] * e
            a1 += x0[k] * f
            a2 += x0[k] * g
            a3 += x0[k] * h
            b0 += x1[k] * e
            b1 += x1[k] * f
            b2 += x1[k] * g
            b3 += x1[k] * h
            c0 += x2[k] * e
            c1 += x2[k] * f
            c2 += x2[k] * g
            c3 += x2[k] * h
            d0 += x3[k] * e
            d1 += x3[k] * f
            d2 += x3[k] * g
            d3 += x3[k] * h
        out[r, o], out[r, o + 1], out[r, o + 2], out[r, o + 3] = a0, a1, a2, a3
        out[r + 1, o], out[r + 1, o + 1], out[r + 1, o + 2], out[r + 1, o + 3] = b0, b1, b2, b3
        out[r + 2, o], out[r + 2, o + 1], out[r + 2, o + 2], out[r + 2, o + 3] = c0, c1, c2, c3
        out[r + 3, o], out[r + 3, o + 1], out[r + 3, o + 2], out[r + 3, o + 3] = d0, d1, d2, d3
    for r in range(M - M % 4, M):
        xr = x[r]
        a0 = a1 = a2 = a3 = z
        for k in range(K):
            a0 += xr[k] * w0[k]
            a1 += xr[k] * w1[k]
            a2 += xr[k] * w2[k]
            a3 += xr[k] * w3[k]
        out[r, o], out[r, o + 1], out[r, o + 2], out[r, o + 3] = a0, a1, a2, a3


@kernel
def _rows_times_weights_lane(lane, n_lanes, x, W, out, chunks):
    """out[:, o] = x W[o]^T for the chunks of weight rows this lane claims (CHUNK_BYTES
    each, taken in turn by every lane: decode.claim). A chunk is first read straight
    through (a plain sum, returned so that it is not optimised away), then multiplied from
    the cache, four weight rows by four rows of x. Multiply-adds interleaved with the reads
    from memory held them to 13-14 GB/s at B = 8 (the loads that miss wait behind the
    arithmetic; software prefetches did not help), against 40 GB/s for a plain read and
    20-22 GB/s for this, measured on the Small model's decode matrices (112 MiB, one core).
    With a single row of x the arithmetic keeps up with the reads: no first read then.
    (OpenBLAS's GEMM packs the whole weight matrix first, and was no faster at B = 8.)"""
    M, K = x.shape
    N = W.shape[0]
    z = x.dtype.type(0)
    step = max(CHUNK_BYTES // (K * W.itemsize) // 4 * 4, 4)
    seen = z
    while True:
        c = claim(chunks) * step                              # the lanes take chunks in turn
        if c >= N:
            break
        e = min(c + step, N)
        if M > 1:
            seen = _read(W, c, e - c, seen)                   # decode.py's plain pass over rows
        for o in range(c, e - (e - c) % 4, 4):
            _four_weight_rows(x, W, o, out)
        for o in range(e - (e - c) % 4, e):
            wo = W[o]
            for r in range(M):
                s0 = z
                for k in range(K):
                    s0 += x[r, k] * wo[k]
                out[r, o] = s0
    return seen


def rows_times_weights(x, W, out, most=None):
    """out = x W^T for a few rows x (B, K), W (N, K): BLAS at B = 1, else the kernel above
    on every lane (at most `most`; the weights are what is read: each lane streams the
    chunks it takes)."""
    if x.shape[0] == 1:
        np.matmul(x, W.T, out=out)
    else:
        n = lanes(W.shape[0] // 256)
        run_lanes(_rows_times_weights_lane, n if most is None else min(n, most), x, W, out, counter())


class LaneChoice:
    """One lane or every lane for a decode step's kernels, whichever has lately been faster.
    Splitting a step's ~60 calls pays when the second core is free (batch 8, load 1.7: 9.8 ms
    a step split, 11.7 on one lane); when another job keeps it busy, each hand-off waits for
    it (load 3-5: 12.9 ms split, 10.9-11.5 on one lane). Both settings give the same numbers bit for bit (each
    chunk or (row, head) item is one lane's whole work: decode.claim), so the choice may
    follow the load: a moving average of each setting's step time, the slower one tried
    again every TRY_EVERY steps."""

    TRY_EVERY = 8

    def __init__(self, most):
        self.options = (most, 1) if most > 1 else (1,)
        self.seconds, self.steps = {}, 0

    def pick(self):
        self.steps += 1
        untried = [n for n in self.options if n not in self.seconds]
        if untried:
            return untried[0]
        ranked = sorted(self.options, key=self.seconds.get)
        return ranked[-1] if self.steps % self.TRY_EVERY == 0 else ranked[0]

    def record(self, n, seconds):
        old = self.seconds.get(n, seconds)
        self.seconds[n] = 0.75 * old + 0.25 * seconds


# ---------------------------------------------------------------------------- the stack


class Decoder:
    """A decoder stack's step for B rows. `cache` holds the reference's cache after the prompt
    (minencdec.model.generate.Cache: per layer keys, values (B, K, L, Dh) at `slots`, and
    `valid` (B, n)); `cross` per layer (k, v) of the encoder (T5Gemma's cross-attention, or
    T5Gemma 2's merged keys when `merged`), `cross_valid` (B, S) and `cross_lohi` the
    intervals of encoder keys the query sees (one query: (1,) arrays)."""

    def __init__(self, layers, final_norm, heads, eps, scale, cap, cache, capacity, cross=None, cross_valid=None,
                 cross_lohi=None, merged=False):
        layers = [Layer(**d) if isinstance(d, dict) else d for d in layers]
        self.layers, self.final_norm, self.eps = layers, final_norm, eps
        self.H, self.K, self.Dh = heads
        self.scale, self.cap, self.merged = scale, (0.0 if cap is None else cap), merged
        self.cross, self.cross_valid, self.cross_lohi = cross, cross_valid, cross_lohi
        B, D = cache.valid.shape[0], final_norm.shape[0]
        self.dt = dt = final_norm.dtype
        self.n = cache.valid.shape[1]                         # slots used
        S = cross[0][0].shape[2] if merged else 0             # merged: encoder keys after the capacity
        self.capacity = max(capacity, self.n + 1)
        self.kv = []
        self.valid = np.zeros((B, self.capacity + S), bool)
        self.valid[:, :self.n] = cache.valid
        for i in range(len(layers)):
            k = np.zeros((B, self.K, self.capacity + S, self.Dh), dt)
            v = np.zeros_like(k)
            k[:, :, cache.slots[i]], v[:, :, cache.slots[i]] = cache.keys[i], cache.values[i]
            if merged:
                k[:, :, self.capacity:], v[:, :, self.capacity:] = cross[i]
            self.kv.append((k, v))
        if merged:
            self.valid[:, self.capacity:] = cross_valid
        F = layers[0].down.shape[1]
        C = layers[0].qkv.shape[0]
        self.h, self.x, self.y = (np.empty((B, D), dt) for _ in range(3))
        self.P, self.gu, self.a = np.empty((B, C), dt), np.empty((B, 2 * F), dt), np.empty((B, F), dt)
        self.q, self.o = (np.empty((B, self.H, 1, self.Dh), dt) for _ in range(2))
        self.row = np.empty(self.Dh, dt)
        self.consts = (dt.type(0), dt.type(1), dt.type(-np.inf))
        self.choice = LaneChoice(lanes(1 << 30))
        self.most = self.choice.options[0]                    # lanes the kernels may use now

    def _grow(self):
        """Double the capacity (the merged encoder keys move with it)."""
        old, S = self.capacity, self.valid.shape[1] - self.capacity
        self.capacity *= 2
        valid = np.zeros((self.valid.shape[0], self.capacity + S), bool)
        valid[:, :old], valid[:, self.capacity:] = self.valid[:, :old], self.valid[:, old:]
        self.valid = valid
        for i, (k, v) in enumerate(self.kv):
            shape = (k.shape[0], k.shape[1], self.capacity + S, k.shape[3])
            k2, v2 = np.zeros(shape, self.dt), np.zeros(shape, self.dt)
            k2[:, :, :old], v2[:, :, :old] = k[:, :, :old], v[:, :, :old]
            k2[:, :, self.capacity:], v2[:, :, self.capacity:] = k[:, :, old:], v[:, :, old:]
            self.kv[i] = (k2, v2)

    def _attend(self, k, v, valid, lo, hi, x0):
        """The new queries against keys lo..hi and x0.. (decode.py's kernel). A batch's rows
        are split over the lanes: 8 rows read 8 caches (the cross-attention's 8 x 256 keys are
        8 MiB a layer for the Small model), which a second core reads faster."""
        B, H = self.q.shape[:2]
        work = B * H * (int(hi[0]) - int(lo[0]) + 1 + k.shape[2] - x0) * self.Dh
        n = min(lanes(B * H), self.most) if work >= PARALLEL_ATTENTION else 1
        run_lanes(_decode_lane, n, self.q, k, v, valid, lo, hi, x0, self.dt.type(self.scale), self.dt.type(self.cap),
                  self.consts, self.o, counter())

    def _product(self, x, W, out):
        rows_times_weights(x, W, out, self.most)

    def logits(self, x, table, cap):
        """The tied LM head and final softcap on the final-normed rows x (B, D): (B, V). The
        few-rows product reads the table once for all rows (a batch's BLAS GEMM packs it first)."""
        z = np.empty((x.shape[0], table.shape[0]), self.dt)
        self._product(np.ascontiguousarray(x), table, z)
        return z if cap is None else cap * np.tanh(z / cap)

    def step(self, h, ropes):
        """h (B, D): the new tokens' embeddings; ropes: layer type -> (cos, sin), (B, Dh) each.
        Returns the final-normed hidden states (B, D). Timed for the choice of lanes."""
        self.most = self.choice.pick()
        t = time.perf_counter()
        out = self._layers(h, ropes)
        self.choice.record(self.most, time.perf_counter() - t)
        return out

    def _layers(self, h, ropes):
        if self.n == self.capacity:
            self._grow()
        slot, eps, H, K, Dh = self.n, self.dt.type(self.eps), self.H, self.K, self.Dh
        self.valid[:, slot] = True                            # the new tokens are real
        self.n += 1
        np.copyto(self.h, h)
        B = h.shape[0]
        x0 = self.capacity if self.merged else self.valid.shape[1]   # where extra keys start (none: S)
        _norm_rows(self.h, self.layers[0].pre_self, eps, self.x)
        for i, L in enumerate(self.layers):
            k, v = self.kv[i]
            self._product(self.x, L.qkv, self.P)               # q, k, v of the new tokens
            cos, sin = ropes[L.rope]
            P3 = self.P.reshape(B, H + 2 * K, Dh)
            _head_in(P3[:, :H], H, L.q_norm, eps, cos, sin, self.q, 0, self.row)
            _head_in(P3[:, H:H + K], K, L.k_norm, eps, cos, sin, k, slot, self.row)
            _head_in(P3[:, H + K:], K, L.k_norm[:0], eps, cos[:0], sin[:0], v, slot, self.row)
            lo = np.array([0 if L.window is None else max(slot - L.window + 1, 0)])
            self._attend(k, v, self.valid, lo, np.array([slot]), x0)
            self._product(self.o.reshape(B, H * Dh), L.o, self.y)
            nxt = L.cross[0] if L.cross is not None else L.pre_mlp
            _add_norm_rows(self.h, self.y, L.post_self, nxt, eps, self.x)
            if L.cross is not None:                           # T5Gemma: queries against the encoder keys
                _, post, wq, wo = L.cross
                self._product(self.x, wq, self.q.reshape(B, H * Dh))
                ck, cv = self.cross[i]
                self._attend(ck, cv, self.cross_valid, *self.cross_lohi, ck.shape[2])
                self._product(self.o.reshape(B, H * Dh), wo, self.y)
                _add_norm_rows(self.h, self.y, post, L.pre_mlp, eps, self.x)
            self._product(self.x, L.gu, self.gu)
            _geglu_forward_lane(0, 1, self.gu, self.dt.type(_C), self.dt.type(_K), self.dt.type(0.5),
                                self.dt.type(1), self.a)
            self._product(self.a, L.down, self.y)
            nxt = self.layers[i + 1].pre_self if i + 1 < len(self.layers) else self.final_norm
            _add_norm_rows(self.h, self.y, L.post_mlp, nxt, eps, self.x)
        return self.x.copy()
