"""Test utilities shipped with circuitfind: tiny random models and a toy task.

Used by circuitfind's own tests and by plugin authors' tests (the algorithm conformance suite).
"""

from circuitfind.testing.tiny import ToyTask, make_tiny_model_dir, tiny_model

__all__ = ["ToyTask", "check_algorithm", "make_tiny_model_dir", "tiny_model"]


def __getattr__(name: str):  # lazy: conformance imports the algorithms layer
    if name == "check_algorithm":
        from circuitfind.testing.conformance import check_algorithm

        return check_algorithm
    raise AttributeError(name)
