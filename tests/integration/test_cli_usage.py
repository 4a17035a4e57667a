"""The command line never shows a traceback for a usage error, and its help reads like a CLI.

Checked through typer's CliRunner (the app itself) and through real ``python -m circuitfind``
processes with their output redirected to a file (what a user's shell and a log see).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from circuitfind.cli import app

ROOT = Path(__file__).resolve().parents[2]
USAGE_ERRORS = {
    "missing --out": (["discover", "--task", "induction"], "Missing option '--out'"),
    "mistyped command": (["discvoer"], "No such command 'discvoer'"),
    "bad integer": (["discover", "--task", "induction", "--edges", "abc", "--out", "x"],
                    "Invalid value for '--edges'"),
    "unknown flag": (["discover", "--task", "induction", "--bogus"], "No such option: --bogus"),
    "render without arguments": (["render"], "Missing argument 'CIRCUIT'"),
}


def _shell(args: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run ``python -m circuitfind ARGS`` with stdout and stderr redirected to one file."""
    log = tmp_path / "out.log"
    with log.open("w") as fh:
        code = subprocess.run([sys.executable, "-m", "circuitfind", *args], cwd=tmp_path,
                              stdout=fh, stderr=subprocess.STDOUT, timeout=300,
                              env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"}).returncode
    return code, log.read_text()


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_print_a_short_usage_message(case, tmp_path):
    args, message = USAGE_ERRORS[case]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    code, text = _shell(args, tmp_path)
    assert code == 2, text
    assert message in text and "Usage:" in text
    assert "Traceback" not in text and len(text.splitlines()) <= 8, text


def test_help_shows_flags_defaults_and_plain_argument_names():
    runner = CliRunner()
    discover = runner.invoke(app, ["discover", "--help"]).output
    assert "--overwrite " in discover and "<bool>" not in discover  # flags are flags
    assert "[default: (100, unless --threshold is given)]" in " ".join(discover.split())
    assert "KEY=VALUE" in discover
    render = runner.invoke(app, ["render", "--help"]).output
    assert "render [OPTIONS] CIRCUIT OUT" in render and "{" not in render.splitlines()[0]
    for command in ("bench", "evaluate", "export"):
        usage = runner.invoke(app, [command, "--help"]).output.splitlines()[0]
        assert "{" not in usage and "}" not in usage, usage


def test_library_errors_use_cli_wording(tmp_path):
    """Messages of errors the CLI prints name CLI options (--overwrite), not Python keywords."""
    out = tmp_path / "run"
    args = ["discover", "--task", "induction", "--edges", "5", "--examples", "4", "--out",
            str(out), "--renderer", "matplotlib", "--no-progress"]
    code, text = _shell(args, tmp_path)
    assert code == 0, text
    code, text = _shell(args, tmp_path)
    assert code == 2 and "--overwrite" in text and "overwrite=True" not in text, text
    code, text = _shell(["render", str(out / "circuit.json"), str(tmp_path / "fig.xyz")],
                        tmp_path)
    assert code == 2 and "format=" not in text and "Traceback" not in text, text
    # three exports into one folder: the second is refused unless --overwrite
    export = ["export", str(out / "circuit.json"), "--format", "mib", "--out",
              str(tmp_path / "mib")]
    assert _shell(export, tmp_path)[0] == 0
    code, text = _shell(export, tmp_path)
    assert code == 2 and "--overwrite" in text and "already exists" in text, text
    code, text = _shell([*export, "--overwrite"], tmp_path)
    assert code == 0, text


def test_logs_hold_one_line_per_phase_and_no_bars(tmp_path):
    """Output redirected to a file: no carriage returns or cursor codes, one line per phase;
    --no-progress drops the phase lines too."""
    args = ["discover", "--task", "ioi", "--algorithm", "acdc", "--threshold", "0.01",
            "--examples", "8", "--renderer", "matplotlib"]
    code, text = _shell([*args, "--out", str(tmp_path / "a")], tmp_path)
    assert code == 0, text
    assert "\r" not in text and "\x1b" not in text, repr(text)
    phase = [line for line in text.splitlines() if line.startswith("ACDC τ=0.01:")]
    assert len(phase) == 1 and "of 110 edges in" in phase[0], text
    code, quiet = _shell([*args, "--out", str(tmp_path / "b"), "--no-progress"], tmp_path)
    assert code == 0 and "ACDC τ=" not in quiet and "\r" not in quiet, quiet


def test_a_resumed_run_says_so(run, tmp_path, monkeypatch):
    """A run stopped in the middle (its checkpoint saved) and started again says how much of
    the work it resumes from."""
    from circuitfind.patching.engine import PatchingEngine

    original, calls = PatchingEngine.evaluate, {"n": 0}

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    args = ["discover", "--task", "ioi", "--algorithm", "exact", "--examples", "8", "--edges",
            "20", "-p", "masks_per_pass=10", "--out", str(tmp_path / "run"), "--renderer",
            "matplotlib"]
    monkeypatch.setattr(PatchingEngine, "evaluate", interrupted)
    first = run(*args)
    assert first.returncode == 130, first.stderr
    monkeypatch.setattr(PatchingEngine, "evaluate", original)
    second = run(*args)
    assert second.returncode == 0, second.stderr
    import re

    done = re.search(r"resuming exact patching: (\d+) of 110 edges done", second.stderr)
    assert done and 0 < int(done.group(1)) < 110, second.stderr
