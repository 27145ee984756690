"""The layers of Perceiver AR: the hybrid cross-attention layer and the causal self-attention layer.

Every layer is pre-LayerNorm attention + residual, then a pre-LayerNorm GELU MLP + residual (`residual_block`,
written once). Each layer has one forward pass, used for training and for decoding alike:

- `HybridCrossAttentionLayer.__call__`: the latents attend to [prefix, latents] (a full forward pass);
  `.decode`: new latents attend to keys/values held in a cache (and to their own), and `.keys_values` gives the
  keys/values of tokens as the layer computes them, for a cache to hold;
- `SelfAttentionLayer.__call__`: causal self-attention among its input tokens, or, given a cache, of new tokens to
  the cached ones and themselves; it returns the keys/values of its input tokens too, which a decoder caches.
"""

from __future__ import annotations

import inspect

import flax.linen as nn
import jax
import jax.numpy as jnp

from perceiver_ar_jax import backend
from perceiver_ar_jax.model.attention import CachedKeysValues, MultiHeadAttention
from perceiver_ar_jax.model.config import CausalLanguageModelConfig
from perceiver_ar_jax.model.linear import Linear
from perceiver_ar_jax.model.masks import Mask

LAYER_NORM_EPSILON = 1e-5  # torch.nn.LayerNorm's default

KeysValues = tuple[jnp.ndarray, jnp.ndarray]  # rotated keys and values, each (batch, tokens, heads, head_dim)


class LayerNorm(nn.LayerNorm):
    """Flax's LayerNorm (its parameters, its results to float32 rounding); on CPU through `backend.layer_norm`'s
    kernel (XLA:CPU evaluates a norm and its derivative in several fusions: the kernel made the bench train step
    ~4% faster in fp32, ~6% in bf16)."""

    @nn.compact
    def __call__(self, x, *, mask=None):
        out_dtype = self.dtype or jnp.result_type(x, self.param_dtype)
        flax_defaults = (self.use_scale and self.use_bias and self.reduction_axes == -1 and self.feature_axes == -1
                         and self.axis_name is None and not self.use_fast_variance)
        if mask is None and flax_defaults and backend.layer_norm_on_kernel(x, out_dtype):
            scale = self.param("scale", self.scale_init, (x.shape[-1],), self.param_dtype)
            bias = self.param("bias", self.bias_init, (x.shape[-1],), self.param_dtype)
            return backend.layer_norm(x, scale, bias, self.epsilon, out_dtype)
        return super().__call__(x, mask=mask)


def layer_norm(name: str, config: CausalLanguageModelConfig) -> nn.LayerNorm:
    return LayerNorm(
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
        precision=config.precision,
        name="attention",
    )


class MLP(nn.Module):
    """LayerNorm -> Linear (widening) -> exact GELU -> Linear, no biases (perceiver-io's mlp_bias=False)."""

    config: CausalLanguageModelConfig
    widening_factor: int

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        cfg = self.config
        dense = lambda features, axes, name: Linear(  # noqa: E731
            (features,), axes, cfg.init_scale, dtype=cfg.dtype, param_dtype=cfg.param_dtype, precision=cfg.precision,
            name=name)
        h = layer_norm("norm", cfg)(x)
        h = dense(self.widening_factor * cfg.num_channels, ("embed", "mlp"), "fc1")(h)
        h = backend.gelu(h)  # evaluated in float32, rounded to h's dtype
        return dense(cfg.num_channels, ("mlp", "embed"), "fc2")(h)


def residual_block(layer: nn.Module, x: jnp.ndarray, attention_out: jnp.ndarray, deterministic: bool) -> jnp.ndarray:
    """The end of every layer: x + attention output, then + MLP of that, each branch through residual dropout."""
    x = x + layer.residual_dropout(attention_out, deterministic=deterministic)
    return x + layer.residual_dropout(layer.mlp(x), deterministic=deterministic)


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
        mask: Mask,
        deterministic: bool = True,
    ) -> jnp.ndarray:
        """x_latent (batch, latents, channels), x_prefix (batch, prefix, channels); angles (batch, ., rotated);
        mask: an AttentionMask of latents x (prefix + latents), or a bool array broadcastable to (batch, heads,
        latents, prefix + latents). Returns (batch, latents, channels)."""
        # keys/values of [kv_norm(prefix), q_norm(latents)]; a long prefix is normalised block by block there
        h = self.attention.hybrid(self.q_norm(x_latent), x_prefix, latent_angles, prefix_angles, mask, self.kv_norm,
                                  deterministic)
        return residual_block(self, x_latent, h, deterministic)

    def keys_values(self, x: jnp.ndarray, angles: jnp.ndarray, is_prefix: jnp.ndarray | bool) -> KeysValues:
        """Decoding: the rotated keys/values of tokens x (batch, n, channels) as this layer computes them: a prefix
        token's from kv_norm(x), a latent's from q_norm(x). is_prefix: a Python bool for all of them, or bool
        broadcastable to (batch, n)."""
        if isinstance(is_prefix, bool):
            h = self.kv_norm(x) if is_prefix else self.q_norm(x)
        else:
            h = jnp.where(jnp.asarray(is_prefix)[..., None], self.kv_norm(x), self.q_norm(x))
        return self.attention.keys_values(h, angles)

    def decode(self, x_latent: jnp.ndarray, latent_angles: jnp.ndarray, cache: CachedKeysValues,
               with_own_keys: bool = True) -> tuple[jnp.ndarray, KeysValues | None]:
        """Decoding: latents x_latent (batch, n, channels) attend to the cached keys/values and, with_own_keys,
        to their own (whose keys/values are returned for the cache; otherwise they are in the cache already).
        Returns (batch, n, channels) and the keys/values or None."""
        q_in = self.q_norm(x_latent)
        own = self.attention.keys_values(q_in, latent_angles) if with_own_keys else None
        h = self.attention.attend_cached(q_in, latent_angles, cache, own)
        return residual_block(self, x_latent, h, deterministic=True), own


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

    def __call__(self, x: jnp.ndarray, angles: jnp.ndarray, mask: Mask, deterministic: bool = True,
                 cache: CachedKeysValues | None = None) -> tuple[jnp.ndarray, KeysValues]:
        """x (batch, n, channels); angles (batch, n, rotated), used only if self.rotary; mask: among x's tokens.

        cache: None, or the keys/values of earlier tokens that x's tokens (the newest) attend to besides
        themselves, causally (then `mask` is not used). Returns the new x and the rotated keys/values of x's
        tokens, (batch, n, heads, head_dim) each, which a decoder caches.
        """
        h = self.norm(x)
        angles = angles if self.rotary else None
        k, v = self.attention.keys_values(h, angles)
        if cache is None:
            h = self.attention(h, k, v, angles, None, mask, deterministic)
        else:
            h = self.attention.attend_cached(h, angles, cache, (k, v))
        return residual_block(self, x, h, deterministic), (k, v)


def remat(layer_class: type[nn.Module], config: CausalLanguageModelConfig) -> type[nn.Module]:
    """The layer class itself, or a rematerialised one (activations recomputed in the backward pass)."""
    if not config.activation_checkpointing:
        return layer_class
    policy = getattr(jax.checkpoint_policies, config.remat_policy)
    # `deterministic` is a Python bool (it decides whether dropout runs): static under the checkpoint
    static = list(inspect.signature(layer_class.__call__).parameters).index("deterministic")
    return nn.remat(layer_class, policy=policy, static_argnums=(static,))
