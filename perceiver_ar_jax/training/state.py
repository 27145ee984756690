"""The training state: how it is initialised, laid out on the mesh, restored or started from a pretrained model,
and the files that make a training workdir a model directory too."""

from __future__ import annotations

from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging
from etils import epath

from perceiver_ar_jax import checkpoints
from perceiver_ar_jax.model import CausalLanguageModel, CausalLanguageModelConfig, abstract_params
from perceiver_ar_jax.training import partitioning
from perceiver_ar_jax.training.step import TrainState

TRAIN_CONFIG_FILE = "train_config.json"


def make_init_fn(model: CausalLanguageModel, optimizer, seed: int) -> Callable[[], TrainState]:
    """() -> TrainState with boxed (logically partitioned) params and optimizer state."""

    def init() -> TrainState:
        params_key, dropout_key = jax.random.split(jax.random.key(seed))
        ids = jnp.zeros((1, model.config.max_latents), jnp.int32)  # parameter shapes do not depend on length
        params = model.init(params_key, ids, prefix_len=0)["params"]
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                          rng=jax.random.key_data(dropout_key))

    return init


def state_layout(init_fn, mesh, rules) -> tuple[TrainState, TrainState]:
    """(abstract state with shardings, the tree of shardings) without allocating anything."""
    abstract = jax.eval_shape(init_fn)
    shardings = partitioning.tree_shardings(nn.get_partition_spec(abstract), nn.unbox(abstract), mesh, rules)
    return partitioning.abstract_with_shardings(nn.unbox(abstract), shardings), shardings


def check_same_parameters(source_config: CausalLanguageModelConfig, param_shapes, what: str) -> None:
    """Raise ValueError naming the first parameter whose shape differs between source_config and ours."""
    ours = jax.tree_util.tree_flatten_with_path(param_shapes)[0]
    theirs = dict(jax.tree_util.tree_flatten_with_path(abstract_params(source_config))[0])
    if len(ours) != len(theirs):
        raise ValueError(f"{what}: its model has {len(theirs)} parameter arrays, this config's {len(ours)}; the "
                         "architectures differ")
    for path, leaf in ours:
        other = theirs.get(path)
        if other is None or other.shape != leaf.shape:
            raise ValueError(f"{what}: parameter {jax.tree_util.keystr(path)} has shape "
                             f"{None if other is None else other.shape} there but {leaf.shape} in this config")


def load_pretrained_params(directory: str, model_config: CausalLanguageModelConfig, param_shapes, shardings):
    """Parameters of a converted model directory (or a training workdir) for fine-tuning, onto our shardings."""
    source_config = checkpoints.read_config(directory)
    check_same_parameters(source_config, param_shapes, f"init_from={directory}")
    for field in ("num_self_attention_rotary_layers", "abs_pos_emb", "num_heads"):
        if getattr(source_config, field) != getattr(model_config, field):
            logging.warning("init_from: %s is %r in %s but %r here", field, getattr(source_config, field),
                            directory, getattr(model_config, field))
    _, params = checkpoints.load_model(directory, sharding=shardings)
    return jax.tree.map(lambda p, a: p.astype(a.dtype), params, param_shapes)


def read_workdir_model_config(workdir: epath.Path) -> CausalLanguageModelConfig | None:
    """The model config a workdir's checkpoints were trained with (its config.json), or None for a workdir without
    a finished checkpoint (new, or whose runs never saved one: then the next run may use another model)."""
    path = workdir / checkpoints.CONFIG_FILE
    if not path.exists() or not checkpoints.saved_steps(workdir):
        return None
    return checkpoints.config_from_json(path.read_text())


def write_workdir_files(workdir: epath.Path, config, model_config: CausalLanguageModelConfig, tokenizer_dir) -> None:
    """config.json (the model directory format), train_config.json and the tokenizer files (process 0).

    With them the workdir is also a model directory: perceiver_ar_jax.checkpoint.load_model(workdir) reads it."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / checkpoints.CONFIG_FILE).write_text(checkpoints.config_json(model_config))
    (workdir / TRAIN_CONFIG_FILE).write_text(config.to_json_best_effort(indent=2, sort_keys=True))
    if tokenizer_dir:
        checkpoints.copy_tokenizer_files(tokenizer_dir, workdir)


def restore_or_init(config, model_config, run_checkpoints, datasets, init_fn, abstract_state, state_shardings):
    """(state, this process's training iterator): from the newest good checkpoint, else freshly initialised
    (with init_from's parameters when given)."""
    found = run_checkpoints.restore_latest(lambda step: run_checkpoints.restore(step, abstract_state))
    data_state = None
    if found is not None:
        state, data_state = found[1]
        logging.info("resumed from the checkpoint at step %d in %s", found[0], run_checkpoints.directory)
        if config.init_from:
            logging.info("init_from=%s is ignored: the run resumes from its own checkpoint", config.init_from)
    else:
        state = jax.jit(lambda: nn.unbox(init_fn()), out_shardings=state_shardings)()
        if config.init_from:
            params = load_pretrained_params(config.init_from, model_config, abstract_state.params,
                                            state_shardings.params)
            state = state.replace(params=params)
            logging.info("parameters initialised from %s", config.init_from)
    train_iter = datasets("train", config.batch_size // jax.process_count())
    if data_state is not None:
        train_iter.set_state(data_state)
    return state, train_iter
