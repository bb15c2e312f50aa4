"""Session.chat, the chat event parser and `gpt-oss-cpu chat`, on a tiny synthetic model.

The model has random weights but the real 201,088-token vocabulary, so these tests check the
mechanics (prompt rendering, stops, KV-cache reuse, event parsing); completions that must have
a given shape are scripted through a logits processor.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import gpt_oss_cpu
import numpy as np
import numpy.typing as npt
import pytest
from gpt_oss_cpu import harmony
from gpt_oss_cpu.chat import (
    ChatResult,
    CompletionParser,
    ContentDelta,
    Done,
    ReasoningDelta,
    ToolCall,
    render_prompt,
    reuse_prefix,
    to_harmony,
)

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOL_CALL_TEXT = (
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}'
    "<|call|>"
)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> gpt_oss_cpu.Model:
    return gpt_oss_cpu.Model.load(str(tiny_dir))


@pytest.fixture(scope="module")
def tok(model: gpt_oss_cpu.Model) -> gpt_oss_cpu.Tokenizer:
    return model.tokenizer


def ids_of(tok: gpt_oss_cpu.Tokenizer, text: str) -> list[int]:
    return tok.encode(text, allow_special=True)


def run_events(
    tok: gpt_oss_cpu.Tokenizer, text: str, stop: Sequence[str] = ()
) -> tuple[list[object], CompletionParser]:
    """Feed a scripted completion through the parser the stream uses."""
    parser = CompletionParser(tok, stop=stop)
    events: list[object] = []
    for token in ids_of(tok, text):
        events += parser.feed(token)
        if parser.finish_reason is not None:
            break
    events += parser.close()
    return events, parser


def content_of(events: Sequence[object]) -> str:
    return "".join(e.text for e in events if isinstance(e, ContentDelta))


def reasoning_of(events: Sequence[object]) -> str:
    return "".join(e.text for e in events if isinstance(e, ReasoningDelta))


class Script:
    """A logits processor that forces the given tokens, one per step."""

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = list(tokens)
        self.step = 0

    def __call__(self, token_ids: list[int], logits: npt.NDArray[np.float32]) -> None:
        forced = self.tokens[min(self.step, len(self.tokens) - 1)]
        self.step += 1
        logits[:] = -np.inf
        logits[forced] = 0.0


def collect(events: Iterator[object] | ChatResult) -> list[object]:
    assert not isinstance(events, ChatResult)
    return list(events)


# ------------------------------------------------------------------------------ rendering


def test_prompt_ids_equal_the_hand_built_harmony_conversation(
    model: gpt_oss_cpu.Model, tok: gpt_oss_cpu.Tokenizer
) -> None:
    messages = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "What is 2 + 2?"},
    ]
    expected_convo = [
        harmony.message(
            "system",
            {
                "model_identity": "You are ChatGPT, a large language model trained by OpenAI.",
                "reasoning_effort": "Low",
                "knowledge_cutoff": "2024-06",
                "channel_config": {
                    "valid_channels": ["analysis", "commentary", "final"],
                    "channel_required": True,
                },
                "type": "system_content",
            },
        ),
        harmony.message(
            "developer", {"instructions": "Answer in French.", "type": "developer_content"}
        ),
        harmony.message("user", "What is 2 + 2?"),
    ]
    expected = harmony.render_conversation_for_completion(expected_convo, "assistant")
    assert to_harmony(messages, reasoning_effort="low") == expected_convo
    assert render_prompt(messages, reasoning_effort="low", tokenizer=tok) == expected
    assert expected[-2:] == [harmony.START, tok.encode("assistant")[0]]

    with model.session(max_context=512) as session:
        events = collect(
            session.chat(
                messages, reasoning_effort="low", max_tokens=2, temperature=0.0, tokenizer=tok
            )
        )
        # the prompt went into the cache verbatim, followed by the generated tokens
        assert session.tokens[: len(expected)] == expected
        assert len(session.tokens) == len(expected) + 2
    done = events[-1]
    assert isinstance(done, Done)
    assert done.usage == {
        "prompt_tokens": len(expected),
        "completion_tokens": 2,
        "cached_tokens": 0,
        "computed_prompt_tokens": len(expected),
    }


def test_tool_messages_convert_to_harmony(tok: gpt_oss_cpu.Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "reasoning_content": "Need the weather tool.",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_7",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_7", "content": '{"temp_c": 21}'},
    ]
    expected = [
        harmony.message("system", harmony.system_content(reasoning_effort="high")),
        harmony.message(
            "developer",
            harmony.developer_content(
                function_tools=[
                    {
                        "name": "get_weather",
                        "description": "Current weather in a city.",
                        "parameters": WEATHER_TOOL["function"]["parameters"],  # type: ignore[index]
                    }
                ]
            ),
        ),
        harmony.message("user", "Weather in Paris?"),
        harmony.message("assistant", "Need the weather tool.", channel="analysis"),
        harmony.message(
            "assistant",
            '{"city": "Paris"}',
            channel="commentary",
            recipient="functions.get_weather",
            content_type="<|constrain|>json",
        ),
        harmony.message(
            "tool",
            '{"temp_c": 21}',
            name="functions.get_weather",
            channel="commentary",
            recipient="assistant",
        ),
    ]
    convo = to_harmony(messages, reasoning_effort="high", tools=[WEATHER_TOOL])
    assert convo == expected
    ids = render_prompt(messages, reasoning_effort="high", tools=[WEATHER_TOOL], tokenizer=tok)
    text = tok.decode(ids)
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>" in text
    assert (
        "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json"
        '<|message|>{"city": "Paris"}<|call|>' in text
    )
    assert "type get_weather = (_: {\n// Current weather" not in text  # description goes above
    assert "// Current weather in a city.\ntype get_weather = (_: {" in text
    # the last assistant message is a tool call, so its analysis is kept
    assert "<|channel|>analysis<|message|>Need the weather tool.<|end|>" in text

    with pytest.raises(gpt_oss_cpu.InputError, match="tool_call_id 'nope'"):
        to_harmony([{"role": "tool", "tool_call_id": "nope", "content": "x"}])
    with pytest.raises(gpt_oss_cpu.InputError, match="role"):
        to_harmony([{"role": "robot", "content": "x"}])
    with pytest.raises(gpt_oss_cpu.InputError, match="reasoning_effort"):
        to_harmony([], reasoning_effort="extreme")


def test_earlier_analysis_is_dropped_after_a_final_answer(tok: gpt_oss_cpu.Tokenizer) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "reasoning_content": "Greet back.", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ]
    text = tok.decode(render_prompt(messages, tokenizer=tok))
    assert "Greet back." not in text
    assert text.endswith(
        "<|start|>assistant<|channel|>final<|message|>Hello!<|end|>"
        "<|start|>user<|message|>Bye<|end|><|start|>assistant"
    )


# --------------------------------------------------------------------- tokens -> events


def test_events_for_reasoning_and_answer(tok: gpt_oss_cpu.Tokenizer) -> None:
    events, parser = run_events(
        tok,
        "<|channel|>analysis<|message|>Crabs: 🦀🦀<|end|>"
        "<|start|>assistant<|channel|>final<|message|>Two 🦀.<|return|>",
    )
    assert reasoning_of(events) == "Crabs: 🦀🦀"
    assert content_of(events) == "Two 🦀."
    assert all("\ufffd" not in getattr(e, "text", "") for e in events)  # no split characters
    assert parser.finish_reason == "stop"
    assert [(m["channel"], m["content"][0]["text"]) for m in parser.messages] == [
        ("analysis", "Crabs: 🦀🦀"),
        ("final", "Two 🦀."),
    ]


def test_tool_call_event_from_a_scripted_completion(tok: gpt_oss_cpu.Tokenizer) -> None:
    events, parser = run_events(tok, TOOL_CALL_TEXT)
    assert len(events) == 1
    call = events[0]
    assert isinstance(call, ToolCall)
    assert (call.name, call.arguments, call.raw_arguments, call.error) == (
        "get_weather",
        {"city": "Paris"},
        '{"city":"Paris"}',
        None,
    )
    assert call.id.startswith("call_")
    assert call.to_openai()["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    assert parser.finish_reason == "tool_calls"
    assert parser.messages == [
        {
            "role": "assistant",
            "name": None,
            "content": [{"type": "text", "text": '{"city":"Paris"}'}],
            "channel": "commentary",
            "recipient": "functions.get_weather",
            "content_type": "<|constrain|>json",
        }
    ]
    # harmony's own rendering of the call (recipient before the channel) parses the same way
    rendered = harmony.render(
        harmony.message(
            "assistant",
            '{"city":"Paris"}',
            channel="commentary",
            recipient="functions.get_weather",
            content_type="<|constrain|>json",
        ),
        tokenizer=tok,
    )
    parser2 = CompletionParser(tok)
    events2 = [e for t in rendered[2:] for e in parser2.feed(t)]
    assert [(e.name, e.arguments) for e in events2 if isinstance(e, ToolCall)] == [
        ("get_weather", {"city": "Paris"})
    ]


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ('{"city": Paris}', "invalid JSON arguments"),
        ("[1, 2]", "must be a JSON object; got list"),
    ],
)
def test_bad_tool_arguments_become_a_tool_call_error(
    tok: gpt_oss_cpu.Tokenizer, arguments: str, error: str
) -> None:
    text = TOOL_CALL_TEXT.replace('{"city":"Paris"}', arguments)
    events, parser = run_events(tok, text)
    calls = [e for e in events if isinstance(e, ToolCall)]
    assert len(calls) == 1
    assert calls[0].arguments is None
    assert calls[0].raw_arguments == arguments
    assert calls[0].error is not None and error in calls[0].error
    assert parser.finish_reason == "tool_calls"


def test_malformed_output_arrives_as_content(tok: gpt_oss_cpu.Tokenizer) -> None:
    # a header with words harmony cannot place
    events, parser = run_events(tok, "<|channel|>final a b c<|message|>Hi<|return|>")
    assert content_of(events) == "<|channel|>final a b c<|message|>Hi"
    assert parser.finish_reason == "stop"
    # text between messages where <|start|> belongs, then a well-formed message again
    events, parser = run_events(
        tok,
        "<|channel|>final<|message|>Hi<|end|>oops<|start|>assistant<|channel|>final"
        "<|message|> there<|return|>",
    )
    assert content_of(events) == "Hioops there"
    assert parser.finish_reason == "stop"
    # a stop token inside the header
    events, parser = run_events(tok, "<|channel|>final<|return|>")
    assert content_of(events) == "<|channel|>final"
    assert parser.finish_reason == "stop"
    # a header that never ends
    events, parser = run_events(tok, "blah " * 300)
    assert content_of(events) == "blah " * 300
    assert parser.finish_reason is None


def test_stop_strings_are_stripped_and_held_back(tok: gpt_oss_cpu.Tokenizer) -> None:
    events, parser = run_events(
        tok, "<|channel|>final<|message|>Hello world. The end<|return|>", stop=["lo wo", "zzz"]
    )
    assert content_of(events) == "Hel"
    assert parser.finish_reason == "stop"
    assert parser.content == "Hel"
    assert parser.messages[-1]["content"][0]["text"] == "Hel"
    # a held-back prefix of a stop string that never completes is flushed at the end
    events, parser = run_events(
        tok, "<|channel|>final<|message|>Hello wor<|return|>", stop=["work"]
    )
    assert content_of(events) == "Hello wor"
    # stop strings apply to the answer, not to the reasoning
    events, parser = run_events(
        tok,
        "<|channel|>analysis<|message|>say END<|end|><|start|>assistant<|channel|>final"
        "<|message|>ok END now<|return|>",
        stop=["END"],
    )
    assert reasoning_of(events) == "say END"
    assert content_of(events) == "ok "
    # held-back text is released when its message ends, before the next event
    events, parser = run_events(
        tok,
        "<|channel|>commentary<|message|>Let me che<|end|><|start|>assistant" + TOOL_CALL_TEXT,
        stop=["check"],
    )
    assert [type(e) for e in events][-2:] == [ContentDelta, ToolCall]
    assert content_of(events) == "Let me che"
    assert parser.finish_reason == "tool_calls"


# ------------------------------------------------------------------------ with the model


def test_max_tokens_gives_finish_reason_length(
    model: gpt_oss_cpu.Model, tok: gpt_oss_cpu.Tokenizer
) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    with model.session(max_context=512) as session:
        result = session.chat(messages, max_tokens=5, temperature=0.0, stream=False, tokenizer=tok)
        assert isinstance(result, ChatResult)
        assert result.finish_reason == "length"
        assert result.usage["completion_tokens"] == 5
        empty = session.chat(messages, max_tokens=0, stream=False, tokenizer=tok)
        assert isinstance(empty, ChatResult)
        assert (empty.finish_reason, empty.usage["completion_tokens"], empty.content) == (
            "length",
            0,
            "",
        )
    with model.session(max_context=20) as small, pytest.raises(gpt_oss_cpu.ContextOverflowError):
        small.chat(messages, tokenizer=tok)  # raised by the call, before any event


def test_prefix_reuse_over_two_turns(model: gpt_oss_cpu.Model, tok: gpt_oss_cpu.Tokenizer) -> None:
    turn1 = [{"role": "user", "content": "Hello there"}]
    with model.session(max_context=512) as session:
        first = session.chat(turn1, max_tokens=4, temperature=0.0, stream=False, tokenizer=tok)
        assert isinstance(first, ChatResult)
        assert first.usage["cached_tokens"] == 0
        turn2 = [
            *turn1,
            {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ]
        second = session.chat(turn2, max_tokens=6, temperature=0.0, stream=False, tokenizer=tok)
        assert isinstance(second, ChatResult)
        usage = second.usage
        prompt2 = render_prompt(turn2, tokenizer=tok)
        assert usage["prompt_tokens"] == len(prompt2)
        # everything up to "<|start|>assistant" of turn 1 is reused; the random completion is not
        assert usage["cached_tokens"] == first.usage["prompt_tokens"]
        assert usage["computed_prompt_tokens"] == len(prompt2) - usage["cached_tokens"]
        assert 0 < usage["computed_prompt_tokens"] < usage["prompt_tokens"]
        reused_tokens = session.tokens

    with model.session(max_context=512) as fresh:
        again = fresh.chat(turn2, max_tokens=6, temperature=0.0, stream=False, tokenizer=tok)
        assert isinstance(again, ChatResult)
        assert again.usage["cached_tokens"] == 0
        # greedy decoding from the reused cache matches a fresh session token for token
        assert fresh.tokens == reused_tokens
        assert again.content == second.content


def test_reused_prefix_gives_the_same_logits_as_a_fresh_session(
    model: gpt_oss_cpu.Model, tok: gpt_oss_cpu.Tokenizer
) -> None:
    prompt = render_prompt([{"role": "user", "content": "Hello there"}], tokenizer=tok)
    other = render_prompt([{"role": "user", "content": "Hello where"}], tokenizer=tok)
    with model.session(max_context=512) as session, model.session(max_context=512) as fresh:
        session.append([*other, 1, 2, 3])
        cached = reuse_prefix(session, prompt)
        shared = next(i for i, (a, b) in enumerate(zip(prompt, other, strict=False)) if a != b)
        assert cached == shared > 0
        assert session.tokens == prompt[:cached]
        logits = session.append(prompt[cached:])
        expected = fresh.append(prompt)
        np.testing.assert_allclose(logits, expected, rtol=0, atol=1e-4)
        # a prompt the cache already holds whole: the last token is recomputed for its logits
        assert reuse_prefix(fresh, prompt) == len(prompt) - 1
        assert fresh.position == len(prompt) - 1
        np.testing.assert_allclose(fresh.append(prompt[-1:]), expected, rtol=0, atol=1e-4)


def test_scripted_completion_stops_on_return_not_end(
    model: gpt_oss_cpu.Model, tok: gpt_oss_cpu.Tokenizer
) -> None:
    script = ids_of(
        tok,
        "<|channel|>analysis<|message|>Think.<|end|><|start|>assistant<|channel|>final"
        "<|message|>Hello world!<|return|>",
    )
    script += ids_of(tok, "never reached")
    messages = [{"role": "user", "content": "Hi"}]
    with model.session(max_context=512) as session:
        events = collect(
            session.chat(
                messages,
                temperature=0.0,
                tokenizer=tok,
                logits_processors=[Script(script)],
            )
        )
        done = events[-1]
        assert isinstance(done, Done)
        assert (reasoning_of(events), content_of(events), done.finish_reason) == (
            "Think.",
            "Hello world!",
            "stop",
        )
        end = script.index(harmony.RETURN) + 1
        assert done.usage["completion_tokens"] == end
        # the session holds the prompt and the completion, without the final stop token
        prompt = render_prompt(messages, tokenizer=tok)
        assert session.tokens == prompt + script[: end - 1]

        stopped = session.chat(
            messages,
            temperature=0.0,
            tokenizer=tok,
            stop=["world"],
            stream=False,
            logits_processors=[Script(script)],
        )
        assert isinstance(stopped, ChatResult)
        assert (stopped.content, stopped.reasoning, stopped.finish_reason) == (
            "Hello ",
            "Think.",
            "stop",
        )
        assert stopped.usage["completion_tokens"] == script.index(tok.encode(" world")[0]) + 1
        assert stopped.usage["cached_tokens"] == len(prompt) - 1


def test_end_to_end_tool_call_through_a_logits_processor(
    model: gpt_oss_cpu.Model, tok: gpt_oss_cpu.Tokenizer
) -> None:
    messages: list[dict[str, object]] = [{"role": "user", "content": "Weather in Paris?"}]
    script = ids_of(tok, TOOL_CALL_TEXT)
    with model.session(max_context=1024) as session:
        events = collect(
            session.chat(
                messages,
                tools=[WEATHER_TOOL],
                temperature=0.0,
                tokenizer=tok,
                logits_processors=[Script(script)],
            )
        )
        assert [type(e) for e in events] == [ToolCall, Done]
        call, done = events
        assert isinstance(call, ToolCall) and isinstance(done, Done)
        assert (call.name, call.arguments, call.error) == ("get_weather", {"city": "Paris"}, None)
        assert done.finish_reason == "tool_calls"
        assert done.usage["completion_tokens"] == len(script)

        # the next turn carries the call and its result; the first prompt stays cached
        messages += [
            {"role": "assistant", "content": None, "tool_calls": [call.to_openai()]},
            {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})},
        ]
        answer = ids_of(tok, "<|channel|>final<|message|>21 °C in Paris.<|return|>")
        result = session.chat(
            messages,
            tools=[WEATHER_TOOL],
            temperature=0.0,
            tokenizer=tok,
            stream=False,
            logits_processors=[Script(answer)],
        )
        assert isinstance(result, ChatResult)
        assert (result.content, result.finish_reason, result.tool_calls) == (
            "21 °C in Paris.",
            "stop",
            [],
        )
        assert result.usage["cached_tokens"] == done.usage["prompt_tokens"]
        assert result.messages == [
            harmony.message("assistant", "21 °C in Paris.", channel="final"),
        ]


# ------------------------------------------------------------------------------------- CLI


def run_chat_cli(tiny_dir: Path, stdin: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "gpt_oss_cpu", "chat", "--model", str(tiny_dir), *extra],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=300,
        check=False,
    )


STATS = re.compile(
    r"\[gpt-oss-cpu\] (\d+) tokens in [\d.]+ s, [\d.]+ tok/s \| prompt (\d+) tokens "
    r"\((\d+) cached\) \| finish: (stop|length|tool_calls)"
)


def test_cli_chat_through_a_pipe(tiny_dir: Path) -> None:
    result = run_chat_cli(
        tiny_dir, "Hello\n/exit\n", "--max-tokens", "6", "--max-context", "512", "--seed", "3"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()  # the (random) answer
    stats = STATS.findall(result.stderr)
    assert len(stats) == 1, result.stderr
    assert stats[0][0] == "6" and stats[0][2] == "0" and stats[0][3] == "length"


def test_cli_chat_keeps_history_and_resets(tiny_dir: Path) -> None:
    result = run_chat_cli(
        tiny_dir,
        "Hello\nAgain\n/reset\nHello\n",  # ends at end of input
        "--max-tokens",
        "4",
        "--temperature",
        "0",
        "--system",
        "Be brief.",
        "--reasoning",
        "low",
        "--max-context",
        "512",
    )
    assert result.returncode == 0, result.stderr
    assert "history cleared" in result.stderr
    stats = [(int(n), int(p), int(c)) for n, p, c, _ in STATS.findall(result.stderr)]
    assert len(stats) == 3, result.stderr
    (_, p1, c1), (_, p2, c2), (_, p3, c3) = stats
    assert c1 == 0 and p2 > p1 and c2 == p1  # the second turn reuses the first prompt
    assert (p3, c3) == (p1, 0)  # after /reset: the first prompt again, from scratch
    answers = result.stdout.split("\n")
    assert answers[0] and answers[0] == answers[2]  # greedy: same question, same answer


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGINT")
def test_cli_chat_ctrl_c_stops_the_answer_and_keeps_the_session(tiny_dir: Path) -> None:
    # The random model's output streams once its first 256 tokens fail to form a header, so the
    # first stdout bytes arrive mid-answer, with hundreds of tokens still to go.
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    args = ["--max-tokens", "600", "--max-context", "2048", "--seed", "1"]
    with subprocess.Popen(
        [sys.executable, "-m", "gpt_oss_cpu", "chat", "--model", str(tiny_dir), *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    ) as proc:
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        proc.stdin.write(b"Hello\n")
        proc.stdin.flush()
        assert proc.stdout.read1(100)  # the answer is streaming
        proc.send_signal(signal.SIGINT)
        proc.stdin.write(b"Hi\n/exit\n")
        proc.stdin.close()
        proc.stdout.read()
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0, err
    assert "interrupted" in err
    stats = STATS.findall(err)
    assert len(stats) == 1, err  # only the second answer finished
    assert int(stats[0][2]) > 0  # ... reusing the cache of the interrupted session
