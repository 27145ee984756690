"""The errors this library raises on bad input, and the exit status each command-line tool gives them.

Every check of user input raises one of these with a one-line message that names the bad value and what is
allowed; the command-line tools (`train.py`, `sample.py`, `python -m perceiver_ar_jax.convert`, the demo) print
that line as `error: ...` and exit with the status of `exit_status`.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any


class ConfigError(ValueError):
    """A config value out of range: `config.model.num_heads=5 is out of range: must be ...`.

    `field` is the dotted path as the user writes it on the command line (`model.num_heads`), without `config.`.
    A section's own check raises it with the field's name within the section; the caller that knows where the
    section sits in the whole config re-raises it `within` that section, so the message names the flag as typed.
    """

    def __init__(self, field: str, value: Any, allowed: str, problem: str = "is out of range: must be"):
        self.field, self.value, self.allowed, self.problem = field, value, allowed, problem
        super().__init__(f"config.{field}={value!r} {problem} {allowed}")

    @classmethod
    def unknown(cls, field: str, value: Any, known: Iterable[str]) -> ConfigError:
        """A field that does not exist (a misspelled flag), with the closest existing name."""
        known = sorted(known)
        close = difflib.get_close_matches(field, known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"the fields are {', '.join(known)}"
        return cls(field, value, hint, problem="is not a config field:")

    def within(self, section: str) -> ConfigError:
        """The same error for the field inside `section` (e.g. "model")."""
        allowed = self.allowed
        if self.problem.startswith("is not"):
            allowed = allowed.replace("did you mean ", f"did you mean {section}.")
        return ConfigError(f"{section}.{self.field}", self.value, allowed, self.problem)


def check(ok: bool, field: str, value: Any, allowed: str) -> None:
    """Raise ConfigError(field, value, allowed) unless ok."""
    if not ok:
        raise ConfigError(field, value, allowed)


class CheckpointError(ValueError):
    """A checkpoint or model directory that cannot be used: missing, unreadable, refused, or of another model."""


# Exit statuses of the command-line tools (the README lists them). Schedulers restart a job that exits with
# EXIT_PREEMPTED; the others mean that rerunning the same command will fail the same way.
EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected failure (a bug, or the system): the traceback is printed
EXIT_BAD_INPUT = 2  # a bad flag, config value, path, prompt or checkpoint: one `error:` line
EXIT_DIVERGED = 3  # training stopped on a non-finite loss; the last good checkpoint is kept
EXIT_OUT_OF_MEMORY = 4  # the step does not fit in the device's memory
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after saving where there is something to save
EXIT_PREEMPTED = 143  # stopped by SIGTERM or a preemption notice (128 + SIGTERM) after saving: restart to resume
