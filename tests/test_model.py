"""Model behaviour beyond the goldens: options checked against the numpy reference, training-time dropouts,
dtypes, rematerialisation, logical axis names, parameter layout of the released 455M model, and input checks."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax.convert import parameter_table, torch_shape
from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_ar_jax.model.masks import prefix_keep_indices
from tests import numpy_reference
from tests.conftest import STATE_DICT_455M, require

SMALL = dict(vocab_size=61, max_seq_len=24, max_latents=8, num_channels=32, num_heads=4, num_self_attention_layers=2,
             cross_attention_dropout=0.0)


def noisy_params(config, seed=0):
    """Random params with large values everywhere, so that any wrongly used parameter changes the logits."""
    model = CausalLanguageModel(config)
    params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, config.max_latents), jnp.int32), 0)["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [leaf + jax.random.normal(k, leaf.shape, leaf.dtype) * (0.3 if leaf.ndim == 1 else leaf.shape[0] ** -0.5)
             for leaf, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def tokens_and_pads(config, batch=3, seq_len=None, pads=(0, 3, 1), seed=0):
    seq_len = seq_len or config.max_seq_len
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, config.vocab_size, (batch, seq_len))
    pad_mask = np.arange(seq_len)[None] < np.asarray(pads)[:batch, None]
    return np.where(pad_mask, 0, ids), pad_mask


@pytest.mark.parametrize("options", [
    dict(abs_pos_emb=True, output_bias=True, output_norm=False),
    dict(abs_pos_emb=False, output_bias=False, output_norm=True, num_self_attention_rotary_layers=-1),
    dict(abs_pos_emb=True, num_self_attention_rotary_layers=0, self_attention_widening_factor=3,
         cross_attention_widening_factor=2, max_heads_parallel=3),
])
def test_logits_match_numpy_reference(options):
    config = CausalLanguageModelConfig(**{**SMALL, **options})
    params = noisy_params(config)
    ids, pad_mask = tokens_and_pads(config)
    for prefix_len in (0, 5, config.max_prefix_len):
        logits = CausalLanguageModel(config).apply({"params": params}, ids, prefix_len=prefix_len, pad_mask=pad_mask)
        expected = numpy_reference.forward(config, params, ids, prefix_len, pad_mask)
        np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=2e-4)


def test_cross_attention_dropout_keeps_a_random_ordered_subset_of_prefix_positions():
    config = CausalLanguageModelConfig(**{**SMALL, "cross_attention_dropout": 0.4})
    params = noisy_params(config)
    ids, pad_mask = tokens_and_pads(config)
    model = CausalLanguageModel(config)
    rng = jax.random.key(7)
    logits = model.apply({"params": params}, ids, prefix_len=16, pad_mask=pad_mask, deterministic=False,
                         rngs={"dropout": rng})
    # the model's first draw from its "dropout" stream picks the kept positions
    dropout_key = model.apply({"params": params}, method=lambda m: m.make_rng("dropout"), rngs={"dropout": rng})
    kept = np.asarray(prefix_keep_indices(dropout_key, 3, 16, 0.4))
    assert kept.shape == (3, 16 - int(16 * 0.4))
    assert all(len(set(row)) == len(row) and list(row) == sorted(row) for row in kept)
    assert len({tuple(row) for row in kept}) > 1  # drawn per example
    expected = numpy_reference.forward(config, params, ids, 16, pad_mask, keep_indices=kept)
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=2e-4)
    # eval mode ignores it; prefix 0 has nothing to drop
    eval_logits = model.apply({"params": params}, ids, prefix_len=16, pad_mask=pad_mask)
    np.testing.assert_allclose(eval_logits, numpy_reference.forward(config, params, ids, 16, pad_mask), atol=2e-4)


@pytest.mark.parametrize("field", ["post_attention_dropout", "residual_dropout"])
def test_dropouts_apply_only_in_training_and_are_reproducible(field):
    config = CausalLanguageModelConfig(**{**SMALL, field: 0.3})
    params = noisy_params(config)
    ids, pad_mask = tokens_and_pads(config)
    model = CausalLanguageModel(config)
    run = lambda seed: model.apply({"params": params}, ids, prefix_len=8, pad_mask=pad_mask, deterministic=False,
                                   rngs={"dropout": jax.random.key(seed)})  # noqa: E731
    eval_logits = model.apply({"params": params}, ids, prefix_len=8, pad_mask=pad_mask)
    plain = CausalLanguageModel(config.replace(**{field: 0.0})).apply({"params": params}, ids, prefix_len=8,
                                                                      pad_mask=pad_mask)
    np.testing.assert_array_equal(eval_logits, plain)
    np.testing.assert_array_equal(run(1), run(1))
    assert np.abs(run(1) - run(2)).max() > 1e-3
    assert np.abs(run(1) - eval_logits).max() > 1e-3


@pytest.mark.parametrize("policy", ["nothing_saveable", "dots_saveable"])
def test_activation_checkpointing_gives_the_same_logits_and_gradients(policy):
    config = CausalLanguageModelConfig(**SMALL)
    params = noisy_params(config)
    ids, pad_mask = tokens_and_pads(config)

    def loss_and_grads(cfg):
        def loss(p):
            return CausalLanguageModel(cfg).apply({"params": p}, ids, prefix_len=10, pad_mask=pad_mask).mean()
        return jax.jit(jax.value_and_grad(loss))(params)

    base = loss_and_grads(config)
    remat = loss_and_grads(config.replace(activation_checkpointing=True, remat_policy=policy))
    np.testing.assert_allclose(remat[0], base[0], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), remat[1], base[1])


def test_bfloat16_compute_with_float32_params():
    config = CausalLanguageModelConfig(**SMALL)
    params = noisy_params(config)
    ids, pad_mask = tokens_and_pads(config)
    full = CausalLanguageModel(config).apply({"params": params}, ids, prefix_len=8, pad_mask=pad_mask)
    model = CausalLanguageModel(config.replace(dtype="bfloat16"))
    half = model.apply({"params": params}, ids, prefix_len=8, pad_mask=pad_mask)
    assert half.dtype == jnp.float32  # logits come out in float32 for the loss
    assert np.isfinite(half).all()
    assert np.abs(half - full).mean() < 0.05 * np.abs(full).mean()
    grads = jax.grad(lambda p: model.apply({"params": p}, ids, prefix_len=8, pad_mask=pad_mask).mean())(params)
    assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(grads))


def test_bfloat16_params():
    config = CausalLanguageModelConfig(**SMALL, param_dtype="bfloat16", dtype="bfloat16")
    model = CausalLanguageModel(config)
    params = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32), 0)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(nn.unbox(params))} == {jnp.dtype(jnp.bfloat16)}
    assert np.isfinite(model.apply({"params": params}, jnp.ones((2, 12), jnp.int32), prefix_len=4)).all()


def test_every_parameter_has_logical_axis_names():
    config = CausalLanguageModelConfig(**{**SMALL, "abs_pos_emb": True, "output_bias": True, "output_norm": True})
    variables = jax.eval_shape(lambda: CausalLanguageModel(config).init(jax.random.key(0), jnp.zeros((1, 8), int), 0))
    boxed = jax.tree.leaves(variables["params"], is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    assert all(isinstance(leaf, nn.LogicallyPartitioned) for leaf in boxed)
    for leaf in boxed:
        assert len(leaf.names) == leaf.value.ndim
        assert set(leaf.names) <= {"embed", "heads", "kv", "mlp", "vocab", None}
    names = {leaf.names for leaf in boxed}
    assert {("vocab", "embed"), ("embed", "heads", "kv"), ("heads", "kv", "embed"), ("embed", "mlp"),
            ("mlp", "embed"), ("embed",), ("vocab",)} <= names


def test_released_455m_layout_matches_its_state_dict():
    listing = require(STATE_DICT_455M)
    expected = {}
    for line in listing.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape, _ = line.split("\t")
            expected[key.removeprefix("backend_model.")] = tuple(int(d) for d in re.findall(r"\d+", shape))
    config = CausalLanguageModelConfig(vocab_size=32000, max_seq_len=1024, max_latents=512, num_channels=1280,
                                       num_heads=10, max_heads_parallel=2, num_self_attention_layers=20,
                                       cross_attention_dropout=0.0, output_norm=True, output_bias=False,
                                       abs_pos_emb=False)
    from perceiver_ar_jax.model import abstract_params

    shapes = abstract_params(config)  # nothing is allocated
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes)) == 453_950_720
    ours = {}
    for entry in parameter_table(config):
        leaf = shapes
        for name in entry.path:
            leaf = leaf[name]
        ours[entry.torch_key] = torch_shape(leaf.shape, entry.layout)
    ours["input_adapter.frq_pos_encoding.inv_freq"] = (config.num_rotated_channels // 2,)
    assert ours == expected


def test_prefix_len_and_length_are_checked():
    config = CausalLanguageModelConfig(**SMALL)
    model = CausalLanguageModel(config)
    params = noisy_params(config)
    ids = np.ones((2, 20), np.int32)
    for prefix_len, message in [(-1, r"prefix_len \(-1\) out of valid range \[0..20\)"),
                                (20, r"prefix_len \(20\) out of valid range"),
                                (17, r"prefix_len \(17\) exceeds max_prefix_len \(16 = max_seq_len 24 - max_lat")]:
        with pytest.raises(ValueError, match=message):
            model.apply({"params": params}, ids, prefix_len=prefix_len)
    with pytest.raises(ValueError, match=r"input length 25 exceeds max_seq_len \(24\)"):
        model.apply({"params": params}, np.ones((1, 25), np.int32), prefix_len=16)
    with pytest.raises(TypeError, match="prefix_len must be a Python int"):
        jax.jit(lambda p: model.apply({"params": params}, ids, prefix_len=p))(3)


@pytest.mark.parametrize("changes, message", [
    (dict(num_heads=5), r"num_channels=32 .* divisible by num_heads \(5\)"),
    (dict(max_latents=30), r"max_latents=30 .* <= max_seq_len \(24\)"),
    (dict(cross_attention_dropout=1.0), r"cross_attention_dropout=1.0 .* in \[0, 1\)"),
    (dict(num_self_attention_rotary_layers=-2), r"num_self_attention_rotary_layers=-2"),
    (dict(vocab_size=0), r"vocab_size=0 .* integer >= 1"),
    (dict(num_channels=24, num_heads=4, abs_pos_emb=True), r"rotated channels per head \(3\) are even"),
    (dict(dtype="float8"), r"dtype='float8' .* one of"),
    (dict(max_heads_parallel=0), r"max_heads_parallel=0"),
])
def test_config_values_out_of_range_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        CausalLanguageModelConfig(**{**SMALL, **changes})
