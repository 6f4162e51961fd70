"""The sentencepiece tokenizer a Gemma GGUF file describes, rebuilt as a `tokenizer.model`.

A GGUF file carries no tokenizer.model; it stores the vocabulary as metadata arrays, under
llama.cpp's key names:

    tokenizer.ggml.model         "llama": a sentencepiece vocabulary
    tokenizer.ggml.tokens        the pieces, id order (262,144 for Gemma 3)
    tokenizer.ggml.scores        a float per piece
    tokenizer.ggml.token_type    1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
                                 (sentencepiece's own ModelProto.SentencePiece.Type numbers)
    tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_space_prefix

`sentencepiece_model` puts them into sentencepiece's `ModelProto`: a BPE model with byte
fallback, the identity normalizer, no dummy prefix, whitespace kept as it is (spaces become
"▁"). Three repairs make it encode exactly as transformers' GGUF tokenizer does (its
`gemma_tokenizer` in transformers/integrations/gguf/gguf_tokenizer_mapping.py), checked on the
real Gemma 3 file in tests/io/test_gguf_real.py:

  - scores: BPE merges the adjacent pair whose merged piece scores highest. Gemma's file
    scores do not follow its merge order; the order of the pieces in the file does, so piece
    i gets score -i. (With the file's scores, runs of more than 31 spaces split differently.)
  - runs of spaces ("  " ... 31 spaces) are stored with real spaces and typed user-defined;
    they become "▁▁"... and normal pieces, which BPE reaches by merging.
  - `<unk>` is typed control in the file; sentencepiece needs its unknown piece typed unknown.

Control pieces (`<eos>`, `<start_of_turn>`, ...) are never matched in text: the string
"<eos>" inside a text is spelled with ordinary pieces, as Gemma's own tokenizer.model does
(transformers' GGUF tokenizer instead turns such strings into their special ids). Control ids
enter a sequence only by id (add_bos, add_eos, a chat template written in ids).
User-defined pieces ("\\n\\n", "</div>", ...) are matched whole wherever they occur.
"""

from __future__ import annotations

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"            # "▁": how sentencepiece writes a space inside a piece


def sentencepiece_model(tokens, token_types, *, bos_id: int, eos_id: int, unk_id: int, pad_id: int,
                        add_space_prefix: bool = False, source: str = "GGUF file") -> bytes:
    """The serialized ModelProto (the bytes of a tokenizer.model) of a Gemma GGUF vocabulary.
    `source` names the file in errors."""
    n = len(tokens)
    if len(token_types) != n:
        raise ValueError(f"{source}: tokenizer.ggml.token_type has {len(token_types)} entries for {n} tokens")
    for name, i in (("bos", bos_id), ("eos", eos_id), ("unknown", unk_id), ("padding", pad_id)):
        if not 0 <= i < n:
            raise ValueError(f"{source}: tokenizer.ggml.{name}_token_id {i} is outside the {n} tokens")
    bad = sorted({int(t) for t in token_types} - {NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE})
    if bad:
        raise ValueError(f"{source}: tokenizer.ggml.token_type holds unknown types {bad}")
    proto = sp_pb2.ModelProto()
    for i, (piece, kind) in enumerate(zip(tokens, token_types)):
        kind = int(kind)
        if piece and set(piece) == {" "}:          # a run of spaces: "▁▁▁", reached by BPE merges
            piece, kind = SPACE * len(piece), NORMAL
        if i == unk_id:
            kind = UNKNOWN
        elif kind == UNKNOWN:                       # sentencepiece allows one unknown piece
            kind = CONTROL
        proto.pieces.add(piece=piece, score=-float(i), type=kind)
    t = proto.trainer_spec
    t.model_type = sp_pb2.TrainerSpec.BPE
    t.vocab_size = n
    t.byte_fallback = True
    t.unk_id, t.bos_id, t.eos_id, t.pad_id = unk_id, bos_id, eos_id, pad_id
    t.unk_piece, t.bos_piece = tokens[unk_id], tokens[bos_id]
    t.eos_piece, t.pad_piece = tokens[eos_id], tokens[pad_id]
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(add_space_prefix)
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    data = proto.SerializeToString()
    try:
        spm.SentencePieceProcessor(model_proto=data)   # sentencepiece's own checks (duplicates, bytes)
    except RuntimeError as e:
        raise ValueError(f"{source}: its vocabulary does not make a sentencepiece model: {e}") from None
    return data
