"""Matrix kernel benchmarks: ``_core.matmul_bf16`` and ``_core.matmul_mxfp4`` for every ISA and
precision (``exact``: fp32 activations; ``fast``: activations rounded to bf16 / 8 bits), and
``_core.matmul_q8`` (the ``dense="q8"`` kernel: 8-bit weights and activations) for every ISA.

Run with ``pytest benches/test_kernels.py`` (see ``benches/README.md``). Each case records its
effective weight bandwidth (``gb_s``: weight bytes / mean time) and ``gflop_s``
(``2 * T * N * K`` / mean time) in ``extra_info``. Before a kernel is timed, its output on a small
matrix of the same ``T`` and ``K`` is checked against the ``scalar`` kernel (and ``scalar``
against a float64 NumPy reference), so a broken kernel never gets a speed.

Shapes (``K = 2880``, the hidden size of gpt-oss-20b):

* ``decode``: ``T = 1``. Batch-1 decoding is a matrix-vector product that streams the weights once,
  so the matrices are several times larger than the last-level cache (bf16: 16384 x 2880 =
  94 MB; MXFP4: 65536 x 2880 = 100 MB; 8-bit: 32768 x 2880 = 100 MB) to measure streaming from
  DRAM, as in the model.
* ``prefill``: ``T = 64``, ``N = 5760`` (one expert's gate_up projection): compute-bound.

The ``fast`` kernels are checked against the ``scalar`` kernel of the same precision (which rounds
the activations the same way), and that one against NumPy on the rounded activations' error bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

_core = pytest.importorskip("gpt_oss_cpu._core")

ISAS: list[str] = list(_core.build_info()["supported_isas"])  # type: ignore[arg-type]
PRECISIONS = ["exact", "fast"]
K = 2880
CHECK_ROWS = 96  # rows of the small matrices used for the correctness checks

# FP4 E2M1 values in code order (SPEC §3.1).
FP4 = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
)


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    rows_bf16: int
    rows_mxfp4: int
    rows_q8: int


SHAPES = [Shape("decode", 1, 16384, 65536, 32768), Shape("prefill", 64, 5760, 5760, 5760)]


def random_bf16(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """bf16 bit patterns (uint16) of N(0, 1/sqrt(K)) values."""
    values = rng.standard_normal(shape, dtype=np.float32) / np.float32(np.sqrt(K))
    return (values.view(np.uint32) >> 16).astype(np.uint16)


def random_mxfp4(rng: np.random.Generator, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Random MXFP4 ``blocks [rows, K/32, 16]`` and ``scales [rows, K/32]`` (2^-9 .. 2^-5)."""
    blocks = rng.integers(0, 256, size=(rows, K // 32, 16), dtype=np.uint8)
    scales = rng.integers(118, 123, size=(rows, K // 32), dtype=np.uint8)
    return blocks, scales


def bf16_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    weights = (w.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return x.astype(np.float64) @ weights.T


def mxfp4_reference(x: np.ndarray, blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    # Byte j of a block holds element 2j in its low nibble and 2j+1 in its high nibble (SPEC §3.3).
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(blocks.shape[0], -1, 32)
    weights = FP4[codes] * np.exp2(scales.astype(np.float64) - 127.0)[..., None]
    return x.astype(np.float64) @ weights.reshape(blocks.shape[0], -1).T


def assert_close(actual: np.ndarray, expected: np.ndarray, what: str, rtol: float = 1e-5) -> None:
    # fp32 sums of 2880 products in different orders: relative 1e-5, plus an absolute term for
    # outputs that cancel to near zero (a wrong kernel is off by the size of the outputs).
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * scale, err_msg=what)


# Rounding the activations (bf16: 2^-9 relative; 8 bits: 1/254 of the block maximum) moves each
# output by a fraction of its magnitude that averages out over 2880 products: 1e-2 of the largest
# output bounds it with room, and a wrong kernel is off by the size of the outputs.
ROUNDED_RTOL = 1e-2

_checked: set[tuple[str, str, str, int]] = set()


def check_against_scalar(kind: str, isa: str, precision: str, tokens: int) -> None:
    """Once per case: ``isa`` agrees with ``scalar`` at ``precision``, ``scalar`` with NumPy."""
    if (kind, isa, precision, tokens) in _checked:
        return
    rng = np.random.default_rng(1234 + tokens)
    x = rng.standard_normal((tokens, K), dtype=np.float32)
    rtol = 1e-5 if precision == "exact" else ROUNDED_RTOL
    if kind == "bf16":
        w = random_bf16(rng, (CHECK_ROWS, K))
        expected = _core.matmul_bf16(x, w, "scalar", precision)
        assert_close(expected, bf16_reference(x, w), "scalar bf16 vs numpy", rtol)
        actual = _core.matmul_bf16(x, w, isa, precision)
    else:
        blocks, scales = random_mxfp4(rng, CHECK_ROWS)
        expected = _core.matmul_mxfp4(x, blocks, scales, "scalar", precision)
        assert_close(expected, mxfp4_reference(x, blocks, scales), "scalar mxfp4 vs numpy", rtol)
        actual = _core.matmul_mxfp4(x, blocks, scales, isa, precision)
    assert actual.shape == (tokens, CHECK_ROWS)
    assert_close(actual, expected, f"{isa} {precision} {kind} vs scalar")
    _checked.add((kind, isa, precision, tokens))


def record(benchmark: Any, weight_bytes: int, flops: int) -> None:
    """Adds GB/s and GFLOP/s, from the mean time, to the benchmark's ``extra_info``."""
    benchmark.extra_info["weight_bytes"] = weight_bytes
    benchmark.extra_info["flops"] = flops
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    mean = benchmark.stats.stats.mean
    benchmark.extra_info["gb_s"] = round(weight_bytes / mean / 1e9, 2)
    benchmark.extra_info["gflop_s"] = round(flops / mean / 1e9, 2)


def run(benchmark: Any, fn: Callable[[], np.ndarray], tokens: int, rows: int) -> np.ndarray:
    result = benchmark(fn)
    assert result.shape == (tokens, rows)
    assert np.isfinite(result).all()
    return result


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_matmul_bf16(benchmark: Any, shape: Shape, isa: str, precision: str) -> None:
    check_against_scalar("bf16", isa, precision, shape.tokens)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((shape.tokens, K), dtype=np.float32)
    w = random_bf16(rng, (shape.rows_bf16, K))
    benchmark.group = f"bf16 {shape.name} T={shape.tokens} N={shape.rows_bf16} K={K}"
    run(
        benchmark,
        lambda: _core.matmul_bf16(x, w, isa, precision),
        shape.tokens,
        shape.rows_bf16,
    )
    record(benchmark, w.nbytes, 2 * shape.tokens * shape.rows_bf16 * K)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_matmul_mxfp4(benchmark: Any, shape: Shape, isa: str, precision: str) -> None:
    check_against_scalar("mxfp4", isa, precision, shape.tokens)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((shape.tokens, K), dtype=np.float32)
    blocks, scales = random_mxfp4(rng, shape.rows_mxfp4)
    benchmark.group = f"mxfp4 {shape.name} T={shape.tokens} N={shape.rows_mxfp4} K={K}"
    run(
        benchmark,
        lambda: _core.matmul_mxfp4(x, blocks, scales, isa, precision),
        shape.tokens,
        shape.rows_mxfp4,
    )
    record(benchmark, blocks.nbytes + scales.nbytes, 2 * shape.tokens * shape.rows_mxfp4 * K)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name)
def test_matmul_q8(benchmark: Any, shape: Shape, isa: str) -> None:
    check_q8_against_scalar(isa, shape.tokens)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((shape.tokens, K), dtype=np.float32)
    weights = _core.quantize_q8(random_bf16(rng, (shape.rows_q8, K)))
    benchmark.group = f"q8 {shape.name} T={shape.tokens} N={shape.rows_q8} K={K}"
    run(
        benchmark,
        lambda: _core.matmul_q8(x, weights, isa),
        shape.tokens,
        shape.rows_q8,
    )
    record(benchmark, weights.nbytes, 2 * shape.tokens * shape.rows_q8 * K)


def check_q8_against_scalar(isa: str, tokens: int) -> None:
    """Once per case: ``isa`` agrees with ``scalar``, and ``scalar`` is within the 8-bit rounding
    of both operands (a few % of ``|x|·|w|``) of the exact bf16 product."""
    if ("q8", isa, "fast", tokens) in _checked:
        return
    rng = np.random.default_rng(4321 + tokens)
    x = rng.standard_normal((tokens, K), dtype=np.float32)
    w = random_bf16(rng, (CHECK_ROWS, K))
    weights = _core.quantize_q8(w)
    expected = _core.matmul_q8(x, weights, "scalar")
    exact = bf16_reference(x, w)
    magnitude = bf16_reference(np.abs(x), w & 0x7FFF)
    assert np.all(np.abs(expected - exact) <= 0.02 * magnitude), "scalar q8 vs numpy"
    actual = _core.matmul_q8(x, weights, isa)
    assert actual.shape == (tokens, CHECK_ROWS)
    assert_close(actual, expected, f"{isa} q8 vs scalar")
    _checked.add(("q8", isa, "fast", tokens))
