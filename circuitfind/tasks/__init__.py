"""The task registry: clean/corrupted prompt pairs, answers and metrics.

Built-in tasks are imported here so that they register themselves.
"""

from circuitfind.tasks.base import TASKS, Task, TaskData, get_task

__all__ = ["TASKS", "Task", "TaskData", "get_task"]
