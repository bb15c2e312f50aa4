"""Data files shipped inside the package (the o200k_harmony tokenizer).

The 28 MB ``tokenizer.json`` is stored xz-compressed (about 2.9 MB) under
``gpt_oss_cpu/data/o200k_harmony/``; :func:`bundled_tokenizer_json` returns the decompressed bytes.
``tokenizer_config.json`` is stored as is. Both come from the golden reference data (o200k_harmony
built from the real o200k_base ranks, every id 0..201087 named; see the README.txt next to them).

Example:
    >>> import json
    >>> from gpt_oss_cpu._resources import bundled_tokenizer_json
    >>> json.loads(bundled_tokenizer_json())["model"]["type"]
    'BPE'
"""

from __future__ import annotations

import functools
import hashlib
import lzma
from pathlib import Path

__all__ = [
    "TOKENIZER_JSON_SHA256",
    "bundled_tokenizer_config_json",
    "bundled_tokenizer_json",
    "data_dir",
]

#: sha256 of the decompressed ``tokenizer.json`` (identical to the reference copy).
TOKENIZER_JSON_SHA256 = "9e5b4dd5a2c93545398042105594b33105f7feda60510b201370058d25833e9a"


def data_dir() -> Path:
    """Directory holding the bundled o200k_harmony tokenizer files.

    Example:
        >>> (data_dir() / "tokenizer_config.json").is_file()
        True
    """
    return Path(__file__).resolve().parent / "data" / "o200k_harmony"


@functools.cache
def bundled_tokenizer_json() -> bytes:
    """Return the bundled o200k_harmony ``tokenizer.json`` (Hugging Face format), decompressed.

    The result is cached (about 28 MB); the sha256 is checked against
    :data:`TOKENIZER_JSON_SHA256` so a damaged install fails loudly instead of mis-tokenizing.

    Example:
        >>> len(bundled_tokenizer_json()) > 20_000_000
        True
    """
    path = data_dir() / "tokenizer.json.xz"
    try:
        data = lzma.decompress(path.read_bytes())
    except (OSError, lzma.LZMAError) as exc:
        raise OSError(f"cannot read the bundled tokenizer {path}: {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != TOKENIZER_JSON_SHA256:
        raise OSError(
            f"bundled tokenizer {path} is corrupt: sha256 {digest}, "
            f"expected {TOKENIZER_JSON_SHA256}"
        )
    return data


def bundled_tokenizer_config_json() -> bytes:
    """Return the bundled ``tokenizer_config.json`` bytes (PreTrainedTokenizerFast settings).

    Example:
        >>> import json
        >>> json.loads(bundled_tokenizer_config_json())["eos_token"]
        '<|return|>'
    """
    return (data_dir() / "tokenizer_config.json").read_bytes()
