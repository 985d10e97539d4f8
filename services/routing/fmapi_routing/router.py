"""Resolving an endpoint name to the model and replica that serve the next request.

Domain logic only: the replica lookup is passed in, so this is tested without Redis.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from fmapi_common.errors import FailedPrecondition, NotFound, Unavailable

from .endpoints import Endpoint, Registry
from .replicas import ReplicaInfo

Lookup = Callable[[str], Awaitable[list[ReplicaInfo]]]


@dataclass
class Resolution:
    endpoint: Endpoint
    model: str
    replica: ReplicaInfo


class Router:
    def __init__(self, registry: Registry, lookup: Lookup, rng: random.Random | None = None) -> None:
        self.registry = registry
        self._lookup = lookup
        self._rng = rng or random.Random()

    def endpoint(self, name: str) -> Endpoint:
        ep = self.registry.get(name)
        if ep is None:
            raise NotFound(
                f"endpoint '{name}' does not exist", param="model", reason="model_not_found"
            )
        return ep

    async def replicas(self, endpoint: Endpoint, model: str) -> list[ReplicaInfo]:
        live = [
            *await self._lookup(model),
            *(
                ReplicaInfo(id=f"static:{addr}", address=addr, models=[model])
                for addr in self.registry.static_replicas.get(model, [])
            ),
        ]
        dedicated = [r for r in live if r.dedicated_endpoint == endpoint.name]
        if endpoint.capacity_mode == "provisioned_throughput" and dedicated:
            return dedicated
        # Pay-per-token traffic never lands on capacity reserved for another endpoint.
        return [r for r in live if not r.dedicated_endpoint]

    def _choose(self, candidates: list[ReplicaInfo]) -> ReplicaInfo:
        """Power of two choices on reported load: cheap and avoids herding."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return a if a.inflight <= b.inflight else b

    async def resolve(self, name: str) -> Resolution:
        ep = self.endpoint(name)
        if ep.retired:
            raise FailedPrecondition(
                f"endpoint '{name}' is retired; use '{ep.replacement}' instead",
                param="model",
                reason="endpoint_retired",
            )
        for candidate in [ep, *(self.endpoint(f) for f in ep.fallbacks)]:
            model = candidate.pick_model(self._rng)
            live = await self.replicas(candidate, model)
            if live:
                return Resolution(candidate, model, self._choose(live))
        raise Unavailable(
            f"endpoint '{name}' has no live replica right now; retry shortly",
            reason="no_replica",
            retry_after=1.0,
        )
