"""GGUF (llama.cpp's format): read `llama` and `gpt2` models into our Transformer, write them back.

The header is parsed here (`GGUFFile`, fast on large vocabularies); dequantisation and writing
use the `gguf` package from the llama.cpp project. llama.cpp's converter permutes the rows of
Q and K for its RoPE layout; we undo that on read and redo it on write, so weights stay in the
HF (half-split) layout our model uses.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmforge.errors import LmforgeError
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
from lmforge.model import ModelConfig, Transformer, zeroed_from_os
from lmforge.tokenizer import BPETokenizer, CharTokenizer, Tokenizer

# llama.cpp token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# How `tokenizer.ggml.pre` splits text before byte-level BPE (llama.cpp's llama-vocab.cpp).
GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "default": [GPT2_SPLIT],
    "gpt-2": [GPT2_SPLIT],
    "gpt2": [GPT2_SPLIT],
    "smollm": [r"\p{N}", GPT2_SPLIT],  # digits one by one, then GPT-2's rule
    "llama3": [LLAMA3_SPLIT],
    "llama-bpe": [LLAMA3_SPLIT],
    "smaug-bpe": [LLAMA3_SPLIT],
    "qwen2": [QWEN2_SPLIT],
    "deepseek-r1-qwen": [QWEN2_SPLIT],
}


VALUE_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
STRING, ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # GGUF order: fastest-varying dimension first
    tensor_type: object  # gguf.GGMLQuantizationType
    data: np.ndarray  # float32/float16 values, or rows of raw block bytes for quantised types


class GGUFFile:
    """A GGUF file's metadata and tensors (memory-mapped).

    Our own parser of the header: the `gguf` package's reader builds a numpy view per
    vocabulary entry and takes ~5 s on a 49k-token vocabulary; this takes ~0.1 s.
    """

    def __init__(self, path: Path):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        raw = np.memmap(path, dtype=np.uint8, mode="r")
        self._raw = raw
        self._buffer = memoryview(raw)
        self._offset = 0
        if bytes(self._buffer[:4]) != b"GGUF":
            raise ValueError("bad magic bytes (not a GGUF file)")
        self._offset = 4
        version, tensor_count, field_count = self._read("<I"), self._read("<Q"), self._read("<Q")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported")
        self.fields = {}
        for _ in range(field_count):
            key = self._read_string()
            self.fields[key] = self._read_value(self._read("<I"))
        infos = []
        for _ in range(tensor_count):
            name = self._read_string()
            dims = tuple(self._read("<Q") for _ in range(self._read("<I")))
            infos.append((name, dims, GGMLQuantizationType(self._read("<I")), self._read("<Q")))
        alignment = int(self.fields.get("general.alignment", 32))
        data_start = -(-self._offset // alignment) * alignment
        self.tensors = []
        for name, dims, tensor_type, offset in infos:
            block, block_bytes = GGML_QUANT_SIZES[tensor_type]
            elements = int(np.prod(dims))
            start = data_start + offset
            size = elements // block * block_bytes
            if start + size > len(raw):
                raise ValueError(f"tensor {name} ends past the end of the file")
            if tensor_type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                dtype = np.float32 if tensor_type == GGMLQuantizationType.F32 else np.float16
                data = raw[start : start + size].view(dtype).reshape(tuple(reversed(dims)))
            else:
                data = raw[start : start + size].reshape(*reversed(dims[1:]), dims[0] // block * block_bytes)
            self.tensors.append(GGUFTensor(name, dims, tensor_type, data))

    def release(self, tensor: GGUFTensor) -> None:
        """Drop a tensor's pages from this process's resident memory once it has been copied out; the
        file still backs them, so reading the tensor again stays correct. Loading then peaks at about
        the model's size instead of the model plus the whole file."""
        mapping = getattr(self._raw, "_mmap", None)
        if mapping is None or not hasattr(mmap, "MADV_DONTNEED") or tensor.data.nbytes == 0:
            return
        start = tensor.data.ctypes.data - self._raw.ctypes.data
        begin = start // mmap.PAGESIZE * mmap.PAGESIZE
        mapping.madvise(mmap.MADV_DONTNEED, begin, start + tensor.data.nbytes - begin)

    def _read(self, fmt: str):
        (value,) = struct.unpack_from(fmt, self._buffer, self._offset)
        self._offset += struct.calcsize(fmt)
        return value

    def _read_string(self) -> str:
        length = self._read("<Q")
        text = bytes(self._buffer[self._offset : self._offset + length]).decode("utf-8", errors="replace")
        self._offset += length
        return text

    def _read_value(self, value_type: int):
        if value_type == STRING:
            return self._read_string()
        if value_type == ARRAY:
            item_type, count = self._read("<I"), self._read("<Q")
            if item_type in VALUE_FORMATS:
                fmt = VALUE_FORMATS[item_type]
                values = list(struct.unpack_from(f"<{count}{fmt[1]}", self._buffer, self._offset))
                self._offset += count * struct.calcsize(fmt)
                return values
            return [self._read_value(item_type) for _ in range(count)]
        if value_type not in VALUE_FORMATS:
            raise ValueError(f"unknown metadata value type {value_type}")
        return self._read(VALUE_FORMATS[value_type])


