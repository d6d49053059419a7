"""GGUF (llama.cpp's format): read `llama`, `qwen2`, `qwen3`, `gemma3`, `phi3` and `gpt2` models into
our Transformer, write them back.

The header is parsed by `GGUFFile` (gguf_file.py, torch-free); dequantisation and writing
use the `gguf` package from the llama.cpp project. For `llama` files llama.cpp's converter permutes
the rows of Q and K for its interleaved RoPE; we undo that on read and redo it on write, so weights
stay in the HF (half-split) layout our model uses, which the other architectures keep as they are.
Metadata follows llama.cpp's reading of each architecture (gemma3's default layer pattern, local
RoPE base and attention scale), checked by loading our files in llama.cpp itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError
from lmforge.formats.gguf_file import GGUF_ARCHITECTURES, GGUFFile, GGUFTensor
from lmforge.formats.metadata import (
    check_dimensions,
    check_memory,
    integer,
    model_config,
    positive_number,
    sampling_settings,
)
from lmforge.inference import kernels
from lmforge.inference.quantize import (
    GGUF_BLOCK_TYPES,
    QuantizedTensor,
    as_float,
    model_from_weights,
    model_weights,
    segment_table,
)
from lmforge.model import ModelConfig, Transformer, rope_frequencies, zeroed_from_os
from lmforge.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# How `tokenizer.ggml.pre` splits text before byte-level BPE (llama.cpp's llama-vocab.cpp, the same
# regexes transformers uses for GGUF files). An unknown name is refused, as llama.cpp refuses it: splitting
# with another family's rule gives other ids, and the model quietly reads a different text.
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
TEKKEN_SPLIT = (  # Mistral Nemo and later Mistral models
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GPT4O_SPLIT = (  # Phi-4 and Llama 4
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "default": [GPT2_SPLIT],  # llama.cpp's name when the file names none
    "gpt-2": [GPT2_SPLIT],
    "gpt2": [GPT2_SPLIT],
    "phi-2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],  # digits one by one, then GPT-2's rule
    "llama-bpe": [LLAMA3_SPLIT],  # the first name of each rule is the one export writes (llama.cpp's converter's)
    "llama3": [LLAMA3_SPLIT],
    "llama-v3": [LLAMA3_SPLIT],
    "smaug-bpe": [LLAMA3_SPLIT],
    "falcon3": [LLAMA3_SPLIT],
    "falcon-h1": [LLAMA3_SPLIT],
    "pixtral": [LLAMA3_SPLIT],
    "midm-2.0": [LLAMA3_SPLIT],
    "lfm2": [LLAMA3_SPLIT],
    "dbrx": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT],
    "deepseek-r1-qwen": [QWEN2_SPLIT],
    "megrez": [QWEN2_SPLIT],
    "kormo": [QWEN2_SPLIT],
    "qwen35": [QWEN35_SPLIT],
    "tekken": [TEKKEN_SPLIT],
    "gpt-4o": [GPT4O_SPLIT],
    "llama4": [GPT4O_SPLIT],
    "minimax-m2": [GPT4O_SPLIT],
}
# Families whose SentencePiece scores do not follow the merge order; the token order in the file does
# (transformers' GGUF reader, `gemma_tokenizer`).
MERGES_BY_POSITION = ("gemma", "gemma2", "gemma3")


# (ours, llama.cpp's) layer names that carry a bias in the GPT-2 family.
GPT2_BIASES = [
    ("attention_norm", "attn_norm"),
    ("mlp_norm", "ffn_norm"),
    ("attention.qkv", "attn_qkv"),
    ("attention.out", "attn_output"),
    ("mlp.up", "ffn_up"),
    ("mlp.down", "ffn_down"),
]

# Every RoPE architecture among them is the Llama base (pre-RMSNorm, RoPE, no biases but q/k/v's);
# these are the switches a file of each one implies on top of it (`ModelConfig.family` goes the other
# way, from a model's switches to the architecture that can hold them).
ARCHITECTURE_SWITCHES = {
    "llama": dict(mlp="swiglu", qkv_bias=None, qk_norm=False, post_norms=False, scale_embeddings=False),
    "qwen2": dict(mlp="swiglu", qkv_bias=True, qk_norm=False, post_norms=False, scale_embeddings=False),
    "qwen3": dict(mlp="swiglu", qkv_bias=None, qk_norm=True, post_norms=False, scale_embeddings=False),
    "gemma3": dict(mlp="geglu", qkv_bias=None, qk_norm=True, post_norms=True, scale_embeddings=True),
    "phi3": dict(mlp="swiglu", qkv_bias=None, qk_norm=False, post_norms=False, scale_embeddings=False),
}
ROPE_BASE = dict(norm="rmsnorm", positions="rope", bias=False, causal=True, norm_position="pre")
# Published names of architectures whose GGUF form is another's (Mistral's converter writes `llama`).
GGUF_ARCHITECTURE_OF = {"mistral": "llama"}
GEMMA3_SLIDING_PERIOD = 6  # llama.cpp's default for gemma3: five sliding layers, then a full one
GEMMA3_LOCAL_ROPE_THETA = 10000.0  # llama.cpp's default for gemma3's sliding layers (rope.freq_base_swa)


def _cat(parts: list) -> torch.Tensor | QuantizedTensor:
    if any(isinstance(part, QuantizedTensor) for part in parts):
        return QuantizedTensor.cat(parts)
    return torch.cat(parts)


def _unpermute_rope(weight, n_heads: int):
    """Inverse of llama.cpp's `permute`: interleaved rotary pairs back to the half-split layout."""
    if isinstance(weight, QuantizedTensor):  # permute whole rows; the blocks run along them
        return weight.index_rows(_unpermute_rope(torch.arange(weight.shape[0]), n_heads))
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def _permute_rope(weight, n_heads: int):
    """llama.cpp's `permute`: half-split rotary pairs to its interleaved layout (whole rows of a quantised weight)."""
    if isinstance(weight, QuantizedTensor):
        return weight.index_rows(_permute_rope(torch.arange(weight.shape[0]), n_heads))
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


