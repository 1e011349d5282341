"""`dualblade serve`: an OpenAI-compatible server on llama-cpp-python's server stack (FastAPI, uvicorn,
sse-starlette) and its request types (llama_cpp.server.types), whose conversations keep their KV on storage.

One model context serves the requests in arrival order (one worker thread; a bounded queue, full: 503 with
Retry-After). Before a prompt is evaluated, the saved conversation sharing the longest prefix with it is loaded
(Llama.load_session) when that prefix is longer than what the context already holds; after a chat reply, the
context is saved (Llama.save_session) into the server's own directory (dualblade/conversations.py).
"""
from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import functools
import gc
import hmac
import json
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Optional

import llama_cpp
import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .conversations import ConversationStore, common_prefix
from .errors import KVIOError, SessionError
from .llama import Llama

IDLE_RELEASE_S = 1.0  # how long the queue stays empty before the requests' memory is given back


class ApiError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


class Cancelled(Exception):
    """The client went away: its generation stops."""


class ServedLlama(Llama):
    """dualblade.Llama with a hook that runs when a prompt's tokens are known, before any is evaluated."""

    before_prompt = None

    def generate(self, tokens, *args, **kwargs):
        if self.before_prompt is not None:
            self.before_prompt(list(tokens))
        return super().generate(tokens, *args, **kwargs)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(CreateChatCompletionRequest):
    stream_options: Optional[StreamOptions] = None


class CompletionRequest(CreateCompletionRequest):
    stream_options: Optional[StreamOptions] = None


