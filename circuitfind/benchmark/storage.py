"""Optuna storages for studies shared by several workers: opening a URL, and a claim lock.

Every study circuitfind runs (threshold searches, :mod:`~circuitfind.benchmark.grid` runs) lives
in an Optuna RDB storage named by a URL: SQLite (``sqlite:///path.db``) on one machine,
PostgreSQL or MySQL (``postgresql://user:password@host/db``) when workers run on several.
:func:`open_storage` opens one and turns every way that can fail (a malformed URL, a missing
driver, a folder that does not exist, a server that does not answer) into one
:class:`~circuitfind.errors.ConfigError` that names the URL and says what to pass instead.

Claims. Optuna moves a queued (``WAITING``) trial to ``RUNNING`` with a row lock, which makes
the move atomic on PostgreSQL and MySQL. SQLite ignores row locks, and Python's ``sqlite3``
begins a transaction only at its first write, so two processes can both read ``WAITING`` and
both claim the trial. :func:`claim_lock` closes that gap for SQLite with an advisory lock on a
file beside the database (``path.db.lock``; the operating system releases it when its process
dies, so a killed worker never leaves it held). SQLite serves the processes of one machine, so
a file lock is enough; for other URLs :func:`claim_lock` does nothing.

Drivers. ``pip install "circuitfind[postgres]"`` installs psycopg 3 (its binary wheel: nothing
to compile). SQLAlchemy reads a bare ``postgresql://`` URL as psycopg2's, so
:func:`database_url` gives such a URL to psycopg 3 when psycopg2 is not installed; an explicit
driver (``postgresql+psycopg2://``, ``postgresql+psycopg://``) is used as written. The test
suite runs the grid's workers against a real server (``.ci/postgres`` starts one).
"""

from __future__ import annotations

import contextlib
import importlib.util
import warnings
from collections.abc import Iterator
from typing import Any

from circuitfind.errors import ConfigError

SQLITE_PREFIX = "sqlite:///"


def optuna_module() -> Any:
    """The ``optuna`` module (a declared dependency; imported lazily, as it is slow to import).

    Raises:
        ConfigError: Optuna is not installed.
    """
    try:
        import optuna
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise ConfigError("Studies need Optuna: pip install optuna") from err
    return optuna


def database_url(url: str) -> str:
    """``url`` with the PostgreSQL driver that is installed, for SQLAlchemy.

    Args:
        url: A storage URL.

    Returns:
        ``postgresql+psycopg://...`` for a bare ``postgresql://`` (or ``postgres://``) URL when
        psycopg2, SQLAlchemy's default driver for it, is missing and psycopg 3 is installed;
        otherwise ``url`` unchanged.
    """
    scheme, sep, rest = url.partition("://")
    if (sep and scheme in ("postgresql", "postgres")
            and importlib.util.find_spec("psycopg2") is None
            and importlib.util.find_spec("psycopg") is not None):
        return f"postgresql+psycopg://{rest}"
    return url


def open_storage(url: str, *, heartbeat_interval: int | None = None,
                 grace_period: int | None = None) -> Any:
    """Open (creating its tables if needed) the Optuna RDB storage at ``url``.

    Args:
        url: An SQLAlchemy URL: ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``,
            ``postgresql://user:password@host/db`` (a Unix socket:
            ``postgresql://user@/db?host=/socket/dir``), ``mysql+pymysql://...``.
        heartbeat_interval: Seconds between the heartbeats a worker records for its running
            trial (``None``: no heartbeats, so no stale-trial detection).
        grace_period: Seconds without a heartbeat after which a running trial counts as held
            by a dead worker (default: twice ``heartbeat_interval``).

    Returns:
        An ``optuna.storages.RDBStorage``. SQLite connections wait up to 60 s for a lock
        instead of Python's default 5 s, so that several workers can share one file.

    Raises:
        ConfigError: not a string, a malformed URL, a database driver that is not installed, a
            database that cannot be opened or reached, or a bad heartbeat setting.
    """
    optuna = optuna_module()
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"A storage must be an SQLAlchemy URL such as sqlite:///bench.db or "
                          f"postgresql://user:password@host/db; got {url!r}.")
    for label, value in (("heartbeat_interval", heartbeat_interval),
                         ("grace_period", grace_period)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ConfigError(f"{label} must be None or an int >= 1 (seconds); got {value!r}.")
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(database_url(url), engine_kwargs=engine_kwargs,
                                              heartbeat_interval=heartbeat_interval,
                                              grace_period=grace_period)
    except Exception as err:  # sqlalchemy.exc.*, ImportError (driver), ValueError (URL)
        reason = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        hint = ("the folder holding an SQLite file must exist and be writable"
                if url.startswith("sqlite") else
                "check that the server is up, that the credentials are right and that its "
                "driver is installed (pip install \"circuitfind[postgres]\" for postgresql://, "
                "pymysql for mysql+pymysql://)")
        raise ConfigError(f"Cannot open the Optuna storage {url!r} ({reason}); {hint}.") from err


def sqlite_path(url: str) -> str | None:
    """The database file of an ``sqlite:///...`` URL, or ``None`` (another database, in memory)."""
    if not url.startswith(SQLITE_PREFIX):
        return None
    path = url[len(SQLITE_PREFIX):].split("?", 1)[0]
    return path if path and path != ":memory:" else None


@contextlib.contextmanager
def claim_lock(url: str) -> Iterator[None]:
    """Hold, for the block, the lock under which workers claim trials of an SQLite study.

    A blocking advisory lock on ``<database>.lock`` (``filelock``), held only for the
    milliseconds a claim takes; the operating system drops it if its process dies. For
    PostgreSQL / MySQL URLs (whose row locks make Optuna's claims atomic) and in-memory SQLite
    it does nothing.
    """
    path = sqlite_path(url)
    if path is None:
        yield
        return
    from filelock import FileLock

    with FileLock(path + ".lock"):
        yield
