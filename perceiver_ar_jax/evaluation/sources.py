"""The documents the command line scores: local text files, or one split of a prepared TFDS dataset, each
process reading its own contiguous share (as training's input pipeline does)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

import jax

from perceiver_ar_jax.data import TextSource, TfdsSource, hold_out, load_text_documents


@dataclasses.dataclass
class Documents:
    """This process's texts (a list for text files: tokenized up front; a stream for TFDS), how many there are
    in all (None if unknown), and what was read, for the JSON."""

    texts: Iterable[str]
    count: int | None
    description: dict[str, Any]


def text_documents(paths: Sequence[str], separator: str | None = None, held_out: float | None = None,
                   max_documents: int | None = None) -> Documents:
    """Files or directories (their *.txt files): one document per file, or per `separator`-separated part.
    held_out: keep only the documents that training holds out for validation with data.eval_fraction=held_out
    (the same fixed choice). Blank documents are dropped; ValueError if no text is left."""
    documents = load_text_documents(list(paths), separator)  # FileNotFoundError names a missing path
    if not documents:
        raise ValueError(f"--text_file {','.join(paths)}: no text to score (the files are empty or blank)")
    if held_out is not None:
        documents = hold_out(documents, held_out)[1]
    if max_documents is not None:
        documents = documents[:max_documents]
    share = list(TextSource(documents, jax.process_index(), jax.process_count()).read(0))
    return Documents(share, len(documents), {"text_files": list(paths), "text_doc_separator": separator,
                                             "held_out": held_out})


def tfds_documents(name_version: str, split: str, data_dir: str | None, text_key: str = "text",
                   max_documents: int | None = None) -> Documents:
    """`c4/en:3.1.0`'s `split` from a prepared data_dir, read in file order (first max_documents only)."""
    name, sep, version = name_version.rpartition(":")
    if not sep or not name or not version:
        raise ValueError(f"--tfds {name_version!r} is not NAME:VERSION, e.g. c4/en:3.1.0")
    if max_documents is not None:
        split = _first(split, max_documents)
    source = TfdsSource(name, version, data_dir, split, jax.process_index(), jax.process_count(), text_key)
    total = len(source) * jax.process_count()  # near enough for a progress bar; shares differ by at most one
    return Documents(source.read(0), total,
                     {"tfds": name_version, "split": split, "data_dir": data_dir})


def _first(split: str, count: int) -> str:
    """The first `count` documents of a split spec: "validation" -> "validation[:count]"."""
    if "[" in split:
        raise ValueError(f"--max_documents works on a whole split, not on {split!r}: give --split without a range")
    return f"{split}[:{count}]"
