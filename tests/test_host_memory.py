"""`backend.reuse_host_memory`: glibc keeps freed buffers for the next step; set before JAX's first computation."""

import subprocess
import sys

import jax.numpy as jnp
import pytest

from perceiver_ar_jax import backend

FRESH_PROCESS = """
import jax.numpy as jnp
from perceiver_ar_jax import backend
print(backend.reuse_host_memory(), float(jnp.ones(3).sum()))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_it_takes_effect_before_the_first_computation():
    # its effect (no page faults re-running a step: 270k per bench train step before) is measured by
    # bench/train_step.py --no-reuse-host-memory; here only that a fresh process can set it and still compute
    out = subprocess.run([sys.executable, "-c", FRESH_PROCESS], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "3.0"]


def test_after_the_first_computation_it_changes_nothing():
    jnp.zeros(1).block_until_ready()
    assert backend.reuse_host_memory() is False
