"""REST routes: OpenAI paths, Databricks-style paths and the control plane."""

from __future__ import annotations

import asyncio

import prometheus_client
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from google.protobuf import field_mask_pb2
from pydantic import ValidationError

from fmapi.routing.v1 import routing_pb2
from fmapi_common import endpoints
from fmapi_common.errors import FmapiError, InvalidArgument, NotFound
from fmapi_common.router import endpoint_ready

from . import (
    console,
    generation,
    generation_views,
    metrics,
    openai_embeddings,
    openai_generation,
    serving_endpoints,
)
from .backends import Backends
from .callers import IdentityMiddleware, require_admin, require_query
from .config import GatewayConfig
from .tokens_api import TokensApi
from .usage_api import UsageApi
from .embeddings import embed
from .http_common import (
    JSON,
    ClientDisconnected,
    RequestContextMiddleware,
    error_response,
    internal_error,
    read_json,
    unless_disconnected,
)
from .quota import UsageTags
from .tasks import TASK_NAMES, check_endpoint_name
from .openapi import endpoint_openapi
from .views import openai_model


class Api:
    def __init__(self, config: GatewayConfig, backends: Backends, tokens: TokensApi,
                 usage: UsageApi | None = None) -> None:
        self.config = config
        self.backends = backends
        self.tokens = tokens
        self.usage_api = usage or UsageApi(None, None)

    # ---------------------------------------------------------------- inference

    async def embeddings(self, request: Request, endpoint: str | None = None) -> JSON:
        body = await read_json(request, self.config.max_body_bytes)
        req = openai_embeddings.parse_request(body, endpoint)
        result = await unless_disconnected(request, embed(
            self.backends,
            caller(request),
            req["endpoint"],
            req["inputs"],
            usage_tags(request, body),
            dimensions=req["dimensions"],
            instruction=req["instruction"],
        ))
        return JSON(openai_embeddings.render(result, req["encoding_format"]),
                    headers={**result.headers, SERVED_MODEL: result.model})

    async def openai_embeddings(self, request: Request) -> JSON:
        return await self.embeddings(request)

    async def generate(self, request: Request, chat: bool, endpoint: str | None = None):
        body = await read_json(request, self.config.max_body_bytes)
        parse = openai_generation.parse_chat if chat else openai_generation.parse_completion
        call = parse(body, endpoint)
        tags = usage_tags(request, body)
        return await unless_disconnected(request, self._generate(caller(request), call, tags))

    async def _generate(self, ident, call: openai_generation.GenerationCall, tags: UsageTags):
        # Everything that can refuse the request happens here, before any byte is sent.
        run = await generation.start(self.backends, ident, call, tags)
        limits = {**(run.meter.headers if run.meter is not None else {}), SERVED_MODEL: run.model}
        if call.stream:
            return _RunStream(run, headers={"cache-control": "no-cache", "x-accel-buffering": "no",
                                            **limits})
        return JSON(await generation_views.collect(run), headers=limits)

    async def chat_completions(self, request: Request):
        return await self.generate(request, chat=True)

    async def completions(self, request: Request):
        return await self.generate(request, chat=False)

    async def invocations(self, request: Request):
        """Databricks' per-endpoint path: the endpoint's task decides the request shape."""
        name = path_endpoint(request, "name")
        require_query(caller(request), name)
        ep = await self._endpoint(name, "name")
        if ep.task == routing_pb2.TASK_EMBEDDINGS:
            return await self.embeddings(request, endpoint=name)
        if ep.task in (routing_pb2.TASK_CHAT, routing_pb2.TASK_COMPLETIONS):
            return await self.generate(request, chat=ep.task == routing_pb2.TASK_CHAT, endpoint=name)
        raise InvalidArgument(f"endpoint '{name}' has no task this gateway can invoke", param="name")

    # ---------------------------------------------------------------- models / endpoints

    async def list_models(self, request: Request) -> JSON:
        eps = await self._visible(request)
        return JSON({"object": "list", "data": [openai_model(e) for e in eps if not e.retired]})

    async def get_model(self, request: Request) -> JSON:
        name = path_endpoint(request, "model")
        require_query(caller(request), name)
        return JSON(openai_model(await self._endpoint(name, "model")))

    async def list_serving_endpoints(self, request: Request) -> JSON:
        eps, live = await asyncio.gather(self._visible(request), self.backends.live_models())
        replicas = self.backends.registry.view.replicas
        return JSON({"endpoints": [serving_endpoints.render(e, endpoint_ready(e, live), replicas)
                                   for e in eps]})

    async def _readable(self, request: Request) -> routing_pb2.Endpoint:
        name = path_endpoint(request, "name")
        ident = caller(request)
        if not ident.admin:
            require_query(ident, name)
        # From routing, which reads the registry in Redis: this gateway's copy may not have a
        # change made a moment ago through another gateway (the SDK's create().result() and
        # update_config().result() read right after the write, and the copy arrives some
        # milliseconds later). Control-plane reads pay this call, never inference.
        try:
            resp = await self.backends.admin(
                "GetEndpoint", routing_pb2.GetEndpointRequest(name=name))
        except NotFound as exc:
            raise NotFound(exc.message, param="name", reason=exc.reason) from None
        return resp.endpoint

    async def get_serving_endpoint(self, request: Request) -> JSON:
        ep = await self._readable(request)
        return JSON(self._render(ep))

    async def get_openapi(self, request: Request) -> JSON:
        ep = await self._readable(request)
        return JSON(endpoint_openapi(ep.name, TASK_NAMES.get(ep.task, ""), ep.description))

    def _render(self, ep: routing_pb2.Endpoint) -> dict:
        view = self.backends.registry.view
        return serving_endpoints.render(ep, endpoint_ready(ep, view.live_models()), view.replicas)

    # ---------------------------------------------------------------- endpoints (admin)

    async def _admin_body(self, request: Request) -> dict:
        require_admin(caller(request))
        body = await read_json(request, self.config.max_body_bytes)
        if not isinstance(body, dict):
            raise InvalidArgument("the request body must be a JSON object")
        return body

    async def _changed(self, version: int) -> None:
        """Answer once this gateway's copy of the registry holds the change (so a read that
        follows a write through the same gateway sees it)."""
        await self.backends.registry.wait_for_version(version, timeout=2.0)

    async def create_serving_endpoint(self, request: Request) -> JSON:
        body = await self._admin_body(request)
        ep = serving_endpoints.create_request(body)
        check_endpoint_name(ep.name, "name")
        resp = await self.backends.admin(
            "CreateEndpoint", routing_pb2.CreateEndpointRequest(endpoint=ep))
        await self._changed(resp.version)
        return JSON(self._render(resp.endpoint))

    async def _update(self, name: str, ep: routing_pb2.Endpoint, paths: list[str]):
        ep.name = name
        resp = await self.backends.admin("UpdateEndpoint", routing_pb2.UpdateEndpointRequest(
            endpoint=ep, update_mask=field_mask_pb2.FieldMask(paths=paths)))
        await self._changed(resp.version)
        return resp.endpoint

    async def update_config(self, request: Request) -> JSON:
        body = await self._admin_body(request)
        name = path_endpoint(request, "name")
        ep, paths = serving_endpoints.served_config(body, param="config")
        return JSON(self._render(await self._update(name, ep, paths)))

    async def put_ai_gateway(self, request: Request) -> JSON:
        body = await self._admin_body(request)
        name = path_endpoint(request, "name")
        ep, paths = serving_endpoints.ai_gateway(body, param="ai_gateway")
        if not paths:
            raise InvalidArgument("the body sets nothing: give rate_limits, "
                                  "usage_tracking_config, inference_table_config or fallback_config")
        return JSON(serving_endpoints.render_ai_gateway(await self._update(name, ep, paths)))

    async def retire_endpoint(self, request: Request) -> JSON:
        """fmapi's ``POST /api/2.0/fmapi/endpoints/{name}/retire`` ``{"replacement": NAME}``:
        callers of the retired name are told to use the replacement."""
        body = await self._admin_body(request)
        name = path_endpoint(request, "name")
        replacement = body.get("replacement")
        if not isinstance(replacement, str) or not replacement:
            raise InvalidArgument("'replacement' must name the endpoint callers should use",
                                  param="replacement")
        check_endpoint_name(replacement, "replacement")
        ep = routing_pb2.Endpoint(retired=True, replacement=replacement)
        return JSON(self._render(await self._update(name, ep, ["retired", "replacement"])))

    async def delete_serving_endpoint(self, request: Request) -> JSON:
        require_admin(caller(request))
        name = path_endpoint(request, "name")
        resp = await self.backends.admin("DeleteEndpoint", routing_pb2.DeleteEndpointRequest(name=name))
        await self._changed(resp.version)
        return JSON({})

    async def apply_endpoints(self, request: Request) -> JSON:
        """fmapi's declarative apply (``fmapi endpoints apply -f FILE``): the YAML's endpoints."""
        body = await self._admin_body(request)
        declared = body.get("endpoints")
        if not isinstance(declared, list):
            raise InvalidArgument("'endpoints' must be an array of endpoints", param="endpoints")
        prune = body.get("prune", False)
        if not isinstance(prune, bool):
            raise InvalidArgument("'prune' must be true or false", param="prune")
        eps = []
        for i, d in enumerate(declared):
            try:
                eps.append(endpoints.to_pb(endpoints.Endpoint.model_validate(d)))
            except ValidationError as exc:
                raise endpoints.invalid_argument(exc, f"endpoints[{i}]") from None
        resp = await self.backends.admin(
            "ApplyEndpoints", routing_pb2.ApplyEndpointsRequest(endpoints=eps, prune=prune))
        await self._changed(resp.version)
        return JSON({"created": list(resp.created), "updated": list(resp.updated),
                     "unchanged": list(resp.unchanged), "deleted": list(resp.deleted),
                     "version": resp.version})

    async def _visible(self, request: Request) -> list[routing_pb2.Endpoint]:
        """Endpoints the caller's token may query (admins see every endpoint)."""
        ident = caller(request)
        eps = await self.backends.list_endpoints()
        return [e for e in eps if ident.admin or ident.may_query(e.name)]

    # ---------------------------------------------------------------- usage

    async def usage(self, request: Request) -> JSON:
        return JSON(await self.usage_api.usage(caller(request), request.query_params))

    async def inference_table(self, request: Request) -> JSON:
        require_admin(caller(request))
        name = path_endpoint(request, "name")
        return JSON(await self.usage_api.payloads(name, request.query_params))

    async def endpoint_metrics(self, request: Request) -> Response:
        require_admin(caller(request))
        ep = await self._endpoint(path_endpoint(request, "name"), "name")
        return Response(metrics.endpoint_export(ep.name),
                        media_type=prometheus_client.CONTENT_TYPE_LATEST)

    # ---------------------------------------------------------------- tokens (admin)

    async def token_create(self, request: Request) -> JSON:
        ident = caller(request)
        require_admin(ident)
        return JSON(await self.tokens.create(ident, await read_json(request, self.config.max_body_bytes)))

    async def token_list(self, request: Request) -> JSON:
        ident = caller(request)
        require_admin(ident)
        return JSON(await self.tokens.list(ident))

    async def token_delete(self, request: Request) -> JSON:
        require_admin(caller(request))
        return JSON(await self.tokens.delete(await read_json(request, self.config.max_body_bytes)))

    async def _endpoint(self, name: str, param: str) -> routing_pb2.Endpoint:
        try:
            return await self.backends.get_endpoint(name)
        except NotFound as exc:
            raise NotFound(exc.message, param=param, reason=exc.reason) from None

    # ---------------------------------------------------------------- health

    async def healthz(self, request: Request) -> JSON:
        services = await self.backends.health()
        services["gateway"] = "SERVING"
        registry = services.pop("registry")
        view = self.backends.registry.view
        live = view.live_models()
        eps = [e.name for e in view.endpoints.values() if not e.retired and not endpoint_ready(e, live)]
        ok = view.loaded and all(v == "SERVING" for v in services.values()) and not eps
        body = {"status": "ok" if ok else "unavailable", "services": services, "registry": registry}
        if eps:
            body["endpoints_without_replicas"] = eps
        return JSON(body, status_code=200 if ok else 503)


