"""The backend switch: whole models on the fast path (backend="numba") against the reference.

The oracle is the NumPy reference itself (backend="numpy"), which tests/model/test_models.py ties to
transformers and to finite differences. Here every entry point runs twice on the same weights
and inputs: logits, the training loss and every parameter's gradient, the classifier, greedy
generation with its KV cache (decode-step kernel) and the T5Gemma encoder; then Gemma 3 and
T5Gemma 2 (QK-norm, the "t5gemma2" encoder window, merged attention), which must also run on
the kernels rather than fall back to the reference. Lengths past the kernels' 64-wide tiles
are included so the tiling is exercised inside a model, not only in
tests/fastpath/test_fastpath.py. Negative controls swap one fast kernel for a slightly wrong one.
"""

import dataclasses
import os
import subprocess
import sys

import numpy as np
import pytest

import cases
from helpers import RTOL_F32, RTOL_F64, assert_close
from minencdec.model import attention, backend, gemma2, generate, t5gemma
from minencdec.model.classify import Classifier
from minencdec.model.config import FULL, SLIDING, T5GemmaConfig, gemma3_config

CASES = list(cases.GEMMA2_CASES) + list(cases.T5GEMMA_CASES)


def long_config(config):
    """The case's config with room for 150 positions (the cases cap them at 64)."""
    if isinstance(config, T5GemmaConfig):
        return T5GemmaConfig(long_config(config.encoder), long_config(config.decoder))
    return config.replace(max_position_embeddings=256)


def model_pair(case, dtype, long=False):
    config = cases.case_config(case)
    if long:
        config = long_config(config)
    params = cases.case_params(case)
    cls = t5gemma.T5GemmaModel if case in cases.T5GEMMA_CASES else gemma2.Gemma2Model
    return cls(config, params, dtype, "numpy"), cls(config, params, dtype, "numba")


def inputs_for(case, long):
    config = cases.case_config(case)
    if not long:
        return cases.case_inputs(case)
    return cases.random_inputs(config, cases.case_seed(case) + 2, B=2, T=150, S=131)   # 3 and 2-3 tiles


def run(model, inputs):
    """Logits, loss and gradients of one model on a case's inputs."""
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    if isinstance(model, t5gemma.T5GemmaModel):
        logits = model.logits(ids, inputs["decoder_input_ids"], mask, inputs["decoder_attention_mask"])
    else:
        logits = model.logits(ids, mask)
    loss, grads = model.loss_and_grads(ids, labels, mask)
    return logits, loss, grads


def check_same(fast, ref, inputs, rtol):
    """The fast model's logits (at real tokens), loss and every gradient equal the reference's."""
    (lf, loss_f, gf), (lr, loss_r, gr) = run(fast, inputs), run(ref, inputs)
    real = cases.valid_positions(inputs.get("decoder_attention_mask", inputs["attention_mask"]))
    assert_close("logits", lf[real], lr[real], rtol)
    assert_close("loss", loss_f, loss_r, rtol)
    assert sorted(gf) == sorted(gr)
    # Each tensor is held to its own scale, except one the reference makes exactly 0: with a
    # window of 1 a query sees only itself, its softmax weight is exactly 1 and q_proj, k_proj
    # get no gradient; the fast path's weight exp(s - lse) is 1 only within rounding, so it
    # sends back ~1e-17. Such a tensor is held to the scale of all the gradients instead.
    scale = max(float(np.max(np.abs(g))) for g in gr.values())
    for name in gr:
        assert_close(name, gf[name], gr[name], rtol, atol=rtol * scale if not np.any(gr[name]) else 0.0)


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
@pytest.mark.parametrize("case", CASES)
def test_fast_model_equals_reference_float64(case, long):
    ref, fast = model_pair(case, "float64", long)
    check_same(fast, ref, inputs_for(case, long), RTOL_F64)


@pytest.mark.parametrize("case", ["gqa_odd", "unbalanced"])
def test_fast_model_equals_reference_float32(case):
    """float32 against float32: the two sum in different orders (tiles, fused passes), so
    they differ by rounding, which RTOL_F32 (module helpers) bounds."""
    ref, fast = model_pair(case, "float32", long=True)
    check_same(fast, ref, inputs_for(case, True), RTOL_F32)


