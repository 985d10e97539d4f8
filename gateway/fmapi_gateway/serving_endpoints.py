"""The managed product's serving-endpoint objects <-> fmapi's endpoints (``routing.v1.Endpoint``).

Requests in Databricks' shapes (``POST /api/2.0/serving-endpoints``, ``PUT .../config``,
``PUT .../ai-gateway``) become an endpoint plus the fields they change (a field mask); endpoints
become the JSON ``databricks-sdk`` reads. Shape errors are 400s naming the Databricks field;
the registry's own rules (models, references, traffic adding up to 100) are checked by routing.

fmapi's additions, all optional: ``task`` and ``capacity_mode`` on create; ``input_tokens`` and
``output_tokens`` in rate limits (beside ``calls`` and ``tokens``); ``endpoints`` in
``fallback_config`` (other endpoints to try after the served entities); ``limits`` (the
endpoint's full fmapi limits) when reading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from google.protobuf import json_format

from fmapi.routing.v1 import routing_pb2 as pb
from fmapi_common.endpoints import MODES, TASKS, name_served
from fmapi_common.errors import InvalidArgument

from .quota import service_principal_default
from .tasks import TASK_NAMES

_UPDATE_NAMES = {
    pb.CONFIG_UPDATE_STATE_NOT_UPDATING: "NOT_UPDATING",
    pb.CONFIG_UPDATE_STATE_IN_PROGRESS: "IN_PROGRESS",
    pb.CONFIG_UPDATE_STATE_UPDATE_FAILED: "UPDATE_FAILED",
}
_KEYS = ("endpoint", "user", "service_principal")
_MAX_ENTITIES = 16
_MAX_LIMITS = 256


# ---------------------------------------------------------------- reading request bodies


def _obj(value, param: str) -> Mapping:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"'{param}' must be an object", param=param)
    return value


def _list(value, param: str, most: int) -> list:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(f"'{param}' must be an array", param=param)
    if len(value) > most:
        raise InvalidArgument(f"'{param}' has more than {most} entries", param=param)
    return value


def _str(value, param: str, *, required: bool = False, most: int = 255) -> str:
    if value is None or value == "":
        if required:
            raise InvalidArgument(f"'{param}' is required", param=param)
        return ""
    if not isinstance(value, str) or len(value) > most:
        raise InvalidArgument(f"'{param}' must be a string of at most {most} characters",
                              param=param)
    return value


def _count(value, param: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**53:
        raise InvalidArgument(f"'{param}' must be a whole number from 0 to 2^53", param=param)
    return value


def _fraction(value, param: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise InvalidArgument(f"'{param}' must be a number in (0, 1]", param=param)
    return float(value)


def _bool(value, param: str) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(f"'{param}' must be true or false", param=param)
    return value


def served_config(config: Mapping, param: str = "config") -> tuple[pb.Endpoint, list[str]]:
    """``config`` (served entities, traffic) as endpoint fields, and their mask paths."""
    config = _obj(config, param)
    raw = _list(config.get("served_entities", config.get("served_models")),
                f"{param}.served_entities", _MAX_ENTITIES)
    if not raw:
        raise InvalidArgument(f"'{param}.served_entities' needs at least one entity",
                              param=f"{param}.served_entities")
    out = pb.Endpoint()
    throughput = None
    for i, se in enumerate(raw):
        where = f"{param}.served_entities[{i}]"
        se = _obj(se, where)
        model = _str(se.get("entity_name", se.get("model_name")), f"{where}.entity_name",
                     required=True, most=128)
        name = _str(se.get("name"), f"{where}.name", most=63)
        lo = _count(se.get("min_provisioned_throughput"), f"{where}.min_provisioned_throughput")
        hi = _count(se.get("max_provisioned_throughput"), f"{where}.max_provisioned_throughput")
        if hi or lo:
            if lo > hi:
                raise InvalidArgument("'min_provisioned_throughput' exceeds the maximum",
                                      param=f"{where}.min_provisioned_throughput")
            if throughput is not None and throughput != (lo, hi):
                raise InvalidArgument("every served entity of an endpoint has the same "
                                      "provisioned throughput", param=where)
            throughput = (lo, hi)
        out.served_entities.add(name=name, model=model, traffic_percentage=0)
    _traffic(out, _obj(config.get("traffic_config"), f"{param}.traffic_config"), param)
    paths = ["served_entities"]
    if throughput is not None:
        lo, hi = throughput
        out.capacity_mode = pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT
        out.provisioned_throughput.CopyFrom(pb.ProvisionedThroughput(
            min_tokens_per_second=lo, max_tokens_per_second=hi,
            chunk_tokens_per_second=lo or hi))
        paths += ["capacity_mode", "provisioned_throughput"]
    return out, paths


def _traffic(out: pb.Endpoint, traffic: Mapping, param: str) -> None:
    entities = out.served_entities
    routes = _list(traffic.get("routes"), f"{param}.traffic_config.routes", _MAX_ENTITIES)
    if not routes:
        if len(entities) > 1:
            raise InvalidArgument("several served entities need 'traffic_config.routes'",
                                  param=f"{param}.traffic_config.routes")
        entities[0].traffic_percentage = 100
        return
    try:
        name_served(entities)  # unnamed entities get the names routing would give them
    except ValueError as exc:
        raise InvalidArgument(str(exc), param=f"{param}.served_entities") from None
    by_name = {se.name: se for se in entities}
    for i, route in enumerate(routes):
        where = f"{param}.traffic_config.routes[{i}]"
        route = _obj(route, where)
        name = route.get("served_entity_name") or route.get("served_model_name")
        if name not in by_name:
            raise InvalidArgument(f"route names no served entity of this config: {name!r}",
                                  param=f"{where}.served_entity_name")
        pct = _count(route.get("traffic_percentage"), f"{where}.traffic_percentage")
        if pct > 100:
            raise InvalidArgument("'traffic_percentage' is at most 100",
                                  param=f"{where}.traffic_percentage")
        by_name[name].traffic_percentage = pct
    if sum(se.traffic_percentage for se in entities) != 100:
        raise InvalidArgument("traffic percentages must add up to 100",
                              param=f"{param}.traffic_config.routes")


def ai_gateway(body: Mapping, param: str = "ai_gateway") -> tuple[pb.Endpoint, list[str]]:
    """An ``ai_gateway`` object as endpoint fields, and their mask paths (only what it sets)."""
    body = _obj(body, param)
    out, paths = pb.Endpoint(), []
    if body.get("guardrails"):
        raise InvalidArgument("fmapi has no guardrails; leave 'guardrails' out",
                              param=f"{param}.guardrails")
    if "rate_limits" in body:
        _rate_limits(out.limits, _list(body["rate_limits"], f"{param}.rate_limits", _MAX_LIMITS),
                     f"{param}.rate_limits")
        paths += [f"limits.{f}" for f in ("requests_per_minute", "input_tokens_per_minute",
                                          "output_tokens_per_minute", "tokens_per_minute",
                                          "endpoint", "principals", "service_principal_default")]
    gw = out.ai_gateway
    if "usage_tracking_config" in body:
        cfg = _obj(body["usage_tracking_config"], f"{param}.usage_tracking_config")
        gw.usage_tracking_enabled = _bool(cfg.get("enabled"), f"{param}.usage_tracking_config.enabled")
        paths.append("ai_gateway.usage_tracking_enabled")
    if "inference_table_config" in body:
        where = f"{param}.inference_table_config"
        cfg = _obj(body["inference_table_config"], where)
        gw.inference_table.CopyFrom(pb.InferenceTableConfig(
            enabled=_bool(cfg.get("enabled"), f"{where}.enabled"),
            catalog_name=_str(cfg.get("catalog_name"), f"{where}.catalog_name"),
            schema_name=_str(cfg.get("schema_name"), f"{where}.schema_name"),
            table_name_prefix=_str(cfg.get("table_name_prefix"), f"{where}.table_name_prefix"),
            sampling_fraction=_fraction(cfg.get("sampling_fraction"), f"{where}.sampling_fraction")))
        paths.append("ai_gateway.inference_table")
    if "fallback_config" in body:
        where = f"{param}.fallback_config"
        cfg = _obj(body["fallback_config"], where)
        gw.fallback_enabled = _bool(cfg.get("enabled"), f"{where}.enabled")
        paths.append("ai_gateway.fallback_enabled")
        if "endpoints" in cfg:
            names = _list(cfg["endpoints"], f"{where}.endpoints", 16)
            out.fallbacks.extend(_str(n, f"{where}.endpoints[{i}]", required=True, most=63)
                                 for i, n in enumerate(names))
            paths.append("fallbacks")
    return out, paths


def _rate_limits(limits: pb.Limits, entries: list, param: str) -> None:
    """The managed product's ``rate_limits[]`` into ``limits``: one default per key (users,
    service principals; a key given no default is unlimited for its principals), one ceiling for
    the endpoint, and overrides for named principals, each read back with the key it was given."""
    defaults: dict[str, pb.RateLimits] = {}
    seen: set[tuple[str, str]] = set()
    for i, rl in enumerate(entries):
        where = f"{param}[{i}]"
        rl = _obj(rl, where)
        key = rl.get("key") or "endpoint"  # the managed product's default key
        if key not in _KEYS:
            raise InvalidArgument(f"'key' must be one of {', '.join(_KEYS)} (fmapi has no user "
                                  "groups)", param=f"{where}.key")
        period = rl.get("renewal_period", "minute")
        if period != "minute":
            raise InvalidArgument("'renewal_period' must be 'minute'", param=f"{where}.renewal_period")
        principal = _str(rl.get("principal"), f"{where}.principal", most=256)
        if key == "endpoint" and principal:
            raise InvalidArgument("an endpoint-wide limit names no principal",
                                  param=f"{where}.principal")
        values = pb.RateLimits(
            requests_per_minute=_count(rl.get("calls"), f"{where}.calls"),
            tokens_per_minute=_count(rl.get("tokens"), f"{where}.tokens"),
            input_tokens_per_minute=_count(rl.get("input_tokens"), f"{where}.input_tokens"),
            output_tokens_per_minute=_count(rl.get("output_tokens"), f"{where}.output_tokens"))
        if key != "endpoint" and not principal:
            if key in defaults:
                raise InvalidArgument(f"two default limits for key '{key}'", param=where)
            defaults[key] = values
            continue
        # A principal is one principal whatever key names it: one override each.
        ident = ("endpoint" if key == "endpoint" else "principal", principal)
        if ident in seen:
            raise InvalidArgument("two limits for the same key and principal", param=where)
        seen.add(ident)
        if key == "endpoint":
            limits.endpoint.CopyFrom(values)
        else:
            limits.principals.add(principal=principal, limits=values, key=key)
    users = defaults.get("user", pb.RateLimits())
    limits.requests_per_minute = users.requests_per_minute
    limits.tokens_per_minute = users.tokens_per_minute
    limits.input_tokens_per_minute = users.input_tokens_per_minute
    limits.output_tokens_per_minute = users.output_tokens_per_minute
    # Set even when absent: service principals then have no default, as in the managed product.
    limits.service_principal_default.CopyFrom(defaults.get("service_principal", pb.RateLimits()))


def create_request(body: Mapping) -> pb.Endpoint:
    """``POST /api/2.0/serving-endpoints`` as a new endpoint."""
    name = _str(body.get("name"), "name", required=True, most=63)
    ep, _ = served_config(body.get("config"))
    ep.name = name
    ep.description = _str(body.get("description"), "description", most=4096)
    if "task" in body:
        task = body.get("task")
        if task not in TASKS:
            raise InvalidArgument(f"'task' must be one of {', '.join(TASKS)}", param="task")
        ep.task = TASKS[task]
    if "capacity_mode" in body:
        mode = body.get("capacity_mode")
        if mode not in MODES:
            raise InvalidArgument(f"'capacity_mode' must be one of {', '.join(MODES)}",
                                  param="capacity_mode")
        ep.capacity_mode = MODES[mode]
    for i, tag in enumerate(_list(body.get("tags"), "tags", 64)):
        tag = _obj(tag, f"tags[{i}]")
        ep.tags[_str(tag.get("key"), f"tags[{i}].key", required=True)] = _str(
            tag.get("value"), f"tags[{i}].value")
    gateway = dict(_obj(body.get("ai_gateway"), "ai_gateway"))
    if body.get("rate_limits") is not None and "rate_limits" not in gateway:
        gateway["rate_limits"] = body["rate_limits"]  # the older top-level form
    if gateway:
        gw, _ = ai_gateway(gateway)
        ep.limits.MergeFrom(gw.limits)
        ep.ai_gateway.CopyFrom(gw.ai_gateway)
        ep.fallbacks.extend(gw.fallbacks)
    return ep


# ---------------------------------------------------------------- writing responses


def _live_replicas(ep: pb.Endpoint, replicas: Sequence[pb.Replica]) -> int:
    """Live replicas of one served model that take this endpoint's traffic (the router's rule:
    a provisioned-throughput endpoint's dedicated ones, else the shared ones)."""
    dedicated = sum(1 for r in replicas if r.dedicated_endpoint == ep.name)
    if ep.capacity_mode == pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT and dedicated:
        return dedicated
    return sum(1 for r in replicas if not r.dedicated_endpoint)


