"""A headless Chromium for the viewer's browser tests and benchmark (Playwright for Python).

The browser is the system's Chromium (Debian's ``chromium`` package: ``apt-get install
chromium``), driven through Playwright (``pip install playwright``, part of the ``test``
extra); Playwright's own browser download (``playwright install``) is not used. Each launch
gets a fresh user-data directory and the flags of :data:`CHROMIUM_ARGS` (no sandbox, no GPU,
nothing that talks to the network), so a test run neither reads nor writes a profile.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

__all__ = ["CHROMIUM_ARGS", "CHROMIUM_CANDIDATES", "find_chromium", "browser_missing",
           "chromium_page"]

CHROMIUM_ARGS: tuple[str, ...] = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync")
"""Command-line flags of every launch."""

CHROMIUM_CANDIDATES: tuple[str, ...] = ("/usr/bin/chromium", "chromium", "chromium-browser")
"""Where to look for the browser (``CIRCUITFIND_CHROMIUM`` overrides)."""


def find_chromium() -> str | None:
    """The Chromium executable: ``$CIRCUITFIND_CHROMIUM``, else the first of
    :data:`CHROMIUM_CANDIDATES` that exists; ``None`` when there is none."""
    override = os.environ.get("CIRCUITFIND_CHROMIUM")
    if override:
        return override if shutil.which(override) or os.path.isfile(override) else None
    for candidate in CHROMIUM_CANDIDATES:
        found = candidate if os.path.isfile(candidate) else shutil.which(candidate)
        if found:
            return found
    return None


def browser_missing() -> str | None:
    """Why the browser tests cannot run here (``None`` when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return ("Playwright for Python is not installed (`pip install -e \".[test]\"` or `pip "
                "install playwright`; its browser download is not needed)")
    if find_chromium() is None:
        return ("no Chromium found (install Debian's `chromium` package: `apt-get install "
                "chromium`, or set CIRCUITFIND_CHROMIUM to the executable)")
    return None


@contextlib.contextmanager
def chromium_page(width: int = 1400, height: int = 900) -> Iterator[Any]:
    """A Playwright page in a fresh headless Chromium that accepts downloads.

    Yields:
        The ``playwright.sync_api.Page``; its ``console_errors`` attribute collects console
        errors and uncaught exceptions as strings.

    Raises:
        RuntimeError: :func:`browser_missing` says why there is no browser.
    """
    problem = browser_missing()
    if problem is not None:
        raise RuntimeError(f"Cannot start Chromium: {problem}.")
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="circuitfind-chromium-") as profile, \
            sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=find_chromium(), headless=True, args=list(CHROMIUM_ARGS),
            viewport={"width": width, "height": height}, accept_downloads=True)
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(f"uncaught: {e}"))
            setattr(page, "console_errors", errors)  # our own attribute on playwright's Page
            yield page
        finally:
            context.close()