@dataclass
class Job:
    kind: str                      # "chat" | "completion"
    kwargs: dict
    stream: bool
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    info: dict = field(default_factory=dict)  # prompt tokens, cached tokens, resumed

    def put(self, kind: str, value: Any = None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is gone (shutdown)
            pass


@dataclass
class Limits:
    max_tokens: int
    queue: int
    max_body: int


class Engine:
    """The model context and the worker thread that serves the queue, one request at a time."""

    def __init__(self, llm: ServedLlama, model_id: str, store: ConversationStore | None, limits: Limits):
        self.llm, self.model_id, self.store, self.limits = llm, model_id, store, limits
        self.queue: queue.Queue = queue.Queue(maxsize=limits.queue)
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0, "rejected_queue_full": 0, "errors": 0,
                         "resumed": 0, "saved": 0, "prompt_tokens": 0, "prompt_tokens_evaluated": 0,
                         "completion_tokens": 0, "idle_releases": 0,
                         "released_after_requests": 0}  # how many requests had come when memory was last given back
        self._busy_s = []  # recent request durations, for Retry-After
        self._job: Job | None = None
        self.created = int(time.time())
        self._context_prompt_len = 0  # the prompt of the conversation the context holds
        llm.before_prompt = self._before_prompt
        self.thread = threading.Thread(target=self._run, name="dualblade-serve", daemon=True)
        self.thread.start()

    # --- the HTTP side -------------------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            self.counters["rejected_queue_full"] += 1
            avg = sum(self._busy_s) / len(self._busy_s) if self._busy_s else 1.0
            retry = max(1, int(avg * (self.queue.qsize() + 1) + 0.999))
            raise ApiError(503, f"the server is busy: {self.limits.queue} requests are waiting already; retry "
                                f"after {retry} s", type="server_error", code="queue_full",
                           headers={"Retry-After": str(retry)}) from None
        self.counters["requests"] += 1

    def stop(self) -> None:
        job = self._job
        if job is not None:
            job.cancel.set()
        while True:
            try:
                pending = self.queue.get_nowait()
            except queue.Empty:
                break
            if pending is not None:
                pending.cancel.set()
                pending.put("error", ApiError(503, "the server is shutting down", type="server_error"))
        self.queue.put(None)
        self.thread.join(timeout=60)

    def stats(self) -> dict:
        st = self.llm.kv_stats()
        st["server"] = {**self.counters, "queued": self.queue.qsize(), "queue_limit": self.limits.queue,
                        "n_ctx": self.llm.n_ctx(), "context_tokens": int(self.llm.n_tokens)}
        st["conversations"] = self.store.stats() if self.store is not None else None
        return st

    # --- the worker thread ---------------------------------------------------------------------------------
    def _run(self) -> None:
        idle = True
        while True:
            try:
                # once the queue has stayed empty for a while, the requests' memory goes back to the system
                job = self.queue.get(timeout=None if idle else IDLE_RELEASE_S)
            except queue.Empty:
                try:
                    release_idle_memory(self.llm)
                except KVIOError as e:  # writing back what was staged failed: the context starts empty again
                    print(f"dualblade serve: the KV storage failed at idle ({e.detail}); the context is reset",
                          file=sys.stderr)
                    self.counters["errors"] += 1
                    self.llm.reset()
                    self._context_prompt_len = 0
                self.counters["idle_releases"] += 1
                self.counters["released_after_requests"] = self.counters["requests"]
                idle = True
                continue
            if job is None:
                return
            idle = False
            if job.cancel.is_set():
                self.counters["cancelled"] += 1
                job.put("error", Cancelled())
                continue
            self._job = job
            t0 = time.perf_counter()
            try:
                self._serve(job)
            finally:
                self._job = None
                self._busy_s = (self._busy_s + [time.perf_counter() - t0])[-16:]

    def _check_cancel(self, *args):
        """eval_progress: raises Cancelled between the prompt's batches once the client is gone."""
        job = self._job
        if job is not None and job.cancel.is_set():
            raise Cancelled()

    def _end_if_cancelled(self, input_ids, scores):
        """A logits processor (llama.cpp calls it back: it must not raise): once the client is gone, the end of
        generation is the only token left, so the generation stops at the next token."""
        job = self._job
        if job is not None and job.cancel.is_set():
            scores = np.full_like(scores, -np.inf)
            scores[self.llm.token_eos()] = 0.0
        return scores

    def _before_prompt(self, tokens: list[int]) -> None:
        """Only a conversation that the prompt continues (the prompt starts with that conversation's whole
        earlier prompt) lends its KV: the one in the context, else the saved one that shares the longest prefix
        (loaded). Anything else is evaluated from the start, as a fresh process would (a prefix shared with
        another conversation, evaluated in other batches, could change the answer's last bits)."""
        llm, job = self.llm, self._job
        have = common_prefix(llm.input_ids[: llm.n_tokens], tokens)
        if have < self._context_prompt_len:
            have = 0
            llm.reset()  # n_tokens 0: llama-cpp-python evaluates the whole prompt
            llm._ctx.kv_cache_clear()  # the cells from index 0 again, as in a fresh context
        resumed = False
        if self.store is not None:
            saved, n = self.store.best(tokens)
            if saved is not None and n > have:
                try:
                    llm.load_session(self.store.path(saved.key))
                    self.store.touch(saved.key)
                    resumed = True
                    self.counters["resumed"] += 1
                except (SessionError, KVIOError) as e:
                    print(f"dualblade serve: saved conversation {saved.key[:12]} could not be loaded ({e}); "
                          "it is removed and the prompt evaluated", file=sys.stderr)
                    self.store.forget(saved.key)
                    llm.reset()
                    llm._ctx.kv_cache_clear()
        self._context_prompt_len = len(tokens)
        if job is not None:
            job.info.update(prompt_tokens=len(tokens), resumed=resumed)

    def _serve(self, job: Job) -> None:
        llm = self.llm
        before = llm.counters()
        kwargs = dict(job.kwargs)
        lp = llama_cpp.LogitsProcessorList([self._end_if_cancelled])
        if kwargs.get("logits_processor"):
            lp = llama_cpp.LogitsProcessorList(list(kwargs["logits_processor"]) + list(lp))
        kwargs["logits_processor"] = lp
        llm.eval_progress = self._check_cancel
        call = llm.create_chat_completion if job.kind == "chat" else llm.create_completion
        try:
            result = call(**kwargs, stream=job.stream)
            if job.stream:
                for chunk in result:
                    self._check_cancel()
                    job.put("chunk", chunk)
                result = None
            self._check_cancel()  # stopped early for a client that is gone: nothing to answer or save
            usage = self._usage(job, before)
            if job.kind == "chat" and self.store is not None:
                self.store.save(llm, job.info.get("prompt_tokens", 0))
                self.counters["saved"] += 1
            self.counters["completed"] += 1
            job.put("done", (result, usage))
        except Cancelled:
            self.counters["cancelled"] += 1
            job.put("error", Cancelled())
        except KVIOError as e:
            self.counters["errors"] += 1
            llm.reset()
            job.put("error", ApiError(500, f"the KV storage failed: {e.detail}; the server goes on with an empty "
                                           "context", type="server_error"))
        except ValueError as e:  # llama_cpp's refusals of what was asked: the prompt, the template, logprobs
            msg = str(e)
            if "exceed context window" in msg:
                job.put("error", ApiError(400, f"This model's maximum context length is {llm.n_ctx()} tokens; "
                                               f"the request needs more ({msg})", param="messages" if job.kind ==
                                          "chat" else "prompt", code="context_length_exceeded"))
            else:
                job.put("error", ApiError(400, msg or "invalid request"))
        except Exception as e:  # noqa: BLE001 - not the client's mistake: logged here, a plain 500 there
            self.counters["errors"] += 1
            traceback.print_exc(file=sys.stderr)
            job.put("error", ApiError(500, f"internal error ({type(e).__name__}); see the server's log",
                                      type="server_error"))
        finally:
            llm.eval_progress = None

    def _usage(self, job: Job, before: dict) -> dict:
        after = self.llm.counters()
        generated = after["sampled"] - before["sampled"]
        evaluated = max(after["eval_tokens"] - before["eval_tokens"] - max(generated - 1, 0), 0)
        prompt = job.info.get("prompt_tokens", evaluated)
        c = self.counters
        c["prompt_tokens"] += prompt
        c["prompt_tokens_evaluated"] += evaluated
        c["completion_tokens"] += generated
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
                "prompt_tokens_details": {"cached_tokens": max(prompt - evaluated, 0)},
                "resumed_from_storage": bool(job.info.get("resumed"))}


