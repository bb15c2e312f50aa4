"""Proof of correctness: the engine against the golden reference outputs in ``tests/data/models``.

Each golden checkpoint (tiny-a, tiny-b) was evaluated offline by transformers in float32 with the
MXFP4 experts dequantised exactly; its README gives the reference's own error against a float64
evaluation (~1e-5 on logits) and the smallest top-1/top-2 logit gap (>= 0.0085). A float32 engine is
therefore held to max |diff| <= 1e-3 on every logit, identical argmax everywhere, identical greedy
tokens, and the same routed experts.

Besides the golden comparisons, this file checks engine self-consistency: the original/ layout,
KV-cache sessions (chunking, truncation, reset, overflow), sampling and thread-count invariance.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import gpt_oss_cpu
import numpy as np
import pytest
from gpt_oss_cpu import ContextOverflowError

LOGIT_TOL = 1e-3  # vs golden, see module docstring
ROUTER_WEIGHT_TOL = 1e-4  # softmax over the top-k router logits, values in (0, 1]
LAYER_REL_TOL = 1e-3  # residual stream, relative to the golden RMS of that layer (see test)
SELF_TOL = 1e-4  # same engine, same tokens, different cache chunking
THREADS_TOL = 1e-5  # same engine, different thread count

Report = Callable[[str, str, float, float], None]


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute elementwise difference in float64; the shapes must match exactly."""
    a = np.asarray(a)
    b = np.asarray(b)
    assert a.shape == b.shape, f"shape {a.shape} != golden {b.shape}"
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))


def assert_logits_match(
    got: np.ndarray, want: np.ndarray, tol: float, what: str, report: Report, model_name: str
) -> None:
    """Check dtype, max |diff| <= tol and identical argmax per row; record the diff."""
    got = np.asarray(got)
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}, expected float32"
    assert np.all(np.isfinite(got)), f"{what}: non-finite logits"
    diff = max_abs_diff(got, want)
    report(model_name, what, diff, tol)
    assert diff <= tol, f"{what}: max |diff| {diff:.3e} > {tol:.0e}"
    got2 = got.reshape(-1, got.shape[-1])
    want2 = want.reshape(-1, want.shape[-1])
    bad = np.flatnonzero(got2.argmax(-1) != want2.argmax(-1))
    assert bad.size == 0, (
        f"{what}: argmax differs at rows {bad.tolist()} "
        f"(got {got2.argmax(-1)[bad].tolist()}, want {want2.argmax(-1)[bad].tolist()})"
    )


# --------------------------------------------------------------------------------------------
# Golden data sanity (the suite must not silently run on nothing)
# --------------------------------------------------------------------------------------------


def test_golden_models_present(data_dir: Path) -> None:
    names = sorted(p.name for p in (data_dir / "models").iterdir() if p.is_dir())
    assert {"tiny-a", "tiny-b"} <= set(names), names
    for name in names:
        for f in ("config.json", "model.safetensors", "reference.npz"):
            assert (data_dir / "models" / name / f).is_file(), f"{name}/{f} missing"


# --------------------------------------------------------------------------------------------
# Full forward passes
# --------------------------------------------------------------------------------------------


def test_forward_logits(model, ref, model_name: str, report: Report) -> None:
    ids = ref["input_ids"]
    out = model.forward(ids)
    assert out.shape == ref["logits"].shape
    assert_logits_match(out, ref["logits"], LOGIT_TOL, "forward logits", report, model_name)


def test_forward_accepts_lists_and_int_dtypes(model, ref) -> None:
    ids = ref["input_ids"][:9]
    base = model.forward(ids)
    for variant in (ids.tolist(), ids.astype(np.int64), ids.astype(np.uint32)):
        np.testing.assert_array_equal(model.forward(variant), base)


def test_forward_pos_offset(model, ref, model_name: str, report: Report) -> None:
    ids = ref["input_ids"]
    offset = int(ref["position_offset"])
    out = model.forward(ids, start_position=offset)
    assert_logits_match(
        out, ref["logits_pos_offset"], LOGIT_TOL, "forward start_position=5000", report, model_name
    )


@pytest.fixture(scope="module")
def long_logits(model, ref) -> np.ndarray:
    """Logits of the 4,200-token forward at the golden positions (computed once per model)."""
    out = model.forward(ref["long_input_ids"])
    assert out.shape == (ref["long_input_ids"].shape[0], ref["logits"].shape[1])
    return out[ref["long_positions"]]


