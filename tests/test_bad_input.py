"""Bad checkpoints, bad configs and bad arguments: each must raise the right exception class with a
message that names the problem, never crash the process or surface a Rust panic.

Broken checkpoints are built in ``tmp_path`` from a copy of ``tests/data/models/tiny-a`` with a
small from-scratch safetensors reader/writer (raw bytes, so that BF16 needs no numpy support and
headers can be corrupted at will). Positive controls check that the untouched copy written by that
writer, and a valid sharded copy, load and reproduce the golden logits: the negative cases are
therefore broken only where intended.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gpt_oss_cpu
import numpy as np
import pytest
from gpt_oss_cpu import (
    CheckpointError,
    ConfigError,
    ContextOverflowError,
    GptOssError,
    InputError,
)

ST = "model.safetensors"
INDEX = "model.safetensors.index.json"

# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def expect_error(cls: type[BaseException], fn: Callable[[], Any], *patterns: str) -> BaseException:
    """Call ``fn``; it must raise ``cls`` (never a PanicException) with every regex in the message.

    Patterns are case-insensitive regular expressions; use ``a|b`` for alternatives.
    """
    try:
        fn()
    except BaseException as e:  # PanicException derives from BaseException: catch to report it
        name = type(e).__name__
        assert name != "PanicException", f"Rust panic surfaced to Python: {e!r}"
        assert isinstance(e, cls), f"expected {cls.__name__}, got {name}: {e}"
        assert isinstance(e, GptOssError), f"{name} is not a GptOssError"
        msg = str(e)
        for pat in patterns:
            assert re.search(pat, msg, re.IGNORECASE), f"message {msg!r} does not match {pat!r}"
        return e
    pytest.fail(f"no exception raised, expected {cls.__name__}")


@dataclass
class Tensor:
    """One raw safetensors entry: dtype string, shape and little-endian data bytes."""

    dtype: str
    shape: list[int]
    data: bytes


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """Parse a safetensors file into raw tensors, in data-offset order."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    tensors = {}
    for name, info in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        begin, end = info["data_offsets"]
        tensors[name] = Tensor(info["dtype"], list(info["shape"]), raw[base + begin : base + end])
    return tensors


