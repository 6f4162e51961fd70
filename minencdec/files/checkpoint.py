"""Reading and writing Hugging Face checkpoints: `config.json` plus safetensors weights.

A checkpoint directory holds `config.json` and either `model.safetensors` or shards
`model-0000k-of-0000N.safetensors` listed in `model.safetensors.index.json` (its
`weight_map` maps each tensor name to its shard, a file name in the same directory). One
safetensors file is read and written by safetensors_file.py.

The loader asserts instead of trusting: every header is parsed and checked
against its file's size, the model's expected names and shapes, before any weight is read.
Then weights are read one tensor at a time, so memory holds the model once plus one tensor,
from files opened once: a save that replaces the directory meanwhile cannot mix two
versions into one model.

The saver builds the new directory beside the target and renames it into place; a crash
at any instant leaves one complete copy, which the readers here find (replace.py). It never
deletes what a user owns: a non-empty directory is replaced only with `overwrite=True`, and
only when it holds nothing but the files a checkpoint writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .replace import leftovers, readable, recover, write_directory
from .safetensors_file import (SAVE_TAGS, STORED, CheckpointError, parse_json, read_header, read_tensor,
                               to_bfloat16_bits, write_file, write_safetensors)

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "INDEX_FILE", "SAVE_TAGS", "CheckpointError", "checkpoint_dir",
           "recover_checkpoint", "read_config", "load_tensors", "stored_dtypes", "check_destination",
           "save_tensors", "to_bfloat16_bits"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")   # transformers' and our shard names


# ----------------------------------------------------------------------------- the directory

def checkpoint_dir(path) -> Path:
    """The directory to read checkpoint `path` from: `path` itself, or, when a save was killed
    between its two renames, the complete copy it left beside `path` (read where it is and
    renamed by nothing: a reader may run during a save; `recover_checkpoint` repairs)."""
    found = readable(path)
    if not found.exists():
        partial = leftovers(Path(os.path.realpath(path)))["tmp"]
        hint = f" (an interrupted save left only the incomplete {partial[0].name})" if partial else ""
        raise CheckpointError(f"checkpoint directory {path} does not exist{hint}")
    if not found.is_dir():
        raise CheckpointError(f"{path} is not a directory (a checkpoint is a directory)")
    return found


def recover_checkpoint(path) -> Path | None:
    """Repair checkpoint directory `path` after an interrupted save (a killed process, a power
    cut): if `path` is missing, rename the complete copy the save left beside it into place;
    then delete every other leftover (`.NAME.tmp-*`, `.NAME.old-*`, ...). Never deletes the
    only complete copy. Returns the directory (a symlink followed) if there is one afterwards,
    else None. Cheap, and a no-op when nothing was interrupted. Run it before reading files of
    `path` yourself; not while a save to `path` runs. (Saves run it first themselves.)"""
    return recover(path)


def read_config(path) -> dict:
    """The parsed `config.json` of the checkpoint directory `path`."""
    return _read_json(checkpoint_dir(path) / CONFIG_FILE)


def _read_json(file: Path, unique_keys=False) -> dict:
    if not file.is_file():
        raise CheckpointError(f"{file}: file is missing")
    value = parse_json(file.read_bytes(), file, unique_keys=unique_keys)
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------- loading

class _Located(NamedTuple):
    file: Path            # the safetensors file holding the tensor
    handle: object        # that file, opened once for the whole load
    entry: dict           # the tensor's header entry
    start: int            # where the file's data section starts


def load_tensors(path, expected: dict[str, tuple[int, ...]], dtype, *, ignore: tuple[str, ...] = (),
                 progress=None) -> dict[str, np.ndarray]:
    """Read every tensor named in `expected` (name -> shape) as `dtype` (float32 or float64).

    Names in `ignore` may be present in the files and are skipped (a tied LM head). Any other
    difference between the files and `expected` is an error, raised before any data is read.
    BF16 and F16 widen exactly; F64 read as float32 is rounded to nearest. The arrays are
    owned, writable and C-contiguous. `progress(done, total, name)` is called per tensor.
    """
    path, dtype = checkpoint_dir(path), np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise CheckpointError(f"load_tensors reads float32 or float64, not {dtype}")
    with contextlib.ExitStack() as files:
        found = _locate_tensors(path, files)
        _check_expected(path, found, expected, ignore)
        # Read each file front to back so the disk streams; return in the order of `expected`.
        order = sorted(expected, key=lambda name: (str(found[name].file), found[name].entry["data_offsets"][0]))
        tensors = {}
        for done, name in enumerate(order, 1):
            tensors[name] = read_tensor(*found[name], dtype)
            if progress is not None:
                progress(done, len(order), name)
    return {name: tensors[name] for name in expected}


def _check_expected(path: Path, found: dict[str, _Located], expected: dict, ignore) -> None:
    """The files hold exactly the expected tensors (plus ignored ones), in their shapes."""
    missing = [name for name in expected if name not in found]
    if missing:
        raise CheckpointError(f"{path}: {len(missing)} tensor(s) missing: {_names(missing)}")
    unknown = [name for name in found if name not in expected and name not in ignore]
    if unknown:
        raise CheckpointError(f"{path}: {len(unknown)} unknown tensor(s): {_names(unknown)}")
    wrong = [f"{name} has shape {tuple(found[name].entry['shape'])} in {found[name].file.name}, "
             f"the model expects {tuple(expected[name])}"
             for name in expected if tuple(found[name].entry["shape"]) != tuple(expected[name])]
    if wrong:
        more = f"; ... and {len(wrong) - 10} more" if len(wrong) > 10 else ""
        raise CheckpointError(f"{path}: {len(wrong)} shape mismatch(es): " + "; ".join(wrong[:10]) + more)
    bad = [f"{name} ({found[name].entry['dtype']})" for name in expected if found[name].entry["dtype"] not in STORED]
    if bad:
        raise CheckpointError(f"{path}: unsupported dtype for {_names(bad)}; supported: {sorted(STORED)}")


def stored_dtypes(path) -> dict[str, str]:
    """Each tensor's safetensors dtype tag ("F64", "F32", "BF16", ...), from the headers alone."""
    with contextlib.ExitStack() as files:
        return {name: loc.entry["dtype"] for name, loc in _locate_tensors(checkpoint_dir(path), files).items()}


