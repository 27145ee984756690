"""Optimizer and learning-rate schedule of Perceiver AR training.

The schedule is perceiver-io's `CosineWithWarmupLR` (perceiver/scripts/lrs.py): a linear warmup from 0 to the peak
over `warmup_steps`, then a cosine decay that ends at `min_fraction` x peak after `training_steps`. The optimizer is
global-norm clipping followed by AdamW, as torch's `clip_grad_norm_` + `torch.optim.AdamW` (decoupled weight decay
applied to every parameter, torch's default).

`make_optimizer` returns optax's transformation (its state is optax's, checkpoints hold it) together with its
hyperparameters; `apply_gradients` makes the step's update through it, or on CPU through a kernel that does the
same arithmetic in one pass over each tensor (`backend.adamw_update`): XLA:CPU runs optax's update as three fusions
per tensor, and AdamW cost the bench train step ~8% more than plain SGD.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from perceiver_ar_jax import backend


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


class AdamWHyperparameters(NamedTuple):
    schedule: Callable  # step -> learning rate
    b1: float
    b2: float
    eps: float
    weight_decay: float
    max_grad_norm: float  # 0: no clipping


class Optimizer(NamedTuple):
    """An optax GradientTransformation (init, update) and the hyperparameters it was made from."""
    init: Callable
    update: Callable
    hyperparameters: AdamWHyperparameters


def make_optimizer(config) -> Optimizer:
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
    chain = optax.chain(clip, adamw)
    return Optimizer(chain.init, chain.update, AdamWHyperparameters(
        make_schedule(config), config.adam_b1, config.adam_b2, config.adam_eps, config.weight_decay,
        config.max_grad_norm))


def apply_gradients(optimizer: optax.GradientTransformation, grads: Any, opt_state: Any,
                    params: Any) -> tuple[Any, Any, dict[str, jnp.ndarray]]:
    """(new params, new optimizer state, {"grad_norm": global norm of grads, "param_norm": of the new params}) after
    one update. An `Optimizer` of float32 parameters on CPU makes it in one pass of `backend.adamw_update` per
    tensor, with optax's arithmetic and state (and the norms from the same pass); any other transformation (or
    under a mesh of several devices) through optax."""
    hyperparameters = getattr(optimizer, "hyperparameters", None)
    if isinstance(hyperparameters, AdamWHyperparameters) and backend.adamw_on_kernel(params):
        return _adamw_in_one_pass(hyperparameters, grads, opt_state, params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {"grad_norm": optax.tree.norm(grads), "param_norm": optax.tree.norm(params)}


def _adamw_in_one_pass(h: AdamWHyperparameters, grads, opt_state, params):
    # the state of optax.chain(clip or identity, adamw(schedule)): the step's scalars from it as optax computes them
    clip_state, (adam, decay_state, schedule_state) = opt_state
    count = optax.safe_increment(adam.count)
    if h.max_grad_norm > 0:
        norm = optax.tree.norm(grads)
        clip = jnp.logical_not(norm < h.max_grad_norm)
    else:
        norm, clip = jnp.ones(()), jnp.zeros((), bool)
    scalars = jnp.stack([clip.astype(jnp.float32), norm, jnp.asarray(h.max_grad_norm, jnp.float32),
                         1 - h.b1 ** count, 1 - h.b2 ** count, -1 * h.schedule(schedule_state.count)])
    new = jax.tree.map(lambda p, g, m, v: backend.adamw_update(p, g, m, v, scalars, b1=h.b1, b2=h.b2, eps=h.eps,
                                                               weight_decay=h.weight_decay),
                       params, grads, adam.mu, adam.nu)
    outer = jax.tree.structure(params)
    new_params, mu, nu, squares = jax.tree.transpose(outer, jax.tree.structure((0, 0, 0, 0)), new)
    adam = adam._replace(count=count, mu=mu, nu=nu)
    schedule_state = schedule_state._replace(count=optax.safe_increment(schedule_state.count))
    squares = sum(jax.tree.leaves(squares))
    norms = {"grad_norm": jnp.sqrt(squares[0]), "param_norm": jnp.sqrt(squares[1])}
    return new_params, (clip_state, (adam, decay_state, schedule_state)), norms
