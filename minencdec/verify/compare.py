"""Comparing two activation dumps: one row per tensor in model order, OK or DIFF with the
max abs / rel error and the worst index, then the first divergence (the format is in dumps.py).

    rows = compare_dumps(theirs, ours)          # ours is the reference B
    print(format_report(rows))
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from .dumps import INPUT_NAMES

# Two float64 implementations of the same model agree to ~1e-14 of a tensor's scale (only
# the rounding order differs; measured on the test models, transformers made exact). 1e-9
# leaves room for 40-layer models yet flags a float64 path that rounds through float32
# somewhere (transformers' unpatched RMSNorm / softmax / RoPE: 1e-7 to 1e-6 after 3 layers),
# and every real mistake (a missing `1 +`, wrong window, scale, softcap, RoPE pairing) >= 1e-4.
RTOL_F64 = 1e-9
# float32 against float64: 1e-6 to 6e-6 after 2-3 tiny layers (measured); 26-42 layers of
# width 2304-3584 grow that towards 1e-4, so 1e-3 keeps a margin. Subtle bugs can hide below
# it (erf GELU instead of tanh is ~1e-3): verify in float64 first, where they stand out.
RTOL_F32 = 1e-3
ATOL = 0.0      # errors are already scaled by max |B|; atol only matters for all-zero tensors
# The size class of an error (max rel), a size and not a verdict: "float64-level" up to
# RTOL_F64 (rounding order only), "float32-level" up to F32_LEVEL (about 1000 float32
# epsilons: what float32 steps inside a float64 model leave, measured 1e-8 to 1e-5, e.g.
# transformers' islands, JAX's float32 RoPE angles up to 2048 tokens), "divergent" above
# (the mistakes above: a missing `1 +`, a wrong window, scale, softcap or RoPE pairing).
F32_LEVEL = 1e-4
SIZE_CLASSES = ("exact", "float64-level", "float32-level", "divergent")


@dataclass(frozen=True)
class Row:
    """One line of the report."""
    name: str
    status: str                  # OK, DIFF, MISSING (in one dump only), SHAPE
    max_abs: float = float("nan")
    max_rel: float = float("nan")  # max abs error / max |B| over the compared positions
    worst: tuple = ()            # index of the largest error
    note: str = ""
    size: str = ""               # one of SIZE_CLASSES (OK and DIFF rows), see size_class


def size_class(max_rel) -> str:
    """"exact", "float64-level", "float32-level" or "divergent" (NaN and inf: divergent)."""
    if max_rel == 0:
        return "exact"
    if max_rel <= RTOL_F64:
        return "float64-level"
    return "float32-level" if max_rel <= F32_LEVEL else "divergent"


_ORDER = re.compile(r"(?:(encoder|decoder)\.)?"
                    r"(?:(embed)|layers\.(\d+)(?:\.(self_attn|cross_attn|mlp)(?:\.(q|k|scores|probs))?)?|(norm))")
_SUBLAYERS = {"self_attn": 0, "cross_attn": 1, "mlp": 2, None: 3}
_INSIDE = {"q": 0, "k": 1, "scores": 2, "probs": 3, None: 4}     # attention internals, then the output


def model_order(name):
    """Sort key: embed, each layer's sublayers (an attention's internals q, k, scores, probs
    before its output) then the layer, norm; encoder before decoder; logits, then unknown names."""
    m = _ORDER.fullmatch(name)
    if name == "logits" or m is None:
        return (2 if name == "logits" else 3, 0, 0, 0, name)
    layer = -1 if m[2] else 10**9 if m[6] else int(m[3])
    return (int(m[1] == "decoder"), layer, _SUBLAYERS[m[4]], _INSIDE[m[5]], name)


def valid_positions(acts) -> dict[str, np.ndarray]:
    """Activation name -> bool array of the entries to compare, from the dump's input masks:
    (B, L), the non-pad positions, for the activations; for attention internals, of the
    tensor's rank: q at real queries, k at real keys, both only in rows without left padding
    (implementations number the positions of such rows differently: internals.py); scores
    at visible keys of real queries (where the dump's probs > 0: what an implementation
    stores at hidden keys, the raw score, -inf or a large negative, is its own), probs at
    every key of a real query (hidden keys must have probability 0)."""
    dec = "decoder_attention_mask" in acts
    out = {}
    for name in acts:
        if name in INPUT_NAMES:
            continue
        m = _ORDER.fullmatch(name)
        decoder = dec and (name.startswith("decoder.") or name == "logits")
        queries = acts["decoder_attention_mask" if decoder else "attention_mask"] != 0     # (B, T)
        if m is None or m[5] is None:
            out[name] = queries
            continue
        keys = _key_mask(acts, name, m[4], decoder)                                       # (B, S)
        turned = m[4] == "self_attn"                     # RoPE: rows without left padding only
        probs = acts.get(name.rsplit(".", 1)[0] + ".probs")
        visible = queries[:, None, :, None] & (keys[:, None, None, :] if probs is None else probs > 0)
        out[name] = {"q": (queries & (queries[:, :1] | (not turned)))[:, None, :, None],
                     "k": (keys & (keys[:, :1] | (not turned)))[:, None, :, None],
                     "scores": visible, "probs": queries[:, None, :, None]}[m[5]]
    return out


def _key_mask(acts, name, sublayer, decoder):
    """(B, S) real keys of an attention: the encoder's for cross-attention and encoder
    self-attention, the decoder's for its self-attention, both (the decoder's first) for
    T5Gemma 2's merged attention, which holds T + S keys."""
    if sublayer == "cross_attn" or not decoder:
        return acts["attention_mask"] != 0
    own = acts["decoder_attention_mask"] != 0
    k = acts.get(name.rsplit(".", 1)[0] + ".k")
    if k is not None and k.shape[2] == own.shape[1] + acts["attention_mask"].shape[1]:
        return np.concatenate([own, acts["attention_mask"] != 0], axis=1)
    return own


