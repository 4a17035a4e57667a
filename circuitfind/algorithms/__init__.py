"""Algorithm plugins: each scores the edges of the computational graph.

Built-ins: ``eap`` (edge attribution patching), ``exact`` (exact single-edge patching) and
``path_patching`` (recursive path patching from the logits, which selects its own circuit).
"""

from circuitfind.algorithms import eap as _eap  # noqa: F401  (registers)
from circuitfind.algorithms import exact as _exact  # noqa: F401  (registers)
from circuitfind.algorithms import path_patching as _path_patching  # noqa: F401  (registers)
from circuitfind.algorithms.base import ALGORITHMS, Algorithm, get_algorithm
from circuitfind.algorithms.eap import EAP
from circuitfind.algorithms.exact import ExactPatching
from circuitfind.algorithms.path_patching import PathPatching

__all__ = ["ALGORITHMS", "EAP", "Algorithm", "ExactPatching", "PathPatching", "get_algorithm"]
