"""Verification of other implementations: activation dumps (dumps.py), the per-layer
comparison report with its size classes (compare.py), attention internals (internals.py) and
transformers made a true float64 oracle (hf_oracle.py).
Knows the model and io; knows nothing of training or the command line."""

from .compare import (ATOL, F32_LEVEL, RTOL_F32, RTOL_F64, SIZE_CLASSES, Row, compare, compare_dumps, format_report,
                      model_order, size_class, valid_positions)
from .internals import INTERNALS, attention_internals, attention_sublayers
from .dumps import INPUT_NAMES, DumpError, dump_minencdec, dump_transformers, model_inputs, read_dump, write_dump

__all__ = ["ATOL", "F32_LEVEL", "RTOL_F32", "RTOL_F64", "SIZE_CLASSES", "Row", "compare", "compare_dumps",
           "format_report", "model_order", "size_class", "INTERNALS", "attention_internals", "attention_sublayers",
           "INPUT_NAMES", "DumpError", "dump_minencdec", "dump_transformers", "model_inputs", "read_dump",
           "valid_positions", "write_dump"]
