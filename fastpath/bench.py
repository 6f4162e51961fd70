"""One benchmark run: the NumPy reference, the fast path and PyTorch CPU on the same work.

    python -m fastpath.bench            # the full run (T up to 4096; about 20 minutes here)
    python -m fastpath.bench --quick    # shorter lengths and steps, fewer repeats (a few minutes)
    python -m fastpath.bench --json results.json      (default: runs/fastpath_bench.json)

On a shared machine absolute times drift by 2-8x with the load (the load average is
printed at the start and the end); only the ratios measured in one run mean something.
Every figure is the best of `repeat` runs after one warm-up run.

Sections (each a function returning a dict; all go into the JSON; the kernel sections live in
bench_kernels.py, the whole-model ones in bench_model.py, the measuring in measure.py):
  machine        CPU, threads, versions, load
  blas           float32 np.matmul GFLOP/s: the machine's peak (square 2048), and the
                 model's own projection shapes against it
  attention      forward + backward, B=1, H=8, Dh=64, softcap 50, causal and causal with a
                 sliding window of 256: time, achieved GFLOP/s (useful pairs only) and peak
                 memory of the reference, the fast path and torch (transformers' Gemma 2
                 eager_attention_forward, or the same math in torch if transformers is absent;
                 at the Numba thread count or at 1 thread, whichever is faster: torch_best_time)
  merged         T5Gemma 2's merged attention (T own keys + S = T encoder keys), forward +
                 backward: time and peak memory of the reference and the fast path
  decode         one decode step's attention over a 256-key cache
  rmsnorm        (8 x 256, 512) forward + backward, and QK-norm on (8, 4, 256, 256) heads
  lm_head        LM head + softcap 30 + cross-entropy, forward + backward, N = 2048, V = 8192, D = 512
  threads        a BLAS matmul followed by the fast attention: sum of parts vs back to back,
                 with OpenBLAS's default thread timeout and with OPENBLAS_THREAD_TIMEOUT=4
  model          bench_model.py: train_step (T5Gemma Small, batch 8 x 256/256),
                 train_step_t5gemma2_270m (T5Gemma 2 270M-270M, batch 4 x (256 + 128), with
                 AdamW, in worker processes), generate (Small, greedy, 128 new tokens from
                 256, batch 1, and the memory floor), generate_t5gemma2_270m, generate_batched
                 (Small, 8 prompts at once); `--only model` runs them all, `--only
                 train_step generate` some
Memory: tracemalloc peak of the NumPy and Numba allocations (Numba's runtime allocates
through PyMem_RawMalloc, so a kernel's own scratch is traced too), and for all three the
growth of the process's peak resident memory (VmHWM, reset before each run through
/proc/self/clear_refs): the only measure that sees torch's allocations.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys

import numpy as np

from . import bench_kernels, bench_model
from .jit import lanes
from .warmup import compile_all
from .measure import _torch, best_time, peak_rss_growth

# ---------------------------------------------------------------------------- sections


def machine():
    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    torch = _torch()
    from threadpoolctl import threadpool_info
    blas = next((lib for lib in threadpool_info() if lib.get("user_api") == "blas" and "numpy" in lib["filepath"]), {})
    info = {"cpu": model, "cores": os.cpu_count(), "threads": lanes(1 << 30), "python": platform.python_version(),
            "numpy": np.__version__, "numba": __import__("numba").__version__,
            "torch": torch.__version__ if torch else None, "torch_threads": torch.get_num_threads() if torch else None,
            "load_average": os.getloadavg(), "blas": {k: blas.get(k) for k in ("internal_api", "version", "architecture")},
            "openblas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS_")}}
    try:
        import transformers
        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['threads']} threads for Numba and torch; "
          f"numpy {info['numpy']}, numba {info['numba']}, torch {info['torch']}, transformers {info['transformers']}; "
          f"load average {info['load_average'][0]:.2f}")
    print(f"  NumPy's BLAS: {blas.get('internal_api')} {blas.get('version')}, kernels for {blas.get('architecture')}"
          + "".join(f"; {k}={v}" for k, v in info["openblas_env"].items()))
    if "OPENBLAS_CORETYPE" in os.environ:
        print("  (OPENBLAS_CORETYPE chooses OpenBLAS's kernels instead of its detection: every float32 product of the "
              "reference and the fast path runs on them, torch's do not)")
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


# ---------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastpath.bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="shorter lengths, fewer repeats")
    p.add_argument("--json", default=os.path.join("runs", "fastpath_bench.json"),
                   help="where to write the results (default runs/fastpath_bench.json; runs/ is git-ignored)")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads for BLAS, the Numba kernels and torch alike (default: every core)")
    p.add_argument("--only", nargs="*", help="run only these sections (machine always): blas attention merged decode "
                   "rmsnorm lm_head threads model, or model sections: " + " ".join(bench_model.SECTIONS))
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
    for section in (blas, bench_kernels.attention, bench_kernels.merged, bench_kernels.decode, bench_kernels.rmsnorm,
                    bench_kernels.lm_head, bench_kernels.threads):
        if not args.only or section.__name__ in args.only:
            results[section.__name__] = section(args.quick)
    model_only = [s for s in (args.only or []) if s in bench_model.SECTIONS]
    if not args.only or "model" in args.only or model_only:
        results["model"] = bench_model.model_sections(args.quick, _torch(),
                                                      results.get("blas", {}).get("peak_gflops", float("nan")),
                                                      lanes(1 << 30), 2 if args.quick else 3, peak_rss_growth,
                                                      model_only)
    results["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end: {results['load_average_end'][0]:.2f} (start {results['machine']['load_average'][0]:.2f})")
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=1)
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
