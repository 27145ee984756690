"""The compiled decode loop: prefill, decode steps and the choice of each next token in one `lax.while_loop`.

It compiles once per (model config, cache mode, sampler, batch size, prompt bucket, new-token buffer) and can be
called again on its own output state to continue (streaming): the random key of step t is `fold_in(rng, t)`, so
streamed and one-shot runs give the same tokens.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from perceiver_ar_jax import backend
from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig
from perceiver_ar_jax.sampling import steps
from perceiver_ar_jax.sampling.cache import KVCache
from perceiver_ar_jax.sampling.rules import Sampler, SamplingArgs, next_token


class DecodeState(NamedTuple):
    """Everything the loop carries; `run` can be called again on its output to continue (streaming)."""

    kv: KVCache
    prompt_ids: jnp.ndarray  # (batch, Sb) int32, left-padded to the bucket
    prompt_pad: jnp.ndarray  # (batch, Sb) bool, True = user pad or bucket pad
    offset: jnp.ndarray  # int32: bucket pads, Sb - S
    num_latents: jnp.ndarray  # int32: latents of the prompt, min(num_latents, S)
    step: jnp.ndarray  # int32: tokens generated so far
    token: jnp.ndarray  # (batch,) int32: the last generated token
    finished: jnp.ndarray  # (batch,) bool: the row has emitted EOS
    new_tokens: jnp.ndarray  # (batch, N) int32: generated tokens (pad after EOS)
    logits: jnp.ndarray  # (batch, N, vocab) float32 next-token logits of every step, or a (1, 1, 1) dummy
    rng: jax.Array


@functools.lru_cache(maxsize=32)
def decode_loop(config: CausalLanguageModelConfig, cache_mode: str, sampler: Sampler, record_logits: bool = False,
                chunk_size: int = steps.DEFAULT_CHUNK_SIZE):
    """The jitted loop `run(params, state, stop, args) -> state`: prefill if state.step == 0, then decode steps
    until `stop` tokens are generated or every row has finished. `state` is donated."""
    model = CausalLanguageModel(config.replace(activation_checkpointing=False))
    max_latents = config.max_latents

    def run(params, state: DecodeState, stop: jnp.ndarray, args: SamplingArgs) -> DecodeState:
        def apply(method, *inputs):
            return model.apply({"params": params}, *inputs, method=method)

        bucket = state.prompt_ids.shape[1]

        def emit(state: DecodeState, logits: jnp.ndarray, kv: KVCache) -> DecodeState:
            token = next_token(logits, jax.random.fold_in(state.rng, state.step), sampler, args)
            token = jnp.where(state.finished, args.pad_token_id, token)  # as transformers: pad after EOS
            recorded = state.logits
            if record_logits:
                recorded = jax.lax.dynamic_update_slice_in_dim(recorded, logits[:, None], state.step, axis=1)
            return state._replace(
                kv=kv, step=state.step + 1, token=token, finished=state.finished | (token == args.eos_token_id),
                new_tokens=jax.lax.dynamic_update_slice_in_dim(state.new_tokens, token[:, None], state.step, axis=1),
                logits=recorded)

        def start(state: DecodeState) -> DecodeState:
            logits, kv = apply(functools.partial(steps.prefill, chunk_size=chunk_size), state.kv,
                               state.prompt_ids, state.prompt_pad, state.offset, state.num_latents)
            return emit(state, logits, kv)

        # exact mode: a padded latent in the prompt changes state every step, so no step is incremental
        prompt_latent = jnp.arange(bucket) >= bucket - state.num_latents
        pad_latent = jnp.any(state.prompt_pad & prompt_latent[None])

        def step(state: DecodeState) -> DecodeState:
            last = bucket - 1 + state.step  # bucketed index of state.token

            def incremental(state):
                return apply(steps.decode_step, state.kv, state.token, last, state.offset, bucket - state.num_latents)

            def all_latents(state):
                num_latents = jnp.minimum(state.num_latents + state.step, max_latents)
                latent_moves = state.num_latents + state.step > max_latents
                return apply(steps.latents_step, state.kv, state.token, last, state.offset, num_latents,
                             latent_moves)

            if cache_mode == "exact":  # incremental only while the latents grow (prefix and positions fixed)
                growing = state.num_latents + state.step <= max_latents
                logits, kv = jax.lax.cond(growing & ~pad_latent, incremental, all_latents, state)
            else:
                logits, kv = incremental(state)
            return emit(state, logits, kv)

        def more(state: DecodeState) -> jnp.ndarray:
            return (state.step < stop) & ~jnp.all(state.finished)

        state = jax.lax.cond((state.step == 0) & (stop > 0), start, lambda s: s, state)
        return jax.lax.while_loop(more, step, state)

    return jax.jit(run, donate_argnums=(1,), compiler_options=backend.decode_compiler_options())
