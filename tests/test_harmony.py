"""Harmony chat format: golden renders and parses from openai-harmony 0.0.8, plus streaming,
auto-drop of analysis, header variants and errors.

Golden data: tests/data/harmony/{render,parse}_cases.jsonl (see README.txt there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gpt_oss_cpu import harmony
from gpt_oss_cpu.harmony import (
    CALL,
    CHANNEL,
    CONSTRAIN,
    END,
    MESSAGE,
    RETURN,
    START,
    HarmonyError,
    RenderConversationConfig,
    Role,
    StreamableParser,
    StreamState,
    developer_content,
    message,
    parse_messages_from_completion_tokens,
    render,
    render_conversation,
    render_conversation_for_completion,
    render_conversation_for_training,
    system_content,
)
from gpt_oss_cpu.tokenizer import Tokenizer

DATA = Path(__file__).parent / "data" / "harmony"
RENDER_CASES = [json.loads(line) for line in (DATA / "render_cases.jsonl").read_text().splitlines()]
PARSE_CASES = [json.loads(line) for line in (DATA / "parse_cases.jsonl").read_text().splitlines()]
ASSISTANT = 173781  # "assistant"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.bundled()


def _concat(tok: Tokenizer, messages: list[dict[str, Any]], *tail: int) -> list[int]:
    """Each message rendered on its own, concatenated, plus ``tail``."""
    out: list[int] = []
    for m in messages:
        out += render(m, tokenizer=tok)
    return [*out, *tail]


def _text(msg: dict[str, Any]) -> str:
    return "".join(c["text"] for c in msg["content"])


def test_case_files_loaded() -> None:
    assert [c["name"] for c in RENDER_CASES] == [
        "simple_default_system",
        "reasoning_low_with_date",
        "reasoning_high_developer_instructions",
        "multi_turn_analysis_final",
        "function_tool_call_and_result",
        "builtin_browser_tool_unicode",
    ]
    assert len(PARSE_CASES) == 4


# ------------------------------------------------------------------------------ golden renders


@pytest.mark.parametrize("case", RENDER_CASES, ids=lambda c: c["name"])
def test_render_case_id_for_id(case: dict[str, Any], tok: Tokenizer) -> None:
    ids = render_conversation_for_completion(
        case["harmony_conversation_json"], case["next_turn_role"], tokenizer=tok
    )
    assert ids == case["ids"]
    assert tok.decode(ids) == case["text"]


@pytest.mark.parametrize("case", RENDER_CASES, ids=lambda c: c["name"])
def test_render_case_from_json_text_and_message_list(case: dict[str, Any], tok: Tokenizer) -> None:
    convo = case["harmony_conversation_json"]
    assert render_conversation_for_completion(json.dumps(convo), tokenizer=tok) == case["ids"]
    assert render_conversation_for_completion(convo["messages"], tokenizer=tok) == case["ids"]


def _from_plain(msg: dict[str, Any]) -> dict[str, Any]:
    """The README's plain schema -> harmony JSON, through our builders."""
    fields = {k: v for k, v in msg.items() if k != "role"}
    if msg["role"] == "system":
        return message("system", system_content(**fields))
    if msg["role"] == "developer":
        return message(
            "developer",
            developer_content(fields.get("instructions"), function_tools=fields.get("functions")),
        )
    return message(msg["role"], fields.pop("content"), **fields)


@pytest.mark.parametrize("case", RENDER_CASES, ids=lambda c: c["name"])
def test_builders_reproduce_harmony_json(case: dict[str, Any]) -> None:
    built = {"messages": [_from_plain(m) for m in case["conversation"]["messages"]]}
    assert built == case["harmony_conversation_json"]


