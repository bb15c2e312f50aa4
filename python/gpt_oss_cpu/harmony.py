"""The Harmony chat format of gpt-oss, in pure Python on top of :class:`~gpt_oss_cpu.Tokenizer`.

This module renders conversations to token ids and parses model completions back into
messages exactly like OpenAI's ``openai-harmony`` library (``HarmonyGptOss`` encoding), without
depending on it. Names mirror ``openai_harmony`` so its users feel at home, and conversations
and messages use that library's own JSON form (what ``Conversation.to_json()`` produces)::

    {"messages": [
        {"role": "system", "name": None, "content": [{"type": "system_content", ...}]},
        {"role": "user", "name": None, "content": [{"type": "text", "text": "Hi"}]},
        {"role": "assistant", "name": None, "content": [{"type": "text", "text": "..."}],
         "channel": "final"},
    ]}

The small builders :func:`system_content`, :func:`developer_content` and :func:`message` produce
exactly these dictionaries.

Example:
    >>> from gpt_oss_cpu import harmony
    >>> convo = [
    ...     harmony.message("system", harmony.system_content(reasoning_effort="low")),
    ...     harmony.message("user", "What is 2 + 2?"),
    ... ]
    >>> ids = harmony.render_conversation_for_completion(convo)
    >>> ids[-2:] == [harmony.START, 173781]  # "<|start|>assistant"
    True
    >>> completion = [200005, 17196, 200008, 19, 200002]  # <|channel|>final<|message|>4<|return|>
    >>> harmony.parse_messages_from_completion_tokens(completion)  # doctest: +NORMALIZE_WHITESPACE
    [{'role': 'assistant', 'name': None, 'content': [{'type': 'text', 'text': '4'}],
      'channel': 'final'}]
"""

from __future__ import annotations

import codecs
import copy
import enum
import json
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

__all__ = [
    "CALL",
    "CHANNEL",
    "CONSTRAIN",
    "DEFAULT_KNOWLEDGE_CUTOFF",
    "DEFAULT_MODEL_IDENTITY",
    "END",
    "MESSAGE",
    "RETURN",
    "START",
    "HarmonyError",
    "ReasoningEffort",
    "RenderConversationConfig",
    "RenderOptions",
    "Role",
    "StreamState",
    "StreamableParser",
    "browser_tool_namespace",
    "developer_content",
    "message",
    "parse_messages_from_completion_tokens",
    "python_tool_namespace",
    "render",
    "render_conversation",
    "render_conversation_for_completion",
    "render_conversation_for_training",
    "stop_tokens",
    "stop_tokens_for_assistant_actions",
    "system_content",
]

# ----------------------------------------------------------------------------- special tokens

RETURN = 200002
"""``<|return|>``: the end of the assistant's final answer (a generation stop token)."""
CONSTRAIN = 200003
"""``<|constrain|>``: precedes a constrained content type such as ``json`` in a header."""
CHANNEL = 200005
"""``<|channel|>``: precedes the channel name in a header."""
START = 200006
"""``<|start|>``: starts a message."""
END = 200007
"""``<|end|>``: ends a message (not the turn)."""
MESSAGE = 200008
"""``<|message|>``: separates the header from the content."""
CALL = 200012
"""``<|call|>``: ends an assistant tool call (a generation stop token)."""

_CHANNEL_MARKER = "<|channel|>"
_CONSTRAIN_MARKER = "<|constrain|>"
_STOP_TOKENS = frozenset((RETURN, CALL, END))

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
"""Harmony's default model identity (first line of the system message)."""
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
"""Harmony's default knowledge cutoff."""
_DEFAULT_CHANNELS = ("analysis", "commentary", "final")

_REPLACEMENT = "\ufffd"
# Rust's `char::is_whitespace` (Unicode White_Space), used by harmony's header parser.
_RUST_WHITESPACE = (
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008"
    "\u2009\u200a\u2028\u2029\u202f\u205f\u3000"
)
# Rust's `str::split_ascii_whitespace` separators.
_ASCII_WHITESPACE_RE = re.compile(r"[ \t\n\x0c\r]+")


def stop_tokens_for_assistant_actions() -> list[int]:
    """Token ids that end an assistant turn: ``<|return|>`` and ``<|call|>``.

    Use these as the generation stop set for chat (``<|end|>`` only ends one message).

    Example:
        >>> stop_tokens_for_assistant_actions()
        [200002, 200012]
    """
    return [RETURN, CALL]


def stop_tokens() -> list[int]:
    """All tokens that end a message: ``<|return|>``, ``<|call|>`` and ``<|end|>``.

    Example:
        >>> stop_tokens()
        [200002, 200012, 200007]
    """
    return [RETURN, CALL, END]


# ----------------------------------------------------------------------------- public types


class HarmonyError(ValueError):
    """Malformed Harmony input: a conversation that cannot be rendered or tokens that do not
    parse. The message says what was expected.

    Example:
        >>> try:
        ...     render_conversation([{"role": "tool", "content": "hi"}])
        ... except HarmonyError as e:
        ...     print(e)
        message 0: a tool message needs the tool's 'name' as its author name
    """


class Role(str, enum.Enum):
    """The author role of a message (a ``str``, so ``Role.USER == "user"``).

    Example:
        >>> Role("assistant") is Role.ASSISTANT, Role.TOOL == "tool"
        (True, True)
    """

    USER = "user"
    ASSISTANT = "assistant"
    SYSTEM = "system"
    DEVELOPER = "developer"
    TOOL = "tool"


class ReasoningEffort(str, enum.Enum):
    """Reasoning effort of the system message; values are spelled as harmony's JSON spells them.

    Example:
        >>> ReasoningEffort.LOW.value
        'Low'
    """

    LOW = "Low"
    MEDIUM = "Medium"
    HIGH = "High"


class StreamState(enum.Enum):
    """State of a :class:`StreamableParser`.

    Example:
        >>> StreamState.CONTENT.value
        'Content'
    """

    EXPECT_START = "ExpectStart"
    HEADER = "Header"
    CONTENT = "Content"


