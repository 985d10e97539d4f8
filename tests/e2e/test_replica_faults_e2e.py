"""Every stateless service replicated on one machine, and one replica killed (SIGKILL) under a
steady load of concurrent requests: only requests in flight on the killed process (or started in
the half second before every caller saw it die) may fail, at most one per client, and they get
an answer (never a hang); requests started 2 s after the kill all succeed; the restarted process
takes traffic again."""

from __future__ import annotations

import argparse
import threading
import time

import grpc
import httpx
import pytest

from fmapi_cli import dev
from fmapi_cli.system import GenerationSpec, System, SystemOptions
from helpers.engine import running_requests, wait_for
from helpers.tiny_llm import LONG_GENERATION, TINY_ENGINE_ENV

EMBED = "all-minilm-l6-v2"
CHAT = "tiny-chat"
CLIENTS = 6
REPLICAS = {"gateway": 2, "auth": 2, "routing": 2, "quota": 2, "embedding": 2}
ENDPOINTS = f"""
endpoints:
  - name: {EMBED}
    task: llm/v1/embeddings
    served_entities: [{{model: {EMBED}}}]
    limits: {{requests_per_minute: 1000000, endpoint: {{requests_per_minute: 1000000}}}}
  - name: {CHAT}
    task: llm/v1/chat
    served_entities: [{{model: tiny}}]
"""
# What shows that a replica serves: a counter of its own that every request (or heartbeat) moves.
TRAFFIC = {
    "gateway": ("fmapi_requests_total", {}),
    "auth": ("fmapi_authz_decisions_total", {}),
    # AdmitMany and SettleMany alternate on a gateway's round-robin channel: count both.
    "quota": ("fmapi_grpc_server_started_total", {"grpc_service": "fmapi.quota.v1.QuotaService"}),
    "routing": ("fmapi_grpc_server_started_total", {"grpc_method": "Heartbeat"}),
    "embedding": ("fmapi_grpc_server_started_total",
                  {"grpc_service": "fmapi.embedding.v1.EmbeddingService"}),
}


@pytest.fixture(scope="module")
def replicated_system(tmp_path_factory, tiny_model):
    tmp = tmp_path_factory.mktemp("replicas")
    (tmp / "endpoints.yaml").write_text(ENDPOINTS)
    system = System(SystemOptions(
        runtime_dir=tmp / "run", http_port=0, replicas=REPLICAS,
        endpoints_file=tmp / "endpoints.yaml",
        generation=[GenerationSpec("tiny", tiny_model, TINY_ENGINE_ENV, replicas=2)]))
    system.start()
    yield system
    system.stop()


class Load:
    """CLIENTS threads, each sending one embeddings request after another through Envoy."""

    def __init__(self, system: System) -> None:
        self.results: list[tuple[float, float, object]] = []  # (start, end, status or exception)
        self.errors: list[str] = []  # what the refused requests were told
        self._stop = threading.Event()
        self._lock = threading.Lock()
        headers = {"authorization": f"Bearer {system.admin_token}"}
        self._threads = [threading.Thread(target=self._run, args=(system.base_url, headers, i))
                         for i in range(CLIENTS)]

    def _run(self, base_url: str, headers: dict, i: int) -> None:
        with httpx.Client(base_url=base_url, headers=headers, timeout=10) as c:
            n = 0
            while not self._stop.is_set():
                n += 1
                t0 = time.monotonic()
                try:
                    r = c.post("/v1/embeddings", json={"model": EMBED, "input": f"client {i} request {n}"})
                    outcome: object = r.status_code
                    if r.status_code != 200:
                        self.errors.append(r.text[:300])
                except httpx.TimeoutException as exc:
                    outcome = exc  # a hang: the test fails on it
                except httpx.HTTPError as exc:
                    outcome = type(exc).__name__  # an answer of sorts: the connection broke
                with self._lock:
                    self.results.append((t0, time.monotonic(), outcome))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(30)
        assert not any(t.is_alive() for t in self._threads), "a client is stuck"


