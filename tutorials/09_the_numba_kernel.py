# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---


# %% [markdown]
# # 9. The fast path, part 2: the Numba kernel
#
# Tutorial 8 built tiled attention with an online softmax in NumPy. `fastpath/attention.py`
# is that loop compiled with Numba. Here we run the real kernel and tie it to the reference:
# exact comparisons on hard cases, the backward that recomputes the probabilities from one
# number per row, property tests with Hypothesis and their negative controls, time and
# memory against T, and a whole T5Gemma on both backends.

# %%
import os
import sys
import time
from pathlib import Path
from typing import NamedTuple

# One BLAS thread: faster for the small tile products below, and steady on a busy machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")
import numba
import numpy as np

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
try:
    import fastpath  # noqa: F401
except ImportError:                      # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
import plots                             # tutorials/plots.py: matplotlib set up, figures to plots.FIG
import matplotlib.pyplot as plt
from exercises import grade

from fastpath import attention as fast
from fastpath.measure import peak_rss_growth, traced_peak
from fastpath.jit import jit_enabled
from minencdec.model import attention as ref
from minencdec.model.presets import preset

QUICK = os.environ.get("MINENCDEC_QUICK") == "1"     # the test suite's small sizes
rng = np.random.default_rng(0)


def rel_err(got, want):
    """max |got - want|, relative to max |want| (the tensor's scale)."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.abs(got - want).max() / max(np.abs(want).max(), 1e-300)

# %% [markdown]
# ## The Numba kernel
#
# `fastpath/attention.py` is tutorial 8's tile loop compiled with Numba, with four
# differences worth knowing when you read it:
#
# - the tile products are hand-written 4 x 4 register-blocked loops (`fastpath/tiles.py`)
#   that LLVM vectorises, and exp / tanh are written out as arithmetic
#   (`fastpath/mathfn.py`) so the loops calling them vectorise too;
# - the mask is applied per row with two integer comparisons (the interval) and a lookup
#   in the padding vector, never as an array;
# - the work items (batch, head, query tile) are dealt round-robin to one Python thread
#   per core; the kernels release the GIL, so the threads run at once;
# - the tile size is an argument, `block=(BQ, BK)` (64 x 64 by default); the tests use
#   small tiles so that a short sequence still crosses several of them.
#
# **The first call compiles.** Numba compiles a kernel for each dtype the first time it
# runs, which takes seconds; `cache=True` writes the machine code under
# `fastpath/__pycache__`, and later processes load it in a fraction of a second (until the
# source changes). `fastpath.warmup.compile_all()` does this for every kernel up front. For
# stepping through a kernel in a debugger, `NUMBA_DISABLE_JIT=1` runs them as plain Python.

# %%
def first_call():
    for dt in (np.float64, np.float32):
        x = rng.standard_normal((1, 2, 5, 4)).astype(dt)
        o, cache = fast.attention_forward(x, x[:, :1], x[:, :1], 0.5, 50.0, causal=True)
        fast.attention_backward(o, cache)


t0 = time.perf_counter()
first_call()
compile_s = time.perf_counter() - t0
t0 = time.perf_counter()
first_call()
again_s = time.perf_counter() - t0
how = "pure Python (NUMBA_DISABLE_JIT=1)"
if jit_enabled():                                        # did this process compile, or load the cache?
    missed = sum(len(f.stats.cache_misses) for f in (fast._forward_lane, fast._backward_lane))
    how = "compiled now" if missed else "loaded from the on-disk cache"
print(f"first forward + backward, float64 and float32: {compile_s:.2f} s ({how}); "
      f"second: {again_s * 1e3:.1f} ms")

# %% [markdown]
# **The same numbers as the reference.** Three hard cases, each with grouped-query heads
# (H = 4 query heads over K = 2 kv heads), softcap 50, lengths that are not multiples of
# the 32 x 32 tiles, and padding: decoder self-attention with a causal window and a
# left-padded first example (its first three queries see no key at all), encoder
# self-attention with a bidirectional window, and cross-attention over a padded source of
# another length. We compare the output and all three gradients.
#
# In **float64** the kernel and the reference differ only in the order of their sums
# and in exp / tanh implementations within 2 ulp of NumPy's, so they agree to ~1e-14;
# we require 1e-12. In **float32** rounding is 2^-24 = 6e-8 relative, and a rounded score
# s enters exp(s - m) as a relative error of p of size |s| 2^-24: both implementations
# are off from the exact answer by about 1e-6 here (up to ~1e-5 with scores in the
# hundreds, which the property tests draw), by different amounts. So in float32 we
# compare each with the float64 reference and require 1e-4 (the test suite's tolerance).

# %%
RTOL_F64 = 1e-12        # float64: reordered sums, exp/tanh within 2 ulp; measured ~1e-14
RTOL_F32 = 1e-4         # float32 vs the float64 answer; both land near 1e-6 here, up to ~1e-5

B3, H3, K3, Dh3 = 2, 4, 2, 16
T3, S3 = (90, 70) if QUICK else (200, 130)
scale3, cap3, w3 = Dh3 ** -0.5, 50.0, 48
pad = np.ones((B3, T3), bool)
pad[0, :3] = False                                   # example 0 left-padded: its queries 0-2 see nothing
pad[1, -7:] = False                                  # example 1 right-padded
src_pad = np.ones((B3, S3), bool)
src_pad[1, -20:] = False
q3 = rng.normal(scale=3.0, size=(B3, H3, T3, Dh3))   # large enough that the softcap bends
k3, v3 = rng.normal(size=(2, B3, K3, T3, Dh3))
ek3, ev3 = rng.normal(size=(2, B3, K3, S3, Dh3))     # an encoder output's keys and values
do3 = rng.normal(size=q3.shape)
cases3 = {"decoder self: causal, w = 48, padded": (k3, v3, dict(causal=True, window=w3, key_mask=pad)),
          "encoder self: |i - j| < 48, padded": (k3, v3, dict(window=w3, rule="lt", key_mask=pad)),
          f"cross: {T3} queries x {S3} keys, padded": (ek3, ev3, dict(key_mask=src_pad))}

print(f"{'case':38s} {'':3s} {'float64':>8s} | {'float32: kernel':>15s} {'reference':>9s}"
      "  (vs the float64 reference)")
for name, (k, v, desc) in cases3.items():
    mask = fast.dense_mask(T3, k.shape[2], **desc)                  # (B, T, S): the reference's mask
    o_ref, c_ref = ref.attention_forward(q3, k, v, mask, scale3, cap3)
    want = (o_ref,) + ref.attention_backward(do3, c_ref)            # o, dq, dk, dv
    o, c = fast.attention_forward(q3, k, v, scale3, cap3, **desc, block=(32, 32))
    got = (o,) + fast.attention_backward(do3, c)
    x32 = [a.astype(np.float32) for a in (q3, k, v, do3)]
    o, c = fast.attention_forward(*x32[:3], scale3, cap3, **desc, block=(32, 32))
    got32 = (o,) + fast.attention_backward(x32[3], c)
    o, c = ref.attention_forward(*x32[:3], mask, scale3, cap3)
    ref32 = (o,) + ref.attention_backward(x32[3], c)
    for t, tensor in enumerate(("o", "dq", "dk", "dv")):
        e64, e32, e32_ref = rel_err(got[t], want[t]), rel_err(got32[t], want[t]), rel_err(ref32[t], want[t])
        print(f"{name if t == 0 else '':38s} {tensor:3s} {e64:8.1e} | {e32:15.1e} {e32_ref:9.1e}")
        assert got[t].dtype == np.float64 and got32[t].dtype == np.float32
        assert e64 < RTOL_F64 and e32 < RTOL_F32, (name, tensor)
        assert np.all(np.isfinite(got[t])) and np.all(np.isfinite(got32[t]))

# %% [markdown]
# **Queries that see nothing.** In the decoder case, queries 0-2 of the first example are
# padding and see only padding. Like the reference (tutorial 2), the kernel gives them
# output 0 and gradient 0, not NaN: a row whose running sum l stays 0 is written as 0, and
# its saved lse is set to 0 so the backward's exp(s - lse) is never evaluated on it (its
# keys are all masked). Padded keys receive exactly zero dk and dv.

# %%
name = next(iter(cases3))
o, c = fast.attention_forward(q3, k3, v3, scale3, cap3, **cases3[name][2], block=(32, 32))
dq, dk, dv = fast.attention_backward(do3, c)
assert np.all(o[0, :, :3] == 0) and np.all(dq[0, :, :3] == 0) and np.all(c.lse[0, :, :3] == 0)
assert np.all(dk[0, :, :3] == 0) and np.all(dv[0, :, :3] == 0) and np.all(dk[1, :, -7:] == 0)
print("fully masked queries: o = 0, dq = 0, lse = 0; padded keys: dk = dv = 0 exactly")

# %% [markdown]
# ## The backward recomputes p from the log-sum-exp
#
# The reference's backward reads p from its cache. The kernel's cache has no p: besides
# its tiled copies of q, k, v and the output o, it keeps one number per query row,
# lse = m + log l. Since p_ij = exp(s_ij - lse_i) exactly, the backward walks the tiles
# again, recomputes s = softcap(q k^T scale) for each, and gets p back. One more identity
# removes the other row-wide quantity of the softmax backward: ds = p (dp - delta) needs
# delta_i = sum_j p_ij dp_ij, and with dp = do v^T that sum is do_i . o_i, which needs
# only the output. So each tile's backward is local:
#
#     p  = exp(softcap(q k^T scale) - lse)     dv += p^T do      dp = do v^T
#     ds = p (dp - delta) (1 - tanh^2) scale   dk += ds^T q      dq += ds k
#
# We check both identities on the decoder case against the reference's cached p, and
# compare what each implementation keeps between forward and backward.

# %%
mask = fast.dense_mask(T3, T3, **cases3[name][2])                   # (B, T, S)
o_ref, c_ref = ref.attention_forward(q3, k3, v3, mask, scale3, cap3)
_, _, _, p_ref, _, _ = c_ref                                        # the reference cache: p (B, K, G, T, S)
qg = q3.reshape(B3, K3, H3 // K3, T3, Dh3)
s = cap3 * np.tanh(np.einsum("bkgtd,bksd->bkgts", qg, k3) * scale3 / cap3)
lse = c.lse.reshape(B3, K3, H3 // K3, T3)[..., None]               # the kernel's saved lse
p = np.where(mask[:, None, None], np.exp(s - lse), 0.0)            # p rebuilt from lse alone
assert np.abs(p - p_ref).max() < 1e-12
dp = np.einsum("bkgtd,bksd->bkgts", do3.reshape(qg.shape), v3)
delta_p = np.sum(dp * p_ref, axis=-1)                               # sum_j p dp
delta_o = np.sum(do3 * o, axis=-1).reshape(delta_p.shape)          # do . o
assert rel_err(delta_o, delta_p) < 1e-12
print(f"p rebuilt from q, k and lse: max diff from the reference's p {np.abs(p - p_ref).max():.1e}; "
      f"do.o == sum(p dp) to {rel_err(delta_o, delta_p):.1e}")

kept_ref = sum(a.nbytes for a in c_ref if isinstance(a, np.ndarray))
kept_fast = sum(a.nbytes for a in c if isinstance(a, np.ndarray))
print(f"kept for the backward at T = {T3}: reference {kept_ref / 2**10:.0f} KiB "
      f"(p and tanh: {2 * p_ref.nbytes / 2**10:.0f} KiB), kernel {kept_fast / 2**10:.0f} KiB "
      f"(lse: {c.lse.nbytes / 2**10:.1f} KiB)")
assert kept_fast < kept_ref / 2

# %% [markdown]
# The price is compute: the backward recomputes every score (and its tanh) once more.
# Recomputing is cheap next to writing and re-reading T x S numbers through memory, which
# is why flash-attention recomputes rather than stores.
#
# ## Property tests: the kernel against the reference, on cases nobody wrote by hand
#
# A handful of hand-picked cases cannot cover the ways a tiled kernel goes wrong: a window
# one key too wide, an off-by-one at the last tile, a q_offset, a head dimension that is
# not a multiple of 4, a batch row that is all padding. `tests/fastpath/test_fastpath.py` lets
# [Hypothesis](https://hypothesis.readthedocs.io) draw them. Its strategy `attention_cases`
# draws the dtype, B, K and the GQA ratio (1, 2, 4), a head dimension of 1 to 12, the mask kind
# (causal with a q_offset and S = T + offset or not, bidirectional with windows shorter and
# longer than the sequence under both rules, cross), padding (none, random, a row with
# every key padded), the softcap, the scale and small tile sizes; `check_against_reference`
# then compares o, dq, dk, dv with `dense_mask` and the reference. Hypothesis runs with
# `deadline=None` (a first call that compiles would otherwise count as a timeout) and a
# profile chosen by `HYPOTHESIS_PROFILE` (ci, dev, deep: 30, 60, 500 examples).
#
# Here is a smaller version of the same check, for the forward output. The draws are
# written once, against two dice (`integer(lo, hi)` and `choice(options)`), so that without
# Hypothesis installed the same check runs on cases drawn by a seeded NumPy generator.
# A case is a handful of small numbers; the arrays are made from its seed, so a failing
# case prints as one readable line.

# %%
class Case(NamedTuple):
    B: int
    K: int
    G: int
    T: int
    S: int
    Dh: int
    causal: bool
    window: int | None
    rule: str
    q_offset: int
    padding: str
    cap: float | None
    block: int
    seed: int


def draw_case(integer, choice):
    kind = choice(["causal", "bidirectional", "cross"])
    T = integer(1, 20)
    q_offset = integer(0, 6) if kind == "causal" else 0
    S = integer(1, 20) if kind == "cross" else T + q_offset
    return Case(B=integer(1, 2), K=integer(1, 2), G=choice([1, 2, 4]), T=T, S=S, Dh=integer(1, 9),
                causal=kind == "causal", window=None if kind == "cross" else choice([None, integer(0, 24)]),
                rule=choice(["le", "lt"]), q_offset=q_offset, padding=choice(["none", "random", "empty row"]),
                cap=choice([None, 5.0, 50.0]), block=choice([4, 8, 64]), seed=integer(0, 2**31))


def check(attend, c):
    """attend(q, k, v, scale, cap, description, block) -> o must equal the reference's o."""
    r = np.random.default_rng(c.seed)
    q = r.normal(scale=3.0, size=(c.B, c.K * c.G, c.T, c.Dh))
    k, v = r.normal(size=(2, c.B, c.K, c.S, c.Dh))
    key_mask = None if c.padding == "none" else r.random((c.B, c.S)) > 0.3
    if c.padding == "empty row":
        key_mask[r.integers(c.B)] = False                           # a batch row that sees nothing
    desc = dict(causal=c.causal, window=c.window, rule=c.rule, key_mask=key_mask, q_offset=c.q_offset)
    want = ref.attention_forward(q, k, v, fast.dense_mask(c.T, c.S, **desc), c.Dh ** -0.5, c.cap)[0]
    got = attend(q, k, v, c.Dh ** -0.5, c.cap, desc, (c.block, c.block))
    err = np.abs(got - want).max() / np.abs(v).max()                # o's scale is that of v
    assert err < RTOL_F64, f"max |o - o_ref| = {err:.1e} of max |v|"


