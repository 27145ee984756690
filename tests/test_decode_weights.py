"""Decode-time weight formats: the packed CPU kernel computes x @ w for float32, bfloat16 and int8 weights; prepared
parameters give the model's logits (exactly for float32, closely for bfloat16 and int8), through the kernel and
through XLA's products alike; decoding with them follows a full forward with the same weights at every step."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax import backend
from perceiver_ar_jax.backend import cpu_kernels
from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_ar_jax.model.weights import prepare_weights
from perceiver_ar_jax.sampling import generate
from tests.conftest import REPO
from tests.test_sampling import SMALL, noisy_params, padded_prompts
from tests.test_windowed_decoding import full_forward_logits, windowed_schedule

needs_kernel = pytest.mark.skipif(not cpu_kernels.available(), reason="the packed CPU kernel does not run here")


@needs_kernel
@pytest.mark.parametrize("rows, inner, cols", [(1, 64, 61), (7, 33, 130), (13, 128, 256), (6, 5, 64)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_packed_kernel_equals_a_plain_product(rows, inner, cols, dtype):
    rng = np.random.default_rng(rows * cols)
    x = rng.normal(size=(rows, inner)).astype(np.float32)
    w = rng.normal(size=(inner, cols)).astype(np.float32)
    scale = None
    if dtype == "int8":
        w, scale = np.clip(np.round(w * 40), -127, 127).astype(np.int8), rng.random(cols).astype(np.float32)
    w = jnp.asarray(w, dtype)
    got = cpu_kernels.packed_matmul(jnp.asarray(x), cpu_kernels.pack(w), cols, None if scale is None else
                                    jnp.asarray(scale))
    expected = x @ np.asarray(w.astype(jnp.float32))
    if scale is not None:
        expected = expected * scale
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-4)


def test_pack_and_unpack_are_inverse():
    w = jnp.arange(5 * 70, dtype=jnp.float32).reshape(5, 70)
    panels = cpu_kernels.pack(w)
    assert panels.shape == (2, 5, 64)
    np.testing.assert_array_equal(cpu_kernels.unpack(panels, 70), w)


def test_int8_weights_keep_every_column_within_half_a_step_of_its_scale():
    w = jax.random.normal(jax.random.key(0), (48, 20)) * jnp.linspace(0.01, 3.0, 20)
    prepared = backend.prepare_weight(w, "int8")
    q = cpu_kernels.unpack(prepared["packed_kernel"], 20) if "packed_kernel" in prepared else \
        prepared["prepared_kernel"]
    assert q.dtype == jnp.int8 and int(jnp.max(jnp.abs(q))) == 127
    error = np.abs(np.asarray(q * prepared["kernel_scale"] - w))
    assert np.all(error <= np.asarray(prepared["kernel_scale"])[None] / 2 + 1e-7)


def model_and_ids(abs_pos_emb=True):
    config = CausalLanguageModelConfig(**SMALL, abs_pos_emb=abs_pos_emb)
    model = CausalLanguageModel(config)
    params = noisy_params(config, seed=7)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 12))
    return model, params, ids


@pytest.mark.parametrize("weights, tolerance", [("float32", 1e-5), ("bfloat16", 0.05), ("int8", 0.08)])
def test_prepared_parameters_give_the_models_logits(weights, tolerance):
    model, params, ids = model_and_ids()
    expected = model.apply({"params": params}, ids, prefix_len=8)
    got = model.apply({"params": prepare_weights(params, weights)}, ids, prefix_len=8)
    error = jnp.abs(got - expected)
    assert float(jnp.max(error)) < tolerance * float(jnp.max(jnp.abs(expected))), float(jnp.max(error))
    if weights == "float32":
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_preparing_twice_changes_nothing():
    _, params, _ = model_and_ids()
    once = prepare_weights(params, "int8")
    assert prepare_weights(once, "int8") == once


@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_windowed_decoding_with_prepared_weights_follows_a_full_forward_with_them(weights):
    model, params, _ = model_and_ids(abs_pos_emb=False)
    config = model.config
    ids, attention_mask = padded_prompts(config, pads=(0, 3, 9))
    prepared = prepare_weights(params, weights)
    new_tokens = 12
    sequences, logits = generate(model, prepared, ids, attention_mask, num_latents=2, max_new_tokens=new_tokens,
                                 cache="windowed", weights=weights, return_logits=True)
    pad = np.concatenate([attention_mask == 0, np.zeros((len(ids), new_tokens), bool)], axis=1)
    schedule = windowed_schedule(config, ids.shape[1], 2, new_tokens, 2)
    expected = full_forward_logits(model, prepared, np.asarray(sequences), pad, schedule, ids.shape[1])
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)


XLA_PATH = """
import json, sys
import numpy as np
from perceiver_ar_jax.model.weights import prepare_weights
from tests.test_decode_weights import model_and_ids
model, params, ids = model_and_ids()
print(json.dumps(np.asarray(model.apply({"params": prepare_weights(params, sys.argv[1])}, ids, prefix_len=8)).tolist()))
"""


@needs_kernel
@pytest.mark.parametrize("weights", ["bfloat16", "int8"])
def test_xla_products_give_what_the_kernel_gives(weights):
    """Where the kernel does not run (PERCEIVER_AR_CPU_KERNELS=0 here) the same prepared weights go through XLA."""
    model, params, ids = model_and_ids()
    kernel = np.asarray(model.apply({"params": prepare_weights(params, weights)}, ids, prefix_len=8))
    env = {**os.environ, "PERCEIVER_AR_CPU_KERNELS": "0"}
    proc = subprocess.run([sys.executable, "-c", XLA_PATH, weights], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    np.testing.assert_allclose(np.asarray(json.loads(proc.stdout)), kernel, atol=2e-4, rtol=0)


def test_weight_format_out_of_range_is_refused():
    model, params, ids = model_and_ids()
    with pytest.raises(ValueError, match=r"weights='int4' out of valid range: must be one of"):
        generate(model, params, ids, weights="int4")
