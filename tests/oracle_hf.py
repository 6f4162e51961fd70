"""The live oracle for the tests: transformers' eager Gemma2 / T5Gemma / Gemma3 / T5Gemma2
models built on our parameters, run in true float64 under
`minencdec.verify.hf_oracle.float64_exact()` (its docstring lists the float32 islands it patches).

Parameters are keyed by minencdec's (= the checkpoint's) names. transformers' T5Gemma 2 names
the encoder's text tensors `model.encoder.text_model.*` in its state_dict and also holds a
vision tower and projector that text never reaches: `_our_name` maps the first and leaves the
second at transformers' initialisation (no gradient of them is returned).

torch and transformers are imported inside functions, so importing this module (and
`cases.py`) works without them.
"""

from __future__ import annotations

import contextlib

import numpy as np

# The float64 patch lives in the library (the comparison command uses it too).
from minencdec.verify.hf_oracle import float64_exact, patch_targets  # noqa: F401  (patch_targets: test_oracle)

# --------------------------------------------------------------------------- building and running

def _torch_dtype(dtype):
    import torch
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


_T5G2_TEXT = "model.encoder.text_model."
_T5G2_UNUSED = ("model.encoder.vision_tower.", "model.encoder.multi_modal_projector.")


def _our_name(hf_name):
    """minencdec's name of a transformers parameter, or None for T5Gemma 2's vision parts."""
    if hf_name.startswith(_T5G2_UNUSED):
        return None
    if hf_name.startswith(_T5G2_TEXT):
        return "model.encoder." + hf_name[len(_T5G2_TEXT):]
    return hf_name


def _named_parameters(model):
    """{our name: Parameter} of every parameter text uses (tied ones are listed once)."""
    return {ours: p for name, p in model.named_parameters() if (ours := _our_name(name)) is not None}


def _build(cls, hf_config, params, dtype, **kwargs):
    """A transformers model of class `cls` with eager attention in `dtype`, holding `params`.

    Every non-tied parameter must be given, with its exact shape; nothing unknown is accepted."""
    import torch
    model = cls._from_config(hf_config, attn_implementation="eager", dtype=_torch_dtype(dtype), **kwargs)
    model.eval()                                    # dropout is 0 anyway; eval to be explicit
    named = _named_parameters(model)                # tied lm_head is not listed separately
    missing, unknown = sorted(set(named) - set(params)), sorted(set(params) - set(named))
    if missing or unknown:
        raise KeyError(f"{cls.__name__}: missing params {missing}, unknown params {unknown}")
    with torch.no_grad():
        for name, p in named.items():
            value = np.asarray(params[name])
            if tuple(value.shape) != tuple(p.shape):
                raise ValueError(f"{name}: shape {value.shape}, {cls.__name__} expects {tuple(p.shape)}")
            p.copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return model


def _t(x, dtype=None):
    import torch
    if x is None:
        return None
    t = torch.from_numpy(np.ascontiguousarray(x))
    return t if dtype is None else t.to(dtype)


def _np(t):
    return t.detach().to(dtype=__import__("torch").float64).cpu().numpy()


def _run(model, kwargs, labels_given, exact, extra=None):
    """Forward (and backward when there is a loss) under float64_exact() if `exact`."""
    ctx = float64_exact() if exact else contextlib.nullcontext()
    with ctx:
        out = model(**kwargs)
        result = {"logits": _np(out.logits), "loss": None, "grads": {}}
        if labels_given:
            out.loss.backward()
            result["loss"] = out.loss.item()
            result["grads"] = {n: _np(p.grad) if p.grad is not None else np.zeros(tuple(p.shape))
                               for n, p in _named_parameters(model).items()}
    if extra:
        result.update(extra(out))
    return result


def _hidden(out_states):
    return [_np(h) for h in out_states] if out_states is not None else None


def gemma2_hf_config(config, num_labels=None):
    from transformers import Gemma2Config
    hf = Gemma2Config(**config.to_hf_dict("gemma2"))
    if num_labels:
        hf.num_labels = num_labels
    return hf


def t5gemma_hf_config(config, num_labels=None, is_encoder_decoder=True):
    from transformers import T5GemmaConfig
    hf = T5GemmaConfig(**config.to_hf_dict())
    if num_labels:
        hf.num_labels = num_labels
    hf.is_encoder_decoder = is_encoder_decoder
    return hf


