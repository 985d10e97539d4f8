"""The whole fmapi system on one machine: Redis, the services, the gateway and Envoy.

Used by ``fmapi dev up`` (``make run``) and by the end-to-end tests, so what the tests exercise is
what a newcomer runs. Every service binds port 0 and reports its port through a file; Redis
listens on a unix socket of its own; only Envoy's public port may be fixed. Every internal hop is
mutual TLS with certificates from a private CA made here (:mod:`fmapi_common.pki`); Envoy's admin
interface is a unix socket.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import urlsplit
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml

from fmapi_common import pki
from fmapi_common.telemetry import otlp_traces_endpoint, sampling_ratio
from fmapi_common.tls import AUTH, ENVOY, GATEWAY, TlsFiles

from .supervisor import ChildFailed, Supervisor

ROOT = Path(__file__).resolve().parents[2]
ENVOY_TEMPLATE = ROOT / "infra" / "envoy" / "envoy.yaml.tmpl"
DEFAULT_ENDPOINTS = ROOT / "infra" / "endpoints" / "dev.yaml"


@dataclass
class GenerationSpec:
    """One generation service: the model directory and the name endpoints know it by."""

    model: str
    path: Path
    env: dict[str, str] = field(default_factory=dict)
    # Model servers of this model ("generation-<model>", "generation-<model>-2", ...).
    replicas: int = 1


@dataclass
class SystemOptions:
    runtime_dir: Path
    http_port: int = 8080
    listen_host: str = "127.0.0.1"
    endpoints_file: Path = DEFAULT_ENDPOINTS
    # Extra environment for every child (e.g. OTEL_EXPORTER_OTLP_ENDPOINT in tests).
    env: dict[str, str] = field(default_factory=dict)
    embedding_env: dict[str, str] = field(default_factory=dict)
    generation: list[GenerationSpec] = field(default_factory=list)
    # Where auth writes the admin token it creates on first start (default: in runtime_dir).
    admin_token_file: Path | None = None
    # Benchmarks only: Envoy without the external-authorization check.
    ext_authz: bool = True
    # Redis' append-only file (tokens, usage records not yet in SQL, quota state): kept across
    # restarts in this directory; None = runtime_dir/redis, started afresh each time.
    redis_data_dir: Path | None = None
    # The private CA and every service's certificate (made or renewed on start); default
    # runtime_dir/pki.
    pki_dir: Path | None = None
    # Benchmarks only: plaintext, unauthenticated internal calls (to measure what mTLS costs).
    tls: bool = True
    # Benchmarks only: False serves without admission or settlement (what metering costs).
    metered: bool = True
    # Replicas per service ("gateway", "auth", "routing", "quota", "usage", "embedding"; 1 when
    # not named). Envoy balances across gateway and auth replicas (least request, health
    # checked); every gRPC client balances round robin across the replicas of what it calls.
    replicas: dict[str, int] = field(default_factory=dict)
    # Older spellings of replicas["gateway"] and replicas["quota"].
    gateways: int = 1
    quotas: int = 1

    def count(self, service: str) -> int:
        legacy = {"gateway": self.gateways, "quota": self.quotas}.get(service, 1)
        n = self.replicas.get(service, legacy)
        if n < 1:
            raise ValueError(f"{service} needs at least one replica, not {n}")
        return n
    # The SQL store of usage records and inference tables (default: SQLite in runtime_dir).
    usage_database_url: str | None = None
    ready_timeout: float = 300.0


def _bin(name: str) -> str:
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        raise SystemExit(f"'{name}' not found: run `make install` first")
    return found


class System:
    def __init__(self, opts: SystemOptions) -> None:
        self.opts = opts
        self.run_dir = Path(opts.runtime_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.run_dir, 0o700)
        self.pki_dir = Path(opts.pki_dir or self.run_dir / "pki")
        self.sup = Supervisor(self.run_dir / "logs")
        self.ports: dict[str, int] = {}
        self._specs: dict[str, tuple] = {}  # name -> how it was spawned (for restart)
        self.redis_url = ""
        self.http_port = 0
        # The gateway and auth replicas Envoy routes to (its hosts, written by _write_eds).
        self.edge: dict[str, list[str]] = {}
        self._eds_version = 0

    # ------------------------------------------------------------------ helpers

    def _port_file(self, name: str) -> Path:
        path = self.run_dir / f"{name}.port"
        path.unlink(missing_ok=True)
        return path

    def _tls_env(self, prefix: str, identity: str) -> dict[str, str]:
        if not self.opts.tls:
            return {f"{prefix}INSECURE": "true"}
        p = pki.paths(self.pki_dir, identity)
        return {f"{prefix}TLS_CA_FILE": str(p.ca), f"{prefix}TLS_CERT_FILE": str(p.cert),
                f"{prefix}TLS_KEY_FILE": str(p.key)}

    def _spawn(self, name: str, module: str, prefix: str, env: dict[str, str],
               extra_ports: tuple[str, ...] = (), identity: str | None = None):
        """Start a service; returns a function that waits for its port(s). Every service also
        serves Prometheus metrics on a port of its own (``ports["<name>-metrics"]``)."""
        self._specs[name] = (module, prefix, env, extra_ports, identity)
        pf = self._port_file(name)
        extra_ports = (*extra_ports, "metrics")
        files = {p: self._port_file(f"{name}-{p}") for p in extra_ports}
        child_env = {
            **self.opts.env,
            **self._tls_env(prefix, identity or name),
            f"{prefix}PORT_FILE": str(pf),
            f"{prefix}METRICS_PORT": "0",
            **{f"{prefix}{p.upper()}_PORT_FILE": str(f) for p, f in files.items()},
            **env,
        }
        child = self.sup.start(name, [sys.executable, "-m", module], child_env, cwd=str(ROOT))

        def wait(timeout: float) -> int:
            self.ports[name] = int(self.sup.wait_for_file(child, pf, timeout))
            for p, f in files.items():
                self.ports[f"{name}-{p}"] = int(self.sup.wait_for_file(child, f, timeout))
            return self.ports[name]

        return wait

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise

    def _start_all(self) -> None:
        if self.opts.tls:
            pki.ensure_pki(self.pki_dir)
        sock = self.run_dir / "redis.sock"
        sock.unlink(missing_ok=True)
        if self.opts.redis_data_dir:
            data = Path(self.opts.redis_data_dir)
        else:
            data = self.run_dir / "redis"
            shutil.rmtree(data, ignore_errors=True)
        data.mkdir(parents=True, exist_ok=True)
        os.chmod(data, 0o700)  # tokens' hashes, usage records and registrations live here
        # Usage records must never be lost: every write is fsynced before Redis answers.
        persistence = ["--appendonly", "yes", "--appendfsync", "always", "--save", "",
                       "--dir", str(data)]
        redis = self.sup.start(
            "redis",
            ["redis-server", "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700",
             *persistence],
        )
        self._wait_socket(redis, sock)
        self.redis_url = f"unix://{sock}"
        # The key auth signs identities with and the gateway verifies them with; new each start.
        self.identity_key = secrets.token_hex(32)
        self.admin_token_file = Path(self.opts.admin_token_file or self.run_dir / "admin-token")

        n = self.opts.count
        wait_auths = [self._spawn(
            _replica("auth", i), "fmapi_auth", "FMAPI_AUTH_",
            {"FMAPI_AUTH_REDIS_URL": self.redis_url, "FMAPI_AUTH_IDENTITY_KEY": self.identity_key,
             "FMAPI_AUTH_BOOTSTRAP_ADMIN_TOKEN_FILE": str(self.admin_token_file)},
            identity="auth",
        ) for i in range(n("auth"))]
        wait_quotas = [self._spawn(_replica("quota", i), "fmapi_quota", "FMAPI_QUOTA_",
                                   {"FMAPI_QUOTA_REDIS_URL": self.redis_url}, identity="quota")
                       for i in range(n("quota"))]
        wait_routings = [self._spawn(
            _replica("routing", i), "fmapi_routing", "FMAPI_ROUTING_",
            {"FMAPI_ROUTING_ENDPOINTS_FILE": str(self.opts.endpoints_file),
             "FMAPI_ROUTING_REDIS_URL": self.redis_url}, identity="routing",
        ) for i in range(n("routing"))]
        # Several replicas of one service: one comma-separated address, balanced by the client.
        routing_addr = ",".join(f"127.0.0.1:{wait(30)}" for wait in wait_routings)
        quota_addr = ",".join(f"127.0.0.1:{wait(30)}" for wait in wait_quotas)
        self.usage_database_url = (self.opts.usage_database_url
                                   or f"sqlite:///{self.run_dir / 'usage.db'}")
        wait_usages = [self._spawn(_replica("usage", i), "fmapi_usage", "FMAPI_USAGE_",
                                   {"FMAPI_USAGE_DATABASE_URL": self.usage_database_url,
                                    "FMAPI_USAGE_REDIS_URL": self.redis_url,
                                    # Its name in the consumer group, the same after a restart.
                                    "FMAPI_USAGE_CONSUMER": _replica("usage", i)},
                                   identity="usage")
                       for i in range(n("usage"))]
        usage_addr = ",".join(f"127.0.0.1:{wait(60)}" for wait in wait_usages)
        auth_addr = ",".join(f"127.0.0.1:{wait(30)}" for wait in wait_auths)
        # Model servers load in parallel; each registers with routing once it is ready.
        waits = [self._spawn(
            _replica("embedding", i), "fmapi_embedding", "FMAPI_EMBEDDING_",
            {"FMAPI_EMBEDDING_ROUTING_ADDR": routing_addr, "FMAPI_EMBEDDING_QUOTA_ADDR": quota_addr,
             "HF_HUB_OFFLINE": "1",
             **self.opts.embedding_env}, identity="embedding",
        ) for i in range(n("embedding"))]
        for spec in self.opts.generation:
            waits += [self._spawn(
                _replica(f"generation-{spec.model}", i), "fmapi_generation", "FMAPI_GENERATION_",
                {"FMAPI_GENERATION_MODEL_PATH": str(spec.path),
                 "FMAPI_GENERATION_SERVED_MODEL_NAME": spec.model,
                 "FMAPI_GENERATION_ROUTING_ADDR": routing_addr,
                 "FMAPI_GENERATION_QUOTA_ADDR": quota_addr,
                 "HF_HUB_OFFLINE": "1", **spec.env},
                identity="generation",
            ) for i in range(spec.replicas)]
        gateways = [self._spawn(
            _replica("gateway", i), "fmapi_gateway", "FMAPI_GATEWAY_",
            {"FMAPI_GATEWAY_ROUTING_ADDR": routing_addr, "FMAPI_GATEWAY_AUTH_ADDR": auth_addr,
             "FMAPI_GATEWAY_QUOTA_ADDR": quota_addr,
             "FMAPI_GATEWAY_USAGE_ADDR": usage_addr,
             "FMAPI_GATEWAY_UNMETERED": "false" if self.opts.metered else "true",
             "FMAPI_GATEWAY_IDENTITY_KEY": self.identity_key,
             # The public gRPC API offers reflection (through Envoy, with a token).
             "FMAPI_GATEWAY_REFLECTION": "true"}, extra_ports=("http",), identity="gateway",
        ) for i in range(n("gateway"))]
        for wait in gateways:
            wait(30)
        for wait in waits:
            wait(self.opts.ready_timeout)
        self._start_envoy()
        self.wait_healthy(self.opts.ready_timeout)

    def _wait_socket(self, child, path: Path) -> None:
        deadline = time.monotonic() + 10
        while not path.exists():
            if not child.alive() or time.monotonic() > deadline:
                raise ChildFailed(f"redis-server did not start:\n{child.tail()}")
            time.sleep(0.02)

    def _envoy_config(self, name: str, ext_authz: bool) -> dict:
        cfg = yaml.safe_load(string.Template(ENVOY_TEMPLATE.read_text()).substitute(
            LISTEN_HOST=self.opts.listen_host if name == "envoy" else "127.0.0.1",
            LISTEN_PORT=self.opts.http_port if name == "envoy" else 0,
            GATEWAY_HTTP_PORT=self.ports["gateway-http"],
            GATEWAY_GRPC_PORT=self.ports["gateway"],
            AUTH_PORT=self.ports["auth"],
            EXT_AUTHZ_DISABLED="false" if ext_authz else "true",
            ACCESS_LOG=str(self.run_dir / "logs" / f"{name}-access.log"),
            ADMIN_SOCKET=str(self.run_dir / f"{name}-admin.sock"),
            METRICS_PORT=0,
        ))
        cfg = json.loads(json.dumps(cfg))  # the template's YAML aliases become plain copies
        hcm = cfg["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
        otlp = self._otlp_endpoint()
        if otlp is not None:
            _trace_to(cfg, hcm["typed_config"], otlp,
                      sampling_ratio({**os.environ, **self.opts.env}))
        if not ext_authz:
            # Benchmarks only: the client signs identities as auth would, bound to a request id
            # of its own, which this Envoy must then keep.
            hcm["typed_config"]["preserve_external_request_id"] = True
        # Who this Envoy is (endpoint discovery from files needs a name).
        cfg["node"] = {"id": name, "cluster": "fmapi-edge"}
        for cluster in cfg["static_resources"]["clusters"]:
            if cluster["name"] in EDGE_CLUSTERS:
                # Replicas come and go at run time (add_replica, retire_replica): Envoy watches
                # a file per cluster (endpoint discovery from the file system) and health-checks
                # every host in it.
                path = self._eds_file(cluster["name"])
                del cluster["load_assignment"]
                cluster["type"] = "EDS"
                # A host taken out of the file leaves at once (not when its health checks fail):
                # retire_replica drains it before stopping it.
                cluster["ignore_health_on_host_removal"] = True
                cluster["eds_cluster_config"] = {"eds_config": {
                    "resource_api_version": "V3",
                    "path_config_source": {"path": str(path),
                                           "watched_directory": {"path": str(path.parent)}},
                }}
        if self.opts.tls:
            upstream = {"auth": AUTH, "gateway_grpc": GATEWAY, "gateway_http": GATEWAY}
            for cluster in cfg["static_resources"]["clusters"]:
                if cluster["name"] not in upstream:  # its admin socket, the trace collector
                    continue
                cluster["transport_socket"] = envoy_upstream_tls(
                    pki.paths(self.pki_dir, ENVOY), upstream[cluster["name"]],
                    h2=cluster["name"] != "gateway_http",
                )
        return cfg

    # ------------------------------------------------------------ edge replicas

    def _eds_file(self, cluster: str) -> Path:
        return self.run_dir / "eds" / f"{cluster}.json"

    def _write_eds(self) -> None:
        """Write the hosts of Envoy's gateway and auth clusters (each replica in
        ``self.edge``), each file replaced whole by a rename (what Envoy watches for)."""
        self._eds_version += 1
        for cluster, (service, suffix) in EDGE_CLUSTERS.items():
            path = self._eds_file(cluster)
            path.parent.mkdir(exist_ok=True)
            assignment = {
                "@type": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
                "cluster_name": cluster,
                "endpoints": [{"lb_endpoints": [
                    {"endpoint": {"address": {"socket_address": {
                        "address": "127.0.0.1", "port_value": self.ports[name + suffix]}}}}
                    for name in self.edge[service]]}],
            }
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version_info": str(self._eds_version),
                                       "resources": [assignment]}))
            os.replace(tmp, path)

    def envoy_hosts(self, cluster: str, name: str = "envoy") -> list[int]:
        """The ports of the hosts Envoy has in ``cluster`` now (from its admin interface)."""
        stats = self.envoy_admin("/clusters?format=json",
                                 socket=self.run_dir / f"{name}-admin.sock").json()
        for c in stats.get("cluster_statuses", []):
            if c["name"] == cluster:
                return sorted(h["address"]["socket_address"]["port_value"]
                              for h in c.get("host_statuses", []))
        return []

    def _wait_envoy_hosts(self, timeout: float = 10.0) -> None:
        """Wait until Envoy holds exactly the hosts the files name."""
        deadline = time.monotonic() + timeout
        for cluster, (service, suffix) in EDGE_CLUSTERS.items():
            want = sorted(self.ports[n + suffix] for n in self.edge[service])
            while self.envoy_hosts(cluster) != want:
                if time.monotonic() > deadline:
                    raise ChildFailed(f"Envoy did not pick up the {cluster} hosts {want}")
                time.sleep(0.05)

    def add_replica(self, service: str, timeout: float = 60.0) -> str:
        """Start one more replica of ``service`` (``gateway`` or ``auth``) while the system
        runs, like the others, and add it to Envoy's hosts once it listens; returns its name."""
        if service not in self.edge:
            raise ValueError(f"replicas can be added at run time to {sorted(self.edge)} only")
        taken = {c.name for c in self.sup.children} | set(self.edge[service])
        i = next(i for i in range(1, 1000) if _replica(service, i) not in taken)
        name = _replica(service, i)
        module, prefix, env, extra_ports, identity = self._specs[service]
        # Ports of its own (the first replica's spec names its ports once it was restarted).
        pinned = {f"{prefix}PORT", *(f"{prefix}{p.upper()}_PORT" for p in extra_ports)}
        env = {k: v for k, v in env.items() if k not in pinned}
        self._spawn(name, module, prefix, env, extra_ports, identity)(timeout)
        self.edge[service].append(name)
        self._write_eds()
        self._wait_envoy_hosts()
        return name

    def retire_replica(self, name: str, timeout: float = 30.0) -> None:
        """Take a gateway or auth replica out of service without failing a request: out of
        Envoy's hosts first (new requests go elsewhere), then SIGTERM (it finishes what it has
        in flight within its grace period) and wait for it to exit."""
        service = next((s for s, names in self.edge.items() if name in names), None)
        if service is None:
            raise ValueError(f"{name} is not a gateway or auth replica Envoy routes to")
        if len(self.edge[service]) == 1:
            raise ValueError(f"{name} is the last {service} replica")
        self.edge[service].remove(name)
        self._write_eds()
        self._wait_envoy_hosts()
        child = self.child(name)
        child.proc.terminate()
        try:
            child.proc.wait(timeout)
        except subprocess.TimeoutExpired:  # past its grace period: what is left is cut off
            child.proc.kill()
            child.proc.wait(10)
        self.sup.children.remove(child)

    def scale(self, service: str, count: int) -> list[str]:
        """Run ``count`` replicas of ``service`` (``gateway`` or ``auth``): add or retire (the
        newest first) until there are; returns their names."""
        if service not in self.edge:
            raise ValueError(f"only {' and '.join(sorted(self.edge))} scale at run time")
        if count < 1:
            raise ValueError(f"{service} needs at least one replica, not {count}")
        while len(self.edge[service]) < count:
            self.add_replica(service)
        while len(self.edge[service]) > count:
            self.retire_replica(self.edge[service][-1])
        return list(self.edge[service])

    def _otlp_endpoint(self) -> str | None:
        """Where the children export spans (the standard OTLP variables), if anywhere."""
        return otlp_traces_endpoint({**os.environ, **self.opts.env})

    def _start_envoy(self) -> None:
        self.envoy_admin_socket = self.run_dir / "envoy-admin.sock"
        self.edge = {s: [_replica(s, i) for i in range(self.opts.count(s))]
                     for s in ("gateway", "auth")}
        self._write_eds()
        self.http_port = self.start_envoy("envoy", ext_authz=self.opts.ext_authz)

    def start_envoy(self, name: str, *, ext_authz: bool) -> int:
        """Start an Envoy in front of this system's gateway and auth; returns its public port.

        ``fmapi dev up`` starts one ("envoy"); the auth benchmark a second without ext_authz."""
        admin_socket = self.run_dir / f"{name}-admin.sock"
        admin_socket.unlink(missing_ok=True)
        cfg_path = self.run_dir / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(self._envoy_config(name, ext_authz), sort_keys=False))
        envoy = self.sup.start(
            name,
            [_bin("envoy"), "-c", str(cfg_path), "--disable-hot-restart", "--log-level", "warn",
             "--concurrency", "2"],
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                listeners = self.envoy_admin("/listeners?format=json", socket=admin_socket).json()
                bound = {ls["name"]: ls["local_address"]["socket_address"]["port_value"]
                         for ls in listeners["listener_statuses"]}
                if bound.get("public") and bound.get("metrics"):
                    self.ports[f"{name}-metrics"] = int(bound["metrics"])
                    return int(bound["public"])
            except (httpx.HTTPError, KeyError, IndexError, ValueError):
                pass
            if not envoy.alive() or time.monotonic() > deadline:
                raise ChildFailed(f"{name} did not start listening:\n{envoy.tail()}")
            time.sleep(0.1)

    def envoy_admin(self, path: str, method: str = "GET", socket: Path | None = None) -> httpx.Response:
        """A request to Envoy's admin interface (a unix socket only this user can open)."""
        transport = httpx.HTTPTransport(uds=str(socket or self.envoy_admin_socket))
        with httpx.Client(transport=transport, base_url="http://envoy-admin", timeout=5) as c:
            return c.request(method, path)

    def child(self, name: str):
        return next(c for c in reversed(self.sup.children) if c.name == name)

    def restartable(self, name: str) -> bool:
        """Whether ``name`` is a service :meth:`restart` can start again (not Redis or Envoy)."""
        return name in self._specs

    def restart(self, name: str, timeout: float = 60.0) -> None:
        """Start service ``name`` again as it was started (after a test killed it), on the same
        gRPC port (its callers keep their address); wait until it listens."""
        old = self.child(name)
        if old.alive():
            old.proc.kill()
            old.proc.wait(10)
        self.sup.children.remove(old)
        module, prefix, env, extra_ports, identity = self._specs[name]
        # The same ports (Envoy's config and every caller name them), but a new metrics one.
        env = {**env, f"{prefix}PORT": str(self.ports[name]),
               **{f"{prefix}{p.upper()}_PORT": str(self.ports[f"{name}-{p}"]) for p in extra_ports}}
        self._spawn(name, module, prefix, env, extra_ports, identity)(timeout)

    def metric(self, service: str, name: str, **labels: str) -> float:
        """The sum of a Prometheus sample of one service's process over the given labels."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"http://127.0.0.1:{self.ports[f'{service}-metrics']}/metrics", timeout=5).text
        return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def tls_files(self, identity: str) -> TlsFiles:
        """One identity's certificate files (e.g. for a test that dials a service directly)."""
        p = pki.paths(self.pki_dir, identity)
        return TlsFiles(str(p.ca), str(p.cert), str(p.key))

    @property
    def admin_token(self) -> str:
        return self.admin_token_file.read_text().strip()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def wait_healthy(self, timeout: float) -> None:
        """Until ``GET /healthz`` through Envoy answers 200 (every service SERVING)."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            failed = self.sup.check()
            if failed:
                raise ChildFailed(f"{failed.name} exited with {failed.proc.returncode}:\n{failed.tail()}")
            try:
                with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=5) as r:
                    if r.status == 200:
                        return
            except urllib.error.HTTPError as exc:
                last = exc.read().decode(errors="replace")
            except (urllib.error.URLError, ConnectionError) as exc:
                last = str(exc)
            time.sleep(0.2)
        raise ChildFailed(f"system not healthy after {timeout:.0f}s: {last}")

    def stop(self) -> None:
        self.sup.stop()


# Envoy's clusters whose hosts are replicas: (service, port suffix in System.ports).
EDGE_CLUSTERS = {"gateway_http": ("gateway", "-http"), "gateway_grpc": ("gateway", ""),
                 "auth": ("auth", "")}


def _replica(service: str, i: int) -> str:
    """The name of a service's i-th replica: "gateway", "gateway-2", ..."""
    return service if i == 0 else f"{service}-{i + 1}"


def _trace_to(cfg: dict, hcm: dict, endpoint: str, ratio: float) -> None:
    """Envoy traces ``ratio`` of the requests with its OpenTelemetry tracer, exporting to
    ``endpoint`` (an OTLP/gRPC URL): its server span is the root of the request's trace (or
    continues the caller's ``traceparent``), the ext_authz call is a child span, and the
    gateway gets the context in ``traceparent``, sampled or not (the services follow it).

    No caller can raise that share: a caller's sampled ``traceparent`` does not force a trace
    (Envoy keeps its own decision), nor does ``x-envoy-force-trace`` (no client is internal),
    and an ``x-client-trace-id``, which Envoy would otherwise trace every time, forces nothing
    (``client_sampling`` 0: such a request falls through to ``random_sampling``, like any other;
    at the ratio it would be traced by both draws, ``1 - (1 - r)**2`` of the time)."""
    url = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    share = round(100 * ratio, 4)
    hcm["tracing"] = {"random_sampling": {"value": share}, "client_sampling": {"value": 0},
                      "provider": {
        "name": "envoy.tracers.opentelemetry",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
            "grpc_service": {"envoy_grpc": {"cluster_name": "otel_collector"}, "timeout": "2s"},
            "service_name": "envoy",
        },
    }}
    cfg["static_resources"]["clusters"].append({
        "name": "otel_collector",
        "type": "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }},
        "load_assignment": {"cluster_name": "otel_collector", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {
                "address": url.hostname or "127.0.0.1", "port_value": url.port or 4317}}}}]}]},
    })


def envoy_upstream_tls(envoy: pki.CertPaths, upstream: str, *, h2: bool) -> dict:
    """Envoy's side of mutual TLS to one upstream: its own certificate, and the upstream's
    certificate must chain to our CA and name ``upstream``."""
    context = {
        "tls_certificates": [{"certificate_chain": {"filename": str(envoy.cert)},
                              "private_key": {"filename": str(envoy.key)}}],
        "validation_context": {
            "trusted_ca": {"filename": str(envoy.ca)},
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": upstream}}],
        },
        "alpn_protocols": ["h2" if h2 else "http/1.1"],
    }
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": upstream,
            "common_tls_context": context,
        },
    }
