"""Reading and writing Hugging Face checkpoints: `config.json` plus safetensors weights.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards
`model-0000k-of-0000N.safetensors` listed in `model.safetensors.index.json` (its
`weight_map` maps each tensor name to its shard). A safetensors file is simple enough to
read by hand, which is what this module does; nothing is ever unpickled:

    8 bytes   n, the header length (little-endian unsigned 64-bit)
    n bytes   JSON {name: {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [b, e]},
                    ..., "__metadata__": {"format": "pt"}}      (metadata is optional)
    the rest  the raw little-endian tensor bytes; tensor `name` is bytes [b, e) of this part

The loader asserts instead of trusting (STYLE.md 5): every header is parsed and checked
against its file's size, the model's expected names and shapes, before any weight is read.
Then weights are read one tensor at a time, so memory holds the model once plus one tensor.
The saver writes a fresh directory beside the target and renames it into place, so an
interrupted save never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# safetensors dtype tag -> the little-endian numpy dtype its bytes are read as. numpy has no
# bfloat16, so BF16 is read as its raw 16-bit pattern and widened exactly to float32.
_STORED = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
           "BF16": np.dtype("<u2")}
_SAVE_TAGS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
_MAX_HEADER = 100_000_000        # the safetensors library's own limit on the header length
_CHUNK = 1 << 22                 # elements converted and written at a time when saving


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file or tensor."""


# ----------------------------------------------------------------------------- config.json

def read_config(path) -> dict:
    """The parsed `config.json` of the checkpoint directory `path`."""
    return _read_json(_checkpoint_dir(path) / CONFIG_FILE)


def _checkpoint_dir(path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory (a checkpoint is a directory)")
    return path


def _read_json(file: Path) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: file is missing")
    try:
        value = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- loading

def load_tensors(path, expected: dict[str, tuple[int, ...]], dtype, *, ignore: tuple[str, ...] = (),
                 progress=None) -> dict[str, np.ndarray]:
    """Read every tensor named in `expected` (name -> shape) as `dtype` (float32 or float64).

    Names in `ignore` may be present in the files and are skipped (a tied LM head). Any other
    difference between the files and `expected` is an error, raised before any data is read.
    BF16 and F16 widen exactly; F64 read as float32 is rounded to nearest. The arrays are
    owned, writable and C-contiguous. `progress(done, total, name)` is called per tensor.
    """
    path, dtype = _checkpoint_dir(path), np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise CheckpointError(f"load_tensors reads float32 or float64, not {dtype}")
    found = _locate_tensors(path)                # name -> (file, header entry, data start)
    missing = [name for name in expected if name not in found]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing: {_names(missing)}")
    unknown = [name for name in found if name not in expected and name not in ignore]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} unknown tensor(s): {_names(unknown)}")
    wrong = [f"{name} has shape {tuple(found[name][1]['shape'])} in {found[name][0].name}, "
             f"the model expects {tuple(expected[name])}"
             for name in expected if tuple(found[name][1]["shape"]) != tuple(expected[name])]
    if wrong:
        more = f"; ... and {len(wrong) - 10} more" if len(wrong) > 10 else ""
        raise CheckpointError(f"{path}: {len(wrong)} shape mismatch(es): " + "; ".join(wrong[:10]) + more)
    bad = [f"{name} ({found[name][1]['dtype']})" for name in expected
           if found[name][1]["dtype"] not in _STORED]
    if bad:
        raise CheckpointError(f"{path}: unsupported dtype for {_names(bad)}; "
                              f"supported: {sorted(_STORED)}")
    # Read each file front to back so the disk streams; return in the order of `expected`.
    order = sorted(expected, key=lambda name: (str(found[name][0]), found[name][1]["data_offsets"][0]))
    tensors = {}
    for done, name in enumerate(order, 1):
        tensors[name] = _read_tensor(*found[name], dtype)
        if progress is not None:
            progress(done, len(order), name)
    return {name: tensors[name] for name in expected}


def _locate_tensors(path: Path) -> dict[str, tuple[Path, dict, int]]:
    """Every tensor in the checkpoint: name -> (its file, its header entry, start of file's data)."""
    weight_map = {}
    if (path / WEIGHTS_FILE).is_file():
        files = [path / WEIGHTS_FILE]
    elif (path / INDEX_FILE).is_file():
        weight_map = _read_json(path / INDEX_FILE).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{path / INDEX_FILE}: needs a 'weight_map' of tensor name -> file")
        files = [path / shard for shard in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{file}: shard file listed in {INDEX_FILE} is missing")
    else:
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE} and no {INDEX_FILE}")
    found = {}
    for file in files:
        header, data_start = _read_header(file)
        for name, entry in header.items():
            if name in found:
                raise CheckpointError(f"tensor {name!r} is stored twice: {found[name][0]} and {file}")
            found[name] = (file, entry, data_start)
    for name, shard in weight_map.items():
        if name not in found or found[name][0] != path / shard:
            raise CheckpointError(f"{path / INDEX_FILE}: maps {name!r} to {shard}, which does not hold it")
    return found


