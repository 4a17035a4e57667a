"""Algorithm plugins: each scores the edges of the computational graph.

Built-ins: ``eap`` (edge attribution patching), ``exact`` (exact single-edge patching) and
``acdc`` (ACDC greedy pruning; returns a circuit).
"""

from circuitfind.algorithms import acdc as _acdc  # noqa: F401  (registers)
from circuitfind.algorithms import eap as _eap  # noqa: F401  (registers)
from circuitfind.algorithms import exact as _exact  # noqa: F401  (registers)
from circuitfind.algorithms.acdc import ACDC
from circuitfind.algorithms.base import ALGORITHMS, Algorithm, get_algorithm
from circuitfind.algorithms.eap import EAP
from circuitfind.algorithms.exact import ExactPatching
from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.algorithms.objective import Objective

__all__ = ["ACDC", "ALGORITHMS", "EAP", "Algorithm", "ExactPatching", "Objective", "RunContext",
           "get_algorithm"]
