"""Kill a save at every instant: run in a subprocess by test_reliability_files.py.

    python crash_driver.py SPEC.json RESULT.json

SPEC is a list of sweeps {"dir": D, "steps": [[version, kill_at], ...], "version": v}. The
steps, run in D/start, make the state to start from; then for kill point j = 1, 2, ... a
copy D/j of that state gets a save of `version` killed at j. Every save runs in its own
forked child, which `os._exit(9)`s right after its kill_at-th filesystem operation (0:
never), so no `finally` or `except` of the code under test runs, exactly as for a killed
process. A sweep ends at the first j whose save completes. RESULT maps D to that j and
lists any save whose exit status was unexpected.

Counted operations: every mkdir, rename, replace, unlink, rmdir, chmod and fsync, every
open for writing (the file then exists, empty) and every write. fsync is counted but not
performed: it guards against a power cut, and a killed process loses nothing the kernel
already holds, so skipping it changes no outcome here and keeps ~1,000 saves fast.

Each version is a small two-shard checkpoint with a training run's two extra files; the
test rebuilds the same arrays and bytes from `version(v)` to know what it must find.
"""

import builtins
import json
import os
import shutil
import sys

import numpy as np

_OPS = ("mkdir", "rename", "replace", "unlink", "rmdir", "chmod", "fsync")


def version(v: int):
    """(tensors, config, extra_files) of version v: every byte depends on v."""
    rng = np.random.default_rng(v)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((6, 4)),
               "model.norm.weight": rng.standard_normal(4).astype(np.float32),
               "model.layers.0.mlp.up_proj.weight": rng.standard_normal((3, 4)),
               "model.layers.0.mlp.down_proj.weight": rng.standard_normal((4, 3)).astype(np.float32)}
    config = {"model_type": "gemma2", "version": v}
    extra = {"optimizer.safetensors": bytes([v]) * (17 + v), "trainer_state.json": json.dumps({"step": v}).encode()}
    return tensors, config, extra


SHARD_BYTES = 200        # two shards: 192 and 160 bytes of tensors


class _Killer:
    def __init__(self, at):
        self.at, self.count = at, 0

    def tick(self):
        self.count += 1
        if self.count == self.at:
            os._exit(9)


class _CountedFile:
    """A file opened for writing whose every write is a counted operation."""

    def __init__(self, f, killer):
        self._f, self._killer = f, killer

    def write(self, data):
        n = self._f.write(data)
        self._killer.tick()
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)


def _install(killer):
    for name in _OPS:
        real = getattr(os, name)

        def hooked(*args, _real=real, _name=name, **kwargs):
            result = None if _name == "fsync" else _real(*args, **kwargs)
            killer.tick()
            return result
        setattr(os, name, hooked)
    real_open = builtins.open

    def hooked_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        if any(c in mode for c in "wax+"):
            killer.tick()
            return _CountedFile(f, killer)
        return f
    builtins.open = hooked_open


def _run(directory, v, kill_at, versions={}) -> int:
    """Exit status of a child that saves version v into directory/ck, killed at kill_at."""
    from minencdec.files.checkpoint import save_tensors
    if v not in versions:                          # made once, before the forks
        versions[v] = version(v)
    pid = os.fork()
    if pid == 0:
        try:
            tensors, config, extra = versions[v]
            _install(_Killer(kill_at))
            save_tensors(os.path.join(directory, "ck"), tensors, config, extra_files=extra,
                         max_shard_bytes=SHARD_BYTES, overwrite=True)
        except BaseException as e:                 # report, never fall back into the driver
            os.write(2, f"save of version {v} failed: {e!r}\n".encode())
            os._exit(3)
        os._exit(0)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def main(spec_file, result_file):
    result = {"last": {}, "unexpected": []}
    for sweep in json.load(open(spec_file)):
        start = os.path.join(sweep["dir"], "start")
        os.makedirs(start)
        for v, kill_at in sweep["steps"]:          # the state every kill point starts from
            status = _run(start, v, kill_at)
            if status != (9 if kill_at else 0):
                result["unexpected"].append([start, v, kill_at, status])
        for j in range(1, 10_000):
            directory = os.path.join(sweep["dir"], str(j))
            shutil.copytree(start, directory, symlinks=True, copy_function=os.link)  # saves never write in place
            status = _run(directory, sweep["version"], j)
            if status != 9:                          # done, or failed (reported) rather than killed
                result["last"][sweep["dir"]] = j
                if status != 0:
                    result["unexpected"].append([directory, sweep["version"], j, status])
                break
    json.dump(result, open(result_file, "w"))


if __name__ == "__main__":
    main(*sys.argv[1:])