def _config(entities, ep: pb.Endpoint, version: int | None,
            replicas: Mapping[str, Sequence[pb.Replica]] | None = None) -> dict:
    throughput = {}
    if ep.capacity_mode == pb.CAPACITY_MODE_PROVISIONED_THROUGHPUT:
        throughput = {"min_provisioned_throughput": ep.provisioned_throughput.min_tokens_per_second,
                      "max_provisioned_throughput": ep.provisioned_throughput.max_tokens_per_second}
    out = {
        "served_entities": [
            {"name": se.name, "entity_name": se.model, "entity_version": "1",
             "foundation_model": {"name": se.model}, **throughput,
             # fmapi's addition: live replicas serving this entity's model for this endpoint.
             **({"live_replicas": _live_replicas(ep, replicas.get(se.model, ()))}
                if replicas is not None else {})}
            for se in entities
        ],
        "traffic_config": {"routes": [
            {"served_model_name": se.name, "served_entity_name": se.name,
             "traffic_percentage": se.traffic_percentage}
            for se in entities
        ]},
    }
    if version is not None:
        out["config_version"] = version
    return out


def _limit(key: str, values: pb.RateLimits | pb.Limits, principal: str = "") -> dict | None:
    out = {"key": key, "renewal_period": "minute"}
    if principal:
        out["principal"] = principal
    for name, value in (("calls", values.requests_per_minute), ("tokens", values.tokens_per_minute),
                        ("input_tokens", values.input_tokens_per_minute),
                        ("output_tokens", values.output_tokens_per_minute)):
        if value:
            out[name] = value
    return out if len(out) > (3 if principal else 2) else None


