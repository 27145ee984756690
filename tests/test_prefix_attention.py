"""The hybrid layer's long-prefix path (norm + projection inside the key-block loop) equals the plain computation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax.model.attention import dense_attention
from perceiver_ar_jax.model.attention.prefix import combine_with_latents, make_projection, prefix_attention
from perceiver_ar_jax.model.masks import cross_attention_mask
from perceiver_ar_jax.model.positions import apply_rotary, rotary_angles

BATCH, HEADS, HEAD_DIM, CHANNELS, LATENTS = 2, 3, 4, 12, 8
NORM = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False)


def inputs(prefix_len, num_pads, seed=0):
    """q, raw [prefix, latents] inputs, parameters (norm + kernels), angles, mask (row 1 left-padded), cotangent."""
    num_keys = prefix_len + LATENTS
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (BATCH, LATENTS, HEADS, HEAD_DIM))
    x = 3.0 + 2.0 * jax.random.normal(keys[1], (BATCH, num_keys, CHANNELS))  # far from normalised
    kernels = jax.random.normal(keys[2], (2, CHANNELS, HEADS, HEAD_DIM)) / 4
    params = {"k_kernel": kernels[0], "v_kernel": kernels[1],
              "norm": {"scale": 1.0 + 0.3 * jax.random.normal(keys[3], (CHANNELS,)),
                       "bias": 0.2 * jax.random.normal(keys[4], (CHANNELS,))}}
    angles = rotary_angles(jnp.broadcast_to(jnp.arange(num_keys), (BATCH, num_keys)), HEAD_DIM)
    pad = jnp.zeros((BATCH, num_keys), bool).at[1, :num_pads].set(True)
    cotangent = jax.random.normal(keys[5], q.shape)
    return q, x, params, angles, cross_attention_mask(LATENTS, num_keys, pad), cotangent


def plain(q, x, params, angles, mask):
    """The dense path: normalise the prefix, concatenate, project, rotate, attend."""
    h = NORM.apply({"params": params["norm"]}, x)
    k, v = (jnp.einsum("bkc,chd->bkhd", h, params[name]) for name in ("k_kernel", "v_kernel"))
    return dense_attention(q, apply_rotary(k, angles), v, mask)


def blockwise(prefix_len, block_size):
    def attention(q, x, params, angles, mask):
        project = make_projection(NORM, jnp.float32)
        prefix = prefix_attention(q, x[:, :prefix_len], project, params, angles[:, :prefix_len],
                                  mask[..., :prefix_len], block_size)
        k_latent, v_latent = project(params, x[:, prefix_len:])
        k_latent = apply_rotary(k_latent, angles[:, prefix_len:])
        return combine_with_latents(prefix, q, k_latent, v_latent, mask[..., prefix_len:], prefix_len, block_size)

    return attention


def value_and_grads(attention, q, x, params, angles, mask, cotangent):
    loss = lambda q, x, params: jnp.sum(attention(q, x, params, angles, mask) * cotangent)  # noqa: E731
    return jax.jit(lambda q, x, params: (attention(q, x, params, angles, mask),
                                         jax.grad(loss, argnums=(0, 1, 2))(q, x, params)))(q, x, params)


@pytest.mark.parametrize("prefix_len, num_pads, block_size", [
    (29, 5, 4),  # several blocks and a partial last one, padding inside the prefix
    (29, 32, 8),  # the first three latents see only pads: uniform over every key
    (29, 0, 512),  # one block
])
def test_prefix_path_equals_plain_attention_in_forward_and_gradients(prefix_len, num_pads, block_size):
    q, x, params, angles, mask, cotangent = inputs(prefix_len, num_pads)
    out, grads = value_and_grads(blockwise(prefix_len, block_size), q, x, params, angles, mask, cotangent)
    expected_out, expected_grads = value_and_grads(plain, q, x, params, angles, mask, cotangent)
    np.testing.assert_allclose(out, expected_out, rtol=0, atol=1e-5)
    for (path, actual), expected in zip(jax.tree_util.tree_leaves_with_path(grads),
                                        jax.tree_util.tree_leaves(expected_grads), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=0, atol=2e-5, err_msg=jax.tree_util.keystr(path))


def test_value_sum_is_the_sum_of_all_prefix_values():
    q, x, params, angles, mask, _ = inputs(29, 5)
    prefix = prefix_attention(q, x[:, :29], make_projection(NORM, jnp.float32), params, angles[:, :29],
                              mask[..., :29], block_size=4)
    values = jnp.einsum("bkc,chd->bkhd", NORM.apply({"params": params["norm"]}, x[:, :29]), params["v_kernel"])
    np.testing.assert_allclose(prefix.value_sum, values.sum(axis=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(prefix.visible, jnp.any(mask[..., :29], axis=-1))


def test_prefix_dropout_is_reproducible_and_changes_the_output():
    q, x, params, angles, mask, _ = inputs(29, 5)
    project = make_projection(NORM, jnp.float32)

    def attend(x, rate, rng):
        return prefix_attention(q, x, project, params, angles[:, :29], mask[..., :29], 8, rate, rng).out

    dropped = jax.jit(lambda seed: attend(x[:, :29], 0.3, jax.random.key(seed)))
    np.testing.assert_array_equal(dropped(0), dropped(0))
    assert not np.allclose(dropped(0), dropped(1), atol=1e-4)
    assert not np.allclose(dropped(0), jax.jit(lambda: attend(x[:, :29], 0.0, None))(), atol=1e-4)
    grads = jax.jit(jax.grad(lambda x: jnp.sum(attend(x, 0.3, jax.random.key(0)))))(x[:, :29])
    assert np.isfinite(grads).all() and np.abs(grads).max() > 0
