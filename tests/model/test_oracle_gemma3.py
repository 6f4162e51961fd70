"""The oracle for the Gemma 3 family: transformers' Gemma3ForCausalLM and
T5Gemma2ForConditionalGeneration made float64-exact (oracle_hf.py, hf_oracle.float64_exact),
the cases (cases.GEMMA3_CASES, T5GEMMA2_CASES) and their golden files (cases.GOLDEN_GEMMA3).

The independent float64 formulation they are held to is `reference_gemma3.py` (torch, written
from the models' definitions, sharing nothing with transformers or minencdec but torch's
primitives). Regenerate stale golden files with `python tests/golden/make_golden.py`.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

import cases
from helpers import assert_close
from reference_gemma3 import reference_run, rms_norm, rope

# As in test_oracle.py: two float64 formulations differ by a few ulps per op (~1e-14 here);
# a float32 island anywhere gives >= 1e-8. Gradients cancel more: a factor 10 more room.
RTOL_EXACT = 1e-13
RTOL_EXACT_GRAD = 1e-12
RTOL_GOLDEN = 1e-12          # golden file against a fresh live run: same code, same inputs
NEG_CONTROL = 1e-9           # an unpatched float32 island is at least this far off

STEMS = list(cases.GOLDEN_GEMMA3)


# --------------------------------------------------------------------------- comparing runs

def lm_run(config, params, x, **kw):
    """The oracle on a case's inputs, called as the golden files are made (run_golden)."""
    import oracle_hf
    from minencdec.model.config import T5GemmaConfig
    if isinstance(config, T5GemmaConfig):
        return oracle_hf.t5gemma2_run(config, params, x["input_ids"], x["labels"], x["attention_mask"], **kw)
    return oracle_hf.gemma3_run(config, params, x["input_ids"], x["labels"], x["attention_mask"], **kw)


def comparable(config, inputs):
    """Logits rows to compare. Gemma 3: non-pad positions (a left-padded causal query sees no
    key). T5Gemma 2 (no decoder mask: its pad ids are ordinary causal tokens): every row."""
    from minencdec.model.config import T5GemmaConfig
    if isinstance(config, T5GemmaConfig):
        return np.ones(inputs["labels"].shape, dtype=bool)
    return cases.valid_positions(inputs["attention_mask"])


def compare(name, config, got, want, inputs, rtol=RTOL_EXACT, rtol_grad=RTOL_EXACT_GRAD):
    rows = comparable(config, inputs)
    assert_close(f"{name} logits", got["logits"][rows], want["logits"][rows], rtol)
    if "encoder_out" in want and "encoder_out" in got:
        enc = cases.valid_positions(inputs["attention_mask"])
        assert_close(f"{name} encoder_out", got["encoder_out"][enc], want["encoder_out"][enc], rtol)
    assert_close(f"{name} loss", got["loss"], want["loss"], rtol)
    assert set(got["grads"]) == set(want["grads"]), "gradient names differ"
    for k in want["grads"]:
        assert_close(f"{name} grad {k}", got["grads"][k], want["grads"][k], rtol_grad)


# --------------------------------------------------------------------------- float64 exactness

@pytest.mark.parametrize("stem", STEMS)
def test_exact_oracle_matches_independent_float64(stem):
    """float64_exact transformers == the independent float64 formulation: logits, encoder
    output, loss and every gradient (eoi_embedding and the QK-norms included)."""
    pytest.importorskip("torch")
    _, config, params, x, _ = cases.golden_case(stem)
    compare(stem, config, lm_run(config, params, x), reference_run(config, params, x), x)


