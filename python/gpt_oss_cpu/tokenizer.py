"""The o200k_harmony tokenizer: a typed wrapper over the Hugging Face ``tokenizers`` package.

gpt-oss uses ``o200k_harmony``: the ``o200k_base`` byte-level BPE plus special tokens such as
``<|start|>`` (200006), ``<|return|>`` (200002) and ``<|reserved_N|>`` up to id 201087.
Ids 0..199997 are ordinary tokens; every one of the model's 201,088 ids decodes.

Example:
    >>> from gpt_oss_cpu.tokenizer import Tokenizer
    >>> tok = Tokenizer.bundled()
    >>> tok.encode("Hello, world!")
    [13225, 11, 2375, 0]
    >>> tok.decode([13225, 11, 2375, 0])
    'Hello, world!'
"""

from __future__ import annotations

import codecs
import functools
import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import tokenizers
import tokenizers.decoders

__all__ = [
    "InvalidTokenizerError",
    "StreamDecoder",
    "Tokenizer",
    "TokenizerNotFoundError",
]

TOKENIZER_FILENAME = "tokenizer.json"


class TokenizerNotFoundError(FileNotFoundError):
    """No ``tokenizer.json`` was found; ``tried`` lists every path that was looked at.

    Example:
        >>> try:
        ...     Tokenizer.from_model_dir("/nonexistent")
        ... except TokenizerNotFoundError as e:
        ...     print(e.tried)
        [PosixPath('/nonexistent/tokenizer.json')]
    """

    def __init__(self, tried: Sequence[Path]) -> None:
        self.tried: list[Path] = list(tried)
        paths = ", ".join(str(p) for p in self.tried)
        super().__init__(f"tokenizer file not found (tried: {paths})")


class InvalidTokenizerError(ValueError):
    """A tokenizer file exists but the ``tokenizers`` package cannot load it."""


def _byte_level_table() -> dict[str, int]:
    """The GPT-2 byte-level alphabet, inverted: one printable character per byte value.

    Bytes that are printable (``!``..``~``, ``¡``..``¬``, ``®``..``ÿ``) stand for themselves; the
    other 68 bytes (controls, space, soft hyphen, ...) map, in byte order, to U+0100, U+0101, ...
    """
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    shifted = (b for b in range(256) if b not in table.values())
    for n, b in enumerate(shifted):
        table[chr(256 + n)] = b
    return table


_BYTE_OF_CHAR = _byte_level_table()


