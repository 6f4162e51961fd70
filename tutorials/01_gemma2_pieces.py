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
# # 1. Gemma 2's small pieces: RMSNorm, GeGLU, RoPE, softcapping
#
# Every layer of Gemma 2 (and of the T5Gemma encoder and decoder built from it) is made of
# four small pieces. Each lives in `minencdec/model/layers.py` as two pure functions side by side:
# `piece_forward(x, ...) -> (y, cache)` and `piece_backward(dy, cache) -> gradients`.
# Here we run them, derive each backward by hand, and check every derivation with finite
# differences. Nothing below re-implements a piece: we only call the library.
#
# Run it with `python tutorials/01_gemma2_pieces.py` from the repository root, or open it as a
# notebook (see `tutorials/README.md`).

# %%
import os
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()
try:
    import minencdec  # noqa: F401
except ImportError:                      # a checkout without `pip install -e .`
    sys.path.insert(0, str(HERE.parent))
import plots                             # tutorials/plots.py: matplotlib set up, figures to plots.FIG
import matplotlib.pyplot as plt
from exercises import grade

from minencdec.model.layers import (gelu_tanh_backward, gelu_tanh_forward, mlp_backward, mlp_forward,
                                    rmsnorm_backward, rmsnorm_forward, rope_backward, rope_cos_sin,
                                    rope_forward, softcap_backward, softcap_forward)

QUICK = os.environ.get("MINENCDEC_QUICK") == "1"     # the test suite's small sizes
rng = np.random.default_rng(0)

# %% [markdown]
# ## A finite-difference checker in five lines
#
# A backward pass is a claim: "this is dL/dx". We test the claim against the definition of a
# derivative. For a scalar loss L and one entry x[i], the central difference
# (L(x + h e_i) - L(x - h e_i)) / 2h has error O(h^2); in float64 with h = 1e-5 it agrees
# with the true derivative to about 1e-9 relative. Every piece below has a vector output y,
# so we make a scalar with a fixed random probe g: L = sum(y * g), which makes dL/dy = g.
# That g is exactly the `dy` we feed to the backward.

# %%
def fd_error(loss, x, grad, n=8, h=1e-5):
    """Max |finite difference - grad| / max|grad| over n random entries of x (x float64)."""
    errs = []
    for i in map(tuple, rng.integers(0, x.shape, size=(n, x.ndim))):
        old = x[i]; x[i] = old + h; up = loss(); x[i] = old - h; down = loss(); x[i] = old  # noqa: E702
        errs.append(abs((up - down) / (2 * h) - grad[i]))
    return max(errs) / np.max(np.abs(grad))

FD_TOL = 1e-6        # float64 central differences land near 1e-9; a wrong formula is off by O(1)

# %% [markdown]
# ## RMSNorm with (1 + w)
#
# $$ y = \frac{x}{\sqrt{\mathrm{mean}(x^2) + \epsilon}} \odot (1 + w), \qquad \epsilon = 10^{-6} $$
#
# Gemma stores the scale as an **offset from one**. A freshly initialised `w = 0` is then the
# identity scale, and a checkpoint's numbers are small deviations around zero. Load a Gemma
# checkpoint into an ordinary RMSNorm (`x_hat * w`) and every layer is scaled by w instead of
# 1 + w: silently wrong, and the model produces garbage.
#
# **The backward.** Write r = (mean(x^2) + eps)^(-1/2) and x_hat = x r. From
# y = x_hat (1 + w): dw = sum over rows of dy x_hat, and d x_hat = dy (1 + w).
# Then x_hat = x r with dr/dx_k = -r^3 x_k / D gives
# d x_hat_i / d x_k = r (delta_ik - x_hat_i x_hat_k / D), so
#
# $$ dx = r \,\big(d\hat x - \hat x \cdot \mathrm{mean}(d\hat x \odot \hat x)\big) $$
#
# These are the three lines of `rmsnorm_backward`. At eps = 0 the bracket is the incoming
# gradient with its component along x_hat removed: then |x_hat|^2 = D exactly, scaling x
# does not change x_hat at all, and x . dx = 0. With eps > 0, |x_hat|^2 = D ms / (ms + eps)
# (ms = mean(x^2)) is a little less than D: a longer x does move x_hat a little, and
# x . dx = (x_hat . d x_hat) eps / (ms + eps) instead of 0. We check both below, with a
# large eps so the sliver is visible.

