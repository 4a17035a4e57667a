"""The task registry: clean/corrupted prompt pairs, answers and metrics.

Built-in tasks are imported here so that they register themselves.
"""

from circuitfind.tasks.base import TASKS, Task, TaskData, get_task

# Built-in tasks (imported for their registration side effect).
from circuitfind.tasks import gendered_pronoun, greater_than, induction, ioi  # noqa: E402,F401

__all__ = ["TASKS", "Task", "TaskData", "get_task"]
