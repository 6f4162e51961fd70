"""Saving never loses a checkpoint and never deletes what a user owns.

- A save killed right after ANY one of its filesystem operations (crash_driver.py kills a
  forked child at each in turn) leaves a checkpoint that readers see whole, old or new,
  and `recover_checkpoint` puts it in place; a save killed while it repairs the leftovers
  of a killed save does too. Oracle: each version's own arrays and bytes.
- Permissions follow the umask; a symlink at the target is followed; an existing
  directory is replaced only with overwrite=True and only if nothing in it would be lost.

Negative controls: the checker rejects the states a naive save would leave (no checkpoint,
a half-written one, two versions mixed); mkdtemp's 0700 fails the permission check.
"""

import json
import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

import crash_driver
from minencdec.files.checkpoint import (CheckpointError, checkpoint_dir, load_tensors, read_config,
                                        recover_checkpoint, save_tensors)

HERE = Path(__file__).resolve().parent
FILES = {"config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
         "model-00002-of-00002.safetensors", "optimizer.safetensors", "trainer_state.json"}


def save(path, v, **kwargs):
    tensors, config, extra = crash_driver.version(v)
    save_tensors(path, tensors, config, extra_files=extra, max_shard_bytes=crash_driver.SHARD_BYTES, **kwargs)


def assert_whole(ck: Path, allowed) -> int:
    """What readers see at `ck` is one version of `allowed`, entirely: its config, every
    tensor, both extra files and no other file. Returns the version."""
    config = read_config(ck)
    v = config.get("version")
    assert v in allowed, f"{ck}: version {v}, expected one of {sorted(allowed)}"
    tensors, want_config, extra = crash_driver.version(v)
    assert config == want_config
    got = load_tensors(ck, {name: a.shape for name, a in tensors.items()}, np.float64)
    for name, array in tensors.items():
        assert np.array_equal(got[name], array.astype(np.float64)), (ck, name)
    directory = checkpoint_dir(ck)
    assert set(os.listdir(directory)) == FILES, (ck, sorted(os.listdir(directory)))
    for name, data in extra.items():
        assert (directory / name).read_bytes() == data, (ck, name)
    return v


def state(directory: Path) -> tuple:
    """What an interrupted save left: (is ck there, the kinds of .ck.KIND-xxxxxxxx beside it)."""
    kinds = sorted({m.group(1) for name in os.listdir(directory) if (m := re.fullmatch(r"\.ck\.(\w+)-\w{8}", name))})
    return (directory / "ck").is_dir(), tuple(kinds)


def run_driver(tmp_path, sweeps):
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(json.dumps(sweeps))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), str(HERE)]),
           "OPENBLAS_NUM_THREADS": "1"}
    subprocess.run([sys.executable, str(HERE / "crash_driver.py"), str(spec), str(result)], env=env,
                   check=True, timeout=300)
    out = json.loads(result.read_text())
    assert out["unexpected"] == []
    return out["last"]


def check_crashes(root: Path, last: int, before: int | set, after: int) -> dict:
    """Every j < last was killed, j = last completed. First, readers see each state whole;
    then recover_checkpoint leaves exactly that version at ck and nothing else beside it.
    Returns j -> the version seen."""
    seen = {}
    for j in range(1, last + 1):
        allowed = {after} if j == last else ({before} if isinstance(before, int) else before) | {after}
        seen[j] = assert_whole(root / str(j) / "ck", allowed)
    for j in range(1, last + 1):
        directory = root / str(j)
        shape = state(directory)
        assert recover_checkpoint(directory / "ck") == directory / "ck"
        assert assert_whole(directory / "ck", {seen[j]}) == seen[j], (j, shape)
        assert os.listdir(directory) == ["ck"], (j, shape, os.listdir(directory))
    return seen


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the driver kills forked children")
def test_a_save_killed_at_every_step_leaves_a_whole_checkpoint(tmp_path):
    # Kill the save of version 2 over version 1 after each of its operations in turn.
    last = run_driver(tmp_path, [{"dir": str(tmp_path / "once"), "steps": [[1, 0]], "version": 2}])
    last = last[str(tmp_path / "once")]
    states = {j: state(tmp_path / "once" / str(j)) for j in range(1, last)}
    versions = check_crashes(tmp_path / "once", last, 1, 2)
    order = [versions[j] for j in sorted(versions)]
    assert order == sorted(order), order                     # once the new one shows, it stays
    assert len(set(states.values())) >= 5, states            # tmp, new, new+old (the gap), old, del
    assert (False, ("new", "old")) in states.values()        # the gap between the two renames
    # Kill the next save (version 3), which first repairs those leftovers, at every step too:
    # from one representative of each kind of leftover state.
    firsts = {}
    for j, shape in sorted(states.items()):
        if shape[1]:                                          # something left to repair
            firsts.setdefault(shape, j)
    sweeps = [{"dir": str(tmp_path / f"twice{j}"), "steps": [[1, 0], [2, j]], "version": 3}
              for j in firsts.values()]
    lasts = run_driver(tmp_path, sweeps)
    for j in firsts.values():
        check_crashes(tmp_path / f"twice{j}", lasts[str(tmp_path / f"twice{j}")], versions[j], 3)