@pytest.mark.parametrize("kind,case", [("gemma2", "gqa_odd"), ("t5gemma", "unbalanced")])
def test_fast_classifier_equals_reference(kind, case):
    config = cases.case_config(case)
    stack = config.encoder if kind == "t5gemma" else config
    params = cases.case_params(case, cases.NUM_LABELS, is_encoder_decoder=False)
    inputs = cases.case_inputs(case, cases.NUM_LABELS)
    out = {}
    for name in backend.BACKENDS:
        model = Classifier(kind, stack, params, cases.NUM_LABELS, "float64", name)
        out[name] = (model.logits(inputs["input_ids"], inputs["attention_mask"]),
                     *model.loss_and_grads(inputs["input_ids"], inputs["labels"], inputs["attention_mask"]))
    (lf, loss_f, gf), (lr, loss_r, gr) = out["numba"], out["numpy"]
    assert_close("logits", lf, lr, RTOL_F64)
    assert_close("loss", loss_f, loss_r, RTOL_F64)
    for name in gr:
        assert_close(name, gf[name], gr[name], RTOL_F64)


@pytest.mark.parametrize("case", ["gqa_odd", "mixed_types", "unbalanced", "mqa_caps"])
def test_fast_generation_equals_reference(case):
    """Greedy tokens and every step's logits, with left padding (decoder-only) or encoder
    padding, past the sliding windows: the decode-step kernel and the sliding cache."""
    ref, fast = model_pair(case, "float64")
    rng = np.random.default_rng(5)
    ids = rng.integers(cases.FIRST_ID, 48, (2, 9))
    mask = np.ones_like(ids)
    if case in cases.T5GEMMA_CASES:
        mask[1, 6:] = 0                                  # encoder padding at the end of row 1
    else:
        mask[1, :3] = 0                                  # left padding
    ids = np.where(mask == 1, ids, cases.PAD)
    steps = {}
    for model in (ref, fast):
        state, logits = generate.start(model, ids, mask)
        seen = [logits]
        for _ in range(12):
            seen.append(generate.step(state, np.argmax(seen[-1], axis=-1)))
        steps[model.backend] = np.stack(seen)
    assert_close("step logits", steps["numba"], steps["numpy"], RTOL_F64)
    assert np.array_equal(generate.generate(fast, ids, 12, mask, eos_token_id=-1),
                          generate.generate(ref, ids, 12, mask, eos_token_id=-1))


def test_encoder_output_equal():
    ref, fast = model_pair("balanced", "float64", long=True)
    inputs = inputs_for("balanced", True)
    assert_close("encoder output", fast.encode(inputs["input_ids"], inputs["attention_mask"]),
                 ref.encode(inputs["input_ids"], inputs["attention_mask"]), RTOL_F64)


# --------------------------------------------------------------------------- Gemma 3 and T5Gemma 2


def _g3(**kw):
    return gemma3_config(**{"vocab_size": 64, "max_position_embeddings": 256, **kw})


EOI = 5                                          # T5Gemma 2's eoi token in these cases (a real id, < vocab)
# Windows below and above the 64-wide tiles, both below T = 150 and S = 131 (long inputs) and
# above the short ones; the encoders use the "t5gemma2" rule (odd and even windows).
GEMMA3_CASES = {
    # Gemma 3 decoder-only: GQA 4/2, head_dim 8 != D/H, qpas 12, sliding/full/sliding, window 70.
    "gemma3": _g3(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=70,
                  layer_types=(SLIDING, FULL, SLIDING)),
    # T5Gemma 2: encoder window 8 (even: one more key to the right); a deeper MQA decoder, window 5,
    # with a final softcap that bites (Gemma 3 has no attention softcap: model/config.py; the
    # kernels' capped merged attention is held to the reference in tests/fastpath).
    "t5gemma2": T5GemmaConfig(
        _g3(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, query_pre_attn_scalar=8, sliding_window=8, layer_types=(SLIDING, FULL)),
        _g3(hidden_size=16, intermediate_size=24, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            head_dim=6, query_pre_attn_scalar=6, sliding_window=5, layer_types=(SLIDING, SLIDING, FULL),
            final_logit_softcapping=10.0),
        eoi_token_index=EOI),
    # T5Gemma 2 with windows past a tile: encoder 65 (odd), decoder 70; GQA 4/2 on both sides.
    "t5gemma2_wide": T5GemmaConfig(
        _g3(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, sliding_window=65, layer_types=(SLIDING, SLIDING)),
        _g3(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, sliding_window=70, layer_types=(SLIDING, FULL)),
        eoi_token_index=EOI),
}


