"""minencdec: a readable NumPy reference of Gemma 2 and Encoder-Decoder Gemma (T5Gemma)."""

import os as _os

# OpenBLAS's idle worker threads busy-wait about 0.1 s after every call, and a fast-path
# kernel started in that window shares its cores with them (measured on a 2-core machine:
# the Small training step took 9.4-9.7 s, and 7.7-8.0 s with this set). OpenBLAS reads it
# when NumPy is first imported, so it only helps when minencdec is imported before NumPy
# (the commands always are); a value already in the environment is kept.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .io.pretrained import load_pretrained
from .model.config import GemmaConfig, T5GemmaConfig
from .model.presets import PRESETS, num_parameters, preset
from .model.gemma2 import Gemma2Model
from .model.t5gemma import T5GemmaModel

__all__ = ["PRESETS", "GemmaConfig", "T5GemmaConfig", "num_parameters", "preset", "Gemma2Model",
           "T5GemmaModel", "load_pretrained"]