# %%
B, T, D = (2, 3, 8) if QUICK else (4, 16, 64)
x = rng.normal(size=(B, T, D))
w = rng.normal(scale=0.3, size=D)          # random, non-zero: see below why never w = 0
g = rng.normal(size=(B, T, D))             # the probe: L = sum(y * g)

y, cache = rmsnorm_forward(x, w, 1e-6)
dx, dw = rmsnorm_backward(g, cache)
xhat = y / (1 + w)
print("rms of x_hat per row (should be ~1):", np.sqrt(np.mean(xhat ** 2, axis=-1)).ravel()[:4])
assert np.allclose(np.sqrt(np.mean(xhat ** 2, axis=-1)), 1.0, atol=1e-5)

loss = lambda: np.sum(rmsnorm_forward(x, w, 1e-6)[0] * g)     # noqa: E731
err_x, err_w = fd_error(loss, x, dx), fd_error(loss, w, dw)
print(f"RMSNorm  dx rel err {err_x:.1e}   dw rel err {err_w:.1e}")
assert err_x < FD_TOL and err_w < FD_TOL

for eps in (0.0, 0.5):                                     # the projection holds exactly at eps = 0 only
    y_e, cache_e = rmsnorm_forward(x, w, eps)
    dx_e, _ = rmsnorm_backward(g, cache_e)
    ms = np.mean(x ** 2, axis=-1)
    along = np.sum(y_e / (1 + w) * g * (1 + w), axis=-1) * eps / (ms + eps)   # (x_hat . d x_hat) eps / (ms + eps)
    print(f"eps = {eps}: max |x . dx| = {np.abs(np.sum(x * dx_e, -1)).max():.1e}, predicted {np.abs(along).max():.1e}")
    assert np.allclose(np.sum(x * dx_e, axis=-1), along, rtol=1e-9, atol=1e-12)

# %% [markdown]
# **Why zeros would hide a bug.** Suppose someone wrote `dw = sum(dy * y)` (the output instead
# of x_hat; an easy slip, since y = x_hat (1 + w)). At w = 0, y *is* x_hat, so the wrong
# formula gives exactly the right numbers and a finite-difference test at the default
# initialisation passes. With a random w the same test catches it. This is why every test
# of this library uses random, non-zero norm weights.

# %%
def wrong_dw(dy, y):
    return np.sum(dy * y, axis=(0, 1))      # the slip: y instead of x_hat

for w_try, label in [(np.zeros(D), "w = 0     "), (w, "w random  ")]:
    y_try, _ = rmsnorm_forward(x, w_try, 1e-6)
    loss_try = lambda: np.sum(rmsnorm_forward(x, w_try, 1e-6)[0] * g)   # noqa: E731
    err = fd_error(loss_try, w_try, wrong_dw(g, y_try))
    print(f"{label} wrong dw: rel err {err:.1e}  -> {'passes (bug hidden)' if err < FD_TOL else 'caught'}")
    assert (err < FD_TOL) == (label.startswith("w = 0"))

# %% [markdown]
# ## tanh-GELU and the GeGLU MLP
#
# $$ \mathrm{gelu}(x) = \tfrac12 x \big(1 + \tanh(c\,(x + 0.044715 x^3))\big), \quad c = \sqrt{2/\pi} $$
# $$ \mathrm{MLP}(x) = W_\text{down}\big(\mathrm{gelu}(W_\text{gate} x) \odot W_\text{up} x\big) $$
#
# With t = tanh(c u), u = x + 0.044715 x^3, the product rule gives
# gelu'(x) = 1/2 (1 + t) + 1/2 x (1 - t^2) c (1 + 3 * 0.044715 x^2).
# The MLP backward reads its forward bottom-up: `down` (a linear: dx = dy W, dW = dy^T x),
# then the product h = a * u (da = dh * u, du = dh * a), then the GELU, then `up` and `gate`.
# Both `gate` and `up` read the same x, so x receives the **sum** of their gradients.

# %%
F = 16 if QUICK else 128
xs = rng.normal(size=(B, T, D))
w_gate, w_up = rng.normal(scale=D ** -0.5, size=(2, F, D))
w_down = rng.normal(scale=F ** -0.5, size=(D, F))
g = rng.normal(size=(B, T, D))

