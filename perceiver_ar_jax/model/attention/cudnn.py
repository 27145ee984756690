"""GPU attention: cuDNN's fused flash attention through `jax.nn.dot_product_attention(implementation="cudnn")`.

What cuDNN takes, and how Perceiver AR's masks are given to it (`mask_arguments`):
- The self-attention layers are square and causal, without padding (perceiver-io masks no pad key there):
  `is_causal=True`, cuDNN's own causal mask, which also skips the blocks above the diagonal.
- The hybrid layer's latents attend to [prefix, latents]: right-aligned causal (query i of L sees keys
  0 .. i + P). JAX's `is_causal` is top-left aligned when queries and keys differ in length, and cuDNN's right
  window only exists with that causal mask, so this mask is handed over as a boolean `mask`, which
  `jax.nn.dot_product_attention` turns into an additive bias of (batch or 1, 1, latents, keys) in the compute
  dtype. That costs 2 bytes per score per sequence (not per head), no blocks are skipped (only the latents x
  latents corner has masked scores; the prefix columns are all visible), and gradients need no log-sum-exp:
  one kernel computes the whole attention. The alternative, a non-causal prefix part and a causal latent part merged
  by their log-sum-exps, needs the gradient of cuDNN's log-sum-exp, which `return_residual` does not give (its
  cotangent is dropped).
- Key padding (left padding) is part of that mask: cuDNN's own padding masks (`key_value_seq_lengths`) hide keys
  at the end of a row, not at its start. A square causal mask with padding (prefix 0) keeps `is_causal=True` and
  adds the padding columns as the mask.
- A query that sees no key at all attends uniformly to every key (perceiver-io; `dense.uniform_where_no_visible_key`).

cuDNN takes bfloat16 / float16 inputs with head_dim a multiple of 8 (at most 128; 256 from Hopper on), and even
lengths when a mask is given in training: `cudnn_supported` says whether a call qualifies, and `dispatch.py` uses
the blockwise or dense path when not. On other backends the same call runs JAX's XLA implementation of
`dot_product_attention` (tests on CPU). Under a mesh it runs per device on its rows and heads
(`sharding.kernel_shard_map`), as the splash kernel does.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp

from perceiver_ar_jax.model.attention.dense import uniform_where_no_visible_key
from perceiver_ar_jax.model.masks import AttentionMask
from perceiver_ar_jax.model.sharding import kernel_shard_map


def cudnn_supported(dtype, head_dim: int, num_queries: int, num_keys: int, mask: AttentionMask | None,
                    backend: str | None = None) -> bool:
    """Whether cuDNN's flash attention takes this call on this backend (always True off GPU, where the XLA
    implementation of the same API runs)."""
    if (backend or jax.default_backend()) != "gpu":
        return True
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)):
        return False
    max_head_dim = 256 if _compute_capability() >= (9, 0) else 128
    if head_dim % 8 or head_dim > max_head_dim:
        return False
    _, bool_mask = mask_arguments(mask, num_queries, num_keys, materialise=False)
    return not bool_mask or (num_queries % 2 == 0 and num_keys % 2 == 0)


def _compute_capability() -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in jax.devices()[0].compute_capability.split("."))
    except (AttributeError, ValueError):
        return (0,)


def mask_arguments(mask: AttentionMask | None, num_queries: int, num_keys: int, materialise: bool = True):
    """(is_causal, mask) for `jax.nn.dot_product_attention`: cuDNN's causal mask where it is the model's (square),
    and a bool (batch or 1, 1, queries, keys) mask for the rest (materialise=False: just whether one is needed)."""
    if mask is None:
        return False, None
    is_causal = mask.causal and num_queries == num_keys
    rest = AttentionMask(num_queries, num_keys, mask.causal and not is_causal, mask.key_pad)
    if not rest.causal and rest.key_pad is None:
        return is_causal, None
    return is_causal, rest.array() if materialise else True


def cudnn_attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: AttentionMask | None,
                 implementation: str | None = None, precision: jax.lax.Precision | None = None) -> jnp.ndarray:
    """Attention for an `AttentionMask` (or None) by `jax.nn.dot_product_attention`, per device under a mesh.

    q: (batch, queries, heads, head_dim), scaled and rotated; k, v: (batch, keys, heads, head_dim), all of one
    dtype; implementation: "cudnn" or "xla" (default: "cudnn" on GPU, else "xla"). Returns (batch, queries,
    heads, head_dim) in v's dtype. precision: of the XLA implementation's products (cuDNN takes bf16 / f16).
    """
    if mask is not None and (mask.num_queries, mask.num_keys) != (q.shape[1], k.shape[1]):
        raise ValueError(f"mask of {mask.num_queries} queries x {mask.num_keys} keys for {q.shape[1]} queries and "
                         f"{k.shape[1]} keys")
    implementation = implementation or ("cudnn" if jax.default_backend() == "gpu" else "xla")
    causal = mask is not None and mask.causal

    def kernel(q, k, v, key_pad):
        local = None if mask is None else AttentionMask(q.shape[1], k.shape[1], causal, key_pad)
        is_causal, bool_mask = mask_arguments(local, q.shape[1], k.shape[1])
        with contextlib.ExitStack() as stack:
            if precision is not None:  # the XLA implementation's einsums take the default precision
                stack.enter_context(jax.default_matmul_precision(jax.lax.Precision(precision).name.lower()))
            out = jax.nn.dot_product_attention(q, k, v, mask=bool_mask, scale=1.0, is_causal=is_causal,
                                               implementation=implementation)
        return uniform_where_no_visible_key(out.astype(v.dtype), v, local)

    return kernel_shard_map(kernel, q, k, v, None if mask is None else mask.key_pad)
