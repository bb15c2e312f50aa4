"""OpenAI-style chat on top of a :class:`~gpt_oss_cpu.Session`: messages in, typed events out.

:func:`chat` (also :meth:`gpt_oss_cpu.Session.chat`) converts OpenAI chat-completions messages
and function tools to a Harmony conversation (:func:`to_harmony`), renders it with
:func:`gpt_oss_cpu.harmony.render_conversation_for_completion`, reuses the longest prefix of the
session's KV cache (:func:`reuse_prefix`), generates until ``<|return|>`` or ``<|call|>`` (never
``<|end|>``), a user stop string or ``max_tokens``, and turns the sampled tokens into events with
:class:`CompletionParser`:

* :class:`ReasoningDelta` -- text on the ``analysis`` channel (chain of thought),
* :class:`ContentDelta` -- text for the user (``final`` channel, preambles, malformed output),
* :class:`ToolCall` -- an assistant message with a recipient, parsed when it ends,
* :class:`Done` -- always last: the finish reason and token usage.

Malformed model output never raises: a header that does not parse arrives as content, tool
arguments that are not a JSON object arrive as a :class:`ToolCall` with ``error`` set.

Example:
    >>> model = gpt_oss_cpu.Model.load("gpt-oss-20b")                     # doctest: +SKIP
    >>> with model.session() as session:                                  # doctest: +SKIP
    ...     for event in session.chat([{"role": "user", "content": "Hi!"}],
    ...                               tokenizer=model.tokenizer):
    ...         if isinstance(event, ContentDelta):
    ...             print(event.text, end="")
"""

from __future__ import annotations

import codecs
import json
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

from . import harmony
from ._core import ContextOverflowError, InputError

if TYPE_CHECKING:
    from .model import Session
    from .tokenizer import Tokenizer

__all__ = [
    "MAX_HEADER_TOKENS",
    "ChatEvent",
    "ChatResult",
    "CompletionParser",
    "ContentDelta",
    "Done",
    "FinishReason",
    "ReasoningDelta",
    "ToolCall",
    "chat",
    "render_prompt",
    "reuse_prefix",
    "to_harmony",
]

FinishReason = Literal["stop", "length", "tool_calls"]
_STOP_TOKENS = (harmony.RETURN, harmony.CALL)
_FUNCTIONS = "functions."
#: A header longer than this (in tokens) is treated as malformed output and shown as content.
MAX_HEADER_TOKENS = 256

# ----------------------------------------------------------------------------------- events


@dataclass(frozen=True)
class ReasoningDelta:
    """New chain-of-thought text (Harmony ``analysis`` channel).

    Example:
        >>> ReasoningDelta("Let me think.").text
        'Let me think.'
    """

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """New answer text for the user (``final`` channel, preambles, or unparsable output).

    Example:
        >>> ContentDelta("Hello").text
        'Hello'
    """

    text: str


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call: an assistant message addressed to a tool.

    ``name`` is the recipient without the ``functions.`` prefix (``"get_weather"``); built-in
    tools keep their full recipient (``"browser.search"``). ``arguments`` is the parsed JSON
    object, or None with ``error`` saying why (``raw_arguments`` always holds the text).

    Example:
        >>> ToolCall("call_1", "get_weather", {"city": "Paris"}, '{"city": "Paris"}', None).name
        'get_weather'
    """

    id: str
    name: str
    arguments: dict[str, Any] | None
    raw_arguments: str
    error: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """This call as an OpenAI ``tool_calls`` entry (to append to the message history).

        Example:
            >>> ToolCall("call_1", "now", {}, "{}").to_openai()  # doctest: +NORMALIZE_WHITESPACE
            {'id': 'call_1', 'type': 'function',
             'function': {'name': 'now', 'arguments': '{}'}}
        """
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.raw_arguments},
        }


@dataclass(frozen=True)
class Done:
    """The last event of a chat stream.

    ``finish_reason`` is ``"stop"`` (``<|return|>`` or a stop string), ``"tool_calls"``
    (``<|call|>`` after a tool call) or ``"length"`` (``max_tokens`` or a full context).
    ``usage`` has ``prompt_tokens``, ``completion_tokens``, ``cached_tokens`` (prompt tokens
    reused from the KV cache) and ``computed_prompt_tokens`` (the rest of the prompt).

    Example:
        >>> Done("stop", {"prompt_tokens": 10, "completion_tokens": 3, "cached_tokens": 0,
        ...               "computed_prompt_tokens": 10}).finish_reason
        'stop'
    """

    finish_reason: FinishReason
    usage: dict[str, int]


ChatEvent = ReasoningDelta | ContentDelta | ToolCall | Done


@dataclass
class ChatResult:
    """A whole chat completion (``stream=False``).

    ``messages`` are the completion's well-formed Harmony messages in harmony's JSON form.

    Example:
        >>> ChatResult("4", "", [], "stop", {}, []).content
        '4'
    """

    content: str
    reasoning: str
    tool_calls: list[ToolCall]
    finish_reason: FinishReason
    usage: dict[str, int]
    messages: list[dict[str, Any]] = field(default_factory=list)


# ------------------------------------------------------------------------ OpenAI -> Harmony


def _text(content: object, where: str) -> str:
    """OpenAI message content: a string, None, or a list of ``{"type": "text", "text"}``."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise InputError(f"{where}: a text part needs a string 'text'; got {text!r}")
                parts.append(text)
            else:
                raise InputError(f"{where}: only text content is supported; got {part!r}")
        return "".join(parts)
    raise InputError(f"{where}: expected 'content' to be a string or a list of text parts")


