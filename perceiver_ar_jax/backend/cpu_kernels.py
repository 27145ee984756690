"""CPU kernels XLA lacks, as XLA FFI custom calls built on first use: a matrix product over packed weights
(`packed_matmul.cc`, for decoding), a row-major transpose and a copy whose results XLA cannot fold into their
consumers (`layout.cc`, for training), the cross-entropy of a chunk of logits with its gradient
(`cross_entropy.cc`, for training), the exact GELU with its derivative (`gelu.cc`), attention's batched products
(`batched_matmul.cc`, bf16 on AMX tiles, float32 on AVX-512: `batched_matmul_f32.h`), AdamW's update of a tensor
(`adamw.cc`), LayerNorm with its derivative (`layer_norm.cc`) and attention's masked softmax with its derivative
(`softmax.cc`).

Why the product: decoding multiplies a few rows by every weight of the model once per token, so a step reads all the
weights and its speed is the memory bandwidth. XLA:CPU's products read float32 weights at about 80% of the
bandwidth, turn bfloat16 and int8 weights into float32 copies first (no faster than float32), and run products of
2-32 rows no faster than separate ones. The kernel reads weights stored in panels of 64 columns (`pack`: each panel
one contiguous K x 64 block) in float32, bfloat16 or int8 (with a float32 scale per output column), converts them in
registers and accumulates in float32, with one worker thread per core; a step then reads each byte once, close to
the bandwidth, and half (bfloat16) or a quarter (int8) of the bytes.

Why the transpose: a dense layer's weight gradient x^T g contracts the leading axis of both operands, and XLA:CPU
runs such a product 3-6x slower than one whose left operand is a row-major (K, rows) matrix (its bf16 product even
becomes a float32 one). A transpose written in JAX does not help: XLA's layout assignment folds it back into the
product. The custom call's result is row-major by contract, so the product after it takes the fast path.

Why the copy: XLA fuses an elementwise producer into each consumer and evaluates it once per consumer element. The
rotary embedding's cos and sin, (batch, length, rotated), end up evaluated for every head in every fusion that
reads them, ~12% of the bf16 training step; computed into a custom call's buffer they are evaluated once.

Why the cross-entropy: XLA reads a chunk's (rows, vocab) float32 logits three times (max, sum of exponentials,
gradient) and evaluates the exponential twice, at about one element per ns; the kernel reads each row from memory
once (then from L2) with a 16-lane exponential and writes the bf16 gradient: ~50 -> ~20 ms of the bf16 bench step.

Why the batched products: XLA:CPU runs attention's bf16 products (two batch axes, 64-1024 wide matrices) at
230-500 GFLOP/s on this kind of CPU, and those with a transposed operand (the key and value gradients) at 70-80,
where oneDNN reaches 700-1200. The kernel runs them on the AMX tiles, reading and writing the model's layouts
through strides (no transposes around them): 2-3x XLA's speed on the bench model's shapes.

Why the GELU: XLA evaluates the float32 erfc of the exact GELU (and exp for its derivative) at ~0.4 elements per
ns, ~4% of the bench train step in either dtype; the kernel evaluates erf and exp 16 lanes at a time (`vector_math.h`).

Why AdamW and LayerNorm (`adamw.cc`, `layer_norm.cc`, called through `one_pass.py`): both are memory-bound, and
XLA evaluates optax's AdamW as three fusions per tensor (the gradient read three times, the new moments read back)
and a LayerNorm with its derivative as several fusions and reductions that each read the rows again; the kernels
read and write each element once per pass. Paired bench train steps: AdamW ~3% (fp32) / ~5% (bf16) faster,
LayerNorm ~4% / ~6%. Attention's masked softmax and its derivative (`softmax.cc`, also through `one_pass.py`) the
same way: XLA read the (batch, heads, queries, keys) scores or their gradient two to four times in several fusions;
the kernel reads each row once (then from L1) and writes it once: ~4% (fp32) / ~5-6% (bf16) of the step.

The library is compiled with the machine's C++ compiler (`-march=native`, AVX-512) into
~/.cache/perceiver_ar_jax/kernels (or $PERCEIVER_AR_KERNEL_DIR) the first time it is needed; `available()` is
False where that cannot be done (no compiler, no AVX-512, not CPU, or PERCEIVER_AR_CPU_KERNELS=0), and the callers
use XLA's products instead: the same numbers up to float32 rounding.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

PANEL = 64  # output columns per panel (the kernel's register tile)
SOURCES = [Path(__file__).with_name(name) for name in ("packed_matmul.cc", "layout.cc", "cross_entropy.cc",
                                                          "gelu.cc", "batched_matmul.cc", "adamw.cc",
                                                          "layer_norm.cc", "softmax.cc")]
HEADERS = [Path(__file__).with_name(name) for name in ("parallel_for.h", "vector_math.h", "transpose_block.h",
                                                          "batched_matmul_f32.h")]
TARGETS = {"perceiver_ar_packed_matmul": "PerceiverArPackedMatmul", "perceiver_ar_transpose": "PerceiverArTranspose",
           "perceiver_ar_copy": "PerceiverArCopy", "perceiver_ar_cross_entropy": "PerceiverArCrossEntropy",
           "perceiver_ar_gelu": "PerceiverArGelu", "perceiver_ar_gelu_grad": "PerceiverArGeluGrad",
           "perceiver_ar_batched_matmul": "PerceiverArBatchedMatmul", "perceiver_ar_adamw": "PerceiverArAdamw",
           "perceiver_ar_layer_norm": "PerceiverArLayerNorm",
           "perceiver_ar_layer_norm_grad": "PerceiverArLayerNormGrad",
           "perceiver_ar_masked_softmax": "PerceiverArMaskedSoftmax",
           "perceiver_ar_masked_softmax_grad": "PerceiverArMaskedSoftmaxGrad"}

log = logging.getLogger(__name__)


def _cpu_has_avx512() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return "avx512f" in flags.split()


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """Whether the kernels run here (built and registered on the first call)."""
    if os.environ.get("PERCEIVER_AR_CPU_KERNELS", "1") == "0" or jax.default_backend() != "cpu":
        return False
    if not _cpu_has_avx512():
        return False
    try:
        library = _library()
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu")
    except (OSError, subprocess.CalledProcessError, AttributeError) as e:
        log.warning("the CPU kernels are not available (%s); using XLA's own operations", e)
        return False
    return True


@functools.lru_cache(maxsize=1)
def amx_available() -> bool:
    """Whether `batched_matmul` runs on AMX tiles here (the kernels are available, the CPU has AMX with bf16
    products, and the OS lets this process use them)."""
    return available() and bool(_library().PerceiverArAmxAvailable())


@functools.lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    return ctypes.CDLL(str(_build()))


def _build() -> Path:
    """The compiled library, cached by source, JAX version and compiler flags."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler (c++ or g++) on PATH")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w",
             f"-I{jax.ffi.include_dir()}"]
    source = b"".join(path.read_bytes() for path in SOURCES + HEADERS)
    key = hashlib.sha256(source + jax.__version__.encode() + " ".join(flags).encode()).hexdigest()[:16]
    directory = Path(os.environ.get("PERCEIVER_AR_KERNEL_DIR")
                     or Path.home() / ".cache" / "perceiver_ar_jax" / "kernels")
    library = directory / f"cpu_kernels-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:  # compiled aside, then renamed: never half a file
        out = Path(tmp) / library.name
        subprocess.run([compiler, *flags, *map(str, SOURCES), "-o", str(out)], check=True, capture_output=True)
        os.replace(out, library)
    return library


