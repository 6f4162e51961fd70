"""The mask description the fast kernels read instead of a (B, T, S) array.

The description is the reference's `minencdec.model.attention.Mask`, field by field: query i
sits at position q_offset + i; the first S - extra_keys keys are the query's own sequence
(key j at position j) under the causal / window / rule description and `key_mask`; the
last `extra_keys` keys (T5Gemma 2's merged attention: the encoder's) are visible to every
query unless `extra_key_mask` marks them as padding. `dense_mask` gives the reference's
array for a description (what every test compares against); `visible_intervals` gives the
form the kernels use: on the own keys, what a query sees is one interval [lo_i, hi_i]
(before padding), and lo_i, hi_i never decrease with i.
"""

from __future__ import annotations

import numpy as np
from minencdec.model import attention as reference
from minencdec.model.config import WINDOW_RULES


def _check_description(causal, window, rule, q_offset, extra_keys=0):
    if rule not in WINDOW_RULES:
        raise ValueError(f"rule must be one of {WINDOW_RULES}, got {rule!r}")
    if window is not None and (int(window) != window or window < 0):
        raise ValueError(f"window must be None or an integer >= 0, got {window!r}")
    if int(q_offset) != q_offset:
        raise ValueError(f"q_offset must be an integer, got {q_offset!r}")
    if int(extra_keys) != extra_keys or extra_keys < 0:
        raise ValueError(f"extra_keys must be an integer >= 0, got {extra_keys!r}")


def dense_mask(T, S, causal=False, window=None, rule="le", key_mask=None, q_offset=0, extra_keys=0,
               extra_key_mask=None):
    """The reference's (B, T, S) bool mask for a description ((1, T, S) without key masks):
    True where query i (at position q_offset + i) may see key j. S counts the extra keys."""
    _check_description(causal, window, rule, q_offset, extra_keys)
    return reference.Mask(causal, window, rule, key_mask, q_offset, extra_keys, extra_key_mask).dense(T, S)


def visible_intervals(T, S, causal=False, window=None, rule="le", q_offset=0):
    """lo, hi (T,) int64: query i sees own keys lo[i] <= j <= hi[i] (before padding); lo > hi
    means none. S is the number of own keys (without extra keys): the same description as
    dense_mask, as intervals (the table is attention.mask_pattern's)."""
    pos = np.arange(T, dtype=np.int64) + q_offset
    lo, hi = np.zeros(T, np.int64), np.full(T, S - 1, np.int64)
    if causal:
        hi = np.minimum(hi, pos)
        if window is not None:
            lo = np.maximum(lo, pos - window + 1)
    elif window is not None and rule == "t5gemma2":           # w keys, the odd one to the right
        lo, hi = np.maximum(lo, pos - (window - 1) // 2), np.minimum(hi, pos + window // 2)
    elif window is not None:
        w = window if rule == "le" else window - 1
        lo, hi = np.maximum(lo, pos - w), np.minimum(hi, pos + w)
    return lo, hi


def _check_shapes(q, k, v, key_mask, extra_keys=0, extra_key_mask=None):
    """q, k, v and the description's masks fit together, or a ValueError naming the one that does not."""
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"attention: q must be (B, H, T, Dh) and k, v (B, K, S, Dh) of one shape; "
                         f"got q {q.shape}, k {k.shape}, v {v.shape}")
    (B, H, T, Dh), (Bk, K, S, Dk) = q.shape, k.shape
    if B != Bk or Dh != Dk or K == 0 or H % K != 0:
        raise ValueError(f"attention: q {q.shape} and k {k.shape} disagree (batch, head dim, "
                         "or query heads not a multiple of kv heads)")
    if T == 0 or S == 0:
        raise ValueError(f"attention: empty query or key axis (T={T}, S={S})")
    if extra_keys > S:
        raise ValueError(f"attention: extra_keys = {extra_keys} but k holds only S = {S} keys")
    n = S - extra_keys
    if key_mask is not None and np.shape(key_mask) not in ((B, n), (1, n)):
        raise ValueError(f"attention: key_mask must be (B, S) = ({B}, {S}), got {np.shape(key_mask)}" if not extra_keys
                         else f"attention: key_mask must be (B, S - extra_keys) = ({B}, {n}) (the own keys), "
                              f"got {np.shape(key_mask)}")
    if extra_key_mask is not None and not extra_keys:
        raise ValueError("attention: extra_key_mask is given but extra_keys is 0")
    if extra_key_mask is not None and np.shape(extra_key_mask) not in ((B, extra_keys), (1, extra_keys)):
        raise ValueError(f"attention: extra_key_mask must be (B, extra_keys) = ({B}, {extra_keys}), "
                         f"got {np.shape(extra_key_mask)}")


def _key_validity(B, n_own, E, xt, n_tiles, tile, key_mask, extra_key_mask):
    """kvalid (B, n_tiles * tile) in tile_keys' layout: True on a real key; ktile (B, n_tiles)
    int8: 0 no real key in the tile, 1 some, 2 all."""
    kvalid = np.zeros((B, n_tiles * tile), dtype=bool)
    kvalid[:, :n_own] = True if key_mask is None else (np.asarray(key_mask) != 0)
    kvalid[:, xt * tile:xt * tile + E] = True if extra_key_mask is None else (np.asarray(extra_key_mask) != 0)
    tiles = kvalid.reshape(B, n_tiles, tile)
    return kvalid, tiles.any(axis=2).astype(np.int8) + tiles.all(axis=2)


def _tiled_pairs(lo, hi, n_own, E, tile=64):
    """(query, key) pairs in the tiles the tiled kernel would visit, per (batch, head), with
    the default tiles and no padding: what `dense.choose` weighs the dense path against."""
    nqt = -(-len(lo) // tile)
    tlo, thi = _tile_bounds(lo, hi, n_own, nqt, tile)
    own = np.maximum(thi // tile - tlo // tile + 1, 0)
    return int(own.sum() + nqt * -(-E // tile)) * tile * tile


def _dense_validity(B, n_own, E, key_mask, extra_key_mask):
    """(B, S) bool: False on a padded key (own keys, then extra keys), as the dense path reads it."""
    kvalid = np.ones((B, n_own + E), dtype=bool)
    if key_mask is not None:
        kvalid[:, :n_own] = np.asarray(key_mask) != 0
    if extra_key_mask is not None:
        kvalid[:, n_own:] = np.asarray(extra_key_mask) != 0
    return kvalid


def _tile_bounds(lo, hi, S, n_tiles, tile):
    """Per query tile, the smallest lo and largest hi over its rows that see any own key
    (S and -1 for a tile whose rows see none; S = the number of own keys)."""
    seen = lo <= hi
    pad = n_tiles * tile - len(lo)
    lo_s = np.concatenate([np.where(seen, lo, S), np.full(pad, S, np.int64)])
    hi_s = np.concatenate([np.where(seen, hi, -1), np.full(pad, -1, np.int64)])
    return lo_s.reshape(n_tiles, tile).min(axis=1), hi_s.reshape(n_tiles, tile).max(axis=1)
