"""Attention masks of Perceiver AR. True means "may attend"; every mask broadcasts to (batch, heads, queries, keys).

Queries and keys are right-aligned: the last query is the last key's token, so query i (of Nq) sees keys
0 .. i + (Nk - Nq). In the hybrid cross-attention the keys are [prefix, latents] and the queries the latents, so
every latent sees the whole prefix and the latents up to itself. Pad tokens (left padding) are masked as keys only.

A full forward pass hands its attentions an `AttentionMask`: right-aligned causal or not, and which keys are
padding. That is all the attention kernels implement (splash: `CausalMask(offset)` + segment ids; cuDNN: its
causal mask or a bias), so each builds its own form from it; a bool array mask (any pattern) only ever reaches
the dense and blockwise paths.

Decoding keeps keys in ring buffers (`sampling/cache.py`): there a key's place says nothing of its token's order,
so its masks compare token indices (`ring_causal_mask`) and say which slots hold keys of the window
(`visible_keys`). They are bool arrays.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class AttentionMask:
    """The mask of a full forward pass's attention: right-aligned causal (query i of Nq sees keys 0 .. i + Nk - Nq)
    if `causal`, AND pad keys hidden.

    num_queries, num_keys, causal: static; key_pad: (batch, num_keys) bool, True = pad, or None.
    """

    num_queries: int = flax.struct.field(pytree_node=False)
    num_keys: int = flax.struct.field(pytree_node=False)
    causal: bool = flax.struct.field(pytree_node=False)
    key_pad: jnp.ndarray | None = None

    def array(self) -> jnp.ndarray | None:
        """The same mask as bool (batch or 1, 1, queries, keys), True = may attend; None if nothing is masked."""
        mask = causal_mask(self.num_queries, self.num_keys) if self.causal else None
        if self.key_pad is not None:
            pad = key_pad_mask(self.key_pad)
            mask = pad if mask is None else mask & pad
        return mask

    def split_keys(self, prefix_len: int) -> tuple[jnp.ndarray | None, AttentionMask]:
        """Hybrid layer, keys [prefix, latents] with num_queries latents: (the prefix columns as (batch, 1, 1,
        prefix) bool or None: every latent sees the same prefix keys; the latent columns as an AttentionMask)."""
        if self.num_keys - prefix_len != self.num_queries:
            raise ValueError(f"split_keys({prefix_len}) needs the keys to be [prefix, queries], got "
                             f"{self.num_keys} keys for {self.num_queries} queries")
        pad = self.key_pad
        prefix = None if pad is None else key_pad_mask(pad[:, :prefix_len])
        return prefix, AttentionMask(self.num_queries, self.num_queries, self.causal,
                                     None if pad is None else pad[:, prefix_len:])

    def no_visible_key(self) -> jnp.ndarray | None:
        """(batch, queries or 1) bool: queries that see no key at all (perceiver-io has them attend uniformly to
        every key), or None if there can be none."""
        if self.key_pad is None:
            return None  # with causality a query sees at least key 0; without it, all keys
        visible = ~self.key_pad
        if not self.causal:
            return ~jnp.any(visible, axis=1, keepdims=True)
        # query i sees keys 0 .. i + offset: none visible when all of them are padding
        return jnp.cumsum(visible, axis=1)[:, self.num_keys - self.num_queries:] == 0


# what the attention paths take: a structured mask, a bool array broadcastable to (batch, heads, queries, keys)
# (True = may attend), or None
Mask = AttentionMask | jnp.ndarray | None


def mask_array(mask: Mask) -> jnp.ndarray | None:
    """Any Mask as a bool array (or None): what the dense and blockwise paths read."""
    return mask.array() if isinstance(mask, AttentionMask) else mask


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


def visible_keys(visible: jnp.ndarray) -> jnp.ndarray:
    """(keys,) or (batch, keys) bool, True = a key every query may see -> (1 or batch, 1, 1, keys)."""
    return visible.reshape((-1, 1, 1, visible.shape[-1]))


def ring_causal_mask(query_index: jnp.ndarray, slot_index: jnp.ndarray, visible: jnp.ndarray) -> jnp.ndarray:
    """A ring cache's causal mask: a query sees the visible slots that hold its own token or an earlier one.

    query_index (queries,) and slot_index (slots,) int: token indices of the queries and of what each slot
    holds; visible (slots,) or (batch, slots) bool. Returns (batch or 1, 1, queries, slots).
    """
    causal = slot_index[None, :] <= query_index[:, None]
    return visible_keys(visible) & causal[None, None]


def uniform_where_no_key(q: jnp.ndarray, mask: jnp.ndarray, fallback: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """perceiver-io's rule for a query that sees no key (a pad latent): it averages uniformly over ALL keys.

    A fully masked row of scores becomes uniform in dense attention too, but over every key it is given; in a
    cache those include bucket pads and stale slots. Here such a row gets a zero query (all scores 0) and sees
    the `fallback` keys (those of the window), which is the same uniform average over the same keys as
    perceiver-io's. q (batch, queries, heads, head_dim); mask (batch, 1, queries, keys); fallback broadcastable to
    the mask. Returns (q, mask).
    """
    sees_a_key = jnp.any(mask, axis=-1, keepdims=True)  # (batch, 1, queries, 1)
    q = jnp.where(jnp.swapaxes(sees_a_key, 1, 2), q, jnp.zeros_like(q))
    return q, jnp.where(sees_a_key, mask, fallback)


def prefix_keep_indices(rng: jax.Array, batch_size: int, prefix_len: int, rate: float) -> jnp.ndarray:
    """Cross-attention dropout: which prefix positions each example keeps, (batch, keep) int32, increasing.

    As perceiver-io, exactly keep = prefix_len - int(prefix_len * rate) positions survive, a uniformly random
    subset per example, kept in their original order (so shapes stay static and causality is unchanged).
    """
    keep = prefix_len - int(prefix_len * rate)
    scores = jax.random.uniform(rng, (batch_size, prefix_len))
    return jnp.sort(jax.lax.top_k(scores, keep)[1], axis=1).astype(jnp.int32)
