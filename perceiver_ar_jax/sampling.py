"""Text generation: perceiver-io's `generate(..., num_latents=K)` as one compiled decode loop.

    ids = generate(model, params, input_ids, num_latents=2, max_new_tokens=16, do_sample=True, top_k=20)

Schedule (perceiver-io's): a prompt of S tokens starts with its last min(num_latents, S) tokens as latents and the
rest as prefix. Each new token first adds a latent until there are max_latents, then grows the prefix until it is
max_seq_len - max_latents long, then the window slides (the oldest token drops out).

Two cache modes:
- "exact" (default): the next-token logits of every step equal the model's full forward over the current window
  with that schedule, which is what the model saw in training. Incremental while the latents grow; afterwards the
  max_latents latents are recomputed every step over the cached prefix keys/values (see `kv_cache.py`).
- "perceiver-io": perceiver-io 0.11 + transformers 4.36 `generate(use_cache=True)` token for token, one query
  per step: cached keys/values keep the norm they were computed with (a token that moves into the prefix keeps its
  latent keys), which is cheaper but not what a full forward computes.

The loop (prefill, decode steps and sampling) is one jitted `lax.while_loop` over static-shape caches, compiled
once per (batch size, prompt bucket, new-token bucket): prompts are left-padded to a power-of-two bucket with
tokens that are invisible to masks, positions and the window, so the bucket does not change the result (up to
float rounding). Sampling
follows Hugging Face's order (temperature, then top-k, then top-p) with a per-step key `fold_in(rng, step)`, so
a run is reproducible and the same whether it runs in one call or in streamed segments.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from perceiver_ar_jax import kv_cache
from perceiver_ar_jax.config import CausalLanguageModelConfig
from perceiver_ar_jax.model import CausalLanguageModel

CACHE_MODES = ("exact", "perceiver-io")
MIN_PROMPT_BUCKET = 16  # shortest prompt bucket; buckets double up to max_seq_len
MIN_NEW_TOKENS_BUCKET = 16  # shortest output buffer; buffers double


# ------------------------------------------------------------------------------------------------ next-token choice
class Sampler(NamedTuple):
    """The static part of the sampling settings (each combination is compiled once)."""

    do_sample: bool
    top_k: int | None  # keep the top_k most likely tokens (None: all)
    use_top_p: bool  # nucleus filtering with SamplingArgs.top_p


class SamplingArgs(NamedTuple):
    """The traced part of the sampling settings (changing them does not recompile)."""

    temperature: jnp.ndarray  # float32 scalar
    top_p: jnp.ndarray  # float32 scalar
    eos_token_id: jnp.ndarray  # int32 scalar, -1 = none
    pad_token_id: jnp.ndarray  # int32 scalar, written after a row's EOS


def nucleus_filter(sorted_logits: jnp.ndarray, top_p: jnp.ndarray) -> jnp.ndarray:
    """Top-p on logits sorted in decreasing order (batch, n): -inf outside the smallest set of most likely tokens
    whose probability reaches top_p, as transformers' TopPLogitsWarper (at least one token is kept)."""
    ascending = jnp.flip(sorted_logits, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    remove = (cumulative <= 1.0 - top_p).at[:, -1].set(False)  # the most likely token always stays
    return jnp.where(jnp.flip(remove, axis=-1), -jnp.inf, sorted_logits)


def first_argmax(x: jnp.ndarray) -> jnp.ndarray:
    """`jnp.argmax(x, axis=-1)` (the first of tied maxima) as two plain reductions: (batch, n) -> (batch,) int32.

    XLA:CPU runs argmax's (value, index) reduction unvectorised, ten times slower over a 32k vocabulary.
    """
    best = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.min(jnp.where(x == best, jnp.arange(x.shape[-1], dtype=jnp.int32), x.shape[-1]), axis=-1)
    return jnp.minimum(index, x.shape[-1] - 1)  # a row of NaN has no maximum: take the last index


def next_token(logits: jnp.ndarray, key: jax.Array, sampler: Sampler, args: SamplingArgs) -> jnp.ndarray:
    """(batch, vocab) float32 logits -> (batch,) int32 tokens: argmax, or a sample after temperature, top-k, top-p."""
    if not sampler.do_sample:
        return first_argmax(logits)
    logits = logits / args.temperature
    vocab_size = logits.shape[-1]
    indices = None
    if sampler.top_k is not None and sampler.top_k < vocab_size:
        logits, indices = jax.lax.top_k(logits, sampler.top_k)  # sorted, decreasing
    elif sampler.use_top_p:
        logits, indices = jax.lax.top_k(logits, vocab_size)
    if sampler.use_top_p:
        logits = nucleus_filter(logits, args.top_p)
    choice = first_argmax(logits + jax.random.gumbel(key, logits.shape))  # Gumbel-max: a softmax(logits) sample
    if indices is None:
        return choice
    return jnp.take_along_axis(indices, choice[:, None], axis=1)[:, 0].astype(jnp.int32)


# ------------------------------------------------------------------------------------------------ the decode loop
class DecodeState(NamedTuple):
    """Everything the loop carries; `run` can be called again on its output to continue (streaming)."""

    cache: kv_cache.DecodeCache
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
                chunk_size: int = kv_cache.DEFAULT_CHUNK_SIZE):
    """The jitted loop `run(params, state, stop, args) -> state`: prefill if state.step == 0, then decode steps
    until `stop` tokens are generated or every row has finished. `state` is donated."""
    model = CausalLanguageModel(config.replace(activation_checkpointing=False))
    max_latents = config.max_latents

    def run(params, state: DecodeState, stop: jnp.ndarray, args: SamplingArgs) -> DecodeState:
        def apply(method, *inputs):
            return model.apply({"params": params}, *inputs, method=method)

        bucket = state.prompt_ids.shape[1]

        def emit(state: DecodeState, logits: jnp.ndarray, cache: kv_cache.DecodeCache) -> DecodeState:
            token = next_token(logits, jax.random.fold_in(state.rng, state.step), sampler, args)
            token = jnp.where(state.finished, args.pad_token_id, token)  # as transformers: pad after EOS
            recorded = state.logits
            if record_logits:
                recorded = jax.lax.dynamic_update_slice_in_dim(recorded, logits[:, None], state.step, axis=1)
            return state._replace(
                cache=cache, step=state.step + 1, token=token, finished=state.finished | (token == args.eos_token_id),
                new_tokens=jax.lax.dynamic_update_slice_in_dim(state.new_tokens, token[:, None], state.step, axis=1),
                logits=recorded)

        def start(state: DecodeState) -> DecodeState:
            logits, cache = apply(functools.partial(kv_cache.prefill, chunk_size=chunk_size), state.cache,
                                  state.prompt_ids, state.prompt_pad, state.offset, state.num_latents)
            return emit(state, logits, cache)

        kernel = apply(kv_cache.output_kernel, state.token.shape[0])  # once per loop, not per step
        # exact mode: a padded latent in the prompt changes state every step, so no step is incremental
        prompt_latent = jnp.arange(bucket) >= bucket - state.num_latents
        pad_latent = jnp.any(state.prompt_pad & prompt_latent[None])

        def step(state: DecodeState) -> DecodeState:
            last = bucket - 1 + state.step  # bucketed index of state.token

            def incremental(state):
                return apply(kv_cache.decode_step, state.cache, state.token, last, state.offset,
                             bucket - state.num_latents, kernel)

            def all_latents(state):
                num_latents = jnp.minimum(state.num_latents + state.step, max_latents)
                latent_moves = state.num_latents + state.step > max_latents
                return apply(kv_cache.latents_step, state.cache, state.token, last, state.offset, num_latents,
                             latent_moves, kernel)

            if cache_mode == "exact":  # incremental only while the latents grow (prefix and positions fixed)
                growing = state.num_latents + state.step <= max_latents
                logits, cache = jax.lax.cond(growing & ~pad_latent, incremental, all_latents, state)
            else:
                logits, cache = incremental(state)
            return emit(state, logits, cache)

        def more(state: DecodeState) -> jnp.ndarray:
            return (state.step < stop) & ~jnp.all(state.finished)

        state = jax.lax.cond((state.step == 0) & (stop > 0), start, lambda s: s, state)
        return jax.lax.while_loop(more, step, state)

    return jax.jit(run, donate_argnums=(1,), compiler_options=_compiler_options())


