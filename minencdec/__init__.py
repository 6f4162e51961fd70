"""minencdec: a readable NumPy reference of Gemma 2 and Encoder-Decoder Gemma (T5Gemma)."""

from .config import PRESETS, GemmaConfig, T5GemmaConfig, num_parameters, preset
from .gemma2 import Gemma2Model
from .pretrained import load_pretrained
from .t5gemma import T5GemmaModel

__all__ = ["PRESETS", "GemmaConfig", "T5GemmaConfig", "num_parameters", "preset", "Gemma2Model",
           "T5GemmaModel", "load_pretrained"]
