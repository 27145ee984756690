"""Checkpoint conversion between perceiver-io (PyTorch) and perceiver-ar-jax, both ways.

    python -m perceiver_ar_jax.convert SRC DST                # perceiver-io HF dir or Lightning .ckpt -> our dir
    python -m perceiver_ar_jax.convert --to-pytorch SRC DST   # our dir -> HF dir perceiver-io's from_pretrained loads

One explicit table (`parameter_table`) says which perceiver-io tensor is which of our parameters and how its layout
changes. Every tensor's shape is checked against the config before it is used, and a checkpoint with a missing or
an unused tensor is refused, naming the keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any

import ml_dtypes
import numpy as np

from perceiver_ar_jax.checkpoint import (
    abstract_params,
    copy_tokenizer_files,
    load_model,
    save_model,
    staged_directory,
)
from perceiver_ar_jax.config import CausalLanguageModelConfig
from perceiver_ar_jax.position import inverse_frequencies
from perceiver_ar_jax.safetensors_io import write_safetensors
from perceiver_ar_jax.torch_checkpoint import CheckpointError, TorchCheckpoint, read_perceiver_io_checkpoint

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


def _get(tree: dict, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------------------------------------------
def load_torch_checkpoint(path: str | os.PathLike, param_dtype: str | None = None, **config_overrides: Any):
    """Read a perceiver-io checkpoint (HF directory or Lightning .ckpt) -> (config, params).

    params is a nested dict of host numpy arrays in our layout, ready for
    `CausalLanguageModel(config).apply({"params": params}, ...)`. `param_dtype` (default float32) is the dtype
    the weights are stored in; `config_overrides` set JAX-only config fields (dtype, activation_checkpointing, ...).
    """
    return _convert_checkpoint(read_perceiver_io_checkpoint(path), param_dtype, config_overrides)


def _convert_checkpoint(ckpt: TorchCheckpoint, param_dtype: str | None, config_overrides: dict[str, Any]):
    """An opened perceiver-io checkpoint -> (config, params), as `load_torch_checkpoint` describes."""
    try:
        config = CausalLanguageModelConfig.from_dict(ckpt.model_config)
        if param_dtype is not None:
            config_overrides["param_dtype"] = param_dtype
        config = config.replace(**config_overrides)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{ckpt.source}: invalid model config: {e}") from None

    table = parameter_table(config)
    expected = {entry.torch_key for entry in table}
    missing = [entry.torch_key for entry in table if entry.torch_key not in ckpt.shapes]
    unused = [key for key in ckpt.shapes if key not in expected and key != INV_FREQ_KEY]  # in checkpoint order
    if missing or unused:
        raise CheckpointError(
            f"{ckpt.source} does not match its config ({_describe(config)}):"
            + (f"\n  missing tensors: {', '.join(missing)}" if missing else "")
            + (f"\n  unused tensors: {', '.join(unused)}" if unused else ""))
    shapes = abstract_params(config)
    for entry in table:  # every shape first, so that nothing is converted from a checkpoint of another model
        want = torch_shape(tuple(_get(shapes, entry.path).shape), entry.layout)
        got = tuple(ckpt.shapes[entry.torch_key])
        if got != want:
            raise CheckpointError(f"{ckpt.source}: tensor {entry.torch_key} has shape {got}, but the config "
                                  f"({_describe(config)}) needs {want} for {'/'.join(entry.path)}")
    _check_rotary_buffer(ckpt, config)

    dtype = np.dtype(config.param_dtype)
    params: dict = {}
    for entry in table:
        tensor = np.asarray(ckpt.get(entry.torch_key))
        shape = tuple(_get(shapes, entry.path).shape)
        _set(params, entry.path, from_torch(tensor.astype(dtype, copy=tensor.dtype != dtype), shape, entry.layout))
    return config, params


def _check_rotary_buffer(ckpt, config: CausalLanguageModelConfig) -> None:
    if INV_FREQ_KEY not in ckpt.shapes:
        return  # perceiver-io recomputes the buffer at init, so a checkpoint may lack it
    ours = inverse_frequencies(config.num_rotated_channels)
    stored = np.asarray(ckpt.get(INV_FREQ_KEY))
    theirs = stored.astype(np.float32)
    rtol = 2 * float(ml_dtypes.finfo(stored.dtype).eps)  # a half-precision checkpoint stores the buffer rounded
    if theirs.shape != ours.shape or not np.allclose(theirs, ours, rtol=rtol, atol=0):
        raise CheckpointError(f"{ckpt.source}: tensor {INV_FREQ_KEY} has shape {theirs.shape}, but the config "
                              f"({_describe(config)}) rotates {config.num_rotated_channels} channels per head, "
                              f"which needs {ours.shape} with values 10000^(-2i/{config.num_rotated_channels})")


def _describe(config: CausalLanguageModelConfig) -> str:
    return (f"num_channels={config.num_channels}, num_heads={config.num_heads}, "
            f"num_self_attention_layers={config.num_self_attention_layers}, vocab_size={config.vocab_size}, "
            f"abs_pos_emb={config.abs_pos_emb}, output_norm={config.output_norm}, output_bias={config.output_bias}")


# ----------------------------------------------------------------------------------------------------------------
def export_torch_checkpoint(
    config: CausalLanguageModelConfig,
    params: Any,
    directory: str | os.PathLike,
    tokenizer_dir: str | os.PathLike | None = None,
    dtype: str = "float32",
    overwrite: bool = False,
) -> None:
    """Write an HF model directory (config.json, generation_config.json, model.safetensors and the tokenizer
    files of `tokenizer_dir`) that perceiver-io's `PerceiverCausalLanguageModel.from_pretrained` loads."""
    table = parameter_table(config)
    np_dtype = np.dtype(dtype)
    by_key = {HF_PREFIX + entry.torch_key: entry for entry in table}
    specs = [(key, torch_shape(tuple(np.shape(_get(params, e.path))), e.layout), np_dtype) for key, e in by_key.items()]
    inv_freq = inverse_frequencies(config.num_rotated_channels)
    specs.insert(1, (HF_PREFIX + INV_FREQ_KEY, inv_freq.shape, np.dtype(np.float32)))

    def tensor(key: str) -> np.ndarray:
        if key == HF_PREFIX + INV_FREQ_KEY:
            return inv_freq
        entry = by_key[key]
        return to_torch(np.asarray(_get(params, entry.path)).astype(np_dtype), entry.layout)

    with staged_directory(directory, overwrite) as tmp:
        write_safetensors(os.path.join(tmp, "model.safetensors"), specs, tensor, metadata={"format": "pt"})
        hf_config = {
            "architectures": ["PerceiverCausalLanguageModel"],
            "is_decoder": True,
            "model_config": config.to_perceiver_io_dict(),
            "model_type": "perceiver-ar-causal-language-model",
            "torch_dtype": dtype,
            "transformers_version": "4.36.2",
        }
        if tokenizer_dir is not None and copy_tokenizer_files(tokenizer_dir, tmp):
            hf_config["tokenizer_class"] = _tokenizer_class(tokenizer_dir)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"_from_model_config": True, "transformers_version": "4.36.2"}, f, indent=2)