class _RunStream(StreamingResponse):
    """The SSE response of a run. Closing the run (cancel, settle) is the stream's own last step;
    this also closes it when the response ends before the stream ever started (a client gone
    between the first message and the first byte): closing twice does nothing."""

    def __init__(self, run: generation.Run, headers: dict[str, str]) -> None:
        super().__init__(generation_views.stream(run), media_type="text/event-stream", headers=headers)
        self._run = run

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._run.close()


# Which served model answered (an endpoint may split its traffic between several).
SERVED_MODEL = "x-fmapi-served-model"


def usage_tags(request: Request, body: dict) -> UsageTags:
    """The request's id (Envoy's x-request-id) and what the body attaches to its usage record."""
    return UsageTags.from_body(request.scope["state"]["request_id"], body)


def caller(request: Request):
    """The verified identity (set by IdentityMiddleware on every non-public path)."""
    return request.scope["state"]["identity"]


def path_endpoint(request: Request, key: str) -> str:
    """The endpoint name in path parameter ``key``, checked before it goes anywhere."""
    name = request.path_params[key]
    check_endpoint_name(name, key)
    return name


def build_app(config: GatewayConfig, backends: Backends, tokens: TokensApi,
              usage: UsageApi | None = None) -> RequestContextMiddleware:
    api = Api(config, backends, tokens, usage)
    routes = [
        Route("/healthz", api.healthz, methods=["GET"]),
        Route("/v1/embeddings", api.openai_embeddings, methods=["POST"]),
        Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/models", api.list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", api.get_model, methods=["GET"]),
        Route("/serving-endpoints/embeddings", api.openai_embeddings, methods=["POST"]),
        Route("/serving-endpoints/chat/completions", api.chat_completions, methods=["POST"]),
        Route("/serving-endpoints/completions", api.completions, methods=["POST"]),
        Route("/serving-endpoints/{name}/invocations", api.invocations, methods=["POST"]),
        Route("/api/2.0/serving-endpoints", api.list_serving_endpoints, methods=["GET"]),
        Route("/api/2.0/serving-endpoints", api.create_serving_endpoint, methods=["POST"]),
        Route("/api/2.0/serving-endpoints/{name}", api.get_serving_endpoint, methods=["GET"]),
        Route("/api/2.0/serving-endpoints/{name}", api.delete_serving_endpoint, methods=["DELETE"]),
        Route("/api/2.0/serving-endpoints/{name}/config", api.update_config, methods=["PUT"]),
        Route("/api/2.0/serving-endpoints/{name}/ai-gateway", api.put_ai_gateway, methods=["PUT"]),
        Route("/api/2.0/serving-endpoints/{name}/openapi", api.get_openapi, methods=["GET"]),
        Route("/api/2.0/fmapi/endpoints/apply", api.apply_endpoints, methods=["POST"]),
        Route("/api/2.0/usage", api.usage, methods=["GET"]),
        Route("/api/2.0/serving-endpoints/{name}/inference-table", api.inference_table,
              methods=["GET"]),
        Route("/api/2.0/serving-endpoints/{name}/metrics", api.endpoint_metrics, methods=["GET"]),
        Route("/api/2.0/fmapi/endpoints/{name}/retire", api.retire_endpoint, methods=["POST"]),
        Route("/api/2.0/token/create", api.token_create, methods=["POST"]),
        Route("/api/2.0/token/list", api.token_list, methods=["GET"]),
        Route("/api/2.0/token/delete", api.token_delete, methods=["POST"]),
    ]

    async def on_fmapi_error(request: Request, exc: FmapiError):
        return error_response(exc)

    async def on_http_error(request: Request, exc: HTTPException):
        if exc.status_code == 405:
            err = InvalidArgument(f"method {request.method} is not allowed on {request.url.path}")
            resp = error_response(err)
            resp.status_code = 405
            return resp
        return error_response(NotFound(f"no route for {request.method} {request.url.path}"))

    async def on_disconnect(request: Request, exc: Exception):
        return Response(status_code=499)  # nobody reads it: the client has gone

    async def on_unexpected(request: Request, exc: Exception):
        # Answers in the standard shape; Starlette re-raises, RequestContextMiddleware logs it.
        return internal_error(request.state.request_id)

    app = Starlette(
        routes=routes,
        exception_handlers={
            FmapiError: on_fmapi_error,
            HTTPException: on_http_error,
            ClientDisconnected: on_disconnect,  # while the answer was being prepared
            ClientDisconnect: on_disconnect,  # while the body was being read
            Exception: on_unexpected,
        },
    )
    # /v1/embeddings/ is not /v1/embeddings: a 404, not a redirect built from the Host header.
    app.router.redirect_slashes = False
    # The web console's static files (/console/) need no identity: they are answered before
    # IdentityMiddleware; every data call the console makes is an ordinary API call.
    return RequestContextMiddleware(console.ConsoleFiles(
        IdentityMiddleware(app, config.identity_key_bytes()), config.console_dir))