def release_idle_memory(llm: Llama | None = None) -> None:
    """What a burst of requests left behind goes back to the system: the staging pool's idle pages (kept
    while requests come, so that staging a layer costs no page faults), the cycles llama-cpp-python's
    samplers form (their C buffers are freed only with them: an idle process never collects), then the free
    pages of every malloc arena (glibc; elsewhere a no-op)."""
    if llm is not None:
        llm.kv_trim()
    gc.collect()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's malloc_trim, looked up once (find_library runs ldconfig); None elsewhere."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


# --- requests ------------------------------------------------------------------------------------------------

_SAMPLING_DEFAULTS = {"repeat_penalty": 1.0}  # llama_cpp.Llama's (and the chat's), not the llama_cpp server's 1.1


def _validate(model_cls, raw: bytes):
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    try:
        return model_cls.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err.get("loc", ()))
        raise ApiError(400, f"{loc or 'body'}: {err.get('msg')}", param=loc or None) from None


def _messages(messages: list) -> list[dict]:
    """Messages with text content (a list of text parts is joined); anything else is refused."""
    if not messages:
        raise ApiError(400, "messages is empty; send at least one message", param="messages")
    out = []
    for i, m in enumerate(messages):
        m = dict(m)
        role = m.get("role")
        if role not in ("system", "user", "assistant", "developer"):
            raise ApiError(400, f"messages.{i}.role {role!r} is not supported; use system, user or assistant",
                           param=f"messages.{i}.role")
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages.{i}.content: only text parts are supported",
                                   param=f"messages.{i}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if content is None and role != "assistant":
            raise ApiError(400, f"messages.{i}.content is missing", param=f"messages.{i}.content")
        if content is not None and not isinstance(content, str):
            raise ApiError(400, f"messages.{i}.content must be a string", param=f"messages.{i}.content")
        out.append({"role": "system" if role == "developer" else role, "content": content or ""})
    return out


