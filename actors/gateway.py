"""The ingress deployment: the public gRPC service specserve.v1.SpeculativeGeneration (through
Serve's gRPC proxy: methods named as the RPCs) and the OpenAI-style HTTP API (through Serve's HTTP
proxy), both over the engine deployment.

Errors at the boundary: a bad field is INVALID_ARGUMENT / HTTP 400 naming it; a full queue is
RESOURCE_EXHAUSTED / HTTP 503; a failed target rank or engine replica is UNAVAILABLE / HTTP 503
(retriable: the group is rebuilt, the replica replaced). With an API token set (env SPECSERVE_API_TOKEN, from a Secret),
every call but /healthz needs "authorization: Bearer <token>", else UNAUTHENTICATED / HTTP 401.
A client that goes away (cancel, deadline) cancels the engine call, which frees the sequence on
the coordinator, the target ranks and its draft replica."""


import hmac
import json
import os
import time
import uuid

import grpc
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError
from specserve.v1 import generation_pb2 as pb

from specserve.cluster.api import (chat_chunk_json, chat_completion_json, chat_request_from_json, chat_usage_chunk_json,
                         check_limits, completion_json, fill_proto, request_from_json, request_from_proto)
from specserve.cluster.client import API_TOKEN_ENV
from specserve.cluster.runtime.requests import check_request_fields
from specserve.cluster.speculation import InvalidRequest, Unavailable

from .metrics import RequestMetrics

http = FastAPI(title="specserve")


def _invalid(e: BaseException, aliases: dict | None = None) -> "InvalidRequest | None":
    """The InvalidRequest behind an error from the engine (Serve wraps what a replica raises),
    its field renamed to what the client sent (aliases: engine name -> the client's)."""
    for candidate in (e, getattr(e, "cause", None), getattr(e, "__cause__", None)):
        if isinstance(candidate, InvalidRequest):
            return InvalidRequest((aliases or {}).get(candidate.field, candidate.field), candidate.message)
    return None


def _unavailable(e: BaseException) -> str | None:
    """Why a request failed for a reason a retry can fix (a target rank or the engine replica
    died), or None. The innermost error first: a RayTaskError subclasses its cause's class, and its
    text is the whole remote traceback."""
    for candidate in (getattr(e, "cause", None), getattr(e, "__cause__", None), e):
        if isinstance(candidate, Unavailable):
            return f"unavailable, retry: {candidate}"
        if isinstance(candidate, RayActorError):
            return f"unavailable, retry: the engine replica failed ({type(candidate).__name__})"
    return None


_RETRY_AFTER = {"Retry-After": "1"}


def _max_tokens_field(body) -> str:
    """The key an OpenAI client sent its output cap in."""
    sent = [k for k in ("max_completion_tokens", "max_tokens") if isinstance(body, dict) and body.get(k) is not None]
    return sent[0] if sent else "max_tokens"


