"""Whole models against independent oracles.

1. transformers (eager, float64 made exact by oracle_hf.float64_exact): live when torch is
   installed, and from the committed golden files always. Logits (at non-pad positions),
   loss and every gradient within RTOL_F64.
2. Finite differences in float64 on every parameter tensor of every case.
3. float32: our float32 model against transformers' own float32 model.
Negative controls show each comparison fails on a slightly wrong model.
"""

import numpy as np
import pytest

import cases
from helpers import RTOL_F32, RTOL_F64, assert_close, gradcheck
from minencdec.model import gemma2, stack, t5gemma
from minencdec.model.classify import Classifier

# T5Gemma's encoder-decoder classification mode is not implemented (the paper pools the
# encoder; the README says so), so its golden file is not compared here.
STEMS = [s for s in cases.GOLDEN if s != "cls_t5gemma_encdec_balanced"]


def build(kind, config, params, dtype="float64"):
    if kind == "gemma2":
        return gemma2.Gemma2Model(config, params, dtype)
    if kind == "t5gemma":
        return t5gemma.T5GemmaModel(config, params, dtype)
    if kind == "gemma2_classify":
        return Classifier("gemma2", config, params, cases.NUM_LABELS, dtype)
    return Classifier("t5gemma", config.encoder, params, cases.NUM_LABELS, dtype)


def run_ours(kind, model, inputs):
    """Our logits, loss and gradients on a case's inputs (the oracle's calling convention)."""
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    if kind == "t5gemma":
        logits = model.logits(ids, inputs["decoder_input_ids"], mask, inputs["decoder_attention_mask"])
    else:
        logits = model.logits(ids, mask)
    loss, grads = model.loss_and_grads(ids, labels, mask)
    return {"logits": logits, "loss": loss, "grads": grads}


def oracle(stem, source):
    """(kind, config, params, inputs, outputs) from a golden file or a live transformers run."""
    kind, config, params, inputs, opts = cases.golden_case(stem)
    if source == "golden":
        params, inputs, outputs = cases.load_golden(stem)
        return kind, config, params, inputs, outputs
    pytest.importorskip("torch")
    import oracle_hf
    run = {"gemma2": oracle_hf.gemma2_run, "t5gemma": oracle_hf.t5gemma_run,
           "gemma2_classify": oracle_hf.gemma2_classify_run,
           "t5gemma_classify": oracle_hf.t5gemma_classify_run}[kind]
    extra = {k: v for k, v in inputs.items() if k.startswith("decoder_")}
    if kind.endswith("classify"):
        extra = dict(num_labels=opts["num_labels"], **({"is_encoder_decoder": False} if kind == "t5gemma_classify" else {}))
    return kind, config, params, inputs, run(config, params, inputs["input_ids"], inputs["labels"],
                                             inputs["attention_mask"], **extra)


def comparable(kind, inputs):
    """Which logits rows to compare: outputs at padding positions are implementation-defined."""
    if kind == "gemma2":
        return cases.valid_positions(inputs["attention_mask"])
    if kind == "t5gemma":
        return cases.valid_positions(inputs["decoder_attention_mask"])
    return slice(None)


def compare(kind, ours, want, inputs, rtol=RTOL_F64):
    rows = comparable(kind, inputs)
    assert_close("logits", ours["logits"][rows], want["logits"][rows], rtol)
    assert_close("loss", ours["loss"], want["loss"], rtol)
    assert set(ours["grads"]) == set(want["grads"]), "gradient names differ"
    for name in want["grads"]:
        assert_close(f"grad {name}", ours["grads"][name], want["grads"][name], rtol)


@pytest.mark.parametrize("source", ["golden", "live"])
@pytest.mark.parametrize("stem", STEMS)
def test_matches_transformers_float64(stem, source):
    kind, config, params, inputs, want = oracle(stem, source)
    compare(kind, run_ours(kind, build(kind, config, params), inputs), want, inputs)


def test_comparison_catches_a_tiny_error():
    """Negative control: one RMSNorm weight moved by 1e-7 must fail the comparison."""
    kind, config, params, inputs, want = oracle("gemma2_gqa_odd", "golden")
    params = dict(params)
    name = "model.layers.1.post_feedforward_layernorm.weight"
    params[name] = params[name] + 1e-7
    with pytest.raises(AssertionError):
        compare(kind, run_ours(kind, build(kind, config, params), inputs), want, inputs)


@pytest.mark.parametrize("stem", ["gemma2_gqa_odd", "gemma2_small_caps", "t5gemma_unbalanced", "t5gemma_mqa_caps"])
def test_float32_matches_transformers_float32(stem):
    """Our float32 model against transformers' unpatched float32 model (logits)."""
    pytest.importorskip("torch")
    import oracle_hf
    kind, config, params, inputs, _ = cases.golden_case(stem)
    model = build(kind, config, params, "float32")
    if kind == "gemma2":
        ours = model.logits(inputs["input_ids"], inputs["attention_mask"])
        want = oracle_hf.gemma2_run(config, params, inputs["input_ids"], None, inputs["attention_mask"],
                                    dtype="float32", exact=False)
    else:
        ours = model.logits(inputs["input_ids"], inputs["decoder_input_ids"], inputs["attention_mask"],
                            inputs["decoder_attention_mask"])
        want = oracle_hf.t5gemma_run(config, params, inputs["input_ids"], None, inputs["attention_mask"],
                                     inputs["decoder_input_ids"], inputs["decoder_attention_mask"],
                                     dtype="float32", exact=False)
    assert ours.dtype == np.float32
    _, grads = model.loss_and_grads(inputs["input_ids"], inputs["labels"], inputs["attention_mask"])
    assert all(g.dtype == np.float32 for g in grads.values()), "a float32 backward must stay float32"
    rows = comparable(kind, inputs)
    assert_close("float32 logits", ours[rows], want["logits"][rows], RTOL_F32)