def gemma3_hf_config(config):
    from transformers import Gemma3TextConfig
    return Gemma3TextConfig(**config.to_hf_dict("gemma3_text"))


def t5gemma2_hf_config(config):
    from transformers import T5Gemma2Config
    return T5Gemma2Config(**config.to_hf_dict())


def gemma2_run(config, params, input_ids, labels=None, attention_mask=None, *, dtype="float64",
               exact=True, output_hidden_states=False) -> dict:
    """Gemma2ForCausalLM (eager) on `params` (HF names, tied lm_head absent).

    Returns {"logits": (B, T, V) float64, "loss": float | None, "grads": {name: array}}.
    transformers shifts the labels inside the loss (position t predicts labels[t + 1]; the
    last position predicts nothing), ignores -100, and takes the mean over the remaining
    tokens. Grads are given only with labels; `model.embed_tokens.weight`'s grad holds both
    the embedding-lookup and the tied LM-head contributions (torch accumulates into the one
    shared Parameter) -- except that nn.Embedding(padding_idx=0) drops the lookup gradient
    of pad (id 0) tokens. With `output_hidden_states`, also "hidden_states" (for a per-layer
    divergence report): L + 1 arrays (B, T, D) -- the scaled embedding, the outputs of layers
    0 .. L-2, and the final *normed* state (transformers 5.x replaces the last layer's raw
    output by the output of the final norm)."""
    from transformers import Gemma2ForCausalLM
    import torch
    model = _build(Gemma2ForCausalLM, gemma2_hf_config(config), params, dtype)
    kwargs = {"input_ids": _t(input_ids, torch.long), "attention_mask": _t(attention_mask, torch.long),
              "labels": _t(labels, torch.long), "output_hidden_states": output_hidden_states,
              "use_cache": False}
    extra = (lambda out: {"hidden_states": _hidden(out.hidden_states)}) if output_hidden_states else None
    return _run(model, kwargs, labels is not None, exact, extra)


def t5gemma_run(config, params, input_ids, labels=None, attention_mask=None, decoder_input_ids=None,
                decoder_attention_mask=None, *, dtype="float64", exact=True) -> dict:
    """T5GemmaForConditionalGeneration (eager). Returns gemma2_run's dict plus "encoder_out",
    the encoder's last hidden state (after its final norm), (B, S, D_enc).

    transformers' behaviour, passed through unchanged:
    - labels without decoder_input_ids: decoder_input_ids = shift_right(labels) (bos 2 in
      front, last label dropped, -100 -> pad 0). The loss is NOT shifted again (ForMaskedLM
      loss: logits[t] against labels[t]), -100 ignored, mean over the rest.
    - attention_mask None: the encoder masks `input_ids == pad` itself, but cross-attention
      then gets NO padding mask (it reads the user's attention_mask). Pass it explicitly.
    - decoder_attention_mask None: decoder self-attention masks keys whose decoder input id
      is pad (so a -100 label masks the *next* decoder position as a key) -- but only
      without a cache. In eval mode transformers creates a cache by default (use_cache=True)
      and then applies NO decoder padding mask; this oracle passes use_cache=False, which
      is also what training (model.train()) does.
    Compare decoder logits at valid_positions(decoder_attention_mask) only."""
    from transformers import T5GemmaForConditionalGeneration
    import torch
    model = _build(T5GemmaForConditionalGeneration, t5gemma_hf_config(config), params, dtype)
    kwargs = {"input_ids": _t(input_ids, torch.long), "attention_mask": _t(attention_mask, torch.long),
              "labels": _t(labels, torch.long), "decoder_input_ids": _t(decoder_input_ids, torch.long),
              "decoder_attention_mask": _t(decoder_attention_mask, torch.long), "use_cache": False}
    return _run(model, kwargs, labels is not None, exact,
                lambda out: {"encoder_out": _np(out.encoder_last_hidden_state)})


def gemma3_run(config, params, input_ids, labels=None, attention_mask=None, *, dtype="float64",
               exact=True) -> dict:
    """Gemma3ForCausalLM (eager) on `params`: gemma2_run's conventions and dict. (Its
    attention ignores `attn_logit_softcapping`; see model/test_models_gemma3.py.)"""
    from transformers import Gemma3ForCausalLM
    import torch
    model = _build(Gemma3ForCausalLM, gemma3_hf_config(config), params, dtype)
    kwargs = {"input_ids": _t(input_ids, torch.long), "attention_mask": _t(attention_mask, torch.long),
              "labels": _t(labels, torch.long), "use_cache": False}
    return _run(model, kwargs, labels is not None, exact)


