"""The kernel sections of `python -m fastpath.bench`: each fast kernel against the NumPy
reference and torch on the same inputs (attention, T5Gemma 2's merged attention, decode
step, RMSNorm and QK-norm, fused LM head), and the thread interplay of OpenBLAS and the
kernels. See bench.py for the whole list.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from minencdec.model import attention as ref_attention
from minencdec.model import stack as ref_stack
from minencdec.model import layers as ref_layers
from minencdec.model import losses as ref_losses

from . import attention as fast_attention
from . import dense as fast_dense
from . import decode as fast_decode
from . import lmhead as fast_lmhead
from . import norm as fast_norm
from .measure import _mib, _torch, best_time, peak_rss_growth, torch_best_time, traced_peak

def _torch_attention(torch):
    """transformers' Gemma 2 eager attention (the numerical reference), or the
    same math in torch when transformers is not installed."""
    try:
        from types import SimpleNamespace

        from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward
        module = SimpleNamespace(num_key_value_groups=1, training=False, head_dim=64)
        return "transformers Gemma2 eager_attention_forward", \
            lambda q, k, v, add_mask, scale, cap: eager_attention_forward(module, q, k, v, add_mask, 0.0, scale, cap)[0]
    except ImportError:
        def same_math(q, k, v, add_mask, scale, cap):
            s = cap * torch.tanh(q @ k.transpose(-1, -2) * scale / cap) + add_mask
            return (torch.softmax(s, dim=-1) @ v).transpose(1, 2)    # (B, T, H, Dh), as transformers
        return "torch eager (same math)", same_math


def attention(quick):
    """Forward + backward of one attention call, float32, B=1, H=8, Dh=64, softcap 50."""
    rng = np.random.default_rng(0)
    torch = _torch()
    torch_name, torch_fn = _torch_attention(torch) if torch else (None, None)
    B, H, Dh, scale, cap = 1, 8, 64, 64**-0.5, 50.0
    lengths = [128, 256, 512, 1024] if quick else [128, 256, 512, 1024, 2048, 4096]
    repeat = 2 if quick else 3
    print(f"\nattention forward+backward, B={B} H={H} Dh={Dh} float32, softcap {cap}; "
          f"torch = {torch_name}; fast = what the models run (method=\"auto\": dense or tiled), tiled = the "
          f"tiled kernel alone\n  {'mask':20s} {'T':>5s} | {'time s: numpy':>13s} {'fast':>7s} {'tiled':>7s} "
          f"{'torch':>7s} | {'fast vs numpy':>13s} {'vs torch':>8s} {'(thr)':>5s} | {'GFLOP/s fast':>12s} | "
          f"{'peak MiB (tracemalloc): numpy':>29s} {'fast':>7s} | {'peak RSS MiB: numpy':>19s} {'fast':>7s} {'torch':>7s}")
    rows = []
    for window in (None, 256):
        for T in lengths:
            q, k, v, do = (rng.standard_normal((B, H, T, Dh), dtype=np.float32) for _ in range(4))
            mask = fast_attention.dense_mask(T, T, True, window)
            pairs = int(mask.sum()) * B * H
            useful = 12 * Dh * pairs                              # 4 Dh forward + 8 Dh backward per visible pair

            def run_ref():
                o, c = ref_attention.attention_forward(q, k, v, mask, scale, cap)
                return ref_attention.attention_backward(do, c)

            def run_fast(method="auto"):
                o, c = fast_attention.attention_forward(q, k, v, scale, cap, causal=True, window=window, method=method)
                return fast_attention.attention_backward(do, c)

            row = {"T": T, "window": window, "useful_gflop": useful / 1e9}
            row["method"] = fast_dense.choose(B, H, T, T, 4, fast_attention._tiled_pairs(
                *fast_attention.visible_intervals(T, T, True, window), T, 0))
            row["numpy_s"] = best_time(run_ref, 1 if T >= 2048 else repeat, warmup=T < 2048)
            row["fast_s"] = best_time(run_fast, repeat)
            row["tiled_s"] = row["fast_s"] if row["method"] == "tiled" else best_time(lambda: run_fast("tiled"), repeat)
            row["numpy_traced"], row["fast_traced"] = traced_peak(run_ref), traced_peak(run_fast)
            row["numpy_rss"], row["fast_rss"] = peak_rss_growth(run_ref), peak_rss_growth(run_fast)
            row["torch_s"] = row["torch_rss"] = None
            if torch:
                tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
                tdo = torch.from_numpy(do)
                add = torch.zeros((T, T), dtype=torch.float32).masked_fill(~torch.from_numpy(mask[0]),
                                                                        torch.finfo(torch.float32).min)

                def run_torch():
                    for t in (tq, tk, tv):
                        t.grad = None
                    torch_fn(tq, tk, tv, add, scale, cap).transpose(1, 2).backward(tdo)

                row["torch_s"], row["torch_threads"] = torch_best_time(torch, run_torch, repeat)
                row["torch_rss"] = peak_rss_growth(run_torch)
            rows.append(row)
            r_torch = row["torch_s"] / row["fast_s"] if row["torch_s"] else float("nan")
            label = ('causal' if window is None else f'causal w={window}') + f" ({row['method']})"
            print(f"  {label:20s} {T:5d} | {row['numpy_s']:13.3f} "
                  f"{row['fast_s']:7.3f} {row['tiled_s']:7.3f} {row['torch_s'] or float('nan'):7.3f} | "
                  f"{row['numpy_s'] / row['fast_s']:12.1f}x "
                  f"{r_torch:7.1f}x {row.get('torch_threads', 0):5d} | {useful / row['fast_s'] / 1e9:12.1f} | {_mib(row['numpy_traced']):>29s} "
                  f"{_mib(row['fast_traced'])} | {_mib(row['numpy_rss']):>19s} {_mib(row['fast_rss'])} "
                  f"{_mib(row['torch_rss'])}")
    return {"torch_impl": torch_name, "rows": rows}


def merged(quick):
    """T5Gemma 2's merged attention (decoder self-attention over its own T keys, causal, then
    S = T encoder keys, the last 8 padding), forward + backward, float32, B=1, H=8, K=4,
    Dh=64, no softcap (Gemma 3 has none): the reference against the fast path."""
    rng = np.random.default_rng(0)
    B, H, K, Dh, scale = 1, 8, 4, 64, 64**-0.5
    lengths = [128, 256, 512, 1024] if quick else [128, 256, 512, 1024, 2048]
    repeat = 2 if quick else 3
    print(f"\nmerged attention (T5Gemma 2 decoder) forward+backward, B={B} H={H} K={K} Dh={Dh} float32, "
          f"S = T encoder keys (8 padded)\n  {'mask':15s} {'T = S':>5s} | {'time s: numpy':>13s} {'fast':>7s} | "
          f"{'fast vs numpy':>13s} | {'peak MiB (tracemalloc): numpy':>29s} {'fast':>7s} | "
          f"{'the scores H x T x (T + S)':>26s}")
    rows = []
    for window in (None, 128):
        for T in lengths:
            q, do = (rng.standard_normal((B, H, T, Dh), dtype=np.float32) for _ in range(2))
            k, v = (rng.standard_normal((B, K, 2 * T, Dh), dtype=np.float32) for _ in range(2))
            enc_mask = np.ones((B, T), bool)
            enc_mask[:, -8:] = False
            desc = dict(causal=True, window=window, extra_keys=T, extra_key_mask=enc_mask)

            def run_ref():
                o, c = ref_attention.attention_forward_masked(q, k, v, ref_attention.Mask(**desc), scale, None)
                return ref_attention.attention_backward(do, c)

            def run_fast():
                o, c = fast_attention.attention_forward(q, k, v, scale, None, method="auto", **desc)
                return fast_attention.attention_backward(do, c)

            row = {"T": T, "S": T, "window": window,           # (the reference needs no warm-up at long T)
                   "numpy_s": best_time(run_ref, 1 if T >= 2048 else repeat, warmup=T < 2048),
                   "fast_s": best_time(run_fast, repeat), "numpy_traced": traced_peak(run_ref),
                   "fast_traced": traced_peak(run_fast), "scores_bytes": H * T * 2 * T * 4}
            rows.append(row)
            print(f"  {'causal' if window is None else f'causal w={window}':15s} {T:5d} | {row['numpy_s']:13.3f} "
                  f"{row['fast_s']:7.3f} | {row['numpy_s'] / row['fast_s']:12.1f}x | {_mib(row['numpy_traced']):>29s} "
                  f"{_mib(row['fast_traced'])} | {_mib(row['scores_bytes']):>26s}")
    return {"rows": rows}


def decode(quick):
    """One generation step's attention: 1 query row, 8 heads, a 256-key cache (self: causal,
    cross: key padding)."""
    rng = np.random.default_rng(0)
    S, out = 256, {}
    q = rng.standard_normal((1, 8, 1, 64), dtype=np.float32)
    k, v = (rng.standard_normal((1, 8, S, 64), dtype=np.float32) for _ in range(2))
    valid = np.ones((1, S), dtype=bool)
    print(f"\ndecode step attention, 1 x 8 heads x {S} cached keys, float32 (microseconds per call)")
    for name, desc in (("self (causal)", dict(causal=True, q_offset=S - 1)), ("cross (padding)", dict(causal=False))):
        mask = fast_attention.dense_mask(1, S, key_mask=valid, **desc)
        n = 100 if quick else 300
        t_ref = best_time(lambda: ref_attention.attention_forward(
            q, k, v, fast_attention.dense_mask(1, S, key_mask=valid, **desc), 0.125, 50.0), 5, n)
        t_ref_nomask = best_time(lambda: ref_attention.attention_forward(q, k, v, mask, 0.125, 50.0), 5, n)
        t_fast = best_time(lambda: fast_decode.decode_attention(q, k, v, 0.125, 50.0, key_mask=valid, **desc), 5, n)
        out[name] = {"numpy_us": t_ref * 1e6, "numpy_without_mask_build_us": t_ref_nomask * 1e6, "fast_us": t_fast * 1e6}
        print(f"  {name:16s} numpy {t_ref * 1e6:7.1f} (of which the dense mask {1e6 * (t_ref - t_ref_nomask):5.1f})"
              f"   fast {t_fast * 1e6:7.1f}   {t_ref / t_fast:4.1f}x")
    return out


def rmsnorm(quick):
    """The model's norms, (8 x 256, 512), and Gemma 3's QK-norm: RMSNorm over head_dim of the
    (B, H, T, Dh) = (8, 4, 256, 256) heads, a transposed view of the q projection (as
    attention._split_heads makes it), float32."""
    rng = np.random.default_rng(0)
    out = {}
    x = rng.standard_normal((8 * 256, 512), dtype=np.float32)
    w = (rng.standard_normal(512) * 0.1).astype(np.float32)
    out["model"] = _rmsnorm_rows("rmsnorm (2048, 512) float32 (milliseconds)", x, w)
    heads = rng.standard_normal((8, 256, 4, 256), dtype=np.float32).transpose(0, 2, 1, 3)
    w = (rng.standard_normal(256) * 0.1).astype(np.float32)
    out["qk_norm"] = _rmsnorm_rows("qk-norm (8, 4, 256, 256) heads view float32 (milliseconds)", heads, w)
    return out


def _rmsnorm_rows(title, x, w):
    rng = np.random.default_rng(1)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    out = {}
    print(f"\n{title}")
    for part in ("forward", "backward"):
        if part == "forward":
            f_ref = lambda: ref_layers.rmsnorm_forward(x, w, 1e-6)             # noqa: E731
            f_fast = lambda: fast_norm.rmsnorm_forward(x, w, 1e-6)             # noqa: E731
        else:
            c_ref, c_fast = ref_layers.rmsnorm_forward(x, w, 1e-6)[1], fast_norm.rmsnorm_forward(x, w, 1e-6)[1]
            f_ref = lambda: ref_layers.rmsnorm_backward(dy, c_ref)              # noqa: E731
            f_fast = lambda: fast_norm.rmsnorm_backward(dy, c_fast)             # noqa: E731
        t_ref, t_fast = best_time(f_ref, 5, 10), best_time(f_fast, 5, 10)
        out[part] = {"numpy_ms": t_ref * 1e3, "fast_ms": t_fast * 1e3}
        print(f"  {part:8s} numpy {t_ref * 1e3:6.2f}   fast {t_fast * 1e3:6.2f}   {t_ref / t_fast:4.1f}x")
    return out


def lm_head(quick):
    """Tied LM head + final softcap 30 + mean cross-entropy, forward and backward."""
    rng = np.random.default_rng(0)
    N, D, V = 2048, 512, 8192
    h = rng.standard_normal((N, D), dtype=np.float32)
    table = (rng.standard_normal((V, D)) * 0.02).astype(np.float32)
    targets = rng.integers(0, V, N)

    def run_ref():
        logits, head_c = ref_stack.lm_head_forward(h, table, 30.0)
        loss, ce_c = ref_losses.cross_entropy_forward(logits, targets)
        return ref_stack.lm_head_backward(ref_losses.cross_entropy_backward(ce_c), head_c)

    def run_fast():
        loss, c = fast_lmhead.lm_head_cross_entropy(h, table, targets, 30.0)
        return fast_lmhead.lm_head_cross_entropy_backward(c)

    repeat = 2 if quick else 3
    out = {"numpy_s": best_time(run_ref, repeat), "fast_s": best_time(run_fast, repeat),
           "numpy_traced": traced_peak(run_ref), "fast_traced": traced_peak(run_fast),
           "numpy_rss": peak_rss_growth(run_ref), "fast_rss": peak_rss_growth(run_fast), "torch_s": None,
           "torch_rss": None, "logits_mib": N * V * 4 / 2**20}
    torch = _torch()
    if torch:
        th, tt = torch.from_numpy(h).requires_grad_(), torch.from_numpy(table).requires_grad_()
        tg = torch.from_numpy(targets)

        def run_torch():
            th.grad = tt.grad = None
            z = 30.0 * torch.tanh(th @ tt.T / 30.0)
            torch.nn.functional.cross_entropy(z, tg).backward()

        (out["torch_s"], out["torch_threads"]), out["torch_rss"] = torch_best_time(torch, run_torch, repeat), \
            peak_rss_growth(run_torch)
    flops = 3 * 2 * N * D * V
    print(f"\nlm head + softcap + cross-entropy, N={N} D={D} V={V} float32 (one logits array: {out['logits_mib']:.0f} MiB)")
    for name in ("numpy", "fast", "torch"):
        if out[f"{name}_s"] is not None:
            print(f"  {name:6s} {out[f'{name}_s']:6.3f} s  {flops / out[f'{name}_s'] / 1e9:6.1f} GFLOP/s   "
                  f"peak MiB: tracemalloc {_mib(out.get(f'{name}_traced'))}, RSS {_mib(out[f'{name}_rss'])}")
    return out


def _threads_measure(quick):
    """(in a child process) attention alone, a 2-thread matmul alone, and the two back to back."""
    rng = np.random.default_rng(0)
    q = rng.standard_normal((8, 8, 256, 64), dtype=np.float32)
    x = rng.standard_normal((2048, 512), dtype=np.float32)
    w = rng.standard_normal((512, 1536), dtype=np.float32)

    def attn():
        o, c = fast_attention.attention_forward(q, q, q, 0.125, 50.0, causal=True, window=128)
        fast_attention.attention_backward(o, c)

    def matmul():
        x @ w

    def both():
        matmul()
        attn()

    r = 3 if quick else 7
    return {"attention_ms": best_time(attn, r) * 1e3, "matmul_ms": best_time(matmul, r) * 1e3,
            "back_to_back_ms": best_time(both, r) * 1e3}


def threads(quick):
    """The fast attention right after a BLAS matmul, against the two apart, in two child
    processes: OpenBLAS as it comes (its worker threads busy-wait for 2^28 cycles, ~0.1 s,
    after each call) and with OPENBLAS_THREAD_TIMEOUT=4 (they sleep at once). The variable
    must be set before NumPy is imported, hence the child processes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = f"import json, fastpath.bench_kernels as b; print(json.dumps(b._threads_measure({quick!r})))"
    out = {}
    print("\nthreads: a 2048x512x1536 matmul followed by the fast attention (8 x 8 x 256, window 128)")
    for label, timeout in (("OpenBLAS default (28)", "28"), ("OPENBLAS_THREAD_TIMEOUT=4", "4")):
        # Set in both children: importing fastpath would otherwise default it to 4.
        env = {**os.environ, "OPENBLAS_THREAD_TIMEOUT": timeout}
        env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
        if res.returncode != 0:
            print(f"  {label}: failed: {res.stderr[-500:]}")
            continue
        r = out[label] = json.loads(res.stdout.strip().splitlines()[-1])
        apart = r["attention_ms"] + r["matmul_ms"]
        print(f"  {label:26s} attention {r['attention_ms']:6.1f} ms + matmul {r['matmul_ms']:5.1f} ms = "
              f"{apart:6.1f} ms apart; back to back {r['back_to_back_ms']:6.1f} ms ({r['back_to_back_ms'] / apart:.2f}x)")
    return out
