"""Training metrics: model FLOPs and MFU, throughput and ETA, TensorBoard events and the console progress line.

MFU (model FLOPs utilisation) = model FLOPs per second / (number of devices x peak FLOPs per device). Model FLOPs
count the matrix multiplications the model needs, 2 FLOPs per multiply-add, training = 3 x forward (the backward
pass costs twice the forward); recomputation by rematerialisation is not counted (so this is MFU, not HFU).
For a batch of B sequences of N = P + L tokens (prefix P, latents L), C channels, vocabulary V, widening factors
w_x (hybrid layer) and w_s (self-attention layers), S self-attention layers, the forward FLOPs are

    hybrid layer:       B * (2*(P+L)*2*C^2          keys and values of prefix and latents
                             + 2*L*2*C^2            queries and output projection of the latents
                             + 2*L*(P+L)*2*C        scores and weighted sum (the full L x (P+L) matrix)
                             + 2*L*2*w_x*C^2)       MLP
    each self layer:    B * (2*L*4*C^2 + 2*L*L*2*C + 2*L*2*w_s*C^2)
    logits:             B * 2*L*C*V

While training with cross_attention_dropout r, P is the number of prefix positions kept, P - floor(P * r).
"""

from __future__ import annotations

import collections
import math
import time
from typing import Any

import jax

from perceiver_ar_jax.model import CausalLanguageModelConfig

# Dense bf16 peak FLOP/s per device (one JAX device: a TPU chip, or a GPU), from the vendors' data sheets.
PEAK_FLOPS = {
    "TPU v2": 45e12 / 2,  # JAX shows each v2/v3 core as a device; the data sheet figure is per chip (2 cores)
    "TPU v3": 123e12 / 2,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def forward_flops(config: CausalLanguageModelConfig, batch_size: int, seq_len: int, prefix_len: int) -> float:
    """Matmul FLOPs of one forward pass (see the module docstring for the formula)."""
    c, v = config.num_channels, config.vocab_size
    latents = seq_len - prefix_len
    keys = prefix_len + latents
    hybrid = (2 * keys * 2 * c * c + 2 * latents * 2 * c * c + 2 * latents * keys * 2 * c
              + 2 * latents * 2 * config.cross_attention_widening_factor * c * c)
    self_layer = (2 * latents * 4 * c * c + 2 * latents * latents * 2 * c
                  + 2 * latents * 2 * config.self_attention_widening_factor * c * c)
    logits = 2 * latents * c * v
    return float(batch_size) * (hybrid + config.num_self_attention_layers * self_layer + logits)


def train_flops_per_step(config: CausalLanguageModelConfig, batch_size: int, seq_len: int) -> float:
    """3 x forward FLOPs of a training step on a (batch_size, seq_len) batch with prefix seq_len - max_latents."""
    prefix_len = seq_len - config.max_latents
    kept = prefix_len - int(prefix_len * config.cross_attention_dropout)
    return 3.0 * forward_flops(config, batch_size, kept + config.max_latents, kept)


def peak_flops_per_device(device: Any, override: float | None = None) -> float | None:
    """Peak FLOP/s of `device` (from its device_kind), or `override` when given; None when unknown (e.g. CPU)."""
    if override:
        return float(override)
    kind = getattr(device, "device_kind", "")
    for name in sorted(PEAK_FLOPS, key=len, reverse=True):
        if kind.startswith(name):
            return PEAK_FLOPS[name]
    return None


class Throughput:
    """Wall-clock bookkeeping between progress lines: steps/s, tokens/s, MFU and the time left."""

    def __init__(self, start_step: int, total_steps: int, tokens_per_step: int, flops_per_step: float,
                 peak_flops_total: float | None, window: int = 20):
        self.total_steps = total_steps
        self.tokens_per_step = tokens_per_step
        self.flops_per_step = flops_per_step
        self.peak_flops_total = peak_flops_total
        self._marks = collections.deque([(start_step, time.perf_counter())], maxlen=window)

    def reset(self, step: int) -> None:
        """Forget the time spent outside training steps (evaluation, compilation) before `step`."""
        self._marks.clear()
        self._marks.append((step, time.perf_counter()))

    def update(self, step: int) -> dict[str, float]:
        """Rates over the recent steps ending at `step` (empty before two marks exist)."""
        now = time.perf_counter()
        first_step, first_time = self._marks[0]
        self._marks.append((step, now))
        if step <= first_step or now <= first_time:
            return {}
        seconds_per_step = (now - first_time) / (step - first_step)
        out = {
            "steps_per_s": 1.0 / seconds_per_step,
            "tokens_per_s": self.tokens_per_step / seconds_per_step,
            "eta_s": max(0, self.total_steps - step) * seconds_per_step,
        }
        if self.peak_flops_total:
            out["mfu"] = self.flops_per_step / seconds_per_step / self.peak_flops_total
        return out


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(step: int, total_steps: int, values: dict[str, float]) -> str:
    """`step 120/1000 | loss 4.213 | lr 3.0e-04 | grad norm 0.84 | 5.1k tok/s | MFU 41.2% | ETA 12:03`."""
    parts = [f"step {step}/{total_steps}", f"loss {values['loss']:.4f}"]
    if "z_loss" in values:
        parts.append(f"z-loss {values['z_loss']:.3g}")
    parts += [f"lr {values['learning_rate']:.2e}", f"grad norm {values['grad_norm']:.3f}"]
    if "tokens_per_s" in values:
        tps = values["tokens_per_s"]
        parts.append(f"{tps / 1e3:.1f}k tok/s" if tps >= 1e3 else f"{tps:.0f} tok/s")
    if "mfu" in values:
        parts.append(f"MFU {100 * values['mfu']:.1f}%")
    if "eta_s" in values:
        parts.append(f"ETA {format_duration(values['eta_s'])}")
    return " | ".join(parts)


def eval_summary(loss_sum: float, num_tokens: float) -> dict[str, float]:
    """Summed cross-entropy (nats) over num_tokens -> mean loss, perplexity and bits per token."""
    loss = loss_sum / max(num_tokens, 1.0)
    return {"loss": loss, "perplexity": math.exp(min(loss, 80.0)), "bits_per_token": loss / math.log(2.0)}


class MetricsWriter:
    """TensorBoard events (clu.metric_writers, written by process 0 only) + console lines (print, process 0)."""

    def __init__(self, logdir: str | None, *, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.writer = None
        if self.active and logdir and tensorboard:
            from clu import metric_writers

            self.writer = metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.writer is not None:
            self.writer.write_scalars(step, {k: float(v) for k, v in values.items()})

    def texts(self, step: int, values: dict[str, str]) -> None:
        if self.writer is not None:
            self.writer.write_texts(step, values)

    def hparams(self, values: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write_hparams(values)

    def console(self, line: str) -> None:
        if self.active:
            print(line, flush=True)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