def kernel(q, k, v, scale, cap, desc, block):
    return fast.attention_forward(q, k, v, scale, cap, **desc, block=block)[0]


def window_too_wide(q, k, v, scale, cap, desc, block):
    """A plausible kernel bug: the window checked with < where <= was meant (one key too many)."""
    wide = {**desc, "window": None if desc["window"] is None else desc["window"] + 1}
    return kernel(q, k, v, scale, cap, wide, block)


def rules_swapped(q, k, v, scale, cap, desc, block):
    """Another: the two bidirectional window rules exchanged."""
    return kernel(q, k, v, scale, cap, {**desc, "rule": {"le": "lt", "lt": "le"}[desc["rule"]]}, block)


N_EXAMPLES = 25 if QUICK else 100
try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @st.composite
    def cases(draw):
        return draw_case(lambda lo, hi: draw(st.integers(lo, hi)), lambda xs: draw(st.sampled_from(xs)))

    def property_holds(attend):
        """Run `check` on N_EXAMPLES drawn cases (derandomised: the same cases every run)."""
        @settings(max_examples=N_EXAMPLES, deadline=None, database=None, derandomize=True)
        @given(cases())
        def matches_reference(c):
            check(attend, c)
        matches_reference()
except ImportError:                            # pip install -e ".[test]" for Hypothesis
    print("hypothesis is not installed: drawing the cases with a seeded NumPy generator instead")

    def property_holds(attend):
        for seed in range(N_EXAMPLES):
            r = np.random.default_rng(seed)
            check(attend, draw_case(lambda lo, hi: int(r.integers(lo, hi + 1)),
                                    lambda xs: xs[r.integers(len(xs))]))

