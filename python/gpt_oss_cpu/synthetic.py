"""Synthetic gpt-oss checkpoints: random weights in the exact Hugging Face layout.

:func:`write_checkpoint` writes a directory that looks like a download of ``openai/gpt-oss-20b``
(SPEC §1.1, §1.3, §2, §2.2): ``config.json``, ``generation_config.json``, the safetensors shards
``model-00000-of-0000N.safetensors`` (0-based, "of N-1") with ``model.safetensors.index.json``
(or a single ``model.safetensors`` when everything fits in one shard), ``tokenizer.json``,
``tokenizer_config.json`` and ``special_tokens_map.json``. Tensor names, shapes and dtypes are
those of the real checkpoint (BF16 everywhere except the experts' MXFP4 ``*_blocks`` /
``*_scales``, which are U8), so the engine's loader, memory use and speed can be exercised without
downloading 13 GB. The weights are random: the text a synthetic model produces is meaningless.

The safetensors files are produced here, streaming tensor by tensor in chunks of a few MiB (random
numbers are generated in a background thread while the previous chunk is written), so peak memory
stays around 100 MB even for the 65 GB gpt-oss-120b. Values depend only on ``(seed, tensor name)``,
not on how tensors are assigned to shards.

Example:
    >>> from gpt_oss_cpu import synthetic
    >>> plan = synthetic.plan_checkpoint("20b")
    >>> [s.filename for s in plan][-1]
    'model-00002-of-00002.safetensors'
    >>> sum(t.nbytes for s in plan for t in s.tensors)
    13761264768
    >>> path = synthetic.write_checkpoint("/tmp/gpt-oss-tiny", "tiny", seed=0, progress=False)

Choice of magnitudes (so that a forward pass is numerically non-trivial, like a trained model's):

* ``embed_tokens``: N(0, 1), so the residual stream starts with rms ~1.
* RMSNorm scales (``input_layernorm``, ``post_attention_layernorm``, ``model.norm``):
  1 + N(0, 0.05).
* BF16 projections (q/k/v/o): N(0, 1/sqrt(fan_in)), so each projection of an rms-1 input has
  rms ~1; q·k/8 over 64 dims then has std ~1 and attention is neither uniform nor one-hot.
* Biases N(0, 0.05) (router bias N(0, 0.1)); attention sinks N(0, 1).
* Router weight N(0, 1.5/sqrt(hidden)): router logits have std ~1.5, so the top-k choice varies from
  token to token and the top-k softmax weights are not degenerate.
* MXFP4 experts: uniformly random FP4 codes (all 16 codes, rms |value| = 2.93) and E8M0 scale
  bytes ``c - 1``, ``c`` or ``c + 1`` with ``c`` chosen from the fan-in
  (:func:`mxfp4_scale_center`) so that one expert matrix maps an rms-1 input to an output of
  rms ~``gain`` within a factor sqrt(2) (powers of two only); gain 1 for ``gate_up`` (gate and up
  have rms ~1, clamping at 7 is rare) and 2 for ``down`` (compensating the ~0.5 rms of the SwiGLU
  activation). For gpt-oss-20b this gives scale bytes 119 ± 1 (gate_up, fan-in 2880) and
  120 ± 1 (down).
* ``lm_head``: N(0, 2/sqrt(hidden)), so the logits have std ~2 (a spread like a trained model's).

BF16 normal values are drawn through a 65,536-entry table of standard-normal quantiles
(``mean + std * Phi^-1((k + 0.5) / 65536)``, rounded to bf16 to nearest-even) indexed by 16 random
bits, which is several times faster than generating float32 normals and rounding them (tails are
cut at 4.3 sigma, irrelevant here).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import queue
import re
import shutil
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any, Literal, TypeVar

import numpy as np

from ._resources import bundled_tokenizer_config_json, bundled_tokenizer_json

__all__ = [
    "CONFIGS",
    "Init",
    "Shard",
    "TensorSpec",
    "bundled_tokenizer_json",
    "checkpoint_index",
    "mxfp4_scale_center",
    "plan_checkpoint",
    "resolve_config",
    "tensor_specs",
    "write_checkpoint",
]

# --------------------------------------------------------------------------------------- configs

_SLIDING = "sliding_attention"
_FULL = "full_attention"


def _layer_types(num_layers: int) -> list[str]:
    """Alternating attention pattern of gpt-oss: layer 0 sliding, layer 1 full, ..."""
    return [_SLIDING if i % 2 == 0 else _FULL for i in range(num_layers)]


# openai/gpt-oss-20b config.json, every key of SPEC §1.1.
_HF_20B: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": _layer_types(24),
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
        "quant_method": "mxfp4",
    },
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}

_TINY_OVERRIDES: dict[str, Any] = {
    # The full o200k_harmony vocabulary, so the real tokenizer (and `gpt-oss-cpu generate`) works;
    # the two 201088 x 128 bf16 matrices (embedding, lm_head) are 103 MB of the ~105 MB file.
    # Everything else is tiny: 4 layers (2 sliding + 2 full, window 128 as in 20b), 4 query heads
    # sharing 2 KV heads (GQA group 2), 8 experts with top-4, and an intermediate size (192)
    # different from the hidden size (128) so that transposed expert matrices cannot go unnoticed.
    # Both sizes are multiples of 32 as MXFP4 requires.
    "hidden_size": 128,
    "intermediate_size": 192,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "num_local_experts": 8,
    "num_experts_per_tok": 4,
}

_INT_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "head_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "num_hidden_layers",
    "num_local_experts",
    "num_experts_per_tok",
    "experts_per_token",
    "sliding_window",
    "max_position_embeddings",
    "initial_context_length",
)


def resolve_config(config: str | Mapping[str, Any] = "20b") -> dict[str, Any]:
    """Return the complete Hugging Face ``config.json`` dict for a named or custom configuration.

    ``config`` is ``"20b"``, ``"120b"``, ``"tiny"`` or a mapping of Hugging Face config keys that
    override the gpt-oss-20b values. Derived keys follow the overrides: ``layer_types`` is
    rebuilt (alternating, sliding first) when ``num_hidden_layers`` changes,
    ``experts_per_token`` mirrors ``num_experts_per_tok`` (or the other way round),
    ``rope_scaling`` is merged key by key, and when the vocabulary is too small for the default
    token ids, ``eos_token_id`` / ``pad_token_id`` become ``vocab_size - 1`` / ``vocab_size - 2``
    (as in the reference tiny models).

    Raises:
        ValueError: unknown name or key, or sizes the architecture cannot use (hidden or
            intermediate size not a multiple of 32, heads not a multiple of KV heads,
            top-k > experts, ...).

    Example:
        >>> cfg = resolve_config({"num_hidden_layers": 2, "num_local_experts": 4})
        >>> cfg["layer_types"], cfg["num_experts_per_tok"]
        (['sliding_attention', 'full_attention'], 4)
    """
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(
                f"unknown config {config!r}; expected one of {sorted(CONFIGS)} or a dict"
            )
        return copy.deepcopy(CONFIGS[config])
    if not isinstance(config, Mapping):
        raise ValueError(f"config must be a name or a dict of config.json keys, not {config!r}")
    return _apply_overrides(dict(config))


def _apply_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(overrides) - set(_HF_20B))
    if unknown:
        raise ValueError(f"unknown config.json keys {unknown} (allowed: the gpt-oss-20b keys)")
    cfg = copy.deepcopy(_HF_20B)
    for key, value in overrides.items():
        if key == "rope_scaling" and isinstance(value, Mapping):
            cfg["rope_scaling"].update(copy.deepcopy(dict(value)))
        else:
            cfg[key] = copy.deepcopy(value)
    if "layer_types" not in overrides:
        cfg["layer_types"] = _layer_types(int(cfg["num_hidden_layers"]))
    k_new, k_old = "num_experts_per_tok" in overrides, "experts_per_token" in overrides
    if k_new and k_old and overrides["num_experts_per_tok"] != overrides["experts_per_token"]:
        raise ValueError("num_experts_per_tok and experts_per_token differ")
    if k_old and not k_new:
        cfg["num_experts_per_tok"] = cfg["experts_per_token"]
    else:
        cfg["experts_per_token"] = cfg["num_experts_per_tok"]
    vocab = cfg["vocab_size"]
    if isinstance(vocab, int) and not isinstance(vocab, bool) and vocab >= 2:
        if "eos_token_id" not in overrides and cfg["eos_token_id"] >= vocab:
            cfg["eos_token_id"] = vocab - 1
        if "pad_token_id" not in overrides and cfg["pad_token_id"] >= vocab:
            cfg["pad_token_id"] = vocab - 2
    _validate(cfg)
    return cfg


def _validate(cfg: dict[str, Any]) -> None:
    for key in _INT_KEYS:
        value = cfg[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config {key} must be a positive integer, got {value!r}")
    for key in ("hidden_size", "intermediate_size"):
        if cfg[key] % 32:
            raise ValueError(f"config {key}={cfg[key]} must be a multiple of 32 (MXFP4 blocks)")
    if cfg["num_attention_heads"] % cfg["num_key_value_heads"]:
        raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
    if cfg["num_experts_per_tok"] > cfg["num_local_experts"]:
        raise ValueError("num_experts_per_tok must not exceed num_local_experts")
    layer_types = cfg["layer_types"]
    if (
        not isinstance(layer_types, list)
        or len(layer_types) != cfg["num_hidden_layers"]
        or any(t not in (_SLIDING, _FULL) for t in layer_types)
    ):
        raise ValueError(
            f"layer_types must list {cfg['num_hidden_layers']} entries of "
            f"{_SLIDING!r}/{_FULL!r}, got {layer_types!r}"
        )
    for key in ("eos_token_id", "pad_token_id"):
        value = cfg[key]
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value < cfg["vocab_size"]
        ):
            raise ValueError(f"config {key}={value!r} must be a token id below vocab_size")


#: Full Hugging Face ``config.json`` dicts of the built-in configurations.
CONFIGS: dict[str, dict[str, Any]] = {}
CONFIGS["20b"] = _apply_overrides({})
CONFIGS["120b"] = _apply_overrides({"num_hidden_layers": 36, "num_local_experts": 128})
CONFIGS["tiny"] = _apply_overrides(_TINY_OVERRIDES)

# --------------------------------------------------------------------------------------- tensors

# FP4 E2M1 values in code order (SPEC §3.1).
_FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
_FP4_VALUES = _FP4_MAGNITUDES + tuple(-v for v in _FP4_MAGNITUDES)
# rms of a uniformly random FP4 code: sqrt(68.5 / 8) = 2.926.
_FP4_RMS = math.sqrt(sum(v * v for v in _FP4_VALUES) / len(_FP4_VALUES))
# Scale bytes are c + d with d in {-1, 0, +1} (near-uniform); E[(2^d)^2] = (1/4 + 1 + 4) / 3.
_SCALE_OFFSETS = (-1, 0, 1)
_SCALE_POWER_MEAN = sum(4.0**d for d in _SCALE_OFFSETS) / len(_SCALE_OFFSETS)


def mxfp4_scale_center(fan_in: int, gain: float = 1.0) -> int:
    """E8M0 scale byte that gives an MXFP4 matrix output rms ~``gain`` for an rms-1 input.

    The dequantized weight is ``FP4 * 2^(s - 127)``; with uniformly random codes (rms 2.93) and
    scale bytes ``c + {-1, 0, 1}``, the weight rms is ``2.93 * 1.32 * 2^(c - 127)`` and the output
    rms of a row is that times ``sqrt(fan_in)``. ``c`` is rounded to the nearest power of two.

    Example:
        >>> mxfp4_scale_center(2880), mxfp4_scale_center(2880, gain=2.0)
        (119, 120)
    """
    weight_rms = gain / math.sqrt(fan_in)
    exponent = round(math.log2(weight_rms / (_FP4_RMS * math.sqrt(_SCALE_POWER_MEAN))))
    return min(max(127 + exponent, 2), 253)


@dataclass(frozen=True)
class Init:
    """How the values of one tensor are drawn.

    ``kind`` is ``"normal"`` (BF16: ``mean + std * N(0, 1)``), ``"fp4"`` (U8 MXFP4 blocks: uniformly
    random bytes, i.e. two random FP4 codes per byte) or ``"e8m0"`` (U8 scales: ``center - 1``,
    ``center`` or ``center + 1``).

    Example:
        >>> Init("normal", mean=1.0, std=0.05)
        Init(kind='normal', mean=1.0, std=0.05, center=127)
    """

    kind: Literal["normal", "fp4", "e8m0"]
    mean: float = 0.0
    std: float = 1.0
    center: int = 127


@dataclass(frozen=True)
class TensorSpec:
    """Name, safetensors dtype, shape and value distribution of one checkpoint tensor.

    Example:
        >>> t = TensorSpec("model.norm.weight", "BF16", (2880,), Init("normal", 1.0, 0.05))
        >>> t.nbytes
        5760
    """

    name: str
    dtype: Literal["BF16", "U8"]
    shape: tuple[int, ...]
    init: Init

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        """Bytes per element (2 for BF16, 1 for U8)."""
        return 2 if self.dtype == "BF16" else 1

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor's data."""
        return self.numel * self.itemsize


