"""Optimizer and learning-rate schedule of Perceiver AR training.

The schedule is perceiver-io's `CosineWithWarmupLR` (perceiver/scripts/lrs.py): a linear warmup from 0 to the peak
over `warmup_steps`, then a cosine decay that ends at `min_fraction` x peak after `training_steps`. The optimizer is
global-norm clipping followed by AdamW, as torch's `clip_grad_norm_` + `torch.optim.AdamW` (decoupled weight decay
applied to every parameter, torch's default).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax


def cosine_with_warmup_schedule(
    peak_value: float,
    warmup_steps: int,
    training_steps: int,
    min_fraction: float = 0.0,
    num_cycles: float = 0.5,
) -> optax.Schedule:
    """step -> learning rate, the multiplier of perceiver-io's `CosineWithWarmupLR` times `peak_value`.

    step < warmup: peak * step / max(1, warmup) (so the first update, step 0, has learning rate 0, as in torch);
    after: peak * (min_fraction + max(0, (1 - min_fraction) / 2 * (1 + cos(2 pi num_cycles progress)))) with
    progress = (step - warmup) / max(1, training_steps - warmup).
    """
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps={warmup_steps} is out of range: must be >= 0")
    if training_steps < 1:
        raise ValueError(f"training_steps={training_steps} is out of range: must be >= 1")
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction={min_fraction} is out of range: must be in [0, 1]")

    def schedule(step):
        step = jnp.asarray(step, jnp.float32)
        warmup = step / max(1, warmup_steps)
        progress = (step - warmup_steps) / max(1, training_steps - warmup_steps)
        cosine = 0.5 * (1.0 - min_fraction) * (1.0 + jnp.cos(math.pi * float(num_cycles) * 2.0 * progress))
        decay = min_fraction + jnp.maximum(0.0, cosine)
        return peak_value * jnp.where(step < warmup_steps, warmup, decay)

    return schedule


def make_schedule(config) -> optax.Schedule:
    """The learning-rate schedule of a training config (fields learning_rate, warmup_steps, num_train_steps,
    lr_min_fraction)."""
    return cosine_with_warmup_schedule(
        peak_value=config.learning_rate,
        warmup_steps=config.warmup_steps,
        training_steps=config.num_train_steps,
        min_fraction=config.lr_min_fraction,
    )


def make_optimizer(config) -> optax.GradientTransformation:
    """Global-norm clipping (if max_grad_norm > 0) then AdamW with the config's betas, eps and weight decay.

    Optimizer moments are kept in the parameters' dtype (float32 master weights).
    """
    from perceiver_ar_jax.training.config import check_optimizer_config  # the config's one validation

    check_optimizer_config(config)
    adamw = optax.adamw(
        learning_rate=make_schedule(config),
        b1=config.adam_b1,
        b2=config.adam_b2,
        eps=config.adam_eps,
        weight_decay=config.weight_decay,
    )
    # identity has the same (empty) state as the clipping, so a run can resume with clipping switched on or off
    clip = optax.clip_by_global_norm(config.max_grad_norm) if config.max_grad_norm > 0 else optax.identity()
    return optax.chain(clip, adamw)
