"""The endpoint registry in Redis, shared by every routing replica, and the changes made to it.

Keys::

    fmapi:registry:endpoints   hash: endpoint name -> the endpoint as JSON (its declared fields and
                               the registry's bookkeeping: config version, pending config, times)
    fmapi:registry:version     increases with every change
    fmapi:registry:models      hash: model -> replica kind, every model a replica ever served
    fmapi:registry:changes     pub/sub channel: every change (endpoints and replicas) publishes
                               here, so every routing replica rebuilds its view at once

Every change is one Lua script that checks the endpoints it touches are as the caller read them
(optimistic concurrency, so two routing replicas never lose each other's change), writes them,
bumps the version and publishes, atomically.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import redis.asyncio as redis
from google.protobuf import field_mask_pb2
from pydantic import ValidationError
from redis.exceptions import RedisError, ResponseError

from fmapi.routing.v1 import routing_pb2 as pb
from fmapi_common.endpoints import (REGISTRY_KEY, Endpoint, Registry, broken_reference, from_pb,
                                    invalid_argument, to_pb)
from fmapi_common.errors import (
    AlreadyExists,
    Conflict,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    Unavailable,
)

ENDPOINTS, VERSION, MODELS = REGISTRY_KEY, "fmapi:registry:version", "fmapi:registry:models"
CHANNEL = "fmapi:registry:changes"
# What a replica's heartbeat that reports a new load, and changes nothing else, publishes there
# (every other change publishes something else): routing views may take their time with it.
LOAD_MESSAGE = "l"

# ARGV: channel, then per endpoint: name, the JSON the caller read ('' = absent), the new JSON
# ('' = delete). Returns the new version, or {err} naming an endpoint changed meanwhile.
_WRITE = """
for i = 2, #ARGV, 3 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i]) or ''
  if cur ~= ARGV[i + 1] then return redis.error_reply('CONFLICT ' .. ARGV[i]) end
end
for i = 2, #ARGV, 3 do
  if ARGV[i + 2] == '' then redis.call('HDEL', KEYS[1], ARGV[i])
  else redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 2]) end
end
local v = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[1], 'e' .. v)
return v
"""

# Top-level fields UpdateEndpoint may replace.
UPDATABLE = ("served_entities", "provisioned_throughput", "capacity_mode", "limits", "ai_gateway",
             "fallbacks", "tags", "description", "retired", "replacement")
_MAX_ATTEMPTS = 5


def _now_ms() -> int:
    return int(time.time() * 1000)


# Where a broken reference of the endpoint being created or updated lies in the REST request
# (``PUT .../ai-gateway``'s ``fallback_config.endpoints``, the retire call's ``replacement``).
def _rest_field(field: str) -> str:
    if field.startswith("fallbacks"):
        return "ai_gateway.fallback_config.endpoints" + field.removeprefix("fallbacks")
    return field


def _fields_of(name: str) -> Callable[[str, str], str]:
    """``param`` for a create or update of endpoint ``name``: its own fields as the REST request
    spells them; a reference of another endpoint's that broke names the endpoint."""
    return lambda endpoint, field: _rest_field(field) if endpoint == name else "name"


def _check_registry(endpoints: dict[str, Endpoint], error=FailedPrecondition, *,
                    param: Callable[[str, str], str] | None = None) -> None:
    """References between endpoints hold (fallbacks, replacements); ``error`` otherwise, its
    ``param`` the field at fault: ``param(endpoint, field)`` when given, else
    ``<endpoint>.<field>`` of the endpoint at fault."""
    broken = broken_reference(endpoints)
    if broken is None:
        try:  # any other invariant of a whole registry
            Registry(endpoints=list(endpoints.values()))
        except ValidationError as exc:
            raise error(exc.errors()[0]["msg"].removeprefix("Value error, "),
                        param="endpoints") from None
        return
    name, field, message = broken
    raise error(message, param=param(name, field) if param else f"{name}.{field}")


def _unavailable() -> Unavailable:
    """What every registry read or write raises when Redis cannot be reached."""
    return Unavailable("the endpoint registry (Redis) is unavailable; retry shortly",
                       retry_after=1.0)