@dataclass
class JoinedTensor:
    """One of our tensors that llama.cpp stores as several (q/k/v, gate/up), stacked by rows."""

    ours: str
    parts: list[str]  # llama.cpp's names, in row order
    rows: list[int]  # rows of each part
    rope_heads: list[int | None]  # heads to (un)permute each part by: the `llama` architecture's Q and K


def layer_tensors(config: ModelConfig, architecture: str) -> tuple[list[tuple[str, str]], list[JoinedTensor]]:
    """Names of one layer's tensors, ours and llama.cpp's (without the `blocks.{i}.` / `blk.{i}.` prefixes):
    pairs stored one for one, and tensors llama.cpp splits. Only the `llama` architecture's converter
    permutes Q and K (llama.cpp's interleaved RoPE); the others rotate the half-split (NEOX) layout we use."""
    pairs = [
        ("attention_norm.weight", "attn_norm.weight"),
        ("mlp_norm.weight", "ffn_norm.weight"),
        ("attention.out.weight", "attn_output.weight"),
        ("mlp.down.weight", "ffn_down.weight"),
    ]
    if architecture == "gpt2":
        pairs += [("attention.qkv.weight", "attn_qkv.weight"), ("mlp.up.weight", "ffn_up.weight")]
        return pairs + [(f"{ours}.bias", f"{theirs}.bias") for ours, theirs in GPT2_BIASES], []
    if config.qk_norm:
        pairs += [("attention.q_norm.weight", "attn_q_norm.weight"), ("attention.k_norm.weight", "attn_k_norm.weight")]
    if config.post_norms:  # Gemma 3: ffn_norm is the norm before the MLP, these two come after each part
        pairs += [
            ("attention_post_norm.weight", "post_attention_norm.weight"),
            ("mlp_post_norm.weight", "post_ffw_norm.weight"),
        ]
    if architecture == "phi3":  # fused as in its HF checkpoints: [q | k | v] and [gate | up]
        return pairs + [("attention.qkv.weight", "attn_qkv.weight"), ("mlp.up.weight", "ffn_up.weight")], []
    q_rows, kv_rows = config.n_heads * config.head_dim, config.kv_heads * config.head_dim
    heads = [config.n_heads, config.kv_heads, None] if architecture == "llama" else [None, None, None]
    qkv_rows = [q_rows, kv_rows, kv_rows]
    joined = [
        JoinedTensor("attention.qkv.weight", ["attn_q.weight", "attn_k.weight", "attn_v.weight"], qkv_rows, heads)
    ]
    if config.qkv_bias:
        joined.append(
            JoinedTensor("attention.qkv.bias", ["attn_q.bias", "attn_k.bias", "attn_v.bias"], qkv_rows, heads)
        )
    hidden = config.mlp_hidden
    joined.append(JoinedTensor("mlp.up.weight", ["ffn_gate.weight", "ffn_up.weight"], [hidden, hidden], [None, None]))
    return pairs, joined


def size_keys(architecture: str) -> dict[str, str]:
    """The GGUF key that holds each of our config's sizes."""
    keys = dict(
        vocab_size="vocab_size",
        block_size="context_length",
        n_layers="block_count",
        n_heads="attention.head_count",
        n_kv_heads="attention.head_count_kv",
        d_model="embedding_length",
        d_mlp="feed_forward_length",
        d_head="attention.key_length",
    )
    return {ours: f"{architecture}.{theirs}" for ours, theirs in keys.items()}


def _check_supported(reader, architecture, path: Path) -> None:
    """A clear refusal for what is not a language model we can build: other architectures, mixture-of-experts
    layers (Qwen3-MoE, Mixtral as `llama`), and the vision projectors (mmproj) of multimodal models."""
    supported = ", ".join(GGUF_ARCHITECTURES)
    if architecture == "clip" or reader.fields.get("general.type") == "mmproj":
        raise LmforgeError(
            f"{path}: a multimodal projector (mmproj: the vision tower of a multimodal model), not a language "
            f"model; load the text model's own GGUF file (supported architectures: {supported})"
        )
    experts = reader.fields.get(f"{architecture}.expert_count")
    if (isinstance(experts, int) and experts > 0) or any("_exps." in t.name for t in reader.tensors):
        raise LmforgeError(
            f"{path}: GGUF architecture {architecture!r} with mixture-of-experts layers is not supported "
            f"(supported: {supported}, dense models only)"
        )
    if architecture not in GGUF_ARCHITECTURES:
        raise LmforgeError(f"{path}: GGUF architecture {architecture!r} is not supported (supported: {supported})")


def read_config(reader, path: Path) -> ModelConfig:
    """Our config from the GGUF metadata, every field checked (type, range, divisibility) before use."""
    architecture = reader.fields.get("general.architecture")
    _check_supported(reader, architecture, path)
    fields, names = reader.fields, size_keys(architecture)
    key = lambda name: f"{architecture}.{name}"  # noqa: E731
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(token, str) for token in tokens):
        raise LmforgeError(f"{path}: tokenizer.ggml.tokens is missing or not a list of strings")
    sizes = {
        ours: integer(fields, theirs, path)
        for ours, theirs in names.items()
        if ours not in ("vocab_size", "n_kv_heads", "d_head")
    }
    sizes["vocab_size"] = integer(fields, names["vocab_size"], path, default=len(tokens))
    common = dict(**sizes, tie_embeddings="output.weight" not in {t.name for t in reader.tensors})
    if architecture != "gpt2":
        return model_config(path, names, **common, **_rope_architecture_fields(reader, path, architecture, sizes))
    return model_config(
        path,
        names,
        **common,
        norm="layernorm",
        mlp="gelu_tanh",
        positions="learned",
        bias=True,
        norm_eps=positive_number(fields, key("attention.layer_norm_epsilon"), path, 1e-5),
    )