t0 = time.perf_counter()
property_holds(kernel)
print(f"the Numba kernel == the reference on {N_EXAMPLES} drawn cases ({time.perf_counter() - t0:.1f} s)")

# %% [markdown]
# **The negative controls.** A check that never fails proves nothing, so we hand the same
# property two broken kernels: the real kernel with its window one key too wide, and with
# the two bidirectional rules swapped. Hypothesis finds a case where each differs from the
# reference, shrinks it to a small one (printed as "Falsifying example") and re-raises the
# assertion. (Tutorial 8 showed the third classic bug, a missing rescale factor c, on the
# NumPy tile loop.) Most drawn cases cannot catch either bug: no window, or a window longer
# than the sequence, or a causal mask, where the rule does not apply; which is why the
# strategy draws windows shorter than the sequence too.

# %%
for broken in (window_too_wide, rules_swapped):
    try:
        property_holds(broken)
        caught = None
    except AssertionError as error:
        caught = error
    assert caught is not None, f"the property failed to catch {broken.__name__}"
    print(f"{broken.__name__} is caught: {str(caught).splitlines()[0]}")
    print(*getattr(caught, "__notes__", []), sep="\n")               # Hypothesis: the shrunk case

# %% [markdown]
# The test suite goes further: it compares the gradients too, with tolerances relative to
# each gradient's natural scale (when the softcap saturates, 1 - tanh^2 rounds to ~0 and a
# gradient is pure rounding noise relative to itself); checks invariants that need no
# reference (rows of p sum to one, masked keys get exactly zero gradient, a softcapped
# output stays near the mean of the visible values); compares the decode kernel, RMSNorm
# and the fused LM head the same way; and has its own negative controls (a window one
# key too wide, the two bidirectional rules swapped, an output nudged by 5x the
# tolerance).
#
# ## A timing
#
# Forward + backward of one attention call in float32 with B = 1, H = 8, Dh = 64 and
# softcap 50, for the reference with a causal mask, and for the kernel with the same
# causal mask and with a sliding window of 128. Times are the best of a few runs; this is a
# shared, noisy machine, so we print them and assert nothing about speed. What we do
# assert is deterministic: the three compute the same numbers, and their memory.
#
# **Measuring memory.** `tracemalloc` records every allocation made through Python's
# allocators. NumPy reports its array buffers to it, and so does Numba: its runtime
# allocates with `PyMem_RawMalloc` (a scratch array made by `np.empty` inside a kernel is
# counted, as the check below shows). So the traced peak covers the reference's arrays,
# the kernel wrapper's tiled copies and per-thread dq buffers, and the kernels' own tile
# scratch. It does not see memory that bypasses Python, like BLAS's internal buffers; the
# growth of the process's peak resident set (`fastpath.measure.peak_rss_growth`) sees
# everything, but the allocator may reuse pages it already holds, so we print it only.

