"""Vocabulary trimming (minencdec/io/vocab.py) on tiny Gemma 3 and T5Gemma 2 checkpoints.

Oracles: the full model itself, the texts the test made (round trips), the byte pieces named
`<0xNN>` for a dropped piece's UTF-8 bytes, and, with torch, transformers loading the trimmed
directory. What "the same logits at the kept ids" means, exactly (`assert_same_logits`):

  - every activation up to the LM head (each sublayer, the final norm) is bit for bit the
    full model's, and the head's table is the full table's rows `kept`, bit for bit;
  - each logit taken as its own dot product (einsum, which sums every output element the same
    way whatever else it computes) is bit for bit the full model's;
  - the models' own logits (OpenBLAS's sgemm) agree within the rounding bound of two float32
    dot products of length D, 2 gamma_D sum_k |h_k e_k|: sgemm sums an element in an order
    that depends on where its column falls in the kernel's tiles, so computing 300 columns
    instead of 500 moves some logits by an ulp (measured: a few hundred of 11,440 here).

Negative control: a map off by one id fails the comparison.
"""

import json
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from helpers import RTOL_F32, assert_close
from minencdec.files.checkpoint import load_tensors
from minencdec.io.gguf import GGUFError
from minencdec.io.tokenizer import Tokenizer, train_tokenizer
from minencdec.io.vocab import MAP_FILE, MappedTokenizer, load_tokenizer, trim_vocab
from minencdec.model.adapt import adapt_params
from minencdec.model.config import GemmaConfig, T5GemmaConfig, gemma3_config
from minencdec.model.gemma2 import Gemma2Model, param_shapes
from minencdec.model.t5gemma import EOI, ENC_EMBED, T5GemmaModel
from minencdec.model.t5gemma import param_shapes as t5_shapes

WORDS = ("the king queen castle sword river runs sleeps speaks of to and with under over bright dark old "
         "young Verona Denmark café naïve 1599 thou art doth hath").split()
FEW = WORDS[:8]                         # the trimming corpus uses only these
rng = np.random.default_rng(5)


def sentences(words, n, seed):
    r = random.Random(seed)
    return ["\n".join(" ".join(r.choice(words) for _ in range(r.randint(3, 10))) + "." for _ in range(6))
            for _ in range(n)]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(sentences(WORDS, 8, 0), 500, num_sentinels=4, seed=0)


def tiny3(vocab, **changes):
    base = dict(vocab_size=vocab, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=8, sliding_window=3,
                max_position_embeddings=64)
    return gemma3_config(**{**base, **changes})


def randomize(model):
    for w in model.params.values():
        w[...] = rng.normal(0, 0.4, w.shape) if w.ndim == 1 else w * 8
    return model


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory, tok):
    d = tmp_path_factory.mktemp("g3") / "model"
    randomize(Gemma2Model.random(tiny3(tok.vocab_size), seed=1)).save_pretrained(d)
    tok.save(d)
    return d


@pytest.fixture(scope="module")
def trimmed3(tmp_path_factory, gemma3_dir):
    out = tmp_path_factory.mktemp("g3t") / "model"
    trim_vocab(gemma3_dir, sentences(FEW, 4, 1), out, corpus_name="few words")
    return out


def load_gemma3(path):
    cfg = GemmaConfig.from_hf_dict(json.loads((path / "config.json").read_text()), family="gemma3")
    return Gemma2Model(cfg, load_tensors(path, param_shapes(cfg), "float32"))


def load_t5(path):
    cfg = T5GemmaConfig.from_hf_dict(json.loads((path / "config.json").read_text()))
    return T5GemmaModel(cfg, load_tensors(path, t5_shapes(cfg), "float32"))


def test_kept_ids_are_the_corpus_specials_and_bytes(trimmed3, tok):
    mapped = load_tokenizer(trimmed3)
    kept = mapped.kept
    assert isinstance(mapped, MappedTokenizer) and (np.diff(kept) > 0).all()
    used = {i for ids in tok.encode_many(sentences(FEW, 4, 1)) for i in ids}
    bytes_ = {tok.piece_id(f"<0x{b:02X}>") for b in range(256)}
    specials = {0, 1, 2, 3} | set(tok.sentinel_ids) | set(tok.mode_ids.values())
    assert set(kept.tolist()) == used | bytes_ | specials
    assert len(kept) < tok.vocab_size - 50                               # something was dropped
    assert (mapped.pad_id, mapped.eos_id, mapped.bos_id, mapped.unk_id) == (0, 1, 2, 3)
    assert json.loads((trimmed3 / "config.json").read_text())["vocab_size"] == len(kept)
    m = json.loads((trimmed3 / MAP_FILE).read_text())
    assert m["kept_ids"] == kept.tolist() and m["source"]["counts"]["corpus"] == len(used)
    # No tokenizer.model: nothing may read the full vocabulary's ids as the model's.
    assert not (trimmed3 / "tokenizer.model").exists()
    with pytest.raises(FileNotFoundError, match="no sentencepiece model"):
        Tokenizer.load(trimmed3)