def _function_tools(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise InputError(f"tools[{i}]: expected a mapping; got {tool!r}")
        if tool.get("type", "function") != "function":
            raise InputError(f"tools[{i}]: only 'function' tools are supported")
        fn = tool.get("function", tool)
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not name:
            raise InputError(f"tools[{i}]: expected a function with a 'name'")
        entry: dict[str, Any] = {"name": name, "description": fn.get("description") or ""}
        if fn.get("parameters") is not None:
            entry["parameters"] = fn["parameters"]
        out.append(entry)
    return out


def to_harmony(
    messages: Sequence[Mapping[str, Any]],
    *,
    reasoning_effort: str = "medium",
    tools: Sequence[Mapping[str, Any]] | None = None,
    conversation_start_date: str | None = None,
) -> list[dict[str, Any]]:
    """Convert OpenAI chat messages (and function tools) to a Harmony conversation.

    The Harmony system message holds the model identity, reasoning effort, optional date and the
    default channel config. OpenAI ``system``/``developer`` messages become the developer
    message's instructions (joined by a blank line), ``tools`` its ``functions`` namespace.
    Assistant ``reasoning_content`` becomes an ``analysis`` message, ``content`` a ``final``
    message (``commentary`` when the message also has tool calls: a preamble), each
    ``tool_calls`` entry a ``commentary`` message to ``functions.NAME`` with content type
    ``<|constrain|>json``; a ``tool`` message is authored by ``functions.NAME`` (found through its
    ``tool_call_id``, or its ``name``) and addressed to the assistant.

    Raises:
        InputError: a message or tool is malformed (the message says which).

    Example:
        >>> convo = to_harmony([{"role": "system", "content": "Be brief."},
        ...                     {"role": "user", "content": "Hi"}], reasoning_effort="low")
        >>> [(m["role"], m["content"][0]["type"]) for m in convo]
        [('system', 'system_content'), ('developer', 'developer_content'), ('user', 'text')]
        >>> convo[1]["content"][0]["instructions"]
        'Be brief.'
    """
    try:
        system = harmony.system_content(
            reasoning_effort=reasoning_effort, conversation_start_date=conversation_start_date
        )
    except harmony.HarmonyError as e:
        raise InputError(str(e)) from None
    out: list[dict[str, Any]] = [harmony.message("system", system)]

    instructions: list[str] = []
    body: list[dict[str, Any]] = []
    call_names: dict[str, str] = {}
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, Mapping):
            raise InputError(f"{where}: expected a mapping; got {msg!r}")
        role = msg.get("role")
        if role in ("system", "developer"):
            instructions.append(_text(msg.get("content"), where))
        elif role == "user":
            body.append(harmony.message("user", _text(msg.get("content"), where)))
        elif role == "assistant":
            body += _assistant_messages(msg, where, call_names)
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            name = call_names.get(call_id) if isinstance(call_id, str) else None
            name = name or msg.get("name")
            if not isinstance(name, str) or not name:
                raise InputError(
                    f"{where}: tool_call_id {call_id!r} matches no earlier assistant tool call "
                    f"(and the message has no 'name')"
                )
            body.append(
                harmony.message(
                    "tool",
                    _text(msg.get("content"), where),
                    name=f"{_FUNCTIONS}{name}",
                    channel="commentary",
                    recipient="assistant",
                )
            )
        else:
            raise InputError(
                f"{where}: expected role 'system', 'developer', 'user', 'assistant' or 'tool'; "
                f"got {role!r}"
            )

    function_tools = _function_tools(tools) if tools else None
    if instructions or function_tools:
        developer = harmony.developer_content(
            "\n\n".join(instructions) if instructions else None, function_tools=function_tools
        )
        out.append(harmony.message("developer", developer))
    return out + body


