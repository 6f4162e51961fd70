"""Many small BLAS products at once: each lane takes a share, with BLAS on one thread.

A batch of small products (attention's q k^T for every (batch, head): 64 products of
256 x 64 x 256 for the Small model) made by one `np.matmul` is a loop of BLAS calls, each
split over OpenBLAS's threads. On this shared 2-core machine under load, that loop was
the least predictable call of a training step: the same (64, 256, 256) @ (64, 256, 64)
product measured 3.1 ms at best, 11 ms as a median and once 488 ms (load 3.6-3.9), as
every small call waits at OpenBLAS's barrier for a thread another process has
descheduled. Here the batch is split over the lanes (fastpath.jit.run_lanes: Python
threads), each lane makes its own calls with BLAS on one thread: 5.8-6.3 ms, median equal
to best, under the same load; on a quiet machine the two lanes run at once like the two
BLAS threads would.

`one_blas_thread()` sets every loaded BLAS library to one thread and puts the old counts
back (0.5 us a call, through threadpoolctl's controller, found once). Concurrent calls from
several threads are safe in OpenBLAS's pthreads build when it runs on one thread: each
call then runs in its caller's thread.
"""

from __future__ import annotations

from contextlib import contextmanager

_blas = None


def _controllers():
    global _blas
    if _blas is None:
        from threadpoolctl import ThreadpoolController
        _blas = ThreadpoolController().select(user_api="blas").lib_controllers
    return _blas


@contextmanager
def one_blas_thread():
    """Every BLAS library on one thread inside the block (restored after, also on an error)."""
    libs = _controllers()
    before = [lib.get_num_threads() for lib in libs]
    for lib in libs:
        lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, n in zip(libs, before):
            lib.set_num_threads(n)


def chunks(lane, n_lanes, n_items, per_chunk):
    """(i0, i1) ranges of at most per_chunk items covering lane's contiguous share of n_items."""
    start, stop = lane * n_items // n_lanes, (lane + 1) * n_items // n_lanes
    return [(i, min(i + per_chunk, stop)) for i in range(start, stop, per_chunk)]