def render_ai_gateway(ep: pb.Endpoint) -> dict:
    lim = ep.limits
    entries = [_limit("endpoint", lim.endpoint), _limit("user", lim),
               _limit("service_principal", service_principal_default(lim)),
               *(_limit(p.key or "user", p.limits, p.principal) for p in lim.principals)]
    gw = ep.ai_gateway
    fallback = {"enabled": gw.fallback_enabled}
    if ep.fallbacks:
        fallback["endpoints"] = list(ep.fallbacks)
    table = json_format.MessageToDict(gw.inference_table, preserving_proto_field_name=True)
    table.setdefault("enabled", False)
    return {
        "rate_limits": [e for e in entries if e is not None],
        "usage_tracking_config": {"enabled": gw.usage_tracking_enabled},
        "inference_table_config": table,
        "fallback_config": fallback,
    }


def render(ep: pb.Endpoint, ready: bool,
           replicas: Mapping[str, Sequence[pb.Replica]] | None = None) -> dict:
    """The endpoint as ``GET /api/2.0/serving-endpoints/{name}`` returns it; with ``replicas``
    (live replicas by model), each served entity says how many serve it (``live_replicas``)."""
    body = {
        "name": ep.name,
        "id": ep.name,
        "task": TASK_NAMES.get(ep.task, ""),
        "endpoint_type": "FOUNDATION_MODEL_API",
        "description": ep.description,
        "creation_timestamp": ep.create_time_ms,
        "last_updated_timestamp": ep.update_time_ms,
        "creator": "fmapi",
        "state": {
            "ready": "READY" if ready else "NOT_READY",
            "config_update": _UPDATE_NAMES.get(ep.config_update, "NOT_UPDATING"),
        },
        "config": _config(ep.served_entities, ep, ep.config_version, replicas),
        "ai_gateway": render_ai_gateway(ep),
        "tags": [{"key": k, "value": v} for k, v in sorted(ep.tags.items())],
        "capacity_mode": next((k for k, v in MODES.items() if v == ep.capacity_mode),
                              "pay_per_token"),
        "limits": json_format.MessageToDict(ep.limits, preserving_proto_field_name=True),
        "permission_level": "CAN_QUERY",
    }
    if ep.pending_served_entities:
        body["pending_config"] = _config(ep.pending_served_entities, ep, None)
    if ep.retired:
        body["retired"] = True
        body["replacement"] = ep.replacement
    return body