def _common_kwargs(engine: Engine, body, excluded: set) -> dict:
    if body.model is not None and body.model != engine.model_id:
        raise ApiError(404, f"The model '{body.model}' does not exist; this server has '{engine.model_id}' "
                            "(GET /v1/models)", param="model", code="model_not_found")
    n = getattr(body, "n", 1)
    if n not in (None, 1):
        raise ApiError(400, f"n={n}: this server answers with one choice; send n=1", param="n")
    if getattr(body, "best_of", None) not in (None, 1):
        raise ApiError(400, "best_of is not supported; leave it out", param="best_of")
    limit = engine.limits.max_tokens
    if body.max_tokens is not None and body.max_tokens < 1:
        raise ApiError(400, f"max_tokens={body.max_tokens}: send 1 or more (or leave it out)", param="max_tokens")
    if body.max_tokens is not None and body.max_tokens > limit:
        raise ApiError(400, f"max_tokens={body.max_tokens} is more than this server allows ({limit}); send "
                            f"max_tokens={limit} or less", param="max_tokens")
    if not 0 <= body.temperature <= 2:
        raise ApiError(400, f"temperature={body.temperature} is out of range; send 0 to 2", param="temperature")
    kwargs = body.model_dump(exclude=excluded | {"n", "best_of", "logit_bias_type", "user", "min_tokens",
                                                 "stream", "stream_options", "model"})
    kwargs["max_tokens"] = body.max_tokens or limit
    kwargs["model"] = engine.model_id  # responses name the model, never a file path
    for k, v in _SAMPLING_DEFAULTS.items():
        if k not in body.model_fields_set:
            kwargs[k] = v
    llm = engine.llm
    if body.logit_bias:
        try:
            kwargs["logit_bias"] = ({str(t): s for tok, s in body.logit_bias.items()
                                     for t in llm.tokenize(tok.encode(), add_bos=False, special=True)}
                                    if body.logit_bias_type == "tokens" else
                                    {str(int(k)): float(v) for k, v in body.logit_bias.items()})
        except ValueError:
            raise ApiError(400, "logit_bias keys must be token ids", param="logit_bias") from None
        if any(not 0 <= int(k) < llm.n_vocab() for k in kwargs["logit_bias"]):
            raise ApiError(400, f"logit_bias names a token outside the vocabulary (0..{llm.n_vocab() - 1})",
                           param="logit_bias")
    if getattr(body, "grammar", None):
        # llama.cpp parses a grammar when the sampler is made, and a sampler chain given none crashes: parsed here
        sampler = llama_cpp.llama_sampler_init_grammar(llm._model.vocab, body.grammar.encode(), b"root")
        if not sampler:
            raise ApiError(400, "grammar does not parse (GBNF with a 'root' rule)", param="grammar")
        llama_cpp.llama_sampler_free(sampler)
        kwargs["grammar"] = llama_cpp.LlamaGrammar.from_string(body.grammar, verbose=False)
    if body.min_tokens:
        kwargs["logits_processor"] = llama_cpp.LogitsProcessorList(
            [llama_cpp.MinTokensLogitsProcessor(body.min_tokens, llm.token_eos())])
    return kwargs


# --- the app -------------------------------------------------------------------------------------------------

class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes gets 413, read no further."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for k, v in scope.get("headers", ()):
            if k == b"content-length":
                try:
                    n = int(v)
                except ValueError:
                    return await ApiError(400, "Content-Length is not a number").response()(scope, receive, send)
                if n > self.limit:
                    return await self._too_large()(scope, receive, send)
        seen = 0
        started = False

        async def limited():
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        async def tracking_send(msg):
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, limited, tracking_send)
        except _TooLarge:
            if not started:
                await self._too_large()(scope, receive, send)

    def _too_large(self):
        return ApiError(413, f"the request body is larger than this server accepts ({self.limit} bytes)",
                        code="request_too_large").response()


