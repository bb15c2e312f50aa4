"""End-to-end speed measurement of one checkpoint: load, prefill, decode, and the memory roofline.

:func:`run_benchmark` does everything ``gpt-oss-cpu bench`` reports, in one process:

1. load the checkpoint (``Model.load``) and time it;
2. run one short forward pass (8 tokens) and time it separately: the first call pays for paging
   the memory-mapped weights in, which the later measurements should not;
3. prefill: append ``pp`` random token ids at once to a fresh session (tokens per second);
4. decode: fill a session with ``depth`` tokens (not timed), then append ``tg`` tokens one at a
   time (tokens per second at that depth);
5. compare decoding against the *roofline*: batch-1 decoding must stream every active weight once
   per token, so it cannot run faster than ``bandwidth / bytes_per_token``
   (:func:`decode_bytes_per_token`, computed from the config). The read bandwidth is measured
   by reading weights that decoding reads (the unembedding) once before the first decoded token
   and again after every ``BANDWIDTH_EVERY``, because a shared host's bandwidth drifts by tens of
   percent from minute to minute: a ratio is only meaningful between figures measured
   together.

Token ids are random (seeded), so any checkpoint works, including the synthetic ones written by
:mod:`gpt_oss_cpu.synthetic`; a random-weight model is exactly as fast as the real one.

Example:
    >>> from gpt_oss_cpu import bench, synthetic
    >>> result = bench.run_benchmark("/tmp/gpt-oss-tiny", pp=16, tg=4)   # doctest: +SKIP
    >>> result.tg_tok_s > 0                                              # doctest: +SKIP
    True
    >>> bench.decode_bytes_per_token(synthetic.CONFIGS["20b"], depth=0)
    3708187392
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from . import synthetic

if TYPE_CHECKING:
    from ._core import Config
    from .model import IsaName

__all__ = [
    "BenchResult",
    "decode_bytes_breakdown",
    "decode_bytes_per_token",
    "default_synthetic_dir",
    "ensure_synthetic_checkpoint",
    "format_table",
    "peak_rss_bytes",
    "run_benchmark",
]

#: Tokens of the warm-up forward pass (its time is reported as ``first_call_s``).
WARMUP_TOKENS = 8
#: Decoded tokens between two passes of the bandwidth measurement.
BANDWIDTH_EVERY = 16
#: The depth prefix is appended in chunks of this many tokens (bounds activation memory).
DEPTH_CHUNK = 512

_BF16 = 2  # bytes per bf16 parameter
_KV_ITEM = 4  # float32 cached keys and values (the default kv_cache)


# ------------------------------------------------------------------------- bytes per token


def _get(config: Config | Mapping[str, Any], key: str) -> Any:
    if isinstance(config, Mapping):
        return config[key]
    return getattr(config, key)


def decode_bytes_breakdown(
    config: Config | Mapping[str, Any],
    depth: int,
    dense: str = "bf16",
    kv_cache: str = "f32",
) -> dict[str, int]:
    """Bytes one decoded token reads, by component (see :func:`decode_bytes_per_token`).

    Keys: ``attention`` (q/k/v/o weights and biases, sinks), ``router``, ``experts`` (the top-k
    experts' MXFP4 blocks, scales and bf16 biases), ``norms``, ``unembedding``, ``embedding``
    (one row) and ``kv_cache``. With ``dense="q8"`` the attention and unembedding matrices count
    34 bytes per 32 weights (8-bit codes and a bf16 scale) instead of 64; with
    ``kv_cache="bf16"`` the cached keys and values count 2 bytes each instead of 4.

    Example:
        >>> parts = decode_bytes_breakdown(synthetic.CONFIGS["20b"], depth=0)
        >>> parts["experts"] // 24 // 4    # SPEC §3.5: bytes per expert
        13236480
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    if dense not in ("bf16", "q8"):
        raise ValueError(f"dense must be 'bf16' or 'q8', got {dense!r}")
    if kv_cache not in ("f32", "bf16"):
        raise ValueError(f"kv_cache must be 'f32' or 'bf16', got {kv_cache!r}")
    hidden = int(_get(config, "hidden_size"))
    inter = int(_get(config, "intermediate_size"))
    head_dim = int(_get(config, "head_dim"))
    heads = int(_get(config, "num_attention_heads"))
    kv_heads = int(_get(config, "num_key_value_heads"))
    experts = int(_get(config, "num_local_experts"))
    top_k = int(_get(config, "num_experts_per_tok"))
    vocab = int(_get(config, "vocab_size"))
    window = int(_get(config, "sliding_window"))
    layer_types = list(_get(config, "layer_types"))
    layers = int(_get(config, "num_hidden_layers"))
    if len(layer_types) != layers:
        raise ValueError(f"layer_types lists {len(layer_types)} layers, expected {layers}")

    q_width, kv_width = heads * head_dim, kv_heads * head_dim
    attention_weights = 2 * q_width * hidden + 2 * kv_width * hidden  # q, k, v, o
    attention_vectors = q_width + 2 * kv_width + hidden + heads  # biases, sinks

    def dense_bytes(weights: int) -> int:
        return weights * _BF16 if dense == "bf16" else weights // 32 * (32 + 2)

    router_params = experts * hidden + experts

    def mxfp4_bytes(out: int, fan_in: int) -> int:
        groups = fan_in // 32
        return out * groups * 16 + out * groups + out * _BF16  # blocks + scales + bias

    expert_bytes = mxfp4_bytes(2 * inter, hidden) + mxfp4_bytes(hidden, inter)

    # The token being decoded attends to every cached position and to itself; a sliding layer
    # sees the last `window` positions including itself (SPEC §4.3.4).
    attended = depth + 1
    kv_item = _KV_ITEM if kv_cache == "f32" else _BF16
    kv_position_bytes = kv_item * kv_width * 2  # K and V
    kv_bytes = sum(
        kv_position_bytes * (min(attended, window) if kind == "sliding_attention" else attended)
        for kind in layer_types
    )
    return {
        "attention": layers * (dense_bytes(attention_weights) + attention_vectors * _BF16),
        "router": layers * router_params * _BF16,
        "experts": layers * top_k * expert_bytes,
        "norms": (2 * layers + 1) * hidden * _BF16,
        "unembedding": dense_bytes(vocab * hidden),
        "embedding": hidden * _BF16,
        "kv_cache": kv_bytes,
    }


def decode_bytes_per_token(
    config: Config | Mapping[str, Any],
    depth: int,
    dense: str = "bf16",
    kv_cache: str = "f32",
) -> int:
    """Bytes of weights and KV cache that decoding one token reads, computed from the config.

    Batch-1 decoding is memory-bound: every active parameter is streamed from memory once per
    token, so ``bandwidth / decode_bytes_per_token`` is the speed limit (the roofline). Counted:
    per layer the attention weights and biases (q, k, v, o; bf16) and sinks, the router, the
    ``num_experts_per_tok`` chosen experts in MXFP4 (blocks, scales, bf16 biases), the two
    RMSNorm scales; then the final norm, the unembedding (``vocab x hidden`` bf16) and one
    embedding row. The KV cache adds K and V (float32, or bf16 with ``kv_cache="bf16"``) for every
    position the new token attends to: ``depth`` cached positions plus itself, at most
    ``sliding_window`` in sliding layers.

    Args:
        config: a :class:`gpt_oss_cpu.Config` or a ``config.json`` dict (Hugging Face keys).
        depth: tokens already in the cache when the token is decoded.
        dense: the format of the attention and unembedding matrices (``"bf16"`` or ``"q8"``).
        kv_cache: the element type of the cached keys and values (``"f32"`` or ``"bf16"``).

    Example:
        >>> decode_bytes_per_token(synthetic.CONFIGS["20b"], depth=0)    # ~3.71 GB
        3708187392
    """
    return sum(decode_bytes_breakdown(config, depth, dense, kv_cache).values())


# ------------------------------------------------------------------------------- checkpoint


def default_synthetic_dir() -> Path:
    """Where ``gpt-oss-cpu bench`` keeps its synthetic 20b checkpoint.

    ``$XDG_CACHE_HOME/gpt-oss-cpu/synthetic-20b``, or ``~/.cache/gpt-oss-cpu/synthetic-20b``.
    """
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "gpt-oss-cpu" / "synthetic-20b"


def ensure_synthetic_checkpoint(
    directory: str | os.PathLike[str] | None = None, *, progress: bool = True
) -> Path:
    """Returns a synthetic gpt-oss-20b checkpoint directory, writing it (13.8 GB) if needed.

    A directory holding ``config.json`` is complete (the writer writes it last); anything else
    is (re)written with :func:`gpt_oss_cpu.synthetic.write_checkpoint`, with a progress bar on
    stderr when ``progress`` is true.
    """
    path = Path(directory) if directory is not None else default_synthetic_dir()
    if (path / "config.json").is_file():
        return path
    if progress:
        print(f"writing a synthetic gpt-oss-20b checkpoint to {path} (once)", file=sys.stderr)
    return synthetic.write_checkpoint(path, "20b", progress=progress)


def _checkpoint_file_bytes(path: Path) -> int:
    """On-disk size of the checkpoint's safetensors files."""
    return sum(p.stat().st_size for p in path.glob("*.safetensors") if p.is_file())


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far, in bytes."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------- result


@dataclass
class BenchResult:
    """Everything ``gpt-oss-cpu bench`` measures. Speeds are medians over the repetitions.

    Attributes:
        load_s: ``Model.load`` wall time.
        first_call_s: wall time of the first forward pass (``WARMUP_TOKENS`` tokens), which pages
            the weights in.
        bandwidth_gbs: memory read bandwidth, GB/s (1e9 bytes): the median over the decode
            repetitions of the mean of the read passes interleaved with each.
        pp, pp_tok_s: prompt length and prefill speed.
        tg, tg_tok_s, depth: decoded tokens, decode speed, tokens in the cache before decoding.
        bytes_per_token: :func:`decode_bytes_per_token` averaged over the decoded positions
            (``bytes_breakdown`` splits it by component).
        roofline_tok_s: ``bandwidth / bytes_per_token``; ``roofline_pct`` is
            ``100 * tg_tok_s / roofline_tok_s``.
        peak_rss_bytes: peak resident memory of the process (mapped weights included).
        checkpoint_bytes: size of the ``*.safetensors`` files.
        isa, precision, dense, kv_cache, threads: kernel instruction set, activation precision,
            dense weight format, KV cache element type and compute threads of the loaded model.
        model: the checkpoint directory.
        version: gpt-oss-cpu version of the extension.
        repetitions: how many times prefill and decode were measured.
        pp_tok_s_runs, tg_tok_s_runs, bandwidth_gbs_runs: each repetition's figure.
    """

    load_s: float
    first_call_s: float
    bandwidth_gbs: float
    pp: int
    pp_tok_s: float
    tg: int
    tg_tok_s: float
    depth: int
    bytes_per_token: int
    roofline_tok_s: float
    roofline_pct: float
    peak_rss_bytes: int
    checkpoint_bytes: int
    isa: str
    threads: int
    precision: str
    kv_cache: str
    dense: str
    model: str
    version: str = "unknown"
    repetitions: int = 1
    pp_tok_s_runs: list[float] = field(default_factory=list)
    tg_tok_s_runs: list[float] = field(default_factory=list)
    bandwidth_gbs_runs: list[float] = field(default_factory=list)
    bytes_breakdown: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (the keys of ``gpt-oss-cpu bench --json``)."""
        return asdict(self)


# -------------------------------------------------------------------------------------- run


def run_benchmark(
    model_dir: str | os.PathLike[str],
    *,
    pp: int = 512,
    tg: int = 128,
    depth: int = 0,
    threads: int | None = None,
    isa: IsaName | None = None,
    precision: Literal["exact", "fast"] = "exact",
    dense: Literal["bf16", "q8"] = "bf16",
    kv_cache: Literal["f32", "bf16"] = "f32",
    repetitions: int = 1,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    load_progress: Callable[[int, int], object] | None = None,
) -> BenchResult:
    """Loads ``model_dir`` and measures load, prefill, decode and the decode roofline.

    Args:
        model_dir: checkpoint directory (anything ``Model.load`` accepts).
        pp: prompt tokens appended at once for the prefill measurement.
        tg: tokens decoded one at a time.
        depth: tokens in the cache before decoding starts (filled untimed).
        threads, isa, precision, dense, kv_cache: passed to ``Model.load``.
        repetitions: prefill and decode are measured this many times; medians are reported.
        seed: seed of the random token ids.
        log: called with a short message before each step (progress on a terminal).
        load_progress: ``Model.load``'s ``progress`` (called while the first ``dense="q8"``
            load builds the 8-bit weights, which ``load_s`` then includes).

    Raises:
        ValueError: non-positive ``pp``, ``tg`` or ``repetitions``, or negative ``depth``.
        GptOssError: the checkpoint cannot be loaded (see ``Model.load``).

    Example:
        >>> r = run_benchmark("/tmp/gpt-oss-tiny", pp=16, tg=4)   # doctest: +SKIP
        >>> list(r.to_dict())[:3]                                 # doctest: +SKIP
        ['load_s', 'first_call_s', 'bandwidth_gbs']
    """
    from . import _core
    from .model import Model

    if pp < 1 or tg < 1 or repetitions < 1:
        raise ValueError(f"pp, tg and repetitions must be >= 1, got {pp}, {tg}, {repetitions}")
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    say = log or (lambda _message: None)

    say("loading")
    t0 = time.perf_counter()
    model = Model.load(
        model_dir,
        threads=threads,
        isa=isa,
        precision=precision,
        dense=dense,
        kv_cache=kv_cache,
        progress=load_progress,
    )
    load_s = time.perf_counter() - t0
    config = model.config
    vocab = int(config.vocab_size)
    rng = np.random.default_rng(seed)

    def random_ids(n: int) -> np.ndarray:
        return rng.integers(0, vocab, size=n, dtype=np.int64)

    say(f"first call ({WARMUP_TOKENS} tokens)")
    warmup_ids = random_ids(WARMUP_TOKENS)
    with model.session(max_context=WARMUP_TOKENS) as session:
        inner = session._session
        t0 = time.perf_counter()
        inner.append(warmup_ids, False)
        first_call_s = time.perf_counter() - t0

    pp_runs: list[float] = []
    for rep in range(repetitions):
        say(f"prefill {pp} tokens ({rep + 1}/{repetitions})")
        prompt = random_ids(pp)
        with model.session(max_context=pp) as session:
            inner = session._session
            t0 = time.perf_counter()
            inner.append(prompt, False)
            pp_runs.append(pp / (time.perf_counter() - t0))

    tg_runs: list[float] = []
    bandwidth_runs: list[float] = []
    with model.session(max_context=depth + tg) as session:
        inner = session._session
        if depth:
            say(f"filling the cache with {depth} tokens")
            prefix = random_ids(depth)
            for start in range(0, depth, DEPTH_CHUNK):
                inner.append(prefix[start : start + DEPTH_CHUNK], False)
        for rep in range(repetitions):
            say(f"decode {tg} tokens at depth {depth} ({rep + 1}/{repetitions})")
            inner.truncate(depth)
            steps = [np.array([t], dtype=np.int64) for t in random_ids(tg)]
            # One bandwidth pass before the first token and after every BANDWIDTH_EVERY: the
            # same minutes' conditions as the decoding, whose time excludes the passes.
            passes = [model._engine.measure_read_bandwidth(1)]
            decoding_s = 0.0
            for first in range(0, tg, BANDWIDTH_EVERY):
                t0 = time.perf_counter()
                for step in steps[first : first + BANDWIDTH_EVERY]:
                    inner.append(step, False)
                decoding_s += time.perf_counter() - t0
                passes.append(model._engine.measure_read_bandwidth(1))
            tg_runs.append(tg / decoding_s)
            bandwidth_runs.append(statistics.fmean(passes))

    peak_rss = peak_rss_bytes()

    # Decoding runs at positions depth .. depth + tg - 1: average the KV bytes over them (the
    # weights are the same for every token).
    positions = [
        decode_bytes_breakdown(config, depth + i, model.dense, model.kv_cache) for i in range(tg)
    ]
    breakdown = dict(positions[0])
    breakdown["kv_cache"] = round(statistics.fmean(p["kv_cache"] for p in positions))
    bytes_per_token = sum(breakdown.values())
    tg_tok_s = statistics.median(tg_runs)
    bandwidth = statistics.median(bandwidth_runs)
    roofline_tok_s = bandwidth / bytes_per_token
    return BenchResult(
        load_s=load_s,
        first_call_s=first_call_s,
        bandwidth_gbs=bandwidth / 1e9,
        pp=pp,
        pp_tok_s=statistics.median(pp_runs),
        tg=tg,
        tg_tok_s=tg_tok_s,
        depth=depth,
        bytes_per_token=bytes_per_token,
        roofline_tok_s=roofline_tok_s,
        roofline_pct=100.0 * tg_tok_s / roofline_tok_s,
        peak_rss_bytes=peak_rss,
        checkpoint_bytes=_checkpoint_file_bytes(model.path),
        isa=model.isa,
        precision=model.precision,
        kv_cache=model.kv_cache,
        dense=model.dense,
        threads=model.threads,
        model=str(model.path),
        version=str(_core.build_info().get("version", "unknown")),
        repetitions=repetitions,
        pp_tok_s_runs=pp_runs,
        tg_tok_s_runs=tg_runs,
        bandwidth_gbs_runs=[b / 1e9 for b in bandwidth_runs],
        bytes_breakdown=breakdown,
    )


def format_table(result: BenchResult) -> str:
    """The human-readable report ``gpt-oss-cpu bench`` prints.

    Example:
        >>> print(format_table(result))   # doctest: +SKIP
    """
    r = result
    b = r.bytes_breakdown
    weights = sum(v for k, v in b.items() if k != "kv_cache")

    def runs(values: list[float]) -> str:
        if len(values) < 2:
            return ""
        return "  [" + ", ".join(f"{v:.2f}" for v in values) + "]"

    threads = f"{r.threads} thread" + ("s" if r.threads != 1 else "")
    rows = [
        ("model", r.model),
        (
            "build",
            f"gpt-oss-cpu {r.version}, isa {r.isa}, {r.precision} precision, "
            f"{r.dense} dense, {r.kv_cache} KV cache, {threads}",
        ),
        ("load", f"{r.load_s:.3f} s"),
        ("first call", f"{r.first_call_s:.3f} s ({WARMUP_TOKENS} tokens)"),
        (f"prefill pp{r.pp}", f"{r.pp_tok_s:.2f} tok/s{runs(r.pp_tok_s_runs)}"),
        (
            f"decode tg{r.tg} @ depth {r.depth}",
            f"{r.tg_tok_s:.2f} tok/s ({1000 / r.tg_tok_s:.1f} ms/token){runs(r.tg_tok_s_runs)}",
        ),
        (
            "memory bandwidth",
            f"{r.bandwidth_gbs:.2f} GB/s (read, {threads}){runs(r.bandwidth_gbs_runs)}",
        ),
        (
            "bytes per token",
            f"{r.bytes_per_token / 1e9:.4f} GB (weights {weights / 1e9:.4f} GB, "
            f"KV cache {b.get('kv_cache', 0) / 1e6:.2f} MB)",
        ),
        ("decode roofline", f"{r.roofline_tok_s:.2f} tok/s"),
        ("% of roofline", f"{r.roofline_pct:.1f} %"),
        ("peak RSS", f"{r.peak_rss_bytes / 2**30:.2f} GiB"),
        ("checkpoint", f"{r.checkpoint_bytes / 2**30:.2f} GiB on disk"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
