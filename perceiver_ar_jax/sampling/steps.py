"""The steps of cached decoding: prompt prefill and one-token steps, each a pass of the model's own layers.

Every function here takes the bound `CausalLanguageModel` as its first argument and is run through
`model.apply({"params": params}, ..., method=fn)`. The layers compute (their `decode` / `keys_values` entries and
their forward pass); what is here is which tokens enter as queries, where their keys/values go in the rings of
`cache.py`, and which masks (from `model.masks`) they see. Ring indexing and positions: `cache.py`.

- `prefill`: the full forward over a window, the prompt (prefix tokens kv_norm-ed, the last `num_latents`
  q_norm-ed); the window's keys/values are projected `chunk_size` tokens at a time, so memory stays bounded for
  long prompts. `window_forward` runs it over the last tokens of the stream: the "windowed" cache mode's reset.
- `decode_step`: one new token as the only query. perceiver-io's cached generation (`use_cache=True`) is exactly
  this at every step: its keys/values keep the norm they were computed with, the cross-attention sees the last
  max_seq_len tokens and the self-attention the last max_latents. While the number of latents is still growing
  (prefix and positions fixed) it is also exact, unless a latent is a pad token: a query that sees no key attends
  uniformly to every key of the window (perceiver-io's masking), so its state changes as the window grows.
- `latents_step`: exact in every case, used once the prefix/latent boundary moves every step (and for pad
  latents). The token that leaves the latents gets kv_norm-ed keys/values, and the latents are recomputed through
  every layer (their hidden states all change), attending to the cached prefix keys/values. With absolute
  position embeddings and a sliding window the positions of every cached token change, so the whole cache is
  recomputed from the token ids.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from perceiver_ar_jax.model.attention import CachedKeysValues
from perceiver_ar_jax.model.masks import causal_mask, cross_attention_mask, ring_causal_mask, visible_keys
from perceiver_ar_jax.model.positions import rotary_angles
from perceiver_ar_jax.sampling.cache import (
    KVCache,
    positions_in_window,
    read,
    rotary_positions,
    set_slots,
    slot_tokens,
    write,
    write_at,
)

DEFAULT_CHUNK_SIZE = 512  # prompt tokens whose keys/values are projected at once during prefill


def _rotary(module, pos: jnp.ndarray) -> jnp.ndarray:
    return rotary_angles(pos, module.config.num_rotated_channels)


def _next_token_logits(module, x: jnp.ndarray) -> jnp.ndarray:
    """The output layer for the last position: (batch, n, channels) -> (batch, vocab) float32."""
    return module.logits(x[:, -1:])[:, 0]


# ----------------------------------------------------------------------------------------------------------------
def prefill(
    module,
    cache: KVCache,
    window_ids: jnp.ndarray,
    window_pad: jnp.ndarray,
    first: jnp.ndarray,
    window_start: jnp.ndarray,
    offset: jnp.ndarray,
    num_latents: jnp.ndarray,
    num_queries: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jnp.ndarray, KVCache]:
    """The model's full forward over a window of tokens: next-token logits (batch, vocab) float32 and the caches
    filled with the window's keys/values (a prompt, or the reset window of the "windowed" cache mode).

    window_ids (batch, W) int and window_pad (batch, W) bool (True = user pad): the tokens with bucketed indices
    first .. first + W - 1 (int32 scalar `first`); those before window_start (int32 scalar, >= offset, the number
    of bucket pads) are not in the window: invisible as keys, never latents, not counted in positions.
    num_latents (int32 scalar in [1, max_latents]): the window's last tokens that are latents. num_queries (static,
    >= num_latents, default min(W, max_latents)): how many of the last tokens are computed as queries (those before
    the latents are computed, then ignored). The window's keys/values are projected `chunk_size` tokens at a time,
    so memory stays bounded for long prompts; they go to ring slots r % max_seq_len, the latents' self-attention
    keys/values to slots r % max_latents.
    """
    cfg = module.config
    layer = module.cross_attention_layer
    L, K = cfg.max_seq_len, cfg.max_latents
    width = window_ids.shape[1]
    num_queries = min(width, K) if num_queries is None else num_queries

    r = first + jnp.arange(width, dtype=jnp.int32)
    visible = r >= window_start
    pad = window_pad | ~visible[None]
    window_pads = jnp.sum(window_pad & visible[None], axis=1, keepdims=True, dtype=jnp.int32)
    user = r - offset
    pos = positions_in_window(user, window_start - offset, window_pads)  # (batch, W)
    angles = _rotary(module, rotary_positions(user[None], cache.prompt_pads))
    first_latent = first + width - num_latents  # bucketed index of the first latent

    # 1. Keys/values of the window's tokens (prefix: kv_norm, latents: q_norm), chunk_size tokens at a time.
    chunk = min(chunk_size, width)

    def project_chunk(i, window_kv):
        start = jnp.minimum(i * chunk, width - chunk)  # the last chunk overlaps the one before: same values
        take = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, start, chunk, axis)  # noqa: E731
        x = module.embed(take(window_ids, 1), take(pos, 1))
        k, v = layer.keys_values(x, take(angles, 1), take(r, 0)[None] < first_latent)
        return write(window_kv[0], k, start, "keys"), write(window_kv[1], v, start, "values")

    dtype = cache.cross_k.dtype
    batch, heads, head_dim = cache.cross_k.shape[:3]
    window_kv = (jnp.zeros((batch, heads, head_dim, width), dtype), jnp.zeros((batch, heads, width, head_dim), dtype))
    num_chunks = -(-width // chunk)
    if num_chunks == 1:
        window_k, window_v = project_chunk(0, window_kv)
    else:
        window_k, window_v = jax.lax.fori_loop(0, num_chunks, project_chunk, window_kv)

    # 2. The hybrid layer for the last num_queries tokens, over the window's keys.
    r_q = r[-num_queries:]
    x = module.embed(window_ids[:, -num_queries:], pos[:, -num_queries:])
    angles_q = angles[:, -num_queries:]
    window_keys = CachedKeysValues(window_k, window_v, cross_attention_mask(num_queries, width, pad),
                                   uniform_over=visible_keys(visible))
    x, _ = layer.decode(x, angles_q, window_keys, with_own_keys=False)

    # 3. Self-attention over the latents; every layer's keys/values go to its ring at slots r % max_latents.
    self_mask = causal_mask(num_queries, num_queries) & visible_keys(r_q >= first_latent)
    self_slots = r_q % K
    self_k, self_v = [], []
    for i, sa in enumerate(module.self_attention_layers):
        x, (k, v) = sa(x, angles_q, self_mask)
        self_k.append(write_at(cache.self_k[i], k, self_slots, "keys"))
        self_v.append(write_at(cache.self_v[i], v, self_slots, "values"))

    slots = r % L
    cache = cache._replace(
        cross_k=cache.cross_k.at[..., slots].set(window_k), cross_v=cache.cross_v.at[:, :, slots].set(window_v),
        self_k=tuple(self_k), self_v=tuple(self_v), token_ids=cache.token_ids.at[:, slots].set(window_ids),
        pad=cache.pad.at[:, slots].set(window_pad | (r < offset)[None]))
    return _next_token_logits(module, x), cache


def window_forward(module, cache: KVCache, token: jnp.ndarray, last: jnp.ndarray, offset: jnp.ndarray,
                   window_start: jnp.ndarray, num_latents: jnp.ndarray, width: int, num_queries: int,
                   chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[jnp.ndarray, KVCache]:
    """A step by a full forward: the newest token (bucketed index `last`) is written to the rings, then `prefill`
    runs over the window of the last `width` (static) tokens, those from window_start on visible, the last
    num_latents latents. The "windowed" cache mode's reset (and its steps while a latent is a pad token)."""
    L = module.config.max_seq_len
    cache = cache._replace(token_ids=set_slots(cache.token_ids, token[:, None], last % L, 1),
                           pad=set_slots(cache.pad, jnp.zeros((token.shape[0], 1), bool), last % L, 1))
    first = last - width + 1
    slots = (first + jnp.arange(width, dtype=jnp.int32)) % L  # tokens before the stream (r < 0) are invisible
    return prefill(module, cache, cache.token_ids[:, slots], cache.pad[:, slots], first,
                   jnp.maximum(window_start, offset), offset, num_latents, num_queries, chunk_size)


