"""Train Perceiver AR.

    python train.py --config=configs/tiny.py --workdir=/tmp/tiny --config.num_train_steps=200

Rerunning the same command resumes from the newest good checkpoint in --workdir. See the README for C4 on TPU pods.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from perceiver_ar_jax import training
from perceiver_ar_jax.training import partitioning

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, tokenizer and config.")
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
flags.DEFINE_bool("traceback", False, "Show the full traceback of a bad-config or bad-input error, not one line.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        training.check_config(FLAGS.config)  # every value, before anything starts
        partitioning.initialize_distributed(FLAGS.config.distributed)  # before anything touches the devices
        training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except training.NonFiniteLossError as e:
        logging.error("%s", e)
        raise SystemExit(f"error: {e}") from None
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:  # a config value out of range, a bad path
        if FLAGS.traceback:
            raise
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    app.run(main)
