"""A generation request on the host: prompts checked, bucketed and handed to the compiled loop; `generate()`.

    ids = generate(model, params, input_ids, num_latents=2, max_new_tokens=16, do_sample=True, top_k=20)

Prompts are left-padded to a power-of-two bucket with tokens that are invisible to masks, positions and the window,
so the bucket does not change the result (up to float rounding) and one compiled loop serves every prompt length
of the bucket.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_ar_jax.backend import cpu_kernels
from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig, abstract_params
from perceiver_ar_jax.model.weights import abstract_prepared, is_prepared, prepare_weights
from perceiver_ar_jax.sampling.cache import init_cache
from perceiver_ar_jax.sampling.config import GenerationConfig
from perceiver_ar_jax.sampling.loop import DecodeState, decode_loop

MIN_PROMPT_BUCKET = 16  # shortest prompt bucket; buckets double up to max_seq_len
MIN_NEW_TOKENS_BUCKET = 16  # shortest output buffer; buffers double

_init_cache = jax.jit(init_cache, static_argnums=(0, 1))


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def prompt_bucket(length: int, max_seq_len: int) -> int:
    """Padded prompt length: the next power of two >= length (at least 16), at most max_seq_len."""
    return min(max_seq_len, _bucket(length, MIN_PROMPT_BUCKET))


def as_key(rng: Any) -> jax.Array:
    """A typed PRNG key from a key, a raw uint32 key (jax.random.PRNGKey), an int seed or None (seed 0)."""
    if rng is None:
        return jax.random.key(0)
    if isinstance(rng, (int, np.integer)) or (np.ndim(rng) == 0 and jnp.issubdtype(jnp.result_type(rng), jnp.integer)):
        return jax.random.key(int(rng))
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)


def unwrap_params(params: Any) -> Any:
    """Parameters as the model's `params` collection: logical-partitioning boxes and a {"params": ...} level off."""
    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
        params = params["params"]
    return params


def decoding_params(params: Any, model_config: CausalLanguageModelConfig, weights: str, remember: bool = True) -> Any:
    """The parameters in the form decoding reads fastest: `weights`' format (model/weights.py), and float32 weights
    packed for the CPU kernel where it runs and the model computes in float32. With `remember` the last result is
    kept, so that calling generate() again with the same parameters does not prepare them again."""
    params = unwrap_params(params)
    if not prepares(model_config, weights) or is_prepared(params):
        return params
    if not remember:
        return prepare_weights(params, weights)
    key = (id(params), weights)
    if _prepared_cache.get("key") != key:
        _prepared_cache.clear()  # drop the previous copy before making the next
        _prepared_cache.update(key=key, source=params, prepared=prepare_weights(params, weights))
    return _prepared_cache["prepared"]


def prepares(model_config: CausalLanguageModelConfig, weights: str) -> bool:
    """Whether decoding prepares the weights: for bfloat16 and int8, and for float32 where the CPU kernel runs and
    the model computes in float32 (bfloat16 compute goes to XLA's bfloat16 units instead)."""
    return weights != "float32" or (cpu_kernels.available() and jnp.dtype(model_config.dtype) == jnp.float32)


def precompile(model_config: CausalLanguageModelConfig, prompt_len: int, generation: GenerationConfig,
               batch_size: int = 1) -> None:
    """Compile the decode loop (and the weight preparation) for prompts of this length from the parameters' shapes
    alone, or load them from the persistent compilation cache: start-up does it while the weights load."""
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])  # where load_model puts the parameters
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                            abstract_params(model_config))
    if prepares(model_config, generation.weights):
        abstract = abstract_prepared(abstract, generation.weights)
    decoding = Decoding(model_config, np.ones((batch_size, prompt_len), np.int32), generation=generation)
    compiled = decoding.run_loop.lower(abstract, decoding.state, jnp.int32(1), decoding.args).compile()
    _precompiled[decoding.loop_key] = compiled


# loop key -> the executable `precompile` made (a jit called later does not always find it in its own cache)
_precompiled: dict[Any, Any] = {}


_prepared_cache: dict[str, Any] = {}  # the last prepare_weights result, with its source (so its id stays valid)