def tensor_specs(config: str | Mapping[str, Any] = "20b") -> list[TensorSpec]:
    """All tensors of a Hugging Face layout gpt-oss checkpoint, in file order (SPEC §2.2).

    Order: ``model.embed_tokens.weight``, then per layer the 19 tensors (norms, attention, router,
    experts), then ``model.norm.weight`` and ``lm_head.weight``.

    Example:
        >>> specs = tensor_specs("20b")
        >>> len(specs), specs[0].name, specs[0].shape
        (459, 'model.embed_tokens.weight', (201088, 2880))
    """
    cfg = resolve_config(config)
    hidden = cfg["hidden_size"]
    inter = cfg["intermediate_size"]
    head_dim = cfg["head_dim"]
    q_width = cfg["num_attention_heads"] * head_dim
    kv_width = cfg["num_key_value_heads"] * head_dim
    experts = cfg["num_local_experts"]
    vocab = cfg["vocab_size"]

    def bf16(name: str, shape: tuple[int, ...], mean: float, std: float) -> TensorSpec:
        return TensorSpec(name, "BF16", shape, Init("normal", mean, std))

    def linear(name: str, out: int, fan_in: int, gain: float = 1.0) -> TensorSpec:
        return bf16(name, (out, fan_in), 0.0, gain / math.sqrt(fan_in))

    def norm(name: str) -> TensorSpec:
        return bf16(name, (hidden,), 1.0, 0.05)

    def mxfp4(prefix: str, out: int, fan_in: int, gain: float) -> list[TensorSpec]:
        groups = fan_in // 32
        center = mxfp4_scale_center(fan_in, gain)
        return [
            TensorSpec(f"{prefix}_blocks", "U8", (experts, out, groups, 16), Init("fp4")),
            TensorSpec(
                f"{prefix}_scales", "U8", (experts, out, groups), Init("e8m0", center=center)
            ),
            bf16(f"{prefix}_bias", (experts, out), 0.0, 0.05),
        ]

    specs = [bf16("model.embed_tokens.weight", (vocab, hidden), 0.0, 1.0)]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        specs.append(norm(p + "input_layernorm.weight"))
        for proj, out, fan_in in (
            ("q_proj", q_width, hidden),
            ("k_proj", kv_width, hidden),
            ("v_proj", kv_width, hidden),
            ("o_proj", hidden, q_width),
        ):
            specs.append(linear(f"{p}self_attn.{proj}.weight", out, fan_in))
            specs.append(bf16(f"{p}self_attn.{proj}.bias", (out,), 0.0, 0.05))
        specs.append(bf16(p + "self_attn.sinks", (cfg["num_attention_heads"],), 0.0, 1.0))
        specs.append(norm(p + "post_attention_layernorm.weight"))
        specs.append(linear(p + "mlp.router.weight", experts, hidden, gain=1.5))
        specs.append(bf16(p + "mlp.router.bias", (experts,), 0.0, 0.1))
        specs += mxfp4(p + "mlp.experts.gate_up_proj", 2 * inter, hidden, gain=1.0)
        specs += mxfp4(p + "mlp.experts.down_proj", hidden, inter, gain=2.0)
    specs.append(norm("model.norm.weight"))
    specs.append(linear("lm_head.weight", vocab, hidden, gain=2.0))
    return specs


