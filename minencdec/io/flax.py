"""The official JAX/Flax T5Gemma (Google's `gemma` package, `gemma/research/t5gemma/`) in,
as a T5Gemma checkpoint directory out: `minencdec import-flax`.

    config, params = flax_to_t5gemma(flat, jax_config)          # NumPy only; no JAX needed
    import_flax("params.npz", "jax_config.json", "t5gemma_dir")

Input: the Flax parameters flattened with "/" (`flax.traverse_util.flatten_dict(params,
sep="/")`, top keys `encoder` and `decoder`, saved with `np.savez`), and the two
`TransformerConfig`s as JSON, `{"encoder": {...}, "decoder": {...}}`, fields by their own
names, enums by name ("LOCAL_SLIDING", "BY_ONE_OVER_SQRT_HEAD_DIM"). Every tensor below is
(out, in) as transformers stores it; N heads, K kv heads, D width, Dh head dim, F MLP width:

    embedder/input_embedding             (V, D)         embed_tokens (scaled by sqrt(D) in both)
    layer_i/{pre,post}_attention_norm    (D,)           {pre,post}_self_attn_layernorm (1 + w in both)
    layer_i/{pre,post}_cross_attention_norm             {pre,post}_cross_attn_layernorm
    layer_i/{pre,post}_ffw_norm                         {pre,post}_feedforward_layernorm
    attn/q_einsum/w                      (N, D, Dh)     q_proj = w.transpose(0, 2, 1).reshape(N*Dh, D)
    attn/kv_einsum/w                     (2, K, D, Dh)  k_proj, v_proj = w[0], w[1], each as q
    attn/qkv_einsum/w (self-attention, K == N)  (3, N, D, Dh)  q_proj, k_proj, v_proj
    attn/attn_vec_einsum/w               (N, Dh, D)     o_proj = w.reshape(N*Dh, D).T
    cross_attn/...                       likewise (kv_einsum reads the encoder's width)
    mlp/gating_einsum                    (2, D, F)      gate_proj = w[0].T (the GELU side), up_proj = w[1].T
                                         (2, F, D)      with transpose_gating_einsum: w[0], w[1] as they are
    mlp/linear                           (F, D)         down_proj = w.T
    final_norm/scale                     (D,)           norm

What JAX hard-codes becomes config: RMSNorm eps 1e-6, pad id 0 (its masks are `ids != 0`),
tanh GELU. The encoder's sliding window is JAX's `|i - j| < w` (`get_sliding_mask`): the
checkpoint stores the rule "lt" (model/config.py WINDOW_FIELD). transformers ignores that
field and applies `<= w`, so on inputs longer than the window it disagrees with the JAX
model (and with minencdec) in the encoder's sliding layers; it loads the checkpoint all the same.
"""

from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from minencdec.files.checkpoint import check_destination, save_tensors
from minencdec.model import t5gemma
from minencdec.model.config import FULL, SLIDING, GemmaConfig, T5GemmaConfig
from minencdec.model.validate import check_params

_FIELDS = {   # gemma's TransformerConfig: field -> its default (None: required)
    "num_layers": None, "num_embed": None, "embed_dim": None, "hidden_dim": None, "num_heads": None,
    "head_dim": None, "num_kv_heads": None, "final_logit_softcap": None, "use_post_attn_norm": None,
    "use_post_ffw_norm": None, "attention_types": None,
    "query_pre_attn_norm": "BY_ONE_OVER_SQRT_HEAD_DIM", "attn_logits_soft_cap": None, "sliding_window_size": None,
    "transpose_gating_einsum": False, "local_base_frequency": 10_000, "global_base_frequency": 10_000,
    "local_scale_factor": 1.0, "global_scale_factor": 1.0, "mm_extra_vocab_size": 0,
    "enable_cross_attention": False, "bidirectional": False, "kv_embed_dim": None}