def test_default_system_message_ids_from_spec(tok: Tokenizer) -> None:
    # SPEC 6.9: default system message (no date, medium) plus user "Hi".
    ids = render_conversation_for_completion(
        [message("system", system_content()), message("user", "Hi")], tokenizer=tok
    )
    assert ids == [
        200006, 17360, 200008, 3575, 553, 17554, 162016, 11, 261, 4410, 6439, 2359, 22203, 656,
        7788, 17527, 558, 87447, 100594, 25, 220, 1323, 19, 12, 3218, 279, 30377, 289, 25, 14093,
        279, 2, 13888, 18403, 25, 8450, 11, 49159, 11, 1721, 13, 21030, 2804, 413, 7360, 395,
        1753, 3176, 13, 200007, 200006, 1428, 200008, 12194, 200007, 200006, 173781,
    ]  # fmt: skip


def test_spec_85_token_example(tok: Tokenizer) -> None:
    convo = [
        message(
            "system", system_content(reasoning_effort="low", conversation_start_date="2025-06-28")
        ),
        message("developer", developer_content("Answer briefly.")),
        message("user", "What is 2 + 2?"),
    ]
    ids = render_conversation_for_completion(convo, tokenizer=tok)
    assert ids == [
        200006, 17360, 200008, 3575, 553, 17554, 162016, 11, 261, 4410, 6439, 2359, 22203, 656,
        7788, 17527, 558, 87447, 100594, 25, 220, 1323, 19, 12, 3218, 198, 6576, 3521, 25, 220,
        1323, 20, 12, 3218, 12, 2029, 279, 30377, 289, 25, 4465, 279, 2, 13888, 18403, 25, 8450,
        11, 49159, 11, 1721, 13, 21030, 2804, 413, 7360, 395, 1753, 3176, 13, 200007, 200006,
        77944, 200008, 2, 68406, 279, 17045, 51088, 13, 200007, 200006, 1428, 200008, 4827, 382,
        220, 17, 659, 220, 17, 30, 200007, 200006, 173781,
    ]  # fmt: skip
    assert len(ids) == 85


def test_special_token_constants(tok: Tokenizer) -> None:
    names = {
        START: "<|start|>",
        END: "<|end|>",
        MESSAGE: "<|message|>",
        CHANNEL: "<|channel|>",
        CONSTRAIN: "<|constrain|>",
        RETURN: "<|return|>",
        CALL: "<|call|>",
    }
    for token_id, name in names.items():
        assert tok.token_to_id(name) == token_id
    assert harmony.stop_tokens_for_assistant_actions() == [200002, 200012]
    assert harmony.stop_tokens() == [200002, 200012, 200007]


def test_special_strings_in_content_are_plain_text(tok: Tokenizer) -> None:
    ids = render([message("user", "<|end|>")][0], tokenizer=tok)
    assert ids[:3] == [START, 1428, MESSAGE] and ids[-1] == END
    body = ids[3:-1]
    assert len(body) > 1 and not any(tok.is_special(i) for i in body)


def test_render_tool_call_header_and_ends(tok: Tokenizer) -> None:
    call = message(
        "assistant",
        "{}",
        channel="commentary",
        recipient="functions.f",
        content_type="<|constrain|>json",
    )
    ids = render(call, tokenizer=tok)
    assert tok.decode(ids) == (
        "<|start|>assistant to=functions.f<|channel|>commentary <|constrain|>json"
        "<|message|>{}<|call|>"
    )
    assert ids[ids.index(CONSTRAIN) - 1 : ids.index(CONSTRAIN) + 2] == [220, CONSTRAIN, 4108]
    # Plain content types are text; recipient "all" is not rendered; author names are "role:name".
    plain = render(message("assistant", "x", content_type="json", recipient="all"), tokenizer=tok)
    assert tok.decode(plain) == "<|start|>assistant json<|message|>x<|call|>"
    named = render(message("user", "x", name="alice"), tokenizer=tok)
    assert tok.decode(named) == "<|start|>user:alice<|message|>x<|end|>"


def test_render_python_builtin_tool(tok: Tokenizer) -> None:
    sys = system_content(conversation_start_date="2025-06-28", builtin_tools=["python"])
    text = tok.decode(render(message("system", sys), tokenizer=tok))
    assert (
        "Reasoning: medium\n\n# Tools\n\n## python\n\nUse this tool to execute Python code in your "
        "chain of thought." in text
    )
    assert "Depends on the cluster.\n\n# Valid channels: analysis, commentary, final." in text
    assert "namespace python" not in text


