"""The AdamW update of one tensor as one pass over it, in Numba.

Same arithmetic, operation for operation and rounding for rounding, as the NumPy loop of
`minencdec.training.optim.AdamW.step` (itself torch.optim.AdamW's), so the two backends
give the same bits:

    p = p * decay                          decay = 1 - lr wd (1: not decayed)
    m = m * b1 + (1 - b1) g
    v = v * b2 + (1 - b2) (g g)
    p = p - step * (m / (sqrt(v) / bc2 + eps))      step = lr / (1 - b1^t), bc2 = sqrt(1 - b2^t)

NumPy makes about ten passes over the tensor for these lines, with a temporary the size of
the tensor for most of them: for a 262,144 x 640 embedding that is 0.67 GB per temporary,
and the update's peak memory. Here each element is read and written once and nothing is
allocated. The kernel is compiled without fast-math (no fused multiply-add, no
reassociation: each line rounds as NumPy's does), which still vectorises, as there is no
reduction. Scalars arrive in the tensor's dtype, as NumPy casts Python floats.
"""

from __future__ import annotations

import numpy as np

from .jit import kernel, lanes, run_lanes

# Elements from which a tensor's update is split over threads.
PARALLEL_WORK = 1 << 18


@kernel(fastmath=frozenset())
def _adamw_lane(lane, n_lanes, p, g, m, v, decay, b1, c1, b2, c2, step, bc2, eps):
    """Elements [lane n / n_lanes, (lane + 1) n / n_lanes) of the flat tensors. The loop runs
    over slices from 0: from a runtime start it stays scalar (measured 6x slower; dense.py)."""
    n = p.shape[0]
    a, b = lane * n // n_lanes, (lane + 1) * n // n_lanes
    p, g, m, v = p[a:b], g[a:b], m[a:b], v[a:b]
    for i in range(b - a):
        pi = p[i] * decay                                     # decoupled weight decay
        mi = m[i] * b1 + c1 * g[i]                            # c1 = 1 - b1
        vi = v[i] * b2 + c2 * (g[i] * g[i])                   # c2 = 1 - b2
        m[i], v[i] = mi, vi
        p[i] = pi - step * (mi / (np.sqrt(vi) / bc2 + eps))   # eps outside the sqrt


def adamw_update(p, g, m, v, decay, b1, b2, step, bc2, eps):
    """One AdamW update of p, m, v in place (module notes), from the gradient g. All four
    C-contiguous arrays of one shape and dtype (float32 or float64); the scalars are Python
    floats."""
    if not all(a.flags.c_contiguous and a.shape == p.shape and a.dtype == p.dtype for a in (g, m, v)) \
            or p.dtype not in (np.float32, np.float64) or not p.flags.c_contiguous:
        raise ValueError(f"adamw_update: p, g, m, v must be C-contiguous float32 or float64 arrays of one shape "
                         f"and dtype, got {[(a.dtype, a.shape) for a in (p, g, m, v)]}")
    dt = p.dtype.type
    flat = [a.reshape(-1) for a in (p, g, m, v)]
    n_lanes = lanes(p.size) if p.size >= PARALLEL_WORK else 1
    run_lanes(_adamw_lane, n_lanes, *flat, dt(decay), dt(b1), dt(1.0 - b1), dt(b2), dt(1.0 - b2), dt(step), dt(bc2),
              dt(eps))
