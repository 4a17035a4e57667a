"""The patching engine: the only place that touches hooks."""

from circuitfind.patching.engine import GradientPoint, PatchingEngine
from circuitfind.patching.hooks import HookTable
from circuitfind.patching.paths import path_patch
from circuitfind.patching.spec import Ablation

__all__ = ["Ablation", "GradientPoint", "HookTable", "PatchingEngine", "path_patch"]
