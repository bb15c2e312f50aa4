"""The ``gpt-oss-cpu`` command line (also ``python -m gpt_oss_cpu``).

Each subcommand is one ``_cmd_*`` function registered in :func:`build_parser`; add new ones
(``bench``, ``chat``, ``serve``) the same way.

Example:
    $ gpt-oss-cpu synth ~/.cache/gpt-oss-cpu/synth-20b
    $ gpt-oss-cpu generate --model ~/.cache/gpt-oss-cpu/synth-20b --max-new-tokens 16 "Hello"
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from .tokenizer import InvalidTokenizerError, TokenizerNotFoundError

if TYPE_CHECKING:
    from .model import Model

PROG = "gpt-oss-cpu"

# <|endoftext|>, <|return|>, <|call|>: raw-text generation stops on any of them (SPEC §5.4).
DEFAULT_STOP_TOKENS = (199999, 200002, 200012)


class CliError(Exception):
    """A usage problem found by the CLI itself (reported like a library error, exit code 2)."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI and return its exit code (0 ok, 2 bad input or checkpoint, 130 interrupted).

    Example:
        >>> main(["synth", "/tmp/tiny", "--config", "tiny", "--no-progress"])  # doctest: +SKIP
        0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (e.g. `| head`): stop quietly, and keep the interpreter's final
        # flush of stdout from failing again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
    except Exception as exc:
        if not isinstance(exc, _user_error_types()):
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG, description="Run OpenAI's gpt-oss models on the CPU."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(commands)
    _add_synth(commands)
    _add_bench(commands)
    _add_chat(commands)
    _add_serve(commands)
    return parser


# ------------------------------------------------------------------------------------ generate


def _add_generate(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "generate",
        help="continue a plain-text prompt (no chat format), streaming the text",
        description="Encode PROMPT as plain text, generate, and stream the decoded text to "
        "stdout. A summary with token counts and speeds goes to stderr.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--max-new-tokens", type=_positive_int, default=128, metavar="N")
    p.add_argument(
        "--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)"
    )
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed")
    _add_engine_options(p)
    p.add_argument(
        "--max-context",
        type=_positive_int,
        default=None,
        metavar="N",
        help="KV-cache size in tokens (default: prompt length + max-new-tokens)",
    )
    p.add_argument("prompt", metavar="PROMPT", help='prompt text, or "-" to read stdin')
    p.set_defaults(handler=_cmd_generate)


def _cmd_generate(args: argparse.Namespace) -> int:

    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir():
        raise CliError(f"model directory not found: {model_dir}")
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt

    t_start = time.perf_counter()
    model = _load_model(model_dir, args)
    tokenizer = model.tokenizer
    load_seconds = time.perf_counter() - t_start

    prompt_ids = tokenizer.encode(prompt)
    if not prompt_ids:
        raise CliError("the prompt is empty")
    stop = tuple(sorted({*DEFAULT_STOP_TOKENS, *model.config.eos_token_ids}))
    max_context = args.max_context or len(prompt_ids) + args.max_new_tokens

    out: TextIO = sys.stdout
    decoder = tokenizer.stream_decoder()
    generated = 0
    stop_token: int | None = None
    t_first: float | None = None
    t_last: float | None = None
    with model.session(max_context=max_context) as session:
        t_prefill = time.perf_counter()
        for token in session.generate(
            prompt_ids,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop=stop,
        ):
            t_last = time.perf_counter()
            if t_first is None:
                t_first = t_last
            generated += 1
            if token in stop:
                stop_token = token
                break
            text = decoder.feed(token)
            if text:
                out.write(text)
                out.flush()
    out.write(decoder.flush() + "\n")
    out.flush()

    summary = [
        f"load {load_seconds:.2f} s",
        f"prompt {len(prompt_ids)} tokens",
        f"generated {generated} tokens"
        + (f" (stop: {tokenizer.id_to_token(stop_token)})" if stop_token is not None else ""),
    ]
    if t_first is not None and t_last is not None:
        prefill = t_first - t_prefill
        summary.append(f"prefill {_rate(len(prompt_ids), prefill)} ({prefill:.3f} s)")
        if generated > 1:
            decode = t_last - t_first
            summary.append(f"decode {_rate(generated - 1, decode)} ({decode:.3f} s)")
    print(f"[{PROG}] " + " | ".join(summary), file=sys.stderr)
    return 0


