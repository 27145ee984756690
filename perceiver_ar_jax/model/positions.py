"""Positions and the rotary position embedding of Perceiver AR.

Positions count from the first real token: with left padding, every position of a row is shifted down by that
row's number of pad tokens and clamped at 0 (pads all get position 0). Rotary embedding (Su et al. 2021) rotates
interleaved channel pairs (c0, c1), (c2, c3), ... of the first `num_rotated_channels` channels of each head; the
frequencies are 10000^(-2i / num_rotated_channels). Queries and keys are right-aligned, so a query and the key of
the same token get the same rotation.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from perceiver_ar_jax.backend import computed_once


def positions(batch_size: int, length: int, pad_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Absolute positions (batch, length) int32: 0..length-1, shifted left by each row's pad count.

    pad_mask: (batch, length) bool, True = pad; rows must be left-padded.
    """
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch_size, length))
    if pad_mask is not None:
        pos = pos - jnp.sum(pad_mask, axis=1, keepdims=True, dtype=jnp.int32)
    return jnp.maximum(pos, 0)


def inverse_frequencies(num_rotated_channels: int) -> np.ndarray:
    """(num_rotated_channels // 2,) float32, computed in float32 as perceiver-io's FrequencyPositionEncoding."""
    exponent = np.arange(0, num_rotated_channels, 2, dtype=np.float32) / np.float32(num_rotated_channels)
    return (np.float32(1.0) / np.power(np.float32(10000.0), exponent)).astype(np.float32)


def rotary_angles(pos: jnp.ndarray, num_rotated_channels: int) -> jnp.ndarray:
    """Rotation angle of every rotated channel: (batch, length) -> (batch, length, num_rotated_channels) float32.

    Each frequency appears twice in a row ([f0, f0, f1, f1, ...]) because pairs of adjacent channels rotate together.
    """
    angles = pos.astype(jnp.float32)[..., None] * jnp.asarray(inverse_frequencies(num_rotated_channels))
    return jnp.repeat(angles, 2, axis=-1)


def apply_rotary(x: jnp.ndarray, angles: jnp.ndarray) -> jnp.ndarray:
    """Rotate the first channels of every head of x.

    x: (batch, length, heads, head_dim); angles: (batch, length, num_rotated) with num_rotated <= head_dim.
    The rotation is computed in float32 and cast back to x's dtype.
    """
    num_rotated = angles.shape[-1]
    x_rot, x_pass = x[..., :num_rotated].astype(jnp.float32), x[..., num_rotated:]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if angles.shape[1] > 1:  # evaluated once, not per head in every fusion reading them (backend.computed_once);
        cos, sin = computed_once(cos), computed_once(sin)  # a decoding step's single position stays fused
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # broadcast over heads
    # [x0, x1, x2, x3, ...] -> [-x1, x0, -x3, x2, ...]: the 90-degree turn of each (even, odd) channel pair
    pairs = x_rot.reshape(*x_rot.shape[:-1], num_rotated // 2, 2)
    turned = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x_rot.shape)
    x_rot = x_rot * cos + turned * sin
    return jnp.concatenate([x_rot.astype(x.dtype), x_pass], axis=-1)
