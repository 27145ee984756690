"""Attention: the projections (`multi_head.py`) around interchangeable implementations of the same softmax
attention, chosen by `dispatch.py`: dense (`dense.py`), blockwise online softmax (`blockwise.py`, and `prefix.py`
for the hybrid layer's long prefix, `context_parallel.py` to split it over a mesh axis) and the splash TPU kernel
(`splash.py`)."""

from perceiver_ar_jax.model.attention.dense import MASKED_SCORE, cached_attention, dense_attention
from perceiver_ar_jax.model.attention.dispatch import resolve_attention_impl
from perceiver_ar_jax.model.attention.multi_head import CachedKeysValues, MultiHeadAttention

__all__ = ["MASKED_SCORE", "CachedKeysValues", "MultiHeadAttention", "cached_attention", "dense_attention",
           "resolve_attention_impl"]
