"""`fmapi usage`: who used how many tokens of which endpoint, from the usage tables.

    GET /api/2.0/usage?since=7d&until=&by=endpoint,principal,day

Admins see everyone's usage; any other token sees its own principal's. ``--format csv`` and
``--format json`` are for scripts.
"""

from __future__ import annotations

import csv
import json
import sys
from urllib.parse import urlencode

from .tokens import common_options, request, run_command, table

_TOTALS = ("requests", "input_tokens", "output_tokens", "input_characters", "output_characters")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("usage", parents=[common_options()],
                              help="usage totals (requests, tokens) grouped by endpoint, ...")
    p.add_argument("--since", default="7d", help="ISO-8601 time or 30m, 12h, 7d (default 7d)")
    p.add_argument("--until", default="", help="ISO-8601 time or a duration ago (default now)")
    p.add_argument("--by", default="endpoint",
                   help="comma-separated: endpoint, principal, token, day, served_entity, status")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.set_defaults(func=usage_command)


def usage_command(args) -> int:
    def go(args) -> int:
        query = {"since": args.since, "by": args.by}
        if args.until:
            query["until"] = args.until
        data = request(args, "GET", f"/api/2.0/usage?{urlencode(query)}")
        groups = data.get("groups") or []
        keys = list(data.get("by") or [])
        if args.format == "json":
            print(json.dumps(data, indent=2))
        elif args.format == "csv":
            w = csv.writer(sys.stdout)
            w.writerow([*keys, *_TOTALS])
            for g in groups:
                w.writerow([g.get(k, "") for k in (*keys, *_TOTALS)])
        else:
            rows = [tuple(k.upper().replace("_", " ") for k in (*keys, *_TOTALS))]
            rows += [tuple(str(g.get(k, "")) for k in (*keys, *_TOTALS)) for g in groups]
            table(rows)
            who = data.get("principal")
            print(f"{data.get('since')} .. {data.get('until')}"
                  + (f" (principal {who})" if who else " (everyone)"), file=sys.stderr)
        return 0

    return run_command(go, args, "fmapi usage")