class _TooLarge(Exception):
    pass


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="dualblade", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=engine.limits.max_body)

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        what = {404: f"no such endpoint: {request.method} {request.url.path}",
                405: f"method {request.method} is not allowed on {request.url.path}"}.get(exc.status_code,
                                                                                         str(exc.detail))
        return ApiError(exc.status_code, what, code={404: "not_found", 405: "method_not_allowed"}.get(
            exc.status_code)).response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc: RequestValidationError):
        return ApiError(400, str(exc.errors()[0].get("msg", "invalid request")) if exc.errors() else
                        "invalid request").response()

    @app.exception_handler(Exception)
    async def _internal(request, exc: Exception):
        traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
        return ApiError(500, f"internal error ({type(exc).__name__}); see the server's log",
                        type="server_error").response()

    key = api_key.encode() if api_key else None

    def authorize(request: Request) -> None:
        if key is None:
            return
        scheme, _, given = (request.headers.get("authorization") or "").partition(" ")
        if not (scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), key)):
            raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": engine.created,
                                            "owned_by": "dualblade"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str):
        authorize(request)
        if model_id != engine.model_id:
            raise ApiError(404, f"The model '{model_id}' does not exist", param="model", code="model_not_found")
        return {"id": engine.model_id, "object": "model", "created": engine.created, "owned_by": "dualblade"}

    @app.get("/v1/kv")
    async def kv(request: Request):
        authorize(request)
        return await asyncio.to_thread(engine.stats)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        authorize(request)
        body = _validate(ChatRequest, await request.body())
        kwargs = _common_kwargs(engine, body, {"messages", "functions", "function_call", "tools", "tool_choice"})
        kwargs["messages"] = _messages(body.messages)
        for k in ("functions", "function_call", "tools", "tool_choice"):
            if getattr(body, k):
                kwargs[k] = getattr(body, k)
        return await _answer(request, engine, "chat", kwargs, body)

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = _validate(CompletionRequest, await request.body())
        if "prompt" not in body.model_fields_set:
            raise ApiError(400, "prompt: field required", param="prompt")
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise ApiError(400, "prompt: send one prompt (a string, or a list of one string)", param="prompt")
            body.prompt = body.prompt[0]
        kwargs = _common_kwargs(engine, body, set())
        return await _answer(request, engine, "completion", kwargs, body)

    return app


async def _watch(request: Request, job: Job, until: asyncio.Event) -> None:
    """Cancels the job when the client disconnects."""
    while not until.is_set():
        if await request.is_disconnected():
            job.cancel.set()
            return
        try:
            await asyncio.wait_for(until.wait(), 0.25)
        except asyncio.TimeoutError:
            pass


async def _answer(request: Request, engine: Engine, kind: str, kwargs: dict, body):
    job = Job(kind, kwargs, bool(body.stream), asyncio.get_running_loop())
    engine.submit(job)
    first_seen = asyncio.Event()
    watcher = asyncio.create_task(_watch(request, job, first_seen))
    try:
        event, value = await job.events.get()  # the first chunk, the whole answer or an error
    except asyncio.CancelledError:
        job.cancel.set()
        raise
    finally:
        first_seen.set()
        await watcher
    if event == "error":
        if isinstance(value, Cancelled):
            return JSONResponse({"error": {"message": "the client closed the request", "type": "cancelled",
                                           "param": None, "code": None}}, status_code=499)
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
                        yield {"data": json.dumps({"error": {"message": err.message, "type": err.type,
                                                             "param": err.param, "code": err.code}})}
                    return
                ev, val = await job.events.get()
        finally:
            job.cancel.set()  # the client went away (or the stream ended): nothing more is generated for it

    return EventSourceResponse(events(), sep="\n", ping=15)


def serve_forever(app: FastAPI, sock, log_level: str = "warning") -> None:
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=5,
                            timeout_keep_alive=5)
    uvicorn.Server(config).run(sockets=[sock])


__all__ = ["ApiError", "Engine", "Limits", "ServedLlama", "create_app", "serve_forever"]