def test_t5gemma2_without_attention_mask_attends_to_every_token():
    """transformers' T5Gemma 2 derives no mask from pad ids: without attention_mask its pad
    tokens are attended to like any other (the reference run the same way agrees; the
    padding-masked run does not)."""
    pytest.importorskip("torch")
    import oracle_hf
    _, config, params, x, _ = cases.golden_case("t5gemma2_unequal_depth")
    got = oracle_hf.t5gemma2_run(config, params, x["input_ids"], x["labels"])
    assert_close("no mask logits", got["logits"], reference_run(config, params, x, attention_mask=False)["logits"],
                 RTOL_EXACT)
    padded = ~x["attention_mask"].all(-1)
    masked = reference_run(config, params, x)["logits"]
    assert np.all(np.abs(got["logits"] - masked).max(axis=(1, 2))[padded] > 1e-3)


@pytest.mark.parametrize("stem", ["gemma3_gqa_mixed", "t5gemma2_unequal_depth"])
def test_negative_control_unpatched_float64_differs(stem):
    """Without the patch, float64 transformers is float32-accurate only (> 1e-9 off), and
    the checker above rejects it. No padding here: unpatched, a fully masked row gives NaN."""
    pytest.importorskip("torch")
    _, config, params, x, _ = cases.golden_case(stem)
    x = {**x, "attention_mask": np.ones_like(x["attention_mask"]),
         "input_ids": np.where(x["input_ids"] == cases.PAD, 5, x["input_ids"])}
    exact, loose = lm_run(config, params, x), lm_run(config, params, x, exact=False)
    rel = np.max(np.abs(loose["logits"] - exact["logits"])) / np.max(np.abs(exact["logits"]))
    print(f"{stem}: unpatched vs patched float64 logits: max rel {rel:.2e}")
    assert rel > NEG_CONTROL
    with pytest.raises(AssertionError):
        compare("unpatched", config, loose, reference_run(config, params, x), x)


