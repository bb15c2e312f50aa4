"""Whole-model prefill and decode speed on a small synthetic gpt-oss, for every ISA.

Run with ``pytest benches/test_end_to_end.py`` (see ``benches/README.md``). The checkpoint is a
random-weight gpt-oss with the real architecture but smaller sizes (:data:`CONFIG`: hidden 1024,
8 layers, 16 experts top-4, vocabulary 32000; 422 MB), written once per session to a temporary
directory. ``extra_info`` records ``tok_s`` (from the mean time) and, for decoding, the bytes read
per token and the effective bandwidth ``gb_s`` (bytes per token x tok/s).

For the real-size model use ``gpt-oss-cpu bench`` (it also measures the memory roofline).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gpt_oss_cpu
import numpy as np
import pytest
from gpt_oss_cpu import bench, synthetic

_core = pytest.importorskip("gpt_oss_cpu._core")

ISAS: list[str] = list(_core.build_info()["supported_isas"])  # type: ignore[arg-type]

#: gpt-oss architecture (alternating sliding/full attention, GQA 8:1, MXFP4 experts) at a size
#: that writes in seconds.
CONFIG: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "num_local_experts": 16,
    "num_experts_per_tok": 4,
    "vocab_size": 32000,
}
PREFILL_TOKENS = 128
DECODE_DEPTH = 256  # tokens in the cache when a decode step is timed
DECODE_ROUNDS = 40


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = synthetic.write_checkpoint(
        tmp_path_factory.mktemp("bench-e2e") / "model", CONFIG, progress=False
    )
    size = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    assert size < 500_000_000, size
    return path


# Each ISA exact; the fast settings on the default (best) ISA.
SETTINGS = [(isa, "exact", "bf16") for isa in ISAS] + [
    (ISAS[-1], "fast", "bf16"),
    (ISAS[-1], "fast", "q8"),
]


@pytest.fixture(params=SETTINGS, ids=lambda s: "-".join(s))
def model(
    request: pytest.FixtureRequest,
    model_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[gpt_oss_cpu.Model]:
    isa, precision, dense = request.param
    # dense="q8" writes its cache file: keep it out of the user's cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache")))
    loaded = gpt_oss_cpu.Model.load(model_dir, isa=isa, precision=precision, dense=dense)
    assert (loaded.isa, loaded.precision, loaded.dense) == request.param
    # Page the weights in before anything is timed.
    with loaded.session(max_context=64) as session:
        session.append(np.arange(64) * 7 % CONFIG["vocab_size"])
    yield loaded


def random_ids(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG["vocab_size"], size=n, dtype=np.int64)


def test_prefill(benchmark: Any, model: gpt_oss_cpu.Model) -> None:
    prompt = random_ids(PREFILL_TOKENS, seed=1)
    benchmark.group = f"prefill {PREFILL_TOKENS} tokens"

    def prefill() -> int:
        with model.session(max_context=PREFILL_TOKENS) as session:
            session._session.append(prompt, False)
            return session.position

    position = benchmark.pedantic(prefill, rounds=5, iterations=1, warmup_rounds=1)
    assert position == PREFILL_TOKENS
    benchmark.extra_info["isa"] = model.isa
    benchmark.extra_info["threads"] = model.threads
    if benchmark.stats is not None:
        benchmark.extra_info["tok_s"] = round(PREFILL_TOKENS / benchmark.stats.stats.mean, 2)


def test_decode(benchmark: Any, model: gpt_oss_cpu.Model) -> None:
    """One decode step at depth ``DECODE_DEPTH``; the cache is rolled back between rounds."""
    steps = iter(np.array([t]) for t in random_ids(DECODE_ROUNDS + 10, seed=3))
    benchmark.group = f"decode 1 token at depth {DECODE_DEPTH}"
    with model.session(max_context=DECODE_DEPTH + 1) as session:
        inner = session._session
        inner.append(random_ids(DECODE_DEPTH, seed=2), False)

        def setup() -> tuple[tuple[Any, ...], dict[str, Any]]:
            inner.truncate(DECODE_DEPTH)
            return (next(steps),), {}

        def decode(step: np.ndarray) -> int:
            inner.append(step, False)
            return inner.position

        position = benchmark.pedantic(decode, setup=setup, rounds=DECODE_ROUNDS, warmup_rounds=1)
        assert position == DECODE_DEPTH + 1
    config = synthetic.resolve_config(CONFIG)
    per_token = bench.decode_bytes_per_token(config, DECODE_DEPTH, model.dense, model.kv_cache)
    benchmark.extra_info["isa"] = model.isa
    benchmark.extra_info["threads"] = model.threads
    benchmark.extra_info["bytes_per_token"] = per_token
    if benchmark.stats is not None:
        tok_s = 1.0 / benchmark.stats.stats.mean
        benchmark.extra_info["tok_s"] = round(tok_s, 2)
        benchmark.extra_info["gb_s"] = round(per_token * tok_s / 1e9, 2)
