"""Checkpoint conversion between perceiver-io (PyTorch) and perceiver-ar-jax, both ways.

    python -m perceiver_ar_jax.convert SRC DST                # perceiver-io HF dir or Lightning .ckpt -> our dir
    python -m perceiver_ar_jax.convert --to-pytorch SRC DST   # our dir -> HF dir perceiver-io's from_pretrained loads
    config, params = load_torch_checkpoint("path/to/perceiver-ar-clm-base")

One explicit table (`table.py`) says which perceiver-io tensor is which of our parameters and how its layout
changes. Every tensor's shape is checked against the config before it is used (`importer.py`), and a checkpoint
with a missing or an unused tensor is refused, naming the keys. `torch_reader.py` and `safetensors_io.py` read the
files one tensor at a time; `export.py` writes the other way.
"""

from perceiver_ar_jax.convert.cli import main
from perceiver_ar_jax.convert.export import export_torch_checkpoint
from perceiver_ar_jax.convert.importer import load_torch_checkpoint
from perceiver_ar_jax.convert.table import parameter_table, torch_shape
from perceiver_ar_jax.errors import CheckpointError

__all__ = ["CheckpointError", "export_torch_checkpoint", "load_torch_checkpoint", "main", "parameter_table",
           "torch_shape"]
