"""The training stage: the loop (`loop.py`) around a pure train step (`step.py`), its state (`state.py`),
optimizer, metrics, the device mesh (`partitioning.py`) and the config with its one validation (`config.py`).

    python train.py --config=configs/tiny.py --workdir=/tmp/tiny
    train_and_evaluate(config, workdir)
"""

from perceiver_ar_jax.errors import NonFiniteLossError
from perceiver_ar_jax.training.config import base_config, check_config, model_config_from
from perceiver_ar_jax.training.loop import TrainResult, train_and_evaluate

__all__ = ["NonFiniteLossError", "TrainResult", "base_config", "check_config", "model_config_from",
           "train_and_evaluate"]