def test_forward_long(long_logits, ref, model_name: str, report: Report) -> None:
    assert_logits_match(
        long_logits, ref["long_logits"], LOGIT_TOL, "forward 4200 tokens", report, model_name
    )


# --------------------------------------------------------------------------------------------
# Generation through a Session (KV cache)
# --------------------------------------------------------------------------------------------


def test_session_greedy_steps_match_golden(model, ref, model_name: str, report: Report) -> None:
    prompt = ref["gen_prompt_ids"]
    gen_ids = ref["gen_ids"]
    got_logits = []
    got_ids = []
    with model.session(max_context=64) as session:
        logits = session.append(prompt)
        for _ in range(len(gen_ids)):
            assert logits.shape == (ref["logits"].shape[1],)
            got_logits.append(np.array(logits))
            tok = int(np.argmax(logits))
            got_ids.append(tok)
            logits = session.append([tok])
        assert session.position == len(prompt) + len(gen_ids)
        assert session.tokens == [*prompt.tolist(), *got_ids]
    assert_logits_match(
        np.stack(got_logits),
        ref["gen_logits"],
        LOGIT_TOL,
        "session step logits",
        report,
        model_name,
    )
    assert got_ids == gen_ids.tolist()


def test_session_generate_greedy(model, ref) -> None:
    prompt = ref["gen_prompt_ids"]
    gen_ids = ref["gen_ids"]
    with model.session(max_context=64) as session:
        out = list(session.generate(prompt, max_new_tokens=len(gen_ids), temperature=0.0, stop=()))
    assert out == gen_ids.tolist()


def test_session_generate_stops_on_stop_token(model, ref) -> None:
    prompt = ref["gen_prompt_ids"]
    gen_ids = ref["gen_ids"].tolist()
    stop_tok = gen_ids[5]
    first = gen_ids.index(stop_tok)
    with model.session(max_context=64) as session:
        out = list(session.generate(prompt, max_new_tokens=16, temperature=0.0, stop=(stop_tok,)))
    assert out == gen_ids[: first + 1]


# --------------------------------------------------------------------------------------------
# Trace: router choices and the residual stream
# --------------------------------------------------------------------------------------------


def test_trace(model, ref, model_name: str, report: Report) -> None:
    ids = ref["input_ids"]
    tr = model.trace(ids)
    layers, t, k = ref["router_topk_idx"].shape

    assert_logits_match(tr.logits, ref["logits"], LOGIT_TOL, "trace logits", report, model_name)
    fwd = model.forward(ids)
    assert max_abs_diff(tr.logits, fwd) <= THREADS_TOL, "trace logits differ from forward"

    idx = np.asarray(tr.router_topk_idx)
    w = np.asarray(tr.router_topk_weights)
    assert idx.shape == (layers, t, k), idx.shape
    assert w.shape == (layers, t, k), w.shape
    assert np.issubdtype(idx.dtype, np.integer), idx.dtype
    assert w.dtype == np.float32, w.dtype

    worst_w = 0.0
    for layer in range(layers):
        for pos in range(t):
            want = dict(
                zip(
                    ref["router_topk_idx"][layer, pos].tolist(),
                    ref["router_topk_weights"][layer, pos].tolist(),
                    strict=True,
                )
            )
            got = dict(zip(idx[layer, pos].tolist(), w[layer, pos].tolist(), strict=True))
            assert len(got) == k, f"layer {layer} token {pos}: repeated expert {idx[layer, pos]}"
            assert set(got) == set(want), (
                f"layer {layer} token {pos}: experts {sorted(got)} != golden {sorted(want)}"
            )
            for e in want:
                worst_w = max(worst_w, abs(got[e] - want[e]))
    report(model_name, "trace router weights (per expert id)", worst_w, ROUTER_WEIGHT_TOL)
    assert worst_w <= ROUTER_WEIGHT_TOL, f"router weight max |diff| {worst_w:.3e}"
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-5)

    # Residual stream after each layer. Its RMS grows from ~1.6 to ~2.5 (tiny-a) / ~4.6 (tiny-b);
    # the golden float32 reference is within ~1e-5 of float64 on logits, and a correct float32
    # engine drifts from it only by float32 summation order (~1e-6 relative per op). A tolerance
    # of 1e-3 x RMS (2.5e-3 .. 4.6e-3 absolute) is ~100x that noise yet far below any real bug
    # (a wrong expert, a missing bias or a wrong rotary angle moves values by O(0.1 x RMS)).
    lo = np.asarray(tr.layer_outputs)
    want_lo = ref["layer_outputs"]
    assert lo.shape == want_lo.shape, lo.shape
    assert lo.dtype == np.float32, lo.dtype
    for layer in range(layers):
        rms = float(np.sqrt(np.mean(want_lo[layer].astype(np.float64) ** 2)))
        tol = LAYER_REL_TOL * rms
        diff = max_abs_diff(lo[layer], want_lo[layer])
        report(model_name, f"trace layer_outputs[{layer}] (tol = 1e-3 x rms)", diff, tol)
        assert diff <= tol, f"layer {layer}: max |diff| {diff:.3e} > {tol:.3e} (rms {rms:.3f})"