def t5gemma2_run(config, params, input_ids, labels=None, attention_mask=None, decoder_input_ids=None,
                 decoder_attention_mask=None, *, dtype="float64", exact=True) -> dict:
    """T5Gemma2ForConditionalGeneration (eager): t5gemma_run's dict ("encoder_out" too), with
    params under minencdec's names (one table `model.encoder.embed_tokens.weight` and
    `...eoi_embedding`; the decoder's table and the LM head are tied to it).

    transformers' T5Gemma 2 derives no mask from pad ids: attention_mask None means every
    encoder token is attended to (by the encoder and by the decoder's merged attention), and
    decoder_attention_mask None a plain causal decoder. Labels without decoder_input_ids:
    shift_right(labels), loss not shifted again (ForMaskedLM), as t5gemma_run. use_cache=False,
    as in training (eval mode would otherwise build a cache)."""
    from transformers import T5Gemma2ForConditionalGeneration
    import torch
    model = _build(T5Gemma2ForConditionalGeneration, t5gemma2_hf_config(config), params, dtype)
    kwargs = {"input_ids": _t(input_ids, torch.long), "attention_mask": _t(attention_mask, torch.long),
              "labels": _t(labels, torch.long), "decoder_input_ids": _t(decoder_input_ids, torch.long),
              "decoder_attention_mask": _t(decoder_attention_mask, torch.long), "use_cache": False}
    return _run(model, kwargs, labels is not None, exact,
                lambda out: {"encoder_out": _np(out.encoder_last_hidden_state)})


def _last_non_pad(input_ids, pad):
    """transformers' pooling index: the rightmost position whose id is not pad (0 if none)."""
    ids = np.asarray(input_ids)
    idx = np.arange(ids.shape[-1]) * (ids != pad)
    return idx.argmax(-1)


def _infer_num_labels(params, name):
    if name not in params:
        raise KeyError(f"params need {name!r} for classification")
    return int(np.asarray(params[name]).shape[0])


def gemma2_classify_run(config, params, input_ids, labels, attention_mask=None, num_labels=None, *,
                        dtype="float64", exact=True) -> dict:
    """Gemma2ForSequenceClassification (eager): the decoder-only baseline.

    Head: `score.weight` (num_labels, D), no bias, applied to every position of the final
    (normed) hidden state; the logits returned are pooled at the rightmost token whose id is
    not pad (computed from input_ids, not the attention mask; works for left and right
    padding). Loss: mean cross-entropy over the batch (num_labels > 1, int labels; -100
    ignored); num_labels == 1 would be MSE regression. Returns {"logits": (B, num_labels),
    "loss", "grads", "pooled_index": (B,)}."""
    from transformers import Gemma2ForSequenceClassification
    import torch
    num_labels = num_labels or _infer_num_labels(params, "score.weight")
    model = _build(Gemma2ForSequenceClassification, gemma2_hf_config(config, num_labels), params, dtype)
    kwargs = {"input_ids": _t(input_ids, torch.long), "attention_mask": _t(attention_mask, torch.long),
              "labels": _t(labels, torch.long), "use_cache": False}
    pooled = _last_non_pad(input_ids, config.pad_token_id)
    return _run(model, kwargs, labels is not None, exact, lambda out: {"pooled_index": pooled})


def t5gemma_classify_run(config, params, input_ids, labels, attention_mask=None, num_labels=None, *,
                         is_encoder_decoder=False, dtype="float64", exact=True) -> dict:
    """T5GemmaForSequenceClassification (eager).

    Head: `score.out_proj.weight` (num_labels, width) and `score.out_proj.bias` (num_labels,)
    (T5GemmaClassificationHead: dropout, then a biased linear), applied to every position.
    - is_encoder_decoder=False (the paper's setup): only the encoder exists
      (`model.encoder.*`); logits pooled at the encoder's rightmost non-pad token (from
      input_ids). width = encoder hidden size.
    - is_encoder_decoder=True: the decoder reads shift_right(input_ids) (bos in front), with its
      default self-attention mask (decoder ids != pad), cross-attending to the encoder with
      `attention_mask`; pooled at min(last_non_pad + 1, T - 1) -- the decoder position that
      has just read the last real token, except that for a row without padding the clamp
      picks T - 1, which has read only input_ids[T - 2]. width = decoder hidden size.
    Loss: mean cross-entropy over the batch (as gemma2_classify_run). Returns {"logits":
    (B, num_labels), "loss", "grads", "pooled_index"}."""
    from transformers import T5GemmaForSequenceClassification
    import torch
    num_labels = num_labels or _infer_num_labels(params, "score.out_proj.weight")
    hf = t5gemma_hf_config(config, num_labels, is_encoder_decoder)
    model = _build(T5GemmaForSequenceClassification, hf, params, dtype)
    kwargs = {"input_ids": _t(input_ids, torch.long), "attention_mask": _t(attention_mask, torch.long),
              "labels": _t(labels, torch.long)}
    pooled = _last_non_pad(input_ids, config.encoder.pad_token_id)
    if is_encoder_decoder:
        pooled = np.minimum(pooled + 1, np.asarray(input_ids).shape[-1] - 1)
    return _run(model, kwargs, labels is not None, exact, lambda out: {"pooled_index": pooled})


