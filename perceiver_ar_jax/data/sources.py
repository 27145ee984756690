"""Where documents come from: a prepared TFDS dataset (C4) or local text files, each process reading its own share.

Both sources give this process a contiguous, even share of the split's documents (process ``p`` of ``P`` reads
documents ``[n * p // P, n * (p + 1) // P)``, the split ``tfds.split_for_jax_process`` makes), in a fixed order, and can
start reading at any document of that share (see :class:`~perceiver_ar_jax.data.packing.DocumentSource`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

# Seed of the permutation that picks held-out documents of a text corpus. Fixed, not the training seed: changing the
# training seed must not move documents between the training and validation sets.
_HELD_OUT_SEED = 0


def process_range(num_docs: int, process_index: int, process_count: int) -> tuple[int, int]:
    """``[start, stop)`` of process ``process_index``'s share of ``num_docs`` documents (contiguous, even split)."""
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be in [0, {process_count - 1}] for process_count={process_count}, got {process_index}"
        )
    return num_docs * process_index // process_count, num_docs * (process_index + 1) // process_count


class TextSource:
    """This process's share of documents held in memory (a local corpus)."""

    def __init__(self, documents: Sequence[str], process_index: int, process_count: int) -> None:
        start, stop = process_range(len(documents), process_index, process_count)
        if start == stop:
            raise ValueError(
                f"the text corpus has {len(documents)} documents: too few for process {process_index} of "
                f"{process_count} to get one (need at least {process_count})"
            )
        self._documents = list(documents[start:stop])

    def __len__(self) -> int:
        return len(self._documents)

    def read(self, start: int) -> Iterator[str]:
        return iter(self._documents[start:])


class TfdsSource:
    """This process's share of one split of a prepared TFDS dataset (e.g. ``c4/en:3.1.0``), read in file order.

    Files are read one after another (``interleave_cycle_length=1``), so document ``i`` of the share is the ``i``-th
    record of its absolute range and :meth:`read` can start at any ``i`` with a TFDS read instruction: whole files
    before it are skipped unread, only records within its file are read and dropped.

    Args:
        name: dataset and config, e.g. ``"c4/en"``.
        version: e.g. ``"3.1.0"``.
        data_dir: the TFDS data directory holding the prepared dataset (a ``gs://`` path on TPU VMs); None = TFDS's
            default. The dataset must already be prepared there (C4 is built with Apache Beam; see the README).
        split: a TFDS split spec: ``"train"``, ``"validation"``, ``"train[:10%]"``... (one range).
        text_key: the feature holding the text.
    """

    def __init__(
        self,
        name: str,
        version: str,
        data_dir: str | None,
        split: str,
        process_index: int,
        process_count: int,
        text_key: str = "text",
    ) -> None:
        import tensorflow as tf
        import tensorflow_datasets as tfds

        # tf.data only reads files here; keep TensorFlow off any accelerator JAX is going to use.
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow already initialized its devices; nothing to hide then
            pass
        self._tf, self._tfds = tf, tfds
        self._builder = tfds.builder(f"{name}:{version}", data_dir=data_dir)
        splits = self._builder.info.splits
        if not splits:
            raise FileNotFoundError(
                f"TFDS dataset {name}:{version} is not prepared in data_dir={data_dir!r} (no split information found); "
                "prepare it there first (see the README) or set data.data_dir"
            )
        try:
            (instruction,) = tfds.core.ReadInstruction.from_spec(split).to_absolute(splits)
        except (KeyError, ValueError) as error:
            raise ValueError(
                f"split {split!r} is not a single range of one of the splits {sorted(splits)} of {name}:{version}"
            ) from error
        self._split = instruction.splitname
        first = instruction.from_ or 0
        stop = splits[self._split].num_examples if instruction.to is None else instruction.to
        start, end = process_range(stop - first, process_index, process_count)
        if start == end:
            raise ValueError(
                f"split {split!r} of {name}:{version} has {stop - first} examples: too few for process {process_index} "
                f"of {process_count} to get one"
            )
        self._start, self._stop = first + start, first + end
        self._text_key = text_key

    def __len__(self) -> int:
        return self._stop - self._start

    def read(self, start: int) -> Iterator[str]:
        if self._start + start >= self._stop:
            return
        tfds = self._tfds
        instruction = tfds.core.ReadInstruction(self._split, from_=self._start + start, to=self._stop, unit="abs")
        dataset = self._builder.as_dataset(
            split=instruction,
            shuffle_files=False,
            read_config=tfds.ReadConfig(interleave_cycle_length=1, try_autocache=False),
            decoders=tfds.decode.PartialDecoding({self._text_key: True}),
        )
        key = self._text_key
        dataset = dataset.map(lambda example: example[key]).prefetch(self._tf.data.AUTOTUNE)
        for text in dataset.as_numpy_iterator():
            yield text.decode("utf-8")


def _expand_paths(paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files in the order given; a directory stands for its ``*.txt`` files (recursively, sorted by path)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for item in paths:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise FileNotFoundError(f"text directory {str(path)!r} holds no *.txt files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"text path {str(path)!r} is neither a file nor a directory")
    return files


def load_text_documents(
    paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], separator: str | None = None
) -> list[str]:
    """Documents of UTF-8 text files: one per file, or each file split on ``separator`` (e.g. ``"\\n\\n\\n"``).

    Blank documents (only whitespace) are dropped; the text of a document is kept as it is otherwise.
    """
    if separator == "":
        raise ValueError("text_doc_separator must be None (one document per file) or a non-empty string, got ''")
    documents: list[str] = []
    for path in _expand_paths(paths):
        text = path.read_text(encoding="utf-8")
        parts = [text] if separator is None else text.split(separator)
        documents.extend(part for part in parts if part.strip())
    return documents


def hold_out(documents: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Split ``documents`` into ``(train, held_out)``: ``max(1, round(fraction * n))`` documents chosen by a fixed
    seeded permutation, both parts kept in corpus order."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1) to hold out validation documents, got {fraction}")
    num_held_out = max(1, round(fraction * len(documents)))
    if num_held_out >= len(documents):
        raise ValueError(
            f"cannot hold out {num_held_out} of {len(documents)} documents (eval_fraction={fraction}) and keep some "
            "for training: add documents, set data.text_doc_separator, or give data.eval_text_paths"
        )
    held = np.zeros(len(documents), dtype=bool)
    held[np.random.default_rng(_HELD_OUT_SEED).permutation(len(documents))[:num_held_out]] = True
    train = [doc for doc, h in zip(documents, held, strict=True) if not h]
    return train, [doc for doc, h in zip(documents, held, strict=True) if h]
