"""The task registry: clean/corrupted prompt pairs, answers and metrics.

Built-in tasks are imported here so that they register themselves; prompt files and MIB task
data become tasks through :func:`get_task` (:mod:`circuitfind.tasks.files`,
:mod:`circuitfind.tasks.mib`).
"""

from circuitfind.tasks.base import TASKS, Task, TaskData, get_task

# Built-in tasks (imported for their registration side effect).
from circuitfind.tasks import gendered_pronoun, greater_than, induction, ioi, mib  # noqa: E402,F401
from circuitfind.tasks.files import PromptRow, PromptTask, load_task_file  # noqa: E402
from circuitfind.tasks.mib import mib_task  # noqa: E402

from circuitfind.tasks.references import (  # noqa: E402
    available_references,
    reference_circuit,
    register_reference,
)

__all__ = ["TASKS", "PromptRow", "PromptTask", "Task", "TaskData", "available_references",
           "get_task", "load_task_file", "mib_task", "reference_circuit", "register_reference"]
