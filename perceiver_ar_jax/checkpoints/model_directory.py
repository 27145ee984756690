"""Our model directory: `config.json` (the model config) + `params/` (an orbax checkpoint) + tokenizer files.

Written by the converter and read by sampling, evaluation and fine-tuning; `load_model` also reads a training
workdir (train.py's --workdir: config.json, tokenizer files and `checkpoints/`, see training_checkpoints.py). A
directory is written under a temporary name and renamed into place when complete, so an interrupted save never
leaves a half-written model where a good one was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from perceiver_ar_jax.checkpoints import training_checkpoints
from perceiver_ar_jax.checkpoints.restore_errors import classify
from perceiver_ar_jax.errors import CheckpointError, StorageUnavailableError
from perceiver_ar_jax.model import CausalLanguageModelConfig, abstract_params

MODEL_TYPE = "perceiver-ar-jax"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
# the files of a SentencePiece tokenizer as Hugging Face saves it (perceiver-io's model directories hold them)
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def config_json(config: CausalLanguageModelConfig) -> str:
    """The text of a model directory's config.json (also written into training workdirs)."""
    return json.dumps({"model_type": MODEL_TYPE, "model_config": config.to_dict()}, indent=2, sort_keys=True)


def config_from_json(text: str) -> CausalLanguageModelConfig:
    return CausalLanguageModelConfig.from_dict(json.loads(text)["model_config"], strict=True)


def is_model_dir(path: str | os.PathLike) -> bool:
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        return False
    try:
        with open(config_path) as f:
            return json.load(f).get("model_type") == MODEL_TYPE
    except (OSError, ValueError, AttributeError):
        return False


def read_config(directory: str | os.PathLike) -> CausalLanguageModelConfig:
    directory = os.fspath(directory)
    config_path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isdir(directory):
        raise CheckpointError(f"model directory not found: {directory}")
    if not is_model_dir(directory):
        raise CheckpointError(f"{directory} is not a perceiver-ar-jax model directory (no {CONFIG_FILE} with "
                              f"model_type {MODEL_TYPE!r}); convert a perceiver-io checkpoint with "
                              "`python -m perceiver_ar_jax.convert SRC DST` first")
    with open(config_path) as f:
        return config_from_json(f.read())


def save_model(
    directory: str | os.PathLike,
    config: CausalLanguageModelConfig,
    params: Any,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> None:
    """Write config, params and (if given) the tokenizer files of `tokenizer_dir` to `directory`."""
    with staged_directory(directory, overwrite) as tmp:
        with open(os.path.join(tmp, CONFIG_FILE), "w") as f:
            f.write(config_json(config))
        write_params(os.path.join(tmp, PARAMS_DIR), params)
        if tokenizer_dir is not None:
            copy_tokenizer_files(tokenizer_dir, tmp)


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yield a temporary directory beside `directory`; when the block succeeds it becomes `directory`, when it
    fails it is removed and `directory` is left as it was. An existing `directory` needs overwrite=True."""
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory) and not overwrite:
        raise FileExistsError(f"{directory} already exists; choose another destination or pass overwrite=True")
    parent = os.path.dirname(directory)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=os.path.basename(directory) + ".tmp-", dir=parent)
    try:
        yield tmp
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_params(path: str, params: Any) -> None:
    """Save a params tree with orbax, holding at most about one extra copy of the largest tensors.

    Host numpy leaves become CPU jax arrays first (zero-copy where numpy's buffer is aligned): orbax would
    otherwise stage its own copy of every numpy array. Writes are limited to 1 GB in flight and uncompressed
    (float weights barely compress, and the compressor's buffers cost another copy).
    """
    cpu = jax.local_devices(backend="cpu")[0]
    params = jax.tree.map(lambda x: jax.device_put(x, cpu) if isinstance(x, np.ndarray) else x, params)
    handler = ocp.PyTreeCheckpointHandler(save_concurrent_gb=1, save_device_host_concurrent_gb=1,
                                          use_compression=False)
    ocp.Checkpointer(handler).save(path, args=ocp.args.PyTreeSave(params))


def load_model(directory: str | os.PathLike, sharding: jax.sharding.Sharding | Any | None = None):
    """Read a model directory -> (config, params). `sharding`: one sharding for every leaf, or a tree of them
    matching the params (default: the first local device). A training workdir (train.py's --workdir) is read too:
    the parameters of its newest readable checkpoint."""
    config = read_config(directory)
    target = abstract_params(config)
    if sharding is None:
        sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    if isinstance(sharding, jax.sharding.Sharding):
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), target)
    else:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, sharding)
    params_dir = os.path.join(os.path.abspath(os.fspath(directory)), PARAMS_DIR)
    if not os.path.isdir(params_dir) and training_checkpoints.is_training_workdir(directory):
        try:  # a training workdir: the newest readable training checkpoint
            return config, training_checkpoints.load_params(directory, target)[1]
        except (CheckpointError, StorageUnavailableError):
            raise  # their messages name the checkpoint and the cause already
        except Exception as e:  # noqa: BLE001 - as below
            raise CheckpointError(f"cannot restore parameters from the training workdir {directory}: "
                                  f"{classify(e).cause}") from None
    try:
        params = ocp.StandardCheckpointer().restore(params_dir, target)
    except Exception as e:  # noqa: BLE001 - orbax raises many types; all mean "this checkpoint is unusable"
        raise CheckpointError(f"cannot restore the parameters in {params_dir}: {classify(e).cause}") from None
    return config, params


def copy_tokenizer_files(src_dir: str | os.PathLike, dst_dir: str | os.PathLike) -> list[str]:
    """Copy the tokenizer files present in src_dir; either side may be a gs:// path (a training workdir)."""
    copied = []
    if _same_directory(src_dir, dst_dir):  # e.g. a tokenizer trained into the workdir itself: one copy is enough
        return copied
    for name in TOKENIZER_FILES:
        src = epath.Path(src_dir) / name
        if src.is_file():
            (epath.Path(dst_dir) / name).write_bytes(src.read_bytes())
            copied.append(name)
    return copied


def _same_directory(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = os.fspath(a), os.fspath(b)
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return os.path.isdir(a) and os.path.isdir(b) and os.path.samefile(a, b)


def replace_directory(src: str, dst: str) -> None:
    """Move the finished directory `src` to `dst`; an existing `dst` is removed only after `src` is in place."""
    if not os.path.exists(dst):
        os.replace(src, dst)
        return
    old = tempfile.mkdtemp(prefix=os.path.basename(dst) + ".old-", dir=os.path.dirname(dst))
    os.rmdir(old)
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)
