"""The server's engine: one model context serves the requests in arrival order (one worker thread; a bounded
queue, full: 503 with Retry-After).

Before a prompt is evaluated, the saved conversation sharing the longest prefix with it is loaded
(Llama.load_session) when that prefix is longer than what the context already holds; after a chat reply, the
context is saved (Llama.save_session) into the server's own directory (dualblade/conversations.py). Once the queue
has stayed empty for a while, what the requests left in memory goes back to the system (release_idle_memory).
"""
from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np

from ..conversations import ConversationStore, common_prefix
from ..errors import EvalAborted, KVIOError, SessionError
from ..heap import release_idle_memory
from ..llama import Llama
from .api import ApiError
from .limits import Limits

IDLE_RELEASE_S = 1.0  # how long the queue stays empty before the requests' memory is given back


class Cancelled(Exception):
    """The client went away: its generation stops."""


class ServedLlama(Llama):
    """dualblade.Llama with a hook that runs when a prompt's tokens are known, before any is evaluated."""

    before_prompt = None

    def generate(self, tokens, *args, **kwargs):
        if self.before_prompt is not None:
            self.before_prompt(list(tokens))
        return super().generate(tokens, *args, **kwargs)


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
        self._job_lock = threading.Lock()  # the running job, against cancel() from the event loop
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

    def cancel(self, job: Job) -> None:
        """The job's client went away: nothing more is computed for it. A running job's evaluation stops within a
        node of llama.cpp's graph (Llama.abort_eval), not at the end of the prompt's batch."""
        with self._job_lock:
            job.cancel.set()
            if self._job is job:
                self.llm.abort_eval()

    def stop(self) -> None:
        job = self._job
        if job is not None:
            self.cancel(job)
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
            with self._job_lock:
                self._job = job
                self.llm.abort_eval(job.cancel.is_set())  # withdraws what a job before asked, or stops this one
            t0 = time.perf_counter()
            try:
                self._serve(job)
            finally:
                with self._job_lock:
                    self._job = None
                    self.llm.abort_eval(False)
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
        except (Cancelled, EvalAborted):  # EvalAborted: cancel() stopped the evaluation mid-batch
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
        evaluated = after["prompt_tokens"] - before["prompt_tokens"]
        prompt = job.info.get("prompt_tokens", evaluated)
        c = self.counters
        c["prompt_tokens"] += prompt
        c["prompt_tokens_evaluated"] += evaluated
        c["completion_tokens"] += generated
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
                "prompt_tokens_details": {"cached_tokens": max(prompt - evaluated, 0)},
                "resumed_from_storage": bool(job.info.get("resumed"))}
