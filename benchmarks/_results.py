"""Shared by the benchmark scripts: write a result as JSON plus its Markdown table."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_results(out: str | Path, result: dict[str, Any],
                  markdown: Callable[[dict[str, Any]], str]) -> None:
    """Write ``OUT.json`` (raw numbers) and ``OUT.md`` (``markdown(result)``), then print it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    text = markdown(result)
    out.with_suffix(".md").write_text(text)
    print(text)
