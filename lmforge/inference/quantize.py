"""Weight-only quantisation for CPU inference: int8 and group-wise int4 Linear layers.

The model stays a plain `Transformer`; `quantize_model` swaps its Linear layers (and a tied
embedding) for ones that keep int8 or packed int4 codes with float scales. Few-row inputs
(decoding) go through the native kernels in `lmforge.inference.kernels`, which dequantise in registers;
many-row inputs (prefill) dequantise the weight once and use PyTorch's matmul. The PyTorch
path is also the reference the kernels are tested against.

Formats (the GGUF block layouts Q8_0 / Q4_1 map onto them without requantising):
  int8: codes (N, K) int8, scale (N, K/G); w = scale * code, symmetric. G = K by default.
  int4: codes (N, K/2) uint8, scale and offset (N, K/G); w = scale * code + offset with
        code in 0..15 (min-max, like Q4_1). In each run of 32 weights the low nibbles of 16
        bytes hold weights 0-15 and the high nibbles weights 16-31.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from lmforge.inference import kernels
from lmforge.model import ModelConfig, Transformer, zeroed_from_os

# Above this many rows a dequantise + BLAS matmul runs instead of the matvec kernels. The kernels round
# x to int8 and were faster up to ~64 rows on a busy machine (SmolLM2 Q4 prefill on one thread, native
# against dequantise + BLAS: 16 rows 0.82 s / 1.96 s, 64 rows 2.6 / 3.0, 128 rows 3.1 / 2.9), but a
# prompt's tail after a cached prefix (serve's prefix cache) runs with rounded x where the whole prompt
# runs exact, and at 64 a second chat turn on SmolLM2 greedily parted from the uncached reply within 12
# tokens. At 16 only tails of up to 16 tokens do, as before the prefix cache.
NATIVE_MAX_ROWS = 16
# Prefill dequantises this many weights (4 MB of fp32, 2 of bf16) at a time: a whole layer would be
# ~250 MB of peak RSS for a 7B model's MLP. fp32 BLAS is as fast on 256K-weight slabs as on the whole
# matrix; bf16 matmuls (AMX) gain ~10% from 1M (SmolLM2 Q6_K 512-token prefill: 256K 1,064 ms, 1M
# 1,004, 4M 1,048, one thread).
PREFILL_SLAB_ELEMENTS = 1024 * 1024


# GGUF block types the kernels read as they are (kquants.c): name -> (ggml type id, weights per
# block, bytes per block), from ggml-common.h.
GGUF_BLOCK_TYPES = {
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
}


def block_row_bytes(type_name: str, columns: int) -> int:
    """Bytes of one row of `columns` weights in a GGUF block type."""
    _, weights, size = GGUF_BLOCK_TYPES[type_name]
    return columns // weights * size


def segment_table(segments: tuple[tuple[str, int], ...]) -> torch.Tensor:
    """(ggml type id, rows) per segment as the int64 (S, 2) table the kernels read."""
    return torch.tensor([[GGUF_BLOCK_TYPES[name][0], rows] for name, rows in segments], dtype=torch.int64)


def dequantize_blocks(blocks: torch.Tensor, segments: tuple[tuple[str, int], ...], columns: int) -> torch.Tensor:
    """A GGUF block matrix as fp32 through the gguf package (the reference; the kernels' path is
    `kernels.dequantize_blocks`)."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    parts, start = [], 0
    for name, rows in segments:
        size = rows * block_row_bytes(name, columns)
        data = blocks[start : start + size].numpy().reshape(rows, -1)
        parts.append(torch.from_numpy(np.array(dequantize(data, GGMLQuantizationType[name]), dtype=np.float32)))
        start += size
    return torch.cat(parts).reshape(-1, columns)


