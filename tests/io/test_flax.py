"""The Flax T5Gemma converter (minencdec/io/flax.py, `minencdec import-flax`), without JAX.

Oracle for the layouts: the einsum equations of gemma's own modules (copied below from
`gemma/research/t5gemma/modules.py` and `gemma/gm/nn/_modules.py`, gemma 3.3.0), evaluated
with NumPy on a synthetic Flax-shaped tree: each converted (out, in) matrix applied as
minencdec applies it (linear_forward, heads split as attention.py does) must give the same
numbers as the einsum on the Flax tensor. The whole path against a real JAX run is
tests/verify/test_jax_golden.py. Negative controls: a transposed kernel fails the identity;
each refused input (BY_EMBED_DIM_DIV_NUM_HEADS, the odd-num_layers trap, a missing,
misshapen or unknown tensor, an object array) is named and nothing is written.
"""

import importlib
import json

import numpy as np
import pytest

from minencdec.io.flax import FlaxImportError, flax_to_t5gemma, import_flax
from minencdec.io.pretrained import load_pretrained
from minencdec.model.layers import linear_forward

# gemma's einsums: q, kv, fused qkv, output, gating (both layouts), down projection
Q, KV, QKV, O = "BTD,NDH->BTNH", "BSD,CKDH->CBSKH", "BTD,SNDH->SBTNH", "BTNH,NHD->BTD"
GATING, GATING_T, LINEAR = "...F,NFH->...NH", "...F,NHF->...NH", "...H,HF->...F"


def jax_config(enc_heads=(4, 2), dec_heads=(4, 2), enc_width=16, dec_width=16, transposed=False, **extra):
    def side(name, heads, width):
        c = dict(num_layers=2, num_embed=32, embed_dim=width, hidden_dim=24, num_heads=heads[0], head_dim=8,
                 num_kv_heads=heads[1], final_logit_softcap=30.0, use_post_attn_norm=True, use_post_ffw_norm=True,
                 attention_types=["LOCAL_SLIDING", "GLOBAL"], attn_logits_soft_cap=50.0, sliding_window_size=3,
                 transpose_gating_einsum=transposed, enable_cross_attention=name == "decoder",
                 bidirectional=name == "encoder")
        if name == "decoder" and enc_width != dec_width:
            c["kv_embed_dim"] = enc_width
        return {**c, **extra}
    return {"encoder": side("encoder", enc_heads, enc_width), "decoder": side("decoder", dec_heads, dec_width)}


def flax_tree(jc, seed=0):
    """A Flax-shaped parameter tree (flattened with "/") for config `jc`, random values."""
    rng = np.random.default_rng(seed)
    tree = {}
    for side, c in jc.items():
        D, N, K, H, F = c["embed_dim"], c["num_heads"], c["num_kv_heads"], c["head_dim"], c["hidden_dim"]
        tree[f"{side}/embedder/input_embedding"] = rng.normal(size=(c["num_embed"], D))
        tree[f"{side}/final_norm/scale"] = rng.normal(size=D)
        for i in range(c["num_layers"]):
            p = f"{side}/layer_{i}/"
            norms = ["pre_attention_norm", "post_attention_norm", "pre_ffw_norm", "post_ffw_norm"]
            if side == "decoder":
                norms += ["pre_cross_attention_norm", "post_cross_attention_norm"]
            tree.update({f"{p}{n}/scale": rng.normal(size=D) for n in norms})
            attns = [("attn", D, K == N)] + ([("cross_attn", c.get("kv_embed_dim") or D, False)]
                                            if side == "decoder" else [])
            for a, d_kv, fused in attns:
                if fused:
                    tree[f"{p}{a}/qkv_einsum/w"] = rng.normal(size=(3, N, D, H))
                else:
                    tree[f"{p}{a}/q_einsum/w"] = rng.normal(size=(N, D, H))
                    tree[f"{p}{a}/kv_einsum/w"] = rng.normal(size=(2, K, d_kv, H))
                tree[f"{p}{a}/attn_vec_einsum/w"] = rng.normal(size=(N, H, D))
            tree[f"{p}mlp/gating_einsum"] = rng.normal(size=(2, F, D) if c["transpose_gating_einsum"] else (2, D, F))
            tree[f"{p}mlp/linear"] = rng.normal(size=(F, D))
    return tree


def heads(y, n):
    """(B, T, n*Dh) -> (B, T, n, Dh): the head split of attention.py, in Flax's axis order."""
    return y.reshape(y.shape[0], y.shape[1], n, -1)


