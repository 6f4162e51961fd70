"""Training tasks: an objective on packed rows, in the interface `train.train` expects.

    batch(step)                  -> the batch of that step: a pure function of (seed, step)
    loss_and_grads(model, batch) -> (loss, grads, tokens)
    eval_batches()               -> fixed validation batches
    eval_loss(model, batch)      -> (summed loss, tokens): cross-entropy on the labels

Tasks:  CausalLMTask       decoder-only pretraining (the teacher, and the baseline)
        Seq2SeqTask        the encoder-decoder: "prefixlm", "prefixlm-kd" or "ul2"
        ClassificationTask fine-tuning a classifier on (token ids, label) examples
        TextToTextTask     fine-tuning the encoder-decoder on (input ids, target ids) pairs

PrefixLM with distillation (paper sec. 3.3): a packed row x of length L is split in the
middle, k = L // 2; the encoder reads x[:k] and the decoder predicts y = x[k:]. The teacher,
the decoder-only model, reads the whole row; its logits at position k - 1 + t predict
x[k + t] = y[t], so teacher[:, k - 1 : L - 1] lines up with the student's T = L - k
predictions token for token.

Axes: B batch, L packed row length, S encoder length, T decoder length, V vocab.
"""

from __future__ import annotations

import numpy as np

from minencdec.model import t5gemma
from .data import batch_at
from minencdec.model.losses import cross_entropy_forward, distillation_backward, distillation_forward
from .objectives import pad_examples, prefix_lm_batch, ul2_batch

OBJECTIVES = ("prefixlm", "prefixlm-kd", "ul2")
EVAL_STEP = 2**40          # validation batches draw their UL2 noise as if at steps 2^40, 2^40 + 1, ...


def _eval_chunks(rows, batch_size, max_batches):
    """Fixed validation batches: the first rows of the held-out split, in order."""
    n = min(len(rows), batch_size * max_batches)
    return [rows[i:i + batch_size] for i in range(0, n, batch_size)]


def _t5_inputs(model, input_ids, labels, attention_mask):
    dec = model.config.decoder
    dec_ids = t5gemma.shift_right(labels, dec.bos_token_id, dec.pad_token_id)
    return input_ids, dec_ids, attention_mask.astype(bool), dec_ids != dec.pad_token_id


class CausalLMTask:
    """Next-token prediction on packed rows (labels = ids; the model shifts them)."""

    def __init__(self, train_rows, val_rows, batch_size, seed=0, eval_batches=4):
        self.train_rows, self.batch_size, self.seed = np.asarray(train_rows), batch_size, seed
        self._eval = _eval_chunks(np.asarray(val_rows), batch_size, eval_batches)

    def batch(self, step):
        return batch_at(self.train_rows, self.batch_size, self.seed, step)   # (B, L)

    def loss_and_grads(self, model, ids):
        loss, grads = model.loss_and_grads(ids, ids)
        return loss, grads, ids.size

    def eval_batches(self):
        return self._eval

    def eval_loss(self, model, ids):
        logits = model.logits(ids)                                      # (B, L, V)
        loss, _ = cross_entropy_forward(logits[:, :-1], ids[:, 1:])
        n = ids.shape[0] * (ids.shape[1] - 1)
        return float(loss) * n, n