def settings(config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    """`config` (default GenerationConfig()) with keyword overrides, validated."""
    config = GenerationConfig() if config is None else config
    return config.replace(**overrides) if overrides else config


class Decoding:
    """One generation request prepared on the host: `advance(params, stop)` runs the compiled loop until `stop`
    tokens exist, at once or in segments; `sequences()` / `new_tokens()` read them.

    model_config: the model's config; input_ids (batch, S) int, left-padded when attention_mask (batch, S)
    (1 = token, 0 = pad) is given; generation: the GenerationConfig (or keyword settings); rng: a key or an int seed;
    record_logits: keep every step's next-token logits (`logits()`).
    """

    def __init__(self, model_config: CausalLanguageModelConfig, input_ids: Any, attention_mask: Any = None, *,
                 generation: GenerationConfig | None = None, rng: Any = None, record_logits: bool = False,
                 **overrides: Any):
        gen = settings(generation, overrides)
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2 or not (np.issubdtype(input_ids.dtype, np.integer) or input_ids.size == 0):
            raise ValueError(f"input_ids must be integer token ids of shape (batch, length), got {input_ids.dtype} "
                             f"{input_ids.shape}")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids holds no prompt (batch size 0)")
        batch_size, seq_len = input_ids.shape
        prompt_latents = gen.check_prompt(model_config, seq_len)
        if attention_mask is None:
            pad = np.zeros(input_ids.shape, bool)
        else:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids shape "
                                 f"{input_ids.shape}")
            pad = attention_mask == 0
        # as transformers: every prompt repeated num_return_sequences times, consecutively
        input_ids = np.repeat(input_ids.astype(np.int32), gen.num_return_sequences, axis=0)
        pad = np.repeat(pad, gen.num_return_sequences, axis=0)

        self.config, self.generation, self.input_ids = model_config, gen, input_ids
        self.max_new_tokens = gen.max_new_tokens
        bucket_len = prompt_bucket(seq_len, model_config.max_seq_len) if gen.bucket else seq_len
        offset = bucket_len - seq_len
        rows = input_ids.shape[0]
        buffer = _bucket(max(self.max_new_tokens, 1), MIN_NEW_TOKENS_BUCKET)
        self.args = gen.sampling_args()
        pad_latents = bool(np.any(pad[:, seq_len - prompt_latents:])) and gen.cache != "perceiver-io"
        self.run_loop = decode_loop(model_config, gen.cache, gen.sampler, record_logits, gen.chunk_size,
                                    gen.reset_fill_for(model_config), pad_latents)
        logits_shape = (rows, buffer, model_config.vocab_size) if record_logits else (1, 1, 1)
        self.state = DecodeState(
            kv=_init_cache(model_config, rows),
            prompt_ids=jnp.asarray(np.pad(input_ids, ((0, 0), (offset, 0)))),
            prompt_pad=jnp.asarray(np.pad(pad, ((0, 0), (offset, 0)), constant_values=True)),
            offset=jnp.int32(offset),
            num_latents=jnp.int32(prompt_latents),
            window_start=jnp.int32(offset),
            latents=jnp.int32(prompt_latents),
            step=jnp.int32(0),
            token=jnp.zeros((rows,), jnp.int32),
            finished=jnp.zeros((rows,), bool),
            new_tokens=jnp.full((rows, buffer), gen.fill_token_id, jnp.int32),
            logits=jnp.zeros(logits_shape, jnp.float32),
            rng=as_key(rng))
        # the compiled loop is the same for every request with this loop and these shapes
        self.loop_key = (self.run_loop, jax.tree.map(lambda a: (a.shape, a.dtype), self.state))

    def advance(self, params: Any, stop: int) -> None:
        """Generate until `stop` tokens (at most max_new_tokens) exist or every row has finished."""
        run = _precompiled.get(self.loop_key, self.run_loop)
        self.state = run(params, self.state, jnp.int32(min(stop, self.max_new_tokens)), self.args)

    @property
    def done(self) -> bool:
        return int(self.state.step) >= self.max_new_tokens or bool(jnp.all(self.state.finished))

    def new_tokens(self) -> np.ndarray:
        """(batch, max_new_tokens) int32 generated so far (the fill token where not yet or no longer generated)."""
        return np.asarray(self.state.new_tokens[:, : self.max_new_tokens])

    def sequences(self) -> np.ndarray:
        return np.concatenate([self.input_ids, self.new_tokens()], axis=1)

    def logits(self) -> np.ndarray:
        """(batch, max_new_tokens, vocab) next-token logits of every step (record_logits=True only)."""
        return np.asarray(self.state.logits[:, : self.max_new_tokens])


def generate(
    model: CausalLanguageModel,
    params: Any,
    input_ids: Any,
    attention_mask: Any = None,
    *,
    config: GenerationConfig | None = None,
    rng: Any = None,
    return_logits: bool = False,
    **overrides: Any,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Continue prompts -> int32 (batch * num_return_sequences, S + max_new_tokens): prompts, then new tokens.

    input_ids (batch, S) int, left-padded when attention_mask (batch, S) (1 = token, 0 = pad) is given. The
    settings are a GenerationConfig (`config`) and/or its fields as keywords (num_latents, max_new_tokens,
    do_sample, temperature, top_k, top_p, cache, eos_token_id, pad_token_id, num_return_sequences, bucket,
    chunk_size; see `sampling/config.py`). rng: a key or an int seed (None: seed 0). return_logits: also return the
    float32 next-token logits of every step (batch, max_new_tokens, vocab).
    """
    decoding = Decoding(model.config, input_ids, attention_mask, generation=config, rng=rng,
                        record_logits=return_logits, **overrides)
    if decoding.max_new_tokens > 0:
        decoding.advance(decoding_params(params, model.config, decoding.generation.weights), decoding.max_new_tokens)
    sequences = jnp.asarray(decoding.sequences())
    return (sequences, jnp.asarray(decoding.logits())) if return_logits else sequences