class Tokenizer:
    """o200k_harmony tokenizer: text <-> token ids, plus a streaming decoder.

    Thread-safe: one instance can be shared by many threads.

    Example:
        >>> tok = Tokenizer.bundled()
        >>> tok.vocab_size
        201088
        >>> tok.encode("<|start|>user", allow_special=True)
        [200006, 1428]
        >>> tok.encode("<|start|>user")  # special strings are plain text by default
        [27, 91, 5236, 91, 29, 1428]
    """

    def __init__(self, inner: tokenizers.Tokenizer, *, source: str = "<memory>") -> None:
        """Wrap an already loaded ``tokenizers.Tokenizer`` (prefer the ``from_*`` constructors)."""
        self._inner = inner
        self._source = source
        self._vocab_size = int(inner.get_vocab_size(with_added_tokens=True))
        added = inner.get_added_tokens_decoder()
        self._special_ids = frozenset(i for i, t in added.items() if t.special)
        # Ordinary encoding is the default state. `encode_special_tokens = True` makes the
        # tokenizers package treat added-token strings like any other text.
        self._inner.encode_special_tokens = True
        self._mode_lock = threading.Lock()
        self._bytes_cache: dict[int, bytes] = {}

    # ----------------------------------------------------------------------------- constructors

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a Hugging Face ``tokenizer.json``.

        Raises:
            TokenizerNotFoundError: the file does not exist.
            InvalidTokenizerError: the file cannot be parsed.

        Example:
            >>> tok = Tokenizer.from_file("gpt-oss-20b/tokenizer.json")  # doctest: +SKIP
        """
        path = Path(path)
        if not path.is_file():
            raise TokenizerNotFoundError([path])
        try:
            inner = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers package raises a bare Exception
            raise InvalidTokenizerError(f"{path}: cannot load tokenizer: {e}") from e
        return cls(inner, source=str(path))

    @classmethod
    def from_json(cls, data: str | bytes, *, source: str = "<memory>") -> Tokenizer:
        """Load a tokenizer from the contents of a ``tokenizer.json``.

        Example:
            >>> text = open("tokenizer.json", "rb").read()  # doctest: +SKIP
            >>> tok = Tokenizer.from_json(text)  # doctest: +SKIP
        """
        if isinstance(data, str):
            data = data.encode("utf-8")
        try:
            inner = tokenizers.Tokenizer.from_buffer(data)
        except Exception as e:
            raise InvalidTokenizerError(f"{source}: cannot load tokenizer: {e}") from e
        return cls(inner, source=source)

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike[str]) -> Tokenizer:
        """Load ``tokenizer.json`` from a checkpoint directory.

        Looks in ``model_dir`` first; when ``model_dir`` is an ``original/`` subdirectory of a
        Hugging Face checkout, also looks in its parent.

        Raises:
            TokenizerNotFoundError: no candidate exists; the message names every path tried.

        Example:
            >>> tok = Tokenizer.from_model_dir("gpt-oss-20b/original")  # doctest: +SKIP
        """
        model_dir = Path(model_dir)
        candidates = [model_dir / TOKENIZER_FILENAME]
        if model_dir.name == "original":
            candidates.append(model_dir.parent / TOKENIZER_FILENAME)
        for candidate in candidates:
            if candidate.is_file():
                return cls.from_file(candidate)
        raise TokenizerNotFoundError(candidates)

    @classmethod
    def bundled(cls) -> Tokenizer:
        """The o200k_harmony tokenizer shipped inside the package (cached; loads in ~1 s).

        Example:
            >>> Tokenizer.bundled().decode([200006])
            '<|start|>'
        """
        return _bundled_tokenizer()

    # ------------------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (201,088 for o200k_harmony)."""
        return self._vocab_size

    @property
    def source(self) -> str:
        """Where the tokenizer was loaded from (a path, or a description)."""
        return self._source

    @property
    def inner(self) -> tokenizers.Tokenizer:
        """The wrapped ``tokenizers.Tokenizer`` (its ``encode_special_tokens`` is kept True)."""
        return self._inner

    def is_special(self, token_id: int) -> bool:
        """True for special tokens such as ``<|start|>`` or ``<|reserved_200019|>``.

        Example:
            >>> tok = Tokenizer.bundled()
            >>> tok.is_special(200006), tok.is_special(13225)
            (True, False)
        """
        return token_id in self._special_ids

    # ------------------------------------------------------------------------ encode / decode

    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Encode text to token ids (no BOS or any other token is added).

        With ``allow_special=False`` (the default, and what Harmony rendering needs) a string like
        ``"<|start|>"`` in ``text`` is encoded as ordinary text. With ``allow_special=True`` such
        strings become their special ids.

        Example:
            >>> tok = Tokenizer.bundled()
            >>> tok.encode("What is 2 + 2?")
            [4827, 382, 220, 17, 659, 220, 17, 30]
            >>> tok.encode("<|end|>", allow_special=True)
            [200007]
        """
        if not isinstance(text, str):
            raise TypeError(f"encode() expects str, got {type(text).__name__}")
        with self._mode_lock:
            if not allow_special:
                return list(self._inner.encode(text, add_special_tokens=False).ids)
            self._inner.encode_special_tokens = False
            try:
                return list(self._inner.encode(text, add_special_tokens=False).ids)
            finally:
                self._inner.encode_special_tokens = True

    def decode(
        self, ids: Iterable[int] | npt.ArrayLike, *, skip_special_tokens: bool = False
    ) -> str:
        """Decode token ids (a list or a 1-D integer numpy array) to text.

        Invalid UTF-8 (for example half of a multi-byte character) becomes U+FFFD. Special tokens
        decode to their names unless ``skip_special_tokens`` is set.

        Raises:
            ValueError: an id is negative or ``>= vocab_size``, or ``ids`` is not 1-D.
            TypeError: ``ids`` are not integers.

        Example:
            >>> tok = Tokenizer.bundled()
            >>> tok.decode(np.array([200006, 1428], dtype=np.int32))
            '<|start|>user'
            >>> tok.decode([200006, 1428], skip_special_tokens=True)
            'user'
        """
        id_list = self._check_ids(ids)
        return self._inner.decode(id_list, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """The id of a vocabulary entry, or None.

        Ordinary entries are spelled in the byte-level alphabet (a leading space is ``Ġ``).

        Example:
            >>> tok = Tokenizer.bundled()
            >>> tok.token_to_id("<|return|>"), tok.token_to_id("Ġis"), tok.token_to_id("no such")
            (200002, 382, None)
        """
        result = self._inner.token_to_id(token)
        return None if result is None else int(result)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary entry of an id (byte-level spelling), or None if out of range.

        Example:
            >>> Tokenizer.bundled().id_to_token(382)
            'Ġis'
        """
        if not 0 <= token_id < self._vocab_size:
            return None
        return self._inner.id_to_token(int(token_id))

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (special tokens: the UTF-8 of their name).

        Example:
            >>> Tokenizer.bundled().token_bytes(382)
            b' is'
        """
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} out of range [0, {self._vocab_size})")
        if not isinstance(self._inner.decoder, tokenizers.decoders.ByteLevel):
            raise ValueError(f"{self._source}: token bytes need a byte-level tokenizer")
        token = self._inner.id_to_token(token_id)
        if token is None:  # a hole in the vocabulary: decodes to nothing
            data = b""
        else:
            # Same rule as the tokenizers ByteLevel decoder: alphabet characters are bytes, any
            # other character (only in added tokens) stands for its own UTF-8 encoding.
            data = b"".join(
                bytes((_BYTE_OF_CHAR[c],)) if c in _BYTE_OF_CHAR else c.encode("utf-8")
                for c in token
            )
        self._bytes_cache[token_id] = data
        return data

    def stream_decoder(self, *, skip_special_tokens: bool = False) -> StreamDecoder:
        """A decoder for generated tokens that are fed one at a time.

        Example:
            >>> tok = Tokenizer.bundled()
            >>> dec = tok.stream_decoder()
            >>> [dec.feed(i) for i in tok.encode("Rust 🦀!")]  # the crab is split over 3 tokens
            ['Rust', ' ', '', '🦀', '!']
            >>> dec.flush()
            ''
        """
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"Tokenizer(source={self._source!r}, vocab_size={self._vocab_size})"

    def _check_ids(self, ids: Iterable[int] | npt.ArrayLike) -> list[int]:
        if isinstance(ids, np.ndarray):
            arr = ids
        else:
            arr = np.asarray(ids if isinstance(ids, Sequence) else list(ids))  # type: ignore[arg-type]
        if arr.ndim != 1:
            raise ValueError(f"token ids must be 1-D, got shape {arr.shape}")
        if arr.size == 0:
            return []
        if arr.dtype.kind not in "iu":
            raise TypeError(f"token ids must be integers, got dtype {arr.dtype}")
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= self._vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} out of range [0, {self._vocab_size})")
        return [int(i) for i in arr.tolist()]


class StreamDecoder:
    """Turns a stream of token ids into text, never splitting a multi-byte character.

    ``feed`` returns the text completed by that token (often ``""`` while a character is still
    incomplete); ``flush`` returns what is left at the end (U+FFFD for a truncated character).
    The concatenation of everything returned equals ``tokenizer.decode(all_ids)``.

    Example:
        >>> tok = Tokenizer.bundled()
        >>> dec = tok.stream_decoder()
        >>> "".join(dec.feed(i) for i in tok.encode("Grüße 👋")) + dec.flush()
        'Grüße 👋'
    """

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        """Prefer :meth:`Tokenizer.stream_decoder`."""
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        token_id = int(token_id)
        if self._skip_special and self._tokenizer.is_special(token_id):
            return ""
        return self._utf8.decode(self._tokenizer.token_bytes(token_id))

    def flush(self) -> str:
        """Return the buffered remainder (U+FFFD if a character was cut off) and reset."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out

    def reset(self) -> None:
        """Drop any buffered bytes."""
        self._utf8.reset()


@functools.cache
def _bundled_tokenizer() -> Tokenizer:
    from . import _resources

    return Tokenizer.from_json(
        _resources.bundled_tokenizer_json(), source="gpt_oss_cpu bundled o200k_harmony"
    )