U32 = 2.0 ** -24                        # float32 unit roundoff


def assert_same_logits(small_rec, full_rec, small_table, full_table, kept, head="norm"):
    """See the module docstring. *_rec: the `record` dicts of the two forwards."""
    for name, value in full_rec.items():
        if name != "logits":
            assert np.array_equal(small_rec[name], value), name
    assert np.array_equal(small_table, full_table[kept])
    h = small_rec[head]                                                  # (B, T, D)
    one_by_one = np.einsum("btd,vd->btv", h, small_table)
    assert np.array_equal(one_by_one, np.einsum("btd,vd->btv", full_rec[head], full_table)[..., kept])
    got, want = small_rec["logits"].astype(np.float64), full_rec["logits"][..., kept].astype(np.float64)
    D = h.shape[-1]
    bound = 2 * D * U32 / (1 - D * U32) * (np.abs(h).astype(np.float64) @ np.abs(small_table).astype(np.float64).T)
    assert got.shape == want.shape and (np.abs(got - want) <= bound).all()


def test_gemma3_logits_at_kept_ids(gemma3_dir, trimmed3):
    full, small, mapped = load_gemma3(gemma3_dir), load_gemma3(trimmed3), load_tokenizer(trimmed3)
    new = np.stack([mapped.encode(t, add_bos=True)[:20] for t in sentences(WORDS, 2, 7)])    # (2, 20)
    small_rec, full_rec = {}, {}
    small.logits(new, record=small_rec)
    full.logits(mapped.kept[new], record=full_rec)
    table = "model.embed_tokens.weight"
    assert_same_logits(small_rec, full_rec, small.params[table], full.params[table], mapped.kept)
    off_by_one = np.minimum(mapped.kept + 1, full.config.vocab_size - 1)
    with pytest.raises(AssertionError):                                  # negative control
        assert_same_logits(small_rec, full_rec, small.params[table], full.params[table], off_by_one)


@settings(max_examples=40)
@given(st.lists(st.sampled_from(WORDS + ["ß", "🙂", "  ", "\t", "\n\n", "日本"]), max_size=12))
def test_every_text_round_trips(trimmed3_tok, words):
    text = " ".join(words)
    ids = trimmed3_tok.encode(text)
    assert all(0 <= i < trimmed3_tok.vocab_size for i in ids)
    assert trimmed3_tok.decode(ids) == text


@pytest.fixture(scope="module")
def trimmed3_tok(trimmed3):
    return load_tokenizer(trimmed3)


def test_the_mapped_tokenizer_saves_and_reloads(tmp_path, trimmed3):
    mapped = load_tokenizer(trimmed3)
    mapped.save(tmp_path / "run")
    again = load_tokenizer(tmp_path / "run")
    assert np.array_equal(again.kept, mapped.kept) and again.source == mapped.source
    assert again.encode("the king of Denmark") == mapped.encode("the king of Denmark")
    assert mapped.piece_id("<bos>") == 2 and mapped.piece_id("no such piece") is None


def test_a_dropped_piece_is_spelled_in_bytes(trimmed3, tok):
    mapped = load_tokenizer(trimmed3)
    full_ids = tok.encode("Denmark")
    dropped = [i for i in full_ids if mapped.new_id[i] < 0]
    assert dropped, "the test needs a word whose pieces were dropped"
    want = []
    for i in full_ids:
        piece = tok.sp.id_to_piece(i)
        want += [piece] if mapped.new_id[i] >= 0 else \
            [f"<0x{b:02X}>" for b in piece.replace("\u2581", " ").encode("utf-8")]
    got = [tok.sp.id_to_piece(int(mapped.kept[i])) for i in mapped.encode("Denmark")]
    assert got == want and mapped.decode(mapped.encode("Denmark")) == "Denmark"


def test_t5gemma2_table_eoi_and_logits(tmp_path, tok):
    eoi = 300
    cfg = T5GemmaConfig(tiny3(tok.vocab_size), tiny3(tok.vocab_size, num_hidden_layers=2), eoi_token_index=eoi)
    model = randomize(T5GemmaModel.random(cfg, seed=3))
    model.save_pretrained(tmp_path / "t5")
    tok.save(tmp_path / "t5")
    trim_vocab(tmp_path / "t5", sentences(FEW, 4, 1), tmp_path / "t5t")
    small, mapped = load_t5(tmp_path / "t5t"), load_tokenizer(tmp_path / "t5t")
    new_eoi = int(np.searchsorted(mapped.kept, eoi))
    assert mapped.kept[new_eoi] == eoi and small.config.eoi_token_index == new_eoi
    assert np.array_equal(small.params[EOI], model.params[EOI])
    assert np.array_equal(small.params[ENC_EMBED], model.params[ENC_EMBED][mapped.kept])
    enc = np.array([mapped.encode("the king sleeps", add_bos=True) + [new_eoi, 1]])
    dec = np.array([[2] + mapped.encode("queen of the river")])
    small_rec, full_rec = {}, {}
    small.logits(enc, dec, record=small_rec)
    model.logits(mapped.kept[enc], mapped.kept[dec], record=full_rec)
    assert_same_logits(small_rec, full_rec, small.params[ENC_EMBED], model.params[ENC_EMBED], mapped.kept,
                       head="decoder.norm")


