"""Verification of other implementations: activation dumps (dumps.py), the per-layer
comparison report (compare.py) and transformers made a true float64 oracle (hf_oracle.py).
Knows the model and io; knows nothing of training or the command line."""

from .compare import (ATOL, RTOL_F32, RTOL_F64, Row, compare, compare_dumps, format_report, model_order,
                      valid_positions)
from .dumps import INPUT_NAMES, DumpError, dump_minencdec, dump_transformers, model_inputs, read_dump, write_dump

__all__ = ["ATOL", "RTOL_F32", "RTOL_F64", "Row", "compare", "compare_dumps", "format_report", "model_order",
           "INPUT_NAMES", "DumpError", "dump_minencdec", "dump_transformers", "model_inputs", "read_dump",
           "valid_positions", "write_dump"]