def test_the_crash_checker_can_fail(tmp_path):
    """Negative controls: the states a save without the recovery protocol could leave."""
    ck = tmp_path / "ck"
    save(ck, 1, overwrite=True)
    partial = tmp_path / ".ck.tmp-0123abcd"                   # naive: delete ck, then rename tmp
    partial.mkdir()
    (partial / "config.json").write_text(json.dumps(crash_driver.version(2)[1]))
    os.rename(ck, tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="does not exist .*incomplete .ck.tmp-0123abcd"):
        assert_whole(ck, {1, 2})
    os.rename(tmp_path / "elsewhere", ck)
    (ck / "model-00002-of-00002.safetensors").write_bytes(_shard_of(tmp_path, 2))   # mixed versions
    with pytest.raises(AssertionError):
        assert_whole(ck, {1, 2})
    save(ck, 1, overwrite=True)
    (ck / "trainer_state.json").write_bytes(crash_driver.version(2)[2]["trainer_state.json"])
    with pytest.raises(AssertionError):
        assert_whole(ck, {1, 2})
    save(ck, 1, overwrite=True)                               # repaired: the checker passes
    assert assert_whole(ck, {1, 2}) == 1


def _shard_of(tmp_path, v):
    save(tmp_path / f"v{v}", v)
    return (tmp_path / f"v{v}" / "model-00002-of-00002.safetensors").read_bytes()


def test_readers_use_the_complete_copy_and_recovery_puts_it_in_place(tmp_path):
    """The gap state built by hand (no driver): ck missing, the new copy complete beside it."""
    save(tmp_path / "ck", 1)
    save(tmp_path / "staged", 2)
    os.rename(tmp_path / "ck", tmp_path / ".ck.old-00000001")
    os.rename(tmp_path / "staged", tmp_path / ".ck.new-00000002")
    assert assert_whole(tmp_path / "ck", {1, 2}) == 2         # newest complete copy first
    with pytest.raises(CheckpointError, match="ck already exists and is not empty"):
        save(tmp_path / "ck", 3)                              # there is a checkpoint: refused
    assert recover_checkpoint(tmp_path / "ck") == tmp_path / "ck"
    assert sorted(os.listdir(tmp_path)) == ["ck"] and assert_whole(tmp_path / "ck", {2}) == 2
    assert recover_checkpoint(tmp_path / "nothing") is None


# ----------------------------------------------------------------------------- permissions

def modes(ck: Path):
    return {p.name: stat.S_IMODE(p.stat().st_mode) for p in [ck, *ck.iterdir()]}


@pytest.mark.parametrize("umask, directory, file", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600),
                                                     (0o002, 0o775, 0o664)])
def test_permissions_follow_the_umask(tmp_path, umask, directory, file):
    old = os.umask(umask)
    try:
        save(tmp_path / "ck", 1)
        made = tempfile.mkdtemp(dir=tmp_path)                 # negative control: always 0700
    finally:
        os.umask(old)
    assert modes(tmp_path / "ck") == {"ck": directory, **dict.fromkeys(FILES, file)}
    assert (stat.S_IMODE(os.stat(made).st_mode) == directory) == (directory == 0o700)


def test_a_replaced_directory_keeps_its_permissions(tmp_path):
    save(tmp_path / "ck", 1)
    os.chmod(tmp_path / "ck", 0o700)                          # the user made it private
    save(tmp_path / "ck", 2, overwrite=True)
    assert stat.S_IMODE((tmp_path / "ck").stat().st_mode) == 0o700
    assert assert_whole(tmp_path / "ck", {2}) == 2


