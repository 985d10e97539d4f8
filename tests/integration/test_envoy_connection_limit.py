"""Envoy's limit on client connections (its overload manager), as fmapi's config sets it: past
the limit a new connection is closed at once, and those already open keep being served."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import yaml

from helpers.redis_server import free_port
from unit.test_k8s_manifests import system_envoy_config

LIMIT = 2


def _get(conn: socket.socket) -> bytes:
    """One keep-alive GET on ``conn``: the response's first bytes, b"" when Envoy closed it."""
    try:
        conn.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        return conn.recv(4096)
    except OSError:  # reset
        return b""


def test_connections_past_the_limit_are_closed_and_the_open_ones_keep_working(tmp_path):
    monitors = system_envoy_config()["overload_manager"]["resource_monitors"]
    (limit,) = [m for m in monitors
                if m["name"] == "envoy.resource_monitors.global_downstream_max_connections"]
    assert limit["typed_config"]["max_active_downstream_connections"] > 1000  # the shipped one
    limit["typed_config"]["max_active_downstream_connections"] = LIMIT  # small enough to reach
    port = free_port()
    cfg = {
        "overload_manager": {"resource_monitors": [limit]},
        "static_resources": {"listeners": [{
            "name": "public",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network."
                             "http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "t",
                    "route_config": {"virtual_hosts": [{"name": "x", "domains": ["*"], "routes": [
                        {"match": {"prefix": "/"},
                         "direct_response": {"status": 200, "body": {"inline_string": "ok"}}}]}]},
                    "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3."
                                 "Router"}}],
                }}]}],
        }]},
    }
    (tmp_path / "envoy.yaml").write_text(yaml.safe_dump(cfg))
    envoy = Path(sys.executable).parent / "envoy"
    proc = subprocess.Popen([str(envoy), "-c", str(tmp_path / "envoy.yaml"), "--disable-hot-restart",
                             "--log-level", "warn", "--log-path", str(tmp_path / "envoy.log")])
    held: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                probe = socket.create_connection(("127.0.0.1", port), timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, "envoy did not start"
                time.sleep(0.1)
        held.append(probe)
        held.append(socket.create_connection(("127.0.0.1", port), timeout=2))
        for conn in held:
            assert _get(conn).startswith(b"HTTP/1.1 200")
        extra = socket.create_connection(("127.0.0.1", port), timeout=2)  # the kernel accepts it
        assert _get(extra) == b"", "a connection past the limit was served"
        extra.close()
        for conn in held:  # the open ones are unaffected
            assert _get(conn).startswith(b"HTTP/1.1 200")
        held.pop().close()
        time.sleep(0.2)
        again = socket.create_connection(("127.0.0.1", port), timeout=2)
        held.append(again)
        assert _get(again).startswith(b"HTTP/1.1 200")  # room again once one closed
    finally:
        for conn in held:
            conn.close()
        proc.terminate()
        proc.wait(10)