@dataclass(frozen=True)
class RenderConversationConfig:
    """Options of :func:`render_conversation` and friends.

    ``auto_drop_analysis`` (default True, as in harmony's Python API): when the last assistant
    message is on channel ``final``, drop every ``analysis`` message that comes before the
    conversation's first ``final`` message.

    Example:
        >>> RenderConversationConfig(auto_drop_analysis=False)
        RenderConversationConfig(auto_drop_analysis=False)
    """

    auto_drop_analysis: bool = True


@dataclass(frozen=True)
class RenderOptions:
    """Options of :func:`render` for a single message.

    ``conversation_has_function_tools`` adds the line ``Calls to these tools must go to the
    commentary channel: 'functions'.`` to a system message's channel section.

    Example:
        >>> RenderOptions().conversation_has_function_tools
        False
    """

    conversation_has_function_tools: bool = False


RoleLike = Role | str
_ROLE_VALUES = frozenset(r.value for r in Role)
ConversationLike = Mapping[str, Any] | Sequence[Mapping[str, Any]] | str

# ----------------------------------------------------------------------------- builders


def browser_tool_namespace() -> dict[str, Any]:
    """Harmony's built-in ``browser`` tool namespace (``ToolNamespaceConfig.browser()``).

    Example:
        >>> [t["name"] for t in browser_tool_namespace()["tools"]]
        ['search', 'open', 'find']
    """
    return {
        "name": "browser",
        "description": (
            "Tool for browsing.\n"
            "The `cursor` appears in brackets before each browsing display: `[{cursor}]`.\n"
            "Cite information from the tool using the following format:\n"
            "`\u3010{cursor}\u2020L{line_start}(-L{line_end})?\u3011`, for example: "
            "`\u30106\u2020L9-L11\u3011` or `\u30108\u2020L3\u3011`.\n"
            "Do not quote more than 10 words directly from the tool output.\n"
            "sources=web (default: web)"
        ),
        "tools": [
            {
                "name": "search",
                "description": (
                    "Searches for information related to `query` and displays `topn` results."
                ),
                "parameters": {
                    "type": "object",
                    "properties": {
                        "query": {"type": "string"},
                        "topn": {"type": "number", "default": 10},
                        "source": {"type": "string"},
                    },
                    "required": ["query"],
                },
            },
            {
                "name": "open",
                "description": (
                    "Opens the link `id` from the page indicated by `cursor` starting at line "
                    "number `loc`, showing `num_lines` lines.\n"
                    "Valid link ids are displayed with the formatting: "
                    "`\u3010{id}\u2020.*\u3011`.\n"
                    "If `cursor` is not provided, the most recent page is implied.\n"
                    "If `id` is a string, it is treated as a fully qualified URL associated "
                    "with `source`.\n"
                    "If `loc` is not provided, the viewport will be positioned at the beginning "
                    "of the document or centered on the most relevant passage, if available.\n"
                    "Use this function without `id` to scroll to a new location of an opened "
                    "page."
                ),
                "parameters": {
                    "type": "object",
                    "properties": {
                        "id": {"type": ["number", "string"], "default": -1},
                        "cursor": {"type": "number", "default": -1},
                        "loc": {"type": "number", "default": -1},
                        "num_lines": {"type": "number", "default": -1},
                        "view_source": {"type": "boolean", "default": False},
                        "source": {"type": "string"},
                    },
                },
            },
            {
                "name": "find",
                "description": (
                    "Finds exact matches of `pattern` in the current page, or the page given "
                    "by `cursor`."
                ),
                "parameters": {
                    "type": "object",
                    "properties": {
                        "pattern": {"type": "string"},
                        "cursor": {"type": "number", "default": -1},
                    },
                    "required": ["pattern"],
                },
            },
        ],
    }


def python_tool_namespace() -> dict[str, Any]:
    """Harmony's built-in ``python`` tool namespace (``ToolNamespaceConfig.python()``).

    It has a description and no typed tools; the model calls it with ``to=python``.

    Example:
        >>> ns = python_tool_namespace()
        >>> ns["name"], ns["tools"]
        ('python', [])
    """
    return {
        "name": "python",
        "description": (
            "Use this tool to execute Python code in your chain of thought. The code will not be "
            "shown to the user. This tool should be used for internal reasoning, but not for "
            "code that is intended to be visible to the user (e.g. when creating plots, tables, "
            "or files).\n\n"
            "When you send a message containing Python code to python, it will be executed in a "
            "stateful Jupyter notebook environment. python will respond with the output of the "
            "execution or time out after 120.0 seconds. The drive at '/mnt/data' can be used to "
            "save and persist user files. Internet access for this session is UNKNOWN. Depends "
            "on the cluster."
        ),
        "tools": [],
    }


_BUILTIN_TOOLS = {"browser": browser_tool_namespace, "python": python_tool_namespace}


def system_content(
    *,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
    reasoning_effort: ReasoningEffort | str | None = ReasoningEffort.MEDIUM,
    conversation_start_date: str | None = None,
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    required_channels: Sequence[str] | None = _DEFAULT_CHANNELS,
    tools: Mapping[str, Mapping[str, Any]] | None = None,
    builtin_tools: Iterable[str] = (),
) -> dict[str, Any]:
    """A ``system_content`` item, as harmony's ``SystemContent(...).to_dict()`` produces it.

    Defaults are harmony's (no date!). ``reasoning_effort`` accepts ``"low"``, ``"Low"`` or a
    :class:`ReasoningEffort`. ``builtin_tools`` adds the ``"browser"`` and/or ``"python"``
    namespaces; ``tools`` maps namespace names to namespace configs. ``None`` leaves a field out.

    Example:
        >>> system_content(reasoning_effort="low", conversation_start_date="2025-06-28")
        ... # doctest: +NORMALIZE_WHITESPACE
        {'model_identity': 'You are ChatGPT, a large language model trained by OpenAI.',
         'reasoning_effort': 'Low', 'conversation_start_date': '2025-06-28',
         'knowledge_cutoff': '2024-06',
         'channel_config': {'valid_channels': ['analysis', 'commentary', 'final'],
                            'channel_required': True},
         'type': 'system_content'}
    """
    out: dict[str, Any] = {}
    if model_identity is not None:
        out["model_identity"] = model_identity
    if reasoning_effort is not None:
        out["reasoning_effort"] = _reasoning_effort(reasoning_effort, "reasoning_effort").value
    if conversation_start_date is not None:
        out["conversation_start_date"] = conversation_start_date
    if knowledge_cutoff is not None:
        out["knowledge_cutoff"] = knowledge_cutoff
    if required_channels is not None:
        out["channel_config"] = {
            "valid_channels": list(required_channels),
            "channel_required": True,
        }
    all_tools: dict[str, Any] = {}
    for name in builtin_tools:
        factory = _BUILTIN_TOOLS.get(name)
        if factory is None:
            raise HarmonyError(f"expected a built-in tool 'browser' or 'python'; got {name!r}")
        all_tools[name] = factory()
    if tools is not None:
        all_tools.update({k: copy.deepcopy(dict(v)) for k, v in tools.items()})
    if all_tools or tools is not None:
        out["tools"] = all_tools
    out["type"] = "system_content"
    return out