class Seq2SeqTask:
    """The encoder-decoder on packed rows with one of OBJECTIVES. `special` holds the ids UL2
    needs (a Tokenizer works); `teacher` (a Gemma2Model) is needed by "prefixlm-kd"."""

    def __init__(self, objective, train_rows, val_rows, batch_size, seed=0, special=None,
                 teacher=None, temperature=1.0, alpha=1.0, eval_batches=4):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if objective == "prefixlm-kd" and teacher is None:
            raise ValueError("prefixlm-kd distils from the decoder-only model: give a teacher")
        if objective == "ul2" and special is None:
            raise ValueError("ul2 needs the tokenizer's sentinel and mode ids")
        self.objective, self.special, self.teacher = objective, special, teacher
        self.temperature, self.alpha = temperature, alpha
        self.train_rows, self.batch_size, self.seed = np.asarray(train_rows), batch_size, seed
        self._eval = [self._make(rows, step=EVAL_STEP + i)         # never a training step
                      for i, rows in enumerate(_eval_chunks(np.asarray(val_rows), batch_size, eval_batches))]

    def _make(self, rows, step):
        """(rows, input_ids, attention_mask, labels) for packed rows (B, L)."""
        if self.objective == "ul2":
            rng = np.random.default_rng([self.seed, step, 7])          # per step: resumable
            return (rows, *ul2_batch(rows, self.special, rng))
        return (rows, *prefix_lm_batch(rows, "middle"))

    def batch(self, step):
        return self._make(batch_at(self.train_rows, self.batch_size, self.seed, step), step)

    def loss_and_grads(self, model, batch):
        rows, input_ids, attention_mask, labels = batch
        tokens = int(attention_mask.sum() + (labels != -100).sum())
        if self.objective != "prefixlm-kd":
            loss, grads = model.loss_and_grads(input_ids, labels, attention_mask)
            return loss, grads, tokens
        k, T = input_ids.shape[1], labels.shape[1]
        teacher = self.teacher.logits(rows)[:, k - 1:k - 1 + T]        # (B, T, V): predicts x[k + t]
        logits, cache = t5gemma.forward(model.params, model.config, *_t5_inputs(model, input_ids, labels,
                                                                                 attention_mask),
                                        backend=model.backend)
        loss, kd_c = distillation_forward(logits, teacher, labels, self.temperature, self.alpha)
        return float(loss), t5gemma.backward(distillation_backward(kd_c), cache), tokens

    def eval_batches(self):
        return self._eval

    def eval_loss(self, model, batch):
        _, input_ids, attention_mask, labels = batch
        logits, _ = t5gemma.forward(model.params, model.config, *_t5_inputs(model, input_ids, labels,
                                                                             attention_mask),
                                    backend=model.backend)
        loss, _ = cross_entropy_forward(logits, labels)
        n = int((labels != -100).sum())
        return float(loss) * n, n


class ClassificationTask:
    """(token ids, label) examples for a `classify.Classifier`; padded on the right."""

    def __init__(self, train, val, batch_size, seed=0, pad_id=0, max_len=None):
        self.train, self.val, self.batch_size, self.seed, self.pad_id = train, val, batch_size, seed, pad_id
        self.max_len = max_len or max(len(x) for x, _ in train + val)

    def _pad(self, examples):
        ids = np.full((len(examples), self.max_len), self.pad_id, dtype=np.int64)
        mask = np.zeros_like(ids)
        for b, (x, _) in enumerate(examples):
            x = x[:self.max_len]
            ids[b, :len(x)], mask[b, :len(x)] = x, 1
        return ids, mask, np.array([y for _, y in examples], dtype=np.int64)

    def batch(self, step):
        order = batch_at(np.arange(len(self.train))[:, None], self.batch_size, self.seed, step)[:, 0]
        return self._pad([self.train[i] for i in order])

    def loss_and_grads(self, model, batch):
        ids, mask, labels = batch
        loss, grads = model.loss_and_grads(ids, labels, mask)
        return loss, grads, int(mask.sum())

    def eval_batches(self):
        return [self._pad(self.val[i:i + self.batch_size]) for i in range(0, len(self.val), self.batch_size)]

    def eval_loss(self, model, batch):
        ids, mask, labels = batch
        loss, _ = cross_entropy_forward(model.logits(ids, mask), labels)
        return float(loss) * len(labels), len(labels)

    def accuracy(self, model):
        right = total = 0
        for ids, mask, labels in self.eval_batches():
            right += int((model.logits(ids, mask).argmax(-1) == labels).sum())
            total += len(labels)
        return right / max(total, 1)


class TextToTextTask(Seq2SeqTask):
    """(input ids, target ids) pairs for the encoder-decoder, padded per batch."""

    def __init__(self, train, val, batch_size, seed=0, pad_id=0, eval_batches=4):
        self.train, self.batch_size, self.seed, self.pad_id = train, batch_size, seed, pad_id
        self.objective, self.teacher = "prefixlm", None
        self.enc_len = max(len(x) for x, _ in train + val)
        self.dec_len = max(len(y) for _, y in train + val)
        self._eval = [self._pad(val[i:i + batch_size]) for i in range(0, min(len(val), batch_size * eval_batches),
                                                                       batch_size)]

    def _pad(self, examples):
        return (None, *pad_examples(examples, self.enc_len, self.dec_len, self.pad_id))

    def batch(self, step):
        order = batch_at(np.arange(len(self.train))[:, None], self.batch_size, self.seed, step)[:, 0]
        return self._pad([self.train[i] for i in order])