def pack(w: jnp.ndarray) -> jnp.ndarray:
    """(K, N) weights -> (ceil(N / 64), K, 64) panels, the last one zero-padded. Any dtype."""
    k, n = w.shape
    panels = -(-n // PANEL)
    w = jnp.pad(w, ((0, 0), (0, panels * PANEL - n)))
    return jnp.transpose(w.reshape(k, panels, PANEL), (1, 0, 2))


def unpack(panels: jnp.ndarray, n: int) -> jnp.ndarray:
    """The inverse of `pack`: (ceil(N / 64), K, 64) -> (K, N)."""
    count, k, _ = panels.shape
    return jnp.transpose(panels, (1, 0, 2)).reshape(k, count * PANEL)[:, :n]


def packed_matmul(x: jnp.ndarray, panels: jnp.ndarray, n: int, scale: jnp.ndarray | None = None) -> jnp.ndarray:
    """x (M, K) float32 @ the (K, N) matrix packed in `panels` (float32, bfloat16 or int8), times scale (N,) per
    column if given -> (M, N) float32. Needs `available()`."""
    scale = jnp.zeros((0,), jnp.float32) if scale is None else scale.astype(jnp.float32)
    call = jax.ffi.ffi_call("perceiver_ar_packed_matmul", jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x.astype(jnp.float32), panels, scale)


def transpose(x: jnp.ndarray) -> jnp.ndarray:
    """x (..., R, C) -> (..., C, R), the last two axes swapped, materialised row-major (2- or 4-byte dtypes);
    x.T of a matrix. Needs `available()`."""
    shape = (*x.shape[:-2], x.shape[-1], x.shape[-2])
    return jax.ffi.ffi_call("perceiver_ar_transpose", jax.ShapeDtypeStruct(shape, x.dtype),
                            vmap_method="expand_dims")(x)


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, weights: jnp.ndarray, z_loss_weight: float,
                  grad_dtype) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """logits (R, V) float32, labels (R,) int, weights (R,) -> log Z (R,), the label's logit (R,) (both float32) and
    the gradient of sum(weights * (log Z - label logit + z_loss_weight * log Z^2)) with respect to the logits,
    (R, V) in grad_dtype (bfloat16 or float32). Needs `available()`."""
    rows, vocab = logits.shape
    per_row = jax.ShapeDtypeStruct((rows,), jnp.float32)
    grad = jax.ShapeDtypeStruct((rows, vocab), grad_dtype)
    call = jax.ffi.ffi_call("perceiver_ar_cross_entropy", (grad, per_row, per_row), vmap_method="sequential")
    grad, log_z, label_logit = call(logits.astype(jnp.float32), labels.astype(jnp.int32),
                                    weights.astype(jnp.float32), z_loss_weight=np.float32(z_loss_weight))
    return log_z, label_logit, grad


