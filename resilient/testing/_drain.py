"""Announce a node's preemption to Ray, the way KubeRay, managed platforms and ``ray drain-node`` do."""

from __future__ import annotations

import time

__all__ = ["announce_preemption"]


def announce_preemption(node_id: str, seconds: float, *, message: str = "spot instance reclaimed",
                        address: str | None = None) -> None:
    """Mark node `node_id` draining with reason PREEMPTION and a deadline `seconds` away.

    Ray then schedules nothing new on the node; the node keeps running until it is stopped (the caller's
    part, as for ``ray drain-node``). `address` is the GCS address (default: the connected cluster's).
    Uses Ray's private GCS client: raises ``RuntimeError`` if the drain is refused.
    """
    import ray
    from ray.core.generated import autoscaler_pb2

    gcs = ray._raylet.GcsClient(address=address or ray.get_runtime_context().gcs_address)
    ok, why = gcs.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
                             message, int((time.time() + seconds) * 1000))
    if not ok:
        raise RuntimeError(f"Ray refused to drain node {node_id}: {why}")
