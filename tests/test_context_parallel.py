"""Context parallelism: the hybrid layer with its prefix split over a mesh axis equals the unsharded model.

The axis is the one the logical axis `context` maps to in the active logical-axis rules (`model/sharding.py`).

The multi-device checks run this file as a script in a subprocess with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax starts), which prints its measured
differences as JSON; the tests assert on them.
"""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax.model.attention import dense_attention
from perceiver_ar_jax.model.attention.context_parallel import context_axis_size, context_parallel_prefix_attention
from perceiver_ar_jax.model.attention.prefix import combine_with_latents, make_projection
from perceiver_ar_jax.model.masks import cross_attention_mask
from perceiver_ar_jax.model.positions import apply_rotary, rotary_angles
from perceiver_ar_jax.model.sharding import DEFAULT_LOGICAL_AXIS_RULES, context_axes
from tests.conftest import PUBLIC_FIXTURE, REPO, require

TOLERANCE = 1e-5


def attention_inputs(num_latents, prefix_len, num_pads, seed=0):
    """Latent queries, the normalised prefix and latents, k/v kernels, rotary angles, a cotangent, and the
    hybrid mask with row 1 left-padded by num_pads tokens."""
    batch, heads, head_dim, channels, num_keys = 2, 3, 4, 12, prefix_len + num_latents
    keys = jax.random.split(jax.random.key(seed), 6)
    q = jax.random.normal(keys[0], (batch, num_latents, heads, head_dim))
    x = jax.random.normal(keys[1], (batch, num_keys, channels))  # [prefix, latents]
    k_kernel, v_kernel = (jax.random.normal(key, (channels, heads, head_dim)) / 4 for key in keys[2:4])
    angles = rotary_angles(jnp.broadcast_to(jnp.arange(num_keys), (batch, num_keys)), head_dim)
    pad = jnp.zeros((batch, num_keys), bool).at[1, :num_pads].set(True)
    cotangent = jax.random.normal(keys[4], q.shape)
    return (q, x, k_kernel, v_kernel), angles, cotangent, cross_attention_mask(num_latents, num_keys, pad)


def attention_differences(mesh, num_latents, prefix_len, num_pads, use_mask=True):
    """max |difference| of the output and of dq, dx, dW_k, dW_v between context-parallel and dense attention."""
    args, angles, cotangent, mask = attention_inputs(num_latents, prefix_len, num_pads)
    mask = mask if use_mask else None
    split = lambda m: (None, None) if m is None else (m[..., :prefix_len], m[..., prefix_len:])  # noqa: E731

    def keys_values(x, k_kernel, v_kernel, angles):
        k = apply_rotary(jnp.einsum("bkc,chd->bkhd", x, k_kernel), angles)
        return k, jnp.einsum("bkc,chd->bkhd", x, v_kernel)

    def sharded(q, x, k_kernel, v_kernel):
        mask_prefix, mask_latent = split(mask)
        params = {"k_kernel": k_kernel, "v_kernel": v_kernel}
        prefix = context_parallel_prefix_attention(q, x[:, :prefix_len], make_projection(None, jnp.float32), params,
                                                   angles[:, :prefix_len], mask_prefix, ("context",), block_size=4)
        k_latent, v_latent = keys_values(x[:, prefix_len:], k_kernel, v_kernel, angles[:, prefix_len:])
        return combine_with_latents(prefix, q, k_latent, v_latent, mask_latent, prefix_len, block_size=4)

    def dense(q, x, k_kernel, v_kernel):
        return dense_attention(q, *keys_values(x, k_kernel, v_kernel, angles), mask)

    def value_and_grads(attention):
        loss = lambda *args: jnp.sum(attention(*args) * cotangent)  # noqa: E731
        return jax.jit(lambda *args: (attention(*args), jax.grad(loss, argnums=(0, 1, 2, 3))(*args)))(*args)

    with jax.set_mesh(mesh):
        out, grads = value_and_grads(sharded)
    expected_out, expected_grads = value_and_grads(dense)
    return [float(jnp.max(jnp.abs(a - b))) for a, b in zip((out, *grads), (expected_out, *expected_grads),
                                                           strict=True)]


