"""Write the JAX golden files: tiny random T5Gemma models run by the official JAX/Flax code.

Needs its own virtual environment (never minencdec's: gemma pulls tensorflow, ~5 GB).
Made with Python 3.11.7 and exactly:

    python -m venv jaxvenv
    jaxvenv/bin/pip install "gemma==3.3.0" "jax[cpu]" "sentencepiece==0.2.2" kagglehub safetensors==0.8.0
    # resolved to jax 0.10.2, jaxlib 0.10.2, flax 0.12.8, numpy 2.4.6, tensorflow 2.21.0,
    # protobuf 6.33.6, kagglehub 1.0.3 (gemma's config.py imports kagglehub, which gemma does
    # not declare; sentencepiece 0.2.2 is the one that works with that protobuf)
    jaxvenv/bin/python tests/verify/jax_golden/make_jax_golden.py      # from the repository root

For each case it writes, beside this file:

    CASE.params.npz          the Flax parameters, flattened with "/" (float64)
    CASE.jax_config.json     the two TransformerConfigs, fields by name (import-flax's input)
    CASE.jax.safetensors     JAX's activations in minencdec's dump format, float64
                             (jax_enable_x64), gemma's RoPE as shipped (angles in float32)
    CASE.jax_rope64.safetensors  the same with gemma's `apply_rope` computed in float64

Activations are captured as a verifier would: `capture_intermediates` for every module's
output (norms, blocks, the embedder), `sow` for q and k after RoPE (two Attention methods
wrapped), and the softmax's input and output for scores and probabilities. JAX is called with
the decoder's tokens first and derives every mask from ids != 0, so the dumps' masks are
written as `ids != 0`.
"""

import json
import os
import sys
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)
import flax                                              # noqa: E402
import gemma                                             # noqa: E402
import jax.numpy as jnp                                  # noqa: E402
import numpy as np                                       # noqa: E402
from gemma.gm import math as positional_embeddings       # noqa: E402
from gemma.research.t5gemma import modules, t5gemma      # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))                 # the repository: minencdec's write_dump
from minencdec.verify import write_dump                  # noqa: E402

LOCAL, GLOBAL = modules.AttentionType.LOCAL_SLIDING, modules.AttentionType.GLOBAL
NORM = modules.QueryPreAttentionNormalisation

# Case "gqa": GQA (4 query heads, 2 kv), window 3 on inputs of 9, padding left and right,
# softcaps small enough to bite. Case "mha": 2 heads = 2 kv (gemma's fused qkv_einsum),
# queries scaled by (D / H)^-1/2, the transposed gating layout, encoder width 24 and decoder
# width 16, three encoder layers.
CASES = {
    "gqa": dict(
        encoder=dict(num_layers=2, num_embed=48, embed_dim=24, hidden_dim=32, num_heads=4, head_dim=8,
                     num_kv_heads=2, final_logit_softcap=3.0, attention_types=[LOCAL, GLOBAL],
                     attn_logits_soft_cap=2.0, sliding_window_size=3),
        decoder=dict(num_layers=2, num_embed=48, embed_dim=24, hidden_dim=32, num_heads=4, head_dim=8,
                     num_kv_heads=2, final_logit_softcap=3.0, attention_types=[LOCAL, GLOBAL],
                     attn_logits_soft_cap=2.0, sliding_window_size=3),
        input_tokens=[[5, 9, 17, 33, 2, 40, 41, 0, 0], [0, 0, 7, 8, 19, 23, 42, 11, 3]],
        target_tokens=[[2, 13, 21, 34, 5], [0, 2, 44, 6, 27]],
        internals=["encoder.layers.0", "decoder.layers.1"]),
    "mha": dict(
        encoder=dict(num_layers=3, num_embed=40, embed_dim=24, hidden_dim=40, num_heads=2, head_dim=8,
                     num_kv_heads=2, final_logit_softcap=None, attention_types=[LOCAL, GLOBAL, LOCAL],
                     attn_logits_soft_cap=None, sliding_window_size=4, transpose_gating_einsum=True,
                     query_pre_attn_norm=NORM.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS),
        decoder=dict(num_layers=2, num_embed=40, embed_dim=16, hidden_dim=32, num_heads=2, head_dim=8,
                     num_kv_heads=2, final_logit_softcap=30.0, attention_types=[LOCAL, GLOBAL],
                     attn_logits_soft_cap=None, sliding_window_size=4, transpose_gating_einsum=True,
                     query_pre_attn_norm=NORM.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS, kv_embed_dim=24),
        input_tokens=[[3, 14, 15, 9, 26, 5, 35, 8, 9, 7], [21, 18, 28, 1, 8, 28, 0, 0, 0, 0]],
        target_tokens=[[2, 17, 4, 39, 10, 12], [2, 31, 6, 0, 0, 0]],
        internals=["encoder.layers.2", "decoder.layers.0"]),
}