class RegistryStore:
    def __init__(self, client: redis.Redis) -> None:
        self._r = client
        self._write = client.register_script(_WRITE)

    async def snapshot(self) -> tuple[int, dict[str, str]]:
        """(version, name -> stored JSON), read together."""
        try:
            async with self._r.pipeline(transaction=True) as p:
                p.get(VERSION)
                p.hgetall(ENDPOINTS)
                version, raw = await p.execute()
        except (RedisError, OSError):
            raise _unavailable() from None
        return int(version or 0), {k.decode(): v.decode() for k, v in raw.items()}

    async def get(self, name: str) -> str | None:
        """One endpoint's stored JSON, as Redis has it now (None: no such endpoint)."""
        try:
            raw = await self._r.hget(ENDPOINTS, name)
        except (RedisError, OSError):
            raise _unavailable() from None
        return None if raw is None else raw.decode()

    async def models(self) -> dict[str, int]:
        """Every model a replica ever served, with its replica kind."""
        try:
            raw = await self._r.hgetall(MODELS)
        except (RedisError, OSError):
            raise _unavailable() from None
        return {k.decode(): int(v) for k, v in raw.items()}

    async def write(self, changes: list[tuple[str, str, str]]) -> int:
        """Apply ``(name, JSON as read or '', new JSON or '')`` together; Conflict if any endpoint
        changed since it was read."""
        args = [CHANNEL]
        for change in changes:
            args.extend(change)
        try:
            return int(await self._write(keys=[ENDPOINTS, VERSION], args=args))
        except ResponseError as exc:
            if str(exc).startswith("CONFLICT"):
                raise Conflict(f"endpoint '{str(exc)[9:]}' was changed by another update; retry",
                               param="name") from None
            raise
        except (RedisError, OSError):
            raise _unavailable() from None


def _dump(ep: Endpoint) -> str:
    return ep.model_dump_json()


