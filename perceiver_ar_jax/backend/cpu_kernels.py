"""A CPU matrix product over packed weights, as an XLA FFI custom call built from `packed_matmul.cc` on first use.

Why: decoding multiplies a few rows by every weight of the model once per token, so a step reads all the weights
and its speed is the memory bandwidth. XLA:CPU's products read float32 weights at about 80% of the bandwidth, turn
bfloat16 and int8 weights into float32 copies first (no faster than float32), and run products of 2-32 rows no
faster than separate ones. The kernel reads weights stored in panels of 64 columns (`pack`: each panel one
contiguous K x 64 block) in float32, bfloat16 or int8 (with a float32 scale per output column), converts them in
registers and accumulates in float32, with one worker thread per core; a step then reads each byte once, close
to the bandwidth, and half (bfloat16) or a quarter (int8) of the bytes.

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

PANEL = 64  # output columns per panel (the kernel's register tile)
SOURCE = Path(__file__).with_name("packed_matmul.cc")
TARGET = "perceiver_ar_packed_matmul"

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
    """Whether the kernel runs here (built and registered on the first call)."""
    if os.environ.get("PERCEIVER_AR_CPU_KERNELS", "1") == "0" or jax.default_backend() != "cpu":
        return False
    if not _cpu_has_avx512():
        return False
    try:
        library = _build()
        jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(ctypes.CDLL(str(library)).PerceiverArPackedMatmul),
                                    platform="cpu")
    except (OSError, subprocess.CalledProcessError, AttributeError) as e:
        log.warning("the packed CPU matmul kernel is not available (%s); using XLA's products", e)
        return False
    return True


def _build() -> Path:
    """The compiled library, cached by source, JAX version and compiler flags."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise OSError("no C++ compiler (c++ or g++) on PATH")
    flags = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w",
             f"-I{jax.ffi.include_dir()}"]
    key = hashlib.sha256(SOURCE.read_bytes() + jax.__version__.encode() + " ".join(flags).encode()).hexdigest()[:16]
    directory = Path(os.environ.get("PERCEIVER_AR_KERNEL_DIR")
                     or Path.home() / ".cache" / "perceiver_ar_jax" / "kernels")
    library = directory / f"packed_matmul-{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:  # compiled aside, then renamed: never half a file
        out = Path(tmp) / library.name
        subprocess.run([compiler, *flags, str(SOURCE), "-o", str(out)], check=True, capture_output=True)
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
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x.astype(jnp.float32), panels, scale)
