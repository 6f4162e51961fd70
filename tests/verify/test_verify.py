"""Activation dumps and the per-layer divergence report (minencdec/verify/dumps.py and compare.py).

Oracle: transformers' eager models loaded from the same checkpoint directory, made float64
exact, with activations captured by hooks (needs torch; skipped without it). Negative
controls: a checkpoint copy with ONE tensor changed by 1e-5 in one entry must make exactly
that sublayer the first divergence, and garbage at a non-pad position must be reported at
its index. The expected names below are written out from the documented format, not taken
from the code under test.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import cases
from minencdec import cli
from minencdec.model import gemma2, t5gemma
from minencdec import verify
from minencdec.io.pretrained import load_pretrained

GEMMA2_CASE, T5_CASE = "gqa_odd", "unbalanced"     # 3 layers; 3 encoder + 2 decoder layers
NUDGE = 1e-5                                        # the negative controls' one-entry change
# float64 dumps of two independent implementations (measured: ~1e-14); the same constant
# as tests/helpers.py RTOL_F64. The library's own default (verify.RTOL_F64) is the same.
RTOL_TIGHT = 1e-9


def documented_names(kind, enc_layers, dec_layers=0):
    """The activation names of the module docstring, in model order."""
    def stack(prefix, n, cross):
        subs = ("self_attn", "cross_attn", "mlp") if cross else ("self_attn", "mlp")
        names = [f"{prefix}embed"]
        for i in range(n):
            names += [f"{prefix}layers.{i}.{s}" for s in subs] + [f"{prefix}layers.{i}"]
        return names + [f"{prefix}norm"]
    if kind == "gemma2":
        return stack("", enc_layers, False) + ["logits"]
    return stack("encoder.", enc_layers, False) + stack("decoder.", dec_layers, True) + ["logits"]


def save_case(case, path):
    cls = gemma2.Gemma2Model if case in cases.GEMMA2_CASES else t5gemma.T5GemmaModel
    cls(cases.case_config(case), cases.case_params(case), "float64").save_pretrained(path, dtype="float64")
    return path


def perturbed_copy(src, dst, tensor, index=(3, 5)):
    """Copy checkpoint `src` to `dst` with one entry of one tensor moved by NUDGE."""
    shutil.copytree(src, dst)
    weights = load_file(os.path.join(dst, "model.safetensors"))
    weights[tensor][index] += NUDGE
    save_file(weights, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def case_kwargs(case):
    x = cases.case_inputs(case)                     # row 1 right-padded, row 2 left-padded
    return {k: x[k] for k in verify.INPUT_NAMES if k in x}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    return {c: save_case(c, str(root / c)) for c in (GEMMA2_CASE, T5_CASE)}


@pytest.fixture(scope="module")
def ours(ckpt):
    """minencdec float64 dumps of both cases."""
    return {c: verify.dump_minencdec(load_pretrained(p, "float64"), **case_kwargs(c)) for c, p in ckpt.items()}


@pytest.fixture(scope="module")
def theirs(ckpt):
    """transformers float64 (exact) dumps of both cases."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    return {c: verify.dump_transformers(p, **case_kwargs(c)) for c, p in ckpt.items()}


def statuses(rows):
    return {r.name: r.status for r in rows}


# --------------------------------------------------------------------------- against transformers

@pytest.mark.parametrize("case,names", [
    (GEMMA2_CASE, documented_names("gemma2", 3)),
    (T5_CASE, documented_names("t5gemma", 3, 2))])
def test_every_documented_activation_matches_transformers(ours, theirs, case, names):
    config = cases.case_config(case)
    for dump in (ours[case], theirs[case]):
        assert sorted(k for k in dump if k not in verify.INPUT_NAMES) == sorted(names)
    rows = verify.compare_dumps(ours[case], theirs[case], rtol=RTOL_TIGHT)
    print(verify.format_report(rows))
    assert [r.name for r in rows] == names                     # model order, encoder first
    assert all(r.status == "OK" for r in rows), verify.format_report(rows)
    assert verify.format_report(rows).endswith(f"all {len(names)} tensors agree")
    d = ours[case]                                             # (theirs has the same shapes: all OK)
    enc, dec = (config, config) if case == GEMMA2_CASE else (config.encoder, config.decoder)
    B, S = d["input_ids"].shape
    T = d["decoder_input_ids"].shape[1] if "decoder_input_ids" in d else S
    for n in names:                                            # documented shapes
        width = enc.hidden_size if n.startswith("encoder.") or case == GEMMA2_CASE else dec.hidden_size
        assert d[n].shape == ((B, T, dec.vocab_size) if n == "logits" else
                              (B, S if not n.startswith("decoder.") else T, width)), n
    # embed is the scaled lookup, from the raw parameters
    table = cases.case_params(case)["model.embed_tokens.weight" if case == GEMMA2_CASE
                                    else "model.encoder.embed_tokens.weight"]
    key = "embed" if case == GEMMA2_CASE else "encoder.embed"
    np.testing.assert_allclose(d[key], table[d["input_ids"]] * np.sqrt(enc.hidden_size), rtol=1e-15)


