"""tokenizers' ``Unigram`` model (Viterbi over the pieces of ``spiece.model``) run by SentencePiece's C++ encoder.

SentencePiece runs on a *modified copy* of the model (see :func:`_viterbi_model`): identity normalizer (the text is
already normalized), no dummy prefix, no whitespace handling, every piece a plain ``NORMAL`` piece with the Hugging
Face score (so control and user-defined pieces are scored as tokenizers scores them, not boosted or hidden). No piece
contains ``▁`` after its first character, so Viterbi over ``▁word1▁word2...`` equals Viterbi over each word on its own,
as tokenizers does it. Where SentencePiece's float32 sums could decide differently from tokenizers' float64 ones, the
word is redone exactly in Python (see the comment at ``_SCORE_QUANTUM``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from .normalize import SPIECE_UNDERLINE

_WORD_RE = re.compile("\u2581[^\u2581]*")  # a pre-tokenized word: '▁' and what follows up to the next '▁'
# Unigram scores and exact ties. tokenizers adds float64 scores, so two segmentations of a word with the same pieces in
# another order ("▁cab c cc" / "▁cab cc c", "=====", "hahaha") tie exactly, up to the last bit of the scores as
# tokenizers parsed them from tokenizer.json (see _serde_json_f64), which then decides. SentencePiece adds float32
# scores, so it cannot reproduce that; its copy here gets the scores rounded to multiples of 2**-16 so that its sums
# are exact while they stay above -256, and chunks of about _CHUNK_CHARS characters (whole words) to keep them
# there. A chunk is accepted when its best path is safely above -256 and, if its pieces allow a tie at all, a second
# SentencePiece model on the reversed text (reversed pieces: the same segmentations and scores, ties broken the other
# way round) finds the same path. Other chunks are redone word by word the same way, and words that still fail go
# through tokenizers' algorithm in float64 Python with tokenizers' exact scores.
_SCORE_QUANTUM = 2.0**-16
_EXACT_LIMIT = -250.0  # float32 sums of multiples of 2**-16 are exact down to -256
_CHUNK_CHARS = 48
# Two pieces after a word's first one that start with the same character (byte codes of first characters, 0 = a
# word's first piece): necessary for a tie between two orders of the same pieces.
_REPEATED_HEAD_RE = re.compile(rb"([^\x00])[^\x00]*?\1")


def _is_digit_comma(piece: str) -> bool:
    """Pieces ending in digit + ',' (``▁2010,``, ``3,``): XLNetTokenizerFast lowers their score by 100."""
    return len(piece) >= 2 and piece[-1] == "," and piece[-2].isdigit()


def _serde_json_f64(value: float) -> float:
    """``value`` as tokenizers reads it back from ``tokenizer.json``, with serde_json's default float parser.

    That parser is not correctly rounded: it reads the decimal digits into an integer, converts it to float64 and
    multiplies or divides once by a power of ten (two roundings), so about a quarter of XLNet's scores come out one
    unit in the last place off. That only matters for exact ties, which it decides; ``tokenizer.json`` holds the
    shortest representation of each score, i.e. ``repr``.
    """
    text = repr(float(value))
    if text in ("inf", "-inf", "nan"):
        return value
    negative = text.startswith("-")
    mantissa, _, exponent = text.lstrip("-").partition("e")
    whole, _, fraction = mantissa.partition(".")
    significand = int(whole + fraction)
    power = int(exponent or 0) - len(fraction)
    result = float(significand)
    if power >= 0:
        result *= float(f"1e{power}")
    else:
        result /= float(f"1e{-power}")
    return -result if negative else result


def _quantize(score: float) -> float:
    return round(score / _SCORE_QUANTUM) * _SCORE_QUANTUM


def _viterbi_model(proto: model_pb2.ModelProto, scores: list[float], reverse: bool = False) -> model_pb2.ModelProto:
    """Copy of the model that makes SentencePiece's encoder run tokenizers' ``Unigram`` model.

    - identity normalizer, no dummy prefix, no whitespace handling: the text arrives normalized and pre-tokenized
      as ``▁word1▁word2...``;
    - every piece but ``<unk>`` becomes ``NORMAL``: tokenizers' ``Unigram`` holds all pieces (controls such as
      ``</s>`` and user-defined ones such as ``.``) with their plain scores, where SentencePiece would hide controls
      and force user-defined pieces;
    - scores are tokenizers' (digit-comma pieces lowered by 100), rounded to multiples of ``_SCORE_QUANTUM`` (see
      there); SentencePiece's unknown score (lowest score - 10) then matches tokenizers' as well;
    - ``reverse``: every piece spelled backwards, for the tie check on reversed text.
    """
    sp_type = model_pb2.ModelProto.SentencePiece
    viterbi = model_pb2.ModelProto()
    viterbi.CopyFrom(proto)
    spec = viterbi.normalizer_spec
    spec.name = "identity"
    spec.precompiled_charsmap = b""
    spec.add_dummy_prefix = False
    spec.remove_extra_whitespaces = False
    spec.escape_whitespaces = False
    viterbi.ClearField("denormalizer_spec")
    for piece, score in zip(viterbi.pieces, scores, strict=True):
        if piece.type != sp_type.UNKNOWN:
            piece.type = sp_type.NORMAL
            piece.score = _quantize(score)
            if reverse:
                piece.piece = piece.piece[::-1]
    trainer = viterbi.trainer_spec
    trainer.byte_fallback = False
    trainer.bos_id = trainer.eos_id = trainer.pad_id = -1
    return viterbi


def _chunks(words: str) -> Iterator[str]:
    """Cut ``'▁w1▁w2...'`` into runs of whole words of about ``_CHUNK_CHARS`` characters."""
    start, size = 0, len(words)
    while start < size:
        end = words.find(SPIECE_UNDERLINE, start + _CHUNK_CHARS)
        if end < 0:
            end = size
        yield words[start:end]
        start = end


def _sp_encode(processor: spm.SentencePieceProcessor, texts: list[str], num_threads: int) -> list[list[int]]:
    """SentencePiece ids of each text: a batch call has a fixed cost of ~25 us (its thread pool), one text ~1 us."""
    if len(texts) < 32:
        return [processor.encode(text) for text in texts]
    return processor.encode(texts, num_threads=num_threads)


class UnigramSegmenter:
    """Ids of pre-tokenized ``'▁w1▁w2...'`` texts exactly as tokenizers' ``Unigram`` model (XLNet's scores) gives them.

    Args:
        proto: the parsed ``spiece.model`` (unigram).
        piece_to_id: its pieces -> ids.
    """

    def __init__(self, proto: model_pb2.ModelProto, piece_to_id: dict[str, int]) -> None:
        self._piece_to_id = piece_to_id
        # tokenizers' Unigram scores (float64, as parsed from tokenizer.json): spiece.model's, digit-comma pieces
        # lowered by 100; unknown characters score the lowest score - 10.
        unknown = model_pb2.ModelProto.SentencePiece.UNKNOWN
        self._scores = [
            _serde_json_f64(float(p.score) - (100.0 if _is_digit_comma(p.piece) else 0.0)) for p in proto.pieces
        ]
        self._unk_score = min(self._scores) - 10.0
        self._sp = spm.SentencePieceProcessor(model_proto=_viterbi_model(proto, self._scores).SerializeToString())
        self._sp_reversed = spm.SentencePieceProcessor(
            model_proto=_viterbi_model(proto, self._scores, reverse=True).SerializeToString()
        )
        # Path scores for the range check: SentencePiece merges a run of unknown characters into one <unk>, so a path
        # scores sum(_path_score[id]) + len(text) * unknown score, with _path_score[id] = rounded score - length *
        # unknown score (0 for <unk>).
        quantized_unk = _quantize(min(self._scores)) - 10.0
        self._quantized_unk_score = quantized_unk
        self._path_score = [
            0.0 if p.type == unknown else _quantize(score) - len(p.piece) * quantized_unk
            for p, score in zip(proto.pieces, self._scores, strict=True)
        ]
        self._unk_piece_id = next(i for i, p in enumerate(proto.pieces) if p.type == unknown)  # there is exactly one
        self._unk_piece = proto.pieces[self._unk_piece_id].piece
        self._heads = [
            0 if p.piece.startswith(SPIECE_UNDERLINE) else 255 if p.type == unknown else ord(p.piece[0]) % 254 + 1
            for p in proto.pieces
        ]
        self._max_piece_chars = max((len(p.piece) for p in proto.pieces), default=1)

    def _viterbi(self, texts: list[str], num_threads: int) -> list[list[int] | None]:
        """SentencePiece's segmentation of pre-tokenized texts, ``None`` where it may differ from tokenizers': the best
        path is not safely above -256 (inexact sums), the text spells an ``<unk>`` piece (tokenizers can match it,
        SentencePiece cannot), or the reversed text gives another path (a tie).

        Ties are only looked for where they are possible: two different orders of the same pieces first differ at two
        pieces of different lengths that both start where the difference starts, so the found path holds two pieces
        after a word's first one that start with the same character."""
        encoded: list[list[int] | None] = list(_sp_encode(self._sp, texts, num_threads))
        path_score, unk_score = self._path_score.__getitem__, self._quantized_unk_score
        suspects = []
        for i, (text, ids) in enumerate(zip(texts, encoded, strict=True)):
            if sum(map(path_score, ids)) + len(text) * unk_score < _EXACT_LIMIT or self._unk_piece in text:
                encoded[i] = None
            elif len(ids) - text.count(SPIECE_UNDERLINE) >= 2 and _REPEATED_HEAD_RE.search(
                bytes(map(self._heads.__getitem__, ids))
            ):
                suspects.append(i)
        if suspects:
            reversed_ids = _sp_encode(self._sp_reversed, [texts[i][::-1] for i in suspects], num_threads)
            for i, backwards in zip(suspects, reversed_ids, strict=True):
                backwards.reverse()
                if backwards != encoded[i]:
                    encoded[i] = None
        return encoded

    def encode(self, texts: list[str], num_threads: int = 1) -> list[list[int]]:
        """Unigram ids of pre-tokenized ``'▁w1▁w2...'`` strings: SentencePiece on chunks, word by word where a chunk
        fails the checks of :meth:`_viterbi`, float64 Python where a word fails them too.

        ``num_threads``: SentencePiece threads per batch call (-1: every core)."""
        chunks: list[str] = []
        counts: list[int] = []
        for text in texts:
            before = len(chunks)
            chunks.extend(_chunks(text))
            counts.append(len(chunks) - before)
        encoded = self._viterbi(chunks, num_threads)
        failed = [i for i, ids in enumerate(encoded) if ids is None]
        if failed:
            words = {i: _WORD_RE.findall(chunks[i]) for i in failed}
            flat = [w for i in failed for w in words[i]]
            word_ids = iter(self._viterbi(flat, num_threads))
            for i in failed:
                ids: list[int] = []
                for word in words[i]:
                    found = next(word_ids)
                    ids.extend(found if found is not None else self._exact_viterbi(word))
                encoded[i] = ids
        out: list[list[int]] = []
        position = 0
        for count in counts:
            if count == 1:
                out.append(encoded[position])  # type: ignore[arg-type]
            else:
                out.append([i for ids in encoded[position : position + count] for i in ids])  # type: ignore[union-attr]
            position += count
        return out

    def _exact_viterbi(self, word: str) -> list[int]:
        """tokenizers' ``Unigram`` (``encode_optimized``) on one word, in float64 Python: best sum of scores, ties to
        the candidate that starts first, a run of unknown characters fused into one token."""
        vocab, scores, unk_id = self._piece_to_id, self._scores, self._unk_piece_id
        size = len(word)
        best = [0.0] * (size + 1)
        starts = [-1] * (size + 1)
        nodes = [-1] * (size + 1)
        for i in range(size):
            score_here = best[i]
            has_single = False
            for j in range(i + 1, min(size, i + self._max_piece_chars) + 1):
                piece_id = vocab.get(word[i:j])
                if piece_id is None:
                    continue
                candidate = score_here + scores[piece_id]
                if starts[j] < 0 or candidate > best[j]:
                    best[j], starts[j], nodes[j] = candidate, i, piece_id
                has_single = has_single or j == i + 1
            if not has_single:
                candidate = score_here + self._unk_score
                if starts[i + 1] < 0 or candidate > best[i + 1]:
                    best[i + 1], starts[i + 1], nodes[i + 1] = candidate, i, unk_id
        out: list[int] = []
        end, unk_end = size, -1
        while end > 0:
            if nodes[end] == unk_id:
                unk_end = end if unk_end < 0 else unk_end
            else:
                if unk_end >= 0:  # a fused run of unknown characters: its text's id, <unk> unless it is a piece
                    out.append(vocab.get(word[end:unk_end], unk_id))
                    unk_end = -1
                out.append(nodes[end])
            end = starts[end]
        if unk_end >= 0:
            out.append(vocab.get(word[:unk_end], unk_id))
        out.reverse()
        return out