def _traffic(system: System, name: str, service: str) -> float:
    metric, labels = TRAFFIC[service]
    return system.metric(name, metric, **labels)


@pytest.mark.parametrize("victim", ["gateway-2", "auth-2", "quota-2", "routing", "embedding-2"])
def test_killing_a_replica_under_load_fails_only_its_inflight_requests(replicated_system, victim):
    system = replicated_system
    service = victim.split("-")[0]
    try:
        with Load(system) as load:
            time.sleep(3)  # steady state
            killed_at = time.monotonic()
            system.child(victim).proc.kill()  # SIGKILL: no goodbye, connections just break
            time.sleep(6)
    finally:
        # Started again (same ports) whatever happens, for the next test.
        system.restart(victim)
    results = load.results
    assert len(results) > 20, "the load did not run"
    hangs = [r for r in results if isinstance(r[2], httpx.TimeoutException)]
    assert not hangs, f"{len(hangs)} request(s) hung"
    failed = [r for r in results if r[2] != 200]
    for start, end, outcome in failed:
        # Only a request running when the replica died, or started in the moment before every
        # caller saw it die (Envoy's ext_authz calls are not retried), may fail; with an answer.
        assert killed_at - 10 <= start <= killed_at + 0.5, (outcome, start - killed_at, load.errors)
    assert len(failed) <= CLIENTS, (len(failed), load.errors)
    later = [r for r in results if r[0] >= killed_at + 2.0]
    assert later and all(r[2] == 200 for r in later), [r[2] for r in later if r[2] != 200]

    # Started again, it takes traffic again.
    before = _traffic(system, victim, service)
    headers = {"authorization": f"Bearer {system.admin_token}"}
    deadline = time.monotonic() + 20
    with httpx.Client(base_url=system.base_url, headers=headers, timeout=10) as c:
        while _traffic(system, victim, service) <= before:
            assert time.monotonic() < deadline, f"{victim} took no traffic after its restart"
            assert c.post("/v1/embeddings", json={"model": EMBED, "input": "again"}).status_code == 200
            time.sleep(0.1)


def test_replicas_share_the_work(replicated_system):
    system = replicated_system
    before = {n: _traffic(system, n, n.split("-")[0]) for n in ("gateway", "gateway-2", "auth", "auth-2",
                                                              "quota", "quota-2")}
    headers = {"authorization": f"Bearer {system.admin_token}"}
    with httpx.Client(base_url=system.base_url, headers=headers, timeout=10) as c:
        for i in range(40):
            assert c.post("/v1/embeddings", json={"model": EMBED, "input": f"share {i}"}).status_code == 200
    for name, was in before.items():
        assert _traffic(system, name, name.split("-")[0]) > was, f"{name} got none of 40 requests"


def _loaded(system: System, model: str) -> bool:
    try:
        running_requests(system, model)
    except grpc.RpcError:  # UNAVAILABLE while the model loads
        return False
    return True


def _stream(base_url: str, headers: dict, out: list, i: int) -> None:
    """One long chat stream: what its client saw (the events' kinds, and how it ended)."""
    seen = {"chunks": 0, "error": None, "done": False}
    body = {"model": CHAT, "messages": [{"role": "user", "content": f"stream {i}"}],
            "max_tokens": LONG_GENERATION, "ignore_eos": True, "stream": True}
    try:
        with httpx.Client(base_url=base_url, headers=headers, timeout=30) as c, \
                c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    seen["done"] = True
                elif line.startswith("data: ") and '"error"' in line:
                    seen["error"] = line
                elif line.startswith("data: "):
                    seen["chunks"] += 1
    except httpx.TimeoutException as exc:
        seen["error"] = exc  # a hang
    out.append(seen)


