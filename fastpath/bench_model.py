"""The whole-model sections of `python -m fastpath.bench`: training steps and generation.

    train_step                 T5Gemma Small (8+8 layers, width 512, 8 heads of 64, MLP 1024,
                               vocab 8192), batch 8 x 256 source / 256 target tokens: loss and
                               every gradient
    train_step_t5gemma2_270m   T5Gemma 2 270M-270M (random weights of the real shapes, vocab
                               262,144), batch 4 x (256 + 128), loss, gradients and AdamW
    generate                   Small, greedy, 128 new tokens from a 256-token input, batch 1
    generate_t5gemma2_270m     270M-270M, the same
    generate_batched           Small, 8 prompts of 256 tokens at once (padded), 128 new tokens
                               each, against batch 1 on the fast path and torch's batched generate

Small runs in this process on the NumPy reference (backend="numpy"), the fast path
(backend="numba") and transformers' eager PyTorch (same config, float32); the 270M-270M runs
the fast path and torch, each in a worker process of its own (bench_worker.py: its peak
memory is the process's), without the reference (minutes per step). Every section gives wall
time, tokens per second, peak memory, `ratios` ({"vs_torch": torch's seconds / the fast
path's, ...}) and the load average at its start and end; training steps also achieved
GFLOP/s: `train_flops` counts the step's useful multiply-adds (x 2), the same number for all,
so the figure compares like with like.

Threads: each backend runs at the benchmark's thread count and also with its BLAS (torch:
its threads) at 1, the faster kept and reported: under load, a second thread that waits for
a busy core made torch 3-6x slower and the fast path 1.6x (measured here at load 3.6-5.9),
and keeping only one side's better setting would flatter the other. The backends are timed
in turns (numpy, numba, torch, numpy, ...) and the best of `repeat` turns is kept for each,
so a change of load during the run hits all of them alike.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np

from minencdec.model.config import T5GemmaConfig
from minencdec.model.presets import preset
from minencdec.model.t5gemma import T5GemmaModel

from .measure import HOPELESS, interleaved

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


def generate(quick, torch, names, batch=1):
    """Greedy generation of 128 new tokens (32 with --quick) from 256 input tokens, batch 1.
    Returns {backend: function}, new tokens per call and None (no FLOP count)."""
    from minencdec.model.generate import generate as mgenerate
    config, rng = small_config(), np.random.default_rng(0)
    n_new = 32 if quick else 128
    mask = (np.arange(256) < 256 - 8 * np.arange(batch)[:, None]).astype(np.int64)   # prompts of 256 - 8 r tokens
    ids = np.where(mask == 1, rng.integers(3, 8192, (batch, 256)), 0)
    fns = {}
    for name in names:
        if name == "torch":
            tmodel = _torch_model(config).eval()
            ti, tm = torch.from_numpy(ids), torch.from_numpy(mask)

            def run(model=tmodel):
                with torch.no_grad():
                    model.generate(input_ids=ti, attention_mask=tm, max_new_tokens=n_new, min_new_tokens=n_new,
                                   do_sample=False)
        else:
            model, phases = T5GemmaModel.random(config, seed=0, dtype="float32", backend=name), []

            def run(model=model, phases=phases):      # (whole run, until the first new token, new tokens after it)
                first, t = [], time.perf_counter()
                mgenerate(model, ids, max_new_tokens=n_new, attention_mask=mask, min_new_tokens=n_new,
                          stream=lambda tokens: first or first.append(time.perf_counter()))
                phases.append((time.perf_counter() - t, first[0] - t, batch * (n_new - 1)))
            run.phases = phases
        fns[name] = run
    return fns, batch * n_new, None


def generate_batched(quick, torch, names):
    """8 prompts at once, greedy, 128 new tokens each (32 with --quick), against batch 1.
    Prompt r has 256 - 8 r tokens (padded to 256); numba_batch1 is the fast path on the first
    prompt alone, so ratios.vs_batch1 is what batching gains in new tokens per second (and
    ratios.decode_vs_batch1 once the input is encoded: after each run's first new token)."""
    fns, tokens, _ = generate(quick, torch, names, batch=8)
    one, tokens1, _ = generate(quick, None, ["numba"], batch=1)
    fns["numba_batch1"] = one["numba"]
    return fns, {name: tokens1 if name == "numba_batch1" else tokens for name in fns}, None


def weight_read_floor(repeat=5):
    """Seconds per generated token spent only reading the decoder's weights: one matrix-vector
    product per matrix a decode step uses (self q/k/v/o, cross q/o, gate/up/down, the LM
    head), nothing else. Batch-1 float32 decoding cannot be faster than this memory floor.
    Returns the seconds and the bytes read."""
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


def decoder_step_bytes(config):
    """Bytes of float32 matrices one decode step reads: the decoder's layers (all but T5Gemma's
    cross-attention k/v, read once per input) and the LM head's table."""
    from minencdec.model.t5gemma import decoder_names, param_shapes
    prefix = decoder_names(config).prefix + "layers."
    n = sum(int(np.prod(shape)) for name, shape in param_shapes(config).items() if name.startswith(prefix)
            and len(shape) == 2 and ".cross_attn.k_proj" not in name and ".cross_attn.v_proj" not in name)
    return 4 * (n + config.decoder.vocab_size * config.decoder.hidden_size)


# ---------------------------------------------------------------------------- sections


def _print_section(name, doc, res, flops, peak_gflops, repeat):
    print(f"\n{name}: {doc}")
    for n, r in res.items():
        if n in ("ratios", "load_average") or not isinstance(r, dict):
            continue                                          # (also blas_peak_gflops, interleaved: not dicts)
        line = f"  {n:12s} {r['seconds']:8.2f} s  {r['tokens_per_s']:8.1f} tokens/s"
        if flops:
            line += f"  {r['gflops']:6.1f} GFLOP/s ({100 * r['gflops'] / peak_gflops:3.0f}% of BLAS peak)"
        if r.get("peak_rss") is not None:
            line += f"  peak RSS {r['peak_rss'] / 2**30:.2f} GiB (+{r['peak_rss_growth'] / 2**30:.2f} over the libraries)"
        elif r.get("peak_rss_growth") is not None:
            line += f"  peak RSS +{r['peak_rss_growth'] / 2**20:.0f} MiB"
        line += f" (input {r['input_s']:.2f} s, then {r['decode_tokens_per_s']:.1f} tokens/s)" if "input_s" in r else ""
        print(line + f"  ({r['threads']} thread{'s' * (r['threads'] > 1)})")
    print("  fast path: " + ", ".join(f"{v:.2f}x {k[3:]}" for k, v in res["ratios"].items() if k.startswith("vs_"))
          + f" (tokens/s; best of {repeat}, timed in turns; load average {res['load_average'][0]:.2f} at the start,"
          f" {res['load_average'][1]:.2f} at the end)")
    if "decode_vs_batch1" in res["ratios"]:                   # the input phase is each prompt's own work
        b, o, x = res["numba"], res["numba_batch1"]["input_s"], res["ratios"]["decode_vs_batch1"]
        print(f"  decode phase (new tokens/s once the input is encoded): {x:.2f}x batch 1; input phase "
              f"{b['input_s'] / o:.1f}x batch 1's, {100 * b['input_s'] / b['seconds']:.0f}% of the batch's run")
    if "blas_peak_gflops" in res:
        print(f"  BLAS peak: {res['blas_peak_gflops']:.1f} GFLOP/s (float32 square matmul, the best of the blas section "
              f"and of the same turns); the fast path at {100 * res['ratios']['fraction_of_blas_peak']:.0f}% of it")


def _in_process(section, quick, torch, names, threads, repeat, peak_rss_growth, peak_gflops):
    load = os.getloadavg()[0]
    fns, tokens, flops = section(quick, torch, names)
    if flops:        # the BLAS peak again, in the same turns: the blas section's, minutes earlier, saw another load
        n = 1024 if quick else 2048
        a, b = (np.random.default_rng(1).standard_normal((n, n), dtype=np.float32) for _ in range(2))
        fns["blas_peak"] = lambda: a @ b
    timed = interleaved(fns, torch, threads, repeat, peak_rss_growth, section.__name__)
    res = {}
    if flops:
        peak_gflops = max(peak_gflops, 2 * n**3 / timed.pop("blas_peak")[0] / 1e9)
        res["blas_peak_gflops"] = peak_gflops
    for n, (seconds, th, peak) in timed.items():
        tok = tokens[n] if isinstance(tokens, dict) else tokens
        res[n] = {"seconds": seconds, "tokens_per_s": tok / seconds, "threads": th, "peak_rss_growth": peak}
        if flops:
            res[n]["gflops"] = flops / seconds / 1e9
        if getattr(fns[n], "phases", None):                   # the split of the run with the best total
            whole, first, new = min(fns[n].phases)
            res[n].update(input_s=first, decode_tokens_per_s=new / (whole - first))
    fast = res["numba"]["tokens_per_s"]
    res["ratios"] = {("vs_batch1" if n == "numba_batch1" else f"vs_{n}"): fast / res[n]["tokens_per_s"]
                     for n in timed if n != "numba"}
    if "numba_batch1" in res:                                 # the same, once the input is encoded
        rates = [res[n]["decode_tokens_per_s"] for n in ("numba", "numba_batch1")]
        res["ratios"]["decode_vs_batch1"] = rates[0] / rates[1]
    if flops:
        res["ratios"]["fraction_of_blas_peak"] = res["numba"]["gflops"] / peak_gflops
    res["load_average"] = (load, os.getloadavg()[0])
    _print_section(section.__name__, section.__doc__.splitlines()[0], res, flops, peak_gflops, repeat)
    return res


class _Worker:
    """One bench_worker.py process: build once, then one call per `run`."""

    def __init__(self, work, backend, quick, threads):
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # the checkout: fastpath's parent
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([root] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
        self.proc = subprocess.Popen([sys.executable, "-m", "fastpath.bench_worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.backend = backend
        self.built = self.ask({"build": {"work": work, "backend": backend, "quick": quick, "threads": threads}})

    def ask(self, msg):
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"bench worker ({self.backend}) stopped; its error is above")
        return json.loads(line)

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"quit": True}) + "\n")
            self.proc.stdin.flush()
            self.proc.wait(timeout=60)


