"""The web console (``console/`` in the repository): static files under ``/console/``.

The page itself needs no token (auth's ext_authz lets ``GET``/``HEAD`` of ``/console`` and
``/console/...`` through, as it does ``/healthz``); every data call the page makes is an ordinary
call of the public REST API with the token the user pasted. Nothing here reads an identity.

Only the files found in the console directory when the gateway starts are served (an
allow-list: no path from a request ever reaches the filesystem, so ``..`` tricks have nothing
to find); their bytes are read per request, so an edited file shows without a restart. Every
answer carries a strict Content-Security-Policy: scripts, styles and fetches from this origin
only, no inline script or style, no ``eval``, string-to-HTML sinks refused (Trusted Types), no
framing, no form submissions.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from fmapi_common.errors import InvalidArgument, NotFound

from .http_common import error_response

log = logging.getLogger(__name__)

PREFIX = "/console"

CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self'",
    "connect-src 'self'",
    "font-src 'self'",
    "manifest-src 'self'",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
    "require-trusted-types-for 'script'",
    "trusted-types 'none'",
])

SECURITY_HEADERS = {
    "content-security-policy": CONTENT_SECURITY_POLICY,
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
    "permissions-policy": "camera=(), microphone=(), geolocation=(), payment=(), usb=()",
    # Revalidated on every load (a deploy shows at once; the files are small).
    "cache-control": "no-cache",
}

CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".webmanifest": "application/manifest+json",
    ".txt": "text/plain; charset=utf-8",
}


def default_directory() -> Path:
    """``console/`` beside the sources (a checkout, or an editable install)."""
    return Path(__file__).resolve().parents[2] / "console"


def index_files(directory: Path) -> dict[str, tuple[Path, str]]:
    """Every servable file under ``directory``: URL path below the prefix -> (file, type)."""
    files: dict[str, tuple[Path, str]] = {}
    if not directory.is_dir():
        return files
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        kind = CONTENT_TYPES.get(path.suffix.lower())
        if kind is None or "node_modules" in rel.parts:
            continue
        files["/" + rel.as_posix()] = (path, kind)
    return files


class ConsoleFiles:
    """Pure ASGI: answers ``/console`` and ``/console/...``; everything else goes to ``app``."""

    def __init__(self, app, directory: str | Path | None = None) -> None:
        self.app = app
        self.directory = Path(directory) if directory else default_directory()
        self.files = index_files(self.directory)
        if not self.files:
            log.warning("no web console: %s has no files to serve", self.directory)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path != PREFIX and not path.startswith(PREFIX + "/"):
            return await self.app(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD"):
            resp = error_response(InvalidArgument(f"method {scope['method']} is not allowed on "
                                                  f"{path}"))
            resp.status_code = 405
            resp.headers["allow"] = "GET, HEAD"
            return await resp(scope, receive, send)
        if path == PREFIX:
            # Relative: no Location built from the client's Host header.
            return await _send(send, 308, {"location": PREFIX + "/", "content-length": "0"}, b"")
        rel = path[len(PREFIX):]
        if rel == "/":
            rel = "/index.html"
        entry = self.files.get(rel)
        body = None
        if entry is not None:
            try:
                body = entry[0].read_bytes()
            except OSError:
                body = None
        if body is None:
            what = "the web console is not installed here" if not self.files else \
                f"no console file {path}"
            return await error_response(NotFound(what))(scope, receive, send)
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        headers = {**SECURITY_HEADERS, "etag": etag}
        if _header(scope, b"if-none-match") == etag:
            return await _send(send, 304, headers, b"")
        headers["content-type"] = entry[1]
        headers["content-length"] = str(len(body))
        return await _send(send, 200, headers, b"" if scope["method"] == "HEAD" else body)


def _header(scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", []):
        if k.lower() == name:
            return v.decode("latin-1")
    return None


async def _send(send, status: int, headers: dict[str, str], body: bytes) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()]})
    await send({"type": "http.response.body", "body": body})
