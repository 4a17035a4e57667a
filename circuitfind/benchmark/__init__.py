"""Studies over algorithms and settings, on Optuna storages shared by any number of workers.

- :mod:`~circuitfind.benchmark.tune`: threshold searches (the smallest circuit reaching a
  faithfulness target);
- :mod:`~circuitfind.benchmark.grid`: benchmark grids (models × tasks × algorithms ×
  hyperparameters × seeds), one record per cell;
- :mod:`~circuitfind.benchmark.leaderboard`: tables and figures from the grids' records;
- :mod:`~circuitfind.benchmark.storage`: opening storage URLs, the SQLite claim lock.
"""

from circuitfind.benchmark.grid import BenchConfig, BenchResult, Cell, bench, load_config
from circuitfind.benchmark.leaderboard import LeaderboardFiles, leaderboard
from circuitfind.benchmark.tune import DEFAULT_STORAGE, TuneResult, create_study, tune

__all__ = ["BenchConfig", "BenchResult", "Cell", "DEFAULT_STORAGE", "LeaderboardFiles",
           "TuneResult", "bench", "create_study", "leaderboard", "load_config", "tune"]
