"""Documents -> one EOS-separated token stream -> random-length chunks -> left-padded batches, at an exact position.

This is perceiver-io's C4 pipeline (``perceiver/data/text/c4.py`` + ``C4Collator``) made deterministic and resumable:

* every document is tokenized without special tokens and followed by one EOS id, and the documents are concatenated;
* the stream is cut into consecutive, non-overlapping chunks of ``L + 1`` tokens, ``L`` drawn uniformly from
  ``[min_seq_len, max_seq_len]`` (``torch.randint(min_seq_len, max_seq_len + 1) + 1`` there; ``L = max_seq_len``
  always when ``min_seq_len`` is None, as for its validation set); the extra token is the last label;
* a chunk ``c`` becomes ``input_ids = c[:-1]`` and ``labels = c[1:]``, left-padded to ``max_seq_len``. perceiver-io pads
  to the longest chunk of the batch; padding to ``max_seq_len`` gives every batch one static shape (one compiled step)
  and the same loss, since pads are masked and positions count from the first real token.

One difference: perceiver-io drops the tokens left over at the end of every group of 16 documents
(``concat_batch_size``); here they carry over into the next chunk, so no text is lost.

Order. Documents are read in the source's fixed order in windows of ``window_size`` documents; with ``shuffle`` each
window is permuted by a generator seeded with ``(seed, process_index, epoch, window)``. This replaces the streaming
shuffle buffer of perceiver-io (a 10,000-document buffer over a stream whose files TFDS already shuffled when it
wrote them) with one that can be restored exactly without saving the buffer: a corpus smaller than the window is
fully reshuffled every epoch. Chunk lengths come from generators seeded with ``(seed, process_index, block)`` for
blocks of ``_LENGTH_BLOCK`` chunks, so the ``n``-th length is known without replaying the first ``n - 1``.

Position. :class:`Position` ``(epoch, doc, token, chunk)`` says what comes next: document ``doc`` of ``epoch``'s order,
its first ``token`` tokens (EOS counted) already emitted, ``chunk`` chunks emitted in all. To resume, the window of
``doc`` is read again, permuted the same way, ``doc`` is re-tokenized and its first ``token`` tokens skipped: nothing
but these four integers is stored, whatever the shuffle window or prefetch depth.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

import numpy as np

# Chunk lengths are drawn this many at a time from one seeded generator (see module docstring).
_LENGTH_BLOCK = 4096
# Documents handed to the tokenizer per call (``encode_many`` runs SentencePiece multi-threaded over the list).
_ENCODE_GROUP = 64
# Tags that keep the generators for window permutations and chunk lengths independent.
_WINDOW_STREAM, _LENGTH_STREAM = 0, 1

Batch = dict[str, np.ndarray]


class DocumentSource(Protocol):
    """This process's share of a corpus, in a fixed order."""

    def read(self, start: int) -> Iterator[str]:
        """Documents ``start, start + 1, ...`` of this process's share (empty when ``start`` is past the end)."""
        ...


@dataclasses.dataclass(frozen=True)
class Position:
    """Where the stream continues (see module docstring). All fields are non-negative integers."""

    epoch: int = 0
    doc: int = 0
    token: int = 0
    chunk: int = 0


@dataclasses.dataclass
class _Document:
    epoch: int
    doc: int
    tokens: np.ndarray  # (num_tokens + 1,) int32, EOS last
    offset: int = 0  # tokens already emitted


