"""What is saved on disk: a finished model (`model_directory.py`: config.json + params/ + tokenizer files) and the
checkpoints of a training run (`training_checkpoints.py`: orbax steps with optimizer and data state)."""

from perceiver_ar_jax.checkpoints.model_directory import (
    CONFIG_FILE,
    TOKENIZER_FILES,
    config_from_json,
    config_json,
    copy_tokenizer_files,
    is_model_dir,
    load_model,
    read_config,
    save_model,
    staged_directory,
)
from perceiver_ar_jax.checkpoints.training_checkpoints import (
    TrainingCheckpoints,
    UnreadableCheckpointError,
    is_training_workdir,
    saved_steps,
    workdir_path,
)
from perceiver_ar_jax.errors import CheckpointError

__all__ = ["CONFIG_FILE", "TOKENIZER_FILES", "CheckpointError", "TrainingCheckpoints", "UnreadableCheckpointError",
           "config_from_json", "config_json", "copy_tokenizer_files", "is_model_dir", "is_training_workdir",
           "load_model", "read_config", "save_model", "saved_steps", "staged_directory", "workdir_path"]
