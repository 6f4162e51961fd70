"""Objectives: T5's noise mask, span corruption, prefix LM, the UL2 mixture, padded batches.

Oracles: T5's counting rules written out again here, run lengths counted with itertools,
an exhaustive list of the masks T5 allows (uniformity), a reconstruction written here that
puts every span back in place of its sentinel, and a tiny float64 T5Gemma model (padding
changes no loss)."""

import itertools
from collections import Counter

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from minencdec.model.config import T5GemmaConfig
from minencdec.model.presets import preset
from minencdec.training.objectives import (IGNORE_INDEX, UL2_DENOISERS, SpecialIds, causal_lm, prefix_lm,
                                           prefix_lm_batch, random_spans_noise_mask, sample_denoiser,
                                           span_corruption, span_corruption_from_mask, ul2_batch,
                                           ul2_example, ul2_sentinels_needed)
from minencdec.model.t5gemma import T5GemmaModel

SENTINELS = tuple(range(200, 300))                     # ids 200..299: sentinel_0 = 200
MODES = {"[NLU]": 5, "[NLG]": 6, "[S2S]": 7}
IDS = SpecialIds(sentinel_ids=SENTINELS, mode_ids=MODES)
EOS = IDS.eos_id
token_rows = st.lists(st.integers(10, 199), min_size=2, max_size=200)   # never a special id


def runs(mask):
    """[(value, length), ...] of consecutive equal values."""
    return [(k, len(list(g))) for k, g in itertools.groupby(bool(x) for x in mask)]


def t5_counts(length, density, mean_span):
    """T5's numbers, restated: float32 products, round half to even (Python's round)."""
    length = max(length, 2)
    noise = round(float(np.float32(length) * np.float32(density)))
    noise = min(max(noise, 1), length - 1)
    spans = max(round(float(np.float32(noise) / np.float32(mean_span))), 1)
    return noise, spans


def reconstruct(inp, tgt, sentinels=SENTINELS, eos=EOS):
    """Put every span of the target back where its sentinel sits in the input."""
    tgt = list(tgt)
    assert tgt[-1] == eos
    spans, current = {}, None
    for t in tgt[:-1]:
        if t in sentinels:
            current = t
            spans[current] = []
        else:
            spans[current].append(t)
    out = []
    for t in inp:
        out.extend(spans.pop(t) if t in sentinels else [t])
    assert not spans, "a span whose sentinel never appears in the input"
    return out


# ---------------------------------------------------------------- the noise mask

@given(st.integers(2, 400), st.floats(0.05, 0.95), st.sampled_from([1, 1.5, 2, 3, 8, 64]),
       st.integers(0, 2**32 - 1))
def test_noise_mask_counts_and_alternation(length, density, mean_span, seed):
    noise, spans = t5_counts(length, density, mean_span)
    assume(spans <= length - noise)                       # else T5 itself cannot segment
    mask = random_spans_noise_mask(length, density, mean_span, np.random.default_rng(seed))
    assert mask.shape == (length,) and mask.dtype == bool
    r = runs(mask)
    assert int(mask.sum()) == noise                               # exactly the asked number
    assert [v for v, _ in r] == [False, True] * spans             # alternate, non-noise first
    # the realized density and mean span length are the asked ones, up to rounding
    if 1 < noise < length - 1:
        assert abs(noise - length * density) <= 0.5 + 1e-5 * length
    if spans > 1:
        assert abs(noise / spans - mean_span) <= 0.5 * mean_span / spans + 1e-5


def test_noise_mask_edges():
    rng = np.random.default_rng(0)
    assert random_spans_noise_mask(1, 0.5, 3, rng).tolist() == [False]      # T5: length 1
    assert random_spans_noise_mask(2, 0.15, 3, rng).tolist() == [False, True]
    assert not random_spans_noise_mask(9, 0.0, 3, rng).any()
    assert t5_counts(30, 0.15, 3) == (4, 1)         # 4.5 rounds to even 4 (tf.round), not 5
    assert random_spans_noise_mask(30, 0.15, 3, rng).sum() == 4
    # float32 as in TensorFlow: 190 * 0.15 is 28.500002 in float32 (-> 29) but 28.5 in
    # float64 (-> 28, half to even); T5 gives 29
    assert round(190 * 0.15) == 28 and random_spans_noise_mask(190, 0.15, 3, rng).sum() == 29
    with pytest.raises(ValueError, match="too few to separate"):
        random_spans_noise_mask(10, 0.9, 1, rng)


