"""The :class:`Tokenizer`: XLNet's special tokens split off, then the normalizer, pre-tokenizer and unigram model of
``XLNetTokenizerFast`` (:mod:`.normalize`, :mod:`.segment`); decoding in :mod:`.decode`, files in :mod:`.pretrained`."""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from sentencepiece import sentencepiece_model_pb2 as model_pb2

from .charsmap import charsmap_single_chars
from .decode import IncrementalDecoder, as_id_list, clean_up_tokenization, metaspace
from .normalize import SPIECE_UNDERLINE, Normalizer
from .pretrained import read_pretrained, token_content, write_pretrained, xlnet_special_tokens_map
from .segment import UnigramSegmenter


class Tokenizer:
    """SentencePiece unigram tokenizer giving the ids of Hugging Face's ``XLNetTokenizerFast``.

    ``encode`` equals ``XLNetTokenizerFast(text, add_special_tokens=False)["input_ids"]``; ``encode_batch`` its
    left-padded batches; ``decode`` its ``decode`` (see the package docstring for the pipeline).

    Attributes:
        vocab_size: number of pieces (special tokens are pieces, not extra ids).
        eos_id, pad_id, unk_id: ids of the eos (``</s>``, between documents), pad (``<pad>``, left padding) and unk
            (``<unk>``) tokens.
        special_tokens: tokens split off the raw text before normalization, in id order.
        clean_up_tokenization_spaces: whether ``decode`` applies transformers' clean-up (default True, as XLNet's).
        num_threads: SentencePiece threads per call (default 1: data pipelines parallelize across processes, and a
            thread pool per call costs more than it saves on single texts; -1 uses every core for big batches).
    """

    def __init__(
        self,
        model_proto: bytes,
        *,
        special_tokens_map: dict[str, Any] | None = None,
        added_tokens: Sequence[str] | None = None,
        clean_up_tokenization_spaces: bool = True,
    ) -> None:
        """Build from the bytes of a ``spiece.model``.

        Args:
            model_proto: serialized SentencePiece ``ModelProto`` (unigram, with an ``nmt_nfkc``-style charsmap).
            special_tokens_map: roles -> tokens (``eos_token``, ``pad_token``, ``unk_token``, ...,
                ``additional_special_tokens``); XLNet's when None. Every token must be a piece of the model.
            added_tokens: tokens split off the raw text (all special); the tokens of ``special_tokens_map`` when None.
            clean_up_tokenization_spaces: apply transformers' clean-up in ``decode``.
        """
        self._model_proto = bytes(model_proto)
        proto = model_pb2.ModelProto()
        proto.ParseFromString(self._model_proto)
        if proto.trainer_spec.model_type != model_pb2.TrainerSpec.UNIGRAM:
            raise ValueError("only unigram SentencePiece models are supported (XLNet's model type)")
        self._pieces: list[str] = [p.piece for p in proto.pieces]
        self._piece_to_id: dict[str, int] = {piece: i for i, piece in enumerate(self._pieces)}
        self.vocab_size: int = len(self._pieces)
        if any(SPIECE_UNDERLINE in piece[1:] for piece in self._pieces):
            raise ValueError("pieces with '▁' after their first character are not supported (not an XLNet-style model)")

        roles = dict(special_tokens_map) if special_tokens_map is not None else xlnet_special_tokens_map()
        self._special_tokens_map = roles
        tokens: list[str] = []
        for role, value in roles.items():
            values = value if role == "additional_special_tokens" else [value]
            tokens.extend(t for t in (token_content(v) for v in values) if t is not None)
        if added_tokens is not None:
            tokens = list(added_tokens)
        self._added: dict[str, int] = {token: self._token_id(token) for token in dict.fromkeys(tokens)}
        self.special_tokens: tuple[str, ...] = tuple(sorted(self._added, key=self._added.__getitem__))
        self._special_ids = frozenset(self._added.values())
        self._added_re = (
            re.compile("(" + "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True)) + ")")
            if self._added
            else None
        )
        self.eos_id: int = self._token_id(token_content(roles.get("eos_token")) or "</s>")
        self.pad_id: int = self._token_id(token_content(roles.get("pad_token")) or "<pad>")
        self.unk_id: int = self._token_id(token_content(roles.get("unk_token")) or "<unk>")
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        self.num_threads = 1
        self._segmenter = UnigramSegmenter(proto, self._piece_to_id)
        self._normalizer = Normalizer(charsmap_single_chars(proto.normalizer_spec.precompiled_charsmap))

    def _token_id(self, token: str) -> int:
        try:
            return self._piece_to_id[token]
        except KeyError:
            raise ValueError(f"special token {token!r} is not a piece of the SentencePiece model") from None

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> Tokenizer:
        """Load ``directory/spiece.model`` (a path to the ``.model`` file itself works too).

        Special tokens come from ``tokenizer_config.json`` / ``special_tokens_map.json`` when present (as
        ``save_pretrained`` writes them, e.g. next to a converted checkpoint), else XLNet's defaults (eos ``</s>``,
        pad ``<pad>``, unk ``<unk>``, ...). ``tokenizer.json`` is not read: its pipeline is the one built here.
        """
        return cls(**read_pretrained(directory))

    def save(self, directory: str | os.PathLike[str]) -> None:
        """Write ``spiece.model``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``directory``.

        The files follow what transformers' ``save_pretrained`` writes for XLNet (``tokenizer_class: XLNetTokenizer``,
        left padding), so :meth:`from_pretrained` and transformers' ``XLNetTokenizer`` read them back. No
        ``tokenizer.json`` is written: a fast ``AutoTokenizer`` would build its pipeline with transformers' plain
        converter, which differs slightly from xlnet-base-cased's (e.g. it keeps a trailing ``▁``).
        """
        write_pretrained(
            directory, self._model_proto, self._special_tokens_map, self._added, self.clean_up_tokenization_spaces
        )

    def __getstate__(self) -> dict[str, Any]:  # picklable for data-loader worker processes
        return {
            "model_proto": self._model_proto,
            "special_tokens_map": self._special_tokens_map,
            "added_tokens": list(self.special_tokens),
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(  # type: ignore[misc]
            state["model_proto"],
            special_tokens_map=state["special_tokens_map"],
            added_tokens=state["added_tokens"],
            clean_up_tokenization_spaces=state["clean_up_tokenization_spaces"],
        )

    # ----------------------------------------------------------------------------------------------- encoding

    def normalize(self, text: str) -> str:
        """tokenizers' normalizer: ``Replace('``')``, ``Replace("''")``, ``NFKD``, ``StripAccents``, ``Precompiled``.

        Whitespace the charsmap would turn into a space may be left as it is (the word split drops both)."""
        return self._normalizer.normalize(text)

    def _segments(self, text: str) -> list[str | int]:
        """Split off the added (special) tokens, then pre-tokenize each stretch in between."""
        if self._added_re is None:
            return [self._normalizer.pretokenize(text)]
        parts = self._added_re.split(text)
        segments: list[str | int] = []
        for i, part in enumerate(parts):
            if i % 2:
                segments.append(self._added[part])
            elif part:
                segments.append(self._normalizer.pretokenize(part))
        return segments

    def _encode_segments(self, segment_lists: list[list[str | int]]) -> list[list[int]]:
        texts = [s for segments in segment_lists for s in segments if isinstance(s, str) and s]
        encoded = iter(self._segmenter.encode(texts, self.num_threads))
        out: list[list[int]] = []
        for segments in segment_lists:
            ids: list[int] = []
            for s in segments:
                if isinstance(s, int):
                    ids.append(s)
                elif s:
                    ids.extend(next(encoded))
            out.append(ids)
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` as ``XLNetTokenizerFast(text, add_special_tokens=False)["input_ids"]``."""
        return self._encode_segments([self._segments(text)])[0]

    def encode_many(self, texts: Iterable[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``, faster: one SentencePiece call for the whole list (``num_threads``)."""
        return self._encode_segments([self._segments(t) for t in texts])

    def encode_batch(self, texts: Sequence[str] | str, max_length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Encode and left-pad like ``tokenizer(texts, add_special_tokens=False, padding=True[, truncation=True,
        max_length=max_length])`` with ``padding_side="left"``.

        Returns ``(input_ids, attention_mask)``, both int32 of shape ``(len(texts), width)``: rows truncated to their
        first ``max_length`` ids when given, padded on the left with ``pad_id`` to the longest row; the mask is 1 on
        tokens and 0 on padding.
        """
        if isinstance(texts, str):
            texts = [texts]
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be positive, got {max_length}")
        rows = self.encode_many(texts)
        if max_length is not None:
            rows = [row[:max_length] for row in rows]
        width = max((len(row) for row in rows), default=0)
        input_ids = np.full((len(rows), width), self.pad_id, dtype=np.int32)
        attention_mask = np.zeros((len(rows), width), dtype=np.int32)
        for i, row in enumerate(rows):
            if row:
                input_ids[i, width - len(row) :] = row
                attention_mask[i, width - len(row) :] = 1
        return input_ids, attention_mask

    # ----------------------------------------------------------------------------------------------- decoding

    def id_to_piece(self, token_id: int) -> str:
        return self._pieces[token_id]

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece (``unk_id`` when the model has no such piece)."""
        return self._piece_to_id.get(piece, self.unk_id)

    def _tokens(self, ids: Any, skip_special_tokens: bool) -> list[str]:
        """tokenizers' ``decode`` drops ids outside the vocabulary and, when asked, the special (added) tokens."""
        n, special = self.vocab_size, self._special_ids
        return [self._pieces[i] for i in as_id_list(ids) if 0 <= i < n and not (skip_special_tokens and i in special)]

    def decode(self, ids: Any, skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` as ``XLNetTokenizerFast.decode(ids, skip_special_tokens=...)``.

        ``Metaspace`` decoder: ``▁`` -> space, except that every ``▁`` of the first token is dropped; then transformers'
        ``clean_up_tokenization_spaces``. Special tokens are kept as their text (``<unk>``, ``</s>``) unless skipped.
        """
        text = metaspace(self._tokens(ids, skip_special_tokens), at_start=True)
        return clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def decode_batch(self, rows: Iterable[Any], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(row, skip_special_tokens=skip_special_tokens) for row in rows]

    def incremental_decoder(self, skip_special_tokens: bool = False) -> IncrementalDecoder:
        """A streaming decoder for text printed while it is generated (see :class:`IncrementalDecoder`)."""
        return IncrementalDecoder(self, skip_special_tokens=skip_special_tokens)
