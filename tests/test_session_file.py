"""Session.save / Session.load: a resumed session continues exactly where the saved one was."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gpt_oss_cpu
import numpy as np
import pytest
from gpt_oss_cpu import InputError, Model, Session

DATA = Path(__file__).parent / "data" / "models"


@pytest.fixture(scope="module")
def model() -> Model:
    return Model.load(DATA / "tiny-a")


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    with np.load(DATA / "tiny-a" / "reference.npz") as ref:
        return ref["long_input_ids"][:1340]


@pytest.mark.parametrize("length", [5, 1300])  # within, and past, the sliding-window ring
def test_resumed_session_gives_identical_logits_and_tokens(model, ids, length, tmp_path) -> None:
    path = tmp_path / "s.kv"
    with model.session(max_context=1400) as session:
        session.append(ids[:length])
        session.save(path)
        want_next = list(session.generate([int(ids[length])], 6))
        want_logits = session.append(ids[length + 10 : length + 20])
    with Session.load(model, path) as resumed:
        assert resumed.position == length
        assert resumed.max_context == 1400
        assert resumed.tokens == ids[:length].tolist()
        # The saved last logits are there: sampling needs no recomputation.
        got_next = list(resumed.generate([int(ids[length])], 6))
        got_logits = resumed.append(ids[length + 10 : length + 20])
    assert got_next == want_next
    np.testing.assert_array_equal(got_logits, want_logits)


def test_another_model_is_refused_with_both_fingerprints(model, ids, tmp_path) -> None:
    path = tmp_path / "s.kv"
    with model.session(max_context=64) as session:
        session.append(ids[:8])
        session.save(path)
    other = Model.load(DATA / "tiny-b")
    with pytest.raises(InputError, match="saved with another model"):
        Session.load(other, path)


def test_other_precision_settings_are_refused_and_the_same_ones_resume(ids, tmp_path) -> None:
    path = tmp_path / "s.kv"
    fast = Model.load(DATA / "tiny-a", precision="fast", dense="q8")
    with fast.session(max_context=64) as session:
        session.append(ids[:8])
        session.save(path)
        want = session.append(ids[8:10])
    message = 'precision="fast", dense="q8"; this model runs precision="exact", dense="bf16"'
    with pytest.raises(InputError, match=re.escape(message)):
        Session.load(Model.load(DATA / "tiny-a"), path)
    with Session.load(Model.load(DATA / "tiny-a", precision="fast", dense="q8"), path) as resumed:
        np.testing.assert_array_equal(resumed.append(ids[8:10]), want)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda b: b"NOTKV\0\0\0" + b[8:],
        lambda b: b[: len(b) // 2],
        lambda b: b[:20],
        lambda b: b[:16] + b"[" + b[17:],
    ],
    ids=["magic", "truncated data", "truncated header", "bad header"],
)
def test_corrupt_files_raise_input_error(model, ids, tmp_path, corrupt) -> None:
    path = tmp_path / "s.kv"
    with model.session(max_context=64) as session:
        session.append(ids[:8])
        session.save(path)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(gpt_oss_cpu.InputError, match=re.escape(path.name)):
        Session.load(model, path)


def test_missing_file(model, tmp_path) -> None:
    with pytest.raises(InputError, match=r"missing\.kv"):
        Session.load(model, tmp_path / "missing.kv")


def test_a_bf16_cache_resumes_exactly_and_an_f32_model_refuses_it(ids, tmp_path) -> None:
    path = tmp_path / "s.kv"
    bf16 = Model.load(DATA / "tiny-a", kv_cache="bf16")
    assert bf16.kv_cache == "bf16"
    with bf16.session(max_context=1400) as session:
        session.append(ids[:1300])  # past the sliding-window ring
        session.save(path)
        want = session.append(ids[1300:1310])
        # Half the bytes of an f32 cache for the same tokens.
        with Model.load(DATA / "tiny-a").session(max_context=1400) as f32:
            f32.append(ids[:1300])
            assert 2 * session.cache_bytes == f32.cache_bytes
    with Session.load(bf16, path) as resumed:
        np.testing.assert_array_equal(resumed.append(ids[1300:1310]), want)
    with pytest.raises(
        InputError, match="keys and values stored as bf16, this model's cache holds f32"
    ):
        Session.load(Model.load(DATA / "tiny-a"), path)
    with pytest.raises(InputError, match="kv_cache"):
        Model.load(DATA / "tiny-a", kv_cache="f16")  # type: ignore[arg-type]


def test_a_format_2_file_resumes_as_f32_and_a_bad_element_type_is_named(model, ids, tmp_path):
    path = tmp_path / "s.kv"
    with model.session(max_context=64) as session:
        session.append(ids[:8])
        session.save(path)
        want = session.append(ids[8:10])

    def rewrite_header(edit) -> None:
        data = path.read_bytes()
        length = int.from_bytes(data[8:16], "little")
        header = edit(json.loads(data[16 : 16 + length]))
        text = json.dumps(header).encode()
        path.write_bytes(data[:8] + len(text).to_bytes(8, "little") + text + data[16 + length :])

    # Format 2 (before the element type was recorded) stored f32 keys and values the same way.
    rewrite_header(lambda h: {**{k: v for k, v in h.items() if k != "kv"}, "format": 2})
    with Session.load(model, path) as resumed:
        np.testing.assert_array_equal(resumed.append(ids[8:10]), want)
    rewrite_header(lambda h: {**h, "ring_valid_from": 10**9})
    with pytest.raises(InputError, match="ring_valid_from 1000000000 is past the 8 tokens"):
        Session.load(model, path)
    rewrite_header(lambda h: {**h, "ring_valid_from": 0, "kv": "fp8"})
    with pytest.raises(InputError, match="kv: expected one of f32, bf16"):
        Session.load(model, path)
    rewrite_header(lambda h: {**h, "format": 1})
    with pytest.raises(InputError, match="format 1, expected 2 to 3"):
        Session.load(model, path)
