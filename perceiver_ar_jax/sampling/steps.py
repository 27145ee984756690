"""The steps of cached decoding: prompt prefill and one-token steps, each a pass of the model's own layers.

Every function here takes the bound `CausalLanguageModel` as its first argument and is run through
`model.apply({"params": params}, ..., method=fn)`. The layers compute (their `decode` / `keys_values` entries and
their forward pass); what is here is which tokens enter as queries, where their keys/values go in the rings of
`cache.py`, and which masks (from `model.masks`) they see. Ring indexing and positions: `cache.py`.

- `prefill`: the full forward over the prompt (prefix tokens kv_norm-ed, the last `num_latents` q_norm-ed); the
  prompt's keys/values are projected `chunk_size` tokens at a time, so memory stays bounded for long prompts.
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
    read,
    rotary_positions,
    set_slots,
    slot_tokens,
    window_positions,
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
    prompt_ids: jnp.ndarray,
    prompt_pad: jnp.ndarray,
    offset: jnp.ndarray,
    num_latents: jnp.ndarray,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jnp.ndarray, KVCache]:
    """The model's forward over the prompt: next-token logits (batch, vocab) float32 and the filled caches.

    prompt_ids (batch, Sb) int, left-padded to the bucket; prompt_pad (batch, Sb) bool, True = user pad;
    offset: number of bucket pads (int32 scalar, Sb - S); num_latents: latents of the prompt (int32 scalar in
    [1, min(S, max_latents)]). Sb <= max_seq_len, so the prompt fills ring slots 0 .. Sb - 1.
    """
    cfg = module.config
    layer = module.cross_attention_layer
    bucket = prompt_ids.shape[1]
    num_queries = min(bucket, cfg.max_latents)  # static: the latents are among the last num_queries tokens

    r = jnp.arange(bucket, dtype=jnp.int32)
    real = r >= offset  # not a bucket pad
    pad = prompt_pad | ~real[None]
    prompt_pads = jnp.sum(prompt_pad & real[None], axis=1, keepdims=True, dtype=jnp.int32)
    pos = window_positions(r - offset, bucket - offset, prompt_pads, cfg.max_seq_len)  # (batch, Sb)
    angles = _rotary(module, pos)  # the prompt's window does not slide: rotary positions are the same
    first_latent = bucket - num_latents  # bucketed index of the first latent

    # 1. Keys/values of all prompt tokens (prefix: kv_norm, latents: q_norm), chunk_size tokens at a time.
    chunk = min(chunk_size, bucket)

    def project_chunk(i, rings):
        start = jnp.minimum(i * chunk, bucket - chunk)  # the last chunk overlaps the one before: same values
        take = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, start, chunk, axis)  # noqa: E731
        x = module.embed(take(prompt_ids, 1), take(pos, 1))
        k, v = layer.keys_values(x, take(angles, 1), take(r, 0)[None] < first_latent)
        return write(rings[0], k, start, "keys"), write(rings[1], v, start, "values")

    num_chunks = -(-bucket // chunk)
    rings = (cache.cross_k, cache.cross_v)
    if num_chunks == 1:
        cross_k, cross_v = project_chunk(0, rings)
    else:
        cross_k, cross_v = jax.lax.fori_loop(0, num_chunks, project_chunk, rings)
    cache = cache._replace(cross_k=cross_k, cross_v=cross_v)

    # 2. The hybrid layer for the last num_queries tokens (those before first_latent are computed, then ignored).
    r_q = r[-num_queries:]
    x = module.embed(prompt_ids[:, -num_queries:], pos[:, -num_queries:])
    angles_q = angles[:, -num_queries:]
    prompt_keys = CachedKeysValues(cross_k[..., :bucket], cross_v[:, :, :bucket],
                                   cross_attention_mask(num_queries, bucket, pad), uniform_over=visible_keys(real))
    x, _ = layer.decode(x, angles_q, prompt_keys, with_own_keys=False)

    # 3. Self-attention over the latents; every layer's keys/values go to its ring at slots r % max_latents.
    self_mask = causal_mask(num_queries, num_queries) & visible_keys(r_q >= first_latent)
    slots = r_q % cfg.max_latents  # static
    self_k, self_v = [], []
    for i, sa in enumerate(module.self_attention_layers):
        x, (k, v) = sa(x, angles_q, self_mask)
        self_k.append(write_at(cache.self_k[i], k, slots, "keys"))
        self_v.append(write_at(cache.self_v[i], v, slots, "values"))

    cache = cache._replace(
        self_k=tuple(self_k), self_v=tuple(self_v), token_ids=set_slots(cache.token_ids, prompt_ids, 0, 1),
        pad=set_slots(cache.pad, pad, 0, 1), prompt_pads=prompt_pads)
    return _next_token_logits(module, x), cache


# ----------------------------------------------------------------------------------------------------------------
class _Step(NamedTuple):
    """Where the new token lands and what the window looks like (shared by both step kinds)."""

    cache: KVCache  # with the new token's id and pad flag written
    slot: jnp.ndarray  # its cross-attention ring slot
    num_tokens: jnp.ndarray  # user tokens so far, n (the new one included)
    ring_user: jnp.ndarray  # (L,) user index g held by every cross-attention slot (< 0: invisible)
    in_window: jnp.ndarray  # (L,) bool
    window_pads: jnp.ndarray  # (batch, 1) user pads in the window


def _place_token(module, cache: KVCache, token: jnp.ndarray, last: jnp.ndarray, offset: jnp.ndarray) -> _Step:
    L = module.config.max_seq_len
    slot = last % L
    cache = cache._replace(token_ids=set_slots(cache.token_ids, token[:, None], slot, 1),
                           pad=set_slots(cache.pad, jnp.zeros((token.shape[0], 1), bool), slot, 1))
    ring_user = slot_tokens(last, L) - offset
    in_window = ring_user >= 0  # the ring holds exactly the last L tokens; g < 0 are bucket pads / never written
    window_pads = jnp.sum(cache.pad & in_window[None], axis=1, keepdims=True, dtype=jnp.int32)
    return _Step(cache, slot, last - offset + 1, ring_user, in_window, window_pads)


def decode_step(
    module,
    cache: KVCache,
    token: jnp.ndarray,
    last: jnp.ndarray,
    offset: jnp.ndarray,
    first_latent: jnp.ndarray,
) -> tuple[jnp.ndarray, KVCache]:
    """One cached step with the new token as the only query -> logits (batch, vocab) float32, updated caches.

    token (batch,) int: the newest token, bucketed index `last`; first_latent: bucketed index of the prompt's first
    latent (self-attention keys start there). Exact while the prefix is fixed; perceiver-io's cached step always.
    """
    cfg = module.config
    step = _place_token(module, cache, token, last, offset)
    cache = step.cache

    user = step.num_tokens - 1
    pos = window_positions(user, step.num_tokens, step.window_pads, cfg.max_seq_len)  # (batch, 1)
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
    step = _place_token(module, cache, token, last, offset)
    cache = step.cache

    query_r = last - K + 1 + jnp.arange(K, dtype=jnp.int32)
    query_user = query_r - offset
    query_pos = window_positions(query_user[None], step.num_tokens, step.window_pads, L)  # (batch, K)
    angles = _rotary(module, rotary_positions(query_user[None], cache.prompt_pads))
    x = module.embed(jnp.take(cache.token_ids, query_r % L, axis=1), query_pos)  # (batch, K, channels)
    first_latent_user = step.num_tokens - num_latents
    is_latent = query_user >= first_latent_user

    def update_slots(rings):
        cross_k, cross_v = rings
        if cfg.max_prefix_len > 0:  # the token leaving the latents becomes a prefix token: kv_norm
            old_slot = (last - K) % L
            old_user = first_latent_user - 1
            old_pos = window_positions(old_user, step.num_tokens, step.window_pads, L)
            old_x = module.embed(jax.lax.dynamic_slice_in_dim(cache.token_ids, old_slot, 1, axis=1), old_pos)
            old_angles = _rotary(module, rotary_positions(old_user, cache.prompt_pads))
            k, v = layer.keys_values(old_x, old_angles, is_prefix=True)

            def rewrite(ring, new, kind):  # only if a latent moved: else the slot keeps what it holds
                return write(ring, jnp.where(latent_moves, new, read(ring, old_slot, kind)), old_slot, kind)

            cross_k, cross_v = rewrite(cross_k, k, "keys"), rewrite(cross_v, v, "values")
        k, v = layer.keys_values(x[:, -1:], angles[:, -1:], is_prefix=False)  # the new token, a latent
        return write(cross_k, k, step.slot, "keys"), write(cross_v, v, step.slot, "values")

    def recompute_all(rings):
        ring_pos = window_positions(step.ring_user[None], step.num_tokens, step.window_pads, L)
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
