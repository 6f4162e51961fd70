"""A benchmark worker: one backend's model in a process of its own, timed on request.

    python -m fastpath.bench_worker        (started by bench_model.run_in_workers)

The T5Gemma 2 270M-270M sections run each backend in its own process: so that each one's
peak memory (the process's VmHWM: weights, gradients, AdamW's moments, activations) is its
own, and so that the two can still be timed in interleaved turns, the parent asks each
worker for one call at a time. One JSON object per line on stdin and stdout:

    {"build": {"work": W, "backend": "numba" | "torch", "quick": q, "threads": n}}
        -> {"ready": true, "rss_libraries": bytes, "rss_built": bytes}
    {"run": {"threads": n}}      n: BLAS threads (numba; its lanes stay at the bench's count)
                                 or torch threads   -> {"seconds": s, "peak_rss": bytes}
    {"quit": true}

Works W: "train_step_t5gemma2_270m" (loss, every gradient and an AdamW update: the fast
path's fused update, fastpath/optim.py, as minencdec.training.optim.AdamW(backend="numba")
runs it (fastpath may not import the training room, so the few lines of bookkeeping are
here); torch's AdamW(fused=True), its fastest), "generate_t5gemma2_270m" (greedy). Random
weights of the real shapes (vocabulary 262,144): nothing is downloaded.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import numpy as np

from .measure import _status

BIG = dict(B=4, S=256, T=128)          # the 270M-270M training batch: 4 x (256 + 128) tokens
BIG_QUICK = dict(B=1, S=64, T=32)
GEN_BIG = dict(S=256, new=128)         # greedy: 128 new tokens from 256 input tokens, batch 1
GEN_BIG_QUICK = dict(S=64, new=16)


def t5gemma2_270m_config():
    from minencdec.model.config import T5GemmaConfig
    from minencdec.model.presets import preset
    g = preset("gemma3-270m")
    return T5GemmaConfig(g, g)


def torch_t5gemma2(config, torch):
    from transformers import T5Gemma2Config, T5Gemma2ForConditionalGeneration
    torch.manual_seed(0)
    return T5Gemma2ForConditionalGeneration._from_config(T5Gemma2Config(**config.to_hf_dict()),
                                                         attn_implementation="eager", dtype=torch.float32)


def build(work, backend, quick):
    """(function of one call, tokens per call) for a work on a backend."""
    config, rng = t5gemma2_270m_config(), np.random.default_rng(0)
    V = config.decoder.vocab_size
    if work == "train_step_t5gemma2_270m":
        B, S, T = (BIG_QUICK if quick else BIG).values()
        ids, labels = rng.integers(3, V, (B, S)), rng.integers(3, V, (B, T))
        tokens = B * (S + T)
        if backend == "torch":
            import torch
            model = torch_t5gemma2(config, torch).train()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
            ti, tl = torch.from_numpy(ids), torch.from_numpy(labels)

            def call():
                opt.zero_grad(set_to_none=True)
                model(input_ids=ti, labels=tl, use_cache=False).loss.backward()
                opt.step()
            return call, tokens
        from minencdec.model.t5gemma import T5GemmaModel
        model = T5GemmaModel.random(config, seed=0, dtype="float32", backend=backend)
        update = fused_adamw(model.params)

        def call():
            update(model.loss_and_grads(ids, labels)[1])
        return call, tokens
    if work == "generate_t5gemma2_270m":
        S, new = (GEN_BIG_QUICK if quick else GEN_BIG).values()
        ids = rng.integers(3, V, (1, S))
        if backend == "torch":
            import torch
            model, ti = torch_t5gemma2(config, torch).eval(), torch.from_numpy(ids)

            def call():
                with torch.no_grad():
                    model.generate(input_ids=ti, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            return call, new
        from minencdec.model.generate import generate
        from minencdec.model.t5gemma import T5GemmaModel
        model = T5GemmaModel.random(config, seed=0, dtype="float32", backend=backend)
        return (lambda: generate(model, ids, max_new_tokens=new, min_new_tokens=new)), new
    raise ValueError(f"bench_worker: unknown work {work!r}")


def fused_adamw(params, lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1):
    """update(grads): AdamW on params in place, one fused pass per tensor (training.optim.AdamW
    with backend="numba": matrices decay, 1-D tensors do not)."""
    from .optim import adamw_update
    b1, b2 = betas
    state = {name: (np.zeros_like(p), np.zeros_like(p)) for name, p in params.items()}
    t = [0]

    def update(grads):
        t[0] += 1
        for name, p in params.items():
            m, v = state[name]
            adamw_update(p, np.ascontiguousarray(grads[name]), m, v, 1.0 - lr * weight_decay if p.ndim >= 2 else 1.0,
                         b1, b2, lr / (1.0 - b1 ** t[0]), math.sqrt(1.0 - b2 ** t[0]), eps)
    return update


def _set_threads(backend, n):
    if backend == "torch":
        import torch
        torch.set_num_threads(n)
    else:
        from threadpoolctl import threadpool_limits
        threadpool_limits(limits=n, user_api="blas")


def main():
    out = sys.stdout
    sys.stdout = sys.stderr                        # whatever the libraries print stays off the protocol
    call = backend = None
    for line in sys.stdin:
        msg = json.loads(line)
        if "build" in msg:
            b = msg["build"]
            backend = b["backend"]
            import numba
            numba.set_num_threads(max(1, min(b["threads"], numba.config.NUMBA_NUM_THREADS)))
            _set_threads(backend, b["threads"])
            if backend == "numba":
                from .warmup import compile_all
                compile_all(verbose=False)
            libraries = _status("VmRSS")
            call, tokens = build(b["work"], backend, b["quick"])
            reply = {"ready": True, "tokens": tokens, "rss_libraries": libraries, "rss_built": _status("VmRSS")}
        elif "run" in msg:
            _set_threads(backend, msg["run"]["threads"])
            t = time.perf_counter()
            call()
            reply = {"seconds": time.perf_counter() - t, "peak_rss": _status("VmHWM"), "load": os.getloadavg()[0]}
        else:
            return 0
        out.write(json.dumps(reply) + "\n")
        out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
