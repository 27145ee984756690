"""Blockwise (online-softmax) attention equals the dense attention, forward and backward, masks included."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax.convert import load_torch_checkpoint
from perceiver_ar_jax.model import CausalLanguageModel
from perceiver_ar_jax.model.attention import MultiHeadAttention, dense_attention, resolve_attention_impl
from perceiver_ar_jax.model.attention.blockwise import (
    blockwise_attention,
    blockwise_attention_with_lse,
    merge_partial_attention,
)
from perceiver_ar_jax.model.masks import causal_mask, cross_attention_mask

TOLERANCE = 1e-5
# whole-model logits of the fixture are O(10) (its weights carry large noise): float32 summation order alone
# moves them by ~1e-5, as the dense path's own parity with perceiver-io shows
MODEL_TOLERANCE = 5e-5
BATCH, HEADS, HEAD_DIM = 2, 3, 8


def qkv(num_queries, num_keys, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (BATCH, num_queries, HEADS, HEAD_DIM), dtype)
    k = jax.random.normal(keys[1], (BATCH, num_keys, HEADS, HEAD_DIM), dtype)
    v = jax.random.normal(keys[2], (BATCH, num_keys, HEADS, HEAD_DIM), dtype)
    cotangent = jax.random.normal(keys[3], (BATCH, num_queries, HEADS, HEAD_DIM), jnp.float32)
    return q, k, v, cotangent


def hybrid_mask(num_latents, prefix_len, num_pads):
    """Cross-attention mask of [prefix, latents] keys with row 1 left-padded by num_pads tokens."""
    num_keys = prefix_len + num_latents
    pad = jnp.zeros((BATCH, num_keys), bool).at[1, :num_pads].set(True)
    return cross_attention_mask(num_latents, num_keys, pad)


def value_and_grads(attention, q, k, v, cotangent):
    """attention(q, k, v) and the gradients of <attention(q, k, v), cotangent>, jitted (eager loops are slow)."""
    loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * cotangent)  # noqa: E731
    return jax.jit(lambda q, k, v: (attention(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


def assert_same(actual, expected, tolerance=TOLERANCE):
    (out_a, grads_a), (out_e, grads_e) = actual, expected
    np.testing.assert_allclose(out_a, out_e, rtol=0, atol=tolerance)
    for name, a, e in zip("qkv", grads_a, grads_e, strict=True):
        np.testing.assert_allclose(a, e, rtol=0, atol=tolerance, err_msg=f"d{name}")


CASES = {  # name: (latents, prefix, pads in row 1)
    "prefix_and_padding": (8, 29, 5),
    "prefix_0_self_attention": (16, 0, 0),
    "all_masked_rows_prefix_0": (16, 0, 5),  # pad latents see only pads: the pad_p0_edge case
    "all_masked_rows_with_prefix": (8, 29, 32),  # the first three latents see only pads
}


@pytest.mark.parametrize("block_size", [5, 16, 512])
@pytest.mark.parametrize("case", CASES)
def test_blockwise_equals_dense_in_forward_and_gradients(case, block_size):
    num_latents, prefix_len, num_pads = CASES[case]
    q, k, v, cotangent = qkv(num_latents, prefix_len + num_latents)
    mask = hybrid_mask(num_latents, prefix_len, num_pads)
    expected = value_and_grads(lambda q, k, v: dense_attention(q, k, v, mask), q, k, v, cotangent)
    actual = value_and_grads(lambda q, k, v: blockwise_attention(q, k, v, mask, block_size), q, k, v, cotangent)
    assert_same(actual, expected)


def test_all_masked_query_attends_uniformly_to_every_key():
    q, k, v, _ = qkv(16, 16)
    mask = hybrid_mask(16, 0, 5)  # row 1, latents 0..4: every visible key is a pad
    out = blockwise_attention(q, k, v, mask, block_size=4)
    np.testing.assert_allclose(out[1, :5], jnp.broadcast_to(v[1].mean(axis=0), (5, HEADS, HEAD_DIM)), atol=1e-6)
    assert np.isfinite(out).all()


def test_blockwise_without_mask_equals_dense():
    q, k, v, cotangent = qkv(6, 23)
    expected = value_and_grads(lambda q, k, v: dense_attention(q, k, v, None), q, k, v, cotangent)
    actual = value_and_grads(lambda q, k, v: blockwise_attention(q, k, v, None, 7), q, k, v, cotangent)
    assert_same(actual, expected)


def test_per_head_mask_is_sliced_per_key_block():
    q, k, v, cotangent = qkv(6, 23)
    mask = jax.random.bernoulli(jax.random.key(7), 0.6, (BATCH, HEADS, 6, 23))
    expected = value_and_grads(lambda q, k, v: dense_attention(q, k, v, mask), q, k, v, cotangent)
    actual = value_and_grads(lambda q, k, v: blockwise_attention(q, k, v, mask, 4), q, k, v, cotangent)
    assert_same(actual, expected)


def test_blockwise_dropout_equals_dense_with_the_same_keep_masks():
    q, k, v, cotangent = qkv(8, 37)
    mask = hybrid_mask(8, 29, 5)
    rate, block_size, rng = 0.3, 16, jax.random.key(3)
    # the keep-masks blockwise draws: one per key block, from fold_in(rng, block index)
    keep = jnp.concatenate([
        jax.random.bernoulli(jax.random.fold_in(rng, j), 1.0 - rate, (BATCH, HEADS, 8, min(16, 37 - 16 * j)))
        for j in range(3)], axis=-1)
    dropout = lambda p: jnp.where(keep, p / (1.0 - rate), 0.0)  # noqa: E731
    expected = value_and_grads(lambda q, k, v: dense_attention(q, k, v, mask, dropout=dropout), q, k, v, cotangent)
    actual = value_and_grads(lambda q, k, v: blockwise_attention(q, k, v, mask, block_size, rate, rng),
                             q, k, v, cotangent)
    assert_same(actual, expected)
    assert not np.allclose(actual[0], blockwise_attention(q, k, v, mask, block_size), atol=1e-3)


def test_bfloat16_inputs_give_bfloat16_outputs_close_to_float32():
    q, k, v, _ = qkv(8, 37, dtype=jnp.bfloat16)
    mask = hybrid_mask(8, 29, 5)
    out = blockwise_attention(q, k, v, mask, 16)
    assert out.dtype == jnp.bfloat16
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    np.testing.assert_allclose(f32(out), dense_attention(f32(q), f32(k), f32(v), mask), atol=3e-2)


def test_merging_partial_results_over_key_halves_equals_attention_over_all_keys():
    q, k, v, cotangent = qkv(8, 40)
    mask = hybrid_mask(8, 32, 3)

    def merged(q, k, v):
        parts = [blockwise_attention_with_lse(q, k[:, s], v[:, s], mask[..., s], 8)
                 for s in (slice(0, 24), slice(24, 40))]
        return merge_partial_attention(parts)[0]

    expected = value_and_grads(lambda q, k, v: dense_attention(q, k, v, mask), q, k, v, cotangent)
    assert_same(value_and_grads(merged, q, k, v, cotangent), expected)


def test_lse_is_the_log_sum_exp_of_the_masked_scores():
    q, k, v, _ = qkv(8, 37)
    mask = hybrid_mask(8, 29, 5)
    _, lse = blockwise_attention_with_lse(q, k, v, mask, 8)
    scores = jnp.where(mask, jnp.einsum("bqhd,bkhd->bhqk", q, k), -jnp.inf)
    np.testing.assert_allclose(lse, jnp.transpose(jax.nn.logsumexp(scores, axis=-1), (0, 2, 1)), atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    ({"block_size": 0}, "block_size=0"),
    ({"dropout_rate": 1.0, "dropout_rng": jax.random.key(0)}, "dropout_rate=1.0"),
    ({"dropout_rate": 0.1}, "dropout_rng must be given"),
])
def test_bad_arguments_are_rejected_with_the_value_named(kwargs, message):
    q, k, v, _ = qkv(4, 9)
    with pytest.raises(ValueError, match=message):
        blockwise_attention(q, k, v, None, **kwargs)


def test_auto_picks_blockwise_for_long_keys_and_dense_for_short_or_single_queries():
    assert resolve_attention_impl("auto", 256, 4096, False, backend="cpu") == "blockwise"
    assert resolve_attention_impl("auto", 256, 1024, False, backend="cpu") == "xla"
    assert resolve_attention_impl("auto", 1, 65536, False, backend="cpu") == "xla"
    assert resolve_attention_impl("auto", 256, 1024, False, backend="tpu") == "splash"
    assert resolve_attention_impl("auto", 256, 4096, True, backend="tpu") == "blockwise"
    assert resolve_attention_impl("splash", 256, 512, True, backend="tpu") == "blockwise"
    assert resolve_attention_impl("xla", 256, 65536, False, backend="cpu") == "xla"


# --- model level ----------------------------------------------------------------------------------------------
FIXTURE_CASES = [("p0", "tokens", 0, None), ("p16", "tokens", 16, None), ("pad_p48", "pad_tokens", 48, "pad_mask"),
                 ("pad_p0_edge", "pad_tokens", 0, "pad_mask")]


@pytest.fixture(scope="module")
def fixture_model(public_fixture):
    config, params = load_torch_checkpoint(public_fixture / "hf-safetensors")
    return config, params, np.load(public_fixture / "forward_cases.npz")


def test_model_logits_with_blockwise_equal_xla_and_the_golden_logits(fixture_model):
    config, params, golden = fixture_model
    apply = lambda impl: jax.jit(CausalLanguageModel(config.replace(  # noqa: E731
        attention_impl=impl, attention_block_size=5)).apply, static_argnames="prefix_len")
    xla, blockwise = apply("xla"), apply("blockwise")
    for case, tokens, prefix_len, pad_mask in FIXTURE_CASES:
        pad = None if pad_mask is None else golden[pad_mask]
        logits = blockwise({"params": params}, golden[tokens], prefix_len=prefix_len, pad_mask=pad)
        reference = xla({"params": params}, golden[tokens], prefix_len=prefix_len, pad_mask=pad)
        np.testing.assert_allclose(logits, reference, rtol=0, atol=MODEL_TOLERANCE, err_msg=case)
        np.testing.assert_allclose(logits, golden["logits_" + case], rtol=0, atol=1e-4, err_msg=case)


def test_model_gradients_with_blockwise_equal_xla(fixture_model):
    config, params, golden = fixture_model

    def grads(impl):
        model = CausalLanguageModel(config.replace(attention_impl=impl, attention_block_size=5))

        def loss(params):
            logits = model.apply({"params": params}, golden["pad_tokens"], prefix_len=0, pad_mask=golden["pad_mask"])
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 1])

        return jax.jit(jax.grad(loss))(params)

    expected = jax.tree_util.tree_leaves(grads("xla"))
    for (path, actual), reference in zip(jax.tree_util.tree_leaves_with_path(grads("blockwise")), expected,
                                         strict=True):
        np.testing.assert_allclose(actual, reference, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_attention_probability_dropout_runs_blockwise_and_depends_on_the_rng():
    module = MultiHeadAttention(num_heads=HEADS, num_channels=HEADS * HEAD_DIM, out_bias=False, init_scale=0.02,
                                dropout_rate=0.5, attention_impl="blockwise", attention_block_size=8)
    x = jax.random.normal(jax.random.key(0), (BATCH, 20, HEADS * HEAD_DIM))
    mask = causal_mask(20, 20)

    def call(m, x, deterministic):
        return m(x, *m.project_kv(x), None, None, mask, deterministic)

    params = module.init(jax.random.key(1), x, True, method=call)
    run = lambda params, deterministic, seed=0: module.apply(  # noqa: E731
        params, x, deterministic, method=call, rngs={"dropout": jax.random.key(seed)})
    eval_out, train_a, train_b = run(params, True), run(params, False, 0), run(params, False, 1)
    assert not np.allclose(eval_out, train_a, atol=1e-4)
    assert not np.allclose(train_a, train_b, atol=1e-4)
    np.testing.assert_array_equal(train_a, run(params, False, 0))


def test_model_with_latents_that_see_only_padding_equals_xla(fixture_model):
    """Row 1 has 20 pads and prefix_len 16: its first 4 latents see only pads, through the block-by-block prefix."""
    config, params, golden = fixture_model
    pad_mask = np.zeros(golden["tokens"].shape, bool)
    pad_mask[1, :20] = True

    def logits_and_grads(impl):
        model = CausalLanguageModel(config.replace(attention_impl=impl, attention_block_size=5))

        def loss(params):
            logits = model.apply({"params": params}, golden["tokens"], prefix_len=16, pad_mask=pad_mask)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 1]), logits

        return jax.jit(jax.grad(loss, has_aux=True))(params)

    grads, logits = logits_and_grads("blockwise")
    expected_grads, expected_logits = logits_and_grads("xla")
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=MODEL_TOLERANCE)
    for (path, actual), reference in zip(jax.tree_util.tree_leaves_with_path(grads),
                                         jax.tree_util.tree_leaves(expected_grads), strict=True):
        np.testing.assert_allclose(actual, reference, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))
