"""``make_dataset``: the training and validation batch iterators, with a resumable, JSON-serialisable state."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import ml_collections
import numpy as np

from perceiver_ar_jax.data.config import check_data_config
from perceiver_ar_jax.data.packing import Batch, PackedBatches, Position
from perceiver_ar_jax.data.sources import TextSource, TfdsSource, hold_out, load_text_documents

# Documents read ahead per source read when the order is not shuffled (evaluation, shuffle_buffer_size <= 1).
_READ_AHEAD = 1024
_STATE_VERSION = 1
_POSITION_KEYS = ("epoch", "doc", "token", "chunk")


class BatchIterator:
    """Iterator of batches (numpy, this process's share of the global batch)::

        input_ids  int32 (batch, max_seq_len)  left-padded with the pad id
        labels     int32 (batch, max_seq_len)  labels[:, i] = the token after input_ids[:, i]; pad id at pads
        pad_mask   bool  (batch, max_seq_len)  True = pad

    ``get_state()`` is a small JSON-serialisable dict: the stream position after the last batch returned (see
    :mod:`perceiver_ar_jax.data.packing`) plus what it is valid for (split, seed, process). ``set_state(state)`` on an
    iterator made with the same data config, tokenizer, split, seed and process continues with exactly the batches
    that followed when the state was taken. Each process has its own state: save one per process.

    With ``prefetch > 0`` a daemon thread prepares batches ahead; the state still counts only the batches returned.
    """

    def __init__(self, stream: PackedBatches, identity: dict[str, Any], prefetch: int) -> None:
        self._stream = stream
        self._identity = dict(identity)
        self._prefetch = prefetch
        self._position = Position()
        self._items: Iterator[tuple[Batch, Position]] | None = None
        self._thread: threading.Thread | None = None
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> Batch:
        if self._prefetch == 0:
            if self._items is None:
                self._items = self._stream.iterate(self._position)
            batch, self._position = next(self._items)
            return batch
        if self._thread is None:
            self._start()
        assert self._queue is not None
        kind, value = self._queue.get()
        if kind == "error":
            self.close()
            raise value
        if kind == "end":
            self._queue.put((kind, value))  # stay exhausted
            raise StopIteration
        batch, self._position = value
        return batch

    def get_state(self) -> dict[str, Any]:
        position = self._position
        return {
            "version": _STATE_VERSION,
            **self._identity,
            **{key: int(getattr(position, key)) for key in _POSITION_KEYS},
        }

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue after the batch at which ``state`` was taken (from ``get_state``, possibly JSON round-tripped)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data state version must be {_STATE_VERSION}, got {state.get('version')!r}")
        for key, value in self._identity.items():
            if state.get(key) != value:
                raise ValueError(
                    f"data state was saved for {key}={state.get(key)!r} but this iterator has {key}={value!r}; "
                    "a data state only resumes the same split, seed and process"
                )
        values = {key: state.get(key) for key in _POSITION_KEYS}
        for key, value in values.items():
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
                raise ValueError(f"data state field {key!r} must be an integer >= 0, got {value!r}")
        self.close()
        self._position = Position(**{key: int(value) for key, value in values.items()})

    def close(self) -> None:
        """Stop the prefetch thread (if any); the iterator can still be used (it restarts at its state)."""
        self._items = None
        if self._thread is not None:
            self._stop.set()
            assert self._queue is not None
            while self._thread.is_alive():
                try:  # unblock a producer waiting for room
                    self._queue.get(timeout=0.05)
                except queue.Empty:
                    pass
            self._thread = None
            self._queue = None

    def __del__(self) -> None:
        self.close()

    def _start(self) -> None:
        self._stop = threading.Event()
        self._queue = queue.Queue(maxsize=self._prefetch)
        self._thread = threading.Thread(
            target=_produce, args=(self._stream, self._position, self._queue, self._stop), daemon=True
        )
        self._thread.start()


def _produce(stream: PackedBatches, position: Position, out: queue.Queue, stop: threading.Event) -> None:
    """Prefetch thread: put ``("batch", (batch, position))`` items, then ``("end", None)`` or ``("error", exc)``."""

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    items = stream.iterate(position)
    try:
        for item in items:
            if not put(("batch", item)):
                return
        put(("end", None))
    except Exception as error:  # handed to the consumer, raised by __next__
        put(("error", error))
    finally:
        items.close()


def make_dataset(
    data_config: ml_collections.ConfigDict,
    tokenizer: Any,
    *,
    split: str,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
    seed: int = 0,
    texts: Sequence[str] | None = None,
    train: bool | None = None,
    repeat: bool = True,
) -> BatchIterator:
    """Batches of packed, left-padded chunks for ``split`` (see :class:`BatchIterator` for what it yields).

    Args:
        data_config: the ``data`` config section (:func:`~perceiver_ar_jax.data.config.data_config_defaults`).
        tokenizer: a :class:`~perceiver_ar_jax.tokenizer.Tokenizer` (``encode_many`` or ``encode``, ``eos_id``,
            ``pad_id``); documents are encoded without special tokens and followed by ``eos_id``.
        split: ``data_config.train_split``, ``data_config.eval_split`` or (source="tfds") another TFDS split spec.
        batch_size: this process's share of the global batch.
        process_index, process_count: this process and how many read the data (``jax.process_index()``,
            ``jax.process_count()``); each reads a disjoint share of the split.
        seed: seeds the shuffle windows and the chunk lengths (training only).
        texts: documents to use instead of ``data_config.text_paths`` (source="text"), e.g. the offline demo's.
        train: training mode (shuffled windows, random chunk lengths) or evaluation (source order, every chunk
            max_seq_len tokens, the same batches every time); default: ``split != data_config.eval_split``.
        repeat: start over at the end of the split (default); else stop, dropping the incomplete last batch.
    """
    check_data_config(data_config)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, {process_count - 1}] and process_count >= 1, "
            f"got process_index={process_index}, process_count={process_count}"
        )
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if train is None:
        train = split != data_config.eval_split
    if texts is not None and data_config.source != "text":
        raise ValueError(f"texts are given, so data.source must be 'text', got {data_config.source!r}")

    if data_config.source == "tfds":
        source: Any = TfdsSource(
            data_config.tfds_name,
            data_config.tfds_version,
            data_config.data_dir,
            split,
            process_index,
            process_count,
            text_key=data_config.tfds_text_key,
        )
    else:
        source = TextSource(_text_documents(data_config, split, texts), process_index, process_count)

    shuffle = train and data_config.shuffle_buffer_size > 1
    stream = PackedBatches(
        source,
        _encoder(tokenizer),
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.pad_id,
        batch_size=batch_size,
        max_seq_len=data_config.max_seq_len,
        min_seq_len=data_config.min_seq_len if train else None,
        window_size=data_config.shuffle_buffer_size if shuffle else _READ_AHEAD,
        shuffle=shuffle,
        seed=seed,
        process_index=process_index,
        repeat=repeat,
    )
    identity = {"split": split, "seed": seed, "process_index": process_index, "process_count": process_count}
    return BatchIterator(stream, identity, prefetch=data_config.prefetch_batches)


def _text_documents(data_config: ml_collections.ConfigDict, split: str, texts: Sequence[str] | None) -> list[str]:
    """The documents of ``split`` of a local text corpus (given texts, or files), held-out part for eval_split."""
    if split not in (data_config.train_split, data_config.eval_split):
        raise ValueError(
            f"split must be data.train_split={data_config.train_split!r} or data.eval_split="
            f"{data_config.eval_split!r} for source='text', got {split!r}"
        )
    separator = data_config.text_doc_separator
    if data_config.eval_text_paths:
        if split == data_config.eval_split:
            return load_text_documents(list(data_config.eval_text_paths), separator)
        return list(texts) if texts is not None else _load_train_paths(data_config)
    documents = list(texts) if texts is not None else _load_train_paths(data_config)
    train_docs, held_out = hold_out(documents, data_config.eval_fraction)
    return held_out if split == data_config.eval_split else train_docs


def _load_train_paths(data_config: ml_collections.ConfigDict) -> list[str]:
    if not data_config.text_paths:
        raise ValueError("data.source is 'text' but data.text_paths is empty (and no texts were given)")
    paths = data_config.text_paths
    return load_text_documents([paths] if isinstance(paths, str) else list(paths), data_config.text_doc_separator)


def _encoder(tokenizer: Any):
    """Texts -> ids without special tokens: ``encode_many`` (one multi-threaded SentencePiece call) or ``encode``."""
    if hasattr(tokenizer, "encode_many"):
        return tokenizer.encode_many
    return lambda texts: [tokenizer.encode(text) for text in texts]
