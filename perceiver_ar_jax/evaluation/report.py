"""How an evaluation is shown: a progress line with ETA, the figures, the loss-vs-context table, the JSON and the
plot (matplotlib, imported only where the plot is drawn, so the library works without it)."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, TextIO

from perceiver_ar_jax.evaluation.results import EvaluationResult
from perceiver_ar_jax.evaluation.scoring import Progress
from perceiver_ar_jax.training.metrics import format_duration


def _rate(tokens_per_s: float) -> str:
    return f"{tokens_per_s / 1e3:.1f}k tok/s" if tokens_per_s >= 1e3 else f"{tokens_per_s:.0f} tok/s"


def progress_line(p: Progress, width: int = 30) -> str:
    """`[#########.........] 31% | 12,288/39,544 tokens | 3 of 4 documents | 5.1k tok/s | ETA 0:05`. The fraction
    and ETA go by tokens when their total is known, else by documents."""
    if p.total_tokens:
        fraction = p.tokens / p.total_tokens
    elif p.total_documents:
        fraction = p.documents / p.total_documents
    else:
        fraction = None
    rate = p.tokens / p.seconds if p.seconds > 0 else 0.0
    parts = []
    if fraction is not None:
        filled = int(round(width * min(fraction, 1.0)))
        parts.append(f"[{'#' * filled}{'.' * (width - filled)}] {100 * fraction:3.0f}%")
    parts.append(f"{p.tokens:,}" + (f"/{p.total_tokens:,}" if p.total_tokens else "") + " tokens")
    parts.append(f"{p.documents:,}" + (f" of {p.total_documents:,}" if p.total_documents else "") + " documents")
    parts.append(_rate(rate))
    if fraction:
        parts.append(f"ETA {format_duration(p.seconds * (1.0 - fraction) / fraction)}")
    return " | ".join(parts)


class ProgressBar:
    """Redraws the progress line in place on a terminal (at most 10 times a second); elsewhere (a log file)
    writes a line every `every_s` seconds."""

    def __init__(self, stream: TextIO | None = None, every_s: float = 30.0):
        self.stream = sys.stderr if stream is None else stream  # looked up now: sys.stderr may have been replaced
        self.every_s = every_s
        self.tty = self.stream.isatty()
        self.last = -math.inf

    def __call__(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self.last < (0.1 if self.tty else self.every_s):
            return
        self.last = now
        self.stream.write(("\r" + progress_line(p) + "\033[K") if self.tty else progress_line(p) + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last > -math.inf:
            self.stream.write("\n")
            self.stream.flush()


def figures(result: EvaluationResult) -> str:
    """The figures of the whole evaluation, a few lines."""
    m = result.metrics()
    lines = [f"documents {len(result.documents):,} | tokens {result.num_tokens:,}"
             + (f" | bytes {result.num_bytes:,}" if result.num_bytes else ""),
             f"loss {m['loss']:.4f} | perplexity {m['perplexity']:.3f} | bits/token {m['bits_per_token']:.4f}"
             + (f" | bits/byte {m['bits_per_byte']:.4f}" if m["bits_per_byte"] is not None else ""),
             f"window {result.window} ({result.window - result.num_latents} prefix + {result.num_latents} latents), "
             f"stride {result.stride} | {_rate(result.num_tokens / result.seconds) if result.seconds else ''}"
             f" in {format_duration(result.seconds)}"]
    return "\n".join(lines)


def context_table(result: EvaluationResult) -> str:
    """The mean loss of the tokens grouped by how many tokens of context they had, as a Markdown table."""
    lines = ["| context (tokens) | tokens | share | loss | bits/token |", "|---:|---:|---:|---:|---:|"]
    total = max(result.num_tokens, 1)
    for b in result.buckets():
        span = str(b["context_min"]) if b["context_min"] == b["context_max"] else \
            f"{b['context_min']}-{b['context_max']}"
        lines.append(f"| {span} | {b['tokens']:,} | {100 * b['tokens'] / total:.1f}% | {b['loss']:.4f} | "
                     f"{b['bits_per_token']:.4f} |")
    return "\n".join(lines)


def write_json(result: EvaluationResult, path: str, extra: dict[str, Any] | None = None) -> None:
    """The figures, context buckets and per-document losses (and `extra`, e.g. what was scored) as JSON."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({**(extra or {}), **result.to_json()}, f, indent=1)


def plot_loss_vs_context(result: EvaluationResult, path: str, title: str = "") -> None:
    """A PNG of the mean loss against context (log2 axis), one point per bucket at its largest context, the
    number of tokens written beside it."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    buckets = result.buckets()
    x = [b["context_max"] for b in buckets]
    y = [b["loss"] for b in buckets]
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    ax.plot(x, y, marker="o")
    for xi, yi, b in zip(x, y, buckets, strict=True):
        ax.annotate(f"{b['tokens']:,}", (xi, yi), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7, color="gray")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context: tokens seen before the scored token (bucket's largest)")
    ax.set_ylabel("mean loss (nats/token)")
    m = result.metrics()
    ax.set_title(title or f"loss {m['loss']:.3f} over {result.num_tokens:,} tokens; window {result.window}, "
                          f"stride {result.stride}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
