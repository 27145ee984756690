"""The sampling stage: perceiver-io's `generate(..., num_latents=K)` as one compiled decode loop.

    ids = generate(model, params, input_ids, num_latents=2, max_new_tokens=16, do_sample=True, top_k=20)
    text = Generator.from_pretrained("converted/")("A prompt", max_new_tokens=16)

Modules, from the bottom up: `cache.py` (ring buffers, positions), `steps.py` (prefill and one-token steps, each a
pass of the model's layers), `rules.py` (the choice of the next token), `loop.py` (the compiled loop),
`config.py` (`GenerationConfig`, validated once), `request.py` (a request on the host, `generate`),
`generator.py` (text in, text out).

Schedule (perceiver-io's): a prompt of S tokens starts with its last min(num_latents, S) tokens as latents and the
rest as prefix. Each new token first adds a latent until there are max_latents, then grows the prefix until it is
max_seq_len - max_latents long, then the window slides (the oldest token drops out). Cache modes (`CACHE_MODES`):
"windowed" (default, the paper's and flaxformer's decoding): latents grow by cached steps and, when there are more
than max_latents, one forward pass over the last max_prefix_len + reset_fill tokens resets them to reset_fill;
every step's logits equal a full forward over that step's window. "exact": every step's next-token logits equal
the model's full forward over perceiver-io's window (the training-time schedule), recomputing the latents once
the prefix moves. "perceiver-io": perceiver-io 0.11 + transformers 4.36 `generate(use_cache=True)` token for token.
Weight formats (`weights=`, model/weights.py): a decoding step reads every weight, so bfloat16 and int8 weights
make it faster.
"""

from perceiver_ar_jax.backend import enable_compilation_cache
from perceiver_ar_jax.sampling.config import CACHE_MODES, GenerationConfig
from perceiver_ar_jax.sampling.generator import Generator
from perceiver_ar_jax.sampling.request import Decoding, generate
from perceiver_ar_jax.sampling.rules import Sampler, SamplingArgs, next_token, nucleus_filter

__all__ = ["CACHE_MODES", "Decoding", "GenerationConfig", "Generator", "Sampler", "SamplingArgs",
           "enable_compilation_cache", "generate", "next_token", "nucleus_filter"]
