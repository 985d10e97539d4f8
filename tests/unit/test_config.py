"""Typed config: env and flags, and a clear stop when a required value is missing."""

from __future__ import annotations

import pytest

from fmapi_common.config import load_config
from fmapi_routing.config import RoutingConfig


def test_missing_required_value_names_the_env_var_and_flag(monkeypatch):
    monkeypatch.delenv("FMAPI_ROUTING_REDIS_URL", raising=False)
    monkeypatch.setenv("FMAPI_ROUTING_ENDPOINTS_FILE", "x.yaml")
    with pytest.raises(SystemExit) as exc:
        load_config(RoutingConfig, [], prog="fmapi-routing")
    msg = str(exc.value)
    assert "FMAPI_ROUTING_REDIS_URL" in msg and "--redis-url" in msg


def test_flags_override_env(monkeypatch):
    monkeypatch.setenv("FMAPI_ROUTING_ENDPOINTS_FILE", "env.yaml")
    monkeypatch.setenv("FMAPI_ROUTING_REDIS_URL", "redis://env")
    monkeypatch.setenv("FMAPI_ROUTING_INSECURE", "true")
    cfg = load_config(RoutingConfig, ["--redis-url", "redis://flag", "--port", "1234"])
    assert cfg.redis_url == "redis://flag"
    assert cfg.endpoints_file == "env.yaml"
    assert cfg.port == 1234


def test_a_service_without_tls_files_does_not_start(monkeypatch):
    monkeypatch.setenv("FMAPI_ROUTING_ENDPOINTS_FILE", "x.yaml")
    monkeypatch.setenv("FMAPI_ROUTING_REDIS_URL", "redis://x")
    monkeypatch.setenv("FMAPI_ROUTING_TLS_CA_FILE", "ca.pem")
    with pytest.raises(SystemExit) as exc:
        load_config(RoutingConfig, [], prog="fmapi-routing")
    msg = str(exc.value)
    assert "tls_cert_file" in msg and "tls_key_file" in msg and "FMAPI_ROUTING_" in msg
    monkeypatch.setenv("FMAPI_ROUTING_TLS_CERT_FILE", "c.pem")
    monkeypatch.setenv("FMAPI_ROUTING_TLS_KEY_FILE", "k.pem")
    cfg = load_config(RoutingConfig, [])
    assert cfg.tls() is not None and cfg.tls().cert == "c.pem"


def test_bad_value_is_reported(monkeypatch):
    monkeypatch.setenv("FMAPI_ROUTING_ENDPOINTS_FILE", "x")
    monkeypatch.setenv("FMAPI_ROUTING_REDIS_URL", "redis://x")
    monkeypatch.setenv("FMAPI_ROUTING_PORT", "not-a-port")
    with pytest.raises(SystemExit) as exc:
        load_config(RoutingConfig, [])
    assert "port" in str(exc.value)