# (ours, llama.cpp's) layer names that carry a bias in the GPT-2 family.
GPT2_BIASES = [
    ("attention_norm", "attn_norm"),
    ("mlp_norm", "ffn_norm"),
    ("attention.qkv", "attn_qkv"),
    ("attention.out", "attn_output"),
    ("mlp.up", "ffn_up"),
    ("mlp.down", "ffn_down"),
]


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
    )
    return {ours: f"{architecture}.{theirs}" for ours, theirs in keys.items()}


def read_config(reader, path: Path) -> ModelConfig:
    """Our config from the GGUF metadata, every field checked (type, range, divisibility) before use."""
    architecture = reader.fields.get("general.architecture")
    if architecture not in ("llama", "gpt2"):
        raise LmforgeError(f"{path}: GGUF architecture {architecture!r} is not supported (supported: llama, gpt2)")
    fields, names = reader.fields, size_keys(architecture)
    key = lambda name: f"{architecture}.{name}"  # noqa: E731
    tokens = fields.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(token, str) for token in tokens):
        raise LmforgeError(f"{path}: tokenizer.ggml.tokens is missing or not a list of strings")
    sizes = {
        ours: integer(fields, theirs, path)
        for ours, theirs in names.items()
        if ours not in ("vocab_size", "n_kv_heads")
    }
    sizes["vocab_size"] = integer(fields, names["vocab_size"], path, default=len(tokens))
    common = dict(**sizes, tie_embeddings="output.weight" not in {t.name for t in reader.tensors})
    if architecture == "llama":
        return model_config(
            path,
            names,
            **common,
            n_kv_heads=integer(fields, names["n_kv_heads"], path, default=sizes["n_heads"]),
            norm="rmsnorm",
            mlp="swiglu",
            positions="rope",
            bias=False,
            rope_theta=positive_number(fields, key("rope.freq_base"), path, 10000.0),
            norm_eps=positive_number(fields, key("attention.layer_norm_rms_epsilon"), path, 1e-5),
        )
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
        out = zeroed_from_os(array.shape, "cpu", torch.uint8)
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
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        weights[ours + "attention_norm.weight"] = take(theirs + "attn_norm.weight")
        weights[ours + "mlp_norm.weight"] = take(theirs + "ffn_norm.weight")
        weights[ours + "attention.out.weight"] = take(theirs + "attn_output.weight")
        weights[ours + "mlp.down.weight"] = take(theirs + "ffn_down.weight")
        if config.positions == "rope":
            q = _unpermute_rope(take(theirs + "attn_q.weight"), config.n_heads)
            k = _unpermute_rope(take(theirs + "attn_k.weight"), config.kv_heads)
            weights[ours + "attention.qkv.weight"] = _cat([q, k, take(theirs + "attn_v.weight")])
            weights[ours + "mlp.up.weight"] = _cat([take(theirs + "ffn_gate.weight"), take(theirs + "ffn_up.weight")])
        else:
            weights[ours + "attention.qkv.weight"] = take(theirs + "attn_qkv.weight")
            weights[ours + "mlp.up.weight"] = take(theirs + "ffn_up.weight")
        if config.bias:
            for ours_name, theirs_name in GPT2_BIASES:
                weights[f"{ours}{ours_name}.bias"] = take(f"{theirs}{theirs_name}.bias")
    return weights


