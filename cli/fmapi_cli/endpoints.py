"""`fmapi endpoints list|get|apply|delete|limits`: manage serving endpoints through the REST API.

Talks to a running system (Envoy's public port) with an admin token, over the Databricks
serving-endpoint paths plus fmapi's declarative apply, so the same calls work with ``curl``:

    GET    /api/2.0/serving-endpoints                  -> {"endpoints": [{...}, ...]}
    GET    /api/2.0/serving-endpoints/NAME             -> {...}
    DELETE /api/2.0/serving-endpoints/NAME             -> {}
    PUT    /api/2.0/serving-endpoints/NAME/ai-gateway  {ai_gateway} -> {ai_gateway}
    POST   /api/2.0/fmapi/endpoints/apply              {"endpoints": [...], "prune": bool}
           -> {"created", "updated", "unchanged", "deleted": [names], "version": int}

``apply`` takes a file shaped like ``infra/endpoints/dev.yaml`` and sends only its
``endpoints`` list. ``limits set`` reads the endpoint's ``ai_gateway`` object, changes one
rate-limit entry (identified by key and principal) and writes the whole object back.

Exit status: 0 on success, 1 when the server refuses or cannot be reached, 2 for a usage error
(a bad file, contradictory options); nothing is sent on a usage error.
"""

from __future__ import annotations

import argparse
import json
from urllib.parse import quote, urlencode

from .tokens import CliError, UsageError, _when, common_options, run_command, table
from .tokens import request as _request

_LIST = "/api/2.0/serving-endpoints"
_APPLY = "/api/2.0/fmapi/endpoints/apply"
_LIMIT_KEYS = ("endpoint", "user", "service_principal")
# (field, table header, unit in the one-line summary)
_DIMENSIONS = (
    ("calls", "REQUESTS/MIN", "req"),
    ("tokens", "TOKENS/MIN", "tok"),
    ("input_tokens", "INPUT TOKENS/MIN", "in-tok"),
    ("output_tokens", "OUTPUT TOKENS/MIN", "out-tok"),
)
_APPLY_ORDER = ("created", "updated", "unchanged", "deleted")


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (unlimited) or more, not {value}")
    return value


def add_parser(subparsers) -> None:
    common = common_options()
    endpoints = subparsers.add_parser("endpoints", help="list, inspect, apply and delete endpoints")
    sub = endpoints.add_subparsers(dest="endpoints_command", required=True)

    lst = sub.add_parser("list", parents=[common], help="list serving endpoints")
    lst.add_argument("--json", action="store_true", help="print the JSON response")
    lst.set_defaults(func=list_command)

    get = sub.add_parser("get", parents=[common], help="describe one endpoint")
    get.add_argument("name", help="endpoint name")
    get.add_argument("--json", action="store_true", help="print the JSON response")
    get.set_defaults(func=get_command)

    apply = sub.add_parser(
        "apply", parents=[common], help="create or update endpoints from a YAML file"
    )
    apply.add_argument(
        "-f", "--file", required=True, help="YAML file with a top-level 'endpoints' list"
    )
    apply.add_argument(
        "--prune", action="store_true", help="also delete endpoints the file does not name"
    )
    apply.set_defaults(func=apply_command)

    delete = sub.add_parser("delete", parents=[common], help="delete an endpoint")
    delete.add_argument("name", help="endpoint name")
    delete.set_defaults(func=delete_command)

    payloads = sub.add_parser("payloads", parents=[common],
                              help="show an endpoint's inference table (admins)")
    payloads.add_argument("name", help="endpoint name")
    payloads.add_argument("--since", default="1d", help="ISO-8601 time or 30m, 12h, 7d (default 1d)")
    payloads.add_argument("--limit", type=int, default=20, help="rows, newest first (default 20)")
    payloads.add_argument("--json", action="store_true", help="print the raw JSON")
    payloads.set_defaults(func=payloads_command)

    limits = sub.add_parser("limits", help="show or change an endpoint's rate limits")
    lsub = limits.add_subparsers(dest="limits_command", required=True)
    show = lsub.add_parser("show", parents=[common], help="print an endpoint's rate limits")
    show.add_argument("name", help="endpoint name")
    show.set_defaults(func=limits_show_command)

    set_ = lsub.add_parser(
        "set",
        parents=[common],
        help="add, replace or remove one rate limit",
        description="Add or replace the rate limit for (--key, --principal); the entry is "
        "replaced as a whole, so a dimension left out becomes unlimited. 0 means unlimited. "
        "Without --principal the limit applies to every principal of that key.",
    )
    set_.add_argument("name", help="endpoint name")
    set_.add_argument("--key", required=True, choices=_LIMIT_KEYS, help="what the limit counts")
    set_.add_argument(
        "--principal", help="one user or service principal (default: each of them)"
    )
    for flag, what in (
        ("--calls", "requests per minute"),
        ("--tokens", "tokens (input + output) per minute"),
        ("--input-tokens", "input tokens per minute"),
        ("--output-tokens", "output tokens per minute"),
    ):
        set_.add_argument(flag, type=_non_negative, metavar="N", help=what)
    set_.add_argument("--remove", action="store_true", help="remove the limit instead")
    set_.set_defaults(func=limits_set_command)


