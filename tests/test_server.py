"""`gpt-oss-cpu serve`: the real server on a loopback port, driven by the official openai client.

The tiny synthetic model has random weights and the real vocabulary; completions that must have
a given shape (tool calls, answers, reasoning) are scripted through the app's logits processor
hook, which also counts generation steps (to prove a disconnect stops the generation).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import gpt_oss_cpu
import httpx
import numpy as np
import numpy.typing as npt
import openai
import pytest
import uvicorn
from gpt_oss_cpu.cli import build_parser
from gpt_oss_cpu.server import create_app

MAX_TOKENS_LIMIT = 256
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
TOOL_CALL = (
    '<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>{"city":"Paris"}'
    "<|call|>"
)
ANSWER = "<|channel|>final<|message|>It is 21 C in Paris.<|return|>"
THOUGHT_AND_ANSWER = (
    "<|channel|>analysis<|message|>The user greets me.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Hello!<|return|>"
)


class Director:
    """The app's logits processor: forces a script (if set), counts steps, may slow them down."""

    def __init__(self) -> None:
        self.script: list[int] = []
        self.step = 0
        self.calls = 0
        self.delay = 0.0
        self.fail = False

    def play(self, tokens: Sequence[int], delay: float = 0.0, fail: bool = False) -> None:
        self.script = list(tokens)
        self.step = 0
        self.delay = delay
        self.fail = fail

    def __call__(self, token_ids: list[int], logits: npt.NDArray[np.float32]) -> None:
        self.calls += 1
        if self.fail:
            raise RuntimeError("secret internal detail")
        if self.delay:
            time.sleep(self.delay)
        if self.script:
            forced = self.script[min(self.step, len(self.script) - 1)]
            self.step += 1
            logits[:] = -np.inf
            logits[forced] = 0.0


class Running:
    def __init__(self, server: Any, thread: threading.Thread, port: int) -> None:
        self.server = server
        self.thread = thread
        self.url = f"http://127.0.0.1:{port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def serve(app: Any) -> Running:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    return Running(server, thread, port)


@pytest.fixture(scope="module")
def model(tiny_dir: Path) -> gpt_oss_cpu.Model:
    return gpt_oss_cpu.Model.load(str(tiny_dir))


@pytest.fixture(scope="module")
def director() -> Director:
    return Director()


@pytest.fixture(scope="module")
def url(model: gpt_oss_cpu.Model, director: Director) -> Iterator[str]:
    app = create_app(
        model,
        model_name="tiny-test",
        max_context=2048,
        max_tokens_limit=MAX_TOKENS_LIMIT,
        logits_processors=[director],
    )
    running = serve(app)
    yield running.url
    running.stop()


@pytest.fixture
def client(url: str, director: Director) -> openai.OpenAI:
    director.play([])
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def ids(model: gpt_oss_cpu.Model, text: str) -> list[int]:
    return model.tokenizer.encode(text, allow_special=True)


HELLO = [{"role": "user", "content": "Hello"}]

# --------------------------------------------------------------------------------- basics


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny-test"]
    assert models.data[0].owned_by == "gpt-oss-cpu"
    assert client.models.retrieve("tiny-test").id == "tiny-test"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_chat_completion_greedy(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model="tiny-test", messages=HELLO, max_tokens=6, temperature=0
    )
    choice = first.choices[0]
    assert first.object == "chat.completion"
    assert first.model == "tiny-test"
    assert choice.finish_reason == "length"
    assert choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.content
    assert choice.message.tool_calls is None
    usage = first.usage
    assert usage is not None
    assert usage.completion_tokens == 6
    assert usage.prompt_tokens > 20
    assert usage.total_tokens == usage.prompt_tokens + 6
    # the same prompt again: greedy gives the same text and reuses the cached prompt prefix
    again = client.chat.completions.create(
        model="tiny-test", messages=HELLO, max_tokens=6, temperature=0
    )
    assert again.choices[0].message.content == choice.message.content
    assert again.usage is not None and again.usage.prompt_tokens_details is not None
    assert again.usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1


