"""How every fastpath kernel is compiled: one fastmath flag set, the on-disk cache, threads.

FASTMATH lets LLVM vectorise reductions (reassoc), fuse multiply-adds (contract), and
drop signed-zero and exact-reciprocal rules. It never contains `nnan` or `ninf`: the
kernels rely on -inf as the "masked" score and on comparisons with it.

The elementary functions in `mathfn.py` are compiled with FASTMATH minus `reassoc`:
their range reduction subtracts n*ln2 in two parts (Cody-Waite), and reassociation
folds the two parts back into one rounded constant (measured: 24 ulp instead of 2 for
float64 exp). A callee that does not set `fastmath` inherits its caller's flags, so they
set it explicitly.

`error_model="numpy"`: a division by zero gives inf/nan instead of raising, which keeps
the branch out of the inner loops so they vectorise.

Compilation: `cache=True` writes the machine code under `fastpath/__pycache__` (or
$NUMBA_CACHE_DIR); the first call of a kernel in a fresh checkout compiles it (seconds,
see `compile_all`), later processes load it. NUMBA_DISABLE_JIT=1 runs every kernel as
plain Python (slow, but steppable in a debugger).

Threads: a kernel that splits its work takes (lane, n_lanes, ...) and does every
n_lanes-th work item from `lane` on (round-robin; the attention kernels also reverse the
tile order of every other (batch, head), so a causal mask's uneven tiles are shared
evenly); `run_lanes` runs the lanes on Python threads (the kernels release the GIL), lane 0
on the caller's. n_lanes <= numba.get_num_threads() (NUMBA_NUM_THREADS,
default: the number of cores). No Numba threading layer (prange) is used, deliberately:
 - with the OpenMP layer, a small parallel call took 8 ms on this shared 2-core machine
   under load (threads spinning at the barrier against other processes; 0.4 ms with the
   workqueue layer, 0.35 ms with these threads, most of it the wrapper's NumPy work);
 - compiling a prange loop cost 3-5 s more per kernel and dtype (48 s -> 29 s cold);
 - any thread may call a kernel (the workqueue layer aborts on concurrent launches).
The BLAS thread count is left at OpenBLAS's default (all cores): the model's matmuls need
both cores. But OpenBLAS's worker threads busy-wait for 2^28 cycles (~0.1 s) after each
call, and a kernel started in that window shares its cores with them: measured here
(`python -m fastpath.bench`, section threads), a matmul followed by the fast attention
took 1.2-1.5x the two apart; with OPENBLAS_THREAD_TIMEOUT=4 in the environment (the
workers sleep at once; it must be set before NumPy is first imported) 0.98-1.07x, and
the matmul itself was no slower. (An earlier prange version of these kernels measured
1.14x with Numba's OpenMP layer and 1.17x with its workqueue layer in this sequence.)
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numba

FASTMATH = frozenset({"nsz", "arcp", "contract", "afn", "reassoc"})
MATH_FASTMATH = FASTMATH - {"reassoc"}


def kernel(fn=None, *, parallel=False, fastmath=FASTMATH):
    """numba.njit with the project's options."""
    def wrap(f):
        return numba.njit(f, fastmath=set(fastmath), cache=True, parallel=parallel,
                          error_model="numpy", nogil=True)
    return wrap if fn is None else wrap(fn)


def lanes(n_items):
    """How many lanes a parallel kernel uses for n_items work items."""
    if n_items <= 1:
        return 1                                  # a decode step's single row: skip the thread query
    return min(numba.get_num_threads(), n_items)


_pool = None


def run_lanes(fn, n, *args):
    """fn(lane, n, *args) for lane = 0 .. n-1, in parallel: lane 0 on the calling thread, the
    others on a pool of Python threads. fn is a nogil kernel, so the lanes run at once.

    A lane whose thread has not started when lane 0 is done runs on the calling thread
    instead (its future is cancelled): on a loaded machine the pool's thread can wait
    milliseconds for a core, and a step makes thousands of these calls. (Measured, the
    270M-270M training step under load 2.6-3.5: 55-65 s when every call waited for its
    lanes.) The result is the same either way: each lane does its own share."""
    global _pool
    if n == 1:
        fn(0, 1, *args)
        return
    if _pool is None or _pool._max_workers < n - 1:
        _pool = ThreadPoolExecutor(max_workers=n - 1, thread_name_prefix="fastpath")
    others = [(lane, _pool.submit(fn, lane, n, *args)) for lane in range(1, n)]
    fn(0, n, *args)
    for lane, f in others:
        if f.cancel():                               # never started: do it here
            fn(lane, n, *args)
        else:
            f.result()


def jit_enabled():
    return not numba.config.DISABLE_JIT
