"""Algorithm plugins: each scores the edges of the computational graph.

Built-ins: ``eap`` (edge attribution patching), ``eap_ig`` (EAP with integrated gradients),
``clean_corrupted`` (EAP with the clean and corrupted gradients averaged) and ``exact`` (exact
single-edge patching).
"""

from circuitfind.algorithms import clean_corrupted as _clean_corrupted  # noqa: F401  (registers)
from circuitfind.algorithms import eap as _eap  # noqa: F401  (registers)
from circuitfind.algorithms import eap_ig as _eap_ig  # noqa: F401  (registers)
from circuitfind.algorithms import exact as _exact  # noqa: F401  (registers)
from circuitfind.algorithms.base import ALGORITHMS, Algorithm, get_algorithm
from circuitfind.algorithms.clean_corrupted import CleanCorrupted
from circuitfind.algorithms.eap import EAP
from circuitfind.algorithms.eap_ig import EAPIG
from circuitfind.algorithms.exact import ExactPatching

__all__ = ["ALGORITHMS", "EAP", "EAPIG", "Algorithm", "CleanCorrupted", "ExactPatching",
           "get_algorithm"]