class ControlPlane:
    """Create, update, delete and apply endpoints. ``live_models`` says which models have a live
    replica now (a change of served entities waits for them)."""

    def __init__(self, store: RegistryStore, live_models: Callable[[], set[str]]) -> None:
        self.store = store
        self._live = live_models

    async def _read(self) -> tuple[dict[str, str], dict[str, Endpoint]]:
        _, raw = await self.store.snapshot()
        return raw, {n: Endpoint.model_validate_json(j) for n, j in raw.items()}

    async def _check_models(self, entities, current: dict[str, Endpoint], where: str) -> dict[str, int]:
        """Every served model must be one fmapi knows: one a replica has served, or one another
        endpoint already names. Returns the known models' replica kinds."""
        known = await self.store.models()
        named = {se.model for ep in current.values() for se in ep.served_entities}
        for i, se in enumerate(entities):
            if se.model not in known and se.model not in named:
                raise InvalidArgument(
                    f"model '{se.model}' is unknown: no model server has registered it",
                    param=f"{where}[{i}].entity_name")
        return known

    async def create(self, msg: pb.Endpoint) -> tuple[Endpoint, int]:
        for _ in range(_MAX_ATTEMPTS):
            raw, current = await self._read()
            if msg.name in current:
                raise AlreadyExists(f"endpoint '{msg.name}' already exists", param="name")
            kinds = await self._check_models(msg.served_entities, current, "config.served_entities")
            if msg.task == pb.TASK_UNSPECIFIED and msg.served_entities:
                # The task follows from the model: what its servers do.
                kind = kinds.get(msg.served_entities[0].model)
                msg.task = pb.TASK_EMBEDDINGS if kind == pb.REPLICA_KIND_EMBEDDING else pb.TASK_CHAT
            try:
                ep = from_pb(msg)
            except (ValidationError, ValueError) as exc:
                raise invalid_argument(exc, "") from None
            now = _now_ms()
            ep = ep.model_copy(update={"config_version": 1, "config_update": "NOT_UPDATING",
                                       "pending_served_entities": [], "create_time_ms": now,
                                       "update_time_ms": now})
            _check_registry({**current, ep.name: ep}, param=_fields_of(ep.name))
            try:
                return ep, await self.store.write([(ep.name, "", _dump(ep))])
            except Conflict:
                continue
        raise Conflict(f"endpoint '{msg.name}' keeps changing; retry", param="name")

    async def update(self, msg: pb.Endpoint, mask: field_mask_pb2.FieldMask) -> tuple[Endpoint, int]:
        paths = list(mask.paths)
        bad = [p for p in paths if p.split(".", 1)[0] not in UPDATABLE]
        if not paths or bad:
            raise InvalidArgument(f"update_mask may name only {', '.join(UPDATABLE)} (or fields "
                                  "within them)",
                                  param="update_mask")
        for _ in range(_MAX_ATTEMPTS):
            raw, current = await self._read()
            old = current.get(msg.name)
            if old is None:
                raise NotFound(f"endpoint '{msg.name}' does not exist", param="name")
            ep = await self._updated(old, msg, paths, current)
            _check_registry({**current, ep.name: ep}, param=_fields_of(ep.name))
            try:
                return ep, await self.store.write([(ep.name, raw[ep.name], _dump(ep))])
            except Conflict:
                continue
        raise Conflict(f"endpoint '{msg.name}' keeps changing; retry", param="name")

    async def _updated(self, old: Endpoint, msg: pb.Endpoint, paths: list[str],
                       current: dict[str, Endpoint]) -> Endpoint:
        merged = to_pb(old)
        field_mask_pb2.FieldMask(paths=paths).MergeMessage(msg, merged, True, True)
        served_change = "served_entities" in paths
        if served_change:
            if old.config_update == "IN_PROGRESS":
                raise Conflict(
                    f"an update of endpoint '{old.name}' is in progress (waiting for replicas of "
                    f"{', '.join(se.model for se in old.pending_served_entities)}); wait for it "
                    "to finish", param="config")
            await self._check_models(msg.served_entities, current, "config.served_entities")
        try:
            ep = from_pb(merged)
        except (ValidationError, ValueError) as exc:
            raise invalid_argument(exc, "") from None
        if ep.task != old.task:
            raise InvalidArgument("an endpoint's task cannot change", param="task")
        update: dict = {"update_time_ms": _now_ms()}
        if served_change and [s.model_dump() for s in ep.served_entities] != [
                s.model_dump() for s in old.served_entities]:
            live = self._live()
            if all(se.model in live for se in ep.served_entities):
                update |= {"config_version": old.config_version + 1, "config_update": "NOT_UPDATING",
                           "pending_served_entities": []}
            else:
                # The old config serves until the new models have live replicas.
                update |= {"served_entities": old.served_entities,
                           "pending_served_entities": ep.served_entities,
                           "config_update": "IN_PROGRESS"}
        return ep.model_copy(update=update)

    async def promote(self, live: set[str], timeout_ms: int) -> None:
        """Pending configs whose models are now live replace the current ones; those that waited
        longer than ``timeout_ms`` fail (the current config keeps serving)."""
        raw, current = await self._read()
        now = _now_ms()
        for name, ep in current.items():
            if ep.config_update != "IN_PROGRESS":
                continue
            if all(se.model in live for se in ep.pending_served_entities):
                new = ep.model_copy(update={
                    "served_entities": ep.pending_served_entities, "pending_served_entities": [],
                    "config_update": "NOT_UPDATING", "config_version": ep.config_version + 1,
                    "update_time_ms": now})
            elif now - ep.update_time_ms > timeout_ms:
                new = ep.model_copy(update={"pending_served_entities": [],
                                            "config_update": "UPDATE_FAILED", "update_time_ms": now})
            else:
                continue
            try:
                await self.store.write([(name, raw[name], _dump(new))])
            except Conflict:
                pass  # another routing replica did it, or the endpoint changed: next round

    async def delete(self, name: str) -> int:
        for _ in range(_MAX_ATTEMPTS):
            raw, current = await self._read()
            if name not in current:
                raise NotFound(f"endpoint '{name}' does not exist", param="name")
            rest = {n: e for n, e in current.items() if n != name}
            users = [f"'{n}' " + ("falls back to it" if name in e.fallbacks
                                  else "names it as its replacement")
                     for n, e in sorted(rest.items()) if name in e.fallbacks or e.replacement == name]
            if users:
                raise FailedPrecondition(f"endpoint '{name}' cannot be deleted: endpoint "
                                         f"{'; endpoint '.join(users)}; change that first",
                                         param="name")
            _check_registry(rest, param=lambda *_: "name")
            try:
                return await self.store.write([(name, raw[name], "")])
            except Conflict:
                continue
        raise Conflict(f"endpoint '{name}' keeps changing; retry", param="name")

    async def apply(self, declared: list[pb.Endpoint], prune: bool) -> pb.ApplyEndpointsResponse:
        eps: list[Endpoint] = []
        for i, msg in enumerate(declared):
            try:
                eps.append(from_pb(msg))
            except (ValidationError, ValueError) as exc:
                raise invalid_argument(exc, f"endpoints[{i}]") from None
        names = [e.name for e in eps]
        if len(names) != len(set(names)):
            raise InvalidArgument("the list names an endpoint twice", param="endpoints")
        index = {n: i for i, n in enumerate(names)}
        for _ in range(_MAX_ATTEMPTS):
            raw, current = await self._read()
            out = pb.ApplyEndpointsResponse()
            changes, result = [], dict(current)
            now = _now_ms()
            for ep in eps:
                old = current.get(ep.name)
                if old is not None and old.declared() == ep.declared():
                    out.unchanged.append(ep.name)
                    continue
                served_same = old is not None and old.served_entities == ep.served_entities
                new = ep.model_copy(update={
                    "config_version": (old.config_version + (0 if served_same else 1)) if old else 1,
                    "config_update": "NOT_UPDATING", "pending_served_entities": [],
                    "create_time_ms": old.create_time_ms if old else now, "update_time_ms": now})
                result[ep.name] = new
                changes.append((ep.name, raw.get(ep.name, ""), _dump(new)))
                (out.updated if old else out.created).append(ep.name)
            if prune:
                for name in sorted(set(current) - {e.name for e in eps}):
                    del result[name]
                    changes.append((name, raw[name], ""))
                    out.deleted.append(name)
            _check_registry(result, InvalidArgument, param=lambda n, f: (
                f"endpoints[{index[n]}].{f}" if n in index else "endpoints"))
            if not changes:
                out.version = (await self.store.snapshot())[0]
                return out
            try:
                out.version = await self.store.write(changes)
            except Conflict:
                continue
            return out
        raise Conflict("the registry keeps changing; apply again")

