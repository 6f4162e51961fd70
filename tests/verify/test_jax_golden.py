"""The official JAX T5Gemma against minencdec, from committed files (no JAX needed).

Oracle: gemma 3.3.0's Flax T5Gemma itself, run in float64 by jax_golden/make_jax_golden.py
(versions pinned there), its activations and attention internals captured into dump files.
The path checked is the user's: `import-flax` the Flax parameters, `compare --model DIR
--against` each JAX dump. With JAX's RoPE computed in float64 every tensor agrees to float64
rounding; as shipped (RoPE angles in float32) every row differs at float32 level, first at
the first q after RoPE. Negative control: the transformers window rule ("le") on the same
inputs is reported divergent, first at encoder layer 0's probabilities, while its q, k and
scores still agree (the mask is the difference).
"""

import argparse
import importlib
import json
import re
from pathlib import Path

import pytest

from minencdec import verify

GOLDEN = Path(__file__).resolve().parent / "jax_golden"
CASES = ("gqa", "mha")


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    root = tmp_path_factory.mktemp("jax")
    out = {}
    for case in CASES:
        out[case] = root / case
        code, _, err = cli(["import-flax", "--params", GOLDEN / f"{case}.params.npz", "--jax-config",
                            GOLDEN / f"{case}.jax_config.json", "--out", out[case]])
        assert code == 0, err
    return out


def cli(argv, capsys=None):
    """Run `minencdec` with import-flax registered (cli/main.py registers it; until it does,
    it is added to the parser here). Returns (exit code, stdout, stderr) when given capsys."""
    main = importlib.import_module("minencdec.cli.main")
    from minencdec.cli import flax as flax_cli
    parser = main.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "import-flax" not in sub.choices:
        flax_cli.add_commands(sub)
    original, main.build_parser = main.build_parser, lambda: parser
    try:
        code = main.main([str(a) for a in argv])
    finally:
        main.build_parser = original
    out = capsys.readouterr() if capsys else None
    return code, out.out if out else "", out.err if out else ""


def rows_of(report):
    """{name: (status, max rel, size)} from compare's printed report."""
    out = {}
    for line in report.splitlines():
        m = re.match(r"(OK|DIFF)\s+(\S+)\s+\S+\s+(\S+)\s+(\S+)", line)
        if m:
            out[m[2]] = (m[1], float(m[3]), m[4])
    return out


@pytest.mark.parametrize("case", CASES)
def test_float64_rope_agrees_to_float64_rounding(imported, capsys, case):
    code, out, _ = cli(["compare", "--model", imported[case], "--against", GOLDEN / f"{case}.jax_rope64.safetensors"],
                       capsys)
    rows = rows_of(out)
    assert code == 0 and "tensors agree" in out, out
    assert len(rows) > 25 and any(n.endswith(".probs") for n in rows)          # internals compared too
    assert max(rel for _, rel, _ in rows.values()) < 1e-13, out


@pytest.mark.parametrize("case,first", [("gqa", "encoder.layers.0.self_attn.q"),
                                        ("mha", "encoder.layers.0.self_attn")])
def test_float32_rope_is_a_float32_island(imported, capsys, case, first):
    code, out, _ = cli(["compare", "--model", imported[case], "--against", GOLDEN / f"{case}.jax.safetensors"],
                       capsys)
    rows = rows_of(out)
    assert code == 1 and f"first divergence: {first} (" in out, out
    diffs = [(rel, size) for status, rel, size in rows.values() if status == "DIFF"]
    assert diffs and all(size == "float32-level" and 1e-9 < rel < 1e-6 for rel, size in diffs), out
    assert rows["logits"][0] == "DIFF" and "first divergent:" not in out


def test_the_transformers_window_rule_is_found_at_the_mask(imported, capsys):
    code, out, _ = cli(["compare", "--model", imported["gqa"], "--against", GOLDEN / "gqa.jax_rope64.safetensors",
                        "--bidirectional-window", "le"], capsys)
    rows = rows_of(out)
    assert code == 1 and "first divergence: encoder.layers.0.self_attn.probs (" in out, out
    assert all(rows[f"encoder.layers.0.self_attn.{x}"][0] == "OK" for x in ("q", "k", "scores"))
    assert rows["encoder.layers.0.self_attn.probs"][2] == "divergent" and rows["logits"][2] == "divergent"
    assert "declares the encoder window rule 'lt', the model runs 'le'" in out


def test_golden_files_are_what_the_generator_describes():
    for case in CASES:
        jc = json.loads((GOLDEN / f"{case}.jax_config.json").read_text())
        assert set(jc) == {"encoder", "decoder"}
        for suffix in ("jax", "jax_rope64"):
            acts, meta = verify.read_dump(GOLDEN / f"{case}.{suffix}.safetensors")
            assert meta["bidirectional_window"] == "lt" and meta["producer"].startswith("gemma 3.3.0")
            assert ("float64 (patched)" in meta["producer"]) == (suffix == "jax_rope64")
            assert (acts["attention_mask"] == (acts["input_ids"] != 0)).all()       # JAX's masks: ids != 0
    for path in GOLDEN.iterdir():
        assert path.stat().st_size < 300_000, path
