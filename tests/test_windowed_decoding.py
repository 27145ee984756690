"""The "windowed" cache mode: latents grow by cached steps, and when there are more than max_latents a forward
pass over the last max_prefix_len + reset_fill tokens resets them to reset_fill. Every step's logits must equal
the model's full forward over that step's window with that step's number of latents."""

import numpy as np
import pytest

from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_ar_jax.sampling import GenerationConfig, generate
from tests.test_sampling import SMALL, noisy_params, padded_prompts

PROMPT_LEN, NUM_LATENTS = 10, 2


def windowed_schedule(config: CausalLanguageModelConfig, prompt_len: int, num_latents: int, new_tokens: int,
                      reset_fill: int) -> list[tuple[int, int]]:
    """(window start, latents) of the forward pass behind each step's logits, written out independently: the prompt
    with its latents, then one more latent per token; past max_latents the window restarts max_prefix_len tokens
    before the last reset_fill tokens."""
    start, latents, schedule = 0, min(num_latents, prompt_len), []
    for step in range(new_tokens):
        n = prompt_len + step  # tokens the step's forward reads
        if step > 0:
            latents += 1
            if latents > config.max_latents:
                latents = reset_fill
                start = max(0, n - reset_fill - config.max_prefix_len)
        schedule.append((start, latents))
    return schedule


def full_forward_logits(model, params, sequences, pad, schedule, prompt_len):
    """The last position's logits of the model's forward over each step's window."""
    out = []
    for step, (start, latents) in enumerate(schedule):
        n = prompt_len + step
        logits = model.apply({"params": params}, sequences[:, start:n], prefix_len=n - start - latents,
                             pad_mask=pad[:, start:n])
        out.append(np.asarray(logits[:, -1]))
    return np.stack(out, axis=1)


@pytest.mark.parametrize("abs_pos_emb, reset_fill, pads", [
    (False, None, (0, 3, 9)),  # the third row's first latent is a pad until the first reset
    (True, None, (0, 3, 9)),
    (False, 1, (0, 0, 0)),
    (True, 4, (2, 0, 5)),  # reset_fill = max_latents: a reset at every step once the latents are full
])
def test_every_step_equals_a_full_forward_over_its_window(abs_pos_emb, reset_fill, pads):
    config = CausalLanguageModelConfig(**SMALL, abs_pos_emb=abs_pos_emb)
    model, params = CausalLanguageModel(config), noisy_params(config, seed=5)
    ids, attention_mask = padded_prompts(config, pads=pads)
    new_tokens = 16  # the latents fill, a reset, they fill again, more resets: the window slides past the pads
    gen = GenerationConfig(num_latents=NUM_LATENTS, max_new_tokens=new_tokens, cache="windowed",
                           reset_fill=reset_fill, chunk_size=3)
    sequences, logits = generate(model, params, ids, attention_mask, config=gen, return_logits=True)
    sequences = np.asarray(sequences)
    pad = np.concatenate([attention_mask == 0, np.zeros((len(ids), new_tokens), bool)], axis=1)
    schedule = windowed_schedule(config, PROMPT_LEN, NUM_LATENTS, new_tokens, gen.reset_fill_for(config))
    assert sum(b[1] <= a[1] for a, b in zip(schedule[:-1], schedule[1:], strict=True)) >= 2  # two resets or more
    assert schedule[-1][0] > max(pads)  # the window has slid past every pad
    expected = full_forward_logits(model, params, sequences, pad, schedule, PROMPT_LEN)
    np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=0)
    np.testing.assert_array_equal(sequences[:, PROMPT_LEN:], np.asarray(logits).argmax(-1))


def test_default_reset_fill_is_flaxformers():
    config = CausalLanguageModelConfig(**SMALL)
    assert GenerationConfig().reset_fill_for(config) == 2  # max(4 - 128, 4 // 2, 1)
    assert GenerationConfig().reset_fill_for(config.replace(max_latents=512, max_seq_len=1024)) == 384
    assert GenerationConfig().reset_fill_for(config.replace(max_latents=256, max_seq_len=1024)) == 128
    assert GenerationConfig(reset_fill=3).reset_fill_for(config) == 3


def test_reset_fill_out_of_range_is_refused():
    config = CausalLanguageModelConfig(**SMALL)
    model, params = CausalLanguageModel(config), noisy_params(config)
    with pytest.raises(ValueError, match=r"reset_fill=5 out of valid range \[1..4\]"):
        generate(model, params, np.ones((1, 5), np.int32), cache="windowed", reset_fill=5)
    with pytest.raises(ValueError, match=r"reset_fill=0 out of valid range"):
        generate(model, params, np.ones((1, 5), np.int32), cache="windowed", reset_fill=0)


def test_windowed_equals_exact_while_the_latents_grow():
    """Before the first reset both modes compute the same forward passes."""
    config = CausalLanguageModelConfig(**SMALL, abs_pos_emb=False)
    model, params = CausalLanguageModel(config), noisy_params(config, seed=2)
    ids, attention_mask = padded_prompts(config, pads=(0, 3, 1))
    runs = {mode: generate(model, params, ids, attention_mask, num_latents=1, max_new_tokens=4, cache=mode,
                           return_logits=True) for mode in ("windowed", "exact")}
    np.testing.assert_array_equal(runs["windowed"][0], runs["exact"][0])
    np.testing.assert_allclose(runs["windowed"][1], runs["exact"][1], atol=1e-5, rtol=0)
