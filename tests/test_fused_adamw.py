"""The optimizer's one-pass AdamW (`training.optimizer.apply_gradients` through `backend.adamw_update`, the CPU
kernel backend/adamw.cc): the same update and state as optax's clip + adamw chain, step after step, with and
without clipping (triggered or not) and weight decay; optax's own path for other transformations and under a
mesh of several devices."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from perceiver_ar_jax import backend
from perceiver_ar_jax.backend import cpu_kernels
from perceiver_ar_jax.training import optimizer as optim

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels do not run here")


def make(max_grad_norm=0.0, weight_decay=0.01):
    return optim.make_optimizer(ml_collections.ConfigDict(dict(
        learning_rate=3e-3, warmup_steps=2, num_train_steps=10, lr_min_fraction=0.1, adam_b1=0.9, adam_b2=0.99,
        adam_eps=1e-8, weight_decay=weight_decay, max_grad_norm=max_grad_norm)))


def params_and_grads(seed):
    rng = np.random.default_rng(seed)
    shapes = {"w": (37, 53), "b": (5,), "big": (3, 40_000)}  # the last spans several work items and a tail
    params = {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}
    grads = [{k: jnp.asarray(rng.standard_normal(s) * 0.01, jnp.float32) for k, s in shapes.items()} for _ in range(6)]
    return params, grads


def optax_update(optimizer, grads, state, params):
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state


@needs_kernels
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05, 100.0])  # none, clipping every step, never triggered
@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_one_pass_update_equals_optax(max_grad_norm, weight_decay):
    optimizer = make(max_grad_norm, weight_decay)
    params, grads = params_and_grads(0)
    fused = jax.jit(lambda g, s, p: optim.apply_gradients(optimizer, g, s, p)[:2])
    reference = jax.jit(lambda g, s, p: optax_update(optimizer, g, s, p))
    assert "perceiver_ar_adamw" in fused.lower(grads[0], optimizer.init(params), params).as_text()
    got, want = (params, optimizer.init(params)), (params, optimizer.init(params))
    for g in grads:
        got, want = fused(g, got[1], *got[:1]), reference(g, want[1], *want[:1])
    assert jax.tree.structure(got) == jax.tree.structure(want)  # optax's state: checkpoints hold the same tree
    (got_params, got_state), (want_params, want_state) = got, want
    # within an ulp or so: which products and sums XLA contracts into FMAs depends on its fusions
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=0)  # moments; counts exactly
    for a, b, before in zip(jax.tree.leaves(got_params), jax.tree.leaves(want_params), jax.tree.leaves(params),
                            strict=True):
        np.testing.assert_allclose(a, b, rtol=3e-7, atol=1e-7)
        assert np.abs(np.asarray(a) - np.asarray(before)).max() > 1e-3  # six steps moved them


@needs_kernels
def test_updates_in_place_of_donated_buffers():
    optimizer = make()
    params, grads = params_and_grads(1)
    state = optimizer.init(params)
    step = jax.jit(lambda p, s, g: optim.apply_gradients(optimizer, g, s, p)[:2], donate_argnums=(0, 1))
    calls = [line for line in step.lower(params, state, grads[0]).compile().as_text().splitlines()
             if "perceiver_ar_adamw" in line and "custom-call(" in line]
    assert len(calls) == 3 and all("output_to_operand_aliasing" in line for line in calls)  # one per tensor
    new_params, _ = step(params, state, grads[0])
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(new_params))


@needs_kernels
@pytest.mark.parametrize("max_grad_norm", [0.0, 0.05])
def test_norms_from_the_same_pass(max_grad_norm):
    optimizer = make(max_grad_norm)
    params, grads = params_and_grads(4)
    new_params, _, norms = jax.jit(lambda g, s, p: optim.apply_gradients(optimizer, g, s, p))(
        grads[0], optimizer.init(params), params)
    np.testing.assert_allclose(norms["grad_norm"], optax.tree.norm(grads[0]), rtol=1e-5)  # before clipping
    np.testing.assert_allclose(norms["param_norm"], optax.tree.norm(new_params), rtol=1e-5)


def test_other_transformations_go_through_optax():
    params, grads = params_and_grads(2)
    sgd = optax.sgd(0.1)
    new_params, _, norms = optim.apply_gradients(sgd, grads[0], sgd.init(params), params)
    np.testing.assert_allclose(new_params["w"], params["w"] - 0.1 * grads[0]["w"], rtol=1e-6)
    np.testing.assert_allclose(norms["param_norm"], optax.tree.norm(new_params), rtol=1e-6)


@needs_kernels
def test_optax_under_a_mesh_of_several_devices():
    """XLA's partitioner would gather the kernel's operands (every parameter and moment) onto every device."""
    params, _ = params_and_grads(3)
    assert backend.adamw_on_kernel(params)
    assert not backend.adamw_on_kernel(jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    devices = jax.devices()
    with jax.set_mesh(jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))):
        assert backend.adamw_on_kernel(params) == (len(devices) == 1)
