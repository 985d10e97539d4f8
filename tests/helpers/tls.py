"""The tests' private CA: certificates for every identity, and channels that present them.

One CA per test process (made on first use, removed at exit), the same code `fmapi dev up`
uses (:func:`fmapi_common.pki.ensure_pki`). Servers started by tests get :func:`env`; clients
dial with :func:`aio_channel` / :func:`channel` as a chosen identity, verifying the server's.
"""

from __future__ import annotations

import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import grpc

from fmapi_common import pki
from fmapi_common.channels import make_channel
from fmapi_common.tls import TlsFiles


@functools.cache
def pki_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="fmapi-test-pki-"))
    atexit.register(shutil.rmtree, d, True)
    pki.ensure_pki(d)
    return d


def files(identity: str) -> TlsFiles:
    p = pki.paths(pki_dir(), identity)
    return TlsFiles(str(p.ca), str(p.cert), str(p.key))


def env(prefix: str, identity: str) -> dict[str, str]:
    """Settings for a service started with env prefix ``prefix`` (e.g. ``FMAPI_ROUTING_``)."""
    f = files(identity)
    return {f"{prefix}TLS_CA_FILE": f.ca, f"{prefix}TLS_CERT_FILE": f.cert,
            f"{prefix}TLS_KEY_FILE": f.key}


def aio_channel(address: str, identity: str, server: str) -> grpc.aio.Channel:
    """An asyncio channel to ``server`` at ``address``, presenting ``identity``'s certificate."""
    return make_channel(address, files(identity), server)


def channel(address: str, identity: str, server: str) -> grpc.Channel:
    """The same, for the synchronous gRPC API."""
    return grpc.secure_channel(
        address, files(identity).channel_credentials(),
        options=[("grpc.ssl_target_name_override", server)],
    )