# ----------------------------------------------------------------------------- symlinks

def test_a_symlink_target_is_replaced_and_the_link_kept(tmp_path):
    (tmp_path / "disk").mkdir()
    save(tmp_path / "disk" / "ck", 1)
    (tmp_path / "out").symlink_to(tmp_path / "disk" / "ck")
    save(tmp_path / "out", 2, overwrite=True)
    assert os.readlink(tmp_path / "out") == str(tmp_path / "disk" / "ck")
    assert assert_whole(tmp_path / "disk" / "ck", {2}) == 2 and assert_whole(tmp_path / "out", {2}) == 2
    assert sorted(os.listdir(tmp_path)) == ["disk", "out"] and os.listdir(tmp_path / "disk") == ["ck"]
    (tmp_path / "new").symlink_to("disk/fresh")               # a link to a directory yet to be made
    save(tmp_path / "new", 3)
    assert (tmp_path / "new").is_symlink() and assert_whole(tmp_path / "disk" / "fresh", {3}) == 3
    (tmp_path / "dangling").symlink_to(tmp_path / "unmounted" / "ck")
    with pytest.raises(CheckpointError, match=r"dangling is a symbolic link to .*unmounted/ck, whose directory "
                                              r".*unmounted does not exist"):
        save(tmp_path / "dangling", 1)
    assert not (tmp_path / "unmounted").exists()


# ----------------------------------------------------------------------------- overwrite

def snapshot(directory: Path):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_an_existing_directory_is_replaced_only_when_asked_and_nothing_is_lost(tmp_path):
    ck = tmp_path / "ck"
    save(ck, 1)
    before = snapshot(ck)
    with pytest.raises(CheckpointError, match=rf"{ck} already exists and is not empty \(config.json, .*\); "
                                              r"pass overwrite=True"):
        save(ck, 2)
    tensors, config, _ = crash_driver.version(2)                # without the run's two extra files
    with pytest.raises(CheckpointError, match=rf"{ck}: refusing to replace this directory: it holds "
                                              r"optimizer.safetensors, trainer_state.json, which the new"):
        save_tensors(ck, tensors, config, overwrite=True)
    (ck / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="it holds notes.txt, which"):
        save(ck, 2, overwrite=True)
    (ck / "notes.txt").unlink()
    (ck / "runs").mkdir()
    with pytest.raises(CheckpointError, match="it holds runs, which"):
        save(ck, 2, overwrite=True)
    (ck / "runs").rmdir()
    assert snapshot(ck) == before                               # every refusal left it as it was
    save(ck, 2, overwrite=True)                                 # the training loop's own files
    assert assert_whole(ck, {2}) == 2
    save_tensors(ck, {"w": np.ones(3)}, config, extra_files=crash_driver.version(2)[2], overwrite=True)
    assert sorted(os.listdir(ck)) == ["config.json", "model.safetensors", "optimizer.safetensors",
                                      "trainer_state.json"]     # old shards and index are gone
    save_tensors(ck, {"w": np.ones(3)}, config, extra_files=crash_driver.version(2)[2], overwrite=True)
    (tmp_path / "empty").mkdir()
    save(tmp_path / "empty", 1)                                 # an empty directory needs no overwrite
    assert assert_whole(tmp_path / "empty", {1}) == 1


def test_a_dtype_per_tensor(tmp_path):
    """save_tensors' dtype may name each tensor's (adaptation keeps every source's)."""
    x = np.array([1 + 2**-8 + 2**-40, 0.1])
    save_tensors(tmp_path / "ck", {"a": x, "b": x, "c": x}, {}, dtype={"a": "bfloat16", "b": "float32"})
    got = load_tensors(tmp_path / "ck", {"a": (2,), "b": (2,), "c": (2,)}, np.float64)
    assert got["a"].tolist() == [1 + 2**-7, 0.10009765625]              # bfloat16, rounded once
    assert got["b"].tolist() == x.astype(np.float32).astype(np.float64).tolist()
    assert got["c"].tolist() == x.tolist()                             # not named: kept float64
    with pytest.raises(CheckpointError, match="dtype names tensor.s. that are not saved: d"):
        save_tensors(tmp_path / "other", {"a": x}, {}, dtype={"d": "float32"})
