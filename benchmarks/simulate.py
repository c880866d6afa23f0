"""The scheduler at cluster scale, and a sweep of seeded fault schedules, under deterministic simulation.

Runs the real scheduler (`resilient.runtime.scheduler`) against the simulated cluster of
`resilient.testing.simulation`:

1. a large job: ``--actors`` simulated actors (default 1,000) and ``--batches`` batches (default
   1,000,000), stateless, with faults at a realistic rate through the whole job (actor deaths of every
   cause, hangs, zombies, transient exceptions, poison and crashing batches, failed commits and
   progress saves, a driver crash and re-run), then the same shape stateful;
2. a sweep of ``--seeds`` random scenarios (varied sizes, settings and faults).

``decisions_per_s`` counts batches taken from scheduled to committed (or dead-lettered) per second of
CPU spent inside the scheduler (`Scheduler.handle` and `Scheduler.tick`; the simulated cluster's own
time is not counted): the goal is >= 50,000 (<= 20 us per batch), so one driver can steer a large
cluster. ``peak_rss_mb`` is this process's peak resident memory.

The last line is JSON: ``seeds``, ``violations`` (must be 0), ``decisions_per_s`` (the lower of the
stateless and stateful large jobs), both figures, ``us_per_batch`` and ``peak_rss_mb``.

Usage::

    python benchmarks/simulate.py                      # 1,000 actors, 1M batches, 2,000 seeds
    python benchmarks/simulate.py --seeds 100000       # a long sweep
    python benchmarks/simulate.py --batches 100000 --seeds 0
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from resilient.testing.simulation import Scenario, simulate, sweep  # noqa: E402


def large(args: argparse.Namespace, stateful: bool) -> dict:
    n = args.batches
    scenario = Scenario(
        seed=args.seed, batches=n, slots=args.actors, stateful=stateful, standby=8, queue_depth=2,
        checkpoint_every=100, kill_rate=0.001, external_share=0.3, hang_rate=0.0002, zombie_rate=0.2,
        transient_rate=0.001, poison=(n // 3, 2 * n // 3), crashers=(n // 2,), commit_fail_rate=0.01,
        progress_fail_rate=0.01, driver_crashes=1, fault_window=1e9,
    )
    t0 = time.perf_counter()
    out = simulate(scenario)
    wall = time.perf_counter() - t0
    rate = out.batches_done / max(out.scheduler_seconds, 1e-9)
    kind = "stateful" if stateful else "stateless"
    print(f"{kind}: {n} batches on {args.actors} actors, {out.runs} driver runs, {out.restarts} restarts: "
          f"{out.batches_done} batches done in {out.scheduler_seconds:.2f} s of scheduler CPU "
          f"({rate:,.0f}/s, {1e6 / rate:.1f} us per batch), {wall:.1f} s in all; violations: {out.violations[:3]}",
          flush=True)
    return {"rate": rate, "violations": len(out.violations), "completed": out.completed, "restarts": out.restarts}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--actors", type=int, default=1000)
    p.add_argument("--batches", type=int, default=1_000_000)
    p.add_argument("--seeds", type=int, default=2000, help="random scenarios to sweep (0: none)")
    p.add_argument("--first-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=1, help="the large jobs' seed")
    args = p.parse_args()
    if args.actors < 1 or args.batches < 1 or args.seeds < 0:
        p.error(f"need --actors >= 1 and --batches >= 1 (the large jobs) and --seeds >= 0; got --actors "
                f"{args.actors}, --batches {args.batches}, --seeds {args.seeds}")
    results = {"stateless": large(args, False), "stateful": large(args, True)}
    t0 = time.perf_counter()

    def show(o):
        print(f"seed {o.scenario.seed}: {o.violations[:2]}\n    {o.scenario.repro}", flush=True)

    bad = sweep(range(args.first_seed, args.first_seed + args.seeds), on_violation=show)
    if args.seeds:
        print(f"sweep: {args.seeds} seeds in {time.perf_counter() - t0:.1f} s, {len(bad)} with violations", flush=True)
    rate = min(r["rate"] for r in results.values())
    print(json.dumps({
        "seeds": args.seeds,
        "violations": len(bad) + sum(r["violations"] for r in results.values()),
        "decisions_per_s": round(rate),
        "decisions_per_s_stateless": round(results["stateless"]["rate"]),
        "decisions_per_s_stateful": round(results["stateful"]["rate"]),
        "us_per_batch": round(1e6 / rate, 2),
        "actors": args.actors,
        "batches": args.batches,
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
