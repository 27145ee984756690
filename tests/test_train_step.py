"""The pure train/eval steps, the optimizer and the learning-rate schedule."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_ar_jax.training import optimizer as optim
from perceiver_ar_jax.training.step import TrainState, eval_step, loss_sums, split_microbatches
from perceiver_ar_jax.training.step import train_step as _train_step

TINY = CausalLanguageModelConfig(vocab_size=50, max_seq_len=24, max_latents=8, num_channels=32, num_heads=2,
                                 num_self_attention_layers=2, cross_attention_dropout=0.0, abs_pos_emb=False)


def train_step(state, batch, **static):
    """train_step compiled, as the training loop runs it (eager op-by-op execution is far slower)."""
    return jax.jit(_train_step, static_argnames=tuple(static))(state, batch, **static)


def opt_config(**overrides):
    values = dict(learning_rate=1e-2, warmup_steps=2, num_train_steps=10, lr_min_fraction=0.1, adam_b1=0.9,
                  adam_b2=0.999, adam_eps=1e-8, weight_decay=0.01, max_grad_norm=1.0)
    values.update(overrides)
    return ml_collections.ConfigDict(values)


def batch(batch_size=4, seq_len=24, seed=0, min_len=10, lengths=None):
    rng = np.random.default_rng(seed)
    seq = rng.integers(1, TINY.vocab_size, size=(batch_size, seq_len + 1))
    lengths = rng.integers(min_len, seq_len + 1, size=batch_size) if lengths is None else np.asarray(lengths)
    pad = np.arange(seq_len)[None] < (seq_len - lengths)[:, None]
    return {"input_ids": jnp.asarray(np.where(pad, 0, seq[:, :-1]), jnp.int32),
            "labels": jnp.asarray(np.where(pad, 0, seq[:, 1:]), jnp.int32), "pad_mask": jnp.asarray(pad)}


def new_state(config=TINY, optimizer=None, seed=0):
    model = CausalLanguageModel(config)
    params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32), prefix_len=0)["params"])
    optimizer = optimizer or optim.make_optimizer(opt_config())
    return model, optimizer, TrainState(step=jnp.zeros((), jnp.int32), params=params,
                                        opt_state=optimizer.init(params), rng=jax.random.key_data(jax.random.key(1)))


# ----------------------------------------------------------------------------------------------------------------
def torch_cosine_with_warmup(step, training_steps, warmup_steps, min_fraction, num_cycles=0.5):
    """perceiver/scripts/lrs.py CosineWithWarmupLR's lr_lambda, transcribed."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    progress = float(step - warmup_steps) / float(max(1, training_steps - warmup_steps))
    return min_fraction + max(0.0, 0.5 * (1.0 - min_fraction) * (1.0 + math.cos(math.pi * num_cycles * 2.0 * progress)))