# --------------------------------------------------------------------------------------------
# Original (OpenAI) layout
# --------------------------------------------------------------------------------------------


def test_original_layout(model, model_dir: Path, ref, tmp_path: Path, model_name: str, report):
    from original_layout import convert_hf_to_original

    ids = ref["input_ids"]
    hf_logits = model.forward(ids)

    out_dir = tmp_path / "orig"
    convert_hf_to_original(model_dir, out_dir)
    orig = gpt_oss_cpu.Model.load(str(out_dir))
    got = orig.forward(ids)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, hf_logits)  # same weights, same engine: bit for bit
    assert_logits_match(
        got, ref["logits"], LOGIT_TOL, "original/ layout logits", report, model_name
    )

    # The usual Hugging Face repo shape: root = HF layout, original/ subdirectory = OpenAI layout.
    repo = tmp_path / "repo"
    shutil.copytree(model_dir, repo)
    convert_hf_to_original(repo, repo / "original")
    sub = gpt_oss_cpu.Model.load(str(repo / "original"))
    np.testing.assert_array_equal(sub.forward(ids), hf_logits)
    assert sub.config.num_local_experts == model.config.num_local_experts
    assert sub.config.num_experts_per_tok == model.config.num_experts_per_tok
    assert sub.config.sliding_window == model.config.sliding_window


# --------------------------------------------------------------------------------------------
# Session semantics
# --------------------------------------------------------------------------------------------


def test_session_chunked_append(model, ref, model_name: str, report: Report) -> None:
    ids = ref["input_ids"]
    full = model.forward(ids)
    t = len(ids)
    bounds = [5, 6, 26, t]
    worst = 0.0
    with model.session(max_context=t) as session:
        assert session.position == 0
        assert session.tokens == []
        assert session.max_context == t
        start = 0
        for end in bounds:
            last = session.append(ids[start:end])
            assert last.shape == (full.shape[1],) and last.dtype == np.float32
            diff = max_abs_diff(last, full[end - 1])
            worst = max(worst, diff)
            assert diff <= SELF_TOL, f"chunk ending at {end}: max |diff| {diff:.3e}"
            assert session.position == end
            assert session.tokens == ids[:end].tolist()
            start = end
    report(model_name, "session chunks 5+1+20+rest vs forward", worst, SELF_TOL)


def test_session_one_token_at_a_time(model, ref) -> None:
    ids = ref["input_ids"][:24]
    full = model.forward(ids)
    with model.session(max_context=32) as session:
        for i, tok in enumerate(ids.tolist()):
            last = session.append([tok])
            assert max_abs_diff(last, full[i]) <= SELF_TOL, f"position {i}"


