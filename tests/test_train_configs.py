"""The training configs in configs/ and their validation (train.py itself: tests/test_command_lines.py)."""

import importlib.util
import math
import sys
import types
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from perceiver_ar_jax import training
from perceiver_ar_jax.model import CausalLanguageModel, abstract_params
from perceiver_ar_jax.training import partitioning

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.stem for p in (REPO / "configs").glob("*.py") if not p.stem.startswith("_"))


def load(name):
    path = REPO / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO))  # configs import each other as `configs.X`, as under train.py
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO))
    return module.get_config()


def test_the_three_configs_exist():
    assert {"tiny", "c4_455m", "c4_8k"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_a_valid_model_and_training_setup(name):
    config = load(name)
    model_config = training.model_config_from(config)
    assert config.data.max_seq_len == model_config.max_seq_len
    mesh = partitioning.create_mesh(config.mesh)  # one CPU device
    assert training.check_config(config, partitioning.num_batch_shards(mesh), jax.process_count()) == model_config


def test_c4_455m_is_the_released_model_with_its_training_settings():
    config = load("c4_455m")
    model_config = training.model_config_from(config)
    expected_model = dict(vocab_size=32000, max_seq_len=1024, max_latents=512, num_channels=1280, num_heads=10,
                          num_self_attention_layers=20, abs_pos_emb=False, output_norm=True, output_bias=False,
                          max_heads_parallel=2, cross_attention_dropout=0.0, post_attention_dropout=0.0,
                          residual_dropout=0.0, init_scale=0.02, dtype="bfloat16", param_dtype="float32")
    assert {k: getattr(model_config, k) for k in expected_model} == expected_model
    expected_training = dict(batch_size=256, learning_rate=3e-4, warmup_steps=1000, lr_min_fraction=0.1,
                             max_grad_norm=1.0, num_train_steps=50_000, eval_every_steps=500, num_eval_batches=20,
                             grad_accum_steps=1)
    assert {k: config[k] for k in expected_training} == expected_training
    assert (config.data.source, config.data.tfds_name, config.data.min_seq_len) == ("tfds", "c4/en", 512)
    abstract = abstract_params(model_config)
    assert sum(math.prod(x.shape) for x in jax.tree.leaves(abstract)) == 453_950_720


def test_c4_455m_shards_every_large_parameter_on_a_pod_slice_mesh():
    """With fsdp=128, tensor=2 (256 chips) each parameter of 1280 x 1280 or more is split over both axes (tensor
    must divide the 10 heads)."""
    config = load("c4_455m")
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 128, "tensor": 2})  # mesh_spec reads axis sizes only
    rules = tuple(tuple(r) for r in config.mesh.logical_axis_rules)
    model = CausalLanguageModel(training.model_config_from(config))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), prefix_len=0))
    is_spec = lambda x: isinstance(x, P)  # noqa: E731
    specs = jax.tree_util.tree_flatten_with_path(nn.get_partition_spec(boxed)["params"], is_leaf=is_spec)[0]
    for (path, spec), leaf in zip(specs, jax.tree.leaves(nn.unbox(boxed)["params"]), strict=True):
        placed = partitioning.mesh_spec(spec, leaf.shape, mesh, rules)
        if math.prod(leaf.shape) >= 1280 * 1280:
            assert "fsdp" in placed and "tensor" in placed, (jax.tree_util.keystr(path), placed)


def test_long_context_config_keeps_tokens_per_step():
    long, base = load("c4_8k"), load("c4_455m")
    assert (long.model.max_seq_len, long.model.max_latents) == (8192, 1024)
    assert long.batch_size * long.model.max_seq_len == base.batch_size * base.model.max_seq_len


def test_model_and_data_max_seq_len_are_one_field():
    config = load("tiny")
    config.model.max_seq_len = 512
    assert config.data.max_seq_len == 512


@pytest.mark.parametrize("override, message", [
    (("model", "num_heads", 5), r"config\.model\.num_channels=128 is out of range: must be divisible by num_heads"),
    (("model", "num_heads", 0), r"config\.model\.num_heads=0 is out of range: must be an integer >= 1"),
    (("data", "min_seq_len", 4096), r"config\.data\.min_seq_len=4096 is out of range: must be in \[1, 256\]"),
    (("data", "min_seq_len", 64), r"config\.data\.min_seq_len=64 is out of range: must be in \[model\.max_latents"),
    ((None, "learning_rate", -1.0), r"config\.learning_rate=-1\.0 is out of range: must be > 0"),
    ((None, "eval_every_steps", -1), r"config\.eval_every_steps=-1 is out of range: must be an integer >= 0"),
    (("mesh", "ici_parallelism", (1, 0, 1)), r"config\.mesh\.ici_parallelism=\(1, 0, 1\) is out of range"),
])
def test_every_section_names_the_flag_as_typed(override, message):
    config = load("tiny")
    section, field, value = override
    with config.unlocked():
        (config if section is None else config[section])[field] = value
    with pytest.raises(ValueError, match=message):
        training.check_config(config)


def test_a_misspelled_model_field_names_the_closest_one():
    config = load("tiny")
    with config.unlocked():
        config.model.num_head = 4
    with pytest.raises(ValueError, match=r"config\.model\.num_head=4 is not a config field: did you mean "
                                         r"model\.num_heads\?"):
        training.check_config(config)
