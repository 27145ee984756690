"""Reading the checkpoints perceiver-io writes, without building its model.

Two layouts (perceiver-io 0.11):
- a Hugging Face model directory from `PerceiverCausalLanguageModel.save_pretrained`: `config.json` whose
  `model_config` holds the CausalLanguageModelConfig fields, weights in `model.safetensors` or `pytorch_model.bin`
  (or sharded, with a `*.index.json`), keys prefixed `backend_model.`; tokenizer files beside them;
- a PyTorch Lightning `.ckpt` of `LitCausalLanguageModel`: `hyper_parameters` (the config fields and a few
  Lightning-only ones) and `state_dict` with keys prefixed `model.`.

Tensors are read lazily, one at a time (safetensors and zip pickles are memory-mapped), so reading a checkpoint
needs memory for the tensors being converted, not for the whole file. Pickles are loaded with
`torch.load(weights_only=True)` only: a pickle that would run code is refused.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import pickle
import sys
from collections.abc import Callable
from typing import Any

import ml_dtypes
import numpy as np

from perceiver_ar_jax.convert.safetensors_io import SafetensorsError, SafetensorsReader
from perceiver_ar_jax.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
# Key prefixes of the two layouts, and module-wrapper segments that FSDP / activation checkpointing may insert.
_PREFIXES = ("backend_model.", "model.")
_WRAPPER_SEGMENTS = ("_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "_fpw_module.", "module._orig_mod.")


@dataclasses.dataclass
class TorchCheckpoint:
    """What a perceiver-io checkpoint holds, with its tensors still on disk."""

    source: str  # the path it was read from
    model_config: dict[str, Any]  # perceiver-io CausalLanguageModelConfig fields (and possibly others)
    shapes: dict[str, tuple[int, ...]]  # backend key (no `backend_model.`/`model.` prefix) -> shape
    _loaders: dict[str, Callable[[], np.ndarray]]
    tokenizer_dir: str | None = None  # a directory holding the tokenizer files, if any

    def get(self, key: str) -> np.ndarray:
        return self._loaders[key]()


# ----------------------------------------------------------------------------------------------------------------
def read_perceiver_io_checkpoint(path: str | os.PathLike) -> TorchCheckpoint:
    """Open an HF model directory or a Lightning `.ckpt` written by perceiver-io."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        return _read_hf_directory(path)
    return _read_lightning_checkpoint(path)


def _read_hf_directory(directory: str) -> TorchCheckpoint:
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{directory} is not a perceiver-io model directory: it has no config.json")
    try:
        with open(config_path) as f:
            hf_config = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {config_path}: {e}") from None
    if not isinstance(hf_config, dict) or not isinstance(hf_config.get("model_config"), dict):
        raise CheckpointError(f"{config_path} is not a perceiver-io config: it has no `model_config` "
                              f"(model_type={hf_config.get('model_type') if isinstance(hf_config, dict) else None!r})")

    weights = next((name for name in WEIGHT_FILES if os.path.isfile(os.path.join(directory, name))), None)
    if weights is None:
        raise CheckpointError(f"{directory} has no weights: expected one of {', '.join(WEIGHT_FILES)}")
    weight_path = os.path.join(directory, weights)
    if weights.endswith(".index.json"):
        try:
            with open(weight_path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"cannot read the shard index {weight_path}: {e!r}") from None
        shard_files = sorted(set(weight_map.values()))
    else:
        shard_files = [weights]

    shapes, loaders = {}, {}
    for shard in shard_files:
        shard_path = os.path.join(directory, shard)
        if not os.path.isfile(shard_path):
            raise CheckpointError(f"shard {shard_path} named in {weights} is missing")
        tensors = _open_tensors(shard_path)
        for key, (shape, load) in tensors.items():
            _add(shapes, loaders, key, shape, load, shard_path)

    has_tokenizer = os.path.isfile(os.path.join(directory, "spiece.model"))
    return TorchCheckpoint(directory, hf_config["model_config"], shapes, loaders, directory if has_tokenizer else None)


