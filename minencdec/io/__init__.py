"""Checkpoints in and out, and what else crosses the boundary of a run: `load_pretrained`
(a Hugging Face directory -> the right model), `adapt_checkpoints`, the tokenizer and the
progress bar. Knows the model; knows nothing of training or the command line."""
