"""Test utilities shipped with circuitfind: tiny random models, a toy task and the algorithm
conformance suite.

Used by circuitfind's own tests and by plugin authors' tests.
"""

from circuitfind.testing.conformance import check_algorithm
from circuitfind.testing.tiny import ToyTask, make_tiny_model_dir, tiny_model

__all__ = ["ToyTask", "check_algorithm", "make_tiny_model_dir", "tiny_model"]