ALLOWED_6 = {m for m in itertools.product([False, True], repeat=6)
             if sum(m) == 3 and [v for v, _ in runs(m)] == [False, True, False, True]}


def frequencies(sampler, n=4000):
    return Counter(tuple(bool(x) for x in sampler()) for _ in range(n))


def test_every_allowed_mask_is_equally_likely():
    """length 6, density 0.5, mean span 1.5: 3 noise tokens in 2 spans; 2 x 2 = 4 masks."""
    assert len(ALLOWED_6) == 4
    rng = np.random.default_rng(1)
    f = frequencies(lambda: random_spans_noise_mask(6, 0.5, 1.5, rng))
    assert set(f) == ALLOWED_6
    assert all(abs(c / 4000 - 0.25) < 0.03 for c in f.values()), f     # sd 0.007: 4 sigma
    # negative control: a sampler that always splits the same way fails the same check
    fixed = frequencies(lambda: np.array([0, 1, 1, 0, 0, 1], dtype=bool), 100)
    assert set(fixed) <= ALLOWED_6 and not all(abs(c / 100 - 0.25) < 0.03 for c in fixed.values())


# ---------------------------------------------------------------- span corruption

@given(token_rows, st.data())
def test_span_corruption_from_any_mask_reconstructs(row, d):
    mask = np.array(d.draw(st.lists(st.booleans(), min_size=len(row), max_size=len(row))))
    row = np.array(row)
    n_spans = sum(v for v, _ in runs(mask))
    inp, tgt = span_corruption_from_mask(row, mask, SENTINELS, EOS)
    assert reconstruct(inp, tgt) == row.tolist()
    assert len(inp) == (~mask).sum() + n_spans and len(tgt) == mask.sum() + n_spans + 1
    assert [t for t in inp if t in SENTINELS] == list(SENTINELS[:n_spans])   # in order
    assert [t for t in tgt if t in SENTINELS] == list(SENTINELS[:n_spans])


@given(token_rows, st.sampled_from([(3, 0.15), (8, 0.15), (3, 0.5), (8, 0.5), (64, 0.5)]),
       st.integers(0, 2**32 - 1))
def test_span_corruption_reconstructs(row, span_density, seed):
    mean_span, density = span_density
    inp, tgt = span_corruption(np.array(row), density, mean_span, np.random.default_rng(seed),
                               SENTINELS, EOS)
    assert reconstruct(inp, tgt) == row
    assert inp[0] not in SENTINELS and tgt[0] == SENTINELS[0] and tgt[-1] == EOS


def test_example_from_the_docstring():
    inp, tgt = span_corruption_from_mask(np.arange(10, 18), np.array([0, 0, 1, 1, 0, 1, 0, 0], bool),
                                         SENTINELS, EOS)
    assert inp.tolist() == [10, 11, 200, 14, 201, 16, 17]
    assert tgt.tolist() == [200, 12, 13, 201, 15, EOS]


def test_negative_control_wrong_reconstruction_is_caught():
    row = np.arange(10, 30)
    mask = np.zeros(20, bool)
    mask[[3, 4, 9, 15, 16, 17]] = True
    inp, tgt = span_corruption_from_mask(row, mask, SENTINELS, EOS)
    assert reconstruct(inp, tgt) == row.tolist()
    swapped = np.array(tgt)                       # the spans of sentinels 0 and 1 exchanged
    swapped[[0, 3]] = swapped[[3, 0]]
    assert reconstruct(inp, swapped) != row.tolist()
    shifted = np.append(inp[1:], inp[:1])         # the input rotated by one
    assert reconstruct(shifted, tgt) != row.tolist()


def test_span_corruption_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        span_corruption(np.array([5]), 0.15, 3, rng, SENTINELS, EOS)
    with pytest.raises(ValueError, match="17 noise spans need 17 sentinel tokens, the tokenizer has 3"):
        span_corruption(np.arange(10, 110), 0.5, 3, rng, SENTINELS[:3], EOS)