@pytest.mark.parametrize("case,tensor,first", [
    (GEMMA2_CASE, "model.layers.1.mlp.up_proj.weight", "layers.1.mlp"),
    (T5_CASE, "model.decoder.layers.1.cross_attn.v_proj.weight", "decoder.layers.1.cross_attn"),
    (T5_CASE, "model.encoder.layers.2.self_attn.q_proj.weight", "encoder.layers.2.self_attn")])
@pytest.mark.parametrize("reference", ["minencdec", "transformers"])
def test_a_one_entry_change_is_reported_at_its_sublayer(ckpt, ours, tmp_path, request, case, tensor,
                                                         first, reference):
    """Negative control: minencdec on a checkpoint with one weight entry nudged by 1e-5,
    against the original run by minencdec or by transformers."""
    ref = ours[case] if reference == "minencdec" else request.getfixturevalue("theirs")[case]
    bad_dir = perturbed_copy(ckpt[case], str(tmp_path / "bad"), tensor)
    bad = verify.dump_minencdec(load_pretrained(bad_dir, "float64"), **case_kwargs(case))
    rows = verify.compare_dumps(bad, ref)
    print(verify.format_report(rows))
    names = [r.name for r in rows]
    k = names.index(first)
    assert all(r.status == "OK" for r in rows[:k]), verify.format_report(rows)
    assert rows[k].status == "DIFF" and rows[-1].status == "DIFF"      # and it reaches the logits
    assert f"first divergence: {first} (max rel" in verify.format_report(rows)


# --------------------------------------------------------------------------- the comparison itself

def test_padding_is_not_compared_but_every_real_position_is(ours):
    a = ours[GEMMA2_CASE]
    mask = a["attention_mask"]
    assert (mask == 0).any() and (mask[:, 0] == 0).any()       # right and left padding present
    b = {k: v.copy() for k, v in a.items()}
    b["layers.1"][mask == 0] = np.nan                           # padding: implementation-defined
    b["logits"][mask == 0] = 1e6
    assert all(r.status == "OK" for r in verify.compare_dumps(a, b))
    r, t = np.argwhere(mask == 1)[-1]
    b["layers.1"][r, t, 4] += 1e-6 * np.abs(a["layers.1"]).max()     # one real entry, off by 1e-6
    rows = verify.compare_dumps(b, a)
    row = {x.name: x for x in rows}["layers.1"]
    assert row.status == "DIFF" and row.worst == (r, t, 4)
    assert row.max_rel == pytest.approx(1e-6, rel=1e-6)
    assert [x.name for x in rows if x.status != "OK"] == ["layers.1"]
    b["layers.1"][r, t, 4] = np.nan                                    # NaN at a real position
    row = {x.name: x for x in verify.compare_dumps(b, a)}["layers.1"]
    assert row.status == "DIFF" and row.worst == (r, t, 4) and "non-finite" in row.note


def test_missing_and_shape_rows(ours):
    a = dict(ours[T5_CASE])
    b = dict(a)
    del b["decoder.layers.0.cross_attn"]
    b["logits"] = a["logits"][..., :-1]
    b["encoder.layers.0.extra"] = a["encoder.layers.0"]
    rows = verify.compare_dumps(a, b)
    st = statuses(rows)
    assert st["decoder.layers.0.cross_attn"] == "MISSING" and st["encoder.layers.0.extra"] == "MISSING"
    assert st["logits"] == "SHAPE"
    assert [(r.name, r.note) for r in rows if r.status == "MISSING"] == [
        ("decoder.layers.0.cross_attn", "only in A"), ("encoder.layers.0.extra", "only in B")]   # unknown last
    report = verify.format_report(rows)
    assert "first divergence: logits" in report and "2 tensor(s) are in only one dump" in report
    only = verify.format_report(verify.compare_dumps(a, {k: v for k, v in a.items() if k != "encoder.norm"}))
    assert "first divergence" not in only and "1 tensor(s) are in only one dump" in only


