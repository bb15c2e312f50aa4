"""dense="q8": attention and unembedding requantized to 8 bits, cached in a file that later loads
map in place. Its accuracy against the golden data is in test_reference.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gpt_oss_cpu
import numpy as np
import pytest

IDS = np.arange(1, 40) * 7 % 500


def cache_files(cache: Path) -> list[Path]:
    return sorted((cache / "gpt-oss-cpu" / "dense-q8").glob("*.bin"))


def load_q8(model_dir: Path) -> gpt_oss_cpu.Model:
    return gpt_oss_cpu.Model.load(str(model_dir), precision="fast", dense="q8")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_first_load_writes_the_cache_and_later_loads_read_it(tiny_a_dir: Path, cache: Path):
    first = load_q8(tiny_a_dir)
    assert first.dense == "q8"
    [file] = cache_files(cache)
    assert file.read_bytes()[:8] == b"GOCPUQ8\0"
    written = file.stat().st_mtime_ns
    logits = first.forward(IDS)
    second = load_q8(tiny_a_dir)
    assert file.stat().st_mtime_ns == written, "a valid cache file was rewritten"
    np.testing.assert_array_equal(second.forward(IDS), logits)
    # The 8-bit weights really are in use.
    bf16 = gpt_oss_cpu.Model.load(str(tiny_a_dir), precision="fast").forward(IDS)
    assert np.abs(bf16 - logits).max() > 1e-4


@pytest.mark.parametrize("damage", ["header", "truncated", "empty"])
def test_a_damaged_cache_file_is_rebuilt(tiny_a_dir: Path, cache: Path, damage: str):
    logits = load_q8(tiny_a_dir).forward(IDS)
    [file] = cache_files(cache)
    size = file.stat().st_size
    if damage == "header":
        with file.open("r+b") as f:
            f.write(b"NOTQ8!!!")
    elif damage == "truncated":
        with file.open("r+b") as f:
            f.truncate(size - 4096)
    else:
        file.write_bytes(b"")
    np.testing.assert_array_equal(load_q8(tiny_a_dir).forward(IDS), logits)
    [rebuilt] = cache_files(cache)
    assert rebuilt.stat().st_size == size and rebuilt.read_bytes()[:8] == b"GOCPUQ8\0"


def test_without_a_writable_cache_the_weights_are_built_in_memory(
    tiny_a_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    logits = load_q8(tiny_a_dir).forward(IDS)
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    np.testing.assert_array_equal(load_q8(tiny_a_dir).forward(IDS), logits)


def test_q8_needs_fast_precision_and_a_known_format(tiny_a_dir: Path):
    with pytest.raises(gpt_oss_cpu.InputError, match='needs precision="fast"'):
        gpt_oss_cpu.Model.load(str(tiny_a_dir), dense="q8")
    with pytest.raises(gpt_oss_cpu.InputError, match="dense: expected one of bf16, q8"):
        gpt_oss_cpu.Model.load(str(tiny_a_dir), precision="fast", dense="q4")  # type: ignore[arg-type]


def test_q8_needs_an_attention_width_in_whole_blocks(tmp_path: Path):
    from gpt_oss_cpu import synthetic

    config = {
        "hidden_size": 64,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 3,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "vocab_size": 128,
    }
    path = synthetic.write_checkpoint(tmp_path / "odd", config, progress=False)
    with pytest.raises(gpt_oss_cpu.InputError, match="not a multiple of 32"):
        gpt_oss_cpu.Model.load(str(path), precision="fast", dense="q8")
    assert gpt_oss_cpu.Model.load(str(path), precision="fast").forward([1, 2, 3]).shape == (3, 128)


def test_abandoned_temporary_files_are_removed_by_the_next_build(tiny_a_dir: Path, cache: Path):
    import os

    load_q8(tiny_a_dir)
    [file] = cache_files(cache)
    key = file.stem
    stale = file.parent / f".{key}.99999.0.tmp"
    recent = file.parent / f".{key}.99999.1.tmp"
    for path in (stale, recent):
        path.write_bytes(b"partial")
    os.utime(stale, (0, 1_000_000_000))  # 2001
    file.unlink()  # forces a build
    load_q8(tiny_a_dir)
    assert not stale.exists()
    assert recent.exists()  # it may belong to a build still running


def test_the_q8_kernel_binding_matches_the_bf16_product_and_checks_shapes() -> None:
    from gpt_oss_cpu import _core

    rng = np.random.default_rng(3)
    w = (rng.standard_normal((40, 96), dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    x = rng.standard_normal((3, 96), dtype=np.float32)
    weights = _core.quantize_q8(w)
    assert (weights.shape, weights.nbytes) == ((40, 96), 40 * 96 + 2 * 40 * 3)
    exact = _core.matmul_bf16(x, w, "scalar")
    magnitude = _core.matmul_bf16(np.abs(x), w & 0x7FFF, "scalar")
    for isa in gpt_oss_cpu.build_info()["supported_isas"]:
        got = _core.matmul_q8(x, weights, isa)
        # Both operands rounded to 8 bits per 32: within a few % of |x|·|w|, not equal.
        assert np.all(np.abs(got - exact) <= 0.02 * magnitude), isa
        assert np.abs(got - exact).max() > 0, isa
    with pytest.raises(gpt_oss_cpu.InputError, match="multiple of 32"):
        _core.quantize_q8(w[:, :40])
    with pytest.raises(gpt_oss_cpu.InputError, match="do not fit"):
        _core.matmul_q8(x[:, :64], weights)
    with pytest.raises(TypeError):
        _core.matmul_q8(x, np.zeros((40, 96), np.uint8))  # type: ignore[arg-type]


def test_a_new_cache_file_replaces_those_of_older_format_versions(tiny_a_dir: Path, cache: Path):
    folder = cache / "gpt-oss-cpu" / "dense-q8"
    folder.mkdir(parents=True)
    old = folder / "0123456789abcdef.bin"
    old.write_bytes(b"GOCPUQ8\0" + (1).to_bytes(4, "little") + bytes(52))
    unrelated = folder / "notes.bin"
    unrelated.write_bytes(b"something else entirely")
    load_q8(tiny_a_dir)
    assert not old.exists()
    assert unrelated.exists()
    assert len(cache_files(cache)) == 2  # the new file and the unrelated one


def test_progress_follows_the_first_build_only(tiny_a_dir: Path, cache: Path):
    reports: list[tuple[int, int]] = []

    def progress(done: int, total: int) -> None:
        reports.append((done, total))

    gpt_oss_cpu.Model.load(tiny_a_dir, precision="fast", dense="q8", progress=progress)
    [file] = cache_files(cache)
    total = file.stat().st_size
    assert reports and all(t == total for _, t in reports)
    done = [d for d, _ in reports]
    assert done == sorted(done) and done[-1] == total
    reports.clear()
    gpt_oss_cpu.Model.load(tiny_a_dir, precision="fast", dense="q8", progress=progress)
    assert reports == [], "mapping the cache reported a build"
    gpt_oss_cpu.Model.load(tiny_a_dir, progress=progress)
    assert reports == [], "a bf16 load reported a build"


@pytest.mark.parametrize("writable", [True, False])
def test_an_exception_from_progress_cancels_the_build(
    tiny_a_dir: Path, cache: Path, writable: bool, monkeypatch: pytest.MonkeyPatch
):
    if not writable:
        blocker = cache.parent / "not-a-directory"
        blocker.write_text("")
        monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))

    class Stop(Exception):
        pass

    def stop(done: int, total: int) -> None:
        raise Stop(f"{done} of {total}")

    with pytest.raises(Stop, match=r"^\d+ of \d+$"):
        gpt_oss_cpu.Model.load(tiny_a_dir, precision="fast", dense="q8", progress=stop)
    if writable:
        directory = cache / "gpt-oss-cpu" / "dense-q8"
        assert list(directory.iterdir()) == [], "a cancelled build left files behind"
    assert load_q8(tiny_a_dir).dense == "q8"


@pytest.mark.skipif(sys.platform == "win32", reason="needs SIGINT")
def test_ctrl_c_during_the_build_cancels_it(tiny_a_dir: Path, cache: Path):
    code = """
import os, signal, sys, gpt_oss_cpu
reports = []
def progress(done, total):
    reports.append(done)
    if len(reports) == 2:
        os.kill(os.getpid(), signal.SIGINT)
try:
    gpt_oss_cpu.Model.load(sys.argv[1], precision="fast", dense="q8", progress=progress)
except KeyboardInterrupt:
    print("interrupted after", len(reports), "reports")
"""
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    run = subprocess.run(
        [sys.executable, "-c", code, str(tiny_a_dir)], env=env, capture_output=True, text=True
    )
    assert run.stdout.strip() == "interrupted after 2 reports", run.stderr
    assert list((cache / "gpt-oss-cpu" / "dense-q8").iterdir()) == []


def test_progress_must_be_callable(tiny_a_dir: Path):
    with pytest.raises(TypeError, match="progress must be callable, found int"):
        gpt_oss_cpu.Model.load(tiny_a_dir, progress=42)  # type: ignore[arg-type]
