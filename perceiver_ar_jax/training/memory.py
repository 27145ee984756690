"""What a training step needs in memory, estimated before it runs, and the largest batch that fits.

    need = estimate_train_step(model_config, layout, rows=2, seq_len=1024, chunk_tokens=256)
    need.total                                      # bytes per device
    check_fits(need, free_bytes(device), ...)       # StepTooLargeError naming the batch_size that fits

The terms (per device): parameters and optimizer state as they are laid out; gradients and the optimizer's update
(one parameter-sized tree each); the parameters cast to the compute dtype; the activations the forward pass keeps
for the backward pass, which depend on the remat policy (`activation_bytes`), plus one layer's working set while it
is recomputed; one chunk of logits with its softmax and gradient (training/loss.py). It is an estimate of XLA's
buffers, within about 10% of the peak measured for the 455M model on CPU (README, "Fine-tuning on one host"); XLA
may fuse some of them away, so it errs on the large side, never by a factor.

The check compares what the step adds to the memory that is free once the state is in place: on a GPU/TPU,
`bytes_limit - bytes_in_use` of `device.memory_stats()`; on the CPU, /proc/meminfo's MemAvailable (shared by all
local CPU devices and every other process of the host).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from perceiver_ar_jax.errors import one_line
from perceiver_ar_jax.model import CausalLanguageModelConfig
from perceiver_ar_jax.training import partitioning
from perceiver_ar_jax.training.config import eval_batch_size_of, loss_chunk_tokens_of

GB = 1e9
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class StepTooLargeError(MemoryError):
    """The training or evaluation step does not fit in the device's free memory (exit status 4, out of memory)."""


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes per device of one step: `state` is in place before it runs, the rest is what the step adds."""

    rows: int  # sequences per device in one forward pass (the microbatch)
    state: int  # parameters + optimizer state, as laid out on the mesh
    gradients: int  # gradients and the optimizer's update (training only)
    compute_params: int  # the parameters cast to the compute dtype (0 when that is their dtype)
    activations: int  # kept for the backward pass (per remat policy) + one layer's working set
    logits: int  # one chunk of logits, its softmax and its gradient, float32

    @property
    def added(self) -> int:
        """What the step allocates beyond the state that is already there."""
        return self.gradients + self.compute_params + self.activations + self.logits

    @property
    def total(self) -> int:
        return self.state + self.added

    def describe(self) -> str:
        parts = [f"parameters and optimizer state {self.state / GB:.1f}"]
        if self.gradients:
            parts.append(f"gradients and update {self.gradients / GB:.1f}")
        if self.compute_params:
            parts.append(f"compute-dtype parameters {self.compute_params / GB:.1f}")
        parts.append(f"activations {self.activations / GB:.1f} for {self.rows} sequences per device")
        parts.append(f"logits {self.logits / GB:.2f}")
        return f"{self.total / GB:.1f} GB per device ({', '.join(parts)})"


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Bytes per device of the training state's parts, from the abstract state and its shardings."""

    params: int  # the parameters (param_dtype)
    optimizer: int  # the optimizer state (AdamW: two moments per parameter)
    num_params: int  # parameters of the whole model (not per device)

    @classmethod
    def of(cls, abstract_state: Any, shardings: Any) -> StateLayout:
        """abstract_state: a TrainState of jax.ShapeDtypeStruct; shardings: its NamedShardings."""
        return cls(params=_device_bytes(abstract_state.params, shardings.params),
                   optimizer=_device_bytes(abstract_state.opt_state, shardings.opt_state),
                   num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_state.params)))


