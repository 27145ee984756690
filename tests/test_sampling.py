"""Generation: perceiver-io's cached generate reproduced token for token, the exact mode against a full forward
pass at every step, sampling filters and seeds, EOS, bucketing, streaming, the text pipeline and sample.py."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from perceiver_ar_jax.convert import load_torch_checkpoint
from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_ar_jax.sampling import (
    Decoding,
    GenerationConfig,
    Generator,
    Sampler,
    SamplingArgs,
    generate,
    next_token,
    nucleus_filter,
)
from tests.conftest import REPO

# max_prefix_len 12: a 10-token prompt with 2 latents grows its latents for 2 steps, its prefix for 4, then slides
SMALL = dict(vocab_size=61, max_seq_len=16, max_latents=4, num_channels=32, num_heads=2, num_self_attention_layers=2,
             output_norm=True, cross_attention_dropout=0.0)
PROMPT_LEN, NUM_LATENTS, NEW_TOKENS = 10, 2, 10
PADS = (0, 3, 9)  # the third row's first latent is a pad token: it attends uniformly to the whole window


def noisy_params(config: CausalLanguageModelConfig, seed: int = 0):
    """Random params with large values, so that logits vary strongly and every parameter matters."""
    model = CausalLanguageModel(config)
    params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32), prefix_len=0)["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    noisy = [leaf + jax.random.normal(k, leaf.shape) * (0.3 if leaf.ndim == 1 else leaf.shape[0] ** -0.5)
             for leaf, k in zip(leaves, keys, strict=True)]
    return jax.tree.unflatten(treedef, noisy)


def padded_prompts(config, pads=PADS, seq_len=PROMPT_LEN, seed=0):
    ids = np.random.default_rng(seed).integers(1, config.vocab_size, (len(pads), seq_len))
    attention_mask = (np.arange(seq_len)[None] >= np.asarray(pads)[:, None]).astype(np.int32)
    return np.where(attention_mask == 1, ids, 0), attention_mask


@pytest.fixture(scope="module")
def small():
    config = CausalLanguageModelConfig(**SMALL, abs_pos_emb=False)
    return CausalLanguageModel(config), noisy_params(config)


@pytest.fixture(scope="module")
def fixture_model(public_fixture):
    config, params = load_torch_checkpoint(public_fixture / "hf-safetensors")
    return CausalLanguageModel(config), params


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, public_fixture):
    """The public fixture converted to our model directory, with its tokenizer."""
    out = tmp_path_factory.mktemp("sampling") / "model"
    subprocess.run([sys.executable, "-m", "perceiver_ar_jax.convert", str(public_fixture / "hf-safetensors"),
                    str(out)], check=True, capture_output=True, cwd=REPO)
    return out


# ------------------------------------------------------------------------------------------------ cache modes
@pytest.mark.parametrize("case", ["prompt10_latents1", "prompt30_latents16", "batch2_leftpad4_latents4"])
def test_perceiver_io_mode_reproduces_generate_cases(public_fixture, fixture_model, case):
    cases = {c["name"]: c for c in json.loads((public_fixture / "generate_cases.json").read_text())["cases"]}
    c = cases[case]
    model, params = fixture_model
    out = generate(model, params, np.asarray(c["input_ids"]), c["attention_mask"], num_latents=c["num_latents"],
                   max_new_tokens=c["max_new_tokens"], cache="perceiver-io")
    assert np.asarray(out).tolist() == c["output_ids"]


def uncached_next_token_logits(model, params, sequences, pad, prompt_len, num_latents, step):
    """The model's full forward over the window of step `step` (perceiver-io's schedule): last position's logits."""
    cfg = model.config
    n = prompt_len + step
    window = min(n, cfg.max_seq_len)
    latents = min(min(num_latents, prompt_len) + step, cfg.max_latents)
    logits = model.apply({"params": params}, sequences[:, n - window:n], prefix_len=window - latents,
                         pad_mask=pad[:, n - window:n])
    return np.asarray(logits[:, -1])


@pytest.mark.parametrize("abs_pos_emb", [False, True])
def test_exact_mode_matches_a_full_forward_at_every_step(abs_pos_emb):
    config = CausalLanguageModelConfig(**SMALL, abs_pos_emb=abs_pos_emb)
    model, params = CausalLanguageModel(config), noisy_params(config)
    ids, attention_mask = padded_prompts(config)
    sequences, logits = generate(model, params, ids, attention_mask, num_latents=NUM_LATENTS,
                                 max_new_tokens=NEW_TOKENS, return_logits=True, chunk_size=3, cache="exact")
    sequences = np.asarray(sequences)
    pad = np.concatenate([attention_mask == 0, np.zeros((len(ids), NEW_TOKENS), bool)], axis=1)
    # the schedule crosses max_latents (step 2), the longest prefix (step 6) and the sliding window (steps 7..)
    assert PROMPT_LEN + NEW_TOKENS - 1 > config.max_seq_len and NUM_LATENTS + 2 == config.max_latents
    for step in range(NEW_TOKENS):
        expected = uncached_next_token_logits(model, params, sequences, pad, PROMPT_LEN, NUM_LATENTS, step)
        np.testing.assert_allclose(np.asarray(logits[:, step]), expected, atol=1e-4, rtol=0, err_msg=f"step {step}")
    np.testing.assert_array_equal(sequences[:, PROMPT_LEN:], np.asarray(logits).argmax(-1))