_, act_cache = gelu_tanh_forward(xs)
loss_gelu = lambda: np.sum(gelu_tanh_forward(xs)[0] * g)                      # noqa: E731
err = fd_error(loss_gelu, xs, gelu_tanh_backward(g, act_cache))
print(f"gelu     dx rel err {err:.1e}")
assert err < FD_TOL

_, mlp_cache = mlp_forward(xs, w_gate, w_up, w_down)
grads = mlp_backward(g, mlp_cache)                    # dx, dw_gate, dw_up, dw_down
loss_mlp = lambda: np.sum(mlp_forward(xs, w_gate, w_up, w_down)[0] * g)      # noqa: E731
for name, arr, grad in zip(["x", "w_gate", "w_up", "w_down"], [xs, w_gate, w_up, w_down], grads):
    err = fd_error(loss_mlp, arr, grad)
    print(f"GeGLU    d{name:<7} rel err {err:.1e}")
    assert err < FD_TOL

# %% [markdown]
# ## RoPE: rotating pairs of dimensions by position
#
# Gemma uses the **half-split** convention: in a head of dimension Dh, dimension i and
# dimension i + Dh/2 form a pair, and at position m that pair is rotated by the angle
# m f_i with f_i = 10000^(-2i/Dh). The first pairs spin fast, the last ones barely move.
# In code: y = x cos + rotate_half(x) sin, where rotate_half maps [x1, x2] to [-x2, x1].
#
# Three facts to check: (1) each pair is an ordinary 2-D rotation by m f_i; (2) rotations
# keep the norm; (3) the reason RoPE exists: the score between a query at position m and a
# key at position n depends only on m - n, because R(m)^T R(n) = R(n - m).

# %%
Dh, P = 64, 48
half = Dh // 2
positions = np.arange(P)
cos, sin = rope_cos_sin(positions, Dh, 10000.0, np.float64)          # (P, Dh) each
q = rng.normal(size=Dh)
k = rng.normal(size=Dh)
q_rot, _ = rope_forward(np.broadcast_to(q, (1, 1, P, Dh)), cos[None, None], sin[None, None])
k_rot, _ = rope_forward(np.broadcast_to(k, (1, 1, P, Dh)), cos[None, None], sin[None, None])
q_rot, k_rot = q_rot[0, 0], k_rot[0, 0]                              # (P, Dh): q at every position

# (1) pair i at position m is the 2-D rotation by m * f_i
f = 10000.0 ** (-np.arange(half) * 2 / Dh)
m, i = 7, 3
angle = m * f[i]
rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
assert np.allclose(q_rot[m, [i, i + half]], rot @ q[[i, i + half]])
# (2) norms are kept
assert np.allclose(np.linalg.norm(q_rot, axis=-1), np.linalg.norm(q))
# (3) q(m) . k(n) depends on m - n only: the score matrix is constant along each diagonal
scores = q_rot @ k_rot.T                                             # (P, P): [m, n]
for offset in range(-P + 1, P):
    diag = np.diagonal(scores, offset)
    assert np.allclose(diag, diag[0]), offset
print("q(m).k(n) at (m, n) = (5, 2), (20, 17), (40, 37):",
      np.round([scores[5, 2], scores[20, 17], scores[40, 37]], 6))

# %% [markdown]
# **The backward.** RoPE is linear in x: y = C x + S R x with C, S diagonal (cos, sin) and
# R = rotate_half, a 90-degree turn whose transpose is its inverse, [z1, z2] -> [z2, -z1].
# So dx = C dy + R^T (S dy), which is `rope_backward`: a rotation's gradient is the rotation
# by the opposite angle.

# %%
xr = rng.normal(size=(B, 2, T, Dh))                                  # (B, heads, T, Dh)
c_t, s_t = rope_cos_sin(np.arange(T), Dh, 10000.0, np.float64)
g = rng.normal(size=xr.shape)
_, rope_cache = rope_forward(xr, c_t, s_t)
loss_rope = lambda: np.sum(rope_forward(xr, c_t, s_t)[0] * g)       # noqa: E731
err = fd_error(loss_rope, xr, rope_backward(g, rope_cache))
print(f"RoPE     dx rel err {err:.1e}")
assert err < FD_TOL

# %% [markdown]
# The picture. Left: we place a vector whose pair i points along the first axis with
# length 1, 2, 3 or 4 (one circle per band), rotate it to positions 0..47 with the library's
# `rope_forward`, and plot each pair: the fast pair 0 whirls around its circle, pair 20 has
# moved only 0.15 rad after 47 positions. Right: the score matrix q(m) . k(n) of the random
# q and k above, whose stripes run exactly along the diagonals.