def read_tokenizer(reader, path: Path) -> Tokenizer:
    """Tokenizer from the GGUF vocabulary: byte-level BPE (`gpt2`) or SentencePiece-style (`llama`)."""
    from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    kind = reader.fields.get("tokenizer.ggml.model")
    tokens = list(reader.fields["tokenizer.ggml.tokens"])  # read_config checked it: a list of strings
    token_types = reader.fields.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
    scores = reader.fields.get("tokenizer.ggml.scores", [0.0] * len(tokens))
    merge_list = reader.fields.get("tokenizer.ggml.merges", [])
    for name, values in (("token_type", token_types), ("scores", scores)):
        if not isinstance(values, list) or len(values) != len(tokens):
            raise LmforgeError(f"{path}: tokenizer.ggml.{name} should hold one value per token ({len(tokens)})")
    if not isinstance(merge_list, list) or not all(isinstance(m, str) and " " in m for m in merge_list):
        raise LmforgeError(f"{path}: tokenizer.ggml.merges should be a list of 'left right' strings")
    vocab = {token: index for index, token in enumerate(tokens)}
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in merge_list]
        hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=False))
        pre = reader.fields.get("tokenizer.ggml.pre", "default")
        splits = PRE_TOKENIZER_SPLITS.get(pre, [GPT2_SPLIT])
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        hf.decoder = decoders.ByteLevel()
    elif kind == "llama":
        add_prefix = bool(reader.fields.get("tokenizer.ggml.add_space_prefix", True))
        hf = HFTokenizer(
            models.BPE(
                vocab=vocab,
                merges=_merges_from_scores(tokens, scores, token_types),
                byte_fallback=True,
                unk_token=tokens[0] if token_types[0] == UNKNOWN else None,
            )
        )
        hf.normalizer = normalizers.Sequence(
            ([normalizers.Prepend("▁")] if add_prefix else []) + [normalizers.Replace(" ", "▁")]
        )
        hf.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
            + ([decoders.Strip(" ", 1, 0)] if add_prefix else [])
        )
    else:
        raise LmforgeError(f"{path}: tokenizer model {kind!r} is not supported (supported: gpt2, llama)")
    specials = [t for t, kind_id in zip(tokens, token_types) if kind_id == CONTROL]
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    tokenizer = BPETokenizer(hf, specials)

    def token_at(key: str) -> str | None:
        index = reader.fields.get(key)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    tokenizer.bos_token = token_at("tokenizer.ggml.bos_token_id")
    tokenizer.eos_token = token_at("tokenizer.ggml.eos_token_id")
    tokenizer.pad_token = token_at("tokenizer.ggml.padding_token_id")
    tokenizer.chat_template = reader.fields.get("tokenizer.chat_template")
    return tokenizer


