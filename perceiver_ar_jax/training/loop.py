"""The training loop: build the mesh and state, resume or initialise, train, evaluate, checkpoint, log.

    train_and_evaluate(config, workdir)

`config` is an ml_collections ConfigDict as in configs/*.py (`batch_size` is the global batch, summed over all
processes and devices). The workdir ends up a model directory too: `config.json` (the model config), the tokenizer
files and `checkpoints/`, so `perceiver_ar_jax.checkpoints.load_model(workdir)` and the sampler read the newest
good parameters straight from it. Nothing is written into the workdir until the run has really started (the
state is there, the input pipeline gave its first batch and the first step is running): a run that fails at once
leaves the workdir as it was. `train.log` there then keeps every log record, the console's hidden ones too.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from perceiver_ar_jax import backend
from perceiver_ar_jax.checkpoints import TrainingCheckpoints, workdir_path
from perceiver_ar_jax.errors import NonFiniteLossError, check, is_out_of_memory, one_line
from perceiver_ar_jax.errors.console import FILE_ONLY, LogFile
from perceiver_ar_jax.model import CausalLanguageModel
from perceiver_ar_jax.training import memory, partitioning
from perceiver_ar_jax.training import metrics as metrics_lib
from perceiver_ar_jax.training import optimizer as optimizer_lib
from perceiver_ar_jax.training.config import check_config, eval_batch_size_of, loss_chunk_tokens_of
from perceiver_ar_jax.training.state import (
    check_same_parameters,
    make_init_fn,
    read_workdir_model_config,
    restore_or_init,
    state_layout,
    write_workdir_files,
)
from perceiver_ar_jax.training.step import TrainState, eval_step, train_step
from perceiver_ar_jax.training.stop_signal import StopSignal

LOG_FILE = "train.log"


class ResumableIterator(Protocol):
    """What the input pipeline yields: numpy dicts of (per-process batch, max_seq_len) arrays, resumable."""

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]: ...
    def __next__(self) -> dict[str, np.ndarray]: ...
    def get_state(self) -> dict[str, Any]: ...
    def set_state(self, state: dict[str, Any]) -> None: ...


# split ("train" | "eval"), per-process batch size -> a fresh iterator at the start of that split's stream
DatasetFactory = Callable[[str, int], ResumableIterator]


@dataclasses.dataclass
class TrainResult:
    state: TrainState  # the state after the last step run
    history: list[dict[str, float]]  # one entry per step run: step, loss, z_loss, grad_norm, learning_rate
    evals: list[dict[str, float]]  # one entry per evaluation: step, loss, perplexity, bits_per_token
    stopped_early: bool  # True when a stop signal or preemption ended the run before num_train_steps
    stopped_by: int | None = None  # the signal that stopped it (SIGTERM also for a multi-host preemption)


def default_datasets(config: ml_collections.ConfigDict, tokenizer) -> DatasetFactory:
    """The input pipeline of perceiver_ar_jax.data: TFDS (e.g. c4/en) or local text, this process's share."""
    from perceiver_ar_jax import data

    check(tokenizer is not None, "tokenizer_dir", config.tokenizer_dir,
          "a tokenizer directory (spiece.model, tokenizer_config.json): the input pipeline needs one")

    def make(split: str, batch_size: int) -> ResumableIterator:
        train = split == "train"
        # evaluation starts at the beginning of the eval split every time, so it sees the same batches; the split
        # repeats so that every process yields num_eval_batches batches even when its share is short (processes
        # must run the same number of eval steps)
        return data.make_dataset(config.data, tokenizer, split=config.data.train_split if train else
                                 config.data.eval_split, batch_size=batch_size, process_index=jax.process_index(),
                                 process_count=jax.process_count(), seed=config.seed, train=train, repeat=True)

    return make


