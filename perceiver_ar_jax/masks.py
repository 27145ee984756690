"""Attention masks of Perceiver AR. True means "may attend"; every mask broadcasts to (batch, heads, queries, keys).

Queries and keys are right-aligned: the last query is the last key's token, so query i (of Nq) sees keys
0 .. i + (Nk - Nq). In the hybrid cross-attention the keys are [prefix, latents] and the queries the latents, so
every latent sees the whole prefix and the latents up to itself. Pad tokens (left padding) are masked as keys only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def causal_mask(num_queries: int, num_keys: int) -> jnp.ndarray:
    """(1, 1, num_queries, num_keys) bool: the right-aligned causal mask."""
    query = jnp.arange(num_queries)[:, None] + (num_keys - num_queries)
    key = jnp.arange(num_keys)[None, :]
    return (key <= query)[None, None]


def key_pad_mask(pad_mask: jnp.ndarray) -> jnp.ndarray:
    """(batch, keys) bool, True = pad  ->  (batch, 1, 1, keys) bool, True = may attend."""
    return ~pad_mask[:, None, None, :]


def cross_attention_mask(num_latents: int, num_keys: int, pad_mask: jnp.ndarray | None) -> jnp.ndarray:
    """Mask of the hybrid layer: causal over [prefix, latents] keys, and pad keys hidden.

    pad_mask: (batch, num_keys) bool, True = pad, or None. Returns (batch or 1, 1, num_latents, num_keys).
    """
    mask = causal_mask(num_latents, num_keys)
    if pad_mask is not None:
        mask = mask & key_pad_mask(pad_mask)
    return mask


def prefix_keep_indices(rng: jax.Array, batch_size: int, prefix_len: int, rate: float) -> jnp.ndarray:
    """Cross-attention dropout: which prefix positions each example keeps, (batch, keep) int32, increasing.

    As perceiver-io, exactly keep = prefix_len - int(prefix_len * rate) positions survive, a uniformly random
    subset per example, kept in their original order (so shapes stay static and causality is unchanged).
    """
    keep = prefix_len - int(prefix_len * rate)
    scores = jax.random.uniform(rng, (batch_size, prefix_len))
    return jnp.sort(jax.lax.top_k(scores, keep)[1], axis=1).astype(jnp.int32)
