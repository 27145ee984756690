"""The attention kernels under a device mesh: each device runs the kernel on its own rows and heads, inside a
`shard_map` whose specs come from the logical-axis rules, and the sharded train step equals the XLA one. The CPU
kernels (FFI custom calls) give way to XLA's operations there: the partitioner would gather their operands.

The 8-device checks run this file as a script in a subprocess with 8 simulated CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=8 must be set before jax starts); splash runs in Pallas interpret
mode there. The script prints its measurements as JSON; the tests assert on them.
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
from jax.sharding import PartitionSpec as P

from perceiver_ar_jax.model.sharding import DEFAULT_LOGICAL_AXIS_RULES, kernel_shard_map, mesh_spec
from tests.conftest import REPO

MESHES = ((8, 1, 1), (2, 2, 2), (1, 4, 2))


def sub_jaxprs(eqn):
    """The jaxprs inside an equation's parameters (bodies of jit, shard_map, custom_vjp, scan, cond, ...)."""
    for value in eqn.params.values():
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def pallas_calls(jaxpr, inside=(), primitive="pallas_call"):
    """(the shard_map equations enclosing it, the pallas_call equation) for every Pallas call in jaxpr (or every
    equation of another primitive)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            yield inside, eqn
        enclosing = inside + (eqn,) if eqn.primitive.name == "shard_map" else inside
        for sub in sub_jaxprs(eqn):
            yield from pallas_calls(sub, enclosing, primitive)


def train_steps(mesh_shape, attention_impl):
    """One jitted train step of the tiny training model on a (data, fsdp, tensor) mesh: its jaxpr, loss, the
    new parameters (on the host) and the gradient norm."""
    from perceiver_ar_jax import training
    from perceiver_ar_jax.model import CausalLanguageModel
    from perceiver_ar_jax.training import optimizer as optimizer_lib
    from perceiver_ar_jax.training import partitioning
    from perceiver_ar_jax.training.loop import with_rules
    from perceiver_ar_jax.training.state import make_init_fn, state_layout
    from perceiver_ar_jax.training.step import train_step
    from tests.synthetic_data import SyntheticBatches, tiny_train_config

    config = tiny_train_config(**{"mesh.ici_parallelism": mesh_shape, "model.attention_impl": attention_impl})
    mesh = partitioning.create_mesh(config.mesh)
    rules = partitioning.logical_axis_rules(config)
    model = CausalLanguageModel(training.model_config_from(config))
    optimizer = optimizer_lib.make_optimizer(config)
    init_fn = make_init_fn(model, optimizer, config.seed)
    _, shardings = state_layout(init_fn, mesh, rules)
    batch = next(SyntheticBatches(vocab_size=64, max_seq_len=32, min_seq_len=16, batch_size=8))
    with jax.set_mesh(mesh):
        state = jax.jit(lambda: nn.unbox(init_fn()), out_shardings=shardings)()
        step = jax.jit(with_rules(rules, lambda s, b: train_step(s, b, model=model, optimizer=optimizer)),
                       in_shardings=(shardings, partitioning.batch_sharding(mesh)))
        global_batch = partitioning.make_global_batch(batch, mesh)
        jaxpr = jax.make_jaxpr(step)(state, global_batch)
        new_state, metrics = step(state, global_batch)
    return jaxpr, float(metrics["loss"]), jax.device_get(new_state.params), float(metrics["grad_norm"])


def context_parallel_differences(mesh_shape):
    """Loss and gradients of a small model with splash and the prefix split over `tensor` (the rule ("context",
    "tensor") first), against the unsharded xla model: an uneven prefix, left padding, and pad latents that see no
    key. Also the Pallas calls outside a shard_map."""
    from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig

    config = CausalLanguageModelConfig(vocab_size=64, max_seq_len=40, max_latents=16, num_channels=32, num_heads=2,
                                       num_self_attention_layers=1, abs_pos_emb=False, cross_attention_dropout=0.0)
    tokens = np.random.default_rng(0).integers(1, 64, (4, 31))
    pad = np.zeros((4, 31), bool)
    pad[1, :5], pad[2, :20] = True, True  # row 2: the first 5 latents see only pads
    params = CausalLanguageModel(config).init(jax.random.key(0), tokens, prefix_len=15)["params"]

    def loss(config, params):
        logits = CausalLanguageModel(config).apply({"params": params}, tokens, prefix_len=15, pad_mask=pad)
        return jnp.sum(jnp.sin(logits))

    mesh = jax.make_mesh(mesh_shape, ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    rules = (("context", "tensor"), *DEFAULT_LOGICAL_AXIS_RULES)
    splash_loss = jax.jit(jax.value_and_grad(lambda p: loss(config.replace(attention_impl="splash"), p)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        value, grads = splash_loss(params)
        calls = list(pallas_calls(jax.make_jaxpr(splash_loss)(params).jaxpr))
    expected, expected_grads = jax.jit(jax.value_and_grad(lambda p: loss(config.replace(attention_impl="xla"), p)))(
        params)
    return {"loss_diff": abs(float(value) - float(expected)), "loss": float(value),
            "grad_diff": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(
                jax.tree.leaves(grads), jax.tree.leaves(expected_grads), strict=True)),
            "pallas_calls": len(calls), "outside_shard_map": sum(not enclosing for enclosing, _ in calls),
            "kernel_specs": sorted({str(enclosing[-1].params["in_specs"]) for enclosing, _ in calls if enclosing})}


def main():
    """The 8-device measurements (run in a subprocess by the tests below); prints one JSON line."""
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    results = {}
    for shape in MESHES:
        jaxpr, loss, params, grad_norm = train_steps(shape, "splash")
        xla_jaxpr, expected_loss, expected_params, expected_grad_norm = train_steps(shape, "xla")
        calls = list(pallas_calls(jaxpr.jaxpr))
        results[str(shape)] = {
            "loss": loss, "expected_loss": expected_loss, "grad_norm": grad_norm,
            "expected_grad_norm": expected_grad_norm,
            "param_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(
                jax.tree.leaves(params), jax.tree.leaves(expected_params), strict=True)),
            "pallas_calls": len(calls),
            "outside_shard_map": sum(not enclosing for enclosing, _ in calls),
            # the specs of the shard_map right around each Pallas call (its q, k, v and padding)
            "kernel_specs": sorted({str(enclosing[-1].params["in_specs"]) for enclosing, _ in calls if enclosing}),
            "cpu_kernel_calls": sorted({eqn.params.get("target_name", "?") for _, eqn in pallas_calls(
                xla_jaxpr.jaxpr, primitive="ffi_call")}),
        }
    results["context_parallel"] = context_parallel_differences((2, 2, 2))
    mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):  # 10 heads over 4 tensor devices stay whole; rows over fsdp
        results["undivided_heads_spec"] = str(mesh_spec(("batch", None, "heads", None), (4, 3, 10, 8)))
    print("@@RESULT@@" + json.dumps(results))


@pytest.fixture(scope="module")
def eight_device_results():
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": python_path}
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=1200)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("@@RESULT@@")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[0][len("@@RESULT@@"):])


@pytest.mark.parametrize("shape", [str(s) for s in MESHES])
def test_train_step_with_splash_on_8_devices_equals_xla(eight_device_results, shape):
    result = eight_device_results[shape]
    assert np.isfinite(result["loss"])
    np.testing.assert_allclose(result["loss"], result["expected_loss"], rtol=1e-6)
    np.testing.assert_allclose(result["grad_norm"], result["expected_grad_norm"], rtol=1e-5)
    assert result["param_diff"] < 1e-6, result


@pytest.mark.parametrize("shape", [str(s) for s in MESHES])
def test_every_pallas_call_of_the_train_step_is_inside_a_shard_map(eight_device_results, shape):
    result = eight_device_results[shape]
    # forward and backward kernels of the hybrid layer and both self-attention layers
    assert result["pallas_calls"] >= 6, result
    assert result["outside_shard_map"] == 0, result
    # the training rules' layout: rows over (data, fsdp), the 2 heads over tensor, in every shard_map around a
    # kernel (forward: q, k, v; backward: their cotangents and residuals)
    qkv = str(P(("data", "fsdp"), None, "tensor", None))
    assert all(qkv in specs for specs in result["kernel_specs"]), result["kernel_specs"]


@pytest.mark.parametrize("shape", [str(s) for s in MESHES])
def test_no_cpu_kernel_in_the_train_step_on_8_devices(eight_device_results, shape):
    # GELU, cross-entropy, LayerNorm, softmax, AdamW, the batched products, copies and transposes: XLA's own (an
    # FFI call's operands would be gathered onto every device: the (8, 1, 1) step ran 1.8x slower with them)
    assert eight_device_results[shape]["cpu_kernel_calls"] == [], eight_device_results[shape]


def test_dimensions_their_mesh_axes_do_not_divide_stay_whole(eight_device_results):
    assert eight_device_results["undivided_heads_spec"] == str(P(("data", "fsdp"), None, None, None))


def test_splash_with_the_prefix_split_over_the_context_axis_equals_xla(eight_device_results):
    result = eight_device_results["context_parallel"]
    assert np.isfinite(result["loss"]) and result["loss_diff"] < 1e-4, result
    assert result["grad_diff"] < 1e-4, result
    assert result["pallas_calls"] >= 4 and result["outside_shard_map"] == 0, result
    # rows over (data, fsdp), the prefix over tensor (its rule comes first, so the heads stay whole there)
    prefix = P(("data", "fsdp"), "tensor", None, None)
    assert any(str(prefix) in specs for specs in result["kernel_specs"]), result["kernel_specs"]


# ------------------------------------------------------------------------------------------------ one device
def test_without_a_mesh_the_kernel_is_called_directly():
    called = []

    def kernel(q, k, v, key_pad):
        called.append(q.shape)
        return q

    q = jnp.zeros((4, 3, 2, 8))
    assert kernel_shard_map(kernel, q, q, q, None) is q
    assert called == [(4, 3, 2, 8)]


def test_specs_follow_the_rules_and_leave_undivided_dimensions_whole():
    mesh = jax.make_mesh((1, 1, 1), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    with jax.set_mesh(mesh):
        assert mesh_spec(("batch", None, "heads", None), (4, 3, 2, 8)) == P(("data", "fsdp"), None, "tensor", None)
        with nn.logical_axis_rules([("batch", "data"), ("heads", None)]):
            assert mesh_spec(("batch", None, "heads", None), (4, 3, 2, 8)) == P("data", None, None, None)
        # an axis the mesh does not have is left out
        with nn.logical_axis_rules([("batch", ("data", "replica")), ("heads", "tensor")]):
            assert mesh_spec(("batch", None, "heads", None), (4, 3, 2, 8)) == P("data", None, "tensor", None)
    assert DEFAULT_LOGICAL_AXIS_RULES[-1] == ("context", None)


if __name__ == "__main__":
    main()
