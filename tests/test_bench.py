"""``gpt-oss-cpu bench`` on a tiny synthetic checkpoint, and the decode byte accounting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gpt_oss_cpu import bench, synthetic

STABLE_KEYS = {
    "load_s",
    "first_call_s",
    "bandwidth_gbs",
    "pp",
    "pp_tok_s",
    "tg",
    "tg_tok_s",
    "depth",
    "bytes_per_token",
    "roofline_tok_s",
    "roofline_pct",
    "peak_rss_bytes",
    "checkpoint_bytes",
    "isa",
    "precision",
    "dense",
    "kv_cache",
    "threads",
    "model",
}

# gpt-oss-20b, by hand from SPEC §1.1 / §3.5 (bytes read to decode one token at depth 0):
ATTENTION_20B = 24 * 2 * (  # 24 layers, bf16
    2 * (4096 * 2880) + 2 * (512 * 2880)  # q, o and k, v weights
    + 4096 + 512 + 512 + 2880  # q, k, v, o biases
    + 64  # sinks
)  # fmt: skip
ROUTER_20B = 24 * 2 * (32 * 2880 + 32)
EXPERTS_20B = 24 * 4 * 13_236_480  # top-4 experts at SPEC §3.5's 13,236,480 B each
NORMS_20B = (24 * 2 + 1) * 2880 * 2
UNEMBEDDING_20B = 201_088 * 2880 * 2
EMBEDDING_ROW_20B = 2880 * 2
KV_PER_POSITION_20B = 4 * 8 * 64 * 2  # fp32 K and V, 8 KV heads x 64 per layer and position


def test_decode_bytes_per_token_20b() -> None:
    cfg = synthetic.CONFIGS["20b"]
    weights = (
        ATTENTION_20B + ROUTER_20B + EXPERTS_20B + NORMS_20B + UNEMBEDDING_20B + EMBEDDING_ROW_20B
    )
    assert weights == 3_708_089_088  # SPEC §7: "20b ~ 3.71 GB"
    # Depth 0: the new token attends to itself only, in all 24 layers.
    assert bench.decode_bytes_per_token(cfg, 0) == weights + 24 * KV_PER_POSITION_20B
    assert bench.decode_bytes_per_token(cfg, 0) == 3_708_187_392
    parts = bench.decode_bytes_breakdown(cfg, 0)
    assert parts["attention"] == ATTENTION_20B == 1_274_406_912
    assert parts["experts"] == EXPERTS_20B == 1_270_702_080
    assert parts["router"] == ROUTER_20B == 4_425_216
    assert parts["unembedding"] == UNEMBEDDING_20B


def test_decode_bytes_with_8_bit_dense_weights() -> None:
    cfg = synthetic.CONFIGS["20b"]
    attention_weights = 24 * (2 * 4096 * 2880 + 2 * 512 * 2880)
    # 34 bytes per 32 weights instead of 64, for the attention and unembedding matrices.
    saved = (attention_weights + 201_088 * 2880) * (64 - 34) // 32
    q8 = bench.decode_bytes_per_token(cfg, 0, "q8")
    assert q8 == bench.decode_bytes_per_token(cfg, 0) - saved == 2_568_052_992
    assert bench.decode_bytes_breakdown(cfg, 0, "q8")["experts"] == EXPERTS_20B
    with pytest.raises(ValueError):
        bench.decode_bytes_per_token(cfg, 0, "q4")


def test_decode_bytes_kv_grows_with_depth_until_the_window() -> None:
    cfg = synthetic.CONFIGS["20b"]
    base = bench.decode_bytes_per_token(cfg, 0)
    # Below the 128-token window every layer reads depth + 1 positions.
    assert bench.decode_bytes_per_token(cfg, 100) == base + 24 * 100 * KV_PER_POSITION_20B
    # At depth 4096: 12 full layers read 4097 positions, 12 sliding layers read 128.
    expected_kv = (12 * 4097 + 12 * 128) * KV_PER_POSITION_20B
    weights = base - 24 * KV_PER_POSITION_20B
    assert bench.decode_bytes_per_token(cfg, 4096) == weights + expected_kv
    # A bf16 cache: half the KV bytes, the same weights.
    bf16 = bench.decode_bytes_per_token(cfg, 4096, kv_cache="bf16")
    assert bf16 == weights + expected_kv // 2
    with pytest.raises(ValueError):
        bench.decode_bytes_per_token(cfg, -1)
    with pytest.raises(ValueError):
        bench.decode_bytes_per_token(cfg, 0, kv_cache="fp8")


def test_decode_bytes_accepts_the_engine_config(tmp_path: Path) -> None:
    import gpt_oss_cpu

    path = synthetic.write_checkpoint(tmp_path / "tiny", "tiny", progress=False)
    model = gpt_oss_cpu.Model.load(path)
    for depth in (0, 5, 300):
        assert bench.decode_bytes_per_token(model.config, depth) == bench.decode_bytes_per_token(
            synthetic.CONFIGS["tiny"], depth
        )


def test_default_synthetic_dir_follows_xdg(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", "/some/cache")
    assert bench.default_synthetic_dir() == Path("/some/cache/gpt-oss-cpu/synthetic-20b")
    monkeypatch.delenv("XDG_CACHE_HOME")
    expected = Path.home() / ".cache" / "gpt-oss-cpu" / "synthetic-20b"
    assert bench.default_synthetic_dir() == expected


def test_ensure_synthetic_checkpoint_reuses_a_complete_dir(tmp_path: Path) -> None:
    done = tmp_path / "done"
    done.mkdir()
    (done / "config.json").write_text("{}")  # a finished checkpoint: nothing is rewritten
    assert bench.ensure_synthetic_checkpoint(done, progress=False) == done
    assert sorted(p.name for p in done.iterdir()) == ["config.json"]


def test_ensure_synthetic_checkpoint_writes_20b_when_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[Path, object, bool]] = []

    def fake_write(directory: Path, config: object, *, progress: bool) -> Path:
        calls.append((Path(directory), config, progress))
        return Path(directory)

    monkeypatch.setattr(synthetic, "write_checkpoint", fake_write)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "model-00000-of-00002.safetensors").write_bytes(b"")  # interrupted: no config.json
    assert bench.ensure_synthetic_checkpoint(partial, progress=False) == partial
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    bench.ensure_synthetic_checkpoint(progress=False)
    assert calls == [
        (partial, "20b", False),
        (tmp_path / "cache" / "gpt-oss-cpu" / "synthetic-20b", "20b", False),
    ]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gpt_oss_cpu", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
        timeout=300,
        check=False,
    )


def test_bench_cli_json(tiny_dir: Path) -> None:
    result = run_cli("bench", "--model", str(tiny_dir), "--pp", "16", "--tg", "4", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert set(data) >= STABLE_KEYS
    assert (data["pp"], data["tg"], data["depth"]) == (16, 4, 0)
    assert data["model"] == str(tiny_dir)
    for key in ("load_s", "first_call_s", "pp_tok_s", "tg_tok_s", "bandwidth_gbs"):
        assert data[key] > 0, key
    assert data["roofline_pct"] > 0
    assert data["roofline_tok_s"] == pytest.approx(
        data["bandwidth_gbs"] * 1e9 / data["bytes_per_token"]
    )
    assert data["roofline_pct"] == pytest.approx(100 * data["tg_tok_s"] / data["roofline_tok_s"])
    # Measured around the one decode repetition.
    assert data["bandwidth_gbs_runs"] == [data["bandwidth_gbs"]]
    # Depth 0, 4 tokens: positions 0..3 attend to 1..4 positions, 2.5 on average.
    tiny = synthetic.CONFIGS["tiny"]
    kv_per_position = 4 * tiny["num_key_value_heads"] * tiny["head_dim"] * 2 * 4  # 4 layers
    weights = bench.decode_bytes_per_token(tiny, 0) - kv_per_position
    assert data["bytes_per_token"] == weights + round(2.5 * kv_per_position)
    assert data["peak_rss_bytes"] > 0
    files = sum(p.stat().st_size for p in tiny_dir.glob("*.safetensors"))
    assert data["checkpoint_bytes"] == files > 100_000_000
    import gpt_oss_cpu

    assert data["isa"] in gpt_oss_cpu.build_info()["supported_isas"]
    assert (data["precision"], data["dense"], data["kv_cache"]) == ("exact", "bf16", "f32")
    assert data["threads"] >= 1


def test_bench_cli_table_and_options(tiny_dir: Path) -> None:
    args = ["bench", "--model", str(tiny_dir), "--pp", "8", "--tg", "3", "--depth", "130"]
    options = ("--threads", "1", "--isa", "scalar", "--precision", "fast", "--dense", "q8")
    options += ("--kv-cache", "bf16")
    result = run_cli(*args, *options, "--repetitions", "2")
    assert result.returncode == 0, result.stderr
    table = result.stdout
    build = "isa scalar, fast precision, q8 dense, bf16 KV cache, 1 thread\n"
    for needle in ("prefill pp8", "decode tg3 @ depth 130", build, "roofline"):
        assert needle in table, table
    assert run_cli("bench", "--model", str(tiny_dir / "missing")).returncode == 2
    assert run_cli("bench", "--model", str(tiny_dir), "--tg", "0").returncode == 2
