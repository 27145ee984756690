"""A deterministic stand-in for the input pipeline with the same interface (numpy batches, get_state/set_state).

Global batch i is drawn from a generator seeded with (seed, split, i); each process takes its rows of it, so any
number of processes together see exactly the batches one process sees. Rows are left-padded chunks of random length
in [min_seq_len, max_seq_len] of a simple learnable sequence (a noisy counter), labels shifted by one, pads = 0.
"""

from __future__ import annotations

import os
import signal

import numpy as np

PAD_ID = 0


class SyntheticBatches:
    def __init__(self, *, vocab_size: int, max_seq_len: int, min_seq_len: int, batch_size: int,
                 process_index: int = 0, process_count: int = 1, seed: int = 0, split: str = "train",
                 num_batches: int | None = None):
        self.vocab_size, self.max_seq_len, self.min_seq_len = vocab_size, max_seq_len, min_seq_len
        self.batch_size, self.process_index, self.process_count = batch_size, process_index, process_count
        self.seed, self.split, self.num_batches = seed, split, num_batches
        self.index = 0

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.num_batches is not None and self.index >= self.num_batches:
            raise StopIteration
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, self.index])
        global_batch = self.batch_size * self.process_count
        n = self.max_seq_len
        start = rng.integers(1, self.vocab_size, size=(global_batch, 1))
        step = rng.integers(1, 4, size=(global_batch, 1))
        seq = (start + step * np.arange(n + 1)) % (self.vocab_size - 1) + 1  # ids 1 .. vocab-1, a learnable pattern
        noise = rng.random((global_batch, n + 1)) < 0.1
        seq = np.where(noise, rng.integers(1, self.vocab_size, size=seq.shape), seq)
        lengths = rng.integers(self.min_seq_len, n + 1, size=global_batch)
        pad_mask = np.arange(n)[None, :] < (n - lengths)[:, None]
        input_ids = np.where(pad_mask, PAD_ID, seq[:, :-1]).astype(np.int32)
        labels = np.where(pad_mask, PAD_ID, seq[:, 1:]).astype(np.int32)
        rows = slice(self.process_index * self.batch_size, (self.process_index + 1) * self.batch_size)
        self.index += 1
        return {"input_ids": input_ids[rows], "labels": labels[rows], "pad_mask": pad_mask[rows]}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def synthetic_datasets(config, process_index: int = 0, process_count: int = 1, num_eval_batches: int = 2):
    """A train_lib DatasetFactory over SyntheticBatches for `config`."""

    def make(split: str, batch_size: int) -> SyntheticBatches:
        return SyntheticBatches(vocab_size=config.model.vocab_size, max_seq_len=config.model.max_seq_len,
                                min_seq_len=config.data.min_seq_len, batch_size=batch_size,
                                process_index=process_index, process_count=process_count, seed=config.seed,
                                split=split, num_batches=None if split == "train" else num_eval_batches)

    return make


def tiny_train_config(**overrides):
    """A training config small enough to compile and run a few steps in seconds on one CPU core."""
    from perceiver_ar_jax.training.config import base_config

    config = base_config()
    config.model.update(vocab_size=64, max_seq_len=32, max_latents=16, num_channels=32, num_heads=2,
                        num_self_attention_layers=2, cross_attention_dropout=0.25, abs_pos_emb=False,
                        output_norm=True, output_bias=False, dtype="float32")
    config.data.min_seq_len = 16
    config.update(batch_size=8, eval_batch_size=8, num_train_steps=8, warmup_steps=2, learning_rate=3e-3,
                  log_every_steps=1, eval_every_steps=0, num_eval_batches=2, checkpoint_every_steps=3,
                  sample_every_steps=0, tensorboard=False, async_checkpointing=True)
    for key, value in overrides.items():
        target = config
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return config


class SignalAtBatch:
    """Wraps a DatasetFactory: sends this process `signum` when the training iterator hands out batch `index`
    (counted from the start of the stream): SIGTERM as a cluster does before it preempts a job, SIGINT as Ctrl-C."""

    def __init__(self, factory, index, signum=signal.SIGTERM):
        self.factory, self.index, self.signum = factory, index, signum

    def __call__(self, split, batch_size):
        it = self.factory(split, batch_size)
        if split != "train":
            return it
        outer = self

        class Wrapped:
            def __iter__(self):
                return self

            def __next__(self):
                if it.index == outer.index:
                    os.kill(os.getpid(), outer.signum)
                return next(it)

            get_state, set_state = it.get_state, it.set_state

        return Wrapped()
