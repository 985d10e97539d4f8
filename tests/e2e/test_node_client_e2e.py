"""The Node client (clients/node) against the session's system: its own tests, run by node's test
runner through Envoy (plaintext h2c, the listener REST uses)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NODE_CLIENT = ROOT / "clients" / "node"


def _missing() -> str | None:
    """What the Node client's test needs and lacks, or None."""
    if shutil.which("node") is None:
        return "node is not on PATH"
    for need in ("node_modules/@grpc/grpc-js", "node_modules/@grpc/proto-loader",
                 "proto/fmapi/inference/v1/inference.proto", "proto/google/rpc/status.proto",
                 "generated/inference.ts"):
        if not (NODE_CLIENT / need).exists():
            return f"{NODE_CLIENT / need} is missing"
    return None


def test_node_client_through_envoy(request):
    missing = _missing()
    if missing:
        pytest.fail(f"the Node client is not ready ({missing}): run `make install` "
                    "(it installs node and npm and generates clients/node)", pytrace=False)
    system = request.getfixturevalue("system")  # started only once the client is known ready
    # Each file passed by name: node >= 21 no longer searches a directory argument.
    tests = sorted(str(p.relative_to(ROOT)) for p in (NODE_CLIENT / "test").glob("*.test.js"))
    assert tests, "no tests in clients/node/test"
    env = {
        **os.environ,
        "FMAPI_GRPC_TARGET": f"127.0.0.1:{system.http_port}",
        "FMAPI_TOKEN": system.admin_token,
        "FMAPI_EMBED_ENDPOINT": "all-minilm-l6-v2",
        "FMAPI_CHAT_ENDPOINT": "tiny-chat",
        "FMAPI_LIMITED_ENDPOINT": "n-limited",
    }
    try:
        proc = subprocess.run(["node", "--test", *tests], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=180)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        pytest.fail(f"node --test ran past 180 s:\n{out}")
    output = proc.stdout + proc.stderr
    print(output)
    assert proc.returncode == 0, f"node --test {' '.join(tests)} failed:\n{output}"