def gemma3_pair(case, dtype):
    """The reference and the fast model on the same random weights; every norm weight (the
    QK-norms included) and eoi_embedding random, non-zero (cases.random_params)."""
    config = GEMMA3_CASES[case]
    family = t5gemma if isinstance(config, T5GemmaConfig) else gemma2
    cls = t5gemma.T5GemmaModel if family is t5gemma else gemma2.Gemma2Model
    params = cases.random_params(family.param_shapes(config), cases.case_seed(case))
    return cls(config, params, dtype, "numpy"), cls(config, params, dtype, "numba")


def gemma3_inputs(case, long):
    """cases.random_inputs (rows padded on the right, on the left, not at all); T5Gemma 2's
    encoder inputs hold the eoi token at two real positions of each row."""
    config = GEMMA3_CASES[case]
    inputs = cases.random_inputs(config, cases.case_seed(case) + 1, **(dict(B=2, T=150, S=131) if long else {}))
    if isinstance(config, T5GemmaConfig):
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        for row in range(len(ids)):
            real = np.flatnonzero(mask[row])
            ids[row, real[[1, -2]]] = EOI
    return inputs


@pytest.mark.parametrize("long", [False, True], ids=["short", "long"])
@pytest.mark.parametrize("case", list(GEMMA3_CASES))
def test_gemma3_family_fast_equals_reference_float64(case, long):
    ref, fast = gemma3_pair(case, "float64")
    check_same(fast, ref, gemma3_inputs(case, long), RTOL_F64)


@pytest.mark.parametrize("case", list(GEMMA3_CASES))
def test_gemma3_family_fast_equals_reference_float32(case):
    ref, fast = gemma3_pair(case, "float32")
    check_same(fast, ref, gemma3_inputs(case, True), RTOL_F32)


def _forbid_reference(monkeypatch):
    """Make the reference's attention (block and softmax), RMSNorm and MLP raise if the numba
    backend falls back to them."""
    import fastpath.mlp
    import fastpath.norm

    def refuse(name):
        def fail(*args, **kwargs):
            raise AssertionError(f"the numba backend fell back to the reference's {name}")
        return fail
    monkeypatch.setattr(attention, "attention_forward_masked", refuse("attention"))
    monkeypatch.setattr(attention, "attention_backward", refuse("attention backward"))
    monkeypatch.setattr(attention, "attention_block_forward", refuse("attention block"))
    monkeypatch.setattr(attention, "attention_block_backward", refuse("attention block backward"))
    for name in ("rmsnorm_forward", "rmsnorm_backward"):
        monkeypatch.setattr(fastpath.norm.reference, name, refuse(name))
    for name in ("mlp_forward", "mlp_backward"):
        monkeypatch.setattr(fastpath.mlp.reference, name, refuse(name))


@pytest.mark.parametrize("case", ["gqa_odd", "unbalanced"])
def test_gemma2_family_runs_on_the_kernels(case, monkeypatch):
    """The fused attention block, dense and tiled attention, MLP and norms: no fallback to
    the reference (float32 and float64, short and long)."""
    for dtype in ("float32", "float64"):
        _, fast = model_pair(case, dtype, long=True)
        for long in (False, True):
            with monkeypatch.context() as m:
                _forbid_reference(m)
                run(fast, inputs_for(case, long))