def test_killing_a_model_server_ends_only_its_streams_with_an_error_event(replicated_system):
    system = replicated_system
    headers = {"authorization": f"Bearer {system.admin_token}"}
    out: list = []
    threads: list[threading.Thread] = []
    wait_for(lambda: _loaded(system, "tiny") and _loaded(system, "tiny-2"), 180,
             "the second model server never finished loading")
    # Streams start one after another until both model servers run some (the gateway picks a
    # replica on the load the replicas last reported, so a burst may all land on one).
    deadline = time.monotonic() + 30
    while len(threads) < 4 or min(running_requests(system, "tiny"), running_requests(system, "tiny-2")) == 0:
        assert len(threads) < 16 and time.monotonic() < deadline, \
            "the streams never spread over both model servers"
        threads.append(threading.Thread(target=_stream, args=(system.base_url, headers, out, len(threads))))
        threads[-1].start()
        time.sleep(0.3)
    doomed = running_requests(system, "tiny-2")
    system.child("generation-tiny-2").proc.kill()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a stream hung after its model server died"
    errors = [s for s in out if s["error"] is not None]
    # Each stream on the killed server ended with an SSE error event (not a hang, not [DONE]);
    # the others ran to their end.
    assert len(errors) == doomed, out
    assert all(isinstance(s["error"], str) and not s["done"] for s in errors), errors
    assert all(s["done"] for s in out if s["error"] is None)
    # New requests go to the survivor at once.
    with httpx.Client(base_url=system.base_url, headers=headers, timeout=30) as c:
        for i in range(4):
            r = c.post("/v1/chat/completions", json={
                "model": CHAT, "messages": [{"role": "user", "content": f"after {i}"}], "max_tokens": 4})
            assert r.status_code == 200, r.text


def _scale(system: System, spec: str) -> None:
    """``fmapi dev scale SPEC`` against this system, answered as ``fmapi dev up`` answers it."""
    out: dict[str, int] = {}
    ask = threading.Thread(target=lambda: out.setdefault("rc", dev.scale_command(
        argparse.Namespace(replicas=dev.scaled(spec), runtime_dir=str(system.run_dir)))))
    ask.start()
    deadline = time.monotonic() + 120
    while ask.is_alive():
        assert time.monotonic() < deadline, "fmapi dev scale did not finish"
        dev._serve_scale_requests(system)
        time.sleep(0.1)
    assert out["rc"] == 0


def test_gateway_and_auth_replicas_come_and_go_at_run_time_without_a_failed_request(
        replicated_system):
    """Envoy discovers replicas as they come and go (``fmapi dev scale``): a third gateway and
    auth replica started under load get traffic; retired again (out of Envoy's hosts, then
    SIGTERM), no request fails."""
    system = replicated_system
    headers = {"authorization": f"Bearer {system.admin_token}"}
    with Load(system) as load:
        time.sleep(2)
        _scale(system, "gateway=3,auth=3")
        added = {service: system.edge[service][-1] for service in ("gateway", "auth")}
        assert added == {"gateway": "gateway-3", "auth": "auth-3"}
        deadline = time.monotonic() + 10
        with httpx.Client(base_url=system.base_url, headers=headers, timeout=10) as c:
            while not all(_traffic(system, name, service) > 0 for service, name in added.items()):
                assert time.monotonic() < deadline, "a replica added at run time got no traffic"
                assert c.post("/v1/embeddings", json={"model": EMBED, "input": "new"}).status_code == 200
                time.sleep(0.1)
        time.sleep(1)
        procs = {name: system.child(name).proc for name in added.values()}
        _scale(system, "gateway=2,auth=2")
        assert all(proc.poll() is not None for proc in procs.values()), "a retired replica runs"
        time.sleep(2)
    results = load.results
    assert len(results) > 20, "the load did not run"
    assert all(r[2] == 200 for r in results), (
        [r[2] for r in results if r[2] != 200], load.errors)
    assert system.envoy_hosts("gateway_http") == sorted(
        [system.ports["gateway-http"], system.ports["gateway-2-http"]])
