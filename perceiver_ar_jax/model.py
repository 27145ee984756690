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

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_jax import matmul
from perceiver_ar_jax.attention import MultiHeadAttention
from perceiver_ar_jax.config import CausalLanguageModelConfig
from perceiver_ar_jax.masks import causal_mask, cross_attention_mask, prefix_keep_indices
from perceiver_ar_jax.position import positions, rotary_angles

LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default


def layer_norm(name: str, config: CausalLanguageModelConfig) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=LAYER_NORM_EPSILON,
        use_fast_variance=False,  # two-pass variance, as torch computes it
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name=name,
    )


def attention(config: CausalLanguageModelConfig, out_bias: bool) -> MultiHeadAttention:
    return MultiHeadAttention(
        num_heads=config.num_heads,
        num_channels=config.num_channels,
        out_bias=out_bias,
        init_scale=config.init_scale,
        dropout_rate=config.post_attention_dropout,
        max_heads_parallel=config.max_heads_parallel,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        attention_impl=config.attention_impl,
        attention_block_size=config.attention_block_size,
        name="attention",
    )


class MLP(nn.Module):
    """LayerNorm -> Linear (widening) -> exact GELU -> Linear, no biases (perceiver-io's mlp_bias=False)."""

    config: CausalLanguageModelConfig
    widening_factor: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        init = nn.initializers.normal(stddev=cfg.init_scale)
        dense = lambda features, axes, name: nn.Dense(  # noqa: E731
            features, use_bias=False, dtype=cfg.dtype, param_dtype=cfg.param_dtype, dot_general=matmul.dot_general,
            kernel_init=nn.with_logical_partitioning(init, axes), name=name)
        h = layer_norm("norm", cfg)(x)
        h = dense(self.widening_factor * cfg.num_channels, ("embed", "mlp"), "fc1")(h)
        # in float32: XLA:CPU has no bf16 elementwise maths, and converting is what it would do anyway
        h = nn.gelu(h.astype(jnp.float32), approximate=False).astype(h.dtype)
        return dense(cfg.num_channels, ("mlp", "embed"), "fc2")(h)


class HybridCrossAttentionLayer(nn.Module):
    """The first layer: latents attend to the prefix and to themselves (causally), then an MLP.

    Prefix tokens are normalised with `kv_norm`, latent tokens with `q_norm`, both as queries and as keys.
    """

    config: CausalLanguageModelConfig

    def setup(self):
        cfg = self.config
        self.q_norm = layer_norm("q_norm", cfg)
        self.kv_norm = layer_norm("kv_norm", cfg)
        self.attention = attention(cfg, out_bias=True)  # the hybrid layer's output projection has a bias
        self.mlp = MLP(cfg, cfg.cross_attention_widening_factor, name="mlp")
        self.residual_dropout = nn.Dropout(cfg.residual_dropout)

    def __call__(
        self,
        x_latent: jnp.ndarray,
        x_prefix: jnp.ndarray,
        latent_angles: jnp.ndarray,
        prefix_angles: jnp.ndarray,
        mask: jnp.ndarray,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """x_latent (batch, latents, channels), x_prefix (batch, prefix, channels); angles (batch, ., rotated);
        mask broadcastable to (batch, heads, latents, prefix + latents). Returns (batch, latents, channels)."""
        q_in = self.q_norm(x_latent)
        # keys/values of [kv_norm(prefix), q_norm(latents)]; a long prefix is normalised block by block there
        h = self.attention.hybrid(q_in, x_prefix, latent_angles, prefix_angles, mask, self.kv_norm,
                                  self.config.context_parallel_axis, deterministic)
        x = x_latent + self.residual_dropout(h, deterministic=deterministic)
        return x + self.residual_dropout(self.mlp(x), deterministic=deterministic)


class SelfAttentionLayer(nn.Module):
    """Causal self-attention over the latents (no pad mask, as in perceiver-io), then an MLP."""

    config: CausalLanguageModelConfig
    rotary: bool

    def setup(self):
        cfg = self.config
        self.norm = layer_norm("norm", cfg)
        self.attention = attention(cfg, out_bias=False)
        self.mlp = MLP(cfg, cfg.self_attention_widening_factor, name="mlp")
        self.residual_dropout = nn.Dropout(cfg.residual_dropout)

    def __call__(self, x: jnp.ndarray, angles: jnp.ndarray, mask: jnp.ndarray,
                 deterministic: bool = True) -> jnp.ndarray:
        """x (batch, latents, channels); angles (batch, latents, rotated), used only if self.rotary."""
        h_in = self.norm(x)
        k, v = self.attention.project_kv(h_in)
        angles = angles if self.rotary else None
        h = self.attention(h_in, k, v, angles, angles, mask, deterministic)
        x = x + self.residual_dropout(h, deterministic=deterministic)
        return x + self.residual_dropout(self.mlp(x), deterministic=deterministic)


def remat(layer_class: type[nn.Module], config: CausalLanguageModelConfig) -> type[nn.Module]:
    """The layer class itself, or a rematerialised one (activations recomputed in the backward pass)."""
    if not config.activation_checkpointing:
        return layer_class
    policy = getattr(jax.checkpoint_policies, config.remat_policy)
    # static_argnums counts `self`: the last argument, `deterministic`, is a Python bool
    num_args = {HybridCrossAttentionLayer: 7, SelfAttentionLayer: 5}[layer_class]
    return nn.remat(layer_class, policy=policy, static_argnums=(num_args - 1,))


class CausalLanguageModel(nn.Module):
    """Perceiver AR for causal language modelling.

    `model.apply({"params": params}, input_ids, prefix_len=p, pad_mask=mask)` returns the logits of the latent
    positions, (batch, N - p, vocab_size), float32.
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
        mask = cross_attention_mask(num_latents, x_prefix.shape[1] + num_latents, key_pad)
        x_latent = self.cross_attention_layer(x_latent, x_prefix, latent_angles, prefix_angles, mask, deterministic)

        mask = causal_mask(num_latents, num_latents)
        for layer in self.self_attention_layers:
            x_latent = layer(x_latent, latent_angles, mask, deterministic)
        return self.logits(x_latent)

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

    def logits(self, x_latent: jnp.ndarray, output_kernel: jnp.ndarray | None = None) -> jnp.ndarray:
        """(batch, latents, channels) -> float32 logits (batch, latents, vocab) through the tied embedding.

        output_kernel: the embedding transposed, (channels, vocab), in the compute dtype, or None. Decoding passes
        it (made once per loop, see kv_cache.output_kernel); the product is the same either way.
        """
        if self.config.output_norm:
            x_latent = self.out_norm(x_latent)
        batch_size, num_latents, channels = x_latent.shape
        rows = x_latent.astype(self.config.dtype).reshape(-1, channels)
        if output_kernel is None:
            embedding = self.token_embedding.embedding.astype(self.config.dtype)
            logits = matmul.matmul(rows, embedding, jnp.float32, rhs_transposed=True)
        else:
            logits = matmul.matmul(rows, output_kernel, jnp.float32)
        logits = logits.reshape(batch_size, num_latents, -1)
        if self.config.output_bias:
            logits = logits + self.output_bias.astype(jnp.float32)
        return logits