# ---------------------------------------------------------------- causal LM and prefix LM

def test_causal_lm_labels_are_the_ids():
    row = np.arange(10, 20)
    ids, labels = causal_lm(row)
    assert np.array_equal(ids, row) and np.array_equal(labels, row)
    ids[0] = 0
    assert row[0] == 10 and labels[0] == 10                     # copies, not views


@given(token_rows, st.integers(0, 2**32 - 1))
def test_prefix_lm_concatenation_reconstructs(row, seed):
    row = np.array(row)
    inp, tgt = prefix_lm(row, "middle")
    assert len(inp) == len(row) // 2 and np.array_equal(np.concatenate([inp, tgt]), row)
    inp, tgt = prefix_lm(row, np.random.default_rng(seed))
    assert len(inp) >= 1 and len(tgt) >= 1 and np.array_equal(np.concatenate([inp, tgt]), row)
    inp, tgt = prefix_lm(row, "middle", eos_id=EOS)
    assert tgt[-1] == EOS and np.array_equal(np.concatenate([inp, tgt[:-1]]), row)


def test_random_prefix_split_is_uniform_over_1_to_L_minus_1():
    rng = np.random.default_rng(0)
    counts = Counter(len(prefix_lm(np.arange(10, 16), rng)[0]) for _ in range(5000))
    assert sorted(counts) == [1, 2, 3, 4, 5]
    assert all(abs(c / 5000 - 0.2) < 0.03 for c in counts.values())


def test_prefix_lm_errors():
    with pytest.raises(ValueError, match="at least 2 tokens"):
        prefix_lm(np.array([4]))
    with pytest.raises(ValueError, match="empty side"):
        prefix_lm(np.arange(10, 14), split=4)
    with pytest.raises(ValueError, match="1-D array of integer"):
        prefix_lm(np.ones(4))


# ---------------------------------------------------------------- UL2

@given(token_rows, st.sampled_from(UL2_DENOISERS), st.integers(0, 2**32 - 1))
def test_ul2_example_has_its_mode_token_and_reconstructs(row, denoiser, seed):
    rng = np.random.default_rng(seed)
    inp, tgt = ul2_example(np.array(row), IDS, rng, denoiser=denoiser)
    assert inp[0] == MODES[denoiser.mode] and not set(MODES.values()) & set(inp[1:].tolist())
    if denoiser.mean_span is None:
        assert np.concatenate([inp[1:], tgt]).tolist() == row
    else:
        assert reconstruct(inp[1:], tgt) == row


def test_ul2_denoisers_are_the_papers():
    assert [(d.mode, d.mean_span, d.density) for d in UL2_DENOISERS] == [
        ("[NLU]", 3, 0.15), ("[NLU]", 8, 0.15), ("[NLG]", 3, 0.5), ("[NLG]", 8, 0.5),
        ("[NLG]", 64, 0.15), ("[NLG]", 64, 0.5), ("[S2S]", None, None)]


def test_ul2_sentinels_needed_is_the_most_spans_any_denoiser_makes():
    rng = np.random.default_rng(0)
    for length in (2, 17, 128, 600, 620):
        spans = [sum(v for v, _ in runs(random_spans_noise_mask(length, d.density, d.mean_span, rng)))
                 for d in UL2_DENOISERS if d.mean_span is not None]
        assert ul2_sentinels_needed(length) == max(spans), length
    assert ul2_sentinels_needed(600) == 100 and ul2_sentinels_needed(620) == 103
    ul2_example(np.arange(600) % 190 + 10, IDS, rng, denoiser=UL2_DENOISERS[2])   # 100 spans: fits
    with pytest.raises(ValueError, match="103 noise spans need 103 sentinel tokens, the tokenizer has 100"):
        ul2_example(np.arange(620) % 190 + 10, IDS, rng, denoiser=UL2_DENOISERS[2])


