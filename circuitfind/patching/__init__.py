"""The patching engine: the only place that touches hooks."""

from circuitfind.patching.engine import GradientPoint, PatchingEngine
from circuitfind.patching.hooks import HookTable

__all__ = ["GradientPoint", "HookTable", "PatchingEngine"]