def gelu(x: jnp.ndarray) -> jnp.ndarray:
    """The exact GELU of float32 or bf16 x, evaluated in float32 (and rounded to bf16). Needs `available()`."""
    return jax.ffi.ffi_call("perceiver_ar_gelu", jax.ShapeDtypeStruct(x.shape, x.dtype),
                            vmap_method="broadcast_all")(x)


def gelu_grad(x: jnp.ndarray, g: jnp.ndarray) -> jnp.ndarray:
    """g * GELU'(x) for float32 or bf16 x and g (one dtype), evaluated in float32 (and rounded to bf16). Needs
    `available()`."""
    return jax.ffi.ffi_call("perceiver_ar_gelu_grad", jax.ShapeDtypeStruct(x.shape, x.dtype),
                            vmap_method="broadcast_all")(x, g)


def copy(x: jnp.ndarray) -> jnp.ndarray:
    """x, computed into a buffer of its own that XLA cannot fuse into x's consumers. Needs `available()`."""
    return jax.ffi.ffi_call("perceiver_ar_copy", jax.ShapeDtypeStruct(x.shape, x.dtype),
                            vmap_method="broadcast_all")(x)


def batched_matmul(subscripts: str, a: jnp.ndarray, b: jnp.ndarray, out_dtype, emulate: bool = False) -> jnp.ndarray:
    """einsum(subscripts, a, b) of two 4-D operands with float32 accumulation, in out_dtype (float32, or bfloat16
    rounded once for bf16 operands): two batch axes (in every operand and the result), one free axis each and one
    contracted axis, in any order; the result's last axis must be a free one. bf16: M, N and K multiples of 32;
    float32: any sizes (`batched_matmul_supports` asks multiples of 32 of both: what the model sends here).
    Needs `available()`, and for bf16 operands `amx_available()` or emulate=True (the same packing with scalar
    products in place of the tiles, on any CPU: for tests)."""
    inputs, out = subscripts.split("->")
    a_axes, b_axes = inputs.split(",")
    if out[-1] in a_axes:  # C's rows contiguous: C^T = B^T A^T
        a, b, a_axes, b_axes = b, a, b_axes, a_axes
    size = {**dict(zip(a_axes, a.shape, strict=True)), **dict(zip(b_axes, b.shape, strict=True))}
    batch = [axis for axis in out if axis in a_axes and axis in b_axes]
    m, = (axis for axis in a_axes if axis not in b_axes)
    n = out[-1]
    k, = (axis for axis in a_axes if axis in b_axes and axis not in out)
    call = jax.ffi.ffi_call("perceiver_ar_batched_matmul",
                            jax.ShapeDtypeStruct(tuple(size[axis] for axis in out), out_dtype),
                            vmap_method="sequential")
    return call(a, b,
                dims=np.array([size[batch[0]], size[batch[1]], size[m], size[n], size[k]], np.int64),
                a_strides=_element_strides(a_axes, size, (*batch, m, k)),
                b_strides=_element_strides(b_axes, size, (*batch, k, n)),
                c_strides=_element_strides(out, size, (*batch, m, n)), emulate=bool(emulate))


