"""Documents -> their windows (windows.py) -> batches of a fixed number of rows, documents packed together.

The windows of consecutive documents fill the rows of a batch one after another, so short documents share a
batch and a long one spreads over several; the last batch is completed with filler rows that score nothing. Each
row remembers its document and the first position it scores, so the losses can be put back in document order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np

from perceiver_ar_jax.evaluation.results import DocumentScore
from perceiver_ar_jax.evaluation.windows import Rows, WindowSpec, first_scored_positions, make_rows, window_ends


@dataclasses.dataclass
class Batch:
    """`rows` (batch_size rows) and, per row, its document (None for a filler row) and first scored position."""

    rows: Rows
    documents: list[DocumentScore | None]
    first: np.ndarray  # (batch_size,) int64


def batches(documents: Iterable[tuple[DocumentScore, np.ndarray]], spec: WindowSpec, batch_size: int,
            pad_id: int) -> Iterator[Batch]:
    """Batches of the windows of (document, tokens) pairs, in order. tokens: the T + 1 ids (context token
    first) whose T input positions are scored (document.num_tokens == T)."""
    parts: list[tuple[DocumentScore, Rows, np.ndarray]] = []
    filled = 0
    for document, tokens in documents:
        num_positions = len(tokens) - 1
        if num_positions < 1:
            continue
        ends = window_ends(num_positions, spec)
        # a long document (stride 1 gives one window per token) is cut into pieces that fit the batch
        start = 0
        while start < len(ends):
            take = min(batch_size - filled, len(ends) - start)
            piece = ends[start:start + take]
            parts.append((document, make_rows(tokens, piece, spec, pad_id), first_scored_positions(piece, spec)))
            filled += take
            start += take
            if filled == batch_size:
                yield _assemble(parts, spec, batch_size, pad_id)
                parts, filled = [], 0
    if parts:
        yield _assemble(parts, spec, batch_size, pad_id)


def _assemble(parts: list[tuple[DocumentScore, Rows, np.ndarray]], spec: WindowSpec, batch_size: int,
              pad_id: int) -> Batch:
    """Stack the pieces and fill up to batch_size rows with rows that score nothing."""
    filled = sum(len(rows) for _, rows, _ in parts)
    missing = batch_size - filled
    w, n = spec.window, spec.num_latents
    fields = {}
    for field, shape, dtype, value in (("input_ids", (missing, w), np.int32, pad_id),
                                       ("pad_mask", (missing, w), bool, False),
                                       ("labels", (missing, n), np.int32, pad_id),
                                       ("weights", (missing, n), bool, False),
                                       ("context", (missing, n), np.int32, 0)):
        fields[field] = np.concatenate([getattr(rows, field) for _, rows, _ in parts] + [np.full(shape, value, dtype)])
    documents: list[DocumentScore | None] = [doc for doc, rows, _ in parts for _ in range(len(rows))]
    first = np.concatenate([f for _, _, f in parts] + [np.zeros(missing, np.int64)])
    return Batch(Rows(**fields), documents + [None] * missing, first)