def _locate_tensors(path: Path, files: contextlib.ExitStack) -> dict[str, _Located]:
    """Every tensor in the checkpoint, each file opened (into `files`) and its header checked."""
    weight_map = {}
    if (path / WEIGHTS_FILE).is_file():
        names = [WEIGHTS_FILE]
    elif (path / INDEX_FILE).is_file():
        weight_map = _weight_map(path / INDEX_FILE)
        names = sorted(set(weight_map.values()))
        for name in names:
            if not (path / name).is_file():
                raise CheckpointError(f"{path / name}: shard file listed in {INDEX_FILE} is missing")
    else:
        raise CheckpointError(f"{path}: no {WEIGHTS_FILE} and no {INDEX_FILE}")
    found = {}
    for name in names:
        file = path / name
        handle = files.enter_context(open(file, "rb"))
        header, start = read_header(file, handle)
        for tensor, entry in header.items():
            if tensor in found:
                raise CheckpointError(f"tensor {tensor!r} is stored twice: {found[tensor].file} and {file}")
            found[tensor] = _Located(file, handle, entry, start)
    for tensor, shard in weight_map.items():
        if tensor not in found or found[tensor].file.name != shard:
            raise CheckpointError(f"{path / INDEX_FILE}: maps {tensor!r} to {shard}, which does not hold it")
    return found


def _weight_map(index: Path) -> dict[str, str]:
    """The index's tensor name -> shard file name, each shard a plain name in the directory.

    An index is data, downloaded with the weights: it may not send the reader to `../x` or
    `/etc/x`. A shard that is a symlink is followed, as the Hugging Face cache needs (its
    snapshot files link to ../../blobs/): only someone who can write the directory makes one."""
    weight_map = _read_json(index, unique_keys=True).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: needs a 'weight_map' of tensor name -> file")
    for tensor, shard in weight_map.items():
        if shard in ("", ".", "..") or any(c in shard for c in "/\\\0"):
            raise CheckpointError(f"{index}: maps {tensor!r} to {shard!r}, which is not a plain file name "
                                  f"in {index.parent} (an index may only name files beside it)")
    return weight_map


