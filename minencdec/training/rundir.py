"""The run directory: one run at a time, resumed only into the same run, metrics without repeats.

    with locked("runs/x"):                        # a second process on runs/x fails at once
        check_start("runs/x", resume=False)       # no checkpoint to clobber, no stale metrics
        ...
        refuse_other_settings("runs/x", state, cfg_dict, settings)   # on --resume
        trim_metrics("runs/x/metrics.jsonl", state["step"])          # drop lines past the checkpoint

**The lock.** `RUN/.lock` is locked with `flock` for as long as the run writes its directory;
the lock holder writes its pid into it. The kernel drops the lock when the process ends, however
it ends (kill -9 included), so a stale lock file never blocks a later run; the file itself stays.
Taking the lock again in the same thread is allowed (a command holds it, and `train()` takes it
too), so nested calls need no flag.

**Settings.** A resume must continue the same run: the optimizer's settings (TrainConfig) and
the run's own (batch size, seed, sequence length, objective, a sha256 of the text and of the
tokenizer, ...: whatever the caller passes as `settings`) are stored in trainer_state.json,
and any difference refuses the resume, naming each setting with its old and new value.
Settings that change only rounding (the backend, the number of threads) are not compared.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from minencdec.files.checkpoint import CheckpointError, recover_checkpoint

try:
    import fcntl
except ImportError:                  # not POSIX (Windows): runs are not locked there
    fcntl = None

LOCK_FILE = ".lock"
CHECKPOINT_DIR, METRICS_FILE, STATE_FILE = "checkpoint", "metrics.jsonl", "trainer_state.json"
STATE_FORMAT = "minencdec.trainer/1"
# TrainConfig fields that change when and what is logged or saved, never the numbers.
NOT_COMPARED = ("eval_every", "save_every", "log_every")

_held: dict[str, tuple[int, int, int]] = {}       # realpath -> (fd, owner thread, depth)
_held_guard = threading.Lock()


class RunDirError(ValueError):
    """A run directory that cannot be used as asked; the message names it."""


# ---------------------------------------------------------------------------- the lock

@contextlib.contextmanager
def locked(run_dir):
    """Hold the run directory's lock for the with-block (creating the directory)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    key = os.path.realpath(run_dir)
    with _held_guard:
        fd, owner, depth = _held.get(key, (-1, -1, 0))
        if depth and owner != threading.get_ident():
            raise RunDirError(f"{run_dir} is in use by another training run in this process "
                              f"(pid {os.getpid()}); choose another run directory")
        if not depth:
            fd = _acquire(run_dir)
        _held[key] = (fd, threading.get_ident(), depth + 1)
    try:
        yield run_dir
    finally:
        with _held_guard:
            fd, owner, depth = _held.pop(key)
            if depth > 1:
                _held[key] = (fd, owner, depth - 1)
            elif fd >= 0:
                os.close(fd)                          # closing releases the flock


def _acquire(run_dir: Path) -> int:
    if fcntl is None:
        return -1
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:                                   # held by another process
        other = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
        os.close(fd)
        raise RunDirError(f"{run_dir} is in use by another minencdec run (pid {other}): wait for it "
                          "to finish, or choose another run directory") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


# ---------------------------------------------------------------------------- starting

def check_start(run_dir, resume) -> None:
    """Refuse a start that would clobber a run, or a resume with nothing to resume; call it
    before anything is written into the run directory."""
    run_dir = Path(run_dir)
    # A save killed between its two renames leaves the checkpoint beside its place: put it
    # back first, or this run would look empty (files/replace.py).
    recover_checkpoint(run_dir / CHECKPOINT_DIR)
    state = run_dir / CHECKPOINT_DIR / STATE_FILE
    if resume:
        if not state.is_file():
            raise CheckpointError(f"cannot resume: {state} is missing (no checkpoint was saved in {run_dir})")
        return
    if (run_dir / CHECKPOINT_DIR).exists():
        raise CheckpointError(f"{run_dir} already holds a checkpoint: pass resume (--resume) to continue "
                              "it, or choose another run directory")
    metrics = run_dir / METRICS_FILE
    if metrics.is_file() and metrics.stat().st_size > 0:
        raise RunDirError(f"{metrics} holds the metrics of an earlier run that saved no checkpoint: "
                          "delete it to start again here, or choose another run directory")


