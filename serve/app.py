"""The ASGI app (Starlette): OpenAI's routes over one loaded model.

    POST /v1/chat/completions   messages through the model's chat template; stream or not
    POST /v1/completions        a raw prompt (text or token ids); stream or not
    GET  /v1/models[/{id}]      the one model served, named after its folder or bundle (or as told)
    GET  /health                {"status": "ok", queued, running, ..., prompt_cache}

With an API key, every request but those to /health (and OPTIONS) must carry
`Authorization: Bearer KEY`; others get OpenAI's 401 before any route runs.

Request bodies are parsed and checked (and chat templates rendered) on a worker thread
before any response starts; generation runs in the Engine. If the client disconnects,
its job is cancelled, streaming or not.
"""

from __future__ import annotations

import hmac
import json
import logging
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator, Awaitable, Callable

import anyio
import anyio.to_thread
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from edgellama.runtime.model import Model
from edgellama.runtime.prompt_cache import PromptCache, default_cache_bytes

from . import check_api_key, default_model_id
from .engine import Engine, Job
from .protocol import (Answer, APIError, Done, Plan, check_model, error_for, parse_json, plan_chat,
                       plan_completion)

log = logging.getLogger("edgellama.serve")
MAX_BODY = 16 * 2**20  # bytes; chat templates refuse more than 2 M characters of content anyway


def create_app(model: Model, model_id: str | None = None, max_concurrent: int = 4,
               cache_bytes: int | None = None, speculation: dict | None = None,
               api_key: str | None = None) -> Starlette:
    """model_id: the name served (None: default_model_id of the model's folder or bundle);
    cache_bytes: the prompt cache's size (None: default_cache_bytes; 0: no cache);
    speculation: speculate= / draft_tokens= for every generation (GenerationConfig fields);
    api_key: if set, every route but /health needs `Authorization: Bearer <api_key>`."""
    if api_key is not None:
        check_api_key(api_key)
    model_id = model_id or default_model_id(model.folder)
    cache_bytes = default_cache_bytes(model) if cache_bytes is None else cache_bytes
    cache = PromptCache(model, cache_bytes) if cache_bytes > 0 else None
    engine = Engine(model, max_concurrent, cache, speculation)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        engine.close()

    async def chat_completions(request: Request) -> Response:
        return await _complete(request, plan_chat)

    async def completions(request: Request) -> Response:
        return await _complete(request, plan_completion)

    async def _complete(request: Request, make_plan: Callable[[dict, Model, str], Plan]) -> Response:
        body = parse_json(await _read_body(request))
        plan = await anyio.to_thread.run_sync(make_plan, body, model, model_id)  # templates, tokenizer: off the loop
        answer = Answer(plan, model, model_id)
        job = engine.submit(plan.prompt_ids, plan.config)
        if plan.stream:
            return EventStream(answer, job)
        done = await _until_disconnect(request.receive, job, _collect(answer, job))
        return JSONResponse(answer.body(done)) if done else Response(status_code=499)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [_model_card(model, model_id)]})

    async def one_model(request: Request) -> Response:
        check_model({"model": request.path_params["name"]}, model_id)
        return JSONResponse(_model_card(model, model_id))

    async def health(request: Request) -> Response:
        caching = {"prompt_cache": cache.stats()} if cache is not None else {}
        return JSONResponse({"status": "ok", "model": model_id, **engine.stats(), **caching})

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", one_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    middleware = [Middleware(RequireKey, api_key=api_key)] if api_key is not None else []
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan, middleware=middleware)
    app.router.redirect_slashes = False  # a trailing slash is a 404, not a 307 the client must follow
    app.state.engine, app.state.model_id, app.state.api_key_required = engine, model_id, api_key is not None
    return app


NO_KEY = ("You didn't provide an API key. You need to provide your API key in an Authorization header "
          "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). This server's key is the one it was "
          "started with (--api-key or EDGELLAMA_API_KEY).")
WRONG_KEY = ("Incorrect API key provided. This server accepts only the key it was started with "
             "(--api-key or EDGELLAMA_API_KEY).")
