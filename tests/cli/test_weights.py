"""The weights commands (minencdec/cli/weights.py) through their own parser: fetch (with a
fake registry), import-gguf and trim-vocab on tiny files the tests write. Oracles: the files
each command leaves, read back by the library's own readers, and the arguments given."""

import argparse
import json

import pytest

from gguf_cases import fake_270m_registry, tiny_vocab, write_tiny_gguf
from minencdec.cli import weights
from minencdec.io.vocab import load_tokenizer


def run(argv):
    p = argparse.ArgumentParser(prog="minencdec")
    sub = p.add_subparsers(dest="command", required=True)
    weights.add_commands(sub)
    args = p.parse_args(argv)
    return args.func(args)


def test_import_then_trim(tmp_path, capsys):
    write_tiny_gguf(tmp_path / "t.gguf")
    assert run(["import-gguf", str(tmp_path / "t.gguf"), "--out", str(tmp_path / "m")]) == 0
    assert "Gemma 3, 6 layers, width 32, vocab 278" in capsys.readouterr().out
    (tmp_path / "corpus.txt").write_text("abc de  ab\n\nbc")
    assert run(["trim-vocab", "--model", str(tmp_path / "m"), "--corpus", str(tmp_path / "corpus.txt"),
                "--keep-ids", "5", "--out", str(tmp_path / "small")]) == 0
    out = capsys.readouterr().out
    tok = load_tokenizer(tmp_path / "small")
    tokens = tiny_vocab()[0]
    kept_pieces = {tokens[i] for i in tok.kept}
    assert {"ab", "c", "de", "\n\n", "bc", "<start_of_turn>", "<0x41>"} <= kept_pieces
    assert "<unused0>" not in kept_pieces and "e" not in kept_pieces
    assert json.loads((tmp_path / "small" / "config.json").read_text())["vocab_size"] == len(tok.kept)
    assert f"{len(tok.kept)} of 278 ids kept" in out
    assert tok.decode(tok.encode("eee abc ü")) == "eee abc ü"


def test_errors_are_ones_the_main_command_reports(tmp_path):
    """minencdec's main turns ValueError and OSError into a one-line message and exit code 2."""
    write_tiny_gguf(tmp_path / "x.gguf", arch="llama")
    with pytest.raises(ValueError, match="general.architecture is 'llama'"):
        run(["import-gguf", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "m")])
    with pytest.raises(OSError):
        run(["trim-vocab", "--model", str(tmp_path), "--corpus", str(tmp_path / "missing.txt"),
             "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        run(["fetch", "gemma3-1b", "--out", str(tmp_path / "o")])      # only the 270M is offered


def test_fetch_command_with_a_fake_registry(tmp_path, capsys, monkeypatch):
    fake, _, terms = fake_270m_registry(tmp_path, monkeypatch)
    assert run(["fetch", "gemma3-270m", "--out", str(tmp_path / "g3"), "--cache-dir", str(tmp_path / "cache"),
                "--dtype", "bfloat16"]) == 0
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "Gemma Terms of Use" in captured.err
    assert (tmp_path / "g3" / "GEMMA_TERMS.html").read_bytes() == terms and len(fake.calls) == 5
