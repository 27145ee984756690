"""train.py on the real local-text input pipeline, killed with SIGKILL at random moments (mid-step, mid-save,
mid-start) several times and rerun, ends with the parameters, optimizer state and data position of an
uninterrupted run, bit for bit."""

import json
import os
import random
import signal
import subprocess
import time

import jax
import numpy as np

from perceiver_ar_jax import training
from perceiver_ar_jax.checkpoints import TrainingCheckpoints, saved_steps
from perceiver_ar_jax.model import CausalLanguageModel
from perceiver_ar_jax.training import optimizer as optim
from perceiver_ar_jax.training import partitioning
from perceiver_ar_jax.training.state import make_init_fn, state_layout
from tests.conftest import REPO, tiny_train_py_flags

STEPS = 16
KILLS = 3
# checkpoints every 2 steps, written asynchronously: a kill often lands in the middle of a save
FLAGS = dict(num_train_steps=STEPS, log_every_steps=1, checkpoint_every_steps=2, keep_checkpoints=2)


def config_of(workdir):
    """The training config a run used (its train_config.json)."""
    import ml_collections

    return ml_collections.ConfigDict(json.loads((workdir / "train_config.json").read_text()))


def final_checkpoint(workdir, config):
    """(state, data position) of the checkpoint at step STEPS."""
    mesh = partitioning.create_mesh(config.mesh)
    init_fn = make_init_fn(CausalLanguageModel(training.model_config_from(config)), optim.make_optimizer(config),
                           config.seed)
    abstract, _ = state_layout(init_fn, mesh, tuple(map(tuple, config.mesh.logical_axis_rules)))
    with jax.set_mesh(mesh):
        checkpoints = TrainingCheckpoints(workdir, read_only=True)
        try:
            state, _ = checkpoints.restore(STEPS, abstract)
        finally:
            checkpoints.close()
    data = json.loads((workdir / "checkpoints" / str(STEPS) / "data" / "process_0-of-1.json").read_text())
    return jax.device_get(state), data


def run_until_killed(command, workdir, rng) -> tuple[int, str]:
    """Start train.py and SIGKILL it at a random moment (0-0.5 s, mid-step or mid-save) after it has finished a
    checkpoint of its own, so that every killed run leaves progress to resume from; (exit status, its output)."""
    saved_before = max(saved_steps(workdir), default=0)
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step ") and max(saved_steps(workdir), default=0) > saved_before:
            time.sleep(rng.uniform(0.0, 0.5))
            proc.send_signal(signal.SIGKILL)
            break
    output = "".join(lines) + proc.communicate(timeout=300)[0]
    return proc.returncode, output


def test_sigkilled_train_py_resumes_to_the_bits_of_an_uninterrupted_run(tmp_path, local_text):
    corpus, tokenizer = local_text
    reference_dir = tmp_path / "uninterrupted"
    reference = subprocess.run(tiny_train_py_flags(reference_dir, corpus, tokenizer, **FLAGS), capture_output=True,
                               text=True, timeout=300, cwd=REPO)
    assert reference.returncode == 0, reference.stderr[-3000:]
    command = tiny_train_py_flags(tmp_path / "killed", corpus, tokenizer, **FLAGS)

    seed = int(os.environ.get("KILL_SEED", time.time_ns() % 10_000))
    rng, outputs = random.Random(seed), []
    for _ in range(KILLS):
        status, output = run_until_killed(command, tmp_path / "killed", rng)
        outputs.append(output)
        assert status in (-signal.SIGKILL, 0), f"seed {seed}: train.py exited with {status}:\n{output[-3000:]}"
    final = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert final.returncode == 0, final.stderr[-3000:]
    log = "\n".join(outputs) + final.stdout + final.stderr
    assert f"step {STEPS}/{STEPS}" in log and "resumed from the checkpoint at step" in log, f"seed {seed}"

    config = config_of(reference_dir)
    ours, our_data = final_checkpoint(tmp_path / "killed", config)
    theirs, their_data = final_checkpoint(reference_dir, config)
    assert our_data == their_data, f"seed {seed}: data positions differ"
    for name in ("params", "opt_state", "step", "rng"):
        a, b = jax.tree.leaves(getattr(ours, name)), jax.tree.leaves(getattr(theirs, name))
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=f"seed {seed}: {name}")