def test_denoiser_sampling_uniform_or_by_rates():
    rng = np.random.default_rng(0)
    counts = Counter(sample_denoiser(rng).name for _ in range(7000))
    assert len(counts) == 7 and all(abs(c / 7000 - 1 / 7) < 0.02 for c in counts.values())
    rates = [0, 0, 0, 0, 0, 1, 3]
    counts = Counter(sample_denoiser(rng, rates).name for _ in range(4000))
    assert set(counts) == {"X(64, 0.5)", "S"} and abs(counts["S"] / 4000 - 0.75) < 0.03
    with pytest.raises(ValueError, match="7 non-negative weights"):
        sample_denoiser(rng, [1, 2])


def test_ul2_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match=r"mode token \[NLU\]"):
        ul2_example(np.arange(10, 40), SpecialIds(sentinel_ids=SENTINELS), rng, denoiser=UL2_DENOISERS[0])
    with pytest.raises(ValueError, match="sentinel tokens, the tokenizer has 0"):
        ul2_example(np.arange(10, 40), SpecialIds(mode_ids=MODES), rng, denoiser=UL2_DENOISERS[0])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ul2_example(np.array([10]), IDS, rng, denoiser=UL2_DENOISERS[6])


# ---------------------------------------------------------------- batches

def test_ul2_batch_layout_and_determinism():
    rows = np.random.default_rng(0).integers(10, 200, size=(16, 24))
    ids, mask, labels = ul2_batch(rows, IDS, np.random.default_rng(5))
    assert ids.shape == mask.shape == (16, 25) and labels.shape == (16, 25)
    assert np.array_equal(mask == 0, ids == IDS.pad_id)          # real tokens are never pad
    rng = np.random.default_rng(5)                               # the same draws, one by one
    for b in range(16):
        inp, tgt = ul2_example(rows[b], IDS, rng)
        assert ids[b, :len(inp)].tolist() == inp.tolist() and not mask[b, len(inp):].any()
        assert labels[b, :len(tgt)].tolist() == tgt.tolist()
        assert (labels[b, len(tgt):] == IGNORE_INDEX).all()
    again = ul2_batch(rows, IDS, np.random.default_rng(5))
    assert all(np.array_equal(a, b) for a, b in zip((ids, mask, labels), again))
    with pytest.raises(ValueError, match="more than the padded lengths"):
        ul2_batch(rows, IDS, np.random.default_rng(5), enc_len=5)


def test_prefix_lm_batch_middle_needs_no_padding():
    rows = np.arange(10, 10 + 3 * 9).reshape(3, 9)
    ids, mask, labels = prefix_lm_batch(rows)
    assert ids.shape == (3, 4) and labels.shape == (3, 5) and mask.all()
    assert np.array_equal(np.concatenate([ids, labels], axis=1), rows)
    ids, mask, labels = prefix_lm_batch(rows, np.random.default_rng(0))
    assert ids.shape == labels.shape == (3, 8)
    for b in range(3):
        n = int(mask[b].sum())
        assert np.concatenate([ids[b, :n], labels[b][labels[b] != IGNORE_INDEX]]).tolist() == rows[b].tolist()


def test_padded_batch_loss_equals_per_example_losses():
    """A tiny float64 T5Gemma: the padded batch's mean loss is the token-weighted mean of
    each example's loss computed alone, without padding. Negative control: dropping the
    attention mask (padding visible to the encoder) changes the loss."""
    g = preset("nano", vocab_size=320, num_hidden_layers=2)
    model = T5GemmaModel.random(T5GemmaConfig(g, g), seed=0, dtype="float64")
    rows = np.random.default_rng(1).integers(10, 200, size=(4, 20))
    ids, mask, labels = ul2_batch(rows, IDS, np.random.default_rng(2))
    loss, _ = model.loss_and_grads(ids, labels, mask)
    total, count = 0.0, 0
    for b in range(4):
        n_in, n_out = int(mask[b].sum()), int((labels[b] != IGNORE_INDEX).sum())
        lb, _ = model.loss_and_grads(ids[b:b + 1, :n_in], labels[b:b + 1, :n_out])
        total, count = total + lb * n_out, count + n_out
    assert abs(loss - total / count) < 1e-9 * abs(loss)
    unmasked, _ = model.loss_and_grads(ids, labels, np.ones_like(mask))
    assert abs(unmasked - loss) > 1e-6