def test_typescript_schema_rendering(tok: Tokenizer) -> None:
    tool = {
        "name": "k",
        "description": "Line one.\nLine two.",
        "parameters": {
            "description": "params object",
            "type": "object",
            "properties": {
                "s": {"type": "string", "title": "S", "description": "A string", "examples": ["a"]},
                "n": {"type": "string", "nullable": True, "default": "d"},
                "xs": {"type": "array", "items": {"type": "integer"}},
                "any_list": {"type": "array"},
                "u": {"type": ["integer", "null"]},
                "o": {
                    "oneOf": [
                        {"type": "string", "default": "x"},
                        {"type": "number", "description": "nums"},
                    ],
                    "description": "a oneof",
                    "default": 20,
                },
            },
            "required": ["s"],
        },
    }
    text = tok.decode(
        render(message("developer", developer_content(function_tools=[tool])), tokenizer=tok)
    )
    expected = """namespace functions {

// Line one.
// Line two.
type k = (_: // params object
{
// S
//
// A string
// Examples:
// - "a"
s: string,
n?: string | null, // default: "d"
xs?: number[],
any_list?: Array<any>,
u?: number | null,
// a oneof
// default: 20
o?:
 | string // default: "x"
 | number // nums
,
}) => any;

} // namespace functions"""
    assert expected in text


def test_function_tools_add_commentary_line_only_when_present(tok: Tokenizer) -> None:
    line = "Calls to these tools must go to the commentary channel: 'functions'."
    sys = message("system", system_content())
    no_tools = render_conversation(
        [sys, message("developer", developer_content("x"))], tokenizer=tok
    )
    assert line not in tok.decode(no_tools)
    fn = developer_content(function_tools=[{"name": "f", "description": "d"}])
    with_tools = render_conversation([sys, message("developer", fn)], tokenizer=tok)
    assert "final. Channel must be included for every message.\n" + line in tok.decode(with_tools)


def test_render_conversation_and_training(tok: Tokenizer) -> None:
    convo = [message("user", "hi"), message("assistant", "hello", channel="final")]
    regular = render_conversation(convo, tokenizer=tok)
    training = render_conversation_for_training(convo, tokenizer=tok)
    assert regular[-1] == END and training[-1] == RETURN and regular[:-1] == training[:-1]
    assert regular == render(convo[0], tokenizer=tok) + render(convo[1], tokenizer=tok)
    completion = render_conversation_for_completion(convo, "user", tokenizer=tok)
    assert completion == [*regular, START, 1428]


# --------------------------------------------------------------------------- auto-drop analysis


def _two_turns() -> list[dict[str, Any]]:
    return [
        message("user", "What is 2 + 2?"),
        message("assistant", "thinking 2+2", channel="analysis"),
        message("assistant", "4", channel="final"),
        message("user", "What is 3 + 5?"),
        message("assistant", "thinking 3+5", channel="analysis"),
        message("assistant", "8", channel="final"),
        message("user", "And 1 + 1?"),
    ]


def test_auto_drop_keeps_analysis_after_first_final(tok: Tokenizer) -> None:
    # Rule: last assistant message is final -> drop analysis messages before the FIRST final.
    # The second turn's analysis comes after the first final, so harmony keeps it.
    ids = render_conversation_for_completion(_two_turns(), tokenizer=tok)
    assert tok.decode(ids) == (
        "<|start|>user<|message|>What is 2 + 2?<|end|>"
        "<|start|>assistant<|channel|>final<|message|>4<|end|>"
        "<|start|>user<|message|>What is 3 + 5?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>thinking 3+5<|end|>"
        "<|start|>assistant<|channel|>final<|message|>8<|end|>"
        "<|start|>user<|message|>And 1 + 1?<|end|>"
        "<|start|>assistant"
    )
    kept = [m for i, m in enumerate(_two_turns()) if i != 1]
    assert ids == _concat(tok, kept, START, ASSISTANT)


