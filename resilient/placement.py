"""Where Ray puts the worker actors: the Ray actor options a job passes through, checked before any actor
starts.

``RESILIENT_RAY_REMOTE_ARGS`` (or ``@resilient.pipeline(ray_remote_args={...})``) holds options of
``ActorClass.options()``, given to every worker actor and standby of the job:

* ``memory`` (bytes reserved, so the memory monitor does not pick the actor), ``resources`` (custom
  resources, e.g. ``{"special": 1}``), ``accelerator_type``, ``label_selector``, ``runtime_env``;
* ``scheduling_strategy``: ``"DEFAULT"`` or ``"SPREAD"``, or (in code) a strategy object of
  ``ray.util.scheduling_strategies``;
* ``placement_group_bundles`` (with ``placement_group_strategy``, ``STRICT_PACK`` by default): a
  placement group is created for each actor, which runs in bundle 0 and whose tasks and actors (an
  inference engine's GPU workers) are placed in the group's other bundles; the group is removed with
  the actor. Bundle 0 must hold the actor's own CPUs and GPUs.

Refused, because resilient owns them: ``num_cpus``/``num_gpus`` (``RESILIENT_ACTOR_CPUS`` and
``RESILIENT_ACTOR_GPUS`` say them), ``max_restarts``, ``max_task_retries`` (resilient replaces actors and
retries batches itself: Ray's own restarts would run a batch twice behind its back),
``max_concurrency``, ``concurrency_groups`` (a worker runs its calls in order), ``lifetime``, ``name``,
``namespace``, ``get_if_exists`` (a worker lives and dies with its job's driver), ``max_pending_calls``.

Pure functions; Ray is imported only to recognise strategy objects and to build a placement group.

Example:
    >>> check_remote_args({"memory": 2 << 30, "resources": {"special": 1}})
    {'memory': 2147483648, 'resources': {'special': 1}}
    >>> check_remote_args({"max_restarts": 3})
    Traceback (most recent call last):
    ...
    ValueError: max_restarts is resilient's own: resilient replaces failed actors and retries batches itself (Ray's restarts would run a batch twice)
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

from resilient.config import _thaw  # plain dicts and lists from the settings' frozen values

__all__ = ["ACCEPTED", "OWNED", "actor_options", "check_remote_args", "placement_bundles"]

ACCEPTED = ("accelerator_type", "label_selector", "memory", "placement_group_bundles",
            "placement_group_strategy", "resources", "runtime_env", "scheduling_strategy")

_RESTARTS = "resilient replaces failed actors and retries batches itself (Ray's restarts would run a batch twice)"
_LIFE = "a worker actor lives and dies with its job's driver"
OWNED = {
    "num_cpus": "say it with RESILIENT_ACTOR_CPUS (actor_cpus=...)",
    "num_gpus": "say it with RESILIENT_ACTOR_GPUS (actor_gpus=...)",
    "max_restarts": _RESTARTS,
    "max_task_retries": _RESTARTS,
    "max_concurrency": "a worker runs its calls one at a time, in order",
    "concurrency_groups": "a worker runs its calls one at a time, in order",
    "max_pending_calls": "resilient bounds the calls queued on a worker (RESILIENT_QUEUE_DEPTH)",
    "lifetime": _LIFE,
    "name": _LIFE,
    "namespace": _LIFE,
    "get_if_exists": _LIFE,
}
_PG_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")


def _number(name: str, value: Any, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be a number {'> 0' if positive else '>= 0'}, not {value!r}")
    return value


def _amounts(name: str, value: Any) -> dict[str, float]:
    if not isinstance(value, Mapping) or not value or not all(isinstance(k, str) and k for k in value):
        raise ValueError(f"{name} must be a non-empty mapping of resource names to amounts, not {value!r}")
    return {k: _number(f"{name}[{k!r}]", v) for k, v in value.items()}


def _strategy(value: Any) -> Any:
    if isinstance(value, str):
        if value.upper() not in ("DEFAULT", "SPREAD"):
            raise ValueError(f'scheduling_strategy must be "DEFAULT", "SPREAD" or a strategy object of '
                             f"ray.util.scheduling_strategies, not {value!r}")
        return value.upper()
    from ray.util import scheduling_strategies as ss

    kinds = tuple(getattr(ss, n) for n in ("NodeAffinitySchedulingStrategy", "PlacementGroupSchedulingStrategy",
                                           "NodeLabelSchedulingStrategy") if hasattr(ss, n))
    if not isinstance(value, kinds):
        raise ValueError(f'scheduling_strategy must be "DEFAULT", "SPREAD" or one of '
                         f"{', '.join(k.__name__ for k in kinds)}, not {value!r}")
    return value


def check_remote_args(options: Mapping[str, Any]) -> dict[str, Any]:
    """Check Ray actor options for the job's workers; return them normalized. Raises ValueError naming
    the option, the value and what is accepted."""
    if not isinstance(options, Mapping):
        raise ValueError(f"Ray actor options must be a mapping of option names to values, not {options!r}")
    out: dict[str, Any] = {}
    for name, value in options.items():
        if name in OWNED:
            raise ValueError(f"{name} is resilient's own: {OWNED[name]}")
        if name not in ACCEPTED:
            raise ValueError(f"{name!r} is not a Ray actor option resilient passes on; accepted: {', '.join(ACCEPTED)}")
        if name == "memory":
            out[name] = _number(name, value, positive=True)
        elif name == "resources":
            amounts = _amounts(name, value)
            builtin = sorted(set(amounts) & {"CPU", "GPU", "memory"})
            if builtin:
                raise ValueError(f"resources may not name {builtin}: use RESILIENT_ACTOR_CPUS, RESILIENT_ACTOR_GPUS "
                                 "or the memory option")
            out[name] = amounts
        elif name == "accelerator_type":
            if not isinstance(value, str) or not value:
                raise ValueError(f"accelerator_type must be a non-empty string (e.g. \"H100\"), not {value!r}")
            out[name] = value
        elif name == "label_selector":
            if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str)
                                                         for k, v in value.items()):
                raise ValueError(f"label_selector must map label names to strings, not {value!r}")
            out[name] = dict(value)
        elif name == "runtime_env":
            if not isinstance(value, Mapping):
                raise ValueError(f"runtime_env must be a mapping (Ray's runtime environment), not {value!r}")
            out[name] = value
        elif name == "scheduling_strategy":
            out[name] = _strategy(value)
        elif name == "placement_group_bundles":
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)) or not value:
                raise ValueError(f"placement_group_bundles must be a non-empty list of bundles, not {value!r}")
            out[name] = [_amounts(f"placement_group_bundles[{i}]", b) for i, b in enumerate(value)]
        elif name == "placement_group_strategy":
            if not isinstance(value, str) or value.upper() not in _PG_STRATEGIES:
                raise ValueError(f"placement_group_strategy must be one of {', '.join(_PG_STRATEGIES)}, not {value!r}")
            out[name] = value.upper()
    if "placement_group_strategy" in out and "placement_group_bundles" not in out:
        raise ValueError("placement_group_strategy needs placement_group_bundles")
    if "placement_group_bundles" in out and "scheduling_strategy" in out:
        raise ValueError("placement_group_bundles and scheduling_strategy exclude each other: the placement "
                         "group is the actor's scheduling strategy")
    return out


def placement_bundles(remote_args: Mapping[str, Any], cpus: float, gpus: float) -> tuple[list[dict], str] | None:
    """The placement group each actor gets (bundles, strategy), or None. Bundle 0 must hold the actor.

    >>> placement_bundles({"placement_group_bundles": [{"CPU": 1, "GPU": 1}, {"GPU": 1}]}, 1, 1)
    ([{'CPU': 1, 'GPU': 1}, {'GPU': 1}], 'STRICT_PACK')
    >>> placement_bundles({"placement_group_bundles": [{"GPU": 1}]}, 0.25, 1)
    Traceback (most recent call last):
    ...
    ValueError: placement_group_bundles[0] must hold the actor itself: CPU 0.25 (has 0), GPU 1 (has 1)
    """
    bundles = remote_args.get("placement_group_bundles")
    if not bundles:
        return None
    first = bundles[0]
    if first.get("CPU", 0) < cpus or first.get("GPU", 0) < gpus:
        raise ValueError(f"placement_group_bundles[0] must hold the actor itself: CPU {cpus:g} (has "
                         f"{first.get('CPU', 0):g}), GPU {gpus:g} (has {first.get('GPU', 0):g})")
    return [_thaw(b) for b in bundles], remote_args.get("placement_group_strategy", "STRICT_PACK")


def actor_options(remote_args: Mapping[str, Any], cpus: float, gpus: float, placement_group: Any = None) -> dict:
    """The keywords of ``ActorClass.options()`` for one worker actor (in `placement_group`'s bundle 0 when
    it has one).

    >>> actor_options({"memory": 1 << 30, "scheduling_strategy": "SPREAD"}, 0.25, 0)
    {'num_cpus': 0.25, 'num_gpus': 0, 'memory': 1073741824, 'scheduling_strategy': 'SPREAD'}
    """
    out: dict[str, Any] = {"num_cpus": cpus, "num_gpus": gpus}
    for k, v in remote_args.items():
        if k not in ("placement_group_bundles", "placement_group_strategy"):
            out[k] = _thaw(v)
    if placement_group is not None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        out["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True)
    return out
