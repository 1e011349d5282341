"""The OpenAI API's side of the server: its error body, and its request bodies checked and turned into the
keyword arguments of Llama.create_chat_completion / create_completion (llama-cpp-python's request models,
llama_cpp.server.types, with stream_options added)."""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional

import llama_cpp
from fastapi.responses import JSONResponse
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from pydantic import BaseModel, ValidationError

if TYPE_CHECKING:
    from .engine import Engine


class ApiError(Exception):
    """An error answered in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(CreateChatCompletionRequest):
    stream_options: Optional[StreamOptions] = None


class CompletionRequest(CreateCompletionRequest):
    stream_options: Optional[StreamOptions] = None


_SAMPLING_DEFAULTS = {"repeat_penalty": 1.0}  # llama_cpp.Llama's (and the chat's), not the llama_cpp server's 1.1
_TOOLS = ("functions", "function_call", "tools", "tool_choice")


def parse(model_cls, raw: bytes):
    """The request body as model_cls; ApiError 400 for anything that is not a valid one."""
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


def chat_kwargs(engine: Engine, body: ChatRequest) -> dict:
    """create_chat_completion's keyword arguments for a chat request."""
    kwargs = _common_kwargs(engine, body, {"messages", *_TOOLS})
    kwargs["messages"] = _messages(body.messages)
    for k in _TOOLS:
        if getattr(body, k):
            kwargs[k] = getattr(body, k)
    return kwargs


def completion_kwargs(engine: Engine, body: CompletionRequest) -> dict:
    """create_completion's keyword arguments for a completion request (one prompt)."""
    if "prompt" not in body.model_fields_set:
        raise ApiError(400, "prompt: field required", param="prompt")
    if isinstance(body.prompt, list):
        if len(body.prompt) != 1:
            raise ApiError(400, "prompt: send one prompt (a string, or a list of one string)", param="prompt")
        body.prompt = body.prompt[0]
    return _common_kwargs(engine, body, set())


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
    # whatever model the client names, the one model answers (as llama_cpp.server and llama-server do with one
    # model); the response echoes that name, as llama_cpp.server's does, or, for none, the model's id (where
    # llama_cpp.server would give model_path: a file path never goes out)
    kwargs["model"] = body.model or engine.model_id
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
