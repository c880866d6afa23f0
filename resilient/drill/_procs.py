"""Signals to worker actor processes, on this machine or on another node of the cluster.

An actor on this machine is signalled by PID (`resilient.testing.kill_pid`); one on another node by a
tiny Ray task pinned to that node, which signals it there. Actors that are still being built are found
in ``/proc``: processes titled ``ray::Worker`` whose parent is a raylet this drill has seen start its
own actors (so the actors of another Ray instance on the same machine are never touched).
"""

from __future__ import annotations

import os
import signal
from typing import Any

from resilient.testing import kill_pid

__all__ = ["local_node", "parent_pid", "signal_actor", "starting_workers"]

_TITLE = b"ray::Worker"


def local_node() -> str | None:
    """This process's Ray node id (hex), or None outside Ray."""
    import ray

    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:  # noqa: BLE001 - not connected
        return None


def parent_pid(pid: int) -> int | None:
    """The parent of process `pid` on this machine, or None when it is gone (or there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def starting_workers(parents: set[int]) -> set[int]:
    """PIDs of worker actor processes (titled ``ray::Worker``) on this machine whose parent is one of
    `parents` (raylets)."""
    found = set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return found
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if not f.read().startswith(_TITLE):
                    continue
        except OSError:
            continue
        if parent_pid(int(name)) in parents:
            found.add(int(name))
    return found


def _signal_here(pid: int, sig: int) -> bool:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def signal_actor(actor: dict[str, Any], sig: int, *, here: str | None) -> bool:
    """Send `sig` to the actor ``{"pid", "node_id", ...}``; a SIGKILL on this machine waits until the
    process is gone. Returns False when there was no such process."""
    node = actor.get("node_id")
    if node is None or node == here:
        if sig == signal.SIGKILL:
            return kill_pid(int(actor["pid"]))
        return _signal_here(int(actor["pid"]), sig)
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    remote = ray.remote(num_cpus=0, max_retries=0)(_signal_here)
    pinned = remote.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    return bool(ray.get(pinned.remote(int(actor["pid"]), sig), timeout=60))