# ---------------------------------------------------------------- rendering


def _table(rows: list[tuple[str, ...]], indent: str = "") -> None:
    table(rows, indent)


def _ai_gateway(ep: dict) -> dict:
    gw = ep.get("ai_gateway")
    return gw if isinstance(gw, dict) else {}


def _rate_limits(gw: dict) -> list[dict]:
    return [r for r in gw.get("rate_limits") or [] if isinstance(r, dict)]


def _principal(limit: dict) -> str | None:
    return limit.get("principal") or None


def _period(limit: dict) -> str:
    period = limit.get("renewal_period") or "minute"
    return "min" if period == "minute" else period


def _limits_summary(gw: dict) -> str:
    parts = []
    for r in _rate_limits(gw):
        who = str(r.get("key", "?"))
        if _principal(r):
            who += f"={_principal(r)}"
        dims = [f"{r[f]} {unit}/{_period(r)}" for f, _, unit in _DIMENSIONS if r.get(f)]
        parts.append(f"{who} {' '.join(dims) if dims else 'unlimited'}")
    return ", ".join(parts) or "-"


def _limits_table(gw: dict, indent: str = "") -> None:
    limits = _rate_limits(gw)
    if not limits:
        print(f"{indent}no rate limits")
        return
    rows = [("KEY", "PRINCIPAL") + tuple(h for _, h, _ in _DIMENSIONS)]
    for r in limits:
        rows.append(
            (str(r.get("key", "?")), _principal(r) or "*")
            + tuple(str(r[f]) if r.get(f) else "-" for f, _, _ in _DIMENSIONS)
        )
    _table(rows, indent)


def _served(ep: dict) -> list[tuple[str, str, object]]:
    """(served entity name, model, traffic percentage or None) for each served entity."""
    config = ep.get("config") or {}
    routes = (config.get("traffic_config") or {}).get("routes") or []
    traffic = {}
    for r in routes:
        name = r.get("served_entity_name") or r.get("served_model_name")
        if name is not None:
            traffic[name] = r.get("traffic_percentage")
    out = []
    for se in config.get("served_entities") or []:
        model = se.get("entity_name") or (se.get("foundation_model") or {}).get("name") or "?"
        name = se.get("name") or model
        out.append((name, model, traffic.get(name, traffic.get(model))))
    return out


def _models_summary(ep: dict) -> str:
    served = _served(ep)
    if len(served) > 1:
        return ",".join(f"{m}({pct if pct is not None else '?'}%)" for _, m, pct in served)
    return ",".join(m for _, m, _ in served) or "-"


def _flag(gw: dict, key: str) -> str:
    cfg = gw.get(key)
    return "enabled" if isinstance(cfg, dict) and cfg.get("enabled") else "disabled"


def _endpoint_path(name: str) -> str:
    return f"{_LIST}/{quote(name, safe='')}"


# ---------------------------------------------------------------- commands


def _run(fn, args) -> int:
    return run_command(fn, args, "fmapi endpoints")


def list_command(args) -> int:
    def go(args) -> int:
        data = _request(args, "GET", _LIST)
        if args.json:
            print(json.dumps(data, indent=2))
            return 0
        rows = [("NAME", "TASK", "STATE", "UPDATE", "MODE", "MODELS", "LIMITS")]
        for ep in data.get("endpoints") or []:
            state = ep.get("state") or {}
            rows.append(
                (
                    str(ep.get("name", "")),
                    str(ep.get("task") or "-"),
                    str(state.get("ready") or "-"),
                    str(state.get("config_update") or "-"),
                    str(ep.get("capacity_mode") or "-"),
                    _models_summary(ep),
                    _limits_summary(_ai_gateway(ep)),
                )
            )
        _table(rows)
        return 0

    return _run(go, args)


