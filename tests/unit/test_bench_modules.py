"""`make bench` runs every benchmark module in turn: one that no longer imports (a helper it
used was renamed) stops the whole run at that point, and the benchmarks after it never run."""

from __future__ import annotations

import importlib

import pytest

from bench.__main__ import BENCHES, ON_REQUEST, main


@pytest.mark.parametrize("name", BENCHES + ON_REQUEST)
def test_every_benchmark_make_bench_runs_imports_and_has_a_run(name):
    module = importlib.import_module(f"bench.{name}")
    assert callable(module.run)


def test_an_unknown_benchmark_is_refused_with_the_list_of_known_ones(capsys):
    assert main(["nope"]) == 2
    assert "observability" in capsys.readouterr().err
