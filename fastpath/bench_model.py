"""The whole-model sections of `python -m fastpath.bench`: a training step and generation.

    train_step   T5Gemma Small (8+8 layers, width 512, 8 heads of 64, MLP 1024, vocab 8192),
                 batch 8 x 256 source / 256 target tokens: loss and every gradient
    generate     the same model, greedy, 128 new tokens from a 256-token input, batch 1

each on the NumPy reference (backend="numpy"), the fast path (backend="numba") and
transformers' eager T5Gemma in PyTorch (same config, same weights' shapes, float32), with
wall time, tokens per second, the growth of peak resident memory, and for the training step
the achieved GFLOP/s: `train_flops` counts the step's useful multiply-adds (x 2), the same
number for all three, so the figure compares like with like.

Threads: all three run at the benchmark's thread count (BLAS, Numba lanes and torch alike);
torch also at 1 thread, and the faster of its two is kept. The backends are timed in turns
(numpy, numba, torch, numpy, ...) and the best of `repeat` turns is kept for each, so a
change of load during the run hits all of them alike.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from minencdec.model.config import T5GemmaConfig
from minencdec.model.presets import preset
from minencdec.model.t5gemma import T5GemmaModel

SMALL = dict(B=8, S=256, T=256)
QUICK = dict(B=2, S=64, T=64)


def small_config():
    c = preset("small", vocab_size=8192)
    return T5GemmaConfig(c, c)


def _stack_matmul_params(c):
    """Multiply-adds per token of one layer's projections (q, k, v, o and the MLP)."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return 2 * c.hidden_size * q + 2 * c.hidden_size * kv + 3 * c.hidden_size * c.intermediate_size


def train_flops(config: T5GemmaConfig, B, S, T):
    """FLOPs of one training step (forward x 3: the backward costs two forwards), useful
    work only: projections, the attention pairs each query may see, the LM head."""
    enc, dec = config.encoder, config.decoder
    q, kv = dec.num_attention_heads * dec.head_dim, dec.num_key_value_heads * dec.head_dim
    fwd = 2 * B * S * enc.num_hidden_layers * _stack_matmul_params(enc)
    fwd += 2 * B * T * dec.num_hidden_layers * (_stack_matmul_params(dec) + 2 * dec.hidden_size * q)   # + cross q, o
    fwd += 2 * B * S * dec.num_hidden_layers * 2 * enc.hidden_size * kv                           # cross k, v
    pairs_enc = S * S                                                    # Small's window 4096 > S: all pairs
    pairs_dec = T * (T + 1) // 2 + T * S                                  # causal self + cross
    fwd += 4 * B * enc.num_attention_heads * enc.head_dim * pairs_enc * enc.num_hidden_layers
    fwd += 4 * B * dec.num_attention_heads * dec.head_dim * pairs_dec * dec.num_hidden_layers
    fwd += 2 * B * T * dec.hidden_size * dec.vocab_size                   # LM head
    return 3 * fwd


def _torch_model(config):
    import torch
    from transformers import T5GemmaConfig as HFConfig
    from transformers import T5GemmaForConditionalGeneration
    torch.manual_seed(0)
    return T5GemmaForConditionalGeneration._from_config(HFConfig(**config.to_hf_dict()), attn_implementation="eager",
                                                        dtype=torch.float32)


def train_step(quick, torch, names):
    """One training step (loss and every gradient), batch 8 x 256 / 256 (2 x 64 / 64 with --quick).
    Returns {backend: step function}, tokens per call and FLOPs per call."""
    config, rng = small_config(), np.random.default_rng(0)
    B, S, T = (QUICK if quick else SMALL).values()
    ids, labels = rng.integers(3, 8192, (B, S)), rng.integers(3, 8192, (B, T))
    fns = {}
    for name in names:
        if name == "torch":
            tmodel = _torch_model(config).train()
            ti, tl = torch.from_numpy(ids), torch.from_numpy(labels)

            def step(model=tmodel):
                model.zero_grad(set_to_none=True)
                model(input_ids=ti, labels=tl, use_cache=False).loss.backward()
        else:
            model = T5GemmaModel.random(config, seed=0, dtype="float32", backend=name)

            def step(model=model):
                model.loss_and_grads(ids, labels)
        fns[name] = step
    return fns, B * (S + T), train_flops(config, B, S, T)