# ----------------------------------------------------------------------------------------------------------------
class _Step(NamedTuple):
    """Where the new token lands and what the window looks like (shared by both step kinds)."""

    cache: KVCache  # with the new token's id and pad flag written
    slot: jnp.ndarray  # its cross-attention ring slot
    num_tokens: jnp.ndarray  # user tokens so far, n (the new one included)
    ring_user: jnp.ndarray  # (L,) user index g held by every cross-attention slot (< 0: invisible)
    in_window: jnp.ndarray  # (L,) bool
    window_start: jnp.ndarray  # user index of the window's first token
    window_pads: jnp.ndarray  # (batch, 1) user pads in the window


def last_tokens_window(last: jnp.ndarray, offset: jnp.ndarray, max_seq_len: int) -> jnp.ndarray:
    """Bucketed index of the first token of perceiver-io's window once token `last` is in: the last max_seq_len
    tokens, bucket pads left out."""
    return jnp.maximum(last - max_seq_len + 1, offset)


def _place_token(module, cache: KVCache, token: jnp.ndarray, last: jnp.ndarray, offset: jnp.ndarray,
                 window_start: jnp.ndarray) -> _Step:
    L = module.config.max_seq_len
    slot = last % L
    cache = cache._replace(token_ids=set_slots(cache.token_ids, token[:, None], slot, 1),
                           pad=set_slots(cache.pad, jnp.zeros((token.shape[0], 1), bool), slot, 1))
    ring_r = slot_tokens(last, L)  # the ring holds exactly the last L tokens
    in_window = (ring_r >= window_start) & (ring_r >= offset)  # r < offset: bucket pads / never written
    window_pads = jnp.sum(cache.pad & in_window[None], axis=1, keepdims=True, dtype=jnp.int32)
    return _Step(cache, slot, last - offset + 1, ring_r - offset, in_window, jnp.maximum(window_start - offset, 0),
                 window_pads)


