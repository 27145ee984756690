"""Multi-head attention with rotary embedding, as perceiver-io's `MultiHeadAttention`.

The query/key/value/output projections around the attention that `dispatch.py` chooses. Queries are scaled by
head_dim^-0.5 before they are rotated. Three ways in:
- `__call__`: queries attend to keys/values projected by `project_kv` (training, full forward passes);
- `hybrid`: the hybrid layer's latents attend to [prefix, latents]; with "blockwise" attention or context
  parallelism (the logical axis `context` mapped to mesh axes, `model/sharding.py`) the prefix is normalised,
  projected and rotated block by block (`prefix.py`, `context_parallel.py`), so its keys and values are never
  materialised; splash with context parallelism runs the kernel per prefix shard
  (`context_parallel.context_parallel_splash_attention`);
- `attend_cached`: decoding, new queries attend to keys/values held in a cache (`CachedKeysValues`), plus their own.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_jax import backend
from perceiver_ar_jax.model.attention.blockwise import blockwise_attention
from perceiver_ar_jax.model.attention.dense import cached_attention
from perceiver_ar_jax.model.attention.dispatch import attend, resolve_attention_impl, resolve_cached_impl
from perceiver_ar_jax.model.linear import Linear
from perceiver_ar_jax.model.masks import AttentionMask, Mask, uniform_where_no_key
from perceiver_ar_jax.model.positions import apply_rotary
from perceiver_ar_jax.model.sharding import context_axes


class CachedKeysValues(NamedTuple):
    """Keys and values of earlier tokens that decoding queries attend to (a layer's cache, or part of it).

    keys (batch, heads, head_dim, slots), rotated, and values (batch, heads, slots, head_dim): the layouts that the
    products of a few queries read without a transpose. mask: bool broadcastable to (batch, 1, queries, slots),
    True = may attend. uniform_over: None, or bool broadcastable to (batch, 1, 1, slots): a query that sees no key
    attends uniformly to these (perceiver-io's rule for such a query is all keys of its window; stale or bucket
    slots of a cache are not keys of the window).
    """

    keys: jnp.ndarray
    values: jnp.ndarray
    mask: jnp.ndarray
    uniform_over: jnp.ndarray | None = None


class MultiHeadAttention(nn.Module):
    """Query/key/value/output projections around the attention chosen by `attention_impl`.

    Keys and values are projected by `project_kv` separately from `__call__`, so that a KV cache can store them
    and hand them back (`attend_cached`).
    """

    num_heads: int
    num_channels: int
    out_bias: bool
    init_scale: float
    dropout_rate: float = 0.0
    max_heads_parallel: int | None = None
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    attention_impl: str = "xla"  # "auto" | "xla" | "blockwise" | "splash" | "cudnn", see dispatch.py
    attention_block_size: int = 512  # key block length of blockwise and splash
    precision: str | None = None  # of every product: "default" | "high" | "highest" (lax.Precision), None = default

    def setup(self):
        head_dim = self.num_channels // self.num_heads

        def projection(name, features, in_axes, kernel_axes, bias):
            return Linear(features=features, kernel_axes=kernel_axes, init_scale=self.init_scale, in_axes=in_axes,
                          use_bias=bias, dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision,
                          name=name)

        # perceiver-io builds the Perceiver AR attention with qkv_bias=False
        self.q_proj = projection("q_proj", (self.num_heads, head_dim), 1, ("embed", "heads", "kv"), False)
        self.k_proj = projection("k_proj", (self.num_heads, head_dim), 1, ("embed", "heads", "kv"), False)
        self.v_proj = projection("v_proj", (self.num_heads, head_dim), 1, ("embed", "heads", "kv"), False)
        self.o_proj = projection("o_proj", (self.num_channels,), 2, ("heads", "kv", "embed"), self.out_bias)
        self.attention_dropout = nn.Dropout(self.dropout_rate)

    def project_kv(self, x_kv: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        """(batch, keys, channels) -> keys, values (batch, keys, heads, head_dim), not rotated."""
        return self.k_proj(x_kv), self.v_proj(x_kv)

    def keys_values(self, x_kv: jnp.ndarray, angles: jnp.ndarray | None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """`project_kv`, keys rotated by angles (batch, keys, rotated) unless None."""
        k, v = self.project_kv(x_kv)
        return (k if angles is None else apply_rotary(k, angles)), v

    def queries(self, x_q: jnp.ndarray, q_angles: jnp.ndarray | None) -> jnp.ndarray:
        """(batch, queries, channels) -> (batch, queries, heads, head_dim): projected, scaled by head_dim^-0.5,
        rotated by q_angles (batch, queries, rotated) unless None."""
        q = self.q_proj(x_q) * jnp.asarray((self.num_channels // self.num_heads) ** -0.5, self.dtype)
        return q if q_angles is None else apply_rotary(q, q_angles)

    def __call__(
        self,
        x_q: jnp.ndarray,
        k: jnp.ndarray,
        v: jnp.ndarray,
        q_angles: jnp.ndarray | None,
        k_angles: jnp.ndarray | None,
        mask: Mask,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """Attend from x_q (batch, queries, channels) to projected k, v; returns (batch, queries, channels).

        q_angles / k_angles: rotary angles (batch, queries|keys, rotated) or None for no rotation.
        """
        q = self.queries(x_q, q_angles)
        if k_angles is not None:
            k = apply_rotary(k, k_angles)
        return self.o_proj(self.attend(q, k, v, mask, deterministic))

    def attend_cached(
        self,
        x_q: jnp.ndarray,
        q_angles: jnp.ndarray | None,
        cache: CachedKeysValues,
        own_kv: tuple[jnp.ndarray, jnp.ndarray] | None = None,
    ) -> jnp.ndarray:
        """Decoding: x_q (batch, queries, channels) attends to the cache and, if own_kv is given, to the queries'
        own rotated keys/values (batch, queries, heads, head_dim), causally. Returns (batch, queries, channels).

        Many queries over a long cache (a long prompt's prefill) take the blockwise path of `attention_impl`; all
        else is dense over the cache layout. The TPU kernel is not used: a cache's masks are not the causal and
        padding masks it implements.
        """
        q = self.queries(x_q, q_angles)
        mask = cache.mask
        if cache.uniform_over is not None:
            q, mask = uniform_where_no_key(q, mask, cache.uniform_over)
        impl = resolve_cached_impl(self.attention_impl, q.shape[1], cache.keys.shape[-1])
        precision = backend.as_precision(self.precision)
        if own_kv is None and impl == "blockwise":
            keys = jnp.transpose(cache.keys, (0, 3, 1, 2))  # (batch, slots, heads, head_dim)
            o = blockwise_attention(q, keys, jnp.swapaxes(cache.values, 1, 2), mask, self.attention_block_size,
                                    precision=precision)
        else:
            o = cached_attention(q, cache.keys, cache.values, mask, *(own_kv or (None, None)), precision=precision)
        return self.o_proj(o.astype(self.dtype))

    def hybrid(
        self,
        x_latent: jnp.ndarray,
        x_prefix: jnp.ndarray,
        latent_angles: jnp.ndarray | None,
        prefix_angles: jnp.ndarray | None,
        mask: Mask,
        prefix_norm: nn.Module | None = None,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """The hybrid layer's attention: latents (queries, and keys) to [prefix, latents]. Same result as
        `__call__(x_latent, *project_kv(concat(prefix_norm(x_prefix), x_latent)), latent_angles, concat(angles),
        mask)`.

        x_latent (batch, latents, channels), normalised; x_prefix (batch, prefix, channels), normalised by
        prefix_norm (a LayerNorm module) unless that is None; angles (batch, latents|prefix, rotated) or None;
        mask: an `AttentionMask` of latents x (prefix + latents) keys, or a bool array broadcastable to (batch,
        heads, latents, prefix + latents) whose prefix columns are the same for every latent (as
        `masks.cross_attention_mask`: padding hides prefix keys, causality acts among the latents). Returns
        (batch, latents, channels).

        With "blockwise" attention or context parallelism (the prefix split over the mesh axes of the logical axis
        `context`), the normalised prefix and its keys and values are never materialised (prefix.py); otherwise
        this is the concatenation above, attended by `attend`.
        """
        num_latents, prefix_len = x_latent.shape[1], x_prefix.shape[1]
        dropout = self.dropout_rate > 0.0 and not deterministic
        impl = resolve_attention_impl(self.attention_impl, num_latents, prefix_len + num_latents, dropout,
                                      dtype=self.dtype, head_dim=self.num_channels // self.num_heads, mask=mask)
        context = context_axes() if prefix_len else ()
        if prefix_len == 0 or (not context and impl != "blockwise"):
            x_prefix = x_prefix if prefix_norm is None else prefix_norm(x_prefix)
            k, v = self.project_kv(jnp.concatenate([x_prefix, x_latent], axis=1))
            k_angles = None if latent_angles is None else jnp.concatenate([prefix_angles, latent_angles], axis=1)
            return self(x_latent, k, v, latent_angles, k_angles, mask, deterministic)

        from perceiver_ar_jax.model.attention import context_parallel, prefix  # long-context paths only

        q = self.queries(x_latent, latent_angles)
        if impl == "splash" and isinstance(mask, AttentionMask) and mask.causal:
            # the kernel per device on its prefix shard, merged over the context axes (keys and values materialised)
            x_prefix = context_parallel.shard_prefix(x_prefix, context)
            x_prefix = x_prefix if prefix_norm is None else prefix_norm(x_prefix)
            k_prefix, v_prefix = self.keys_values(x_prefix, None if latent_angles is None else prefix_angles)
            k_latent, v_latent = self.keys_values(x_latent, latent_angles)
            o = context_parallel.context_parallel_splash_attention(q, k_prefix, v_prefix, k_latent, v_latent,
                                                                   mask.key_pad, context, self.attention_block_size)
            return self.o_proj(o.astype(v_latent.dtype))
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
        precision = backend.as_precision(self.precision)
        project = prefix.make_projection(norm, self.dtype, precision)

        mask_prefix = mask_latent = mask
        if isinstance(mask, AttentionMask):
            mask_prefix, latent_mask = mask.split_keys(prefix_len)
            mask_latent = latent_mask.array()
        elif mask is not None and mask.shape[-1] != 1:
            # every latent sees the same prefix keys (causality acts among the latents only), so one row of the
            # prefix columns says it all: (batch, 1, 1, prefix) instead of a latents x prefix mask in memory
            mask_prefix, mask_latent = mask[..., -1:, :prefix_len], mask[..., prefix_len:]
        rate = self.dropout_rate if dropout else 0.0
        rng_prefix, rng_latent = jax.random.split(self.make_rng("dropout")) if dropout else (None, None)
        if not context:
            prefix_part = prefix.prefix_attention(q, x_prefix, project, params, prefix_angles, mask_prefix,
                                                  self.attention_block_size, rate, rng_prefix, precision)
        else:
            prefix_part = context_parallel.context_parallel_prefix_attention(
                q, context_parallel.shard_prefix(x_prefix, context), project, params, prefix_angles, mask_prefix,
                context, self.attention_block_size, rate, rng_prefix, precision)
        o = prefix.combine_with_latents(prefix_part, q, k_latent, v_latent, mask_latent, prefix_len,
                                        self.attention_block_size, rate, rng_latent, precision)
        return self.o_proj(o.astype(v_latent.dtype))

    def attend(self, q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: Mask,
               deterministic: bool = True) -> jnp.ndarray:
        """Scaled, rotated q (batch, queries, heads, head_dim) and k, v (batch, keys, heads, head_dim) ->
        (batch, queries, heads, head_dim), by the implementation `attention_impl` resolves to."""
        precision = backend.as_precision(self.precision)
        if self.dropout_rate > 0.0 and not deterministic:
            return attend(q, k, v, mask, self.attention_impl, self.attention_block_size, self.dropout_rate,
                          lambda: self.make_rng("dropout"), lambda p: self.attention_dropout(p, deterministic=False),
                          self.max_heads_parallel, precision)
        return attend(q, k, v, mask, self.attention_impl, self.attention_block_size,
                      max_heads_parallel=self.max_heads_parallel, precision=precision)
