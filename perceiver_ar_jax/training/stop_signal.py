"""Stopping a single-process run cleanly: SIGTERM (a preemption notice on most clusters) or Ctrl-C (SIGINT) set a
flag that the training loop checks after every step; it then saves a checkpoint and returns, and the command line
exits with 128 + the signal's number (143 for SIGTERM, which schedulers restart; 130 for Ctrl-C).

A second Ctrl-C stops at once (Python's KeyboardInterrupt), for when the save itself is not wanted. Multi-host
jobs use orbax's preemption sync point instead (all hosts must agree on the step at which they stop), see
`TrainingCheckpoints.reached_preemption`.
"""

from __future__ import annotations

import signal

from absl import logging


class StopSignal:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.received: int | None = None  # the number of the first signal received
        self._previous = {}
        for sig in signals:
            if signal.getsignal(sig) is signal.SIG_IGN:
                continue  # e.g. SIGINT of a background job: whoever started us wants it ignored
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: signals cannot be caught here
                pass

    def _handle(self, signum, frame):
        if self.received is None:
            self.received = signum
            again = " (Ctrl-C again to stop without saving)" if signum == signal.SIGINT else ""
            logging.warning("received %s: saving a checkpoint and stopping after this step%s",
                            signal.Signals(signum).name, again)
        if signum == signal.SIGINT:  # the next Ctrl-C raises KeyboardInterrupt where the program is
            signal.signal(signal.SIGINT, self._previous.get(signal.SIGINT, signal.default_int_handler))

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
