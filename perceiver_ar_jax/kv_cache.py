"""The model side of cached decoding: prompt prefill and one-token steps over static-shape key/value caches.

Every function here takes the bound `CausalLanguageModel` as its first argument and is run through
`model.apply({"params": params}, ..., method=fn)`, so it reuses the model's own submodules (embedding, norms,
projections, attention, MLPs) and `model.py` stays a plain forward pass.

Indexing. A prompt of S user tokens is left-padded to a bucket of Sb tokens (Sb - S = `offset` bucket pads). Token
number r of the bucketed sequence (prompt, then generated tokens) is user token g = r - offset; bucket pads have
g < 0 and are invisible: masked as keys, never latents, not counted in positions or in the window. The
cross-attention caches are rings over the last max_seq_len tokens (slot r % max_seq_len), the self-attention
caches rings over the last max_latents tokens (slot r % max_latents). Keys are stored (batch, heads, head_dim,
slots) and values (batch, heads, slots, head_dim), the layouts the two matrix products of one query read without a
transpose; a step reads the caches before it writes its own key/value, so the update happens in place.

Window and positions, as perceiver-io: after n user tokens the model sees the last W = min(n, max_seq_len) of them
(user pad tokens included); a token's position is its index in that window minus the number of user pads in the
window, clamped at 0. The absolute position embedding uses these positions. Rotary embedding only sees position
differences: while user pads are left in the window, window start + pads in it = the prompt's pads, so every
position is max(0, g - prompt pads); once they have all left, all positions move down together as the window
slides. So keys are rotated once, when cached, with max(0, g - prompt pads): the window's own positions until then,
the same differences after. (These angles keep growing past max_seq_len, so float32 rounding of the angles grows
with the generated length; it stays below 1e-3 radians for 10^4 tokens.)

Steps:
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

from perceiver_ar_jax.attention import MASKED_SCORE
from perceiver_ar_jax.config import CausalLanguageModelConfig
from perceiver_ar_jax.masks import causal_mask
from perceiver_ar_jax.position import apply_rotary, rotary_angles

DEFAULT_CHUNK_SIZE = 512  # prompt tokens whose keys/values are projected at once during prefill


class DecodeCache(NamedTuple):
    """Static-shape decoding caches (a pytree). L = max_seq_len, K = max_latents; keys are stored rotated."""

    cross_k: jnp.ndarray  # (batch, heads, head_dim, L) hybrid-layer keys of the last L tokens
    cross_v: jnp.ndarray  # (batch, heads, L, head_dim)
    self_k: tuple[jnp.ndarray, ...]  # per self-attention layer: keys (batch, heads, head_dim, K)
    self_v: tuple[jnp.ndarray, ...]  # values (batch, heads, K, head_dim)
    token_ids: jnp.ndarray  # (batch, L) int32 ids of the last L tokens (for recomputation in exact mode)
    pad: jnp.ndarray  # (batch, L) bool, True = user pad token (attention_mask 0)
    prompt_pads: jnp.ndarray  # (batch, 1) int32 user pads of the prompt (rotary positions count from them)


def cache_dtype(config: CausalLanguageModelConfig) -> jnp.dtype:
    """The model's compute dtype, except float32 on CPU: XLA:CPU's bfloat16 products of one query with a cache
    run over ten times slower than float32 ones (and the attention softmax is float32 anyway)."""
    return jnp.dtype(jnp.float32) if jax.default_backend() == "cpu" else jnp.dtype(config.dtype)


def init_cache(config: CausalLanguageModelConfig, batch_size: int) -> DecodeCache:
    """Zero caches for `batch_size` rows, in `cache_dtype`."""
    dtype = cache_dtype(config)
    L, K = config.max_seq_len, config.max_latents
    keys = lambda n: jnp.zeros((batch_size, config.num_heads, config.head_dim, n), dtype)  # noqa: E731
    values = lambda n: jnp.zeros((batch_size, config.num_heads, n, config.head_dim), dtype)  # noqa: E731
    layers = range(config.num_self_attention_layers)
    return DecodeCache(
        cross_k=keys(L), cross_v=values(L),
        self_k=tuple(keys(K) for _ in layers), self_v=tuple(values(K) for _ in layers),
        token_ids=jnp.zeros((batch_size, L), jnp.int32), pad=jnp.ones((batch_size, L), bool),
        prompt_pads=jnp.zeros((batch_size, 1), jnp.int32))


def slot_tokens(last: jnp.ndarray, size: int) -> jnp.ndarray:
    """(size,) int32: the bucketed index r held by each ring slot, once token `last` has been written.

    Slot s holds the latest r <= last with r % size == s, i.e. the last `size` tokens; negative r: never written.
    """
    return last - jnp.mod(last - jnp.arange(size, dtype=jnp.int32), size)


def window_positions(user_index: jnp.ndarray, num_tokens: jnp.ndarray, window_pads: jnp.ndarray,
                     max_seq_len: int) -> jnp.ndarray:
    """perceiver-io's positions of user tokens `user_index` after num_tokens user tokens, with window_pads
    (batch, 1) user pads in the window: index in the window minus window_pads, clamped at 0."""
    window_start = jnp.maximum(num_tokens - max_seq_len, 0)
    return jnp.maximum(user_index - window_start - window_pads, 0)


def rotary_positions(user_index: jnp.ndarray, prompt_pads: jnp.ndarray) -> jnp.ndarray:
    """Positions for the rotary embedding of cached keys and of queries (module docstring): max(0, g - pads)."""
    return jnp.maximum(user_index - prompt_pads, 0)


def visible_or_uniform(q: jnp.ndarray, mask: jnp.ndarray, in_window: jnp.ndarray):
    """perceiver-io's rule for a query that sees no key (a pad latent): it averages uniformly over ALL keys.

    A fully masked row of scores becomes uniform in `dense_attention` too, but over every cache slot, bucket pads
    and stale slots included. Here such a row gets a zero query (all scores 0) and sees every key of the window,
    which is the same uniform average, over the same keys as perceiver-io's.
    q (batch, queries, heads, head_dim); mask (batch, 1, queries, keys); in_window broadcastable to the mask.
    """
    sees_a_key = jnp.any(mask, axis=-1, keepdims=True)  # (batch, 1, queries, 1)
    q = jnp.where(jnp.swapaxes(sees_a_key, 1, 2), q, jnp.zeros_like(q))
    return q, jnp.where(sees_a_key, mask, in_window)


def one_query_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray,
                        k_new: jnp.ndarray, v_new: jnp.ndarray) -> jnp.ndarray:
    """`dense_attention` for one query over cached keys/values plus its own key/value.

    q, k_new, v_new (batch, 1, heads, head_dim), q scaled and rotated; k (batch, heads, head_dim, slots) and
    v (batch, heads, slots, head_dim): the caches before this step; mask (batch, 1, 1, slots) over the cached
    slots (the query always sees its own key). Returns (batch, 1, heads, head_dim).
    """
    q = q[:, 0]
    scores = jnp.einsum("bhd,bhds->bhs", q, k, preferred_element_type=jnp.float32)
    scores = jnp.where(mask[:, 0], scores, MASKED_SCORE)
    own = jnp.einsum("bhd,bhd->bh", q, k_new[:, 0], preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(jnp.concatenate([scores, own[..., None]], axis=-1), axis=-1).astype(v.dtype)
    o = jnp.einsum("bhs,bhsd->bhd", probs[..., :-1], v) + probs[..., -1:] * v_new[:, 0]
    return o[:, None]


def _keys_layout(k: jnp.ndarray, dtype) -> jnp.ndarray:
    """(batch, n, heads, head_dim) -> (batch, heads, head_dim, n) in the cache dtype."""
    return jnp.transpose(k, (0, 2, 3, 1)).astype(dtype)


def _values_layout(v: jnp.ndarray, dtype) -> jnp.ndarray:
    """(batch, n, heads, head_dim) -> (batch, heads, n, head_dim) in the cache dtype."""
    return jnp.swapaxes(v, 1, 2).astype(dtype)


def _as_keys(ring: jnp.ndarray) -> jnp.ndarray:
    """A key cache (batch, heads, head_dim, n) as attention keys (batch, n, heads, head_dim)."""
    return jnp.transpose(ring, (0, 3, 1, 2))


def _set_slots(ring: jnp.ndarray, value: jnp.ndarray, slot: jnp.ndarray, axis: int) -> jnp.ndarray:
    """Write value into ring at slots slot .. slot + n - 1 along `axis` (no wrap)."""
    return jax.lax.dynamic_update_slice_in_dim(ring, value.astype(ring.dtype), slot, axis=axis)


def output_kernel(module, batch_size: int) -> jnp.ndarray | None:
    """The token embedding transposed, (channels, vocab), in the compute dtype, where it pays: XLA:CPU multiplies
    several float32 rows by it about twice as fast as by the (vocab, channels) embedding. Made once per decode
    loop and passed to the steps; None elsewhere."""
    cfg = module.config
    if batch_size == 1 or jax.default_backend() != "cpu" or jnp.dtype(cfg.dtype) != jnp.float32:
        return None
    return jnp.transpose(module.token_embedding.embedding).astype(cfg.dtype)


def next_token_logits(module, x: jnp.ndarray, kernel: jnp.ndarray | None = None) -> jnp.ndarray:
    """The output layer for the last position: (batch, 1, channels) -> (batch, vocab) float32.

    kernel: `output_kernel` or None (the same logits either way)."""
    return module.logits(x, kernel)[:, 0]


def _rotary(module, pos: jnp.ndarray) -> jnp.ndarray:
    return rotary_angles(pos, module.config.num_rotated_channels)


def _rotated_kv(attention, h: jnp.ndarray, angles: jnp.ndarray | None):
    k, v = attention.project_kv(h)
    return (k if angles is None else apply_rotary(k, angles)), v


# ----------------------------------------------------------------------------------------------------------------
def prefill(
    module,
    cache: DecodeCache,
    prompt_ids: jnp.ndarray,
    prompt_pad: jnp.ndarray,
    offset: jnp.ndarray,
    num_latents: jnp.ndarray,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[jnp.ndarray, DecodeCache]:
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
    is_prefix = r < first_latent

    # 1. Keys/values of all prompt tokens (prefix: kv_norm, latents: q_norm), chunk_size tokens at a time.
    chunk = min(chunk_size, bucket)

    def project_chunk(i, kv):
        start = jnp.minimum(i * chunk, bucket - chunk)  # the last chunk overlaps the one before: same values
        take = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, start, chunk, axis)  # noqa: E731
        x = module.embed(take(prompt_ids, 1), take(pos, 1))
        h = jnp.where(take(is_prefix, 0)[None, :, None], layer.kv_norm(x), layer.q_norm(x))
        k, v = _rotated_kv(layer.attention, h, take(angles, 1))
        return (_set_slots(kv[0], _keys_layout(k, kv[0].dtype), start, 3),
                _set_slots(kv[1], _values_layout(v, kv[1].dtype), start, 2))

    num_chunks = -(-bucket // chunk)
    if num_chunks == 1:
        cross_k, cross_v = project_chunk(0, (cache.cross_k, cache.cross_v))
    else:
        cross_k, cross_v = jax.lax.fori_loop(0, num_chunks, project_chunk, (cache.cross_k, cache.cross_v))

    # 2. The hybrid layer for the last num_queries tokens (those before first_latent are computed, then ignored).
    r_q = r[-num_queries:]
    x = module.embed(prompt_ids[:, -num_queries:], pos[:, -num_queries:])
    angles_q = angles[:, -num_queries:]
    mask = ~pad[:, None, None, :] & (r[None, :] <= r_q[:, None])[None, None]  # (batch, 1, Q, Sb)
    q, mask = visible_or_uniform(layer.attention.queries(layer.q_norm(x), angles_q), mask, real[None, None, None])
    keys, values = _as_keys(cross_k[..., :bucket]), jnp.swapaxes(cross_v[:, :, :bucket], 1, 2)
    x = x + layer.attention.o_proj(layer.attention.attend(q, keys, values, mask))
    x = x + layer.mlp(x)

    # 3. Self-attention over the latents; every layer's keys/values go to its ring at slots r % max_latents.
    self_mask = causal_mask(num_queries, num_queries) & (r_q >= first_latent)[None, None, None, :]
    slots = r_q % cfg.max_latents  # static
    self_k, self_v = [], []
    for i, sa in enumerate(module.self_attention_layers):
        h_in = sa.norm(x)
        layer_angles = angles_q if sa.rotary else None
        k, v = _rotated_kv(sa.attention, h_in, layer_angles)
        self_k.append(cache.self_k[i].at[..., slots].set(_keys_layout(k, cache.self_k[i].dtype)))
        self_v.append(cache.self_v[i].at[:, :, slots].set(_values_layout(v, cache.self_v[i].dtype)))
        x = x + sa.attention(h_in, k, v, layer_angles, None, self_mask)
        x = x + sa.mlp(x)

    cache = DecodeCache(
        cross_k=cross_k, cross_v=cross_v, self_k=tuple(self_k), self_v=tuple(self_v),
        token_ids=_set_slots(cache.token_ids, prompt_ids, 0, 1), pad=_set_slots(cache.pad, pad, 0, 1),
        prompt_pads=prompt_pads)
    return next_token_logits(module, x[:, -1:]), cache


# ----------------------------------------------------------------------------------------------------------------
class _Step(NamedTuple):
    """Where the new token lands and what the window looks like (shared by both step kinds)."""

    cache: DecodeCache  # with the new token's id and pad flag written
    slot: jnp.ndarray  # its cross-attention ring slot
    num_tokens: jnp.ndarray  # user tokens so far, n (the new one included)
    ring_user: jnp.ndarray  # (L,) user index g held by every cross-attention slot (< 0: invisible)
    in_window: jnp.ndarray  # (L,) bool
    window_pads: jnp.ndarray  # (batch, 1) user pads in the window


def _place_token(module, cache: DecodeCache, token: jnp.ndarray, last: jnp.ndarray, offset: jnp.ndarray) -> _Step:
    L = module.config.max_seq_len
    slot = last % L
    cache = cache._replace(token_ids=_set_slots(cache.token_ids, token[:, None], slot, 1),
                           pad=_set_slots(cache.pad, jnp.zeros((token.shape[0], 1), bool), slot, 1))
    ring_user = slot_tokens(last, L) - offset
    in_window = ring_user >= 0  # the ring holds exactly the last L tokens; g < 0 are bucket pads / never written
    window_pads = jnp.sum(cache.pad & in_window[None], axis=1, keepdims=True, dtype=jnp.int32)
    return _Step(cache, slot, last - offset + 1, ring_user, in_window, window_pads)


def decode_step(
    module,
    cache: DecodeCache,
    token: jnp.ndarray,
    last: jnp.ndarray,
    offset: jnp.ndarray,
    first_latent: jnp.ndarray,
    kernel: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, DecodeCache]:
    """One cached step with the new token as the only query -> logits (batch, vocab) float32, updated caches.

    token (batch,) int: the newest token, bucketed index `last`; first_latent: bucketed index of the prompt's first
    latent (self-attention keys start there); kernel: see `next_token_logits`. Exact while the prefix is fixed;
    perceiver-io's cached step always.
    """
    cfg = module.config
    layer = module.cross_attention_layer
    step = _place_token(module, cache, token, last, offset)
    cache = step.cache

    user = step.num_tokens - 1
    pos = window_positions(user, step.num_tokens, step.window_pads, cfg.max_seq_len)  # (batch, 1)
    angles = _rotary(module, rotary_positions(user, cache.prompt_pads))
    x = module.embed(token[:, None], pos)  # (batch, 1, channels)
    q_in = layer.q_norm(x)  # a new token is a latent: its keys/values come from q_norm and stay so
    k, v = _rotated_kv(layer.attention, q_in, angles)
    # the slot it overwrites held the token that just left the window
    visible = step.in_window & (jnp.arange(cfg.max_seq_len) != step.slot)
    mask = (visible[None] & ~cache.pad)[:, None, None, :]  # (batch, 1, 1, L)
    o = one_query_attention(layer.attention.queries(q_in, angles), cache.cross_k, cache.cross_v, mask, k, v)
    cross_k = _set_slots(cache.cross_k, _keys_layout(k, cache.cross_k.dtype), step.slot, 3)
    cross_v = _set_slots(cache.cross_v, _values_layout(v, cache.cross_v.dtype), step.slot, 2)
    x = x + layer.attention.o_proj(o)
    x = x + layer.mlp(x)

    K = cfg.max_latents
    self_slot = last % K
    self_r = slot_tokens(last - 1, K)  # before this step: the slot to overwrite holds token last - K
    self_mask = ((self_r >= first_latent) & (self_r > last - K))[None, None, None, :]  # no pad mask (perceiver-io)
    self_k, self_v = [], []
    for i, sa in enumerate(module.self_attention_layers):
        h_in = sa.norm(x)
        layer_angles = angles if sa.rotary else None
        k, v = _rotated_kv(sa.attention, h_in, layer_angles)
        q = sa.attention.queries(h_in, layer_angles)
        o = one_query_attention(q, cache.self_k[i], cache.self_v[i], self_mask, k, v)
        self_k.append(_set_slots(cache.self_k[i], _keys_layout(k, cache.self_k[i].dtype), self_slot, 3))
        self_v.append(_set_slots(cache.self_v[i], _values_layout(v, cache.self_v[i].dtype), self_slot, 2))
        x = x + sa.attention.o_proj(o)
        x = x + sa.mlp(x)

    cache = cache._replace(cross_k=cross_k, cross_v=cross_v, self_k=tuple(self_k), self_v=tuple(self_v))
    return next_token_logits(module, x, kernel), cache


def latents_step(
    module,
    cache: DecodeCache,
    token: jnp.ndarray,
    last: jnp.ndarray,
    offset: jnp.ndarray,
    num_latents: jnp.ndarray,
    latent_moves: jnp.ndarray,
    kernel: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, DecodeCache]:
    """One exact step that recomputes the latents through every layer: logits (batch, vocab) float32.

    token, last, offset, kernel as in `decode_step`; num_latents: latents now (int32 scalar <= max_latents, the last
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

    def update_slots(kv):
        cross_k, cross_v = kv
        if cfg.max_prefix_len > 0:  # the token leaving the latents becomes a prefix token: kv_norm
            old_slot = (last - K) % L
            old_user = first_latent_user - 1
            old_pos = window_positions(old_user, step.num_tokens, step.window_pads, L)
            old_x = module.embed(jax.lax.dynamic_slice_in_dim(cache.token_ids, old_slot, 1, axis=1), old_pos)
            old_angles = _rotary(module, rotary_positions(old_user, cache.prompt_pads))
            k, v = _rotated_kv(layer.attention, layer.kv_norm(old_x), old_angles)

            def rewrite(ring, new, axis):  # only if a latent moved: else the slot keeps what it holds
                held = jax.lax.dynamic_slice_in_dim(ring, old_slot, 1, axis=axis)
                return _set_slots(ring, jnp.where(latent_moves, new, held), old_slot, axis)

            cross_k = rewrite(cross_k, _keys_layout(k, cross_k.dtype), 3)
            cross_v = rewrite(cross_v, _values_layout(v, cross_v.dtype), 2)
        k, v = _rotated_kv(layer.attention, layer.q_norm(x[:, -1:]), angles[:, -1:])  # the new token, a latent
        return (_set_slots(cross_k, _keys_layout(k, cross_k.dtype), step.slot, 3),
                _set_slots(cross_v, _values_layout(v, cross_v.dtype), step.slot, 2))

    def recompute_all(kv):
        ring_pos = window_positions(step.ring_user[None], step.num_tokens, step.window_pads, L)
        all_x = module.embed(cache.token_ids, ring_pos)
        is_prefix = (step.ring_user < first_latent_user)[None, :, None]
        ring_angles = _rotary(module, rotary_positions(step.ring_user[None], cache.prompt_pads))
        h = jnp.where(is_prefix, layer.kv_norm(all_x), layer.q_norm(all_x))
        k, v = _rotated_kv(layer.attention, h, ring_angles)
        return _keys_layout(k, kv[0].dtype), _values_layout(v, kv[1].dtype)

    kv = (cache.cross_k, cache.cross_v)
    if cfg.abs_pos_emb:  # once the window slides, positions (hence embeddings) of cached tokens may change
        cross_k, cross_v = jax.lax.cond(step.num_tokens > L, recompute_all, update_slots, kv)
    else:
        cross_k, cross_v = update_slots(kv)

    causal = step.ring_user[None, :] <= query_user[:, None]  # (K, L)
    in_window = step.in_window[None, None, None, :]
    mask = in_window & ~cache.pad[:, None, None, :] & causal[None, None]  # (batch, 1, K, L)
    q, mask = visible_or_uniform(layer.attention.queries(layer.q_norm(x), angles), mask, in_window)
    o = layer.attention.attend(q, _as_keys(cross_k), jnp.swapaxes(cross_v, 1, 2), mask)
    x = x + layer.attention.o_proj(o)
    x = x + layer.mlp(x)

    self_mask = causal_mask(K, K) & is_latent[None, None, None, :]
    for sa in module.self_attention_layers:
        x = sa(x, angles, self_mask)

    cache = cache._replace(cross_k=cross_k, cross_v=cross_v)
    return next_token_logits(module, x[:, -1:], kernel), cache