_REQUIRED = list(_FIELDS)[:11]
_LAYER_TYPES = {"LOCAL_SLIDING": SLIDING, "GLOBAL": FULL}
_NORMS = {"pre_attention_norm": "pre_self_attn_layernorm", "post_attention_norm": "post_self_attn_layernorm",
          "pre_cross_attention_norm": "pre_cross_attn_layernorm",
          "post_cross_attention_norm": "post_cross_attn_layernorm",
          "pre_ffw_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}


class FlaxImportError(ValueError):
    """Flax parameters or a JAX config that cannot be converted; the message names the key."""


# --------------------------------------------------------------------------- the config

def stack_config(jc: dict, side: str, source: str) -> GemmaConfig:
    """One stack's GemmaConfig from gemma's TransformerConfig fields (a dict)."""
    where = f"{source} [{side}]"
    if not isinstance(jc, dict):
        raise FlaxImportError(f"{where}: expected an object of TransformerConfig fields")
    unknown = sorted(set(jc) - set(_FIELDS))
    missing = [k for k in _REQUIRED if k not in jc]
    if unknown or missing:
        raise FlaxImportError(f"{where}: " + "; ".join(
            ([f"unknown TransformerConfig fields {unknown}"] if unknown else [])
            + ([f"missing fields {missing}"] if missing else [])))
    f = {**_FIELDS, **jc}
    encoder = side == "encoder"
    for name, want in (("bidirectional", encoder), ("enable_cross_attention", not encoder),
                       ("use_post_attn_norm", True), ("use_post_ffw_norm", True)):
        if f[name] is not want:
            raise FlaxImportError(f"{where}: {name} is {f[name]!r}; a T5Gemma {side} has {want}")
    if f["mm_extra_vocab_size"]:
        raise FlaxImportError(f"{where}: mm_extra_vocab_size {f['mm_extra_vocab_size']} (multimodal tokens) "
                              "is not T5Gemma")
    if f["local_base_frequency"] != f["global_base_frequency"] or (f["local_scale_factor"],
                                                                   f["global_scale_factor"]) != (1.0, 1.0):
        raise FlaxImportError(f"{where}: RoPE bases {f['local_base_frequency']}/{f['global_base_frequency']} and "
                              f"scales {f['local_scale_factor']}/{f['global_scale_factor']} (local/global): "
                              "T5Gemma (Gemma 2) has one base for every layer and no scaling")
    types = f["attention_types"]
    if not isinstance(types, list) or any(t not in _LAYER_TYPES for t in types):
        raise FlaxImportError(f"{where}: attention_types must be a list of {sorted(_LAYER_TYPES)}, got {types!r}")
    if len(types) != f["num_layers"]:
        raise FlaxImportError(
            f"{where}: num_layers is {f['num_layers']} but attention_types has {len(types)} entries. gemma's "
            f"Transformer builds one layer per pair of the two (zip), so it has {min(len(types), f['num_layers'])} "
            "layers: a preset made with an odd num_layers ((LOCAL_SLIDING, GLOBAL) * (num_layers // 2)) "
            "silently drops its last layer. Make the two agree with the parameters' layer_i")
    scalar = _query_scalar(f, where)
    try:
        return _gemma_config(f, encoder, scalar)
    except (TypeError, ValueError) as e:
        raise FlaxImportError(f"{where}: {e}") from None


def _gemma_config(f, encoder, scalar):
    return GemmaConfig(
        vocab_size=f["num_embed"], hidden_size=f["embed_dim"], intermediate_size=f["hidden_dim"],
        num_hidden_layers=f["num_layers"], num_attention_heads=f["num_heads"],
        num_key_value_heads=f["num_kv_heads"], head_dim=f["head_dim"],
        query_pre_attn_scalar=scalar, sliding_window=f["sliding_window_size"],
        layer_types=tuple(_LAYER_TYPES[t] for t in f["attention_types"]), attn_logit_softcapping=f["attn_logits_soft_cap"],
        final_logit_softcapping=f["final_logit_softcap"], rms_norm_eps=1e-6, rope_theta=f["global_base_frequency"],
        pad_token_id=0, eos_token_id=1, bos_token_id=2, bidirectional_window="lt" if encoder else None)


def _query_scalar(f, where):
    """transformers' query_pre_attn_scalar (queries are scaled by its -1/2 power)."""
    norm = f["query_pre_attn_norm"]
    if norm == "BY_ONE_OVER_SQRT_HEAD_DIM":
        return f["head_dim"]
    if norm == "BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS":
        return f["embed_dim"] // f["num_heads"]
    if norm == "BY_EMBED_DIM_DIV_NUM_HEADS":
        raise FlaxImportError(f"{where}: query_pre_attn_norm BY_EMBED_DIM_DIV_NUM_HEADS multiplies queries by "
                              "embed_dim // num_heads (not its inverse square root): no Hugging Face config "
                              "expresses it, so it is refused")
    raise FlaxImportError(f"{where}: query_pre_attn_norm {norm!r} is none of BY_ONE_OVER_SQRT_HEAD_DIM, "
                          "BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS")


def t5gemma_config(jax_config: dict, source="jax config") -> T5GemmaConfig:
    """The T5GemmaConfig of `{"encoder": {...}, "decoder": {...}}` (TransformerConfig fields)."""
    if not isinstance(jax_config, dict) or set(jax_config) != {"encoder", "decoder"}:
        raise FlaxImportError(f'{source}: expected {{"encoder": {{...}}, "decoder": {{...}}}} '
                              f"(TransformerConfig fields), got keys {sorted(jax_config) if isinstance(jax_config, dict) else type(jax_config).__name__}")
    enc, dec = (stack_config(jax_config[s], s, source) for s in ("encoder", "decoder"))
    kv = jax_config["decoder"].get("kv_embed_dim")
    if (kv or dec.hidden_size) != enc.hidden_size:
        raise FlaxImportError(f"{source} [decoder]: kv_embed_dim is {kv} but the encoder's embed_dim is "
                              f"{enc.hidden_size}: cross-attention reads the encoder's output")
    try:
        return T5GemmaConfig(enc, dec)
    except ValueError as e:
        raise FlaxImportError(f"{source}: {e}") from None


# --------------------------------------------------------------------------- the parameters

def flax_to_t5gemma(flat: dict, jax_config: dict, source="flax params") -> tuple[T5GemmaConfig, dict]:
    """(config, params named as transformers' T5GemmaForConditionalGeneration) from Flax
    parameters flattened with "/" (a leading "params/" is allowed). Every key must be used
    and every shape right; the errors name the key."""
    config = t5gemma_config(jax_config, source)
    flat = {k.removeprefix("params/"): np.asarray(v) for k, v in flat.items()}
    used, params = set(), {}

    def take(key, shape):
        if key not in flat:
            raise FlaxImportError(f"{source}: missing {key} {shape}")
        if flat[key].shape != shape:
            raise FlaxImportError(f"{source}: {key} has shape {flat[key].shape}, expected {shape}")
        used.add(key)
        return flat[key]

    for side, c in (("encoder", config.encoder), ("decoder", config.decoder)):
        P, D = f"model.{side}.", c.hidden_size
        params[f"{P}embed_tokens.weight"] = take(f"{side}/embedder/input_embedding", (c.vocab_size, D))
        params[f"{P}norm.weight"] = take(f"{side}/final_norm/scale", (D,))
        for i in range(c.num_hidden_layers):
            j, p = f"{side}/layer_{i}/", f"{P}layers.{i}."
            for theirs, ours in _NORMS.items():
                if side == "decoder" or "cross" not in theirs:
                    params[f"{p}{ours}.weight"] = take(f"{j}{theirs}/scale", (D,))
            params.update(_attention(take, f"{j}attn/", f"{p}self_attn.", c, D, fused=True))
            if side == "decoder":
                params.update(_attention(take, f"{j}cross_attn/", f"{p}cross_attn.", c,
                                         config.encoder.hidden_size, fused=False))
            params.update(_mlp(take, f"{j}mlp/", f"{p}mlp.", c, _flag(jax_config[side], "transpose_gating_einsum")))
    unused = sorted(set(flat) - used)
    if unused:
        raise FlaxImportError(f"{source}: {len(unused)} parameters are not part of a T5Gemma of this config: "
                              f"{', '.join(unused[:5])}{' ...' if len(unused) > 5 else ''}")
    return config, params


def _flag(jc, name):
    return bool(jc.get(name, _FIELDS[name]))


def _heads_in(w):
    """(n, In, Dh) einsum weight -> (n*Dh, In) projection."""
    n, d_in, dh = w.shape
    return w.transpose(0, 2, 1).reshape(n * dh, d_in)


def _attention(take, j, p, c, d_kv, fused):
    """q/k/v/o of one attention. Self-attention with K == N stores q, k, v in one qkv_einsum
    (gemma's Attention.use_qkv_einsum); cross-attention never does."""
    N, K, Dh, D = c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.hidden_size
    if fused and K == N:
        q, k, v = take(f"{j}qkv_einsum/w", (3, N, D, Dh))
    else:
        q = take(f"{j}q_einsum/w", (N, D, Dh))
        k, v = take(f"{j}kv_einsum/w", (2, K, d_kv, Dh))
    return {f"{p}q_proj.weight": _heads_in(q), f"{p}k_proj.weight": _heads_in(k),
            f"{p}v_proj.weight": _heads_in(v),
            f"{p}o_proj.weight": take(f"{j}attn_vec_einsum/w", (N, Dh, D)).reshape(N * Dh, D).T}


def _mlp(take, j, p, c, transposed):
    D, F = c.hidden_size, c.intermediate_size
    gating = take(f"{j}gating_einsum", (2, F, D) if transposed else (2, D, F))
    gate, up = (gating[0], gating[1]) if transposed else (gating[0].T, gating[1].T)
    return {f"{p}gate_proj.weight": gate, f"{p}up_proj.weight": up,
            f"{p}down_proj.weight": take(f"{j}linear", (F, D)).T}


# --------------------------------------------------------------------------- files

def read_flax_params(path) -> dict[str, np.ndarray]:
    """The arrays of an .npz file (never unpickled: object arrays are refused)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FlaxImportError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise FlaxImportError(f"{path}: not a readable .npz of numeric arrays ({e})") from None
    for k, a in arrays.items():
        if a.dtype not in (np.float32, np.float64, np.float16):
            raise FlaxImportError(f"{path}: {k} has dtype {a.dtype}; save float32 or float64 arrays "
                                  "(bfloat16: convert with np.asarray(x, np.float32) first)")
    return arrays


def read_jax_config(path) -> dict:
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FlaxImportError(f"{path}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FlaxImportError(f"{path}: invalid JSON ({e})") from None


def import_flax(params_path, config_path, out, overwrite=False, save_dtype=None) -> T5GemmaConfig:
    """Convert Flax parameters + JAX config files into a T5Gemma checkpoint directory `out`
    (written crash-consistently; each tensor in its stored dtype unless `save_dtype`).
    Everything is read and checked before anything is written."""
    check_destination(out, overwrite=overwrite)
    source = os.fspath(params_path)
    config, params = flax_to_t5gemma(read_flax_params(params_path), read_jax_config(config_path), source)
    check_params(params, t5gemma.param_shapes(config), None)      # the names load_pretrained reads
    for name, a in params.items():
        if not np.isfinite(a).all():
            raise FlaxImportError(f"{source}: {name} holds NaN or infinite values")
    hf = config.to_hf_dict()
    hf["minencdec_import"] = {"from": "flax", "params": os.path.abspath(params_path),
                              "jax_config": os.path.abspath(config_path)}
    save_tensors(out, {n: np.ascontiguousarray(a) for n, a in params.items()}, hf, dtype=save_dtype,
                 overwrite=overwrite)
    return config