def transformer_config(fields, side):
    return modules.TransformerConfig(use_post_attn_norm=True, use_post_ffw_norm=True,
                                     enable_cross_attention=side == "decoder", bidirectional=side == "encoder",
                                     **fields)


def as_json(fields):
    """TransformerConfig fields with enums by name."""
    def plain(v):
        return v.name if hasattr(v, "name") else [plain(x) for x in v] if isinstance(v, list) else v
    return {k: plain(v) for k, v in fields.items()}


def random_params(model, tokens, targets, seed):
    """Flax's own initialisation for the tree's structure; then values that make every
    part matter: norm scales N(0, 0.3) (a missing `1 +` shows), matrices N(0, 1/sqrt(fan-in))."""
    tree = model.init(jax.random.PRNGKey(seed), targets, tokens)["params"]
    flat = flax.traverse_util.flatten_dict(tree, sep="/")
    rng = np.random.default_rng(seed)
    out = {}
    for name, leaf in sorted(flat.items()):
        shape = leaf.shape
        if name.endswith("/scale"):
            out[name] = rng.normal(0, 0.3, shape)
        elif name.endswith("input_embedding"):
            out[name] = rng.normal(0, 0.5, shape)
        else:
            out[name] = rng.normal(0, 1.6 / np.sqrt(fan_in(name, shape)), shape)
    return out


def fan_in(name, shape):
    """The width each matrix reads (gemma's einsum layouts, see minencdec/io/flax.py)."""
    if "attn_vec_einsum" in name:                      # (N, Dh, D)
        return shape[0] * shape[1]
    if name.endswith("gating_einsum"):                 # (2, D, F), or (2, F, D) transposed
        return min(shape[1:])
    if name.endswith("linear"):                        # (F, D)
        return shape[0]
    return shape[-2]                                   # q (N, D, Dh), kv (2, K, D, Dh), qkv (3, N, D, Dh)


def rope_float64(inputs, positions, *, base_frequency, scale_factor=1.0, rope_proportion=1.0):
    """gemma's apply_rope (gemma/gm/math/_positional_embeddings.py) with its timescale in
    float64: the one change that makes JAX's float64 run float64 throughout."""
    head_dim = inputs.shape[-1]
    exponents = (2.0 / head_dim) * jnp.arange(0, head_dim // 2, dtype=jnp.float64)
    angles = positions[..., None] / (base_frequency ** exponents)[None, None, :]
    angles = angles[..., None, :] / scale_factor
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    first, second = jnp.split(inputs, 2, axis=-1)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1).astype(inputs.dtype)


class Watch:
    """Patches that sow q and k after RoPE and record the softmax's input and output."""

    def __init__(self, rope64):
        self.rope64, self.softmax_calls = rope64, []

    def __enter__(self):
        self.saved = (modules.Attention._maybe_key_rope, modules.Attention._maybe_query_rope,
                      positional_embeddings.apply_rope, jax.nn.softmax)
        key_rope, _, apply_rope, softmax = self.saved

        def keys(attn, key_proj, segment_pos_kv):
            k = key_rope(attn, key_proj, segment_pos_kv)
            attn.sow("intermediates", "k", k)
            return k

        def queries(attn, query_proj, segment_pos_q):          # gemma's own, with a sow before the scaling
            q = query_proj
            if segment_pos_q is not None and not attn.enable_cross_attention:
                q = positional_embeddings.apply_rope(q, segment_pos_q, base_frequency=attn.rope_base_frequency,
                                                     scale_factor=attn.rope_scale_factor)
            attn.sow("intermediates", "q", q)
            return q * attn.query_pre_attn_scalar

        def recorded_softmax(x, axis=-1, **kw):
            p = softmax(x, axis=axis, **kw)
            self.softmax_calls.append((np.asarray(x), np.asarray(p)))
            return p

        modules.Attention._maybe_key_rope, modules.Attention._maybe_query_rope = keys, queries
        positional_embeddings.apply_rope = rope_float64 if self.rope64 else apply_rope
        jax.nn.softmax = recorded_softmax
        return self

    def __exit__(self, *exc):
        (modules.Attention._maybe_key_rope, modules.Attention._maybe_query_rope,
         positional_embeddings.apply_rope, jax.nn.softmax) = self.saved