# %%
@numba.njit(cache=False)
def numba_scratch(n):
    a = np.empty(n)                          # allocated by Numba's runtime inside compiled code
    a[:] = 1.0
    return a.sum()


numba_scratch(1)                                     # compile first
assert traced_peak(lambda: numba_scratch(1_000_000)) >= 8_000_000
print("tracemalloc sees an 8 MB np.empty made inside a Numba function")


def best_of(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


H5, Dh5, w5 = 8, 64, 128
lengths = [128, 256, 512] if QUICK else [128, 256, 512, 1024, 2048]
print(f"forward + backward, B=1 H={H5} Dh={Dh5} float32, softcap 50; "
      f"Numba threads: {numba.get_num_threads()}")
print(f"{'T':>5s} | {'time s: reference':>17s} {'kernel':>7s} {'w=128':>7s} | "
      f"{'peak MiB: reference':>19s} {'kernel':>7s} {'w=128':>7s} | one (H, T, T) array MiB")
timing = []
for T5 in lengths:
    q5, k5, v5, do5 = (rng.standard_normal((1, H5, T5, Dh5), dtype=np.float32) for _ in range(4))
    mask5 = fast.dense_mask(T5, T5, causal=True)

    def run_ref():
        o, c = ref.attention_forward(q5, k5, v5, mask5, Dh5 ** -0.5, 50.0)
        return (o,) + ref.attention_backward(do5, c)

    def run_fast(window=None):
        o, c = fast.attention_forward(q5, k5, v5, Dh5 ** -0.5, 50.0, causal=True, window=window)
        return (o,) + fast.attention_backward(do5, c)

    def run_sliding():
        return run_fast(w5)

    want = run_ref()
    assert all(rel_err(g, w) < RTOL_F32 for g, w in zip(run_fast(), want))     # the same numbers
    row = dict(T=T5, ref_s=best_of(run_ref, 1 if T5 >= 1024 else 3), fast_s=best_of(run_fast, 3),
               sliding_s=best_of(run_sliding, 3), ref_mem=traced_peak(run_ref),
               fast_mem=traced_peak(run_fast), sliding_mem=traced_peak(run_sliding), scores=H5 * T5 * T5 * 4)
    timing.append(row)
    print(f"{T5:5d} | {row['ref_s']:17.3f} {row['fast_s']:7.3f} {row['sliding_s']:7.3f} | "
          f"{row['ref_mem'] / 2**20:19.1f} {row['fast_mem'] / 2**20:7.1f} "
          f"{row['sliding_mem'] / 2**20:7.1f} | "
          f"{row['scores'] / 2**20:.1f}")
rss = {name: peak_rss_growth(fn) for name, fn in (("reference", run_ref), ("kernel", run_fast))}
if rss["reference"] is not None:
    print(f"peak resident memory growth at T = {T5}: reference {rss['reference'] / 2**20:.0f} MiB, "
          f"kernel {rss['kernel'] / 2**20:.0f} MiB (not asserted: the allocator may reuse pages)")

# %% [markdown]
# The memory columns are deterministic, and they are the point. The reference's peak grows
# 4x per doubling of T: it is about six (H, T, T) arrays (s, its tanh, exp and p in the
# forward, then dp and ds in the backward while p and the tanh are still held). The
# kernel's peak is a fixed number of arrays the size of q: its tiled copies of q, k, v and
# do (the backward also makes transposed copies of the k and v tiles), the output, the
# gradients, and one dq buffer per thread. That is linear in T, and the same with or
# without a window; it drops below a single score array once T passes that number times Dh.

# %%
last, prev = timing[-1], timing[-2]
q_sized = [r["fast_mem"] / (H5 * r["T"] * Dh5 * 4) for r in timing]   # kernel peak in arrays the size of q
print(f"reference peak = {last['ref_mem'] / last['scores']:.1f} score arrays at T = {last['T']}, "
      f"{last['ref_mem'] / prev['ref_mem']:.2f}x per doubling; kernel peak = "
      f"{', '.join(f'{n:.1f}' for n in q_sized)} arrays the size of q at T = {', '.join(map(str, lengths))}")
print(f"so the kernel's peak is below one (H, T, T) array from T ~ {max(q_sized) * Dh5:.0f} on; "
      f"at T = 4096: {max(q_sized) * H5 * 4096 * Dh5 * 4 / 2**20:.0f} MiB against the reference's "
      f"~{last['ref_mem'] / last['scores'] * H5 * 4096**2 * 4 / 2**30:.1f} GiB")
assert 3.5 < last["ref_mem"] / prev["ref_mem"] < 4.5               # quadratic
assert last["ref_mem"] > 4 * last["scores"]
assert max(q_sized) < 1.1 * min(q_sized)                            # linear: the same multiple of q
assert all(abs(r["sliding_mem"] / r["fast_mem"] - 1) < 0.1 for r in timing)   # a window does not change it

T_axis = np.array([r["T"] for r in timing])
fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
ax = axes[0]
ax.loglog(T_axis, [r["ref_s"] for r in timing], "o-", color="tab:red", label="reference (NumPy), causal")
ax.loglog(T_axis, [r["fast_s"] for r in timing], "s-", color="tab:blue", label="Numba kernel, causal")
ax.loglog(T_axis, [r["sliding_s"] for r in timing], "^-", color="tab:green",
          label=f"Numba kernel, causal sliding w = {w5}")
ax.loglog(T_axis, timing[0]["ref_s"] * (T_axis / T_axis[0]) ** 2, ":", color="0.6", label="~ T^2")
ax.set(xlabel="sequence length T (= S)", ylabel="seconds, forward + backward (best of runs)",
       title=f"time (B=1, H={H5}, Dh={Dh5}, float32; a shared 2-core machine)")
ax.legend(fontsize=8)
ax = axes[1]
ax.loglog(T_axis, [r["ref_mem"] / 2**20 for r in timing], "o-", color="tab:red", label="reference")
ax.loglog(T_axis, [r["fast_mem"] / 2**20 for r in timing], "s-", color="tab:blue",
          label="Numba kernel, causal")
ax.loglog(T_axis, [r["sliding_mem"] / 2**20 for r in timing], "^--", color="tab:green",
          label=f"Numba kernel, w = {w5} (the same)")
ax.loglog(T_axis, [r["scores"] / 2**20 for r in timing], ":", color="0.5",
          label="one (H, T, T) float32 array")
ax.set(xlabel="sequence length T (= S)", ylabel="MiB, tracemalloc peak",
       title="peak memory of forward + backward")
ax.legend(fontsize=8)
for ax in axes:
    ax.set_xticks(T_axis, [str(t) for t in T_axis])
    ax.minorticks_off()
fig.tight_layout()
plots.save(fig, "09_timing.png")

# %% [markdown]
# On the times: the kernel skips the masked half of a causal matrix, keeps its tiles in
# cache and uses both cores; in the run that drew the committed figure it was about an
# order of magnitude faster than the reference, and with a sliding window its time grows
# about linearly. At the shortest lengths the fixed cost of
# the wrapper (tiling q, k and v, starting threads) is a large share. Ratios from a single
# run on a busy machine move by 2x; the benchmark below measures them properly.
#
# ## Where next
#
# - `python -m fastpath.bench` (or `--quick`) runs the full benchmark in one go: attention
#   up to T = 4096 against PyTorch as well, the decode step, RMSNorm, the fused LM head and
#   cross-entropy (`fastpath/lmhead.py`, which avoids the (N, V) logits array the way this
#   kernel avoids the T x S one), and whole training steps; it prints the load average,
#   because on a shared machine only ratios from one run mean anything.
# - `python -m pytest tests/fastpath/test_fastpath.py` runs the property tests (set
#   `HYPOTHESIS_PROFILE=deep` for 500 examples each).
# - `python -m pytest tests/model/test_backend.py` holds whole models on the fast path to the
#   reference: logits, loss, every gradient, the classifier and generation.
#
# ## The whole model on the fast path
#
# Every model takes `backend="numba"` (and `load_pretrained(path, backend="numba")`): the
# attention (this kernel, with a `Mask` description instead of an array), RMSNorm, the
# GeGLU middle of the MLP, the decode step and the fused LM head + cross-entropy run
# through `fastpath/`, and the linear maps stay single BLAS calls. The Python API defaults
# to `backend="numpy"`, the reference you step through; the training and generation
# commands default to the fast path. The last check of this lesson: one T5Gemma model,
# both backends, the same loss and gradients.

# %%
from minencdec import T5GemmaConfig, T5GemmaModel  # noqa: E402

cfg6 = preset("nano", vocab_size=256, sliding_window=16)
pair = {name: T5GemmaModel.random(T5GemmaConfig(cfg6, cfg6), seed=0, dtype="float64", backend=name)
        for name in ("numpy", "numba")}
ids6 = rng.integers(3, 256, (2, 40))
labels6 = rng.integers(3, 256, (2, 24))
(loss_ref, g_ref), (loss_fast, g_fast) = (pair[n].loss_and_grads(ids6, labels6) for n in ("numpy", "numba"))
worst = max(rel_err(g_fast[name], g_ref[name]) for name in g_ref)
print(f"T5Gemma ({cfg6.num_hidden_layers}+{cfg6.num_hidden_layers} layers, window {cfg6.sliding_window}), "
      f"float64: loss {loss_ref:.12f} (numpy) vs {loss_fast:.12f} (numba); "
      f"worst of {len(g_ref)} gradients {worst:.1e}")
assert abs(loss_fast - loss_ref) < 1e-12 * abs(loss_ref) and worst < RTOL_F64

# %% [markdown]
# ## Exercises
#
# **9.1 delta from the output.** The backward needs delta_i = sum_j p_ij dp_ij for every
# query row. Write `delta(o, do)` using only the output and its gradient, (B, H, T, Dh) each
# -> (B, H, T). The check compares with sum(p dp) built from the reference's cached p on the
# decoder case above; the slip of summing do alone (forgetting o) must fail.

# %%
my_delta = None               # your answer: a function (o, do) -> delta

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_delta(o, do):
    return np.sum(o * do, axis=-1)       # sum_j p_ij (do_i . v_j) = do_i . sum_j p_ij v_j = do_i . o_i


# %%
def check_delta(delta):
    got = np.asarray(delta(o_ref, do3)).reshape(delta_p.shape)
    assert rel_err(got, delta_p) < 1e-12, rel_err(got, delta_p)


grade("Exercise 9.1", check_delta, answer=my_delta, solution=solution_delta, wrong=lambda o, do: do.sum(-1))

# %% [markdown]
# **9.2 What the reference keeps.** Write `kept_by_reference(B, H, T, S, itemsize)`: the
# bytes of the two score-sized arrays the reference's cache holds until the backward (p and
# the softcap's tanh). The check measures them in the cache of a real call; counting one
# array instead of two must fail.

# %%
my_kept_by_reference = None   # your answer: a function (B, H, T, S, itemsize) -> bytes

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_kept_by_reference(B, H, T, S, itemsize):
    return 2 * B * H * T * S * itemsize


# %%
def check_kept_by_reference(kept_by_reference):
    qe = rng.standard_normal((2, 4, 24, 8), dtype=np.float32)
    ke, ve = rng.standard_normal((2, 2, 2, 40, 8), dtype=np.float32)
    _, cache = ref.attention_forward(qe, ke, ve, np.ones((1, 24, 40), bool), 0.35, 50.0)
    score_sized = sum(a.nbytes for a in cache if isinstance(a, np.ndarray) and a.size == 2 * 4 * 24 * 40)
    assert kept_by_reference(2, 4, 24, 40, 4) == score_sized, (kept_by_reference(2, 4, 24, 40, 4), score_sized)


grade("Exercise 9.2", check_kept_by_reference, answer=my_kept_by_reference, solution=solution_kept_by_reference,
      wrong=lambda B, H, T, S, itemsize: B * H * T * S * itemsize)
print("figures:", sorted(f.name for f in plots.FIG.glob("09_*.png")))