def test_auto_drop_can_be_disabled(tok: Tokenizer) -> None:
    convo = _two_turns()
    all_ids = _concat(tok, convo, START, ASSISTANT)
    for config in (
        RenderConversationConfig(auto_drop_analysis=False),
        {"auto_drop_analysis": False},
    ):
        assert render_conversation_for_completion(convo, tokenizer=tok, config=config) == all_ids


def test_no_drop_while_tool_loop_in_progress(tok: Tokenizer) -> None:
    # The last assistant message is a tool call, not a final: every analysis is kept, even the
    # completed first turn's.
    convo = [
        *_two_turns()[:3],
        message("user", "Weather?"),
        message("assistant", "Need tool.", channel="analysis"),
        message(
            "assistant",
            '{"city":"Paris"}',
            channel="commentary",
            recipient="functions.w",
            content_type="<|constrain|>json",
        ),
        message(
            "tool", '{"t":20}', name="functions.w", channel="commentary", recipient="assistant"
        ),
    ]
    ids = render_conversation_for_completion(convo, tokenizer=tok)
    text = tok.decode(ids)
    assert "thinking 2+2" in text and "Need tool." in text
    assert ids == _concat(tok, convo, START, ASSISTANT)
    assert text.endswith(
        '<|start|>functions.w to=assistant<|channel|>commentary<|message|>{"t":20}<|end|>'
        "<|start|>assistant"
    )


def test_render_conversation_drops_too(tok: Tokenizer) -> None:
    # harmony test_keep_analysis_between_finals: render_conversation ending on a final.
    convo = _two_turns()[:6]
    text = tok.decode(render_conversation(convo, tokenizer=tok))
    assert "thinking 2+2" not in text and "thinking 3+5" in text


# ------------------------------------------------------------------------------- golden parses


@pytest.mark.parametrize("case", PARSE_CASES, ids=lambda c: c["name"])
def test_parse_case_field_for_field(case: dict[str, Any], tok: Tokenizer) -> None:
    assert tok.encode(case["completion_text"], allow_special=True) == case["ids"]
    parsed = parse_messages_from_completion_tokens(case["ids"], case["role"], tokenizer=tok)
    assert parsed == case["messages"]


@pytest.mark.parametrize("case", PARSE_CASES, ids=lambda c: c["name"])
def test_streaming_matches_batch_parse(case: dict[str, Any], tok: Tokenizer) -> None:
    parser = StreamableParser(case["role"], tok)
    deltas: list[list[str]] = [[]]
    seen_channels: list[str | None] = []
    for token in case["ids"]:
        before = len(parser.messages)
        parser.process(token)
        delta = parser.last_content_delta
        if delta is not None:
            assert "\ufffd" not in delta
            deltas[-1].append(delta)
            assert parser.current_content == "".join(deltas[-1])
            seen_channels.append(parser.current_channel)
        if len(parser.messages) > before:
            deltas.append([])
    parser.process_eos()
    assert parser.messages == case["messages"]
    assert parser.state is StreamState.EXPECT_START
    assert parser.tokens == case["ids"]
    assert ["".join(d) for d in deltas[:-1]] == [_text(m) for m in case["messages"]]
    assert set(seen_channels) == {m["channel"] for m in case["messages"]}


def test_streaming_properties_during_tool_call(tok: Tokenizer) -> None:
    case = next(c for c in PARSE_CASES if c["name"] == "tool_call")
    parser = StreamableParser("assistant", tok)
    assert parser.state is StreamState.HEADER and parser.current_role is Role.ASSISTANT
    ids = case["ids"]
    second_message_at = ids.index(MESSAGE, ids.index(START))
    for token in ids[: second_message_at + 1]:
        parser.process(token)
    assert parser.state is StreamState.CONTENT
    assert parser.current_role == "assistant"
    assert parser.current_channel == "commentary"
    assert parser.current_recipient == "functions.get_current_weather"
    assert parser.current_content_type == "<|constrain|>json"
    assert parser.current_content == ""
    assert parser.state_data["header"]["recipient"] == "functions.get_current_weather"
    for token in ids[second_message_at + 1 :]:
        parser.process(token)
    assert parser.current_recipient is None and parser.current_channel is None
    assert parser.last_content_delta is None and parser.current_role is None
    assert parser.state_data == {"state": "ExpectStart"}


