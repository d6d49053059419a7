"""Full definition of the lmforge decoder-only Transformer, in one file.

Reads top to bottom like the diagram: norms, rotary positions, attention with its KV cache,
MLP, block, and the model. GPT-2, Llama, Mistral, Qwen2/3, Gemma 3 and Phi-3 are switches on one
config (norm, mlp, positions, n_kv_heads, q/k norms, sliding windows...), not subclasses; that
config (`ModelConfig`) and its presets are in `lmforge/settings.py`.
"""

from __future__ import annotations

import math
import mmap
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# The config and its presets are in lmforge.settings, free of torch (for --help); importable from here too.
from lmforge.settings import PRESETS, ModelConfig, preset  # noqa: F401

# SDPA takes grouped-query k/v as they are from torch 2.5 (enable_gqa); before, they are repeated per query head.
SDPA_GROUPS_HEADS = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Zhang & Sennrich 2019): no mean subtraction, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.d_model, config.norm_eps)
    return nn.LayerNorm(config.d_model, eps=config.norm_eps, bias=config.bias)


# Positions a model's RoPE tables start with; they double when a sequence needs more (up to block_size).
# Tables for a file's whole declared context would cost 8 * head_dim bytes per position whatever the
# request: 4 MB for SmolLM2's 8k; for a (hostile) context_length of 4e9, 32 GB in the first temporary.
ROPE_INITIAL_POSITIONS = 4096


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim / 2,) and the factor cos/sin are multiplied by, as transformers'
    modeling_rope_utils computes them for each `rope_scaling` kind (ModelConfig.rope_scaling)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    kind = (scaling or {}).get("rope_type")
    if kind is None:
        return inv_freq, 1.0
    if kind == "factors":  # GGUF's rope_freqs (llama.cpp's freq_factors): one divisor per frequency
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float64), 1.0
    factor = float(scaling["factor"])
    if kind == "linear":  # positions interpolated by 1/factor (kaiokendev's SuperHOT)
        return inv_freq / factor, 1.0
    original = float(scaling["original_max_position_embeddings"])
    if kind == "llama3":  # Llama 3.1: long wavelengths divided by factor, short kept, a smooth ramp between
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        wavelength = 2 * math.pi / inv_freq
        smooth = ((original / wavelength - low) / (high - low)).clamp(0, 1)
        return (1 - smooth) * inv_freq / factor + smooth * inv_freq, 1.0

    # YaRN (Peng et al. 2023): interpolated below a band of dimensions, extrapolated above, a linear
    # ramp between; cos and sin scaled by 0.1 ln(factor) + 1 ("mscale") unless the config names it.
    def correction_dim(rotations: float) -> float:
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = (
        correction_dim(float(scaling.get("beta_fast") or 32)),
        correction_dim(float(scaling.get("beta_slow") or 1)),
    )
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / ((high - low) or 0.001)).clamp(0, 1)
    inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

    def mscale(scale: float, weight: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * weight * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        weights = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, weights[0]) / mscale(factor, weights[1]) if all(weights) else mscale(factor)
    return inv_freq, float(attention_factor)


