# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 10. The official JAX T5Gemma against minencdec
#
# Tutorial 9 verified transformers. Here the other implementation is Google's own JAX/Flax
# T5Gemma (`gemma==3.3.0`, `gemma/research/t5gemma/`), taken as a verifier would take it:
# convert its parameters, compare every activation, find the first divergence, explain it,
# and prove where a remaining small difference comes from.
#
# **Install (once, in a separate virtual environment: gemma pulls tensorflow, ~5 GB):**
#
#     python -m venv jaxvenv
#     jaxvenv/bin/pip install "gemma==3.3.0" "jax[cpu]" "sentencepiece==0.2.2" kagglehub safetensors
#
# (`sentencepiece==0.2.2` is the one that works with the protobuf tensorflow brings; gemma's
# `config.py` imports `kagglehub`, which gemma does not declare.) In that environment,
# `tests/verify/jax_golden/make_jax_golden.py` builds two tiny random T5Gemmas, runs them in
# float64 (`jax_enable_x64`) and writes, per model, the Flax parameters (`.npz`, flattened
# with "/"), the two `TransformerConfig`s (`.json`) and JAX's activations as minencdec dumps
# (`write_dump`; `capture_intermediates` for module outputs, `sow` for q and k after RoPE).
# Those files are committed, so this tutorial runs without JAX.

# %%
import contextlib
import io
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import matplotlib
import numpy as np

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
try:
    import minencdec  # noqa: F401
except ImportError:                      # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
if "ipykernel" not in sys.modules:
    matplotlib.use("Agg")
import matplotlib.pyplot as plt

from minencdec import verify
from minencdec.io.flax import import_flax
from minencdec.io.pretrained import load_pretrained

GOLDEN = HERE.parent / "tests" / "verify" / "jax_golden"
FIG = Path(os.environ.get("MINENCDEC_FIGURES", HERE / "figures"))
FIG.mkdir(parents=True, exist_ok=True)
work = Path(tempfile.mkdtemp())

# %% [markdown]
# ## Convert
#
# `minencdec import-flax --params gqa.params.npz --jax-config gqa.jax_config.json --out DIR`
# (here its Python function) maps the Flax tree onto transformers' names: `q_einsum` (N, D,
# Dh) becomes `q_proj` (N*Dh, D), `kv_einsum` splits into `k_proj` and `v_proj`,
# `attn_vec_einsum` becomes `o_proj`, `gating_einsum` `gate_proj` and `up_proj`, `linear`
# `down_proj` (`minencdec/io/flax.py` lists every layout; `tests/io/test_flax.py` proves each
# against gemma's einsum). The model "gqa" has 4 query heads on 2 kv heads, a sliding window
# of 3 on inputs of 9 tokens, softcaps small enough to bite, and padding on both sides.

# %%
print(json.dumps(json.loads((GOLDEN / "gqa.jax_config.json").read_text())["encoder"]))
config = import_flax(GOLDEN / "gqa.params.npz", GOLDEN / "gqa.jax_config.json", work / "gqa")
print("encoder window rule stored in config.json:",
      json.loads((work / "gqa" / "config.json").read_text())["minencdec_bidirectional_window"])

# %% [markdown]
# ## The first comparison, and the divergence it finds
#
# Suppose the checkpoint were loaded with transformers' encoder window, `|i - j| <= w`
# (`bidirectional_window="le"`, what minencdec did for every T5Gemma before this
# checkpoint field existed). `compare` reruns JAX's inputs in minencdec and reports row by row:

# %%
jax64, _ = verify.read_dump(GOLDEN / "gqa.jax_rope64.safetensors")     # JAX, RoPE in float64 (below)
jax32, meta = verify.read_dump(GOLDEN / "gqa.jax.safetensors")         # JAX as shipped
print("JAX dump:", meta["producer"])
inputs = {k: jax64[k] for k in verify.INPUT_NAMES}
internals = ["encoder.layers.0", "decoder.layers.1"]


def ours(rule=None):
    model = load_pretrained(work / "gqa", "float64", bidirectional_window=rule)
    return verify.dump_minencdec(model, **inputs, internals=internals)


rows_le = verify.compare_dumps(ours("le"), jax64)
print("\n".join(verify.format_report(rows_le).splitlines()[:8]) + "\n ...\n"
      + "\n".join(verify.format_report(rows_le).splitlines()[-3:]))
first = next(r for r in rows_le if r.status == "DIFF")
assert first.name == "encoder.layers.0.self_attn.probs" and first.size == "divergent"
assert all(r.status == "OK" for r in rows_le if r.name.startswith("encoder.layers.0.self_attn.")
           and r.name.rsplit(".", 1)[1] in ("q", "k", "scores"))

# %% [markdown]
# The attention internals say exactly what differs. q and k after RoPE agree, so do the
# scores: the projections, RoPE, the query scaling and the softcap are the same. The
# probabilities do not: the same scores were softmaxed over different keys, so the **mask**
# differs. JAX's `get_sliding_mask` keeps `|i - j| < w` (`jnp.triu(mask, 1 - w)`, then
# `jnp.tril(mask, w - 1)` for the bidirectional encoder); transformers 5.x keeps `<= w`.
# Layer 0 is a sliding layer and the inputs are longer than the window, so the rules differ.
# This is why `import-flax` stores `"minencdec_bidirectional_window": "lt"` in `config.json`:
# minencdec then applies JAX's rule (transformers ignores the field and applies `<= w`).
#
# ## With the JAX window rule: float32-level, first at RoPE

