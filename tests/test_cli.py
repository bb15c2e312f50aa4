"""The ``gpt-oss-cpu`` command line, run as a subprocess on a tiny synthetic checkpoint."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import gpt_oss_cpu
import pytest
from gpt_oss_cpu.cli import DEFAULT_STOP_TOKENS

SUMMARY = re.compile(
    r"prompt (\d+) tokens \| generated (\d+) tokens.* \| "
    r"prefill [\d.]+ tok/s \([\d.]+ s\)( \| decode [\d.]+ tok/s \([\d.]+ s\))?$"
)


def run_cli(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONIOENCODING": "utf-8", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "gpt_oss_cpu", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=300,
        check=False,
    )


def expected_greedy_text(model_dir: Path, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """What generate should print, computed with the Python API: (text, tokens generated)."""
    model = gpt_oss_cpu.Model.load(str(model_dir))
    ids = model.tokenizer.encode(prompt)
    stop = tuple(sorted({*DEFAULT_STOP_TOKENS, *model.config.eos_token_ids}))
    with model.session(max_context=len(ids) + max_new_tokens) as session:
        out = list(session.generate(ids, max_new_tokens=max_new_tokens, temperature=0.0, stop=stop))
    text_ids = [t for t in out if t not in stop]
    return model.tokenizer.decode(text_ids), len(out)


def test_generate_streams_text_and_summary(tiny_dir: Path) -> None:
    result = run_cli("generate", "--model", str(tiny_dir), "--max-new-tokens", "8", "Hello")
    assert result.returncode == 0, result.stderr
    text, generated = expected_greedy_text(tiny_dir, "Hello", 8)
    assert 1 <= generated <= 8
    assert result.stdout == text + "\n"
    assert text  # the tiny random model does produce visible text
    summary = result.stderr.strip().splitlines()[-1]
    match = SUMMARY.search(summary)
    assert match, summary
    assert int(match.group(1)) == 1  # "Hello" is one token (13225)
    assert int(match.group(2)) == generated
    assert (match.group(3) is not None) == (generated > 1)  # decode speed needs 2+ tokens


def test_generate_is_deterministic(tiny_dir: Path) -> None:
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "6", "The quick brown"]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == second.returncode == 0, first.stderr
    assert first.stdout == second.stdout
    assert first.stdout.strip()

    sampled = [*args, "--temperature", "1.0", "--top-p", "0.9", "--seed", "7"]
    a, b = run_cli(*sampled), run_cli(*sampled)
    assert a.returncode == b.returncode == 0, a.stderr
    assert a.stdout == b.stdout


def test_generate_reads_prompt_from_stdin(tiny_dir: Path) -> None:
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "4"]
    from_arg = run_cli(*args, "Hello")
    from_stdin = run_cli(*args, "-", stdin="Hello")
    assert from_arg.returncode == from_stdin.returncode == 0, from_stdin.stderr
    assert from_arg.stdout == from_stdin.stdout


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("gpt-oss-cpu: error: ")
    for needle in needles:
        assert needle in lines[0]


def test_missing_model_dir(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = run_cli("generate", "--model", str(missing), "Hello")
    assert_one_line_error(result, str(missing))
    assert result.stdout == ""


def test_dir_without_checkpoint(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_cli("generate", "--model", str(empty), "Hello")
    assert_one_line_error(result, str(empty))


def test_context_overflow_is_a_clean_error(tiny_dir: Path) -> None:
    args = ["generate", "--model", str(tiny_dir), "--max-new-tokens", "8", "--max-context", "2"]
    result = run_cli(*args, "Hello")
    assert_one_line_error(result)


def test_usage_errors() -> None:
    help_result = run_cli("--help")
    assert help_result.returncode == 0
    assert "generate" in help_result.stdout and "synth" in help_result.stdout
    no_model = run_cli("generate", "Hello")
    assert no_model.returncode == 2
    assert "--model" in no_model.stderr
    bad_count = run_cli("generate", "--model", ".", "--max-new-tokens", "0", "Hi")
    assert bad_count.returncode == 2


def test_synth_matches_write_checkpoint(tmp_path: Path, tiny_dir: Path) -> None:
    out = tmp_path / "synth-tiny"
    result = run_cli("synth", str(out), "--config", "tiny", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out)
    written = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert written == sorted(p.relative_to(tiny_dir) for p in tiny_dir.rglob("*") if p.is_file())
    for rel in written:  # same default seed: the same bytes as the fixture's checkpoint
        assert (out / rel).read_bytes() == (tiny_dir / rel).read_bytes(), rel


@pytest.mark.parametrize(
    "command",
    [
        ("generate", "--max-new-tokens", "2", "Hello"),
        ("bench", "--pp", "4", "--tg", "2", "--json"),
    ],
)
def test_the_first_q8_load_shows_a_progress_bar(
    tiny_dir: Path, tmp_path: Path, command: tuple[str, ...]
) -> None:
    env = {"XDG_CACHE_HOME": str(tmp_path / "cache")}
    name, *options = command
    args = (name, "--model", str(tiny_dir), "--precision", "fast", *options)
    for dense, shown in (("q8", True), ("q8", False), ("bf16", False)):
        result = run_cli(*args, "--dense", dense, env=env)
        assert result.returncode == 0, result.stderr
        bar = re.search(r"building the 8-bit dense weights.*100%", result.stderr)
        assert (bar is not None) == shown, result.stderr
