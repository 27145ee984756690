"""Evaluation sharded over device meshes and split over processes gives the single-device result.

As tests/test_train_distributed.py: the meshes run in a subprocess with 8 simulated CPU devices, the two processes
(2 devices each) are joined by jax.distributed on 127.0.0.1; the single-device reference runs here.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from perceiver_ar_jax.evaluation import evaluate
from tests.evaluation_worker import STRIDE, setup
from tests.processes import free_port, run_together, worker_env

WORKER = Path(__file__).with_name("evaluation_worker.py")
pytestmark = pytest.mark.multiprocess  # the file's processes need the machine to themselves (.ci/run)






@pytest.fixture(scope="module")
def one_device():
    model, params, docs = setup()
    result = evaluate(model, params, docs, stride=STRIDE, bos_id=1, batch_size=2)
    return [d.loss_sum for d in result.documents], [d.num_tokens for d in result.documents]


def test_meshes_give_the_single_device_losses(tmp_path, one_device):
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(WORKER), "mesh", str(out)], env=worker_env(8), capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    for shape, result in json.loads(out.read_text()).items():
        assert result["tokens"] == one_device[1], shape
        np.testing.assert_allclose(result["loss_sums"], one_device[0], rtol=1e-5, err_msg=shape)


def test_two_processes_score_their_shares_and_gather_every_document(tmp_path, one_device):
    address = f"127.0.0.1:{free_port()}"
    run_together([[sys.executable, str(WORKER), "process", str(tmp_path / f"out{i}.json"), address, str(i), "2"]
                  for i in range(2)], worker_env(2))
    results = [json.loads((tmp_path / f"out{i}.json").read_text()) for i in range(2)]
    assert [r["devices"] for r in results] == [4, 4]
    for r in results:  # every process holds all documents, in order; token losses of its own share only
        assert r["tokens"] == one_device[1]
        np.testing.assert_allclose(r["loss_sums"], one_device[0], rtol=1e-5)
    assert [r["own_token_losses"] for r in results] == [3, 4]
    assert results[0]["bucket_tokens"] == results[1]["bucket_tokens"]
    assert sum(results[0]["bucket_tokens"]) == sum(one_device[1])
