"""The training loop and memory: evaluation follows the training batch, a step that cannot fit stops before it
runs, and a failed allocation ends in one line with the out-of-memory exit status."""

import jax
import pytest

from perceiver_ar_jax import training
from perceiver_ar_jax.errors import EXIT_OUT_OF_MEMORY, exit_status, one_line
from perceiver_ar_jax.training import loop as loop_lib
from perceiver_ar_jax.training import memory
from tests.synthetic_data import synthetic_datasets, tiny_train_config


class Recording:
    """A DatasetFactory that remembers the batch size each split was asked for."""

    def __init__(self, config):
        self.factory, self.asked = synthetic_datasets(config), {}

    def __call__(self, split, batch_size):
        self.asked[split] = batch_size
        return self.factory(split, batch_size)


def test_the_end_of_run_evaluation_follows_the_training_microbatch(tmp_path):
    config = tiny_train_config(num_train_steps=2, batch_size=8, grad_accum_steps=2, eval_every_steps=1000,
                               eval_batch_size=None)
    datasets = Recording(config)
    result = training.train_and_evaluate(config, str(tmp_path), datasets=datasets)
    # the run is shorter than eval_every_steps: its last step is still evaluated, with batch_size / grad_accum_steps
    assert [e["step"] for e in result.evals] == [2]
    assert datasets.asked == {"train": 8, "eval": 4}


def test_an_explicit_eval_batch_size_is_used(tmp_path):
    config = tiny_train_config(num_train_steps=1, eval_every_steps=1, eval_batch_size=2)
    datasets = Recording(config)
    training.train_and_evaluate(config, str(tmp_path), datasets=datasets)
    assert datasets.asked["eval"] == 2


def test_a_step_that_cannot_fit_stops_before_it_runs_in_one_line(tmp_path, monkeypatch):
    config = tiny_train_config(num_train_steps=2)
    # 2 MB free: the tiny model's state is there, a step of 8 sequences of 32 tokens does not fit, 1 sequence does
    model_config = training.model_config_from(config)
    need = memory.estimate_train_step(model_config, _layout(config), 1, 32, config.loss_chunk_tokens, cpu=True)
    free = need.added * jax.local_device_count() + 1
    monkeypatch.setattr(memory, "free_bytes", lambda device: free)
    with pytest.raises(memory.StepTooLargeError) as raised:
        training.train_and_evaluate(config, str(tmp_path / "run"), datasets=synthetic_datasets(config))
    message = one_line(raised.value)
    assert message.startswith("the train step at batch_size=8 needs about") and "batch_size=" in message
    assert f"batch_size={jax.local_device_count()} fits" in message  # one sequence per device
    assert exit_status(raised.value) == EXIT_OUT_OF_MEMORY
    assert not (tmp_path / "run").exists()  # stopped before anything was written

    monkeypatch.setattr(memory, "free_bytes", lambda device: 1)
    with pytest.raises(memory.StepTooLargeError, match="no batch_size fits"):
        training.train_and_evaluate(config, str(tmp_path / "run"), datasets=synthetic_datasets(config))


def test_an_allocation_that_fails_in_evaluation_is_one_line_and_the_checkpoint_is_kept(tmp_path, monkeypatch):
    config = tiny_train_config(num_train_steps=2, eval_every_steps=1000)

    def failing_eval_step(params, batch, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: " + "Error dispatching computation: " * 3
                                         + "Out of memory allocating 25584336896 bytes.")

    monkeypatch.setattr(loop_lib, "eval_step", failing_eval_step)
    with pytest.raises(MemoryError) as raised:
        training.train_and_evaluate(config, str(tmp_path), datasets=synthetic_datasets(config))
    assert one_line(raised.value) == ("out of memory in the evaluation at eval_batch_size=8: INTERNAL: Out of memory "
                                      "allocating 25584336896 bytes.; try a smaller eval_batch_size")
    assert exit_status(raised.value) == EXIT_OUT_OF_MEMORY
    assert (tmp_path / "checkpoints" / "2").exists()  # saved before the evaluation


def _layout(config):
    from perceiver_ar_jax.model import CausalLanguageModel
    from perceiver_ar_jax.training import optimizer as optimizer_lib
    from perceiver_ar_jax.training import partitioning
    from perceiver_ar_jax.training.state import make_init_fn, state_layout

    model = CausalLanguageModel(training.model_config_from(config))
    init_fn = make_init_fn(model, optimizer_lib.make_optimizer(config), config.seed)
    mesh = partitioning.create_mesh(config.mesh)
    abstract, shardings = state_layout(init_fn, mesh, partitioning.logical_axis_rules(config))
    return memory.StateLayout.of(abstract, shardings)
