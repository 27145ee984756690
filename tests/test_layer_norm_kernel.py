"""The model's LayerNorm (`model.layers.LayerNorm`) on the CPU kernel (backend/layer_norm.cc, `backend.layer_norm`):
Flax's `nn.LayerNorm` parameters, values and gradients to float32 rounding, for float32 and bf16 inputs and
outputs and odd widths; Flax's own module under a mesh of several devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax import backend
from perceiver_ar_jax.backend import cpu_kernels
from perceiver_ar_jax.model.layers import LayerNorm

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels do not run here")
DTYPES = [(jnp.float32, jnp.float32), (jnp.bfloat16, jnp.bfloat16), (jnp.float32, jnp.bfloat16),
          (jnp.bfloat16, jnp.float32)]


def relative_error(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return np.abs(a - b).max() / (np.abs(b).max() + 1e-12)


@needs_kernels
@pytest.mark.parametrize("x_dtype,out_dtype", DTYPES)
@pytest.mark.parametrize("shape", [(2, 5, 512), (3, 37), (1, 2048), (33, 16)])  # rows x widths with vector tails
def test_values_and_gradients_equal_flax(x_dtype, out_dtype, shape):
    x = (jax.random.normal(jax.random.key(0), shape) * 3 + 1).astype(x_dtype)
    ours = LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=out_dtype)
    flax_norm = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=out_dtype)
    params = flax_norm.init(jax.random.key(1), x)
    assert jax.tree.structure(ours.init(jax.random.key(1), x)) == jax.tree.structure(params)
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
    g = jax.random.normal(jax.random.key(3), shape).astype(out_dtype)

    def value_and_grads(module):
        f = jax.jit(lambda p, x: jax.vjp(lambda p, x: module.apply(p, x), p, x))
        y, vjp = f(params, x)
        return y, *vjp(g)

    assert "perceiver_ar_layer_norm" in jax.jit(lambda p, x: ours.apply(p, x)).lower(params, x).as_text()
    (y, d_params, dx), (want_y, want_d_params, want_dx) = value_and_grads(ours), value_and_grads(flax_norm)
    assert y.dtype == want_y.dtype and dx.dtype == want_dx.dtype
    # float32 results to float32 rounding; bf16 ones to a bf16 ulp (JAX's own derivative of a bf16 x adds three
    # bf16-rounded cotangents, the kernel rounds once)
    assert relative_error(y, want_y) < (1e-6 if out_dtype == jnp.float32 else 1e-2)
    assert relative_error(dx, want_dx) < (1e-6 if x_dtype == jnp.float32 else 1e-2)
    for a, b in zip(jax.tree.leaves(d_params), jax.tree.leaves(want_d_params), strict=True):
        assert a.dtype == b.dtype and relative_error(a, b) < 1e-6


@needs_kernels
def test_vmap_and_flax_module_under_a_mesh_of_several_devices():
    x = jax.random.normal(jax.random.key(0), (3, 4, 64))
    scale, bias = jnp.full((64,), 1.5), jnp.full((64,), 0.25)
    batched = jax.vmap(lambda x: backend.layer_norm(x, scale, bias, 1e-5, jnp.float32))(x)
    np.testing.assert_allclose(batched, backend.layer_norm(x, scale, bias, 1e-5, jnp.float32), rtol=1e-6)
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    np.testing.assert_allclose(batched, (x - mean) / jnp.sqrt(var + 1e-5) * 1.5 + 0.25, rtol=1e-5, atol=1e-5)
    assert backend.layer_norm_on_kernel(x, jnp.float32)
    devices = jax.devices()
    with jax.set_mesh(jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))):
        assert backend.layer_norm_on_kernel(x, jnp.float32) == (len(devices) == 1)


@needs_kernels
def test_flax_module_inside_shard_map_over_several_devices():
    """Inside shard_map the custom VJP's gradients would have to carry the manual axes x varies over: Flax's."""
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("one device")
    seen = []

    def local(x):
        seen.append(backend.layer_norm_on_kernel(x, jnp.float32))
        return x

    mesh = jax.make_mesh((len(devices),), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        spec = jax.sharding.PartitionSpec("context")
        jax.shard_map(local, in_specs=spec, out_specs=spec)(jnp.zeros((len(devices), 64)))
    assert seen == [False]
