"""Replacing a directory so that a crash at any instant leaves one complete copy.

A save of directory NAME never writes into NAME. It builds the new directory beside it and
swaps it in with renames; the name of every sibling says what state it is in:

    1. write every file into        .NAME.tmp-T      (maybe incomplete: only ever deleted)
    2. rename it, once complete,    .NAME.new-T      (complete: the new directory)
    3. move the old one aside       NAME -> .NAME.old-T   (complete: it was NAME)
    4. put the new one in place     .NAME.new-T -> NAME
    5. rename the old one           .NAME.del-T, then delete it (maybe partly deleted)

A process killed between steps 3 and 4 leaves no NAME at all, but a complete .NAME.new-T
(and .NAME.old-T). Step 5's rename is why a half-deleted directory is never called "old":
while NAME is missing, a .new or .old sibling is complete by construction. So:

- `readable(path)` is NAME, else the complete sibling (the newer one first). It changes
  nothing on disk: a reader may run while a save is in progress, or on a read-only disk.
- `recover(path)` renames that sibling to NAME and deletes every other leftover. Each
  `write_directory` runs it first; a program that reads files of NAME by itself (the
  training loop's trainer_state.json) runs it before reading.

Renames within one directory are atomic on POSIX file systems; fsync of the files and of
the parent directory makes them survive a power cut too, not only a killed process. One
writer at a time per directory: two saves racing to the same NAME are not supported.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
from pathlib import Path

_KINDS = ("tmp", "new", "old", "del")


def sibling(path: Path, kind: str, token: str) -> Path:
    """`.NAME.<kind>-<token>` beside `path`."""
    return path.with_name(f".{path.name}.{kind}-{token}")


def leftovers(path: Path) -> dict[str, list[Path]]:
    """The siblings an interrupted save of `path` left behind, by kind (tmp, new, old, del).

    The token is 8 characters: hex here; [a-z0-9_] from older versions of minencdec, which
    made the temporary directory with tempfile.mkdtemp."""
    found = {kind: [] for kind in _KINDS}
    pattern = re.compile(rf"\.{re.escape(path.name)}\.({'|'.join(_KINDS)})-[0-9a-z_]{{8}}")
    try:
        entries = list(os.scandir(path.parent))
    except (FileNotFoundError, NotADirectoryError):
        return found
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match and entry.is_dir(follow_symlinks=False):
            found[match.group(1)].append(Path(entry.path))
    return found


def _complete_sibling(path: Path) -> Path | None:
    """The complete copy a save killed between steps 3 and 4 left: new before old; among
    several (only concurrent writers make several), the most recently written."""
    found = leftovers(path)
    for kind in ("new", "old"):
        dated = []
        for candidate in found[kind]:
            try:
                dated.append((candidate.stat().st_mtime_ns, candidate.name, candidate))
            except FileNotFoundError:             # renamed meanwhile by a running save
                continue
        if dated:
            return max(dated)[2]
    return None


def readable(path) -> Path:
    """The directory that holds what `path` names: `path` itself when it exists (or when
    nothing complete is left beside it), else the complete copy an interrupted save left."""
    path = Path(path)
    if path.exists():
        return path
    return _complete_sibling(Path(os.path.realpath(path))) or path


def recover(path) -> Path | None:
    """Finish what an interrupted save of `path` left: if `path` is missing, rename the complete
    copy beside it into place; then delete every other leftover. Returns the directory, or
    None if there is none. A no-op when nothing was interrupted; `path` itself is never
    deleted, and while it is missing the complete copy is renamed before anything else goes."""
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_dir():
        return None                               # not ours to repair; a save refuses it anyway
    if not path.exists():
        source = _complete_sibling(path)
        if source is None:
            _delete_all(path)                     # only incomplete tmp/del directories
            return None
        os.rename(source, path)
        fsync_dir(path.parent)
    _delete_all(path)
    return path


def _delete_all(path: Path) -> None:
    for kind, directories in leftovers(path).items():
        for directory in directories:
            _delete(directory, kind)


def _delete(directory: Path, kind: str) -> None:
    """Delete a sibling; a complete one is first renamed .del, so no half-deleted directory
    ever carries the name "new" or "old" (which promise a complete copy)."""
    if kind in ("new", "old"):
        doomed = directory.with_name(re.sub(r"\.(new|old)-([0-9a-z_]{8})$", r".del-\2", directory.name))
        os.rename(directory, doomed)
        directory = doomed
    shutil.rmtree(directory, ignore_errors=True)


def write_directory(path, fill) -> None:
    """Make `path` a new directory whose files `fill(directory)` writes (and fsyncs), replacing
    what is there only once the new directory is complete (steps 1-5 above).

    The new directory gets the permissions the user's umask gives any new directory; one
    that replaces an existing directory keeps that directory's permissions (a private
    checkpoint stays private). A symlink at `path` is followed: its target is replaced."""
    path = Path(os.path.realpath(path))
    recover(path)
    while True:
        token = secrets.token_hex(4)
        tmp = sibling(path, "tmp", token)
        try:
            os.mkdir(tmp)                         # mode 0777 minus the umask, as any new directory
            break
        except FileExistsError:                   # 1 in 4e9 per leftover-free save: draw again
            continue
    new = sibling(path, "new", token)
    try:
        if path.is_dir():
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
        fill(tmp)
        fsync_dir(tmp)
        os.rename(tmp, new)                       # step 2: complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    if not path.exists():
        os.rename(new, path)
        fsync_dir(path.parent)
        return
    old = sibling(path, "old", token)
    os.rename(path, old)                          # step 3
    try:
        os.rename(new, path)                      # step 4
    except BaseException:
        os.rename(old, path)
        _delete(new, "new")
        raise
    fsync_dir(path.parent)
    _delete(old, "old")                           # step 5


def fsync_dir(directory: Path) -> None:
    """Make renames and new entries in `directory` durable (a no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
