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


def _generation(monkeypatch, cpus: str | None):
    from fmapi_generation.config import GenerationConfig

    monkeypatch.setenv("FMAPI_GENERATION_MODEL_PATH", "m")
    monkeypatch.setenv("FMAPI_GENERATION_INSECURE", "true")
    if cpus is not None:
        monkeypatch.setenv("FMAPI_GENERATION_ENGINE_CPUS", cpus)
    return load_config(GenerationConfig, [], prog="fmapi-generation")


def test_the_engine_gets_every_cpu_but_the_last_unless_told(monkeypatch):
    assert _generation(monkeypatch, None).engine_cpu_set({0, 1}) == {0}
    assert _generation(monkeypatch, None).engine_cpu_set({2, 3, 5, 7}) == {2, 3, 5}
    assert _generation(monkeypatch, None).engine_cpu_set({4}) is None  # one CPU: left alone
    assert _generation(monkeypatch, "all").engine_cpu_set({0, 1}) is None
    assert _generation(monkeypatch, "1-2,6").engine_cpu_set({0, 1, 2, 3}) == {1, 2}
    with pytest.raises(ValueError, match="none of them"):
        _generation(monkeypatch, "6").engine_cpu_set({0, 1})


@pytest.mark.parametrize("bad", ["x", "0-", "3-1", "-1", "1,,2", "0-99999999999"])
def test_a_bad_engine_cpu_list_stops_the_start_with_a_clear_message(monkeypatch, bad):
    with pytest.raises(SystemExit) as exc:
        _generation(monkeypatch, bad)
    assert "engine_cpus" in str(exc.value) or "ENGINE_CPUS" in str(exc.value)