def run(model, params, tokens, targets, rope64):
    """(dump tensors) of one forward pass, named as minencdec's dump format."""
    tree = flax.traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in params.items()}, sep="/")
    with Watch(rope64) as watch:
        out, state = model.apply({"params": tree}, targets, tokens, capture_intermediates=lambda m, name: True,
                                 mutable=["intermediates"])
    inter = state["intermediates"]
    acts = {"input_ids": tokens, "attention_mask": (tokens != 0).astype(np.int64),
            "decoder_input_ids": targets, "decoder_attention_mask": (targets != 0).astype(np.int64),
            "logits": np.asarray(out.logits)}
    calls = iter(watch.softmax_calls)                   # one per attention, in the order they ran
    for side in ("encoder", "decoder"):
        stack = inter[side]
        acts[f"{side}.embed"] = np.asarray(stack["embedder"]["encode"][0])
        acts[f"{side}.norm"] = np.asarray(stack["final_norm"]["__call__"][0])
        for i in range(len([k for k in stack if k.startswith("layer_")])):
            layer, name = stack[f"layer_{i}"], f"{side}.layers.{i}"
            acts[name] = np.asarray(layer["__call__"][0][2])
            subs = [("self_attn", "attn", "post_attention_norm")]
            if side == "decoder":
                subs.append(("cross_attn", "cross_attn", "post_cross_attention_norm"))
            for ours, attn, post in subs:
                acts[f"{name}.{ours}"] = np.asarray(layer[post]["__call__"][0])
                scores, probs = next(calls)                                  # (B, T, N, S)
                acts[f"{name}.{ours}.q"] = np.asarray(layer[attn]["q"][0]).transpose(0, 2, 1, 3)
                acts[f"{name}.{ours}.k"] = np.asarray(layer[attn]["k"][0]).transpose(0, 2, 1, 3)
                acts[f"{name}.{ours}.scores"] = scores.transpose(0, 2, 1, 3)
                acts[f"{name}.{ours}.probs"] = probs.transpose(0, 2, 1, 3)
            acts[f"{name}.mlp"] = np.asarray(layer["post_ffw_norm"]["__call__"][0])
    assert next(calls, None) is None, "more softmax calls than attentions"
    return acts


def keep_internals(acts, wanted):
    """Drop the internals of layers not in `wanted` (the files stay small)."""
    return {k: v for k, v in acts.items()
            if not k.endswith((".q", ".k", ".scores", ".probs")) or k.rsplit(".", 2)[0] in wanted}


def main():
    versions = f"gemma {gemma.__version__}, jax {jax.__version__}, flax {flax.__version__}"
    for seed, (case, spec) in enumerate(CASES.items()):
        cfg = t5gemma.T5GemmaConfig(encoder_config=transformer_config(spec["encoder"], "encoder"),
                                    decoder_config=transformer_config(spec["decoder"], "decoder"))
        model = cfg.make(dtype=jnp.float64)
        tokens, targets = np.array(spec["input_tokens"]), np.array(spec["target_tokens"])
        params = random_params(model, tokens, targets, seed)
        np.savez(HERE / f"{case}.params.npz", **params)
        (HERE / f"{case}.jax_config.json").write_text(json.dumps(
            {side: as_json(spec[side]) | {"use_post_attn_norm": True, "use_post_ffw_norm": True,
                                          "enable_cross_attention": side == "decoder",
                                          "bidirectional": side == "encoder"}
             for side in ("encoder", "decoder")}, indent=1) + "\n")
        for rope64, suffix in ((False, "jax"), (True, "jax_rope64")):
            acts = keep_internals(run(model, params, tokens, targets, rope64), spec["internals"])
            assert all(v.dtype in (np.float64, np.int64) for v in acts.values())
            path = HERE / f"{case}.{suffix}.safetensors"
            if path.exists():
                os.remove(path)
            write_dump(path, acts, {"kind": "t5gemma", "dtype": "float64", "bidirectional_window": "lt",
                                    "producer": f"{versions}; RoPE " + ("float64 (patched)" if rope64
                                                                        else "as shipped (float32 angles)")})
            print(f"wrote {path.name}: {len(acts)} tensors, {path.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