def _assistant_messages(
    msg: Mapping[str, Any], where: str, call_names: dict[str, str]
) -> list[dict[str, Any]]:
    out = []
    reasoning = msg.get("reasoning_content")
    if reasoning:
        out.append(harmony.message("assistant", _text(reasoning, where), channel="analysis"))
    calls = msg.get("tool_calls") or []
    content = _text(msg.get("content"), where)
    if content:
        channel = "commentary" if calls else "final"
        out.append(harmony.message("assistant", content, channel=channel))
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, Mapping) else None
        name = fn.get("name") if isinstance(fn, Mapping) else None
        if not isinstance(name, str) or not name:
            raise InputError(f"{where}.tool_calls[{j}]: expected a 'function' with a 'name'")
        arguments = fn.get("arguments", "{}")
        if not isinstance(arguments, str):  # be lenient: a parsed object
            arguments = json.dumps(arguments)
        if isinstance(call.get("id"), str):
            call_names[call["id"]] = name
        out.append(
            harmony.message(
                "assistant",
                arguments,
                channel="commentary",
                recipient=f"{_FUNCTIONS}{name}",
                content_type="<|constrain|>json",
            )
        )
    if not out:  # an empty assistant turn still takes its place in the conversation
        out.append(harmony.message("assistant", "", channel="final"))
    return out


def render_prompt(
    messages: Sequence[Mapping[str, Any]],
    *,
    reasoning_effort: str = "medium",
    tools: Sequence[Mapping[str, Any]] | None = None,
    conversation_start_date: str | None = None,
    tokenizer: Tokenizer | None = None,
) -> list[int]:
    """The prompt token ids for ``messages``, ending with ``<|start|>assistant``.

    Example:
        >>> ids = render_prompt([{"role": "user", "content": "Hi"}])
        >>> ids[-2:]
        [200006, 173781]
    """
    convo = to_harmony(
        messages,
        reasoning_effort=reasoning_effort,
        tools=tools,
        conversation_start_date=conversation_start_date,
    )
    try:
        return harmony.render_conversation_for_completion(convo, "assistant", tokenizer=tokenizer)
    except harmony.HarmonyError as e:
        raise InputError(str(e)) from None


# ------------------------------------------------------------------------ tokens -> events