def layer_norm(x: jnp.ndarray, scale: jnp.ndarray, bias: jnp.ndarray, eps: float,
               out_dtype) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """LayerNorm over x's last axis (`layer_norm.cc`): x (..., C) float32 or bf16, scale and bias (C,) ->
    y (..., C) in out_dtype (float32 or bf16), and the rows' mean and 1 / sqrt(var + eps), (...) float32.
    Needs `available()`."""
    rows = x.shape[:-1]
    call = jax.ffi.ffi_call("perceiver_ar_layer_norm", (jax.ShapeDtypeStruct(x.shape, out_dtype),
                                                        jax.ShapeDtypeStruct(rows, jnp.float32),
                                                        jax.ShapeDtypeStruct(rows, jnp.float32)),
                            vmap_method="sequential")
    return call(x, scale.astype(jnp.float32), bias.astype(jnp.float32), eps=np.float32(eps))


def layer_norm_grad(x: jnp.ndarray, scale: jnp.ndarray, mean: jnp.ndarray, rstd: jnp.ndarray,
                    dy: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """`layer_norm`'s derivative: x (..., C), scale (C,), the forward's mean and rstd (...), dy (..., C) float32 or
    bf16 -> dx (x's dtype), d scale and d bias (C,) float32. Needs `available()`."""
    c = x.shape[-1]
    call = jax.ffi.ffi_call("perceiver_ar_layer_norm_grad", (jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                             jax.ShapeDtypeStruct((c,), jnp.float32),
                                                             jax.ShapeDtypeStruct((c,), jnp.float32)),
                            vmap_method="sequential")
    return call(x, scale.astype(jnp.float32), mean, rstd, dy)


def masked_softmax(scores: jnp.ndarray, mask: jnp.ndarray | None) -> jnp.ndarray:
    """softmax(where(mask, scores, -FLT_MAX)) over the last axis (`softmax.cc`): scores (batch, heads, queries,
    keys) float32; mask bool broadcastable to them (True = may attend) or None. Needs `available()`."""
    mask, strides = _broadcast_mask(mask, scores.shape)
    call = jax.ffi.ffi_call("perceiver_ar_masked_softmax", jax.ShapeDtypeStruct(scores.shape, jnp.float32),
                            vmap_method="sequential")
    return call(scores, mask, dims=np.array(scores.shape, np.int64), mask_strides=strides)


def masked_softmax_grad(probs: jnp.ndarray, d_probs: jnp.ndarray, mask: jnp.ndarray | None,
                        out_dtype) -> jnp.ndarray:
    """`masked_softmax`'s derivative: where(mask, probs (d_probs - sum(d_probs probs)), 0) over the last axis, in
    out_dtype (float32 or bfloat16). probs, d_probs (batch, heads, queries, keys) float32. Needs `available()`."""
    mask, strides = _broadcast_mask(mask, probs.shape)
    call = jax.ffi.ffi_call("perceiver_ar_masked_softmax_grad", jax.ShapeDtypeStruct(probs.shape, out_dtype),
                            vmap_method="sequential")
    return call(probs, d_probs, mask, dims=np.array(probs.shape, np.int64), mask_strides=strides)


def _broadcast_mask(mask: jnp.ndarray | None, shape: tuple[int, ...]) -> tuple[jnp.ndarray, np.ndarray]:
    """A bool mask broadcastable to the 4-D `shape`, as the kernels read it: 4-D with its last axis whole, and the
    element strides of its first three axes (0 along those it is broadcast over)."""
    if mask is None:
        mask = jnp.ones((1, 1, 1, shape[3]), bool)
    mask = jnp.asarray(mask, bool).reshape((1,) * (4 - mask.ndim) + mask.shape)
    if mask.shape[3] != shape[3]:
        mask = jnp.broadcast_to(mask, (*mask.shape[:3], shape[3]))
    contiguous = np.cumprod((1, *mask.shape[:0:-1]))[::-1]  # row-major element strides
    return mask, np.array([0 if mask.shape[i] == 1 else contiguous[i] for i in range(3)], np.int64)


def adamw(param: jnp.ndarray, grad: jnp.ndarray, mu: jnp.ndarray, nu: jnp.ndarray, scalars: jnp.ndarray, *,
          b1: float, b2: float, eps: float, weight_decay: float) -> tuple[jnp.ndarray, ...]:
    """AdamW's update of one float32 tensor in one pass (`adamw.cc`): (param, mu, nu) -> their new values, written
    in place of the inputs where XLA can (they are aliased), and float32 [sum of grad^2 (before clipping), sum of
    new param^2]. scalars: float32 [clip (0 or 1), global gradient norm, max norm, 1 - b1^t, 1 - b2^t, -learning
    rate]. Needs `available()`."""
    like = jax.ShapeDtypeStruct(param.shape, jnp.float32)
    call = jax.ffi.ffi_call("perceiver_ar_adamw", (like, like, like, jax.ShapeDtypeStruct((2,), jnp.float32)),
                            input_output_aliases={0: 0, 2: 1, 3: 2}, vmap_method="sequential")
    # the constants as optax has them: Python floats, rounded to float32 where they meet a float32 array
    return call(param, grad, mu, nu, scalars.astype(jnp.float32), b1=np.float32(b1), one_minus_b1=np.float32(1 - b1),
                b2=np.float32(b2), one_minus_b2=np.float32(1 - b2), eps=np.float32(eps),
                weight_decay=np.float32(weight_decay))


def batched_matmul_supports(subscripts: str, a: jnp.ndarray, b: jnp.ndarray) -> bool:
    """Whether `batched_matmul` takes this product (its form, shapes and dtypes; not whether the CPU has AMX)."""
    inputs, out = subscripts.split("->")
    a_axes, b_axes = inputs.split(",")
    if not (a.ndim == len(a_axes) == b.ndim == len(b_axes) == len(out) == 4) or a.dtype != b.dtype or \
            a.dtype not in (jnp.bfloat16, jnp.float32):
        return False
    size_a, size_b = dict(zip(a_axes, a.shape, strict=True)), dict(zip(b_axes, b.shape, strict=True))
    batch = [axis for axis in out if axis in a_axes and axis in b_axes]
    contracted = [axis for axis in a_axes if axis in b_axes and axis not in out]
    free = [axis for axis in a_axes if axis not in b_axes] + [axis for axis in b_axes if axis not in a_axes]
    # float32 products of any size run on the kernel too; the model sends it only these, as for bf16 (products of
    # a decoding step's single query, say, were not measured on it)
    return (len(batch) == 2 and len(contracted) == 1 and len(free) == 2 and set(out) == {*batch, *free}
            and out[-1] in free and all(size_a[axis] == size_b[axis] for axis in batch + contracted)
            and all({**size_a, **size_b}[axis] % 32 == 0 for axis in contracted + free))


def _element_strides(axes: str, size: dict[str, int], order) -> np.ndarray:
    """The row-major element strides of an array with these axes, in `order`."""
    strides, stride = {}, 1
    for axis in reversed(axes):
        strides[axis] = stride
        stride *= size[axis]
    return np.array([strides[axis] for axis in order], np.int64)