def _mem_available():
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable"))


WORKER_BYTES = {"train_step_t5gemma2_270m": 16 << 30, "generate_t5gemma2_270m": 6 << 30}   # both workers, measured


def in_workers(work, doc, quick, threads, repeat, backends):
    """A section timed in worker processes, one per backend, in turns (both alive: needs
    WORKER_BYTES of free memory; with less, one after the other, and the JSON says so)."""
    load = os.getloadavg()[0]
    together = _mem_available() >= WORKER_BYTES[work]
    timings, workers = {b: {} for b in backends}, {}
    try:
        for group in ([backends] if together else [[b] for b in backends]):
            for b in group:
                workers[b] = _Worker(work, b, quick, threads)
                workers[b].ask({"run": {"threads": threads}})            # the warm-up
                print(f"{work}: {b} built and warmed up", file=sys.stderr, flush=True)
            for r in range(repeat):
                for b in group:
                    for th in sorted({threads, 1}, reverse=True):
                        if r and timings[b][th] > HOPELESS * min(timings[b].values()):
                            continue                                   # see _drop_hopeless
                        reply = workers[b].ask({"run": {"threads": th}})
                        timings[b][th] = min(timings[b].get(th, np.inf), reply["seconds"])
                        workers[b].peak = reply["peak_rss"]
                        print(f"{work}: turn {r + 1}/{repeat} {b} at {th} thread(s) {reply['seconds']:.2f} s",
                              file=sys.stderr, flush=True)
            for b in group:
                workers[b].close()
    finally:
        for w in workers.values():
            w.close()
    res = {}
    for b in backends:
        (th, seconds), w = min(timings[b].items(), key=lambda kv: kv[1]), workers[b]
        res[b] = {"seconds": seconds, "tokens_per_s": w.built["tokens"] / seconds, "threads": th,
                  "peak_rss": w.peak, "peak_rss_growth": w.peak - w.built["rss_libraries"],
                  "seconds_by_threads": timings[b]}
    res["ratios"] = {f"vs_{b}": res["numba"]["tokens_per_s"] / res[b]["tokens_per_s"] for b in backends if b != "numba"}
    if "torch" in res:
        res["ratios"]["peak_rss_vs_torch"] = res["numba"]["peak_rss"] / res["torch"]["peak_rss"]
        res["ratios"]["peak_rss_growth_vs_torch"] = res["numba"]["peak_rss_growth"] / res["torch"]["peak_rss_growth"]
    res["interleaved"] = together
    res["load_average"] = (load, os.getloadavg()[0])
    _print_section(work, doc, res, None, None, repeat)
    if "torch" in res:
        print(f"  peak memory: fast path {res['ratios']['peak_rss_vs_torch']:.2f}x torch's "
              f"({res['ratios']['peak_rss_growth_vs_torch']:.2f}x counting only what the model and its work add)"
              + ("" if together else "; workers run one after the other (not enough free memory for both)"))
    return res


