"""The same CPU cores for both sides of a comparison: ours pinned with os.sched_setaffinity (before JAX starts
its thread pools, which XLA:CPU sizes by the cores a process may use), the reference started on the same cores
(its child processes inherit them) with one torch thread per core.

    cores = pin_cores(args.cores)                       # "0,1", "0-3" or None = the cores we may use now
    subprocess.run(reference_command, **on_cores(cores))  # + ["--threads", str(len(cores))]
"""

from __future__ import annotations

import os


def parse_cores(text: str) -> list[int]:
    """"0,2-3" -> [0, 2, 3]."""
    cores: set[int] = set()
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    allowed = os.sched_getaffinity(0)
    if not cores or not cores <= allowed:
        raise SystemExit(f"--cores {text!r}: must name cores this process may run on, {sorted(allowed)}")
    return sorted(cores)


def pin_cores(text: str | None) -> list[int]:
    """Pin this process (and what it starts) to the cores of `text` (default: all it may use now); return them."""
    cores = parse_cores(text) if text else sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cores)
    return cores


def on_cores(cores: list[int]) -> dict:
    """subprocess keyword arguments that start a child on exactly these cores."""
    return {"preexec_fn": lambda: os.sched_setaffinity(0, cores)}
