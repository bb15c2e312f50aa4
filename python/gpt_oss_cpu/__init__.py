"""gpt-oss-cpu: OpenAI's gpt-oss models on a desktop CPU.

Example:
    >>> import gpt_oss_cpu                                        # doctest: +SKIP
    >>> model = gpt_oss_cpu.Model.load("gpt-oss-20b")             # doctest: +SKIP
    >>> with model.session(max_context=4096) as session:          # doctest: +SKIP
    ...     ids = model.tokenizer.encode("The capital of France is")
    ...     for token in session.generate(ids, max_new_tokens=8):
    ...         print(model.tokenizer.decode([token]), end="")

The synthetic checkpoint writer (:mod:`gpt_oss_cpu.synthetic`) imports without the compiled
extension.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._core import (
        CheckpointError,
        Config,
        ConfigError,
        ContextOverflowError,
        GptOssError,
        InputError,
        Sampler,
        build_info,
    )
    from .model import CHAT_STOP_TOKENS, Model, Session, Trace
    from .tokenizer import Tokenizer, TokenizerNotFoundError

__all__ = [
    "CHAT_STOP_TOKENS",
    "CheckpointError",
    "Config",
    "ConfigError",
    "ContextOverflowError",
    "GptOssError",
    "InputError",
    "Model",
    "Sampler",
    "Session",
    "Tokenizer",
    "TokenizerNotFoundError",
    "Trace",
    "__version__",
    "build_info",
]

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "._core",
    "Config": "._core",
    "ConfigError": "._core",
    "ContextOverflowError": "._core",
    "GptOssError": "._core",
    "InputError": "._core",
    "Sampler": "._core",
    "build_info": "._core",
    "CHAT_STOP_TOKENS": ".model",
    "Model": ".model",
    "Session": ".model",
    "Trace": ".model",
    "Tokenizer": ".tokenizer",
    "TokenizerNotFoundError": ".tokenizer",
}


def __getattr__(name: str) -> Any:
    # Lazy so that `gpt_oss_cpu.synthetic` works before the extension is built.
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'gpt_oss_cpu' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