def quantize_int8(weight: torch.Tensor, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes and scales per group of `group_size` columns (default: per row)."""
    rows, columns = weight.shape
    group_size = group_size or columns
    groups = weight.float().reshape(rows, columns // group_size, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127
    codes = torch.round(groups / scale).clamp(-127, 127).to(torch.int8)
    return codes.reshape(rows, columns), scale.squeeze(-1)


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    group_size = codes.shape[1] // scale.shape[1]
    return (codes.float().reshape(*scale.shape, group_size) * scale.unsqueeze(-1)).reshape(codes.shape)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) codes in 0..15 → (N, K/2) bytes, 32-weight runs split low/high nibble (GGUF layout)."""
    rows, columns = codes.shape
    runs = codes.to(torch.uint8).reshape(rows, columns // 32, 2, 16)
    return (runs[:, :, 0] | (runs[:, :, 1] << 4)).reshape(rows, columns // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    rows = packed.shape[0]
    runs = packed.reshape(rows, -1, 16)
    return torch.stack([runs & 0x0F, runs >> 4], dim=2).reshape(rows, -1)


def quantize_int4(weight: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max 4-bit codes (packed), and fp16 scales and offsets per group of `group_size` columns.

    fp16, as GGUF's Q4 blocks store them: in fp32 they would be a third of an int4 model's
    memory at group 32. Codes are rounded against the fp16 values, the ones dequantisation uses.
    """
    rows, columns = weight.shape
    groups = weight.float().reshape(rows, columns // group_size, group_size)
    low, high = groups.amin(dim=-1, keepdim=True), groups.amax(dim=-1, keepdim=True)
    scale = ((high - low) / 15).clamp(min=1e-7).half()
    low = low.half()
    if not (torch.isfinite(scale).all() and torch.isfinite(low).all()):
        raise ValueError(f"weights up to {groups.abs().max().item():.3g} are out of fp16 range for int4 scales")
    codes = torch.round((groups - low.float()) / scale.float()).clamp(0, 15)
    return pack_int4(codes.reshape(rows, columns)), scale.squeeze(-1), low.squeeze(-1)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    codes = unpack_int4(packed).float()
    group_size = codes.shape[1] // scale.shape[1]
    grouped = codes.reshape(*scale.shape, group_size) * scale.float().unsqueeze(-1) + offset.float().unsqueeze(-1)
    return grouped.reshape(codes.shape)


@dataclass
class QuantizedTensor:
    """A weight matrix still in quantised form (e.g. read from GGUF blocks), before it becomes a layer.

    int8/int4: `codes`, `scale`, `offset` as the module docstring says. GGUF blocks (bits 0):
    `codes` is the rows' block bytes (1-D uint8), `segments` the (type name, rows) runs, `columns`
    the row width; `scale` and `offset` are None."""

    bits: int
    group_size: int
    codes: torch.Tensor
    scale: torch.Tensor | None
    offset: torch.Tensor | None = None
    segments: tuple[tuple[str, int], ...] | None = None
    columns: int = 0

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor, segments, columns: int) -> QuantizedTensor:
        """GGUF block bytes kept as they are; adjacent segments of one type merge."""
        merged: list[tuple[str, int]] = []
        for name, rows in segments:
            if merged and merged[-1][0] == name:
                merged[-1] = (name, merged[-1][1] + rows)
            elif rows:
                merged.append((name, rows))
        return cls(0, 32, blocks.reshape(-1), None, segments=tuple(merged), columns=columns)

    @property
    def shape(self) -> torch.Size:
        """(rows, columns) of the weight it holds; int4 packs two columns a byte."""
        if self.segments is not None:
            return torch.Size((sum(rows for _, rows in self.segments), self.columns))
        rows, width = self.codes.shape
        return torch.Size((rows, 2 * width if self.bits == 4 else width))

    def dequantize(self) -> torch.Tensor:
        """The fp32 weight, through the native kernels where they built (an export dequantises every layer)."""
        native = kernels.available() and self.codes.device.type == "cpu"
        if self.segments is not None:
            if native:
                table = segment_table(self.segments)
                return kernels.dequantize_blocks(self.codes.contiguous(), table, self.columns, slice(None))
            return dequantize_blocks(self.codes, self.segments, self.columns)
        codes, scale = self.codes.contiguous(), self.scale.contiguous()
        if self.bits == 8:
            return kernels.dequantize_q8(codes, scale, self.group_size) if native else dequantize_int8(codes, scale)
        if native:
            return kernels.dequantize_q4(codes, scale, self.offset.contiguous(), self.group_size)
        return dequantize_int4(codes, scale, self.offset)

    def _block_rows(self) -> list[tuple[str, torch.Tensor]]:
        """Each segment's type and its bytes as a (rows, row bytes) view."""
        views, start = [], 0
        for name, rows in self.segments:
            width = block_row_bytes(name, self.columns)
            views.append((name, self.codes[start : start + rows * width].view(rows, width)))
            start += rows * width
        return views

    def index_rows(self, order: torch.Tensor) -> QuantizedTensor:
        if self.segments is None:
            offset = None if self.offset is None else self.offset[order]
            room = zeroed_from_os((len(order), *self.codes.shape[1:]), "cpu", self.codes.dtype, huge_pages=True)
            codes = torch.index_select(self.codes, 0, order, out=room)
            return QuantizedTensor(self.bits, self.group_size, codes, self.scale[order], offset)
        views = self._block_rows()
        firsts = torch.tensor([0] + [rows for _, rows in self.segments]).cumsum(0)
        which = torch.searchsorted(firsts[1:], order, right=True).tolist()  # each wanted row's segment
        parts, segments, at = [], [], 0
        while at < len(order):  # runs of consecutive wanted rows from one segment
            end = at + 1
            while end < len(order) and which[end] == which[at]:
                end += 1
            name, view = views[which[at]]
            parts.append(view[order[at:end] - firsts[which[at]]].reshape(-1))
            segments.append((name, end - at))
            at = end
        return QuantizedTensor.from_blocks(_cat_from_os(parts), segments, self.columns)

    def as_blocks(self) -> QuantizedTensor | None:
        """The same weight in GGUF block form (int8 / int4 in 32-column groups are Q8_0 / Q4_1 blocks,
        unchanged), or None where it has no such form."""
        if self.segments is not None:
            return self
        if self.group_size != 32:
            return None
        rows, groups = self.scale.shape
        scale = self.scale.half().contiguous().view(torch.uint8).reshape(rows, groups, 2)
        if self.bits == 8:
            codes = self.codes.contiguous().view(torch.uint8).reshape(rows, groups, 32)
            blocks = torch.cat([scale, codes], dim=-1)
        else:
            offset = self.offset.half().contiguous().view(torch.uint8).reshape(rows, groups, 2)
            blocks = torch.cat([scale, offset, self.codes.reshape(rows, groups, 16)], dim=-1)
        return QuantizedTensor.from_blocks(blocks, [("Q8_0" if self.bits == 8 else "Q4_1", rows)], groups * 32)

    @staticmethod
    def cat(parts: list) -> QuantizedTensor | torch.Tensor:
        """Stack row blocks: in their own format where they share one, else as GGUF blocks where each has
        that form (q, k in Q5_0 with v in Q8_0, say), else as fp32."""
        first = parts[0]
        same = all(
            isinstance(p, QuantizedTensor)
            and p.segments is None
            and (p.bits, p.group_size) == (first.bits, first.group_size)
            for p in parts
        )
        if same:
            offset = None if first.offset is None else torch.cat([p.offset for p in parts])
            return QuantizedTensor(
                first.bits,
                first.group_size,
                _cat_from_os([p.codes for p in parts]),
                torch.cat([p.scale for p in parts]),
                offset,
            )
        blocks = [p.as_blocks() if isinstance(p, QuantizedTensor) else None for p in parts]
        if all(b is not None for b in blocks):
            segments = [segment for b in blocks for segment in b.segments]
            return QuantizedTensor.from_blocks(_cat_from_os([b.codes for b in blocks]), segments, first.shape[1])
        return torch.cat([p.dequantize() if isinstance(p, QuantizedTensor) else p for p in parts])


def _cat_from_os(parts: list[torch.Tensor]) -> torch.Tensor:
    """torch.cat into memory from the OS (`zeroed_from_os`): loading joins and reorders whole weight
    matrices, and glibc's heap would keep the parts' freed memory (+40 MB peak RSS for SmolLM2 Q6_K)."""
    shape = (sum(part.shape[0] for part in parts), *parts[0].shape[1:])
    return torch.cat(parts, out=zeroed_from_os(shape, parts[0].device, parts[0].dtype, huge_pages=True))


_scratch = threading.local()


@contextlib.contextmanager
def bf16_products():
    """Within it, quantised layers multiply many rows in bf16 where the CPU does that in hardware
    (`kernels.bf16_matmul_is_fast`): the engine's prefill for generation. Everything else (evaluation,
    scoring, training, the LM head) keeps fp32 products, exact to the dequantised weights."""
    before = getattr(_scratch, "bf16_products", False)
    _scratch.bf16_products = True
    try:
        yield
    finally:
        _scratch.bf16_products = before


def _dequantization_buffer(size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """This thread's buffer of `dtype` for a slab of dequantised weight rows, grown to the largest slab seen."""
    name = f"buffer_{dtype}"
    buffer = getattr(_scratch, name, None)
    if buffer is None or buffer.numel() < size:
        buffer = torch.empty(size, dtype=dtype)
        setattr(_scratch, name, buffer)
    return buffer[:size]


class QuantizedLinear(nn.Module):
    """y = x W^T + b with W held as int8 or packed int4 codes and float scales, or as GGUF blocks
    (bits 0, `segments` given: see the module docstring)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        segments: tuple[tuple[str, int], ...] | None = None,
    ):
        super().__init__()
        if segments is not None:
            self._init_blocks(in_features, out_features, segments, bias)
            return
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        if in_features % group_size or group_size % 32:
            raise ValueError(
                f"group size {group_size} must divide the {in_features} input features and be a multiple of 32"
            )
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        self.segments = None
        # Decode kernels round x to int8 (fast, ~0.5% error) unless exact: set for the LM head,
        # whose logits pick tokens directly and where that error flips greedy near-ties.
        self.exact_activations = False
        # Under torch.compile the kernels' availability must be a plain attribute (a constant to
        # the compiler); `engine.compiled_decode_step` sets it.
        self.native_when_compiled = False
        groups = in_features // group_size
        # Placeholders that loading or `set_weight` always replaces; empty (never written) means they
        # take no resident memory meanwhile: ~100 MB of peak RSS for a 135M model.
        if bits == 8:
            self.register_buffer("codes", torch.empty(out_features, in_features, dtype=torch.int8))
        else:
            self.register_buffer("codes", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
            self.register_buffer("offset", torch.empty(out_features, groups, dtype=torch.float16))
        self.register_buffer("scale", torch.empty(out_features, groups, dtype=torch.float16 if bits == 4 else None))
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def _init_blocks(self, in_features: int, out_features: int, segments, bias: bool) -> None:
        segments = tuple((str(name), int(rows)) for name, rows in segments)
        for name, _ in segments:
            if name not in GGUF_BLOCK_TYPES:
                raise ValueError(f"GGUF type {name} is not one the kernels read (they read {sorted(GGUF_BLOCK_TYPES)})")
            if in_features % GGUF_BLOCK_TYPES[name][1]:
                raise ValueError(f"{name} rows of {in_features} weights are not whole blocks")
        if sum(rows for _, rows in segments) != out_features:
            raise ValueError(f"GGUF segments hold {sum(r for _, r in segments)} rows, not {out_features}")
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, 0, 32
        self.segments = segments
        self.exact_activations = False  # the block kernel always rounds x to int8, as llama.cpp does
        self.native_when_compiled = False
        total = sum(rows * block_row_bytes(name, in_features) for name, rows in segments)
        self.register_buffer("codes", torch.empty(total, dtype=torch.uint8))
        # the kernels' view of `segments`; rebuilt from the layout, so not saved
        self.register_buffer("segment_table", segment_table(segments), persistent=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None

    def weight_tensor(self) -> QuantizedTensor:
        """The weight as a QuantizedTensor (sharing this layer's codes)."""
        if self.segments is not None:
            return QuantizedTensor.from_blocks(self.codes, self.segments, self.in_features)
        offset = self.offset if self.bits == 4 else None
        return QuantizedTensor(self.bits, self.group_size, self.codes, self.scale, offset)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None) -> QuantizedLinear:
        in_features = linear.in_features
        group_size = group_size or default_group_size(in_features, bits)
        layer = cls(in_features, linear.out_features, bits, group_size, linear.bias is not None)
        layer.set_weight(linear.weight.detach())
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def set_weight(self, weight: torch.Tensor) -> None:
        if self.segments is not None:
            raise ValueError("GGUF block layers are read from files; lmforge does not quantise into K-quants")
        if self.bits == 8:
            self.codes, self.scale = quantize_int8(weight, self.group_size)
        else:
            self.codes, self.scale, self.offset = quantize_int4(weight, self.group_size)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # int4 checkpoints written before scales moved to fp16 hold fp32 ones; the kernels read fp16
        for name in ("scale", "offset"):
            value = state_dict.get(prefix + name)
            if value is not None and value.dtype != getattr(self, name).dtype:
                state_dict[prefix + name] = value.to(getattr(self, name).dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def dequantize(self, out: torch.Tensor | None = None, rows: slice = slice(None)) -> torch.Tensor:
        """The fp32 weight, or its `rows`; with the native kernels, written into `out` if given."""
        native = kernels.available() and not torch.compiler.is_compiling()
        if self.segments is not None:
            if native:
                return kernels.dequantize_blocks(self.codes, self.segment_table, self.in_features, rows, out)
            return dequantize_blocks(self.codes, self.segments, self.in_features)[rows]
        codes, scale = self.codes[rows], self.scale[rows]
        if self.bits == 8:
            if native:
                return kernels.dequantize_q8(codes, scale, self.group_size, out)
            return dequantize_int8(codes, scale)
        if native:
            return kernels.dequantize_q4(codes, scale, self.offset[rows], self.group_size, out)
        return dequantize_int4(codes, scale, self.offset[rows])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        compiling = torch.compiler.is_compiling()
        # under compile: the operators `engine.compiled_decode_step` registered (torch.ops.lmforge.*)
        native = self.native_when_compiled if compiling else kernels.available()
        if x.dtype == torch.float32 and not x.requires_grad and native and flat.shape[0] <= NATIVE_MAX_ROWS:
            flat = flat.contiguous()
            if self.segments is not None:
                matvec = torch.ops.lmforge.matvec_blocks if compiling else kernels.matvec_blocks
                out = matvec(flat, self.codes, self.segment_table, self.out_features, self.bias)
            elif self.bits == 8 and self.exact_activations:
                matvec = torch.ops.lmforge.matvec_q8_exact if compiling else kernels.matvec_q8_exact
                out = matvec(flat, self.codes, self.scale, self.group_size, self.bias)
            elif self.bits == 8:
                matvec = torch.ops.lmforge.matvec_q8 if compiling else kernels.matvec_q8
                out = matvec(flat, self.codes, self.scale, self.group_size, self.bias)
            else:
                matvec = torch.ops.lmforge.matvec_q4 if compiling else kernels.matvec_q4
                out = matvec(flat, self.codes, self.scale, self.offset, self.group_size, self.bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        if x.dtype == torch.float32 and not torch.is_grad_enabled() and native and not compiling:
            return self._prefill_product(flat).reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.dequantize().to(x.dtype), self.bias)

    def _prefill_product(self, flat: torch.Tensor) -> torch.Tensor:
        """flat (rows, in) times the weight for many rows (prefill): a slab of weight rows at a time is
        dequantised into one shared buffer and multiplied straight into its columns of the output. A fresh
        weight-sized allocation per layer would leave glibc's heap ~25 MB bigger after a long prompt.

        Inside `bf16_products` on a CPU that multiplies bf16 in hardware, x and the slabs go to bf16 and so
        do the products: 2^-9 relative rounding of x and ~2^-8 of each output, the order of llama.cpp's
        own int8 rounding of x, for a prefill 2.4x faster (SmolLM2 Q6_K, 512 tokens, one thread: fp32
        1,913 ms, bf16 812 ms on a Xeon with AMX). Not for the LM head (`exact_activations`): its
        logits pick tokens directly."""
        bf16 = (
            getattr(_scratch, "bf16_products", False) and not self.exact_activations and kernels.bf16_matmul_is_fast()
        )
        matmul_dtype = torch.bfloat16 if bf16 else torch.float32
        source = flat.to(matmul_dtype)
        out = flat.new_empty(flat.shape[0], self.out_features, dtype=matmul_dtype)
        slab = max(1, min(self.out_features, PREFILL_SLAB_ELEMENTS // self.in_features))
        buffer = _dequantization_buffer(slab * self.in_features, matmul_dtype)
        for first in range(0, self.out_features, slab):
            rows = slice(first, min(first + slab, self.out_features))
            weight = self.dequantize(buffer[: (rows.stop - first) * self.in_features].view(-1, self.in_features), rows)
            if self.bias is None or bf16:
                torch.mm(source, weight.T, out=out[:, rows])
            else:
                torch.addmm(self.bias[rows], source, weight.T, out=out[:, rows])
        if not bf16:
            return out
        out = out.float()
        return out if self.bias is None else out.add_(self.bias)

    def extra_repr(self) -> str:
        if self.segments is not None:
            return f"in={self.in_features}, out={self.out_features}, gguf={list(self.segments)}"
        return f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}"


class QuantizedEmbedding(nn.Module):
    """Token lookup that dequantises only the rows it needs, from the LM head it is tied to."""

    def __init__(self, head: QuantizedLinear):
        super().__init__()
        self.head = [head]  # a list, so the tied codes are not registered (and saved) twice

    @property
    def weight(self) -> torch.Tensor:  # the full table, for code that reads the embedding matrix
        return self.head[0].dequantize()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        head = self.head[0]
        flat = tokens.reshape(-1)
        if head.segments is not None:
            rows = head.weight_tensor().index_rows(flat).dequantize()
            return rows.reshape(*tokens.shape, head.in_features)
        scale = head.scale[flat]
        if head.bits == 8:
            rows = dequantize_int8(head.codes[flat], scale)
        else:
            rows = dequantize_int4(head.codes[flat], scale, head.offset[flat])
        return rows.reshape(*tokens.shape, head.in_features)


class FastLinear(nn.Linear):
    """An fp32 Linear whose few-row, no-grad products (decoding) use the native matvec kernel.

    A subclass, swapped in by changing the class of an existing nn.Linear: weights, state-dict
    names and training behaviour stay exactly those of nn.Linear.
    """

    native_when_compiled = False  # as on QuantizedLinear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        compiling = torch.compiler.is_compiling()
        if (
            x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.is_grad_enabled()
            and flat.shape[0] <= NATIVE_MAX_ROWS
            and x.device.type == "cpu"
            and (self.native_when_compiled if compiling else kernels.available())
        ):
            bias = None if self.bias is None else self.bias.detach()
            matvec = torch.ops.lmforge.matvec_f32 if compiling else kernels.matvec_f32
            out = matvec(flat.contiguous(), self.weight.detach(), bias)
            return out.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, self.bias)


def use_native_kernels(model: nn.Module) -> nn.Module:
    """Let every fp32 Linear of `model` decode through the native kernel (in place; nothing else changes)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
    return model


def _linear_layers(model: Transformer) -> list[tuple[nn.Module, str, nn.Linear, str]]:
    """(parent, attribute name, layer, full dotted name) of every Linear."""
    return [
        (parent, name, child, f"{parent_name}.{name}".lstrip("."))
        for parent_name, parent in model.named_modules()
        for name, child in parent.named_children()
        if isinstance(child, nn.Linear)
    ]


def quantize_model(
    model: Transformer,
    bits: int,
    group_size: int | None = None,
    head_bits: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Transformer:
    """Swap every Linear (LM head included) for a QuantizedLinear, in place; a tied embedding
    then reads from the quantised head. Layers left in fp32 (all of them with bits=32) use
    the native fp32 decode kernel.

    The LM head gets `head_bits` (default: 8 when bits=4, as llama.cpp keeps its output
    matrix at higher precision; at 4 bits it alone adds most of the KL). Groups are multiples
    of 32 columns. A layer whose input width the group size does not divide gets one group
    per row (int8, width a multiple of 32) or stays fp32, so any model can be quantised.
    `progress(done, total)` counts the layers done.
    """
    if bits not in (4, 8, 32):
        raise ValueError(f"bits must be 4, 8 or 32, not {bits}")
    head_bits = head_bits or (8 if bits == 4 else bits)
    layers = _linear_layers(model)
    for done, (parent, name, linear, full_name) in enumerate(layers):
        if progress:
            progress(done, len(layers))
        layer_bits = head_bits if full_name == "lm_head" else bits
        if layer_bits == 32:
            continue
        size = (group_size if layer_bits == bits else None) or default_group_size(linear.in_features, layer_bits)
        if linear.in_features % size or size % 32:
            if layer_bits == 4 or linear.in_features % 32:
                continue  # stays fp32
            size = linear.in_features
        setattr(parent, name, QuantizedLinear.from_linear(linear, layer_bits, size))
    if progress:
        progress(len(layers), len(layers))
    return _wire_head(model)


def _wire_head(model: Transformer) -> Transformer:
    """A quantised LM head keeps exact activations and feeds a tied embedding; fp32 layers get the native kernel."""
    if isinstance(model.lm_head, QuantizedLinear):
        model.lm_head.exact_activations = True
        if model.config.tie_embeddings:
            model.token_embedding = QuantizedEmbedding(model.lm_head)
    return use_native_kernels(model)


def default_group_size(in_features: int, bits: int) -> int:
    """int8: one scale per row; int4: 32 columns (GGUF's block size: a Q4 GGUF re-quantises losslessly)."""
    return in_features if bits == 8 else 32


def quantized_layout(model: Transformer) -> dict[str, dict]:
    """Per-layer bits and group size, saved with a checkpoint so it can be rebuilt before loading."""
    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            layout[name] = {"bits": module.bits, "group_size": module.group_size}
            if module.segments is not None:
                layout[name]["segments"] = [list(segment) for segment in module.segments]
    return layout


def apply_layout(model: Transformer, layout: dict[str, dict]) -> Transformer:
    """Give `model` empty quantised layers in the places `layout` names (for loading saved codes)."""
    for parent, name, linear, full_name in _linear_layers(model):
        spec = layout.get(full_name)
        if spec is None:
            continue
        layer = QuantizedLinear(
            linear.in_features,
            linear.out_features,
            spec["bits"],
            spec["group_size"],
            linear.bias is not None,
            spec.get("segments"),
        )
        setattr(parent, name, layer)
    return _wire_head(model)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of parameters and buffers, each tensor counted once."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def model_from_weights(config: ModelConfig, weights: dict[str, torch.Tensor | QuantizedTensor]) -> Transformer:
    """A model whose Linear layers stay quantised wherever `weights` hold a QuantizedTensor
    (a tied embedding in quantised form becomes the quantised LM head it shares)."""
    weights = dict(weights)
    embedding = weights.get("token_embedding.weight")
    if config.tie_embeddings and isinstance(embedding, QuantizedTensor):
        weights["lm_head.weight"] = weights.pop("token_embedding.weight")
    layout, state = {}, {}
    for name, value in weights.items():
        if not isinstance(value, QuantizedTensor):
            state[name] = value
            continue
        module = name.removesuffix(".weight")
        layout[module] = {"bits": value.bits, "group_size": value.group_size}
        if value.segments is not None:
            layout[module]["segments"] = value.segments
            state[f"{module}.codes"] = value.codes
            continue
        state[f"{module}.codes"], state[f"{module}.scale"] = value.codes, value.scale
        if value.offset is not None:
            state[f"{module}.offset"] = value.offset
    return Transformer.from_state_dict(config, state, prepare=lambda model: apply_layout(model, layout))


def model_weights(model: Transformer) -> dict[str, torch.Tensor | QuantizedTensor]:
    """The inverse of `model_from_weights`: our state dict with each quantised layer's weight as a
    QuantizedTensor under `<layer>.weight` (a quantised tied embedding: its LM head's), for exporters."""
    quantized = {name: module for name, module in model.named_modules() if isinstance(module, QuantizedLinear)}
    weights = {}
    for name, value in model.state_dict().items():
        layer, _, field = name.rpartition(".")
        if layer not in quantized:
            weights[name] = value
        elif field == "bias":
            weights[name] = value.detach()
        elif field == "codes":
            weights[f"{layer}.weight"] = quantized[layer].weight_tensor()
    if isinstance(model.token_embedding, QuantizedEmbedding):
        weights["token_embedding.weight"] = weights["lm_head.weight"]
    return weights


def as_float(weight: torch.Tensor | QuantizedTensor) -> torch.Tensor:
    """A weight in fp32, dequantised if it is quantised."""
    return weight.dequantize() if isinstance(weight, QuantizedTensor) else weight.detach().float()