def get_command(args) -> int:
    def go(args) -> int:
        ep = _request(args, "GET", _endpoint_path(args.name))
        if args.json:
            print(json.dumps(ep, indent=2))
            return 0
        state = ep.get("state") or {}
        gw = _ai_gateway(ep)
        fields = [
            ("name", ep.get("name", args.name)),
            ("task", ep.get("task") or "-"),
            ("description", ep.get("description") or "-"),
            ("state", f"{state.get('ready') or '-'} (config update: "
                      f"{state.get('config_update') or '-'})"),
            ("capacity mode", ep.get("capacity_mode") or "-"),
            ("created", _when(ep.get("creation_timestamp"))),
            ("updated", _when(ep.get("last_updated_timestamp"))),
            ("usage tracking", _flag(gw, "usage_tracking_config")),
            ("inference table", _flag(gw, "inference_table_config")),
            ("fallback", _flag(gw, "fallback_config")),
        ]
        if ep.get("retired"):
            fields.append(("retired", f"yes (replacement: {ep.get('replacement') or '-'})"))
        width = max(len(k) for k, _ in fields) + 1
        for key, value in fields:
            print(f"{key + ':':<{width}} {value}")
        print("served entities:")
        served = _served(ep)
        if served:
            rows = [("NAME", "MODEL", "TRAFFIC")]
            rows += [(n, m, f"{p}%" if p is not None else "-") for n, m, p in served]
            _table(rows, "  ")
        else:
            print("  none")
        print("rate limits:")
        _limits_table(gw, "  ")
        tags = [t for t in ep.get("tags") or [] if isinstance(t, dict)]
        print("tags:" if tags else "tags: -")
        for t in tags:
            value = t.get("value")
            print(f"  {t.get('key')}" + (f"={value}" if value not in (None, "") else ""))
        return 0

    return _run(go, args)


def _read_endpoints(path: str) -> list:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"{path} is not valid YAML: {exc}") from None
    endpoints = doc.get("endpoints") if isinstance(doc, dict) else None
    if not isinstance(endpoints, list):
        raise UsageError(f"{path} has no top-level 'endpoints' list")
    if not all(isinstance(e, dict) for e in endpoints):
        raise UsageError(f"{path}: every item of 'endpoints' must be a mapping")
    return endpoints


def apply_command(args) -> int:
    def go(args) -> int:
        endpoints = _read_endpoints(args.file)
        data = _request(args, "POST", _APPLY, {"endpoints": endpoints, "prune": args.prune})
        for outcome in _APPLY_ORDER:
            for name in data.get(outcome) or []:
                print(f"{outcome:<8} {name}")
        print(f"registry version {data.get('version', '?')}")
        return 0

    return _run(go, args)


def delete_command(args) -> int:
    def go(args) -> int:
        _request(args, "DELETE", _endpoint_path(args.name))
        print(f"deleted {args.name}")
        return 0

    return _run(go, args)


def limits_show_command(args) -> int:
    def go(args) -> int:
        ep = _request(args, "GET", _endpoint_path(args.name))
        _limits_table(_ai_gateway(ep))
        return 0

    return _run(go, args)


def limits_set_command(args) -> int:
    def go(args) -> int:
        values = {f: getattr(args, f) for f, _, _ in _DIMENSIONS if getattr(args, f) is not None}
        if args.principal is not None and args.key == "endpoint":
            raise UsageError("--principal does not apply to --key endpoint (one limit for all)")
        if args.principal == "":
            raise UsageError("--principal must not be empty")
        if args.remove and values:
            raise UsageError("--remove takes no --calls/--tokens/--input-tokens/--output-tokens")
        if not args.remove and not values:
            raise UsageError(
                "give at least one of --calls, --tokens, --input-tokens, --output-tokens "
                "(0 = unlimited), or --remove"
            )
        ep = _request(args, "GET", _endpoint_path(args.name))
        gw = dict(_ai_gateway(ep))
        limits = _rate_limits(gw)

        def same(r: dict) -> bool:
            return r.get("key") == args.key and _principal(r) == args.principal

        kept = [r for r in limits if not same(r)]
        who = args.key + (f" {args.principal}" if args.principal else " (every principal)")
        if args.remove:
            if len(kept) == len(limits):
                raise CliError(f"endpoint {args.name} has no rate limit for {who}")
            new = kept
        else:
            entry: dict = {"key": args.key}
            if args.principal is not None:
                entry["principal"] = args.principal
            entry.update(values)
            entry["renewal_period"] = "minute"
            # Keep the entry where it was, so `limits show` keeps its order.
            at = next((i for i, r in enumerate(limits) if same(r)), len(limits))
            new = limits[:at] + [entry] + limits[at + 1:]
        gw["rate_limits"] = new
        result = _request(args, "PUT", _endpoint_path(args.name) + "/ai-gateway", gw)
        _limits_table(result)
        return 0

    return _run(go, args)


def payloads_command(args) -> int:
    def go(args) -> int:
        query = urlencode({"since": args.since, "limit": args.limit})
        data = _request(args, "GET", f"{_endpoint_path(args.name)}/inference-table?{query}")
        rows = data.get("rows") or []
        if args.json:
            print(json.dumps(data, indent=2))
            return 0
        out = [("TIME", "REQUEST ID", "STATUS", "MS", "REQUESTER", "REQUEST", "RESPONSE")]
        for r in rows:
            out.append((str(r.get("request_time", "")), str(r.get("request_id", "")),
                        str(r.get("status_code", "")), str(r.get("execution_time_ms", "")),
                        str(r.get("requester", "")), _clip(r.get("request_json") or "-"),
                        _clip(r.get("response_json") or r.get("logging_error_codes") or "-")))
        table(out)
        return 0

    return _run(go, args)


def _clip(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"
