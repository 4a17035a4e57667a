"""Shared test fixtures.

``shared_path(*parts)`` is the one place tests find ``../shared`` (the models and tokenizers that
sit beside the checkout). Without it the test is skipped with a clear reason, except under CI
(``CI=true``), where a missing ``../shared`` is a failure. The same holds for the Graphviz ``dot``
binary (``with_dot``); ``without_dot`` removes it from a test's PATH, as on a machine where
only the pip packages are installed. ``postgres_url`` is a PostgreSQL server's URL from
``CIRCUITFIND_TEST_POSTGRES_URL`` (``.ci/run`` starts a server with ``.ci/postgres`` and sets
it): skipped without one, a failure under CI.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("CIRCUITFIND_SHARED", REPO.parent / "shared"))


def shared_path(*parts: str) -> Path:
    """Path under ``../shared``; skip (or fail under CI) when it is absent."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = (f"{path} not found: the acceptance data live in ../shared beside the checkout "
                   "(set CIRCUITFIND_SHARED to point elsewhere).")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 tokenizer from ../shared/tokenizers/gpt2."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(shared_path("tokenizers", "gpt2")))


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """../shared/models/stories260k (a real pretrained Llama-architecture model)."""
    return shared_path("models", "stories260k")


@pytest.fixture(scope="session")
def stories_tokenizer(stories_dir):
    """stories260k's tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(stories_dir))


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.fixture
def with_dot() -> str:
    """The Graphviz ``dot`` binary; skip without it (fail under CI, which installs it)."""
    found = shutil.which("dot")
    if found is None:
        message = "the Graphviz `dot` binary is not on the PATH (CI installs it)"
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return found


POSTGRES_URL_VARIABLE = "CIRCUITFIND_TEST_POSTGRES_URL"


@pytest.fixture
def postgres_url() -> str:
    """The SQLAlchemy URL of a PostgreSQL database the test may create studies in.

    Skipped when ``CIRCUITFIND_TEST_POSTGRES_URL`` is unset (fails under CI, whose ``.ci/run``
    starts a server and sets it).
    """
    url = os.environ.get(POSTGRES_URL_VARIABLE, "")
    if not url:
        message = (f"no PostgreSQL server: set {POSTGRES_URL_VARIABLE} to a database URL "
                   "(`.ci/postgres start DIR` starts a throw-away server and prints one; "
                   ".ci/run does this)")
        if _in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return url


@pytest.fixture
def without_dot(monkeypatch) -> None:
    """Remove every directory holding a ``dot`` executable from this test's PATH."""
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and not os.access(os.path.join(d, "dot"), os.X_OK)]
    monkeypatch.setenv("PATH", os.pathsep.join(keep))
    assert shutil.which("dot") is None
