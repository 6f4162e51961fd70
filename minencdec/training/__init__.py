"""Training: corpora and batches, the objectives (causal LM, PrefixLM, UL2), AdamW and
schedules, the resumable loop, and the tasks that turn a batch into a loss. Knows the model
and io; knows nothing of the command line."""
