"""What an evaluation measures: per-document losses, totals, and the loss of tokens grouped by their context.

Losses are cross-entropies in nats, summed in float64. perplexity = e^loss, bits per token = loss / ln 2, bits
per byte = summed loss / ln 2 / the UTF-8 bytes of the scored texts (known when texts, not ids, were scored, and
every token of them was scored: the documents had a context token before them).

Context buckets: a token whose prediction saw c tokens (1 <= c <= window) falls in bucket ceil(log2 c), that is
1, 2, 3-4, 5-8, ..., 513-1024: with the default stride the tokens after the first window all fall in the top one.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np

LN2 = math.log(2.0)


def context_bucket(context: np.ndarray) -> np.ndarray:
    """ceil(log2(context)) for contexts >= 1 (exact for integers, no float rounding)."""
    context = np.asarray(context, np.int64)
    return np.where(context <= 1, 0, np.floor(np.log2(np.maximum(context - 1, 1))).astype(np.int64) + 1)


def bucket_range(bucket: int) -> tuple[int, int]:
    """Smallest and largest context of a bucket: 0 -> (1, 1), 1 -> (2, 2), 2 -> (3, 4), 3 -> (5, 8), ..."""
    return (1, 1) if bucket == 0 else (2 ** (bucket - 1) + 1, 2**bucket)


def summary(loss_sum: float, num_tokens: int, num_bytes: int | None = None) -> dict[str, float | None]:
    """Summed loss (nats) over tokens (and bytes) -> loss, perplexity, bits/token, bits/byte (None if no bytes)."""
    loss = loss_sum / num_tokens if num_tokens else float("nan")
    return {
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)) if num_tokens else float("nan"),
        "bits_per_token": loss / LN2,
        "bits_per_byte": loss_sum / LN2 / num_bytes if num_bytes else None,
    }


@dataclasses.dataclass
class DocumentScore:
    """One document: `num_tokens` scored tokens, their summed loss, and (keep_token_losses) each token's loss and
    context in document order. num_bytes: UTF-8 bytes of its text, None for ids or when its first token was not
    scored."""

    index: int
    num_tokens: int
    num_bytes: int | None
    loss_sum: float = 0.0
    token_losses: np.ndarray | None = None  # (num_tokens,) float32
    token_contexts: np.ndarray | None = None  # (num_tokens,) int32

    @property
    def loss(self) -> float:
        return self.loss_sum / self.num_tokens if self.num_tokens else float("nan")

    @property
    def loglikelihood(self) -> float:
        """Sum of log p(token): what a harness's rolling loglikelihood asks for (= -loss_sum)."""
        return -self.loss_sum


@dataclasses.dataclass
class EvaluationResult:
    """Totals over all documents (of all processes), the context buckets and the documents' scores."""

    documents: list[DocumentScore]
    bucket_loss_sums: np.ndarray  # (num_buckets,) float64, summed loss of the tokens in each context bucket
    bucket_tokens: np.ndarray  # (num_buckets,) int64
    window: int
    num_latents: int
    stride: int
    seconds: float = 0.0

    @property
    def num_tokens(self) -> int:
        return int(sum(d.num_tokens for d in self.documents))

    @property
    def loss_sum(self) -> float:
        return float(math.fsum(d.loss_sum for d in self.documents))

    @property
    def num_bytes(self) -> int | None:
        sizes = [d.num_bytes for d in self.documents]
        return None if not sizes or any(s is None for s in sizes) else int(sum(sizes))

    def metrics(self) -> dict[str, float | None]:
        return summary(self.loss_sum, self.num_tokens, self.num_bytes)

    def buckets(self) -> list[dict[str, Any]]:
        """Non-empty context buckets: context range, tokens, mean loss, bits per token."""
        rows = []
        for b, (tokens, loss_sum) in enumerate(zip(self.bucket_tokens, self.bucket_loss_sums, strict=True)):
            if tokens:
                lo, hi = bucket_range(b)
                rows.append({"context_min": lo, "context_max": hi, "tokens": int(tokens),
                             "loss": float(loss_sum / tokens), "bits_per_token": float(loss_sum / tokens / LN2)})
        return rows

    def to_json(self) -> dict[str, Any]:
        """Figures, context buckets and per-document losses (not the per-token ones) as JSON-ready values."""
        tokens_per_s = self.num_tokens / self.seconds if self.seconds else None
        return {
            "documents": len(self.documents), "tokens": self.num_tokens, "bytes": self.num_bytes,
            **self.metrics(), "loss_sum": self.loss_sum,
            "window": self.window, "num_latents": self.num_latents, "stride": self.stride,
            "seconds": self.seconds, "tokens_per_s": tokens_per_s,
            "context_buckets": self.buckets(),
            "per_document": [{"index": d.index, "tokens": d.num_tokens, "bytes": d.num_bytes,
                              "loss": d.loss if d.num_tokens else None, "loss_sum": d.loss_sum}
                             for d in self.documents],
        }


class Accumulator:
    """Adds each batch's per-latent losses to its documents and to the context buckets."""

    def __init__(self, window: int, keep_token_losses: bool):
        self.keep_token_losses = keep_token_losses
        num_buckets = int(context_bucket(np.array([window]))[0]) + 1
        self.bucket_loss_sums = np.zeros(num_buckets, np.float64)
        self.bucket_tokens = np.zeros(num_buckets, np.int64)

    def start(self, document: DocumentScore) -> None:
        if self.keep_token_losses:
            document.token_losses = np.zeros(document.num_tokens, np.float32)
            document.token_contexts = np.zeros(document.num_tokens, np.int32)

    def add(self, documents: list[DocumentScore | None], first: np.ndarray, weights: np.ndarray,
            context: np.ndarray, losses: np.ndarray) -> int:
        """Rows of one batch: their documents (None = filler row), first scored position, weights (R, n),
        contexts (R, n) and losses (R, n). Returns the number of tokens scored."""
        scored = losses[weights].astype(np.float64)
        buckets = context_bucket(context[weights])
        self.bucket_loss_sums += np.bincount(buckets, scored, minlength=len(self.bucket_loss_sums))
        self.bucket_tokens += np.bincount(buckets, minlength=len(self.bucket_tokens))
        for r, document in enumerate(documents):
            if document is None:
                continue
            row_losses = losses[r][weights[r]]
            document.loss_sum += float(np.sum(row_losses, dtype=np.float64))
            if self.keep_token_losses:
                span = slice(int(first[r]), int(first[r]) + len(row_losses))
                document.token_losses[span] = row_losses
                document.token_contexts[span] = context[r][weights[r]]
        return int(weights.sum())
