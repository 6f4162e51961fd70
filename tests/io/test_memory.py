"""Loading must not hold two full copies of the weights (a 2B model is 10 GB in float32).

tracemalloc sees NumPy's allocations, so the peak of a load is measured directly. The
oracle is arithmetic: the model's own bytes. A loader that kept the raw bytes of every
tensor and then converted (two copies) would peak at about twice that.
"""

import tracemalloc

import numpy as np

from minencdec.model import gemma2
from minencdec.model.config import GemmaConfig
from minencdec.io.pretrained import load_pretrained

# 8 layers of 256 x 1024 matrices: ~33 MB in float32, no tensor larger than ~1 MB, so
# "one copy plus one tensor" is clearly below 1.2 copies.
CONFIG = GemmaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64)


def peak_bytes(fn):
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_loading_holds_one_copy(tmp_path):
    gemma2.Gemma2Model.random(CONFIG, seed=0, dtype="float32").save_pretrained(tmp_path / "m")
    model_bytes = sum(a.nbytes for a in gemma2.init_params(CONFIG).values())
    for saved, load_as, copies in [("float32", "float32", 1.0), ("bfloat16", "float32", 1.0),
                                   ("float32", "float64", 2.0)]:  # float64 is twice the bytes by itself
        gemma2.Gemma2Model.random(CONFIG, seed=0).save_pretrained(tmp_path / saved, dtype=saved)
        model, peak = peak_bytes(lambda: load_pretrained(tmp_path / saved, load_as))
        ratio = peak / (model_bytes * copies)
        print(f"saved {saved}, loaded {load_as}: peak {peak / 1e6:.1f} MB = {ratio:.2f} x the loaded model")
        assert ratio < 1.2, f"loading held {ratio:.2f} copies of the weights"
        assert sum(a.nbytes for a in model.params.values()) == model_bytes * copies


def test_the_measurement_sees_a_second_copy():
    """Negative control: a load that copies everything once more must measure ~2 copies."""
    params = gemma2.init_params(CONFIG)
    model_bytes = sum(a.nbytes for a in params.values())

    def load_twice():
        raw = {k: v.copy() for k, v in params.items()}           # "read every tensor's bytes" ...
        return {k: v.copy() for k, v in raw.items()}             # ... then convert them all

    _, peak = peak_bytes(load_twice)
    assert peak / model_bytes > 1.8
