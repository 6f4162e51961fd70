"""Input checks shared by the models: bad input gets an error that names the problem.

Nothing here computes; each function returns a clean array or raises ValueError.
"""

from __future__ import annotations

import numpy as np

DTYPES = {"float32": np.float32, "float64": np.float64}


def resolve_dtype(dtype):
    """'float32' / 'float64' (or the numpy types) -> a numpy dtype. Norms and softmax are
    computed in the model's dtype, so lower precisions are refused rather than upcast."""
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return np.dtype(DTYPES[name])


def check_ids(ids, vocab_size, name):
    """A (B, T) integer array with every id in [0, vocab_size)."""
    a = np.asarray(ids)
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[1] == 0 or a.shape[0] == 0:
        raise ValueError(f"{name} must have shape (batch, length) with length >= 1, got {a.shape}")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be integer token ids, got dtype {a.dtype}")
    bad = (a < 0) | (a >= vocab_size)
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name}: token id {int(a[where])} at {where} is outside the vocabulary "
                         f"[0, {vocab_size})")
    return a.astype(np.int64, copy=False)


def check_mask(mask, shape, name):
    """None, or an array of 0/1 (or bool) of exactly `shape`."""
    if mask is None:
        return None
    m = np.asarray(mask)
    if m.ndim == 1 and len(shape) == 2:
        m = m[None]
    if m.shape != tuple(shape):
        raise ValueError(f"{name} has shape {m.shape}, expected {tuple(shape)}")
    if not np.isin(m, (0, 1)).all():
        raise ValueError(f"{name} must hold only 0 and 1")
    return m.astype(bool)


def check_labels(labels, shape, vocab_size, ignore_index=-100):
    """Integer labels of exactly `shape`, each an id in the vocabulary or `ignore_index`."""
    a = np.asarray(labels)
    if a.ndim == 1 and len(shape) == 2:
        a = a[None]
    if a.shape != tuple(shape):
        raise ValueError(f"labels have shape {a.shape}, expected {tuple(shape)} (the input's shape)")
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"labels must be integers, got dtype {a.dtype}")
    bad = (a != ignore_index) & ((a < 0) | (a >= vocab_size))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"labels: {int(a[where])} at {where} is neither -100 nor in [0, {vocab_size})")
    return a.astype(np.int64, copy=False)


def check_params(params, shapes, dtype):
    """Every expected tensor present with its shape, nothing unknown; cast to `dtype`."""
    missing = sorted(set(shapes) - set(params))
    unknown = sorted(set(params) - set(shapes))
    if missing:
        raise ValueError(f"missing parameters: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if unknown:
        raise ValueError(f"unknown parameters: {unknown[:8]}{' ...' if len(unknown) > 8 else ''}")
    out, seen = {}, []
    for name, shape in shapes.items():
        a = np.asarray(params[name])
        if a.shape != tuple(shape):
            raise ValueError(f"parameter {name} has shape {a.shape}, expected {tuple(shape)}")
        a = np.ascontiguousarray(a, dtype=dtype)
        # Every parameter must own its memory: an optimizer updates them in place, so two
        # names sharing one array (adapt_params shares on purpose, to save memory) would be
        # updated twice per step. Shared arrays are copied here, once.
        if any(np.may_share_memory(a, b) for b in seen):       # a bounds check: cheap
            a = a.copy()
        seen.append(a)
        out[name] = a
    return out
