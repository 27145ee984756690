"""The ``data`` section of a training config: defaults and their one validation."""

from __future__ import annotations

import ml_collections
from ml_collections import config_dict

from perceiver_ar_jax.errors import check

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
    """Raise ConfigError (a ValueError) naming the first field of the ``data`` section that is out of range."""

    def need(ok: bool, field: str, allowed: str) -> None:
        check(ok, f"data.{field}", config[field], allowed)

    need(config.source in SOURCES, "source", f"one of {SOURCES}")
    need(_is_int(config.max_seq_len) and config.max_seq_len >= 1, "max_seq_len", "an integer >= 1")
    need(config.min_seq_len is None or (_is_int(config.min_seq_len) and 1 <= config.min_seq_len <= config.max_seq_len),
         "min_seq_len", f"in [1, {config.max_seq_len}] (data.max_seq_len) or None (= data.max_seq_len)")
    need(_is_int(config.shuffle_buffer_size) and config.shuffle_buffer_size >= 0, "shuffle_buffer_size",
         "an integer >= 0")
    need(_is_int(config.prefetch_batches) and config.prefetch_batches >= 0, "prefetch_batches", "an integer >= 0")
    need(isinstance(config.eval_fraction, (int, float)) and 0.0 < config.eval_fraction < 1.0, "eval_fraction",
         "in (0, 1)")
    need(config.text_doc_separator is None or (isinstance(config.text_doc_separator, str)
                                               and config.text_doc_separator != ""),
         "text_doc_separator", "None (one document per file) or a non-empty string")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