def test_model_order_and_default_tolerances(ours):
    names = documented_names("t5gemma", 11, 11)                # layer 10 after layer 9, not 1
    shuffled = list(np.random.default_rng(0).permutation(names))
    assert sorted(shuffled, key=verify.model_order) == names
    a = ours[GEMMA2_CASE]
    b32 = {k: (v.astype(np.float32) if k not in verify.INPUT_NAMES else v) for k, v in a.items()}
    assert all(r.status == "OK" for r in verify.compare_dumps(b32, a))          # float32 -> RTOL_F32
    assert any(r.status == "DIFF" for r in verify.compare_dumps(b32, a, rtol=verify.RTOL_F64))
    other = dict(a, input_ids=a["input_ids"][::-1].copy())
    with pytest.raises(ValueError, match="different inputs"):
        verify.compare_dumps(a, other)


def test_float32_transformers_within_the_float32_tolerance(ckpt, ours, theirs):
    x = case_kwargs(T5_CASE)
    hf32 = verify.dump_transformers(ckpt[T5_CASE], **x, dtype="float32")
    ours32 = verify.dump_minencdec(load_pretrained(ckpt[T5_CASE], "float32"), **x)
    assert hf32["logits"].dtype == np.float32 and ours32["logits"].dtype == np.float32
    for a, b in [(hf32, theirs[T5_CASE]), (ours32, ours[T5_CASE]), (ours32, hf32)]:
        rows = verify.compare_dumps(a, b)
        assert all(r.status == "OK" for r in rows), verify.format_report(rows)
        assert max(r.max_rel for r in rows) > verify.RTOL_F64       # float32 really is coarser


# --------------------------------------------------------------------------- files

