"""An OpenAI-compatible HTTP server for one model (``gpt-oss-cpu serve``).

Endpoints (all under ``/v1``, JSON in and out, errors in OpenAI's shape
``{"error": {"message", "type", "param", "code"}}``):

* ``GET /v1/models`` and ``GET /v1/models/{id}``: the one served model.
* ``POST /v1/chat/completions``: messages, function ``tools`` + ``tool_choice``, ``stream`` (SSE
  ``data: {...}`` chunks ending with ``data: [DONE]``), sampling parameters, ``logprobs`` +
  ``top_logprobs`` (one entry per completion token, Harmony header and reasoning tokens
  included, so they add up to ``completion_tokens``), ``reasoning_effort``. The chain of
  thought comes back separately as ``reasoning_content`` (on the message, or on stream deltas)
  the way llama-server and vLLM return it; tool calls come back as OpenAI ``tool_calls``
  (streamed as one delta per call, with its index, id, name and complete arguments, once the
  call is parsed).
* ``POST /v1/responses``: the Responses API with ``input`` (a string, or message /
  ``function_call`` / ``function_call_output`` / ``reasoning`` items), ``instructions``, flat
  function ``tools``, ``reasoning: {effort}``, ``max_output_tokens`` and ``stream`` (the
  ``response.created`` ... ``response.completed`` event sequence).

``tool_choice``: ``"auto"`` (default) offers the tools, ``"none"`` does not show them to the
model, a named function offers only that function, and ``"required"`` offers the tools but cannot
force the model to call one (there is no constrained decoding). The ``model`` field of a request
is accepted as is and echoed back as the served model name. Without ``max_tokens``
(``max_completion_tokens``, ``max_output_tokens``) a request may generate up to the server's
``max_tokens_limit``; asking for more is a 400. Unknown request fields are ignored; ``n`` other
than 1, non-text ``response_format`` and ``previous_response_id`` are 400s.

Why Starlette + uvicorn: Starlette is a small, well-kept ASGI toolkit whose
``StreamingResponse`` is all that server-sent events need and which cancels the response when the
client goes away; uvicorn is the reference ASGI server. Validation is hand written (a few fields)
so FastAPI/pydantic models would add weight without removing code.

Concurrency: one model, one compute stream. Requests wait in FIFO order on an ``asyncio.Lock``
in front of one long-lived :class:`~gpt_oss_cpu.Session`, so the KV cache keeps the prompt prefix
shared with the previous request (:func:`~gpt_oss_cpu.chat.reuse_prefix`) and ``usage`` reports
it as ``cached_tokens``. Generation runs in a worker thread (the engine releases the GIL) that
hands tokens to the event loop one at a time and stops pulling tokens as soon as the client
disconnects. Queue position and latency go to the ``gpt_oss_cpu.server`` logger.

Example:
    >>> import uvicorn                                                    # doctest: +SKIP
    >>> model = gpt_oss_cpu.Model.load("gpt-oss-20b")                     # doctest: +SKIP
    >>> app = create_app(model, model_name="gpt-oss-20b")                 # doctest: +SKIP
    >>> uvicorn.run(app, host="127.0.0.1", port=8000)                     # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import harmony
from ._core import GptOssError, InputError, Sampler
from .chat import (
    ChatEvent,
    CompletionParser,
    ContentDelta,
    ReasoningDelta,
    ToolCall,
    render_prompt,
    reuse_prefix,
)

if TYPE_CHECKING:
    from .model import LogitsProcessor, Model
    from .tokenizer import Tokenizer

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_MAX_CONTEXT",
    "DEFAULT_MAX_TOKENS_LIMIT",
    "ApiError",
    "create_app",
]

logger = logging.getLogger("gpt_oss_cpu.server")

#: Largest accepted request body (bytes); larger ones get 413.
DEFAULT_MAX_BODY_BYTES = 1 << 20
#: KV-cache size of the server's session (tokens).
DEFAULT_MAX_CONTEXT = 8192
#: Largest ``max_tokens`` a request may ask for (and the default when it asks for none).
DEFAULT_MAX_TOKENS_LIMIT = 4096

_EFFORTS = ("low", "medium", "high")
_STOP_TOKENS = (harmony.RETURN, harmony.CALL)
_MAX_STOP_STRINGS = 4
_MAX_TOP_LOGPROBS = 20
_GENERIC_500 = "The server had an error while processing your request."


class ApiError(Exception):
    """An error answered with OpenAI's error JSON and an HTTP status.

    Example:
        >>> ApiError(400, "messages must not be empty", param="messages").body()["error"]["param"]
        'messages'
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """The ``{"error": {...}}`` object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> JSONResponse:
        """This error as a JSON response."""
        return JSONResponse(self.body(), status_code=self.status)


# ------------------------------------------------------------------------------ validation


def _bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(f"'{name}' must be a number; got {value!r}", name)
    if not low <= value <= high:
        raise _bad(f"'{name}' must be between {low:g} and {high:g}; got {value!r}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(f"'{name}' must be an integer; got {value!r}", name)
    return value


def _boolean(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(f"'{name}' must be a boolean; got {value!r}", name)
    return value


def _effort(value: object, param: str) -> str:
    if value is None:
        return "medium"
    if value not in _EFFORTS:
        raise _bad(f"'{param}' must be one of 'low', 'medium', 'high'; got {value!r}", param)
    return str(value)


@dataclass
class _Spec:
    """A validated generation request."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None
    reasoning_effort: str = "medium"
    max_tokens: int | None = None
    stop: list[str] = field(default_factory=list)
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    logprobs: bool = False
    top_logprobs: int = 0