def _rope_architecture_fields(reader, path: Path, architecture: str, sizes: dict) -> dict:
    """The config fields of a llama / qwen2 / qwen3 / gemma3 / phi3 file beyond its sizes, as llama.cpp reads them."""
    fields = reader.fields
    key = lambda name: f"{architecture}.{name}"  # noqa: E731
    n_heads, d_model, n_layers = sizes["n_heads"], sizes["d_model"], sizes["n_layers"]
    even_split = d_model // n_heads
    if d_model % n_heads and key("attention.key_length") not in fields:
        raise LmforgeError(
            f"{path}: {key('embedding_length')}={d_model} is not divisible by {key('attention.head_count')}={n_heads}"
        )
    head_dim = integer(fields, key("attention.key_length"), path, default=even_split)
    if integer(fields, key("attention.value_length"), path, default=head_dim) != head_dim:
        raise LmforgeError(f"{path}: {key('attention.value_length')} != {key('attention.key_length')} is not supported")
    if integer(fields, key("rope.dimension_count"), path, default=head_dim) != head_dim:
        raise LmforgeError(
            f"{path}: {key('rope.dimension_count')} != the head width {head_dim} (RoPE over part of each head) "
            "is not supported"
        )
    window = integer(fields, key("attention.sliding_window"), path, default=0, minimum=0) or None
    layer_types = None
    if window is not None:
        sliding = _sliding_layers(fields, key("attention.sliding_window_pattern"), path, n_layers, architecture)
        if not all(sliding):
            layer_types = ["sliding" if is_sliding else "full" for is_sliding in sliding]
    switches = dict(ARCHITECTURE_SWITCHES[architecture])
    if architecture == "llama" and any(t.name == "blk.0.attn_q.bias" for t in reader.tensors):
        switches["qkv_bias"] = True  # llama.cpp's `llama` takes optional q/k/v biases (rare converted models)
    gemma3 = architecture == "gemma3"
    local_theta_default = GEMMA3_LOCAL_ROPE_THETA if gemma3 and layer_types else None
    # llama.cpp scales a gemma3 query by 1/sqrt(head width), except for the 27B model (62 layers): by
    # 1/sqrt(d_model / n_heads), its query_pre_attn_scalar; `attention.scale` is only ours (see save_gguf)
    derived_scale = None
    if gemma3:
        derived_scale = 1 / math.sqrt(d_model / n_heads if n_layers == 62 else head_dim)
    return dict(
        **ROPE_BASE,
        **switches,
        n_kv_heads=integer(fields, key("attention.head_count_kv"), path, default=n_heads),
        d_head=None if head_dim == even_split else head_dim,
        rope_theta=positive_number(fields, key("rope.freq_base"), path, 10000.0),
        norm_eps=positive_number(fields, key("attention.layer_norm_rms_epsilon"), path, 1e-5),
        sliding_window=window,
        layer_types=layer_types,
        rope_local_theta=positive_number(fields, key("rope.freq_base_swa"), path, local_theta_default),
        rope_scaling=_read_rope_scaling(reader, path, architecture, head_dim),
        attention_scale=positive_number(fields, key("attention.scale"), path, derived_scale),
        logit_softcap=positive_number(fields, key("final_logit_softcapping"), path, None),
        architecture=None if architecture == "llama" else architecture,
    )


def _sliding_layers(fields: dict, pattern_key: str, path: Path, n_layers: int, architecture: str) -> list[bool]:
    """Which layers attend over the sliding window: `attention.sliding_window_pattern` is a period p (layer i
    slides unless i % p == p - 1, llama.cpp's `set_swa_pattern`) or one flag per layer; gemma3's default
    period is 6, other architectures slide in every layer."""
    pattern = fields.get(pattern_key)
    if isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(flag, bool) for flag in pattern):
            raise LmforgeError(f"{path}: {pattern_key} should be one true/false per layer ({n_layers})")
        return pattern
    default = GEMMA3_SLIDING_PERIOD if architecture == "gemma3" else 0
    period = integer(fields, pattern_key, path, default=default, minimum=0)
    return [period == 0 or layer % period < period - 1 for layer in range(n_layers)]