def test_bucketing_and_chunked_prefill_do_not_change_results(small):
    model, params = small
    ids, attention_mask = padded_prompts(model.config)
    kwargs = dict(num_latents=NUM_LATENTS, max_new_tokens=NEW_TOKENS, return_logits=True)
    bucketed, bucketed_logits = generate(model, params, ids, attention_mask, chunk_size=3, **kwargs)
    exact_len, exact_len_logits = generate(model, params, ids, attention_mask, bucket=False, **kwargs)
    assert Decoding(model.config, ids, attention_mask).state.prompt_ids.shape[1] == 16  # 6 bucket pads
    np.testing.assert_array_equal(bucketed, exact_len)
    np.testing.assert_allclose(bucketed_logits, exact_len_logits, atol=1e-5, rtol=0)


def test_validation_errors_name_the_valid_range(small):
    model, params = small
    ids = np.ones((1, 5), np.int32)
    with pytest.raises(ValueError, match=r"num_latents=0 out of valid range \[1..4\]"):
        generate(model, params, ids, num_latents=0)
    with pytest.raises(ValueError, match=r"num_latents=5 out of valid range \[1..4\]"):
        generate(model, params, ids, num_latents=5)
    with pytest.raises(ValueError, match=r"Input sequence length 17 out of valid range \[1..16\]"):
        generate(model, params, np.ones((1, 17), np.int32))
    # 15 tokens with 2 latents: prefix 13 > max_prefix_len 12
    with pytest.raises(ValueError, match=r"length=15, num_latents must be in range \[3..4\]"):
        generate(model, params, np.ones((1, 15), np.int32), num_latents=2)
    with pytest.raises(ValueError, match="cache="):
        generate(model, params, ids, cache="none")
    with pytest.raises(ValueError, match="top_p"):
        generate(model, params, ids, do_sample=True, top_p=1.5)


@pytest.mark.parametrize("setting, message", [
    (dict(top_k=-1), "top_k=-1 out of valid range: must be None (all tokens) or an integer >= 1"),
    (dict(top_p=0.0), "top_p=0.0 out of valid range: must be None (off) or in (0, 1]"),
    (dict(temperature=0.0), "temperature=0.0 out of valid range: must be a number > 0"),
    (dict(cache="none"), "cache='none' out of valid range: must be a cache mode"),
])
def test_generation_settings_are_checked_once_the_same_for_every_entry_point(small, model_dir, tmp_path, setting,
                                                                             message):
    model, params = small
    ids = np.ones((1, 5), np.int32)
    with pytest.raises(ValueError) as direct:
        GenerationConfig(do_sample=True, **setting)
    assert message in str(direct.value)
    with pytest.raises(ValueError) as via_generate:
        generate(model, params, ids, do_sample=True, **setting)
    with pytest.raises(ValueError) as via_config:
        generate(model, params, ids, config=GenerationConfig().replace(do_sample=True, **setting))
    generator = Generator.from_pretrained(model_dir)
    with pytest.raises(ValueError) as via_generator:
        generator("Hello", do_sample=True, **setting)
    assert str(via_generate.value) == str(via_config.value) == str(via_generator.value) == str(direct.value)
    flag, value = next(iter(setting.items()))
    proc = run_sample_py("--checkpoint", model_dir, "--prompt", "Hello", f"--{flag}", value, tmp_path=tmp_path)
    assert proc.returncode != 0 and proc.stderr.strip() == f"error: {direct.value}", proc.stderr


def test_top_k_zero_means_all_tokens_everywhere():
    assert GenerationConfig(top_k=0).top_k is None


# ------------------------------------------------------------------------------------------------ sampling
def test_nucleus_filter_keeps_the_smallest_set_reaching_top_p():
    probs = np.array([[0.5, 0.3, 0.1, 0.06, 0.04]])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    kept = lambda p: np.isfinite(np.asarray(nucleus_filter(logits, jnp.float32(p))))[0].tolist()  # noqa: E731
    assert kept(0.5) == [True, False, False, False, False]
    assert kept(0.55) == [True, True, False, False, False]
    assert kept(0.85) == [True, True, True, False, False]
    assert kept(0.0) == [True, False, False, False, False]  # the most likely token always stays
    assert all(kept(1.0))