def _device_bytes(tree: Any, shardings: Any) -> int:
    leaves, specs = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    return sum(math.prod(s.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
               for x, s in zip(leaves, specs, strict=True))


# ----------------------------------------------------------------------------------------------------------------
def layer_bytes_per_token(cfg: CausalLanguageModelConfig, num_keys: int, widening: int, saved: str) -> int:
    """Activation bytes of one attention + MLP layer per query token.

    saved: "all" (no remat, or everything_saveable: every intermediate, as the layer's working set is too),
    "dots" (dots_saveable: weight and attention products), "weight_dots" (dots_with_no_batch_dims_saveable: the
    products with weights only: q, k, v, output, MLP in and out), "inputs" (nothing_saveable: the layer's input).
    """
    d, c = _DTYPE_BYTES[cfg.dtype], cfg.num_channels
    scores = 2 * cfg.num_heads * num_keys * 4  # attention scores and probabilities, float32 softmax
    weight_dots = (5 + widening) * c * d  # q, k, v, output projection, MLP in (widening x c) and out
    if saved == "inputs":
        return c * d
    if saved == "weight_dots":
        return c * d + weight_dots
    if saved == "dots":
        return c * d + weight_dots + scores // 2 + c * d
    # every intermediate: norms (2c), q/k/v/attention output/projection (5c), residuals (2c), MLP in, GELU, out
    return (9 + 2 * widening + 1) * c * d + scores


def _saved_kind(cfg: CausalLanguageModelConfig) -> str:
    if not cfg.activation_checkpointing or cfg.remat_policy == "everything_saveable":
        return "all"
    return {"nothing_saveable": "inputs", "dots_saveable": "dots",
            "dots_with_no_batch_dims_saveable": "weight_dots"}[cfg.remat_policy]


def activation_bytes(cfg: CausalLanguageModelConfig, rows: int, seq_len: int, *, train: bool = True) -> int:
    """Activations of a forward pass over `rows` sequences of seq_len tokens (max_latents of them latents): kept
    for the backward pass of every layer per the remat policy, plus one layer's full working set (the layer being
    recomputed, with its gradient: twice that); a forward pass without gradients holds only the working set."""
    n = min(cfg.max_latents, seq_len)
    p = seq_len - n
    d, c = _DTYPE_BYTES[cfg.dtype], cfg.num_channels
    w_self, w_cross = cfg.self_attention_widening_factor, cfg.cross_attention_widening_factor
    # the hybrid layer: latents attend to prefix + latents; the prefix is normed and projected to keys and values
    working = max(layer_bytes_per_token(cfg, p + n, w_cross, "all") * n + 4 * c * d * p,
                  layer_bytes_per_token(cfg, n, w_self, "all") * n)
    if not train:
        return (working + seq_len * c * d) * rows  # + the embedded input
    kind = _saved_kind(cfg)
    kept = (layer_bytes_per_token(cfg, p + n, w_cross, kind) * n
            + (4 if kind != "inputs" else 1) * c * d * p  # prefix: input (and norm, keys, values)
            + cfg.num_self_attention_layers * layer_bytes_per_token(cfg, n, w_self, kind) * n)
    hidden = 2 * n * c * 4  # the output-normed latents and their gradient
    return (kept + 2 * working + seq_len * c * d + hidden) * rows


def logits_bytes(cfg: CausalLanguageModelConfig, rows: int, num_latents: int, chunk_tokens: int, *,
                 train: bool = True) -> int:
    """One chunk of (rows x latents, vocab) float32 logits: with their softmax and gradient in training (and the
    float32 gradient of the tied embedding that the chunks accumulate), with their exponentials in evaluation."""
    from perceiver_ar_jax.training.loss import latents_per_chunk

    chunk_rows = rows * latents_per_chunk(rows, num_latents, chunk_tokens)
    if not train:
        return 2 * chunk_rows * cfg.vocab_size * 4
    accumulated = cfg.vocab_size * cfg.num_channels * 4 if chunk_rows < rows * num_latents else 0
    return 3 * chunk_rows * cfg.vocab_size * 4 + accumulated


# XLA's CPU backend keeps far more than the remat policy says: the 455M model at batch_size=2 peaked at 12.9 GB RSS,
# and at batch_size=8 it passed 24.3 GB and was killed, at least 1.9 GB per 1024-token sequence where the policy
# (dots_with_no_batch_dims_saveable) keeps 0.43 GB and every intermediate is 1.1 GB. On the CPU the estimate counts
# every intermediate, this many times.
CPU_ACTIVATION_FACTOR = 2


def estimate_train_step(cfg: CausalLanguageModelConfig, layout: StateLayout, rows: int, seq_len: int,
                        chunk_tokens: int, cpu: bool = False) -> StepMemory:
    """A train step on `rows` sequences per device per microbatch (gradient accumulation adds one gradient tree,
    counted with the update); cpu: XLA's CPU backend (CPU_ACTIVATION_FACTOR)."""
    compute = 0
    if cfg.dtype != cfg.param_dtype:
        compute = layout.params * _DTYPE_BYTES[cfg.dtype] // _DTYPE_BYTES[cfg.param_dtype]
    if cpu:
        activations = CPU_ACTIVATION_FACTOR * activation_bytes(cfg.replace(activation_checkpointing=False), rows,
                                                               seq_len)
    else:
        activations = activation_bytes(cfg, rows, seq_len)
    return StepMemory(rows=rows, state=layout.params + layout.optimizer, gradients=2 * layout.params,
                      compute_params=compute, activations=activations,
                      logits=logits_bytes(cfg, rows, min(cfg.max_latents, seq_len), chunk_tokens))


def estimate_eval_step(cfg: CausalLanguageModelConfig, layout: StateLayout, rows: int, seq_len: int,
                       chunk_tokens: int, cpu: bool = False) -> StepMemory:
    """An eval step (forward only) on `rows` sequences per device."""
    compute = 0
    if cfg.dtype != cfg.param_dtype:
        compute = layout.params * _DTYPE_BYTES[cfg.dtype] // _DTYPE_BYTES[cfg.param_dtype]
    return StepMemory(rows=rows, state=layout.params + layout.optimizer, gradients=0, compute_params=compute,
                      activations=(CPU_ACTIVATION_FACTOR if cpu else 1) * activation_bytes(cfg, rows, seq_len,
                                                                                          train=False),
                      logits=logits_bytes(cfg, rows, min(cfg.max_latents, seq_len), chunk_tokens, train=False))


# ----------------------------------------------------------------------------------------------------------------
def free_bytes(device: jax.Device) -> int | None:
    """Memory a step may still allocate on `device` (None when unknown): an accelerator's bytes_limit minus
    bytes_in_use; for the CPU, the host's MemAvailable."""
    if device.platform == "cpu":
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
        return None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - a backend without memory statistics: no check
        return None
    if not stats or "bytes_limit" not in stats:
        return None
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


def largest_fitting(fits: Callable[[int], bool], upper: int) -> int | None:
    """The largest rows in [1, upper] with fits(rows) (fits is monotone: fewer rows never need more), or None."""
    if upper < 1 or not fits(1):
        return None
    lo, hi = 1, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid - 1)
    return lo


