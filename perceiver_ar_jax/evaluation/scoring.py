"""`evaluate`: the loss of every token of long documents, each scored once with as much context as the model
allows (the windows of windows.py), batched, compiled once and sharded over the mesh.

    result = evaluate(model, params, ["a long text", ...], tokenizer=tokenizer)
    result.metrics()                    # loss, perplexity, bits_per_token, bits_per_byte
    result.documents[0].loglikelihood   # sum of log p(token): a rolling-loglikelihood backend
    result.documents[0].token_losses    # (tokens,) each token's loss, in order

Each document is scored after a context token (`bos_id`, default the tokenizer's `</s>`): training streams put
`</s>` between documents, so the model has learned what starts a document, and all of a document's tokens are
scored (the context token itself is not). With `bos_id=None` a document's first token is context only.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from perceiver_ar_jax.evaluation.batches import batches
from perceiver_ar_jax.evaluation.results import Accumulator, DocumentScore, EvaluationResult
from perceiver_ar_jax.evaluation.step import WindowScorer
from perceiver_ar_jax.evaluation.windows import WindowSpec
from perceiver_ar_jax.model import CausalLanguageModel

# Texts handed to the tokenizer per call when documents are streamed (encode_many runs SentencePiece threaded).
_ENCODE_GROUP = 64


@dataclasses.dataclass(frozen=True)
class Progress:
    """Where a running evaluation is: tokens and documents scored so far, of the totals when known."""

    tokens: int
    total_tokens: int | None
    documents: int
    total_documents: int | None
    seconds: float


def evaluate(
    model: CausalLanguageModel,
    params: Any,
    documents: Iterable[str] | Iterable[Sequence[int]],
    *,
    tokenizer: Any = None,
    num_latents: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    bos_id: int | str | None = "eos",
    mesh: Mesh | None = None,
    keep_token_losses: bool = True,
    num_documents: int | None = None,
    progress: Callable[[Progress], None] | None = None,
) -> EvaluationResult:
    """Score every token of every document once (see windows.py for which window scores which token).

    documents: texts (needs `tokenizer`) or token ids; a list is tokenized up front (the progress then knows the
        total tokens), any other iterable as it is read (give num_documents for the progress's total).
    num_latents: latents per window, in [1, max_latents] (default max_latents); the window is max_seq_len -
        max_latents + num_latents tokens. stride: tokens scored per window after the first, in [1, num_latents]
        (default num_latents); smaller gives each token more context and costs more windows.
    batch_size: windows per step over all processes, a multiple of the devices the batch is split over.
    bos_id: the context token before each document: "eos" (the tokenizer's), an id, or None (none: the first
        token is not scored, and bits per byte is not given).
    mesh: default the training job's (all devices on fsdp). With several processes each passes its own share of
        the documents; the result holds every process's documents (token losses of its own only).
    progress: called after every batch.
    """
    config = model.config
    spec = WindowSpec.for_model(config.max_seq_len, config.max_latents, num_latents, stride)
    bos = _context_token(bos_id, tokenizer)
    pad_id = 0 if tokenizer is None else tokenizer.pad_id  # what pads hold never matters: masked or unseen
    accumulator = Accumulator(spec.window, keep_token_losses)
    scored: list[DocumentScore] = []
    prepared: Iterable[tuple[DocumentScore, np.ndarray]]
    if isinstance(documents, Sequence) and not isinstance(documents, str):
        prepared = list(_prepare(documents, tokenizer, bos, config.vocab_size))
        total_tokens = sum(d.num_tokens for d, _ in prepared)
        num_documents = len(prepared)
        if total_tokens == 0 and jax.process_count() == 1:
            raise ValueError(_nothing_to_score(num_documents))
    else:
        prepared, total_tokens = _prepare(documents, tokenizer, bos, config.vocab_size), None

    def track(pairs):
        for document, tokens in pairs:
            accumulator.start(document)
            scored.append(document)
            yield document, tokens

    scorer = WindowScorer(model, params, spec, batch_size, mesh)
    start, done_tokens = time.perf_counter(), 0
    for batch, losses in scorer.run(batches(track(prepared), spec, scorer.local_batch_size, pad_id)):
        done_tokens += accumulator.add(batch.documents, batch.first, batch.rows.weights, batch.rows.context,
                                       losses)
        if progress is not None:
            progress(Progress(done_tokens, total_tokens, _documents_done(batch), num_documents,
                              time.perf_counter() - start))
    result = EvaluationResult(scored, accumulator.bucket_loss_sums, accumulator.bucket_tokens, spec.window,
                              spec.num_latents, spec.stride, seconds=time.perf_counter() - start)
    if jax.process_count() > 1:
        result = _gather(result)
    if result.num_tokens == 0:
        raise ValueError(_nothing_to_score(len(result.documents)))
    return result


def _context_token(bos_id: int | str | None, tokenizer: Any) -> int | None:
    if bos_id == "eos":
        if tokenizer is None:
            raise ValueError("bos_id='eos' needs a tokenizer: give the context token's id as bos_id, or "
                             "bos_id=None to leave each document's first token unscored")
        return int(tokenizer.eos_id)
    if bos_id is None or isinstance(bos_id, (int, np.integer)):
        return bos_id
    raise ValueError(f"bos_id={bos_id!r} is out of range: must be 'eos', a token id or None")


def _prepare(documents: Iterable[Any], tokenizer: Any, bos: int | None,
             vocab_size: int) -> Iterator[tuple[DocumentScore, np.ndarray]]:
    """(DocumentScore, tokens) per document: the context token (if any) and the document's ids."""
    index = itertools.count()
    iterator = iter(documents)
    while group := list(itertools.islice(iterator, _ENCODE_GROUP)):
        texts = [d for d in group if isinstance(d, str)]
        if texts and tokenizer is None:
            raise ValueError("documents are texts: give the tokenizer (tokenizer=...) or token ids")
        encoded = iter(tokenizer.encode_many(texts) if texts else [])
        for document in group:
            is_text = isinstance(document, str)
            ids = np.asarray(next(encoded) if is_text else document, np.int64).reshape(-1)
            i = next(index)
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                bad = ids[(ids < 0) | (ids >= vocab_size)][0]
                raise ValueError(f"document {i}: token id {bad} is out of range: must be in [0, {vocab_size}) "
                                 "(the model's vocab_size)")
            tokens = ids if bos is None else np.concatenate([[bos], ids])
            num_bytes = len(document.encode("utf-8")) if is_text and bos is not None else None
            yield DocumentScore(i, max(len(tokens) - 1, 0), num_bytes), tokens.astype(np.int32)


def _documents_done(batch) -> int:
    """Documents whose every token is scored once this batch is: all before the batch's last document, and
    that one too if its last row is here."""
    rows = [r for r, d in enumerate(batch.documents) if d is not None]
    if not rows:
        return 0
    last = batch.documents[rows[-1]]
    complete = batch.first[rows[-1]] + batch.rows.weights[rows[-1]].sum() == last.num_tokens
    return last.index + int(complete)


def _nothing_to_score(num_documents: int) -> str:
    return (f"nothing to score: the {num_documents} document(s) have no token after their first (is the text "
            "empty?)")


def _gather(result: EvaluationResult) -> EvaluationResult:
    """Every process's documents (in process order) and the summed context buckets, on every process."""
    mine = np.array([[d.num_tokens, -1 if d.num_bytes is None else d.num_bytes] for d in result.documents],
                    np.int64).reshape(-1, 2)
    sums = np.array([d.loss_sum for d in result.documents], np.float64)
    counts = multihost_utils.process_allgather(np.array(len(mine)))
    width = int(counts.max())
    all_ints = multihost_utils.process_allgather(np.pad(mine, ((0, width - len(mine)), (0, 0))))
    all_sums = multihost_utils.process_allgather(np.pad(sums, (0, width - len(sums))))
    documents = []
    for p, count in enumerate(counts):
        for i in range(int(count)):
            if p == jax.process_index():
                own = result.documents[i]
                documents.append(dataclasses.replace(own, index=len(documents)))
                continue
            tokens, num_bytes = (int(v) for v in all_ints[p, i])
            documents.append(DocumentScore(len(documents), tokens, None if num_bytes < 0 else num_bytes,
                                           float(all_sums[p, i])))
    bucket_sums = multihost_utils.process_allgather(result.bucket_loss_sums).sum(axis=0)
    bucket_tokens = multihost_utils.process_allgather(result.bucket_tokens).sum(axis=0)
    return dataclasses.replace(result, documents=documents, bucket_loss_sums=bucket_sums,
                               bucket_tokens=bucket_tokens)