class CompletionParser:
    """Turns sampled completion tokens (after ``<|start|>assistant``) into chat events.

    :meth:`feed` one token at a time; once :attr:`finish_reason` is set (a stop token or stop
    string), stop generating and call :meth:`close`, which flushes held-back text and any open
    message. Never raises on model output: unparsable headers (or more than
    :data:`MAX_HEADER_TOKENS` header tokens) and stray tokens become content.
    Text that might begin a stop string is held back until it is known not to.

    Example:
        >>> p = CompletionParser()
        >>> events = []
        >>> for t in [200005, 17196, 200008, 19, 200002]:  # <|channel|>final<|message|>4<|return|>
        ...     events += p.feed(t)
        >>> events, p.finish_reason
        ([ContentDelta(text='4')], 'stop')
    """

    def __init__(self, tokenizer: Tokenizer | None = None, *, stop: Iterable[str] = ()) -> None:
        """``stop``: strings that end the answer when a message's content contains them (the
        stop string and anything after it are dropped)."""
        from .tokenizer import Tokenizer

        self._tok = tokenizer if tokenizer is not None else Tokenizer.bundled()
        self._stop = [s for s in stop if s]
        self._parser: harmony.StreamableParser | None = harmony.StreamableParser(
            "assistant", self._tok
        )
        self._pending: list[int] = []  # tokens of the header being read
        self._raw_utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._msg_text = ""  # deltas seen for the message being parsed
        self._messages: list[dict[str, Any]] = []
        self._content = ""  # all content text, including held-back text
        self._emitted = 0  # characters of _content already emitted
        self._removed = 0  # characters cut off the end by a stop string
        self._reasoning: list[str] = []
        self._tool_calls: list[ToolCall] = []
        self.finish_reason: FinishReason | None = None
        self.token_count = 0  # tokens fed, stop token included

    # ------------------------------------------------------------------------------ feeding

    def feed(self, token: int) -> list[ChatEvent]:
        """Consume one token; returns the events it completes (never :class:`Done`)."""
        if self.finish_reason is not None:
            return []
        token = int(token)
        self.token_count += 1
        events: list[ChatEvent] = []
        if self._parser is None:  # raw mode, after malformed output
            self._feed_raw(token, events)
        else:
            self._feed_parser(self._parser, token, events)
        if token in _STOP_TOKENS and self.finish_reason is None:
            self.finish_reason = "tool_calls" if self._tool_calls else "stop"
        return events

    def _feed_parser(
        self, parser: harmony.StreamableParser, token: int, events: list[ChatEvent]
    ) -> None:
        state = parser.state
        if state is not harmony.StreamState.CONTENT:
            if token in (*_STOP_TOKENS, harmony.END):  # a header cut short by a stop token
                self._malformed(self._pending, events)
                self._parser = harmony.StreamableParser(None, self._tok)
                return
            self._pending.append(token)
            if len(self._pending) > MAX_HEADER_TOKENS:  # no <|message|> in sight: not a header
                self._malformed(self._pending, events)
                self._parser = None
                return
        try:
            parser.process(token)
        except ValueError:  # HarmonyError: a header that does not parse, a stray token
            self._malformed(self._pending, events)
            self._parser = None  # raw mode until the next <|start|> or stop token
            return
        if parser.state is harmony.StreamState.CONTENT:
            self._pending = []
            delta = parser.last_content_delta
            if delta:
                self._msg_text += delta
                self._route(parser, delta, events)
        elif state is harmony.StreamState.CONTENT:  # the message just ended
            self._pending = []
            self._message_done(parser.messages[-1], events, complete=True)

    def _feed_raw(self, token: int, events: list[ChatEvent]) -> None:
        if token == harmony.START or token == harmony.END:
            tail = self._raw_utf8.decode(b"", final=True)
            self._raw_utf8.reset()
            if tail:
                self._add_content(tail, events)
            self._parser = harmony.StreamableParser(None, self._tok)
            if token == harmony.START:
                self._feed_parser(self._parser, token, events)
            return
        if token in _STOP_TOKENS:
            return
        self._add_content(self._decode_raw(token), events)

    def _decode_raw(self, token: int) -> str:
        try:
            return self._raw_utf8.decode(self._tok.token_bytes(token))
        except ValueError:  # not a token of this vocabulary
            return self._raw_utf8.decode(b"", final=True) + "\ufffd"

    def _malformed(self, tokens: list[int], events: list[ChatEvent]) -> None:
        """Unparsable output: show its text as content."""
        self._raw_utf8.reset()
        text = "".join(self._decode_raw(t) for t in tokens)
        text += self._raw_utf8.decode(b"", final=True)
        self._raw_utf8.reset()
        self._pending = []
        if text:
            self._add_content(text, events)

    def _route(self, parser: harmony.StreamableParser, delta: str, events: list[ChatEvent]) -> None:
        if _is_tool_call(parser.current_role, parser.current_recipient):
            return  # parsed when the message ends
        if parser.current_role is harmony.Role.ASSISTANT and parser.current_channel == "analysis":
            self._reasoning.append(delta)
            events.append(ReasoningDelta(delta))
        else:
            self._add_content(delta, events)

    def _message_done(
        self, message: dict[str, Any], events: list[ChatEvent], *, complete: bool
    ) -> None:
        self._messages.append(message)
        text = "".join(c["text"] for c in message["content"] if c.get("type") == "text")
        role = harmony.Role(message["role"])
        recipient = message.get("recipient")
        if _is_tool_call(role, recipient):
            events.append(self._tool_call(recipient, text, complete))
        elif text.startswith(self._msg_text) and len(text) > len(self._msg_text):
            # the decoder's tail (U+FFFD for a cut character) arrives with the message's end
            tail = text[len(self._msg_text) :]
            if role is harmony.Role.ASSISTANT and message.get("channel") == "analysis":
                self._reasoning.append(tail)
                events.append(ReasoningDelta(tail))
            else:
                self._add_content(tail, events)
        self._msg_text = ""
        self._emit_to(len(self._content), events)  # stop strings match within one message

    def _tool_call(self, recipient: str, raw: str, complete: bool) -> ToolCall:
        name = recipient[len(_FUNCTIONS) :] if recipient.startswith(_FUNCTIONS) else recipient
        call_id = f"call_{uuid.uuid4().hex[:24]}"
        arguments: dict[str, Any] | None = None
        error: str | None = None
        if not complete:
            error = "generation ended before the tool call was complete"
        else:
            try:
                value = json.loads(raw)
            except ValueError as e:
                error = f"invalid JSON arguments: {e}"
            else:
                if isinstance(value, dict):
                    arguments = value
                else:
                    error = f"arguments must be a JSON object; got {type(value).__name__}"
        call = ToolCall(call_id, name, arguments, raw, error)
        self._tool_calls.append(call)
        return call

    def _add_content(self, text: str, events: list[ChatEvent]) -> None:
        """Append answer text, emitting what cannot be part of a stop string."""
        if self.finish_reason is not None:
            return
        self._content += text
        if not self._stop:
            events.append(ContentDelta(self._content[self._emitted :]))
            self._emitted = len(self._content)
            return
        hits = [(i, s) for s in self._stop if (i := self._content.find(s, self._emitted)) >= 0]
        if hits:
            at = min(i for i, _ in hits)
            self._removed = len(self._content) - at
            self._content = self._content[:at]
            self._emit_to(len(self._content), events)
            self.finish_reason = "stop"
            return
        hold = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(self._content) - self._emitted), hold, -1):
                if self._content.endswith(s[:k]):
                    hold = k
                    break
        self._emit_to(len(self._content) - hold, events)

    def _emit_to(self, end: int, events: list[ChatEvent]) -> None:
        if end > self._emitted:
            events.append(ContentDelta(self._content[self._emitted : end]))
            self._emitted = end

    # ----------------------------------------------------------------------------- closing

    def close(self) -> list[ChatEvent]:
        """End of generation: flush held-back text and any open message (never raises)."""
        events: list[ChatEvent] = []
        parser = self._parser
        if parser is not None and parser.state is harmony.StreamState.CONTENT:
            parser.process_eos()
            message = parser.messages[-1]
            if self._removed and message["content"]:
                item = message["content"][-1]
                item["text"] = item["text"][: max(0, len(item["text"]) - self._removed)]
            stopped_by_string = self.finish_reason == "stop"
            self._message_done(message, events, complete=stopped_by_string)
        elif parser is None:
            tail = self._raw_utf8.decode(b"", final=True)
            self._raw_utf8.reset()
            if tail:
                self._add_content(tail, events)
        elif self._pending:  # generation ended inside a header: show it rather than lose it
            self._malformed(self._pending, events)
        self._emit_to(len(self._content), events)
        self._parser = harmony.StreamableParser(None, self._tok)
        return events

    # -------------------------------------------------------------------------- accumulated

    @property
    def content(self) -> str:
        """All answer text so far (stop string stripped)."""
        return self._content

    @property
    def reasoning(self) -> str:
        """All chain-of-thought text so far."""
        return "".join(self._reasoning)

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The tool calls so far."""
        return list(self._tool_calls)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The completed Harmony messages so far (harmony JSON form)."""
        return list(self._messages)


