"""The step-memory estimate (training/memory.py) and the eval-batch rule of training configs."""

import pytest

from perceiver_ar_jax.errors import EXIT_OUT_OF_MEMORY, exit_status, one_line
from perceiver_ar_jax.model import CausalLanguageModelConfig
from perceiver_ar_jax.training import memory
from perceiver_ar_jax.training.config import base_config, check_config, eval_batch_size_of

GB = 10**9
# the released 455M model as configs/c4_455m.py trains it
C4_455M = CausalLanguageModelConfig(
    vocab_size=32000, max_seq_len=1024, max_latents=512, num_channels=1280, num_heads=10, max_heads_parallel=2,
    num_self_attention_layers=20, cross_attention_dropout=0.0, output_norm=True, output_bias=False,
    abs_pos_emb=False, activation_checkpointing=True, remat_policy="dots_with_no_batch_dims_saveable",
    dtype="bfloat16", param_dtype="float32")
# 453,950,720 float32 parameters on one device, AdamW's two moments
LAYOUT = memory.StateLayout(params=453_950_720 * 4, optimizer=2 * 453_950_720 * 4, num_params=453_950_720)


def train(rows, config=C4_455M, chunk_tokens=256):
    return memory.estimate_train_step(config, LAYOUT, rows, config.max_seq_len, chunk_tokens)


def test_the_estimate_grows_with_the_batch_and_shrinks_with_remat():
    assert train(1).total < train(2).total < train(8).total < train(64).total
    assert train(2).state == LAYOUT.params + LAYOUT.optimizer
    no_remat = C4_455M.replace(activation_checkpointing=False)
    nothing = C4_455M.replace(remat_policy="nothing_saveable")
    assert nothing.activation_checkpointing
    assert train(8, nothing).activations < train(8).activations < train(8, no_remat).activations


def test_the_455m_fine_tuning_batch_of_two_is_about_the_measured_peak():
    """batch_size=2 peaked at 12.9 GB RSS on the CPU (the README's run, with about 1.5 GB of runtime besides):
    the estimate is near it, not above 24 GB (the issue's host must not be refused)."""
    need = train(2)
    assert 9 * GB < need.total < 13 * GB


def test_on_the_cpu_the_455m_batch_that_was_killed_is_refused_and_the_issues_batch_passes():
    """Measured on a 24 GB host: batch_size=2 peaked at 12.9-13.3 GB RSS, batch_size=8 passed 24.3 GB (killed)."""
    assert memory.estimate_train_step(C4_455M, LAYOUT, 8, 1024, 256, cpu=True).total > 24 * GB
    assert memory.estimate_train_step(C4_455M, LAYOUT, 2, 1024, 256, cpu=True).added < 12 * GB


def test_chunking_bounds_the_logits():
    unchunked = memory.logits_bytes(C4_455M, 256, 512, 0)
    chunked = memory.logits_bytes(C4_455M, 256, 512, 256)
    assert unchunked == 3 * 256 * 512 * 32000 * 4  # (256, 512, 32000) float32, three times: 50 GB
    assert chunked < 0.3 * GB  # 256 rows x 32,000 (three times) + the embedding's float32 gradient
    assert memory.logits_bytes(C4_455M, 256, 512, 256, train=False) < chunked


def test_a_fitting_step_passes_and_a_huge_one_names_the_batch_size_that_fits():
    def check(rows, available):
        return memory.check_fits(lambda r: train(r), rows, available, devices_sharing=1, what="train step",
                                 field="batch_size", rows_to_batch=lambda r: 4 * r, where="the host")

    assert check(2, 20 * GB).rows == 2
    assert check(10_000, None).rows == 10_000  # unknown free memory: no check
    with pytest.raises(memory.StepTooLargeError) as raised:
        check(64, 20 * GB)
    message = one_line(raised.value)
    fits = memory.largest_fitting(lambda r: train(r).added <= 20 * GB, 63)
    assert f"batch_size={4 * fits} fits" in message and "batch_size=256 needs about" in message
    assert train(fits).added <= 20 * GB < train(fits + 1).added
    assert exit_status(raised.value) == EXIT_OUT_OF_MEMORY
    with pytest.raises(memory.StepTooLargeError, match="no batch_size fits"):
        check(2, 1 * GB)


def test_largest_fitting_is_a_binary_search_over_a_monotone_test():
    assert memory.largest_fitting(lambda r: r <= 37, 100) == 37
    assert memory.largest_fitting(lambda r: r <= 370, 100) == 100
    assert memory.largest_fitting(lambda r: False, 100) is None


def test_free_bytes_of_the_cpu_is_the_hosts_available_memory():
    import jax

    free = memory.free_bytes(jax.devices("cpu")[0])
    assert free is None or 0 < free < 10**15


# ----------------------------------------------------------------------------------------------------------------
def test_evaluation_follows_the_training_microbatch_unless_eval_batch_size_is_set():
    config = base_config()
    config.batch_size = 8
    assert config.eval_batch_size is None and eval_batch_size_of(config) == 8
    config.grad_accum_steps = 4
    assert eval_batch_size_of(config) == 2  # the rows of one training forward pass
    config.eval_batch_size = 0
    assert eval_batch_size_of(config) == 2
    config.eval_batch_size = 6
    assert eval_batch_size_of(config) == 6
    check_config(config, num_batch_shards=2)
    config.eval_batch_size = 3
    with pytest.raises(ValueError, match="config.eval_batch_size=3"):
        check_config(config, num_batch_shards=2)
    config.eval_batch_size = -1
    with pytest.raises(ValueError, match="config.eval_batch_size=-1"):
        check_config(config)


def test_the_455m_config_evaluates_with_its_training_batch():
    from tests.test_train_configs import load

    config = load("c4_455m")
    assert eval_batch_size_of(config) == 256
    config.batch_size = 2  # the issue's one-host fine-tuning: evaluation fits too
    assert eval_batch_size_of(config) == 2
