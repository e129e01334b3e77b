"""The run lock lives in the shared core (:mod:`segfactory.lock`), so the stage cores can take it too; this
module re-exports it for the pipelines."""

from segfactory.lock import MOUNTINFO, exclusive_lock, local_only_locking

__all__ = ["MOUNTINFO", "exclusive_lock", "local_only_locking"]
