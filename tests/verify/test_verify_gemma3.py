"""Activation dumps and the per-layer report for Gemma 3 and T5Gemma 2.

Oracle: transformers (Gemma3ForCausalLM, T5Gemma2ForConditionalGeneration) loading the same
directory, made float64-exact, with its activations captured by forward hooks: every
documented tensor agrees within RTOL_F64. Negative control: a checkpoint with one entry of
a k_norm weight moved is reported as diverging first at that layer's attention, with every
earlier row OK.
"""

import json

import numpy as np
import pytest

import cases
from minencdec import verify
from minencdec.files.checkpoint import load_tensors, save_tensors, stored_dtypes
from minencdec.io.pretrained import load_pretrained
from minencdec.model.gemma2 import Gemma2Model
from minencdec.model.t5gemma import T5GemmaModel

RTOL_TIGHT = 1e-9


def save(case, path):
    config = cases.case_config(case)
    cls = T5GemmaModel if case in cases.T5GEMMA2_CASES else Gemma2Model
    cls(config, cases.case_params(case), "float64").save_pretrained(path, dtype="float64")
    return path


def inputs(case):
    x = cases.case_inputs(case)
    return {k: x[k] for k in verify.INPUT_NAMES if k in x}


@pytest.mark.parametrize("case", ["gqa_mixed", "unequal_depth"])
def test_every_activation_matches_transformers(case, tmp_path):
    pytest.importorskip("torch")
    path = save(case, tmp_path / case)
    ours = verify.dump_minencdec(load_pretrained(path, "float64"), **inputs(case))
    theirs = verify.dump_transformers(path, **inputs(case))
    rows = verify.compare_dumps(ours, theirs, rtol=RTOL_TIGHT)
    print(verify.format_report(rows))
    layers = cases.case_config(case)
    n = (layers.encoder.num_hidden_layers + layers.decoder.num_hidden_layers if case in cases.T5GEMMA2_CASES
         else layers.num_hidden_layers)
    assert len(rows) >= 3 * n + 3 and all(r.status == "OK" for r in rows), verify.format_report(rows)


def test_a_moved_k_norm_entry_is_found_at_its_layer(tmp_path):
    case = "unequal_depth"
    path = save(case, tmp_path / "ref")
    ref = verify.dump_minencdec(load_pretrained(path, "float64"), **inputs(case))
    params = load_tensors(path, {k: v.shape for k, v in load_pretrained(path, "float64").params.items()}, "float64")
    params["model.decoder.layers.1.self_attn.k_norm.weight"][2] += 1e-6
    save_tensors(tmp_path / "bad", params, json.loads((path / "config.json").read_text()))
    assert set(stored_dtypes(tmp_path / "bad").values()) == {"F64"}
    bad = verify.dump_minencdec(load_pretrained(tmp_path / "bad", "float64"), **inputs(case))
    rows = verify.compare_dumps(bad, ref)
    first = next(r for r in rows if r.status == "DIFF")
    assert first.name == "decoder.layers.1.self_attn", verify.format_report(rows)
    assert all(r.status == "OK" for r in rows[:rows.index(first)])
    assert np.isfinite(first.max_rel) and first.max_rel > 1e-9
