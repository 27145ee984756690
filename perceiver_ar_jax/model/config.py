"""Model configuration: perceiver-io's `CausalLanguageModelConfig`, field for field, plus JAX execution knobs.

The first block of fields has the names, defaults and meaning of perceiver-io 0.11's `CausalLanguageModelConfig`
(`perceiver.model.core.config.CausalSequenceModelConfig` and its base `PerceiverARConfig`), so a `model_config`
dict from a perceiver-io `config.json` or Lightning `hyper_parameters` maps onto it directly. The second block only
changes how the same maths is executed (dtypes, matmul precision, rematerialisation, attention kernel), never what
it computes.

Context parallelism is not a model field: the hybrid layer splits its prefix over the mesh axes that the logical
axis `context` maps to in the active logical-axis rules (`model/sharding.py`). An older config that still has
`context_parallel_axis` loads (`from_dict` drops it with a warning; a training config's is turned into the rule
`("context", axis)` by `training.partitioning.logical_axis_rules`).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Mapping
from typing import Any

from perceiver_ar_jax.errors import ConfigError, check

REMAT_POLICIES = (
    "nothing_saveable",
    "dots_saveable",
    "dots_with_no_batch_dims_saveable",
    "everything_saveable",
)
ATTENTION_IMPLS = ("auto", "xla", "blockwise", "splash", "cudnn")
DTYPES = ("float32", "bfloat16", "float16")
MATMUL_PRECISIONS = ("auto", "default", "high", "highest")
# fields of earlier versions that are read and dropped (see the module docstring)
LEGACY_FIELDS = ("context_parallel_axis",)


@dataclasses.dataclass(frozen=True)
class CausalLanguageModelConfig:
    # --- perceiver-io CausalLanguageModelConfig (same names, same defaults, same meaning) ---
    vocab_size: int = 262  # number of token ids; the output projection is tied to the token embedding
    max_seq_len: int = 4096  # longest input (prefix + latents); also the size of the absolute position table
    max_latents: int = 512  # most latent positions (queries of the hybrid cross-attention layer)
    num_channels: int = 512  # model width
    num_heads: int = 8  # attention heads of every layer
    max_heads_parallel: int | None = None  # heads computed at once by the dense attention (memory knob only)
    num_self_attention_layers: int = 8  # causal self-attention layers over the latents (after the hybrid layer)
    num_self_attention_rotary_layers: int = 1  # how many of them (from the first) use rotary embedding; -1 = all
    self_attention_widening_factor: int = 4  # MLP hidden width / num_channels in self-attention layers
    cross_attention_widening_factor: int = 4  # MLP hidden width / num_channels in the hybrid layer
    cross_attention_dropout: float = 0.5  # fraction of prefix positions dropped per example while training
    post_attention_dropout: float = 0.0  # dropout on attention probabilities
    residual_dropout: float = 0.0  # dropout on each residual branch before it is added
    activation_checkpointing: bool = False  # rematerialise each layer's activations in the backward pass
    activation_offloading: bool = False  # PyTorch-only (CPU offload of checkpoints); accepted and ignored here
    output_norm: bool = False  # LayerNorm before the tied output projection
    output_bias: bool = True  # learned bias on the logits
    abs_pos_emb: bool = True  # learned absolute position embedding; rotary then covers half of each head
    init_scale: float = 0.02  # std of the normal init of embeddings and projection kernels

    # --- JAX execution (do not change the maths) ---
    dtype: str = "float32"  # compute dtype of matmuls and activations (softmax and norms stay float32)
    param_dtype: str = "float32"  # storage dtype of parameters
    remat_policy: str = "nothing_saveable"  # jax.checkpoint_policies name used when activation_checkpointing
    # precision of every matrix product (lax.Precision): "default" (TPU: one bf16 pass for float32 operands; GPU:
    # TF32), "high" (TPU: three bf16 passes; GPU: TF32), "highest" (full float32); "auto": "highest" when dtype is
    # float32 (perceiver-io's float32 results to 1e-4 on every backend), else "default" (bf16 products are exact)
    matmul_precision: str = "auto"
    # "xla" dense, "blockwise" online softmax, "splash" TPU kernel, "cudnn" GPU flash attention, "auto" picks
    attention_impl: str = "auto"
    attention_block_size: int = 512  # key block length of the blockwise attention

    def __post_init__(self):
        self.validate()

    # ------------------------------------------------------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        """Channels per head (queries, keys and values all have num_channels channels in total)."""
        return self.num_channels // self.num_heads

    @property
    def num_rotated_channels(self) -> int:
        """Channels per head rotated by the rotary embedding: all of them, or the first half with abs_pos_emb."""
        return self.head_dim // 2 if self.abs_pos_emb else self.head_dim

    @property
    def precision(self) -> str:
        """matmul_precision with "auto" resolved: "highest" for float32 compute, else "default"."""
        if self.matmul_precision != "auto":
            return self.matmul_precision
        return "highest" if self.dtype == "float32" else "default"

    @property
    def max_prefix_len(self) -> int:
        return self.max_seq_len - self.max_latents

    @property
    def num_rotary_self_attention_layers(self) -> int:
        n = self.num_self_attention_rotary_layers
        return self.num_self_attention_layers if n == -1 else min(n, self.num_self_attention_layers)

    # ------------------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError (a ValueError) naming the first field that is out of range."""

        def need(ok: bool, field: str, allowed: str):
            check(ok, field, getattr(self, field), allowed)

        def is_int(v):
            return isinstance(v, int) and not isinstance(v, bool)

        for field in ("vocab_size", "max_seq_len", "max_latents", "num_channels", "num_heads",
                      "self_attention_widening_factor", "cross_attention_widening_factor", "attention_block_size"):
            need(is_int(getattr(self, field)) and getattr(self, field) >= 1, field, "an integer >= 1")
        need(is_int(self.num_self_attention_layers) and self.num_self_attention_layers >= 0,
             "num_self_attention_layers", "an integer >= 0")
        need(self.max_latents <= self.max_seq_len, "max_latents", f"<= max_seq_len ({self.max_seq_len})")
        need(self.num_channels % self.num_heads == 0, "num_channels",
             f"divisible by num_heads ({self.num_heads})")
        need(self.num_rotated_channels % 2 == 0 and self.num_rotated_channels > 0, "num_channels",
             f"such that the rotated channels per head ({self.num_rotated_channels}) are even and > 0 "
             "(num_channels / num_heads, halved when abs_pos_emb)")
        need(self.max_heads_parallel is None or (is_int(self.max_heads_parallel) and self.max_heads_parallel >= 1),
             "max_heads_parallel", "None or an integer >= 1")
        need(is_int(self.num_self_attention_rotary_layers) and self.num_self_attention_rotary_layers >= -1,
             "num_self_attention_rotary_layers", "-1 (all) or an integer >= 0")
        for field in ("cross_attention_dropout", "post_attention_dropout", "residual_dropout"):
            need(isinstance(getattr(self, field), (int, float)) and 0.0 <= getattr(self, field) < 1.0, field,
                 "in [0, 1)")
        need(isinstance(self.init_scale, (int, float)) and self.init_scale > 0, "init_scale", "> 0")
        for field in ("activation_checkpointing", "activation_offloading", "output_norm", "output_bias",
                      "abs_pos_emb"):
            need(isinstance(getattr(self, field), bool), field, "true or false")
        need(self.dtype in DTYPES, "dtype", f"one of {DTYPES}")
        need(self.param_dtype in DTYPES, "param_dtype", f"one of {DTYPES}")
        need(self.remat_policy in REMAT_POLICIES, "remat_policy", f"one of {REMAT_POLICIES}")
        need(self.attention_impl in ATTENTION_IMPLS, "attention_impl", f"one of {ATTENTION_IMPLS}")
        need(self.matmul_precision in MATMUL_PRECISIONS, "matmul_precision", f"one of {MATMUL_PRECISIONS}")

    # ------------------------------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> CausalLanguageModelConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_perceiver_io_dict(self) -> dict[str, Any]:
        """The fields of perceiver-io's CausalLanguageModelConfig only (the `model_config` of its config.json)."""
        return {k: v for k, v in self.to_dict().items() if k in PERCEIVER_IO_FIELDS}

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], strict: bool = False) -> CausalLanguageModelConfig:
        """Build from a dict; unknown keys are an error with strict=True, else ignored (like perceiver-io's
        `create`, which also drops the Lightning-only hyper-parameters such as `validation_sample_prompt`).
        LEGACY_FIELDS are accepted and dropped; a context_parallel_axis that was set is named in a warning."""
        known = {f.name for f in dataclasses.fields(cls)}
        axis = values.get("context_parallel_axis")
        if axis is not None:
            warnings.warn(f"model config context_parallel_axis={axis!r} is no longer a model field: the prefix is "
                          f"split over the mesh axes of the logical axis 'context', e.g. the rule ('context', "
                          f"{axis!r}) first in mesh.logical_axis_rules (training configs that still set "
                          "model.context_parallel_axis get that rule)", FutureWarning, stacklevel=2)
        unknown = sorted(set(values) - known - set(LEGACY_FIELDS))
        if strict and unknown:
            raise ConfigError.unknown(unknown[0], values[unknown[0]], known)
        return cls(**{k: v for k, v in values.items() if k in known})


PERCEIVER_IO_FIELDS = tuple(
    f.name for f in dataclasses.fields(CausalLanguageModelConfig) if f.name not in
    ("dtype", "param_dtype", "remat_policy", "matmul_precision", "attention_impl", "attention_block_size")
)
