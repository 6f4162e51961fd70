"""One safetensors file, read and written by hand; nothing is ever unpickled:

    8 bytes   n, the header length (little-endian unsigned 64-bit)
    n bytes   JSON {name: {"dtype": "BF16", "shape": [rows, cols], "data_offsets": [b, e]},
                    ..., "__metadata__": {"format": "pt"}}      (metadata is optional)
    the rest  the raw little-endian tensor bytes; tensor `name` is bytes [b, e) of this part

A header is checked before any tensor is read, as strictly as the safetensors library
checks it (the library is the test oracle): each entry well formed and the size its dtype
and shape need, no key twice, and the tensors tile the data section exactly. numpy has no
bfloat16: BF16 is read as its 16-bit pattern and widened exactly, and written by rounding
once to nearest, ties to even (`to_bfloat16_bits`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

# safetensors dtype tag -> the little-endian numpy dtype its bytes are read as.
STORED = {"F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}
SAVE_TAGS = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}
_MAX_HEADER = 100_000_000        # the safetensors library's own limit on the header length
_CHUNK = 1 << 22                 # elements converted and written at a time when saving


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file or tensor."""


def parse_json(raw: bytes, file: Path, what: str = "", unique_keys: bool = False):
    """json.loads with every failure a CheckpointError naming `file` (and `what` in it, e.g.
    "header"). `unique_keys`: a key given twice (json.loads would keep the last) is an error."""
    where = f"{file}: {what} " if what else f"{file}: "
    def no_duplicates(pairs):
        seen = set()
        for key, _ in pairs:
            if key in seen:
                raise CheckpointError(f"{where}lists {key!r} twice")
            seen.add(key)
        return dict(pairs)
    try:
        return json.loads(raw, object_pairs_hook=no_duplicates if unique_keys else None)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}{'is not valid' if what else 'invalid'} JSON ({e})") from None
    except RecursionError:                        # e.g. [[[[...]]]] 100,000 deep
        raise CheckpointError(f"{where}{'is ' if what else ''}JSON nested too deeply to read "
                              "(more levels than Python's recursion limit)") from None


# ----------------------------------------------------------------------------- reading

def read_header(file: Path, f) -> tuple[dict, int]:
    """Parse and check the header of `file`, open as `f`: ({name: entry}, where the data starts)."""
    size = os.fstat(f.fileno()).st_size
    prefix = f.read(8)
    n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
    if not 2 <= n <= min(_MAX_HEADER, size - 8):
        raise CheckpointError(f"{file}: header length {n} does not fit the file ({size} bytes): "
                              "truncated or not a safetensors file")
    header = parse_json(f.read(n), file, "header", unique_keys=True)
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{file}: __metadata__ must map names to strings, got {metadata!r:.200}")
    data_size = size - 8 - n
    for name, entry in header.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("dtype"), str)
                and _is_sizes(entry.get("shape")) and _is_sizes(entry.get("data_offsets"), 2)
                and entry["data_offsets"][0] <= entry["data_offsets"][1]):
            raise CheckpointError(f"{file}: malformed header entry for {name!r}: {entry!r:.200}")
        (begin, end), stored = entry["data_offsets"], STORED.get(entry["dtype"])
        if end > data_size:
            raise CheckpointError(f"{file}: tensor {name!r} ends at byte {end} of a {data_size}-byte "
                                  "data section: the file is truncated")
        if stored is not None and end - begin != stored.itemsize * math.prod(entry["shape"]):
            raise CheckpointError(f"{file}: tensor {name!r} has {end - begin} bytes, but "
                                  f"{entry['dtype']} {entry['shape']} needs "
                                  f"{stored.itemsize * math.prod(entry['shape'])}")
    _check_tiling(file, header, data_size)
    return header, 8 + n


def _check_tiling(file: Path, header: dict, data_size: int) -> None:
    """Sorted by offset, each tensor starts where the one before ends and the last ends at the
    end of the file (the library's rule). Two tensors sharing bytes would be one tensor under
    two names to any reader that maps the file; bytes no tensor owns mean the file is not
    what its header says."""
    end, before = 0, None
    for name, entry in sorted(header.items(), key=lambda item: (*item[1]["data_offsets"], item[0])):
        begin, stop = entry["data_offsets"]
        if begin < end:
            raise CheckpointError(f"{file}: tensors {before!r} and {name!r} overlap: bytes "
                                  f"[{begin}, {min(end, stop)}) of the data section belong to both")
        if begin > end:
            where = f"between tensors {before!r} and {name!r}" if before else f"before tensor {name!r}"
            raise CheckpointError(f"{file}: bytes [{end}, {begin}) of the data section belong to no "
                                  f"tensor (a gap {where})")
        end, before = stop, name
    if end != data_size:
        after = f" after the last tensor {before!r}" if before else " (the header lists no tensor)"
        raise CheckpointError(f"{file}: {data_size - end} trailing byte(s){after} belong to no tensor")


def _is_sizes(value, length=None) -> bool:
    """A JSON list of non-negative integers (of the given length)."""
    return (isinstance(value, list) and (length is None or len(value) == length)
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def read_tensor(file: Path, f, entry: dict, start: int, dtype: np.dtype) -> np.ndarray:
    """Read one tensor of `file` (open as `f`, data from byte `start`) into a fresh array,
    then convert it to `dtype`."""
    raw = np.empty(entry["shape"], dtype=STORED[entry["dtype"]])
    f.seek(start + entry["data_offsets"][0])
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


# ----------------------------------------------------------------------------- writing

def write_safetensors(file: Path, tensors: dict, names: list[str], tags: dict[str, str]) -> None:
    """One safetensors file holding `names`, laid out back to back in that order."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0   # transformers wants format "pt"
    for name in names:
        nbytes = tensors[name].size * STORED[tags[name]].itemsize
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
                    f.write(chunk.astype(STORED[tags[name]], copy=False).tobytes())
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


def write_file(file: Path, data: bytes) -> None:
    """`data` as `file`, flushed to the disk (mode 0666 minus the umask, as open gives)."""
    with open(file, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
