"""Looking at the tiny model's engine from a test: how many requests it is running."""

from __future__ import annotations

import time

import grpc

from fmapi.generation.v1 import generation_pb2, generation_pb2_grpc


def running_requests(system, model: str = "tiny") -> int:
    """Choices the model server's engine is queueing or decoding now (asked as the gateway)."""
    creds = system.tls_files("gateway").channel_credentials()
    with grpc.secure_channel(f"127.0.0.1:{system.ports[f'generation-{model}']}", creds,
                             options=[("grpc.ssl_target_name_override", "generation")]) as ch:
        info = generation_pb2_grpc.GenerationServiceStub(ch).GetModelInfo(
            generation_pb2.GetModelInfoRequest(), timeout=5)
    return info.running_requests


def wait_for(predicate, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)
