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
# # 11. Verifying another implementation, layer by layer
#
# You have ported T5Gemma to JAX, C++ or your own PyTorch, and its logits differ from the
# reference by 1e-3. Is that rounding, or a bug, and where? Comparing the logits cannot say:
# every mistake ends up there, mixed with everything else. Comparing **every sublayer's
# output** can: the first one that disagrees is where the bug is.
#
# `minencdec/verify/dumps.py` defines a dump format (one safetensors file holding the inputs and
# every activation under fixed names), writes dumps of minencdec and of transformers, and
# prints a per-sublayer report. Here we verify three "foreign" implementations against it:
# a port with a planted bug, transformers made exact, and transformers as it ships.

# %%
import contextlib
import dataclasses
import io
import os
import sys
import tempfile
from pathlib import Path

# One BLAS thread: faster for these tiny matrices, and steady on a busy machine (before numpy loads).
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

from minencdec import cli
from minencdec import verify
from minencdec.io.pretrained import load_pretrained
from minencdec.model import backend
from minencdec.model.config import T5GemmaConfig
from minencdec.model.presets import preset
from minencdec.model.layers import rmsnorm_forward
from minencdec.model.t5gemma import T5GemmaModel

QUICK = os.environ.get("MINENCDEC_QUICK") == "1"     # the test suite's small sizes
rng = np.random.default_rng(0)

# %% [markdown]
# ## A checkpoint both implementations load
#
# A small T5Gemma in **float64**, with random norm offsets (zeros would hide a missing
# `1 +`), saved as a Hugging Face directory: any implementation can read it.

# %%
layers = 2 if QUICK else 4
cfg = preset("nano", num_hidden_layers=layers)
model = T5GemmaModel.random(T5GemmaConfig(cfg, cfg), seed=0, dtype="float64")
for name, p in model.params.items():
    if p.ndim == 1:
        model.params[name] = rng.normal(0, 0.1, p.shape)
work = Path(tempfile.mkdtemp())
model.save_pretrained(work / "t5gemma-nano")
input_ids = rng.integers(3, cfg.vocab_size, (2, 10))
decoder_input_ids = rng.integers(3, cfg.vocab_size, (2, 6))

# %% [markdown]
# ## Dump every activation
#
# `dump_minencdec` runs the model with a `record` dict and returns the inputs (masks made
# explicit) and every activation, named as in the format: `encoder.embed`, then for each
# layer its sublayers' outputs **after their post-norm** (exactly the term added to the
# residual stream) and the layer's output, `encoder.norm`, the same for the decoder with a
# `cross_attn` sublayer, and the `logits`. `write_dump` stores them with metadata.

# %%
ours = verify.dump_minencdec(model, input_ids, decoder_input_ids=decoder_input_ids)
verify.write_dump(work / "ours.safetensors", ours,
                  {"kind": "t5gemma", "dtype": "float64", "producer": "minencdec"})
acts, meta = verify.read_dump(work / "ours.safetensors")
names = sorted((n for n in acts if n not in verify.INPUT_NAMES), key=verify.model_order)
print(f"{len(names)} activations, e.g.:", ", ".join(f"{n} {acts[n].shape}" for n in names[:3] + names[-2:]))
print("metadata:", {k: meta[k] for k in ("format", "format_version", "kind", "producer")})
assert all(np.array_equal(acts[n], ours[n]) for n in ours)
assert len(names) == 2 * (2 + 3 * layers) + layers + 1          # embed, sublayers, layers, norm; logits

# %% [markdown]
# ## A port with a planted bug
#
# A typical porting slip: one tensor passes through bfloat16 on its way in (here the
# decoder's layer-1 `pre_feedforward_layernorm`). bfloat16 is float32's top 16 bits: the
# sign, the same 8 exponent bits, and 7 stored mantissa bits (8 significant bits with the
# implicit leading one). Converting a float32 rounds to the nearest bfloat16, ties to the
# even one, as `torch.Tensor.to(torch.bfloat16)` does (checked below when torch is
# installed; exercise 11.2 has you write it). The port
# is otherwise our own code, so every activation before that norm is **bit-identical**.
# `compare_dumps(theirs, ours)` takes ours as the reference: an entry fails when
# |theirs - ours| > rtol max|ours|, with rtol = `RTOL_F64` = 1e-9 for float64 dumps.