def _read_lightning_checkpoint(path: str) -> TorchCheckpoint:
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"{path} is not a Lightning checkpoint: it has no `state_dict`")
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise CheckpointError(f"{path} has no `hyper_parameters` dict, so its model config is unknown")
    shapes, loaders = {}, {}
    for key, tensor in ckpt["state_dict"].items():
        _add(shapes, loaders, key, tuple(tensor.shape), _torch_to_numpy_loader(tensor), path)
    return TorchCheckpoint(path, dict(hparams), shapes, loaders, None)


def _add(shapes, loaders, raw_key, shape, load, where):
    key = backend_key(raw_key)
    if key in shapes:
        raise CheckpointError(f"{where}: tensor {raw_key!r} appears twice")
    shapes[key], loaders[key] = shape, load


def backend_key(key: str) -> str:
    """`backend_model.x.y` / `model.x.y` (and FSDP / checkpoint-wrapper segments) -> `x.y`."""
    for segment in _WRAPPER_SEGMENTS:
        key = key.replace(segment, "")
    for prefix in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


# ----------------------------------------------------------------------------------------------------------------
def _open_tensors(path: str) -> dict[str, tuple[tuple[int, ...], Callable[[], np.ndarray]]]:
    if path.endswith(".safetensors"):
        try:
            reader = SafetensorsReader(path)
        except SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        return {k: (reader.shape(k), lambda k=k: reader.get(k)) for k in reader.keys()}
    state_dict = _torch_load(path)
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} does not hold a state dict (found {type(state_dict).__name__})")
    return {k: (tuple(t.shape), _torch_to_numpy_loader(t)) for k, t in state_dict.items()}


def _torch_load(path: str):
    try:
        import torch
    except ImportError:
        raise CheckpointError(f"reading {path} (a PyTorch pickle) needs PyTorch: pip install "
                              "'perceiver-ar-jax[torch]' (or convert the checkpoint to safetensors)") from None
    try:
        # mmap keeps tensors on disk until they are used; it needs the zip format of torch >= 1.6
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"refused to load {path}: its pickle references objects that weights-only loading "
                              f"does not allow (it could run code). torch says: {str(e).splitlines()[0]}") from None
    except RuntimeError as e:
        if "mmap" in str(e) or "zip" in str(e).lower():
            try:  # legacy (non-zip) pickles cannot be memory-mapped
                return torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as e2:
                raise CheckpointError(f"refused to load {path}: {str(e2).splitlines()[0]}") from None
            except Exception as e2:  # noqa: BLE001 - any failure here means the file is unusable
                raise CheckpointError(f"cannot read {path}: corrupted or not a PyTorch checkpoint ({e2})") from None
        raise CheckpointError(f"cannot read {path}: corrupted or not a PyTorch checkpoint ({e})") from None
    except (EOFError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: corrupted or not a PyTorch checkpoint ({e})") from None


def _torch_to_numpy_loader(tensor) -> Callable[[], np.ndarray]:
    def load():
        import torch

        t = tensor.detach()
        if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
            array = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            array = t.numpy()
        copy = np.array(array, copy=True)  # our own memory, so the file mapping can let go of these pages
        _release_mapped_pages(t.data_ptr(), t.untyped_storage().nbytes())
        return copy

    return load


def _release_mapped_pages(address: int, nbytes: int) -> None:
    """Drop the pages of a memory-mapped (read-only, private) checkpoint that were just read, so that reading a
    whole checkpoint does not keep it all resident. They are re-read from the file if touched again. Best effort:
    Linux only, and a no-op for tensors that are not file-mapped."""
    if not sys.platform.startswith("linux") or nbytes <= 0:
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = os.sysconf("SC_PAGE_SIZE")
        start = address - address % page
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(address + nbytes - start), 4)  # 4 = MADV_DONTNEED
    except (OSError, AttributeError, ValueError):
        pass