# ----------------------------------------------------------------------------------------------------------------
# the loop
def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       datasets: DatasetFactory | None = None) -> TrainResult:
    """Train `config` in `workdir`, resuming from its newest good checkpoint if there is one.

    datasets: overrides the input pipeline (tests, custom data); default: perceiver_ar_jax.data per config.data.
    """
    backend.reuse_host_memory()  # before JAX's first computation; a no-op when JAX has already run one
    log_file = LogFile()  # holds the records until the run has started, then writes them to the workdir
    try:
        return _train_and_evaluate(config, workdir_path(workdir), datasets, log_file)
    except BaseException as e:
        logging.error("the run failed: %s", one_line(e), exc_info=e, extra=FILE_ONLY)
        raise
    finally:
        log_file.close()


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir, datasets: DatasetFactory | None,
                        log_file: LogFile) -> TrainResult:
    model_config = check_config(config)  # every value, before the mesh is built
    mesh = partitioning.create_mesh(config.mesh)
    check_config(config, partitioning.num_batch_shards(mesh), jax.process_count())  # and what the mesh needs
    rules = partitioning.logical_axis_rules(config)

    tokenizer = None
    if config.tokenizer_dir:
        from perceiver_ar_jax.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_pretrained(config.tokenizer_dir)
        check(tokenizer.vocab_size <= model_config.vocab_size, "model.vocab_size", model_config.vocab_size,
              f">= the tokenizer's vocabulary ({tokenizer.vocab_size}, {config.tokenizer_dir})")
    datasets = datasets or default_datasets(config, tokenizer)

    model = CausalLanguageModel(model_config)
    optimizer = optimizer_lib.make_optimizer(config)
    schedule = optimizer_lib.make_schedule(config)
    init_fn = make_init_fn(model, optimizer, config.seed)
    abstract_state, state_shardings = state_layout(init_fn, mesh, rules)
    trained_with = read_workdir_model_config(workdir)
    if trained_with is not None:
        # a resumed run must have the architecture of its checkpoints (say so before trying to restore them)
        check_same_parameters(trained_with, abstract_state.params, f"the checkpoints in --workdir={workdir}")

    def start_writing() -> None:
        """The run has really started: make the workdir a model directory, and keep the log there."""
        write_workdir_files(workdir, config, model_config, config.tokenizer_dir)
        checkpoints.create_directory()
        if "://" not in str(workdir):  # a local workdir (no appending to objects in a bucket)
            name = LOG_FILE if jax.process_count() == 1 else f"train.process_{jax.process_index()}.log"
            log_file.start(workdir / name)
        logging.info("training in %s on the mesh %s (%d devices, %d processes)", workdir, dict(mesh.shape),
                     mesh.size, jax.process_count())

    with jax.set_mesh(mesh):
        checkpoints = TrainingCheckpoints(workdir, max_to_keep=config.keep_checkpoints,
                                          async_save=config.async_checkpointing)
        loop = train_iter = None
        try:
            state, train_iter = restore_or_init(config, model_config, checkpoints, datasets, init_fn,
                                                abstract_state, state_shardings)
            if config.get("check_memory", True):
                memory.check_step_memory(config, model_config, memory.StateLayout.of(abstract_state, state_shardings),
                                         mesh)
            batch_sharding = partitioning.batch_sharding(mesh)
            replicated = partitioning.replicated(mesh)
            # the chunk is per device: the global batch's rows are split over the batch shards
            chunk_tokens = loss_chunk_tokens_of(config) * partitioning.num_batch_shards(mesh)
            p_train_step = jax.jit(
                with_rules(rules, lambda s, b: train_step(s, b, model=model, optimizer=optimizer,
                                                          num_microbatches=config.grad_accum_steps,
                                                          z_loss_weight=config.z_loss_weight,
                                                          chunk_tokens=chunk_tokens)),
                in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
                donate_argnums=(0,))
            p_eval_step = jax.jit(with_rules(rules, lambda p, b: eval_step(p, b, model=model,
                                                                            chunk_tokens=chunk_tokens)),
                                  in_shardings=(state_shardings.params, batch_sharding), out_shardings=replicated)
            loop = _Loop(config, workdir, model, tokenizer, mesh, checkpoints, datasets, p_train_step, p_eval_step,
                         schedule, start_writing)
            try:
                return loop.run(state, train_iter)
            except Exception as e:
                if is_out_of_memory(e) and not isinstance(e, memory.StepTooLargeError):
                    raise memory.out_of_memory_error(e, config, evaluating=loop.phase == "evaluation") from e
                raise
        finally:
            # stop the prefetch threads before the interpreter exits (one left in the tokenizer's C++ aborts it)
            for close in (getattr(it, "close", None) for it in (train_iter, loop and loop.eval_iter)):
                close and close()
            if loop is not None:
                loop.close()
            else:
                checkpoints.close()


def with_rules(rules, step: Callable) -> Callable:
    """step, traced with the logical-axis rules as Flax's context: the model lays out its attention kernels (and
    context parallelism) by them (model/sharding.py)."""

    def traced(*args):
        with nn.logical_axis_rules(rules):
            return step(*args)

    return traced


