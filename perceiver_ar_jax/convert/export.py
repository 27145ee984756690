"""Our parameters -> a Hugging Face directory that perceiver-io's `PerceiverCausalLanguageModel.from_pretrained`
loads (config.json, generation_config.json, model.safetensors, tokenizer files)."""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from perceiver_ar_jax.checkpoints import copy_tokenizer_files, staged_directory
from perceiver_ar_jax.convert.safetensors_io import write_safetensors
from perceiver_ar_jax.convert.table import HF_PREFIX, INV_FREQ_KEY, get_path, parameter_table, to_torch, torch_shape
from perceiver_ar_jax.model import CausalLanguageModelConfig
from perceiver_ar_jax.model.positions import inverse_frequencies


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
    specs = [(key, torch_shape(tuple(np.shape(get_path(params, e.path))), e.layout), np_dtype)
             for key, e in by_key.items()]
    inv_freq = inverse_frequencies(config.num_rotated_channels)
    specs.insert(1, (HF_PREFIX + INV_FREQ_KEY, inv_freq.shape, np.dtype(np.float32)))

    def tensor(key: str) -> np.ndarray:
        if key == HF_PREFIX + INV_FREQ_KEY:
            return inv_freq
        entry = by_key[key]
        return to_torch(np.asarray(get_path(params, entry.path)).astype(np_dtype), entry.layout)

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