def _select_tools(
    tools: list[dict[str, Any]] | None, choice: object, named: Callable[[Any], str | None]
) -> list[dict[str, Any]] | None:
    """Apply ``tool_choice``; ``named(choice)`` extracts a function name from a dict choice."""
    if choice is None or choice in ("auto", "required"):
        return tools
    if choice == "none":
        return None
    name = named(choice) if isinstance(choice, Mapping) else None
    if name is None:
        raise _bad(
            f"'tool_choice' must be 'none', 'auto', 'required' or a named function; got {choice!r}",
            "tool_choice",
        )
    chosen = [t for t in tools or () if _tool_name(t) == name]
    if not chosen:
        raise _bad(f"tool_choice names function {name!r}, which is not in 'tools'", "tool_choice")
    return chosen


def _tool_name(tool: Mapping[str, Any]) -> str | None:
    fn = tool.get("function", tool)
    return fn.get("name") if isinstance(fn, Mapping) else None


# --------------------------------------------------------------------------------- engine


@dataclass
class _Step:
    """What one sampled token produced (token None: the parser's final flush)."""

    events: list[ChatEvent]
    token: int | None = None
    logprob: tuple[int, float] | None = None
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class _Final:
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


_END = object()


class _Engine:
    """One session behind a FIFO lock; generation in a worker thread."""

    def __init__(
        self,
        model: Model,
        max_context: int,
        logits_processors: Sequence[LogitsProcessor] | None,
    ) -> None:
        from .tokenizer import Tokenizer, TokenizerNotFoundError

        self.model = model
        self.max_context = max_context
        self.processors = list(logits_processors or ())
        try:
            self.tokenizer: Tokenizer = model.tokenizer
        except TokenizerNotFoundError:
            self.tokenizer = Tokenizer.bundled()
        self.vocab_size = int(model.config.vocab_size)
        self.session = model.session(max_context)
        self._lock: asyncio.Lock | None = None
        self._queued = 0

    def prepare(self, spec: _Spec, max_tokens_limit: int) -> tuple[list[int], int]:
        """Render the prompt; return it and the number of tokens that may be generated."""
        try:
            prompt = render_prompt(
                spec.messages,
                reasoning_effort=spec.reasoning_effort,
                tools=spec.tools,
                tokenizer=self.tokenizer,
            )
        except InputError as e:
            raise _bad(str(e), "messages") from None
        if len(prompt) >= self.max_context:
            raise _bad(
                f"the prompt has {len(prompt)} tokens but this server's context holds "
                f"{self.max_context} (including the answer); shorten the conversation",
                "messages",
                "context_length_exceeded",
            )
        limit = spec.max_tokens if spec.max_tokens is not None else max_tokens_limit
        return prompt, min(limit, self.max_context - len(prompt))

    async def run(
        self, spec: _Spec, prompt: list[int], limit: int, request: Request | None, rid: str
    ) -> AsyncIterator[_Step | _Final]:
        """Wait for the model, then yield a :class:`_Step` per token and a :class:`_Final`.

        Stops the generation when the consumer stops iterating or ``request`` disconnects.
        """
        if self._lock is None:
            self._lock = asyncio.Lock()
        lock = self._lock
        ahead = self._queued + (1 if lock.locked() else 0)
        self._queued += 1
        logger.info("%s: queued at position %d (%d ahead)", rid, ahead + 1, ahead)
        t_queued = time.perf_counter()
        try:
            await lock.acquire()
        finally:
            self._queued -= 1
        logger.info("%s: started after %.3f s in the queue", rid, time.perf_counter() - t_queued)

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def put(item: object) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, item)
            except RuntimeError:  # the event loop is gone (shutdown)
                cancel.set()

        def worker() -> None:
            try:
                self._generate(spec, prompt, limit, put, cancel, rid)
            except BaseException as exc:
                self.session.reset()  # the cache may be half-updated
                put(exc)
            finally:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(lock.release)
                put(_END)

        threading.Thread(target=worker, name=f"gpt-oss-cpu {rid}", daemon=True).start()
        try:
            while True:
                item = await queue.get()
                if item is _END:
                    return
                if isinstance(item, BaseException):
                    raise item
                assert isinstance(item, _Step | _Final)
                yield item
                if request is not None and await request.is_disconnected():
                    logger.info("%s: client disconnected, stopping the generation", rid)
                    return
        finally:
            cancel.set()

    def _generate(
        self,
        spec: _Spec,
        prompt: list[int],
        limit: int,
        put: Callable[[object], None],
        cancel: threading.Event,
        rid: str,
    ) -> None:
        t_start = time.perf_counter()
        session = self.session
        cached = reuse_prefix(session, prompt)
        n_logprobs = max(spec.top_logprobs, 1) if spec.logprobs else 0
        sampler = Sampler(
            spec.temperature,
            spec.top_p,
            spec.seed,
            presence_penalty=spec.presence_penalty,
            frequency_penalty=spec.frequency_penalty,
            logit_bias=spec.logit_bias,
            logprobs=n_logprobs,
        )
        parser = CompletionParser(self.tokenizer, stop=spec.stop)
        tokens = session.generate(
            prompt[cached:],
            limit,
            stop=_STOP_TOKENS,
            sampler=sampler,
            logits_processors=self.processors,
        )
        t_first: float | None = None
        try:
            while not cancel.is_set():
                token = next(tokens, None)
                if token is None:
                    break
                if t_first is None:
                    t_first = time.perf_counter()
                step = _Step(parser.feed(token), token)
                if n_logprobs:
                    step.logprob = sampler.last_token_logprob()
                    step.top = sampler.last_logprobs()[: spec.top_logprobs]
                put(step)
                if parser.finish_reason is not None:
                    break
        finally:
            tokens.close()
        put(_Step(parser.close()))
        finish = parser.finish_reason or "length"
        put(_Final(finish, len(prompt), parser.token_count, cached))
        elapsed = time.perf_counter() - t_start
        first = (t_first - t_start) if t_first is not None else elapsed
        logger.info(
            "%s: %s after %d tokens in %.3f s (first token %.3f s); prompt %d tokens, %d cached",
            rid,
            "cancelled" if cancel.is_set() else f"finished ({finish})",
            parser.token_count,
            elapsed,
            first,
            len(prompt),
            cached,
        )