def test_round_trip_and_atomic_write(ours, tmp_path, monkeypatch):
    a = ours[T5_CASE]
    path = tmp_path / "a.safetensors"
    verify.write_dump(path, a, {"kind": "t5gemma", "dtype": "float64", "producer": "minencdec", "model": "x"})
    got, meta = verify.read_dump(path)
    assert os.listdir(tmp_path) == ["a.safetensors"]                # no temporary file left
    assert meta == {"format": "minencdec-activations", "format_version": "1", "kind": "t5gemma",
                    "dtype": "float64", "producer": "minencdec", "model": "x"}
    assert sorted(got) == sorted(a)
    for k in a:
        assert got[k].dtype == (np.int64 if k in verify.INPUT_NAMES else np.float64), k
        np.testing.assert_array_equal(got[k], a[k])

    def interrupted(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", interrupted)          # a write that fails at the last step
    with pytest.raises(OSError, match="disk full"):
        verify.write_dump(path, {**a, "logits": a["logits"] + 1}, {"kind": "t5gemma"})
    assert os.listdir(tmp_path) == ["a.safetensors"]                # temporary file removed
    np.testing.assert_array_equal(load_file(str(path))["logits"], a["logits"])   # old file intact


def test_bad_files_give_errors_naming_the_file(ours, ckpt, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(verify.DumpError, match="nope.safetensors: no such dump file"):
        verify.read_dump(missing)
    text = tmp_path / "notes.safetensors"
    text.write_text("hello, not a tensor file\n")
    with pytest.raises(verify.DumpError, match="notes.safetensors: not a readable safetensors"):
        verify.read_dump(text)
    weights = os.path.join(ckpt[GEMMA2_CASE], "model.safetensors")     # a checkpoint, format "pt"
    with pytest.raises(verify.DumpError, match="model.safetensors: format tag 'pt'"):
        verify.read_dump(weights)
    future = tmp_path / "v2.safetensors"
    save_file({"input_ids": np.zeros((1, 2), np.int64)}, str(future),
              metadata={"format": "minencdec-activations", "format_version": "2", "kind": "gemma2"})
    with pytest.raises(verify.DumpError, match="v2.safetensors: format_version '2'"):
        verify.read_dump(future)
    no_mask = tmp_path / "nomask.safetensors"
    save_file({"input_ids": np.zeros((1, 2), np.int64)}, str(no_mask),
              metadata={"format": "minencdec-activations", "format_version": "1", "kind": "gemma2"})
    with pytest.raises(verify.DumpError, match="nomask.safetensors: needs the integer input tensor"):
        verify.read_dump(no_mask)


# --------------------------------------------------------------------------- the commands

def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dump_and_compare_commands(ckpt, tmp_path, capsys):
    g = ckpt[GEMMA2_CASE]
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    ids = ["--input-ids", "2 45 17 9 3", "--input-ids", "2, 8, 9"]
    assert run(["dump", "--model", g, *ids, "--out", a], capsys)[0] == 0
    acts, meta = verify.read_dump(a)
    np.testing.assert_array_equal(acts["input_ids"], [[2, 45, 17, 9, 3], [2, 8, 9, 0, 0]])
    np.testing.assert_array_equal(acts["attention_mask"], [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    assert meta["producer"] == "minencdec" and meta["kind"] == "gemma2" and meta["dtype"] == "float64"
    code, out, _ = run(["compare", a, a], capsys)
    assert code == 0 and out.rstrip().endswith("all 12 tensors agree")
    bad = perturbed_copy(g, str(tmp_path / "bad"), "model.layers.1.mlp.up_proj.weight")
    assert run(["dump", "--model", bad, *ids, "--out", b], capsys)[0] == 0
    code, out, _ = run(["compare", b, a], capsys)
    assert code == 1 and "first divergence: layers.1.mlp" in out
    code, out, _ = run(["compare", "--model", g, "--against", b], capsys)   # rerun b's inputs
    assert code == 1 and "first divergence: layers.1.mlp" in out
    code, out, _ = run(["compare", "--model", bad, "--against", b], capsys)
    assert code == 0
    # bad input: exit 2 with a message
    assert run(["compare", a], capsys)[0] == 2
    code, _, err = run(["compare", a, tmp_path / "missing.safetensors"], capsys)
    assert code == 2 and "missing.safetensors: no such dump file" in err
    code, _, err = run(["dump", "--model", g, "--input-ids", "2 x", "--out", b], capsys)
    assert code == 2 and "integers" in err
    code, _, err = run(["dump", "--model", g, "--input-ids", "2 999", "--out", b], capsys)
    assert code == 2 and "outside the vocabulary" in err
    code, _, err = run(["dump", "--model", g, "--out", b], capsys)
    assert code == 2 and "no token ids" in err


def test_t5gemma_commands_and_ids_file(ckpt, tmp_path, capsys):
    t5 = ckpt[T5_CASE]
    out = tmp_path / "t5.safetensors"
    code = run(["dump", "--model", t5, "--input-ids", "5 6 7", "--input-ids", "8", "--out", out], capsys)[0]
    assert code == 0
    acts, meta = verify.read_dump(out)
    np.testing.assert_array_equal(acts["decoder_input_ids"], [[2], [2]])        # one bos per row
    np.testing.assert_array_equal(acts["attention_mask"], [[1, 1, 1], [1, 0, 0]])
    assert sorted(set(acts) - set(verify.INPUT_NAMES)) == sorted(documented_names("t5gemma", 3, 2))
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps({"input_ids": [[5, 6, 7], [8]], "decoder_input_ids": [[2, 9], [2]]}))
    code = run(["dump", "--model", t5, "--ids-file", ids_file, "--dtype", "float32", "--out", out], capsys)[0]
    assert code == 0
    acts, meta = verify.read_dump(out)
    assert meta["dtype"] == "float32" and acts["logits"].dtype == np.float32
    np.testing.assert_array_equal(acts["decoder_attention_mask"], [[1, 1], [1, 0]])
    ids_file.write_text("[[1, 2]]")
    assert run(["dump", "--model", t5, "--ids-file", ids_file, "--out", out], capsys)[0] == 2
    code, _, err = run(["dump", "--model", ckpt[GEMMA2_CASE], "--input-ids", "3 4",
                        "--decoder-input-ids", "2", "--out", out], capsys)
    assert code == 2 and "T5Gemma" in err


def test_classifier_checkpoints_are_refused(tmp_path, capsys):
    from minencdec.model.classify import Classifier
    config = cases.case_config(GEMMA2_CASE)
    params = cases.case_params(GEMMA2_CASE, num_labels=cases.NUM_LABELS)
    cls_dir = tmp_path / "cls"
    Classifier("gemma2", config, params, cases.NUM_LABELS, "float64").save_pretrained(cls_dir)
    code, _, err = run(["dump", "--model", cls_dir, "--input-ids", "3 4", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "is a classifier" in err
    with pytest.raises(ValueError, match="is a classifier"):
        verify.dump_transformers(cls_dir, [[3, 4]])


def test_compare_against_transformers_command(ckpt, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    for case in (GEMMA2_CASE, T5_CASE):
        code, out, _ = run(["compare", "--model", ckpt[case], "--against", "transformers",
                            "--input-ids", "3 4 5 6 7", "--input-ids", "8 9"], capsys)
        assert code == 0 and "tensors agree" in out, out


def test_transformers_producer_without_torch_says_how_to_install(ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)          # as if torch were not installed
    code, _, err = run(["dump", "--model", ckpt[GEMMA2_CASE], "--input-ids", "3 4", "--producer",
                        "transformers", "--out", tmp_path / "x"], capsys)
    assert code == 2 and "pip install -e '.[oracle]'" in err
