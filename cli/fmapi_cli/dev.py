"""`fmapi dev up`: the whole system in the foreground, until Ctrl-C or SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from .supervisor import ChildFailed
from .system import ROOT, GenerationSpec, System, SystemOptions

DEV_MODEL = "gemma-3-270m"


def add_parser(subparsers) -> None:
    dev = subparsers.add_parser("dev", help="run fmapi on this machine")
    sub = dev.add_subparsers(dest="dev_command", required=True)
    up = sub.add_parser("up", help="start every service in the foreground (Ctrl-C stops all)")
    up.add_argument("--port", type=int, default=int(os.environ.get("FMAPI_HTTP_PORT", "8080")),
                    help="Envoy's public port (env FMAPI_HTTP_PORT, default 8080)")
    up.add_argument("--runtime-dir", default=str(ROOT / ".fmapi" / "run"),
                    help="logs, sockets and port files (default .fmapi/run)")
    up.add_argument("--no-generation", action="store_true",
                    help="serve embeddings only (skip the Gemma chat model)")
    up.add_argument("--replicas", type=replicas, default={}, metavar="SERVICE=N,...",
                    help="replicas per service, e.g. gateway=2,auth=2,routing=2,quota=2,"
                         "embedding=2 (services: " + ", ".join(REPLICATED) + "; default 1 each)")
    up.set_defaults(func=up_command)
    scale = sub.add_parser(
        "scale", help="change the number of gateway or auth replicas of a running `dev up`")
    scale.add_argument("replicas", type=scaled, metavar="SERVICE=N,...",
                       help="e.g. gateway=3,auth=2 (" + " and ".join(SCALED) + " only)")
    scale.add_argument("--runtime-dir", default=str(ROOT / ".fmapi" / "run"),
                       help="the runtime directory of the running `dev up` (default .fmapi/run)")
    scale.set_defaults(func=scale_command)


REPLICATED = ("gateway", "auth", "routing", "quota", "usage", "embedding")
MAX_REPLICAS = 16
# A replica that dies is started again, unless it died this often within a minute.
MAX_RESTARTS_PER_MINUTE = 3


def replicas(text: str) -> dict[str, int]:
    """``gateway=2,auth=2`` as {"gateway": 2, "auth": 2} (argparse type: errors are usage errors)."""
    import argparse

    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition("=")
        if not sep or name not in REPLICATED:
            raise argparse.ArgumentTypeError(
                f"{part!r}: expected SERVICE=N with SERVICE one of {', '.join(REPLICATED)}")
        if not count.isdigit() or not 1 <= int(count) <= MAX_REPLICAS:
            raise argparse.ArgumentTypeError(f"{part!r}: N must be 1 to {MAX_REPLICAS}")
        out[name] = int(count)
    return out


# Services whose replicas come and go while the system runs (Envoy discovers them).
SCALED = ("gateway", "auth")
SCALE_TIMEOUT = 120.0


def scaled(text: str) -> dict[str, int]:
    import argparse

    out = replicas(text)
    if not out or set(out) - set(SCALED):
        raise argparse.ArgumentTypeError(f"{text!r}: expected SERVICE=N with SERVICE one of "
                                         f"{', '.join(SCALED)}")
    return out


def scale_command(args) -> int:
    """Ask the running ``dev up`` (through a request file in its runtime directory) to scale,
    and wait for its answer."""
    run_dir = Path(args.runtime_dir)
    if not (run_dir / "envoy-admin.sock").exists():
        print(f"fmapi: no running `fmapi dev up` in {run_dir}", file=sys.stderr)
        return 1
    request, answer = run_dir / "scale.request", run_dir / "scale.answer"
    answer.unlink(missing_ok=True)
    tmp = run_dir / "scale.request.tmp"
    tmp.write_text(json.dumps(args.replicas))
    os.replace(tmp, request)
    deadline = time.monotonic() + SCALE_TIMEOUT
    while not answer.exists():
        if time.monotonic() > deadline:
            print("fmapi: `dev up` did not answer (is it running?)", file=sys.stderr)
            return 1
        time.sleep(0.2)
    result = json.loads(answer.read_text())
    answer.unlink(missing_ok=True)
    if "error" in result:
        print(f"fmapi: {result['error']}", file=sys.stderr)
        return 1
    for service, names in result.items():
        print(f"{service}: {len(names)} replica(s): {', '.join(names)}")
    return 0


def _serve_scale_requests(system: System) -> None:
    """Apply a pending ``fmapi dev scale`` request, if any, and answer it."""
    request = system.run_dir / "scale.request"
    if not request.exists():
        return
    try:
        wanted = json.loads(request.read_text())
        request.unlink()
        answer = {service: system.scale(service, int(n)) for service, n in wanted.items()}
        print(f"fmapi: scaled: {answer}", flush=True)
    except (ValueError, TypeError, AttributeError, ChildFailed) as exc:
        request.unlink(missing_ok=True)
        answer = {"error": str(exc)}
    tmp = system.run_dir / "scale.answer.tmp"
    tmp.write_text(json.dumps(answer))
    os.replace(tmp, system.run_dir / "scale.answer")


def up_command(args) -> int:
    stopping = False

    def on_signal(signum, frame):
        nonlocal stopping
        stopping = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    state = ROOT / ".fmapi"
    token_file = state / "dev-token"
    opts = SystemOptions(
        runtime_dir=Path(args.runtime_dir),
        http_port=args.port,
        admin_token_file=token_file,
        redis_data_dir=state / "redis",
        pki_dir=state / "pki",
        usage_database_url=os.environ.get("FMAPI_USAGE_DATABASE_URL")
        or f"sqlite:///{state / 'usage.db'}",
        replicas=args.replicas,
    )
    if args.no_generation:
        opts.endpoints_file = ROOT / "infra" / "endpoints" / "embeddings-only.yaml"
    else:
        from fmapi_generation.modelimport import import_model

        print(f"fmapi: preparing {DEV_MODEL} (imported once into {state / 'models'}) ...", flush=True)
        model_dir = import_model(out_root=state / "models", name=DEV_MODEL)
        opts.generation = [GenerationSpec(DEV_MODEL, model_dir)]
    system = System(opts)
    had_token = token_file.exists()
    print(f"fmapi: starting (logs in {system.run_dir / 'logs'}) ...", flush=True)
    try:
        system.start()
        print(f"fmapi: ready on {system.base_url}  (OpenAI base_url {system.base_url}/v1)", flush=True)
        if not had_token:
            print(
                f"fmapi: created an admin API token, saved in {token_file} (shown once):\n"
                f"    {system.admin_token}\n"
                f"  use it as the bearer token, e.g.\n"
                f"    export OPENAI_API_KEY=$(cat {token_file})\n"
                f"    curl -H \"Authorization: Bearer $OPENAI_API_KEY\" {system.base_url}/v1/models",
                flush=True,
            )
        else:
            print(f"fmapi: admin API token in {token_file}", flush=True)
        print("fmapi: Ctrl-C stops everything", flush=True)
        restarts: dict[str, list[float]] = {}
        while True:
            failed = system.sup.check()
            if failed:
                now = time.monotonic()
                recent = [t for t in restarts.get(failed.name, []) if now - t < 60]
                if not system.restartable(failed.name) or len(recent) >= MAX_RESTARTS_PER_MINUTE:
                    print(f"fmapi: {failed.name} exited ({failed.proc.returncode}); stopping.\n"
                          f"{failed.tail()}", file=sys.stderr, flush=True)
                    return 1
                print(f"fmapi: {failed.name} exited ({failed.proc.returncode}); starting it again",
                      file=sys.stderr, flush=True)
                restarts[failed.name] = [*recent, now]
                try:
                    system.restart(failed.name)
                except ChildFailed as exc:  # died again while starting: counts as a restart
                    print(f"fmapi: {failed.name} did not start again: {exc}", file=sys.stderr,
                          flush=True)
            _serve_scale_requests(system)
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