def run_golden(kind, config, params, inputs, opts) -> dict:
    """The oracle's outputs for one golden-file entry (cases.GOLDEN: kind, options) in float64."""
    x = inputs
    if kind == "gemma2":
        return gemma2_run(config, params, x["input_ids"], x["labels"], x["attention_mask"])
    if kind == "t5gemma":
        # Labels only: transformers builds the decoder inputs by shift_right itself; the
        # decoder mask is passed explicitly (the same as transformers' no-cache default).
        return t5gemma_run(config, params, x["input_ids"], x["labels"], x["attention_mask"],
                           decoder_attention_mask=x["decoder_attention_mask"])
    if kind == "gemma3":
        return gemma3_run(config, params, x["input_ids"], x["labels"], x["attention_mask"])
    if kind == "t5gemma2":
        # Labels only, as for t5gemma; no decoder mask (T5Gemma 2 derives none, and the -100
        # suffix of the labels only puts pad ids where every later query is ignored too).
        return t5gemma2_run(config, params, x["input_ids"], x["labels"], x["attention_mask"])
    if kind == "gemma2_classify":
        return gemma2_classify_run(config, params, x["input_ids"], x["labels"],
                                   x["attention_mask"], opts["num_labels"])
    if kind == "t5gemma_classify":
        return t5gemma_classify_run(config, params, x["input_ids"], x["labels"],
                                    x["attention_mask"], opts["num_labels"],
                                    is_encoder_decoder=opts["is_encoder_decoder"])
    raise ValueError(f"unknown kind {kind!r}")


def param_shapes_from_hf(config, num_labels=None, is_encoder_decoder=True) -> dict[str, tuple]:
    """Names and shapes of a freshly built transformers model (tied LM head excluded):
    Gemma2ForCausalLM / T5GemmaForConditionalGeneration (Gemma3ForCausalLM /
    T5Gemma2ForConditionalGeneration for the Gemma 3 family, under minencdec's names), or with
    `num_labels` the sequence-classification model (T5Gemma: encoder-only unless
    `is_encoder_decoder`)."""
    from minencdec.model.config import T5GemmaConfig
    from transformers import (Gemma2ForCausalLM, Gemma2ForSequenceClassification, Gemma3ForCausalLM,
                              T5Gemma2ForConditionalGeneration, T5GemmaForConditionalGeneration,
                              T5GemmaForSequenceClassification)
    if config.family in ("gemma3", "t5gemma2") and not num_labels:
        cls, hf = ((T5Gemma2ForConditionalGeneration, t5gemma2_hf_config(config)) if config.family == "t5gemma2"
                   else (Gemma3ForCausalLM, gemma3_hf_config(config)))
        model = cls._from_config(hf, attn_implementation="eager")
        return {n: tuple(p.shape) for n, p in _named_parameters(model).items()}
    if isinstance(config, T5GemmaConfig):
        hf = t5gemma_hf_config(config, num_labels, is_encoder_decoder if num_labels else True)
        cls = T5GemmaForSequenceClassification if num_labels else T5GemmaForConditionalGeneration
    else:
        hf = gemma2_hf_config(config, num_labels)
        cls = Gemma2ForSequenceClassification if num_labels else Gemma2ForCausalLM
    model = cls._from_config(hf, attn_implementation="eager")
    return {n: tuple(p.shape) for n, p in model.named_parameters()}


def versions() -> dict[str, str]:
    import torch
    import transformers
    return {"transformers_version": transformers.__version__, "torch_version": torch.__version__}
