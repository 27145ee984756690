"""Cross-entropy over a large vocabulary, chunk by chunk: (batch, latents, vocab) float32 logits never exist at once.

The model gives the output-normed latent rows, `hidden` (batch, n, channels), and a projection `project(out_params,
rows)` (batch, c, channels) -> (batch, c, vocab) float32 (`CausalLanguageModel.project` on `output_params`). The
rows are cut along the latent axis into chunks of about `chunk_tokens` rows (batch x latents), as MaxText and
Liger's fused linear cross-entropy do for large vocabularies:

- `chunked_token_losses`: each position's cross-entropy and log Z, (batch, n) float32 (evaluation, scoring);
- `fused_loss_sums`: the weighted sums of training, whose gradient is computed in the forward pass chunk by chunk
  (softmax - one-hot, then the projection's vjp), so the backward pass holds no logits either and no projection is
  computed twice: the same three products per chunk as autodiff of the unchunked loss.

With a single chunk both equal the unchunked `token_losses` of the full logits; with several, up to float32
summation order (tests/test_chunked_loss.py).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from perceiver_ar_jax import backend

# rows (batch x latent positions, per device) whose logits are computed at once when no config says otherwise:
# 1024 x a 32,000 vocabulary x 4 bytes = 131 MB per (rows, vocab) float32 array. Every further chunk adds a pass
# over the (vocab, channels) float32 gradient accumulator: bench/train_step.py's step (4 x 256 latents, 2 cores)
# is ~6% faster in bf16 and 2-6% in fp32 as one chunk of 1024 rows than as four of 256 (paired steps, one
# process). (Before the host memory was reused across steps and the cross-entropy kernel, 256 was the faster.)
DEFAULT_CHUNK_TOKENS = 1024

# (output params, rows (batch, c, channels)) -> float32 logits (batch, c, vocab)
Project = Callable[[Any, jnp.ndarray], jnp.ndarray]


def token_losses(logits: jnp.ndarray, labels: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """logits (batch, n, vocab) float32, labels (batch, n) int -> cross-entropy and log Z, both (batch, n) float32."""
    log_z = jax.nn.logsumexp(logits, axis=-1)
    label_logits = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return log_z - label_logits, log_z


def latents_per_chunk(batch_size: int, num_latents: int, chunk_tokens: int) -> int:
    """Latent positions per chunk: chunk_tokens rows over the batch (at least 1), all of them for chunk_tokens 0."""
    if chunk_tokens <= 0:
        return num_latents
    return max(1, min(num_latents, chunk_tokens // max(batch_size, 1)))


def _chunks(x: jnp.ndarray, size: int) -> jnp.ndarray:
    """(batch, n, ...) -> (num_chunks, batch, size, ...), the latent axis zero-padded to a multiple of size. The
    batch axis stays second, so its sharding over devices is untouched."""
    n = x.shape[1]
    num_chunks = -(-n // size)
    pad = num_chunks * size - n
    if pad:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(x.shape[0], num_chunks, size, *x.shape[2:]), 1, 0)


def _unchunk(x: jnp.ndarray, n: int) -> jnp.ndarray:
    """(num_chunks, batch, size, ...) -> (batch, n, ...): the inverse of `_chunks`."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :n]


