"""Which attention implementation runs: dense XLA, blockwise XLA, the splash TPU kernel or cuDNN on GPU.

All compute the same thing (`attention_impl` in the model config picks how, never what): "xla" materialises the
(queries x keys) scores (`dense.py`); "blockwise" runs an online softmax over key blocks in XLA (`blockwise.py`),
whose memory does not grow with queries x keys; "splash" is the Pallas TPU kernel (`splash.py`); "cudnn" is
cuDNN's flash attention through `jax.nn.dot_product_attention` (`cudnn.py`).

The two kernels implement only the masks of a full forward pass, right-aligned causal with key padding, and take
them as an `AttentionMask`; a mask given as a bool array (decoding's ring-buffer masks) always goes to the dense
or blockwise path. "auto" takes splash on TPU, cuDNN on GPU where it takes the dtype and shapes, and elsewhere
blockwise for long keys, dense otherwise. To add a kernel, add its name to `model.config.ATTENTION_IMPLS`, a
branch to `resolve_attention_impl` and one to `attend`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from perceiver_ar_jax.model.attention.blockwise import blockwise_attention
from perceiver_ar_jax.model.attention.cudnn import cudnn_supported
from perceiver_ar_jax.model.attention.dense import dense_attention
from perceiver_ar_jax.model.masks import AttentionMask, Mask, mask_array

# "auto" switches from dense to blockwise above this many keys: below it the scores of 256-512 latents are a few
# MB per head and one fused softmax is faster than a loop; above it they dominate the step's memory.
AUTO_BLOCKWISE_MIN_KEYS = 2048
KERNELS = ("splash", "cudnn")
IMPLS = ("xla", "blockwise", *KERNELS)


def resolve_attention_impl(impl: str, num_queries: int, num_keys: int, dropout: bool, backend: str | None = None,
                           *, dtype=jnp.float32, head_dim: int = 64, mask: Mask = None) -> str:
    """The implementation ("xla" | "blockwise" | "splash" | "cudnn") that `impl` means for this attention.

    dtype, head_dim: of q, k, v; mask: the attention's mask (a kernel takes an `AttentionMask` or None only).
    "auto": splash on TPU and cuDNN on GPU (where `cudnn_supported`) when there are several queries; otherwise
    blockwise when keys > AUTO_BLOCKWISE_MIN_KEYS and there is more than one query (one query's scores are only
    (batch, heads, 1, keys): a single dense pass is cheaper), else xla. With probability dropout (no kernel has
    it) a kernel becomes blockwise; with a bool-array mask, or cuDNN on a GPU that cannot take the call, it
    becomes what "auto" gives without kernels.
    """
    if impl not in ("auto", *IMPLS):
        raise ValueError(f"attention_impl={impl!r} is out of range: must be one of auto, {', '.join(IMPLS)}")
    backend = jax.default_backend() if backend is None else backend
    fallback = "blockwise" if num_keys > AUTO_BLOCKWISE_MIN_KEYS and num_queries > 1 else "xla"
    structured = mask is None or isinstance(mask, AttentionMask)
    cudnn_ok = structured and cudnn_supported(dtype, head_dim, num_queries, num_keys,
                                              mask if isinstance(mask, AttentionMask) else None, backend)
    if impl == "auto":
        if backend == "tpu" and num_queries > 1 and structured and not dropout:
            return "splash"
        if backend == "gpu" and num_queries > 1 and cudnn_ok and not dropout:
            return "cudnn"
        return fallback
    if impl in KERNELS:
        if dropout:
            return "blockwise"
        if not structured or (impl == "cudnn" and not cudnn_ok):
            return fallback
    return impl


def resolve_cached_impl(impl: str, num_queries: int, num_keys: int) -> str:
    """"xla" or "blockwise" for queries over a decoding cache. The kernels take only the causal and padding masks
    of a full forward pass, not a cache's, so they (and "auto") mean what "auto" means without kernels."""
    if impl in ("auto", *KERNELS):
        impl = "auto"
    return resolve_attention_impl(impl, num_queries, num_keys, dropout=False, backend="cpu")


def attend(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: Mask,
    impl: str,
    block_size: int,
    dropout_rate: float = 0.0,
    dropout_rng: Callable[[], jax.Array] | None = None,
    dense_dropout: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
    max_heads_parallel: int | None = None,
    precision: jax.lax.Precision | None = None,
) -> jnp.ndarray:
    """Scaled, rotated q (batch, queries, heads, head_dim) and k, v (batch, keys, heads, head_dim) ->
    (batch, queries, heads, head_dim), by the implementation `impl` resolves to for these shapes.

    mask: an `AttentionMask`, a bool array broadcastable to (batch, heads, queries, keys) (True = may attend), or
    None. Dropout on the probabilities: dropout_rate > 0 with dropout_rng() (a function, so that only the path that
    needs a key draws one) for the blockwise path, dense_dropout for the dense one (None: no dropout). precision:
    of the products of the XLA paths (the kernels compute with their own).
    """
    impl = resolve_attention_impl(impl, q.shape[1], k.shape[1], dropout_rate > 0.0, dtype=q.dtype,
                                  head_dim=q.shape[-1], mask=mask)
    if impl == "splash":
        # imported on use: the Pallas TPU ops are experimental and not needed by the other paths
        from perceiver_ar_jax.model.attention.splash import splash_attend

        return splash_attend(q, k, v, mask, block_size)
    if impl == "cudnn":
        from perceiver_ar_jax.model.attention.cudnn import cudnn_attend

        return cudnn_attend(q, k, v, mask, precision=precision)
    mask = mask_array(mask)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, mask, block_size, dropout_rate,
                                   dropout_rng() if dropout_rate > 0.0 else None, precision)
    return dense_attention(q, k, v, mask, dropout=dense_dropout, max_heads_parallel=max_heads_parallel,
                           precision=precision)