# ---------------------------------------------------------------------------------- safetensors

_METADATA_ENTRY = b'"__metadata__":{"format":"pt"}'


def _header_entry(tensor: TensorSpec, begin: int) -> bytes:
    """One ``"name":{...}`` member of a safetensors header (compact JSON)."""
    body = {
        "dtype": tensor.dtype,
        "shape": list(tensor.shape),
        "data_offsets": [begin, begin + tensor.nbytes],
    }
    return (json.dumps(tensor.name) + ":" + json.dumps(body, separators=(",", ":"))).encode()


def _padded(json_len: int) -> int:
    """Header JSON length after padding with spaces to a multiple of 8 bytes."""
    return json_len + (-json_len % 8)


@dataclass(frozen=True)
class Shard:
    """One safetensors file of a checkpoint plan: its file name and tensors (in data order).

    Example:
        >>> shard = plan_checkpoint("tiny")[0]
        >>> shard.filename, len(shard.tensors)
        ('model.safetensors', 79)
        >>> shard.file_bytes == len(shard.header()) + shard.data_bytes
        True
    """

    filename: str
    tensors: tuple[TensorSpec, ...]

    @property
    def data_bytes(self) -> int:
        """Bytes of tensor data (the file minus its header)."""
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_bytes(self) -> int:
        """Exact size of the file on disk."""
        return len(self.header()) + self.data_bytes

    def header(self) -> bytes:
        """Exact leading bytes of the file: u64 little-endian length, then the JSON header.

        The JSON (compact, ``__metadata__`` first, tensors in data order with contiguous
        ``data_offsets`` starting at 0) is padded with spaces to a multiple of 8 bytes; the tensor
        data follows immediately.
        """
        members = [_METADATA_ENTRY]
        offset = 0
        for tensor in self.tensors:
            members.append(_header_entry(tensor, offset))
            offset += tensor.nbytes
        text = b"{" + b",".join(members) + b"}"
        text += b" " * (_padded(len(text)) - len(text))
        return struct.pack("<Q", len(text)) + text


