"""The cuDNN path (`attention_impl="cudnn"`, `jax.nn.dot_product_attention`) equals the dense attention.

On CPU the same call runs JAX's XLA implementation of `dot_product_attention`, with the masks given to it as the
cuDNN path gives them (its causal mask where square, a bool mask for the rest); forward and gradients are
compared with the dense path, with padding and prefix 0. Which calls cuDNN takes on a GPU is checked on
`cudnn_supported` / `resolve_attention_impl` with backend="gpu".
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax.convert import load_torch_checkpoint
from perceiver_ar_jax.model import CausalLanguageModel
from perceiver_ar_jax.model.attention import dense_attention
from perceiver_ar_jax.model.attention.cudnn import cudnn_attend, cudnn_supported, mask_arguments
from perceiver_ar_jax.model.attention.dispatch import resolve_attention_impl
from perceiver_ar_jax.model.masks import AttentionMask

TOLERANCE = 1e-5
BATCH, HEADS, HEAD_DIM = 2, 2, 8


def qkv(num_queries, num_keys, seed=0, dtype=jnp.float32):
    keys = jax.random.split(jax.random.key(seed), 4)
    shape = lambda n: (BATCH, n, HEADS, HEAD_DIM)  # noqa: E731
    q, k, v, cotangent = (jax.random.normal(key, shape(n)) for key, n in
                          zip(keys, (num_queries, num_keys, num_keys, num_queries), strict=True))
    return q.astype(dtype), k.astype(dtype), v.astype(dtype), cotangent


def value_and_grads(attention, q, k, v, cotangent):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v).astype(jnp.float32) * cotangent)  # noqa: E731
    return jax.jit(lambda q, k, v: (attention(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))(q, k, v)


CASES = {  # name: (queries, keys, causal, pads in row 1)
    "hybrid_with_padding": (8, 40, True, 5),  # right-aligned causal: a bool mask
    "hybrid_prefix_0_all_masked_rows": (16, 16, True, 5),  # square: is_causal + padding; pad latents see no key
    "self_attention": (16, 16, True, None),  # square causal without padding: is_causal only
    "padding_without_causality": (8, 20, False, 20),  # row 1: no visible key at all
    "no_mask": (8, 20, False, None),
}


@pytest.mark.parametrize("case", CASES)
def test_cudnn_path_equals_dense_in_forward_and_gradients(case):
    num_queries, num_keys, causal, num_pads = CASES[case]
    q, k, v, cotangent = qkv(num_queries, num_keys)
    pad = None if num_pads is None else jnp.zeros((BATCH, num_keys), bool).at[1, :num_pads].set(True)
    mask = None if not causal and pad is None else AttentionMask(num_queries, num_keys, causal, pad)
    out, grads = value_and_grads(lambda q, k, v: cudnn_attend(q, k, v, mask), q, k, v, cotangent)
    expected_out, expected_grads = value_and_grads(
        lambda q, k, v: dense_attention(q, k, v, None if mask is None else mask.array()), q, k, v, cotangent)
    np.testing.assert_allclose(out, expected_out, rtol=0, atol=TOLERANCE)
    for name, a, e in zip("qkv", grads, expected_grads, strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-5, atol=TOLERANCE, err_msg=f"d{name}")


def test_the_masks_given_to_the_kernel():
    pad = jnp.zeros((BATCH, 16), bool).at[1, :3].set(True)
    # square causal without padding: cuDNN's own causal mask, nothing materialised
    assert mask_arguments(AttentionMask(16, 16, True), 16, 16) == (True, None)
    # square causal with padding: causal mask + the padding as a mask
    is_causal, mask = mask_arguments(AttentionMask(16, 16, True, pad), 16, 16)
    assert is_causal and mask.shape == (BATCH, 1, 1, 16)
    # right-aligned causal (JAX's causal mask is top-left aligned): a (1, 1, queries, keys) mask
    is_causal, mask = mask_arguments(AttentionMask(4, 16, True), 4, 16)
    assert not is_causal and mask.shape == (1, 1, 4, 16)
    np.testing.assert_array_equal(mask[0, 0], np.arange(16)[None] <= np.arange(4)[:, None] + 12)
    assert mask_arguments(None, 4, 16) == (False, None)


def test_bfloat16_inputs_give_the_float32_result_to_bfloat16_precision():
    q, k, v, _ = qkv(8, 40, dtype=jnp.bfloat16)
    mask = AttentionMask(8, 40, True, jnp.zeros((BATCH, 40), bool).at[1, :5].set(True))
    out = cudnn_attend(q, k, v, mask)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(f32(out), dense_attention(f32(q), f32(k), f32(v), mask.array()), atol=3e-2)


def test_auto_picks_cudnn_on_gpu_where_it_takes_the_call():
    causal = AttentionMask(512, 512, True)
    hybrid = AttentionMask(512, 1024, True)
    bf16 = dict(dtype=jnp.bfloat16, head_dim=128)
    assert resolve_attention_impl("auto", 512, 512, False, "gpu", mask=causal, **bf16) == "cudnn"
    assert resolve_attention_impl("auto", 512, 1024, False, "gpu", mask=hybrid, **bf16) == "cudnn"
    assert resolve_attention_impl("cudnn", 512, 1024, False, "gpu", mask=hybrid, **bf16) == "cudnn"
    # float32 (cuDNN takes bf16 / f16 only), odd head_dim, odd lengths with a mask: blockwise for long keys
    for kwargs, keys in ((dict(dtype=jnp.float32, head_dim=128), 4096), (dict(dtype=jnp.bfloat16, head_dim=12), 4096),
                         (bf16, 4095)):
        mask = AttentionMask(512, keys, True)
        assert resolve_attention_impl("auto", 512, keys, False, "gpu", mask=mask, **kwargs) == "blockwise"
        assert resolve_attention_impl("cudnn", 512, keys, False, "gpu", mask=mask, **kwargs) == "blockwise"
    assert resolve_attention_impl("auto", 512, 1024, False, "gpu", mask=hybrid, dtype=jnp.float32) == "xla"
    # no probability dropout in the kernel (auto: as without kernels); one query (decoding) is cheapest dense
    assert resolve_attention_impl("auto", 512, 1024, True, "gpu", mask=hybrid, **bf16) == "xla"
    assert resolve_attention_impl("cudnn", 512, 1024, True, "gpu", mask=hybrid, **bf16) == "blockwise"
    assert resolve_attention_impl("auto", 1, 1024, False, "gpu", mask=AttentionMask(1, 1024, True), **bf16) == "xla"
    assert not cudnn_supported(jnp.bfloat16, 64, 511, 1024, hybrid.__class__(511, 1024, True), "gpu")
    assert cudnn_supported(jnp.bfloat16, 64, 511, 511, AttentionMask(511, 511, True), "gpu")  # no mask: any length
    assert resolve_attention_impl("auto", 512, 1024, False, "cpu", mask=hybrid, **bf16) == "xla"


@pytest.mark.parametrize("case, tokens, prefix_len, pad_mask", [("p16", "tokens", 16, None),
                                                                ("pad_p0_edge", "pad_tokens", 0, "pad_mask"),
                                                                ("pad_p48", "pad_tokens", 48, "pad_mask")])
def test_model_logits_with_cudnn_equal_the_golden_logits(public_fixture, case, tokens, prefix_len, pad_mask):
    config, params = load_torch_checkpoint(public_fixture / "hf-safetensors")
    golden = np.load(public_fixture / "forward_cases.npz")
    model = CausalLanguageModel(config.replace(attention_impl="cudnn"))
    logits = model.apply({"params": params}, golden[tokens], prefix_len=prefix_len,
                         pad_mask=None if pad_mask is None else golden[pad_mask])
    np.testing.assert_allclose(logits, golden["logits_" + case], rtol=0, atol=1e-4, err_msg=case)