def test_chat_completion_stream_matches_non_stream(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(
        model="tiny-test", messages=HELLO, max_tokens=5, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="tiny-test",
            messages=HELLO,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length" and set(finishes[:-1]) == {None}
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5


def test_logprobs_and_sampling_parameters(client: openai.OpenAI) -> None:
    result = client.chat.completions.create(
        model="tiny-test",
        messages=HELLO,
        max_tokens=4,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        presence_penalty=0.5,
        frequency_penalty=0.5,
        seed=3,
    )
    logprobs = result.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert len(logprobs.content) == 4  # one per completion token
    for entry in logprobs.content:
        assert entry.logprob <= 0.0
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token  # greedy: the best token
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    # logit_bias forces a token, seeded sampling is reproducible
    biased = client.chat.completions.create(
        model="tiny-test", messages=HELLO, max_tokens=3, logit_bias={"1000": 100}, seed=1
    )
    token_text = gpt_oss_cpu.Tokenizer.bundled().decode([1000])
    assert biased.choices[0].message.content == token_text * 3
    sampled = [
        client.chat.completions.create(
            model="tiny-test", messages=HELLO, max_tokens=4, temperature=1.0, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert sampled[0] == sampled[1]


# ------------------------------------------------------------------------ scripted output


def test_reasoning_content_and_stop(
    client: openai.OpenAI, model: gpt_oss_cpu.Model, director: Director
) -> None:
    director.play(ids(model, THOUGHT_AND_ANSWER))
    result = client.chat.completions.create(
        model="tiny-test", messages=HELLO, max_tokens=50, reasoning_effort="low"
    )
    message = result.choices[0].message
    assert (message.content, result.choices[0].finish_reason) == ("Hello!", "stop")
    assert message.reasoning_content == "The user greets me."  # type: ignore[attr-defined]

    director.play(ids(model, THOUGHT_AND_ANSWER))
    chunks = list(
        client.chat.completions.create(
            model="tiny-test", messages=HELLO, max_tokens=50, stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == "The user greets me."
    assert "".join(d.content or "" for d in deltas) == "Hello!"
    assert chunks[-1].choices[0].finish_reason == "stop"

    director.play(ids(model, THOUGHT_AND_ANSWER))
    stopped = client.chat.completions.create(
        model="tiny-test", messages=HELLO, max_tokens=50, stop=["lo"]
    )
    assert stopped.choices[0].message.content == "Hel"
    assert stopped.choices[0].finish_reason == "stop"


def test_tool_call_round_trip(
    client: openai.OpenAI, model: gpt_oss_cpu.Model, director: Director
) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    director.play(ids(model, TOOL_CALL))
    result = client.chat.completions.create(
        model="tiny-test", messages=messages, tools=[WEATHER_TOOL], max_tokens=64
    )
    choice = result.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls
    assert calls is not None and len(calls) == 1
    call = calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather",
        {"city": "Paris"},
    )
    assert not choice.message.content

    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temp_c": 21})},
    ]
    director.play(ids(model, ANSWER))
    answer = client.chat.completions.create(
        model="tiny-test", messages=messages, tools=[WEATHER_TOOL], max_tokens=64
    )
    assert answer.choices[0].message.content == "It is 21 C in Paris."
    assert answer.choices[0].finish_reason == "stop"
    # the first request's prompt was reused from the KV cache
    assert result.usage is not None
    assert answer.usage is not None and answer.usage.prompt_tokens_details is not None
    assert answer.usage.prompt_tokens_details.cached_tokens >= result.usage.prompt_tokens


def test_streamed_tool_call_and_tool_choice_none(
    client: openai.OpenAI, model: gpt_oss_cpu.Model, director: Director
) -> None:
    director.play(ids(model, TOOL_CALL))
    chunks = list(
        client.chat.completions.create(
            model="tiny-test",
            messages=[{"role": "user", "content": "Weather in Paris?"}],
            tools=[WEATHER_TOOL],
            tool_choice="auto",
            max_tokens=64,
            stream=True,
        )
    )
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or ()]
    assert len(deltas) == 1
    assert deltas[0].index == 0 and deltas[0].id and deltas[0].id.startswith("call_")
    assert deltas[0].function is not None
    assert deltas[0].function.name == "get_weather"
    assert json.loads(deltas[0].function.arguments or "") == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    # tool_choice="none": the tools are not shown to the model, so the prompt is shorter
    with_tools = client.chat.completions.create(
        model="tiny-test", messages=HELLO, tools=[WEATHER_TOOL], max_tokens=1
    )
    without = client.chat.completions.create(
        model="tiny-test", messages=HELLO, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=1
    )
    assert with_tools.usage is not None and without.usage is not None
    assert without.usage.prompt_tokens < with_tools.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError, match="not in 'tools'"):
        client.chat.completions.create(
            model="tiny-test",
            messages=HELLO,
            tools=[WEATHER_TOOL],
            tool_choice={"type": "function", "function": {"name": "nope"}},
        )


# ------------------------------------------------------------------------------ responses


def test_responses_api(client: openai.OpenAI, model: gpt_oss_cpu.Model, director: Director) -> None:
    plain = client.responses.create(
        model="tiny-test", input="Hello", max_output_tokens=5, temperature=0
    )
    assert plain.object == "response" and plain.status == "incomplete"
    assert plain.incomplete_details is not None
    assert plain.incomplete_details.reason == "max_output_tokens"
    assert plain.output_text
    assert plain.usage is not None and plain.usage.output_tokens == 5

    tool = {k: v for k, v in WEATHER_TOOL["function"].items()}  # type: ignore[attr-defined]
    director.play(ids(model, TOOL_CALL))
    called = client.responses.create(
        model="tiny-test",
        instructions="Use the tools.",
        input=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[{"type": "function", **tool}],
        reasoning={"effort": "low"},
        max_output_tokens=64,
    )
    assert called.status == "completed"
    calls = [item for item in called.output if item.type == "function_call"]
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments) == {"city": "Paris"}

    director.play(ids(model, THOUGHT_AND_ANSWER))
    answer = client.responses.create(
        model="tiny-test",
        instructions="Use the tools.",
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            calls[0].model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "21 C"},
        ],
        tools=[{"type": "function", **tool}],
        max_output_tokens=64,
    )
    assert answer.status == "completed"
    assert [item.type for item in answer.output] == ["reasoning", "message"]
    assert answer.output_text == "Hello!"
    reasoning = answer.output[0]
    assert reasoning.type == "reasoning" and reasoning.content is not None
    assert reasoning.content[0].text == "The user greets me."


