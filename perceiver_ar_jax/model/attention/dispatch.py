"""Which attention implementation runs: dense XLA, blockwise XLA, or the splash TPU kernel.

All three compute the same thing (`attention_impl` in the model config picks how, never what): "xla" materialises
the (queries x keys) scores (`dense.py`); "blockwise" runs an online softmax over key blocks in XLA
(`blockwise.py`), whose memory does not grow with queries x keys; "splash" is the Pallas TPU kernel (`splash.py`).
"auto" takes splash on TPU, blockwise for long keys elsewhere, dense otherwise. To add a kernel, add its name to
`model.config.ATTENTION_IMPLS`, a branch to `resolve_attention_impl` and one to `attend`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from perceiver_ar_jax.model.attention.blockwise import blockwise_attention
from perceiver_ar_jax.model.attention.dense import dense_attention

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


def resolve_cached_impl(impl: str, num_queries: int, num_keys: int) -> str:
    """"xla" or "blockwise" for queries over a decoding cache. The splash kernel takes only the causal and padding
    masks of a full forward pass, not a cache's, so "splash" (and "auto" on TPU) mean what "auto" means elsewhere."""
    if impl in ("auto", "splash"):
        impl = "auto"
    return resolve_attention_impl(impl, num_queries, num_keys, dropout=False, backend="cpu")


def attend(
    q: jnp.ndarray,
    k: jnp.ndarray,
    v: jnp.ndarray,
    mask: jnp.ndarray | None,
    impl: str,
    block_size: int,
    dropout_rate: float = 0.0,
    dropout_rng: Callable[[], jax.Array] | None = None,
    dense_dropout: Callable[[jnp.ndarray], jnp.ndarray] | None = None,
    max_heads_parallel: int | None = None,
) -> jnp.ndarray:
    """Scaled, rotated q (batch, queries, heads, head_dim) and k, v (batch, keys, heads, head_dim) ->
    (batch, queries, heads, head_dim), by the implementation `impl` resolves to for these shapes.

    mask: bool broadcastable to (batch, heads, queries, keys), True = may attend. Dropout on the probabilities:
    dropout_rate > 0 with dropout_rng() (a function, so that only the path that needs a key draws one) for the
    blockwise path, dense_dropout for the dense one (None: no dropout).
    """
    impl = resolve_attention_impl(impl, q.shape[1], k.shape[1], dropout_rate > 0.0)
    if impl == "blockwise":
        return blockwise_attention(q, k, v, mask, block_size, dropout_rate,
                                   dropout_rng() if dropout_rate > 0.0 else None)
    if impl == "splash":
        # imported on use: the Pallas TPU ops are experimental and not needed by the other paths
        from perceiver_ar_jax.model.attention.splash import splash_attention_from_mask

        return splash_attention_from_mask(q, k, v, mask, block_size)
    return dense_attention(q, k, v, mask, dropout=dense_dropout, max_heads_parallel=max_heads_parallel)
