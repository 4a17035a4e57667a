"""The circuitfind exception tree.

Every error circuitfind raises on purpose derives from :class:`CircuitFindError`, with dual
inheritance from the matching built-in exception so that ``except ValueError`` keeps working
(the convention optuna and networkx follow). Messages say what was wrong, the value received
and how to fix it; the CLI prints them without a traceback.
"""

from __future__ import annotations


class CircuitFindError(Exception):
    """Base class of every error circuitfind raises deliberately.

    Args:
        message: The message, in the Python API's words (``overwrite=True``).
        cli: The same message in the command line's words (``--overwrite``), where they
            differ; the CLI prints :attr:`cli_message`.
    """

    def __init__(self, message: str = "", *args: object, cli: str | None = None) -> None:
        super().__init__(message, *args)
        self.cli_message = cli if cli is not None else str(message)


class ConfigError(CircuitFindError, ValueError):
    """A parameter or argument has an invalid value."""


class UnknownNameError(CircuitFindError, KeyError):
    """A registry lookup (task, algorithm, zoo model, node, edge) failed."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class TaskDataError(CircuitFindError, ValueError):
    """A task's data do not fit the tokenizer or are inconsistent (lengths, answers)."""


class ModelLoadError(CircuitFindError, OSError):
    """A model could not be loaded (not found, offline, not a causal LM)."""


class HookError(CircuitFindError, RuntimeError):
    """The model lacks a hook the engine needs, or a hook failed while running."""


class OutputExistsError(CircuitFindError, FileExistsError):
    """An output directory already holds a run and overwriting was not asked for."""


class CheckpointMismatchError(ConfigError):
    """A checkpoint belongs to another run (model, data, threshold or settings differ)."""


class NonFiniteMetricError(CircuitFindError, ArithmeticError):
    """A metric evaluated to NaN or infinity during a search (the message names where)."""
