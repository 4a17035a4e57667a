"""Algorithm plugins: each scores the edges of the computational graph.

Built-ins: ``eap`` (edge attribution patching) and ``exact`` (exact single-edge patching).
"""

from circuitfind.algorithms import eap as _eap  # noqa: F401  (registers)
from circuitfind.algorithms import exact as _exact  # noqa: F401  (registers)
from circuitfind.algorithms.base import ALGORITHMS, Algorithm, get_algorithm
from circuitfind.algorithms.eap import EAP
from circuitfind.algorithms.exact import ExactPatching

__all__ = ["ALGORITHMS", "EAP", "Algorithm", "ExactPatching", "get_algorithm"]
