"""Scoring a decoder-only model and an encoder-decoder on the same examples, the same way.

    nll = reference_nll(model, tok, pairs)             # nats/token of each reference, (N,)
    text = continuations(model, tok, pairs, 24)        # greedy, the first line with text
    pred = predictions(classifier, tok, reviews)       # class ids, (N,)
    wrong = other_passages(pairs)                      # each reference after another passage
    share = encoder_attention_share(t5, tok, pairs)    # how much the decoder looks at its input

Both kinds of model see the same token ids: the prompt is bos + the passage and a line
break; a decoder-only model reads it and then the reference, an encoder-decoder reads it
with its encoder and the reference with its decoder (which starts from bos, as in
training). Scores are per example, so metrics.bootstrap can resample them.
"""

from __future__ import annotations

import time

import numpy as np

from minencdec.model.losses import IGNORE_INDEX
from minencdec.model.t5gemma import T5GemmaModel


def prompt_ids(tok, passage: str) -> list[int]:
    return tok.encode(passage + "\n", add_bos=True)


def _pad(rows, pad_id, left=False):
    """(B, L) ids and 0/1 mask of ragged rows, padded on the right (or the left)."""
    L = max(map(len, rows))
    ids = np.full((len(rows), L), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), L), dtype=np.int64)
    for i, r in enumerate(rows):
        span = slice(L - len(r), L) if left else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


def _log_softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def reference_nll(model, tok, pairs, batch_size=8) -> np.ndarray:
    """Mean negative log-likelihood (nats per token) of each pair's "target" given its
    "input", one number per pair."""
    out = []
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b:b + batch_size]
        prompts = [prompt_ids(tok, p["input"]) for p in chunk]
        targets = [tok.encode(p["target"]) or [tok.eos_id] for p in chunk]
        if isinstance(model, T5GemmaModel):
            ids, mask = _pad(prompts, tok.pad_id)
            labels, lmask = _pad(targets, tok.pad_id)
            labels = np.where(lmask == 1, labels, IGNORE_INDEX)
            dec = np.concatenate([np.full((len(chunk), 1), tok.bos_id), np.where(lmask[:, :-1] == 1,
                                                                                 labels[:, :-1], tok.pad_id)], 1)
            logp = _log_softmax(model.logits(ids, dec, mask, np.ones_like(dec)).astype(np.float64))
            picked = np.take_along_axis(logp, np.maximum(labels, 0)[..., None], -1)[..., 0]
            out += [-picked[i, lmask[i] == 1].mean() for i in range(len(chunk))]
        else:
            ids, mask = _pad([p + t for p, t in zip(prompts, targets)], tok.pad_id)
            logp = _log_softmax(model.logits(ids, mask).astype(np.float64))
            for i, (p, t) in enumerate(zip(prompts, targets)):
                rows = np.arange(len(p) - 1, len(p) - 1 + len(t))          # position j predicts token j + 1
                out.append(-logp[i, rows, t].mean())
    return np.array(out)


def continuations(model, tok, pairs, max_new_tokens=24, batch_size=8) -> list[str]:
    """Greedy text after each prompt, up to max_new_tokens: its first line with text. (A
    model often answers a line break first, where a speech ends in the plays; cutting at the
    first break would score an empty line and tell nothing.)"""
    texts = []
    for b in range(0, len(pairs), batch_size):
        chunk = pairs[b:b + batch_size]
        prompts = [prompt_ids(tok, p["input"]) for p in chunk]
        ids, mask = _pad(prompts, tok.pad_id, left=not isinstance(model, T5GemmaModel))
        out = model.generate(ids, max_new_tokens=max_new_tokens, attention_mask=mask)
        new = out[:, 1:] if isinstance(model, T5GemmaModel) else out[:, ids.shape[1]:]   # after bos / the prompt
        for row in new:
            keep = [int(t) for t in row if t not in (tok.pad_id, tok.eos_id)]
            texts.append(next((line.strip() for line in tok.decode(keep).split("\n") if line.strip()), ""))
    return texts


def other_passages(pairs) -> list[dict]:
    """Each pair's target after the passage of the pair half the list away (another part of
    the plays). A model that reads its input predicts a reference worse after the wrong
    passage; one that ignores it scores both the same."""
    n = len(pairs)
    if n < 2:
        raise ValueError("other_passages needs at least two pairs to swap their passages")
    return [{"input": pairs[(i + n // 2) % n]["input"], "target": p["target"]} for i, p in enumerate(pairs)]


def encoder_attention_share(model, tok, pairs) -> float:
    """The share of a T5Gemma 2 decoder's attention that lands on the encoder's keys: its
    merged attention spreads one softmax over [its own tokens, the encoder's tokens], so the
    share says how much the decoder looks at its input. Averaged over layers, heads, the
    reference's tokens and the pairs; each pair runs alone (no padding), the probabilities
    recomputed from a dump (verify/internals.py)."""
    from minencdec.verify.dumps import dump_minencdec
    from minencdec.verify.internals import attention_sublayers

    if not (isinstance(model, T5GemmaModel) and model.config.merged_attention):
        raise ValueError("encoder_attention_share is for T5Gemma 2's merged attention (a T5Gemma's "
                         "cross-attention has a softmax of its own)")
    sublayers = [s for s in attention_sublayers(model) if s.startswith("decoder.")]
    shares = []
    for p in pairs:
        ids = np.array([prompt_ids(tok, p["input"])])
        dec = np.array([[tok.bos_id] + (tok.encode(p["target"]) or [tok.eos_id])])
        dump = dump_minencdec(model, ids, decoder_input_ids=dec, internals=sublayers)
        T = dec.shape[1]                                     # the decoder's own keys come first
        shares += [dump[f"{s}.probs"][..., T:].sum(-1).mean() for s in sublayers]
    return float(np.mean(shares))


def classifier_inputs(tok, texts, max_len):
    """bos + the text's first max_len - 1 tokens, right-padded: (ids, mask)."""
    return _pad([tok.encode(t, add_bos=True)[:max_len] for t in texts], tok.pad_id)


def predictions(classifier, tok, examples, max_len=128, batch_size=16) -> np.ndarray:
    preds = []
    for b in range(0, len(examples), batch_size):
        ids, mask = classifier_inputs(tok, [e["text"] for e in examples[b:b + batch_size]], max_len)
        preds.append(np.argmax(classifier.logits(ids, mask), axis=-1))
    return np.concatenate(preds)


def seconds_per_example(fn, examples, repeats=2) -> float:
    """The best of `repeats` timings of fn(examples), divided by their number."""
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        fn(examples)
        best = min(best, time.perf_counter() - t)
    return best / max(len(examples), 1)