def decode_step(
    module,
    cache: KVCache,
    token: jnp.ndarray,
    last: jnp.ndarray,
    offset: jnp.ndarray,
    first_latent: jnp.ndarray,
    window_start: jnp.ndarray,
) -> tuple[jnp.ndarray, KVCache]:
    """One cached step with the new token as the only query -> logits (batch, vocab) float32, updated caches.

    token (batch,) int: the newest token, bucketed index `last`; first_latent: bucketed index of the window's first
    latent (self-attention keys start there); window_start: bucketed index of the window's first token
    (`last_tokens_window` for perceiver-io's). Exact while the window's start and prefix are fixed; perceiver-io's
    cached step always.
    """
    cfg = module.config
    step = _place_token(module, cache, token, last, offset, window_start)
    cache = step.cache

    user = step.num_tokens - 1
    pos = positions_in_window(user, step.window_start, step.window_pads)  # (batch, 1)
    angles = _rotary(module, rotary_positions(user, cache.prompt_pads))
    x = module.embed(token[:, None], pos)  # (batch, 1, channels)
    # a new token is a latent: its keys/values come from q_norm and stay so. The slot it overwrites held the token
    # that just left the window.
    visible = (step.in_window & (jnp.arange(cfg.max_seq_len) != step.slot))[None] & ~cache.pad
    x, (k, v) = module.cross_attention_layer.decode(x, angles, cache.cross(visible_keys(visible)))
    cache = cache._replace(cross_k=write(cache.cross_k, k, step.slot, "keys"),
                           cross_v=write(cache.cross_v, v, step.slot, "values"))

    K = cfg.max_latents
    self_slot = last % K
    self_r = slot_tokens(last - 1, K)  # before this step: the slot to overwrite holds token last - K
    self_mask = visible_keys((self_r >= first_latent) & (self_r > last - K))  # no pad mask (perceiver-io)
    self_k, self_v = [], []
    for i, sa in enumerate(module.self_attention_layers):
        x, (k, v) = sa(x, angles, None, cache=cache.self_attention(i, self_mask))
        self_k.append(write(cache.self_k[i], k, self_slot, "keys"))
        self_v.append(write(cache.self_v[i], v, self_slot, "values"))

    cache = cache._replace(self_k=tuple(self_k), self_v=tuple(self_v))
    return _next_token_logits(module, x), cache


