"""The Sampler's cuts, penalties, bias, seeding and log-probabilities, and generate's sampling
keywords and logits processors on the tiny reference model.

Statistical checks use fixed seeds with enough draws that a correct sampler passes by a wide
margin; the cut checks (top-k, top-p, min-p, bias) are exact: a token outside the allowed set must
never appear.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import gpt_oss_cpu
import numpy as np
import numpy.typing as npt
import pytest
from gpt_oss_cpu import InputError, Sampler

TINY_A = Path(__file__).parent / "data" / "models" / "tiny-a"
VOCAB = 512  # tiny-a


def draws(sampler: Sampler, logits: npt.NDArray[np.float32], n: int) -> npt.NDArray[np.int64]:
    return np.array([sampler.sample(logits) for _ in range(n)])


def log_softmax(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    x = x - np.max(x)
    return x - np.log(np.sum(np.exp(x)))


def best_first(logits: npt.NDArray[np.float32]) -> npt.NDArray[np.int64]:
    """Token ids by descending logit, lower id first on ties."""
    return np.lexsort((np.arange(logits.size), -logits.astype(np.float64)))


@pytest.fixture(scope="module")
def model() -> gpt_oss_cpu.Model:
    return gpt_oss_cpu.Model.load(TINY_A)


# --------------------------------------------------------------------------------------------
# Defaults, seeding, distribution
# --------------------------------------------------------------------------------------------


def test_defaults_follow_openai_recommendation() -> None:
    s = Sampler()
    assert (s.temperature, s.top_p, s.top_k, s.min_p) == (1.0, 1.0, 0, 0.0)
    assert (s.repetition_penalty, s.presence_penalty, s.frequency_penalty) == (1.0, 0.0, 0.0)
    assert s.logit_bias == {} and s.logprobs == 0 and s.history == []
    assert s.last_logprobs() == [] and s.last_token_logprob() is None


def test_seeded_runs_repeat_and_seeds_differ() -> None:
    logits = np.random.default_rng(0).normal(size=300).astype(np.float32)
    kw = {"top_k": 50, "top_p": 0.9, "min_p": 0.01, "temperature": 1.3}
    a = draws(Sampler(seed=42, **kw), logits, 200)
    b = draws(Sampler(seed=42, **kw), logits, 200)
    c = draws(Sampler(seed=43, **kw), logits, 200)
    assert a.tolist() == b.tolist()
    assert a.tolist() != c.tolist()
    # Over 200 draws from >10 plausible tokens, two seeds agree on well under half.
    assert np.mean(a == c) < 0.5


def test_frequencies_follow_softmax_over_temperature() -> None:
    logits = np.array([0.3, -1.0, 1.2, 0.0, 2.0, -0.5, 1.0, 0.6], np.float32)
    temperature, n = 0.7, 20000
    counts = np.bincount(draws(Sampler(temperature, seed=123), logits, n), minlength=8)
    expected = n * np.exp(log_softmax(logits / temperature))
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    # Chi-square with 7 degrees of freedom: P(chi2 > 24.3) = 0.001.
    assert chi2 < 24.3, (chi2, counts, expected)
    # A wrong temperature (1.0) is rejected by the same test.
    wrong = n * np.exp(log_softmax(logits.astype(np.float64)))
    assert float(np.sum((counts - wrong) ** 2 / wrong)) > 100


# --------------------------------------------------------------------------------------------
# Cuts: top-k, top-p, min-p
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 5, 300])
def test_top_k_never_emits_outside_the_k_best(k: int) -> None:
    logits = np.random.default_rng(k).normal(size=2000).astype(np.float32)
    allowed = set(best_first(logits)[:k].tolist())
    got = draws(Sampler(temperature=3.0, top_k=k, seed=k), logits, 3000)
    assert set(got.tolist()) <= allowed
    if k <= 5:
        assert set(got.tolist()) == allowed  # and every one of them is reachable


def test_top_k_ties_keep_the_lower_ids() -> None:
    logits = np.array([1.0, 5.0, 3.0, 5.0, 5.0], np.float32)
    got = set(draws(Sampler(top_k=2, seed=1), logits, 500).tolist())
    assert got == {1, 3}


def test_top_p_never_emits_outside_a_small_nucleus() -> None:
    # Tokens 10, 20, 30 hold 0.4, 0.3, 0.2; 997 others share 0.1. The 0.85 nucleus is {10, 20, 30}.
    probs = np.full(1000, 0.1 / 997)
    probs[[10, 20, 30]] = [0.4, 0.3, 0.2]
    logits = np.log(probs).astype(np.float32)
    n = 6000
    counts = np.bincount(draws(Sampler(top_p=0.85, seed=7), logits, n), minlength=1000)
    assert counts.sum() == counts[[10, 20, 30]].sum()
    p = np.array([4, 3, 2]) / 9
    sigma = np.sqrt(n * p * (1 - p))
    assert np.all(np.abs(counts[[10, 20, 30]] - n * p) < 5 * sigma), counts[[10, 20, 30]]


def test_top_p_nucleus_larger_than_the_prefilter() -> None:
    """A flat distribution whose nucleus holds 700 tokens: the cut must be exact, not 256."""
    rng = np.random.default_rng(3)
    logits = rng.uniform(-1.0, 1.0, size=3000).astype(np.float32)
    order = best_first(logits)
    cum = np.cumsum(np.exp(logits[order].astype(np.float64) - logits.max()))
    cum /= cum[-1]
    size = 700
    top_p = float((cum[size - 2] + cum[size - 1]) / 2)  # strictly between two boundaries
    nucleus = order[:size]
    got = draws(Sampler(top_p=top_p, seed=11), logits, 4000)
    assert set(got.tolist()) <= set(nucleus.tolist())
    # The low end of the nucleus (ranks 500..700) is reached, so it was not cut short.
    assert np.isin(got, nucleus[500:]).sum() > 100


def test_min_p_keeps_tokens_within_a_ratio_of_the_best() -> None:
    # Probabilities relative to the best: 1, 0.5, 0.2, 0.09, 0.05 (min_p = 0.1 drops the last two).
    rel = np.array([0.5, 1.0, 0.09, 0.2, 0.05])
    logits = np.log(rel).astype(np.float32)
    got = draws(Sampler(min_p=0.1, seed=5), logits, 4000)
    assert set(got.tolist()) == {0, 1, 3}
    # min_p applies after temperature: at T = 2 the ratios are square roots, so token 2 (0.3)
    # passes min_p = 0.25 and token 4 (0.22) does not.
    got = draws(Sampler(temperature=2.0, min_p=0.25, seed=5), logits, 4000)
    assert set(got.tolist()) == {0, 1, 2, 3}


def test_top_k_top_p_and_min_p_combine() -> None:
    logits = np.array([0.0, -1.0, -2.0, -3.0, -10.0], np.float32)
    # top_k 4 then the 0.8 nucleus of the renormalised four is {0, 1}.
    got = set(draws(Sampler(top_k=4, top_p=0.8, seed=2), logits, 2000).tolist())
    assert got == {0, 1}
    # min_p 0.4 then drops token 1 (relative probability e^-1 = 0.37).
    got = set(draws(Sampler(top_k=4, top_p=0.8, min_p=0.4, seed=2), logits, 500).tolist())
    assert got == {0}


# --------------------------------------------------------------------------------------------
# Penalties and logit bias
# --------------------------------------------------------------------------------------------


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    s = Sampler(0.0, repetition_penalty=1.5)
    s.accept(0)
    # 2.0 / 1.5 = 1.33 drops below 1.9; token 2 (1.95) is not in the history and wins.
    assert s.sample(np.array([2.0, 1.9, 1.95], np.float32)) == 2
    s = Sampler(0.0, repetition_penalty=1.5)
    s.accept(0)
    # -1.0 * 1.5 = -1.5 drops below -1.2.
    assert s.sample(np.array([-1.0, -1.2], np.float32)) == 1
    # Without the token in the history nothing changes.
    assert Sampler(0.0, repetition_penalty=1.5).sample(np.array([2.0, 1.9], np.float32)) == 0


def test_presence_and_frequency_penalties_subtract_exact_amounts() -> None:
    logits = np.array([1.0, 0.75], np.float32)

    def greedy(history: list[int], **kw: float) -> int:
        s = Sampler(0.0, **kw)
        for t in history:
            s.accept(t)
        return s.sample(logits)

    assert greedy([0], presence_penalty=0.25) == 0  # 0.75 ties 0.75: the lower id wins
    assert greedy([0], presence_penalty=0.3) == 1
    assert greedy([0, 0], frequency_penalty=0.125) == 0  # 1 - 2 * 0.125 = 0.75: a tie
    assert greedy([0, 0, 0], frequency_penalty=0.125) == 1
    assert greedy([0, 1], presence_penalty=5.0) == 0  # both penalised alike
    assert greedy([1], presence_penalty=-0.5) == 1  # negative penalties encourage


def test_penalties_and_bias_shift_exactly_the_right_logits() -> None:
    """Log-probabilities over the whole vocabulary expose the processed logits."""
    rng = np.random.default_rng(9)
    logits = rng.normal(scale=2.0, size=64).astype(np.float32)
    history = [3, 3, 7, 11, 3, 40, 7]
    bias = {5: 1.5, 40: -2.0, 63: 0.25}
    s = Sampler(
        1.0,
        seed=0,
        repetition_penalty=1.3,
        presence_penalty=0.4,
        frequency_penalty=0.2,
        logit_bias=bias,
        logprobs=64,
    )
    for t in history:
        s.accept(t)
    s.sample(logits)
    expected = logits.astype(np.float64)
    for t, count in zip(*np.unique(history, return_counts=True), strict=True):
        value = expected[t]
        value = value / 1.3 if value > 0 else value * 1.3
        expected[t] = value - 0.4 - 0.2 * count
    for t, b in bias.items():
        expected[t] += b
    got = dict(s.last_logprobs())
    assert len(got) == 64
    want = log_softmax(expected)
    np.testing.assert_allclose([got[i] for i in range(64)], want, atol=1e-5)


def test_sampled_tokens_enter_the_history() -> None:
    s = Sampler(0.0, presence_penalty=10.0)
    logits = np.array([3.0, 2.0, 1.0], np.float32)
    assert [s.sample(logits) for _ in range(4)] == [0, 1, 2, 0]
    assert s.history == [0, 1, 2, 0]
    s.clear_history()
    assert s.history == [] and s.sample(logits) == 0


def test_logit_bias_forces_and_forbids_tokens() -> None:
    logits = np.random.default_rng(1).normal(size=100).astype(np.float32)
    best = int(np.argmax(logits))
    second = int(best_first(logits)[1])
    assert Sampler(0.0, logit_bias={best: -np.inf}).sample(logits) == second
    forbidden = draws(Sampler(seed=3, logit_bias={best: -np.inf}), logits, 2000)
    assert best not in forbidden.tolist()
    worst = int(np.argmin(logits))
    assert set(draws(Sampler(seed=3, logit_bias={worst: 100.0}), logits, 500).tolist()) == {worst}


# --------------------------------------------------------------------------------------------
# Log-probabilities
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.0, 0.6, 1.0])
def test_logprobs_are_the_sorted_log_softmax_of_the_sampled_distribution(
    temperature: float,
) -> None:
    logits = np.random.default_rng(4).normal(size=500).astype(np.float32)
    logits[[17, 18]] = logits.max() + 1.0  # a tie at the top
    s = Sampler(temperature, seed=1, top_k=3, logprobs=5)
    token = s.sample(logits)
    top = s.last_logprobs()
    # After temperature (1 when greedy), before the top-k cut.
    want = log_softmax(logits.astype(np.float64) / (temperature or 1.0))
    assert [t for t, _ in top] == best_first(logits)[:5].tolist()
    assert top[0][0] == 17 and top[1][0] == 18
    np.testing.assert_allclose([v for _, v in top], want[[t for t, _ in top]], atol=1e-5)
    assert all(a[1] >= b[1] for a, b in itertools.pairwise(top))
    chosen = s.last_token_logprob()
    assert chosen is not None and chosen[0] == token
    assert abs(chosen[1] - want[token]) < 1e-5
    if temperature == 0.0:
        assert token == 17


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.5}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"presence_penalty": float("nan")}, "presence_penalty"),
        ({"frequency_penalty": float("nan")}, "frequency_penalty"),
        ({"logit_bias": {3: float("nan")}}, "logit_bias"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logprobs": -2}, "logprobs"),
    ],
)
def test_bad_values_raise_input_error(kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(InputError, match=pattern):
        Sampler(**kwargs)  # type: ignore[arg-type]


def test_bad_logits_raise_input_error() -> None:
    with pytest.raises(InputError, match=r"logit_bias token id 600 .*512"):
        Sampler(logit_bias={600: 1.0}).sample(np.zeros(512, np.float32))
    with pytest.raises(InputError, match="-inf"):
        Sampler().sample(np.full(4, -np.inf, np.float32))
    with pytest.raises(InputError, match="empty"):
        Sampler().sample(np.zeros(0, np.float32))


def test_generate_validates_sampling_arguments(model: gpt_oss_cpu.Model) -> None:
    with model.session(max_context=32) as session:
        # Out of range of the model's vocabulary: raised from the Rust sampling path.
        with pytest.raises(InputError, match=r"logit_bias token id 512"):
            list(session.generate([1, 2], 2, logit_bias={512: 1.0}))
        with pytest.raises(InputError, match="top_k"):
            list(session.generate([1, 2], 2, top_k=-3))
        with pytest.raises(InputError, match="callable"):
            list(session.generate([1, 2], 2, logits_processors=[3]))  # type: ignore[list-item]
        with pytest.raises(InputError, match="shape"):
            list(session.generate([1, 2], 2, logits_processors=[lambda ids, lg: lg[:10]]))
        with pytest.raises(InputError, match="not both"):
            list(session.generate([1, 2], 2, sampler=Sampler(), top_k=4))


# --------------------------------------------------------------------------------------------
# Session.generate on the tiny model
# --------------------------------------------------------------------------------------------

PROMPT = [5, 17, 300, 42, 7]


def test_logits_processor_forces_a_token(model: gpt_oss_cpu.Model) -> None:
    forced = 123
    seen: list[list[int]] = []

    def force(token_ids: list[int], logits: npt.NDArray[np.float32]) -> None:
        seen.append(token_ids)
        assert logits.dtype == np.float32 and logits.shape == (VOCAB,)
        keep = logits[forced]
        logits[:] = -np.inf
        logits[forced] = keep

    with model.session(max_context=64) as session:
        got = list(session.generate(PROMPT, 6, temperature=1.0, seed=4, logits_processors=[force]))
    assert got == [forced] * 6
    # Each call sees the session's tokens: the prompt, then the tokens generated so far.
    assert seen == [PROMPT + [forced] * i for i in range(6)]


def test_logits_processor_may_return_new_logits(model: gpt_oss_cpu.Model) -> None:
    def shift(token_ids: list[int], logits: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
        out = np.full(logits.shape, -1e9)
        out[len(token_ids)] = 0.0  # the token id equal to the current length
        return out

    with model.session(max_context=64) as session:
        got = list(session.generate(PROMPT, 4, temperature=0.8, seed=1, logits_processors=[shift]))
    assert got == [5, 6, 7, 8]


def test_processor_path_matches_the_fast_path(model: gpt_oss_cpu.Model) -> None:
    """A no-op processor moves sampling to Python without changing any token."""

    def run(
        session: gpt_oss_cpu.Session, *processors: gpt_oss_cpu.model.LogitsProcessor
    ) -> list[int]:
        return list(
            session.generate(
                PROMPT,
                12,
                temperature=0.9,
                top_k=40,
                top_p=0.95,
                seed=77,
                repetition_penalty=1.2,
                logits_processors=processors,
            )
        )

    with model.session(max_context=64) as session:
        fast = run(session)
        session.reset()
        slow = run(session, lambda ids, logits: None)
    assert fast == slow


def test_generate_presence_penalty_prevents_repeats(model: gpt_oss_cpu.Model) -> None:
    with model.session(max_context=64) as session:
        plain = list(session.generate(PROMPT, 24))
        session.reset()
        penalised = list(session.generate(PROMPT, 24, presence_penalty=1e4))
    assert len(set(plain)) < len(plain)  # greedy on the tiny model repeats itself
    assert len(set(penalised)) == len(penalised)


def test_generate_logit_bias_and_sampler_logprobs(model: gpt_oss_cpu.Model) -> None:
    with model.session(max_context=64) as session:
        assert list(session.generate(PROMPT, 3, logit_bias={77: 1e4})) == [77, 77, 77]
        session.reset()
        sampler = Sampler(0.7, seed=5, top_k=20, logprobs=3)
        for token in session.generate(PROMPT, 5, sampler=sampler):
            chosen = sampler.last_token_logprob()
            assert chosen is not None and chosen[0] == token and chosen[1] <= 0.0
            assert len(sampler.last_logprobs()) == 3
        assert len(sampler.history) == 5