def test_greedy_choice_is_the_argmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 50)), jnp.float32)
    args = SamplingArgs(jnp.float32(1.0), jnp.float32(1.0), jnp.int32(-1), jnp.int32(0))
    chosen = next_token(logits, jax.random.key(0), Sampler(False, None, False), args)
    np.testing.assert_array_equal(chosen, np.argmax(logits, axis=-1))


def sample(small, **kwargs):
    model, params = small
    ids, attention_mask = padded_prompts(model.config)
    return generate(model, params, ids, attention_mask, num_latents=NUM_LATENTS, max_new_tokens=NEW_TOKENS,
                    do_sample=True, **kwargs)


def test_seeded_sampling_is_reproducible(small):
    first = np.asarray(sample(small, top_k=3, temperature=2.0, rng=7))
    np.testing.assert_array_equal(first, sample(small, top_k=3, temperature=2.0, rng=jax.random.key(7)))
    assert not np.array_equal(first, sample(small, top_k=3, temperature=2.0, rng=8))


def test_top_k_never_emits_a_token_outside_the_top_k(small):
    sequences, logits = sample(small, top_k=3, temperature=2.0, rng=1, return_logits=True)
    new = np.asarray(sequences)[:, PROMPT_LEN:]
    top3 = np.argsort(-np.asarray(logits), axis=-1)[..., :3]
    assert (new[..., None] == top3).any(-1).all()
    assert len(np.unique(new)) > len(np.unique(np.argmax(logits, -1)))  # it does sample, not just argmax


def test_top_p_never_emits_a_token_outside_the_nucleus(small):
    temperature, top_p = 1.5, 0.6
    sequences, logits = sample(small, top_p=top_p, temperature=temperature, rng=2, return_logits=True)
    new = np.asarray(sequences)[:, PROMPT_LEN:]
    probs = np.asarray(jax.nn.softmax(np.asarray(logits) / temperature, axis=-1), np.float64)
    order = np.argsort(-probs, axis=-1)
    sorted_probs = np.take_along_axis(probs, order, -1)
    before = np.cumsum(sorted_probs, -1) - sorted_probs  # probability of the more likely tokens
    rank = np.argmax(order == new[..., None], axis=-1)
    assert (np.take_along_axis(before, rank[..., None], -1)[..., 0] < top_p + 1e-6).all()


def test_streaming_in_segments_gives_the_same_tokens_as_one_call(small):
    model, params = small
    ids, attention_mask = padded_prompts(model.config)
    kwargs = dict(num_latents=NUM_LATENTS, max_new_tokens=NEW_TOKENS, do_sample=True, top_k=3, temperature=2.0, rng=7)
    segmented = Decoding(model.config, ids, attention_mask, **kwargs)
    stops = []
    while not segmented.done:
        segmented.advance(params, int(segmented.state.step) + 3)
        stops.append(int(segmented.state.step))
    assert stops == [3, 6, 9, 10]
    np.testing.assert_array_equal(segmented.sequences(), sample(small, top_k=3, temperature=2.0, rng=7))


def test_rows_stop_at_eos_and_are_padded_after_it(small):
    model, params = small
    ids, attention_mask = padded_prompts(model.config)
    kwargs = dict(num_latents=NUM_LATENTS, max_new_tokens=NEW_TOKENS, return_logits=True, chunk_size=3)
    greedy = np.asarray(generate(model, params, ids, attention_mask, **kwargs)[0])[:, PROMPT_LEN:]
    eos = int(greedy[0, 3])
    stopped = generate(model, params, ids, attention_mask, eos_token_id=eos, pad_token_id=60, **kwargs)[0]
    stopped = np.asarray(stopped)[:, PROMPT_LEN:]
    for row, expected in zip(stopped, greedy, strict=True):
        hits = np.flatnonzero(expected == eos)
        end = hits[0] + 1 if hits.size else NEW_TOKENS
        np.testing.assert_array_equal(row[:end], expected[:end])
        assert (row[end:] == 60).all()
    assert (stopped[0, 4:] == 60).all()


def test_num_return_sequences_repeats_each_prompt(small):
    model, params = small
    ids, attention_mask = padded_prompts(model.config, pads=(0, 2))
    out = np.asarray(generate(model, params, ids, attention_mask, num_latents=NUM_LATENTS, max_new_tokens=4,
                              do_sample=True, rng=3, num_return_sequences=3))
    assert out.shape == (6, PROMPT_LEN + 4)
    np.testing.assert_array_equal(out[:3, :PROMPT_LEN], np.repeat(ids[:1], 3, 0))
    np.testing.assert_array_equal(out[3:, :PROMPT_LEN], np.repeat(ids[1:], 3, 0))


