"""The paper's comparisons at laptop scale: real tasks from the package registry
(datasets.py), scores with bootstrap intervals (metrics.py), scoring both kinds of model the
same way (evaluate.py), the real-weights demo's steps (pipeline.py) and its report
(report.py). Knows the model, io and training; the command line runs it."""