def test_streaming_multibyte_split_across_byte_tokens(tok: Tokenizer) -> None:
    byte_token = {tok.token_bytes(i)[0]: i for i in range(256)}
    assert len(byte_token) == 256  # ids 0..255 are the 256 single bytes
    text = "é😀你!"
    content = [byte_token[b] for b in text.encode("utf-8")]
    parser = StreamableParser("assistant", tok)
    for token in [CHANNEL, 17196, MESSAGE]:
        parser.process(token)
    deltas = []
    for token in content:
        parser.process(token)
        deltas.append(parser.last_content_delta)
    assert deltas == [None, "é", None, None, None, "😀", None, None, "你", "!"]
    parser.process(RETURN)
    assert _text(parser.messages[0]) == text


def test_streaming_multi_token_emoji(tok: Tokenizer) -> None:
    emoji = tok.encode("💖")
    assert len(emoji) >= 2
    parser = StreamableParser(None, tok)
    for token in tok.encode("<|start|>assistant<|message|>", allow_special=True):
        parser.process(token)
    parser.process(emoji[0])
    assert parser.last_content_delta is None and parser.current_content == ""
    for token in emoji[1:]:
        parser.process(token)
    assert parser.last_content_delta == "💖" and parser.current_content == "💖"
    parser.process(END)
    assert parser.messages == [message("assistant", "💖")]


def test_truncated_character_flushed_at_eos(tok: Tokenizer) -> None:
    # harmony test_streamable_parser_flushes_partial_bytes_on_eos: 9552 is " " + 2 of 4 bytes.
    assert tok.token_bytes(9552) == b" \xf0\x9f"
    parser = StreamableParser(None, tok)
    ids = [*tok.encode("<|start|>assistant<|message|>", allow_special=True), 9552]
    for token in [*ids, *tok.encode("Hi")]:
        parser.process(token)
    parser.process_eos()
    assert parser.messages == [message("assistant", " \ufffdHi")]
    assert parser.last_content_delta is None and parser.current_content == ""
    # The broken bytes do not leak into the next message.
    parser = StreamableParser(None, tok)
    second = tok.encode("<|start|>assistant<|message|>Hi<|end|>", allow_special=True)
    for token in [*ids, 9552, END, *second]:
        parser.process(token)
    assert parser.messages[1] == message("assistant", "Hi")


def test_parse_accepts_numpy_ids(tok: Tokenizer) -> None:
    case = PARSE_CASES[0]
    ids = np.array(case["ids"], dtype=np.int32)
    assert parse_messages_from_completion_tokens(ids, tokenizer=tok) == case["messages"]


# ------------------------------------------------------------------------------ header variants


@pytest.mark.parametrize(
    "text",
    [
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        "<|message|>{}<|call|>",
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
        "<|message|>{}<|call|>",
        "<|start|>assistant<|channel|>commentary to=functions.get_weather<|constrain|>json"
        "<|message|>{}<|call|>",
        "<|start|>assistant to=functions.get_weather<|channel|>commentary<|constrain|>json"
        "<|message|>{}<|end|>",
    ],
)
def test_recipient_positions_parse_identically(text: str, tok: Tokenizer) -> None:
    parsed = parse_messages_from_completion_tokens(
        tok.encode(text, allow_special=True), None, tokenizer=tok
    )
    assert parsed == [
        message(
            "assistant", "{}", channel="commentary", recipient="functions.get_weather",
            content_type="<|constrain|>json",
        )
    ]  # fmt: skip


def test_builtin_tool_call_and_tool_result_parse(tok: Tokenizer) -> None:
    text = (
        "<|start|>assistant<|channel|>analysis to=python code<|message|>print(1)<|call|>"
        "<|start|>python to=assistant<|channel|>analysis<|message|>1<|end|>"
    )
    parsed = parse_messages_from_completion_tokens(
        tok.encode(text, allow_special=True), None, tokenizer=tok
    )
    assert parsed == [
        message(
            "assistant", "print(1)", channel="analysis", recipient="python", content_type="code"
        ),
        message("tool", "1", name="python", channel="analysis", recipient="assistant"),
    ]


