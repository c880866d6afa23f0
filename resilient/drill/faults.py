"""The fault classes a drill runs, as a small registry.

A `Fault` names the class, says whether this cluster can produce it (`Fault.unavailable`: None, or the
reason it is skipped) and strikes a running job (`Fault.inject`, given a `Live` view of the job).
A few flags tell the runner what else the class needs: user code that raises on one batch
(``raises``), a short batch timeout so that a hang is noticed within the drill (``hangs``), or the job
run by a driver process of its own that is killed and started again (``kills_driver``).

Adding a class is a function and one `register` call::

    def _raise_sigusr1(live: Live) -> Struck | None:
        hit = live.strike(signal.SIGUSR1)
        return None if hit is None else Struck(hit[1], f"SIGUSR1 {_described(hit[0])}")

    register(Fault("sigusr1", "actor sent SIGUSR1", _raise_sigusr1))

The preemption class drains a node of the cluster (reason PREEMPTION, as KubeRay, managed platforms and
``ray drain-node`` do): it runs only where it is allowed (``--drain-nodes``), on a cluster with a node
other than the driver's, because Ray then schedules nothing new on the drained node until it is restarted.

Every injector waits until `Live.trigger` batches are committed (or the job ends: None, the fault was
not injected) and returns when it struck (`Struck`, wall-clock seconds) with a short description.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from resilient.drill._inject import first_raise
from resilient.drill._procs import signal_actor, starting_workers
from resilient.testing import kill_pid

__all__ = ["FAULTS", "Cluster", "Fault", "Live", "Struck", "register"]


@dataclass(frozen=True)
class Cluster:
    """What the drill knows of the cluster: alive nodes, this machine's node id, and the raylets (parent
    processes) seen starting this drill's actors on this machine."""

    nodes: int
    here: str | None
    raylets: frozenset[int] = frozenset()
    may_drain: bool = False  # the user allowed the drill to drain a node (--drain-nodes)


@dataclass
class Struck:
    """A fault delivered at `at` (wall-clock seconds): what was done, and what to undo after the run."""

    at: float
    what: str
    cleanup: Callable[[], None] | None = None


@dataclass
class Live:
    """A running job as an injector sees it (every callable reads the job's present state)."""

    trigger: int
    committed: Callable[[], int]
    done: Callable[[], bool]
    actors: Callable[[], list[dict]]
    events: Callable[[], list[dict]]
    cluster: Cluster
    replicas: list[str]
    markers: str
    known_workers: set[int] = field(default_factory=set)
    kill_driver: Callable[[], bool] | None = None  # True when the driver was running and is killed
    ready: Callable[[dict], bool] = lambda actor: True  # may this actor be struck now (e.g. it has a checkpoint)
    late: int = 0  # committed batches from which any actor is struck, ready or not
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    poll: float = 0.01
    timeout: float = 300.0

    def wait(self, condition: Callable[[], Any]) -> Any:
        """Poll `condition` until it returns something true (returned) or the job ends (None)."""
        deadline = self.clock() + self.timeout
        while not self.done() and self.clock() < deadline:
            value = condition()
            if value:
                return value
            self.sleep(self.poll)
        return None

    def at_trigger(self) -> dict | None:
        """The first worker actor that is `ready` once `trigger` batches are committed, or the first one
        at all once `late` are; None if the job ends first."""
        def pick() -> dict | None:
            done = self.committed()
            if done < self.trigger:
                return None
            actors = self.actors()
            return next((a for a in actors if self.ready(a)), None) or (
                actors[0] if actors and done >= max(self.late, self.trigger) else None)

        return self.wait(pick)

    def strike(self, sig: int) -> tuple[dict, float] | None:
        """Send `sig` to the first worker actor at the trigger (another if it is gone meanwhile)."""
        while True:
            actor = self.at_trigger()
            if actor is None:
                return None
            at = self.clock()
            if signal_actor(actor, sig, here=self.cluster.here):
                return actor, at


@dataclass(frozen=True)
class Fault:
    """One fault class: `name` (used on the command line), `title` (in reports), its injector, and why
    this cluster cannot produce it (None when it can)."""

    name: str
    title: str
    inject: Callable[[Live], Struck | None]
    unavailable: Callable[[Cluster], str | None] = lambda cluster: None
    confirm: Callable[[list[dict]], str | None] | None = None  # a note when the events show it landed otherwise
    raises: str | None = None  # "once" | "always": user code raises on the trigger batch
    hangs: bool = False
    kills_driver: bool = False


FAULTS: dict[str, Fault] = {}


def register(fault: Fault) -> Fault:
    """Add (or replace) a fault class; the drill runs them in registration order."""
    FAULTS[fault.name] = fault
    return fault


def _described(actor: dict) -> str:
    return f"pid {actor['pid']} (slot {actor['slot']})"


def _kill_mid_call(live: Live) -> Struck | None:
    hit = live.strike(signal.SIGKILL)
    return None if hit is None else Struck(hit[1], f"SIGKILL {_described(hit[0])}")


def _kill_starting(live: Live) -> Struck | None:
    """SIGKILL the worker processes found starting first (the slots' actors start together, a standby
    a little later: all of those seen at once are killed, so that a slot's actor is among them)."""
    def fresh() -> set[int]:
        return starting_workers(set(live.cluster.raylets)) - live.known_workers

    while True:
        pids = live.wait(fresh)
        if not pids:
            return None
        at = live.clock()
        killed = sorted(p for p in pids if kill_pid(p))
        if killed:
            return Struck(at, f"SIGKILL pid {', '.join(map(str, killed))} while starting")
        live.known_workers.update(pids)