def _read_header(file: Path) -> tuple[dict, int]:
    """Parse and check one safetensors header: ({name: entry}, offset where the data starts)."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 2 <= n <= min(_MAX_HEADER, size - 8):
            raise CheckpointError(f"{file}: header length {n} does not fit the file ({size} bytes): "
                                  "truncated or not a safetensors file")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for name, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and _is_sizes(entry.get("shape")) and _is_sizes(entry.get("data_offsets"), 2)
                and entry["data_offsets"][0] <= entry["data_offsets"][1]):
            raise CheckpointError(f"{file}: malformed header entry for {name!r}: {entry!r}")
        (begin, end), stored = entry["data_offsets"], _STORED.get(entry["dtype"])
        if end > data_size:
            raise CheckpointError(f"{file}: tensor {name!r} ends at byte {end} of a {data_size}-byte "
                                  "data section: the file is truncated")
        if stored is not None and end - begin != stored.itemsize * math.prod(entry["shape"]):
            raise CheckpointError(f"{file}: tensor {name!r} has {end - begin} bytes, but "
                                  f"{entry['dtype']} {entry['shape']} needs "
                                  f"{stored.itemsize * math.prod(entry['shape'])}")
    return header, 8 + n


def _is_sizes(value, length=None) -> bool:
    """A JSON list of non-negative integers (of the given length)."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _names(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_tensor(file: Path, entry: dict, data_start: int, dtype: np.dtype) -> np.ndarray:
    """Read one tensor into a fresh array, then convert it to `dtype`."""
    raw = np.empty(entry["shape"], dtype=_STORED[entry["dtype"]])
    with open(file, "rb") as f:
        f.seek(data_start + entry["data_offsets"][0])
        if f.readinto(raw) != raw.nbytes:
            raise CheckpointError(f"{file}: short read of {entry} (did the file change?)")
    if entry["dtype"] == "BF16":
        # bfloat16 is the top half of a float32: shifting its bits up 16 places is exact.
        out = np.empty(raw.shape, np.float32)
        bits = out.view(np.uint32)
        bits[...] = raw
        bits <<= 16
        return out if dtype == np.float32 else out.astype(dtype)
    return raw if raw.dtype == dtype else raw.astype(dtype)


# ----------------------------------------------------------------------------- saving

