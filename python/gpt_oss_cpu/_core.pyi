"""Type stubs for the Rust extension module ``gpt_oss_cpu._core``.

Users import from :mod:`gpt_oss_cpu`; this module is the narrow boundary the Python layer wraps.
"""

from collections.abc import Callable
from typing import Literal

import numpy as np
import numpy.typing as npt

__version__: str

class GptOssError(Exception):
    """Base class of every error raised by gpt_oss_cpu."""

class CheckpointError(GptOssError):
    """A checkpoint file or tensor is missing, truncated, corrupt, misshaped or mistyped."""

class ConfigError(GptOssError, ValueError):
    """config.json is missing, unreadable, or holds a value the engine cannot use."""

class InputError(GptOssError, ValueError):
    """A call got bad arguments: token ids out of range, empty input, bad sizes."""

class ContextOverflowError(GptOssError):
    """Appending would exceed the session's ``max_context`` (the cache never wraps silently)."""

class Config:
    """Model hyper-parameters read from ``config.json`` (Hugging Face or ``original/`` keys)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    intermediate_size: int
    sliding_window: int
    layer_types: list[str]
    rope_theta: float
    rope_scaling_factor: float
    rope_beta_fast: float
    rope_beta_slow: float
    rope_original_max_position_embeddings: int
    rope_truncate: bool
    swiglu_limit: float
    rms_norm_eps: float
    max_position_embeddings: int
    eos_token_ids: list[int]
    def to_dict(self) -> dict[str, object]: ...

class Engine:
    """A memory-mapped gpt-oss checkpoint and the thread pool that runs it."""

    @staticmethod
    def load(
        path: str,
        threads: int | None = None,
        isa: Literal["scalar", "avx2", "avx512", "neon"] | None = None,
        precision: Literal["exact", "fast"] = "exact",
        dense: Literal["bf16", "q8"] = "bf16",
        kv_cache: Literal["f32", "bf16"] = "f32",
        progress: Callable[[int, int], object] | None = None,
    ) -> Engine: ...
    @property
    def config(self) -> Config: ...
    @property
    def layout(self) -> Literal["hf", "original"]: ...
    @property
    def path(self) -> str: ...
    @property
    def threads(self) -> int: ...
    @property
    def isa(self) -> Literal["scalar", "avx2", "avx512", "neon"]: ...
    @property
    def precision(self) -> Literal["exact", "fast"]: ...
    @property
    def dense(self) -> Literal["bf16", "q8"]: ...
    @property
    def kv_cache(self) -> Literal["f32", "bf16"]: ...
    @property
    def checkpoint_bytes(self) -> int: ...
    def measure_read_bandwidth(self, repeats: int = 3) -> float: ...
    def forward(self, ids: npt.ArrayLike, start_position: int = 0) -> npt.NDArray[np.float32]: ...
    def trace(
        self, ids: npt.ArrayLike, start_position: int = 0
    ) -> tuple[
        npt.NDArray[np.float32],
        npt.NDArray[np.int32],
        npt.NDArray[np.float32],
        npt.NDArray[np.float32],
    ]: ...
    def session(self, max_context: int) -> Session: ...
    def load_session(self, path: str) -> Session: ...

class Sampler:
    """Chooses the next token from logits.

    Steps, in order: ``repetition_penalty`` (divide positive / multiply negative logits of tokens in
    the history), ``presence_penalty`` + ``frequency_penalty * count`` subtracted over the history,
    ``logit_bias`` added; then temperature 0 is greedy argmax (lowest id on ties), otherwise the
    logits are divided by ``temperature`` and cut by ``top_k`` (0 = off), ``top_p`` and ``min_p``
    (relative to the most likely token) before a seeded draw. The history is every token this
    sampler drew plus those given to :meth:`accept`. With ``logprobs=n`` each draw records
    ``log_softmax`` of the logits after penalties, bias and temperature (temperature 1 when
    greedy), before the cuts.

    Example:
        >>> s = Sampler(0.8, top_k=40, seed=1, logprobs=2)         # doctest: +SKIP
        >>> token = s.sample(logits)                              # doctest: +SKIP
        >>> s.last_logprobs()      # [(id, logprob), (id, logprob)], best first  # doctest: +SKIP
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_p: float = 1.0,
        seed: int | None = None,
        *,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
        presence_penalty: float = 0.0,
        frequency_penalty: float = 0.0,
        logit_bias: dict[int, float] | None = None,
        logprobs: int = 0,
    ) -> None: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def min_p(self) -> float: ...
    @property
    def repetition_penalty(self) -> float: ...
    @property
    def presence_penalty(self) -> float: ...
    @property
    def frequency_penalty(self) -> float: ...
    @property
    def logit_bias(self) -> dict[int, float]: ...
    @property
    def logprobs(self) -> int: ...
    @property
    def history(self) -> list[int]: ...
    def sample(self, logits: npt.NDArray[np.float32]) -> int: ...
    def accept(self, token: int) -> None: ...
    def clear_history(self) -> None: ...
    def last_logprobs(self) -> list[tuple[int, float]]: ...
    def last_token_logprob(self) -> tuple[int, float] | None: ...

class Session:
    """A KV cache bound to one Engine: incremental decoding with prefix reuse."""

    @property
    def position(self) -> int: ...
    @property
    def max_context(self) -> int: ...
    @property
    def tokens(self) -> list[int]: ...
    @property
    def cache_bytes(self) -> int: ...
    def append(
        self, ids: npt.ArrayLike, return_logits: bool = True
    ) -> npt.NDArray[np.float32] | None: ...
    def sample(self, sampler: Sampler) -> int: ...
    def truncate(self, n: int) -> None: ...
    def save(self, path: str) -> None: ...
    def reset(self) -> None: ...

def build_info() -> dict[str, object]: ...
def matmul_bf16(
    x: npt.NDArray[np.float32],
    w: npt.NDArray[np.uint16],
    isa: Literal["scalar", "avx2", "avx512", "neon"] | None = None,
    precision: Literal["exact", "fast"] = "exact",
) -> npt.NDArray[np.float32]: ...

class Q8Weights:
    """One matrix in the 8-bit format of ``dense="q8"``, as :func:`quantize_q8` makes it."""

    @property
    def shape(self) -> tuple[int, int]: ...
    @property
    def nbytes(self) -> int: ...

def quantize_q8(w: npt.NDArray[np.uint16]) -> Q8Weights: ...
def matmul_q8(
    x: npt.NDArray[np.float32],
    weights: Q8Weights,
    isa: Literal["scalar", "avx2", "avx512", "neon"] | None = None,
) -> npt.NDArray[np.float32]: ...
def matmul_mxfp4(
    x: npt.NDArray[np.float32],
    blocks: npt.NDArray[np.uint8],
    scales: npt.NDArray[np.uint8],
    isa: Literal["scalar", "avx2", "avx512", "neon"] | None = None,
    precision: Literal["exact", "fast"] = "exact",
) -> npt.NDArray[np.float32]: ...