@functools.lru_cache(maxsize=1)
def _compiler_options() -> dict[str, Any]:
    # XLA:CPU's default copy insertion copies every cache once or twice per step (a step reads a cache and then
    # updates one slot in place); its region analysis sees that the read comes first.
    if jax.default_backend() != "cpu":
        return {}
    options = {"xla_cpu_copy_insertion_use_region_analysis": True}
    try:  # an XLA without this option only gets slower decoding
        jax.jit(lambda x: x + 1, compiler_options=options)(jnp.int32(0)).block_until_ready()
    except Exception:  # noqa: BLE001 - JaxRuntimeError "No such compile option"
        return {}
    return options


_init_cache = jax.jit(kv_cache.init_cache, static_argnums=(0, 1))


# ------------------------------------------------------------------------------------------------ host side
def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << (n - 1).bit_length())


def prompt_bucket(length: int, max_seq_len: int) -> int:
    """Padded prompt length: the next power of two >= length (at least 16), at most max_seq_len."""
    return min(max_seq_len, _bucket(length, MIN_PROMPT_BUCKET))


def check_generate_args(config: CausalLanguageModelConfig, seq_len: int, num_latents: int) -> int:
    """perceiver-io's checks on prompt length and num_latents; returns the prompt's latents, min(num_latents, S)."""
    L, K = config.max_seq_len, config.max_latents
    if not 0 < seq_len <= L:
        raise ValueError(f"Input sequence length {seq_len} out of valid range [1..{L}] (max_seq_len)")
    if not 0 < num_latents <= K:
        raise ValueError(f"num_latents={num_latents} out of valid range [1..{K}]")
    num_latents = min(seq_len, num_latents)
    prefix_len = seq_len - num_latents
    if prefix_len > config.max_prefix_len:
        raise ValueError(f"For given sequence of length={seq_len}, num_latents must be in range "
                         f"[{num_latents + prefix_len - config.max_prefix_len}..{K}]")
    return num_latents