@pytest.mark.parametrize("where", ["far beyond window", "within window", "to zero"])
def test_session_truncate(model, ref, where: str, model_name: str, report: Report) -> None:
    window = model.config.sliding_window
    vocab = ref["logits"].shape[1]
    ids = ref["input_ids"][:60]
    n = {"far beyond window": 10, "within window": 60 - window // 2, "to zero": 0}[where]
    if where == "far beyond window":
        assert 60 - n > 2 * window
    full = model.forward(ids)
    alt_tail = (ids[n:] * 7 + 3) % (vocab - 2)
    assert not np.array_equal(alt_tail, ids[n:])
    alt = np.concatenate([ids[:n], alt_tail]).astype(np.int32)
    alt_full = model.forward(alt)
    with model.session(max_context=64) as session:
        session.append(ids)
        session.truncate(n)
        assert session.position == n
        assert session.tokens == ids[:n].tolist()
        again = session.append(ids[n:])
        d1 = max_abs_diff(again, full[-1])
        assert d1 <= SELF_TOL, f"re-append after truncate({n}): {d1:.3e}"
        # A different tail must not see any stale cache entry of the old one.
        session.truncate(n)
        other = session.append(alt_tail)
        d2 = max_abs_diff(other, alt_full[-1])
        assert d2 <= SELF_TOL, f"new tail after truncate({n}): {d2:.3e}"
        assert session.tokens == alt.tolist()
    report(model_name, f"truncate 60->{n} + re-append ({where})", max(d1, d2), SELF_TOL)


@pytest.mark.parametrize("n", [1300, 200])
def test_session_truncate_beyond_the_sliding_ring(model, ref, n: int) -> None:
    """Sliding layers keep only window + 1024 positions: a rollback of 100 tokens is served from
    the ring, one of 1200 makes the session recompute the prefix. Both must be exact."""
    ids = ref["long_input_ids"][:1400]
    want = model.forward(ids)[-1]
    with model.session(max_context=1500) as session:
        session.append(ids)
        session.truncate(n)
        assert session.position == n
        assert session.tokens == ids[:n].tolist()
        got = session.append(ids[n:])
    assert max_abs_diff(got, want) <= SELF_TOL


def test_session_repeated_truncation_never_reads_overwritten_ring_slots(model, ref) -> None:
    """A rollback, new tokens, then a deeper rollback: the discarded tokens' keys overwrote ring
    slots of older positions, so the second rollback must not trust the ring (found in review:
    this returned stale keys and logits off by 8)."""
    ids = ref["long_input_ids"]
    with model.session(max_context=2200) as session:
        session.append(ids[:2000])
        session.truncate(1500)
        session.append(ids[2000:2100])
        session.truncate(900)
        got = session.append(ids[900:901])
        assert session.tokens == ids[:901].tolist()
    want = model.forward(ids[:901])[-1]
    assert max_abs_diff(got, want) <= SELF_TOL


def test_session_reset(model, ref) -> None:
    ids = ref["input_ids"]
    a, b = ids[:30], ids[30:50]
    with model.session(max_context=64) as fresh:
        want = fresh.append(b)
    with model.session(max_context=64) as session:
        session.append(a)
        session.reset()
        assert session.position == 0
        assert session.tokens == []
        got = session.append(b)
        assert session.position == len(b)
        assert session.tokens == b.tolist()
    assert max_abs_diff(got, want) <= 1e-5


def test_session_overflow_keeps_session_usable(model, ref) -> None:
    ids = ref["input_ids"]
    full = model.forward(ids[:16])
    with model.session(max_context=16) as session:
        session.append(ids[:10])
        with pytest.raises(ContextOverflowError):
            session.append(ids[10:17])
        assert session.position == 10
        assert session.tokens == ids[:10].tolist()
        last = session.append(ids[10:16])  # fills the context exactly
        assert session.position == 16
        assert max_abs_diff(last, full[-1]) <= SELF_TOL
        with pytest.raises(ContextOverflowError):
            session.append(ids[16:17])
        assert session.position == 16
        assert session.tokens == ids[:16].tolist()
        session.truncate(15)
        assert max_abs_diff(session.append(ids[15:16]), full[-1]) <= SELF_TOL


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def _generate(model, prompt, **kwargs) -> list[int]:
    with model.session(max_context=64) as session:
        return list(session.generate(prompt, max_new_tokens=16, stop=(), **kwargs))


def test_sampling_temperature_zero_is_argmax(model, ref) -> None:
    prompt = ref["gen_prompt_ids"]
    assert _generate(model, prompt, temperature=0.0) == ref["gen_ids"].tolist()
    # Seed and top_p are irrelevant at temperature 0.
    assert _generate(model, prompt, temperature=0.0, seed=5, top_p=0.5) == ref["gen_ids"].tolist()


def test_sampling_tiny_top_p_is_greedy(model, ref) -> None:
    prompt = ref["gen_prompt_ids"]
    got = _generate(model, prompt, temperature=1.0, top_p=1e-6, seed=3)
    assert got == ref["gen_ids"].tolist()


def test_sampling_seeded_is_reproducible(model, ref) -> None:
    prompt = ref["gen_prompt_ids"]
    a = _generate(model, prompt, temperature=1.0, seed=1234)
    b = _generate(model, prompt, temperature=1.0, seed=1234)
    c = _generate(model, prompt, temperature=1.0, seed=4321)
    vocab = ref["logits"].shape[1]
    assert len(a) == 16 and all(0 <= x < vocab for x in a)
    assert a == b
    # The golden step distributions have a per-step collision probability <= 0.46 and a product
    # over 16 steps ~1e-19: two seeds agreeing on all 16 tokens would mean the seed is ignored.
    assert a != c
    # Sampling at temperature 1 on these flat distributions essentially never follows greedy.
    assert a != ref["gen_ids"].tolist()


def test_sampler_greedy_ties_and_distribution() -> None:
    """The Sampler: argmax with lowest-index ties, and seeded draws that follow softmax."""
    Sampler = gpt_oss_cpu.Sampler

    logits = np.array([0.5, 3.0, -1.0, 3.0, 2.0], dtype=np.float32)
    assert Sampler(temperature=0.0).sample(logits) == 1
    assert Sampler(temperature=0.0, seed=7).sample(np.zeros(9, np.float32)) == 0

    probs = np.array([0.5, 0.3, 0.15, 0.05])
    lg = np.log(probs).astype(np.float32)
    n = 4000
    sampler = Sampler(temperature=1.0, seed=2024)
    counts = np.bincount([sampler.sample(lg) for _ in range(n)], minlength=4)
    sigma = np.sqrt(n * probs * (1 - probs))
    assert np.all(np.abs(counts - n * probs) <= 5 * sigma), counts

    # top_p = 0.7 keeps the smallest prefix with mass >= 0.7: tokens 0 and 1, renormalised 5:3.
    sampler = Sampler(temperature=1.0, top_p=0.7, seed=99)
    counts = np.bincount([sampler.sample(lg) for _ in range(n)], minlength=4)
    assert counts[2] == 0 and counts[3] == 0, counts
    p0 = 0.5 / 0.8
    assert abs(counts[0] - n * p0) <= 5 * np.sqrt(n * p0 * (1 - p0)), counts

    # Temperature 0.5 squares the probabilities before renormalising.
    sampler = Sampler(temperature=0.5, seed=5)
    counts = np.bincount([sampler.sample(lg) for _ in range(n)], minlength=4)
    p2 = probs**2 / np.sum(probs**2)
    sigma = np.sqrt(n * p2 * (1 - p2))
    assert np.all(np.abs(counts - n * p2) <= 5 * sigma + 1), counts

    # Same seed, same stream.
    s1 = Sampler(temperature=1.0, seed=11)
    s2 = Sampler(temperature=1.0, seed=11)
    assert [s1.sample(lg) for _ in range(50)] == [s2.sample(lg) for _ in range(50)]


# --------------------------------------------------------------------------------------------
# Threads
# --------------------------------------------------------------------------------------------


def test_threads_invariance(model_dir: Path, ref, model_name: str, report: Report) -> None:
    ids = ref["input_ids"]
    one = gpt_oss_cpu.Model.load(str(model_dir), threads=1)
    two = gpt_oss_cpu.Model.load(str(model_dir), threads=2)
    a = one.forward(ids)
    b = two.forward(ids)
    diff = max_abs_diff(a, b)
    report(model_name, "threads=1 vs threads=2", diff, THREADS_TOL)
    assert diff <= THREADS_TOL, f"threads=1 vs 2: {diff:.3e}"
    with one.session(max_context=64) as s1, two.session(max_context=64) as s2:
        assert max_abs_diff(s1.append(ids[:40]), s2.append(ids[:40])) <= THREADS_TOL


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "neon"])
def test_every_kernel_isa_matches_golden(
    model_dir: Path, ref, isa: str, model_name: str, report: Report
) -> None:
    """Each instruction set's kernels (scalar is the portable oracle) reproduce the golden logits,
    offset positions and greedy tokens, not just the one this CPU picks by default."""
    if isa not in gpt_oss_cpu.build_info()["supported_isas"]:
        pytest.skip(f"this CPU does not support {isa}")
    model = gpt_oss_cpu.Model.load(str(model_dir), isa=isa)
    assert model.isa == isa
    assert_logits_match(
        model.forward(ref["input_ids"]),
        ref["logits"],
        LOGIT_TOL,
        f"isa={isa} logits",
        report,
        model_name,
    )
    got = model.forward(ref["input_ids"], start_position=int(ref["position_offset"]))
    assert_logits_match(
        got, ref["logits_pos_offset"], LOGIT_TOL, f"isa={isa} start_position", report, model_name
    )
    with model.session(max_context=64) as session:
        gen = list(session.generate(ref["gen_prompt_ids"], len(ref["gen_ids"])))
    assert gen == ref["gen_ids"].tolist()