def _read_rope_scaling(reader, path: Path, architecture: str, head_dim: int) -> dict | None:
    """`rope_scaling` from `rope.scaling.*` (linear, yarn) or from a `rope_freqs.weight` tensor (Llama 3.1+:
    one divisor per frequency, what llama.cpp's converter makes of HF's "llama3" scaling)."""
    fields = reader.fields
    key = lambda name: f"{architecture}.rope.{name}"  # noqa: E731
    kind = fields.get(key("scaling.type"), "none")
    factor = positive_number(fields, key("scaling.factor"), path, 1.0)
    if key("scale_linear") in fields:  # the older key for a linear factor
        kind, factor = "linear", positive_number(fields, key("scale_linear"), path, 1.0)
    scaling = None
    if kind == "linear" and factor != 1.0:
        scaling = {"rope_type": "linear", "factor": factor}
    elif kind == "yarn":
        original = integer(fields, key("scaling.original_context_length"), path)
        scaling = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    elif kind not in ("none", "linear"):
        raise LmforgeError(f"{path}: RoPE scaling {kind!r} ({key('scaling.type')}) is not supported (linear, yarn)")
    tensors = {t.name: t for t in reader.tensors}
    if "rope_factors_long.weight" in tensors:
        raise LmforgeError(f"{path}: Phi-3 'longrope' scaling (rope_factors_long/short) is not supported")
    if "rope_freqs.weight" in tensors:
        if scaling is not None:
            raise LmforgeError(f"{path}: rope_freqs.weight together with {kind} RoPE scaling is not supported")
        factors = _dequantize(tensors["rope_freqs.weight"]).flatten()
        if factors.numel() != head_dim // 2 or not bool(torch.isfinite(factors).all() and (factors > 0).all()):
            raise LmforgeError(f"{path}: rope_freqs.weight should hold {head_dim // 2} positive factors")
        scaling = {"rope_type": "factors", "factors": factors.tolist()}
    return scaling


def _dequantize_q4_q8(blocks: torch.Tensor, type_name: str) -> torch.Tensor:
    """Q4_0, Q4_1 and Q8_0 in torch (several times faster than numpy): rows of 32-weight blocks.

    Q8_0 block: f16 scale d, 32 int8 codes; w = d * q.
    Q4_0 block: f16 d, 16 bytes of 4-bit codes; w = d * (q - 8).
    Q4_1 block: f16 d, f16 minimum m, 16 bytes of codes; w = d * q + m.
    In a 4-bit block the low nibbles hold weights 0-15 and the high nibbles weights 16-31.
    """
    header = 4 if type_name == "Q4_1" else 2
    size = header + (32 if type_name == "Q8_0" else 16)
    blocks = blocks.reshape(-1, size)
    scale = blocks[:, :2].contiguous().view(torch.float16).float()
    if type_name == "Q8_0":
        return scale * blocks[:, 2:].contiguous().view(torch.int8).float()
    codes = blocks[:, header:]
    codes = torch.cat([codes & 0x0F, codes >> 4], dim=1).float()
    if type_name == "Q4_0":
        return scale * (codes - 8)
    return scale * codes + blocks[:, 2:4].contiguous().view(torch.float16).float()


def _dequantize(tensor) -> torch.Tensor:
    """One GGUF tensor as fp32, in torch's dimension order: block types through the native kernels
    (or torch for Q4_0/Q4_1/Q8_0 without them), BF16 in torch, the rest (Q2_K, Q3_K, IQ*, ...)
    through the gguf package's numpy code."""
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
    type_name = tensor.tensor_type.name
    if type_name == "BF16":  # the top half of an fp32
        raw = torch.from_numpy(np.array(tensor.data, copy=True)).reshape(-1)
        return raw.view(torch.bfloat16).float().reshape(shape)
    if type_name in GGUF_BLOCK_TYPES and kernels.available():
        blocks = torch.from_numpy(np.array(tensor.data, copy=True)).reshape(-1)
        rows = math.prod(shape[:-1])
        table = segment_table(((type_name, rows),))
        return kernels.dequantize_blocks(blocks, table, shape[-1], slice(None)).reshape(shape)
    if type_name in ("Q4_0", "Q4_1", "Q8_0"):
        return _dequantize_q4_q8(torch.from_numpy(np.array(tensor.data, copy=True)), type_name).reshape(shape)
    values = np.ascontiguousarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
    if not values.flags.writeable:  # unquantised tensors come back as views of the read-only file map
        values = values.copy()
    return torch.from_numpy(values.reshape(shape))