def _http_error(status: int, field: str | None, message: str, kind: str = "invalid_request_error",
                headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": field}}, status_code=status, headers=headers)


_UNAUTHENTICATED = "missing or wrong API token: send 'authorization: Bearer <token>'"


class _Unauthenticated(Exception):
    pass


@serve.deployment
@serve.ingress(http)
class Gateway:
    def __init__(self, engine, config_data: dict):
        from specserve.cluster.config import parse_config

        self.engine = engine
        self.engine_stream = engine.options(stream=True)  # unary and streaming calls queue apart
        self.config = parse_config(config_data, "gateway config")
        self.max_k = self.config.speculation.max_draft_tokens
        self.default_max_new = self.config.serve.max_new_tokens
        self.limits = self.config.serve.limits
        self.metrics = RequestMetrics()
        self._bearer = f"Bearer {os.environ[API_TOKEN_ENV]}".encode() if os.environ.get(API_TOKEN_ENV) else None

    def _authorized(self, header: str | None) -> bool:
        return self._bearer is None or (header is not None and hmac.compare_digest(header.encode(), self._bearer))

    def _grpc_auth(self, grpc_context):
        header = next((v for k, v in grpc_context.invocation_metadata() if k == "authorization"), None)
        if not self._authorized(header):
            grpc_context.set_code(grpc.StatusCode.UNAUTHENTICATED)
            grpc_context.set_details(_UNAUTHENTICATED)
            raise _Unauthenticated(_UNAUTHENTICATED)

    def _http_auth(self, raw: Request) -> JSONResponse | None:
        if self._authorized(raw.headers.get("authorization")):
            return None
        return _http_error(401, "authorization", _UNAUTHENTICATED, "authentication_error", {"WWW-Authenticate": "Bearer"})

    def _check(self, request, max_tokens_field: str = "max_new_tokens"):
        check_request_fields(request, self.max_k)
        return check_limits(request, self.limits, max_tokens_field)

    def _check_proto(self, request: pb.GenerateRequest):
        size = request.ByteSize()
        if size > self.limits.max_request_bytes:
            raise InvalidRequest("request", f"is {size} bytes, over serve.limits.max_request_bytes "
                                            f"({self.limits.max_request_bytes})")
        return self._check(request_from_proto(request, self.default_max_new))

    # -- gRPC: specserve.v1.SpeculativeGeneration ---------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, grpc_context) -> pb.GenerateResponse:
        with self.metrics.request("grpc", "Generate", grpc_context) as m:
            self._grpc_auth(grpc_context)
            try:
                r = self._check_proto(request)
                result = await self.engine.generate.remote(r)
            except Exception as e:  # noqa: BLE001 - mapped to a status, or raised as INTERNAL
                self._grpc_error(e, grpc_context)
            m.tokens(len(result.token_ids))
            return fill_proto(pb.GenerateResponse(), result.token_ids, result.text, result)

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context):
        with self.metrics.request("grpc", "GenerateStream", grpc_context) as m:
            self._grpc_auth(grpc_context)
            try:
                r = self._check_proto(request)
                async for out in self.engine_stream.stream.remote(r):
                    m.tokens(len(out["token_ids"]))
                    yield fill_proto(pb.GenerateResponse(), out["token_ids"], out["text"], out["result"])
            except Exception as e:  # noqa: BLE001
                self._grpc_error(e, grpc_context)

    async def Health(self, request: pb.HealthRequest, grpc_context) -> pb.HealthResponse:
        self._grpc_auth(grpc_context)
        return pb.HealthResponse(**await self.engine.health.remote())

    @staticmethod
    def _grpc_error(e: BaseException, grpc_context):
        """Raises e with its status set: Serve's proxy sends a code set before an exception."""
        invalid = _invalid(e)
        if invalid is not None:
            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            grpc_context.set_details(str(invalid))
        elif isinstance(e, BackPressureError):
            grpc_context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
            grpc_context.set_details(f"overloaded: {e}")
        elif (reason := _unavailable(e)) is not None:
            grpc_context.set_code(grpc.StatusCode.UNAVAILABLE)
            grpc_context.set_details(reason)
        raise e

    # -- HTTP: OpenAI-compatible -------------------------------------------------------------
    @http.post("/v1/completions")
    async def completions(self, raw: Request):
        return await self._route(raw, "completions", self._completions)

    @http.post("/v1/chat/completions")
    async def chat_completions(self, raw: Request):
        return await self._route(raw, "chat_completions", self._chat)

    async def _route(self, raw: Request, name: str, handler):
        """An HTTP route: authenticated, measured, its status recorded."""
        with self.metrics.request("http", name) as m:
            response = self._http_auth(raw) or await handler(raw, m)
            m.code = str(response.status_code)
            return response

    async def _completions(self, raw, m):
        def events(rid, created, model, include_usage):
            chunk = lambda out: completion_json(rid, created, model, out["text"], out["result"], chunk=True)  # noqa: E731
            return [], chunk, lambda result: []

        parse = lambda body: (*request_from_json(body, self.default_max_new), False)  # noqa: E731
        return await self._openai(raw, m, parse, "cmpl", completion_json, events)

    async def _chat(self, raw, m):
        def events(rid, created, model, include_usage):
            def chunk(out):
                delta = {"content": out["text"]} if out["text"] or out["result"] is None else {}
                return chat_chunk_json(rid, created, model, delta, out["result"], include_usage)

            first = [chat_chunk_json(rid, created, model, {"role": "assistant", "content": ""}, None, include_usage)]
            usage = lambda result: [chat_usage_chunk_json(rid, created, model, result)] if include_usage else []  # noqa: E731
            return first, chunk, usage

        parse = lambda body: chat_request_from_json(body, self.default_max_new)  # noqa: E731
        return await self._openai(raw, m, parse, "chatcmpl", chat_completion_json, events)

    async def _openai(self, raw, m, parse, prefix: str, unary, events):
        """One OpenAI route: parse(body) -> (request, stream, include_usage); unary(id, created, model,
        text, result) -> the response; events(id, created, model, include_usage) -> the stream's
        (first events, chunk(out), last(result))."""
        try:
            body = await self._body(raw)
            request, stream, include_usage = parse(body)
            aliases = {"max_new_tokens": _max_tokens_field(body)}  # engine errors name what the client sent
            self._check(request, aliases["max_new_tokens"])
        except InvalidRequest as e:
            return _http_error(400, e.field, str(e))
        rid, created, model = f"{prefix}-{uuid.uuid4().hex}", int(time.time()), self.config.target.model
        if stream:
            first, chunk, last = events(rid, created, model, include_usage)
            return StreamingResponse(self._events(request, first, chunk, last, aliases), media_type="text/event-stream")
        try:
            result = await self.engine.generate.remote(request)
        except Exception as e:  # noqa: BLE001
            return self._http_exception(e, aliases)
        m.tokens(len(result.token_ids))
        return JSONResponse(unary(rid, created, model, result.text, result))

    async def _body(self, raw: Request):
        data = await raw.body()
        if len(data) > self.limits.max_request_bytes:
            raise InvalidRequest("body", f"is {len(data)} bytes, over serve.limits.max_request_bytes "
                                         f"({self.limits.max_request_bytes})")
        try:
            return json.loads(data or b"null")
        except ValueError as e:  # UnicodeDecodeError included
            raise InvalidRequest("body", f"not JSON: {e}") from None

    async def _events(self, request, first: list[dict], chunk, last, aliases: dict):
        """Server-sent events: `first`, chunk(out) for each engine delta, last(result) at the end."""
        try:
            for event in first:
                yield f"data: {json.dumps(event)}\n\n"
            async for out in self.engine_stream.stream.remote(request):
                self.metrics.stream_tokens(len(out["token_ids"]))
                yield f"data: {json.dumps(chunk(out))}\n\n"
                if out["result"] is not None:
                    for event in last(out["result"]):
                        yield f"data: {json.dumps(event)}\n\n"
        except Exception as e:  # noqa: BLE001 - the status is sent already: report in the stream
            invalid, unavailable = _invalid(e, aliases), _unavailable(e)
            kind = "invalid_request_error" if invalid else "unavailable" if unavailable else "server_error"
            error = {"message": str(invalid or unavailable or e), "type": kind,
                     "param": invalid.field if invalid else None}
            yield f"data: {json.dumps({'error': error})}\n\n"
        yield "data: [DONE]\n\n"

    @staticmethod
    def _http_exception(e: BaseException, aliases: dict):
        invalid = _invalid(e, aliases)
        if invalid is not None:
            return _http_error(400, invalid.field, str(invalid))
        if isinstance(e, BackPressureError):
            return _http_error(503, None, f"overloaded: {e}", "overloaded", _RETRY_AFTER)
        if (reason := _unavailable(e)) is not None:
            return _http_error(503, None, reason, "unavailable", _RETRY_AFTER)
        raise e

    @http.get("/v1/models")
    async def models(self, raw: Request):
        if (denied := self._http_auth(raw)) is not None:
            return denied
        return {"object": "list", "data": [{"id": self.config.target.model, "object": "model", "owned_by": "specserve"}]}

    @http.get("/healthz")
    async def healthz(self):
        return await self.engine.health.remote()
