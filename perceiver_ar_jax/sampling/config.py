"""`GenerationConfig`: how to continue prompts, validated once where it is made.

`generate()`, `Generator` and `sample.py` all take their settings through it, so a value is checked the same way
wherever it comes from:

    config = GenerationConfig(num_latents=2, max_new_tokens=16, do_sample=True, top_k=20)
    generate(model, params, ids, config=config)           # or generate(model, params, ids, num_latents=2, ...)

Checks that need the model (num_latents against max_latents, the prompt against max_seq_len) happen per request,
in `check_prompt`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from perceiver_ar_jax.backend import WEIGHT_FORMATS
from perceiver_ar_jax.model import CausalLanguageModelConfig
from perceiver_ar_jax.sampling.rules import Sampler, SamplingArgs

# "windowed": the paper's decoding, latents grow by cached steps and a full forward resets them to reset_fill;
# "exact": every step's logits equal the model's full forward over the window of perceiver-io's schedule;
# "perceiver-io": perceiver-io's own cached generate, token for token (README: what each computes and costs)
CACHE_MODES = ("windowed", "exact", "perceiver-io")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    # latent positions at the end of the prompt when decoding starts, in [1, max_latents] (perceiver-io's argument)
    num_latents: int = 1
    # tokens to generate after the prompt (>= 0)
    max_new_tokens: int = 32
    # sample from the distribution (after temperature, top-k, top-p) instead of taking the most likely token
    do_sample: bool = False
    # divides the logits before sampling (> 0)
    temperature: float = 1.0
    # sample among the top_k most likely tokens; None (or 0) = all of them
    top_k: int | None = None
    # nucleus sampling: among the smallest set of most likely tokens whose probability reaches top_p, in (0, 1]
    top_p: float | None = None
    # cache mode, one of CACHE_MODES
    cache: str = "windowed"
    # "windowed": latents kept when the latent caches are full and a forward pass resets them, in [1, max_latents];
    # None = flaxformer's default max(max_latents - 128, max_latents // 2, 1)
    reset_fill: int | None = None
    # a row stops after emitting this token (None: never) ...
    eos_token_id: int | None = None
    # ... and is filled with this one afterwards (default: eos_token_id, else 0), as transformers does
    pad_token_id: int | None = None
    # continuations per prompt (each prompt repeated, consecutively)
    num_return_sequences: int = 1
    # how decoding stores the weight matrices: "float32", "bfloat16" (half the bytes) or "int8" (a quarter; per-column
    # scales); a decoding step reads them all, so fewer bytes are a faster step (model/weights.py)
    weights: str = "float32"
    # left-pad prompts to power-of-two buckets: one compilation per bucket instead of per prompt length
    bucket: bool = True
    # prompt tokens whose keys/values prefill projects at once (bounds its memory for long prompts)
    chunk_size: int = 512

    def __post_init__(self):
        if self.top_k == 0:  # transformers' spelling of "no top-k"
            object.__setattr__(self, "top_k", None)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first setting that is out of range."""

        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise ValueError(f"{field}={getattr(self, field)!r} out of valid range: must be {allowed}")

        need(_is_int(self.num_latents), "num_latents", "an integer in [1, max_latents]")
        need(_is_int(self.max_new_tokens) and self.max_new_tokens >= 0, "max_new_tokens", "an integer >= 0")
        need(isinstance(self.do_sample, bool), "do_sample", "True or False")
        need(_is_number(self.temperature) and self.temperature > 0, "temperature", "a number > 0")
        need(self.top_k is None or (_is_int(self.top_k) and self.top_k >= 1), "top_k",
             "None (all tokens) or an integer >= 1")
        need(self.top_p is None or (_is_number(self.top_p) and 0.0 < self.top_p <= 1.0), "top_p",
             "None (off) or in (0, 1]")
        need(self.cache in CACHE_MODES, "cache", f"a cache mode, one of {CACHE_MODES}")
        need(self.reset_fill is None or _is_int(self.reset_fill), "reset_fill",
             "None or an integer in [1, max_latents]")
        for field in ("eos_token_id", "pad_token_id"):
            need(getattr(self, field) is None or (_is_int(getattr(self, field)) and getattr(self, field) >= 0),
                 field, "None or a token id >= 0")
        need(_is_int(self.num_return_sequences) and self.num_return_sequences >= 1, "num_return_sequences",
             "an integer >= 1")
        need(self.weights in WEIGHT_FORMATS, "weights", f"one of {WEIGHT_FORMATS}")
        need(isinstance(self.bucket, bool), "bucket", "True or False")
        need(_is_int(self.chunk_size) and self.chunk_size >= 1, "chunk_size", "an integer >= 1")

    def replace(self, **changes: Any) -> GenerationConfig:
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------------------------------------------------
    def check_prompt(self, model_config: CausalLanguageModelConfig, prompt_len: int) -> int:
        """perceiver-io's checks of a prompt's length and of num_latents for this model; returns the prompt's
        latents, min(num_latents, prompt_len)."""
        L, K = model_config.max_seq_len, model_config.max_latents
        if not 0 < prompt_len <= L:
            raise ValueError(f"Input sequence length {prompt_len} out of valid range [1..{L}] (max_seq_len)")
        if not 0 < self.num_latents <= K:
            raise ValueError(f"num_latents={self.num_latents} out of valid range [1..{K}]")
        if self.reset_fill is not None and not 0 < self.reset_fill <= K:
            raise ValueError(f"reset_fill={self.reset_fill} out of valid range [1..{K}] (max_latents)")
        num_latents = min(prompt_len, self.num_latents)
        prefix_len = prompt_len - num_latents
        if prefix_len > model_config.max_prefix_len:
            raise ValueError(f"For given sequence of length={prompt_len}, num_latents must be in range "
                             f"[{num_latents + prefix_len - model_config.max_prefix_len}..{K}]")
        return num_latents

    def reset_fill_for(self, model_config: CausalLanguageModelConfig) -> int:
        """reset_fill, or its default for this model: max(max_latents - 128, max_latents // 2, 1)."""
        if self.reset_fill is not None:
            return self.reset_fill
        K = model_config.max_latents
        return max(K - 128, K // 2, 1)

    @property
    def sampler(self) -> Sampler:
        """The settings that shape the compiled program."""
        return Sampler(self.do_sample, self.top_k if self.do_sample else None,
                       self.do_sample and self.top_p is not None and self.top_p < 1.0)

    @property
    def fill_token_id(self) -> int:
        """The token written after a row's EOS."""
        if self.pad_token_id is not None:
            return self.pad_token_id
        return self.eos_token_id if self.eos_token_id is not None else 0

    def sampling_args(self) -> SamplingArgs:
        """The settings passed to the compiled program as values."""
        return SamplingArgs(
            temperature=jnp.float32(self.temperature if self.do_sample else 1.0),
            top_p=jnp.float32(1.0 if self.top_p is None else self.top_p),
            eos_token_id=jnp.int32(-1 if self.eos_token_id is None else self.eos_token_id),
            pad_token_id=jnp.int32(self.fill_token_id))
