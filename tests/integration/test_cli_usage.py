"""The command line never shows a traceback for a usage error, and its help reads like a CLI.

Checked through typer's CliRunner (the app itself) and through real ``python -m circuitfind``
processes with their output redirected to a file (what a user's shell and a log see). The
processes import the package from this checkout (``PYTHONPATH``), not whichever copy is
installed.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from circuitfind import _progress
from circuitfind.cli import app

ROOT = Path(__file__).resolve().parents[2]
USAGE_ERRORS = {
    "missing --out": (["discover", "--task", "induction"], "Missing option '--out'"),
    "mistyped command": (["discvoer"], "No such command 'discvoer'"),
    "bad integer": (["discover", "--task", "induction", "--edges", "abc", "--out", "x"],
                    "Invalid value for '--edges'"),
    "unknown flag": (["discover", "--task", "induction", "--bogus"], "No such option: --bogus"),
    "render without arguments": (["render"], "Missing argument 'CIRCUIT'"),
    "negative --edges": (["discover", "--task", "induction", "--edges", "-5", "--out", "x"],
                         "Invalid value for '--edges'"),
}
# values the command line refuses before loading anything (CliRunner only: same code path)
OUT_OF_RANGE = {
    "--examples 0": (["evaluate", "c.json", "--examples", "0"],
                     "Invalid value for '--examples': Input should be greater than or equal to 1; "
                     "got 0."),
    "--top -1": (["render", "c.json", "x.svg", "--top", "-1"], "Invalid value for '--top'"),
    "--edge-colour": (["render", "c.json", "x.svg", "--edge-colour", "rainbow"],
                      "'rainbow' is not one of receiver, sign"),
    "--head-labels": (["render", "c.json", "x.svg", "--head-labels", "index"],
                      "'index' is not one of name, layer.head"),
    "--sort": (["leaderboard", "--storage", "sqlite:///x.db", "--out", "lb", "--sort", "size"],
               "'size' is not one of cpr, cmd, auroc, time"),
    "--format": (["export", "c.json", "--format", "json"], "'json' is not one of mib"),
    "--d-model 0": (["export", "c.json", "--format", "mib", "--d-model", "0"],
                    "Invalid value for '--d-model'"),
    "--target 2": (["tune", "--task", "induction", "--target", "2"],
                   "Invalid value for '--target': Input should be less than or equal to 1; got 2"),
    "--target 0": (["tune", "--task", "induction", "--target", "0"],
                   "Invalid value for '--target': give a number above 0; got 0.0."),
    "--low 0": (["tune", "--task", "induction", "--low", "0", "--high", "1"],
                "Invalid value for '--low': give a number above 0; got 0.0."),
    "--trials -1": (["tune", "--task", "induction", "--trials", "-1"],
                    "Invalid value for '--trials'"),
    "--heartbeat 0": (["bench", "grid.toml", "--heartbeat", "0"],
                      "Invalid value for '--heartbeat'"),
}
LONG_COMMANDS = ("discover", "evaluate", "tune", "bench", "check")


def _shell(args: list[str], tmp_path: Path, log_name: str = "out.log") -> tuple[int, str]:
    """Run ``python -m circuitfind ARGS`` (this checkout's package) with stdout and stderr
    redirected to one file; returns the exit code and the file's text."""
    log = tmp_path / log_name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TQDM_DISABLE", None)
    with log.open("w") as fh:
        code = subprocess.run([sys.executable, "-m", "circuitfind", *args], cwd=tmp_path,
                              stdout=fh, stderr=subprocess.STDOUT, timeout=300,
                              env=env).returncode
    return code, log.read_text()


def _terminal(args: list[str], tmp_path: Path) -> tuple[int, str]:
    """Run ``python -m circuitfind ARGS`` with stdin, stdout and stderr on a pseudo-terminal of
    100 columns (what a user at a terminal sees); returns the exit code and the raw output with
    the terminal's ``\\r\\n`` line ends made ``\\n``."""
    pty = pytest.importorskip("pty")
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "COLUMNS": "100",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("TQDM_DISABLE", None)
    proc = subprocess.Popen([sys.executable, "-m", "circuitfind", *args], cwd=tmp_path, env=env,
                            stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # the terminal closes when the process ends
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    code = proc.wait(timeout=300)
    return code, b"".join(chunks).decode(errors="replace").replace("\r\n", "\n")


def test_subprocesses_run_this_checkout(tmp_path):
    code = subprocess.run([sys.executable, "-c", "import circuitfind; print(circuitfind.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert Path(code.stdout.strip()).resolve().is_relative_to(ROOT), code.stdout


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


@pytest.mark.parametrize("case", sorted(OUT_OF_RANGE))
def test_out_of_range_values_and_unknown_choices_are_usage_errors(case):
    args, message = OUT_OF_RANGE[case]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Usage:" in result.output, result.output
    assert "Traceback" not in result.output and "RenderOptions" not in result.output


def test_choices_are_read_case_insensitively():
    from circuitfind.cli import _one_of

    assert _one_of(("name", "layer.head"))(" Layer.Head ") == "layer.head"
    assert _one_of(("mib",))(None) is None


def test_errors_found_after_loading_use_cli_wording(run, tmp_path):
    """Values only the model can check (more edges than the graph has), and tune's range, are
    refused in the command line's words."""
    out = run("discover", "--task", "induction", "--edges", "500", "--examples", "4", "--out",
              str(tmp_path / "run"), "--no-progress")
    assert out.returncode == 2 and "--edges must be an integer between 0 and 110" in out.stderr
    assert "n_edges" not in out.stderr, out.stderr
    base = ["discover", "--task", "induction", "--examples", "4", "--out", str(tmp_path / "x")]
    for args, words, python in (
            (["--memory", "1KiB"], "--memory must be at least 1 MiB", "memory_budget"),
            (["-a", "acdc", "--edges", "10"], "pass --threshold (ACDC's τ) instead of --edges",
             "n_edges"),
            (["-a", "acdc", "--threshold", "0.1", "-p", "threshold=0.2"],
             "--threshold 0.1 conflicts with -p threshold=0.2", "threshold=0.1")):
        out = run(*base, *args)
        assert out.returncode == 2 and words in out.stderr and python not in out.stderr, args
    for args, words in ((["--low", "0.1"], "got only --low 0.1"),
                        (["--low", "2", "--high", "1"], "--low must be above 0 and below --high"),
                        (["-p", "threshold=0.1"], "leave out -p threshold")):
        out = run("tune", "--task", "induction", "--trials", "1", "--storage",
                  f"sqlite:///{tmp_path / 'tune.db'}", *args)
        assert out.returncode == 2 and words in out.stderr, out.stderr
        assert "algorithm_params" not in out.stderr and "low and high" not in out.stderr
    out = run("discover", "--task", "induction", "--algorithm", "acdcc", "--out",
              str(tmp_path / "x"))
    assert out.returncode == 2 and "Unknown algorithm 'acdcc'" in out.stderr
    assert "discovering:" not in out.stderr  # refused before announcing (or loading) anything


def test_help_shows_flags_defaults_and_plain_argument_names():
    runner = CliRunner()
    discover = runner.invoke(app, ["discover", "--help"]).output
    assert "--overwrite " in discover and "<bool>" not in discover  # flags are flags
    assert "[default: 100, unless --threshold is given" in " ".join(discover.split())
    assert "KEY=VALUE" in discover
    render = " ".join(runner.invoke(app, ["render", "--help"]).output.split())
    assert "render [OPTIONS] CIRCUIT OUT" in render
    assert "--edge-colour, --edge-color [receiver|sign]" in render
    assert "[default: every edge;" in render and "--no-title Leave" in render
    for command in app.registered_commands:
        name = command.callback.__name__
        text = runner.invoke(app, [name, "--help"]).output
        assert "{" not in text.splitlines()[0] and "}" not in text.splitlines()[0], text
        assert "<bool>" not in text and "[default: (" not in " ".join(text.split()), text
        assert ("--no-progress" in text) == (name in LONG_COMMANDS), name


def test_help_shows_the_range_each_option_accepts():
    """The range in an option's help is the one the command line enforces: typer writes
    closed ranges (``0<=x<=1``), so an option that also refuses its lower end shows it open
    (``--target`` reads ``0<x<=1``), and every bound the help shows as accepted is accepted."""
    import typer.main

    runner = CliRunner()
    tune = " ".join(runner.invoke(app, ["tune", "--help"]).output.split())
    assert "[default: 0.9; 0<x<=1]" in tune and "0<=x" not in tune
    assert tune.count("effects; x>0]") == 2  # --low and --high
    assert "[default: 20; x>=0]" in tune  # --trials 0 is accepted (create only)
    group = typer.main.get_command(app)
    root = group.make_context("circuitfind", ["tasks"], resilient_parsing=True)
    checked = 0
    for name, command in group.commands.items():
        ctx = command.make_context(name, [], parent=root, resilient_parsing=True)
        for param in command.params:
            record = command.help_record(param, ctx)
            low = getattr(param, "min", None)
            if record is None or low is None:
                continue
            shown = " ".join(record[1].split())
            opened = f"{low}<x" in shown or f"x>{low}]" in shown or f"x>{low};" in shown
            closed = f"{low}<=x" in shown or f"x>={low}" in shown
            assert opened != closed, (name, record)
            callback = getattr(param.callback, "__wrapped__", param.callback)
            refused = False
            if callback is not None:
                try:
                    callback(low)
                except typer.BadParameter:
                    refused = True
            assert refused == opened, (name, record, "help and validation disagree on", low)
            checked += 1
    assert checked >= 15


def test_every_option_shows_its_default():
    """Each option that takes a value says its default (typer's [default: ...] or in its help
    text) or that it is required."""
    import typer.main

    group = typer.main.get_command(app)
    root = group.make_context("circuitfind", ["tasks"], resilient_parsing=True)
    silent = []
    for name, command in group.commands.items():
        ctx = command.make_context(name, [], parent=root, resilient_parsing=True)
        for param in command.params:
            if param.param_type_name != "option" or getattr(param, "is_flag", False):
                continue
            record = param.get_help_record(ctx)
            if record and "default" not in record[1].lower() and "[required]" not in record[1]:
                silent.append(f"{name} {record[0]}")
    assert not silent, silent


def test_bars_on_a_terminal_and_none_with_no_progress(tmp_path):
    """At a terminal the ACDC run draws its bar (and the model its loading bar); --no-progress
    draws none of them, and prints no phase line either."""
    args = ["discover", "--task", "ioi", "--algorithm", "acdc", "--threshold", "0.01",
            "--examples", "8", "--renderer", "matplotlib"]
    code, text = _terminal([*args, "--out", str(tmp_path / "a")], tmp_path)
    assert code == 0, text
    assert "\r" in text and "ACDC τ=0.01:" in text and "edge/s" in text, repr(text)
    code, text = _terminal([*args, "--out", str(tmp_path / "b"), "--no-progress"], tmp_path)
    assert code == 0, text
    assert "\r" not in text and "\x1b" not in text and "ACDC τ" not in text, repr(text)
    assert "Loading" not in text and "normalized faithfulness" in text, repr(text)


def test_no_progress_switches_progress_off_for_the_command_only(monkeypatch, tmp_path):
    """--no-progress turns bars and phase lines off (model loading included) while the command
    runs, and only then."""
    from circuitfind.errors import ConfigError
    from circuitfind.graphs.circuit import Circuit

    seen = []

    def load(path):
        seen.append((_progress.shown(), _progress.bars_wanted()))
        raise ConfigError("stop here")

    monkeypatch.setattr(Circuit, "load", staticmethod(load))
    CliRunner().invoke(app, ["evaluate", str(tmp_path / "c.json"), "--no-progress"])
    CliRunner().invoke(app, ["evaluate", str(tmp_path / "c.json")])
    assert seen == [(False, False), (True, False)]  # CliRunner's stderr is no terminal
    assert _progress.shown()


def test_bars_only_on_a_terminal_and_never_under_tqdm_disable(monkeypatch):
    class Terminal:
        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> int:
            return len(text)

        def flush(self) -> None:
            pass

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert not _progress.bars_wanted()  # pytest's captured stderr
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert _progress.bars_wanted() and not _progress.bars_wanted(requested=False)
    with _progress.quiet():
        assert not _progress.bars_wanted()
        assert isinstance(_progress.progress(10, desc="x"), _progress.PhaseLog)
    assert _progress.bars_wanted()
    for value, bars in (("1", False), ("true", False), ("0", True), ("", True)):
        monkeypatch.setenv("TQDM_DISABLE", value)
        assert _progress.bars_wanted() is bars, value


def test_a_long_phase_logs_a_line_a_minute(monkeypatch, caplog):
    """In a log a phase is one line when it ends, plus one each LOG_EVERY_S seconds while it
    runs (an hours-long ACDC shows it is alive); nothing when progress is off."""
    clock = [0.0]
    monkeypatch.setattr(_progress.time, "monotonic", lambda: clock[0])
    caplog.set_level(logging.INFO, logger="circuitfind.progress")
    bar = _progress.PhaseLog(300, desc="ACDC τ=0.01", unit="edge")
    for _ in range(300):
        clock[0] += 0.5
        bar.update()
    bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["ACDC τ=0.01: 120 of 300 edges, 60 s so far",
                     "ACDC τ=0.01: 240 of 300 edges, 120 s so far",
                     "ACDC τ=0.01: 300 of 300 edges in 150.0 s"], lines
    caplog.clear()
    bar = _progress.progress(300, desc="ACDC τ=0.01", unit="edge")  # as ACDC drives it
    for n in range(0, 300, 10):
        clock[0] += 5.0
        bar.n = n
        bar.set_postfix(kept=n // 2, receiver="m1", refresh=False)
        bar.refresh()
    assert [r.getMessage() for r in caplog.records] == [
        "ACDC τ=0.01: 110 of 300 edges, 60 s so far; kept=55, receiver=m1",
        "ACDC τ=0.01: 230 of 300 edges, 120 s so far; kept=115, receiver=m1"]
    bar.close()
    caplog.clear()
    with _progress.quiet():
        bar = _progress.progress(300, desc="ACDC")
        for _ in range(300):
            clock[0] += 0.5
            bar.update()
        bar.close()
    assert not caplog.records


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


def test_python_mib_export_refuses_to_overwrite(tmp_path):
    """cf.export_mib refuses an existing file in Python's words unless overwrite=True."""
    import torch

    import circuitfind as cf
    from circuitfind.errors import OutputExistsError
    from circuitfind.graphs import ComputeGraph, select_top_n

    graph = ComputeGraph(2, 4)
    scores = torch.randn(graph.n_senders, graph.n_receivers,
                         generator=torch.Generator().manual_seed(0))
    circuits = [select_top_n(graph, scores, n, metadata={"model": "tiny", "task": "ioi"})
                for n in (10, 20)]
    path = cf.export_mib(circuits[0], tmp_path, d_model=8)
    before = path.read_bytes()
    with pytest.raises(OutputExistsError, match="overwrite=True") as refused:
        cf.export_mib(circuits[1], tmp_path, d_model=8)
    assert "--overwrite" in refused.value.cli_message and path.read_bytes() == before
    assert cf.export_mib(circuits[1], tmp_path, d_model=8, overwrite=True) == path
    assert path.read_bytes() != before


def test_grid_worker_log_holds_one_line_per_cell(tmp_path):
    """A bench worker's redirected output: no carriage returns or cursor codes, one line per
    finished cell; --no-progress drops those lines."""
    config = tmp_path / "grid.toml"
    config.write_text('models = ["zoo:induction-2l"]\ntasks = ["induction"]\n'
                      'algorithms = ["eap"]\nseeds = [0, 1]\nexamples = 4\n')
    code, text = _shell(["bench", str(config), "--storage", f"sqlite:///{tmp_path / 'a.db'}",
                         "--threads", "1"], tmp_path)
    assert code == 0, text
    assert "\r" not in text and "\x1b" not in text, repr(text)
    cells = [line for line in text.splitlines() if re.match(r"cell \d of 2 done: ", line)]
    assert len(cells) == 2, text
    code, quiet = _shell(["bench", str(config), "--storage", f"sqlite:///{tmp_path / 'b.db'}",
                          "--threads", "1", "--no-progress"], tmp_path, "quiet.log")
    assert code == 0 and "cell 1 of 2" not in quiet and "\r" not in quiet, quiet


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


def test_a_resumed_run_says_so(run, tmp_path, ctrl_c):
    """A run stopped in the middle (its checkpoint saved) and started again says how much of
    the work it resumes from, also under --no-progress (which drops the phase line)."""
    from circuitfind.patching.engine import PatchingEngine

    args = ["discover", "--task", "ioi", "--algorithm", "exact", "--examples", "8", "--edges",
            "20", "-p", "masks_per_pass=10", "--out", str(tmp_path / "run"), "--renderer",
            "matplotlib"]
    with ctrl_c(PatchingEngine, "evaluate", 4):
        first = run(*args)
    assert first.returncode == 130, first.stderr
    second = run(*args, "--no-progress")
    assert second.returncode == 0, second.stderr
    assert "exact patching: 110 of 110" not in second.stderr, second.stderr
    done = re.search(r"resuming exact patching: (\d+) of 110 edges done", second.stderr)
    assert done and 0 < int(done.group(1)) < 110, second.stderr


def test_a_resumed_acdc_run_says_so_in_its_log(run, tmp_path, ctrl_c):
    """ACDC stopped mid-run, then the same command as a real process with its output
    redirected to a file: the log says how much it resumes from, with no bar codes."""
    from circuitfind.patching.engine import PatchingEngine

    args = ["discover", "--task", "ioi", "--algorithm", "acdc", "--threshold", "0.001",
            "--examples", "8", "--out", str(tmp_path / "run"), "--renderer", "matplotlib"]
    with ctrl_c(PatchingEngine, "run", 6):
        first = run(*args)
    assert first.returncode == 130 and "rerun the same command" in first.stderr, first.stderr
    code, text = _shell(args, tmp_path)
    assert code == 0, text
    done = re.search(r"resuming ACDC: (\d+) of 110 edges done", text)
    assert done and 0 < int(done.group(1)) < 110, text
    assert "\r" not in text and "\x1b" not in text, repr(text)


def test_graphviz_note_only_when_something_is_drawn(run, tmp_path, without_dot):
    """Without Graphviz, the matplotlib note comes with a drawing, not with commands that draw
    nothing (a run refused after loading, a DOT file, evaluate)."""
    from circuitfind.graphs.render import _FALLBACK_SAID

    _FALLBACK_SAID.clear()
    out = run("discover", "--task", "induction", "--edges", "500", "--examples", "4", "--out",
              str(tmp_path / "refused"))
    assert out.returncode == 2 and "Graphviz" not in out.stderr, out.stderr
    out = run("discover", "--task", "induction", "--edges", "10", "--examples", "4", "--out",
              str(tmp_path / "run"))
    assert out.returncode == 0 and out.stderr.count("Graphviz `dot` not found") == 1, out.stderr
    _FALLBACK_SAID.clear()
    for args in (["render", str(tmp_path / "run" / "circuit.json"), str(tmp_path / "c.dot")],
                 ["evaluate", str(tmp_path / "run" / "circuit.json"), "--examples", "4"]):
        out = run(*args)
        assert out.returncode == 0 and "Graphviz" not in out.stderr, (args, out.stderr)
    out = run("render", str(tmp_path / "run" / "circuit.json"), str(tmp_path / "c.svg"))
    assert out.returncode == 0 and "Graphviz `dot` not found" in out.stderr, out.stderr
