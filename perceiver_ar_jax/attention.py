"""Multi-head attention with rotary embedding, as perceiver-io's `MultiHeadAttention`.

Queries are scaled by head_dim^-0.5 before they are rotated; masked scores are set to the most negative finite
float32 (not -inf), so a query whose keys are all masked attends uniformly to every key instead of giving NaN, as
in perceiver-io. Scores and softmax are computed in float32 whatever the compute dtype.
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_jax.position import apply_rotary

MASKED_SCORE = float(jnp.finfo(jnp.float32).min)  # == -finfo(float32).max, what perceiver-io fills in


def dense_attention(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: jnp.ndarray | None,
    dropout: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
    max_heads_parallel: int | None = None,
) -> jnp.ndarray:
    """Softmax attention that materialises the (queries x keys) scores, `max_heads_parallel` heads at a time.

    q: (batch, queries, heads, head_dim), already scaled and rotated; k, v: (batch, keys, heads, head_dim);
    mask: bool, broadcastable to (batch, heads, queries, keys), True = may attend; dropout: applied to the
    probabilities. Returns (batch, queries, heads, head_dim) in v's dtype.
    """
    num_heads = q.shape[2]
    chunk = num_heads if max_heads_parallel is None else min(max_heads_parallel, num_heads)
    outputs = []
    for start in range(0, num_heads, chunk):
        heads = slice(start, start + chunk)
        scores = jnp.einsum("bqhd,bkhd->bhqk", q[:, :, heads], k[:, :, heads], preferred_element_type=jnp.float32)
        if mask is not None:
            head_mask = mask if mask.shape[1] == 1 else mask[:, heads]
            scores = jnp.where(head_mask, scores, MASKED_SCORE)
        probs = jax.nn.softmax(scores, axis=-1)
        if dropout is not None:
            probs = dropout(probs)
        outputs.append(jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v[:, :, heads]))
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=2)


class MultiHeadAttention(nn.Module):
    """Query/key/value/output projections around `dense_attention`.

    Keys and values are projected by `project_kv` separately from `__call__`, so that a KV cache can store them
    (before rotation, as perceiver-io's cache does) and hand them back.
    """

    num_heads: int
    num_channels: int
    out_bias: bool
    init_scale: float
    dropout_rate: float = 0.0
    max_heads_parallel: int | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def setup(self):
        head_dim = self.num_channels // self.num_heads
        init = nn.initializers.normal(stddev=self.init_scale)

        def projection(name, features, axis, kernel_axes, bias):
            return nn.DenseGeneral(
                features=features,
                axis=axis,
                use_bias=bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(init, kernel_axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                name=name,
            )

        # perceiver-io builds the Perceiver AR attention with qkv_bias=False
        self.q_proj = projection("q_proj", (self.num_heads, head_dim), -1, ("embed", "heads", "kv"), False)
        self.k_proj = projection("k_proj", (self.num_heads, head_dim), -1, ("embed", "heads", "kv"), False)
        self.v_proj = projection("v_proj", (self.num_heads, head_dim), -1, ("embed", "heads", "kv"), False)
        self.o_proj = projection("o_proj", self.num_channels, (-2, -1), ("heads", "kv", "embed"), self.out_bias)
        self.attention_dropout = nn.Dropout(self.dropout_rate)

    def project_kv(self, x_kv: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(batch, keys, channels) -> keys, values (batch, keys, heads, head_dim), not rotated."""
        return self.k_proj(x_kv), self.v_proj(x_kv)

    def __call__(
        self,
        x_q: jnp.ndarray,
        k: jnp.ndarray,
        v: jnp.ndarray,
        q_angles: jnp.ndarray | None,
        k_angles: jnp.ndarray | None,
        mask: jnp.ndarray | None,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """Attend from x_q (batch, queries, channels) to projected k, v; returns (batch, queries, channels).

        q_angles / k_angles: rotary angles (batch, queries|keys, rotated) or None for no rotation.
        """
        q = self.q_proj(x_q) * jnp.asarray((self.num_channels // self.num_heads) ** -0.5, self.dtype)
        if q_angles is not None:
            q = apply_rotary(q, q_angles)
        if k_angles is not None:
            k = apply_rotary(k, k_angles)
        dropout = None
        if self.dropout_rate > 0.0 and not deterministic:
            dropout = lambda p: self.attention_dropout(p, deterministic=False)  # noqa: E731
        o = dense_attention(q, k, v, mask, dropout=dropout, max_heads_parallel=self.max_heads_parallel)
        return self.o_proj(o)
