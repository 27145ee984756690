"""The ``data`` section of a training config: defaults and checks."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

SOURCES = ("tfds", "text")


def data_config_defaults() -> ml_collections.ConfigDict:
    """Defaults of the ``data`` config section: C4 from TFDS as perceiver-io trained the 455M model."""
    config = ml_collections.ConfigDict()
    # Where documents come from: "tfds" (a prepared TFDS dataset such as C4) or "text" (local UTF-8 text files).
    config.source = "tfds"
    # TFDS dataset/config name and version, as in tfds.builder("c4/en:3.1.0").
    config.tfds_name = "c4/en"
    config.tfds_version = "3.1.0"
    # TFDS data directory holding the prepared dataset, e.g. "gs://my-bucket/tensorflow_datasets" on TPU VMs;
    # None = TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets). Nothing is downloaded at run time.
    config.data_dir = config_dict.placeholder(str)
    # The TFDS feature that holds the document text.
    config.tfds_text_key = "text"
    # source="text": files and/or directories (a directory = its *.txt files, recursively, sorted) of the corpus.
    config.text_paths = ()
    # source="text": None = one document per file; else the string that separates documents within a file.
    config.text_doc_separator = config_dict.placeholder(str)
    # source="text": validation files; empty = hold out eval_fraction of the text_paths documents instead.
    config.eval_text_paths = ()
    # source="text": fraction of documents held out for validation when eval_text_paths is empty (at least one).
    config.eval_fraction = 0.05
    # Split names: TFDS split specs for source="tfds" (e.g. "train", "validation", "train[:1%]"); for source="text"
    # train_split selects the training documents and eval_split the held-out ones.
    config.train_split = "train"
    config.eval_split = "validation"
    # Documents per shuffle window for training (perceiver-io's shuffle_window_size); 0 or 1 = source order.
    config.shuffle_buffer_size = 10_000
    # Training chunks hold L input tokens, L uniform in [min_seq_len, max_seq_len]; validation chunks always
    # max_seq_len. max_seq_len must equal the model's max_seq_len: every batch is (batch, max_seq_len), left-padded.
    config.min_seq_len = 512
    config.max_seq_len = 1024
    # Batches prepared ahead by a background thread (0 = prepare each batch when it is asked for).
    config.prefetch_batches = 2
    return config


def check_data_config(config: ml_collections.ConfigDict) -> None:
    """Raise ValueError naming the first field whose value is out of range."""
    if config.source not in SOURCES:
        raise ValueError(f"data.source must be one of {SOURCES}, got {config.source!r}")
    if not isinstance(config.max_seq_len, int) or config.max_seq_len < 1:
        raise ValueError(f"data.max_seq_len must be an integer >= 1, got {config.max_seq_len!r}")
    if config.min_seq_len is not None and not 1 <= config.min_seq_len <= config.max_seq_len:
        raise ValueError(
            f"data.min_seq_len must be in [1, {config.max_seq_len}] (data.max_seq_len) or None, "
            f"got {config.min_seq_len}"
        )
    if config.shuffle_buffer_size < 0:
        raise ValueError(f"data.shuffle_buffer_size must be >= 0, got {config.shuffle_buffer_size}")
    if config.prefetch_batches < 0:
        raise ValueError(f"data.prefetch_batches must be >= 0, got {config.prefetch_batches}")