def header_and_data(tensors: dict[str, Tensor]) -> tuple[dict[str, Any], bytes]:
    """Build a header dict (with contiguous offsets) and the data area for ``tensors``."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    chunks = []
    pos = 0
    for name, t in tensors.items():
        header[name] = {
            "dtype": t.dtype,
            "shape": t.shape,
            "data_offsets": [pos, pos + len(t.data)],
        }
        chunks.append(t.data)
        pos += len(t.data)
    return header, b"".join(chunks)


def pack(header: dict[str, Any], data: bytes) -> bytes:
    """Serialise a header dict + data area into safetensors bytes (header padded to 8 bytes)."""
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    return struct.pack("<Q", len(hb)) + hb + data


def write_safetensors(path: Path, tensors: dict[str, Tensor]) -> None:
    """Write ``tensors`` as a valid safetensors file."""
    path.write_bytes(pack(*header_and_data(tensors)))


def bf16_to_f32_bytes(data: bytes) -> bytes:
    """Exact upcast of raw BF16 bytes to raw F32 bytes."""
    bits = np.frombuffer(data, dtype="<u2").astype("<u4") << 16
    return bits.astype("<u4").tobytes()


def u8_to_bf16_bytes(data: bytes) -> bytes:
    """Represent each uint8 value as an (exact) BF16 number."""
    f = np.frombuffer(data, dtype=np.uint8).astype("<f4")
    return (f.view("<u4") >> 16).astype("<u2").tobytes()


def load(path: Path) -> Any:
    """Load a checkpoint directory through the public API."""
    return gpt_oss_cpu.Model.load(str(path))


@pytest.fixture(scope="module")
def golden(tiny_a_dir: Path) -> dict[str, np.ndarray]:
    """tiny-a's reference arrays."""
    with np.load(tiny_a_dir / "reference.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def tiny(tiny_a_dir: Path) -> Any:
    """The valid tiny-a model (vocab 512)."""
    return load(tiny_a_dir)


@pytest.fixture
def ckpt(tiny_a_dir: Path, tmp_path: Path) -> Path:
    """A private, editable copy of tiny-a (config.json + model.safetensors) in tmp_path."""
    dst = tmp_path / "ckpt"
    dst.mkdir()
    for f in ("config.json", ST):
        shutil.copy2(tiny_a_dir / f, dst / f)
    return dst


def edit_config(ckpt: Path, **changes: Any) -> None:
    """Rewrite ckpt/config.json with some keys replaced."""
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg.update(changes)
    (ckpt / "config.json").write_text(json.dumps(cfg, indent=2))


def edit_tensors(ckpt: Path, fn: Callable[[dict[str, Tensor]], None]) -> None:
    """Apply ``fn`` to the raw tensor dict of ckpt/model.safetensors and write it back (valid)."""
    tensors = read_safetensors(ckpt / ST)
    fn(tensors)
    write_safetensors(ckpt / ST, tensors)


def raw_parts(path: Path) -> tuple[dict[str, Any], bytes]:
    """The header dict (metadata included) and the data area of a safetensors file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


Q_PROJ = "model.layers.1.self_attn.q_proj.weight"  # BF16 [256, 128]
K_BIAS = "model.layers.2.self_attn.k_proj.bias"  # BF16 [64]
V_BIAS = "model.layers.2.self_attn.v_proj.bias"  # BF16 [64]
NORM = "model.layers.0.input_layernorm.weight"  # BF16 [128]
BLOCKS = "model.layers.3.mlp.experts.down_proj_blocks"  # U8 [8, 128, 3, 16]
EMBED = "model.embed_tokens.weight"  # BF16 [512, 128]


# --------------------------------------------------------------------------------------------
# Positive controls: the tools used below produce loadable checkpoints
# --------------------------------------------------------------------------------------------


def test_control_rewritten_copy_loads(ckpt: Path, golden, tiny) -> None:
    edit_tensors(ckpt, lambda t: None)
    edit_config(ckpt)
    got = load(ckpt).forward(golden["input_ids"])
    np.testing.assert_array_equal(got, tiny.forward(golden["input_ids"]))
    assert np.max(np.abs(got - golden["logits"])) <= 1e-3


def make_sharded(ckpt: Path) -> dict[str, str]:
    """Split ckpt/model.safetensors into two 0-based shards plus an index; return the weight_map."""
    tensors = read_safetensors(ckpt / ST)
    names = list(tensors)
    half = len(names) // 2
    files = ["model-00000-of-00001.safetensors", "model-00001-of-00001.safetensors"]
    weight_map = {}
    for fname, part in zip(files, (names[:half], names[half:]), strict=True):
        write_safetensors(ckpt / fname, {n: tensors[n] for n in part})
        weight_map.update(dict.fromkeys(part, fname))
    total = sum(len(t.data) for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (ckpt / INDEX).write_text(json.dumps(index, indent=2))
    (ckpt / ST).unlink()
    return weight_map


def test_control_sharded_loads(ckpt: Path, golden, tiny) -> None:
    make_sharded(ckpt)
    got = load(ckpt).forward(golden["input_ids"])
    np.testing.assert_array_equal(got, tiny.forward(golden["input_ids"]))


# --------------------------------------------------------------------------------------------
# config.json -> ConfigError
# --------------------------------------------------------------------------------------------


def test_missing_config(ckpt: Path) -> None:
    (ckpt / "config.json").unlink()
    expect_error(ConfigError, lambda: load(ckpt), r"config\.json")


def test_missing_directory(tmp_path: Path) -> None:
    missing = tmp_path / "does-not-exist"
    e = expect_error(GptOssError, lambda: load(missing), "does-not-exist")
    assert isinstance(e, ConfigError | CheckpointError), type(e)


@pytest.mark.parametrize(
    "text",
    ["{not json", "", '{"hidden_size": 128,}', "[1, 2, 3]"],
    ids=["garbage", "empty", "trailing-comma", "array"],
)
def test_config_not_json_object(ckpt: Path, text: str) -> None:
    (ckpt / "config.json").write_text(text)
    expect_error(ConfigError, lambda: load(ckpt), r"config\.json")


BAD_CONFIGS = {
    "hidden_size-0": ({"hidden_size": 0}, r"hidden_size"),
    "hidden_size-string": ({"hidden_size": "wide"}, r"hidden_size"),
    "layers-negative": ({"num_hidden_layers": -2}, r"num_hidden_layers"),
    "heads-not-divisible": ({"num_key_value_heads": 3}, r"num_key_value_heads|num_attention_heads"),
    "head_dim-0": ({"head_dim": 0}, r"head_dim"),
    "vocab-0": ({"vocab_size": 0}, r"vocab_size"),
    "sliding_window-0": ({"sliding_window": 0}, r"sliding_window"),
    "topk-gt-experts": (
        {"num_experts_per_tok": 9, "experts_per_token": 9},
        r"experts_per_tok|experts_per_token",
    ),
    "layer_types-short": (
        {"layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
        r"layer_types",
    ),
    "layer_types-unknown": (
        {
            "layer_types": [
                "sliding_attention",
                "full_attention",
                "banana_attention",
                "full_attention",
            ]
        },
        r"layer_types|banana_attention",
    ),
    "rope-factor-0": (
        {
            "rope_scaling": {
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "factor": 0.0,
                "original_max_position_embeddings": 4096,
                "rope_type": "yarn",
                "truncate": False,
            }
        },
        r"factor",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_values(ckpt: Path, case: str) -> None:
    changes, pattern = BAD_CONFIGS[case]
    edit_config(ckpt, **changes)
    expect_error(ConfigError, lambda: load(ckpt), pattern)


def test_config_disagrees_with_tensors(ckpt: Path) -> None:
    """A valid-looking config whose sizes do not match the tensors: a misshaped-tensor error."""
    edit_config(ckpt, hidden_size=256)
    e = expect_error(GptOssError, lambda: load(ckpt), r"expected", r"\b256\b", r"\b128\b")
    assert isinstance(e, CheckpointError | ConfigError), type(e)


# --------------------------------------------------------------------------------------------
# Tensors -> CheckpointError
# --------------------------------------------------------------------------------------------


def test_missing_safetensors(ckpt: Path) -> None:
    (ckpt / ST).unlink()
    expect_error(CheckpointError, lambda: load(ckpt), r"model\.safetensors")


def test_missing_tensor(ckpt: Path) -> None:
    edit_tensors(ckpt, lambda t: t.pop(K_BIAS))
    expect_error(
        CheckpointError,
        lambda: load(ckpt),
        re.escape(K_BIAS),
        r"missing|not found|absent|no tensor",
    )


def test_extra_tensor(ckpt: Path) -> None:
    extra = "model.layers.1.mlp.bogus.weight"

    def add(t: dict[str, Tensor]) -> None:
        t[extra] = Tensor("BF16", [4], b"\x00" * 8)

    edit_tensors(ckpt, add)
    expect_error(CheckpointError, lambda: load(ckpt), re.escape(extra))


def test_extra_layer(ckpt: Path) -> None:
    """Tensors of a fifth layer the config does not declare (4 layers) are not silently ignored."""

    def add(t: dict[str, Tensor]) -> None:
        src = t["model.layers.3.input_layernorm.weight"]
        t["model.layers.4.input_layernorm.weight"] = Tensor(src.dtype, src.shape, src.data)

    edit_tensors(ckpt, add)
    expect_error(CheckpointError, lambda: load(ckpt), re.escape("model.layers.4.input_layernorm"))


def test_transposed_tensor(ckpt: Path) -> None:
    def transpose(t: dict[str, Tensor]) -> None:
        w = t[Q_PROJ]
        assert w.shape == [256, 128]
        arr = np.frombuffer(w.data, dtype="<u2").reshape(256, 128)
        t[Q_PROJ] = Tensor("BF16", [128, 256], np.ascontiguousarray(arr.T).tobytes())

    edit_tensors(ckpt, transpose)
    expect_error(
        CheckpointError,
        lambda: load(ckpt),
        re.escape(Q_PROJ),
        r"expected",
        r"found|got|actual",
        r"256",
        r"128",
    )


def test_misshaped_embedding(ckpt: Path) -> None:
    def shrink(t: dict[str, Tensor]) -> None:
        w = t[EMBED]
        t[EMBED] = Tensor("BF16", [511, 128], w.data[: 511 * 128 * 2])

    edit_tensors(ckpt, shrink)
    expect_error(CheckpointError, lambda: load(ckpt), re.escape(EMBED), r"expected", r"512", r"511")


def test_flattened_blocks(ckpt: Path) -> None:
    """Same bytes, wrong rank: [8, 128, 48] instead of [8, 128, 3, 16]."""

    def flatten(t: dict[str, Tensor]) -> None:
        t[BLOCKS] = Tensor("U8", [8, 128, 48], t[BLOCKS].data)

    edit_tensors(ckpt, flatten)
    expect_error(CheckpointError, lambda: load(ckpt), re.escape(BLOCKS), r"expected")


def test_f32_instead_of_bf16(ckpt: Path) -> None:
    def upcast(t: dict[str, Tensor]) -> None:
        t[NORM] = Tensor("F32", t[NORM].shape, bf16_to_f32_bytes(t[NORM].data))

    edit_tensors(ckpt, upcast)
    expect_error(
        CheckpointError, lambda: load(ckpt), re.escape(NORM), r"bf16|bfloat16", r"f32|float32"
    )


def test_bf16_instead_of_u8_blocks(ckpt: Path) -> None:
    def retype(t: dict[str, Tensor]) -> None:
        t[BLOCKS] = Tensor("BF16", t[BLOCKS].shape, u8_to_bf16_bytes(t[BLOCKS].data))

    edit_tensors(ckpt, retype)
    expect_error(
        CheckpointError, lambda: load(ckpt), re.escape(BLOCKS), r"u8|uint8", r"bf16|bfloat16"
    )


def test_unknown_dtype(ckpt: Path) -> None:
    header, data = raw_parts(ckpt / ST)
    header[NORM]["dtype"] = "F9_WEIRD"
    (ckpt / ST).write_bytes(pack(header, data))
    expect_error(CheckpointError, lambda: load(ckpt), re.escape(NORM) + r"|F9_WEIRD")


# --------------------------------------------------------------------------------------------
# Corrupt safetensors containers -> CheckpointError naming the file
# --------------------------------------------------------------------------------------------


def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


@pytest.mark.parametrize(
    "where",
    ["empty", "in-length", "after-length", "mid-header", "header-end", "mid-data", "last-byte"],
)
def test_truncated_file(ckpt: Path, where: str) -> None:
    path = ckpt / ST
    raw = path.read_bytes()
    n = _header_len(path)
    cut = {
        "empty": 0,
        "in-length": 5,
        "after-length": 8,
        "mid-header": 8 + n // 2,
        "header-end": 8 + n,
        "mid-data": 8 + n + (len(raw) - 8 - n) // 2,
        "last-byte": len(raw) - 1,
    }[where]
    path.write_bytes(raw[:cut])
    expect_error(CheckpointError, lambda: load(ckpt), r"model\.safetensors")


@pytest.mark.parametrize("length", [1 << 40, 2**63, 2**64 - 1, "file+1"])
def test_header_length_too_big(ckpt: Path, length: int | str) -> None:
    path = ckpt / ST
    raw = path.read_bytes()
    value = len(raw) - 7 if length == "file+1" else int(length)  # 8 + value > len(raw)
    path.write_bytes(struct.pack("<Q", value) + raw[8:])
    expect_error(CheckpointError, lambda: load(ckpt), r"model\.safetensors")


@pytest.mark.parametrize("junk", [b"\xff\xfe not json", b"[1, 2, 3]", b'{"a": 1'])
def test_header_not_json(ckpt: Path, junk: bytes) -> None:
    path = ckpt / ST
    raw = path.read_bytes()
    n = _header_len(path)
    bad = junk + b" " * (n - len(junk))
    path.write_bytes(raw[:8] + bad + raw[8 + n :])
    expect_error(CheckpointError, lambda: load(ckpt), r"model\.safetensors")


def _edit_offsets(ckpt: Path, fn: Callable[[dict[str, Any], int], None]) -> None:
    header, data = raw_parts(ckpt / ST)
    fn(header, len(data))
    (ckpt / ST).write_bytes(pack(header, data))


def test_offsets_out_of_range(ckpt: Path) -> None:
    def shift_last(header: dict[str, Any], size: int) -> None:
        name = max(
            (k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1]
        )
        b, e = header[name]["data_offsets"]
        assert e == size
        header[name]["data_offsets"] = [b + 4096, e + 4096]

    _edit_offsets(ckpt, shift_last)
    expect_error(CheckpointError, lambda: load(ckpt), r"model\.safetensors|model\.layers")


def test_offsets_overlap(ckpt: Path) -> None:
    def overlap(header: dict[str, Any], size: int) -> None:
        b, _ = header[K_BIAS]["data_offsets"]
        header[V_BIAS]["data_offsets"] = [b + 64, b + 64 + 128]  # half inside k_proj.bias

    _edit_offsets(ckpt, overlap)
    expect_error(
        CheckpointError,
        lambda: load(ckpt),
        r"model\.safetensors|" + re.escape(V_BIAS) + "|" + re.escape(K_BIAS),
    )


def test_offsets_reversed(ckpt: Path) -> None:
    def reverse(header: dict[str, Any], size: int) -> None:
        b, e = header[NORM]["data_offsets"]
        header[NORM]["data_offsets"] = [e, b]

    _edit_offsets(ckpt, reverse)
    expect_error(CheckpointError, lambda: load(ckpt), r"model\.safetensors|" + re.escape(NORM))


def test_offsets_disagree_with_shape(ckpt: Path) -> None:
    def shrink(header: dict[str, Any], size: int) -> None:
        header[NORM]["shape"] = [100]  # 200 bytes declared by the shape, 256 in the offsets

    _edit_offsets(ckpt, shrink)
    expect_error(CheckpointError, lambda: load(ckpt), re.escape(NORM))


# --------------------------------------------------------------------------------------------
# Sharded checkpoints -> CheckpointError
# --------------------------------------------------------------------------------------------


def test_index_missing_shard_file(ckpt: Path) -> None:
    make_sharded(ckpt)
    (ckpt / "model-00001-of-00001.safetensors").unlink()
    expect_error(CheckpointError, lambda: load(ckpt), r"model-00001-of-00001\.safetensors")


def test_index_weight_map_misses_tensor(ckpt: Path) -> None:
    weight_map = make_sharded(ckpt)
    victim = "model.layers.1.self_attn.sinks"
    assert victim in weight_map
    del weight_map[victim]
    index = json.loads((ckpt / INDEX).read_text())
    index["weight_map"] = weight_map
    (ckpt / INDEX).write_text(json.dumps(index))
    expect_error(CheckpointError, lambda: load(ckpt), re.escape(victim))


def test_index_not_json(ckpt: Path) -> None:
    make_sharded(ckpt)
    (ckpt / INDEX).write_text("{ weight_map: ")
    expect_error(CheckpointError, lambda: load(ckpt), re.escape(INDEX))


def test_index_with_truncated_shard(ckpt: Path) -> None:
    make_sharded(ckpt)
    shard = ckpt / "model-00000-of-00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    expect_error(CheckpointError, lambda: load(ckpt), r"model-00000-of-00001\.safetensors")


# --------------------------------------------------------------------------------------------
# Call arguments -> InputError / ContextOverflowError
# --------------------------------------------------------------------------------------------


def test_token_id_too_large(tiny) -> None:
    expect_error(InputError, lambda: tiny.forward([1, 2, 512]), r"\b512\b")
    expect_error(InputError, lambda: tiny.forward(np.array([7, 10**6], dtype=np.int64)), r"1000000")


def test_token_id_negative(tiny) -> None:
    expect_error(InputError, lambda: tiny.forward([3, -1, 4]), r"-1")
    expect_error(InputError, lambda: tiny.forward(np.array([-5], dtype=np.int32)), r"-5")


def test_empty_ids(tiny) -> None:
    expect_error(InputError, lambda: tiny.forward([]), r"empty|no token|zero|0 token")
    expect_error(
        InputError,
        lambda: tiny.forward(np.array([], dtype=np.int32)),
        r"empty|no token|zero|0 token",
    )


def test_float_ids(tiny) -> None:
    expect_error(InputError, lambda: tiny.forward(np.array([1.0, 2.0])), r"dtype|integer|float")


def test_2d_ids(tiny) -> None:
    expect_error(
        InputError,
        lambda: tiny.forward(np.ones((2, 3), dtype=np.int32)),
        r"1-?d|one-dimensional|dimension|shape|ndim",
    )


def test_negative_start_position(tiny) -> None:
    expect_error(InputError, lambda: tiny.forward([1, 2], start_position=-1), r"start_position")


def test_trace_bad_ids(tiny) -> None:
    expect_error(InputError, lambda: tiny.trace([1, 512]), r"\b512\b")


def test_session_max_context_zero(tiny) -> None:
    expect_error(InputError, lambda: tiny.session(max_context=0), r"max_context")


def test_session_bad_ids_leave_state(tiny, golden) -> None:
    ids = golden["input_ids"][:8]
    with tiny.session(max_context=32) as s:
        s.append(ids[:5])
        expect_error(InputError, lambda: s.append([1, 600]), r"\b600\b")
        expect_error(InputError, lambda: s.append([]), r"empty|no token|zero|0 token")
        expect_error(InputError, lambda: s.append(np.array([0.5])), r"dtype|integer|float")
        assert s.position == 5
        assert s.tokens == ids[:5].tolist()
        last = s.append(ids[5:])
    np.testing.assert_allclose(last, tiny.forward(ids)[-1], atol=1e-4, rtol=0)


def test_session_truncate_bad_length(tiny) -> None:
    ids = [1, 2, 3, 4]
    with tiny.session(max_context=32) as s:
        s.append(ids[:3])
        expect_error(InputError, lambda: s.truncate(-1), r"-1")
        # Truncating to more tokens than the cache holds is either refused or a no-op; it must
        # never invent positions.
        try:
            s.truncate(4)
        except InputError as e:
            assert re.search(r"\b4\b", str(e)), str(e)
        assert s.position == 3
        assert s.tokens == ids[:3]
        last = s.append(ids[3:])
    np.testing.assert_allclose(last, tiny.forward(ids)[-1], atol=1e-4, rtol=0)


def test_context_overflow(tiny) -> None:
    with tiny.session(max_context=8) as s:
        expect_error(ContextOverflowError, lambda: s.append(list(range(9))), r"\b8\b")
        assert s.position == 0
        s.append(list(range(6)))
        expect_error(ContextOverflowError, lambda: s.append([1, 2, 3]), r"\b8\b")
        assert s.position == 6
        assert s.tokens == list(range(6))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [({"temperature": -1.0}, r"temperature"), ({"top_p": 1.5}, r"top_p")],
    ids=["temperature-negative", "top_p-above-1"],
)
def test_generate_bad_sampling_args(tiny, kwargs: dict[str, float], pattern: str) -> None:
    with tiny.session(max_context=32) as s:
        expect_error(
            InputError,
            lambda: list(s.generate([1, 2, 3], max_new_tokens=2, stop=(), **kwargs)),
            pattern,
        )


def test_a_non_finite_weight_is_refused_by_the_q8_build(ckpt: Path) -> None:
    def poison(t: dict[str, Tensor]) -> None:
        w = np.frombuffer(t[Q_PROJ].data, dtype="<u2").copy().reshape(256, 128)
        w[5, 17] = 0x7FC0  # bf16 NaN
        t[Q_PROJ] = Tensor("BF16", [256, 128], w.tobytes())

    edit_tensors(ckpt, poison)
    expect_error(
        CheckpointError,
        lambda: gpt_oss_cpu.Model.load(ckpt, precision="fast", dense="q8"),
        r"layer 1 attention q weight",
        r"row 5",
        r"NaN or infinity",
    )
    # The bf16 path reads the weights as they are (and would pass the NaN on to the logits).
    assert gpt_oss_cpu.Model.load(ckpt).dense == "bf16"


ISAS = ("scalar", "avx2", "avx512", "neon")


def test_an_unknown_isa_is_named_with_the_choices(tiny_a_dir: Path) -> None:
    expect_error(
        InputError,
        lambda: gpt_oss_cpu.Model.load(tiny_a_dir, isa="sse4"),  # type: ignore[arg-type]
        r'"sse4"',
        r"scalar, avx2, avx512, neon",
    )


def test_an_isa_this_cpu_lacks_is_refused(tiny_a_dir: Path) -> None:
    supported = gpt_oss_cpu.build_info()["supported_isas"]
    lacking = [isa for isa in ISAS if isa not in supported]
    assert lacking, "every instruction set is supported: no CPU has both x86 and NEON"
    for isa in lacking:
        expect_error(
            InputError,
            lambda: gpt_oss_cpu.Model.load(tiny_a_dir, isa=isa),  # noqa: B023
            rf"this CPU does not support {isa}",
        )


def test_build_info_reports_the_isas_and_extensions_this_cpu_has() -> None:
    info = gpt_oss_cpu.build_info()
    supported = info["supported_isas"]
    assert "scalar" in supported and set(supported) <= set(ISAS)
    if not os.environ.get("GPT_OSS_CPU_ISA"):
        assert info["isa"] == supported[-1], "the default is the most preferred supported ISA"
    extensions = set(info["cpu_extensions"])
    assert extensions <= {"avx512vnni", "avx512bf16", "dotprod"}
    cpuinfo = Path("/proc/cpuinfo")
    if info["target_arch"] == "x86_64" and cpuinfo.exists():
        flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.M).group(1).split())
        assert ("avx512" in supported) == ({"avx512f", "avx512bw", "avx512vl"} <= flags)
        assert ("avx512vnni" in extensions) == ("avx512_vnni" in flags)
        assert ("avx512bf16" in extensions) == ("avx512_bf16" in flags)
    if info["target_arch"] == "aarch64" and cpuinfo.exists():
        features = re.search(r"^Features\s*:(.*)$", cpuinfo.read_text(), re.M).group(1).split()
        assert ("dotprod" in extensions) == ("asimddp" in features)


def test_gpt_oss_cpu_isa_picks_the_default_in_a_fresh_process() -> None:
    def default_isa(value: str) -> tuple[str, str]:
        """build_info()'s ``isa`` and ``isa_error`` in a process started with GPT_OSS_CPU_ISA."""
        code = "import gpt_oss_cpu; i = gpt_oss_cpu.build_info()\n"
        code += "print(i.get('isa')); print(i.get('isa_error'))"
        env = {**os.environ, "GPT_OSS_CPU_ISA": value}
        run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        isa, error = run.stdout.splitlines()
        return isa, error

    assert default_isa("scalar") == ("scalar", "None")
    lacking = next(isa for isa in ISAS if isa not in gpt_oss_cpu.build_info()["supported_isas"])
    isa, error = default_isa(lacking)
    assert isa == "None"
    assert f"GPT_OSS_CPU_ISA={lacking}: this CPU does not support {lacking}" in error
