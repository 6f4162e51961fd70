"""The scores against hand-computed values, and the bootstrap against known cases.

Oracles: values worked out by hand in the comments; for the bootstrap, the normal
approximation of a proportion's interval on a large sample, a constant sample (an interval
of width 0), and two identical systems (a paired difference of exactly 0). Negative
control: an unpaired interval of two correlated systems is wider than the paired one.
"""

import numpy as np
import pytest

from minencdec.experiments import metrics as M


def test_accuracy_and_macro_f1_by_hand():
    gold = [0, 0, 1, 1, 2, 2]
    pred = [0, 1, 1, 1, 2, 0]
    assert M.accuracy(pred, gold) == 4 / 6
    # class 0: tp 1, fp 1, fn 1 -> 2/4; class 1: tp 2, fp 1, fn 0 -> 4/5; class 2: tp 1, fn 1 -> 2/3
    assert M.macro_f1(pred, gold, 3) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3, abs=1e-15)
    assert M.macro_f1([0, 0], [0, 0], 3) == 1.0                # classes 1 and 2 absent from both
    with pytest.raises(ValueError, match="same non-empty shape"):
        M.accuracy([1, 2], [1])


def test_chrf_by_hand():
    assert M.chrf("abc", "abc") == 100.0
    assert M.chrf("xyz", "abc") == 0.0
    # "ab" vs "abc": n=1: P = 2/2, R = 2/3; n=2: P = 1/1, R = 1/2; n >= 3: no hypothesis n-gram
    p, r = 1.0, (2 / 3 + 1 / 2) / 2
    assert M.chrf("ab", "abc") == pytest.approx(100 * 5 * p * r / (4 * p + r), abs=1e-12)
    assert M.chrf("a b", "ab") == 100.0                          # whitespace is not scored


def test_bootstrap_of_a_proportion_matches_the_normal_interval():
    x = (np.random.default_rng(1).random(4000) < 0.3).astype(float)
    p, lo, hi = M.bootstrap(x, samples=2000)
    half = 1.96 * np.sqrt(p * (1 - p) / len(x))
    assert lo == pytest.approx(p - half, abs=0.003) and hi == pytest.approx(p + half, abs=0.003)


def test_bootstrap_degenerate_and_paired_cases():
    assert M.bootstrap(np.full(50, 0.7)) == pytest.approx((0.7, 0.7, 0.7))
    a = np.random.default_rng(2).random(300)
    assert M.paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    b = a + 0.05 + np.random.default_rng(3).normal(0, 0.01, 300)   # b = a, shifted, a little noise
    d, lo, hi = M.paired_bootstrap(b, a)
    assert lo < d < hi and lo > 0.04 and hi < 0.06
    # Negative control: treating them as unpaired (resampling each alone) gives a far wider interval.
    _, ua, ub = M.bootstrap(b, seed=5)
    _, va, vb = M.bootstrap(a, seed=6)
    assert (ub - va) - (ua - vb) > 5 * (hi - lo)
    with pytest.raises(ValueError, match="same examples"):
        M.paired_bootstrap(a, a[:10])
