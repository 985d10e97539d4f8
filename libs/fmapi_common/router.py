"""Choosing the model and replica that serve the next request to an endpoint.

One rule for every process that routes: the routing service (its ``ResolveEndpoint``) and each
gateway, which resolves from its own copy of the registry (:class:`View`, kept current by
``WatchRegistry``) with no call per request. Pure: no gRPC calls, no Redis.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from fmapi.routing.v1 import routing_pb2 as pb

from .errors import FailedPrecondition, NotFound, Unavailable


@dataclass
class View:
    """One consistent snapshot of the registry: endpoints by name, live replicas by model."""

    version: int = -1  # -1: nothing loaded yet
    endpoints: dict[str, pb.Endpoint] = field(default_factory=dict)
    replicas: dict[str, list[pb.Replica]] = field(default_factory=dict)

    @classmethod
    def of(cls, msg: pb.WatchRegistryResponse) -> View:
        by_model: dict[str, list[pb.Replica]] = {}
        for r in msg.replicas:
            for m in r.models:
                by_model.setdefault(m, []).append(r)
        for model, static in msg.static_replicas.items():
            by_model.setdefault(model, []).extend(
                pb.Replica(id=f"static:{a}", address=a, models=[model]) for a in static.addresses)
        return cls(msg.version, {e.name: e for e in msg.endpoints}, by_model)

    @property
    def loaded(self) -> bool:
        return self.version >= 0

    def require_loaded(self) -> None:
        if not self.loaded:
            raise Unavailable("the endpoint registry is not loaded yet; retry shortly",
                              reason="registry_loading", retry_after=1.0)

    def live_models(self) -> set[str]:
        return {m for m, rs in self.replicas.items() if rs}


@dataclass
class Resolution:
    endpoint: pb.Endpoint
    model: str
    replica: pb.Replica


def endpoint_ready(ep: pb.Endpoint, live_models: set[str]) -> bool:
    """Whether the endpoint serves every request now (``state.ready``): not retired, and every
    served entity that takes traffic has a live replica; with fallback between its entities
    enabled, one live entity is enough."""
    entities = list(ep.served_entities)
    if ep.retired or not entities:
        return False
    if ep.ai_gateway.fallback_enabled:
        return any(se.model in live_models for se in entities)
    taking = entities if len(entities) == 1 else [se for se in entities if se.traffic_percentage > 0]
    return bool(taking) and all(se.model in live_models for se in taking)


def no_such_endpoint(name: str) -> NotFound:
    """The error for a request naming an endpoint the registry does not hold."""
    return NotFound(f"endpoint '{name}' does not exist", param="model", reason="model_not_found")


class Router:
    """``view`` returns the current snapshot (it changes under the router between calls)."""

    def __init__(self, view: Callable[[], View], rng: random.Random | None = None) -> None:
        self._view = view
        self._rng = rng or random.Random()

    def endpoint(self, name: str) -> pb.Endpoint:
        view = self._view()
        view.require_loaded()
        ep = view.endpoints.get(name)
        if ep is None:
            raise no_such_endpoint(name)
        return ep

    def replicas(self, endpoint: pb.Endpoint, model: str) -> list[pb.Replica]:
        live = self._view().replicas.get(model, [])
        dedicated = [r for r in live if r.dedicated_endpoint == endpoint.name]
        if endpoint.capacity_mode == pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT and dedicated:
            return dedicated
        # Pay-per-token traffic never lands on capacity reserved for another endpoint.
        return [r for r in live if not r.dedicated_endpoint]

    def _models(self, ep: pb.Endpoint) -> list[str]:
        """The model the traffic split picks, then (fallback enabled) the endpoint's others."""
        entities = list(ep.served_entities)
        if len(entities) == 1:
            return [entities[0].model]
        picked = self._rng.choices(entities, weights=[se.traffic_percentage for se in entities])[0]
        if not ep.ai_gateway.fallback_enabled:
            return [picked.model]
        rest = [se.model for se in entities if se is not picked]
        return [picked.model, *dict.fromkeys(rest)]

    def _choose(self, candidates: list[pb.Replica]) -> pb.Replica:
        """Power of two choices on reported load: cheap and avoids herding."""
        if len(candidates) == 1:
            return candidates[0]
        a, b = self._rng.sample(candidates, 2)
        return a if a.inflight <= b.inflight else b

    def resolve(self, name: str, avoid: frozenset[str] = frozenset()) -> Resolution:
        """The endpoint, model and replica a request goes to. Replicas at an address in
        ``avoid`` (the caller just failed to reach them) are chosen only if nothing else is
        live."""
        ep = self.endpoint(name)
        if ep.retired:
            raise FailedPrecondition(
                f"endpoint '{name}' is retired; use '{ep.replacement}' instead",
                param="model",
                reason="endpoint_retired",
            )
        for candidate in [ep, *(self.endpoint(f) for f in ep.fallbacks)]:
            for model in self._models(candidate):
                live = self.replicas(candidate, model)
                if live:
                    reachable = [r for r in live if r.address not in avoid] or live
                    return Resolution(candidate, model, self._choose(reachable))
        raise Unavailable(
            f"endpoint '{name}' has no live replica right now; retry shortly",
            reason="no_replica",
            retry_after=1.0,
        )