def test_each_float32_island_is_patched():
    """Module-level check of Gemma 3's and T5Gemma 2's islands: patched == a float64 formula
    to ~1e-15, unpatched float32-rounded (> 1e-9). Localises a failure of the tests above."""
    torch = pytest.importorskip("torch")
    import oracle_hf
    from transformers.models.gemma3 import modeling_gemma3 as g3
    from transformers.models.t5gemma2 import modeling_t5gemma2 as t52
    g = torch.Generator().manual_seed(0)

    def check(name, f, want):
        loose = f()
        with oracle_hf.float64_exact():
            exact = f()
        assert exact.dtype == torch.float64, name
        assert_close(f"{name} patched", exact.detach().numpy(), want.detach().numpy(), 1e-15)
        err = (loose - want).abs().max() / want.abs().max()
        assert err > NEG_CONTROL, f"{name}: unpatched error {err:.1e} -- is it still a float32 island?"

    x = torch.randn(2, 5, 16, dtype=torch.float64, generator=g)
    heads = torch.randn(2, 3, 5, 8, dtype=torch.float64, generator=g)      # a QK-norm's input
    for cls in (g3.Gemma3RMSNorm, t52.T5Gemma2RMSNorm):
        for inp in (x, heads):
            norm = cls(inp.shape[-1]).double()
            with torch.no_grad():
                norm.weight.normal_(0, 0.3, generator=g)
            check(f"{cls.__name__} {tuple(inp.shape)}", lambda: norm(inp), rms_norm(inp, norm.weight, norm.eps))
    # RoPE per layer type: the sliding layers' own base, the full layers' linear scaling.
    g3_config = oracle_hf.gemma3_hf_config(cases.GEMMA3_CASES["gqa_mixed"])          # full: 1e6, x 1/8
    t52_config = oracle_hf.t5gemma2_hf_config(cases.T5GEMMA2_CASES["unequal_depth"]).decoder   # x 1/4
    for cls, hf_config, ours in ((g3.Gemma3RotaryEmbedding, g3_config, cases.GEMMA3_CASES["gqa_mixed"]),
                                 (t52.T5Gemma2RotaryEmbedding, t52_config,
                                  cases.T5GEMMA2_CASES["unequal_depth"].decoder)):
        rot = cls(hf_config).double()
        pos = torch.arange(40)[None]
        q = torch.randn(1, 1, 40, hf_config.head_dim, dtype=torch.float64, generator=g)
        for layer_type, theta, scale in (("sliding_attention", ours.rope_local_base_freq, 1.0),
                                         ("full_attention", ours.rope_theta, ours.rope_scaling_factor)):
            check(f"{cls.__name__} {layer_type}",
                  lambda: g3.apply_rotary_pos_emb(q, q, *rot(q, pos, layer_type))[0], rope(q, theta, scale))
    for mod in (g3, t52):
        m = torch.nn.Module()
        m.num_key_value_groups, m.head_dim = 2, 16
        q = torch.randn(2, 4, 5, 16, dtype=torch.float64, generator=g)
        k = torch.randn(2, 2, 5, 16, dtype=torch.float64, generator=g)
        kk = k.repeat_interleave(2, dim=1)                   # GQA: 2 query heads per kv head
        want = torch.softmax(torch.einsum("bhtd,bhsd->bhts", q, kk) * 16**-0.5, dim=-1) @ kk
        check(f"{mod.__name__}.eager_attention_forward",
              lambda: mod.eager_attention_forward(m, q, k, k, None, scaling=16**-0.5)[0].transpose(1, 2),
              want)
    # Built in float32, then cast as `model.to(torch.float64)` does: the buffer holds sqrt(24)
    # rounded to float32. T5Gemma 2's then writes eoi_embedding (token 7) unscaled.
    ids = torch.tensor([[1, 7, 3], [7, 2, 0]])
    emb = g3.Gemma3TextScaledWordEmbedding(10, 24, 0, embed_scale=24**0.5).double()
    check("Gemma3TextScaledWordEmbedding", lambda: emb(ids), emb.weight[ids] * math.sqrt(24))
    emb2 = t52.T5Gemma2TextScaledWordEmbedding(10, 24, 0, embed_scale=24**0.5, eoi_token_index=7).double()
    with torch.no_grad():
        emb2.eoi_embedding.normal_(0, 1.0, generator=g)
    want = torch.where((ids == 7)[..., None], emb2.eoi_embedding, emb2.weight[ids] * math.sqrt(24))
    check("T5Gemma2TextScaledWordEmbedding", lambda: emb2(ids), want)


def test_patches_are_restored():
    """Every Gemma 3 / T5Gemma 2 place is patched inside float64_exact() and restored after it
    (also after an exception); the unpatched float64 result returns bit for bit."""
    pytest.importorskip("torch")
    import oracle_hf
    before = oracle_hf.patch_targets()
    new = [k for k in before if any(m in k for m in ("Gemma3", "gemma3", "T5Gemma2", "t5gemma2"))]
    assert len(new) == 8, new                # RMSNorm, RoPE, attention, embedding in each module
    _, config, params, x, _ = cases.golden_case("t5gemma2_global_cap")
    x = {**x, "attention_mask": np.ones_like(x["attention_mask"])}
    loose1 = lm_run(config, params, x, exact=False)["logits"]
    with oracle_hf.float64_exact():
        inside = oracle_hf.patch_targets()
        exact = lm_run(config, params, x, exact=False)["logits"]     # already inside the patch
    assert all(inside[k] is not before[k] for k in new)
    assert all(oracle_hf.patch_targets()[k] is before[k] for k in before)
    np.testing.assert_array_equal(loose1, lm_run(config, params, x, exact=False)["logits"])
    assert np.max(np.abs(exact - loose1)) > NEG_CONTROL * np.max(np.abs(exact))
    with pytest.raises(RuntimeError, match="boom"):
        with oracle_hf.float64_exact():
            raise RuntimeError("boom")
    assert all(oracle_hf.patch_targets()[k] is before[k] for k in before)


# --------------------------------------------------------------------------- cases

