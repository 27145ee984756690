"""The one table of which perceiver-io tensor is which of our parameters, and how each one's layout changes.

perceiver-io's state_dict keys (without the `backend_model.` / `model.` prefix) against our parameter tree paths;
`torch_shape` / `from_torch` / `to_torch` turn a parameter's shape and values from one layout into the other.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from perceiver_ar_jax.model import CausalLanguageModelConfig

INV_FREQ_KEY = "input_adapter.frq_pos_encoding.inv_freq"  # a buffer: checked, not loaded (we compute it)
HF_PREFIX = "backend_model."


@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: its perceiver-io key (without prefix), its path in our tree, and its layout change.

    layout: "same" (identical), "linear" (torch (out, in) -> (in, out)), "to_heads" (torch (heads*head_dim, in)
    -> (in, heads, head_dim), a q/k/v projection), "from_heads" (torch (out, heads*head_dim) -> (heads, head_dim,
    out), an output projection).
    """

    torch_key: str
    path: tuple[str, ...]
    layout: str


def _attention_entries(torch_prefix: str, path: tuple[str, ...], out_bias: bool) -> list[Entry]:
    entries = [Entry(f"{torch_prefix}.{p}_proj.weight", (*path, f"{p}_proj", "kernel"), "to_heads") for p in "qkv"]
    entries.append(Entry(f"{torch_prefix}.o_proj.weight", (*path, "o_proj", "kernel"), "from_heads"))
    if out_bias:
        entries.append(Entry(f"{torch_prefix}.o_proj.bias", (*path, "o_proj", "bias"), "same"))
    return entries


def _norm_entries(torch_prefix: str, path: tuple[str, ...]) -> list[Entry]:
    return [Entry(f"{torch_prefix}.weight", (*path, "scale"), "same"),
            Entry(f"{torch_prefix}.bias", (*path, "bias"), "same")]


def _mlp_entries(torch_prefix: str, path: tuple[str, ...]) -> list[Entry]:
    # perceiver-io's MLP is nn.Sequential(LayerNorm, Linear, GELU, Linear): indices 0, 1, 3
    return [*_norm_entries(f"{torch_prefix}.0", (*path, "norm")),
            Entry(f"{torch_prefix}.1.weight", (*path, "fc1", "kernel"), "linear"),
            Entry(f"{torch_prefix}.3.weight", (*path, "fc2", "kernel"), "linear")]


def parameter_table(config: CausalLanguageModelConfig) -> list[Entry]:
    """Every parameter of `config`'s model, in perceiver-io's state_dict order."""
    table = [Entry("input_adapter.txt_embedding.weight", ("token_embedding", "embedding"), "same")]
    if config.abs_pos_emb:
        table.append(Entry("input_adapter.pos_embedding.weight", ("position_embedding", "embedding"), "same"))
    # the hybrid layer: cross_attention.0 = Residual(CrossAttention), cross_attention.1 = Residual(MLP)
    ca = ("cross_attention_layer",)
    table += _norm_entries("cross_attention.0.module.q_norm", (*ca, "q_norm"))
    table += _norm_entries("cross_attention.0.module.kv_norm", (*ca, "kv_norm"))
    table += _attention_entries("cross_attention.0.module.attention", (*ca, "attention"), out_bias=True)
    table += _mlp_entries("cross_attention.1.module", (*ca, "mlp"))
    for i in range(config.num_self_attention_layers):
        sa = (f"self_attention_layers_{i}",)
        table += _norm_entries(f"self_attention.{i}.0.module.norm", (*sa, "norm"))
        table += _attention_entries(f"self_attention.{i}.0.module.attention", (*sa, "attention"), out_bias=False)
        table += _mlp_entries(f"self_attention.{i}.1.module", (*sa, "mlp"))
    if config.output_norm:
        table += _norm_entries("out_norm", ("out_norm",))
    if config.output_bias:
        table.append(Entry("output_adapter.bias", ("output_bias",), "same"))
    return table


def torch_shape(shape: tuple[int, ...], layout: str) -> tuple[int, ...]:
    """The perceiver-io shape of a parameter of our `shape`."""
    if layout == "same":
        return tuple(shape)
    if layout == "linear":
        return tuple(reversed(shape))
    if layout == "to_heads":
        d_in, heads, head_dim = shape
        return heads * head_dim, d_in
    if layout == "from_heads":
        heads, head_dim, d_out = shape
        return d_out, heads * head_dim
    raise ValueError(layout)


def from_torch(tensor: np.ndarray, shape: tuple[int, ...], layout: str) -> np.ndarray:
    if layout == "same":
        return tensor
    return np.ascontiguousarray(tensor.T).reshape(shape)  # to_heads / from_heads: transpose, then split the heads


def to_torch(param: np.ndarray, layout: str) -> np.ndarray:
    if layout == "same":
        return param
    if layout == "linear":
        return np.ascontiguousarray(param.T)
    if layout == "to_heads":
        return np.ascontiguousarray(param.reshape(param.shape[0], -1).T)
    if layout == "from_heads":
        return np.ascontiguousarray(param.reshape(-1, param.shape[-1]).T)
    raise ValueError(layout)


def get_path(tree: dict, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def describe(config: CausalLanguageModelConfig) -> str:
    """The config fields that decide the tensors' shapes, for error messages."""
    return (f"num_channels={config.num_channels}, num_heads={config.num_heads}, "
            f"num_self_attention_layers={config.num_self_attention_layers}, vocab_size={config.vocab_size}, "
            f"abs_pos_emb={config.abs_pos_emb}, output_norm={config.output_norm}, output_bias={config.output_bias}")
