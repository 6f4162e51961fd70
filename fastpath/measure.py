"""How the benchmark measures: best wall time, peak memory (traced and resident), torch threads.

Shared by `python -m fastpath.bench` (bench.py, bench_kernels.py, bench_model.py) and
tutorial 9. On a shared machine absolute times drift with the load; every figure is the
best of several runs after a warm-up, and only ratios taken in one run mean something.
"""

from __future__ import annotations

import gc
import time
import tracemalloc

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
