"""The optimizer classes, one module per algorithm family (imported lazily by the registry)."""

from ._base import ZooOptimizer, state_bytes

__all__ = ["ZooOptimizer", "state_bytes"]
