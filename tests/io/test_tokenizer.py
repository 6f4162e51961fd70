"""Tokenizer: Gemma's special ids, UL2's reserved pieces, lossless round trips, saving.

Oracles: sentencepiece's own view of the model (piece names, control flags), the text the
test made itself (round trips), and the serialized bytes (save/load)."""

import random

import pytest
import sentencepiece as spm
from hypothesis import given
from hypothesis import strategies as st

from minencdec.io.tokenizer import (MODE_TOKENS, Tokenizer, check_for_model, min_vocab_size,
                                    require_sentinels, train_tokenizer)

WORDS = ("the king queen castle sword river runs sleeps speaks of to and with under over "
         "bright dark old young Verona Denmark café naïve 1599 thou art doth hath").split()


def make_corpus(seed=0, docs=8, lines=40):
    """A few KB of generated sentences, several documents, newlines inside each."""
    rng = random.Random(seed)
    return ["\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "."
                      for _ in range(lines)) for _ in range(docs)]


CORPUS = make_corpus()
VOCAB = 600


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, VOCAB, num_sentinels=100, seed=0)


def test_corpus_is_a_few_kilobytes():
    assert 4_000 < sum(len(t) for t in CORPUS) < 40_000


def test_gemma_special_ids(tok):
    assert (tok.pad_id, tok.eos_id, tok.bos_id, tok.unk_id) == (0, 1, 2, 3)
    sp = spm.SentencePieceProcessor(model_proto=tok.serialized())          # independent view
    assert [sp.id_to_piece(i) for i in range(4)] == ["<pad>", "<eos>", "<bos>", "<unk>"]
    assert all(sp.is_control(i) for i in (0, 1, 2)) and sp.is_unknown(3)
    ids = tok.encode("old king")
    assert tok.encode("old king", add_bos=True, add_eos=True) == [2] + ids + [1]
    assert tok.decode([2] + ids + [1, 0]) == "old king"                    # control ids vanish


def test_sentinels_and_mode_tokens_are_single_pieces(tok):
    sp = spm.SentencePieceProcessor(model_proto=tok.serialized())
    assert len(tok.sentinel_ids) == 100 and sorted(tok.mode_ids) == sorted(MODE_TOKENS)
    reserved = tok.sentinel_ids + list(tok.mode_ids.values())
    assert len(set(reserved)) == len(reserved) and not set(reserved) & {0, 1, 2, 3}
    for i, sid in enumerate(tok.sentinel_ids):
        assert sp.id_to_piece(sid) == f"<extra_id_{i}>" and not (sp.is_control(sid) or sp.is_byte(sid))
        assert tok.encode(f"<extra_id_{i}>") == [sid]
        assert tok.decode([sid]) == f"<extra_id_{i}>"
    for name, mid in tok.mode_ids.items():
        assert tok.encode(name) == [mid] and tok.decode([mid]) == name
    text = "the king <extra_id_7> river [NLG] old"
    ids = tok.encode(text)
    assert ids.count(tok.sentinel_ids[7]) == 1 and ids.count(tok.mode_ids["[NLG]"]) == 1
    assert tok.decode(ids) == text


def test_negative_control_unreserved_name_is_split(tok):
    """The single-piece check can fail: a sentinel name past the reserved ones is split."""
    assert len(tok.encode("<extra_id_100>")) > 1 and len(tok.encode("[XYZ]")) > 1


def test_corpus_round_trips(tok):
    ids = tok.encode_many(CORPUS)
    assert [tok.decode(i) for i in ids] == CORPUS
    assert ids == [tok.encode(t) for t in CORPUS]
    assert tok.unk_id not in {i for row in ids for i in row}


# any text, including characters never seen in training (byte fallback), except U+2581 (the
# space meta symbol, documented in Tokenizer.encode) and surrogates (not encodable at all)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\u2581"),
               max_size=60))
def test_any_text_round_trips(tok, text):
    ids = tok.encode(text)
    assert tok.unk_id not in ids
    assert tok.decode(ids) == text


def test_space_meta_symbol_is_the_documented_exception(tok):
    assert tok.decode(tok.encode("\u2581x")) == " x"


def test_serialized_model_loads_back_identically(tok, tmp_path):
    path = tok.save(tmp_path / "ckpt")
    assert path.name == "tokenizer.model" and path.read_bytes() == tok.serialized()
    for back in (Tokenizer.load(tmp_path / "ckpt"), Tokenizer.load(path), Tokenizer(tok.serialized())):
        assert back.serialized() == tok.serialized()
        assert back.vocab_size == tok.vocab_size
        assert [back.sp.id_to_piece(i) for i in range(back.vocab_size)] == \
               [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
        assert back.sentinel_ids == tok.sentinel_ids and back.mode_ids == tok.mode_ids
        assert back.encode_many(CORPUS) == tok.encode_many(CORPUS)


def test_training_is_deterministic_and_the_comparison_can_fail(tok):
    assert train_tokenizer(CORPUS, VOCAB, seed=0).serialized() == tok.serialized()
    other = train_tokenizer(CORPUS, VOCAB - 50, seed=0)                     # negative control
    assert other.serialized() != tok.serialized()
    assert other.encode_many(CORPUS) != tok.encode_many(CORPUS)


def test_train_from_files_equals_train_from_texts(tok, tmp_path):
    files = []
    for i, text in enumerate(CORPUS):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(text, encoding="utf-8")
    assert train_tokenizer(files, VOCAB, seed=0).serialized() == tok.serialized()


def test_unigram_and_fewer_sentinels():
    t = train_tokenizer(CORPUS, 500, num_sentinels=3, model_type="unigram")
    assert len(t.sentinel_ids) == 3 and len(t.mode_ids) == 3
    assert [t.decode(t.encode(x)) for x in CORPUS] == CORPUS
    assert t.vocab_size <= 500                    # a soft limit: a tiny corpus may give fewer


def test_errors():
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([], VOCAB)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer(["", "  \n\n "], VOCAB)
    with pytest.raises(ValueError, match=f"must be larger than {min_vocab_size(100)}"):
        train_tokenizer(CORPUS, min_vocab_size(100))
    many_chars = ["".join(chr(0x4E00 + i) for i in range(j, j + 50)) for j in range(0, 400, 50)]
    with pytest.raises(ValueError, match="every distinct character"):
        train_tokenizer(many_chars, min_vocab_size(100) + 10)
    with pytest.raises(ValueError, match="model_type"):
        train_tokenizer(CORPUS, VOCAB, model_type="wordpiece")
    with pytest.raises(TypeError):
        train_tokenizer([b"bytes"], VOCAB)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a sentencepiece model"):
        Tokenizer.load(tmp_path)


def test_check_for_model_names_both_sizes(tok):
    check_for_model(tok, tok.vocab_size)                   # equal is fine
    with pytest.raises(ValueError, match=f"{tok.vocab_size} pieces.*only {tok.vocab_size - 1} rows"):
        check_for_model(tok, tok.vocab_size - 1)


def test_require_sentinels(tok):
    require_sentinels(tok, 100)
    with pytest.raises(ValueError, match="needs 101 sentinel tokens.*has 100"):
        require_sentinels(tok, 101)
    few = train_tokenizer(CORPUS, 400, num_sentinels=0)
    assert few.sentinel_ids == []
    with pytest.raises(ValueError, match="has 0"):
        require_sentinels(few, 1)


def test_decode_rejects_ids_outside_the_vocabulary(tok):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([5, tok.vocab_size])