def test_responses_stream(
    client: openai.OpenAI, model: gpt_oss_cpu.Model, director: Director
) -> None:
    director.play(ids(model, THOUGHT_AND_ANSWER))
    events = list(
        client.responses.create(model="tiny-test", input="Hello", max_output_tokens=64, stream=True)
    )
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for needed in (
        "response.output_item.added",
        "response.reasoning_text.delta",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.output_item.done",
    ):
        assert needed in types
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == "Hello!"
    done = [e for e in events if e.type == "response.output_text.done"]
    assert done[0].text == "Hello!"
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == "Hello!" and final.usage is not None


# --------------------------------------------------------------------------------- errors


def test_bad_requests_get_openai_errors(client: openai.OpenAI, url: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-test", messages=[])
    assert info.value.status_code == 400
    assert info.value.param == "messages"
    with pytest.raises(openai.BadRequestError, match="role"):
        client.chat.completions.create(
            model="tiny-test",
            messages=[{"role": "wizard", "content": "hi"}],  # type: ignore[list-item]
        )
    with pytest.raises(openai.BadRequestError, match="at most 256") as info:
        client.chat.completions.create(model="tiny-test", messages=HELLO, max_tokens=10_000)
    assert info.value.param == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model="tiny-test", messages=HELLO, temperature=5)
    with pytest.raises(openai.BadRequestError, match="reasoning_effort"):
        client.chat.completions.create(
            model="tiny-test",
            messages=HELLO,
            reasoning_effort="extreme",  # type: ignore[arg-type]
        )
    with pytest.raises(openai.BadRequestError, match="unsupported item type"):
        client.responses.create(model="tiny-test", input=[{"type": "web_search_call"}])  # type: ignore[list-item]
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(
            model="tiny-test", messages=[{"role": "user", "content": "word " * 3000}]
        )

    raw = httpx.post(
        f"{url}/chat/completions",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert raw.status_code == 400
    error = raw.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and "JSON" in error["message"]

    big = httpx.post(f"{url}/chat/completions", content=b"x" * (1024 * 1024 + 1))
    assert big.status_code == 413
    assert big.json()["error"]["code"] == "request_too_large"

    missing = httpx.get(f"{url}/nothing-here")
    assert missing.status_code == 404 and "error" in missing.json()


def test_internal_errors_are_generic(client: openai.OpenAI, director: Director) -> None:
    director.play([], fail=True)
    with pytest.raises(openai.InternalServerError) as info:
        client.chat.completions.create(model="tiny-test", messages=HELLO, max_tokens=4)
    assert info.value.status_code == 500
    assert "secret" not in info.value.response.text
    assert "Traceback" not in info.value.response.text
    assert info.value.type == "server_error"
    stream = client.chat.completions.create(
        model="tiny-test", messages=HELLO, max_tokens=4, stream=True
    )
    with pytest.raises(openai.APIError, match="server had an error") as streamed:
        list(stream)
    assert "secret" not in str(streamed.value)
    director.play([])  # the session recovers
    ok = client.chat.completions.create(model="tiny-test", messages=HELLO, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_api_key(model: gpt_oss_cpu.Model) -> None:
    running = serve(create_app(model, model_name="locked", api_key="s3cret", max_context=512))
    try:
        wrong = openai.OpenAI(base_url=running.url, api_key="guess", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as info:
            wrong.models.list()
        assert info.value.status_code == 401
        assert info.value.code == "invalid_api_key"
        raw = httpx.post(f"{running.url}/chat/completions", json={"messages": HELLO})
        assert raw.status_code == 401 and raw.json()["error"]["code"] == "invalid_api_key"
        right = openai.OpenAI(base_url=running.url, api_key="s3cret", max_retries=0)
        assert [m.id for m in right.models.list().data] == ["locked"]
    finally:
        running.stop()


# ---------------------------------------------------------------------------- concurrency


def test_client_disconnect_stops_generation(
    client: openai.OpenAI, model: gpt_oss_cpu.Model, director: Director
) -> None:
    # a final-channel answer of endless "a" tokens, each step slowed down
    director.play(ids(model, "<|channel|>final<|message|>a"), delay=0.02)
    before = director.calls
    stream = client.chat.completions.create(
        model="tiny-test", messages=HELLO, max_tokens=MAX_TOKENS_LIMIT, stream=True
    )
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
            if received == 2:
                break
    stream.close()
    # wait until the step counter stops moving
    last = -1
    deadline = time.monotonic() + 10
    while director.calls != last and time.monotonic() < deadline:
        last = director.calls
        time.sleep(0.3)
    steps = director.calls - before
    assert 2 <= steps < 100, f"{steps} steps after the client left (max_tokens 256)"
    # the server is free again
    director.play([])
    after = client.chat.completions.create(model="tiny-test", messages=HELLO, max_tokens=2)
    assert after.choices[0].finish_reason == "length"


def test_two_concurrent_clients_both_complete(url: str, director: Director) -> None:
    director.play([], delay=0.005)
    results: dict[int, Any] = {}
    errors: list[BaseException] = []

    def ask(i: int) -> None:
        try:
            c = openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)
            messages = [{"role": "user", "content": f"Question number {i}"}]
            if i == 0:
                results[i] = c.chat.completions.create(
                    model="tiny-test", messages=messages, max_tokens=12, temperature=0
                )
            else:
                chunks = list(
                    c.chat.completions.create(
                        model="tiny-test",
                        messages=messages,
                        max_tokens=12,
                        temperature=0,
                        stream=True,
                    )
                )
                results[i] = chunks
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert results[0].choices[0].finish_reason == "length"
    assert results[0].usage.completion_tokens == 12
    assert results[1][-1].choices[0].finish_reason == "length"


def test_serve_command(model: gpt_oss_cpu.Model) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("GPT_OSS_CPU_API_KEY", None)
    cmd = [sys.executable, "-m", "gpt_oss_cpu", "serve", "--model", str(model.path)]
    cmd += ["--port", "0", "--max-context", "512", "--model-name", "cli-model"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))  # type: ignore[union-attr]
    reader.start()
    try:
        deadline = time.monotonic() + 60
        port = None
        while port is None:
            assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
            found = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", "".join(lines))
            port = int(found.group(1)) if found else None
            time.sleep(0.05)
        base = f"http://127.0.0.1:{port}/v1"
        assert httpx.get(f"{base}/models").json()["data"][0]["id"] == "cli-model"
        answer = httpx.post(
            f"{base}/chat/completions",
            json={"model": "cli-model", "messages": HELLO, "max_tokens": 2},
            timeout=60,
        ).json()
        assert answer["choices"][0]["finish_reason"] == "length"
        assert answer["usage"]["completion_tokens"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
    log = "".join(lines)
    assert "queued at position 1 (0 ahead)" in log
    assert "finished (length) after 2 tokens" in log


def test_serve_cli_arguments() -> None:
    args = build_parser().parse_args(["serve", "--model", "/m"])
    assert (args.host, args.port, args.max_context, args.max_tokens_limit) == (
        "127.0.0.1",
        8000,
        8192,
        4096,
    )
    args = build_parser().parse_args(
        ["serve", "--model", "/m", "--port", "9000", "--api-key", "k", "--model-name", "gpt-oss"]
    )
    assert (args.port, args.api_key, args.model_name) == (9000, "k", "gpt-oss")
