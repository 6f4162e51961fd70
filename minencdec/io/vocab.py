"""Vocabulary trimming: keep only the token ids a corpus uses, so the LM head shrinks.

    summary = trim_vocab("g3", texts, "g3-shakespeare")   # writes a smaller checkpoint
    tok = load_tokenizer("g3-shakespeare")                # encode/decode in the model's ids

Gemma 3's vocabulary has 262,144 pieces; the Shakespeare corpus uses 25,518 of them, and the
(B, T, 262144) logits of the tied LM head are most of a training step's cost. Trimming keeps

    - every id the corpus encodes to (with the directory's own tokenizer),
    - the special ids: pad, eos, bos, unk, every other control piece except Gemma's reserved
      `<unusedN>` slots, UL2 sentinels and mode tokens, and T5Gemma 2's eoi token (its
      eoi_token_index; in a Gemma 3 vocabulary id 256000, so a trimmed Gemma 3 can still be
      adapted: the adapted config's eoi_token_index is then that id's new number),
    - the 256 byte-fallback pieces `<0x00>`...`<0xFF>`, so that every text still tokenizes:
      a piece that was dropped is spelled with the bytes of its text instead,
    - any ids asked for by name (`keep_ids`),

sorted ascending: new id i is old id kept[i], so pad/eos/bos/unk (0-3 in Gemma) keep theirs.
The new model is the rows `kept` of the embedding table (which is also the LM head: Gemma
ties them). Every activation up to the head is the full model's bit for bit, and each kept
logit is the same dot product; only BLAS's summation order differs (OpenBLAS's sgemm sums an
output element in an order that depends on where its column falls in the kernel's tiles), so
a few logits move by an ulp: on Gemma 3 270M, 2,797 of 618,768 logits, by at most 1.3e-5 on
logits up to 33 (tests/io/test_vocab.py holds this to the float32 rounding bound). What
changes is the softmax: it runs over the kept ids only, so probabilities are renormalised
over them (each is larger than the full model's), sampling never picks a dropped id, and
losses are not comparable with the full model's (lower on the same text). Training the
trimmed model trains only kept rows.

The map is stored beside the weights in `vocab_map.json` (format below), with the full
tokenizer as `full_tokenizer.model`: deliberately not `tokenizer.model`, whose ids would be
read as the model's by transformers' AutoTokenizer or any other tool, silently. Use
`load_tokenizer(dir)`: it encodes with the full tokenizer, maps the ids, and spells dropped
pieces in bytes, so decode(encode(text)) == text as before.

    vocab_map.json   {"format": "minencdec-vocab-map", "version": 1,
                      "tokenizer": "full_tokenizer.model",   # the sentencepiece model it maps
                      "tokenizer_vocab_size": 262144,        # its number of pieces
                      "kept_ids": [0, 1, 2, ...],             # model id i = tokenizer id kept_ids[i]
                      "source": {...}}                        # what was kept and why (counts)
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from minencdec.files.checkpoint import CheckpointError, load_tensors, read_config
from minencdec.model import gemma2, t5gemma
from minencdec.model.config import GemmaConfig, T5GemmaConfig

from .gguf import NOTICE_FILE, TERMS_FILE, check_out_dir, write_new_checkpoint
from .tokenizer import Tokenizer

MAP_FILE = "vocab_map.json"
FULL_TOKENIZER_FILE = "full_tokenizer.model"
MAP_FORMAT, MAP_VERSION = "minencdec-vocab-map", 1
_RESERVED = re.compile(r"<unused\d+>")          # Gemma's never-trained placeholder slots
T5GEMMA2_EOI = 256_000                           # T5Gemma 2's eoi token in Gemma 3's vocabulary


# ----------------------------------------------------------------------------- the id map

class MappedTokenizer:
    """A Tokenizer for a trimmed model: the full tokenizer.model, with ids mapped into the
    model's. Offers Tokenizer's interface (encode, encode_many, decode, piece_id, save, the
    special ids, sentinel_ids, mode_ids, vocab_size = the model's vocabulary)."""

    def __init__(self, full: Tokenizer, kept_ids, source=None):
        self.full, self.source = full, source
        self.kept = np.asarray(kept_ids, dtype=np.int64)
        _check_kept(self.kept, full.vocab_size, "kept_ids")
        self.new_id = np.full(full.vocab_size, -1, np.int64)       # old id -> new id, -1: dropped
        self.new_id[self.kept] = np.arange(len(self.kept))
        byte_old = _byte_ids(full)
        if (self.new_id[byte_old] < 0).any():
            raise ValueError("a trimmed vocabulary must keep the 256 byte-fallback pieces <0x00>...<0xFF>")
        self._byte_new = self.new_id[byte_old]                       # byte value -> new id
        self._spelled = {}
        self.vocab_size = len(self.kept)
        to_new = lambda i: int(self.new_id[i]) if 0 <= i < full.vocab_size and self.new_id[i] >= 0 else -1  # noqa: E731
        self.pad_id, self.eos_id, self.bos_id, self.unk_id = (to_new(i) for i in
                                                              (full.pad_id, full.eos_id, full.bos_id, full.unk_id))
        self.sentinel_ids = [to_new(i) for i in full.sentinel_ids if to_new(i) >= 0]
        self.mode_ids = {t: to_new(i) for t, i in full.mode_ids.items() if to_new(i) >= 0}

    def _map(self, old_ids) -> list[int]:
        old = np.asarray(old_ids, dtype=np.int64)
        new = self.new_id[old]
        if (new >= 0).all():
            return new.tolist()
        out = []
        for o, n in zip(old.tolist(), new.tolist()):
            out.extend((n,) if n >= 0 else self._spell(o))
        return out

    def _spell(self, old_id: int) -> list[int]:
        """The byte pieces of a dropped piece's text (its "▁" are spaces)."""
        if old_id not in self._spelled:
            sp = self.full.sp
            if sp.is_control(old_id) or sp.is_unknown(old_id) or sp.is_unused(old_id):
                raise ValueError(f"id {old_id} ({sp.id_to_piece(old_id)!r}) was dropped and has no text to spell")
            text = sp.id_to_piece(old_id).replace("\u2581", " ")
            self._spelled[old_id] = self._byte_new[list(text.encode("utf-8"))].tolist()
        return self._spelled[old_id]

    def encode(self, text: str, add_bos=False, add_eos=False) -> list[int]:
        """Model ids of `text`: the full tokenizer's, a dropped piece replaced by its bytes."""
        return self._map(self.full.encode(text, add_bos=add_bos, add_eos=add_eos))

    def encode_many(self, texts, add_bos=False, add_eos=False) -> list[list[int]]:
        return [self._map(ids) for ids in self.full.encode_many(texts, add_bos=add_bos, add_eos=add_eos)]

    def piece_id(self, piece: str):
        """The model id of `piece`, or None if the tokenizer has no such piece or it was dropped."""
        i = self.full.piece_id(piece)
        return None if i is None or self.new_id[i] < 0 else int(self.new_id[i])

    def files(self) -> dict[str, bytes]:
        """The files that carry this tokenizer beside a checkpoint: the full tokenizer and the map."""
        return {FULL_TOKENIZER_FILE: self.full.serialized(),
                MAP_FILE: map_json(self.full.vocab_size, self.kept, self.source).encode()}

    def serialized(self) -> bytes:
        """One byte string that identifies the tokenizer (the full model, then the map)."""
        return b"".join(self.files().values())

    def save(self, directory) -> Path:
        """Write full_tokenizer.model and vocab_map.json into `directory` (each atomically)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self.files().items():
            tmp = d / f".{name}.tmp{os.getpid()}"
            tmp.write_bytes(data)
            os.replace(tmp, d / name)
        return d / MAP_FILE

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"decode: id {bad[0]} is outside the trimmed vocabulary [0, {self.vocab_size})")
        return self.full.decode(self.kept[ids].tolist() if ids else [])

    def __repr__(self):
        return f"MappedTokenizer({self.vocab_size} of {self.full.vocab_size} ids)"


def map_json(tokenizer_vocab_size: int, kept, source=None) -> str:
    """The text of a vocab_map.json (see the module docstring)."""
    return json.dumps({"format": MAP_FORMAT, "version": MAP_VERSION, "tokenizer": FULL_TOKENIZER_FILE,
                       "tokenizer_vocab_size": tokenizer_vocab_size, "kept_ids": [int(i) for i in kept],
                       "source": source or {}}) + "\n"


def _byte_ids(tok: Tokenizer) -> np.ndarray:
    """The ids of the 256 byte-fallback pieces, by byte value."""
    ids = [tok.piece_id(f"<0x{b:02X}>") for b in range(256)]
    if None in ids:
        raise ValueError(f"the tokenizer has no byte-fallback piece <0x{ids.index(None):02X}>: without all 256, "
                         "text using a dropped piece could not be spelled (trimming needs byte_fallback)")
    return np.asarray(ids, dtype=np.int64)


def _check_kept(kept: np.ndarray, size: int, where: str) -> None:
    if kept.ndim != 1 or len(kept) == 0 or (np.diff(kept) <= 0).any() or kept[0] < 0 or kept[-1] >= size:
        raise ValueError(f"{where} must be a non-empty, strictly increasing list of ids in [0, {size})")


def load_tokenizer(directory):
    """The tokenizer of a checkpoint directory, in the model's ids: its tokenizer.model as a
    Tokenizer, or, when the directory holds a vocab_map.json (a trimmed vocabulary), a
    MappedTokenizer over the full tokenizer the map names."""
    directory = Path(directory)
    map_file = directory / MAP_FILE
    if not map_file.is_file():
        return Tokenizer.load(directory)
    try:
        m = json.loads(map_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{map_file}: invalid JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != MAP_FORMAT or m.get("version") != MAP_VERSION:
        raise ValueError(f"{map_file}: not a {MAP_FORMAT} version {MAP_VERSION} file")
    name = m.get("tokenizer")
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
        raise ValueError(f"{map_file}: 'tokenizer' must name a file in {directory}, got {name!r}")
    tok = Tokenizer.load(directory / name)
    if m.get("tokenizer_vocab_size") != tok.vocab_size:
        raise ValueError(f"{map_file} maps a tokenizer of {m.get('tokenizer_vocab_size')} pieces, but "
                         f"{directory / name} has {tok.vocab_size}")
    kept = m.get("kept_ids")
    if not isinstance(kept, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in kept):
        raise ValueError(f"{map_file}: kept_ids must be a list of integers")
    try:
        mapped = MappedTokenizer(tok, kept, m.get("source"))
    except ValueError as e:
        raise ValueError(f"{map_file}: {e}") from None
    vocab = _model_vocab_size(read_config(directory)) if (directory / "config.json").is_file() else None
    if vocab is not None and vocab != mapped.vocab_size:
        raise ValueError(f"{map_file} keeps {mapped.vocab_size} ids but config.json says vocab_size {vocab}")
    return mapped


def _model_vocab_size(raw: dict):
    if isinstance(raw.get("decoder"), dict):
        return raw["decoder"].get("vocab_size")
    return raw.get("vocab_size")


# ----------------------------------------------------------------------------- choosing ids

def special_ids(tok, extra=()) -> set[int]:
    """Ids kept whatever the corpus: the tokenizer's control and unknown pieces except Gemma's
    `<unusedN>` placeholders, its sentinels and mode tokens, and `extra` (in tok's ids)."""
    base = tok.full if isinstance(tok, MappedTokenizer) else tok
    sp = base.sp
    ids = {i for i in range(base.vocab_size)
           if (sp.is_control(i) or sp.is_unknown(i)) and not _RESERVED.fullmatch(sp.id_to_piece(i))}
    ids = {int(tok.new_id[i]) for i in ids if tok.new_id[i] >= 0} if isinstance(tok, MappedTokenizer) else ids
    ids |= set(tok.sentinel_ids) | set(tok.mode_ids.values()) | {int(i) for i in extra}
    return {i for i in ids if i >= 0}


def choose_ids(tok, texts, vocab_size: int, extra=()) -> tuple[np.ndarray, dict]:
    """The sorted ids to keep (in tok's ids) and the counts behind them."""
    used = set()
    for ids in tok.encode_many(list(texts)):
        used.update(ids)
    bytes_ = _byte_ids(tok.full) if isinstance(tok, MappedTokenizer) else _byte_ids(tok)
    if isinstance(tok, MappedTokenizer):
        bytes_ = tok.new_id[bytes_]
    specials = special_ids(tok, extra)
    bad = sorted(i for i in specials | used if not 0 <= i < vocab_size)
    if bad:
        raise ValueError(f"ids {bad[:10]} are outside the model's vocabulary of {vocab_size}")
    kept = np.array(sorted(used | specials | set(bytes_.tolist())), dtype=np.int64)
    counts = {"corpus": len(used), "special": len(specials - used),
              "byte_fallback": len(set(bytes_.tolist()) - used - specials), "kept": len(kept), "of": vocab_size}
    return kept, counts


# ----------------------------------------------------------------------------- the model

def _read_model(path):
    """(config.json, config, parameter shapes, embedding table names, names stored for tied
    tensors) of a Gemma 2/3 or T5Gemma (2) directory."""
    raw = read_config(path)
    source = str(Path(path) / "config.json")
    if any(str(a).endswith("ForSequenceClassification") for a in raw.get("architectures") or []):
        raise ValueError(f"{path} is a sequence classifier (no LM head): trim-vocab trims language models")
    kind = raw.get("model_type")
    try:
        if kind in ("gemma2", "gemma3_text"):
            cfg = GemmaConfig.from_hf_dict(raw, source, "gemma3" if kind == "gemma3_text" else "gemma2")
            return raw, cfg, gemma2.param_shapes(cfg), (gemma2.EMBED,), (gemma2.TIED_HEAD,)
        if kind in ("t5gemma", "t5gemma2"):
            cfg = T5GemmaConfig.from_hf_dict(raw, source)
            tables = (t5gemma.ENC_EMBED,) if kind == "t5gemma2" else (t5gemma.ENC_EMBED, t5gemma.DEC_EMBED)
            ignore = t5gemma.TIED_T5G2 if kind == "t5gemma2" else (t5gemma.TIED_HEAD,)
            return raw, cfg, t5gemma.param_shapes(cfg), tables, ignore
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    raise CheckpointError(f"{source}: model_type {kind!r} is not a Gemma 2/3 or T5Gemma (2) language model")


def _eoi_to_keep(cfg, tok, vocab: int):
    """T5Gemma 2's eoi token in the model's ids, or None: a T5Gemma 2's eoi_token_index, or id
    256000 of a Gemma 3 vocabulary (so that a trimmed Gemma 3 can still be adapted)."""
    if isinstance(cfg, T5GemmaConfig):
        eoi = cfg.eoi_token_index
    elif cfg.family == "gemma3":
        full = tok.full if isinstance(tok, MappedTokenizer) else tok
        if T5GEMMA2_EOI >= full.vocab_size:
            return None
        eoi = int(tok.new_id[T5GEMMA2_EOI]) if isinstance(tok, MappedTokenizer) else T5GEMMA2_EOI
    else:
        return None
    return eoi if eoi is not None and 0 <= eoi < vocab else None     # outside the vocabulary: nothing to keep


def _trimmed_config(raw: dict, cfg, kept: np.ndarray) -> dict:
    """config.json of the trimmed model: vocab_size, the special ids and eoi renumbered."""
    new = {int(o): n for n, o in enumerate(kept.tolist())}

    def stack(c: GemmaConfig) -> GemmaConfig:
        return c.replace(vocab_size=len(kept), pad_token_id=new[c.pad_token_id],
                         eos_token_id=new[c.eos_token_id], bos_token_id=new[c.bos_token_id])
    if isinstance(cfg, T5GemmaConfig):
        eoi = new.get(cfg.eoi_token_index, cfg.eoi_token_index)     # outside the vocabulary: unchanged
        out = T5GemmaConfig(stack(cfg.encoder), stack(cfg.decoder), eoi_token_index=eoi).to_hf_dict()
    else:
        out = stack(cfg).to_hf_dict()
    out.update({k: v for k, v in raw.items() if k.startswith("minencdec_")})   # provenance travels
    return out


def trim_vocab(model_dir, texts, out_dir, *, keep_ids=(), dtype="float32", save_dtype=None,
               corpus_name="corpus") -> dict:
    """Write `out_dir`: the model of `model_dir` with only the ids `texts` use (plus the
    specials, the byte pieces and `keep_ids`, in the model's ids), with the map, the full
    tokenizer and the terms files (see the module docstring). Weights are read in `dtype`
    (float32 or float64) and written in it unless `save_dtype` says otherwise. Returns the
    map's "source" entry (the counts). Everything is checked before anything is written."""
    model_dir = Path(model_dir)
    check_out_dir(out_dir)
    raw, cfg, shapes, tables, ignore = _read_model(model_dir)
    tok = load_tokenizer(model_dir)
    stack0 = cfg.decoder if isinstance(cfg, T5GemmaConfig) else cfg
    vocab = stack0.vocab_size
    if tok.vocab_size > vocab:
        raise ValueError(f"{model_dir}: the tokenizer has {tok.vocab_size} ids but the model only {vocab}")
    extra = {int(i) for i in keep_ids} | {stack0.pad_token_id, stack0.eos_token_id, stack0.bos_token_id}
    eoi = _eoi_to_keep(cfg, tok, vocab)
    kept, counts = choose_ids(tok, texts, vocab, extra | ({eoi} if eoi is not None else set()))
    params = load_tensors(model_dir, shapes, dtype, ignore=ignore)
    for name in tables:
        params[name] = np.ascontiguousarray(params[name][kept])          # (V', D): rows of the table
    original = tok.kept[kept] if isinstance(tok, MappedTokenizer) else kept   # ids of tokenizer.model
    full = tok.full if isinstance(tok, MappedTokenizer) else tok
    source = {"corpus": corpus_name, "counts": counts, "model_from": str(model_dir.resolve())}
    extra_files = {FULL_TOKENIZER_FILE: full.serialized(),
                   MAP_FILE: map_json(full.vocab_size, original, source).encode()}
    if (model_dir / TERMS_FILE).is_file():
        extra_files[TERMS_FILE] = (model_dir / TERMS_FILE).read_bytes()
    if (model_dir / NOTICE_FILE).is_file():                      # the terms ask modified files to say so
        extra_files[NOTICE_FILE] = (model_dir / NOTICE_FILE).read_bytes() + (
            f"\nModified: vocabulary trimmed by minencdec to {len(kept)} of {vocab} ids "
            f"(those {corpus_name} uses, the special ids and the 256 byte pieces).\n").encode()
    write_new_checkpoint(out_dir, params, _trimmed_config(raw, cfg, kept), save_dtype, extra_files)
    return source
