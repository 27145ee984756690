"""Train Perceiver AR.

    python train.py --config=configs/tiny.py --workdir=/tmp/tiny --config.num_train_steps=200

Rerunning the same command resumes from the newest good checkpoint in --workdir. See the README for C4 on TPU pods.
The console shows progress and this library's messages; --verbosity=0 (info) or 1 (debug) adds every library's log
records, which <workdir>/train.log keeps anyway. Exit status: 0 done, 2 bad input, 3 diverged, 4 out of memory,
75 storage unavailable, 130 Ctrl-C, 143 SIGTERM/preempted (both after saving), 1 anything else (README).
"""

import ast
import sys

from absl import app, flags
from ml_collections import config_flags

from perceiver_ar_jax import training
from perceiver_ar_jax.errors import EXIT_BAD_INPUT, EXIT_OK, ConfigError
from perceiver_ar_jax.errors.console import configure_logging, run_command
from perceiver_ar_jax.training import partitioning

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, TensorBoard events, tokenizer, config and log.")
config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
flags.DEFINE_bool("traceback", False, "Show the full traceback of a bad-config or bad-input error, not one line.")


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with every mistake as one `error:` line and exit status 2 (absl prints a usage
    message and exits 1; a misspelled --config.X field is a traceback of ml_collections)."""
    try:
        rest = FLAGS(argv)
        for name in ("config", "workdir"):
            if FLAGS[name].value is None:
                raise flags.Error(f"--{name} is required")
        return rest
    except flags.Error as e:
        message = str(e).replace("flag --", "--") + " (python train.py --helpshort for the flags)"
    except (AttributeError, KeyError, ValueError) as e:  # an override of a field the config does not have
        message = str(unknown_override(argv) or " ".join(str(e).split()))
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def unknown_override(argv: list[str]) -> ConfigError | None:
    """The first --config.a.b=value whose field does not exist, as ConfigError naming the closest field."""
    paths = [a.split("=", 1)[1] for a in argv if a.startswith("--config=")]
    paths += [b for a, b in zip(argv, argv[1:], strict=False) if a == "--config"]
    try:
        config = config_flags.config_flags.ConfigFileFlagParser("config", lock_config=False).parse(paths[-1])
    except Exception:  # noqa: BLE001 - no config to compare with: the caller reports the original error
        return None
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        dotted, _, text = arg[len("--config."):].partition("=")
        try:
            value = ast.literal_eval(text)  # shown as the user typed it: 4, not '4'
        except (ValueError, SyntaxError):
            value = text
        section, parents, names = config, [], dotted.split(".")
        for i, name in enumerate(names):
            if not hasattr(section, "keys") or name not in section:
                known = list(section.keys()) if hasattr(section, "keys") else []
                closest = ConfigError.unknown(name, value, known)
                error = ConfigError(".".join(names[i:]), value, closest.allowed, closest.problem)
                for parent in reversed(parents):
                    error = error.within(parent)
                return error
            section = section[name]
            parents.append(name)
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    configure_logging(FLAGS.verbosity if FLAGS["verbosity"].present else None)
    sys.exit(run_command(train, show_traceback=FLAGS.traceback))


def train() -> int:
    training.check_config(FLAGS.config)  # every value, before anything starts
    partitioning.initialize_distributed(FLAGS.config.distributed)  # before anything touches the devices
    result = training.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    # stopped by a signal after saving: 128 + its number (143 SIGTERM/preemption: restart; 130 Ctrl-C)
    return 128 + result.stopped_by if result.stopped_early else EXIT_OK


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