def test_render_then_parse_roundtrip(tok: Tokenizer) -> None:
    case = next(c for c in RENDER_CASES if c["name"] == "function_tool_call_and_result")
    tail = case["harmony_conversation_json"]["messages"][3:]  # analysis, call, tool result
    ids = render_conversation(tail, tokenizer=tok)
    assert parse_messages_from_completion_tokens(ids, None, tokenizer=tok) == tail


# ----------------------------------------------------------------------------------- errors


def test_strict_rejects_missing_message_token_nonstrict_recovers(tok: Tokenizer) -> None:
    ids = tok.encode("<|channel|>commentary Hello<|end|>", allow_special=True)
    with pytest.raises(HarmonyError, match="<\\|message\\|>"):
        parse_messages_from_completion_tokens(ids, tokenizer=tok)
    recovered = parse_messages_from_completion_tokens(ids, tokenizer=tok, strict=False)
    assert recovered == [message("assistant", "Hello", channel="commentary")]


def test_parse_errors_say_what_was_expected(tok: Tokenizer) -> None:
    final = tok.encode("<|channel|>final<|message|>Hi<|end|>", allow_special=True)
    with pytest.raises(HarmonyError, match="expecting the start token 200006"):
        parse_messages_from_completion_tokens([*final, 13225], tokenizer=tok)
    with pytest.raises(HarmonyError, match="expected a channel name"):
        parse_messages_from_completion_tokens([CHANNEL, MESSAGE, 13225], tokenizer=tok)
    with pytest.raises(HarmonyError, match="remaining in message header"):
        bad = tok.encode("<|channel|>final a b c<|message|>x<|end|>", allow_special=True)
        parse_messages_from_completion_tokens(bad, tokenizer=tok)
    with pytest.raises(HarmonyError, match="expected a role"):
        parse_messages_from_completion_tokens([START, 13225, MESSAGE], None, tokenizer=tok)
    assert issubclass(HarmonyError, ValueError)


@pytest.mark.parametrize(
    ("conversation", "match"),
    [
        ([{"role": "robot", "content": "x"}], "message 0: expected 'role' to be one of"),
        ([{"role": "tool", "content": "x"}], "message 0: a tool message needs the tool's 'name'"),
        ([{"role": "user"}], "message 0: expected 'content'"),
        ([message("user", system_content())], "system_content may only appear in system"),
        (
            [message("user", developer_content("x"))],
            "developer_content may only appear in developer",
        ),
        ([message("user", {"type": "image"})], "expected content 'type' to be 'text'"),
        (
            [message("system", {"type": "system_content", "reasoning_effort": "max"})],
            "'Low', 'Medium' or 'High'",
        ),
        ([message("system", {"type": "system_content", "reasoning": "low"})], "unexpected key"),
        ([message("user", "x", channel=5)], "expected 'channel' to be a string"),  # type: ignore[arg-type]
        ({"msgs": []}, "'messages' list"),
        ("not json", "expected a conversation in JSON"),
    ],
)
def test_render_errors_say_what_was_expected(conversation: Any, match: str, tok: Tokenizer) -> None:
    with pytest.raises(HarmonyError, match=match):
        render_conversation_for_completion(conversation, tokenizer=tok)


def test_system_content_defaults_apply_to_missing_keys_only(tok: Tokenizer) -> None:
    # Like harmony's SystemContent(**raw): missing -> default; explicit null -> left out.
    minimal = render(message("system", {"type": "system_content"}), tokenizer=tok)
    assert minimal == render(message("system", system_content()), tokenizer=tok)
    bare = {"type": "system_content", "model_identity": None, "knowledge_cutoff": None,
            "reasoning_effort": None, "channel_config": None}  # fmt: skip
    assert tok.decode(render(message("system", bare), tokenizer=tok)) == (
        "<|start|>system<|message|><|end|>"
    )
