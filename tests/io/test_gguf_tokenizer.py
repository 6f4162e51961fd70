"""The tokenizer.model rebuilt from a GGUF vocabulary (minencdec/io/gguf_tokenizer.py).

Oracles: the metadata the test wrote (pieces, types, special ids) with the three documented
repairs; a naive BPE written here from the algorithm's definition (start from characters,
"\\n\\n" kept whole; repeatedly merge the adjacent pair whose merged piece comes first in the
file, leftmost on ties; unknown characters become their UTF-8 byte pieces); and, with
transformers, its GGUF tokenizer on the same file. Negative control: with the file's own
scores the naive oracle disagrees ("abc" splits as "a" + "bc").
"""

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given
from hypothesis import strategies as st
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

from gguf_cases import BYTE, NORMAL, SPACE, UNKNOWN, USER_DEFINED, piece_id, tiny_vocab, write_tiny_gguf
from minencdec.io.gguf import open_gguf, read_tokenizer
from minencdec.io.gguf_tokenizer import sentencepiece_model

TOKENS, TYPES, FILE_SCORES = tiny_vocab()
IDS = dict(bos_id=2, eos_id=1, unk_id=3, pad_id=0)
PROTO = sentencepiece_model(TOKENS, TYPES, **IDS)
SP = spm.SentencePieceProcessor(model_proto=PROTO)


def repaired(piece: str) -> str:
    return SPACE * len(piece) if piece and set(piece) == {" "} else piece


def naive_bpe(text: str, scores=None) -> list[int]:
    """BPE by its definition over the tiny vocabulary: merge rank = id (or -score given)."""
    pieces = [repaired(t) for t in TOKENS]
    normal = {p: i for i, (p, t) in enumerate(zip(pieces, TYPES)) if t == NORMAL or set(p) == {SPACE}}
    rank = {p: (i if scores is None else -scores[i]) for p, i in normal.items()}
    s, syms, i = text.replace(" ", SPACE), [], 0
    while i < len(s):
        step = 2 if s.startswith("\n\n", i) else 1               # the user-defined piece, whole
        syms.append(s[i:i + step])
        i += step
    while True:
        pairs = [(rank[a + b], k) for k, (a, b) in enumerate(zip(syms, syms[1:])) if a + b in rank]
        if not pairs:
            break
        _, k = min(pairs)
        syms[k:k + 2] = [syms[k] + syms[k + 1]]
    ids = []
    for sym in syms:
        if sym in pieces:
            ids.append(pieces.index(sym))
        else:                                                     # byte fallback
            ids.extend(TOKENS.index(f"<0x{b:02X}>") for b in sym.replace(SPACE, " ").encode("utf-8"))
    return ids


def test_pieces_types_and_special_ids_follow_the_metadata():
    proto = sp_pb2.ModelProto.FromString(PROTO)
    assert len(proto.pieces) == len(TOKENS)
    for i, (piece, kind) in enumerate(zip(TOKENS, TYPES)):
        p = proto.pieces[i]
        want_kind = UNKNOWN if i == IDS["unk_id"] else NORMAL if set(piece) == {" "} else kind
        assert (p.piece, p.type, p.score) == (repaired(piece), want_kind, -float(i)), i
    assert (SP.pad_id(), SP.eos_id(), SP.bos_id(), SP.unk_id()) == (0, 1, 2, 3)
    assert SP.is_unknown(3) and SP.is_control(1) and SP.is_byte(TOKENS.index("<0x41>"))
    assert proto.trainer_spec.model_type == sp_pb2.TrainerSpec.BPE and proto.trainer_spec.byte_fallback
    n = proto.normalizer_spec
    assert (n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces) == \
        ("identity", False, False, True)
    assert sum(t == USER_DEFINED for t in TYPES) == 3 and sum(t == BYTE for t in TYPES) == 256


@pytest.mark.parametrize("text, pieces", [
    ("abc", ["ab", "c"]),                               # "ab" (lower id) merges before "bc"
    ("a   b", ["a", SPACE * 3, "b"]),                   # a run of spaces is one normal piece
    ("  a", [SPACE * 2 + "a"]),
    ("de\n\nab", ["de", "\n\n", "ab"]),                 # user-defined piece matched whole
    ("ü", ["<0xC3>", "<0xBC>"]),                        # byte fallback
])
def test_hand_worked_examples(text, pieces):
    ids = SP.encode(text)
    assert [SP.id_to_piece(i) for i in ids] == pieces
    assert ids == naive_bpe(text) and SP.decode(ids) == text


@given(st.text(alphabet="abcde ü\n", max_size=40))
def test_sentencepiece_is_the_naive_bpe(text):
    ids = SP.encode(text)
    assert ids == naive_bpe(text)
    assert SP.decode(ids) == text


def test_negative_control_file_scores_change_the_merges():
    proto = sp_pb2.ModelProto.FromString(PROTO)
    for p, score in zip(proto.pieces, FILE_SCORES):
        p.score = score
    with_file_scores = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    got = with_file_scores.encode("abc")
    assert [with_file_scores.id_to_piece(i) for i in got] == ["a", "bc"]
    assert got != naive_bpe("abc") and got == naive_bpe("abc", FILE_SCORES)


def test_control_strings_in_text_are_not_special():
    ids = SP.encode("<eos><start_of_turn>")
    assert piece_id("<eos>") not in ids and piece_id("<start_of_turn>") not in ids
    assert SP.decode(ids) == "<eos><start_of_turn>"


def test_bad_vocabularies_are_named():
    with pytest.raises(ValueError, match="token_type has 3 entries for 4 tokens"):
        sentencepiece_model(["a", "b", "c", "d"], [1, 1, 1], **IDS)
    with pytest.raises(ValueError, match="bos_token_id 999 is outside"):
        sentencepiece_model(TOKENS, TYPES, **{**IDS, "bos_id": 999})
    with pytest.raises(ValueError, match="unknown types \\[9\\]"):
        sentencepiece_model(TOKENS, TYPES[:-1] + [9], **IDS)
    with pytest.raises(ValueError, match="does not make a sentencepiece model"):
        sentencepiece_model(TOKENS + ["ab"], TYPES + [NORMAL], **IDS)          # "ab" twice


def test_read_from_a_gguf_file(tmp_path):
    write_tiny_gguf(tmp_path / "t.gguf")
    assert read_tokenizer(open_gguf(tmp_path / "t.gguf")) == PROTO


def test_transformers_gguf_tokenizer_agrees(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("torch")
    write_tiny_gguf(tmp_path / "t.gguf")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="t.gguf")
    rng = np.random.default_rng(0)
    texts = ["".join(rng.choice(list("abcde ü\n"), size=rng.integers(0, 40))) for _ in range(300)]
    texts += ["a" + " " * 45 + "b", "\n\n\n\n\n", "ab\n\nde  "]
    for text in texts:
        assert SP.encode(text) == hf.encode(text, add_special_tokens=False), repr(text)
