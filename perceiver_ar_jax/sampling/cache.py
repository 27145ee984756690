"""Decoding's key/value caches: ring buffers over the last tokens, and the positions of the tokens they hold.

Indexing. A prompt of S user tokens is left-padded to a bucket of Sb tokens (Sb - S = `offset` bucket pads). Token
number r of the bucketed sequence (prompt, then generated tokens) is user token g = r - offset; bucket pads have
g < 0 and are invisible: masked as keys, never latents, not counted in positions or in the window. The
cross-attention caches are rings over the last max_seq_len tokens (slot r % max_seq_len), the self-attention
caches rings over the last max_latents tokens (slot r % max_latents). Keys are stored (batch, heads, head_dim,
slots) and values (batch, heads, slots, head_dim), the layouts the two matrix products of a few queries read
without a transpose; a step reads the caches before it writes its own key/value, so the update happens in place.

Window and positions, as perceiver-io: after n user tokens the model sees the last W = min(n, max_seq_len) of them
(user pad tokens included; the "windowed" cache mode sees a shorter window that it resets now and then, see
`steps.window_forward`); a token's position is its index in that window minus the number of user pads in the
window, clamped at 0. The absolute position embedding uses these positions. Rotary embedding only sees position
differences: while user pads are left in the window, window start + pads in it = the prompt's pads, so every
position is max(0, g - prompt pads); once they have all left, all positions move down together as the window
slides. So keys are rotated once, when cached, with max(0, g - prompt pads): the window's own positions until then,
the same differences after. (These angles keep growing past max_seq_len, so float32 rounding of the angles grows
with the generated length; it stays below 1e-3 radians for 10^4 tokens.)
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from perceiver_ar_jax import backend
from perceiver_ar_jax.model import CausalLanguageModelConfig
from perceiver_ar_jax.model.attention import CachedKeysValues


class KVCache(NamedTuple):
    """Static-shape decoding caches (a pytree). L = max_seq_len, K = max_latents; keys are stored rotated."""

    cross_k: jnp.ndarray  # (batch, heads, head_dim, L) hybrid-layer keys of the last L tokens
    cross_v: jnp.ndarray  # (batch, heads, L, head_dim)
    self_k: tuple[jnp.ndarray, ...]  # per self-attention layer: keys (batch, heads, head_dim, K)
    self_v: tuple[jnp.ndarray, ...]  # values (batch, heads, K, head_dim)
    token_ids: jnp.ndarray  # (batch, L) int32 ids of the last L tokens (for recomputation in exact mode)
    pad: jnp.ndarray  # (batch, L) bool, True = user pad token (attention_mask 0)
    prompt_pads: jnp.ndarray  # (batch, 1) int32 user pads of the prompt (rotary positions count from them)

    def cross(self, mask: jnp.ndarray, uniform_over: jnp.ndarray | None = None) -> CachedKeysValues:
        """The hybrid layer's cache as attention keys, with a mask over its L slots."""
        return CachedKeysValues(self.cross_k, self.cross_v, mask, uniform_over)

    def self_attention(self, layer: int, mask: jnp.ndarray) -> CachedKeysValues:
        """Self-attention layer `layer`'s cache as attention keys, with a mask over its K slots."""
        return CachedKeysValues(self.self_k[layer], self.self_v[layer], mask)


def init_cache(config: CausalLanguageModelConfig, batch_size: int) -> KVCache:
    """Zero caches for `batch_size` rows, in `backend.decode_cache_dtype`."""
    dtype = backend.decode_cache_dtype(config.dtype)
    L, K = config.max_seq_len, config.max_latents
    keys = lambda n: jnp.zeros((batch_size, config.num_heads, config.head_dim, n), dtype)  # noqa: E731
    values = lambda n: jnp.zeros((batch_size, config.num_heads, n, config.head_dim), dtype)  # noqa: E731
    layers = range(config.num_self_attention_layers)
    return KVCache(
        cross_k=keys(L), cross_v=values(L),
        self_k=tuple(keys(K) for _ in layers), self_v=tuple(values(K) for _ in layers),
        token_ids=jnp.zeros((batch_size, L), jnp.int32), pad=jnp.ones((batch_size, L), bool),
        prompt_pads=jnp.zeros((batch_size, 1), jnp.int32))


