"""How the next token is chosen from the logits: greedy, or a sample after temperature, top-k and top-p, in
Hugging Face's order. Pure functions of (logits, key), so a step's choice is reproducible from its key."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Sampler(NamedTuple):
    """The static part of the sampling settings (each combination is compiled once)."""

    do_sample: bool
    top_k: int | None  # keep the top_k most likely tokens (None: all)
    use_top_p: bool  # nucleus filtering with SamplingArgs.top_p


class SamplingArgs(NamedTuple):
    """The traced part of the sampling settings (changing them does not recompile)."""

    temperature: jnp.ndarray  # float32 scalar
    top_p: jnp.ndarray  # float32 scalar
    eos_token_id: jnp.ndarray  # int32 scalar, -1 = none
    pad_token_id: jnp.ndarray  # int32 scalar, written after a row's EOS


def nucleus_filter(sorted_logits: jnp.ndarray, top_p: jnp.ndarray) -> jnp.ndarray:
    """Top-p on logits sorted in decreasing order (batch, n): -inf outside the smallest set of most likely tokens
    whose probability reaches top_p, as transformers' TopPLogitsWarper (at least one token is kept)."""
    ascending = jnp.flip(sorted_logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = (cumulative <= 1.0 - top_p).at[:, -1].set(False)  # the most likely token always stays
    return jnp.where(jnp.flip(remove, axis=-1), -jnp.inf, sorted_logits)


def first_argmax(x: jnp.ndarray) -> jnp.ndarray:
    """`jnp.argmax(x, axis=-1)` (the first of tied maxima) as two plain reductions: (batch, n) -> (batch,) int32.

    XLA:CPU runs argmax's (value, index) reduction unvectorised, ten times slower over a 32k vocabulary.
    """
    best = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.min(jnp.where(x == best, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)
    return jnp.minimum(index, x.shape[-1] - 1)  # a row of NaN has no maximum: take the last index


def next_token(logits: jnp.ndarray, key: jax.Array, sampler: Sampler, args: SamplingArgs) -> jnp.ndarray:
    """(batch, vocab) float32 logits -> (batch,) int32 tokens: argmax, or a sample after temperature, top-k, top-p."""
    if not sampler.do_sample:
        return first_argmax(logits)
    logits = logits / args.temperature
    vocab_size = logits.shape[-1]
    indices = None
    if sampler.top_k is not None and sampler.top_k < vocab_size:
        logits, indices = jax.lax.top_k(logits, sampler.top_k)  # sorted, decreasing
    elif sampler.use_top_p:
        logits, indices = jax.lax.top_k(logits, vocab_size)
    if sampler.use_top_p:
        logits = nucleus_filter(logits, args.top_p)
    choice = first_argmax(logits + jax.random.gumbel(key, logits.shape))  # Gumbel-max: a softmax(logits) sample
    if indices is None:
        return choice
    return jnp.take_along_axis(indices, choice[:, None], axis=1)[:, 0].astype(jnp.int32)