# %%
def through_bfloat16(w):
    """w stored as bfloat16 and read back: float32 rounded to its top 16 bits, to nearest,
    ties to even (add 0x7FFF plus the lowest kept bit, then cut; finite values only)."""
    bits = w.astype(np.float32).view(np.uint32).astype(np.uint64)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.astype(np.uint32).view(np.float32).astype(np.float64)


try:
    import torch
except ImportError:
    print("note: torch not installed; the rounding is checked by exercise 11.2's hand-made cases")
else:
    sample = rng.normal(size=10_000).astype(np.float32)
    assert np.array_equal(through_bfloat16(sample), torch.from_numpy(sample).to(torch.bfloat16).double().numpy())
    print("through_bfloat16 == torch's float32 -> bfloat16 conversion on 10,000 random numbers")



BUG = "model.decoder.layers.1.pre_feedforward_layernorm.weight"
buggy = T5GemmaModel(model.config, {**model.params, BUG: through_bfloat16(model.params[BUG])}, "float64")
print(f"largest change to {BUG}: {np.abs(buggy.params[BUG] - model.params[BUG]).max():.1e}")
theirs = verify.dump_minencdec(buggy, input_ids, decoder_input_ids=decoder_input_ids)
verify.write_dump(work / "theirs.safetensors", theirs, {"kind": "t5gemma", "producer": "a port with a bug"})
rows_bug = verify.compare_dumps(verify.read_dump(work / "theirs.safetensors")[0], acts)
print(verify.format_report(rows_bug))

# %% [markdown]
# ## How the first divergence is found
#
# The rows are in **model order** (`verify.model_order`): embedding, each layer's sublayers
# in the order they run, the layer, the final norm, encoder before decoder, logits last.
# An error, once made, flows into everything downstream, so all rows after the first `DIFF`
# are consequences. The first one is the bug: its input (the row above) still agrees, its
# output does not, so the mistake is inside that one sublayer. Here the report points at
# `decoder.layers.1.mlp`, whose pre-norm is the tensor we damaged; the encoder and everything
# earlier in the decoder agree with error exactly 0.

# %%
first = next(r for r in rows_bug if r.status == "DIFF")
before = rows_bug[:rows_bug.index(first)]
assert first.name == "decoder.layers.1.mlp" and all(r.status == "OK" and r.max_abs == 0 for r in before)
assert all(r.status == "DIFF" for r in rows_bug[rows_bug.index(first):])        # and all that follows
loose = verify.compare_dumps(theirs, ours, rtol=verify.RTOL_F32)
assert all(r.status == "OK" for r in loose)
print(f"first divergence: {first.name}, max rel {first.max_rel:.1e}. At float32's tolerance "
      f"(rtol {verify.RTOL_F32}) the same bug passes: all {len(loose)} rows OK")

# %% [markdown]
# The last check is the reason to verify in float64. The bug moves the logits by about
# 1e-4 of their scale: below what a float32 comparison must allow for rounding (1e-3 on deep
# models), and 10^5 times float64's threshold.
#
# ## transformers as the foreign implementation
#
# Now a truly independent implementation: transformers' `T5GemmaForConditionalGeneration`
# loads the same directory, and `dump_transformers` records the same activations with
# forward hooks. transformers in float64 still computes a few things in float32 (RMSNorm,
# the attention softmax, RoPE's angles: "float32 islands"). `hf_oracle.float64_exact()`
# patches exactly those to run in float64; `exact=False` leaves them as shipped. Without
# torch we build the same two comparisons in NumPy: a port whose RMSNorm is written in a
# different but equivalent float64 order, and one that computes RMSNorm in float32.

# %%
def numpy_port(rmsnorm):
    """A NumPy 'port': minencdec's reference with a foreign RMSNorm swapped into the record of
    functions the stack calls (minencdec.model.backend.NUMPY; the forward pass needs no cache)."""
    original = backend.NUMPY
    backend.NUMPY = dataclasses.replace(original, rmsnorm_forward=lambda x, w, eps: (rmsnorm(x, w, eps), None))
    try:
        return verify.dump_minencdec(model, input_ids, decoder_input_ids=decoder_input_ids)
    finally:
        backend.NUMPY = original