def developer_content(
    instructions: str | None = None,
    *,
    function_tools: Sequence[Mapping[str, Any]] | None = None,
    tools: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """A ``developer_content`` item, as harmony's ``DeveloperContent(...).to_dict()`` produces it.

    ``function_tools`` is a list of ``{"name", "description", "parameters"?: JSON schema}``
    (harmony's ``with_function_tools``: they form the ``functions`` namespace).

    Example:
        >>> developer_content("Be brief.", function_tools=[{"name": "now", "description": "Time."}])
        ... # doctest: +NORMALIZE_WHITESPACE
        {'instructions': 'Be brief.',
         'tools': {'functions': {'name': 'functions',
                                 'tools': [{'name': 'now', 'description': 'Time.'}]}},
         'type': 'developer_content'}
    """
    out: dict[str, Any] = {}
    if instructions is not None:
        out["instructions"] = instructions
    all_tools: dict[str, Any] | None = None
    if tools is not None:
        all_tools = {k: copy.deepcopy(dict(v)) for k, v in tools.items()}
    if function_tools is not None:
        described = []
        for i, tool in enumerate(function_tools):
            if not isinstance(tool, Mapping):
                raise HarmonyError(f"function_tools[{i}]: expected a mapping; got {tool!r}")
            entry = {"name": tool.get("name"), "description": tool.get("description")}
            if tool.get("parameters") is not None:
                entry["parameters"] = copy.deepcopy(tool["parameters"])
            described.append(entry)
        all_tools = all_tools or {}
        all_tools["functions"] = {"name": "functions", "tools": described}
    if all_tools is not None:
        out["tools"] = all_tools
    out["type"] = "developer_content"
    return out


def message(
    role: RoleLike,
    content: str | Mapping[str, Any] | Sequence[str | Mapping[str, Any]],
    *,
    name: str | None = None,
    channel: str | None = None,
    recipient: str | None = None,
    content_type: str | None = None,
) -> dict[str, Any]:
    """A message in harmony's JSON form (``Message.to_dict()``).

    ``content`` is a string (one text item), a content item such as :func:`system_content`, or a
    list of those. Tool results use ``role="tool"`` with the tool as ``name``.

    Example:
        >>> message("tool", '{"temp": 20}', name="functions.get_weather", channel="commentary",
        ...         recipient="assistant")  # doctest: +NORMALIZE_WHITESPACE
        {'role': 'tool', 'name': 'functions.get_weather',
         'content': [{'type': 'text', 'text': '{"temp": 20}'}],
         'channel': 'commentary', 'recipient': 'assistant'}
    """
    items = [content] if isinstance(content, (str, Mapping)) else list(content)
    out: dict[str, Any] = {
        "role": _role(role, "role").value,
        "name": name,
        "content": [
            {"type": "text", "text": c} if isinstance(c, str) else copy.deepcopy(dict(c))
            for c in items
        ],
    }
    if channel is not None:
        out["channel"] = channel
    if recipient is not None:
        out["recipient"] = recipient
    if content_type is not None:
        out["content_type"] = content_type
    return out


# ----------------------------------------------------------------------------- validation


@dataclass
class _Namespace:
    name: str
    description: str | None
    tools: list[tuple[str, str, Any]]  # (name, description, parameters or None)


@dataclass
class _System:
    model_identity: str | None
    reasoning_effort: ReasoningEffort | None
    conversation_start_date: str | None
    knowledge_cutoff: str | None
    valid_channels: list[str] | None
    channel_required: bool
    tools: dict[str, _Namespace] | None


@dataclass
class _Developer:
    instructions: str | None
    tools: dict[str, _Namespace] | None


_Content = str | _System | _Developer


@dataclass
class _Message:
    role: Role
    name: str | None
    content: list[_Content]
    channel: str | None
    recipient: str | None
    content_type: str | None


_MISSING = object()


def _role(value: object, where: str) -> Role:
    try:
        return Role(value)
    except ValueError:
        allowed = ", ".join(repr(r.value) for r in Role)
        raise HarmonyError(f"expected {where!r} to be one of {allowed}; got {value!r}") from None


def _reasoning_effort(value: object, where: str) -> ReasoningEffort:
    if isinstance(value, ReasoningEffort):
        return value
    if isinstance(value, str):
        for effort in ReasoningEffort:
            if value.lower() == effort.value.lower():
                return effort
    raise HarmonyError(f"expected {where} to be 'Low', 'Medium' or 'High'; got {value!r}")


def _opt_str(obj: Mapping[str, Any], key: str, where: str, default: Any = None) -> str | None:
    value = obj.get(key, default)
    if value is not None and not isinstance(value, str):
        raise HarmonyError(f"{where}: expected {key!r} to be a string or null; got {value!r}")
    return value


def _check_keys(obj: Mapping[str, Any], allowed: set[str], where: str) -> None:
    extra = set(obj) - allowed
    if extra:
        raise HarmonyError(
            f"{where}: unexpected key(s) {sorted(extra)}; expected only {sorted(allowed)}"
        )


def _namespaces(value: object, where: str) -> dict[str, _Namespace] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise HarmonyError(f"{where}: expected 'tools' to map namespace names to configs")
    out: dict[str, _Namespace] = {}
    for key, ns in value.items():
        here = f"{where}: tools[{key!r}]"
        if not isinstance(key, str) or not isinstance(ns, Mapping):
            raise HarmonyError(f"{here}: expected a string key and a namespace mapping")
        _check_keys(ns, {"name", "description", "tools"}, here)
        name = ns.get("name")
        if not isinstance(name, str):
            raise HarmonyError(f"{here}: expected 'name' to be a string; got {name!r}")
        tools = ns.get("tools")
        if not isinstance(tools, Sequence) or isinstance(tools, str):
            raise HarmonyError(f"{here}: expected 'tools' to be a list; got {tools!r}")
        described = []
        for i, tool in enumerate(tools):
            there = f"{here}.tools[{i}]"
            if not isinstance(tool, Mapping):
                raise HarmonyError(f"{there}: expected a tool mapping; got {tool!r}")
            _check_keys(tool, {"name", "description", "parameters"}, there)
            tname, tdesc = tool.get("name"), tool.get("description")
            if not isinstance(tname, str) or not isinstance(tdesc, str):
                raise HarmonyError(f"{there}: expected string 'name' and 'description'")
            described.append((tname, tdesc, tool.get("parameters")))
        out[key] = _Namespace(name, _opt_str(ns, "description", here), described)
    return out


def _parse_content(item: object, where: str) -> _Content:
    if isinstance(item, str):
        return item
    if not isinstance(item, Mapping):
        raise HarmonyError(f"{where}: expected a content mapping or string; got {item!r}")
    kind = item.get("type")
    if kind == "text":
        _check_keys(item, {"type", "text"}, where)
        text = item.get("text")
        if not isinstance(text, str):
            raise HarmonyError(f"{where}: expected 'text' to be a string; got {text!r}")
        return text
    if kind == "system_content":
        keys = {"model_identity", "reasoning_effort", "conversation_start_date"}
        keys |= {"knowledge_cutoff", "channel_config", "tools", "type"}
        _check_keys(item, keys, where)
        # Like harmony's Python `SystemContent(**raw)`: a missing key takes the default, an
        # explicit null leaves the field out.
        effort = item.get("reasoning_effort", ReasoningEffort.MEDIUM)
        channels: list[str] | None = list(_DEFAULT_CHANNELS)
        required = True
        config = item.get("channel_config", _MISSING)
        if config is None:
            channels = None
        elif config is not _MISSING:
            if not isinstance(config, Mapping):
                raise HarmonyError(f"{where}: expected 'channel_config' to be a mapping or null")
            _check_keys(config, {"valid_channels", "channel_required"}, f"{where}.channel_config")
            channels = config.get("valid_channels")
            required = config.get("channel_required")
            if (
                not isinstance(channels, Sequence)
                or isinstance(channels, str)
                or not all(isinstance(c, str) for c in channels)
                or not isinstance(required, bool)
            ):
                raise HarmonyError(
                    f"{where}: expected channel_config {{'valid_channels': [str, ...], "
                    f"'channel_required': bool}}; got {config!r}"
                )
            channels = list(channels)
        return _System(
            model_identity=_opt_str(item, "model_identity", where, DEFAULT_MODEL_IDENTITY),
            reasoning_effort=None
            if effort is None
            else _reasoning_effort(effort, f"{where}: 'reasoning_effort'"),
            conversation_start_date=_opt_str(item, "conversation_start_date", where),
            knowledge_cutoff=_opt_str(item, "knowledge_cutoff", where, DEFAULT_KNOWLEDGE_CUTOFF),
            valid_channels=channels,
            channel_required=required,
            tools=_namespaces(item.get("tools"), where),
        )
    if kind == "developer_content":
        _check_keys(item, {"instructions", "tools", "type"}, where)
        return _Developer(
            instructions=_opt_str(item, "instructions", where),
            tools=_namespaces(item.get("tools"), where),
        )
    raise HarmonyError(
        f"{where}: expected content 'type' to be 'text', 'system_content' or "
        f"'developer_content'; got {kind!r}"
    )


def _parse_message(raw: object, index: int) -> _Message:
    where = f"message {index}"
    if not isinstance(raw, Mapping):
        raise HarmonyError(f"{where}: expected a message mapping; got {raw!r}")
    _check_keys(
        raw, {"role", "name", "author", "content", "channel", "recipient", "content_type"}, where
    )
    author = raw.get("author")
    if author is not None:  # also accept {"author": {"role": ..., "name": ...}}
        if not isinstance(author, Mapping):
            raise HarmonyError(f"{where}: expected 'author' to be a mapping; got {author!r}")
        role_value, name = author.get("role"), _opt_str(author, "name", where)
    else:
        role_value, name = raw.get("role"), _opt_str(raw, "name", where)
    if role_value is None:
        raise HarmonyError(f"{where}: expected a 'role'")
    try:
        role = _role(role_value, "role")
    except HarmonyError as e:
        raise HarmonyError(f"{where}: {e}") from None
    content = raw.get("content", _MISSING)
    if content is _MISSING:
        raise HarmonyError(f"{where}: expected 'content' (a string or a list of content items)")
    items = [content] if isinstance(content, str) else content
    if not isinstance(items, Sequence):
        raise HarmonyError(f"{where}: expected 'content' to be a string or a list")
    parsed = [_parse_content(c, f"{where}.content[{i}]") for i, c in enumerate(items)]
    for item in parsed:
        if isinstance(item, _System) and role is not Role.SYSTEM:
            raise HarmonyError(
                f"{where}: system_content may only appear in system messages, found in {role.value}"
            )
        if isinstance(item, _Developer) and role is not Role.DEVELOPER:
            raise HarmonyError(
                f"{where}: developer_content may only appear in developer messages, "
                f"found in {role.value}"
            )
    if role is Role.TOOL and name is None:
        raise HarmonyError(f"{where}: a tool message needs the tool's 'name' as its author name")
    return _Message(
        role=role,
        name=name,
        content=parsed,
        channel=_opt_str(raw, "channel", where),
        recipient=_opt_str(raw, "recipient", where),
        content_type=_opt_str(raw, "content_type", where),
    )


def _parse_conversation(conversation: ConversationLike) -> list[_Message]:
    if isinstance(conversation, str):
        try:
            conversation = json.loads(conversation)
        except json.JSONDecodeError as e:
            raise HarmonyError(f"expected a conversation in JSON: {e}") from None
    if isinstance(conversation, Mapping):
        if "messages" not in conversation:
            raise HarmonyError("expected a conversation mapping with a 'messages' list")
        messages = conversation["messages"]
    else:
        messages = conversation
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise HarmonyError(f"expected a list of messages; got {type(messages).__name__}")
    return [_parse_message(m, i) for i, m in enumerate(messages)]


def _config(config: RenderConversationConfig | Mapping[str, Any] | None) -> bool:
    if config is None:
        return True
    if isinstance(config, RenderConversationConfig):
        return config.auto_drop_analysis
    if isinstance(config, Mapping):
        _check_keys(config, {"auto_drop_analysis"}, "config")
        return bool(config.get("auto_drop_analysis", True))
    raise HarmonyError(f"expected config to be a RenderConversationConfig; got {config!r}")


def _tokenizer(tokenizer: Tokenizer | None) -> Tokenizer:
    if tokenizer is not None:
        return tokenizer
    from .tokenizer import Tokenizer

    return Tokenizer.bundled()


# ----------------------------------------------------------------------------- rendering


def _rust_lines(text: str) -> list[str]:
    """Rust's ``str::lines``: split on LF, drop one trailing CR per line and a final empty line."""
    if not text:
        return []
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _json_value(value: Any) -> str:
    """A JSON value as serde_json's ``Display`` prints it (compact)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _get(schema: Any, key: str) -> Any:
    return schema.get(key) if isinstance(schema, Mapping) else None


def _is_enum(schema: Any) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _default_comment(schema: Any, *, enum_raw: bool) -> str:
    """The text after ``default: ``; ``enum_raw`` prints an enum's string default unquoted."""
    default = schema["default"]
    if isinstance(default, str) and not _is_enum(schema):
        return f'"{default}"'
    if isinstance(default, str) and enum_raw:
        return default
    return _json_value(default)


def _with_nullable(variant: Any, type_str: str) -> str:
    if _get(variant, "nullable") is True and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def _schema_to_typescript(schema: Any, indent: str) -> str:
    """Harmony's JSON-Schema to TypeScript-like type rendering (``json_schema_to_typescript``)."""
    one_of = _get(schema, "oneOf")
    if isinstance(one_of, list):
        out = ""
        for variant in one_of:
            out += f"\n{indent} | "
            out += _with_nullable(variant, _schema_to_typescript(variant, indent + "   "))
            trailing = []
            description = _get(variant, "description")
            if isinstance(description, str):
                trailing.append(description)
            if isinstance(variant, Mapping) and "default" in variant:
                trailing.append("default: " + _default_comment(variant, enum_raw=False))
            if trailing:
                out += " // " + " ".join(trailing)
        return out

    type_value = _get(schema, "type")
    if isinstance(type_value, list):
        names = ["number" if t == "integer" else t for t in type_value if isinstance(t, str)]
        if names:
            return " | ".join(names)
    if not isinstance(type_value, str):
        return "any"
    if type_value == "object":
        return _object_to_typescript(schema, indent)
    if type_value == "string":
        values = _get(schema, "enum")
        if isinstance(values, list):
            names = [f'"{v}"' for v in values if isinstance(v, str)]
            if names:
                return " | ".join(names)
        return "string"
    if type_value in ("number", "integer"):
        return "number"
    if type_value == "boolean":
        return "boolean"
    if type_value == "array":
        if "items" in schema:
            return _schema_to_typescript(schema["items"], indent) + "[]"
        return "Array<any>"
    return "any"


def _object_to_typescript(schema: Mapping[str, Any], indent: str) -> str:
    out = ""
    description = schema.get("description")
    if isinstance(description, str):
        out += f"{indent}// {description}\n"
    out += "{\n"
    properties = schema.get("properties")
    if isinstance(properties, Mapping):
        required_list = schema.get("required")
        required = (
            {r for r in required_list if isinstance(r, str)}
            if isinstance(required_list, list)
            else set()
        )
        for key, prop in properties.items():
            optional = "" if key in required else "?"
            title = _get(prop, "title")
            if isinstance(title, str):
                out += f"{indent}// {title}\n{indent}//\n"
            has_one_of = isinstance(prop, Mapping) and "oneOf" in prop
            prop_description = _get(prop, "description")
            if not has_one_of and isinstance(prop_description, str):
                out += f"{indent}// {prop_description}\n"
            examples = _get(prop, "examples")
            if isinstance(examples, list) and examples:
                out += f"{indent}// Examples:\n"
                for example in examples:
                    if isinstance(example, str):
                        out += f'{indent}// - "{example}"\n'
            one_of = _get(prop, "oneOf")
            if isinstance(one_of, list):
                out += _one_of_property(prop, one_of, key, optional, indent)
                continue
            type_str = _schema_to_typescript(prop, indent + "    ")
            out += f"{indent}{key}{optional}: {_with_nullable(prop, type_str)},"
            if not has_one_of and isinstance(prop, Mapping) and "default" in prop:
                out += " // default: " + _default_comment(prop, enum_raw=True)
            out += "\n"
    out += f"{indent}}}"
    return out


def _one_of_property(
    prop: Mapping[str, Any], variants: list[Any], key: str, optional: str, indent: str
) -> str:
    out = ""
    description = prop.get("description")
    prop_description = description if isinstance(description, str) else None
    first_description = _get(variants[0], "description") if variants else None
    skip = prop_description is not None and first_description == prop_description
    rendered_above = False
    if not skip and prop_description is not None:
        out += f"{indent}// {prop_description}\n"
        rendered_above = True
    if "default" in prop:
        out += f"{indent}// default: {_default_comment(prop, enum_raw=True)}\n"
    out += f"{indent}{key}{optional}:\n"
    for i, variant in enumerate(variants):
        out += f"{indent} | "
        out += _with_nullable(variant, _schema_to_typescript(variant, indent + "   "))
        trailing = []
        variant_description = _get(variant, "description")
        if (
            not (i == 0 and rendered_above)
            and isinstance(variant_description, str)
            and variant_description != prop_description
        ):
            trailing.append(variant_description)
        if isinstance(variant, Mapping) and "default" in variant:
            trailing.append("default: " + _default_comment(variant, enum_raw=True))
        if trailing:
            out += " // " + " ".join(trailing)
        out += "\n"
    out += f"{indent},\n"
    return out


def _tools_section(tools: dict[str, _Namespace]) -> str:
    sections = ["# Tools"]
    for _, ns in sorted(tools.items()):  # harmony keeps namespaces in a BTreeMap
        lines = [f"## {ns.name}\n"]
        if ns.description is not None:
            for line in _rust_lines(ns.description):
                lines.append(f"// {line}" if ns.tools else line)
        if ns.tools:
            lines.append(f"namespace {ns.name} {{\n")
            for name, description, parameters in ns.tools:
                lines.extend(f"// {line}" for line in _rust_lines(description))
                if parameters is not None:
                    params = _schema_to_typescript(parameters, "")
                    lines.append(f"type {name} = (_: {params}) => any;\n")
                else:
                    lines.append(f"type {name} = () => any;\n")
            lines.append(f"}} // namespace {ns.name}")
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _system_text(sys: _System, has_function_tools: bool) -> str:
    sections = []
    top = []
    if sys.model_identity is not None:
        top.append(sys.model_identity)
    if sys.knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {sys.knowledge_cutoff}")
    if sys.conversation_start_date is not None:
        top.append(f"Current date: {sys.conversation_start_date}")
    if top:
        sections.append("\n".join(top))
    if sys.reasoning_effort is not None:
        sections.append(f"Reasoning: {sys.reasoning_effort.value.lower()}")
    if sys.tools:
        sections.append(_tools_section(sys.tools))
    if sys.valid_channels:
        header = f"# Valid channels: {', '.join(sys.valid_channels)}."
        if sys.channel_required:
            header += " Channel must be included for every message."
        if has_function_tools:
            header += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(header)
    return "\n\n".join(sections)


def _developer_text(dev: _Developer) -> str:
    sections = []
    if dev.instructions is not None:
        sections += ["# Instructions", dev.instructions]
    if dev.tools:
        sections.append(_tools_section(dev.tools))
    return "\n\n".join(sections)


def _render_message(msg: _Message, tok: Tokenizer, has_function_tools: bool) -> list[int]:
    out = [START]
    if msg.role is Role.TOOL:  # a tool result is authored by the tool's name alone
        assert msg.name is not None
        out += tok.encode(msg.name)
    else:
        out += tok.encode(msg.role.value)
        if msg.name is not None:
            out += tok.encode(f":{msg.name}")
    if msg.recipient is not None and msg.recipient != "all":
        out += tok.encode(f" to={msg.recipient}")
    if msg.channel is not None:
        out.append(CHANNEL)
        out += tok.encode(msg.channel)
    if msg.content_type is not None:
        if msg.content_type.startswith(_CONSTRAIN_MARKER):
            rest = msg.content_type[len(_CONSTRAIN_MARKER) :]
            out += tok.encode(" ")
            out.append(CONSTRAIN)
            if rest:
                out += tok.encode(rest)
        else:
            out += tok.encode(f" {msg.content_type}")
    out.append(MESSAGE)
    for item in msg.content:  # each content item is encoded on its own
        if isinstance(item, str):
            text = item
        elif isinstance(item, _System):
            text = _system_text(item, has_function_tools)
        else:
            text = _developer_text(item)
        out += tok.encode(text)
    out.append(CALL if msg.role is Role.ASSISTANT and msg.recipient is not None else END)
    return out


def _render_messages(
    messages: list[_Message], tok: Tokenizer, auto_drop_analysis: bool
) -> list[int]:
    has_function_tools = any(
        isinstance(item, _Developer)
        and item.tools is not None
        and "functions" in item.tools
        and bool(item.tools["functions"].tools)
        for msg in messages
        for item in msg.content
    )
    last_assistant = next((m for m in reversed(messages) if m.role is Role.ASSISTANT), None)
    drop = auto_drop_analysis and last_assistant is not None and last_assistant.channel == "final"
    first_final = next((i for i, m in enumerate(messages) if m.channel == "final"), None)
    out: list[int] = []
    for i, msg in enumerate(messages):
        if drop and first_final is not None and i < first_final and msg.channel == "analysis":
            continue
        out += _render_message(msg, tok, has_function_tools)
    return out


def render_conversation_for_completion(
    conversation: ConversationLike,
    next_turn_role: RoleLike = Role.ASSISTANT,
    *,
    tokenizer: Tokenizer | None = None,
    config: RenderConversationConfig | Mapping[str, Any] | None = None,
) -> list[int]:
    """Render a conversation as a prompt: all messages, then ``<|start|>{next_turn_role}``.

    ``conversation`` is harmony's JSON form: ``{"messages": [...]}`` (a dict or its JSON text)
    or just the list of messages. With the default config, earlier-turn ``analysis`` messages
    are dropped by harmony's rule (see :class:`RenderConversationConfig`).

    Raises:
        HarmonyError: the conversation is malformed (the message names what was expected).

    Example:
        >>> convo = {"messages": [message("user", "Hi")]}
        >>> render_conversation_for_completion(convo)
        [200006, 1428, 200008, 12194, 200007, 200006, 173781]
    """
    tok = _tokenizer(tokenizer)
    role = _role(next_turn_role, "next_turn_role")
    out = _render_messages(_parse_conversation(conversation), tok, _config(config))
    out.append(START)
    out += tok.encode(role.value)
    return out


def render_conversation(
    conversation: ConversationLike,
    *,
    tokenizer: Tokenizer | None = None,
    config: RenderConversationConfig | Mapping[str, Any] | None = None,
) -> list[int]:
    """Render a conversation without appending a next-turn header.

    Example:
        >>> render_conversation([message("user", "Hi")])
        [200006, 1428, 200008, 12194, 200007]
    """
    tok = _tokenizer(tokenizer)
    return _render_messages(_parse_conversation(conversation), tok, _config(config))


def render_conversation_for_training(
    conversation: ConversationLike,
    *,
    tokenizer: Tokenizer | None = None,
    config: RenderConversationConfig | Mapping[str, Any] | None = None,
) -> list[int]:
    """Like :func:`render_conversation`, but a last assistant ``final`` message ends with
    ``<|return|>`` instead of ``<|end|>`` (what the model is trained to emit).

    Example:
        >>> ids = render_conversation_for_training(
        ...     [message("user", "Hi"), message("assistant", "Hello", channel="final")])
        >>> ids[-1] == RETURN
        True
    """
    tok = _tokenizer(tokenizer)
    messages = _parse_conversation(conversation)
    out = _render_messages(messages, tok, _config(config))
    if messages and messages[-1].role is Role.ASSISTANT and messages[-1].channel == "final":
        out[-1] = RETURN
    return out


def render(
    message: Mapping[str, Any],
    *,
    tokenizer: Tokenizer | None = None,
    render_options: RenderOptions | None = None,
) -> list[int]:
    """Render a single message (harmony JSON form) to token ids.

    Example:
        >>> render({"role": "assistant", "content": "4", "channel": "final"})
        [200006, 173781, 200005, 17196, 200008, 19, 200007]
    """
    tok = _tokenizer(tokenizer)
    options = render_options or RenderOptions()
    return _render_message(_parse_message(message, 0), tok, options.conversation_has_function_tools)


# ----------------------------------------------------------------------------- parsing


@dataclass
class _Header:
    role: Role
    name: str | None
    recipient: str | None
    channel: str | None
    content_type: str | None


def _header_text(tok: Tokenizer, ids: list[int]) -> str:
    try:
        data = b"".join(tok.token_bytes(i) for i in ids)
    except ValueError as e:
        raise HarmonyError(f"could not decode header: {e}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise HarmonyError(f"could not decode header: invalid UTF-8 ({e})") from None


def _parse_header(
    text: str, role: Role | None, parse_recipient_and_type: bool
) -> tuple[_Header, str | None]:
    """Harmony's header grammar; returns the header and any leftover words."""
    channel = None
    at = text.find(_CHANNEL_MARKER)
    if at >= 0:
        after = text[at + len(_CHANNEL_MARKER) :]
        end = next(
            (i for i, c in enumerate(after) if c in _RUST_WHITESPACE or c == "<"), len(after)
        )
        if end == 0:
            raise HarmonyError("expected a channel name after <|channel|> in the message header")
        channel = after[:end]
        text = text[:at] + after[end:]
    text = text.strip(_RUST_WHITESPACE)
    if _CONSTRAIN_MARKER in text:  # "to=x<|constrain|>json" -> "to=x <|constrain|>json"
        text = text.replace(_CONSTRAIN_MARKER, " " + _CONSTRAIN_MARKER).strip(_RUST_WHITESPACE)
    parts = [p for p in _ASCII_WHITESPACE_RE.split(text) if p]

    role_word: str | None = None
    if role is None:
        if not parts:
            raise HarmonyError("expected the message header to start with a role")
        role_word = parts[0]
        if role_word in _ROLE_VALUES:
            role = Role(role_word)
        elif len(parts) > 1 or role_word.startswith("to="):
            parts.pop(0)  # an unknown author with a recipient: a tool's message
            role = Role.TOOL
        else:
            raise HarmonyError(
                f"expected a role (user, assistant, system, developer, tool) or a tool name "
                f"followed by a recipient in the message header; got {role_word!r}"
            )
    if parts and parts[0] == role.value:
        parts.pop(0)

    recipient = content_type = None
    if parse_recipient_and_type and parts:
        count = len(parts)
        last = parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif count == 1 and not last.startswith(_CONSTRAIN_MARKER):
            recipient = last
        else:
            content_type = last
            if parts:
                raw = parts.pop()
                recipient = raw[3:] if raw.startswith("to=") else raw
    remaining = " ".join(parts) if parts else None
    name = role_word if role is Role.TOOL else None
    return _Header(role, name, recipient, channel, content_type), remaining


def _message_dict(header: _Header, text: str) -> dict[str, Any]:
    out: dict[str, Any] = {
        "role": header.role.value,
        "name": header.name,
        "content": [{"type": "text", "text": text}],
    }
    if header.channel is not None:
        out["channel"] = header.channel
    if header.recipient is not None:
        out["recipient"] = header.recipient
    if header.content_type is not None:
        out["content_type"] = header.content_type
    return out


class StreamableParser:
    """Parse a completion one token at a time, as harmony's ``StreamableParser`` does.

    Start it with the role whose header the prompt already opened (``<|start|>assistant``), or
    with ``role=None`` to expect a ``<|start|>`` first. Feed every sampled token to
    :meth:`process`; call :meth:`process_eos` when generation ends without a stop token. Text
    deltas never contain a broken UTF-8 character: an incomplete character waits for its next
    bytes (``last_content_delta`` is then None).

    With ``strict=False`` a message whose header ends with a stop token instead of
    ``<|message|>`` is recovered (its words become the content), as in harmony's non-strict mode.

    Example:
        >>> parser = StreamableParser("assistant")
        >>> deltas = []
        >>> for t in [200005, 17196, 200008, 13225, 0, 200002]:  # <|channel|>final<|message|>Hello!
        ...     _ = parser.process(t)
        ...     deltas.append(parser.last_content_delta)
        >>> deltas
        [None, None, None, 'Hello', '!', None]
        >>> parser.messages[0]["content"][0]["text"], parser.state
        ('Hello!', <StreamState.EXPECT_START: 'ExpectStart'>)
    """

    def __init__(
        self,
        role: RoleLike | None = Role.ASSISTANT,
        tokenizer: Tokenizer | None = None,
        *,
        strict: bool = True,
    ) -> None:
        """``role`` is the author whose header is already open (None: expect ``<|start|>``)."""
        self._tok = _tokenizer(tokenizer)
        self._strict = strict
        self._next_role: Role | None = None if role is None else _role(role, "role")
        self._state = StreamState.EXPECT_START if role is None else StreamState.HEADER
        self._tokens: list[int] = []
        self._messages: list[dict[str, Any]] = []
        self._header_tokens: list[int] = []
        self._header: _Header | None = None
        self._content: list[str] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._last_delta: str | None = None

    # -------------------------------------------------------------------------------- feeding

    def process(self, token: int) -> StreamableParser:
        """Consume one token id; returns ``self``.

        Raises:
            HarmonyError: the token cannot come next (for example anything but ``<|start|>``
                after a finished message, or a header that does not parse).
        """
        token = operator.index(token)
        self._tokens.append(token)
        if self._state is StreamState.EXPECT_START:
            if token != START:
                raise HarmonyError(
                    f"unexpected token {token} while expecting the start token {START} (<|start|>)"
                )
            self._state = StreamState.HEADER
            self._header_tokens = []
        elif self._state is StreamState.HEADER:
            if token == MESSAGE:
                text = _header_text(self._tok, self._header_tokens)
                header, remaining = _parse_header(text, self._next_role, True)
                if remaining is not None:
                    raise HarmonyError(
                        f"unexpected words {remaining!r} remaining in message header {text!r}; "
                        f"expected at most a recipient and a content type"
                    )
                self._next_role = None
                self._begin_content(header)
            elif not self._strict and token in _STOP_TOKENS:
                self._recover_headerless_message()
            else:
                self._header_tokens.append(token)
        else:
            self._process_content(token)
        return self

    def process_eos(self) -> StreamableParser:
        """Signal the end of generation: an open message is completed; returns ``self``.

        Raises:
            HarmonyError: generation ended inside a message header.
        """
        if self._state is StreamState.HEADER:
            raise HarmonyError("unexpected end of tokens while waiting for <|message|>")
        if self._state is StreamState.CONTENT:
            self._finish_message()
        return self

    def _begin_content(self, header: _Header) -> None:
        self._header = header
        self._content = []
        self._utf8.reset()
        self._state = StreamState.CONTENT

    def _process_content(self, token: int) -> None:
        if token in _STOP_TOKENS:
            self._finish_message()
            return
        if 0 <= token < self._tok.vocab_size:
            delta = self._utf8.decode(self._tok.token_bytes(token))
        else:  # not a token at all: cut any pending character and stand in U+FFFD
            delta = self._utf8.decode(b"", final=True) + _REPLACEMENT
            self._utf8.reset()
        if delta:
            self._content.append(delta)
        self._last_delta = delta or None

    def _finish_message(self) -> None:
        assert self._header is not None
        tail = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        self._messages.append(_message_dict(self._header, "".join(self._content) + tail))
        self._state = StreamState.EXPECT_START
        self._header = None
        self._content = []
        self._last_delta = None

    def _recover_headerless_message(self) -> None:
        if self._next_role is not None and self._header_tokens:
            text = _header_text(self._tok, self._header_tokens)
            header, remaining = _parse_header(text, self._next_role, False)
            self._messages.append(_message_dict(header, remaining or ""))
        self._state = StreamState.EXPECT_START
        self._next_role = None
        self._header_tokens = []

    # ----------------------------------------------------------------------------- properties

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The completed messages so far, in harmony's JSON form (copies)."""
        return copy.deepcopy(self._messages)

    @property
    def tokens(self) -> list[int]:
        """Every token fed so far."""
        return list(self._tokens)

    @property
    def state(self) -> StreamState:
        """Where the parser is: expecting ``<|start|>``, inside a header, or inside content."""
        return self._state

    @property
    def state_data(self) -> dict[str, Any]:
        """The state as harmony's ``state_data`` dictionary."""
        if self._state is StreamState.EXPECT_START:
            return {"state": self._state.value}
        if self._state is StreamState.HEADER:
            return {"state": self._state.value, "header_tokens": list(self._header_tokens)}
        assert self._header is not None
        author: dict[str, Any] = {"role": self._header.role.value}
        if self._header.name is not None:
            author["name"] = self._header.name
        return {
            "state": self._state.value,
            "header": {
                "author": author,
                "recipient": self._header.recipient,
                "channel": self._header.channel,
                "content_type": self._header.content_type,
            },
            "content_tokens": self._tok.encode(self.current_content),
        }

    @property
    def current_role(self) -> Role | None:
        """Role of the message being parsed (before its header is complete: the start role)."""
        if self._state is StreamState.CONTENT and self._header is not None:
            return self._header.role
        return self._next_role

    @property
    def current_channel(self) -> str | None:
        """Channel of the message whose content is being parsed, else None."""
        return self._header.channel if self._header is not None else None

    @property
    def current_recipient(self) -> str | None:
        """Recipient of the message whose content is being parsed, else None."""
        return self._header.recipient if self._header is not None else None

    @property
    def current_content_type(self) -> str | None:
        """Content type (e.g. ``<|constrain|>json``) of the message being parsed, else None."""
        return self._header.content_type if self._header is not None else None

    @property
    def current_content(self) -> str:
        """The decoded content of the current message so far (``""`` outside content)."""
        return "".join(self._content) if self._state is StreamState.CONTENT else ""

    @property
    def last_content_delta(self) -> str | None:
        """Text completed by the last token, or None (header token, stop token, or a character
        still waiting for its remaining bytes)."""
        return self._last_delta


def parse_messages_from_completion_tokens(
    ids: Iterable[int],
    role: RoleLike | None = Role.ASSISTANT,
    *,
    tokenizer: Tokenizer | None = None,
    strict: bool = True,
) -> list[dict[str, Any]]:
    """Parse a whole completion (the tokens after ``<|start|>{role}``) into messages.

    Raises:
        HarmonyError: the tokens are not valid Harmony (in strict mode, also a header without
            ``<|message|>``).

    Example:
        >>> ids = [200005, 35644, 200008, 17, 10, 17, 200007,  # <|channel|>analysis ... 2+2<|end|>
        ...        200006, 173781, 200005, 17196, 200008, 19, 200002]  # ... final ... 4<|return|>
        >>> [(m["channel"], m["content"][0]["text"]) for m in
        ...  parse_messages_from_completion_tokens(ids)]
        [('analysis', '2+2'), ('final', '4')]
    """
    parser = StreamableParser(role, tokenizer, strict=strict)
    for token in ids:
        parser.process(token)
    parser.process_eos()
    return parser._messages
