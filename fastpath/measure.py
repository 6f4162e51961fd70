"""How the benchmark measures: best wall time, peak memory (traced and resident), torch threads,
and whole-model calls timed in interleaved turns at two thread counts (`interleaved`).

Shared by `python -m fastpath.bench` (bench.py, bench_kernels.py, bench_model.py) and
tutorial 9. On a shared machine absolute times drift with the load; every figure is the
best of several runs after a warm-up, and only ratios taken in one run mean something.
"""

from __future__ import annotations

import gc
import sys
import time
import tracemalloc

import numpy as np

from .jit import lanes

def best_time(fn, repeat, number=1, warmup=True):
    """Best wall time per call over `repeat` samples of `number` calls, after one warm-up."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return min(times)


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_growth(fn):
    """Bytes by which the process's peak resident set grows while fn runs (Linux)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                          # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _status("VmRSS")
    fn()
    return max(0, _status("VmHWM") - before)


def traced_peak(fn):
    """tracemalloc peak (bytes) of the Python-visible allocations of fn (NumPy arrays)."""
    gc.collect()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def _torch():
    try:
        import torch
        torch.set_num_threads(lanes(1 << 30))
        return torch
    except ImportError:
        return None


def torch_best_time(torch, fn, repeat):
    """(seconds, threads): torch at the Numba thread count and at 1 thread, the faster.
    On this shared 2-core machine under load, torch's OpenMP barrier made 2 threads take
    0.15 s for a 128-token attention call that takes 3 ms on 1 thread; taking the better
    of the two keeps the comparison from flattering the fast path."""
    n = lanes(1 << 30)
    best = None
    for threads in sorted({n, 1}, reverse=True):
        torch.set_num_threads(threads)
        t = best_time(fn, repeat)
        if best is None or t < best[0]:
            best = (t, threads)
    torch.set_num_threads(n)
    return best


def _mib(b):
    return "    -" if b is None else f"{b / 2**20:7.1f}"


# ---------------------------------------------------------------------------- whole-model turns

def _blas_threads(n):
    from threadpoolctl import ThreadpoolController
    for lib in ThreadpoolController().select(user_api="blas").lib_controllers:
        lib.set_num_threads(n)


HOPELESS = 3.0    # a thread setting this many times slower than its backend's best in the first turn


def _drop_hopeless(runs, best):
    """The runs worth timing again after the first turn: a thread setting more than HOPELESS
    times slower than the same backend's other cannot become the faster (under load a second
    thread waiting for a busy core made calls 3-10x slower), and timing it again would only
    make a loaded run longer."""
    fastest = {}
    for (name, th) in runs:
        fastest[name] = min(fastest.get(name, np.inf), best[name, th])
    return [(name, th) for (name, th) in runs if best[name, th] <= HOPELESS * fastest[name]]


def interleaved(fns, torch, threads, repeat, peak_rss_growth, label="timing"):
    """Best seconds per call of each function, timed in turns (a, b, c, a, b, c, ...) so
    that a change of load on a shared machine hits all of them alike; torch at `threads`
    and at 1 thread, the fast path ("numba...") with BLAS at `threads` and at 1, the faster
    kept. The first call of each (the warm-up) gives the growth of peak resident memory.
    Returns {name: (seconds, threads, peak bytes)}."""
    def variants(name):
        return (threads, 1) if threads > 1 and (name == "torch" or name.startswith("numba")) else (threads,)
    runs = [(name, th) for name in fns for th in variants(name)]
    total, peaks = len(fns) + repeat * len(runs), {}          # (fewer if some are dropped)

    def report(done, what):                  # one progress line per call on stderr: calls take seconds
        print(f"{label}: {done}/{total} {what}", file=sys.stderr, flush=True)

    for name, fn in fns.items():
        peaks[name] = peak_rss_growth(fn)
        report(len(peaks), f"warmed up {name}")
    best = {run: np.inf for run in runs}
    try:
        for r in range(repeat):
            if r == 1:
                runs = _drop_hopeless(runs, best)
            for i, (name, th) in enumerate(runs):
                if name == "torch":
                    torch.set_num_threads(th)
                else:
                    _blas_threads(th)
                t = time.perf_counter()
                fns[name]()
                best[name, th] = min(best[name, th], time.perf_counter() - t)
                report(len(fns) + r * len(runs) + i + 1, f"timed {name} at {th} thread(s)")
    finally:
        _blas_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
    out = {}
    for (name, th), seconds in best.items():
        if name not in out or seconds < out[name][0]:
            out[name] = (seconds, th, peaks[name])
    return out