SECTIONS = ("train_step", "generate", "generate_batched", "train_step_t5gemma2_270m", "generate_t5gemma2_270m")


def model_sections(quick, torch, peak_gflops, threads, repeat, peak_rss_growth, only=None):
    """The whole-model sections (`only`: a subset of SECTIONS) for every backend, printed with
    their ratios."""
    out = {}
    wanted = set(SECTIONS if not only else only)
    names = ["numpy", "numba"] + (["torch"] if torch is not None else [])
    for section in (train_step, generate, generate_batched):
        if section.__name__ in wanted:
            out[section.__name__] = _in_process(section, quick, torch, [n for n in names if n != "numpy"]
                                                if section is generate_batched else names,
                                                threads, repeat, peak_rss_growth, peak_gflops)
    floor, nbytes = weight_read_floor()
    if "generate" in out:
        out["generate"]["weight_read_floor_s"] = floor
    print(f"  memory floor: reading the {nbytes / 2**20:.0f} MiB of matrices a decode step uses takes "
          f"{floor * 1e3:.1f} ms here ({nbytes / floor / 1e9:.1f} GB/s), so at most {1 / floor:.0f} tokens/s "
          f"after the input is encoded")
    big = ["numba"] + (["torch"] if torch is not None else [])
    from .bench_worker import t5gemma2_270m_config
    for work, doc in (("train_step_t5gemma2_270m", "T5Gemma 2 270M-270M (random weights, vocab 262,144), batch 4 "
                       "x (256 + 128) (1 x (64 + 32) with --quick): loss, gradients and an AdamW update"),
                      ("generate_t5gemma2_270m", "T5Gemma 2 270M-270M, greedy, 128 new tokens from 256 input "
                       "tokens (16 from 64 with --quick), batch 1")):
        if work in wanted:
            out[work] = in_workers(work, doc, quick, threads, repeat, big)
    if "generate_t5gemma2_270m" not in out:
        return out
    big_bytes = decoder_step_bytes(t5gemma2_270m_config())
    out["generate_t5gemma2_270m"]["weight_read_floor_s"] = big_bytes * floor / nbytes
    print(f"  memory floor: {big_bytes / 2**20:.0f} MiB of matrices per decode step (the 262,144 x 640 LM head "
          f"included) at the rate measured above: {big_bytes * floor / nbytes * 1e3:.1f} ms, so at most "
          f"{nbytes / (big_bytes * floor):.0f} tokens/s after the input is encoded")
    return out