# %%
bands = [0, 4, 10, 20]
probe = np.zeros(Dh)
for radius, band in enumerate(bands, 1):
    probe[band] = radius                                             # pair `band` = (radius, 0)
p_rot = rope_forward(np.broadcast_to(probe, (1, 1, P, Dh)), cos[None, None], sin[None, None])[0][0, 0]

fig, axes = plt.subplots(1, 2, figsize=(11.5, 5.8), gridspec_kw={"width_ratios": [1, 1.1]})
ax = axes[0]
for radius, (band, marker) in enumerate(zip(bands, "osD^"), 1):
    pts = p_rot[:, [band, band + half]]                              # (P, 2): the pair at every position
    ax.add_patch(plt.Circle((0, 0), radius, fill=False, ls=":", color="0.75"))
    sc = ax.scatter(pts[:, 0], pts[:, 1], c=positions, cmap="viridis", marker=marker, s=24,
                    zorder=2, label=f"pair {band}: {f[band]:.3g} rad / position")
    assert np.allclose(np.linalg.norm(pts, axis=1), radius)          # each pair stays on its circle
ax.scatter([1, 2, 3, 4], [0, 0, 0, 0], marker="x", color="red", s=60, zorder=3, label="position 0")
ax.set_aspect("equal")
ax.set_xlim(-4.6, 4.6); ax.set_ylim(-4.6, 4.6)                       # noqa: E702
ax.set_xlabel("dim i"); ax.set_ylabel("dim i + Dh/2")                # noqa: E702
ax.set_title(f"RoPE turns each pair (i, i + Dh/2) by m f_i\n(Dh = {Dh}, positions m = 0..{P - 1})")
ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
fig.colorbar(sc, ax=ax, shrink=0.8, label="position m")
im = axes[1].imshow(scores, cmap="RdBu_r", vmin=-np.abs(scores).max(), vmax=np.abs(scores).max())
axes[1].set_title("score q(m) . k(n): constant along diagonals,\nso it depends on m - n only")
axes[1].set_xlabel("key position n"); axes[1].set_ylabel("query position m")   # noqa: E702
fig.colorbar(im, ax=axes[1], shrink=0.85)
fig.tight_layout()
plots.save(fig, "01_rope.png")

# %% [markdown]
# ## Logit softcapping
#
# $$ \mathrm{softcap}(x) = c \tanh(x / c), \qquad \mathrm{softcap}'(x) = 1 - \tanh^2(x / c) $$
#
# Gemma 2 caps attention scores at c = 50 (before the mask) and the final logits at c = 30.
# Near zero the cap is the identity (slope 1), so ordinary logits pass unchanged; far out it
# flattens, so no score can run away, and its gradient fades smoothly instead of being
# clipped. The backward is one line, and uses the tanh the forward cached.

# %%
xc = rng.normal(scale=40.0, size=(B, T, D))
g = rng.normal(size=xc.shape)
_, cap_cache = softcap_forward(xc, 30.0)
loss_cap = lambda: np.sum(softcap_forward(xc, 30.0)[0] * g)         # noqa: E731
err = fd_error(loss_cap, xc, softcap_backward(g, cap_cache))
print(f"softcap  dx rel err {err:.1e}")
assert err < FD_TOL

grid = np.linspace(-150, 150, 601)
out30, c30 = softcap_forward(grid, 30.0)
out50, c50 = softcap_forward(grid, 50.0)
assert np.all(np.abs(out30) < 30) and np.all(np.abs(out50) < 50)     # the cap holds
assert abs(softcap_forward(np.array(1.0), 30.0)[0] - 1.0) < 1e-3     # and is ~identity near 0

fig, axes = plt.subplots(1, 2, figsize=(11, 4))
axes[0].plot(grid, grid, color="0.6", ls="--", label="identity")
axes[0].plot(grid, out50, label="attention scores: 50 tanh(x/50)")
axes[0].plot(grid, out30, label="final logits: 30 tanh(x/30)")
for cap in (30, 50):
    axes[0].axhline(cap, color="0.85", lw=0.8); axes[0].axhline(-cap, color="0.85", lw=0.8)  # noqa: E702