@pytest.mark.parametrize("variant", ["gqa", "mha_fused_transposed_unequal"])
def test_every_converted_matrix_equals_gemmas_einsum(variant):
    jc = (jax_config() if variant == "gqa" else
          jax_config(enc_heads=(2, 2), dec_heads=(2, 2), enc_width=24, dec_width=16, transposed=True))
    tree = flax_tree(jc)
    config, params = flax_to_t5gemma(tree, jc)
    rng = np.random.default_rng(1)
    checked = 0
    for side in ("encoder", "decoder"):
        c, P = getattr(config, side), f"model.{side}.layers.1."
        N, K, F = c.num_attention_heads, c.num_key_value_heads, c.intermediate_size
        x = rng.normal(size=(2, 5, c.hidden_size))
        src = rng.normal(size=(2, 7, config.encoder.hidden_size))
        j = f"{side}/layer_1/"
        for a, ours, kv_in in [("attn", "self_attn", x)] + ([("cross_attn", "cross_attn", src)] if side == "decoder"
                                                          else []):
            w = lambda n: params[f"{P}{ours}.{n}_proj.weight"]        # noqa: E731
            if f"{j}{a}/qkv_einsum/w" in tree:
                q, k, v = np.einsum(QKV, x, tree[f"{j}{a}/qkv_einsum/w"])
            else:
                q = np.einsum(Q, x, tree[f"{j}{a}/q_einsum/w"])
                k, v = np.einsum(KV, kv_in, tree[f"{j}{a}/kv_einsum/w"])
            np.testing.assert_allclose(heads(linear_forward(x, w("q"))[0], N), q, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(heads(linear_forward(kv_in, w("k"))[0], K), k, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(heads(linear_forward(kv_in, w("v"))[0], K), v, rtol=1e-12, atol=1e-12)
            enc = rng.normal(size=(2, 5, N, c.head_dim))               # attention's output heads
            np.testing.assert_allclose(linear_forward(enc.reshape(2, 5, -1), w("o"))[0],
                                       np.einsum(O, enc, tree[f"{j}{a}/attn_vec_einsum/w"]), rtol=1e-12, atol=1e-12)
            checked += 4
        gate_up = np.einsum(GATING_T if jc[side]["transpose_gating_einsum"] else GATING, x,
                            tree[f"{j}mlp/gating_einsum"])                       # (B, T, 2, F)
        np.testing.assert_allclose(linear_forward(x, params[f"{P}mlp.gate_proj.weight"])[0], gate_up[..., 0, :],
                                   rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(linear_forward(x, params[f"{P}mlp.up_proj.weight"])[0], gate_up[..., 1, :],
                                   rtol=1e-12, atol=1e-12)
        h = rng.normal(size=(2, 5, F))
        np.testing.assert_allclose(linear_forward(h, params[f"{P}mlp.down_proj.weight"])[0],
                                   np.einsum(LINEAR, h, tree[f"{j}mlp/linear"]), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(params[f"model.{side}.layers.1.pre_feedforward_layernorm.weight"],
                                      tree[f"{j}pre_ffw_norm/scale"])        # 1 + w in both: copied
        checked += 3
    assert checked == 18                         # q, k, v, o of three attentions; gate, up, down twice
    # Negative control: the kernel read without its transpose breaks the identity.
    wrong = tree["encoder/layer_1/" + ("attn/q_einsum/w" if variant == "gqa" else "attn/qkv_einsum/w")]
    wrong = (wrong if variant == "gqa" else wrong[0]).reshape(-1, config.encoder.hidden_size)   # no transpose
    x = rng.normal(size=(2, 5, config.encoder.hidden_size))
    q = np.einsum(Q, x, tree["encoder/layer_1/attn/q_einsum/w"] if variant == "gqa"
                  else tree["encoder/layer_1/attn/qkv_einsum/w"][0])
    assert not np.allclose(heads(linear_forward(x, wrong)[0], config.encoder.num_attention_heads), q)


def test_the_config_as_gemma_builds_it():
    jc = jax_config(enc_heads=(2, 2), dec_heads=(2, 2), enc_width=24, dec_width=16,
                    query_pre_attn_norm="BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS")
    config, _ = flax_to_t5gemma(flax_tree(jc), jc)
    enc, dec = config.encoder, config.decoder
    assert (enc.query_pre_attn_scalar, dec.query_pre_attn_scalar) == (24 // 2, 16 // 2)
    assert enc.layer_types == dec.layer_types == ("sliding_attention", "full_attention")
    assert (enc.bidirectional_window, enc.rms_norm_eps, enc.pad_token_id, dec.cross_attention_hidden_size) == \
        ("lt", 1e-6, 0, 24)
    config, _ = flax_to_t5gemma(flax_tree(jax_config()), jax_config())
    assert config.encoder.query_pre_attn_scalar == 8                      # BY_ONE_OVER_SQRT_HEAD_DIM


def test_import_writes_a_checkpoint_with_the_jax_window_rule(tmp_path):
    jc = jax_config()
    np.savez(tmp_path / "p.npz", **flax_tree(jc))
    (tmp_path / "c.json").write_text(json.dumps(jc))
    import_flax(tmp_path / "p.npz", tmp_path / "c.json", tmp_path / "out")
    raw = json.loads((tmp_path / "out" / "config.json").read_text())
    assert raw["minencdec_bidirectional_window"] == "lt" and raw["minencdec_import"]["from"] == "flax"
    assert load_pretrained(tmp_path / "out").config.encoder.bidirectional_window == "lt"
    assert load_pretrained(tmp_path / "out", bidirectional_window="le").config.encoder.bidirectional_window == "le"


def cli(argv, capsys):
    """Run `minencdec` with import-flax registered (cli/main.py registers it; until it does,
    the test adds it to the parser itself)."""
    import argparse
    main = importlib.import_module("minencdec.cli.main")
    from minencdec.cli import flax as flax_cli
    parser = main.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    if "import-flax" not in sub.choices:
        flax_cli.add_commands(sub)
    original = main.build_parser
    main.build_parser = lambda: parser
    try:
        code = main.main([str(a) for a in argv])
    finally:
        main.build_parser = original
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("change,message", [
    (lambda jc, t: jc["encoder"].update(query_pre_attn_norm="BY_EMBED_DIM_DIV_NUM_HEADS"),
     "query_pre_attn_norm BY_EMBED_DIM_DIV_NUM_HEADS"),
    (lambda jc, t: jc["decoder"].update(num_layers=3), "num_layers is 3 but attention_types has 2 entries"),
    (lambda jc, t: t.pop("decoder/layer_1/cross_attn/kv_einsum/w"), "missing decoder/layer_1/cross_attn/kv_einsum/w"),
    (lambda jc, t: t.update({"encoder/layer_0/mlp/linear": np.zeros((16, 24))}),
     "encoder/layer_0/mlp/linear has shape (16, 24), expected (24, 16)"),
    (lambda jc, t: t.update({"encoder/layer_2/mlp/linear": np.zeros((24, 16))}),
     "not part of a T5Gemma of this config: encoder/layer_2/mlp/linear"),
    (lambda jc, t: jc["encoder"].update(use_qk_norm=True), "unknown TransformerConfig fields ['use_qk_norm']"),
    (lambda jc, t: jc["encoder"].update(attention_types=["LOCAL", "GLOBAL"]), "attention_types must be a list of"),
    (lambda jc, t: jc["encoder"].update(local_base_frequency=1000), "RoPE bases 1000/10000"),
    (lambda jc, t: t.update({"decoder/final_norm/scale": np.full(16, np.nan)}), "holds NaN"),
])
def test_bad_input_is_named_and_nothing_is_written(tmp_path, capsys, change, message):
    jc, tree = jax_config(), flax_tree(jax_config())
    change(jc, tree)
    np.savez(tmp_path / "p.npz", **tree)
    (tmp_path / "c.json").write_text(json.dumps(jc))
    code, _, err = cli(["import-flax", "--params", tmp_path / "p.npz", "--jax-config", tmp_path / "c.json",
                        "--out", tmp_path / "out"], capsys)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_files_are_checked_and_never_unpickled(tmp_path, capsys):
    jc = jax_config()
    (tmp_path / "c.json").write_text(json.dumps(jc))
    np.savez(tmp_path / "obj.npz", **{**flax_tree(jc), "encoder/final_norm/scale": np.array([{"a": 1}], dtype=object)})
    (tmp_path / "bad.json").write_text("{not json")
    np.savez(tmp_path / "p.npz", **flax_tree(jc))
    for params, config, message in [(tmp_path / "obj.npz", tmp_path / "c.json", "obj.npz: not a readable .npz"),
                                    (tmp_path / "none.npz", tmp_path / "c.json", "none.npz: no such file"),
                                    (tmp_path / "p.npz", tmp_path / "bad.json", "bad.json: invalid JSON")]:
        code, _, err = cli(["import-flax", "--params", params, "--jax-config", config, "--out", tmp_path / "o"],
                           capsys)
        assert code == 2 and message in err, err
    assert not (tmp_path / "o").exists()
    code, out, _ = cli(["import-flax", "--params", tmp_path / "p.npz", "--jax-config", tmp_path / "c.json",
                        "--out", tmp_path / "o"], capsys)
    assert code == 0 and "T5Gemma 2+2 layers" in out and "'lt'" in out
    code, _, err = cli(["import-flax", "--params", tmp_path / "p.npz", "--jax-config", tmp_path / "c.json",
                        "--out", tmp_path / "o"], capsys)                         # never over a checkpoint unasked
    assert code == 2 and "overwrite" in err


def test_transformers_loads_it_and_applies_le(tmp_path):
    """transformers ignores the stored rule: on an input longer than the window its logits are
    minencdec's with "le", not with the stored "lt" (the documented difference)."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from minencdec import verify
    jc = jax_config()
    np.savez(tmp_path / "p.npz", **{k: v * 0.3 for k, v in flax_tree(jc).items()})
    (tmp_path / "c.json").write_text(json.dumps(jc))
    import_flax(tmp_path / "p.npz", tmp_path / "c.json", tmp_path / "out")
    ids = np.array([[5, 9, 17, 3, 8, 30, 4, 11]])                        # 8 tokens > window 3
    hf = verify.dump_transformers(tmp_path / "out", ids)["logits"]
    le = verify.dump_minencdec(load_pretrained(tmp_path / "out", "float64", bidirectional_window="le"), ids)["logits"]
    lt = verify.dump_minencdec(load_pretrained(tmp_path / "out", "float64"), ids)["logits"]
    scale = np.abs(hf).max()
    assert np.abs(hf - le).max() < 1e-9 * scale
    assert np.abs(hf - lt).max() > 1e-4 * scale
