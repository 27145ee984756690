"""Worker processes of the multi-device and multi-process tests: 8 simulated CPU devices in a subprocess, or
several processes joined by jax.distributed on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time


def worker_env(num_devices: int) -> dict[str, str]:
    """This environment, with `num_devices` simulated CPU devices per process."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={num_devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(commands: list[list[str]], env: dict[str, str], timeout_s: float = 300) -> list[str]:
    """Run the commands as processes at once and return their outputs; fail with the output of the first that
    fails. A failed process stops the others at once: a process left alone in a collective waits for ever."""
    outputs = [tempfile.TemporaryFile(mode="w+") for _ in commands]  # files, not pipes: a full pipe blocks
    procs = [subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
             for command, out in zip(commands, outputs, strict=True)]
    deadline, timed_out = time.monotonic() + timeout_s, False
    try:
        while any(p.poll() is None for p in procs):
            timed_out = time.monotonic() > deadline
            if timed_out or any(p.returncode not in (None, 0) for p in procs):
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    logs = []
    for out in outputs:
        out.seek(0)
        logs.append(out.read())
        out.close()
    for i, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert not timed_out, f"the processes ran past {timeout_s} s; process {i}'s output:\n{log[-5000:]}"
        assert p.returncode == 0, f"process {i} of {len(procs)} exited with {p.returncode}:\n{log[-5000:]}"
    return logs