axes[0].set_ylim(-80, 80)
axes[0].set_title("softcap: identity near 0, never past the cap")
axes[0].set_xlabel("x"); axes[0].legend(fontsize=8)                  # noqa: E702
axes[1].plot(grid, softcap_backward(np.ones_like(grid), c50), label="cap 50")
axes[1].plot(grid, softcap_backward(np.ones_like(grid), c30), label="cap 30")
axes[1].set_title("its derivative 1 - tanh$^2$(x / cap): fades, never jumps")
axes[1].set_xlabel("x"); axes[1].legend(fontsize=8)                  # noqa: E702
fig.tight_layout()
plots.save(fig, "01_softcap.png")

# %% [markdown]
# ## What we checked
#
# Each backward above agrees with finite differences to about 1e-9, and the RMSNorm example
# showed why the checks use random norm weights. Tutorial 2 puts these pieces together into
# softmax attention and its masks.
#
# ## Exercises
#
# **1.1 RMSNorm's dx, by hand.** Write `rmsnorm_dx(dy, x, w, eps)` from the derivation above
# without calling the library: r = (mean(x^2) + eps)^(-1/2), x_hat = x r, d x_hat = dy (1 + w),
# dx = r (d x_hat - x_hat mean(d x_hat x_hat)). The check is the finite-difference one, on
# random x and w. Then try leaving out the projection term (`r * dy * (1 + w)`): that is the
# known-wrong answer the check must reject, and it does, by O(1).

# %%
my_rmsnorm_dx = None          # your answer: a function (dy, x, w, eps) -> dx

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_rmsnorm_dx(dy, x, w, eps):
    r = 1.0 / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps)
    xhat, dxhat = x * r, dy * (1 + w)
    return r * (dxhat - xhat * np.mean(dxhat * xhat, axis=-1, keepdims=True))


# %%
def check_rmsnorm_dx(rmsnorm_dx):
    xe, we, ge = rng.normal(size=(2, 3, 8)), rng.normal(scale=0.3, size=8), rng.normal(size=(2, 3, 8))
    loss = lambda: np.sum(rmsnorm_forward(xe, we, 1e-6)[0] * ge)          # noqa: E731
    err = fd_error(loss, xe, rmsnorm_dx(ge, xe, we, 1e-6))
    assert err < FD_TOL, f"relative error {err:.1e} against finite differences"


def no_projection(dy, x, w, eps):                  # the slip: forget that x also sets r
    return dy * (1 + w) / np.sqrt(np.mean(x ** 2, axis=-1, keepdims=True) + eps)


grade("Exercise 1.1", check_rmsnorm_dx, answer=my_rmsnorm_dx, solution=solution_rmsnorm_dx, wrong=no_projection)

# %% [markdown]
# **1.2 RoPE's backward is the opposite rotation.** Write `rope_dx(dy, cos, sin)` for
# y = x cos + rotate_half(x) sin, using only NumPy: rotate each pair by the opposite angle.
# (Hint: rotate_half(z) = [-z2, z1]; its transpose maps [z1, z2] to [z2, -z1].) The check is
# finite differences of `rope_forward`; rotating by the *same* angle again, which is what
# calling the forward a second time does, is the wrong answer it must reject.

# %%
my_rope_dx = None             # your answer: a function (dy, cos, sin) -> dx

# %% tags=["solution"] jupyter={"source_hidden": true}
def solution_rope_dx(dy, cos, sin):
    d = dy * sin
    h = dy.shape[-1] // 2
    return dy * cos + np.concatenate([d[..., h:], -d[..., :h]], axis=-1)     # C dy + R^T (S dy)


# %%
def check_rope_dx(rope_dx):
    xe, ge = rng.normal(size=(2, 2, 5, 16)), rng.normal(size=(2, 2, 5, 16))
    c5, s5 = rope_cos_sin(np.arange(5), 16, 10000.0, np.float64)
    loss = lambda: np.sum(rope_forward(xe, c5, s5)[0] * ge)              # noqa: E731
    err = fd_error(loss, xe, rope_dx(ge, c5, s5))
    assert err < FD_TOL, f"relative error {err:.1e} against finite differences"


def same_rotation(dy, cos, sin):                   # the slip: the forward again
    return rope_forward(dy, cos, sin)[0]


grade("Exercise 1.2", check_rope_dx, answer=my_rope_dx, solution=solution_rope_dx, wrong=same_rotation)
print("figures:", sorted(p.name for p in plots.FIG.glob("01_*.png")))