def _check_sampling(do_sample: bool, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not do_sample:
        return
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature={temperature!r} out of valid range: must be a number > 0")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k={top_k!r} out of valid range: must be None or an integer >= 0 (0 = no top-k)")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p={top_p!r} out of valid range [0, 1]")


def _as_key(rng: Any) -> jax.Array:
    if rng is None:
        return jax.random.key(0)
    if isinstance(rng, (int, np.integer)) or (np.ndim(rng) == 0 and jnp.issubdtype(jnp.result_type(rng), jnp.integer)):
        return jax.random.key(int(rng))
    if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        return rng
    return jax.random.wrap_key_data(rng)  # a raw uint32 key from jax.random.PRNGKey


def _unwrap_params(params: Any) -> Any:
    params = nn.unbox(params)
    if isinstance(params, Mapping) and set(params.keys()) == {"params"}:
        params = params["params"]
    return params


class Decoding:
    """One generation request prepared on the host (arguments as `generate`): `advance(params, stop)` runs the
    compiled loop until `stop` tokens exist, at once or in segments; `sequences()` / `new_tokens()` read them."""

    def __init__(
        self,
        config: CausalLanguageModelConfig,
        input_ids: Any,
        attention_mask: Any = None,
        num_latents: int = 1,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cache: str = "exact",
        rng: Any = None,
        eos_token_id: int | None = None,
        pad_token_id: int | None = None,
        num_return_sequences: int = 1,
        bucket: bool = True,
        record_logits: bool = False,
        chunk_size: int = kv_cache.DEFAULT_CHUNK_SIZE,
    ):
        input_ids = np.asarray(input_ids)
        if input_ids.ndim == 1:
            input_ids = input_ids[None]
        if input_ids.ndim != 2 or not (np.issubdtype(input_ids.dtype, np.integer) or input_ids.size == 0):
            raise ValueError(f"input_ids must be integer token ids of shape (batch, length), got {input_ids.dtype} "
                             f"{input_ids.shape}")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache={cache!r} is not a cache mode; choose one of {CACHE_MODES}")
        if not (isinstance(max_new_tokens, (int, np.integer)) and max_new_tokens >= 0):
            raise ValueError(f"max_new_tokens={max_new_tokens!r} out of valid range: must be an integer >= 0")
        if not (isinstance(num_return_sequences, (int, np.integer)) and num_return_sequences >= 1):
            raise ValueError(f"num_return_sequences={num_return_sequences!r} out of valid range: must be >= 1")
        if input_ids.shape[0] == 0:
            raise ValueError("input_ids holds no prompt (batch size 0)")
        _check_sampling(do_sample, temperature, top_k, top_p)
        batch_size, seq_len = input_ids.shape
        prompt_latents = check_generate_args(config, seq_len, num_latents)
        if attention_mask is None:
            pad = np.zeros(input_ids.shape, bool)
        else:
            attention_mask = np.asarray(attention_mask)
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {attention_mask.shape} differs from input_ids shape "
                                 f"{input_ids.shape}")
            pad = attention_mask == 0
        # as transformers: every prompt repeated num_return_sequences times, consecutively
        input_ids = np.repeat(input_ids.astype(np.int32), num_return_sequences, axis=0)
        pad = np.repeat(pad, num_return_sequences, axis=0)
        if pad_token_id is None:
            pad_token_id = eos_token_id if eos_token_id is not None else 0

        self.config, self.input_ids, self.max_new_tokens = config, input_ids, int(max_new_tokens)
        bucket_len = prompt_bucket(seq_len, config.max_seq_len) if bucket else seq_len
        offset = bucket_len - seq_len
        rows = input_ids.shape[0]
        buffer = _bucket(max(self.max_new_tokens, 1), MIN_NEW_TOKENS_BUCKET)
        self.sampler = Sampler(bool(do_sample), (top_k or None) if do_sample else None,
                               bool(do_sample and top_p is not None and top_p < 1.0))
        self.args = SamplingArgs(
            temperature=jnp.float32(temperature if do_sample else 1.0),
            top_p=jnp.float32(1.0 if top_p is None else top_p),
            eos_token_id=jnp.int32(-1 if eos_token_id is None else eos_token_id),
            pad_token_id=jnp.int32(pad_token_id))
        self.run_loop = decode_loop(config, cache, self.sampler, record_logits, chunk_size)
        logits_shape = (rows, buffer, config.vocab_size) if record_logits else (1, 1, 1)
        self.state = DecodeState(
            cache=_init_cache(config, rows),
            prompt_ids=jnp.asarray(np.pad(input_ids, ((0, 0), (offset, 0)))),
            prompt_pad=jnp.asarray(np.pad(pad, ((0, 0), (offset, 0)), constant_values=True)),
            offset=jnp.int32(offset),
            num_latents=jnp.int32(prompt_latents),
            step=jnp.int32(0),
            token=jnp.zeros((rows,), jnp.int32),
            finished=jnp.zeros((rows,), bool),
            new_tokens=jnp.full((rows, buffer), pad_token_id, jnp.int32),
            logits=jnp.zeros(logits_shape, jnp.float32),
            rng=_as_key(rng))

    def advance(self, params: Any, stop: int) -> None:
        """Generate until `stop` tokens (at most max_new_tokens) exist or every row has finished."""
        self.state = self.run_loop(params, self.state, jnp.int32(min(stop, self.max_new_tokens)), self.args)

    @property
    def done(self) -> bool:
        return int(self.state.step) >= self.max_new_tokens or bool(jnp.all(self.state.finished))

    def new_tokens(self) -> np.ndarray:
        """(batch, max_new_tokens) int32 generated so far (pad_token_id where not yet or no longer generated)."""
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
    num_latents: int = 1,
    max_new_tokens: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    cache: str = "exact",
    rng: Any = None,
    *,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
    num_return_sequences: int = 1,
    return_logits: bool = False,
    bucket: bool = True,
    chunk_size: int = kv_cache.DEFAULT_CHUNK_SIZE,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Continue prompts -> int32 (batch * num_return_sequences, S + max_new_tokens): prompts, then new tokens.

    input_ids (batch, S) int, left-padded when attention_mask (batch, S) (1 = token, 0 = pad) is given;
    num_latents in [1, max_latents]: initial latents (the last ones of the prompt). Greedy unless do_sample;
    sampling applies temperature, then top_k (None or 0: off), then top_p (None: off), with `rng` (a key or an
    int seed; None: seed 0). cache: "exact" or "perceiver-io" (module docstring). A row stops at eos_token_id and
    is filled with pad_token_id (default eos_token_id) afterwards. return_logits: also return the float32
    next-token logits of every step (batch, max_new_tokens, vocab). bucket=False: no prompt bucketing (one
    compilation per prompt length; results are the same). chunk_size: prompt tokens projected at once in prefill.
    """
    params = _unwrap_params(params)
    decoding = Decoding(model.config, input_ids, attention_mask, num_latents, max_new_tokens, do_sample, temperature,
                        top_k, top_p, cache, rng, eos_token_id, pad_token_id, num_return_sequences, bucket,
                        return_logits, chunk_size)
    if decoding.max_new_tokens > 0:
        decoding.advance(params, decoding.max_new_tokens)
    sequences = jnp.asarray(decoding.sequences())
    return (sequences, jnp.asarray(decoding.logits())) if return_logits else sequences


def enable_compilation_cache(directory: str | os.PathLike | None = None) -> str:
    """Turn on JAX's persistent compilation cache, so that a later process loads the compiled decode loop instead
    of compiling it again. directory: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/perceiver_ar_jax/jax."""
    directory = os.fspath(directory or os.environ.get("JAX_COMPILATION_CACHE_DIR")
                          or os.path.join(os.path.expanduser("~"), ".cache", "perceiver_ar_jax", "jax"))
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)  # skip only the trivial programs
    return directory


# ------------------------------------------------------------------------------------------------ text pipeline
class Generator:
    """Text in, text out: `Generator.from_pretrained(dir)("prompt", num_latents=2, max_new_tokens=16)`.

    A row stops at the tokenizer's EOS (`stop_at_eos=False` to go on); special tokens are left out of the text.
    """

    def __init__(self, config: CausalLanguageModelConfig, params: Any, tokenizer: Any):
        self.config, self.params, self.tokenizer = config, _unwrap_params(params), tokenizer

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: str | None = None) -> Generator:
        """Load a model directory (converted, or a training run's directory: its latest checkpoint) and the
        tokenizer stored with it. dtype: compute dtype ("float32", "bfloat16"), default the checkpoint's."""
        from perceiver_ar_jax.checkpoint import load_model
        from perceiver_ar_jax.tokenizer import Tokenizer

        config, params = load_model(directory)
        if dtype is not None:
            config = config.replace(dtype=dtype)
        return cls(config, params, Tokenizer.from_pretrained(directory))

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt)
        if not 0 < len(ids) <= self.config.max_seq_len:
            raise ValueError(f"Input sequence length {len(ids)} out of valid range [1..{self.config.max_seq_len}]: "
                             f"the prompt is {len(ids)} tokens long, the model reads at most max_seq_len = "
                             f"{self.config.max_seq_len}")
        return ids

    def _decoding(self, prompt_ids: list[int], stop_at_eos: bool, **kwargs) -> Decoding:
        eos = self.tokenizer.eos_id if stop_at_eos else None
        return Decoding(self.config, np.asarray([prompt_ids], np.int32), eos_token_id=eos,
                        pad_token_id=self.tokenizer.pad_id, **kwargs)

    def __call__(
        self,
        prompt: str,
        num_latents: int = 1,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        num_return_sequences: int = 1,
        seed: int = 0,
        cache: str = "exact",
        stop_at_eos: bool = True,
        return_full_text: bool = True,
    ) -> str | list[str]:
        """The prompt followed by its continuation (or the continuation only); a list if num_return_sequences > 1."""
        prompt_ids = self.encode(prompt)
        decoding = self._decoding(prompt_ids, stop_at_eos, num_latents=num_latents, max_new_tokens=max_new_tokens,
                                  do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                                  cache=cache, rng=seed, num_return_sequences=num_return_sequences)
        if decoding.max_new_tokens > 0:
            decoding.advance(self.params, decoding.max_new_tokens)
        # as transformers' text-generation pipeline: cut the decoded prompt off the decoded whole
        prompt_text = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        texts = []
        for row in decoding.sequences():
            continuation = self.tokenizer.decode(self._until_eos(row, len(prompt_ids), stop_at_eos),
                                                 skip_special_tokens=True)[len(prompt_text):]
            texts.append(prompt + continuation if return_full_text else continuation)
        return texts[0] if num_return_sequences == 1 else texts

    def _until_eos(self, row: np.ndarray, prompt_len: int, stop_at_eos: bool) -> np.ndarray:
        if not stop_at_eos:
            return row
        eos = np.flatnonzero(row[prompt_len:] == self.tokenizer.eos_id)
        return row if eos.size == 0 else row[: prompt_len + eos[0]]

    def stream(
        self,
        prompt: str,
        num_latents: int = 1,
        max_new_tokens: int = 32,
        segment: int = 8,
        stop_at_eos: bool = True,
        **sampling: Any,
    ) -> Iterator[str]:
        """Yield text as it is generated, `segment` tokens at a time: first the prompt as the tokenizer decodes it,
        then the continuation. The pieces join to decode(prompt + new tokens). sampling: do_sample, temperature,
        top_k, top_p, cache, rng (as `generate`). The same compiled loop runs every segment."""
        prompt_ids = self.encode(prompt)
        decoding = self._decoding(prompt_ids, stop_at_eos, num_latents=num_latents, max_new_tokens=max_new_tokens,
                                  **sampling)
        text = self.tokenizer.incremental_decoder(skip_special_tokens=True)
        yield text.push(prompt_ids)
        emitted = 0
        while not decoding.done:
            decoding.advance(self.params, emitted + segment)
            new = decoding.new_tokens()[0, emitted : int(decoding.state.step)]
            emitted += len(new)
            if stop_at_eos and self.tokenizer.eos_id in new:
                new = new[: list(new).index(self.tokenizer.eos_id)]
            yield text.push(new.tolist())
        yield text.flush()
