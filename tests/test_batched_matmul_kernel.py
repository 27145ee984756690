"""`backend.batched_product` and its CPU kernel (backend/batched_matmul.cc): attention's products with two batch
axes, any layout of the axes; float32 operands (AVX-512; the kernel takes any sizes, the model sends multiples of
32), and bf16 ones with float32 or bf16 results (sizes multiples of 32). bf16 runs
on AMX tiles where the CPU has them; `emulate=True` runs the same packing with scalar products on any CPU the
kernels build on, so every path of the packing is tested everywhere, and the AMX path too where it exists. Dense
attention's values and gradients through the kernel equal those through XLA's products, in both dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax import backend
from perceiver_ar_jax.backend import cpu_kernels
from perceiver_ar_jax.model.attention.dense import dense_attention
from perceiver_ar_jax.model.masks import causal_mask

needs_kernels = pytest.mark.skipif(not cpu_kernels.available(), reason="the CPU kernels do not run here")
MODES = [True, False] if cpu_kernels.available() and cpu_kernels.amx_available() else [True]  # emulate

B, Q, K, H, D = 2, 64, 96, 3, 32
SIZES = dict(b=B, q=Q, k=K, h=H, d=D)

# attention's forms (the forward's two, the backward's four, the heads-first ones XLA computes) and forms whose
# operands have neither axis contiguous (the packing's general path)
FORMS = ["bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", "bhqk,bqhd->bkhd", "bhqk,bqhd->bhdk", "bhqk,bkhd->bhdq",
         "bqhd,bhqk->bkhd", "bqdh,bkdh->bhqk", "bdqh,bkdh->bhqk"]


def operand(axes, seed, dtype=jnp.bfloat16):
    x = jax.random.normal(jax.random.key(seed), tuple(SIZES[a] for a in axes))
    return x.astype(dtype)


def exact(subscripts, a, b):
    return np.einsum(subscripts, np.asarray(a, np.float64), np.asarray(b, np.float64))


@needs_kernels
@pytest.mark.parametrize("emulate", MODES)
@pytest.mark.parametrize("subscripts", FORMS)
def test_products_equal_einsum_in_float32_and_bf16(subscripts, emulate):
    a_axes, b_axes = subscripts.split("->")[0].split(",")
    a, b = operand(a_axes, 0), operand(b_axes, 1)
    assert cpu_kernels.batched_matmul_supports(subscripts, a, b)
    want = exact(subscripts, a, b)
    f32 = cpu_kernels.batched_matmul(subscripts, a, b, jnp.float32, emulate=emulate)
    bf16 = jax.jit(lambda a, b: cpu_kernels.batched_matmul(subscripts, a, b, jnp.bfloat16, emulate=emulate))(a, b)
    assert f32.shape == bf16.shape == want.shape and f32.dtype == jnp.float32 and bf16.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32, want, rtol=1e-5, atol=1e-5)  # bf16 products are exact in float32
    np.testing.assert_array_equal(bf16, f32.astype(jnp.bfloat16))  # rounded once, to nearest even


@needs_kernels
@pytest.mark.parametrize("subscripts", FORMS)
def test_float32_products_equal_einsum(subscripts):
    a_axes, b_axes = subscripts.split("->")[0].split(",")
    a, b = operand(a_axes, 0, jnp.float32), operand(b_axes, 1, jnp.float32)
    assert cpu_kernels.batched_matmul_supports(subscripts, a, b)
    got = jax.jit(lambda a, b: cpu_kernels.batched_matmul(subscripts, a, b, jnp.float32))(a, b)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, exact(subscripts, a, b), rtol=1e-5, atol=1e-4)


@needs_kernels
@pytest.mark.parametrize("subscripts", ["bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd", "bhqk,bqhd->bkhd", "bdqh,bkdh->bhqk"])
@pytest.mark.parametrize("sizes", [dict(b=1, q=1, k=1, h=1, d=1), dict(b=2, q=13, k=37, h=3, d=9),
                                   dict(b=1, q=25, k=531, h=2, d=65), dict(b=2, q=700, k=33, h=1, d=300)])
def test_float32_products_of_any_size(subscripts, sizes):
    # the blocked float32 path: rows in panels of 12 (short last ones), columns in panels of 32 and blocks of 512
    # (short last ones), k in chunks of 256 (a short last one), operands that are neither row- nor column-major;
    # A's full panels read in place (rows contiguous, or columns k <= 512 apart: k = 33, 37) or packed (531 apart)
    a_axes, b_axes = subscripts.split("->")[0].split(",")
    a = jax.random.normal(jax.random.key(0), tuple(sizes[x] for x in a_axes), jnp.float32)
    b = jax.random.normal(jax.random.key(1), tuple(sizes[x] for x in b_axes), jnp.float32)
    got = jax.jit(lambda a, b: cpu_kernels.batched_matmul(subscripts, a, b, jnp.float32))(a, b)
    np.testing.assert_allclose(got, exact(subscripts, a, b), rtol=1e-5, atol=2e-4)


@needs_kernels
@pytest.mark.skipif(len(MODES) < 2, reason="no AMX tiles on this CPU")
def test_amx_tiles_and_emulation_agree():
    q, k = operand("bqhd", 0), operand("bkhd", 1)
    amx = cpu_kernels.batched_matmul("bqhd,bkhd->bhqk", q, k, jnp.float32)
    emulated = cpu_kernels.batched_matmul("bqhd,bkhd->bhqk", q, k, jnp.float32, emulate=True)
    np.testing.assert_allclose(amx, emulated, rtol=1e-6, atol=1e-6)


@needs_kernels
def test_vmap_runs_each_product():
    q, k = operand("bqhd", 0), operand("bkhd", 1)
    stacked = jnp.stack([q, q[::-1]]), jnp.stack([k, k[::-1]])
    got = jax.vmap(lambda q, k: cpu_kernels.batched_matmul("bqhd,bkhd->bhqk", q, k, jnp.float32, emulate=True))(
        *stacked)
    np.testing.assert_allclose(got[1], exact("bqhd,bkhd->bhqk", q[::-1], k[::-1]), rtol=1e-5, atol=1e-5)


def test_supported_forms_and_shapes():
    x = jnp.zeros((2, 64, 4, 32), jnp.bfloat16)
    p = jnp.zeros((2, 4, 64, 64), jnp.bfloat16)
    assert cpu_kernels.batched_matmul_supports("bqhd,bkhd->bhqk", x, x)
    assert cpu_kernels.batched_matmul_supports("bhqk,bkhd->bqhd", p, x)
    assert not cpu_kernels.batched_matmul_supports("bhqk,bkhd->bqdh", p, x)  # C's last axis a batch axis
    assert not cpu_kernels.batched_matmul_supports("bqhd,bkhd->bhq", x, x)  # not 4-D
    assert not cpu_kernels.batched_matmul_supports("bqhd,bkhd->bhqk", x[:, :40], x)  # 40 queries, bf16
    assert not cpu_kernels.batched_matmul_supports("bqhd,bkhd->bhqk", x[..., :16], x[..., :16])  # head_dim 16
    assert not cpu_kernels.batched_matmul_supports("bqhd,bqhd->bhqd", x, x)  # nothing contracted
    assert not cpu_kernels.batched_matmul_supports("bqhd,bkhd->bhqk", x, x.astype(jnp.float32))  # mixed dtypes
    assert not cpu_kernels.batched_matmul_supports("bqhd,bkhd->bhqk", *(x.astype(jnp.float16),) * 2)


@needs_kernels
def test_kernel_rejects_strides_past_an_operand():
    q = operand("bqhd", 0)
    call = jax.ffi.ffi_call("perceiver_ar_batched_matmul", jax.ShapeDtypeStruct((B, H, Q, Q), jnp.float32))
    dims = np.array([B, H, Q, Q, D], np.int64)
    good = np.array([Q * H * D, D, H * D, 1], np.int64)
    with pytest.raises(Exception, match="strides reach past an operand"):
        call(q, q, dims=dims, a_strides=good * 2, b_strides=good, c_strides=np.array([H * Q * Q, Q * Q, Q, 1]),
             emulate=True).block_until_ready()


def test_batched_product_is_einsum_off_the_kernel():
    x = jax.random.normal(jax.random.key(0), (2, 8, 3, 4))  # odd sizes: XLA's einsum
    assert not backend.batched_product_on_kernel("bqhd,bkhd->bhqk", x, x)
    np.testing.assert_allclose(backend.batched_product("bqhd,bkhd->bhqk", x, x, jnp.float32),
                               exact("bqhd,bkhd->bhqk", x, x), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_attention_and_gradients_through_the_kernel_equal_xla(dtype, masked, monkeypatch):
    """The custom VJP's six products on the kernel (bf16 emulated where the CPU has no AMX) against XLA's."""
    shapes = [(2, 64, 2, 32), (2, 96, 2, 32), (2, 96, 2, 32), (2, 64, 2, 32)]
    q, k, v, g = (jax.random.normal(jax.random.key(i), s).astype(dtype) for i, s in enumerate(shapes))
    mask = causal_mask(64, 96) if masked else None

    def run():
        loss = lambda q, k, v: jnp.sum(dense_attention(q, k, v, mask).astype(jnp.float32) * g)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)

    monkeypatch.setattr(backend, "EMULATE_AMX", True)
    assert backend.batched_product_on_kernel("bqhd,bkhd->bhqk", q, k)
    kernel_loss, kernel_grads = run()
    monkeypatch.setattr(cpu_kernels, "batched_matmul_supports", lambda *args: False)
    xla_loss, xla_grads = run()
    tolerance = 1e-2 if dtype == jnp.bfloat16 else 1e-4  # the loss sums terms of both signs
    np.testing.assert_allclose(kernel_loss, xla_loss, rtol=tolerance)
    for got, want in zip(kernel_grads, xla_grads, strict=True):
        assert got.dtype == want.dtype == dtype
        scale = float(jnp.max(jnp.abs(want.astype(jnp.float32))))
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=tolerance * scale)


@needs_kernels
def test_not_taken_under_a_mesh_of_several_devices():
    """XLA's partitioner would gather a custom call's operands onto every device: its einsum there."""
    x = jnp.zeros((2, 64, 4, 32), jnp.float32)
    assert backend.batched_product_on_kernel("bqhd,bkhd->bhqk", x, x)
    devices = jax.devices()
    with jax.set_mesh(jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))):
        assert backend.batched_product_on_kernel("bqhd,bkhd->bhqk", x, x) == (len(devices) == 1)