def _compare_one(name, x, y, rtol, atol, keep):
    if x.shape != y.shape:
        return Row(name, "SHAPE", note=f"{x.shape} vs {y.shape}")
    if keep is None:
        keep = np.ones(x.shape, bool)
    else:
        try:                                     # (B, L) masks stand for every trailing axis
            keep = np.broadcast_to(keep.reshape(keep.shape + (1,) * (x.ndim - keep.ndim)), x.shape)
        except ValueError:
            return Row(name, "SHAPE", note=f"{x.shape} does not fit the masks' {keep.shape}")
    x, y = x.astype(np.float64), y.astype(np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    with np.errstate(invalid="ignore"):
        diff = np.where(finite, np.abs(x - y), np.inf)       # a NaN or inf counts as infinitely wrong
    diff[~keep] = 0.0                                         # padding positions are not compared
    if diff.size == 0:
        return Row(name, "OK", 0.0, 0.0, size="exact")
    worst = np.unravel_index(np.argmax(diff), diff.shape)
    scale = float(np.max(np.abs(y), where=keep & finite, initial=0.0))
    err = float(diff[worst])
    rel = err / scale if scale > 0 else (0.0 if err == 0 else np.inf)
    ok = err <= atol + rtol * scale
    note = "" if np.all(finite | ~keep) else "non-finite values"
    return Row(name, "OK" if ok else "DIFF", err, rel, tuple(int(i) for i in worst), note, size_class(rel))


def compare(a, b, rtol, atol=ATOL, valid=None) -> list[Row]:
    """One row per activation name in either dump, in model order. b is the reference:
    an entry fails when |a - b| > atol + rtol * max |b|. `valid`: name -> (B, L) bool of the
    positions to compare (see `valid_positions`); None compares every position."""
    names = sorted((set(a) | set(b)) - set(INPUT_NAMES), key=model_order)
    rows = []
    for n in names:
        if n not in a or n not in b:
            rows.append(Row(n, "MISSING", note=f"only in {'B' if n not in a else 'A'}"))
        else:
            rows.append(_compare_one(n, np.asarray(a[n]), np.asarray(b[n]), rtol, atol,
                                     None if valid is None else valid.get(n)))
    return rows


def compare_dumps(a, b, rtol=None, atol=ATOL) -> list[Row]:
    """`compare` two dumps made from the same inputs, at their non-pad positions. rtol None:
    RTOL_F32 when either dump holds float32 (or lower) activations, else RTOL_F64."""
    for name in INPUT_NAMES:
        if (name in a) != (name in b) or (name in a and not np.array_equal(a[name], b[name])):
            raise ValueError(f"the dumps were made from different inputs ({name} differs); "
                             "dump both from the same token ids and masks")
    if rtol is None:
        coarse = any(v.dtype != np.float64 for d in (a, b) for k, v in d.items() if k not in INPUT_NAMES)
        rtol = RTOL_F32 if coarse else RTOL_F64
    return compare(a, b, rtol, atol, valid_positions(b))


def format_report(rows) -> str:
    """One line per row (status, name, max abs / rel error, size class, worst index), then
    the first divergence and the first failing row of each size class (or that all agree)."""
    width = max([len(r.name) for r in rows] + [4])
    lines = [f"{'':7} {'name':<{width}}  {'max abs':>9}  {'max rel':>9}  {'size':<13}  worst index"]
    for r in rows:
        numbers = f"{r.max_abs:9.2e}  {r.max_rel:9.2e}  {r.size:<13}  {r.worst}" if r.status in ("OK", "DIFF") else ""
        lines.append(f"{r.status:<7} {r.name:<{width}}  {numbers}{'  ' + r.note if r.note else ''}".rstrip())
    bad = [r for r in rows if r.status in ("DIFF", "SHAPE")]
    missing = sum(r.status == "MISSING" for r in rows)
    if bad:
        r = bad[0]
        lines.append(f"first divergence: {r.name}" + (f" (max rel {r.max_rel:.2e} at {r.worst}, {r.size})"
                                                      if r.status == "DIFF" else f" ({r.note})"))
        for size in SIZE_CLASSES[1:]:
            first = next((x for x in bad if x.size == size), None)
            if first is not None:
                lines.append(f"  first {size + ':':<14} {first.name}")
        if any(x.size == "float32-level" for x in bad):
            lines.append(f"  (float32-level: <= {F32_LEVEL:g} of the scale, what float32 arithmetic leaves in a "
                         "float64 model; a size, not a verdict)")
    elif not missing:
        lines.append(f"all {len(rows)} tensors agree")
    if missing:
        lines.append(f"{missing} tensor(s) are in only one dump")
    return "\n".join(lines)
