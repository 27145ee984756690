"""The pieces of cached decoding: ring-buffer bookkeeping, window positions, and the one-query attention."""

import jax
import jax.numpy as jnp
import numpy as np

from perceiver_ar_jax.model.attention import cached_attention, dense_attention
from perceiver_ar_jax.model.masks import uniform_where_no_key
from perceiver_ar_jax.model.positions import positions
from perceiver_ar_jax.sampling.cache import rotary_positions, slot_tokens, window_positions


def test_ring_slots_hold_the_last_tokens_written():
    np.testing.assert_array_equal(slot_tokens(jnp.int32(9), 4), [8, 9, 6, 7])
    np.testing.assert_array_equal(slot_tokens(jnp.int32(2), 4), [0, 1, 2, -1])  # slot 3 never written


def test_window_positions_are_the_models_positions_of_the_current_window():
    pads, max_seq_len = 3, 8
    for num_tokens in range(4, 14):  # the window slides once num_tokens > 8; pads leave it first
        window = np.arange(max(num_tokens - max_seq_len, 0), num_tokens)
        pad_mask = (window < pads)[None]
        expected = positions(1, len(window), jnp.asarray(pad_mask))
        got = window_positions(jnp.asarray(window)[None], num_tokens, jnp.sum(pad_mask, 1, keepdims=True), max_seq_len)
        np.testing.assert_array_equal(got, expected)
        # rotary positions differ from them by the same amount for every real token of the window
        shift = rotary_positions(jnp.asarray(window)[None], jnp.asarray([[pads]])) - got
        assert len(np.unique(np.asarray(shift)[~pad_mask])) == 1


def test_one_query_cached_attention_equals_dense_attention_over_cache_and_own_key():
    rng = np.random.default_rng(0)
    batch, heads, head_dim, slots = 2, 3, 4, 6
    q, k_new, v_new = (jnp.asarray(rng.normal(size=(batch, 1, heads, head_dim)), jnp.float32) for _ in range(3))
    k = jnp.asarray(rng.normal(size=(batch, slots, heads, head_dim)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(batch, slots, heads, head_dim)), jnp.float32)
    mask = jnp.asarray(rng.random((batch, 1, 1, slots)) < 0.6)
    got = cached_attention(q, jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2), mask, k_new, v_new)
    full_mask = jnp.concatenate([mask, jnp.ones((batch, 1, 1, 1), bool)], axis=-1)
    expected = dense_attention(q, jnp.concatenate([k, k_new], 1), jnp.concatenate([v, v_new], 1), full_mask)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_query_that_sees_no_key_averages_the_window_uniformly():
    q = jnp.ones((1, 2, 1, 4))  # query 0 sees no key, query 1 sees key 1
    mask = jnp.asarray([[[[False, False, False], [False, True, False]]]])
    in_window = jnp.asarray([True, True, False])[None, None, None]  # key 2: a stale slot
    q2, mask2 = uniform_where_no_key(q, mask, in_window)
    v = jnp.asarray([[[[1.0]], [[3.0]], [[100.0]]]])  # (1, 3, 1, 1)
    out = dense_attention(q2, jax.random.normal(jax.random.key(0), (1, 3, 1, 4)), v, mask2)
    np.testing.assert_allclose(out[0, :, 0, 0], [2.0, 3.0], rtol=1e-6)
