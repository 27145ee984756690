"""FLOPs / MFU accounting, the console line, and the mesh arithmetic."""

import types

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from perceiver_ar_jax.backend import cpu_kernels
from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_ar_jax.training import metrics, partitioning


def xla_flops(fn, *args) -> float:
    analysis = jax.jit(fn).lower(*args).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return float(analysis["flops"])


def test_forward_flops_formula_matches_xla_count(monkeypatch):
    """XLA counts every FLOP (softmax, norms, GELU too); the matmuls our formula counts dominate at this width.
    It counts none of a custom call's, so attention's products go through XLA's einsums here."""
    monkeypatch.setattr(cpu_kernels, "batched_matmul_supports", lambda *args: False)
    config = CausalLanguageModelConfig(vocab_size=2048, max_seq_len=256, max_latents=64, num_channels=256,
                                       num_heads=4, num_self_attention_layers=3, abs_pos_emb=False)
    model = CausalLanguageModel(config)
    ids = jnp.zeros((2, 256), jnp.int32)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, prefix_len=192))
    params = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), params)
    counted = xla_flops(lambda p, x: model.apply(p, x, prefix_len=192), params, ids)
    formula = metrics.forward_flops(config, batch_size=2, seq_len=256, prefix_len=192)
    assert 0.9 < formula / counted <= 1.0


def test_training_flops_are_three_forwards_over_the_kept_prefix():
    config = CausalLanguageModelConfig(vocab_size=100, max_seq_len=1024, max_latents=256, num_channels=64,
                                       num_heads=4, num_self_attention_layers=2, cross_attention_dropout=0.5)
    assert metrics.train_flops_per_step(config, 8, 1024) == 3 * metrics.forward_flops(config, 8, 640, 384)


def test_throughput_reports_tokens_mfu_and_eta(monkeypatch):
    clock = iter([100.0, 102.0])
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: next(clock))
    meter = metrics.Throughput(start_step=10, total_steps=110, tokens_per_step=1000, flops_per_step=4e12,
                               peak_flops_total=8e12)
    rates = meter.update(20)  # 10 steps in 2 s
    assert rates == pytest.approx({"steps_per_s": 5.0, "tokens_per_s": 5000.0, "eta_s": 18.0, "mfu": 2.5})


def test_progress_line_has_every_field():
    line = metrics.progress_line(120, 1000, {"loss": 4.2134, "learning_rate": 3e-4, "grad_norm": 0.84,
                                             "tokens_per_s": 5123.0, "mfu": 0.412, "eta_s": 723.0})
    assert line == "step 120/1000 | loss 4.2134 | lr 3.00e-04 | grad norm 0.840 | 5.1k tok/s | MFU 41.2% | ETA 12:03"


def test_peak_flops_from_device_kind_or_override():
    assert metrics.peak_flops_per_device(types.SimpleNamespace(device_kind="TPU v4")) == 275e12
    assert metrics.peak_flops_per_device(types.SimpleNamespace(device_kind="TPU v5 lite")) == 197e12
    assert metrics.peak_flops_per_device(types.SimpleNamespace(device_kind="cpu")) is None
    assert metrics.peak_flops_per_device(types.SimpleNamespace(device_kind="cpu"), override=1e12) == 1e12


def test_eval_summary_perplexity_and_bits():
    out = metrics.eval_summary(loss_sum=2.0 * 50, num_tokens=50)
    assert out == pytest.approx({"loss": 2.0, "perplexity": 7.389056, "bits_per_token": 2.885390})


@pytest.mark.parametrize("sizes,total,expected", [((1, -1, 1), 8, (1, 8, 1)), ((2, 2, -1), 8, (2, 2, 2)),
                                                  ((1, 4, 2), 8, (1, 4, 2)), ((-1, 1, 1), 1, (1, 1, 1))])
def test_parallelism_fills_the_rest(sizes, total, expected):
    assert partitioning.fill_parallelism(sizes, total, "mesh.ici_parallelism") == expected


@pytest.mark.parametrize("sizes,total,message", [((1, 3, -1), 8, "cannot be split"), ((1, 4, 1), 8, "needs 4"),
                                                 ((-1, -1, 1), 8, "out of range"), ((1, 8), 8, "out of range")])
def test_bad_parallelism_is_named(sizes, total, message):
    with pytest.raises(ValueError, match=r"mesh.ici_parallelism=.*" + message):
        partitioning.fill_parallelism(sizes, total, "mesh.ici_parallelism")


def test_mesh_axes_that_do_not_divide_a_dimension_leave_it_replicated():
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 4, "tensor": 4})
    rules = partitioning.DEFAULT_LOGICAL_AXIS_RULES
    dropped = set()
    assert partitioning.mesh_spec(P("embed", "heads", "kv"), (512, 8, 64), mesh, rules, dropped) == P(
        "fsdp", "tensor", None)
    assert partitioning.mesh_spec(P("vocab", "embed"), (262, 512), mesh, rules, dropped) == P(None, "fsdp")
    assert dropped == {("vocab", 262, "tensor")}


def test_single_device_mesh_and_batch_sharding():
    mesh = partitioning.create_mesh(types.SimpleNamespace(ici_parallelism=(1, -1, 1), dcn_parallelism=(-1, 1, 1)))
    assert dict(mesh.shape) == {"data": 1, "fsdp": jax.device_count(), "tensor": 1}
    batch = partitioning.make_global_batch({"x": jnp.arange(8).reshape(4, 2)}, mesh)
    assert batch["x"].shape == (4, 2) and batch["x"].sharding.spec == P(("data", "fsdp"))