def _died_starting(events: list[dict]) -> str | None:
    if any(str(e.get("reason", "")).startswith("died while starting") for e in events):
        return None
    return "the killed actor had started already"


def _no_local_workers(cluster: Cluster) -> str | None:
    if not cluster.raylets:
        return "the worker processes are not on this machine: a start cannot be caught from here"
    return None


def _hang(live: Live) -> Struck | None:
    hit = live.strike(signal.SIGSTOP)
    if hit is None:
        return None
    actor, at = hit
    here = live.cluster.here
    return Struck(at, f"SIGSTOP {_described(actor)}, never resumed",
                  cleanup=lambda: _quietly(signal_actor, actor, signal.SIGKILL, here=here))


def _zombie(live: Live) -> Struck | None:
    before = sum(e["kind"] == "restart" for e in live.events())
    hit = live.strike(signal.SIGSTOP)
    if hit is None:
        return None
    actor, at = hit
    here = live.cluster.here
    replaced = live.wait(lambda: sum(e["kind"] == "restart" for e in live.events()) > before)
    alive = _quietly(signal_actor, actor, signal.SIGCONT, here=here)
    woke = "resumed after its replacement" if replaced else "resumed (the job ended before replacing it)"
    return Struck(at, f"SIGSTOP {_described(actor)}, {woke}" + ("" if alive else "; it was gone by then"),
                  cleanup=lambda: _quietly(signal_actor, actor, signal.SIGKILL, here=here))


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return fn(*args, **kwargs)
    except Exception:  # noqa: BLE001 - best effort: the process may be gone, the node too
        return None


def _raised(live: Live) -> Struck | None:
    at = live.wait(lambda: first_raise(live.markers))
    return None if at is None else Struck(at, "the pipeline raised on the trigger batch")


def _storage(damage: Callable[[str], str]) -> Callable[[Live], Struck | None]:
    def inject(live: Live) -> Struck | None:
        actor = live.at_trigger()
        if actor is None:
            return None
        at = live.clock()
        what = damage(live.replicas[0])
        # its replacement restores through the damaged store (another actor if this one is gone already)
        hit = (actor, at) if signal_actor(actor, signal.SIGKILL, here=live.cluster.here) else live.strike(signal.SIGKILL)
        return Struck(at, what + ("" if hit is None else f", then SIGKILL {_described(hit[0])}"))

    return inject


def _lose(replica: str) -> str:
    shutil.rmtree(replica, ignore_errors=True)
    return f"replica {os.path.basename(replica)} deleted"


def _corrupt(replica: str) -> str:
    """Flip one byte in the middle of every file of the replica."""
    n = 0
    for root, _, files in os.walk(replica):
        for name in files:
            path = os.path.join(root, name)
            try:
                with open(path, "r+b") as f:
                    size = f.seek(0, os.SEEK_END)
                    if size:
                        f.seek(size // 2)
                        byte = f.read(1)
                        f.seek(size // 2)
                        f.write(bytes([byte[0] ^ 0xFF]))
                        n += 1
            except OSError:
                pass
    return f"replica {os.path.basename(replica)}: one byte flipped in each of its {n} files"


def _kill_driver(live: Live) -> Struck | None:
    assert live.kill_driver is not None
    if live.wait(lambda: live.committed() >= live.trigger) is None:
        return None
    at = live.clock()
    if not live.kill_driver():
        return None  # it had finished the job already
    return Struck(at, "SIGKILL the driver, then the job re-run")


DRAIN_NOTICE_S = 60.0  # how far ahead the drill's preemption notice comes


def _no_drain(cluster: Cluster) -> str | None:
    if not cluster.may_drain:
        return ("drains a node, which Ray then keeps out of service until it is restarted: allow it with "
                "--drain-nodes on a cluster where that is fine")
    if cluster.nodes < 3:
        return f"needs a node for the actor to leave and another to move to, besides the driver's ({cluster.nodes} alive)"
    return None


def _drain(live: Live) -> Struck | None:
    """A preemption notice for the node of a worker actor that is not on the driver's node."""
    from resilient.testing import announce_preemption

    def away() -> dict | None:
        if live.committed() < live.trigger:
            return None
        return next((a for a in live.actors() if a.get("node_id") and a["node_id"] != live.cluster.here), None)

    actor = live.wait(away)
    if actor is None:
        return None
    at = live.clock()
    announce_preemption(actor["node_id"], DRAIN_NOTICE_S, message="resilient drill")
    return Struck(at, f"preemption notice ({DRAIN_NOTICE_S:g} s) for node {actor['node_id'][:12]} of "
                      f"{_described(actor)}")


register(Fault("kill", "actor SIGKILLed mid-call", _kill_mid_call))
register(Fault("kill-starting", "actor killed while starting", _kill_starting, unavailable=_no_local_workers,
                     confirm=_died_starting))
register(Fault("hang", "actor hangs", _hang, hangs=True))
register(Fault("exception", "exception raised once", _raised, raises="once"))
register(Fault("poison", "poison batch", _raised, raises="always"))
register(Fault("zombie", "zombie (SIGSTOP, replaced, SIGCONT)", _zombie, hangs=True))
register(Fault("replica-lost", "storage replica lost", _storage(_lose)))
register(Fault("replica-corrupt", "storage replica corrupted", _storage(_corrupt)))
register(Fault("driver", "driver killed, job re-run", _kill_driver, kills_driver=True))
register(Fault("preemption", "node preemption notice", _drain, unavailable=_no_drain))
