"""Registries: lookups with dashes, suggestions, no shadowing of built-ins."""

from __future__ import annotations

import pytest

import circuitfind as cf
from circuitfind.errors import ConfigError, UnknownNameError
from circuitfind.registry import Registry


def test_builtin_names():
    assert {"ioi", "greater_than", "induction", "gendered_pronoun"} <= set(cf.TASKS.names())
    assert {"eap", "exact"} <= set(cf.ALGORITHMS.names())
    assert cf.TASKS.get("greater-than") is cf.TASKS.get("greater_than")


def test_unknown_name_suggests_closest():
    with pytest.raises(UnknownNameError, match="Did you mean 'ioi'") as err:
        cf.get_task("ioj")
    assert "gendered_pronoun" in str(err.value)
    with pytest.raises(UnknownNameError, match="Did you mean 'eap'"):
        cf.get_algorithm("eapp")


def test_registry_rules():
    reg: Registry[int] = Registry("thing")
    reg.register("a_b")(1)
    with pytest.raises(ConfigError):
        reg.register("a-b")(2)
    with pytest.raises(ConfigError):
        reg.register("has space!")(3)


def test_algorithm_params_are_readable_and_checked():
    algo = cf.get_algorithm("exact", masks_per_pass=8)
    assert algo.get_params()["masks_per_pass"] == 8
    with pytest.raises(ConfigError, match="no parameter"):
        cf.get_algorithm("eap", steps=3)
    with pytest.raises(ConfigError, match="batch_size"):
        cf.get_algorithm("eap", batch_size=0)
