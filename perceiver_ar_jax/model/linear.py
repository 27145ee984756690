"""`Linear`: every weight product of the model (projections, MLPs), as one 2-D matrix product.

It has `nn.DenseGeneral`'s parameters (`kernel` of shape in_shape + features, optional `bias` of shape features,
normal(init_scale) and zero init, logical axis names) and its maths, but multiplies through `backend.matmul`
(2-D products, float32 accumulation). At decoding time the parameters may come in a prepared form instead of
`kernel` (`model/weights.py`: packed panels and/or bfloat16 / int8 with per-column scales), which it hands to
`backend.prepared_matmul`.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from perceiver_ar_jax import backend


class Linear(nn.Module):
    """x (..., *in_shape) -> (..., *features): the last `in_axes` axes of x contracted with the kernel."""

    features: tuple[int, ...]
    kernel_axes: tuple[str | None, ...]  # logical axis names of the kernel (in_shape + features)
    init_scale: float
    in_axes: int = 1
    use_bias: bool = False
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    precision: str | None = None  # of the product: "default" | "high" | "highest" (lax.Precision), None = default

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        in_shape, lead = x.shape[x.ndim - self.in_axes:], x.shape[:x.ndim - self.in_axes]
        k, n = math.prod(in_shape), math.prod(self.features)
        rows = x.reshape(-1, k)
        if backend.is_prepared(self.variables.get("params", {})):  # decoding with prepared weights
            y = backend.prepared_matmul(rows, self.variables["params"], n, self.dtype)
        else:
            kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(self.init_scale),
                                                                       self.kernel_axes),
                                in_shape + tuple(self.features), self.param_dtype)
            y = backend.matmul(rows.astype(self.dtype), kernel.reshape(k, n).astype(self.dtype),
                              precision=self.precision)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.kernel_axes[-1:]),
                              tuple(self.features), self.param_dtype)
            y = y + bias.reshape(n).astype(self.dtype)
        return y.reshape(lead + tuple(self.features))
