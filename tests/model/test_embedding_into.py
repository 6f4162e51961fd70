"""layers.embedding_backward_into: a tied table's lookups added into the gradient another use
already made (the LM head's, the other stack's), in place, against embedding_backward's
fresh array plus that gradient. The pad row gets nothing from its lookups (nn.Embedding's
padding_idx), repeated ids add up. Negative control: adding the pad row's lookups is caught."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minencdec.model import layers as L


@given(st.integers(1, 3), st.integers(1, 9), st.integers(2, 12), st.integers(1, 6), st.integers(0, 2**32 - 1),
       st.sampled_from([None, 0]))
def test_into_equals_fresh_plus_existing(B, T, V, D, seed, pad):
    rng = np.random.default_rng(seed)
    table = rng.standard_normal((V, D))
    ids = rng.integers(0, V, (B, T))
    _, cache = L.embedding_forward(ids, table, pad)
    dh = rng.standard_normal((B, T, D))
    existing = rng.standard_normal((V, D))
    want = existing + L.embedding_backward(dh, cache)
    got = existing.copy()
    assert L.embedding_backward_into(got, dh, cache) is None      # in place
    np.testing.assert_allclose(got, want, rtol=1e-13, atol=1e-13)


def test_negative_control_pad_lookups_would_show():
    table = np.ones((4, 2))
    ids = np.array([[0, 0, 3]])
    _, cache = L.embedding_forward(ids, table, 0)
    dh = np.ones((1, 3, 2))
    got = np.zeros((4, 2))
    L.embedding_backward_into(got, dh, cache)
    assert np.all(got[0] == 0) and np.all(got[3] == np.sqrt(2.0))  # dh times the embedding's scale sqrt(D)
    unpadded = np.zeros((4, 2))
    L.embedding_backward_into(unpadded, dh, L.embedding_forward(ids, table, None)[1])
    with pytest.raises(AssertionError):
        np.testing.assert_array_equal(unpadded, got)
