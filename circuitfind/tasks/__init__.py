"""The task registry: clean/corrupted prompt pairs, answers and metrics.

Built-in tasks are imported here so that they register themselves; prompt files and MIB task
data become tasks through :func:`get_task` (:mod:`circuitfind.tasks.lookup`, which reads
:mod:`circuitfind.tasks.files` and :mod:`circuitfind.tasks.mib`).
"""

# Built-in tasks (imported for their registration side effect).
from circuitfind.tasks import gendered_pronoun, greater_than, induction, ioi, mib  # noqa: F401
from circuitfind.tasks.base import TASKS, Task, TaskData
from circuitfind.tasks.files import PromptRow, PromptTask
from circuitfind.tasks.lookup import get_task, load_task_file
from circuitfind.tasks.mib import mib_task
from circuitfind.tasks.references import (
    available_references,
    reference_circuit,
    register_reference,
)

__all__ = ["TASKS", "PromptRow", "PromptTask", "Task", "TaskData", "available_references",
           "get_task", "load_task_file", "mib_task", "reference_circuit", "register_reference"]