try:
    import torch  # noqa: F401
    import transformers
except ImportError:
    print("torch/transformers not installed: the foreign implementations are NumPy ports")
    exact = numpy_port(lambda x, w, eps: x * (1 + w) / np.sqrt((x**2).sum(-1, keepdims=True) / x.shape[-1]
                                                               + eps))
    islands = numpy_port(lambda x, w, eps: rmsnorm_forward(x.astype(np.float32), w.astype(np.float32),
                                                           np.float32(eps))[0].astype(np.float64))
    labels = ["float64, RMSNorm re-associated", "RMSNorm in float32"]
else:
    print("transformers", transformers.__version__)
    kw = dict(input_ids=input_ids, decoder_input_ids=decoder_input_ids)
    exact = verify.dump_transformers(work / "t5gemma-nano", **kw, exact=True)
    islands = verify.dump_transformers(work / "t5gemma-nano", **kw, exact=False)
    labels = ["transformers, float64_exact()", "transformers as shipped (float32 islands)"]
rows_exact, rows_islands = verify.compare_dumps(exact, ours), verify.compare_dumps(islands, ours)
print(f"--- {labels[0]}\n{verify.format_report(rows_exact)}")
print(f"--- {labels[1]}\n" + "\n".join(verify.format_report(rows_islands).splitlines()[:6]) + "\n ...")
assert all(r.status == "OK" and r.max_rel < 1e-13 for r in rows_exact)
assert [r.name for r in rows_islands if r.status == "OK"] == ["encoder.embed", "decoder.embed"]
assert all(1e-9 < r.max_rel < 1e-5 for r in rows_islands if r.status == "DIFF")
assert next(r for r in rows_islands if r.status == "DIFF").name == "encoder.layers.0.self_attn"

# %% [markdown]
# Made exact, transformers agrees with minencdec to ~1e-15 everywhere: two independent
# implementations, differing only in the order of their roundings. As shipped, every row
# from the first norm on is ~1e-7 off. The embeddings still agree (no norm yet), and the
# first divergence is `encoder.layers.0.self_attn`, the first sublayer that begins with an
# RMSNorm.
#
# ## Why float64, and why 1e-9
#
# float64 carries 53 bits: machine epsilon 2.2e-16. Two correct float64 implementations
# differ only in the order of their additions, which leaves errors of a few epsilon times
# the growth over the layers: ~1e-15 here, ~1e-14 for deep models. float32's epsilon is
# 1.2e-7, so one float32 island anywhere leaves ~1e-7, and real bugs (a missing `1 +`, a
# wrong window, scale or softcap, RoPE's halves swapped) leave 1e-4 and more. `RTOL_F64` =
# 1e-9 sits in the empty gap: 10^5 above honest rounding, 10^2 below a float32 island. In
# float32 there is no gap: rounding noise reaches 1e-4 on deep models, `RTOL_F32` must be
# 1e-3, and our bfloat16 bug hides below it.

# %%
fig, ax = plt.subplots(figsize=(13, 5))
series = {labels[0]: (rows_exact, "o-"), labels[1]: (rows_islands, "s-"),
          "port with one norm read through bfloat16": (rows_bug, "^-")}
assert all([r.name for r in rows] == [r.name for r in rows_bug] for rows, _ in series.values())
plots.agreement(ax, [r.name for r in rows_bug], series,
                [(np.finfo(np.float64).eps, "float64 epsilon", "0.5"), (np.finfo(np.float32).eps, "float32 epsilon", "0.5"),
                 (verify.RTOL_F64, "RTOL_F64 = 1e-9", "tab:red"), (verify.RTOL_F32, "RTOL_F32 = 1e-3", "tab:purple")],
                "per-sublayer agreement with minencdec (float64): honest rounding, float32 islands, and a bug",
                "max |theirs - ours| / max |ours|")
ax.legend(fontsize=8, loc="upper left")
fig.tight_layout()
plots.save(fig, "11_divergence.png")

