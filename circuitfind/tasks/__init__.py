"""The task registry: clean/corrupted prompt pairs, answers and metrics.

Built-in tasks are imported here so that they register themselves.
"""

from circuitfind.tasks.base import TASKS, Task, TaskData, get_task

# Built-in tasks (imported for their registration side effect).
from circuitfind.tasks import gendered_pronoun, greater_than, induction, ioi  # noqa: E402,F401

from circuitfind.tasks.references import (  # noqa: E402
    available_references,
    reference_circuit,
    register_reference,
)

__all__ = ["TASKS", "Task", "TaskData", "available_references", "get_task", "reference_circuit",
           "register_reference"]
