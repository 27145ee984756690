"""Which windows score which tokens of a document: the one definition of the strided evaluation.

A document's tokens `t_0 .. t_T` (the first one a context token, normally `</s>`, see `evaluate`) give T input
positions `i = 0 .. T-1`; position i predicts `t_{i+1}` from `t_0 .. t_i`. Every window is W input positions
long, of which the last n are latents (the model's queries) and the first P = W - n the prefix:

    W = max_prefix_len + num_latents        (= max_seq_len when num_latents = max_latents)

and `prefix_len = P` always, so every window has one shape and one compiled program scores them all. The model
gives logits at latent positions only, so a token is scored at a latent position. A window is named by its end e
(exclusive) and covers positions [e - W, e):

    first window, in blocks of n:   e = n, 2n, ..., up to W        each scores the n positions [e - n, e)
                                                                     (the last block, e = W, only the new ones)
    then sliding by the stride k:   e = W + k, W + 2k, ...           each scores its last k positions [e - k, e)

so every position is scored exactly once: position i < W with all i + 1 tokens before it as context (its block's
window starts before the document), position i >= W with between W - k + 1 and W tokens of context. A block of
the first window is the forward pass of the document's first e tokens with prefix e - n, as in training on a
chunk of e tokens: positions before the document are left padding (masked, positions count from the first real
token), and a window that reaches past the end of the document is filled on the right with tokens that no
scored position sees (attention is causal). So the loss of position i depends on t_0 .. t_{i+1} only, never on
the document's length, and no latent is ever a pad (perceiver-io's self-attention layers have no pad mask).

    T = 10, W = 6, n = 3, k = 2:   e = 3: [. . . 0 1 2] scores 0 1 2       (". " = left pad, masked)
                                   e = 6: [0 1 2 3 4 5] scores 3 4 5
                                   e = 8: [2 3 4 5 6 7] scores 6 7
                                   e = 10: [4 5 6 7 8 9] scores 8 9
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class WindowSpec:
    """The shape of every window: `window` = prefix + `num_latents` positions, the last `stride` scored once the
    first window is done."""

    window: int
    num_latents: int
    stride: int

    @property
    def prefix_len(self) -> int:
        return self.window - self.num_latents

    @classmethod
    def for_model(cls, max_seq_len: int, max_latents: int, num_latents: int | None = None,
                  stride: int | None = None) -> WindowSpec:
        """The longest window a model allows with `num_latents` latents (default max_latents); stride default
        num_latents. ValueError naming the bad value and its range."""
        num_latents = max_latents if num_latents is None else num_latents
        if not _is_int(num_latents) or not 1 <= num_latents <= max_latents:
            raise ValueError(f"num_latents={num_latents!r} is out of range: must be in [1, {max_latents}] "
                             f"(the model's max_latents)")
        stride = num_latents if stride is None else stride
        if not _is_int(stride) or not 1 <= stride <= num_latents:
            raise ValueError(f"stride={stride!r} is out of range: must be in [1, {num_latents}] (num_latents: a "
                             "window scores at most its latents)")
        return cls(window=max_seq_len - max_latents + num_latents, num_latents=num_latents, stride=stride)


def window_ends(num_positions: int, spec: WindowSpec) -> np.ndarray:
    """Ends e (exclusive) of the windows that score a document of `num_positions` input positions, in order."""
    first = np.arange(spec.num_latents, spec.window, spec.num_latents)
    ends = np.append(first, spec.window)
    sliding = np.arange(spec.window + spec.stride, num_positions + spec.stride, spec.stride)
    ends = np.concatenate([ends, sliding]).astype(np.int64)
    # keep the windows up to the first one that reaches the end of the document
    return ends[: int(np.searchsorted(ends, num_positions)) + 1]


@dataclasses.dataclass
class Rows:
    """Windows as model inputs, R rows:

    input_ids (R, W) int32, pad_mask (R, W) bool (True = left pad), labels (R, n) int32 (the token after each
    latent position), weights (R, n) bool (True = scored here), context (R, n) int32 (tokens of the document the
    model saw before predicting the label, context token included; 0 where not scored).
    """

    input_ids: np.ndarray
    pad_mask: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    context: np.ndarray

    def __len__(self) -> int:
        return len(self.input_ids)


def make_rows(tokens: np.ndarray, ends: np.ndarray, spec: WindowSpec, pad_id: int) -> Rows:
    """The rows of the windows ending at `ends` over `tokens` (T + 1 ids: inputs are tokens[:-1], labels
    tokens[1:]), as the module docstring lays them out."""
    tokens = np.asarray(tokens, np.int32)
    num_positions = len(tokens) - 1
    ends = np.asarray(ends, np.int64)
    starts = ends - spec.window
    # positions of every row's entries; < 0 is left padding, >= T is filler after the document
    pos = starts[:, None] + np.arange(spec.window)[None, :]
    pad_mask = pos < 0
    input_ids = np.where(pad_mask | (pos >= num_positions), pad_id, tokens[np.clip(pos, 0, num_positions)])
    latent_pos = pos[:, spec.prefix_len:]
    labels = np.where((latent_pos >= 0) & (latent_pos < num_positions),
                      tokens[np.clip(latent_pos + 1, 0, num_positions)], pad_id)
    first_scored = first_scored_positions(ends, spec)
    weights = (latent_pos >= first_scored[:, None]) & (latent_pos < np.minimum(ends, num_positions)[:, None])
    context = np.where(weights, latent_pos + 1 - np.maximum(starts, 0)[:, None], 0)
    return Rows(input_ids.astype(np.int32), pad_mask, labels.astype(np.int32), weights, context.astype(np.int32))


def first_scored_positions(ends: np.ndarray, spec: WindowSpec) -> np.ndarray:
    """First scored position of the windows ending at `ends` (any subset of a document's windows, in order):
    the previous window's end, from the rule of `window_ends` (e - n in the first window, e - k after it, and the
    first window's last block only its new positions)."""
    ends = np.asarray(ends, np.int64)
    n, k, w = spec.num_latents, spec.stride, spec.window
    in_first = ends <= w
    block_start = np.where(ends == w, ((w - 1) // n) * n, ends - n)
    return np.where(in_first, block_start, ends - k)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)