def model_differences(mesh_shape, tokens_key, seq_len, prefix_len, use_pad, mesh_axes=("data", "context"),
                      context_axis="context", shard_params=False):
    """|loss difference| and max |gradient difference| of the fixture model, context-parallel vs not.

    shard_params: lay the parameters out by the training rules (partitioning.DEFAULT_LOGICAL_AXIS_RULES).
    """
    from perceiver_ar_jax.convert import load_torch_checkpoint
    from perceiver_ar_jax.model import CausalLanguageModel

    config, params = load_torch_checkpoint(PUBLIC_FIXTURE / "hf-safetensors")
    golden = np.load(PUBLIC_FIXTURE / "forward_cases.npz")
    tokens = golden[tokens_key][:, :seq_len]
    pad_mask = golden["pad_mask"][:, :seq_len] if use_pad else None
    labels = np.roll(tokens, -1, axis=1)[:, prefix_len:]

    def loss_and_grads(config, params):
        model = CausalLanguageModel(config)

        def loss(params):
            logits = model.apply({"params": params}, tokens, prefix_len=prefix_len, pad_mask=pad_mask)
            label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - label_logits)

        return jax.jit(jax.value_and_grad(loss))(params)

    mesh = jax.make_mesh(mesh_shape, mesh_axes, axis_types=(jax.sharding.AxisType.Auto,) * len(mesh_axes))
    # the training rules, in so far as this mesh has their axes (Flax checks every rule's axes against the mesh)
    fits = lambda axes: all(a in mesh_axes for a in ((axes,) if isinstance(axes, str) else axes or ()))  # noqa: E731
    rules = (("context", context_axis), *((n, a) for n, a in DEFAULT_LOGICAL_AXIS_RULES if fits(a)))
    with jax.set_mesh(mesh):
        sharded_params = params
        if shard_params:
            boxed = jax.eval_shape(lambda: CausalLanguageModel(config).init(
                jax.random.key(0), tokens[:, :32], prefix_len=16)["params"])
            shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, DEFAULT_LOGICAL_AXIS_RULES)
            sharded_params = jax.device_put(params, shardings)
        with nn.logical_axis_rules(rules):  # the prefix is split over the mesh axis of `context`
            loss, grads = loss_and_grads(config, sharded_params)
    expected_loss, expected_grads = loss_and_grads(config, params)
    grad_diff = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
        jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(expected_grads), strict=True))
    return {"loss": float(loss), "expected_loss": float(expected_loss),
            "loss_diff": abs(float(loss) - float(expected_loss)), "grad_diff": grad_diff}


