"""Multi-head attention with rotary embedding, as perceiver-io's `MultiHeadAttention`.

Queries are scaled by head_dim^-0.5 before they are rotated; masked scores are set to the most negative finite
float32 (not -inf), so a query whose keys are all masked attends uniformly to every key instead of giving NaN, as
in perceiver-io. Scores and softmax are computed in float32 whatever the compute dtype.

Three implementations compute the same thing (`attention_impl`): "xla" materialises the (queries x keys) scores
(`dense_attention`); "blockwise" runs an online softmax over key blocks in XLA (`blockwise_attention.py`), whose
memory does not grow with queries x keys; "splash" is the Pallas TPU kernel (`pallas_attention.py`). "auto" takes
splash on TPU, blockwise for long keys elsewhere, dense otherwise (`resolve_attention_impl`). The hybrid layer's
attention (`MultiHeadAttention.hybrid`) with "blockwise" also normalises and projects the prefix block by block
(`prefix_attention.py`), and can split the prefix over a mesh axis (`context_parallel.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_jax import matmul
from perceiver_ar_jax.blockwise_attention import MASKED_SCORE, blockwise_attention
from perceiver_ar_jax.position import apply_rotary

__all__ = ["MASKED_SCORE", "MultiHeadAttention", "dense_attention", "resolve_attention_impl"]

# "auto" switches from dense to blockwise above this many keys: below it the scores of 256-512 latents are a few
# MB per head and one fused softmax is faster than a loop; above it they dominate the step's memory.
AUTO_BLOCKWISE_MIN_KEYS = 2048


def resolve_attention_impl(impl: str, num_queries: int, num_keys: int, dropout: bool,
                           backend: str | None = None) -> str:
    """The implementation ("xla" | "blockwise" | "splash") that `impl` means for these shapes.

    "auto": splash on TPU when there are several queries; otherwise blockwise when keys > AUTO_BLOCKWISE_MIN_KEYS
    and there is more than one query (one query's scores are only (batch, heads, 1, keys): a single dense pass is
    cheaper), else xla. Splash has no probability dropout, so with `dropout` active it becomes blockwise.
    """
    backend = jax.default_backend() if backend is None else backend
    long_keys = num_keys > AUTO_BLOCKWISE_MIN_KEYS and num_queries > 1
    if impl == "auto":
        if backend == "tpu" and num_queries > 1 and not dropout:
            return "splash"
        return "blockwise" if long_keys else "xla"
    if impl == "splash" and dropout:
        return "blockwise"
    if impl not in ("xla", "blockwise", "splash"):
        raise ValueError(f"attention_impl={impl!r} is out of range: must be one of auto, xla, blockwise, splash")
    return impl


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
    """Query/key/value/output projections around the attention chosen by `attention_impl`.

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
    attention_impl: str = "xla"  # "auto" | "xla" | "blockwise" | "splash", see resolve_attention_impl
    attention_block_size: int = 512  # key block length of blockwise and splash

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
                dot_general=matmul.dot_general,
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
        q = self.queries(x_q, q_angles)
        if k_angles is not None:
            k = apply_rotary(k, k_angles)
        return self.o_proj(self.attend(q, k, v, mask, deterministic))

    def queries(self, x_q: jnp.ndarray, q_angles: jnp.ndarray | None) -> jnp.ndarray:
        """(batch, queries, channels) -> (batch, queries, heads, head_dim): projected, scaled by head_dim^-0.5,
        rotated by q_angles (batch, queries, rotated) unless None."""
        q = self.q_proj(x_q) * jnp.asarray((self.num_channels // self.num_heads) ** -0.5, self.dtype)
        return q if q_angles is None else apply_rotary(q, q_angles)

    def hybrid(
        self,
        x_latent: jnp.ndarray,
        x_prefix: jnp.ndarray,
        latent_angles: jnp.ndarray | None,
        prefix_angles: jnp.ndarray | None,
        mask: jnp.ndarray | None,
        prefix_norm: nn.Module | None = None,
        context_parallel_axis: str | None = None,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """The hybrid layer's attention: latents (queries, and keys) to [prefix, latents]. Same result as
        `__call__(x_latent, *project_kv(concat(prefix_norm(x_prefix), x_latent)), latent_angles, concat(angles),
        mask)`.

        x_latent (batch, latents, channels), normalised; x_prefix (batch, prefix, channels), normalised by
        prefix_norm (a LayerNorm module) unless that is None; angles (batch, latents|prefix, rotated) or None;
        mask broadcastable to (batch, heads, latents, prefix + latents), whose prefix columns are the same for
        every latent (as `masks.cross_attention_mask`: padding hides prefix keys, causality acts among the latents);
        context_parallel_axis: mesh axis to split the prefix over, or None. Returns (batch, latents, channels).

        With "blockwise" attention or a context-parallel axis, the normalised prefix and its keys and values are
        never materialised (prefix_attention.py); otherwise this is the concatenation above, attended by `attend`.
        """
        num_latents, prefix_len = x_latent.shape[1], x_prefix.shape[1]
        dropout = self.dropout_rate > 0.0 and not deterministic
        impl = resolve_attention_impl(self.attention_impl, num_latents, prefix_len + num_latents, dropout)
        if prefix_len == 0 or (context_parallel_axis is None and impl != "blockwise"):
            x_prefix = x_prefix if prefix_norm is None else prefix_norm(x_prefix)
            k, v = self.project_kv(jnp.concatenate([x_prefix, x_latent], axis=1))
            k_angles = None if latent_angles is None else jnp.concatenate([prefix_angles, latent_angles], axis=1)
            return self(x_latent, k, v, latent_angles, k_angles, mask, deterministic)

        from perceiver_ar_jax import context_parallel, prefix_attention  # long-context paths only

        q = self.queries(x_latent, latent_angles)
        k_latent, v_latent = self.project_kv(x_latent)  # also creates the k/v kernels at init
        if latent_angles is not None:
            k_latent = apply_rotary(k_latent, latent_angles)
        params = {name: nn.unbox(p.variables["params"]["kernel"])  # (channels, heads, head_dim)
                  for name, p in (("k_kernel", self.k_proj), ("v_kernel", self.v_proj))}
        norm = None
        if prefix_norm is not None:
            if self.is_initializing():
                prefix_norm(x_prefix[:, :1])  # creates its params, which the projection reads
            params["norm"] = nn.unbox(prefix_norm.variables["params"])
            norm = prefix_norm.clone(parent=None)  # the same LayerNorm maths, applied per key block
        project = prefix_attention.make_projection(norm, self.dtype)

        mask_prefix = mask_latent = mask
        if mask is not None and mask.shape[-1] != 1:
            # every latent sees the same prefix keys (causality acts among the latents only), so one row of the
            # prefix columns says it all: (batch, 1, 1, prefix) instead of a latents x prefix mask in memory
            mask_prefix, mask_latent = mask[..., -1:, :prefix_len], mask[..., prefix_len:]
        rate = self.dropout_rate if dropout else 0.0
        rng_prefix, rng_latent = jax.random.split(self.make_rng("dropout")) if dropout else (None, None)
        if context_parallel_axis is None:
            prefix = prefix_attention.prefix_attention(q, x_prefix, project, params, prefix_angles, mask_prefix,
                                                       self.attention_block_size, rate, rng_prefix)
        else:
            prefix = context_parallel.context_parallel_prefix_attention(
                q, context_parallel.shard_prefix(x_prefix, context_parallel_axis), project, params, prefix_angles,
                mask_prefix, context_parallel_axis, self.attention_block_size, rate, rng_prefix)
        o = prefix_attention.combine_with_latents(prefix, q, k_latent, v_latent, mask_latent, prefix_len,
                                                  self.attention_block_size, rate, rng_latent)
        return self.o_proj(o.astype(v_latent.dtype))

    def attend(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray | None,
               deterministic: bool = True) -> jnp.ndarray:
        """Scaled, rotated q (batch, queries, heads, head_dim) and k, v (batch, keys, heads, head_dim) ->
        (batch, queries, heads, head_dim), by the implementation `attention_impl` resolves to."""
        dropout = self.dropout_rate > 0.0 and not deterministic
        impl = resolve_attention_impl(self.attention_impl, q.shape[1], k.shape[1], dropout)
        if impl == "blockwise":
            rng = self.make_rng("dropout") if dropout else None
            return blockwise_attention(q, k, v, mask, self.attention_block_size,
                                       self.dropout_rate if dropout else 0.0, rng)
        if impl == "splash":
            # imported on use: the Pallas TPU ops are experimental and not needed by the other paths
            from perceiver_ar_jax.pallas_attention import splash_attention_from_mask

            return splash_attention_from_mask(q, k, v, mask, self.attention_block_size)
        dense_dropout = None
        if dropout:
            dense_dropout = lambda p: self.attention_dropout(p, deterministic=False)  # noqa: E731
        return dense_attention(q, k, v, mask, dropout=dense_dropout, max_heads_parallel=self.max_heads_parallel)
