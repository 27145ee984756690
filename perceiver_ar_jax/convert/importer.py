"""perceiver-io checkpoint -> (config, params) in our layout: every tensor's shape checked before any is used."""

from __future__ import annotations

import os
from typing import Any

import ml_dtypes
import numpy as np

from perceiver_ar_jax.convert.table import (
    INV_FREQ_KEY,
    describe,
    from_torch,
    get_path,
    parameter_table,
    set_path,
    torch_shape,
)
from perceiver_ar_jax.convert.torch_reader import TorchCheckpoint, read_perceiver_io_checkpoint
from perceiver_ar_jax.errors import CheckpointError
from perceiver_ar_jax.model import CausalLanguageModelConfig, abstract_params
from perceiver_ar_jax.model.positions import inverse_frequencies


def load_torch_checkpoint(path: str | os.PathLike, param_dtype: str | None = None, **config_overrides: Any):
    """Read a perceiver-io checkpoint (HF directory or Lightning .ckpt) -> (config, params).

    params is a nested dict of host numpy arrays in our layout, ready for
    `CausalLanguageModel(config).apply({"params": params}, ...)`. `param_dtype` (default float32) is the dtype
    the weights are stored in; `config_overrides` set JAX-only config fields (dtype, activation_checkpointing, ...).
    """
    return convert_checkpoint(read_perceiver_io_checkpoint(path), param_dtype, config_overrides)


def convert_checkpoint(ckpt: TorchCheckpoint, param_dtype: str | None, config_overrides: dict[str, Any]):
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
            f"{ckpt.source} does not match its config ({describe(config)}):"
            + (f"\n  missing tensors: {', '.join(missing)}" if missing else "")
            + (f"\n  unused tensors: {', '.join(unused)}" if unused else ""))
    shapes = abstract_params(config)
    for entry in table:  # every shape first, so that nothing is converted from a checkpoint of another model
        want = torch_shape(tuple(get_path(shapes, entry.path).shape), entry.layout)
        got = tuple(ckpt.shapes[entry.torch_key])
        if got != want:
            raise CheckpointError(f"{ckpt.source}: tensor {entry.torch_key} has shape {got}, but the config "
                                  f"({describe(config)}) needs {want} for {'/'.join(entry.path)}")
    _check_rotary_buffer(ckpt, config)

    dtype = np.dtype(config.param_dtype)
    params: dict = {}
    for entry in table:
        tensor = np.asarray(ckpt.get(entry.torch_key))
        shape = tuple(get_path(shapes, entry.path).shape)
        set_path(params, entry.path, from_torch(tensor.astype(dtype, copy=tensor.dtype != dtype), shape, entry.layout))
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
                              f"({describe(config)}) rotates {config.num_rotated_channels} channels per head, "
                              f"which needs {ours.shape} with values 10000^(-2i/{config.num_rotated_channels})")