def _is_tool_call(role: harmony.Role | None, recipient: str | None) -> bool:
    return role is harmony.Role.ASSISTANT and recipient is not None and recipient != "all"


# ------------------------------------------------------------------------------ generation


def reuse_prefix(session: Session, prompt: Sequence[int]) -> int:
    """Keep the longest prefix of the session's cache shared with ``prompt``; return its length.

    At least the last prompt token is always recomputed, so there are logits to sample from.
    Harmony drops earlier analysis, so the shared prefix may be shorter than the last prompt.

    Example:
        >>> cached = reuse_prefix(session, prompt)                        # doctest: +SKIP
        >>> logits = session.append(prompt[cached:])                      # doctest: +SKIP
    """
    held = session.tokens
    n = 0
    for a, b in zip(held, prompt, strict=False):
        if a != b:
            break
        n += 1
    n = min(n, len(prompt) - 1)
    if n != len(held):
        session.truncate(n)
    return n


@overload
def chat(
    session: Session,
    messages: Sequence[Mapping[str, Any]],
    *,
    stream: Literal[True] = ...,
    **kwargs: Any,
) -> Iterator[ChatEvent]: ...
@overload
def chat(
    session: Session,
    messages: Sequence[Mapping[str, Any]],
    *,
    stream: Literal[False],
    **kwargs: Any,
) -> ChatResult: ...
def chat(
    session: Session,
    messages: Sequence[Mapping[str, Any]],
    *,
    reasoning_effort: str = "medium",
    tools: Sequence[Mapping[str, Any]] | None = None,
    stream: bool = True,
    max_tokens: int | None = None,
    stop: str | Sequence[str] | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    tokenizer: Tokenizer | None = None,
    conversation_start_date: str | None = None,
    **sampling: Any,
) -> Iterator[ChatEvent] | ChatResult:
    """Answer OpenAI-style ``messages`` with ``session``; see :meth:`gpt_oss_cpu.Session.chat`.

    Extra keyword arguments (``**sampling``) go to :meth:`~gpt_oss_cpu.Session.generate`
    unchanged. With ``stream=True`` (default) returns an iterator of events ending with
    :class:`Done`; the prompt is processed when iteration starts. With ``stream=False`` returns a
    :class:`ChatResult`.

    Raises:
        InputError: malformed messages or tools, or a bad ``max_tokens``.
        ContextOverflowError: the prompt does not fit in the session.

    Example:
        >>> result = chat(session, [{"role": "user", "content": "2+2?"}], stream=False,
        ...               tokenizer=model.tokenizer)                      # doctest: +SKIP
        >>> result.content                                                # doctest: +SKIP
        '4'
    """
    if max_tokens is not None and max_tokens < 0:
        raise InputError(f"max_tokens must be >= 0, found {max_tokens}")
    if tokenizer is None:
        from .tokenizer import Tokenizer

        tokenizer = Tokenizer.bundled()
    prompt = render_prompt(
        messages,
        reasoning_effort=reasoning_effort,
        tools=tools,
        conversation_start_date=conversation_start_date,
        tokenizer=tokenizer,
    )
    if len(prompt) > session.max_context:
        raise ContextOverflowError(
            f"the prompt has {len(prompt)} tokens but the session holds at most "
            f"{session.max_context}"
        )
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    parser = CompletionParser(tokenizer, stop=stops)
    sampling = {"temperature": temperature, "top_p": top_p, "seed": seed, **sampling}
    events = _run(session, prompt, parser, max_tokens, sampling)
    if stream:
        return events
    done: Done | None = None
    for event in events:
        if isinstance(event, Done):
            done = event
    assert done is not None
    return ChatResult(
        content=parser.content,
        reasoning=parser.reasoning,
        tool_calls=parser.tool_calls,
        finish_reason=done.finish_reason,
        usage=done.usage,
        messages=parser.messages,
    )


def _run(
    session: Session,
    prompt: list[int],
    parser: CompletionParser,
    max_tokens: int | None,
    sampling: dict[str, Any],
) -> Iterator[ChatEvent]:
    cached = reuse_prefix(session, prompt)
    room = session.max_context - len(prompt)
    limit = room if max_tokens is None else min(max_tokens, room)
    tokens = session.generate(prompt[cached:], limit, stop=_STOP_TOKENS, **sampling)
    try:
        for token in tokens:
            yield from parser.feed(token)
            if parser.finish_reason is not None:
                break
    finally:
        tokens.close()
    yield from parser.close()
    usage = {
        "prompt_tokens": len(prompt),
        "completion_tokens": parser.token_count,
        "cached_tokens": cached,
        "computed_prompt_tokens": len(prompt) - cached,
    }
    yield Done(parser.finish_reason or "length", usage)
