"""The training loop on one CPU device: a whole run, resuming, restore failures, divergence, fine-tuning.

(The real input pipeline under train.py, killed with SIGKILL, is tests/test_kill_and_resume.py.)"""

import glob
import logging
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from perceiver_ar_jax import checkpoints as model_directory
from perceiver_ar_jax import training
from perceiver_ar_jax.checkpoints import TrainingCheckpoints, UnreadableCheckpointError, training_checkpoints
from perceiver_ar_jax.errors import StorageUnavailableError
from tests.synthetic_data import SignalAtBatch, synthetic_datasets, tiny_train_config


def assert_trees_equal(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def run(config, workdir, datasets=None):
    return training.train_and_evaluate(config, str(workdir), datasets=datasets or synthetic_datasets(config))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 8 steps in one go (checkpoints at 3, 6 and 8)."""
    config = tiny_train_config()
    workdir = tmp_path_factory.mktemp("uninterrupted")
    return config, workdir, run(config, workdir)


def test_tiny_run_learns_and_leaves_a_loadable_workdir(tmp_path):
    config = tiny_train_config(num_train_steps=30, learning_rate=1e-2, eval_every_steps=15, log_every_steps=10,
                               checkpoint_every_steps=10, tensorboard=True)
    result = run(config, tmp_path)
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 30 and not result.stopped_early
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3  # the synthetic counter is learnable
    assert [e["step"] for e in result.evals] == [15, 30]
    assert result.evals[-1]["loss"] < result.evals[0]["loss"]
    assert result.evals[-1]["perplexity"] == pytest.approx(np.exp(result.evals[-1]["loss"]))
    assert result.evals[-1]["bits_per_token"] == pytest.approx(result.evals[-1]["loss"] / np.log(2))
    assert glob.glob(str(tmp_path / "events.out.tfevents.*"))
    assert TrainingCheckpoints(str(tmp_path), read_only=True).steps() == [10, 20, 30]
    # the workdir is a model directory: the sampler's load_model reads the newest checkpoint's parameters
    config_read, params = model_directory.load_model(tmp_path)
    assert config_read == training.model_config_from(config)
    assert_trees_equal(params, result.state.params)


@pytest.fixture
def sigint_as_in_a_terminal():
    """Ctrl-C handled as in a terminal: pytest started as a background job (`&`, some CI runners) inherits an
    ignored SIGINT, which StopSignal rightly leaves ignored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_interrupted_run_ends_with_the_parameters_of_an_uninterrupted_one(uninterrupted, tmp_path, signum,
                                                                          sigint_as_in_a_terminal):
    config, _, reference = uninterrupted
    stopped = run(config, tmp_path, SignalAtBatch(synthetic_datasets(config), index=4, signum=signum))
    assert stopped.stopped_early and stopped.stopped_by == signum  # train.py exits with 128 + signum
    stop_step = int(stopped.state.step)
    assert 4 <= stop_step < config.num_train_steps  # stopped right after the signal, with a checkpoint
    assert TrainingCheckpoints(str(tmp_path), read_only=True).latest_step() == stop_step
    resumed = run(config, tmp_path)
    assert [h["step"] for h in resumed.history] == list(range(stop_step + 1, config.num_train_steps + 1))
    # same losses step for step (the data stream continued where it stopped) and bitwise the same parameters,
    # optimizer state and RNG
    np.testing.assert_array_equal([h["loss"] for h in resumed.history],
                                  [h["loss"] for h in reference.history[stop_step:]])
    assert_trees_equal(resumed.state, reference.state)


def truncate_files(directory):
    for f in glob.glob(str(directory / "**" / "*"), recursive=True):
        if os.path.isfile(f):
            with open(f, "r+b") as fh:
                fh.truncate(3)


@pytest.fixture
def damaged_7(uninterrupted, tmp_path):
    """The reference workdir up to step 6, plus a step 7 whose parameter files are cut short."""
    config, reference_dir, reference = uninterrupted
    shutil.copytree(reference_dir, tmp_path, dirs_exist_ok=True)
    shutil.copytree(tmp_path / "checkpoints" / "6", tmp_path / "checkpoints" / "7")
    truncate_files(tmp_path / "checkpoints" / "7" / "params")
    shutil.rmtree(tmp_path / "checkpoints" / "8")
    return config, tmp_path, reference


def test_damaged_latest_checkpoint_is_set_aside_in_one_line_and_the_previous_one_used(damaged_7, caplog):
    config, workdir, reference = damaged_7
    with caplog.at_level(logging.WARNING):
        resumed = run(config, workdir)
    [line] = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert "checkpoints/7 is damaged (" in line and "set aside as corrupted-7, resuming from step 6" in line
    assert "\n" not in line and "TensorStore" not in line
    assert os.path.isdir(workdir / "checkpoints" / "corrupted-7")  # set aside, not deleted
    assert [h["step"] for h in resumed.history] == [7, 8]  # resumed from step 6
    assert_trees_equal(resumed.state, reference.state)


def flaky_restore(monkeypatch, failures: int, error: Exception):
    """TrainingCheckpoints.restore fails `failures` times with `error`, then works; returns the recorded sleeps."""
    original, calls, sleeps = TrainingCheckpoints.restore, [], []

    def restore(self, step, abstract_state):
        calls.append(step)
        if len(calls) <= failures:
            raise error
        return original(self, step, abstract_state)

    monkeypatch.setattr(TrainingCheckpoints, "restore", restore)
    monkeypatch.setattr(training_checkpoints.time, "sleep", sleeps.append)
    return calls, sleeps


def test_transient_storage_errors_are_retried_and_set_nothing_aside(uninterrupted, tmp_path, monkeypatch,
                                                                     caplog):
    config, reference_dir, reference = uninterrupted
    shutil.copytree(reference_dir, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "8")
    calls, sleeps = flaky_restore(monkeypatch, 2, ValueError("UNAVAILABLE: Error reading gs://b/6: HTTP 503"))
    with caplog.at_level(logging.WARNING):
        resumed = run(config, tmp_path)
    assert calls == [6, 6, 6] and sleeps == [2.0, 4.0]  # the same checkpoint again, with a growing wait
    retries = [r.getMessage() for r in caplog.records if "transient storage error" in r.getMessage()]
    assert len(retries) == 2 and "retrying in 2.0 s (attempt 2 of 4)" in retries[0]
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6", "8"]  # resumed from 6, nothing set aside
    assert_trees_equal(resumed.state, reference.state)


def test_storage_that_stays_unavailable_stops_the_run_and_changes_nothing(uninterrupted, tmp_path, monkeypatch):
    config, reference_dir, _ = uninterrupted
    shutil.copytree(reference_dir, tmp_path, dirs_exist_ok=True)
    flaky_restore(monkeypatch, 100, ConnectionResetError(104, "Connection reset by peer"))
    with pytest.raises(StorageUnavailableError, match=r"checkpoints/8: transient storage errors on all 4 attempts"):
        run(config, tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6", "8"]


def test_a_failure_that_is_not_damage_changes_nothing(uninterrupted, tmp_path, monkeypatch):
    config, reference_dir, _ = uninterrupted
    shutil.copytree(reference_dir, tmp_path, dirs_exist_ok=True)
    flaky_restore(monkeypatch, 100, ValueError("User-provided restore item and on-disk value metadata tree "
                                               "structures do not match"))
    with pytest.raises(UnreadableCheckpointError, match=r"cannot restore the checkpoint .*checkpoints/8: "
                                                        r"ValueError: User-provided.*Nothing was changed"):
        run(config, tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6", "8"]


def test_when_every_checkpoint_is_damaged_nothing_is_renamed_and_one_line_says_why(damaged_7, tmp_path):
    config, workdir, _ = damaged_7
    for step in ("3", "6"):
        truncate_files(workdir / "checkpoints" / step / "params")
    with pytest.raises(UnreadableCheckpointError) as raised:
        run(config, workdir)
    message = str(raised.value)
    assert message.startswith(f"every checkpoint in {workdir}/checkpoints is damaged (7: ") and "; 3: " in message
    assert "\n" not in message and "TensorStore" not in message
    assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6", "7"]


def test_a_run_that_fails_before_its_first_step_writes_nothing(tmp_path, uninterrupted):
    config, _, reference = uninterrupted

    def missing_corpus(split, batch_size):
        raise FileNotFoundError(2, "No such file or directory", "corpus/")

    with pytest.raises(FileNotFoundError):
        run(config, tmp_path / "run", missing_corpus)
    assert not (tmp_path / "run").exists()
    # so a rerun may choose another model: nothing claims that checkpoints of the first one exist
    wider = tiny_train_config(num_train_steps=2, **{"model.num_channels": 48})
    assert [h["step"] for h in run(wider, tmp_path / "run").history] == [1, 2]
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["2"]


def test_interrupted_save_is_ignored(uninterrupted, tmp_path, caplog):
    config, reference_dir, reference = uninterrupted
    shutil.copytree(reference_dir, tmp_path, dirs_exist_ok=True)
    shutil.rmtree(tmp_path / "checkpoints" / "8")
    os.rename(tmp_path / "checkpoints" / "6", tmp_path / "checkpoints" / "7.orbax-checkpoint-tmp-1234")
    with caplog.at_level(logging.WARNING):
        resumed = run(config, tmp_path)
    assert "7.orbax-checkpoint-tmp-1234" in caplog.text and "ignored" in caplog.text
    assert [h["step"] for h in resumed.history] == [4, 5, 6, 7, 8]
    assert_trees_equal(resumed.state, reference.state)


def test_divergence_stops_with_a_clear_message_and_keeps_the_last_good_checkpoint(tmp_path):
    # a learning rate of 1e25 after the first (lr 0) step blows the parameters up within a few steps
    config = tiny_train_config(learning_rate=1e25, warmup_steps=2, checkpoint_every_steps=1, num_train_steps=8)
    with pytest.raises(training.NonFiniteLossError, match=r"training diverged at step \d+.*last good checkpoint"):
        run(config, tmp_path)
    checkpoints = TrainingCheckpoints(str(tmp_path), read_only=True)
    assert 1 <= checkpoints.latest_step() < 8
    _, params = model_directory.load_model(tmp_path)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_init_from_a_model_directory_starts_from_its_parameters(uninterrupted, tmp_path):
    config, _, reference = uninterrupted
    source = tmp_path / "converted"
    model_directory.save_model(source, training.model_config_from(config), jax.device_get(reference.state.params))
    # one step at warmup step 0 has learning rate 0, so the parameters after it are exactly the loaded ones
    finetune = tiny_train_config(init_from=str(source), num_train_steps=1, seed=5)
    result = run(finetune, tmp_path / "finetune")
    assert_trees_equal(result.state.params, reference.state.params)


def test_init_from_a_different_architecture_names_the_mismatch(uninterrupted, tmp_path):
    config, reference_dir, _ = uninterrupted
    wider = tiny_train_config(init_from=str(reference_dir), **{"model.num_channels": 48})
    with pytest.raises(ValueError, match=r"init_from=.*parameter .* has shape"):
        run(wider, tmp_path)


def test_batch_size_that_the_mesh_cannot_split_is_rejected(tmp_path):
    config = tiny_train_config(batch_size=6, grad_accum_steps=4)
    with pytest.raises(ValueError, match=r"config.batch_size=6 is out of range: must be a multiple of"):
        run(config, tmp_path)


def test_resuming_with_another_architecture_is_refused_and_renames_nothing(uninterrupted, tmp_path):
    config, reference_dir, _ = uninterrupted
    shutil.copytree(reference_dir, tmp_path, dirs_exist_ok=True)
    wider = tiny_train_config(num_train_steps=12, **{"model.num_channels": 48})
    with pytest.raises(ValueError, match=r"checkpoints in --workdir=.*has shape"):
        run(wider, tmp_path)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3", "6", "8"]


def test_resuming_with_clipping_switched_off_continues(uninterrupted, tmp_path):
    config, reference_dir, _ = uninterrupted
    shutil.copytree(reference_dir, tmp_path, dirs_exist_ok=True)
    more = tiny_train_config(num_train_steps=10, max_grad_norm=0.0)
    result = run(more, tmp_path)
    assert [h["step"] for h in result.history] == [9, 10]
