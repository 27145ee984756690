"""`matmul_precision` reaches every matrix product of a training step, forward and backward.

TPUs multiply float32 operands in one bfloat16 pass at DEFAULT precision and recent GPUs in TF32, so float32
parity with perceiver-io (1e-4) needs HIGHEST there; on CPU every precision computes full float32, which is why
this is checked on the traced program: every `dot_general` of the step (weights, attention, logits, the custom
backward passes) carries the precision the config asks for.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from perceiver_ar_jax.errors import ConfigError
from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
from tests.test_sharded_kernels import sub_jaxprs

CONFIG = dict(vocab_size=61, max_seq_len=48, max_latents=8, num_channels=32, num_heads=2, num_self_attention_layers=2,
              cross_attention_dropout=0.0, attention_block_size=16)


def dot_precisions(jaxpr) -> list:
    """The precision of every dot_general in jaxpr and its sub-jaxprs (not inside Pallas kernels)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        if eqn.primitive.name != "pallas_call":
            for sub in sub_jaxprs(eqn):
                found += dot_precisions(sub)
    return found


def train_step_precisions(**changes) -> list:
    config = CausalLanguageModelConfig(**CONFIG).replace(**changes)
    model = CausalLanguageModel(config)
    ids = jnp.ones((2, 40), jnp.int32)
    pad = jnp.zeros((2, 40), bool).at[1, :5].set(True)
    params = model.init(jax.random.key(0), ids, prefix_len=32)["params"]

    def loss(params):
        return jnp.sum(model.apply({"params": params}, ids, prefix_len=32, pad_mask=pad) ** 2)

    return dot_precisions(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)


@pytest.mark.parametrize("attention_impl", ["xla", "blockwise", "cudnn"])
def test_float32_products_run_at_highest_precision_by_default(attention_impl):
    precisions = train_step_precisions(attention_impl=attention_impl)
    assert len(precisions) > 20  # projections, MLPs, attention and logits, forward and backward
    assert set(precisions) == {(lax.Precision.HIGHEST, lax.Precision.HIGHEST)}


def test_an_explicit_precision_reaches_every_product():
    precisions = train_step_precisions(matmul_precision="high", attention_impl="blockwise")
    assert set(precisions) == {(lax.Precision.HIGH, lax.Precision.HIGH)}


def test_bfloat16_compute_keeps_the_default_precision():
    config = CausalLanguageModelConfig(**CONFIG, dtype="bfloat16")
    assert config.precision == "default"
    precisions = train_step_precisions(dtype="bfloat16", attention_impl="blockwise")
    assert set(precisions) <= {None, (lax.Precision.DEFAULT, lax.Precision.DEFAULT)}


def test_auto_resolves_by_compute_dtype_and_bad_values_name_the_field():
    assert CausalLanguageModelConfig().matmul_precision == "auto"
    assert CausalLanguageModelConfig().precision == "highest"
    assert CausalLanguageModelConfig(dtype="float16").precision == "default"
    assert CausalLanguageModelConfig(dtype="bfloat16", matmul_precision="highest").precision == "highest"
    with pytest.raises(ConfigError, match=r"config.matmul_precision='float32' is out of range: must be one of"):
        CausalLanguageModelConfig(matmul_precision="float32")


def test_precision_does_not_change_float32_results_on_cpu():
    config = CausalLanguageModelConfig(**CONFIG)
    ids = jnp.arange(40, dtype=jnp.int32)[None] % 61
    params = CausalLanguageModel(config).init(jax.random.key(0), ids, prefix_len=32)["params"]
    highest = CausalLanguageModel(config).apply({"params": params}, ids, prefix_len=32)
    default = CausalLanguageModel(config.replace(matmul_precision="default")).apply({"params": params}, ids,
                                                                                     prefix_len=32)
    np.testing.assert_array_equal(highest, default)  # XLA:CPU computes float32 products in float32 at any setting
