"""Context parallelism for the hybrid cross-attention: the prefix is sharded along its length over a mesh axis.

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

from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from perceiver_ar_jax.model.attention.blockwise import mask_4d
from perceiver_ar_jax.model.attention.prefix import PrefixAttention, ProjectFn, prefix_attention


def context_axis_size(axis_name: str) -> int:
    """Size of mesh axis `axis_name` of the mesh set with `jax.set_mesh`; ValueError if there is no such axis."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis_name not in mesh.axis_names:
        names = () if mesh.empty else tuple(mesh.axis_names)
        raise ValueError(f"context_parallel_axis={axis_name!r} is not an axis of the current mesh (axes: {names}); "
                         "set a mesh that has it with jax.set_mesh(...)")
    return mesh.shape[axis_name]


def shard_prefix(x: jnp.ndarray, axis_name: str) -> jnp.ndarray:
    """Constrain x (batch, prefix, ...) to be split along the prefix over `axis_name` (other dims unconstrained)."""
    context_axis_size(axis_name)
    spec = P(P.UNCONSTRAINED, axis_name, *([P.UNCONSTRAINED] * (x.ndim - 2)))
    return jax.lax.with_sharding_constraint(x, spec)


def context_parallel_prefix_attention(
    q: jnp.ndarray,
    x_prefix: jnp.ndarray,
    project: ProjectFn,
    params: Any,
    prefix_angles: jnp.ndarray | None,
    mask: jnp.ndarray | None,
    axis_name: str,
    block_size: int = 512,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
) -> PrefixAttention:
    """`prefix_attention.prefix_attention` with the prefix split along its length over mesh axis `axis_name`.

    q: (batch, latents, heads, head_dim), scaled and rotated, replicated over the axis; x_prefix: (batch, prefix,
    channels); project, params: the per-block key/value projection (`prefix_attention.make_projection`), params
    replicated over the axis; prefix_angles: (batch, prefix, rotated) or None; mask: bool broadcastable to (batch,
    heads, latents, prefix) or None. Returns the attention to the whole prefix (the same PrefixAttention as
    unsharded), replicated over the axis.
    """
    prefix_len = x_prefix.shape[1]
    num_shards = context_axis_size(axis_name)
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
        q, params = jax.tree.map(lambda a: jax.lax.pcast(a, (axis_name,), to="varying"), (q, params))
        if rng is not None:
            rng = jax.random.fold_in(rng, jax.lax.axis_index(axis_name))
        part = prefix_attention(q, x, project, params, angles, mask, block_size, dropout_rate, rng)
        lse_max = jax.lax.pmax(jax.lax.stop_gradient(part.lse), axis_name)
        weight = jnp.exp(part.lse - lse_max)
        total = jax.lax.psum(weight, axis_name)
        out = jax.lax.psum(weight[..., None] * part.out, axis_name) / total[..., None]
        visible = None if part.visible is None else jax.lax.psum(part.visible.astype(jnp.int32), axis_name) > 0
        return PrefixAttention(out, lse_max + jnp.log(total), visible, jax.lax.psum(part.value_sum, axis_name))

    along_prefix = P(None, axis_name)
    mask_spec = None if mask is None else (P(None, None, None, axis_name) if mask.shape[-1] > 1 else P())
    in_specs = (P(), along_prefix, P(), None if prefix_angles is None else along_prefix, mask_spec,
                None if dropout_rng is None else P())
    out_specs = PrefixAttention(P(), P(), None if mask is None else P(), P())
    return jax.shard_map(shard, in_specs=in_specs, out_specs=out_specs, axis_names={axis_name})(
        q, x_prefix, params, prefix_angles, mask, dropout_rng)
