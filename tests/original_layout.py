"""Convert a Hugging Face layout gpt-oss checkpoint into OpenAI's ``original/`` layout (tests only).

The ``original/`` layout is what OpenAI's reference ``gpt_oss/torch`` reads (SPEC §1.2, §2.3):
``config.json`` with exactly the 16 ``ModelConfig`` keys, and one ``model.safetensors`` with
``block.N.*`` tensor names (15 per block), the attention projections fused row-wise as
``[Q | K | V]`` and the experts named ``mlp1_*`` / ``mlp2_*`` (blocks and scales copied byte for
byte). The tests convert the reference tiny models and check that the engine gives identical
logits on both layouts.

This reads whole files into memory: it is meant for small test checkpoints, not for gpt-oss-20b.

Example:
    >>> from original_layout import convert_hf_to_original        # doctest: +SKIP
    >>> convert_hf_to_original("tests/data/models/tiny-a", tmp_path / "original")  # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import TensorSpec, deserialize, serialize_file

__all__ = ["ORIGINAL_CONFIG_KEYS", "convert_hf_to_original", "original_config", "read_raw_tensors"]

#: The 16 keys of ``gpt_oss.torch.model.ModelConfig`` (SPEC §1.2), in that order.
ORIGINAL_CONFIG_KEYS = (
    "num_hidden_layers",
    "num_experts",
    "experts_per_token",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "swiglu_limit",
    "head_dim",
    "num_attention_heads",
    "num_key_value_heads",
    "sliding_window",
    "initial_context_length",
    "rope_theta",
    "rope_scaling_factor",
    "rope_ntk_alpha",
    "rope_ntk_beta",
)

_NUMPY_DTYPE = {"BF16": np.dtype("<u2"), "U8": np.dtype(np.uint8), "F32": np.dtype("<f4")}
_SPEC_DTYPE = {"BF16": "bfloat16", "U8": "uint8", "F32": "float32"}

# HF name suffix (after "model.layers.N.") -> original name suffix (after "block.N."); the q/k/v
# projections are handled separately (fused).
_LAYER_RENAMES = {
    "input_layernorm.weight": "attn.norm.scale",
    "self_attn.sinks": "attn.sinks",
    "self_attn.o_proj.weight": "attn.out.weight",
    "self_attn.o_proj.bias": "attn.out.bias",
    "post_attention_layernorm.weight": "mlp.norm.scale",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.bias": "mlp.gate.bias",
    "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
    "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales",
    "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
    "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
    "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales",
    "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
}
_GLOBAL_RENAMES = {
    "model.embed_tokens.weight": "embedding.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "unembedding.weight",
}


def read_raw_tensors(path: str | Path) -> dict[str, tuple[str, np.ndarray]]:
    """Read every tensor of one safetensors file as ``name -> (dtype string, array)``.

    BF16 tensors come back as their raw ``uint16`` bit patterns (numpy has no bfloat16), U8 as
    ``uint8``; the header is parsed and validated by the ``safetensors`` package.

    Example:
        >>> t = read_raw_tensors("tests/data/models/tiny-a/model.safetensors")  # doctest: +SKIP
        >>> t["model.norm.weight"][0], t["model.norm.weight"][1].shape            # doctest: +SKIP
        ('BF16', (128,))
    """
    out: dict[str, tuple[str, np.ndarray]] = {}
    for name, item in deserialize(Path(path).read_bytes()):
        dtype = item["dtype"]
        if dtype not in _NUMPY_DTYPE:
            raise ValueError(f"{path}: tensor {name} has unsupported dtype {dtype}")
        array = np.frombuffer(item["data"], dtype=_NUMPY_DTYPE[dtype]).reshape(item["shape"])
        out[name] = (dtype, array)
    return out


def _read_hf_checkpoint(hf_dir: Path) -> dict[str, tuple[str, np.ndarray]]:
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors: dict[str, tuple[str, np.ndarray]] = {}
    for file in files:
        tensors.update(read_raw_tensors(hf_dir / file))
    return tensors


def original_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """Map a Hugging Face gpt-oss ``config.json`` dict to the 16-key ``original/config.json``.

    Example:
        >>> original_config(json.load(open("tests/data/models/tiny-a/config.json")))["num_experts"]
        8
    """
    rope = hf_config["rope_scaling"]
    return {
        "num_hidden_layers": hf_config["num_hidden_layers"],
        "num_experts": hf_config["num_local_experts"],
        "experts_per_token": hf_config["num_experts_per_tok"],
        "vocab_size": hf_config["vocab_size"],
        "hidden_size": hf_config["hidden_size"],
        "intermediate_size": hf_config["intermediate_size"],
        "swiglu_limit": hf_config["swiglu_limit"],
        "head_dim": hf_config["head_dim"],
        "num_attention_heads": hf_config["num_attention_heads"],
        "num_key_value_heads": hf_config["num_key_value_heads"],
        "sliding_window": hf_config["sliding_window"],
        "initial_context_length": hf_config["initial_context_length"],
        "rope_theta": hf_config["rope_theta"],
        "rope_scaling_factor": rope["factor"],
        "rope_ntk_alpha": rope["beta_slow"],
        "rope_ntk_beta": rope["beta_fast"],
    }


def convert_hf_to_original(hf_dir: str | Path, out_dir: str | Path) -> Path:
    """Write ``out_dir/config.json`` and ``out_dir/model.safetensors`` in the ``original/`` layout.

    Every tensor is copied bit for bit; the only data transformation is the row-wise fusion
    ``qkv = concat(q_proj, k_proj, v_proj)`` of the attention weights and biases.
    Returns ``out_dir``.

    Raises:
        KeyError: a tensor the layout requires is missing from the source.
        ValueError: the source has tensors this converter does not know.

    Example:
        >>> src = "tests/data/models/tiny-a"
        >>> convert_hf_to_original(src, "/tmp/tiny-a-original")  # doctest: +SKIP
        PosixPath('/tmp/tiny-a-original')
    """
    hf_path = Path(hf_dir)
    out = Path(out_dir)
    hf_config = json.loads((hf_path / "config.json").read_text())
    source = _read_hf_checkpoint(hf_path)
    used: set[str] = set()

    def take(name: str) -> tuple[str, np.ndarray]:
        used.add(name)
        return source[name]

    converted: dict[str, tuple[str, np.ndarray]] = {}
    for hf_name, name in _GLOBAL_RENAMES.items():
        converted[name] = take(hf_name)
    for layer in range(hf_config["num_hidden_layers"]):
        src, dst = f"model.layers.{layer}.", f"block.{layer}."
        for suffix in ("weight", "bias"):
            parts = [take(f"{src}self_attn.{p}_proj.{suffix}") for p in ("q", "k", "v")]
            dtypes = {dtype for dtype, _ in parts}
            if len(dtypes) != 1:
                raise ValueError(f"layer {layer}: q/k/v {suffix} dtypes differ: {sorted(dtypes)}")
            fused = np.ascontiguousarray(np.concatenate([a for _, a in parts], axis=0))
            converted[f"{dst}attn.qkv.{suffix}"] = (dtypes.pop(), fused)
        for hf_suffix, suffix in _LAYER_RENAMES.items():
            converted[dst + suffix] = take(src + hf_suffix)
    unused = sorted(set(source) - used)
    if unused:
        raise ValueError(f"{hf_path}: tensors not in the gpt-oss layout: {unused[:5]}")

    out.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(a) for name, (_, a) in converted.items()}
    specs = {
        name: TensorSpec(
            dtype=_SPEC_DTYPE[dtype],
            shape=list(arrays[name].shape),
            data_ptr=arrays[name].ctypes.data,
            data_len=arrays[name].nbytes,
        )
        for name, (dtype, _) in converted.items()
    }
    serialize_file(specs, str(out / "model.safetensors"), metadata={"format": "pt"})
    config_text = json.dumps(original_config(hf_config), indent=2) + "\n"
    (out / "config.json").write_text(config_text)
    return out