def slot_tokens(last: jnp.ndarray, size: int) -> jnp.ndarray:
    """(size,) int32: the bucketed index r held by each ring slot, once token `last` has been written.

    Slot s holds the latest r <= last with r % size == s, i.e. the last `size` tokens; negative r: never written.
    """
    return last - jnp.mod(last - jnp.arange(size, dtype=jnp.int32), size)


def positions_in_window(user_index: jnp.ndarray, window_start: jnp.ndarray, window_pads: jnp.ndarray) -> jnp.ndarray:
    """perceiver-io's positions of user tokens `user_index` in a window that starts at user token window_start and
    holds window_pads (batch, 1) user pads: index in the window minus window_pads, clamped at 0."""
    return jnp.maximum(user_index - window_start - window_pads, 0)


def window_positions(user_index: jnp.ndarray, num_tokens: jnp.ndarray, window_pads: jnp.ndarray,
                     max_seq_len: int) -> jnp.ndarray:
    """`positions_in_window` for perceiver-io's window after num_tokens user tokens: the last max_seq_len."""
    return positions_in_window(user_index, jnp.maximum(num_tokens - max_seq_len, 0), window_pads)


def rotary_positions(user_index: jnp.ndarray, prompt_pads: jnp.ndarray) -> jnp.ndarray:
    """Positions for the rotary embedding of cached keys and of queries (module docstring): max(0, g - pads)."""
    return jnp.maximum(user_index - prompt_pads, 0)


def write(ring: jnp.ndarray, tokens: jnp.ndarray, slot: jnp.ndarray | int, kind: str) -> jnp.ndarray:
    """Write keys or values (batch, n, heads, head_dim) of n consecutive tokens into a ring at slots slot ..
    slot + n - 1 (no wrap). kind: "keys" (ring (batch, heads, head_dim, slots)) or "values" (ring (batch, heads,
    slots, head_dim))."""
    if kind == "keys":
        return jax.lax.dynamic_update_slice_in_dim(ring, keys_layout(tokens, ring.dtype), slot, axis=3)
    return jax.lax.dynamic_update_slice_in_dim(ring, values_layout(tokens, ring.dtype), slot, axis=2)


def write_at(ring: jnp.ndarray, tokens: jnp.ndarray, slots: jnp.ndarray, kind: str) -> jnp.ndarray:
    """`write` at arbitrary slots (n,) int (a window that wraps around the ring's end, say)."""
    if kind == "keys":
        return ring.at[..., slots].set(keys_layout(tokens, ring.dtype))
    return ring.at[:, :, slots].set(values_layout(tokens, ring.dtype))


def read(ring: jnp.ndarray, slot: jnp.ndarray | int, kind: str) -> jnp.ndarray:
    """The keys or values of one slot as (batch, 1, heads, head_dim), in the ring's dtype (inverse of `write`)."""
    if kind == "keys":
        return jnp.transpose(jax.lax.dynamic_slice_in_dim(ring, slot, 1, axis=3), (0, 3, 1, 2))
    return jnp.swapaxes(jax.lax.dynamic_slice_in_dim(ring, slot, 1, axis=2), 1, 2)


def set_slots(ring: jnp.ndarray, value: jnp.ndarray, slot: jnp.ndarray | int, axis: int) -> jnp.ndarray:
    """Write value into ring at slots slot .. slot + n - 1 along `axis` (no wrap)."""
    return jax.lax.dynamic_update_slice_in_dim(ring, value.astype(ring.dtype), slot, axis=axis)


def keys_layout(k: jnp.ndarray, dtype) -> jnp.ndarray:
    """(batch, n, heads, head_dim) -> (batch, heads, head_dim, n) in the cache dtype."""
    return jnp.transpose(k, (0, 2, 3, 1)).astype(dtype)


def values_layout(v: jnp.ndarray, dtype) -> jnp.ndarray:
    """(batch, n, heads, head_dim) -> (batch, heads, n, head_dim) in the cache dtype."""
    return jnp.swapaxes(v, 1, 2).astype(dtype)
