"""o200k_harmony tokenizer: golden encodings, special-token handling, streaming decode."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from gpt_oss_cpu.tokenizer import (
    InvalidTokenizerError,
    Tokenizer,
    TokenizerNotFoundError,
)

DATA = Path(__file__).parent / "data" / "tokenizer"
CASES = [json.loads(line) for line in (DATA / "encode_cases.jsonl").read_text().splitlines()]
VOCAB = 201088

# SPEC §5.4: the named special tokens.
SPECIALS = {
    199998: "<|startoftext|>",
    199999: "<|endoftext|>",
    200002: "<|return|>",
    200003: "<|constrain|>",
    200005: "<|channel|>",
    200006: "<|start|>",
    200007: "<|end|>",
    200008: "<|message|>",
    200012: "<|call|>",
    200018: "<|endofprompt|>",
}


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.bundled()


def test_case_file_loaded() -> None:
    assert len(CASES) >= 41
    assert any(c.get("special_tokens_allowed") for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_golden_encode_decode(tok: Tokenizer, case: dict) -> None:
    allow = bool(case.get("special_tokens_allowed", False))
    assert tok.encode(case["text"], allow_special=allow) == case["ids"]
    assert tok.decode(case["ids"]) == case["text"]


def test_vocab_and_special_names(tok: Tokenizer) -> None:
    assert tok.vocab_size == VOCAB
    for token_id, name in SPECIALS.items():
        assert tok.token_to_id(name) == token_id
        assert tok.id_to_token(token_id) == name
        assert tok.is_special(token_id)
    assert tok.id_to_token(200019) == "<|reserved_200019|>"
    assert tok.id_to_token(201087) == "<|reserved_201087|>"
    assert tok.id_to_token(201088) is None
    assert tok.id_to_token(-1) is None
    assert tok.token_to_id("<|no_such_token|>") is None
    # Ordinary entries use the byte-level spelling (a leading space is "Ġ").
    assert tok.id_to_token(382) == "Ġis"
    assert tok.token_to_id("Ġis") == 382
    assert not tok.is_special(382)
    assert not tok.is_special(199997)


def test_special_strings_are_plain_text_by_default(tok: Tokenizer) -> None:
    # "<|start|>" pre-tokenizes (o200k regex) as "<|", "start", "|>"; "<|" and "|>" are not in the
    # vocabulary, so BPE leaves them as single bytes "<" 27, "|" 91, ">" 29.
    assert tok.token_to_id("<|") is None and tok.token_to_id("|>") is None
    assert (tok.token_to_id("<"), tok.token_to_id("|"), tok.token_to_id(">")) == (27, 91, 29)
    assert tok.token_to_id("start") == 5236
    assert tok.encode("<|start|>") == [27, 91, 5236, 91, 29]
    assert tok.encode("<|start|>", allow_special=True) == [200006]

    text = "user wrote " + "".join(SPECIALS.values()) + " <|reserved_200500|> and <|return|>."
    ids = tok.encode(text)
    assert max(ids) < 199998
    assert tok.decode(ids) == text
    special_ids = tok.encode(text, allow_special=True)
    assert [i for i in special_ids if i >= 199998] == [*SPECIALS, 200500, 200002]
    assert tok.decode(special_ids) == text


def test_allow_special_does_not_leak_into_later_calls(tok: Tokenizer) -> None:
    plain = tok.encode("a<|end|>b")
    assert tok.encode("a<|end|>b", allow_special=True) == [64, 200007, 65]
    assert tok.encode("a<|end|>b") == plain
    assert 200007 not in plain


def test_concurrent_encode_modes(tok: Tokenizer) -> None:
    text = "x<|message|>y " * 50
    plain, special = tok.encode(text), tok.encode(text, allow_special=True)
    assert plain != special
    failures: list[str] = []

    def worker(allow: bool) -> None:
        for _ in range(200):
            if tok.encode(text, allow_special=allow) != (special if allow else plain):
                failures.append(f"allow_special={allow}")

    threads = [threading.Thread(target=worker, args=(i % 2 == 0,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_reserved_ids_decode(tok: Tokenizer) -> None:
    ids = list(range(200019, VOCAB))
    assert tok.decode(ids) == "".join(f"<|reserved_{i}|>" for i in ids)
    assert tok.decode(ids, skip_special_tokens=True) == ""
    dec = tok.stream_decoder()
    assert [dec.feed(i) for i in (200019, 201087)] == ["<|reserved_200019|>", "<|reserved_201087|>"]
    assert dec.flush() == ""
    quiet = tok.stream_decoder(skip_special_tokens=True)
    assert [quiet.feed(i) for i in (200019, 13225, 200002)] == ["", "Hello", ""]


def test_decode_numpy_and_bad_ids(tok: Tokenizer) -> None:
    for dtype in (np.int32, np.int64, np.uint32):
        assert tok.decode(np.array([13225, 11, 2375, 0], dtype=dtype)) == "Hello, world!"
    assert tok.decode(np.array([], dtype=np.int32)) == ""
    assert tok.decode([]) == ""
    assert tok.decode(iter([13225])) == "Hello"
    with pytest.raises(ValueError, match="201088"):
        tok.decode([13225, VOCAB])
    with pytest.raises(ValueError, match="-1"):
        tok.decode(np.array([-1, 5]))
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(TypeError):
        tok.decode(np.array([1.5]))
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_token_bytes_match_decoder_for_every_id(tok: Tokenizer) -> None:
    # The streaming decoder relies on token_bytes; check it against the tokenizers decoder.
    mismatches = [
        i
        for i in range(VOCAB)
        if tok.token_bytes(i).decode("utf-8", errors="replace") != tok.decode([i])
    ]
    assert mismatches == []
    assert tok.token_bytes(382) == b" is"
    assert tok.token_bytes(200006) == b"<|start|>"
    with pytest.raises(ValueError):
        tok.token_bytes(VOCAB)


def _stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    dec = tok.stream_decoder()
    chunks = [dec.feed(i) for i in ids]
    chunks.append(dec.flush())
    return chunks


def test_stream_splits_only_between_characters(tok: Tokenizer) -> None:
    ids = tok.encode("Rust 🦀!")
    assert ids == [148562, 9552, 99, 222, 0]  # the crab's 4 bytes span three tokens
    assert _stream(tok, ids) == ["Rust", " ", "", "🦀", "!", ""]


MULTIBYTE = [
    "Grüße aus München! 今天天气怎么样？ 🦀🫠👋🏽 👨‍👩‍👧 🇺🇦",  # noqa: RUF001
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ꙮ ﷽ नमस्ते Ελληνικά",  # noqa: RUF001
    *(c["text"] for c in CASES if any(ord(ch) > 127 for ch in c["text"])),
]


@pytest.mark.parametrize("text", MULTIBYTE)
def test_stream_multibyte_equals_full_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == tok.decode(ids) == text
    for chunk in chunks:
        assert "\ufffd" not in chunk


def test_stream_truncated_and_invalid_bytes(tok: Tokenizer) -> None:
    # 4103 = b"\xf0\x9f" (start of a 4-byte character): cut off at the end -> one U+FFFD.
    assert _stream(tok, [4103]) == ["", "\ufffd"]
    assert tok.decode([4103]) == "\ufffd"
    # A lone continuation byte (99 = b"\xa6") cannot start a character: replaced immediately.
    assert _stream(tok, [99, 64]) == ["\ufffd", "a", ""]
    # A broken sequence followed by a special token.
    assert "".join(_stream(tok, [4103, 200007])) == tok.decode([4103, 200007])


def test_stream_random_ids_equal_full_decode(tok: Tokenizer) -> None:
    # Random ids, biased toward tokens that are partial UTF-8, must still agree with decode().
    rng = np.random.default_rng(1234)
    partial = [i for i in range(VOCAB) if b"\xef\xbf\xbd" in tok.decode([i]).encode()]
    assert len(partial) > 1000
    for _ in range(300):
        n = int(rng.integers(1, 24))
        pool = rng.choice(partial, size=n)
        anywhere = rng.integers(0, VOCAB, size=n)
        ids = np.where(rng.random(n) < 0.7, pool, anywhere).tolist()
        assert "".join(_stream(tok, ids)) == tok.decode(ids), ids


def test_from_model_dir(tmp_path: Path, tok: Tokenizer) -> None:
    from gpt_oss_cpu import _resources

    (tmp_path / "tokenizer.json").write_bytes(_resources.bundled_tokenizer_json())
    (tmp_path / "original").mkdir()
    loaded = Tokenizer.from_model_dir(tmp_path / "original")  # found in the parent
    assert loaded.source == str(tmp_path / "tokenizer.json")
    assert loaded.encode("Hello, world!") == [13225, 11, 2375, 0]
    assert loaded.vocab_size == VOCAB


def test_from_model_dir_missing(tmp_path: Path) -> None:
    (tmp_path / "original").mkdir()
    with pytest.raises(TokenizerNotFoundError) as info:
        Tokenizer.from_model_dir(tmp_path / "original")
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(tmp_path / "original" / "tokenizer.json") in message
    assert str(tmp_path / "tokenizer.json") in message
    assert info.value.tried == [
        tmp_path / "original" / "tokenizer.json",
        tmp_path / "tokenizer.json",
    ]

    # A directory not named original/ is the only place looked at.
    with pytest.raises(TokenizerNotFoundError) as info:
        Tokenizer.from_model_dir(tmp_path)
    assert info.value.tried == [tmp_path / "tokenizer.json"]


def test_invalid_tokenizer_file(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(InvalidTokenizerError, match=r"tokenizer\.json"):
        Tokenizer.from_file(bad)
    with pytest.raises(TokenizerNotFoundError):
        Tokenizer.from_file(tmp_path / "absent.json")
