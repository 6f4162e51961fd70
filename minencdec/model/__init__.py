"""The model: the math of Gemma 2 and T5Gemma, forward and hand-written backward.

config (dataclasses, presets), layers and attention (forward/backward pairs), the stack,
the two model families (gemma2: decoder-only; t5gemma: encoder-decoder), losses, the
adaptation of weights, the classification head, the decoding loop (KV caches, sampling),
FLOP accounting and the backend switch (the only door to the Numba fast path). Nothing here
reads files or knows of training or the command line; `save_pretrained` writes through
minencdec.files.
"""