def check_fits(estimate: Callable[[int], StepMemory], rows: int, available: int | None, *, devices_sharing: int,
               what: str, field: str, rows_to_batch: Callable[[int], int], where: str) -> StepMemory:
    """Raise StepTooLargeError unless the step's added bytes (x devices_sharing the memory: the local CPU devices)
    fit in `available`; the message names the `field` value that fits. Returns the estimate."""
    need = estimate(rows)
    if available is None or need.added * devices_sharing <= available:
        return need
    best = largest_fitting(lambda r: estimate(r).added * devices_sharing <= available, rows - 1)
    advice = (f"{field}={rows_to_batch(best)} fits" if best is not None else
              f"no {field} fits (even {rows_to_batch(1)} needs {estimate(1).total / GB:.1f} GB): use more devices, "
              "model.activation_checkpointing=True or a smaller model")
    raise StepTooLargeError(
        f"the {what} at {field}={rows_to_batch(rows)} needs about {need.describe()}, and {where} has "
        f"{available / GB:.1f} GB free beyond the state; {advice}")


def check_step_memory(config: ml_collections.ConfigDict, model_config, layout: StateLayout, mesh) -> None:
    """Before the first step: stop with StepTooLargeError (one line naming the batch size that fits) when the
    estimated train step, or the eval step, needs more than the device's free memory (training/memory.py)."""
    device = jax.local_devices()[0]
    available = free_bytes(device)
    shards = partitioning.num_batch_shards(mesh)
    # CPU devices of one process share the host's memory; each accelerator has its own
    cpu = device.platform == "cpu"
    sharing = jax.local_device_count() if cpu else 1
    seq_len, chunk = model_config.max_seq_len, loss_chunk_tokens_of(config)
    where = f"{device.platform} device {device.id}" if device.platform != "cpu" else "the host"
    microbatch = config.batch_size // config.grad_accum_steps
    need = check_fits(
        lambda rows: estimate_train_step(model_config, layout, rows, seq_len, chunk, cpu), microbatch // shards,
        available, devices_sharing=sharing, what="train step", field="batch_size", where=where,
        rows_to_batch=lambda rows: rows * shards * config.grad_accum_steps)
    if config.eval_every_steps:
        check_fits(
            lambda rows: estimate_eval_step(model_config, layout, rows, seq_len, chunk, cpu),
            eval_batch_size_of(config) // shards, available, devices_sharing=sharing, what="eval step",
            field="eval_batch_size", where=where, rows_to_batch=lambda rows: rows * shards)
    logging.info("memory: the train step needs about %s; %s has %s free beyond the state", need.describe(), where,
                 "an unknown amount" if available is None else f"{available / GB:.1f} GB")


def out_of_memory_error(error: Exception, config: ml_collections.ConfigDict, evaluating: bool) -> MemoryError:
    """A failed allocation while running, as one line naming the step that ran out and the batch size to lower."""
    if evaluating:
        what, advice = f"evaluation at eval_batch_size={eval_batch_size_of(config)}", "a smaller eval_batch_size"
    else:
        what = f"train step at batch_size={config.batch_size}"
        advice = "a smaller batch_size, grad_accum_steps > 1 or model.activation_checkpointing=True"
    detail = one_line(error).removeprefix("out of memory: ").split(" (try ")[0]
    return MemoryError(f"out of memory in the {what}: {detail}; try {advice}")
