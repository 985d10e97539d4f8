"""`fmapi dev up`: the whole system in the foreground, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from .supervisor import ChildFailed
from .system import ROOT, System, SystemOptions


def add_parser(subparsers) -> None:
    dev = subparsers.add_parser("dev", help="run fmapi on this machine")
    sub = dev.add_subparsers(dest="dev_command", required=True)
    up = sub.add_parser("up", help="start every service in the foreground (Ctrl-C stops all)")
    up.add_argument("--port", type=int, default=int(os.environ.get("FMAPI_HTTP_PORT", "8080")),
                    help="Envoy's public port (env FMAPI_HTTP_PORT, default 8080)")
    up.add_argument("--runtime-dir", default=str(ROOT / ".fmapi" / "run"),
                    help="logs, sockets and port files (default .fmapi/run)")
    up.set_defaults(func=up_command)


def up_command(args) -> int:
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    system = System(SystemOptions(runtime_dir=Path(args.runtime_dir), http_port=args.port))
    print(f"fmapi: starting (logs in {system.run_dir / 'logs'}) ...", flush=True)
    try:
        system.start()
        print(f"fmapi: ready on {system.base_url}  (OpenAI base_url {system.base_url}/v1)", flush=True)
        print("fmapi: Ctrl-C stops everything", flush=True)
        while True:
            failed = system.sup.check()
            if failed:
                print(f"fmapi: {failed.name} exited ({failed.proc.returncode}); stopping.\n"
                      f"{failed.tail()}", file=sys.stderr, flush=True)
                return 1
            time.sleep(0.5)
    except KeyboardInterrupt:
        return 0
    except ChildFailed as exc:
        print(f"fmapi: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        print("fmapi: stopping ...", flush=True)
        system.stop()
        print("fmapi: stopped", flush=True)