def _names(names: list[str], limit: int = 20) -> str:
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


# ----------------------------------------------------------------------------- saving

def save_tensors(path, tensors: dict[str, np.ndarray], config_dict: dict, *, dtype=None,
                 extra_files: dict[str, bytes] | None = None, max_shard_bytes: int = 5 * 2**30,
                 overwrite: bool = False, extra_tensors: dict[str, dict[str, np.ndarray]] | None = None) -> None:
    """Write a directory that transformers' `from_pretrained` loads, crash-consistently.

    `dtype` None keeps each array's dtype (float16/32/64); "bfloat16", "float16", "float32"
    or "float64" converts every tensor; a dict name -> one of those converts tensor by tensor
    (a name it lacks keeps its dtype). bfloat16 rounds to nearest, ties to even, in one
    rounding from the array's own precision (as torch's `.to(torch.bfloat16)` does for
    float32). Above `max_shard_bytes` the weights are split into shards plus an index.
    `extra_files` (file name -> bytes, e.g. tokenizer.model) are written too, and
    `extra_tensors` (file name -> tensors, e.g. a training run's optimizer state) as
    safetensors files of their own, each tensor in its own dtype, streamed from the arrays
    a chunk at a time: a save never holds a second copy of them in memory.

    `path` may be missing or an empty directory. An existing non-empty one is replaced only
    with `overwrite=True`, and only if every entry in it is a file this save writes again
    (config.json, weights, its index, an extra file's name) or a weights shard it replaces:
    anything else (a subdirectory, the optimizer state of a training run that this save does
    not write, a user's notes) is refused, never deleted. A symlink at `path` is followed
    (its target is replaced, the link kept). Everything is checked before anything is written;
    the old directory is replaced only once the new one is complete (see replace.py).
    """
    extra_files, extra_tensors = dict(extra_files or {}), dict(extra_tensors or {})
    tags = _check_save(tensors, config_dict, dtype, extra_files, max_shard_bytes)
    for file in extra_tensors:
        _check_extra_name(file)
    extra_tags = {file: _tensor_tags(named, {}) for file, named in extra_tensors.items()}   # their own dtypes
    clash = set(extra_files) & set(extra_tensors)
    if clash:
        raise CheckpointError(f"file(s) {_names(sorted(clash))} given both as extra bytes and as extra tensors")
    target = check_destination(path, overwrite=overwrite, extra_names=(*extra_files, *extra_tensors))
    shards, size = [[]], 0                       # greedy: a new shard when the next tensor overflows
    for name in tensors:
        nbytes = tensors[name].size * STORED[tags[name]].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards, size = shards + [[]], 0
        shards[-1].append(name)
        size += nbytes

    def fill(directory: Path) -> None:
        write_file(directory / CONFIG_FILE, _json_bytes(config_dict))
        for name, data in extra_files.items():
            write_file(directory / name, bytes(data))
        for name, named in extra_tensors.items():
            write_safetensors(directory / name, named, list(named), extra_tags[name])
        if len(shards) == 1:
            write_safetensors(directory / WEIGHTS_FILE, tensors, shards[0], tags)
            return
        weight_map = {}
        for k, names in enumerate(shards, 1):
            shard = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            write_safetensors(directory / shard, tensors, names, tags)
            weight_map.update(dict.fromkeys(names, shard))
        total = sum(tensors[n].size * STORED[tags[n]].itemsize for n in tensors)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_file(directory / INDEX_FILE, _json_bytes(index))

    target.parent.mkdir(parents=True, exist_ok=True)
    write_directory(target, fill)