def generate(quick, torch, names):
    """Greedy generation of 128 new tokens (32 with --quick) from 256 input tokens, batch 1.
    Returns {backend: function}, new tokens per call and None (no FLOP count)."""
    from minencdec.model.generate import generate as mgenerate
    config, rng = small_config(), np.random.default_rng(0)
    n_new = 32 if quick else 128
    ids = rng.integers(3, 8192, (1, 256))
    fns = {}
    for name in names:
        if name == "torch":
            tmodel = _torch_model(config).eval()
            ti = torch.from_numpy(ids)

            def run(model=tmodel):
                with torch.no_grad():
                    model.generate(input_ids=ti, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
        else:
            model = T5GemmaModel.random(config, seed=0, dtype="float32", backend=name)

            def run(model=model):
                mgenerate(model, ids, max_new_tokens=n_new, min_new_tokens=n_new)
        fns[name] = run
    return fns, n_new, None


def interleaved(fns, torch, threads, repeat, peak_rss_growth, label="timing"):
    """Best seconds per call of each function, timed in turns (a, b, c, a, b, c, ...) so
    that a change of load on a shared machine hits all of them alike; torch at `threads`
    and at 1 thread, the faster kept. The first call of each (the warm-up) gives the growth
    of peak resident memory. Returns {name: (seconds, threads, peak bytes)}."""
    runs = [(name, th) for name in fns for th in ((threads, 1) if name == "torch" and threads > 1 else (threads,))]
    total, peaks = len(fns) + repeat * len(runs), {}

    def report(done, what):                  # one progress line per call on stderr: calls take seconds
        print(f"{label}: {done}/{total} {what}", file=sys.stderr, flush=True)

    for name, fn in fns.items():
        peaks[name] = peak_rss_growth(fn)
        report(len(peaks), f"warmed up {name}")
    best = {run: np.inf for run in runs}
    for r in range(repeat):
        for i, (name, th) in enumerate(runs):
            if name == "torch":
                torch.set_num_threads(th)
            t = time.perf_counter()
            fns[name]()
            best[name, th] = min(best[name, th], time.perf_counter() - t)
            report(len(fns) + r * len(runs) + i + 1, f"timed {name} at {th} thread(s)")
    if torch is not None:
        torch.set_num_threads(threads)
    out = {}
    for (name, th), seconds in best.items():
        if name not in out or seconds < out[name][0]:
            out[name] = (seconds, th, peaks[name])
    return out


def weight_read_floor(repeat=5):
    """Seconds per generated token spent only reading the decoder's weights: one matrix-vector
    product per matrix a decode step uses (self q/k/v/o, cross q/o, gate/up/down, the LM
    head), nothing else. Batch-1 float32 decoding cannot be faster than this memory floor."""
    from minencdec.model.t5gemma import DEC_EMBED
    model = T5GemmaModel.random(small_config(), seed=0, dtype="float32")
    used = [w for n, w in model.params.items() if n.startswith("model.decoder.layers.") and w.ndim == 2
            and not (".cross_attn.k_proj" in n or ".cross_attn.v_proj" in n)]     # cross k/v: once per input
    used.append(model.params[DEC_EMBED])
    xs = [np.ones((1, w.shape[1]), np.float32) for w in used]
    best = np.inf
    for _ in range(repeat + 1):
        t = time.perf_counter()
        for x, w in zip(xs, used):
            x @ w.T
        best = min(best, time.perf_counter() - t)
    return best, sum(w.nbytes for w in used)


def model_sections(quick, torch, peak_gflops, threads, repeat, peak_rss_growth):
    """Both sections for every backend, printed with their ratios."""
    out = {}
    names = ["numpy", "numba"] + (["torch"] if torch is not None else [])
    for section in (train_step, generate):
        fns, tokens, flops = section(quick, torch, names)
        timed = interleaved(fns, torch, threads, repeat, peak_rss_growth, section.__name__)
        res = {}
        print(f"\n{section.__name__}: {section.__doc__.splitlines()[0]}")
        for n, (seconds, th, peak) in timed.items():
            r = res[n] = {"seconds": seconds, "tokens_per_s": tokens / seconds, "threads": th, "peak_rss_growth": peak}
            line = f"  {n:6s} {seconds:8.2f} s  {r['tokens_per_s']:8.1f} tokens/s"
            if flops:
                r["gflops"] = flops / seconds / 1e9
                line += f"  {r['gflops']:6.1f} GFLOP/s ({100 * r['gflops'] / peak_gflops:3.0f}% of BLAS peak)"
            mib = "-" if peak is None else f"{peak / 2**20:.0f}"
            print(line + f"  peak RSS +{mib} MiB  ({th} thread{'s' * (th > 1)})")
        fast = res["numba"]["seconds"]
        res["ratios"] = {f"vs_{n}": res[n]["seconds"] / fast for n in names if n != "numba"}
        print("  fast path: " + ", ".join(f"{v:.2f}x {k[3:]}" for k, v in res["ratios"].items())
              + f" (best of {repeat}, timed in turns)")
        out[section.__name__] = res
    floor, nbytes = weight_read_floor()
    out["generate"]["weight_read_floor_s"] = floor
    print(f"  memory floor: reading the {nbytes / 2**20:.0f} MiB of matrices a decode step uses takes "
          f"{floor * 1e3:.1f} ms here ({nbytes / floor / 1e9:.1f} GB/s), so at most {1 / floor:.0f} tokens/s "
          f"after the input is encoded")
    return out
