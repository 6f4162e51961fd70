"""One benchmark run: the NumPy reference, the fast path and PyTorch CPU on the same work.

    python -m fastpath.bench            # the full run (T up to 4096; 5-15 minutes here)
    python -m fastpath.bench --quick    # T up to 1024, fewer repeats (about a minute)
    python -m fastpath.bench --json results.json      (default: runs/fastpath_bench.json)

On a shared machine absolute times drift by 2-8x with the load (the load average is
printed at the start and the end); only the ratios measured in one run mean something.
Every figure is the best of `repeat` runs after one warm-up run.

Sections (each a function returning a dict; all go into the JSON):
  machine        CPU, threads, versions, load
  blas           float32 np.matmul GFLOP/s: the machine's peak (square 2048), and the
                 model's own projection shapes against it
  attention      forward + backward, B=1, H=8, Dh=64, softcap 50, causal and causal with a
                 sliding window of 256: time, achieved GFLOP/s (useful pairs only) and peak
                 memory of the reference, the fast path and torch (transformers' Gemma 2
                 eager_attention_forward, or the same math in torch if transformers is absent;
                 at the Numba thread count or at 1 thread, whichever is faster: torch_best_time)
  decode         one decode step's attention over a 256-key cache
  rmsnorm        (8 x 256, 512) forward + backward
  lm_head        LM head + softcap 30 + cross-entropy, forward + backward, N = 2048, V = 8192, D = 512
  threads        a BLAS matmul followed by the fast attention: sum of parts vs back to back,
                 with OpenBLAS's default thread timeout and with OPENBLAS_THREAD_TIMEOUT=4
  train_step     T5Gemma Small (8+8 layers, width 512, vocab 8192), batch 8 x 256/256  } bench_model.py
  generate       greedy, 128 new tokens from 256 input tokens, batch 1               }
Memory: tracemalloc peak of the NumPy and Numba allocations (Numba's runtime allocates
through PyMem_RawMalloc, so a kernel's own scratch is traced too), and for all three the
growth of the process's peak resident memory (VmHWM, reset before each run through
/proc/self/clear_refs): the only measure that sees torch's allocations.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
import tracemalloc

import numpy as np

from minencdec import attention as ref_attention
from minencdec import gemma2 as ref_gemma2
from minencdec import layers as ref_layers
from minencdec import losses as ref_losses

from . import attention as fast_attention
from . import bench_model
from . import decode as fast_decode
from . import lmhead as fast_lmhead
from . import norm as fast_norm
from .jit import compile_all, lanes

# ---------------------------------------------------------------------------- measuring


def best_time(fn, repeat, number=1, warmup=True):
    """Best wall time per call over `repeat` samples of `number` calls, after one warm-up."""
    if warmup:
        fn()
    times = []
    for _ in range(repeat):
        gc.collect()
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return min(times)


def _status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_growth(fn):
    """Bytes by which the process's peak resident set grows while fn runs (Linux)."""
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                          # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _status("VmRSS")
    fn()
    return max(0, _status("VmHWM") - before)


def traced_peak(fn):
    """tracemalloc peak (bytes) of the Python-visible allocations of fn (NumPy arrays)."""
    gc.collect()
    tracemalloc.start()
    fn()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def _torch():
    try:
        import torch
        torch.set_num_threads(lanes(1 << 30))
        return torch
    except ImportError:
        return None


def torch_best_time(torch, fn, repeat):
    """(seconds, threads): torch at the Numba thread count and at 1 thread, the faster.
    On this shared 2-core machine under load, torch's OpenMP barrier made 2 threads take
    0.15 s for a 128-token attention call that takes 3 ms on 1 thread; taking the better
    of the two keeps the comparison from flattering the fast path."""
    n = lanes(1 << 30)
    best = None
    for threads in sorted({n, 1}, reverse=True):
        torch.set_num_threads(threads)
        t = best_time(fn, repeat)
        if best is None or t < best[0]:
            best = (t, threads)
    torch.set_num_threads(n)
    return best


def _mib(b):
    return "    -" if b is None else f"{b / 2**20:7.1f}"

# ---------------------------------------------------------------------------- sections


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    torch = _torch()
    info = {"cpu": model, "cores": os.cpu_count(), "threads": lanes(1 << 30), "python": platform.python_version(),
            "numpy": np.__version__, "numba": __import__("numba").__version__,
            "torch": torch.__version__ if torch else None, "torch_threads": torch.get_num_threads() if torch else None,
            "load_average": os.getloadavg()}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads for Numba and torch; "
          f"numpy {info['numpy']}, numba {info['numba']}, torch {info['torch']}, transformers {info['transformers']}; "
          f"load average {info['load_average'][0]:.2f}")
    return info