# %%
acts = ours()                                          # the stored rule, "lt"
rows_32 = verify.compare_dumps(acts, jax32)
print("\n".join(verify.format_report(rows_32).splitlines()[:6]) + "\n ...\n"
      + "\n".join(verify.format_report(rows_32).splitlines()[-4:]))
first = next(r for r in rows_32 if r.status == "DIFF")
assert first.name == "encoder.layers.0.self_attn.q" and first.size == "float32-level"
assert all(r.size in ("exact", "float64-level") for r in rows_32[:rows_32.index(first)])
assert all(r.size == "float32-level" for r in rows_32 if r.status == "DIFF")

# %% [markdown]
# Every row now differs by ~1e-8 to 1e-7 of its scale: far below any bug, far above float64
# rounding. The first row is q after RoPE, while the embedding before it agrees to ~1e-16, so
# the difference enters between the layer's input and q: in the projection or in RoPE.
# gemma's `apply_rope` (`gemma/gm/math/_positional_embeddings.py`) builds its timescale with
# `jnp.arange(..., dtype=jnp.float32)`, even with `jax_enable_x64`: the angles are float32
# (about 1e-7 rad off here; 6e-4 rad at position 8192 with head_dim 256).
#
# ## The proof: RoPE computed in float64 on the JAX side

# %%
rows_64 = verify.compare_dumps(acts, jax64)
print(verify.format_report(rows_64).splitlines()[-1])
worst = max(r.max_rel for r in rows_64)
print(f"largest relative difference over {len(rows_64)} tensors: {worst:.1e}")
assert all(r.status == "OK" for r in rows_64) and worst < 1e-13

# %% [markdown]
# The golden generator's second run replaces that one function with a float64 copy, and every
# tensor, internals included, agrees to float64 rounding (~1e-15). So the float32-level
# difference was JAX's RoPE and nothing else: a float32 island, not a bug. The fix on each
# side: minencdec stores and applies the JAX window rule (`import-flax`, or
# `load_pretrained(..., bidirectional_window="lt")`, `dump`/`compare --bidirectional-window
# lt`); on the JAX side, a float64 timescale in `apply_rope` if float64 angles are wanted.
#
# Two more differences to know, both handled by the dumps: JAX derives every mask from
# `ids != 0` and hides padded encoder keys from cross-attention (as minencdec does), and it
# numbers positions from a row's first real token, so a left-padded row's q and k are turned
# by other angles (its scores are not: RoPE is relative); `compare` leaves left-padded rows
# out of q and k.

# %%
fig, ax = plt.subplots(figsize=(13, 5))
FLOOR = 1e-18
names = [r.name for r in rows_64]
x = np.arange(len(names))
for rows, label, style in ((rows_le, "window rule <= w (transformers)", "^-"),
                           (rows_32, "rule < w, JAX's RoPE in float32 (as shipped)", "s-"),
                           (rows_64, "rule < w, JAX's RoPE in float64", "o-")):
    assert [r.name for r in rows] == names
    ax.semilogy(x, [max(r.max_rel, FLOOR) for r in rows], style, ms=4, label=label)
for level, text in ((verify.RTOL_F64, "RTOL_F64: float64-level below"), (verify.F32_LEVEL, "F32_LEVEL: divergent above")):
    ax.axhline(level, color="0.5", ls="--", lw=1)
    ax.text(len(x) - 0.3, level, text, va="center", fontsize=8, backgroundcolor="white")
ax.set_xticks(x, [n.replace("coder.layers.", "c.L").replace("coder.", "c.").replace("self_attn", "sa")
                  .replace("cross_attn", "xa") for n in names], rotation=70, ha="right", fontsize=7)
ax.set_ylim(FLOOR / 3, 30)
ax.set_ylabel("max |minencdec - JAX| / max |JAX|")
ax.set_title("JAX T5Gemma (gemma 3.3.0) against minencdec, float64: the window rule, then the float32 RoPE island")
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
fig.savefig(FIG / "10_jax_divergence.png", dpi=110)

# %% [markdown]
# ## The same from the command line
#
#     minencdec import-flax --params gqa.params.npz --jax-config gqa.jax_config.json --out gqa
#     minencdec compare --model gqa --against gqa.jax.safetensors          # float32-level, exit 1
#     minencdec compare --model gqa --against gqa.jax_rope64.safetensors   # all agree, exit 0
#     minencdec compare --model gqa --against gqa.jax_rope64.safetensors --bidirectional-window le

# %%
from minencdec import cli  # noqa: E402

for dump, rule in (("gqa.jax_rope64.safetensors", None), ("gqa.jax_rope64.safetensors", "le")):
    argv = ["compare", "--model", str(work / "gqa"), "--against", str(GOLDEN / dump)]
    argv += ["--bidirectional-window", rule] if rule else []
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = cli.main(argv)
    print(f"minencdec compare --against {dump}{' --bidirectional-window ' + rule if rule else ''} -> exit {code}:",
          *out.getvalue().splitlines()[-2:], sep="\n  ")
    assert code == (1 if rule else 0)
