"""`backend.reuse_host_memory`: glibc keeps freed buffers for the next step; set before JAX's first computation."""

import subprocess
import sys

import jax.numpy as jnp
import pytest

from perceiver_ar_jax import backend

FRESH_PROCESS = """
import resource, sys
import jax, jax.numpy as jnp
from perceiver_ar_jax import backend
took = backend.reuse_host_memory() if sys.argv[1] == 'reuse' else None
step = jax.jit(lambda x: x * 2.0)  # a 64 MB result per call, freed when the next call starts
x = jnp.ones((4096, 4096))
step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step(x).block_until_ready()
print(took, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 5)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_before_the_first_computation_later_calls_reuse_the_memory():
    def page_faults_per_call(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FRESH_PROCESS, mode], capture_output=True, text=True, check=True)
        took, faults = out.stdout.split()
        assert took == ("True" if mode == "reuse" else "None")
        return int(faults)

    assert page_faults_per_call("default") > 10_000  # a fresh 64 MB mapping per call: 16k pages faulted in
    assert page_faults_per_call("reuse") < 1_000


def test_after_the_first_computation_it_changes_nothing():
    jnp.zeros(1).block_until_ready()
    assert backend.reuse_host_memory() is False