def latents_step(
    module,
    cache: KVCache,
    token: jnp.ndarray,
    last: jnp.ndarray,
    offset: jnp.ndarray,
    num_latents: jnp.ndarray,
    latent_moves: jnp.ndarray,
) -> tuple[jnp.ndarray, KVCache]:
    """One exact step that recomputes the latents through every layer: logits (batch, vocab) float32.

    token, last, offset as in `decode_step`; num_latents: latents now (int32 scalar <= max_latents, the last
    tokens of the window); latent_moves: whether the oldest latent of the step before joined the prefix (bool
    scalar; true once there are max_latents latents). The max_latents newest tokens are computed as queries; those
    before the latents are ignored. Self-attention caches are neither used nor updated.
    """
    cfg = module.config
    layer = module.cross_attention_layer
    L, K = cfg.max_seq_len, cfg.max_latents
    step = _place_token(module, cache, token, last, offset, last_tokens_window(last, offset, L))
    cache = step.cache

    query_r = last - K + 1 + jnp.arange(K, dtype=jnp.int32)
    query_user = query_r - offset
    query_pos = positions_in_window(query_user[None], step.window_start, step.window_pads)  # (batch, K)
    angles = _rotary(module, rotary_positions(query_user[None], cache.prompt_pads))
    x = module.embed(jnp.take(cache.token_ids, query_r % L, axis=1), query_pos)  # (batch, K, channels)
    first_latent_user = step.num_tokens - num_latents
    is_latent = query_user >= first_latent_user

    def update_slots(rings):
        cross_k, cross_v = rings
        if cfg.max_prefix_len > 0:  # the token leaving the latents becomes a prefix token: kv_norm
            old_slot = (last - K) % L
            old_user = first_latent_user - 1
            old_pos = positions_in_window(old_user, step.window_start, step.window_pads)
            old_x = module.embed(jax.lax.dynamic_slice_in_dim(cache.token_ids, old_slot, 1, axis=1), old_pos)
            old_angles = _rotary(module, rotary_positions(old_user, cache.prompt_pads))
            k, v = layer.keys_values(old_x, old_angles, is_prefix=True)

            def rewrite(ring, new, kind):  # only if a latent moved: else the slot keeps what it holds
                return write(ring, jnp.where(latent_moves, new, read(ring, old_slot, kind)), old_slot, kind)

            cross_k, cross_v = rewrite(cross_k, k, "keys"), rewrite(cross_v, v, "values")
        k, v = layer.keys_values(x[:, -1:], angles[:, -1:], is_prefix=False)  # the new token, a latent
        return write(cross_k, k, step.slot, "keys"), write(cross_v, v, step.slot, "values")

    def recompute_all(rings):
        ring_pos = positions_in_window(step.ring_user[None], step.window_start, step.window_pads)
        ring_angles = _rotary(module, rotary_positions(step.ring_user[None], cache.prompt_pads))
        is_prefix = (step.ring_user < first_latent_user)[None, :]
        k, v = layer.keys_values(module.embed(cache.token_ids, ring_pos), ring_angles, is_prefix)
        return write(rings[0], k, 0, "keys"), write(rings[1], v, 0, "values")

    rings = (cache.cross_k, cache.cross_v)
    if cfg.abs_pos_emb:  # once the window slides, positions (hence embeddings) of cached tokens may change
        cross_k, cross_v = jax.lax.cond(step.num_tokens > L, recompute_all, update_slots, rings)
    else:
        cross_k, cross_v = update_slots(rings)
    cache = cache._replace(cross_k=cross_k, cross_v=cross_v)

    in_window = step.in_window[None] & ~cache.pad
    keys = cache.cross(ring_causal_mask(query_user, step.ring_user, in_window),
                       uniform_over=visible_keys(step.in_window))
    x, _ = layer.decode(x, angles, keys, with_own_keys=False)

    self_mask = causal_mask(K, K) & visible_keys(is_latent)
    for sa in module.self_attention_layers:
        x, _ = sa(x, angles, self_mask)
    return _next_token_logits(module, x), cache