def blas(quick):
    """float32 np.matmul GFLOP/s: square (the peak) and the Small model's projections."""
    rng = np.random.default_rng(0)
    n = 1024 if quick else 2048
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    peak = 2 * n**3 / best_time(lambda: a @ b, 3 if quick else 5) / 1e9
    print(f"\nblas: float32 matmul {n}^3: {peak:.1f} GFLOP/s")
    shapes = {"q/k/v/o 2048x512 @ 512x512": (2048, 512, 512), "gate/up 2048x512 @ 512x1024": (2048, 512, 1024),
              "down 2048x1024 @ 1024x512": (2048, 1024, 512), "lm head 2048x512 @ 512x8192": (2048, 512, 8192)}
    out = {"peak_gflops": peak, "square_n": n, "projections": {}}
    for name, (m, k, nn) in shapes.items():
        x, w = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, nn), dtype=np.float32)
        g = 2 * m * k * nn / best_time(lambda: x @ w, 3 if quick else 5) / 1e9
        out["projections"][name] = g
        print(f"  {name:32s} {g:6.1f} GFLOP/s  {100 * g / peak:4.0f}% of the square's")
    out["peak_gflops"] = max(peak, *out["projections"].values())
    print(f"  peak (the best of these): {out['peak_gflops']:.1f} GFLOP/s")
    return out


def _torch_attention(torch):
    """transformers' Gemma 2 eager attention (the numerical reference of REFERENCE.md), or the
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
          f"torch = {torch_name}\n  {'mask':15s} {'T':>5s} | {'time s: numpy':>13s} {'fast':>7s} {'torch':>7s} | "
          f"{'fast vs numpy':>13s} {'vs torch':>8s} {'(thr)':>5s} | {'GFLOP/s fast':>12s} | "
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

            def run_fast():
                o, c = fast_attention.attention_forward(q, k, v, scale, cap, causal=True, window=window)
                return fast_attention.attention_backward(do, c)

            row = {"T": T, "window": window, "useful_gflop": useful / 1e9}
            row["numpy_s"] = best_time(run_ref, 1 if T >= 2048 else repeat)
            row["fast_s"] = best_time(run_fast, repeat)
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
            print(f"  {'causal' if window is None else f'causal w={window}':15s} {T:5d} | {row['numpy_s']:13.3f} "
                  f"{row['fast_s']:7.3f} {row['torch_s'] or float('nan'):7.3f} | {row['numpy_s'] / row['fast_s']:12.1f}x "
                  f"{r_torch:7.1f}x {row.get('torch_threads', 0):5d} | {useful / row['fast_s'] / 1e9:12.1f} | {_mib(row['numpy_traced']):>29s} "
                  f"{_mib(row['fast_traced'])} | {_mib(row['numpy_rss']):>19s} {_mib(row['fast_rss'])} "
                  f"{_mib(row['torch_rss'])}")
    return {"torch_impl": torch_name, "rows": rows}


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
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8 * 256, 512), dtype=np.float32)
    w = (rng.standard_normal(512) * 0.1).astype(np.float32)
    dy = rng.standard_normal(x.shape, dtype=np.float32)
    out = {}
    print("\nrmsnorm (2048, 512) float32 (milliseconds)")
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
        logits, head_c = ref_gemma2.lm_head_forward(h, table, 30.0)
        loss, ce_c = ref_losses.cross_entropy_forward(logits, targets)
        return ref_gemma2.lm_head_backward(ref_losses.cross_entropy_backward(ce_c), head_c)

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
    code = f"import json, fastpath.bench as b; print(json.dumps(b._threads_measure({quick!r})))"
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

# ---------------------------------------------------------------------------- model sections


def _measure_model(repeat):
    """measure(fn, torch) for bench_model: (best seconds, threads, peak RSS growth). The
    peak is taken on the first run, which is also the warm-up."""
    def measure(fn, torch):
        if torch is None:
            peak = peak_rss_growth(fn)
            return best_time(fn, repeat, warmup=False), lanes(1 << 30), peak
        seconds, threads = torch_best_time(torch, fn, repeat)
        torch.set_num_threads(threads)
        peak = peak_rss_growth(fn)
        torch.set_num_threads(lanes(1 << 30))
        return seconds, threads, peak
    return measure


# ---------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastpath.bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter lengths, fewer repeats")
    p.add_argument("--json", default=os.path.join("runs", "fastpath_bench.json"),
                   help="where to write the results (default runs/fastpath_bench.json; runs/ is git-ignored)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads for BLAS, the Numba kernels and torch alike (default: every core)")
    p.add_argument("--only", nargs="*", help="run only these sections")
    args = p.parse_args(argv)
    import numba
    from threadpoolctl import threadpool_limits
    numba.set_num_threads(max(1, min(args.threads, numba.config.NUMBA_NUM_THREADS)))
    with threadpool_limits(limits=args.threads, user_api="blas"):
        return _run(args)


def _run(args):
    results = {"machine": machine()}
    compile_s = compile_all(verbose=False)
    results["compile_s"] = compile_s
    print(f"fast path kernels compiled or loaded from the cache in {compile_s:.1f} s")
    for section in (blas, attention, decode, rmsnorm, lm_head, threads):
        if not args.only or section.__name__ in args.only:
            results[section.__name__] = section(args.quick)
    if not args.only or "model" in args.only:
        results["model"] = bench_model.model_sections(args.quick, _torch(), _measure_model(1 if args.quick else 2),
                                                      results.get("blas", {}).get("peak_gflops", float("nan")))
    results["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end: {results['load_average_end'][0]:.2f} (start {results['machine']['load_average'][0]:.2f})")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
