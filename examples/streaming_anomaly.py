"""Stateful streaming anomaly detection whose flags and running statistics survive a worker crash.

    python examples/streaming_anomaly.py [--sensors 16] [--steps 20000] [--window 100] [--out DIR] [--short]

Synthetic sensor readings (a per-sensor level, a slow daily cycle, noise, and injected spikes and
dips, all seeded) arrive in windows. Each sensor keeps running statistics: an EWMA tracks its level,
and Welford's algorithm tracks the mean and variance of the residual (reading minus the EWMA before
it). A reading whose residual is more than ``--threshold`` standard deviations off is flagged and left
out of the statistics. Every output row (sensor, t, value, z, anomaly) goes to a jsonl
`resilient.io.FileSink` under ``DIR/readings``.

The pipeline is stateful (``state_dict`` / ``load_state_dict``): the runtime routes batch ``b`` to slot
``b % 2`` in id order, so the sensors are split into two groups and batch ``b`` is window ``b // 2``
of group ``b % 2``: each slot owns its sensors' statistics. Slot checkpoints go to ``DIR/ckpt-a`` and
``DIR/ckpt-b``. Once a slot has a checkpoint and 40% of the batches are committed, one worker actor
process is SIGKILLed by PID; its replacement restores the slot's last checkpoint and replays the
slot's later batches. The script then checks, against a failure-free in-process run of the same class
over the same batches in the same slot routing, that every reading has exactly one output row, that
the flags and z-scores are identical, and that the final per-sensor statistics (from the slots' final
checkpoints) are identical. Exit status: 0 if all hold, 1 if not, 2 if the job ended before the crash.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

import resilient
from resilient.testing import kill_worker
from resilient.errors import ConfigError

__all__ = ["SLOTS", "SensorMonitor", "main", "make_batches"]

SLOTS = 2
SEED = 7


class SensorMonitor:
    """Per-sensor EWMA level + Welford mean/variance of the residual; flags readings with |z| > threshold.

    Args:
        n_sensors: sensor ids are ``0..n_sensors-1`` (statistics are kept for every id; a slot only
            touches its own group's).
        threshold: |z| above which a reading is an anomaly.
        warmup: readings of a sensor before any is judged (z is 0 until then).
        alpha: EWMA smoothing factor.
    """

    def __init__(self, n_sensors: int, threshold: float = 5.0, warmup: int = 30, alpha: float = 0.05) -> None:
        self.threshold, self.warmup, self.alpha = threshold, warmup, alpha
        self.n = np.zeros(n_sensors, dtype=np.int64)        # residuals folded into the statistics
        self.mean = np.zeros(n_sensors)                     # Welford: mean of the residual
        self.m2 = np.zeros(n_sensors)                       # Welford: sum of squared deviations
        self.level = np.zeros(n_sensors)                    # EWMA of the readings
        self.seen = np.zeros(n_sensors, dtype=np.int64)     # readings seen (the first sets the level)
        self.flagged = np.zeros(n_sensors, dtype=np.int64)  # anomalies flagged so far

    def __call__(self, batch: Mapping[str, Any]) -> dict[str, list]:
        sensors = np.asarray(batch["sensor"])
        values = np.asarray(batch["values"])  # (window, len(sensors))
        t0 = int(batch["t0"])
        zs = np.zeros_like(values)
        for row, x in enumerate(values):
            first = self.seen[sensors] == 0
            level = np.where(first, x, self.level[sensors])
            resid = x - level
            n = self.n[sensors]
            std = np.sqrt(self.m2[sensors] / np.maximum(n - 1, 1))
            judged = (n >= self.warmup) & (std > 0)
            z = np.where(judged, (resid - self.mean[sensors]) / np.where(std > 0, std, 1.0), 0.0)
            bad = np.abs(z) > self.threshold
            keep = ~bad
            # Welford update with the residual, for readings that are not anomalies
            n1 = n + keep
            delta = resid - self.mean[sensors]
            mean1 = self.mean[sensors] + np.where(keep, delta / np.maximum(n1, 1), 0.0)
            self.m2[sensors] += np.where(keep, delta * (resid - mean1), 0.0)
            self.mean[sensors], self.n[sensors] = mean1, n1
            self.level[sensors] = np.where(keep, level + self.alpha * (x - level), level)
            self.seen[sensors] += 1
            self.flagged[sensors] += bad
            zs[row] = z
        t = np.repeat(np.arange(t0, t0 + len(values)), len(sensors))
        return {
            "sensor": np.tile(sensors, len(values)).tolist(),
            "t": t.tolist(),
            "value": values.reshape(-1).tolist(),
            "z": zs.reshape(-1).tolist(),
            "anomaly": (np.abs(zs.reshape(-1)) > self.threshold).tolist(),
        }

    def state_dict(self) -> dict[str, np.ndarray]:
        return {k: getattr(self, k).copy() for k in ("n", "mean", "m2", "level", "seen", "flagged")}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k in ("n", "mean", "m2", "level", "seen", "flagged"):
            setattr(self, k, np.array(state[k], copy=True))


#: The resilient job: stateful, one slot per sensor group, a checkpoint every 10 batches of a slot.
monitor = resilient.pipeline(SensorMonitor, num_actors=SLOTS, actor_cpus=0.25, standby=0, checkpoint_every=10)


def make_batches(n_sensors: int, steps: int, window: int, rate: float = 0.004) -> tuple[list[dict], set]:
    """The readings as batches (batch ``b``: window ``b // SLOTS`` of sensor group ``b % SLOTS``) and the
    set of injected anomalies ``(sensor, t)``."""
    rng = np.random.default_rng(SEED)
    t = np.arange(steps)[:, None]
    base = rng.uniform(10, 50, n_sensors)
    noise = rng.uniform(0.5, 2.0, n_sensors)
    period = rng.uniform(500, 2000, n_sensors)
    values = base + 5 * noise * np.sin(2 * np.pi * t / period) + noise * rng.standard_normal((steps, n_sensors))
    hits = rng.random((steps, n_sensors)) < rate
    hits[:100] = False  # leave each sensor's warm-up alone
    values[hits] += rng.choice([-1.0, 1.0], hits.sum()) * rng.uniform(4, 12, hits.sum()) * np.broadcast_to(
        noise, values.shape)[hits]
    groups = [np.arange(g, n_sensors, SLOTS) for g in range(SLOTS)]
    batches = [
        {"sensor": groups[g], "t0": w, "values": values[w:w + window, groups[g]].copy()}
        for w in range(0, steps, window)
        for g in range(SLOTS)
    ]
    injected = {(int(s), int(ti)) for ti, s in zip(*np.nonzero(hits))}
    return batches, injected


def reference(batches: Sequence[dict], n_sensors: int) -> tuple[dict[int, dict], list[dict]]:
    """A failure-free run in this process: one instance per slot, batch ``b`` to slot ``b % SLOTS``, in
    id order. Returns the outputs by batch id and each slot's final state."""
    slots = [SensorMonitor(n_sensors) for _ in range(SLOTS)]
    outputs = {b: slots[b % SLOTS](batch) for b, batch in enumerate(batches)}
    return outputs, [s.state_dict() for s in slots]


def kill_after_checkpoint(handle: resilient.JobHandle, store: resilient.CheckpointStore, after: int,
                          say: Any) -> int | None:
    """Once `after` batches are committed and the first actor's slot has a checkpoint, SIGKILL that actor
    by PID; return its slot (None if the job ended first)."""
    victim = kill_worker(handle, after=after,
                         ready=lambda a: store.latest(f"{handle.job_id}/slot-{a['slot']}") is not None)
    if victim is None:
        return None
    say(f"killed worker pid {victim['pid']} (slot {victim['slot']}) after "
        f"{handle.progress()['committed']} committed batches")
    return int(victim["slot"])


def main(argv: Sequence[str] | None = None, *, environ: Mapping[str, str] | None = None) -> int:
    """Run the example; return 0 when every guarantee held (see the module docstring).

    Args:
        argv: command-line arguments (``sys.argv[1:]`` when None).
        environ: where ``RESILIENT_*`` settings are read (``os.environ`` when None).
    """
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--sensors", type=int, default=16, help="sensors (an even number: two groups)")
    ap.add_argument("--steps", type=int, default=20_000, help="time steps per sensor")
    ap.add_argument("--window", type=int, default=100, help="time steps per batch")
    ap.add_argument("--threshold", type=float, default=5.0, help="|z| above which a reading is flagged")
    ap.add_argument("--out", default=None, help="a new or empty directory for outputs and checkpoints")
    ap.add_argument("--short", action="store_true", help="a small, fast run (8 sensors, 6,000 steps)")
    args = ap.parse_args(argv)
    if args.short:
        args.sensors, args.steps, args.window = 8, 6000, 50
    if args.sensors < SLOTS or args.sensors % SLOTS:
        raise ConfigError("--sensors", args.sensors, f"a positive multiple of {SLOTS}")
    out = os.path.abspath(args.out or tempfile.mkdtemp(prefix="resilient-stream-"))
    if os.path.isdir(out) and os.listdir(out):
        raise ConfigError("--out", out, "a new or empty directory (this one holds an earlier run)")
    say = print

    batches, injected = make_batches(args.sensors, args.steps, args.window)
    storage = [os.path.join(out, "ckpt-a"), os.path.join(out, "ckpt-b")]
    settings = resilient.Settings.from_env(environ, storage=storage)
    sink = resilient.io.FileSink(os.path.join(out, "readings"), format="jsonl")
    say(f"{args.sensors} sensors x {args.steps} steps in {len(batches)} batches of {args.window} steps; "
        f"{len(injected)} injected anomalies")

    import ray

    owns_ray = not ray.is_initialized()
    try:
        with resilient.CheckpointStore(settings) as store:
            handle = monitor.run(batches, sink, job_id="sensor-anomalies", settings=settings,
                                 init_kwargs={"n_sensors": args.sensors, "threshold": args.threshold})
            victim = kill_after_checkpoint(handle, store, int(len(batches) * 0.4), say)
            result = handle.wait()
            final = [store.load(f"sensor-anomalies/slot-{s}").state["user"] for s in range(SLOTS)]
        restored = [e.cursor for e in handle.events() if e.kind == "started" and e.slot == victim]
    finally:
        if owns_ray:
            ray.shutdown()

    want, want_state = reference(batches, args.sensors)
    rows: collections.Counter = collections.Counter()
    same_outputs = True
    flagged = set()
    for b, cols in sink.read_all():
        rows.update(zip(cols["sensor"], cols["t"]))
        same_outputs &= cols == want[b]
        flagged.update((s, t) for s, t, a in zip(cols["sensor"], cols["t"], cols["anomaly"]) if a)
    every_reading = {(s, t) for s in range(args.sensors) for t in range(args.steps)}
    exactly_once = set(rows) == every_reading and set(rows.values()) == {1}
    same_state = all(
        set(got) == set(exp) and all(np.array_equal(got[k], exp[k]) for k in exp)
        for got, exp in zip(final, want_state)
    )
    say(f"batches {result.committed}/{result.total}, restarts {result.restarts}, dead letters "
        f"{len(result.dead_letters)}; slot {victim}'s replacement restored its checkpoint at cursor "
        f"{restored[-1] if len(restored) > 1 else 'none'} (the slot's batches below it came from the "
        "checkpoint, later ones were replayed)")
    say(f"every reading exactly once: {exactly_once}; flags and z-scores identical to a failure-free run: "
        f"{same_outputs}; final per-sensor statistics identical: {same_state}")
    caught = len(flagged & injected)
    say(f"flagged {len(flagged)} readings: {caught} of {len(injected)} injected anomalies, "
        f"{len(flagged) - caught} others")
    say(f"outputs: {sink.url}")
    if victim is None:
        say("the job finished before a worker could be killed: run more --steps")
        return 2
    return 0 if exactly_once and same_outputs and same_state and result.restarts >= 1 else 1


if __name__ == "__main__":
    sys.exit(main())
