"""Clients of the session's system, authenticated with its bootstrap admin token."""

from __future__ import annotations

import httpx
import openai
import pytest


@pytest.fixture(scope="session")
def client(system):
    """The official OpenAI SDK, pointed at Envoy."""
    return openai.OpenAI(base_url=f"{system.base_url}/v1", api_key=system.admin_token, max_retries=0)


@pytest.fixture(scope="session")
def http(system):
    """A raw HTTP client through Envoy, for what the SDK does not send."""
    headers = {"authorization": f"Bearer {system.admin_token}"}
    with httpx.Client(base_url=system.base_url, timeout=120, headers=headers) as c:
        yield c
