"""Training objectives: pure functions from a row of token ids to (encoder input, target).

    causal_lm(row)                    decoder-only pretraining: (ids, labels = ids)
    prefix_lm(row, split)             prefix -> encoder, the rest -> decoder target
    span_corruption(row, ...)         T5: noise spans -> sentinels in the input, spans in the target
    ul2_example(row, ids, rng)        UL2: one of 7 denoisers, its mode token in front
    ul2_batch / prefix_lm_batch       padded (input_ids, attention_mask, labels) for
                                      T5GemmaModel.loss_and_grads(input_ids, labels, attention_mask)

Labels follow transformers: the *target* tokens themselves; the model shifts them right
(bos in front) to make the decoder input, and ignores -100. Randomness comes only from the
`rng` argument (a numpy Generator), so seeding it from (seed, step) makes a batch
reproducible and a resumed run exact.

Span corruption, with noise mask  . . x x . x . .  over tokens a b c d e f g h:
    input   a b <extra_id_0> e <extra_id_1> g h
    target  <extra_id_0> c d <extra_id_1> f <eos>

Axes: L row length, S encoder length, T decoder (target) length, B batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = -100


@dataclass(frozen=True)
class SpecialIds:
    """The ids the objectives need. A Tokenizer has the same attributes and works too."""
    pad_id: int = 0
    eos_id: int = 1
    bos_id: int = 2
    sentinel_ids: tuple = ()                       # sentinel_0 first
    mode_ids: dict = field(default_factory=dict)   # "[NLU]", "[NLG]", "[S2S]" -> id


def _row(row, need, what):
    r = np.asarray(row)
    if r.ndim != 1 or not np.issubdtype(r.dtype, np.integer):
        raise ValueError(f"{what} takes a 1-D array of integer token ids, got shape {r.shape}, "
                         f"dtype {r.dtype}")
    if len(r) < need:
        raise ValueError(f"{what} needs a sequence of at least {need} tokens, got {len(r)}")
    return r


# ---------------------------------------------------------------- causal LM and prefix LM

def causal_lm(row):
    """(input_ids, labels) with labels = input_ids: the model predicts labels[t + 1] from
    ids[:t + 1] (the shift happens inside the loss, as in transformers)."""
    ids = np.asarray(row)
    return ids.copy(), ids.copy()


def prefix_length(length: int, split="middle") -> int:
    """How many tokens go to the encoder: "middle" -> length // 2 (the paper's 4096/4096);
    an int -> itself; a numpy Generator -> uniform in [1, length - 1] (T5's
    random_prefix_noise_mask), so both sides always get at least one token."""
    if split == "middle":
        k = length // 2
    elif isinstance(split, np.random.Generator):
        k = int(split.integers(1, length))
    elif isinstance(split, (int, np.integer)):
        k = int(split)
    else:
        raise ValueError(f"split must be 'middle', an int or a numpy Generator, got {split!r}")
    if not 1 <= k <= length - 1:
        raise ValueError(f"prefix length {k} leaves an empty side of a {length}-token sequence")
    return k


def prefix_lm(row, split="middle", eos_id=None):
    """(encoder input, target) = (row[:k], row[k:]).

    No eos is appended by default: a packed row is a window cut from running text, so its
    end is not the end of a document (packing already put eos where documents end). Pass
    `eos_id` to append one anyway."""
    r = _row(row, 2, "prefix_lm")
    k = prefix_length(len(r), split)
    target = r[k:] if eos_id is None else np.append(r[k:], eos_id)
    return r[:k].copy(), target.copy()


# ---------------------------------------------------------------- T5 span corruption

def _round_half_even_f32(x) -> int:
    """tf.round on float32, which T5 uses: ties go to the even integer."""
    return int(np.round(np.float32(x)))


def _random_segmentation(num_items, num_segments, rng):
    """Lengths of a uniformly random split of num_items into num_segments non-empty parts
    (T5: shuffle num_segments - 1 "a new segment starts here" marks over the gaps)."""
    starts = np.arange(num_items - 1) < num_segments - 1             # (num_items - 1,)
    first_in_segment = np.concatenate([[False], rng.permutation(starts)])
    segment_id = np.cumsum(first_in_segment)                          # (num_items,)
    return np.bincount(segment_id, minlength=num_segments)            # (num_segments,)


def noise_counts(length, noise_density, mean_noise_span_length):
    """(num_noise_tokens, num_noise_spans) exactly as T5 computes them:

        num_noise_tokens = round(length * density), clamped to [1, length - 1]
        num_noise_spans  = round(num_noise_tokens / mean_span), at least 1

    in float32 with round-half-to-even, as tf.round does (190 * 0.15 is 28.500002 in
    float32, so T5 takes 29 noise tokens where float64 would give 28). A length below 2
    counts as 2 (T5's guard against degenerate masks)."""
    length = max(length, 2)
    num_noise = _round_half_even_f32(np.float32(length) * np.float32(noise_density))
    num_noise = min(max(num_noise, 1), length - 1)
    num_spans = _round_half_even_f32(np.float32(num_noise) / np.float32(mean_noise_span_length))
    return num_noise, max(num_spans, 1)


def random_spans_noise_mask(length, noise_density, mean_noise_span_length, rng):
    """(length,) bool, True = noise. T5's t5/data/preprocessors.py, step for step: the
    counts of noise_counts(); the noise tokens and the non-noise tokens each split at
    random into num_noise_spans non-empty spans; the spans interleaved non-noise first,

        [keep_0, noise_0, keep_1, noise_1, ..., keep_{n-1}, noise_{n-1}]

    so the mask always starts with kept tokens and ends with noise. Every mask with these
    counts is equally likely. A length-1 mask is [False] (T5 works at length 2, then cuts)."""
    if noise_density == 0.0:
        return np.zeros(length, dtype=bool)
    if not 0 < noise_density < 1 or mean_noise_span_length <= 0:
        raise ValueError(f"need 0 <= noise_density < 1 and mean_noise_span_length > 0, got "
                         f"{noise_density}, {mean_noise_span_length}")
    num_noise, num_spans = noise_counts(length, noise_density, mean_noise_span_length)
    num_keep = max(length, 2) - num_noise
    if num_spans > num_keep:
        raise ValueError(f"a {length}-token sequence at noise density {noise_density} has "
                         f"{num_keep} non-noise tokens, too few to separate {num_spans} noise spans")
    noise_lengths = _random_segmentation(num_noise, num_spans, rng)       # (spans,)
    keep_lengths = _random_segmentation(num_keep, num_spans, rng)         # (spans,)
    interleaved = np.stack([keep_lengths, noise_lengths], axis=1).ravel()  # (2 spans,)
    is_noise = np.tile([False, True], num_spans)                           # (2 spans,)
    return np.repeat(is_noise, interleaved)[:length]                       # (length,)


def span_corruption_from_mask(row, mask, sentinel_ids, eos_id):
    """(input, target) for a given noise mask: each noise span becomes one sentinel in the
    input; the target lists <sentinel_i> span_i for every span, then eos. (A row that
    already holds sentinel ids, e.g. from text containing "<extra_id_0>", is ambiguous.)"""
    r, mask = np.asarray(row), np.asarray(mask, dtype=bool)
    if mask.shape != r.shape:
        raise ValueError(f"mask shape {mask.shape} != row shape {r.shape}")
    span_start = mask & ~np.concatenate([[False], mask[:-1]])     # (L,) first token of each span
    n = int(span_start.sum())
    if n > len(sentinel_ids):
        raise ValueError(f"{n} noise spans need {n} sentinel tokens, the tokenizer has "
                         f"{len(sentinel_ids)} (train it with num_sentinels >= {n})")
    sentinel = np.asarray(sentinel_ids[:n], dtype=r.dtype)       # (n,)
    keep = ~mask
    kept_before = (np.cumsum(keep) - keep)[span_start]            # (n,) kept tokens before span i
    noise_before = (np.cumsum(mask) - mask)[span_start]           # (n,) noise tokens before span i
    inp = np.insert(r[keep], kept_before, sentinel)               # kept tokens, sentinel_i where span i was
    tgt = np.insert(r[mask], noise_before, sentinel)              # noise tokens, sentinel_i before span i
    return inp, np.append(tgt, np.asarray(eos_id, dtype=r.dtype))


def span_corruption(row, noise_density, mean_noise_span_length, rng, sentinel_ids, eos_id):
    """T5 span corruption of one row: random_spans_noise_mask, then span_corruption_from_mask."""
    r = _row(row, 2, "span corruption")
    mask = random_spans_noise_mask(len(r), noise_density, mean_noise_span_length, rng)
    return span_corruption_from_mask(r, mask, sentinel_ids, eos_id)


# ---------------------------------------------------------------- UL2

@dataclass(frozen=True)
class Denoiser:
    name: str
    mode: str                       # the mode token prepended to the encoder input
    mean_span: float | None = None  # None: the S denoiser (prefix LM)
    density: float | None = None


UL2_DENOISERS = (
    Denoiser("R(3, 0.15)", "[NLU]", 3, 0.15), Denoiser("R(8, 0.15)", "[NLU]", 8, 0.15),
    Denoiser("X(3, 0.5)", "[NLG]", 3, 0.5), Denoiser("X(8, 0.5)", "[NLG]", 8, 0.5),
    Denoiser("X(64, 0.15)", "[NLG]", 64, 0.15), Denoiser("X(64, 0.5)", "[NLG]", 64, 0.5),
    Denoiser("S", "[S2S]"),
)


def ul2_sentinels_needed(length, denoisers=UL2_DENOISERS) -> int:
    """The most noise spans any denoiser makes in a `length`-token row: check it against the
    tokenizer (tokenizer.require_sentinels) before training starts. X(3, 0.5) needs about
    length / 6, so 100 sentinels cover rows up to ~600 tokens."""
    return max((noise_counts(length, d.density, d.mean_span)[1] for d in denoisers
                if d.mean_span is not None), default=0)


def sample_denoiser(rng, rates=None, denoisers=UL2_DENOISERS) -> Denoiser:
    """One denoiser, uniformly or with probabilities proportional to `rates`."""
    p = None
    if rates is not None:
        p = np.asarray(rates, dtype=np.float64)
        if p.shape != (len(denoisers),) or (p < 0).any() or p.sum() <= 0:
            raise ValueError(f"rates must be {len(denoisers)} non-negative weights, got {rates}")
        p = p / p.sum()
    return denoisers[int(rng.choice(len(denoisers), p=p))]


def ul2_example(row, ids, rng, rates=None, denoiser=None):
    """(encoder input, target) of one UL2 example. `ids` is a Tokenizer or SpecialIds.
    R and X: span corruption (target ends with eos); S: prefix LM at a uniform random
    split (no eos, as prefix_lm). The denoiser's mode token is prepended to the input."""
    d = denoiser or sample_denoiser(rng, rates)
    if d.mode not in ids.mode_ids:
        raise ValueError(f"UL2 needs the mode token {d.mode}, which the tokenizer lacks")
    if d.mean_span is None:
        inp, tgt = prefix_lm(row, rng)
    else:
        inp, tgt = span_corruption(row, d.density, d.mean_span, rng, ids.sentinel_ids, ids.eos_id)
    return np.concatenate([[ids.mode_ids[d.mode]], inp]).astype(inp.dtype), tgt


# ---------------------------------------------------------------- batches

def pad_examples(examples, enc_len, dec_len, pad_id=0):
    """[(input, target), ...] -> input_ids (B, S), attention_mask (B, S), labels (B, T):
    pad_id / 0 / -100 after each example's end."""
    B = len(examples)
    input_ids = np.full((B, enc_len), pad_id, dtype=np.int64)       # (B, S)
    attention_mask = np.zeros((B, enc_len), dtype=np.int64)         # (B, S)
    labels = np.full((B, dec_len), IGNORE_INDEX, dtype=np.int64)    # (B, T)
    for b, (inp, tgt) in enumerate(examples):
        if len(inp) > enc_len or len(tgt) > dec_len:
            raise ValueError(f"example {b} has input {len(inp)} / target {len(tgt)} tokens, more than "
                             f"the padded lengths {enc_len} / {dec_len}")
        input_ids[b, :len(inp)] = inp
        attention_mask[b, :len(inp)] = 1
        labels[b, :len(tgt)] = tgt
    return input_ids, attention_mask, labels


def ul2_batch(rows, ids, rng, enc_len=None, dec_len=None, rates=None):
    """UL2 on every row of (B, L) `rows`, padded. L + 1 fits any example on both sides:
    the input has the kept tokens, one sentinel per span and the mode token; the target the
    noise tokens, one sentinel per span and eos; and spans <= kept tokens."""
    rows = np.asarray(rows)
    L = rows.shape[1]
    examples = [ul2_example(r, ids, rng, rates) for r in rows]
    return pad_examples(examples, enc_len or L + 1, dec_len or L + 1, ids.pad_id)


def prefix_lm_batch(rows, split="middle", pad_id=0):
    """prefix_lm on every row of (B, L) `rows`: S = L - 1 and T = L - 1 hold any split;
    with "middle" the batch has no padding at all (S = L // 2, T = L - L // 2)."""
    rows = np.asarray(rows)
    L = rows.shape[1]
    examples = [prefix_lm(r, split) for r in rows]
    if split == "middle":
        return pad_examples(examples, L // 2, L - L // 2, pad_id)
    return pad_examples(examples, L - 1, L - 1, pad_id)
