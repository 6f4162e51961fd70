"""Padded inputs for dump / compare, attention internals, size classes, the stored window rule.

Oracles: a padded row's activations at its real tokens equal the same row run alone without
padding (RoPE is relative, so left padding changes only rounding); probabilities are
recomputed here as a plain softmax of the dumped scores over the keys an independently
written window rule (|i - j| < w or <= w) shows; the window rule's config.json field is read
back by hand. Negative controls: a pad id inside an unmasked row, bad masks, a wrong rule
name are refused; a relative error of 1e-2 is classed divergent, 1e-7 float32-level.
"""

import json

import numpy as np
import pytest

import cases
from minencdec import cli, verify
from minencdec.io.pretrained import load_pretrained
from minencdec.model.config import T5GemmaConfig
from minencdec.model.t5gemma import T5GemmaModel

CASE = "unbalanced"                       # T5Gemma 3 + 2 layers, encoder window 2 < 8 tokens (cases.py)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("pad") / "t5"
    T5GemmaModel(cases.case_config(CASE), cases.case_params(CASE), "float64").save_pretrained(path, dtype="float64")
    return path


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_ids_file_masks_left_and_right_padding_match_unpadded_rows(ckpt, tmp_path, capsys):
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15]]
    dec = [[2, 20, 21], [2, 22]]
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps({"input_ids": [[5, 6, 7, 8, 9, 10, 11], [0, 0, 0, 12, 13, 14, 15]],
                                    "attention_mask": [[1] * 7, [0, 0, 0, 1, 1, 1, 1]],
                                    "decoder_input_ids": [[2, 20, 21], [2, 22, 0]],
                                    "decoder_attention_mask": [[1, 1, 1], [1, 1, 0]]}))
    out = tmp_path / "d.safetensors"
    assert run(["dump", "--model", ckpt, "--ids-file", ids_file, "--out", out], capsys)[0] == 0
    acts, _ = verify.read_dump(out)
    np.testing.assert_array_equal(acts["attention_mask"], [[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    model = load_pretrained(ckpt, "float64")
    alone = verify.dump_minencdec(model, [rows[1]], decoder_input_ids=[dec[1]])
    for name in ("encoder.norm", "decoder.layers.1", "logits"):
        got = acts[name][1, 3:] if name.startswith("encoder") else acts[name][1, :2]
        np.testing.assert_allclose(got, alone[name][0], rtol=0, atol=1e-12 * np.abs(alone[name]).max())
    # the same rows, ragged, padded on the left by the option
    code = run(["dump", "--model", ckpt, *sum([["--input-ids", " ".join(map(str, r))] for r in rows], []),
                "--padding-side", "left", "--out", out], capsys)[0]
    assert code == 0
    left, _ = verify.read_dump(out)
    np.testing.assert_array_equal(left["input_ids"], [rows[0], [0, 0, 0] + rows[1]])
    np.testing.assert_array_equal(left["attention_mask"], acts["attention_mask"])


@pytest.mark.parametrize("doc,message", [
    ({"input_ids": [[5, 0, 7]]}, "input_ids row 0 holds the pad id 0 at position 1"),
    ({"input_ids": [[5, 6], [7, 8]], "attention_mask": [[1, 1], [1]]}, "attention_mask must be rows of 0/1"),
    ({"input_ids": [[5, 6]], "attention_mask": [[1, 2]]}, "attention_mask must be rows of 0/1"),
    ({"input_ids": [[5, 6]], "attention_mask": [[0, 0]]}, "attention_mask row 0 has no real token"),
    ({"input_ids": [[5, 6]], "padding_side": "middle"}, "padding_side must be 'left' or 'right'"),
    ({"input_ids": [[5, 6]], "masks": [[1, 1]]}, "unknown field(s) ['masks']"),
])
def test_bad_ids_files_are_named(ckpt, tmp_path, capsys, doc, message):
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(doc))
    code, _, err = run(["dump", "--model", ckpt, "--ids-file", ids_file, "--out", tmp_path / "d"], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("rule", ["le", "lt"])
def test_internals_are_the_softmax_of_the_scores_over_the_window(ckpt, rule):
    model = load_pretrained(ckpt, "float64", bidirectional_window=rule)
    x = cases.case_inputs(CASE)
    acts = verify.dump_minencdec(model, x["input_ids"], x["attention_mask"], internals=["encoder.layers.0"])
    c = model.config.encoder
    w, mask = c.sliding_window, x["attention_mask"] != 0
    S = mask.shape[1]
    d = np.abs(np.arange(S)[:, None] - np.arange(S)[None, :])
    seen = (d < w if rule == "lt" else d <= w)[None, None] & mask[:, None, None, :]        # (B, 1, S, S)
    s = np.where(seen, acts["encoder.layers.0.self_attn.scores"], -np.inf)
    with np.errstate(invalid="ignore"):                     # a pad query may see no key: not compared
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
    real = mask[:, None, :, None]
    np.testing.assert_allclose(np.where(real, acts["encoder.layers.0.self_attn.probs"], 0), np.where(real, p, 0),
                               rtol=0, atol=1e-14)
    B, H, K, Dh = mask.shape[0], c.num_attention_heads, c.num_key_value_heads, c.head_dim
    assert acts["encoder.layers.0.self_attn.q"].shape == (B, H, S, Dh)
    assert acts["encoder.layers.0.self_attn.k"].shape == (B, K, S, Dh)
    with pytest.raises(ValueError, match="no attention sublayer 'encoder.layers.7'"):
        verify.dump_minencdec(model, x["input_ids"], internals=["encoder.layers.7"])


def test_size_classes_and_the_first_row_of_each():
    a = {"input_ids": np.array([[3, 4]]), "attention_mask": np.array([[1, 1]]),
         "embed": np.ones((1, 2, 4)), "layers.0.self_attn": np.ones((1, 2, 4)), "layers.0.mlp": np.ones((1, 2, 4)),
         "layers.0": np.ones((1, 2, 4))}
    b = dict(a, **{"layers.0.self_attn": a["layers.0.self_attn"] * (1 + 1e-7),
                   "layers.0.mlp": a["layers.0.mlp"] * (1 + 1e-2), "layers.0": a["layers.0"] * (1 + 1e-14)})
    rows = {r.name: r for r in verify.compare_dumps(a, b)}
    assert [rows[n].size for n in ("embed", "layers.0", "layers.0.self_attn", "layers.0.mlp")] == \
        ["exact", "float64-level", "float32-level", "divergent"]
    report = verify.format_report(list(rows.values()))
    assert "first divergence: layers.0.self_attn" in report and "float32-level)" in report
    assert "first float32-level: layers.0.self_attn" in report and "first divergent:     layers.0.mlp" in report


def test_the_window_rule_is_stored_and_read(tmp_path, capsys):
    config = cases.case_config(CASE)
    lt = T5GemmaConfig(config.encoder.replace(bidirectional_window="lt"), config.decoder)
    assert "minencdec_bidirectional_window" not in config.to_hf_dict()              # "le": as transformers
    assert lt.to_hf_dict()["minencdec_bidirectional_window"] == "lt"
    assert T5GemmaConfig.from_hf_dict(lt.to_hf_dict()).encoder.bidirectional_window == "lt"
    T5GemmaModel(lt, cases.case_params(CASE), "float64").save_pretrained(tmp_path / "m")
    raw = json.loads((tmp_path / "m" / "config.json").read_text())
    assert raw["minencdec_bidirectional_window"] == "lt"
    assert load_pretrained(tmp_path / "m").config.encoder.bidirectional_window == "lt"
    raw["minencdec_bidirectional_window"] = "<="
    (tmp_path / "m" / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=r"config.json: minencdec_bidirectional_window must be one of"):
        load_pretrained(tmp_path / "m")
    with pytest.raises(ValueError, match="bidirectional_window must be one of"):
        load_pretrained(tmp_path / "m", bidirectional_window="<")
    g = tmp_path / "g"
    cls = __import__("minencdec").Gemma2Model
    cls(cases.case_config("gqa_odd"), cases.case_params("gqa_odd"), "float64").save_pretrained(g)
    code, _, err = run(["dump", "--model", g, "--input-ids", "3 4", "--bidirectional-window", "lt",
                        "--out", tmp_path / "x"], capsys)
    assert code == 2 and "no bidirectional attention" in err