# ------------------------------------------------------------------------------ formatting


def _sse(data: Mapping[str, Any], event: str | None = None) -> str:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _new_id(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:24]}"


class _ResponsesBuilder:
    """Turns chat events into Responses API output items and stream events."""

    def __init__(self) -> None:
        self.output: list[dict[str, Any]] = []
        self._item: dict[str, Any] | None = None
        self._text = ""
        self.seq = 0

    def event(self, type: str, **fields: Any) -> dict[str, Any]:
        out = {"type": type, "sequence_number": self.seq, **fields}
        self.seq += 1
        return out

    def _open(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self._item = item
        self._text = ""
        self.output.append(item)
        index = len(self.output) - 1
        events = [self.event("response.output_item.added", output_index=index, item=item)]
        if item["type"] == "message":
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            events.append(
                self.event(
                    "response.content_part.added",
                    item_id=item["id"],
                    output_index=index,
                    content_index=0,
                    part=part,
                )
            )
        return events

    def feed(self, event: ChatEvent) -> list[dict[str, Any]]:
        """Stream events for one chat event."""
        events: list[dict[str, Any]] = []
        kind = self._item["type"] if self._item is not None else None
        if isinstance(event, ReasoningDelta):
            if kind != "reasoning":
                events += self.close()
                events += self._open(
                    {
                        "id": _new_id("rs_"),
                        "type": "reasoning",
                        "summary": [],
                        "content": [],
                        "status": "in_progress",
                    }
                )
            name = "response.reasoning_text.delta"
        elif isinstance(event, ContentDelta):
            if kind != "message":
                events += self.close()
                events += self._open(
                    {
                        "id": _new_id("msg_"),
                        "type": "message",
                        "role": "assistant",
                        "status": "in_progress",
                        "content": [],
                    }
                )
            name = "response.output_text.delta"
        elif isinstance(event, ToolCall):
            events += self.close()
            item = {
                "id": _new_id("fc_"),
                "type": "function_call",
                "call_id": event.id,
                "name": event.name,
                "arguments": "",
                "status": "in_progress",
            }
            events += self._open(item)
            index = len(self.output) - 1
            ids = {"item_id": item["id"], "output_index": index}
            events.append(
                self.event(
                    "response.function_call_arguments.delta", delta=event.raw_arguments, **ids
                )
            )
            events.append(
                self.event(
                    "response.function_call_arguments.done",
                    arguments=event.raw_arguments,
                    name=event.name,
                    **ids,
                )
            )
            item["arguments"] = event.raw_arguments
            item["status"] = "completed"
            events.append(self.event("response.output_item.done", output_index=index, item=item))
            self._item = None
            return events
        else:
            return events
        assert self._item is not None
        self._text += event.text
        extra = {"logprobs": []} if name == "response.output_text.delta" else {}
        events.append(
            self.event(
                name,
                item_id=self._item["id"],
                output_index=len(self.output) - 1,
                content_index=0,
                delta=event.text,
                **extra,
            )
        )
        return events

    def close(self) -> list[dict[str, Any]]:
        """Finish the open reasoning or message item."""
        item = self._item
        if item is None:
            return []
        self._item = None
        index = len(self.output) - 1
        ids = {"item_id": item["id"], "output_index": index, "content_index": 0}
        events = []
        if item["type"] == "reasoning":
            item["content"] = [{"type": "reasoning_text", "text": self._text}]
            events.append(self.event("response.reasoning_text.done", text=self._text, **ids))
        else:
            part = {"type": "output_text", "text": self._text, "annotations": [], "logprobs": []}
            item["content"] = [part]
            events.append(
                self.event("response.output_text.done", text=self._text, logprobs=[], **ids)
            )
            events.append(self.event("response.content_part.done", part=part, **ids))
        item["status"] = "completed"
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        return events


def _responses_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if content is None:
        return ""
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if (
                isinstance(part, Mapping)
                and part.get("type") in ("input_text", "output_text", "text", "refusal")
                and isinstance(part.get("text", part.get("refusal")), str)
            ):
                parts.append(part.get("text", part.get("refusal")))
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise _bad(f"{where}.content[{j}]: only text content is supported; got {kind!r}")
        return "".join(parts)
    raise _bad(f"{where}.content must be a string or a list of text parts", "input")


def _responses_messages(items: object, instructions: object) -> list[dict[str, Any]]:
    """Responses API ``input`` (+ ``instructions``) as chat-completions messages."""
    messages: list[dict[str, Any]] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("'instructions' must be a string", "instructions")
        messages.append({"role": "developer", "content": instructions})
    if isinstance(items, str):
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise _bad("'input' must be a non-empty string or a non-empty list of items", "input")
    reasoning: list[str] = []
    for i, item in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise _bad(f"{where} must be an object; got {item!r}", "input")
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            text = _responses_text(item.get("content"), where)
            if role == "assistant":
                msg: dict[str, Any] = {"role": "assistant", "content": text}
                if reasoning:
                    msg["reasoning_content"] = "".join(reasoning)
                    reasoning = []
                messages.append(msg)
            elif role in ("user", "system", "developer"):
                messages.append({"role": role, "content": text})
            else:
                raise _bad(
                    f"{where}.role must be 'user', 'system', 'developer' or 'assistant'; "
                    f"got {role!r}",
                    "input",
                )
        elif kind == "function_call":
            name, args, call_id = item.get("name"), item.get("arguments"), item.get("call_id")
            if not (isinstance(name, str) and isinstance(args, str) and isinstance(call_id, str)):
                raise _bad(f"{where}: a function_call needs string name, arguments and call_id")
            call = {
                "id": call_id,
                "type": "function",
                "function": {"name": name, "arguments": args},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and not reasoning:
                last.setdefault("tool_calls", []).append(call)
            else:
                msg = {"role": "assistant", "content": None, "tool_calls": [call]}
                if reasoning:
                    msg["reasoning_content"] = "".join(reasoning)
                    reasoning = []
                messages.append(msg)
        elif kind == "function_call_output":
            call_id, output = item.get("call_id"), item.get("output")
            if not isinstance(call_id, str):
                raise _bad(f"{where}: a function_call_output needs a string call_id", "input")
            text = _responses_text(output, where)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
        elif kind == "reasoning":
            parts = item.get("content") or item.get("summary") or []
            if not isinstance(parts, list):
                raise _bad(f"{where}: reasoning content must be a list", "input")
            for part in parts:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    reasoning.append(part["text"])
        else:
            raise _bad(
                f"{where}: unsupported item type {kind!r} (supported: message, function_call, "
                "function_call_output, reasoning)",
                "input",
            )
    return messages


# ------------------------------------------------------------------------------------- app


class _Server:
    def __init__(
        self,
        model: Model,
        *,
        model_name: str,
        api_key: str | None,
        max_context: int,
        max_tokens_limit: int,
        max_body_bytes: int,
        logits_processors: Sequence[LogitsProcessor] | None,
    ) -> None:
        if max_tokens_limit < 1:
            raise ValueError(f"max_tokens_limit must be >= 1, got {max_tokens_limit}")
        self.engine = _Engine(model, max_context, logits_processors)
        self.model_name = model_name
        self.api_key = api_key
        self.max_tokens_limit = max_tokens_limit
        self.max_body_bytes = max_body_bytes
        self.created = int(time.time())

    # -------------------------------------------------------------------------- plumbing

    def endpoint(
        self, handler: Callable[[Request], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        async def wrapped(request: Request) -> Response:
            try:
                self._check_auth(request)
                return await handler(request)
            except ApiError as e:
                logger.info("%s %s -> %d: %s", request.method, request.url.path, e.status, e)
                return e.response()
            except Exception:
                logger.exception("%s %s failed", request.method, request.url.path)
                return ApiError(500, _GENERIC_500, type="server_error").response()

        return wrapped

    def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.api_key.encode()
        ):
            raise ApiError(
                401,
                "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
            )

    async def _read_json(self, request: Request) -> dict[str, Any]:
        too_big = ApiError(
            413,
            f"The request body is larger than {self.max_body_bytes} bytes.",
            code="request_too_large",
        )
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise too_big
        chunks = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise too_big
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except ValueError:
            raise _bad("We could not parse the JSON body of your request.") from None
        if not isinstance(body, dict):
            raise _bad("The request body must be a JSON object.")
        return body

    def _max_tokens(self, body: Mapping[str, Any], *names: str) -> int | None:
        for name in names:
            value = _integer(body, name)
            if value is None:
                continue
            if value < 1:
                raise _bad(f"'{name}' must be at least 1; got {value}", name)
            if value > self.max_tokens_limit:
                raise _bad(
                    f"'{name}' is {value}, but this server allows at most {self.max_tokens_limit}",
                    name,
                )
            return value
        return None

    def _sampling(self, body: Mapping[str, Any], spec: _Spec) -> None:
        spec.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
        spec.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if spec.top_p == 0.0:
            raise _bad("'top_p' must be greater than 0", "top_p")
        spec.seed = _integer(body, "seed")

    def _tools(self, tools: object, *, flat: bool) -> list[dict[str, Any]] | None:
        if tools is None:
            return None
        if not isinstance(tools, list):
            raise _bad("'tools' must be a list", "tools")
        out = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, Mapping) or tool.get("type") != "function":
                kind = tool.get("type") if isinstance(tool, Mapping) else tool
                raise _bad(f"tools[{i}]: only function tools are supported; got {kind!r}", "tools")
            fn = tool if flat else tool.get("function")
            if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
                raise _bad(f"tools[{i}]: a function tool needs a 'name'", "tools")
            entry = {"name": fn["name"], "description": fn.get("description") or ""}
            if fn.get("parameters") is not None:
                entry["parameters"] = fn["parameters"]
            out.append({"type": "function", "function": entry})
        return out or None

    # ------------------------------------------------------------------------- endpoints

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "gpt-oss-cpu",
        }

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        if request.path_params["model"] != self.model_name:
            raise ApiError(
                404,
                f"The model {request.path_params['model']!r} does not exist; this server "
                f"serves {self.model_name!r}.",
                param="model",
                code="model_not_found",
            )
        return JSONResponse(self._model_card())

    # ---------------------------------------------------------------- chat completions

    def _chat_spec(self, body: Mapping[str, Any]) -> _Spec:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _bad("'messages' must be a non-empty list", "messages")
        n = _integer(body, "n")
        if n not in (None, 1):
            raise _bad("only n=1 is supported", "n")
        fmt = body.get("response_format")
        if fmt is not None and (not isinstance(fmt, Mapping) or fmt.get("type") != "text"):
            raise _bad("only response_format {'type': 'text'} is supported", "response_format")
        tools = self._tools(body.get("tools"), flat=False)
        tools = _select_tools(
            tools,
            body.get("tool_choice"),
            lambda c: c.get("function", {}).get("name") if c.get("type") == "function" else None,
        )
        spec = _Spec(messages=messages, tools=tools)
        spec.reasoning_effort = _effort(body.get("reasoning_effort"), "reasoning_effort")
        spec.max_tokens = self._max_tokens(body, "max_completion_tokens", "max_tokens")
        self._sampling(body, spec)
        spec.presence_penalty = _number(body, "presence_penalty", 0.0, -2.0, 2.0)
        spec.frequency_penalty = _number(body, "frequency_penalty", 0.0, -2.0, 2.0)
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (
            not isinstance(stop, list)
            or len(stop) > _MAX_STOP_STRINGS
            or not all(isinstance(s, str) for s in stop)
        ):
            raise _bad(f"'stop' must be a string or a list of up to {_MAX_STOP_STRINGS}", "stop")
        spec.stop = [s for s in stop or () if s]
        bias = body.get("logit_bias")
        if bias is not None:
            if not isinstance(bias, Mapping):
                raise _bad("'logit_bias' must map token ids to numbers", "logit_bias")
            spec.logit_bias = {}
            for key, value in bias.items():
                try:
                    token = int(key)
                except ValueError:
                    raise _bad(f"logit_bias key {key!r} is not a token id", "logit_bias") from None
                if not 0 <= token < self.engine.vocab_size:
                    raise _bad(f"logit_bias token id {token} is out of range", "logit_bias")
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise _bad(f"logit_bias value for {key} must be a number", "logit_bias")
                if not -100 <= value <= 100:
                    raise _bad("logit_bias values must be between -100 and 100", "logit_bias")
                spec.logit_bias[token] = float(value)
        spec.logprobs = _boolean(body, "logprobs")
        top = _integer(body, "top_logprobs")
        if top is not None:
            if not 0 <= top <= _MAX_TOP_LOGPROBS:
                raise _bad(
                    f"'top_logprobs' must be between 0 and {_MAX_TOP_LOGPROBS}", "top_logprobs"
                )
            if top and not spec.logprobs:
                raise _bad("'top_logprobs' requires 'logprobs': true", "top_logprobs")
            spec.top_logprobs = top
        return spec

    def _logprob_entry(self, token: int, logprob: float) -> dict[str, Any]:
        data = self.engine.tokenizer.token_bytes(token)
        return {
            "token": data.decode("utf-8", errors="replace"),
            "logprob": logprob,
            "bytes": list(data),
        }

    def _chat_logprobs(self, step: _Step) -> list[dict[str, Any]]:
        """The logprob entry of a step's sampled token (every completion token has one:
        Harmony headers and reasoning included, so they add up to ``completion_tokens``)."""
        if step.logprob is None:
            return []
        entry = self._logprob_entry(*step.logprob)
        entry["top_logprobs"] = [self._logprob_entry(t, lp) for t, lp in step.top]
        return [entry]

    @staticmethod
    def _usage(final: _Final) -> dict[str, Any]:
        return {
            "prompt_tokens": final.prompt_tokens,
            "completion_tokens": final.completion_tokens,
            "total_tokens": final.prompt_tokens + final.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": final.cached_tokens},
        }

    async def chat_completions(self, request: Request) -> Response:
        body = await self._read_json(request)
        spec = self._chat_spec(body)
        stream = _boolean(body, "stream")
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, Mapping) and options.get("include_usage") is True
        prompt, limit = await asyncio.to_thread(self.engine.prepare, spec, self.max_tokens_limit)
        rid = _new_id("chatcmpl-")
        head = {"id": rid, "created": int(time.time()), "model": self.model_name}
        run = self.engine.run(spec, prompt, limit, request, rid)
        if stream:
            return StreamingResponse(
                self._chat_stream(run, head, spec, include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        content: list[str] = []
        reasoning: list[str] = []
        calls: list[dict[str, Any]] = []
        logprobs: list[dict[str, Any]] = []
        final: _Final | None = None
        async for item in run:
            if isinstance(item, _Final):
                final = item
                continue
            for event in item.events:
                if isinstance(event, ContentDelta):
                    content.append(event.text)
                elif isinstance(event, ReasoningDelta):
                    reasoning.append(event.text)
                elif isinstance(event, ToolCall):
                    calls.append(event.to_openai())
            if spec.logprobs:
                logprobs += self._chat_logprobs(item)
        if final is None:  # the client went away
            return Response(status_code=499)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": "".join(content) if content or not calls else None,
            "reasoning_content": "".join(reasoning) or None,
            "refusal": None,
        }
        if calls:
            message["tool_calls"] = calls
        choice = {
            "index": 0,
            "message": message,
            "logprobs": {"content": logprobs, "refusal": None} if spec.logprobs else None,
            "finish_reason": final.finish_reason,
        }
        return JSONResponse(
            {
                **head,
                "object": "chat.completion",
                "choices": [choice],
                "usage": self._usage(final),
                "system_fingerprint": None,
            }
        )

    async def _chat_stream(
        self,
        run: AsyncIterator[_Step | _Final],
        head: dict[str, Any],
        spec: _Spec,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        base = {**head, "object": "chat.completion.chunk", "system_fingerprint": None}

        def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            return _sse({**base, "choices": [choice]})

        yield chunk({"role": "assistant", "content": ""})
        calls = 0
        entries: list[dict[str, Any]] = []
        try:
            async for item in run:
                if isinstance(item, _Final):
                    lp = {"content": entries, "refusal": None} if spec.logprobs else None
                    yield chunk({}, item.finish_reason, lp)
                    if include_usage:
                        yield _sse({**base, "choices": [], "usage": self._usage(item)})
                    continue
                if spec.logprobs:  # sent with the next content (or the last) chunk
                    entries += self._chat_logprobs(item)
                for event in item.events:
                    if isinstance(event, ReasoningDelta):
                        yield chunk({"reasoning_content": event.text})
                    elif isinstance(event, ContentDelta):
                        lp = {"content": entries, "refusal": None} if spec.logprobs else None
                        entries = []
                        yield chunk({"content": event.text}, logprobs=lp)
                    elif isinstance(event, ToolCall):
                        call = {"index": calls, **event.to_openai()}
                        calls += 1
                        yield chunk({"tool_calls": [call]})
        except Exception as exc:
            yield _sse(self._stream_error(exc, head["id"]))
        finally:
            await run.aclose()  # stops the generation if the client went away
        yield "data: [DONE]\n\n"

    @staticmethod
    def _stream_error(exc: Exception, rid: str) -> dict[str, Any]:
        if isinstance(exc, ApiError):
            return exc.body()
        if isinstance(exc, GptOssError) and isinstance(exc, ValueError):
            return ApiError(400, str(exc)).body()
        logger.error("%s: generation failed", rid, exc_info=exc)
        return ApiError(500, _GENERIC_500, type="server_error").body()

    # ------------------------------------------------------------------------ responses

    def _responses_spec(self, body: Mapping[str, Any]) -> _Spec:
        if body.get("previous_response_id") is not None:
            raise _bad(
                "previous_response_id is not supported (responses are not stored): send the "
                "whole conversation as 'input' items",
                "previous_response_id",
            )
        fmt = (
            (body.get("text") or {}).get("format")
            if isinstance(body.get("text"), Mapping)
            else None
        )
        if fmt is not None and (not isinstance(fmt, Mapping) or fmt.get("type") != "text"):
            raise _bad("only text.format {'type': 'text'} is supported", "text.format")
        messages = _responses_messages(body.get("input"), body.get("instructions"))
        tools = self._tools(body.get("tools"), flat=True)
        tools = _select_tools(
            tools,
            body.get("tool_choice"),
            lambda c: c.get("name") if c.get("type") == "function" else None,
        )
        spec = _Spec(messages=messages, tools=tools)
        reasoning = body.get("reasoning")
        if reasoning is not None and not isinstance(reasoning, Mapping):
            raise _bad("'reasoning' must be an object like {'effort': 'low'}", "reasoning")
        spec.reasoning_effort = _effort((reasoning or {}).get("effort"), "reasoning.effort")
        spec.max_tokens = self._max_tokens(body, "max_output_tokens")
        self._sampling(body, spec)
        return spec

    def _response_object(
        self,
        rid: str,
        created: int,
        body: Mapping[str, Any],
        spec: _Spec,
        output: list[dict[str, Any]],
        final: _Final | None,
        reasoning_tokens: int,
    ) -> dict[str, Any]:
        status = "in_progress"
        incomplete = None
        usage = None
        if final is not None:
            status = "completed" if final.finish_reason != "length" else "incomplete"
            if status == "incomplete":
                incomplete = {"reason": "max_output_tokens"}
            usage = {
                "input_tokens": final.prompt_tokens,
                "input_tokens_details": {"cached_tokens": final.cached_tokens},
                "output_tokens": final.completion_tokens,
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
                "total_tokens": final.prompt_tokens + final.completion_tokens,
            }
        tools = [{"type": "function", **t["function"], "strict": False} for t in spec.tools or ()]
        return {
            "id": rid,
            "object": "response",
            "created_at": created,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": body.get("instructions"),
            "max_output_tokens": spec.max_tokens,
            "model": self.model_name,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": spec.reasoning_effort, "summary": None},
            "store": False,
            "temperature": spec.temperature,
            "text": {"format": {"type": "text"}},
            "tool_choice": body.get("tool_choice") or "auto",
            "tools": tools,
            "top_p": spec.top_p,
            "truncation": "disabled",
            "usage": usage,
            "metadata": body.get("metadata") or {},
        }

    async def responses(self, request: Request) -> Response:
        body = await self._read_json(request)
        spec = self._responses_spec(body)
        stream = _boolean(body, "stream")
        prompt, limit = await asyncio.to_thread(self.engine.prepare, spec, self.max_tokens_limit)
        rid = _new_id("resp_")
        created = int(time.time())
        run = self.engine.run(spec, prompt, limit, request, rid)
        if stream:
            return StreamingResponse(
                self._responses_stream(run, rid, created, body, spec),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        builder = _ResponsesBuilder()
        final: _Final | None = None
        reasoning_tokens = 0
        async for item in run:
            if isinstance(item, _Final):
                final = item
                continue
            if any(isinstance(e, ReasoningDelta) for e in item.events):
                reasoning_tokens += 1
            for event in item.events:
                builder.feed(event)
        builder.close()
        if final is None:
            return Response(status_code=499)
        obj = self._response_object(
            rid, created, body, spec, builder.output, final, reasoning_tokens
        )
        return JSONResponse(obj)

    async def _responses_stream(
        self,
        run: AsyncIterator[_Step | _Final],
        rid: str,
        created: int,
        body: Mapping[str, Any],
        spec: _Spec,
    ) -> AsyncIterator[str]:
        builder = _ResponsesBuilder()

        def send(event: dict[str, Any]) -> str:
            return _sse(event, event["type"])

        start = self._response_object(rid, created, body, spec, [], None, 0)
        yield send(builder.event("response.created", response=start))
        yield send(builder.event("response.in_progress", response=start))
        reasoning_tokens = 0
        try:
            async for item in run:
                if isinstance(item, _Final):
                    for event in builder.close():
                        yield send(event)
                    obj = self._response_object(
                        rid, created, body, spec, builder.output, item, reasoning_tokens
                    )
                    kind = "completed" if obj["status"] == "completed" else "incomplete"
                    yield send(builder.event(f"response.{kind}", response=obj))
                    continue
                if any(isinstance(e, ReasoningDelta) for e in item.events):
                    reasoning_tokens += 1
                for chat_event in item.events:
                    for event in builder.feed(chat_event):
                        yield send(event)
        except Exception as exc:
            error = self._stream_error(exc, rid)["error"]
            yield send(builder.event("error", message=error["message"], code=error["code"]))
        finally:
            await run.aclose()  # stops the generation if the client went away


def create_app(
    model: Model,
    *,
    model_name: str,
    api_key: str | None = None,
    max_context: int = DEFAULT_MAX_CONTEXT,
    max_tokens_limit: int = DEFAULT_MAX_TOKENS_LIMIT,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    logits_processors: Sequence[LogitsProcessor] | None = None,
) -> Starlette:
    """The ASGI app serving ``model`` under ``model_name`` (run it with uvicorn).

    ``api_key``: when set, every request needs ``Authorization: Bearer API_KEY`` (else 401).
    ``max_context``: the KV-cache size (prompt + answer), ``max_tokens_limit``: the most tokens
    one request may generate, ``max_body_bytes``: the largest request body (else 413).
    ``logits_processors`` run on every generation step (see
    :meth:`gpt_oss_cpu.Session.generate`); tests use them to script the model's output.

    Example:
        >>> app = create_app(model, model_name="gpt-oss-20b", api_key="s3cret")  # doctest: +SKIP
        >>> uvicorn.run(app, host="127.0.0.1", port=8000)                     # doctest: +SKIP
    """
    server = _Server(
        model,
        model_name=model_name,
        api_key=api_key,
        max_context=max_context,
        max_tokens_limit=max_tokens_limit,
        max_body_bytes=max_body_bytes,
        logits_processors=logits_processors,
    )

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = "Unknown URL." if exc.status_code == 404 else str(exc.detail)
        return ApiError(
            exc.status_code, f"{message} ({request.method} {request.url.path})"
        ).response()

    routes = [
        Route("/v1/models", server.endpoint(server.models), methods=["GET"]),
        Route("/v1/models/{model:path}", server.endpoint(server.model), methods=["GET"]),
        Route("/v1/chat/completions", server.endpoint(server.chat_completions), methods=["POST"]),
        Route("/v1/responses", server.endpoint(server.responses), methods=["POST"]),
    ]
    app = Starlette(routes=routes, exception_handlers={HTTPException: http_error})
    app.state.server = server
    return app
