"""Perceiver AR causal language model (Hawthorne et al. 2022), numerically as perceiver-io 0.11's
`perceiver.model.text.clm.CausalLanguageModel`.

An input of N tokens is split into a prefix (the first `prefix_len` tokens) and N - prefix_len latents:

    tokens (batch, N) --embed--> x (batch, N, channels)
    hybrid layer:  latents attend to [prefix, latents], causally          -> (batch, latents, channels)
    L - 1 causal self-attention layers over the latents only              -> (batch, latents, channels)
    optional LayerNorm, then logits tied to the token embedding           -> (batch, latents, vocab)

So only the first layer pays for the prefix. Every layer is pre-LayerNorm attention + residual, then a
pre-LayerNorm GELU MLP + residual. Rotary position embedding is applied in the hybrid layer and in the first
`num_self_attention_rotary_layers` self-attention layers.
"""

from __future__ import annotations

import operator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_jax import backend
from perceiver_ar_jax.model.config import CausalLanguageModelConfig
from perceiver_ar_jax.model.layers import HybridCrossAttentionLayer, SelfAttentionLayer, layer_norm, remat
from perceiver_ar_jax.model.masks import AttentionMask, prefix_keep_indices
from perceiver_ar_jax.model.positions import positions, rotary_angles


class CausalLanguageModel(nn.Module):
    """Perceiver AR for causal language modelling.

    `model.apply({"params": params}, input_ids, prefix_len=p, pad_mask=mask)` returns the logits of the latent
    positions, (batch, N - p, vocab_size), float32. A loss over a large vocabulary takes `method="hidden"` instead
    (the output-normed latents, (batch, N - p, channels)) and `method="project"` on chunks of them
    (training/loss.py), so that all the logits never exist at once.
    """

    config: CausalLanguageModelConfig

    def setup(self):
        cfg = self.config
        init = nn.initializers.normal(stddev=cfg.init_scale)
        self.token_embedding = nn.Embed(
            cfg.vocab_size, cfg.num_channels, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(init, ("vocab", "embed")))
        if cfg.abs_pos_emb:
            self.position_embedding = nn.Embed(
                cfg.max_seq_len, cfg.num_channels, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                embedding_init=nn.with_logical_partitioning(init, (None, "embed")))
        self.cross_attention_layer = remat(HybridCrossAttentionLayer, cfg)(cfg)
        self.self_attention_layers = [
            remat(SelfAttentionLayer, cfg)(cfg, rotary=i < cfg.num_rotary_self_attention_layers)
            for i in range(cfg.num_self_attention_layers)
        ]
        if cfg.output_norm:
            self.out_norm = layer_norm("out_norm", cfg)
        if cfg.output_bias:
            self.output_bias = self.param(
                "output_bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)), (cfg.vocab_size,),
                cfg.param_dtype)

    # ------------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        input_ids: jnp.ndarray,
        prefix_len: int,
        pad_mask: jnp.ndarray | None = None,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """input_ids (batch, N) int; prefix_len a Python int in [0, N) and <= max_seq_len - max_latents;
        pad_mask (batch, N) bool, True = pad, rows left-padded, or None. Returns (batch, N - prefix_len, vocab)."""
        return self.project(self.hidden(input_ids, prefix_len, pad_mask, deterministic))

    def hidden(
        self,
        input_ids: jnp.ndarray,
        prefix_len: int,
        pad_mask: jnp.ndarray | None = None,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """The arguments of `__call__` -> the rows the output projection takes: the last layer's latents after the
        output norm, (batch, N - prefix_len, channels)."""
        cfg = self.config
        batch_size, seq_len = input_ids.shape
        prefix_len = self.check_prefix_len(prefix_len, seq_len)

        pos = positions(batch_size, seq_len, pad_mask)
        x = self.embed(input_ids, pos)
        angles = rotary_angles(pos, cfg.num_rotated_channels)

        x_prefix, x_latent = x[:, :prefix_len], x[:, prefix_len:]
        prefix_angles, latent_angles = angles[:, :prefix_len], angles[:, prefix_len:]
        prefix_pad = None if pad_mask is None else pad_mask[:, :prefix_len]
        if not deterministic and prefix_len > 0 and cfg.cross_attention_dropout > 0.0:
            x_prefix, prefix_angles, prefix_pad = self.drop_prefix_positions(x_prefix, prefix_angles, prefix_pad)

        num_latents = seq_len - prefix_len
        key_pad = None if pad_mask is None else jnp.concatenate([prefix_pad, pad_mask[:, prefix_len:]], axis=1)
        # what each kernel implements: right-aligned causal with pad keys hidden (masks.AttentionMask)
        mask = AttentionMask(num_latents, x_prefix.shape[1] + num_latents, causal=True, key_pad=key_pad)
        x_latent = self.cross_attention_layer(x_latent, x_prefix, latent_angles, prefix_angles, mask, deterministic)

        mask = AttentionMask(num_latents, num_latents, causal=True)  # no pad mask here, as in perceiver-io
        for layer in self.self_attention_layers:
            x_latent, _ = layer(x_latent, latent_angles, mask, deterministic)
        return self.normalize_output(x_latent)

    # ------------------------------------------------------------------------------------------------------------
    def check_prefix_len(self, prefix_len, seq_len: int) -> int:
        try:
            prefix_len = operator.index(prefix_len)
        except TypeError:
            raise TypeError(f"prefix_len must be a Python int (static under jit), "
                            f"got {type(prefix_len).__name__}") from None
        if seq_len > self.config.max_seq_len:
            raise ValueError(f"input length {seq_len} exceeds max_seq_len ({self.config.max_seq_len})")
        if not 0 <= prefix_len < seq_len:
            raise ValueError(f"prefix_len ({prefix_len}) out of valid range [0..{seq_len}) for input length {seq_len}")
        if prefix_len > self.config.max_prefix_len:
            raise ValueError(f"prefix_len ({prefix_len}) exceeds max_prefix_len ({self.config.max_prefix_len} = "
                             f"max_seq_len {self.config.max_seq_len} - max_latents {self.config.max_latents})")
        return prefix_len

    def embed(self, input_ids: jnp.ndarray, pos: jnp.ndarray) -> jnp.ndarray:
        """Token embedding (+ absolute position embedding): (batch, n) ids and positions -> (batch, n, channels)."""
        x = self.token_embedding(input_ids)
        if self.config.abs_pos_emb:
            x = x + self.position_embedding(pos)
        return x

    def drop_prefix_positions(self, x_prefix, prefix_angles, prefix_pad):
        """Training-time cross-attention dropout: keep a random subset of prefix positions per example, in order."""
        batch_size, prefix_len = x_prefix.shape[:2]
        rate = self.config.cross_attention_dropout
        kept = prefix_keep_indices(self.make_rng("dropout"), batch_size, prefix_len, rate)
        take = lambda a: jnp.take_along_axis(a, kept.reshape(kept.shape + (1,) * (a.ndim - 2)), axis=1)  # noqa: E731
        return take(x_prefix), take(prefix_angles), None if prefix_pad is None else take(prefix_pad)

    def logits(self, x_latent: jnp.ndarray) -> jnp.ndarray:
        """(batch, latents, channels) -> float32 logits (batch, latents, vocab) through the tied embedding."""
        return self.project(self.normalize_output(x_latent))

    def normalize_output(self, x_latent: jnp.ndarray) -> jnp.ndarray:
        """The optional LayerNorm before the output projection (per row, so it may run before chunking)."""
        return self.out_norm(x_latent) if self.config.output_norm else x_latent

    def project(self, x_latent: jnp.ndarray) -> jnp.ndarray:
        """Output-normed rows (batch, n, channels) -> float32 logits (batch, n, vocab) through the tied embedding
        (+ bias). Reads only the parameters of OUTPUT_PARAMS, so a loss may apply it to those alone."""
        batch_size, num_latents, channels = x_latent.shape
        rows = x_latent.astype(self.config.dtype).reshape(-1, channels)
        if self.has_variable("params", "output_projection"):  # decoding with prepared weights (model/weights.py)
            prepared = self.get_variable("params", "output_projection")
            logits = backend.prepared_matmul(rows, prepared, self.config.vocab_size, jnp.float32)
        else:
            embedding = self.token_embedding.embedding.astype(self.config.dtype)
            logits = backend.tied_output(rows, embedding, self.config.precision)
        logits = logits.reshape(batch_size, num_latents, -1)
        if self.config.output_bias:
            logits = logits + self.output_bias.astype(jnp.float32)
        return logits


# the parameters that `CausalLanguageModel.project` reads (those present in a model's tree)
OUTPUT_PARAMS = ("token_embedding", "output_bias", "output_projection")


def output_params(params: Any) -> dict[str, Any]:
    """The part of a parameter tree that the output projection reads (its gradient is all the loss adds)."""
    return {name: params[name] for name in OUTPUT_PARAMS if name in params}


def abstract_params(config: CausalLanguageModelConfig) -> Any:
    """The parameter tree of `config`'s model as jax.ShapeDtypeStruct leaves (nothing allocated)."""
    model = CausalLanguageModel(config)
    ids = jnp.zeros((1, config.max_latents), jnp.int32)  # parameter shapes do not depend on the length
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), ids, prefix_len=0))
    return nn.unbox(variables["params"])
