"""The user-facing model API: :class:`Model` (weights + tokenizer) and :class:`Session` (KV cache).

Compute happens in the Rust extension with the GIL released; this module only adapts types.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt

from . import _core
from ._core import Config, InputError

#: The kernel instruction sets (``Model.load(isa=...)``, ``GPT_OSS_CPU_ISA``).
IsaName = Literal["scalar", "avx2", "avx512", "neon"]

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

TokenIds = Sequence[int] | npt.NDArray[np.integer]

#: Stop tokens for chat completions: ``<|return|>`` and ``<|call|>`` (SPEC §5.4).
CHAT_STOP_TOKENS: tuple[int, ...] = (200002, 200012)


def _as_token_array(ids: TokenIds | int) -> npt.NDArray[np.int64]:
    """Validates token ids (a 1-D integer sequence) and returns them as an int64 array."""
    array = np.asarray(ids)
    if array.ndim == 0:
        array = array.reshape(1)
    if array.ndim != 1:
        raise InputError(f"token ids must be 1-D, found an array of shape {array.shape}")
    if array.size == 0:
        raise InputError("no token ids given")
    if not np.issubdtype(array.dtype, np.integer):
        raise InputError(f"token ids must be integers, found dtype {array.dtype}")
    return np.ascontiguousarray(array, dtype=np.int64)


@dataclass(frozen=True)
class Trace:
    """A forward pass with the internals the golden reference data records.

    Attributes:
        logits: ``float32 [T, vocab]``.
        router_topk_idx: ``int32 [layers, T, k]``, chosen experts by descending router logit.
        router_topk_weights: ``float32 [layers, T, k]``, softmax over the chosen router logits.
        layer_outputs: ``float32 [layers, T, hidden]``, residual stream after each layer.
    """

    logits: npt.NDArray[np.float32]
    router_topk_idx: npt.NDArray[np.int32]
    router_topk_weights: npt.NDArray[np.float32]
    layer_outputs: npt.NDArray[np.float32]


class Model:
    """A gpt-oss checkpoint, memory-mapped, ready to run.

    Example:
        >>> model = Model.load("gpt-oss-20b")                      # doctest: +SKIP
        >>> ids = model.tokenizer.encode("Hello")                  # doctest: +SKIP
        >>> model.forward(ids).shape                               # doctest: +SKIP
        (1, 201088)
    """

    def __init__(self, engine: _core.Engine) -> None:
        self._engine = engine
        self._tokenizer: Tokenizer | None = None

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        threads: int | None = None,
        isa: IsaName | None = None,
        precision: Literal["exact", "fast"] = "exact",
        dense: Literal["bf16", "q8"] = "bf16",
        kv_cache: Literal["f32", "bf16"] = "f32",
        progress: Callable[[int, int], object] | None = None,
    ) -> Model:
        """Maps a checkpoint directory and checks every tensor's name, dtype and shape.

        Args:
            path: a Hugging Face layout directory (``config.json`` and ``model.safetensors`` or
                shards with ``model.safetensors.index.json``), or an ``original/`` layout directory.
            threads: compute threads (default: one per physical core this process may use).
            isa: kernel instruction set (default: the best this CPU has, or the environment
                variable ``GPT_OSS_CPU_ISA``). ``"scalar"`` is the portable reference.
            precision: ``"exact"`` (default) keeps every activation in fp32, as SPEC §4 computes
                them. ``"fast"`` rounds the activations entering the weight products, to 8 bits per
                block of 32 for the MXFP4 experts (integer dot products, as llama.cpp does) and to
                bf16 for attention and unembedding (the router stays exact): prefill about 1.9x
                faster on an AVX-512 VNNI CPU, decode up to 1.1x, with logits that differ from the
                exact ones about as much as a bf16 implementation's do. The README gives the
                measured speed and accuracy.
            dense: ``"bf16"`` (default) reads the attention and unembedding matrices in place from
                the checkpoint. ``"q8"`` requantizes them at load to 8 bits per value with a bf16
                scale per 32 (as ggml's published GGUF stores them, with an f16 scale): 1.3 GB
                instead of 2.4 GB read per decoded token. The first load writes them to a cache
                file (``$XDG_CACHE_HOME/gpt-oss-cpu/dense-q8/``, 1.3 GB for the 20b, 2-7 s
                depending on the disk, see ``progress``); later loads map it. The bf16 pages are
                released.
                Needs ``precision="fast"``.
            kv_cache: the element type of the sessions' cached keys and values: ``"f32"``
                (default) or ``"bf16"`` (rounded to nearest even): half the memory (the 20b's
                full-attention layers take 24 KiB per token instead of 48), and half the bytes
                attention reads per decoded token, which matters at long context (at depth 16384,
                0.41 GB instead of 0.81 GB per token). Logits then differ from the exact ones.
            progress: called as ``progress(done, total)`` (bytes, on the calling thread, last
                with ``done == total``) while a ``dense="q8"`` load builds the 8-bit weights: the
                first load of a checkpoint, or every load where no cache file can be written; the
                only part of a load that takes long. An exception it raises cancels the build
                (no cache file is kept) and propagates from ``load``; so does Ctrl-C.

        Raises:
            CheckpointError: a file or tensor is missing, truncated, corrupt, misshaped or mistyped.
            ConfigError: ``config.json`` is missing or invalid.
            InputError: an unknown ``isa``, ``precision``, ``dense`` or ``kv_cache``, an
                instruction set this CPU lacks, or ``dense="q8"`` without ``precision="fast"``.
        """
        engine = _core.Engine.load(
            os.fspath(path), threads, isa, precision, dense, kv_cache, progress
        )
        return cls(engine)

    @property
    def config(self) -> Config:
        """Hyper-parameters from ``config.json``."""
        return self._engine.config

    @property
    def path(self) -> Path:
        """The checkpoint directory."""
        return Path(self._engine.path)

    @property
    def layout(self) -> str:
        """``"hf"`` or ``"original"``."""
        return self._engine.layout

    @property
    def threads(self) -> int:
        """Size of this model's compute thread pool."""
        return self._engine.threads

    @property
    def isa(self) -> IsaName:
        """Instruction set of the matrix kernels: ``"scalar"``, ``"avx2"``, ``"avx512"`` or
        ``"neon"``."""
        return self._engine.isa

    @property
    def precision(self) -> str:
        """``"exact"`` (fp32 activations) or ``"fast"`` (rounded activations, see :meth:`load`)."""
        return self._engine.precision

    @property
    def dense(self) -> str:
        """``"bf16"`` or ``"q8"``: the format of the attention and unembedding matrices."""
        return self._engine.dense

    @property
    def kv_cache(self) -> str:
        """``"f32"`` or ``"bf16"``: the element type of the sessions' cached keys and values."""
        return self._engine.kv_cache

    @property
    def checkpoint_bytes(self) -> int:
        """Bytes of tensor data in the checkpoint."""
        return self._engine.checkpoint_bytes

    @property
    def tokenizer(self) -> Tokenizer:
        """The checkpoint's tokenizer (``tokenizer.json`` beside the weights, or in the parent
        directory of an ``original/`` layout), loaded on first use."""
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer.from_model_dir(self.path)
        return self._tokenizer

    def forward(self, ids: TokenIds, start_position: int = 0) -> npt.NDArray[np.float32]:
        """Logits at every position of ``ids``, with no cache kept.

        Args:
            ids: token ids, 1-D.
            start_position: position of the first token (RoPE is relative, so logits barely move).

        Returns:
            ``float32 [len(ids), vocab_size]``.
        """
        return self._engine.forward(_as_token_array(ids), start_position)

    def trace(self, ids: TokenIds, start_position: int = 0) -> Trace:
        """Like :meth:`forward`, also returning router choices and per-layer residual streams."""
        return Trace(*self._engine.trace(_as_token_array(ids), start_position))

    def session(self, max_context: int = 8192) -> Session:
        """A new conversation state with room for ``max_context`` tokens.

        Example:
            >>> with model.session(max_context=4096) as session:   # doctest: +SKIP
            ...     logits = session.append(ids)
        """
        return Session(self._engine.session(max_context), self)

    def __repr__(self) -> str:
        return f"Model({str(self.path)!r}, layout={self.layout!r}, {self.config!r})"


#: ``f(token_ids, logits) -> logits | None``: edits the float32 ``[vocab]`` logits before sampling.
LogitsProcessor = Callable[[list[int], npt.NDArray[np.float32]], "npt.NDArray[np.float32] | None"]

_SAMPLING_DEFAULTS: dict[str, object] = {
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "presence_penalty": 0.0,
    "frequency_penalty": 0.0,
    "logit_bias": None,
}


def _apply_processors(
    processors: Sequence[LogitsProcessor],
    token_ids: list[int],
    logits: npt.NDArray[np.float32],
) -> npt.NDArray[np.float32]:
    """Runs user logits processors in order; each may edit ``logits`` or return new ones."""
    for processor in processors:
        result = processor(list(token_ids), logits)
        if result is not None:
            result = np.ascontiguousarray(result, dtype=np.float32)
            if result.shape != logits.shape:
                raise InputError(
                    f"logits processor {processor!r} returned shape {result.shape}, "
                    f"expected {logits.shape}"
                )
            logits = result
    return logits


class Session:
    """A KV cache over one :class:`Model`: append tokens, generate, roll back.

    Use it as a context manager to free the cache deterministically.
    """

    def __init__(self, inner: _core.Session, model: Model | None = None) -> None:
        self._inner: _core.Session | None = inner
        # The model whose tokenizer chat() uses by default.
        self._model = model

    @property
    def _session(self) -> _core.Session:
        if self._inner is None:
            raise InputError("this session is closed")
        return self._inner

    @property
    def position(self) -> int:
        """Number of tokens in the cache."""
        return self._session.position

    @property
    def max_context(self) -> int:
        """Capacity in tokens; appending beyond it raises :class:`ContextOverflowError`."""
        return self._session.max_context

    @property
    def tokens(self) -> list[int]:
        """The token ids in the cache, in order."""
        return self._session.tokens

    @property
    def cache_bytes(self) -> int:
        """Memory held by the cached keys and values (see ``kv_cache`` in :meth:`Model.load`)."""
        return self._session.cache_bytes

    def append(self, ids: TokenIds) -> npt.NDArray[np.float32]:
        """Runs ``ids`` after the cached tokens.

        Returns:
            ``float32 [vocab_size]``: the logits after the last appended token.
        """
        logits = self._session.append(_as_token_array(ids), True)
        assert logits is not None
        return logits

    def truncate(self, n: int) -> None:
        """Keeps the first ``n`` tokens (to reuse a shared prompt prefix)."""
        self._session.truncate(n)

    def reset(self) -> None:
        """Empties the cache."""
        self._session.reset()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes the cached tokens, keys and values and the last logits to ``path``.

        Example:
            >>> session.save("conversation.kv")                    # doctest: +SKIP
            >>> resumed = Session.load(model, "conversation.kv")   # doctest: +SKIP
        """
        self._session.save(os.fspath(path))

    @classmethod
    def load(cls, model: Model, path: str | os.PathLike[str]) -> Session:
        """Resumes a session saved by :meth:`save` without recomputing it.

        Raises:
            InputError: the file is not a session file, is truncated, or was saved with another
                model (the message gives both model fingerprints), with other ``precision`` /
                ``dense`` settings (its keys and values were computed with those), or with
                another ``kv_cache`` element type.
        """
        return cls(model._engine.load_session(os.fspath(path)), model)

    def generate(
        self,
        ids: TokenIds,
        max_new_tokens: int,
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: Iterable[int] = (),
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: Mapping[int, float] | None = None,
        logits_processors: Sequence[LogitsProcessor] = (),
        sampler: _core.Sampler | None = None,
    ) -> Iterator[int]:
        """Appends ``ids`` and yields new tokens one at a time.

        Greedy when ``temperature`` is 0; otherwise samples from ``softmax(logits / temperature)``
        within the ``top_p`` nucleus, reproducibly for a given ``seed``. A token in ``stop`` is
        yielded, then generation ends. Each yielded token enters the cache when the next one is
        requested, so afterwards the session holds everything generated except a final stop token
        (and except the last token if the caller stops iterating early).

        The other sampling keywords are those of :class:`gpt_oss_cpu.Sampler` (off by default):
        ``top_k``, ``min_p``, ``repetition_penalty``, ``presence_penalty`` and
        ``frequency_penalty`` (applied over the tokens generated by this call, as in OpenAI's
        API), and ``logit_bias`` (token id -> added logit). ``sampler`` replaces all of them with
        a ready :class:`gpt_oss_cpu.Sampler` (for instance to read ``last_logprobs()`` after each
        token); combining it with another sampling keyword raises :class:`InputError`.

        ``logits_processors`` are callables ``f(token_ids, logits)`` run in order before sampling
        on every step: ``token_ids`` is the list of tokens in the session (prompt and generated),
        ``logits`` the float32 ``[vocab]`` array, which ``f`` may edit in place (returning None)
        or replace by returning a new array of the same shape. With processors the logits make
        a round trip through Python at each step; without them sampling stays in Rust.

        Example:
            >>> for token in session.generate(ids, 32, stop=CHAT_STOP_TOKENS):  # doctest: +SKIP
            ...     print(model.tokenizer.decode([token]), end="")
            >>> def no_eos(token_ids, logits):                                  # doctest: +SKIP
            ...     logits[200002] = -np.inf
            >>> list(session.generate(ids, 8, temperature=0.7, top_k=40,        # doctest: +SKIP
            ...                       logits_processors=[no_eos]))
        """
        if max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be >= 0, found {max_new_tokens}")
        stop_set = frozenset(stop)
        options: dict[str, object] = {
            "top_k": top_k,
            "min_p": min_p,
            "repetition_penalty": repetition_penalty,
            "presence_penalty": presence_penalty,
            "frequency_penalty": frequency_penalty,
            "logit_bias": dict(logit_bias) if logit_bias else None,
        }
        if sampler is None:
            sampler = _core.Sampler(temperature, top_p, seed, **options)  # type: ignore[arg-type]
        elif (temperature, top_p, seed) != (0.0, 1.0, None) or any(
            value != _SAMPLING_DEFAULTS[name] for name, value in options.items()
        ):
            raise InputError("pass either a sampler or sampling keywords to generate, not both")
        processors = list(logits_processors)
        for processor in processors:
            if not callable(processor):
                raise InputError(f"logits processors must be callable, found {processor!r}")
        session = self._session
        logits = session.append(_as_token_array(ids), bool(processors))
        history = session.tokens if processors else []
        for _ in range(max_new_tokens):
            if processors:
                assert logits is not None
                token = sampler.sample(_apply_processors(processors, history, logits))
            else:
                token = session.sample(sampler)
            yield token
            if token in stop_set:
                return
            logits = session.append(np.array([token], dtype=np.int64), bool(processors))
            if processors:
                history.append(token)

    def close(self) -> None:
        """Frees the KV cache. The session cannot be used afterwards."""
        self._inner = None

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        if self._inner is None:
            return "Session(closed)"
        return f"Session(position={self.position}, max_context={self.max_context})"

    if TYPE_CHECKING:
        from .chat import ChatEvent, ChatResult

    def chat(
        self,
        messages: Sequence[Mapping[str, object]],
        *,
        reasoning_effort: Literal["low", "medium", "high"] = "medium",
        tools: Sequence[Mapping[str, object]] | None = None,
        stream: bool = True,
        max_tokens: int | None = None,
        stop: str | Sequence[str] | None = None,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        tokenizer: Tokenizer | None = None,
        **sampling: object,
    ) -> Iterator[ChatEvent] | ChatResult:
        """Answers OpenAI-style chat ``messages`` in the Harmony format (see :mod:`.chat`).

        Messages are dicts with roles ``system``/``developer``/``user``/``assistant``/``tool``
        (``tool_calls``, ``tool_call_id`` and ``reasoning_content`` as in OpenAI's API); ``tools``
        are OpenAI function schemas. Generation stops at ``<|return|>``, ``<|call|>``, a ``stop``
        string (stripped) or ``max_tokens``. The KV cache keeps the prefix shared with the
        previous turn. ``tokenizer`` defaults to the model's (or the bundled o200k_harmony one for
        a session made without a model); extra keywords go
        to :meth:`generate`. With ``stream=True`` yields :class:`~.chat.ReasoningDelta`,
        :class:`~.chat.ContentDelta`, :class:`~.chat.ToolCall` events and a final
        :class:`~.chat.Done` with usage; with ``stream=False`` returns a :class:`~.chat.ChatResult`.

        Example:
            >>> messages = [{"role": "user", "content": "Hi"}]
            >>> result = session.chat(messages, stream=False)          # doctest: +SKIP
            >>> result.content, result.usage["cached_tokens"]          # doctest: +SKIP
        """
        from . import chat
        from .tokenizer import TokenizerNotFoundError

        if tokenizer is None and self._model is not None:
            try:
                tokenizer = self._model.tokenizer
            except TokenizerNotFoundError:
                tokenizer = None  # chat falls back to the bundled o200k_harmony tokenizer
        return chat.chat(
            self,
            messages,
            reasoning_effort=reasoning_effort,
            tools=tools,
            stream=stream,
            max_tokens=max_tokens,
            stop=stop,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            tokenizer=tokenizer,
            **sampling,
        )
