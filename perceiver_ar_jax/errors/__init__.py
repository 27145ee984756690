"""The errors this library raises, and the exit status each command-line tool gives them.

Every check of user input raises one of these with a one-line message that names the bad value and what is
allowed; the command-line tools (`train.py`, `sample.py`, `python -m perceiver_ar_jax.convert`, the demo) print
that line as `error: ...` and exit with the status of `exit_status` (`console.run_command` does both).
"""

from __future__ import annotations

import difflib
import re
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


class NonFiniteLossError(RuntimeError):
    """Training diverged (a non-finite loss, gradient or parameter norm); the last good checkpoint is kept."""


class StorageUnavailableError(OSError):
    """Reading or writing a checkpoint failed with a transient storage error (an unavailable or overloaded
    service, a timeout) on every retry: nothing is wrong with the files, so running again later will work."""


# Exit statuses of the command-line tools (the README lists them). Schedulers restart a job that exits with
# EXIT_PREEMPTED (and may with EXIT_STORAGE_UNAVAILABLE); the others mean that rerunning the same command will
# fail the same way. 128 + N is the shell's convention for "stopped by signal N"; 75 is sysexits.h's EX_TEMPFAIL.
EXIT_OK = 0
EXIT_ERROR = 1  # an unexpected failure (a bug, or the system): the traceback is printed, then the `error:` line
EXIT_BAD_INPUT = 2  # a bad flag, config value, path, prompt or checkpoint: one `error:` line
EXIT_DIVERGED = 3  # training stopped on a non-finite loss; the last good checkpoint is kept
EXIT_OUT_OF_MEMORY = 4  # the step does not fit in the device's memory
EXIT_STORAGE_UNAVAILABLE = 75  # storage kept failing with transient errors after retries: rerun later
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT), after saving where there is something to save
EXIT_PREEMPTED = 143  # stopped by SIGTERM or a preemption notice (128 + SIGTERM) after saving: restart to resume

# bad input: what the user gave (a value, a path, a file, a checkpoint) is wrong, and the message says which
_BAD_INPUT = (ConfigError, CheckpointError, ValueError, FileNotFoundError, FileExistsError, NotADirectoryError,
              IsADirectoryError, PermissionError)


def exit_status(error: BaseException) -> int:
    """The exit status of a command line that failed with `error` (the table above)."""
    if isinstance(error, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(error, NonFiniteLossError):
        return EXIT_DIVERGED
    if isinstance(error, StorageUnavailableError):
        return EXIT_STORAGE_UNAVAILABLE
    if is_out_of_memory(error):
        return EXIT_OUT_OF_MEMORY
    if isinstance(error, _BAD_INPUT):
        return EXIT_BAD_INPUT
    return EXIT_ERROR


def is_out_of_memory(error: BaseException) -> bool:
    """MemoryError, or a failed allocation of XLA's (jax.errors.JaxRuntimeError): RESOURCE_EXHAUSTED on an
    accelerator, "INTERNAL: ... Out of memory allocating N bytes" on the CPU."""
    text = str(error)
    return (isinstance(error, MemoryError) or ("RESOURCE_EXHAUSTED" in text and "memory" in text.lower())
            or (isinstance(error, RuntimeError) and "out of memory" in text.lower()))


def one_line(error: BaseException, limit: int = 600) -> str:
    """The message of `error` on one line (whitespace collapsed), at most `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, (StorageUnavailableError,)) and error.filename:
        text = f"{error.strerror or text}: {error.filename}"  # "[Errno 2] No such file..." -> "No such file...: x"
    if is_out_of_memory(error) and not isinstance(error, MemoryError):
        # XLA's CPU client repeats its prefix once per nested dispatch
        text = re.sub(r"(Error dispatching computation: )+", "", text)
        text = ("out of memory: " + text + " (try a smaller batch_size, grad_accum_steps > 1 or "
                "model.activation_checkpointing=True)")
    return text if len(text) <= limit else text[: limit - 1] + "…"
