"""What a command line shows a person, and what its log file keeps.

    configure_logging(verbosity=None)        # once, at the start of train.py, sample.py, the demo, convert
    status = run_command(main, show_traceback=False)

The console gets this library's INFO lines (resumed from which checkpoint, a checkpoint set aside, ...) and every
library's warnings and errors, in plain words. The INFO chatter of orbax, absl and JAX (about 70 lines per
checkpoint save) and the leftovers of an aborted orbax read (asyncio's "exception was never retrieved" and the
"Event loop is closed" tracebacks of late TensorStore callbacks) stay off it. `verbosity` (`--verbosity` on the
command lines: -1 warnings, 0 info, 1 debug) shows every library's records at that level instead. A `LogFile`
keeps every record at INFO and above, the hidden ones included.

A failure ends in one `error: ...` line and the exit status of `errors.exit_status`; only an unexpected error
(a bug) prints its traceback first.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from perceiver_ar_jax.errors import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, exit_status, one_line

# records from files of the package, or from the scripts beside it (train.py, ...), are "ours"; only the scripts of
# the repository root, not its subdirectories: a virtual environment made there (.venv) holds the libraries
_PACKAGE_DIR = str(Path(__file__).resolve().parents[1])
_SCRIPTS_DIR = str(Path(__file__).resolve().parents[2])
_FILE_FORMAT = "%(asctime)s %(levelname).1s %(name)s %(filename)s:%(lineno)d] %(message)s"
# `logger.info(..., extra=FILE_ONLY)`: a record for the log file that the console leaves out
FILE_ONLY = {"console": False}
_CONSOLE = "perceiver_ar_jax.console"  # the name of our console handler


class ConsoleFilter(logging.Filter):
    """Our INFO lines and everyone's warnings (verbosity None), or every record at `verbosity`'s level."""

    def __init__(self, verbosity: int | None):
        super().__init__()
        self.verbosity = verbosity

    def filter(self, record: logging.LogRecord) -> bool:
        if self.verbosity is not None:
            return record.levelno >= absl_to_python_level(self.verbosity)
        if record.name == "asyncio" or getattr(record, "console", True) is False:
            return False  # e.g. leftovers of an aborted orbax read: the error that matters is reported once, by us
        if record.levelno >= logging.WARNING:
            return True
        return record.levelno >= logging.INFO and _is_ours(os.path.abspath(record.pathname))


def _is_ours(path: str) -> bool:
    return path.startswith(_PACKAGE_DIR + os.sep) or os.path.dirname(path) == _SCRIPTS_DIR


class ConsoleFormatter(logging.Formatter):
    """`message` for INFO, `warning: message` / `error: message` above; tracebacks of logged exceptions dropped
    (the log file has them)."""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {message}"
        if record.levelno >= logging.WARNING:
            return f"warning: {message}"
        return message


def absl_to_python_level(verbosity: int) -> int:
    """absl's --verbosity (-1 warning, 0 info, 1 debug, 2+ more) as a Python logging level."""
    return {-3: logging.CRITICAL, -2: logging.ERROR, -1: logging.WARNING, 0: logging.INFO}.get(
        verbosity, logging.DEBUG - max(verbosity - 1, 0))


def configure_logging(verbosity: int | None = None) -> None:
    """Replace the console handlers of the root logger (absl's, or a basicConfig one) with ours; see the module
    docstring. Records of INFO and above are made (so that a LogFile can keep them) whatever the console shows."""
    # TensorFlow (only tf.data under TFDS and the TensorBoard writer here) prints C++ start-up lines; its oneDNN
    # kernels compute nothing of ours, and the line announcing them ignores TF_CPP_MIN_LOG_LEVEL
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    root = logging.getLogger()
    for handler in list(root.handlers):  # those that print to the console (not files, not pytest's capture)
        to_stderr = isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stderr, sys.__stderr__)
        if to_stderr or type(handler).__name__ == "ABSLHandler" or handler.get_name() == _CONSOLE:
            root.removeHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.addFilter(ConsoleFilter(verbosity))
    if verbosity is None:
        console.setFormatter(ConsoleFormatter())
    else:
        console.setFormatter(logging.Formatter(_FILE_FORMAT))
    console.set_name(_CONSOLE)
    root.addHandler(console)
    root.setLevel(min(logging.INFO, absl_to_python_level(verbosity if verbosity is not None else 0)))
    logging.getLogger("absl").setLevel(logging.NOTSET)  # absl's logger follows the root's level
    if not getattr(sys.unraisablehook, "keeps_late_callbacks_off_the_console", False):
        sys.unraisablehook = _late_callbacks_to_the_log(sys.unraisablehook)


def _late_callbacks_to_the_log(previous):
    """TensorStore reads that were in flight when an orbax restore failed complete after orbax closed its event
    loop; their callbacks' "Event loop is closed" errors go to the log (file), not as tracebacks to the console.
    Every other unraisable error goes to the hook that was there before."""

    def hook(unraisable) -> None:
        error = unraisable.exc_value
        if isinstance(error, RuntimeError) and "Event loop is closed" in str(error):
            logging.getLogger("perceiver_ar_jax").info("a late callback of an aborted checkpoint read failed "
                                                       "(harmless): %s", error, extra=FILE_ONLY)
            return
        previous(unraisable)

    hook.keeps_late_callbacks_off_the_console = True
    return hook


class LogFile:
    """Every log record of INFO and above, held in memory until `start(path)` (the run has really started, so
    that a run that fails at once leaves no file behind), then written to `path` as they come."""

    MAX_BUFFERED = 20_000  # records before start(); the oldest are dropped beyond it

    def __init__(self):
        self.buffer: list[logging.LogRecord] = []
        self.handler: logging.Handler | None = None
        self._collector = _Collector(self)
        self._collector.setLevel(logging.INFO)
        logging.getLogger().addHandler(self._collector)

    def start(self, path: str | os.PathLike) -> None:
        """Write the buffered records to `path` (appending: a resumed run continues the file) and go on there."""
        if self.handler is not None:
            return
        # in a multi-process run only process 0 writes the workdir's files: another process may get here first
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="a", encoding="utf-8")
        handler.setLevel(logging.INFO)
        handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        for record in self.buffer:
            handler.handle(record)
        self.buffer = []
        self.handler = handler

    def close(self) -> None:
        logging.getLogger().removeHandler(self._collector)
        if self.handler is not None:
            self.handler.close()
            self.handler = None
        self.buffer = []


class _Collector(logging.Handler):
    def __init__(self, log_file: LogFile):
        super().__init__()
        self.log_file = log_file

    def emit(self, record: logging.LogRecord) -> None:
        if self.log_file.handler is not None:
            self.log_file.handler.handle(record)
            return
        self.log_file.buffer.append(record)
        if len(self.log_file.buffer) > LogFile.MAX_BUFFERED:
            del self.log_file.buffer[0]


def run_command(main: Callable[[], int | None], *, show_traceback: bool = False) -> int:
    """Run a command line's work; return its exit status. A failure prints one `error: ...` line (after the
    traceback when it is unexpected, or when show_traceback is set) and gets the status of `exit_status`."""
    try:
        status = main()
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - every failure ends here, as one line and a status
        status = exit_status(error)
        if show_traceback or status == EXIT_ERROR:
            traceback.print_exception(error)
        print(f"error: {one_line(error)}", file=sys.stderr, flush=True)
        return status
    return EXIT_OK if status is None else status