# --------------------------------------------------------------------------------------------
# The fast path (precision="fast")
# --------------------------------------------------------------------------------------------


def assert_as_accurate_as_the_bf16_reference(
    model_dir: Path, got: np.ndarray, ref, label: str, report: Report, model_name: str
) -> None:
    """``got`` is no further from the golden logits, and agrees with their argmax at no fewer
    positions, than OpenAI's bf16 path on the same model (``crosscheck_openai.json``)."""
    import json

    bf16 = json.loads((model_dir / "crosscheck_openai.json").read_text())["bfloat16-native"]
    want = ref["logits"]
    diff = max_abs_diff(got, want)
    agree = int((got.argmax(-1) == want.argmax(-1)).sum())
    report(model_name, label, diff, bf16["max_abs"])
    assert diff <= bf16["max_abs"], f"max |diff| {diff:.3f} > bf16 reference {bf16['max_abs']:.3f}"
    assert agree >= bf16["argmax_agree"], f"argmax agrees at {agree}, bf16 reference at {bf16}"


@pytest.mark.parametrize("dense", ["bf16", "q8"])
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "neon"])
def test_fast_precision_is_at_least_as_accurate_as_the_reference_bf16_path(
    model_dir: Path, ref, isa: str, dense: str, model_name: str, report: Report
) -> None:
    """precision="fast" rounds activations (8 bits per block for the experts, bf16 elsewhere; with
    dense="q8" also the attention and unembedding weights), so it cannot hold the fp32 tolerance:
    these tiny random models amplify any rounding (OpenAI's own bf16 path misses the golden argmax
    at 5/64 and 44/96 positions, crosscheck_openai.json). It must do at least as well as that bf16
    path, and really differ from the exact path."""
    if isa not in gpt_oss_cpu.build_info()["supported_isas"]:
        pytest.skip(f"this CPU does not support {isa}")
    model = gpt_oss_cpu.Model.load(str(model_dir), isa=isa, precision="fast", dense=dense)
    assert (model.precision, model.dense) == ("fast", dense)
    got = model.forward(ref["input_ids"])
    label = f"fast dense={dense} isa={isa} logits"
    assert_as_accurate_as_the_bf16_reference(model_dir, got, ref, label, report, model_name)
    exact = gpt_oss_cpu.Model.load(str(model_dir), isa=isa).forward(ref["input_ids"])
    assert max_abs_diff(got, exact) > 1e-3, "the fast path computed the exact logits"