# ---------------------------------------------------------------------------- trainer_state.json

def read_state(run_dir) -> dict:
    """The checkpoint's trainer_state.json, checked field by field (errors name the file)."""
    file = Path(run_dir) / CHECKPOINT_DIR / STATE_FILE
    if not file.is_file():
        raise CheckpointError(f"cannot resume: {file} is missing (no checkpoint was saved in {run_dir})")
    try:
        state = json.loads(file.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: damaged, not valid JSON ({e})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file}: damaged, expected a JSON object")
    if state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{file}: unknown format {state.get('format')!r}, expected {STATE_FORMAT!r}")
    step, history = state.get("step"), state.get("history")
    problems = [
        (not isinstance(step, int) or isinstance(step, bool) or step < 0, "'step' is not a step number"),
        (not isinstance(state.get("train_config"), dict), "'train_config' is not an object"),
        (not isinstance(state.get("optimizer"), dict), "'optimizer' is not an object"),
        (not isinstance(state.get("settings", {}), dict), "'settings' is not an object"),
        (not (isinstance(history, dict) and all(isinstance(history.get(k), list) for k in ("train", "val"))),
         "'history' needs 'train' and 'val' lists")]
    for bad, what in problems:
        if bad:
            raise CheckpointError(f"{file}: damaged, {what}")
    return state


def refuse_other_settings(run_dir, state: dict, train_config: dict, settings: dict) -> None:
    """Raise unless this run's TrainConfig (as a dict) and `settings` equal the saved ones."""
    plain = json.loads(json.dumps({**train_config, **settings}))     # tuples -> lists, as saved
    saved_settings = state.get("settings")
    if saved_settings is None and settings:
        print(f"warning: {run_dir} was saved by an older minencdec that did not record its run settings; "
              f"only the optimizer settings can be checked ({', '.join(sorted(settings))} cannot)",
              file=sys.stderr)
        saved_settings = {k: plain[k] for k in settings}
    saved = {**state["train_config"], **(saved_settings or {})}
    diffs = [f"{k} {_show(saved.get(k, '(not set)'))} -> {_show(plain.get(k, '(not set)'))}"
             for k in sorted(set(plain) | set(saved)) if k not in NOT_COMPARED and saved.get(k) != plain.get(k)]
    if diffs:
        raise CheckpointError(f"cannot resume {run_dir}: settings differ from the saved run: {'; '.join(diffs)}. "
                              "Resuming would not continue the same run: resume with the saved settings, "
                              "or start a new run in another directory")


def _show(value) -> str:
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."                     # a sha256: its start tells two apart
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------------------- metrics.jsonl

def trim_metrics(path, last_step: int) -> int:
    """Keep the lines of metrics.jsonl logged at steps <= last_step (the checkpoint's step);
    the run logs the later ones again after a resume. The file is rewritten atomically (a
    temporary file, then a rename). Returns how many lines were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    kept = [line for line in lines if _step_of(line) is not None and _step_of(line) <= last_step]
    if len(kept) == len(lines):
        return 0
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return len(lines) - len(kept)


def _step_of(line):
    """The step of one metrics line, None for a line that is not one (a torn last write)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


# ---------------------------------------------------------------------------- fingerprints

def digest_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_texts(texts) -> str:
    """sha256 of a corpus: each document's length and UTF-8 bytes, in order."""
    h = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def digest_params(params: dict) -> str:
    """sha256 of a model's weights: every tensor's name, dtype, shape and bytes, by name."""
    h = hashlib.sha256()
    for name in sorted(params):
        array = np.ascontiguousarray(params[name])
        h.update(f"{name} {array.dtype.str} {array.shape}\n".encode())
        h.update(memoryview(array.reshape(-1)).cast("B"))
    return h.hexdigest()