def main():
    """The 8-device measurements (run in a subprocess by the tests below); prints one JSON line."""
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    mesh = jax.make_mesh((2, 4), ("data", "context"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    results = {
        "attention_padding_uneven_prefix": attention_differences(mesh, 8, 45, 5),
        "attention_all_masked_rows": attention_differences(mesh, 8, 44, 47),
        "attention_no_mask": attention_differences(mesh, 8, 45, 0, use_mask=False),
        "model_padded_2x4": model_differences((2, 4), "pad_tokens", 64, 48, True),
        "model_uneven_prefix_1x8": model_differences((1, 8), "tokens", 61, 45, False),
        # the training mesh (data, fsdp, tensor) with the prefix split over `tensor`, parameters laid out by the
        # training rules (embed over fsdp, heads / mlp / vocab over tensor)
        "model_training_mesh_tensor_axis": model_differences(
            (1, 2, 4), "pad_tokens", 64, 48, True, ("data", "fsdp", "tensor"), "tensor", shard_params=True),
    }
    print("@@RESULT@@" + json.dumps(results))


@pytest.fixture(scope="module")
def eight_device_results():
    require(PUBLIC_FIXTURE / "hf-safetensors")
    # PYTHONPATH: the script imports `tests.conftest`, and a script's sys.path starts at tests/, not the repository.
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": python_path}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[0][len("@@RESULT@@"):])


@pytest.mark.parametrize("case", ["attention_padding_uneven_prefix", "attention_all_masked_rows", "attention_no_mask"])
def test_context_parallel_attention_on_8_devices_equals_dense(eight_device_results, case):
    differences = eight_device_results[case]
    assert max(differences) < TOLERANCE, dict(zip(["out", "dq", "dx", "dW_k", "dW_v"], differences, strict=True))


@pytest.mark.parametrize("case", ["model_padded_2x4", "model_uneven_prefix_1x8", "model_training_mesh_tensor_axis"])
def test_context_parallel_model_loss_and_gradients_on_8_devices_equal_unsharded(eight_device_results, case):
    result = eight_device_results[case]
    assert np.isfinite(result["loss"])
    assert result["loss_diff"] < TOLERANCE, result
    assert result["grad_diff"] < 1e-4, result


def test_context_parallel_on_a_one_device_axis_equals_dense():
    mesh = jax.make_mesh((1,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
    assert max(attention_differences(mesh, 8, 13, 15)) < TOLERANCE


@pytest.mark.parametrize("prefix_len", [0, 16])
def test_model_with_a_one_device_context_axis_equals_the_golden_logits(prefix_len):
    from perceiver_ar_jax.convert import load_torch_checkpoint
    from perceiver_ar_jax.model import CausalLanguageModel

    config, params = load_torch_checkpoint(require(PUBLIC_FIXTURE / "hf-safetensors"))
    golden = np.load(PUBLIC_FIXTURE / "forward_cases.npz")
    model = CausalLanguageModel(config)
    mesh = jax.make_mesh((1,), ("context",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh), nn.logical_axis_rules([("context", "context")]):
        assert context_axes() == ("context",)
        logits = jax.jit(model.apply, static_argnames="prefix_len")({"params": params}, golden["tokens"],
                                                                    prefix_len=prefix_len)
    np.testing.assert_allclose(logits, golden[f"logits_p{prefix_len}"], rtol=0, atol=1e-4)


def test_missing_mesh_axis_is_an_error_naming_it():
    with pytest.raises(ValueError, match="context axis 'context' is not an axis of the current mesh"):
        context_axis_size(("context",))
    mesh = jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match=r"axes: \('data',\)"):
        context_axis_size(("context",))


def test_the_context_axes_come_from_the_rules_and_the_mesh():
    mesh = jax.make_mesh((1, 1), ("data", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    assert context_axes() == ()  # no mesh: nothing is split
    with jax.set_mesh(mesh):
        assert context_axes() == ()  # the default rules map `context` to no mesh axis
        with nn.logical_axis_rules([("context", "tensor"), ("heads", "tensor")]):
            assert context_axes() == ("tensor",)
        with nn.logical_axis_rules([("context", ("data", "tensor"))]):
            assert context_axes() == ("data", "tensor")


if __name__ == "__main__":
    main()


def test_a_config_with_the_old_context_parallel_axis_field_still_loads():
    """Earlier versions named the mesh axis in the model config; it is now the logical axis `context`."""
    import warnings

    from perceiver_ar_jax.checkpoints.model_directory import config_from_json
    from perceiver_ar_jax.model import CausalLanguageModelConfig
    from perceiver_ar_jax.training import check_config, partitioning
    from tests.synthetic_data import tiny_train_config

    with pytest.warns(FutureWarning, match=r"the rule \('context', 'tensor'\)"):
        config = CausalLanguageModelConfig.from_dict({"num_heads": 4, "context_parallel_axis": "tensor"}, strict=True)
    assert config.num_heads == 4 and "context_parallel_axis" not in config.to_dict()
    old_json = json.dumps({"model_type": "perceiver-ar-jax",
                           "model_config": {**CausalLanguageModelConfig().to_dict(), "context_parallel_axis": None}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # None (the old default) loads silently
        assert config_from_json(old_json) == CausalLanguageModelConfig()

    train_config = tiny_train_config()
    assert partitioning.logical_axis_rules(train_config)[-1] == ("context", None)
    train_config.model.context_parallel_axis = "tensor"  # an old training config file
    with pytest.warns(FutureWarning):
        check_config(train_config)
    rules = partitioning.logical_axis_rules(train_config)
    assert rules[0] == ("context", "tensor") and rules[1:] == DEFAULT_LOGICAL_AXIS_RULES
