"""The dynamic batcher: merging, ordering, isolation of failures, cancellation, bounds."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from fmapi_embedding.batcher import DynamicBatcher


class Recorder:
    """A batch function that records the batches it saw and can be told to fail or stall."""

    def __init__(self, delay: float = 0.0, poison: str | None = None) -> None:
        self.batches: list[list[str]] = []
        self.delay = delay
        self.poison = poison
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, items: list[str]) -> list[str]:
        self.gate.wait(5)
        self.batches.append(list(items))
        if self.delay:
            time.sleep(self.delay)
        if self.poison and self.poison in items:
            raise ValueError(f"cannot process {self.poison}")
        return [f"out:{x}" for x in items]


@pytest.fixture
def executor():
    ex = ThreadPoolExecutor(max_workers=1)
    yield ex
    ex.shutdown(wait=False)


async def test_concurrent_requests_are_merged_and_each_gets_its_own_results(executor):
    rec = Recorder()
    b = DynamicBatcher(rec, executor=executor, max_batch_size=64, max_batch_tokens=10_000, max_wait=0.05)
    reqs = [[f"r{i}-a", f"r{i}-b"] for i in range(10)]
    results = await asyncio.gather(*(b.submit(r, tokens=2) for r in reqs))
    for req, res in zip(reqs, results):
        assert res == [f"out:{x}" for x in req]
    assert len(rec.batches) < 10  # merged, not one batch per request
    await b.close()


async def test_a_request_is_never_split_across_batches(executor):
    rec = Recorder()
    b = DynamicBatcher(rec, executor=executor, max_batch_size=4, max_batch_tokens=10_000, max_wait=0.05)
    reqs = [[f"r{i}-{j}" for j in range(3)] for i in range(5)]
    results = await asyncio.gather(*(b.submit(r, tokens=3) for r in reqs))
    assert results == [[f"out:{x}" for x in r] for r in reqs]
    for batch in rec.batches:
        assert len(batch) <= 4
        owners = [x.split("-")[0] for x in batch]
        for owner in set(owners):  # all three items of a request travel together
            assert owners.count(owner) == 3
    await b.close()


async def test_oversized_request_runs_alone(executor):
    rec = Recorder()
    b = DynamicBatcher(rec, executor=executor, max_batch_size=2, max_batch_tokens=10_000, max_wait=0.01)
    big = [f"x{i}" for i in range(5)]
    assert await b.submit(big, tokens=5) == [f"out:{x}" for x in big]
    assert rec.batches == [big]
    await b.close()


async def test_token_budget_bounds_a_batch(executor):
    rec = Recorder()
    rec.gate.clear()  # hold the first batch so the rest queue up together
    b = DynamicBatcher(rec, executor=executor, max_batch_size=100, max_batch_tokens=100, max_wait=0.0)
    first = asyncio.create_task(b.submit(["first"], tokens=1))
    await asyncio.sleep(0.05)
    rest = [asyncio.create_task(b.submit([f"t{i}"], tokens=40)) for i in range(5)]
    await asyncio.sleep(0.05)
    rec.gate.set()
    await asyncio.gather(first, *rest)
    later = rec.batches[1:]
    assert sum(len(x) for x in later) == 5
    assert all(len(batch) * 40 <= 100 for batch in later)  # at most two 40-token requests
    assert max(len(batch) for batch in later) == 2
    await b.close()


async def test_a_failing_request_does_not_fail_its_batch_mates(executor):
    rec = Recorder(poison="bad")
    b = DynamicBatcher(rec, executor=executor, max_batch_size=64, max_batch_tokens=10_000, max_wait=0.05)
    good1 = b.submit(["g1"], tokens=1)
    bad = b.submit(["bad"], tokens=1)
    good2 = b.submit(["g2", "g3"], tokens=2)
    r1, rbad, r2 = await asyncio.gather(good1, bad, good2, return_exceptions=True)
    assert r1 == ["out:g1"]
    assert r2 == ["out:g2", "out:g3"]
    assert isinstance(rbad, ValueError) and "bad" in str(rbad)
    assert ["g1", "bad", "g2", "g3"] in rec.batches  # they really were batched together first
    # and the batcher keeps serving
    assert await b.submit(["after"], tokens=1) == ["out:after"]
    await b.close()


async def test_cancelled_request_leaves_the_queue_and_others_complete(executor):
    rec = Recorder()
    rec.gate.clear()
    b = DynamicBatcher(rec, executor=executor, max_batch_size=1, max_batch_tokens=10_000, max_wait=0.0)
    running = asyncio.create_task(b.submit(["running"], tokens=1))
    await asyncio.sleep(0.05)
    doomed = asyncio.create_task(b.submit(["doomed"], tokens=1))
    survivor = asyncio.create_task(b.submit(["survivor"], tokens=1))
    await asyncio.sleep(0.05)
    doomed.cancel()
    rec.gate.set()
    assert await running == ["out:running"]
    assert await survivor == ["out:survivor"]
    with pytest.raises(asyncio.CancelledError):
        await doomed
    assert ["doomed"] not in rec.batches  # never computed
    assert b.inflight == 0
    await b.close()


async def test_a_lone_request_on_an_idle_batcher_starts_at_once(executor):
    """Nothing runs: waiting for company would only add to its latency."""
    rec = Recorder()
    b = DynamicBatcher(rec, executor=executor, max_batch_size=64, max_batch_tokens=10_000, max_wait=1.0)
    t0 = time.monotonic()
    assert await b.submit(["alone"], tokens=1) == ["out:alone"]
    assert time.monotonic() - t0 < 0.5  # not the 1 s wait for company
    await b.close()


async def test_while_a_batch_runs_the_next_waits_for_company_and_stops_when_nothing_runs():
    """Two lanes: with one busy, requests that arrive apart still share the second lane's
    batch (it waits up to max_wait); once the running batch ends, a waiting batch starts at
    once rather than wait out the rest of its max_wait."""
    release = threading.Event()
    seen: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        seen.append(list(items))
        if items == ["long"]:
            release.wait(5)
        return [f"out:{x}" for x in items]

    ex = ThreadPoolExecutor(max_workers=2)
    b = DynamicBatcher(run, executor=ex, max_batch_size=64, max_batch_tokens=10_000,
                       max_wait=0.4, lanes=2)
    try:
        long = asyncio.ensure_future(b.submit(["long"], tokens=1))
        while not seen:
            await asyncio.sleep(0.01)
        first = asyncio.ensure_future(b.submit(["a"], tokens=1))
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(b.submit(["b"], tokens=1))
        assert await asyncio.wait_for(asyncio.gather(first, second), 5) == [["out:a"], ["out:b"]]
        assert seen[1] == ["a", "b"]  # waited for company while "long" ran
        late = asyncio.ensure_future(b.submit(["c"], tokens=1))
        await asyncio.sleep(0.05)
        t0 = time.monotonic()
        release.set()  # "long" ends: nothing runs any more, so "c" stops waiting
        assert await asyncio.wait_for(late, 5) == ["out:c"]
        assert time.monotonic() - t0 < 0.3, "waited out max_wait with nothing running"
        assert await long == ["out:long"]
    finally:
        release.set()
        await b.close()
        ex.shutdown(wait=False)


def test_bounds_are_validated():
    with pytest.raises(ValueError):
        DynamicBatcher(lambda x: x, executor=None, max_batch_size=0)


async def test_a_gated_request_joins_no_batch_before_its_gate_opens(executor):
    rec = Recorder()
    b = DynamicBatcher(rec, executor=executor, max_batch_size=64, max_batch_tokens=10_000, max_wait=0.01)
    gate = asyncio.get_running_loop().create_future()
    gated = asyncio.create_task(b.submit(["admitted-later"], tokens=1, gate=gate))
    await asyncio.sleep(0)
    # A request without a gate, behind it in the queue, does not wait for it.
    assert await asyncio.wait_for(b.submit(["free"], tokens=1), 2) == ["out:free"]
    await asyncio.sleep(0.05)
    assert rec.batches == [["free"]] and not gated.done()
    gate.set_result("admitted")
    assert await asyncio.wait_for(gated, 2) == ["out:admitted-later"]
    assert rec.batches == [["free"], ["admitted-later"]]
    await b.close()


async def test_a_gate_that_fails_fails_its_request_and_nothing_runs(executor):
    rec = Recorder()
    b = DynamicBatcher(rec, executor=executor, max_batch_size=64, max_batch_tokens=10_000, max_wait=0.01)
    gate = asyncio.get_running_loop().create_future()
    refused = asyncio.create_task(b.submit(["over-the-limit"], tokens=1, gate=gate))
    await asyncio.sleep(0.03)
    gate.set_exception(PermissionError("rate limit exceeded"))
    with pytest.raises(PermissionError, match="rate limit"):
        await asyncio.wait_for(refused, 2)
    assert await b.submit(["next"], tokens=1) == ["out:next"]  # and the batcher keeps serving
    assert rec.batches == [["next"]]
    await b.close()


async def test_a_gated_request_on_an_idle_batcher_starts_as_soon_as_its_gate_opens(executor):
    rec = Recorder()
    wait, admission = 1.0, 0.25
    b = DynamicBatcher(rec, executor=executor, max_batch_size=64, max_batch_tokens=10_000, max_wait=wait)

    async def admitted_after(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "admitted"

    t0 = time.monotonic()
    gated = await b.submit(["gated"], tokens=1, gate=asyncio.ensure_future(admitted_after(admission)))
    took = time.monotonic() - t0
    assert gated == ["out:gated"]
    # Not before its admission; and not the wait for company on top of it.
    assert admission <= took < admission + wait / 2, took
    await b.close()


async def test_a_failed_gate_never_reads_as_open_even_before_its_callbacks_run():
    # A gate (an admission task) that failed reads done at once; the callback that fails its
    # request runs later. Until then the request must not look free to join a batch.
    from fmapi_embedding.batcher import _Pending

    loop = asyncio.get_running_loop()
    for fail in (lambda g: g.set_exception(PermissionError("refused")), lambda g: g.cancel()):
        gate = loop.create_future()
        pending = _Pending(["x"], 1, loop.create_future(), gate=gate)
        gate.add_done_callback(lambda g: None)
        fail(gate)
        assert gate.done() and not pending.ready()
    opened = loop.create_future()
    opened.set_result("admitted")
    assert _Pending(["x"], 1, loop.create_future(), gate=opened).ready()


async def test_lanes_run_batches_side_by_side_and_a_busy_machine_queues_the_rest():
    """Two lanes: a second batch starts while the first still runs (both batch functions meet
    at a barrier, which one lane could never pass); later requests start only when a lane is
    free, and all complete."""
    both_running = threading.Barrier(2, timeout=5)
    release = threading.Event()
    seen: list[list[str]] = []

    def run(items: list[str]) -> list[str]:
        seen.append(list(items))
        if len(seen) <= 2:
            both_running.wait()  # raises BrokenBarrierError unless two batches run at once
            release.wait(5)
        return [f"out:{x}" for x in items]

    ex = ThreadPoolExecutor(max_workers=2)
    b = DynamicBatcher(run, executor=ex, max_batch_size=1, max_batch_tokens=100, max_wait=0, lanes=2)
    try:
        first = [asyncio.ensure_future(b.submit([f"r{i}"], tokens=1)) for i in range(2)]
        deadline = time.monotonic() + 10
        while len(seen) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        late = [asyncio.ensure_future(b.submit([f"late{i}"], tokens=1)) for i in range(3)]
        await asyncio.sleep(0.1)
        assert len(seen) == 2  # both lanes busy: nothing else started
        release.set()
        assert await asyncio.gather(*first) == [["out:r0"], ["out:r1"]]
        assert await asyncio.gather(*late) == [["out:late0"], ["out:late1"], ["out:late2"]]
        assert len(seen) == 5
    finally:
        release.set()
        await b.close()
        ex.shutdown(wait=False)


def test_lanes_are_validated():
    with pytest.raises(ValueError):
        DynamicBatcher(lambda items: items, executor=None, lanes=0)


async def test_busy_while_every_lane_runs_and_a_lane_that_ends_with_nothing_ready_says_so():
    """``busy`` reads true only while both lanes run a batch. A lane that ends its batch while a
    ready request waits takes it (no call to ``on_idle_lane``); one that ends with only gated
    requests waiting (their admissions not back yet) calls ``on_idle_lane``."""
    release = {"slow0": threading.Event(), "slow1": threading.Event()}
    started: list[str] = []

    def run(items: list[str]) -> list[str]:
        started.append(items[0])
        if items[0] in release:
            release[items[0]].wait(5)
        return [f"out:{x}" for x in items]

    async def until(cond) -> None:
        deadline = time.monotonic() + 10
        while not cond() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    ex = ThreadPoolExecutor(max_workers=2)
    b = DynamicBatcher(run, executor=ex, max_batch_size=1, max_batch_tokens=100, max_wait=0, lanes=2)
    idle: list[list[str]] = []
    b.on_idle_lane = lambda: idle.append(list(started))
    try:
        assert not b.busy
        slow = [asyncio.ensure_future(b.submit([name], tokens=1)) for name in release]
        await until(lambda: len(started) == 2)
        assert b.busy  # both lanes run
        ready = asyncio.ensure_future(b.submit(["ready"], tokens=1))
        gate = asyncio.get_running_loop().create_future()
        gated = asyncio.ensure_future(b.submit(["gated"], tokens=1, gate=gate))
        await asyncio.sleep(0.05)
        release["slow0"].set()  # "ready" waits: this lane takes it, nothing to report
        assert await asyncio.wait_for(asyncio.gather(slow[0], ready), 5) == [
            ["out:slow0"], ["out:ready"]]
        await until(lambda: idle)
        # The lane that ran "ready" ended with only the gated request waiting.
        assert idle == [["slow0", "slow1", "ready"]]
        assert b.busy is False  # one lane still runs slow1
        release["slow1"].set()
        await asyncio.wait_for(slow[1], 5)
        await until(lambda: len(idle) == 2)
        assert len(idle) == 2  # and so did slow1's
        gate.set_result("admitted")
        assert await asyncio.wait_for(gated, 5) == ["out:gated"]
    finally:
        for e in release.values():
            e.set()
        await b.close()
        ex.shutdown(wait=False)


async def test_an_admission_waits_for_company_only_while_every_lane_is_busy():
    """The embedding server's admission of a request: at once while a lane is free (a lone
    request must not wait), with the server's linger while both lanes run (it cannot start
    sooner anyway)."""
    from types import SimpleNamespace

    from fmapi_embedding.model import Tokens
    from fmapi_embedding.service import EmbedOptions, Embedder

    release = threading.Event()

    def run(items):
        if items[0].ids == [0]:  # the batches that keep the lanes busy
            release.wait(5)
        return [[float(len(t.ids)), 1.0] for t in items]

    ex = ThreadPoolExecutor(max_workers=2)
    batcher = DynamicBatcher(run, executor=ex, max_batch_size=1, max_batch_tokens=100,
                             max_wait=0, lanes=2)
    hosted = SimpleNamespace(batcher=batcher)

    class Stubbed(Embedder):
        async def _prepare(self, model, inputs, opts):
            return hosted, [Tokens(ids=list(range(len(x))), type_ids=[], count=len(x))
                            for x in inputs]

    embedder = Stubbed({}, max_inputs=8, admit_linger=0.02)
    lingers: list[float] = []

    async def admit(input_tokens, reserved_output_tokens, *, linger=0.0):
        lingers.append(linger)
        return f"admitted {input_tokens}"

    try:
        got = await embedder.embed("m", ["abc"], EmbedOptions(normalize=False), admit)
        assert (got.admission, lingers) == ("admitted 3", [0.0])  # lanes free: at once
        busy = [asyncio.ensure_future(batcher.submit([Tokens([0], [], 1)], 1)) for _ in range(2)]
        deadline = time.monotonic() + 10
        while not batcher.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        waiting = asyncio.ensure_future(embedder.embed("m", ["ab"], EmbedOptions(), admit))
        await asyncio.sleep(0.05)
        assert lingers == [0.0, 0.02]  # both lanes busy: it may wait for company
        release.set()
        assert (await asyncio.wait_for(waiting, 5)).admission == "admitted 2"
        await asyncio.gather(*busy)
    finally:
        release.set()
        await batcher.close()
        ex.shutdown(wait=False)
