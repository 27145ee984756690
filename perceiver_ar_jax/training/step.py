"""The pure training and evaluation steps of Perceiver AR.

A batch is a dict of (batch, seq_len) arrays from the input pipeline: `input_ids` int32, `labels` int32 (the
inputs shifted left by one) and `pad_mask` bool (True = pad; rows are left-padded). As in perceiver-io's
`LitCausalSequenceModel.step`, the prefix is `seq_len - max_latents` tokens, the model predicts the labels of the
last `max_latents` positions only, and positions whose input is a pad are left out of the loss. The loss of a step
is the mean cross-entropy over all loss positions of the global batch (every token counts the same, however the
batch is split over devices or microbatches).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from perceiver_ar_jax.model import CausalLanguageModel, output_params
from perceiver_ar_jax.training.loss import DEFAULT_CHUNK_TOKENS, chunked_token_losses, fused_loss_sums, token_losses
from perceiver_ar_jax.training.optimizer import apply_gradients

__all__ = ["Batch", "TrainState", "eval_step", "loss_sums", "prefix_len_of", "project_with", "split_microbatches",
           "token_losses", "train_step"]

Batch = Mapping[str, jnp.ndarray]


@flax.struct.dataclass
class TrainState:
    """Everything a training run carries from step to step (and saves in its checkpoints).

    step: int32 scalar, optimizer updates done so far; params: float32 parameter tree; opt_state: optax state;
    rng: uint32 key data (jax.random.key_data) from which each step's dropout key is derived.
    """

    step: jnp.ndarray
    params: Any
    opt_state: Any
    rng: jnp.ndarray


def prefix_len_of(model: CausalLanguageModel, seq_len: int) -> int:
    """seq_len - max_latents: the prefix of a training sequence (perceiver-io's `step`)."""
    max_latents = model.config.max_latents
    if seq_len < max_latents:
        raise ValueError(f"training sequence length {seq_len} is out of range: must be >= max_latents ({max_latents})")
    return seq_len - max_latents


def project_with(model: CausalLanguageModel):
    """The model's output projection as a loss takes it: (output params, rows (batch, c, channels)) -> float32
    logits (batch, c, vocab); `output_params(params)` are its parameters."""
    return functools.partial(_project, model)


def _project(model: CausalLanguageModel, out_params: Any, rows: jnp.ndarray) -> jnp.ndarray:
    return model.apply({"params": out_params}, rows, method="project")


def loss_sums(model: CausalLanguageModel, params: Any, batch: Batch, *, deterministic: bool,
              dropout_rng: jax.Array | None = None, z_loss_weight: float = 0.0,
              chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict[str, jnp.ndarray]:
    """Forward pass on one (micro)batch -> sums over its loss positions, float32 scalars: `objective` (cross-entropy
    + z_loss_weight x log Z squared, the one differentiable value), the cross-entropy, log Z squared and the number
    of loss positions. The logits are computed chunk_tokens rows at a time (training/loss.py)."""
    input_ids, labels, pad_mask = batch["input_ids"], batch["labels"], batch["pad_mask"]
    prefix_len = prefix_len_of(model, input_ids.shape[1])
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    hidden = model.apply({"params": params}, input_ids, prefix_len=prefix_len, pad_mask=pad_mask,
                         deterministic=deterministic, rngs=rngs, method="hidden")
    weights = (~pad_mask[:, prefix_len:]).astype(jnp.float32)
    sums = fused_loss_sums(project_with(model), output_params(params), hidden, labels[:, prefix_len:], weights,
                           z_loss_weight=z_loss_weight, chunk_tokens=chunk_tokens)
    return {**sums, "num_tokens": jnp.sum(weights)}


def split_microbatches(batch: Batch, num_microbatches: int) -> Batch:
    """(batch, n) arrays -> (num_microbatches, batch / num_microbatches, n). Microbatch i takes rows i, i + k, ...
    so that each device's block of rows (the batch is sharded along its first axis) stays on that device."""
    def split(x):
        b = x.shape[0]
        if b % num_microbatches:
            raise ValueError(f"batch size {b} is not divisible by num_microbatches ({num_microbatches})")
        return jnp.swapaxes(x.reshape(b // num_microbatches, num_microbatches, *x.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: CausalLanguageModel,
    optimizer: optax.GradientTransformation,
    num_microbatches: int = 1,
    z_loss_weight: float = 0.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[TrainState, dict[str, jnp.ndarray]]:
    """One optimizer update on a global batch, gradients accumulated over `num_microbatches` slices of it.
    chunk_tokens: rows (batch x latents) of the microbatch whose logits are computed at once (0 = all).

    The objective is sum(cross-entropy + z_loss_weight * logZ^2) / number of loss positions, over the whole batch.
    Returns the new state and metrics: loss (mean cross-entropy), z_loss, num_tokens, grad_norm (before clipping),
    param_norm (after the update).
    """
    num_tokens = jnp.maximum(jnp.sum(~batch["pad_mask"][:, prefix_len_of(model, batch["pad_mask"].shape[1]):]), 1)
    num_tokens = num_tokens.astype(jnp.float32)
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def objective(params, microbatch, rng):
        sums = loss_sums(model, params, microbatch, deterministic=False, dropout_rng=rng,
                         z_loss_weight=z_loss_weight, chunk_tokens=chunk_tokens)
        return sums.pop("objective") / num_tokens, sums

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if num_microbatches == 1:
        (_, sums), grads = grad_fn(state.params, batch, step_rng)
    else:
        def accumulate(carry, xs):
            index, microbatch = xs
            grads, sums = carry
            (_, mb_sums), mb_grads = grad_fn(state.params, microbatch, jax.random.fold_in(step_rng, index))
            return (jax.tree.map(jnp.add, grads, mb_grads), jax.tree.map(jnp.add, sums, mb_sums)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        zero_sums = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "z_loss_sum", "num_tokens")}
        xs = (jnp.arange(num_microbatches), split_microbatches(batch, num_microbatches))
        (grads, sums), _ = jax.lax.scan(accumulate, (zeros, zero_sums), xs)

    params, opt_state, norms = apply_gradients(optimizer, grads, state.opt_state, state.params)
    metrics = {
        "loss": sums["loss_sum"] / num_tokens,
        "z_loss": sums["z_loss_sum"] / num_tokens,
        "num_tokens": sums["num_tokens"],
        "grad_norm": norms["grad_norm"],
        "param_norm": norms["param_norm"],  # also tells whether the new parameters are still finite
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params: Any, batch: Batch, *, model: CausalLanguageModel,
              chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> dict[str, jnp.ndarray]:
    """Deterministic forward pass -> {"loss_sum", "num_tokens"} over the loss positions of the batch; the logits
    computed chunk_tokens rows at a time (no gradient: nothing else is kept)."""
    input_ids, labels, pad_mask = batch["input_ids"], batch["labels"], batch["pad_mask"]
    prefix_len = prefix_len_of(model, input_ids.shape[1])
    hidden = model.apply({"params": params}, input_ids, prefix_len=prefix_len, pad_mask=pad_mask, method="hidden")
    ce, _ = chunked_token_losses(project_with(model), output_params(params), hidden, labels[:, prefix_len:],
                                 chunk_tokens=chunk_tokens)
    weights = (~pad_mask[:, prefix_len:]).astype(jnp.float32)
    return {"loss_sum": jnp.sum(ce * weights), "num_tokens": jnp.sum(weights)}
