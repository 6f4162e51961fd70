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
# # 12. The official JAX T5Gemma against minencdec
#
# Tutorial 11 verified transformers. Here the other implementation is Google's own JAX/Flax
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
import numpy as np

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
try:
    import minencdec  # noqa: F401
except ImportError:                      # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
import plots                             # tutorials/plots.py: matplotlib set up, figures to plots.FIG
import matplotlib.pyplot as plt
from exercises import grade

from minencdec import verify
from minencdec.io.flax import import_flax
from minencdec.io.pretrained import load_pretrained

GOLDEN = HERE.parent / "tests" / "verify" / "jax_golden"
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
# `jnp.arange(..., dtype=jnp.float32)`, even with `jax_enable_x64`: the angles are float32.
# Here that moves q by about 1e-7 of its scale (the two JAX dumps, measured below); at real
# lengths it is more: an angle computed in float32 at position 8192 with head_dim 256 is
# off by up to ~1e-3 rad (computed below in NumPy, float32 against float64).

# %%
q32, q64 = jax32["encoder.layers.0.self_attn.q"], jax64["encoder.layers.0.self_attn.q"]
print(f"JAX's q, float32 RoPE vs float64 RoPE: max rel diff {np.abs(q32 - q64).max() / np.abs(q64).max():.1e}")
assert 1e-9 < np.abs(q32 - q64).max() / np.abs(q64).max() < 1e-6


def float32_angle_error(position, head_dim, base=10_000.0):
    """max over the pairs of |angle in float32 - angle in float64| (radians) at one position."""
    i32 = np.arange(head_dim // 2, dtype=np.float32)
    angle32 = np.float32(position) / np.float32(base) ** (np.float32(2) * i32 / np.float32(head_dim))
    angle64 = position / base ** (2.0 * np.arange(head_dim // 2) / head_dim)
    return float(np.abs(angle32.astype(np.float64) - angle64).max())


print(f"float32 angle error at position 8192, head_dim 256: {float32_angle_error(8192, 256):.1e} rad")
assert 3e-4 < float32_angle_error(8192, 256) < 3e-3

# %% [markdown]
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
names = [r.name for r in rows_64]
series = {"window rule <= w (transformers)": (rows_le, "^-"),
          "rule < w, JAX's RoPE in float32 (as shipped)": (rows_32, "s-"),
          "rule < w, JAX's RoPE in float64": (rows_64, "o-")}
assert all([r.name for r in rows] == names for rows, _ in series.values())
plots.agreement(ax, names, series, [(verify.RTOL_F64, "RTOL_F64: float64-level below", "0.4"),
                                    (verify.F32_LEVEL, "F32_LEVEL: divergent above", "0.4")],
                "JAX T5Gemma (gemma 3.3.0) against minencdec, float64: the window rule, then the float32 RoPE island",
                "max |minencdec - JAX| / max |JAX|")
ax.legend(fontsize=8, loc="lower right")
fig.tight_layout()
plots.save(fig, "12_jax_divergence.png")

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

# %% [markdown]
# ## Exercises
#
# **12.1 How far apart are the two window rules?** For a bidirectional sliding layer with
# window w on a sequence of T tokens, write `rule_gap(T, w)`: the number of (query, key)
# pairs that `|i - j| <= w` allows and `|i - j| < w` does not. The check counts them in the
# library's two masks for many (T, w); T - w, counting one side of the diagonal only, must
# fail.

# %%
my_rule_gap = None            # your answer: a function (T, w) -> int

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_rule_gap(T, w):
    return 2 * max(T - w, 0)         # the pairs at distance exactly w, on both sides of the diagonal


# %%
def check_rule_gap(rule_gap):
    from minencdec.model.attention import bidirectional_mask
    for T, w in ((9, 3), (12, 4), (5, 5), (4, 6), (30, 1)):
        want = int((bidirectional_mask(T, w, "le") & ~bidirectional_mask(T, w, "lt")).sum())
        assert rule_gap(T, w) == want, (T, w, rule_gap(T, w), want)


grade("Exercise 12.1", check_rule_gap, answer=my_rule_gap, solution=solution_rule_gap, wrong=lambda T, w: max(T - w, 0))

# %% [markdown]
# **12.2 When does a float32 angle start to matter?** With head_dim 256 and base 10000,
# write `first_position(tol)`: the first position at which some pair's float32 angle is off
# by more than `tol` radians (use `float32_angle_error` above, or write your own). The check
# scans the positions itself for two tolerances; a position computed from float32's epsilon
# alone (tol / 1.2e-7, as if the error were position times epsilon) must fail.

# %%
my_first_position = None      # your answer: a function (tol) -> int

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_first_position(tol):
    position = 0
    while float32_angle_error(position, 256) <= tol:
        position += 1
    return position


# %%
def check_first_position(first_position):
    for tol in (1e-6, 1e-5):
        p = first_position(tol)
        assert float32_angle_error(p, 256) > tol and all(float32_angle_error(q, 256) <= tol for q in range(p)), (tol, p)


grade("Exercise 12.2", check_first_position, answer=my_first_position, solution=solution_first_position,
      wrong=lambda tol: int(tol / 1.2e-7))
print("figures:", sorted(f.name for f in plots.FIG.glob("12_*.png")))
