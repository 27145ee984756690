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
    window_start: jnp.ndarray  # int32: bucketed index of the window's first token ("windowed" mode)
    latents: jnp.ndarray  # int32: latents of the window after the last step ("windowed" mode)
    step: jnp.ndarray  # int32: tokens generated so far
    token: jnp.ndarray  # (batch,) int32: the last generated token
    finished: jnp.ndarray  # (batch,) bool: the row has emitted EOS
    new_tokens: jnp.ndarray  # (batch, N) int32: generated tokens (pad after EOS)
    logits: jnp.ndarray  # (batch, N, vocab) float32 next-token logits of every step, or a (1, 1, 1) dummy
    rng: jax.Array


@functools.lru_cache(maxsize=32)
def decode_loop(config: CausalLanguageModelConfig, cache_mode: str, sampler: Sampler, record_logits: bool = False,
                chunk_size: int = steps.DEFAULT_CHUNK_SIZE, reset_fill: int = 1, pad_latents: bool = False):
    """The jitted loop `run(params, state, stop, args) -> state`: prefill if state.step == 0, then decode steps
    until `stop` tokens are generated or every row has finished. `state` is donated.

    reset_fill: latents after a reset of the "windowed" mode; pad_latents: whether a latent of the prompt may be a
    pad token (then "exact" and "windowed" steps recompute the latents until none is).
    """
    model = CausalLanguageModel(config.replace(activation_checkpointing=False))
    L, K = config.max_seq_len, config.max_latents
    reset_width = min(config.max_prefix_len + reset_fill, L)  # a reset window: the longest prefix + reset_fill

    def run(params, state: DecodeState, stop: jnp.ndarray, args: SamplingArgs) -> DecodeState:
        def apply(method, *inputs, **static):
            return model.apply({"params": params}, *inputs, method=functools.partial(method, **static))

        bucket = state.prompt_ids.shape[1]
        prompt_first_latent = bucket - state.num_latents
        # a latent of the prompt that is a pad token changes its state every step: no step is incremental then
        pad_latent = jnp.any(state.prompt_pad & (jnp.arange(bucket) >= prompt_first_latent)[None])

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
            real = jnp.arange(bucket) >= state.offset
            kv = state.kv._replace(prompt_pads=jnp.sum(state.prompt_pad & real[None], axis=1, keepdims=True,
                                                       dtype=jnp.int32))
            logits, kv = apply(steps.prefill, kv, state.prompt_ids, state.prompt_pad, jnp.int32(0), state.offset,
                               state.offset, state.num_latents, chunk_size=chunk_size)
            return emit(state, logits, kv)

        def step(state: DecodeState) -> DecodeState:
            last = bucket - 1 + state.step  # bucketed index of state.token

            def incremental(state, first_latent=prompt_first_latent, window_start=None):
                if window_start is None:
                    window_start = steps.last_tokens_window(last, state.offset, L)
                return apply(steps.decode_step, state.kv, state.token, last, state.offset, first_latent,
                             window_start)

            if cache_mode == "perceiver-io":
                logits, kv = incremental(state)
            elif cache_mode == "exact":  # incremental only while the latents grow (prefix and positions fixed)
                def all_latents(state):
                    num_latents = jnp.minimum(state.num_latents + state.step, K)
                    latent_moves = state.num_latents + state.step > K
                    return apply(steps.latents_step, state.kv, state.token, last, state.offset, num_latents,
                                 latent_moves)

                growing = state.num_latents + state.step <= K
                if pad_latents:
                    logits, kv = jax.lax.cond(growing & ~pad_latent, incremental, all_latents, state)
                else:
                    logits, kv = jax.lax.cond(growing, incremental, all_latents, state)
            else:  # "windowed": latents grow by cached steps; when they overflow, a reset to reset_fill latents
                latents = state.latents + 1

                def cached(state):
                    return incremental(state, last + 1 - latents, state.window_start)

                def reset(state):
                    return apply(steps.window_forward, state.kv, state.token, last, state.offset,
                                 last - reset_width + 1, jnp.int32(reset_fill), width=reset_width,
                                 num_queries=reset_fill, chunk_size=chunk_size)

                def recompute(state):  # a latent is a pad token: every step is a full forward over the window
                    return apply(steps.window_forward, state.kv, state.token, last, state.offset,
                                 state.window_start, latents, width=L, num_queries=K, chunk_size=chunk_size)

                branch = jnp.where(latents > K, 1, 0)
                branches = [cached, reset]
                if pad_latents:  # only the prompt's latents can be pads: the first reset leaves them in the prefix
                    branch = jnp.where((latents <= K) & pad_latent & (state.window_start == state.offset),
                                       2, branch)
                    branches.append(recompute)
                logits, kv = jax.lax.switch(branch, branches, state)
                reset_now = latents > K
                state = state._replace(
                    latents=jnp.where(reset_now, reset_fill, latents),
                    window_start=jnp.where(reset_now, jnp.maximum(last - reset_width + 1, state.offset),
                                           state.window_start))
            return emit(state, logits, kv)

        def more(state: DecodeState) -> jnp.ndarray:
            return (state.step < stop) & ~jnp.all(state.finished)

        state = jax.lax.cond((state.step == 0) & (stop > 0), start, lambda s: s, state)
        return jax.lax.while_loop(more, step, state)

    return jax.jit(run, donate_argnums=(1,), compiler_options=backend.decode_compiler_options())
