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


def test_concurrent_streams_add_up_every_token(monkeypatch):
    """The observability benchmark's generation rate is the tokens of all streams: with many
    clients, each stream's count must add to the total, none overwritten by another's."""
    import asyncio

    import bench.common as common

    async def stream_tokens(client, body):
        await asyncio.sleep(0.001)
        return body["max_tokens"]

    monkeypatch.setattr(common, "stream_tokens", stream_tokens)
    total = asyncio.run(common.stream_total("http://127.0.0.1:9", {}, "m", n=40, clients=8,
                                            max_tokens=5))
    assert total == 40 * 5
