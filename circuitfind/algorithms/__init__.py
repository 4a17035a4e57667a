"""Algorithm plugins: each scores the edges of the computational graph.

Built-ins: ``eap`` (edge attribution patching), ``eap_ig`` (EAP with integrated gradients),
``eap_gp`` (EAP-IG along an adaptive gradient path), ``edge_pruning`` (learned hard-concrete
edge masks), ``clean_corrupted`` (EAP with the clean and corrupted gradients averaged), ``gim`` (EAP
with gradient interaction modifications), ``relp`` (relevance patching), ``atp_star`` (AtP*:
QK fix and GradDrop), ``exact`` (exact single-edge patching), ``acdc`` (ACDC greedy pruning),
``path_patching`` (recursive path patching from the logits) and ``ifr`` (information flow
routes); the last three select their own circuit.
"""

from circuitfind.algorithms import acdc as _acdc  # noqa: F401  (registers)
from circuitfind.algorithms import atp_star as _atp_star  # noqa: F401  (registers)
from circuitfind.algorithms import clean_corrupted as _clean_corrupted  # noqa: F401  (registers)
from circuitfind.algorithms import eap as _eap  # noqa: F401  (registers)
from circuitfind.algorithms import eap_gp as _eap_gp  # noqa: F401  (registers)
from circuitfind.algorithms import eap_ig as _eap_ig  # noqa: F401  (registers)
from circuitfind.algorithms import edge_pruning as _edge_pruning  # noqa: F401  (registers)
from circuitfind.algorithms import exact as _exact  # noqa: F401  (registers)
from circuitfind.algorithms import gim as _gim  # noqa: F401  (registers)
from circuitfind.algorithms import ifr as _ifr  # noqa: F401  (registers)
from circuitfind.algorithms import path_patching as _path_patching  # noqa: F401  (registers)
from circuitfind.algorithms import relp as _relp  # noqa: F401  (registers)
from circuitfind.algorithms.acdc import ACDC
from circuitfind.algorithms.atp_star import AtPStar
from circuitfind.algorithms.base import ALGORITHMS, Algorithm, PruningAlgorithm, get_algorithm
from circuitfind.algorithms.clean_corrupted import CleanCorrupted
from circuitfind.algorithms.eap import EAP
from circuitfind.algorithms.eap_gp import EAPGP
from circuitfind.algorithms.eap_ig import EAPIG
from circuitfind.algorithms.edge_pruning import EdgePruning
from circuitfind.algorithms.exact import ExactPatching
from circuitfind.algorithms.gim import GIM
from circuitfind.algorithms.ifr import InformationFlowRoutes
from circuitfind.algorithms.lifecycle import RunContext
from circuitfind.algorithms.objective import Objective
from circuitfind.algorithms.path_patching import PathPatching
from circuitfind.algorithms.relp import RelP

__all__ = ["ACDC", "ALGORITHMS", "EAP", "EAPGP", "EAPIG", "GIM", "Algorithm", "AtPStar",
           "CleanCorrupted", "EdgePruning", "ExactPatching", "InformationFlowRoutes", "Objective",
           "PathPatching", "PruningAlgorithm", "RelP", "RunContext", "get_algorithm"]
