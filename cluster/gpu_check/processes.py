"""Processes found by a mark in their environment (inherited by every child, Ray's included), and
stopped by process id: what a part or a server started, and nothing else on the machine. Linux
/proc; elsewhere nothing is found."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def marked(key: str, value: str) -> list[int]:
    """Ids of the processes whose environment holds key=value (this one excluded)."""
    needle = f"{key}={value}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            env = (proc / "environ").read_bytes()
        except OSError:  # gone meanwhile, or not ours
            continue
        if needle in env.split(b"\0") and int(proc.name) != os.getpid():
            found.append(int(proc.name))
    return found


def stop_marked(key: str, value: str, grace_s: float = 5.0) -> int:
    """SIGTERM to every marked process, SIGKILL to those left after grace_s; returns how many there were."""
    pids = marked(key, value)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while set(pids) & set(marked(key, value)) and time.time() < deadline:
            time.sleep(0.1)
        if not set(pids) & set(marked(key, value)):
            break
    return len(pids)