@pytest.mark.parametrize(
    ("precision", "dense"), [("exact", "bf16"), ("fast", "bf16"), ("fast", "q8")]
)
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "neon"])
def test_bf16_kv_cache_is_at_least_as_accurate_as_the_reference_bf16_path(
    model_dir: Path, ref, isa: str, precision: str, dense: str, model_name: str, report: Report
) -> None:
    """kv_cache="bf16" rounds the cached keys and values (as OpenAI's bf16 path keeps them): held
    to that path's error and argmax agreement, like the fast path, and really rounded."""
    if isa not in gpt_oss_cpu.build_info()["supported_isas"]:
        pytest.skip(f"this CPU does not support {isa}")
    model = gpt_oss_cpu.Model.load(
        str(model_dir), isa=isa, precision=precision, dense=dense, kv_cache="bf16"
    )
    got = model.forward(ref["input_ids"])
    label = f"{precision} dense={dense} kv_cache=bf16 isa={isa} logits"
    assert_as_accurate_as_the_bf16_reference(model_dir, got, ref, label, report, model_name)
    f32 = gpt_oss_cpu.Model.load(str(model_dir), isa=isa, precision=precision, dense=dense)
    assert max_abs_diff(got, f32.forward(ref["input_ids"])) > 1e-3, "nothing was rounded"