def plan_checkpoint(
    config: str | Mapping[str, Any] = "20b", *, max_shard_bytes: int = 5_000_000_000
) -> list[Shard]:
    """Assign the tensors of a checkpoint to shard files of at most ``max_shard_bytes`` each.

    Tensors are packed greedily in file order (:func:`tensor_specs`); a shard's size counts its
    header. One shard is named ``model.safetensors``; N > 1 shards are named
    ``model-{i:05d}-of-{N-1:05d}.safetensors`` (0-based, as in the gpt-oss repos).

    Raises:
        ValueError: a single tensor does not fit in ``max_shard_bytes``.

    Example:
        >>> [s.filename for s in plan_checkpoint("tiny")]
        ['model.safetensors']
        >>> len(plan_checkpoint("120b"))
        15
    """
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise ValueError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    groups: list[list[TensorSpec]] = []
    current: list[TensorSpec] = []
    json_len = 2 + len(_METADATA_ENTRY)  # braces + metadata; each tensor adds ",entry"
    data = 0
    for tensor in tensor_specs(config):
        size = 8 + _padded(json_len + 1 + len(_header_entry(tensor, data))) + data + tensor.nbytes
        if current and size > max_shard_bytes:
            groups.append(current)
            current, json_len, data = [], 2 + len(_METADATA_ENTRY), 0
            size = 8 + _padded(json_len + 1 + len(_header_entry(tensor, 0))) + tensor.nbytes
        if size > max_shard_bytes:
            raise ValueError(
                f"tensor {tensor.name} ({tensor.nbytes} bytes) does not fit in a shard of "
                f"max_shard_bytes={max_shard_bytes}"
            )
        json_len += 1 + len(_header_entry(tensor, data))
        data += tensor.nbytes
        current.append(tensor)
    groups.append(current)
    if len(groups) == 1:
        return [Shard("model.safetensors", tuple(groups[0]))]
    last = len(groups) - 1
    return [
        Shard(f"model-{i:05d}-of-{last:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)
    ]


def checkpoint_index(shards: list[Shard]) -> dict[str, Any]:
    """The ``model.safetensors.index.json`` content for a sharded plan.

    ``total_size`` is the sum of the tensor data bytes (as in the Hugging Face index files);
    ``weight_map`` maps every tensor name (sorted) to its shard file.

    Example:
        >>> index = checkpoint_index(plan_checkpoint("20b"))
        >>> index["metadata"]["total_size"], len(index["weight_map"])
        (13761264768, 459)
    """
    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    return {
        "metadata": {"total_size": sum(s.data_bytes for s in shards)},
        "weight_map": dict(sorted(weight_map.items())),
    }


# ------------------------------------------------------------------------------ random numbers

# Elements per generated chunk (16 MiB of BF16). Part of the definition of the values: changing it
# changes the random stream of tensors larger than one chunk.
_CHUNK_ELEMS = 1 << 23


@functools.cache
def _normal_quantiles() -> np.ndarray:
    """Phi^-1((k + 0.5) / 65536) for k = 0..65535 (float64, increasing, symmetric)."""
    dist = NormalDist()
    return np.array([dist.inv_cdf((k + 0.5) / 65536.0) for k in range(65536)], dtype=np.float64)


def _bf16_bits(values: np.ndarray) -> np.ndarray:
    """Round float values to bf16 (to nearest, ties to even); returns little-endian uint16 bits."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32).copy()
    bits += 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).astype("<u2")


def _bf16_normal_table(mean: float, std: float) -> np.ndarray:
    """bf16 bits of mean + std * (65,536 standard-normal quantiles)."""
    return _bf16_bits(mean + std * _normal_quantiles())


def _e8m0_table(center: int) -> np.ndarray:
    """Maps a random byte to center + (-1, 0, +1) (86/85/85 of the 256 byte values)."""
    offsets = np.asarray(_SCALE_OFFSETS, dtype=np.int64)
    return (center + offsets[np.arange(256) % len(offsets)]).astype(np.uint8)


def _tensor_key(name: str) -> int:
    """64-bit key of a tensor name, mixed with the seed to give each tensor its own stream."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _tensor_chunks(tensor: TensorSpec, seed: int) -> Iterator[np.ndarray]:
    """The tensor's data (C order, little-endian) as a sequence of contiguous arrays."""
    bitgen = np.random.PCG64(np.random.SeedSequence([seed, _tensor_key(tensor.name)]))
    init = tensor.init
    table: np.ndarray | None = None
    if init.kind == "normal":
        table = _bf16_normal_table(init.mean, init.std)
    elif init.kind == "e8m0":
        table = _e8m0_table(init.center)
    index_type = np.uint16 if tensor.dtype == "BF16" else np.uint8
    per_word = 8 // np.dtype(index_type).itemsize
    total = tensor.numel
    for start in range(0, total, _CHUNK_ELEMS):
        count = min(_CHUNK_ELEMS, total - start)
        raw = bitgen.random_raw(-(-count // per_word)).view(index_type)[:count]
        yield raw if table is None else np.take(table, raw)


# ------------------------------------------------------------------------------------- writing

_T = TypeVar("_T")


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def _prefetch(items: Iterator[_T], depth: int = 3) -> Iterator[_T]:
    """Iterate ``items`` in a background thread, at most ``depth`` items ahead of the consumer."""
    buffer: queue.Queue[object] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def run() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(done)
        except BaseException as exc:
            put(_Failure(exc))

    worker = threading.Thread(target=run, name="gpt-oss-synth", daemon=True)
    worker.start()
    try:
        while True:
            item = buffer.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join()


def _shard_chunks(shard: Shard, seed: int) -> Iterator[np.ndarray]:
    for tensor in shard.tensors:
        yield from _tensor_chunks(tensor, seed)


def _write_shard(path: Path, shard: Shard, seed: int, bar: Any) -> None:
    partial = path.with_name(path.name + ".partial")
    try:
        with open(partial, "wb") as f:
            header = shard.header()
            f.write(header)
            bar.update(len(header))
            for chunk in _prefetch(_shard_chunks(shard, seed)):
                f.write(memoryview(chunk).cast("B"))
                bar.update(chunk.nbytes)
        if partial.stat().st_size != shard.file_bytes:
            raise OSError(
                f"{partial}: wrote {partial.stat().st_size} bytes, expected {shard.file_bytes}"
            )
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


_OWNED_FILE = re.compile(
    r"model(-\d{5}-of-\d{5})?\.safetensors(\.partial)?|model\.safetensors\.index\.json"
)


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()


def _generation_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json of gpt-oss (SPEC §1.3), restricted to ids inside the vocabulary."""
    vocab, eos = cfg["vocab_size"], cfg["eos_token_id"]
    gen: dict[str, Any] = {}
    if vocab > 199998:
        gen["bos_token_id"] = 199998
    gen["do_sample"] = True
    gen["eos_token_id"] = [eos] + [i for i in (199999, 200012) if i < vocab and i != eos]
    gen["pad_token_id"] = cfg["pad_token_id"]
    gen["transformers_version"] = cfg["transformers_version"]
    return gen


_SPECIAL_TOKENS_MAP = {
    "bos_token": "<|startoftext|>",
    "eos_token": "<|return|>",
    "pad_token": "<|endoftext|>",
}


def write_checkpoint(
    directory: str | Path,
    config: str | Mapping[str, Any] = "20b",
    *,
    seed: int = 0,
    progress: bool = True,
    max_shard_bytes: int = 5_000_000_000,
) -> Path:
    """Write a random-weight gpt-oss checkpoint in the Hugging Face layout; return its directory.

    ``config`` is ``"20b"`` (13.8 GB, 3 shards), ``"120b"`` (65.2 GB, 15 shards), ``"tiny"`` (one
    105 MB ``model.safetensors``; full 201,088-token vocabulary, hidden 128, 4 layers, 8 experts)
    or a dict of config.json keys overriding the 20b values (see :func:`resolve_config`). The same
    ``seed`` always gives the same bytes. The directory is created if needed; shard, index and
    config files already in it are replaced, and stale ``model*.safetensors`` files of another
    layout are removed so the directory stays consistent. Shards are written under a ``.partial``
    name and renamed when complete; ``config.json`` is written last.

    Raises:
        ValueError: bad config, seed or ``max_shard_bytes``.
        OSError: not enough free disk space, or a write failed.

    Example:
        >>> d = write_checkpoint("/tmp/gpt-oss-tiny", "tiny", seed=1, progress=False)
        >>> sorted(p.name for p in d.iterdir())[:3]
        ['config.json', 'generation_config.json', 'model.safetensors']
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    cfg = resolve_config(config)
    shards = plan_checkpoint(cfg, max_shard_bytes=max_shard_bytes)
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)

    keep = {s.filename for s in shards}
    if len(shards) > 1:
        keep.add("model.safetensors.index.json")
    owned = [p for p in out.iterdir() if p.is_file() and _OWNED_FILE.fullmatch(p.name)]
    needed = sum(s.file_bytes for s in shards)
    reclaimable = sum(p.stat().st_size for p in owned)
    free = shutil.disk_usage(out).free
    if free + reclaimable < needed + (64 << 20):
        raise OSError(
            f"not enough disk space in {out}: the checkpoint needs {needed / 1e9:.2f} GB, "
            f"{(free + reclaimable) / 1e9:.2f} GB available"
        )
    for p in owned:
        if p.name not in keep:
            p.unlink()

    from tqdm.auto import tqdm

    name = config if isinstance(config, str) else "custom"
    with tqdm(
        total=needed,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"gpt-oss {name}",
        disable=not progress,
        mininterval=0.5,
    ) as bar:
        for shard in shards:
            _write_shard(out / shard.filename, shard, seed, bar)

    if len(shards) > 1:
        (out / "model.safetensors.index.json").write_bytes(_json_bytes(checkpoint_index(shards)))
    (out / "tokenizer.json").write_bytes(bundled_tokenizer_json())
    (out / "tokenizer_config.json").write_bytes(bundled_tokenizer_config_json())
    (out / "special_tokens_map.json").write_bytes(_json_bytes(_SPECIAL_TOKENS_MAP))
    (out / "generation_config.json").write_bytes(_json_bytes(_generation_config(cfg)))
    (out / "config.json").write_bytes(_json_bytes(cfg))
    return out
