"""What depends on the backend (CPU, GPU, TPU) and only changes how fast, never what, is computed.

Everything the library tunes for one backend lives here, behind functions whose signatures say nothing of it:
- `matmul` / `dot_general` / `tied_output`: every weight product of the model (below);
- `prepare_weight` / `prepared_matmul`: the decode-time forms of a weight matrix (bfloat16, int8 with per-column
  scales; on CPU packed for the kernel of `cpu_kernels.py`, which reads them at the memory bandwidth);
- `decode_cache_dtype`: the dtype of decoding's key/value caches;
- `decode_compiler_options`: XLA options for the compiled decode loop;
- `enable_compilation_cache`: JAX's persistent compilation cache, so that a second process starts fast;
- `reuse_host_memory`: on CPU, the C heap keeps the memory of a step's buffers for the next step;
- `computed_once`: a value XLA must not recompute inside each of its consumers (the rotary embedding's cos and sin);
- `gelu`: the exact GELU (on CPU a kernel: XLA's float32 erfc is ~4% of the train step);
- `cross_entropy_gradient`: a chunk of logits -> log Z, the labels' logits and the loss's gradient (on CPU one
  pass of a kernel over the logits instead of XLA's three);
- `batched_product`: attention's products (two batch axes), on CPU a kernel: float32 on AVX-512, bf16 on AMX tiles
  (XLA:CPU runs them at a third to a half of its speed, and those with a transposed operand slower still);
- `adamw_update` / `adamw_on_kernel`: AdamW's update of a float32 tensor in one pass (on CPU a kernel; XLA runs
  optax's as three fusions per tensor);
- `layer_norm` / `layer_norm_on_kernel`: Flax's LayerNorm and its derivative, on CPU a kernel that reads each row
  once per pass (XLA evaluates them in several fusions and reductions).

The weight products are one 2-D matrix product each, with float32 accumulation in every precision. Two things
make XLA's own lowering of Flax's `Dense` slow on CPU, and this module fixes both without changing what is
computed:

- A (batch, tokens, channels) input contracted with a weight gives, in the backward pass, a weight gradient that
  contracts two axes (batch and tokens); XLA:CPU runs that 2-3x slower than the same product on a 2-D matrix.
  Here every product is a (rows, in) x (in, out) matrix product, leading axes flattened into rows, so the forward
  and both backward products are plain 2-D GEMMs.
- With bfloat16 operands XLA:CPU computes a bf16-output product in float32 (no faster than fp32), but a
  bf16 x bf16 -> float32 product runs on the bf16 units about twice as fast. So a low-precision product asks for
  a float32 result (`preferred_element_type`) and rounds it to the compute dtype afterwards; its custom VJP rounds
  the incoming gradient to the compute dtype and does the two backward products the same way, as PyTorch's
  bf16 autocast does. On TPU and GPU this is what a bf16 product does anyway (float32 accumulation).

float32 operands take the same 2-D path and JAX's own derivative.

`precision` (a `lax.Precision` or its name; the model passes its config's `matmul_precision`) goes to every
product, forward and backward: TPUs multiply float32 operands in one bfloat16 pass at DEFAULT precision and GPUs
in TF32, so float32 results as perceiver-io's need HIGHEST there (on CPU every precision is full float32).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import sys
from collections.abc import Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from perceiver_ar_jax.backend import cpu_kernels
from perceiver_ar_jax.backend.mesh_guard import partitioned, several_devices
from perceiver_ar_jax.backend.one_pass import (
    MASKED_SCORE,
    adamw_on_kernel,
    adamw_update,
    layer_norm,
    layer_norm_on_kernel,
    masked_softmax,
    masked_softmax_grad,
)

__all__ = ["MASKED_SCORE", "WEIGHT_FORMATS", "adamw_on_kernel", "adamw_update", "as_precision", "batched_product",
           "batched_product_on_kernel", "computed_once", "layer_norm", "layer_norm_on_kernel",
           "cross_entropy_gradient", "decode_cache_dtype",
           "decode_compiler_options", "dot_general", "enable_compilation_cache", "gelu", "is_prepared",
           "masked_softmax", "masked_softmax_grad", "matmul", "prepare_weight", "prepared_matmul",
           "reuse_host_memory", "swap_last_axes", "tied_output"]

WEIGHT_FORMATS = ("float32", "bfloat16", "int8")  # how decoding may store the weight matrices

# Run `batched_product`'s kernel with scalar products in place of the AMX tiles where the CPU has none (slow, the
# same packing and results up to float32 rounding): for tests of the kernel path on any CPU.
EMULATE_AMX = os.environ.get("PERCEIVER_AR_EMULATE_AMX") == "1"


def matmul(a: jnp.ndarray, b: jnp.ndarray, out_dtype: jnp.dtype | None = None,
           rhs_transposed: bool = False, precision: lax.Precision | str | None = None) -> jnp.ndarray:
    """(rows, k) x (k, cols) -> (rows, cols) in out_dtype (default a's dtype), accumulated in float32.

    rhs_transposed: b is (cols, k) and the product is a @ b.T (a tied output embedding). Say so here rather than
    passing `b.T`: XLA:CPU turns a bf16 product whose operand is a transpose into a float32 one.
    Operands below float32 precision (bf16, f16) are multiplied with float32 accumulation in both passes.
    precision: a `lax.Precision` (or "default" | "high" | "highest") for the product and its gradients.
    """
    out_dtype = jnp.dtype(a.dtype if out_dtype is None else out_dtype)
    precision = as_precision(precision)
    if a.dtype == jnp.float32 and b.dtype == jnp.float32:
        return _dot_f32(a, b, 1, 1 if rhs_transposed else 0, precision).astype(out_dtype)
    if a.shape[0] == 1 and jax.default_backend() == "cpu":
        # XLA:CPU multiplies a single bf16 row 2-3x slower than two (20x by a (vocab, channels) embedding):
        # one-token decoding at batch 1 is all such products
        return _low_precision_matmul(jnp.concatenate([a, a]), b, out_dtype, rhs_transposed, precision)[:1]
    return _low_precision_matmul(a, b, out_dtype, rhs_transposed, precision)


def as_precision(precision: lax.Precision | str | None) -> lax.Precision | None:
    """A lax.Precision from itself, its name ("default" | "high" | "highest") or None (None stays None)."""
    if precision is None or isinstance(precision, lax.Precision):
        return precision
    return getattr(lax.Precision, str(precision).upper())


def _dot_f32(a: jnp.ndarray, b: jnp.ndarray, a_axis: int, b_axis: int, precision=None) -> jnp.ndarray:
    """The 2-D product contracting a's axis a_axis with b's axis b_axis, as float32."""
    return lax.dot_general(a, b, (((a_axis,), (b_axis,)), ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _low_precision_matmul(a: jnp.ndarray, b: jnp.ndarray, out_dtype: jnp.dtype, rhs_transposed: bool,
                          precision: lax.Precision | None) -> jnp.ndarray:
    return _dot_f32(a, b, 1, 1 if rhs_transposed else 0, precision).astype(out_dtype)


def _low_precision_matmul_fwd(a, b, out_dtype, rhs_transposed, precision):
    return _low_precision_matmul(a, b, out_dtype, rhs_transposed, precision), (a, b)


def _low_precision_matmul_bwd(out_dtype, rhs_transposed, precision, residuals, g):
    a, b = residuals
    g = g.astype(a.dtype)  # the gradient of a bf16 result is bf16, as under autocast
    # the weight gradient's left operand transposed row-major on CPU: XLA:CPU turns the product of a plain x.T into
    # a float32 one, 3-6x slower (elsewhere a plain transpose, which XLA folds into the product)
    if rhs_transposed:  # y = a @ b.T, b (cols, k)
        return (_dot_f32(g, b, 1, 0, precision).astype(a.dtype),
                _dot_f32(swap_last_axes(g), a, 1, 0, precision).astype(b.dtype))
    return (_dot_f32(g, b, 1, 1, precision).astype(a.dtype),
            _dot_f32(swap_last_axes(a), g, 1, 0, precision).astype(b.dtype))


_low_precision_matmul.defvjp(_low_precision_matmul_fwd, _low_precision_matmul_bwd)


def computed_once(x: jnp.ndarray) -> jnp.ndarray:
    """x, evaluated once into a buffer of its own: XLA fuses an elementwise producer into every consumer and
    evaluates it per consumer element, so cos and sin broadcast over attention heads were evaluated once per head
    and per fusion reading them (on CPU ~12% of the bf16 training step). On CPU a copy through a custom call,
    which XLA cannot fuse through (`lax.optimization_barrier` is removed before fusion there); elsewhere x (and
    under a mesh of several devices, whose partitioner would gather a custom call's operands onto every device)."""
    return cpu_kernels.copy(x) if cpu_kernels.available() and not partitioned() else x


def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """The exact (erf) GELU, evaluated in float32 and returned in x's dtype, as perceiver-io's `nn.GELU()` under
    autocast. On CPU with float32 or bfloat16 x a kernel with its own derivative (`cpu_kernels.gelu`, `gelu_grad`:
    XLA evaluates float32 erfc and exp at ~0.4 elements per ns); elsewhere, and under a mesh of several devices,
    XLA's."""
    if x.dtype in (jnp.bfloat16, jnp.float32) and cpu_kernels.available() and not several_devices():
        return _gelu_kernel(x)
    return jax.nn.gelu(x.astype(jnp.float32), approximate=False).astype(x.dtype)


@jax.custom_vjp
def _gelu_kernel(x: jnp.ndarray) -> jnp.ndarray:
    return cpu_kernels.gelu(x)


_gelu_kernel.defvjp(lambda x: (cpu_kernels.gelu(x), x), lambda x, g: (cpu_kernels.gelu_grad(x, g.astype(x.dtype)),))


def cross_entropy_gradient(logits: jnp.ndarray, labels: jnp.ndarray, weights: jnp.ndarray, z_loss_weight: float,
                           dtype) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """logits (..., vocab) float32, labels (...) int, weights (...) float32 -> log Z and the labels' logits, (...)
    float32, and the gradient of sum(weights * (log Z - label logit + z_loss_weight * log Z^2)) with respect to the
    logits, (..., vocab) rounded to dtype (the compute dtype: what the projection's backward products multiply).

    On CPU, one pass of `cpu_kernels.cross_entropy` over each row (XLA's formula reads the float32 logits three
    times and evaluates the exponential twice: ~5% of the bf16 bench step, ~3% of the fp32 one); elsewhere, and
    under a mesh of several devices, XLA's.
    """
    dtype = jnp.dtype(dtype)
    if dtype in (jnp.bfloat16, jnp.float32) and cpu_kernels.available() and not several_devices():
        vocab, lead = logits.shape[-1], logits.shape[:-1]
        log_z, label_logits, grad = cpu_kernels.cross_entropy(
            logits.reshape(-1, vocab), labels.reshape(-1), weights.reshape(-1), z_loss_weight, dtype)
        return log_z.reshape(lead), label_logits.reshape(lead), grad.reshape(*lead, vocab)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    label_logits = jnp.take_along_axis(logits, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    probs = jnp.exp(logits - log_z[..., None])
    # d / d logits = w * (softmax - one_hot(label)) + w * z_loss_weight * 2 logZ * softmax
    one_hot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
    grad = (weights * (1.0 + 2.0 * z_loss_weight * log_z))[..., None] * probs - weights[..., None] * one_hot
    return log_z, label_logits, grad.astype(dtype)


def batched_product(subscripts: str, a: jnp.ndarray, b: jnp.ndarray, out_dtype,
                    precision: lax.Precision | str | None = None) -> jnp.ndarray:
    """einsum(subscripts, a, b) accumulated in float32, in out_dtype (rounded once): a product of two 4-D operands
    with two batch axes, one free axis each and one contracted axis (attention's, e.g. "bqhd,bkhd->bhqk").

    On CPU, sizes multiples of 32, float32 operands and bf16 ones where the CPU has AMX tiles run on
    `cpu_kernels.batched_matmul`, which reads and writes any layout of the axes (bench model: 2-3x XLA's speed on
    these products); not differentiable there (call it from a custom VJP). Elsewhere XLA's einsum.
    """
    if batched_product_on_kernel(subscripts, a, b):
        return cpu_kernels.batched_matmul(subscripts, a, b, out_dtype,
                                          emulate=a.dtype == jnp.bfloat16 and not cpu_kernels.amx_available())
    return jnp.einsum(subscripts, a, b, preferred_element_type=jnp.float32,
                      precision=as_precision(precision)).astype(out_dtype)


def batched_product_on_kernel(subscripts: str, a: jnp.ndarray, b: jnp.ndarray) -> bool:
    """Whether `batched_product` runs this product on the CPU kernel: not under a mesh of several devices, where
    XLA's partitioner would gather a custom call's operands onto every device (its einsum it partitions)."""
    return (cpu_kernels.available() and cpu_kernels.batched_matmul_supports(subscripts, a, b)
            and (a.dtype == jnp.float32 or EMULATE_AMX or cpu_kernels.amx_available()) and not partitioned())


def swap_last_axes(x: jnp.ndarray) -> jnp.ndarray:
    """x (..., R, C) -> (..., C, R), materialised row-major on CPU (`cpu_kernels.transpose`, 8 x 8 register
    blocks; XLA:CPU's transposing fusions read one side with a stride, several times slower); elsewhere a plain
    swap of the axes, which XLA folds into its consumer (also under a mesh of several devices)."""
    return cpu_kernels.transpose(x) if cpu_kernels.available() and not partitioned() else jnp.swapaxes(x, -1, -2)


def dot_general(lhs: jnp.ndarray, rhs: jnp.ndarray, dimension_numbers, precision=None,
                preferred_element_type=None, **kwargs) -> jnp.ndarray:
    """`lax.dot_general` for Flax `Dense` / `DenseGeneral(dot_general=...)`.

    The products those layers make (lhs's trailing axes contracted with rhs's leading axes, in order, no batch
    axes) run as one `matmul`; any other form goes to `lax.dot_general` unchanged.
    """
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    k = len(lhs_contract)
    trailing = tuple(range(lhs.ndim - k, lhs.ndim))
    if lhs_batch or rhs_batch or tuple(lhs_contract) != trailing or tuple(rhs_contract) != tuple(range(k)):
        return lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, **kwargs)
    lead, out = lhs.shape[:lhs.ndim - k], rhs.shape[k:]
    inner = math.prod(rhs.shape[:k])
    y = matmul(lhs.reshape(math.prod(lead), inner), rhs.reshape(inner, math.prod(out)),
               preferred_element_type or jnp.result_type(lhs, rhs), precision=precision)
    return y.reshape(lead + out)


def tied_output(rows: jnp.ndarray, embedding: jnp.ndarray,
                precision: lax.Precision | str | None = None) -> jnp.ndarray:
    """Logits through a tied embedding: rows (n, channels) x embedding (vocab, channels)^T -> (n, vocab) float32."""
    return matmul(rows, embedding, jnp.float32, rhs_transposed=True, precision=precision)


# ----------------------------------------------------------------------------------------------------------------
# decode-time weights
def prepare_weight(kernel: jnp.ndarray, weights: str) -> dict[str, jnp.ndarray]:
    """A (K, N) weight matrix in the decode-time form `weights` ("float32", "bfloat16" or "int8").

    int8: per output column, the largest |w| maps to 127 (`kernel_scale` (N,) float32; w ~ q * scale). Where the
    packed kernel runs (`cpu_kernels.available()`) the matrix is packed into `packed_kernel` panels; elsewhere it
    is a (K, N) `prepared_kernel` in the new dtype, which XLA's products dequantize.
    """
    if weights not in WEIGHT_FORMATS:
        raise ValueError(f"weights={weights!r} out of valid range: must be one of {WEIGHT_FORMATS}")
    kernel = jnp.asarray(kernel, jnp.float32)
    prepared = {}
    if weights == "int8":
        scale = jnp.max(jnp.abs(kernel), axis=0) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        kernel = jnp.clip(jnp.round(kernel / scale), -127, 127).astype(jnp.int8)
        prepared["kernel_scale"] = scale
    elif weights == "bfloat16":
        kernel = kernel.astype(jnp.bfloat16)
    if cpu_kernels.available():
        prepared["packed_kernel"] = cpu_kernels.pack(kernel)
    else:
        prepared["prepared_kernel"] = kernel
    return prepared


def is_prepared(weight: Mapping) -> bool:
    """Whether a layer's parameters hold a `prepare_weight` form instead of a plain float kernel."""
    return "packed_kernel" in weight or "prepared_kernel" in weight


def prepared_matmul(rows: jnp.ndarray, weight: Mapping, n: int, dtype) -> jnp.ndarray:
    """rows (M, K) @ a prepared (K, N) weight -> (M, N) in dtype (float32 accumulation)."""
    scale = weight.get("kernel_scale")
    if "packed_kernel" in weight:
        y = cpu_kernels.packed_matmul(rows, weight["packed_kernel"], n, scale)
    else:
        y = matmul(rows.astype(dtype), weight["prepared_kernel"].astype(dtype), jnp.float32)
        if scale is not None:
            y = y * scale
    return y.astype(dtype)


# ----------------------------------------------------------------------------------------------------------------
# decoding
def decode_cache_dtype(compute_dtype: Any) -> jnp.dtype:
    """The dtype of decoding's key/value caches: the compute dtype, except float32 on CPU, where XLA's bfloat16
    products of one query with a cache run over ten times slower than float32 ones (and the attention softmax is
    float32 anyway)."""
    return jnp.dtype(jnp.float32) if jax.default_backend() == "cpu" else jnp.dtype(compute_dtype)


@functools.lru_cache(maxsize=1)
def decode_compiler_options() -> dict[str, Any]:
    """XLA options for the compiled decode loop.

    On CPU, XLA's default copy insertion copies every cache once or twice per step (a step reads a cache and then
    updates one slot in place); its region analysis sees that the read comes first.
    """
    if jax.default_backend() != "cpu":
        return {}
    options = {"xla_cpu_copy_insertion_use_region_analysis": True}
    try:  # an XLA without this option only gets slower decoding
        jax.jit(lambda x: x + 1, compiler_options=options)(jnp.int32(0)).block_until_ready()
    except Exception:  # noqa: BLE001 - JaxRuntimeError "No such compile option"
        return {}
    return options


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str:
    """Turn on JAX's persistent compilation cache, so that a later process loads compiled programs (the decode
    loop) instead of compiling them again. directory: $JAX_COMPILATION_CACHE_DIR, else
    ~/.cache/perceiver_ar_jax/jax. Returns the directory."""
    directory = os.fspath(directory or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                          or os.path.join(os.path.expanduser("~"), ".cache", "perceiver_ar_jax", "jax"))
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    # every program: a start-up runs dozens of small ones (weight preparation, cache set-up) besides the loop
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return directory


# ----------------------------------------------------------------------------------------------------------------
# host memory
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # glibc's mallopt parameters (malloc.h)


def reuse_host_memory() -> bool:
    """Make glibc's heap keep freed memory for reuse instead of handing it back to the kernel. Returns whether
    it took effect (Linux with glibc, called before JAX's first computation), else False and nothing changes.

    XLA:CPU allocates each execution's temporary buffer (about 1 GB for the bench train step) when the step starts
    and frees it when it ends. glibc serves an allocation that large with a fresh mmap (a worker thread's arena
    always does), so every step page-faults its whole working set in again: about 270k faults and 0.2 s of a
    0.9 s bf16 step on 2 cores. With one arena, no mmap'd chunks and a 2 GB trim threshold, the freed buffer stays
    in the heap and the next step reuses its pages. The cost: the process keeps its peak heap until it exits,
    which a training process does anyway. Threads pick their arena on their first allocation, so this must run
    before JAX starts its CPU thread pools (the training loop and the benches call it first thing).
    """
    if not sys.platform.startswith("linux"):
        return False
    from jax._src import xla_bridge  # noqa: PLC0415 - only to see whether the backends (and their threads) exist

    if xla_bridge.backends_are_initialized():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    return all(mallopt(param, value) == 1 for param, value in
               ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