def save_tensors(path, tensors: dict[str, np.ndarray], config_dict: dict, *, dtype=None,
                 extra_files: dict[str, bytes] | None = None, max_shard_bytes: int = 5 * 2**30) -> None:
    """Write a directory that transformers' `from_pretrained` loads, atomically.

    `dtype` None keeps each array's dtype (float16/32/64); "bfloat16", "float16", "float32"
    or "float64" converts every tensor. bfloat16 rounds to nearest, ties to even, in one
    rounding from the array's own precision (as torch's `.to(torch.bfloat16)` does for
    float32). Above `max_shard_bytes` the weights are split into shards plus an index.
    `extra_files` (file name -> bytes, e.g. tokenizer.model) are written too.

    Everything is checked first, then written into a temporary directory beside `path` and
    renamed into place; an existing checkpoint is replaced only once the new one is complete.
    A file, or a non-empty directory without config.json, at `path` is refused, never deleted.
    """
    path = Path(path)
    tags = _check_save(path, tensors, config_dict, dtype, extra_files or {}, max_shard_bytes)
    shards, size = [[]], 0                       # greedy: a new shard when the next tensor overflows
    for name in tensors:
        nbytes = tensors[name].size * _STORED[tags[name]].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _write_file(tmp / CONFIG_FILE, _json_bytes(config_dict))
        for name, data in (extra_files or {}).items():
            _write_file(tmp / name, bytes(data))
        if len(shards) == 1:
            _write_safetensors(tmp / WEIGHTS_FILE, tensors, shards[0], tags)
        else:
            weight_map = {}
            for k, names in enumerate(shards, 1):
                shard = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
                _write_safetensors(tmp / shard, tensors, names, tags)
                weight_map.update(dict.fromkeys(names, shard))
            total = sum(tensors[n].size * _STORED[tags[n]].itemsize for n in tensors)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            _write_file(tmp / INDEX_FILE, _json_bytes(index))
        _fsync_dir(tmp)
        _replace_dir(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_save(path: Path, tensors, config_dict, dtype, extra_files, max_shard_bytes) -> dict[str, str]:
    """Validate a save before touching the disk; returns each tensor's safetensors dtype tag."""
    if path.exists() and not path.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory; refusing to replace it")
    if path.is_dir() and any(path.iterdir()) and not (path / CONFIG_FILE).is_file():
        raise CheckpointError(f"{path} is a non-empty directory without {CONFIG_FILE}, so not a "
                              "checkpoint; refusing to replace it")
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"config_dict must be a dict, got {type(config_dict).__name__}")
    try:
        json.dumps(config_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config_dict is not JSON-serialisable: {e}") from None
    # "float32", np.float32 and np.dtype("float32") all name float32; numpy has no bfloat16.
    target = dtype if dtype is None or isinstance(dtype, str) else getattr(dtype, "__name__", str(dtype))
    if target is not None and target not in _SAVE_TAGS:
        raise CheckpointError(f"cannot save as {dtype!r}; choose from {sorted(_SAVE_TAGS)}")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    tags = {}
    for name, array in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise CheckpointError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(array, np.ndarray) or array.dtype.name not in _SAVE_TAGS:
            kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise CheckpointError(f"tensor {name!r}: expected a float16/32/64 numpy array, got {kind}")
        tags[name] = _SAVE_TAGS[target or array.dtype.name]
    reserved = {CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE}
    for name, data in extra_files.items():
        if (not isinstance(name, str) or Path(name).name != name or name in reserved
                or (name.startswith("model") and name.endswith(".safetensors")) or name in (".", "..")):
            raise CheckpointError(f"extra file name {name!r} must be a plain file name, not a weights file "
                                  "(model*.safetensors)")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CheckpointError(f"extra file {name!r}: expected bytes, got {type(data).__name__}")
    return tags


def _write_safetensors(file: Path, tensors: dict, names: list[str], tags: dict[str, str]) -> None:
    """One safetensors file holding `names`, laid out back to back in that order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0   # transformers wants format "pt"
    for name in names:
        nbytes = tensors[name].size * _STORED[tags[name]].itemsize
        header[name] = {"dtype": tags[name], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)              # pad so the data starts 8-byte aligned
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in names:                       # convert a chunk at a time: no second full copy
            flat = np.ascontiguousarray(tensors[name]).reshape(-1)
            for lo in range(0, flat.size, _CHUNK):
                chunk = flat[lo:lo + _CHUNK]
                if tags[name] == "BF16":
                    f.write(to_bfloat16_bits(chunk).tobytes())
                else:
                    f.write(chunk.astype(_STORED[tags[name]], copy=False).tobytes())
        f.flush()
        os.fsync(f.fileno())


def to_bfloat16_bits(x: np.ndarray) -> np.ndarray:
    """Round to the nearest bfloat16 (ties to even) and return its 16-bit patterns as uint16.

    bfloat16 keeps float32's 8 exponent bits and 8 significant bits. We round once, in
    float64 (exact for float32 input, and no double rounding through float32 for float64
    input): scale so the last kept bit has weight 1, np.rint (which rounds ties to even),
    scale back. Past the largest bfloat16 the result is inf; NaN stays NaN.
    """
    x = np.asarray(x, dtype=np.float64)
    _, exp = np.frexp(x)                         # x = m * 2**exp with 0.5 <= |m| < 1
    exp = np.maximum(exp, -125)                  # below 2**-126 bfloat16 is subnormal: fixed spacing
    ulp = np.ldexp(1.0, exp - 8)                 # the spacing of bfloat16 numbers near x
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = (np.rint(x / ulp) * ulp).astype(np.float32)   # exact: it is a bfloat16 value
    return (rounded.view(np.uint32) >> 16).astype(np.uint16)


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()


def _write_file(file: Path, data: bytes) -> None:
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(directory: Path) -> None:
    """Make renames and new entries in `directory` durable (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _replace_dir(tmp: Path, path: Path) -> None:
    """Rename the finished `tmp` to `path`; an old `path` is kept until the rename succeeded."""
    if not path.exists():
        os.rename(tmp, path)
    else:
        backup = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
        os.rename(path, backup)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(backup, path)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    _fsync_dir(path.parent)