# --------------------------------------------------------------------------------------- synth


def _add_synth(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "synth",
        help="write a random checkpoint with a real architecture (for benchmarks and tests)",
        description="Write a synthetic (random-weight) checkpoint in the Hugging Face layout.",
    )
    p.add_argument("dir", metavar="DIR", help="output directory")
    p.add_argument("--config", choices=("20b", "120b", "tiny"), default="20b")
    p.add_argument(
        "--seed", type=_non_negative_int, default=0, metavar="N", help="same seed, same bytes"
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=_cmd_synth)


def _cmd_synth(args: argparse.Namespace) -> int:
    from . import synthetic

    out_dir = synthetic.write_checkpoint(
        Path(args.dir).expanduser(), args.config, seed=args.seed, progress=not args.no_progress
    )
    print(out_dir)
    return 0


# --------------------------------------------------------------------------------------- bench


def _add_bench(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "bench",
        help="measure load, prefill and decode speed against the memory-bandwidth roofline",
        description="Benchmark a checkpoint with random token ids: load time, first call, "
        "prefill and decode tokens/s, memory bandwidth, the decode roofline (bandwidth / bytes "
        "read per token) and peak memory. Without --model, a synthetic gpt-oss-20b checkpoint "
        "in the user cache directory is used (written on first use, 13.8 GB).",
    )
    p.add_argument(
        "--model",
        default=None,
        metavar="DIR",
        help="checkpoint directory (default: $XDG_CACHE_HOME/gpt-oss-cpu/synthetic-20b)",
    )
    p.add_argument(
        "--pp", type=_positive_int, default=512, metavar="N", help="prompt tokens (default 512)"
    )
    p.add_argument(
        "--tg", type=_positive_int, default=128, metavar="N", help="decoded tokens (default 128)"
    )
    p.add_argument(
        "--depth",
        type=_non_negative_int,
        default=0,
        metavar="N",
        help="tokens in the KV cache before decoding (default 0)",
    )
    _add_engine_options(p)
    p.add_argument(
        "--repetitions",
        type=_positive_int,
        default=1,
        metavar="N",
        help="measure prefill and decode N times, report the median",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    import json

    from . import bench

    if args.model is None:
        model_dir = bench.ensure_synthetic_checkpoint(progress=True)
    else:
        model_dir = Path(args.model).expanduser()
        if not model_dir.is_dir():
            raise CliError(f"model directory not found: {model_dir}")

    def log(message: str) -> None:
        if sys.stderr.isatty():
            print(f"[{PROG} bench] {message}", file=sys.stderr, flush=True)

    with _q8_build_bar() as progress:
        result = bench.run_benchmark(
            model_dir,
            pp=args.pp,
            tg=args.tg,
            depth=args.depth,
            threads=args.threads,
            isa=args.isa,
            precision=args.precision,
            dense=args.dense,
            kv_cache=args.kv_cache,
            repetitions=args.repetitions,
            log=log,
            load_progress=progress,
        )
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(bench.format_table(result))
    return 0


# ---------------------------------------------------------------------------------------- chat

_DIM = "\x1b[2m"
_RESET = "\x1b[0m"


def _add_chat(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "chat",
        help="chat with the model in the Harmony format (interactive, streaming)",
        description="Read one user message per line from stdin and stream the answers, with "
        "the conversation kept across turns (the KV cache is reused). The reasoning is shown "
        "dimmed unless --hide-reasoning; speed goes to stderr. Commands: /reset clears the "
        "history, /exit quits (as does end of input). Ctrl-C stops the current answer.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument(
        "--reasoning",
        choices=("low", "medium", "high"),
        default="medium",
        help="reasoning effort (default medium)",
    )
    p.add_argument("--system", default=None, metavar="TEXT", help="system instructions")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the reasoning")
    p.add_argument(
        "--max-tokens",
        type=_positive_int,
        default=None,
        metavar="N",
        help="most tokens per answer (default: until the context is full)",
    )
    p.add_argument(
        "--temperature", type=float, default=1.0, metavar="T", help="default 1.0; 0 = greedy"
    )
    p.add_argument("--top-p", type=float, default=1.0, metavar="P")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed")
    _add_engine_options(p)
    p.add_argument(
        "--max-context",
        type=_positive_int,
        default=8192,
        metavar="N",
        help="KV-cache size in tokens for the whole conversation (default 8192)",
    )
    p.set_defaults(handler=_cmd_chat)


def _cmd_chat(args: argparse.Namespace) -> int:
    import gpt_oss_cpu

    from .chat import ChatResult, ContentDelta, Done, ReasoningDelta, ToolCall

    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir():
        raise CliError(f"model directory not found: {model_dir}")
    model = _load_model(model_dir, args)
    tokenizer = model.tokenizer
    out: TextIO = sys.stdout
    dim = out.isatty()
    system: list[dict[str, object]] = (
        [{"role": "system", "content": args.system}] if args.system else []
    )

    def answer(session: gpt_oss_cpu.Session, messages: list[dict[str, object]]) -> str:
        """Streams one answer; returns its content (partial if interrupted)."""
        in_reasoning = False
        content: list[str] = []
        done: Done | None = None
        t_start = time.perf_counter()
        events = session.chat(
            messages,
            reasoning_effort=args.reasoning,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            tokenizer=tokenizer,
        )
        assert not isinstance(events, ChatResult)
        try:
            for event in events:
                if isinstance(event, ReasoningDelta):
                    if args.hide_reasoning:
                        continue
                    if not in_reasoning:
                        out.write(_DIM if dim else "[reasoning] ")
                        in_reasoning = True
                    out.write(event.text)
                else:
                    if in_reasoning:
                        out.write(_RESET + "\n" if dim else "\n")
                        in_reasoning = False
                    if isinstance(event, ContentDelta):
                        content.append(event.text)
                        out.write(event.text)
                    elif isinstance(event, ToolCall):
                        out.write(f"[tool call {event.name}({event.raw_arguments})]")
                    elif isinstance(event, Done):
                        done = event
                out.flush()
        except KeyboardInterrupt:  # stop this answer, keep the session
            print(f"\n[{PROG}] interrupted", file=sys.stderr)
        except Exception as exc:  # e.g. a full context: report it, keep the session
            if not isinstance(exc, _user_error_types()):
                raise
            print(f"\n[{PROG}] error: {_one_line(exc)} (/reset starts over)", file=sys.stderr)
        finally:
            close = getattr(events, "close", None)
            if close is not None:
                close()
            out.write((_RESET if in_reasoning and dim else "") + "\n")
            out.flush()
        if done is not None:
            elapsed = time.perf_counter() - t_start
            usage = done.usage
            print(
                f"[{PROG}] {usage['completion_tokens']} tokens in {elapsed:.2f} s, "
                f"{_rate(usage['completion_tokens'], elapsed)} | prompt "
                f"{usage['prompt_tokens']} tokens ({usage['cached_tokens']} cached) | "
                f"finish: {done.finish_reason}",
                file=sys.stderr,
            )
        return "".join(content)

    interactive = sys.stdin.isatty()
    messages = list(system)
    with model.session(max_context=args.max_context) as session:
        while True:
            if interactive:
                out.write(">>> ")
                out.flush()
            line = sys.stdin.readline()
            if not line:  # end of input
                break
            text = line.rstrip("\r\n")
            command = text.strip()
            if not command:
                continue
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                messages = list(system)
                session.reset()
                print(f"[{PROG}] history cleared", file=sys.stderr)
                continue
            messages.append({"role": "user", "content": text})
            reply = answer(session, messages)
            if reply:
                messages.append({"role": "assistant", "content": reply})
    return 0


# --------------------------------------------------------------------------------------- serve


def _add_serve(commands: argparse._SubParsersAction) -> None:
    p = commands.add_parser(
        "serve",
        help="serve an OpenAI-compatible HTTP API (chat completions, responses)",
        description="Serve the model over HTTP with OpenAI's /v1/chat/completions, "
        "/v1/responses and /v1/models endpoints (needs the 'serve' extra: "
        "pip install 'gpt-oss-cpu[serve]'). Requests queue for the one model; binds to "
        "loopback unless --host says otherwise.",
    )
    p.add_argument("--model", required=True, metavar="DIR", help="checkpoint directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_non_negative_int, default=8000, metavar="N")
    p.add_argument(
        "--max-context",
        type=_positive_int,
        default=8192,
        metavar="N",
        help="KV-cache size in tokens, prompt and answer (default 8192)",
    )
    _add_engine_options(p)
    p.add_argument(
        "--api-key",
        default=os.environ.get("GPT_OSS_CPU_API_KEY"),
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' (default: $GPT_OSS_CPU_API_KEY, else none)",
    )
    p.add_argument(
        "--max-tokens-limit",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="most tokens one request may generate (default 4096)",
    )
    p.add_argument(
        "--model-name",
        default=None,
        metavar="NAME",
        help="model id reported by /v1/models (default: the directory name)",
    )
    p.set_defaults(handler=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    import logging

    try:
        import uvicorn

        from .server import create_app
    except ImportError as exc:
        raise CliError(
            f"serving needs the 'serve' extra ({exc}): pip install 'gpt-oss-cpu[serve]'"
        ) from None

    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir():
        raise CliError(f"model directory not found: {model_dir}")
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    model = _load_model(model_dir, args)
    name = args.model_name or model_dir.resolve().name
    app = create_app(
        model,
        model_name=name,
        api_key=args.api_key or None,
        max_context=args.max_context,
        max_tokens_limit=args.max_tokens_limit,
    )
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"[{PROG}] warning: serving on {args.host} without --api-key", file=sys.stderr)
    where = f"http://{args.host}:{args.port}/v1" if args.port else f"{args.host}, a free port"
    print(f"[{PROG}] serving {name!r} on {where}", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0


# ------------------------------------------------------------------------------------- helpers


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Errors caused by inputs (bad paths, checkpoints, arguments): one line, exit code 2."""
    types: tuple[type[BaseException], ...] = (
        TokenizerNotFoundError,
        InvalidTokenizerError,
        CliError,
        OSError,
    )
    try:
        from ._core import GptOssError
    except ImportError:  # `synth` works without the compiled extension
        return types
    return (GptOssError, *types)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _rate(tokens: int, seconds: float) -> str:
    return f"{tokens / seconds:.2f} tok/s" if seconds > 0 else "n/a tok/s"


def _load_model(model_dir: Path, args: argparse.Namespace) -> Model:
    """``Model.load`` with the options of :func:`_add_engine_options`. The first ``--dense q8``
    load of a checkpoint builds its 8-bit cache (several seconds for the 20b): a progress bar on
    stderr shows it."""
    import gpt_oss_cpu

    with _q8_build_bar() as progress:
        return gpt_oss_cpu.Model.load(
            str(model_dir),
            threads=args.threads,
            isa=args.isa,
            precision=args.precision,
            dense=args.dense,
            kv_cache=args.kv_cache,
            progress=progress,
        )


@contextlib.contextmanager
def _q8_build_bar() -> Iterator[Callable[[int, int], None]]:
    """A ``progress`` callback for ``Model.load`` that draws a bar on stderr once a build of the
    8-bit dense weights reports (it never does for other loads), closed on exit."""
    from tqdm.auto import tqdm

    bar: tqdm | None = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            desc = f"[{PROG}] building the 8-bit dense weights"
            bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)
        bar.update(done - bar.n)

    try:
        yield progress
    finally:
        if bar is not None:
            bar.close()


def _add_engine_options(p: argparse.ArgumentParser) -> None:
    """``--threads``, ``--isa``, ``--precision``, ``--dense`` and ``--kv-cache``, as
    ``Model.load`` takes them."""
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N")
    p.add_argument(
        "--isa",
        choices=("scalar", "avx2", "avx512", "neon"),
        default=None,
        help="kernel instruction set (default: the best this CPU has)",
    )
    p.add_argument(
        "--precision",
        choices=("exact", "fast"),
        default="exact",
        help="exact: fp32 activations throughout (default); fast: activations rounded to 8 bits "
        "(experts) and bf16 (attention, unembedding), faster and approximate",
    )
    p.add_argument(
        "--dense",
        choices=("bf16", "q8"),
        default="bf16",
        help="attention and unembedding weights: bf16 as in the checkpoint (default), or "
        "requantized to 8 bits at load (needs --precision fast)",
    )
    p.add_argument(
        "--kv-cache",
        choices=("f32", "bf16"),
        default="f32",
        help="element type of the cached keys and values: f32 (default), or bf16 (half the "
        "memory and half the bytes read per token at long context, approximate)",
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gpt-oss-cpu")
    except PackageNotFoundError:
        return "unknown"