def rope_tables(
    head_dim: int, max_positions: int, theta: float, scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (max_positions, head_dim), in the half-split layout HF Llama uses."""
    inv_freq, attention_factor = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + head_dim/2) of x (B, H, T, head_dim) by their position's angle."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def document_positions_and_mask(document_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (B, T) restarting at 0 where the document id changes, and the (B, 1, T, T) attention
    mask that is causal within each document and closed between documents."""
    batch, length = document_ids.shape
    index = torch.arange(length, device=document_ids.device).expand(batch, length)
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    first_of_document = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    causal = torch.ones(length, length, dtype=torch.bool, device=document_ids.device).tril()
    same_document = document_ids[:, :, None] == document_ids[:, None, :]
    return index - first_of_document, (same_document & causal)[:, None]


def visible_keys(query_positions: torch.Tensor, key_count: int, window: int | None) -> torch.Tensor:
    """True where the query at a position sees the key at position j < key_count: j <= position, and
    with a sliding window also position - window < j (HF's rule). Shape: query_positions' + (key_count,)."""
    keys = torch.arange(key_count, device=query_positions.device)
    visible = keys <= query_positions[..., None]
    if window is not None:
        visible &= keys > query_positions[..., None] - window
    return visible


@contextmanager
def uninitialized_layers():
    """Inside, nn.Linear and nn.Embedding skip their random init: their weights are allocations never
    written, so not yet resident, for a loader to replace. (Building on the meta device instead runs
    each op through torch._refs, which imports torch._dynamo: ~2 s and ~70 MB for a loader.)"""
    saved = nn.Linear.reset_parameters, nn.Embedding.reset_parameters
    nn.Linear.reset_parameters = nn.Embedding.reset_parameters = lambda self: None
    try:
        yield
    finally:
        nn.Linear.reset_parameters, nn.Embedding.reset_parameters = saved


HUGE_PAGE_BYTES = 2 << 20


def zeroed_from_os(
    shape: tuple[int, ...], device: torch.device | str, dtype: torch.dtype, huge_pages: bool = False
) -> torch.Tensor:
    """torch.zeros, but on CPU straight from an anonymous mmap: pages are zero until written, count
    towards RSS only once used, and go back to the OS when the tensor is freed. glibc would keep a
    freed cache in its heap and place the next one elsewhere (+6 MB peak RSS for SmolLM2 int4).

    `huge_pages`: 2 MB-aligned and advised as transparent huge pages, for weights that decoding streams
    whole every step. In a VM each 4 KB page's TLB miss walks two page tables: Qwen3-0.6B Q4_K_M's
    decode step took 44 ms on 4 KB pages, 32 on 2 MB ones (2 threads). Not for KV caches, whose rows
    stay out of RSS until used only at 4 KB granularity."""
    count = math.prod(shape)
    if torch.device(device).type != "cpu" or count == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    size = count * dtype.itemsize
    if not huge_pages or size < HUGE_PAGE_BYTES or not hasattr(mmap, "MAP_PRIVATE"):  # (Windows has no flags)
        return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype, count=count).view(shape)
    # private: mmap's default (shared) anonymous memory is shmem, which gets huge pages only where
    # shmem_enabled allows (not by default); + room to start at a 2 MB boundary
    region = mmap.mmap(-1, size + HUGE_PAGE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError):  # no transparent huge pages in this kernel: 4 KB pages it is
        pass
    whole = torch.frombuffer(region, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE_BYTES
    return whole[start : start + size].view(dtype).view(shape)


@dataclass
class CacheStep:
    """Where one forward pass's new keys and values go in a KVCache, and which keys its queries see."""

    rows: torch.Tensor | None  # per row: (B, T) cache row of each new entry; None when aligned
    positions: slice | torch.Tensor  # aligned: the positions written, alike in every row; per row: (B, T)
    seen: int  # queries attend over cached positions [0, seen)
    mask: torch.Tensor | None  # True where a query may see a key; None with is_causal or one query
    is_causal: bool
    slots: torch.Tensor | None = None  # per row: the cache rows the batch reads (None: rows 0..B-1)
    # what a sliding-window layer's queries see instead (mask, is_causal): the same when no query is
    # past the window yet; None in a model without sliding layers
    sliding: tuple[torch.Tensor | None, bool] | None = None


class KVCache:
    """Preallocated keys and values of every layer, for incremental decoding.

    Two ways to fill it. Aligned: every row continues at `length`, which the model advances
    (one-prompt generation). Per row: the caller passes each row's start position and,
    optionally, which cache rows (`slots`) the batch's rows use, so sequences of different
    lengths share one cache (batched generation, a server's continuous batching).

    `static=True` keeps every per-row step's shapes the same whatever the positions: queries attend
    over the whole capacity with a mask, and positions are the caller's to check. `torch.compile`
    then builds one graph for every decoding step; otherwise the attention would cover only the
    positions seen, a length read from the data, so each step would compile anew.

    Sliding-window layers keep every position too (full size, not a ring buffer): their queries read
    the same keys through a band mask, so one cache layout and one write path serve both kinds.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch_size: int,
        max_length: int | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        static: bool = False,
    ):
        self.max_length = max_length or config.block_size
        self.static = static
        self.sliding_window = config.sliding_window
        self.sliding_layers = [config.is_sliding(layer) for layer in range(config.n_layers)]
        shape = (batch_size, config.kv_heads, self.max_length, config.head_dim)
        self.keys = [zeroed_from_os(shape, device, dtype) for _ in range(config.n_layers)]
        self.values = [zeroed_from_os(shape, device, dtype) for _ in range(config.n_layers)]
        self.length = 0
        self.step: CacheStep | None = None  # set by `begin` for the forward pass under way

    def reset(self) -> None:
        self.length = 0

    def copy_prefix(self, source: int, target: int, length: int) -> None:
        """Copy row `source`'s entries at positions [0, length) into row `target` (a shared prompt prefix)."""
        for entries in (*self.keys, *self.values):
            entries[target, :, :length] = entries[source, :, :length]

    def begin(self, batch: int, length: int, positions: torch.Tensor | None, slots: torch.Tensor | None) -> None:
        """Work out, once per forward pass, where new keys go and which keys each query sees."""
        if positions is None:  # aligned
            past = self.length
            if past + length > self.max_length:
                raise ValueError(f"cache holds {self.max_length} positions; {past} used + {length} new do not fit")
            query_positions = past + torch.arange(length, device=self.keys[0].device)
            if past == 0 or length == 1:
                mask, is_causal = None, past == 0 and length > 1
            else:
                mask, is_causal = visible_keys(query_positions, past + length, None), False
            sliding = None
            if any(self.sliding_layers):
                sliding = (mask, is_causal)
                if past + length > self.sliding_window:  # some query has keys out of its window
                    sliding = (visible_keys(query_positions, past + length, self.sliding_window), False)
            self.step = CacheStep(None, slice(past, past + length), past + length, mask, is_causal, sliding=sliding)
            return
        device = self.keys[0].device
        query_positions = positions[:, None] + torch.arange(length, device=device)  # (B, T)
        if self.static:
            seen = self.max_length
        else:
            seen = int(query_positions.max()) + 1
            if seen > self.max_length:
                raise ValueError(f"cache holds {self.max_length} positions; position {seen - 1} does not fit")
        rows = torch.arange(batch, device=device) if slots is None else slots
        # Key j is visible to the query at position p iff j <= p: causal within each row's own sequence.
        mask = visible_keys(query_positions, seen, None)[:, None]
        sliding = None
        if any(self.sliding_layers):
            # static: always the band (one graph); else only once a query is past the window
            banded = self.static or seen > self.sliding_window
            sliding = (visible_keys(query_positions, seen, self.sliding_window)[:, None] if banded else mask, False)
        self.step = CacheStep(rows[:, None].expand(batch, length), query_positions, seen, mask, False, slots, sliding)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor):
        """Store this layer's new k, v (B, kv_heads, T, head_dim); all keys/values to attend over, mask, is_causal."""
        step, keys, values = self.step, self.keys[layer], self.values[layer]
        batch = k.shape[0]
        if step.rows is None:  # aligned
            keys[:batch, :, step.positions] = k
            values[:batch, :, step.positions] = v
        else:
            keys[step.rows, :, step.positions] = k.transpose(1, 2)
            values[step.rows, :, step.positions] = v.transpose(1, 2)
        read = slice(None, batch) if step.slots is None else step.slots
        mask, is_causal = step.sliding if self.sliding_layers[layer] else (step.mask, step.is_causal)
        return keys[read, :, : step.seen], values[read, :, : step.seen], mask, is_causal

    def finish(self, length: int) -> None:
        if self.step is not None and self.step.rows is None:
            self.length += length
        self.step = None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.layer_index = layer_index
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.kv_heads, config.head_dim
        # One fused projection for q, k and v: a single matmul is faster than three on CPU.
        qkv_bias = config.bias if config.qkv_bias is None else config.qkv_bias
        self.qkv = nn.Linear(config.d_model, (config.n_heads + 2 * config.kv_heads) * config.head_dim, bias=qkv_bias)
        self.out = nn.Linear(config.n_heads * config.head_dim, config.d_model, bias=config.bias)
        # Qwen3, Gemma 3: each head's q and k RMS-normed (one weight of head_dim, shared by the heads)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.qk_norm = config.qk_norm
        self.scale = config.attention_scale or 1 / math.sqrt(config.head_dim)
        self.dropout = config.dropout
        self.causal = config.causal
        # Interpretability: a list here (set by `lmforge.evaluation.interpret.recording_attention`) receives each
        # call's attention weights (B, heads, T, S). None, the default, costs nothing.
        self.attention_record: list | None = None

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
        cache: KVCache | None,
        padding_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`padding_mask`, True where attention is allowed: (B, 1, 1, T) for padded non-causal inputs, or
        (B, 1, T, T) complete with causality (packed documents)."""
        batch, length, _ = x.shape
        q, k, v = self.qkv(x).split(
            [self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.n_kv_heads * self.head_dim], dim=-1
        )
        q = q.view(batch, length, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(batch, length, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)

        mask, is_causal = padding_mask, self.causal and length > 1 and padding_mask is None
        if cache is not None:  # attend over everything cached so far, this step included
            k, v, mask, is_causal = cache.update(self.layer_index, k, v)
        grouped = self.n_kv_heads != self.n_heads
        if grouped and (self.attention_record is not None or not SDPA_GROUPS_HEADS):
            k = k.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1)
            grouped = False

        # softmax(q k^T * scale) v, scale 1/sqrt(head_dim) unless the config names one; causal: a query
        # sees its own and earlier positions (a sliding layer's mask: only the window's last ones).
        if self.attention_record is not None:
            y = self.attention_with_weights(q, k, v, mask, is_causal)
        else:
            # grouped: each k/v head serves n_heads / n_kv_heads query heads, without copies of it
            gqa = {"enable_gqa": True} if grouped else {}
            y = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=is_causal,
                dropout_p=self.dropout if self.training else 0.0,
                scale=self.scale,
                **gqa,
            )
        y = y.transpose(1, 2).reshape(batch, length, self.n_heads * self.head_dim)
        return F.dropout(self.out(y), self.dropout, self.training)

    def attention_with_weights(self, q, k, v, mask, is_causal) -> torch.Tensor:
        """The same attention written out, so the weights can be kept (SDPA never materialises them)."""
        scores = (q @ k.transpose(-2, -1)) * self.scale
        if is_causal:  # SDPA's convention: query i sees keys 0..i
            scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).tril().logical_not(), float("-inf"))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        weights = scores.softmax(-1)
        self.attention_record.append(weights)
        return weights @ v


class MLP(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.kind = config.mlp
        # SwiGLU and GeGLU (Shazeer 2020) fuse gate and up projections into one matmul.
        width = 2 * config.mlp_hidden if config.mlp in ("swiglu", "geglu") else config.mlp_hidden
        self.up = nn.Linear(config.d_model, width, bias=config.bias)
        self.down = nn.Linear(config.mlp_hidden, config.d_model, bias=config.bias)
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            if torch.is_grad_enabled():
                h = F.silu(gate) * up
            else:  # in place: no two more activation-sized tensors at a long prompt's prefill (peak RSS)
                h = F.silu(gate, inplace=True).mul_(up)
        elif self.kind == "geglu":  # Gemma: the gate through GELU's tanh approximation
            gate, up = h.chunk(2, dim=-1)
            h = F.gelu(gate, approximate="tanh") * up
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return F.dropout(self.down(h), self.dropout, self.training)


class Block(nn.Module):
    """Residual block. Pre-norm: x + attention(norm(x)), then x + mlp(norm(x)); with `post_norms`
    (Gemma 3) also a norm on each branch's output: x + norm(attention(norm(x))).
    Post-norm (the original Transformer, BERT): norm(x + attention(x)), then norm(x + mlp(x))."""

    def __init__(self, config: ModelConfig, layer_index: int):
        super().__init__()
        self.attention_norm = make_norm(config)
        self.attention = CausalSelfAttention(config, layer_index)
        self.mlp_norm = make_norm(config)
        self.mlp = MLP(config)
        self.post_norm = config.norm_position == "post"
        if config.post_norms:
            self.attention_post_norm = make_norm(config)
            self.mlp_post_norm = make_norm(config)
        self.branch_norms = config.post_norms

    def forward(self, x, rope, cache, padding_mask=None):
        if self.post_norm:
            x = self.attention_norm(x + self.attention(x, rope, cache, padding_mask))
            return self.mlp_norm(x + self.mlp(x))
        if self.branch_norms:
            x = x + self.attention_post_norm(self.attention(self.attention_norm(x), rope, cache, padding_mask))
            return x + self.mlp_post_norm(self.mlp(self.mlp_norm(x)))
        x = x + self.attention(self.attention_norm(x), rope, cache, padding_mask)
        return x + self.mlp(self.mlp_norm(x))


class Transformer(nn.Module):
    """Decoder-only language model: embeddings, blocks, final norm, LM head."""

    def __init__(self, config: ModelConfig, init_weights: bool = True):
        super().__init__()
        self.config = config
        self.token_embedding = nn.Embedding(config.vocab_size, config.d_model)
        if config.positions == "learned":
            self.position_embedding = nn.Embedding(config.block_size, config.d_model)
        else:
            self.register_buffer("rope_cos", torch.empty(0), persistent=False)
            self.register_buffer("rope_sin", torch.empty(0), persistent=False)
            if config.rope_local_theta is not None:  # the sliding layers' own, unscaled (Gemma 3)
                self.register_buffer("rope_local_cos", torch.empty(0), persistent=False)
                self.register_buffer("rope_local_sin", torch.empty(0), persistent=False)
            self.rebuild_buffers()
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.final_norm = make_norm(config)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        if init_weights:  # loaders skip this: they overwrite every weight anyway
            self.init_weights()

    def init_weights(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), zero biases, residual projections scaled down."""
        self.apply(self._init_weights)
        # GPT-2: scale residual projections by 1/sqrt(2 * n_layers) so the residual stream's
        # variance does not grow with depth.
        for name, parameter in self.named_parameters():
            if name.endswith(("attention.out.weight", "mlp.down.weight")):
                nn.init.normal_(parameter, mean=0.0, std=0.02 / math.sqrt(2 * self.config.n_layers))

    @classmethod
    def from_state_dict(cls, config: ModelConfig, weights: dict[str, torch.Tensor], prepare=None) -> Transformer:
        """A model that takes over `weights` (our names; a tied head may be left out), skipping random init.
        `prepare(model)`, if given, may swap layers (say, quantised ones) before the weights go in."""
        with uninitialized_layers():
            model = cls(config, init_weights=False)
            if prepare is not None:
                model = prepare(model)
        model.load_weights(weights, assign=True)
        return model

    def load_weights(self, weights: dict[str, torch.Tensor], assign: bool = False) -> None:
        """Fill the model with `weights` (our names; a tied head may be left out) and tie the LM head to
        the embedding iff `config.tie_embeddings`; ValueError naming what does not fit. `assign` takes
        the tensors over (their dtype and storage) instead of copying into the model's own."""
        expected = self.state_dict()
        wrong = [
            f"{name} {tuple(weight.shape)} (the config needs {tuple(expected[name].shape)})"
            for name, weight in weights.items()
            if name in expected and weight.shape != expected[name].shape
        ]
        if wrong:
            raise ValueError(f"weights do not match the config: {', '.join(wrong[:3])}")
        missing, unexpected = self.load_state_dict(weights, strict=False, assign=assign)
        if self.config.tie_embeddings:
            missing = [name for name in missing if name != "lm_head.weight"]
            # assign replaced the embedding's Parameter, so the head must point at the new one; a
            # quantised head (from a quantised tied embedding) holds its own codes instead.
            if isinstance(self.lm_head, nn.Linear):
                self.lm_head.weight = self.token_embedding.weight
        if missing or unexpected:
            raise ValueError(f"weights do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
        if assign:
            self.rebuild_buffers()

    def rebuild_buffers(self) -> None:
        """(Re)compute the RoPE tables, which are derived rather than saved, at their starting size."""
        if self.config.positions == "rope":
            size = min(self.config.block_size, ROPE_INITIAL_POSITIONS)
            self.rope_cos, self.rope_sin = self._rope_tables(size, local=False)
            if self.config.rope_local_theta is not None:
                self.rope_local_cos, self.rope_local_sin = self._rope_tables(size, local=True)

    def _rope_tables(self, size: int, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
        config = self.config
        if local:
            return rope_tables(config.head_dim, size, config.rope_local_theta)
        return rope_tables(config.head_dim, size, config.rope_theta, config.rope_scaling)

    def rope_for(self, positions: int, local: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin tables covering at least `positions` positions, grown by doubling (capped at block_size),
        so decoding token by token rebuilds them a handful of times, not once per token. `local`: the
        sliding layers' tables (a model with rope_local_theta)."""
        cos, sin = (self.rope_local_cos, self.rope_local_sin) if local else (self.rope_cos, self.rope_sin)
        if cos.shape[0] < positions:
            size = min(self.config.block_size, max(positions, 2 * cos.shape[0]))
            new_cos, new_sin = self._rope_tables(size, local)
            cos, sin = new_cos.to(cos.device, cos.dtype), new_sin.to(sin.device, sin.dtype)
            if local:
                self.rope_local_cos, self.rope_local_sin = cos, sin
            else:
                self.rope_cos, self.rope_sin = cos, sin
        return cos, sin

    def uses_local_rope(self, layer: int) -> bool:
        """Whether layer `layer` rotates by the sliding layers' own RoPE tables (rope_local_theta)."""
        return self.config.rope_local_theta is not None and self.config.is_sliding(layer)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for `tokens` (B, T), and the mean cross-entropy if `targets` are given.

        With a cache, `tokens` continue what it holds: at `cache.length`, or at each row's own
        start `positions` (B,) in cache rows `slots` (B,). Targets equal to -100 are ignored.
        `embeddings` (B, T, d_model), if given, stand in for the token embeddings (see `hidden_states`).
        """
        logits = self.logits(self.hidden_states(tokens, cache, positions, slots, document_ids, embeddings))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
        return logits, loss

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head over final-norm outputs, soft-capped where the config says."""
        return self.soft_cap(self.lm_head(hidden))

    def soft_cap(self, logits: torch.Tensor) -> torch.Tensor:
        """Gemma 2/3's cap * tanh(logits / cap), which keeps every logit within +-cap; as they are without a cap."""
        cap = self.config.logit_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token embeddings, scaled where the config says (Gemma: by sqrt(d_model) rounded to the
        activations' dtype, as HF does)."""
        x = self.token_embedding(tokens)
        if self.config.scale_embeddings:
            x = x * torch.tensor(math.sqrt(self.config.d_model), dtype=x.dtype)
        return x

    def hidden_states(
        self,
        tokens: torch.Tensor,
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
        embeddings: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Final-norm outputs (B, T, d_model): what the LM head reads (an engine applies it to last positions only).

        `document_ids` (B, T) marks packed training rows: a token attends only to earlier tokens of
        its own document, and positions count from 0 at each document's start. `embeddings`
        (B, T, d_model) replace `self.embed(tokens)` as the first layer's input (a vision-language
        model puts image features at some positions, LLaVA-style); `tokens` may then be None.
        """
        batch, length = (tokens if embeddings is None else embeddings).shape[:2]
        start = cache.length if cache is not None and positions is None else 0
        mask = None
        if document_ids is not None:
            where, mask = document_positions_and_mask(document_ids)
            positions_seen = length
        elif positions is None:
            if start + length > self.config.block_size:
                raise ValueError(f"sequence of {start + length} tokens exceeds block_size={self.config.block_size}")
            where = slice(start, start + length)
            positions_seen = start + length
        else:
            where = positions[:, None] + torch.arange(length, device=positions.device)
            if cache is not None and cache.static:  # the caller checks positions (see KVCache)
                positions_seen = cache.max_length
            else:
                positions_seen = int(where.max()) + 1
                if positions_seen > self.config.block_size:
                    raise ValueError(f"position {positions_seen - 1} exceeds block_size={self.config.block_size}")
        if cache is not None:
            cache.begin(batch, length, positions, slots)
        x = self.embed(tokens) if embeddings is None else embeddings
        rope = local_rope = None
        if self.config.positions == "learned":
            x = x + self.position_embedding.weight[where]
        else:
            rope = self._rope_at(where, positions_seen, local=False)
            if self.config.rope_local_theta is not None:
                local_rope = self._rope_at(where, positions_seen, local=True)
        # Without a cache, sliding layers see a band of the causal (or document) mask; with one, the
        # cache's step says what each layer sees.
        sliding_mask = mask
        window = self.config.sliding_window
        if cache is None and window is not None and length > window:
            band = visible_keys(torch.arange(length, device=x.device), length, window)
            sliding_mask = band if mask is None else mask & band
        x = F.dropout(x, self.config.dropout, self.training)
        for layer, block in enumerate(self.blocks):
            sliding = self.config.is_sliding(layer)
            layer_rope = local_rope if self.uses_local_rope(layer) else rope
            x = block(x, layer_rope, cache, sliding_mask if sliding else mask)
        if cache is not None:
            cache.finish(length)
        return self.final_norm(x)

    def _rope_at(self, where, positions_seen: int, local: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.rope_for(positions_seen, local)
        if isinstance(where, slice):
            return cos[where], sin[where]
        return cos[where][:, None], sin[where][:, None]  # per-row positions: (B, T, head_dim) → broadcast over heads

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameter count; tied weights counted once."""
        total = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            total -= self.token_embedding.weight.numel()
            if self.config.positions == "learned":
                total -= self.position_embedding.weight.numel()
        return total

    def flops_per_token(self, context_length: int | None = None) -> float:
        """Training FLOPs per token (forward + backward), PaLM appendix B: 6N + 12 * L * d * T.

        N counts the weights that take part in matmuls: embedding lookups are free, a tied
        embedding still costs as the LM head.
        """
        config = self.config
        matmul_parameters = self.num_parameters(exclude_embeddings=True) + self.lm_head.weight.numel()
        context = context_length or config.block_size
        return 6 * matmul_parameters + 12 * config.n_layers * config.d_model * context


__all__ = ["ModelConfig", "PRESETS", "preset", "Transformer", "KVCache"]