@pytest.mark.parametrize("stem", STEMS)
def test_every_parameter_against_finite_differences(stem):
    kind, config, params, inputs, _ = cases.golden_case(stem)
    model = build(kind, config, params)
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    _, grads = model.loss_and_grads(ids, labels, mask)
    rng = np.random.default_rng(0)
    for name, array in model.params.items():                     # the model's own arrays, nudged in place
        gradcheck(name, lambda: model.loss_and_grads(ids, labels, mask)[0], array, grads[name], rng, samples=4)


def test_tied_embedding_receives_both_gradients():
    """The embedding's gradient is the lookup part plus the LM-head part (each checked alone)."""
    kind, config, params, inputs, _ = cases.golden_case("gemma2_gqa_odd")
    model = build(kind, config, params)
    ids, mask, labels = inputs["input_ids"], inputs["attention_mask"], inputs["labels"]
    _, grads = model.loss_and_grads(ids, labels, mask)
    logits, cache = gemma2.forward(model.params, config, ids, mask)
    from minencdec.model.losses import cross_entropy_backward, cross_entropy_forward
    dlogits = cross_entropy_backward(cross_entropy_forward(logits, gemma2.shift_labels(labels))[1])
    _, head_part = stack.lm_head_backward(dlogits, cache[1])
    assert np.abs(head_part).max() > 0
    lookup_part = grads[gemma2.EMBED] - head_part
    assert np.abs(lookup_part).max() > 0
    unused = np.setdiff1d(np.arange(config.vocab_size), ids)     # rows no input token reads
    assert np.all(lookup_part[unused] == 0)


# ---------------------------------------------------------------------------- bad input

def small_model():
    kind, config, params, _, _ = cases.golden_case("gemma2_gqa_odd")
    return build(kind, config, params)


@pytest.mark.parametrize("call,message", [
    (lambda m: m.logits([[1, 2, 64]]), r"token id 64 at \(0, 2\) is outside the vocabulary \[0, 64\)"),
    (lambda m: m.logits([[1, -1]]), "outside the vocabulary"),
    (lambda m: m.logits([[0.5, 1.0]]), "must be integer token ids"),
    (lambda m: m.logits(np.zeros((1, 0), int)), "length >= 1"),
    (lambda m: m.logits([[1, 2, 3]], attention_mask=[[1, 1]]), r"attention_mask has shape \(1, 2\)"),
    (lambda m: m.logits([[1, 2, 3]], attention_mask=[[1, 2, 1]]), "only 0 and 1"),
    (lambda m: m.loss_and_grads([[1, 2, 3]], [[1, 2]]), r"labels have shape \(1, 2\), expected \(1, 3\)"),
    (lambda m: m.loss_and_grads([[1, 2, 3]], [[1, 2, 99]]), "neither -100 nor in"),
    (lambda m: m.loss_and_grads([[1, 2, 3]], [[5, -100, -100]]), "every target is -100"),
])
def test_bad_input_is_named(call, message):
    with pytest.raises(ValueError, match=message):
        call(small_model())


def test_bad_parameters_are_named():
    kind, config, params, _, _ = cases.golden_case("gemma2_gqa_odd")
    p = dict(params)
    del p["model.layers.2.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match="missing parameters.*layers.2.mlp.up_proj"):
        gemma2.Gemma2Model(config, p)
    p = dict(params, **{"model.layers.0.self_attn.q_proj.weight": np.zeros((3, 3))})
    with pytest.raises(ValueError, match=r"q_proj.weight has shape \(3, 3\), expected \(32, 16\)"):
        gemma2.Gemma2Model(config, p)
    with pytest.raises(ValueError, match="unknown parameters.*extra"):
        gemma2.Gemma2Model(config, dict(params, extra=np.zeros(1)))
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'float64'"):
        gemma2.Gemma2Model(config, params, "float16")


@pytest.mark.parametrize("stem", ["cls_gemma2_gqa_odd", "cls_t5gemma_enc_unbalanced"])
def test_classifier_checkpoints_round_trip_through_transformers(stem, tmp_path):
    """Save a classifier, load it back (ours) and in transformers: the same class logits."""
    kind, config, params, inputs, _ = cases.golden_case(stem)
    model = build(kind, config, params)
    model.save_pretrained(tmp_path / "cls", dtype="float64")
    from minencdec.io.pretrained import load_pretrained
    back = load_pretrained(tmp_path / "cls", "float64")
    assert isinstance(back, Classifier) and back.num_labels == cases.NUM_LABELS
    ours = model.logits(inputs["input_ids"], inputs["attention_mask"])
    assert np.array_equal(back.logits(inputs["input_ids"], inputs["attention_mask"]), ours)
    torch = pytest.importorskip("torch")
    import transformers
    from minencdec.verify.hf_oracle import float64_exact
    cls = getattr(transformers, model.hf_config()["architectures"][0])
    theirs = cls.from_pretrained(tmp_path / "cls", attn_implementation="eager", dtype=torch.float64).eval()
    with float64_exact(), torch.no_grad():
        want = theirs(input_ids=torch.tensor(inputs["input_ids"]),
                      attention_mask=torch.tensor(inputs["attention_mask"])).logits.numpy()
    assert_close("classifier logits via transformers", ours, want, RTOL_F64)