# %% [markdown]
# ## From the command line
#
# The same tools are commands, so the other implementation needs to write only the dump:
#
#     minencdec dump --model DIR --input-ids "2 45 17 9" --out ours.safetensors
#     minencdec compare theirs.safetensors ours.safetensors
#     minencdec compare --model DIR --against transformers --input-ids "2 45 17 9"
#
# `compare` prints the report and exits with 0 when everything agrees, 1 otherwise (2 on
# bad input), so it can gate a test suite.

# %%
codes = {}
for a in ("theirs", "ours"):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        codes[a] = cli.main(["compare", str(work / f"{a}.safetensors"), str(work / "ours.safetensors")])
    print(f"minencdec compare {a}.safetensors ours.safetensors -> exit {codes[a]}: "
          f"{out.getvalue().splitlines()[-1]}")
assert codes == {"theirs": 1, "ours": 0}

# %% [markdown]
# ## Exercises
#
# **11.1 Find the first divergence of a window rule.** Load the same checkpoint with the
# encoder's other window rule, `load_pretrained(work / "t5gemma-nano", "float64",
# bidirectional_window="lt")`, dump it and compare it with `ours`. Before running it:
# which row is the first `DIFF`? Set `my_first_row` to its name. The check runs the
# comparison; "decoder.layers.0.self_attn" (as if the decoder's causal window used the rule)
# must fail.

# %%
my_first_row = None           # your answer: a row name, e.g. "encoder.layers.1.mlp"

# %% tags=["solution"] jupyter={"source_hidden": true}
solution_first_row = "encoder.layers.0.self_attn"   # layer 0 slides (w = 4 < 10 tokens); the decoder is causal


# %%
def check_first_row(name):
    lt = load_pretrained(work / "t5gemma-nano", "float64", bidirectional_window="lt")
    rows = verify.compare_dumps(verify.dump_minencdec(lt, input_ids, decoder_input_ids=decoder_input_ids), ours)
    first_diff = next(r.name for r in rows if r.status == "DIFF")
    assert name == first_diff, f"the first divergence is {first_diff}"


grade("Exercise 11.1", check_first_row, answer=my_first_row, solution=solution_first_row,
      wrong="decoder.layers.0.self_attn")

# %% [markdown]
# **11.2 Round to bfloat16 yourself.** Write `to_bfloat16(x)` for a float32 array: the
# nearest bfloat16 value, ties to the even one (the one whose last kept mantissa bit is 0),
# returned as float32. The check uses numbers whose answers follow from the bit layout
# alone: 1 + 2^-8 lies exactly halfway between 1 and the next bfloat16, 1 + 2^-7, and must
# round to 1 (even); 1 + 3 2^-8 lies halfway between 1 + 2^-7 and 1 + 2^-6 and must round up
# to 1 + 2^-6 (even); anything past halfway rounds up. Plain truncation, keeping the top 16
# bits, must fail.

# %%
my_to_bfloat16 = None         # your answer: a function (float32 array) -> float32 array

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_to_bfloat16(x):
    return through_bfloat16(np.asarray(x, np.float32)).astype(np.float32)


# %%
def check_to_bfloat16(to_bfloat16):
    e = 2.0 ** -8
    cases = {1 + e: 1.0, 1 + 3 * e: 1 + 4 * e, 1 + e + 2.0 ** -20: 1 + 2 * e, -(1 + e + 2.0 ** -20): -(1 + 2 * e),
             1 + 2 * e: 1 + 2 * e, 3.0: 3.0, 2.0 ** -130 * 3: 2.0 ** -130 * 3}
    x = np.array(list(cases), np.float32)
    got = np.asarray(to_bfloat16(x), np.float32)
    assert np.array_equal(got, np.array(list(cases.values()), np.float32)), dict(zip(x.tolist(), got.tolist()))


grade("Exercise 11.2", check_to_bfloat16, answer=my_to_bfloat16, solution=solution_to_bfloat16,
      wrong=lambda x: (np.asarray(x, np.float32).view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32))
print("figures:", sorted(f.name for f in plots.FIG.glob("11_*.png")))
