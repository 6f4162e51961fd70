"""Saving a training checkpoint must not hold a second copy of the optimizer's moments (for the
demo's T5Gemma 2 that copy was 1.7 GB, twice: once as a copy of m and v, once as the bytes of
their safetensors file, which made each save the run's peak).

tracemalloc sees NumPy's allocations, so a save's peak is measured directly; the oracle is
arithmetic (the moments' own bytes), the file is read back with the safetensors library, and
the negative control shows the same measurement seeing one full copy of the moments.
"""

import tracemalloc

import numpy as np
from safetensors.numpy import load_file

from minencdec.model.config import GemmaConfig
from minencdec.model.gemma2 import Gemma2Model
from minencdec.training.optim import AdamW
from minencdec.training.train import OPTIMIZER_FILE, TrainConfig, save_checkpoint

# 8 layers of 256 x 1024 matrices: ~33 MB of weights in float32, 67 MB of moments, no tensor
# over ~1 MB, so a streamed save stays far below one copy of the moments.
CONFIG = GemmaConfig(vocab_size=512, hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64)


def peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def trained_one_step():
    model = Gemma2Model.random(CONFIG, seed=0, dtype="float32")
    opt = AdamW(model.params, lr=1e-3)
    rng = np.random.default_rng(0)
    opt.step({k: rng.standard_normal(v.shape).astype(v.dtype) for k, v in model.params.items()})
    return model, opt


def test_a_save_streams_the_optimizer_state(tmp_path):
    model, opt = trained_one_step()
    moments = sum(s[k].nbytes for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    cfg = TrainConfig(steps=10, warmup_steps=1)
    peak = peak_bytes(lambda: save_checkpoint(tmp_path, model, opt, 1, cfg, []))
    print(f"save peak {peak / 1e6:.1f} MB against {moments / 1e6:.1f} MB of moments")
    assert peak < 0.25 * moments, f"the save held {peak / moments:.2f} x the moments"
    saved = load_file(tmp_path / "checkpoint" / OPTIMIZER_FILE)       # the library's own reader
    assert set(saved) == {f"{k}/{n}" for n in opt.state for k in ("exp_avg", "exp_avg_sq")}
    for name, s in opt.state.items():
        for k in ("exp_avg", "exp_avg_sq"):
            assert saved[f"{k}/{name}"].dtype == s[k].dtype
            np.testing.assert_array_equal(saved[f"{k}/{name}"], s[k])


def test_the_measurement_sees_a_copy_of_the_moments():
    """Negative control: the copying state_dict (what a save used to take) measures one copy."""
    _, opt = trained_one_step()
    moments = sum(s[k].nbytes for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert peak_bytes(lambda: opt.state_dict()) > 0.95 * moments