def check_destination(path, *, overwrite: bool = False, extra_names=()) -> Path:
    """The directory a save to `path` would write (a symlink followed); a CheckpointError
    if the save may not, by the rules of `save_tensors` (`extra_names`: the extra files it
    writes). Reads only: callers run it before they read or compute anything large."""
    path = Path(path)
    target = Path(os.path.realpath(path))
    if path.is_symlink() and not target.parent.is_dir():
        raise CheckpointError(f"{path} is a symbolic link to {os.readlink(path)}, whose directory "
                              f"{target.parent} does not exist; refusing to create it")
    current = readable(target)                   # after an interrupted save: the complete copy
    if current.exists() and not current.is_dir():
        raise CheckpointError(f"{path} exists and is not a directory; refusing to replace it")
    entries = sorted(os.listdir(current)) if current.is_dir() else []
    if entries and not overwrite:
        raise CheckpointError(f"{path} already exists and is not empty ({_names(entries, 5)}); pass "
                              "overwrite=True (on the command line: --overwrite) to replace the "
                              "checkpoint in it, or choose another directory")
    ours = {CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, *extra_names}
    foreign = [name for name in entries if not (name in ours or _SHARD.fullmatch(name))
               or (current / name).is_dir() and not (current / name).is_symlink()]
    if foreign:
        raise CheckpointError(f"{path}: refusing to replace this directory: it holds {_names(foreign, 10)}, "
                              "which the new checkpoint would not contain, and replacing the directory "
                              "would delete them. Only a checkpoint's own files (config.json, "
                              "model*.safetensors, the index and the files this save writes) are "
                              "replaced: move the others away first, or choose another directory")
    return target


def _check_save(tensors, config_dict, dtype, extra_files, max_shard_bytes) -> dict[str, str]:
    """Validate a save's content before touching the disk; returns each tensor's dtype tag."""
    if not isinstance(config_dict, dict):
        raise CheckpointError(f"config_dict must be a dict, got {type(config_dict).__name__}")
    try:
        json.dumps(config_dict)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config_dict is not JSON-serialisable: {e}") from None
    if isinstance(dtype, dict):
        strays = [name for name in dtype if name not in tensors]
        if strays:
            raise CheckpointError(f"dtype names tensor(s) that are not saved: {_names(strays)}")
        targets = {name: _save_dtype(dtype.get(name)) for name in tensors}
    else:
        targets = dict.fromkeys(tensors, _save_dtype(dtype))
    if not isinstance(max_shard_bytes, int) or max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be a positive int, got {max_shard_bytes!r}")
    tags = _tensor_tags(tensors, targets)
    for name, data in extra_files.items():
        _check_extra_name(name)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise CheckpointError(f"extra file {name!r}: expected bytes, got {type(data).__name__}")
    return tags


def _tensor_tags(tensors, targets) -> dict[str, str]:
    """Each tensor's safetensors dtype tag: `targets[name]` (a dtype name) or, when that is
    None, the array's own; a bad name or a non-float array is an error."""
    tags = {}
    for name, array in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise CheckpointError(f"tensor names must be non-empty strings, got {name!r}")
        if not isinstance(array, np.ndarray) or array.dtype.name not in SAVE_TAGS:
            kind = array.dtype if isinstance(array, np.ndarray) else type(array).__name__
            raise CheckpointError(f"tensor {name!r}: expected a float16/32/64 numpy array, got {kind}")
        tags[name] = SAVE_TAGS[targets.get(name) or array.dtype.name]
    return tags


def _check_extra_name(name) -> None:
    """An extra file's name: a plain file name that is not one of the checkpoint's own."""
    if (not isinstance(name, str) or Path(name).name != name or name in (CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE)
            or (name.startswith("model") and name.endswith(".safetensors")) or name in (".", "..")):
        raise CheckpointError(f"extra file name {name!r} must be a plain file name, not a weights file "
                              "(model*.safetensors)")


def _save_dtype(dtype) -> str | None:
    """"float32", np.float32 and np.dtype("float32") all name float32; numpy has no bfloat16."""
    name = dtype if dtype is None or isinstance(dtype, str) else getattr(dtype, "__name__", str(dtype))
    if name is not None and name not in SAVE_TAGS:
        raise CheckpointError(f"cannot save as {dtype!r}; choose from {sorted(SAVE_TAGS)}")
    return name


def _json_bytes(value: dict) -> bytes:
    return (json.dumps(value, indent=2, sort_keys=True) + "\n").encode()
