"""Resolving a task argument: a registered name, a prompt file or a MIB task spec.

:func:`get_task` is what every entry point calls (``discover``, the CLI, bench configs); it
looks names up in the registry (:data:`circuitfind.tasks.base.TASKS`) and hands files to
:func:`load_task_file`, which reads prompt files (:mod:`circuitfind.tasks.files`) and MIB task
specs (:mod:`circuitfind.tasks.mib`). Sitting above those modules, it keeps them free of each
other.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from circuitfind.errors import ConfigError
from circuitfind.tasks.base import TASKS, Task
from circuitfind.tasks.files import load_prompt_file
from circuitfind.tasks.mib import mib_task_from_spec


def load_task_file(path: str | os.PathLike[str], metric: str | None = None,
                   first_token: bool = False) -> Task:
    """A task from a prompt file, or from a JSON file describing MIB task data (``{"mib":
    ...}``; see :mod:`circuitfind.tasks.mib`).

    Args:
        path: ``.jsonl``, ``.csv`` or ``.json`` (see :mod:`circuitfind.tasks.files`).
        metric, first_token: As in :func:`circuitfind.tasks.files.load_prompt_file`.

    Returns:
        A :class:`~circuitfind.tasks.files.PromptTask`.

    Raises:
        ConfigError: missing file, unsupported suffix, unknown metric.
        TaskDataError: every problem of the file, with its line or row.
    """
    path = Path(path).expanduser()
    if path.suffix.lower() == ".json" and path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            doc = None  # the prompt-file reader reports it with its line
        if isinstance(doc, Mapping) and "mib" in doc:
            return mib_task_from_spec(doc, base_dir=path.parent, metric=metric,
                                      first_token=first_token, source=str(path))
    return load_prompt_file(path, metric=metric, first_token=first_token)


def get_task(name: str | os.PathLike[str] | Task, metric: str | None = None,
             first_token: bool = False) -> Task:
    """Resolve a task argument: a Task, a registered task name, or a prompt/task file.

    This is the one place task arguments are resolved (CLI, :func:`circuitfind.discover`,
    :func:`circuitfind.build_data`). A path, or a string with a suffix (``.jsonl``, ``.csv``,
    ``.json``) or a directory part, is a file (:func:`load_task_file`);
    any other string is a registry name (dashes accepted).

    Args:
        name: The task argument.
        metric: For a prompt file: the metric (``logit_diff``, ``prob_diff``, ``log_prob``,
            ``kl``), overriding the file's own ``metric``. Rejected for registered tasks,
            whose metric is part of their definition.
        first_token: For a prompt file: score multi-token answers by their first token instead
            of rejecting them.

    Returns:
        A :class:`Task` instance.

    Raises:
        UnknownNameError: no such registered task; the message lists them.
        ConfigError: a file path that does not exist (the message says that names without a
            suffix are registry names), an unsupported suffix, or ``metric``/``first_token``
            given for a registered task.
        TaskDataError: the file's rows are malformed (every problem is listed).
    """
    if isinstance(name, Task):
        task: Task = name
    elif isinstance(name, (str, os.PathLike)) and _looks_like_file(name):
        return load_task_file(name, metric=metric, first_token=first_token)
    elif isinstance(name, str):
        task = TASKS.get(name)()
    else:
        raise ConfigError(f"A task must be a task name, a prompt file or a Task; got "
                          f"{type(name).__name__}.")
    if metric is not None or first_token:
        raise ConfigError(f"--metric and --first-token apply to prompt files; the task "
                          f"{task.name!r} defines its own metric and answers.")
    return task


def _looks_like_file(name: str | os.PathLike[str]) -> bool:
    """Registry names are identifiers: anything with a suffix or a directory part is a path."""
    text = os.fspath(name)
    return isinstance(name, os.PathLike) or bool(Path(text).suffix) or os.sep in text or "/" in text
