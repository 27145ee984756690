"""Training on device meshes and across processes gives the single-device result.

The meshes run in a subprocess with 8 simulated CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=8),
the multi-process run as two local processes joined by jax.distributed on 127.0.0.1 (gloo CPU collectives), so
that this test process keeps its one device. The single-device reference runs here.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from perceiver_ar_jax import training
from tests.processes import free_port, run_together, worker_env
from tests.synthetic_data import synthetic_datasets, tiny_train_config

WORKER = Path(__file__).with_name("distributed_worker.py")




# float32 sums over other splits of the batch and of the parameters: equal up to rounding, not bit for bit
PARAM_RTOL, PARAM_ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    """(losses, final parameters by path) of the 8-step run on this process's one device."""
    config = tiny_train_config()
    result = training.train_and_evaluate(config, str(tmp_path_factory.mktemp("one")),
                                          datasets=synthetic_datasets(config))
    params = {jax.tree_util.keystr(path): np.asarray(x)
              for path, x in jax.tree_util.tree_leaves_with_path(jax.device_get(result.state.params))}
    return [h["loss"] for h in result.history], params


@pytest.fixture(scope="module")
def one_device_losses(one_device):
    return one_device[0]


def assert_same_parameters(npz_path, expected):
    """The parameters a worker saved equal `expected` (those of the one-device run after the same 8 steps)."""
    with np.load(npz_path) as saved:
        assert sorted(saved.files) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(saved[name], value, rtol=PARAM_RTOL, atol=PARAM_ATOL, err_msg=name)


@pytest.fixture(scope="module")
def mesh_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("meshes")
    out = tmp / "out.json"
    proc = subprocess.run([sys.executable, str(WORKER), "meshes", str(out), str(tmp)], env=worker_env(8),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return {**json.loads(out.read_text()), "out_dir": str(tmp)}


@pytest.mark.parametrize("shape", ["(8, 1, 1)", "(2, 2, 2)", "(1, 4, 2)"])
def test_mesh_gives_the_single_device_loss(mesh_results, one_device_losses, shape):
    losses = mesh_results["losses"][shape]
    assert len(losses) >= 3 and len(one_device_losses) == 8  # (2, 2, 2) ran until stopped at step 3 or later
    np.testing.assert_allclose(losses, one_device_losses[:len(losses)], rtol=1e-5)


@pytest.mark.parametrize("run", ["8x1x1", "1x4x2", "resumed"])
def test_mesh_gives_the_single_device_parameters_after_8_steps(mesh_results, one_device, run):
    """resumed: stopped on (2, 2, 2), restored and finished on (1, 4, 2)."""
    out_dir = mesh_results["out_dir"]
    assert_same_parameters(os.path.join(out_dir, f"out-{run}.npz"), one_device[1])


def test_restore_onto_another_mesh_is_exact_and_continues_the_run(mesh_results, one_device_losses):
    assert mesh_results["restored_on_new_mesh_is_exact"]
    assert mesh_results["restored_shardings_are_the_new_mesh"]
    stop = mesh_results["stopped_at"]
    assert 3 <= stop < 8 and mesh_results["restored_data_state"] == {"index": stop}
    np.testing.assert_allclose(mesh_results["resumed_losses"], one_device_losses[stop:], rtol=1e-5)




@pytest.mark.multiprocess
def test_two_processes_agree_with_one(tmp_path, one_device):
    one_device_losses, one_device_params = one_device
    address = f"127.0.0.1:{free_port()}"
    workdir = tmp_path / "run"
    run_together([[sys.executable, str(WORKER), "process", str(tmp_path / f"out{i}.json"), str(workdir), address,
                   str(i), "2"] for i in range(2)], worker_env(2))
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [(r["devices"], r["local_devices"]) for r in results] == [(4, 2), (4, 2)]
    np.testing.assert_allclose(results[0]["losses"], one_device_losses, rtol=1e-5)
    assert results[1]["losses"] == results[0]["losses"]
    assert_same_parameters(tmp_path / "out0-processes.npz", one_device_params)
    # each process saved its own input-iterator position
    last = workdir / "checkpoints" / "8" / "data"
    assert sorted(p.name for p in last.glob("process_*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
