"""Redundant checkpoint storage over several fsspec URLs (see `store` for the commit protocol)."""

from resilient.storage.maintenance import VerifyReport
from resilient.storage.problems import Problem
from resilient.storage.replica import ReplicaHealth
from resilient.storage.store import CheckpointStore, Commit, Loaded, PendingSave

__all__ = ["CheckpointStore", "Commit", "Loaded", "PendingSave", "Problem", "ReplicaHealth", "VerifyReport"]
