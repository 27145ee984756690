"""Context parallelism for the hybrid cross-attention: the prefix is sharded along its length over mesh axes.

The axes are those the logical axis `context` maps to under the active logical-axis rules and mesh
(`model/sharding.py`; e.g. the rule `("context", "tensor")`); `MultiHeadAttention.hybrid` calls this when there
are any.

Only the first layer of Perceiver AR sees the prefix, and there the queries are the few latents (256-1024) while
the keys are the long prefix (up to ~1M tokens). So the prefix stays where it is, each device holding
prefix_len / n of its tokens, and the small side moves:

- every device holds all latent queries (replicated over the `context` axis: (batch, latents, channels) is a
  few MB, versus prefix_len x channels per example for the prefix);
- each device runs `prefix_attention` (keys and values projected block by block from its own prefix shard) for
  all latents, giving a partial output and the log-sum-exp of its scores per query;
- the partial results are merged across the axis with one log-sum-exp combination (pmax of the lse, then psum of
  the weighted outputs and of the weights): o = sum_i exp(lse_i - m) o_i / sum_i exp(lse_i - m).

Per layer that is a few all-reduces of (batch, latents, heads, head_dim) floats, independent of the prefix length.
A ring over key blocks (ring attention) would instead move the prefix keys/values around the ring: prefix-sized
traffic, needed only when the queries are as long as the keys, which Perceiver AR avoids by construction. The
latent keys (the last `latents` keys, causal among themselves) are replicated and attended to on every device,
then merged the same way (`prefix_attention.combine_with_latents`). The backward pass is JAX's transpose of the
collectives: the gradient of each prefix shard stays on its device, those of the queries and the k/v kernels are
summed over the axis.

A query whose keys are all masked (left padding with prefix_len 0) attends uniformly to all keys in the dense
path; a merged log-sum-exp cannot express that, so such rows are found from the mask and set to the mean of all
values (see prefix.py). The prefix is zero-padded to a multiple of the axis size with masked keys, which
that mean leaves out.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from perceiver_ar_jax.model.attention.blockwise import mask_4d, merge_partial_attention
from perceiver_ar_jax.model.attention.dense import MASKED_SCORE
from perceiver_ar_jax.model.attention.prefix import PrefixAttention, ProjectFn, prefix_attention
from perceiver_ar_jax.model.sharding import free_mesh_axes, mesh_spec


def context_axis_size(axes: tuple[str, ...]) -> int:
    """The number of prefix shards: the product of the sizes of mesh axes `axes` of the mesh set with
    `jax.set_mesh`; ValueError naming an axis the mesh does not have."""
    mesh = jax.sharding.get_abstract_mesh()
    names = () if mesh.empty else tuple(mesh.axis_names)
    for axis in axes:
        if axis not in names:
            raise ValueError(f"context axis {axis!r} is not an axis of the current mesh (axes: {names}); set a mesh "
                             "that has it with jax.set_mesh(...)")
    return math.prod(mesh.shape[a] for a in axes)


def shard_prefix(x: jnp.ndarray, axes: tuple[str, ...]) -> jnp.ndarray:
    """Constrain x (batch, prefix, ...) to be split along the prefix over `axes` (other dims unconstrained)."""
    context_axis_size(axes)
    spec = P(P.UNCONSTRAINED, axes, *([P.UNCONSTRAINED] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, spec)


def context_parallel_prefix_attention(
    q: jnp.ndarray,
    x_prefix: jnp.ndarray,
    project: ProjectFn,
    params: Any,
    prefix_angles: jnp.ndarray | None,
    mask: jnp.ndarray | None,
    axes: tuple[str, ...],
    block_size: int = 512,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    precision: jax.lax.Precision | None = None,
) -> PrefixAttention:
    """`prefix_attention.prefix_attention` with the prefix split along its length over mesh axes `axes`.

    q: (batch, latents, heads, head_dim), scaled and rotated, replicated over the axis; x_prefix: (batch, prefix,
    channels); project, params: the per-block key/value projection (`prefix_attention.make_projection`), params
    replicated over the axis; prefix_angles: (batch, prefix, rotated) or None; mask: bool broadcastable to (batch,
    heads, latents, prefix) or None. Returns the attention to the whole prefix (the same PrefixAttention as
    unsharded), replicated over the axis.
    """
    prefix_len = x_prefix.shape[1]
    axes = tuple(axes)
    num_shards = context_axis_size(axes)
    mask = mask_4d(mask)
    padding = -prefix_len % num_shards
    if padding:  # zero prefix rows behind a False mask: every shard holds the same number of keys
        x_prefix = jnp.pad(x_prefix, ((0, 0), (0, padding), (0, 0)))
        if prefix_angles is not None:
            prefix_angles = jnp.pad(prefix_angles, ((0, 0), (0, padding), (0, 0)))
        real = jnp.arange(prefix_len + padding)[None, None, None, :] < prefix_len
        if mask is None or mask.shape[-1] == 1:
            mask = real if mask is None else mask & real
        else:
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, padding)), constant_values=False)

    def shard(q, x, params, angles, mask, rng):
        # q and the params are the same on every shard but their gradients differ per shard: marking them as
        # varying makes the transpose of this cast sum the per-shard gradients over the axis
        q, params = jax.tree.map(lambda a: jax.lax.pcast(a, axes, to="varying"), (q, params))
        if rng is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axes))
        part = prefix_attention(q, x, project, params, angles, mask, block_size, dropout_rate, rng, precision)
        lse_max = jax.lax.pmax(jax.lax.stop_gradient(part.lse), axes)
        weight = jnp.exp(part.lse - lse_max)
        total = jax.lax.psum(weight, axes)
        out = jax.lax.psum(weight[..., None] * part.out, axes) / total[..., None]
        visible = None if part.visible is None else jax.lax.psum(part.visible.astype(jnp.int32), axes) > 0
        return PrefixAttention(out, lse_max + jnp.log(total), visible, jax.lax.psum(part.value_sum, axes))

    along_prefix = P(None, axes)
    mask_spec = None if mask is None else (P(None, None, None, axes) if mask.shape[-1] > 1 else P())
    in_specs = (P(), along_prefix, P(), None if prefix_angles is None else along_prefix, mask_spec,
                None if dropout_rng is None else P())
    out_specs = PrefixAttention(P(), P(), None if mask is None else P(), P())
    return jax.shard_map(shard, in_specs=in_specs, out_specs=out_specs, axis_names=set(axes))(
        q, x_prefix, params, prefix_angles, mask, dropout_rng)


def context_parallel_splash_attention(
    q: jnp.ndarray,
    k_prefix: jnp.ndarray,
    v_prefix: jnp.ndarray,
    k_latent: jnp.ndarray,
    v_latent: jnp.ndarray,
    key_pad: jnp.ndarray | None,
    axes: tuple[str, ...],
    block_size: int = 512,
    interpret: bool | None = None,
) -> jnp.ndarray:
    """The hybrid layer's attention by the splash kernel, the prefix split over mesh axes `axes`.

    One shard_map over every free mesh axis: rows and heads as `sharding.kernel_shard_map` lays them out, the
    prefix keys and values along their length over `axes`, the latent queries, keys and values replicated there.
    Each device runs splash on (its rows and heads of) all latents x its prefix shard, non-causal with its pad keys
    as segment ids, and the latents x latents causal part; the prefix parts are merged across `axes` and with the
    latent part by log-sum-exp (`splash.splash_attention_with_lse`), as `context_parallel_prefix_attention` does.
    q, k_latent, v_latent: (batch, latents, heads, head_dim), q scaled and rotated, keys rotated; k_prefix,
    v_prefix: (batch, prefix, heads, head_dim); key_pad: (batch, prefix + latents) bool, True = pad, or None.
    Returns (batch, latents, heads, head_dim) float32.
    """
    from perceiver_ar_jax.model.attention.splash import splash_attention_with_lse

    prefix_len, num_latents = k_prefix.shape[1], q.shape[1]
    axes = tuple(axes)
    num_shards = context_axis_size(axes)
    prefix_pad = None if key_pad is None else key_pad[:, :prefix_len]
    latent_pad = None if key_pad is None else key_pad[:, prefix_len:]
    padding = -prefix_len % num_shards
    if padding:  # zero keys behind pad flags: every shard holds the same number of keys
        k_prefix, v_prefix = (jnp.pad(x, ((0, 0), (0, padding), (0, 0), (0, 0))) for x in (k_prefix, v_prefix))
        prefix_pad = jnp.zeros(k_prefix.shape[:1] + (prefix_len,), bool) if prefix_pad is None else prefix_pad
        prefix_pad = jnp.pad(prefix_pad, ((0, 0), (0, padding)), constant_values=True)
    prefix_spec = mesh_spec(("batch", "context", "heads", None), k_prefix.shape)
    rows, heads = prefix_spec[0], prefix_spec[2]
    latent_spec = P(rows, None, heads, None)

    def shard(q, k_prefix, v_prefix, prefix_pad, k_latent, v_latent, latent_pad):
        out, lse = splash_attention_with_lse(q, k_prefix, v_prefix, prefix_pad, False, block_size, interpret)
        visible = None
        if prefix_pad is not None:  # a row whose shard holds no visible key contributes nothing to the merge
            visible = jnp.any(~prefix_pad, axis=1)[:, None, None]  # (batch, 1, 1)
            out, lse = jnp.where(visible[..., None], out, 0.0), jnp.where(visible, lse, MASKED_SCORE)
        lse_max = jax.lax.pmax(jax.lax.stop_gradient(lse), axes)
        weight = jnp.exp(lse - lse_max)
        total = jax.lax.psum(weight, axes)
        out = jax.lax.psum(weight[..., None] * out, axes) / total[..., None]
        latent = splash_attention_with_lse(q, k_latent, v_latent, latent_pad, True, block_size, interpret)
        out, _ = merge_partial_attention([(out, lse_max + jnp.log(total)), latent])
        if key_pad is None:
            return out
        # perceiver-io: a query that sees no key at all attends uniformly to all prefix_len + latents keys
        sees_prefix = jax.lax.psum(visible.astype(jnp.int32), axes) > 0  # (batch, 1, 1)
        sees_latent = jnp.cumsum(~latent_pad, axis=1)[:, :, None] > 0  # (batch, latents, 1): causal
        value_sum = (jax.lax.psum(jnp.sum(v_prefix.astype(jnp.float32), axis=1), axes)
                     + jnp.sum(v_latent.astype(jnp.float32), axis=1))  # (batch, heads, head_dim)
        mean_v = value_sum[:, None] / (prefix_len + num_latents)
        return jnp.where((sees_prefix | sees_latent)[..., None], out, mean_v)

    pad_spec = lambda spec, pad: None if pad is None else P(*spec[:2])  # noqa: E731
    in_specs = (latent_spec, prefix_spec, prefix_spec, pad_spec(prefix_spec, prefix_pad), latent_spec, latent_spec,
                pad_spec(latent_spec, latent_pad))
    # check_vma=False: a Pallas call's outputs carry no varying-axes type. Then the gradient of an input replicated
    # over `axes` (q, the latent keys and values) is summed over them, and the output's is split among them, which
    # is what this function's maths needs (psum transposes to psum)
    return jax.shard_map(shard, in_specs=in_specs, out_specs=latent_spec, axis_names=set(free_mesh_axes()),
                         check_vma=False)(q, k_prefix, v_prefix, prefix_pad, k_latent, v_latent, latent_pad)
