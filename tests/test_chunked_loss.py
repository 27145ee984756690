"""The chunked cross-entropy (training/loss.py): the loss and its gradients equal the unchunked ones."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_ar_jax.training.loss import chunked_token_losses, latents_per_chunk, token_losses
from perceiver_ar_jax.training.step import eval_step, loss_sums, prefix_len_of

# float32 compute at "highest" precision, so that chunked and unchunked differ only in summation order
CONFIG = CausalLanguageModelConfig(vocab_size=97, max_seq_len=24, max_latents=10, num_channels=32, num_heads=2,
                                   num_self_attention_layers=2, cross_attention_dropout=0.0, abs_pos_emb=False,
                                   output_norm=True, output_bias=True)


def make(config=CONFIG, batch_size=3, seed=0):
    model = CausalLanguageModel(config)
    params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32), prefix_len=0)["params"])
    if config.output_bias:  # a non-zero bias, so that its gradient is checked too
        params["output_bias"] = jax.random.normal(jax.random.key(seed + 1), params["output_bias"].shape) * 0.1
    rng = np.random.default_rng(seed)
    seq = rng.integers(1, config.vocab_size, size=(batch_size, config.max_seq_len + 1))
    lengths = rng.integers(12, config.max_seq_len + 1, size=batch_size)
    pad = np.arange(config.max_seq_len)[None] < (config.max_seq_len - lengths)[:, None]
    pad[0, -3:] = False  # (a row with pad positions among the latents: see below)
    pad[0, :-3] = True
    batch = {"input_ids": jnp.asarray(np.where(pad, 0, seq[:, :-1]), jnp.int32),
             "labels": jnp.asarray(np.where(pad, 0, seq[:, 1:]), jnp.int32), "pad_mask": jnp.asarray(pad)}
    return model, params, batch


def unchunked_objective(model, params, batch, z_loss_weight):
    """The loss as it was computed before chunking: all the logits, then cross-entropy and log Z."""
    prefix_len = prefix_len_of(model, batch["input_ids"].shape[1])
    logits = model.apply({"params": params}, batch["input_ids"], prefix_len=prefix_len, pad_mask=batch["pad_mask"])
    ce, log_z = token_losses(logits, batch["labels"][:, prefix_len:])
    w = (~batch["pad_mask"][:, prefix_len:]).astype(jnp.float32)
    objective = jnp.sum(w * (ce + z_loss_weight * jnp.square(log_z))) / jnp.sum(w)  # as train_step: the mean
    return objective, (jnp.sum(w * ce), jnp.sum(w * jnp.square(log_z)))


def chunked_objective(model, params, batch, z_loss_weight, chunk_tokens):
    sums = loss_sums(model, params, batch, deterministic=True, z_loss_weight=z_loss_weight,
                     chunk_tokens=chunk_tokens)
    return sums["objective"] / sums["num_tokens"], (sums["loss_sum"], sums["z_loss_sum"])


@pytest.mark.parametrize("chunk_tokens", [0, 3, 7, 12, 10_000])  # all at once, 1, 2 (padded), 4 latents, one
@pytest.mark.parametrize("z_loss_weight", [0.0, 1e-2])
def test_chunked_loss_and_gradients_equal_the_unchunked_ones(chunk_tokens, z_loss_weight):
    model, params, batch = make()
    grad = jax.jit(jax.value_and_grad(unchunked_objective, argnums=1, has_aux=True), static_argnums=(0, 3))
    (want, (want_ce, want_z)), want_grads = grad(model, params, batch, z_loss_weight)
    grad = jax.jit(jax.value_and_grad(chunked_objective, argnums=1, has_aux=True), static_argnums=(0, 3, 4))
    (got, (got_ce, got_z)), got_grads = grad(model, params, batch, z_loss_weight, chunk_tokens)

    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(got_ce, want_ce, rtol=1e-6)
    np.testing.assert_allclose(got_z, want_z, rtol=1e-6)
    flat_want = jax.tree_util.tree_leaves_with_path(want_grads)
    flat_got = jax.tree.leaves(got_grads)
    assert len(flat_got) == len(flat_want)
    for (path, w), g in zip(flat_want, flat_got, strict=True):
        assert g.dtype == w.dtype and g.shape == w.shape, path
        np.testing.assert_allclose(g, w, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
    # the embedding's gradient has both parts: the input embedding and the tied output projection
    assert float(jnp.abs(got_grads["token_embedding"]["embedding"]).sum()) > 0


@pytest.mark.parametrize("chunk_tokens", [0, 4, 9])
def test_chunked_token_losses_equal_the_unchunked_ones_per_position(chunk_tokens):
    model, params, batch = make()
    prefix_len = prefix_len_of(model, batch["input_ids"].shape[1])
    logits = model.apply({"params": params}, batch["input_ids"], prefix_len=prefix_len, pad_mask=batch["pad_mask"])
    want_ce, want_z = token_losses(logits, batch["labels"][:, prefix_len:])
    hidden = model.apply({"params": params}, batch["input_ids"], prefix_len=prefix_len, pad_mask=batch["pad_mask"],
                         method="hidden")
    project = lambda p, rows: model.apply({"params": p}, rows, method="project")  # noqa: E731
    got_ce, got_z = jax.jit(lambda p, h, lab: chunked_token_losses(project, p, h, lab, chunk_tokens=chunk_tokens))(
        params, hidden, batch["labels"][:, prefix_len:])
    np.testing.assert_allclose(got_ce, want_ce, atol=1e-5, rtol=1e-6)
    np.testing.assert_allclose(got_z, want_z, atol=1e-5, rtol=1e-6)

    sums = jax.jit(lambda p, b: eval_step(p, b, model=model, chunk_tokens=chunk_tokens))(params, batch)
    w = ~batch["pad_mask"][:, prefix_len:]
    assert float(sums["num_tokens"]) == int(w.sum())
    np.testing.assert_allclose(sums["loss_sum"], float(jnp.sum(want_ce * w)), rtol=1e-6)


@pytest.mark.parametrize("output_bias", [True, False])  # without a bias, CPU takes the cross-entropy kernel
def test_bfloat16_compute_chunked_gradients_match_unchunked(output_bias):
    model, params, batch = make(CONFIG.replace(dtype="bfloat16", output_bias=output_bias))
    want = jax.jit(jax.grad(lambda p: unchunked_objective(model, p, batch, 0.0)[0]))(params)
    got = jax.jit(jax.grad(lambda p: chunked_objective(model, p, batch, 0.0, 6)[0]))(params)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got), strict=True):
        assert g.dtype == w.dtype
        # bf16 products round differently in another order: equal to bf16's precision, relative to each leaf
        assert float(jnp.linalg.norm(g - w)) <= 2e-2 * float(jnp.linalg.norm(w)) + 1e-6


def test_latents_per_chunk_splits_the_rows_over_the_batch():
    assert latents_per_chunk(4, 512, 2048) == 512
    assert latents_per_chunk(256, 512, 2048) == 8
    assert latents_per_chunk(4096, 512, 2048) == 1  # at least one latent position
    assert latents_per_chunk(2, 512, 0) == 512  # 0: all at once


def test_no_chunk_of_logits_is_larger_than_asked_in_the_compiled_train_step():
    """The (batch, latents, vocab) logits are never a buffer of the compiled gradient: its largest array with
    the vocabulary as a dimension holds at most one chunk of rows."""
    model, params, batch = make(CONFIG.replace(vocab_size=1009), batch_size=4)
    f = jax.jit(jax.grad(lambda p: chunked_objective(model, p, batch, 0.0, 8)[0]))
    hlo = f.lower(params).compile().as_text()
    assert "f32[4,10,1009]" not in hlo
    assert "f32[4,2,1009]" in hlo  # 8 rows over a batch of 4: 2 latents per chunk
