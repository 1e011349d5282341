"""The HTTP side: the FastAPI app, its routes, and how a job's answer goes back to the client (whole, or streamed
as server-sent events)."""
from __future__ import annotations

import asyncio
import hmac
import json
import sys
import traceback

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import api
from .api import ApiError
from .engine import Cancelled, Engine, Job
from .limits import BodyLimit


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    """The app serving `engine`; with api_key, every /v1 endpoint requires it."""
    app = FastAPI(title="dualblade", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine = engine
    app.state.api_key = api_key.encode() if api_key else None
    app.add_middleware(BodyLimit, limit=engine.limits.max_body)
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _internal)
    app.include_router(router)
    return app


def serve_forever(app: FastAPI, sock, log_level: str = "warning") -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                            timeout_keep_alive=5)
    uvicorn.Server(config).run(sockets=[sock])


# --- errors: every one in the OpenAI shape ---------------------------------------------------------------------

async def _api_error(request: Request, exc: ApiError):
    return exc.response()


async def _http_error(request: Request, exc: StarletteHTTPException):
    what = {404: f"no such endpoint: {request.method} {request.url.path}",
            405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    return ApiError(exc.status_code, what, code={404: "not_found", 405: "method_not_allowed"}.get(
        exc.status_code)).response()


async def _validation_error(request: Request, exc: RequestValidationError):
    return ApiError(400, str(exc.errors()[0].get("msg", "invalid request")) if exc.errors() else
                    "invalid request").response()


async def _internal(request: Request, exc: Exception):
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return ApiError(500, f"internal error ({type(exc).__name__}); see the server's log",
                    type="server_error").response()


# --- routes ------------------------------------------------------------------------------------------------------

async def authorized(request: Request) -> Engine:
    """The app's engine, for a request that carries the API key (when the server has one)."""
    key = request.app.state.api_key
    if key is not None:
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key)):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return request.app.state.engine


router = APIRouter()


@router.get("/health")
async def health():
    return {"status": "ok"}


def _model_card(engine: Engine) -> dict:
    return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "dualblade"}


@router.get("/v1/models")
async def models(engine: Engine = Depends(authorized)):
    return {"object": "list", "data": [_model_card(engine)]}


@router.get("/v1/models/{model_id:path}")
async def model(model_id: str, engine: Engine = Depends(authorized)):
    if model_id != engine.model_id:
        raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
    return _model_card(engine)


@router.get("/v1/kv")
async def kv(engine: Engine = Depends(authorized)):
    return await asyncio.to_thread(engine.stats)


@router.post("/v1/chat/completions")
async def chat(request: Request, engine: Engine = Depends(authorized)):
    body = api.parse(api.ChatRequest, await request.body())
    return await _answer(request, engine, "chat", api.chat_kwargs(engine, body), body)


@router.post("/v1/completions")
async def completions(request: Request, engine: Engine = Depends(authorized)):
    body = api.parse(api.CompletionRequest, await request.body())
    return await _answer(request, engine, "completion", api.completion_kwargs(engine, body), body)


# --- answers -----------------------------------------------------------------------------------------------------

async def _watch(request: Request, engine: Engine, job: Job, until: asyncio.Event) -> None:
    """Cancels the job when the client disconnects."""
    while not until.is_set():
        if await request.is_disconnected():
            engine.cancel(job)
            return
        try:
            await asyncio.wait_for(until.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


async def _answer(request: Request, engine: Engine, kind: str, kwargs: dict, body):
    job = Job(kind, kwargs, bool(body.stream), asyncio.get_running_loop())
    engine.submit(job)
    first_seen = asyncio.Event()
    watcher = asyncio.create_task(_watch(request, engine, job, first_seen))
    try:
        event, value = await job.events.get()  # the first chunk, the whole answer or an error
    except asyncio.CancelledError:
        engine.cancel(job)
        raise
    finally:
        first_seen.set()
        await watcher
    if event == "error":
        if isinstance(value, Cancelled):
            return ApiError(499, "the client closed the request", type="cancelled").response()
        raise value
    if event == "done" and not job.stream:
        result, usage = value
        result["usage"] = {**(result.get("usage") or {}), **usage}
        return result
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    async def events():
        ev, val = event, value
        last = None
        try:
            while True:
                if ev == "chunk":
                    last = val
                    yield {"data": json.dumps(val)}
                elif ev == "done":
                    if include_usage and last is not None:
                        yield {"data": json.dumps({"id": last["id"], "object": last["object"],
                                                   "created": last["created"], "model": last["model"],
                                                   "choices": [], "usage": val[1]})}
                    yield {"data": "[DONE]"}
                    return
                else:  # an error after the first chunk: the stream ends with it
                    if not isinstance(val, Cancelled):
                        err = val if isinstance(val, ApiError) else ApiError(500, "internal error",
                                                                               type="server_error")
                        yield {"data": json.dumps(err.body())}
                    return
                ev, val = await job.events.get()
        finally:
            engine.cancel(job)  # the client went away (or the stream ended): nothing more is generated for it

    return EventSourceResponse(events(), sep="\n", ping=15)