class PackedBatches:
    """Batches of packed, left-padded chunks from a :class:`DocumentSource` (see module docstring).

    Args:
        source: this process's documents.
        encode_many: texts -> token ids (no special tokens), e.g. ``Tokenizer.encode_many``.
        eos_id, pad_id: appended after every document; fills the padding of ``input_ids`` and ``labels``.
        batch_size: chunks per batch (this process's share of the global batch).
        max_seq_len: width of every batch.
        min_seq_len: shortest chunk (without the extra label token); None = every chunk has ``max_seq_len`` tokens.
        window_size: documents per shuffle window (also the read-ahead of one source read).
        shuffle: permute each window (training) or keep the source order (evaluation).
        seed, process_index: seed the permutations and chunk lengths.
        repeat: start a new epoch at the end of the data (else stop, dropping the incomplete last batch).
    """

    def __init__(
        self,
        source: DocumentSource,
        encode_many: Callable[[Sequence[str]], Sequence[Sequence[int]]],
        *,
        eos_id: int,
        pad_id: int,
        batch_size: int,
        max_seq_len: int,
        min_seq_len: int | None,
        window_size: int,
        shuffle: bool,
        seed: int,
        process_index: int,
        repeat: bool,
    ) -> None:
        self._source = source
        self._encode_many = encode_many
        self._eos_id = int(eos_id)
        self._pad_id = int(pad_id)
        self._batch_size = batch_size
        self._max_seq_len = max_seq_len
        self._min_seq_len = max_seq_len if min_seq_len is None else min_seq_len
        self._window_size = window_size
        self._shuffle = shuffle
        self._seed = seed
        self._process_index = process_index
        self._repeat = repeat

    # ------------------------------------------------------------------------------------------------ documents

    def _window_order(self, epoch: int, window: int, size: int) -> np.ndarray:
        if not self._shuffle:
            return np.arange(size)
        rng = np.random.default_rng([self._seed, self._process_index, _WINDOW_STREAM, epoch, window])
        return rng.permutation(size)

    def _documents(self, epoch: int, doc: int) -> Iterator[_Document]:
        """Tokenized documents from document ``doc`` of ``epoch`` on, EOS appended, through the following epochs."""
        size = self._window_size
        while True:
            window = doc // size
            reader = self._source.read(window * size)
            num_read = 0
            while texts := list(itertools.islice(reader, size)):
                num_read += len(texts)
                order = self._window_order(epoch, window, len(texts))
                first = doc - window * size if window * size <= doc else 0
                for group in range(first, len(texts), _ENCODE_GROUP):
                    selected = order[group : group + _ENCODE_GROUP]
                    encoded = self._encode_many([texts[i] for i in selected])
                    for k, ids in enumerate(encoded):
                        tokens = np.empty(len(ids) + 1, dtype=np.int32)
                        tokens[:-1] = ids
                        tokens[-1] = self._eos_id
                        yield _Document(epoch, window * size + group + k, tokens)
                window += 1
            if doc == 0 and num_read == 0:
                raise ValueError("the data source has no documents (for this process's share)")
            if not self._repeat:
                return
            epoch, doc = epoch + 1, 0

    # ------------------------------------------------------------------------------------------------ chunks

    def _chunk_lengths(self, chunk: int) -> Iterator[int]:
        """Tokens in chunks ``chunk, chunk + 1, ...``: ``L + 1``, ``L`` uniform in [min_seq_len, max_seq_len]."""
        if self._min_seq_len == self._max_seq_len:
            yield from itertools.repeat(self._max_seq_len + 1)
        block, i = divmod(chunk, _LENGTH_BLOCK)
        while True:
            rng = np.random.default_rng([self._seed, self._process_index, _LENGTH_STREAM, block])
            lengths = rng.integers(self._min_seq_len, self._max_seq_len + 1, size=_LENGTH_BLOCK) + 1
            yield from lengths[i:].tolist()
            block, i = block + 1, 0

    def _batch(self, chunks: list[np.ndarray]) -> Batch:
        """Chunks of ``L + 1`` tokens -> ``input_ids``, ``labels``, ``pad_mask``, each ``(batch, max_seq_len)``."""
        shape = (len(chunks), self._max_seq_len)
        input_ids = np.full(shape, self._pad_id, dtype=np.int32)
        labels = np.full(shape, self._pad_id, dtype=np.int32)
        pad_mask = np.ones(shape, dtype=bool)
        for row, chunk in enumerate(chunks):
            start = self._max_seq_len - (len(chunk) - 1)
            input_ids[row, start:] = chunk[:-1]
            labels[row, start:] = chunk[1:]
            pad_mask[row, start:] = False
        return {"input_ids": input_ids, "labels": labels, "pad_mask": pad_mask}

    def iterate(self, position: Position | None = None) -> Iterator[tuple[Batch, Position]]:
        """Yield ``(batch, position after it)``, starting at ``position`` (one yielded before; None = the start)."""
        position = position or Position()
        documents = self._documents(position.epoch, position.doc)
        pending: deque[_Document] = deque()
        # The stream's read point: the first pending document, or the last consumed one when none is pending.
        cursor: _Document | None = None
        available = 0
        chunk = position.chunk
        chunks: list[np.ndarray] = []
        for length in self._chunk_lengths(chunk):
            while available < length:
                document = next(documents, None)
                if document is None:
                    return
                if cursor is None:  # the first document: skip what was emitted before `position`
                    found = (document.epoch, document.doc, len(document.tokens))
                    if found[:2] != (position.epoch, position.doc) or position.token > found[2]:
                        raise ValueError(
                            f"data position {position} does not match the data: reading from it gave document "
                            f"{found[1]} of epoch {found[0]} with {found[2]} tokens; was the corpus, tokenizer or "
                            "data config changed since the state was saved?"
                        )
                    document.offset = position.token
                    cursor = document
                pending.append(document)
                available += len(document.tokens) - document.offset
            parts = []
            needed = length
            while needed:
                document = pending[0]
                take = min(needed, len(document.tokens) - document.offset)
                parts.append(document.tokens[document.offset : document.offset + take])
                document.offset += take
                needed -= take
                if document.offset == len(document.tokens):
                    cursor = pending.popleft()
            available -= length
            chunk += 1
            chunks.append(np.concatenate(parts))
            if len(chunks) == self._batch_size:
                cursor = pending[0] if pending else cursor
                assert cursor is not None
                yield self._batch(chunks), Position(cursor.epoch, cursor.doc, cursor.offset, chunk)
                chunks = []
