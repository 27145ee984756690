"""Decoding gives the same tokens with every attention implementation (xla, blockwise, splash in Pallas interpret
mode, cudnn through JAX's XLA implementation), in both cache modes, and no kernel ever gets a decoding mask.

The kernels implement only a full forward pass's masks (right-aligned causal + key padding, `masks.AttentionMask`);
decoding's ring-buffer masks are bool arrays, which `dispatch.py` sends to the dense or blockwise path. The
prompts fill the window and slide it, and the batch is left-padded with a pad token among the latents.
"""

import numpy as np
import pytest

from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_ar_jax.model.attention import cudnn, splash
from perceiver_ar_jax.sampling import generate
from tests.test_sampling import NEW_TOKENS, NUM_LATENTS, PROMPT_LEN, SMALL, noisy_params, padded_prompts

CASES = [("exact", False), ("exact", True), ("perceiver-io", False)]  # (cache mode, abs_pos_emb)
KERNELS = {"splash": (splash, "splash_attend"), "cudnn": (cudnn, "cudnn_attend")}


def decode(config, impl, cache, **kwargs):
    params = noisy_params(config)  # the same parameters for every implementation
    ids, attention_mask = padded_prompts(config)
    model = CausalLanguageModel(config.replace(attention_impl=impl))
    tokens, logits = generate(model, params, ids, attention_mask, num_latents=NUM_LATENTS,
                              max_new_tokens=NEW_TOKENS, cache=cache, return_logits=True, chunk_size=3, **kwargs)
    return np.asarray(tokens), np.asarray(logits)


def count_kernel_calls(monkeypatch, impl):
    """Patch the kernel entry of `impl` to count its calls (at trace time); returns the list it appends to."""
    calls = []
    if impl in KERNELS:
        module, name = KERNELS[impl]
        kernel = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, **kwargs: calls.append(1) or kernel(*args, **kwargs))
    return calls


@pytest.fixture(scope="module")
def xla_results():
    return {(cache, abs_pos): decode(CausalLanguageModelConfig(**SMALL, abs_pos_emb=abs_pos), "xla", cache)
            for cache, abs_pos in CASES}


def test_the_prompts_fill_slide_and_pad_the_window():
    config = CausalLanguageModelConfig(**SMALL)
    ids, attention_mask = padded_prompts(config)
    assert PROMPT_LEN + NEW_TOKENS > config.max_seq_len  # the window slides
    # a row whose first latent (of NUM_LATENTS) is a pad token
    assert (attention_mask[:, PROMPT_LEN - NUM_LATENTS] == 0).any() and (attention_mask == 0).any(axis=1).sum() >= 2


@pytest.mark.parametrize("impl", ["blockwise", "splash", "cudnn"])
@pytest.mark.parametrize("cache, abs_pos", CASES)
def test_decoding_gives_the_same_tokens_with_every_attention_impl(xla_results, monkeypatch, impl, cache, abs_pos):
    config = CausalLanguageModelConfig(**SMALL, abs_pos_emb=abs_pos)
    calls = count_kernel_calls(monkeypatch, impl)
    tokens, logits = decode(config, impl, cache)
    expected_tokens, expected_logits = xla_results[(cache, abs_pos)]
    np.testing.assert_array_equal(tokens, expected_tokens)
    np.testing.assert_allclose(logits, expected_logits, rtol=0, atol=1e-5)
    assert calls == []  # decoding's masks never reach a kernel


@pytest.mark.parametrize("impl", ["splash", "cudnn"])
def test_the_kernels_do_run_in_a_full_forward_pass(monkeypatch, impl):
    """The control for the test above: the same model's forward pass does use the kernel, and agrees with xla."""
    config = CausalLanguageModelConfig(**SMALL, abs_pos_emb=False)
    params = noisy_params(config)
    ids, attention_mask = padded_prompts(config)
    calls = count_kernel_calls(monkeypatch, impl)
    logits = CausalLanguageModel(config.replace(attention_impl=impl)).apply(
        {"params": params}, ids, prefix_len=4, pad_mask=attention_mask == 0)
    expected = CausalLanguageModel(config.replace(attention_impl="xla")).apply(
        {"params": params}, ids, prefix_len=4, pad_mask=attention_mask == 0)
    assert len(calls) == 1 + config.num_self_attention_layers
    np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-5)
