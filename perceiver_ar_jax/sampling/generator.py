"""Text in, text out: a model directory's parameters and tokenizer around the compiled decode loop.

    generator = Generator.from_pretrained("converted/")
    generator("Recently, I started to work on my", num_latents=2, max_new_tokens=16, do_sample=True, top_k=20)
    for piece in generator.stream("A prompt", max_new_tokens=64): print(piece, end="")
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from perceiver_ar_jax.model import CausalLanguageModelConfig
from perceiver_ar_jax.sampling.config import GenerationConfig
from perceiver_ar_jax.sampling.request import Decoding, decoding_params, precompile, settings, unwrap_params


class Generator:
    """Text in, text out: `Generator.from_pretrained(dir)("prompt", num_latents=2, max_new_tokens=16)`.

    A row stops at the tokenizer's EOS (`stop_at_eos=False` to go on); special tokens are left out of the text.
    Settings are a GenerationConfig (`config=`) and/or its fields as keywords, as for `generate`.
    """

    def __init__(self, config: CausalLanguageModelConfig, params: Any, tokenizer: Any):
        self.config, self.params, self.tokenizer = config, None if params is None else unwrap_params(params), tokenizer
        self._prepared: dict[str, Any] = {}  # weights format -> decoding_params, made once

    def _params_for(self, decoding: Decoding) -> Any:
        weights = decoding.generation.weights
        if weights not in self._prepared:
            self._prepared.clear()  # one prepared copy at a time
            self._prepared[weights] = decoding_params(self.params, self.config, weights, remember=False)
        return self._prepared[weights]

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, dtype: str | None = None,
                        warm_up: tuple[str, GenerationConfig] | None = None) -> Generator:
        """Load a model directory (converted, or a training run's directory: its latest checkpoint) and the
        tokenizer stored with it. dtype: compute dtype ("float32", "bfloat16"), default the checkpoint's.
        warm_up: (prompt, settings) of the first request: its decode loop is compiled (or loaded from the
        persistent compilation cache) while the weights load, so that its first token comes sooner."""
        from perceiver_ar_jax.checkpoints import load_model, read_config
        from perceiver_ar_jax.tokenizer import Tokenizer

        config = read_config(directory)
        if dtype is not None:
            config = config.replace(dtype=dtype)
        generator = cls(config, None, Tokenizer.from_pretrained(directory))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            loading = pool.submit(load_model, directory)
            if warm_up is not None:
                prompt, settings_ = warm_up
                precompile(config, len(generator.encode(prompt)), settings_)
            generator.params = unwrap_params(loading.result()[1])
        return generator

    def encode(self, prompt: str) -> list[int]:
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        ids = self.tokenizer.encode(prompt)
        if not 0 < len(ids) <= self.config.max_seq_len:
            raise ValueError(f"Input sequence length {len(ids)} out of valid range [1..{self.config.max_seq_len}]: "
                             f"the prompt is {len(ids)} tokens long, the model reads at most max_seq_len = "
                             f"{self.config.max_seq_len}")
        return ids

    def _decoding(self, prompt_ids: list[int], config: GenerationConfig | None, stop_at_eos: bool, rng: Any,
                  overrides: dict[str, Any]) -> Decoding:
        gen = settings(config, overrides).replace(eos_token_id=self.tokenizer.eos_id if stop_at_eos else None,
                                                  pad_token_id=self.tokenizer.pad_id)
        return Decoding(self.config, np.asarray([prompt_ids], np.int32), generation=gen, rng=rng)

    def __call__(self, prompt: str, *, config: GenerationConfig | None = None, seed: int = 0,
                 stop_at_eos: bool = True, return_full_text: bool = True, **overrides: Any) -> str | list[str]:
        """The prompt followed by its continuation (or the continuation only); a list if num_return_sequences > 1.
        seed: the random seed of sampling."""
        prompt_ids = self.encode(prompt)
        decoding = self._decoding(prompt_ids, config, stop_at_eos, seed, overrides)
        if decoding.max_new_tokens > 0:
            decoding.advance(self._params_for(decoding), decoding.max_new_tokens)
        # as transformers' text-generation pipeline: cut the decoded prompt off the decoded whole
        prompt_text = self.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        texts = []
        for row in decoding.sequences():
            continuation = self.tokenizer.decode(self._until_eos(row, len(prompt_ids), stop_at_eos),
                                                 skip_special_tokens=True)[len(prompt_text):]
            texts.append(prompt + continuation if return_full_text else continuation)
        return texts[0] if decoding.generation.num_return_sequences == 1 else texts

    def _until_eos(self, row: np.ndarray, prompt_len: int, stop_at_eos: bool) -> np.ndarray:
        if not stop_at_eos:
            return row
        eos = np.flatnonzero(row[prompt_len:] == self.tokenizer.eos_id)
        return row if eos.size == 0 else row[: prompt_len + eos[0]]

    def stream(self, prompt: str, *, config: GenerationConfig | None = None, rng: Any = None, segment: int = 8,
               stop_at_eos: bool = True, **overrides: Any) -> Iterator[str]:
        """Yield text as it is generated: first the prompt as the tokenizer decodes it, then the first token, then
        the continuation `segment` tokens at a time. The pieces join to decode(prompt + new tokens). The same
        compiled loop runs every segment."""
        prompt_ids = self.encode(prompt)
        decoding = self._decoding(prompt_ids, config, stop_at_eos, rng, overrides)
        text = self.tokenizer.incremental_decoder(skip_special_tokens=True)
        yield text.push(prompt_ids)
        emitted = 0
        while not decoding.done:  # the first token alone (it comes soonest), then `segment` at a time
            decoding.advance(self._params_for(decoding), emitted + (segment if emitted else 1))
            new = decoding.new_tokens()[0, emitted : int(decoding.state.step)]
            emitted += len(new)
            if stop_at_eos and self.tokenizer.eos_id in new:
                new = new[: list(new).index(self.tokenizer.eos_id)]
            yield text.push(new.tolist())
        yield text.flush()
