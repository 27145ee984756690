"""The Pallas splash-attention kernel (TPU), run in Pallas interpret mode on CPU, equals the dense attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax.convert import load_torch_checkpoint
from perceiver_ar_jax.model import CausalLanguageModel
from perceiver_ar_jax.model.attention import dense_attention
from perceiver_ar_jax.model.masks import AttentionMask

pallas_attention = pytest.importorskip("perceiver_ar_jax.model.attention.splash",
                                       reason="this jax has no Pallas TPU splash attention")

TOLERANCE = 1e-5
GRAD_RTOL = 1e-5  # gradients reach magnitudes ~10, where float32 summation order alone moves them by ~1e-5
BATCH, HEADS, HEAD_DIM = 2, 2, 16


def qkv(num_queries, num_keys, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (BATCH, num_queries, HEADS, HEAD_DIM))
    k = jax.random.normal(keys[1], (BATCH, num_keys, HEADS, HEAD_DIM))
    v = jax.random.normal(keys[2], (BATCH, num_keys, HEADS, HEAD_DIM))
    return q, k, v, jax.random.normal(keys[3], (BATCH, num_queries, HEADS, HEAD_DIM))


def value_and_grads(attention, q, k, v, cotangent):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v) * cotangent)  # noqa: E731
    return jax.jit(lambda q, k, v: (attention(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


CASES = {  # name: (latents, prefix, pads in row 1)
    "cross_attention_with_padding": (8, 150, 5),  # keys span two 128-key blocks, queries padded to 128
    "all_masked_rows_prefix_0": (16, 0, 5),  # the pad latents see only pads (fixture case pad_p0_edge)
}


@pytest.mark.parametrize("case", CASES)
def test_splash_in_interpret_mode_equals_dense_in_forward_and_gradients(case):
    num_latents, prefix_len, num_pads = CASES[case]
    num_keys = prefix_len + num_latents
    q, k, v, cotangent = qkv(num_latents, num_keys)
    pad = jnp.zeros((BATCH, num_keys), bool).at[1, :num_pads].set(True)
    mask = AttentionMask(num_latents, num_keys, causal=True, key_pad=pad)
    (out, grads) = value_and_grads(
        lambda q, k, v: pallas_attention.splash_attend(q, k, v, mask, block_size=128, interpret=True),
        q, k, v, cotangent)
    (expected_out, expected_grads) = value_and_grads(lambda q, k, v: dense_attention(q, k, v, mask.array()),
                                                     q, k, v, cotangent)
    np.testing.assert_allclose(out, expected_out, rtol=0, atol=TOLERANCE)
    for name, a, e in zip("qkv", grads, expected_grads, strict=True):
        np.testing.assert_allclose(a, e, rtol=GRAD_RTOL, atol=TOLERANCE, err_msg=f"d{name}")


def test_splash_without_mask_is_full_attention():
    q, k, v, _ = qkv(8, 20)
    out = pallas_attention.splash_attend(q, k, v, None, interpret=True)
    np.testing.assert_allclose(out, dense_attention(q, k, v, None), rtol=0, atol=TOLERANCE)


def test_splash_with_padding_and_no_causality_equals_dense():
    q, k, v, _ = qkv(8, 20)
    pad = jnp.zeros((BATCH, 20), bool).at[0, :7].set(True).at[1].set(True)  # row 1: no visible key at all
    mask = AttentionMask(8, 20, causal=False, key_pad=pad)
    out = pallas_attention.splash_attend(q, k, v, mask, interpret=True)
    np.testing.assert_allclose(out, dense_attention(q, k, v, mask.array()), rtol=0, atol=TOLERANCE)


def test_splash_rejects_a_mask_of_other_lengths():
    q, k, v, _ = qkv(8, 20)
    with pytest.raises(ValueError, match="mask of 8 queries x 21 keys for 8 queries and 20 keys"):
        pallas_attention.splash_attend(q, k, v, AttentionMask(8, 21, causal=True), interpret=True)


def test_a_bool_array_mask_never_reaches_a_kernel():
    """Decoding's ring-buffer masks are bool arrays: any pattern, so only the dense and blockwise paths take them."""
    from perceiver_ar_jax.model.attention.dispatch import resolve_attention_impl

    ring = jnp.ones((1, 1, 8, 16), bool)
    for impl in ("splash", "cudnn", "auto"):
        for backend in ("tpu", "gpu"):
            assert resolve_attention_impl(impl, 8, 16, False, backend, dtype=jnp.bfloat16, mask=ring) == "xla"
            assert resolve_attention_impl(impl, 8, 4096, False, backend, dtype=jnp.bfloat16,
                                          mask=ring) == "blockwise"
    structured = AttentionMask(8, 16, causal=True)
    assert resolve_attention_impl("auto", 8, 16, False, "tpu", mask=structured) == "splash"
    assert resolve_attention_impl("splash", 8, 16, False, "cpu", mask=structured) == "splash"


def test_model_logits_with_splash_equal_the_golden_logits(public_fixture):
    config, params = load_torch_checkpoint(public_fixture / "hf-safetensors")
    golden = np.load(public_fixture / "forward_cases.npz")
    apply = jax.jit(CausalLanguageModel(config.replace(attention_impl="splash")).apply, static_argnames="prefix_len")
    for case, tokens, prefix_len, pad_mask in [("p16", "tokens", 16, None),
                                               ("pad_p0_edge", "pad_tokens", 0, "pad_mask")]:
        logits = apply({"params": params}, golden[tokens], prefix_len=prefix_len,
                       pad_mask=None if pad_mask is None else golden[pad_mask])
        np.testing.assert_allclose(logits, golden["logits_" + case], rtol=0, atol=1e-4, err_msg=case)


@pytest.mark.parametrize("causal", [False, True])
def test_splash_log_sum_exp_and_its_gradient_equal_blockwise(causal):
    """The kernel gives its log-sum-exp without a gradient; `splash_attention_with_lse` adds it in the backward
    pass (what merging partial attentions over a split prefix needs)."""
    from perceiver_ar_jax.model.attention.blockwise import blockwise_attention_with_lse

    num_queries, num_keys = 8, 150
    q, k, v, cotangent = qkv(num_queries, num_keys)
    pad = jnp.zeros((BATCH, num_keys), bool).at[1, :5].set(True)
    lse_cotangent = jax.random.normal(jax.random.key(9), (BATCH, num_queries, HEADS))
    mask = AttentionMask(num_queries, num_keys, causal, pad).array()

    def value_and_grads(attention):
        def loss(q, k, v):
            out, lse = attention(q, k, v)
            return jnp.sum(out * cotangent) + jnp.sum(lse * lse_cotangent)

        return jax.jit(lambda q, k, v: (attention(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)

    actual = value_and_grads(lambda q, k, v: pallas_attention.splash_attention_with_lse(
        q, k, v, pad, causal, block_size=128, interpret=True))
    expected = value_and_grads(lambda q, k, v: blockwise_attention_with_lse(q, k, v, mask, block_size=64))
    (out, lse), grads = actual
    (expected_out, expected_lse), expected_grads = expected
    np.testing.assert_allclose(out, expected_out, rtol=0, atol=TOLERANCE)
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-6, atol=TOLERANCE)
    for name, a, e in zip("qkv", grads, expected_grads, strict=True):
        np.testing.assert_allclose(a, e, rtol=GRAD_RTOL, atol=TOLERANCE, err_msg=f"d{name}")
