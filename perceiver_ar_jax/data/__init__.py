"""Input pipeline: C4 from TFDS or a local text corpus, packed into left-padded chunks as perceiver-io does.

``make_dataset(data_config, tokenizer, split=..., batch_size=...)`` returns a :class:`BatchIterator` of numpy batches
``input_ids``/``labels``/``pad_mask`` of shape ``(batch, max_seq_len)`` with ``get_state``/``set_state`` for exact
resumption; ``data_config_defaults()`` gives the ``data`` config section. Modules: ``config`` (fields), ``sources``
(TFDS and text documents, per-process shares), ``packing`` (tokens, chunks, batches, positions), ``pipeline``
(the iterator).
"""

from perceiver_ar_jax.data.config import check_data_config, data_config_defaults
from perceiver_ar_jax.data.packing import PackedBatches, Position
from perceiver_ar_jax.data.pipeline import BatchIterator, make_dataset
from perceiver_ar_jax.data.sources import TextSource, TfdsSource, hold_out, load_text_documents

__all__ = [
    "BatchIterator",
    "PackedBatches",
    "Position",
    "TextSource",
    "TfdsSource",
    "check_data_config",
    "data_config_defaults",
    "hold_out",
    "load_text_documents",
    "make_dataset",
]
