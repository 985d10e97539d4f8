"""`fmapi tokens create|list|revoke`: manage API tokens through the REST management API.

Talks to a running system (Envoy's public port) with an admin token, using the Databricks token
API paths, so the same calls work with ``curl``:

    POST /api/2.0/token/create  {"comment", "lifetime_seconds", + fmapi's optional
                                 "principal", "principal_kind", "workspace", "endpoints", "admin"}
                                -> {"token_value": "fmapi_...", "token_info": {...}}
    GET  /api/2.0/token/list    -> {"token_infos": [{...}, ...]}
    POST /api/2.0/token/delete  {"token_id"} -> {}

``create`` prints the new secret alone on stdout (once: it cannot be shown again), so
``TOKEN=$(fmapi tokens create ...)`` works; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

DEFAULT_URL = "http://127.0.0.1:8080"
DEV_TOKEN_FILE = Path(".fmapi") / "dev-token"
# `make run` writes the dev token under the checkout, wherever the CLI is run from.
REPO_DEV_TOKEN_FILE = Path(__file__).resolve().parents[2] / DEV_TOKEN_FILE


def common_options() -> argparse.ArgumentParser:
    """--url, --token and --timeout: every CLI command that calls the REST API takes them."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url",
        default=os.environ.get("FMAPI_URL", DEFAULT_URL),
        help=f"fmapi base URL (env FMAPI_URL, default {DEFAULT_URL})",
    )
    common.add_argument(
        "--token",
        default=None,
        help=f"API token (env FMAPI_TOKEN, default: the contents of {DEV_TOKEN_FILE})",
    )
    common.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout in seconds")
    return common


def add_parser(subparsers) -> None:
    common = common_options()

    tokens = subparsers.add_parser("tokens", help="create, list and revoke API tokens")
    sub = tokens.add_subparsers(dest="tokens_command", required=True)

    create = sub.add_parser(
        "create", parents=[common], help="create a token and print its secret (shown once)"
    )
    create.add_argument("--comment", default="", help="what the token is for")
    create.add_argument(
        "--lifetime-seconds", type=int, default=0, help="expire after this long (0: never)"
    )
    create.add_argument(
        "--principal", help="owner (user name or service principal id; default: you)"
    )
    create.add_argument(
        "--service-principal",
        action="store_true",
        help="the owner is a service principal, not a user",
    )
    create.add_argument("--workspace", help="owner's workspace (default: yours)")
    create.add_argument(
        "--endpoint",
        dest="endpoints",
        action="append",
        metavar="NAME_OR_GLOB",
        help="endpoint the token may query; repeat for more; globs like 'chat-*' "
        "(default: the same endpoints as your token)",
    )
    create.add_argument(
        "--admin", action="store_true", help="the token may manage tokens and endpoints"
    )
    create.add_argument("--json", action="store_true", help="print the whole JSON response")
    create.set_defaults(func=create_command)

    lst = sub.add_parser("list", parents=[common], help="list tokens (metadata only)")
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(func=list_command)

    revoke = sub.add_parser("revoke", parents=[common], help="revoke a token at once")
    revoke.add_argument("token_id", help="the token's id (see `fmapi tokens list`)")
    revoke.set_defaults(func=revoke_command)


# ---------------------------------------------------------------- HTTP


class CliError(Exception):
    pass


class UsageError(CliError):
    """A mistake in the command line or an input file: exit status 2, nothing sent."""


def resolve_token(explicit: str | None) -> str:
    if explicit:
        return explicit.strip()
    env = os.environ.get("FMAPI_TOKEN")
    if env:
        return env.strip()
    for path in (DEV_TOKEN_FILE, REPO_DEV_TOKEN_FILE):
        if path.is_file():
            return path.read_text().strip()
    raise CliError(
        f"no API token: pass --token, set FMAPI_TOKEN, or run `make run` (writes {DEV_TOKEN_FILE})"
    )


def request(args, method: str, path: str, body: dict | None = None) -> dict:
    import httpx

    token = resolve_token(args.token)
    url = args.url.rstrip("/") + path
    try:
        r = httpx.request(
            method,
            url,
            json=body,
            headers={"authorization": f"Bearer {token}", "accept": "application/json"},
            timeout=args.timeout,
        )
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach {args.url}: {exc}") from None
    try:
        data = r.json()
    except ValueError:
        data = None
    if r.status_code >= 400:
        msg = None
        if isinstance(data, dict):
            err = data.get("error")
            msg = data.get("message") or (err.get("message") if isinstance(err, dict) else None)
        raise CliError(f"{method} {path} failed ({r.status_code}): {msg or r.text.strip()[:500]}")
    if not isinstance(data, dict):
        raise CliError(f"{method} {path}: unexpected response: {r.text.strip()[:500]}")
    return data


def _when(ms) -> str:
    if ms is None or ms == -1 or ms == 0:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(ms / 1000))


# ---------------------------------------------------------------- commands


def run_command(fn, args, prog: str) -> int:
    """``fn(args)``'s exit status; a refused or failed call is 1, a usage error 2."""
    try:
        return fn(args)
    except UsageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except CliError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1


def _run(fn, args) -> int:
    return run_command(fn, args, "fmapi tokens")


def table(rows: list[tuple[str, ...]], indent: str = "") -> None:
    """Columns aligned, the first row a header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def create_command(args) -> int:
    def go(args) -> int:
        body: dict = {"comment": args.comment}
        if args.lifetime_seconds:
            body["lifetime_seconds"] = args.lifetime_seconds
        if args.principal:
            body["principal"] = args.principal
        if args.service_principal:
            body["principal_kind"] = "service_principal"
        if args.workspace:
            body["workspace"] = args.workspace
        if args.endpoints is not None:
            body["endpoints"] = args.endpoints
        if args.admin:
            body["admin"] = True
        data = request(args, "POST", "/api/2.0/token/create", body)
        secret = data.get("token_value")
        if not secret:
            raise CliError("the response carries no token_value")
        if args.json:
            print(json.dumps(data, indent=2))
        else:
            info = data.get("token_info") or {}
            print(
                f"created token {info.get('token_id', '?')} "
                f"(expires {_when(info.get('expiry_time'))}); "
                "its secret is printed below and cannot be shown again:",
                file=sys.stderr,
            )
            print(secret)
        return 0

    return _run(go, args)


def list_command(args) -> int:
    def go(args) -> int:
        data = request(args, "GET", "/api/2.0/token/list")
        infos = data.get("token_infos") or []
        if args.json:
            print(json.dumps(infos, indent=2))
            return 0
        rows = [("TOKEN ID", "COMMENT", "PRINCIPAL", "ENDPOINTS", "ADMIN", "CREATED",
                 "EXPIRES", "LAST USED")]
        for t in infos:
            rows.append(
                (
                    str(t.get("token_id", "")),
                    str(t.get("comment", "")),
                    str(t.get("principal", "")),
                    ",".join(t.get("endpoints") or []) or "-",
                    "yes" if t.get("admin") else "no",
                    _when(t.get("creation_time")),
                    _when(t.get("expiry_time")),
                    _when(t.get("last_used_time")),
                )
            )
        table(rows)
        return 0

    return _run(go, args)


def revoke_command(args) -> int:
    def go(args) -> int:
        request(args, "POST", "/api/2.0/token/delete", {"token_id": args.token_id})
        print(f"revoked token {args.token_id}", file=sys.stderr)
        return 0

    return _run(go, args)