@pytest.mark.parametrize("case", ["gemma3", "t5gemma2"])
def test_gemma3_family_runs_on_the_kernels(case, monkeypatch):
    """Merged attention, the "t5gemma2" window and the QK-norm run in the fast kernels (in
    float32 and float64): the reference's attention and RMSNorm are never called. The spy
    does see the numba backend's fallbacks: a mask given as an array, a float16 norm."""
    models = {dtype: gemma3_pair(case, dtype)[1] for dtype in ("float32", "float64")}
    inputs = gemma3_inputs(case, True)
    _forbid_reference(monkeypatch)
    for fast in models.values():
        run(fast, inputs)
    kern, x = backend.kernels("numba"), np.ones((1, 2, 3, 4))
    with pytest.raises(AssertionError, match="fell back to the reference's attention"):
        kern.attention_forward(x, x, x, np.ones((1, 3, 3), bool), 0.5, None)
    with pytest.raises(AssertionError, match="fell back to the reference's rmsnorm_forward"):
        kern.rmsnorm_forward(x.astype(np.float16), np.zeros(4, np.float16), 1e-6)


# --------------------------------------------------------------------------- negative controls


def _broken(monkeypatch, **replace):
    """Make backend="numba" use the fast kernels with some of them replaced."""
    monkeypatch.setattr(backend, "_numba", dataclasses.replace(backend.kernels("numba"), **replace))


def test_negative_control_attention_without_window_fails(monkeypatch):
    attend = backend.kernels("numba").attention_forward
    _broken(monkeypatch, attention_forward=lambda q, k, v, mask, scale, cap, **kw:
            attend(q, k, v, mask._replace(window=None), scale, cap, **kw))
    ref, fast = model_pair("gqa_odd", "float64")
    with pytest.raises(AssertionError):
        check_same(fast, ref, inputs_for("gqa_odd", False), RTOL_F64)


def test_negative_control_lm_head_without_softcap_fails(monkeypatch):
    head = backend.kernels("numba").lm_head_loss_forward
    _broken(monkeypatch, lm_head_loss_forward=lambda h, table, targets, cap: head(h, table, targets, None))
    ref, fast = model_pair("small_caps", "float64")
    with pytest.raises(AssertionError):
        check_same(fast, ref, inputs_for("small_caps", False), RTOL_F64)


def test_negative_control_decode_step_ignoring_padding_fails(monkeypatch):
    decode = backend.kernels("numba").decode_attention
    _broken(monkeypatch, decode_attention=lambda q, k, v, mask, scale, cap:
            decode(q, k, v, mask._replace(key_mask=None), scale, cap))
    with pytest.raises(AssertionError):
        test_fast_generation_equals_reference("gqa_odd")


# --------------------------------------------------------------------------- the switch itself


def test_unknown_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        gemma2.Gemma2Model.random(cases.case_config("gqa_odd"), backend="torch")


def test_load_pretrained_takes_the_backend(tmp_path):
    from minencdec import load_pretrained
    ref, _ = model_pair("unbalanced", "float64")
    ref.save_pretrained(tmp_path / "m")
    fast = load_pretrained(tmp_path / "m", "float64", backend="numba")
    assert fast.backend == "numba" and load_pretrained(tmp_path / "m", "float64").backend == "numpy"
    inputs = cases.case_inputs("unbalanced")
    assert_close("logits", fast.logits(inputs["input_ids"], inputs["decoder_input_ids"]),
                 ref.logits(inputs["input_ids"], inputs["decoder_input_ids"]), RTOL_F64)


def test_fast_path_runs_with_jit_disabled():
    """NUMBA_DISABLE_JIT=1 runs the kernels as plain Python (steppable in a debugger): still
    the reference's numbers."""
    code = ("import cases, numpy as np\n"
            "from test_backend import model_pair, inputs_for, check_same, gemma3_pair, gemma3_inputs\n"
            "from helpers import RTOL_F64\n"
            "ref, fast = model_pair('mqa_caps', 'float64')\n"
            "check_same(fast, ref, inputs_for('mqa_caps', False), RTOL_F64)\n"
            "ref, fast = gemma3_pair('t5gemma2', 'float64')\n"
            "check_same(fast, ref, gemma3_inputs('t5gemma2', False), RTOL_F64)\n"
            "import numba; assert numba.config.DISABLE_JIT\n"
            "print('jit-free fast path OK')\n")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [here, os.path.dirname(here),       # this folder, tests/
                                                       os.path.dirname(os.path.dirname(here)),   # the repository
                                                       os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "jit-free fast path OK" in result.stdout