# ------------------------------------------------------------------------------------------------ text, CLI
def test_generator_continues_a_text_prompt(model_dir):
    generator = Generator.from_pretrained(model_dir)
    prompt = "The assert statement"
    text = generator(prompt, num_latents=2, max_new_tokens=8)
    assert isinstance(text, str) and text.startswith(prompt) and len(text) > len(prompt)
    assert generator(prompt, num_latents=2, max_new_tokens=8) == text  # greedy
    streamed = "".join(generator.stream(prompt, num_latents=2, max_new_tokens=8, segment=3))
    ids = generator.tokenizer.encode(prompt)
    assert streamed == generator.tokenizer.decode(ids, skip_special_tokens=True) + text[len(prompt):]


def run_sample_py(*args, tmp_path):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax-cache")}
    return subprocess.run([sys.executable, str(REPO / "sample.py"), *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)


def test_sample_py_streams_the_generator_continuation_after_the_prompt_as_given(model_dir, tmp_path):
    prompt = "Recently, I started\nto  work on my"  # a newline and a double space, which the tokenizer collapses
    proc = run_sample_py("--checkpoint", model_dir, "--prompt", prompt, "--num_latents", 2, "--max_new_tokens", 6,
                         "--top_k", 20, "--seed", 3, tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    expected = Generator.from_pretrained(model_dir)(prompt, num_latents=2, max_new_tokens=6, do_sample=True,
                                                    top_k=20, seed=3)
    assert proc.stdout == expected + "\n"
    assert expected.startswith(prompt) and len(expected) > len(prompt)


@pytest.mark.parametrize("checkpoint, args, message", [
    ("model", ["--prompt", "   "], "the prompt is empty"),
    ("model", ["--prompt", "word " * 80], "Input sequence length"),
    ("model", ["--prompt", "Hello", "--num_latents", 17], "num_latents=17 out of valid range [1..16]"),
    ("not a model", ["--prompt", "Hello"], "is not a perceiver-ar-jax model directory"),
])
def test_sample_py_rejects_bad_input_with_one_message(model_dir, tmp_path, checkpoint, args, message):
    proc = run_sample_py("--checkpoint", model_dir if checkpoint == "model" else tmp_path, *args, tmp_path=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""  # bad input; nothing echoed
    assert "Traceback" not in proc.stderr
    assert message in proc.stderr and proc.stderr.strip().count("\n") == 0, proc.stderr


# ------------------------------------------------------------------------------------------------ real perceiver-io
REFERENCE_GENERATE = """
import json, sys, warnings
warnings.filterwarnings("ignore")
import torch
from perceiver.model.text.clm import PerceiverCausalLanguageModel
a = json.load(open(sys.argv[1]))
model = PerceiverCausalLanguageModel.from_pretrained(a["dir"]).eval()
with torch.no_grad():
    out = model.generate(input_ids=torch.tensor(a["input_ids"]), attention_mask=torch.tensor(a["attention_mask"]),
                         num_latents=a["num_latents"], max_new_tokens=a["max_new_tokens"], do_sample=False,
                         use_cache=True, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
print(json.dumps(dict(ids=out.sequences.tolist(), scores=[s.tolist() for s in out.scores])))
"""


@pytest.mark.reference
@pytest.mark.parametrize("abs_pos_emb", [False, True])
def test_perceiver_io_mode_matches_the_real_library_beyond_the_fixture(tmp_path, abs_pos_emb):
    """Pad latents, absolute position embeddings and a sliding window: the library's own cached generate."""
    from perceiver_ar_jax.convert import export_torch_checkpoint
    from tests.conftest import REFERENCE_PYTHON, require

    python = require(REFERENCE_PYTHON)
    config = CausalLanguageModelConfig(**SMALL, abs_pos_emb=abs_pos_emb)
    model, params = CausalLanguageModel(config), noisy_params(config, seed=3)
    ids, attention_mask = padded_prompts(config)
    export_torch_checkpoint(config, params, tmp_path / "hf")
    request = dict(dir=str(tmp_path / "hf"), input_ids=ids.tolist(), attention_mask=attention_mask.tolist(),
                   num_latents=NUM_LATENTS, max_new_tokens=NEW_TOKENS)
    (tmp_path / "request.json").write_text(json.dumps(request))
    (tmp_path / "generate.py").write_text(REFERENCE_GENERATE)
    proc = subprocess.run([str(python), str(tmp_path / "generate.py"), str(tmp_path / "request.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    expected = json.loads(proc.stdout.strip().splitlines()[-1])
    ours, logits = generate(model, params, ids, attention_mask, num_latents=NUM_LATENTS, max_new_tokens=NEW_TOKENS,
                            cache="perceiver-io", return_logits=True, chunk_size=3)
    assert np.asarray(ours).tolist() == expected["ids"]
    np.testing.assert_allclose(np.asarray(logits), np.stack(expected["scores"], axis=1), atol=1e-4, rtol=0)