def _as_quantized(tensor) -> QuantizedTensor:
    """A quantised matrix as it is in the file: Q4_0 / Q4_1 / Q8_0 mapped block for block onto our
    int4 / int8 formats (group 32), the other block types kept as GGUF blocks."""
    rows, columns = int(tensor.shape[1]), int(tensor.shape[0])
    type_name = tensor.tensor_type.name

    def copied(array: np.ndarray) -> torch.Tensor:
        """Out of the file map into memory from the OS: glibc's heap would keep what loading frees."""
        out = zeroed_from_os(array.shape, "cpu", torch.uint8, huge_pages=True)
        out.numpy()[...] = array
        return out

    if type_name not in ("Q4_0", "Q4_1", "Q8_0"):
        return QuantizedTensor.from_blocks(copied(tensor.data.reshape(-1)), [(type_name, rows)], columns)
    header = 4 if type_name == "Q4_1" else 2
    size = header + (32 if type_name == "Q8_0" else 16)
    blocks = tensor.data.reshape(rows, columns // 32, size)

    def field(start: int, stop: int) -> torch.Tensor:  # each field straight into its own array
        return copied(blocks[..., start:stop])

    scale = field(0, 2).view(torch.float16).squeeze(-1)  # int4 keeps fp16 scales, int8 fp32
    codes = field(header, size).reshape(rows, -1)
    if type_name == "Q8_0":
        return QuantizedTensor(8, 32, codes.view(torch.int8), scale.float())
    if type_name == "Q4_0":  # w = d * (q - 8); exact in fp16 (a power-of-two multiple)
        return QuantizedTensor(4, 32, codes, scale, -8 * scale)
    return QuantizedTensor(4, 32, codes, scale, field(2, 4).view(torch.float16).squeeze(-1))


def _stays_quantized(tensor: GGUFTensor, config: ModelConfig) -> bool:
    """Whether a tensor can load as its blocks: a matrix in a type the kernels read (Q4_0, Q4_1, Q5_0,
    Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) that becomes a Linear layer. Embedding tables are looked up, not
    multiplied (a tied one is the LM head's matrix)."""
    looked_up = ["position_embd.weight"] + ([] if config.tie_embeddings else ["token_embd.weight"])
    embedding = tensor.name in looked_up
    return tensor.tensor_type.name in GGUF_BLOCK_TYPES and len(tensor.shape) == 2 and not embedding


def resident_bytes(reader: GGUFFile, config: ModelConfig, keep_quantized: bool) -> int:
    """Memory the loaded weights take, from the tensor shapes in the header: blocks as they are, the rest fp32."""
    return sum(
        tensor.data.nbytes if keep_quantized and _stays_quantized(tensor, config) else 4 * math.prod(tensor.shape)
        for tensor in reader.tensors
    )


def read_weights(
    reader: GGUFFile, config: ModelConfig, path: Path, keep_quantized: bool = False
) -> dict[str, torch.Tensor | QuantizedTensor]:
    """Our state dict from GGUF tensors: fp32, or with keep_quantized, matrices in the block types the
    kernels read (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K) as QuantizedTensor, blocks as they are."""
    import sys

    from tqdm import tqdm

    raw: dict[str, torch.Tensor] = {}
    tensors = tqdm(
        reader.tensors, desc=f"loading {path.name}", unit="tensor", leave=False, disable=not sys.stderr.isatty()
    )
    for tensor in tensors:
        try:
            if keep_quantized and _stays_quantized(tensor, config):
                raw[tensor.name] = _as_quantized(tensor)
            else:
                raw[tensor.name] = _dequantize(tensor)
            reader.release(tensor)
        except (NotImplementedError, ValueError) as error:
            raise LmforgeError(
                f"{path}: cannot dequantise tensor {tensor.name} ({tensor.tensor_type.name}): {error}"
            ) from None

    def take(name: str) -> torch.Tensor:
        if name not in raw:
            raise LmforgeError(f"{path}: tensor {name!r} is missing; the file is not a complete model")
        return raw.pop(name)

    weights = {"token_embedding.weight": take("token_embd.weight"), "final_norm.weight": take("output_norm.weight")}
    if not config.tie_embeddings:
        weights["lm_head.weight"] = take("output.weight")
    if config.positions == "learned":
        weights["position_embedding.weight"] = take("position_embd.weight")
    if config.bias:
        weights["final_norm.bias"] = take("output_norm.bias")
    pairs, joined = layer_tensors(config, reader.fields["general.architecture"])  # read_config checked the name
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        for ours_name, theirs_name in pairs:
            weights[ours + ours_name] = take(theirs + theirs_name)
        for tensor in joined:
            parts = [take(theirs + name) for name in tensor.parts]
            parts = [
                part if heads is None else _unpermute_rope(part, heads) for part, heads in zip(parts, tensor.rope_heads)
            ]
            weights[ours + tensor.ours] = _cat(parts)
    unused = sorted(set(raw) - {"rope_freqs.weight"})  # (read_config made RoPE scaling of that one)
    if unused:  # a variant of the architecture we do not build: its maths would be silently wrong
        raise LmforgeError(
            f"{path}: tensors {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''} have no place in "
            f"lmforge's {reader.fields['general.architecture']} model; this variant is not supported"
        )
    return weights


def read_tokenizer(reader, path: Path) -> Tokenizer:
    """Tokenizer from the GGUF vocabulary: byte-level BPE (`gpt2`) or SentencePiece (`llama`), giving the ids
    llama.cpp gives (control tokens only from markup; user-defined ones, like `<think>`, always whole)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    fields = reader.fields
    kind = fields.get("tokenizer.ggml.model")
    tokens = list(fields["tokenizer.ggml.tokens"])  # read_config checked it: a list of strings
    token_types = fields.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    scores = fields.get("tokenizer.ggml.scores", [0.0] * len(tokens))
    merge_list = fields.get("tokenizer.ggml.merges", [])
    for name, values in (("token_type", token_types), ("scores", scores)):
        if not isinstance(values, list) or len(values) != len(tokens):
            raise LmforgeError(f"{path}: tokenizer.ggml.{name} should hold one value per token ({len(tokens)})")
    if not isinstance(merge_list, list) or not all(isinstance(m, str) and " " in m for m in merge_list):
        raise LmforgeError(f"{path}: tokenizer.ggml.merges should be a list of 'left right' strings")
    if kind == "gpt2":
        vocab = {token: index for index, token in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in merge_list]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        pre = fields.get("tokenizer.ggml.pre", "default")
        if pre not in PRE_TOKENIZER_SPLITS:
            raise LmforgeError(
                f"{path}: tokenizer.ggml.pre {pre!r} is not a pre-tokenizer lmforge knows "
                f"(known: {', '.join(sorted(PRE_TOKENIZER_SPLITS))}); llama.cpp refuses such a file too"
            )
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in PRE_TOKENIZER_SPLITS[pre]]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        hf.decoder = decoders.ByteLevel()
        add_bos_default = False
    elif kind == "llama":
        if fields.get("general.architecture") in MERGES_BY_POSITION:
            # Gemma's converter stores whitespace-run tokens with real spaces; its text has them as "▁".
            tokens = ["▁" * len(t) if len(t) > 1 and not t.strip(" ") else t for t in tokens]
            ranks = [-float(index) for index in range(len(tokens))]
        else:
            ranks = [float(score) for score in scores]
        vocab = {token: index for index, token in enumerate(tokens)}
        add_prefix = bool(fields.get("tokenizer.ggml.add_space_prefix", True))
        hf = HFTokenizer(
            models.BPE(
                vocab=vocab,
                merges=_merges_from_scores(tokens, ranks, token_types),
                byte_fallback=True,
                unk_token=tokens[0] if token_types[0] == UNKNOWN else None,
            )
        )
        # The prefix space goes before each stretch of text (llama.cpp: the start, and after each control token).
        hf.normalizer = normalizers.Sequence(
            ([normalizers.Prepend("▁")] if add_prefix else []) + [normalizers.Replace(" ", "▁")]
        )
        hf.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if add_prefix else [])
        )
        add_bos_default = True  # llama.cpp's default for SentencePiece vocabularies
    else:
        raise LmforgeError(f"{path}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    specials = [t for t, kind_id in zip(tokens, token_types) if kind_id == CONTROL]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    # llama.cpp matches user-defined tokens whole wherever they are, before the vocabulary's own pieces.
    hf.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind_id in zip(tokens, token_types)
            if kind_id == USER_DEFINED
        ]
    )
    tokenizer = BPETokenizer(hf, specials)

    def token_at(key: str) -> str | None:
        index = fields.get(key)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    tokenizer.bos_token = token_at("tokenizer.ggml.bos_token_id")
    tokenizer.eos_token = token_at("tokenizer.ggml.eos_token_id")
    tokenizer.pad_token = token_at("tokenizer.ggml.padding_token_id")
    tokenizer.add_bos_token = bool(fields.get("tokenizer.ggml.add_bos_token", add_bos_default))
    tokenizer.add_eos_token = bool(fields.get("tokenizer.ggml.add_eos_token", False))
    ends = (token_at(f"tokenizer.ggml.{name}_token_id") for name in ("eot", "eom"))
    tokenizer.end_of_turn_tokens = tuple(token for token in ends if token is not None)
    tokenizer.chat_template = fields.get("tokenizer.chat_template")
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces, ranked by
    the merged piece's score (higher first). Different pieces of equal score are ranked by their text here and
    by position in llama.cpp; real vocabularies give each piece its own score.

    Running them as BPE is llama.cpp's SentencePiece algorithm (`llm_tokenizer_spm`): repeatedly join the
    adjacent pair whose join is the best-scoring piece, then spell what is left in byte tokens."""
    vocab = {t for t, kind in zip(tokens, token_types) if kind in (NORMAL, USER_DEFINED)}
    candidates = []
    for token, score in zip(tokens, scores):
        if token not in vocab or len(token) < 2:
            continue
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in vocab and right in vocab:
                candidates.append((-score, token, left, right))
    return [(left, right) for _, _, left, right in sorted(candidates)]


def open_gguf(path: Path) -> GGUFFile:
    """The file's header parsed (tensors mapped, not read); an LmforgeError for a missing or damaged file."""
    if not path.exists():
        raise LmforgeError(f"{path}: no such file")
    try:
        return GGUFFile(path)
    except Exception as error:  # the reader raises ValueError, IndexError, ... on damaged files
        raise LmforgeError(
            f"{path}: not a readable GGUF file ({type(error).__name__}: {error}); it may be truncated or corrupt"
        ) from None


# llama.cpp's sampling defaults in a file's metadata (gguf.Keys.General.SAMPLING_*), for our fields;
# min_p, XTC and mirostat have no lmforge equivalent.
GGUF_SAMPLING_KEYS = dict(
    temperature="general.sampling.temp",
    top_k="general.sampling.top_k",
    top_p="general.sampling.top_p",
    repetition_penalty="general.sampling.penalty_repeat",
)


def read_sampling(path: str | Path) -> dict:
    """The sampling settings a GGUF file names (`general.sampling.*`), as SamplingConfig fields."""
    path = Path(path)
    return sampling_settings(open_gguf(path).fields, path, GGUF_SAMPLING_KEYS)


def load_gguf(path: str | Path, keep_quantized: bool = False) -> tuple[Transformer, Tokenizer]:
    """Model (eval mode) and tokenizer from a GGUF file: fp32, or with keep_quantized, matrices in
    Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q4_K/Q5_K/Q6_K kept as their blocks (4-8x less memory, faster decoding)."""
    path = Path(path)
    reader = open_gguf(path)
    config = read_config(reader, path)
    check_memory(resident_bytes(reader, config, keep_quantized), path)
    weights = read_weights(reader, config, path, keep_quantized)
    check_dimensions(config, weights, path, size_keys(reader.fields["general.architecture"]))
    try:
        model = model_from_weights(config, weights)
    except ValueError as error:
        raise LmforgeError(f"{path}: {error}") from None
    return model.eval(), read_tokenizer(reader, path)


def save_gguf(model: Transformer, tokenizer: Tokenizer, path: str | Path, dtype: str = "f16") -> Path:
    """Write `model` and its tokenizer as GGUF; dtype is f32, f16, q8_0 or q4_1 (norms and biases stay f32).

    The architecture is the model's own (`config.architecture`: llama, qwen2, qwen3, gemma3, phi3;
    Mistral as llama), else the one whose switches it has. A quantised model's layers are dequantised
    for f32/f16. For q8_0 and q4_1, int8/int4 layers in 32-column groups are written as their own
    blocks (Q8_0 / Q4_1, unchanged); with q4_1, layers the model keeps at 8 bits (the LM head after
    `lmforge quantize --bits 4`) stay 8-bit, as Q8_0.
    """
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

    config = model.config
    architecture = export_architecture(config)
    types = {
        "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
        "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
        "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
        "q4_1": (GGMLQuantizationType.Q4_1, LlamaFileType.MOSTLY_Q4_1),
    }
    if dtype not in types:
        raise LmforgeError(f"GGUF dtype {dtype!r} is not supported; choose one of {sorted(types)}")
    matrix_type, file_type = types[dtype]
    path = Path(path)
    writer = GGUFWriter(str(path), architecture)
    writer.add_name(path.stem)
    writer.add_context_length(config.block_size)
    writer.add_embedding_length(config.d_model)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.mlp_hidden)
    writer.add_head_count(config.n_heads)
    writer.add_file_type(file_type)
    if architecture == "gpt2":
        writer.add_layer_norm_eps(config.norm_eps)
    else:
        _write_rope_architecture_fields(writer, config, architecture)
    _write_tokenizer(writer, tokenizer, config.vocab_size)

    def add(name: str, weight: torch.Tensor | QuantizedTensor) -> None:
        data, raw_dtype = _gguf_tensor(weight, matrix_type)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)

    state = model_weights(model)
    keeps_blocks = matrix_type in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1)

    add("token_embd.weight", state["token_embedding.weight"])
    if architecture == "gpt2":
        add("position_embd.weight", state["position_embedding.weight"])
    rope_factors = _rope_factors(config)
    if rope_factors is not None:  # Llama 3.1+ as llama.cpp's converter writes it
        writer.add_tensor("rope_freqs.weight", rope_factors.numpy())
    pairs, joined = layer_tensors(config, architecture)
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        for ours_name, theirs_name in pairs:
            add(theirs + theirs_name, state[ours + ours_name])
        for tensor in joined:
            # split a fused matrix whole: dequantised first unless its blocks may be kept
            whole = state[ours + tensor.ours] if keeps_blocks else as_float(state[ours + tensor.ours])
            for name, part, heads in zip(tensor.parts, _split_rows(whole, tensor.rows), tensor.rope_heads):
                add(theirs + name, part if heads is None else _permute_rope(part, heads))
    add("output_norm.weight", state["final_norm.weight"])
    if architecture == "gpt2":
        add("output_norm.bias", state["final_norm.bias"])
    if not config.tie_embeddings:
        add("output.weight", state["lm_head.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def export_architecture(config: ModelConfig) -> str:
    """The GGUF architecture a model is written as: its family's (`ModelConfig.family`), Mistral's as llama."""
    try:
        family = config.require_family("GGUF export")
    except ValueError as error:
        raise LmforgeError(str(error)) from None
    return GGUF_ARCHITECTURE_OF.get(family, family)


def _write_rope_architecture_fields(writer, config: ModelConfig, architecture: str) -> None:
    """The metadata `_rope_architecture_fields` reads back; keys llama.cpp has no use for are written only
    where the model needs them (llama.cpp then ignores them: a sliding window on `llama`, a
    `query_pre_attn_scalar` other than gemma3's usual one)."""
    writer.add_head_count_kv(config.kv_heads)
    if config.d_model != config.n_heads * config.head_dim:
        writer.add_key_length(config.head_dim)
        writer.add_value_length(config.head_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if config.sliding_window is not None:
        writer.add_sliding_window(config.sliding_window)
        sliding = [config.is_sliding(layer) for layer in range(config.n_layers)]
        period = GEMMA3_SLIDING_PERIOD if architecture == "gemma3" else 0
        if sliding != [period == 0 or layer % period < period - 1 for layer in range(config.n_layers)]:
            writer.add_sliding_window_pattern(sliding)
    if config.rope_local_theta is not None:
        writer.add_rope_freq_base_swa(config.rope_local_theta)
    if config.logit_softcap is not None:
        writer.add_final_logit_softcapping(config.logit_softcap)
    scale = config.attention_scale or 1 / math.sqrt(config.head_dim)
    derived = 1 / math.sqrt(config.head_dim)
    if architecture == "gemma3" and config.n_layers == 62:
        derived = 1 / math.sqrt(config.d_model / config.n_heads)
    if not math.isclose(scale, derived, rel_tol=1e-6):
        writer.add_attention_scale(scale)
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") in ("linear", "yarn"):
        from gguf import RopeScalingType

        writer.add_rope_scaling_type(RopeScalingType(scaling["rope_type"]))
        writer.add_rope_scaling_factor(scaling["factor"])
        if scaling["rope_type"] == "yarn":
            writer.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])


def _rope_factors(config: ModelConfig) -> torch.Tensor | None:
    """GGUF's `rope_freqs.weight` for a model with "llama3" or "factors" RoPE scaling: the divisor of each
    frequency (head_dim / 2 of them), fp32; None for other models."""
    scaling = config.rope_scaling or {}
    if scaling.get("rope_type") == "factors":
        return torch.tensor(scaling["factors"], dtype=torch.float32)
    if scaling.get("rope_type") == "llama3":
        unscaled, _ = rope_frequencies(config.head_dim, config.rope_theta, None)
        scaled, _ = rope_frequencies(config.head_dim, config.rope_theta, scaling)
        return (unscaled / scaled).float()
    return None


def _split_rows(weight: torch.Tensor | QuantizedTensor, sizes: list[int]) -> list:
    """Row blocks of a fused matrix (q/k/v, gate/up), quantised or not."""
    if not isinstance(weight, QuantizedTensor):
        return list(weight.split(sizes))
    starts = np.cumsum([0, *sizes])
    return [weight.index_rows(torch.arange(start, stop)) for start, stop in zip(starts[:-1], starts[1:])]


def _gguf_tensor(weight: torch.Tensor | QuantizedTensor, matrix_type) -> tuple:
    """(data, raw_dtype) for GGUFWriter.add_tensor: a quantised layer's blocks as they are where the
    type allows, else its values in the requested type (vectors, and rows not made of whole 32-weight
    blocks, in f32 / f16 as llama.cpp's converter does)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize

    q8_0, q4_1 = GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1
    quantized = isinstance(weight, QuantizedTensor)
    if quantized and weight.bits == 8 and matrix_type == q4_1:
        matrix_type = q8_0  # a layer the model keeps at 8 bits stays 8-bit
    if quantized and weight.group_size == 32 and (weight.bits, matrix_type) in ((8, q8_0), (4, q4_1)):
        return _as_blocks(weight).numpy(), matrix_type
    array = as_float(weight).cpu().numpy()
    if array.ndim == 1 or matrix_type == GGMLQuantizationType.F32:
        return array.astype(np.float32), None
    if matrix_type == GGMLQuantizationType.F16 or array.shape[-1] % 32:
        return array.astype(np.float16), None
    return quantize(array, matrix_type), matrix_type


def _as_blocks(weight: QuantizedTensor) -> torch.Tensor:
    """The inverse of `_as_quantized`: rows of Q8_0 (int8) or Q4_1 (int4) blocks of 32 weights."""
    return weight.as_blocks().codes.reshape(weight.shape[0], -1)


def _pre_tokenizer_name(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name (`tokenizer.ggml.pre`) for an HF byte-level pre-tokenizer: its split rules, matched."""
    splits = []
    for step in (pre_tokenizer or {}).get("pretokenizers", [pre_tokenizer] if pre_tokenizer else []):
        if step.get("type") == "Split":
            splits.append(step["pattern"].get("Regex", step["pattern"].get("String")))
        elif step.get("type") == "Digits" and step.get("individual_digits"):
            splits.append(r"\p{N}")
        elif step.get("type") == "ByteLevel" and step.get("use_regex", True):
            splits.append(GPT2_SPLIT)
    name = next((name for name, rules in PRE_TOKENIZER_SPLITS.items() if rules == splits and name != "default"), None)
    if name is None:
        raise LmforgeError(
            "GGUF export: this tokenizer splits text in a way llama.cpp has no pre-tokenizer name for "
            f"(known: {', '.join(sorted(PRE_TOKENIZER_SPLITS))})"
        )
    return name


def _adds_space_prefix(state: dict) -> bool:
    """Whether an HF SentencePiece-style tokenizer puts "▁" before a text (a Prepend normalizer, or Metaspace)."""
    normalizer, pre_tokenizer = state.get("normalizer") or {}, state.get("pre_tokenizer") or {}
    steps = normalizer.get("normalizers", [normalizer]) + pre_tokenizer.get("pretokenizers", [pre_tokenizer])
    return any(
        (step.get("type") == "Prepend" and step.get("prepend") == "▁")
        or (step.get("type") == "Metaspace" and step.get("prepend_scheme", "always") != "never")
        for step in steps
    )


def _scores_from_merges(tokens: list[str], merges: list[str]) -> list[float]:
    """SentencePiece scores that give back the merge order (`_merges_from_scores`): a piece's score is minus
    the rank of the first merge that makes it; pieces no merge makes rank after all of them."""
    first_rank: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        first_rank.setdefault(merge.replace(" ", "", 1), rank)
    unmade = len(merges)
    return [-float(first_rank.get(token, unmade)) for token in tokens]


def _write_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp's `gpt2` model (with the name of its pre-tokenizer); SentencePiece-style
    BPE (byte fallback) and char tokenizers as its `llama` model, whose scores give the merge order (a char
    tokenizer has no merges, so it tokenizes one character at a time)."""
    import json

    if isinstance(tokenizer, CharTokenizer):
        tokens = list(tokenizer.special_tokens) + [f"<0x{b:02X}>" for b in range(256)]
        tokens += [c.replace(" ", "▁") for c in tokenizer.chars]
        types = [CONTROL] * len(tokenizer.special_tokens) + [BYTE] * 256 + [NORMAL] * len(tokenizer.chars)
        writer.add_tokenizer_model("llama")
        writer.add_add_space_prefix(False)
        writer.add_token_scores([0.0] * len(tokens))
    else:
        state = json.loads(tokenizer.hf.to_str())
        model = state["model"]
        byte_level = (state.get("decoder") or {}).get("type") == "ByteLevel"
        if model.get("type") != "BPE" or not (byte_level or model.get("byte_fallback")):
            raise LmforgeError("GGUF export supports BPE tokenizers (byte-level or with byte fallback) and char ones")
        by_id = {index: token for token, index in model["vocab"].items()}
        added = {token["id"]: token for token in state.get("added_tokens", [])}
        by_id.update({index: token["content"] for index, token in added.items()})
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

        def token_type(index: int, token: str) -> int:
            if index in added:
                return CONTROL if added[index]["special"] else USER_DEFINED
            if not byte_level and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
                return BYTE
            return UNKNOWN if token == model.get("unk_token") else NORMAL

        types = [token_type(index, token) for index, token in enumerate(tokens)]
        if byte_level:
            writer.add_tokenizer_model("gpt2")
            writer.add_tokenizer_pre(_pre_tokenizer_name(state.get("pre_tokenizer")))
            writer.add_token_merges(merges)
        else:
            writer.add_tokenizer_model("llama")
            writer.add_add_space_prefix(_adds_space_prefix(state))
            writer.add_token_scores(_scores_from_merges(tokens, merges))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_add_bos_token(tokenizer.add_bos_token)
    writer.add_add_eos_token(tokenizer.add_eos_token)
    end_of_turn = tokenizer.end_of_turn_tokens[0] if tokenizer.end_of_turn_tokens else None
    for key, token in (
        ("bos", tokenizer.bos_token),
        ("eos", tokenizer.eos_token),
        ("pad", tokenizer.pad_token),
        ("eot", end_of_turn),
    ):
        index = tokenizer.token_to_id(token) if token else None
        if index is not None:
            getattr(writer, f"add_{key}_token_id")(index)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
