"""Training's memory-bound steps in one pass over their data, on CPU kernels: AdamW's update of a tensor
(`adamw.cc`; XLA runs optax's as three fusions per tensor that read the gradient three times), LayerNorm with its
derivative (`layer_norm.cc`; XLA evaluates them in several fusions and reductions over the rows) and attention's
masked softmax with its derivative (`softmax.cc`; XLA reads the scores two to four times). The callers ask
`*_on_kernel` first and take their XLA path otherwise (not CPU, no kernels, or under a mesh of several devices);
the softmax functions take XLA's path themselves.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from perceiver_ar_jax.backend import cpu_kernels
from perceiver_ar_jax.backend.mesh_guard import several_devices

__all__ = ["MASKED_SCORE", "adamw_on_kernel", "adamw_update", "layer_norm", "layer_norm_on_kernel", "masked_softmax",
           "masked_softmax_grad"]

# What every attention path fills masked scores with: -finfo(float32).max, as perceiver-io (not -inf, so an
# all-masked row stays finite). The softmax kernel's -FLT_MAX.
MASKED_SCORE = float(jnp.finfo(jnp.float32).min)


def adamw_on_kernel(params) -> bool:
    """Whether `adamw_update` can take these parameters: float32 tensors, CPU kernels, and not under a mesh of
    several devices (whose partitioner would gather a custom call's operands, here every parameter and moment, onto
    every device)."""
    return (cpu_kernels.available() and not several_devices()
            and all(jnp.result_type(p) == jnp.float32 for p in jax.tree.leaves(params)))


def adamw_update(param: jnp.ndarray, grad: jnp.ndarray, mu: jnp.ndarray, nu: jnp.ndarray, scalars: jnp.ndarray, *,
                 b1: float, b2: float, eps: float, weight_decay: float):
    """One float32 tensor's AdamW update in one pass (`cpu_kernels.adamw`; see `adamw_on_kernel`): (param, mu, nu)
    -> new (param, mu, nu) and [sum of grad^2 (before clipping), sum of new param^2]. scalars: [clip (0 or 1),
    global gradient norm, max norm, 1 - b1^t, 1 - b2^t, -lr]."""
    return cpu_kernels.adamw(param, grad.astype(jnp.float32), mu, nu, scalars, b1=b1, b2=b2, eps=eps,
                             weight_decay=weight_decay)


def layer_norm_on_kernel(x: jnp.ndarray, out_dtype) -> bool:
    """Whether `layer_norm` takes x on the CPU kernel (float32 or bf16 in and out; not under a mesh of several
    devices, whose partitioner would gather the custom call's operands onto every device, nor inside a
    `shard_map` over several)."""
    dtypes = (jnp.float32, jnp.bfloat16)
    return (cpu_kernels.available() and not several_devices() and x.ndim >= 1 and x.size > 0
            and x.dtype in dtypes and jnp.dtype(out_dtype) in dtypes)


def layer_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float, out_dtype) -> jnp.ndarray:
    """LayerNorm over x's last axis as Flax's `nn.LayerNorm(epsilon, use_fast_variance=False, dtype=out_dtype)`
    computes it (statistics in float32, two-pass variance), on the CPU kernel with its own derivative (see
    `layer_norm_on_kernel`; the caller takes Flax's module elsewhere). Results equal Flax's to float32 rounding."""
    return _layer_norm(x, scale, bias, float(epsilon), jnp.dtype(out_dtype))


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _layer_norm(x, scale, bias, epsilon, out_dtype):
    return cpu_kernels.layer_norm(x, scale, bias, epsilon, out_dtype)[0]


def _layer_norm_fwd(x, scale, bias, epsilon, out_dtype):
    y, mean, rstd = cpu_kernels.layer_norm(x, scale, bias, epsilon, out_dtype)
    return y, (x, scale, bias, mean, rstd)


def _layer_norm_bwd(epsilon, out_dtype, residuals, dy):
    x, scale, bias, mean, rstd = residuals
    dx, d_scale, d_bias = cpu_kernels.layer_norm_grad(x, scale, mean, rstd, dy.astype(out_dtype))
    return dx, d_scale.astype(scale.dtype), d_bias.astype(bias.dtype)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def masked_softmax(scores: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    """softmax(where(mask, scores, -finfo(float32).max), axis=-1): scores (batch, heads, queries, keys) float32,
    mask bool broadcastable to them (True = may attend) or None. Not differentiable (for custom VJPs). On the CPU
    kernel where it runs (values equal XLA's to float32 rounding), else XLA's."""
    if _softmax_on_kernel(scores):
        return cpu_kernels.masked_softmax(scores, mask)
    return jax.nn.softmax(scores if mask is None else jnp.where(mask, scores, MASKED_SCORE), axis=-1)


def masked_softmax_grad(probs: jnp.ndarray, d_probs: jnp.ndarray, mask: jnp.ndarray | None,
                        out_dtype) -> jnp.ndarray:
    """The scores' gradient from `masked_softmax`'s probs and theirs: where(mask, probs (d_probs - sum(d_probs
    probs, axis=-1)), 0) in out_dtype (float32 or bfloat16, rounded once). On the CPU kernel where it runs."""
    if _softmax_on_kernel(probs) and jnp.dtype(out_dtype) in (jnp.float32, jnp.bfloat16):
        return cpu_kernels.masked_softmax_grad(probs, d_probs, mask, jnp.dtype(out_dtype))
    d_scores = probs * (d_probs - jnp.sum(d_probs * probs, axis=-1, keepdims=True))
    if mask is not None:
        d_scores = jnp.where(mask, d_scores, 0.0)
    return d_scores.astype(out_dtype)


def _softmax_on_kernel(x: jnp.ndarray) -> bool:
    return (cpu_kernels.available() and not several_devices() and x.ndim == 4 and x.size > 0
            and x.dtype == jnp.float32)
