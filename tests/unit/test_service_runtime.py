"""How every service process runs: on which event loop, and what its garbage collector walks
once it serves."""

from __future__ import annotations

import asyncio
import gc
import sys
import weakref

import pytest
import uvloop

from fmapi_common import entry, server
from fmapi_common.config import ServiceConfig
from fmapi_gateway.config import GatewayConfig
from fmapi_routing.config import RoutingConfig


def _loop_type(monkeypatch, config_cls, name: str) -> type:
    """The type of event loop ``run_service`` serves ``config_cls``'s service on."""
    seen: list[type] = []

    async def serve(config):
        seen.append(type(asyncio.get_running_loop()))

    monkeypatch.setattr(sys, "argv", [f"fmapi-{name}"])
    monkeypatch.setattr(entry, "setup_logging", lambda *a: None)
    entry.run_service(config_cls, serve, name)
    return seen[0]


@pytest.fixture
def routing_env(monkeypatch):
    monkeypatch.setenv("FMAPI_ROUTING_ENDPOINTS_FILE", "x.yaml")
    monkeypatch.setenv("FMAPI_ROUTING_REDIS_URL", "redis://x")
    monkeypatch.setenv("FMAPI_ROUTING_INSECURE", "true")


def test_a_service_runs_on_uvloop_only_when_its_config_says_so(monkeypatch, routing_env):
    assert not issubclass(_loop_type(monkeypatch, RoutingConfig, "routing"), uvloop.Loop)
    monkeypatch.setenv("FMAPI_ROUTING_UVLOOP", "true")
    assert issubclass(_loop_type(monkeypatch, RoutingConfig, "routing"), uvloop.Loop)


def test_the_gateway_runs_on_uvloop_unless_told_otherwise(monkeypatch):
    for k, v in {"ROUTING_ADDR": "x:1", "AUTH_ADDR": "x:2", "QUOTA_ADDR": "x:3",
                 "IDENTITY_KEY": "k" * 32, "INSECURE": "true"}.items():
        monkeypatch.setenv(f"FMAPI_GATEWAY_{k}", v)
    assert issubclass(_loop_type(monkeypatch, GatewayConfig, "gateway"), uvloop.Loop)
    monkeypatch.setenv("FMAPI_GATEWAY_UVLOOP", "false")
    assert not issubclass(_loop_type(monkeypatch, GatewayConfig, "gateway"), uvloop.Loop)


class _Node:
    other: _Node | None = None


@pytest.fixture
def unfrozen(monkeypatch):
    """A process that has not frozen its heap yet, and no automatic collection meanwhile (only
    the ones the test makes happen); both restored afterwards."""
    monkeypatch.setattr(server, "_frozen", False)
    was_enabled = gc.isenabled()
    gc.disable()
    yield
    gc.unfreeze()
    if was_enabled:
        gc.enable()


async def test_going_to_serving_collects_the_garbage_and_freezes_what_lives_once(unfrozen):
    svc = await server.start_grpc_service(ServiceConfig(insecure=True), lambda s: [], policy={},
                                          serving=False)
    try:
        # A reference cycle nothing points to (garbage), and one that lives on.
        a, b = _Node(), _Node()
        a.other, b.other = b, a
        dead = weakref.ref(a)
        del a, b
        kept = _Node()
        kept.other = kept
        frozen_before = gc.get_freeze_count()
        assert dead() is not None  # not collected yet

        await svc.set_serving(True)
        assert dead() is None  # the garbage was collected, not frozen
        assert gc.get_freeze_count() > frozen_before
        # What lives is out of the collector's sight: no collection walks it again.
        assert not any(o is kept for o in gc.get_objects())

        # Only the first time: serving again later (usage does, after its database came back)
        # neither collects nor freezes again.
        later = _Node()
        later.other = later
        count = gc.get_freeze_count()
        await svc.set_serving(False)
        await svc.set_serving(True)
        # (frozen objects may die meanwhile, so the count may drop; none is added)
        assert gc.get_freeze_count() <= count
        assert any(o is later for o in gc.get_objects())
    finally:
        await svc.server.stop(0)