def test_after_adaptation_and_twice(tmp_path, gemma3_dir, tok):
    """A T5Gemma 2 adapted from the tiny Gemma 3, trimmed once with the whole corpus and again
    with a few words: the maps compose and the logits stay the full model's."""
    g3 = load_gemma3(gemma3_dir)
    cfg, params, _ = adapt_params(g3.params, g3.config, g3.params, g3.config)
    T5GemmaModel(cfg, params).save_pretrained(tmp_path / "t5")
    tok.save(tmp_path / "t5")
    trim_vocab(tmp_path / "t5", sentences(WORDS[:16], 4, 2), tmp_path / "once")
    trim_vocab(tmp_path / "once", sentences(FEW, 4, 1), tmp_path / "twice")
    once, twice = load_tokenizer(tmp_path / "once"), load_tokenizer(tmp_path / "twice")
    assert set(twice.kept.tolist()) < set(once.kept.tolist())          # ids of the one tokenizer.model
    full, small = load_t5(tmp_path / "t5"), load_t5(tmp_path / "twice")
    enc = np.array([twice.encode("the king of Verona", add_bos=True)])
    dec = np.array([[2] + twice.encode("castle")])
    small_rec, full_rec = {}, {}
    small.logits(enc, dec, record=small_rec)
    full.logits(twice.kept[enc], twice.kept[dec], record=full_rec)
    assert_same_logits(small_rec, full_rec, small.params[ENC_EMBED], full.params[ENC_EMBED], twice.kept,
                       head="decoder.norm")


def test_refusals_name_the_problem(tmp_path, gemma3_dir, trimmed3):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep")
    with pytest.raises(GGUFError, match="not an empty directory"):
        trim_vocab(gemma3_dir, ["the king"], taken)
    assert (taken / "x").read_text() == "keep"
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in trimmed3.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    m = json.loads((broken / MAP_FILE).read_text())
    (broken / MAP_FILE).write_text(json.dumps({**m, "kept_ids": m["kept_ids"][:-1]}))
    with pytest.raises(ValueError, match="keeps .* ids but config.json says vocab_size"):
        load_tokenizer(broken)
    (broken / MAP_FILE).write_text(json.dumps({**m, "kept_ids": m["kept_ids"][::-1]}))
    with pytest.raises(ValueError, match="strictly increasing"):
        load_tokenizer(broken)
    (broken / MAP_FILE).write_text(json.dumps({**m, "format": "other"}))
    with pytest.raises(ValueError, match="not a minencdec-vocab-map"):
        load_tokenizer(broken)


def test_keep_ids_outside_the_vocabulary_are_refused(tmp_path, gemma3_dir, tok):
    with pytest.raises(ValueError, match=f"ids \\[{tok.vocab_size + 5}\\] are outside the model's vocabulary"):
        trim_vocab(gemma3_dir, ["the king"], tmp_path / "o", keep_ids=[tok.vocab_size + 5])
    assert not (tmp_path / "o").exists()


def test_a_gemma3_vocabulary_keeps_t5gemma2_eoi():
    """Id 256000 (T5Gemma 2's eoi) stays in a trimmed Gemma 3, so it can be adapted later;
    a vocabulary too small to have it keeps nothing extra."""
    from types import SimpleNamespace
    from minencdec.io.vocab import T5GEMMA2_EOI, _eoi_to_keep
    assert _eoi_to_keep(tiny3(262_144), SimpleNamespace(vocab_size=262_144), 262_144) == T5GEMMA2_EOI == 256_000
    assert _eoi_to_keep(tiny3(500), SimpleNamespace(vocab_size=500), 500) is None
    gemma2 = GemmaConfig(vocab_size=262_144, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                         num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    assert _eoi_to_keep(gemma2, SimpleNamespace(vocab_size=262_144), 262_144) is None


def test_a_tokenizer_without_byte_pieces_cannot_trim(tmp_path):
    import sentencepiece as spm
    import io
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences(WORDS, 4, 0)), model_writer=out,
                                   vocab_size=60, model_type="bpe", minloglevel=2, byte_fallback=False,
                                   pad_id=0, eos_id=1, bos_id=2, unk_id=3)
    plain = Tokenizer(out.getvalue())
    with pytest.raises(ValueError, match="no byte-fallback piece <0x00>"):
        MappedTokenizer(plain, list(range(plain.vocab_size)))


def test_transformers_loads_the_trimmed_directory(trimmed3):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.Gemma3ForCausalLM.from_pretrained(str(trimmed3), torch_dtype=torch.float32).eval()
    ours, mapped = load_gemma3(trimmed3), load_tokenizer(trimmed3)
    ids = np.array([mapped.encode("the king runs to the castle", add_bos=True)])
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    assert_close("trimmed Gemma 3 logits", ours.logits(ids), want, RTOL_F32)