class _Loop:
    """The step loop and its periodic jobs (logging, evaluation, samples, checkpoints, preemption)."""

    def __init__(self, config, workdir, model, tokenizer, mesh, checkpoints, datasets, p_train_step, p_eval_step,
                 schedule, start_writing: Callable[[], None]):
        self.config, self.workdir, self.model, self.tokenizer, self.mesh = config, workdir, model, tokenizer, mesh
        self.checkpoints, self.datasets, self.schedule = checkpoints, datasets, schedule
        self.p_train_step, self.p_eval_step = p_train_step, p_eval_step
        self.start_writing = start_writing
        self.writer = metrics_lib.MetricsWriter(None)  # the console only, until the run has started
        self.stop_signal = StopSignal() if jax.process_count() == 1 else None
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []  # metrics not yet fetched from the devices
        self.history: list[dict[str, float]] = []
        self.evals: list[dict[str, float]] = []
        self.last_good_step: int | None = checkpoints.latest_step()
        self.sampling_enabled = config.sample_every_steps > 0 and tokenizer is not None
        # the eval stream, made on first use and rewound to its start for every evaluation
        self.eval_iter: ResumableIterator | None = None
        self.eval_start: dict[str, Any] | None = None
        self.phase = "train step"  # what runs now: named by an out-of-memory error

    def close(self) -> None:
        self.checkpoints.wait()
        self.checkpoints.close()
        self.writer.close()
        if self.stop_signal is not None:
            self.stop_signal.restore()

    # ------------------------------------------------------------------------------------------------------------
    def run(self, state: TrainState, train_iter: ResumableIterator) -> TrainResult:
        config = self.config
        start = int(jax.device_get(state.step))
        total = config.num_train_steps
        peak = metrics_lib.peak_flops_per_device(jax.devices()[0], config.peak_flops_per_device)
        throughput = metrics_lib.Throughput(
            start, total, tokens_per_step=config.batch_size * config.model.max_seq_len,
            flops_per_step=metrics_lib.train_flops_per_step(self.model.config, config.batch_size,
                                                            config.model.max_seq_len),
            peak_flops_total=None if peak is None else peak * jax.device_count())
        if start >= total:
            logging.info("nothing to do: the checkpoint is at step %d and num_train_steps is %d", start, total)
        stopped_early, stopped_by = False, None
        for step in range(start + 1, total + 1):  # `step` = number of updates done after this iteration
            try:
                batch = next(train_iter)
            except StopIteration:
                raise RuntimeError(f"the training data ran out after {step - 1} steps; num_train_steps is {total}. "
                                   "Use a repeating training split (the data config) or fewer steps") from None
            state, step_metrics = self.p_train_step(state, partitioning.make_global_batch(batch, self.mesh))
            self.pending.append((step, step_metrics))
            if step == start + 1:
                throughput.reset(step)  # the first step includes compilation
                self.start_writing()  # compiled and running: from here on the workdir is written
                self.writer = metrics_lib.MetricsWriter(str(self.workdir), tensorboard=config.tensorboard)

            stop = self.should_stop(step)
            last = step == total
            if (config.log_every_steps and step % config.log_every_steps == 0) or last or stop:
                self.log_train(step, throughput)
            if (config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0) or last or stop:
                self.save(state, train_iter)
            if stop:
                stopped_early, stopped_by = not last, self.stop_reason()
                logging.warning("stopped at step %d of %d (%s) with a checkpoint; rerun the same command to resume",
                                step, total, signal_name(stopped_by))
                break
            if config.eval_every_steps and (step % config.eval_every_steps == 0 or last):
                self.evaluate(step, state.params)
                throughput.reset(step)
            if self.sampling_enabled and (step % config.sample_every_steps == 0 or last):
                self.sample(step, state.params)
                throughput.reset(step)
        self.flush_pending()
        self.writer.flush()
        return TrainResult(state=state, history=self.history, evals=self.evals, stopped_early=stopped_early,
                           stopped_by=stopped_by)

    def should_stop(self, step: int) -> bool:
        if self.stop_signal is not None:
            return self.stop_signal.received is not None
        return self.checkpoints.reached_preemption(step)

    def stop_reason(self) -> int:
        """The signal that stopped the run: the one received, or SIGTERM for a multi-host preemption."""
        received = self.stop_signal.received if self.stop_signal is not None else None
        return received if received is not None else signal.SIGTERM

    # ------------------------------------------------------------------------------------------------------------
    def flush_pending(self) -> list[dict[str, float]]:
        """Fetch the metrics of the steps run since the last fetch; stop on a non-finite loss."""
        if not self.pending:
            return []
        fetched = jax.device_get([m for _, m in self.pending])
        # the learning rate of each step's update, in one call (the schedule is elementwise)
        learning_rates = np.asarray(self.schedule(np.asarray([step - 1 for step, _ in self.pending])))
        rows = []
        for (step, _), values, lr in zip(self.pending, fetched, learning_rates, strict=True):
            rows.append({"step": step, **{k: float(v) for k, v in values.items()}, "learning_rate": float(lr)})
        self.pending = []
        self.history.extend(rows)
        bad = [r for r in rows if not all(math.isfinite(r[k]) for k in ("loss", "grad_norm", "param_norm"))]
        if bad:
            self.checkpoints.wait()
            where = (f"the last good checkpoint is step {self.last_good_step} in {self.checkpoints.directory}"
                     if self.last_good_step is not None else "no checkpoint was written")
            b = bad[0]
            raise NonFiniteLossError(
                f"training diverged at step {b['step']}: loss {b['loss']}, grad norm {b['grad_norm']}, parameter "
                f"norm {b['param_norm']}; stopped without saving the broken parameters ({where}). Try a lower "
                "learning_rate, a longer warmup_steps, max_grad_norm > 0 or z_loss_weight > 0; rerunning resumes "
                "from that checkpoint")
        return rows

    def log_train(self, step: int, throughput: metrics_lib.Throughput) -> None:
        rows = self.flush_pending()  # waits for the step to finish, so the rates below are true
        rates = throughput.update(step)
        if not rows:
            return
        tokens = sum(r["num_tokens"] for r in rows)
        values = {
            "loss": sum(r["loss"] * r["num_tokens"] for r in rows) / max(tokens, 1.0),
            "z_loss": sum(r["z_loss"] * r["num_tokens"] for r in rows) / max(tokens, 1.0),
            "grad_norm": rows[-1]["grad_norm"],
            "param_norm": rows[-1]["param_norm"],
            "learning_rate": rows[-1]["learning_rate"],
            **rates,
        }
        if not self.config.z_loss_weight:
            del values["z_loss"]
        self.writer.scalars(step, {f"train/{k}": v for k, v in values.items()})
        self.writer.console(metrics_lib.progress_line(step, self.config.num_train_steps, values))

    def save(self, state: TrainState, train_iter: ResumableIterator) -> None:
        self.flush_pending()  # never save parameters that a non-finite loss has broken
        if self.checkpoints.save(state, train_iter.get_state()):
            self.last_good_step = int(jax.device_get(state.step))

    def evaluate(self, step: int, params) -> None:
        """Validation loss, perplexity and bits per token on the first num_eval_batches batches of the eval split."""
        self.phase = "evaluation"
        self._evaluate(step, params)
        self.phase = "train step"

    def _evaluate(self, step: int, params) -> None:
        config = self.config
        if self.eval_iter is None:
            self.eval_iter = self.datasets("eval", eval_batch_size_of(config) // jax.process_count())
            self.eval_start = self.eval_iter.get_state()
        else:
            self.eval_iter.set_state(self.eval_start)
        sums, batches = None, 0
        for _ in range(config.num_eval_batches):
            try:
                batch = next(self.eval_iter)
            except StopIteration:
                break
            out = self.p_eval_step(params, partitioning.make_global_batch(batch, self.mesh))
            sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
            batches += 1
        if sums is None:
            logging.warning("evaluation at step %d skipped: the eval split yielded no batch", step)
            return
        sums = jax.device_get(sums)
        values = metrics_lib.eval_summary(float(sums["loss_sum"]), float(sums["num_tokens"]))
        self.evals.append({"step": step, **values})
        self.writer.scalars(step, {f"eval/{k}": v for k, v in values.items()})
        self.writer.console(f"eval at step {step} ({batches} batches): loss {values['loss']:.4f} | perplexity "
                            f"{values['perplexity']:.2f} | bits/token {values['bits_per_token']:.4f}")

    def sample(self, step: int, params) -> None:
        """A sampled continuation of config.sample_prompt, if the sampler exists (single-process runs)."""
        config = self.config
        if jax.process_count() > 1:
            self.sampling_enabled = False
            logging.info("periodic samples are only drawn in single-process runs")
            return
        from perceiver_ar_jax.sampling import generate  # on use: training without samples never compiles it

        try:
            # documents follow an end-of-sequence token in the training stream
            prompt = [self.tokenizer.eos_id] + self.tokenizer.encode(config.sample_prompt)
            prompt = prompt[-(self.model.config.max_seq_len - config.sample_max_new_tokens):]
            ids = np.asarray([prompt], np.int32)
            out = generate(self.model, params, ids, num_latents=min(config.sample_num_latents, len(prompt)),
                           max_new_tokens=config.sample_max_new_tokens, do_sample=True, top_k=config.sample_top_k,
                           rng=jax.random.key(step))
            # prompt and continuation decoded together (a leading space is dropped at the start of a decode)
            text = self.tokenizer.decode(np.asarray(jax.device_get(out))[0].tolist(), skip_special_tokens=True)
        except Exception as e:  # noqa: BLE001 - a failed sample must not end a training run
            self.sampling_enabled = False
            logging.warning("periodic samples disabled: sampling failed (%s: %s)", type(e).__name__, e)
            return
        self.writer.texts(step, {"sample": text})
        self.writer.console(f"sample at step {step}: {text!r}")


def signal_name(signum: int | None) -> str:
    return "no signal" if signum is None else signal.Signals(signum).name