@pytest.mark.parametrize("stem", STEMS)
def test_param_shapes_equal_transformers(stem):
    """cases.py's name/shape lists (written from the checkpoint layout) == transformers'
    parameters (under minencdec's names) == minencdec's own list."""
    pytest.importorskip("torch")
    import oracle_hf
    from minencdec.model import gemma2, t5gemma
    kind, config, _, _, _ = cases.golden_case(stem)
    ours = t5gemma.param_shapes(config) if kind == "t5gemma2" else gemma2.param_shapes(config)
    assert cases.param_shapes(config) == oracle_hf.param_shapes_from_hf(config) == ours


def test_cases_cover_what_they_claim():
    """The coverage the case comments promise (no torch): GQA and MQA, head_dim != D/H,
    qpas != head_dim, windows shorter than the inputs, mixed and all-global layers, linear
    RoPE scaling, a final softcap set and unset, unequal depths, the eoi token inside the
    vocabulary and in the inputs, encoder padding, -100 labels, non-zero norms everywhere.
    Case names are unique across the four lists (case_config finds one by name)."""
    lists = (cases.GEMMA2_CASES, cases.T5GEMMA_CASES, cases.GEMMA3_CASES, cases.T5GEMMA2_CASES)
    assert len(set().union(*lists)) == sum(map(len, lists))
    stacks = list(cases.GEMMA3_CASES.values()) + [s for c in cases.T5GEMMA2_CASES.values()
                                                  for s in (c.encoder, c.decoder)]
    assert all(s.family == "gemma3" for s in stacks)
    assert any(s.num_key_value_heads == 1 for s in stacks)                               # MQA
    assert any(1 < s.num_key_value_heads < s.num_attention_heads for s in stacks)        # GQA
    assert any(s.head_dim != s.hidden_size // s.num_attention_heads for s in stacks)
    assert any(s.query_pre_attn_scalar != s.head_dim for s in stacks)
    assert any(s.sliding_window < 7 and "sliding_attention" in s.layer_types for s in stacks)
    assert any(len(set(s.layer_types)) == 2 for s in stacks)
    assert any(set(s.layer_types) == {"full_attention"} for s in stacks)
    assert any(s.rope_scaling_factor != 1.0 for s in stacks)
    assert {s.final_logit_softcapping is None for s in stacks} == {True, False}
    assert any(c.encoder.num_hidden_layers != c.decoder.num_hidden_layers for c in cases.T5GEMMA2_CASES.values())
    for stem in STEMS:
        kind, config, params, x, _ = cases.golden_case(stem)
        assert all(np.all(v != 0) for v in params.values()), stem
        norms = [k for k in params if k.endswith("norm.weight")]
        assert all(np.std(params[k]) > 0.05 for k in norms), stem
        assert any(k.endswith("q_norm.weight") for k in norms) and any(k.endswith("k_norm.weight") for k in norms)
        assert (x["labels"] == cases.IGNORE).any() and not x["attention_mask"].all(), stem
        if kind == "t5gemma2":
            eoi = config.eoi_token_index
            assert 0 < eoi < config.encoder.vocab_size and "model.encoder.embed_tokens.eoi_embedding" in params
            real = x["attention_mask"] == 1
            assert (x["input_ids"][real] == eoi).sum() >= 2 and (x["input_ids"][~real] == cases.PAD).all()
            assert (x["decoder_input_ids"] == eoi).sum() >= 2 and (x["labels"] == eoi).sum() >= 2
            np.testing.assert_array_equal(x["decoder_input_ids"], cases.shift_right(x["labels"]))


def test_final_softcaps_bite():
    """In the cases with a small final softcap, the pre-cap logits (recovered from the golden
    logits, z = cap * artanh(y / cap)) exceed twice the cap: the cap is far from linear."""
    for stem in ("gemma3_mqa_global", "t5gemma2_global_cap"):
        kind, config, _, _, _ = cases.golden_case(stem)
        cap = (config.decoder if kind == "t5gemma2" else config).final_logit_softcapping
        y = cases.load_golden(stem)[2]["logits"]
        z = cap * np.arctanh(np.clip(y / cap, -1 + 1e-16, 1 - 1e-16))
        assert np.abs(z).max() > 2 * cap, stem


# --------------------------------------------------------------------------- golden files

def test_golden_files_present_small_and_versioned():
    for stem, (kind, case, opts) in cases.GOLDEN_GEMMA3.items():
        path = cases.golden_path(stem)
        assert path.exists(), f"{path} missing: run `python tests/golden/make_golden.py`"
        assert path.stat().st_size < 300_000, f"{path.name}: {path.stat().st_size} bytes"
        meta = cases.golden_metadata(stem)
        assert meta["format_version"] == cases.GOLDEN_FORMAT_VERSION
        assert (meta["case"], meta["kind"], json.loads(meta["options"])) == (case, kind, opts)
        assert meta["transformers_version"] and meta["torch_version"]


def test_make_golden_keeps_files_only_for_noise():
    """make_golden.py rewrites a file unless its parameters and inputs are identical and its
    outputs within KEEP_RTOL (a rerun's reduction-order noise) of the stored ones."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_golden", cases.GOLDEN_DIR / "make_golden.py")
    make_golden = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_golden)
    same = make_golden._same
    a = np.linspace(-3.0, 3.0, 12).reshape(3, 4)
    assert same("logits", a, a + 1e-15) and same("param.w", a, a.copy())
    assert not same("logits", a, a + 1e-12)                 # a real change of an output
    assert not same("param.w", a, np.nextafter(a, 9))        # parameters: bit for bit
    assert not same("input_ids", np.arange(3), np.arange(3) + 1)
    assert not same("logits", a, a.astype(np.float32).astype(np.float64)[:2])


@pytest.mark.parametrize("stem", STEMS)
def test_golden_matches_cases(stem):
    """Stored params, inputs and config == what cases.py generates now (no torch needed)."""
    kind, config, params, inputs, opts = cases.golden_case(stem)
    g_params, g_inputs, g_out = cases.load_golden(stem)
    assert json.loads(cases.golden_metadata(stem)["config"]) == json.loads(cases.config_json(config)), \
        f"{stem}: config changed; run `python tests/golden/make_golden.py`"
    assert set(g_params) == set(params) and set(g_inputs) == set(inputs)
    for k in params:
        np.testing.assert_array_equal(g_params[k], params[k], err_msg=f"{stem} param {k}")
    for k in inputs:
        np.testing.assert_array_equal(g_inputs[k], inputs[k], err_msg=f"{stem} input {k}")
    assert set(g_out["grads"]) == set(params)
    assert np.isfinite(g_out["loss"]) and np.all(np.isfinite(g_out["logits"]))


@pytest.mark.parametrize("stem", STEMS)
def test_golden_matches_live_oracle(stem):
    """A fresh live run on the stored params/inputs reproduces the stored outputs."""
    pytest.importorskip("torch")
    import oracle_hf
    kind, case, opts = cases.GOLDEN_GEMMA3[stem]
    params, inputs, want = cases.load_golden(stem)
    got = oracle_hf.run_golden(kind, cases.case_config(case), params, inputs, opts)
    assert_close(f"{stem} logits", got["logits"], want["logits"], RTOL_GOLDEN)
    assert_close(f"{stem} loss", got["loss"], want["loss"], RTOL_GOLDEN)
    if "encoder_out" in want:
        assert_close(f"{stem} encoder_out", got["encoder_out"], want["encoder_out"], RTOL_GOLDEN)
    assert set(got["grads"]) == set(want["grads"])
    for k in want["grads"]:
        assert_close(f"{stem} grad {k}", got["grads"][k], want["grads"][k], RTOL_GOLDEN)
