"""Studies over algorithms and settings: threshold searches as Optuna studies (distributed)."""

from circuitfind.benchmark.tune import DEFAULT_STORAGE, TuneResult, create_study, tune

__all__ = ["DEFAULT_STORAGE", "TuneResult", "create_study", "tune"]
