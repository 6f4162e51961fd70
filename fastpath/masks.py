"""The mask description the fast kernels read instead of a (B, T, S) array.

Query i sits at position q_offset + i, key j at position j (the table is in attention.py's
notes). `dense_mask` gives the reference's array for a description (what every test
compares against); `visible_intervals` gives the form the kernels use: for every
description the keys a query sees form one interval [lo_i, hi_i] (before padding).
"""

from __future__ import annotations

import numpy as np
from minencdec.model import attention as reference


def _check_description(causal, window, rule, q_offset):
    if rule not in ("le", "lt"):
        raise ValueError(f"rule must be 'le' or 'lt', got {rule!r}")
    if window is not None and (int(window) != window or window < 0):
        raise ValueError(f"window must be None or an integer >= 0, got {window!r}")
    if int(q_offset) != q_offset:
        raise ValueError(f"q_offset must be an integer, got {q_offset!r}")


def dense_mask(T, S, causal=False, window=None, rule="le", key_mask=None, q_offset=0):
    """The reference's (B, T, S) bool mask for a description ((1, T, S) without key_mask):
    True where query i (at position q_offset + i) may see key j."""
    _check_description(causal, window, rule, q_offset)
    return reference.Mask(causal, window, rule, key_mask, q_offset).dense(T, S)


def visible_intervals(T, S, causal=False, window=None, rule="le", q_offset=0):
    """lo, hi (T,) int64: query i sees keys lo[i] <= j <= hi[i] (before padding); lo > hi
    means none. The same description as dense_mask, as intervals."""
    pos = np.arange(T, dtype=np.int64) + q_offset
    lo, hi = np.zeros(T, np.int64), np.full(T, S - 1, np.int64)
    if causal:
        hi = np.minimum(hi, pos)
        if window is not None:
            lo = np.maximum(lo, pos - window + 1)
    elif window is not None:
        w = window if rule == "le" else window - 1
        lo, hi = np.maximum(lo, pos - w), np.minimum(hi, pos + w)
    return lo, hi