def _merges_from_scores(tokens: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary: every split of a piece into two pieces,
    ranked by the merged piece's score (higher first)."""
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
    check_dimensions(config, weights, path, size_keys(config.family))
    try:
        model = model_from_weights(config, weights)
    except ValueError as error:
        raise LmforgeError(f"{path}: {error}") from None
    return model.eval(), read_tokenizer(reader, path)


def save_gguf(model: Transformer, tokenizer: Tokenizer, path: str | Path, dtype: str = "f16") -> Path:
    """Write `model` and its tokenizer as GGUF; dtype is f32, f16, q8_0 or q4_1 (norms and biases stay f32).

    A quantised model's layers are dequantised for f32/f16. For q8_0 and q4_1, int8/int4 layers in
    32-column groups are written as their own blocks (Q8_0 / Q4_1, unchanged); with q4_1, layers the
    model keeps at 8 bits (the LM head after `lmforge quantize --bits 4`) stay 8-bit, as Q8_0.
    """
    from gguf import GGMLQuantizationType, GGUFWriter, LlamaFileType

    config = model.config
    try:
        architecture = config.require_family("GGUF export")
    except ValueError as error:
        raise LmforgeError(str(error)) from None
    llama_like, gpt2_like = architecture == "llama", architecture == "gpt2"
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
    if llama_like:
        writer.add_head_count_kv(config.kv_heads)
        writer.add_rope_freq_base(config.rope_theta)
        writer.add_rope_dimension_count(config.head_dim)
        writer.add_layer_norm_rms_eps(config.norm_eps)
        writer.add_vocab_size(config.vocab_size)
    else:
        writer.add_layer_norm_eps(config.norm_eps)
    _write_tokenizer(writer, tokenizer, config.vocab_size)

    def add(name: str, weight: torch.Tensor | QuantizedTensor) -> None:
        data, raw_dtype = _gguf_tensor(weight, matrix_type)
        writer.add_tensor(name, data, raw_dtype=raw_dtype)

    state = model_weights(model)
    keeps_blocks = matrix_type in (GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_1)

    def fused(name: str) -> torch.Tensor | QuantizedTensor:
        """A matrix to split (q/k/v, gate/up): dequantised whole first unless its blocks may be kept."""
        return state[name] if keeps_blocks else as_float(state[name])

    add("token_embd.weight", state["token_embedding.weight"])
    if gpt2_like:
        add("position_embd.weight", state["position_embedding.weight"])
    for i in range(config.n_layers):
        ours, theirs = f"blocks.{i}.", f"blk.{i}."
        add(theirs + "attn_norm.weight", state[ours + "attention_norm.weight"])
        qkv = fused(ours + "attention.qkv.weight")
        if llama_like:
            kv_rows = config.kv_heads * config.head_dim
            q, k, v = _split_rows(qkv, [config.n_heads * config.head_dim, kv_rows, kv_rows])
            add(theirs + "attn_q.weight", _permute_rope(q, config.n_heads))
            add(theirs + "attn_k.weight", _permute_rope(k, config.kv_heads))
            add(theirs + "attn_v.weight", v)
            gate, up = _split_rows(fused(ours + "mlp.up.weight"), [config.mlp_hidden, config.mlp_hidden])
            add(theirs + "ffn_gate.weight", gate)
            add(theirs + "ffn_up.weight", up)
        else:
            add(theirs + "attn_qkv.weight", qkv)
            add(theirs + "ffn_up.weight", state[ours + "mlp.up.weight"])
        add(theirs + "attn_output.weight", state[ours + "attention.out.weight"])
        add(theirs + "ffn_norm.weight", state[ours + "mlp_norm.weight"])
        add(theirs + "ffn_down.weight", state[ours + "mlp.down.weight"])
        if gpt2_like:
            for ours_name, theirs_name in GPT2_BIASES:
                add(f"{theirs}{theirs_name}.bias", state[f"{ours}{ours_name}.bias"])
    add("output_norm.weight", state["final_norm.weight"])
    if gpt2_like:
        add("output_norm.bias", state["final_norm.bias"])
    if not config.tie_embeddings:
        add("output.weight", state["lm_head.weight"])

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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


def _write_tokenizer(writer, tokenizer: Tokenizer, vocab_size: int) -> None:
    """Byte-level BPE as llama.cpp's `gpt2` model; char tokenizers as its `llama` (SentencePiece-style)
    model with byte-fallback tokens, which tokenizes one character at a time since it has no merges."""
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
        if model.get("type") != "BPE" or state.get("decoder", {}).get("type") != "ByteLevel":
            raise LmforgeError("GGUF export supports byte-level BPE and char tokenizers only")
        by_id = {index: token for token, index in model["vocab"].items()}
        for added in state.get("added_tokens", []):
            by_id[added["id"]] = added["content"]
        tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
        special = set(tokenizer.special_tokens)
        types = [CONTROL if t in special else NORMAL for t in tokens]
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_merges(merges)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_add_bos_token(False)
    for key, token in (("bos", tokenizer.bos_token), ("eos", tokenizer.eos_token), ("pad", tokenizer.pad_token)):
        index = tokenizer.token_to_id(token) if token else None
        if index is not None:
            getattr(writer, f"add_{key}_token_id")(index)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)