@pytest.mark.parametrize("warmup,total,min_fraction", [(1000, 50_000, 0.1), (0, 100, 0.0), (7, 30, 0.25)])
def test_schedule_is_perceiver_io_cosine_with_warmup(warmup, total, min_fraction):
    schedule = optim.cosine_with_warmup_schedule(3e-4, warmup, total, min_fraction)
    steps = sorted({0, 1, warmup // 2, max(warmup - 1, 0), warmup, warmup + 1, (warmup + total) // 2, total - 1,
                    total})
    got = np.array([float(schedule(s)) for s in steps])
    want = np.array([3e-4 * torch_cosine_with_warmup(s, total, warmup, min_fraction) for s in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=3e-10)  # float32 near 0
    assert float(schedule(0)) == 0.0 or warmup == 0  # the first update of a warmup has learning rate 0, as in torch
    assert float(schedule(total)) == pytest.approx(3e-4 * min_fraction, rel=1e-5)


def test_schedule_rejects_out_of_range_values():
    with pytest.raises(ValueError, match="min_fraction=1.5"):
        optim.cosine_with_warmup_schedule(1e-3, 10, 100, 1.5)
    with pytest.raises(ValueError, match="learning_rate=0"):
        optim.make_optimizer(opt_config(learning_rate=0))


def test_loss_is_mean_cross_entropy_over_non_pad_latent_positions():
    model, _, state = new_state()
    b = batch(lengths=[24, 5, 12, 3])  # two rows shorter than the 8 latents: pads among the latent positions
    prefix = 24 - TINY.max_latents
    logits = jax.jit(model.apply, static_argnames="prefix_len")({"params": state.params}, b["input_ids"],
                                                                prefix_len=prefix, pad_mask=b["pad_mask"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    labels = np.asarray(b["labels"])[:, prefix:]
    keep = ~np.asarray(b["pad_mask"])[:, prefix:]
    ce = -np.take_along_axis(np.asarray(logp), labels[..., None], axis=-1)[..., 0]
    sums = jax.jit(lambda p, b: loss_sums(model, p, b, deterministic=True))(state.params, b)
    assert float(sums["num_tokens"]) == keep.sum() < keep.size  # some latent positions are pads
    np.testing.assert_allclose(float(sums["loss_sum"]), ce[keep].sum(), rtol=1e-5)
    evaluated = jax.jit(lambda p, b: eval_step(p, b, model=model))(state.params, b)
    np.testing.assert_allclose(float(evaluated["loss_sum"]), ce[keep].sum(), rtol=1e-5)


def test_train_step_applies_clipped_adamw_to_the_loss_gradient():
    """Two steps at a nonzero learning rate, both clipped (by different factors, so the moments see the clipped
    gradients), against torch's clip_grad_norm_ + AdamW written out in float64 numpy."""
    config = opt_config(warmup_steps=0, learning_rate=1e-2, max_grad_norm=0.05, weight_decay=0.1)
    optimizer = optim.make_optimizer(config)
    model, _, state = new_state(optimizer=optimizer)
    batches = [batch(seed=0), batch(seed=1)]
    step = jax.jit(lambda s, b: _train_step(s, b, model=model, optimizer=optimizer))
    # "objective" is the differentiable sum (loss_sum is a metric, its gradient stopped)
    grad = jax.jit(jax.grad(lambda p, b: (lambda s: s["objective"] / s["num_tokens"])(
        loss_sums(model, p, b, deterministic=True))))

    params = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]
    m, v = [np.zeros_like(x) for x in params], [np.zeros_like(x) for x in params]
    b1, b2, eps, wd = config.adam_b1, config.adam_b2, config.adam_eps, config.weight_decay
    schedule = optim.make_schedule(config)
    unclipped = None
    for t, b in enumerate(batches, start=1):
        grads = [np.asarray(g, np.float64) for g in jax.tree.leaves(grad(state.params, b))]
        norm = np.sqrt(sum((g ** 2).sum() for g in grads))
        state, metrics = step(state, b)
        np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-5)  # reported before clipping
        assert norm > config.max_grad_norm  # the clipping acts
        clipped = [g * config.max_grad_norm / norm for g in grads]
        lr = float(schedule(t - 1))
        assert lr > 0
        if t == 2:  # what the second step would give without clipping: must differ from what we check
            um = [b1 * mi + (1 - b1) * g for mi, g in zip(m, grads, strict=True)]
            uv = [b2 * vi + (1 - b2) * g ** 2 for vi, g in zip(v, grads, strict=True)]
            unclipped = [p - lr * (mi / (1 - b1 ** t) / (np.sqrt(vi / (1 - b2 ** t)) + eps) + wd * p)
                         for p, mi, vi in zip(params, um, uv, strict=True)]
        m = [b1 * mi + (1 - b1) * g for mi, g in zip(m, clipped, strict=True)]
        v = [b2 * vi + (1 - b2) * g ** 2 for vi, g in zip(v, clipped, strict=True)]
        params = [p - lr * (mi / (1 - b1 ** t) / (np.sqrt(vi / (1 - b2 ** t)) + eps) + wd * p)
                  for p, mi, vi in zip(params, m, v, strict=True)]
    assert int(state.step) == 2
    got = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]
    for ours, expected in zip(got, params, strict=True):
        np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)  # float32: 1e-4 of the lr
    # the same tolerance tells the update without clipping apart
    assert not all(np.allclose(ours, other, rtol=1e-4, atol=1e-6) for ours, other in zip(got, unclipped, strict=True))


def test_the_first_warmup_step_has_learning_rate_zero():
    """perceiver-io's LambdaLR: update 0 of a warmup multiplies by 0/warmup_steps, so parameters do not move."""
    model, optimizer, state = new_state()
    new, _ = train_step(state, batch(), model=model, optimizer=optimizer)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), new.params, state.params)
    newer, _ = train_step(new, batch(seed=1), model=model, optimizer=optimizer)
    assert not np.array_equal(newer.params["token_embedding"]["embedding"], new.params["token_embedding"]["embedding"])