def chunked_token_losses(project: Project, out_params: Any, hidden: jnp.ndarray, labels: jnp.ndarray, *,
                         chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> tuple[jnp.ndarray, jnp.ndarray]:
    """hidden (batch, n, channels), labels (batch, n) -> cross-entropy and log Z, both (batch, n) float32; the logits
    of one chunk of latents at a time. Differentiable, but each chunk's logits are recomputed in the backward pass
    (jax.checkpoint): training takes `fused_loss_sums`, which avoids that."""
    batch_size, n = labels.shape
    size = latents_per_chunk(batch_size, n, chunk_tokens)
    if size >= n:
        return token_losses(project(out_params, hidden), labels)

    @jax.checkpoint
    def one(xs):
        h, lab = xs
        return token_losses(project(out_params, h), lab)

    ce, log_z = jax.lax.map(one, (_chunks(hidden, size), _chunks(labels, size)))
    return _unchunk(ce, n), _unchunk(log_z, n)


def fused_loss_sums(project: Project, out_params: Any, hidden: jnp.ndarray, labels: jnp.ndarray,
                    weights: jnp.ndarray, *, z_loss_weight: float = 0.0,
                    chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict[str, jnp.ndarray]:
    """Weighted loss sums over (batch, n) positions, float32 scalars:

        objective = sum(weights * (ce + z_loss_weight * logZ^2)),  loss_sum = sum(weights * ce),
        z_loss_sum = sum(weights * logZ^2)

    Only `objective` is differentiable (with respect to out_params and hidden); loss_sum and z_loss_sum are
    metrics, returned with their gradients stopped.
    """
    objective, loss_sum, z_sum = _fused(project, int(chunk_tokens), float(z_loss_weight), out_params, hidden,
                                        labels, weights.astype(jnp.float32))
    return {"objective": objective, "loss_sum": jax.lax.stop_gradient(loss_sum),
            "z_loss_sum": jax.lax.stop_gradient(z_sum)}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _fused(project, chunk_tokens, z_loss_weight, out_params, hidden, labels, weights):
    return _fused_forward(project, chunk_tokens, z_loss_weight, out_params, hidden, labels, weights)[0]


def _fused_forward(project, chunk_tokens, z_loss_weight, out_params, hidden, labels, weights):
    """The sums and, chunk by chunk, the gradient of `objective` with respect to out_params and hidden."""
    batch_size, n = labels.shape
    size = latents_per_chunk(batch_size, n, chunk_tokens)

    # the logits' gradient in the rows' (compute) dtype, what the projection's backward products multiply (as
    # rounded by them anyway); a bias's gradient sums it unrounded, as under PyTorch's autocast
    grad_dtype = jnp.float32 if "output_bias" in out_params else hidden.dtype

    def chunk(h, lab, w):
        logits, vjp = jax.vjp(project, out_params, h)
        log_z, label_logits, d_logits = backend.cross_entropy_gradient(logits, lab, w, z_loss_weight, grad_dtype)
        ce = log_z - label_logits
        d_params, d_h = vjp(d_logits.astype(logits.dtype))
        sums = (jnp.sum(w * (ce + z_loss_weight * jnp.square(log_z))), jnp.sum(w * ce),
                jnp.sum(w * jnp.square(log_z)))
        return sums, d_params, d_h

    if size >= n:
        sums, d_params, d_hidden = chunk(hidden, labels, weights)
        return sums, (d_params, d_hidden)

    def step(carry, xs):
        sums, d_params = carry
        mb_sums, mb_d_params, d_h = chunk(*xs)
        # gradients accumulate in float32 whatever the parameters' dtype
        d_params = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), d_params, mb_d_params)
        return (jax.tree.map(jnp.add, sums, mb_sums), d_params), d_h

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), out_params)
    zero_sums = (jnp.zeros((), jnp.float32),) * 3
    (sums, d_params), d_hidden = jax.lax.scan(
        step, (zero_sums, zeros), (_chunks(hidden, size), _chunks(labels, size), _chunks(weights, size)))
    d_params = jax.tree.map(lambda g, p: g.astype(p.dtype), d_params, out_params)
    return sums, (d_params, _unchunk(d_hidden, n))


def _fused_fwd(project, chunk_tokens, z_loss_weight, out_params, hidden, labels, weights):
    sums, grads = _fused_forward(project, chunk_tokens, z_loss_weight, out_params, hidden, labels, weights)
    return sums, grads


def _fused_bwd(project, chunk_tokens, z_loss_weight, grads, cotangents):
    d_params, d_hidden = grads
    g = cotangents[0]  # of `objective`; the metrics' gradients are stopped (fused_loss_sums)
    return (jax.tree.map(lambda x: (g * x).astype(x.dtype), d_params), (g * d_hidden).astype(d_hidden.dtype),
            None, None)


_fused.defvjp(_fused_fwd, _fused_bwd)
