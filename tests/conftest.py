"""Shared fixtures for the test suite: the bundled golden data and a small numeric report.

Every test reads its checkpoints and reference outputs from ``tests/data`` (copied from the
project's golden reference set), so a fresh clone runs the suite without anything outside the
repository.

Tests that compare the engine against the golden numbers call :func:`record` with the measured
max |diff|; the collected lines are printed in the terminal summary and written to
``tests/.last_report.txt`` so they can be quoted without re-running anything.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Points ``XDG_CACHE_HOME`` (where ``dense="q8"`` caches its weights) at a temporary
    directory for the whole session, so tests never write to the user's cache."""
    import os

    path = tmp_path_factory.mktemp("xdg-cache")
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(path)
    yield path
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


MODELS = DATA / "models"
REPORT_PATH = Path(__file__).parent / ".last_report.txt"

# Model directories holding a config.json, known at collection time so tests can be parametrized.
MODEL_NAMES: list[str] = (
    sorted(p.name for p in MODELS.iterdir() if (p / "config.json").is_file())
    if MODELS.is_dir()
    else []
)

_REPORT: list[tuple[str, str, float, float]] = []


def _record(model: str, check: str, max_abs_diff: float, tolerance: float) -> None:
    """Remember one measured max |diff| for the end-of-run report."""
    _REPORT.append((model, check, float(max_abs_diff), float(tolerance)))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the recorded max |diff| table and save it to ``tests/.last_report.txt``."""
    if not _REPORT:
        return
    lines = [f"{'model':<8} {'check':<50} {'max |diff|':>12} {'tolerance':>10}"]
    for model, check, diff, tol in sorted(_REPORT):
        flag = "" if diff <= tol else "  FAIL"
        lines.append(f"{model:<8} {check:<50} {diff:>12.3e} {tol:>10.2e}{flag}")
    text = "\n".join(lines) + "\n"
    terminalreporter.write_sep("-", "gpt-oss-cpu numeric report (max |diff| vs golden)")
    terminalreporter.write(text)
    REPORT_PATH.write_text(text)


@pytest.fixture(scope="session")
def report() -> Callable[[str, str, float, float], None]:
    """A function ``report(model, check, max_abs_diff, tolerance)`` feeding the end-of-run table.

    >>> def test_x(report):
    ...     report("tiny-a", "logits", 1.2e-5, 1e-3)
    """
    return _record


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The bundled test data directory ``tests/data``."""
    assert DATA.is_dir(), f"test data missing: {DATA}"
    return DATA


@pytest.fixture(scope="module", params=MODEL_NAMES)
def model_name(request: pytest.FixtureRequest) -> str:
    """Name of one golden model directory under ``tests/data/models`` (parametrized over all)."""
    return str(request.param)


@pytest.fixture(scope="module")
def model_dir(model_name: str) -> Path:
    """Path of the golden checkpoint directory for ``model_name``."""
    return MODELS / model_name


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> dict[str, np.ndarray]:
    """All arrays of the model's ``reference.npz``, loaded eagerly."""
    with np.load(model_dir / "reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def model(model_dir: Path) -> Iterator[object]:
    """The golden checkpoint loaded once per module through the public API."""
    import gpt_oss_cpu

    yield gpt_oss_cpu.Model.load(str(model_dir))


@pytest.fixture(scope="session")
def tiny_a_dir() -> Path:
    """The tiny-a checkpoint (4 heads / 1 KV head, window 8, top-4, vocab 512)."""
    path = MODELS / "tiny-a"
    assert (path / "config.json").is_file(), f"missing test checkpoint {path}"
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic checkpoint with the real 201,088-token vocabulary and tokenizer, written
    once per test session (about 105 MB). Tests must not modify it."""
    from gpt_oss_cpu import synthetic

    return synthetic.write_checkpoint(tmp_path_factory.mktemp("tiny"), "tiny", progress=False)