def test_gradient_accumulation_matches_one_big_batch():
    # plain SGD with rate 1: the parameter change is exactly the accumulated gradient
    model, optimizer, state = new_state(optimizer=optax.sgd(1.0))
    b = batch(batch_size=8, lengths=[24, 5, 12, 3, 20, 9, 24, 16])
    one, m1 = train_step(state, b, model=model, optimizer=optimizer)
    four, m4 = train_step(state, b, model=model, optimizer=optimizer, num_microbatches=4)
    np.testing.assert_allclose(float(m4["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m4["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    jax.tree.map(lambda a, b, p: np.testing.assert_allclose(p - a, p - b, rtol=1e-4, atol=1e-8), four.params,
                 one.params, state.params)


def test_microbatches_take_interleaved_rows():
    x = jnp.arange(12).reshape(6, 2)
    split = split_microbatches({"x": x}, 3)["x"]
    assert split.shape == (3, 2, 2)
    np.testing.assert_array_equal(split[1], x[1::3])
    with pytest.raises(ValueError, match="not divisible by num_microbatches"):
        split_microbatches({"x": x}, 4)


def test_z_loss_adds_mean_squared_log_normaliser():
    model, optimizer, state = new_state(optimizer=optim.make_optimizer(opt_config(warmup_steps=0)))
    b = batch()
    _, plain = train_step(state, b, model=model, optimizer=optimizer)
    _, with_z = train_step(state, b, model=model, optimizer=optimizer, z_loss_weight=1e-2)
    prefix = 24 - TINY.max_latents
    logits = jax.jit(model.apply, static_argnames="prefix_len")({"params": state.params}, b["input_ids"],
                                                                prefix_len=prefix, pad_mask=b["pad_mask"])
    keep = ~np.asarray(b["pad_mask"])[:, prefix:]
    log_z = np.asarray(jax.nn.logsumexp(logits, axis=-1))
    np.testing.assert_allclose(float(with_z["z_loss"]), (log_z[keep] ** 2).mean(), rtol=1e-5)
    assert float(with_z["loss"]) == pytest.approx(float(plain["loss"]), rel=1e-6)  # the reported loss is the CE
    assert float(with_z["grad_norm"]) != pytest.approx(float(plain["grad_norm"]), rel=1e-4)


def test_prefix_dropout_draws_from_the_step_rng():
    config = TINY.replace(cross_attention_dropout=0.5)
    model, optimizer, state = new_state(config)
    b = batch(min_len=24)
    _, m_a = train_step(state, b, model=model, optimizer=optimizer)
    _, m_b = train_step(state, b, model=model, optimizer=optimizer)
    _, m_c = train_step(state.replace(step=state.step + 1), b, model=model, optimizer=optimizer)
    assert float(m_a["loss"]) == float(m_b["loss"])  # deterministic given state
    assert float(m_a["loss"]) != float(m_c["loss"])  # another step drops other prefix positions
    eval_loss = jax.jit(lambda p, b: eval_step(p, b, model=model))(state.params, b)  # evaluation: whole prefix
    assert float(eval_loss["loss_sum"]) / float(eval_loss["num_tokens"]) != float(m_a["loss"])


def noisy(params, seed=0):
    """Parameters with large random values: logits far from uniform, so the loss is far from ln(vocab)."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + jax.random.normal(k, x.shape) * (0.3 if x.ndim == 1 else x.shape[0] ** -0.5)
                                        for x, k in zip(leaves, keys, strict=True)])


def test_bfloat16_compute_keeps_float32_parameters_and_gives_the_float32_loss_and_gradient():
    # SGD with rate 1: the first parameter change is the gradient, so the gradients are compared too; its momentum
    # is float optimizer state
    sgd = optax.sgd(1.0, momentum=0.9)
    _, _, start = new_state(optimizer=sgd)
    start = start.replace(params=noisy(start.params))
    b = batch(min_len=20)
    results = {}
    for dtype in ("float32", "bfloat16"):
        model = CausalLanguageModel(TINY.replace(dtype=dtype))
        state = start.replace(opt_state=sgd.init(start.params))
        new, metrics = train_step(state, b, model=model, optimizer=sgd)
        assert {x.dtype for x in jax.tree.leaves(new.params)} == {jnp.dtype(jnp.float32)}
        assert {x.dtype for x in jax.tree.leaves(new.opt_state)} == {jnp.dtype(jnp.float32)}
        delta = np.concatenate([np.ravel(np.asarray(a) - np.asarray(p)) for a, p in
                                zip(jax.tree.leaves(new.params), jax.tree.leaves(start.params), strict=True)])
        results[dtype] = float(metrics["loss"]), delta
    (loss32, grad32), (loss16, grad16) = results["float32"], results["bfloat16"]
    assert abs(loss32 - math.log(TINY.vocab_size)) > 1.0  # a loss that says something about the weights
    assert loss16 == pytest.approx(loss32, rel=2e-2)
    assert np.linalg.norm(grad16 - grad32) < 0.05 * np.linalg.norm(grad32)


def test_sequence_shorter_than_latents_is_rejected():
    model, optimizer, state = new_state()
    with pytest.raises(ValueError, match="must be >= max_latents"):
        train_step(state, batch(seq_len=6, min_len=6), model=model, optimizer=optimizer)