OPEN_PATHS = frozenset({"/health"})


class RequireKey:
    """ASGI middleware: an HTTP request without `Authorization: Bearer <api_key>` gets
    OpenAI's 401 (`invalid_request_error`; code null when no key was sent, as OpenAI's,
    `invalid_api_key` for a wrong one) and never reaches a route, streamed or not.
    /health and OPTIONS pass (a CORS preflight carries no credentials); so does lifespan."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app, self._key = app, api_key.encode("ascii")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        given = _bearer(scope)
        if given is not None and hmac.compare_digest(given, self._key):
            await self.app(scope, receive, send)
            return
        error = (APIError(401, NO_KEY) if given is None else
                 APIError(401, WRONG_KEY, code="invalid_api_key"))
        response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _bearer(scope: Scope) -> bytes | None:
    """The token of the request's first Authorization header if its scheme is Bearer
    (any case); None if there is none, or it is empty."""
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            token = token.strip()
            return token if scheme.lower() == b"bearer" and token else None
    return None


async def _read_body(request: Request) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise APIError(413, f"the request body is over {MAX_BODY // 2**20} MiB; send less",
                           code="request_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _collect(answer: Answer, job: Job) -> Done:
    async for event in job.events():
        if isinstance(event, BaseException):
            raise event
        if isinstance(event, Done):
            return event
        answer.feed(event)
    raise RuntimeError("generation ended without a Done")  # pragma: no cover


async def _until_disconnect(receive: Receive, job: Job, work: Awaitable[Done | None]) -> Done | None:
    """Run `work`; if the client disconnects first, cancel the job and return None.
    What `work` raises is raised here (not wrapped in an exception group)."""
    outcome: list = []
    async with anyio.create_task_group() as tg:
        async def run() -> None:
            try:
                outcome.append(await work)
            except Exception as exc:  # noqa: BLE001 - re-raised below, outside the task group
                outcome.append(exc)
            tg.cancel_scope.cancel()

        tg.start_soon(run)
        try:
            await _disconnected(receive)
        finally:
            job.cancel()  # no-op once the job has ended
        tg.cancel_scope.cancel()
    if outcome and isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0] if outcome else None


async def _disconnected(receive: Receive) -> None:
    """Returns when the client has gone (the request body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. A client
    that disconnects cancels the job (whatever ASGI version the server speaks)."""

    def __init__(self, answer: Answer, job: Job):
        self.answer, self.job = answer, job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await _until_disconnect(receive, self.job, self._stream(send))

    async def _stream(self, send: Send) -> Done | None:
        async def event(data: str) -> None:
            await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})

        done = None
        try:
            for chunk in self.answer.head():
                await event(_dumps(chunk))
            async for item in self.job.events():
                if isinstance(item, BaseException):  # the status is sent: report it in the stream
                    error = error_for(item)
                    if error.status == 500:  # a bug; 503 is a shutdown
                        log.error("generation failed", exc_info=item)
                    await event(_dumps(error.body()))
                elif isinstance(item, Done):
                    done = item
                    for chunk in self.answer.tail(item):
                        await event(_dumps(chunk))
                else:
                    for chunk in self.answer.feed(item):
                        await event(_dumps(chunk))
            await event("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except OSError:  # servers on ASGI 2.4 raise on a send to a closed connection
            self.job.cancel()
        return done


def _dumps(obj: dict) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def _model_card(model: Model, model_id: str) -> dict:
    created = int(Path(model.folder).stat().st_mtime)
    return {"id": model_id, "object": "model", "created": created, "owned_by": "edgellama",
            "context_length": model.context_length}


async def _api_error(request: Request, exc: Exception) -> Response:
    error = error_for(exc)
    return JSONResponse(error.body(), status_code=error.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    message = f"{request.method} {request.url.path}: {exc.detail}"
    return JSONResponse(APIError(exc.status_code, message, code=code).body(), status_code=exc.status_code,
                        headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    error = error_for(exc)
    if error.status == 500:  # a bug; 503 is a shutdown
        log.error("request failed", exc_info=exc)
    return JSONResponse(error.body(), status_code=error.status)
