"""Memory budgets: parsed from sizes with units, refused with a clear message when malformed."""

from __future__ import annotations

import pytest

from circuitfind.errors import ConfigError
from circuitfind.patching.spec import DEFAULT_MEMORY_BUDGET, parse_memory


@pytest.mark.parametrize("text, expected", [
    ("4GiB", 4 * 2**30), ("4 GiB", 4 * 2**30), ("4gib", 4 * 2**30), ("512MiB", 512 * 2**20),
    ("2GB", 2 * 10**9), ("1.5G", int(1.5 * 2**30)), ("100MB", 10**8), ("3K", 3 * 2**10),
    ("2048", 2048), (2**21, 2**21), (None, DEFAULT_MEMORY_BUDGET)])
def test_sizes_with_units_are_parsed(text, expected):
    assert parse_memory(text) == expected


@pytest.mark.parametrize("bad", ["", "GiB", "4 parsecs", "-1GiB", "0", "nan", "inf", True, "4GiBs"])
def test_malformed_sizes_are_refused_with_examples(bad):
    with pytest.raises(ConfigError, match="4GiB"):
        parse_memory(bad)
