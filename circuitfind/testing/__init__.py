"""Test utilities shipped with circuitfind: tiny random models and a toy task.

Used by circuitfind's own tests and by plugin authors' tests (the algorithm conformance suite).
"""

from circuitfind.testing.tiny import ToyTask, make_tiny_model_dir, tiny_model

__all__ = ["ToyTask", "make_tiny_model_dir", "tiny_model"]