def _tokenizer_class(tokenizer_dir) -> str:
    """perceiver-io's convert_checkpoint records the tokenizer class it saved; keep the source's if it says."""
    config_path = os.path.join(tokenizer_dir, "config.json")
    try:
        with open(config_path) as f:
            return json.load(f).get("tokenizer_class") or "XLNetTokenizerFast"
    except (OSError, ValueError):
        return "XLNetTokenizerFast"


# ----------------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perceiver_ar_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="perceiver-io HF model directory or Lightning .ckpt (or, with --to-pytorch, "
                                    "a perceiver-ar-jax model directory)")
    parser.add_argument("dst", help="destination directory (must not exist unless --overwrite)")
    parser.add_argument("--to-pytorch", action="store_true", help="export our model directory to perceiver-io")
    parser.add_argument("--param-dtype", default=None, choices=("float32", "bfloat16", "float16"),
                        help="dtype to store the parameters in (default: float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace dst if it exists")
    args = parser.parse_args(argv)
    try:
        if args.to_pytorch:
            config, params = load_model(args.src)
            export_torch_checkpoint(config, params, args.dst, tokenizer_dir=args.src,
                                    dtype=args.param_dtype or "float32", overwrite=args.overwrite)
        else:
            if os.path.exists(args.dst) and not args.overwrite:
                raise FileExistsError(f"{args.dst} already exists; choose another destination or pass --overwrite")
            ckpt = read_perceiver_io_checkpoint(args.src)
            config, params = _convert_checkpoint(ckpt, args.param_dtype, {})
            save_model(args.dst, config, params, tokenizer_dir=ckpt.tokenizer_dir, overwrite=args.overwrite)
    except (CheckpointError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
