"""Runs in a subprocess of tests/test_train_distributed.py, so that the parent keeps its single CPU device.

    python tests/distributed_worker.py meshes OUT_JSON WORKDIR           (with 8 host-platform devices)
    python tests/distributed_worker.py process OUT_JSON WORKDIR ADDRESS PROCESS_ID NUM_PROCESSES

Writes its results (per-step losses, checks) as JSON to OUT_JSON and the final parameters of each run to
OUT_JSON's stem + `-<run>.npz` (one array per parameter, named by its path).
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def losses(result):
    return [h["loss"] for h in result.history]


def save_params(out_path, run, params):
    """The parameters as host arrays (gathered from every process) in `<out_path stem>-<run>.npz`."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(os.path.splitext(out_path)[0] + f"-{run}.npz", **flat)


def meshes(out_path, workdir):
    import jax
    import numpy as np

    from perceiver_ar_jax import training
    from perceiver_ar_jax.checkpoints import TrainingCheckpoints
    from perceiver_ar_jax.training import partitioning
    from tests.synthetic_data import SignalAtBatch, synthetic_datasets, tiny_train_config

    assert jax.device_count() == 8, jax.devices()
    out = {"losses": {}}
    for shape in ((8, 1, 1), (1, 4, 2)):  # (2, 2, 2): the first steps of the stopped run below
        config = tiny_train_config(**{"mesh.ici_parallelism": shape})
        result = training.train_and_evaluate(config, os.path.join(workdir, "x".join(map(str, shape))),
                                              datasets=synthetic_datasets(config))
        out["losses"][str(shape)] = losses(result)
        save_params(out_path, "x".join(map(str, shape)), result.state.params)

    # stopped on a (2, 2, 2) mesh, resumed on (1, 4, 2)
    first = tiny_train_config(**{"mesh.ici_parallelism": (2, 2, 2)})
    resume_dir = os.path.join(workdir, "resume")
    stopped = training.train_and_evaluate(first, resume_dir,
                                           datasets=SignalAtBatch(synthetic_datasets(first), index=3))
    saved = jax.device_get(stopped.state)
    out["losses"][str((2, 2, 2))] = losses(stopped)
    second = tiny_train_config(**{"mesh.ici_parallelism": (1, 4, 2)})
    mesh = partitioning.create_mesh(second.mesh)
    model_config = training.model_config_from(second)
    from perceiver_ar_jax.model import CausalLanguageModel
    from perceiver_ar_jax.training import optimizer as optim
    from perceiver_ar_jax.training.state import make_init_fn, state_layout

    init_fn = make_init_fn(CausalLanguageModel(model_config), optim.make_optimizer(second), second.seed)
    abstract, _ = state_layout(init_fn, mesh, tuple(map(tuple, second.mesh.logical_axis_rules)))
    checkpoints = TrainingCheckpoints(resume_dir, read_only=True)
    restored, data_state = checkpoints.restore(checkpoints.latest_step(), abstract)
    checkpoints.close()
    out["restored_on_new_mesh_is_exact"] = all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in
        zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved), strict=True))
    out["restored_shardings_are_the_new_mesh"] = all(
        x.sharding.mesh.axis_sizes == (1, 4, 2) for x in jax.tree.leaves(restored))
    out["restored_data_state"] = data_state
    out["stopped_at"] = int(saved.step)
    resumed = training.train_and_evaluate(second, resume_dir, datasets=synthetic_datasets(second))
    out["resumed_losses"] = losses(resumed)
    save_params(out_path, "resumed", resumed.state.params)
    with open(out_path, "w") as f:
        json.dump(out, f)


def process(out_path, workdir, address, process_id, num_processes):
    from perceiver_ar_jax.training import partitioning
    from tests.synthetic_data import synthetic_datasets, tiny_train_config

    config = tiny_train_config(**{"mesh.ici_parallelism": (2, -1, 1)})
    config.distributed.update(coordinator_address=address, num_processes=num_processes, process_id=process_id)
    partitioning.initialize_distributed(config.distributed)

    import jax

    from perceiver_ar_jax import training

    assert jax.process_count() == num_processes and jax.process_index() == process_id
    result = training.train_and_evaluate(
        config, workdir, datasets=synthetic_datasets(config, process_index=process_id, process_count=num_processes))
    save_params(out_path, "processes", result.state.params)
    with open(out_path, "w") as f:
        json.dump({"losses": losses(result), "devices": jax.device_count(),
                   "local_devices": jax.local_device_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "meshes":
        meshes(*args)
    else:
        process(args[0], args[1], args[2], int(args[3]), int(args[4]))
